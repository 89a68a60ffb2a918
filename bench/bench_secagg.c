/* Secure aggregation benchmark: one round of ot_secagg_server / ot_secagg_client per
 * device count, messages passed in process (no network), against plain aggregation
 * (each device sends its float update, the cloud sums) in the same run.
 *   bench_secagg [--devices 10,100,1000] [--dim 1000000] [--drop 0.0] [--clip 1]
 * --drop F: that fraction of devices drops after dealing shares (before sending a masked
 * input), so the cloud pays for recovering their masks. Devices run one after the other;
 * mask expansion uses OpenMP threads over chunks of the vector (OMP_NUM_THREADS). Times are
 * process CPU seconds (all threads); per device = the mean over devices of its own calls. */
#include <math.h>
#include <omp.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_cli.h"
#include "ot_error.h"
#include "ot_identity.h"
#include "ot_secagg.h"
#include "ot_secagg_client.h"
#include "ot_secagg_server.h"

/* CPU seconds of the whole process (all threads): the VMs are shared, and CPU time is
 * far less sensitive than wall time to other jobs. */
static double cpu_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what) {
  fprintf(stderr, "bench_secagg: %s: %s\n", what, ot_error_detail());
  exit(1);
}
#define CHECK(x, what)                                                                                       \
  do {                                                                                                       \
    if ((x) != OT_OK) die(what);                                                                             \
  } while (0)

/* Device i's update, regenerated on demand: uniform in [-clip/2, clip/2]. */
static void make_update(uint32_t i, float *x, uint32_t dim, float clip, uint32_t *tmp) {
  uint8_t seed[32] = {0};
  memcpy(seed, &i, sizeof i);
  randombytes_buf_deterministic(tmp, (size_t)dim * 4, seed);
  for (uint32_t k = 0; k < dim; k++) x[k] = (float)((tmp[k] * (1.0 / 4294967296.0) - 0.5) * clip);
}

typedef struct {
  double dev_s[5], cloud_s[5];                  /* per stage 1..4 (index 0 unused) */
  double dev_up, dev_down, cloud_in, cloud_out; /* bytes */
  double plain_cloud_s, plain_bytes, max_err;
  uint32_t included, dropped;
} result;

static void run(uint32_t n, uint32_t dim, float clip, double drop, result *r) {
  memset(r, 0, sizeof *r);
  ot_identity *ids = malloc(sizeof(ot_identity) * n);
  uint8_t(*roster)[OT_PK_BYTES] = malloc((size_t)n * OT_PK_BYTES);
  ot_secagg_client **c = calloc(n, sizeof *c);
  float *x = malloc(sizeof(float) * dim), *sum = malloc(sizeof(float) * dim);
  double *plain = calloc(dim, sizeof(double));
  uint32_t *tmp = malloc(sizeof(uint32_t) * dim);
  char *live = calloc(n, 1);
  if (!ids || !roster || !c || !x || !sum || !plain || !tmp || !live) die("out of memory");
  for (uint32_t i = 0; i < n; i++) {
    CHECK(ot_identity_generate(&ids[i]), "keygen");
    memcpy(roster[i], ids[i].pk, OT_PK_BYTES);
    live[i] = 1;
  }
  ot_secagg_params p = {.dim = dim, .clip = clip, .stochastic = 1};
  ot_secagg_server *s;
  double t0 = cpu_now();
  CHECK(ot_secagg_server_new(&p, n, (const uint8_t(*)[OT_PK_BYTES])roster, 42, &s), "server");
  r->cloud_s[1] += cpu_now() - t0;
  t0 = cpu_now();
  for (uint32_t i = 0; i < n; i++)
    CHECK(ot_secagg_client_new(&ids[i], &p, 42, (const uint8_t(*)[OT_PK_BYTES])roster, n, &c[i]), "client");
  r->dev_s[1] += cpu_now() - t0;
  uint8_t *m, *in;
  size_t ml, il;
  char label[64];
  for (int stage = 1; stage <= 4; stage++) {
    ot_progress pr;
    snprintf(label, sizeof label, "%u devices, stage %d", n, stage);
    ot_progress_start(&pr, stderr, label, n);
    for (uint32_t i = 0; i < n; i++) {
      if (!live[i]) continue;
      if (stage > 1) {
        double tc = cpu_now();
        int rc = ot_secagg_server_outgoing(s, i, &in, &il);
        r->cloud_s[stage] += cpu_now() - tc;
        if (rc) die("no message for a live device");
        r->dev_down += (double)il;
        r->cloud_out += (double)il;
      }
      if (stage == 3) make_update(i, x, dim, clip, tmp); /* not timed */
      double td = cpu_now();
      int rc = OT_OK;
      switch (stage) {
      case 1: rc = ot_secagg_client_advertise(c[i], &m, &ml); break;
      case 2: rc = ot_secagg_client_on_keys(c[i], in, il, &m, &ml); break;
      case 3:
        rc = ot_secagg_client_on_shares(c[i], in, il);
        if (rc == OT_OK) rc = ot_secagg_client_mask_input(c[i], x, dim, &m, &ml);
        break;
      default: rc = ot_secagg_client_on_unmask(c[i], in, il, &m, &ml); break;
      }
      r->dev_s[stage] += cpu_now() - td;
      if (stage > 1) free(in);
      CHECK(rc, "device stage");
      if (stage == 3 && floor((i + 1) * drop) > floor(i * drop)) { /* evenly spread; drops before sending */
        free(m);
        live[i] = 0;
        r->dropped++;
        continue;
      }
      r->dev_up += (double)ml;
      r->cloud_in += (double)ml;
      double tc = cpu_now();
      rc = ot_secagg_server_receive(s, m, ml, NULL);
      r->cloud_s[stage] += cpu_now() - tc;
      free(m);
      CHECK(rc, "cloud receive");
      if ((i & 15) == 0) ot_progress_update(&pr, i + 1, NULL);
    }
    double tc = cpu_now();
    CHECK(ot_secagg_server_advance(s), "cloud advance");
    r->cloud_s[stage] += cpu_now() - tc;
    ot_progress_finish(&pr, NULL);
  }
  uint32_t count;
  CHECK(ot_secagg_server_result(s, sum, dim, &count), "result");
  r->included = count;
  /* plain aggregation of the same updates: the cloud sums float vectors */
  for (uint32_t i = 0; i < n; i++) {
    if (!live[i]) continue;
    make_update(i, x, dim, clip, tmp); /* not timed: the vector arrives */
    double tp = cpu_now();
    for (uint32_t k = 0; k < dim; k++) plain[k] += x[k];
    r->plain_cloud_s += cpu_now() - tp;
    r->plain_bytes += 4.0 * dim;
  }
  for (uint32_t k = 0; k < dim; k++) {
    double e = fabs(sum[k] - plain[k]);
    if (e > r->max_err) r->max_err = e;
  }
  for (uint32_t i = 0; i < n; i++) ot_secagg_client_free(c[i]), ot_identity_wipe(&ids[i]);
  ot_secagg_server_free(s);
  free(ids), free(roster), free(c), free(x), free(sum), free(plain), free(tmp), free(live);
}

int main(int argc, char **argv) {
  const char *devices = "10,100,1000";
  int dim = 1000000;
  float drop = 0, clip = 1;
  ot_opt opts[] = {
      {"devices", OT_OPT_STR, &devices, "N,N,..", "device counts (default 10,100,1000)"},
      {"dim", OT_OPT_INT, &dim, "D", "update length in floats (default 1000000)"},
      {"drop", OT_OPT_FLOAT, &drop, "F", "fraction dropping after dealing shares (default 0)"},
      {"clip", OT_OPT_FLOAT, &clip, "C", "quantisation range [-C, C] (default 1)"},
  };
  int n_opts = sizeof opts / sizeof opts[0];
  int rc = ot_cli_parse(argc - 1, argv + 1, opts, n_opts);
  if (rc == 1) {
    ot_cli_usage(stdout, "bench_secagg [options]", "Secure aggregation vs plain aggregation, one round.",
                 opts, n_opts);
    return 0;
  }
  if (rc || dim <= 0 || drop < 0 || drop >= 0.5 || !(clip > 0)) {
    fprintf(stderr, "bench_secagg: %s (see --help)\n", rc ? ot_error_detail() : "bad option value");
    return 2;
  }
  if (ot_sodium_init()) return 1;
  printf("secure aggregation, one round, %d values per update, %.0f%% dropping after sharing, %d OpenMP "
         "threads, CPU time\n",
         dim, drop * 100, omp_get_max_threads());
  printf("%7s | %9s %9s %9s %9s | %10s %10s | %9s %9s | %9s %9s | %9s %7s %7s | %8s\n", "devices", "dev s1",
         "dev s2", "dev s3", "dev s4", "dev up", "dev down", "cloud s", "plain s", "cloud in", "cloud out",
         "plain in", "t ratio", "B ratio", "max err");
  const char *p = devices;
  while (*p) {
    char *end;
    long n = strtol(p, &end, 10);
    if (end == p || n < 3 || n > OT_SA_MAX_DEVICES) {
      fprintf(stderr, "bench_secagg: bad --devices list '%s'\n", devices);
      return 2;
    }
    result r;
    run((uint32_t)n, (uint32_t)dim, clip, drop, &r);
    double cloud = r.cloud_s[1] + r.cloud_s[2] + r.cloud_s[3] + r.cloud_s[4];
    printf("%7ld | %8.2fms %8.2fms %8.2fms %8.2fms | %8.2fMB %8.3fMB | %8.3fs %8.3fs | %7.1fMB %7.2fMB | "
           "%7.1fMB "
           "%7.1fx %7.3fx | %8.1e\n",
           n, 1e3 * r.dev_s[1] / n, 1e3 * r.dev_s[2] / n, 1e3 * r.dev_s[3] / n, 1e3 * r.dev_s[4] / n,
           r.dev_up / n / 1e6, r.dev_down / n / 1e6, cloud, r.plain_cloud_s, r.cloud_in / 1e6,
           r.cloud_out / 1e6, r.plain_bytes / 1e6, cloud / r.plain_cloud_s, r.cloud_in / r.plain_bytes,
           r.max_err);
    printf("        cloud per stage: advertise %.3fs, shares %.3fs, masked inputs %.3fs, unmask %.3fs; %u in "
           "the "
           "sum, %u dropped\n",
           r.cloud_s[1], r.cloud_s[2], r.cloud_s[3], r.cloud_s[4], r.included, r.dropped);
    fflush(stdout);
    p = *end == ',' ? end + 1 : end;
  }
  return 0;
}
