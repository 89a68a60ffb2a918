#include "ot_eval.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ot_data.h"
#include "ot_error.h"
#include "ot_rng.h"

int ot_eval_tokens(ot_model *m, const int32_t *ids, size_t n, int T, int B, ot_progress *progress,
                   ot_eval_result *out) {
  size_t nw = ot_eval_window_count(n, T);
  if (nw == 0) return ot_error(OT_ERR_INVALID, "need at least 2 tokens to score, got %zu", n);
  if (B < 1) B = 1;
  int32_t *in = malloc((size_t)B * T * sizeof(int32_t)), *tg = malloc((size_t)B * T * sizeof(int32_t));
  if (!in || !tg) {
    free(in);
    free(tg);
    return ot_error(OT_ERR_NOMEM, "cannot allocate eval batch");
  }
  double sum = 0.0;
  size_t count = 0;
  int rc = OT_OK;
  size_t full = (n - 1) / (size_t)T; /* windows of exactly T, scored B at a time */
  for (size_t k = 0; k < nw && rc == OT_OK;) {
    int len = ot_eval_window_len(n, T, k);
    int b = k < full ? (int)((full - k) < (size_t)B ? (full - k) : (size_t)B) : 1;
    for (int r = 0; r < b; r++) {
      memcpy(in + (size_t)r * len, ids + (k + r) * (size_t)T, (size_t)len * sizeof(int32_t));
      memcpy(tg + (size_t)r * len, ids + (k + r) * (size_t)T + 1, (size_t)len * sizeof(int32_t));
    }
    double s;
    size_t c;
    rc = ot_model_forward(m, in, tg, b, len, NULL);
    if (rc == OT_OK) rc = ot_model_last_loss_sum(m, &s, &c);
    if (rc == OT_OK) {
      sum += s;
      count += c;
    }
    k += (size_t)b;
    if (progress) ot_progress_update(progress, (int64_t)k, NULL);
  }
  free(in);
  free(tg);
  if (rc) return rc;
  out->tokens = count;
  out->loss = sum / (double)count;
  out->perplexity = exp(out->loss);
  return OT_OK;
}

int ot_eval_windows(ot_model *m, const int32_t *ids, size_t n, int T, int batch, FILE *progress,
                    ot_eval_result *out) {
  size_t windows = ot_eval_window_count(n, T);
  int B = windows < (size_t)batch ? (int)(windows ? windows : 1) : batch;
  int rc = ot_model_prepare(m, B, T, 0);
  if (rc) return rc;
  ot_progress prog;
  if (progress) ot_progress_start(&prog, progress, "eval", (int64_t)windows);
  rc = ot_eval_tokens(m, ids, n, T, B, progress ? &prog : NULL, out);
  if (progress) ot_progress_finish(&prog, rc == OT_OK ? "done" : "failed");
  return rc;
}

int ot_eval_rows(ot_model *m, const int32_t *in, const int32_t *tg, size_t n_rows, int T, int B,
                 ot_progress *progress, ot_eval_result *out) {
  if (B < 1) B = 1;
  double sum = 0.0;
  size_t count = 0;
  int rc = OT_OK;
  for (size_t k = 0; k < n_rows && rc == OT_OK;) {
    int b = n_rows - k < (size_t)B ? (int)(n_rows - k) : B;
    double s = 0.0;
    size_t c = 0;
    rc = ot_model_forward(m, in + k * (size_t)T, tg + k * (size_t)T, b, T, NULL);
    if (rc == OT_OK) rc = ot_model_last_loss_sum(m, &s, &c);
    sum += s;
    count += c;
    k += (size_t)b;
    if (progress) ot_progress_update(progress, (int64_t)k, NULL);
  }
  if (rc) return rc;
  if (count == 0) return ot_error(OT_ERR_INVALID, "nothing to score: no target tokens");
  out->tokens = count;
  out->loss = sum / (double)count;
  out->perplexity = exp(out->loss);
  return OT_OK;
}

int ot_eval_data(ot_model *m, const ot_tokens *t, int T, int B, ot_progress *progress, ot_eval_result *out) {
  if (!t->mask) return ot_eval_tokens(m, t->ids, t->n, T, B, progress, out);
  int32_t *in = NULL, *tg = NULL;
  size_t rows = 0;
  int rc = ot_pack_rows(t, T, &in, &tg, &rows, NULL);
  if (rc == OT_OK) rc = ot_eval_rows(m, in, tg, rows, T, B, progress, out);
  free(in);
  free(tg);
  return rc;
}

int ot_eval_input(ot_model *m, const ot_tokens *t, int T, int batch, FILE *progress, ot_eval_result *out) {
  if (!t->mask) return ot_eval_windows(m, t->ids, t->n, T, batch, progress, out);
  int32_t *in = NULL, *tg = NULL;
  size_t rows = 0;
  int rc = ot_pack_rows(t, T, &in, &tg, &rows, NULL);
  int B = rows < (size_t)batch ? (int)rows : batch;
  if (rc == OT_OK) rc = ot_model_prepare(m, B, T, 0);
  if (rc == OT_OK) {
    ot_progress prog;
    if (progress) ot_progress_start(&prog, progress, "eval", (int64_t)rows);
    rc = ot_eval_rows(m, in, tg, rows, T, B, progress ? &prog : NULL, out);
    if (progress) ot_progress_finish(&prog, rc == OT_OK ? "done" : "failed");
  }
  free(in);
  free(tg);
  return rc;
}

void ot_eval_print(FILE *f, const ot_eval_result *r, int json) {
  if (json)
    fprintf(f, "{\"loss\": %.6f, \"perplexity\": %.6f, \"tokens\": %zu}\n", r->loss, r->perplexity,
            r->tokens);
  else
    fprintf(f, "loss %.4f nats/token | perplexity %.3f | %zu tokens\n", r->loss, r->perplexity, r->tokens);
}

typedef struct {
  float p;
  int id;
} cand;

size_t ot_sample_scratch_bytes(int V) { return (size_t)V * sizeof(cand); }

static int cand_desc(const void *a, const void *b) {
  float x = ((const cand *)a)->p, y = ((const cand *)b)->p;
  return (x < y) - (x > y);
}

int ot_sample_token(const float *logits, int V, float temperature, float top_p, int top_k, uint64_t *rng,
                    void *scratch) {
  cand *buf = scratch;
  int best = 0;
  for (int i = 1; i < V; i++)
    if (logits[i] > logits[best]) best = i;
  if (temperature <= 0.0f) return best;
  double sum = 0.0;
  for (int i = 0; i < V; i++) {
    buf[i].id = i;
    buf[i].p = expf((logits[i] - logits[best]) / temperature);
    sum += buf[i].p;
  }
  int n = V;
  int topk = top_k > 0 && top_k<V, topp = top_p> 0.0f && top_p < 1.0f;
  if (topk || topp) {
    qsort(buf, (size_t)V, sizeof *buf, cand_desc);
    if (topk) {
      n = top_k;
      sum = 0.0;
      for (int i = 0; i < n; i++) sum += buf[i].p;
    }
    if (topp) {
      double acc = 0.0;
      int m;
      for (m = 0; m < n; m++) {
        acc += buf[m].p / sum;
        if (acc >= top_p) {
          m++;
          break;
        }
      }
      n = m > n ? n : m;
      sum = 0.0;
      for (int i = 0; i < n; i++) sum += buf[i].p;
    }
  }
  double r = ot_rng_uniform(rng) * sum, acc = 0.0;
  for (int i = 0; i < n; i++) {
    acc += buf[i].p;
    if (r < acc) return buf[i].id;
  }
  return buf[n - 1].id;
}

int ot_generate(ot_model *m, const int32_t *prompt, size_t n_prompt, const ot_sample_config *sc,
                int32_t **out, size_t *n_out) {
  if (n_prompt == 0) return ot_error(OT_ERR_INVALID, "the prompt is empty");
  if (sc->max_tokens < 0) return ot_error(OT_ERR_INVALID, "max tokens must be >= 0");
  int V = ot_model_cfg(m)->vocab_size, window = ot_model_cfg(m)->n_positions;
  size_t cap = n_prompt + (size_t)sc->max_tokens;
  int32_t *ids = malloc(cap * sizeof(int32_t));
  float *logits = malloc((size_t)V * sizeof(float));
  void *buf = malloc(ot_sample_scratch_bytes(V));
  if (!ids || !logits || !buf) {
    free(ids);
    free(logits);
    free(buf);
    return ot_error(OT_ERR_NOMEM, "cannot allocate generation buffers");
  }
  memcpy(ids, prompt, n_prompt * sizeof(int32_t));
  size_t n = n_prompt;
  uint64_t rng = sc->seed;
  int rc = OT_OK;
  for (int s = 0; s < sc->max_tokens && rc == OT_OK; s++) {
    size_t ctx = n < (size_t)window ? n : (size_t)window;
    rc = ot_model_forward(m, ids + n - ctx, NULL, 1, (int)ctx, NULL);
    if (rc == OT_OK) rc = ot_model_last_logits(m, 0, logits);
    if (rc == OT_OK) ids[n++] = ot_sample_token(logits, V, sc->temperature, sc->top_p, 0, &rng, buf);
  }
  free(logits);
  free(buf);
  if (rc) {
    free(ids);
    return rc;
  }
  *out = ids;
  *n_out = n;
  return OT_OK;
}
