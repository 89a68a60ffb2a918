/* offtune-device join and run: the device's side of the cloud's tuning sessions.
 *
 * State directory (default ./offtune-device-state, 0700):
 *   device.key, device.pub   this device's identity (made by join if missing)
 *   cloud.json               the cloud's URL and pinned fingerprint (join)
 *   cache/emulators/<digest>/  emulator packages, fetched once, verified by digest
 *   work/<session>/r<round>/   the round's adapter (global/), the trained one (local/) and
 *                              trained.json once training finished: a device killed after
 *                              training uploads it on restart instead of training again
 *   progress.json            the last round whose update the cloud accepted
 * Only adapter weights and their sizes/digests ever leave the device: the private text is
 * read by the trainer and nothing else. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "ot_cli.h"
#include "ot_device_client.h"
#include "ot_device_cmd.h"
#include "ot_device_secagg.h"
#include "ot_device_train.h"
#include "ot_emulator.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_identity.h"
#include "ot_pb.h"
#include "ot_secagg.h"
#include "ot_transport.h"
#include "session.pb-c.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))
#define DEFAULT_STATE "offtune-device-state"

static int state_path(const char *state, const char *rel, char *out, size_t n) {
  if ((size_t)snprintf(out, n, "%s/%s", state, rel) >= n) return ot_error(OT_ERR_RANGE, "path too long");
  return OT_OK;
}

static int load_identity(const char *state, int create, ot_identity *id) {
  char key[4096];
  int rc = state_path(state, "device.key", key, sizeof key);
  if (rc) return rc;
  if (ot_file_exists(key)) return ot_identity_load(key, id);
  if (!create)
    return ot_error(OT_ERR_NOTFOUND, "%s: no device identity (run offtune-device join first)", key);
  rc = ot_identity_generate(id);
  if (rc == OT_OK) rc = ot_identity_save(id, state, "device");
  return rc;
}

typedef struct {
  char url[1024], fingerprint[OT_FINGERPRINT_LEN], name[64];
} cloud_info;

static int load_cloud(const char *state, cloud_info *ci) {
  char p[4096], *text = NULL;
  size_t len;
  int rc = state_path(state, "cloud.json", p, sizeof p);
  if (rc == OT_OK) rc = ot_file_read_all(p, 1 << 16, &text, &len);
  if (rc) return ot_error(rc, "%s: not joined to a cloud (run offtune-device join first)", state);
  cJSON *j = cJSON_Parse(text);
  free(text);
  const char *url = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "url"));
  const char *fp = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "fingerprint"));
  const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "name"));
  if (!url || !fp || strlen(url) >= sizeof ci->url || strlen(fp) >= sizeof ci->fingerprint)
    rc = ot_error(OT_ERR_FORMAT, "%s is damaged", p);
  if (rc == OT_OK) {
    snprintf(ci->url, sizeof ci->url, "%s", url);
    snprintf(ci->fingerprint, sizeof ci->fingerprint, "%s", fp);
    snprintf(ci->name, sizeof ci->name, "%s", name ? name : "");
  }
  cJSON_Delete(j);
  return rc;
}

static int write_json(const char *path, cJSON *j) {
  char *text = cJSON_Print(j);
  cJSON_Delete(j);
  if (!text) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  int rc = ot_file_write_atomic(path, text, strlen(text));
  free(text);
  return rc;
}

/* ---- join ------------------------------------------------------------------------------- */

int ot_dev_join(int argc, char **argv) {
  const char *cloud = NULL, *key = NULL, *token = NULL, *state = DEFAULT_STATE, *name = NULL;
  const ot_opt opts[] = {
      {"cloud", OT_OPT_STR, &cloud, "URL", "the cloud daemon (tcp://host:port; required)"},
      {"cloud-key", OT_OPT_STR, &key, "FINGERPRINT",
       "the cloud's fingerprint, pinned from now on (required)"},
      {"token", OT_OPT_STR, &token, "T", "one-time enrolment token from the operator (required)"},
      {"state", OT_OPT_STR, &state, "DIR", "this device's state directory (default " DEFAULT_STATE ")"},
      {"name", OT_OPT_STR, &name, "NAME", "a name the operator sees in `device list`"},
  };
  const char *syn = "offtune-device join --cloud URL --cloud-key FINGERPRINT --token T [--state DIR]";
  const char *desc =
      "Enrols this device once: makes its identity if missing (DIR/device.key, 0600), pins the\n"
      "cloud's key and spends the token. Afterwards `offtune-device run` needs neither.";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && (!cloud || !key || !token))
    rc = ot_error(OT_ERR_INVALID, "--cloud, --cloud-key and --token are required");
  if (rc == OT_OK && name && strlen(name) >= 64) rc = ot_error(OT_ERR_INVALID, "--name is too long");
  if (rc) {
    fprintf(stderr, "offtune-device join: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  rc = ot_mkdir_p(state);
  if (rc == OT_OK && chmod(state, 0700) != 0)
    rc = ot_error(OT_ERR_IO, "chmod %s: %s", state, strerror(errno));
  ot_identity id;
  if (rc == OT_OK) rc = load_identity(state, 1, &id);
  if (rc) return ot_dev_fail("preparing the device identity", rc);
  ot_client_config cc = {.url = cloud, .id = &id, .cloud_fingerprint = key, .enrol_token = token};
  ot_client *c = NULL;
  rc = ot_client_open(&cc, &c);
  ot_client_close(c);
  char fp[OT_FINGERPRINT_LEN], p[4096];
  ot_fingerprint(id.pk, fp);
  ot_identity_wipe(&id);
  if (rc) return ot_dev_fail("enrolling", rc);
  cJSON *j = cJSON_CreateObject();
  cJSON_AddStringToObject(j, "url", cloud);
  cJSON_AddStringToObject(j, "fingerprint", key);
  char defname[64];
  snprintf(defname, sizeof defname, "device-%.9s", fp + 4);
  cJSON_AddStringToObject(j, "name", name ? name : defname);
  rc = state_path(state, "cloud.json", p, sizeof p);
  if (rc == OT_OK) rc = write_json(p, j);
  if (rc) return ot_dev_fail("saving the cloud's key", rc);
  printf("enrolled %s with the cloud %s (%s); state in %s\n", fp, cloud, key, state);
  return OT_EXIT_OK;
}

/* ---- run -------------------------------------------------------------------------------- */

typedef struct {
  const char *state, *data, *session, *backend, *frozen;
  int threads, rounds_max, dry_run, json, frozen_kind;
  double give_up_s;
  ot_identity id;
  cloud_info ci;
  ot_client *c;
  ot_dev_secagg *sa; /* the current secure-aggregation round, if any */
} runner;

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static int ensure_client(runner *r) {
  if (r->c) return OT_OK;
  ot_client_config cc = {.url = r->ci.url, .id = &r->id, .cloud_fingerprint = r->ci.fingerprint};
  return ot_client_open(&cc, &r->c);
}

static void drop_client(runner *r) {
  ot_client_close(r->c);
  r->c = NULL;
}

static int call(runner *r, const Offtune__Session__SessionRequest *req, uint8_t **reply, size_t *len) {
  uint8_t *body;
  size_t bl;
  if (ot_pb_pack(&req->base, &body, &bl)) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  int rc = ot_client_call(r->c, body, bl, reply, len);
  free(body);
  return rc;
}

static void xfer_progress(void *arg, uint64_t done, uint64_t total) {
  (void)total;
  ot_progress_update(arg, (int64_t)done, NULL);
}

int ot_dev_file_ref_check(const Offtune__Session__FileRef *f) {
  if (!f->file || !*f->file || strchr(f->file, '/') || f->file[0] == '.')
    return ot_error(OT_ERR_FORMAT, "the cloud named a file '%s'", f->file ? f->file : "");
  return OT_OK;
}

/* A file of the round: fetched unless already there with the right digest. */
static int fetch_verified(runner *r, const Offtune__Session__FileRef *f, const char *dir) {
  int rc = ot_dev_file_ref_check(f);
  if (rc) return rc;
  char path[4096], h[OT_DIGEST_HEX];
  if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, f->file) >= sizeof path)
    return ot_error(OT_ERR_RANGE, "path too long");
  if (ot_file_exists(path) && ot_file_digest(path, h) == OT_OK && strcmp(h, f->digest) == 0) return OT_OK;
  ot_fetch_opts o = {.max_size = f->size};
  ot_progress bar;
  if (f->size >= (1u << 20)) { /* a bar for the large files only */
    ot_progress_start(&bar, stderr, f->file, (int64_t)f->size);
    o.progress = xfer_progress;
    o.progress_arg = &bar;
  }
  rc = ot_client_fetch_file(r->c, f->name, path, &o);
  if (o.progress) ot_progress_finish(&bar, rc == OT_OK ? "done" : "interrupted");
  if (rc == OT_OK) rc = ot_file_digest(path, h);
  if (rc == OT_OK && strcmp(h, f->digest) != 0) {
    unlink(path);
    rc = ot_error(OT_ERR_MISMATCH, "%s: digest differs from the one announced", f->name);
  }
  return rc;
}

static int fetch_all(runner *r, Offtune__Session__FileRef **files, size_t n, const char *dir,
                     const char *what) {
  int rc = ot_mkdir_p(dir);
  uint64_t bytes = 0;
  double t0 = ot_now();
  for (size_t i = 0; rc == OT_OK && i < n; i++) {
    rc = fetch_verified(r, files[i], dir);
    bytes += files[i]->size;
  }
  if (rc == OT_OK)
    fprintf(stderr, "[run] %s ready in %s (%zu files, %.2f MiB, %.2f s)\n", what, dir, n, bytes / 1048576.0,
            ot_now() - t0);
  return rc;
}

int ot_dev_adapter_settings(const Offtune__Session__AdapterSettings *a, ot_peft_config *c) {
  ot_peft_config_default(c);
  if (!a) return ot_error(OT_ERR_FORMAT, "RoundInfo without adapter settings");
  int rc = ot_peft_parse_kind(a->kind, &c->kind);
  if (a->has_lora_r) c->lora_r = (int)a->lora_r;
  if (a->has_lora_alpha) c->lora_alpha = a->lora_alpha;
  if (a->has_lora_dropout) c->lora_dropout = a->lora_dropout;
  if (a->has_lora_sites) c->lora_sites = a->lora_sites;
  if (a->has_bottleneck_dim) c->bottleneck_dim = (int)a->bottleneck_dim;
  if (a->has_seed) c->seed = a->seed;
  if (a->has_lora_rslora) c->lora_rslora = a->lora_rslora;
  return rc;
}

int ot_dev_round_info_check(const Offtune__Session__RoundInfo *ri) {
  if (!ri->session || !ri->emulator_digest || strlen(ri->emulator_digest) != 64 || !ri->train ||
      ri->train->steps < 1 || ri->train->batch < 1)
    return ot_error(OT_ERR_FORMAT, "incomplete RoundInfo");
  for (const char *p = ri->session; *p; p++)
    if (*p == '/' || *p == '.') return ot_error(OT_ERR_FORMAT, "bad session name");
  /* it names the cache directory: "../" in it would write the cloud's files anywhere */
  for (const char *p = ri->emulator_digest; *p; p++)
    if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
      return ot_error(OT_ERR_FORMAT, "bad emulator digest");
  return OT_OK;
}

/* Trains round ri (unless trained.json says it is done), then uploads and submits. */
static int do_round(runner *r, const Offtune__Session__RoundInfo *ri, int *accepted) {
  char emu_dir[4096], work[4096], global[4200], local[4200], done[4200], marker[4200];
  int rc = ot_dev_round_info_check(ri);
  if (rc) return rc;
  snprintf(emu_dir, sizeof emu_dir, "%s/cache/emulators/%s", r->state, ri->emulator_digest);
  snprintf(work, sizeof work, "%s/work/%s/r%u", r->state, ri->session, ri->round);
  snprintf(global, sizeof global, "%s/global", work);
  snprintf(local, sizeof local, "%s/local", work);
  snprintf(done, sizeof done, "%s/trained.json", work);
  snprintf(marker, sizeof marker, "%s/.verified", emu_dir);
  /* the emulator once per digest; the round's adapter every round */
  if (!ot_file_exists(marker)) {
    rc = fetch_all(r, ri->emulator_files, ri->n_emulator_files, emu_dir, "emulator");
    if (rc == OT_OK) rc = ot_file_write_atomic(marker, "ok\n", 3);
  }
  ot_peft_config acfg;
  if (rc == OT_OK) rc = ot_dev_adapter_settings(ri->adapter, &acfg);
  uint64_t tokens = 0;
  float loss = 0;
  int trained_before = rc == OT_OK && ot_file_exists(done);
  if (trained_before) {
    char *text = NULL;
    size_t len;
    rc = ot_file_read_all(done, 1 << 16, &text, &len);
    cJSON *j = rc == OT_OK ? cJSON_Parse(text) : NULL;
    tokens = (uint64_t)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(j, "tokens"));
    loss = (float)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(j, "loss"));
    cJSON_Delete(j);
    free(text);
    fprintf(stderr, "[run] %s round %u was trained earlier (a restart or --dry-run); uploading it\n",
            ri->session, ri->round);
  } else if (rc == OT_OK) {
    rc = fetch_all(r, ri->adapter_files, ri->n_adapter_files, global, "round adapter");
    ot_dev_train_opts o;
    ot_dev_train_opts_default(&o);
    o.emulator = emu_dir;
    o.init_adapter = global;
    o.adapter = acfg;
    o.text = r->data;
    o.out = local;
    o.steps = (int)ri->train->steps;
    o.batch = (int)ri->train->batch;
    o.seq_len = (int)ri->train->seq_len;
    o.lr = ri->train->lr;
    o.prox_mu = ri->train->has_prox_mu ? ri->train->prox_mu : 0.0f;
    o.middle_noise = ri->train->has_middle_noise ? ri->train->middle_noise : 0.0f;
    /* past INT_MAX it turns negative, and ot_dev_train refuses it */
    o.average_last = ri->train->has_average_last ? (int)ri->train->average_last : 0;
    o.data_offset_steps = (uint64_t)(ri->round - 1) * (uint64_t)o.steps; /* each round reads on */
    o.backend = r->backend;
    o.threads = r->threads;
    o.frozen = r->frozen_kind;
    o.json = r->json;
    o.metrics_label = "run";
    ot_dev_train_result res;
    char label[128];
    snprintf(label, sizeof label, "%s r%u", ri->session, ri->round);
    o.label = label;
    if (rc == OT_OK) {
      rc = ot_dev_train(&o, &res);
      if (rc) rc = ot_error(rc, "%s: %s", res.what, ot_error_detail());
    }
    if (rc == OT_OK) {
      tokens = res.tokens;
      loss = res.mean_loss;
      cJSON *j = cJSON_CreateObject();
      cJSON_AddNumberToObject(j, "tokens", (double)tokens);
      cJSON_AddNumberToObject(j, "loss", loss);
      rc = write_json(done, j);
      fprintf(stderr, "[run] %s round %u: trained %d steps in %.1f s (%.0f tokens/s), mean loss %.4f\n",
              ri->session, ri->round, res.steps_done, res.seconds, res.tokens_per_s, res.mean_loss);
    }
  }
  if (rc == OT_OK && r->dry_run) {
    /* what would be sent, and nothing else: the file and its digest */
    char what[4300], h2[OT_DIGEST_HEX] = "";
    snprintf(what, sizeof what, "%s/adapter_model.safetensors", local);
    rc = ot_file_digest(what, h2);
    if (rc == OT_OK)
      printf("dry run: round %u of %s trained; `run` would upload %s (digest %s, %llu tokens) and nothing "
             "else.\n"
             "Inspect it (offtune-device eval --emulator %s --adapter %s); `run` without --dry-run sends it "
             "without training again.\n",
             ri->round, ri->session, what, h2, (unsigned long long)tokens, emu_dir, local);
    *accepted = -1;
    return rc;
  }
  if (rc == OT_OK && ri->secagg) {
    /* secure aggregation: nothing is uploaded now; the masked update goes in its stage */
    int joined = 0;
    rc = ot_dev_secagg_join(r->c, ri->session, ri->round, loss, &joined);
    if (rc == OT_OK && joined)
      fprintf(stderr, "[run] %s round %u: trained; joined the round's secure aggregation\n", ri->session,
              ri->round);
    *accepted = 0;
    return rc;
  }
  /* tests: a slow device (a straggler, or one killed before it uploads) */
  const char *delay = getenv("OT_TEST_DEVICE_DELAY_MS");
  if (rc == OT_OK && delay && !trained_before) {
    fprintf(stderr, "[run] OT_TEST_DEVICE_DELAY_MS: waiting %s ms before the upload\n", delay);
    sleep_ms(atoi(delay));
  }
  /* upload the adapter's weights (nothing else) and ask the cloud to accept them */
  char upload[4300], name[256], h[OT_DIGEST_HEX];
  snprintf(upload, sizeof upload, "%s/adapter_model.safetensors", local);
  snprintf(name, sizeof name, "update.%s.%u", ri->session, ri->round);
  if (rc == OT_OK) rc = ot_file_digest(upload, h);
  ot_send_opts so = {.window = 4};
  ot_progress bar;
  struct stat sb;
  if (rc == OT_OK && stat(upload, &sb) == 0 && sb.st_size >= (1 << 20)) {
    ot_progress_start(&bar, stderr, "upload", (int64_t)sb.st_size);
    so.progress = xfer_progress;
    so.progress_arg = &bar;
  }
  if (rc == OT_OK) rc = ot_client_send_file(r->c, name, upload, &so);
  if (so.progress) ot_progress_finish(&bar, rc == OT_OK ? "done" : "interrupted");
  if (rc == OT_OK) {
    Offtune__Session__SubmitUpdate su = OFFTUNE__SESSION__SUBMIT_UPDATE__INIT;
    su.session = ri->session;
    su.round = ri->round;
    su.digest = h;
    su.tokens = tokens;
    su.train_loss = loss;
    su.has_train_loss = 1;
    Offtune__Session__SessionRequest req = OFFTUNE__SESSION__SESSION_REQUEST__INIT;
    req.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_SUBMIT;
    req.submit = &su;
    uint8_t *reply = NULL;
    size_t len = 0;
    rc = call(r, &req, &reply, &len);
    ot_pb_alloc pa;
    ot_pb_alloc_init(&pa, 1 << 20);
    Offtune__Session__SubmitReply *sr =
        rc == OT_OK ? offtune__session__submit_reply__unpack(&pa.a, len, reply) : NULL;
    if (rc == OT_OK && !sr) rc = ot_error(OT_ERR_FORMAT, "bad SubmitReply");
    if (sr) {
      *accepted = sr->accepted;
      fprintf(stderr, "[run] %s round %u: update %s%s%s\n", ri->session, ri->round,
              sr->accepted ? "accepted" : "refused: ", sr->accepted ? "" : "", sr->reason ? sr->reason : "");
      offtune__session__submit_reply__free_unpacked(sr, &pa.a);
    }
    free(reply);
  }
  return rc;
}

static int save_progress(runner *r, const char *session, unsigned round) {
  char p[4096];
  int rc = state_path(r->state, "progress.json", p, sizeof p);
  cJSON *j = cJSON_CreateObject();
  cJSON_AddStringToObject(j, "session", session);
  cJSON_AddNumberToObject(j, "round", round);
  return rc ? rc : write_json(p, j);
}

int ot_dev_run(int argc, char **argv) {
  runner r = {.state = DEFAULT_STATE, .backend = "cpu", .give_up_s = 600};
  int give_up = 600;
  const ot_opt opts[] = {
      {"data", OT_OPT_STR, &r.data, "FILE",
       "private training text, or supervised examples in a .jsonl file (docs/data.md); never leaves this "
       "machine; required"},
      {"session", OT_OPT_STR, &r.session, "NAME",
       "take part in this session (default: the cloud's oldest open one)"},
      {"state", OT_OPT_STR, &r.state, "DIR", "this device's state directory (default " DEFAULT_STATE ")"},
      {"backend", OT_OPT_STR, &r.backend, "NAME", "cpu (default) or cuda"},
      {"threads", OT_OPT_INT, &r.threads, "N", "CPU threads (default: all cores)"},
      {"frozen", OT_OPT_STR, &r.frozen, "DTYPE",
       "fp32 (default), bf16 or int8: the emulator's frozen weights kept at a half or a quarter of their "
       "memory (CPU)"},
      {"rounds-max", OT_OPT_INT, &r.rounds_max, "N",
       "stop after N accepted updates (default: until the session ends)"},
      {"give-up", OT_OPT_INT, &give_up, "SECONDS",
       "stop when the cloud is unreachable this long (default 600)"},
      {"dry-run", OT_OPT_FLAG, &r.dry_run, NULL,
       "train the current round, then stop before the upload and say what would be sent"},
      {"json", OT_OPT_FLAG, &r.json, NULL,
       "training progress and summaries as JSON lines on stdout (the records of each round's "
       "work/SESSION/rROUND/local/metrics.jsonl)"},
  };
  const char *syn =
      "offtune-device run --data FILE [--session NAME] [--backend cpu|cuda] [--state DIR] [--rounds-max N]";
  const char *desc =
      "Takes part in the cloud's tuning session round by round: fetch the emulator (once, cached\n"
      "by digest) and the round's adapter, train it locally on --data, upload the adapter, wait for\n"
      "the next round. Resumes after a crash or a lost connection. Exits when the session ends.";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && !r.data) rc = ot_error(OT_ERR_INVALID, "--data FILE is required");
  if (rc == OT_OK) rc = ot_dev_parse_frozen(r.frozen ? r.frozen : "fp32", &r.frozen_kind);
  if (rc == OT_OK && (r.rounds_max < 0 || give_up < 1))
    rc = ot_error(OT_ERR_INVALID, "--rounds-max >= 0, --give-up >= 1");
  if (rc) {
    fprintf(stderr, "offtune-device run: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  r.give_up_s = give_up;
  signal(SIGPIPE, SIG_IGN);
  if (!ot_file_exists(r.data))
    return ot_dev_fail("reading the data", ot_error(OT_ERR_NOTFOUND, "%s: no such file", r.data));
  rc = load_identity(r.state, 0, &r.id);
  if (rc == OT_OK) rc = load_cloud(r.state, &r.ci);
  if (rc) return ot_dev_fail("loading the device state", rc);
  char fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(r.id.pk, fp);
  fprintf(stderr, "[run] device %s (%s), cloud %s\n", fp, r.ci.name, r.ci.url);
  double last_ok = ot_now();
  int accepted_n = 0, backoff = 200, exit_code = OT_EXIT_OK;
  unsigned last_wait_round = (unsigned)-1;
  char session_buf[64];
  int said_none = 0;
  for (;;) {
    rc = ensure_client(&r);
    Offtune__Session__RoundInfo *ri = NULL;
    ot_pb_alloc pa;
    ot_pb_alloc_init(&pa, 4 << 20);
    uint8_t *reply = NULL;
    size_t len = 0;
    if (rc == OT_OK) {
      Offtune__Session__Poll p = OFFTUNE__SESSION__POLL__INIT;
      p.session = (char *)r.session;
      p.device_name = r.ci.name;
      Offtune__Session__SessionRequest req = OFFTUNE__SESSION__SESSION_REQUEST__INIT;
      req.kind_case = OFFTUNE__SESSION__SESSION_REQUEST__KIND_POLL;
      req.poll = &p;
      rc = call(&r, &req, &reply, &len);
    }
    if (rc == OT_OK && !(ri = offtune__session__round_info__unpack(&pa.a, len, reply)))
      rc = ot_error(OT_ERR_FORMAT, "bad RoundInfo");
    free(reply);
    int wait_ms = 1000, stop = 0;
    if (rc == OT_OK) {
      last_ok = ot_now();
      backoff = 200;
      /* once in a session, stay with it until it ends */
      if (!r.session && ri->session && *ri->session && ri->state != OFFTUNE__SESSION__ROUND_STATE__NONE) {
        snprintf(session_buf, sizeof session_buf, "%s", ri->session);
        r.session = session_buf;
      }
      wait_ms = ri->has_retry_after_ms && ri->retry_after_ms >= 50 && ri->retry_after_ms <= 60000
                    ? (int)ri->retry_after_ms
                    : 1000;
      switch (ri->state) {
      case OFFTUNE__SESSION__ROUND_STATE__TRAIN: {
        int accepted = 0;
        fprintf(stderr, "[run] %s round %u of %u: training\n", ri->session, ri->round, ri->rounds);
        rc = do_round(&r, ri, &accepted);
        if (rc == OT_OK && accepted < 0) { /* --dry-run */
          stop = 1;
          break;
        }
        if (rc == OT_OK && accepted) {
          accepted_n++;
          save_progress(&r, ri->session, ri->round);
          if (r.rounds_max && accepted_n >= r.rounds_max) {
            fprintf(stderr, "[run] %d update(s) accepted: --rounds-max reached\n", accepted_n);
            stop = 1;
          }
        }
        wait_ms = 100;
        break;
      }
      case OFFTUNE__SESSION__ROUND_STATE__SECAGG: {
        char work[4096];
        uint32_t answered = 0;
        if (!ri->session || strchr(ri->session, '/') || strchr(ri->session, '.')) {
          rc = ot_error(OT_ERR_FORMAT, "bad session name");
          break;
        }
        snprintf(work, sizeof work, "%s/work/%s/r%u", r.state, ri->session, ri->round);
        rc = ot_dev_secagg_step(&r.sa, &r.id, r.c, work, ri, &answered);
        if (rc == OT_OK && answered == OT_SA_MASKED) { /* this device's update is in the round */
          accepted_n++;
          save_progress(&r, ri->session, ri->round);
          /* leaving now is a dropout the unmask stage recovers: the update stays in the sum */
          if (r.rounds_max && accepted_n >= r.rounds_max) {
            fprintf(stderr, "[run] %d update(s) in: --rounds-max reached\n", accepted_n);
            stop = 1;
          }
        }
        /* tests: a device that dies right after a stage (the cloud must go on without it) */
        const char *exit_after = getenv("OT_TEST_DEVICE_EXIT_AFTER_STAGE");
        if (rc == OT_OK && answered && exit_after && (uint32_t)atoi(exit_after) == answered) {
          fprintf(stderr, "[run] OT_TEST_DEVICE_EXIT_AFTER_STAGE: exiting after stage %u\n", answered);
          _exit(9);
        }
        break;
      }
      case OFFTUNE__SESSION__ROUND_STATE__WAIT:
        if (ri->round != last_wait_round)
          fprintf(stderr, "[run] %s round %u: %s\n", ri->session ? ri->session : "?", ri->round,
                  ri->detail ? ri->detail : "waiting");
        last_wait_round = ri->round;
        break;
      case OFFTUNE__SESSION__ROUND_STATE__DONE:
        printf("session %s finished after %u rounds: %s; this device sent %d update(s)\n", ri->session,
               ri->rounds, ri->detail ? ri->detail : "", accepted_n);
        stop = 1;
        break;
      case OFFTUNE__SESSION__ROUND_STATE__FAILED:
        fprintf(stderr, "[run] session %s failed on the cloud\n", ri->session ? ri->session : "?");
        stop = 1;
        exit_code = OT_EXIT_FAIL;
        break;
      default: /* NONE: no session (yet) */
        if (!said_none)
          fprintf(stderr, "[run] %s; waiting for the operator to create it\n",
                  ri->detail ? ri->detail : "no session");
        said_none = 1;
        break;
      }
    }
    if (ri) offtune__session__round_info__free_unpacked(ri, &pa.a);
    if (stop) break;
    if (rc && !r.c && rc != OT_ERR_IO) {
      /* the handshake was refused (revoked, unknown device, wrong cloud key): retrying cannot help */
      exit_code = ot_dev_fail("connecting to the cloud", rc);
      break;
    }
    if (rc) {
      /* a lost connection, a restarted cloud, a fetch cut short: start over from the poll */
      fprintf(stderr, "[run] %s; retrying in %d ms\n", ot_error_detail(), backoff);
      drop_client(&r);
      if (ot_now() - last_ok > r.give_up_s) {
        exit_code = ot_dev_fail("reaching the cloud", rc);
        break;
      }
      wait_ms = backoff;
      backoff = backoff < 4000 ? backoff * 2 : 5000;
    }
    sleep_ms(wait_ms);
  }
  drop_client(&r);
  ot_dev_secagg_free(r.sa);
  ot_identity_wipe(&r.id);
  return exit_code;
}
