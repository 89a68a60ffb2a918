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

#include "ot_emulator.h"
#include "ot_data.h"
#include "ot_error.h"
#include "ot_model.h"
#include "ot_optim.h"
#include "ot_safetensors.h"
#include "ot_test_util.h"
#include "ot_train.h"

static ot_peft_map emap; /* block map of the emulator at hand */

#define REL_TOL 1e-4

static char *dir;

static int setup(void **state) {
  (void)state;
  dir = ot_test_tmpdir("adapters");
  return ot_test_ref("adapters_ref.py", dir) ? -1 : 0;
}

static int teardown(void **state) {
  (void)state;
  free(dir);
  return 0;
}

/* Loads case `name`; kind 0 lora, 1 bottleneck, 2 bitfit; adapters on blocks 0 and 3. */
static void open_case(ot_test_case *f, const char *name, int kind, float dropout) {
  char d[600];
  snprintf(d, sizeof d, "%s/%s", dir, name);
  ot_test_case_open(f, d, d);
  ot_block_ext ext[4];
  memset(ext, 0, sizeof ext);
  for (int l = 0; l < 4; l += 3) {
    if (kind == 0)
      ext[l] = (ot_block_ext){.lora_sites = 0xF, .lora_r = 4, .lora_alpha = 8.0f, .lora_dropout = dropout};
    if (kind == 1) ext[l].bottleneck = 4;
  }
  assert_int_equal(ot_model_add_extensions(f->m, ext, 7), 0);
  ot_model_set_all_trainable(f->m, 0);
  for (int i = 0; i < ot_model_param_count(f->m); i++) {
    ot_param *p = ot_model_param(f->m, i);
    if (i >= ot_model_base_param_count(f->m)) {
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
}

static void check_grads(const char *name, int kind, float dropout, int want_checked) {
  ot_test_case f;
  open_case(&f, name, kind, dropout);
  assert_int_equal(ot_model_prepare(f.m, f.B, f.T, 1), 0);
  ot_model_set_step(f.m, 3);
  float loss;
  assert_int_equal(ot_model_forward(f.m, f.in, f.tg, f.B, f.T, &loss), 0);
  assert_int_equal(ot_model_backward(f.m), 0);
  const ot_st_tensor *rl = ot_st_find(f.ref, "loss");
  float want_loss;
  assert_int_equal(ot_st_read_f32(f.ref, rl, &want_loss, 1), 0);
  printf("%s: loss %.6f (torch %.6f)\n", name, loss, want_loss);
  assert_true(fabs(loss - want_loss) <= REL_TOL * fabs(want_loss));
  int checked = 0;
  double worst = 0;
  for (int i = 0; i < ot_model_param_count(f.m); i++) {
    ot_param *p = ot_model_param(f.m, i);
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
    double e = ot_test_rel_err(p->grad, want, p->numel);
    if (e >= REL_TOL) fail_msg("%s: relative error %.3g", gname, e);
    if (e > worst) worst = e;
    free(want);
    checked++;
  }
  printf("%s: %d gradients, worst relative error %.3g\n", name, checked, worst);
  assert_int_equal(checked, want_checked);
  ot_test_case_close(&f);
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

/* ---- the adapter interface ------------------------------------------------------- */

typedef struct {
  ot_backend *be;
  ot_model *full;
  ot_emu_plan plan; /* 4 blocks: bottom 1, top 1, keep 1 -> emulator blocks 0, 1, 3 */
  int B, T;
  int32_t in[32];
  char model_dir[600];
} ifx;

static void ifx_open(ifx *f) {
  memset(f, 0, sizeof *f);
  char path[700];
  snprintf(f->model_dir, sizeof f->model_dir, "%s/lora", dir);
  assert_int_equal(ot_backend_cpu_create(2, &f->be), 0);
  assert_int_equal(ot_model_load_dir(f->model_dir, f->be, &f->full), 0);
  assert_int_equal(ot_emu_plan_make(4, 1, 1, 1, &f->plan), 0);
  snprintf(path, sizeof path, "%s/model.safetensors", f->model_dir);
  assert_int_equal(ot_file_digest(path, f->plan.base_digest), 0);
  f->B = 2;
  f->T = 16;
  for (int i = 0; i < 32; i++) f->in[i] = (i * 13 + 5) % 64;
}

static void ifx_close(ifx *f) {
  ot_model_free(f->full);
  ot_backend_free(f->be);
}

static float *logits(ot_model *m, const ifx *f) {
  size_t n = (size_t)f->B * f->T * ot_model_cfg(m)->vocab_size;
  float *l = malloc(n * sizeof(float));
  assert_int_equal(ot_model_prepare(m, f->B, f->T, 0), 0);
  assert_int_equal(ot_model_forward_logits(m, f->in, f->B, f->T, l), 0);
  return l;
}

static size_t n_logits(const ifx *f) { return (size_t)f->B * f->T * 64; }

static float *host_copy(ot_model *m, int base_only) {
  int n = base_only ? ot_model_base_param_count(m) : ot_model_param_count(m);
  float *h = malloc(ot_model_num_params(m) * sizeof(float)), *p = h;
  for (int i = 0; i < n; i++) {
    memcpy(p, ot_model_param(m, i)->data, ot_model_param(m, i)->numel * sizeof(float));
    p += ot_model_param(m, i)->numel;
  }
  return h;
}

static void train_steps(ot_model *m, ot_backend *be, int steps) {
  assert_int_equal(ot_model_prepare(m, 2, 16, 1), 0);
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  oc.weight_decay = 0.1f;
  ot_optimizer *opt;
  assert_int_equal(ot_optimizer_create(&oc, be, ot_model_param(m, 0), ot_model_param_count(m), &opt), 0);
  int32_t ids[400];
  for (int i = 0; i < 400; i++) ids[i] = (i * 7 + i / 3) % 61;
  ot_tokens toks = {ids, 400, NULL};
  ot_batcher bt;
  assert_int_equal(ot_batcher_init(&bt, &toks, 2, 16, 0, 0), 0);
  ot_train_config tc = {steps, 2,    16,  {1e-2f, 0, steps, OT_LR_CONSTANT, 0}, 0, NULL, NULL, NULL, NULL,
                        NULL,  NULL, NULL};
  ot_train_result res;
  assert_int_equal(ot_train(m, opt, &bt, &tc, 0, &res), 0);
  ot_optimizer_free(opt);
}

static ot_peft_config kind_config(ot_peft_kind k) {
  ot_peft_config c;
  ot_peft_config_default(&c);
  c.kind = k;
  c.lora_r = 2;
  c.lora_dropout = 0.1f;
  c.bottleneck_dim = 3;
  c.seed = 5;
  return c;
}

/* Zero-initialised adapters change nothing; tuning changes only the adapter's tensors; the
 * saved adapter plugs into a fresh emulator (bitwise equal to the tuned one) and into the
 * full model (untrained: bitwise equal to the plain full model). */
static void test_attach_tune_plugin(void **state) {
  (void)state;
  ifx f;
  ifx_open(&f);
  float *l_full = logits(f.full, &f);
  for (int k = OT_PEFT_LORA; k <= OT_PEFT_BITFIT; k++) {
    ot_peft_config c = kind_config((ot_peft_kind)k);
    ot_model *emu, *emu2;
    assert_int_equal(ot_emu_build(f.full, &f.plan, &emu), 0);
    float *l0 = logits(emu, &f);
    assert_int_equal(ot_peft_attach(emu, ot_emu_peft_map(&f.plan, &emap), &c), 0);
    float *l1 = logits(emu, &f);
    assert_memory_equal(l0, l1, n_logits(&f) * sizeof(float)); /* zero B / zero up: identity */
    char ad0[700], ad1[700];
    snprintf(ad0, sizeof ad0, "%s/%s_init", dir, ot_peft_kind_name(c.kind));
    snprintf(ad1, sizeof ad1, "%s/%s_tuned", dir, ot_peft_kind_name(c.kind));
    assert_int_equal(ot_peft_save(emu, ot_emu_peft_map(&f.plan, &emap), &c, ad0), 0);
    /* the untrained adapter on the full model: the full model's function */
    ot_model *full2;
    assert_int_equal(ot_model_load_dir(f.model_dir, f.be, &full2), 0);
    if (ot_peft_apply_full(full2, f.plan.base_digest, ad0)) fail_msg("apply: %s", ot_error_detail());
    float *l2 = logits(full2, &f);
    assert_memory_equal(l_full, l2, n_logits(&f) * sizeof(float));
    free(l2);
    ot_model_free(full2);

    float *before = host_copy(emu, 0);
    train_steps(emu, f.be, 4);
    float *after = host_copy(emu, 0), *a = after, *b = before;
    int n_trained = 0;
    for (int i = 0; i < ot_model_param_count(emu); i++) {
      ot_param *p = ot_model_param(emu, i);
      int same = memcmp(a, b, p->numel * sizeof(float)) == 0;
      if (!p->trainable && (!same || p->grad))
        fail_msg("%s: frozen tensor changed or has a gradient", p->name);
      if (p->trainable && same) fail_msg("%s: adapter tensor did not train", p->name);
      n_trained += p->trainable;
      a += p->numel;
      b += p->numel;
    }
    printf("%s: %d tensors trained, all others bitwise unchanged\n", ot_peft_kind_name(c.kind), n_trained);
    assert_int_equal(n_trained, k == OT_PEFT_LORA ? 16 : k == OT_PEFT_BOTTLENECK ? 16 : 12);
    assert_int_equal(ot_peft_save(emu, ot_emu_peft_map(&f.plan, &emap), &c, ad1), 0);
    float *lt = logits(emu, &f);
    assert_int_equal(ot_emu_build(f.full, &f.plan, &emu2), 0);
    assert_int_equal(ot_peft_apply_dir(emu2, ot_emu_peft_map(&f.plan, &emap), ad1), 0);
    float *lp = logits(emu2, &f);
    assert_memory_equal(lt, lp, n_logits(&f) * sizeof(float));
    assert_true(memcmp(lt, l0, n_logits(&f) * sizeof(float)) != 0);
    free(lt);
    free(lp);
    free(before);
    free(after);
    free(l0);
    free(l1);
    ot_model_free(emu2);
    ot_model_free(emu);
  }
  free(l_full);
  ifx_close(&f);
}

/* PEFT layout: key names and shapes, identical tensors, adapter_config.json with PEFT's keys
 * only (PEFT before 0.14 raises on unknown keys), offtune's fields in offtune_adapter.json. */
static void test_peft_export(void **state) {
  (void)state;
  ifx f;
  ifx_open(&f);
  ot_peft_config c = kind_config(OT_PEFT_LORA);
  c.lora_sites = (1u << OT_SITE_QKV) | (1u << OT_SITE_DOWN);
  ot_model *emu;
  assert_int_equal(ot_emu_build(f.full, &f.plan, &emu), 0);
  assert_int_equal(ot_peft_attach(emu, ot_emu_peft_map(&f.plan, &emap), &c), 0);
  train_steps(emu, f.be, 2);
  char ad[700], path[800];
  snprintf(ad, sizeof ad, "%s/peft", dir);
  assert_int_equal(ot_peft_save(emu, ot_emu_peft_map(&f.plan, &emap), &c, ad), 0);
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", ad);
  ot_safetensors *st;
  assert_int_equal(ot_st_open(path, &st), 0);
  assert_int_equal(ot_st_count(st), 8); /* blocks 0 and 3, two sites, A and B */
  const struct {
    const char *file, *local;
    int d0, d1;
  } want[] = {
      {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
       "transformer.h.0.attn.c_attn.lora_A.weight", 2, 16},
      {"base_model.model.transformer.h.0.attn.c_attn.lora_B.weight",
       "transformer.h.0.attn.c_attn.lora_B.weight", 48, 2},
      {"base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight",
       "transformer.h.0.mlp.c_proj.lora_A.weight", 2, 64},
      {"base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight",
       "transformer.h.0.mlp.c_proj.lora_B.weight", 16, 2},
      /* full block 3 is emulator block 2 */
      {"base_model.model.transformer.h.3.attn.c_attn.lora_A.weight",
       "transformer.h.2.attn.c_attn.lora_A.weight", 2, 16},
      {"base_model.model.transformer.h.3.mlp.c_proj.lora_B.weight",
       "transformer.h.2.mlp.c_proj.lora_B.weight", 16, 2},
  };
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
    const ot_st_tensor *t = ot_st_find(st, want[i].file);
    if (!t) fail_msg("%s missing", want[i].file);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], want[i].d0);
    assert_int_equal(t->shape[1], want[i].d1);
    ot_param *p = ot_model_find_param(emu, want[i].local);
    assert_non_null(p);
    float *buf = malloc(p->numel * sizeof(float));
    assert_int_equal(ot_st_read_f32(st, t, buf, p->numel), 0);
    assert_memory_equal(buf, p->data, p->numel * sizeof(float));
    free(buf);
  }
  ot_st_close(st);
  const char *py = getenv("OT_PYTHON");
  assert_int_equal(
      ot_test_system(
          "%s -c \"import json,sys; c=json.load(open(sys.argv[1])); "
          "assert c['peft_type']=='LORA' and c['task_type']=='CAUSAL_LM' and c['r']==2 and "
          "c['lora_alpha']==16 and c['lora_dropout']==0.1 and c['fan_in_fan_out'] is True and "
          "c['bias']=='none' and c['target_modules']==['attn.c_attn','mlp.c_proj'] and "
          "c['layers_to_transform']==[0,3] and 'base_model_name_or_path' in c and "
          "c['use_rslora'] is False and c['use_dora'] is False and c['peft_version'] and "
          "set(c) <= {'peft_type','task_type','base_model_name_or_path','revision','inference_mode','r',"
          "'lora_alpha','lora_dropout','target_modules','fan_in_fan_out','bias','use_rslora','use_dora',"
          "'init_lora_weights','layers_to_transform','layers_pattern','rank_pattern','alpha_pattern',"
          "'modules_to_save','peft_version'}, c\" '%s/adapter_config.json'",
          py ? py : "/usr/bin/python3", ad),
      0);
  assert_int_equal(ot_test_system("%s -c \"import json,sys; c=json.load(open(sys.argv[1])); "
                                  "assert c['adapter_type']=='lora' and c['format_version']==2 and "
                                  "c['blocks']==[0,3] and len(c['adapter_digest'])==64 and "
                                  "len(c['base_model_digest'])==64, c\" '%s/offtune_adapter.json'",
                                  py ? py : "/usr/bin/python3", ad),
                   0);
  ot_model_free(emu);
  ifx_close(&f);
}

static double max_rel(const float *a, const float *b, size_t n) {
  double m = 0, s = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs((double)a[i] - b[i]);
    if (d > m) m = d;
    if (fabs(b[i]) > s) s = fabs(b[i]);
  }
  return m / s;
}

/* Merged weights score like model + adapter up to float32 rounding; refusals change nothing. */
static void test_merge_and_refusals(void **state) {
  (void)state;
  ifx f;
  ifx_open(&f);
  char lora[700], bn[700], path[800];
  snprintf(lora, sizeof lora, "%s/lora_tuned", dir); /* from test_attach_tune_plugin */
  snprintf(bn, sizeof bn, "%s/bottleneck_tuned", dir);
  ot_model *a, *b;
  assert_int_equal(ot_model_load_dir(f.model_dir, f.be, &a), 0);
  assert_int_equal(ot_model_load_dir(f.model_dir, f.be, &b), 0);
  assert_int_equal(ot_peft_apply_full(a, f.plan.base_digest, lora), 0);
  assert_int_equal(ot_peft_merge(b, f.plan.base_digest, lora), 0);
  assert_int_equal(ot_model_param_count(b), ot_model_base_param_count(b));
  float *la = logits(a, &f), *lb = logits(b, &f), *l_full = logits(f.full, &f);
  double e = max_rel(lb, la, n_logits(&f)), moved = max_rel(l_full, la, n_logits(&f));
  printf("merge: max logit difference %.3g of the largest (the adapter moved them by %.3g)\n", e, moved);
  assert_true(e < 1e-5);
  assert_true(moved > 1e-3);
  /* merging anything but LoRA is refused */
  ot_model *c;
  assert_int_equal(ot_model_load_dir(f.model_dir, f.be, &c), 0);
  assert_int_equal(ot_peft_merge(c, f.plan.base_digest, bn), OT_ERR_UNSUPPORTED);
  printf("merge bottleneck: %s\n", ot_error_detail());
  /* a model that already carries LoRA refuses a bottleneck, unchanged */
  int np = ot_model_param_count(a);
  assert_int_equal(ot_peft_apply_full(a, f.plan.base_digest, bn), OT_ERR_MISMATCH);
  printf("other extensions: %s\n", ot_error_detail());
  assert_int_equal(ot_model_param_count(a), np);
  /* another base */
  char wrong[OT_DIGEST_HEX];
  memset(wrong, 'b', 64);
  wrong[64] = '\0';
  assert_int_equal(ot_peft_apply_full(c, wrong, lora), OT_ERR_MISMATCH);
  printf("other base: %s\n", ot_error_detail());
  /* config edited: r 2 -> 3 no longer fits the tensors */
  char edited[700];
  snprintf(edited, sizeof edited, "%s/lora_edited", dir);
  assert_int_equal(ot_test_system("rm -rf '%s' && cp -r '%s' '%s' && sed -i 's/\"r\":\\t2/\"r\":\\t3/' "
                                  "'%s/adapter_config.json' && grep -q '\"r\":.3' '%s/adapter_config.json'",
                                  edited, lora, edited, edited, edited),
                   0);
  assert_int_equal(ot_peft_apply_full(c, f.plan.base_digest, edited), OT_ERR_MISMATCH);
  printf("edited r: %s\n", ot_error_detail());
  /* tampered tensor bytes */
  assert_int_equal(ot_test_system("rm -rf '%s' && cp -r '%s' '%s'", edited, lora, edited), 0);
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", edited);
  FILE *fp = fopen(path, "r+b");
  assert_non_null(fp);
  fseek(fp, -5, SEEK_END);
  int ch = fgetc(fp);
  fseek(fp, -5, SEEK_END);
  fputc(ch ^ 0x20, fp);
  fclose(fp);
  assert_int_equal(ot_peft_apply_full(c, f.plan.base_digest, edited), OT_ERR_MISMATCH);
  printf("tampered: %s\n", ot_error_detail());
  /* blocks the model lacks: an emulator has no block 1 adapter */
  assert_int_equal(ot_test_system("rm -rf '%s' && cp -r '%s' '%s' && sed -i "
                                  "'s/\"layers_to_transform\":\\t\\[0, 3\\]/\"layers_to_transform\":\\t[0, "
                                  "5]/' '%s/adapter_config.json' && grep -q '0, 5' '%s/adapter_config.json'",
                                  edited, lora, edited, edited, edited),
                   0);
  assert_int_equal(ot_peft_apply_full(c, f.plan.base_digest, edited), OT_ERR_MISMATCH);
  printf("missing block: %s\n", ot_error_detail());
  /* nothing changed by the refusals */
  assert_int_equal(ot_model_param_count(c), ot_model_base_param_count(c));
  float *lc = logits(c, &f);
  assert_memory_equal(lc, l_full, n_logits(&f) * sizeof(float));
  free(lc);
  free(la);
  free(lb);
  free(l_full);
  ot_model_free(a);
  ot_model_free(b);
  ot_model_free(c);
  ifx_close(&f);
}

/* Adapters written before offtune_adapter.json (format 1: offtune's fields inside
 * adapter_config.json) still load, to the same model. */
static void test_format1(void **state) {
  (void)state;
  ifx f;
  ifx_open(&f);
  const char *py = getenv("OT_PYTHON");
  const char *kinds[2] = {"lora", "bottleneck"};
  for (int k = 0; k < 2; k++) {
    char v2[700], v1[760];
    snprintf(v2, sizeof v2, "%s/%s_tuned", dir, kinds[k]); /* from test_attach_tune_plugin */
    snprintf(v1, sizeof v1, "%s/%s_format1", dir, kinds[k]);
    assert_int_equal(
        ot_test_system("rm -rf '%s' && cp -r '%s' '%s' && %s -c \"import json,os,sys; d=sys.argv[1]; "
                       "m=json.load(open(d+'/offtune_adapter.json')); p=d+'/adapter_config.json'; "
                       "c=json.load(open(p)) if os.path.exists(p) else {}; "
                       "c.update({k: m[k] for k in "
                       "('adapter_type','digest_algorithm','base_model_digest','adapter_digest')}); "
                       "c['format_version']=1; c['layers_to_transform']=m['blocks']; "
                       "c.update({'bottleneck_dim': m['bottleneck_dim']} if 'bottleneck_dim' in m else {}); "
                       "json.dump(c, open(p,'w')); os.remove(d+'/offtune_adapter.json')\" '%s'",
                       v1, v2, v1, py ? py : "/usr/bin/python3", v1),
        0);
    ot_model *a, *b;
    assert_int_equal(ot_model_load_dir(f.model_dir, f.be, &a), 0);
    assert_int_equal(ot_model_load_dir(f.model_dir, f.be, &b), 0);
    assert_int_equal(ot_peft_apply_full(a, f.plan.base_digest, v2), 0);
    if (ot_peft_apply_full(b, f.plan.base_digest, v1))
      fail_msg("format 1 %s: %s", kinds[k], ot_error_detail());
    float *la = logits(a, &f), *lb = logits(b, &f);
    assert_memory_equal(la, lb, n_logits(&f) * sizeof(float));
    printf("format 1 %s: loads, logits bitwise equal to format 2\n", kinds[k]);
    free(la);
    free(lb);
    ot_model_free(a);
    ot_model_free(b);
  }
  ifx_close(&f);
}

/* A LoRA "saved by PEFT" elsewhere (PEFT's keys only, layers_to_transform null, use_rslora) on
 * blocks 1 and 2: the import is bound to the base and scores like the base with
 * W += (alpha / sqrt(r)) B A folded in by hand here; flags that change the maths are refused by
 * name; offtune's own export imports back to the same adapter. */
#define PEFT_CFG                                                                                             \
  "{\"peft_type\": \"LORA\", \"task_type\": \"CAUSAL_LM\", \"base_model_name_or_path\": \"gpt2\", "          \
  "\"revision\": null, \"r\": 4, \"lora_alpha\": 8, \"lora_dropout\": 0.1, \"target_modules\": [\"c_fc\", "  \
  "\"c_attn\"], \"fan_in_fan_out\": true, \"bias\": \"none\", \"use_rslora\": true, \"use_dora\": false, "   \
  "\"init_lora_weights\": true, \"layers_to_transform\": null, \"layers_pattern\": null, \"rank_pattern\": " \
  "{}, \"alpha_pattern\": {}, \"modules_to_save\": null, \"megatron_config\": null, \"megatron_core\": "     \
  "\"megatron.core\", \"loftq_config\": {}, \"layer_replication\": null, \"exclude_modules\": null, "        \
  "\"lora_bias\": false, \"runtime_config\": {\"ephemeral_gpu_offload\": false}, \"inference_mode\": true, " \
  "\"a_future_setting\": null%s}"

static void write_peft(const char *d, const char *extra, float *tensors) {
  char path[800];
  assert_int_equal(ot_test_system("rm -rf '%s' && mkdir -p '%s'", d, d), 0);
  snprintf(path, sizeof path, "%s/adapter_config.json", d);
  FILE *fp = fopen(path, "w");
  assert_non_null(fp);
  fprintf(fp, PEFT_CFG, extra);
  fclose(fp);
  ot_st_writer *w;
  assert_int_equal(ot_st_writer_new(&w), 0);
  const char *site[2] = {"attn.c_attn", "mlp.c_fc"};
  const int outw[2] = {48, 64};
  char names[8][128];
  float *t = tensors;
  for (int b = 0; b < 2; b++)
    for (int s = 0; s < 2; s++)
      for (int ab = 0; ab < 2; ab++) {
        char *nm = names[(b * 2 + s) * 2 + ab];
        snprintf(nm, 128, "base_model.model.transformer.h.%d.%s.lora_%c.weight", b + 1, site[s],
                 ab ? 'B' : 'A');
        int64_t shape[2] = {ab ? outw[s] : 4, ab ? 4 : 16};
        assert_int_equal(ot_st_writer_add(w, nm, OT_DTYPE_F32, 2, shape, t), 0);
        t += shape[0] * shape[1];
      }
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", d);
  assert_int_equal(ot_st_writer_save(w, path), 0);
  ot_st_writer_free(w);
}

static void test_peft_import(void **state) {
  (void)state;
  ifx f;
  ifx_open(&f);
  char digest[OT_DIGEST_HEX], src[700], out[700];
  assert_int_equal(ot_model_dir_digest(f.model_dir, digest), 0);
  /* A [4, 16], B [out, 4] for c_attn (out 48) and c_fc (out 64), blocks 1 and 2 */
  size_t n_vals = 2 * (4 * 16 + 48 * 4 + 4 * 16 + 64 * 4);
  float *vals = malloc(n_vals * sizeof(float));
  for (size_t i = 0; i < n_vals; i++) vals[i] = (float)(((i * 2654435761u) % 1000) / 1000.0 - 0.5) * 0.2f;
  snprintf(src, sizeof src, "%s/peft_in", dir);
  snprintf(out, sizeof out, "%s/peft_imported", dir);
  write_peft(src, "", vals);
  /* not imported yet: refused with what to do */
  ot_model *a;
  assert_int_equal(ot_model_load_dir(f.model_dir, f.be, &a), 0);
  assert_int_equal(ot_peft_apply_full(a, digest, src), OT_ERR_UNSUPPORTED);
  printf("foreign: %s\n", ot_error_detail());
  assert_non_null(strstr(ot_error_detail(), "import"));
  ot_peft_import_info info;
  if (ot_peft_import(src, ot_model_cfg(f.full), digest, "gpt2", out, &info))
    fail_msg("import: %s", ot_error_detail());
  assert_int_equal(info.r, 4);
  assert_int_equal(info.rslora, 1);
  assert_int_equal(info.n_blocks, 2);
  assert_int_equal(info.n_tensors, 8);
  assert_int_equal(ot_peft_apply_full(a, digest, out), 0);
  /* the same by hand: Conv1D W [in, out] += 4 * (B A)^T, scale alpha / sqrt(r) = 8 / 2 */
  ot_model *b;
  assert_int_equal(ot_model_load_dir(f.model_dir, f.be, &b), 0);
  const float *v = vals;
  for (int blk = 1; blk <= 2; blk++)
    for (int s = 0; s < 2; s++) {
      int outw = s ? 64 : 48;
      char nm[96];
      snprintf(nm, sizeof nm, "transformer.h.%d.%s.weight", blk, s ? "mlp.c_fc" : "attn.c_attn");
      ot_param *W = ot_model_find_param(b, nm);
      assert_non_null(W);
      const float *A = v, *B = v + 4 * 16;
      for (int i = 0; i < 16; i++)
        for (int o = 0; o < outw; o++) {
          double acc = 0;
          for (int k = 0; k < 4; k++) acc += (double)B[o * 4 + k] * A[k * 16 + i];
          W->data[i * outw + o] += (float)(4.0 * acc);
        }
      v += 4 * 16 + outw * 4;
    }
  float *la = logits(a, &f), *lb = logits(b, &f), *l_full = logits(f.full, &f);
  double e = max_rel(la, lb, n_logits(&f)), moved = max_rel(l_full, lb, n_logits(&f));
  printf("imported rsLoRA vs folded by hand: max logit difference %.3g (the adapter moved them by %.3g)\n", e,
         moved);
  assert_true(e < 1e-5);
  assert_true(moved > 1e-2);
  /* flags that change the maths, refused by name; nothing written */
  const struct {
    const char *extra, *word;
  } bad[] = {{", \"use_dora\": true", "DoRA"},
             {", \"rank_pattern\": {\"c_attn\": 8}", "rank_pattern"},
             {", \"alpha_pattern\": {\"c_fc\": 32}", "alpha_pattern"},
             {", \"modules_to_save\": [\"lm_head\"]", "modules_to_save"},
             {", \"layer_replication\": [[0, 2]]", "replication"},
             {", \"a_flag_from_the_future\": true", "a_flag_from_the_future"}};
  char refused[700];
  snprintf(refused, sizeof refused, "%s/peft_refused", dir);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char d[760];
    snprintf(d, sizeof d, "%s/peft_bad", dir);
    write_peft(d, bad[i].extra, vals);
    assert_int_equal(ot_peft_import(d, ot_model_cfg(f.full), digest, NULL, refused, NULL),
                     OT_ERR_UNSUPPORTED);
    printf("refused: %s\n", ot_error_detail());
    assert_non_null(strstr(ot_error_detail(), bad[i].word));
  }
  char d[760];
  snprintf(d, sizeof d, "%s/peft_bad", dir);
  /* a regular expression, the wrong layout flag, a rank the tensors do not have */
  write_peft(d, "", vals);
  assert_int_equal(
      ot_test_system("sed -i 's/\\[\"c_fc\", \"c_attn\"\\]/\".*attn.*\"/' '%s/adapter_config.json'", d), 0);
  assert_int_equal(ot_peft_import(d, ot_model_cfg(f.full), digest, NULL, refused, NULL), OT_ERR_UNSUPPORTED);
  printf("refused: %s\n", ot_error_detail());
  write_peft(d, "", vals);
  assert_int_equal(ot_test_system("sed -i 's/\"fan_in_fan_out\": true/\"fan_in_fan_out\": false/' "
                                  "'%s/adapter_config.json'",
                                  d),
                   0);
  assert_int_equal(ot_peft_import(d, ot_model_cfg(f.full), digest, NULL, refused, NULL), OT_ERR_UNSUPPORTED);
  printf("refused: %s\n", ot_error_detail());
  write_peft(d, "", vals);
  assert_int_equal(ot_test_system("sed -i 's/\"r\": 4/\"r\": 2/' '%s/adapter_config.json'", d), 0);
  assert_int_equal(ot_peft_import(d, ot_model_cfg(f.full), digest, NULL, refused, NULL), OT_ERR_MISMATCH);
  printf("refused: %s\n", ot_error_detail());
  assert_int_equal(
      ot_test_system("rm -f '%s/adapter_model.safetensors' && touch '%s/adapter_model.bin'", d, d), 0);
  assert_int_equal(ot_peft_import(d, ot_model_cfg(f.full), digest, NULL, refused, NULL), OT_ERR_UNSUPPORTED);
  printf("refused: %s\n", ot_error_detail());
  assert_int_equal(ot_test_system("test ! -e '%s'", refused), 0);
  /* offtune's export, seen as a PEFT user sees it (no offtune_adapter.json), imports back */
  char lora[700], seen[760], back[760];
  snprintf(lora, sizeof lora, "%s/lora_tuned", dir); /* from test_attach_tune_plugin */
  snprintf(seen, sizeof seen, "%s/peft_seen", dir);
  snprintf(back, sizeof back, "%s/peft_back", dir);
  assert_int_equal(ot_test_system("rm -rf '%s' && mkdir '%s' && cp '%s/adapter_config.json' "
                                  "'%s/adapter_model.safetensors' '%s/'",
                                  seen, seen, lora, lora, seen),
                   0);
  assert_int_equal(ot_peft_import(seen, ot_model_cfg(f.full), digest, NULL, back, NULL), 0);
  assert_int_equal(
      ot_test_system("cmp '%s/adapter_model.safetensors' '%s/adapter_model.safetensors'", lora, back), 0);
  free(la);
  free(lb);
  free(l_full);
  free(vals);
  ot_model_free(a);
  ot_model_free(b);
  ifx_close(&f);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_lora_grad),       cmocka_unit_test(test_lora_dropout_grad),
      cmocka_unit_test(test_bottleneck_grad), cmocka_unit_test(test_bitfit_grad),
      cmocka_unit_test(test_dropout_mask),    cmocka_unit_test(test_attach_tune_plugin),
      cmocka_unit_test(test_peft_export),     cmocka_unit_test(test_merge_and_refusals),
      cmocka_unit_test(test_format1),         cmocka_unit_test(test_peft_import),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
