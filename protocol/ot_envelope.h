/* The encrypted envelope: every message on the wire is a protobuf Envelope.
 *
 * Header = (version, type, session id, lane, seq). Sealed bodies use
 * XChaCha20-Poly1305, or AES-256-GCM when both ends have AES-NI (chosen in the signed
 * handshake), with the session's key for the sender's direction; the
 * associated data is the header's fixed 28-byte encoding, the nonce is
 * (lane, seq) — unique because keys are fresh per session and direction and seq only
 * grows. A session has up to OT_MAX_LANES lanes (one per concurrent request stream);
 * within a lane, seq must strictly increase, so replayed and reordered messages are
 * refused; a message from another session fails (wrong id or wrong key). */
#ifndef OT_ENVELOPE_H
#define OT_ENVELOPE_H

#include <stddef.h>
#include <stdint.h>

#define OT_PROTOCOL_VERSION 1
#define OT_MAX_LANES 16
#define OT_KEY_BYTES 32
#define OT_AEAD_ABYTES 16
/* Envelope bytes beyond the body: protobuf tags and lengths + AEAD tag. */
#define OT_ENV_OVERHEAD 80
/* Default and hard limits on a whole wire message. */
#define OT_MSG_MAX_DEFAULT ((size_t)(4u << 20) + 4096)
#define OT_MSG_MAX_HARD ((size_t)(64u << 20))

typedef enum {
  OT_MSG_CLIENT_HELLO = 1,
  OT_MSG_SERVER_HELLO = 2,
  OT_MSG_CLIENT_FINISH = 3,
  OT_MSG_SERVER_FINISH = 4,
  OT_MSG_REFUSAL = 5,
  OT_MSG_APP = 16, /* application request/reply body, opaque to this layer */
  OT_MSG_TRANSFER_BEGIN = 32,
  OT_MSG_TRANSFER_STATUS = 33,
  OT_MSG_CHUNK = 34,
  OT_MSG_FETCH_OPEN = 35, /* reply: FETCH_INFO */
  OT_MSG_FETCH_INFO = 36,
  OT_MSG_FETCH_CHUNK = 37, /* reply: CHUNK */
} ot_msg_type;

typedef struct {
  uint32_t version, type, lane;
  uint64_t session_id, seq;
} ot_env_header;

typedef struct {
  uint64_t id;
  uint8_t tx_key[OT_KEY_BYTES], rx_key[OT_KEY_BYTES];
  uint32_t lanes;
  uint64_t tx_seq[OT_MAX_LANES]; /* last seq sent per lane */
  uint64_t rx_seq[OT_MAX_LANES]; /* last seq accepted per lane */
  uint64_t expires_at;           /* unix seconds */
  uint8_t peer_pk[32];           /* the authenticated peer's long-term key */
  uint32_t aead;                 /* OT_AEAD_XCHACHA or OT_AEAD_AESGCM, chosen in the handshake */
  uint32_t peer_max_msg;         /* the peer's message limit (0: unknown), from the signed ServerHello */
} ot_session;

enum { OT_AEAD_XCHACHA = 0, OT_AEAD_AESGCM = 1 };

/* A decoded (not yet decrypted) envelope: header plus a malloc'd copy of the plain
 * body or of the ciphertext. */
typedef struct {
  ot_env_header h;
  int sealed;
  uint8_t *data;
  size_t len;
  void *block;  /* what to free (data may sit inside it); NULL: data itself */
  int borrowed; /* data points into the caller's wire buffer (ot_env_view) */
} ot_env;

/* Decodes wire bytes; refuses more than max_len bytes before unpacking, an unknown
 * version (OT_ERR_MISMATCH), a lane out of range, and envelopes with neither or both
 * of body/sealed. */
int ot_env_decode(const uint8_t *wire, size_t len, size_t max_len, ot_env *out);
/* The same checks, but data points into wire (no copy): valid while wire is. The data
 * path uses it with ot_env_unseal_inplace on a buffer it owns (an nng message). */
int ot_env_view(const uint8_t *wire, size_t len, size_t max_len, ot_env *out);
void ot_env_clear(ot_env *e);

/* A plaintext envelope (handshake hello messages, refusals before keys exist). */
int ot_env_pack_plain(uint32_t type, uint64_t session_id, const uint8_t *body, size_t len, uint8_t **out,
                      size_t *out_len);
/* Seals body on lane with the next seq of that lane. Not thread-safe per lane. */
int ot_env_seal(ot_session *s, uint32_t lane, uint32_t type, const uint8_t *body, size_t len, uint8_t **out,
                size_t *out_len);
/* Seals with an explicit seq (the caller allocated it under its own lock). */
int ot_env_seal_seq(const ot_session *s, uint32_t lane, uint64_t seq, uint32_t type, const uint8_t *body,
                    size_t len, uint8_t **out, size_t *out_len);
/* Decrypts a decoded sealed envelope; checks the session id; does not touch seq state. */
int ot_env_unseal(const ot_session *s, const ot_env *e, uint8_t **body, size_t *body_len);
/* The same, decrypting in place: *body points into e->data (which must be writable). */
int ot_env_unseal_inplace(const ot_session *s, ot_env *e, uint8_t **body, size_t *body_len);
/* Exact wire size of a sealed envelope, and sealing into a buffer of that size (the
 * AEAD writes the ciphertext straight into it: no intermediate copy). body may already
 * sit where the ciphertext goes, out + out_len - len - OT_AEAD_ABYTES: sealed in place. */
size_t ot_env_sealed_len(uint32_t lane, uint32_t type, size_t body_len);
int ot_env_seal_to(const ot_session *s, uint32_t lane, uint64_t seq, uint32_t type, const uint8_t *body,
                   size_t len, uint8_t *out, size_t out_len);
/* Accepts seq on lane iff it is above the last accepted one, and records it. */
int ot_session_accept_seq(ot_session *s, uint32_t lane, uint64_t seq);
/* decode + unseal + accept_seq in one call (single-threaded users); a Refusal, sealed
 * or plain, becomes its error. */
int ot_env_open(ot_session *s, const uint8_t *wire, size_t len, size_t max_len, ot_env_header *h,
                uint8_t **body, size_t *body_len);

/* A Refusal body (code is an ot_status, reason is shown to the peer). */
int ot_refusal_pack(int code, const char *reason, uint8_t **out, size_t *out_len);
/* Parses a Refusal body and returns ot_error(code-ish, "refused by peer: reason"). */
int ot_refusal_error(const uint8_t *body, size_t len, int authenticated);

void ot_session_wipe(ot_session *s);

#endif
