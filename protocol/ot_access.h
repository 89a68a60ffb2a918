/* Which devices the cloud admits: an allowlist of public keys, one-time enrolment
 * tokens issued by an operator, and a revocation list that wins over both.
 *
 * The transport sees only ot_access_ops, so the cloud daemon can put its SQLite
 * registry behind the same two calls. ot_access is the in-memory implementation,
 * optionally saved to / loaded from a text file:
 *   allow <64 hex public key>
 *   revoke <64 hex public key>
 *   token <64 hex BLAKE2b-256 of the token>     (tokens themselves are never stored)
 * All calls are thread-safe; a revocation is seen by the next check. */
#ifndef OT_ACCESS_H
#define OT_ACCESS_H

#include <stdint.h>

#include "ot_identity.h"

#define OT_TOKEN_CHARS 48 /* "ote1-" + 43 base64url characters of 32 random bytes */

/* A fresh random token (NUL-terminated, OT_TOKEN_CHARS characters) and its hash. Every
 * store (ot_access, the cloud registry) keeps only hashes, so a leaked store enrols no one. */
void ot_token_new(char token[OT_TOKEN_CHARS + 1], uint8_t hash[32]);
void ot_token_hash(const char *token, uint8_t hash[32]);

typedef struct {
  /* Admits pk at handshake time: allowed and not revoked, or (not revoked and) a valid
   * unused token, which is consumed and adds pk to the allowlist (*enrolled = 1). */
  int (*admit)(void *self, const uint8_t pk[OT_PK_BYTES], const char *token, int *enrolled);
  /* Called on every request: OT_OK while pk is allowed and not revoked. */
  int (*check)(void *self, const uint8_t pk[OT_PK_BYTES]);
} ot_access_ops;

typedef struct ot_access ot_access;
extern const ot_access_ops ot_access_memory_ops;

int ot_access_new(ot_access **out);
void ot_access_free(ot_access *a);
int ot_access_load(ot_access *a, const char *path);
int ot_access_save(ot_access *a, const char *path);
int ot_access_allow(ot_access *a, const uint8_t pk[OT_PK_BYTES]);
int ot_access_revoke(ot_access *a, const uint8_t pk[OT_PK_BYTES]);
/* Issues a one-time token (NUL-terminated, OT_TOKEN_CHARS characters). */
int ot_access_issue_token(ot_access *a, char token[OT_TOKEN_CHARS + 1]);
int ot_access_admit(ot_access *a, const uint8_t pk[OT_PK_BYTES], const char *token, int *enrolled);
int ot_access_check(ot_access *a, const uint8_t pk[OT_PK_BYTES]);

#endif
