/* Network APIs of the serving engine (serve/ot_serve_engine.h).
 *
 * HTTP (our own HTTP/1.1 server, serve/ot_http.h), compatible with OpenAI's completions API as
 * vLLM and LoRAX serve it:
 * - POST /v1/completions: model (the adapter; "" or the base's name = base model), prompt (a string,
 *   an array of strings or an array of token ids), max_tokens (16), temperature (1), top_p (1),
 *   top_k (0, an extension), stop (a string or up to 4), seed, stream, ignore_eos (extension);
 *   n must be 1, logprobs null, echo false. The reply is OpenAI's text_completion object; with
 *   "stream": true, Server-Sent Events "data: {chunk}\n\n" ... "data: [DONE]\n\n".
 * - POST /v1/chat/completions: messages (role, content) rendered with the base model's chat
 *   template (serve/ot_chat_template.h), the other fields as for completions, plus
 *   max_completion_tokens; the reply is OpenAI's chat.completion object, streamed as
 *   chat.completion.chunk deltas (the first carries the role). stream_options.include_usage (both
 *   endpoints): a last chunk with "choices": [] and the usage before [DONE].
 * - GET /metrics: Prometheus text (requests and tokens by model, time to first token and per
 *   token histograms, batch, queue, KV cache, adapter cache, HTTP connections).
 * - POST /v1/load_lora_adapter, /v1/unload_lora_adapter: adapters without a restart (below).
 * - GET /v1/models: the base and every adapter the list callback names; GET /v1/models/{id}: one
 *   of them (404 if none); GET /health: {"status":"ok"}.
 * Errors are OpenAI's {"error": {"message", "type", "param", "code"}}: 404 unknown model or
 * route, 405 wrong method, 400 bad JSON, fields or HTTP, 408 a request not sent in time, 413 a
 * body over max_body, 431 headers over max_header, 503 over a connection cap, 500 a failed
 * generation. A client that goes away cancels its generation, streamed or not.
 * Callbacks only parse and hand off: generation runs on the engine's thread, which completes
 * the replies (and writes the streams) when its events arrive.
 *
 * Tenants' request API: ot_serve_handle_request takes a GenerateRequest protobuf
 * (protocol/serve.proto) and answers a GenerateReply; it has the signature of
 * ot_server_config.on_request (protocol/ot_transport.h), so the encrypted transport serves it
 * as is. It blocks its (transport worker) thread until the generation ends. */
#ifndef OT_SERVE_API_H
#define OT_SERVE_API_H

#include <stddef.h>
#include <stdint.h>

#include "ot_chat_template.h"
#include "ot_http.h"
#include "ot_serve_engine.h"
#include "ot_tokenizer.h"

/* Calls add(ctx, name) for every adapter that can be served. */
typedef void (*ot_serve_list_fn)(void *user, void (*add)(void *ctx, const char *name), void *ctx);

/* Who a request's API key belongs to. Tenant T's adapters are the ones named "T/NAME"; other
 * adapters (no '/') belong to the operator: only admin keys see and use them. */
typedef struct {
  char tenant[64];
  int admin;        /* every adapter, /metrics, adapter management */
  int base_allowed; /* may see and use the base model (and so its tenant's adapters) */
} ot_serve_principal;

/* Checks the KEY of "Authorization: Bearer KEY": OT_OK and *p; OT_ERR_NOTFOUND for an unknown
 * key (answered 401), OT_ERR_INVALID for a revoked one (403), anything else 500. Called on the
 * HTTP thread for every request but /health: keep it fast. */
typedef int (*ot_serve_auth_fn)(void *user, const char *key, ot_serve_principal *p);

typedef struct {
  const char *url; /* "http://127.0.0.1:8000"; port 0 picks a free one */
  ot_serve_engine *engine;
  const ot_tokenizer *tok; /* encodes string prompts */
  const char *base_name;   /* model id of the base model in /v1/models and replies */
  ot_serve_list_fn list;
  void *list_user;
  int32_t eos_id; /* an empty prompt starts from this token; -1: empty prompts are refused */
  /* The base model's chat template and special tokens (ot_chat_config_load_dir of its
   * directory); NULL or without a template: /v1/chat/completions answers 400. */
  const ot_chat_config *chat;
  size_t max_body; /* bytes of a request body (default 1 MiB) */
  int max_prompts; /* prompts per request (default 32) */
  /* One line per request (model, tokens, latency) and per refusal; any thread. */
  void (*log)(void *user, const char *line);
  void *log_user;
  /* API keys: NULL = no authentication (every client sees everything; keep such a server on
   * loopback). Otherwise every route but /health needs a key; a key sees and uses what its
   * principal allows (the rest is 404, as if absent), and /v1/models lists only that. */
  ot_serve_auth_fn auth;
  void *auth_user;
  /* GET /metrics (an admin key when keys are on) appends what this writes: more lines of the
   * Prometheus text format (the daemon's devices, rounds, refused uploads). May be NULL. */
  void (*metrics)(void *user, void (*line)(void *ctx, const char *text), void *ctx);
  void *metrics_user;
  /* Adapters at run time, as vLLM: POST /v1/load_lora_adapter {"lora_name", "lora_path"} and
   * /v1/unload_lora_adapter {"lora_name"} (an admin key when keys are on). load registers the
   * name (OT_ERR_INVALID: a bad name or path, 400; the API then loads it through the engine with
   * every check and unregisters it if that fails); unload unregisters it (OT_ERR_NOTFOUND: 404).
   * Running requests finish with the copy they have. NULL: the routes answer 404. */
  int (*load_adapter)(void *user, const char *name, const char *path);
  int (*unload_adapter)(void *user, const char *name);
  void *adapters_user;
  /* HTTP limits (serve/ot_http.h; 0 = its default): request line + headers (16 KiB, 10 s),
   * body (30 s), keep-alive idle (30 s), a client not reading (30 s), connections (256 in all,
   * 32 per client address). */
  size_t max_header;
  int header_timeout_ms, body_timeout_ms, idle_timeout_ms, write_timeout_ms;
  int max_conns, max_conns_per_peer;
  /* Routes of the embedding program on the same server (the daemon's operator dashboard), at
   * most OT_SERVE_EXTRA_ROUTES; they answer for themselves, the API's tenants never reach them. */
  const ot_http_route *extra_routes;
  int n_extra_routes;
} ot_serve_http_config;

#define OT_SERVE_EXTRA_ROUTES 4

typedef struct ot_serve_http ot_serve_http;

/* The end-of-sequence token: the chat config's eos_token when the vocabulary has it (Llama 3's
 * <|eot_id|>, ChatML's <|im_end|>), else <|endoftext|>, else -1 (none). */
int32_t ot_serve_eos_id(const ot_tokenizer *tok, const ot_chat_config *chat);

int ot_serve_http_start(const ot_serve_http_config *cfg, ot_serve_http **out);
/* The TCP port bound. */
int ot_serve_http_port(const ot_serve_http *h);
/* The HTTP server's counters (connections taken, refused, timed out). */
void ot_serve_http_stats(ot_serve_http *h, ot_http_stats *out);
/* Cancels what is in flight, waits for it, stops the server. The engine must still run. */
void ot_serve_http_stop(ot_serve_http *h);

/* Valid UTF-8 for JSON: every byte that does not start a well-formed sequence (overlong forms,
 * surrogates and code points over U+10FFFF included), and NUL, becomes U+FFFD. Completion texts go through
 * it (a token boundary can cut a character; byte-level tokenizers can emit any byte), streamed
 * deltas one by one (the engine never splits a character across deltas, so the concatenation
 * is the same). *out is malloc'd and NUL-terminated. */
int ot_utf8_sanitize(const char *s, size_t n, char **out, size_t *out_len);

/* ---- the nng request API ---------------------------------------------------------------- */

typedef struct {
  ot_serve_engine *engine;
  const ot_tokenizer *tok;
  const char *base_name;
  int32_t eos_id;
  void (*log)(void *user, const char *line);
  void *log_user;
} ot_serve_rpc;

/* GenerateRequest in, GenerateReply out (malloc'd). Errors of the request (unknown adapter,
 * bad fields) are answered in the reply's error fields and return OT_OK; only a body that is
 * not a GenerateRequest returns an error. user is an ot_serve_rpc. */
int ot_serve_handle_request(void *user, const uint8_t peer[32], const uint8_t *body, size_t len,
                            uint8_t **reply, size_t *reply_len);

#endif
