/* The session tests' fixture: see session_fixture.h. */
#include "session_fixture.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ot_error.h"
#include "ot_fileio.h"

char *dir, *cloud, *device;
char out[1 << 18];

int session_fixture_setup(const char *name, const char *const *genres, int n_genres) {
  if (ot_test_cli_paths(name, &dir, &cloud, &device) < 0) return -1;
  RUN_OK("%s corpus --genres public --out %s/public.txt", cloud, dir);
  for (int i = 0; i < n_genres; i++) {
    RUN_OK("%s corpus --genres %s --out %s/%s_all.txt", cloud, genres[i], dir, genres[i]);
    assert_int_equal(
        ot_test_system("head -c 20000 '%s/%s_all.txt' > '%s/%s.txt'", dir, genres[i], dir, genres[i]), 0);
  }
  RUN_OK("OMP_NUM_THREADS=1 %s pretrain --tokenizer byte --layers 4 --embd 16 --heads 2 --ctx 32 --steps 20 "
         "--batch 4 --text %s/public.txt --out %s/full --threads 1",
         cloud, dir, dir);
  return 0;
}

/* Every process spawned, so that a test that fails half-way leaves no daemon or device
 * running past the suite. */
static pid_t spawned[1024];
static int n_spawned;

void session_fixture_teardown(void) {
  for (int i = 0; i < n_spawned; i++)
    if (waitpid(spawned[i], NULL, WNOHANG) == 0) { /* still our child, still running */
      kill(spawned[i], SIGKILL);
      waitpid(spawned[i], NULL, 0);
    }
  n_spawned = 0;
  free(dir);
  free(cloud);
  free(device);
}

void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

pid_t spawn(const char *log, const char *fmt, ...) {
  char *cmd = NULL, *full = NULL;
  va_list ap;
  va_start(ap, fmt);
  assert_true(vasprintf(&cmd, fmt, ap) >= 0);
  va_end(ap);
  assert_true(asprintf(&full, "exec %s >>'%s' 2>&1", cmd, log) >= 0);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", full, (char *)NULL);
    _exit(127);
  }
  if (n_spawned < (int)(sizeof spawned / sizeof spawned[0])) spawned[n_spawned++] = pid;
  free(cmd);
  free(full);
  return pid;
}

int wait_exit(pid_t pid, double timeout) {
  double t0 = now_s();
  for (;;) {
    int st;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (now_s() - t0 > timeout) {
      kill(pid, SIGKILL);
      waitpid(pid, &st, 0);
      return -1;
    }
    sleep_ms(50);
  }
}

void print_log(const char *log) {
  char cmd[4200];
  snprintf(cmd, sizeof cmd, "tail -n 40 '%s' >&2", log);
  if (system(cmd) != 0) fprintf(stderr, "(no log %s)\n", log);
}

int file_has(const char *path, const char *needle) {
  char *text = NULL;
  size_t len;
  if (ot_file_read_all(path, 64u << 20, &text, &len) != OT_OK) return 0;
  int found = strstr(text, needle) != NULL;
  free(text);
  return found;
}

void wait_for_file_text(const char *path, const char *needle, double timeout) {
  double t0 = now_s();
  while (!file_has(path, needle)) {
    if (now_s() - t0 > timeout) {
      print_log(path);
      fail_msg("'%s' did not appear in %s within %.0f s", needle, path, timeout);
    }
    sleep_ms(50);
  }
}

void daemon_start(daemon_t *d, const char *listen) {
  char cj[1200], sock[1200];
  snprintf(cj, sizeof cj, "%s/cloud.json", d->state);
  snprintf(sock, sizeof sock, "%s/control.sock", d->state);
  unlink(cj);
  d->pid = spawn(d->log, "%s serve --state '%s' --listen %s --model %s/full %s", cloud, d->state, listen, dir,
                 d->extra);
  double t0 = now_s();
  while (!ot_file_exists(cj) || !ot_file_exists(sock)) {
    if (now_s() - t0 > 20) {
      print_log(d->log);
      fail_msg("the daemon did not start");
    }
    sleep_ms(20);
  }
  char *text = NULL;
  size_t len;
  assert_int_equal(ot_file_read_all(cj, 1 << 16, &text, &len), OT_OK);
  cJSON *j = cJSON_Parse(text);
  free(text);
  snprintf(d->url, sizeof d->url, "%s", cJSON_GetStringValue(cJSON_GetObjectItem(j, "url")));
  snprintf(d->fp, sizeof d->fp, "%s", cJSON_GetStringValue(cJSON_GetObjectItem(j, "fingerprint")));
  cJSON_Delete(j);
}

void daemon_init(daemon_t *d, const char *name) { daemon_init_with(d, name, ""); }

void daemon_prepare(daemon_t *d, const char *parent, const char *name, const char *extra) {
  memset(d, 0, sizeof *d);
  snprintf(d->extra, sizeof d->extra, "%s", extra);
  snprintf(d->state, sizeof d->state, "%s/%s", parent, name);
  snprintf(d->log, sizeof d->log, "%s/%s.log", dir, name);
  assert_int_equal(ot_test_system("rm -rf '%s' '%s'", d->state, d->log), 0);
}

void daemon_init_with(daemon_t *d, const char *name, const char *extra) {
  daemon_prepare(d, dir, name, extra);
  daemon_start(d, "tcp://127.0.0.1:0");
}

void daemon_stop(daemon_t *d) {
  kill(d->pid, SIGTERM);
  assert_int_equal(wait_exit(d->pid, 20), 0);
}

void session_create(daemon_t *d, const char *name, const char *extra) {
  RUN_OK(
      "%s session create --state '%s' --name %s --model full --bottom 1 --top 1 --keep 1 --distill-steps 4 "
      "--distill-batch 4 --distill-seq-len 32 --distill-data %s/public.txt --steps 4 --batch 4 --seq-len 32 "
      "--lr 1e-2 %s",
      cloud, d->state, name, dir, extra);
}

void device_join(daemon_t *d, const char *dev) {
  RUN_OK("%s token issue --state '%s' --json", cloud, d->state);
  cJSON *j = cJSON_Parse(out);
  assert_non_null(j);
  const char *token = cJSON_GetStringValue(cJSON_GetObjectItem(j, "token"));
  assert_non_null(token);
  RUN_OK("%s join --cloud %s --cloud-key %s --token %s --state '%s/%s' --name %s", device, d->url, d->fp,
         token, dir, dev, dev);
  cJSON_Delete(j);
}

pid_t device_run(const char *dev, const char *data, const char *session, const char *env) {
  char log[1200];
  snprintf(log, sizeof log, "%s/%s.log", dir, dev);
  return spawn(log, "env OMP_NUM_THREADS=1 %s %s run --data %s/%s%s --state '%s/%s' --session %s --threads 1",
               env ? env : "", device, dir, data ? data : dev, data ? "" : ".txt", dir, dev, session);
}

void fail_device(const daemon_t *d, const char *dev, int status) {
  char log[1200];
  snprintf(log, sizeof log, "%s/%s.log", dir, dev);
  print_log(log);
  print_log(d->log);
  fail_msg("device %s exited with %d", dev, status);
}

cJSON *session_show(daemon_t *d, const char *name) {
  RUN_OK("%s session show %s --state '%s' --json", cloud, name, d->state);
  cJSON *j = cJSON_Parse(out);
  if (!j) fail_msg("not JSON: %s", out);
  return j;
}

const char *session_state(cJSON *show) {
  return cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(show, "session"), "state"));
}

cJSON *show_round(cJSON *show, int round) {
  cJSON *u;
  cJSON_ArrayForEach(u, cJSON_GetObjectItem(show, "rounds")) {
    if ((int)cJSON_GetNumberValue(cJSON_GetObjectItem(u, "round")) == round) return u;
  }
  fail_msg("the session has no round %d", round);
  return NULL;
}

cJSON *wait_session(daemon_t *d, const char *name, const char *state, double timeout) {
  double t0 = now_s();
  for (;;) {
    cJSON *j = session_show(d, name);
    if (strcmp(session_state(j), state) == 0) return j;
    cJSON_Delete(j);
    if (now_s() - t0 > timeout) {
      print_log(d->log);
      fail_msg("session %s not %s within %.0f s", name, state, timeout);
    }
    sleep_ms(200);
  }
}

void tensors_load(const char *path, tensors *t) {
  assert_int_equal(ot_st_open(path, &t->st), OT_OK);
  t->n = ot_st_count(t->st);
  t->v = calloc(t->n, sizeof *t->v);
  for (size_t i = 0; i < t->n; i++) {
    const ot_st_tensor *x = ot_st_at(t->st, i);
    t->v[i] = malloc(x->numel * sizeof(float));
    assert_int_equal(ot_st_read_f32(t->st, x, t->v[i], x->numel), OT_OK);
  }
}

void tensors_free(tensors *t) {
  for (size_t i = 0; i < t->n; i++) free(t->v[i]);
  free(t->v);
  ot_st_close(t->st);
}

const float *tensor(const tensors *t, const char *name) {
  const ot_st_tensor *x = ot_st_find(t->st, name);
  assert_non_null(x);
  return t->v[x - ot_st_at(t->st, 0)];
}

void adapter_file(const daemon_t *d, const char *digest, char *p, size_t n) {
  snprintf(p, n, "%s/objects/adapters/%s/adapter_model.safetensors", d->objects[0] ? d->objects : d->state,
           digest);
}

void check_secagg_round(const daemon_t *d, cJSON *show, const char *session, int round,
                        const char *const *devs, int n_dev, int fedadam) {
  cJSON *r = show_round(show, round);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(r, "state")), "done");
  assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetObjectItem(r, "participants")), n_dev);
  char p[2048];
  tensors in, res, loc[8];
  assert_true(n_dev <= 8);
  adapter_file(d, cJSON_GetStringValue(cJSON_GetObjectItem(r, "input")), p, sizeof p);
  tensors_load(p, &in);
  adapter_file(d, cJSON_GetStringValue(cJSON_GetObjectItem(r, "result")), p, sizeof p);
  tensors_load(p, &res);
  double w[8], wsum = 0;
  for (int i = 0; i < n_dev; i++) {
    snprintf(p, sizeof p, "%s/%s/work/%s/r%d/local/adapter_model.safetensors", dir, devs[i], session, round);
    tensors_load(p, &loc[i]);
    char *text = NULL;
    size_t len;
    snprintf(p, sizeof p, "%s/%s/work/%s/r%d/trained.json", dir, devs[i], session, round);
    assert_int_equal(ot_file_read_all(p, 1 << 16, &text, &len), OT_OK);
    w[i] = ot_test_json_number(text, "tokens");
    free(text);
    assert_true(w[i] > 0);
    wsum += w[i];
  }
  /* the quantisation bound: n values scaled by s = (2^31/n - 1)/range, error < n/s per
   * coordinate of both sums (S and W); avg - g = S/W */
  double range = cJSON_GetNumberValue(cJSON_GetObjectItem(
      cJSON_GetObjectItem(cJSON_GetObjectItem(show, "session"), "config"), "secagg_range"));
  double q = n_dev / ((2147483648.0 / n_dev - 1) / range),
         W = wsum / (4.0 * 32 * 4); /* token cap 4 x 4 x 32 */
  double max_err = 0, max_delta = 0, bound = 0;
  for (size_t t = 0; t < in.n; t++) {
    const ot_st_tensor *x = ot_st_at(in.st, t);
    const float *got = tensor(&res, x->name), *g = in.v[t];
    for (uint64_t k = 0; k < x->numel; k++) {
      double avg = 0;
      for (int i = 0; i < n_dev; i++) avg += w[i] * tensor(&loc[i], x->name)[k];
      avg /= wsum;
      double delta = fabs(avg - g[k]), want = avg;
      if (fedadam) { /* one FedAdam step from zero moments (defaults lr 1e-2, 0.9, 0.99, 1e-3) */
        double dl = avg - g[k], m = 0.1 * dl, v = 0.01 * dl * dl;
        want = g[k] + 1e-2 * m / (sqrt(v) + 1e-3);
      }
      double e = fabs(got[k] - want);
      /* |S/W - S'/W'| <= q/W + |S| q / W^2, plus float rounding of the stored value */
      double b = q / W + delta * W * q / (W * W) + 2 * 6e-8 * (fabs(want) + 1e-30);
      /* FedAdam's step amplifies an error in the delta by at most lr (1 - b1) / eps = 1 */
      if (e > max_err) max_err = e;
      if (e - b > 0)
        fail_msg("round %d %s[%llu]: %.9g vs FedAvg %.9g (bound %.3g)", round, x->name, (unsigned long long)k,
                 got[k], avg, b);
      if (b > bound) bound = b;
      if (fabs(want - g[k]) > max_delta) max_delta = fabs(want - g[k]);
    }
  }
  fprintf(stderr,
          "%s round %d: secure aggregate vs %s of the devices' adapters: max abs err %.2e (bound %.2e), "
          "max change %.2e\n",
          session, round, fedadam ? "FedAdam step on the FedAvg" : "FedAvg", max_err, bound, max_delta);
  assert_true(max_delta > 1e-4); /* the round moved the adapter: the check compares something */
  for (int i = 0; i < n_dev; i++) tensors_free(&loc[i]);
  tensors_free(&in);
  tensors_free(&res);
}

int count_rows(const char *db, const char *sql) {
  sqlite3 *h;
  assert_int_equal(sqlite3_open_v2(db, &h, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
  sqlite3_busy_timeout(h, 5000);
  sqlite3_stmt *st;
  assert_int_equal(sqlite3_prepare_v2(h, sql, -1, &st, NULL), SQLITE_OK);
  int n = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int(st, 0) : -1;
  sqlite3_finalize(st);
  sqlite3_close(h);
  return n;
}
