/* Several `offtune-cloud serve` daemons on one PostgreSQL registry and one shared object
 * store (docs/deploy.md), on a real PostgreSQL server the test starts (tests/pg_cluster.sh;
 * every case is skipped, saying why, only without libpq or the server programs).
 *
 * test_daemons (no argument): three daemons A, B, C share the registry, the objects directory
 * and the cloud identity (B's and C's state directories on tmpfs: their objects cross file
 * systems, copied in). A leads the session (it is alone when the session starts); the devices
 * enrol and upload through B and C, with tokens issued on other daemons than the one they
 * join through. In round 2 (the last), with one of its two updates stored, A is killed with
 * SIGKILL: B or C takes the lease once it expires (2 s) and the session completes there.
 * Checked: every update stored once, every round's adapter equal to the token-weighted average
 * of the updates stored for it (FedAvg recomputed here from the shared objects), the lease with
 * a survivor.
 *
 * test_daemons balancer: the devices reach the daemons only through HAProxy in TCP mode,
 * round-robin (skipped, saying why, without haproxy). Three daemons, three devices, one per
 * daemon: the leader killed with SIGKILL mid-round, its device reconnects through the balancer
 * and the session completes, FedAvg checked as above. Then secure aggregation on two daemons:
 * the follower sends its device away until it reaches the leader through the balancer (the
 * masking round lives in the leader's memory); the leader killed with SIGKILL mid-masking, the
 * other daemon takes the session and its masking round starts again from the join stage; the
 * published aggregate equals FedAvg of the devices' own trained adapters. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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
static int balancer;      /* the cases through HAProxy (argument "balancer") */
static char haproxy[512]; /* its program; "" when not installed */

/* The registry database db of the test's server. */
static void registry_of(const char *db, char *out, size_t n) {
  snprintf(out, n, "%s dbname=%s", conninfo, db);
}

static int setup(void **state) {
  (void)state;
  const char *dbs[] = {"offtune", "lb", "sa"};
  if (pg_fixture_start(dbs, 3, conninfo, sizeof conninfo, skip_why, sizeof skip_why) == 77) {
    printf("[ SKIPPED  ] PostgreSQL: %s\n", skip_why);
    return 0;
  }
  registry_of("offtune", registry, sizeof registry);
  if (balancer) { /* OT_HAPROXY: a chosen program (or, for the skip's own check, none) */
    const char *env = getenv("OT_HAPROXY");
    if (env)
      snprintf(haproxy, sizeof haproxy, "%s", access(env, X_OK) == 0 ? env : "");
    else if (ot_test_run(haproxy, sizeof haproxy,
                         "PATH=\"$PATH:/usr/sbin:/usr/local/sbin\" command -v haproxy") != 0)
      haproxy[0] = '\0';
    haproxy[strcspn(haproxy, "\n")] = '\0';
  } else {
    snprintf(other_fs, sizeof other_fs, "/dev/shm/ot-daemons-XXXXXX");
    if (access("/dev/shm", W_OK) != 0 || !mkdtemp(other_fs)) other_fs[0] = '\0';
  }
  const char *genres[] = {"romance", "mystery", "humor"};
  return session_fixture_setup(balancer ? "daemons_lb" : "daemons", genres, 3);
}

static int teardown(void **state) {
  (void)state;
  if (!skip_why[0]) session_fixture_teardown();
  if (other_fs[0]) ot_test_system("rm -rf '%s'", other_fs);
  pg_fixture_stop();
  return 0;
}

/* Daemon `name` on registry database db and its objects directory (dir/objects-<db>); with
 * key, its identity is a copy of that file (every daemon answers as the one cloud the devices
 * pinned). */
static void start_shared(daemon_t *d, const char *name, const char *key, const char *db, const char *more,
                         int elsewhere) {
  char reg[700];
  registry_of(db, reg, sizeof reg);
  daemon_prepare(d, elsewhere && other_fs[0] ? other_fs : dir, name, "");
  snprintf(d->objects, sizeof d->objects, "%s/objects-%s", dir, db);
  snprintf(d->extra, sizeof d->extra, "--registry '%s' --objects '%s' --node %s --lease-seconds 2 %s", reg,
           d->objects, name, more);
  assert_int_equal(ot_test_system("mkdir -p '%s'", d->state), 0);
  if (key)
    assert_int_equal(
        ot_test_system("cp '%s' '%s/cloud.key' && chmod 600 '%s/cloud.key'", key, d->state, d->state), 0);
  daemon_start(d, "tcp://127.0.0.1:0");
}

/* Waits until daemon d (node name) holds the lease of every unfinished session: it was alone
 * when the session started, so it leads (and distils the emulator). */
static void wait_leader(const char *reg, const daemon_t *d, const char *name) {
  char owner[256];
  double t0 = now_s();
  for (;;) {
    pg_fixture_query(reg, owner, sizeof owner, "SELECT COALESCE(MAX(owner), '') FROM leases");
    if (strcmp(owner, name) == 0) return;
    if (now_s() - t0 > 60) {
      print_log(d->log);
      fail_msg("%s never led the session", name);
    }
    sleep_ms(100);
  }
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
static void check_fedavg(daemon_t *d, cJSON *show, int round, int n_expect) {
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
  assert_int_equal(n, n_expect);
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
  start_shared(&A, "A", NULL, "offtune", "", 0);
  char key[1200], owner[256];
  snprintf(key, sizeof key, "%s/cloud.key", A.state);
  session_create(&A, "r", "--rounds 2 --min-devices 2 --max-devices 2 --deadline 120 --secagg off");
  wait_leader(registry, &A, "A");
  start_shared(&B, "B", key, "offtune", "--http 127.0.0.1:0", 1);
  start_shared(&C, "C", key, "offtune", "--http 127.0.0.1:0", 1);
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
  double t0 = now_s();
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
  for (int r = 1; r <= 2; r++) check_fedavg(&B, s, r, 2);
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

/* ---- through a TCP load balancer ---------------------------------------------------------- */

static int port_of(const char *url) {
  const char *c = strrchr(url, ':');
  assert_non_null(c);
  return atoi(c + 1);
}

/* A port of 127.0.0.1 free now (bound, then released for HAProxy to bind). */
static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(fd >= 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof a;
  assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
  assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
  close(fd);
  return ntohs(a.sin_port);
}

static int accepts(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {
      .sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  int ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
  if (fd >= 0) close(fd);
  return ok;
}

/* HAProxy in TCP mode in front of the daemons' device ports, round-robin: each new connection
 * goes to the next daemon; a connection that a dead daemon refuses is redispatched to another
 * (retries, option redispatch), and a daemon is out of the rotation once a connect check fails
 * (every 200 ms). lb gets the devices' URL and the cloud's fingerprint (one identity). */
static pid_t balancer_start(const char *name, daemon_t *const *ds, int n, daemon_t *lb) {
  char cfg[1200], log[1200];
  snprintf(cfg, sizeof cfg, "%s/%s.cfg", dir, name);
  snprintf(log, sizeof log, "%s/%s.log", dir, name);
  int port = free_port();
  FILE *f = fopen(cfg, "w");
  assert_non_null(f);
  fprintf(f,
          "global\n  maxconn 256\n"
          "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10m\n  timeout server 10m\n"
          "  retries 3\n  option redispatch 1\n"
          "frontend devices\n  bind 127.0.0.1:%d\n  default_backend daemons\n"
          "backend daemons\n  balance roundrobin\n  default-server inter 200ms fall 1 rise 1\n",
          port);
  for (int i = 0; i < n; i++) fprintf(f, "  server d%d 127.0.0.1:%d check\n", i, port_of(ds[i]->url));
  assert_int_equal(fclose(f), 0);
  pid_t pid = spawn(log, "'%s' -db -f '%s'", haproxy, cfg);
  double t0 = now_s();
  while (!accepts(port)) {
    if (now_s() - t0 > 20) {
      print_log(log);
      fail_msg("haproxy did not start");
    }
    sleep_ms(50);
  }
  memset(lb, 0, sizeof *lb);
  snprintf(lb->url, sizeof lb->url, "tcp://127.0.0.1:%d", port);
  memcpy(lb->fp, ds[0]->fp, sizeof lb->fp);
  return pid;
}

/* How many of the devices' logs have text. */
static int devices_logging(const char *const *devs, int n, const char *text) {
  int k = 0;
  for (int i = 0; i < n; i++) {
    char log[1200];
    snprintf(log, sizeof log, "%s/%s.log", dir, devs[i]);
    if (file_has(log, text)) {
      fprintf(stderr, "device %s: '%s'\n", devs[i], text);
      k++;
    }
  }
  return k;
}

/* How many devices whose updates `from` accepted (*n) opened a session with b or c later. */
static int moved_devices(const daemon_t *from, const daemon_t *b, const daemon_t *c, int *n_from) {
  char *text = NULL;
  size_t len;
  assert_int_equal(ot_file_read_all(from->log, 64u << 20, &text, &len), OT_OK);
  const char *mark = "accepted the update of ";
  char seen[8][OT_FINGERPRINT_LEN];
  int n = 0, moved = 0;
  for (const char *p = text; (p = strstr(p, mark)); p++) {
    char fp[OT_FINGERPRINT_LEN] = "", needle[OT_FINGERPRINT_LEN + 32];
    sscanf(p + strlen(mark), "%43s", fp);
    int dup = 0;
    for (int i = 0; i < n; i++) dup |= strcmp(seen[i], fp) == 0;
    if (dup || n == 8) continue;
    snprintf(seen[n++], sizeof seen[0], "%s", fp);
    snprintf(needle, sizeof needle, "open for device %s", fp);
    if (file_has(b->log, needle) || file_has(c->log, needle)) {
      fprintf(stderr, "device %s: updates through %s, then a session through the balancer with a survivor\n",
              fp, from->state);
      moved++;
    }
  }
  free(text);
  *n_from = n;
  return moved;
}

static void skip_without_balancer(void) {
  if (skip_why[0]) skip();
  if (!haproxy[0]) {
    printf("[ SKIPPED  ] haproxy: not installed (apt-get install haproxy)\n");
    skip();
  }
}

static void test_balancer_leader_killed(void **state) {
  (void)state;
  skip_without_balancer();
  char reg[700], key[1200], owner[256];
  registry_of("lb", reg, sizeof reg);
  daemon_t A, B, C, L;
  start_shared(&A, "lbA", NULL, "lb", "", 0);
  snprintf(key, sizeof key, "%s/cloud.key", A.state);
  session_create(&A, "lb", "--rounds 2 --min-devices 3 --max-devices 3 --deadline 120 --secagg off");
  wait_leader(reg, &A, "lbA");
  start_shared(&B, "lbB", key, "lb", "", 0);
  start_shared(&C, "lbC", key, "lb", "", 0);
  daemon_t *all[] = {&A, &B, &C};
  pid_t hp = balancer_start("haproxy-lb", all, 3, &L);
  const char *devs[] = {"b1", "b2", "b3"};
  join_via(&B, &L, devs[0]); /* tokens from any daemon, enrolment through the balancer */
  join_via(&C, &L, devs[1]);
  join_via(&A, &L, devs[2]);
  /* three connections, round-robin over three daemons: one device on each, one on A */
  pid_t p[3] = {device_run(devs[0], "romance.txt", "lb", NULL),
                device_run(devs[1], "mystery.txt", "lb", NULL),
                /* b3 is slow: round 2 holds the others' updates for 3 s, and A dies then */
                device_run(devs[2], "humor.txt", "lb", "OT_TEST_DEVICE_DELAY_MS=3000")};
  double t0 = now_s();
  while (pg_fixture_int(reg, "SELECT COUNT(*) FROM updates WHERE round = 2") < 1) {
    if (now_s() - t0 > 120) {
      print_log(A.log);
      fail_msg("round 2 got no update");
    }
    sleep_ms(100);
  }
  assert_int_equal(pg_fixture_int(reg, "SELECT COUNT(*) FROM rounds WHERE round = 2 AND state = 'open'"), 1);
  pg_fixture_query(reg, owner, sizeof owner, "SELECT owner FROM leases");
  assert_string_equal(owner, "lbA");
  kill(A.pid, SIGKILL);
  waitpid(A.pid, NULL, 0);
  fprintf(stderr, "leader lbA killed with kill -9 behind the balancer in round 2 (%d of 3 updates)\n",
          pg_fixture_int(reg, "SELECT COUNT(*) FROM updates WHERE round = 2"));
  for (int i = 0; i < 3; i++) {
    int st = wait_exit(p[i], 180);
    if (st != 0) fail_device(&B, devs[i], st);
  }
  cJSON *s = wait_session(&B, "lb", "done", 60);
  /* A's device lost its connection: its client made a new session through the balancer with B
   * or C (the transport's own retry: the device's loop saw no error) */
  int on_a = 0, moved = moved_devices(&A, &B, &C, &on_a);
  assert_int_equal(moved, on_a);
  assert_true(on_a >= 1);
  assert_int_equal(
      file_has(B.log, "leading session 1 (node lbB)") + file_has(C.log, "leading session 1 (node lbC)"), 1);
  assert_int_equal(pg_fixture_int(reg, "SELECT COUNT(*) FROM updates"), 6);
  assert_int_equal(pg_fixture_int(reg, "SELECT COUNT(*) FROM (SELECT round, device_id FROM updates GROUP BY "
                                       "round, device_id HAVING COUNT(*) > 1) x"),
                   0);
  assert_int_equal(pg_fixture_int(reg, "SELECT COUNT(*) FROM rounds WHERE state = 'done'"), 2);
  for (int r = 1; r <= 2; r++) check_fedavg(&B, s, r, 3);
  cJSON_Delete(s);
  daemon_stop(&B);
  daemon_stop(&C);
  kill(hp, SIGTERM);
  wait_exit(hp, 10);
}

static void test_balancer_secagg(void **state) {
  (void)state;
  skip_without_balancer();
  char reg[700], key[1200];
  registry_of("sa", reg, sizeof reg);
  daemon_t A, B, L;
  start_shared(&A, "saA", NULL, "sa", "", 0);
  snprintf(key, sizeof key, "%s/cloud.key", A.state);
  session_create(&A, "sa", "--rounds 1 --min-devices 3 --max-devices 3 --deadline 60 --secagg on");
  wait_leader(reg, &A, "saA");
  start_shared(&B, "saB", key, "sa", "", 0);
  daemon_t *all[] = {&A, &B};
  pid_t hp = balancer_start("haproxy-sa", all, 2, &L);
  const char *devs[] = {"romance", "mystery", "humor"};
  for (int i = 0; i < 3; i++) join_via(i % 2 ? &B : &A, &L, devs[i]);
  pid_t p[3];
  for (int i = 0; i < 3; i++) p[i] = device_run(devs[i], NULL, "sa", NULL);
  /* three connections over two daemons: at least one device starts on the follower B, which
   * sends it away until the balancer gives it A; A's masking round needs all three */
  wait_for_file_text(A.log, "session 'sa': round 1: secure aggregation of 3 devices", 120);
  kill(A.pid, SIGKILL);
  waitpid(A.pid, NULL, 0);
  assert_int_equal(pg_fixture_int(reg, "SELECT COUNT(*) FROM rounds WHERE state = 'done'"), 0);
  fprintf(stderr, "leader saA killed with kill -9 in round 1's masking\n");
  for (int i = 0; i < 3; i++) {
    int st = wait_exit(p[i], 180);
    if (st != 0) fail_device(&B, devs[i], st);
  }
  cJSON *s = wait_session(&B, "sa", "done", 60);
  assert_true(devices_logging(devs, 3, "secure aggregation runs on the daemon that leads the session") >= 1);
  /* B took the session and ran the masking round again from the join stage, all three in it */
  assert_true(file_has(B.log, "leading session 1 (node saB)"));
  assert_true(file_has(B.log, "session 'sa': round 1: secure aggregation of 3 devices"));
  check_secagg_round(&B, s, "sa", 1, devs, 3, 0);
  /* no individual update was stored */
  assert_int_equal(pg_fixture_int(reg, "SELECT COUNT(*) FROM updates"), 0);
  cJSON_Delete(s);
  daemon_stop(&B);
  kill(hp, SIGTERM);
  wait_exit(hp, 10);
}

int main(int argc, char **argv) {
  balancer = argc > 1 && strcmp(argv[1], "balancer") == 0;
  if (argc > 2 || (argc == 2 && !balancer)) {
    fprintf(stderr, "usage: test_daemons [balancer]\n");
    return 2;
  }
  const struct CMUnitTest one[] = {cmocka_unit_test(test_leader_killed)};
  const struct CMUnitTest lb[] = {cmocka_unit_test(test_balancer_leader_killed),
                                  cmocka_unit_test(test_balancer_secagg)};
  if (balancer) return cmocka_run_group_tests_name("daemons behind a TCP load balancer", lb, setup, teardown);
  return cmocka_run_group_tests_name("daemons on one PostgreSQL registry", one, setup, teardown);
}
