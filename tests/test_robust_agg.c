/* Robust aggregation (fed/ot_aggregate.c, issue 14): the norm bound on each update,
 * norm-clipped FedAvg, coordinate-wise trimmed mean and median on small synthetic
 * adapters with known answers and against a plain computation written here; the check
 * of the unmasked sum under secure aggregation; the session settings that select them.
 * The session-level case (a poisoned device among honest ones) is test_session's
 * test_poisoned_device. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_aggregate.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_safetensors.h"
#include "ot_session.h"
#include "ot_test_util.h"

/* A 10-float adapter: "a.weight" [2, 3] then "b.bias" [4]. */
#define DIM 10
static char *tmp;

static void write_adapter(const char *name, const float *v, char *path, size_t n) {
  snprintf(path, n, "%s/%s.safetensors", tmp, name);
  ot_st_writer *w = NULL;
  int64_t sa[2] = {2, 3}, sb[1] = {4};
  assert_int_equal(ot_st_writer_new(&w), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "a.weight", OT_DTYPE_F32, 2, sa, v), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "b.bias", OT_DTYPE_F32, 1, sb, v + 6), OT_OK);
  assert_int_equal(ot_st_writer_save(w, path), OT_OK);
  ot_st_writer_free(w);
}

static void read_adapter(const char *path, float *v) {
  ot_safetensors *st = NULL;
  assert_int_equal(ot_st_open(path, &st), OT_OK);
  assert_int_equal(ot_st_read_f32(st, ot_st_find(st, "a.weight"), v, 6), OT_OK);
  assert_int_equal(ot_st_read_f32(st, ot_st_find(st, "b.bias"), v + 6, 4), OT_OK);
  ot_st_close(st);
}

/* Aggregates n updates (flat values u[i]) on reference g with rule p into res. */
static int run(const ot_agg_params *p, const float *g, float u[][DIM], const double *w, int n, float *res,
               ot_agg_note *notes) {
  char ref[1200], out[1200], paths[16][1200], nm[32];
  const char *pp[16];
  write_adapter("ref", g, ref, sizeof ref);
  for (int i = 0; i < n; i++) {
    snprintf(nm, sizeof nm, "u%d", i);
    write_adapter(nm, u[i], paths[i], sizeof paths[i]);
    pp[i] = paths[i];
  }
  snprintf(out, sizeof out, "%s/out.safetensors", tmp);
  int rc = ot_aggregate(p, ref, pp, w, n, NULL, out, NULL, notes);
  if (rc == OT_OK) read_adapter(out, res);
  return rc;
}

static ot_agg_params rule(ot_agg_kind k, double max_norm) {
  ot_agg_params p = {.kind = k, .max_norm = max_norm, .trim = 0.1};
  return p;
}

static int setup(void **state) {
  (void)state;
  tmp = ot_test_tmpdir("robust_agg");
  return tmp ? 0 : -1;
}

static int teardown(void **state) {
  (void)state;
  free(tmp);
  return 0;
}

/* ---- the per-coordinate statistics ------------------------------------------------------ */

static void test_trim_count(void **state) {
  (void)state;
  /* floor(beta m), at least 1 from 3 values on, never the middle one */
  const struct {
    int m;
    double beta;
    int k;
  } c[] = {{0, 0.1, 0},    {1, 0.1, 0},   {2, 0.1, 0},  {2, 0.49, 0}, {3, 0.1, 1},
           {4, 0.1, 1},    {9, 0.1, 1},   {10, 0.1, 1}, {20, 0.1, 2}, {29, 0.1, 2},
           {20, 0.35f, 7}, {10, 0.49, 4}, {3, 0.49, 1}, {5, 0.49, 2}};
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    int k = ot_agg_trim_count(c[i].m, c[i].beta);
    if (k != c[i].k) fail_msg("m %d beta %g: trimmed %d, expected %d", c[i].m, c[i].beta, k, c[i].k);
  }
}

static void test_median_counts(void **state) {
  (void)state;
  double odd[] = {3, -1, 2}, even[] = {4, 1, 3, 2}, one[] = {7}, dup[] = {5, 5, 1, 5},
         neg[] = {-2, -8, 1e30, -3};
  assert_true(ot_agg_median(odd, 3) == 2);
  assert_true(ot_agg_median(even, 4) == 2.5); /* the mean of the middle two */
  assert_true(ot_agg_median(one, 1) == 7);
  assert_true(ot_agg_median(dup, 4) == 5);
  assert_true(ot_agg_median(neg, 4) == -2.5); /* an outlier moves it by one rank only */
}

static void test_trimmed_mean_ties(void **state) {
  (void)state;
  double a[] = {9, 1, 1, 9, 1}, b[] = {2, 2, 2, 2}, c[] = {100, 5, 0, 5, 5}, d[] = {4, 1, 3, 2, 6, 5};
  assert_true(fabs(ot_agg_trimmed_mean(a, 5, 1) - 11.0 / 3) < 1e-15); /* one of the tied 1s and 9s drops */
  assert_true(ot_agg_trimmed_mean(b, 4, 1) == 2);
  assert_true(ot_agg_trimmed_mean(c, 5, 1) == 5);
  assert_true(ot_agg_trimmed_mean(d, 6, 2) == 3.5);
  assert_true(ot_agg_trimmed_mean(d, 6, 0) == 3.5); /* k 0: the mean */
}

/* ---- the rules on adapter files --------------------------------------------------------- */

static void test_median_files(void **state) {
  (void)state;
  float g[DIM] = {0}, u[4][DIM], res[DIM];
  double w[4] = {1, 1, 1, 1};
  for (int k = 0; k < DIM; k++) {
    g[k] = 0.5f;
    u[0][k] = (float)k, u[1][k] = (float)(-k), u[2][k] = 0.25f * (float)k, u[3][k] = 100;
  }
  ot_agg_params p = rule(OT_AGG_MEDIAN, 0);
  /* odd: the middle value of each coordinate */
  assert_int_equal(run(&p, g, u, w, 3, res, NULL), OT_OK);
  for (int k = 0; k < DIM; k++) assert_true(res[k] == 0.25f * (float)k);
  /* even: the mean of the middle two (tokens do not weigh) */
  double w2[4] = {1, 1000, 1, 1};
  assert_int_equal(run(&p, g, u, w2, 4, res, NULL), OT_OK);
  for (int k = 0; k < DIM; k++) assert_true(res[k] == (float)((0.25 * k + k) / 2));
}

static void test_trimmed_files(void **state) {
  (void)state;
  float g[DIM] = {0}, u[5][DIM], res[DIM];
  double w[5] = {1, 2, 3, 4, 5};
  for (int k = 0; k < DIM; k++) {
    /* ties: three updates agree on coordinate k, one far below, one far above */
    u[0][k] = u[1][k] = u[2][k] = (float)k;
    u[3][k] = -1e20f;
    u[4][k] = 1e20f;
  }
  ot_agg_params p = rule(OT_AGG_TRIMMED, 0);
  assert_int_equal(run(&p, g, u, w, 5, res, NULL), OT_OK);
  for (int k = 0; k < DIM; k++) assert_true(res[k] == (float)k);
  /* beta 0.4 of 5: 2 per side, the median */
  u[1][0] = 3, u[2][0] = 4;
  p.trim = 0.4;
  assert_int_equal(run(&p, g, u, w, 5, res, NULL), OT_OK);
  assert_true(res[0] == 3);
}

static void test_clipped_fedavg_known(void **state) {
  (void)state;
  /* g = 1; update 0 moves coordinate 0 by 3 and 1 by 4 (norm 5), update 1 moves
   * coordinate 2 by 1 (norm 1). Bound 2.5: update 0 becomes (1.5, 2), update 1 stays.
   * Tokens 1 and 3: result = g + (1 * (1.5, 2, 0) + 3 * (0, 0, 1)) / 4. */
  float g[DIM], u[2][DIM], res[DIM];
  for (int k = 0; k < DIM; k++) g[k] = u[0][k] = u[1][k] = 1;
  u[0][0] += 3, u[0][1] += 4, u[1][2] += 1;
  double w[2] = {1, 3};
  ot_agg_note notes[2];
  ot_agg_params p = rule(OT_AGG_CLIP, 2.5);
  assert_int_equal(run(&p, g, u, w, 2, res, notes), OT_OK);
  assert_int_equal(notes[0].fate, OT_UPD_CLIPPED);
  assert_true(notes[0].norm == 5);
  assert_int_equal(notes[1].fate, OT_UPD_USED);
  float want[DIM];
  for (int k = 0; k < DIM; k++) want[k] = 1;
  want[0] = 1 + 1.5f / 4, want[1] = 1 + 2.0f / 4, want[2] = 1 + 3.0f / 4;
  for (int k = 0; k < DIM; k++) assert_true(fabsf(res[k] - want[k]) < 1e-7f);
  /* a bound that clips nothing: plain FedAvg */
  p.max_norm = 10;
  assert_int_equal(run(&p, g, u, w, 2, res, notes), OT_OK);
  assert_int_equal(notes[0].fate, OT_UPD_USED);
  assert_true(fabsf(res[0] - 1.75f) < 1e-7f && fabsf(res[1] - 2) < 1e-7f && fabsf(res[2] - 1.75f) < 1e-7f);
  /* fedavg-clip without a bound is refused */
  p.max_norm = 0;
  assert_int_equal(run(&p, g, u, w, 2, res, NULL), OT_ERR_INVALID);
}

/* Random updates, one of them poisoned (x 1e30), every rule against the plain computation
 * written here in double. */
static void test_rules_independent(void **state) {
  (void)state;
  enum { N = 7 };
  float g[DIM], u[N][DIM], res[DIM];
  double w[N];
  uint32_t s = 12345;
#define RND() ((s = s * 1664525u + 1013904223u), (double)(s >> 8) / (1 << 24) - 0.5)
  for (int k = 0; k < DIM; k++) g[k] = (float)RND();
  for (int i = 0; i < N; i++) {
    w[i] = 100 + 400 * (RND() + 0.5);
    for (int k = 0; k < DIM; k++) u[i][k] = g[k] + (float)(0.3 * RND());
  }
  for (int k = 0; k < DIM; k++) u[N - 1][k] = (float)(u[N - 1][k] * 1e30);
  double bound = 0.3, norms[N];
  for (int i = 0; i < N; i++) {
    double ss = 0;
    for (int k = 0; k < DIM; k++) ss += ((double)u[i][k] - g[k]) * ((double)u[i][k] - g[k]);
    norms[i] = sqrt(ss);
    fprintf(stderr, "update %d: norm %.4g\n", i, norms[i]);
  }
  ot_agg_note notes[N];
  for (int kind = OT_AGG_FEDAVG; kind < OT_AGG_NKIND; kind++) {
    if (kind == OT_AGG_FEDADAM) continue;
    ot_agg_params p = rule((ot_agg_kind)kind, bound);
    p.trim = 0.3; /* 2 of 6 per side */
    assert_int_equal(run(&p, g, u, w, N, res, notes), OT_OK);
    /* the same by hand: which are used, then the rule */
    int used[N], m = 0, clipped = 0;
    for (int i = 0; i < N; i++) {
      used[i] = kind == OT_AGG_CLIP || norms[i] <= bound;
      m += used[i];
      int want = !used[i]                                    ? OT_UPD_REFUSED
                 : (kind == OT_AGG_CLIP && norms[i] > bound) ? OT_UPD_CLIPPED
                                                             : OT_UPD_USED;
      clipped += want == OT_UPD_CLIPPED;
      assert_int_equal(notes[i].fate, want);
      assert_true(fabs(notes[i].norm - norms[i]) <= 1e-6 * norms[i]);
    }
    assert_int_equal(notes[N - 1].fate, kind == OT_AGG_CLIP ? OT_UPD_CLIPPED : OT_UPD_REFUSED);
    double max_err = 0;
    for (int k = 0; k < DIM; k++) {
      double want = 0, ws = 0, col[N];
      int j = 0;
      for (int i = 0; i < N; i++) {
        if (!used[i]) continue;
        double d = (double)u[i][k] - g[k], c = norms[i] > bound && kind == OT_AGG_CLIP ? bound / norms[i] : 1;
        want += w[i] * (kind == OT_AGG_CLIP ? g[k] + c * d : u[i][k]);
        ws += w[i];
        col[j++] = u[i][k];
      }
      want /= ws;
      if (kind == OT_AGG_MEDIAN || kind == OT_AGG_TRIMMED) {
        /* sorted by selection, then the middle ones */
        for (int a = 0; a < m; a++)
          for (int b = a + 1; b < m; b++)
            if (col[b] < col[a]) {
              double t = col[a];
              col[a] = col[b], col[b] = t;
            }
        int t = (int)(0.3 * m + 1e-9); /* trimmed per side */
        if (m >= 3 && t < 1) t = 1;
        if (t > (m - 1) / 2) t = (m - 1) / 2;
        int cnt = m - 2 * t;
        if (kind == OT_AGG_MEDIAN) t = (m - 1) / 2, cnt = 2 - m % 2;
        want = 0;
        for (int a = t; a < t + cnt; a++) want += col[a];
        want /= cnt;
      }
      double e = fabs(res[k] - want);
      if (e > max_err) max_err = e;
    }
    fprintf(stderr, "%-12s %d of %d used (%d clipped), max abs error vs the plain computation %.2e\n",
            ot_agg_name((ot_agg_kind)kind), m, N, clipped, max_err);
    assert_true(max_err < 1e-6);
  }
#undef RND
}

/* ---- the norm bound --------------------------------------------------------------------- */

static void test_bound_refuses(void **state) {
  (void)state;
  float g[DIM], u[3][DIM], res[DIM], honest[DIM];
  double w[3] = {512, 512, 512};
  for (int k = 0; k < DIM; k++) {
    g[k] = 0.1f * (float)k;
    u[0][k] = g[k] + 0.01f, u[1][k] = g[k] - 0.03f * (float)k, u[2][k] = 1e38f; /* the update */
  }
  ot_agg_note notes[3];
  /* the default bound: the 1e38 update is refused and logged as such; the result is
   * exactly the honest-only FedAvg */
  ot_agg_params p = rule(OT_AGG_FEDAVG, 1e6);
  assert_int_equal(run(&p, g, u, w, 2, honest, NULL), OT_OK);
  assert_int_equal(run(&p, g, u, w, 3, res, notes), OT_OK);
  assert_int_equal(notes[2].fate, OT_UPD_REFUSED);
  assert_true(notes[2].norm > 1e38);
  assert_int_equal(notes[0].fate, OT_UPD_USED);
  assert_memory_equal(res, honest, sizeof res);
  /* no bound: what FedAvg did before (the aggregate is 3.3e37) */
  p.max_norm = 0;
  assert_int_equal(run(&p, g, u, w, 3, res, notes), OT_OK);
  assert_int_equal(notes[2].fate, OT_UPD_USED);
  assert_true(res[0] > 3e37f);
  /* a delta beyond float's range (3e38 against -3e38) is refused even without a bound */
  g[0] = -3e38f, u[2][0] = 3e38f;
  assert_int_equal(run(&p, g, u, w, 3, res, notes), OT_OK);
  assert_int_equal(notes[2].fate, OT_UPD_REFUSED);
  assert_true(isinf(notes[2].norm));
  /* every update refused: the adapter stays as it was */
  p.max_norm = 1e-9;
  assert_int_equal(run(&p, g, u, w, 3, res, notes), OT_OK);
  assert_memory_equal(res, g, sizeof res);
  /* NaN never reaches the rules: the file is refused (as at upload) */
  u[0][3] = NAN;
  p.max_norm = 0;
  assert_int_equal(run(&p, g, u, w, 1, res, NULL), OT_ERR_RANGE);
}

static void test_fedadam_all_refused_keeps_state(void **state) {
  (void)state;
  float g[DIM], u[1][DIM], res[DIM];
  for (int k = 0; k < DIM; k++) g[k] = 1, u[0][k] = 1e30f;
  char ref[1200], up[1200], s0[1200], s1[1200], out[1200];
  write_adapter("ref", g, ref, sizeof ref);
  write_adapter("u0", u[0], up, sizeof up);
  snprintf(s0, sizeof s0, "%s/state0.safetensors", tmp);
  snprintf(s1, sizeof s1, "%s/state1.safetensors", tmp);
  snprintf(out, sizeof out, "%s/out.safetensors", tmp);
  const char *pp[1] = {up};
  double w[1] = {1};
  ot_agg_params p = {.kind = OT_AGG_FEDADAM, .server_lr = 0.1f, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-3f};
  /* an accepted first step makes non-zero moments; the refused second keeps them */
  write_adapter("u0", (float[DIM]){2, 2, 2, 2, 2, 2, 2, 2, 2, 2}, up, sizeof up);
  assert_int_equal(ot_aggregate(&p, ref, pp, w, 1, NULL, out, s0, NULL), OT_OK);
  write_adapter("u0", u[0], up, sizeof up);
  p.max_norm = 1e6;
  ot_agg_note note;
  assert_int_equal(ot_aggregate(&p, ref, pp, w, 1, s0, out, s1, &note), OT_OK);
  assert_int_equal(note.fate, OT_UPD_REFUSED);
  read_adapter(out, res);
  assert_memory_equal(res, g, sizeof res);
  char *a = NULL, *b = NULL;
  size_t la, lb;
  assert_int_equal(ot_file_read_all(s0, 1 << 20, &a, &la), OT_OK);
  assert_int_equal(ot_file_read_all(s1, 1 << 20, &b, &lb), OT_OK);
  assert_int_equal(la, lb);
  assert_memory_equal(a, b, la);
  free(a);
  free(b);
}

static void test_secagg_sum_check(void **state) {
  (void)state;
  float sum[4] = {3, 0, 4, 0}; /* norm 5 */
  double norm = 0;
  assert_int_equal(ot_agg_check_sum(sum, 4, 3, 2.0, &norm), OT_OK); /* 5 <= 3 x 2 */
  assert_true(norm == 5);
  assert_int_equal(ot_agg_check_sum(sum, 4, 2, 2.0, &norm), OT_ERR_RANGE); /* 5 > 2 x 2 */
  assert_non_null(strstr(ot_error_detail(), "bound"));
  assert_int_equal(ot_agg_check_sum(sum, 4, 1, 0, &norm), OT_OK); /* no bound */
  sum[1] = INFINITY;
  assert_int_equal(ot_agg_check_sum(sum, 4, 3, 0, &norm), OT_ERR_RANGE); /* never non-finite */
  sum[1] = NAN;
  assert_int_equal(ot_agg_check_sum(sum, 4, 3, 1e6, &norm), OT_ERR_RANGE);
}

/* ---- session settings ------------------------------------------------------------------- */

static int cfg(const char *json, ot_session_cfg *c) {
  cJSON *j = cJSON_Parse(json);
  assert_non_null(j);
  int rc = ot_session_cfg_from_json(j, c);
  cJSON_Delete(j);
  return rc;
}

static void test_session_settings(void **state) {
  (void)state;
  ot_session_cfg c;
  assert_int_equal(cfg("{\"name\": \"s\", \"model\": \"m\"}", &c), OT_OK);
  assert_true(c.max_update_norm == 1e6f && c.trim_fraction == 0.1f && c.agg == OT_AGG_FEDAVG);
  assert_int_equal(
      cfg("{\"name\": \"s\", \"model\": \"m\", \"aggregation\": \"trimmed-mean\", \"trim_fraction\": "
          "0.2, \"max_update_norm\": 3, \"secagg\": \"off\", \"min_devices\": 3}",
          &c),
      OT_OK);
  assert_int_equal(c.agg, OT_AGG_TRIMMED);
  assert_true(c.max_update_norm == 3 && c.trim_fraction == 0.2f);
  /* the stored form reads back the same */
  cJSON *j = ot_session_cfg_to_json(&c);
  ot_session_cfg c2;
  assert_int_equal(ot_session_cfg_from_json(j, &c2), OT_OK);
  cJSON_Delete(j);
  assert_int_equal(c2.agg, OT_AGG_TRIMMED);
  assert_true(c2.max_update_norm == 3 && c2.trim_fraction == 0.2f);
  /* robust rules need plaintext updates: refused with secure aggregation, also by auto */
  assert_int_equal(
      cfg("{\"name\": \"s\", \"model\": \"m\", \"aggregation\": \"median\", \"min_devices\": 3}", &c),
      OT_ERR_INVALID);
  assert_non_null(strstr(ot_error_detail(), "secure aggregation hides"));
  assert_int_equal(
      cfg("{\"name\": \"s\", \"model\": \"m\", \"aggregation\": \"fedavg-clip\", \"secagg\": \"on\"}", &c),
      OT_ERR_INVALID);
  assert_int_equal(cfg("{\"name\": \"s\", \"model\": \"m\", \"aggregation\": \"median\"}", &c), OT_OK);
  /* fedavg-clip needs a bound; bounds and fractions in range; unknown rules named */
  assert_int_equal(cfg("{\"name\": \"s\", \"model\": \"m\", \"aggregation\": \"fedavg-clip\", "
                       "\"max_update_norm\": 0}",
                       &c),
                   OT_ERR_INVALID);
  assert_int_equal(cfg("{\"name\": \"s\", \"model\": \"m\", \"trim_fraction\": 0.5}", &c), OT_ERR_INVALID);
  assert_int_equal(cfg("{\"name\": \"s\", \"model\": \"m\", \"max_update_norm\": -1}", &c), OT_ERR_INVALID);
  assert_int_equal(cfg("{\"name\": \"s\", \"model\": \"m\", \"aggregation\": \"krum\"}", &c), OT_ERR_INVALID);
  assert_non_null(strstr(ot_error_detail(), "median"));
  /* the norm bound alone goes with secure aggregation (it bounds the sum there) */
  assert_int_equal(cfg("{\"name\": \"s\", \"model\": \"m\", \"min_devices\": 3, \"max_update_norm\": 2}", &c),
                   OT_OK);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_trim_count),
      cmocka_unit_test(test_median_counts),
      cmocka_unit_test(test_trimmed_mean_ties),
      cmocka_unit_test(test_median_files),
      cmocka_unit_test(test_trimmed_files),
      cmocka_unit_test(test_clipped_fedavg_known),
      cmocka_unit_test(test_rules_independent),
      cmocka_unit_test(test_bound_refuses),
      cmocka_unit_test(test_fedadam_all_refused_keeps_state),
      cmocka_unit_test(test_secagg_sum_check),
      cmocka_unit_test(test_session_settings),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
