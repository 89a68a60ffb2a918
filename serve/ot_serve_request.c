#include "ot_serve_request.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"

int ot_json_has_nul_escape(const char *t, size_t len) {
  for (size_t i = 0; i + 1 < len; i++) {
    if (t[i] != '\\') continue;
    if (t[i + 1] == 'u' && i + 5 < len && memcmp(t + i + 2, "0000", 4) == 0) return 1;
    i++; /* the escaped character cannot start another escape */
  }
  return 0;
}

static int refuse(ot_serve_req_error *e, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int refuse(ot_serve_req_error *e, int status, const char *param, const char *fmt, ...) {
  e->status = status;
  e->type = status >= 500 ? "server_error" : "invalid_request_error";
  snprintf(e->param, sizeof e->param, "%s", param ? param : "");
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->message, sizeof e->message, fmt, ap);
  va_end(ap);
  return status >= 500 ? OT_ERR_NOMEM : OT_ERR_INVALID;
}

static const cJSON *field(const cJSON *b, const char *name) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(b, name);
  return cJSON_IsNull(v) ? NULL : v;
}

/* In int's range first: converting 1e20 to int is undefined (fuzz_http_request found it). */
static int is_int(const cJSON *v) {
  return cJSON_IsNumber(v) && v->valuedouble >= INT_MIN && v->valuedouble <= INT_MAX &&
         v->valuedouble == (double)(int)v->valuedouble;
}

/* Everything but the prompt (chat: a chat completion's names and defaults). */
static int parse_settings(const cJSON *b, const ot_serve_parse_cfg *cfg, int chat, ot_serve_completion *c,
                          ot_serve_req_error *e) {
  ot_serve_request *r = &c->r;
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(b, "model");
  if (v && !cJSON_IsString(v) && !cJSON_IsNull(v)) return refuse(e, 400, "model", "'model' must be a string");
  const char *m = cJSON_IsString(v) ? v->valuestring : "";
  if (cfg->base_name && strcmp(m, cfg->base_name) == 0) m = "";
  if (strlen(m) >= sizeof c->model) return refuse(e, 400, "model", "'model' is too long");
  for (const char *p = m; *p; p++)
    if ((unsigned char)*p < 0x20 || *p == 0x7f)
      return refuse(e, 400, "model", "'model' must not contain control characters");
  snprintf(c->model, sizeof c->model, "%s", m);
  r->max_tokens = 16;
  r->temperature = 1.0f;
  r->top_p = 1.0f;
  r->seed = cfg->seed;
  const char *mt = "max_tokens";
  if (chat && field(b, "max_completion_tokens")) mt = "max_completion_tokens";
  if (chat) r->max_tokens = 1000000; /* OpenAI's chat default: no limit but EOS and the context */
  if ((v = field(b, mt))) {
    if (!is_int(v) || v->valueint < 0 || v->valuedouble > 1e6)
      return refuse(e, 400, mt, "'%s' must be an integer >= 0", mt);
    r->max_tokens = v->valueint;
  }
  if ((v = field(b, "temperature"))) {
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0.0 && v->valuedouble <= 2.0))
      return refuse(e, 400, "temperature", "'temperature' must be a number in [0, 2]");
    r->temperature = (float)v->valuedouble;
  }
  if ((v = field(b, "top_p"))) {
    if (!cJSON_IsNumber(v) || !(v->valuedouble > 0.0 && v->valuedouble <= 1.0))
      return refuse(e, 400, "top_p", "'top_p' must be a number in (0, 1]");
    r->top_p = (float)v->valuedouble;
  }
  if ((v = field(b, "top_k"))) {
    if (!is_int(v) || v->valueint < -1)
      return refuse(e, 400, "top_k", "'top_k' must be an integer (0 or -1 = off)");
    r->top_k = v->valueint > 0 ? v->valueint : 0;
  }
  if ((v = field(b, "seed"))) {
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= -9.2e18 && v->valuedouble <= 9.2e18) ||
        v->valuedouble != (double)(long long)v->valuedouble)
      return refuse(e, 400, "seed", "'seed' must be an integer");
    r->seed = (uint64_t)(long long)v->valuedouble;
  }
  if ((v = field(b, "ignore_eos"))) {
    if (!cJSON_IsBool(v)) return refuse(e, 400, "ignore_eos", "'ignore_eos' must be true or false");
    r->ignore_eos = cJSON_IsTrue(v);
  }
  if ((v = field(b, "stream"))) {
    if (!cJSON_IsBool(v)) return refuse(e, 400, "stream", "'stream' must be true or false");
    c->stream = cJSON_IsTrue(v);
  }
  if ((v = field(b, "n")) && !(cJSON_IsNumber(v) && v->valuedouble == 1))
    return refuse(e, 400, "n", "only n = 1 is supported");
  if ((v = field(b, "best_of")) && !(cJSON_IsNumber(v) && v->valuedouble == 1))
    return refuse(e, 400, "best_of", "only best_of = 1 is supported");
  if ((v = field(b, "logprobs")) && !(chat && cJSON_IsFalse(v)))
    return refuse(e, 400, "logprobs", "logprobs are not supported");
  if (chat && field(b, "top_logprobs")) return refuse(e, 400, "top_logprobs", "logprobs are not supported");
  if ((v = field(b, "echo")) && !cJSON_IsFalse(v)) return refuse(e, 400, "echo", "echo is not supported");
  if ((v = field(b, "stream_options"))) {
    if (!c->stream)
      return refuse(e, 400, "stream_options", "'stream_options' is only allowed when 'stream' is true");
    if (!cJSON_IsObject(v)) return refuse(e, 400, "stream_options", "'stream_options' must be an object");
    const cJSON *u;
    cJSON_ArrayForEach(u, v) {
      if (strcmp(u->string, "include_usage") != 0)
        return refuse(e, 400, "stream_options", "unknown stream option '%.100s'", u->string);
      if (!cJSON_IsBool(u) && !cJSON_IsNull(u))
        return refuse(e, 400, "stream_options", "'include_usage' must be true or false");
      c->include_usage = cJSON_IsTrue(u);
    }
  }
  const char *pen[2] = {"presence_penalty", "frequency_penalty"};
  for (int i = 0; i < 2; i++)
    if ((v = field(b, pen[i]))) {
      if (!cJSON_IsNumber(v) || !(v->valuedouble >= -2.0 && v->valuedouble <= 2.0))
        return refuse(e, 400, pen[i], "'%s' must be a number in [-2, 2]", pen[i]);
      *(i ? &r->frequency_penalty : &r->presence_penalty) = (float)v->valuedouble;
    }
  /* logit_bias: {"token id": bias in [-100, 100]}; ids beyond the vocabulary fail at submit */
  if ((v = field(b, "logit_bias"))) {
    int n = cJSON_IsObject(v) ? cJSON_GetArraySize(v) : -1;
    if (n < 0) return refuse(e, 400, "logit_bias", "'logit_bias' must be an object of token ids to numbers");
    if (n > OT_SERVE_MAX_BIAS)
      return refuse(e, 400, "logit_bias", "at most %d logit_bias entries", OT_SERVE_MAX_BIAS);
    if (n > 0 && !(c->bias = calloc((size_t)n, sizeof *c->bias)))
      return refuse(e, 500, NULL, "out of memory");
    int k = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, v) {
      char *end = NULL;
      long id = strtol(x->string, &end, 10);
      if (!*x->string || *end || id < 0 || id > INT_MAX)
        return refuse(e, 400, "logit_bias", "logit_bias keys must be token ids, not '%.40s'", x->string);
      if (!cJSON_IsNumber(x) || !(x->valuedouble >= -100.0 && x->valuedouble <= 100.0))
        return refuse(e, 400, "logit_bias", "logit_bias values must be numbers in [-100, 100]");
      c->bias[k++] = (ot_serve_logit_bias){(int32_t)id, (float)x->valuedouble};
    }
    r->logit_bias = c->bias;
    r->n_logit_bias = k;
  }
  /* fields OpenAI defines that this server does not do: refused, never silently ignored */
  static const char *const unsupported[] = {"suffix",        "tools", "functions",
                                            "function_call", "min_p", "repetition_penalty",
                                            "prediction",    "audio", "modalities"};
  for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; i++) {
    v = field(b, unsupported[i]);
    if (v && !(cJSON_IsString(v) && !*v->valuestring) && !(cJSON_IsArray(v) && !cJSON_GetArraySize(v)))
      return refuse(e, 400, unsupported[i], "'%s' is not supported", unsupported[i]);
  }
  if ((v = field(b, "tool_choice")) && !(cJSON_IsString(v) && strcmp(v->valuestring, "none") == 0))
    return refuse(e, 400, "tool_choice", "tools are not supported");
  if ((v = field(b, "response_format"))) {
    const char *t = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(v, "type"));
    if (!t || strcmp(t, "text") != 0)
      return refuse(e, 400, "response_format", "only response_format {\"type\": \"text\"} is supported");
  }
  /* stop: one string or an array of strings; empty strings stop nothing and are dropped */
  if ((v = field(b, "stop"))) {
    const cJSON *one = cJSON_IsString(v) ? v : NULL;
    if (!one && (!cJSON_IsArray(v) || cJSON_GetArraySize(v) > OT_SERVE_MAX_STOP))
      return refuse(e, 400, "stop", "'stop' must be a string or an array of up to %d strings",
                    OT_SERVE_MAX_STOP);
    int k = 0;
    for (const cJSON *s = one ? one : v->child; s; s = one ? NULL : s->next) {
      if (!cJSON_IsString(s) || strlen(s->valuestring) >= OT_SERVE_STOP_LEN)
        return refuse(e, 400, "stop", "stop sequences must be strings shorter than %d bytes",
                      OT_SERVE_STOP_LEN);
      if (!*s->valuestring) continue;
      snprintf(c->stops[k], OT_SERVE_STOP_LEN, "%s", s->valuestring);
      r->stop[k] = c->stops[k];
      k++;
    }
  }
  return OT_OK;
}

/* prompt: a string, an array of strings, or an array of token ids */
static int parse_prompts(const cJSON *b, const ot_serve_parse_cfg *cfg, ot_serve_completion *c,
                         ot_serve_req_error *e) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(b, "prompt");
  if (!v) return refuse(e, 400, "prompt", "'prompt' is required");
  int n = cJSON_IsString(v) ? 1 : cJSON_IsArray(v) ? cJSON_GetArraySize(v) : -1;
  if (n < 1) return refuse(e, 400, "prompt", "'prompt' must be a string or a non-empty array");
  const cJSON *first = cJSON_IsArray(v) ? v->child : v;
  int ids_form = cJSON_IsNumber(first);
  if (ids_form) n = 1;
  if (n > cfg->max_prompts)
    return refuse(e, 400, "prompt", "at most %d prompts per request", cfg->max_prompts);
  ot_serve_prompt *p = calloc((size_t)n, sizeof *p);
  if (!p) return refuse(e, 500, NULL, "out of memory");
  c->prompts = p;
  c->n_prompts = n;
  if (ids_form) {
    int m = cJSON_GetArraySize(v), k = 0;
    const cJSON *t;
    p[0].ids = malloc((size_t)m * sizeof(int32_t));
    if (!p[0].ids) return refuse(e, 500, NULL, "out of memory");
    cJSON_ArrayForEach(t, v) {
      if (!is_int(t)) return refuse(e, 400, "prompt", "a token-id prompt must hold only integers");
      p[0].ids[k++] = t->valueint;
    }
    p[0].n = (size_t)k;
    return OT_OK;
  }
  int k = 0;
  for (const cJSON *s = first; s && k < n; s = s->next, k++) {
    if (!cJSON_IsString(s))
      return refuse(e, 400, "prompt", "'prompt' must be a string or an array of strings");
    if (!cfg->tok) return refuse(e, 400, "prompt", "this server has no tokenizer: send token ids");
    if (ot_tokenizer_encode(cfg->tok, s->valuestring, strlen(s->valuestring), &p[k].ids, &p[k].n))
      return refuse(e, 400, "prompt", "cannot tokenize prompt %d: %s", k, ot_error_detail());
    if (p[k].n == 0 && cfg->eos_id >= 0) {
      free(p[k].ids);
      p[k].ids = malloc(sizeof(int32_t));
      if (!p[k].ids) return refuse(e, 500, NULL, "out of memory");
      p[k].ids[0] = cfg->eos_id;
      p[k].n = 1;
    }
  }
  return OT_OK;
}

int ot_serve_parse_completion(const char *body, size_t len, const ot_serve_parse_cfg *cfg,
                              ot_serve_completion *out, ot_serve_req_error *err) {
  memset(out, 0, sizeof *out);
  memset(err, 0, sizeof *err);
  if (ot_json_has_nul_escape(body, len))
    return refuse(err, 400, NULL, "strings must not contain NUL (\\u0000)");
  cJSON *b = cJSON_ParseWithLength(body, len);
  if (!b) return refuse(err, 400, NULL, "the body is not valid JSON");
  int rc = cJSON_IsObject(b) ? OT_OK : refuse(err, 400, NULL, "the body must be a JSON object");
  if (rc == OT_OK) rc = parse_settings(b, cfg, 0, out, err);
  if (rc == OT_OK) rc = parse_prompts(b, cfg, out, err);
  cJSON_Delete(b);
  if (rc) ot_serve_completion_free(out);
  return rc;
}

void ot_serve_completion_free(ot_serve_completion *c) {
  for (int i = 0; c->prompts && i < c->n_prompts; i++) free(c->prompts[i].ids);
  free(c->prompts);
  free(c->bias);
  memset(c, 0, sizeof *c);
}

/* ---- chat ------------------------------------------------------------------------------------ */

#define MAX_MESSAGES 1024

/* A message's content: a string, null, or an array of {"type": "text", "text": ...} parts
 * (joined, as vLLM does, with newlines). *out is malloc'd (NULL for null). */
static int message_content(const cJSON *v, int i, char **out, ot_serve_req_error *e) {
  *out = NULL;
  if (!v || cJSON_IsNull(v)) return OT_OK;
  if (cJSON_IsString(v)) {
    if (!(*out = strdup(v->valuestring))) return refuse(e, 500, NULL, "out of memory");
    return OT_OK;
  }
  if (!cJSON_IsArray(v))
    return refuse(e, 400, "messages", "messages[%d].content must be a string, null or an array of text parts",
                  i);
  size_t n = 0;
  const cJSON *p;
  cJSON_ArrayForEach(p, v) {
    const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(p, "type"));
    const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(p, "text"));
    if (!type || strcmp(type, "text") != 0 || !text)
      return refuse(e, 400, "messages", "messages[%d].content: only text parts are supported", i);
    n += strlen(text) + 1;
  }
  char *s = malloc(n + 1), *w = s;
  if (!s) return refuse(e, 500, NULL, "out of memory");
  cJSON_ArrayForEach(p, v) {
    const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(p, "text"));
    if (w != s) *w++ = '\n';
    size_t l = strlen(text);
    memcpy(w, text, l);
    w += l;
  }
  *w = '\0';
  *out = s;
  return OT_OK;
}

static int parse_messages(const cJSON *b, const ot_serve_parse_cfg *cfg, ot_serve_completion *c,
                          ot_serve_req_error *e) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(b, "messages");
  if (!v) return refuse(e, 400, "messages", "'messages' is required");
  int n = cJSON_IsArray(v) ? cJSON_GetArraySize(v) : -1;
  if (n < 1) return refuse(e, 400, "messages", "'messages' must be a non-empty array");
  if (n > MAX_MESSAGES) return refuse(e, 400, "messages", "at most %d messages", MAX_MESSAGES);
  if (!cfg->chat || !cfg->chat->tmpl)
    return refuse(
        e, 400, "messages",
        "this model has no chat template (tokenizer_config.json's chat_template): use /v1/completions");
  if (!cfg->tok) return refuse(e, 400, "messages", "this server has no tokenizer");
  ot_chat_msg *msgs = calloc((size_t)n, sizeof *msgs);
  char **contents = calloc((size_t)n, sizeof *contents);
  int rc = msgs && contents ? OT_OK : refuse(e, 500, NULL, "out of memory");
  int i = 0;
  const cJSON *m;
  cJSON_ArrayForEach(m, v) {
    if (rc) break;
    const char *role = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role"));
    if (!cJSON_IsObject(m) || !role || !*role) {
      rc = refuse(e, 400, "messages", "messages[%d] must be an object with a string 'role'", i);
      break;
    }
    rc = message_content(cJSON_GetObjectItemCaseSensitive(m, "content"), i, &contents[i], e);
    msgs[i].role = role;
    msgs[i].content = contents[i];
    i++;
  }
  char *text = NULL;
  size_t len = 0;
  if (rc == OT_OK) {
    const ot_chat_config *cc = cfg->chat;
    ot_chat_vars vars = {cc->bos_token, cc->eos_token, cc->unk_token, cc->pad_token, 1};
    if (ot_chat_template_render(cc->tmpl, msgs, (size_t)n, &vars, &text, &len) != OT_OK)
      rc = refuse(e, 400, "messages", "chat template: %s", ot_error_detail());
  }
  if (rc == OT_OK) {
    c->prompts = calloc(1, sizeof *c->prompts);
    if (!c->prompts) rc = refuse(e, 500, NULL, "out of memory");
  }
  if (rc == OT_OK) {
    c->n_prompts = 1;
    if (ot_chat_encode(cfg->chat, cfg->tok, text, len, &c->prompts[0].ids, &c->prompts[0].n) != OT_OK)
      rc = refuse(e, 400, "messages", "cannot tokenize the conversation: %s", ot_error_detail());
    else if (c->prompts[0].n == 0)
      rc = refuse(e, 400, "messages", "the chat template rendered an empty prompt");
  }
  free(text);
  for (int k = 0; contents && k < n; k++) free(contents[k]);
  free(contents);
  free(msgs);
  return rc;
}

int ot_serve_parse_chat(const char *body, size_t len, const ot_serve_parse_cfg *cfg, ot_serve_completion *out,
                        ot_serve_req_error *err) {
  memset(out, 0, sizeof *out);
  memset(err, 0, sizeof *err);
  if (ot_json_has_nul_escape(body, len))
    return refuse(err, 400, NULL, "strings must not contain NUL (\\u0000)");
  cJSON *b = cJSON_ParseWithLength(body, len);
  if (!b) return refuse(err, 400, NULL, "the body is not valid JSON");
  int rc = cJSON_IsObject(b) ? OT_OK : refuse(err, 400, NULL, "the body must be a JSON object");
  if (rc == OT_OK) rc = parse_settings(b, cfg, 1, out, err);
  if (rc == OT_OK) rc = parse_messages(b, cfg, out, err);
  cJSON_Delete(b);
  if (rc) ot_serve_completion_free(out);
  return rc;
}
