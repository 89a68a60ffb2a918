#include "ot_envelope.h"

#include <sodium.h>
#include <string.h>

#include "ot_error.h"
#include "ot_identity.h"
#include "ot_pb.h"

static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Associated data: version, type, session id, lane, seq (little-endian, 28 bytes). */
static void header_ad(const ot_env_header *h, uint8_t ad[28]) {
  put32(ad, h->version);
  put32(ad + 4, h->type);
  put64(ad + 8, h->session_id);
  put32(ad + 16, h->lane);
  put64(ad + 20, h->seq);
}

static void header_nonce(uint32_t lane, uint64_t seq, uint8_t n[24]) {
  memset(n, 0, 24);
  put32(n, lane);
  put64(n + 4, seq);
}

void ot_env_clear(ot_env *e) {
  if (!e) return;
  if (!e->borrowed) free(e->block ? e->block : e->data);
  memset(e, 0, sizeof *e);
}

/* Parses an Envelope in place (no copy of the body); the same checks as protobuf-c
 * (required fields, wire types) plus ours. */
int ot_env_view(const uint8_t *wire, size_t len, size_t max_len, ot_env *out) {
  if (!wire || !out) return ot_error(OT_ERR_INVALID, "ot_env_decode: NULL argument");
  if (max_len > OT_MSG_MAX_HARD) max_len = OT_MSG_MAX_HARD;
  if (len > max_len)
    return ot_error(OT_ERR_RANGE, "message of %zu bytes exceeds the limit of %zu", len, max_len);
  ot_pbr r = {wire, wire + len};
  uint64_t v[6] = {0};
  unsigned seen = 0;
  const uint8_t *d[2] = {NULL, NULL};
  size_t dl[2] = {0, 0};
  uint32_t f;
  int wt, more;
  while ((more = ot_pbr_next(&r, &f, &wt)) == 1) {
    int bad = 0;
    if (f == 1 || f == 2 || f == 4) {
      bad = wt != 0 || ot_pbr_varint(&r, &v[f]);
      v[f] = (uint32_t)v[f];
    } else if (f == 3 || f == 5) {
      bad = wt != 1 || ot_pbr_fixed64(&r, &v[f]);
    } else if (f == 6 || f == 7) {
      bad = wt != 2 || ot_pbr_bytes(&r, &d[f - 6], &dl[f - 6]);
    } else {
      bad = ot_pbr_skip(&r, wt);
    }
    if (bad) break;
    if (f < 8) seen |= 1u << f;
  }
  if (more != 0 || (seen & 0x3e) != 0x3e)
    return ot_error(OT_ERR_FORMAT, "malformed envelope (%zu bytes)", len);
  int has_body = (seen >> 6) & 1, has_sealed = (seen >> 7) & 1;
  if (v[1] != OT_PROTOCOL_VERSION)
    return ot_error(OT_ERR_MISMATCH, "unsupported protocol version %u (this peer speaks %d)", (uint32_t)v[1],
                    OT_PROTOCOL_VERSION);
  if (v[4] >= OT_MAX_LANES) return ot_error(OT_ERR_FORMAT, "envelope lane %u out of range", (uint32_t)v[4]);
  if (has_body == has_sealed)
    return ot_error(OT_ERR_FORMAT, "envelope must carry exactly one of body and sealed");
  if (has_body && (v[4] != 0 || v[5] != 0))
    return ot_error(OT_ERR_FORMAT, "plain envelope with a lane or sequence number");
  if (has_sealed && dl[1] < OT_AEAD_ABYTES)
    return ot_error(OT_ERR_FORMAT, "sealed body shorter than its tag");
  ot_env e = {0};
  e.h = (ot_env_header){(uint32_t)v[1], (uint32_t)v[2], (uint32_t)v[4], v[3], v[5]};
  e.sealed = has_sealed;
  e.data = (uint8_t *)(uintptr_t)d[has_sealed];
  e.len = dl[has_sealed];
  e.borrowed = 1;
  *out = e;
  return OT_OK;
}

int ot_env_decode(const uint8_t *wire, size_t len, size_t max_len, ot_env *out) {
  ot_env e;
  int rc = ot_env_view(wire, len, max_len, &e);
  if (rc) return rc;
  uint8_t *copy = malloc(e.len ? e.len : 1);
  if (!copy) return ot_error(OT_ERR_NOMEM, "out of memory");
  if (e.len) memcpy(copy, e.data, e.len);
  e.data = copy;
  e.borrowed = 0;
  *out = e;
  return OT_OK;
}

static int pack_env(const ot_env_header *h, int sealed, const uint8_t *data, size_t len, uint8_t **out,
                    size_t *out_len) {
  Offtune__Envelope m = OFFTUNE__ENVELOPE__INIT;
  m.version = h->version;
  m.type = h->type;
  m.session_id = h->session_id;
  m.lane = h->lane;
  m.seq = h->seq;
  ProtobufCBinaryData bd = {len, (uint8_t *)data};
  if (sealed) {
    m.has_sealed = 1;
    m.sealed = bd;
  } else {
    m.has_body = 1;
    m.body = bd;
  }
  if (ot_pb_pack(&m.base, out, out_len) != 0) return ot_error(OT_ERR_NOMEM, "out of memory");
  return OT_OK;
}

int ot_env_pack_plain(uint32_t type, uint64_t session_id, const uint8_t *body, size_t len, uint8_t **out,
                      size_t *out_len) {
  if ((!body && len) || !out || !out_len) return ot_error(OT_ERR_INVALID, "ot_env_pack_plain: NULL argument");
  ot_env_header h = {OT_PROTOCOL_VERSION, type, 0, session_id, 0};
  return pack_env(&h, 0, body, len, out, out_len);
}

size_t ot_env_sealed_len(uint32_t lane, uint32_t type, size_t body_len) {
  size_t n = body_len + OT_AEAD_ABYTES;
  return 1 + ot_pb_varint_len(OT_PROTOCOL_VERSION) + 1 + ot_pb_varint_len(type) + 1 + 8 + 1 +
         ot_pb_varint_len(lane) + 1 + 8 + 1 + ot_pb_varint_len(n) + n;
}

int ot_env_seal_to(const ot_session *s, uint32_t lane, uint64_t seq, uint32_t type, const uint8_t *body,
                   size_t len, uint8_t *out, size_t out_len) {
  if (!s || (!body && len) || !out) return ot_error(OT_ERR_INVALID, "ot_env_seal: NULL argument");
  if (lane >= s->lanes || lane >= OT_MAX_LANES)
    return ot_error(OT_ERR_RANGE, "lane %u out of range (session has %u)", lane, s->lanes);
  if (len > OT_MSG_MAX_HARD) return ot_error(OT_ERR_RANGE, "body of %zu bytes is too large", len);
  if (out_len != ot_env_sealed_len(lane, type, len))
    return ot_error(OT_ERR_INTERNAL, "ot_env_seal_to: buffer of %zu bytes", out_len);
  ot_env_header h = {OT_PROTOCOL_VERSION, type, lane, s->id, seq};
  uint8_t ad[28], nonce[24];
  header_ad(&h, ad);
  header_nonce(lane, seq, nonce);
  /* Envelope fields 1-5 and 7 in order, as protobuf-c would write them */
  uint8_t *p = out;
  *p++ = 0x08;
  p = ot_pbw_varint(p, h.version);
  *p++ = 0x10;
  p = ot_pbw_varint(p, type);
  *p++ = 0x19;
  p = ot_pbw_fixed64(p, s->id);
  *p++ = 0x20;
  p = ot_pbw_varint(p, lane);
  *p++ = 0x29;
  p = ot_pbw_fixed64(p, seq);
  *p++ = 0x3a;
  p = ot_pbw_varint(p, len + OT_AEAD_ABYTES);
  if (s->aead == OT_AEAD_AESGCM)
    crypto_aead_aes256gcm_encrypt_detached(p, p + len, NULL, body, len, ad, sizeof ad, NULL, nonce,
                                           s->tx_key);
  else
    crypto_aead_xchacha20poly1305_ietf_encrypt_detached(p, p + len, NULL, body, len, ad, sizeof ad, NULL,
                                                        nonce, s->tx_key);
  return OT_OK;
}

int ot_env_seal_seq(const ot_session *s, uint32_t lane, uint64_t seq, uint32_t type, const uint8_t *body,
                    size_t len, uint8_t **out, size_t *out_len) {
  if (!s || (!body && len) || !out || !out_len) return ot_error(OT_ERR_INVALID, "ot_env_seal: NULL argument");
  if (len > OT_MSG_MAX_HARD) return ot_error(OT_ERR_RANGE, "body of %zu bytes is too large", len);
  size_t n = ot_env_sealed_len(lane, type, len);
  uint8_t *w = malloc(n);
  if (!w) return ot_error(OT_ERR_NOMEM, "out of memory");
  int rc = ot_env_seal_to(s, lane, seq, type, body, len, w, n);
  if (rc) {
    free(w);
    return rc;
  }
  *out = w;
  *out_len = n;
  return OT_OK;
}

int ot_env_seal(ot_session *s, uint32_t lane, uint32_t type, const uint8_t *body, size_t len, uint8_t **out,
                size_t *out_len) {
  if (!s) return ot_error(OT_ERR_INVALID, "ot_env_seal: NULL session");
  if (lane >= s->lanes || lane >= OT_MAX_LANES) return ot_error(OT_ERR_RANGE, "lane %u out of range", lane);
  if (s->tx_seq[lane] == UINT64_MAX) return ot_error(OT_ERR_RANGE, "sequence numbers exhausted: rekey");
  int rc = ot_env_seal_seq(s, lane, s->tx_seq[lane] + 1, type, body, len, out, out_len);
  if (rc == OT_OK) s->tx_seq[lane]++;
  return rc;
}

/* Checks the header against the session and decrypts (m may equal c: in place). */
static int unseal_to(const ot_session *s, const ot_env *e, uint8_t *m) {
  if (!e->sealed) return ot_error(OT_ERR_FORMAT, "message of type %u is not encrypted", e->h.type);
  if (e->h.session_id != s->id)
    return ot_error(OT_ERR_MISMATCH, "message for session %016llx arrived on session %016llx",
                    (unsigned long long)e->h.session_id, (unsigned long long)s->id);
  if (e->h.lane >= s->lanes) return ot_error(OT_ERR_RANGE, "lane %u out of range", e->h.lane);
  if (e->len < OT_AEAD_ABYTES) return ot_error(OT_ERR_FORMAT, "sealed body shorter than its tag");
  uint8_t ad[28], nonce[24];
  header_ad(&e->h, ad);
  header_nonce(e->h.lane, e->h.seq, nonce);
  size_t n = e->len - OT_AEAD_ABYTES;
  const uint8_t *c = e->data, *mac = e->data + n;
  int bad = s->aead == OT_AEAD_AESGCM
                ? crypto_aead_aes256gcm_decrypt_detached(m, NULL, c, n, mac, ad, sizeof ad, nonce, s->rx_key)
                : crypto_aead_xchacha20poly1305_ietf_decrypt_detached(m, NULL, c, n, mac, ad, sizeof ad,
                                                                      nonce, s->rx_key);
  if (bad != 0)
    return ot_error(OT_ERR_FORMAT, "message failed authentication (session %016llx, lane %u, seq %llu)",
                    (unsigned long long)s->id, e->h.lane, (unsigned long long)e->h.seq);
  return OT_OK;
}

int ot_env_unseal(const ot_session *s, const ot_env *e, uint8_t **body, size_t *body_len) {
  if (!s || !e || !body || !body_len) return ot_error(OT_ERR_INVALID, "ot_env_unseal: NULL argument");
  size_t n = e->len >= OT_AEAD_ABYTES ? e->len - OT_AEAD_ABYTES : 0;
  uint8_t *pt = malloc(n ? n : 1);
  if (!pt) return ot_error(OT_ERR_NOMEM, "out of memory");
  int rc = unseal_to(s, e, pt);
  if (rc) {
    free(pt);
    return rc;
  }
  *body = pt;
  *body_len = n;
  return OT_OK;
}

int ot_env_unseal_inplace(const ot_session *s, ot_env *e, uint8_t **body, size_t *body_len) {
  if (!s || !e || !body || !body_len) return ot_error(OT_ERR_INVALID, "ot_env_unseal: NULL argument");
  int rc = unseal_to(s, e, e->data);
  if (rc) return rc;
  *body = e->data;
  *body_len = e->len - OT_AEAD_ABYTES;
  return OT_OK;
}

int ot_session_accept_seq(ot_session *s, uint32_t lane, uint64_t seq) {
  if (lane >= s->lanes) return ot_error(OT_ERR_RANGE, "lane %u out of range", lane);
  if (seq <= s->rx_seq[lane])
    return ot_error(OT_ERR_INVALID, "replayed or reordered message (lane %u, seq %llu, last accepted %llu)",
                    lane, (unsigned long long)seq, (unsigned long long)s->rx_seq[lane]);
  s->rx_seq[lane] = seq;
  return OT_OK;
}

int ot_env_open(ot_session *s, const uint8_t *wire, size_t len, size_t max_len, ot_env_header *h,
                uint8_t **body, size_t *body_len) {
  ot_env e = {0};
  int rc = ot_env_decode(wire, len, max_len, &e);
  if (rc) return rc;
  uint8_t *b = NULL;
  size_t bl = 0;
  if (!e.sealed && e.h.type == OT_MSG_REFUSAL) {
    rc = ot_refusal_error(e.data, e.len, 0);
  } else {
    rc = ot_env_unseal(s, &e, &b, &bl);
    if (rc == OT_OK) rc = ot_session_accept_seq(s, e.h.lane, e.h.seq);
    if (rc == OT_OK && e.h.type == OT_MSG_REFUSAL) rc = ot_refusal_error(b, bl, 1);
  }
  if (rc == OT_OK && h) *h = e.h;
  ot_env_clear(&e);
  if (rc) {
    free(b);
    return rc;
  }
  *body = b;
  *body_len = bl;
  return OT_OK;
}

int ot_refusal_pack(int code, const char *reason, uint8_t **out, size_t *out_len) {
  Offtune__Refusal r = OFFTUNE__REFUSAL__INIT;
  r.code = code;
  r.reason = (char *)(reason ? reason : "");
  r.has_supported_version = 1;
  r.supported_version = OT_PROTOCOL_VERSION;
  if (ot_pb_pack(&r.base, out, out_len) != 0) return ot_error(OT_ERR_NOMEM, "out of memory");
  return OT_OK;
}

int ot_refusal_error(const uint8_t *body, size_t len, int authenticated) {
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 8192);
  Offtune__Refusal *r = len <= 4096 ? offtune__refusal__unpack(&ca.a, len, body) : NULL;
  if (!r) return ot_error(OT_ERR_FORMAT, "peer refused with a malformed refusal");
  int code = r->code;
  if (code >= 0 || code < OT_ERR_INTERNAL) code = OT_ERR_INVALID;
  char reason[301];
  size_t n = strnlen(r->reason, 300);
  for (size_t i = 0; i < n; i++) /* the peer's text: printable ASCII only */
    reason[i] = r->reason[i] >= 0x20 && r->reason[i] < 0x7f ? r->reason[i] : '?';
  reason[n] = '\0';
  int rc = ot_error(code, "refused by peer%s: %s", authenticated ? "" : " (unauthenticated)", reason);
  offtune__refusal__free_unpacked(r, &ca.a);
  return rc;
}

void ot_session_wipe(ot_session *s) {
  if (s) sodium_memzero(s, sizeof *s);
}
