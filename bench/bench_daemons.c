/* Devices against real `offtune-cloud serve` daemons (issue 18; bench/daemons.sh runs the table):
 * many devices in threads of this one process, each with its own identity and its own
 * encrypted nng session (protocol/'s client, as offtune-device's join and run use it),
 * spread round-robin over the daemons' URLs.
 *
 *   bench_daemons --urls U1[,U2,...] --fingerprint FP --tokens FILE --devices N --session NAME
 *                 --work DIR [--then CMD]
 *
 * Phase 1, enrolment: every device at once runs the join handshake with a one-time token
 * (a line of FILE) and closes, as `offtune-device join` does; timed on the wall clock.
 * Then CMD runs (bench/daemons.sh creates the session there), then phase 2: every device
 * runs the session's rounds like `offtune-device run` (poll, honour retry_after_ms, fetch the
 * emulator once and the round's adapter, upload, SubmitUpdate, 100 ms pause after an update)
 * except that training is left out: the update sent is the round's adapter with the low byte
 * of one value changed per device (a valid update, distinct digests), so the figures are the
 * daemons' and the protocol's, not the trainer's.
 *
 * Prints one JSON line: enrolments/s (devices / wall time of phase 1); updates accepted/s
 * (updates / the sum over rounds of the window from the first device's adapter fetch to the
 * last device's accepted SubmitUpdate); the median time of one device's round work (fetch
 * adapter + upload + submit); rounds per minute (rounds / the time from round 1's first TRAIN
 * reply to the first DONE reply: turnover, aggregation and the devices' polls included). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_cli.h"
#include "ot_digest.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_identity.h"
#include "ot_pb.h"
#include "ot_transport.h"
#include "session.pb-c.h"

#define MAX_DEVICES 256
#define MAX_ROUNDS 64
#define MAX_URLS 8

static void die(const char *what, int rc) {
  fprintf(stderr, "bench_daemons: %s: %s: %s\n", what, ot_strerror(rc), ot_error_detail());
  exit(1);
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static const char *urls[MAX_URLS], *fingerprint, *session, *work;
static int n_urls;

typedef struct {
  int idx;
  ot_identity id;
  char token[128];
  double enrol_s;
  double start[MAX_ROUNDS + 1], end[MAX_ROUNDS + 1]; /* round work: first fetch .. accepted submit */
  int rounds_done, errors;
} device;

static device devs[MAX_DEVICES];
static pthread_barrier_t go;

static void *enrol_main(void *arg) {
  device *d = arg;
  ot_client_config cc = {
      .url = urls[d->idx % n_urls], .id = &d->id, .cloud_fingerprint = fingerprint, .enrol_token = d->token};
  ot_client *c = NULL;
  pthread_barrier_wait(&go);
  double t0 = ot_now();
  int rc = ot_client_open(&cc, &c);
  ot_client_close(c);
  if (rc) die("enrolling", rc);
  d->enrol_s = ot_now() - t0;
  return NULL;
}

static int call(ot_client *c, Offtune__Session__SessionRequest *req, uint8_t **reply, size_t *len) {
  uint8_t *body;
  size_t bl;
  if (ot_pb_pack(&req->base, &body, &bl)) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  int rc = ot_client_call(c, body, bl, reply, len);
  free(body);
  return rc;
}

static int fetch_files(ot_client *c, Offtune__Session__FileRef **f, size_t n, const char *dir) {
  int rc = ot_mkdir_p(dir);
  for (size_t i = 0; rc == OT_OK && i < n; i++) {
    char path[4096];
    if (!f[i]->file || strchr(f[i]->file, '/')) return ot_error(OT_ERR_FORMAT, "bad file name");
    snprintf(path, sizeof path, "%s/%s", dir, f[i]->file);
    ot_fetch_opts o = {.max_size = f[i]->size};
    rc = ot_client_fetch_file(c, f[i]->name, path, &o);
  }
  return rc;
}

/* Fetch the round's adapter, send it back with one value nudged, submit it: *accepted. */
static int round_work(device *d, ot_client *c, const Offtune__Session__RoundInfo *ri, int *accepted) {
  char dir[4096], path[4200], name[256];
  snprintf(dir, sizeof dir, "%s/d%d/r%u", work, d->idx, ri->round);
  int rc = fetch_files(c, ri->adapter_files, ri->n_adapter_files, dir);
  char *buf = NULL;
  size_t len = 0;
  snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
  if (rc == OT_OK) rc = ot_file_read_all(path, 1u << 30, &buf, &len);
  if (rc == OT_OK && len < 16) rc = ot_error(OT_ERR_FORMAT, "%s: too short", path);
  /* the last 4 bytes are the end of the last tensor's data: buf[len - 4] is the low byte of a
   * value (fp32, fp16 or bf16), whose low 7 bits are mantissa bits in all three, so the update
   * stays finite and differs per device */
  if (rc == OT_OK) buf[len - 4] = (char)(buf[len - 4] ^ (char)(1 + d->idx % 127));
  snprintf(name, sizeof name, "update.%s.%u", ri->session, ri->round);
  char digest[OT_DIGEST_HEX];
  ot_send_opts so = {.window = 4};
  if (rc == OT_OK) rc = ot_digest_bytes(buf, len, digest);
  if (rc == OT_OK) rc = ot_client_send(c, name, (const uint8_t *)buf, len, &so);
  free(buf);
  if (rc) return rc;
  Offtune__Session__SubmitUpdate su = OFFTUNE__SESSION__SUBMIT_UPDATE__INIT;
  su.session = ri->session;
  su.round = ri->round;
  su.digest = digest;
  su.tokens = (uint64_t)ri->train->steps * ri->train->batch * (ri->train->seq_len ? ri->train->seq_len : 1);
  su.train_loss = 2.0f;
  su.has_train_loss = 1;
  Offtune__Session__SessionRequest req = OFFTUNE__SESSION__SESSION_REQUEST__INIT;
  req.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_SUBMIT;
  req.submit = &su;
  uint8_t *reply = NULL;
  rc = call(c, &req, &reply, &len);
  ot_pb_alloc pa;
  ot_pb_alloc_init(&pa, 1 << 20);
  Offtune__Session__SubmitReply *sr =
      rc == OT_OK ? offtune__session__submit_reply__unpack(&pa.a, len, reply) : NULL;
  free(reply);
  if (rc == OT_OK && !sr) rc = ot_error(OT_ERR_FORMAT, "bad SubmitReply");
  if (sr) {
    *accepted = sr->accepted;
    if (!sr->accepted)
      fprintf(stderr, "bench_daemons: device %d round %u refused: %s\n", d->idx, ri->round,
              sr->reason ? sr->reason : "");
    offtune__session__submit_reply__free_unpacked(sr, &pa.a);
  }
  return rc;
}

static double first_train = 0, done_at = 0;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void *run_main(void *arg) {
  device *d = arg;
  ot_client_config cc = {.url = urls[d->idx % n_urls], .id = &d->id, .cloud_fingerprint = fingerprint};
  ot_client *c = NULL;
  int have_emulator = 0, backoff = 200;
  char emu[4096];
  snprintf(emu, sizeof emu, "%s/d%d/emulator", work, d->idx);
  for (;;) {
    int rc = c ? OT_OK : ot_client_open(&cc, &c);
    uint8_t *reply = NULL;
    size_t len = 0;
    Offtune__Session__RoundInfo *ri = NULL;
    ot_pb_alloc pa;
    ot_pb_alloc_init(&pa, 4 << 20);
    if (rc == OT_OK) {
      Offtune__Session__Poll p = OFFTUNE__SESSION__POLL__INIT;
      p.session = (char *)session;
      Offtune__Session__SessionRequest req = OFFTUNE__SESSION__SESSION_REQUEST__INIT;
      req.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_POLL;
      req.poll = &p;
      rc = call(c, &req, &reply, &len);
    }
    if (rc == OT_OK && !(ri = offtune__session__round_info__unpack(&pa.a, len, reply)))
      rc = ot_error(OT_ERR_FORMAT, "bad RoundInfo");
    free(reply);
    int wait_ms = 1000, stop = 0;
    if (rc == OT_OK) {
      backoff = 200;
      if (ri->has_retry_after_ms && ri->retry_after_ms >= 50 && ri->retry_after_ms <= 60000)
        wait_ms = (int)ri->retry_after_ms;
      double now = ot_now();
      switch (ri->state) {
      case OFFTUNE__SESSION__ROUND_STATE__TRAIN: {
        if (ri->round < 1 || ri->round > MAX_ROUNDS || !ri->train || !ri->session) {
          rc = ot_error(OT_ERR_FORMAT, "round %u out of range", ri->round);
          break;
        }
        if (ri->round == 1) {
          pthread_mutex_lock(&mu);
          if (!first_train || now < first_train) first_train = now;
          pthread_mutex_unlock(&mu);
        }
        if (!have_emulator) { /* once per device, as the device caches it: not timed */
          rc = fetch_files(c, ri->emulator_files, ri->n_emulator_files, emu);
          have_emulator = rc == OT_OK;
        }
        int accepted = 0;
        double t0 = ot_now();
        if (rc == OT_OK) rc = round_work(d, c, ri, &accepted);
        if (rc == OT_OK && accepted) {
          d->start[ri->round] = t0;
          d->end[ri->round] = ot_now();
          d->rounds_done++;
        }
        wait_ms = 100;
        break;
      }
      case OFFTUNE__SESSION__ROUND_STATE__DONE:
        pthread_mutex_lock(&mu);
        if (!done_at || now < done_at) done_at = now;
        pthread_mutex_unlock(&mu);
        stop = 1;
        break;
      case OFFTUNE__SESSION__ROUND_STATE__FAILED:
        fprintf(stderr, "bench_daemons: the session failed on the cloud\n");
        exit(1);
      default: /* WAIT, NONE */ break;
      }
    }
    if (ri) offtune__session__round_info__free_unpacked(ri, &pa.a);
    if (stop) break;
    if (rc) { /* as the device: drop the connection, back off, poll again */
      if (++d->errors > 20) die("the session", rc);
      fprintf(stderr, "bench_daemons: device %d: %s; retrying\n", d->idx, ot_error_detail());
      ot_client_close(c);
      c = NULL;
      wait_ms = backoff;
      backoff = backoff < 4000 ? backoff * 2 : 5000;
    }
    sleep_ms(wait_ms);
  }
  ot_client_close(c);
  return NULL;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  const char *url_list = NULL, *tokens = NULL, *then = NULL;
  int n = 0;
  const ot_opt opts[] = {
      {"urls", OT_OPT_STR, &url_list, "U1,U2", "the daemons' device URLs (devices round-robin)"},
      {"fingerprint", OT_OPT_STR, &fingerprint, "FP", "the cloud's fingerprint (one identity)"},
      {"tokens", OT_OPT_STR, &tokens, "FILE", "one enrolment token per line, at least --devices"},
      {"devices", OT_OPT_INT, &n, "N", "devices (threads)"},
      {"session", OT_OPT_STR, &session, "NAME", "the session the devices take part in"},
      {"work", OT_OPT_STR, &work, "DIR", "the devices' files (emulator, round adapters)"},
      {"then", OT_OPT_STR, &then, "CMD", "run after enrolment, before the session phase"},
  };
  int rc = ot_cli_parse(argc - 1, argv + 1, opts, (int)(sizeof opts / sizeof opts[0]));
  if (rc == OT_OK && (!url_list || !fingerprint || !tokens || !session || !work || n < 1 || n > MAX_DEVICES))
    rc = ot_error(OT_ERR_INVALID, "--urls, --fingerprint, --tokens, --session, --work and --devices 1..%d",
                  MAX_DEVICES);
  if (rc) {
    fprintf(stderr, "bench_daemons: %s\n", ot_error_detail());
    return 2;
  }
  char *ul = strdup(url_list), *save = NULL;
  for (char *u = strtok_r(ul, ",", &save); u && n_urls < MAX_URLS; u = strtok_r(NULL, ",", &save))
    urls[n_urls++] = u;
  char *text = NULL;
  size_t tl;
  if ((rc = ot_file_read_all(tokens, 1 << 20, &text, &tl)) != OT_OK) die("reading the tokens", rc);
  char *line = strtok_r(text, "\n", &save);
  for (int i = 0; i < n; i++, line = strtok_r(NULL, "\n", &save)) {
    if (!line || strlen(line) >= sizeof devs[i].token)
      die("the tokens", ot_error(OT_ERR_INVALID, "need %d tokens", n));
    devs[i].idx = i;
    snprintf(devs[i].token, sizeof devs[i].token, "%s", line);
    if ((rc = ot_identity_generate(&devs[i].id)) != OT_OK) die("identity", rc);
  }
  free(text);
  pthread_t th[MAX_DEVICES];
  /* phase 1: every device enrols at once */
  pthread_barrier_init(&go, NULL, (unsigned)n + 1);
  for (int i = 0; i < n; i++) pthread_create(&th[i], NULL, enrol_main, &devs[i]);
  pthread_barrier_wait(&go);
  double t0 = ot_now();
  for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
  double enrol_wall = ot_now() - t0;
  pthread_barrier_destroy(&go);
  if (then && system(then) != 0) die("--then", ot_error(OT_ERR_IO, "%s failed", then));
  /* phase 2: the session's rounds */
  for (int i = 0; i < n; i++) pthread_create(&th[i], NULL, run_main, &devs[i]);
  for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
  int rounds = 0, updates = 0, errors = 0;
  double window_sum = 0;
  static double lat[MAX_DEVICES * MAX_ROUNDS];
  for (int r = 1; r <= MAX_ROUNDS; r++) {
    double lo = 0, hi = 0;
    int k = 0;
    for (int i = 0; i < n; i++) {
      if (!devs[i].end[r]) continue;
      if (!k || devs[i].start[r] < lo) lo = devs[i].start[r];
      if (!k || devs[i].end[r] > hi) hi = devs[i].end[r];
      lat[updates + k] = devs[i].end[r] - devs[i].start[r];
      k++;
    }
    if (!k) continue;
    rounds = r;
    updates += k;
    window_sum += hi - lo;
  }
  for (int i = 0; i < n; i++) errors += devs[i].errors;
  qsort(lat, (size_t)updates, sizeof lat[0], cmp_double);
  double session_s = done_at - first_train;
  printf("{\"daemons\":%d,\"devices\":%d,\"enrol_s\":%.3f,\"enrol_per_s\":%.1f,\"rounds\":%d,\"updates\":%d,"
         "\"update_window_s\":%.3f,\"updates_per_s\":%.1f,\"update_ms_median\":%.1f,\"session_s\":%.3f,"
         "\"rounds_per_min\":%.1f,\"errors\":%d}\n",
         n_urls, n, enrol_wall, n / enrol_wall, rounds, updates, window_sum,
         window_sum > 0 ? updates / window_sum : 0, updates ? 1e3 * lat[updates / 2] : 0, session_s,
         session_s > 0 ? rounds * 60.0 / session_s : 0, errors);
  for (int i = 0; i < n; i++) ot_identity_wipe(&devs[i].id);
  free(ul);
  return 0;
}
