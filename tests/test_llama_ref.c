/* The LLaMA family (llama, qwen2, mistral) against an independent PyTorch implementation
 * written from the Hugging Face definitions (tests/ref/llama_ref.py, float64): logits, loss and
 * every parameter gradient with and without grouped-query attention, tied and untied heads,
 * Qwen2 and attention biases, a head_dim other than n_embd / n_head, rope_theta 1e4 to 1e6 and
 * Llama 3's rope scaling; sharded and BF16 checkpoints; AdamW trajectories; LoRA on every
 * projection, merged into the weights; plus finite differences that need no PyTorch. */
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
#include "ot_serve_engine.h"
#include "ot_test_util.h"

/* fp32 against float64: rounding only, ~1e-6 relative; a wrong rotation, head grouping or
 * norm moves errors to 1e-2 or more */
#define REL_TOL 1e-4

static char *ref_dir;
static double worst_err;
static char cases[8][32];
static int n_cases;

static int setup(void **state) {
  (void)state;
  ref_dir = ot_test_tmpdir("llama_ref");
  if (ot_test_ref("llama_ref.py", ref_dir) != 0) return -1;
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
  double e = ot_test_rel_err(got, want, n), maxabs = 0, maxref = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs((double)got[i] - want[i]);
    if (d > maxabs) maxabs = d;
    if (fabs(want[i]) > maxref) maxref = fabs(want[i]);
  }
  if (e > worst_err) worst_err = e;
  if (!(e < REL_TOL) || !(maxabs <= REL_TOL * maxref + 1e-7))
    fail_msg("%s/%s: relative error %.3g, max abs diff %.3g (max |ref| %.3g)", cs, what, e, maxabs, maxref);
}

static void check_logits_loss_grads(ot_test_case *fx, const char *cs) {
  const ot_model_config *cfg = ot_model_cfg(fx->m);
  assert_int_not_equal(cfg->arch, OT_ARCH_GPT2);
  size_t N = (size_t)fx->B * fx->T, V = cfg->vocab_size;
  assert_int_equal(ot_model_prepare(fx->m, fx->B, fx->T, 1), 0);
  float *logits = malloc(N * V * sizeof(float));
  assert_int_equal(ot_model_forward_logits(fx->m, fx->in, fx->B, fx->T, logits), 0);
  size_t nref;
  float *want = ot_test_st_f32(fx->ref, "logits", &nref);
  assert_int_equal(nref, N * V);
  check_close("logits", cs, logits, want, N * V);
  free(want);
  free(logits);
  float loss;
  assert_int_equal(ot_model_forward(fx->m, fx->in, fx->tg, fx->B, fx->T, &loss), 0);
  float *wl = ot_test_st_f32(fx->ref, "loss", NULL);
  if (!(fabs(loss - wl[0]) < REL_TOL * fabs(wl[0]))) fail_msg("%s: loss %.8f, PyTorch %.8f", cs, loss, wl[0]);
  free(wl);
  assert_int_equal(ot_model_backward(fx->m), 0);
  for (int i = 0; i < ot_model_param_count(fx->m); i++) {
    ot_param *p = ot_model_param(fx->m, i);
    char name[160];
    snprintf(name, sizeof name, "grad.%s", p->name);
    size_t n;
    float *g = ot_test_st_f32(fx->ref, name, &n);
    assert_int_equal(n, p->numel);
    assert_non_null(p->grad);
    check_close(p->name, cs, p->grad, g, n);
    free(g);
  }
}

static void test_logits_loss_grads(void **state) {
  (void)state;
  for (int c = 0; c < n_cases; c++) {
    ot_test_case fx;
    fixture_open(&fx, cases[c], NULL);
    check_logits_loss_grads(&fx, cases[c]);
    ot_test_case_close(&fx);
  }
}

/* model.safetensors.index.json with two shards loads to the same model. */
static void test_sharded_checkpoints(void **state) {
  (void)state;
  for (int c = 0; c < n_cases; c++) {
    ot_test_case fx;
    fixture_open(&fx, cases[c], "sharded");
    char label[320];
    snprintf(label, sizeof label, "%s/sharded", cases[c]);
    check_logits_loss_grads(&fx, label);
    ot_test_case_close(&fx);
  }
}

static void test_bf16_checkpoints(void **state) {
  (void)state;
  for (int c = 0; c < n_cases; c++) {
    ot_test_case fx;
    fixture_open(&fx, cases[c], "bf16");
    assert_int_equal(ot_model_prepare(fx.m, fx.B, fx.T, 0), 0);
    float loss;
    assert_int_equal(ot_model_forward(fx.m, fx.in, fx.tg, fx.B, fx.T, &loss), 0);
    float *wl = ot_test_st_f32(fx.ref, "loss_bf16", NULL);
    if (!(fabs(loss - wl[0]) < REL_TOL * fabs(wl[0])))
      fail_msg("%s/bf16: loss %.8f, PyTorch %.8f", cases[c], loss, wl[0]);
    free(wl);
    ot_test_case_close(&fx);
  }
}

static float meta_f(ot_safetensors *st, const char *key) {
  const char *v = ot_st_metadata(st, key);
  assert_non_null(v);
  return strtof(v, NULL);
}

static void test_adamw_trajectories(void **state) {
  (void)state;
  for (int c = 0; c < n_cases; c++) {
    ot_test_case fx;
    fixture_open(&fx, cases[c], NULL);
    assert_int_equal(ot_model_prepare(fx.m, fx.B, fx.T, 1), 0);
    ot_optim_config oc;
    ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
    float lr = meta_f(fx.ref, "adamw_lr");
    oc.weight_decay = meta_f(fx.ref, "adamw_wd");
    oc.grad_clip = meta_f(fx.ref, "adamw_clip");
    ot_optimizer *opt;
    assert_int_equal(
        ot_optimizer_create(&oc, fx.be, ot_model_param(fx.m, 0), ot_model_param_count(fx.m), &opt), 0);
    uint64_t n;
    float *want = ot_test_st_f32(fx.ref, "adamw_losses", &n);
    for (uint64_t s = 0; s < n; s++) {
      float loss;
      assert_int_equal(ot_model_forward(fx.m, fx.in, fx.tg, fx.B, fx.T, &loss), 0);
      if (!(fabs(loss - want[s]) < 2e-4 * fabs(want[s])))
        fail_msg("%s adamw step %d: loss %.7f, PyTorch %.7f", cases[c], (int)s, loss, want[s]);
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

/* LoRA on all seven projections: with B = 0 the model is unchanged; after setting B, merging
 * into the [out, in] weights gives the same logits as the branch. */
static void test_lora_merge(void **state) {
  (void)state;
  ot_test_case fx;
  fixture_open(&fx, cases[0], NULL);
  const ot_model_config *cfg = ot_model_cfg(fx.m);
  size_t N = (size_t)fx.B * fx.T, V = cfg->vocab_size;
  float *base = malloc(N * V * sizeof(float)), *branch = malloc(N * V * sizeof(float)),
        *merged = malloc(N * V * sizeof(float));
  assert_int_equal(ot_model_prepare(fx.m, fx.B, fx.T, 0), 0);
  assert_int_equal(ot_model_forward_logits(fx.m, fx.in, fx.B, fx.T, base), 0);
  ot_block_ext *ext = calloc((size_t)cfg->n_layer, sizeof *ext);
  for (int l = 0; l < cfg->n_layer; l++)
    ext[l] = (ot_block_ext){.lora_sites = ot_arch_sites(cfg->arch), .lora_r = 4, .lora_alpha = 8.0f};
  assert_int_equal(ot_arch_sites(cfg->arch), (1u << OT_SITE_Q) | (1u << OT_SITE_K) | (1u << OT_SITE_V) |
                                                 (1u << OT_SITE_O) | (1u << OT_SITE_GATE) |
                                                 (1u << OT_SITE_UP) | (1u << OT_SITE_DOWN));
  assert_int_equal(ot_model_add_extensions(fx.m, ext, 5), 0);
  assert_non_null(ot_model_find_param(fx.m, "model.layers.1.mlp.gate_proj.lora_B.weight"));
  assert_int_equal(ot_model_prepare(fx.m, fx.B, fx.T, 0), 0);
  assert_int_equal(ot_model_forward_logits(fx.m, fx.in, fx.B, fx.T, branch), 0);
  check_close("lora B=0", cases[0], branch, base, N * V);
  for (int i = ot_model_base_param_count(fx.m); i < ot_model_param_count(fx.m); i++) {
    ot_param *p = ot_model_param(fx.m, i);
    for (size_t j = 0; j < p->numel; j++)
      p->data[j] = 0.01f * (float)((int)((j * 13 + (size_t)i * 7) % 11) - 5);
  }
  assert_int_equal(ot_model_forward_logits(fx.m, fx.in, fx.B, fx.T, branch), 0);
  double moved = ot_test_rel_err(branch, base, N * V);
  if (!(moved > 1e-2))
    fail_msg("the adapter moved the logits by only %.3g", moved); /* it changes the model */
  assert_int_equal(ot_model_merge_lora(fx.m), 0);
  assert_int_equal(ot_model_param_count(fx.m), ot_model_base_param_count(fx.m));
  assert_int_equal(ot_model_prepare(fx.m, fx.B, fx.T, 0), 0);
  assert_int_equal(ot_model_forward_logits(fx.m, fx.in, fx.B, fx.T, merged), 0);
  check_close("lora merged", cases[0], merged, branch, N * V);
  /* a GPT-2 module name is refused by name, not ignored */
  ext[0].lora_sites = 1u << OT_SITE_QKV;
  assert_int_equal(ot_model_add_extensions(fx.m, ext, 5), OT_ERR_UNSUPPORTED);
  free(ext);
  free(base);
  free(branch);
  free(merged);
  ot_test_case_close(&fx);
}

/* Saving writes a checkpoint that loads back to the same logits (config.json round trip). */
static void test_save_load(void **state) {
  (void)state;
  for (int c = 0; c < n_cases; c++) {
    ot_test_case fx;
    fixture_open(&fx, cases[c], NULL);
    char *dir = ot_test_tmpdir("llama_saved");
    assert_int_equal(ot_model_save_dir(fx.m, dir), 0);
    ot_model *m2;
    assert_int_equal(ot_model_load_dir(dir, fx.be, &m2), 0);
    const ot_model_config *a = ot_model_cfg(fx.m), *b = ot_model_cfg(m2);
    assert_int_equal(a->arch, b->arch);
    assert_int_equal(a->n_kv_head, b->n_kv_head);
    assert_int_equal(a->head_dim, b->head_dim);
    assert_int_equal(a->tie_embeddings, b->tie_embeddings);
    assert_int_equal(a->attn_bias, b->attn_bias);
    assert_true(a->rope_theta == b->rope_theta && a->rope_factor == b->rope_factor);
    size_t N = (size_t)fx.B * fx.T, V = a->vocab_size;
    float *x = malloc(N * V * sizeof(float)), *y = malloc(N * V * sizeof(float));
    assert_int_equal(ot_model_prepare(fx.m, fx.B, fx.T, 0), 0);
    assert_int_equal(ot_model_prepare(m2, fx.B, fx.T, 0), 0);
    assert_int_equal(ot_model_forward_logits(fx.m, fx.in, fx.B, fx.T, x), 0);
    assert_int_equal(ot_model_forward_logits(m2, fx.in, fx.B, fx.T, y), 0);
    assert_memory_equal(x, y, N * V * sizeof(float));
    free(x);
    free(y);
    ot_model_free(m2);
    free(dir);
    ot_test_case_close(&fx);
  }
}

/* Configs that would change the maths and are not implemented are refused by name. */
static void test_refused_configs(void **state) {
  (void)state;
  const char *bad[][2] = {
      {"{\"model_type\":\"llama\",\"hidden_act\":\"gelu\",\"num_hidden_layers\":1,\"num_attention_heads\":2,"
       "\"hidden_size\":8,\"intermediate_size\":16,\"vocab_size\":10,\"max_position_embeddings\":8}",
       "hidden_act"},
      {"{\"model_type\":\"mistral\",\"sliding_window\":4,\"num_hidden_layers\":1,\"num_attention_heads\":2,"
       "\"hidden_size\":8,\"intermediate_size\":16,\"vocab_size\":10,\"max_position_embeddings\":8}",
       "sliding_window"},
      {"{\"model_type\":\"llama\",\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":2},\"num_hidden_"
       "layers\":1,"
       "\"num_attention_heads\":2,\"hidden_size\":8,\"intermediate_size\":16,\"vocab_size\":10,"
       "\"max_position_embeddings\":8}",
       "yarn"},
      {"{\"model_type\":\"llama\",\"mlp_bias\":true,\"num_hidden_layers\":1,\"num_attention_heads\":2,"
       "\"hidden_size\":8,\"intermediate_size\":16,\"vocab_size\":10,\"max_position_embeddings\":8}",
       "mlp_bias"},
      {"{\"model_type\":\"qwen2\",\"use_sliding_window\":true,\"num_hidden_layers\":1,\"num_attention_"
       "heads\":2,"
       "\"hidden_size\":8,\"intermediate_size\":16,\"vocab_size\":10,\"max_position_embeddings\":8}",
       "use_sliding_window"},
      {"{\"model_type\":\"llama\",\"num_key_value_heads\":3,\"num_hidden_layers\":1,\"num_attention_heads\":"
       "4,"
       "\"hidden_size\":8,\"intermediate_size\":16,\"vocab_size\":10,\"max_position_embeddings\":8}",
       "key/value heads"},
      {"{\"model_type\":\"falcon\",\"num_hidden_layers\":1}", "falcon"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    ot_model_config c;
    int rc = ot_model_config_parse(bad[i][0], strlen(bad[i][0]), &c);
    assert_int_not_equal(rc, OT_OK);
    if (!strstr(ot_error_detail(), bad[i][1]))
      fail_msg("case %zu: '%s' does not name %s", i, ot_error_detail(), bad[i][1]);
  }
}

typedef struct {
  float logits[8][64];
  int n;
} seen_logits;

static void keep_logits(void *user, const ot_serve_event *ev) {
  seen_logits *k = user;
  if (ev->logits && k->n < 8) {
    assert_true(ev->vocab <= 64);
    memcpy(k->logits[k->n++], ev->logits, (size_t)ev->vocab * sizeof(float));
  }
}

/* Serving runs the same block code with a KV cache: three requests of different lengths, batched
 * together with prefills in chunks, give the logits the model's full forward gives at every
 * step (greedy decoding, so the tokens match too). */
static void test_serving_matches_forward(void **state) {
  (void)state;
  for (int c = 0; c < n_cases; c++) {
    ot_test_case fx;
    fixture_open(&fx, cases[c], NULL);
    const ot_model_config *cfg = ot_model_cfg(fx.m);
    int V = cfg->vocab_size, gen = 5;
    assert_true(V <= 64);
    ot_serve_config sc;
    ot_serve_config_default(&sc);
    sc.max_batch = 3;
    sc.max_step_tokens = 8; /* prompts are prefilled over several steps */
    sc.max_seq = cfg->n_positions < 24 ? cfg->n_positions : 24;
    ot_serve_engine *e;
    if (ot_serve_engine_create(fx.m, &sc, &e)) fail_msg("%s: engine: %s", cases[c], ot_error_detail());
    int32_t prompts[3][12];
    int lens[3] = {3, 11, 6};
    seen_logits got[3];
    memset(got, 0, sizeof got);
    for (int r = 0; r < 3; r++) {
      for (int i = 0; i < lens[r]; i++) prompts[r][i] = (int32_t)((r * 7 + i * 5 + 1) % V);
      ot_serve_request rq = {.prompt = prompts[r],
                             .n_prompt = (size_t)lens[r],
                             .max_tokens = gen,
                             .top_p = 1.0f,
                             .ignore_eos = 1};
      uint64_t id;
      assert_int_equal(ot_serve_submit(e, &rq, keep_logits, &got[r], &id), 0);
    }
    int busy = 1;
    while (busy) assert_int_equal(ot_serve_step(e, &busy), 0);
    ot_serve_engine_free(e);
    for (int r = 0; r < 3; r++) {
      assert_int_equal(got[r].n, gen);
      int32_t seq[24];
      memcpy(seq, prompts[r], (size_t)lens[r] * sizeof(int32_t));
      int n = lens[r];
      for (int t = 0; t < gen; t++) {
        float want[64];
        assert_int_equal(ot_model_prepare(fx.m, 1, n, 0), 0);
        assert_int_equal(ot_model_forward(fx.m, seq, NULL, 1, n, NULL), 0);
        assert_int_equal(ot_model_last_logits(fx.m, 0, want), 0);
        char what[64];
        snprintf(what, sizeof what, "serving request %d step %d", r, t);
        check_close(what, cases[c], got[r].logits[t], want, (size_t)V);
        int best = 0;
        for (int v = 1; v < V; v++)
          if (got[r].logits[t][v] > got[r].logits[t][best]) best = v;
        seq[n++] = best;
      }
    }
    ot_test_case_close(&fx);
  }
}

/* Central differences on a tiny GQA model with biases, independent of PyTorch. */
static void test_finite_differences(void **state) {
  (void)state;
  ot_backend *be;
  assert_int_equal(ot_backend_cpu_create(1, &be), 0);
  ot_model_config cfg = {.n_layer = 2,
                         .n_head = 4,
                         .n_embd = 8,
                         .vocab_size = 11,
                         .n_positions = 8,
                         .layer_norm_epsilon = 1e-6f,
                         .arch = OT_ARCH_QWEN2,
                         .n_kv_head = 2,
                         .head_dim = 4,
                         .n_ff = 12,
                         .attn_bias = 1,
                         .rope_theta = 100.0f};
  ot_model *m;
  assert_int_equal(ot_model_create(&cfg, be, &m), 0);
  assert_int_equal(ot_model_init_random(m, 7), 0);
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
      cmocka_unit_test(test_logits_loss_grads),  cmocka_unit_test(test_sharded_checkpoints),
      cmocka_unit_test(test_bf16_checkpoints),   cmocka_unit_test(test_adamw_trajectories),
      cmocka_unit_test(test_lora_merge),         cmocka_unit_test(test_save_load),
      cmocka_unit_test(test_refused_configs),    cmocka_unit_test(test_serving_matches_forward),
      cmocka_unit_test(test_finite_differences),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
