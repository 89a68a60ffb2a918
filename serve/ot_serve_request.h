/* The bodies of POST /v1/completions and /v1/chat/completions, parsed and checked into engine
 * requests (a chat's messages rendered with the model's chat template and tokenized). No I/O and
 * no server state: the HTTP handler calls it, and fuzz/fuzz_http_request.c calls it as is. */
#ifndef OT_SERVE_REQUEST_H
#define OT_SERVE_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#include "ot_chat_template.h"
#include "ot_serve_engine.h"
#include "ot_tokenizer.h"

#define OT_SERVE_STOP_LEN 256
#define OT_SERVE_MODEL_LEN 128
#define OT_SERVE_MAX_BIAS 1024 /* logit_bias entries */

/* Why a request was refused, in OpenAI's error shape. */
typedef struct {
  int status;       /* 400, or 500 when out of memory */
  const char *type; /* "invalid_request_error" or "server_error" */
  char param[32];   /* the offending field; "" = null */
  char message[512];
} ot_serve_req_error;

typedef struct {
  int32_t *ids;
  size_t n;
} ot_serve_prompt;

/* A parsed request. `r.stop` points into `stops`: parse into the struct that will be used,
 * do not copy it. */
typedef struct {
  ot_serve_request r;             /* sampling settings and stop strings; r.prompt/r.adapter are left NULL */
  char model[OT_SERVE_MODEL_LEN]; /* "" = the base model */
  char stops[OT_SERVE_MAX_STOP][OT_SERVE_STOP_LEN];
  ot_serve_prompt *prompts;
  int n_prompts;
  int stream;
  int include_usage;         /* stream_options.include_usage: a last chunk with the usage */
  ot_serve_logit_bias *bias; /* logit_bias (r.logit_bias points here) */
} ot_serve_completion;

typedef struct {
  const ot_tokenizer *tok;    /* encodes string prompts; NULL: token ids only */
  const char *base_name;      /* the base model's id ("model" naming it means the base) */
  int32_t eos_id;             /* an empty prompt starts from this token; -1: refused */
  int max_prompts;            /* prompts per request */
  uint64_t seed;              /* used when the request names none */
  const ot_chat_config *chat; /* the model's chat template and special tokens; NULL: no chat */
} ot_serve_parse_cfg;

/* Parses body[len]. On success fills *out (free with ot_serve_completion_free); on refusal
 * fills *err, leaves *out empty and returns OT_ERR_INVALID (or OT_ERR_NOMEM). */
int ot_serve_parse_completion(const char *body, size_t len, const ot_serve_parse_cfg *cfg,
                              ot_serve_completion *out, ot_serve_req_error *err);
void ot_serve_completion_free(ot_serve_completion *c);

/* A chat completion: "messages" (role and content: a string, null, or an array of text parts)
 * rendered by cfg->chat's template with the generation prompt, then tokenized with its special
 * tokens (ot_chat_encode) into one prompt; the other fields as for completions ("max_tokens" or
 * "max_completion_tokens"; "logprobs" false; n 1). A template's raise_exception, a model without
 * a template, and a rendered prompt that is empty are 400s. */
int ot_serve_parse_chat(const char *body, size_t len, const ot_serve_parse_cfg *cfg, ot_serve_completion *out,
                        ot_serve_req_error *err);

/* A tenant's GenerateRequest (protocol/serve.proto, at most 1 MiB) decoded and checked into an
 * engine request, as ot_serve_handle_request does before generating (cfg's max_prompts and seed
 * are not used). *q is the decoded message (NULL when body is not a GenerateRequest: nothing to
 * answer); sr->adapter and sr->stop point into it, sr->prompt is *ids. Free *ids with free() and
 * *q with offtune__generate_request__free_unpacked(*q, NULL), whatever the result. */
struct Offtune__GenerateRequest;
int ot_serve_generate_decode(const uint8_t *body, size_t len, const ot_serve_parse_cfg *cfg,
                             struct Offtune__GenerateRequest **q, ot_serve_request *sr, int32_t **ids);

/* 1 if the JSON text holds the escape \u0000 in a string: cJSON would cut that string at the
 * NUL, so a name or prompt would silently mean something else. */
int ot_json_has_nul_escape(const char *text, size_t len);

#endif
