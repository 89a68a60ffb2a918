/* nng transport: REQ/REP, the cloud as server, devices as clients.
 *
 * Server: one REP socket with n_contexts contexts, each with its own aio. The aio
 * callbacks only move messages: a received request is queued for a pool of worker
 * threads, which decrypt, handle and reply. NNG_OPT_RECVMAXSZ is set before
 * listening. Sessions live in a table keyed by session id (not by connection), so a
 * device that reconnects carries on; a retransmitted request (same lane and seq, e.g.
 * after a reconnect) gets the cached reply instead of being processed twice.
 *
 * Client: one REQ socket with one context per lane; the dial reconnects in the
 * background; every request has a timeout and is retried with exponential backoff;
 * an unknown or expired session leads to a fresh handshake (the rekey).
 *
 * URLs: tcp://host:port for real use, ipc:// and inproc:// for tests. */
#ifndef OT_TRANSPORT_H
#define OT_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

#include "ot_access.h"
#include "ot_envelope.h"
#include "ot_identity.h"
#include "ot_transfer.h"

/* Where a tensor comes from: read_at gives len bytes at off, either by filling buf
 * (chunk bytes, owned by the caller) or by pointing *data at memory it owns. A source
 * served to fetches is read from several worker threads at once (disjoint ranges).
 * stamp: optional, nonzero names this exact content (e.g. from size, mtime, inode):
 * a server computes a stamped source's digest once and reuses it for every fetch of
 * the same (name, size, stamp, chunk size); 0: the digest is computed per fetch. */
typedef struct {
  int (*read_at)(void *self, uint64_t off, size_t len, uint8_t *buf, const uint8_t **data);
  void *self;
  uint64_t stamp;
} ot_source;

/* A file as a source (pread; stamp from device, inode, size and mtime). */
int ot_file_source_open(const char *path, ot_source *src, uint64_t *size);
void ot_file_source_close(ot_source *src);
/* The transfer digest (ot_transfer_digest) of a source at a chunk size, in one pass:
 * what a download of it announces, e.g. for a manifest that devices check with
 * ot_fetch_opts.expect_digest (at the chunk size the server serves: fetch_chunk). */
int ot_source_digest(const ot_source *src, uint64_t size, uint32_t chunk, uint8_t out[32]);

#define OT_TRANSFER_IDLE_DEFAULT 600 /* seconds */

typedef struct {
  const char *url;
  const ot_identity *id;
  const ot_access_ops *acl;
  void *acl_self;
  int n_contexts;        /* concurrent requests in flight (default 64) */
  int n_workers;         /* worker threads (default 2) */
  uint32_t lanes;        /* lanes offered per session (default 8) */
  uint32_t ttl_seconds;  /* session lifetime (default 3600) */
  size_t max_msg;        /* largest accepted message (default OT_MSG_MAX_DEFAULT) */
  uint64_t max_transfer; /* largest accepted transfer (default 16 GiB) */
  int max_sessions;      /* sessions, pending handshakes included (default 4096) */
  int max_transfers;     /* unfinished transfers (default 1024) */
  uint32_t
      transfer_idle_seconds; /* unfinished transfers are dropped after (default OT_TRANSFER_IDLE_DEFAULT) */
  /* Handshakes begun and not finished (default max_sessions / 4, at most 1024). When full,
   * or when the table is, the oldest is dropped: a flood of ClientHellos then costs an honest
   * device at most a retry, never a lock-out. */
  int max_pending;
  int max_open_per_peer; /* uploads and downloads one device may hold open at once (default 16) */
  /* ClientHellos accepted per second from one source address (an IPv6 /64 counts as one),
   * with a burst; over it they are refused before any cryptography. 0 = default (20/s,
   * burst 200), < 0 = no limit. */
  double hello_rate;
  int hello_burst;
  /* Connections (nng pipes) held at once: in all (default half the descriptor limit, at
   * most 4096) and from one address (default 128; an IPv6 /64 counts as one). Over a cap a
   * new connection is closed at once, so idle connections cannot use up the descriptors
   * that honest devices, files and the HTTP API need. */
  int max_conns;
  int max_conns_per_addr;
  /* Application requests (type OT_MSG_APP); runs on a worker thread. */
  int (*on_request)(void *user, const uint8_t peer[32], const uint8_t *body, size_t len, uint8_t **reply,
                    size_t *reply_len);
  /* A new transfer: give it a sink (or refuse). */
  int (*on_transfer_open)(void *user, const uint8_t peer[32], const char *name, uint64_t size, ot_sink *sink);
  /* The transfer ended: committed (digest checked) or not. `sink` is the one opened;
   * its self pointer is still valid only for sinks whose commit/abort keep it
   * (memory sinks), which the callee then frees. */
  void (*on_transfer_end)(void *user, const uint8_t peer[32], const char *name, int committed, ot_sink *sink);
  /* A device asks to download `name`: give a source and its size, or refuse (return an
   * error; the refusal text goes to the device). Called on a worker thread. */
  int (*on_fetch_open)(void *user, const uint8_t peer[32], const char *name, ot_source *src, uint64_t *size);
  /* The server is done with a source opened by on_fetch_open (after the transfer or on
   * expiry, i.e. transfer_idle_seconds idle, or at ot_server_stop). */
  void (*on_fetch_close)(void *user, ot_source *src);
  uint32_t fetch_chunk; /* largest chunk served to fetches (default 1 MiB; also limited by max_msg) */
  /* One line per refusal and per session event. Called from worker threads. */
  void (*log)(void *user, const char *line);
  void *user;
} ot_server_config;

typedef struct {
  uint64_t handshakes, refusals, requests, chunks, transfers_committed, retransmits;
  uint64_t fetches_opened, fetch_chunks, digests_computed;
  uint64_t handshakes_evicted; /* unfinished handshakes dropped to make room (max_pending) */
  uint64_t hellos_limited;     /* ClientHellos refused by the per-address rate */
  uint64_t peer_limited;       /* uploads or downloads refused by max_open_per_peer */
  uint64_t conns_refused;      /* connections closed by max_conns / max_conns_per_addr */
} ot_server_stats;

typedef struct ot_server ot_server;
int ot_server_start(const ot_server_config *cfg, ot_server **out);
/* The TCP port actually bound (for tcp://127.0.0.1:0), else 0. */
int ot_server_port(ot_server *s);
void ot_server_get_stats(ot_server *s, ot_server_stats *out);
void ot_server_stop(ot_server *s);

typedef struct {
  const char *url;
  const ot_identity *id;
  const uint8_t *cloud_pk;       /* pinned key, or */
  const char *cloud_fingerprint; /* pinned fingerprint */
  const char *enrol_token;       /* optional, used by the first handshake */
  int timeout_ms;                /* per attempt (default 10000) */
  int retries;                   /* extra attempts (0: default 4; negative: none) */
  int backoff_ms;                /* first backoff (default 50), doubling, max 2 s */
  size_t max_msg;                /* default OT_MSG_MAX_DEFAULT */
  uint32_t version;              /* 0: OT_PROTOCOL_VERSION (tests) */
  int no_aesgcm;                 /* XChaCha20-Poly1305 even where AES-NI is present */
} ot_client_config;

/* One operation at a time per client: ot_client_call, ot_client_send* and
 * ot_client_fetch* use lane 0 (and more lanes for their window), so they must not run
 * concurrently on the same ot_client; open one client per thread instead. */
typedef struct ot_client ot_client;
/* Dials (reconnecting in the background) and runs the handshake. */
int ot_client_open(const ot_client_config *cfg, ot_client **out);
void ot_client_close(ot_client *c);
/* An application request/reply. */
int ot_client_call(ot_client *c, const uint8_t *body, size_t len, uint8_t **reply, size_t *reply_len);

typedef struct {
  const uint8_t *transfer_id; /* 16 bytes to resume a transfer; NULL: a fresh random id */
  uint32_t chunk;             /* default 1 MiB */
  int window;                 /* chunks in flight (lanes used), default 4 */
  uint64_t stop_after;        /* test hook: stop (as if dropped) after this many chunks; 0 = no */
  /* out */
  uint8_t id_out[16];
  uint64_t resumed_from; /* chunks the receiver already held */
  uint64_t sent;         /* chunks sent by this call */
  /* optional: called after each chunk the receiver acknowledged (from the lane threads,
   * one call at a time), e.g. for a progress bar */
  void (*progress)(void *arg, uint64_t done_bytes, uint64_t total_bytes);
  void *progress_arg;
} ot_send_opts;
/* Sends a tensor in chunks; returns OT_OK once the receiver verified and committed it. */
int ot_client_send(ot_client *c, const char *name, const uint8_t *data, uint64_t size, ot_send_opts *opts);
int ot_client_send_source(ot_client *c, const char *name, ot_source src, uint64_t size, ot_send_opts *opts);
/* Sends a file with pread: the sender holds window x chunk bytes, whatever the size. */
int ot_client_send_file(ot_client *c, const char *name, const char *path, ot_send_opts *opts);

/* Download (the mirror of ot_client_send): the server's chunks come over `window`
 * lanes, each in its own sealed envelope; the client hashes every chunk and commits
 * only if the digest of the whole matches the one the server announced. */
typedef struct {
  uint32_t chunk;               /* default 1 MiB (the server may use a smaller one) */
  int window;                   /* chunks in flight, default 4 */
  uint64_t max_size;            /* refuse larger objects; 0 = transport max (OT_FETCH_MAX_DEFAULT) */
  const uint8_t *expect_digest; /* optional 32 bytes: refuse (before committing) if the digest differs */
  uint64_t stop_after;          /* test hook: stop as if dropped after this many chunks; 0 = no */
  /* out */
  uint8_t digest_out[32];
  uint64_t size_out;
  uint64_t resumed_from; /* chunks already present from an earlier interrupted fetch */
  uint64_t fetched;      /* chunks downloaded by this call */
  /* optional: called after each verified chunk (from the lane threads, one call at a
   * time), with the bytes present so far (resumed ones included) */
  void (*progress)(void *arg, uint64_t done_bytes, uint64_t total_bytes);
  void *progress_arg;
} ot_fetch_opts;
#define OT_FETCH_MAX_DEFAULT (16ull << 30)
/* Downloads `name` into sink; OT_OK once every chunk arrived and the whole digest (same
 * definition as uploads: ot_transfer_digest) verified, then sink->commit is called;
 * otherwise sink->abort. */
int ot_client_fetch(ot_client *c, const char *name, ot_sink sink, ot_fetch_opts *opts);
/* Downloads into PATH atomically (PATH.partial, fsync, rename). Resumable: an interrupted
 * fetch leaves PATH.partial plus a small PATH.partial.state (verified chunk hashes) and the
 * next call with the same name fetches only the missing chunks (the server's digest must
 * match, else it starts over). A digest mismatch removes both. */
int ot_client_fetch_file(ot_client *c, const char *name, const char *path, ot_fetch_opts *opts);

/* Test helpers: the session in use, and one raw round trip on a lane. */
ot_session *ot_client_session(ot_client *c);
int ot_client_raw(ot_client *c, uint32_t lane, const uint8_t *wire, size_t len, uint8_t **reply,
                  size_t *reply_len);
/* One sealed request of any type on a lane (with retries); the reply body is opened. */
int ot_client_request(ot_client *c, uint32_t lane, uint32_t type, const uint8_t *body, size_t len,
                      uint32_t *rtype, uint8_t **reply, size_t *reply_len);

#endif
