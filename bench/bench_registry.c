/* The registry's cost per device and per update with 1..N daemons on one database (issue
 * 18): each daemon is a registry connection of its own (ot_reg_open) driven by a thread, as
 * in `offtune-cloud serve`, where every device request is one registry transaction.
 *
 *   bench_registry --db TARGET [--daemons N] [--devices M] [--rounds R]
 *
 * TARGET: a SQLite file (made fresh) or a PostgreSQL URI / conninfo of an empty database.
 * Measures, wall clock: enrolments (token issue + admit, spread over the daemons), updates
 * accepted (ot_reg_update_add, the devices spread over the daemons) per second, and the
 * leader's round turnover (close, read the updates, finish: the registry's share of a round;
 * no training or aggregation). Prints one JSON line. bench/registry.sh runs the table. */
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_error.h"
#include "ot_registry.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what) {
  fprintf(stderr, "bench_registry: %s: %s\n", what, ot_error_detail());
  exit(1);
}

typedef struct {
  const char *db;
  ot_registry *r;
  int first, count; /* devices [first, first + count) */
  int64_t *dev, sid;
  int round, phase; /* 0: enrol, 1: updates */
  pthread_barrier_t *go;
} worker;

static void *work(void *arg) {
  worker *w = arg;
  pthread_barrier_wait(w->go);
  for (int i = w->first; i < w->first + w->count; i++) {
    if (w->phase == 0) {
      char token[OT_TOKEN_CHARS + 1];
      uint8_t pk[32];
      randombytes_buf(pk, sizeof pk);
      int enrolled = 0;
      if (ot_reg_token_issue(w->r, "bench", token) || ot_reg_access_ops.admit(w->r, pk, token, &enrolled) ||
          ot_reg_device_id(w->r, pk, &w->dev[i]))
        die("enrol");
    } else {
      char dg[65];
      snprintf(dg, sizeof dg, "%064x", i * 1000 + w->round);
      if (ot_reg_update_add(w->r, w->sid, w->round, w->dev[i], 1000, 2.0f, dg)) die("update");
    }
  }
  pthread_barrier_wait(w->go);
  return NULL;
}

/* Runs one phase on every daemon at once; returns its wall seconds. */
static double phase(worker *w, int n, pthread_barrier_t *go) {
  pthread_t th[16];
  for (int k = 0; k < n; k++)
    if (pthread_create(&th[k], NULL, work, &w[k])) die("thread");
  pthread_barrier_wait(go);
  double t0 = now();
  pthread_barrier_wait(go);
  double t = now() - t0;
  for (int k = 0; k < n; k++) pthread_join(th[k], NULL);
  return t;
}

int main(int argc, char **argv) {
  const char *db = NULL;
  int daemons = 1, devices = 300, rounds = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--db"))
      db = argv[i + 1];
    else if (!strcmp(argv[i], "--daemons"))
      daemons = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--devices"))
      devices = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--rounds"))
      rounds = atoi(argv[i + 1]);
  }
  if (!db || daemons < 1 || daemons > 16 || devices < daemons || rounds < 1) {
    fprintf(stderr, "usage: bench_registry --db TARGET [--daemons 1..16] [--devices M] [--rounds R]\n");
    return 2;
  }
  if (sodium_init() < 0) return 1;
  worker w[16];
  int64_t *dev = calloc((size_t)devices, sizeof *dev);
  pthread_barrier_t go;
  pthread_barrier_init(&go, NULL, (unsigned)daemons + 1);
  for (int k = 0; k < daemons; k++) {
    w[k] = (worker){.db = db, .dev = dev, .go = &go};
    w[k].first = k * devices / daemons;
    w[k].count = (k + 1) * devices / daemons - w[k].first;
    if (ot_reg_open(db, &w[k].r)) die("open");
  }
  ot_registry *lead = w[0].r;
  int64_t emu = 0, sid = 0;
  ot_session_cfg c;
  ot_session_cfg_default(&c);
  snprintf(c.name, sizeof c.name, "bench");
  snprintf(c.model, sizeof c.model, "m");
  c.rounds = rounds + 1;
  c.min_devices = 1;
  c.max_devices = devices;
  if (ot_reg_model_put(lead, "m", "/m", "d") || ot_reg_emulator_put(lead, "d", "k", "/e", "e", &emu) ||
      ot_reg_session_create(lead, &c, &sid) || ot_reg_session_start(lead, sid, emu, "a0", 4000000000LL))
    die("session");
  double t_enrol = phase(w, daemons, &go);
  double t_upd = 0, t_round = 0;
  for (int r = 1; r <= rounds; r++) {
    for (int k = 0; k < daemons; k++) w[k].phase = 1, w[k].sid = sid, w[k].round = r;
    t_upd += phase(w, daemons, &go);
    double t0 = now();
    ot_update_row *u = NULL;
    int n = 0;
    char next[65];
    snprintf(next, sizeof next, "%064x", r);
    if (ot_reg_round_close(lead, sid, r) || ot_reg_round_updates(lead, sid, r, &u, &n) || n != devices ||
        ot_reg_round_finish(lead, sid, r, next, NULL, 4000000000LL, "/a", NULL))
      die("round");
    free(u);
    t_round += now() - t0;
  }
  printf(
      "{\"backend\": \"%s\", \"daemons\": %d, \"devices\": %d, \"rounds\": %d, \"enrolments_per_s\": %.1f, "
      "\"updates_per_s\": %.1f, \"ms_per_update\": %.3f, \"round_turnover_ms\": %.1f}\n",
      strstr(db, "=") || strstr(db, "://") ? "postgresql" : "sqlite", daemons, devices, rounds,
      devices / t_enrol, devices * rounds / t_upd, 1000.0 * t_upd / (devices * rounds),
      1000.0 * t_round / rounds);
  for (int k = 0; k < daemons; k++) ot_reg_close(w[k].r);
  pthread_barrier_destroy(&go);
  free(dev);
  return 0;
}
