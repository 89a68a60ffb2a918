#include "ot_handshake.h"

#include <sodium.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_error.h"
#include "ot_pb.h"

#define HS_MAX 8192

struct ot_hs_client {
  ot_identity id;
  uint8_t pinned_pk[32];
  int have_pk;
  char fingerprint[OT_FINGERPRINT_LEN];
  char *token;
  uint32_t version;
  int offer_aes;
  uint8_t eph_pk[32], eph_sk[32];
  uint8_t *hello; /* ClientHello body as sent */
  size_t hello_len;
  int state; /* 0 new, 1 hello sent, 2 finish sent, 3 done/failed */
  ot_session s;
};

uint64_t ot_unix_now(void) { return (uint64_t)time(NULL); }

static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void transcript(const uint8_t *ch, size_t ch_len, const uint8_t *core, size_t core_len,
                       uint8_t th[32]) {
  crypto_generichash_state st;
  uint8_t l[8];
  crypto_generichash_init(&st, NULL, 0, 32);
  crypto_generichash_update(&st, (const uint8_t *)"offtune/1 transcript", 20);
  put64(l, ch_len);
  crypto_generichash_update(&st, l, 8);
  crypto_generichash_update(&st, ch, ch_len);
  put64(l, core_len);
  crypto_generichash_update(&st, l, 8);
  crypto_generichash_update(&st, core, core_len);
  crypto_generichash_final(&st, th, 32);
}

static void client_th(const uint8_t th[32], const uint8_t pk[32], uint8_t out[32]) {
  crypto_generichash_state st;
  crypto_generichash_init(&st, NULL, 0, 32);
  crypto_generichash_update(&st, th, 32);
  crypto_generichash_update(&st, pk, 32);
  crypto_generichash_final(&st, out, 32);
}

/* label || hash, signed or verified by Ed25519 */
static void sig_msg(const char *label, const uint8_t h[32], uint8_t m[48]) {
  memset(m, 0, 48);
  memcpy(m, label, strlen(label) < 16 ? strlen(label) : 16);
  memcpy(m + 16, h, 32);
}

/* Keys from the shared secret and the transcript; fails on a low-order point. */
static int derive_keys(const uint8_t my_sk[32], const uint8_t peer_pk[32], const uint8_t th[32],
                       int is_server, ot_session *s) {
  uint8_t shared[32], prk[32];
  if (crypto_scalarmult(shared, my_sk, peer_pk) != 0) {
    sodium_memzero(shared, sizeof shared);
    return ot_error(OT_ERR_FORMAT, "handshake: peer's ephemeral key is a weak point");
  }
  crypto_generichash(prk, 32, th, 32, shared, 32);
  uint8_t c2s[32], s2c[32];
  crypto_kdf_derive_from_key(c2s, 32, 1, "ot1-keys", prk);
  crypto_kdf_derive_from_key(s2c, 32, 2, "ot1-keys", prk);
  memcpy(s->tx_key, is_server ? s2c : c2s, 32);
  memcpy(s->rx_key, is_server ? c2s : s2c, 32);
  sodium_memzero(shared, sizeof shared);
  sodium_memzero(prk, sizeof prk);
  sodium_memzero(c2s, sizeof c2s);
  sodium_memzero(s2c, sizeof s2c);
  return OT_OK;
}

int ot_hs_client_new(const ot_hs_client_config *cfg, ot_hs_client **out) {
  if (!cfg || !cfg->id || !out) return ot_error(OT_ERR_INVALID, "ot_hs_client_new: NULL argument");
  if (!cfg->pinned_pk && !cfg->pinned_fingerprint)
    return ot_error(OT_ERR_INVALID, "handshake: the cloud's key or fingerprint must be pinned");
  int rc = ot_sodium_init();
  if (rc) return rc;
  ot_hs_client *c = sodium_malloc(sizeof *c);
  if (!c) return ot_error(OT_ERR_NOMEM, "out of memory");
  memset(c, 0, sizeof *c);
  c->id = *cfg->id;
  if (cfg->pinned_pk) {
    memcpy(c->pinned_pk, cfg->pinned_pk, 32);
    c->have_pk = 1;
  } else {
    snprintf(c->fingerprint, sizeof c->fingerprint, "%s", cfg->pinned_fingerprint);
  }
  if (cfg->enrol_token && *cfg->enrol_token) {
    c->token = strdup(cfg->enrol_token);
    if (!c->token) {
      sodium_free(c);
      return ot_error(OT_ERR_NOMEM, "out of memory");
    }
  }
  c->version = cfg->version ? cfg->version : OT_PROTOCOL_VERSION;
  c->offer_aes = !cfg->no_aesgcm && crypto_aead_aes256gcm_is_available();
  *out = c;
  return OT_OK;
}

void ot_hs_client_free(ot_hs_client *c) {
  if (!c) return;
  if (c->token) {
    sodium_memzero(c->token, strlen(c->token));
    free(c->token);
  }
  free(c->hello);
  sodium_free(c); /* sodium_free wipes */
}

int ot_hs_client_hello(ot_hs_client *c, uint8_t **msg, size_t *len) {
  if (!c || !msg || !len) return ot_error(OT_ERR_INVALID, "ot_hs_client_hello: NULL argument");
  if (c->state != 0) return ot_error(OT_ERR_INVALID, "handshake: hello already sent");
  uint8_t nonce[32];
  crypto_kx_keypair(c->eph_pk, c->eph_sk);
  randombytes_buf(nonce, sizeof nonce);
  Offtune__ClientHello h = OFFTUNE__CLIENT_HELLO__INIT;
  h.version = c->version;
  h.ephemeral = (ProtobufCBinaryData){32, c->eph_pk};
  h.nonce = (ProtobufCBinaryData){32, nonce};
  h.has_aes256gcm = 1;
  h.aes256gcm = c->offer_aes;
  if (ot_pb_pack(&h.base, &c->hello, &c->hello_len) != 0) return ot_error(OT_ERR_NOMEM, "out of memory");
  int rc = ot_env_pack_plain(OT_MSG_CLIENT_HELLO, 0, c->hello, c->hello_len, msg, len);
  if (rc == OT_OK) c->state = 1;
  return rc;
}

/* Decodes a plain envelope of the wanted type; turns a Refusal into its error. */
static int expect_plain(const uint8_t *wire, size_t len, uint32_t type, ot_env *e) {
  int rc = ot_env_decode(wire, len, HS_MAX, e);
  if (rc) return rc;
  if (!e->sealed && e->h.type == OT_MSG_REFUSAL) {
    rc = ot_refusal_error(e->data, e->len, 0);
  } else if (e->sealed || e->h.type != type) {
    rc = ot_error(OT_ERR_FORMAT, "handshake: expected a plain message of type %u, got %s type %u", type,
                  e->sealed ? "sealed" : "plain", e->h.type);
  }
  if (rc) ot_env_clear(e);
  return rc;
}

int ot_hs_client_on_server_hello(ot_hs_client *c, const uint8_t *wire, size_t len, uint8_t **msg,
                                 size_t *msg_len) {
  if (!c || !wire || !msg || !msg_len) return ot_error(OT_ERR_INVALID, "ot_hs_client_on_server_hello: NULL");
  if (c->state != 1) return ot_error(OT_ERR_INVALID, "handshake: unexpected ServerHello");
  c->state = 3; /* any failure ends this handshake */
  ot_env e = {0};
  int rc = expect_plain(wire, len, OT_MSG_SERVER_HELLO, &e);
  if (rc) return rc;
  ot_pb_alloc ca, cb;
  ot_pb_alloc_init(&ca, 2 * HS_MAX);
  ot_pb_alloc_init(&cb, 2 * HS_MAX);
  Offtune__ServerHello *sh = offtune__server_hello__unpack(&ca.a, e.len, e.data);
  Offtune__ServerHelloCore *core = NULL;
  if (!sh)
    rc = ot_error(OT_ERR_FORMAT, "handshake: malformed ServerHello");
  else if (!(core = offtune__server_hello_core__unpack(&cb.a, sh->core.len, sh->core.data)))
    rc = ot_error(OT_ERR_FORMAT, "handshake: malformed ServerHello core");
  else if (core->version != c->version)
    rc = ot_error(OT_ERR_MISMATCH, "handshake: server answered version %u to our %u", core->version,
                  c->version);
  else if (core->ephemeral.len != 32 || core->nonce.len != 32 || core->identity.len != 32 ||
           sh->signature.len != 64)
    rc = ot_error(OT_ERR_FORMAT, "handshake: ServerHello has fields of the wrong size");
  else if (core->lanes < 1 || core->lanes > OT_MAX_LANES || core->session_id == 0 || core->ttl_seconds == 0)
    rc = ot_error(OT_ERR_FORMAT, "handshake: ServerHello has out-of-range parameters");
  else if (core->has_aead && (core->aead > OT_AEAD_AESGCM || (core->aead == OT_AEAD_AESGCM && !c->offer_aes)))
    rc = ot_error(OT_ERR_FORMAT, "handshake: server chose a cipher we did not offer");
  else if (e.h.session_id != core->session_id)
    rc = ot_error(OT_ERR_FORMAT, "handshake: ServerHello session id does not match its envelope");
  if (rc == OT_OK) {
    char fp[OT_FINGERPRINT_LEN];
    ot_fingerprint(core->identity.data, fp);
    if (c->have_pk ? sodium_memcmp(core->identity.data, c->pinned_pk, 32) != 0
                   : !ot_fingerprint_matches(core->identity.data, c->fingerprint))
      rc = ot_error(OT_ERR_MISMATCH, "handshake: the server's key %s is not the pinned one", fp);
  }
  uint8_t th[32], m[48];
  if (rc == OT_OK) {
    transcript(c->hello, c->hello_len, sh->core.data, sh->core.len, th);
    sig_msg("offtune/1 server", th, m);
    if (crypto_sign_verify_detached(sh->signature.data, m, sizeof m, core->identity.data) != 0)
      rc = ot_error(OT_ERR_FORMAT, "handshake: bad server signature");
  }
  if (rc == OT_OK) {
    memset(&c->s, 0, sizeof c->s);
    c->s.id = core->session_id;
    c->s.lanes = core->lanes;
    c->s.aead = core->has_aead ? core->aead : OT_AEAD_XCHACHA;
    c->s.expires_at = ot_unix_now() + core->ttl_seconds;
    c->s.peer_max_msg = core->has_max_msg ? core->max_msg : 0;
    memcpy(c->s.peer_pk, core->identity.data, 32);
    rc = derive_keys(c->eph_sk, core->ephemeral.data, th, 0, &c->s);
  }
  sodium_memzero(c->eph_sk, sizeof c->eph_sk);
  if (rc == OT_OK) {
    uint8_t th2[32], sig[64];
    client_th(th, c->id.pk, th2);
    sig_msg("offtune/1 client", th2, m);
    crypto_sign_detached(sig, NULL, m, sizeof m, c->id.sk);
    Offtune__ClientFinish f = OFFTUNE__CLIENT_FINISH__INIT;
    f.identity = (ProtobufCBinaryData){32, c->id.pk};
    f.signature = (ProtobufCBinaryData){64, sig};
    f.enrol_token = c->token;
    uint8_t *body = NULL;
    size_t bl = 0;
    if (ot_pb_pack(&f.base, &body, &bl) != 0) rc = ot_error(OT_ERR_NOMEM, "out of memory");
    if (rc == OT_OK) rc = ot_env_seal(&c->s, 0, OT_MSG_CLIENT_FINISH, body, bl, msg, msg_len);
    if (body) sodium_memzero(body, bl);
    free(body);
  }
  if (core) offtune__server_hello_core__free_unpacked(core, &cb.a);
  if (sh) offtune__server_hello__free_unpacked(sh, &ca.a);
  ot_env_clear(&e);
  if (rc == OT_OK)
    c->state = 2;
  else
    ot_session_wipe(&c->s);
  return rc;
}

int ot_hs_client_on_server_finish(ot_hs_client *c, const uint8_t *wire, size_t len, ot_session *out) {
  if (!c || !wire || !out) return ot_error(OT_ERR_INVALID, "ot_hs_client_on_server_finish: NULL");
  if (c->state != 2) return ot_error(OT_ERR_INVALID, "handshake: unexpected ServerFinish");
  c->state = 3;
  ot_env e = {0};
  int rc = ot_env_decode(wire, len, HS_MAX, &e);
  if (rc) return rc;
  uint8_t *body = NULL;
  size_t bl = 0;
  if (!e.sealed && e.h.type == OT_MSG_REFUSAL) {
    rc = ot_refusal_error(e.data, e.len, 0);
  } else {
    rc = ot_env_unseal(&c->s, &e, &body, &bl);
    if (rc == OT_OK) rc = ot_session_accept_seq(&c->s, e.h.lane, e.h.seq);
    if (rc == OT_OK && e.h.type == OT_MSG_REFUSAL)
      rc = ot_refusal_error(body, bl, 1);
    else if (rc == OT_OK && e.h.type != OT_MSG_SERVER_FINISH)
      rc = ot_error(OT_ERR_FORMAT, "handshake: expected ServerFinish, got type %u", e.h.type);
  }
  if (rc == OT_OK) {
    ot_pb_alloc ca;
    ot_pb_alloc_init(&ca, 2 * HS_MAX);
    Offtune__ServerFinish *f = offtune__server_finish__unpack(&ca.a, bl, body);
    if (!f)
      rc = ot_error(OT_ERR_FORMAT, "handshake: malformed ServerFinish");
    else
      offtune__server_finish__free_unpacked(f, &ca.a);
  }
  free(body);
  ot_env_clear(&e);
  if (rc == OT_OK) *out = c->s;
  ot_session_wipe(&c->s);
  return rc;
}

int ot_hs_server_on_hello(const ot_hs_server_config *cfg, const uint8_t *wire, size_t len,
                          ot_hs_pending *pending, uint8_t **reply, size_t *reply_len) {
  if (!cfg || !cfg->id || !wire || !pending || !reply || !reply_len)
    return ot_error(OT_ERR_INVALID, "ot_hs_server_on_hello: NULL argument");
  int rc = ot_sodium_init();
  if (rc) return rc;
  ot_env e = {0};
  rc = expect_plain(wire, len, OT_MSG_CLIENT_HELLO, &e);
  if (rc) return rc;
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 2 * HS_MAX);
  Offtune__ClientHello *h = offtune__client_hello__unpack(&ca.a, e.len, e.data);
  if (!h)
    rc = ot_error(OT_ERR_FORMAT, "handshake: malformed ClientHello");
  else if (h->version != OT_PROTOCOL_VERSION)
    rc = ot_error(OT_ERR_MISMATCH, "unsupported protocol version %u (this server speaks %d)", h->version,
                  OT_PROTOCOL_VERSION);
  else if (h->ephemeral.len != 32 || h->nonce.len != 32)
    rc = ot_error(OT_ERR_FORMAT, "handshake: ClientHello has fields of the wrong size");
  ot_hs_pending p;
  memset(&p, 0, sizeof p);
  uint8_t eph_pk[32], eph_sk[32], nonce[32], *core_buf = NULL;
  size_t core_len = 0;
  if (rc == OT_OK) {
    crypto_kx_keypair(eph_pk, eph_sk);
    randombytes_buf(nonce, sizeof nonce);
    do randombytes_buf(&p.s.id, sizeof p.s.id);
    while (p.s.id == 0);
    p.s.lanes = cfg->lanes >= 1 && cfg->lanes <= OT_MAX_LANES ? cfg->lanes : OT_MAX_LANES;
    uint32_t ttl = cfg->ttl_seconds ? cfg->ttl_seconds : 3600;
    Offtune__ServerHelloCore core = OFFTUNE__SERVER_HELLO_CORE__INIT;
    core.version = OT_PROTOCOL_VERSION;
    core.ephemeral = (ProtobufCBinaryData){32, eph_pk};
    core.nonce = (ProtobufCBinaryData){32, nonce};
    core.session_id = p.s.id;
    core.identity = (ProtobufCBinaryData){32, (uint8_t *)cfg->id->pk};
    core.lanes = p.s.lanes;
    core.ttl_seconds = ttl;
    p.s.aead = h->has_aes256gcm && h->aes256gcm && crypto_aead_aes256gcm_is_available() ? OT_AEAD_AESGCM
                                                                                        : OT_AEAD_XCHACHA;
    core.has_aead = 1;
    core.aead = p.s.aead;
    if (cfg->max_msg) { /* the client refuses larger requests itself instead of timing out */
      core.has_max_msg = 1;
      core.max_msg = cfg->max_msg > UINT32_MAX ? UINT32_MAX : (uint32_t)cfg->max_msg;
    }
    p.s.expires_at = ot_unix_now() + ttl;
    p.deadline = ot_unix_now() + 30;
    if (ot_pb_pack(&core.base, &core_buf, &core_len) != 0) rc = ot_error(OT_ERR_NOMEM, "out of memory");
  }
  if (rc == OT_OK) {
    transcript(e.data, e.len, core_buf, core_len, p.th);
    rc = derive_keys(eph_sk, h->ephemeral.data, p.th, 1, &p.s);
  }
  sodium_memzero(eph_sk, sizeof eph_sk);
  if (rc == OT_OK) {
    uint8_t m[48], sig[64], *body = NULL;
    size_t bl = 0;
    sig_msg("offtune/1 server", p.th, m);
    crypto_sign_detached(sig, NULL, m, sizeof m, cfg->id->sk);
    Offtune__ServerHello sh = OFFTUNE__SERVER_HELLO__INIT;
    sh.core = (ProtobufCBinaryData){core_len, core_buf};
    sh.signature = (ProtobufCBinaryData){64, sig};
    if (ot_pb_pack(&sh.base, &body, &bl) != 0) rc = ot_error(OT_ERR_NOMEM, "out of memory");
    if (rc == OT_OK) rc = ot_env_pack_plain(OT_MSG_SERVER_HELLO, p.s.id, body, bl, reply, reply_len);
    free(body);
  }
  free(core_buf);
  if (h) offtune__client_hello__free_unpacked(h, &ca.a);
  ot_env_clear(&e);
  if (rc == OT_OK) *pending = p;
  sodium_memzero(&p, sizeof p);
  return rc;
}

int ot_hs_server_on_finish(const ot_hs_server_config *cfg, ot_hs_pending *pending, const uint8_t *wire,
                           size_t len, ot_session *out, uint8_t **reply, size_t *reply_len, int *enrolled) {
  if (!cfg || !pending || !wire || !out || !reply || !reply_len)
    return ot_error(OT_ERR_INVALID, "ot_hs_server_on_finish: NULL argument");
  if (ot_unix_now() > pending->deadline)
    return ot_error(OT_ERR_RANGE, "handshake: timed out before ClientFinish");
  ot_env e = {0};
  int rc = ot_env_decode(wire, len, HS_MAX, &e);
  if (rc) return rc;
  uint8_t *body = NULL;
  size_t bl = 0;
  ot_session s = pending->s;
  if (e.h.type != OT_MSG_CLIENT_FINISH)
    rc = ot_error(OT_ERR_FORMAT, "handshake: expected ClientFinish, got type %u", e.h.type);
  if (rc == OT_OK) rc = ot_env_unseal(&s, &e, &body, &bl);
  if (rc == OT_OK) rc = ot_session_accept_seq(&s, e.h.lane, e.h.seq);
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 2 * HS_MAX);
  Offtune__ClientFinish *f = NULL;
  if (rc == OT_OK && !(f = offtune__client_finish__unpack(&ca.a, bl, body)))
    rc = ot_error(OT_ERR_FORMAT, "handshake: malformed ClientFinish");
  if (rc == OT_OK && (f->identity.len != 32 || f->signature.len != 64))
    rc = ot_error(OT_ERR_FORMAT, "handshake: ClientFinish has fields of the wrong size");
  char fp[OT_FINGERPRINT_LEN] = "";
  if (rc == OT_OK) {
    uint8_t th2[32], m[48];
    ot_fingerprint(f->identity.data, fp);
    client_th(pending->th, f->identity.data, th2);
    sig_msg("offtune/1 client", th2, m);
    if (crypto_sign_verify_detached(f->signature.data, m, sizeof m, f->identity.data) != 0)
      rc = ot_error(OT_ERR_FORMAT, "handshake: bad signature from device %s", fp);
  }
  int enr = 0;
  if (rc == OT_OK) {
    if (!cfg->acl)
      rc = ot_error(OT_ERR_INVALID, "handshake: no access control configured");
    else
      rc = cfg->acl->admit(cfg->acl_self, f->identity.data, f->enrol_token, &enr);
  }
  if (rc == OT_OK) {
    memcpy(s.peer_pk, f->identity.data, 32);
    Offtune__ServerFinish sf = OFFTUNE__SERVER_FINISH__INIT;
    sf.device_fingerprint = fp;
    sf.enrolled = enr;
    uint8_t *b = NULL;
    size_t n = 0;
    if (ot_pb_pack(&sf.base, &b, &n) != 0) rc = ot_error(OT_ERR_NOMEM, "out of memory");
    if (rc == OT_OK) rc = ot_env_seal(&s, 0, OT_MSG_SERVER_FINISH, b, n, reply, reply_len);
    free(b);
  }
  if (f) {
    if (f->enrol_token) sodium_memzero(f->enrol_token, strlen(f->enrol_token));
    offtune__client_finish__free_unpacked(f, &ca.a);
  }
  if (body) sodium_memzero(body, bl);
  free(body);
  ot_env_clear(&e);
  if (rc == OT_OK) {
    *out = s;
    if (enrolled) *enrolled = enr;
  }
  ot_session_wipe(&s);
  return rc;
}
