/* Several `offtune-cloud serve` daemons on one PostgreSQL registry and one shared object
 * store (docs/deploy.md), on a real PostgreSQL server the test starts (tests/pg_cluster.sh;
 * the case is skipped, saying why, only without libpq or the server programs).
 *
 * Three daemons A, B, C share the registry, the objects directory and the cloud identity (B's
 * and C's state directories on tmpfs: their objects cross file systems, copied in). A
 * leads the session (it is alone when the session starts); the devices enrol and upload
 * through B and C, with tokens issued on other daemons than the one they join through. In
 * round 2 (the last), with one of its two updates stored, A is killed with SIGKILL: B or C
 * takes the lease once it expires (2 s) and the session completes there. Checked: every update stored once,
 * every round's adapter equal to the token-weighted average of the updates stored for it (FedAvg recomputed
 * here from the shared objects), the lease with a survivor. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ot_error.h"
#include "ot_fileio.h"
#include "pg_fixture.h"
#include "session_fixture.h"

static char conninfo[600], registry[700], skip_why[512];
/* B's and C's state directories: on another file system than the objects where one is at
 * hand (tmpfs), so the survivors move objects in by copy (EXDEV) and A by rename */
static char other_fs[256];

static int setup(void **state) {
  (void)state;
  const char *dbs[] = {"offtune"};
  if (pg_fixture_start(dbs, 1, conninfo, sizeof conninfo, skip_why, sizeof skip_why) == 77) {
    printf("[ SKIPPED  ] PostgreSQL: %s\n", skip_why);
    return 0;
  }
  snprintf(registry, sizeof registry, "%s dbname=offtune", conninfo);
  snprintf(other_fs, sizeof other_fs, "/dev/shm/ot-daemons-XXXXXX");
  if (access("/dev/shm", W_OK) != 0 || !mkdtemp(other_fs)) other_fs[0] = '\0';
  const char *genres[] = {"romance", "mystery", "humor"};
  return session_fixture_setup("daemons", genres, 3);
}

static int teardown(void **state) {
  (void)state;
  if (!skip_why[0]) session_fixture_teardown();
  if (other_fs[0]) ot_test_system("rm -rf '%s'", other_fs);
  pg_fixture_stop();
  return 0;
}

/* Daemon `name` on the shared registry and objects; with key, its identity is a copy of that
 * file (every daemon answers as the one cloud the devices pinned). */
static void start_shared(daemon_t *d, const char *name, const char *key, const char *more, int elsewhere) {
  memset(d, 0, sizeof *d);
  snprintf(d->state, sizeof d->state, "%s/%s", elsewhere && other_fs[0] ? other_fs : dir, name);
  snprintf(d->log, sizeof d->log, "%s/%s.log", dir, name);
  snprintf(d->objects, sizeof d->objects, "%s/objects", dir);
  snprintf(d->extra, sizeof d->extra, "--registry '%s' --objects '%s' --node %s --lease-seconds 2 %s",
           registry, d->objects, name, more);
  assert_int_equal(ot_test_system("rm -rf '%s' '%s' && mkdir -p '%s'", d->state, d->log, d->state), 0);
  if (key)
    assert_int_equal(
        ot_test_system("cp '%s' '%s/cloud.key' && chmod 600 '%s/cloud.key'", key, d->state, d->state), 0);
  daemon_start(d, "tcp://127.0.0.1:0");
}

/* The daemon's serving URL (cloud.json's "http"). */
static void http_of(const daemon_t *d, char *url, size_t n) {
  char cj[1200], *text = NULL;
  size_t len;
  snprintf(cj, sizeof cj, "%s/cloud.json", d->state);
  assert_int_equal(ot_file_read_all(cj, 1 << 16, &text, &len), OT_OK);
  cJSON *j = cJSON_Parse(text);
  free(text);
  snprintf(url, n, "%s", cJSON_GetStringValue(cJSON_GetObjectItem(j, "http")));
  cJSON_Delete(j);
  assert_true(strncmp(url, "http://", 7) == 0);
}

/* device dev enrols through daemon `via` with a token issued on daemon `issuer`. */
static void join_via(daemon_t *issuer, daemon_t *via, const char *dev) {
  RUN_OK("%s token issue --state '%s' --json", cloud, issuer->state);
  cJSON *j = cJSON_Parse(out);
  assert_non_null(j);
  const char *token = cJSON_GetStringValue(cJSON_GetObjectItem(j, "token"));
  assert_non_null(token);
  RUN_OK("%s join --cloud %s --cloud-key %s --token %s --state '%s/%s' --name %s", device, via->url, via->fp,
         token, dir, dev, dev);
  cJSON_Delete(j);
}

/* Round r's adapter against FedAvg of the updates the registry stored for it. */
static void check_fedavg(daemon_t *d, cJSON *show, int round) {
  cJSON *r = show_round(show, round);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(r, "state")), "done");
  char p[2048];
  tensors in, res, ups[8];
  double w[8], wsum = 0;
  int n = 0;
  adapter_file(d, cJSON_GetStringValue(cJSON_GetObjectItem(r, "input")), p, sizeof p);
  tensors_load(p, &in);
  adapter_file(d, cJSON_GetStringValue(cJSON_GetObjectItem(r, "result")), p, sizeof p);
  tensors_load(p, &res);
  cJSON *u;
  cJSON_ArrayForEach(u, cJSON_GetObjectItem(show, "updates")) {
    if ((int)cJSON_GetNumberValue(cJSON_GetObjectItem(u, "round")) != round) continue;
    assert_true(n < 8);
    snprintf(p, sizeof p, "%s/objects/updates/%s.safetensors", d->objects,
             cJSON_GetStringValue(cJSON_GetObjectItem(u, "digest")));
    tensors_load(p, &ups[n]);
    w[n] = cJSON_GetNumberValue(cJSON_GetObjectItem(u, "tokens"));
    wsum += w[n++];
  }
  assert_int_equal(n, 2);
  double max_err = 0, max_delta = 0;
  for (size_t t = 0; t < in.n; t++) {
    const ot_st_tensor *x = ot_st_at(in.st, t);
    const float *got = tensor(&res, x->name), *g = in.v[t];
    for (uint64_t k = 0; k < x->numel; k++) {
      double avg = 0;
      for (int i = 0; i < n; i++) avg += w[i] * tensor(&ups[i], x->name)[k];
      avg /= wsum;
      double e = fabs(got[k] - avg) / (fabs(avg) + 1e-3);
      if (e > max_err) max_err = e;
      if (fabs(avg - g[k]) > max_delta) max_delta = fabs(avg - g[k]);
    }
  }
  fprintf(stderr, "round %d: %d updates, %.0f tokens; aggregate vs FedAvg recomputed: max rel err %.2e\n",
          round, n, wsum, max_err);
  assert_true(max_err < 1e-5);
  assert_true(max_delta > 0);
  for (int i = 0; i < n; i++) tensors_free(&ups[i]);
  tensors_free(&in);
  tensors_free(&res);
}

static void test_leader_killed(void **state) {
  (void)state;
  if (skip_why[0]) skip();
  daemon_t A, B, C;
  start_shared(&A, "A", NULL, "", 0);
  char key[1200], owner[256];
  snprintf(key, sizeof key, "%s/cloud.key", A.state);
  session_create(&A, "r", "--rounds 2 --min-devices 2 --max-devices 2 --deadline 120 --secagg off");
  /* A alone: it takes the session's lease (and distils the emulator) */
  double t0 = now_s();
  do {
    if (now_s() - t0 > 60) {
      print_log(A.log);
      fail_msg("A never led the session");
    }
    sleep_ms(100);
    pg_fixture_query(registry, owner, sizeof owner, "SELECT COALESCE(MAX(owner), '') FROM leases");
  } while (strcmp(owner, "A") != 0);
  start_shared(&B, "B", key, "--http 127.0.0.1:0", 1);
  start_shared(&C, "C", key, "--http 127.0.0.1:0", 1);
  assert_string_equal(B.fp, A.fp); /* one cloud identity */
  struct stat s_obj, s_state;
  assert_int_equal(stat(A.objects, &s_obj), 0);
  assert_int_equal(stat(B.state, &s_state), 0);
  fprintf(stderr, "B and C keep their state %s the objects' file system\n",
          s_obj.st_dev != s_state.st_dev ? "off" : "on (no tmpfs here)");
  /* operators on different daemons see one registry */
  cJSON *shown = session_show(&C, "r");
  assert_non_null(session_state(shown));
  cJSON_Delete(shown);
  join_via(&C, &B, "r1"); /* a token issued on C, spent through B */
  join_via(&B, &C, "r2");
  pid_t p1 = device_run("r1", "romance.txt", "r", NULL);
  /* r2 is slow (every round): round 2 holds r1's update alone for 3 s, and A dies then */
  pid_t p2 = device_run("r2", "mystery.txt", "r", "OT_TEST_DEVICE_DELAY_MS=3000");
  t0 = now_s();
  while (pg_fixture_int(registry, "SELECT COUNT(*) FROM updates WHERE round = 2") < 1) {
    if (now_s() - t0 > 120) {
      print_log(A.log);
      fail_msg("round 2 got no update");
    }
    sleep_ms(100);
  }
  assert_int_equal(pg_fixture_int(registry, "SELECT COUNT(*) FROM rounds WHERE round = 2 AND state = 'open'"),
                   1);
  pg_fixture_query(registry, owner, sizeof owner, "SELECT owner FROM leases");
  assert_string_equal(owner, "A");
  kill(A.pid, SIGKILL);
  waitpid(A.pid, NULL, 0);
  fprintf(stderr, "leader A killed with kill -9 in round 2 with 1 of 2 updates\n");
  int s1 = wait_exit(p1, 180), s2 = wait_exit(p2, 180);
  if (s1 != 0) fail_device(&B, "r1", s1);
  if (s2 != 0) fail_device(&C, "r2", s2);
  cJSON *s = wait_session(&B, "r", "done", 60);
  /* the lease of a finished session is gone; the survivor that took it says so in its log */
  int by_b = file_has(B.log, "leading session 1 (node B)"),
      by_c = file_has(C.log, "leading session 1 (node C)");
  assert_int_equal(by_b + by_c, 1);
  fprintf(stderr, "the session completed under %s\n", by_b ? "B" : "C");
  /* every update accepted once: 2 per round, none lost, none twice */
  assert_int_equal(pg_fixture_int(registry, "SELECT COUNT(*) FROM updates"), 4);
  assert_int_equal(pg_fixture_int(registry,
                                  "SELECT COUNT(*) FROM (SELECT round, device_id FROM updates GROUP BY "
                                  "round, device_id HAVING COUNT(*) > 1) x"),
                   0);
  assert_int_equal(pg_fixture_int(registry, "SELECT COUNT(*) FROM rounds WHERE state = 'done'"), 2);
  for (int r = 1; r <= 2; r++) check_fedavg(&B, s, r);
  assert_int_equal(
      pg_fixture_int(registry, "SELECT COUNT(*) FROM adapters WHERE name = 'r' AND published = 1"), 1);
  cJSON_Delete(s);
  /* serving on both survivors: the published adapter of the one registry, whoever finished the
   * session; unpublished through one daemon's operator, gone from the other's API at once */
  char http[2][256];
  http_of(&B, http[0], sizeof http[0]);
  http_of(&C, http[1], sizeof http[1]);
  for (int k = 0; k < 2; k++) {
    RUN_OK("curl -sf %s/v1/models", http[k]);
    assert_non_null(strstr(out, "\"id\":\"r\""));
    RUN_OK("curl -sf %s/v1/completions -d '{\"model\": \"r\", \"prompt\": \"The \", \"max_tokens\": 4}'",
           http[k]);
    assert_non_null(strstr(out, "\"choices\""));
  }
  RUN_OK("%s adapter unpublish r --state '%s'", cloud, C.state);
  RUN_OK("curl -sf %s/v1/models", http[0]);
  assert_null(strstr(out, "\"id\":\"r\""));
  /* concurrent operator commands on two daemons: one session name, created once */
  char create[2][2048];
  for (int k = 0; k < 2; k++) /* the settings of session "r": its emulator is reused */
    snprintf(create[k], sizeof create[k],
             "%s session create --state %s --name dup --model full --bottom 1 --top 1 --keep 1 "
             "--distill-steps 4 "
             "--distill-batch 4 --distill-seq-len 32 --distill-data %s/public.txt --steps 4 --batch 4 "
             "--seq-len 32",
             cloud, k ? C.state : B.state, dir);
  RUN_OK("sh -c '(%s >/dev/null 2>&1; echo rc=$?) & (%s >/dev/null 2>&1; echo rc=$?) & wait'", create[0],
         create[1]);
  int created = 0;
  for (const char *q = out; (q = strstr(q, "rc=0")); q++) created++;
  assert_int_equal(created, 1);
  assert_int_equal(pg_fixture_int(registry, "SELECT COUNT(*) FROM sessions WHERE name = 'dup'"), 1);
  daemon_stop(&B);
  daemon_stop(&C);
  /* a clean stop gives the leases up */
  assert_int_equal(pg_fixture_int(registry, "SELECT COUNT(*) FROM leases"), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_leader_killed)};
  return cmocka_run_group_tests_name("daemons on one PostgreSQL registry", tests, setup, teardown);
}
