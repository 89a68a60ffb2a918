/* The tenants' request API: GenerateRequest -> GenerateReply (protocol/serve.proto). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_error.h"
#include "ot_serve_api.h"
#include "ot_serve_request.h"
#include "serve.pb-c.h"

#define RPC_MAX_BODY (1u << 20)

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int pack(const Offtune__GenerateReply *r, uint8_t **out, size_t *out_len) {
  size_t n = offtune__generate_reply__get_packed_size(r);
  uint8_t *b = malloc(n ? n : 1);
  if (!b) return ot_error(OT_ERR_NOMEM, "cannot allocate a reply");
  offtune__generate_reply__pack(r, b);
  *out = b;
  *out_len = n;
  return OT_OK;
}

int ot_serve_generate_decode(const uint8_t *body, size_t len, const ot_serve_parse_cfg *cfg,
                             struct Offtune__GenerateRequest **out, ot_serve_request *sr, int32_t **ids_out) {
  *out = NULL;
  *ids_out = NULL;
  memset(sr, 0, sizeof *sr);
  if (len > RPC_MAX_BODY)
    return ot_error(OT_ERR_RANGE, "a GenerateRequest of %zu bytes is over the limit", len);
  Offtune__GenerateRequest *q = offtune__generate_request__unpack(NULL, len, body);
  if (!q) return ot_error(OT_ERR_FORMAT, "the request is not a GenerateRequest");
  *out = q;
  int32_t *ids = NULL;
  size_t n = 0;
  int rc = OT_OK;
  const char *adapter = q->adapter ? q->adapter : "";
  if (cfg->base_name && strcmp(adapter, cfg->base_name) == 0) adapter = "";
  sr->adapter = adapter; /* named in the log line of a refusal too */
  if (q->n_prompt_ids) {
    ids = malloc(q->n_prompt_ids * sizeof(int32_t));
    if (!ids) rc = ot_error(OT_ERR_NOMEM, "cannot allocate the prompt");
    for (size_t i = 0; ids && i < q->n_prompt_ids; i++) ids[i] = q->prompt_ids[i];
    n = q->n_prompt_ids;
  } else if (q->prompt && cfg->tok) {
    rc = ot_tokenizer_encode(cfg->tok, q->prompt, strlen(q->prompt), &ids, &n);
  } else {
    rc = ot_error(OT_ERR_INVALID, "the request has no prompt (or the server no tokenizer for a text one)");
  }
  if (rc == OT_OK && n == 0 && cfg->eos_id >= 0) {
    free(ids);
    ids = malloc(sizeof(int32_t));
    if (!ids) rc = ot_error(OT_ERR_NOMEM, "cannot allocate the prompt");
    if (ids) ids[0] = cfg->eos_id;
    n = 1;
  }
  if (rc == OT_OK && q->n_stop > OT_SERVE_MAX_STOP)
    rc = ot_error(OT_ERR_INVALID, "at most %d stop strings", OT_SERVE_MAX_STOP);
  /* as over HTTP: the engine scans every stop string at every token, so a 1 MiB one would
   * hold the batch of every tenant */
  for (size_t i = 0; rc == OT_OK && i < q->n_stop; i++)
    if (strlen(q->stop[i]) >= OT_SERVE_STOP_LEN)
      rc = ot_error(OT_ERR_INVALID, "stop strings must be shorter than %d bytes", OT_SERVE_STOP_LEN);
  if (rc == OT_OK && q->max_tokens > 1000000) rc = ot_error(OT_ERR_INVALID, "max_tokens is too large");
  *ids_out = ids;
  if (rc) return rc;
  sr->prompt = ids;
  sr->n_prompt = n;
  sr->max_tokens = (int)q->max_tokens;
  sr->temperature = q->temperature;
  sr->top_p = q->top_p;
  sr->top_k = (int)q->top_k;
  sr->seed = q->seed;
  sr->ignore_eos = q->ignore_eos;
  for (size_t i = 0; i < q->n_stop; i++) sr->stop[i] = q->stop[i];
  return OT_OK;
}

int ot_serve_handle_request(void *user, const uint8_t peer[32], const uint8_t *body, size_t len,
                            uint8_t **reply, size_t *reply_len) {
  (void)peer;
  ot_serve_rpc *rpc = user;
  ot_serve_parse_cfg pc = {.tok = rpc->tok, .base_name = rpc->base_name, .eos_id = rpc->eos_id};
  Offtune__GenerateRequest *q = NULL;
  ot_serve_request sr;
  int32_t *ids = NULL;
  double t0 = now_ms();
  int rc = ot_serve_generate_decode(body, len, &pc, &q, &sr, &ids);
  if (!q) return rc; /* not a GenerateRequest: nothing to answer */
  const char *adapter = sr.adapter ? sr.adapter : "";
  size_t n = sr.n_prompt;
  Offtune__GenerateReply r = OFFTUNE__GENERATE_REPLY__INIT;
  ot_serve_result res;
  memset(&res, 0, sizeof res);
  if (rc == OT_OK) rc = ot_serve_generate(rpc->engine, &sr, &res);
  char msg[512], *text = NULL;
  if (rc == OT_OK) rc = ot_utf8_sanitize(res.text, res.text_len, &text, NULL); /* proto strings are UTF-8 */
  if (rc) {
    snprintf(msg, sizeof msg, "%s", ot_error_detail());
    r.has_error_code = 1;
    r.error_code = rc;
    r.error = msg;
  } else {
    r.text = text;
    r.n_token_ids = (size_t)res.n_tokens;
    r.token_ids = res.tokens;
    r.finish_reason = (char *)(res.reason == OT_FINISH_STOP ? "stop" : "length");
    r.has_prompt_tokens = r.has_completion_tokens = 1;
    r.prompt_tokens = (uint32_t)res.prompt_tokens;
    r.completion_tokens = (uint32_t)res.n_tokens;
  }
  r.has_latency_ms = 1;
  r.latency_ms = now_ms() - t0;
  if (rpc->log) {
    char line[768];
    if (rc)
      snprintf(line, sizeof line, "rpc model=%s refused: %s", *adapter ? adapter : "(base)", msg);
    else
      snprintf(line, sizeof line, "rpc model=%s prompt_tokens=%zu completion_tokens=%d finish=%s %.1f ms",
               *adapter ? adapter : "(base)", n, res.n_tokens, r.finish_reason, r.latency_ms);
    rpc->log(rpc->log_user, line);
  }
  int prc = pack(&r, reply, reply_len);
  ot_serve_result_free(&res);
  free(text);
  free(ids);
  offtune__generate_request__free_unpacked(q, NULL);
  return prc;
}
