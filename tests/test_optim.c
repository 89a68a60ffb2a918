/* Learning-rate schedules and optimizer state checkpoints. (The update rules themselves
 * are checked against PyTorch in test_gpt2_ref.) */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_optim.h"
#include "ot_test_util.h"

static void test_schedules(void **state) {
  (void)state;
  ot_lr_schedule s = {
      .lr = 1.0f, .warmup_steps = 4, .total_steps = 14, .decay = OT_LR_CONSTANT, .min_lr_ratio = 0.1f};
  /* linear warm-up from lr/warmup */
  assert_true(fabsf(ot_lr_at(&s, 0) - 0.25f) < 1e-6f);
  assert_true(fabsf(ot_lr_at(&s, 3) - 1.0f) < 1e-6f);
  assert_true(fabsf(ot_lr_at(&s, 10) - 1.0f) < 1e-6f);
  s.decay = OT_LR_LINEAR;
  assert_true(fabsf(ot_lr_at(&s, 4) - 1.0f) < 1e-6f);
  assert_true(fabsf(ot_lr_at(&s, 9) - 0.55f) < 1e-6f); /* halfway: 0.1 + 0.9 * 0.5 */
  assert_true(fabsf(ot_lr_at(&s, 14) - 0.1f) < 1e-6f);
  assert_true(fabsf(ot_lr_at(&s, 100) - 0.1f) < 1e-6f); /* floor after the end */
  s.decay = OT_LR_COSINE;
  assert_true(fabsf(ot_lr_at(&s, 4) - 1.0f) < 1e-6f);
  assert_true(fabsf(ot_lr_at(&s, 9) - 0.55f) < 1e-6f); /* cos(pi/2) = 0 */
  /* step 6 is 20% into the decay */
  assert_true(fabsf(ot_lr_at(&s, 6) - (0.1f + 0.9f * 0.5f * (1.0f + cosf((float)M_PI * 0.2f)))) < 1e-5f);
  assert_true(fabsf(ot_lr_at(&s, 14) - 0.1f) < 1e-6f);
  for (int i = 5; i < 14; i++) assert_true(ot_lr_at(&s, i) < ot_lr_at(&s, i - 1)); /* decreasing */
  ot_lr_decay d;
  assert_int_equal(ot_lr_parse_decay("cosine", &d), OT_OK);
  assert_int_equal(d, OT_LR_COSINE);
  assert_int_equal(ot_lr_parse_decay("exp", &d), OT_ERR_INVALID);
}

static void make_params(ot_param *p, float *data, float *grad) {
  memset(p, 0, 2 * sizeof *p);
  snprintf(p[0].name, sizeof p[0].name, "a.weight");
  snprintf(p[1].name, sizeof p[1].name, "a.bias");
  p[0].numel = 6;
  p[1].numel = 3;
  p[0].data = data;
  p[1].data = data + 6;
  p[0].grad = grad;
  p[1].grad = grad + 6;
  p[0].trainable = p[1].trainable = 1;
  p[0].decay = 1;
}

/* Saved state reloads bitwise into a fresh optimizer; the next steps then agree exactly. */
static void test_state_round_trip_and_refusals(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("optim");
  char path[600];
  snprintf(path, sizeof path, "%s/opt.safetensors", dir);
  ot_backend *be;
  assert_int_equal(ot_backend_cpu_create(1, &be), OT_OK);
  float d1[9], g1[9], d2[9], g2[9];
  ot_param p1[2], p2[2];
  for (int i = 0; i < 9; i++) d1[i] = d2[i] = 0.1f * (float)i - 0.3f;
  make_params(p1, d1, g1);
  make_params(p2, d2, g2);
  ot_optim_config c;
  ot_optim_config_default(&c, OT_OPTIM_ADAMW);
  c.weight_decay = 0.1f;
  ot_optimizer *o1, *o2;
  assert_int_equal(ot_optimizer_create(&c, be, p1, 2, &o1), OT_OK);
  assert_int_equal(ot_optimizer_create(&c, be, p2, 2, &o2), OT_OK);
  for (int s = 0; s < 3; s++) {
    for (int i = 0; i < 9; i++) g1[i] = sinf((float)(i + 3 * s));
    assert_int_equal(ot_optimizer_step(o1, 1e-2f, NULL), OT_OK);
  }
  assert_int_equal(ot_optimizer_save(o1, path), OT_OK);
  memcpy(d2, d1, sizeof d1);
  assert_int_equal(ot_optimizer_load(o2, path), OT_OK);
  assert_int_equal(ot_optimizer_steps_done(o2), 3);
  for (int i = 0; i < 9; i++) g1[i] = g2[i] = cosf((float)i);
  float n1, n2;
  assert_int_equal(ot_optimizer_step(o1, 1e-2f, &n1), OT_OK);
  assert_int_equal(ot_optimizer_step(o2, 1e-2f, &n2), OT_OK);
  assert_memory_equal(d1, d2, sizeof d1);
  assert_true(n1 == n2 && n1 > 0);
  for (int i = 0; i < 9; i++) assert_true(g1[i] == 0.0f); /* consumed */

  /* an SGD optimizer refuses AdamW state; a truncated file changes nothing */
  ot_optim_config cs;
  ot_optim_config_default(&cs, OT_OPTIM_SGD);
  cs.momentum = 0.9f;
  ot_optimizer *o3;
  assert_int_equal(ot_optimizer_create(&cs, be, p2, 2, &o3), OT_OK);
  assert_int_equal(ot_optimizer_load(o3, path), OT_ERR_MISMATCH);
  assert_int_equal(ot_optimizer_steps_done(o3), 0);
  assert_int_equal(ot_test_system("truncate -s 100 '%s'", path), 0);
  assert_int_not_equal(ot_optimizer_load(o2, path), OT_OK);
  assert_int_equal(ot_optimizer_steps_done(o2), 4);
  /* a non-finite gradient is an error, not a silent NaN model */
  g1[0] = NAN;
  float before = d1[0];
  assert_int_equal(ot_optimizer_step(o1, 1e-2f, &n1), OT_ERR_RANGE);
  assert_true(d1[0] == before);
  ot_optimizer_free(o1);
  ot_optimizer_free(o2);
  ot_optimizer_free(o3);
  ot_backend_free(be);
  free(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_schedules),
      cmocka_unit_test(test_state_round_trip_and_refusals),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
