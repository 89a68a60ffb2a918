/* libFuzzer harness: the files an adapter or an emulator package brings, read by the real
 * readers from a directory (the only way they are read).
 *
 * Input: JSON text, NUL, JSON text, NUL, the bytes of adapter_model.safetensors (missing parts
 * are empty). In the JSON, "@BASE@" becomes the base model's digest and "@ST@" the digest of the
 * safetensors bytes, so mutations get past the digest checks to the rest. The first JSON is
 * offtune_adapter.json (or, holding "format_version": 1, a format-1 adapter_config.json) and
 * emulator.json; the second, when not empty, PEFT's adapter_config.json. They are read by
 *   ot_peft_read_kind, ot_peft_apply_full / ot_peft_apply_dir (every kind, the offsite one
 *   included) on a small full model and on its emulator, ot_peft_import, and ot_emu_plan_load.
 * Refused: the model must be exactly as before (the readers promise that). Accepted: the plan
 * must be one ot_emu_plan_make could have made.
 *
 * OT_FUZZ_WRITE_SEEDS=DIR: writes one valid input per adapter kind and an emulator.json to DIR
 * and exits (the seeds in fuzz/corpus/adapter_config/ come from it and fit this model). */
#include "ot_peft.h"
#include "ot_emulator.h"
#include "ot_error.h"
#include "ot_fileio.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static ot_peft_map emap; /* block map of the emulator at hand */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* 4 blocks: bottom 1, top 1, one of the two middle ones kept; tiny so a run stays fast */
static const ot_model_config cfg = {
    .n_layer = 4, .n_head = 2, .n_embd = 8, .vocab_size = 16, .n_positions = 8, .layer_norm_epsilon = 1e-5f};
static const char base_digest[OT_DIGEST_HEX] =
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

static ot_backend *be;
static ot_emu_plan plan;
static ot_model *full, *emu;
static float *ref_full, *ref_emu; /* every parameter of a fresh model, in order */
static char dir[256], cfg_path[300], meta_path[300], st_path[300], emu_path[300], import_dir[300];

static void die(const char *what) {
  fprintf(stderr, "fuzz_adapter_config: %s: %s\n", what, ot_error_detail());
  abort();
}

static size_t numel_all(ot_model *m) {
  size_t n = 0;
  for (int i = 0; i < ot_model_param_count(m); i++) n += ot_model_param(m, i)->numel;
  return n;
}

static float *snapshot(ot_model *m) {
  float *h = malloc(numel_all(m) * sizeof(float)), *p = h;
  if (!h) abort();
  for (int i = 0; i < ot_model_param_count(m); i++) {
    ot_param *pr = ot_model_param(m, i);
    if (be->ops->download(be, p, pr->data, pr->numel * sizeof(float))) abort();
    p += pr->numel;
  }
  return h;
}

/* The full model and its emulator, deterministic; made again after an adapter went in. */
static void make_models(void) {
  ot_model_free(emu);
  ot_model_free(full);
  full = emu = NULL;
  if (ot_model_create(&cfg, be, &full) || ot_model_init_random(full, 1) || ot_emu_build(full, &plan, &emu))
    die("models");
}

static void check_unchanged(ot_model *m, int base_params, const float *ref) {
  if (ot_model_param_count(m) != base_params || ot_model_base_param_count(m) != base_params) abort();
  float *now = snapshot(m);
  if (memcmp(now, ref, numel_all(m) * sizeof(float)) != 0) abort();
  free(now);
}

static void write_file(const char *path, const void *d, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f || (n && fwrite(d, 1, n, f) != n) || fclose(f)) abort();
}

static char *read_file(const char *path, size_t *n) {
  char *t = NULL;
  if (ot_file_read_all(path, 1 << 20, &t, n)) die(path);
  return t;
}

/* s with every `from` replaced by `to` (malloc'd, NUL-terminated) */
static char *replace_all(const char *s, size_t n, const char *from, const char *to) {
  size_t lf = strlen(from), lt = strlen(to), hits = 0;
  for (const char *p = s; (p = memmem(p, n - (size_t)(p - s), from, lf)); p += lf) hits++;
  char *out = malloc(n + hits * lt + 1), *o = out;
  if (!out) abort();
  const char *p = s, *end = s + n;
  for (const char *h; (h = memmem(p, (size_t)(end - p), from, lf)); p = h + lf) {
    memcpy(o, p, (size_t)(h - p));
    o += h - p;
    memcpy(o, to, lt);
    o += lt;
  }
  memcpy(o, p, (size_t)(end - p));
  o[end - p] = '\0';
  return out;
}

static void remove_dir(void) {
  for (int i = 0; ot_peft_files[i]; i++) {
    char p[400];
    snprintf(p, sizeof p, "%s/%s", import_dir, ot_peft_files[i]);
    unlink(p);
  }
  rmdir(import_dir);
  unlink(meta_path);
  unlink(cfg_path);
  unlink(st_path);
  unlink(emu_path);
  rmdir(dir);
}

/* One seed: the saved offtune_adapter.json with its digests as placeholders, NUL, PEFT's
 * adapter_config.json (LoRA), NUL, the tensors. */
static void write_seed(const char *out_dir, const char *name, const char *adir) {
  char p[600], st_hex[OT_DIGEST_HEX];
  size_t jl, pl = 0, sl;
  snprintf(p, sizeof p, "%s/offtune_adapter.json", adir);
  char *json = read_file(p, &jl);
  snprintf(p, sizeof p, "%s/adapter_config.json", adir);
  char *peft = ot_file_exists(p) ? read_file(p, &pl) : NULL;
  snprintf(p, sizeof p, "%s/adapter_model.safetensors", adir);
  char *st = read_file(p, &sl);
  if (ot_file_digest(p, st_hex)) die(p);
  char *a = replace_all(json, jl, st_hex, "@ST@"), *b = replace_all(a, strlen(a), base_digest, "@BASE@");
  size_t bl = strlen(b);
  char *seed = malloc(bl + pl + 2 + sl);
  if (!seed) abort();
  memcpy(seed, b, bl);
  seed[bl] = '\0';
  if (pl) memcpy(seed + bl + 1, peft, pl);
  seed[bl + 1 + pl] = '\0';
  memcpy(seed + bl + pl + 2, st, sl);
  snprintf(p, sizeof p, "%s/%s", out_dir, name);
  write_file(p, seed, bl + pl + 2 + sl);
  free(seed);
  free(a);
  free(b);
  free(json);
  free(peft);
  free(st);
}

static void write_seeds(const char *out_dir) {
  static const struct {
    const char *name;
    ot_peft_kind kind;
  } kinds[] = {{"offsite", OT_PEFT_OFFSITE},
               {"lora", OT_PEFT_LORA},
               {"bottleneck", OT_PEFT_BOTTLENECK},
               {"bitfit", OT_PEFT_BITFIT}};
  char adir[600];
  for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
    ot_peft_config c;
    ot_peft_config_default(&c);
    c.kind = kinds[k].kind;
    c.lora_r = 2;
    c.bottleneck_dim = 2;
    make_models();
    snprintf(adir, sizeof adir, "%s/adapter-%s", dir, kinds[k].name);
    if (ot_peft_attach(emu, ot_emu_peft_map(&plan, &emap), &c) ||
        ot_peft_save(emu, ot_emu_peft_map(&plan, &emap), &c, adir))
      die("saving a seed");
    write_seed(out_dir, kinds[k].name, adir);
  }
  /* emulator.json as ot_emu_save writes it (the package's other files are not needed) */
  make_models();
  snprintf(adir, sizeof adir, "%s/emulator", dir);
  ot_tokenizer *tok = NULL;
  if (ot_tokenizer_byte_new(&tok) || ot_emu_save(emu, &plan, tok, adir)) die("saving the emulator");
  ot_tokenizer_free(tok);
  char p[700], q[700];
  size_t n;
  snprintf(p, sizeof p, "%s/emulator.json", adir);
  char *t = read_file(p, &n), *s = replace_all(t, n, base_digest, "@BASE@");
  snprintf(q, sizeof q, "%s/emulator_json", out_dir);
  write_file(q, s, strlen(s));
  free(s);
  free(t);
  fprintf(stderr, "fuzz_adapter_config: seeds written to %s\n", out_dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  /* tmpfs when there is one: every input is written to files */
  snprintf(dir, sizeof dir, "%s/ot-fuzz-adapter-XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  if (!mkdtemp(dir)) abort();
  snprintf(cfg_path, sizeof cfg_path, "%s/adapter_config.json", dir);
  snprintf(meta_path, sizeof meta_path, "%s/offtune_adapter.json", dir);
  snprintf(import_dir, sizeof import_dir, "%s-import", dir);
  snprintf(st_path, sizeof st_path, "%s/adapter_model.safetensors", dir);
  snprintf(emu_path, sizeof emu_path, "%s/emulator.json", dir);
  atexit(remove_dir);
  if (ot_backend_cpu_create(1, &be) || ot_emu_plan_make(cfg.n_layer, 1, 1, 1, &plan)) die("setup");
  memcpy(plan.base_digest, base_digest, OT_DIGEST_HEX);
  make_models();
  const char *seeds = getenv("OT_FUZZ_WRITE_SEEDS");
  if (seeds && *seeds) {
    write_seeds(seeds);
    exit(0);
  }
  ref_full = snapshot(full);
  ref_emu = snapshot(emu);
  return 0;
}

static void check_plan(const ot_emu_plan *p) {
  int n = ot_emu_n_layer(p);
  if (p->full_layers < 1 || p->full_layers > OT_EMU_MAX_LAYERS || p->bottom < 0 || p->top < 0 ||
      p->keep < 1 || n > p->full_layers)
    abort();
  ot_emu_plan made;
  if (ot_emu_plan_make(p->full_layers, p->bottom, p->top, p->keep, &made) != OT_OK) abort();
  /* the middle ascends inside the middle; the adapter blocks are the model's own */
  for (int i = 0; i < n; i++) {
    if (i < p->bottom && p->src[i] != i) abort();
    if (i >= p->bottom + p->keep && p->src[i] != p->full_layers - n + i) abort();
    if (i >= p->bottom && i < p->bottom + p->keep &&
        (p->src[i] < p->bottom || p->src[i] >= p->full_layers - p->top ||
         (i > p->bottom && p->src[i] <= p->src[i - 1])))
      abort();
  }
  if (strlen(p->base_digest) != 64) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const uint8_t *end = data + size, *parts[3] = {data, end, end};
  size_t len[3] = {size, 0, 0};
  for (int k = 0; k < 2; k++) {
    const uint8_t *nul = memchr(parts[k], '\0', len[k]);
    if (!nul) break;
    len[k] = (size_t)(nul - parts[k]);
    parts[k + 1] = nul + 1;
    len[k + 1] = (size_t)(end - parts[k + 1]);
  }
  char st_hex[OT_DIGEST_HEX];
  write_file(st_path, parts[2], len[2]);
  if (ot_file_digest(st_path, st_hex)) die("digest");
  char *json[2];
  for (int k = 0; k < 2; k++) {
    char *a = replace_all((const char *)parts[k], len[k], "@BASE@", base_digest);
    json[k] = replace_all(a, strlen(a), "@ST@", st_hex);
    free(a);
  }
  int legacy = strstr(json[0], "\"format_version\": 1") != NULL;
  unlink(meta_path);
  unlink(cfg_path);
  write_file(legacy ? cfg_path : meta_path, json[0], strlen(json[0]));
  if (!legacy && json[1][0]) write_file(cfg_path, json[1], strlen(json[1]));
  write_file(emu_path, json[0], strlen(json[0]));
  free(json[0]);
  free(json[1]);

  ot_peft_kind kind;
  if (ot_peft_read_kind(dir, &kind) == OT_OK && (unsigned)kind > OT_PEFT_BITFIT) abort();
  int full_params = ot_model_param_count(full), emu_params = ot_model_param_count(emu), changed = 0;
  if (ot_peft_apply_full(full, base_digest, dir) == OT_OK)
    changed = 1;
  else
    check_unchanged(full, full_params, ref_full);
  if (ot_peft_apply_dir(emu, ot_emu_peft_map(&plan, &emap), dir) == OT_OK)
    changed = 1;
  else
    check_unchanged(emu, emu_params, ref_emu);
  if (changed) make_models();

  /* the PEFT config as a foreign adapter: an import is either refused or loads back */
  if (ot_file_exists(cfg_path) && ot_peft_import(dir, &cfg, base_digest, "fuzz", import_dir, NULL) == OT_OK) {
    if (ot_peft_apply_full(full, base_digest, import_dir) != OT_OK) die("an imported adapter does not load");
    make_models();
  }

  ot_emu_plan p;
  if (ot_emu_plan_load(dir, &p) == OT_OK) check_plan(&p);
  ot_error_clear();
  return 0;
}
