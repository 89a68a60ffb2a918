#include "ot_transport.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <nng/nng.h>
#include <nng/protocol/reqrep0/rep.h>
#include <nng/protocol/reqrep0/req.h>
#include <nng/transport/tcp/tcp.h>
#include <pthread.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_handshake.h"
#include "ot_pb.h"

/* ================================ server ================================ */

#define N_BUCKETS 1024

typedef struct srv_session {
  struct srv_session *next;
  struct srv_session *pnext, *pprev; /* the pending handshakes, oldest first (while pending) */
  pthread_mutex_t mu;
  int refs, dead, pending;
  ot_hs_pending hs; /* while pending */
  ot_session s;     /* once open */
  uint64_t last_used;
  /* retransmit cache: the last reply per lane */
  uint8_t *last_reply[OT_MAX_LANES];
  size_t last_reply_len[OT_MAX_LANES];
  uint64_t last_reply_seq[OT_MAX_LANES]; /* the request seq it answers */
  /* the last request was a fetch chunk: too large to cache, and answering it again is
   * harmless, so a retransmission is processed again */
  uint8_t last_regen[OT_MAX_LANES];
} srv_session;

/* What uploads and downloads share: an entry of one of the server's lists, keyed by (id,
 * owner), held by request handlers (refs), unlinked (dead) when finished or idle for
 * transfer_idle_seconds; whoever lets go of a dead entry last ends it. */
typedef struct srv_entry {
  struct srv_entry *next;
  uint8_t id[16], owner[32];
  char name[256];
  uint64_t last_used;
  int refs, dead;
} srv_entry;

typedef struct {
  srv_entry *head;
  int n;
} srv_list;

typedef struct {
  srv_entry e; /* first: a srv_entry * of s->transfers is a srv_transfer * */
  uint64_t total;
  uint32_t chunk;
  ot_rx *rx;
  ot_sink sink;
} srv_transfer;

/* A committed transfer, remembered so that a repeated final marker or a resumed
 * TransferBegin (its reply was lost) is answered "committed" instead of "unknown". */
typedef struct {
  uint8_t id[16], owner[32];
  uint64_t n;
  int used;
} srv_tomb;
#define N_TOMBS 256

/* A download in progress: the source stays open until the client's end marker or
 * transfer_idle_seconds without a request. */
typedef struct {
  srv_entry e; /* first: a srv_entry * of s->fetches is a srv_fetch * */
  uint8_t digest[32];
  uint64_t size, n;
  uint32_t chunk;
  ot_source src;
} srv_fetch;

/* Digests of stamped sources, computed once (the same emulator goes to many devices). */
typedef struct {
  char name[256];
  uint64_t size, stamp, used;
  uint32_t chunk;
  int state; /* 0 free, 1 being computed, 2 done */
  uint8_t digest[32];
} srv_digest;
#define N_DIGESTS 64

/* ClientHello token buckets by source address; a collision hands the newcomer a fresh
 * bucket, which costs at most one burst. */
typedef struct {
  uint64_t key;
  double tokens, t;
} srv_rate;
#define N_RATES 512

typedef struct srv_ctx {
  struct ot_server *srv;
  nng_ctx ctx;
  nng_aio *aio;
  int sending;
} srv_ctx;

typedef struct {
  srv_ctx *c;
  nng_msg *m;
} job;

struct ot_server {
  ot_server_config cfg;
  nng_socket sock;
  nng_listener lis;
  int port;
  srv_ctx *ctxs;
  int n_ctx;
  pthread_t *workers;
  int n_workers;
  /* job queue: a ring with room for every context */
  pthread_mutex_t qmu;
  pthread_cond_t qcv;
  job *q;
  int qhead, qlen, stopping;
  /* sessions and transfers */
  pthread_mutex_t tmu;
  srv_session *buckets[N_BUCKETS];
  int n_sessions;
  srv_session *phead, *ptail; /* pending handshakes, oldest first */
  int n_pending;
  srv_rate rates[N_RATES];
  /* admitted connections: pipe id and address key (pipe id 0 = free slot) */
  pthread_mutex_t pmu;
  struct {
    uint32_t pipe;
    uint64_t key;
  } * conns;
  int n_conns;
  srv_list transfers;
  srv_tomb tombs[N_TOMBS];
  int tomb_next;
  srv_list fetches;
  srv_digest digests[N_DIGESTS];
  uint64_t digest_clock;
  pthread_cond_t dcv; /* a digest being computed is done (with tmu) */
  pthread_mutex_t stmu;
  ot_server_stats stats;
};

static void srv_log(ot_server *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void srv_log(ot_server *s, const char *fmt, ...) {
  if (!s->cfg.log) return;
  char line[600];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  s->cfg.log(s->cfg.user, line);
}

static void stat_add(ot_server *s, uint64_t *field) {
  pthread_mutex_lock(&s->stmu);
  (*field)++;
  pthread_mutex_unlock(&s->stmu);
}

static void session_free(ot_server *s, srv_session *x) {
  (void)s;
  for (int i = 0; i < OT_MAX_LANES; i++) free(x->last_reply[i]);
  pthread_mutex_destroy(&x->mu);
  sodium_memzero(x, sizeof *x);
  free(x);
}

/* Looks a session up and takes a reference (tmu held by the caller). */
static srv_session *session_get_locked(ot_server *s, uint64_t id) {
  for (srv_session *x = s->buckets[id % N_BUCKETS]; x; x = x->next)
    if (!x->dead && (x->pending ? x->hs.s.id : x->s.id) == id) {
      x->refs++;
      return x;
    }
  return NULL;
}

static void pending_unlink_locked(ot_server *s, srv_session *x) {
  if (!x->pending) return;
  if (x->pprev)
    x->pprev->pnext = x->pnext;
  else if (s->phead == x)
    s->phead = x->pnext;
  else
    return; /* not linked */
  if (x->pnext)
    x->pnext->pprev = x->pprev;
  else
    s->ptail = x->pprev;
  x->pnext = x->pprev = NULL;
  s->n_pending--;
}

static void session_unlink_locked(ot_server *s, srv_session *x) {
  pending_unlink_locked(s, x);
  uint64_t id = x->pending ? x->hs.s.id : x->s.id;
  for (srv_session **pp = &s->buckets[id % N_BUCKETS]; *pp; pp = &(*pp)->next)
    if (*pp == x) {
      *pp = x->next;
      s->n_sessions--;
      x->dead = 1;
      return;
    }
}

static void session_put(ot_server *s, srv_session *x, int kill) {
  pthread_mutex_lock(&s->tmu);
  if (kill && !x->dead) session_unlink_locked(s, x);
  int last = --x->refs == 0 && x->dead;
  pthread_mutex_unlock(&s->tmu);
  if (last) session_free(s, x);
}

/* Drops expired sessions and stale pending handshakes (tmu held). */
static void sessions_sweep_locked(ot_server *s, uint64_t now) {
  for (int b = 0; b < N_BUCKETS; b++)
    for (srv_session **pp = &s->buckets[b]; *pp;) {
      srv_session *x = *pp;
      int stale = x->pending ? now > x->hs.deadline : now > x->s.expires_at;
      if (stale) {
        pending_unlink_locked(s, x);
        *pp = x->next;
        s->n_sessions--;
        x->dead = 1;
        if (x->refs == 0) session_free(s, x);
      } else {
        pp = &x->next;
      }
    }
}

static int session_add(ot_server *s, const ot_hs_pending *hs) {
  srv_session *x = calloc(1, sizeof *x);
  if (!x) return ot_error(OT_ERR_NOMEM, "out of memory");
  pthread_mutex_init(&x->mu, NULL);
  x->pending = 1;
  x->hs = *hs;
  x->last_used = ot_unix_now();
  pthread_mutex_lock(&s->tmu);
  if (s->n_sessions >= s->cfg.max_sessions) sessions_sweep_locked(s, x->last_used);
  /* make room by dropping the oldest unfinished handshake: honest ones finish in a round
   * trip, so only a flood's entries live long enough to be the oldest */
  srv_session *evicted = NULL;
  if (s->phead && (s->n_pending >= s->cfg.max_pending || s->n_sessions >= s->cfg.max_sessions)) {
    evicted = s->phead;
    session_unlink_locked(s, evicted);
    stat_add(s, &s->stats.handshakes_evicted);
    if (evicted->refs) evicted = NULL; /* its holder frees it */
  }
  int rc = OT_OK;
  if (s->n_sessions >= s->cfg.max_sessions) {
    rc = ot_error(OT_ERR_RANGE, "server busy: %d sessions", s->n_sessions);
  } else {
    uint64_t id = hs->s.id;
    x->next = s->buckets[id % N_BUCKETS];
    s->buckets[id % N_BUCKETS] = x;
    s->n_sessions++;
    x->pprev = s->ptail;
    if (s->ptail)
      s->ptail->pnext = x;
    else
      s->phead = x;
    s->ptail = x;
    s->n_pending++;
  }
  pthread_mutex_unlock(&s->tmu);
  if (evicted) session_free(s, evicted);
  if (rc) session_free(s, x);
  return rc;
}

/* ---- list entries (transfers and fetches) ---- */

/* The live entry (id, owner) of l with a reference taken, or NULL. */
static srv_entry *entry_find(ot_server *s, srv_list *l, const uint8_t id[16], const uint8_t owner[32]) {
  pthread_mutex_lock(&s->tmu);
  srv_entry *e = l->head;
  for (; e; e = e->next)
    if (sodium_memcmp(e->id, id, 16) == 0 && sodium_memcmp(e->owner, owner, 32) == 0) {
      e->refs++;
      e->last_used = ot_unix_now();
      break;
    }
  pthread_mutex_unlock(&s->tmu);
  return e;
}

/* Drops a reference, and with kill unlinks the entry; 1 when the caller must end it. */
static int entry_put(ot_server *s, srv_list *l, srv_entry *e, int kill) {
  pthread_mutex_lock(&s->tmu);
  if (kill && !e->dead) {
    for (srv_entry **pp = &l->head; *pp; pp = &(*pp)->next)
      if (*pp == e) {
        *pp = e->next;
        l->n--;
        break;
      }
    e->dead = 1;
  }
  int last = --e->refs == 0 && e->dead;
  pthread_mutex_unlock(&s->tmu);
  return last;
}

/* Unlinks the entries idle past transfer_idle_seconds; returns those no handler holds,
 * linked by next, for the caller to end (the others end at their last put). */
static srv_entry *entries_sweep(ot_server *s, srv_list *l) {
  uint64_t now = ot_unix_now();
  srv_entry *dead = NULL;
  pthread_mutex_lock(&s->tmu);
  for (srv_entry **pp = &l->head; *pp;) {
    srv_entry *e = *pp;
    if (now > e->last_used + s->cfg.transfer_idle_seconds) {
      *pp = e->next;
      l->n--;
      e->dead = 1;
      if (e->refs == 0) {
        e->next = dead;
        dead = e;
      }
    } else {
      pp = &e->next;
    }
  }
  pthread_mutex_unlock(&s->tmu);
  return dead;
}

/* 1 when l already holds max_transfers entries (the limit of each list). */
static int list_full(ot_server *s, const srv_list *l) {
  pthread_mutex_lock(&s->tmu);
  int full = l->n >= s->cfg.max_transfers;
  pthread_mutex_unlock(&s->tmu);
  return full;
}

/* Uploads and downloads `owner` holds open. Checked before the entry is pushed, so
 * concurrent opens of one device may pass it by at most the number of workers. */
static int peer_over_limit(ot_server *s, const uint8_t owner[32]) {
  int n = 0;
  pthread_mutex_lock(&s->tmu);
  for (int k = 0; k < 2; k++)
    for (const srv_entry *e = (k ? s->fetches : s->transfers).head; e; e = e->next)
      n += sodium_memcmp(e->owner, owner, 32) == 0;
  pthread_mutex_unlock(&s->tmu);
  if (n < s->cfg.max_open_per_peer) return OT_OK;
  stat_add(s, &s->stats.peer_limited);
  return ot_error(OT_ERR_RANGE, "this device already has %d uploads and downloads open (limit %d)", n,
                  s->cfg.max_open_per_peer);
}

/* The rate key of a message's source address: IPv4 address, IPv6 /64, or one key for
 * local transports. */
static uint64_t pipe_key(nng_pipe p) {
  nng_sockaddr sa;
  if (nng_pipe_id(p) < 0 || nng_pipe_get_addr(p, NNG_OPT_REMADDR, &sa) != 0) return 1;
  uint64_t k = 1;
  if (sa.s_family == NNG_AF_INET) {
    k = (2ull << 56) | sa.s_in.sa_addr;
  } else if (sa.s_family == NNG_AF_INET6) {
    memcpy(&k, sa.s_in6.sa_addr, 8);
    k ^= 3ull << 56;
  }
  return k;
}

/* Admits a new connection or closes it (over max_conns or max_conns_per_addr). */
static void on_pipe(nng_pipe p, nng_pipe_ev ev, void *arg) {
  ot_server *s = arg;
  uint32_t id = (uint32_t)nng_pipe_id(p);
  if (ev == NNG_PIPE_EV_REM_POST) {
    pthread_mutex_lock(&s->pmu);
    for (int i = 0; i < s->cfg.max_conns; i++)
      if (s->conns[i].pipe == id) {
        s->conns[i].pipe = 0;
        s->n_conns--;
        break;
      }
    pthread_mutex_unlock(&s->pmu);
    return;
  }
  uint64_t key = pipe_key(p);
  int same = 0, slot = -1;
  pthread_mutex_lock(&s->pmu);
  for (int i = 0; i < s->cfg.max_conns; i++) {
    if (s->conns[i].pipe && s->conns[i].key == key) same++;
    if (!s->conns[i].pipe && slot < 0) slot = i;
  }
  int admit = slot >= 0 && same < s->cfg.max_conns_per_addr;
  if (admit) {
    s->conns[slot].pipe = id;
    s->conns[slot].key = key;
    s->n_conns++;
  }
  pthread_mutex_unlock(&s->pmu);
  if (!admit) {
    stat_add(s, &s->stats.conns_refused);
    nng_pipe_close(p);
  }
}

/* One ClientHello from `key`: 1 if its bucket has a token. */
static int hello_allowed(ot_server *s, uint64_t key) {
  if (s->cfg.hello_rate < 0) return 1;
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  double now = (double)ts.tv_sec + ts.tv_nsec / 1e9;
  uint64_t h = key * 0x9E3779B97F4A7C15ull;
  pthread_mutex_lock(&s->tmu);
  srv_rate *r = &s->rates[(h >> 40) % N_RATES];
  if (r->key != key) *r = (srv_rate){key, (double)s->cfg.hello_burst, now};
  r->tokens += (now - r->t) * s->cfg.hello_rate;
  if (r->tokens > s->cfg.hello_burst) r->tokens = s->cfg.hello_burst;
  r->t = now;
  int ok = r->tokens >= 1.0;
  if (ok) r->tokens -= 1.0;
  pthread_mutex_unlock(&s->tmu);
  if (!ok) stat_add(s, &s->stats.hellos_limited);
  return ok;
}

static void list_push(ot_server *s, srv_list *l, srv_entry *e) {
  pthread_mutex_lock(&s->tmu);
  e->next = l->head;
  l->head = e;
  l->n++;
  pthread_mutex_unlock(&s->tmu);
}

static void transfer_end(ot_server *s, srv_transfer *t) {
  int committed = ot_rx_committed(t->rx);
  ot_rx_free(t->rx); /* aborts the sink unless committed */
  if (s->cfg.on_transfer_end) s->cfg.on_transfer_end(s->cfg.user, t->e.owner, t->e.name, committed, &t->sink);
  free(t);
}

static void transfer_put(ot_server *s, srv_transfer *t, int kill) {
  if (entry_put(s, &s->transfers, &t->e, kill)) transfer_end(s, t);
}

static void tomb_add(ot_server *s, const srv_transfer *t) {
  pthread_mutex_lock(&s->tmu);
  srv_tomb *b = &s->tombs[s->tomb_next];
  s->tomb_next = (s->tomb_next + 1) % N_TOMBS;
  memcpy(b->id, t->e.id, 16);
  memcpy(b->owner, t->e.owner, 32);
  b->n = ot_transfer_chunks(t->total, t->chunk);
  b->used = 1;
  pthread_mutex_unlock(&s->tmu);
}

static int tomb_find(ot_server *s, const uint8_t id[16], const uint8_t owner[32], uint64_t *n) {
  int found = 0;
  pthread_mutex_lock(&s->tmu);
  for (int i = 0; i < N_TOMBS && !found; i++)
    if (s->tombs[i].used && memcmp(s->tombs[i].id, id, 16) == 0 &&
        sodium_memcmp(s->tombs[i].owner, owner, 32) == 0) {
      *n = s->tombs[i].n;
      found = 1;
    }
  pthread_mutex_unlock(&s->tmu);
  return found;
}

static srv_transfer *transfer_find(ot_server *s, const uint8_t id[16], const uint8_t owner[32]) {
  return (srv_transfer *)entry_find(s, &s->transfers, id, owner);
}

static void transfers_sweep(ot_server *s) {
  for (srv_entry *e = entries_sweep(s, &s->transfers), *next; e; e = next) {
    next = e->next;
    srv_log(s, "transfer '%s' dropped after %u s idle", e->name, s->cfg.transfer_idle_seconds);
    transfer_end(s, (srv_transfer *)e);
  }
}

/* Reply helpers: every path ends in exactly one reply. */
static int plain_refusal(int code, uint8_t **out, size_t *len) {
  uint8_t *b = NULL;
  size_t bl = 0;
  const char *d = ot_error_detail();
  char reason[400];
  snprintf(reason, sizeof reason, "%s%s%s", ot_strerror(code), *d ? ": " : "", d);
  int rc = ot_refusal_pack(code, reason, &b, &bl);
  if (rc == OT_OK) rc = ot_env_pack_plain(OT_MSG_REFUSAL, 0, b, bl, out, len);
  free(b);
  return rc;
}

/* Seals a reply on lane with the session's next seq (x->mu taken here). */
static int sealed_reply(srv_session *x, ot_session *sess, uint32_t lane, uint32_t type, const uint8_t *body,
                        size_t bl, uint8_t **out, size_t *len) {
  pthread_mutex_lock(&x->mu);
  uint64_t seq = ++sess->tx_seq[lane];
  pthread_mutex_unlock(&x->mu);
  return ot_env_seal_seq(sess, lane, seq, type, body, bl, out, len);
}

static int sealed_refusal(srv_session *x, ot_session *sess, uint32_t lane, int code, uint8_t **out,
                          size_t *len) {
  uint8_t *b = NULL;
  size_t bl = 0;
  const char *d = ot_error_detail();
  char reason[400];
  snprintf(reason, sizeof reason, "%s%s%s", ot_strerror(code), *d ? ": " : "", d);
  int rc = ot_refusal_pack(code, reason, &b, &bl);
  if (rc == OT_OK) rc = sealed_reply(x, sess, lane, OT_MSG_REFUSAL, b, bl, out, len);
  free(b);
  return rc;
}

static int handle_transfer(ot_server *s, srv_session *x, uint32_t type, const uint8_t *body, size_t bl,
                           uint8_t **rb, size_t *rbl) {
  const uint8_t *peer = x->s.peer_pk;
  ot_transfer_status st = {0};
  int rc = OT_OK;
  if (type == OT_MSG_TRANSFER_BEGIN) {
    ot_transfer_begin b;
    rc = ot_begin_decode(body, bl, &b);
    if (rc) return rc;
    srv_transfer *t = transfer_find(s, b.id, peer);
    uint64_t done_n = 0;
    if (!t && tomb_find(s, b.id, peer, &done_n)) {
      st.have_prefix = done_n;
      st.committed = 1;
    } else if (t) {
      if (t->total != b.total || t->chunk != b.chunk || strcmp(t->e.name, b.name) != 0)
        rc = ot_error(OT_ERR_MISMATCH, "transfer '%s' resumed with different parameters", b.name);
      else
        st.have_prefix = ot_rx_prefix(t->rx);
      if (rc == OT_OK)
        srv_log(s, "transfer '%s' resumed at chunk %llu", t->e.name, (unsigned long long)st.have_prefix);
      transfer_put(s, t, 0);
    } else {
      transfers_sweep(s);
      if (b.chunk == 0 || b.chunk > OT_CHUNK_MAX || b.chunk + OT_ENV_OVERHEAD + 64 > s->cfg.max_msg)
        return ot_error(OT_ERR_RANGE, "chunk size %u does not fit the message limit %zu", b.chunk,
                        s->cfg.max_msg);
      if (b.total > s->cfg.max_transfer)
        return ot_error(OT_ERR_RANGE, "transfer of %llu bytes exceeds the limit of %llu",
                        (unsigned long long)b.total, (unsigned long long)s->cfg.max_transfer);
      if (!s->cfg.on_transfer_open) return ot_error(OT_ERR_UNSUPPORTED, "this server accepts no transfers");
      if (list_full(s, &s->transfers))
        return ot_error(OT_ERR_RANGE, "server busy: too many unfinished transfers");
      int prc = peer_over_limit(s, peer);
      if (prc) return prc;
      t = calloc(1, sizeof *t);
      if (!t) return ot_error(OT_ERR_NOMEM, "out of memory");
      memcpy(t->e.id, b.id, 16);
      memcpy(t->e.owner, peer, 32);
      memcpy(t->e.name, b.name, sizeof t->e.name);
      t->total = b.total;
      t->chunk = b.chunk;
      t->e.last_used = ot_unix_now();
      rc = s->cfg.on_transfer_open(s->cfg.user, peer, b.name, b.total, &t->sink);
      if (rc == OT_OK) {
        rc = ot_rx_new(b.id, b.total, b.chunk, s->cfg.max_transfer, t->sink, &t->rx);
        if (rc) {
          t->sink.abort(t->sink.self);
          if (s->cfg.on_transfer_end) s->cfg.on_transfer_end(s->cfg.user, peer, b.name, 0, &t->sink);
        }
      }
      if (rc) {
        free(t);
        return rc;
      }
      list_push(s, &s->transfers, &t->e);
    }
    memcpy(st.id, b.id, 16);
  } else { /* OT_MSG_CHUNK */
    ot_chunk ch;
    rc = ot_chunk_decode(body, bl, &ch);
    if (rc) return rc;
    srv_transfer *t = transfer_find(s, ch.id, peer);
    uint64_t done_n = 0;
    if (!t && tomb_find(s, ch.id, peer, &done_n)) {
      int fin = ch.final;
      ot_chunk_release(&ch);
      if (!fin) return ot_error(OT_ERR_INVALID, "chunk for a transfer already committed");
      memcpy(st.id, ch.id, 16);
      st.have_prefix = done_n;
      st.committed = 1; /* a repeated final marker */
      return ot_status_pack(&st, rb, rbl) == OT_OK ? OT_OK : ot_error(OT_ERR_NOMEM, "out of memory");
    }
    if (!t) {
      ot_chunk_release(&ch);
      return ot_error(OT_ERR_NOTFOUND, "chunk for an unknown transfer");
    }
    memcpy(st.id, ch.id, 16);
    stat_add(s, &s->stats.chunks);
    if (ch.final) {
      if (ch.index != ot_transfer_chunks(t->total, t->chunk))
        rc = ot_error(OT_ERR_FORMAT, "final marker at index %llu", (unsigned long long)ch.index);
      else
        rc = ot_rx_final(t->rx, ch.digest);
      st.committed = rc == OT_OK;
      st.have_prefix = ot_rx_prefix(t->rx);
      if (rc == OT_OK) {
        tomb_add(s, t);
        stat_add(s, &s->stats.transfers_committed);
        srv_log(s, "transfer '%s' committed (%llu bytes)", t->e.name, (unsigned long long)t->total);
      } else {
        srv_log(s, "transfer '%s' failed: %s", t->e.name, ot_error_detail());
      }
      ot_chunk_release(&ch);
      transfer_put(s, t, 1); /* done either way: committed, or discarded */
    } else {
      rc = ot_rx_chunk(t->rx, ch.index, ch.data, ch.len);
      st.have_prefix = ot_rx_prefix(t->rx);
      ot_chunk_release(&ch);
      transfer_put(s, t, 0);
    }
    if (rc) return rc;
  }
  return ot_status_pack(&st, rb, rbl) == OT_OK ? OT_OK : ot_error(OT_ERR_NOMEM, "out of memory");
}

/* ---- fetch (download) ---- */

static void fetch_end(ot_server *s, srv_fetch *f) {
  if (s->cfg.on_fetch_close) s->cfg.on_fetch_close(s->cfg.user, &f->src);
  free(f);
}

static void fetch_put(ot_server *s, srv_fetch *f, int kill) {
  if (entry_put(s, &s->fetches, &f->e, kill)) fetch_end(s, f);
}

static srv_fetch *fetch_find(ot_server *s, const uint8_t id[16], const uint8_t owner[32]) {
  return (srv_fetch *)entry_find(s, &s->fetches, id, owner);
}

static void fetches_sweep(ot_server *s) {
  for (srv_entry *e = entries_sweep(s, &s->fetches), *next; e; e = next) {
    next = e->next;
    srv_log(s, "fetch '%s' closed after %u s idle", e->name, s->cfg.transfer_idle_seconds);
    fetch_end(s, (srv_fetch *)e);
  }
}

/* One pass over the source: the chunk hash list and its digest. */
int ot_source_digest(const ot_source *src, uint64_t size, uint32_t chunk, uint8_t out[32]) {
  if (!src || !src->read_at || !out || chunk == 0 || chunk > OT_CHUNK_MAX)
    return ot_error(OT_ERR_INVALID, "ot_source_digest: bad argument");
  uint64_t n = ot_transfer_chunks(size, chunk);
  uint8_t(*h)[32] = calloc(n ? n : 1, 32);
  uint8_t *buf = malloc(chunk);
  int rc = h && buf ? OT_OK : ot_error(OT_ERR_NOMEM, "out of memory");
  for (uint64_t i = 0; rc == OT_OK && i < n; i++) {
    uint64_t off = i * chunk;
    size_t len = (size_t)(size - off < chunk ? size - off : chunk);
    const uint8_t *d = NULL;
    rc = src->read_at(src->self, off, len, buf, &d);
    if (rc == OT_OK) ot_chunk_hash(i, d, len, h[i]);
  }
  if (rc == OT_OK) ot_transfer_digest((const uint8_t(*)[32])h, n, size, chunk, out);
  free(h);
  free(buf);
  return rc;
}

/* The digest of a source, from the cache when it is stamped. Concurrent opens of the
 * same source wait for the one computing it instead of reading it again. */
static int digest_get(ot_server *s, const char *name, const ot_source *src, uint64_t size, uint32_t chunk,
                      uint8_t out[32]) {
  if (!src->stamp) {
    stat_add(s, &s->stats.digests_computed);
    return ot_source_digest(src, size, chunk, out);
  }
  pthread_mutex_lock(&s->tmu);
  srv_digest *e = NULL;
  for (;;) {
    e = NULL;
    for (int i = 0; i < N_DIGESTS && !e; i++) {
      srv_digest *d = &s->digests[i];
      if (d->state && d->size == size && d->stamp == src->stamp && d->chunk == chunk &&
          strcmp(d->name, name) == 0)
        e = d;
    }
    if (!e || e->state == 2) break;
    pthread_cond_wait(&s->dcv, &s->tmu);
  }
  if (e) {
    memcpy(out, e->digest, 32);
    e->used = ++s->digest_clock;
    pthread_mutex_unlock(&s->tmu);
    return OT_OK;
  }
  /* a free slot, else the least recently used finished one */
  for (int i = 0; i < N_DIGESTS; i++) {
    srv_digest *d = &s->digests[i];
    if (d->state == 1) continue;
    if (!e || d->state == 0 || (e->state == 2 && d->used < e->used)) e = d;
    if (e->state == 0) break;
  }
  if (e) {
    snprintf(e->name, sizeof e->name, "%s", name);
    e->size = size;
    e->stamp = src->stamp;
    e->chunk = chunk;
    e->state = 1;
  }
  pthread_mutex_unlock(&s->tmu);
  stat_add(s, &s->stats.digests_computed);
  int rc = ot_source_digest(src, size, chunk, out);
  if (e) {
    pthread_mutex_lock(&s->tmu);
    e->state = rc == OT_OK ? 2 : 0;
    if (rc == OT_OK) memcpy(e->digest, out, 32);
    e->used = ++s->digest_clock;
    pthread_cond_broadcast(&s->dcv);
    pthread_mutex_unlock(&s->tmu);
  }
  return rc;
}

/* FetchOpen -> FetchInfo; FetchChunk -> Chunk (data, or the end marker at index n).
 * *regen: the reply is a data chunk (not cached for retransmission). */
static int handle_fetch(ot_server *s, srv_session *x, uint32_t lane, uint32_t type, const uint8_t *body,
                        size_t bl, uint8_t **rb, size_t *rbl, uint32_t *rtype, int *regen, nng_msg **msg) {
  const uint8_t *peer = x->s.peer_pk;
  *regen = 0;
  if (type == OT_MSG_FETCH_OPEN) {
    ot_fetch_open_body b;
    int rc = ot_fetch_open_decode(body, bl, &b);
    if (rc) return rc;
    if (!s->cfg.on_fetch_open) return ot_error(OT_ERR_UNSUPPORTED, "this server serves no downloads");
    fetches_sweep(s);
    if (list_full(s, &s->fetches)) return ot_error(OT_ERR_RANGE, "server busy: too many open downloads");
    rc = peer_over_limit(s, peer);
    if (rc) return rc;
    /* the largest chunk whose reply fits the message limit */
    uint32_t chunk = s->cfg.fetch_chunk;
    size_t room = s->cfg.max_msg - OT_ENV_OVERHEAD - 64;
    if (b.chunk && b.chunk < chunk) chunk = b.chunk;
    if (chunk > room) chunk = (uint32_t)room;
    srv_fetch *f = calloc(1, sizeof *f);
    if (!f) return ot_error(OT_ERR_NOMEM, "out of memory");
    rc = s->cfg.on_fetch_open(s->cfg.user, peer, b.name, &f->src, &f->size);
    if (rc) {
      free(f);
      return rc;
    }
    if (!f->src.read_at) rc = ot_error(OT_ERR_INTERNAL, "on_fetch_open gave no source for '%s'", b.name);
    if (rc == OT_OK && f->size > s->cfg.max_transfer)
      rc = ot_error(OT_ERR_RANGE, "'%s' has %llu bytes, over the limit of %llu", b.name,
                    (unsigned long long)f->size, (unsigned long long)s->cfg.max_transfer);
    if (rc == OT_OK) rc = digest_get(s, b.name, &f->src, f->size, chunk, f->digest);
    if (rc) {
      fetch_end(s, f);
      return rc;
    }
    randombytes_buf(f->e.id, 16);
    memcpy(f->e.owner, peer, 32);
    memcpy(f->e.name, b.name, sizeof f->e.name);
    f->chunk = chunk;
    f->n = ot_transfer_chunks(f->size, chunk);
    f->e.last_used = ot_unix_now();
    ot_fetch_info fi = {.size = f->size, .chunk = chunk};
    memcpy(fi.id, f->e.id, 16);
    memcpy(fi.digest, f->digest, 32);
    rc = ot_fetch_info_pack(&fi, rb, rbl);
    if (rc) {
      fetch_end(s, f);
      return rc;
    }
    list_push(s, &s->fetches, &f->e);
    stat_add(s, &s->stats.fetches_opened);
    srv_log(s, "fetch '%s' opened (%llu bytes, %u-byte chunks)", f->e.name, (unsigned long long)f->size,
            chunk);
    *rtype = OT_MSG_FETCH_INFO;
    return OT_OK;
  }
  uint8_t id[16];
  uint64_t index = 0;
  int rc = ot_fetch_chunk_decode(body, bl, id, &index);
  if (rc) return rc;
  srv_fetch *f = fetch_find(s, id, peer);
  if (!f) return ot_error(OT_ERR_NOTFOUND, "chunk request for an unknown or finished download");
  if (index > f->n) {
    rc = ot_error(OT_ERR_RANGE, "chunk %llu out of range (download has %llu)", (unsigned long long)index,
                  (unsigned long long)f->n);
  } else if (index == f->n) { /* the client is done: the end marker, and the source is closed */
    rc = ot_chunk_pack(id, index, 1, NULL, 0, f->digest, rb, rbl);
    if (rc == OT_OK) srv_log(s, "fetch '%s' finished", f->e.name);
    fetch_put(s, f, 1);
    *rtype = OT_MSG_CHUNK;
    return rc;
  } else {
    /* Straight into the reply message: the source reads into the place the chunk's data
     * takes in the sealed body, which is then encrypted in place. */
    uint64_t off = index * f->chunk;
    size_t len = (size_t)(f->size - off < f->chunk ? f->size - off : f->chunk);
    size_t cbl = ot_chunk_packed_len(index, 0, len, 0);
    size_t wl = ot_env_sealed_len(lane, OT_MSG_CHUNK, cbl);
    nng_msg *m = NULL;
    rc = nng_msg_alloc(&m, wl) ? ot_error(OT_ERR_NOMEM, "out of memory") : OT_OK;
    uint8_t *w = m ? nng_msg_body(m) : NULL, *cb = w ? w + (wl - cbl - OT_AEAD_ABYTES) : NULL;
    const uint8_t *d = NULL;
    if (rc == OT_OK) rc = f->src.read_at(f->src.self, off, len, cb + (cbl - len), &d);
    if (rc == OT_OK) rc = ot_chunk_pack_to(id, index, 0, d, len, NULL, cb, cbl);
    if (rc == OT_OK) {
      pthread_mutex_lock(&x->mu);
      uint64_t seq = ++x->s.tx_seq[lane];
      pthread_mutex_unlock(&x->mu);
      rc = ot_env_seal_to(&x->s, lane, seq, OT_MSG_CHUNK, cb, cbl, w, wl);
    }
    if (rc == OT_OK) {
      stat_add(s, &s->stats.fetch_chunks);
      *regen = 1;
      *msg = m;
    } else if (m) {
      nng_msg_free(m);
    }
  }
  fetch_put(s, f, 0);
  *rtype = OT_MSG_CHUNK;
  return rc;
}

/* Processes one request; always produces a reply (refusals included). */
static void process(ot_server *s, uint64_t from, uint8_t *wire, size_t len, uint8_t **out, size_t *out_len,
                    nng_msg **out_msg) {
  *out = NULL;
  *out_len = 0;
  *out_msg = NULL;
  stat_add(s, &s->stats.requests);
  ot_env e = {0};
  int rc = ot_env_view(wire, len, s->cfg.max_msg, &e); /* in place: wire is ours */
  if (rc) {
    srv_log(s, "refused a message: %s", ot_error_detail());
    stat_add(s, &s->stats.refusals);
    plain_refusal(rc, out, out_len);
    return;
  }
  ot_hs_server_config hc = {s->cfg.id,    s->cfg.acl,         s->cfg.acl_self,
                            s->cfg.lanes, s->cfg.ttl_seconds, s->cfg.max_msg};
  if (!e.sealed) {
    if (e.h.type != OT_MSG_CLIENT_HELLO) {
      rc = ot_error(OT_ERR_FORMAT, "plain message of type %u (only ClientHello may be plain)", e.h.type);
    } else if (!hello_allowed(s, from)) {
      rc = ot_error(OT_ERR_RANGE, "too many handshakes from this address: retry later");
    } else {
      ot_hs_pending p;
      rc = ot_hs_server_on_hello(&hc, wire, len, &p, out, out_len);
      if (rc == OT_OK) {
        rc = session_add(s, &p);
        if (rc) {
          free(*out);
          *out = NULL;
        }
      }
      sodium_memzero(&p, sizeof p);
    }
    if (rc) {
      srv_log(s, "refused a handshake: %s", ot_error_detail());
      stat_add(s, &s->stats.refusals);
      plain_refusal(rc, out, out_len);
    }
    ot_env_clear(&e);
    return;
  }
  pthread_mutex_lock(&s->tmu);
  srv_session *x = session_get_locked(s, e.h.session_id);
  pthread_mutex_unlock(&s->tmu);
  if (!x) {
    rc = ot_error(OT_ERR_NOTFOUND, "unknown or expired session %016llx", (unsigned long long)e.h.session_id);
    srv_log(s, "refused: %s", ot_error_detail());
    stat_add(s, &s->stats.refusals);
    plain_refusal(rc, out, out_len);
    ot_env_clear(&e);
    return;
  }
  /* Under x->mu: two ClientFinish messages for one pending handshake (a replay) must
   * not race; the second sees an open session and is refused as a replay. */
  pthread_mutex_lock(&x->mu);
  int pending = x->pending;
  if (!pending) pthread_mutex_unlock(&x->mu);
  if (pending) {
    ot_session open;
    int enrolled = 0;
    rc = ot_hs_server_on_finish(&hc, &x->hs, wire, len, &open, out, out_len, &enrolled);
    char fp[OT_FINGERPRINT_LEN];
    if (rc == OT_OK) {
      ot_fingerprint(open.peer_pk, fp);
      pthread_mutex_lock(&s->tmu); /* the pending record becomes the session (same id, same bucket) */
      pending_unlink_locked(s, x);
      x->s = open;
      x->pending = 0;
      sodium_memzero(&x->hs, sizeof x->hs);
      pthread_mutex_unlock(&s->tmu);
      stat_add(s, &s->stats.handshakes);
      srv_log(s, "session %016llx open for device %s%s", (unsigned long long)open.id, fp,
              enrolled ? " (enrolled with a token)" : "");
      sodium_memzero(&open, sizeof open);
      pthread_mutex_unlock(&x->mu);
      session_put(s, x, 0);
    } else {
      srv_log(s, "refused a handshake (session %016llx): %s", (unsigned long long)e.h.session_id,
              ot_error_detail());
      stat_add(s, &s->stats.refusals);
      /* The refusal is sealed with the pending keys: only the key holder reads it. */
      ot_session tmp = x->hs.s;
      uint8_t *b = NULL;
      size_t bl = 0;
      char reason[400];
      snprintf(reason, sizeof reason, "%s: %s", ot_strerror(rc), ot_error_detail());
      if (ot_refusal_pack(rc, reason, &b, &bl) != OT_OK ||
          ot_env_seal_seq(&tmp, 0, 1, OT_MSG_REFUSAL, b, bl, out, out_len) != OT_OK)
        plain_refusal(rc, out, out_len);
      free(b);
      sodium_memzero(&tmp, sizeof tmp);
      pthread_mutex_unlock(&x->mu);
      session_put(s, x, 1);
    }
    ot_env_clear(&e);
    return;
  }
  /* An open session. */
  uint8_t *body = NULL, *rb = NULL;
  size_t bl = 0, rbl = 0;
  uint32_t lane = e.h.lane;
  if (ot_unix_now() > x->s.expires_at) {
    rc = ot_error(OT_ERR_NOTFOUND, "session %016llx expired", (unsigned long long)x->s.id);
    srv_log(s, "refused: %s", ot_error_detail());
    stat_add(s, &s->stats.refusals);
    plain_refusal(rc, out, out_len);
    session_put(s, x, 1);
    ot_env_clear(&e);
    return;
  }
  rc = ot_env_unseal_inplace(&x->s, &e, &body, &bl); /* body points into wire */
  if (rc == OT_OK) {
    pthread_mutex_lock(&x->mu);
    if (x->last_reply[lane] && e.h.seq == x->last_reply_seq[lane]) {
      /* A retransmission of the last request on this lane (the reply was lost). */
      *out = malloc(x->last_reply_len[lane]);
      if (*out) {
        memcpy(*out, x->last_reply[lane], x->last_reply_len[lane]);
        *out_len = x->last_reply_len[lane];
      }
      pthread_mutex_unlock(&x->mu);
      stat_add(s, &s->stats.retransmits);
      session_put(s, x, 0);
      ot_env_clear(&e);
      if (!*out) plain_refusal(ot_error(OT_ERR_NOMEM, "out of memory"), out, out_len);
      return;
    }
    if (!(x->last_regen[lane] && e.h.seq == x->last_reply_seq[lane]))
      rc = ot_session_accept_seq(&x->s, lane, e.h.seq);
    else
      stat_add(s, &s->stats.retransmits); /* a fetch chunk asked again: answered again */
    pthread_mutex_unlock(&x->mu);
  }
  int accepted = rc == OT_OK, kill = 0, regen = 0;
  if (rc == OT_OK) {
    rc = s->cfg.acl->check(s->cfg.acl_self, x->s.peer_pk); /* revocation takes effect at once */
    kill = rc != OT_OK;
  }
  if (rc == OT_OK) {
    switch (e.h.type) {
    case OT_MSG_APP:
      if (!s->cfg.on_request)
        rc = ot_error(OT_ERR_UNSUPPORTED, "this server takes no requests");
      else
        rc = s->cfg.on_request(s->cfg.user, x->s.peer_pk, body, bl, &rb, &rbl);
      if (rc == OT_OK) rc = sealed_reply(x, &x->s, lane, OT_MSG_APP, rb, rbl, out, out_len);
      break;
    case OT_MSG_TRANSFER_BEGIN:
    case OT_MSG_CHUNK:
      rc = handle_transfer(s, x, e.h.type, body, bl, &rb, &rbl);
      if (rc == OT_OK) rc = sealed_reply(x, &x->s, lane, OT_MSG_TRANSFER_STATUS, rb, rbl, out, out_len);
      break;
    case OT_MSG_FETCH_OPEN:
    case OT_MSG_FETCH_CHUNK: {
      uint32_t rt = 0;
      rc = handle_fetch(s, x, lane, e.h.type, body, bl, &rb, &rbl, &rt, &regen, out_msg);
      if (rc == OT_OK && !*out_msg) rc = sealed_reply(x, &x->s, lane, rt, rb, rbl, out, out_len);
      break;
    }
    default: rc = ot_error(OT_ERR_FORMAT, "unexpected message type %u", e.h.type);
    }
  }
  if (rc) {
    char fp[OT_FINGERPRINT_LEN];
    ot_fingerprint(x->s.peer_pk, fp);
    srv_log(s, "refused a request from %s (session %016llx, lane %u, seq %llu): %s", fp,
            (unsigned long long)x->s.id, lane, (unsigned long long)e.h.seq, ot_error_detail());
    stat_add(s, &s->stats.refusals);
    free(*out);
    *out = NULL;
    if (sealed_refusal(x, &x->s, lane, rc, out, out_len) != OT_OK) plain_refusal(rc, out, out_len);
  }
  if (accepted && (*out || *out_msg)) {
    /* Cache the reply for a retransmission of this request (same lane and seq); a
     * fetched chunk is not kept (memory would be lanes x chunk per session). */
    regen = regen && rc == OT_OK;
    uint8_t *copy = regen ? NULL : malloc(*out_len);
    pthread_mutex_lock(&x->mu);
    free(x->last_reply[lane]);
    x->last_reply[lane] = copy;
    x->last_reply_len[lane] = copy ? *out_len : 0;
    x->last_reply_seq[lane] = e.h.seq;
    x->last_regen[lane] = (uint8_t)regen;
    if (copy) memcpy(copy, *out, *out_len);
    pthread_mutex_unlock(&x->mu);
  }
  if (body && e.h.type == OT_MSG_APP) sodium_memzero(body, bl); /* application bodies may be secrets */
  free(rb);
  session_put(s, x, kill);
  ot_env_clear(&e);
}

static void ctx_cb(void *arg) {
  srv_ctx *c = arg;
  ot_server *s = c->srv;
  int rv = nng_aio_result(c->aio);
  if (c->sending) {
    if (rv != 0) nng_msg_free(nng_aio_get_msg(c->aio)); /* a failed send still owns its message */
    if (rv == NNG_ECLOSED || rv == NNG_ECANCELED) return;
    c->sending = 0;
    nng_ctx_recv(c->ctx, c->aio);
    return;
  }
  if (rv == NNG_ECLOSED || rv == NNG_ECANCELED) return;
  if (rv != 0) {
    nng_ctx_recv(c->ctx, c->aio);
    return;
  }
  nng_msg *m = nng_aio_get_msg(c->aio);
  pthread_mutex_lock(&s->qmu);
  if (s->stopping) {
    pthread_mutex_unlock(&s->qmu);
    nng_msg_free(m);
    return;
  }
  s->q[(s->qhead + s->qlen) % s->n_ctx] = (job){c, m};
  s->qlen++;
  pthread_cond_signal(&s->qcv);
  pthread_mutex_unlock(&s->qmu);
}

static void *worker_main(void *arg) {
  ot_server *s = arg;
  for (;;) {
    pthread_mutex_lock(&s->qmu);
    while (!s->qlen && !s->stopping) pthread_cond_wait(&s->qcv, &s->qmu);
    if (s->stopping) {
      pthread_mutex_unlock(&s->qmu);
      return NULL;
    }
    job j = s->q[s->qhead];
    s->qhead = (s->qhead + 1) % s->n_ctx;
    s->qlen--;
    pthread_mutex_unlock(&s->qmu);
    uint8_t *out = NULL;
    size_t out_len = 0;
    nng_msg *r = NULL;
    process(s, pipe_key(nng_msg_get_pipe(j.m)), nng_msg_body(j.m), nng_msg_len(j.m), &out, &out_len, &r);
    nng_msg_free(j.m);
    if (r || (out && nng_msg_alloc(&r, out_len) == 0)) {
      if (out) memcpy(nng_msg_body(r), out, out_len);
      j.c->sending = 1;
      nng_aio_set_msg(j.c->aio, r);
      nng_ctx_send(j.c->ctx, j.c->aio);
    } else {
      nng_ctx_recv(j.c->ctx, j.c->aio); /* no reply possible: the client times out and retries */
    }
    free(out);
  }
}

static int nng_fail(int rv, const char *what, const char *url) {
  return ot_error(OT_ERR_IO, "%s %s: %s", what, url ? url : "", nng_strerror(rv));
}

void ot_server_stop(ot_server *s) {
  if (!s) return;
  pthread_mutex_lock(&s->qmu);
  s->stopping = 1;
  pthread_cond_broadcast(&s->qcv);
  pthread_mutex_unlock(&s->qmu);
  for (int i = 0; i < s->n_workers; i++) pthread_join(s->workers[i], NULL);
  for (int i = 0; i < s->n_ctx; i++)
    if (s->ctxs[i].aio) nng_aio_stop(s->ctxs[i].aio);
  while (s->qlen) {
    nng_msg_free(s->q[s->qhead].m);
    s->qhead = (s->qhead + 1) % s->n_ctx;
    s->qlen--;
  }
  for (int i = 0; i < s->n_ctx; i++) nng_ctx_close(s->ctxs[i].ctx);
  nng_close(s->sock);
  for (int i = 0; i < s->n_ctx; i++)
    if (s->ctxs[i].aio) nng_aio_free(s->ctxs[i].aio);
  for (int b = 0; b < N_BUCKETS; b++)
    while (s->buckets[b]) {
      srv_session *x = s->buckets[b];
      s->buckets[b] = x->next;
      session_free(s, x);
    }
  while (s->transfers.head) {
    srv_entry *e = s->transfers.head;
    s->transfers.head = e->next;
    transfer_end(s, (srv_transfer *)e);
  }
  while (s->fetches.head) {
    srv_entry *e = s->fetches.head;
    s->fetches.head = e->next;
    fetch_end(s, (srv_fetch *)e);
  }
  pthread_cond_destroy(&s->dcv);
  pthread_mutex_destroy(&s->qmu);
  pthread_cond_destroy(&s->qcv);
  pthread_mutex_destroy(&s->tmu);
  pthread_mutex_destroy(&s->stmu);
  pthread_mutex_destroy(&s->pmu);
  free(s->conns);
  free(s->workers);
  free(s->ctxs);
  free(s->q);
  free(s);
}

int ot_server_start(const ot_server_config *cfg, ot_server **out) {
  if (!cfg || !cfg->url || !cfg->id || !cfg->acl || !out)
    return ot_error(OT_ERR_INVALID, "ot_server_start: url, identity and access control are required");
  int rc = ot_sodium_init();
  if (rc) return rc;
  ot_server *s = calloc(1, sizeof *s);
  if (!s) return ot_error(OT_ERR_NOMEM, "out of memory");
  s->cfg = *cfg;
  ot_server_config *c = &s->cfg;
  if (c->n_contexts <= 0) c->n_contexts = 64;
  if (c->n_workers <= 0) c->n_workers = 2;
  if (c->lanes == 0 || c->lanes > OT_MAX_LANES) c->lanes = 8;
  if (!c->ttl_seconds) c->ttl_seconds = 3600;
  if (!c->max_msg) c->max_msg = OT_MSG_MAX_DEFAULT;
  if (c->max_msg > OT_MSG_MAX_HARD) c->max_msg = OT_MSG_MAX_HARD;
  if (!c->max_transfer) c->max_transfer = 16ull << 30;
  if (c->max_sessions <= 0) c->max_sessions = 4096;
  if (c->max_transfers <= 0) c->max_transfers = 1024;
  if (c->max_pending <= 0) c->max_pending = c->max_sessions / 4 < 1024 ? c->max_sessions / 4 : 1024;
  if (c->max_pending < 1) c->max_pending = 1;
  if (c->max_open_per_peer <= 0) c->max_open_per_peer = 16;
  if (c->hello_rate == 0) c->hello_rate = 20;
  if (c->hello_burst <= 0) c->hello_burst = 200;
  if (c->max_conns <= 0) {
    struct rlimit rl;
    c->max_conns =
        getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY ? (int)(rl.rlim_cur / 2) : 4096;
    if (c->max_conns > 4096) c->max_conns = 4096;
    if (c->max_conns < 16) c->max_conns = 16;
  }
  if (c->max_conns_per_addr <= 0) c->max_conns_per_addr = 128;
  if (!c->transfer_idle_seconds) c->transfer_idle_seconds = OT_TRANSFER_IDLE_DEFAULT;
  if (!c->fetch_chunk || c->fetch_chunk > OT_CHUNK_MAX) c->fetch_chunk = 1u << 20;
  if (c->max_msg < 64u << 10) c->max_msg = 64u << 10;
  pthread_mutex_init(&s->qmu, NULL);
  pthread_cond_init(&s->qcv, NULL);
  pthread_mutex_init(&s->tmu, NULL);
  pthread_mutex_init(&s->stmu, NULL);
  pthread_mutex_init(&s->pmu, NULL);
  pthread_cond_init(&s->dcv, NULL);
  s->n_ctx = c->n_contexts;
  s->ctxs = calloc((size_t)s->n_ctx, sizeof *s->ctxs);
  s->q = calloc((size_t)s->n_ctx, sizeof *s->q);
  s->workers = calloc((size_t)c->n_workers, sizeof *s->workers);
  s->conns = calloc((size_t)c->max_conns, sizeof *s->conns);
  if (!s->ctxs || !s->q || !s->workers || !s->conns) {
    free(s->conns);
    free(s->ctxs);
    free(s->q);
    free(s->workers);
    free(s);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  int rv = nng_rep0_open(&s->sock);
  if (rv) {
    rc = nng_fail(rv, "cannot open a REP socket", NULL);
    free(s->conns);
    free(s->ctxs);
    free(s->q);
    free(s->workers);
    free(s);
    return rc;
  }
  /* Before listening: options are copied to endpoints when they are made. */
  /* nng's limit is twice ours: a frame a little over max_msg still reaches us and gets a
   * logged refusal; anything larger is dropped by nng (pipe closed) before allocation. */
  size_t nng_max = c->max_msg * 2 < OT_MSG_MAX_HARD ? c->max_msg * 2 : OT_MSG_MAX_HARD;
  rv = nng_socket_set_size(s->sock, NNG_OPT_RECVMAXSZ, nng_max);
  if (!rv) rv = nng_pipe_notify(s->sock, NNG_PIPE_EV_ADD_PRE, on_pipe, s);
  if (!rv) rv = nng_pipe_notify(s->sock, NNG_PIPE_EV_REM_POST, on_pipe, s);
  for (int i = 0; !rv && i < s->n_ctx; i++) {
    s->ctxs[i].srv = s;
    rv = nng_aio_alloc(&s->ctxs[i].aio, ctx_cb, &s->ctxs[i]);
    if (!rv) rv = nng_ctx_open(&s->ctxs[i].ctx, s->sock);
  }
  if (!rv) rv = nng_listen(s->sock, c->url, &s->lis, 0);
  if (rv) {
    rc = nng_fail(rv, "cannot listen on", c->url);
    s->n_workers = 0;
    ot_server_stop(s);
    return rc;
  }
  if (strncmp(c->url, "tcp", 3) == 0) {
    int port = 0;
    if (nng_listener_get_int(s->lis, NNG_OPT_TCP_BOUND_PORT, &port) == 0) s->port = port;
  }
  for (int i = 0; i < c->n_workers; i++) {
    if (pthread_create(&s->workers[i], NULL, worker_main, s) != 0) {
      rc = ot_error(OT_ERR_INTERNAL, "cannot start a worker thread");
      break;
    }
    s->n_workers++;
  }
  if (rc) {
    ot_server_stop(s);
    return rc;
  }
  for (int i = 0; i < s->n_ctx; i++) nng_ctx_recv(s->ctxs[i].ctx, s->ctxs[i].aio);
  *out = s;
  return OT_OK;
}

int ot_server_port(ot_server *s) { return s ? s->port : 0; }

void ot_server_get_stats(ot_server *s, ot_server_stats *out) {
  pthread_mutex_lock(&s->stmu);
  *out = s->stats;
  pthread_mutex_unlock(&s->stmu);
}

/* ================================ client ================================ */

struct ot_client {
  ot_client_config cfg;
  ot_identity id;
  uint8_t cloud_pk[32];
  int have_pk;
  char fingerprint[OT_FINGERPRINT_LEN];
  char *token;
  nng_socket sock;
  nng_ctx ctx[OT_MAX_LANES];
  nng_aio *aio[OT_MAX_LANES];
  int n_lanes_open;
  pthread_rwlock_t lk; /* write: handshake; read: using the session */
  ot_session s;
  uint64_t generation;
};

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

/* Test hook: with OT_WIRE_TRACE=PATH, the client appends to PATH every plaintext body it
 * is about to seal ("plain N\n" + bytes) and every frame it sends ("wire N\n" + bytes),
 * so a test can search all a device ever sent (tests/test_session.c). One writev per
 * record on an O_APPEND file: records from several lanes do not interleave. */
static void wire_trace(const char *kind, const void *data, size_t len) {
  const char *path = getenv("OT_WIRE_TRACE");
  if (!path || !*path) return;
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return;
  char head[64];
  int hl = snprintf(head, sizeof head, "%s %zu\n", kind, len);
  struct iovec iov[3] = {{head, (size_t)hl}, {(void *)data, len}, {"\n", 1}};
  if (writev(fd, iov, 3) < 0) { /* best effort: a test hook never fails a request */
  }
  close(fd);
}

/* One request/reply on a lane's context: sends m (consumed); the reply message is the
 * caller's. A transport error is OT_ERR_IO. */
static int round_trip_msg(ot_client *c, uint32_t lane, nng_msg *m, nng_msg **reply) {
  wire_trace("wire", nng_msg_body(m), nng_msg_len(m));
  nng_aio *aio = c->aio[lane];
  nng_aio_set_msg(aio, m);
  nng_aio_set_timeout(aio, c->cfg.timeout_ms);
  nng_ctx_send(c->ctx[lane], aio);
  nng_aio_wait(aio);
  int rv = nng_aio_result(aio);
  if (rv) {
    nng_msg_free(nng_aio_get_msg(aio));
    return ot_error(OT_ERR_IO, "send to %s: %s", c->cfg.url, nng_strerror(rv));
  }
  nng_aio_set_timeout(aio, c->cfg.timeout_ms);
  nng_ctx_recv(c->ctx[lane], aio);
  nng_aio_wait(aio);
  rv = nng_aio_result(aio);
  if (rv) return ot_error(OT_ERR_IO, "no reply from %s: %s", c->cfg.url, nng_strerror(rv));
  *reply = nng_aio_get_msg(aio);
  return OT_OK;
}

/* The same with plain buffers (handshake, tests). */
static int round_trip(ot_client *c, uint32_t lane, const uint8_t *wire, size_t len, uint8_t **reply,
                      size_t *reply_len) {
  nng_msg *m = NULL;
  if (nng_msg_alloc(&m, len)) return ot_error(OT_ERR_NOMEM, "out of memory");
  memcpy(nng_msg_body(m), wire, len);
  int rc = round_trip_msg(c, lane, m, &m);
  if (rc) return rc;
  size_t n = nng_msg_len(m);
  uint8_t *b = malloc(n ? n : 1);
  if (!b) {
    nng_msg_free(m);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  memcpy(b, nng_msg_body(m), n);
  nng_msg_free(m);
  *reply = b;
  *reply_len = n;
  return OT_OK;
}

int ot_client_raw(ot_client *c, uint32_t lane, const uint8_t *wire, size_t len, uint8_t **reply,
                  size_t *reply_len) {
  if (!c || lane >= (uint32_t)c->n_lanes_open) return ot_error(OT_ERR_INVALID, "ot_client_raw: bad lane");
  return round_trip(c, lane, wire, len, reply, reply_len);
}

static int backoff(ot_client *c, int attempt) {
  int ms = c->cfg.backoff_ms << (attempt < 10 ? attempt : 10);
  if (ms > 2000) ms = 2000;
  ms += (int)randombytes_uniform((uint32_t)ms / 4 + 1);
  sleep_ms(ms);
  return 0;
}

/* A full handshake on lane 0's context (write lock held). */
static int handshake_locked(ot_client *c) {
  ot_hs_client_config hc = {&c->id,
                            c->have_pk ? c->cloud_pk : NULL,
                            c->have_pk ? NULL : c->fingerprint,
                            c->token,
                            c->cfg.version,
                            c->cfg.no_aesgcm};
  int rc = OT_OK;
  for (int attempt = 0; attempt <= c->cfg.retries; attempt++) {
    if (attempt) backoff(c, attempt - 1);
    ot_hs_client *h = NULL;
    uint8_t *m1 = NULL, *r1 = NULL, *m2 = NULL, *r2 = NULL;
    size_t l1 = 0, rl1 = 0, l2 = 0, rl2 = 0;
    ot_session s;
    rc = ot_hs_client_new(&hc, &h);
    if (rc == OT_OK) rc = ot_hs_client_hello(h, &m1, &l1);
    if (rc == OT_OK) rc = round_trip(c, 0, m1, l1, &r1, &rl1);
    if (rc == OT_OK) rc = ot_hs_client_on_server_hello(h, r1, rl1, &m2, &l2);
    if (rc == OT_OK) rc = round_trip(c, 0, m2, l2, &r2, &rl2);
    if (rc == OT_OK) rc = ot_hs_client_on_server_finish(h, r2, rl2, &s);
    ot_hs_client_free(h);
    free(m1);
    free(r1);
    free(m2);
    free(r2);
    if (rc == OT_OK) {
      c->s = s;
      ot_session_wipe(&s);
      c->generation++;
      if (c->token) { /* a token is good for one enrolment */
        sodium_memzero(c->token, strlen(c->token));
        free(c->token);
        c->token = NULL;
      }
      return OT_OK;
    }
    if (rc != OT_ERR_IO) return rc; /* refused or bad reply: retrying will not help */
  }
  return rc;
}

static int rehandshake(ot_client *c, uint64_t seen_generation) {
  pthread_rwlock_wrlock(&c->lk);
  int rc = OT_OK;
  if (c->generation == seen_generation) rc = handshake_locked(c);
  pthread_rwlock_unlock(&c->lk);
  return rc;
}

/* One sealed request with retries and rekeys. The request is sealed straight into an
 * nng message and the reply decrypted in place in the one nng gives back: *rbody points
 * into *rmsg, which the caller frees. */
static int request_msg(ot_client *c, uint32_t lane, uint32_t type, const uint8_t *body, size_t len,
                       uint32_t *rtype, nng_msg **rmsg, const uint8_t **rbody, size_t *rbody_len) {
  if (!c || lane >= (uint32_t)c->n_lanes_open) return ot_error(OT_ERR_INVALID, "ot_client_request: bad lane");
  int rc = OT_OK, rehandshakes = 0;
  for (int attempt = 0; attempt <= c->cfg.retries;) {
    pthread_rwlock_rdlock(&c->lk);
    uint64_t gen = c->generation;
    if (lane >= c->s.lanes) {
      pthread_rwlock_unlock(&c->lk);
      return ot_error(OT_ERR_RANGE, "lane %u not offered by the server (%u lanes)", lane, c->s.lanes);
    }
    /* rekey ahead of expiry (once per request, whatever the server's TTL) */
    int expiring = rehandshakes == 0 && ot_unix_now() + 5 >= c->s.expires_at;
    int rekey = expiring; /* also: the server does not know our session */
    nng_msg *m = NULL, *r = NULL;
    uint8_t *b = NULL;
    size_t blen = 0;
    ot_env_header h = {0};
    if (expiring) {
      rc = ot_error(OT_ERR_NOTFOUND, "session %016llx about to expire", (unsigned long long)c->s.id);
    } else if (c->s.tx_seq[lane] == UINT64_MAX) {
      rc = ot_error(OT_ERR_RANGE, "sequence numbers exhausted: rekey");
    } else {
      wire_trace("plain", body, len);
      size_t wl = ot_env_sealed_len(lane, type, len);
      /* nng would drop a frame this large without a word: refuse it here */
      rc = c->s.peer_max_msg && wl > c->s.peer_max_msg
               ? ot_error(OT_ERR_RANGE, "request of %zu bytes exceeds the server's limit of %u", wl,
                          c->s.peer_max_msg)
           : nng_msg_alloc(&m, wl) ? ot_error(OT_ERR_NOMEM, "out of memory")
                                   : OT_OK;
      if (rc == OT_OK)
        rc = ot_env_seal_to(&c->s, lane, c->s.tx_seq[lane] + 1, type, body, len, nng_msg_body(m), wl);
      if (rc == OT_OK)
        c->s.tx_seq[lane]++; /* one thread per lane */
      else if (m)
        nng_msg_free(m);
    }
    if (!expiring && rc == OT_OK) {
      pthread_rwlock_unlock(&c->lk); /* no lock across the network wait */
      rc = round_trip_msg(c, lane, m, &r);
      pthread_rwlock_rdlock(&c->lk);
      ot_env e = {0};
      if (rc == OT_OK && c->generation != gen) {
        rc = ot_error(OT_ERR_NOTFOUND, "session changed during the request");
        rekey = 1;
      }
      if (rc == OT_OK) rc = ot_env_view(nng_msg_body(r), nng_msg_len(r), c->cfg.max_msg, &e);
      if (rc == OT_OK && !e.sealed && e.h.type == OT_MSG_REFUSAL) {
        /* unauthenticated: only "unknown session" is acted on (by a new handshake) */
        rc = ot_refusal_error(e.data, e.len, 0);
        rekey = rc == OT_ERR_NOTFOUND;
      } else if (rc == OT_OK) {
        rc = ot_env_unseal_inplace(&c->s, &e, &b, &blen);
        if (rc == OT_OK) rc = ot_session_accept_seq(&c->s, e.h.lane, e.h.seq);
        if (rc == OT_OK) h = e.h;
        if (rc == OT_OK && h.lane != lane)
          rc = ot_error(OT_ERR_FORMAT, "reply on lane %u to a request on lane %u", h.lane, lane);
        if (rc == OT_OK && h.type == OT_MSG_REFUSAL) rc = ot_refusal_error(b, blen, 1);
      }
      ot_env_clear(&e);
    }
    pthread_rwlock_unlock(&c->lk);
    if (rc == OT_OK) {
      if (rtype) *rtype = h.type;
      *rmsg = r;
      *rbody = b;
      *rbody_len = blen;
      return OT_OK;
    }
    if (r) nng_msg_free(r);
    if (rekey && rehandshakes < 2) {
      /* The session is unknown to the server (expired, or the server restarted): rekey. */
      rehandshakes++;
      int hr = rehandshake(c, gen);
      if (hr) return hr;
      continue;
    }
    if (rc != OT_ERR_IO) return rc;
    backoff(c, attempt);
    attempt++;
  }
  return rc;
}

int ot_client_request(ot_client *c, uint32_t lane, uint32_t type, const uint8_t *body, size_t len,
                      uint32_t *rtype, uint8_t **reply, size_t *reply_len) {
  nng_msg *m = NULL;
  const uint8_t *b = NULL;
  size_t bl = 0;
  int rc = request_msg(c, lane, type, body, len, rtype, &m, &b, &bl);
  if (rc) return rc;
  uint8_t *copy = malloc(bl ? bl : 1);
  if (copy && bl) memcpy(copy, b, bl);
  nng_msg_free(m);
  if (!copy) return ot_error(OT_ERR_NOMEM, "out of memory");
  *reply = copy;
  *reply_len = bl;
  return OT_OK;
}

int ot_client_call(ot_client *c, const uint8_t *body, size_t len, uint8_t **reply, size_t *reply_len) {
  uint32_t t = 0;
  uint8_t *r = NULL;
  size_t rl = 0;
  int rc = ot_client_request(c, 0, OT_MSG_APP, body, len, &t, &r, &rl);
  if (rc) return rc;
  if (t != OT_MSG_APP) {
    free(r);
    return ot_error(OT_ERR_FORMAT, "reply of type %u to an application request", t);
  }
  *reply = r;
  *reply_len = rl;
  return OT_OK;
}

ot_session *ot_client_session(ot_client *c) { return &c->s; }

void ot_client_close(ot_client *c) {
  if (!c) return;
  for (int i = 0; i < c->n_lanes_open; i++) nng_aio_stop(c->aio[i]);
  for (int i = 0; i < c->n_lanes_open; i++) nng_ctx_close(c->ctx[i]);
  nng_close(c->sock);
  for (int i = 0; i < c->n_lanes_open; i++) nng_aio_free(c->aio[i]);
  pthread_rwlock_destroy(&c->lk);
  if (c->token) {
    sodium_memzero(c->token, strlen(c->token));
    free(c->token);
  }
  sodium_memzero(c, sizeof *c);
  free(c);
}

int ot_client_open(const ot_client_config *cfg, ot_client **out) {
  if (!cfg || !cfg->url || !cfg->id || !out)
    return ot_error(OT_ERR_INVALID, "ot_client_open: url and identity are required");
  if (!cfg->cloud_pk && !cfg->cloud_fingerprint)
    return ot_error(OT_ERR_INVALID, "the cloud's key or fingerprint must be pinned");
  int rc = ot_sodium_init();
  if (rc) return rc;
  ot_client *c = calloc(1, sizeof *c);
  if (!c) return ot_error(OT_ERR_NOMEM, "out of memory");
  c->cfg = *cfg;
  c->id = *cfg->id;
  if (cfg->cloud_pk) {
    memcpy(c->cloud_pk, cfg->cloud_pk, 32);
    c->have_pk = 1;
  } else {
    snprintf(c->fingerprint, sizeof c->fingerprint, "%s", cfg->cloud_fingerprint);
  }
  if (cfg->enrol_token && *cfg->enrol_token) c->token = strdup(cfg->enrol_token);
  if (c->cfg.timeout_ms <= 0) c->cfg.timeout_ms = 10000;
  c->cfg.retries = cfg->retries < 0 ? 0 : cfg->retries == 0 ? 4 : cfg->retries;
  if (c->cfg.backoff_ms <= 0) c->cfg.backoff_ms = 50;
  if (!c->cfg.max_msg) c->cfg.max_msg = OT_MSG_MAX_DEFAULT;
  if (c->cfg.max_msg > OT_MSG_MAX_HARD) c->cfg.max_msg = OT_MSG_MAX_HARD;
  c->cfg.id = NULL;
  c->cfg.enrol_token = NULL;
  pthread_rwlockattr_t la;
  pthread_rwlockattr_init(&la);
  /* a re-handshake must not starve behind lanes that keep reading the session */
  pthread_rwlockattr_setkind_np(&la, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init(&c->lk, &la);
  pthread_rwlockattr_destroy(&la);
  int rv = nng_req0_open(&c->sock);
  if (rv) {
    rc = nng_fail(rv, "cannot open a REQ socket", NULL);
    pthread_rwlock_destroy(&c->lk);
    sodium_memzero(c, sizeof *c);
    free(c);
    return rc;
  }
  /* Before dialling: receive limit, reconnect backoff; nng's own resend is off (we
   * retry with fresh sequence numbers, and the server answers retransmissions). */
  rv = nng_socket_set_size(c->sock, NNG_OPT_RECVMAXSZ, c->cfg.max_msg);
  if (!rv) rv = nng_socket_set_ms(c->sock, NNG_OPT_RECONNMINT, 20);
  if (!rv) rv = nng_socket_set_ms(c->sock, NNG_OPT_RECONNMAXT, 2000);
  if (!rv) rv = nng_socket_set_ms(c->sock, NNG_OPT_REQ_RESENDTIME, NNG_DURATION_INFINITE);
  for (int i = 0; !rv && i < OT_MAX_LANES; i++) {
    rv = nng_aio_alloc(&c->aio[i], NULL, NULL);
    if (!rv) {
      rv = nng_ctx_open(&c->ctx[i], c->sock);
      if (rv)
        nng_aio_free(c->aio[i]);
      else
        c->n_lanes_open++;
    }
  }
  if (!rv) rv = nng_dial(c->sock, c->cfg.url, NULL, NNG_FLAG_NONBLOCK);
  if (rv) {
    rc = nng_fail(rv, "cannot dial", c->cfg.url);
    ot_client_close(c);
    return rc;
  }
  pthread_rwlock_wrlock(&c->lk);
  rc = handshake_locked(c);
  pthread_rwlock_unlock(&c->lk);
  if (rc) {
    ot_client_close(c);
    return rc;
  }
  *out = c;
  return OT_OK;
}

/* ---- lanes: one transfer spread over the session's lanes ---- */

/* What an upload and a download share across their lanes: the first error (the other
 * lanes stop at it) and the progress report. */
typedef struct {
  pthread_mutex_t mu;
  _Atomic int failed;
  int rc;
  char detail[512];
  void (*progress)(void *, uint64_t, uint64_t);
  void *progress_arg;
  uint64_t done_bytes, total; /* under mu */
} lanes;

static void lanes_fail(lanes *l, int rc) {
  pthread_mutex_lock(&l->mu);
  if (!l->rc) {
    l->rc = rc;
    snprintf(l->detail, sizeof l->detail, "%s", ot_error_detail());
  }
  pthread_mutex_unlock(&l->mu);
  atomic_store(&l->failed, 1);
}

static void lanes_progress(lanes *l, uint64_t bytes) {
  if (!l->progress) return;
  pthread_mutex_lock(&l->mu);
  l->done_bytes += bytes;
  l->progress(l->progress_arg, l->done_bytes, l->total);
  pthread_mutex_unlock(&l->mu);
}

typedef struct {
  void *job;
  uint32_t lane;
} lane_arg;

/* Runs lane({job, i}) for i < window: lane 0 on this thread, the others on their own
 * (fewer if a thread cannot start). */
static void lanes_run(void *(*lane)(void *), void *job, int window) {
  pthread_t th[OT_MAX_LANES];
  lane_arg args[OT_MAX_LANES];
  int started = 0;
  for (int i = 1; i < window; i++) {
    args[i] = (lane_arg){job, (uint32_t)i};
    if (pthread_create(&th[i], NULL, lane, &args[i]) != 0) break;
    started = i;
  }
  args[0] = (lane_arg){job, 0};
  lane(&args[0]);
  for (int i = 1; i <= started; i++) pthread_join(th[i], NULL);
}

/* ---- sending a tensor ---- */

typedef struct {
  ot_client *c;
  ot_source src;
  uint64_t size, n, stop_after;
  uint32_t chunk;
  uint8_t id[16];
  uint8_t (*hashes)[32];
  _Atomic uint64_t next, sent;
  lanes l;
} send_job;

static void *send_lane(void *arg) {
  lane_arg *a = arg;
  send_job *j = a->job;
  /* this lane's chunk body, reused for every chunk: memory is window x chunk; a file
   * source reads straight into the place the data takes in it */
  size_t cap = ot_chunk_packed_len(j->n, 0, j->chunk, 0);
  uint8_t *body = malloc(cap);
  if (!body) lanes_fail(&j->l, ot_error(OT_ERR_NOMEM, "out of memory"));
  for (; body;) {
    if (atomic_load(&j->l.failed)) break;
    uint64_t i = atomic_fetch_add(&j->next, 1);
    if (i >= j->n) break;
    if (j->stop_after && atomic_fetch_add(&j->sent, 1) >= j->stop_after) {
      lanes_fail(&j->l, ot_error(OT_ERR_IO, "stopped after %llu chunks (test hook)",
                                 (unsigned long long)j->stop_after));
      break;
    }
    if (!j->stop_after) atomic_fetch_add(&j->sent, 1);
    uint64_t off = i * j->chunk;
    size_t len = (size_t)(j->size - off < j->chunk ? j->size - off : j->chunk);
    const uint8_t *data = NULL, *r = NULL;
    size_t bl = ot_chunk_packed_len(i, 0, len, 0), rl = 0;
    uint32_t t = 0;
    nng_msg *rm = NULL;
    int rc = j->src.read_at(j->src.self, off, len, body + (bl - len), &data);
    if (rc == OT_OK) {
      ot_chunk_hash(i, data, len, j->hashes[i]);
      rc = ot_chunk_pack_to(j->id, i, 0, data, len, NULL, body, bl);
    }
    if (rc == OT_OK) rc = request_msg(j->c, a->lane, OT_MSG_CHUNK, body, bl, &t, &rm, &r, &rl);
    ot_transfer_status st;
    if (rc == OT_OK && t != OT_MSG_TRANSFER_STATUS)
      rc = ot_error(OT_ERR_FORMAT, "unexpected reply type %u to a chunk", t);
    if (rc == OT_OK) rc = ot_status_decode(r, rl, &st);
    if (rm) nng_msg_free(rm);
    if (rc) {
      lanes_fail(&j->l, rc);
      break;
    }
    lanes_progress(&j->l, len);
  }
  free(body);
  return NULL;
}

static int mem_read(void *self, uint64_t off, size_t len, uint8_t *buf, const uint8_t **data) {
  (void)len;
  (void)buf;
  *data = (const uint8_t *)self + off;
  return OT_OK;
}

int ot_client_send(ot_client *c, const char *name, const uint8_t *data, uint64_t size, ot_send_opts *opts) {
  if (!data && size) return ot_error(OT_ERR_INVALID, "ot_client_send: NULL data");
  return ot_client_send_source(c, name, (ot_source){.read_at = mem_read, .self = (void *)data}, size, opts);
}

static int file_read(void *self, uint64_t off, size_t len, uint8_t *buf, const uint8_t **data) {
  int fd = *(int *)self;
  size_t got = 0;
  while (got < len) {
    ssize_t n = pread(fd, buf + got, len - got, (off_t)(off + got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      return ot_error(OT_ERR_IO, "cannot read the file being sent: %s", n ? strerror(errno) : "short file");
    got += (size_t)n;
  }
  *data = buf;
  return OT_OK;
}

int ot_client_send_file(ot_client *c, const char *name, const char *path, ot_send_opts *opts) {
  if (!path) return ot_error(OT_ERR_INVALID, "ot_client_send_file: NULL path");
  int fd = -1;
  uint64_t size = 0;
  int rc = ot_file_open_regular(path, UINT64_MAX, &fd, &size);
  if (rc) return rc;
  rc = ot_client_send_source(c, name, (ot_source){.read_at = file_read, .self = &fd}, size, opts);
  close(fd);
  return rc;
}

int ot_client_send_source(ot_client *c, const char *name, ot_source src, uint64_t size, ot_send_opts *opts) {
  if (!c || !name || !src.read_at || !opts) return ot_error(OT_ERR_INVALID, "ot_client_send: NULL argument");
  uint32_t chunk = opts->chunk ? opts->chunk : (1u << 20);
  if (chunk > OT_CHUNK_MAX || chunk + 256 > c->cfg.max_msg)
    return ot_error(OT_ERR_RANGE, "chunk size %u does not fit the message limit", chunk);
  ot_transfer_begin b = {0};
  if (opts->transfer_id)
    memcpy(b.id, opts->transfer_id, 16);
  else
    randombytes_buf(b.id, 16);
  snprintf(b.name, sizeof b.name, "%s", name);
  b.total = size;
  b.chunk = chunk;
  uint8_t *body = NULL, *r = NULL;
  size_t bl = 0, rl = 0;
  uint32_t t = 0;
  ot_transfer_status st;
  int rc = ot_begin_pack(&b, &body, &bl);
  if (rc == OT_OK) rc = ot_client_request(c, 0, OT_MSG_TRANSFER_BEGIN, body, bl, &t, &r, &rl);
  free(body);
  if (rc == OT_OK && t != OT_MSG_TRANSFER_STATUS) rc = ot_error(OT_ERR_FORMAT, "unexpected reply type %u", t);
  if (rc == OT_OK) rc = ot_status_decode(r, rl, &st);
  free(r);
  if (rc) return rc;
  memcpy(opts->id_out, b.id, 16);
  if (st.committed) { /* the receiver already has all of it (an earlier reply was lost) */
    opts->resumed_from = st.have_prefix;
    opts->sent = 0;
    return OT_OK;
  }
  send_job *j = calloc(1, sizeof *j);
  uint64_t n = ot_transfer_chunks(size, chunk);
  if (!j || !(j->hashes = calloc(n ? n : 1, 32))) {
    free(j);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  if (st.have_prefix > n) st.have_prefix = n;
  j->c = c;
  j->src = src;
  j->size = size;
  j->n = n;
  j->chunk = chunk;
  j->stop_after = opts->stop_after;
  j->l.progress = opts->progress;
  j->l.total = size;
  j->l.progress_arg = opts->progress_arg;
  j->l.done_bytes = st.have_prefix * chunk < size ? st.have_prefix * chunk : size;
  memcpy(j->id, b.id, 16);
  atomic_store(&j->next, st.have_prefix);
  pthread_mutex_init(&j->l.mu, NULL);
  int window = opts->window > 0 ? opts->window : 4;
  pthread_rwlock_rdlock(&c->lk);
  if ((uint32_t)window > c->s.lanes) window = (int)c->s.lanes;
  pthread_rwlock_unlock(&c->lk);
  lanes_run(send_lane, j, window);
  /* chunks the receiver already had: hash them here for the digest */
  uint8_t *buf = st.have_prefix ? malloc(chunk) : NULL;
  if (st.have_prefix && !buf) lanes_fail(&j->l, ot_error(OT_ERR_NOMEM, "out of memory"));
  for (uint64_t i = 0; buf && !j->l.rc && i < st.have_prefix; i++) {
    uint64_t off = i * chunk;
    size_t len = (size_t)(size - off < chunk ? size - off : chunk);
    const uint8_t *d = NULL;
    int rr = src.read_at(src.self, off, len, buf, &d);
    if (rr)
      lanes_fail(&j->l, rr);
    else
      ot_chunk_hash(i, d, len, j->hashes[i]);
  }
  free(buf);
  opts->resumed_from = st.have_prefix;
  opts->sent = atomic_load(&j->sent);
  if (j->stop_after && opts->sent > j->stop_after) opts->sent = j->stop_after;
  rc = j->l.rc;
  if (rc)
    ot_error(rc, "%s", j->l.detail);
  else if (j->stop_after && j->stop_after >= n)
    rc = ot_error(OT_ERR_IO, "stopped before the final marker (test hook)");
  if (rc == OT_OK) { /* the final marker: its own buffers (the begin request's are freed) */
    uint8_t digest[32], *fbody = NULL, *fr = NULL;
    size_t fbl = 0, frl = 0;
    ot_transfer_digest((const uint8_t(*)[32])j->hashes, n, size, chunk, digest);
    rc = ot_chunk_pack(b.id, n, 1, NULL, 0, digest, &fbody, &fbl);
    if (rc == OT_OK) rc = ot_client_request(c, 0, OT_MSG_CHUNK, fbody, fbl, &t, &fr, &frl);
    free(fbody);
    if (rc == OT_OK) rc = ot_status_decode(fr, frl, &st);
    free(fr);
    if (rc == OT_OK && !st.committed)
      rc = ot_error(OT_ERR_FORMAT, "the receiver did not commit the transfer");
  }
  pthread_mutex_destroy(&j->l.mu);
  free(j->hashes);
  free(j);
  return rc;
}

/* ---- file sources ---- */

int ot_file_source_open(const char *path, ot_source *src, uint64_t *size) {
  if (!path || !src || !size) return ot_error(OT_ERR_INVALID, "ot_file_source_open: NULL argument");
  int *fd = malloc(sizeof *fd);
  if (!fd) return ot_error(OT_ERR_NOMEM, "out of memory");
  int rc = ot_file_open_regular(path, UINT64_MAX, fd, NULL);
  struct stat sb;
  if (rc == OT_OK && fstat(*fd, &sb) != 0) {
    rc = ot_error(OT_ERR_IO, "cannot stat %s: %s", path, strerror(errno));
    close(*fd);
  }
  if (rc) {
    free(fd);
    return rc;
  }
  /* the stamp changes whenever the file is replaced or rewritten */
  uint64_t k[5] = {(uint64_t)sb.st_dev, (uint64_t)sb.st_ino, (uint64_t)sb.st_size,
                   (uint64_t)sb.st_mtim.tv_sec, (uint64_t)sb.st_mtim.tv_nsec};
  uint64_t stamp = 0;
  crypto_generichash((uint8_t *)&stamp, sizeof stamp, (const uint8_t *)k, sizeof k, NULL, 0);
  *src = (ot_source){file_read, fd, stamp ? stamp : 1};
  *size = (uint64_t)sb.st_size;
  return OT_OK;
}

void ot_file_source_close(ot_source *src) {
  if (!src || !src->self) return;
  close(*(int *)src->self);
  free(src->self);
  src->self = NULL;
}

/* ---- fetching (download) ---- */

typedef struct {
  ot_client *c;
  ot_sink sink;
  ot_fetch_info fi;
  uint64_t n, stop_after;
  uint8_t *have;         /* chunks already present (resume) */
  uint8_t (*hashes)[32]; /* h_i of every chunk, present or fetched */
  _Atomic uint64_t next, fetched, claimed;
  /* called with each verified chunk, after the sink wrote it (fetch_file's state log) */
  int (*on_chunk)(void *arg, uint64_t index, const uint8_t hash[32]);
  void *arg;
  lanes l;
} fetch_job;

static int fetch_one(fetch_job *j, uint32_t lane, uint64_t i) {
  uint8_t req[64];
  size_t bl = 0, rl = 0;
  const uint8_t *r = NULL;
  nng_msg *rm = NULL;
  uint32_t t = 0;
  /* FetchChunk: id and index, packed here (no allocation) */
  uint8_t *p = req;
  *p++ = 0x0a;
  *p++ = 16;
  memcpy(p, j->fi.id, 16);
  p += 16;
  *p++ = 0x10;
  p = ot_pbw_varint(p, i);
  bl = (size_t)(p - req);
  int rc = request_msg(j->c, lane, OT_MSG_FETCH_CHUNK, req, bl, &t, &rm, &r, &rl);
  if (rc) return rc;
  ot_chunk ch = {0};
  if (t != OT_MSG_CHUNK) rc = ot_error(OT_ERR_FORMAT, "reply of type %u to a chunk request", t);
  if (rc == OT_OK) rc = ot_chunk_decode(r, rl, &ch); /* in place, in the reply message */
  uint64_t off = i * j->fi.chunk;
  size_t want = (size_t)(j->fi.size - off < j->fi.chunk ? j->fi.size - off : j->fi.chunk);
  if (rc == OT_OK && (memcmp(ch.id, j->fi.id, 16) != 0 || ch.index != i || ch.final))
    rc = ot_error(OT_ERR_FORMAT, "reply is not chunk %llu of this download", (unsigned long long)i);
  if (rc == OT_OK && ch.len != want)
    rc = ot_error(OT_ERR_FORMAT, "chunk %llu has %zu bytes, expected %zu", (unsigned long long)i, ch.len,
                  want);
  uint8_t h[32];
  if (rc == OT_OK) {
    ot_chunk_hash(i, ch.data, ch.len, h);
    rc = j->sink.write_at(j->sink.self, off, ch.data, ch.len);
  }
  if (rc == OT_OK) {
    memcpy(j->hashes[i], h, 32);
    if (j->on_chunk) rc = j->on_chunk(j->arg, i, h);
  }
  if (rc == OT_OK) lanes_progress(&j->l, want);
  nng_msg_free(rm);
  return rc;
}

static void *fetch_lane(void *arg) {
  lane_arg *a = arg;
  fetch_job *j = a->job;
  while (!atomic_load(&j->l.failed)) {
    uint64_t i = atomic_fetch_add(&j->next, 1);
    if (i >= j->n) break;
    if (j->have[i]) continue;
    if (j->stop_after && atomic_fetch_add(&j->claimed, 1) >= j->stop_after) {
      lanes_fail(&j->l, ot_error(OT_ERR_IO, "stopped after %llu chunks (test hook)",
                                 (unsigned long long)j->stop_after));
      break;
    }
    int rc = fetch_one(j, a->lane, i);
    if (rc) {
      lanes_fail(&j->l, rc);
      break;
    }
    atomic_fetch_add(&j->fetched, 1);
  }
  return NULL;
}

/* FetchOpen: the object's size, chunk size, digest and fetch id, checked against opts. */
static int fetch_open(ot_client *c, const char *name, const ot_fetch_opts *o, ot_fetch_info *fi) {
  ot_fetch_open_body b = {0};
  if (!name || strlen(name) >= sizeof b.name) return ot_error(OT_ERR_INVALID, "bad download name");
  snprintf(b.name, sizeof b.name, "%s", name);
  b.chunk = o->chunk ? o->chunk : (1u << 20);
  if (b.chunk > OT_CHUNK_MAX || b.chunk + OT_ENV_OVERHEAD + 64 > c->cfg.max_msg)
    return ot_error(OT_ERR_RANGE, "chunk size %u does not fit the message limit %zu", b.chunk,
                    c->cfg.max_msg);
  uint8_t *body = NULL, *r = NULL;
  size_t bl = 0, rl = 0;
  uint32_t t = 0;
  int rc = ot_fetch_open_pack(&b, &body, &bl);
  if (rc == OT_OK) rc = ot_client_request(c, 0, OT_MSG_FETCH_OPEN, body, bl, &t, &r, &rl);
  free(body);
  if (rc) return rc;
  ot_fetch_info f;
  if (t != OT_MSG_FETCH_INFO) rc = ot_error(OT_ERR_FORMAT, "reply of type %u to a download request", t);
  if (rc == OT_OK) rc = ot_fetch_info_decode(r, rl, &f);
  free(r);
  if (rc) return rc;
  uint64_t max = o->max_size ? o->max_size : OT_FETCH_MAX_DEFAULT;
  /* the chunk bounds our per-chunk state: a server may lower it, not below 64 KiB */
  uint32_t floor = b.chunk < (64u << 10) ? b.chunk : (64u << 10);
  if (f.chunk > b.chunk || (f.chunk < floor && f.size > f.chunk))
    return ot_error(OT_ERR_FORMAT, "server chose chunk size %u (asked for %u)", f.chunk, b.chunk);
  if (f.chunk == 0) return ot_error(OT_ERR_FORMAT, "server chose chunk size 0");
  if (f.size > max)
    return ot_error(OT_ERR_RANGE, "'%s' has %llu bytes, over the limit of %llu", name,
                    (unsigned long long)f.size, (unsigned long long)max);
  if (o->expect_digest && sodium_memcmp(o->expect_digest, f.digest, 32) != 0)
    return ot_error(OT_ERR_MISMATCH, "'%s' on the server does not have the expected digest", name);
  *fi = f;
  return OT_OK;
}

/* The end marker: the server closes its source. Best effort (it expires anyway). */
static void fetch_end_marker(ot_client *c, const ot_fetch_info *fi) {
  uint8_t *body = NULL, *r = NULL;
  size_t bl = 0, rl = 0;
  uint32_t t = 0;
  if (ot_fetch_chunk_pack(fi->id, ot_transfer_chunks(fi->size, fi->chunk), &body, &bl) == OT_OK &&
      ot_client_request(c, 0, OT_MSG_FETCH_CHUNK, body, bl, &t, &r, &rl) == OT_OK)
    free(r);
  free(body);
}

/* Fetches the chunks not in have[] (hashes[] holds those that are), then checks the
 * digest of the whole. Commits nothing; *bad_digest tells a mismatch from an
 * interruption. */
static int fetch_run(ot_client *c, const ot_fetch_info *fi, ot_sink sink, uint8_t *have,
                     uint8_t (*hashes)[32], ot_fetch_opts *o,
                     int (*on_chunk)(void *, uint64_t, const uint8_t *), void *arg, int *bad_digest) {
  *bad_digest = 0;
  fetch_job *j = calloc(1, sizeof *j);
  if (!j) return ot_error(OT_ERR_NOMEM, "out of memory");
  j->c = c;
  j->sink = sink;
  j->fi = *fi;
  j->n = ot_transfer_chunks(fi->size, fi->chunk);
  j->stop_after = o->stop_after;
  j->have = have;
  j->hashes = hashes;
  j->on_chunk = on_chunk;
  j->arg = arg;
  j->l.progress = o->progress;
  j->l.total = fi->size;
  j->l.progress_arg = o->progress_arg;
  for (uint64_t i = 0; i < j->n; i++) /* resumed chunks count as done */
    if (have[i]) j->l.done_bytes += i + 1 < j->n ? fi->chunk : fi->size - i * (uint64_t)fi->chunk;
  pthread_mutex_init(&j->l.mu, NULL);
  int window = o->window > 0 ? o->window : 4;
  pthread_rwlock_rdlock(&c->lk);
  if ((uint32_t)window > c->s.lanes) window = (int)c->s.lanes;
  pthread_rwlock_unlock(&c->lk);
  if (window > c->n_lanes_open) window = c->n_lanes_open;
  lanes_run(fetch_lane, j, window);
  o->fetched = atomic_load(&j->fetched);
  int rc = j->l.rc;
  if (rc) {
    ot_error(rc, "%s", j->l.detail);
  } else if (j->stop_after && o->fetched >= j->stop_after) {
    rc = ot_error(OT_ERR_IO, "stopped after %llu chunks (test hook)", (unsigned long long)j->stop_after);
  } else {
    uint8_t d[32];
    ot_transfer_digest((const uint8_t(*)[32])hashes, j->n, fi->size, fi->chunk, d);
    if (sodium_memcmp(d, fi->digest, 32) != 0) {
      *bad_digest = 1;
      rc = ot_error(OT_ERR_FORMAT, "download digest mismatch: data discarded");
    }
  }
  pthread_mutex_destroy(&j->l.mu);
  free(j);
  if (rc != OT_ERR_IO || *bad_digest) { /* finished (either way): the server can close */
    char keep[512];
    snprintf(keep, sizeof keep, "%s", ot_error_detail());
    fetch_end_marker(c, fi);
    if (rc) ot_error(rc, "%s", keep);
  }
  return rc;
}

int ot_client_fetch(ot_client *c, const char *name, ot_sink sink, ot_fetch_opts *opts) {
  if (!c || !name || !sink.write_at || !opts) {
    if (sink.abort) sink.abort(sink.self);
    return ot_error(OT_ERR_INVALID, "ot_client_fetch: NULL argument");
  }
  ot_fetch_info fi;
  int rc = fetch_open(c, name, opts, &fi);
  uint64_t n = rc == OT_OK ? ot_transfer_chunks(fi.size, fi.chunk) : 0;
  uint8_t *have = NULL, (*hashes)[32] = NULL;
  if (rc == OT_OK) {
    have = calloc(n ? n : 1, 1);
    hashes = calloc(n ? n : 1, 32);
    if (!have || !hashes) rc = ot_error(OT_ERR_NOMEM, "out of memory");
  }
  int bad = 0;
  opts->resumed_from = 0;
  opts->fetched = 0;
  if (rc == OT_OK) rc = fetch_run(c, &fi, sink, have, hashes, opts, NULL, NULL, &bad);
  free(have);
  free(hashes);
  if (rc) {
    if (sink.abort) sink.abort(sink.self);
    return rc;
  }
  rc = sink.commit(sink.self);
  if (rc) return rc;
  memcpy(opts->digest_out, fi.digest, 32);
  opts->size_out = fi.size;
  return OT_OK;
}

/* ---- fetching into a file, resumably ----
 * PATH.partial holds the bytes; PATH.partial.state is a header (magic, size, chunk,
 * digest) followed by one record (u64 index, h_i) per chunk written. On resume every
 * recorded chunk is read back and hashed again, so a torn or corrupted partial file
 * costs only the chunks that do not match. */

#define STATE_MAGIC "otfetch1"
#define STATE_HDR 56
#define STATE_REC 40

typedef struct {
  int fd, sfd;
  const char *tmp;
  pthread_mutex_t mu;
} fetch_file;

static void put_u64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint64_t get_u64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
  return v;
}

static int ff_write(void *self, uint64_t off, const void *data, size_t len) {
  fetch_file *f = self;
  return ot_fd_write_all(f->fd, data, len, (int64_t)off, f->tmp);
}

static int ff_record(void *arg, uint64_t index, const uint8_t hash[32]) {
  fetch_file *f = arg;
  uint8_t rec[STATE_REC];
  put_u64(rec, index);
  memcpy(rec + 8, hash, 32);
  pthread_mutex_lock(&f->mu);
  int rc = ot_fd_write_all(f->sfd, rec, sizeof rec, -1, "the download state");
  pthread_mutex_unlock(&f->mu);
  return rc;
}

/* Loads PATH.partial.state if it describes this object; marks the chunks whose bytes
 * in PATH.partial still hash to the recorded value. Returns how many. */
static uint64_t state_load(fetch_file *f, const ot_fetch_info *fi, uint64_t n, uint8_t *have,
                           uint8_t (*hashes)[32]) {
  uint8_t hdr[STATE_HDR], rec[STATE_REC];
  if (pread(f->sfd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr) return 0;
  if (memcmp(hdr, STATE_MAGIC, 8) != 0 || get_u64(hdr + 8) != fi->size || get_u64(hdr + 16) != fi->chunk ||
      sodium_memcmp(hdr + 24, fi->digest, 32) != 0)
    return 0;
  uint8_t *buf = malloc(fi->chunk);
  if (!buf) return 0;
  uint64_t got = 0;
  for (off_t pos = STATE_HDR; pread(f->sfd, rec, sizeof rec, pos) == (ssize_t)sizeof rec; pos += STATE_REC) {
    uint64_t i = get_u64(rec);
    if (i >= n || have[i]) continue;
    uint64_t off = i * fi->chunk;
    size_t len = (size_t)(fi->size - off < fi->chunk ? fi->size - off : fi->chunk);
    uint8_t h[32];
    if (pread(f->fd, buf, len, (off_t)off) != (ssize_t)len) continue;
    ot_chunk_hash(i, buf, len, h);
    if (sodium_memcmp(h, rec + 8, 32) != 0) continue;
    memcpy(hashes[i], h, 32);
    have[i] = 1;
    got++;
  }
  free(buf);
  return got;
}

/* A fresh state: header only, partial file emptied. */
static int state_reset(fetch_file *f, const ot_fetch_info *fi, const char *spath) {
  uint8_t hdr[STATE_HDR];
  memcpy(hdr, STATE_MAGIC, 8);
  put_u64(hdr + 8, fi->size);
  put_u64(hdr + 16, fi->chunk);
  memcpy(hdr + 24, fi->digest, 32);
  if (ftruncate(f->fd, 0) != 0 || ftruncate(f->sfd, 0) != 0)
    return ot_error(OT_ERR_IO, "cannot truncate %s: %s", spath, strerror(errno));
  return ot_fd_write_all(f->sfd, hdr, sizeof hdr, -1, spath);
}

static int fsync_dir_of(const char *path) {
  char *d = strdup(path);
  if (!d) return ot_error(OT_ERR_NOMEM, "out of memory");
  char *slash = strrchr(d, '/');
  const char *dir = slash ? (slash == d ? "/" : (*slash = '\0', d)) : ".";
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int rc = OT_OK;
  if (fd < 0 || fsync(fd) != 0) rc = ot_error(OT_ERR_IO, "fsync %s: %s", dir, strerror(errno));
  if (fd >= 0) close(fd);
  free(d);
  return rc;
}

int ot_client_fetch_file(ot_client *c, const char *name, const char *path, ot_fetch_opts *opts) {
  if (!c || !name || !path || !opts) return ot_error(OT_ERR_INVALID, "ot_client_fetch_file: NULL argument");
  ot_fetch_info fi;
  int rc = fetch_open(c, name, opts, &fi); /* a refusal or a wrong digest leaves nothing behind */
  if (rc) return rc;
  size_t pl = strlen(path);
  char *tmp = malloc(pl + 16), *spath = malloc(pl + 16);
  uint64_t n = ot_transfer_chunks(fi.size, fi.chunk);
  uint8_t *have = calloc(n ? n : 1, 1), (*hashes)[32] = calloc(n ? n : 1, 32);
  fetch_file f = {.fd = -1, .sfd = -1, .tmp = tmp};
  pthread_mutex_init(&f.mu, NULL);
  if (!tmp || !spath || !have || !hashes) rc = ot_error(OT_ERR_NOMEM, "out of memory");
  if (rc == OT_OK) {
    snprintf(tmp, pl + 16, "%s.partial", path);
    snprintf(spath, pl + 16, "%s.partial.state", path);
    f.fd = open(tmp, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    f.sfd = f.fd < 0 ? -1 : open(spath, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (f.fd < 0 || f.sfd < 0) rc = ot_error(OT_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
  }
  uint64_t present = 0;
  if (rc == OT_OK) {
    present = state_load(&f, &fi, n, have, hashes);
    if (!present) rc = state_reset(&f, &fi, spath); /* new, or the server's object changed */
  }
  opts->resumed_from = present;
  opts->fetched = 0;
  int bad = 0;
  if (rc == OT_OK) {
    ot_sink sink = {ff_write, NULL, NULL, &f};
    rc = fetch_run(c, &fi, sink, have, hashes, opts, ff_record, &f, &bad);
  }
  if (rc == OT_OK && ftruncate(f.fd, (off_t)fi.size) != 0) /* a longer stale partial file */
    rc = ot_error(OT_ERR_IO, "cannot truncate %s: %s", tmp, strerror(errno));
  if (rc == OT_OK && fsync(f.fd) != 0) rc = ot_error(OT_ERR_IO, "fsync %s: %s", tmp, strerror(errno));
  if (rc == OT_OK && rename(tmp, path) != 0)
    rc = ot_error(OT_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
  if (rc == OT_OK) {
    unlink(spath);
    rc = fsync_dir_of(path);
  } else if (bad && tmp && spath) { /* wrong bytes: nothing of it is worth keeping */
    unlink(tmp);
    unlink(spath);
  }
  if (f.fd >= 0) close(f.fd);
  if (f.sfd >= 0) close(f.sfd);
  pthread_mutex_destroy(&f.mu);
  free(tmp);
  free(spath);
  free(have);
  free(hashes);
  if (rc) return rc;
  memcpy(opts->digest_out, fi.digest, 32);
  opts->size_out = fi.size;
  return OT_OK;
}
