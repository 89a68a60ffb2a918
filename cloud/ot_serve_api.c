#include "ot_serve_api.h"

#include <cjson/cJSON.h>
#include <nng/nng.h>
#include <nng/supplemental/http/http.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_error.h"
#include "ot_serve_request.h"

static uint16_t ntohs_(uint16_t v) { return (uint16_t)((v >> 8) | (v << 8)); }

struct ot_serve_http {
  ot_serve_http_config cfg;
  char base_name[128];
  nng_http_server *server;
  nng_url *url;
  int port;
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

static nng_http_res *json_res(uint16_t status, cJSON *j) {
  nng_http_res *res = NULL;
  char *text = j ? cJSON_PrintUnformatted(j) : NULL;
  if (text && nng_http_res_alloc(&res) == 0) {
    nng_http_res_set_status(res, status);
    nng_http_res_set_header(res, "Content-Type", "application/json");
    if (nng_http_res_copy_data(res, text, strlen(text)) != 0) {
      nng_http_res_free(res);
      res = NULL;
    }
  }
  if (!res) nng_http_res_alloc_error(&res, 500);
  free(text);
  cJSON_Delete(j);
  return res;
}

static nng_http_res *error_res(uint16_t status, const char *type, const char *code, const char *param,
                               const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static nng_http_res *error_res(uint16_t status, const char *type, const char *code, const char *param,
                               const char *fmt, ...) {
  char msg[768];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  cJSON *j = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(j, "error");
  cJSON_AddStringToObject(e, "message", msg);
  cJSON_AddStringToObject(e, "type", type);
  if (param)
    cJSON_AddStringToObject(e, "param", param);
  else
    cJSON_AddNullToObject(e, "param");
  if (code)
    cJSON_AddStringToObject(e, "code", code);
  else
    cJSON_AddNullToObject(e, "code");
  return json_res(status, j);
}

static void reply(nng_aio *aio, nng_http_res *res) {
  nng_aio_set_output(aio, 0, res);
  nng_aio_finish(aio, 0);
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
  nng_aio *aio; /* the handler's, until replied */
  pthread_mutex_t mu;
  char id[48], model[128];
  long long created;
  int stream, n, n_submitted, n_done;
  int submitting; /* the handler is still submitting: the end cannot come yet */
  int replied;    /* the handler's aio is answered */
  int rejected;   /* refused after some prompts were submitted: drop their events */
  choice *ch;
  double t0;
  /* streaming */
  nng_http_conn *conn;
  nng_aio *waio;
  char *buf, *inflight;
  size_t len, cap;
  int writing, broken, sealed; /* sealed: [DONE] queued */
  struct job *next;
} job;

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
  free(j->inflight);
  if (j->conn) nng_http_conn_close(j->conn);
  if (j->waio) nng_aio_reap(j->waio);
  pthread_mutex_destroy(&j->mu);
  free(j);
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
static nng_http_res *completion_res(job *j) {
  for (int i = 0; i < j->n; i++)
    if (j->ch[i].reason == OT_FINISH_ERROR || j->ch[i].reason == OT_FINISH_CANCELLED)
      return error_res(500, "server_error", NULL, NULL, "generation failed: %s",
                       j->ch[i].msg[0] ? j->ch[i].msg : ot_finish_reason_name(j->ch[i].reason));
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
  return json_res(200, r);
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

static void sse_chunk(job *j, int index, const char *text, size_t len, const char *finish) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "id", j->id);
  cJSON_AddStringToObject(r, "object", "text_completion");
  cJSON_AddNumberToObject(r, "created", (double)j->created);
  cJSON_AddStringToObject(r, "model", j->model[0] ? j->model : j->api->base_name);
  cJSON *chs = cJSON_AddArrayToObject(r, "choices"), *c = cJSON_CreateObject();
  char *t = NULL;
  if (ot_utf8_sanitize(text, len, &t, NULL)) j->broken = 1;
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
  if (!s || buf_add(j, "data: ", 6) || buf_add(j, s, strlen(s)) || buf_add(j, "\n\n", 2)) j->broken = 1;
  free(s);
}

/* Starts the next write if none is in flight (j->mu held); returns 1 when the job is over. */
static int pump(job *j) {
  if (j->writing || !j->conn) return 0;
  if (j->len && !j->broken) {
    free(j->inflight);
    j->inflight = j->buf;
    nng_iov iov = {j->inflight, j->len};
    j->buf = NULL;
    j->len = j->cap = 0;
    j->writing = 1;
    nng_aio_set_iov(j->waio, 1, &iov);
    nng_http_conn_write_all(j->conn, j->waio);
    return 0;
  }
  return !j->submitting && j->n_done == j->n_submitted && (j->sealed || j->broken);
}

static void write_done(void *arg) {
  job *j = arg;
  pthread_mutex_lock(&j->mu);
  j->writing = 0;
  if (nng_aio_result(j->waio) != 0 && !j->broken) { /* the client went away: stop generating */
    j->broken = 1;
    for (int i = 0; i < j->n; i++)
      if (j->ch[i].submitted && !j->ch[i].done) ot_serve_cancel(j->api->cfg.engine, j->ch[i].id);
  }
  int over = pump(j);
  pthread_mutex_unlock(&j->mu);
  if (over) {
    if (!j->rejected) log_job(j);
    job_unlink_free(j);
  }
}

/* ---- engine events --------------------------------------------------------------------------- */

/* After a change (j->mu held): whether the job is over, and the reply to send if one is due. */
static int settle(job *j, nng_http_res **res) {
  *res = NULL;
  if (j->submitting || j->n_done < j->n_submitted) return 0;
  if (j->stream && j->conn) {
    if (!j->sealed && !j->broken) {
      if (buf_add(j, "data: [DONE]\n\n", 14)) j->broken = 1;
      j->sealed = 1;
    }
    return pump(j);
  }
  if (!j->replied) {
    *res = completion_res(j);
    j->replied = 1;
  }
  return 1;
}

static void on_event(void *user, const ot_serve_event *ev) {
  choice *c = user;
  job *j = c->job;
  pthread_mutex_lock(&j->mu);
  if (ev->text_len) {
    if (j->stream) {
      if (!j->broken && !j->rejected) sse_chunk(j, c->index, ev->text, ev->text_len, NULL);
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
  if (ev->finished) {
    c->done = 1;
    c->reason = ev->reason;
    c->error = ev->error;
    snprintf(c->msg, sizeof c->msg, "%s", ev->error_msg ? ev->error_msg : "");
    c->prompt_tokens = ev->prompt_tokens;
    c->completion_tokens = ev->completion_tokens;
    j->n_done++;
    if (j->stream && !j->broken && !j->rejected)
      sse_chunk(j, c->index, "", 0,
                ev->reason == OT_FINISH_ERROR || ev->reason == OT_FINISH_CANCELLED ? "error"
                                                                                   : finish_name(c));
  }
  int over = 0;
  nng_http_res *res = NULL;
  if (j->stream && j->conn)
    over = ev->finished ? settle(j, &res) : pump(j);
  else if (ev->finished)
    over = settle(j, &res);
  nng_aio *aio = res ? j->aio : NULL;
  pthread_mutex_unlock(&j->mu);
  if (aio) reply(aio, res);
  if (over) {
    if (!j->rejected) log_job(j);
    job_unlink_free(j);
  }
}

/* ---- POST /v1/completions -------------------------------------------------------------------- */

static int http_status(int rc) {
  return rc == OT_ERR_NOTFOUND                                                      ? 404
         : (rc == OT_ERR_INVALID || rc == OT_ERR_RANGE || rc == OT_ERR_UNSUPPORTED) ? 400
                                                                                    : 500;
}

static void handle_completions(nng_aio *aio) {
  nng_http_req *hreq = nng_aio_get_input(aio, 0);
  nng_http_handler *h = nng_aio_get_input(aio, 1);
  nng_http_conn *conn = nng_aio_get_input(aio, 2);
  ot_serve_http *api = nng_http_handler_get_data(h);
  void *data = NULL;
  size_t len = 0;
  nng_http_req_get_data(hreq, &data, &len);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ot_serve_parse_cfg pc = {.tok = api->cfg.tok,
                           .base_name = api->base_name,
                           .eos_id = api->cfg.eos_id,
                           .max_prompts = api->cfg.max_prompts,
                           .seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30)};
  ot_serve_completion *pr = malloc(sizeof *pr);
  ot_serve_req_error perr;
  nng_http_res *res = NULL;
  int bad = 0;
  if (!pr) {
    bad = 1;
    res = error_res(500, "server_error", NULL, NULL, "out of memory");
  } else if (ot_serve_parse_completion(data, len, &pc, pr, &perr) != OT_OK) {
    bad = 1;
    res = error_res((uint16_t)perr.status, perr.type, NULL, perr.param[0] ? perr.param : NULL, "%s",
                    perr.message);
  }
  int n = bad ? 0 : pr->n_prompts;
  job *j = bad ? NULL : calloc(1, sizeof *j);
  if (j) j->ch = calloc((size_t)n, sizeof *j->ch);
  if (!bad && (!j || !j->ch)) {
    if (j) free(j);
    j = NULL;
    res = error_res(500, "server_error", NULL, NULL, "out of memory");
  }
  pthread_mutex_lock(&api->mu);
  if (j && api->closing) {
    free(j->ch);
    free(j);
    j = NULL;
    res = error_res(503, "server_error", NULL, NULL, "the server is shutting down");
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
    logf_(&api->cfg, "POST /v1/completions refused (%u)", (unsigned)nng_http_res_get_status(res));
    if (pr) ot_serve_completion_free(pr);
    free(pr);
    reply(aio, res);
    return;
  }
  j->api = api;
  j->aio = aio;
  pthread_mutex_init(&j->mu, NULL);
  snprintf(j->model, sizeof j->model, "%s", pr->model);
  j->created = (long long)time(NULL);
  int stream = pr->stream;
  j->stream = stream;
  j->n = n;
  j->t0 = now_ms();
  j->submitting = 1;
  static const char head[] =
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
      "Connection: close\r\n\r\n";
  int rc = OT_OK;
  if (stream && (buf_add(j, head, sizeof head - 1) || nng_aio_alloc(&j->waio, write_done, j) != 0))
    rc = ot_error(OT_ERR_NOMEM, "out of memory");
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
  pthread_mutex_lock(&j->mu);
  j->submitting = 0;
  if (rc) { /* refuse the whole request; what was submitted is cancelled and dropped */
    j->replied = j->rejected = 1;
    for (int i = 0; i < n; i++)
      if (j->ch[i].submitted && !j->ch[i].done) ot_serve_cancel(api->cfg.engine, j->ch[i].id);
  } else if (stream) {
    if (nng_http_hijack(conn) == 0) {
      j->conn = conn;
    } else {
      j->broken = 1;
    }
  }
  int over = settle(j, &res);
  int hijacked = j->conn != NULL;
  if (!rc && stream && !hijacked) {
    for (int i = 0; i < n; i++)
      if (j->ch[i].submitted && !j->ch[i].done) ot_serve_cancel(api->cfg.engine, j->ch[i].id);
  }
  pthread_mutex_unlock(&j->mu);
  if (rc) {
    logf_(&api->cfg, "POST /v1/completions model=%s refused: %s", pr->model[0] ? pr->model : "(base)", why);
    reply(aio, http_status(rc) == 404
                   ? error_res(404, "invalid_request_error", "model_not_found", "model",
                               "The model '%s' does not exist", pr->model)
                   : error_res((uint16_t)http_status(rc),
                               http_status(rc) == 400 ? "invalid_request_error" : "server_error", NULL, NULL,
                               "%s", why));
  } else if (hijacked) {
    nng_http_req_free(hreq);
    reply(aio, NULL);
  } else if (res) {
    reply(aio, res);
  } else if (stream) {
    reply(aio, error_res(500, "server_error", NULL, NULL, "cannot take over the connection for streaming"));
  }
  if (over) {
    if (!j->rejected) log_job(j);
    job_unlink_free(j);
  }
  ot_serve_completion_free(pr);
  free(pr);
}

/* ---- GET /v1/models ---------------------------------------------------------------------------- */

static void add_model(void *ctx, const char *name) {
  cJSON *arr = ctx, *m = cJSON_CreateObject();
  cJSON_AddStringToObject(m, "id", name);
  cJSON_AddStringToObject(m, "object", "model");
  cJSON_AddNumberToObject(m, "created", 0);
  cJSON_AddStringToObject(m, "owned_by", "offtune");
  cJSON_AddItemToArray(arr, m);
}

static void handle_models(nng_aio *aio) {
  nng_http_handler *h = nng_aio_get_input(aio, 1);
  ot_serve_http *api = nng_http_handler_get_data(h);
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "object", "list");
  cJSON *arr = cJSON_AddArrayToObject(r, "data");
  add_model(arr, api->base_name);
  cJSON *base = cJSON_GetArrayItem(arr, 0);
  cJSON_AddNullToObject(base, "parent");
  if (api->cfg.list) api->cfg.list(api->cfg.list_user, add_model, arr);
  cJSON *m;
  cJSON_ArrayForEach(m, arr) if (m != base) cJSON_AddStringToObject(m, "parent", api->base_name);
  reply(aio, json_res(200, r));
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
  nng_http_handler *hc = NULL, *hm = NULL;
  int nrc = nng_url_parse(&api->url, cfg->url);
  if (nrc == 0) nrc = nng_http_server_hold(&api->server, api->url);
  if (nrc == 0) nrc = nng_http_handler_alloc(&hc, "/v1/completions", handle_completions);
  if (nrc == 0) nrc = nng_http_handler_set_method(hc, "POST");
  if (nrc == 0) nrc = nng_http_handler_collect_body(hc, true, api->cfg.max_body);
  if (nrc == 0) nrc = nng_http_handler_set_data(hc, api, NULL);
  if (nrc == 0) nrc = nng_http_server_add_handler(api->server, hc);
  if (nrc == 0) hc = NULL; /* the server owns it */
  if (nrc == 0) nrc = nng_http_handler_alloc(&hm, "/v1/models", handle_models);
  if (nrc == 0) nrc = nng_http_handler_set_data(hm, api, NULL);
  if (nrc == 0) nrc = nng_http_server_add_handler(api->server, hm);
  if (nrc == 0) hm = NULL;
  /* nng answers a body over the limit (and malformed HTTP) itself, with a 400: say so in JSON */
  char page[256];
  snprintf(page, sizeof page,
           "{\"error\": {\"message\": \"bad request: malformed HTTP or a body over the %zu-byte limit\", "
           "\"type\": \"invalid_request_error\", \"param\": null, \"code\": null}}",
           api->cfg.max_body);
  if (nrc == 0) nrc = nng_http_server_set_error_page(api->server, 400, page);
  if (nrc == 0) nrc = nng_http_server_start(api->server);
  nng_sockaddr sa;
  if (nrc == 0) nrc = nng_http_server_get_addr(api->server, &sa);
  if (hc) nng_http_handler_free(hc);
  if (hm) nng_http_handler_free(hm);
  if (nrc) {
    int rc = ot_error(OT_ERR_IO, "HTTP server on %s: %s", cfg->url, nng_strerror(nrc));
    if (api->server) nng_http_server_release(api->server);
    if (api->url) nng_url_free(api->url);
    pthread_mutex_destroy(&api->mu);
    pthread_cond_destroy(&api->cv);
    free(api);
    return rc;
  }
  api->port = sa.s_family == NNG_AF_INET    ? ntohs_(sa.s_in.sa_port)
              : sa.s_family == NNG_AF_INET6 ? ntohs_(sa.s_in6.sa_port)
                                            : 0;
  *out = api;
  return OT_OK;
}

int ot_serve_http_port(const ot_serve_http *h) { return h->port; }

void ot_serve_http_stop(ot_serve_http *api) {
  if (!api) return;
  pthread_mutex_lock(&api->mu);
  api->closing = 1;
  for (job *j = api->jobs; j; j = j->next) {
    pthread_mutex_lock(&j->mu);
    for (int i = 0; i < j->n; i++)
      if (j->ch[i].submitted && !j->ch[i].done) ot_serve_cancel(api->cfg.engine, j->ch[i].id);
    pthread_mutex_unlock(&j->mu);
  }
  while (api->outstanding > 0) pthread_cond_wait(&api->cv, &api->mu);
  pthread_mutex_unlock(&api->mu);
  nng_http_server_stop(api->server);
  nng_http_server_release(api->server);
  nng_url_free(api->url);
  pthread_mutex_destroy(&api->mu);
  pthread_cond_destroy(&api->cv);
  free(api);
}
