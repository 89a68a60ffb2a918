/* A small HTTP/1.1 server on plain sockets, for the serving API (docs/serving.md, "The HTTP
 * server"). It replaces nng's supplemental HTTP server there, which has no read timeouts and no
 * connection caps and leaves unrouted bodies unread.
 *
 * One I/O thread runs an epoll loop: it accepts, reads and parses requests, answers what it can
 * itself (malformed HTTP, unknown routes, timeouts, caps: all as JSON errors in OpenAI's shape)
 * and hands every complete request (headers and the whole body, Content-Length or chunked) to
 * its route's handler. The handler runs on the I/O thread and must not block; it answers at once
 * or later from any thread through the request handle: a whole response, or a stream (begin,
 * writes, end). Requests on a connection are handled one at a time: the next one is parsed only
 * after the previous one is answered, so keep-alive and pipelining keep their order.
 *
 * Limits (ot_http_config, zero = default): request line + headers within header_timeout_ms of
 * the connection (first request) or of its first byte (later ones) and max_header bytes (431);
 * a body within body_timeout_ms (408) and max_body bytes (413); an idle keep-alive connection
 * closes after idle_timeout_ms; a client that does not read what is written is dropped after
 * write_timeout_ms without progress or max_pending_out bytes queued; max_conns_per_peer
 * connections per client address (over it: a 503 and an immediate close) and max_conns in all:
 * at that cap a new connection closes the one that has waited longest for its client's request
 * (idle, or a head or body still coming), and only when every connection has a request being
 * answered is the new one refused (503).
 * When accept runs out of descriptors, a reserve descriptor is given up to accept and close the
 * connection, so the loop never spins on EMFILE/ENFILE. */
#ifndef OT_HTTP_H
#define OT_HTTP_H

#include <stddef.h>
#include <stdint.h>

typedef struct ot_http_server ot_http_server;
/* One request, from its hand-off to the handler until it is answered. */
typedef struct ot_http_req ot_http_req;

typedef void (*ot_http_handler_fn)(void *user, ot_http_req *req);

typedef struct {
  const char *method; /* "GET", "POST", ... (exact, case-sensitive as HTTP says) */
  const char *path;   /* "/v1/models"; with prefix, any longer path starting with it */
  int prefix;
  ot_http_handler_fn fn;
  void *user;
} ot_http_route;

#define OT_HTTP_MAX_HEADER 16384
#define OT_HTTP_MAX_BODY (1 << 20)
#define OT_HTTP_HEADER_TIMEOUT_MS 10000
#define OT_HTTP_BODY_TIMEOUT_MS 30000
#define OT_HTTP_IDLE_TIMEOUT_MS 30000
#define OT_HTTP_WRITE_TIMEOUT_MS 30000
#define OT_HTTP_MAX_CONNS 256
#define OT_HTTP_MAX_CONNS_PER_PEER 32
#define OT_HTTP_MAX_PENDING_OUT (4 << 20)

typedef struct {
  const char *url;             /* "http://HOST:PORT" (HOST a name, an IPv4 address or [IPv6]); port 0 = any */
  const ot_http_route *routes; /* copied; the strings must outlive the server */
  int n_routes;
  size_t max_header;      /* request line + headers, bytes (16 KiB) */
  size_t max_body;        /* request body, bytes (1 MiB) */
  int header_timeout_ms;  /* 10 s */
  int body_timeout_ms;    /* 30 s */
  int idle_timeout_ms;    /* keep-alive wait for the next request (30 s) */
  int write_timeout_ms;   /* no write progress (30 s) */
  int max_conns;          /* open connections in all (256) */
  int max_conns_per_peer; /* open connections per client IP address (32) */
  size_t max_pending_out; /* bytes queued for one client (4 MiB) */
  /* Refusals and timeouts, at most one line per kind per 10 s; called on the I/O thread with
   * the server's lock held: it must not call back into the server. */
  void (*log)(void *user, const char *line);
  void *log_user;
} ot_http_config;

typedef struct {
  uint64_t accepted;    /* connections taken */
  uint64_t refused_cap; /* connections closed at once: over max_conns or max_conns_per_peer */
  uint64_t evicted;     /* waiting for their client's request, closed to make room at max_conns */
  uint64_t refused_fd;  /* connections dropped because descriptors ran out */
  uint64_t timeouts;    /* connections closed by a header, body, idle or write timeout */
  uint64_t requests;    /* requests parsed (errors answered by the server included) */
  int open;             /* connections open now */
} ot_http_stats;

int ot_http_start(const ot_http_config *cfg, ot_http_server **out);
/* The TCP port bound. */
int ot_http_port(const ot_http_server *s);
void ot_http_get_stats(ot_http_server *s, ot_http_stats *out);
/* Stops accepting, closes every connection (handlers of unanswered requests are told that the
 * client went away), then waits until every request handed out has been answered. */
void ot_http_stop(ot_http_server *s);

/* ---- the request (valid until it is answered) ------------------------------------------- */

const char *ot_http_req_method(const ot_http_req *r);
const char *ot_http_req_path(const ot_http_req *r);  /* without the query, not percent-decoded */
const char *ot_http_req_query(const ot_http_req *r); /* after '?'; "" if none */
/* The first header of that name (case-insensitive), NULL if none. */
const char *ot_http_req_header(const ot_http_req *r, const char *name);
const char *ot_http_req_body(const ot_http_req *r, size_t *len); /* NUL-terminated */
const char *ot_http_req_peer(const ot_http_req *r);              /* client address */

/* fn(arg) runs once, on the I/O thread, if the client goes away (closes, resets, stops
 * reading, or the server stops) before the request is answered. Returns 1 (and registers
 * nothing) if it is already gone. Answering waits for a running fn, so after the answer
 * returns fn is not running and never will: fn may use what the answer frees, and must not
 * itself wait for a lock held around an answer. */
int ot_http_on_gone(ot_http_req *r, void (*fn)(void *arg), void *arg);

/* ---- answers (any thread; each releases the handle) ---------------------------------------- */

/* The whole response. extra_headers: NULL or complete "Name: value\r\n" lines. Returns OT_OK,
 * or OT_ERR_IO when the client has gone (the answer is dropped). */
int ot_http_respond(ot_http_req *r, int status, const char *content_type, const char *extra_headers,
                    const void *body, size_t len);
/* {"error": {"message", "type", "param", "code"}} (OpenAI's shape); code and param may be NULL. */
int ot_http_respond_error(ot_http_req *r, int status, const char *type, const char *code, const char *param,
                          const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* A streamed response: chunked on a keep-alive HTTP/1.1 connection, otherwise delimited by the
 * close. begin and write do not release the handle; end does. write returns OT_ERR_IO once the
 * client has gone (or is dropped for not reading); the caller should stop producing then. */
int ot_http_stream_begin(ot_http_req *r, int status, const char *content_type, const char *extra_headers);
int ot_http_stream_write(ot_http_req *r, const void *data, size_t len);
void ot_http_stream_end(ot_http_req *r);

/* 1 if an address ("http://HOST:PORT" or "HOST:PORT") binds loopback only: 127.0.0.0/8, [::1],
 * localhost. */
int ot_http_url_loopback(const char *url);

/* JSON error body in OpenAI's shape (malloc'd, NUL-terminated), for those who answer by hand. */
char *ot_http_error_json(const char *message, const char *type, const char *code, const char *param);

#endif
