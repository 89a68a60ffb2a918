/* Differential privacy: the RDP accountant against an independent mpmath reference
 * (tests/ref/dp_ref.py: direct sums at 60 digits, and the exact privacy profile of the
 * Gaussian mechanism), budget checks, noise calibration, clipping, and the measured
 * distribution of the noise, central and distributed over devices. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_dp.h"
#include "ot_error.h"
#include "ot_test_util.h"

static char g_ref[1024];

static int setup(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("dp_ref");
  snprintf(g_ref, sizeof g_ref, "%s/dp_ref.txt", dir);
  int rc = ot_test_ref("dp_ref.py", dir);
  free(dir);
  return rc;
}

static FILE *open_ref(void) {
  FILE *f = fopen(g_ref, "r");
  assert_non_null(f);
  return f;
}

static void test_rdp_matches_reference(void **state) {
  (void)state;
  FILE *f = open_ref();
  char kind[16];
  double q, z, ref, worst = 0;
  unsigned a;
  int cases = 0;
  char line[512];
  while (fgets(line, sizeof line, f)) {
    if (sscanf(line, "%15s %lf %lf %u %lf", kind, &q, &z, &a, &ref) != 5 || strcmp(kind, "rdp")) continue;
    double got;
    assert_int_equal(ot_dp_rdp(q, z, a, &got), OT_OK);
    double rel = fabs(got - ref) / fabs(ref);
    if (rel > worst) worst = rel;
    if (rel > 1e-9)
      fail_msg("rdp(q=%g, z=%g, order %u) = %.17g, reference %.17g (rel %.2e)", q, z, a, got, ref, rel);
    cases++;
  }
  fclose(f);
  printf("RDP of the subsampled Gaussian: %d cases, worst relative error %.2e (bound 1e-9)\n", cases, worst);
  assert_int_equal(cases, 300);
}

static void test_epsilon_matches_reference(void **state) {
  (void)state;
  FILE *f = open_ref();
  char line[512], kind[16];
  int cases = 0, exact_cases = 0;
  while (fgets(line, sizeof line, f)) {
    double q, z, delta, ref, exact, ref_rdp;
    unsigned rounds;
    if (sscanf(line, "%15s", kind) != 1) continue;
    if (!strcmp(kind, "eps") && sscanf(line, "%*s %lf %lf %u %lf %lf", &q, &z, &rounds, &delta, &ref) == 5) {
      ot_dp_accountant acc;
      ot_dp_accountant_init(&acc);
      /* compose round by round, as a session does */
      for (unsigned r = 0; r < rounds; r += rounds >= 100 ? rounds / 100 : 1)
        assert_int_equal(ot_dp_accountant_step(&acc, q, z, rounds >= 100 ? rounds / 100 : 1), OT_OK);
      assert_int_equal(acc.rounds, rounds);
      double eps;
      uint32_t order;
      assert_int_equal(ot_dp_epsilon(&acc, delta, &eps, &order), OT_OK);
      printf("q=%g z=%g rounds=%u delta=%g: epsilon %.6f (order %u), reference %.6f\n", q, z, rounds, delta,
             eps, order, ref);
      assert_true(fabs(eps - ref) <= 1e-9 * ref);
      cases++;
    } else if (!strcmp(kind, "exact") &&
               sscanf(line, "%*s %lf %u %lf %lf %lf", &z, &rounds, &delta, &exact, &ref_rdp) == 5) {
      ot_dp_accountant acc;
      ot_dp_accountant_init(&acc);
      assert_int_equal(ot_dp_accountant_step(&acc, 1.0, z, rounds), OT_OK);
      double eps;
      assert_int_equal(ot_dp_epsilon(&acc, delta, &eps, NULL), OT_OK);
      printf("Gaussian z=%g x %u rounds, delta=%g: RDP epsilon %.4f, exact %.4f (ratio %.3f)\n", z, rounds,
             delta, eps, exact, eps / exact);
      assert_true(fabs(eps - ref_rdp) <= 1e-9 * ref_rdp);
      /* a valid bound: never below the exact profile, and not loose by more than 15% here */
      assert_true(eps >= exact);
      assert_true(eps <= 1.15 * exact);
      exact_cases++;
    }
  }
  fclose(f);
  assert_int_equal(cases, 6);
  assert_int_equal(exact_cases, 6);
}

static void test_budget_and_calibration(void **state) {
  (void)state;
  FILE *f = open_ref();
  char line[512];
  int cases = 0;
  while (fgets(line, sizeof line, f)) {
    double q, eps, delta, zref;
    unsigned rounds;
    if (sscanf(line, "noise %lf %u %lf %lf %lf", &q, &rounds, &eps, &delta, &zref) != 5) continue;
    double z;
    assert_int_equal(ot_dp_find_noise(q, rounds, eps, delta, &z), OT_OK);
    printf("target epsilon %g over %u rounds at q=%g: noise multiplier %.6f (reference %.6f)\n", eps, rounds,
           q, z, zref);
    assert_true(fabs(z - zref) <= 1e-6 * zref);
    /* the budget is met with z and missed just below it */
    ot_dp_accountant acc;
    ot_dp_accountant_init(&acc);
    int exceeds = -1;
    double next = 0;
    for (unsigned r = 0; r < rounds; r++) {
      assert_int_equal(ot_dp_would_exceed(&acc, q, z, eps, delta, &exceeds, &next), OT_OK);
      assert_int_equal(exceeds, 0);
      assert_int_equal(ot_dp_accountant_step(&acc, q, z, 1), OT_OK);
    }
    double spent;
    assert_int_equal(ot_dp_epsilon(&acc, delta, &spent, NULL), OT_OK);
    assert_true(fabs(spent - next) < 1e-12 * next);
    assert_true(spent <= eps && spent > eps * (1 - 1e-5));
    /* the session stops here: one more round would exceed the budget */
    assert_int_equal(ot_dp_would_exceed(&acc, q, z, eps, delta, &exceeds, &next), OT_OK);
    assert_int_equal(exceeds, 1);
    assert_true(next > eps);
    cases++;
  }
  fclose(f);
  assert_int_equal(cases, 3);
  /* hostile arguments */
  double x;
  assert_int_equal(ot_dp_rdp(1.5, 1, 2, &x), OT_ERR_INVALID);
  assert_int_equal(ot_dp_rdp(0.1, 0, 2, &x), OT_ERR_INVALID);
  assert_int_equal(ot_dp_find_noise(0.01, 100, 0, 1e-5, &x), OT_ERR_INVALID);
  assert_int_equal(ot_dp_find_noise(1.0, 1000000, 1e-4, 1e-5, &x), OT_ERR_RANGE);
  ot_dp_accountant acc;
  ot_dp_accountant_init(&acc);
  assert_int_equal(ot_dp_epsilon(&acc, 0, &x, NULL), OT_ERR_INVALID);
  assert_int_equal(ot_dp_epsilon(&acc, 1e-5, &x, NULL), OT_OK);
  assert_true(x == 0); /* no round, no loss */
}

static double phi(double x) { return 0.5 * erfc(-x / sqrt(2.0)); }

/* Mean, variance, kurtosis and the CDF at a few points of n samples vs N(0, s^2). */
static void check_gaussian(const float *v, size_t n, double s, const char *what) {
  double m = 0, m2 = 0, m4 = 0;
  for (size_t i = 0; i < n; i++) m += v[i];
  m /= n;
  for (size_t i = 0; i < n; i++) {
    double d = v[i] - m;
    m2 += d * d;
    m4 += d * d * d * d;
  }
  m2 /= n, m4 /= n;
  double kurt = m4 / (m2 * m2);
  printf("%s: n=%zu mean %.5f variance %.5f (target %.5f, ratio %.4f) kurtosis %.3f\n", what, n, m, m2, s * s,
         m2 / (s * s), kurt);
  /* standard errors: mean s/sqrt(n), variance s^2 sqrt(2/n), kurtosis sqrt(24/n): 6 of them */
  assert_true(fabs(m) < 6 * s / sqrt((double)n));
  assert_true(fabs(m2 / (s * s) - 1) < 6 * sqrt(2.0 / n));
  assert_true(fabs(kurt - 3) < 6 * sqrt(24.0 / n));
  const double pts[] = {-2.5, -1, 0, 0.5, 2};
  for (size_t p = 0; p < sizeof pts / sizeof pts[0]; p++) {
    size_t below = 0;
    for (size_t i = 0; i < n; i++) below += v[i] < pts[p] * s;
    double frac = (double)below / n, want = phi(pts[p]);
    assert_true(fabs(frac - want) < 6 * sqrt(want * (1 - want) / n));
  }
}

static void test_noise_distribution(void **state) {
  (void)state;
  enum { N = 1 << 21 };
  float *v = calloc(N, sizeof(float));
  ot_dp_rng r;
  assert_int_equal(ot_dp_rng_init(&r, NULL), OT_OK);
  double z = 1.1, clip = 0.7;
  assert_int_equal(ot_dp_add_gaussian(&r, v, N, ot_dp_central_stddev(z, clip)), OT_OK);
  check_gaussian(v, N, z * clip, "central noise");
  /* distributed: 16 devices each add their share; the sum carries the full variance */
  const uint32_t m = 16;
  float *sum = calloc(N / 4, sizeof(float)), *dev = malloc(sizeof(float) * (N / 4));
  for (uint32_t d = 0; d < m; d++) {
    ot_dp_rng rd;
    assert_int_equal(ot_dp_rng_init(&rd, NULL), OT_OK);
    memset(dev, 0, sizeof(float) * (N / 4));
    assert_int_equal(ot_dp_add_gaussian(&rd, dev, N / 4, ot_dp_device_stddev(z, clip, m)), OT_OK);
    for (size_t i = 0; i < N / 4; i++) sum[i] += dev[i];
    ot_dp_rng_wipe(&rd);
  }
  check_gaussian(sum, N / 4, z * clip, "distributed noise, sum of 16 devices");
  /* a fixed seed reproduces; a different seed does not */
  ot_dp_rng a, b;
  uint8_t s1[32] = {1}, s2[32] = {2};
  float x[100] = {0}, y[100] = {0}, w[100] = {0};
  ot_dp_rng_init(&a, s1), ot_dp_rng_init(&b, s1);
  ot_dp_add_gaussian(&a, x, 100, 1), ot_dp_add_gaussian(&b, y, 100, 1);
  assert_memory_equal(x, y, sizeof x);
  ot_dp_rng_init(&b, s2);
  ot_dp_add_gaussian(&b, w, 100, 1);
  assert_memory_not_equal(x, w, sizeof x);
  free(v), free(sum), free(dev);
}

static void test_clip(void **state) {
  (void)state;
  float v[1000], orig[1000];
  for (int i = 0; i < 1000; i++) orig[i] = v[i] = (float)sin(i * 0.37) * 0.2f;
  double norm, n2 = 0;
  assert_int_equal(ot_dp_clip_l2(v, 1000, 1.0, &norm), OT_OK);
  for (int i = 0; i < 1000; i++) n2 += (double)v[i] * v[i];
  assert_true(norm > 1.0);
  assert_true(fabs(sqrt(n2) - 1.0) < 1e-6);
  for (int i = 0; i < 1000; i++) assert_true(fabs(v[i] - orig[i] / norm) < 1e-7); /* same direction */
  memcpy(v, orig, sizeof v);
  assert_int_equal(ot_dp_clip_l2(v, 1000, 100.0, &norm), OT_OK);
  assert_memory_equal(v, orig, sizeof v); /* within the bound: untouched */
  v[3] = NAN;
  assert_int_equal(ot_dp_clip_l2(v, 1000, 1.0, &norm), OT_ERR_RANGE);
  assert_int_equal(ot_dp_clip_l2(v, 1000, 0.0, &norm), OT_ERR_INVALID);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_rdp_matches_reference),
      cmocka_unit_test(test_epsilon_matches_reference),
      cmocka_unit_test(test_budget_and_calibration),
      cmocka_unit_test(test_noise_distribution),
      cmocka_unit_test(test_clip),
  };
  return cmocka_run_group_tests(tests, setup, NULL);
}
