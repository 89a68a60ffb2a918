/* Scoring and sampling on a prepared model. */
#ifndef OT_EVAL_H
#define OT_EVAL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "ot_cli.h"
#include "ot_data.h"
#include "ot_model.h"

typedef struct {
  double loss;       /* mean negative log-likelihood per target token, nats */
  double perplexity; /* exp(loss) */
  size_t tokens;     /* number of targets scored */
} ot_eval_result;

/* Scores ids[0..n) in non-overlapping windows of T (see ot_eval_window_*), batching up
 * to the model's prepared batch size. The model must be prepared with a T at least as
 * large. progress may be NULL. */
int ot_eval_tokens(ot_model *m, const int32_t *ids, size_t n, int T, int B, ot_progress *progress,
                   ot_eval_result *out);

/* What the eval commands do: prepares the model for up to `batch` windows of T (fewer
 * if the text has fewer), scores with a progress bar on `progress` (may be NULL). */
int ot_eval_windows(ot_model *m, const int32_t *ids, size_t n, int T, int batch, FILE *progress,
                    ot_eval_result *out);
/* Scores rows [n_rows x T] of inputs and targets (-1 = not scored), B rows at a time
 * (the model prepared for at least B x T). */
int ot_eval_rows(ot_model *m, const int32_t *in, const int32_t *tg, size_t n_rows, int T, int B,
                 ot_progress *progress, ot_eval_result *out);
/* What the eval commands and held-out scoring call: plain text as ot_eval_tokens (windows),
 * supervised examples (t->mask) on their target tokens only, packed as for training
 * (ot_pack_rows). The model must be prepared for B x T. */
int ot_eval_data(ot_model *m, const ot_tokens *t, int T, int B, ot_progress *progress, ot_eval_result *out);
/* ot_eval_windows for either kind of input: prepares the model, progress bar on `progress`. */
int ot_eval_input(ot_model *m, const ot_tokens *t, int T, int batch, FILE *progress, ot_eval_result *out);
/* One line: human-readable, or {"loss", "perplexity", "tokens"} with json. */
void ot_eval_print(FILE *f, const ot_eval_result *r, int json);

typedef struct {
  int max_tokens;
  float temperature; /* 0 = greedy */
  float top_p;       /* nucleus sampling, 1 = off */
  uint64_t seed;
} ot_sample_config;

/* One token from softmax(logits / temperature): greedy (argmax) when temperature <= 0,
 * else top-k (0 = off) and then top-p (1 = off) over the sorted distribution, drawn with one
 * ot_splitmix64 step of *rng; the same seed gives the same draws. scratch holds
 * ot_sample_scratch_bytes(V) bytes (malloc-aligned). */
int ot_sample_token(const float *logits, int V, float temperature, float top_p, int top_k, uint64_t *rng,
                    void *scratch);
size_t ot_sample_scratch_bytes(int V);

/* Extends prompt ids with up to max_tokens sampled ids (context cropped to the model's
 * window). *out holds prompt + completion (malloc'd). The model must be prepared with
 * B >= 1 and T = its n_positions or the window wanted. */
int ot_generate(ot_model *m, const int32_t *prompt, size_t n_prompt, const ot_sample_config *sc,
                int32_t **out, size_t *n_out);

#endif
