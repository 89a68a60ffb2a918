/* The authenticated key exchange, as a pure state machine over wire bytes (no
 * sockets), so it can be unit-tested and fuzzed on its own.
 *
 *   C -> S  ClientHello   (plain)  version, ephemeral X25519 pk_c, nonce_c
 *   S -> C  ServerHello   (plain)  core = {version, pk_s eph, nonce_s, session id,
 *                                  server identity, lanes, ttl}, signature over
 *                                  "offtune/1 server" || th
 *   C -> S  ClientFinish  (sealed) device identity, signature over
 *                                  "offtune/1 client" || H(th || device identity),
 *                                  optional enrolment token
 *   S -> C  ServerFinish  (sealed) or Refusal
 *
 * th = BLAKE2b-256("offtune/1 transcript" || len || ClientHello || len || core),
 * prk = BLAKE2b-256(key = X25519(eph_c, eph_s), th), and the per-direction keys are
 * crypto_kdf_derive_from_key(prk, 1 = client-to-server, 2 = server-to-client,
 * "ot1-keys"). Ephemeral secrets are wiped as soon as the keys exist (forward
 * secrecy); the long-term keys only sign. See docs/protocol.md. */
#ifndef OT_HANDSHAKE_H
#define OT_HANDSHAKE_H

#include <stddef.h>
#include <stdint.h>

#include "ot_access.h"
#include "ot_envelope.h"
#include "ot_identity.h"

typedef struct {
  const ot_identity *id;
  const uint8_t *pinned_pk;       /* the cloud's public key, or */
  const char *pinned_fingerprint; /* its fingerprint (one of the two is required) */
  const char *enrol_token;        /* optional one-time token */
  uint32_t version;               /* 0: OT_PROTOCOL_VERSION (tests speak others) */
  int no_aesgcm;                  /* do not offer AES-256-GCM (XChaCha20-Poly1305 only) */
} ot_hs_client_config;

typedef struct ot_hs_client ot_hs_client;

int ot_hs_client_new(const ot_hs_client_config *cfg, ot_hs_client **out);
void ot_hs_client_free(ot_hs_client *c);
/* First message. */
int ot_hs_client_hello(ot_hs_client *c, uint8_t **msg, size_t *len);
/* Checks the server's reply (pin, signature) and produces ClientFinish. */
int ot_hs_client_on_server_hello(ot_hs_client *c, const uint8_t *wire, size_t len, uint8_t **msg,
                                 size_t *msg_len);
/* Checks ServerFinish (or turns a Refusal into an error); on success the session is open. */
int ot_hs_client_on_server_finish(ot_hs_client *c, const uint8_t *wire, size_t len, ot_session *out);

typedef struct {
  const ot_identity *id;
  const ot_access_ops *acl;
  void *acl_self;
  uint32_t lanes;       /* offered to clients, 1..OT_MAX_LANES */
  uint32_t ttl_seconds; /* session lifetime */
  size_t max_msg;
} ot_hs_server_config;

/* Server state between ServerHello and ClientFinish. */
typedef struct {
  ot_session s;
  uint8_t th[32];
  uint64_t deadline; /* unix seconds */
} ot_hs_pending;

/* Handles ClientHello: fills *pending (keys derived, peer not yet known) and the reply. */
int ot_hs_server_on_hello(const ot_hs_server_config *cfg, const uint8_t *wire, size_t len,
                          ot_hs_pending *pending, uint8_t **reply, size_t *reply_len);
/* Handles ClientFinish for `pending`: verifies the device's signature, asks the access
 * control, and on success returns the open session and the sealed ServerFinish. */
int ot_hs_server_on_finish(const ot_hs_server_config *cfg, ot_hs_pending *pending, const uint8_t *wire,
                           size_t len, ot_session *out, uint8_t **reply, size_t *reply_len, int *enrolled);

/* Seconds since the epoch (the clock sessions expire by). */
uint64_t ot_unix_now(void);

#endif
