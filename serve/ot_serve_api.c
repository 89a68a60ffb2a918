#include "ot_serve_api.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_error.h"
#include "ot_http.h"
#include "ot_serve_request.h"

/* ---- metrics (GET /metrics, Prometheus text format) ----------------------------------------- */

static const double TTFT_B[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
static const double TPOT_B[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
#define N_TTFT_B (sizeof TTFT_B / sizeof *TTFT_B)
#define N_TPOT_B (sizeof TPOT_B / sizeof *TPOT_B)
#define MAX_MODEL_STATS 1024 /* models beyond it are counted under "(other)" */

typedef struct {
  uint64_t le[16]; /* per bucket, not cumulative */
  uint64_t count;
  double sum;
} histo;

typedef struct {
  char name[128];
  uint64_t ok, failed, cancelled, prompt_tokens, completion_tokens;
} model_stat;

typedef struct {
  pthread_mutex_t mu;
  model_stat *m;
  int n, cap;
  histo ttft, tpot;
  uint64_t unauthenticated, revoked, refused; /* requests refused before generation */
} metrics;

static void observe(histo *h, const double *b, size_t nb, double v) {
  size_t i = 0;
  while (i < nb && v > b[i]) i++;
  h->le[i]++; /* i == nb: +Inf */
  h->count++;
  h->sum += v;
}

struct ot_serve_http {
  metrics met;
  ot_serve_http_config cfg;
  char base_name[128];
  ot_http_server *server;
  ot_http_route routes[10 + OT_SERVE_EXTRA_ROUTES];
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int outstanding; /* jobs not yet freed */
  int closing;
  uint64_t next_id;
  struct job *jobs; /* live jobs, for cancellation at stop */
};

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void logf_(const ot_serve_http_config *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(const ot_serve_http_config *c, const char *fmt, ...) {
  if (!c->log) return;
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  c->log(c->log_user, line);
}

/* ---- text ---------------------------------------------------------------------------------- */

/* Length of the well-formed UTF-8 sequence at s (n bytes left), 0 if none starts there. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  if (c == 0) return 0; /* cJSON strings are C strings */
  if (c < 0x80) return 1;
  size_t len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
  if (!len || len > n) return 0;
  unsigned lo = 0x80, hi = 0xBF; /* the second byte's range (Unicode table 3-7) */
  if (c == 0xE0) lo = 0xA0;
  if (c == 0xED) hi = 0x9F;
  if (c == 0xF0) lo = 0x90;
  if (c == 0xF4) hi = 0x8F;
  if (s[1] < lo || s[1] > hi) return 0;
  for (size_t i = 2; i < len; i++)
    if ((s[i] & 0xC0) != 0x80) return 0;
  return len;
}

int ot_utf8_sanitize(const char *s, size_t n, char **out, size_t *out_len) {
  char *o = malloc(3 * n + 1);
  if (!o) return ot_error(OT_ERR_NOMEM, "cannot allocate text");
  size_t k = 0;
  for (size_t i = 0; i < n;) {
    size_t len = utf8_seq((const unsigned char *)s + i, n - i);
    if (len) {
      memcpy(o + k, s + i, len);
      k += len;
      i += len;
    } else {
      memcpy(o + k, "\xEF\xBF\xBD", 3);
      k += 3;
      i++;
    }
  }
  o[k] = '\0';
  *out = o;
  if (out_len) *out_len = k;
  return OT_OK;
}

/* ---- replies ------------------------------------------------------------------------------ */

static void answer_json(ot_http_req *r, int status, cJSON *j) {
  char *text = j ? cJSON_PrintUnformatted(j) : NULL;
  cJSON_Delete(j);
  if (text)
    ot_http_respond(r, status, "application/json", NULL, text, strlen(text));
  else
    ot_http_respond_error(r, 500, "server_error", NULL, NULL, "out of memory");
  free(text);
}

/* ---- API keys -------------------------------------------------------------------------------- */

/* 0 with *who = NULL (no keys: everything allowed) or the key's principal; -1 when the request
 * was answered (401 no or unknown key, 403 revoked). */
static int authorize(ot_serve_http *api, ot_http_req *req, ot_serve_principal *p,
                     const ot_serve_principal **who) {
  *who = NULL;
  if (!api->cfg.auth) return 0;
  const char *h = ot_http_req_header(req, "Authorization");
  const char *key = h && strncasecmp(h, "Bearer ", 7) == 0 ? h + 7 : NULL;
  while (key && *key == ' ') key++;
  int rc = key && *key ? api->cfg.auth(api->cfg.auth_user, key, p) : OT_ERR_NOTFOUND;
  if (rc == OT_OK) {
    *who = p;
    return 0;
  }
  int status = rc == OT_ERR_NOTFOUND ? 401 : rc == OT_ERR_INVALID ? 403 : 500;
  pthread_mutex_lock(&api->met.mu);
  *(status == 403 ? &api->met.revoked : &api->met.unauthenticated) += 1;
  pthread_mutex_unlock(&api->met.mu);
  const char *msg = !key || !*key   ? "You didn't provide an API key: send it as 'Authorization: Bearer KEY'"
                    : status == 401 ? "Incorrect API key provided"
                    : status == 403 ? "This API key has been revoked"
                                    : "Cannot check the API key";
  logf_(&api->cfg, "%s %s refused (%d): %s", ot_http_req_method(req), ot_http_req_path(req), status, msg);
  char *body = ot_http_error_json(msg, status == 500 ? "server_error" : "invalid_request_error",
                                  status == 401   ? "invalid_api_key"
                                  : status == 403 ? "api_key_revoked"
                                                  : NULL,
                                  NULL);
  if (body)
    ot_http_respond(req, status, "application/json", status == 401 ? "WWW-Authenticate: Bearer\r\n" : NULL,
                    body, strlen(body));
  else
    ot_http_respond_error(req, 500, "server_error", NULL, NULL, "out of memory");
  free(body);
  return -1;
}

/* May the key see and use model ("" = the base)? */
static int may_use(const ot_serve_principal *p, const char *model) {
  if (!p || p->admin) return 1;
  if (!p->base_allowed) return 0;
  if (!*model) return 1;
  size_t t = strlen(p->tenant);
  return t && strncmp(model, p->tenant, t) == 0 && model[t] == '/';
}

/* ---- jobs ---------------------------------------------------------------------------------- */

typedef struct {
  struct job *job;
  int index;
  uint64_t id;
  int submitted, done;
  char *text;
  size_t len;
  ot_finish_reason reason;
  int error;
  char msg[256];
  int prompt_tokens, completion_tokens;
  double t_last; /* the last token's time (0: none yet) */
} choice;

typedef struct job {
  ot_serve_http *api;
  ot_http_req *req; /* until answered */
  pthread_mutex_t mu;
  char id[48], model[128];
  long long created;
  int stream, n, n_submitted, n_done;
  int chat;          /* a chat completion: chat.completion objects and chunks */
  int include_usage; /* a usage chunk ends the stream */
  int submitting;    /* the handler is still submitting: the end cannot come yet */
  int rejected;      /* refused after some prompts were submitted: drop their events */
  int started;       /* the stream's head is out: chunks go straight to the client */
  int broken;        /* the client went away (or a write failed): nothing more is sent */
  int sealed;        /* [DONE] sent */
  choice *ch;
  double t0;
  char *buf; /* stream chunks made before the stream began */
  size_t len, cap;
  struct job *next;
} job;

/* What the last event leaves to do, outside the job's lock. */
enum { A_NONE, A_FREE, A_END_STREAM, A_RESPOND };

static void job_unlink_free(job *j) {
  ot_serve_http *api = j->api;
  pthread_mutex_lock(&api->mu);
  for (job **pp = &api->jobs; *pp; pp = &(*pp)->next)
    if (*pp == j) {
      *pp = j->next;
      break;
    }
  api->outstanding--;
  pthread_cond_broadcast(&api->cv);
  pthread_mutex_unlock(&api->mu);
  for (int i = 0; i < j->n; i++) free(j->ch[i].text);
  free(j->ch);
  free(j->buf);
  pthread_mutex_destroy(&j->mu);
  free(j);
}

/* j->mu held. */
static void cancel_all(job *j) {
  for (int i = 0; i < j->n; i++)
    if (j->ch[i].submitted && !j->ch[i].done) ot_serve_cancel(j->api->cfg.engine, j->ch[i].id);
}

/* The client went away (I/O thread): stop generating for it. */
static void job_gone(void *arg) {
  job *j = arg;
  pthread_mutex_lock(&j->mu);
  j->broken = 1;
  cancel_all(j);
  pthread_mutex_unlock(&j->mu);
}

static const char *finish_name(const choice *c) { return c->reason == OT_FINISH_STOP ? "stop" : "length"; }

/* The job's requests and tokens into its model's counters. */
static void count_job(job *j) {
  metrics *m = &j->api->met;
  const char *name = j->model[0] ? j->model : j->api->base_name;
  pthread_mutex_lock(&m->mu);
  model_stat *ms = NULL;
  for (int i = 0; i < m->n && !ms; i++)
    if (strcmp(m->m[i].name, name) == 0) ms = &m->m[i];
  if (!ms && m->n == m->cap && m->cap < MAX_MODEL_STATS) {
    int cap = m->cap ? 2 * m->cap : 16;
    model_stat *a = realloc(m->m, (size_t)cap * sizeof *a);
    if (a) {
      m->m = a;
      m->cap = cap;
    }
  }
  if (!ms && m->n < m->cap) {
    ms = &m->m[m->n++];
    memset(ms, 0, sizeof *ms);
    snprintf(ms->name, sizeof ms->name, "%s", m->n == MAX_MODEL_STATS ? "(other)" : name);
  }
  if (!ms && m->n) ms = &m->m[m->n - 1]; /* "(other)" */
  int failed = 0, cancelled = 0;
  for (int i = 0; ms && i < j->n; i++) {
    ms->prompt_tokens += (uint64_t)j->ch[i].prompt_tokens;
    ms->completion_tokens += (uint64_t)j->ch[i].completion_tokens;
    failed |= j->ch[i].reason == OT_FINISH_ERROR;
    cancelled |= j->ch[i].reason == OT_FINISH_CANCELLED;
  }
  if (ms) {
    if (failed)
      ms->failed++;
    else if (cancelled)
      ms->cancelled++;
    else
      ms->ok++;
  }
  pthread_mutex_unlock(&m->mu);
}

static void log_job(job *j) {
  int pt = 0, ct = 0;
  const char *why = j->n ? finish_name(&j->ch[0]) : "-";
  for (int i = 0; i < j->n; i++) {
    pt += j->ch[i].prompt_tokens;
    ct += j->ch[i].completion_tokens;
    if (j->ch[i].reason == OT_FINISH_ERROR) why = "error";
    if (j->ch[i].reason == OT_FINISH_CANCELLED) why = "cancelled";
  }
  logf_(&j->api->cfg, "%s model=%s%s prompts=%d prompt_tokens=%d completion_tokens=%d finish=%s %.1f ms",
        j->id, j->model[0] ? j->model : "(base)", j->stream ? " stream" : "", j->n, pt, ct, why,
        now_ms() - j->t0);
}

/* id, object, created, model of a reply or a stream chunk. */
static cJSON *reply_head(const job *j, int chunk) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "id", j->id);
  cJSON_AddStringToObject(
      r, "object", j->chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion");
  cJSON_AddNumberToObject(r, "created", (double)j->created);
  cJSON_AddStringToObject(r, "model", j->model[0] ? j->model : j->api->base_name);
  return r;
}

static void add_usage(const job *j, cJSON *r) {
  int pt = 0, ct = 0;
  for (int i = 0; i < j->n; i++) {
    pt += j->ch[i].prompt_tokens;
    ct += j->ch[i].completion_tokens;
  }
  cJSON *u = cJSON_AddObjectToObject(r, "usage");
  cJSON_AddNumberToObject(u, "prompt_tokens", pt);
  cJSON_AddNumberToObject(u, "completion_tokens", ct);
  cJSON_AddNumberToObject(u, "total_tokens", pt + ct);
}

/* The whole reply of a non-streamed job (every choice done). */
static void respond_completion(job *j) {
  for (int i = 0; i < j->n; i++)
    if (j->ch[i].reason == OT_FINISH_ERROR || j->ch[i].reason == OT_FINISH_CANCELLED) {
      ot_http_respond_error(j->req, 500, "server_error", NULL, NULL, "generation failed: %s",
                            j->ch[i].msg[0] ? j->ch[i].msg : ot_finish_reason_name(j->ch[i].reason));
      return;
    }
  cJSON *r = reply_head(j, 0);
  cJSON *chs = cJSON_AddArrayToObject(r, "choices");
  for (int i = 0; i < j->n; i++) {
    cJSON *c = cJSON_CreateObject();
    char *t = NULL;
    cJSON_AddNumberToObject(c, "index", i);
    if (ot_utf8_sanitize(j->ch[i].text ? j->ch[i].text : "", j->ch[i].len, &t, NULL) == OT_OK) {
      if (j->chat) {
        cJSON *m = cJSON_AddObjectToObject(c, "message");
        cJSON_AddStringToObject(m, "role", "assistant");
        cJSON_AddStringToObject(m, "content", t);
      } else {
        cJSON_AddStringToObject(c, "text", t);
      }
    }
    free(t);
    cJSON_AddNullToObject(c, "logprobs");
    cJSON_AddStringToObject(c, "finish_reason", finish_name(&j->ch[i]));
    cJSON_AddItemToArray(chs, c);
  }
  add_usage(j, r);
  answer_json(j->req, 200, r);
}

/* ---- streaming ------------------------------------------------------------------------------ */

static int buf_add(job *j, const char *s, size_t n) {
  if (j->len + n > j->cap) {
    size_t cap = j->cap ? j->cap * 2 : 1024;
    while (cap < j->len + n) cap *= 2;
    char *b = realloc(j->buf, cap);
    if (!b) return -1;
    j->buf = b;
    j->cap = cap;
  }
  memcpy(j->buf + j->len, s, n);
  j->len += n;
  return 0;
}

/* One SSE event to the client, or kept until the stream begins (j->mu held). */
static void emit(job *j, const char *s, size_t n) {
  if (j->broken) return;
  if (j->started ? ot_http_stream_write(j->req, s, n) != OT_OK : buf_add(j, s, n) != 0) {
    j->broken = 1;
    cancel_all(j); /* nobody reads what is generated */
  }
}

/* One chunk: a choice's text (chat: a delta; role: the chat's first, with the role), its end
 * (finish), or with index -1 the usage (choices empty). */
static void sse_chunk(job *j, int index, const char *text, size_t len, const char *finish, int role) {
  if (j->broken) return;
  cJSON *r = reply_head(j, 1);
  cJSON *chs = cJSON_AddArrayToObject(r, "choices");
  if (index >= 0) {
    cJSON *c = cJSON_CreateObject();
    cJSON_AddNumberToObject(c, "index", index);
    char *t = NULL;
    ot_utf8_sanitize(text, len, &t, NULL);
    if (j->chat) {
      cJSON *d = cJSON_AddObjectToObject(c, "delta");
      if (role) cJSON_AddStringToObject(d, "role", "assistant");
      if (role || !finish) cJSON_AddStringToObject(d, "content", t ? t : "");
    } else {
      cJSON_AddStringToObject(c, "text", t ? t : "");
    }
    free(t);
    cJSON_AddNullToObject(c, "logprobs");
    if (finish)
      cJSON_AddStringToObject(c, "finish_reason", finish);
    else
      cJSON_AddNullToObject(c, "finish_reason");
    cJSON_AddItemToArray(chs, c);
    if (j->include_usage) cJSON_AddNullToObject(r, "usage");
  } else {
    add_usage(j, r);
  }
  char *s = cJSON_PrintUnformatted(r);
  cJSON_Delete(r);
  size_t sl = s ? strlen(s) : 0;
  char *ev = s ? malloc(sl + 9) : NULL;
  if (ev) {
    memcpy(ev, "data: ", 6);
    memcpy(ev + 6, s, sl);
    memcpy(ev + 6 + sl, "\n\n", 3);
    emit(j, ev, sl + 8);
  } else {
    j->broken = 1;
    cancel_all(j);
  }
  free(ev);
  free(s);
}

/* ---- engine events --------------------------------------------------------------------------- */

/* After a change (j->mu held): what is left to do once every choice is done. */
static int settle(job *j) {
  if (j->submitting || j->n_done < j->n_submitted) return A_NONE;
  if (j->rejected) return A_FREE;
  if (j->stream) {
    if (j->started && !j->sealed && j->include_usage) sse_chunk(j, -1, NULL, 0, NULL, 0);
    if (j->started && !j->sealed) emit(j, "data: [DONE]\n\n", 14);
    j->sealed = 1;
    return A_END_STREAM;
  }
  return A_RESPOND;
}

/* The job is over: its answer (without j->mu: answering waits for a running job_gone), then it goes. */
static void finish(job *j, int action) {
  if (action == A_END_STREAM) ot_http_stream_end(j->req);
  if (action == A_RESPOND) respond_completion(j);
  j->req = NULL;
  if (!j->rejected) {
    log_job(j);
    count_job(j);
  }
  job_unlink_free(j);
}

static void on_event(void *user, const ot_serve_event *ev) {
  choice *c = user;
  job *j = c->job;
  if (ev->n_tokens > 0) { /* time to first token (queueing included), then the time per token */
    double t = now_ms();
    metrics *m = &j->api->met;
    pthread_mutex_lock(&m->mu);
    if (c->t_last == 0)
      observe(&m->ttft, TTFT_B, N_TTFT_B, (t - j->t0) / 1e3);
    else
      observe(&m->tpot, TPOT_B, N_TPOT_B, (t - c->t_last) / 1e3 / ev->n_tokens);
    pthread_mutex_unlock(&m->mu);
    c->t_last = t;
  }
  pthread_mutex_lock(&j->mu);
  if (ev->text_len && !j->rejected) {
    if (j->stream) {
      sse_chunk(j, c->index, ev->text, ev->text_len, NULL, 0);
    } else {
      char *t = realloc(c->text, c->len + ev->text_len + 1);
      if (t) {
        memcpy(t + c->len, ev->text, ev->text_len);
        c->len += ev->text_len;
        t[c->len] = '\0';
        c->text = t;
      }
    }
  }
  int action = A_NONE;
  if (ev->finished) {
    c->done = 1;
    c->reason = ev->reason;
    c->error = ev->error;
    snprintf(c->msg, sizeof c->msg, "%s", ev->error_msg ? ev->error_msg : "");
    c->prompt_tokens = ev->prompt_tokens;
    c->completion_tokens = ev->completion_tokens;
    j->n_done++;
    if (j->stream && !j->rejected)
      sse_chunk(j, c->index, "", 0,
                ev->reason == OT_FINISH_ERROR || ev->reason == OT_FINISH_CANCELLED ? "error" : finish_name(c),
                0);
    action = settle(j);
  }
  pthread_mutex_unlock(&j->mu);
  if (action != A_NONE) finish(j, action);
}

/* ---- POST /v1/completions -------------------------------------------------------------------- */

static int http_status(int rc) {
  return rc == OT_ERR_NOTFOUND                                                      ? 404
         : (rc == OT_ERR_INVALID || rc == OT_ERR_RANGE || rc == OT_ERR_UNSUPPORTED) ? 400
                                                                                    : 500;
}

static void handle_generate(ot_serve_http *api, ot_http_req *req, int chat) {
  const char *route = chat ? "/v1/chat/completions" : "/v1/completions";
  ot_serve_principal principal;
  const ot_serve_principal *who;
  if (authorize(api, req, &principal, &who)) return;
  size_t len = 0;
  const char *data = ot_http_req_body(req, &len);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ot_serve_parse_cfg pc = {.tok = api->cfg.tok,
                           .base_name = api->base_name,
                           .eos_id = api->cfg.eos_id,
                           .max_prompts = api->cfg.max_prompts,
                           .seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30),
                           .chat = api->cfg.chat};
  ot_serve_completion *pr = malloc(sizeof *pr);
  ot_serve_req_error perr;
  if (!pr) {
    ot_http_respond_error(req, 500, "server_error", NULL, NULL, "out of memory");
    return;
  }
  if ((chat ? ot_serve_parse_chat : ot_serve_parse_completion)(data, len, &pc, pr, &perr) != OT_OK) {
    logf_(&api->cfg, "POST %s refused (%d): %s", route, perr.status, perr.message);
    ot_http_respond_error(req, perr.status, perr.type, NULL, perr.param[0] ? perr.param : NULL, "%s",
                          perr.message);
    free(pr);
    return;
  }
  if (!may_use(who, pr->model)) { /* another tenant's adapter is answered as absent */
    logf_(&api->cfg, "POST %s model=%s refused: not this key's", route, pr->model[0] ? pr->model : "(base)");
    if (!pr->model[0])
      ot_http_respond_error(req, 403, "invalid_request_error", "model_not_allowed", "model",
                            "This API key may not use the model '%s'", api->base_name);
    else
      ot_http_respond_error(req, 404, "invalid_request_error", "model_not_found", "model",
                            "The model '%s' does not exist", pr->model);
    ot_serve_completion_free(pr);
    free(pr);
    return;
  }
  int n = pr->n_prompts, status = 0;
  job *j = calloc(1, sizeof *j);
  if (j) j->ch = calloc((size_t)n, sizeof *j->ch);
  if (!j || !j->ch) {
    free(j);
    j = NULL;
    status = 500;
  }
  pthread_mutex_lock(&api->mu);
  if (j && api->closing) {
    free(j->ch);
    free(j);
    j = NULL;
    status = 503;
  }
  if (j) {
    j->next = api->jobs;
    api->jobs = j;
    api->outstanding++;
    snprintf(j->id, sizeof j->id, "%s-%llx%06llx", chat ? "chatcmpl" : "cmpl",
             (unsigned long long)api->next_id++, (unsigned long long)(now_ms() * 1000) & 0xffffff);
  }
  pthread_mutex_unlock(&api->mu);
  if (!j) {
    logf_(&api->cfg, "POST %s refused (%d)", route, status);
    ot_http_respond_error(req, status, "server_error", NULL, NULL, "%s",
                          status == 503 ? "the server is shutting down" : "out of memory");
    ot_serve_completion_free(pr);
    free(pr);
    return;
  }
  j->api = api;
  j->req = req;
  pthread_mutex_init(&j->mu, NULL);
  snprintf(j->model, sizeof j->model, "%s", pr->model);
  j->created = (long long)time(NULL);
  int stream = pr->stream;
  j->stream = stream;
  j->chat = chat;
  j->include_usage = pr->include_usage;
  j->n = n;
  j->t0 = now_ms();
  j->submitting = 1;
  for (int i = 0; chat && stream && i < n; i++)
    sse_chunk(j, i, "", 0, NULL, 1); /* kept until the stream begins */
  int rc = OT_OK;
  ot_serve_request *r = &pr->r;
  r->adapter = pr->model;
  for (int i = 0; i < n && rc == OT_OK; i++) {
    j->ch[i].job = j;
    j->ch[i].index = i;
    r->prompt = pr->prompts[i].ids;
    r->n_prompt = pr->prompts[i].n;
    pthread_mutex_lock(&j->mu);
    rc = ot_serve_submit(api->cfg.engine, r, on_event, &j->ch[i], &j->ch[i].id);
    if (rc == OT_OK) {
      j->ch[i].submitted = 1;
      j->n_submitted++;
    }
    pthread_mutex_unlock(&j->mu);
  }
  char why[512];
  snprintf(why, sizeof why, "%s", rc ? ot_error_detail() : "");
  ot_http_req *refused = NULL;
  pthread_mutex_lock(&j->mu);
  j->submitting = 0;
  if (rc) { /* refuse the whole request; what was submitted is cancelled and dropped */
    j->rejected = 1;
    refused = j->req;
    j->req = NULL;
    cancel_all(j);
  } else {
    if (ot_http_on_gone(req, job_gone, j)) { /* cannot happen on the I/O thread; be safe */
      j->broken = 1;
      cancel_all(j);
    }
    if (stream && !j->broken) {
      if (ot_http_stream_begin(req, 200, "text/event-stream", "Cache-Control: no-cache\r\n") == OT_OK) {
        j->started = 1;
        if (j->len && ot_http_stream_write(req, j->buf, j->len) != OT_OK) {
          j->broken = 1;
          cancel_all(j);
        }
      } else {
        j->broken = 1;
        cancel_all(j);
      }
      free(j->buf);
      j->buf = NULL;
      j->len = j->cap = 0;
    }
  }
  int action = settle(j);
  pthread_mutex_unlock(&j->mu);
  /* with rc set, j may be gone already (its cancelled events free it): only locals from here */
  if (refused) {
    logf_(&api->cfg, "POST %s model=%s refused: %s", route, pr->model[0] ? pr->model : "(base)", why);
    if (http_status(rc) == 404)
      ot_http_respond_error(refused, 404, "invalid_request_error", "model_not_found", "model",
                            "The model '%s' does not exist", pr->model);
    else
      ot_http_respond_error(refused, http_status(rc),
                            http_status(rc) == 400 ? "invalid_request_error" : "server_error", NULL, NULL,
                            "%s", why);
  }
  if (action != A_NONE) finish(j, action);
  ot_serve_completion_free(pr);
  free(pr);
}

static void handle_completions(void *user, ot_http_req *req) { handle_generate(user, req, 0); }
static void handle_chat(void *user, ot_http_req *req) { handle_generate(user, req, 1); }

/* ---- GET /v1/models, /v1/models/{id}, /health ------------------------------------------------- */

typedef struct {
  cJSON *arr;
  const ot_serve_principal *who;
} model_ctx;

static void add_model(void *ctx, const char *name) {
  model_ctx *mc = ctx;
  if (!may_use(mc->who, name)) return;
  cJSON *arr = mc->arr, *m = cJSON_CreateObject();
  cJSON_AddStringToObject(m, "id", name);
  cJSON_AddStringToObject(m, "object", "model");
  cJSON_AddNumberToObject(m, "created", 0);
  cJSON_AddStringToObject(m, "owned_by", "offtune");
  cJSON_AddItemToArray(arr, m);
}

static cJSON *model_list(ot_serve_http *api, const ot_serve_principal *who) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "object", "list");
  cJSON *arr = cJSON_AddArrayToObject(r, "data");
  model_ctx mc = {arr, who};
  cJSON *base = NULL;
  if (may_use(who, "")) {
    mc.who = NULL;
    add_model(&mc, api->base_name);
    mc.who = who;
    base = cJSON_GetArrayItem(arr, 0);
    cJSON_AddNullToObject(base, "parent");
  }
  if (api->cfg.list && (!who || who->base_allowed || who->admin))
    api->cfg.list(api->cfg.list_user, add_model, &mc);
  cJSON *m;
  cJSON_ArrayForEach(m, arr) if (m != base) cJSON_AddStringToObject(m, "parent", api->base_name);
  return r;
}

static void handle_models(void *user, ot_http_req *req) {
  ot_serve_principal principal;
  const ot_serve_principal *who;
  if (authorize(user, req, &principal, &who)) return;
  answer_json(req, 200, model_list(user, who));
}

static int hex_digit(char c) {
  return c >= '0' && c <= '9'   ? c - '0'
         : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                : -1;
}

static void handle_model(void *user, ot_http_req *req) {
  ot_serve_http *api = user;
  ot_serve_principal principal;
  const ot_serve_principal *who;
  if (authorize(api, req, &principal, &who)) return;
  const char *p = ot_http_req_path(req) + strlen("/v1/models/");
  char id[OT_SERVE_MODEL_LEN * 3];
  size_t k = 0;
  for (; *p && k + 1 < sizeof id; p++) { /* percent-decoded: ids are names, not paths */
    int hi, lo;
    if (*p == '%' && (hi = hex_digit(p[1])) >= 0 && (lo = hex_digit(p[2])) >= 0) {
      id[k++] = (char)(hi * 16 + lo);
      p += 2;
    } else {
      id[k++] = *p;
    }
  }
  id[k] = '\0';
  cJSON *list = model_list(api, who), *m = NULL, *found = NULL;
  cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(list, "data")) {
    const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "id"));
    if (name && strlen(name) == k && memcmp(name, id, k) == 0) {
      found = m;
      break;
    }
  }
  if (found) {
    answer_json(req, 200, cJSON_Duplicate(found, 1));
  } else {
    char *safe = NULL;
    ot_utf8_sanitize(id, k, &safe, NULL);
    ot_http_respond_error(req, 404, "invalid_request_error", "model_not_found", "model",
                          "The model '%.200s' does not exist", safe ? safe : "");
    free(safe);
  }
  cJSON_Delete(list);
}

typedef struct {
  char *s;
  size_t n, cap;
  int fail;
} text;

static void put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *fmt, ...) {
  if (t->fail) return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(t->s ? t->s + t->n : NULL, t->s ? t->cap - t->n : 0, fmt, ap);
    va_end(ap);
    if (k < 0) {
      t->fail = 1;
      return;
    }
    if (t->s && t->n + (size_t)k < t->cap) {
      t->n += (size_t)k;
      return;
    }
    size_t cap = t->cap ? t->cap * 2 : 8192;
    while (cap < t->n + (size_t)k + 1) cap *= 2;
    char *b = realloc(t->s, cap);
    if (!b) {
      t->fail = 1;
      return;
    }
    t->s = b;
    t->cap = cap;
  }
}

/* A label value: backslash, double quote and newline escaped (the text format's rules). */
static void put_label(text *t, const char *v) {
  for (; *v; v++) {
    if (*v == '\\' || *v == '"')
      put(t, "\\%c", *v);
    else if (*v == '\n')
      put(t, "\\n");
    else
      put(t, "%c", *v);
  }
}

static void put_histo(text *t, const char *name, const char *help, const histo *h, const double *b,
                      size_t nb) {
  put(t, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
  uint64_t cum = 0;
  for (size_t i = 0; i < nb; i++) {
    cum += h->le[i];
    put(t, "%s_bucket{le=\"%g\"} %llu\n", name, b[i], (unsigned long long)cum);
  }
  put(t, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name, (unsigned long long)h->count,
      name, h->sum, name, (unsigned long long)h->count);
}

static void put_metric(text *t, const char *name, const char *type, const char *help, double v) {
  put(t, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type, name, v);
}

static void extra_line(void *ctx, const char *line) { put(ctx, "%s\n", line); }

static void handle_metrics(void *user, ot_http_req *req) {
  ot_serve_http *api = user;
  ot_serve_principal principal;
  const ot_serve_principal *who;
  if (authorize(api, req, &principal, &who)) return;
  if (who && !who->admin) {
    ot_http_respond_error(req, 403, "invalid_request_error", "admin_key_required", NULL,
                          "/metrics needs an admin API key");
    return;
  }
  text t = {0};
  metrics *m = &api->met;
  pthread_mutex_lock(&m->mu);
  static const char *const what[3] = {"ok", "error", "cancelled"};
  put(&t, "# HELP offtune_requests_total Completion and chat requests finished, by model and outcome.\n"
          "# TYPE offtune_requests_total counter\n");
  for (int i = 0; i < m->n; i++)
    for (int k = 0; k < 3; k++) {
      put(&t, "offtune_requests_total{model=\"");
      put_label(&t, m->m[i].name);
      uint64_t v = k == 0 ? m->m[i].ok : k == 1 ? m->m[i].failed : m->m[i].cancelled;
      put(&t, "\",outcome=\"%s\"} %llu\n", what[k], (unsigned long long)v);
    }
  const char *tok_names[2] = {"offtune_prompt_tokens_total", "offtune_generation_tokens_total"};
  for (int k = 0; k < 2; k++) {
    put(&t, "# HELP %s %s tokens of finished requests, by model.\n# TYPE %s counter\n", tok_names[k],
        k ? "Generated" : "Prompt", tok_names[k]);
    for (int i = 0; i < m->n; i++) {
      put(&t, "%s{model=\"", tok_names[k]);
      put_label(&t, m->m[i].name);
      put(&t, "\"} %llu\n", (unsigned long long)(k ? m->m[i].completion_tokens : m->m[i].prompt_tokens));
    }
  }
  put(&t,
      "# HELP offtune_requests_refused_total Requests refused for their API key.\n"
      "# TYPE offtune_requests_refused_total counter\n"
      "offtune_requests_refused_total{reason=\"unauthenticated\"} %llu\n"
      "offtune_requests_refused_total{reason=\"revoked\"} %llu\n",
      (unsigned long long)m->unauthenticated, (unsigned long long)m->revoked);
  put_histo(&t, "offtune_time_to_first_token_seconds",
            "From the request to its first token (queueing included).", &m->ttft, TTFT_B, N_TTFT_B);
  put_histo(&t, "offtune_time_per_output_token_seconds", "Time between a request's tokens after the first.",
            &m->tpot, TPOT_B, N_TPOT_B);
  pthread_mutex_unlock(&m->mu);
  ot_serve_stats es;
  ot_serve_get_stats(api->cfg.engine, &es);
  put_metric(&t, "offtune_num_requests_running", "gauge", "Sequences in the running batch.", es.running);
  put_metric(&t, "offtune_num_requests_waiting", "gauge",
             "Requests queued for KV blocks, a batch place or adapter memory (preempted ones included).",
             es.waiting);
  put_metric(&t, "offtune_max_batch", "gauge", "Sequences in the running batch at most.", es.max_batch);
  put_metric(&t, "offtune_batch_rows", "gauge", "Rows (prefill chunks and decodes) in the last forward step.",
             es.step_rows);
  put_metric(&t, "offtune_kv_cache_usage_ratio", "gauge",
             "KV cache blocks held by sequences over all blocks.",
             es.kv_blocks ? (double)es.kv_blocks_used / (double)es.kv_blocks : 0.0);
  put_metric(&t, "offtune_kv_cache_blocks", "gauge", "KV cache blocks in the pool.", es.kv_blocks);
  put_metric(&t, "offtune_kv_cache_blocks_used", "gauge", "KV cache blocks held by sequences.",
             es.kv_blocks_used);
  put_metric(&t, "offtune_kv_cache_block_size", "gauge", "Positions per KV cache block.", es.kv_block_size);
  put_metric(&t, "offtune_kv_cache_positions", "gauge", "KV cache positions filled.",
             (double)es.kv_positions);
  put_metric(&t, "offtune_num_preemptions_total", "counter",
             "Running requests preempted for KV blocks (recomputed later).", (double)es.preemptions);
  put_metric(&t, "offtune_engine_steps_total", "counter", "Forward steps run.", (double)es.steps);
  put_metric(&t, "offtune_engine_tokens_total", "counter", "Tokens sampled.", (double)es.tokens_generated);
  put_metric(&t, "offtune_engine_rows_total", "counter", "Rows computed by the forward steps.",
             (double)es.rows_computed);
  put_metric(&t, "offtune_adapter_cache_hits_total", "counter", "Requests whose adapter was already loaded.",
             (double)es.adapter_hits);
  put_metric(&t, "offtune_adapter_loads_total", "counter", "Adapters loaded into the cache.",
             (double)es.loads);
  put_metric(&t, "offtune_adapter_evictions_total", "counter", "Adapters evicted (least recently used).",
             (double)es.evictions);
  put_metric(&t, "offtune_adapters_loaded", "gauge", "Adapters in the cache.", es.adapters_loaded);
  put_metric(&t, "offtune_adapter_bytes", "gauge", "Bytes of loaded adapter tensors.",
             (double)es.adapter_bytes);
  ot_http_stats hs;
  ot_http_get_stats(api->server, &hs);
  put_metric(&t, "offtune_http_connections_total", "counter", "HTTP connections accepted.",
             (double)hs.accepted);
  put_metric(&t, "offtune_http_connections_open", "gauge", "HTTP connections open.", hs.open);
  put_metric(&t, "offtune_http_requests_total", "counter", "HTTP requests parsed (errors included).",
             (double)hs.requests);
  put(&t,
      "# HELP offtune_http_connections_refused_total HTTP connections closed by a cap, for descriptors or by "
      "a "
      "timeout.\n# TYPE offtune_http_connections_refused_total counter\n"
      "offtune_http_connections_refused_total{reason=\"cap\"} %llu\n"
      "offtune_http_connections_refused_total{reason=\"evicted\"} %llu\n"
      "offtune_http_connections_refused_total{reason=\"descriptors\"} %llu\n"
      "offtune_http_connections_refused_total{reason=\"timeout\"} %llu\n",
      (unsigned long long)hs.refused_cap, (unsigned long long)hs.evicted, (unsigned long long)hs.refused_fd,
      (unsigned long long)hs.timeouts);
  if (api->cfg.metrics) api->cfg.metrics(api->cfg.metrics_user, extra_line, &t);
  if (t.fail)
    ot_http_respond_error(req, 500, "server_error", NULL, NULL, "out of memory");
  else
    ot_http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, t.s, t.n);
  free(t.s);
}

/* ---- adapters without a restart (vLLM's /v1/load_lora_adapter, /v1/unload_lora_adapter) ------- */

typedef struct {
  ot_serve_http *api;
  ot_http_req *req;
  char name[OT_SERVE_MODEL_LEN];
} load_job;

/* The trial request ends: its adapter loaded and passed every check, or not (then it is
 * unregistered again). Runs on the engine thread. */
static void on_load_event(void *user, const ot_serve_event *ev) {
  if (!ev->finished) return;
  load_job *lj = user;
  ot_serve_http *api = lj->api;
  if (ev->reason == OT_FINISH_LENGTH) {
    logf_(&api->cfg, "adapter '%s' loaded", lj->name);
    char body[300];
    int n = snprintf(body, sizeof body, "{\"status\":\"loaded\",\"lora_name\":\"%s\"}", lj->name);
    ot_http_respond(lj->req, 200, "application/json", NULL, body, (size_t)n);
  } else {
    char why[512];
    snprintf(why, sizeof why, "%s", ev->error_msg ? ev->error_msg : "cancelled");
    api->cfg.unload_adapter(api->cfg.adapters_user, lj->name);
    logf_(&api->cfg, "adapter '%s' refused: %s", lj->name, why);
    ot_http_respond_error(lj->req, ev->reason == OT_FINISH_CANCELLED ? 503 : 400, "invalid_request_error",
                          NULL, "lora_path", "cannot load adapter '%s': %s", lj->name, why);
  }
  pthread_mutex_lock(&api->mu);
  api->outstanding--;
  pthread_cond_broadcast(&api->cv);
  pthread_mutex_unlock(&api->mu);
  free(lj);
}

static int admin_only(ot_serve_http *api, ot_http_req *req) {
  ot_serve_principal principal;
  const ot_serve_principal *who;
  if (authorize(api, req, &principal, &who)) return -1;
  if (who && !who->admin) {
    ot_http_respond_error(req, 403, "invalid_request_error", "admin_key_required", NULL,
                          "%s needs an admin API key", ot_http_req_path(req));
    return -1;
  }
  if (!api->cfg.load_adapter || !api->cfg.unload_adapter) {
    ot_http_respond_error(req, 404, "invalid_request_error", NULL, NULL,
                          "this server does not load or unload adapters at run time");
    return -1;
  }
  return 0;
}

/* {"lora_name": ..., "lora_path": ...} or {"lora_name": ...}; *name and *path point into *j. */
static int adapter_body(ot_http_req *req, int need_path, cJSON **j, const char **name, const char **path) {
  size_t len = 0;
  const char *body = ot_http_req_body(req, &len);
  *j = ot_json_has_nul_escape(body, len) ? NULL : cJSON_ParseWithLength(body, len);
  *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(*j, "lora_name"));
  *path = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(*j, "lora_path"));
  if (!*name || !**name || strlen(*name) >= OT_SERVE_MODEL_LEN || (need_path && (!*path || !**path))) {
    ot_http_respond_error(req, 400, "invalid_request_error", NULL, *name ? "lora_path" : "lora_name",
                          need_path ? "give \"lora_name\" and \"lora_path\"" : "give \"lora_name\"");
    cJSON_Delete(*j);
    return -1;
  }
  return 0;
}

static void handle_load_adapter(void *user, ot_http_req *req) {
  ot_serve_http *api = user;
  cJSON *j;
  const char *name, *path;
  if (admin_only(api, req) || adapter_body(req, 1, &j, &name, &path)) return;
  int rc = api->cfg.load_adapter(api->cfg.adapters_user, name, path);
  if (rc) {
    ot_http_respond_error(req, rc == OT_ERR_NOTFOUND ? 404 : 400, "invalid_request_error", NULL, "lora_path",
                          "cannot load adapter '%s': %s", name, ot_error_detail());
    cJSON_Delete(j);
    return;
  }
  /* the name may have served other files before: drop that copy, then load it for real (every
   * check of the adapter's files) with a request of no tokens */
  ot_serve_forget_adapter(api->cfg.engine, name);
  load_job *lj = calloc(1, sizeof *lj);
  pthread_mutex_lock(&api->mu);
  int closing = api->closing;
  if (lj && !closing) api->outstanding++;
  pthread_mutex_unlock(&api->mu);
  if (!lj || closing) {
    api->cfg.unload_adapter(api->cfg.adapters_user, name);
    ot_http_respond_error(req, 503, "server_error", NULL, NULL, "the server is shutting down");
    free(lj);
    cJSON_Delete(j);
    return;
  }
  lj->api = api;
  lj->req = req;
  snprintf(lj->name, sizeof lj->name, "%s", name);
  cJSON_Delete(j);
  int32_t tok0 = 0;
  ot_serve_request r = {.adapter = lj->name, .prompt = &tok0, .n_prompt = 1, .max_tokens = 0, .top_p = 1.0f};
  if (ot_serve_submit(api->cfg.engine, &r, on_load_event, lj, NULL) != OT_OK) {
    ot_serve_event ev = {.finished = 1, .reason = OT_FINISH_ERROR, .error_msg = ot_error_detail()};
    on_load_event(lj, &ev);
  }
}

static void handle_unload_adapter(void *user, ot_http_req *req) {
  ot_serve_http *api = user;
  cJSON *j;
  const char *name, *path;
  if (admin_only(api, req) || adapter_body(req, 0, &j, &name, &path)) return;
  int rc = api->cfg.unload_adapter(api->cfg.adapters_user, name);
  if (rc == OT_OK) {
    ot_serve_forget_adapter(api->cfg.engine, name); /* running requests finish with it */
    logf_(&api->cfg, "adapter '%s' unloaded", name);
    char body[300];
    int n = snprintf(body, sizeof body, "{\"status\":\"unloaded\",\"lora_name\":\"%s\"}", name);
    ot_http_respond(req, 200, "application/json", NULL, body, (size_t)n);
  } else {
    ot_http_respond_error(req, 404, "invalid_request_error", "model_not_found", "lora_name",
                          "no adapter '%s' was loaded at run time", name);
  }
  cJSON_Delete(j);
}

static void handle_health(void *user, ot_http_req *req) {
  (void)user;
  static const char ok[] = "{\"status\":\"ok\"}";
  ot_http_respond(req, 200, "application/json", NULL, ok, sizeof ok - 1);
}

/* ---- server ---------------------------------------------------------------------------------- */

int32_t ot_serve_eos_id(const ot_tokenizer *tok, const ot_chat_config *chat) {
  int32_t id = -1;
  if (tok && chat && chat->eos_token && ot_tokenizer_token_id(tok, chat->eos_token, &id) == OT_OK) return id;
  if (tok && ot_tokenizer_token_id(tok, "<|endoftext|>", &id) == OT_OK) return id;
  ot_error_clear();
  return -1;
}

int ot_serve_http_start(const ot_serve_http_config *cfg, ot_serve_http **out) {
  if (!cfg || !cfg->url || !cfg->engine || !out)
    return ot_error(OT_ERR_INVALID, "ot_serve_http_start: NULL argument");
  ot_serve_http *api = calloc(1, sizeof *api);
  if (!api) return ot_error(OT_ERR_NOMEM, "cannot allocate the HTTP API");
  api->cfg = *cfg;
  if (!api->cfg.max_body) api->cfg.max_body = 1 << 20;
  if (api->cfg.max_prompts <= 0) api->cfg.max_prompts = 32;
  snprintf(api->base_name, sizeof api->base_name, "%s",
           cfg->base_name && *cfg->base_name ? cfg->base_name : "base");
  api->next_id = 1;
  pthread_mutex_init(&api->mu, NULL);
  pthread_cond_init(&api->cv, NULL);
  pthread_mutex_init(&api->met.mu, NULL);
  int nr = 0;
  api->routes[nr++] = (ot_http_route){"POST", "/v1/completions", 0, handle_completions, api};
  api->routes[nr++] = (ot_http_route){"POST", "/v1/chat/completions", 0, handle_chat, api};
  api->routes[nr++] = (ot_http_route){"GET", "/v1/models", 0, handle_models, api};
  api->routes[nr++] = (ot_http_route){"GET", "/v1/models/", 1, handle_model, api};
  api->routes[nr++] = (ot_http_route){"GET", "/health", 0, handle_health, api};
  api->routes[nr++] = (ot_http_route){"GET", "/metrics", 0, handle_metrics, api};
  api->routes[nr++] = (ot_http_route){"POST", "/v1/load_lora_adapter", 0, handle_load_adapter, api};
  api->routes[nr++] = (ot_http_route){"POST", "/v1/unload_lora_adapter", 0, handle_unload_adapter, api};
  if (cfg->n_extra_routes < 0 || cfg->n_extra_routes > OT_SERVE_EXTRA_ROUTES) {
    pthread_mutex_destroy(&api->mu);
    pthread_cond_destroy(&api->cv);
    free(api);
    return ot_error(OT_ERR_INVALID, "at most %d extra routes", OT_SERVE_EXTRA_ROUTES);
  }
  for (int i = 0; i < cfg->n_extra_routes; i++) api->routes[nr++] = cfg->extra_routes[i];
  ot_http_config hc = {.url = cfg->url,
                       .routes = api->routes,
                       .n_routes = nr,
                       .max_header = cfg->max_header,
                       .max_body = api->cfg.max_body,
                       .header_timeout_ms = cfg->header_timeout_ms,
                       .body_timeout_ms = cfg->body_timeout_ms,
                       .idle_timeout_ms = cfg->idle_timeout_ms,
                       .write_timeout_ms = cfg->write_timeout_ms,
                       .max_conns = cfg->max_conns,
                       .max_conns_per_peer = cfg->max_conns_per_peer,
                       .log = cfg->log,
                       .log_user = cfg->log_user};
  int rc = ot_http_start(&hc, &api->server);
  if (rc) {
    pthread_mutex_destroy(&api->mu);
    pthread_cond_destroy(&api->cv);
    pthread_mutex_destroy(&api->met.mu);
    free(api);
    return rc;
  }
  *out = api;
  return OT_OK;
}

int ot_serve_http_port(const ot_serve_http *h) { return ot_http_port(h->server); }

void ot_serve_http_stats(ot_serve_http *h, ot_http_stats *out) { ot_http_get_stats(h->server, out); }

void ot_serve_http_stop(ot_serve_http *api) {
  if (!api) return;
  pthread_mutex_lock(&api->mu);
  api->closing = 1;
  for (job *j = api->jobs; j; j = j->next) {
    pthread_mutex_lock(&j->mu);
    cancel_all(j);
    pthread_mutex_unlock(&j->mu);
  }
  while (api->outstanding > 0) pthread_cond_wait(&api->cv, &api->mu);
  pthread_mutex_unlock(&api->mu);
  ot_http_stop(api->server);
  pthread_mutex_destroy(&api->mu);
  pthread_cond_destroy(&api->cv);
  pthread_mutex_destroy(&api->met.mu);
  free(api->met.m);
  free(api);
}
