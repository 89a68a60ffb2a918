/* Serving engine: generation for many adapters at once over ONE copy of the base model.
 *
 * - Paged KV cache (vLLM's PagedAttention): one pool of blocks of kv_block_size positions; a
 *   request takes blocks for its prompt when admitted and one more each time it crosses a block
 *   boundary, and gives them back when it ends. The prompt is prefilled (in chunks within the
 *   step's token budget), then one token per step is decoded.
 * - When the pool is full, requests wait in the queue (admitted first come first served once
 *   the blocks for their prompt, plus headroom, are free), and a running request that cannot
 *   grow takes the blocks of the youngest running one, which is preempted: its blocks are freed
 *   and it goes back to the head of the queue, to be recomputed (prompt + tokens so far) when
 *   blocks free up. Its output is the same as if it had run alone.
 * - Continuous batching: every step admits waiting requests and drops finished ones, so
 *   requests join and leave the running batch between decode steps.
 * - Multi-adapter batches: rows are grouped by adapter. Linear layers and LayerNorms run once on
 *   every run of consecutive rows that share the same weights (the frozen middle: the whole batch);
 *   offsite adapters' replaced blocks and BitFit's biases run per adapter segment; LoRA and
 *   bottleneck adapters add their branch on their own segment after the shared GEMM (Punica's
 *   SGMV: shrink x A^T, expand (.) B^T scaled).
 * - Adapters are loaded on demand through a resolver (name -> directory, the ot_adapter formats
 *   and checks) and evicted least-recently-used within a memory budget, never while in use.
 *
 * Threads: ot_serve_submit/cancel are thread-safe. The engine runs either on its own thread
 * (ot_serve_start) or driven by the caller with ot_serve_step (tests); event callbacks run on
 * whichever thread steps, without engine locks held, and must not block for long. */
#ifndef OT_SERVE_ENGINE_H
#define OT_SERVE_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "ot_model.h"
#include "ot_serve_penalty.h"
#include "ot_tokenizer.h"

typedef struct ot_serve_engine ot_serve_engine;

/* Directory of adapter `name` into dir (cap bytes); OT_ERR_NOTFOUND for an unknown name. */
typedef int (*ot_serve_resolve_fn)(void *user, const char *name, char *dir, size_t cap);

typedef struct {
  int max_batch;       /* sequences in flight at most; default 32 */
  int max_step_tokens; /* rows per forward step (prefill chunks + decode rows); default 512 */
  int max_seq;         /* positions per sequence (prompt + completion); default min(n_positions, 1024,
                          the KV pool) */
  /* The KV cache limit: the pool's blocks (kv_blocks) or its bytes (kv_bytes: as many blocks as
   * fit), at most one of them; neither: max_batch x max_seq positions (never full). The pool
   * must hold one sequence of max_seq positions. kv_block_size = max_seq gives fixed slots
   * (every sequence reserves max_seq positions). */
  int kv_block_size; /* positions per block; 0 = 16 */
  int kv_blocks;
  size_t kv_bytes;
  size_t adapter_budget; /* bytes of adapter tensors kept loaded; 0 = unlimited */
  ot_serve_resolve_fn resolve;
  void *resolve_user;
  const ot_tokenizer *tok; /* text deltas and stop strings; NULL: tokens only */
  int32_t eos_id;          /* end-of-text token; -1 = none */
  const char *base_digest; /* BLAKE2b of the base model.safetensors (adapter checks) */
} ot_serve_config;

/* max_batch 32, max_step_tokens 512, max_seq 0 (model default), blocks of 16, no KV limit, no
 * adapter budget, eos -1. */
void ot_serve_config_default(ot_serve_config *c);

#define OT_SERVE_MAX_STOP 4

typedef struct {
  const char *adapter; /* NULL or "" = base model */
  const int32_t *prompt;
  size_t n_prompt;
  int max_tokens;
  float temperature; /* 0 = greedy */
  float top_p;       /* 1 = off */
  int top_k;         /* 0 = off */
  uint64_t seed;
  const char *stop[OT_SERVE_MAX_STOP]; /* stop strings (need a tokenizer); NULL-terminated */
  int ignore_eos;
  /* OpenAI's adjustments before sampling (serve/ot_serve_penalty.h): penalties in [-2, 2]
   * against the completion's own tokens, biases in [-100, 100] (copied at submit) */
  float presence_penalty, frequency_penalty;
  const ot_serve_logit_bias *logit_bias;
  int n_logit_bias;
} ot_serve_request;

typedef enum {
  OT_FINISH_NONE = 0,
  OT_FINISH_LENGTH, /* max_tokens or the sequence limit */
  OT_FINISH_STOP,   /* EOS or a stop string */
  OT_FINISH_ERROR,
  OT_FINISH_CANCELLED
} ot_finish_reason;

const char *ot_finish_reason_name(ot_finish_reason r); /* "length", "stop", "error", "cancelled" */

/* What a callback sees: new tokens and text since the last event, and the end. */
typedef struct {
  uint64_t id;
  const int32_t *tokens; /* new completion tokens */
  int n_tokens;
  const char *text; /* new completion text (stop strings cut, held back while ambiguous) */
  size_t text_len;
  int finished;
  ot_finish_reason reason;
  int error;             /* OT_ERR_* when reason is ERROR */
  const char *error_msg; /* detail when reason is ERROR */
  int prompt_tokens, completion_tokens;
  double queue_ms, total_ms; /* submit -> first scheduled, submit -> finish */
  const float *logits;       /* [vocab] logits the new token was drawn from, after logit_bias and the
                                penalties (valid during the call) */
  int vocab;
} ot_serve_event;

typedef void (*ot_serve_event_fn)(void *user, const ot_serve_event *ev);

/* The engine reads the model's parameters and never changes them; the model must outlive it. */
int ot_serve_engine_create(ot_model *base, const ot_serve_config *cfg, ot_serve_engine **out);
/* Stops the thread; pending requests finish as CANCELLED first. */
void ot_serve_engine_free(ot_serve_engine *e);

/* Queues a request (copied). Unknown adapter: OT_ERR_NOTFOUND; bad sampling settings or an
 * empty prompt: OT_ERR_INVALID; a prompt longer than max_seq (which the KV pool always holds):
 * OT_ERR_RANGE. fn gets every event. */
int ot_serve_submit(ot_serve_engine *e, const ot_serve_request *r, ot_serve_event_fn fn, void *user,
                    uint64_t *id);
/* The request ends CANCELLED at the next step (no-op if already finished). */
void ot_serve_cancel(ot_serve_engine *e, uint64_t id);

/* One scheduler iteration (admit, one forward, sample, retire); *busy = requests still pending.
 * For callers without the engine thread. */
int ot_serve_step(ot_serve_engine *e, int *busy);
/* Runs steps on an engine thread until ot_serve_engine_free. */
int ot_serve_start(ot_serve_engine *e);

/* Whole result of one request. */
typedef struct {
  int32_t *tokens; /* completion tokens (malloc'd) */
  int n_tokens;
  char *text; /* completion text (malloc'd, NUL-terminated; "" without a tokenizer) */
  size_t text_len;
  ot_finish_reason reason;
  int prompt_tokens;
} ot_serve_result;
void ot_serve_result_free(ot_serve_result *r);

/* Submits and waits: on the engine thread when started, else steps the engine itself.
 * An ERROR finish returns its error code. */
int ot_serve_generate(ot_serve_engine *e, const ot_serve_request *r, ot_serve_result *out);

typedef struct {
  int adapters_loaded;
  size_t adapter_bytes;
  uint64_t loads, evictions, steps, tokens_generated, rows_computed;
  uint64_t adapter_hits; /* requests whose adapter was resident (loads: it was not) */
  int running, waiting;  /* sequences in the batch, requests queued */
  int step_rows;         /* rows of the last step's forward */
  int max_batch;
  uint64_t kv_positions, kv_capacity;           /* KV positions filled, and in all (blocks x block size) */
  int kv_blocks_used, kv_blocks, kv_block_size; /* the paged pool: blocks held by sequences, in all */
  uint64_t preemptions;                         /* running requests preempted for KV blocks */
  int max_running;                              /* most sequences running at once so far */
  int max_seq;                                  /* positions per sequence (the configured or derived one) */
} ot_serve_stats;

/* Drops the adapter named name from the cache (after its files changed or it was unloaded): no
 * request submitted from now on uses the cached copy (the name resolves and loads afresh); the
 * copy is freed at the next step, or when the last request using it ends. */
void ot_serve_forget_adapter(ot_serve_engine *e, const char *name);
void ot_serve_get_stats(ot_serve_engine *e, ot_serve_stats *out);

#endif
