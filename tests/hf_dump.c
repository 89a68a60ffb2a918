/* hf_dump: offtune's logits and loss for one token sequence, for the Hugging Face cross-checks
 * (scripts/hf_check/). Loads a checkpoint directory (any architecture), optionally plugs in an
 * adapter exactly as `offtune-cloud eval --adapter` does, runs the model's forward on the tokens
 * (targets = the tokens shifted by one) and writes
 *   OUT.bin   float32 logits [T, vocab], little-endian, row-major
 *   OUT.json  {"loss": mean next-token cross-entropy, "T": T, "vocab": V, "backend": name}
 * Usage: hf_dump --model DIR [--adapter DIR] [--backend cpu|cuda] --tokens "i0 i1 ..." --out OUT
 * and, to write a small random checkpoint with ot_model_save_dir (architectures and head
 * layouts that pretrain has no option for, e.g. an untied LLaMA):
 *        hf_dump --init gpt2|llama|llama-tied|qwen2 --save DIR
 * and, for the tokenizers check, the ids of a UTF-8 file under a tokenizer.json, one line
 * without and one with special tokens added (OT_TOK_ADD_SPECIAL), space-separated:
 *        hf_dump --encode TOKENIZER_JSON TOKENIZER_CONFIG_JSON TEXT_FILE */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_digest.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_peft.h"
#include "ot_backend.h"
#include "ot_model.h"
#include "ot_tokenizer.h"

static int parse_tokens(const char *s, int32_t **out, int *n) {
  int cap = 16, k = 0;
  int32_t *t = malloc(sizeof *t * (size_t)cap);
  if (!t) return ot_error(OT_ERR_NOMEM, "tokens");
  char *end;
  for (;;) {
    while (*s == ' ' || *s == ',') s++;
    if (!*s) break;
    long v = strtol(s, &end, 10);
    if (end == s || v < 0 || v > INT32_MAX) {
      free(t);
      return ot_error(OT_ERR_INVALID, "--tokens: not a token id at '%s'", s);
    }
    if (k == cap) {
      int32_t *g = realloc(t, sizeof *t * (size_t)(cap *= 2));
      if (!g) {
        free(t);
        return ot_error(OT_ERR_NOMEM, "tokens");
      }
      t = g;
    }
    t[k++] = (int32_t)v;
    s = end;
  }
  *out = t;
  *n = k;
  return OT_OK;
}

static int run(const char *model, const char *adapter, const char *backend, const char *tokens,
               const char *out) {
  int32_t *tok = NULL;
  int T = 0;
  int rc = parse_tokens(tokens, &tok, &T);
  if (rc == OT_OK && T < 2) rc = ot_error(OT_ERR_INVALID, "--tokens: need at least 2 tokens");
  ot_backend *be = NULL;
  ot_model *m = NULL;
  if (rc == OT_OK)
    rc = ot_backend_create(strcmp(backend, "cuda") == 0 ? OT_BACKEND_CUDA : OT_BACKEND_CPU, 0, &be);
  if (rc == OT_OK) rc = ot_model_load_dir(model, be, &m);
  if (rc == OT_OK && adapter) {
    char digest[OT_DIGEST_HEX];
    char *st = NULL;
    rc = ot_path_join(model, "model.safetensors", &st);
    if (rc == OT_OK) rc = ot_file_digest(st, digest);
    free(st);
    if (rc == OT_OK) rc = ot_peft_apply_full(m, digest, adapter);
  }
  int V = m ? ot_model_cfg(m)->vocab_size : 0;
  float *logits = NULL, loss = 0;
  if (rc == OT_OK && T > ot_model_cfg(m)->n_positions)
    rc = ot_error(OT_ERR_INVALID, "--tokens: %d tokens, context is %d", T, ot_model_cfg(m)->n_positions);
  if (rc == OT_OK && !(logits = malloc(sizeof *logits * (size_t)T * (size_t)V)))
    rc = ot_error(OT_ERR_NOMEM, "logits");
  int32_t *tg = rc == OT_OK ? malloc(sizeof *tg * (size_t)T) : NULL;
  if (rc == OT_OK && !tg) rc = ot_error(OT_ERR_NOMEM, "targets");
  if (rc == OT_OK) {
    for (int i = 0; i < T; i++) tg[i] = i + 1 < T ? tok[i + 1] : -1; /* last position: no target */
    rc = ot_model_prepare(m, 1, T, 0);
  }
  if (rc == OT_OK) rc = ot_model_forward(m, tok, tg, 1, T, &loss);
  if (rc == OT_OK) rc = ot_model_forward_logits(m, tok, 1, T, logits);
  char path[4096];
  if (rc == OT_OK) {
    snprintf(path, sizeof path, "%s.bin", out);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(logits, sizeof *logits, (size_t)T * (size_t)V, f) != (size_t)T * (size_t)V)
      rc = ot_error(OT_ERR_IO, "writing %s", path);
    if (f && fclose(f) != 0 && rc == OT_OK) rc = ot_error(OT_ERR_IO, "writing %s", path);
  }
  if (rc == OT_OK) {
    snprintf(path, sizeof path, "%s.json", out);
    FILE *f = fopen(path, "w");
    if (!f || fprintf(f, "{\"loss\": %.9g, \"T\": %d, \"vocab\": %d, \"backend\": \"%s\"}\n", (double)loss, T,
                      V, be->ops->name) < 0)
      rc = ot_error(OT_ERR_IO, "writing %s", path);
    if (f && fclose(f) != 0 && rc == OT_OK) rc = ot_error(OT_ERR_IO, "writing %s", path);
  }
  free(tg);
  free(logits);
  free(tok);
  ot_model_free(m);
  ot_backend_free(be);
  return rc;
}

/* Grouped-query (4 heads, 2 key/value heads), odd MLP width, seeded random weights. */
static int init_save(const char *kind, const char *dir) {
  ot_model_config cfg = {.n_layer = 2,
                         .n_head = 4,
                         .n_embd = 64,
                         .vocab_size = 301,
                         .n_positions = 64,
                         .layer_norm_epsilon = 1e-5f};
  if (strcmp(kind, "gpt2") != 0) {
    int rc = ot_arch_parse(strncmp(kind, "llama", 5) == 0 ? "llama" : kind, &cfg.arch);
    if (rc) return rc;
    cfg.n_kv_head = 2;
    cfg.n_ff = 144;
    cfg.rope_theta = 10000.0f;
    cfg.tie_embeddings = strcmp(kind, "llama-tied") == 0;
    cfg.attn_bias = cfg.arch == OT_ARCH_QWEN2;
  }
  ot_backend *be = NULL;
  ot_model *m = NULL;
  int rc = ot_model_config_complete(&cfg);
  if (rc == OT_OK) rc = ot_backend_cpu_create(1, &be);
  if (rc == OT_OK) rc = ot_model_create(&cfg, be, &m);
  if (rc == OT_OK) rc = ot_model_init_random(m, 17);
  if (rc == OT_OK) rc = ot_model_save_dir(m, dir);
  ot_model_free(m);
  ot_backend_free(be);
  return rc;
}

static int encode_file(const char *json, const char *cfg, const char *path) {
  ot_tokenizer *t = NULL;
  char *text = NULL;
  size_t len = 0;
  int rc = ot_tokenizer_hf_load(json, cfg, &t);
  if (rc == OT_OK) rc = ot_file_read_all(path, (size_t)64 << 20, &text, &len);
  for (unsigned flags = 0; rc == OT_OK && flags <= OT_TOK_ADD_SPECIAL; flags += OT_TOK_ADD_SPECIAL) {
    int32_t *ids = NULL;
    size_t n = 0;
    rc = ot_tokenizer_encode_ex(t, text, len, flags, &ids, &n);
    for (size_t i = 0; rc == OT_OK && i < n; i++) printf(i ? " %d" : "%d", (int)ids[i]);
    if (rc == OT_OK) printf("\n");
    free(ids);
  }
  free(text);
  ot_tokenizer_free(t);
  return rc;
}

int main(int argc, char **argv) {
  if (argc == 5 && !strcmp(argv[1], "--encode")) {
    if (encode_file(argv[2], argv[3], argv[4]) == OT_OK) return 0;
    fprintf(stderr, "hf_dump: %s\n", ot_error_detail());
    return 1;
  }
  if (argc == 5 && !strcmp(argv[1], "--init") && !strcmp(argv[3], "--save")) {
    if (init_save(argv[2], argv[4]) == OT_OK) return 0;
    fprintf(stderr, "hf_dump: %s\n", ot_error_detail());
    return 1;
  }
  const char *model = NULL, *adapter = NULL, *backend = "cpu", *tokens = NULL, *out = NULL;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--model"))
      model = argv[i + 1];
    else if (!strcmp(argv[i], "--adapter"))
      adapter = argv[i + 1];
    else if (!strcmp(argv[i], "--backend"))
      backend = argv[i + 1];
    else if (!strcmp(argv[i], "--tokens"))
      tokens = argv[i + 1];
    else if (!strcmp(argv[i], "--out"))
      out = argv[i + 1];
    else
      model = NULL, i = argc; /* unknown option: usage */
  }
  if (!model || !tokens || !out || argc % 2 == 0) {
    fprintf(stderr, "usage: hf_dump --model DIR [--adapter DIR] [--backend cpu|cuda] --tokens \"i0 i1 ...\" "
                    "--out PREFIX\n");
    return 2;
  }
  int rc = run(model, adapter, backend, tokens, out);
  if (rc) {
    fprintf(stderr, "hf_dump: %s\n", ot_error_detail());
    return 1;
  }
  return 0;
}
