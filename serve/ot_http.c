#include "ot_http.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ot_error.h"

#define MAX_HEADERS 100
#define READ_CHUNK 16384
#define READS_PER_EVENT 4      /* then other connections get their turn */
#define CHUNK_LINE_MAX 1024    /* a chunk-size line with its extensions */
#define LINGER_MS 2000         /* after our last byte: read what the client still sends (below) */
#define CLOSE_WRITE_MS 2000    /* an error answer that closes the connection gets this long */
#define PAUSE_OUT (256u << 10) /* no new request is read while this much output waits */
#define ACCEPT_BACKOFF_MS 100  /* accept failing without a way to shed the connection */
#define LOG_EVERY_MS 10000
#define MAX_WAIT_MS 1000

/* Closing a socket with unread input makes the kernel send a reset, which can destroy the answer
 * before the client reads it (a 413 to a client still sending its body). So a connection that
 * ends first writes its answer, shuts down its sending side, and reads (discarding) until the
 * client closes or LINGER_MS pass: "lingering close", as Apache and nginx do. */
enum { ST_HEAD, ST_BODY, ST_CHUNK_SIZE, ST_CHUNK_DATA, ST_CHUNK_CRLF, ST_TRAILER, ST_WAIT, ST_LINGER };
enum { LOG_CAP, LOG_FD, LOG_TIMEOUT, LOG_WRITE, LOG_EVICT, LOG_KINDS };

typedef struct conn conn;

struct ot_http_req {
  ot_http_server *srv;
  conn *c;  /* NULL once the client is gone or the request is answered */
  int refs; /* the connection's, the handler's, a pending gone call's */
  char *head;
  const char *method, *path, *query;
  int minor, keep_alive, is_head;
  int n_hdr;
  const char *hname[MAX_HEADERS], *hval[MAX_HEADERS];
  char *body;
  size_t body_len, body_cap;
  char peer[64];
  int handed; /* with the handler, not yet answered */
  int streaming, chunked;
  int gone;
  void (*gone_fn)(void *);
  void *gone_arg;
  int in_gone; /* gone_fn running on the I/O thread */
};

struct conn {
  conn *prev, *next;
  int fd;
  unsigned char addr[16];
  int alen;
  char peer[64];
  int st;
  int first;     /* no request finished yet: the header clock runs from the connection */
  int got_bytes; /* bytes of the current request seen */
  int64_t t_state;
  char *in;
  size_t in_len, in_off, in_cap, scan;
  size_t remaining, trailer;
  ot_http_req *req;
  char *out;
  size_t out_len, out_off, out_cap;
  int64_t t_write;  /* last write progress while output waits */
  int64_t close_by; /* closing: the last moment (0 = none yet) */
  int close_after;  /* shut the sending side down once the output is written */
  int shut, eof, dead, kick;
  uint32_t events;
};

typedef struct {
  ot_http_req *r;
  const ot_http_route *route;
} todo_item;

struct ot_http_server {
  ot_http_config cfg;
  ot_http_route *routes;
  int lfd, efd, ep, reserve, port;
  pthread_t th, io_tid;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  conn *conns;
  int n_conns;
  int stopping, wake_pending;
  int handed; /* requests with handlers, not answered */
  int64_t accept_paused_until;
  ot_http_stats st;
  int64_t log_t[LOG_KINDS];
  uint64_t log_n[LOG_KINDS];
  char refuse503[512];
  size_t refuse503_len;
  /* I/O thread only */
  todo_item *todo;
  int n_todo, cap_todo;
  ot_http_req **gone;
  int n_gone, cap_gone;
  char tag_listen, tag_wake;
};

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char *reason(int status) {
  switch (status) {
  case 100: return "Continue";
  case 200: return "OK";
  case 201: return "Created";
  case 204: return "No Content";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 411: return "Length Required";
  case 413: return "Content Too Large";
  case 415: return "Unsupported Media Type";
  case 417: return "Expectation Failed";
  case 422: return "Unprocessable Content";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 503: return "Service Unavailable";
  case 505: return "HTTP Version Not Supported";
  default: return status < 300 ? "OK" : status < 500 ? "Bad Request" : "Server Error";
  }
}

static const char *err_type(int status) { return status < 500 ? "invalid_request_error" : "server_error"; }

char *ot_http_error_json(const char *message, const char *type, const char *code, const char *param) {
  cJSON *j = cJSON_CreateObject(), *e = j ? cJSON_AddObjectToObject(j, "error") : NULL;
  char *s = NULL;
  if (e) {
    cJSON_AddStringToObject(e, "message", message ? message : "");
    cJSON_AddStringToObject(e, "type", type ? type : "invalid_request_error");
    if (param)
      cJSON_AddStringToObject(e, "param", param);
    else
      cJSON_AddNullToObject(e, "param");
    if (code)
      cJSON_AddStringToObject(e, "code", code);
    else
      cJSON_AddNullToObject(e, "code");
    s = cJSON_PrintUnformatted(j);
  }
  cJSON_Delete(j);
  return s;
}

static void note(ot_http_server *s, int kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note(ot_http_server *s, int kind, const char *fmt, ...) {
  if (!s->cfg.log) return;
  int64_t now = now_ms();
  if (s->log_t[kind] && now - s->log_t[kind] < LOG_EVERY_MS) {
    s->log_n[kind]++;
    return;
  }
  char line[600];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (s->log_n[kind] && n > 0 && (size_t)n < sizeof line)
    snprintf(line + n, sizeof line - (size_t)n, " (%llu more since the last such line)",
             (unsigned long long)s->log_n[kind]);
  s->log_t[kind] = now;
  s->log_n[kind] = 0;
  s->cfg.log(s->cfg.log_user, line);
}

/* ---- requests and connections (lock held) --------------------------------------------------- */

static void req_release(ot_http_req *r) {
  if (--r->refs > 0) return;
  free(r->head);
  free(r->body);
  free(r);
}

static int on_io_thread(const ot_http_server *s) { return pthread_equal(pthread_self(), s->io_tid); }

static void wake_locked(ot_http_server *s) {
  if (s->wake_pending) return;
  s->wake_pending = 1;
  uint64_t one = 1;
  if (write(s->efd, &one, sizeof one) < 0) { /* the counter is full: a wake is pending anyway */
  }
}

static size_t out_pending(const conn *c) { return c->out_len - c->out_off; }

static void set_events(ot_http_server *s, conn *c) {
  uint32_t ev = 0;
  if (!c->dead) {
    if (!c->eof && (c->st == ST_LINGER || (c->st != ST_WAIT && out_pending(c) < PAUSE_OUT)))
      ev |= EPOLLIN | EPOLLRDHUP;
    else if (!c->eof && c->st == ST_WAIT)
      ev |= EPOLLRDHUP; /* the client leaving before its answer: reported, never read */
    if (out_pending(c)) ev |= EPOLLOUT;
  }
  if (ev == c->events) return;
  struct epoll_event e = {.events = ev, .data.ptr = c};
  if (epoll_ctl(s->ep, EPOLL_CTL_MOD, c->fd, &e) == 0) c->events = ev;
}

static void mark_dead(ot_http_server *s, conn *c) {
  c->dead = 1;
  set_events(s, c);
  wake_locked(s);
}

static int out_add(ot_http_server *s, conn *c, const void *p, size_t n) {
  if (c->dead) return -1;
  if (c->out_off && c->out_off == c->out_len) c->out_off = c->out_len = 0;
  if (c->out_len + n > c->out_cap) {
    if (c->out_off) { /* reuse the written front first */
      memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
      c->out_len -= c->out_off;
      c->out_off = 0;
    }
    if (c->out_len + n > c->out_cap) {
      size_t cap = c->out_cap ? c->out_cap : 4096;
      while (cap < c->out_len + n) cap *= 2;
      char *b = realloc(c->out, cap);
      if (!b) {
        mark_dead(s, c);
        return -1;
      }
      c->out = b;
      c->out_cap = cap;
    }
  }
  if (!out_pending(c)) c->t_write = now_ms();
  memcpy(c->out + c->out_len, p, n);
  c->out_len += n;
  return 0;
}

static int out_fmt(ot_http_server *s, conn *c, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int out_fmt(ot_http_server *s, conn *c, const char *fmt, ...) {
  char small[1024], *p = small;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(small, sizeof small, fmt, ap);
  va_end(ap);
  if (n < 0) return -1;
  if ((size_t)n >= sizeof small) {
    p = malloc((size_t)n + 1);
    if (!p) return -1;
    va_start(ap, fmt);
    vsnprintf(p, (size_t)n + 1, fmt, ap);
    va_end(ap);
  }
  int rc = out_add(s, c, p, (size_t)n);
  if (p != small) free(p);
  return rc;
}

/* Writes what it can without blocking (any thread). */
static void flush_locked(ot_http_server *s, conn *c) {
  while (!c->dead && out_pending(c)) {
    ssize_t n = send(c->fd, c->out + c->out_off, out_pending(c), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      c->out_off += (size_t)n;
      c->t_write = now_ms();
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      break;
    } else {
      mark_dead(s, c);
      return;
    }
  }
  if (out_pending(c) && !(c->events & EPOLLOUT))
    wake_locked(s); /* blocked: the I/O thread's wait must now end by the write deadline */
  if (!out_pending(c)) {
    c->out_off = c->out_len = 0;
    if (c->out_cap > (64u << 10)) { /* a long stream is over: give its buffer back */
      free(c->out);
      c->out = NULL;
      c->out_cap = 0;
    }
    if (c->st == ST_HEAD && c->in_len > c->in_off && !c->kick) { /* reading was paused for output */
      c->kick = 1;
      wake_locked(s);
    }
    if (c->st == ST_LINGER && c->close_after && !c->shut) {
      shutdown(c->fd, SHUT_WR);
      c->shut = 1;
      int64_t by = now_ms() + LINGER_MS;
      if (!c->close_by || by < c->close_by) c->close_by = by;
      if (c->eof) mark_dead(s, c); /* the client already closed its side: nothing to wait for */
    }
  }
  set_events(s, c);
}

/* The connection's request is answered: c is free for the next one, or closes. */
static void detach(conn *c, ot_http_req *r) {
  c->req = NULL;
  r->c = NULL;
  req_release(r);
}

static void next_request(ot_http_server *s, conn *c, int keep) {
  if (keep && !s->stopping) {
    c->st = ST_HEAD;
    c->first = 0;
    c->got_bytes = 0;
    c->t_state = now_ms();
    c->kick = 1; /* input may already hold the next request */
    wake_locked(s);
  } else {
    c->st = ST_LINGER;
    c->close_after = 1;
  }
  flush_locked(s, c);
}

/* The whole answer to c's current request r, then on to the next one. */
static void answer_locked(ot_http_server *s, conn *c, ot_http_req *r, int status, const char *ctype,
                          const char *extra, const void *body, size_t len) {
  int keep = r->keep_alive && !s->stopping;
  out_fmt(s, c, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s%s\r\n", status,
          reason(status), ctype ? ctype : "application/octet-stream", len,
          keep ? "" : "Connection: close\r\n", extra ? extra : "");
  if (!r->is_head && len) out_add(s, c, body, len);
  detach(c, r);
  next_request(s, c, keep);
}

/* The server's own JSON error, then a lingering close. */
static void refuse(ot_http_server *s, conn *c, int status, const char *extra, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void refuse(ot_http_server *s, conn *c, int status, const char *extra, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  int is_head = c->req && c->req->is_head;
  if (c->req) {
    ot_http_req *r = c->req;
    c->req = NULL;
    r->c = NULL;
    req_release(r);
  }
  char *body = ot_http_error_json(msg, err_type(status), NULL, NULL);
  size_t len = body ? strlen(body) : 0;
  out_fmt(s, c,
          "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n%sConnection: "
          "close\r\n\r\n",
          status, reason(status), len, extra ? extra : "");
  if (body && !is_head) out_add(s, c, body, len);
  free(body);
  c->st = ST_LINGER;
  c->close_after = 1;
  c->close_by = now_ms() + CLOSE_WRITE_MS;
  flush_locked(s, c);
}

static void close_conn(ot_http_server *s, conn *c) {
  epoll_ctl(s->ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  if (c->prev)
    c->prev->next = c->next;
  else
    s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  s->n_conns--;
  ot_http_req *r = c->req;
  if (r) {
    c->req = NULL;
    r->c = NULL;
    if (r->handed) {
      r->gone = 1;
      if (r->gone_fn) {
        ot_http_req **g = s->gone;
        if (s->n_gone == s->cap_gone) {
          int cap = s->cap_gone ? 2 * s->cap_gone : 16;
          g = realloc(s->gone, (size_t)cap * sizeof *g);
          if (g) {
            s->gone = g;
            s->cap_gone = cap;
          }
        }
        if (s->n_gone < s->cap_gone) {
          r->in_gone = 1;
          r->refs++;
          s->gone[s->n_gone++] = r;
        }
      }
    }
    req_release(r);
  }
  free(c->in);
  free(c->out);
  free(c);
}

/* ---- parsing (I/O thread, lock held) -------------------------------------------------------- */

static int is_tchar(unsigned char ch) {
  return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
         (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static int token_ok(const char *t) {
  if (!*t) return 0;
  for (; *t; t++)
    if (!is_tchar((unsigned char)*t)) return 0;
  return 1;
}

/* Whether the comma-separated header value v lists token t (case-insensitive). */
static int has_token(const char *v, const char *t) {
  size_t tl = strlen(t);
  while (v && *v) {
    while (*v == ' ' || *v == '\t' || *v == ',') v++;
    const char *e = v;
    while (*e && *e != ',') e++;
    const char *te = e;
    while (te > v && (te[-1] == ' ' || te[-1] == '\t')) te--;
    if ((size_t)(te - v) == tl && strncasecmp(v, t, tl) == 0) return 1;
    v = e;
  }
  return 0;
}

const char *ot_http_req_header(const ot_http_req *r, const char *name) {
  for (int i = 0; i < r->n_hdr; i++)
    if (strcasecmp(r->hname[i], name) == 0) return r->hval[i];
  return NULL;
}

/* Splits the head (NUL-terminated copy) in place; 0 or the status to refuse it with. */
static int parse_head(ot_http_req *r, size_t len, char *msg, size_t cap) {
  char *p = r->head;
  if (memchr(p, '\0', len)) return snprintf(msg, cap, "NUL byte in the request head"), 400;
  char *lines[MAX_HEADERS + 2];
  int n = 0;
  for (char *q = p; *q;) {
    char *eol = strchr(q, '\n');
    if (!eol) break; /* cannot happen: the head ends with an empty line */
    *eol = '\0';
    if (eol > q && eol[-1] == '\r') eol[-1] = '\0';
    if (strchr(q, '\r')) return snprintf(msg, cap, "bare CR in the request head"), 400;
    if (!*q) break; /* the empty line */
    if (n == MAX_HEADERS + 1) return snprintf(msg, cap, "more than %d header fields", MAX_HEADERS), 431;
    lines[n++] = q;
    q = eol + 1;
  }
  if (!n) return snprintf(msg, cap, "empty request"), 400;
  char *line = lines[0], *sp1 = strchr(line, ' '), *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
  if (!sp1 || !sp2 || strchr(sp2 + 1, ' '))
    return snprintf(msg, cap, "malformed request line (want METHOD SP TARGET SP HTTP/1.1)"), 400;
  *sp1 = *sp2 = '\0';
  char *target = sp1 + 1, *version = sp2 + 1;
  if (!token_ok(line)) return snprintf(msg, cap, "malformed method"), 400;
  if (target[0] != '/') return snprintf(msg, cap, "the request target must be a path starting with '/'"), 400;
  for (const unsigned char *t = (const unsigned char *)target; *t; t++)
    if (*t <= 0x20 || *t == 0x7f) return snprintf(msg, cap, "control character in the request target"), 400;
  int major = 0, minor = 0;
  char tail = 0;
  if (strcmp(version, "HTTP/1.1") == 0)
    r->minor = 1;
  else if (strcmp(version, "HTTP/1.0") == 0)
    r->minor = 0;
  else if (sscanf(version, "HTTP/%d.%d%c", &major, &minor, &tail) == 2)
    return snprintf(msg, cap, "HTTP version %d.%d is not supported (HTTP/1.1 is)", major, minor), 505;
  else
    return snprintf(msg, cap, "malformed HTTP version"), 400;
  r->method = line;
  char *qm = strchr(target, '?');
  r->query = "";
  if (qm) {
    *qm = '\0';
    r->query = qm + 1;
  }
  r->path = target;
  for (int i = 1; i < n; i++) {
    char *h = lines[i];
    if (*h == ' ' || *h == '\t') return snprintf(msg, cap, "obsolete header line folding"), 400;
    char *colon = strchr(h, ':');
    if (!colon) return snprintf(msg, cap, "malformed header line"), 400;
    *colon = '\0';
    if (!token_ok(h)) return snprintf(msg, cap, "malformed header name"), 400;
    char *v = colon + 1, *e = v + strlen(v);
    while (*v == ' ' || *v == '\t') v++;
    while (e > v && (e[-1] == ' ' || e[-1] == '\t')) e--;
    *e = '\0';
    for (const unsigned char *t = (const unsigned char *)v; *t; t++)
      if ((*t < 0x20 && *t != '\t') || *t == 0x7f)
        return snprintf(msg, cap, "control character in header '%.64s'", h), 400;
    r->hname[r->n_hdr] = h;
    r->hval[r->n_hdr++] = v;
  }
  r->is_head = strcmp(r->method, "HEAD") == 0;
  const char *conn_h = ot_http_req_header(r, "Connection");
  r->keep_alive = r->minor == 1 && !(conn_h && has_token(conn_h, "close"));
  return 0;
}

/* Content-Length / Transfer-Encoding / Expect: 0 or the refusal's status. *cl = -1: chunked. */
static int body_framing(const ot_http_req *r, long long *cl, char *msg, size_t cap) {
  *cl = 0;
  int have_cl = 0, have_te = 0;
  for (int i = 0; i < r->n_hdr; i++) {
    if (strcasecmp(r->hname[i], "Content-Length") == 0) {
      const char *v = r->hval[i];
      size_t n = strlen(v);
      if (!n || n > 18 || strspn(v, "0123456789") != n)
        return snprintf(msg, cap, "malformed Content-Length"), 400;
      long long x = strtoll(v, NULL, 10);
      if (have_cl && x != *cl) return snprintf(msg, cap, "conflicting Content-Length fields"), 400;
      *cl = x;
      have_cl = 1;
    } else if (strcasecmp(r->hname[i], "Transfer-Encoding") == 0) {
      if (have_te || strcasecmp(r->hval[i], "chunked") != 0)
        return snprintf(msg, cap, "Transfer-Encoding '%.64s' is not supported (only chunked)", r->hval[i]),
               501;
      have_te = 1;
    }
  }
  if (have_te && have_cl)
    return snprintf(msg, cap, "both Transfer-Encoding and Content-Length (refused: request smuggling)"), 400;
  if (have_te && r->minor == 0) return snprintf(msg, cap, "Transfer-Encoding in an HTTP/1.0 request"), 400;
  if (have_te) *cl = -1;
  const char *ex = ot_http_req_header(r, "Expect");
  if (ex && strcasecmp(ex, "100-continue") != 0)
    return snprintf(msg, cap, "Expect '%.64s' is not supported", ex), 417;
  return 0;
}

static int body_add(ot_http_server *s, conn *c, const char *p, size_t n) {
  ot_http_req *r = c->req;
  if (r->body_len + n + 1 > r->body_cap) {
    size_t cap = r->body_cap ? r->body_cap : 4096;
    while (cap < r->body_len + n + 1) cap *= 2;
    char *b = realloc(r->body, cap);
    if (!b) {
      refuse(s, c, 500, NULL, "out of memory");
      return -1;
    }
    r->body = b;
    r->body_cap = cap;
  }
  memcpy(r->body + r->body_len, p, n);
  r->body_len += n;
  return 0;
}

static void push_todo(ot_http_server *s, ot_http_req *r, const ot_http_route *route) {
  if (s->n_todo == s->cap_todo) {
    int cap = s->cap_todo ? 2 * s->cap_todo : 16;
    todo_item *t = realloc(s->todo, (size_t)cap * sizeof *t);
    if (!t) return;
    s->todo = t;
    s->cap_todo = cap;
  }
  s->todo[s->n_todo++] = (todo_item){r, route};
}

/* A whole request: to its route's handler, or answered here (404, 405). */
static void complete(ot_http_server *s, conn *c) {
  ot_http_req *r = c->req;
  if (r->body_len) {
    if (body_add(s, c, "", 0)) return; /* room for the terminating NUL */
    r->body[r->body_len] = '\0';
  }
  const ot_http_route *match = NULL;
  char allow[256] = "";
  size_t al = 0;
  for (int i = 0; i < s->cfg.n_routes && !match; i++) {
    const ot_http_route *rt = &s->routes[i];
    size_t pl = strlen(rt->path);
    int hit =
        rt->prefix ? strncmp(r->path, rt->path, pl) == 0 && r->path[pl] : strcmp(r->path, rt->path) == 0;
    if (!hit) continue;
    if (strcmp(rt->method, r->method) == 0) {
      match = rt;
    } else if (!strstr(allow, rt->method)) {
      int w = snprintf(allow + al, sizeof allow - al, "%s%s", al ? ", " : "", rt->method);
      if (w > 0 && (size_t)w < sizeof allow - al) al += (size_t)w;
    }
  }
  if (match) {
    c->st = ST_WAIT;
    r->handed = 1;
    r->refs++;
    s->handed++;
    push_todo(s, r, match);
    set_events(s, c);
    return;
  }
  char msg[600], extra[300] = "";
  int status = al ? 405 : 404;
  if (al) {
    snprintf(msg, sizeof msg, "Method %.32s is not allowed on %.200s (allowed: %s)", r->method, r->path,
             allow);
    snprintf(extra, sizeof extra, "Allow: %s\r\n", allow);
  } else {
    snprintf(msg, sizeof msg, "Invalid URL (%.32s %.200s)", r->method, r->path);
  }
  char *body = ot_http_error_json(msg, "invalid_request_error", NULL, NULL);
  answer_locked(s, c, r, status, "application/json", extra, body, body ? strlen(body) : 0);
  free(body);
}

static const char *find_head_end(const char *p, size_t from, size_t len) {
  for (size_t i = from; i < len; i++) {
    if (p[i] != '\n') continue;
    if (i + 1 < len && p[i + 1] == '\n') return p + i + 2;
    if (i + 2 < len && p[i + 1] == '\r' && p[i + 2] == '\n') return p + i + 3;
  }
  return NULL;
}

static void start_head(ot_http_server *s, conn *c, size_t hlen) {
  char msg[256];
  ot_http_req *r = calloc(1, sizeof *r);
  char *head = r ? malloc(hlen + 1) : NULL;
  if (!head) {
    free(r);
    refuse(s, c, 500, NULL, "out of memory");
    return;
  }
  memcpy(head, c->in + c->in_off, hlen);
  head[hlen] = '\0';
  c->in_off += hlen;
  c->scan = c->in_off;
  r->srv = s;
  r->head = head;
  r->refs = 1;
  r->c = c;
  snprintf(r->peer, sizeof r->peer, "%s", c->peer);
  c->req = r;
  s->st.requests++;
  int status = parse_head(r, hlen, msg, sizeof msg);
  long long cl = 0;
  if (!status) status = body_framing(r, &cl, msg, sizeof msg);
  if (status) {
    refuse(s, c, status, NULL, "%s", msg);
    return;
  }
  if (cl > 0 && (unsigned long long)cl > s->cfg.max_body) {
    refuse(s, c, 413, NULL, "request body of %lld bytes is over the limit of %zu bytes", cl, s->cfg.max_body);
    return;
  }
  c->t_state = now_ms();
  if (cl == 0) {
    complete(s, c);
    return;
  }
  c->st = cl < 0 ? ST_CHUNK_SIZE : ST_BODY;
  c->remaining = cl < 0 ? 0 : (size_t)cl;
  c->trailer = 0;
  if (r->minor == 1 && ot_http_req_header(r, "Expect")) {
    out_fmt(s, c, "HTTP/1.1 100 Continue\r\n\r\n");
    flush_locked(s, c);
  }
}

/* Consumes what input holds; stops when it needs more, or the request is handed out. */
static void parse(ot_http_server *s, conn *c) {
  while (!c->dead) {
    size_t avail = c->in_len - c->in_off;
    const char *p = c->in + c->in_off;
    switch (c->st) {
    case ST_HEAD: {
      if (out_pending(c) >= PAUSE_OUT) return;
      while (!c->got_bytes && avail && (*p == '\r' || *p == '\n')) { /* empty lines before a request */
        c->in_off++;
        p++;
        avail--;
      }
      if (!avail) {
        c->in_off = c->in_len = c->scan = 0;
        return;
      }
      if (!c->got_bytes) {
        c->got_bytes = 1;
        if (!c->first) c->t_state = now_ms();
      }
      size_t from = c->scan > c->in_off + 2 ? c->scan - 2 : c->in_off;
      const char *end = find_head_end(c->in, from, c->in_len);
      if (!end) {
        c->scan = c->in_len;
        if (avail >= s->cfg.max_header)
          refuse(s, c, 431, NULL, "request line and headers over the limit of %zu bytes", s->cfg.max_header);
        return;
      }
      size_t hlen = (size_t)(end - p);
      if (hlen > s->cfg.max_header) {
        refuse(s, c, 431, NULL, "request line and headers over the limit of %zu bytes", s->cfg.max_header);
        return;
      }
      start_head(s, c, hlen);
      break;
    }
    case ST_BODY:
    case ST_CHUNK_DATA: {
      if (!avail) return;
      size_t take = avail < c->remaining ? avail : c->remaining;
      if (body_add(s, c, p, take)) return;
      c->in_off += take;
      c->remaining -= take;
      if (c->remaining) return;
      if (c->st == ST_BODY)
        complete(s, c);
      else
        c->st = ST_CHUNK_CRLF;
      break;
    }
    case ST_CHUNK_SIZE: {
      const char *nl = memchr(p, '\n', avail);
      if (!nl) {
        if (avail > CHUNK_LINE_MAX) refuse(s, c, 400, NULL, "chunk-size line too long");
        return;
      }
      size_t digits = 0;
      unsigned long long size = 0;
      while (digits < (size_t)(nl - p) &&
             ((p[digits] >= '0' && p[digits] <= '9') || (p[digits] >= 'a' && p[digits] <= 'f') ||
              (p[digits] >= 'A' && p[digits] <= 'F'))) {
        if (digits == 15) break;
        char ch = p[digits];
        size = size * 16 + (unsigned)(ch <= '9' ? ch - '0' : (ch | 0x20) - 'a' + 10);
        digits++;
      }
      char after = p + digits < nl ? p[digits] : '\n';
      if (!digits || !(after == ';' || after == ' ' || after == '\t' || after == '\r' || after == '\n') ||
          (after == '\r' && p + digits + 1 != nl)) {
        refuse(s, c, 400, NULL, "malformed chunk size");
        return;
      }
      c->in_off += (size_t)(nl - p) + 1;
      if (size == 0) {
        c->st = ST_TRAILER;
      } else if (c->req->body_len + size > s->cfg.max_body) {
        refuse(s, c, 413, NULL, "request body over the limit of %zu bytes", s->cfg.max_body);
        return;
      } else {
        c->remaining = (size_t)size;
        c->st = ST_CHUNK_DATA;
      }
      break;
    }
    case ST_CHUNK_CRLF: {
      if (!avail) return;
      if (p[0] == '\n') {
        c->in_off++;
      } else if (p[0] == '\r') {
        if (avail < 2) return;
        if (p[1] != '\n') {
          refuse(s, c, 400, NULL, "malformed chunk (no CRLF after the data)");
          return;
        }
        c->in_off += 2;
      } else {
        refuse(s, c, 400, NULL, "malformed chunk (no CRLF after the data)");
        return;
      }
      c->st = ST_CHUNK_SIZE;
      break;
    }
    case ST_TRAILER: {
      const char *nl = memchr(p, '\n', avail);
      if (!nl) {
        if (c->trailer + avail > s->cfg.max_header) refuse(s, c, 431, NULL, "trailer fields over the limit");
        return;
      }
      size_t ll = (size_t)(nl - p);
      c->in_off += ll + 1;
      c->trailer += ll + 1;
      if (ll == 0 || (ll == 1 && p[0] == '\r')) {
        complete(s, c);
      } else if (c->trailer > s->cfg.max_header) {
        refuse(s, c, 431, NULL, "trailer fields over the limit");
        return;
      }
      break;
    }
    default: return; /* ST_WAIT, ST_LINGER */
    }
  }
}

static void do_read(ot_http_server *s, conn *c) {
  for (int i = 0; i < READS_PER_EVENT && !c->dead && !c->eof; i++) {
    ssize_t n;
    if (c->st == ST_WAIT) break;
    if (c->st == ST_LINGER) {
      char sink[4096];
      n = recv(c->fd, sink, sizeof sink, 0);
    } else {
      if (c->st == ST_HEAD && out_pending(c) >= PAUSE_OUT) break;
      if (c->in_off == c->in_len) c->in_off = c->in_len = c->scan = 0;
      if (c->in_len == c->in_cap && c->in_off) { /* move the unparsed rest to the front */
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->scan = c->scan > c->in_off ? c->scan - c->in_off : 0;
        c->in_off = 0;
      }
      if (c->in_len == c->in_cap) break; /* the parser refused it (431) or waits for room */
      n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
    }
    if (n > 0) {
      if (c->st != ST_LINGER) {
        c->in_len += (size_t)n;
        parse(s, c);
      }
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n < 0) {
      mark_dead(s, c);
      break;
    }
    /* EOF: nothing more will come; what is owed for an answered request is still written */
    c->eof = 1;
    if (out_pending(c) && (c->st == ST_LINGER || c->st == ST_HEAD)) {
      c->st = ST_LINGER;
      c->close_after = 1;
    } else {
      mark_dead(s, c);
    }
  }
  set_events(s, c);
}

/* ---- accept ---------------------------------------------------------------------------------- */

static void pause_accept(ot_http_server *s, int64_t until) {
  s->accept_paused_until = until;
  struct epoll_event e = {.events = 0, .data.ptr = &s->tag_listen};
  epoll_ctl(s->ep, EPOLL_CTL_MOD, s->lfd, &e);
}

static void peer_key(const struct sockaddr_storage *ss, unsigned char *key, int *klen, char *text,
                     size_t cap) {
  *klen = 0;
  snprintf(text, cap, "?");
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
    memcpy(key, &a->sin_addr, 4);
    *klen = 4;
    inet_ntop(AF_INET, &a->sin_addr, text, (socklen_t)cap);
  } else if (ss->ss_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
    if (IN6_IS_ADDR_V4MAPPED(&a->sin6_addr)) { /* the same client whichever way it comes */
      memcpy(key, a->sin6_addr.s6_addr + 12, 4);
      *klen = 4;
      inet_ntop(AF_INET, key, text, (socklen_t)cap);
    } else {
      memcpy(key, &a->sin6_addr, 16);
      *klen = 16;
      inet_ntop(AF_INET6, &a->sin6_addr, text, (socklen_t)cap);
    }
  }
}

static void do_accept(ot_http_server *s) {
  for (int i = 0; i < 64; i++) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int fd = accept4(s->lfd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int e = errno;
      if (e == EINTR || e == ECONNABORTED || e == EPROTO) continue;
      if (e == EAGAIN || e == EWOULDBLOCK) return;
      if ((e == EMFILE || e == ENFILE) && s->reserve >= 0) {
        /* shed the connection with the reserve descriptor, so that it does not stay ready forever */
        close(s->reserve);
        s->reserve = -1;
        int f2 = accept(s->lfd, NULL, NULL);
        if (f2 >= 0) {
          close(f2);
          s->st.refused_fd++;
        }
        s->reserve = open("/dev/null", O_RDONLY | O_CLOEXEC);
        note(s, LOG_FD, "HTTP: out of file descriptors (%s): connection dropped", strerror(e));
        if (f2 >= 0 && s->reserve >= 0) continue;
      } else {
        note(s, LOG_FD, "HTTP: accept failed: %s; pausing accept for %d ms", strerror(e), ACCEPT_BACKOFF_MS);
      }
      pause_accept(s, now_ms() + ACCEPT_BACKOFF_MS);
      return;
    }
    s->st.accepted++;
    unsigned char key[16];
    int klen;
    char text[64];
    peer_key(&ss, key, &klen, text, sizeof text);
    int same = 0;
    conn *oldest = NULL; /* the connection that has waited longest for its client's request */
    for (conn *c = s->conns; c; c = c->next) {
      if (c->alen == klen && memcmp(c->addr, key, (size_t)klen) == 0) same++;
      if (c->st != ST_WAIT && c->st != ST_LINGER && !c->dead && !out_pending(c) &&
          (!oldest || c->t_state < oldest->t_state))
        oldest = c;
    }
    int over_peer = same >= s->cfg.max_conns_per_peer;
    if (!over_peer && s->n_conns >= s->cfg.max_conns && oldest) {
      /* full: idle and slow senders make room, so that they cannot lock new clients out */
      note(s, LOG_EVICT, "HTTP: at the connection cap (%d): closed the longest-waiting connection (%s)",
           s->cfg.max_conns, oldest->peer);
      close_conn(s, oldest);
      s->st.evicted++;
    }
    int over_all = s->n_conns >= s->cfg.max_conns;
    conn *c = over_all || over_peer ? NULL : calloc(1, sizeof *c);
    if (c) {
      c->in_cap = s->cfg.max_header + READ_CHUNK;
      c->in = malloc(c->in_cap);
    }
    if (!c || !c->in) {
      if (c) {
        free(c);
        note(s, LOG_CAP, "HTTP: out of memory for a connection from %s", text);
      } else {
        note(s, LOG_CAP, "HTTP: connection from %s refused: %s (%d)", text,
             over_all ? "over the connection cap" : "over the per-address cap",
             over_all ? s->cfg.max_conns : s->cfg.max_conns_per_peer);
      }
      /* best effort, never blocks: the descriptor is what must go */
      if (send(fd, s->refuse503, s->refuse503_len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
      }
      close(fd);
      s->st.refused_cap++;
      continue;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* SSE chunks go out as made */
    c->fd = fd;
    memcpy(c->addr, key, (size_t)klen);
    c->alen = klen;
    snprintf(c->peer, sizeof c->peer, "%s", text);
    c->st = ST_HEAD;
    c->first = 1;
    c->t_state = now_ms();
    c->events = EPOLLIN | EPOLLRDHUP;
    struct epoll_event ev = {.events = c->events, .data.ptr = c};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
      close(fd);
      free(c->in);
      free(c);
      continue;
    }
    c->next = s->conns;
    if (s->conns) s->conns->prev = c;
    s->conns = c;
    s->n_conns++;
  }
}

/* ---- the loop ---------------------------------------------------------------------------------- */

static int64_t deadline(const ot_http_server *s, const conn *c) {
  int64_t d = INT64_MAX;
  if (out_pending(c)) d = c->t_write + s->cfg.write_timeout_ms;
  if (c->close_by && c->close_by < d) d = c->close_by;
  int64_t t = INT64_MAX;
  switch (c->st) {
  case ST_HEAD:
    t = c->t_state + (c->first || c->got_bytes ? s->cfg.header_timeout_ms : s->cfg.idle_timeout_ms);
    break;
  case ST_BODY:
  case ST_CHUNK_SIZE:
  case ST_CHUNK_DATA:
  case ST_CHUNK_CRLF:
  case ST_TRAILER: t = c->t_state + s->cfg.body_timeout_ms; break;
  default: break;
  }
  return t < d ? t : d;
}

static void on_timeout(ot_http_server *s, conn *c, int64_t now) {
  if (c->st != ST_LINGER) s->st.timeouts++;
  if (out_pending(c) &&
      (now >= c->t_write + s->cfg.write_timeout_ms || (c->close_by && now >= c->close_by))) {
    if (c->st != ST_LINGER)
      note(s, LOG_WRITE, "HTTP: %s dropped: it did not read its answer for %d ms", c->peer,
           s->cfg.write_timeout_ms);
    mark_dead(s, c);
  } else if (c->st == ST_HEAD && c->got_bytes) {
    note(s, LOG_TIMEOUT, "HTTP: %s: request head not complete within %d ms (408)", c->peer,
         s->cfg.header_timeout_ms);
    refuse(s, c, 408, NULL, "request line and headers not complete within %d ms", s->cfg.header_timeout_ms);
  } else if (c->st == ST_HEAD) {
    if (c->first)
      note(s, LOG_TIMEOUT, "HTTP: %s sent no request within %d ms", c->peer, s->cfg.header_timeout_ms);
    mark_dead(s, c);
  } else if (c->st == ST_LINGER) {
    mark_dead(s, c);
  } else {
    note(s, LOG_TIMEOUT, "HTTP: %s: request body not complete within %d ms (408)", c->peer,
         s->cfg.body_timeout_ms);
    refuse(s, c, 408, NULL, "request body not complete within %d ms", s->cfg.body_timeout_ms);
  }
}

/* Closes dead connections, parses after answers, applies deadlines; the wait until the next. */
static int sweep(ot_http_server *s) {
  int64_t now = now_ms(), next = now + MAX_WAIT_MS;
  if (s->accept_paused_until) {
    if (now >= s->accept_paused_until) {
      s->accept_paused_until = 0;
      if (s->reserve < 0) s->reserve = open("/dev/null", O_RDONLY | O_CLOEXEC);
      struct epoll_event e = {.events = EPOLLIN, .data.ptr = &s->tag_listen};
      epoll_ctl(s->ep, EPOLL_CTL_MOD, s->lfd, &e);
    } else if (s->accept_paused_until < next) {
      next = s->accept_paused_until;
    }
  }
  for (conn *c = s->conns, *nx; c; c = nx) {
    nx = c->next;
    if (c->kick && !c->dead) {
      c->kick = 0;
      parse(s, c);
      set_events(s, c);
    }
    if (!c->dead) {
      int64_t d = deadline(s, c);
      if (now >= d) on_timeout(s, c, now);
      if (!c->dead) {
        d = deadline(s, c);
        if (d < next) next = d;
      }
    }
    if (c->dead) close_conn(s, c);
  }
  return next <= now ? 0 : (int)(next - now);
}

/* Gone calls, then handlers, without the lock (handlers may answer at once). */
static void run_callbacks(ot_http_server *s) {
  while (s->n_gone || s->n_todo) {
    int ng = s->n_gone, nt = s->n_todo;
    ot_http_req **gone = NULL;
    todo_item *todo = NULL;
    if (ng) {
      gone = s->gone;
      s->gone = NULL;
      s->n_gone = s->cap_gone = 0;
    }
    if (nt) {
      todo = s->todo;
      s->todo = NULL;
      s->n_todo = s->cap_todo = 0;
    }
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < ng; i++) gone[i]->gone_fn(gone[i]->gone_arg);
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < ng; i++) {
      gone[i]->in_gone = 0;
      gone[i]->gone_fn = NULL;
      req_release(gone[i]);
    }
    if (ng) pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < nt; i++) todo[i].route->fn(todo[i].route->user, todo[i].r);
    pthread_mutex_lock(&s->mu);
    free(gone);
    free(todo);
  }
}

static void *io_main(void *arg) {
  ot_http_server *s = arg;
  struct epoll_event evs[64];
  pthread_mutex_lock(&s->mu);
  s->io_tid = pthread_self();
  for (;;) {
    int wait = sweep(s);
    if (s->n_gone || s->n_todo) {
      run_callbacks(s);
      continue;
    }
    if (s->stopping) break;
    pthread_mutex_unlock(&s->mu);
    int n = epoll_wait(s->ep, evs, 64, wait);
    pthread_mutex_lock(&s->mu);
    if (s->stopping) break;
    int accept_now = 0;
    for (int i = 0; i < n; i++) {
      void *p = evs[i].data.ptr;
      uint32_t ev = evs[i].events;
      if (p == &s->tag_wake) {
        uint64_t v;
        if (read(s->efd, &v, sizeof v) < 0) { /* nothing to read: another wake took it */
        }
        s->wake_pending = 0;
      } else if (p == &s->tag_listen) {
        accept_now = 1;
      } else {
        conn *c = p;
        if (c->dead) continue;
        if (ev & (EPOLLERR | EPOLLHUP)) {
          mark_dead(s, c);
          continue;
        }
        if (ev & EPOLLOUT) flush_locked(s, c);
        if (c->dead) continue;
        if (ev & EPOLLIN)
          do_read(s, c);
        else if ((ev & EPOLLRDHUP) && c->st == ST_WAIT)
          mark_dead(s, c); /* the client left before its answer */
        else if (ev & EPOLLRDHUP)
          do_read(s, c);
      }
    }
    if (accept_now && !s->accept_paused_until) do_accept(s);
  }
  /* stopping: every connection goes; handlers still owing answers hear of it */
  while (s->conns) close_conn(s, s->conns);
  run_callbacks(s);
  pthread_mutex_unlock(&s->mu);
  return NULL;
}

/* ---- start / stop ------------------------------------------------------------------------------ */

static int parse_url(const char *url, char *host, size_t hcap, char *port, size_t pcap) {
  const char *p = url;
  if (strncmp(p, "http://", 7) == 0)
    p += 7;
  else if (strstr(p, "://"))
    return ot_error(OT_ERR_INVALID, "HTTP server: '%s' is not an http:// URL", url);
  const char *hs = p, *he;
  if (*p == '[') {
    hs = p + 1;
    he = strchr(hs, ']');
    if (!he) return ot_error(OT_ERR_INVALID, "HTTP server: malformed IPv6 address in '%s'", url);
    p = he + 1;
  } else {
    he = p + strcspn(p, ":/");
    p = he;
  }
  if ((size_t)(he - hs) >= hcap)
    return ot_error(OT_ERR_INVALID, "HTTP server: host name too long in '%s'", url);
  memcpy(host, hs, (size_t)(he - hs));
  host[he - hs] = '\0';
  if (*p == ':') {
    p++;
    size_t n = strspn(p, "0123456789");
    if (!n || n >= pcap || n > 5 || (p[n] && p[n] != '/') || atoi(p) > 65535)
      return ot_error(OT_ERR_INVALID, "HTTP server: bad port in '%s'", url);
    memcpy(port, p, n);
    port[n] = '\0';
  } else if (!*p || *p == '/') {
    snprintf(port, pcap, "80");
  } else {
    return ot_error(OT_ERR_INVALID, "HTTP server: malformed URL '%s'", url);
  }
  return OT_OK;
}

static int listen_on(const char *url, int *out_fd, int *out_port) {
  char host[256], port[8];
  int rc = parse_url(url, host, sizeof host, port, sizeof port);
  if (rc) return rc;
  struct addrinfo hints = {0}, *ai = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  int g = getaddrinfo(*host ? host : NULL, port, &hints, &ai);
  if (g) return ot_error(OT_ERR_IO, "HTTP server on %s: %s", url, gai_strerror(g));
  int fd = -1, err = 0;
  for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      err = errno;
      continue;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 512) != 0) {
      err = errno;
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(ai);
  if (fd < 0) return ot_error(OT_ERR_IO, "HTTP server on %s: %s", url, strerror(err));
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  getsockname(fd, (struct sockaddr *)&ss, &sl);
  *out_port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                       : ntohs(((struct sockaddr_in *)&ss)->sin_port);
  *out_fd = fd;
  return OT_OK;
}

int ot_http_start(const ot_http_config *cfg, ot_http_server **out) {
  if (!cfg || !cfg->url || !out || cfg->n_routes < 0 || (cfg->n_routes && !cfg->routes))
    return ot_error(OT_ERR_INVALID, "ot_http_start: NULL argument");
  for (int i = 0; i < cfg->n_routes; i++)
    if (!cfg->routes[i].method || !cfg->routes[i].path || !cfg->routes[i].fn)
      return ot_error(OT_ERR_INVALID, "ot_http_start: route %d is incomplete", i);
  ot_http_server *s = calloc(1, sizeof *s);
  if (!s) return ot_error(OT_ERR_NOMEM, "cannot allocate the HTTP server");
  s->cfg = *cfg;
  ot_http_config *c = &s->cfg;
  if (!c->max_header) c->max_header = OT_HTTP_MAX_HEADER;
  if (!c->max_body) c->max_body = OT_HTTP_MAX_BODY;
  if (c->header_timeout_ms <= 0) c->header_timeout_ms = OT_HTTP_HEADER_TIMEOUT_MS;
  if (c->body_timeout_ms <= 0) c->body_timeout_ms = OT_HTTP_BODY_TIMEOUT_MS;
  if (c->idle_timeout_ms <= 0) c->idle_timeout_ms = OT_HTTP_IDLE_TIMEOUT_MS;
  if (c->write_timeout_ms <= 0) c->write_timeout_ms = OT_HTTP_WRITE_TIMEOUT_MS;
  if (c->max_conns <= 0) c->max_conns = OT_HTTP_MAX_CONNS;
  if (c->max_conns_per_peer <= 0) c->max_conns_per_peer = OT_HTTP_MAX_CONNS_PER_PEER;
  if (!c->max_pending_out) c->max_pending_out = OT_HTTP_MAX_PENDING_OUT;
  s->lfd = s->efd = s->ep = s->reserve = -1;
  s->routes = c->n_routes ? malloc((size_t)c->n_routes * sizeof *s->routes) : NULL;
  int rc = c->n_routes && !s->routes ? ot_error(OT_ERR_NOMEM, "cannot allocate") : OT_OK;
  if (s->routes) memcpy(s->routes, cfg->routes, (size_t)c->n_routes * sizeof *s->routes);
  char *b503 =
      ot_http_error_json("over capacity: too many connections; try again later", "server_error", NULL, NULL);
  if (b503)
    snprintf(s->refuse503, sizeof s->refuse503,
             "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
             "Connection: close\r\nRetry-After: 1\r\n\r\n%s",
             strlen(b503), b503);
  free(b503);
  s->refuse503_len = strlen(s->refuse503);
  if (rc == OT_OK) rc = listen_on(c->url, &s->lfd, &s->port);
  if (rc == OT_OK) {
    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    s->ep = epoll_create1(EPOLL_CLOEXEC);
    s->reserve = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (s->efd < 0 || s->ep < 0 || s->reserve < 0)
      rc = ot_error(OT_ERR_IO, "HTTP server: cannot create its event loop: %s", strerror(errno));
  }
  if (rc == OT_OK) {
    struct epoll_event el = {.events = EPOLLIN, .data.ptr = &s->tag_listen};
    struct epoll_event ew = {.events = EPOLLIN, .data.ptr = &s->tag_wake};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->lfd, &el) || epoll_ctl(s->ep, EPOLL_CTL_ADD, s->efd, &ew))
      rc = ot_error(OT_ERR_IO, "HTTP server: epoll: %s", strerror(errno));
  }
  if (rc == OT_OK) {
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    if (pthread_create(&s->th, NULL, io_main, s) != 0) {
      rc = ot_error(OT_ERR_IO, "HTTP server: cannot start its thread");
      pthread_mutex_destroy(&s->mu);
      pthread_cond_destroy(&s->cv);
    }
  }
  if (rc) {
    if (s->lfd >= 0) close(s->lfd);
    if (s->efd >= 0) close(s->efd);
    if (s->ep >= 0) close(s->ep);
    if (s->reserve >= 0) close(s->reserve);
    free(s->routes);
    free(s);
    return rc;
  }
  *out = s;
  return OT_OK;
}

int ot_http_port(const ot_http_server *s) { return s->port; }

void ot_http_get_stats(ot_http_server *s, ot_http_stats *out) {
  pthread_mutex_lock(&s->mu);
  *out = s->st;
  out->open = s->n_conns;
  pthread_mutex_unlock(&s->mu);
}

void ot_http_stop(ot_http_server *s) {
  if (!s) return;
  pthread_mutex_lock(&s->mu);
  s->stopping = 1;
  wake_locked(s);
  pthread_mutex_unlock(&s->mu);
  pthread_join(s->th, NULL);
  pthread_mutex_lock(&s->mu);
  while (s->handed > 0) pthread_cond_wait(&s->cv, &s->mu);
  pthread_mutex_unlock(&s->mu);
  close(s->lfd);
  close(s->efd);
  close(s->ep);
  if (s->reserve >= 0) close(s->reserve);
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  free(s->todo);
  free(s->gone);
  free(s->routes);
  free(s);
}

/* ---- the request's side ---------------------------------------------------------------------- */

const char *ot_http_req_method(const ot_http_req *r) { return r->method; }
const char *ot_http_req_path(const ot_http_req *r) { return r->path; }
const char *ot_http_req_query(const ot_http_req *r) { return r->query; }
const char *ot_http_req_peer(const ot_http_req *r) { return r->peer; }
const char *ot_http_req_body(const ot_http_req *r, size_t *len) {
  if (len) *len = r->body_len;
  return r->body ? r->body : "";
}

int ot_http_on_gone(ot_http_req *r, void (*fn)(void *arg), void *arg) {
  ot_http_server *s = r->srv;
  pthread_mutex_lock(&s->mu);
  int gone = !r->c || r->gone;
  if (!gone) {
    r->gone_fn = fn;
    r->gone_arg = arg;
  }
  pthread_mutex_unlock(&s->mu);
  return gone;
}

/* The handler's part of an answer is over (lock held): waits out a running gone call. */
static void handler_done(ot_http_server *s, ot_http_req *r) {
  r->gone_fn = NULL;
  r->handed = 0;
  if (--s->handed == 0) pthread_cond_broadcast(&s->cv);
  req_release(r);
}

static void wait_gone(ot_http_server *s, ot_http_req *r) {
  while (r->in_gone && !on_io_thread(s)) pthread_cond_wait(&s->cv, &s->mu);
}

/* Ends r's stream on its connection (lock held, r->c set). */
static void end_stream_locked(ot_http_server *s, ot_http_req *r) {
  conn *c = r->c;
  if (r->chunked) out_add(s, c, "0\r\n\r\n", 5);
  int keep = r->chunked;
  detach(c, r);
  next_request(s, c, keep);
}

int ot_http_respond(ot_http_req *r, int status, const char *content_type, const char *extra_headers,
                    const void *body, size_t len) {
  ot_http_server *s = r->srv;
  pthread_mutex_lock(&s->mu);
  wait_gone(s, r);
  int rc = OT_OK;
  if (!r->handed) {
    rc = ot_error(OT_ERR_INVALID, "HTTP: the request was already answered");
  } else if (!r->c) {
    rc = ot_error(OT_ERR_IO, "HTTP: the client has gone");
  } else if (r->streaming) { /* a misuse: end the stream rather than leave the connection hanging */
    end_stream_locked(s, r);
    rc = ot_error(OT_ERR_INVALID, "HTTP: the request is being streamed");
  } else {
    answer_locked(s, r->c, r, status, content_type, extra_headers, body, len);
  }
  if (r->handed) handler_done(s, r);
  pthread_mutex_unlock(&s->mu);
  return rc;
}

int ot_http_respond_error(ot_http_req *r, int status, const char *type, const char *code, const char *param,
                          const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  char *body = ot_http_error_json(msg, type ? type : err_type(status), code, param);
  int rc = ot_http_respond(r, body ? status : 500, "application/json", NULL, body ? body : "",
                           body ? strlen(body) : 0);
  free(body);
  return rc;
}

int ot_http_stream_begin(ot_http_req *r, int status, const char *content_type, const char *extra_headers) {
  ot_http_server *s = r->srv;
  pthread_mutex_lock(&s->mu);
  int rc = OT_OK;
  if (!r->handed || r->streaming) {
    rc = ot_error(OT_ERR_INVALID, "HTTP: the stream was already begun or answered");
  } else if (!r->c) {
    rc = ot_error(OT_ERR_IO, "HTTP: the client has gone");
  } else {
    r->streaming = 1;
    r->chunked = r->keep_alive && !s->stopping;
    out_fmt(s, r->c, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%s\r\n", status, reason(status),
            content_type ? content_type : "application/octet-stream",
            r->chunked ? "Transfer-Encoding: chunked\r\n" : "Connection: close\r\n",
            extra_headers ? extra_headers : "");
    flush_locked(s, r->c);
  }
  pthread_mutex_unlock(&s->mu);
  return rc;
}

int ot_http_stream_write(ot_http_req *r, const void *data, size_t len) {
  ot_http_server *s = r->srv;
  pthread_mutex_lock(&s->mu);
  int rc = OT_OK;
  conn *c = r->c;
  if (!r->streaming) {
    rc = ot_error(OT_ERR_INVALID, "HTTP: write before the stream began");
  } else if (!c || c->dead) {
    rc = ot_error(OT_ERR_IO, "HTTP: the client has gone");
  } else if (len && !r->is_head) { /* an empty chunk would end the stream */
    if (r->chunked) out_fmt(s, c, "%zx\r\n", len);
    out_add(s, c, data, len);
    if (r->chunked) out_add(s, c, "\r\n", 2);
    if (out_pending(c) > s->cfg.max_pending_out) {
      note(s, LOG_WRITE, "HTTP: %s dropped: %zu bytes of its stream unread", c->peer, out_pending(c));
      mark_dead(s, c);
    } else {
      flush_locked(s, c);
    }
    if (c->dead) rc = ot_error(OT_ERR_IO, "HTTP: the client has gone");
  }
  pthread_mutex_unlock(&s->mu);
  return rc;
}

void ot_http_stream_end(ot_http_req *r) {
  ot_http_server *s = r->srv;
  pthread_mutex_lock(&s->mu);
  wait_gone(s, r);
  if (r->handed) {
    if (r->c && !r->streaming) {
      char *body = ot_http_error_json("the stream ended before it began", "server_error", NULL, NULL);
      answer_locked(s, r->c, r, 500, "application/json", NULL, body, body ? strlen(body) : 0);
      free(body);
    } else if (r->c) {
      end_stream_locked(s, r);
    }
    handler_done(s, r);
  }
  pthread_mutex_unlock(&s->mu);
}

int ot_http_url_loopback(const char *url) {
  if (strncmp(url, "http://", 7) == 0) url += 7;
  return strncmp(url, "127.", 4) == 0 || strncmp(url, "localhost:", 10) == 0 ||
         strncmp(url, "[::1]:", 6) == 0;
}
