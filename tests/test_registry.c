/* The daemon's registry (cloud/ot_registry.c) on each backend: `test_registry sqlite` on a
 * file, `test_registry postgresql` on a real PostgreSQL server that tests/pg_cluster.sh
 * starts (initdb in a temp directory, unix socket there, stopped at the end, also when this
 * process dies). Every case runs on both; the PostgreSQL cases are skipped, saying why, only
 * where the build has no libpq or the server programs are not installed.
 *
 * Besides the single-connection behaviour (migrations, enrolment, a session's rounds, records,
 * listings, API keys), several connections at once stand in for several daemons on one
 * database: updates racing the round's close, two aggregators finishing the same round, one
 * token spent twice. Their checks are invariants (what was acknowledged is what is stored,
 * exactly one winner), so they hold whatever the interleaving. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ot_error.h"
#include "ot_regdb.h"
#include "ot_registry.h"
#include "ot_test_util.h"
#include "pg_fixture.h"

static int use_pg;
static char pg_conninfo[1200], skip_why[512];
static int db_seq;

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* A fresh database for one case: a new SQLite file, or one of the server's databases. */
static void fresh_target(char *out, size_t n) {
  int k = db_seq++;
  if (use_pg) {
    assert_true(k < 12);
    snprintf(out, n, "%s dbname=t%d", pg_conninfo, k);
  } else {
    char name[64];
    snprintf(name, sizeof name, "registry_%d", k);
    char *dir = ot_test_tmpdir(name);
    snprintf(out, n, "%s/registry.db", dir);
    free(dir);
  }
}

static ot_registry *open_ok(const char *target) {
  ot_registry *r = NULL;
  if (ot_reg_open(target, &r) != OT_OK) fail_msg("open %s: %s", target, ot_error_detail());
  return r;
}

static int setup(void **state) {
  (void)state;
  if (skip_why[0]) skip();
  return 0;
}

#define OK(call)                                                                                             \
  do {                                                                                                       \
    int rc_ = (call);                                                                                        \
    if (rc_ != OT_OK) fail_msg("%s: %d %s", #call, rc_, ot_error_detail());                                  \
  } while (0)

static void test_schema(void **state) {
  (void)state;
  char t[1400];
  fresh_target(t, sizeof t);
  ot_registry *a = open_ok(t), *b = open_ok(t); /* a second daemon on the same database */
  int v = 0;
  OK(ot_reg_schema_version(a, &v));
  assert_int_equal(v, OT_REG_SCHEMA_VERSION);
  OK(ot_reg_schema_version(b, &v));
  assert_int_equal(v, OT_REG_SCHEMA_VERSION);
  ot_reg_close(b);
  ot_reg_close(a);
  a = open_ok(t); /* reopening migrates nothing */
  OK(ot_reg_schema_version(a, &v));
  assert_int_equal(v, OT_REG_SCHEMA_VERSION);
  cJSON *j = NULL;
  OK(ot_reg_list_json(a, "models", NULL, &j));
  assert_int_equal(cJSON_GetArraySize(j), 0);
  cJSON_Delete(j);
  ot_reg_close(a);
}

static void test_enrol(void **state) {
  (void)state;
  char t[1400], token[OT_TOKEN_CHARS + 1], fp[OT_FINGERPRINT_LEN], hex[65];
  fresh_target(t, sizeof t);
  ot_registry *r = open_ok(t);
  uint8_t pk1[32], pk2[32];
  randombytes_buf(pk1, 32);
  randombytes_buf(pk2, 32);
  OK(ot_reg_token_issue(r, "lab", token));
  int enrolled = 0;
  OK(ot_reg_access_ops.admit(r, pk1, token, &enrolled));
  assert_int_equal(enrolled, 1);
  assert_int_equal(ot_reg_access_ops.admit(r, pk2, token, &enrolled), OT_ERR_NOTFOUND); /* one use */
  assert_non_null(strstr(ot_error_detail(), "already used"));
  assert_int_equal(ot_reg_access_ops.check(r, pk2), OT_ERR_NOTFOUND);
  OK(ot_reg_access_ops.check(r, pk1));
  enrolled = 1;
  OK(ot_reg_access_ops.admit(r, pk1, NULL, &enrolled)); /* known device: no token needed */
  assert_int_equal(enrolled, 0);
  int64_t id = 0;
  OK(ot_reg_device_id(r, pk1, &id));
  assert_true(id > 0);
  OK(ot_reg_device_set_name(r, id, "phone-1"));
  cJSON *j = NULL;
  OK(ot_reg_list_json(r, "devices", NULL, &j));
  assert_int_equal(cJSON_GetArraySize(j), 1);
  cJSON *d = cJSON_GetArrayItem(j, 0);
  sodium_bin2hex(hex, sizeof hex, pk1, 32);
  assert_string_equal(cJSON_GetObjectItem(d, "public_key")->valuestring, hex);
  assert_string_equal(cJSON_GetObjectItem(d, "name")->valuestring, "phone-1");
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(d, "revoked_at")));
  assert_true(cJSON_IsNumber(cJSON_GetObjectItem(d, "enrolled_at")));
  char want_fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(pk1, want_fp);
  assert_string_equal(cJSON_GetObjectItem(d, "fingerprint")->valuestring, want_fp);
  cJSON_Delete(j);
  OK(ot_reg_device_revoke(r, want_fp, fp)); /* by fingerprint */
  assert_string_equal(fp, want_fp);
  assert_int_equal(ot_reg_access_ops.check(r, pk1), OT_ERR_INVALID);
  assert_int_equal(ot_reg_device_id(r, pk1, &id), OT_ERR_NOTFOUND);
  assert_int_equal(ot_reg_device_revoke(r, "0000", fp), OT_ERR_NOTFOUND);
  ot_reg_close(r);
}

/* A running session named name on model "m" with n enrolled devices (ids out). */
static int64_t running_session(ot_registry *r, const char *name, int rounds, int n, int64_t *dev) {
  OK(ot_reg_model_put(r, "m", "/models/m", "d1"));
  int64_t emu = 0, emu2 = 0, sid = 0;
  char dir[1024], dg[OT_DIGEST_HEX];
  if (ot_reg_emulator_get(r, "d1", "k", &emu, dir, dg) != OT_OK)
    OK(ot_reg_emulator_put(r, "d1", "k", "/emu", "e1", &emu));
  OK(ot_reg_emulator_get(r, "d1", "k", &emu2, dir, dg));
  assert_int_equal(emu, emu2);
  assert_string_equal(dir, "/emu");
  OK(ot_reg_emulator_set_gap(r, emu, 0.25, 3.5));
  ot_session_cfg c;
  ot_session_cfg_default(&c);
  snprintf(c.name, sizeof c.name, "%s", name);
  snprintf(c.model, sizeof c.model, "m");
  c.rounds = rounds;
  c.min_devices = 1;
  c.max_devices = n;
  OK(ot_reg_session_create(r, &c, &sid));
  assert_int_equal(ot_reg_session_create(r, &c, &emu2), OT_ERR_INVALID); /* names are unique */
  OK(ot_reg_session_start(r, sid, emu, "a0", 4000000000LL));
  for (int i = 0; i < n; i++) {
    uint8_t pk[32];
    char token[OT_TOKEN_CHARS + 1];
    randombytes_buf(pk, 32);
    int enrolled = 0;
    OK(ot_reg_token_issue(r, NULL, token));
    OK(ot_reg_access_ops.admit(r, pk, token, &enrolled));
    OK(ot_reg_device_id(r, pk, &dev[i]));
  }
  return sid;
}

static void test_rounds(void **state) {
  (void)state;
  char t[1400];
  fresh_target(t, sizeof t);
  ot_registry *r = open_ok(t);
  int64_t dev[3];
  int64_t sid = running_session(r, "s1", 2, 3, dev);
  ot_session_row s;
  OK(ot_reg_session_get(r, "s1", &s));
  assert_int_equal(s.id, sid);
  assert_int_equal(s.state, OT_SS_RUNNING);
  assert_int_equal(s.round, 1);
  assert_int_equal(s.round_state, OT_RS_OPEN);
  assert_string_equal(s.adapter, "a0");
  assert_int_equal(s.deadline, 4000000000LL);
  OK(ot_reg_session_get(r, NULL, &s)); /* the oldest unfinished one */
  assert_int_equal(s.id, sid);
  const float loss[3] = {2.5f, 3.0f, 4.25f};
  OK(ot_reg_update_add(r, sid, 1, dev[0], 100, loss[0], "u0"));
  OK(ot_reg_update_add(r, sid, 1, dev[1], 300, loss[1], "u1"));
  assert_int_equal(ot_reg_update_add(r, sid, 1, dev[1], 300, loss[1], "u1b"), OT_ERR_MISMATCH); /* twice */
  assert_non_null(strstr(ot_error_detail(), "duplicate"));
  assert_int_equal(ot_reg_update_add(r, sid, 2, dev[2], 5, 1.0f, "u"), OT_ERR_MISMATCH); /* not yet */
  OK(ot_reg_update_add(r, sid, 1, dev[2], 600, loss[2], "u2"));
  int exists = 0;
  char stored[OT_DIGEST_HEX];
  OK(ot_reg_update_exists(r, sid, 1, dev[2], &exists, stored));
  assert_int_equal(exists, 1);
  assert_string_equal(stored, "u2");
  OK(ot_reg_update_exists(r, sid, 2, dev[2], &exists, stored));
  assert_int_equal(exists, 0);
  assert_string_equal(stored, "");
  /* the staging sweep removes a session's uploads on NOTFOUND only, never on other errors */
  assert_int_equal(ot_reg_session_get(r, "no-such-session", &s), OT_ERR_NOTFOUND);
  OK(ot_reg_session_get_id(r, sid, &s));
  assert_int_equal(s.n_updates, 3);
  OK(ot_reg_round_retry(r, sid, 1, 4000000100LL));
  OK(ot_reg_session_get_id(r, sid, &s));
  assert_int_equal(s.attempts, 2);
  OK(ot_reg_round_close(r, sid, 1));
  assert_int_equal(ot_reg_update_add(r, sid, 1, dev[0], 1, 1.0f, "late"), OT_ERR_MISMATCH);
  ot_update_row *u = NULL;
  int n = 0;
  OK(ot_reg_round_updates(r, sid, 1, &u, &n));
  assert_int_equal(n, 3);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(u[i].device_id, dev[i]); /* by device id */
    assert_true(u[i].loss == loss[i]);
    char want[8];
    snprintf(want, sizeof want, "u%d", i);
    assert_string_equal(u[i].digest, want);
  }
  assert_int_equal(u[0].tokens + u[1].tokens + u[2].tokens, 1000);
  free(u);
  OK(ot_reg_round_event(r, sid, 1, dev[0], "late", 1));
  OK(ot_reg_round_event(r, sid, 1, dev[0], "late", 2)); /* the last wins */
  ot_round_stats st = {.participants = 3,
                       .dropped = 0,
                       .tokens = 1000,
                       .agg_seconds = 0.5,
                       .dp_epsilon = NAN,
                       .secagg = 0,
                       .heldout_loss = NAN};
  OK(ot_reg_round_baseline(r, sid, 5.5));
  OK(ot_reg_round_finish(r, sid, 1, "a1", "st1", 4000000200LL, "/objects/adapters/a1", &st));
  /* never applied twice: the same round again is refused and changes nothing */
  assert_int_equal(ot_reg_round_finish(r, sid, 1, "zz", NULL, 1, "/x", &st), OT_ERR_INTERNAL);
  OK(ot_reg_session_get_id(r, sid, &s));
  assert_int_equal(s.round, 2);
  assert_string_equal(s.adapter, "a1");
  assert_string_equal(s.opt_state, "st1");
  assert_int_equal(s.round_state, OT_RS_OPEN);
  assert_int_equal(s.n_updates, 0);
  int served = 0;
  OK(ot_reg_adapter_served(r, "a1", &served));
  assert_int_equal(served, 1);
  OK(ot_reg_adapter_served(r, "a0", &served));
  assert_int_equal(served, 0);
  cJSON *j = NULL;
  OK(ot_reg_list_json(r, "round_stats", "s1", &j));
  assert_int_equal(cJSON_GetArraySize(j), 2);
  cJSON *r0 = cJSON_GetArrayItem(j, 0), *r1 = cJSON_GetArrayItem(j, 1);
  assert_int_equal(cJSON_GetObjectItem(r0, "round")->valueint, 0);
  assert_true(cJSON_GetObjectItem(r0, "heldout_loss")->valuedouble == 5.5);
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(r0, "tokens")));
  /* the mean of the losses devices reported, recomputed here */
  double mean = ((double)loss[0] + (double)loss[1] + (double)loss[2]) / 3;
  assert_true(fabs(cJSON_GetObjectItem(r1, "mean_loss")->valuedouble - mean) < 1e-12);
  assert_int_equal(cJSON_GetObjectItem(r1, "losses_reported")->valueint, 3);
  assert_int_equal(cJSON_GetObjectItem(r1, "participants")->valueint, 3);
  assert_int_equal(cJSON_GetObjectItem(r1, "stragglers")->valueint, 1);
  assert_true(cJSON_GetObjectItem(r1, "tokens")->valuedouble == 1000);
  assert_true(cJSON_GetObjectItem(r1, "emulator_gap")->valuedouble == 0.25);
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(r1, "dp_epsilon"))); /* NaN is stored as NULL */
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(r1, "heldout_loss")));
  assert_string_equal(cJSON_GetObjectItem(r1, "result")->valuestring, "a1");
  cJSON_Delete(j);
  /* the last round publishes the adapter under the session's name */
  OK(ot_reg_update_add(r, sid, 2, dev[0], 10, 1.5f, "v0"));
  OK(ot_reg_round_close(r, sid, 2));
  OK(ot_reg_round_finish(r, sid, 2, "a2", NULL, 0, "/objects/adapters/a2", NULL));
  OK(ot_reg_session_get_id(r, sid, &s));
  assert_int_equal(s.state, OT_SS_DONE);
  assert_string_equal(s.opt_state, "");
  int64_t ids[4];
  OK(ot_reg_sessions_active(r, ids, 4, &n));
  assert_int_equal(n, 0);
  OK(ot_reg_list_json(r, "adapters", NULL, &j));
  assert_int_equal(cJSON_GetArraySize(j), 1);
  assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(j, 0), "digest")->valuestring, "a2");
  assert_int_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(j, 0), "published")->valueint, 1);
  cJSON_Delete(j);
  OK(ot_reg_list_json(r, "sessions", NULL, &j));
  cJSON *s0 = cJSON_GetArrayItem(j, 0);
  assert_true(cJSON_IsNumber(cJSON_GetObjectItem(s0, "rounds")));
  assert_int_equal(cJSON_GetObjectItem(s0, "rounds")->valueint, 2);
  assert_int_equal(cJSON_GetObjectItem(s0, "max_devices")->valueint, 3);
  assert_string_equal(cJSON_GetObjectItem(s0, "state")->valuestring, "done");
  cJSON_Delete(j);
  OK(ot_reg_list_json(r, "session", "s1", &j));
  cJSON *cfg = cJSON_GetObjectItem(cJSON_GetArrayItem(j, 0), "config");
  assert_true(cJSON_IsObject(cfg));
  assert_string_equal(cJSON_GetObjectItem(cfg, "name")->valuestring, "s1");
  assert_true(cJSON_GetObjectItem(cJSON_GetArrayItem(j, 0), "emulator_ce")->valuedouble == 3.5);
  cJSON_Delete(j);
  OK(ot_reg_list_json(r, "session_audit", "s1", &j));
  int creates = 0, dones = 0;
  for (int i = 0; i < cJSON_GetArraySize(j); i++) {
    const char *ev = cJSON_GetObjectItem(cJSON_GetArrayItem(j, i), "event")->valuestring;
    creates += strcmp(ev, "session.create") == 0;
    dones += strcmp(ev, "round.done") == 0;
  }
  assert_int_equal(creates, 1);
  assert_int_equal(dones, 2);
  cJSON_Delete(j);
  OK(ot_reg_list_json(r, "updates", "s1", &j));
  assert_int_equal(cJSON_GetArraySize(j), 4);
  cJSON_Delete(j);
  OK(ot_reg_list_json(r, "counts", NULL, &j));
  int seen = 0;
  for (int i = 0; i < cJSON_GetArraySize(j); i++) {
    cJSON *e = cJSON_GetArrayItem(j, i);
    if (strcmp(cJSON_GetObjectItem(e, "metric")->valuestring, "updates") == 0) {
      assert_int_equal(cJSON_GetObjectItem(e, "value")->valueint, 4);
      seen = 1;
    }
  }
  assert_int_equal(seen, 1);
  cJSON_Delete(j);
  assert_int_equal(ot_reg_list_json(r, "nope", NULL, &j), OT_ERR_INVALID);
  OK(ot_reg_adapter_publish(r, "s1", 0));
  assert_int_equal(ot_reg_adapter_publish(r, "nope", 1), OT_ERR_NOTFOUND);
  OK(ot_reg_adapter_delete(r, "s1"));
  assert_int_equal(ot_reg_adapter_delete(r, "s1"), OT_ERR_NOTFOUND);
  ot_reg_close(r);
}

static void count_adapter(void *user, const char *name, const char *dir) {
  (void)name;
  (void)dir;
  (*(int *)user)++;
}

static void test_published(void **state) {
  (void)state;
  char t[1400];
  fresh_target(t, sizeof t);
  ot_registry *r = open_ok(t);
  int64_t dev[1];
  int64_t sid = running_session(r, "pub", 1, 1, dev);
  OK(ot_reg_update_add(r, sid, 1, dev[0], 10, 1.0f, "v0"));
  OK(ot_reg_round_close(r, sid, 1));
  OK(ot_reg_round_finish(r, sid, 1, "a1", NULL, 0, "/objects/adapters/a1", NULL));
  int calls = 0, found = 0;
  OK(ot_reg_adapters_published(r, "d1", NULL, count_adapter, &calls, &found));
  assert_int_equal(calls, 1);
  assert_int_equal(found, 1);
  OK(ot_reg_adapters_published(r, "d1", "pub", count_adapter, &calls, &found));
  assert_int_equal(found, 1);
  OK(ot_reg_adapters_published(r, "d1", "other", count_adapter, &calls, &found));
  assert_int_equal(found, 0);
  OK(ot_reg_adapters_published(r, "d2", NULL, count_adapter, &calls, &found)); /* another base */
  assert_int_equal(found, 0);
  OK(ot_reg_adapter_publish(r, "pub", 0));
  OK(ot_reg_adapters_published(r, "d1", NULL, count_adapter, &calls, &found));
  assert_int_equal(found, 0);
  ot_reg_close(r);
}

static void test_api_keys(void **state) {
  (void)state;
  char t[1400], key[OT_API_KEY_CHARS + 1], id[OT_API_KEY_ID_CHARS + 1];
  fresh_target(t, sizeof t);
  ot_registry *r = open_ok(t);
  OK(ot_reg_api_key_create(r, "acme", "m,n", 0, "ci", key, id));
  ot_api_key_row k;
  OK(ot_reg_api_key_check(r, key, &k));
  assert_string_equal(k.id, id);
  assert_string_equal(k.tenant, "acme");
  assert_int_equal(k.admin, 0);
  assert_int_equal(k.revoked_at, 0);
  assert_true(ot_api_key_allows_model(&k, "n"));
  assert_false(ot_api_key_allows_model(&k, "o"));
  assert_int_equal(ot_reg_api_key_check(r, "otk-nope", &k), OT_ERR_NOTFOUND);
  OK(ot_reg_api_key_revoke(r, id));
  OK(ot_reg_api_key_check(r, key, &k));
  assert_true(k.revoked_at > 0);
  assert_int_equal(ot_reg_api_key_revoke(r, id), OT_ERR_NOTFOUND);
  cJSON *j = NULL;
  OK(ot_reg_list_json(r, "api_keys", NULL, &j));
  assert_int_equal(cJSON_GetArraySize(j), 1);
  assert_int_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(j, 0), "admin")->valueint, 0);
  cJSON_Delete(j);
  ot_reg_close(r);
}

/* ---- several connections at once: several daemons on one database ----------------------- */

enum { N_CONN = 4, N_DEV = 24 };

typedef struct {
  const char *target;
  int64_t sid;
  const int64_t *dev;
  int first, count;
  int ok[N_DEV];   /* 1: acknowledged */
  int bad_refusal; /* a refusal other than "closed" */
  pthread_barrier_t *go;
} adder;

static void *add_updates(void *arg) {
  adder *a = arg;
  ot_registry *r = NULL;
  if (ot_reg_open(a->target, &r) != OT_OK) {
    a->bad_refusal = 1;
    pthread_barrier_wait(a->go);
    return NULL;
  }
  pthread_barrier_wait(a->go);
  for (int i = a->first; i < a->first + a->count; i++) {
    char dg[16];
    snprintf(dg, sizeof dg, "u%d", i);
    int rc = ot_reg_update_add(r, a->sid, 1, a->dev[i], 10 + (uint64_t)i, 1.0f, dg);
    if (rc == OT_OK)
      a->ok[i] = 1;
    else if (rc != OT_ERR_MISMATCH || !strstr(ot_error_detail(), "closed"))
      a->bad_refusal = 1;
  }
  ot_reg_close(r);
  return NULL;
}

/* Updates arrive through several connections while another closes the round: every
 * acknowledged update is in the closed round's rows and no refused one is. */
static void test_update_vs_close(void **state) {
  (void)state;
  char t[1400];
  fresh_target(t, sizeof t);
  ot_registry *r = open_ok(t);
  int64_t dev[N_DEV];
  int64_t sid = running_session(r, "race", 1, N_DEV, dev);
  pthread_barrier_t go;
  pthread_barrier_init(&go, NULL, N_CONN + 1);
  adder a[N_CONN];
  pthread_t th[N_CONN];
  for (int k = 0; k < N_CONN; k++) {
    a[k] = (adder){.target = t,
                   .sid = sid,
                   .dev = dev,
                   .first = k * (N_DEV / N_CONN),
                   .count = N_DEV / N_CONN,
                   .go = &go};
    assert_int_equal(pthread_create(&th[k], NULL, add_updates, &a[k]), 0);
  }
  pthread_barrier_wait(&go);
  /* close once a few updates are in (or all of them on a fast machine) */
  ot_session_row s;
  do {
    OK(ot_reg_session_get_id(r, sid, &s));
  } while (s.n_updates < 3);
  OK(ot_reg_round_close(r, sid, 1));
  for (int k = 0; k < N_CONN; k++) pthread_join(th[k], NULL);
  pthread_barrier_destroy(&go);
  ot_update_row *u = NULL;
  int n = 0, acked = 0;
  OK(ot_reg_round_updates(r, sid, 1, &u, &n));
  for (int k = 0; k < N_CONN; k++) {
    assert_int_equal(a[k].bad_refusal, 0);
    for (int i = a[k].first; i < a[k].first + a[k].count; i++) {
      acked += a[k].ok[i];
      int stored = 0;
      for (int m = 0; m < n; m++) stored |= u[m].device_id == dev[i];
      assert_int_equal(stored, a[k].ok[i]);
    }
  }
  assert_int_equal(n, acked);
  assert_true(n >= 3);
  printf("[ registry ] %d of %d updates acknowledged before the close, all of them stored\n", n, N_DEV);
  free(u);
  ot_reg_close(r);
}

typedef struct {
  const char *target;
  int64_t sid;
  int rc;
  char adapter[8];
  pthread_barrier_t *go;
} finisher;

static void *finish_round(void *arg) {
  finisher *f = arg;
  ot_registry *r = NULL;
  f->rc = ot_reg_open(f->target, &r);
  pthread_barrier_wait(f->go);
  if (f->rc == OT_OK) f->rc = ot_reg_round_finish(r, f->sid, 1, f->adapter, NULL, 4000000000LL, "/a", NULL);
  ot_reg_close(r);
  return NULL;
}

/* Two aggregators (an old leader that lost its lease, the new one) finish the same round at
 * once: exactly one result is applied. */
static void test_finish_once(void **state) {
  (void)state;
  char t[1400];
  fresh_target(t, sizeof t);
  ot_registry *r = open_ok(t);
  int64_t dev[2];
  int64_t sid = running_session(r, "twice", 3, 2, dev);
  OK(ot_reg_update_add(r, sid, 1, dev[0], 10, 1.0f, "v0"));
  OK(ot_reg_round_close(r, sid, 1));
  pthread_barrier_t go;
  pthread_barrier_init(&go, NULL, N_CONN);
  finisher f[N_CONN];
  pthread_t th[N_CONN];
  for (int k = 0; k < N_CONN; k++) {
    f[k] = (finisher){.target = t, .sid = sid, .go = &go};
    snprintf(f[k].adapter, sizeof f[k].adapter, "a%d", k);
    assert_int_equal(pthread_create(&th[k], NULL, finish_round, &f[k]), 0);
  }
  int wins = 0, winner = -1;
  for (int k = 0; k < N_CONN; k++) {
    pthread_join(th[k], NULL);
    if (f[k].rc == OT_OK) wins++, winner = k;
  }
  pthread_barrier_destroy(&go);
  assert_int_equal(wins, 1);
  ot_session_row s;
  OK(ot_reg_session_get_id(r, sid, &s));
  assert_int_equal(s.round, 2);
  assert_string_equal(s.adapter, f[winner].adapter);
  cJSON *j = NULL;
  OK(ot_reg_list_json(r, "rounds", "twice", &j));
  assert_int_equal(cJSON_GetArraySize(j), 2); /* round 1 done, round 2 opened once */
  cJSON_Delete(j);
  ot_reg_close(r);
}

typedef struct {
  const char *target;
  const char *token;
  int enrolled, rc;
  pthread_barrier_t *go;
} enroller;

static void *enrol(void *arg) {
  enroller *e = arg;
  ot_registry *r = NULL;
  e->rc = ot_reg_open(e->target, &r);
  uint8_t pk[32];
  randombytes_buf(pk, 32);
  pthread_barrier_wait(e->go);
  if (e->rc == OT_OK) e->rc = ot_reg_access_ops.admit(r, pk, e->token, &e->enrolled);
  ot_reg_close(r);
  return NULL;
}

/* One token presented to several daemons at once enrols exactly one device. */
static void test_token_once(void **state) {
  (void)state;
  char t[1400], token[OT_TOKEN_CHARS + 1];
  fresh_target(t, sizeof t);
  ot_registry *r = open_ok(t);
  OK(ot_reg_token_issue(r, NULL, token));
  pthread_barrier_t go;
  pthread_barrier_init(&go, NULL, N_CONN);
  enroller e[N_CONN];
  pthread_t th[N_CONN];
  for (int k = 0; k < N_CONN; k++) {
    e[k] = (enroller){.target = t, .token = token, .go = &go};
    assert_int_equal(pthread_create(&th[k], NULL, enrol, &e[k]), 0);
  }
  int wins = 0;
  for (int k = 0; k < N_CONN; k++) {
    pthread_join(th[k], NULL);
    wins += e[k].rc == OT_OK && e[k].enrolled;
  }
  pthread_barrier_destroy(&go);
  assert_int_equal(wins, 1);
  cJSON *j = NULL;
  OK(ot_reg_list_json(r, "devices", NULL, &j));
  assert_int_equal(cJSON_GetArraySize(j), 1);
  cJSON_Delete(j);
  ot_reg_close(r);
}

/* Leadership: one owner at a time, renewals by the owner, takeover after expiry or a drop. */
static void test_lease(void **state) {
  (void)state;
  char t[1400];
  fresh_target(t, sizeof t);
  ot_registry *a = open_ok(t), *b = open_ok(t);
  int64_t dev[1];
  int64_t sid = running_session(a, "lead", 1, 1, dev);
  int held = -1;
  OK(ot_reg_lease_take(a, sid, "daemon-a", 1, &held));
  assert_int_equal(held, 1);
  OK(ot_reg_lease_take(b, sid, "daemon-b", 30, &held));
  assert_int_equal(held, 0);
  OK(ot_reg_lease_take(a, sid, "daemon-a", 1, &held)); /* renewal */
  assert_int_equal(held, 1);
  sleep_ms(2100); /* a's lease (1 s on the database's clock) expires */
  OK(ot_reg_lease_take(b, sid, "daemon-b", 30, &held));
  assert_int_equal(held, 1);
  OK(ot_reg_lease_take(a, sid, "daemon-a", 1, &held));
  assert_int_equal(held, 0);
  OK(ot_reg_lease_drop(b, "daemon-b")); /* b stops cleanly: a takes over at once */
  OK(ot_reg_lease_take(a, sid, "daemon-a", 30, &held));
  assert_int_equal(held, 1);
  assert_int_equal(ot_reg_lease_take(a, sid, "", 30, &held), OT_ERR_INVALID);
  OK(ot_reg_lease_renew(a, "daemon-a", 30)); /* a renewal keeps it */
  OK(ot_reg_lease_take(b, sid, "daemon-b", 30, &held));
  assert_int_equal(held, 0);
  /* a finished session needs no leader: the owner's next renewal removes its lease */
  OK(ot_reg_update_add(a, sid, 1, dev[0], 10, 1.0f, "v0"));
  OK(ot_reg_round_close(a, sid, 1));
  OK(ot_reg_round_finish(a, sid, 1, "a1", NULL, 0, "/a1", NULL));
  OK(ot_reg_lease_renew(a, "daemon-a", 30));
  OK(ot_reg_lease_take(b, sid, "daemon-b", 30, &held));
  assert_int_equal(held, 1);
  ot_reg_close(b);
  ot_reg_close(a);
}

static void test_target_kind(void **state) {
  (void)state;
  assert_true(ot_regdb_is_pg("postgresql://u@h/db"));
  assert_true(ot_regdb_is_pg("postgres://h/db"));
  assert_true(ot_regdb_is_pg("host=/run/pg dbname=x"));
  assert_true(ot_regdb_is_pg(" dbname = x"));
  assert_false(ot_regdb_is_pg("/state/registry.db"));
  assert_false(ot_regdb_is_pg(":memory:"));
  assert_false(ot_regdb_is_pg("registry.db"));
  assert_false(ot_regdb_is_pg("a/b=c.db"));
}

int main(int argc, char **argv) {
  if (argc != 2 || (strcmp(argv[1], "sqlite") != 0 && strcmp(argv[1], "postgresql") != 0)) {
    fprintf(stderr, "usage: test_registry sqlite|postgresql\n");
    return 2;
  }
  if (sodium_init() < 0) return 1;
  use_pg = strcmp(argv[1], "postgresql") == 0;
  if (use_pg) {
    const char *dbs[] = {"t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9", "t10", "t11"};
    pg_fixture_start(dbs, 12, pg_conninfo, sizeof pg_conninfo, skip_why, sizeof skip_why);
  }
  if (skip_why[0]) printf("[ SKIPPED  ] PostgreSQL cases: %s\n", skip_why);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_target_kind),
      cmocka_unit_test_setup(test_schema, setup),
      cmocka_unit_test_setup(test_enrol, setup),
      cmocka_unit_test_setup(test_rounds, setup),
      cmocka_unit_test_setup(test_published, setup),
      cmocka_unit_test_setup(test_api_keys, setup),
      cmocka_unit_test_setup(test_update_vs_close, setup),
      cmocka_unit_test_setup(test_finish_once, setup),
      cmocka_unit_test_setup(test_token_once, setup),
      cmocka_unit_test_setup(test_lease, setup),
  };
  int rc = cmocka_run_group_tests_name(use_pg ? "registry on PostgreSQL" : "registry on SQLite", tests, NULL,
                                       NULL);
  pg_fixture_stop();
  return rc;
}
