/* Long-term Ed25519 identities of the cloud and the devices.
 *
 * On disk: DIR/NAME.key (secret, mode 0600, refused when group/other can read it or
 * when another user owns it) and DIR/NAME.pub (public key, shareable). Public keys
 * are shown as short fingerprints: the first 16 bytes of BLAKE2b-256(pk) in hex,
 * grouped by four ("ot1:3f2a:9c01:..."). */
#ifndef OT_IDENTITY_H
#define OT_IDENTITY_H

#include <stddef.h>
#include <stdint.h>

#define OT_PK_BYTES 32
#define OT_SK_BYTES 64
#define OT_SIG_BYTES 64
#define OT_FINGERPRINT_LEN 44 /* "ot1:" + 8 groups of 4 hex + 7 ':' + NUL */

typedef struct {
  uint8_t pk[OT_PK_BYTES];
  uint8_t sk[OT_SK_BYTES];
} ot_identity;

/* Initialises libsodium (idempotent, thread-safe). Every protocol entry point calls it. */
int ot_sodium_init(void);

/* A fresh random identity. */
int ot_identity_generate(ot_identity *out);
/* Writes DIR/NAME.key (0600, refuses to overwrite) and DIR/NAME.pub; creates DIR. */
int ot_identity_save(const ot_identity *id, const char *dir, const char *name);
/* Loads a secret key file; refuses one readable by group/others or owned by another user. */
int ot_identity_load(const char *key_path, ot_identity *out);
/* Reads a .pub file (or any file whose first word is the 64-hex public key line). */
int ot_pubkey_load(const char *path, uint8_t pk[OT_PK_BYTES]);
/* Parses 64 hex digits (surrounding space allowed). */
int ot_pubkey_parse(const char *hex, uint8_t pk[OT_PK_BYTES]);
/* Writes the 64-hex form of pk plus NUL (65 bytes). */
void ot_pubkey_hex(const uint8_t pk[OT_PK_BYTES], char out[65]);
/* Writes the fingerprint of pk (OT_FINGERPRINT_LEN bytes with the NUL). */
void ot_fingerprint(const uint8_t pk[OT_PK_BYTES], char out[OT_FINGERPRINT_LEN]);
/* 1 if fp (as printed by ot_fingerprint, case-insensitive) names pk, else 0. */
int ot_fingerprint_matches(const uint8_t pk[OT_PK_BYTES], const char *fp);
/* Wipes the secret key. */
void ot_identity_wipe(ot_identity *id);

/* `keygen --out DIR [--name NAME]`, shared by offtune-cloud and offtune-device:
 * prints the public key and fingerprint to stdout. Returns a process exit code. */
int ot_keygen_command(const char *prog, const char *default_name, int argc, char **argv);

#endif
