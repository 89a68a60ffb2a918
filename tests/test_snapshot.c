/* Training snapshots: round trip, the crash window of a swap without RENAME_EXCHANGE,
 * the running mean of tail averaging, and refusals that leave the model untouched. (Kill -9 end to end:
 * test_cloud_cli.) */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_snapshot.h"
#include "ot_test_util.h"

typedef struct {
  ot_backend *be;
  ot_model *m;
  ot_optimizer *opt;
} net;

static void net_make(net *n, uint64_t seed) {
  ot_model_config cfg = {.n_layer = 2,
                         .n_head = 2,
                         .n_embd = 8,
                         .vocab_size = 13,
                         .n_positions = 8,
                         .layer_norm_epsilon = 1e-5f};
  assert_int_equal(ot_backend_cpu_create(1, &n->be), OT_OK);
  assert_int_equal(ot_model_create(&cfg, n->be, &n->m), OT_OK);
  assert_int_equal(ot_model_init_random(n->m, seed), OT_OK);
  ot_model_set_all_trainable(n->m, 0);
  for (int k = 0; k < OT_R_COUNT; k++)
    if (ot_model_block_param_index(n->m, 1, k) >= 0)
      ot_model_param(n->m, ot_model_block_param_index(n->m, 1, k))->trainable = 1;
  assert_int_equal(ot_model_prepare(n->m, 1, 4, 1), OT_OK);
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  assert_int_equal(
      ot_optimizer_create(&oc, n->be, ot_model_param(n->m, 0), ot_model_param_count(n->m), &n->opt), OT_OK);
}

static void net_free(net *n) {
  ot_optimizer_free(n->opt);
  ot_model_free(n->m);
  ot_backend_free(n->be);
}

static void train_step(net *n) {
  int32_t in[4] = {1, 2, 3, 4}, tg[4] = {2, 3, 4, 5};
  float loss;
  assert_int_equal(ot_model_forward(n->m, in, tg, 1, 4, &loss), OT_OK);
  assert_int_equal(ot_model_backward(n->m), OT_OK);
  assert_int_equal(ot_optimizer_step(n->opt, 1e-2f, NULL), OT_OK);
}

static int same_weights(ot_model *a, ot_model *b) {
  for (int i = 0; i < ot_model_param_count(a); i++)
    if (memcmp(ot_model_param(a, i)->data, ot_model_param(b, i)->data,
               ot_model_param(a, i)->numel * sizeof(float)))
      return 0;
  return 1;
}

static void test_round_trip_and_swap_window(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("snapshot");
  net a, b;
  net_make(&a, 1);
  net_make(&b, 1);
  assert_false(ot_snapshot_exists(dir));
  ot_snapshot_state st = {3, 17, 99, 1, 4, 2.5, 1, NULL, 0}, got = {.batch = 1, .seq_len = 4};
  train_step(&a);
  assert_int_equal(ot_snapshot_save(dir, a.m, a.opt, &st), OT_OK);
  train_step(&a);
  st.step = 4;
  assert_int_equal(ot_snapshot_save(dir, a.m, a.opt, &st), OT_OK); /* replaces the first */
  assert_int_equal(ot_test_system("ls -d '%s'/train_state* | wc -l | grep -qx 1", dir), 0); /* no leftovers */
  assert_false(same_weights(a.m, b.m));
  assert_int_equal(ot_snapshot_load(dir, b.m, b.opt, 100, &got), OT_OK);
  assert_true(same_weights(a.m, b.m));
  assert_int_equal(got.step, 4);
  assert_int_equal((int)got.pos, 17);
  assert_int_equal((int)got.rng, 99);
  assert_true(got.best == 2.5 && got.bad == 1);
  assert_int_equal(ot_optimizer_steps_done(b.opt), 2);
  /* killed between the two renames of a swap: train_state.old is still complete */
  assert_int_equal(ot_test_system("mv '%s/train_state' '%s/train_state.old'", dir, dir), 0);
  assert_true(ot_snapshot_exists(dir));
  got = (ot_snapshot_state){.batch = 1, .seq_len = 4};
  assert_int_equal(ot_snapshot_load(dir, b.m, b.opt, 100, &got), OT_OK);
  assert_int_equal(got.step, 4);
  /* and the next save cleans the window up */
  assert_int_equal(ot_snapshot_save(dir, a.m, a.opt, &st), OT_OK);
  assert_int_equal(ot_test_system("test -d '%s/train_state' && ! test -e '%s/train_state.old'", dir, dir), 0);
  net_free(&a);
  net_free(&b);
  free(dir);
}

static void test_refusals_leave_model_untouched(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("snapshot_bad");
  net a, b;
  net_make(&a, 1);
  net_make(&b, 2);
  train_step(&a);
  ot_snapshot_state st = {1, 5, 0, 1, 4, -1.0, 0, NULL, 0};
  assert_int_equal(ot_snapshot_save(dir, a.m, a.opt, &st), OT_OK);
  ot_model *copy = NULL;
  ot_model_config cfg = *ot_model_cfg(b.m);
  assert_int_equal(ot_model_create(&cfg, b.be, &copy), OT_OK);
  assert_int_equal(ot_model_init_random(copy, 2), OT_OK);
  ot_snapshot_state got = {.batch = 2, .seq_len = 4}; /* another batch size */
  assert_int_equal(ot_snapshot_load(dir, b.m, b.opt, 100, &got), OT_ERR_MISMATCH);
  got = (ot_snapshot_state){.batch = 1, .seq_len = 4};
  assert_int_equal(ot_snapshot_load(dir, b.m, b.opt, 5, &got), OT_ERR_MISMATCH); /* data shorter than pos */
  /* another set of trainable tensors */
  ot_model_param(b.m, 0)->trainable = 1;
  assert_int_equal(ot_snapshot_load(dir, b.m, b.opt, 100, &got), OT_ERR_MISMATCH);
  ot_model_param(b.m, 0)->trainable = 0;
  /* a corrupted weights file */
  assert_int_equal(ot_test_system("truncate -s 64 '%s/train_state/weights.safetensors'", dir), 0);
  assert_int_not_equal(ot_snapshot_load(dir, b.m, b.opt, 100, &got), OT_OK);
  assert_true(same_weights(b.m, copy));
  assert_int_equal(ot_optimizer_steps_done(b.opt), 0);
  ot_model_free(copy);
  net_free(&a);
  net_free(&b);
  free(dir);
}

static size_t trainable_numel(ot_model *m) {
  size_t n = 0;
  for (int i = 0; i < ot_model_param_count(m); i++)
    if (ot_model_param(m, i)->trainable) n += ot_model_param(m, i)->numel;
  return n;
}

/* The running mean travels with the snapshot once its window has begun, and only to a run
 * with the same window. */
static void test_running_mean(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("snapshot_mean");
  net a, b;
  net_make(&a, 1);
  net_make(&b, 1);
  size_t n = trainable_numel(a.m);
  float *mean = malloc(n * sizeof(float)), *got_mean = calloc(n, sizeof(float));
  assert_non_null(mean);
  assert_non_null(got_mean);
  for (size_t i = 0; i < n; i++) mean[i] = 0.25f * (float)i - 3.0f;
  train_step(&a);
  /* step 2 of a window from 3: no mean yet, and a run without averaging may resume it */
  ot_snapshot_state st = {2, 5, 0, 1, 4, -1.0, 0, mean, 3};
  assert_int_equal(ot_snapshot_save(dir, a.m, a.opt, &st), OT_OK);
  assert_int_equal(ot_test_system("! test -e '%s/train_state/average.safetensors'", dir), 0);
  ot_snapshot_state got = {.batch = 1, .seq_len = 4};
  assert_int_equal(ot_snapshot_load(dir, b.m, b.opt, 100, &got), OT_OK);
  /* step 4: the mean over steps 3 and 4 is saved and comes back bit for bit */
  st.step = 4;
  assert_int_equal(ot_snapshot_save(dir, a.m, a.opt, &st), OT_OK);
  got = (ot_snapshot_state){.batch = 1, .seq_len = 4, .avg = got_mean, .avg_from = 3};
  assert_int_equal(ot_snapshot_load(dir, b.m, b.opt, 100, &got), OT_OK);
  assert_memory_equal(got_mean, mean, n * sizeof(float));
  assert_true(same_weights(a.m, b.m)); /* the weights stay the running ones */
  /* another window, or none, would have another mean */
  memset(got_mean, 0, n * sizeof(float));
  got = (ot_snapshot_state){.batch = 1, .seq_len = 4, .avg = got_mean, .avg_from = 2};
  assert_int_equal(ot_snapshot_load(dir, b.m, b.opt, 100, &got), OT_ERR_MISMATCH);
  got = (ot_snapshot_state){.batch = 1, .seq_len = 4};
  assert_int_equal(ot_snapshot_load(dir, b.m, b.opt, 100, &got), OT_ERR_MISMATCH);
  /* nor may a run add a window that has begun without a mean */
  st = (ot_snapshot_state){4, 5, 0, 1, 4, -1.0, 0, NULL, 0};
  assert_int_equal(ot_snapshot_save(dir, a.m, a.opt, &st), OT_OK);
  got = (ot_snapshot_state){.batch = 1, .seq_len = 4, .avg = got_mean, .avg_from = 3};
  assert_int_equal(ot_snapshot_load(dir, b.m, b.opt, 100, &got), OT_ERR_MISMATCH);
  /* a lost mean is an error that leaves the model untouched */
  st = (ot_snapshot_state){4, 5, 0, 1, 4, -1.0, 0, mean, 3};
  assert_int_equal(ot_snapshot_save(dir, a.m, a.opt, &st), OT_OK);
  train_step(&a);
  assert_int_equal(ot_test_system("rm '%s/train_state/average.safetensors'", dir), 0);
  got = (ot_snapshot_state){.batch = 1, .seq_len = 4, .avg = got_mean, .avg_from = 3};
  assert_int_not_equal(ot_snapshot_load(dir, a.m, a.opt, 100, &got), OT_OK);
  assert_false(same_weights(a.m, b.m));
  assert_true(got_mean[1] == 0.0f);
  free(mean);
  free(got_mean);
  net_free(&a);
  net_free(&b);
  free(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_round_trip_and_swap_window),
      cmocka_unit_test(test_refusals_leave_model_untouched),
      cmocka_unit_test(test_running_mean),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
