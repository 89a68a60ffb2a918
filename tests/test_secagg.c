/* Secure aggregation: Shamir, masks, quantisation, the neighbour graph, and whole
 * rounds driven through an in-process simulator that passes the encoded messages
 * between ot_secagg_client and ot_secagg_server (dropouts at every stage, the
 * cloud's view, bad actors). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_dp.h"
#include "ot_error.h"
#include "ot_identity.h"
#include "ot_secagg.h"
#include "ot_secagg_client.h"
#include "ot_secagg_server.h"
#include "ot_test_util.h"
#include "secagg.pb-c.h"

/* ---------------- small deterministic PRNG for the test's choices ---------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {
  uint64_t x = rng_state;
  x ^= x << 13, x ^= x >> 7, x ^= x << 17;
  return rng_state = x;
}
static double rnd01(void) { return (rnd() >> 11) * (1.0 / 9007199254740992.0); }

/* Chi-square statistic of 256 bins over the given bytes; uniform data gives ~255
 * (sd ~22.6); the 1e-6 tail is about 375. */
static double chi2_bytes(const uint8_t *b, size_t n, size_t stride) {
  double h[256] = {0};
  size_t m = 0;
  for (size_t i = 0; i < n; i += stride) h[b[i]]++, m++;
  double e = (double)m / 256, c = 0;
  for (int k = 0; k < 256; k++) c += (h[k] - e) * (h[k] - e) / e;
  return c;
}
#define CHI2_MAX 375.0

/* ---------------- Shamir ---------------- */

static void test_shamir(void **state) {
  (void)state;
  uint8_t secret[32], back[32];
  randombytes_buf(secret, 32);
  secret[0] = 0xFF, secret[31] = 0xFF; /* top bits of the packing */
  uint32_t xs[9] = {3, 7, 1, 100, 55, 9, 12, 1000000, 42};
  uint8_t sh[9][OT_SA_SHARE_BYTES], pick[9][OT_SA_SHARE_BYTES];
  for (uint32_t t = 1; t <= 9; t++) {
    assert_int_equal(ot_shamir_split(secret, t, xs, 9, sh), OT_OK);
    for (int trial = 0; trial < 20; trial++) { /* any t of the 9, in any order */
      uint32_t perm[9];
      for (int i = 0; i < 9; i++) perm[i] = (uint32_t)i;
      for (int i = 8; i > 0; i--) {
        int j = (int)(rnd() % (uint64_t)(i + 1));
        uint32_t tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
      }
      for (uint32_t i = 0; i < t; i++) memcpy(pick[i], sh[perm[i]], OT_SA_SHARE_BYTES);
      memset(back, 0, 32);
      assert_int_equal(ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])pick, t, t, back), OT_OK);
      assert_memory_equal(back, secret, 32);
      if (t >= 2) { /* t-1 shares: too few, and interpolating them does not give the secret */
        assert_int_equal(ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])pick, t - 1, t, back),
                         OT_ERR_RANGE);
        int rc = ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])pick, t - 1, t - 1, back);
        assert_true(rc == OT_ERR_MISMATCH || memcmp(back, secret, 32) != 0);
      }
    }
  }
  /* a corrupted share makes the result inconsistent (detected) or wrong */
  assert_int_equal(ot_shamir_split(secret, 3, xs, 9, sh), OT_OK);
  sh[1][10] ^= 1;
  int rc = ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])sh, 3, 3, back);
  assert_true(rc == OT_ERR_MISMATCH || memcmp(back, secret, 32) != 0);
  /* hostile shares: repeated point, point 0, element out of the field */
  assert_int_equal(ot_shamir_split(secret, 3, xs, 9, sh), OT_OK);
  memcpy(pick[0], sh[0], OT_SA_SHARE_BYTES);
  memcpy(pick[1], sh[0], OT_SA_SHARE_BYTES);
  memcpy(pick[2], sh[2], OT_SA_SHARE_BYTES);
  assert_int_equal(ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])pick, 3, 3, back), OT_ERR_FORMAT);
  memcpy(pick[1], sh[1], OT_SA_SHARE_BYTES);
  memset(pick[1], 0, 4);
  assert_int_equal(ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])pick, 3, 3, back), OT_ERR_FORMAT);
  memcpy(pick[1], sh[1], OT_SA_SHARE_BYTES);
  memset(pick[1] + 4, 0xFF, 8);
  assert_int_equal(ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])pick, 3, 3, back), OT_ERR_FORMAT);
  uint32_t bad[3] = {1, 2, 1};
  assert_int_equal(ot_shamir_split(secret, 2, bad, 3, sh), OT_ERR_INVALID);
}

/* t-1 shares reveal nothing: with t = 3, the shares at two points are uniform over the
 * field whatever the secret. Top byte of element 0 (bits 53..60 of a 61-bit value; the
 * top value 2^61-1 is excluded, a 2^-53 effect) for an all-zero and an all-one secret. */
static void test_shamir_secrecy(void **state) {
  (void)state;
  enum { TRIALS = 20000 };
  uint8_t *top[2][2];
  for (int s = 0; s < 2; s++)
    for (int p = 0; p < 2; p++) top[s][p] = malloc(TRIALS);
  uint32_t xs[3] = {1, 2, 3};
  uint8_t sh[3][OT_SA_SHARE_BYTES], secret[32];
  for (int s = 0; s < 2; s++) {
    memset(secret, s ? 0xFF : 0x00, 32);
    for (int i = 0; i < TRIALS; i++) {
      assert_int_equal(ot_shamir_split(secret, 3, xs, 3, sh), OT_OK);
      for (int p = 0; p < 2; p++) {
        uint64_t v = ot_sa_get64(sh[p] + 4);
        top[s][p][i] = (uint8_t)(v >> 53);
      }
    }
  }
  for (int s = 0; s < 2; s++)
    for (int p = 0; p < 2; p++) {
      double c = chi2_bytes(top[s][p], TRIALS, 1);
      printf("shamir secrecy: secret %d, share %d: chi2 = %.1f (uniform ~255)\n", s, p, c);
      assert_true(c < CHI2_MAX);
      free(top[s][p]);
    }
  /* the check can fail: with t = 1 the share is the secret itself */
  uint8_t one[TRIALS / 10];
  memset(secret, 0, 32);
  for (int i = 0; i < TRIALS / 10; i++) {
    assert_int_equal(ot_shamir_split(secret, 1, xs, 1, sh), OT_OK);
    one[i] = (uint8_t)(ot_sa_get64(sh[0] + 4) >> 53);
  }
  assert_true(chi2_bytes(one, TRIALS / 10, 1) > 10 * CHI2_MAX);
}

/* ---------------- masks, agreement, quantisation, graph ---------------- */

static void test_masks_cancel(void **state) {
  (void)state;
  enum { N = 5, D = 4096 };
  uint8_t pk[N][32], sk[N][32];
  for (int i = 0; i < N; i++) crypto_box_keypair(pk[i], sk[i]);
  uint32_t acc[D] = {0};
  for (int i = 0; i < N; i++)
    for (int j = 0; j < N; j++) {
      if (i == j) continue;
      uint8_t s[32], s2[32];
      assert_int_equal(ot_secagg_agree(sk[i], pk[i], (uint32_t)i, pk[j], (uint32_t)j, 7, 'm', s), OT_OK);
      assert_int_equal(ot_secagg_agree(sk[j], pk[j], (uint32_t)j, pk[i], (uint32_t)i, 7, 'm', s2), OT_OK);
      assert_memory_equal(s, s2, 32); /* both ends agree */
      uint8_t other[32];
      assert_int_equal(ot_secagg_agree(sk[i], pk[i], (uint32_t)i, pk[j], (uint32_t)j, 8, 'm', other), OT_OK);
      assert_memory_not_equal(s, other, 32); /* bound to the round */
      ot_secagg_mask_apply(acc, D, s, i < j ? +1 : -1);
    }
  for (int k = 0; k < D; k++) assert_int_equal(acc[k], 0);
  /* a single mask is not zero, and equals randombytes_buf_deterministic */
  uint8_t seed[32];
  randombytes_buf(seed, 32);
  uint32_t v[D] = {0}, ref[D];
  ot_secagg_mask_apply(v, D, seed, +1);
  randombytes_buf_deterministic(ref, sizeof ref, seed);
  assert_memory_equal(v, ref, sizeof ref);
  assert_true(chi2_bytes((const uint8_t *)v, sizeof v, 1) < CHI2_MAX);
  /* across chunk boundaries (64 KiB) and with several masks in one pass: the same stream */
  size_t big = 3 * 16384 + 5;
  uint32_t *w = calloc(big, 4), *r1 = malloc(big * 4), *r2 = malloc(big * 4);
  uint8_t seeds[2][32];
  randombytes_buf(seeds, sizeof seeds);
  int8_t signs[2] = {+1, -1};
  ot_secagg_masks_apply(w, big, (const uint8_t(*)[32])seeds, signs, 2);
  randombytes_buf_deterministic(r1, big * 4, seeds[0]);
  randombytes_buf_deterministic(r2, big * 4, seeds[1]);
  for (size_t i = 0; i < big; i++) assert_int_equal(w[i], (uint32_t)(r1[i] - r2[i]));
  free(w), free(r1), free(r2);
  /* low-order peer key refused */
  uint8_t zero[32] = {0}, out[32];
  assert_int_equal(ot_secagg_agree(sk[0], pk[0], 0, zero, 1, 7, 'm', out), OT_ERR_FORMAT);
}

static void test_quantize(void **state) {
  (void)state;
  enum { D = 20000 };
  float *x = malloc(sizeof(float) * D), *back = malloc(sizeof(float) * D);
  uint32_t *q = malloc(sizeof(uint32_t) * D);
  const float clip = 0.5f;
  const uint32_t n = 100;
  double s = ot_secagg_scale(clip, n);
  for (int i = 0; i < D; i++) x[i] = (float)(rnd01() * 1.4 - 0.7); /* some beyond the clip */
  assert_int_equal(ot_secagg_quantize(x, D, clip, s, 0, NULL, q), OT_OK);
  ot_secagg_dequantize(q, D, s, back);
  for (int i = 0; i < D; i++) {
    double c = fmin(fmax(x[i], -clip), clip);
    assert_true(fabs(back[i] - c) <= 0.5 / s + 1e-7 * fabs(c)); /* + float rounding of the output */
  }
  /* stochastic: error < 1/s, unbiased (mean of many roundings of one value) */
  uint8_t seed[32] = {1};
  assert_int_equal(ot_secagg_quantize(x, D, clip, s, 1, seed, q), OT_OK);
  ot_secagg_dequantize(q, D, s, back);
  for (int i = 0; i < D; i++) {
    double c = fmin(fmax(x[i], -clip), clip);
    assert_true(fabs(back[i] - c) < 1.0 / s + 1e-7 * fabs(c));
  }
  for (int i = 0; i < D; i++) x[i] = (float)(0.3 / s); /* a value 0.3 of a step */
  assert_int_equal(ot_secagg_quantize(x, D, clip, s, 1, NULL, q), OT_OK);
  double mean = 0;
  for (int i = 0; i < D; i++) mean += (int32_t)q[i];
  mean /= D; /* Bernoulli(0.3): sd of the mean 0.0032 */
  printf("stochastic rounding of 0.3 steps: mean %.4f\n", mean);
  assert_true(fabs(mean - 0.3) < 0.02);
  /* n values at +clip (with the stochastic +1) sum without wrapping */
  for (int i = 0; i < D; i++) x[i] = clip;
  assert_int_equal(ot_secagg_quantize(x, D, clip, s, 1, NULL, q), OT_OK);
  uint32_t qmax = 0, sum = 0;
  for (int i = 0; i < D; i++) qmax = q[i] > qmax ? q[i] : qmax;
  assert_true(qmax <= clip * s + 1);
  for (uint32_t d = 0; d < n; d++) sum += qmax;
  assert_true((int32_t)sum > 0);
  ot_secagg_dequantize(&sum, 1, s, back);
  assert_true(fabs(back[0] - n * clip) < 1e-3);
  free(x), free(back), free(q);
}

static void make_roster(uint32_t n, ot_identity *ids, uint8_t (*roster)[OT_PK_BYTES]) {
  for (uint32_t i = 0; i < n; i++) {
    assert_int_equal(ot_identity_generate(&ids[i]), OT_OK);
    memcpy(roster[i], ids[i].pk, OT_PK_BYTES);
  }
}

static void test_graph(void **state) {
  (void)state;
  enum { N = 200 };
  ot_identity *ids = malloc(sizeof(ot_identity) * N);
  uint8_t(*roster)[OT_PK_BYTES] = malloc((size_t)N * OT_PK_BYTES);
  make_roster(N, ids, roster);
  ot_secagg_params p = {.dim = 10, .clip = 1}, r;
  assert_int_equal(ot_secagg_params_resolve(&p, N, &r), OT_OK);
  assert_int_equal(r.degree, 32);    /* 4 ceil(log2 200) */
  assert_int_equal(r.threshold, 17); /* a majority of 33 holders */
  ot_secagg_graph *g, *g2, *g3;
  assert_int_equal(ot_secagg_graph_new(5, (const uint8_t(*)[OT_PK_BYTES])roster, N, r.degree, &g), OT_OK);
  assert_int_equal(ot_secagg_graph_new(5, (const uint8_t(*)[OT_PK_BYTES])roster, N, r.degree, &g2), OT_OK);
  assert_int_equal(ot_secagg_graph_new(6, (const uint8_t(*)[OT_PK_BYTES])roster, N, r.degree, &g3), OT_OK);
  int differs = 0;
  for (uint32_t i = 0; i < N; i++) {
    uint32_t k, k2, k3;
    const uint32_t *a = ot_secagg_graph_neighbours(g, i, &k), *b = ot_secagg_graph_neighbours(g2, i, &k2);
    const uint32_t *c = ot_secagg_graph_neighbours(g3, i, &k3);
    assert_int_equal(k, r.degree);
    assert_memory_equal(a, b, sizeof(uint32_t) * k); /* every party computes the same graph */
    differs |= memcmp(a, c, sizeof(uint32_t) * k) != 0;
    for (uint32_t x = 0; x < k; x++) {
      assert_int_not_equal(a[x], i);
      if (x) assert_true(a[x] > a[x - 1]);
      assert_true(ot_secagg_graph_adjacent(g, a[x], i)); /* symmetric */
    }
  }
  assert_true(differs); /* another round, another graph */
  ot_secagg_graph_free(g), ot_secagg_graph_free(g2), ot_secagg_graph_free(g3);
  /* small rounds are complete graphs; hostile parameters refused */
  p.degree = 0;
  assert_int_equal(ot_secagg_params_resolve(&p, 3, &r), OT_OK);
  assert_int_equal(r.degree, 2);
  assert_int_equal(r.threshold, 2);
  assert_int_equal(ot_secagg_params_resolve(&p, 2, &r), OT_ERR_INVALID);
  p.degree = 5;
  assert_int_equal(ot_secagg_params_resolve(&p, 100, &r), OT_ERR_INVALID);
  p.degree = 0, p.threshold = 100;
  assert_int_equal(ot_secagg_params_resolve(&p, 100, &r), OT_ERR_INVALID);
  /* rosters: a key twice is refused by both sides; a device must be in it */
  p.threshold = 0;
  ot_secagg_server *s;
  ot_secagg_client *c;
  assert_int_equal(ot_secagg_server_new(&p, N, (const uint8_t(*)[OT_PK_BYTES])roster, 1, &s), OT_OK);
  ot_secagg_server_free(s);
  memcpy(roster[150], roster[7], OT_PK_BYTES);
  assert_int_equal(ot_secagg_server_new(&p, N, (const uint8_t(*)[OT_PK_BYTES])roster, 1, &s), OT_ERR_INVALID);
  assert_int_equal(ot_secagg_client_new(&ids[7], &p, 1, (const uint8_t(*)[OT_PK_BYTES])roster, N, &c),
                   OT_ERR_INVALID);
  assert_int_equal(ot_secagg_client_new(&ids[150], &p, 1, (const uint8_t(*)[OT_PK_BYTES])roster, N, &c),
                   OT_ERR_NOTFOUND);
  free(ids), free(roster);
}

/* ---------------- the simulator ---------------- */

typedef struct {
  uint8_t *b;
  size_t len;
} blob;

typedef struct {
  uint32_t n, dim;
  ot_secagg_params p;
  uint64_t round;
  ot_identity *ids;
  uint8_t (*roster)[OT_PK_BYTES];
  ot_secagg_client **c;
  ot_secagg_server *s;
  float *x;  /* n x dim updates */
  int *done; /* per device: last stage it completed (0..4) */
  blob *rec; /* everything the server received */
  size_t n_rec, cap_rec;
  blob *masked; /* masked input each device sent */
} sim;

static void rec_add(sim *m, const uint8_t *b, size_t len) {
  if (m->n_rec == m->cap_rec) {
    m->cap_rec = m->cap_rec ? 2 * m->cap_rec : 256;
    m->rec = realloc(m->rec, m->cap_rec * sizeof(blob));
  }
  m->rec[m->n_rec].b = malloc(len);
  memcpy(m->rec[m->n_rec].b, b, len);
  m->rec[m->n_rec++].len = len;
}

static void sim_init(sim *m, uint32_t n, uint32_t dim, const ot_secagg_params *p, uint64_t round) {
  memset(m, 0, sizeof *m);
  m->n = n, m->dim = dim, m->round = round;
  m->ids = malloc(sizeof(ot_identity) * n);
  m->roster = malloc((size_t)n * OT_PK_BYTES);
  m->c = calloc(n, sizeof *m->c);
  m->x = malloc(sizeof(float) * n * dim);
  m->done = calloc(n, sizeof(int));
  m->masked = calloc(n, sizeof(blob));
  make_roster(n, m->ids, m->roster);
  for (size_t i = 0; i < (size_t)n * dim; i++) m->x[i] = (float)(rnd01() * 2 - 1) * p->clip;
  assert_int_equal(ot_secagg_server_new(p, n, (const uint8_t(*)[OT_PK_BYTES])m->roster, round, &m->s), OT_OK);
  m->p = *ot_secagg_server_params(m->s);
  for (uint32_t i = 0; i < n; i++)
    assert_int_equal(
        ot_secagg_client_new(&m->ids[i], p, round, (const uint8_t(*)[OT_PK_BYTES])m->roster, n, &m->c[i]),
        OT_OK);
}

static void sim_free(sim *m) {
  for (uint32_t i = 0; i < m->n; i++) ot_secagg_client_free(m->c[i]), free(m->masked[i].b);
  ot_secagg_server_free(m->s);
  for (size_t i = 0; i < m->n_rec; i++) free(m->rec[i].b);
  free(m->rec), free(m->ids), free(m->roster), free(m->c), free(m->x), free(m->done), free(m->masked);
}

/* Hooks let a test replace a device's outgoing message (bad actors). */
typedef void (*tamper_fn)(sim *m, uint32_t dev, int stage, uint8_t **b, size_t *len);

static int deliver(sim *m, uint32_t i, uint8_t *b, size_t len, int stage, tamper_fn tamper) {
  if (tamper) tamper(m, i, stage, &b, &len);
  rec_add(m, b, len);
  uint32_t from = UINT32_MAX;
  int rc = ot_secagg_server_receive(m->s, b, len, &from);
  if (rc == OT_OK) assert_int_equal(from, i);
  free(b);
  return rc;
}

/* Runs one round: drop[k] = probability that a device still in drops before sending its
 * stage k+1 message. Returns advance()'s first failure or OT_OK. */
static int sim_run(sim *m, const double drop[4], tamper_fn tamper) {
  uint8_t *out, *in;
  size_t ol, il;
  for (uint32_t i = 0; i < m->n; i++) {
    if (rnd01() < drop[0]) continue;
    assert_int_equal(ot_secagg_client_advertise(m->c[i], &out, &ol), OT_OK);
    if (deliver(m, i, out, ol, 1, tamper) == OT_OK) m->done[i] = 1;
  }
  int rc = ot_secagg_server_advance(m->s);
  if (rc) return rc;
  for (uint32_t i = 0; i < m->n; i++) {
    if (ot_secagg_server_outgoing(m->s, i, &in, &il) != OT_OK) continue;
    assert_int_equal(m->done[i], 1);
    int crc = ot_secagg_client_on_keys(m->c[i], in, il, &out, &ol);
    free(in);
    if (crc) { /* too few advertised neighbours: this device cannot take part */
      assert_int_equal(crc, OT_ERR_RANGE);
      continue;
    }
    if (rnd01() < drop[1]) {
      free(out);
      continue;
    }
    if (deliver(m, i, out, ol, 2, tamper) == OT_OK) m->done[i] = 2;
  }
  if ((rc = ot_secagg_server_advance(m->s))) return rc;
  for (uint32_t i = 0; i < m->n; i++) {
    if (ot_secagg_server_outgoing(m->s, i, &in, &il) != OT_OK) continue;
    assert_int_equal(m->done[i], 2);
    int crc = ot_secagg_client_on_shares(m->c[i], in, il);
    free(in);
    if (crc) {
      assert_int_equal(crc, OT_ERR_RANGE);
      continue;
    }
    if (rnd01() < drop[2]) continue;
    assert_int_equal(ot_secagg_client_mask_input(m->c[i], m->x + (size_t)i * m->dim, m->dim, &out, &ol),
                     OT_OK);
    m->masked[i].b = malloc(ol);
    memcpy(m->masked[i].b, out, ol);
    m->masked[i].len = ol;
    if (deliver(m, i, out, ol, 3, tamper) == OT_OK) m->done[i] = 3;
  }
  if ((rc = ot_secagg_server_advance(m->s))) return rc;
  for (uint32_t i = 0; i < m->n; i++) {
    if (ot_secagg_server_outgoing(m->s, i, &in, &il) != OT_OK) continue;
    assert_int_equal(m->done[i], 3);
    assert_int_equal(ot_secagg_client_on_unmask(m->c[i], in, il, &out, &ol), OT_OK);
    free(in);
    if (rnd01() < drop[3]) {
      free(out);
      continue;
    }
    if (deliver(m, i, out, ol, 4, tamper) == OT_OK) m->done[i] = 4;
  }
  return ot_secagg_server_advance(m->s);
}

/* Whether the round should succeed, from who completed what (no corruption). */
static int sim_expect_ok(const sim *m) {
  uint32_t t = m->p.threshold, u[5] = {0};
  for (uint32_t i = 0; i < m->n; i++)
    for (int k = 1; k <= m->done[i]; k++) u[k]++;
  if (u[1] < t || u[2] < t || u[3] < t) return 0;
  ot_secagg_graph *g;
  assert_int_equal(
      ot_secagg_graph_new(m->round, (const uint8_t(*)[OT_PK_BYTES])m->roster, m->n, m->p.degree, &g), OT_OK);
  int ok = 1;
  for (uint32_t j = 0; j < m->n && ok; j++) {
    if (m->done[j] < 2) continue;
    uint32_t k, holders = 0, users = 0;
    const uint32_t *nb = ot_secagg_graph_neighbours(g, j, &k);
    for (uint32_t a = 0; a < k; a++) {
      holders += m->done[nb[a]] == 4;
      users += m->done[nb[a]] >= 3;
    }
    if (m->done[j] >= 3)
      ok = holders + (m->done[j] == 4) >= t;
    else if (users)
      ok = holders >= t;
  }
  ot_secagg_graph_free(g);
  return ok;
}

/* Checks the published sum against the plain sum of the included updates. */
static void sim_check_sum(sim *m, uint32_t *count_out) {
  float *sum = malloc(sizeof(float) * m->dim);
  uint32_t count = 0, inc = 0;
  assert_int_equal(ot_secagg_server_result(m->s, sum, m->dim, &count), OT_OK);
  double step = 1.0 / ot_secagg_scale(m->p.clip, m->n), worst = 0;
  for (uint32_t i = 0; i < m->n; i++) {
    assert_int_equal(ot_secagg_server_included(m->s, i), m->done[i] >= 3);
    inc += m->done[i] >= 3;
  }
  assert_int_equal(count, inc);
  for (uint32_t k = 0; k < m->dim; k++) {
    double plain = 0;
    for (uint32_t i = 0; i < m->n; i++)
      if (m->done[i] >= 3) plain += m->x[(size_t)i * m->dim + k];
    double err = fabs(sum[k] - plain),
           bound = (m->p.stochastic ? 1.0 : 0.5) * count * step + 1e-7 * fabs(plain);
    if (err > worst) worst = err;
    assert_true(err <= bound);
  }
  if (count_out) *count_out = count;
  free(sum);
}

static void test_exact_with_dropouts(void **state) {
  (void)state;
  const uint32_t ns[] = {3, 4, 7, 10, 25, 50, 100};
  const double rates[] = {0.0, 0.1, 0.2, 0.3};
  int ok = 0, aborted = 0, recovered = 0, big = 0, big_ok = 0;
  for (size_t a = 0; a < sizeof ns / sizeof ns[0]; a++)
    for (size_t r = 0; r < sizeof rates / sizeof rates[0]; r++)
      for (int where = 0; where < 5; where++) { /* one stage at a time, then all stages */
        if (rates[r] == 0 && where) continue;
        double drop[4] = {0};
        for (int k = 0; k < 4; k++) drop[k] = (where == 4 || where == k) ? rates[r] : 0;
        ot_secagg_params p = {.dim = 64, .clip = 2.0f, .stochastic = (int)(a % 2)};
        /* at 0-10% the default parameters; at 20-30% a threshold of 2/3 of the holders
         * with the default degree, or the default majority with twice the degree, so that
         * both the aborts and the recoveries are exercised */
        int robust = 1; /* parameters meant to survive this dropout */
        if (r >= 2 && (a + (size_t)where) % 2 == 0) {
          robust = 0;
          ot_secagg_params rp;
          assert_int_equal(ot_secagg_params_resolve(&p, ns[a], &rp), OT_OK);
          p.threshold = (2 * (rp.degree + 1) + 2) / 3;
        } else if (r >= 2) {
          ot_secagg_params rp;
          assert_int_equal(ot_secagg_params_resolve(&p, ns[a], &rp), OT_OK);
          p.degree = rp.degree * 2 >= ns[a] - 1 ? 0 : rp.degree * 2;
        }
        sim m;
        sim_init(&m, ns[a], p.dim, &p, 1000 + a * 100 + r * 10 + (uint64_t)where);
        int rc = sim_run(&m, drop, NULL);
        int expect = sim_expect_ok(&m);
        int dropped_masked = 0;
        for (uint32_t i = 0; i < m.n; i++) dropped_masked += m.done[i] == 2;
        if (rc != OT_OK) {
          if (expect)
            printf("n=%u rate=%.1f stage=%d: unexpected failure: %s\n", ns[a], rates[r], where,
                   ot_error_detail());
          assert_false(expect);
          assert_int_equal(rc, OT_ERR_RANGE);
          assert_int_equal(ot_secagg_server_stage(m.s), OT_SA_FAILED);
          float dummy[64];
          assert_int_not_equal(ot_secagg_server_result(m.s, dummy, 64, NULL), OT_OK);
          aborted++;
        } else {
          assert_true(expect);
          sim_check_sum(&m, NULL);
          ok++;
          if (dropped_masked) recovered++;
        }
        if (rc && rates[r] == 0) fail_msg("n=%u without dropouts: %s", ns[a], ot_error_detail());
        if (where < 4 && ns[a] >= 25 && robust) big += 1, big_ok += rc == OT_OK;
        sim_free(&m);
      }
  printf("exactness: %d rounds exact, %d of them recovered dropped devices' masks, %d aborted "
         "(too few holders, as predicted)\n",
         ok, recovered, aborted);
  printf("exactness: with 10-30%% dropping at one stage, %d of %d rounds of 25-100 devices completed\n",
         big_ok, big);
  assert_true(big_ok * 10 >= big * 8);
  assert_true(ok >= 40);
  assert_true(recovered >= 10);
}

/* ---------------- the cloud's view ---------------- */

static void unpack_masked(const blob *b, uint32_t **y, uint32_t *dim) {
  ot_secagg_msg m;
  assert_int_equal(ot_secagg_msg_decode(b->b, b->len, SIZE_MAX, &m), OT_OK);
  Offtune__Secagg__MaskedInput *mi = offtune__secagg__masked_input__unpack(NULL, m.body_len, m.body);
  assert_non_null(mi);
  *dim = mi->dim;
  *y = malloc(mi->data.len);
  memcpy(*y, mi->data.data, mi->data.len);
  offtune__secagg__masked_input__free_unpacked(mi, NULL);
  ot_secagg_msg_clear(&m);
}

/* An advertised key, read from the bytes the server received. */
static void advert_of(const sim *m, uint32_t dev, uint8_t mask_pk[32], uint8_t commit[32]) {
  for (size_t r = 0; r < m->n_rec; r++) {
    ot_secagg_msg w;
    if (ot_secagg_msg_decode(m->rec[r].b, m->rec[r].len, SIZE_MAX, &w)) continue;
    if (w.stage == OT_SA_ADVERTISE && w.device == dev) {
      Offtune__Secagg__Advertise *a = offtune__secagg__advertise__unpack(NULL, w.body_len, w.body);
      memcpy(mask_pk, a->mask_pk.data, 32);
      memcpy(commit, a->self_commit.data, 32);
      offtune__secagg__advertise__free_unpacked(a, NULL);
      ot_secagg_msg_clear(&w);
      return;
    }
    ot_secagg_msg_clear(&w);
  }
  fail_msg("no advertisement of device %u recorded", dev);
}

static void test_cloud_view(void **state) {
  (void)state;
  enum { N = 12, D = 65536 };
  ot_secagg_params p = {.dim = D, .clip = 1.0f};
  sim m;
  sim_init(&m, N, D, &p, 77);
  /* a very structured update for device 0: all zeros, then a ramp */
  for (uint32_t k = 0; k < D; k++) m.x[k] = k < D / 2 ? 0.0f : (float)k / D;
  double drop[4] = {0};
  assert_int_equal(sim_run(&m, drop, NULL), OT_OK);
  sim_check_sum(&m, NULL);
  const uint32_t t = m.p.threshold, target = 0;

  /* (a) each masked input, as the server received it, is indistinguishable from uniform */
  for (uint32_t i = 0; i < N; i++) {
    uint32_t *y, dim;
    unpack_masked(&m.masked[i], &y, &dim);
    for (int byte = 0; byte < 4; byte++)
      assert_true(chi2_bytes((const uint8_t *)y + byte, 4 * (size_t)dim, 4) < CHI2_MAX);
    free(y);
  }
  uint32_t *q = malloc(4 * D), *y, dim;
  double scale = ot_secagg_scale(p.clip, N);
  assert_int_equal(ot_secagg_quantize(m.x, D, p.clip, scale, 0, NULL, q), OT_OK);
  double cq = chi2_bytes((const uint8_t *)q + 3, 4 * (size_t)D, 4);
  printf("cloud view: top byte of the unmasked update chi2 = %.0f, of every masked input < %.0f\n", cq,
         CHI2_MAX);
  assert_true(cq > 100 * CHI2_MAX); /* the statistic does see structure */

  /* what the server legitimately learns about the target: its self-mask seed. Removing
   * it leaves a vector still masked by the pairwise masks: uniform. */
  unpack_masked(&m.masked[target], &y, &dim);
  ot_secagg_graph *g;
  assert_int_equal(ot_secagg_graph_new(m.round, (const uint8_t(*)[OT_PK_BYTES])m.roster, N, m.p.degree, &g),
                   OT_OK);
  uint32_t k;
  const uint32_t *nb = ot_secagg_graph_neighbours(g, target, &k);
  uint8_t(*col)[OT_SA_SHARE_BYTES] = malloc((size_t)(k + 1) * OT_SA_SHARE_BYTES);
  uint8_t(*colk)[OT_SA_SHARE_BYTES] = malloc((size_t)(k + 1) * OT_SA_SHARE_BYTES);
  /* colluders: the target's neighbours hand over the shares they hold */
  for (uint32_t a = 0; a < k; a++) {
    assert_int_equal(ot_secagg_client_held_share(m.c[nb[a]], target, OT_SA_KIND_SELF, col[a]), OT_OK);
    assert_int_equal(ot_secagg_client_held_share(m.c[nb[a]], target, OT_SA_KIND_MASKKEY, colk[a]), OT_OK);
  }
  uint8_t mask_pk[32], commit[32], seed[32], msk[32], c2[32], pk2[32];
  advert_of(&m, target, mask_pk, commit);
  /* fewer than t colluders: neither secret comes out */
  assert_int_equal(ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])col, t - 1, t, seed), OT_ERR_RANGE);
  int rc = ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])col, t - 1, t - 1, seed);
  if (rc == OT_OK) ot_secagg_commit(seed, m.round, target, c2);
  assert_true(rc != OT_OK || memcmp(c2, commit, 32) != 0);
  rc = ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])colk, t - 1, t - 1, msk);
  if (rc == OT_OK) crypto_scalarmult_base(pk2, msk);
  assert_true(rc != OT_OK || memcmp(pk2, mask_pk, 32) != 0);
  /* t colluders: the self-mask seed; removing it leaves the pairwise masks on */
  assert_int_equal(ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])col, t, t, seed), OT_OK);
  ot_secagg_commit(seed, m.round, target, c2);
  assert_memory_equal(c2, commit, 32);
  ot_secagg_mask_apply(y, D, seed, -1);
  assert_true(chi2_bytes((const uint8_t *)y + 3, 4 * (size_t)D, 4) < CHI2_MAX);
  /* ...and with the mask key as well (both kinds: what the protocol never gives the
   * server) the update comes out exactly: the masking is real, and only that */
  assert_int_equal(ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])colk, t, t, msk), OT_OK);
  crypto_scalarmult_base(pk2, msk);
  assert_memory_equal(pk2, mask_pk, 32);
  for (uint32_t a = 0; a < k; a++) {
    uint8_t npk[32], ncommit[32], s[32];
    advert_of(&m, nb[a], npk, ncommit);
    assert_int_equal(ot_secagg_agree(msk, mask_pk, target, npk, nb[a], m.round, 'm', s), OT_OK);
    ot_secagg_mask_apply(y, D, s, target < nb[a] ? -1 : +1);
  }
  assert_memory_equal(y, q, 4 * (size_t)D);
  printf("cloud view: %u colluding holders recover device %u's update exactly; %u recover nothing\n", t,
         target, t - 1);
  free(y), free(q), free(col), free(colk);
  ot_secagg_graph_free(g);
  /* the audit trail says so */
  size_t na = ot_secagg_server_audit_count(m.s);
  int never = 0, self_lines = 0;
  for (size_t i = 0; i < na; i++) {
    const char *l = ot_secagg_server_audit_line(m.s, i);
    never |= strstr(l, "never held an individual unmasked update") != NULL;
    self_lines += strstr(l, "self-mask seed reconstructed") != NULL;
    assert_null(strstr(l, "mask key reconstructed")); /* nobody dropped: no mask key rebuilt */
  }
  assert_true(never);
  assert_int_equal(self_lines, N);
  sim_free(&m);
}

/* ---------------- bad actors ---------------- */

/* Re-signs a tampered body as the device would (a malicious device signs its lies). */
static void resign(sim *m, uint32_t dev, uint8_t **b, size_t *len, const ProtobufCMessage *body, int stage) {
  size_t bl = protobuf_c_message_get_packed_size(body);
  uint8_t *buf = malloc(bl + 1);
  protobuf_c_message_pack(body, buf);
  free(*b);
  assert_int_equal(ot_secagg_msg_encode((uint32_t)stage, m->round, dev, buf, bl, &m->ids[dev], b, len),
                   OT_OK);
  free(buf);
}

static uint32_t g_liar = 3;

/* Device g_liar reveals garbage for every share it holds (validly wrapped and signed). */
static void tamper_reveal(sim *m, uint32_t dev, int stage, uint8_t **b, size_t *len) {
  if (dev != g_liar || stage != 4) return;
  ot_secagg_msg w;
  assert_int_equal(ot_secagg_msg_decode(*b, *len, SIZE_MAX, &w), OT_OK);
  Offtune__Secagg__UnmaskResponse *r = offtune__secagg__unmask_response__unpack(NULL, w.body_len, w.body);
  for (size_t a = 0; a < r->n_shares; a++) r->shares[a]->share.data[5] ^= 0x40;
  resign(m, dev, b, len, &r->base, stage);
  offtune__secagg__unmask_response__free_unpacked(r, NULL);
  ot_secagg_msg_clear(&w);
}

/* Device g_liar seals a corrupted share for its first neighbour. */
static void tamper_deal(sim *m, uint32_t dev, int stage, uint8_t **b, size_t *len) {
  if (dev != g_liar || stage != 2) return;
  ot_secagg_msg w;
  assert_int_equal(ot_secagg_msg_decode(*b, *len, SIZE_MAX, &w), OT_OK);
  Offtune__Secagg__Shares *s = offtune__secagg__shares__unpack(NULL, w.body_len, w.body);
  s->shares[0]->box.data[40] ^= 1;
  resign(m, dev, b, len, &s->base, stage);
  offtune__secagg__shares__free_unpacked(s, NULL);
  ot_secagg_msg_clear(&w);
}

static void test_bad_shares(void **state) {
  (void)state;
  double drop[4] = {0, 0, 0, 0};
  ot_secagg_params p = {.dim = 256, .clip = 1.0f};
  /* wrong shares revealed: each is caught by its owner's signature and the others used */
  sim m;
  sim_init(&m, 10, p.dim, &p, 501);
  assert_int_equal(sim_run(&m, drop, tamper_reveal), OT_OK);
  sim_check_sum(&m, NULL);
  int discarded = 0;
  for (size_t i = 0; i < ot_secagg_server_audit_count(m.s); i++) {
    const char *l = ot_secagg_server_audit_line(m.s, i);
    if (strstr(l, "did not sign: discarded")) {
      char want[32];
      snprintf(want, sizeof want, "device %u revealed", g_liar);
      assert_non_null(strstr(l, want));
      discarded++;
    }
  }
  printf("bad shares: %d forged shares discarded, the sum is exact\n", discarded);
  assert_int_equal(discarded, m.p.degree + 1); /* its own and each neighbour's */
  sim_free(&m);

  /* a corrupted sealed share: the receiving neighbour cannot open it and holds nothing */
  sim_init(&m, 10, p.dim, &p, 502);
  assert_int_equal(sim_run(&m, drop, tamper_deal), OT_OK);
  sim_check_sum(&m, NULL);
  uint32_t bad = 0;
  for (uint32_t i = 0; i < m.n; i++) bad += ot_secagg_client_bad_shares(m.c[i]);
  assert_int_equal(bad, 1);
  sim_free(&m);

  /* with too many liars among the holders, the round aborts and publishes nothing */
  sim_init(&m, 4, p.dim, &p, 503); /* complete graph on 4: h = 4, t = 3 */
  g_liar = 1;
  /* device 2 never answers the unmask request, device 1 lies: 2 good holders < t */
  int rc;
  {
    uint8_t *out, *in;
    size_t ol, il;
    for (uint32_t i = 0; i < 4; i++) {
      assert_int_equal(ot_secagg_client_advertise(m.c[i], &out, &ol), OT_OK);
      assert_int_equal(deliver(&m, i, out, ol, 1, NULL), OT_OK);
    }
    assert_int_equal(ot_secagg_server_advance(m.s), OT_OK);
    for (uint32_t i = 0; i < 4; i++) {
      assert_int_equal(ot_secagg_server_outgoing(m.s, i, &in, &il), OT_OK);
      assert_int_equal(ot_secagg_client_on_keys(m.c[i], in, il, &out, &ol), OT_OK);
      free(in);
      assert_int_equal(deliver(&m, i, out, ol, 2, NULL), OT_OK);
    }
    assert_int_equal(ot_secagg_server_advance(m.s), OT_OK);
    for (uint32_t i = 0; i < 4; i++) {
      assert_int_equal(ot_secagg_server_outgoing(m.s, i, &in, &il), OT_OK);
      assert_int_equal(ot_secagg_client_on_shares(m.c[i], in, il), OT_OK);
      free(in);
      assert_int_equal(ot_secagg_client_mask_input(m.c[i], m.x + i * p.dim, p.dim, &out, &ol), OT_OK);
      assert_int_equal(deliver(&m, i, out, ol, 3, NULL), OT_OK);
    }
    assert_int_equal(ot_secagg_server_advance(m.s), OT_OK);
    for (uint32_t i = 0; i < 4; i++) {
      assert_int_equal(ot_secagg_server_outgoing(m.s, i, &in, &il), OT_OK);
      assert_int_equal(ot_secagg_client_on_unmask(m.c[i], in, il, &out, &ol), OT_OK);
      free(in);
      if (i == 2) {
        free(out);
        continue;
      }
      assert_int_equal(deliver(&m, i, out, ol, 4, tamper_reveal), OT_OK);
    }
    rc = ot_secagg_server_advance(m.s);
  }
  assert_int_equal(rc, OT_ERR_RANGE);
  printf("too many bad shares: %s\n", ot_error_detail());
  assert_non_null(strstr(ot_error_detail(), "the threshold is 3"));
  float sum[256];
  assert_int_not_equal(ot_secagg_server_result(m.s, sum, p.dim, NULL), OT_OK);
  g_liar = 3;
  sim_free(&m);
}

static void test_replay_and_hostile(void **state) {
  (void)state;
  ot_secagg_params p = {.dim = 128, .clip = 1.0f};
  sim m, other;
  sim_init(&m, 6, p.dim, &p, 900);
  uint8_t *out, *in, *adv0 = NULL;
  size_t ol, il, adv0_len = 0;
  /* a device advertising a small-order key, or padding its advertisement (relayed to
   * every neighbour), is refused */
  {
    uint8_t body[1024], zero[32] = {0}, good[32], *w;
    size_t wl;
    crypto_box_keypair(good, body); /* body: scratch for the secret half */
    Offtune__Secagg__Advertise a = OFFTUNE__SECAGG__ADVERTISE__INIT;
    a.enc_pk = (ProtobufCBinaryData){32, good};
    a.mask_pk = (ProtobufCBinaryData){32, zero};
    a.self_commit = (ProtobufCBinaryData){32, good};
    size_t bl = protobuf_c_message_pack(&a.base, body);
    assert_int_equal(ot_secagg_msg_encode(OT_SA_ADVERTISE, m.round, 2, body, bl, &m.ids[2], &w, &wl), OT_OK);
    assert_int_equal(ot_secagg_server_receive(m.s, w, wl, NULL), OT_ERR_FORMAT);
    assert_non_null(strstr(ot_error_detail(), "small-order"));
    free(w);
    a.mask_pk = (ProtobufCBinaryData){32, good};
    bl = protobuf_c_message_pack(&a.base, body);
    body[bl++] = 0x7A, body[bl++] = 0xD8, body[bl++] = 0x04; /* unknown field 15, 600 bytes */
    memset(body + bl, 0x55, 600);
    bl += 600;
    assert_int_equal(ot_secagg_msg_encode(OT_SA_ADVERTISE, m.round, 2, body, bl, &m.ids[2], &w, &wl), OT_OK);
    assert_int_equal(ot_secagg_server_receive(m.s, w, wl, NULL), OT_ERR_RANGE);
    free(w);
  }
  /* stage 1, with hostile bytes interleaved: each refused, nothing changes */
  for (uint32_t i = 0; i < m.n; i++) {
    assert_int_equal(ot_secagg_client_advertise(m.c[i], &out, &ol), OT_OK);
    if (i == 0) {
      adv0 = malloc(ol);
      memcpy(adv0, out, ol);
      adv0_len = ol;
      for (size_t cut = 0; cut < ol; cut++)
        assert_int_not_equal(ot_secagg_server_receive(m.s, out, cut, NULL), OT_OK);
      for (size_t bit = 0; bit < ol * 8; bit += 7) { /* any flipped bit: malformed or bad signature */
        out[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        assert_int_not_equal(ot_secagg_server_receive(m.s, out, ol, NULL), OT_OK);
        out[bit / 8] ^= (uint8_t)(1u << (bit % 8));
      }
    }
    assert_int_equal(deliver(&m, i, out, ol, 1, NULL), OT_OK);
  }
  /* replayed advertisement */
  assert_int_equal(ot_secagg_server_receive(m.s, adv0, adv0_len, NULL), OT_ERR_MISMATCH);
  assert_int_equal(ot_secagg_server_advance(m.s), OT_OK);
  /* an advertisement now belongs to a closed stage */
  assert_int_equal(ot_secagg_server_receive(m.s, adv0, adv0_len, NULL), OT_ERR_MISMATCH);
  free(adv0);
  for (uint32_t i = 0; i < m.n; i++) {
    assert_int_equal(ot_secagg_server_outgoing(m.s, i, &in, &il), OT_OK);
    /* a key list meant for another device is refused by the client */
    if (i == 0) {
      uint8_t *in1;
      size_t il1;
      assert_int_equal(ot_secagg_server_outgoing(m.s, 1, &in1, &il1), OT_OK);
      assert_int_equal(ot_secagg_client_on_keys(m.c[0], in1, il1, &out, &ol), OT_ERR_MISMATCH);
      free(in1);
      for (size_t cut = 0; cut + 1 < il; cut += 13)
        assert_int_not_equal(ot_secagg_client_on_keys(m.c[0], in, cut, &out, &ol), OT_OK);
    }
    assert_int_equal(ot_secagg_client_on_keys(m.c[i], in, il, &out, &ol), OT_OK);
    free(in);
    assert_int_equal(deliver(&m, i, out, ol, 2, NULL), OT_OK);
  }
  assert_int_equal(ot_secagg_server_advance(m.s), OT_OK);
  uint8_t *masked0 = NULL;
  size_t masked0_len = 0;
  for (uint32_t i = 0; i < m.n; i++) {
    assert_int_equal(ot_secagg_server_outgoing(m.s, i, &in, &il), OT_OK);
    assert_int_equal(ot_secagg_client_on_shares(m.c[i], in, il), OT_OK);
    free(in);
    /* wrong length refused by the device itself */
    assert_int_equal(ot_secagg_client_mask_input(m.c[i], m.x, p.dim - 1, &out, &ol), OT_ERR_MISMATCH);
    assert_int_equal(ot_secagg_client_mask_input(m.c[i], m.x + (size_t)i * p.dim, p.dim, &out, &ol), OT_OK);
    if (i == 0) {
      masked0 = malloc(ol);
      memcpy(masked0, out, ol);
      masked0_len = ol;
    }
    assert_int_equal(deliver(&m, i, out, ol, 3, NULL), OT_OK);
  }
  /* a replayed masked update is refused and does not change the sum */
  assert_int_equal(ot_secagg_server_receive(m.s, masked0, masked0_len, NULL), OT_ERR_MISMATCH);
  assert_non_null(strstr(ot_error_detail(), "replay refused"));
  /* ... as is one claiming to come from another device (signature) */
  {
    ot_secagg_msg w;
    assert_int_equal(ot_secagg_msg_decode(masked0, masked0_len, SIZE_MAX, &w), OT_OK);
    Offtune__Secagg__SecAggMsg *pm = offtune__secagg__sec_agg_msg__unpack(NULL, masked0_len, masked0);
    pm->device = 1;
    uint8_t *fb = malloc(protobuf_c_message_get_packed_size(&pm->base));
    size_t fl = protobuf_c_message_pack(&pm->base, fb);
    assert_int_equal(ot_secagg_server_receive(m.s, fb, fl, NULL), OT_ERR_MISMATCH);
    free(fb);
    offtune__secagg__sec_agg_msg__free_unpacked(pm, NULL);
    ot_secagg_msg_clear(&w);
  }
  /* ... and into another round (a fresh server with the same roster) */
  sim_init(&other, 6, p.dim, &p, 901);
  ot_secagg_server_free(other.s);
  assert_int_equal(ot_secagg_server_new(&p, 6, (const uint8_t(*)[OT_PK_BYTES])m.roster, 901, &other.s),
                   OT_OK);
  assert_int_equal(ot_secagg_server_receive(other.s, masked0, masked0_len, NULL), OT_ERR_MISMATCH);
  sim_free(&other);
  free(masked0);
  assert_int_equal(ot_secagg_server_advance(m.s), OT_OK);
  /* the device refuses an unmask request that calls a device both survivor and dropped */
  {
    uint32_t sv[2] = {0, 1}, dr[1] = {1};
    Offtune__Secagg__UnmaskRequest ur = OFFTUNE__SECAGG__UNMASK_REQUEST__INIT;
    ur.n_survivors = 2, ur.survivors = sv, ur.n_dropped = 1, ur.dropped = dr;
    uint8_t body[64];
    size_t bl = protobuf_c_message_pack(&ur.base, body);
    uint8_t *w;
    size_t wl;
    assert_int_equal(ot_secagg_msg_encode(OT_SA_MASKED, m.round, 0, body, bl, NULL, &w, &wl), OT_OK);
    assert_int_equal(ot_secagg_client_on_unmask(m.c[0], w, wl, &out, &ol), OT_ERR_MISMATCH);
    free(w);
  }
  for (uint32_t i = 0; i < m.n; i++) {
    assert_int_equal(ot_secagg_server_outgoing(m.s, i, &in, &il), OT_OK);
    assert_int_equal(ot_secagg_client_on_unmask(m.c[i], in, il, &out, &ol), OT_OK);
    /* one answer per round: a second request (e.g. with other lists) is refused */
    uint8_t *o2;
    size_t l2;
    assert_int_equal(ot_secagg_client_on_unmask(m.c[i], in, il, &o2, &l2), OT_ERR_INVALID);
    free(in);
    uint8_t *dup = malloc(ol);
    memcpy(dup, out, ol);
    assert_int_equal(deliver(&m, i, out, ol, 4, NULL), OT_OK);
    assert_int_equal(ot_secagg_server_receive(m.s, dup, ol, NULL), OT_ERR_MISMATCH);
    free(dup);
  }
  assert_int_equal(ot_secagg_server_advance(m.s), OT_OK);
  for (uint32_t i = 0; i < m.n; i++) m.done[i] = 4;
  sim_check_sum(&m, NULL);
  size_t refused = 0;
  for (size_t i = 0; i < ot_secagg_server_audit_count(m.s); i++)
    refused += strstr(ot_secagg_server_audit_line(m.s, i), "refused a message") != NULL;
  assert_true(refused >= 4);
  sim_free(&m);
}

static void test_too_few_survivors(void **state) {
  (void)state;
  ot_secagg_params p = {.dim = 32, .clip = 1.0f};
  sim m;
  sim_init(&m, 5, p.dim, &p, 1234); /* complete graph: h = 5, t = 3 */
  assert_int_equal(m.p.threshold, 3);
  uint8_t *out, *in;
  size_t ol, il;
  for (uint32_t i = 0; i < m.n; i++) {
    assert_int_equal(ot_secagg_client_advertise(m.c[i], &out, &ol), OT_OK);
    assert_int_equal(deliver(&m, i, out, ol, 1, NULL), OT_OK);
  }
  assert_int_equal(ot_secagg_server_advance(m.s), OT_OK);
  for (uint32_t i = 0; i < m.n; i++) {
    assert_int_equal(ot_secagg_server_outgoing(m.s, i, &in, &il), OT_OK);
    assert_int_equal(ot_secagg_client_on_keys(m.c[i], in, il, &out, &ol), OT_OK);
    free(in);
    assert_int_equal(deliver(&m, i, out, ol, 2, NULL), OT_OK);
  }
  assert_int_equal(ot_secagg_server_advance(m.s), OT_OK);
  for (uint32_t i = 0; i < 2; i++) { /* only 2 of 5 send masked inputs */
    assert_int_equal(ot_secagg_server_outgoing(m.s, i, &in, &il), OT_OK);
    assert_int_equal(ot_secagg_client_on_shares(m.c[i], in, il), OT_OK);
    free(in);
    assert_int_equal(ot_secagg_client_mask_input(m.c[i], m.x + i * p.dim, p.dim, &out, &ol), OT_OK);
    assert_int_equal(deliver(&m, i, out, ol, 3, NULL), OT_OK);
  }
  assert_int_equal(ot_secagg_server_advance(m.s), OT_ERR_RANGE);
  printf("too few survivors: %s\n", ot_error_detail());
  assert_non_null(strstr(ot_error_detail(), "fewer than the threshold 3"));
  assert_int_equal(ot_secagg_server_stage(m.s), OT_SA_FAILED);
  float sum[32];
  assert_int_equal(ot_secagg_server_result(m.s, sum, 32, NULL), OT_ERR_INVALID);
  assert_int_equal(ot_secagg_server_outgoing(m.s, 0, &in, &il), OT_ERR_NOTFOUND);
  assert_int_not_equal(ot_secagg_server_advance(m.s), OT_OK);
  const char *last = ot_secagg_server_audit_line(m.s, ot_secagg_server_audit_count(m.s) - 1);
  assert_non_null(strstr(last, "no aggregate is published"));
  sim_free(&m);
}

/* Distributed DP through the protocol: each device clips its update and adds its share
 * of the noise before masking; the published sum carries the full variance (z C)^2. */
static void test_distributed_noise(void **state) {
  (void)state;
  enum { N = 16, D = 40000 };
  const double z = 1.1, C = 0.5;
  ot_secagg_params p = {.dim = D, .clip = 2.0f, .stochastic = 1};
  sim m;
  sim_init(&m, N, D, &p, 4242);
  double *clean = calloc(D, sizeof(double));
  for (uint32_t i = 0; i < N; i++) {
    float *x = m.x + (size_t)i * D;
    double norm;
    for (uint32_t k = 0; k < D; k++) x[k] *= 0.05f; /* norm about 5.8: clipped to C */
    assert_int_equal(ot_dp_clip_l2(x, D, C, &norm), OT_OK);
    assert_true(norm > C);
    for (uint32_t k = 0; k < D; k++) clean[k] += x[k];
    ot_dp_rng r;
    assert_int_equal(ot_dp_rng_init(&r, NULL), OT_OK);
    assert_int_equal(ot_dp_add_gaussian(&r, x, D, ot_dp_device_stddev(z, C, N)), OT_OK);
    ot_dp_rng_wipe(&r);
  }
  double drop[4] = {0};
  assert_int_equal(sim_run(&m, drop, NULL), OT_OK);
  float *sum = malloc(sizeof(float) * D);
  uint32_t count;
  assert_int_equal(ot_secagg_server_result(m.s, sum, D, &count), OT_OK);
  assert_int_equal(count, N);
  double mean = 0, var = 0;
  for (uint32_t k = 0; k < D; k++) mean += sum[k] - clean[k];
  mean /= D;
  for (uint32_t k = 0; k < D; k++) var += (sum[k] - clean[k] - mean) * (sum[k] - clean[k] - mean);
  var /= D;
  double target = z * C * z * C;
  printf("distributed noise through secure aggregation: variance %.5f, target %.5f (ratio %.4f)\n", var,
         target, var / target);
  assert_true(fabs(var / target - 1) < 6 * sqrt(2.0 / D));
  assert_true(fabs(mean) < 6 * z * C / sqrt((double)D));
  free(sum), free(clean);
  sim_free(&m);
}

int main(void) {
  if (ot_sodium_init()) return 1;
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_shamir),
      cmocka_unit_test(test_shamir_secrecy),
      cmocka_unit_test(test_masks_cancel),
      cmocka_unit_test(test_quantize),
      cmocka_unit_test(test_graph),
      cmocka_unit_test(test_exact_with_dropouts),
      cmocka_unit_test(test_cloud_view),
      cmocka_unit_test(test_bad_shares),
      cmocka_unit_test(test_replay_and_hostile),
      cmocka_unit_test(test_too_few_survivors),
      cmocka_unit_test(test_distributed_noise),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
