/* Adapters other than offsite: LoRA (dropout 0 and > 0), bottleneck and BitFit gradients
 * against PyTorch float64 (tests/ref/adapters_ref.py); frozen tensors bitwise unchanged
 * after tuning; zero-initialised adapters leave the model's function unchanged; the PEFT
 * export round trip; merge equal to adapter-applied scoring; refused adapters. */
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
#include "ot_gpt2.h"
#include "ot_optim.h"
#include "ot_safetensors.h"
#include "ot_test_util.h"

#define REL_TOL 1e-4

static char *dir;

static int setup(void **state) {
  (void)state;
  dir = ot_test_tmpdir("adapters");
  const char *py = getenv("OT_PYTHON");
  return ot_test_system("%s '%s/tests/ref/adapters_ref.py' '%s'", py ? py : "/usr/bin/python3",
                        ot_test_source_dir(), dir)
             ? -1
             : 0;
}

static int teardown(void **state) {
  (void)state;
  free(dir);
  return 0;
}

static double rel_err(const float *a, const float *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double d = (double)a[i] - b[i];
    num += d * d;
    den += (double)b[i] * b[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

typedef struct {
  ot_backend *be;
  ot_gpt2 *m;
  ot_safetensors *ref;
  int B, T;
  int32_t *in, *tg;
} fx;

/* Loads case `name`; kind 0 lora, 1 bottleneck, 2 bitfit; adapters on blocks 0 and 3. */
static void open_case(fx *f, const char *name, int kind, float dropout) {
  memset(f, 0, sizeof *f);
  char d[600], path[700];
  snprintf(d, sizeof d, "%s/%s", dir, name);
  assert_int_equal(ot_backend_cpu_create(2, &f->be), 0);
  assert_int_equal(ot_gpt2_load_dir(d, f->be, &f->m), 0);
  snprintf(path, sizeof path, "%s/ref.safetensors", d);
  assert_int_equal(ot_st_open(path, &f->ref), 0);
  ot_block_ext ext[4];
  memset(ext, 0, sizeof ext);
  for (int l = 0; l < 4; l += 3) {
    if (kind == 0) ext[l] = (ot_block_ext){0xF, 4, 8.0f, dropout, 0};
    if (kind == 1) ext[l].bottleneck = 4;
  }
  assert_int_equal(ot_gpt2_add_extensions(f->m, ext, 7), 0);
  ot_gpt2_set_all_trainable(f->m, 0);
  for (int i = 0; i < ot_gpt2_param_count(f->m); i++) {
    ot_param *p = ot_gpt2_param(f->m, i);
    if (i >= ot_gpt2_base_param_count(f->m)) {
      const ot_st_tensor *t = ot_st_find(f->ref, p->name);
      if (!t) fail_msg("reference lacks %s", p->name);
      assert_int_equal(t->numel, p->numel);
      assert_int_equal(ot_st_read_f32(f->ref, t, p->data, p->numel), 0);
      p->trainable = 1;
    }
    size_t len = strlen(p->name);
    if (kind == 2 &&
        (strncmp(p->name, "transformer.h.0.", 16) == 0 || strncmp(p->name, "transformer.h.3.", 16) == 0) &&
        strcmp(p->name + len - 5, ".bias") == 0)
      p->trainable = 1;
  }
  const ot_st_tensor *in = ot_st_find(f->ref, "inputs");
  f->B = (int)in->shape[0];
  f->T = (int)in->shape[1];
  f->in = malloc(in->nbytes);
  f->tg = malloc(in->nbytes);
  memcpy(f->in, ot_st_data(f->ref, in), in->nbytes);
  memcpy(f->tg, ot_st_data(f->ref, ot_st_find(f->ref, "targets")), in->nbytes);
}

static void close_case(fx *f) {
  ot_gpt2_free(f->m);
  ot_backend_free(f->be);
  ot_st_close(f->ref);
  free(f->in);
  free(f->tg);
}

static void check_grads(const char *name, int kind, float dropout, int want_checked) {
  fx f;
  open_case(&f, name, kind, dropout);
  assert_int_equal(ot_gpt2_prepare(f.m, f.B, f.T, 1), 0);
  ot_gpt2_set_step(f.m, 3);
  float loss;
  assert_int_equal(ot_gpt2_forward(f.m, f.in, f.tg, f.B, f.T, &loss), 0);
  assert_int_equal(ot_gpt2_backward(f.m), 0);
  const ot_st_tensor *rl = ot_st_find(f.ref, "loss");
  float want_loss;
  assert_int_equal(ot_st_read_f32(f.ref, rl, &want_loss, 1), 0);
  printf("%s: loss %.6f (torch %.6f)\n", name, loss, want_loss);
  assert_true(fabs(loss - want_loss) <= REL_TOL * fabs(want_loss));
  int checked = 0;
  double worst = 0;
  for (int i = 0; i < ot_gpt2_param_count(f.m); i++) {
    ot_param *p = ot_gpt2_param(f.m, i);
    if (!p->trainable) {
      if (p->grad) fail_msg("%s: frozen tensor has a gradient", p->name);
      continue;
    }
    char gname[160];
    snprintf(gname, sizeof gname, "grad.%s", p->name);
    const ot_st_tensor *t = ot_st_find(f.ref, gname);
    if (!t) fail_msg("reference lacks %s", gname);
    float *want = malloc(p->numel * sizeof(float));
    assert_int_equal(ot_st_read_f32(f.ref, t, want, p->numel), 0);
    double e = rel_err(p->grad, want, p->numel);
    if (e >= REL_TOL) fail_msg("%s: relative error %.3g", gname, e);
    if (e > worst) worst = e;
    free(want);
    checked++;
  }
  printf("%s: %d gradients, worst relative error %.3g\n", name, checked, worst);
  assert_int_equal(checked, want_checked);
  close_case(&f);
}

static void test_lora_grad(void **state) {
  (void)state;
  check_grads("lora", 0, 0.0f, 16);
}
static void test_lora_dropout_grad(void **state) {
  (void)state;
  check_grads("lora_drop", 0, 0.25f, 16);
}
static void test_bottleneck_grad(void **state) {
  (void)state;
  check_grads("bottleneck", 1, 0.0f, 16);
}
static void test_bitfit_grad(void **state) {
  (void)state;
  check_grads("bitfit", 2, 0.0f, 12); /* 6 biases per block */
}

/* Dropout masks: keep rate near 1-p, the same mask for the same (seed, step, site). */
static void test_dropout_mask(void **state) {
  (void)state;
  size_t n = 200000, kept = 0, same = 0;
  uint64_t s1 = ot_dropout_seed(7, 3, 5), s2 = ot_dropout_seed(7, 4, 5);
  for (size_t i = 0; i < n; i++) {
    kept += ot_dropout_keep(s1, i, 0.25f);
    same += ot_dropout_keep(s1, i, 0.25f) == ot_dropout_keep(s2, i, 0.25f);
  }
  double rate = (double)kept / n;
  printf("keep rate %.4f (want 0.75); masks of consecutive steps agree on %.3f\n", rate, (double)same / n);
  assert_true(fabs(rate - 0.75) < 0.005);
  assert_true(fabs((double)same / n - 0.625) < 0.01); /* independent masks agree 0.75^2 + 0.25^2 */
  for (size_t i = 0; i < 1000; i++) assert_true(ot_dropout_keep(s1, i, 0.0f));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_lora_grad),       cmocka_unit_test(test_lora_dropout_grad),
      cmocka_unit_test(test_bottleneck_grad), cmocka_unit_test(test_bitfit_grad),
      cmocka_unit_test(test_dropout_mask),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
