/* Network APIs of the serving engine (serve/ot_serve_engine.h).
 *
 * HTTP (our own HTTP/1.1 server, serve/ot_http.h), compatible with OpenAI's completions API as
 * vLLM and LoRAX serve it:
 * - POST /v1/completions: model (the adapter; "" or the base's name = base model), prompt (a string,
 *   an array of strings or an array of token ids), max_tokens (16), temperature (1), top_p (1),
 *   top_k (0, an extension), stop (a string or up to 4), seed, stream, ignore_eos (extension);
 *   n must be 1, logprobs null, echo false. The reply is OpenAI's text_completion object; with
 *   "stream": true, Server-Sent Events "data: {chunk}\n\n" ... "data: [DONE]\n\n".
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

#include "ot_http.h"
#include "ot_serve_engine.h"
#include "ot_tokenizer.h"

/* Calls add(ctx, name) for every adapter that can be served. */
typedef void (*ot_serve_list_fn)(void *user, void (*add)(void *ctx, const char *name), void *ctx);

typedef struct {
  const char *url; /* "http://127.0.0.1:8000"; port 0 picks a free one */
  ot_serve_engine *engine;
  const ot_tokenizer *tok; /* encodes string prompts */
  const char *base_name;   /* model id of the base model in /v1/models and replies */
  ot_serve_list_fn list;
  void *list_user;
  int32_t eos_id;  /* an empty prompt starts from this token; -1: empty prompts are refused */
  size_t max_body; /* bytes of a request body (default 1 MiB) */
  int max_prompts; /* prompts per request (default 32) */
  /* One line per request (model, tokens, latency) and per refusal; any thread. */
  void (*log)(void *user, const char *line);
  void *log_user;
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
