/* Protocol benchmark, in one run on TCP loopback:
 *   - handshake latency (dial + 4-message handshake, and the handshake's CPU alone);
 *   - encrypted transfer of a SIZE MiB tensor (chunked, AEAD per chunk, digest, commit);
 *   - the same tensor downloaded (ot_client_fetch from a stamped in-memory source);
 *   - the same bytes over plain nng REQ/REP, same chunk size and window, no crypto.
 * The ratio plain/encrypted time is the encryption's cost.
 *   bench_protocol [--size-mib 256] [--chunk-kib 1024] [--window 4] [--workers 4]
 *                  [--handshakes 200] [--reps 3] */
#include <nng/nng.h>
#include <nng/protocol/reqrep0/rep.h>
#include <nng/protocol/reqrep0/req.h>
#include <nng/transport/tcp/tcp.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "ot_cli.h"
#include "ot_error.h"
#include "ot_handshake.h"
#include "ot_transport.h"

static int die(const char *what, int rc) {
  fprintf(stderr, "bench_protocol: %s: %s: %s\n", what, ot_strerror(rc), ot_error_detail());
  exit(1);
}

static int on_open(void *user, const uint8_t peer[32], const char *name, uint64_t size, ot_sink *sink) {
  (void)user;
  (void)peer;
  (void)name;
  return ot_mem_sink_open(size, sink);
}

static void on_end(void *user, const uint8_t peer[32], const char *name, int committed, ot_sink *sink) {
  (void)peer;
  (void)name;
  if (!committed) fprintf(stderr, "bench_protocol: transfer not committed\n");
  uint64_t n;
  free(ot_mem_sink_take(sink, &n));
  ot_mem_sink_free(sink);
  atomic_fetch_add((_Atomic int *)user, committed);
}

/* Downloads serve the benchmark tensor from memory (stamped: its digest is computed
 * once, as the daemon's cache does for an emulator served to many devices). */
static const uint8_t *g_src;
static uint64_t g_size;
static int mem_src_read(void *self, uint64_t off, size_t len, uint8_t *buf, const uint8_t **data) {
  (void)self;
  (void)len;
  (void)buf;
  *data = g_src + off;
  return OT_OK;
}
static int on_fetch_open(void *user, const uint8_t peer[32], const char *name, ot_source *src,
                         uint64_t *size) {
  (void)user;
  (void)peer;
  (void)name;
  *src = (ot_source){.read_at = mem_src_read, .self = NULL, .stamp = 1};
  *size = g_size;
  return OT_OK;
}

/* ---- plain nng baseline: REP contexts served by threads, copy into a buffer ---- */
typedef struct {
  nng_socket sock;
  uint8_t *dst;
  size_t dst_len, chunk;
  _Atomic int stop;
} plain_srv;

static void *plain_worker(void *p) {
  plain_srv *s = p;
  nng_ctx ctx;
  nng_aio *aio;
  if (nng_ctx_open(&ctx, s->sock) || nng_aio_alloc(&aio, NULL, NULL)) return NULL;
  for (;;) {
    nng_ctx_recv(ctx, aio);
    nng_aio_wait(aio);
    if (nng_aio_result(aio)) break;
    nng_msg *m = nng_aio_get_msg(aio);
    /* 8-byte index header, then the chunk: copied where it belongs, like the sink */
    uint64_t idx = 0;
    if (nng_msg_len(m) >= 8) {
      memcpy(&idx, nng_msg_body(m), 8);
      size_t n = nng_msg_len(m) - 8;
      if (idx * s->chunk + n <= s->dst_len)
        memcpy(s->dst + idx * s->chunk, (uint8_t *)nng_msg_body(m) + 8, n);
    }
    nng_msg_clear(m);
    nng_msg_append(m, "ok", 2);
    nng_aio_set_msg(aio, m);
    nng_ctx_send(ctx, aio);
    nng_aio_wait(aio);
    if (nng_aio_result(aio)) {
      nng_msg_free(nng_aio_get_msg(aio));
      break;
    }
  }
  nng_aio_free(aio);
  nng_ctx_close(ctx);
  return NULL;
}

typedef struct {
  nng_socket sock;
  const uint8_t *src;
  size_t size, chunk, n;
  _Atomic size_t next;
} plain_cli;

static void *plain_sender(void *p) {
  plain_cli *c = p;
  nng_ctx ctx;
  nng_aio *aio;
  if (nng_ctx_open(&ctx, c->sock) || nng_aio_alloc(&aio, NULL, NULL)) return NULL;
  for (;;) {
    size_t i = atomic_fetch_add(&c->next, 1);
    if (i >= c->n) break;
    size_t off = i * c->chunk, len = c->size - off < c->chunk ? c->size - off : c->chunk;
    nng_msg *m;
    nng_msg_alloc(&m, 8 + len);
    uint64_t idx = i;
    memcpy(nng_msg_body(m), &idx, 8);
    memcpy((uint8_t *)nng_msg_body(m) + 8, c->src + off, len);
    nng_aio_set_msg(aio, m);
    nng_ctx_send(ctx, aio);
    nng_aio_wait(aio);
    if (nng_aio_result(aio)) {
      nng_msg_free(nng_aio_get_msg(aio));
      break;
    }
    nng_ctx_recv(ctx, aio);
    nng_aio_wait(aio);
    if (nng_aio_result(aio)) break;
    nng_msg_free(nng_aio_get_msg(aio));
  }
  nng_aio_free(aio);
  nng_ctx_close(ctx);
  return NULL;
}

static double plain_transfer(const uint8_t *src, size_t size, size_t chunk, int window, int workers) {
  plain_srv s = {0};
  s.dst = malloc(size);
  s.dst_len = size;
  s.chunk = chunk;
  if (!s.dst || nng_rep0_open(&s.sock)) die("plain server", OT_ERR_IO);
  nng_socket_set_size(s.sock, NNG_OPT_RECVMAXSZ, chunk + 64);
  nng_listener l;
  if (nng_listen(s.sock, "tcp://127.0.0.1:0", &l, 0)) die("plain listen", OT_ERR_IO);
  int port = 0;
  nng_listener_get_int(l, NNG_OPT_TCP_BOUND_PORT, &port);
  pthread_t sw[64];
  for (int i = 0; i < workers; i++) pthread_create(&sw[i], NULL, plain_worker, &s);
  plain_cli c = {0};
  c.src = src;
  c.size = size;
  c.chunk = chunk;
  c.n = (size + chunk - 1) / chunk;
  char url[64];
  snprintf(url, sizeof url, "tcp://127.0.0.1:%d", port);
  if (nng_req0_open(&c.sock)) die("plain client", OT_ERR_IO);
  nng_socket_set_size(c.sock, NNG_OPT_RECVMAXSZ, 1024);
  nng_socket_set_ms(c.sock, NNG_OPT_REQ_RESENDTIME, NNG_DURATION_INFINITE);
  if (nng_dial(c.sock, url, NULL, 0)) die("plain dial", OT_ERR_IO);
  pthread_t cw[64];
  double t0 = ot_now();
  for (int i = 0; i < window; i++) pthread_create(&cw[i], NULL, plain_sender, &c);
  for (int i = 0; i < window; i++) pthread_join(cw[i], NULL);
  double dt = ot_now() - t0;
  if (memcmp(s.dst, src, size) != 0) fprintf(stderr, "bench_protocol: plain transfer corrupted\n");
  nng_close(c.sock);
  nng_close(s.sock);
  for (int i = 0; i < workers; i++) pthread_join(sw[i], NULL);
  free(s.dst);
  return dt;
}

/* CPU seconds used by the whole process (client and server are both in it): unlike
 * wall time, this does not depend on what else the machine is running. */
static double cpu_now(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec +
         ru.ru_stime.tv_usec * 1e-6;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  int size_mib = 256, chunk_kib = 1024, window = 4, workers = 4, handshakes = 200, reps = 3;
  ot_opt opts[] = {
      {"size-mib", OT_OPT_INT, &size_mib, "N", "tensor size in MiB (default 256)"},
      {"chunk-kib", OT_OPT_INT, &chunk_kib, "N", "chunk size in KiB (default 1024)"},
      {"window", OT_OPT_INT, &window, "N", "chunks in flight (default 4)"},
      {"workers", OT_OPT_INT, &workers, "N", "server worker threads (default 4)"},
      {"handshakes", OT_OPT_INT, &handshakes, "N", "handshakes to time (default 200)"},
      {"reps", OT_OPT_INT, &reps, "N", "transfers of each kind; the best is reported (default 3)"},
  };
  int n_opts = (int)(sizeof opts / sizeof opts[0]);
  int rc = ot_cli_parse(argc - 1, argv + 1, opts, n_opts);
  if (rc == 1) {
    ot_cli_usage(stdout, "bench_protocol [options]", "Handshake latency and transfer throughput.", opts,
                 n_opts);
    return 0;
  }
  if (rc) die("options", rc);
  if (window < 1 || window > OT_MAX_LANES || workers < 1 || workers > 64 || chunk_kib < 1 ||
      (uint32_t)chunk_kib * 1024u > OT_CHUNK_MAX || size_mib < 1 || reps < 1)
    die("options", ot_error(OT_ERR_INVALID, "out of range"));
  size_t size = (size_t)size_mib << 20, chunk = (size_t)chunk_kib << 10;
  if (sodium_init() < 0) return 1;

  ot_identity srv_id, dev_id;
  ot_access *acl;
  if (ot_identity_generate(&srv_id) || ot_identity_generate(&dev_id) || ot_access_new(&acl) ||
      ot_access_allow(acl, dev_id.pk))
    die("setup", OT_ERR_INTERNAL);

  /* handshake CPU alone (no sockets) */
  int hs_cpu_n = 500;
  double t0 = ot_now();
  for (int i = 0; i < hs_cpu_n; i++) {
    ot_hs_client_config cc = {&dev_id, srv_id.pk, NULL, NULL, 0, 0};
    ot_hs_server_config sc = {&srv_id, &ot_access_memory_ops, acl, 8, 3600, OT_MSG_MAX_DEFAULT};
    ot_hs_client *c;
    ot_hs_pending p;
    ot_session cs, ss;
    uint8_t *m1, *r1, *m2, *r2;
    size_t l1, rl1, l2, rl2;
    if (ot_hs_client_new(&cc, &c) || ot_hs_client_hello(c, &m1, &l1) ||
        ot_hs_server_on_hello(&sc, m1, l1, &p, &r1, &rl1) ||
        ot_hs_client_on_server_hello(c, r1, rl1, &m2, &l2) ||
        ot_hs_server_on_finish(&sc, &p, m2, l2, &ss, &r2, &rl2, NULL) ||
        ot_hs_client_on_server_finish(c, r2, rl2, &cs))
      die("handshake", OT_ERR_INTERNAL);
    ot_hs_client_free(c);
    free(m1);
    free(r1);
    free(m2);
    free(r2);
  }
  double hs_cpu = (ot_now() - t0) / hs_cpu_n;

  _Atomic int committed = 0;
  ot_server_config sc = {0};
  sc.url = "tcp://127.0.0.1:0";
  sc.id = &srv_id;
  sc.acl = &ot_access_memory_ops;
  sc.acl_self = acl;
  sc.n_contexts = 64;
  sc.n_workers = workers;
  sc.lanes = OT_MAX_LANES;
  sc.max_msg = chunk + 4096;
  sc.max_transfer = (uint64_t)size;
  sc.on_transfer_open = on_open;
  sc.on_transfer_end = on_end;
  sc.on_fetch_open = on_fetch_open;
  sc.fetch_chunk = (uint32_t)chunk;
  sc.user = (void *)&committed;
  ot_server *server;
  if ((rc = ot_server_start(&sc, &server))) die("server", rc);
  char url[64];
  snprintf(url, sizeof url, "tcp://127.0.0.1:%d", ot_server_port(server));
  ot_client_config cc = {0};
  cc.url = url;
  cc.id = &dev_id;
  cc.cloud_pk = srv_id.pk;
  cc.timeout_ms = 30000;
  cc.max_msg = chunk + 4096;

  double *hs = malloc(sizeof(double) * (size_t)handshakes);
  for (int i = 0; i < handshakes; i++) {
    ot_client *c;
    double t = ot_now();
    if ((rc = ot_client_open(&cc, &c))) die("client", rc);
    hs[i] = ot_now() - t;
    ot_client_close(c);
  }
  qsort(hs, (size_t)handshakes, sizeof *hs, cmp_d);

  uint8_t *src = malloc(size);
  if (!src) die("memory", OT_ERR_NOMEM);
  randombytes_buf(src, size);
  g_src = src;
  g_size = size;
  /* encrypted with the negotiated cipher (AES-256-GCM where AES-NI is present), with
   * XChaCha20-Poly1305 forced, and plain: interleaved, best of reps each */
  double best_enc[2] = {1e30, 1e30}, best_plain = 1e30, cpu_enc[2] = {1e30, 1e30}, cpu_plain = 1e30;
  double best_dl[2] = {1e30, 1e30}, cpu_dl[2] = {1e30, 1e30};
  int aead[2] = {0, 0};
  for (int r = 0; r < reps; r++) {
    for (int k = 0; k < 2; k++) {
      ot_client *c;
      cc.no_aesgcm = k;
      if ((rc = ot_client_open(&cc, &c))) die("client", rc);
      aead[k] = (int)ot_client_session(c)->aead;
      ot_send_opts o = {.chunk = (uint32_t)chunk, .window = window};
      double t = ot_now(), u = cpu_now();
      if ((rc = ot_client_send(c, "bench.bin", src, size, &o))) die("encrypted transfer", rc);
      double dt = ot_now() - t, du = cpu_now() - u;
      if (dt < best_enc[k]) best_enc[k] = dt;
      if (du < cpu_enc[k]) cpu_enc[k] = du;
      /* the download direction, into memory */
      ot_sink sink;
      if ((rc = ot_mem_sink_open(size, &sink))) die("memory", rc);
      ot_fetch_opts fo = {.chunk = (uint32_t)chunk, .window = window};
      t = ot_now();
      u = cpu_now();
      if ((rc = ot_client_fetch(c, "bench.bin", sink, &fo))) die("download", rc);
      dt = ot_now() - t;
      du = cpu_now() - u;
      if (r > 0 || reps == 1) { /* the first one also computes the server's digest */
        if (dt < best_dl[k]) best_dl[k] = dt;
        if (du < cpu_dl[k]) cpu_dl[k] = du;
      }
      uint64_t got = 0;
      uint8_t *back = ot_mem_sink_take(&sink, &got);
      if (!back || got != size || memcmp(back, src, size) != 0) die("download", OT_ERR_FORMAT);
      free(back);
      ot_mem_sink_free(&sink);
      ot_client_close(c);
    }
    double u = cpu_now();
    double dt = plain_transfer(src, size, chunk, window, workers);
    double du = cpu_now() - u;
    if (dt < best_plain) best_plain = dt;
    if (du < cpu_plain) cpu_plain = du;
  }
  ot_server_stop(server);
  if (committed != 2 * reps)
    fprintf(stderr, "bench_protocol: %d of %d transfers committed\n", (int)committed, 2 * reps);

  double gb = (double)size / 1e9;
  printf("offtune protocol benchmark: tcp://127.0.0.1, %d MiB tensor, %d KiB chunks, window %d, %d server "
         "workers, best of %d\n",
         size_mib, chunk_kib, window, workers, reps);
  printf("%-40s %12s\n", "measure", "value");
  printf("%-40s %9.3f ms\n", "handshake CPU, both sides (no sockets)", hs_cpu * 1e3);
  printf("%-40s %9.3f ms\n", "dial + handshake, median", hs[handshakes / 2] * 1e3);
  printf("%-40s %9.3f ms\n", "dial + handshake, p99", hs[(handshakes * 99) / 100] * 1e3);
  const char *names[2] = {"XChaCha20-Poly1305", "AES-256-GCM"};
  for (int k = 0; k < 2; k++) {
    char label[64];
    snprintf(label, sizeof label, "encrypted, %s + BLAKE2b", names[aead[k]]);
    printf("%-40s %9.3f GB/s  (%.3f s, %.2f x plain)\n", label, gb / best_enc[k], best_enc[k],
           best_enc[k] / best_plain);
  }
  for (int k = 0; k < 2; k++) {
    char label[64];
    snprintf(label, sizeof label, "download, %s + BLAKE2b", names[aead[k]]);
    printf("%-40s %9.3f GB/s  (%.3f s, %.2f x plain)\n", label, gb / best_dl[k], best_dl[k],
           best_dl[k] / best_plain);
  }
  printf("%-40s %9.3f GB/s  (%.3f s)\n", "plain nng (no protobuf, no crypto)", gb / best_plain, best_plain);
  printf("%-40s %9.2f s/GB   (CPU, both ends)\n", "plain nng CPU", cpu_plain / gb);
  for (int k = 0; k < 2; k++) {
    char label[64];
    snprintf(label, sizeof label, "encrypted CPU, %s", names[aead[k]]);
    printf("%-40s %9.2f s/GB   (%.2f x plain; at 1.5x plain needs %.1f cores)\n", label, cpu_enc[k] / gb,
           cpu_enc[k] / cpu_plain, cpu_enc[k] / (1.5 * best_plain));
  }
  for (int k = 0; k < 2; k++) {
    char label[64];
    snprintf(label, sizeof label, "download CPU, %s", names[aead[k]]);
    printf("%-40s %9.2f s/GB   (%.2f x plain)\n", label, cpu_dl[k] / gb, cpu_dl[k] / cpu_plain);
  }
  free(hs);
  free(src);
  ot_access_free(acl);
  ot_identity_wipe(&srv_id);
  ot_identity_wipe(&dev_id);
  return 0;
}
