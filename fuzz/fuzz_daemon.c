#include "fuzz_daemon.h"

#include "ot_cloud_cmd.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_round_secagg.h"
#include "ot_safetensors.h"

#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ot_cloud_main.c holds main(), which libFuzzer must provide: its helpers are stood in for here.
 * None of them is reached from the request handlers the harnesses drive. */
int ot_cmd_fail(const char *what, int status) {
  fprintf(stderr, "offtune-cloud (fuzz): %s: %s\n", what, ot_error_detail());
  return status ? OT_EXIT_FAIL : OT_EXIT_OK;
}
int ot_cmd_load_model(const char *dir, const char *backend, int threads, ot_backend **be, ot_model **m,
                      ot_tokenizer **tok) {
  (void)backend, (void)threads, (void)be, (void)m, (void)tok;
  return ot_error(OT_ERR_UNSUPPORTED, "%s: no models in the fuzz harness", dir);
}
void ot_cmd_npm_dir(char *dir, size_t n) { snprintf(dir, n, "third_party/npm/node_modules"); }

static char root[256];
static char model_dir[600], model_digest[OT_DIGEST_HEX], emu_dir[600], emu_digest[OT_DIGEST_HEX];
static char staged[2600], update_src[600];

static void die(const char *what) {
  fprintf(stderr, "fuzz_daemon: %s: %s\n", what, ot_error_detail());
  abort();
}

static void put_file(const char *path, const void *d, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f || (n && fwrite(d, 1, n, f) != n) || fclose(f)) die(path);
}

static void copy_file(const char *from, const char *to) {
  char *t = NULL;
  size_t n = 0;
  if (ot_file_read_all(from, 1 << 20, &t, &n)) die(from);
  put_file(to, t, n);
  free(t);
}

/* A tiny adapter: what ot_agg_validate compares an upload against (names, shapes, F32). */
static void write_adapter(const char *path, float v) {
  ot_st_writer *w = NULL;
  float a[8], b[16];
  for (int i = 0; i < 8; i++) a[i] = v + (float)i;
  for (int i = 0; i < 16; i++) b[i] = v - (float)i;
  int64_t sa[1] = {8}, sb[2] = {2, 8};
  if (ot_st_writer_new(&w) || ot_st_writer_add(w, "transformer.h.0.ln_1.weight", OT_DTYPE_F32, 1, sa, a) ||
      ot_st_writer_add(w, "transformer.h.5.mlp.c_proj.weight", OT_DTYPE_F32, 2, sb, b) ||
      ot_st_writer_save(w, path))
    die(path);
  ot_st_writer_free(w);
}

static void rm_root(void) {
  char cmd[400];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
  if (system(cmd) != 0) fprintf(stderr, "fuzz_daemon: could not remove %s\n", root);
}

fz_daemon *fz_daemon_init(void) {
  fz_daemon *f = calloc(1, sizeof *f);
  ot_daemon *d = calloc(1, sizeof *d);
  if (!f || !d || ot_sodium_init()) abort();
  f->d = d;
  pthread_mutex_init(&d->mu, NULL);
  pthread_cond_init(&d->cv, NULL);
  /* tmpfs when there is one: uploads and downloads are files */
  snprintf(root, sizeof root, "%s/ot-fuzz-daemon-XXXXXX",
           access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  if (!mkdtemp(root)) abort();
  atexit(rm_root);
  snprintf(d->state, sizeof d->state, "%s/state", root);
  static const char *subs[] = {"objects/adapters", "objects/updates", "objects/state",
                               "emulators",        "staging",         "tmp"};
  char p[3000];
  for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++) {
    snprintf(p, sizeof p, "%s/%s", d->state, subs[i]);
    if (ot_mkdir_p(p)) die(p);
  }
  /* the model: 6 blocks, so the default sessions (2 bottom, 2 top) fit */
  snprintf(model_dir, sizeof model_dir, "%s/model", root);
  if (ot_mkdir_p(model_dir)) die(model_dir);
  ot_model_config mc = {.n_layer = 6,
                        .n_head = 2,
                        .n_embd = 8,
                        .vocab_size = 16,
                        .n_positions = 32,
                        .layer_norm_epsilon = 1e-5f};
  snprintf(p, sizeof p, "%s/config.json", model_dir);
  if (ot_model_config_save(p, &mc) || ot_file_digest(p, model_digest)) die(p);
  /* an emulator package: its manifest lists the files devices may fetch */
  snprintf(emu_dir, sizeof emu_dir, "%s/emulators/e1", d->state);
  if (ot_mkdir_p(emu_dir)) die(emu_dir);
  char cfg_path[700], digest[OT_DIGEST_HEX], manifest[1024];
  snprintf(cfg_path, sizeof cfg_path, "%s/config.json", emu_dir);
  copy_file(p, cfg_path);
  if (ot_file_digest(cfg_path, digest)) die(cfg_path);
  struct stat sb;
  if (stat(cfg_path, &sb)) abort();
  int n = snprintf(manifest, sizeof manifest,
                   "{\"files\": [{\"file\": \"config.json\", \"size\": %lld, \"digest\": \"%s\"}]}",
                   (long long)sb.st_size, digest);
  snprintf(p, sizeof p, "%s/manifest.json", emu_dir);
  put_file(p, manifest, (size_t)n);
  if (ot_file_digest(p, emu_digest)) die(p);
  /* the round adapter, content-addressed as the daemon stores it */
  char tmp[700], adir[3000];
  snprintf(tmp, sizeof tmp, "%s/adapter_model.safetensors", root);
  write_adapter(tmp, 0.5f);
  if (ot_file_digest(tmp, f->adapter_digest)) die(tmp);
  snprintf(adir, sizeof adir, "%s/objects/adapters/%s", d->state, f->adapter_digest);
  if (ot_mkdir_p(adir)) die(adir);
  snprintf(p, sizeof p, "%s/adapter_model.safetensors", adir);
  copy_file(tmp, p);
  snprintf(p, sizeof p, "%s/adapter_config.json", adir);
  put_file(p, "{\"adapter_type\": \"offsite\"}", 27);
  /* the device's update: same names and shapes, other values */
  snprintf(update_src, sizeof update_src, "%s/update.safetensors", root);
  write_adapter(update_src, 0.25f);
  if (ot_file_digest(update_src, f->update_digest)) die(update_src);
  /* a fixed device key: inputs name it, runs are reproducible */
  uint8_t seed[32] = {7}, sk[64];
  crypto_sign_seed_keypair(f->device_pk, sk, seed);
  char hex[65];
  ot_pubkey_hex(f->device_pk, hex);
  snprintf(staged, sizeof staged, "%s/staging/%.32s.update.s.1", d->state, hex);
  fz_daemon_reset(f);
  return f;
}

static int64_t start_session(fz_daemon *f, ot_session_cfg *c) {
  ot_registry *reg = f->d->reg;
  int64_t id = 0;
  char key[512], dir[1024], digest[OT_DIGEST_HEX];
  if (ot_reg_session_create(reg, c, &id)) die("session");
  ot_session_emu_key(c, key, sizeof key); /* one emulator per model and settings */
  if (ot_reg_emulator_get(reg, model_digest, key, &f->emulator_id, dir, digest) != OT_OK &&
      ot_reg_emulator_put(reg, model_digest, key, emu_dir, emu_digest, &f->emulator_id))
    die("emulator");
  if (ot_reg_session_start(reg, id, f->emulator_id, f->adapter_digest, (int64_t)time(NULL) + 3600))
    die("session start");
  return id;
}

void fz_daemon_reset(fz_daemon *f) {
  ot_daemon *d = f->d;
  ot_reg_close(d->reg);
  d->reg = NULL;
  ot_round_secagg_free(d->sa);
  d->sa = NULL;
  if (ot_reg_open(":memory:", &d->reg) || ot_round_secagg_new(&d->sa)) die("registry");
  ot_registry *reg = d->reg;
  char token[OT_TOKEN_CHARS + 1];
  int enrolled = 0;
  if (ot_reg_model_put(reg, "m", model_dir, model_digest) || ot_reg_token_issue(reg, "fuzz", token) ||
      ot_reg_access_ops.admit(reg, f->device_pk, token, &enrolled) || !enrolled)
    die("registry setup");
  ot_session_cfg c;
  ot_session_cfg_default(&c);
  snprintf(c.name, sizeof c.name, "s");
  snprintf(c.model, sizeof c.model, "m");
  c.seq_len = 32;
  c.distill_seq = 32;
  start_session(f, &c);
  snprintf(c.name, sizeof c.name, "q");
  c.min_devices = c.max_devices = 3;
  c.secagg = OT_SECAGG_ON;
  c.dp_epsilon = 1.0f;
  f->secagg_session = start_session(f, &c);
  copy_file(update_src, staged); /* taken (or refused and removed) by a SubmitUpdate */
  ot_error_clear();
}
