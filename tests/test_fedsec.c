/* Secure aggregation and differential privacy in real sessions on loopback: a real
 * `offtune-cloud serve` and three `offtune-device run` processes on a tiny model.
 * - secure aggregation (auto with 3 devices): every published aggregate equals the
 *   token-weighted FedAvg of the devices' own trained adapters (read from their state
 *   directories) within the quantisation bound, and the cloud holds no individual update
 *   (no update rows, no update objects, no staged file; the audit log says so);
 * - a device that exits right after its masked input: the round completes by unmasking,
 *   its update included;
 * - the daemon killed with kill -9 mid masking round: the round restarts after the
 *   restart and the devices follow;
 * - DP: epsilon per round finite, increasing, within the budget; a budget too small for
 *   the rounds stops the session with the reason; DP without secure aggregation refused. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ot_dp.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_identity.h"
#include "ot_safetensors.h"
#include "ot_test_util.h"
#include "session_fixture.h"

static const char *devs[3] = {"romance", "mystery", "humor"};

static int dir_count(const char *path) {
  DIR *dp = opendir(path);
  if (!dp) return 0;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(dp)))
    if (e->d_name[0] != '.') n++;
  closedir(dp);
  return n;
}

/* No update rows, no update objects, nothing staged. */
static void check_no_updates_rows(const daemon_t *d, const char *session) {
  char db[1200], p[1200], sql[256];
  snprintf(db, sizeof db, "%s/registry.db", d->state);
  snprintf(sql, sizeof sql,
           "SELECT COUNT(*) FROM updates u JOIN sessions s ON s.id = u.session_id WHERE s.name = '%s'",
           session);
  assert_int_equal(count_rows(db, sql), 0);
  snprintf(p, sizeof p, "%s/objects/updates", d->state);
  assert_int_equal(dir_count(p), 0);
  snprintf(p, sizeof p, "%s/staging", d->state);
  assert_int_equal(dir_count(p), 0);
}

/* The cloud holds no individual update of the session: no rows, no objects, nothing staged;
 * the audit log says so. */
static void check_no_updates(const daemon_t *d, const char *session) {
  check_no_updates_rows(d, session);
  char db[1200], sql[256];
  snprintf(db, sizeof db, "%s/registry.db", d->state);
  snprintf(sql, sizeof sql,
           "SELECT COUNT(*) FROM audit WHERE event = 'secagg' AND detail LIKE '%s round %%never held an "
           "individual unmasked update%%'",
           session);
  assert_true(count_rows(db, sql) >= 1);
  snprintf(sql, sizeof sql,
           "SELECT COUNT(*) FROM audit WHERE event = 'secagg.done' AND detail LIKE '%s round %%'", session);
  assert_true(count_rows(db, sql) >= 1);
}

static daemon_t D;

static void run_devices(const char *session, const char *env3, int want, int want3) {
  pid_t pids[3];
  for (int i = 0; i < 3; i++) pids[i] = device_run(devs[i], NULL, session, i == 2 ? env3 : NULL);
  for (int i = 0; i < 3; i++) {
    int st = wait_exit(pids[i], 120);
    if (st != (i == 2 ? want3 : want)) fail_device(&D, devs[i], st);
  }
}

/* The daemon's record of a secure-aggregation round (issue 19): every device in the sum, the
 * mean of the losses they reported at join = the mean of their own trained.json losses, the
 * tokens = their own token counts (from the unmasked weight sum, within its quantisation). */
static cJSON *check_round_record(cJSON *show, const char *session, int round) {
  cJSON *m = NULL, *x;
  cJSON_ArrayForEach(x, cJSON_GetObjectItem(show, "metrics")) {
    if ((int)cJSON_GetNumberValue(cJSON_GetObjectItem(x, "round")) == round) m = x;
  }
  if (!m) fail_msg("%s: no record of round %d", session, round);
  double loss = 0, tokens = 0;
  for (int i = 0; i < 3; i++) {
    char p[1200], *text = NULL;
    size_t len;
    snprintf(p, sizeof p, "%s/%s/work/%s/r%d/trained.json", dir, devs[i], session, round);
    assert_int_equal(ot_file_read_all(p, 1 << 16, &text, &len), OT_OK);
    loss += ot_test_json_number(text, "loss") / 3;
    tokens += ot_test_json_number(text, "tokens");
    free(text);
  }
  assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetObjectItem(m, "participants")), 3);
  assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetObjectItem(m, "dropped")), 0);
  assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetObjectItem(m, "losses_reported")), 3);
  assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetObjectItem(m, "secagg")), 1);
  double ml = cJSON_GetNumberValue(cJSON_GetObjectItem(m, "mean_loss")),
         mt = cJSON_GetNumberValue(cJSON_GetObjectItem(m, "tokens"));
  if (!(fabs(ml - loss) <= 1e-6 * loss))
    fail_msg("%s round %d: mean loss %.9g, devices %.9g", session, round, ml, loss);
  if (!(fabs(mt - tokens) <= 1e-3 * tokens))
    fail_msg("%s round %d: tokens %.3f, devices %.0f", session, round, mt, tokens);
  return m;
}

/* ---- setup ------------------------------------------------------------------------------ */

static int setup(void **state) {
  (void)state;
  if (session_fixture_setup("fedsec", devs, 3) != 0) return -1;
  /* one daemon (one emulator distillation) and three enrolled devices for all the tests */
  daemon_init(&D, "cloud");
  for (int i = 0; i < 3; i++) device_join(&D, devs[i]);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  daemon_stop(&D);
  session_fixture_teardown();
  return 0;
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_secagg_session(void **state) {
  (void)state;
  /* auto: on with 3 devices a round */
  session_create(&D, "sec", "--rounds 2 --min-devices 3 --max-devices 3 --deadline 60");
  run_devices("sec", NULL, 0, 0);
  cJSON *s = wait_session(&D, "sec", "done", 30);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(
                          cJSON_GetObjectItem(cJSON_GetObjectItem(s, "session"), "config"), "secagg")),
                      "auto");
  for (int r = 1; r <= 2; r++) check_secagg_round(&D, s, "sec", r, devs, 3, 0);
  for (int r = 1; r <= 2; r++) {
    cJSON *m = check_round_record(s, "sec", r);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(m, "dp_epsilon")));
  }
  check_no_updates(&D, "sec");
  assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(s, "updates")), 0);
  cJSON_Delete(s);
  /* FedAdam: the server step on the securely averaged delta */
  session_create(&D, "secadam",
                 "--rounds 1 --min-devices 3 --max-devices 3 --deadline 60 --aggregation fedadam");
  run_devices("secadam", NULL, 0, 0);
  s = wait_session(&D, "secadam", "done", 30);
  check_secagg_round(&D, s, "secadam", 1, devs, 3, 1);
  check_no_updates(&D, "secadam");
  cJSON_Delete(s);
}

static void test_secagg_dropout(void **state) {
  (void)state;
  /* humor exits right after its masked input: the unmask stage recovers its self mask
   * from the others' shares, and its update is in the sum */
  session_create(&D, "drop", "--rounds 1 --min-devices 3 --max-devices 3 --deadline 12 --secagg on");
  run_devices("drop", "OT_TEST_DEVICE_EXIT_AFTER_STAGE=3", 0, 9);
  cJSON *s = wait_session(&D, "drop", "done", 60);
  check_secagg_round(&D, s, "drop", 1, devs, 3, 0);
  check_no_updates(&D, "drop");
  char db[1200];
  snprintf(db, sizeof db, "%s/registry.db", D.state);
  /* the unmask stage went on without the device that left */
  assert_int_equal(count_rows(db,
                              "SELECT COUNT(*) FROM audit WHERE event = 'secagg' AND detail = 'drop round 1: "
                              "masked inputs closed: 3 survivors; dropped after dealing shares: none'"),
                   1);
  assert_int_equal(count_rows(db,
                              "SELECT COUNT(*) FROM audit WHERE event = 'secagg' AND detail = 'drop round 1: "
                              "unmask closed: 2 survivors answered'"),
                   1);
  cJSON_Delete(s);
}

static void test_secagg_abort(void **state) {
  (void)state;
  /* mystery and humor leave right after advertising: in the shares stage one device is
   * left, fewer than the threshold: the round aborts, nothing is published, and with no
   * retries left the session fails with the reason */
  session_create(&D, "abort",
                 "--rounds 1 --min-devices 3 --max-devices 3 --deadline 8 --max-retries 0 --secagg on");
  pid_t pids[3];
  for (int i = 0; i < 3; i++)
    pids[i] = device_run(devs[i], NULL, "abort", i ? "OT_TEST_DEVICE_EXIT_AFTER_STAGE=1" : NULL);
  assert_int_equal(wait_exit(pids[1], 120), 9);
  assert_int_equal(wait_exit(pids[2], 120), 9);
  assert_int_equal(wait_exit(pids[0], 120), 1); /* FAILED */
  cJSON *s = wait_session(&D, "abort", "failed", 30);
  const char *err = cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(s, "session"), "error"));
  assert_non_null(err);
  fprintf(stderr, "abort: %s\n", err);
  assert_non_null(strstr(err, "secure aggregation aborted in stage 2"));
  char db[1200];
  snprintf(db, sizeof db, "%s/registry.db", D.state);
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM adapters WHERE name = 'abort'"), 0);
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM rounds r JOIN sessions s ON s.id = r.session_id "
                                  "WHERE s.name = 'abort' AND r.state = 'done'"),
                   0);
  assert_int_equal(
      count_rows(db,
                 "SELECT COUNT(*) FROM audit WHERE event = 'secagg.abort' AND detail LIKE 'abort round 1:%'"),
      1);
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM audit WHERE event = 'secagg' AND detail LIKE 'abort "
                                  "round 1: round aborted:%no aggregate is published'"),
                   1);
  check_no_updates_rows(&D, "abort");
  cJSON_Delete(s);
}

static void test_secagg_daemon_kill9(void **state) {
  (void)state;
  session_create(&D, "crash", "--rounds 1 --min-devices 3 --max-devices 3 --deadline 30");
  pid_t pids[3];
  for (int i = 0; i < 3; i++) pids[i] = device_run(devs[i], NULL, "crash", NULL);
  wait_for_file_text(D.log, "session 'crash': round 1: secure aggregation of 3 devices", 90);
  kill(D.pid, SIGKILL);
  waitpid(D.pid, NULL, 0);
  fprintf(stderr, "daemon killed with kill -9 in round 1's masking; restarting on %s\n", D.url);
  sleep_ms(300);
  daemon_start(&D, D.url);
  for (int i = 0; i < 3; i++) assert_int_equal(wait_exit(pids[i], 120), 0);
  cJSON *s = wait_session(&D, "crash", "done", 30);
  check_secagg_round(&D, s, "crash", 1, devs, 3, 0);
  check_no_updates(&D, "crash");
  cJSON_Delete(s);
}

/* Abandoned staging files (a killed daemon's unfinished uploads, uploads of sessions that
 * are gone) are removed at start; files that are not uploads stay. */
static void test_staging_sweep(void **state) {
  (void)state;
  daemon_stop(&D);
  const char *hex = "0123456789abcdef0123456789abcdef";
  assert_int_equal(ot_test_system("cd '%s/staging' && touch %s.update.crash.1.partial %s.update.gone.1 "
                                  "%s.secagg.gone.2 %s.update.crash.0 notes.txt",
                                  D.state, hex, hex, hex, hex),
                   0);
  daemon_start(&D, D.url);
  wait_for_file_text(D.log, "staging: removed 4 abandoned upload file(s)", 10);
  char p[1400];
  snprintf(p, sizeof p, "%s/staging/notes.txt", D.state);
  assert_true(ot_file_exists(p));
  snprintf(p, sizeof p, "%s/staging/%s.update.gone.1", D.state, hex);
  assert_false(ot_file_exists(p));
  snprintf(p, sizeof p, "%s/staging/notes.txt", D.state);
  unlink(p);
}

static cJSON *dp_of(cJSON *show) { return cJSON_GetObjectItem(show, "dp"); }

static void test_dp(void **state) {
  (void)state;
  /* DP needs secure aggregation */
  assert_int_equal(
      ot_test_run(out, sizeof out,
                  "%s session create --state '%s' --name x --model full --dp-epsilon 4 --secagg off", cloud,
                  D.state),
      1);
  assert_non_null(strstr(out, "needs secure aggregation"));
  session_create(&D, "dp",
                 "--rounds 3 --min-devices 3 --max-devices 3 --deadline 60 --dp-epsilon 8 --dp-clip 0.5");
  run_devices("dp", NULL, 0, 0);
  cJSON *s = wait_session(&D, "dp", "done", 30);
  cJSON *eps = cJSON_GetObjectItem(dp_of(s), "epsilon");
  assert_int_equal(cJSON_GetArraySize(eps), 3);
  double prev = 0;
  for (int i = 0; i < 3; i++) {
    double e = cJSON_GetNumberValue(cJSON_GetArrayItem(eps, i));
    fprintf(stderr, "dp: epsilon after round %d: %.4f (budget 8)\n", i + 1, e);
    assert_true(isfinite(e) && e > prev && e <= 8.0 + 1e-6);
    prev = e;
    /* the round's record holds the accountant's epsilon after it, as session show recomputes it */
    cJSON *m = check_round_record(s, "dp", i + 1);
    double re = cJSON_GetNumberValue(cJSON_GetObjectItem(m, "dp_epsilon"));
    if (!(fabs(re - e) <= 1e-9 * e))
      fail_msg("round %d: recorded epsilon %.9g, accountant %.9g", i + 1, re, e);
  }
  assert_true(prev > 7.9); /* the noise is the least that fits: the budget is (nearly) spent */
  char db[1200];
  snprintf(db, sizeof db, "%s/registry.db", D.state);
  assert_int_equal(
      count_rows(db, "SELECT COUNT(*) FROM audit WHERE event = 'dp.epsilon' AND detail LIKE 'dp round %'"),
      3);
  check_no_updates(&D, "dp");
  cJSON_Delete(s);

  /* a budget between epsilon after 1 and after 2 rounds at z = 1: one round, then stopped */
  ot_dp_accountant a;
  ot_dp_accountant_init(&a);
  double e1 = 0, e2 = 0;
  assert_int_equal(ot_dp_accountant_step(&a, 1.0, 1.0, 1), OT_OK);
  assert_int_equal(ot_dp_epsilon(&a, 1e-5, &e1, NULL), OT_OK);
  assert_int_equal(ot_dp_accountant_step(&a, 1.0, 1.0, 1), OT_OK);
  assert_int_equal(ot_dp_epsilon(&a, 1e-5, &e2, NULL), OT_OK);
  char extra[256];
  snprintf(extra, sizeof extra,
           "--rounds 3 --min-devices 3 --max-devices 3 --deadline 60 --dp-epsilon %.4f --dp-noise 1",
           (e1 + e2) / 2);
  session_create(&D, "dpsmall", extra);
  run_devices("dpsmall", NULL, 1, 1); /* devices see FAILED: exit 1 */
  s = wait_session(&D, "dpsmall", "failed", 30);
  const char *err = cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(s, "session"), "error"));
  assert_non_null(err);
  fprintf(stderr, "dpsmall: %s\n", err);
  assert_non_null(strstr(err, "differential privacy budget: round 2 would take epsilon"));
  assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(dp_of(s), "epsilon")), 1);
  cJSON_Delete(s);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_secagg_session),
      cmocka_unit_test(test_secagg_dropout),
      cmocka_unit_test(test_dp),
      cmocka_unit_test(test_secagg_abort),
      cmocka_unit_test(test_secagg_daemon_kill9),
      cmocka_unit_test(test_staging_sweep),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
