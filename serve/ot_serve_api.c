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

struct ot_serve_http {
  ot_serve_http_config cfg;
  char base_name[128];
  ot_http_server *server;
  ot_http_route routes[5 + OT_SERVE_EXTRA_ROUTES];
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
} choice;

typedef struct job {
  ot_serve_http *api;
  ot_http_req *req; /* until answered */
  pthread_mutex_t mu;
  char id[48], model[128];
  long long created;
  int stream, n, n_submitted, n_done;
  int submitting; /* the handler is still submitting: the end cannot come yet */
  int rejected;   /* refused after some prompts were submitted: drop their events */
  int started;    /* the stream's head is out: chunks go straight to the client */
  int broken;     /* the client went away (or a write failed): nothing more is sent */
  int sealed;     /* [DONE] sent */
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

/* The whole reply of a non-streamed job (every choice done). */
static void respond_completion(job *j) {
  for (int i = 0; i < j->n; i++)
    if (j->ch[i].reason == OT_FINISH_ERROR || j->ch[i].reason == OT_FINISH_CANCELLED) {
      ot_http_respond_error(j->req, 500, "server_error", NULL, NULL, "generation failed: %s",
                            j->ch[i].msg[0] ? j->ch[i].msg : ot_finish_reason_name(j->ch[i].reason));
      return;
    }
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "id", j->id);
  cJSON_AddStringToObject(r, "object", "text_completion");
  cJSON_AddNumberToObject(r, "created", (double)j->created);
  cJSON_AddStringToObject(r, "model", j->model[0] ? j->model : j->api->base_name);
  cJSON *chs = cJSON_AddArrayToObject(r, "choices");
  int pt = 0, ct = 0;
  for (int i = 0; i < j->n; i++) {
    cJSON *c = cJSON_CreateObject();
    char *t = NULL;
    if (ot_utf8_sanitize(j->ch[i].text ? j->ch[i].text : "", j->ch[i].len, &t, NULL) == OT_OK)
      cJSON_AddStringToObject(c, "text", t);
    free(t);
    cJSON_AddNumberToObject(c, "index", i);
    cJSON_AddNullToObject(c, "logprobs");
    cJSON_AddStringToObject(c, "finish_reason", finish_name(&j->ch[i]));
    cJSON_AddItemToArray(chs, c);
    pt += j->ch[i].prompt_tokens;
    ct += j->ch[i].completion_tokens;
  }
  cJSON *u = cJSON_AddObjectToObject(r, "usage");
  cJSON_AddNumberToObject(u, "prompt_tokens", pt);
  cJSON_AddNumberToObject(u, "completion_tokens", ct);
  cJSON_AddNumberToObject(u, "total_tokens", pt + ct);
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

static void sse_chunk(job *j, int index, const char *text, size_t len, const char *finish) {
  if (j->broken) return;
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "id", j->id);
  cJSON_AddStringToObject(r, "object", "text_completion");
  cJSON_AddNumberToObject(r, "created", (double)j->created);
  cJSON_AddStringToObject(r, "model", j->model[0] ? j->model : j->api->base_name);
  cJSON *chs = cJSON_AddArrayToObject(r, "choices"), *c = cJSON_CreateObject();
  char *t = NULL;
  ot_utf8_sanitize(text, len, &t, NULL);
  cJSON_AddStringToObject(c, "text", t ? t : "");
  free(t);
  cJSON_AddNumberToObject(c, "index", index);
  cJSON_AddNullToObject(c, "logprobs");
  if (finish)
    cJSON_AddStringToObject(c, "finish_reason", finish);
  else
    cJSON_AddNullToObject(c, "finish_reason");
  cJSON_AddItemToArray(chs, c);
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
  if (!j->rejected) log_job(j);
  job_unlink_free(j);
}

static void on_event(void *user, const ot_serve_event *ev) {
  choice *c = user;
  job *j = c->job;
  pthread_mutex_lock(&j->mu);
  if (ev->text_len && !j->rejected) {
    if (j->stream) {
      sse_chunk(j, c->index, ev->text, ev->text_len, NULL);
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
                ev->reason == OT_FINISH_ERROR || ev->reason == OT_FINISH_CANCELLED ? "error"
                                                                                   : finish_name(c));
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

static void handle_completions(void *user, ot_http_req *req) {
  ot_serve_http *api = user;
  size_t len = 0;
  const char *data = ot_http_req_body(req, &len);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ot_serve_parse_cfg pc = {.tok = api->cfg.tok,
                           .base_name = api->base_name,
                           .eos_id = api->cfg.eos_id,
                           .max_prompts = api->cfg.max_prompts,
                           .seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30)};
  ot_serve_completion *pr = malloc(sizeof *pr);
  ot_serve_req_error perr;
  if (!pr) {
    ot_http_respond_error(req, 500, "server_error", NULL, NULL, "out of memory");
    return;
  }
  if (ot_serve_parse_completion(data, len, &pc, pr, &perr) != OT_OK) {
    logf_(&api->cfg, "POST /v1/completions refused (%d): %s", perr.status, perr.message);
    ot_http_respond_error(req, perr.status, perr.type, NULL, perr.param[0] ? perr.param : NULL, "%s",
                          perr.message);
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
    snprintf(j->id, sizeof j->id, "cmpl-%llx%06llx", (unsigned long long)api->next_id++,
             (unsigned long long)(now_ms() * 1000) & 0xffffff);
  }
  pthread_mutex_unlock(&api->mu);
  if (!j) {
    logf_(&api->cfg, "POST /v1/completions refused (%d)", status);
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
  j->n = n;
  j->t0 = now_ms();
  j->submitting = 1;
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
    logf_(&api->cfg, "POST /v1/completions model=%s refused: %s", pr->model[0] ? pr->model : "(base)", why);
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

/* ---- GET /v1/models, /v1/models/{id}, /health ------------------------------------------------- */

static void add_model(void *ctx, const char *name) {
  cJSON *arr = ctx, *m = cJSON_CreateObject();
  cJSON_AddStringToObject(m, "id", name);
  cJSON_AddStringToObject(m, "object", "model");
  cJSON_AddNumberToObject(m, "created", 0);
  cJSON_AddStringToObject(m, "owned_by", "offtune");
  cJSON_AddItemToArray(arr, m);
}

static cJSON *model_list(ot_serve_http *api) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "object", "list");
  cJSON *arr = cJSON_AddArrayToObject(r, "data");
  add_model(arr, api->base_name);
  cJSON *base = cJSON_GetArrayItem(arr, 0);
  cJSON_AddNullToObject(base, "parent");
  if (api->cfg.list) api->cfg.list(api->cfg.list_user, add_model, arr);
  cJSON *m;
  cJSON_ArrayForEach(m, arr) if (m != base) cJSON_AddStringToObject(m, "parent", api->base_name);
  return r;
}

static void handle_models(void *user, ot_http_req *req) { answer_json(req, 200, model_list(user)); }

static int hex_digit(char c) {
  return c >= '0' && c <= '9'   ? c - '0'
         : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                : -1;
}

static void handle_model(void *user, ot_http_req *req) {
  ot_serve_http *api = user;
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
  cJSON *list = model_list(api), *m = NULL, *found = NULL;
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

static void handle_health(void *user, ot_http_req *req) {
  (void)user;
  static const char ok[] = "{\"status\":\"ok\"}";
  ot_http_respond(req, 200, "application/json", NULL, ok, sizeof ok - 1);
}

/* ---- server ---------------------------------------------------------------------------------- */

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
  int nr = 0;
  api->routes[nr++] = (ot_http_route){"POST", "/v1/completions", 0, handle_completions, api};
  api->routes[nr++] = (ot_http_route){"GET", "/v1/models", 0, handle_models, api};
  api->routes[nr++] = (ot_http_route){"GET", "/v1/models/", 1, handle_model, api};
  api->routes[nr++] = (ot_http_route){"GET", "/health", 0, handle_health, api};
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
  free(api);
}
