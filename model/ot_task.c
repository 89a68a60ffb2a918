/* Task evaluation (ot_task.h): log-likelihood scoring of continuations and greedy
 * generation on a prepared model. */
#include "ot_task.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ot_cli.h"
#include "ot_error.h"
#include "ot_eval.h"
#include "ot_examples.h"
#include "ot_fileio.h"

#define OT_TASK_MAX_FILE ((size_t)1 << 30)
#define OT_TASK_MAX_CHOICES 64
#define OT_TASK_MAX_STOPS 8
#define OT_TASK_MAX_GEN 1024

enum { K_CHOICE, K_CLOZE, K_GENERATE };

typedef struct {
  int32_t *ids;
  size_t n;
  size_t bytes; /* UTF-8 length of the choice as written (acc_norm) */
} cont;

typedef struct {
  int kind;
  int32_t *ctx;
  size_t n_ctx;
  cont *conts; /* choices, or the cloze target */
  int n_conts, label;
  char *target; /* generate */
  int max_tokens, n_stops;
  char *stops[OT_TASK_MAX_STOPS];
} item;

struct ot_task {
  item *items;
  size_t n;
  int32_t eot; /* -1: none */
};

size_t ot_task_count(const ot_task *t) { return t ? t->n : 0; }

static void item_free(item *it) {
  free(it->ctx);
  for (int i = 0; i < it->n_conts; i++) free(it->conts[i].ids);
  free(it->conts);
  free(it->target);
  for (int i = 0; i < it->n_stops; i++) free(it->stops[i]);
}

void ot_task_free(ot_task *t) {
  if (!t) return;
  for (size_t i = 0; i < t->n; i++) item_free(&t->items[i]);
  free(t->items);
  free(t);
}

static char *dup_str(const char *s) {
  size_t n = strlen(s);
  char *d = malloc(n + 1);
  if (d) memcpy(d, s, n + 1);
  return d;
}

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Context and continuation as lm-evaluation-harness encodes them: the context's trailing
 * whitespace moves to the continuation's front, the context and the whole text are encoded, and
 * the continuation is what the whole text has past the context's tokens. Encoding the
 * continuation alone would add a SentencePiece tokenizer's leading "▁" (Llama 2's Prepend
 * normalizer) mid-text; byte-level BPE (GPT-2) gives the same tokens either way. */
static int encode_pair(const ot_tokenizer *tok, const char *ctx, const char *cont_text, int32_t **ctx_ids,
                       size_t *n_ctx, cont *c) {
  size_t lc = strlen(ctx), keep = lc;
  while (keep > 0 && is_ws(ctx[keep - 1])) keep--;
  size_t lt = strlen(cont_text);
  char *full = malloc(lc + lt + 1);
  if (!full) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  memcpy(full, ctx, lc);
  memcpy(full + lc, cont_text, lt + 1);
  int rc = OT_OK;
  if (!*ctx_ids) rc = ot_tokenizer_encode(tok, ctx, keep, ctx_ids, n_ctx);
  int32_t *whole = NULL;
  size_t nw = 0;
  if (rc == OT_OK) rc = ot_tokenizer_encode(tok, full, lc + lt, &whole, &nw);
  free(full);
  if (rc == OT_OK && nw <= *n_ctx) {
    free(whole);
    return ot_error(OT_ERR_FORMAT, "the continuation \"%.40s\" adds no token to its context", cont_text);
  }
  if (rc == OT_OK) {
    c->n = nw - *n_ctx;
    memmove(whole, whole + *n_ctx, c->n * sizeof *whole);
    c->ids = whole;
    c->bytes = lt;
  } else {
    free(whole);
  }
  return rc;
}

/* A JSON number that is an integer in [lo, hi]; checked in double before any conversion
 * (casting 1e300 to int is undefined). */
static int int_in(const cJSON *v, int lo, int hi, int *out) {
  if (!cJSON_IsNumber(v)) return 0;
  double d = v->valuedouble;
  if (!(d >= lo && d <= hi) || d != floor(d)) return 0;
  *out = (int)d;
  return 1;
}

static int parse_item(const cJSON *j, const ot_tokenizer *tok, const char *path, size_t line, item *it) {
#define BAD(...) ot_error(OT_ERR_FORMAT, __VA_ARGS__)
  if (!cJSON_IsObject(j)) return BAD("%s:%zu: a line must be one JSON object", path, line);
  const cJSON *ty = cJSON_GetObjectItemCaseSensitive(j, "type"),
              *cx = cJSON_GetObjectItemCaseSensitive(j, "context");
  if (!cJSON_IsString(ty))
    return BAD("%s:%zu: \"type\" must be \"multiple_choice\", \"cloze\" or \"generate\"", path, line);
  if (strcmp(ty->valuestring, "multiple_choice") == 0)
    it->kind = K_CHOICE;
  else if (strcmp(ty->valuestring, "cloze") == 0)
    it->kind = K_CLOZE;
  else if (strcmp(ty->valuestring, "generate") == 0)
    it->kind = K_GENERATE;
  else
    return BAD("%s:%zu: unknown \"type\" \"%.40s\" (multiple_choice, cloze or generate)", path, line,
               ty->valuestring);
  if (!cJSON_IsString(cx)) return BAD("%s:%zu: \"context\" must be a string", path, line);
  const char *ctx = cx->valuestring;
  size_t k = strlen(ctx);
  while (k > 0 && is_ws(ctx[k - 1])) k--;
  if (k == 0) return BAD("%s:%zu: \"context\" is empty", path, line);
  int rc = OT_OK;
  if (it->kind == K_CHOICE) {
    const cJSON *ch = cJSON_GetObjectItemCaseSensitive(j, "choices"),
                *lb = cJSON_GetObjectItemCaseSensitive(j, "label");
    int n = cJSON_IsArray(ch) ? cJSON_GetArraySize(ch) : 0;
    if (n < 2 || n > OT_TASK_MAX_CHOICES)
      return BAD("%s:%zu: \"choices\" must be an array of 2 to %d strings", path, line, OT_TASK_MAX_CHOICES);
    if (!int_in(lb, 0, n - 1, &it->label))
      return BAD("%s:%zu: \"label\" must be an integer index into \"choices\" (0..%d)", path, line, n - 1);
    if (!(it->conts = calloc((size_t)n, sizeof *it->conts))) return ot_error(OT_ERR_NOMEM, "cannot allocate");
    const cJSON *v;
    cJSON_ArrayForEach(v, ch) {
      if (!cJSON_IsString(v) || !v->valuestring[0])
        return BAD("%s:%zu: choices[%d] must be a non-empty string", path, line, it->n_conts);
      rc = encode_pair(tok, ctx, v->valuestring, &it->ctx, &it->n_ctx, &it->conts[it->n_conts]);
      it->n_conts++;
      if (rc) return rc;
    }
    return OT_OK;
  }
  const cJSON *tg = cJSON_GetObjectItemCaseSensitive(j, "target");
  if (!cJSON_IsString(tg) || !tg->valuestring[0])
    return BAD("%s:%zu: \"target\" must be a non-empty string", path, line);
  if (it->kind == K_CLOZE) {
    if (!(it->conts = calloc(1, sizeof *it->conts))) return ot_error(OT_ERR_NOMEM, "cannot allocate");
    it->n_conts = 1;
    return encode_pair(tok, ctx, tg->valuestring, &it->ctx, &it->n_ctx, &it->conts[0]);
  }
  const cJSON *mt = cJSON_GetObjectItemCaseSensitive(j, "max_tokens"),
              *st = cJSON_GetObjectItemCaseSensitive(j, "stop");
  it->max_tokens = 32;
  if (mt) {
    if (!int_in(mt, 1, OT_TASK_MAX_GEN, &it->max_tokens))
      return BAD("%s:%zu: \"max_tokens\" must be an integer from 1 to %d", path, line, OT_TASK_MAX_GEN);
  }
  if (!(it->target = dup_str(tg->valuestring))) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  if (!st) {
    if (!(it->stops[0] = dup_str("\n"))) return ot_error(OT_ERR_NOMEM, "cannot allocate");
    it->n_stops = 1;
  } else {
    const cJSON *v;
    if (!cJSON_IsArray(st) || cJSON_GetArraySize(st) > OT_TASK_MAX_STOPS)
      return BAD("%s:%zu: \"stop\" must be an array of up to %d strings", path, line, OT_TASK_MAX_STOPS);
    cJSON_ArrayForEach(v, st) {
      if (!cJSON_IsString(v) || !v->valuestring[0])
        return BAD("%s:%zu: stop[%d] must be a non-empty string", path, line, it->n_stops);
      if (!(it->stops[it->n_stops++] = dup_str(v->valuestring)))
        return ot_error(OT_ERR_NOMEM, "cannot allocate");
    }
  }
  return ot_tokenizer_encode(tok, ctx, strlen(ctx), &it->ctx, &it->n_ctx); /* generation: as written */
#undef BAD
}

int ot_task_read(const char *path, const ot_tokenizer *tok, ot_task **out) {
  if (!path || !out) return ot_error(OT_ERR_INVALID, "ot_task_read: NULL argument");
  if (!tok) return ot_error(OT_ERR_INVALID, "%s: a task is text and needs the model's tokenizer", path);
  char *buf = NULL;
  size_t len = 0;
  int rc = ot_file_read_all(path, OT_TASK_MAX_FILE, &buf, &len);
  if (rc) return rc;
  ot_task *t = calloc(1, sizeof *t);
  if (!t) {
    free(buf);
    return ot_error(OT_ERR_NOMEM, "cannot allocate");
  }
  if (ot_tokenizer_token_id(tok, "<|endoftext|>", &t->eot) != OT_OK) t->eot = -1;
  ot_error_clear();
  size_t line = 0, cap = 0;
  for (size_t i = 0; rc == OT_OK;) {
    cJSON *j = NULL;
    rc = ot_jsonl_next(buf, len, &i, &line, path, &j);
    if (rc || !j) break;
    if (t->n == cap) {
      size_t nc = cap ? cap * 2 : 64;
      item *ni = realloc(t->items, nc * sizeof *ni);
      if (!ni) {
        cJSON_Delete(j);
        rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
        break;
      }
      t->items = ni;
      cap = nc;
    }
    memset(&t->items[t->n], 0, sizeof(item));
    rc = parse_item(j, tok, path, line, &t->items[t->n]);
    t->n++; /* freed with the task either way */
    cJSON_Delete(j);
  }
  free(buf);
  if (rc == OT_OK && t->n == 0) rc = ot_error(OT_ERR_FORMAT, "%s: no items (empty file)", path);
  if (rc) {
    ot_task_free(t);
    return rc;
  }
  *out = t;
  return OT_OK;
}

/* One continuation to score: its row's inputs and where the continuation's targets sit. */
typedef struct {
  const item *it;
  const cont *c;
  double loglik;
  int greedy;
} request;

/* Builds row r (inputs = (ctx + cont)[:-1], its last `window` tokens) into in[T_b]; returns
 * its length and the input position that predicts the continuation's first token. */
static int row_layout(const request *q, int window, size_t *len, size_t *first) {
  size_t total = q->it->n_ctx + q->c->n;
  if (q->c->n > (size_t)window)
    return ot_error(OT_ERR_RANGE, "a continuation of %zu tokens does not fit the model's window of %d",
                    q->c->n, window);
  size_t inputs = total - 1, drop = inputs > (size_t)window ? inputs - (size_t)window : 0;
  *len = inputs - drop;
  *first = q->it->n_ctx - 1 - drop;
  return OT_OK;
}

static int score_batch(ot_model *m, request *q, int b, int window, int V, int32_t *in, float **logits,
                       size_t *logits_cap) {
  size_t len[64], first[64], Tb = 1;
  int rc = OT_OK;
  for (int r = 0; r < b && rc == OT_OK; r++) {
    rc = row_layout(&q[r], window, &len[r], &first[r]);
    if (len[r] > Tb) Tb = len[r];
  }
  if (rc) return rc;
  for (int r = 0; r < b; r++) {
    size_t total = q[r].it->n_ctx + q[r].c->n, drop = total - 1 - len[r];
    for (size_t p = 0; p < Tb; p++) {
      size_t s = p + drop;
      in[(size_t)r * Tb + p] =
          p < len[r] ? (s < q[r].it->n_ctx ? q[r].it->ctx[s] : q[r].c->ids[s - q[r].it->n_ctx]) : 0;
    }
  }
  size_t need = (size_t)b * Tb * (size_t)V;
  if (need > *logits_cap) {
    float *nl = realloc(*logits, need * sizeof(float));
    if (!nl) return ot_error(OT_ERR_NOMEM, "cannot allocate %zu logits", need);
    *logits = nl;
    *logits_cap = need;
  }
  rc = ot_model_forward_logits(m, in, b, (int)Tb, *logits);
  if (rc) return rc;
  for (int r = 0; r < b; r++) {
    double ll = 0.0;
    int greedy = 1;
    for (size_t k = 0; k < q[r].c->n; k++) {
      const float *lg = *logits + ((size_t)r * Tb + first[r] + k) * (size_t)V;
      int32_t want = q[r].c->ids[k];
      int best = 0;
      float mx = lg[0];
      for (int v = 1; v < V; v++)
        if (lg[v] > mx) {
          mx = lg[v];
          best = v;
        }
      double se = 0.0;
      for (int v = 0; v < V; v++) se += exp((double)lg[v] - mx);
      ll += (double)lg[want] - mx - log(se);
      greedy &= best == want;
    }
    q[r].loglik = ll;
    q[r].greedy = greedy;
  }
  return OT_OK;
}

/* Greedy generation of one item: tokens until max_tokens, "<|endoftext|>" or a stop
 * string; *text is the decoded output up to the stop (malloc'd). */
static int generate(ot_model *m, const ot_tokenizer *tok, const item *it, int32_t eot, char **text) {
  ot_sample_config sc = {1, 0.0f, 1.0f, 0};
  int32_t *ids = malloc((it->n_ctx + (size_t)it->max_tokens) * sizeof *ids);
  if (!ids) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  memcpy(ids, it->ctx, it->n_ctx * sizeof *ids);
  size_t n = it->n_ctx;
  char *dec = NULL;
  size_t dl = 0;
  int rc = OT_OK, done = 0;
  for (int s = 0; s < it->max_tokens && rc == OT_OK && !done; s++) {
    int32_t *all = NULL;
    size_t na = 0;
    rc = ot_generate(m, ids, n, &sc, &all, &na);
    if (rc) break;
    int32_t next = all[na - 1];
    free(all);
    if (next == eot) break;
    ids[n++] = next;
    free(dec);
    dec = NULL;
    rc = ot_tokenizer_decode(tok, ids + it->n_ctx, n - it->n_ctx, &dec, &dl);
    for (int k = 0; rc == OT_OK && k < it->n_stops; k++) {
      char *hit = strstr(dec, it->stops[k]);
      if (hit) {
        *hit = '\0';
        done = 1;
      }
    }
  }
  free(ids);
  if (rc == OT_OK && !dec) {
    dec = dup_str("");
    if (!dec) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  }
  if (rc) {
    free(dec);
    return rc;
  }
  *text = dec;
  return OT_OK;
}

/* Compares a and b with surrounding whitespace ignored. */
static int same_stripped(const char *a, const char *b) {
  while (is_ws(*a)) a++;
  while (is_ws(*b)) b++;
  size_t la = strlen(a), lb = strlen(b);
  while (la && is_ws(a[la - 1])) la--;
  while (lb && is_ws(b[lb - 1])) lb--;
  return la == lb && memcmp(a, b, la) == 0;
}

static void stat_add(ot_task_stat *s, int ok, double *sum) {
  s->n++;
  *sum += ok;
}

static void stat_done(ot_task_stat *s, double sum) {
  s->mean = s->n ? sum / (double)s->n : 0.0;
  s->stderr_ = s->n > 1 ? sqrt(s->mean * (1.0 - s->mean) / (double)(s->n - 1)) : 0.0;
}

static void json_string(FILE *f, const char *s) {
  cJSON *j = cJSON_CreateString(s);
  char *p = j ? cJSON_PrintUnformatted(j) : NULL;
  fputs(p ? p : "\"\"", f);
  free(p);
  cJSON_Delete(j);
}

int ot_task_eval(ot_model *m, const ot_tokenizer *tok, const ot_task *t, int batch, FILE *details,
                 FILE *progress, ot_task_result *out) {
  if (!m || !tok || !t || !out) return ot_error(OT_ERR_INVALID, "ot_task_eval: NULL argument");
  if (batch < 1) batch = 1;
  if (batch > 64) batch = 64;
  int window = ot_model_cfg(m)->n_positions, V = ot_model_cfg(m)->vocab_size;
  int rc = ot_model_prepare(m, batch, window, 0);
  if (rc) return rc;
  /* every continuation to score, in item order */
  size_t nq = 0, n_gen = 0;
  for (size_t i = 0; i < t->n; i++) {
    nq += (size_t)t->items[i].n_conts;
    n_gen += t->items[i].kind == K_GENERATE;
  }
  request *q = calloc(nq ? nq : 1, sizeof *q);
  int32_t *in = malloc((size_t)batch * (size_t)window * sizeof *in);
  float *logits = NULL;
  size_t logits_cap = 0;
  if (!q || !in) {
    free(q);
    free(in);
    return ot_error(OT_ERR_NOMEM, "cannot allocate");
  }
  size_t k = 0;
  for (size_t i = 0; i < t->n; i++)
    for (int c = 0; c < t->items[i].n_conts; c++, k++) {
      q[k].it = &t->items[i];
      q[k].c = &t->items[i].conts[c];
    }
  ot_progress prog;
  if (progress) ot_progress_start(&prog, progress, "task", (int64_t)(nq + n_gen));
  for (size_t s = 0; s < nq && rc == OT_OK; s += (size_t)batch) {
    int b = nq - s < (size_t)batch ? (int)(nq - s) : batch;
    rc = score_batch(m, q + s, b, window, V, in, &logits, &logits_cap);
    if (progress && rc == OT_OK) ot_progress_update(&prog, (int64_t)(s + (size_t)b), NULL);
  }
  free(logits);
  free(in);
  ot_task_result r;
  memset(&r, 0, sizeof r);
  double s_acc = 0, s_norm = 0, s_cloze = 0, s_em = 0;
  k = 0;
  size_t gen_done = 0;
  for (size_t i = 0; i < t->n && rc == OT_OK; i++) {
    const item *it = &t->items[i];
    const request *qi = q + k;
    k += (size_t)it->n_conts;
    if (it->kind == K_CHOICE) {
      int pred = 0, pred_norm = 0;
      for (int c = 1; c < it->n_conts; c++) {
        if (qi[c].loglik > qi[pred].loglik) pred = c;
        if (qi[c].loglik / (double)it->conts[c].bytes >
            qi[pred_norm].loglik / (double)it->conts[pred_norm].bytes)
          pred_norm = c;
      }
      stat_add(&r.acc, pred == it->label, &s_acc);
      stat_add(&r.acc_norm, pred_norm == it->label, &s_norm);
      if (details) {
        fprintf(details, "{\"i\": %zu, \"type\": \"multiple_choice\", \"loglik\": [", i);
        for (int c = 0; c < it->n_conts; c++) fprintf(details, c ? ", %.9g" : "%.9g", qi[c].loglik);
        fprintf(details, "], \"pred\": %d, \"pred_norm\": %d, \"correct\": %s}\n", pred, pred_norm,
                pred == it->label ? "true" : "false");
      }
    } else if (it->kind == K_CLOZE) {
      stat_add(&r.cloze, qi[0].greedy, &s_cloze);
      if (details)
        fprintf(details,
                "{\"i\": %zu, \"type\": \"cloze\", \"loglik\": %.9g, \"greedy\": %s, \"correct\": %s}\n", i,
                qi[0].loglik, qi[0].greedy ? "true" : "false", qi[0].greedy ? "true" : "false");
    } else {
      char *text = NULL;
      rc = generate(m, tok, it, t->eot, &text);
      if (rc) break;
      int ok = same_stripped(text, it->target);
      stat_add(&r.exact_match, ok, &s_em);
      if (details) {
        fprintf(details, "{\"i\": %zu, \"type\": \"generate\", \"output\": ", i);
        json_string(details, text);
        fprintf(details, ", \"correct\": %s}\n", ok ? "true" : "false");
      }
      free(text);
      if (progress) ot_progress_update(&prog, (int64_t)(nq + ++gen_done), NULL);
    }
  }
  if (progress) ot_progress_finish(&prog, rc == OT_OK ? "done" : "failed");
  free(q);
  if (rc) return rc;
  stat_done(&r.acc, s_acc);
  stat_done(&r.acc_norm, s_norm);
  stat_done(&r.cloze, s_cloze);
  stat_done(&r.exact_match, s_em);
  r.n = t->n;
  *out = r;
  return OT_OK;
}

int ot_task_eval_file(ot_model *m, const ot_tokenizer *tok, const char *dir, const char *task_path,
                      const char *details_path, int batch, FILE *progress, ot_task_result *out,
                      const char **what) {
  *what = "reading the task";
  int rc = ot_tokenizer_require(tok, dir, "a task is text");
  ot_task *t = NULL;
  if (rc == OT_OK) rc = ot_task_read(task_path, tok, &t);
  if (rc) return rc;
  *what = "scoring the task";
  char *buf = NULL;
  size_t len = 0;
  FILE *details = details_path ? open_memstream(&buf, &len) : NULL;
  if (details_path && !details) rc = ot_error(OT_ERR_NOMEM, "cannot buffer the details");
  ot_task_result r;
  if (rc == OT_OK) rc = ot_task_eval(m, tok, t, batch, details, progress, &r);
  if (details) fclose(details);
  if (rc == OT_OK && details_path) {
    *what = "writing the details";
    rc = ot_file_write_atomic(details_path, buf, len);
  }
  free(buf);
  ot_task_free(t);
  if (rc == OT_OK) *out = r;
  return rc;
}

void ot_task_print(FILE *f, const ot_task_result *r, int json) {
  if (json) {
    fprintf(f, "{\"n\": %zu", r->n);
    if (r->acc.n)
      fprintf(f,
              ", \"multiple_choice\": {\"n\": %zu, \"acc\": %.6f, \"acc_stderr\": %.6f, \"acc_norm\": %.6f, "
              "\"acc_norm_stderr\": %.6f}",
              r->acc.n, r->acc.mean, r->acc.stderr_, r->acc_norm.mean, r->acc_norm.stderr_);
    if (r->cloze.n)
      fprintf(f, ", \"cloze\": {\"n\": %zu, \"acc\": %.6f, \"acc_stderr\": %.6f}", r->cloze.n, r->cloze.mean,
              r->cloze.stderr_);
    if (r->exact_match.n)
      fprintf(f, ", \"generate\": {\"n\": %zu, \"exact_match\": %.6f, \"exact_match_stderr\": %.6f}",
              r->exact_match.n, r->exact_match.mean, r->exact_match.stderr_);
    fprintf(f, "}\n");
    return;
  }
  fprintf(f, "%zu items\n", r->n);
  if (r->acc.n)
    fprintf(f, "multiple choice (%zu): acc %.4f +- %.4f | acc_norm %.4f +- %.4f\n", r->acc.n, r->acc.mean,
            r->acc.stderr_, r->acc_norm.mean, r->acc_norm.stderr_);
  if (r->cloze.n) fprintf(f, "cloze (%zu): acc %.4f +- %.4f\n", r->cloze.n, r->cloze.mean, r->cloze.stderr_);
  if (r->exact_match.n)
    fprintf(f, "generate (%zu): exact match %.4f +- %.4f\n", r->exact_match.n, r->exact_match.mean,
            r->exact_match.stderr_);
}
