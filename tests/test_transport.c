/* The protocol over real nng sockets on loopback: handshakes and their refusals,
 * hostile input, revocation, chunked transfers with resume, and a bounded load test
 * (64 concurrent clients, each a handshake and a 4 MiB transfer). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <poll.h>
#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include "ot_access.h"
#include "ot_cli.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_handshake.h"
#include "ot_test_util.h"
#include "ot_transport.h"
#include "tcp_relay.h"

#define TENSOR (4u << 20)

typedef struct {
  ot_identity srv, dev, other;
  ot_access *acl;
  ot_server *server;
  char url[256];
  pthread_mutex_t mu;
  int refusals_logged, committed, aborted, bad_data;
  char last_log[600];
  const char *file_dir; /* non-NULL: transfers go to files here */
  uint8_t *tensor;      /* what every sender sends */
  char fetch_file[512]; /* served as "file.bin" */
  int fetch_opened, fetch_closed;
  /* limits for the next server_start (0 = the server's defaults) */
  int max_sessions, max_open_per_peer, hello_burst, max_conns_per_addr;
  double hello_rate;
} fixture;

static fixture F;

static void on_log(void *user, const char *line) {
  fixture *f = user;
  pthread_mutex_lock(&f->mu);
  if (strstr(line, "refused")) f->refusals_logged++;
  snprintf(f->last_log, sizeof f->last_log, "%s", line);
  pthread_mutex_unlock(&f->mu);
}

static int on_request(void *user, const uint8_t peer[32], const uint8_t *body, size_t len, uint8_t **reply,
                      size_t *reply_len) {
  (void)user;
  (void)peer;
  uint8_t *r = malloc(len + 5);
  if (!r) return ot_error(OT_ERR_NOMEM, "oom");
  memcpy(r, "echo:", 5);
  memcpy(r + 5, body, len);
  *reply = r;
  *reply_len = len + 5;
  return OT_OK;
}

static int on_open(void *user, const uint8_t peer[32], const char *name, uint64_t size, ot_sink *sink) {
  fixture *f = user;
  (void)peer;
  if (f->file_dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", f->file_dir, name);
    return ot_file_sink_open(path, sink);
  }
  return ot_mem_sink_open(size, sink);
}

static void on_end(void *user, const uint8_t peer[32], const char *name, int committed, ot_sink *sink) {
  fixture *f = user;
  (void)peer;
  (void)name;
  int bad = 0;
  if (!f->file_dir) {
    uint64_t n = 0;
    uint8_t *b = ot_mem_sink_take(sink, &n);
    if (committed && (!b || n > TENSOR || memcmp(b, f->tensor, (size_t)n) != 0)) bad = 1;
    free(b);
    ot_mem_sink_free(sink);
  }
  pthread_mutex_lock(&f->mu);
  if (committed)
    f->committed++;
  else
    f->aborted++;
  f->bad_data += bad;
  pthread_mutex_unlock(&f->mu);
}

typedef struct {
  uint64_t calls, first_done, last_done, total;
} progress_rec;

/* progress callbacks: one at a time, strictly growing */
static void on_progress(void *arg, uint64_t done, uint64_t total) {
  progress_rec *p = arg;
  if (!p->calls++) p->first_done = done;
  if (done <= p->last_done)
    fail_msg("progress went from %llu to %llu", (unsigned long long)p->last_done, (unsigned long long)done);
  p->last_done = done;
  p->total = total;
}

/* ---- download sources ---- */

#define FETCH_SIZE ((3u << 20) + 12345) /* 13 chunks of 256 KiB */
#define FETCH_CHUNK (256u << 10)

/* tensor bytes; `tamper` flips a bit of chunk 2 from its second read on (the first is
 * the server's digest pass): a server whose data changed under it */
typedef struct {
  int tamper, reads2;
  pthread_mutex_t mu;
} mem_src;

static int mem_src_read(void *self, uint64_t off, size_t len, uint8_t *buf, const uint8_t **data) {
  mem_src *m = self;
  memcpy(buf, F.tensor + off, len);
  if (m->tamper && off == 2 * FETCH_CHUNK) {
    pthread_mutex_lock(&m->mu);
    int second = m->reads2++ > 0;
    pthread_mutex_unlock(&m->mu);
    if (second) buf[len / 2] ^= 0x10;
  }
  *data = buf;
  return OT_OK;
}

static int on_fetch_open(void *user, const uint8_t peer[32], const char *name, ot_source *src,
                         uint64_t *size) {
  fixture *f = user;
  (void)peer;
  int rc = OT_OK;
  if (strcmp(name, "file.bin") == 0) {
    rc = ot_file_source_open(f->fetch_file, src, size);
  } else if (strcmp(name, "blob.bin") == 0 || strcmp(name, "tampered.bin") == 0) {
    mem_src *m = calloc(1, sizeof *m);
    if (!m) return ot_error(OT_ERR_NOMEM, "oom");
    pthread_mutex_init(&m->mu, NULL);
    m->tamper = name[0] == 't';
    *src = (ot_source){.read_at = mem_src_read, .self = m, .stamp = m->tamper ? 0 : 42};
    *size = FETCH_SIZE;
  } else {
    return ot_error(OT_ERR_NOTFOUND, "no such package: %s", name);
  }
  if (rc == OT_OK) {
    pthread_mutex_lock(&f->mu);
    f->fetch_opened++;
    pthread_mutex_unlock(&f->mu);
  }
  return rc;
}

static void on_fetch_close(void *user, ot_source *src) {
  fixture *f = user;
  if (src->read_at == mem_src_read) {
    pthread_mutex_destroy(&((mem_src *)src->self)->mu);
    free(src->self);
  } else {
    ot_file_source_close(src);
  }
  pthread_mutex_lock(&f->mu);
  f->fetch_closed++;
  pthread_mutex_unlock(&f->mu);
}

static void server_start(fixture *f, const char *url, int ttl) {
  ot_server_config sc = {0};
  sc.url = url;
  sc.id = &f->srv;
  sc.acl = &ot_access_memory_ops;
  sc.acl_self = f->acl;
  sc.n_contexts = 32;
  sc.n_workers = 2;
  sc.ttl_seconds = (uint32_t)ttl;
  sc.max_msg = (1u << 20) + 4096;
  sc.on_request = on_request;
  sc.on_transfer_open = on_open;
  sc.on_transfer_end = on_end;
  sc.on_fetch_open = on_fetch_open;
  sc.on_fetch_close = on_fetch_close;
  sc.log = on_log;
  sc.user = f;
  sc.max_sessions = f->max_sessions;
  sc.max_open_per_peer = f->max_open_per_peer;
  sc.hello_rate = f->hello_rate;
  sc.hello_burst = f->hello_burst;
  sc.max_conns_per_addr = f->max_conns_per_addr;
  int rc = ot_server_start(&sc, &f->server);
  if (rc) fail_msg("server_start %s: %s", url, ot_error_detail());
  if (strncmp(url, "tcp", 3) == 0) {
    assert_true(ot_server_port(f->server) > 0);
    snprintf(f->url, sizeof f->url, "tcp://127.0.0.1:%d", ot_server_port(f->server));
  } else {
    snprintf(f->url, sizeof f->url, "%s", url);
  }
}

static int setup(void **state) {
  (void)state;
  memset(&F, 0, sizeof F);
  pthread_mutex_init(&F.mu, NULL);
  if (ot_identity_generate(&F.srv) || ot_identity_generate(&F.dev) || ot_identity_generate(&F.other))
    return -1;
  if (ot_access_new(&F.acl) || ot_access_allow(F.acl, F.dev.pk)) return -1;
  F.tensor = malloc(TENSOR);
  if (!F.tensor) return -1;
  randombytes_buf(F.tensor, TENSOR);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  ot_access_free(F.acl);
  free(F.tensor);
  return 0;
}

static ot_client_config client_cfg(const ot_identity *id, const uint8_t *pin) {
  ot_client_config cc = {0};
  cc.url = F.url;
  cc.id = id;
  cc.cloud_pk = pin;
  cc.timeout_ms = 5000;
  cc.retries = 2;
  cc.backoff_ms = 10;
  cc.max_msg = (1u << 20) + 4096;
  return cc;
}

static void check_echo(ot_client *c, const char *msg) {
  uint8_t *r;
  size_t rl;
  int rc = ot_client_call(c, (const uint8_t *)msg, strlen(msg), &r, &rl);
  if (rc) fail_msg("call '%s': %s: %s", msg, ot_strerror(rc), ot_error_detail());
  assert_int_equal(rl, strlen(msg) + 5);
  assert_memory_equal(r + 5, msg, strlen(msg));
  free(r);
}

static void test_handshake_over_tcp_and_ipc(void **state) {
  (void)state;
  char ipc[300], *sockdir = ot_test_tmpdir("proto_ipc");
  snprintf(ipc, sizeof ipc, "ipc://%s/s.sock", sockdir);
  free(sockdir);
  const char *urls[] = {"tcp://127.0.0.1:0", ipc, "inproc://ot-proto"};
  for (int u = 0; u < 3; u++) {
    server_start(&F, urls[u], 60);
    ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
    ot_client *c;
    assert_int_equal(ot_client_open(&cc, &c), OT_OK);
    check_echo(c, "hello");
    check_echo(c, "again");
    ot_client_close(c);
    /* pinning by fingerprint */
    char fp[OT_FINGERPRINT_LEN];
    ot_fingerprint(F.srv.pk, fp);
    cc.cloud_pk = NULL;
    cc.cloud_fingerprint = fp;
    assert_int_equal(ot_client_open(&cc, &c), OT_OK);
    check_echo(c, "fp");
    ot_client_close(c);
    ot_server_stop(F.server);
  }
}

static void test_handshake_refusals_over_network(void **state) {
  (void)state;
  server_start(&F, "tcp://127.0.0.1:0", 60);
  ot_client *c = NULL;
  /* wrong pinned key */
  ot_client_config cc = client_cfg(&F.dev, F.other.pk);
  assert_int_equal(ot_client_open(&cc, &c), OT_ERR_MISMATCH);
  assert_non_null(strstr(ot_error_detail(), "not the pinned one"));
  /* unknown device */
  cc = client_cfg(&F.other, F.srv.pk);
  assert_int_equal(ot_client_open(&cc, &c), OT_ERR_NOTFOUND);
  assert_non_null(strstr(ot_error_detail(), "not enrolled"));
  /* unknown version */
  cc = client_cfg(&F.dev, F.srv.pk);
  cc.version = 9;
  assert_int_equal(ot_client_open(&cc, &c), OT_ERR_MISMATCH);
  assert_non_null(strstr(ot_error_detail(), "unsupported protocol version 9"));
  /* enrolment token, used once */
  char tok[OT_TOKEN_CHARS + 1];
  assert_int_equal(ot_access_issue_token(F.acl, tok), OT_OK);
  ot_identity fresh;
  assert_int_equal(ot_identity_generate(&fresh), OT_OK);
  cc = client_cfg(&fresh, F.srv.pk);
  cc.enrol_token = tok;
  assert_int_equal(ot_client_open(&cc, &c), OT_OK);
  check_echo(c, "enrolled");
  ot_client_close(c);
  cc = client_cfg(&F.other, F.srv.pk);
  cc.enrol_token = tok;
  assert_int_equal(ot_client_open(&cc, &c), OT_ERR_NOTFOUND);
  /* revocation takes effect at once, in an open session */
  cc = client_cfg(&fresh, F.srv.pk);
  assert_int_equal(ot_client_open(&cc, &c), OT_OK);
  check_echo(c, "before");
  assert_int_equal(ot_access_revoke(F.acl, fresh.pk), OT_OK);
  uint8_t *r;
  size_t rl;
  assert_int_equal(ot_client_call(c, (const uint8_t *)"x", 1, &r, &rl), OT_ERR_INVALID);
  assert_non_null(strstr(ot_error_detail(), "revoked"));
  ot_client_close(c);
  assert_int_equal(ot_client_open(&cc, &c), OT_ERR_INVALID);
  pthread_mutex_lock(&F.mu);
  assert_true(F.refusals_logged >= 5);
  pthread_mutex_unlock(&F.mu);
  ot_server_stop(F.server);
}

/* Garbage, replays, cross-session messages and oversized frames: each is refused and
 * logged, and a session running beside them carries on. */
static void test_hostile_input(void **state) {
  (void)state;
  server_start(&F, "tcp://127.0.0.1:0", 60);
  ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
  ot_client *good, *evil, *other;
  assert_int_equal(ot_client_open(&cc, &good), OT_OK);
  assert_int_equal(ot_client_open(&cc, &evil), OT_OK);
  assert_int_equal(ot_client_open(&cc, &other), OT_OK);
  uint8_t *r;
  size_t rl;
  uint8_t junk[300];
  pthread_mutex_lock(&F.mu);
  int before = F.refusals_logged;
  pthread_mutex_unlock(&F.mu);
  for (int i = 0; i < 50; i++) {
    randombytes_buf(junk, sizeof junk);
    assert_int_equal(ot_client_raw(evil, 0, junk, 1 + (size_t)i * 5, &r, &rl),
                     OT_OK); /* a refusal comes back */
    uint8_t *b;
    size_t bl;
    ot_session tmp = *ot_client_session(evil);
    assert_int_not_equal(ot_env_open(&tmp, r, rl, 1 << 20, NULL, &b, &bl), OT_OK);
    free(r);
    if (i % 10 == 0) check_echo(good, "still here");
  }
  /* a replayed request: the last one is answered from the cache (a retransmission),
   * an older one is refused */
  ot_session *es = ot_client_session(evil);
  uint8_t *w1, *w2;
  size_t l1, l2;
  assert_int_equal(ot_env_seal(es, 1, OT_MSG_APP, (const uint8_t *)"one", 3, &w1, &l1), OT_OK);
  assert_int_equal(ot_client_raw(evil, 1, w1, l1, &r, &rl), OT_OK);
  uint8_t *b;
  size_t bl;
  assert_int_equal(ot_env_open(es, r, rl, 1 << 20, NULL, &b, &bl), OT_OK);
  free(b);
  free(r);
  assert_int_equal(ot_env_seal(es, 1, OT_MSG_APP, (const uint8_t *)"two", 3, &w2, &l2), OT_OK);
  assert_int_equal(ot_client_raw(evil, 1, w2, l2, &r, &rl), OT_OK);
  assert_int_equal(ot_env_open(es, r, rl, 1 << 20, NULL, &b, &bl), OT_OK);
  free(b);
  free(r);
  assert_int_equal(ot_client_raw(evil, 1, w1, l1, &r, &rl), OT_OK);
  assert_int_equal(ot_env_open(es, r, rl, 1 << 20, NULL, &b, &bl), OT_ERR_INVALID); /* sealed refusal */
  assert_non_null(strstr(ot_error_detail(), "replayed"));
  free(r);
  /* cross-session: evil's message sent on other's connection is still evil's session;
   * with other's session id forged into the header, it fails authentication */
  ot_session forged = *es;
  forged.id = ot_client_session(other)->id;
  uint8_t *w3;
  size_t l3;
  assert_int_equal(ot_env_seal(&forged, 2, OT_MSG_APP, (const uint8_t *)"x", 1, &w3, &l3), OT_OK);
  assert_int_equal(ot_client_raw(other, 2, w3, l3, &r, &rl), OT_OK);
  ot_session os = *ot_client_session(other);
  assert_int_not_equal(ot_env_open(&os, r, rl, 1 << 20, NULL, &b, &bl), OT_OK);
  free(r);
  free(w1);
  free(w2);
  free(w3);
  check_echo(other, "other fine");
  /* a frame over the limit: refused and logged */
  size_t over = (1u << 20) + 4096 + 1;
  uint8_t *ob = calloc(1, over);
  assert_int_equal(ot_client_raw(evil, 3, ob, over, &r, &rl), OT_OK);
  assert_int_equal(ot_env_open(es, r, rl, 1 << 20, NULL, &b, &bl), OT_ERR_RANGE);
  assert_non_null(strstr(ot_error_detail(), "exceeds the limit"));
  free(r);
  free(ob);
  /* a client does not send what the server announced it would refuse (no timeout) */
  ot_server_stats sb0, sb1;
  ot_server_get_stats(F.server, &sb0);
  ob = calloc(1, 3u << 20);
  double t_big = ot_now();
  assert_int_equal(ot_client_call(good, ob, 3u << 20, &r, &rl), OT_ERR_RANGE);
  assert_non_null(strstr(ot_error_detail(), "exceeds the server's limit of 1052672"));
  assert_true(ot_now() - t_big < 1.0);
  free(ob);
  ot_server_get_stats(F.server, &sb1);
  assert_int_equal(sb1.requests, sb0.requests);
  /* far over it (a raw frame): nng drops the pipe before allocating; the sender times
   * out, others carry on */
  ot_client_config small = cc;
  small.timeout_ms = 300;
  small.retries = -1;
  ot_client *big;
  assert_int_equal(ot_client_open(&small, &big), OT_OK);
  size_t huge = (3u << 20);
  uint8_t *hb = calloc(1, huge);
  assert_int_equal(ot_client_raw(big, 0, hb, huge, &r, &rl), OT_ERR_IO);
  free(hb);
  ot_client_close(big);
  check_echo(good, "after oversized");
  pthread_mutex_lock(&F.mu);
  assert_true(F.refusals_logged >= before + 53);
  pthread_mutex_unlock(&F.mu);
  ot_client_close(good);
  ot_client_close(evil);
  ot_client_close(other);
  ot_server_stop(F.server);
}

static void test_session_expiry_rekeys(void **state) {
  (void)state;
  server_start(&F, "tcp://127.0.0.1:0", 6); /* sessions live 6 s; the client rekeys 5 s early */
  ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
  ot_client *c;
  assert_int_equal(ot_client_open(&cc, &c), OT_OK);
  uint64_t id1 = ot_client_session(c)->id;
  sleep(2);
  check_echo(c, "after expiry");
  assert_int_not_equal(ot_client_session(c)->id, id1);
  ot_server_stats st;
  ot_server_get_stats(F.server, &st);
  assert_int_equal(st.handshakes, 2);
  ot_client_close(c);
  ot_server_stop(F.server);
}

static void test_transfer_resume_and_truncation(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("proto_transport");
  F.file_dir = dir;
  server_start(&F, "tcp://127.0.0.1:0", 60);
  ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
  ot_client *c;
  assert_int_equal(ot_client_open(&cc, &c), OT_OK);
  const uint64_t size = 3u * (256u << 10) + 777; /* 4 chunks of 256 KiB */
  /* the peer stops mid-transfer: nothing is written */
  ot_send_opts o = {.chunk = 256u << 10, .window = 1, .stop_after = 2};
  assert_int_equal(ot_client_send(c, "t.bin", F.tensor, size, &o), OT_ERR_IO);
  ot_client_close(c);
  char path[600];
  snprintf(path, sizeof path, "%s/t.bin", dir);
  assert_false(ot_file_exists(path));
  /* a new connection and session resume it from the receiver's prefix */
  assert_int_equal(ot_client_open(&cc, &c), OT_OK);
  uint8_t id[16];
  memcpy(id, o.id_out, 16);
  progress_rec pr = {0};
  ot_send_opts o2 = {
      .transfer_id = id, .chunk = 256u << 10, .window = 3, .progress = on_progress, .progress_arg = &pr};
  assert_int_equal(ot_client_send(c, "t.bin", F.tensor, size, &o2), OT_OK);
  assert_int_equal(o2.resumed_from, 2);
  assert_int_equal(o2.sent, 2);
  assert_int_equal(pr.calls, 2);
  assert_int_equal(pr.last_done, size);
  /* sent again (as after a lost reply): "committed", nothing resent */
  ot_send_opts o2b = {.transfer_id = id, .chunk = 256u << 10};
  assert_int_equal(ot_client_send(c, "t.bin", F.tensor, size, &o2b), OT_OK);
  assert_int_equal(o2b.resumed_from, 4);
  assert_int_equal(o2b.sent, 0);
  {
    uint8_t dg[32], *fb, *fr;
    size_t fbl, frl;
    uint32_t ft;
    ot_transfer_digest_buf(F.tensor, size, 256u << 10, dg);
    assert_int_equal(ot_chunk_pack(id, 4, 1, NULL, 0, dg, &fb, &fbl), OT_OK);
    assert_int_equal(ot_client_request(c, 2, OT_MSG_CHUNK, fb, fbl, &ft, &fr, &frl), OT_OK); /* final again */
    ot_transfer_status fst;
    assert_int_equal(ot_status_decode(fr, frl, &fst), OT_OK);
    assert_true(fst.committed);
    free(fr);
    free(fb);
    assert_int_equal(ot_chunk_pack(id, 0, 0, F.tensor, 256u << 10, NULL, &fb, &fbl), OT_OK);
    assert_int_equal(ot_client_request(c, 2, OT_MSG_CHUNK, fb, fbl, &ft, &fr, &frl), OT_ERR_INVALID);
    free(fb);
  }
  char *back;
  size_t bl;
  assert_int_equal(ot_file_read_all(path, 1 << 24, &back, &bl), OT_OK);
  assert_int_equal(bl, size);
  assert_memory_equal(back, F.tensor, size);
  free(back);
  /* another device cannot touch that transfer id */
  assert_int_equal(ot_access_allow(F.acl, F.other.pk), OT_OK);
  ot_client_config co = client_cfg(&F.other, F.srv.pk);
  ot_client *c2;
  assert_int_equal(ot_client_open(&co, &c2), OT_OK);
  uint8_t *cb, *r;
  size_t cbl, rl;
  uint32_t t;
  assert_int_equal(ot_chunk_pack(id, 0, 0, F.tensor, 256u << 10, NULL, &cb, &cbl), OT_OK);
  ot_server_stats st0, st1;
  ot_server_get_stats(F.server, &st0);
  assert_int_equal(ot_client_request(c2, 0, OT_MSG_CHUNK, cb, cbl, &t, &r, &rl), OT_ERR_NOTFOUND);
  ot_server_get_stats(F.server, &st1);
  assert_int_equal(st1.handshakes, st0.handshakes); /* a sealed refusal: no needless rekey */
  free(cb);
  ot_client_close(c2);
  /* a truncated final chunk, a final marker before the data, a wrong digest: refused,
   * the transfer is discarded, nothing written */
  snprintf(path, sizeof path, "%s/u.bin", dir);
  ot_send_opts o3 = {.chunk = 256u << 10, .window = 1, .stop_after = 3};
  assert_int_equal(ot_client_send(c, "u.bin", F.tensor, size, &o3), OT_ERR_IO);
  assert_int_equal(ot_chunk_pack(o3.id_out, 3, 0, F.tensor + 3 * (256u << 10), 700, NULL, &cb, &cbl), OT_OK);
  assert_int_equal(ot_client_request(c, 1, OT_MSG_CHUNK, cb, cbl, &t, &r, &rl), OT_ERR_FORMAT);
  assert_non_null(strstr(ot_error_detail(), "expected 777"));
  free(cb);
  uint8_t digest[32];
  ot_transfer_digest_buf(F.tensor, size, 256u << 10, digest);
  assert_int_equal(ot_chunk_pack(o3.id_out, 4, 1, NULL, 0, digest, &cb, &cbl), OT_OK);
  assert_int_equal(ot_client_request(c, 1, OT_MSG_CHUNK, cb, cbl, &t, &r, &rl), OT_ERR_FORMAT);
  assert_non_null(strstr(ot_error_detail(), "final marker before all chunks"));
  free(cb);
  assert_false(ot_file_exists(path));
  assert_int_equal(ot_test_system("test ! -e '%s.partial'", path), 0);
  /* the same with a wrong digest after all chunks */
  ot_send_opts o4 = {.chunk = 256u << 10, .window = 2, .stop_after = 4};
  /* stop_after = all chunks: everything sent, then the hook fails before the final marker */
  o4.stop_after = 4;
  int rc4 = ot_client_send(c, "v.bin", F.tensor, size, &o4);
  assert_int_equal(rc4, OT_ERR_IO);
  digest[0] ^= 1;
  assert_int_equal(ot_chunk_pack(o4.id_out, 4, 1, NULL, 0, digest, &cb, &cbl), OT_OK);
  assert_int_equal(ot_client_request(c, 0, OT_MSG_CHUNK, cb, cbl, &t, &r, &rl), OT_ERR_FORMAT);
  free(cb);
  assert_non_null(strstr(ot_error_detail(), "digest mismatch"));
  snprintf(path, sizeof path, "%s/v.bin", dir);
  assert_false(ot_file_exists(path));
  check_echo(c, "session still fine");
  /* from a file, read chunk by chunk */
  char src_path[600];
  snprintf(src_path, sizeof src_path, "%s/source.dat", dir);
  assert_int_equal(ot_file_write_atomic(src_path, F.tensor, size), OT_OK);
  ot_send_opts o5 = {.chunk = 256u << 10, .window = 3};
  assert_int_equal(ot_client_send_file(c, "w.bin", src_path, &o5), OT_OK);
  snprintf(path, sizeof path, "%s/w.bin", dir);
  assert_int_equal(ot_file_read_all(path, 1 << 24, &back, &bl), OT_OK);
  assert_int_equal(bl, size);
  assert_memory_equal(back, F.tensor, size);
  free(back);
  assert_int_equal(unlink(path), 0);
  assert_int_equal(unlink(src_path), 0);
  assert_int_equal(ot_client_send_file(c, "x.bin", "/nonexistent", &o5), OT_ERR_NOTFOUND);
  ot_client_close(c);
  ot_server_stop(F.server); /* drops unfinished transfers: their partial files go */
  assert_int_equal(ot_test_system("test -z \"$(ls '%s' | grep -v '^t.bin$')\"", dir), 0);
  F.file_dir = NULL;
  free(dir);
}

/* The server restarts at the same address: the client reconnects in the background,
 * its old session is unknown to the new server, it re-handshakes and carries on. */
/* A link that dies after the last data chunk, as the final marker is sent (issue 14: the
 * device freed the begin request's reply twice and aborted). The send fails cleanly, and a
 * new connection resumes and commits the same transfer. */
typedef struct {
  uint64_t chunk_msgs, big;
} cut_after;

static int cut_final_marker(void *arg, uint64_t len) {
  cut_after *c = arg;
  if (c->chunk_msgs == 4) return 1; /* every data chunk went through: this is the marker */
  if (len > c->big) c->chunk_msgs++;
  return 0;
}

static void test_link_cut_before_final_marker(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("proto_cut");
  F.file_dir = dir;
  server_start(&F, "tcp://127.0.0.1:0", 60);
  char direct[256];
  snprintf(direct, sizeof direct, "%s", F.url);
  cut_after ca = {0, 200u << 10};
  tcp_relay *relay = tcp_relay_start(ot_server_port(F.server), cut_final_marker, &ca);
  assert_non_null(relay);
  snprintf(F.url, sizeof F.url, "tcp://127.0.0.1:%d", tcp_relay_port(relay));
  ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
  cc.timeout_ms = 400;
  cc.retries = 1;
  ot_client *c;
  assert_int_equal(ot_client_open(&cc, &c), OT_OK);
  const uint64_t size = 4u * (256u << 10); /* 4 full chunks: 4 large messages, then the marker */
  ot_send_opts o = {.chunk = 256u << 10, .window = 1};
  int rc = ot_client_send(c, "cut.bin", F.tensor, size, &o);
  assert_int_not_equal(rc, OT_OK);
  assert_true(tcp_relay_was_cut(relay));
  assert_int_equal(ca.chunk_msgs, 4);
  ot_client_close(c);
  tcp_relay_stop(relay);
  char path[600];
  snprintf(path, sizeof path, "%s/cut.bin", dir);
  assert_false(ot_file_exists(path));
  /* directly this time: every chunk is already there, only the marker is sent */
  snprintf(F.url, sizeof F.url, "%s", direct);
  cc = client_cfg(&F.dev, F.srv.pk);
  assert_int_equal(ot_client_open(&cc, &c), OT_OK);
  uint8_t id[16];
  memcpy(id, o.id_out, 16);
  ot_send_opts o2 = {.transfer_id = id, .chunk = 256u << 10};
  assert_int_equal(ot_client_send(c, "cut.bin", F.tensor, size, &o2), OT_OK);
  assert_int_equal(o2.resumed_from, 4);
  assert_int_equal(o2.sent, 0);
  ot_client_close(c);
  char *back = NULL;
  size_t bl = 0;
  assert_int_equal(ot_file_read_all(path, 1 << 24, &back, &bl), OT_OK);
  assert_int_equal(bl, size);
  assert_memory_equal(back, F.tensor, size);
  free(back);
  ot_server_stop(F.server);
  F.file_dir = NULL;
  free(dir);
}

/* ---- resource limits (issue 14) ---- */

/* A ClientHello of a fresh handshake, as an attacker replays it (never finished). */
static void client_hello(uint8_t **m, size_t *l) {
  ot_hs_client_config hc = {.id = &F.other, .pinned_pk = F.srv.pk};
  ot_hs_client *h = NULL;
  assert_int_equal(ot_hs_client_new(&hc, &h), OT_OK);
  assert_int_equal(ot_hs_client_hello(h, m, l), OT_OK);
  ot_hs_client_free(h);
}

typedef struct {
  ot_client *via; /* the connection the hellos go over */
  const uint8_t *hello;
  size_t len;
  int n, answered, stop;
} flood;

static void *flood_main(void *arg) {
  flood *fl = arg;
  for (int i = 0; i < fl->n && !__atomic_load_n(&fl->stop, __ATOMIC_RELAXED); i++) {
    uint8_t *r = NULL;
    size_t rl = 0;
    if (ot_client_raw(fl->via, 0, fl->hello, fl->len, &r, &rl) == OT_OK) fl->answered++;
    free(r);
  }
  return NULL;
}

/* A flood of unfinished handshakes (ClientHello only) cannot lock honest devices out: the
 * oldest pending handshakes make room. Before the limit, 64 sessions' worth of hellos
 * refused every device for as long as the flood went on. */
static void test_handshake_flood(void **state) {
  (void)state;
  F.max_sessions = 64; /* max_pending = 16 */
  F.hello_rate = -1;   /* no per-address limit here: the table alone must hold */
  server_start(&F, "tcp://127.0.0.1:0", 60);
  ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
  ot_client *via = NULL;
  assert_int_equal(ot_client_open(&cc, &via), OT_OK);
  flood fl = {.via = via, .n = 3000};
  uint8_t *hello = NULL;
  client_hello(&hello, &fl.len);
  fl.hello = hello;
  /* first as many unfinished handshakes as the whole table holds, then more while honest
   * devices connect */
  fl.n = 200;
  flood_main(&fl);
  fl.n = 3000;
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, flood_main, &fl), 0);
  int opened = 0;
  for (int i = 0; i < 10; i++) {
    ot_client *c = NULL;
    int rc = ot_client_open(&cc, &c);
    if (rc) printf("honest open %d: %s\n", i, ot_error_detail());
    if (rc == OT_OK) {
      opened++;
      check_echo(c, "honest");
      ot_client_close(c);
    }
  }
  __atomic_store_n(&fl.stop, 1, __ATOMIC_RELAXED);
  pthread_join(th, NULL);
  ot_server_stats st;
  ot_server_get_stats(F.server, &st);
  printf("flood: %d hellos answered, %llu pending handshakes evicted, %d/10 honest sessions\n", fl.answered,
         (unsigned long long)st.handshakes_evicted, opened);
  assert_int_equal(opened, 10);
  assert_true(st.handshakes_evicted > 0);
  free(hello);
  ot_client_close(via);
  ot_server_stop(F.server);
  F.max_sessions = 0;
  F.hello_rate = 0;
}

/* ClientHellos over the per-address rate are refused before any cryptography; the address
 * gets its tokens back with time. */
static void test_hello_rate_limit(void **state) {
  (void)state;
  F.hello_rate = 4;
  F.hello_burst = 6;
  server_start(&F, "tcp://127.0.0.1:0", 60);
  ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
  ot_client *via = NULL;
  assert_int_equal(ot_client_open(&cc, &via), OT_OK); /* 1 token */
  uint8_t *hello = NULL;
  size_t hl = 0;
  client_hello(&hello, &hl);
  int refused = 0;
  for (int i = 0; i < 30; i++) {
    uint8_t *r = NULL;
    size_t rl = 0;
    assert_int_equal(ot_client_raw(via, 0, hello, hl, &r, &rl), OT_OK);
    ot_env e = {0};
    if (ot_env_view(r, rl, 1 << 20, &e) == OT_OK && !e.sealed && e.h.type == OT_MSG_REFUSAL) refused++;
    ot_env_clear(&e);
    free(r);
  }
  ot_server_stats st;
  ot_server_get_stats(F.server, &st);
  printf("rate: %d of 30 hellos refused, %llu counted\n", refused, (unsigned long long)st.hellos_limited);
  assert_true(refused >= 20);
  assert_true(st.hellos_limited >= 20);
  /* the session already open is untouched, and the address may handshake again later */
  check_echo(via, "still open");
  usleep(600 * 1000);
  ot_client *c = NULL;
  assert_int_equal(ot_client_open(&cc, &c), OT_OK);
  check_echo(c, "later");
  ot_client_close(c);
  ot_client_close(via);
  free(hello);
  ot_server_stop(F.server);
  F.hello_rate = 0;
  F.hello_burst = 0;
}

/* One device cannot hold more than max_open_per_peer uploads and downloads; another
 * device is not affected, and finishing one frees its slot. */
static void test_open_per_peer_limit(void **state) {
  (void)state;
  F.max_open_per_peer = 3;
  server_start(&F, "tcp://127.0.0.1:0", 60);
  ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
  ot_client *c = NULL;
  assert_int_equal(ot_client_open(&cc, &c), OT_OK);
  const uint64_t size = 2u * (256u << 10);
  uint8_t ids[3][16];
  for (int i = 0; i < 3; i++) { /* left unfinished on the server */
    ot_send_opts o = {.chunk = 256u << 10, .window = 1, .stop_after = 1};
    assert_int_equal(ot_client_send(c, "open.bin", F.tensor, size, &o), OT_ERR_IO);
    memcpy(ids[i], o.id_out, 16);
  }
  ot_send_opts o4 = {.chunk = 256u << 10, .window = 1};
  assert_int_equal(ot_client_send(c, "open.bin", F.tensor, size, &o4), OT_ERR_RANGE);
  assert_non_null(strstr(ot_error_detail(), "limit 3"));
  ot_sink sink;
  assert_int_equal(ot_mem_sink_open(FETCH_SIZE, &sink), OT_OK);
  ot_fetch_opts fo = {.chunk = FETCH_CHUNK};
  assert_int_equal(ot_client_fetch(c, "blob.bin", sink, &fo), OT_ERR_RANGE);
  ot_mem_sink_free(&sink);
  ot_server_stats st;
  ot_server_get_stats(F.server, &st);
  assert_int_equal(st.peer_limited, 2);
  /* finishing one frees a slot */
  ot_send_opts o1 = {.transfer_id = ids[0], .chunk = 256u << 10};
  assert_int_equal(ot_client_send(c, "open.bin", F.tensor, size, &o1), OT_OK);
  assert_int_equal(ot_client_send(c, "open2.bin", F.tensor, size, &o4), OT_OK);
  ot_client_close(c);
  ot_server_stop(F.server);
  F.max_open_per_peer = 0;
}

/* An SP connection from `src` (a loopback address) that sends its header and then idles. */
static int idle_sp_conn(const char *src, int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  struct sockaddr_in a = {.sin_family = AF_INET};
  inet_pton(AF_INET, src, &a.sin_addr);
  struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  inet_pton(AF_INET, "127.0.0.1", &d.sin_addr);
  static const uint8_t hdr[8] = {0, 'S', 'P', 0, 0, 0x30, 0, 0}; /* REQ0 */
  if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || connect(fd, (struct sockaddr *)&d, sizeof d) != 0 ||
      write(fd, hdr, sizeof hdr) != (ssize_t)sizeof hdr) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Idle connections from one address cannot use up the descriptors: with the process's
 * limit at 256, 150 held connections from 127.0.0.2 leave honest devices on 127.0.0.1
 * unaffected (without the cap the server held all of them, ran out of descriptors and
 * honest devices timed out). */
static struct rlimit saved_nofile;

static int restore_nofile(void **state) { /* also after a failure: later tests need descriptors */
  (void)state;
  F.max_conns_per_addr = 0;
  return setrlimit(RLIMIT_NOFILE, &saved_nofile);
}

static void test_connection_caps(void **state) {
  (void)state;
  struct rlimit low;
  assert_int_equal(getrlimit(RLIMIT_NOFILE, &saved_nofile), 0);
  low = saved_nofile;
  low.rlim_cur = 256;
  assert_int_equal(setrlimit(RLIMIT_NOFILE, &low), 0);
  F.max_conns_per_addr = 8;
  server_start(&F, "tcp://127.0.0.1:0", 60);
  enum { NA = 150 };
  int fds[NA], held = 0;
  int closed = 0;
  for (int i = 0; i < NA; i++) {
    fds[i] = idle_sp_conn("127.0.0.2", ot_server_port(F.server));
    if (fds[i] < 0) fail_msg("attacker connection %d: %s", i, strerror(errno));
    held++;
    /* one at a time: wait until the server has admitted (no news) or closed (EOF) it */
    struct pollfd pf = {fds[i], POLLIN, 0};
    char b[16];
    while (poll(&pf, 1, 150) == 1) { /* the server's SP header, then EOF if it closes */
      if (recv(fds[i], b, sizeof b, 0) <= 0) {
        closed++;
        break;
      }
    }
  }
  ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
  ot_client *c = NULL;
  for (int i = 0; i < 5; i++) { /* several honest devices, each its own connection */
    int rc = ot_client_open(&cc, &c);
    if (rc) fail_msg("honest device %d: %s", i, ot_error_detail());
    check_echo(c, "honest");
    ot_client_close(c);
  }
  ot_server_stats st;
  ot_server_get_stats(F.server, &st);
  printf("caps: %d attacker connections held by the attacker, %llu closed by the server (%d seen closed)\n",
         held, (unsigned long long)st.conns_refused, closed);
  assert_int_equal(st.conns_refused, NA - 8);
  assert_int_equal(closed, NA - 8);
  for (int i = 0; i < NA; i++)
    if (fds[i] >= 0) close(fds[i]);
  ot_server_stop(F.server);
}

static void test_reconnect_after_server_restart(void **state) {
  (void)state;
  char ipc[300], *sockdir = ot_test_tmpdir("proto_ipc2");
  snprintf(ipc, sizeof ipc, "ipc://%s/s.sock", sockdir);
  free(sockdir);
  server_start(&F, ipc, 60);
  ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
  cc.timeout_ms = 400;
  cc.retries = 3;
  ot_client *c;
  assert_int_equal(ot_client_open(&cc, &c), OT_OK);
  check_echo(c, "first server");
  uint64_t id1 = ot_client_session(c)->id;
  ot_server_stop(F.server);
  server_start(&F, ipc, 60);
  check_echo(c, "second server");
  assert_int_not_equal(ot_client_session(c)->id, id1);
  ot_server_stop(F.server);
  /* with the server gone, a call fails after its retries, with a clear error */
  uint8_t *r;
  size_t rl;
  assert_int_equal(ot_client_call(c, (const uint8_t *)"x", 1, &r, &rl), OT_ERR_IO);
  assert_non_null(strstr(ot_error_detail(), "Timed out"));
  ot_client_close(c);
}

static int file_equals_tensor(const char *path, size_t size) {
  char *back = NULL;
  size_t bl = 0;
  if (ot_file_read_all(path, 1 << 24, &back, &bl) != OT_OK) return 0;
  int eq = bl == size && memcmp(back, F.tensor, size) == 0;
  free(back);
  return eq;
}

static int exists_fmt(const char *fmt, const char *a) {
  char p[1024];
  snprintf(p, sizeof p, fmt, a);
  return ot_file_exists(p);
}

/* Downloads over tcp and ipc: into memory and into files, the digest cache, expected
 * digests, interruption and resume (only the missing chunks travel), refusals, and a
 * chunk that does not match the announced digest. */
static void test_fetch(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("proto_fetch");
  char ipc[600];
  snprintf(ipc, sizeof ipc, "ipc://%s/f.sock", dir);
  snprintf(F.fetch_file, sizeof F.fetch_file, "%s/source.bin", dir);
  assert_int_equal(ot_file_write_atomic(F.fetch_file, F.tensor, FETCH_SIZE), OT_OK);
  uint8_t want[32];
  ot_transfer_digest_buf(F.tensor, FETCH_SIZE, FETCH_CHUNK, want);
  const uint64_t n = (FETCH_SIZE + FETCH_CHUNK - 1) / FETCH_CHUNK;
  { /* what a manifest would publish: the file source's digest, computed here */
    ot_source fs;
    uint64_t fsz = 0;
    uint8_t d[32];
    assert_int_equal(ot_file_source_open(F.fetch_file, &fs, &fsz), OT_OK);
    assert_int_equal(fsz, FETCH_SIZE);
    assert_int_equal(ot_source_digest(&fs, fsz, FETCH_CHUNK, d), OT_OK);
    assert_memory_equal(d, want, 32);
    ot_file_source_close(&fs);
    assert_int_equal(ot_file_source_open("/nonexistent/x", &fs, &fsz), OT_ERR_NOTFOUND);
  }
  const char *urls[] = {"tcp://127.0.0.1:0", ipc};
  for (int u = 0; u < 2; u++) {
    F.fetch_opened = F.fetch_closed = 0;
    server_start(&F, urls[u], 60);
    ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
    ot_client *c;
    assert_int_equal(ot_client_open(&cc, &c), OT_OK);
    ot_server_stats st0, st1;

    /* into memory; the second fetch of the same stamped source reuses its digest */
    for (int k = 0; k < 2; k++) {
      ot_server_get_stats(F.server, &st0);
      ot_sink sink;
      assert_int_equal(ot_mem_sink_open(FETCH_SIZE, &sink), OT_OK);
      ot_fetch_opts o = {.chunk = FETCH_CHUNK, .window = 3};
      int rc = ot_client_fetch(c, "blob.bin", sink, &o);
      if (rc) fail_msg("fetch: %s", ot_error_detail());
      uint64_t got = 0;
      uint8_t *b = ot_mem_sink_take(&sink, &got);
      assert_non_null(b);
      assert_int_equal(got, FETCH_SIZE);
      assert_memory_equal(b, F.tensor, FETCH_SIZE);
      free(b);
      ot_mem_sink_free(&sink);
      assert_memory_equal(o.digest_out, want, 32);
      assert_int_equal(o.size_out, FETCH_SIZE);
      assert_int_equal(o.fetched, n);
      ot_server_get_stats(F.server, &st1);
      assert_int_equal(st1.fetch_chunks - st0.fetch_chunks, n);
      assert_int_equal(st1.digests_computed - st0.digests_computed, k == 0 ? 1 : 0);
    }

    /* the same with XChaCha20-Poly1305 (chunks are sealed and opened in place) */
    {
      ot_client_config cx = cc;
      cx.no_aesgcm = 1;
      ot_client *c3;
      assert_int_equal(ot_client_open(&cx, &c3), OT_OK);
      assert_int_equal(ot_client_session(c3)->aead, OT_AEAD_XCHACHA);
      ot_sink sink;
      assert_int_equal(ot_mem_sink_open(FETCH_SIZE, &sink), OT_OK);
      ot_fetch_opts o = {.chunk = FETCH_CHUNK, .window = 2};
      assert_int_equal(ot_client_fetch(c3, "blob.bin", sink, &o), OT_OK);
      uint8_t *b = ot_mem_sink_take(&sink, NULL);
      assert_non_null(b);
      assert_memory_equal(b, F.tensor, FETCH_SIZE);
      free(b);
      ot_mem_sink_free(&sink);
      ot_send_opts so = {.chunk = FETCH_CHUNK, .window = 2};
      int bad0 = F.bad_data, committed0 = F.committed;
      assert_int_equal(ot_client_send(c3, "up.bin", F.tensor, FETCH_SIZE, &so), OT_OK);
      assert_int_equal(F.committed, committed0 + 1);
      assert_int_equal(F.bad_data, bad0); /* the server's sink holds the right bytes */
      ot_client_close(c3);
    }

    /* into a file: atomically, nothing else left behind; again from the cache */
    char path[700];
    snprintf(path, sizeof path, "%s/out.bin", dir);
    for (int k = 0; k < 2; k++) {
      ot_server_get_stats(F.server, &st0);
      ot_fetch_opts o = {.chunk = FETCH_CHUNK, .window = 4, .expect_digest = want};
      int rc = ot_client_fetch_file(c, "file.bin", path, &o);
      if (rc) fail_msg("fetch_file: %s", ot_error_detail());
      assert_true(file_equals_tensor(path, FETCH_SIZE));
      assert_false(exists_fmt("%s.partial", path));
      assert_false(exists_fmt("%s.partial.state", path));
      ot_server_get_stats(F.server, &st1);
      assert_int_equal(st1.digests_computed - st0.digests_computed, k == 0 ? 1 : 0);
      assert_int_equal(unlink(path), 0);
    }

    /* an unexpected digest: refused before anything is written */
    uint8_t other[32];
    memcpy(other, want, 32);
    other[5] ^= 1;
    ot_fetch_opts oe = {.chunk = FETCH_CHUNK, .expect_digest = other};
    ot_server_get_stats(F.server, &st0);
    assert_int_equal(ot_client_fetch_file(c, "file.bin", path, &oe), OT_ERR_MISMATCH);
    assert_non_null(strstr(ot_error_detail(), "expected digest"));
    assert_false(ot_file_exists(path));
    assert_false(exists_fmt("%s.partial", path));
    ot_server_get_stats(F.server, &st1);
    assert_int_equal(st1.fetch_chunks, st0.fetch_chunks);
    ot_sink ms;
    assert_int_equal(ot_mem_sink_open(FETCH_SIZE, &ms), OT_OK);
    assert_int_equal(ot_client_fetch(c, "blob.bin", ms, &oe), OT_ERR_MISMATCH);
    assert_null(ot_mem_sink_take(&ms, NULL)); /* aborted */
    ot_mem_sink_free(&ms);

    /* interrupted after 5 chunks, then resumed from a new connection: only the rest
     * travels; a chunk damaged on disk meanwhile is fetched again */
    ot_fetch_opts oi = {.chunk = FETCH_CHUNK, .window = 2, .stop_after = 5};
    assert_int_equal(ot_client_fetch_file(c, "file.bin", path, &oi), OT_ERR_IO);
    assert_false(ot_file_exists(path));
    assert_true(exists_fmt("%s.partial", path));
    assert_true(exists_fmt("%s.partial.state", path));
    assert_int_equal(oi.fetched, 5);
    ot_client_close(c);
    assert_int_equal(ot_client_open(&cc, &c), OT_OK);
    progress_rec pr = {0};
    ot_fetch_opts orr = {.chunk = FETCH_CHUNK, .window = 3, .progress = on_progress, .progress_arg = &pr};
    ot_server_get_stats(F.server, &st0);
    assert_int_equal(ot_client_fetch_file(c, "file.bin", path, &orr), OT_OK);
    ot_server_get_stats(F.server, &st1);
    assert_int_equal(orr.resumed_from, 5);
    assert_int_equal(orr.fetched, n - 5);
    assert_int_equal(pr.calls, n - 5); /* one call per chunk, the last one at the total */
    assert_int_equal(pr.last_done, FETCH_SIZE);
    assert_int_equal(pr.total, FETCH_SIZE);
    assert_true(pr.first_done > 5 * FETCH_CHUNK); /* resumed bytes counted */
    assert_int_equal(st1.fetch_chunks - st0.fetch_chunks, n - 5);
    assert_true(file_equals_tensor(path, FETCH_SIZE));
    assert_false(exists_fmt("%s.partial.state", path));
    assert_int_equal(unlink(path), 0);
    oi.stop_after = 4;
    assert_int_equal(ot_client_fetch_file(c, "file.bin", path, &oi), OT_ERR_IO);
    assert_int_equal(ot_test_system("printf 'X' | dd of='%s.partial' bs=1 seek=%u conv=notrunc status=none",
                                    path, FETCH_CHUNK + 7),
                     0);
    memset(&orr, 0, sizeof orr);
    orr.chunk = FETCH_CHUNK;
    assert_int_equal(ot_client_fetch_file(c, "file.bin", path, &orr), OT_OK);
    assert_int_equal(orr.resumed_from, 3);
    assert_int_equal(orr.fetched, n - 3);
    assert_true(file_equals_tensor(path, FETCH_SIZE));
    assert_int_equal(unlink(path), 0);

    /* refusals carry the server's reason; a bad name never reaches the callback */
    ot_fetch_opts on = {0};
    assert_int_equal(ot_client_fetch_file(c, "missing.bin", path, &on), OT_ERR_NOTFOUND);
    assert_non_null(strstr(ot_error_detail(), "no such package: missing.bin"));
    assert_false(exists_fmt("%s.partial", path));
    assert_int_equal(ot_mem_sink_open(16, &ms), OT_OK);
    assert_int_equal(ot_client_fetch(c, "../etc/passwd", ms, &on), OT_ERR_FORMAT);
    assert_non_null(strstr(ot_error_detail(), "outside [A-Za-z0-9._-]"));
    ot_mem_sink_free(&ms);
    ot_fetch_opts os = {.chunk = FETCH_CHUNK, .max_size = 1u << 20};
    assert_int_equal(ot_client_fetch_file(c, "file.bin", path, &os), OT_ERR_RANGE);
    assert_false(exists_fmt("%s.partial", path));

    /* the server's bytes no longer match its digest: nothing committed, nothing kept */
    ot_fetch_opts ot = {.chunk = FETCH_CHUNK, .window = 3};
    assert_int_equal(ot_client_fetch_file(c, "tampered.bin", path, &ot), OT_ERR_FORMAT);
    assert_non_null(strstr(ot_error_detail(), "digest mismatch"));
    assert_false(ot_file_exists(path));
    assert_false(exists_fmt("%s.partial", path));
    assert_false(exists_fmt("%s.partial.state", path));

    /* a chunk changed on the wire fails authentication; another device cannot use
     * this device's fetch id; a chunk past the end is refused */
    ot_fetch_open_body fb = {.chunk = FETCH_CHUNK};
    snprintf(fb.name, sizeof fb.name, "blob.bin");
    uint8_t *body, *r, *b;
    size_t bl, rl, blen;
    uint32_t t;
    ot_fetch_info fi;
    assert_int_equal(ot_fetch_open_pack(&fb, &body, &bl), OT_OK);
    assert_int_equal(ot_client_request(c, 1, OT_MSG_FETCH_OPEN, body, bl, &t, &r, &rl), OT_OK);
    free(body);
    assert_int_equal(t, OT_MSG_FETCH_INFO);
    assert_int_equal(ot_fetch_info_decode(r, rl, &fi), OT_OK);
    free(r);
    ot_session *cs = ot_client_session(c);
    uint8_t *w;
    size_t wl;
    assert_int_equal(ot_fetch_chunk_pack(fi.id, 1, &body, &bl), OT_OK);
    assert_int_equal(ot_env_seal(cs, 2, OT_MSG_FETCH_CHUNK, body, bl, &w, &wl), OT_OK);
    free(body);
    assert_int_equal(ot_client_raw(c, 2, w, wl, &r, &rl), OT_OK);
    ot_session copy = *cs;
    r[rl - 20] ^= 0x01; /* inside the ciphertext */
    assert_int_equal(ot_env_open(&copy, r, rl, 2 << 20, NULL, &b, &blen), OT_ERR_FORMAT);
    assert_non_null(strstr(ot_error_detail(), "failed authentication"));
    r[rl - 20] ^= 0x01;
    assert_int_equal(ot_env_open(cs, r, rl, 2 << 20, NULL, &b, &blen), OT_OK); /* the untouched reply */
    ot_chunk ch;
    assert_int_equal(ot_chunk_decode(b, blen, &ch), OT_OK);
    assert_int_equal(ch.index, 1);
    assert_memory_equal(ch.data, F.tensor + FETCH_CHUNK, FETCH_CHUNK);
    ot_chunk_release(&ch);
    free(b);
    free(r);
    /* the same request again (a retransmission): answered again, not from a cache */
    assert_int_equal(ot_client_raw(c, 2, w, wl, &r, &rl), OT_OK);
    assert_int_equal(ot_env_open(cs, r, rl, 2 << 20, NULL, &b, &blen), OT_OK);
    free(b);
    free(r);
    free(w);
    assert_int_equal(ot_fetch_chunk_pack(fi.id, n + 1, &body, &bl), OT_OK);
    assert_int_equal(ot_client_request(c, 2, OT_MSG_FETCH_CHUNK, body, bl, &t, &r, &rl), OT_ERR_RANGE);
    assert_int_equal(ot_access_allow(F.acl, F.other.pk), OT_OK);
    ot_client_config co = client_cfg(&F.other, F.srv.pk);
    ot_client *c2;
    assert_int_equal(ot_client_open(&co, &c2), OT_OK);
    assert_int_equal(ot_client_request(c2, 0, OT_MSG_FETCH_CHUNK, body, bl, &t, &r, &rl), OT_ERR_NOTFOUND);
    free(body);
    ot_client_close(c2);
    check_echo(c, "session still fine");
    ot_client_close(c);
    ot_server_stop(F.server); /* closes the sources still open (interrupted fetches) */
    assert_int_equal(F.fetch_closed, F.fetch_opened);
    assert_true(F.fetch_opened >= 9);
  }
  unlink(F.fetch_file);
  assert_int_equal(ot_test_system("rm -rf '%s'", dir), 0);
  free(dir);
}

typedef struct {
  int idx, rc;
  char err[300];
  double hs_s;
} load_arg;

static void *load_client(void *p) {
  load_arg *a = p;
  ot_client_config cc = client_cfg(&F.dev, F.srv.pk);
  cc.timeout_ms = 20000;
  ot_client *c = NULL;
  double t0 = ot_now();
  a->rc = ot_client_open(&cc, &c);
  a->hs_s = ot_now() - t0;
  if (a->rc == OT_OK) {
    ot_send_opts o = {.chunk = 1u << 20, .window = 2};
    char name[32];
    snprintf(name, sizeof name, "load-%d", a->idx);
    a->rc = ot_client_send(c, name, F.tensor, TENSOR, &o);
  }
  if (a->rc) snprintf(a->err, sizeof a->err, "%s", ot_error_detail());
  ot_client_close(c);
  return NULL;
}

static void test_load_64_clients(void **state) {
  (void)state;
  F.committed = F.aborted = F.bad_data = 0;
  F.max_open_per_peer = 64; /* the 64 clients share one identity: one device, 64 uploads */
  server_start(&F, "tcp://127.0.0.1:0", 600);
  F.max_open_per_peer = 0;
  enum { N = 64 };
  pthread_t th[N];
  load_arg args[N];
  double t0 = ot_now();
  for (int i = 0; i < N; i++) {
    args[i] = (load_arg){.idx = i};
    assert_int_equal(pthread_create(&th[i], NULL, load_client, &args[i]), 0);
  }
  double worst_hs = 0;
  for (int i = 0; i < N; i++) {
    pthread_join(th[i], NULL);
    if (args[i].rc) fail_msg("client %d: %s: %s", i, ot_strerror(args[i].rc), args[i].err);
    if (args[i].hs_s > worst_hs) worst_hs = args[i].hs_s;
  }
  double dt = ot_now() - t0;
  ot_server_stats st;
  ot_server_get_stats(F.server, &st);
  ot_server_stop(F.server);
  print_message(
      "load: %d clients x 4 MiB in %.2f s (%.0f MiB/s), slowest handshake %.3f s, %llu retransmits\n", N, dt,
      N * 4.0 / dt, worst_hs, (unsigned long long)st.retransmits);
  assert_int_equal(F.committed, N);
  assert_int_equal(F.bad_data, 0);
  assert_int_equal(st.handshakes, N);
  assert_int_equal(st.transfers_committed, N);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_handshake_over_tcp_and_ipc),
      cmocka_unit_test(test_handshake_refusals_over_network),
      cmocka_unit_test(test_hostile_input),
      cmocka_unit_test(test_session_expiry_rekeys),
      cmocka_unit_test(test_reconnect_after_server_restart),
      cmocka_unit_test(test_transfer_resume_and_truncation),
      cmocka_unit_test(test_link_cut_before_final_marker),
      cmocka_unit_test(test_handshake_flood),
      cmocka_unit_test(test_hello_rate_limit),
      cmocka_unit_test(test_open_per_peer_limit),
      cmocka_unit_test_teardown(test_connection_caps, restore_nofile),
      cmocka_unit_test(test_fetch),
      cmocka_unit_test(test_load_64_clients),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
