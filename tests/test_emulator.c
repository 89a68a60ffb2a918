/* The Offsite-Tuning emulator: layer-drop indices, the KD loss and the whole
 * distillation gradient against PyTorch float64 (tests/ref/emulator_ref.py), distillation
 * lowering the KD loss, device tuning leaving frozen tensors bitwise unchanged, plug-in of
 * an unchanged adapter reproducing the full model bitwise, and refused adapters. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_data.h"
#include "ot_emulator.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_optim.h"
#include "ot_safetensors.h"
#include "ot_test_util.h"
#include "ot_train.h"

static ot_peft_map emap; /* block map of the emulator at hand */

#define REL_TOL 1e-4

static char *dir;

static int setup(void **state) {
  (void)state;
  dir = ot_test_tmpdir("emulator");
  return ot_test_ref("emulator_ref.py", dir) ? -1 : 0;
}

static int teardown(void **state) {
  (void)state;
  free(dir);
  return 0;
}

/* ---- layer drop ------------------------------------------------------------------ */

static void expect_drop(int L, int a, int b, int k, const int *want) {
  int got[OT_EMU_MAX_LAYERS];
  assert_int_equal(ot_emu_layer_drop(L, a, b, k, got), OT_OK);
  for (int i = 0; i < k; i++)
    if (got[i] != want[i])
      fail_msg("L=%d a=%d b=%d k=%d: kept[%d] = %d, want %d", L, a, b, k, i, got[i], want[i]);
}

static void test_layer_drop(void **state) {
  (void)state;
  expect_drop(12, 2, 2, 1, (int[]){2});
  expect_drop(12, 2, 2, 2, (int[]){2, 9});
  expect_drop(12, 2, 2, 3, (int[]){2, 6, 9}); /* 3.5 rounds up */
  expect_drop(12, 2, 2, 4, (int[]){2, 4, 7, 9});
  expect_drop(12, 2, 2, 8, (int[]){2, 3, 4, 5, 6, 7, 8, 9});
  expect_drop(5, 2, 2, 1, (int[]){2});                                          /* a middle of one block */
  expect_drop(6, 0, 0, 3, (int[]){0, 3, 5});                                    /* 2.5 rounds up */
  expect_drop(48, 2, 2, 11, (int[]){2, 6, 11, 15, 19, 24, 28, 32, 36, 41, 45}); /* GPT2-XL-like */
  int k[OT_EMU_MAX_LAYERS];
  assert_int_equal(ot_emu_layer_drop(12, 2, 2, 0, k), OT_ERR_INVALID);
  assert_int_equal(ot_emu_layer_drop(12, 2, 2, 9, k), OT_ERR_INVALID);
  assert_int_equal(ot_emu_layer_drop(4, 2, 2, 1, k), OT_ERR_INVALID); /* no middle */
  assert_int_equal(ot_emu_layer_drop(12, -1, 2, 1, k), OT_ERR_INVALID);
  int kk = 0;
  assert_int_equal(ot_emu_keep_for_ratio(12, 2, 2, 0.5f, &kk), OT_OK);
  assert_int_equal(kk, 4);
  assert_int_equal(ot_emu_keep_for_ratio(12, 2, 2, 0.99f, &kk), OT_OK);
  assert_int_equal(kk, 1);
  assert_int_equal(ot_emu_keep_for_ratio(12, 2, 2, 1.0f, &kk), OT_ERR_INVALID);
  ot_emu_plan p;
  assert_int_equal(ot_emu_plan_make(8, 2, 2, 2, &p), OT_OK);
  int want[] = {0, 1, 2, 5, 6, 7};
  assert_int_equal(ot_emu_n_layer(&p), 6);
  for (int i = 0; i < 6; i++) assert_int_equal(p.src[i], want[i]);
}

/* ---- PyTorch references ---------------------------------------------------------- */

static void test_kd_op(void **state) {
  (void)state;
  char path[600];
  snprintf(path, sizeof path, "%s/kd/ref.safetensors", dir);
  ot_safetensors *ref;
  assert_int_equal(ot_st_open(path, &ref), 0);
  size_t n;
  float *s = ot_test_st_f32(ref, "s", &n), *t = ot_test_st_f32(ref, "t", NULL),
        *kd = ot_test_st_f32(ref, "kd", NULL), *gs = ot_test_st_f32(ref, "grad_s", NULL);
  int N = (int)ot_st_find(ref, "s")->shape[0], C = (int)ot_st_find(ref, "s")->shape[1];
  ot_backend *be;
  assert_int_equal(ot_backend_cpu_create(2, &be), 0);
  float *rows = malloc(N * sizeof(float)), *ds = malloc(n * sizeof(float));
  be->ops->kd_fwd(be, rows, s, t, N, C, OT_EMU_KD_EPS);
  double sum = 0;
  for (int i = 0; i < N; i++) sum += rows[i];
  float mean = (float)(sum / ((double)N * C));
  assert_true(fabs(mean - kd[0]) <= REL_TOL * fabs(kd[0]));
  be->ops->kd_bwd(be, ds, s, t, OT_EMU_KD_WEIGHT / ((float)N * C), N, C, OT_EMU_KD_EPS);
  double e = ot_test_rel_err(ds, gs, n);
  printf("KD loss %.6g (torch %.6g); gradient relative error %.3g\n", mean, kd[0], e);
  assert_true(e < REL_TOL);
  free(rows);
  free(ds);
  free(s);
  free(t);
  free(kd);
  free(gs);
  ot_backend_free(be);
  ot_st_close(ref);
}

typedef struct {
  ot_backend *be;
  ot_model *full, *emu;
  ot_emu_plan plan;
  ot_safetensors *ref;
  int B, T;
  int32_t *in, *tg;
} distill_fx;

static void distill_open(distill_fx *f) {
  memset(f, 0, sizeof *f);
  char d[600], path[700];
  snprintf(d, sizeof d, "%s/distill", dir);
  assert_int_equal(ot_backend_cpu_create(2, &f->be), 0);
  assert_int_equal(ot_model_load_dir(d, f->be, &f->full), 0);
  assert_int_equal(ot_emu_plan_make(6, 2, 2, 1, &f->plan), 0);
  assert_int_equal(ot_emu_build(f->full, &f->plan, &f->emu), 0);
  snprintf(path, sizeof path, "%s/ref.safetensors", d);
  assert_int_equal(ot_st_open(path, &f->ref), 0);
  ot_test_st_batch(f->ref, &f->B, &f->T, &f->in, &f->tg);
}

static void distill_close(distill_fx *f) {
  ot_model_free(f->emu);
  ot_model_free(f->full);
  ot_backend_free(f->be);
  ot_st_close(f->ref);
  free(f->in);
  free(f->tg);
}

static void test_distill_gradient(void **state) {
  (void)state;
  distill_fx f;
  distill_open(&f);
  ot_distill *d;
  assert_int_equal(ot_distill_create(f.full, f.emu, &f.plan, f.B, f.T, OT_EMU_KD_WEIGHT, &d), 0);
  float loss, ce, kd;
  assert_int_equal(ot_distill_step(d, f.in, f.tg, &loss), 0);
  ot_distill_last(d, &ce, &kd);
  float *rl = ot_test_st_f32(f.ref, "loss", NULL), *rce = ot_test_st_f32(f.ref, "ce", NULL),
        *rkd = ot_test_st_f32(f.ref, "kd", NULL);
  printf("distill: loss %.6f (torch %.6f), CE %.6f (%.6f), KD %.6g (%.6g)\n", loss, rl[0], ce, rce[0], kd,
         rkd[0]);
  assert_true(fabs(loss - rl[0]) <= REL_TOL * fabs(rl[0]));
  assert_true(fabs(ce - rce[0]) <= REL_TOL * fabs(rce[0]));
  assert_true(fabs(kd - rkd[0]) <= REL_TOL * fabs(rkd[0]));
  assert_true(kd > 1e-3); /* a real KD term, not a vacuous zero */
  int n_checked = 0;
  for (int i = 0; i < ot_model_param_count(f.emu); i++) {
    ot_param *p = ot_model_param(f.emu, i);
    int layer = -1;
    sscanf(p->name, "transformer.h.%d.", &layer);
    if (layer != 2) {
      /* only the kept middle block trains: no gradient memory elsewhere */
      if (p->grad) fail_msg("%s has a gradient", p->name);
      continue;
    }
    assert_non_null(p->grad);
    char name[128];
    snprintf(name, sizeof name, "grad.%s", p->name);
    size_t n;
    float *want = ot_test_st_f32(f.ref, name, &n);
    assert_int_equal(n, p->numel);
    double e = ot_test_rel_err(p->grad, want, n);
    if (e >= REL_TOL) fail_msg("%s: relative error %.3g", name, e);
    free(want);
    n_checked++;
  }
  assert_int_equal(n_checked, 12); /* GPT-2's tensors per block */
  free(rl);
  free(rce);
  free(rkd);
  ot_distill_free(d);
  distill_close(&f);
}

static void test_distill_lowers_kd(void **state) {
  (void)state;
  distill_fx f;
  distill_open(&f);
  ot_distill *d;
  assert_int_equal(ot_distill_create(f.full, f.emu, &f.plan, f.B, f.T, OT_EMU_KD_WEIGHT, &d), 0);
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  ot_optimizer *opt;
  assert_int_equal(
      ot_optimizer_create(&oc, f.be, ot_model_param(f.emu, 0), ot_model_param_count(f.emu), &opt), 0);
  float loss, ce, kd0 = 0, kd = 0, gn;
  for (int s = 0; s < 15; s++) {
    assert_int_equal(ot_distill_step(d, f.in, f.tg, &loss), 0);
    ot_distill_last(d, &ce, &kd);
    if (s == 0) kd0 = kd;
    assert_int_equal(ot_optimizer_step(opt, 3e-3f, &gn), 0);
  }
  printf("KD %.5f -> %.5f over 15 steps\n", kd0, kd);
  assert_true(kd < 0.7f * kd0);
  ot_optimizer_free(opt);
  ot_distill_free(d);
  distill_close(&f);
}

/* ---- device tuning and plug-in --------------------------------------------------- */

static float *host_params(ot_model *m) {
  size_t n = ot_model_num_params(m);
  float *h = malloc(n * sizeof(float)), *p = h;
  for (int i = 0; i < ot_model_param_count(m); i++) {
    ot_param *t = ot_model_param(m, i);
    memcpy(p, t->data, t->numel * sizeof(float));
    p += t->numel;
  }
  return h;
}

static void test_tune_freezes(void **state) {
  (void)state;
  distill_fx f;
  distill_open(&f);
  float *before = host_params(f.emu);
  ot_emu_set_trainable(f.emu, &f.plan, OT_EMU_TRAIN_ADAPTER);
  assert_int_equal(ot_model_prepare(f.emu, f.B, f.T, 1), 0);
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  oc.weight_decay = 0.1f;
  ot_optimizer *opt;
  assert_int_equal(
      ot_optimizer_create(&oc, f.be, ot_model_param(f.emu, 0), ot_model_param_count(f.emu), &opt), 0);
  int32_t ids[200];
  for (int i = 0; i < 200; i++) ids[i] = (i * 7 + i / 3) % 37;
  ot_tokens toks = {ids, 200, NULL};
  ot_batcher bt;
  assert_int_equal(ot_batcher_init(&bt, &toks, f.B, f.T, 0, 0), 0);
  ot_train_config tc = {5,    f.B,  f.T, {1e-2f, 0, 5, OT_LR_CONSTANT, 0}, 0, NULL, NULL, NULL, NULL,
                        NULL, NULL, NULL};
  ot_train_result res;
  assert_int_equal(ot_train(f.emu, opt, &bt, &tc, 0, &res), 0);
  float *after = host_params(f.emu), *b = before, *a = after;
  for (int i = 0; i < ot_model_param_count(f.emu); i++) {
    ot_param *p = ot_model_param(f.emu, i);
    int same = memcmp(a, b, p->numel * sizeof(float)) == 0;
    int layer = -1;
    sscanf(p->name, "transformer.h.%d.", &layer);
    int adapter = layer >= 0 && ot_emu_is_adapter(&f.plan, layer);
    if (adapter && p->grad == NULL) fail_msg("%s: adapter tensor without gradient", p->name);
    if (!adapter && (p->grad || !same)) fail_msg("%s: frozen tensor changed or has a gradient", p->name);
    if (adapter && same && p->ndim == 2) fail_msg("%s: adapter weight did not train", p->name);
    a += p->numel;
    b += p->numel;
  }
  free(before);
  free(after);
  ot_optimizer_free(opt);
  distill_close(&f);
}

/* --middle-noise: the middle's matrices get fresh N(0, (s rms)^2) noise per step, the same for
 * the same step, nothing else moves, and restore gives back the loaded bytes. */
static void test_middle_noise(void **state) {
  (void)state;
  distill_fx f;
  distill_open(&f);
  ot_emu_noise *nz = NULL;
  ot_emu_set_trainable(f.emu, &f.plan, OT_EMU_TRAIN_MIDDLE);
  assert_int_equal(ot_emu_noise_create(f.emu, &f.plan, 0.5f, 11, &nz), OT_ERR_INVALID); /* middle trains */
  ot_emu_set_trainable(f.emu, &f.plan, OT_EMU_TRAIN_ADAPTER);
  assert_int_equal(ot_emu_noise_create(f.emu, &f.plan, 0.0f, 11, &nz), OT_ERR_INVALID);
  assert_int_equal(ot_emu_noise_create(f.emu, &f.plan, 0.5f, 11, &nz), OT_OK);
  int nt;
  size_t ns;
  ot_emu_noise_size(nz, &nt, &ns);
  assert_int_equal(nt, 4); /* GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj of the one kept block */
  size_t n = ot_model_num_params(f.emu);
  float *orig = host_params(f.emu);
  assert_int_equal(ot_emu_noise_apply(nz, 3), OT_OK);
  float *s3 = host_params(f.emu);
  assert_int_equal(ot_emu_noise_apply(nz, 4), OT_OK);
  float *s4 = host_params(f.emu);
  assert_int_equal(ot_emu_noise_apply(nz, 3), OT_OK);
  float *s3b = host_params(f.emu);
  assert_memory_equal(s3, s3b, n * sizeof(float)); /* a function of the step: resume sees the same */
  assert_memory_not_equal(s3, s4, n * sizeof(float));
  assert_int_equal(ot_emu_noise_restore(nz), OT_OK);
  float *back = host_params(f.emu);
  assert_memory_equal(orig, back, n * sizeof(float));
  const float *o = orig, *p3 = s3;
  size_t perturbed = 0;
  for (int i = 0; i < ot_model_param_count(f.emu); i++) {
    ot_param *p = ot_model_param(f.emu, i);
    int layer = -1;
    sscanf(p->name, "transformer.h.%d.", &layer);
    int middle = layer >= 0 && !ot_emu_is_adapter(&f.plan, layer) && p->ndim == 2;
    if (!middle) {
      if (memcmp(o, p3, p->numel * sizeof(float)))
        fail_msg("%s: outside the middle's matrices, changed", p->name);
    } else {
      double ss = 0, sd = 0, mean = 0;
      for (size_t k = 0; k < p->numel; k++) {
        ss += (double)o[k] * o[k];
        mean += p3[k] - o[k];
        sd += (double)(p3[k] - o[k]) * (p3[k] - o[k]);
      }
      double want = 0.5 * sqrt(ss / p->numel), got = sqrt(sd / p->numel);
      mean /= p->numel;
      printf("middle noise %s: sd %.5f (want %.5f), mean %.2g, %zu weights\n", p->name, got, want, mean,
             p->numel);
      assert_true(fabs(got / want - 1) < 0.1);
      assert_true(fabs(mean) < 5 * want / sqrt((double)p->numel));
      perturbed += p->numel;
    }
    o += p->numel;
    p3 += p->numel;
  }
  assert_int_equal(perturbed, ns);
  ot_emu_noise_free(nz);
  free(orig);
  free(s3);
  free(s4);
  free(s3b);
  free(back);
  distill_close(&f);
}

static void full_logits(ot_model *m, const int32_t *in, int B, int T, float *out) {
  assert_int_equal(ot_model_prepare(m, B, T, 0), 0);
  assert_int_equal(ot_model_forward_logits(m, in, B, T, out), 0);
}

static void test_plugin(void **state) {
  (void)state;
  distill_fx f;
  distill_open(&f);
  char full_dir[700], emu_dir[700], ad[700], path[800], other[700];
  snprintf(full_dir, sizeof full_dir, "%s/distill/model.safetensors", dir);
  assert_int_equal(ot_file_digest(full_dir, f.plan.base_digest), 0);
  snprintf(emu_dir, sizeof emu_dir, "%s/plug_emu", dir);
  snprintf(ad, sizeof ad, "%s/plug_adapter", dir);
  ot_tokenizer *tok;
  assert_int_equal(ot_tokenizer_byte_new(&tok), 0);
  /* the package round-trips and holds only the emulator's blocks */
  ot_emu_plan loaded;
  ot_model *emu2;
  ot_tokenizer *tok2;
  assert_int_equal(ot_emu_save(f.emu, &f.plan, tok, emu_dir), 0);
  assert_int_equal(ot_emu_load(emu_dir, f.be, &emu2, &tok2, &loaded), 0);
  assert_int_equal(ot_model_cfg(emu2)->n_layer, 5);
  assert_memory_equal(loaded.src, f.plan.src, sizeof loaded.src);
  assert_string_equal(loaded.base_digest, f.plan.base_digest);
  assert_null(ot_model_find_param(emu2, "transformer.h.5.ln_1.weight"));
  ot_model_free(emu2);
  ot_tokenizer_free(tok2);
  ot_tokenizer_free(tok);

  assert_int_equal(ot_peft_save(f.emu, ot_emu_peft_map(&f.plan, &emap), NULL, ad), 0);
  size_t NV = (size_t)f.B * f.T * ot_model_cfg(f.full)->vocab_size;
  float *l0 = malloc(NV * sizeof(float)), *l1 = malloc(NV * sizeof(float));
  full_logits(f.full, f.in, f.B, f.T, l0);
  assert_int_equal(ot_peft_apply_full(f.full, f.plan.base_digest, ad), 0);
  full_logits(f.full, f.in, f.B, f.T, l1);
  assert_memory_equal(l0, l1, NV * sizeof(float)); /* bitwise */
  /* and the adapter plugs into the emulator too */
  assert_int_equal(ot_peft_apply_dir(f.emu, ot_emu_peft_map(&f.plan, &emap), ad), 0);

  /* another base model */
  char wrong[OT_DIGEST_HEX];
  memset(wrong, 'a', 64);
  wrong[64] = '\0';
  assert_int_equal(ot_peft_apply_full(f.full, wrong, ad), OT_ERR_MISMATCH);
  printf("other base: %s\n", ot_error_detail());

  /* wrong shapes: an adapter of a wider model claiming this base */
  ot_model_config wc = *ot_model_cfg(f.full);
  wc.n_embd = 32;
  ot_model *wide, *wide_emu;
  assert_int_equal(ot_model_create(&wc, f.be, &wide), 0);
  assert_int_equal(ot_model_init_random(wide, 3), 0);
  assert_int_equal(ot_emu_build(wide, &f.plan, &wide_emu), 0);
  snprintf(other, sizeof other, "%s/plug_wide", dir);
  assert_int_equal(ot_peft_save(wide_emu, ot_emu_peft_map(&f.plan, &emap), NULL, other), 0);
  assert_int_equal(ot_peft_apply_full(f.full, f.plan.base_digest, other), OT_ERR_MISMATCH);
  printf("wrong shapes: %s\n", ot_error_detail());
  /* blocks that this model lacks */
  ot_emu_plan far = f.plan;
  far.src[4] = 9;
  snprintf(other, sizeof other, "%s/plug_far", dir);
  assert_int_equal(ot_peft_save(f.emu, ot_emu_peft_map(&far, &emap), NULL, other), 0);
  assert_int_equal(ot_peft_apply_full(f.full, f.plan.base_digest, other), OT_ERR_MISMATCH);
  printf("missing block: %s\n", ot_error_detail());
  ot_model_free(wide_emu);
  ot_model_free(wide);

  /* tampered: one byte of the tensor data flipped */
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", ad);
  FILE *fp = fopen(path, "r+b");
  assert_non_null(fp);
  fseek(fp, -3, SEEK_END);
  int c = fgetc(fp);
  fseek(fp, -3, SEEK_END);
  fputc(c ^ 0x40, fp);
  fclose(fp);
  assert_int_equal(ot_peft_apply_full(f.full, f.plan.base_digest, ad), OT_ERR_MISMATCH);
  printf("tampered: %s\n", ot_error_detail());

  /* refusals changed nothing */
  full_logits(f.full, f.in, f.B, f.T, l1);
  assert_memory_equal(l0, l1, NV * sizeof(float));
  free(l0);
  free(l1);
  distill_close(&f);
}

/* An int8 emulator package: middle-block weights within half a quantisation step of the
 * fp32 ones, everything else bitwise, about a quarter of the bytes for those weights;
 * a broken scale is refused. */
static void test_int8_package(void **state) {
  (void)state;
  distill_fx f;
  distill_open(&f);
  char *d32 = ot_test_tmpdir("emu_fp32"), *d8 = ot_test_tmpdir("emu_int8");
  ot_tokenizer *tok;
  assert_int_equal(ot_tokenizer_byte_new(&tok), 0);
  memset(f.plan.base_digest, 'a', OT_DIGEST_HEX - 1); /* packages record their base */
  f.plan.base_digest[OT_DIGEST_HEX - 1] = '\0';
  assert_int_equal(ot_emu_save(f.emu, &f.plan, tok, d32), 0);
  ot_emu_plan p8 = f.plan;
  p8.int8_middle = 1;
  assert_int_equal(ot_emu_save(f.emu, &p8, tok, d8), 0);
  ot_model *a = NULL, *b = NULL;
  ot_tokenizer *ta = NULL, *tb = NULL;
  ot_emu_plan pa, pb;
  assert_int_equal(ot_emu_load(d32, f.be, &a, &ta, &pa), 0);
  assert_int_equal(ot_emu_load(d8, f.be, &b, &tb, &pb), 0);
  assert_false(pa.int8_middle);
  assert_true(pb.int8_middle);
  int quantised = 0;
  for (int i = 0; i < ot_model_param_count(a); i++) {
    ot_param *x = ot_model_param(a, i), *y = ot_model_param(b, i);
    int middle = 0;
    for (int k = 0; k < OT_R_COUNT; k++)
      for (int l = f.plan.bottom; l < f.plan.bottom + f.plan.keep; l++)
        if (ot_model_block_param_index(a, l, k) == i) middle = 1;
    if (!middle || x->ndim != 2) {
      assert_memory_equal(x->data, y->data, x->numel * sizeof(float));
      continue;
    }
    quantised++;
    int rows = x->shape[0], cols = x->shape[1];
    for (int c = 0; c < cols; c++) {
      float amax = 0.0f;
      for (int r = 0; r < rows; r++) amax = fmaxf(amax, fabsf(x->data[(size_t)r * cols + c]));
      for (int r = 0; r < rows; r++)
        assert_true(fabsf(x->data[(size_t)r * cols + c] - y->data[(size_t)r * cols + c]) <=
                    0.5f * amax / 127.0f * 1.0001f + 1e-12f);
    }
  }
  assert_int_equal(quantised, 4 * f.plan.keep);
  char path[700];
  snprintf(path, sizeof path, "%s/model.safetensors", d8);
  ot_safetensors *st;
  assert_int_equal(ot_st_open(path, &st), 0);
  char name[160];
  snprintf(name, sizeof name, "transformer.h.%d.mlp.c_fc.weight.int8_scale", f.plan.bottom);
  assert_non_null(ot_st_find(st, name));
  ot_st_close(st);
  /* a negative scale is refused with a clear error */
  assert_int_equal(
      ot_test_system(
          "%s -c \"import json,struct,sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); "
          "n=struct.unpack('<Q',b[:8])[0]; h=json.loads(b[8:8+n]); o=h[sys.argv[2]]['data_offsets'][0]; "
          "b[8+n+o:8+n+o+4]=struct.pack('<f',-1.0); open(p,'wb').write(b)\" '%s' '%s'",
          getenv("OT_PYTHON") ? getenv("OT_PYTHON") : "/usr/bin/python3", path, name),
      0);
  ot_model *c = NULL;
  ot_tokenizer *tc = NULL;
  ot_emu_plan pc;
  assert_int_equal(ot_emu_load(d8, f.be, &c, &tc, &pc), OT_ERR_FORMAT);
  assert_non_null(strstr(ot_error_detail(), "scale"));
  ot_model_free(a);
  ot_model_free(b);
  ot_tokenizer_free(ta);
  ot_tokenizer_free(tb);
  ot_tokenizer_free(tok);
  free(d32);
  free(d8);
  distill_close(&f);
}

/* emulator.json numbers that no int holds are refused, never converted: converting -2.1e10 or
 * 1e300 to int is undefined behaviour (found by fuzz_adapter_config; clang's UBSan reports it). */
static void test_hostile_numbers(void **state) {
  (void)state;
  static const char *tail = "\"bottom\": 1, \"top\": 1, \"block_source\": [0, 1, 3], \"base_model_digest\": "
                            "\"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"}";
  static const char *heads[] = {
      "{\"format_version\": -2.1e10, \"full_n_layer\": 4, \"kept_middle\": [1], ",
      "{\"format_version\": 1, \"full_n_layer\": 1e300, \"kept_middle\": [1], ",
      "{\"format_version\": 1, \"full_n_layer\": 4, \"kept_middle\": [4294967297], ",
      "{\"format_version\": 1, \"full_n_layer\": 4, \"kept_middle\": [1], ", /* the valid one */
  };
  char d[700], p[800], text[1024];
  snprintf(d, sizeof d, "%s/hostile_numbers", dir);
  snprintf(p, sizeof p, "%s/emulator.json", d);
  assert_int_equal(ot_mkdir_p(d), OT_OK);
  for (int i = 0; i < 4; i++) {
    int n = snprintf(text, sizeof text, "%s%s", heads[i], tail);
    assert_int_equal(ot_file_write_atomic(p, text, (size_t)n), OT_OK);
    ot_emu_plan plan;
    int rc = ot_emu_plan_load(d, &plan);
    assert_int_equal(rc, i < 3 ? OT_ERR_FORMAT : OT_OK);
    if (i < 3) printf("hostile number: %s\n", ot_error_detail());
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_layer_drop),       cmocka_unit_test(test_kd_op),
      cmocka_unit_test(test_distill_gradient), cmocka_unit_test(test_distill_lowers_kd),
      cmocka_unit_test(test_tune_freezes),     cmocka_unit_test(test_middle_noise),
      cmocka_unit_test(test_plugin),           cmocka_unit_test(test_int8_package),
      cmocka_unit_test(test_hostile_numbers),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
