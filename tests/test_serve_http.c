/* The serving HTTP API (cloud/ot_serve_api.h) on a real loopback socket: OpenAI-style
 * completions for every adapter kind equal ot_generate's greedy text, several prompts in one
 * request, streaming (the SSE deltas concatenate to the non-streamed text), /v1/models, errors
 * (404 unknown model, 400 bad JSON, bad fields and an oversized body), and concurrent clients
 * for different adapters getting the texts they get alone. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <signal.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ot_access.h"
#include "ot_error.h"
#include "ot_serve_api.h"
#include "ot_serve_request.h"
#include "ot_transport.h"
#include "serve.pb-c.h"
#include "ot_test_util.h"
#include "serve_fixture.h"

static ot_serve_engine *eng;
static ot_serve_http *api;
static int port;
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static int log_lines;
static char last_log[1024];

static void on_log(void *user, const char *line) {
  (void)user;
  pthread_mutex_lock(&log_mu);
  log_lines++;
  snprintf(last_log, sizeof last_log, "%s", line);
  pthread_mutex_unlock(&log_mu);
}

static void list(void *user, void (*add)(void *ctx, const char *name), void *ctx) {
  (void)user;
  for (int k = 1; k < N_MODELS; k++) add(ctx, models[k]);
}

static int setup(void **state) {
  (void)state;
  if (serve_fixture_setup("serve_http")) return -1;
  eng = engine(16, 256, 0, -1);
  assert_int_equal(ot_serve_start(eng), 0);
  ot_serve_http_config c = {.url = "http://127.0.0.1:0",
                            .engine = eng,
                            .tok = tok,
                            .base_name = "tiny-base",
                            .list = list,
                            .eos_id = -1,
                            .max_body = 4096,
                            .max_prompts = 8,
                            .log = on_log};
  if (ot_serve_http_start(&c, &api)) fail_msg("http: %s", ot_error_detail());
  port = ot_serve_http_port(api);
  assert_true(port > 0);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  ot_serve_http_stop(api);
  ot_serve_engine_free(eng);
  return serve_fixture_teardown();
}

typedef struct {
  int status;
  char head[4096];
  char *body;
  size_t len;
} http_res;

/* One request on a fresh connection ("Connection: close"); reads to the end. */
static void http(const char *method, const char *path, const char *body, size_t blen, http_res *out) {
  memset(out, 0, sizeof *out);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(fd >= 0);
  struct timeval tv = {60, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
  char hdr[512];
  int hn = snprintf(
      hdr, sizeof hdr,
      "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
      "Connection: close\r\n\r\n",
      method, path, blen);
  assert_int_equal(write(fd, hdr, (size_t)hn), hn);
  for (size_t off = 0; off < blen;) {
    ssize_t w = write(fd, body + off, blen - off);
    if (w <= 0) break; /* the server may refuse an oversized body before reading it all */
    off += (size_t)w;
  }
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  for (;;) {
    if (n + 4096 > cap) buf = realloc(buf, cap *= 2);
    ssize_t r = read(fd, buf + n, cap - n - 1);
    if (r <= 0) break;
    n += (size_t)r;
    buf[n] = '\0';
    /* stop once a Content-Length body is complete */
    char *end = strstr(buf, "\r\n\r\n");
    if (end) {
      char *cl = strcasestr(buf, "Content-Length:");
      if (cl && cl < end && (size_t)(end + 4 - buf) + strtoul(cl + 15, NULL, 10) <= n) break;
    }
  }
  close(fd);
  buf[n] = '\0';
  char *end = strstr(buf, "\r\n\r\n");
  if (!end) fail_msg("no HTTP response (%zu bytes)", n);
  assert_int_equal(sscanf(buf, "HTTP/1.%*d %d", &out->status), 1);
  size_t hl = (size_t)(end - buf);
  memcpy(out->head, buf, hl < sizeof out->head - 1 ? hl : sizeof out->head - 1);
  out->len = n - hl - 4;
  out->body = malloc(out->len + 1);
  memcpy(out->body, end + 4, out->len);
  out->body[out->len] = '\0';
  free(buf);
}

static cJSON *post(const char *json, int want_status, http_res *res) {
  http("POST", "/v1/completions", json, strlen(json), res);
  if (res->status != want_status) fail_msg("status %d (wanted %d): %s", res->status, want_status, res->body);
  cJSON *j = cJSON_Parse(res->body);
  if (!j && want_status != 200) return NULL;
  assert_non_null(j);
  return j;
}

/* The greedy completion as the API shows it: bytes that are not UTF-8 (the byte-level test model
 * emits any byte) and NUL become U+FFFD; streamed deltas concatenate to the same text. */
static void want_text(int k, int p, char *out) {
  char raw[GEN], *t = NULL;
  size_t n = 0;
  for (int i = 0; i < GEN; i++) raw[i] = (char)want[k][p][i];
  assert_int_equal(ot_utf8_sanitize(raw, GEN, &t, &n), 0);
  assert_true(n < 4 * GEN);
  memcpy(out, t, n + 1);
  free(t);
}

static const char *str(const cJSON *j, const char *key) {
  const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, key));
  if (!s) fail_msg("no string '%s'", key);
  return s;
}
static double num(const cJSON *j, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
  if (!cJSON_IsNumber(v)) fail_msg("no number '%s'", key);
  return v->valuedouble;
}

static char *request_json(const char *model, const char *prompt, int stream) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "model", model);
  cJSON_AddStringToObject(r, "prompt", prompt);
  cJSON_AddNumberToObject(r, "max_tokens", GEN);
  cJSON_AddNumberToObject(r, "temperature", 0);
  if (stream) cJSON_AddTrueToObject(r, "stream");
  char *s = cJSON_PrintUnformatted(r);
  cJSON_Delete(r);
  return s;
}

static void test_completions(void **state) {
  (void)state;
  for (int k = 0; k < N_MODELS; k++)
    for (int p = 0; p < N_PROMPTS; p++) {
      char *body = request_json(k ? models[k] : (p ? "" : "tiny-base"), prompts[p], 0);
      http_res res;
      cJSON *j = post(body, 200, &res);
      assert_non_null(strcasestr(res.head, "application/json"));
      assert_string_equal(str(j, "object"), "text_completion");
      assert_memory_equal(str(j, "id"), "cmpl-", 5);
      assert_string_equal(str(j, "model"), k ? models[k] : "tiny-base");
      const cJSON *ch = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0);
      char w[4 * GEN];
      want_text(k, p, w);
      assert_string_equal(str(ch, "text"), w);
      assert_string_equal(str(ch, "finish_reason"), "length");
      assert_int_equal(num(ch, "index"), 0);
      assert_true(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(ch, "logprobs")));
      const cJSON *u = cJSON_GetObjectItemCaseSensitive(j, "usage");
      assert_int_equal(num(u, "prompt_tokens"), strlen(prompts[p]));
      assert_int_equal(num(u, "completion_tokens"), GEN);
      assert_int_equal(num(u, "total_tokens"), strlen(prompts[p]) + GEN);
      cJSON_Delete(j);
      free(res.body);
      free(body);
    }
  pthread_mutex_lock(&log_mu);
  printf("last log line: %s\n", last_log);
  assert_non_null(strstr(last_log, "model=bf1"));
  assert_non_null(strstr(last_log, "completion_tokens=24"));
  pthread_mutex_unlock(&log_mu);
}

static void test_prompt_array(void **state) {
  (void)state;
  char body[512];
  snprintf(
      body, sizeof body,
      "{\"model\": \"lora1\", \"prompt\": [\"%s\", \"%s\", \"%s\"], \"max_tokens\": %d, \"temperature\": 0}",
      prompts[0], prompts[1], prompts[2], GEN);
  http_res res;
  cJSON *j = post(body, 200, &res);
  const cJSON *chs = cJSON_GetObjectItemCaseSensitive(j, "choices");
  assert_int_equal(cJSON_GetArraySize(chs), N_PROMPTS);
  for (int p = 0; p < N_PROMPTS; p++) {
    const cJSON *ch = cJSON_GetArrayItem(chs, p);
    char w[4 * GEN];
    want_text(3, p, w);
    assert_int_equal(num(ch, "index"), p);
    assert_string_equal(str(ch, "text"), w);
  }
  assert_int_equal(num(cJSON_GetObjectItemCaseSensitive(j, "usage"), "completion_tokens"), N_PROMPTS * GEN);
  cJSON_Delete(j);
  free(res.body);
  /* token ids as the prompt */
  size_t n = 0;
  int32_t *ids = encode(prompts[2], &n);
  char *b = body;
  b += sprintf(b, "{\"model\": \"off2\", \"max_tokens\": %d, \"temperature\": 0, \"prompt\": [", GEN);
  for (size_t i = 0; i < n; i++) b += sprintf(b, "%s%d", i ? "," : "", ids[i]);
  sprintf(b, "]}");
  free(ids);
  j = post(body, 200, &res);
  char w[4 * GEN];
  want_text(2, 2, w);
  assert_string_equal(str(cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0), "text"), w);
  cJSON_Delete(j);
  free(res.body);
}

/* SSE: every event a text_completion chunk; deltas concatenate to the full text; [DONE] last. */
static void test_stream(void **state) {
  (void)state;
  for (int k = 0; k < N_MODELS; k += 2) {
    int p = 2;
    char *body = request_json(models[k], prompts[p], 1);
    http_res res;
    http("POST", "/v1/completions", body, strlen(body), &res);
    assert_int_equal(res.status, 200);
    assert_non_null(strcasestr(res.head, "text/event-stream"));
    char text[4096] = "";
    size_t tl = 0;
    int events = 0, done = 0, finished = 0;
    char *save = NULL;
    for (char *ev = strtok_r(res.body, "\n", &save); ev; ev = strtok_r(NULL, "\n", &save)) {
      assert_memory_equal(ev, "data: ", 6);
      assert_false(done); /* nothing after [DONE] */
      if (strcmp(ev + 6, "[DONE]") == 0) {
        done = 1;
        continue;
      }
      cJSON *j = cJSON_Parse(ev + 6);
      assert_non_null(j);
      assert_string_equal(str(j, "object"), "text_completion");
      const cJSON *ch = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0);
      const char *t = str(ch, "text");
      memcpy(text + tl, t, strlen(t));
      tl += strlen(t);
      const cJSON *fr = cJSON_GetObjectItemCaseSensitive(ch, "finish_reason");
      if (cJSON_IsString(fr)) {
        assert_string_equal(fr->valuestring, "length");
        finished++;
      }
      events++;
      cJSON_Delete(j);
    }
    text[tl] = '\0';
    assert_true(done);
    assert_int_equal(finished, 1);
    assert_true(events >= 2);
    char w[4 * GEN];
    want_text(k, p, w);
    assert_true(events > GEN / 2); /* streamed, not sent in one piece */
    assert_string_equal(text, w);
    free(res.body);
    free(body);
  }
}

/* Several prompts streamed together: chunks carry their choice's index; each choice's deltas
 * concatenate to its text and end with one finish chunk; one [DONE]. */
static void test_stream_prompts(void **state) {
  (void)state;
  char body[512];
  snprintf(body, sizeof body,
           "{\"model\": \"bn1\", \"prompt\": [\"%s\", \"%s\"], \"max_tokens\": %d, \"temperature\": 0, "
           "\"stream\": true}",
           prompts[0], prompts[2], GEN);
  http_res res;
  http("POST", "/v1/completions", body, strlen(body), &res);
  assert_int_equal(res.status, 200);
  char text[2][4096] = {"", ""};
  size_t tl[2] = {0, 0};
  int finished[2] = {0, 0}, done = 0;
  char *save = NULL;
  for (char *ev = strtok_r(res.body, "\n", &save); ev; ev = strtok_r(NULL, "\n", &save)) {
    if (strcmp(ev, "data: [DONE]") == 0) {
      done++;
      continue;
    }
    cJSON *j = cJSON_Parse(ev + 6);
    assert_non_null(j);
    const cJSON *ch = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0);
    int i = (int)num(ch, "index");
    assert_true(i == 0 || i == 1);
    const char *t = str(ch, "text");
    memcpy(text[i] + tl[i], t, strlen(t));
    tl[i] += strlen(t);
    if (cJSON_IsString(cJSON_GetObjectItemCaseSensitive(ch, "finish_reason"))) finished[i]++;
    cJSON_Delete(j);
  }
  assert_int_equal(done, 1);
  for (int i = 0; i < 2; i++) {
    char w[4 * GEN];
    want_text(5, i ? 2 : 0, w);
    text[i][tl[i]] = '\0';
    assert_string_equal(text[i], w);
    assert_int_equal(finished[i], 1);
  }
  free(res.body);
}

static void test_models(void **state) {
  (void)state;
  http_res res;
  http("GET", "/v1/models", "", 0, &res);
  assert_int_equal(res.status, 200);
  cJSON *j = cJSON_Parse(res.body);
  assert_non_null(j);
  assert_string_equal(str(j, "object"), "list");
  const cJSON *data = cJSON_GetObjectItemCaseSensitive(j, "data");
  assert_int_equal(cJSON_GetArraySize(data), N_MODELS);
  assert_string_equal(str(cJSON_GetArrayItem(data, 0), "id"), "tiny-base");
  for (int k = 1; k < N_MODELS; k++) {
    const cJSON *m = cJSON_GetArrayItem(data, k);
    assert_string_equal(str(m, "id"), models[k]);
    assert_string_equal(str(m, "object"), "model");
    assert_string_equal(str(m, "parent"), "tiny-base");
  }
  cJSON_Delete(j);
  free(res.body);
}

static void expect_error(const char *body, size_t len, int status, const char *param, const char *code) {
  http_res res;
  http("POST", "/v1/completions", body, len, &res);
  if (res.status != status)
    fail_msg("status %d (wanted %d) for %.60s: %s", res.status, status, body, res.body);
  cJSON *j = cJSON_Parse(res.body);
  assert_non_null(j);
  const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
  assert_non_null(e);
  printf("%d: %s\n", status, str(e, "message"));
  assert_true(strlen(str(e, "message")) > 10);
  assert_non_null(cJSON_GetObjectItemCaseSensitive(e, "type"));
  if (param) assert_string_equal(str(e, "param"), param);
  if (code) assert_string_equal(str(e, "code"), code);
  cJSON_Delete(j);
  free(res.body);
}

static void test_errors(void **state) {
  (void)state;
  const char *b = "{\"model\": \"nope\", \"prompt\": \"Hi\"}";
  expect_error(b, strlen(b), 404, "model", "model_not_found");
  b = "{\"model\": \"lora1\", \"prompt\": \"Hi\"";
  expect_error(b, strlen(b), 400, NULL, NULL);
  b = "[1, 2]";
  expect_error(b, strlen(b), 400, NULL, NULL);
  b = "{\"model\": \"lora1\"}";
  expect_error(b, strlen(b), 400, "prompt", NULL);
  b = "{\"prompt\": \"Hi\", \"temperature\": \"hot\"}";
  expect_error(b, strlen(b), 400, "temperature", NULL);
  b = "{\"prompt\": \"Hi\", \"max_tokens\": -3}";
  expect_error(b, strlen(b), 400, "max_tokens", NULL);
  b = "{\"prompt\": \"Hi\", \"n\": 2}";
  expect_error(b, strlen(b), 400, "n", NULL);
  b = "{\"prompt\": [\"a\", 3]}";
  expect_error(b, strlen(b), 400, "prompt", NULL);
  b = "{\"prompt\": [1, 99999]}";
  expect_error(b, strlen(b), 400, NULL, NULL);
  b = "{\"prompt\": \"Hi\", \"stop\": [\"a\", \"b\", \"c\", \"d\", \"e\"]}";
  expect_error(b, strlen(b), 400, "stop", NULL);
  /* a prompt longer than the context */
  char longp[300];
  snprintf(longp, sizeof longp, "{\"prompt\": \"%0100d\"}", 0);
  expect_error(longp, strlen(longp), 400, NULL, NULL);
  /* a body over max_body (4096) */
  char *big = malloc(8192);
  memset(big, ' ', 8192);
  memcpy(big, "{\"prompt\": \"Hi\"", 15);
  big[8191] = '}';
  expect_error(big, 8192, 413, NULL, NULL);
  free(big);
  /* the server still works */
  http_res res;
  cJSON *j = post("{\"prompt\": \"Hi\", \"max_tokens\": 3, \"temperature\": 0}", 200, &res);
  cJSON_Delete(j);
  free(res.body);
}

/* Stop sequences over HTTP: the text ends before the first occurrence, finish_reason "stop". */
static void test_stop(void **state) {
  (void)state;
  /* a 2-character ASCII stop string from the middle of lora2's greedy bytes */
  const int32_t *g = want[4][0];
  int at = 6;
  while (at + 2 <= GEN && !(g[at] >= 0x20 && g[at] < 0x7f && g[at + 1] >= 0x20 && g[at + 1] < 0x7f)) at++;
  if (at + 2 > GEN) {
    printf("SKIP test_stop: no two printable ASCII bytes in a row in the greedy text\n");
    skip();
  }
  char stop[3] = {(char)g[at], (char)g[at + 1], 0}, raw[GEN];
  int cut = 0;
  while (!(g[cut] == stop[0] && g[cut + 1] == stop[1])) cut++;
  for (int i = 0; i < cut; i++) raw[i] = (char)g[i];
  char *w = NULL;
  size_t wl = 0;
  assert_int_equal(ot_utf8_sanitize(raw, (size_t)cut, &w, &wl), 0);
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "model", "lora2");
  cJSON_AddStringToObject(r, "prompt", prompts[0]);
  cJSON_AddNumberToObject(r, "max_tokens", GEN);
  cJSON_AddNumberToObject(r, "temperature", 0);
  cJSON_AddStringToObject(r, "stop", stop);
  char *body = cJSON_PrintUnformatted(r);
  cJSON_Delete(r);
  http_res res;
  cJSON *j = post(body, 200, &res);
  const cJSON *ch = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0);
  assert_string_equal(str(ch, "text"), w);
  assert_string_equal(str(ch, "finish_reason"), "stop");
  cJSON_Delete(j);
  free(res.body);
  free(body);
  free(w);
}

/* The request that crashed serve-model (issue 14): a string "stop" followed by more members.
 * An empty stop string stops nothing; the reply equals the one without "stop". */
static void test_hostile_stop(void **state) {
  (void)state;
  ot_serve_parse_cfg pc = {.tok = tok, .eos_id = -1, .max_prompts = 4};
  ot_serve_completion c;
  ot_serve_req_error e;
  const char *b =
      "{\"prompt\":\"a\",\"max_tokens\":3,\"stop\":\"\",\"s0\":\"x\",\"s1\":\"y\",\"s2\":\"z\",\"s3\":\"w\","
      "\"s4\":\"v\"}";
  assert_int_equal(ot_serve_parse_completion(b, strlen(b), &pc, &c, &e), OT_OK);
  for (int k = 0; k < OT_SERVE_MAX_STOP; k++) assert_null(c.r.stop[k]);
  assert_int_equal(c.n_prompts, 1);
  ot_serve_completion_free(&c);
  b = "{\"prompt\":\"a\",\"stop\":\"\",\"x\":5}";
  assert_int_equal(ot_serve_parse_completion(b, strlen(b), &pc, &c, &e), OT_OK);
  ot_serve_completion_free(&c);
  b = "{\"prompt\":\"a\",\"stop\":\"ab\",\"s0\":\"x\"}";
  assert_int_equal(ot_serve_parse_completion(b, strlen(b), &pc, &c, &e), OT_OK);
  assert_string_equal(c.r.stop[0], "ab");
  assert_null(c.r.stop[1]);
  ot_serve_completion_free(&c);
  b = "{\"prompt\":\"a\",\"stop\":[\"\",\"q\",\"\",\"r\"]}";
  assert_int_equal(ot_serve_parse_completion(b, strlen(b), &pc, &c, &e), OT_OK);
  assert_string_equal(c.r.stop[0], "q");
  assert_string_equal(c.r.stop[1], "r");
  assert_null(c.r.stop[2]);
  ot_serve_completion_free(&c);
  /* a name with NUL would be cut at it by the JSON parser and name another adapter */
  b = "{\"model\":\"lora1\\u0000x\",\"prompt\":\"a\"}";
  assert_int_equal(ot_serve_parse_completion(b, strlen(b), &pc, &c, &e), OT_ERR_INVALID);
  b = "{\"model\":\"lo\\u0001ra1\",\"prompt\":\"a\"}";
  assert_int_equal(ot_serve_parse_completion(b, strlen(b), &pc, &c, &e), OT_ERR_INVALID);
  assert_string_equal(e.param, "model");
  b = "{\"model\":\"lora1\\\\u0000x\",\"prompt\":\"a\"}"; /* an escaped backslash, then text */
  assert_int_equal(ot_json_has_nul_escape(b, strlen(b)), 0);

  /* over HTTP, against the running server: the same body answers, and so does the next */
  const char *plain = "{\"prompt\":\"a\",\"max_tokens\":3,\"temperature\":0}";
  const char *hostile =
      "{\"prompt\":\"a\",\"max_tokens\":3,\"temperature\":0,\"stop\":\"\",\"s0\":\"x\",\"s1\":\"y\","
      "\"s2\":\"z\",\"s3\":\"w\",\"s4\":\"v\"}";
  http_res r1, r2;
  cJSON *j1 = post(plain, 200, &r1), *j2 = post(hostile, 200, &r2);
  const cJSON *c1 = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j1, "choices"), 0);
  const cJSON *c2 = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j2, "choices"), 0);
  assert_string_equal(str(c1, "text"), str(c2, "text"));
  assert_string_equal(str(c2, "finish_reason"), "length");
  cJSON_Delete(j1);
  cJSON_Delete(j2);
  free(r1.body);
  free(r2.body);
  b = "{\"model\":\"lora1\\u0000x\",\"prompt\":\"a\"}";
  expect_error(b, strlen(b), 400, NULL, NULL);
}

typedef struct {
  int k, p, ok;
} job;

static void *client(void *arg) {
  job *jb = arg;
  char *body = request_json(models[jb->k], prompts[jb->p], jb->k % 2);
  http_res res;
  http("POST", "/v1/completions", body, strlen(body), &res);
  char w[4 * GEN];
  want_text(jb->k, jb->p, w);
  if (jb->k % 2) { /* streamed: the text is in the deltas */
    char text[4096] = "";
    size_t tl = 0;
    char *save = NULL;
    for (char *ev = strtok_r(res.body, "\n", &save); ev; ev = strtok_r(NULL, "\n", &save)) {
      if (strncmp(ev, "data: {", 7) != 0) continue;
      cJSON *j = cJSON_Parse(ev + 6);
      const char *t = j ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(
                              cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0), "text"))
                        : NULL;
      if (t && tl + strlen(t) < sizeof text) {
        memcpy(text + tl, t, strlen(t));
        tl += strlen(t);
      }
      cJSON_Delete(j);
    }
    text[tl] = '\0';
    jb->ok = res.status == 200 && strcmp(text, w) == 0;
    if (!jb->ok) {
      printf("got  [%zu]:", tl);
      for (size_t i = 0; i < tl; i++) printf(" %02x", (unsigned char)text[i]);
      printf("\nwant [%zu]:", strlen(w));
      for (int i = 0; i < GEN; i++) printf(" %02x", (unsigned char)want[jb->k][jb->p][i]);
      printf("\n");
    }
  } else {
    cJSON *j = cJSON_Parse(res.body);
    const char *t = j ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(
                            cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0), "text"))
                      : NULL;
    jb->ok = res.status == 200 && t && strcmp(t, w) == 0;
    cJSON_Delete(j);
  }
  free(res.body);
  free(body);
  return NULL;
}

static void test_concurrent(void **state) {
  (void)state;
  enum { N = N_MODELS * N_PROMPTS };
  job jobs[N];
  pthread_t th[N];
  for (int i = 0; i < N; i++) {
    jobs[i] = (job){i % N_MODELS, i / N_MODELS, 0};
    assert_int_equal(pthread_create(&th[i], NULL, client, &jobs[i]), 0);
  }
  for (int i = 0; i < N; i++) pthread_join(th[i], NULL);
  for (int i = 0; i < N; i++)
    if (!jobs[i].ok)
      fail_msg("concurrent request %s / prompt %d got another text", models[jobs[i].k], jobs[i].p);
  ot_serve_stats st;
  ot_serve_get_stats(eng, &st);
  printf("engine: %llu steps, %llu rows, %llu tokens\n", (unsigned long long)st.steps,
         (unsigned long long)st.rows_computed, (unsigned long long)st.tokens_generated);
}

/* The tenants' API over the encrypted nng transport: GenerateRequest -> GenerateReply. */
static void test_rpc(void **state) {
  (void)state;
  ot_identity srv, dev;
  ot_access *acl = NULL;
  assert_int_equal(ot_identity_generate(&srv), 0);
  assert_int_equal(ot_identity_generate(&dev), 0);
  assert_int_equal(ot_access_new(&acl), 0);
  assert_int_equal(ot_access_allow(acl, dev.pk), 0);
  ot_serve_rpc rpc = {eng, tok, "tiny-base", -1, on_log, NULL};
  ot_server_config sc = {0};
  sc.url = "tcp://127.0.0.1:0";
  sc.id = &srv;
  sc.acl = &ot_access_memory_ops;
  sc.acl_self = acl;
  sc.n_workers = 4;
  sc.on_request = ot_serve_handle_request;
  sc.user = &rpc;
  ot_server *server = NULL;
  if (ot_server_start(&sc, &server)) fail_msg("server: %s", ot_error_detail());
  char url[64];
  snprintf(url, sizeof url, "tcp://127.0.0.1:%d", ot_server_port(server));
  ot_client_config cc = {0};
  cc.url = url;
  cc.id = &dev;
  cc.cloud_pk = srv.pk;
  cc.timeout_ms = 30000;
  ot_client *c = NULL;
  if (ot_client_open(&cc, &c)) fail_msg("client: %s", ot_error_detail());
  for (int k = 0; k < N_MODELS; k++) {
    Offtune__GenerateRequest q = OFFTUNE__GENERATE_REQUEST__INIT;
    q.adapter = (char *)models[k];
    q.prompt = (char *)prompts[1];
    q.has_max_tokens = 1;
    q.max_tokens = GEN;
    uint8_t buf[512], *rb = NULL;
    size_t n = offtune__generate_request__pack(&q, buf), rl = 0;
    if (ot_client_call(c, buf, n, &rb, &rl)) fail_msg("call: %s", ot_error_detail());
    Offtune__GenerateReply *r = offtune__generate_reply__unpack(NULL, rl, rb);
    assert_non_null(r);
    assert_int_equal(r->error_code, 0);
    assert_int_equal(r->n_token_ids, GEN);
    for (int i = 0; i < GEN; i++) assert_int_equal(r->token_ids[i], want[k][1][i]);
    assert_string_equal(r->finish_reason, "length");
    assert_int_equal(r->prompt_tokens, strlen(prompts[1]));
    offtune__generate_reply__free_unpacked(r, NULL);
    free(rb);
  }
  /* an unknown adapter is answered, not dropped */
  Offtune__GenerateRequest q = OFFTUNE__GENERATE_REQUEST__INIT;
  q.adapter = "nope";
  q.prompt = "Hi";
  uint8_t buf[256], *rb = NULL;
  size_t n = offtune__generate_request__pack(&q, buf), rl = 0;
  assert_int_equal(ot_client_call(c, buf, n, &rb, &rl), 0);
  Offtune__GenerateReply *r = offtune__generate_reply__unpack(NULL, rl, rb);
  assert_non_null(r);
  assert_int_equal(r->error_code, OT_ERR_NOTFOUND);
  printf("rpc error: %s\n", r->error);
  offtune__generate_reply__free_unpacked(r, NULL);
  free(rb);
  ot_client_close(c);
  ot_server_stop(server);
  ot_access_free(acl);
}

/* Text for JSON: well-formed UTF-8 kept, everything else one U+FFFD per byte. */
static void test_utf8(void **state) {
  (void)state;
  const struct {
    const char *in;
    size_t n;
    const char *out;
  } cases[] = {
      {"a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80z", 11, "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80z"},
      {"\xC3", 1, "\xEF\xBF\xBD"}, /* cut character */
      {"\xC3"
       "A",
       2,
       "\xEF\xBF\xBD"
       "A"},                                                                       /* missing continuation */
      {"\xA5", 1, "\xEF\xBF\xBD"},                                                 /* lone continuation */
      {"\xC0\xAF", 2, "\xEF\xBF\xBD\xEF\xBF\xBD"},                                 /* overlong */
      {"\xED\xA0\x80", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},                 /* surrogate */
      {"\xF4\x90\x80\x80", 4, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"}, /* > U+10FFFF */
      {"a\0b", 3,
       "a\xEF\xBF\xBD"
       "b"}, /* NUL */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char *o = NULL;
    size_t n = 0;
    assert_int_equal(ot_utf8_sanitize(cases[i].in, cases[i].n, &o, &n), 0);
    assert_int_equal(n, strlen(cases[i].out));
    assert_string_equal(o, cases[i].out);
    free(o);
  }
}

/* offtune-cloud serve-model end to end: usage errors, a request, a log line, SIGTERM exits 0. */
static void test_command(void **state) {
  (void)state;
  char out[8192], log[700];
  const char *bin_dir = ot_test_binary_dir();
  assert_int_equal(ot_test_run(out, sizeof out, "%s/cloud/offtune-cloud serve-model --help", bin_dir), 0);
  assert_non_null(strstr(out, "--adapters-dir"));
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s/cloud/offtune-cloud serve-model --http 127.0.0.1:0", bin_dir), 2);
  assert_non_null(strstr(out, "--model is required"));
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s/cloud/offtune-cloud serve-model --model %s/base --adapter bad", bin_dir,
                               dir),
                   2);
  /* a model that cannot load: a clear failure (this once crashed with a double free) */
  assert_int_equal(
      ot_test_run(out, sizeof out,
                  "%s/cloud/offtune-cloud serve-model --model %s/nonexistent/ --http 127.0.0.1:0", bin_dir,
                  dir),
      1);
  assert_non_null(strstr(out, "loading the model"));
  snprintf(log, sizeof log, "%s/serve.log", dir);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    char model[600], lora[620], exe[600];
    snprintf(exe, sizeof exe, "%s/cloud/offtune-cloud", bin_dir);
    snprintf(model, sizeof model, "%s/base", dir);
    snprintf(lora, sizeof lora, "mine=%s/lora2", dir);
    if (!freopen(log, "w", stderr)) _exit(99);
    execl(exe, exe, "serve-model", "--model", model, "--adapter", lora, "--adapters-dir", dir, "--http",
          "127.0.0.1:0", "--threads", "1", "--max-batch", "4", "--max-step-tokens", "64", (char *)NULL);
    _exit(98);
  }
  int saved = port, got = 0;
  for (int i = 0; i < 200 && !got; i++) {
    usleep(50000);
    FILE *f = fopen(log, "r");
    char line[1024];
    while (f && fgets(line, sizeof line, f)) {
      char *at = strstr(line, ", port ");
      if (at) got = atoi(at + 7);
    }
    if (f) fclose(f);
  }
  if (!got) fail_msg("serve-model did not report its port");
  port = got;
  char *body = request_json("mine", prompts[0], 0);
  http_res res;
  cJSON *j = post(body, 200, &res);
  char w[4 * GEN];
  want_text(4, 0, w);
  assert_string_equal(str(cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "choices"), 0), "text"), w);
  cJSON_Delete(j);
  free(res.body);
  free(body);
  http("GET", "/v1/models", "", 0, &res);
  assert_non_null(strstr(res.body, "\"mine\""));
  assert_non_null(strstr(res.body, "\"bf1\""));
  free(res.body);
  port = saved;
  kill(pid, SIGTERM);
  int st = 0;
  assert_int_equal(waitpid(pid, &st, 0), pid);
  assert_true(WIFEXITED(st));
  assert_int_equal(WEXITSTATUS(st), 0);
  FILE *f = fopen(log, "r");
  size_t n = fread(out, 1, sizeof out - 1, f);
  out[n] = '\0';
  fclose(f);
  assert_non_null(strstr(out, "model=mine prompts=1 prompt_tokens=19 completion_tokens=24 finish=length"));
  assert_non_null(strstr(out, "stopping"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_utf8),           cmocka_unit_test(test_completions),
      cmocka_unit_test(test_prompt_array),   cmocka_unit_test(test_stream),
      cmocka_unit_test(test_stream_prompts), cmocka_unit_test(test_models),
      cmocka_unit_test(test_errors),         cmocka_unit_test(test_stop),
      cmocka_unit_test(test_concurrent),     cmocka_unit_test(test_rpc),
      cmocka_unit_test(test_command),        cmocka_unit_test(test_hostile_stop),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
