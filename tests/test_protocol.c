/* Protocol pieces without sockets: identities, access control, the handshake state
 * machine, the envelope and chunked transfer state. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "offtune.pb-c.h"
#include "ot_access.h"
#include "ot_envelope.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_handshake.h"
#include "ot_identity.h"
#include "ot_test_util.h"
#include "ot_transfer.h"

static ot_identity g_srv, g_dev, g_other;

static int setup(void **state) {
  (void)state;
  if (ot_identity_generate(&g_srv) || ot_identity_generate(&g_dev) || ot_identity_generate(&g_other))
    return -1;
  return 0;
}

/* ---------------- identities ---------------- */

static void test_identity_files(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("proto_identity");
  assert_int_equal(ot_identity_save(&g_dev, dir, "device"), OT_OK);
  char path[512], pub[512];
  snprintf(path, sizeof path, "%s/device.key", dir);
  snprintf(pub, sizeof pub, "%s/device.pub", dir);
  struct stat sb;
  assert_int_equal(stat(path, &sb), 0);
  assert_int_equal(sb.st_mode & 0777, 0600);
  ot_identity back;
  assert_int_equal(ot_identity_load(path, &back), OT_OK);
  assert_memory_equal(back.pk, g_dev.pk, 32);
  assert_memory_equal(back.sk, g_dev.sk, 64);
  uint8_t pk[32];
  assert_int_equal(ot_pubkey_load(pub, pk), OT_OK);
  assert_memory_equal(pk, g_dev.pk, 32);
  /* never overwritten */
  assert_int_equal(ot_identity_save(&g_other, dir, "device"), OT_ERR_INVALID);
  assert_int_equal(ot_identity_load(path, &back), OT_OK);
  assert_memory_equal(back.pk, g_dev.pk, 32);
  /* readable by others: refused, output untouched */
  assert_int_equal(chmod(path, 0644), 0);
  memset(&back, 0xAB, sizeof back);
  assert_int_equal(ot_identity_load(path, &back), OT_ERR_INVALID);
  assert_non_null(strstr(ot_error_detail(), "chmod 600"));
  assert_int_equal(back.pk[0], 0xAB);
  assert_int_equal(chmod(path, 0640), 0);
  assert_int_equal(ot_identity_load(path, &back), OT_ERR_INVALID);
  assert_int_equal(chmod(path, 0600), 0);
  /* a corrupted key */
  assert_int_equal(ot_test_system("sed -i '2s/^./%c/' '%s'", 'x', path), 0);
  assert_int_not_equal(ot_identity_load(path, &back), OT_OK);
  assert_int_equal(ot_identity_load("/nonexistent/key", &back), OT_ERR_NOTFOUND);
  ot_identity_wipe(&back);
  free(dir);
}

static void test_fingerprint(void **state) {
  (void)state;
  char fp[OT_FINGERPRINT_LEN], fp2[OT_FINGERPRINT_LEN];
  ot_fingerprint(g_srv.pk, fp);
  assert_int_equal(strlen(fp), OT_FINGERPRINT_LEN - 1);
  assert_memory_equal(fp, "ot1:", 4);
  ot_fingerprint(g_dev.pk, fp2);
  assert_string_not_equal(fp, fp2);
  assert_true(ot_fingerprint_matches(g_srv.pk, fp));
  assert_false(ot_fingerprint_matches(g_dev.pk, fp));
  fp[10] = fp[10] == 'a' ? 'b' : 'a';
  assert_false(ot_fingerprint_matches(g_srv.pk, fp));
  assert_false(ot_fingerprint_matches(g_srv.pk, "ot1:"));
  char hex[65];
  uint8_t pk[32];
  ot_pubkey_hex(g_srv.pk, hex);
  assert_int_equal(ot_pubkey_parse(hex, pk), OT_OK);
  assert_memory_equal(pk, g_srv.pk, 32);
  hex[63] = 'z';
  assert_int_equal(ot_pubkey_parse(hex, pk), OT_ERR_FORMAT);
}

/* ---------------- access control ---------------- */

static void test_access(void **state) {
  (void)state;
  ot_access *a;
  assert_int_equal(ot_access_new(&a), OT_OK);
  int enrolled = -1;
  assert_int_equal(ot_access_admit(a, g_dev.pk, NULL, &enrolled), OT_ERR_NOTFOUND);
  char tok[OT_TOKEN_CHARS + 1];
  assert_int_equal(ot_access_issue_token(a, tok), OT_OK);
  assert_int_equal(strlen(tok), OT_TOKEN_CHARS);
  assert_int_equal(ot_access_admit(a, g_dev.pk, "ote1-wrong", &enrolled), OT_ERR_NOTFOUND);
  assert_int_equal(ot_access_admit(a, g_dev.pk, tok, &enrolled), OT_OK);
  assert_int_equal(enrolled, 1);
  assert_int_equal(ot_access_check(a, g_dev.pk), OT_OK);
  /* one-time */
  assert_int_equal(ot_access_admit(a, g_other.pk, tok, &enrolled), OT_ERR_NOTFOUND);
  assert_int_equal(ot_access_admit(a, g_dev.pk, NULL, &enrolled), OT_OK);
  assert_int_equal(enrolled, 0);
  /* revocation wins, also over a fresh token */
  assert_int_equal(ot_access_revoke(a, g_dev.pk), OT_OK);
  assert_int_equal(ot_access_check(a, g_dev.pk), OT_ERR_INVALID);
  assert_int_equal(ot_access_issue_token(a, tok), OT_OK);
  assert_int_equal(ot_access_admit(a, g_dev.pk, tok, &enrolled), OT_ERR_INVALID);
  /* file round trip */
  char *dir = ot_test_tmpdir("proto_access");
  char path[512];
  snprintf(path, sizeof path, "%s/access.txt", dir);
  assert_int_equal(ot_access_allow(a, g_other.pk), OT_OK);
  assert_int_equal(ot_access_save(a, path), OT_OK);
  ot_access *b;
  assert_int_equal(ot_access_new(&b), OT_OK);
  assert_int_equal(ot_access_load(b, path), OT_OK);
  assert_int_equal(ot_access_check(b, g_other.pk), OT_OK);
  assert_int_equal(ot_access_check(b, g_dev.pk), OT_ERR_INVALID);
  assert_int_equal(ot_access_admit(b, g_srv.pk, tok, &enrolled), OT_OK); /* the unused token survived */
  assert_int_equal(ot_file_write_atomic(path, "allow zz\n", 9), OT_OK);
  assert_int_equal(ot_access_load(b, path), OT_ERR_FORMAT);
  assert_int_equal(ot_access_check(b, g_other.pk), OT_OK); /* unchanged by the failed load */
  ot_access_free(a);
  ot_access_free(b);
  free(dir);
}

/* ---------------- handshake ---------------- */

typedef struct {
  const uint8_t *pin;
  const char *pin_fp;
  const char *token;
  uint32_t version;
  const ot_identity *dev;
  const ot_identity *srv;
  /* tamper hooks: flip bit `bit` of byte `at` in message `which` (1: ServerHello, 2: ClientFinish) */
  int which;
  size_t at;
  uint8_t mask;
  int truncate;
  int applied; /* out: the tamper hook found its byte */
  int no_aes;
} hs_opts;

/* Runs a whole handshake in memory. Returns the first failure; 1..4 in *stage says where. */
static int hs_run(ot_access *acl, hs_opts *o, ot_session *cs, ot_session *ss, int *stage) {
  ot_hs_client_config cc = {o->dev ? o->dev : &g_dev, o->pin, o->pin_fp, o->token, o->version, o->no_aes};
  ot_hs_server_config sc = {o->srv ? o->srv : &g_srv, &ot_access_memory_ops, acl, 4, 60, OT_MSG_MAX_DEFAULT};
  ot_hs_client *c = NULL;
  uint8_t *m1 = NULL, *r1 = NULL, *m2 = NULL, *r2 = NULL;
  size_t l1, rl1, l2, rl2;
  ot_hs_pending p;
  int rc = ot_hs_client_new(&cc, &c);
  *stage = 0;
  if (rc == OT_OK) rc = ot_hs_client_hello(c, &m1, &l1);
  if (rc == OT_OK) (*stage = 1), rc = ot_hs_server_on_hello(&sc, m1, l1, &p, &r1, &rl1);
  if (rc == OT_OK && o->which == 1) {
    o->applied = o->at < rl1;
    if (o->truncate)
      rl1 = o->at;
    else if (o->at < rl1)
      r1[o->at] ^= o->mask;
  }
  if (rc == OT_OK) (*stage = 2), rc = ot_hs_client_on_server_hello(c, r1, rl1, &m2, &l2);
  if (rc == OT_OK && o->which == 2) {
    o->applied = o->at < l2;
    if (o->truncate)
      l2 = o->at;
    else if (o->at < l2)
      m2[o->at] ^= o->mask;
  }
  int enrolled = 0;
  if (rc == OT_OK) (*stage = 3), rc = ot_hs_server_on_finish(&sc, &p, m2, l2, ss, &r2, &rl2, &enrolled);
  if (rc == OT_OK) (*stage = 4), rc = ot_hs_client_on_server_finish(c, r2, rl2, cs);
  ot_hs_client_free(c);
  free(m1);
  free(r1);
  free(m2);
  free(r2);
  return rc;
}

static ot_access *acl_with_dev(void) {
  ot_access *a;
  assert_int_equal(ot_access_new(&a), OT_OK);
  assert_int_equal(ot_access_allow(a, g_dev.pk), OT_OK);
  return a;
}

static void test_handshake_ok(void **state) {
  (void)state;
  ot_access *a = acl_with_dev();
  ot_session cs, ss;
  int stage;
  hs_opts o = {.pin = g_srv.pk};
  assert_int_equal(hs_run(a, &o, &cs, &ss, &stage), OT_OK);
  assert_int_equal(cs.id, ss.id);
  assert_memory_equal(cs.tx_key, ss.rx_key, 32);
  assert_memory_equal(cs.rx_key, ss.tx_key, 32);
  assert_memory_not_equal(cs.tx_key, cs.rx_key, 32);
  assert_memory_equal(ss.peer_pk, g_dev.pk, 32);
  assert_memory_equal(cs.peer_pk, g_srv.pk, 32);
  assert_int_equal(cs.lanes, 4);
  assert_int_equal(cs.aead, crypto_aead_aes256gcm_is_available() ? OT_AEAD_AESGCM : OT_AEAD_XCHACHA);
  assert_int_equal(ss.aead, cs.aead);
  hs_opts ox = {.pin = g_srv.pk, .no_aes = 1};
  ot_session csx, ssx;
  assert_int_equal(hs_run(a, &ox, &csx, &ssx, &stage), OT_OK);
  assert_int_equal(csx.aead, OT_AEAD_XCHACHA);
  assert_int_equal(ssx.aead, OT_AEAD_XCHACHA);
  /* a second handshake has fresh keys (forward secrecy: ephemeral per session) */
  ot_session cs2, ss2;
  assert_int_equal(hs_run(a, &o, &cs2, &ss2, &stage), OT_OK);
  assert_memory_not_equal(cs.tx_key, cs2.tx_key, 32);
  assert_int_not_equal(cs.id, cs2.id);
  /* pinning by fingerprint */
  char fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(g_srv.pk, fp);
  hs_opts of = {.pin_fp = fp};
  assert_int_equal(hs_run(a, &of, &cs, &ss, &stage), OT_OK);
  ot_access_free(a);
}

static void test_handshake_refusals(void **state) {
  (void)state;
  ot_access *a = acl_with_dev();
  ot_session cs, ss;
  int stage;
  /* wrong pinned key: the client refuses the server */
  hs_opts o1 = {.pin = g_other.pk};
  assert_int_equal(hs_run(a, &o1, &cs, &ss, &stage), OT_ERR_MISMATCH);
  assert_int_equal(stage, 2);
  assert_non_null(strstr(ot_error_detail(), "not the pinned one"));
  /* an impostor server (other identity) against the right pin */
  hs_opts o1b = {.pin = g_srv.pk, .srv = &g_other};
  assert_int_equal(hs_run(a, &o1b, &cs, &ss, &stage), OT_ERR_MISMATCH);
  /* unknown device */
  hs_opts o2 = {.pin = g_srv.pk, .dev = &g_other};
  assert_int_equal(hs_run(a, &o2, &cs, &ss, &stage), OT_ERR_NOTFOUND);
  assert_int_equal(stage, 3);
  assert_non_null(strstr(ot_error_detail(), "not enrolled"));
  /* enrolment token: once */
  char tok[OT_TOKEN_CHARS + 1];
  assert_int_equal(ot_access_issue_token(a, tok), OT_OK);
  hs_opts o3 = {.pin = g_srv.pk, .dev = &g_other, .token = tok};
  assert_int_equal(hs_run(a, &o3, &cs, &ss, &stage), OT_OK);
  assert_int_equal(hs_run(a, &o3, &cs, &ss, &stage), OT_OK); /* now allowlisted */
  ot_identity third;
  assert_int_equal(ot_identity_generate(&third), OT_OK);
  hs_opts o4 = {.pin = g_srv.pk, .dev = &third, .token = tok};
  assert_int_equal(hs_run(a, &o4, &cs, &ss, &stage), OT_ERR_NOTFOUND); /* token used up */
  /* revoked device */
  assert_int_equal(ot_access_revoke(a, g_dev.pk), OT_OK);
  hs_opts o5 = {.pin = g_srv.pk};
  assert_int_equal(hs_run(a, &o5, &cs, &ss, &stage), OT_ERR_INVALID);
  assert_non_null(strstr(ot_error_detail(), "revoked"));
  assert_int_equal(ot_access_allow(a, g_dev.pk), OT_OK);
  /* unknown version: a clear refusal naming both versions */
  hs_opts o6 = {.pin = g_srv.pk, .version = 2};
  assert_int_equal(hs_run(a, &o6, &cs, &ss, &stage), OT_ERR_MISMATCH);
  assert_int_equal(stage, 1);
  assert_non_null(strstr(ot_error_detail(), "unsupported protocol version 2"));
  ot_access_free(a);
}

/* Every bit flip in ServerHello and ClientFinish, every truncation: the handshake fails. */
static void test_handshake_tamper(void **state) {
  (void)state;
  ot_access *a = acl_with_dev();
  ot_session cs, ss;
  int stage;
  for (int which = 1; which <= 2; which++) {
    size_t len = 0;
    for (size_t at = 0; at < 400; at++) {
      for (int bit = 0; bit < 8; bit += 3) {
        hs_opts o = {.pin = g_srv.pk, .which = which, .at = at, .mask = (uint8_t)(1u << bit)};
        int rc = hs_run(a, &o, &cs, &ss, &stage);
        if (!o.applied) break; /* past the end of the message */
        if (rc == OT_OK) fail_msg("flip of bit %d at byte %zu of message %d was accepted", bit, at, which);
        len = at + 1;
      }
    }
    assert_true(len > 100);
    for (size_t at = 0; at < len; at++) {
      hs_opts o = {.pin = g_srv.pk, .which = which, .at = at, .truncate = 1};
      if (hs_run(a, &o, &cs, &ss, &stage) == OT_OK)
        fail_msg("truncation to %zu bytes of message %d accepted", at, which);
    }
  }
  ot_access_free(a);
}

/* ---------------- envelope ---------------- */

static int g_no_aes; /* the envelope tests run once per cipher */
static int g_one = 1;

static void session_pair(ot_session *c, ot_session *s) {
  ot_access *a = acl_with_dev();
  int stage;
  hs_opts o = {.pin = g_srv.pk, .no_aes = g_no_aes};
  assert_int_equal(hs_run(a, &o, c, s, &stage), OT_OK);
  ot_access_free(a);
}

static void test_envelope_roundtrip(void **state) {
  g_no_aes = *state != NULL;
  ot_session c, s;
  session_pair(&c, &s);
  const char *msg = "adapter update";
  for (uint32_t lane = 0; lane < c.lanes; lane++) {
    uint8_t *w, *b;
    size_t wl, bl;
    ot_env_header h;
    assert_int_equal(ot_env_seal(&c, lane, OT_MSG_APP, (const uint8_t *)msg, strlen(msg), &w, &wl), OT_OK);
    assert_int_equal(ot_env_open(&s, w, wl, 4096, &h, &b, &bl), OT_OK);
    assert_int_equal(h.lane, lane);
    assert_int_equal(h.type, OT_MSG_APP);
    assert_int_equal(bl, strlen(msg));
    assert_memory_equal(b, msg, bl);
    free(b);
    /* replay */
    assert_int_equal(ot_env_open(&s, w, wl, 4096, &h, &b, &bl), OT_ERR_INVALID);
    assert_non_null(strstr(ot_error_detail(), "replayed"));
    /* the other direction's key does not open it */
    assert_int_not_equal(ot_env_open(&c, w, wl, 4096, &h, &b, &bl), OT_OK);
    free(w);
  }
  /* reordering within a lane */
  uint8_t *w1, *w2, *b;
  size_t l1, l2, bl;
  assert_int_equal(ot_env_seal(&c, 1, OT_MSG_APP, (const uint8_t *)"a", 1, &w1, &l1), OT_OK);
  assert_int_equal(ot_env_seal(&c, 1, OT_MSG_APP, (const uint8_t *)"b", 1, &w2, &l2), OT_OK);
  assert_int_equal(ot_env_open(&s, w2, l2, 4096, NULL, &b, &bl), OT_OK);
  free(b);
  assert_int_equal(ot_env_open(&s, w1, l1, 4096, NULL, &b, &bl), OT_ERR_INVALID);
  free(w1);
  free(w2);
  /* empty body */
  assert_int_equal(ot_env_seal(&c, 0, OT_MSG_APP, NULL, 0, &w1, &l1), OT_OK);
  assert_int_equal(ot_env_open(&s, w1, l1, 4096, NULL, &b, &bl), OT_OK);
  assert_int_equal(bl, 0);
  free(b);
  free(w1);
}

static void test_envelope_tamper(void **state) {
  g_no_aes = *state != NULL; /* prestate: XChaCha20-Poly1305 even with AES-NI */
  ot_session c, s;
  session_pair(&c, &s);
  uint8_t body[200];
  randombytes_buf(body, sizeof body);
  uint8_t *w, *b;
  size_t wl, bl;
  assert_int_equal(ot_env_seal(&c, 2, OT_MSG_APP, body, sizeof body, &w, &wl), OT_OK);
  ot_session s0 = s;
  for (size_t at = 0; at < wl; at++)
    for (int bit = 0; bit < 8; bit++) {
      w[at] ^= (uint8_t)(1u << bit);
      ot_session t = s0;
      if (ot_env_open(&t, w, wl, 4096, NULL, &b, &bl) == OT_OK)
        fail_msg("bit %d of byte %zu flipped: accepted", bit, at);
      w[at] ^= (uint8_t)(1u << bit);
      assert_memory_equal(t.rx_seq, s0.rx_seq, sizeof t.rx_seq); /* nothing recorded */
    }
  for (size_t n = 0; n < wl; n++) {
    ot_session t = s0;
    if (ot_env_open(&t, w, n, 4096, NULL, &b, &bl) == OT_OK) fail_msg("truncated to %zu bytes: accepted", n);
  }
  /* oversized: refused before decoding */
  assert_int_equal(ot_env_open(&s, w, wl, wl - 1, NULL, &b, &bl), OT_ERR_RANGE);
  /* cross-session: another session's keys and id */
  ot_session c2, s2;
  session_pair(&c2, &s2);
  assert_int_equal(ot_env_open(&s2, w, wl, 4096, NULL, &b, &bl), OT_ERR_MISMATCH);
  s2.id = s.id; /* even with the id forged, the key differs */
  assert_int_equal(ot_env_open(&s2, w, wl, 4096, NULL, &b, &bl), OT_ERR_FORMAT);
  /* the original still opens */
  assert_int_equal(ot_env_open(&s, w, wl, 4096, NULL, &b, &bl), OT_OK);
  free(b);
  free(w);
  /* malformed protobuf and garbage */
  uint8_t junk[64];
  for (int i = 0; i < 200; i++) {
    randombytes_buf(junk, sizeof junk);
    ot_session t = s;
    assert_int_not_equal(ot_env_open(&t, junk, 1 + (size_t)i % 64, 4096, NULL, &b, &bl), OT_OK);
  }
}

/* The data path's own encoder and in-place parser agree byte for byte with protobuf-c,
 * sealing and opening in place equal the copying forms, and the in-place forms refuse
 * every bit flip. */
static void test_envelope_wire(void **state) {
  g_no_aes = *state != NULL;
  ot_session c, s;
  session_pair(&c, &s);
  uint8_t body[3000];
  randombytes_buf(body, sizeof body);
  uint64_t seqs[] = {1, 127, 128, 1ull << 40, UINT64_MAX - 1};
  for (int k = 0; k < 5; k++) {
    uint32_t lane = (uint32_t)k % c.lanes;
    uint8_t *w;
    size_t wl;
    assert_int_equal(ot_env_seal_seq(&c, lane, seqs[k], OT_MSG_CHUNK, body, sizeof body - (size_t)k, &w, &wl),
                     OT_OK);
    Offtune__Envelope *m = offtune__envelope__unpack(NULL, wl, w);
    assert_non_null(m);
    assert_int_equal(m->lane, lane);
    assert_true(m->seq == seqs[k] && m->session_id == c.id && m->type == OT_MSG_CHUNK && m->has_sealed);
    uint8_t *again = malloc(wl);
    assert_int_equal(protobuf_c_message_get_packed_size(&m->base), wl);
    protobuf_c_message_pack(&m->base, again);
    assert_memory_equal(again, w, wl);
    free(again);
    offtune__envelope__free_unpacked(m, NULL);
    /* sealed in place: the body already where the ciphertext goes */
    size_t bl = sizeof body - (size_t)k;
    assert_int_equal(ot_env_sealed_len(lane, OT_MSG_CHUNK, bl), wl);
    uint8_t *ip = malloc(wl);
    memcpy(ip + wl - bl - 16, body, bl);
    assert_int_equal(ot_env_seal_to(&c, lane, seqs[k], OT_MSG_CHUNK, ip + wl - bl - 16, bl, ip, wl), OT_OK);
    assert_memory_equal(ip, w, wl);
    /* opened in place; every bit flip refused */
    ot_env e;
    uint8_t *b;
    size_t blen;
    for (size_t at = 0; at < wl; at += 1 + at / 4)
      for (int bit = 0; bit < 8; bit += 3) {
        memcpy(ip, w, wl);
        ip[at] ^= (uint8_t)(1u << bit);
        if (ot_env_view(ip, wl, 1 << 20, &e) == OT_OK && ot_env_unseal_inplace(&s, &e, &b, &blen) == OT_OK &&
            ot_session_accept_seq(&s, e.h.lane, e.h.seq) == OT_OK && e.h.seq == seqs[k] && e.h.lane == lane)
          fail_msg("bit %d of byte %zu flipped: opened in place", bit, at);
      }
    memcpy(ip, w, wl);
    assert_int_equal(ot_env_view(ip, wl, 1 << 20, &e), OT_OK);
    assert_true(e.borrowed && e.data >= ip && e.data < ip + wl);
    assert_int_equal(ot_env_unseal_inplace(&s, &e, &b, &blen), OT_OK);
    assert_int_equal(blen, bl);
    assert_memory_equal(b, body, bl);
    ot_env_clear(&e); /* frees nothing: ip is ours */
    free(ip);
    free(w);
  }
  /* unknown fields are skipped, as protobuf-c does; a known field of the wrong wire
   * type, a missing required field and a truncated varint are refused */
  uint8_t *w;
  size_t wl;
  assert_int_equal(ot_env_seal(&c, 0, OT_MSG_APP, body, 10, &w, &wl), OT_OK);
  uint8_t *x = malloc(wl + 4);
  memcpy(x, w, wl);
  x[wl] = 0x78; /* field 15, varint */
  x[wl + 1] = 0x05;
  ot_env e;
  assert_int_equal(ot_env_view(x, wl + 2, 4096, &e), OT_OK);
  assert_int_equal(e.len, 10 + 16);
  x[wl + 1] = 0x85; /* unterminated varint */
  assert_int_equal(ot_env_view(x, wl + 2, 4096, &e), OT_ERR_FORMAT);
  x[0] = 0x09; /* version as fixed64 */
  assert_int_equal(ot_env_view(x, wl, 4096, &e), OT_ERR_FORMAT);
  assert_int_equal(ot_env_view(w + 2, wl - 2, 4096, &e), OT_ERR_FORMAT); /* no version */
  free(x);
  free(w);
  /* chunks: our packing equals protobuf-c's, for data and for the final marker */
  uint8_t id[16], dg[32];
  randombytes_buf(id, 16);
  randombytes_buf(dg, 32);
  uint64_t idx[] = {0, 300, 1ull << 33};
  for (int k = 0; k < 3; k++)
    for (int fin = 0; fin < 2; fin++) {
      Offtune__Chunk pc = OFFTUNE__CHUNK__INIT;
      pc.transfer_id = (ProtobufCBinaryData){16, id};
      pc.index = idx[k];
      pc.final = fin;
      if (fin) {
        pc.has_digest = 1;
        pc.digest = (ProtobufCBinaryData){32, dg};
      } else {
        pc.has_data = 1;
        pc.data = (ProtobufCBinaryData){200u * (unsigned)k, body};
      }
      size_t n = protobuf_c_message_get_packed_size(&pc.base);
      uint8_t *ref = malloc(n), *ours;
      size_t ol;
      protobuf_c_message_pack(&pc.base, ref);
      assert_int_equal(ot_chunk_pack(id, idx[k], fin, fin ? NULL : body, fin ? 0 : 200u * (size_t)k,
                                     fin ? dg : NULL, &ours, &ol),
                       OT_OK);
      assert_int_equal(ol, n);
      assert_memory_equal(ours, ref, n);
      ot_chunk ch;
      assert_int_equal(ot_chunk_decode(ours, ol, &ch), OT_OK);
      assert_true(ch.index == idx[k] && ch.final == fin &&
                  (fin ? ch.has_digest : ch.len == 200u * (size_t)k));
      if (!fin && ch.len) assert_true(ch.data >= ours && ch.data < ours + ol); /* in place */
      free(ref);
      free(ours);
    }
}

/* ---------------- transfer state ---------------- */

static void test_transfer_rx(void **state) {
  (void)state;
  const uint32_t chunk = 1000;
  const uint64_t total = 10 * 1000 + 123;
  uint8_t *data = malloc(total);
  randombytes_buf(data, total);
  uint8_t id[16] = {1, 2, 3}, digest[32];
  ot_transfer_digest_buf(data, total, chunk, digest);
  uint64_t n = ot_transfer_chunks(total, chunk);
  assert_int_equal(n, 11);
  /* out of order, with a duplicate */
  ot_sink sink;
  ot_rx *r;
  assert_int_equal(ot_mem_sink_open(total, &sink), OT_OK);
  assert_int_equal(ot_rx_new(id, total, chunk, 1 << 20, sink, &r), OT_OK);
  for (uint64_t k = 0; k < n; k++) {
    uint64_t i = (k * 7) % n;
    size_t len = (size_t)(total - i * chunk < chunk ? total - i * chunk : chunk);
    assert_int_equal(ot_rx_chunk(r, i, data + i * chunk, len), OT_OK);
    if (k == 3) assert_int_equal(ot_rx_chunk(r, i, data + i * chunk, len), OT_OK);
  }
  /* a short (truncated) chunk and an index out of range are refused */
  assert_int_equal(ot_rx_chunk(r, 0, data, chunk - 1), OT_ERR_FORMAT);
  assert_int_equal(ot_rx_chunk(r, n, data, 123), OT_ERR_RANGE);
  assert_int_equal(ot_rx_prefix(r), n);
  assert_int_equal(ot_rx_final(r, digest), OT_OK);
  uint64_t got_n;
  uint8_t *got = ot_mem_sink_take(&sink, &got_n);
  assert_non_null(got);
  assert_int_equal(got_n, total);
  assert_memory_equal(got, data, total);
  free(got);
  ot_rx_free(r);
  ot_mem_sink_free(&sink);

  /* missing chunk, then a wrong digest: nothing written (file sink) */
  char *dir = ot_test_tmpdir("proto_transfer");
  char path[512];
  snprintf(path, sizeof path, "%s/tensor.bin", dir);
  assert_int_equal(ot_file_sink_open(path, &sink), OT_OK);
  assert_int_equal(ot_rx_new(id, total, chunk, 1 << 20, sink, &r), OT_OK);
  for (uint64_t i = 0; i + 1 < n; i++) assert_int_equal(ot_rx_chunk(r, i, data + i * chunk, chunk), OT_OK);
  assert_int_equal(ot_rx_prefix(r), n - 1);
  assert_int_equal(ot_rx_final(r, digest), OT_ERR_FORMAT); /* truncated: the last chunk never came */
  assert_int_equal(ot_rx_chunk(r, n - 1, data + (n - 1) * chunk, 123), OT_OK);
  uint8_t bad[32];
  memcpy(bad, digest, 32);
  bad[5] ^= 1;
  assert_int_equal(ot_rx_final(r, bad), OT_ERR_FORMAT);
  assert_non_null(strstr(ot_error_detail(), "digest mismatch"));
  ot_rx_free(r);
  assert_false(ot_file_exists(path));
  assert_int_equal(ot_test_system("test -z \"$(ls -A '%s')\"", dir), 0); /* not even the partial file */
  /* a file sink that completes */
  assert_int_equal(ot_file_sink_open(path, &sink), OT_OK);
  assert_int_equal(ot_rx_new(id, total, chunk, 1 << 20, sink, &r), OT_OK);
  for (uint64_t i = 0; i < n; i++)
    assert_int_equal(ot_rx_chunk(r, i, data + i * chunk, (size_t)(i + 1 == n ? 123 : chunk)), OT_OK);
  assert_int_equal(ot_rx_final(r, digest), OT_OK);
  ot_rx_free(r);
  char *back = NULL;
  size_t bl = 0;
  assert_int_equal(ot_file_read_all(path, 1 << 20, &back, &bl), OT_OK);
  assert_int_equal(bl, total);
  assert_memory_equal(back, data, total);
  free(back);
  /* limits */
  assert_int_equal(ot_mem_sink_open(10, &sink), OT_OK);
  assert_int_equal(ot_rx_new(id, 1 << 21, chunk, 1 << 20, sink, &r), OT_ERR_RANGE);
  assert_int_equal(ot_rx_new(id, 10, OT_CHUNK_MAX + 1, 1 << 20, sink, &r), OT_ERR_RANGE);
  ot_mem_sink_free(&sink);
  free(dir);
  free(data);
}

static void test_transfer_bodies(void **state) {
  (void)state;
  uint8_t id[16] = {9}, digest[32] = {7};
  uint8_t *b;
  size_t bl;
  ot_chunk c;
  assert_int_equal(ot_chunk_pack(id, 5, 0, (const uint8_t *)"abc", 3, NULL, &b, &bl), OT_OK);
  assert_int_equal(ot_chunk_decode(b, bl, &c), OT_OK);
  assert_int_equal(c.index, 5);
  assert_int_equal(c.final, 0);
  assert_int_equal(c.len, 3);
  ot_chunk_release(&c);
  for (size_t n = 0; n < bl; n++) assert_int_not_equal(ot_chunk_decode(b, n, &c), OT_OK);
  free(b);
  /* final must carry a digest and no data */
  assert_int_equal(ot_chunk_pack(id, 5, 1, (const uint8_t *)"abc", 3, digest, &b, &bl), OT_OK);
  assert_int_equal(ot_chunk_decode(b, bl, &c), OT_ERR_FORMAT);
  free(b);
  assert_int_equal(ot_chunk_pack(id, 5, 1, NULL, 0, digest, &b, &bl), OT_OK);
  assert_int_equal(ot_chunk_decode(b, bl, &c), OT_OK);
  assert_true(c.final);
  assert_memory_equal(c.digest, digest, 32);
  ot_chunk_release(&c);
  free(b);
  ot_transfer_begin tb = {{1}, "../../etc/passwd", 10, 4};
  assert_int_equal(ot_begin_pack(&tb, &b, &bl), OT_OK);
  ot_transfer_begin back;
  assert_int_equal(ot_begin_decode(b, bl, &back), OT_ERR_FORMAT);
  free(b);
  snprintf(tb.name, sizeof tb.name, "adapter-1.safetensors");
  assert_int_equal(ot_begin_pack(&tb, &b, &bl), OT_OK);
  assert_int_equal(ot_begin_decode(b, bl, &back), OT_OK);
  assert_string_equal(back.name, "adapter-1.safetensors");
  free(b);
}

/* offtune-cloud keygen / offtune-device keygen, as a user runs them. */
static void test_keygen_commands(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("proto_keygen");
  const char *bin = ot_test_binary_dir();
  assert_int_equal(ot_test_system("'%s/cloud/offtune-cloud' keygen --out '%s/c' > '%s/c.txt'", bin, dir, dir),
                   0);
  assert_int_equal(
      ot_test_system("'%s/device/offtune-device' keygen --out '%s/d' > '%s/d.txt'", bin, dir, dir), 0);
  char p[600];
  snprintf(p, sizeof p, "%s/c/cloud.key", dir);
  struct stat sb;
  assert_int_equal(stat(p, &sb), 0);
  assert_int_equal(sb.st_mode & 0777, 0600);
  ot_identity id;
  assert_int_equal(ot_identity_load(p, &id), OT_OK);
  char fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(id.pk, fp);
  assert_int_equal(ot_test_system("grep -q 'fingerprint %s' '%s/c.txt'", fp, dir), 0);
  snprintf(p, sizeof p, "%s/d/device.key", dir);
  assert_int_equal(stat(p, &sb), 0);
  assert_int_equal(sb.st_mode & 0777, 0600);
  /* refuses to overwrite; usage errors exit 2 */
  assert_int_equal(ot_test_system("'%s/cloud/offtune-cloud' keygen --out '%s/c' 2>/dev/null", bin, dir), 1);
  assert_int_equal(ot_test_system("'%s/cloud/offtune-cloud' keygen 2>/dev/null", bin), 2);
  /* the operator's access file: allow, token, revoke */
  char acc[600], dpub[600], tok[200] = "";
  snprintf(acc, sizeof acc, "%s/access.txt", dir);
  snprintf(dpub, sizeof dpub, "%s/d/device.pub", dir);
  assert_int_equal(
      ot_test_system("'%s/cloud/offtune-cloud' access --file '%s' --allow '%s' >/dev/null", bin, acc, dpub),
      0);
  assert_int_equal(ot_test_system("'%s/cloud/offtune-cloud' access --file '%s' --issue-token > '%s/tok.txt'",
                                  bin, acc, dir),
                   0);
  uint8_t dpk[32];
  assert_int_equal(ot_pubkey_load(dpub, dpk), OT_OK);
  ot_access *a;
  assert_int_equal(ot_access_new(&a), OT_OK);
  assert_int_equal(ot_access_load(a, acc), OT_OK);
  assert_int_equal(ot_access_check(a, dpk), OT_OK);
  snprintf(p, sizeof p, "%s/tok.txt", dir);
  FILE *f = fopen(p, "r");
  assert_non_null(f);
  assert_non_null(fgets(tok, sizeof tok, f));
  fclose(f);
  tok[strcspn(tok, "\n")] = '\0';
  assert_int_equal(strlen(tok), OT_TOKEN_CHARS);
  int enrolled = 0;
  assert_int_equal(ot_access_admit(a, g_other.pk, tok, &enrolled), OT_OK);
  assert_int_equal(enrolled, 1);
  ot_access_free(a);
  assert_int_equal(
      ot_test_system("'%s/cloud/offtune-cloud' access --file '%s' --revoke '%s' >/dev/null", bin, acc, dpub),
      0);
  assert_int_equal(ot_access_new(&a), OT_OK);
  assert_int_equal(ot_access_load(a, acc), OT_OK);
  assert_int_equal(ot_access_check(a, dpk), OT_ERR_INVALID);
  ot_access_free(a);
  assert_int_equal(ot_test_system("'%s/cloud/offtune-cloud' access --file '%s' 2>/dev/null", bin, acc), 2);
  assert_int_equal(
      ot_test_system("'%s/cloud/offtune-cloud' access --file '%s' --allow zz 2>/dev/null", bin, acc), 1);
  ot_identity_wipe(&id);
  free(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_identity_files),
      cmocka_unit_test(test_fingerprint),
      cmocka_unit_test(test_access),
      cmocka_unit_test(test_handshake_ok),
      cmocka_unit_test(test_handshake_refusals),
      cmocka_unit_test(test_handshake_tamper),
      cmocka_unit_test(test_envelope_roundtrip),
      cmocka_unit_test(test_envelope_tamper),
      cmocka_unit_test_prestate(test_envelope_roundtrip, &g_one),
      cmocka_unit_test_prestate(test_envelope_tamper, &g_one),
      cmocka_unit_test(test_envelope_wire),
      cmocka_unit_test_prestate(test_envelope_wire, &g_one),
      cmocka_unit_test(test_transfer_rx),
      cmocka_unit_test(test_transfer_bodies),
      cmocka_unit_test(test_keygen_commands),
  };
  return cmocka_run_group_tests(tests, setup, NULL);
}
