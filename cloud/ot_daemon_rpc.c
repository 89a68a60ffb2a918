/* Device requests (sealed OT_MSG_APP bodies, protocol/session.proto) and uploads, on the
 * transport's worker threads. Everything a device sends is checked before anything is
 * stored; a refusal is logged with its reason and leaves nothing behind. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ot_aggregate.h"
#include "ot_daemon.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_pb.h"
#include "ot_round_secagg.h"
#include "session.pb-c.h"

#define REQ_CAP (64u << 10)

/* "update.<session>.<round>" -> session, round */
static int parse_upload_name(const char *name, char session[OT_NAME_MAX], int *round) {
  if (strncmp(name, "update.", 7) != 0)
    return ot_error(OT_ERR_INVALID, "upload '%s': not update.<session>.<round>", name);
  const char *s = name + 7, *dot = strrchr(s, '.');
  if (!dot || dot == s || (size_t)(dot - s) >= OT_NAME_MAX)
    return ot_error(OT_ERR_INVALID, "upload '%s': not update.<session>.<round>", name);
  memcpy(session, s, (size_t)(dot - s));
  session[dot - s] = '\0';
  char *end = NULL;
  long r = strtol(dot + 1, &end, 10);
  if (!ot_name_ok(session) || !end || *end || r < 1 || r > 1000000)
    return ot_error(OT_ERR_INVALID, "upload '%s': not update.<session>.<round>", name);
  *round = (int)r;
  return OT_OK;
}

static int staged_path(ot_daemon *d, const uint8_t peer[32], const char *session, int round, char *out,
                       size_t n) {
  char hex[65];
  ot_pubkey_hex(peer, hex);
  return ot_daemon_path(d, out, n, "staging/%.32s.update.%s.%d", hex, session, round);
}

static int file_size(const char *path, uint64_t *size) {
  struct stat sb;
  if (stat(path, &sb) != 0) return ot_error(OT_ERR_NOTFOUND, "%s: %s", path, strerror(errno));
  *size = (uint64_t)sb.st_size;
  return OT_OK;
}

/* The session's round `round` is open for uploads from this device. */
static int round_open_for(ot_daemon *d, int64_t dev, const char *session, int round, ot_session_row *s) {
  int rc = ot_reg_session_get(d->reg, session, s);
  if (rc) return rc;
  if (s->state != OT_SS_RUNNING)
    return ot_error(OT_ERR_MISMATCH, "session '%s' is %s", session, ot_session_state_name(s->state));
  /* a device sending for a round that closed is a straggler: the round's record counts it */
  if ((round < s->round || (round == s->round && s->round_state != OT_RS_OPEN)) && round >= 1)
    ot_reg_round_event(d->reg, s->id, round, dev, "late", NAN);
  if (round != s->round)
    return ot_error(OT_ERR_MISMATCH, "stale round %d (session '%s' is in round %d)", round, session,
                    s->round);
  if (s->round_state != OT_RS_OPEN) return ot_error(OT_ERR_MISMATCH, "round %d is closed", round);
  /* a plain update would leave the cloud holding one device's update in the clear, which a
   * secure-aggregation session promises it never does (docs/secagg.md); found by fuzz_messages */
  if (ot_session_secagg(&s->cfg))
    return ot_error(OT_ERR_MISMATCH, "session '%s' uses secure aggregation: no plain updates", session);
  int exists = 0;
  rc = ot_reg_update_exists(d->reg, s->id, round, dev, &exists, NULL);
  if (rc == OT_OK && exists)
    rc = ot_error(OT_ERR_MISMATCH, "duplicate: this device already has an update in round %d", round);
  return rc;
}

static ot_round_secagg *secagg_of(ot_daemon *d) {
  pthread_mutex_lock(&d->mu);
  ot_round_secagg *t = d->sa;
  pthread_mutex_unlock(&d->mu);
  return t;
}

/* A secure-aggregation round lives in the memory of the daemon leading its session: on a
 * registry shared by several daemons, a daemon refuses the round's polls and messages while
 * another holds the session's lease,
 * so that the device reconnects (through a TCP balancer, to another daemon) until it reaches
 * the leader, instead of joining a masking table that no scheduler here drives. */
static int secagg_here(ot_daemon *d, const ot_session_row *s) {
  if (!d->shared) return OT_OK; /* one daemon: it leads all its sessions */
  char owner[sizeof d->node];
  int rc = ot_reg_lease_owner(d->reg, s->id, owner, sizeof owner);
  /* no live lease (a leader just gone, or this daemon's own renewal late): served here, so
   * that a late renewal never refuses the leader's own devices mid-masking; once another
   * daemon holds the lease, the next poll sends the device on */
  if (rc == OT_OK && owner[0] && strcmp(owner, d->node) != 0) {
    ot_daemon_log(d, "secure aggregation of '%s' is led by %s: sending its device away", s->cfg.name, owner);
    rc = ot_error(OT_ERR_MISMATCH,
                  "session '%s': secure aggregation runs on the daemon that leads the session, not on this "
                  "one; reconnect",
                  s->cfg.name);
  }
  return rc;
}

/* Logs and audits a refused upload; returns rc with its detail kept for the device. */
static int refuse_upload(ot_daemon *d, int rc, const char *fp, const char *event, const char *name) {
  char why[600];
  snprintf(why, sizeof why, "%s", ot_error_detail());
  ot_daemon_log(d, "refused upload '%s' from %s: %s", name, fp, why);
  ot_reg_audit(d->reg, fp, event, "%s: %s", name, why);
  return ot_error(rc, "%s", why);
}

/* "secagg.<session>.<round>": a masked input (a signed SecAggMsg), staged until the
 * SecAggSubmit that names it; it is never stored as an object. */
static int secagg_staged(ot_daemon *d, const uint8_t peer[32], const char *session, int round, char *out,
                         size_t n) {
  char hex[65];
  ot_pubkey_hex(peer, hex);
  return ot_daemon_path(d, out, n, "staging/%.32s.secagg.%s.%d", hex, session, round);
}

static int secagg_transfer_open(ot_daemon *d, const uint8_t peer[32], const char *fp, const char *name,
                                uint64_t size, ot_sink *sink) {
  char session[OT_NAME_MAX], staged[2600], alias[300];
  int round = 0;
  int64_t dev = 0;
  ot_session_row s;
  uint64_t limit = 0;
  ot_round_secagg *t = secagg_of(d);
  snprintf(alias, sizeof alias, "update.%s", name + 7);
  int rc = t ? parse_upload_name(alias, session, &round) : ot_error(OT_ERR_MISMATCH, "not ready");
  if (rc == OT_OK) rc = ot_reg_device_id(d->reg, peer, &dev);
  if (rc == OT_OK) rc = ot_reg_session_get(d->reg, session, &s);
  if (rc == OT_OK) rc = secagg_here(d, &s);
  if (rc == OT_OK) rc = ot_sa_upload_limit(t, &s, peer, round, &limit);
  if (rc == OT_OK && size > limit)
    rc = ot_error(OT_ERR_RANGE, "oversized masked input: %llu bytes, the limit is %llu",
                  (unsigned long long)size, (unsigned long long)limit);
  if (rc == OT_OK) rc = secagg_staged(d, peer, session, round, staged, sizeof staged);
  if (rc == OT_OK) rc = ot_file_sink_open(staged, sink);
  return rc ? refuse_upload(d, rc, fp, "secagg.refused", name) : OT_OK;
}

int ot_daemon_on_transfer_open(void *user, const uint8_t peer[32], const char *name, uint64_t size,
                               ot_sink *sink) {
  ot_daemon *d = user;
  char session[OT_NAME_MAX], ref[2600], staged[2600], fp[OT_FINGERPRINT_LEN];
  int round = 0;
  int64_t dev = 0;
  ot_session_row s;
  uint64_t ref_size = 0;
  ot_fingerprint(peer, fp);
  if (strncmp(name, "secagg.", 7) == 0) return secagg_transfer_open(d, peer, fp, name, size, sink);
  int rc = parse_upload_name(name, session, &round);
  if (rc == OT_OK) rc = ot_reg_device_id(d->reg, peer, &dev);
  if (rc == OT_OK) rc = round_open_for(d, dev, session, round, &s);
  if (rc == OT_OK)
    rc = ot_daemon_obj_path(d, ref, sizeof ref, "objects/adapters/%s/adapter_model.safetensors", s.adapter);
  if (rc == OT_OK) rc = file_size(ref, &ref_size);
  if (rc == OT_OK && size > ot_daemon_upload_limit(ref_size))
    rc = ot_error(OT_ERR_RANGE, "oversized upload: %llu bytes, the limit is %llu", (unsigned long long)size,
                  (unsigned long long)ot_daemon_upload_limit(ref_size));
  if (rc == OT_OK) rc = staged_path(d, peer, session, round, staged, sizeof staged);
  if (rc == OT_OK) rc = ot_file_sink_open(staged, sink);
  return rc ? refuse_upload(d, rc, fp, "update.refused", name) : OT_OK;
}

void ot_daemon_on_transfer_end(void *user, const uint8_t peer[32], const char *name, int committed,
                               ot_sink *sink) {
  (void)sink;
  ot_daemon *d = user;
  char fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(peer, fp);
  ot_daemon_log(d, "upload '%s' from %s %s", name, fp, committed ? "received (digest verified)" : "dropped");
}

/* ---- Poll -> RoundInfo --------------------------------------------------------------- */

static char *dup_str(const char *s) { return strdup(s ? s : ""); }

typedef struct {
  Offtune__Session__FileRef refs[32];
  Offtune__Session__FileRef *ptrs[32];
  int n;
} file_list;

static int add_file(file_list *l, const char *name, const char *file, uint64_t size, const char *digest) {
  if (l->n == 32) return ot_error(OT_ERR_RANGE, "too many files");
  Offtune__Session__FileRef *f = &l->refs[l->n];
  offtune__session__file_ref__init(f);
  f->name = dup_str(name);
  f->file = dup_str(file);
  f->size = size;
  f->digest = dup_str(digest);
  l->ptrs[l->n++] = f;
  return f->name && f->file && f->digest ? OT_OK : ot_error(OT_ERR_NOMEM, "cannot allocate");
}

static void free_files(file_list *l) {
  for (int i = 0; i < l->n; i++) {
    free(l->refs[i].name);
    free(l->refs[i].file);
    free(l->refs[i].digest);
  }
}

static int emulator_files(ot_daemon *d, int64_t emu_id, file_list *l, char digest[OT_DIGEST_HEX]) {
  char dir[1024], *mp = NULL, *text = NULL;
  size_t len;
  int rc = ot_reg_emulator_dir(d->reg, emu_id, dir, digest);
  if (rc == OT_OK) rc = ot_path_join(dir, "manifest.json", &mp);
  if (rc == OT_OK) rc = ot_file_read_all(mp, 1 << 20, &text, &len);
  cJSON *j = rc == OT_OK ? cJSON_Parse(text) : NULL;
  const cJSON *f;
  cJSON_ArrayForEach(f, cJSON_GetObjectItemCaseSensitive(j, "files")) {
    const char *file = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(f, "file"));
    const char *h = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(f, "digest"));
    double size = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(f, "size"));
    char name[256];
    snprintf(name, sizeof name, "emulator.%lld.%s", (long long)emu_id, file ? file : "");
    if (rc == OT_OK)
      rc = file && h ? add_file(l, name, file, (uint64_t)size, h) : ot_error(OT_ERR_FORMAT, "%s", mp);
  }
  if (rc == OT_OK && !j) rc = ot_error(OT_ERR_FORMAT, "%s is not JSON", mp);
  cJSON_Delete(j);
  free(text);
  free(mp);
  return rc;
}

static int adapter_files(ot_daemon *d, const char *adapter, file_list *l) {
  int rc = OT_OK;
  for (int i = 0; ot_peft_files[i] && rc == OT_OK; i++) {
    char p[2600], h[OT_DIGEST_HEX], name[256];
    uint64_t size = 0;
    rc = ot_daemon_obj_path(d, p, sizeof p, "objects/adapters/%s/%s", adapter, ot_peft_files[i]);
    if (rc == OT_OK && !ot_file_exists(p)) continue; /* PEFT's config: LoRA only */
    if (rc == OT_OK) rc = file_size(p, &size);
    if (rc == OT_OK) rc = ot_file_digest(p, h);
    snprintf(name, sizeof name, "adapter.%s.%s", adapter, ot_peft_files[i]);
    if (rc == OT_OK) rc = add_file(l, name, ot_peft_files[i], size, h);
  }
  return rc;
}

/* A device's self-chosen name is shown to the operator: printable ASCII only, < 64. */
static int printable_name(const char *s) {
  size_t n = s ? strlen(s) : 0;
  if (n < 1 || n >= 64) return 0;
  for (size_t i = 0; i < n; i++)
    if (s[i] < 0x20 || s[i] > 0x7e) return 0;
  return 1;
}

static int poll(ot_daemon *d, const uint8_t peer[32], int64_t dev, const Offtune__Session__Poll *p,
                uint8_t **out, size_t *out_len) {
  if (printable_name(p->device_name)) ot_reg_device_set_name(d->reg, dev, p->device_name);
  Offtune__Session__RoundInfo ri = OFFTUNE__SESSION__ROUND_INFO__INIT;
  Offtune__Session__AdapterSettings as = OFFTUNE__SESSION__ADAPTER_SETTINGS__INIT;
  Offtune__Session__TrainSettings ts = OFFTUNE__SESSION__TRAIN_SETTINGS__INIT;
  file_list ef = {0}, af = {0};
  ot_sa_poll_hold sa;
  memset(&sa, 0, sizeof sa);
  char emu_digest[OT_DIGEST_HEX] = "", detail[256] = "";
  ot_session_row s;
  int rc = ot_reg_session_get(d->reg, p->session, &s);
  ri.retry_after_ms = 1000;
  ri.has_retry_after_ms = 1;
  if (rc == OT_ERR_NOTFOUND) {
    ri.state = OFFTUNE__SESSION__ROUND_STATE__NONE;
    snprintf(detail, sizeof detail, "%s", ot_error_detail());
    rc = OT_OK;
  } else if (rc == OT_OK) {
    ri.session = s.cfg.name;
    ri.round = (uint32_t)s.round;
    ri.has_round = 1;
    ri.rounds = (uint32_t)s.cfg.rounds;
    ri.has_rounds = 1;
    int exists = 0;
    if (s.state == OT_SS_RUNNING && s.round_state == OT_RS_OPEN)
      rc = ot_reg_update_exists(d->reg, s.id, s.round, dev, &exists, NULL);
    if (s.state == OT_SS_DONE) {
      ri.state = OFFTUNE__SESSION__ROUND_STATE__DONE;
      snprintf(detail, sizeof detail, "adapter '%s' published", s.cfg.name);
    } else if (s.state == OT_SS_FAILED) {
      ri.state = OFFTUNE__SESSION__ROUND_STATE__FAILED;
    } else if (s.state == OT_SS_PREPARING) {
      ri.state = OFFTUNE__SESSION__ROUND_STATE__WAIT;
      snprintf(detail, sizeof detail, "the cloud is preparing the emulator");
    } else if (s.round_state != OT_RS_OPEN || exists) {
      ri.state = OFFTUNE__SESSION__ROUND_STATE__WAIT;
      ri.retry_after_ms = 300;
      snprintf(detail, sizeof detail, "%s",
               exists ? "update received; waiting for the round to end" : "aggregating");
    } else {
      ri.state = OFFTUNE__SESSION__ROUND_STATE__TRAIN;
      ot_sa_poll_kind sk = OT_SA_POLL_TRAIN;
      ot_round_secagg *t = secagg_of(d);
      int sa_on = ot_session_secagg(&s.cfg);
      if (sa_on && rc == OT_OK) rc = secagg_here(d, &s);
      if (sa_on && !t)
        sk = OT_SA_POLL_WAIT;
      else if (sa_on && rc == OT_OK)
        rc = ot_sa_poll(t, &s, peer, &sk, &sa, detail, sizeof detail);
      if (sa_on) ri.secagg = &sa.info; /* stage 0 with TRAIN: join after training */
      if (sk == OT_SA_POLL_WAIT) {
        ri.state = OFFTUNE__SESSION__ROUND_STATE__WAIT;
        ri.retry_after_ms = 300;
        ri.secagg = NULL;
      } else if (sk == OT_SA_POLL_SECAGG) {
        ri.state = OFFTUNE__SESSION__ROUND_STATE__SECAGG;
        ri.retry_after_ms = 200;
      }
    }
    if (ri.state == OFFTUNE__SESSION__ROUND_STATE__TRAIN) {
      const ot_session_cfg *c = &s.cfg;
      if (rc == OT_OK) rc = emulator_files(d, s.emulator_id, &ef, emu_digest);
      if (rc == OT_OK) rc = adapter_files(d, s.adapter, &af);
      ri.emulator_digest = emu_digest;
      ri.n_emulator_files = (size_t)ef.n;
      ri.emulator_files = ef.ptrs;
      ri.n_adapter_files = (size_t)af.n;
      ri.adapter_files = af.ptrs;
      as.kind = (char *)ot_peft_kind_name(c->adapter.kind);
      as.lora_r = (uint32_t)c->adapter.lora_r, as.has_lora_r = 1;
      as.lora_alpha = c->adapter.lora_alpha, as.has_lora_alpha = 1;
      as.lora_dropout = c->adapter.lora_dropout, as.has_lora_dropout = 1;
      as.lora_sites = c->adapter.lora_sites, as.has_lora_sites = 1;
      as.bottleneck_dim = (uint32_t)c->adapter.bottleneck_dim, as.has_bottleneck_dim = 1;
      as.seed = c->adapter.seed, as.has_seed = 1;
      as.lora_rslora = c->adapter.lora_rslora != 0, as.has_lora_rslora = 1;
      ri.adapter = &as;
      ts.steps = (uint32_t)c->steps;
      ts.batch = (uint32_t)c->batch;
      ts.seq_len = (uint32_t)c->seq_len;
      ts.lr = c->lr;
      ts.prox_mu = c->agg == OT_AGG_FEDPROX ? c->mu : 0.0f;
      ts.has_prox_mu = 1;
      ts.middle_noise = c->middle_noise;
      ts.has_middle_noise = 1;
      ts.average_last = (uint32_t)c->average_last;
      ts.has_average_last = 1;
      ri.train = &ts;
      ri.deadline = (uint64_t)s.deadline;
      ri.has_deadline = 1;
    }
  }
  ri.detail = detail;
  if (rc == OT_OK && ot_pb_pack(&ri.base, out, out_len) != 0) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  free_files(&ef);
  free_files(&af);
  ot_sa_poll_clear(&sa);
  return rc;
}

/* ---- SubmitUpdate -> SubmitReply ---------------------------------------------------- */

/* The device's update of u's round is stored, and it is the one u names. s: the session as
 * round_open_for read it (id 0: it could not, read here). */
static int already_stored(ot_daemon *d, int64_t dev, const Offtune__Session__SubmitUpdate *u,
                          ot_session_row *s) {
  char had[OT_DIGEST_HEX];
  int exists = 0;
  return (s->id != 0 || ot_reg_session_get(d->reg, u->session, s) == OT_OK) &&
         ot_reg_update_exists(d->reg, s->id, (int)u->round, dev, &exists, had) == OT_OK && exists &&
         u->digest && strcmp(had, u->digest) == 0;
}

static int submit_once(ot_daemon *d, const uint8_t peer[32], int64_t dev,
                       const Offtune__Session__SubmitUpdate *u, int *repeat) {
  char staged[2600], ref[2600], h[OT_DIGEST_HEX];
  ot_session_row s;
  memset(&s, 0, sizeof s);
  uint64_t ref_size = 0;
  int rc = ot_name_ok(u->session) ? OT_OK : ot_error(OT_ERR_INVALID, "bad session name");
  int have_staged = 0;
  if (rc == OT_OK) rc = staged_path(d, peer, u->session, (int)u->round, staged, sizeof staged);
  int named = rc == OT_OK;
  if (rc == OT_OK) have_staged = ot_file_exists(staged);
  if (rc == OT_OK) rc = round_open_for(d, dev, u->session, (int)u->round, &s);
  if (rc == OT_OK && !have_staged)
    rc = ot_error(OT_ERR_NOTFOUND, "no upload update.%s.%u", u->session, u->round);
  /* the same submission again (a client retries with a new sequence number when a reply is
   * late, and the first may have been stored meanwhile): answered as the first was */
  if (rc != OT_OK && named && already_stored(d, dev, u, &s)) {
    if (have_staged) unlink(staged);
    *repeat = 1;
    return OT_OK;
  }
  /* tokens weigh the average: more than the session's local steps can see is a lie */
  uint64_t max_tokens = (uint64_t)s.cfg.steps * (uint64_t)s.cfg.batch * (uint64_t)s.cfg.seq_len;
  if (rc == OT_OK && (u->tokens == 0 || u->tokens > max_tokens))
    rc = ot_error(OT_ERR_RANGE, "claims %llu tokens; a round trains at most %llu",
                  (unsigned long long)u->tokens, (unsigned long long)max_tokens);
  if (rc == OT_OK) rc = ot_file_digest(staged, h);
  if (rc == OT_OK && strcmp(h, u->digest) != 0)
    rc = ot_error(OT_ERR_MISMATCH, "the upload's digest is not the one submitted");
  if (rc == OT_OK)
    rc = ot_daemon_obj_path(d, ref, sizeof ref, "objects/adapters/%s/adapter_model.safetensors", s.adapter);
  if (rc == OT_OK) rc = file_size(ref, &ref_size);
  /* over the bound: refused here, so the device hears of it (fedavg-clip clips instead) */
  double bound = s.cfg.agg == OT_AGG_CLIP ? 0 : s.cfg.max_update_norm;
  if (rc == OT_OK) rc = ot_agg_validate(staged, ref, ot_daemon_upload_limit(ref_size), bound);
  char digest[OT_DIGEST_HEX];
  /* the file is in objects/ (fsync'd) before the row that names it commits */
  if (rc == OT_OK) rc = ot_daemon_object_put(d, "updates", staged, digest);
  if (rc == OT_OK) {
    have_staged = 0;
    /* no loss reported: NaN, stored as NULL (not in the round's mean) */
    rc = ot_reg_update_add(d->reg, s.id, (int)u->round, dev, u->tokens,
                           u->has_train_loss && isfinite(u->train_loss) ? u->train_loss : NAN, digest);
  }
  if (have_staged) unlink(staged); /* refused: nothing of it stays */
  return rc;
}

/* One submission per device at a time: a retry waits for the request it repeats. */
static int submit(ot_daemon *d, const uint8_t peer[32], int64_t dev, const Offtune__Session__SubmitUpdate *u,
                  int *repeat) {
  *repeat = 0;
  pthread_mutex_lock(&d->mu);
  for (;;) {
    int busy = d->n_submitting == (int)(sizeof d->submitting / sizeof d->submitting[0]);
    for (int i = 0; i < d->n_submitting && !busy; i++) busy = d->submitting[i] == dev;
    if (!busy) break;
    pthread_cond_wait(&d->submit_cv, &d->mu);
  }
  d->submitting[d->n_submitting++] = dev;
  pthread_mutex_unlock(&d->mu);
  int rc = submit_once(d, peer, dev, u, repeat);
  pthread_mutex_lock(&d->mu);
  for (int i = 0; i < d->n_submitting; i++)
    if (d->submitting[i] == dev) {
      d->submitting[i] = d->submitting[--d->n_submitting];
      break;
    }
  pthread_cond_broadcast(&d->submit_cv);
  pthread_mutex_unlock(&d->mu);
  return rc;
}

/* ---- secure aggregation: SecAggJoin / SecAggSubmit -> SubmitReply ------------------- */

static int secagg_request(ot_daemon *d, const uint8_t peer[32], const char *fp, int64_t dev,
                          const Offtune__Session__SessionRequest *req, uint8_t **reply, size_t *reply_len) {
  int join = req->kind_case == OFFTUNE__SESSION__SESSION_REQUEST__KIND_SECAGG_JOIN;
  const char *session = join ? req->secagg_join->session : req->secagg_submit->session;
  int round = (int)(join ? req->secagg_join->round : req->secagg_submit->round);
  ot_round_secagg *t = secagg_of(d);
  ot_session_row s;
  char staged[2600] = "";
  int rc = t && ot_name_ok(session) ? OT_OK : ot_error(OT_ERR_INVALID, "bad session name");
  if (rc == OT_OK) rc = ot_reg_session_get(d->reg, session, &s);
  if (rc == OT_OK && !ot_session_secagg(&s.cfg))
    rc = ot_error(OT_ERR_MISMATCH, "session '%s' does not use secure aggregation", session);
  if (rc == OT_OK) rc = secagg_here(d, &s);
  if (rc == OT_OK && join) {
    rc = ot_sa_join(t, &s, dev, peer, round);
    const Offtune__Session__SecAggJoin *jn = req->secagg_join;
    /* the reported loss is for the operator's curves: not recording it refuses nothing */
    if (rc == OT_OK && jn->has_train_loss && isfinite(jn->train_loss) &&
        ot_reg_round_event(d->reg, s.id, round, dev, "loss", jn->train_loss) != OT_OK)
      ot_daemon_log(d, "%s round %d: the loss %s reported was not recorded: %s", session, round, fp,
                    ot_error_detail());
  } else if (rc == OT_OK) {
    const Offtune__Session__SecAggSubmit *u = req->secagg_submit;
    char *buf = NULL;
    size_t len = 0;
    if (u->has_via_transfer && u->via_transfer) {
      uint64_t limit = 0;
      rc = secagg_staged(d, peer, session, round, staged, sizeof staged);
      if (rc == OT_OK) rc = ot_sa_upload_limit(t, &s, peer, round, &limit);
      if (rc == OT_OK) rc = ot_file_read_all(staged, (size_t)limit, &buf, &len);
      if (rc == OT_OK) rc = ot_sa_submit(t, &s, peer, round, u->round_id, (const uint8_t *)buf, len);
      free(buf);
    } else {
      rc = u->has_msg ? ot_sa_submit(t, &s, peer, round, u->round_id, u->msg.data, u->msg.len)
                      : ot_error(OT_ERR_FORMAT, "SecAggSubmit without a message");
    }
  }
  if (staged[0]) unlink(staged); /* a masked input is added to the running sum and not kept */
  Offtune__Session__SubmitReply sr = OFFTUNE__SESSION__SUBMIT_REPLY__INIT;
  char why[600] = "";
  sr.accepted = rc == OT_OK;
  if (rc) {
    snprintf(why, sizeof why, "%s", ot_error_detail());
    sr.reason = why;
    ot_daemon_log(d, "refused the secure-aggregation %s of %s for %s round %d: %s", join ? "join" : "message",
                  fp, session, round, why);
    ot_reg_audit(d->reg, fp, "secagg.refused", "%s round %d: %s", session, round, why);
  } else {
    if (join) ot_reg_audit(d->reg, fp, "secagg.join", "%s round %d", session, round);
    ot_daemon_kick(d);
  }
  return ot_pb_pack(&sr.base, reply, reply_len) ? ot_error(OT_ERR_NOMEM, "cannot allocate") : OT_OK;
}

int ot_daemon_on_request(void *user, const uint8_t peer[32], const uint8_t *body, size_t len, uint8_t **reply,
                         size_t *reply_len) {
  ot_daemon *d = user;
  char fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(peer, fp);
  if (len > REQ_CAP) return ot_error(OT_ERR_RANGE, "request of %zu bytes", len);
  ot_pb_alloc pa;
  ot_pb_alloc_init(&pa, 4 * REQ_CAP);
  Offtune__Session__SessionRequest *req = offtune__session__session_request__unpack(&pa.a, len, body);
  if (!req) return ot_error(OT_ERR_FORMAT, "not a SessionRequest");
  int64_t dev;
  int rc = ot_reg_device_id(d->reg, peer, &dev);
  if (rc == OT_OK && req->kind_case == OFFTUNE__SESSION__SESSION_REQUEST__KIND_POLL) {
    rc = poll(d, peer, dev, req->poll, reply, reply_len);
  } else if (rc == OT_OK && req->kind_case == OFFTUNE__SESSION__SESSION_REQUEST__KIND_SUBMIT) {
    const Offtune__Session__SubmitUpdate *u = req->submit;
    int repeat = 0;
    rc = submit(d, peer, dev, u, &repeat);
    Offtune__Session__SubmitReply sr = OFFTUNE__SESSION__SUBMIT_REPLY__INIT;
    char why[600] = "";
    sr.accepted = rc == OT_OK;
    if (rc == OT_OK && repeat) {
      ot_daemon_log(d, "answered a repeated submission of %s for %s round %u: its update is stored", fp,
                    u->session, u->round);
    } else if (rc) {
      snprintf(why, sizeof why, "%s", ot_error_detail());
      sr.reason = why;
      ot_daemon_log(d, "refused the update of %s for %s round %u: %s", fp, u->session, u->round, why);
      ot_reg_audit(d->reg, fp, "update.refused", "%s round %u: %s", u->session, u->round, why);
    } else {
      ot_daemon_log(d, "accepted the update of %s for %s round %u (%llu tokens, train loss %.4f)", fp,
                    u->session, u->round, (unsigned long long)u->tokens,
                    u->has_train_loss ? u->train_loss : 0.0f);
      ot_reg_audit(d->reg, fp, "update.accepted", "%s round %u: %llu tokens, %.16s", u->session, u->round,
                   (unsigned long long)u->tokens, u->digest);
      ot_daemon_kick(d);
    }
    rc = ot_pb_pack(&sr.base, reply, reply_len) ? ot_error(OT_ERR_NOMEM, "cannot allocate") : OT_OK;
  } else if (rc == OT_OK && (req->kind_case == OFFTUNE__SESSION__SESSION_REQUEST__KIND_SECAGG_JOIN ||
                             req->kind_case == OFFTUNE__SESSION__SESSION_REQUEST__KIND_SECAGG_SUBMIT)) {
    rc = secagg_request(d, peer, fp, dev, req, reply, reply_len);
  } else if (rc == OT_OK) {
    rc = ot_error(OT_ERR_FORMAT, "empty SessionRequest");
  }
  offtune__session__session_request__free_unpacked(req, &pa.a);
  return rc;
}

/* ---- downloads ------------------------------------------------------------------------ */

static int manifest_has(const char *dir, const char *file) {
  char *mp = NULL, *text = NULL;
  size_t len;
  int found = 0;
  if (ot_path_join(dir, "manifest.json", &mp) == OT_OK &&
      ot_file_read_all(mp, 1 << 20, &text, &len) == OT_OK) {
    cJSON *j = cJSON_Parse(text);
    const cJSON *f;
    cJSON_ArrayForEach(f, cJSON_GetObjectItemCaseSensitive(j, "files")) {
      const char *n = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(f, "file"));
      if (n && strcmp(n, file) == 0) found = 1;
    }
    cJSON_Delete(j);
  }
  free(mp);
  free(text);
  return found;
}

int ot_daemon_on_fetch_open(void *user, const uint8_t peer[32], const char *name, ot_source *src,
                            uint64_t *size) {
  ot_daemon *d = user;
  char path[2600], fp[OT_FINGERPRINT_LEN];
  ot_fingerprint(peer, fp);
  int64_t dev;
  int rc = ot_reg_device_id(d->reg, peer, &dev);
  if (rc == OT_OK && strncmp(name, "emulator.", 9) == 0) {
    char *end = NULL, dir[1024], digest[OT_DIGEST_HEX];
    long long id = strtoll(name + 9, &end, 10);
    const char *file = end && *end == '.' ? end + 1 : NULL;
    rc = file && id > 0 ? ot_reg_emulator_dir(d->reg, id, dir, digest)
                        : ot_error(OT_ERR_NOTFOUND, "no such object '%s'", name);
    if (rc == OT_OK && !manifest_has(dir, file)) rc = ot_error(OT_ERR_NOTFOUND, "no such object '%s'", name);
    if (rc == OT_OK && (size_t)snprintf(path, sizeof path, "%s/%s", dir, file) >= sizeof path)
      rc = ot_error(OT_ERR_RANGE, "path too long");
  } else if (rc == OT_OK && strncmp(name, "adapter.", 8) == 0) {
    char digest[OT_DIGEST_HEX];
    const char *file = strlen(name) > 8 + 64 && name[8 + 64] == '.' ? name + 8 + 65 : NULL;
    int served = 0;
    if (file) {
      memcpy(digest, name + 8, 64);
      digest[64] = '\0';
      rc = ot_reg_adapter_served(d->reg, digest, &served);
    }
    if (rc == OT_OK && (!served || !ot_peft_is_file_name(file)))
      rc = ot_error(OT_ERR_NOTFOUND, "no such object '%s'", name);
    if (rc == OT_OK) rc = ot_daemon_obj_path(d, path, sizeof path, "objects/adapters/%s/%s", digest, file);
  } else if (rc == OT_OK) {
    rc = ot_error(OT_ERR_NOTFOUND, "no such object '%s'", name);
  }
  if (rc == OT_OK) rc = ot_file_source_open(path, src, size);
  if (rc) ot_daemon_log(d, "refused download '%s' to %s: %s", name, fp, ot_error_detail());
  return rc;
}

void ot_daemon_on_fetch_close(void *user, ot_source *src) {
  (void)user;
  ot_file_source_close(src);
}
