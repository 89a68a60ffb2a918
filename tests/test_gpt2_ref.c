/* GPT-2 against an independent PyTorch implementation (tests/ref/gpt2_ref.py, float64):
 * logits, loss, every parameter gradient, frozen subsets, half-precision checkpoints,
 * AdamW and SGD trajectories; plus a finite-difference check that needs no PyTorch. */
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
#include "ot_model.h"
#include "ot_optim.h"
#include "ot_safetensors.h"
#include "ot_test_util.h"

/* fp32 against a float64 reference: errors are rounding, ~1e-6 relative. 1e-4 leaves
 * room for summation order, yet a wrong term (a missing bias, a transposed weight,
 * a scale off by a factor) moves errors to 1e-2 or more. */
#define REL_TOL 1e-4

static char *ref_dir;
static double worst_err; /* largest relative error seen, printed for the record */
static char cases[8][32];
static int n_cases;

static int setup(void **state) {
  (void)state;
  ref_dir = ot_test_tmpdir("gpt2_ref");
  if (ot_test_ref("gpt2_ref.py", ref_dir) != 0) return -1;
  char path[512];
  snprintf(path, sizeof path, "%s/cases.txt", ref_dir);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  while (n_cases < 8 && fscanf(f, "%31s", cases[n_cases]) == 1) n_cases++;
  fclose(f);
  return n_cases > 0 ? 0 : -1;
}

static int teardown(void **state) {
  (void)state;
  printf("largest relative error against PyTorch (float64): %.3g (tolerance %.0e)\n", worst_err, REL_TOL);
  free(ref_dir);
  return 0;
}

static void fixture_open(ot_test_case *fx, const char *name, const char *sub) {
  char dir[512], case_dir[512];
  snprintf(dir, sizeof dir, "%s/%s%s%s", ref_dir, name, sub ? "/" : "", sub ? sub : "");
  snprintf(case_dir, sizeof case_dir, "%s/%s", ref_dir, name);
  ot_test_case_open(fx, dir, case_dir);
}

static void check_close(const char *what, const char *cs, const float *got, const float *want, size_t n) {
  double e = ot_test_rel_err(got, want, n);
  double maxabs = 0, maxref = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs((double)got[i] - want[i]);
    if (d > maxabs) maxabs = d;
    if (fabs(want[i]) > maxref) maxref = fabs(want[i]);
  }
  if (e > worst_err) worst_err = e;
  if (!(e < REL_TOL) || !(maxabs <= REL_TOL * maxref + 1e-7))
    fail_msg("%s/%s: relative error %.3g, max abs diff %.3g (max |ref| %.3g)", cs, what, e, maxabs, maxref);
}

static void test_logits_loss_grads(void **state) {
  (void)state;
  for (int c = 0; c < n_cases; c++) {
    ot_test_case fx;
    fixture_open(&fx, cases[c], NULL);
    const ot_model_config *cfg = ot_model_cfg(fx.m);
    size_t N = (size_t)fx.B * fx.T, V = cfg->vocab_size;
    assert_int_equal(ot_model_prepare(fx.m, fx.B, fx.T, 1), 0);

    float *logits = malloc(N * V * sizeof(float));
    assert_int_equal(ot_model_forward_logits(fx.m, fx.in, fx.B, fx.T, logits), 0);
    size_t nref;
    float *want = ot_test_st_f32(fx.ref, "logits", &nref);
    assert_int_equal(nref, N * V);
    check_close("logits", cases[c], logits, want, N * V);
    free(want);
    free(logits);

    float loss;
    assert_int_equal(ot_model_forward(fx.m, fx.in, fx.tg, fx.B, fx.T, &loss), 0);
    float *wl = ot_test_st_f32(fx.ref, "loss", NULL);
    if (!(fabs(loss - wl[0]) < REL_TOL * fabs(wl[0])))
      fail_msg("%s: loss %.8f, PyTorch %.8f", cases[c], loss, wl[0]);
    free(wl);

    assert_int_equal(ot_model_backward(fx.m), 0);
    for (int i = 0; i < ot_model_param_count(fx.m); i++) {
      ot_param *p = ot_model_param(fx.m, i);
      char name[160];
      snprintf(name, sizeof name, "grad.%s", p->name + strlen("transformer."));
      size_t n;
      float *g = ot_test_st_f32(fx.ref, name, &n);
      assert_int_equal(n, p->numel);
      assert_non_null(p->grad);
      check_close(p->name, cases[c], p->grad, g, n);
      free(g);
    }
    ot_test_case_close(&fx);
  }
}

/* Training only some tensors: frozen ones get no gradient memory, the trainable ones get
 * exactly the gradients of the full model, and the parameters of frozen tensors do not move. */
static void test_frozen_subset(void **state) {
  (void)state;
  ot_test_case fx;
  fixture_open(&fx, "manyheads", NULL);
  int L = ot_model_cfg(fx.m)->n_layer;
  ot_model_set_all_trainable(fx.m, 0);
  /* the top block only, like a top adapter */
  for (int k = 0; k < OT_R_COUNT; k++)
    if (ot_model_block_param_index(fx.m, L - 1, k) >= 0)
      ot_model_param(fx.m, ot_model_block_param_index(fx.m, L - 1, k))->trainable = 1;
  assert_int_equal(ot_model_prepare(fx.m, fx.B, fx.T, 1), 0);
  size_t grad_scalars = 0;
  for (int i = 0; i < ot_model_param_count(fx.m); i++) {
    ot_param *p = ot_model_param(fx.m, i);
    if (p->trainable) {
      assert_non_null(p->grad);
      grad_scalars += p->numel;
    } else {
      assert_null(p->grad);
    }
  }
  assert_true(ot_model_memory_bytes(fx.m) > 0);
  float loss;
  assert_int_equal(ot_model_forward(fx.m, fx.in, fx.tg, fx.B, fx.T, &loss), 0);
  assert_int_equal(ot_model_backward(fx.m), 0);
  for (int i = 0; i < ot_model_param_count(fx.m); i++) {
    ot_param *p = ot_model_param(fx.m, i);
    if (!p->trainable) continue;
    char name[160];
    snprintf(name, sizeof name, "grad.%s", p->name + strlen("transformer."));
    float *g = ot_test_st_f32(fx.ref, name, NULL);
    check_close(p->name, "frozen-subset", p->grad, g, p->numel);
    free(g);
  }
  /* an optimizer step moves only the trainable tensors */
  size_t total = ot_model_num_params(fx.m);
  float *before = malloc(total * sizeof(float));
  memcpy(before, ot_model_param(fx.m, 0)->data, total * sizeof(float));
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  ot_optimizer *opt;
  assert_int_equal(ot_optimizer_create(&oc, fx.be, ot_model_param(fx.m, 0), ot_model_param_count(fx.m), &opt),
                   0);
  assert_int_equal(ot_optimizer_step(opt, 1e-2f, NULL), 0);
  size_t off = 0;
  for (int i = 0; i < ot_model_param_count(fx.m); i++) {
    ot_param *p = ot_model_param(fx.m, i);
    int same = memcmp(before + off, p->data, p->numel * sizeof(float)) == 0;
    if (p->trainable)
      assert_false(same);
    else
      assert_true(same);
    /* the step consumed the gradients */
    for (size_t j = 0; p->grad && j < p->numel; j++) assert_true(p->grad[j] == 0.0f);
    off += p->numel;
  }
  free(before);
  ot_optimizer_free(opt);
  ot_test_case_close(&fx);
}

/* F16 and BF16 checkpoints written by PyTorch load and score like PyTorch on the rounded weights. */
static void test_half_checkpoints(void **state) {
  (void)state;
  const char *subs[2] = {"f16", "bf16"};
  for (int c = 0; c < n_cases; c++) {
    for (int s = 0; s < 2; s++) {
      ot_test_case fx;
      fixture_open(&fx, cases[c], subs[s]);
      assert_int_equal(ot_model_prepare(fx.m, fx.B, fx.T, 0), 0);
      float loss;
      assert_int_equal(ot_model_forward(fx.m, fx.in, fx.tg, fx.B, fx.T, &loss), 0);
      char name[32];
      snprintf(name, sizeof name, "loss_%s", subs[s]);
      float *wl = ot_test_st_f32(fx.ref, name, NULL);
      if (!(fabs(loss - wl[0]) < REL_TOL * fabs(wl[0])))
        fail_msg("%s/%s: loss %.8f, PyTorch %.8f", cases[c], subs[s], loss, wl[0]);
      free(wl);
      ot_test_case_close(&fx);
    }
  }
}

static float meta_f(ot_safetensors *st, const char *key) {
  const char *v = ot_st_metadata(st, key);
  assert_non_null(v);
  return strtof(v, NULL);
}

/* Four optimizer steps follow PyTorch's loss trajectory (AdamW with decoupled decay on
 * 2-D weights, clipping; SGD with momentum and L2 decay). */
static void test_optimizer_trajectories(void **state) {
  (void)state;
  for (int c = 0; c < n_cases; c++) {
    for (int kind = 0; kind < 2; kind++) {
      ot_test_case fx;
      fixture_open(&fx, cases[c], NULL);
      assert_int_equal(ot_model_prepare(fx.m, fx.B, fx.T, 1), 0);
      ot_optim_config oc;
      ot_optim_config_default(&oc, kind == 0 ? OT_OPTIM_ADAMW : OT_OPTIM_SGD);
      float lr;
      if (kind == 0) {
        lr = meta_f(fx.ref, "adamw_lr");
        oc.weight_decay = meta_f(fx.ref, "adamw_wd");
        oc.grad_clip = meta_f(fx.ref, "adamw_clip");
      } else {
        lr = meta_f(fx.ref, "sgd_lr");
        oc.momentum = meta_f(fx.ref, "sgd_momentum");
        oc.weight_decay = meta_f(fx.ref, "sgd_wd");
      }
      ot_optimizer *opt;
      assert_int_equal(
          ot_optimizer_create(&oc, fx.be, ot_model_param(fx.m, 0), ot_model_param_count(fx.m), &opt), 0);
      uint64_t n;
      float *want = ot_test_st_f32(fx.ref, kind == 0 ? "adamw_losses" : "sgd_losses", &n);
      for (uint64_t s = 0; s < n; s++) {
        float loss;
        assert_int_equal(ot_model_forward(fx.m, fx.in, fx.tg, fx.B, fx.T, &loss), 0);
        /* trajectories amplify rounding a little each step */
        if (!(fabs(loss - want[s]) < 2e-4 * fabs(want[s])))
          fail_msg("%s %s step %d: loss %.7f, PyTorch %.7f", cases[c], kind == 0 ? "adamw" : "sgd", (int)s,
                   loss, want[s]);
        if (s + 1 == n) break;
        assert_int_equal(ot_model_zero_grad(fx.m), 0);
        assert_int_equal(ot_model_backward(fx.m), 0);
        assert_int_equal(ot_optimizer_step(opt, lr, NULL), 0);
      }
      free(want);
      ot_optimizer_free(opt);
      ot_test_case_close(&fx);
    }
  }
}

/* Central differences on a tiny model, independent of PyTorch. fp32 differences carry
 * ~1e-3 noise, so the check is looser, and it samples entries of every tensor. */
static void test_finite_differences(void **state) {
  (void)state;
  ot_backend *be;
  assert_int_equal(ot_backend_cpu_create(1, &be), 0);
  ot_model_config cfg = {.n_layer = 2,
                         .n_head = 2,
                         .n_embd = 8,
                         .vocab_size = 11,
                         .n_positions = 8,
                         .layer_norm_epsilon = 1e-5f};
  ot_model *m;
  assert_int_equal(ot_model_create(&cfg, be, &m), 0);
  assert_int_equal(ot_model_init_random(m, 7), 0);
  /* larger weights than GPT-2's init so every path carries signal */
  for (int i = 0; i < ot_model_param_count(m); i++) {
    ot_param *p = ot_model_param(m, i);
    for (size_t j = 0; j < p->numel; j++) p->data[j] = p->data[j] * 4.0f + 0.01f * (float)((j * 7 + i) % 5);
  }
  int B = 2, T = 5;
  int32_t in[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, tg[10] = {2, 3, 4, 5, 6, 7, 8, 9, 10, 0};
  assert_int_equal(ot_model_prepare(m, B, T, 1), 0);
  assert_true(ot_test_finite_differences(m, in, tg, B, T) > 40);
  ot_model_free(m);
  ot_backend_free(be);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_logits_loss_grads),  cmocka_unit_test(test_frozen_subset),
      cmocka_unit_test(test_half_checkpoints),   cmocka_unit_test(test_optimizer_trajectories),
      cmocka_unit_test(test_finite_differences),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
