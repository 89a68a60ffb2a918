/* libFuzzer harness: raw bytes from a client into the serving API's HTTP/1.1 server
 * (cloud/ot_http.c: request line, headers, Content-Length and chunked bodies, pipelining,
 * 100-continue). Its parser has no entry point without a connection, so this one goes through
 * a real one: the server runs once on 127.0.0.1 (short timeouts), and each input is written to
 * a fresh connection, which is then half-closed and read to its end.
 *
 * Every byte the server sends back must be HTTP responses (a status line first), and the server
 * must still answer a well-formed request afterwards. Slower than the in-process harnesses
 * (a connection per input); the server's own thread counts in the coverage. */
#include "ot_error.h"
#include "ot_http.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ot_http_server *srv;
static int port;

/* The body's length back as JSON: the body arrived whole. */
static void on_completions(void *user, ot_http_req *r) {
  (void)user;
  size_t len = 0;
  const char *body = ot_http_req_body(r, &len);
  if (!body || body[len] != '\0') abort(); /* handed over NUL-terminated */
  char out[64];
  int n = snprintf(out, sizeof out, "{\"len\": %zu}", len);
  ot_http_respond(r, 200, "application/json", NULL, out, (size_t)n);
}

static void on_models(void *user, ot_http_req *r) {
  (void)user;
  if (!ot_http_req_path(r) || !ot_http_req_query(r) || !ot_http_req_method(r)) abort();
  (void)ot_http_req_header(r, "Host");
  ot_http_respond(r, 200, "application/json", NULL, "{\"data\": []}", 12);
}

/* A streamed answer (chunked on keep-alive, close-delimited otherwise). */
static void on_stream(void *user, ot_http_req *r) {
  (void)user;
  if (ot_http_stream_begin(r, 200, "text/event-stream", NULL) == OT_OK) {
    ot_http_stream_write(r, "data: 1\n\n", 9);
    ot_http_stream_write(r, "data: [DONE]\n\n", 14);
  }
  ot_http_stream_end(r);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  signal(SIGPIPE, SIG_IGN);
  static const ot_http_route routes[] = {
      {"POST", "/v1/completions", 0, on_completions, NULL},
      {"GET", "/v1/models", 0, on_models, NULL},
      {"GET", "/v1/models/", 1, on_models, NULL}, /* prefix: longer paths only */
      {"POST", "/stream", 0, on_stream, NULL},
  };
  ot_http_config c = {.url = "http://127.0.0.1:0",
                      .routes = routes,
                      .n_routes = 4,
                      .max_body = 64 << 10,
                      .header_timeout_ms = 300,
                      .body_timeout_ms = 300,
                      .idle_timeout_ms = 300,
                      .write_timeout_ms = 300};
  if (ot_http_start(&c, &srv) != OT_OK) {
    fprintf(stderr, "fuzz_http_server: %s\n", ot_error_detail());
    abort();
  }
  port = ot_http_port(srv);
  return 0;
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Writes in[n] to a new connection, half-closes it and reads until the server closes (or 3 s).
 * Returns the bytes read (malloc'd) in *out. */
static size_t exchange(const uint8_t *in, size_t n, char **out) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0) abort();
  /* thousands of connections a second would reuse (source port, server port) pairs still in
   * TIME_WAIT, and such a connect fails: the source address turns over 127.0.0.1..254 */
  static unsigned turn;
  struct sockaddr_in src = {.sin_family = AF_INET};
  src.sin_addr.s_addr = htonl(INADDR_LOOPBACK + turn++ % 254);
  if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0) abort();
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0 && errno != EINPROGRESS) abort();
  size_t cap = 1 << 16, got = 0, sent = 0;
  char *buf = malloc(cap);
  if (!buf) abort();
  int shut = 0;
  int64_t deadline = now_ms() + 3000;
  for (;;) {
    if (sent == n && !shut) {
      shutdown(fd, SHUT_WR);
      shut = 1;
    }
    struct pollfd p = {fd, (short)(POLLIN | (shut ? 0 : POLLOUT)), 0};
    int left = (int)(deadline - now_ms());
    if (left <= 0 || poll(&p, 1, left) <= 0) break; /* the server keeps it open: not an error here */
    if (p.revents & POLLOUT) {
      ssize_t w = send(fd, in + sent, n - sent, MSG_NOSIGNAL);
      if (w > 0) sent += (size_t)w;
      if (w < 0 && errno != EAGAIN) sent = n; /* closed by the server: stop writing */
    }
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      if (got == cap) {
        cap *= 2;
        char *nb = realloc(buf, cap);
        if (!nb) abort();
        buf = nb;
      }
      ssize_t r = recv(fd, buf + got, cap - got, 0);
      if (r == 0 || (r < 0 && errno != EAGAIN)) break;
      if (r > 0) got += (size_t)r;
    }
  }
  close(fd);
  *out = buf;
  return got;
}

static int status_line(const char *s, size_t n) {
  if (n < 13 || (memcmp(s, "HTTP/1.1 ", 9) != 0 && memcmp(s, "HTTP/1.0 ", 9) != 0)) return 0;
  for (int i = 9; i < 12; i++)
    if (s[i] < '0' || s[i] > '9') return 0;
  return s[12] == ' ';
}

static int open_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  int n = 0;
  if (!d) return 0;
  while (readdir(d)) n++;
  closedir(d);
  return n;
}

static void report(const char *what, const char *resp, size_t n) {
  ot_http_stats st;
  ot_http_get_stats(srv, &st);
  fprintf(stderr,
          "fuzz_http_server: %s (%zu bytes: %.*s); server: %llu accepted, %llu refused at a cap, %llu for "
          "want of "
          "descriptors, %llu timeouts, %d open; %d descriptors in the process\n",
          what, n, (int)(n < 200 ? n : 200), resp ? resp : "", (unsigned long long)st.accepted,
          (unsigned long long)st.refused_cap, (unsigned long long)st.refused_fd,
          (unsigned long long)st.timeouts, st.open, open_fds());
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static unsigned runs;
  char *resp = NULL;
  size_t n = exchange(data, size, &resp);
  if (n && !status_line(resp, n)) abort(); /* whatever comes back starts as a response */
  free(resp);
  /* still serving */
  static const char ok[] = "GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  n = exchange((const uint8_t *)ok, sizeof ok - 1, &resp);
  for (int retry = 0; retry < 3 && n == 0; retry++) { /* a connect lost to the network stack */
    free(resp);
    n = exchange((const uint8_t *)ok, sizeof ok - 1, &resp);
  }
  if (!status_line(resp, n) || memcmp(resp + 9, "200", 3) != 0) {
    report("no answer after the input", resp, n);
    abort();
  }
  free(resp);
  /* connections are capped (256): more descriptors than that is a leak */
  if (++runs % 256 == 0 && open_fds() > 256 + 64) {
    report("descriptors leak", NULL, 0);
    abort();
  }
  return 0;
}
