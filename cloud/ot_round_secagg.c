/* Secure aggregation of session rounds: the in-memory masking round of each session,
 * the stage bookkeeping and the aggregate from the unmasked sum (ot_round_secagg.h). */
#include "ot_round_secagg.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <sodium.h>

#include "ot_aggregate.h"
#include "ot_dp.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_safetensors.h"
#include "ot_secagg_server.h"

#define SA_SLOTS 64
#define SA_MAX_DEV 256

typedef enum { PH_JOIN = 0, PH_RUNNING, PH_PUBLISHING } sa_phase;

typedef struct {
  int used;
  int64_t session_id;
  int round;
  sa_phase phase;
  int gated; /* the DP budget was checked for this round in this daemon's life */
  int n_ready;
  uint8_t ready[SA_MAX_DEV][32];
  /* PH_RUNNING */
  ot_secagg_server *srv;
  uint64_t round_id;
  uint32_t n, dim;
  uint8_t (*roster)[OT_PK_BYTES];
  uint8_t expect[SA_MAX_DEV], answered[SA_MAX_DEV];
  int64_t stage_deadline;
  size_t audited;
} sa_round;

struct ot_round_secagg {
  pthread_mutex_t mu;
  sa_round r[SA_SLOTS];
};

static int64_t now_s(void) { return (int64_t)time(NULL); }

int ot_round_secagg_new(ot_round_secagg **out) {
  ot_round_secagg *t = calloc(1, sizeof *t);
  if (!t) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  pthread_mutex_init(&t->mu, NULL);
  *out = t;
  return OT_OK;
}

static void slot_reset(sa_round *r) {
  ot_secagg_server_free(r->srv);
  free(r->roster);
  memset(r, 0, sizeof *r);
}

void ot_round_secagg_free(ot_round_secagg *t) {
  if (!t) return;
  for (int i = 0; i < SA_SLOTS; i++) slot_reset(&t->r[i]);
  pthread_mutex_destroy(&t->mu);
  free(t);
}

/* The slot of (session, round), made fresh when the session moved to another round. */
static sa_round *slot(ot_round_secagg *t, int64_t sid, int round, int create) {
  sa_round *free_slot = NULL;
  for (int i = 0; i < SA_SLOTS; i++) {
    sa_round *r = &t->r[i];
    if (r->used && r->session_id == sid) {
      if (r->round == round) return r;
      slot_reset(r);
      free_slot = r;
      break;
    }
    if (!r->used && !free_slot) free_slot = r;
  }
  if (!create || !free_slot) return NULL;
  free_slot->used = 1;
  free_slot->session_id = sid;
  free_slot->round = round;
  return free_slot;
}

void ot_sa_forget(ot_round_secagg *t, int64_t session_id) {
  pthread_mutex_lock(&t->mu);
  for (int i = 0; i < SA_SLOTS; i++)
    if (t->r[i].used && t->r[i].session_id == session_id) slot_reset(&t->r[i]);
  pthread_mutex_unlock(&t->mu);
}

static int roster_index(const sa_round *r, const uint8_t pk[32]) {
  for (uint32_t i = 0; i < r->n; i++)
    if (memcmp(r->roster[i], pk, 32) == 0) return (int)i;
  return -1;
}

static int is_ready(const sa_round *r, const uint8_t pk[32]) {
  for (int i = 0; i < r->n_ready; i++)
    if (memcmp(r->ready[i], pk, 32) == 0) return 1;
  return 0;
}

static uint64_t token_cap(const ot_session_cfg *c) {
  return (uint64_t)c->steps * (uint64_t)c->batch * (uint64_t)c->seq_len;
}

int ot_sa_join(ot_round_secagg *t, const ot_session_row *s, int64_t dev, const uint8_t pk[32], int round) {
  (void)dev;
  if (s->state != OT_SS_RUNNING || round != s->round || s->round_state != OT_RS_OPEN)
    return ot_error(OT_ERR_MISMATCH, "round %d of '%s' is not open", round, s->cfg.name);
  pthread_mutex_lock(&t->mu);
  sa_round *r = slot(t, s->id, s->round, 1);
  int rc = OT_OK;
  if (!r)
    rc = ot_error(OT_ERR_RANGE, "too many secure-aggregation rounds at once");
  else if (is_ready(r, pk))
    rc = OT_OK; /* a repeated join (lost reply) */
  else if (r->phase != PH_JOIN)
    rc = ot_error(OT_ERR_MISMATCH, "round %d's masking has started without this device", round);
  else if (r->n_ready >= SA_MAX_DEV || r->n_ready >= s->cfg.max_devices)
    rc = ot_error(OT_ERR_RANGE, "round %d has its %d devices", round, r->n_ready);
  else
    memcpy(r->ready[r->n_ready++], pk, 32);
  pthread_mutex_unlock(&t->mu);
  return rc;
}

int ot_sa_poll(ot_round_secagg *t, const ot_session_row *s, const uint8_t pk[32], ot_sa_poll_kind *kind,
               ot_sa_poll_hold *hold, char *detail, size_t detail_n) {
  memset(hold, 0, sizeof *hold);
  offtune__session__sec_agg_info__init(&hold->info);
  pthread_mutex_lock(&t->mu);
  sa_round *r = slot(t, s->id, s->round, 0);
  int rc = OT_OK, idx = r && r->phase == PH_RUNNING ? roster_index(r, pk) : -1;
  if (!r || (r->phase == PH_JOIN && !is_ready(r, pk))) {
    *kind = OT_SA_POLL_TRAIN;
  } else if (r->phase == PH_JOIN) {
    *kind = OT_SA_POLL_WAIT;
    snprintf(detail, detail_n, "joined; waiting for the round's devices (%d so far)", r->n_ready);
  } else if (r->phase == PH_PUBLISHING) {
    *kind = OT_SA_POLL_WAIT;
    snprintf(detail, detail_n, "aggregating the unmasked sum");
  } else if (idx < 0) {
    *kind = OT_SA_POLL_WAIT;
    snprintf(detail, detail_n, "secure aggregation of this round is running without this device");
  } else {
    Offtune__Session__SecAggInfo *in = &hold->info;
    int stage = ot_secagg_server_stage(r->srv);
    const ot_secagg_params *p = ot_secagg_server_params(r->srv);
    uint8_t *m = NULL;
    size_t ml = 0;
    if (stage != OT_SA_ADVERTISE && !r->answered[idx]) {
      int orc = ot_secagg_server_outgoing(r->srv, (uint32_t)idx, &m, &ml);
      if (orc == OT_ERR_NOTFOUND) {
        *kind = OT_SA_POLL_WAIT;
        snprintf(detail, detail_n, "dropped from this round's secure aggregation");
        pthread_mutex_unlock(&t->mu);
        return OT_OK;
      }
      rc = orc;
    }
    hold->roster = calloc(r->n, sizeof *hold->roster);
    if (rc == OT_OK && !hold->roster) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    if (rc == OT_OK) {
      *kind = OT_SA_POLL_SECAGG;
      hold->msg = m;
      in->stage = (uint32_t)stage;
      in->round_id = r->round_id, in->has_round_id = 1;
      for (uint32_t i = 0; i < r->n; i++) hold->roster[i].data = r->roster[i], hold->roster[i].len = 32;
      in->n_roster = r->n;
      in->roster = hold->roster;
      in->dim = p->dim, in->has_dim = 1;
      in->clip = p->clip, in->has_clip = 1;
      in->degree = p->degree, in->has_degree = 1;
      in->threshold = p->threshold, in->has_threshold = 1;
      if (m) in->msg.data = m, in->msg.len = ml, in->has_msg = 1;
      in->answered = r->answered[idx], in->has_answered = 1;
      in->token_cap = token_cap(&s->cfg), in->has_token_cap = 1;
      in->dp_clip = s->cfg.dp_epsilon > 0 ? s->cfg.dp_clip : 0.0f, in->has_dp_clip = 1;
      snprintf(detail, detail_n, "secure aggregation, stage %d", stage);
    } else {
      free(m);
    }
  }
  pthread_mutex_unlock(&t->mu);
  return rc;
}

void ot_sa_poll_clear(ot_sa_poll_hold *hold) {
  free(hold->roster);
  free(hold->msg);
  memset(hold, 0, sizeof *hold);
}

/* The running round of s whose roster has pk, stage open for it. */
static int running_for(ot_round_secagg *t, const ot_session_row *s, const uint8_t pk[32], int round,
                       sa_round **out, int *idx) {
  sa_round *r = s->round == round ? slot(t, s->id, s->round, 0) : NULL;
  if (!r || r->phase != PH_RUNNING)
    return ot_error(OT_ERR_MISMATCH, "no secure aggregation running in round %d of '%s'", round, s->cfg.name);
  *idx = roster_index(r, pk);
  if (*idx < 0) return ot_error(OT_ERR_MISMATCH, "this device is not in round %d's roster", round);
  if (r->answered[*idx]) return ot_error(OT_ERR_MISMATCH, "duplicate: this stage has this device's message");
  *out = r;
  return OT_OK;
}

int ot_sa_submit(ot_round_secagg *t, const ot_session_row *s, const uint8_t pk[32], int round,
                 uint64_t round_id, const uint8_t *msg, size_t len) {
  pthread_mutex_lock(&t->mu);
  sa_round *r = NULL;
  int idx = -1;
  int rc = running_for(t, s, pk, round, &r, &idx);
  if (rc == OT_OK && round_id != r->round_id) rc = ot_error(OT_ERR_MISMATCH, "another masking round");
  /* the signed device index must be the session's peer: no one relays another's message */
  ot_secagg_msg m;
  memset(&m, 0, sizeof m);
  if (rc == OT_OK) rc = ot_secagg_msg_decode(msg, len, len, &m);
  if (rc == OT_OK && m.device != (uint32_t)idx)
    rc = ot_error(OT_ERR_MISMATCH, "a message signed as device %u sent by device %d", m.device, idx);
  ot_secagg_msg_clear(&m);
  uint32_t dev = 0;
  if (rc == OT_OK) rc = ot_secagg_server_receive(r->srv, msg, len, &dev);
  if (rc == OT_OK) r->answered[idx] = 1;
  pthread_mutex_unlock(&t->mu);
  return rc;
}

int ot_sa_upload_limit(ot_round_secagg *t, const ot_session_row *s, const uint8_t pk[32], int round,
                       uint64_t *limit) {
  pthread_mutex_lock(&t->mu);
  sa_round *r = NULL;
  int idx = -1;
  int rc = running_for(t, s, pk, round, &r, &idx);
  if (rc == OT_OK && ot_secagg_server_stage(r->srv) != OT_SA_MASKED)
    rc = ot_error(OT_ERR_MISMATCH, "round %d is not in its masked-input stage", round);
  if (rc == OT_OK) *limit = 4ull * r->dim + 4096;
  pthread_mutex_unlock(&t->mu);
  return rc;
}

/* ---- the scheduler's side -------------------------------------------------------------- */

static void audit_flush(ot_daemon *d, const ot_session_row *s, sa_round *r) {
  size_t n = ot_secagg_server_audit_count(r->srv);
  for (; r->audited < n; r->audited++)
    ot_reg_audit(d->reg, "daemon", "secagg", "%s round %d: %s", s->cfg.name, s->round,
                 ot_secagg_server_audit_line(r->srv, r->audited));
}

static int cmp_pk(const void *a, const void *b) { return memcmp(a, b, 32); }

/* The adapter's float count + 1 (the weight). */
static int adapter_dim(ot_daemon *d, const ot_session_row *s, uint32_t *dim) {
  char p[2600];
  int rc = ot_daemon_obj_path(d, p, sizeof p, "objects/adapters/%s/adapter_model.safetensors", s->adapter);
  ot_safetensors *st = NULL;
  if (rc == OT_OK) rc = ot_st_open(p, &st);
  uint64_t n = 1;
  for (size_t i = 0; rc == OT_OK && i < ot_st_count(st); i++) n += ot_st_at(st, i)->numel;
  ot_st_close(st);
  if (rc == OT_OK && n > (1u << 28))
    rc = ot_error(OT_ERR_RANGE, "adapter of %llu floats", (unsigned long long)n);
  if (rc == OT_OK) *dim = (uint32_t)n;
  return rc;
}

static int start_masking(ot_daemon *d, const ot_session_row *s, sa_round *r) {
  uint32_t dim = 0;
  int rc = adapter_dim(d, s, &dim);
  if (rc) return rc;
  r->roster = calloc((size_t)r->n_ready, sizeof *r->roster);
  if (!r->roster) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  memcpy(r->roster, r->ready, (size_t)r->n_ready * 32);
  qsort(r->roster, (size_t)r->n_ready, 32, cmp_pk);
  r->n = (uint32_t)r->n_ready;
  r->dim = dim;
  randombytes_buf(&r->round_id, sizeof r->round_id);
  ot_secagg_params p = {.dim = dim, .clip = s->cfg.secagg_range, .stochastic = 1};
  rc = ot_secagg_server_new(&p, r->n, (const uint8_t(*)[OT_PK_BYTES])r->roster, r->round_id, &r->srv);
  if (rc) {
    free(r->roster);
    r->roster = NULL;
    return rc;
  }
  const ot_secagg_params *rp = ot_secagg_server_params(r->srv);
  memset(r->answered, 0, sizeof r->answered);
  memset(r->expect, 1, r->n);
  r->phase = PH_RUNNING;
  int stage_s = s->cfg.deadline_s / 4 > 2 ? s->cfg.deadline_s / 4 : 2;
  r->stage_deadline = now_s() + stage_s;
  ot_daemon_log(d,
                "session '%s': round %d: secure aggregation of %u devices (masking round %016llx, %u "
                "neighbours, threshold %u, %u floats)",
                s->cfg.name, s->round, r->n, (unsigned long long)r->round_id, rp->degree, rp->threshold, dim);
  ot_reg_audit(d->reg, "daemon", "secagg.start",
               "%s round %d: %u devices, masking round %016llx, %u neighbours, threshold %u, %u floats; the "
               "server keeps only the running masked sum",
               s->cfg.name, s->round, r->n, (unsigned long long)r->round_id, rp->degree, rp->threshold, dim);
  return OT_OK;
}

/* The round could not be completed: the same rule as a round with too few updates. */
static int retry_round(ot_daemon *d, const ot_session_row *s, const char *what) {
  if (s->attempts > s->cfg.max_retries) {
    char why[512];
    snprintf(why, sizeof why, "round %d: %s in %d attempts of %d s", s->round, what, s->attempts,
             s->cfg.deadline_s);
    ot_daemon_log(d, "session '%s' failed: %s", s->cfg.name, why);
    ot_sa_forget(d->sa, s->id);
    return ot_reg_session_fail(d->reg, s->id, why);
  }
  ot_daemon_log(d, "session '%s': round %d: %s; retrying (%d of %d)", s->cfg.name, s->round, what,
                s->attempts, s->cfg.max_retries);
  return ot_reg_round_retry(d->reg, s->id, s->round, now_s() + s->cfg.deadline_s);
}

/* global + S / den (+ central noise on S under DP) as an adapter file at out. */
static int write_average(ot_daemon *d, const ot_session_row *s, float *sum, uint32_t dim, uint32_t count,
                         const char *out, char *summary, size_t summary_n) {
  char p[2600];
  int rc = ot_daemon_obj_path(d, p, sizeof p, "objects/adapters/%s/adapter_model.safetensors", s->adapter);
  ot_safetensors *st = NULL;
  if (rc == OT_OK) rc = ot_st_open(p, &st);
  if (rc) return rc;
  double W = sum[dim - 1], den = W;
  const ot_session_cfg *c = &s->cfg;
  if (c->dp_epsilon > 0) {
    /* central Gaussian noise on the sum of clipped updates (sensitivity dp_clip: w <= 1);
     * the divisor is the public count of included devices, not the (un-noised) weight sum */
    double z = 0;
    ot_dp_rng rng;
    rc = ot_session_dp_noise(c, &z);
    if (rc == OT_OK) rc = ot_dp_rng_init(&rng, NULL);
    if (rc == OT_OK) rc = ot_dp_add_gaussian(&rng, sum, dim - 1, ot_dp_central_stddev(z, c->dp_clip));
    ot_dp_rng_wipe(&rng);
    den = count;
    snprintf(summary, summary_n, "secure aggregation of %u devices, central DP noise z %.4f (stddev %.4g)",
             count, z, ot_dp_central_stddev(z, c->dp_clip));
  } else {
    snprintf(summary, summary_n, "secure aggregation of %u devices, weight sum %.4f", count, W);
  }
  if (rc == OT_OK && !(den > 0)) rc = ot_error(OT_ERR_RANGE, "the unmasked weight sum is %g", den);
  size_t nt = ot_st_count(st);
  float **bufs = calloc(nt + 1, sizeof *bufs);
  if (rc == OT_OK && !bufs) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  ot_st_writer *w = NULL;
  if (rc == OT_OK) rc = ot_st_writer_new(&w);
  uint64_t off = 0;
  for (size_t i = 0; rc == OT_OK && i < nt; i++) {
    const ot_st_tensor *tn = ot_st_at(st, i);
    if (!(bufs[i] = malloc(tn->numel * sizeof(float) + 1))) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    if (rc == OT_OK) rc = ot_st_read_f32(st, tn, bufs[i], tn->numel);
    for (uint64_t k = 0; rc == OT_OK && k < tn->numel; k++)
      bufs[i][k] = (float)((double)bufs[i][k] + (double)sum[off + k] / den);
    off += tn->numel;
    if (rc == OT_OK) rc = ot_st_writer_add(w, tn->name, OT_DTYPE_F32, tn->ndim, tn->shape, bufs[i]);
  }
  if (rc == OT_OK && off + 1 != dim) rc = ot_error(OT_ERR_MISMATCH, "the adapter changed during the round");
  if (rc == OT_OK) rc = ot_st_writer_save(w, out);
  ot_st_writer_free(w);
  for (size_t i = 0; bufs && i < nt; i++) free(bufs[i]);
  free(bufs);
  ot_st_close(st);
  return rc;
}

static int finish_masking(ot_daemon *d, const ot_session_row *s, float *sum, uint32_t dim, uint32_t count,
                          uint32_t roster) {
  char tmp[2600], summary[256];
  /* the cloud cannot see single updates here: the devices' clipping bounds each one, and
   * the sum of count updates within the bound is within count x the bound */
  double norm = 0, W = sum[dim - 1];
  /* each honest weight is tokens / (steps x batch x seq_len) <= 1: a larger sum means a
   * device claimed more (the slack covers the quantisation error, < count / 2^28) */
  int rc = W <= count * (1.0 + 1e-6) + 1e-6
               ? ot_agg_check_sum(sum, dim - 1, count, s->cfg.max_update_norm, &norm)
               : ot_error(OT_ERR_RANGE, "the weight sum %.6g is over %u, the most %u devices can claim", W,
                          count, count);
  if (rc != OT_OK) {
    char what[600];
    snprintf(what, sizeof what, "aggregate refused (%s); no aggregate", ot_error_detail());
    sodium_memzero(sum, (size_t)dim * sizeof *sum);
    ot_reg_audit(d->reg, "daemon", "secagg.refused_sum", "%s round %d: %s", s->cfg.name, s->round, what);
    return retry_round(d, s, what);
  }
  rc = ot_daemon_path(d, tmp, sizeof tmp, "tmp/secagg-avg-%lld-%d.safetensors", (long long)s->id, s->round);
  if (rc == OT_OK) rc = write_average(d, s, sum, dim, count, tmp, summary, sizeof summary);
  sodium_memzero(sum, (size_t)dim * sizeof *sum);
  /* the weight sum is sum_i tokens_i / token cap: the devices' tokens in all, never one's */
  double tokens = W * (double)token_cap(&s->cfg);
  if (rc == OT_OK) rc = ot_round_publish_avg(d, s, tmp, (int)count, (int)roster, tokens, summary);
  unlink(tmp);
  return rc;
}

int ot_sa_step(ot_daemon *d, const ot_session_row *s) {
  ot_round_secagg *t = d->sa;
  const ot_session_cfg *c = &s->cfg;
  int64_t now = now_s();
  pthread_mutex_lock(&t->mu);
  sa_round *r = slot(t, s->id, s->round, 1);
  if (!r) {
    pthread_mutex_unlock(&t->mu);
    return ot_error(OT_ERR_RANGE, "too many secure-aggregation rounds at once");
  }
  int rc = OT_OK;
  if (!r->gated) {
    /* normally checked when the previous round finished; again here for a daemon killed
     * between that round's commit and the check */
    r->gated = 1;
    if (c->dp_epsilon > 0) {
      int stopped = 0;
      pthread_mutex_unlock(&t->mu);
      rc = ot_round_dp_gate(d, s, s->round, &stopped);
      if (rc || stopped) {
        if (stopped) ot_sa_forget(t, s->id);
        return rc;
      }
      return OT_OK; /* the next step goes on */
    }
  }
  if (r->phase == PH_JOIN) {
    int need = c->min_devices > 3 ? c->min_devices : 3;
    int enough = r->n_ready >= c->max_devices || (r->n_ready >= need && now >= s->deadline);
    if (enough) {
      rc = start_masking(d, s, r);
      pthread_mutex_unlock(&t->mu);
      return rc;
    }
    int n_ready = r->n_ready;
    pthread_mutex_unlock(&t->mu);
    if (now < s->deadline) return OT_OK;
    char what[160];
    snprintf(what, sizeof what, "%d of at least %d devices joined the secure aggregation", n_ready, need);
    return retry_round(d, s, what);
  }
  if (r->phase != PH_RUNNING) {
    pthread_mutex_unlock(&t->mu);
    return OT_OK;
  }
  int all = 1;
  for (uint32_t i = 0; i < r->n; i++)
    if (r->expect[i] && !r->answered[i]) all = 0;
  if (!all && now < r->stage_deadline) {
    pthread_mutex_unlock(&t->mu);
    return OT_OK;
  }
  int stage = ot_secagg_server_stage(r->srv);
  rc = ot_secagg_server_advance(r->srv);
  audit_flush(d, s, r);
  if (rc) {
    char what[600];
    snprintf(what, sizeof what, "secure aggregation aborted in stage %d (%s); no aggregate", stage,
             ot_error_detail());
    ot_reg_audit(d->reg, "daemon", "secagg.abort", "%s round %d: %s", c->name, s->round, what);
    slot_reset(r);
    pthread_mutex_unlock(&t->mu);
    return retry_round(d, s, what);
  }
  if (ot_secagg_server_stage(r->srv) != OT_SA_DONE) {
    uint32_t in = 0;
    for (uint32_t i = 0; i < r->n; i++) {
      uint8_t *m = NULL;
      size_t ml = 0;
      r->expect[i] = ot_secagg_server_outgoing(r->srv, i, &m, &ml) == OT_OK;
      in += r->expect[i];
      free(m);
    }
    memset(r->answered, 0, sizeof r->answered);
    int stage_s = c->deadline_s / 4 > 2 ? c->deadline_s / 4 : 2;
    r->stage_deadline = now + stage_s;
    ot_daemon_log(d, "session '%s': round %d: secure aggregation stage %d closed; %u of %u devices go on",
                  c->name, s->round, stage, in, r->n);
    pthread_mutex_unlock(&t->mu);
    return OT_OK;
  }
  uint32_t dim = r->dim, count = 0, roster = r->n;
  float *sum = malloc((size_t)dim * sizeof *sum);
  if (!sum) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  if (rc == OT_OK) rc = ot_secagg_server_result(r->srv, sum, dim, &count);
  ot_secagg_server_free(r->srv);
  r->srv = NULL;
  r->phase = PH_PUBLISHING;
  pthread_mutex_unlock(&t->mu);
  if (rc == OT_OK) {
    ot_daemon_log(d, "session '%s': round %d: unmasked the sum of %u updates", c->name, s->round, count);
    ot_reg_audit(d->reg, "daemon", "secagg.done",
                 "%s round %d: unmasked the sum of %u devices' updates; no individual update was received, "
                 "stored or reconstructed",
                 c->name, s->round, count);
    rc = finish_masking(d, s, sum, dim, count, roster);
  }
  free(sum);
  ot_sa_forget(t, s->id);
  return rc;
}
