#include "serve_fixture.h"

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
#include "ot_error.h"
#include "ot_eval.h"
#include "ot_fileio.h"
#include "ot_test_util.h"

static ot_peft_map emap; /* block map of the emulator at hand */

const char *models[N_MODELS] = {"", "off1", "off2", "lora1", "lora2", "bn1", "bf1"};
const char *prompts[N_PROMPTS] = {"The quick brown fox", "Hi", "Once upon a time, in a land far away"};

char *dir;
char digest[OT_DIGEST_HEX];
ot_backend *be;
ot_model *base;
ot_model *ref[N_MODELS];            /* base + adapter applied, prepared for generation */
int32_t *want[N_MODELS][N_PROMPTS]; /* ot_generate greedy completions */
ot_tokenizer *tok;

static uint64_t rng_state;
static double gauss(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  double u1 = ((rng_state >> 11) + 0.5) / 9007199254740992.0;
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  double u2 = ((rng_state >> 11) + 0.5) / 9007199254740992.0;
  return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

/* Adds N(0, std) to every tensor (only the trainable ones with only_trainable). */
static void perturb(ot_model *m, int only_trainable, float std) {
  for (int i = 0; i < ot_model_param_count(m); i++) {
    ot_param *p = ot_model_param(m, i);
    if (only_trainable && !p->trainable) continue;
    for (size_t j = 0; j < p->numel; j++) p->data[j] += (float)(std * gauss());
  }
}

static void make_adapter(const ot_emu_plan *plan, const char *name, ot_peft_kind kind, uint64_t seed) {
  ot_model *emu = NULL;
  assert_int_equal(ot_emu_build(base, plan, &emu), 0);
  ot_peft_config c;
  ot_peft_config_default(&c);
  c.kind = kind;
  c.lora_r = 4;
  c.lora_alpha = 8.0f;
  c.bottleneck_dim = 8;
  c.seed = seed;
  assert_int_equal(ot_peft_attach(emu, ot_emu_peft_map(plan, &emap), &c), 0);
  rng_state = seed;
  perturb(emu, 1, kind == OT_PEFT_OFFSITE ? 0.05f : 0.3f);
  char path[600];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  assert_int_equal(ot_peft_save(emu, ot_emu_peft_map(plan, &emap), &c, path), 0);
  ot_model_free(emu);
}

int32_t *encode(const char *s, size_t *n) {
  int32_t *ids = NULL;
  assert_int_equal(ot_tokenizer_encode(tok, s, strlen(s), &ids, n), 0);
  return ids;
}

int resolve(void *user, const char *name, char *out, size_t cap) {
  (void)user;
  char path[700];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  if (strchr(name, '/') || !ot_peft_is_adapter_dir(path))
    return ot_error(OT_ERR_NOTFOUND, "no adapter '%s'", name);
  snprintf(out, cap, "%s/%s", dir, name);
  return OT_OK;
}

int serve_fixture_setup(const char *name) {
  dir = ot_test_tmpdir(name);
  assert_int_equal(ot_backend_cpu_create(2, &be), 0);
  assert_int_equal(ot_tokenizer_byte_new(&tok), 0);
  ot_model_config cfg = {.n_layer = 4,
                         .n_head = 2,
                         .n_embd = 32,
                         .vocab_size = 256,
                         .n_positions = 64,
                         .layer_norm_epsilon = 1e-5f};
  assert_int_equal(ot_model_create(&cfg, be, &base), 0);
  assert_int_equal(ot_model_init_random(base, 11), 0);
  rng_state = 5;
  perturb(base, 0, 0.05f); /* biases and gains away from 0 and 1, sharper logits */
  char path[600];
  snprintf(path, sizeof path, "%s/base", dir);
  assert_int_equal(ot_model_save_dir(base, path), 0);
  assert_int_equal(ot_tokenizer_save_dir(tok, path), 0);
  snprintf(path, sizeof path, "%s/base/model.safetensors", dir);
  assert_int_equal(ot_file_digest(path, digest), 0);
  ot_emu_plan plan;
  assert_int_equal(ot_emu_plan_make(4, 1, 1, 1, &plan), 0);
  snprintf(plan.base_digest, sizeof plan.base_digest, "%s", digest);
  make_adapter(&plan, "off1", OT_PEFT_OFFSITE, 21);
  make_adapter(&plan, "off2", OT_PEFT_OFFSITE, 22);
  make_adapter(&plan, "lora1", OT_PEFT_LORA, 23);
  make_adapter(&plan, "lora2", OT_PEFT_LORA, 24);
  make_adapter(&plan, "bn1", OT_PEFT_BOTTLENECK, 25);
  make_adapter(&plan, "bf1", OT_PEFT_BITFIT, 26);
  for (int k = 0; k < N_MODELS; k++) {
    snprintf(path, sizeof path, "%s/base", dir);
    assert_int_equal(ot_model_load_dir(path, be, &ref[k]), 0);
    if (*models[k]) {
      snprintf(path, sizeof path, "%s/%s", dir, models[k]);
      assert_int_equal(ot_peft_apply_full(ref[k], digest, path), 0);
    }
    assert_int_equal(ot_model_prepare(ref[k], 1, 64, 0), 0);
    for (int p = 0; p < N_PROMPTS; p++) {
      size_t n = 0, n_out = 0;
      int32_t *ids = encode(prompts[p], &n), *out = NULL;
      ot_sample_config sc = {GEN, 0.0f, 1.0f, 0};
      assert_int_equal(ot_generate(ref[k], ids, n, &sc, &out, &n_out), 0);
      assert_int_equal(n_out, n + GEN);
      want[k][p] = malloc(GEN * sizeof(int32_t));
      memcpy(want[k][p], out + n, GEN * sizeof(int32_t));
      free(ids);
      free(out);
    }
  }
  /* the adapters must change the function, or the tests below prove little */
  for (int k = 1; k < N_MODELS; k++)
    if (memcmp(want[k][0], want[0][0], GEN * sizeof(int32_t)) == 0 &&
        memcmp(want[k][2], want[0][2], GEN * sizeof(int32_t)) == 0)
      fail_msg("adapter %s generates the base model's text", models[k]);
  return 0;
}

int serve_fixture_teardown(void) {
  for (int k = 0; k < N_MODELS; k++) {
    ot_model_free(ref[k]);
    for (int p = 0; p < N_PROMPTS; p++) free(want[k][p]);
  }
  ot_model_free(base);
  ot_tokenizer_free(tok);
  ot_backend_free(be);
  free(dir);
  return 0;
}

ot_serve_engine *engine(int max_batch, int step_tokens, size_t budget, int32_t eos) {
  ot_serve_config c;
  ot_serve_config_default(&c);
  c.max_batch = max_batch;
  c.max_step_tokens = step_tokens;
  c.adapter_budget = budget;
  c.resolve = resolve;
  c.tok = tok;
  c.eos_id = eos;
  c.base_digest = digest;
  ot_serve_engine *e = NULL;
  int rc = ot_serve_engine_create(base, &c, &e);
  if (rc) fail_msg("engine: %s", ot_error_detail());
  return e;
}
