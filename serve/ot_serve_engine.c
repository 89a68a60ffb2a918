#include "ot_serve_engine.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_peft.h"
#include "ot_error.h"
#include "ot_eval.h"
#include "ot_fileio.h"

/* ---- adapters ------------------------------------------------------------------------ */

typedef struct adapter {
  char name[128];
  ot_peft_kind kind;
  int refs;          /* running requests using it */
  int stale;         /* forgotten (unloaded): no new request uses it; freed once idle */
  uint64_t last_use; /* LRU tick */
  size_t bytes;
  float *mem;         /* one backend allocation for all its tensors */
  ot_block_over *blk; /* [n_layer] */
  struct adapter *next;
} adapter;

/* ---- requests ------------------------------------------------------------------------ */

typedef struct req {
  uint64_t id;
  char adapter_name[128];
  ot_serve_request p;
  char *stop[OT_SERVE_MAX_STOP];
  int n_stop;
  ot_serve_logit_bias *bias; /* a copy of p.logit_bias */
  ot_serve_event_fn fn;
  void *user;
  int32_t *ids; /* prompt + completion */
  int n_prompt, n_ids;
  int n_cached; /* positions already in the KV cache */
  int slot;
  int step_rows;         /* rows planned for this step */
  adapter *ad, *pending; /* in use; loaded but waiting for budget */
  uint64_t rng;
  char *text; /* completion text */
  size_t text_len, text_cap, text_emitted;
  double t_submit, t_first;
  struct req *next;
} req;

struct ot_serve_engine {
  ot_model *m;
  ot_backend *be;
  ot_serve_config cfg;
  char base_digest[96];
  int L, V, T_max, Nmax;

  /* incoming requests and cancellations, under mu */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_mutex_t step_mu; /* one step at a time, whoever drives */
  req *in_head, *in_tail;
  uint64_t *cancels;
  int n_cancels, cap_cancels;
  char **forgets; /* adapter names to drop from the cache (ot_serve_forget_adapter) */
  int n_forgets;
  uint64_t next_id;
  int stopping, thread_on;
  pthread_t thread;
  ot_serve_stats stats; /* under mu */

  /* engine-thread state */
  req **waiting;
  int n_waiting, cap_waiting;
  req **slots; /* [max_batch] */
  adapter *adapters;
  size_t adapter_bytes;
  uint64_t tick;

  ot_model_kv *kv; /* one slot per batch entry; the model's workspace for a step */
  /* host scratch */
  int32_t *h_tokens, *h_pos, *h_slot;
  ot_model_segment *h_segs; /* [max_step_tokens] */
  float *h_logits;
  void *cand;     /* ot_sample_token scratch */
  int *pen_count; /* [V] zeros: ot_serve_adjust_logits scratch */
};

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

const char *ot_finish_reason_name(ot_finish_reason r) {
  switch (r) {
  case OT_FINISH_LENGTH: return "length";
  case OT_FINISH_STOP: return "stop";
  case OT_FINISH_ERROR: return "error";
  case OT_FINISH_CANCELLED: return "cancelled";
  default: return "none";
  }
}

void ot_serve_config_default(ot_serve_config *c) {
  memset(c, 0, sizeof *c);
  c->max_batch = 32;
  c->max_step_tokens = 512;
  c->eos_id = -1;
}

/* ---- adapter loading ------------------------------------------------------------------- */

static void adapter_free(ot_serve_engine *e, adapter *a) {
  if (!a) return;
  if (a->mem) e->be->ops->free(e->be, a->mem);
  free(a->blk);
  free(a);
}

/* Loads and verifies an adapter through peft/ (the code training uses) and copies its tensors
 * into one compact allocation on the engine's backend, as per-block overrides. */
static int adapter_load(ot_serve_engine *e, const char *name, const char *dir, adapter **out) {
  ot_peft_adapter *pa = NULL;
  int L = e->L, rc = ot_peft_load(dir, ot_model_cfg(e->m), e->base_digest, &pa);
  adapter *a = rc == OT_OK ? calloc(1, sizeof *a) : NULL;
  if (rc == OT_OK && a) a->blk = calloc((size_t)L, sizeof *a->blk);
  if (rc == OT_OK && (!a || !a->blk)) rc = ot_error(OT_ERR_NOMEM, "cannot allocate an adapter");
  const ot_peft_config *pc = rc == OT_OK ? ot_peft_adapter_config(pa) : NULL;
  int n = rc == OT_OK ? ot_peft_tensor_count(pa) : 0;
  for (int i = 0; i < n && rc == OT_OK; i++)
    if (ot_peft_tensor_at(pa, i)->block >= L)
      rc = ot_error(OT_ERR_MISMATCH, "%s: adapter block %d does not exist in this model", dir,
                    ot_peft_tensor_at(pa, i)->block);
  size_t off = 0, *at = rc == OT_OK ? calloc((size_t)n + 1, sizeof *at) : NULL;
  if (rc == OT_OK && !at) rc = ot_error(OT_ERR_NOMEM, "cannot allocate an adapter");
  /* every tensor at a 16-float boundary; LoRA's B also transposed (lora_sgmv_fwd reads rows) */
  for (int i = 0; i < n && rc == OT_OK; i++) {
    const ot_peft_tensor *t = ot_peft_tensor_at(pa, i);
    at[i] = off;
    off += ((t->numel + 15) & ~(size_t)15) * (t->what == OT_PEFT_T_LORA_B ? 2 : 1);
  }
  if (rc == OT_OK) {
    a->bytes = off * sizeof(float);
    rc = e->be->ops->alloc(e->be, a->bytes ? a->bytes : 64, (void **)&a->mem);
  }
  for (int i = 0; i < n && rc == OT_OK; i++) {
    const ot_peft_tensor *t = ot_peft_tensor_at(pa, i);
    ot_block_over *b = &a->blk[t->block];
    float *dst = a->mem + at[i];
    rc = e->be->ops->upload(e->be, dst, t->data, t->numel * sizeof(float));
    if (t->what == OT_PEFT_T_BLOCK) {
      b->p[t->index] = dst;
    } else if (t->what == OT_PEFT_T_BN) {
      b->bn_dim = pc->bottleneck_dim;
      b->bn[t->index / 4][t->index % 4] = dst;
    } else {
      b->lora_sites |= 1u << t->index;
      b->lora_r = pc->lora_r;
      b->lora_scale = ot_peft_lora_scale(pc);
      if (t->what == OT_PEFT_T_LORA_A) b->lora_a[t->index] = dst;
      if (t->what == OT_PEFT_T_LORA_B) {
        int R = t->shape[0], K = t->shape[1];
        float *tr = malloc(t->numel * sizeof(float)), *dst_t = dst + ((t->numel + 15) & ~(size_t)15);
        if (!tr) rc = ot_error(OT_ERR_NOMEM, "cannot allocate an adapter");
        for (int r = 0; tr && r < R; r++)
          for (int k = 0; k < K; k++) tr[(size_t)k * R + r] = t->data[(size_t)r * K + k];
        if (rc == OT_OK) rc = e->be->ops->upload(e->be, dst_t, tr, t->numel * sizeof(float));
        free(tr);
        b->lora_b[t->index] = dst;
        b->lora_bt[t->index] = dst_t;
      }
    }
  }
  if (rc == OT_OK) rc = e->be->ops->sync(e->be);
  free(at);
  if (rc == OT_OK) a->kind = pc->kind;
  ot_peft_free(pa);
  if (rc) {
    adapter_free(e, a);
    return rc;
  }
  snprintf(a->name, sizeof a->name, "%s", name);
  *out = a;
  return OT_OK;
}

/* Scratch for LoRA ranks and bottleneck sizes grows with the largest adapter loaded. */
static int ensure_scratch(ot_serve_engine *e, const adapter *a) {
  int r = 0, d = 0;
  for (int l = 0; l < e->L; l++) {
    if (a->blk[l].lora_r > r) r = a->blk[l].lora_r;
    if (a->blk[l].bn_dim > d) d = a->blk[l].bn_dim;
  }
  return ot_model_kv_reserve(e->kv, r, d);
}

enum { ACQ_OK = 0, ACQ_BUSY = 1 };

/* Makes r's adapter resident: ACQ_OK (r->ad set, referenced), ACQ_BUSY (the budget is held by
 * adapters in use: try again after some finish) or an error. */
static int adapter_acquire(ot_serve_engine *e, req *r) {
  if (!r->adapter_name[0]) return ACQ_OK;
  adapter *a = NULL;
  for (a = e->adapters; a; a = a->next)
    if (!a->stale && strcmp(a->name, r->adapter_name) == 0) break;
  if (a) {
    pthread_mutex_lock(&e->mu);
    e->stats.adapter_hits++;
    pthread_mutex_unlock(&e->mu);
  }
  if (!a) {
    a = r->pending;
    if (!a) {
      char dir[4096];
      int rc = e->cfg.resolve ? e->cfg.resolve(e->cfg.resolve_user, r->adapter_name, dir, sizeof dir)
                              : ot_error(OT_ERR_NOTFOUND, "no adapter resolver");
      if (rc == OT_OK) rc = adapter_load(e, r->adapter_name, dir, &a);
      if (rc) return rc;
      r->pending = a;
    }
    size_t budget = e->cfg.adapter_budget;
    if (budget && a->bytes > budget)
      return ot_error(OT_ERR_RANGE, "adapter '%s' needs %zu bytes, more than the whole budget of %zu",
                      a->name, a->bytes, budget);
    while (budget && e->adapter_bytes + a->bytes > budget) { /* evict the least recently used idle one */
      adapter **victim = NULL;
      for (adapter **pp = &e->adapters; *pp; pp = &(*pp)->next)
        if ((*pp)->refs == 0 && (!victim || (*pp)->last_use < (*victim)->last_use)) victim = pp;
      if (!victim) return ACQ_BUSY;
      adapter *v = *victim;
      *victim = v->next;
      e->adapter_bytes -= v->bytes;
      adapter_free(e, v);
      pthread_mutex_lock(&e->mu);
      e->stats.evictions++;
      pthread_mutex_unlock(&e->mu);
    }
    int rc = ensure_scratch(e, a);
    if (rc) return rc;
    r->pending = NULL;
    a->next = e->adapters;
    e->adapters = a;
    e->adapter_bytes += a->bytes;
    pthread_mutex_lock(&e->mu);
    e->stats.loads++;
    pthread_mutex_unlock(&e->mu);
  }
  a->refs++;
  a->last_use = ++e->tick;
  r->ad = a;
  return ACQ_OK;
}

/* ---- engine ---------------------------------------------------------------------------- */

int ot_serve_engine_create(ot_model *base, const ot_serve_config *cfg, ot_serve_engine **out) {
  if (!base || !cfg || !out) return ot_error(OT_ERR_INVALID, "ot_serve_engine_create: NULL argument");
  if (ot_model_param_count(base) != ot_model_base_param_count(base))
    return ot_error(OT_ERR_INVALID, "the serving base model must carry no adapter tensors");
  ot_backend *be = ot_model_backend(base);
  const ot_model_config *mc = ot_model_cfg(base);
  ot_serve_config c = *cfg;
  if (c.max_batch <= 0) c.max_batch = 32;
  if (c.max_step_tokens <= 0) c.max_step_tokens = 512;
  if (c.max_seq <= 0) c.max_seq = mc->n_positions < 1024 ? mc->n_positions : 1024;
  if (c.max_seq > mc->n_positions)
    return ot_error(OT_ERR_RANGE, "max_seq %d exceeds the model's n_positions %d", c.max_seq,
                    mc->n_positions);
  if (c.max_step_tokens < c.max_batch)
    return ot_error(OT_ERR_INVALID, "max_step_tokens (%d) must be >= max_batch (%d)", c.max_step_tokens,
                    c.max_batch);
  ot_serve_engine *e = calloc(1, sizeof *e);
  if (!e) return ot_error(OT_ERR_NOMEM, "cannot allocate the engine");
  e->m = base;
  e->be = be;
  e->cfg = c;
  snprintf(e->base_digest, sizeof e->base_digest, "%s", c.base_digest ? c.base_digest : "");
  e->cfg.base_digest = e->base_digest;
  e->L = mc->n_layer;
  e->V = mc->vocab_size;
  e->T_max = c.max_seq;
  e->Nmax = c.max_step_tokens;
  e->next_id = 1;
  pthread_mutex_init(&e->mu, NULL);
  pthread_cond_init(&e->cv, NULL);
  pthread_mutex_init(&e->step_mu, NULL);
  int rc = OT_OK;
  int N = e->Nmax, S = c.max_batch, V = e->V;
  if (rc == OT_OK) rc = ot_model_kv_create(base, S, e->T_max, N, S, &e->kv);
  e->slots = calloc((size_t)S, sizeof *e->slots);
  e->h_tokens = malloc((size_t)N * sizeof(int32_t));
  e->h_pos = malloc((size_t)N * sizeof(int32_t));
  e->h_slot = malloc((size_t)N * sizeof(int32_t));
  e->h_segs = malloc((size_t)N * sizeof *e->h_segs);
  e->h_logits = malloc((size_t)S * V * sizeof(float));
  e->cand = malloc(ot_sample_scratch_bytes(V));
  e->pen_count = calloc((size_t)V, sizeof(int));
  if (rc == OT_OK && (!e->slots || !e->h_tokens || !e->h_pos || !e->h_slot || !e->h_segs || !e->h_logits ||
                      !e->cand || !e->pen_count))
    rc = ot_error(OT_ERR_NOMEM, "cannot allocate the engine tables");
  if (rc) {
    ot_serve_engine_free(e);
    return rc;
  }
  *out = e;
  return OT_OK;
}

static void req_free(req *r) {
  if (!r) return;
  for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
  free(r->bias);
  free(r->ids);
  free(r->text);
  free(r);
}

static void emit(req *r, const int32_t *toks, int n_toks, const float *logits, int V, size_t upto,
                 int finished, ot_finish_reason reason, int error, const char *msg) {
  if (upto < r->text_emitted) upto = r->text_emitted;
  ot_serve_event ev = {r->id,
                       toks,
                       n_toks,
                       r->text ? r->text + r->text_emitted : "",
                       upto - r->text_emitted,
                       finished,
                       reason,
                       error,
                       msg,
                       r->n_prompt,
                       r->n_ids - r->n_prompt,
                       r->t_first > 0 ? r->t_first - r->t_submit : 0.0,
                       now_ms() - r->t_submit,
                       logits,
                       V};
  r->text_emitted = upto;
  if (r->fn && (n_toks || ev.text_len || finished)) r->fn(r->user, &ev);
}

/* Ends a request: releases its slot and adapter, sends the last event, frees it. */
static void finish(ot_serve_engine *e, req *r, ot_finish_reason reason, int error, const char *msg) {
  if (r->slot >= 0) e->slots[r->slot] = NULL;
  if (r->ad) r->ad->refs--;
  if (r->pending) adapter_free(e, r->pending);
  emit(r, NULL, 0, NULL, 0, r->text_len, 1, reason, error, msg);
  req_free(r);
}

void ot_serve_engine_free(ot_serve_engine *e) {
  if (!e) return;
  pthread_mutex_lock(&e->mu);
  e->stopping = 1;
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
  if (e->thread_on) pthread_join(e->thread, NULL);
  /* whatever is left ends CANCELLED */
  req *in = e->in_head;
  e->in_head = e->in_tail = NULL;
  while (in) {
    req *n = in->next;
    in->slot = -1;
    finish(e, in, OT_FINISH_CANCELLED, 0, NULL);
    in = n;
  }
  for (int i = 0; i < e->n_waiting; i++) finish(e, e->waiting[i], OT_FINISH_CANCELLED, 0, NULL);
  for (int s = 0; e->slots && s < e->cfg.max_batch; s++)
    if (e->slots[s]) finish(e, e->slots[s], OT_FINISH_CANCELLED, 0, NULL);
  while (e->adapters) {
    adapter *n = e->adapters->next;
    adapter_free(e, e->adapters);
    e->adapters = n;
  }
  ot_model_kv_free(e->kv);
  free(e->waiting);
  free(e->slots);
  free(e->cancels);
  for (int i = 0; i < e->n_forgets; i++) free(e->forgets[i]);
  free(e->forgets);
  free(e->h_tokens);
  free(e->h_pos);
  free(e->h_slot);
  free(e->h_logits);
  free(e->cand);
  free(e->h_segs);
  free(e->pen_count);
  pthread_mutex_destroy(&e->mu);
  pthread_cond_destroy(&e->cv);
  pthread_mutex_destroy(&e->step_mu);
  free(e);
}

int ot_serve_submit(ot_serve_engine *e, const ot_serve_request *rq, ot_serve_event_fn fn, void *user,
                    uint64_t *id) {
  if (!e || !rq) return ot_error(OT_ERR_INVALID, "ot_serve_submit: NULL argument");
  if (!rq->prompt || rq->n_prompt == 0) return ot_error(OT_ERR_INVALID, "the prompt is empty");
  if (rq->n_prompt > (size_t)e->T_max)
    return ot_error(OT_ERR_RANGE, "the prompt has %zu tokens; this server's context is %d", rq->n_prompt,
                    e->T_max);
  for (size_t i = 0; i < rq->n_prompt; i++)
    if (rq->prompt[i] < 0 || rq->prompt[i] >= e->V)
      return ot_error(OT_ERR_RANGE, "prompt token %d is outside the vocabulary (%d)", rq->prompt[i], e->V);
  if (rq->max_tokens < 0) return ot_error(OT_ERR_INVALID, "max_tokens must be >= 0");
  if (!(rq->temperature >= 0.0f) || !isfinite(rq->temperature))
    return ot_error(OT_ERR_INVALID, "temperature must be a finite number >= 0");
  if (!(rq->top_p > 0.0f && rq->top_p <= 1.0f)) return ot_error(OT_ERR_INVALID, "top_p must be in (0, 1]");
  if (rq->top_k < 0) return ot_error(OT_ERR_INVALID, "top_k must be >= 0");
  if (!(rq->presence_penalty >= -2.0f && rq->presence_penalty <= 2.0f) ||
      !(rq->frequency_penalty >= -2.0f && rq->frequency_penalty <= 2.0f))
    return ot_error(OT_ERR_INVALID, "presence_penalty and frequency_penalty must be in [-2, 2]");
  if (rq->n_logit_bias < 0 || (rq->n_logit_bias > 0 && !rq->logit_bias))
    return ot_error(OT_ERR_INVALID, "bad logit_bias");
  for (int i = 0; i < rq->n_logit_bias; i++) {
    if (rq->logit_bias[i].token < 0 || rq->logit_bias[i].token >= e->V)
      return ot_error(OT_ERR_RANGE, "logit_bias token %d is outside the vocabulary (%d)",
                      rq->logit_bias[i].token, e->V);
    if (!(rq->logit_bias[i].bias >= -100.0f && rq->logit_bias[i].bias <= 100.0f))
      return ot_error(OT_ERR_INVALID, "logit_bias values must be in [-100, 100]");
  }
  const char *name = rq->adapter ? rq->adapter : "";
  if (strlen(name) >= sizeof(((req *)0)->adapter_name))
    return ot_error(OT_ERR_NOTFOUND, "adapter name too long");
  if (*name) {
    char dir[4096];
    int rc = e->cfg.resolve ? e->cfg.resolve(e->cfg.resolve_user, name, dir, sizeof dir)
                            : ot_error(OT_ERR_NOTFOUND, "adapter '%s' does not exist", name);
    if (rc) return rc;
  }
  req *r = calloc(1, sizeof *r);
  int cap = (int)rq->n_prompt + rq->max_tokens + 1;
  if (cap > e->T_max + 1) cap = e->T_max + 1;
  if (r) r->ids = malloc((size_t)cap * sizeof(int32_t));
  if (!r || !r->ids) {
    req_free(r);
    return ot_error(OT_ERR_NOMEM, "cannot allocate a request");
  }
  snprintf(r->adapter_name, sizeof r->adapter_name, "%s", name);
  r->p = *rq;
  r->p.adapter = NULL;
  r->p.prompt = NULL;
  r->p.logit_bias = NULL;
  if (rq->n_logit_bias > 0) {
    r->bias = malloc((size_t)rq->n_logit_bias * sizeof *r->bias);
    if (!r->bias) {
      req_free(r);
      return ot_error(OT_ERR_NOMEM, "cannot allocate a request");
    }
    memcpy(r->bias, rq->logit_bias, (size_t)rq->n_logit_bias * sizeof *r->bias);
    r->p.logit_bias = r->bias;
  }
  for (int i = 0; i < OT_SERVE_MAX_STOP && rq->stop[i]; i++) {
    if (!*rq->stop[i]) continue;
    if (!e->cfg.tok) {
      req_free(r);
      return ot_error(OT_ERR_UNSUPPORTED, "stop strings need a tokenizer");
    }
    r->stop[r->n_stop] = strdup(rq->stop[i]);
    if (!r->stop[r->n_stop++]) {
      req_free(r);
      return ot_error(OT_ERR_NOMEM, "cannot allocate a request");
    }
  }
  memcpy(r->ids, rq->prompt, rq->n_prompt * sizeof(int32_t));
  r->n_prompt = r->n_ids = (int)rq->n_prompt;
  r->slot = -1;
  r->rng = rq->seed;
  r->fn = fn;
  r->user = user;
  r->t_submit = now_ms();
  pthread_mutex_lock(&e->mu);
  r->id = e->next_id++;
  if (e->in_tail)
    e->in_tail->next = r;
  else
    e->in_head = r;
  e->in_tail = r;
  e->stats.waiting++;
  pthread_cond_broadcast(&e->cv);
  if (id) *id = r->id;
  pthread_mutex_unlock(&e->mu);
  return OT_OK;
}

void ot_serve_cancel(ot_serve_engine *e, uint64_t id) {
  pthread_mutex_lock(&e->mu);
  if (e->n_cancels == e->cap_cancels) {
    int cap = e->cap_cancels ? 2 * e->cap_cancels : 16;
    uint64_t *c = realloc(e->cancels, (size_t)cap * sizeof *c);
    if (c) {
      e->cancels = c;
      e->cap_cancels = cap;
    }
  }
  if (e->n_cancels < e->cap_cancels) e->cancels[e->n_cancels++] = id;
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
}

/* ---- forward --------------------------------------------------------------------------- */

typedef struct {
  adapter *ad;
  int row0, n;
} segment;

/* One forward over N rows (host arrays h_tokens/h_pos/h_slot, grouped into segments by adapter):
 * the model's own block code with the KV cache; logits of rows last_rows[0..S) into h_logits. */
static int forward(ot_serve_engine *e, int N, const segment *sg, int ns, const int *last_rows, int S) {
  for (int i = 0; i < ns; i++)
    e->h_segs[i] = (ot_model_segment){sg[i].ad ? sg[i].ad->blk : NULL, sg[i].row0, sg[i].n};
  return ot_model_decode(e->m, e->kv, e->h_tokens, e->h_pos, e->h_slot, N, e->h_segs, ns, last_rows, S,
                         e->h_logits);
}

/* ---- text and stop strings ------------------------------------------------------------- */

static int text_append(req *r, const char *s, size_t n) {
  if (r->text_len + n + 1 > r->text_cap) {
    size_t cap = r->text_cap ? r->text_cap * 2 : 256;
    while (cap < r->text_len + n + 1) cap *= 2;
    char *t = realloc(r->text, cap);
    if (!t) return ot_error(OT_ERR_NOMEM, "cannot grow the completion text");
    r->text = t;
    r->text_cap = cap;
  }
  memcpy(r->text + r->text_len, s, n);
  r->text_len += n;
  r->text[r->text_len] = '\0';
  return OT_OK;
}

/* How much text can go out now: not a possible start of a stop string, not half a UTF-8
 * character. */
static size_t safe_len(const req *r) {
  size_t safe = r->text_len;
  for (int i = 0; i < r->n_stop; i++) {
    size_t ls = strlen(r->stop[i]);
    for (size_t k = ls - 1; k > 0; k--)
      if (k <= r->text_len && memcmp(r->text + r->text_len - k, r->stop[i], k) == 0) {
        if (r->text_len - k < safe) safe = r->text_len - k;
        break;
      }
  }
  size_t i = safe, back = 0;
  while (i > 0 && back < 4 && ((unsigned char)r->text[i - 1] & 0xC0) == 0x80) {
    i--;
    back++;
  }
  if (i > 0) {
    unsigned char c = (unsigned char)r->text[i - 1];
    size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    if (need > back + 1) safe = i - 1;
  }
  return safe;
}

/* Appends a sampled token (*shown: it joins the completion); returns the finish reason
 * (NONE to go on). */
static ot_finish_reason take_token(ot_serve_engine *e, req *r, int32_t tok, int *shown) {
  int completion = r->n_ids - r->n_prompt;
  *shown = 0;
  if (tok == e->cfg.eos_id && e->cfg.eos_id >= 0 && !r->p.ignore_eos) return OT_FINISH_STOP;
  *shown = 1;
  r->ids[r->n_ids++] = tok;
  completion++;
  if (e->cfg.tok) {
    char *s = NULL;
    size_t n = 0;
    /* one token continuing the text: no start-of-text strip (Llama 2 would lose its spaces) */
    if (ot_tokenizer_decode_ex(e->cfg.tok, &tok, 1, OT_TOK_CONTINUATION, &s, &n) == OT_OK) {
      size_t before = r->text_len;
      text_append(r, s, n);
      free(s);
      for (int i = 0; i < r->n_stop; i++) {
        size_t ls = strlen(r->stop[i]), from = before >= ls ? before - ls + 1 : 0;
        char *hit = r->text_len >= ls ? memmem(r->text + from, r->text_len - from, r->stop[i], ls) : NULL;
        if (hit) {
          r->text_len = (size_t)(hit - r->text);
          r->text[r->text_len] = '\0';
          return OT_FINISH_STOP;
        }
      }
    }
  }
  if (completion >= r->p.max_tokens || r->n_ids > e->T_max) return OT_FINISH_LENGTH;
  return OT_FINISH_NONE;
}

/* ---- scheduler ------------------------------------------------------------------------- */

static int cmp_seg(const void *a, const void *b) {
  const req *x = *(req *const *)a, *y = *(req *const *)b;
  uintptr_t px = (uintptr_t)x->ad, py = (uintptr_t)y->ad;
  if (px != py) return px < py ? -1 : 1;
  return x->slot - y->slot;
}

static int step(ot_serve_engine *e, int *busy);

int ot_serve_step(ot_serve_engine *e, int *busy) {
  pthread_mutex_lock(&e->step_mu);
  int rc = step(e, busy);
  pthread_mutex_unlock(&e->step_mu);
  return rc;
}

static int step(ot_serve_engine *e, int *busy) {
  /* take new requests and cancellations */
  pthread_mutex_lock(&e->mu);
  req *in = e->in_head;
  e->in_head = e->in_tail = NULL;
  int n_cancel = e->n_cancels;
  uint64_t *cancels = NULL;
  if (n_cancel) {
    cancels = malloc((size_t)n_cancel * sizeof *cancels);
    if (cancels) memcpy(cancels, e->cancels, (size_t)n_cancel * sizeof *cancels);
    e->n_cancels = 0;
  }
  pthread_mutex_unlock(&e->mu);
  int rc = OT_OK;
  while (in) {
    req *n = in->next;
    in->next = NULL;
    if (e->n_waiting == e->cap_waiting) {
      int cap = e->cap_waiting ? 2 * e->cap_waiting : 64;
      req **w = realloc(e->waiting, (size_t)cap * sizeof *w);
      if (!w) {
        finish(e, in, OT_FINISH_ERROR, OT_ERR_NOMEM, "the server is out of memory");
        in = n;
        continue;
      }
      e->waiting = w;
      e->cap_waiting = cap;
    }
    e->waiting[e->n_waiting++] = in;
    in = n;
  }
  for (int c = 0; cancels && c < n_cancel; c++) {
    for (int i = 0; i < e->n_waiting; i++)
      if (e->waiting[i]->id == cancels[c]) {
        finish(e, e->waiting[i], OT_FINISH_CANCELLED, 0, NULL);
        memmove(e->waiting + i, e->waiting + i + 1, (size_t)(e->n_waiting - i - 1) * sizeof *e->waiting);
        e->n_waiting--;
        break;
      }
    for (int s = 0; s < e->cfg.max_batch; s++)
      if (e->slots[s] && e->slots[s]->id == cancels[c]) finish(e, e->slots[s], OT_FINISH_CANCELLED, 0, NULL);
  }
  free(cancels);

  /* forgotten adapters: dropped now when idle, else once their last request ends */
  pthread_mutex_lock(&e->mu);
  char **forgets = e->forgets;
  int n_forgets = e->n_forgets;
  e->forgets = NULL;
  e->n_forgets = 0;
  pthread_mutex_unlock(&e->mu);
  for (int f = 0; f < n_forgets; f++) {
    for (adapter *a = e->adapters; a; a = a->next)
      if (strcmp(a->name, forgets[f]) == 0) a->stale = 1;
    free(forgets[f]);
  }
  free(forgets);
  for (adapter **pp = &e->adapters; *pp;) {
    adapter *a = *pp;
    if (a->stale && a->refs == 0) {
      *pp = a->next;
      e->adapter_bytes -= a->bytes;
      adapter_free(e, a);
    } else {
      pp = &a->next;
    }
  }

  /* admit waiting requests (FIFO) into free slots */
  while (e->n_waiting > 0) {
    int slot = -1;
    for (int s = 0; s < e->cfg.max_batch && slot < 0; s++)
      if (!e->slots[s]) slot = s;
    if (slot < 0) break;
    req *r = e->waiting[0];
    int a = adapter_acquire(e, r);
    if (a == ACQ_BUSY) break;
    memmove(e->waiting, e->waiting + 1, (size_t)(e->n_waiting - 1) * sizeof *e->waiting);
    e->n_waiting--;
    if (a != ACQ_OK) {
      char msg[512];
      snprintf(msg, sizeof msg, "adapter '%s': %s", r->adapter_name, ot_error_detail());
      finish(e, r, OT_FINISH_ERROR, a, msg);
      continue;
    }
    r->slot = slot;
    r->t_first = now_ms();
    e->slots[slot] = r;
    if (r->p.max_tokens == 0) finish(e, r, OT_FINISH_LENGTH, 0, NULL);
  }

  /* the step's rows: every decoding sequence one row, prefills in chunks within the budget */
  req *act[1024];
  req **part = e->cfg.max_batch <= 1024 ? act : malloc((size_t)e->cfg.max_batch * sizeof *part);
  if (!part) return ot_error(OT_ERR_NOMEM, "cannot allocate the step");
  int np = 0, budget = e->Nmax;
  for (int pass = 0; pass < 2; pass++)
    for (int s = 0; s < e->cfg.max_batch; s++) {
      req *r = e->slots[s];
      if (!r) continue;
      int todo = r->n_ids - r->n_cached, decode = todo == 1;
      if (decode != (pass == 0) || budget == 0) continue;
      part[np++] = r;
      r->step_rows = todo < budget ? todo : budget;
      budget -= r->step_rows;
    }
  qsort(part, (size_t)np, sizeof *part, cmp_seg);
  segment sg[1024 + 1];
  segment *segs = np < 1024 ? sg : malloc((size_t)(np + 1) * sizeof *segs);
  int *last_rows = malloc((size_t)(np ? np : 1) * sizeof(int));
  req **need = malloc((size_t)(np ? np : 1) * sizeof *need);
  if (!segs || !last_rows || !need) rc = ot_error(OT_ERR_NOMEM, "cannot allocate the step");
  int N = 0, ns = 0, S = 0;
  for (int i = 0; i < np && rc == OT_OK; i++) {
    req *r = part[i];
    int k = r->step_rows;
    if (ns == 0 || segs[ns - 1].ad != r->ad) segs[ns++] = (segment){r->ad, N, 0};
    for (int j = 0; j < k; j++) {
      e->h_tokens[N + j] = r->ids[r->n_cached + j];
      e->h_pos[N + j] = r->n_cached + j;
      e->h_slot[N + j] = r->slot;
    }
    N += k;
    segs[ns - 1].n += k;
    r->n_cached += k;
    if (r->n_cached == r->n_ids) {
      last_rows[S] = N - 1;
      need[S++] = r;
    }
  }
  if (rc == OT_OK && N > 0) rc = forward(e, N, segs, ns, last_rows, S);
  if (rc) { /* a backend failure ends the step's requests, not the server */
    char msg[512];
    snprintf(msg, sizeof msg, "inference failed: %s", ot_error_detail());
    for (int i = 0; i < np; i++) finish(e, part[i], OT_FINISH_ERROR, rc, msg);
  } else {
    for (int i = 0; i < S; i++) {
      req *r = need[i];
      ot_serve_adjust_logits(e->h_logits + (size_t)i * e->V, e->V, r->ids + r->n_prompt,
                             r->n_ids - r->n_prompt, r->p.presence_penalty, r->p.frequency_penalty,
                             r->p.logit_bias, r->p.n_logit_bias, e->pen_count);
      int32_t tok = ot_sample_token(e->h_logits + (size_t)i * e->V, e->V, r->p.temperature, r->p.top_p,
                                    r->p.top_k, &r->rng, e->cand);
      int shown;
      ot_finish_reason why = take_token(e, r, tok, &shown);
      if (shown)
        emit(r, &tok, 1, e->h_logits + (size_t)i * e->V, e->V,
             why == OT_FINISH_NONE ? safe_len(r) : r->text_len, 0, OT_FINISH_NONE, 0, NULL);
      if (why != OT_FINISH_NONE) finish(e, r, why, 0, NULL);
    }
  }
  if (segs != sg) free(segs);
  if (part != act) free(part);
  free(last_rows);
  free(need);

  int running = 0;
  uint64_t kv = 0;
  for (int s = 0; s < e->cfg.max_batch; s++)
    if (e->slots[s]) {
      running++;
      kv += (uint64_t)e->slots[s]->n_cached;
    }
  pthread_mutex_lock(&e->mu);
  e->stats.step_rows = N;
  e->stats.kv_positions = kv;
  e->stats.kv_capacity = (uint64_t)e->cfg.max_batch * (uint64_t)e->T_max;
  e->stats.max_batch = e->cfg.max_batch;
  e->stats.steps += N > 0;
  e->stats.rows_computed += (uint64_t)N;
  e->stats.tokens_generated += rc == OT_OK ? (uint64_t)S : 0;
  e->stats.running = running;
  e->stats.waiting = e->n_waiting + (e->in_head != NULL);
  int n_adapters = 0;
  for (adapter *a = e->adapters; a; a = a->next) n_adapters++;
  e->stats.adapters_loaded = n_adapters;
  e->stats.adapter_bytes = e->adapter_bytes;
  if (busy) *busy = running + e->n_waiting + (e->in_head != NULL) + e->n_cancels;
  pthread_mutex_unlock(&e->mu);
  return rc;
}

static void *engine_main(void *arg) {
  ot_serve_engine *e = arg;
  for (;;) {
    int busy = 0;
    ot_serve_step(e, &busy);
    pthread_mutex_lock(&e->mu);
    if (e->stopping) {
      pthread_mutex_unlock(&e->mu);
      break;
    }
    if (!busy) {
      while (!e->stopping && !e->in_head && !e->n_cancels && !e->n_forgets) pthread_cond_wait(&e->cv, &e->mu);
    } else if (busy && e->stats.running == 0 && !e->in_head && !e->n_cancels) {
      /* waiting for adapter memory that no running request will free: cannot happen, but never spin */
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += 10 * 1000000;
      if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
      }
      pthread_cond_timedwait(&e->cv, &e->mu, &ts);
    }
    int stop = e->stopping;
    pthread_mutex_unlock(&e->mu);
    if (stop) break;
  }
  return NULL;
}

int ot_serve_start(ot_serve_engine *e) {
  if (e->thread_on) return ot_error(OT_ERR_INVALID, "the engine thread already runs");
  if (pthread_create(&e->thread, NULL, engine_main, e) != 0)
    return ot_error(OT_ERR_INTERNAL, "cannot start the engine thread");
  e->thread_on = 1;
  return OT_OK;
}

void ot_serve_forget_adapter(ot_serve_engine *e, const char *name) {
  char *n = strdup(name);
  pthread_mutex_lock(&e->mu);
  char **f = n ? realloc(e->forgets, (size_t)(e->n_forgets + 1) * sizeof *f) : NULL;
  if (f) {
    e->forgets = f;
    f[e->n_forgets++] = n;
    n = NULL;
  }
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
  free(n);
}

void ot_serve_get_stats(ot_serve_engine *e, ot_serve_stats *out) {
  pthread_mutex_lock(&e->mu);
  *out = e->stats;
  pthread_mutex_unlock(&e->mu);
}

/* ---- blocking generation --------------------------------------------------------------- */

typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done, error;
  char msg[512];
  ot_serve_result res;
  int cap;
  int nomem;
} waiter;

static void collect(void *user, const ot_serve_event *ev) {
  waiter *w = user;
  pthread_mutex_lock(&w->mu);
  if (ev->n_tokens) {
    if (w->res.n_tokens + ev->n_tokens > w->cap) {
      int cap = w->cap ? w->cap * 2 : 64;
      while (cap < w->res.n_tokens + ev->n_tokens) cap *= 2;
      int32_t *t = realloc(w->res.tokens, (size_t)cap * sizeof(int32_t));
      if (t) {
        w->res.tokens = t;
        w->cap = cap;
      } else {
        w->nomem = 1;
      }
    }
    if (!w->nomem)
      memcpy(w->res.tokens + w->res.n_tokens, ev->tokens, (size_t)ev->n_tokens * sizeof(int32_t));
    if (!w->nomem) w->res.n_tokens += ev->n_tokens;
  }
  if (ev->text_len) {
    char *t = realloc(w->res.text, w->res.text_len + ev->text_len + 1);
    if (t) {
      memcpy(t + w->res.text_len, ev->text, ev->text_len);
      w->res.text = t;
      w->res.text_len += ev->text_len;
      t[w->res.text_len] = '\0';
    } else {
      w->nomem = 1;
    }
  }
  if (ev->finished) {
    w->done = 1;
    w->res.reason = ev->reason;
    w->res.prompt_tokens = ev->prompt_tokens;
    w->error = ev->reason == OT_FINISH_ERROR ? (ev->error ? ev->error : OT_ERR_INTERNAL) : 0;
    snprintf(w->msg, sizeof w->msg, "%s", ev->error_msg ? ev->error_msg : "");
    pthread_cond_broadcast(&w->cv);
  }
  pthread_mutex_unlock(&w->mu);
}

void ot_serve_result_free(ot_serve_result *r) {
  if (!r) return;
  free(r->tokens);
  free(r->text);
  memset(r, 0, sizeof *r);
}

int ot_serve_generate(ot_serve_engine *e, const ot_serve_request *r, ot_serve_result *out) {
  waiter w;
  memset(&w, 0, sizeof w);
  pthread_mutex_init(&w.mu, NULL);
  pthread_cond_init(&w.cv, NULL);
  int rc = ot_serve_submit(e, r, collect, &w, NULL);
  if (rc == OT_OK) {
    if (e->thread_on) {
      pthread_mutex_lock(&w.mu);
      while (!w.done) pthread_cond_wait(&w.cv, &w.mu);
      pthread_mutex_unlock(&w.mu);
    } else {
      while (rc == OT_OK && !w.done) rc = ot_serve_step(e, NULL);
    }
  }
  if (rc == OT_OK && w.error) rc = ot_error(w.error, "%s", w.msg);
  if (rc == OT_OK && w.nomem) rc = ot_error(OT_ERR_NOMEM, "cannot collect the completion");
  if (rc == OT_OK && !w.res.text) {
    w.res.text = calloc(1, 1);
    if (!w.res.text) rc = ot_error(OT_ERR_NOMEM, "cannot collect the completion");
  }
  pthread_mutex_destroy(&w.mu);
  pthread_cond_destroy(&w.cv);
  if (rc) {
    ot_serve_result_free(&w.res);
    return rc;
  }
  *out = w.res;
  return OT_OK;
}
