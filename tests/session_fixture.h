/* The session tests' fixture (test_session, test_fedsec): a temp directory with Brown
 * corpora (public.txt, and <genre>.txt, 20000 bytes each, for the devices) and a tiny
 * pretrained model (full/); helpers that run the real `offtune-cloud serve` daemon and
 * `offtune-device` processes on loopback, drive sessions through the operator commands and
 * read back what the cloud stored. Helpers fail the test on error. Include after the
 * cmocka prelude. */
#ifndef SESSION_FIXTURE_H
#define SESSION_FIXTURE_H

#include <stddef.h>
#include <sys/types.h>

#include <cjson/cJSON.h>

#include "ot_identity.h"
#include "ot_safetensors.h"
#include "ot_test_util.h"

extern char *dir;         /* tests/tmp/<name> */
extern char *cloud;       /* the offtune-cloud binary */
extern char *device;      /* the offtune-device binary */
extern char out[1 << 18]; /* the last command's output (RUN_OK, ot_test_run) */

/* Runs a command into out; fails the test with its output unless it exits 0. */
#define RUN_OK(...) OT_TEST_RUN_OK(out, __VA_ARGS__)

/* Makes dir (tests/tmp/<name>), the corpora (public + each genre) and the tiny model. */
int session_fixture_setup(const char *name, const char *const *genres, int n_genres);
void session_fixture_teardown(void);

/* ---- processes and logs ---- */
void sleep_ms(int ms);
double now_s(void);
/* Starts `exec CMD` through sh (the pid is the program's), output appended to log. */
pid_t spawn(const char *log, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Exit status of pid within timeout seconds (-1: still running, killed). */
int wait_exit(pid_t pid, double timeout);
/* The last 40 lines of a log on stderr. */
void print_log(const char *log);
int file_has(const char *path, const char *needle);
/* Waits until needle is in the file; fails with the file's tail after timeout seconds. */
void wait_for_file_text(const char *path, const char *needle, double timeout);

/* ---- the cloud daemon ---- */
typedef struct {
  char state[1024], log[1100], url[256], fp[OT_FINGERPRINT_LEN];
  pid_t pid;
  char extra[2048];   /* more `serve` options ("" by default: daemon_init zeroes it) */
  char objects[1024]; /* the object store when not the state directory (--objects) */
} daemon_t;

/* Fills d for the state directory parent/name and the log dir/<name>.log (both removed if
 * there), more `serve` options extra; objects empty (the state directory's store). */
void daemon_prepare(daemon_t *d, const char *parent, const char *name, const char *extra);
/* Starts the daemon on d->state and waits for its cloud.json (url and fingerprint). */
void daemon_start(daemon_t *d, const char *listen);
/* A fresh state directory dir/<name> (log dir/<name>.log) and its daemon on a free port. */
void daemon_init(daemon_t *d, const char *name);
/* daemon_init with more `serve` options (extra, kept in d->extra for restarts). */
void daemon_init_with(daemon_t *d, const char *name, const char *extra);
/* SIGTERM; the daemon must exit 0 within 20 s. */
void daemon_stop(daemon_t *d);

/* ---- sessions and devices ---- */
/* A session on the tiny model: emulator 1 + 1 kept + 1, 4 local steps of 4 x 32; extra
 * options appended. */
void session_create(daemon_t *d, const char *name, const char *extra);
/* Enrols device state directory dir/<dev> with the daemon (token from the operator command). */
void device_join(daemon_t *d, const char *dev);
/* `offtune-device run` on dir/<data> (NULL: dir/<dev>.txt) for session, log dir/<dev>.log;
 * env: extra VAR=value words or NULL. */
pid_t device_run(const char *dev, const char *data, const char *session, const char *env);
/* Prints device dev's log and the daemon's, then fails: dev exited with status. */
void fail_device(const daemon_t *d, const char *dev, int status);
/* `session show --json` (the caller deletes it). */
cJSON *session_show(daemon_t *d, const char *name);
const char *session_state(cJSON *show);
/* The entry of `rounds` in a session show for round r (fails the test if there is none). */
cJSON *show_round(cJSON *show, int round);
/* session_show once the session is in state, within timeout seconds. */
cJSON *wait_session(daemon_t *d, const char *name, const char *state, double timeout);

/* ---- what the cloud stored ---- */
typedef struct {
  ot_safetensors *st;
  size_t n;
  float **v; /* every tensor as fp32, in file order */
} tensors;

void tensors_load(const char *path, tensors *t);
void tensors_free(tensors *t);
const float *tensor(const tensors *t, const char *name);
/* The path of a stored adapter's weights, by digest. */
void adapter_file(const daemon_t *d, const char *digest, char *p, size_t n);
/* Round `round` of a secure-aggregation session (made by session_create: token cap 4 x 4 x
 * 32): its result against the FedAvg of the devices dir/<devs[i]>'s trained adapters
 * (work/<session>/r<round>/local), weighted by their tokens, within the quantisation bound
 * (fedadam: one FedAdam step on that average); n_dev <= 8 participants. */
void check_secagg_round(const daemon_t *d, cJSON *show, const char *session, int round,
                        const char *const *devs, int n_dev, int fedadam);
/* The integer of a one-value query on a registry database (read only). */
int count_rows(const char *db, const char *sql);

#endif
