/* Issue 19: the training commands' metrics records, the daemon's per-round records, the
 * session report and the live dashboard, checked against the registry and against
 * independent computations; then a real browser (Debian's headless Chromium) opens the
 * report and the dashboard: no console message, the charts' points in the DOM equal the
 * registry's numbers, screenshots at 1280x800 and at a phone's 390x844 kept in the test's
 * directory (build/tests/tmp/test_report/browser/).
 *
 * One small session (tests/session_fixture.c: tiny model, 2 devices, 2 rounds) serves every
 * check after the first. Without chromium the browser test fails, saying how to install it. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ot_digest.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "session_fixture.h"

static const char *const genres[] = {"romance", "mystery"};
/* What the session test leaves for the browser test. */
static daemon_t dmn;
static char report_path[1200], http_url[300];
static int session_ran;

/* A device name and a distillation file name an attacker could choose: they reach the
 * report through the registry (device names, settings) and must arrive as text. */
#define EVIL_NAME "<img src=x onerror=alert(1)>"
#define EVIL_NAME_ESC "&lt;img src=x onerror=alert(1)&gt;"
#define EVIL_FILE "pub<svg onload=alert(2)>&amp.txt"
#define EVIL_FILE_ESC "pub&lt;svg onload=alert(2)&gt;&amp;amp.txt"

/* ---- helpers ---------------------------------------------------------------------------- */

/* The records of kind (NULL: all) in a JSONL text, as a JSON array. */
static cJSON *jsonl(const char *text, const char *kind) {
  cJSON *arr = cJSON_CreateArray();
  char *copy = strdup(text), *save = NULL;
  for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    if (line[0] != '{') continue; /* stderr lines mixed in by a caller */
    cJSON *j = cJSON_Parse(line);
    if (!j) fail_msg("not JSON: %s", line);
    if (!kind || strcmp(cJSON_GetStringValue(cJSON_GetObjectItem(j, "kind")), kind) == 0)
      cJSON_AddItemToArray(arr, j);
    else
      cJSON_Delete(j);
  }
  free(copy);
  return arr;
}

static cJSON *jsonl_file(const char *path, const char *kind) {
  char *text = NULL;
  size_t len;
  if (ot_file_read_all(path, 64u << 20, &text, &len) != OT_OK) fail_msg("cannot read %s", path);
  cJSON *a = jsonl(text, kind);
  free(text);
  return a;
}

static double num(const cJSON *o, const char *k) {
  const cJSON *v = cJSON_GetObjectItem(o, k);
  if (!cJSON_IsNumber(v)) fail_msg("no number '%s'", k);
  return v->valuedouble;
}

static void close_to(double got, double want, double rel, const char *what) {
  if (!(fabs(got - want) <= rel * fmax(1e-12, fabs(want))))
    fail_msg("%s: %.9g, expected %.9g (relative tolerance %g)", what, got, want, rel);
}

static char *slurp(const char *path) {
  char *text = NULL;
  size_t len;
  if (ot_file_read_all(path, 64u << 20, &text, &len) != OT_OK) fail_msg("cannot read %s", path);
  return text;
}

/* The chart points (data-x, data-y) of one series of one chart in an HTML or DOM text,
 * in document order; series as it appears in the page (escaped). */
static int points(const char *html, const char *chart, const char *series, double *x, double *y, int cap) {
  char key[600];
  snprintf(key, sizeof key, "data-chart=\"%s\" data-series=\"%s\" data-x=\"", chart, series);
  int n = 0;
  for (const char *p = strstr(html, key); p; p = strstr(p + 1, key)) {
    if (n == cap) fail_msg("more than %d points in %s/%s", cap, chart, series);
    char *end;
    x[n] = strtod(p + strlen(key), &end);
    const char *py = strstr(end, "data-y=\"");
    assert_non_null(py);
    y[n] = strtod(py + 8, NULL);
    n++;
  }
  return n;
}

/* One value of a registry query (read only), as a double; NAN for NULL. */
static double db_num(const char *db, const char *sql) {
  sqlite3 *h;
  assert_int_equal(sqlite3_open_v2(db, &h, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
  sqlite3_busy_timeout(h, 5000);
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) != SQLITE_OK) fail_msg("%s: %s", sql, sqlite3_errmsg(h));
  double v = NAN;
  if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
    v = sqlite3_column_double(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(h);
  return v;
}

static void db_text(const char *db, const char *sql, char *out, size_t n) {
  sqlite3 *h;
  assert_int_equal(sqlite3_open_v2(db, &h, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
  sqlite3_busy_timeout(h, 5000);
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(h, sql, -1, &st, NULL) != SQLITE_OK) fail_msg("%s: %s", sql, sqlite3_errmsg(h));
  out[0] = '\0';
  if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
    snprintf(out, n, "%s", (const char *)sqlite3_column_text(st, 0));
  sqlite3_finalize(st);
  sqlite3_close(h);
}

/* ---- 1: the training commands' records ------------------------------------------------- */

/* L2 norm of the difference of two checkpoints' tensors (same names). */
static double weight_change(const char *a, const char *b) {
  tensors x, y;
  tensors_load(a, &x);
  tensors_load(b, &y);
  double s = 0;
  for (size_t i = 0; i < x.n; i++) {
    const ot_st_tensor *t = ot_st_at(x.st, i);
    const float *w1 = tensor(&y, t->name);
    for (size_t k = 0; k < t->numel; k++) s += ((double)w1[k] - x.v[i][k]) * ((double)w1[k] - x.v[i][k]);
  }
  tensors_free(&x);
  tensors_free(&y);
  return sqrt(s);
}

static void test_training_records(void **state) {
  (void)state;
  /* 33 token ids = one batch of 2 x 16 (+1 target): the byte tokenizer's ids are the bytes */
  RUN_OK("%s tokenize --model %s/full --text %s/romance.txt 2>/dev/null | tr ' ' '\\n' | head -n 33 | tr "
         "'\\n' ' ' "
         "> %s/t33.txt",
         cloud, dir, dir, dir);

  /* one SGD step: its loss is the untrained model's (eval of the same 32 targets), and the
   * weights move by lr x the gradient norm (no momentum, decay or clipping) */
  RUN_OK("%s finetune --model %s/full --tokens %s/t33.txt --out %s/ft1 --steps 1 --batch 2 --seq-len 16 --lr "
         "0.05 "
         "--optimizer sgd --threads 1 --json 2>/dev/null",
         cloud, dir, dir, dir);
  cJSON *echo = jsonl(out, NULL);
  char p[1200], p2[1200];
  snprintf(p, sizeof p, "%s/ft1/metrics.jsonl", dir);
  cJSON *recs = jsonl_file(p, NULL);
  assert_int_equal(cJSON_GetArraySize(recs), 2); /* step 1, summary */
  char *a = cJSON_PrintUnformatted(echo), *b = cJSON_PrintUnformatted(recs);
  assert_string_equal(a, b); /* --json prints exactly the file's records */
  free(a);
  free(b);
  cJSON *s1 = cJSON_GetArrayItem(recs, 0);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(s1, "kind")), "step");
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(s1, "label")), "finetune");
  RUN_OK("%s eval --model %s/full --tokens %s/t33.txt --seq-len 16 --json 2>/dev/null", cloud, dir, dir);
  double eval_loss, eval_tokens;
  ot_test_eval_json(out, "untrained model", &eval_loss, &eval_tokens);
  assert_int_equal((int)eval_tokens, 32);
  close_to(num(s1, "loss"), eval_loss, 1e-5, "step 1 loss vs eval of its batch");
  snprintf(p, sizeof p, "%s/full/model.safetensors", dir);
  snprintf(p2, sizeof p2, "%s/ft1/model.safetensors", dir);
  double moved = weight_change(p, p2);
  close_to(num(s1, "grad_norm"), moved / 0.05, 2e-3, "gradient norm vs the SGD step's weight change / lr");
  close_to(num(s1, "lr"), 0.05, 1e-6, "lr");
  assert_int_equal((int)num(s1, "tokens"), 32);
  assert_true(num(s1, "tokens_per_s") > 0 && num(s1, "elapsed_s") >= 0);
  cJSON_Delete(echo);
  cJSON_Delete(recs);

  /* AdamW, warm-up 2 then linear decay over 6 steps: the rate of each record is the
   * schedule's (ot_lr_at's formula, recomputed here), the summary sums the steps */
  RUN_OK("%s finetune --model %s/full --text %s/romance.txt --out %s/ft6 --steps 6 --batch 2 --seq-len 16 "
         "--lr 0.01 "
         "--warmup 2 --schedule linear --min-lr-ratio 0.1 --threads 1 --json 2>/dev/null",
         cloud, dir, dir, dir);
  cJSON *steps = jsonl(out, "step"), *sum = jsonl(out, "summary");
  assert_int_equal(cJSON_GetArraySize(steps), 6);
  assert_int_equal(cJSON_GetArraySize(sum), 1);
  double mean = 0, last = 0;
  for (int i = 0; i < 6; i++) {
    cJSON *r = cJSON_GetArrayItem(steps, i);
    assert_int_equal((int)num(r, "step"), i + 1);
    assert_int_equal((int)num(r, "steps"), 6);
    double want = i < 2 ? 0.01 * (i + 1) / 2.0 : 0.001 + (0.01 - 0.001) * (1.0 - (double)(i - 2) / 4.0);
    close_to(num(r, "lr"), want, 1e-6, "scheduled lr");
    assert_true(isfinite(num(r, "loss")) && num(r, "grad_norm") > 0);
    if (i) assert_true(num(r, "elapsed_s") >= num(cJSON_GetArrayItem(steps, i - 1), "elapsed_s"));
    mean += num(r, "loss") / 6;
    last = num(r, "loss");
  }
  cJSON *sm = cJSON_GetArrayItem(sum, 0);
  close_to(num(sm, "mean_loss"), mean, 1e-6, "summary mean loss");
  close_to(num(sm, "last_loss"), last, 1e-7, "summary last loss");
  assert_int_equal((int)num(sm, "steps_done"), 6);
  cJSON_Delete(steps);
  cJSON_Delete(sum);

  /* distill: a step and a distill (CE, KD) record per step; the summary is the last of them */
  RUN_OK("%s distill --model %s/full --data %s/public.txt --out %s/emu --bottom 1 --top 1 --keep 1 --steps 3 "
         "--batch 2 --seq-len 16 --threads 1 --json 2>/dev/null",
         cloud, dir, dir, dir);
  cJSON *dst = jsonl(out, "distill"), *dsum = jsonl(out, "summary"), *dsteps = jsonl(out, "step");
  assert_int_equal(cJSON_GetArraySize(dst), 3);
  assert_int_equal(cJSON_GetArraySize(dsteps), 3);
  close_to(num(cJSON_GetArrayItem(dsum, 0), "kd"), num(cJSON_GetArrayItem(dst, 2), "kd"), 1e-7, "distill KD");
  /* the step's loss is CE + 30 KD (ot_emulator.h's weight) */
  for (int i = 0; i < 3; i++)
    close_to(num(cJSON_GetArrayItem(dsteps, i), "loss"),
             num(cJSON_GetArrayItem(dst, i), "ce") + 30 * num(cJSON_GetArrayItem(dst, i), "kd"), 1e-5,
             "distill loss = CE + 30 KD");
  cJSON_Delete(dst);
  cJSON_Delete(dsum);
  cJSON_Delete(dsteps);

  /* device tune with held-out evaluations: the summary's held-out loss is the saved adapter's,
   * scored again by `offtune-device eval` on the held-out tenth of the tokens */
  RUN_OK("%s tune --emulator %s/emu --text %s/romance.txt --out %s/ad --steps 4 --batch 2 --seq-len 16 "
         "--eval-every 2 --threads 1 --json 2>/dev/null",
         device, dir, dir, dir);
  cJSON *tev = jsonl(out, "eval"), *tsum = jsonl(out, "summary"), *tst = jsonl(out, "step");
  assert_int_equal(cJSON_GetArraySize(tst), 4);
  assert_int_equal(cJSON_GetArraySize(tev), 2);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetArrayItem(tst, 0), "label")), "tune");
  double best =
      fmin(num(cJSON_GetArrayItem(tev, 0), "heldout_loss"), num(cJSON_GetArrayItem(tev, 1), "heldout_loss"));
  close_to(num(cJSON_GetArrayItem(tsum, 0), "heldout_loss"), best, 1e-7, "summary held-out loss = best");
  RUN_OK("%s tokenize --model %s/full --text %s/romance.txt 2>/dev/null > %s/romance.ids", cloud, dir, dir,
         dir);
  snprintf(p, sizeof p, "%s/romance.ids", dir);
  char *ids = slurp(p);
  long *v = malloc(strlen(ids) * sizeof *v);
  int n = 0;
  for (char *q = ids, *e; *q; q = e) {
    long t = strtol(q, &e, 10);
    if (e == q) break;
    v[n++] = t;
  }
  /* ot_dev_train holds out the last n/10 tokens */
  snprintf(p, sizeof p, "%s/heldout.ids", dir);
  FILE *f = fopen(p, "w");
  assert_non_null(f);
  for (int i = n - n / 10; i < n; i++) fprintf(f, "%ld ", v[i]);
  fclose(f);
  free(v);
  free(ids);
  RUN_OK("%s eval --emulator %s/emu --adapter %s/ad --tokens %s/heldout.ids --seq-len 16 --json 2>/dev/null",
         device, dir, dir, dir);
  double heldout, ht;
  ot_test_eval_json(out, "tuned adapter on the held-out split", &heldout, &ht);
  close_to(num(cJSON_GetArrayItem(tsum, 0), "heldout_loss"), heldout, 1e-4, "held-out loss vs device eval");
  cJSON_Delete(tev);
  cJSON_Delete(tsum);
  cJSON_Delete(tst);
}

/* ---- 2: a session's records, report and dashboard ---------------------------------------- */

static void daemon_start_http(daemon_t *d, const char *extra_env) {
  char cj[1200];
  snprintf(cj, sizeof cj, "%s/cloud.json", d->state);
  unlink(cj);
  d->pid = spawn(d->log,
                 "env %s %s serve --state '%s' --listen tcp://127.0.0.1:0 --http 127.0.0.1:0 --model %s/full",
                 extra_env, cloud, d->state, dir);
  double t0 = now_s();
  for (;;) {
    if (file_has(cj, "\"http\"")) break;
    if (now_s() - t0 > 30) {
      print_log(d->log);
      fail_msg("the daemon did not start");
    }
    sleep_ms(50);
  }
  char *text = slurp(cj);
  cJSON *j = cJSON_Parse(text);
  free(text);
  snprintf(d->url, sizeof d->url, "%s", cJSON_GetStringValue(cJSON_GetObjectItem(j, "url")));
  snprintf(d->fp, sizeof d->fp, "%s", cJSON_GetStringValue(cJSON_GetObjectItem(j, "fingerprint")));
  snprintf(http_url, sizeof http_url, "%s", cJSON_GetStringValue(cJSON_GetObjectItem(j, "http")));
  cJSON_Delete(j);
}

static void join_named(daemon_t *d, const char *dev, const char *name) {
  RUN_OK("%s token issue --state '%s' --json", cloud, d->state);
  cJSON *j = cJSON_Parse(out);
  const char *token = cJSON_GetStringValue(cJSON_GetObjectItem(j, "token"));
  assert_non_null(token);
  RUN_OK("%s join --cloud %s --cloud-key %s --token %s --state '%s/%s' --name '%s'", device, d->url, d->fp,
         token, dir, dev, name);
  cJSON_Delete(j);
}

/* The report's data points against the registry (db) and the emulator's records. */
static void check_points(const char *html, const char *db, const char *emu_metrics) {
  double x[256], y[256];
  /* the round's mean of the devices' losses = the mean of the update rows' losses */
  int n = points(html, "device-loss", "mean of the devices", x, y, 256);
  assert_int_equal(n, 2);
  for (int i = 0; i < n; i++) {
    char q[300];
    snprintf(q, sizeof q, "SELECT AVG(loss) FROM updates WHERE round = %d", (int)x[i]);
    assert_int_equal((int)x[i], i + 1);
    close_to(y[i], db_num(db, q), 1e-6, "chart: mean device loss");
  }
  /* the device with the hostile name: its own losses, by round */
  n = points(html, "device-loss", EVIL_NAME_ESC, x, y, 256);
  assert_int_equal(n, 2);
  for (int i = 0; i < n; i++) {
    char q[300];
    snprintf(q, sizeof q,
             "SELECT u.loss FROM updates u JOIN devices d ON d.id = u.device_id WHERE d.name = '%s' AND "
             "round = %d",
             EVIL_NAME, (int)x[i]);
    close_to(y[i], db_num(db, q), 1e-6, "chart: a device's loss");
  }
  /* the aggregate's held-out loss per round = the records */
  n = points(html, "heldout-loss", "full model + round adapter", x, y, 256);
  assert_int_equal(n, 3);
  assert_int_equal((int)x[0], 0);
  for (int i = 0; i < n; i++) {
    char q[300];
    snprintf(q, sizeof q, "SELECT heldout_loss FROM round_stats WHERE round = %d", (int)x[i]);
    close_to(y[i], db_num(db, q), 1e-7, "chart: held-out loss");
  }
  /* the distillation curve = the emulator's step records */
  cJSON *st = jsonl_file(emu_metrics, "step");
  n = points(html, "distill-loss", "loss", x, y, 256);
  assert_int_equal(n, cJSON_GetArraySize(st));
  assert_true(n >= 4);
  for (int i = 0; i < n; i++) {
    assert_int_equal((int)x[i], (int)num(cJSON_GetArrayItem(st, i), "step"));
    close_to(y[i], num(cJSON_GetArrayItem(st, i), "loss"), 1e-7, "chart: distillation loss");
  }
  cJSON_Delete(st);
  /* timeline: both devices in each round's result */
  for (int r = 1; r <= 2; r++) {
    char key[200];
    char q[200];
    snprintf(q, sizeof q, "SELECT participants FROM round_stats WHERE round = %d", r);
    snprintf(key, sizeof key, "data-round=\"%d\" data-kind=\"participants\" data-value=\"%.0f\"", r,
             db_num(db, q));
    if (!strstr(html, key)) fail_msg("no timeline bar %s", key);
  }
}

static void test_session_report(void **state) {
  (void)state;
  snprintf(dmn.state, sizeof dmn.state, "%s/cloud", dir);
  snprintf(dmn.log, sizeof dmn.log, "%s/cloud.log", dir);
  assert_int_equal(
      ot_test_system("rm -rf '%s' '%s' && cp %s/public.txt '%s/" EVIL_FILE "'", dmn.state, dmn.log, dir, dir),
      0);
  daemon_start_http(&dmn, "OT_TEST_DASHBOARD_LOOPBACK=0");
  char extra[2600];
  /* the cloud's held-out text: the first 3000 bytes of the public text */
  assert_int_equal(ot_test_system("head -c 3000 %s/public.txt > %s/heldout.txt", dir, dir), 0);
  snprintf(
      extra, sizeof extra,
      "--rounds 2 --min-devices 2 --max-devices 2 --deadline 120 --secagg off --distill-data '%s/" EVIL_FILE
      "' --eval-data %s/heldout.txt",
      dir, dir);
  /* session_create's own --distill-data comes first; ours, later on the line, wins */
  session_create(&dmn, "rep", extra);
  join_named(&dmn, "dev-a", EVIL_NAME);
  join_named(&dmn, "dev-b", "plain-b");
  pid_t a = device_run("dev-a", "romance.txt", "rep", NULL),
        b = device_run("dev-b", "mystery.txt", "rep", NULL);
  int sa = wait_exit(a, 240), sb = wait_exit(b, 240);
  if (sa) fail_device(&dmn, "dev-a", sa);
  if (sb) fail_device(&dmn, "dev-b", sb);
  cJSON *show = wait_session(&dmn, "rep", "done", 60);
  cJSON_Delete(show);
  char db[1200];
  snprintf(db, sizeof db, "%s/registry.db", dmn.state);

  /* the daemon's record of each round, through the operator command, against the rows */
  RUN_OK("%s session metrics rep --state '%s' --json", cloud, dmn.state);
  cJSON *j = cJSON_Parse(out);
  assert_non_null(j);
  cJSON *m = cJSON_GetObjectItem(j, "metrics");
  assert_int_equal(cJSON_GetArraySize(m), 3); /* round 0 (the starting point's held-out loss), 1, 2 */
  {
    cJSON *r0 = cJSON_GetArrayItem(m, 0);
    char in[200], adir[1400];
    assert_int_equal((int)num(r0, "round"), 0);
    assert_int_equal((int)num(r0, "participants"), 0);
    db_text(db, "SELECT input FROM rounds WHERE round = 1", in, sizeof in);
    snprintf(adir, sizeof adir, "%s/objects/adapters/%s", dmn.state, in);
    RUN_OK("%s eval --model %s/full --adapter %s --text %s/heldout.txt --json 2>/dev/null", cloud, dir, adir,
           dir);
    double hl, ht;
    ot_test_eval_json(out, "initial adapter on the held-out text", &hl, &ht);
    close_to(num(r0, "heldout_loss"), hl, 1e-6, "round 0 held-out loss vs eval");
  }
  for (int i = 0; i < 2; i++) {
    cJSON *r = cJSON_GetArrayItem(m, i + 1);
    char q[300];
    assert_int_equal((int)num(r, "round"), i + 1);
    assert_int_equal((int)num(r, "participants"), 2);
    assert_int_equal((int)num(r, "dropped"), 0);
    assert_int_equal((int)num(r, "losses_reported"), 2);
    snprintf(q, sizeof q, "SELECT SUM(tokens) FROM updates WHERE round = %d", i + 1);
    close_to(num(r, "tokens"), db_num(db, q), 0, "round tokens");
    snprintf(q, sizeof q, "SELECT AVG(loss) FROM updates WHERE round = %d", i + 1);
    close_to(num(r, "mean_loss"), db_num(db, q), 1e-9, "round mean loss");
    assert_true(num(r, "agg_seconds") >= 0 && num(r, "agg_seconds") < 60);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(r, "dp_epsilon")));
    /* the aggregate's held-out loss = `eval` of the full model with the round's adapter */
    char res[200], adir[1400];
    snprintf(q, sizeof q, "SELECT result FROM rounds WHERE round = %d", i + 1);
    db_text(db, q, res, sizeof res);
    snprintf(adir, sizeof adir, "%s/objects/adapters/%s", dmn.state, res);
    RUN_OK("%s eval --model %s/full --adapter %s --text %s/heldout.txt --json 2>/dev/null", cloud, dir, adir,
           dir);
    double hl, ht;
    ot_test_eval_json(out, "round adapter on the held-out text", &hl, &ht);
    close_to(num(r, "heldout_loss"), hl, 1e-6, "round's held-out loss vs eval");
  }
  /* the emulator's gap is its distillation's last KD, as its own records say */
  char emu_dir[1100], emu_metrics[1200];
  db_text(db, "SELECT dir FROM emulators", emu_dir, sizeof emu_dir);
  snprintf(emu_metrics, sizeof emu_metrics, "%s/metrics.jsonl", emu_dir);
  cJSON *dr = jsonl_file(emu_metrics, "distill");
  double kd = num(cJSON_GetArrayItem(dr, cJSON_GetArraySize(dr) - 1), "kd");
  cJSON_Delete(dr);
  close_to(num(cJSON_GetArrayItem(m, 1), "emulator_gap"), kd, 1e-6, "emulator gap vs the distillation's KD");
  close_to(num(cJSON_GetObjectItem(j, "session"), "emulator_gap"), kd, 1e-6, "session's emulator gap");
  /* the gap it gives away (issue 15): measured by the daemon on the Brown pretraining genres'
   * held-out documents; the same perplexities as `eval` of the full model and the package */
  const cJSON *mg = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "session"), "emulator_measured_gap");
  assert_true(cJSON_IsObject(mg));
  double lf, le, tf, te;
  RUN_OK("%s eval --model %s/full --text %s/gap-heldout.txt --json 2>/dev/null", cloud, dir, dmn.state);
  ot_test_eval_json(out, "full model on the gap text", &lf, &tf);
  RUN_OK("%s eval --emulator %s --text %s/gap-heldout.txt --json 2>/dev/null", device, emu_dir, dmn.state);
  ot_test_eval_json(out, "emulator on the gap text", &le, &te);
  close_to(num(mg, "full_perplexity"), exp(lf), 1e-5, "measured gap: full model's perplexity");
  close_to(num(mg, "emulator_perplexity"), exp(le), 1e-5, "measured gap: emulator's perplexity");
  if (!(fabs(num(mg, "gap") - (exp(le - lf) - 1)) < 1e-5))
    fail_msg("measured gap %.9g, eval gives %.9g", num(mg, "gap"), exp(le - lf) - 1);
  close_to(num(mg, "tokens"), tf, 0, "measured gap: tokens");
  cJSON_Delete(j);
  /* devices never fetch the operator's records: not in the package's manifest */
  char man[1200];
  snprintf(man, sizeof man, "%s/manifest.json", emu_dir);
  assert_false(file_has(man, "metrics.jsonl"));
  /* each device's round training left its own records */
  char dm[1200];
  snprintf(dm, sizeof dm, "%s/dev-a/work/rep/r2/local/metrics.jsonl", dir);
  cJSON *dsum = jsonl_file(dm, "summary");
  assert_int_equal(cJSON_GetArraySize(dsum), 1);
  char q[300];
  snprintf(
      q, sizeof q,
      "SELECT u.loss FROM updates u JOIN devices d ON d.id = u.device_id WHERE d.name = '%s' AND round = 2",
      EVIL_NAME);
  close_to(num(cJSON_GetArrayItem(dsum, 0), "mean_loss"), db_num(db, q), 1e-6,
           "device's summary vs its update row");
  cJSON_Delete(dsum);

  /* the report file */
  snprintf(report_path, sizeof report_path, "%s/report.html", dir);
  RUN_OK("%s report --state '%s' --session rep --out '%s'", cloud, dmn.state, report_path);
  char *html = slurp(report_path);
  check_points(html, db, emu_metrics);
  char digest[OT_DIGEST_HEX], dbd[OT_DIGEST_HEX + 8], file[1400];
  db_text(db, "SELECT digest FROM adapters WHERE name = 'rep'", dbd, sizeof dbd);
  db_text(db, "SELECT dir FROM adapters WHERE name = 'rep'", file, sizeof file);
  strcat(file, "/adapter_model.safetensors");
  assert_int_equal(ot_file_digest(file, digest), OT_OK);
  assert_string_equal(dbd, digest);
  char key[200];
  snprintf(key, sizeof key, "<code class=\"digest\">%s</code>", digest);
  assert_non_null(strstr(html, key));
  /* hostile text arrives escaped, never as markup; no script, nothing fetched */
  assert_null(strstr(html, EVIL_NAME));
  assert_null(strstr(html, "<script"));
  assert_null(strstr(html, "<svg onload"));
  assert_non_null(strstr(html, EVIL_NAME_ESC));
  assert_non_null(strstr(html, EVIL_FILE_ESC));
  assert_null(strstr(html, "http://"));
  assert_null(strstr(html, "https://"));
  assert_non_null(strstr(html, "id=\"audit\""));
  assert_non_null(strstr(html, "round.done"));
  free(html);
  /* the default session is the newest; an unknown one is a clear error */
  assert_int_equal(ot_test_run(out, sizeof out, "%s report --state '%s' --session nope --out %s/x.html",
                               cloud, dmn.state, dir),
                   1);
  assert_non_null(strstr(out, "no session named 'nope'"));
  assert_int_equal(
      ot_test_run(out, sizeof out, "%s report --state %s/nowhere --out %s/x.html", cloud, dir, dir), 1);
  assert_non_null(strstr(out, "no registry"));

  /* the dashboard: the same data, for loopback or the operator key. This daemon runs with
   * OT_TEST_DASHBOARD_LOOPBACK=0, so its loopback peers count as remote: only the key opens it */
  char keyf[1200];
  snprintf(keyf, sizeof keyf, "%s/dashboard.key", dmn.state);
  struct stat sbuf;
  assert_int_equal(stat(keyf, &sbuf), 0);
  assert_int_equal(sbuf.st_mode & 0777, 0600);
  RUN_OK("curl -s -o /dev/null -w '%%{http_code}' '%s/dashboard?session=rep'", http_url);
  assert_string_equal(out, "403");
  RUN_OK("curl -s -o /dev/null -w '%%{http_code}' -H 'Authorization: Bearer %064d' '%s/dashboard'", 7,
         http_url);
  assert_string_equal(out, "403");
  RUN_OK("curl -s -o %s/dash.html -w '%%{http_code}' -H \"Authorization: Bearer $(cat '%s')\" "
         "'%s/dashboard?session=rep'",
         dir, keyf, http_url);
  assert_string_equal(out, "200");
  char dp[1200];
  snprintf(dp, sizeof dp, "%s/dash.html", dir);
  html = slurp(dp);
  check_points(html, db, emu_metrics);
  assert_non_null(strstr(html, "http-equiv=\"refresh\""));
  assert_null(strstr(html, EVIL_NAME));
  free(html);
  RUN_OK("curl -s -w ' %%{http_code}' -H \"Authorization: Bearer $(cat '%s')\" "
         "'%s/dashboard?session=bad%%3Cname'",
         keyf, http_url);
  assert_non_null(strstr(out, " 400"));
  /* the serving API is unchanged beside it */
  RUN_OK("curl -s -o /dev/null -w '%%{http_code}' '%s/v1/models'", http_url);
  assert_string_equal(out, "200");
  /* restarted as usual (loopback trusted) for the browser */
  daemon_stop(&dmn);
  daemon_start_http(&dmn, "OT_TEST_DASHBOARD_LOOPBACK=1");
  RUN_OK("curl -s -o /dev/null -w '%%{http_code}' '%s/dashboard/data?session=rep'", http_url);
  assert_string_equal(out, "200");
  session_ran = 1;
}

/* ---- 3: a real browser ------------------------------------------------------------------- */

static const char *chromium(void) {
  static const char *const cands[] = {"/usr/bin/chromium", "/usr/bin/chromium-browser"};
  for (size_t i = 0; i < sizeof cands / sizeof cands[0]; i++)
    if (access(cands[i], X_OK) == 0) return cands[i];
  return NULL;
}

/* Runs headless Chromium on url with extra arguments; its log (console messages included)
 * into log; returns the exit status. */
static int browse(const char *bin, const char *url, const char *args, const char *outfile, const char *log) {
  return ot_test_system(
      "cd '%s/browser' && HOME='%s/browser' timeout 90 %s --headless --no-sandbox --disable-gpu "
      "--no-first-run --enable-logging=stderr --v=0 --hide-scrollbars %s '%s' > '%s' 2> '%s'",
      dir, dir, bin, args, url, outfile, log);
}

/* Console messages and page errors that Chromium logged. */
static void no_console(const char *log, const char *what) {
  char *t = slurp(log);
  if (strstr(t, ":CONSOLE") || strstr(t, "Uncaught")) fail_msg("%s: the browser console said:\n%s", what, t);
  free(t);
}

static void test_browser(void **state) {
  (void)state;
  const char *bin = chromium();
  if (!bin)
    fail_msg("chromium is not installed, so the report was not opened in a browser: run scripts/setup.sh "
             "(apt-get install chromium)");
  if (!session_ran) fail_msg("the session test did not finish: nothing to open");
  assert_int_equal(ot_test_system("rm -rf '%s/browser' && mkdir -p '%s/browser'", dir, dir), 0);
  char url[1400], dom[1300], log[1300], db[1200], emu_dir[1100], emu_metrics[1200];
  snprintf(db, sizeof db, "%s/registry.db", dmn.state);
  db_text(db, "SELECT dir FROM emulators", emu_dir, sizeof emu_dir);
  snprintf(emu_metrics, sizeof emu_metrics, "%s/metrics.jsonl", emu_dir);

  /* the detector works: a page with a script error is caught */
  char bad[1300];
  snprintf(bad, sizeof bad, "%s/browser/bad.html", dir);
  assert_int_equal(ot_file_write_atomic(bad, "<p>x</p><script>nosuchfunction()</script>", 41), OT_OK);
  snprintf(url, sizeof url, "file://%s", bad);
  snprintf(dom, sizeof dom, "%s/browser/bad.dom", dir);
  snprintf(log, sizeof log, "%s/browser/bad.log", dir);
  assert_int_equal(browse(bin, url, "--dump-dom", dom, log), 0);
  char *t = slurp(log);
  assert_non_null(strstr(t, "Uncaught ReferenceError"));
  free(t);

  struct {
    const char *name, *url_fmt, *base;
  } pages[] = {{"report", "file://%s", report_path}, {"dashboard", "%s/dashboard?session=rep", http_url}};
  for (int i = 0; i < 2; i++) {
    snprintf(url, sizeof url, pages[i].url_fmt, pages[i].base);
    snprintf(dom, sizeof dom, "%s/browser/%s.dom.html", dir, pages[i].name);
    snprintf(log, sizeof log, "%s/browser/%s.dom.log", dir, pages[i].name);
    if (browse(bin, url, "--dump-dom", dom, log) != 0) {
      print_log(log);
      fail_msg("chromium could not open %s", url);
    }
    no_console(log, pages[i].name);
    /* the DOM the browser built holds the same chart points as the registry */
    char *d = slurp(dom);
    check_points(d, db, emu_metrics);
    assert_non_null(strstr(d, "<svg"));
    assert_null(strstr(d, EVIL_NAME));
    free(d);
    static const char *const vp[][2] = {{"1280,800", "desktop"}, {"390,844", "phone"}};
    for (int k = 0; k < 2; k++) {
      char args[1400], png[1300], nul[1300];
      snprintf(png, sizeof png, "%s/browser/%s-%s.png", dir, pages[i].name, vp[k][1]);
      snprintf(args, sizeof args, "--window-size=%s --screenshot='%s'", vp[k][0], png);
      snprintf(log, sizeof log, "%s/browser/%s-%s.log", dir, pages[i].name, vp[k][1]);
      snprintf(nul, sizeof nul, "%s/browser/%s-%s.out", dir, pages[i].name, vp[k][1]);
      if (browse(bin, url, args, nul, log) != 0) {
        print_log(log);
        fail_msg("chromium could not take a screenshot of %s", url);
      }
      no_console(log, png);
      struct stat sbuf;
      assert_int_equal(stat(png, &sbuf), 0);
      assert_true(sbuf.st_size > 10000); /* a page with charts, not a blank one */
      fprintf(stderr, "[report] screenshot %s (%lld bytes)\n", png, (long long)sbuf.st_size);
    }
  }
  daemon_stop(&dmn);
}

static int setup(void **state) {
  (void)state;
  return session_fixture_setup("test_report", genres, 2);
}

static int teardown(void **state) {
  (void)state;
  session_fixture_teardown();
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_training_records),
      cmocka_unit_test(test_session_report),
      cmocka_unit_test(test_browser),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
