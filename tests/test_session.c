/* Federated sessions end to end on loopback: a real `offtune-cloud serve` process and
 * several `offtune-device run` processes on a tiny model.
 * - two sessions at once: FedAvg with 3 devices (each aggregate equals the token-weighted
 *   average of the stored updates, recomputed here) and LoRA + FedAdam with 2 devices
 *   (the server step recomputed here); the final adapters are published and load;
 * - a device killed mid-round: the round completes at its deadline with the others; a
 *   straggler's late upload is refused as stale and it joins the next round;
 * - the daemon killed with kill -9 mid-round and restarted: the session finishes, every
 *   accepted update is kept and none is applied twice (registry rows, aggregates);
 * - a malicious device (garbage, oversized, wrong shape, NaN, stale round, duplicate,
 *   inflated token count): refused with nothing stored, the honest device unaffected;
 * - no byte a device sends carries its private text (OT_WIRE_TRACE), and the same search
 *   finds a deliberate leak;
 * - FedProx's proximal term in the device trainer keeps the adapter near its start. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ot_emulator.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_identity.h"
#include "ot_pb.h"
#include "ot_safetensors.h"
#include "ot_test_util.h"
#include "ot_transport.h"
#include "session.pb-c.h"
#include "session_fixture.h"

/* ---- recomputing aggregates from the stored files --------------------------------------- */

/* The stored updates of a round (at most cap) and their token weights; returns how many. */
static int round_updates(const daemon_t *d, cJSON *show, int round, tensors *ups, double *w, int cap) {
  char p[2048];
  cJSON *u;
  int n = 0;
  cJSON_ArrayForEach(u, cJSON_GetObjectItem(show, "updates")) {
    if ((int)cJSON_GetNumberValue(cJSON_GetObjectItem(u, "round")) != round) continue;
    assert_true(n < cap);
    snprintf(p, sizeof p, "%s/objects/updates/%s.safetensors", d->state,
             cJSON_GetStringValue(cJSON_GetObjectItem(u, "digest")));
    tensors_load(p, &ups[n]);
    w[n++] = cJSON_GetNumberValue(cJSON_GetObjectItem(u, "tokens"));
  }
  return n;
}

/* Round r's result against the token-weighted average of its updates (FedAvg), or
 * against one FedAdam step from zero moments (fedadam, first round). Returns the number
 * of updates of the round. */
static int check_round(const daemon_t *d, cJSON *show, int round, int fedadam, float lr, float b1, float b2,
                       float eps) {
  cJSON *r = show_round(show, round);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(r, "state")), "done");
  char p[2048];
  tensors in, res;
  adapter_file(d, cJSON_GetStringValue(cJSON_GetObjectItem(r, "input")), p, sizeof p);
  tensors_load(p, &in);
  adapter_file(d, cJSON_GetStringValue(cJSON_GetObjectItem(r, "result")), p, sizeof p);
  tensors_load(p, &res);
  tensors ups[16];
  double w[16], wsum = 0;
  int n = round_updates(d, show, round, ups, w, 16);
  for (int i = 0; i < n; i++) wsum += w[i];
  assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetObjectItem(r, "participants")), n);
  assert_int_equal(res.n, in.n);
  double max_err = 0, max_delta = 0;
  for (size_t t = 0; t < in.n; t++) {
    const ot_st_tensor *x = ot_st_at(in.st, t);
    const float *got = tensor(&res, x->name), *g = in.v[t];
    for (uint64_t k = 0; k < x->numel; k++) {
      double avg = 0;
      for (int i = 0; i < n; i++) avg += w[i] * tensor(&ups[i], x->name)[k];
      avg /= wsum;
      double want = avg;
      if (fedadam) {
        double delta = avg - g[k], m = (1 - b1) * delta, v = (1 - b2) * delta * delta;
        want = g[k] + lr * m / (sqrt(v) + eps);
      }
      double e = fabs(got[k] - want) / (fabs(want) + 1e-3);
      if (e > max_err) max_err = e;
      if (fabs(want - g[k]) > max_delta) max_delta = fabs(want - g[k]);
    }
  }
  fprintf(stderr,
          "round %d: %d updates, %.0f tokens; aggregate vs recomputed: max rel err %.2e (max change %.2e)\n",
          round, n, wsum, max_err, max_delta);
  assert_true(max_err < 1e-5);
  assert_true(max_delta > 0); /* the round changed the adapter: the check compares something */
  for (int i = 0; i < n; i++) tensors_free(&ups[i]);
  tensors_free(&in);
  tensors_free(&res);
  return n;
}

/* ---- setup ------------------------------------------------------------------------------ */

static int setup(void **state) {
  (void)state;
  const char *genres[] = {"romance", "mystery", "humor"};
  return session_fixture_setup("session", genres, 3);
}

static int teardown(void **state) {
  (void)state;
  session_fixture_teardown();
  return 0;
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_two_sessions(void **state) {
  (void)state;
  daemon_t d;
  daemon_init(&d, "two");
  /* one daemon per state directory */
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s serve --state '%s' --listen tcp://127.0.0.1:0", cloud, d.state), 1);
  assert_non_null(strstr(out, "another daemon runs on"));
  /* operator commands: usage errors exit 2, refusals exit 1 with the daemon's reason */
  assert_int_equal(ot_test_run(out, sizeof out, "%s session", cloud), 2);
  assert_int_equal(ot_test_run(out, sizeof out, "%s session create --state '%s' --name x", cloud, d.state),
                   2);
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s session create --state '%s' --name x --model nosuch", cloud, d.state),
      1);
  assert_non_null(strstr(out, "no model named 'nosuch'"));
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s session create --state '%s' --name 'bad/name' --model full", cloud,
                               d.state),
                   1);
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s session create --state '%s' --name x --model full --bottom 2 --top 2",
                               cloud, d.state),
                   1);
  assert_non_null(strstr(out, "no middle"));
  assert_int_equal(
      ot_test_run(out, sizeof out,
                  "%s session create --state '%s' --name x --model full --steps 5 --average-last 6", cloud,
                  d.state),
      1);
  assert_non_null(strstr(out, "average_last 6 exceeds the 5 steps of a round"));
  assert_int_equal(ot_test_run(out, sizeof out, "%s device revoke nosuch --state '%s'", cloud, d.state), 1);
  assert_int_equal(ot_test_run(out, sizeof out, "%s session list --state '%s/nowhere'", cloud, dir), 1);
  assert_non_null(strstr(out, "cannot reach the daemon"));
  session_create(&d, "alpha", "--rounds 2 --min-devices 3 --max-devices 3 --deadline 120 --secagg off");
  session_create(
      &d, "beta",
      "--rounds 2 --min-devices 2 --max-devices 2 --deadline 120 --adapter lora --lora-r 2 --lora-alpha 4 "
      "--lora-dropout 0 --aggregation fedadam --server-lr 0.1");
  const char *devs[] = {"a1", "a2", "a3", "b1", "b2"};
  const char *data[] = {"romance.txt", "mystery.txt", "humor.txt", "romance.txt", "humor.txt"};
  pid_t pids[5];
  for (int i = 0; i < 5; i++) {
    device_join(&d, devs[i]);
    pids[i] = device_run(devs[i], data[i], i < 3 ? "alpha" : "beta", NULL);
  }
  for (int i = 0; i < 5; i++) {
    int rc = wait_exit(pids[i], 120);
    if (rc != 0) fail_device(&d, devs[i], rc);
  }
  cJSON *a = wait_session(&d, "alpha", "done", 30), *b = wait_session(&d, "beta", "done", 30);
  for (int r = 1; r <= 2; r++) assert_int_equal(check_round(&d, a, r, 0, 0, 0, 0, 0), 3);
  /* FedAdam's first step from zero moments, recomputed */
  assert_int_equal(check_round(&d, b, 1, 1, 0.1f, 0.9f, 0.99f, 1e-3f), 2);
  /* both published; the final adapters plug into the emulator and the full model */
  RUN_OK("%s adapter list --state '%s' --json", cloud, d.state);
  assert_non_null(strstr(out, "\"alpha\""));
  assert_non_null(strstr(out, "\"beta\""));
  const char *emu = cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(a, "session"), "emulator"));
  const char *final = cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(a, "session"), "adapter"));
  const char *final_b =
      cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(b, "session"), "adapter"));
  RUN_OK("%s eval --emulator %s --adapter %s/objects/adapters/%s --text %s/romance.txt --seq-len 32 --json",
         device, emu, d.state, final, dir);
  RUN_OK("%s eval --model %s/full --adapter %s/objects/adapters/%s --text %s/humor.txt --seq-len 32 --json",
         cloud, dir, d.state, final_b, dir);
  /* the emulator was distilled once and reused by the second session */
  assert_int_equal(ot_test_system("test $(ls '%s/emulators' | wc -l) -eq 1", d.state), 0);
  /* devices listed with their names, the human listings print */
  RUN_OK("%s device list --state '%s'", cloud, d.state);
  assert_non_null(strstr(out, "a3"));
  RUN_OK("%s session list --state '%s'", cloud, d.state);
  assert_non_null(strstr(out, "beta"));
  /* revocation: the operator revokes a1; its next run is refused at the handshake */
  RUN_OK("%s device list --state '%s' --json", cloud, d.state);
  cJSON *dl = cJSON_Parse(out), *dev;
  char fp[OT_FINGERPRINT_LEN] = "";
  cJSON_ArrayForEach(dev, cJSON_GetObjectItem(dl, "devices")) {
    const char *nm = cJSON_GetStringValue(cJSON_GetObjectItem(dev, "name"));
    if (nm && strcmp(nm, "a1") == 0)
      snprintf(fp, sizeof fp, "%s", cJSON_GetStringValue(cJSON_GetObjectItem(dev, "fingerprint")));
  }
  cJSON_Delete(dl);
  assert_true(fp[0]);
  RUN_OK("%s device revoke %s --state '%s'", cloud, fp, d.state);
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s run --data %s/romance.txt --state '%s/a1' --session alpha", device, dir,
                               dir),
                   1);
  assert_non_null(strstr(out, "revoked"));
  cJSON_Delete(a);
  cJSON_Delete(b);
  daemon_stop(&d);
}

/* The daemon restarted with --http serves the base and the published adapters of the
 * previous test's sessions; unpublishing takes effect at the next request. */
static void test_serving_published(void **state) {
  (void)state;
  daemon_t d;
  memset(&d, 0, sizeof d);
  snprintf(d.state, sizeof d.state, "%s/two", dir);
  snprintf(d.log, sizeof d.log, "%s/two-serve.log", dir);
  char cj[1200];
  snprintf(cj, sizeof cj, "%s/cloud.json", d.state);
  unlink(cj);
  d.pid = spawn(d.log, "%s serve --state '%s' --listen tcp://127.0.0.1:0 --model %s/full --http 127.0.0.1:0",
                cloud, d.state, dir);
  wait_for_file_text(cj, "\"http\": \"http://", 20);
  char *text = NULL, http[256];
  size_t len;
  assert_int_equal(ot_file_read_all(cj, 1 << 16, &text, &len), OT_OK);
  cJSON *j = cJSON_Parse(text);
  free(text);
  snprintf(http, sizeof http, "%s", cJSON_GetStringValue(cJSON_GetObjectItem(j, "http")));
  cJSON_Delete(j);
  RUN_OK("curl -sf %s/v1/models", http);
  assert_non_null(strstr(out, "\"id\":\"full\""));
  assert_non_null(strstr(out, "\"id\":\"alpha\""));
  assert_non_null(strstr(out, "\"id\":\"beta\""));
  /* seeded samples (the tiny model's greedy text is one repeated letter): each adapter
   * changes the base model's distribution, so its text (beta's FedAdam server step is
   * large enough for its LoRA, which starts at B = 0, to change a sample) */
  char texts[3][256];
  const char *models[] = {"full", "alpha", "beta"};
  for (int i = 0; i < 3; i++) {
    RUN_OK("curl -sf %s/v1/completions -d '{\"model\": \"%s\", \"prompt\": \"The \", \"max_tokens\": 24, "
           "\"temperature\": 1, \"seed\": 7}'",
           http, models[i]);
    cJSON *c = cJSON_Parse(out);
    assert_non_null(c);
    const char *t = cJSON_GetStringValue(
        cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(c, "choices"), 0), "text"));
    assert_non_null(t);
    snprintf(texts[i], sizeof texts[i], "%s", t);
    cJSON_Delete(c);
  }
  assert_string_not_equal(texts[0], texts[1]);
  assert_string_not_equal(texts[0], texts[2]);
  RUN_OK("%s adapter unpublish alpha --state '%s'", cloud, d.state);
  RUN_OK("curl -s -o /dev/null -w '%%{http_code}' %s/v1/completions -d '{\"model\": \"alpha\", \"prompt\": "
         "\"x\"}'",
         http);
  assert_string_equal(out, "404");
  RUN_OK("curl -sf %s/v1/models", http);
  assert_null(strstr(out, "\"id\":\"alpha\""));
  RUN_OK("%s adapter publish alpha --state '%s'", cloud, d.state);
  /* /metrics: the serving counters and the daemon's own (from its registry) */
  RUN_OK("curl -sf %s/metrics", http);
  assert_non_null(strstr(out, "offtune_requests_total{model=\"alpha\",outcome=\"ok\"} 1"));
  assert_non_null(strstr(out, "offtune_daemon_sessions{state=\"done\"} 2"));
  assert_non_null(strstr(out, "offtune_daemon_devices{state=\"revoked\"} 1"));
  assert_non_null(strstr(out, "offtune_daemon_update_events_total{event=\"update.accepted\"}"));
  assert_non_null(strstr(out, "offtune_daemon_rounds{state=\"done\"}"));
  daemon_stop(&d);
}

static void test_device_killed(void **state) {
  (void)state;
  daemon_t d;
  daemon_init(&d, "killed");
  /* the devices join first: round 1's deadline runs from its opening, and four joins take
   * seconds under ASan on a loaded machine, which pushed the straggler past round 2 too */
  const char *devs[] = {"k1", "k2", "k3", "k4"};
  for (int i = 0; i < 4; i++) device_join(&d, devs[i]);
  session_create(&d, "k", "--rounds 2 --min-devices 2 --max-devices 4 --deadline 6");
  pid_t p1 = device_run("k1", "romance.txt", "k", NULL), p2 = device_run("k2", "mystery.txt", "k", NULL);
  /* k3 trains, then dies before its upload; k4 is a straggler, always past the deadline */
  pid_t p3 = device_run("k3", "humor.txt", "k", "OT_TEST_DEVICE_DELAY_MS=60000");
  pid_t p4 = device_run("k4", "humor.txt", "k", "OT_TEST_DEVICE_DELAY_MS=8000");
  char log[1200];
  snprintf(log, sizeof log, "%s/k3.log", dir);
  wait_for_file_text(log, "before the upload", 60);
  kill(p3, SIGKILL);
  waitpid(p3, NULL, 0);
  double t0 = now_s();
  assert_int_equal(wait_exit(p1, 60), 0);
  assert_int_equal(wait_exit(p2, 60), 0);
  assert_int_equal(wait_exit(p4, 60), 0);
  cJSON *s = wait_session(&d, "k", "done", 30);
  fprintf(stderr, "both rounds finished %.1f s after the kill (deadline 6 s per round)\n", now_s() - t0);
  assert_int_equal(check_round(&d, s, 1, 0, 0, 0, 0, 0), 2);
  assert_int_equal(check_round(&d, s, 2, 0, 0, 0, 0, 0), 2);
  assert_true(file_has(d.log, "closed with 2 update(s) at the deadline"));
  /* the straggler's late round-1 upload was refused as stale; it then took part in round 2 */
  assert_true(file_has(d.log, "stale round 1 (session 'k' is in round 2)"));
  snprintf(log, sizeof log, "%s/k4.log", dir);
  assert_true(file_has(log, "k round 2 of 2: training"));
  cJSON_Delete(s);
  daemon_stop(&d);
}

/* Scheduler work that keeps failing (here the daemon's tmp/ is a file, as on a broken disk)
 * is retried with a doubling pause, not every 0.25 s, and the session goes on once the
 * cause is gone. */
static void test_scheduler_backoff(void **state) {
  (void)state;
  daemon_t d;
  daemon_init(&d, "backoff");
  assert_int_equal(ot_test_system("rm -rf '%s/tmp' && touch '%s/tmp'", d.state, d.state), 0);
  session_create(&d, "b", "--rounds 1 --min-devices 1 --max-devices 1 --deadline 30");
  wait_for_file_text(d.log, "retrying in 2.0 s (failure 3)", 20);
  cJSON *s = session_show(&d, "b");
  assert_string_equal(session_state(s), "preparing");
  cJSON_Delete(s);
  assert_false(file_has(d.log, "(failure 4)")); /* 0.5 + 1 + 2 s: no fourth try yet */
  assert_int_equal(ot_test_system("rm -f '%s/tmp' && mkdir '%s/tmp'", d.state, d.state), 0);
  s = wait_session(&d, "b", "running", 30);
  cJSON_Delete(s);
  assert_true(file_has(d.log, "retrying in 0.5 s (failure 1)"));
  assert_true(file_has(d.log, "retrying in 1.0 s (failure 2)"));
  daemon_stop(&d);
}

static void test_daemon_kill9(void **state) {
  (void)state;
  daemon_t d;
  daemon_init(&d, "kill9");
  session_create(&d, "r", "--rounds 3 --min-devices 2 --max-devices 2 --deadline 120");
  device_join(&d, "r1");
  device_join(&d, "r2");
  pid_t p1 = device_run("r1", "romance.txt", "r", NULL);
  /* r2 is slow: round 2 holds r1's update alone for 6 s (room for a loaded machine), and the daemon dies then
   */
  pid_t p2 = device_run("r2", "mystery.txt", "r", "OT_TEST_DEVICE_DELAY_MS=6000");
  char db[1200], sql[256];
  snprintf(db, sizeof db, "%s/registry.db", d.state);
  double t0 = now_s();
  while (count_rows(db, "SELECT COUNT(*) FROM updates WHERE round = 2") < 1) {
    if (now_s() - t0 > 60) {
      print_log(d.log);
      fail_msg("round 2 got no update");
    }
    sleep_ms(20);
  }
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM updates WHERE round = 2"), 1);
  kill(d.pid, SIGKILL);
  waitpid(d.pid, NULL, 0);
  snprintf(sql, sizeof sql, "SELECT COUNT(*) FROM rounds WHERE round = 2 AND state = 'open'");
  assert_int_equal(count_rows(db, sql), 1);
  fprintf(stderr, "daemon killed with kill -9 in round 2 with 1 of 2 updates; restarting on %s\n", d.url);
  sleep_ms(500);
  daemon_start(&d, d.url);
  assert_int_equal(wait_exit(p1, 120), 0);
  assert_int_equal(wait_exit(p2, 120), 0);
  cJSON *s = wait_session(&d, "r", "done", 30);
  /* every update accepted once: 2 per round, none lost, none twice */
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM updates"), 6);
  assert_int_equal(count_rows(db,
                              "SELECT COUNT(*) FROM (SELECT round, device_id FROM updates GROUP BY round, "
                              "device_id HAVING COUNT(*) > 1)"),
                   0);
  for (int r = 1; r <= 3; r++) assert_int_equal(check_round(&d, s, r, 0, 0, 0, 0, 0), 2);
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM adapters WHERE name = 'r' AND published = 1"), 1);
  cJSON_Delete(s);
  daemon_stop(&d);
}

/* ---- the malicious device: a protocol client written here ------------------------------- */

typedef struct {
  ot_client *c;
  Offtune__Session__RoundInfo *ri;
  ot_pb_alloc pa;
  const char *session; /* "m" unless set after mal_open */
} mal_t;

/* A new identity enrolled with a fresh token, its protocol client open; with trace, the
 * client's traffic from the handshake on goes to OT_WIRE_TRACE=trace (the caller unsets). */
static void mal_open(const daemon_t *d, ot_identity *id, const char *trace, mal_t *m) {
  RUN_OK("%s token issue --state '%s' --json", cloud, d->state);
  cJSON *tj = cJSON_Parse(out);
  assert_int_equal(ot_identity_generate(id), OT_OK);
  ot_client_config cc = {.url = d->url,
                         .id = id,
                         .cloud_fingerprint = d->fp,
                         .enrol_token = cJSON_GetStringValue(cJSON_GetObjectItem(tj, "token"))};
  if (trace) setenv("OT_WIRE_TRACE", trace, 1);
  memset(m, 0, sizeof *m);
  m->session = "m";
  assert_int_equal(ot_client_open(&cc, &m->c), OT_OK);
  cJSON_Delete(tj);
}

static int mal_call(mal_t *m, Offtune__Session__SessionRequest *req, uint8_t **reply, size_t *len) {
  uint8_t *body = NULL;
  size_t bl = 0;
  assert_int_equal(ot_pb_pack(&req->base, &body, &bl), 0);
  int rc = ot_client_call(m->c, body, bl, reply, len);
  free(body);
  return rc;
}

static void mal_poll(mal_t *m) {
  Offtune__Session__Poll p = OFFTUNE__SESSION__POLL__INIT;
  p.session = (char *)m->session;
  Offtune__Session__SessionRequest req = OFFTUNE__SESSION__SESSION_REQUEST__INIT;
  req.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_POLL;
  req.poll = &p;
  uint8_t *reply;
  size_t len;
  assert_int_equal(mal_call(m, &req, &reply, &len), OT_OK);
  ot_pb_alloc_init(&m->pa, 1 << 20);
  m->ri = offtune__session__round_info__unpack(&m->pa.a, len, reply);
  free(reply);
  assert_non_null(m->ri);
}

/* SubmitUpdate alone, for the file mal_submit uploaded last (no new upload). */
static int mal_resubmit(mal_t *m, unsigned round, uint64_t tokens, char *why, size_t n) {
  char path[1200], h[OT_DIGEST_HEX];
  snprintf(path, sizeof path, "%s/mal_upload", dir);
  assert_int_equal(ot_file_digest(path, h), OT_OK);
  Offtune__Session__SubmitUpdate su = OFFTUNE__SESSION__SUBMIT_UPDATE__INIT;
  su.session = (char *)m->session;
  su.round = round;
  su.digest = h;
  su.tokens = tokens;
  Offtune__Session__SessionRequest req = OFFTUNE__SESSION__SESSION_REQUEST__INIT;
  req.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_SUBMIT;
  req.submit = &su;
  uint8_t *reply;
  size_t len;
  assert_int_equal(mal_call(m, &req, &reply, &len), OT_OK);
  ot_pb_alloc pa;
  ot_pb_alloc_init(&pa, 1 << 20);
  Offtune__Session__SubmitReply *sr = offtune__session__submit_reply__unpack(&pa.a, len, reply);
  free(reply);
  assert_non_null(sr);
  int ok = sr->accepted;
  snprintf(why, n, "%s", sr->reason ? sr->reason : "");
  offtune__session__submit_reply__free_unpacked(sr, &pa.a);
  return ok;
}

/* Uploads data as update.<session>.<round> and submits it; returns 1 if accepted, 0 if the
 * upload or the submission was refused (reason in why). */
static int mal_submit(mal_t *m, unsigned round, const uint8_t *data, size_t size, uint64_t tokens, char *why,
                      size_t n) {
  char name[64], path[1200];
  snprintf(name, sizeof name, "update.%s.%u", m->session, round);
  ot_send_opts so = {.window = 2};
  int rc = ot_client_send(m->c, name, data, size, &so);
  if (rc) {
    snprintf(why, n, "upload refused: %s", ot_error_detail());
    return 0;
  }
  snprintf(path, sizeof path, "%s/mal_upload", dir);
  assert_int_equal(ot_file_write_atomic(path, data, size), OT_OK);
  return mal_resubmit(m, round, tokens, why, n);
}

/* The round's adapter file rewritten: scaled by 0.5 (0), one NaN (1), one tensor's shape
 * changed (2), or every value 1e38 (3: finite and well-formed, issue 14's poisoned update). */
static uint8_t *mal_variant(const char *adapter, int variant, size_t *size) {
  tensors t;
  tensors_load(adapter, &t);
  ot_st_writer *w;
  assert_int_equal(ot_st_writer_new(&w), OT_OK);
  int64_t shape[8];
  for (size_t i = 0; i < t.n; i++) {
    const ot_st_tensor *x = ot_st_at(t.st, i);
    memcpy(shape, x->shape, sizeof shape);
    for (uint64_t k = 0; k < x->numel; k++) t.v[i][k] = variant == 3 ? 1e38f : t.v[i][k] * 0.5f;
    if (variant == 1 && i == 0) t.v[i][0] = NAN;
    if (variant == 2 && i == 0 && x->ndim == 1 && x->numel > 1) shape[0] = 1;
    if (variant == 2 && i == 0 && x->ndim == 2) shape[0] = 1;
    assert_int_equal(ot_st_writer_add(w, x->name, OT_DTYPE_F32, x->ndim, shape, t.v[i]), OT_OK);
  }
  char path[1200];
  snprintf(path, sizeof path, "%s/mal_variant.safetensors", dir);
  assert_int_equal(ot_st_writer_save(w, path), OT_OK);
  ot_st_writer_free(w);
  tensors_free(&t);
  char *data;
  assert_int_equal(ot_file_read_all(path, 1 << 26, &data, size), OT_OK);
  return (uint8_t *)data;
}

static void test_malicious_device(void **state) {
  (void)state;
  daemon_t d;
  daemon_init(&d, "malicious");
  session_create(&d, "m", "--rounds 1 --min-devices 2 --max-devices 2 --deadline 120");
  ot_identity id;
  mal_t m;
  mal_open(&d, &id, NULL, &m);
  double t0 = now_s();
  for (;;) { /* the daemon distils the emulator first */
    mal_poll(&m);
    if (m.ri->state == OFFTUNE__SESSION__ROUND_STATE__TRAIN) break;
    offtune__session__round_info__free_unpacked(m.ri, &m.pa.a);
    assert_true(now_s() - t0 < 30);
    sleep_ms(100);
  }
  char adapter[1200], why[1024];
  snprintf(adapter, sizeof adapter, "%s/mal_adapter.safetensors", dir);
  for (size_t i = 0; i < m.ri->n_adapter_files; i++)
    if (strcmp(m.ri->adapter_files[i]->file, "adapter_model.safetensors") == 0) {
      ot_fetch_opts fo = {0};
      assert_int_equal(ot_client_fetch_file(m.c, m.ri->adapter_files[i]->name, adapter, &fo), OT_OK);
    }
  unsigned round = m.ri->round;
  offtune__session__round_info__free_unpacked(m.ri, &m.pa.a);
  size_t size;
  uint8_t *good = mal_variant(adapter, 0, &size);
  uint64_t tokens = 4 * 4 * 32;
  /* garbage of the right size */
  uint8_t *garbage = malloc(size);
  for (size_t i = 0; i < size; i++) garbage[i] = (uint8_t)(i * 131 + 7);
  assert_false(mal_submit(&m, round, garbage, size, tokens, why, sizeof why));
  fprintf(stderr, "garbage: %s\n", why);
  assert_non_null(strstr(why, "safetensors"));
  /* oversized: refused when the upload starts */
  size_t big = 3 * size + (2u << 20);
  uint8_t *huge = calloc(1, big);
  assert_false(mal_submit(&m, round, huge, big, tokens, why, sizeof why));
  fprintf(stderr, "oversized: %s\n", why);
  assert_non_null(strstr(why, "upload refused"));
  /* NaN, wrong shape */
  size_t s1, s2;
  uint8_t *nan = mal_variant(adapter, 1, &s1), *shape = mal_variant(adapter, 2, &s2);
  assert_false(mal_submit(&m, round, nan, s1, tokens, why, sizeof why));
  fprintf(stderr, "NaN: %s\n", why);
  assert_non_null(strstr(why, "non-finite"));
  assert_false(mal_submit(&m, round, shape, s2, tokens, why, sizeof why));
  fprintf(stderr, "wrong shape: %s\n", why);
  assert_non_null(strstr(why, "shape"));
  /* stale round, inflated weight */
  assert_false(mal_submit(&m, round + 7, good, size, tokens, why, sizeof why));
  fprintf(stderr, "stale round: %s\n", why);
  assert_non_null(strstr(why, "stale"));
  assert_false(mal_submit(&m, round, good, size, 1000000000000ull, why, sizeof why));
  fprintf(stderr, "inflated tokens: %s\n", why);
  assert_non_null(strstr(why, "tokens"));
  /* nothing of these is stored: no row, no object, no staged file */
  char db[1200];
  snprintf(db, sizeof db, "%s/registry.db", d.state);
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM updates"), 0);
  assert_int_equal(ot_test_system("test $(find '%s/objects/updates' '%s/staging' -type f | wc -l) -eq 0",
                                  d.state, d.state),
                   0);
  assert_true(file_has(d.log, "refused the update"));
  /* a valid update is accepted once; the same SubmitUpdate again (a client's retry after a late
   * reply) is answered as the first was and stores nothing; a second upload is a duplicate */
  assert_true(mal_submit(&m, round, good, size, tokens, why, sizeof why));
  assert_true(mal_resubmit(&m, round, tokens, why, sizeof why));
  assert_true(file_has(d.log, "answered a repeated submission"));
  assert_false(mal_submit(&m, round, good, size, tokens, why, sizeof why));
  fprintf(stderr, "duplicate: %s\n", why);
  assert_non_null(strstr(why, "duplicate"));
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM updates"), 1);
  assert_int_equal(ot_test_system("test $(find '%s/staging' -type f | wc -l) -eq 0", d.state), 0);
  ot_client_close(m.c);
  /* an honest device finishes the round, unaffected */
  device_join(&d, "h1");
  pid_t p = device_run("h1", "romance.txt", "m", NULL);
  assert_int_equal(wait_exit(p, 60), 0);
  cJSON *s = wait_session(&d, "m", "done", 30);
  assert_int_equal(check_round(&d, s, 1, 0, 0, 0, 0, 0), 2);
  assert_int_equal(ot_test_system("test $(ls '%s/objects/updates' | wc -l) -eq 2", d.state), 0);
  cJSON_Delete(s);
  free(good);
  free(garbage);
  free(huge);
  free(nan);
  free(shape);
  ot_identity_wipe(&id);
  daemon_stop(&d);
}

/* ---- robust aggregation: one poisoned device among honest ones (issue 14) ------------------ */

/* Round r of a session with one poisoned update (every value 1e38) among honest ones,
 * against what the rule promises relative to the honest-only aggregate H (computed here
 * from the stored update files, in double):
 *   fedavg-clip, bound B        |result - H| <= (t_p / T) (B + |H - g|): the poisoned delta
 *                               clipped to B enters with weight t_p / T; H is the honest
 *                               updates' clipped FedAvg, and the result is also checked
 *                               against the whole clipped FedAvg recomputed
 *   median (3 updates, no bound) every coordinate within the honest updates' range; H is
 *                               their median (the mean of 2), |result - H| <= |u_1 - u_2| / 2
 * Returns |result - H|. */
/* Round r of a session whose poisoned update was refused at upload (over the default bound)
 * and whose device then sent a benign one: nothing poisoned is stored, and the result is the
 * token-weighted FedAvg of the three stored updates. */
static void check_refused_at_upload(const daemon_t *d, cJSON *show, int round) {
  cJSON *r = show_round(show, round);
  assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetObjectItem(r, "participants")), 3);
  char p[2048];
  tensors res, ups[3];
  adapter_file(d, cJSON_GetStringValue(cJSON_GetObjectItem(r, "result")), p, sizeof p);
  tensors_load(p, &res);
  double w[3], wsum = 0;
  int n = round_updates(d, show, round, ups, w, 3);
  assert_int_equal(n, 3);
  for (int i = 0; i < n; i++) {
    assert_true(ups[i].v[0][0] != 1e38f);
    wsum += w[i];
  }
  double max_err = 0;
  for (size_t t = 0; t < res.n; t++) {
    const ot_st_tensor *x = ot_st_at(res.st, t);
    const float *got = res.v[t];
    for (uint64_t k = 0; k < x->numel; k++) {
      double want = 0;
      for (int i = 0; i < 3; i++) want += w[i] * tensor(&ups[i], x->name)[k];
      want /= wsum;
      max_err = fmax(max_err, fabs(got[k] - want) / (fabs(want) + 1e-3));
    }
  }
  fprintf(stderr,
          "fedavg round %d: poisoned update refused at upload, nothing of it stored; max rel err vs FedAvg "
          "%.2e\n",
          round, max_err);
  assert_true(max_err < 1e-5);
  for (int i = 0; i < 3; i++) tensors_free(&ups[i]);
  tensors_free(&res);
}

static double check_poisoned(const daemon_t *d, cJSON *show, int round, const char *rule, double bound) {
  cJSON *r = show_round(show, round);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(r, "state")), "done");
  char p[2048];
  tensors in, res, ups[3];
  adapter_file(d, cJSON_GetStringValue(cJSON_GetObjectItem(r, "input")), p, sizeof p);
  tensors_load(p, &in);
  adapter_file(d, cJSON_GetStringValue(cJSON_GetObjectItem(r, "result")), p, sizeof p);
  tensors_load(p, &res);
  double w[3];
  int n = round_updates(d, show, round, ups, w, 3), bad = -1;
  for (int i = 0; i < n; i++)
    if (ups[i].v[0][0] == 1e38f) bad = i;
  assert_int_equal(n, 3);
  assert_true(bad >= 0);
  int h[2], nh = 0;
  for (int i = 0; i < 3; i++)
    if (i != bad) h[nh++] = i;
  int clip = strcmp(rule, "fedavg-clip") == 0;
  assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetObjectItem(r, "participants")), 3);
  /* the updates' deltas' norms (clip factors) */
  double norm[3] = {0, 0, 0}, c[3];
  for (size_t t = 0; t < in.n; t++) {
    const ot_st_tensor *x = ot_st_at(in.st, t);
    for (int i = 0; i < 3; i++)
      for (uint64_t k = 0; k < x->numel; k++) {
        double dl = (double)tensor(&ups[i], x->name)[k] - in.v[t][k];
        norm[i] += dl * dl;
      }
  }
  for (int i = 0; i < 3; i++) {
    norm[i] = sqrt(norm[i]);
    c[i] = clip && norm[i] > bound ? bound / norm[i] : 1;
  }
  double th = w[h[0]] + w[h[1]], tall = th + w[bad];
  double dist = 0, hg = 0, spread = 0, max_err = 0;
  for (size_t t = 0; t < in.n; t++) {
    const ot_st_tensor *x = ot_st_at(in.st, t);
    const float *got = tensor(&res, x->name), *g = in.v[t], *a = tensor(&ups[h[0]], x->name),
                *b = tensor(&ups[h[1]], x->name), *q = tensor(&ups[bad], x->name);
    for (uint64_t k = 0; k < x->numel; k++) {
      assert_true(isfinite(got[k]));
      double H, want = NAN;
      if (clip) {
        double sh = w[h[0]] * c[h[0]] * (a[k] - (double)g[k]) + w[h[1]] * c[h[1]] * (b[k] - (double)g[k]);
        H = g[k] + sh / th;
        want = g[k] + (sh + w[bad] * c[bad] * (q[k] - (double)g[k])) / tall;
      } else {
        H = (a[k] + (double)b[k]) / 2;
        assert_true(got[k] >= fminf(a[k], b[k]) && got[k] <= fmaxf(a[k], b[k]));
      }
      if (!isnan(want)) max_err = fmax(max_err, fabs(got[k] - want) / (fabs(want) + 1e-3));
      dist += (got[k] - H) * (got[k] - H);
      hg += (H - g[k]) * (H - g[k]);
      spread += ((double)a[k] - b[k]) * ((double)a[k] - b[k]);
    }
  }
  dist = sqrt(dist), hg = sqrt(hg), spread = sqrt(spread);
  double limit = clip ? w[bad] / tall * (bound + hg) : spread / 2;
  fprintf(stderr,
          "%s round %d: update norms %.4g, %.4g (honest), %.4g (poisoned); |result - honest-only| = %.4g, "
          "stated limit %.4g (|honest-only - round's adapter| %.4g); max rel err vs recomputed %.2e\n",
          rule, round, norm[h[0]], norm[h[1]], norm[bad], dist, limit, hg, max_err);
  assert_true(max_err < 1e-5);
  assert_true(dist <= limit * (1 + 1e-6) + 1e-5);
  for (int i = 0; i < 3; i++) tensors_free(&ups[i]);
  tensors_free(&in);
  tensors_free(&res);
  return dist;
}

static void test_poisoned_device(void **state) {
  (void)state;
  daemon_t d;
  daemon_init(&d, "poison");
  /* three sessions at once, each with two honest devices and one poisoned: the issue's
   * case under the default settings (refused at upload by the default bound; the device
   * then sends a benign update, which the round needs to close: so the refusal always comes
   * first), fedavg-clip, and the median with no norm bound (the rule alone) */
  const char *names[] = {"pavg", "pclip", "pmed"}, *rules[] = {"fedavg", "fedavg-clip", "median"};
  const double bound = 0.5;
  const char *common = "--rounds 2 --min-devices 3 --max-devices 3 --deadline 120 --secagg off";
  char extra[256];
  for (int j = 0; j < 3; j++) {
    snprintf(extra, sizeof extra, "%s%s%s", common,
             j == 1 ? " --aggregation fedavg-clip --max-update-norm 0.5" : "",
             j == 2 ? " --aggregation median --max-update-norm 0" : "");
    session_create(&d, names[j], extra);
  }
  /* secure aggregation: the sum of 3 updates is past 3 x a tiny bound: refused, and with no
   * retries the session fails (the masked path's check) */
  session_create(
      &d, "psec",
      "--rounds 1 --min-devices 3 --max-devices 3 --deadline 120 --secagg on --max-update-norm 1e-4 "
      "--max-retries 0");
  const char *devs[] = {"pa1", "pa2", "pc1", "pc2", "pm1", "pm2", "ps1", "ps2", "ps3"};
  const char *data[] = {"romance.txt", "mystery.txt", "humor.txt"};
  pid_t pids[9];
  for (int i = 0; i < 9; i++) {
    device_join(&d, devs[i]);
    pids[i] = device_run(devs[i], data[i < 6 ? i % 2 : i - 6], i < 6 ? names[i / 2] : "psec", NULL);
  }
  /* the poisoned device: a protocol client that submits every value 1e38 each round */
  ot_identity ids[3];
  mal_t m[3];
  unsigned sent[3] = {0, 0, 0};
  int done[3] = {0, 0, 0};
  uint8_t *bad = NULL, *benign = NULL;
  size_t size = 0, benign_size = 0;
  for (int j = 0; j < 3; j++) {
    mal_open(&d, &ids[j], NULL, &m[j]);
    m[j].session = names[j];
  }
  double t0 = now_s();
  while (!done[0] || !done[1] || !done[2]) {
    assert_true(now_s() - t0 < 180);
    for (int j = 0; j < 3; j++) {
      if (done[j]) continue;
      mal_poll(&m[j]);
      Offtune__Session__RoundInfo *ri = m[j].ri;
      if (ri->state == OFFTUNE__SESSION__ROUND_STATE__DONE ||
          ri->state == OFFTUNE__SESSION__ROUND_STATE__FAILED)
        done[j] = 1;
      if (ri->state == OFFTUNE__SESSION__ROUND_STATE__TRAIN && ri->round > sent[j]) {
        if (!bad) { /* the adapter's names and shapes, the same every round and session */
          char adapter[1200];
          snprintf(adapter, sizeof adapter, "%s/poison_adapter.safetensors", dir);
          for (size_t i = 0; i < ri->n_adapter_files; i++)
            if (strcmp(ri->adapter_files[i]->file, "adapter_model.safetensors") == 0) {
              ot_fetch_opts fo = {0};
              assert_int_equal(ot_client_fetch_file(m[j].c, ri->adapter_files[i]->name, adapter, &fo), OT_OK);
            }
          bad = mal_variant(adapter, 3, &size);
          char *b = NULL;
          assert_int_equal(ot_file_read_all(adapter, 1 << 26, &b, &benign_size), OT_OK);
          benign = (uint8_t *)b; /* round 1's adapter as it came: an honest-sized update */
        }
        char why[1024];
        int ok = mal_submit(&m[j], ri->round, bad, size, 4 * 4 * 32, why, sizeof why);
        if (j == 0 && (ok || !strstr(why, "over the session's bound 1e+06")))
          fail_msg("the poisoned update was not refused at upload by the default bound: %s",
                   ok ? "accepted" : why);
        if (j > 0 && !ok) fail_msg("the poisoned update was refused at upload: %s", why);
        if (j == 0 && !mal_submit(&m[j], ri->round, benign, benign_size, 4 * 4 * 32, why, sizeof why))
          fail_msg("the benign update after the refusal was refused: %s", why);
        sent[j] = ri->round;
      }
      offtune__session__round_info__free_unpacked(ri, &m[j].pa.a);
    }
    sleep_ms(100);
  }
  for (int i = 0; i < 9; i++) {
    int rc = wait_exit(pids[i], 120);
    if (rc != (i < 6 ? 0 : 1)) fail_device(&d, devs[i], rc);
  }
  char db[1200];
  snprintf(db, sizeof db, "%s/registry.db", d.state);
  for (int j = 0; j < 3; j++) {
    cJSON *s = wait_session(&d, names[j], "done", 30);
    for (int r = 1; r <= 2; r++) {
      if (j == 0)
        check_refused_at_upload(&d, s, r);
      else
        check_poisoned(&d, s, r, rules[j], bound);
    }
    cJSON_Delete(s);
  }
  /* recorded: each refusal and each clipping in the audit log, the norms in the daemon's log */
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM audit WHERE event = 'update.refused' AND detail LIKE "
                                  "'pavg round %' AND detail LIKE '%bound 1e+06%'"),
                   2);
  assert_true(count_rows(db, "SELECT COUNT(*) FROM audit WHERE event = 'update.clipped' AND detail LIKE "
                             "'pclip round %'") >= 2);
  assert_true(file_has(d.log, "update norms"));
  /* the masked path: refused on the sum, the session failed with the reason */
  cJSON *s = wait_session(&d, "psec", "failed", 30);
  const char *err = cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(s, "session"), "error"));
  fprintf(stderr, "psec: %s\n", err);
  assert_non_null(strstr(err, "aggregate refused"));
  assert_non_null(strstr(err, "x the bound 0.0001"));
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM audit WHERE event = 'secagg.refused_sum'"), 1);
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM adapters WHERE name = 'psec'"), 0);
  cJSON_Delete(s);
  /* robust rules need each update: refused with secure aggregation */
  assert_int_equal(ot_test_run(out, sizeof out,
                               "%s session create --state '%s' --name px --model full --aggregation median "
                               "--min-devices 3",
                               cloud, d.state),
                   1);
  assert_non_null(strstr(out, "secure aggregation hides"));
  for (int j = 0; j < 3; j++) {
    ot_client_close(m[j].c);
    ot_identity_wipe(&ids[j]);
  }
  free(bad);
  free(benign);
  daemon_stop(&d);
}

/* ---- privacy: nothing a device sends carries its private text ---------------------------- */

/* Trace records (protocol/ot_transport.c, OT_WIRE_TRACE): "kind N\n" + N bytes + "\n". */
static int trace_find(const char *trace, size_t len, const char *kind, const char *needle, size_t *n_records,
                      size_t *bytes) {
  size_t off = 0, nl = strlen(needle);
  int found = 0;
  *n_records = 0;
  *bytes = 0;
  while (off < len) {
    char k[16];
    size_t n;
    int used = 0;
    if (sscanf(trace + off, "%15s %zu%n", k, &n, &used) != 2) fail_msg("trace damaged at %zu", off);
    off += (size_t)used + 1;
    assert_true(off + n + 1 <= len);
    if (!kind || strcmp(k, kind) == 0) {
      (*n_records)++;
      *bytes += n;
      if (memmem(trace + off, n, needle, nl)) found = 1;
    }
    off += n + 1;
  }
  return found;
}

static void test_no_private_text(void **state) {
  (void)state;
  daemon_t d;
  daemon_init(&d, "privacy");
  session_create(&d, "p",
                 "--rounds 2 --min-devices 1 --max-devices 1 --deadline 60 --aggregation fedprox --mu 0.5 "
                 "--middle-noise 1.5 --average-last 2");
  device_join(&d, "p1");
  /* --dry-run: the round is trained, nothing is uploaded; the real run then sends it */
  char dry[1200], db[1200];
  snprintf(dry, sizeof dry, "%s/p1-dry.trace", dir);
  unlink(dry);
  RUN_OK("OT_WIRE_TRACE='%s' %s run --data %s/romance.txt --state '%s/p1' --session p --threads 1 --dry-run",
         dry, device, dir, dir);
  assert_non_null(strstr(out, "dry run: round 1 of p trained"));
  snprintf(db, sizeof db, "%s/registry.db", d.state);
  assert_int_equal(count_rows(db, "SELECT COUNT(*) FROM updates"), 0);
  assert_false(file_has(dry, "update.p.1"));
  char trace[1200], env[1300];
  snprintf(trace, sizeof trace, "%s/p1.trace", dir);
  unlink(trace);
  snprintf(env, sizeof env, "OT_WIRE_TRACE='%s'", trace);
  pid_t p = device_run("p1", "romance.txt", "p", env);
  assert_int_equal(wait_exit(p, 60), 0);
  cJSON *s = wait_session(&d, "p", "done", 30);
  cJSON_Delete(s);
  char log[1200];
  snprintf(log, sizeof log, "%s/p1.log", dir);
  assert_true(file_has(log, "FedProx: + (0.5/2)")); /* the session's mu reached the trainer */
  assert_true(file_has(log, "perturbed afresh each step by 1.5 x")); /* and its middle noise */
  assert_true(file_has(log, "the mean of the weights after steps")); /* and its tail averaging */
  assert_true(file_has(log, "round 1 was trained earlier"));
  char *text = NULL, *tr = NULL;
  size_t tl, trl, nrec, bytes;
  char path[1200];
  snprintf(path, sizeof path, "%s/romance.txt", dir);
  assert_int_equal(ot_file_read_all(path, 1 << 20, &text, &tl), OT_OK);
  assert_int_equal(ot_file_read_all(trace, 64u << 20, &tr, &trl), OT_OK);
  /* the trace holds what was sent: both uploads in plaintext, and their transfer names */
  assert_true(trace_find(tr, trl, "plain", "update.p.2", &nrec, &bytes));
  fprintf(stderr, "trace: %zu plaintext bodies (%zu bytes) before sealing, ", nrec, bytes);
  assert_true(bytes > 2 * 20000);
  trace_find(tr, trl, "wire", "", &nrec, &bytes);
  fprintf(stderr, "%zu frames (%zu bytes) on the wire\n", nrec, bytes);
  /* every 24-byte piece of the private text at a 200-byte stride: in no byte sent */
  int pieces = 0;
  for (size_t off = 0; off + 24 <= tl; off += 200) {
    char needle[25];
    memcpy(needle, text + off, 24);
    needle[24] = '\0';
    if (strlen(needle) < 24) continue;
    if (trace_find(tr, trl, NULL, needle, &nrec, &bytes)) fail_msg("private text sent: '%s'", needle);
    pieces++;
  }
  fprintf(stderr, "%d pieces of the private text searched in everything the device sent: none found\n",
          pieces);
  assert_true(pieces >= 90);
  /* the same search finds a leak: a client that puts a piece of the text in a request */
  char leak_trace[1200], needle[25];
  snprintf(leak_trace, sizeof leak_trace, "%s/leak.trace", dir);
  unlink(leak_trace);
  memcpy(needle, text + 1000, 24);
  needle[24] = '\0';
  ot_identity id;
  mal_t m;
  mal_open(&d, &id, leak_trace, &m);
  Offtune__Session__Poll poll = OFFTUNE__SESSION__POLL__INIT;
  poll.device_name = needle; /* the leak */
  Offtune__Session__SessionRequest req = OFFTUNE__SESSION__SESSION_REQUEST__INIT;
  req.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_POLL;
  req.poll = &poll;
  uint8_t *reply = NULL;
  size_t len = 0;
  assert_int_equal(mal_call(&m, &req, &reply, &len), OT_OK);
  free(reply);
  ot_client_close(m.c);
  unsetenv("OT_WIRE_TRACE");
  free(tr);
  assert_int_equal(ot_file_read_all(leak_trace, 64u << 20, &tr, &trl), OT_OK);
  assert_true(trace_find(tr, trl, NULL, needle, &nrec, &bytes));
  /* found in the plaintext the client sealed, not in the encrypted frames */
  assert_true(trace_find(tr, trl, "plain", needle, &nrec, &bytes));
  assert_false(trace_find(tr, trl, "wire", needle, &nrec, &bytes));
  fprintf(stderr, "the deliberately leaky client: '%s' found in its trace (plaintext), not in its frames\n",
          needle);
  ot_identity_wipe(&id);
  free(tr);
  free(text);
  daemon_stop(&d);
}

/* FedProx in the device trainer: the proximal term keeps the adapter near the start. */
static double adapter_distance(const char *a, const char *b) {
  tensors x, y;
  tensors_load(a, &x);
  tensors_load(b, &y);
  double sq = 0;
  for (size_t t = 0; t < x.n; t++) {
    const ot_st_tensor *xt = ot_st_at(x.st, t);
    const float *yv = tensor(&y, xt->name);
    for (uint64_t k = 0; k < xt->numel; k++) sq += (x.v[t][k] - yv[k]) * (double)(x.v[t][k] - yv[k]);
  }
  tensors_free(&x);
  tensors_free(&y);
  return sqrt(sq);
}

static void test_fedprox_trainer(void **state) {
  (void)state;
  RUN_OK("OMP_NUM_THREADS=1 %s distill --model %s/full --data %s/public.txt --out %s/prox_emu --bottom 1 "
         "--top 1 "
         "--keep 1 --steps 4 --batch 4 --seq-len 32 --threads 1",
         cloud, dir, dir, dir);
  const char *common = "--batch 4 --seq-len 32 --lr 1e-2 --threads 1";
  RUN_OK("%s tune --emulator %s/prox_emu --text %s/romance.txt --out %s/prox_start --steps 4 %s", device, dir,
         dir, dir, common);
  double dist[2];
  const float mus[2] = {0.0f, 200.0f};
  for (int i = 0; i < 2; i++) {
    RUN_OK(
        "%s tune --emulator %s/prox_emu --text %s/mystery.txt --init-adapter %s/prox_start --out %s/prox_%d "
        "--steps 12 --prox-mu %g %s",
        device, dir, dir, dir, dir, i, mus[i], common);
    char a[1200], b[1200];
    snprintf(a, sizeof a, "%s/prox_start/adapter_model.safetensors", dir);
    snprintf(b, sizeof b, "%s/prox_%d/adapter_model.safetensors", dir, i);
    dist[i] = adapter_distance(a, b);
  }
  fprintf(stderr, "||w - w_start|| after 12 steps: %.4f without the proximal term, %.4f with mu = 200\n",
          dist[0], dist[1]);
  assert_true(dist[0] > 0);
  assert_true(dist[1] < 0.5 * dist[0]);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_two_sessions),      cmocka_unit_test(test_serving_published),
      cmocka_unit_test(test_device_killed),     cmocka_unit_test(test_daemon_kill9),
      cmocka_unit_test(test_malicious_device),  cmocka_unit_test(test_poisoned_device),
      cmocka_unit_test(test_no_private_text),   cmocka_unit_test(test_fedprox_trainer),
      cmocka_unit_test(test_scheduler_backoff),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
