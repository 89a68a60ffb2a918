/* offtune-cloud serve: the cloud daemon (docs/daemon.md).
 *
 * Threads: the transport's workers (device requests and uploads: ot_daemon_rpc.c), the
 * operator socket (ot_daemon_ctl.c) and the round scheduler (ot_round.c), which does
 * the heavy work: distilling emulators, creating initial adapters, aggregating. They
 * share only the registry (its own lock) and the daemon's wake-up condition. */
#ifndef OT_DAEMON_H
#define OT_DAEMON_H

#include <nng/nng.h>
#include <pthread.h>
#include <stdint.h>

#include "ot_emulator.h"
#include "ot_identity.h"
#include "ot_registry.h"
#include "ot_transport.h"

typedef struct ot_daemon_serving ot_daemon_serving;

#define OT_DAEMON_LEASE_DEFAULT 15 /* seconds a daemon leads a session's rounds unrenewed */

typedef struct {
  char state[2048];   /* the state directory (this daemon's: identity, staging, tmp, sockets) */
  char objects[2048]; /* the object store's root: objects/ and emulators/ (default: the state
                         directory; --objects: shared storage every daemon reaches) */
  char node[160];     /* this daemon among those sharing the registry: the lease owner */
  int lease_s;        /* a lease's length; renewed every third of it */
  int shared;         /* the registry is shared by several daemons (PostgreSQL) */
  ot_registry *reg;
  ot_identity id;
  ot_server *srv;
  nng_socket ctl;
  int ctl_open;
  pthread_t ctl_thread, sched_thread, lease_thread;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int stop, kick;
  /* devices with a SubmitUpdate in progress (under mu): one at a time per device, so a
   * client's retry of a slow submission waits for it and then finds the update stored */
  pthread_cond_t submit_cv;
  int64_t submitting[32];
  int n_submitting;
  char npm_dir[2048];
  ot_daemon_serving *serving; /* --http: generation with the published adapters */
  struct ot_round_secagg *sa; /* in-memory masking rounds (ot_round_secagg.c); made by the scheduler */
} ot_daemon;

/* One timestamped line on stderr (the daemon's log). */
void ot_daemon_log(ot_daemon *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Wakes the scheduler (an update arrived, a session was created). */
void ot_daemon_kick(ot_daemon *d);
/* STATE/<formatted relative path> into out (n bytes); OT_ERR_RANGE if it does not fit. */
int ot_daemon_path(const ot_daemon *d, char *out, size_t n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* OBJECTS/<formatted relative path> (the object store: objects/..., emulators/...); the state
 * directory while objects is unset. */
int ot_daemon_obj_path(const ot_daemon *d, char *out, size_t n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Moves a finished file or directory to dst, atomically for readers: rename(2); when src is
 * on another file system (EXDEV: a shared object store), a copy into a temporary name next to
 * dst, fsync'd, then renamed, and src removed. An existing dst (the same content, another
 * daemon's) wins. The parent directory is fsync'd. */
int ot_daemon_move_in(const char *src, const char *dst);
/* OT_OK if the object file at path has this digest; OT_ERR_FORMAT (corrupt or truncated
 * shared storage) otherwise: objects are checked when read, not trusted. */
int ot_daemon_object_check(const char *path, const char *digest);

/* Content-addressed objects. An adapter is a directory objects/adapters/<digest>/ with
 * adapter_config.json and adapter_model.safetensors (digest = ot_file_digest of the
 * latter). ot_daemon_adapter_put moves a finished directory there (fsync'd, rename) and
 * returns its digest; an existing object with the same digest wins. */
int ot_daemon_adapter_put(ot_daemon *d, const char *tmp_dir, char digest[OT_DIGEST_HEX]);
/* Moves a file to objects/<kind>/<digest>.safetensors (kind: updates, state). */
int ot_daemon_object_put(ot_daemon *d, const char *kind, const char *tmp_file, char digest[OT_DIGEST_HEX]);
/* fsync of a directory (after a rename into it). */
int ot_fsync_dir(const char *dir);
/* rm -rf (for temporary directories the daemon made). */
int ot_rm_rf(const char *path);
/* Removes abandoned files from staging/: unfinished uploads (*.partial: all of them at
 * start, when no transfer can be live; afterwards those idle for twice the transport's
 * idle limit) and finished uploads of rounds that are over or of sessions that are gone.
 * *removed (may be NULL) counts them. */
int ot_daemon_staging_sweep(ot_daemon *d, int at_start, int *removed);

/* Transport callbacks (ot_daemon_rpc.c). */
int ot_daemon_on_request(void *user, const uint8_t peer[32], const uint8_t *body, size_t len, uint8_t **reply,
                         size_t *reply_len);
int ot_daemon_on_transfer_open(void *user, const uint8_t peer[32], const char *name, uint64_t size,
                               ot_sink *sink);
void ot_daemon_on_transfer_end(void *user, const uint8_t peer[32], const char *name, int committed,
                               ot_sink *sink);
/* Downloads: "emulator.<id>.<file>" (a file of an emulator package's manifest) and
 * "adapter.<digest>.<file>" (the current adapter of a running session). */
int ot_daemon_on_fetch_open(void *user, const uint8_t peer[32], const char *name, ot_source *src,
                            uint64_t *size);
void ot_daemon_on_fetch_close(void *user, ot_source *src);
/* Largest upload accepted for a round whose global adapter file is ref_size bytes. */
uint64_t ot_daemon_upload_limit(uint64_t ref_size);

/* Serving (ot_daemon_serve.c): loads the registered model `model_name` and serves it with
 * the published adapters of its sessions over the HTTP API at `http` (HOST:PORT); keys: every
 * request needs one of the registry's API keys. kv_mib: the paged KV cache's memory (0: the
 * engine's default), in blocks of kv_block_size positions (0: 16). */
int ot_daemon_serving_start(ot_daemon *d, const char *model_name, const char *http, int threads, int keys,
                            int kv_mib, int kv_block_size, ot_daemon_serving **out);
/* http://HOST:PORT with the port bound. */
const char *ot_daemon_serving_url(const ot_daemon_serving *s);
void ot_daemon_serving_stop(ot_daemon_serving *s);

/* The operator socket's thread (ot_daemon_ctl.c) and the scheduler's (ot_round.c). */
void *ot_daemon_ctl_main(void *d);
/* One operator request (JSON text of len bytes) -> its reply (malloc'd JSON text; NULL when out
 * of memory); peer_ok 0 refuses it (not the daemon's user). No socket: fuzz_operator calls it. */
char *ot_daemon_ctl_request(ot_daemon *d, const char *body, size_t len, int peer_ok);
void *ot_round_main(void *d);

#endif
