#include "ot_secagg_server.h"

#include <stdarg.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_pb.h"
#include "secagg.pb-c.h"

#define CTRL_MAX (1u << 20)
#define ADVERT_MAX 512 /* relayed to every neighbour: no padding */

typedef struct {
  int adv, sh, masked, resp; /* stages completed */
  uint8_t *advert;           /* the advertisement as the device sent it (relayed) */
  size_t advert_len;
  uint8_t mask_pk[32], commit[32];
  uint32_t n_in; /* sealed shares addressed to this device */
  uint32_t *in_from;
  uint8_t (*in_box)[OT_SA_BOX_BYTES];
  uint32_t n_rev; /* verified shares of this device's secret (one kind) */
  uint8_t (*rev)[OT_SA_SHARE_BYTES];
  uint8_t *out; /* message prepared for this device */
  size_t out_len;
} sdev;

struct ot_secagg_server {
  ot_secagg_params p;
  uint32_t n;
  uint64_t round;
  int stage;
  uint8_t (*roster)[OT_PK_BYTES];
  ot_secagg_graph *g;
  sdev *d;
  uint32_t *sum; /* running sum of masked inputs mod 2^32 */
  uint32_t included;
  char **audit;
  size_t n_audit, cap_audit;
};

static void audit(ot_secagg_server *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void audit(ot_secagg_server *s, const char *fmt, ...) {
  if (s->n_audit == s->cap_audit) {
    size_t c = s->cap_audit ? 2 * s->cap_audit : 64;
    char **a = realloc(s->audit, c * sizeof *a);
    if (!a) return; /* the audit is best effort under memory exhaustion */
    s->audit = a, s->cap_audit = c;
  }
  va_list ap;
  va_start(ap, fmt);
  char *line = NULL;
  if (vasprintf(&line, fmt, ap) >= 0) s->audit[s->n_audit++] = line;
  va_end(ap);
}

/* "3, 17, 40" (at most 24 listed) for audit lines; flag[i] selects. */
static void list_str(const ot_secagg_server *s, const int *flag, size_t stride, char *buf, size_t cap) {
  size_t w = 0, shown = 0, total = 0;
  buf[0] = 0;
  for (uint32_t i = 0; i < s->n; i++) {
    if (!*(const int *)((const char *)flag + i * stride)) continue;
    total++;
    if (shown < 24 && w + 12 < cap)
      w += (size_t)snprintf(buf + w, cap - w, "%s%u", shown ? ", " : "", i), shown++;
  }
  if (total > shown && w + 16 < cap) snprintf(buf + w, cap - w, ", ... (%zu)", total);
  if (!total) snprintf(buf, cap, "none");
}

static int cmp_pk(const void *a, const void *b) { return memcmp(a, b, OT_PK_BYTES); }

int ot_secagg_server_new(const ot_secagg_params *params, uint32_t n, const uint8_t (*roster)[OT_PK_BYTES],
                         uint64_t round_id, ot_secagg_server **out) {
  if (!params || !roster || !out) return ot_error(OT_ERR_INVALID, "ot_secagg_server_new: NULL argument");
  ot_secagg_params p;
  int rc = ot_secagg_params_resolve(params, n, &p);
  if (rc) return rc;
  uint8_t(*sorted)[OT_PK_BYTES] = malloc((size_t)n * OT_PK_BYTES);
  if (!sorted) return ot_error(OT_ERR_NOMEM, "out of memory");
  memcpy(sorted, roster, (size_t)n * OT_PK_BYTES);
  qsort(sorted, n, OT_PK_BYTES, cmp_pk);
  for (uint32_t i = 1; i < n && rc == OT_OK; i++)
    if (memcmp(sorted[i], sorted[i - 1], OT_PK_BYTES) == 0)
      rc = ot_error(OT_ERR_INVALID, "two devices of the roster have the same key");
  free(sorted);
  if (rc) return rc;
  ot_secagg_server *s = calloc(1, sizeof *s);
  if (!s) return ot_error(OT_ERR_NOMEM, "out of memory");
  s->p = p, s->n = n, s->round = round_id, s->stage = OT_SA_ADVERTISE;
  s->roster = malloc((size_t)n * OT_PK_BYTES);
  s->d = calloc(n, sizeof(sdev));
  s->sum = calloc(p.dim, sizeof(uint32_t));
  if (!s->roster || !s->d || !s->sum) {
    ot_secagg_server_free(s);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  memcpy(s->roster, roster, (size_t)n * OT_PK_BYTES);
  if ((rc = ot_secagg_graph_new(round_id, roster, n, p.degree, &s->g))) {
    ot_secagg_server_free(s);
    return rc;
  }
  audit(s,
        "round %llu: secure aggregation of %u devices, %u values each; %u neighbours per device, threshold "
        "%u of "
        "%u holders, Shamir over GF(2^61-1), ChaCha20 masks mod 2^32, clip %g, %s rounding",
        (unsigned long long)round_id, n, p.dim, p.degree, p.threshold, p.degree + 1, (double)p.clip,
        p.stochastic ? "stochastic" : "nearest");
  *out = s;
  return OT_OK;
}

static void free_out(ot_secagg_server *s) {
  for (uint32_t i = 0; i < s->n; i++) {
    free(s->d[i].out);
    s->d[i].out = NULL;
    s->d[i].out_len = 0;
  }
}

void ot_secagg_server_free(ot_secagg_server *s) {
  if (!s) return;
  if (s->d) {
    free_out(s);
    for (uint32_t i = 0; i < s->n; i++) {
      free(s->d[i].advert), free(s->d[i].in_from), free(s->d[i].in_box);
      if (s->d[i].rev) sodium_memzero(s->d[i].rev, (size_t)(s->p.degree + 1) * OT_SA_SHARE_BYTES);
      free(s->d[i].rev);
    }
  }
  free(s->d);
  free(s->roster);
  free(s->sum);
  ot_secagg_graph_free(s->g);
  for (size_t i = 0; i < s->n_audit; i++) free(s->audit[i]);
  free(s->audit);
  free(s);
}

int ot_secagg_server_stage(const ot_secagg_server *s) { return s->stage; }
const ot_secagg_params *ot_secagg_server_params(const ot_secagg_server *s) { return &s->p; }
size_t ot_secagg_server_audit_count(const ot_secagg_server *s) { return s->n_audit; }
const char *ot_secagg_server_audit_line(const ot_secagg_server *s, size_t i) {
  return i < s->n_audit ? s->audit[i] : NULL;
}
int ot_secagg_server_included(const ot_secagg_server *s, uint32_t device) {
  return device < s->n && s->d[device].masked;
}

/* ---------------- receive ---------------- */

static int on_advertise(ot_secagg_server *s, uint32_t i, const ot_secagg_msg *m, const uint8_t *wire,
                        size_t len) {
  sdev *d = &s->d[i];
  if (d->adv) return ot_error(OT_ERR_MISMATCH, "device %u advertised twice (replay refused)", i);
  Offtune__Secagg__Advertise *a = offtune__secagg__advertise__unpack(NULL, m->body_len, m->body);
  int rc = OT_OK;
  if (!a) return ot_error(OT_ERR_FORMAT, "malformed advertisement from device %u", i);
  if (len > ADVERT_MAX)
    rc = ot_error(OT_ERR_RANGE, "advertisement from device %u is %zu bytes (at most %d)", i, len, ADVERT_MAX);
  else if (a->enc_pk.len != 32 || a->mask_pk.len != 32 || a->self_commit.len != 32)
    rc = ot_error(OT_ERR_FORMAT, "advertisement from device %u has wrong key sizes", i);
  else if (!ot_secagg_pk_ok(a->enc_pk.data) || !ot_secagg_pk_ok(a->mask_pk.data))
    rc = ot_error(OT_ERR_FORMAT, "advertisement from device %u has a small-order X25519 key", i);
  else if (!(d->advert = malloc(len)))
    rc = ot_error(OT_ERR_NOMEM, "out of memory");
  if (rc == OT_OK) {
    memcpy(d->advert, wire, len);
    d->advert_len = len;
    memcpy(d->mask_pk, a->mask_pk.data, 32);
    memcpy(d->commit, a->self_commit.data, 32);
    d->adv = 1;
  }
  offtune__secagg__advertise__free_unpacked(a, NULL);
  return rc;
}

static int on_shares(ot_secagg_server *s, uint32_t i, const ot_secagg_msg *m) {
  sdev *d = &s->d[i];
  if (!d->adv) return ot_error(OT_ERR_MISMATCH, "device %u sent shares without having advertised", i);
  if (d->sh) return ot_error(OT_ERR_MISMATCH, "device %u sent its shares twice (replay refused)", i);
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 2 * m->body_len + 4096);
  Offtune__Secagg__Shares *sh = offtune__secagg__shares__unpack(&ca.a, m->body_len, m->body);
  if (!sh) return ot_error(OT_ERR_FORMAT, "malformed shares from device %u", i);
  uint32_t k;
  const uint32_t *nb = ot_secagg_graph_neighbours(s->g, i, &k);
  uint32_t want = 0;
  for (uint32_t a = 0; a < k; a++) want += s->d[nb[a]].adv;
  int rc = OT_OK;
  if (sh->n_shares != want)
    rc = ot_error(OT_ERR_MISMATCH, "device %u sent %zu shares for its %u advertised neighbours", i,
                  sh->n_shares, want);
  for (size_t a = 0; rc == OT_OK && a < sh->n_shares; a++) {
    Offtune__Secagg__SealedShare *x = sh->shares[a];
    if (x->from != i || x->to >= s->n || !ot_secagg_graph_adjacent(s->g, i, x->to) || !s->d[x->to].adv)
      rc = ot_error(OT_ERR_MISMATCH, "device %u sent a share %u -> %u that is not to an advertised neighbour",
                    i, x->from, x->to);
    else if (x->box.len != OT_SA_BOX_BYTES)
      rc = ot_error(OT_ERR_FORMAT, "device %u sent a sealed share of %zu bytes", i, x->box.len);
    for (size_t b = 0; rc == OT_OK && b < a; b++)
      if (sh->shares[b]->to == x->to)
        rc = ot_error(OT_ERR_FORMAT, "device %u sent two shares for %u", i, x->to);
  }
  /* every check passed: route (the boxes are sealed device to device; we cannot open them) */
  for (size_t a = 0; rc == OT_OK && a < sh->n_shares; a++) {
    sdev *t = &s->d[sh->shares[a]->to];
    if (!t->in_from) {
      t->in_from = malloc(sizeof(uint32_t) * s->p.degree);
      t->in_box = malloc((size_t)s->p.degree * OT_SA_BOX_BYTES);
      if (!t->in_from || !t->in_box) {
        rc = ot_error(OT_ERR_NOMEM, "out of memory");
        break;
      }
    }
  }
  if (rc == OT_OK) {
    for (size_t a = 0; a < sh->n_shares; a++) {
      sdev *t = &s->d[sh->shares[a]->to];
      t->in_from[t->n_in] = i;
      memcpy(t->in_box[t->n_in], sh->shares[a]->box.data, OT_SA_BOX_BYTES);
      t->n_in++;
    }
    d->sh = 1;
  }
  offtune__secagg__shares__free_unpacked(sh, &ca.a);
  return rc;
}

static int on_masked(ot_secagg_server *s, uint32_t i, const ot_secagg_msg *m) {
  sdev *d = &s->d[i];
  if (!d->sh) return ot_error(OT_ERR_MISMATCH, "device %u sent a masked input without having shared", i);
  if (d->masked) return ot_error(OT_ERR_MISMATCH, "device %u sent a second masked input (replay refused)", i);
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 2 * m->body_len + 4096);
  Offtune__Secagg__MaskedInput *mi = offtune__secagg__masked_input__unpack(&ca.a, m->body_len, m->body);
  if (!mi) return ot_error(OT_ERR_FORMAT, "malformed masked input from device %u", i);
  int rc = OT_OK;
  if (mi->dim != s->p.dim || mi->data.len != (size_t)s->p.dim * 4)
    rc = ot_error(OT_ERR_MISMATCH, "masked input from device %u has %u values (%zu bytes), the round has %u",
                  i, mi->dim, mi->data.len, s->p.dim);
  if (rc == OT_OK) {
    const uint8_t *b = mi->data.data;
    for (uint32_t k = 0; k < s->p.dim; k++) s->sum[k] += ot_sa_get32(b + 4 * k);
    d->masked = 1;
    s->included++;
    audit(s, "masked input from device %u: %zu bytes added to the running sum and discarded", i,
          mi->data.len);
  }
  offtune__secagg__masked_input__free_unpacked(mi, &ca.a);
  return rc;
}

/* Device i may reveal a share of owner j's secret: it holds one when j is i itself or
 * j dealt to i (neighbours that both completed stage 2). */
static int holds_share_of(const ot_secagg_server *s, uint32_t i, uint32_t j) {
  return j == i || (s->d[j].sh && ot_secagg_graph_adjacent(s->g, i, j));
}

static int on_unmask(ot_secagg_server *s, uint32_t i, const ot_secagg_msg *m) {
  sdev *d = &s->d[i];
  if (!d->masked)
    return ot_error(OT_ERR_MISMATCH, "device %u is not a survivor; its unmask answer is refused", i);
  if (d->resp)
    return ot_error(OT_ERR_MISMATCH, "device %u answered the unmask request twice (replay refused)", i);
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 2 * m->body_len + 4096);
  Offtune__Secagg__UnmaskResponse *r = offtune__secagg__unmask_response__unpack(&ca.a, m->body_len, m->body);
  if (!r) return ot_error(OT_ERR_FORMAT, "malformed unmask answer from device %u", i);
  int rc = OT_OK;
  if (r->n_shares > s->p.degree + 1)
    rc = ot_error(OT_ERR_FORMAT, "device %u revealed %zu shares, it holds at most %u", i, r->n_shares,
                  s->p.degree + 1);
  for (size_t a = 0; rc == OT_OK && a < r->n_shares; a++) {
    Offtune__Secagg__RevealedShare *x = r->shares[a];
    uint32_t j = x->owner;
    if (j >= s->n || !s->d[j].sh || !holds_share_of(s, i, j))
      rc = ot_error(OT_ERR_MISMATCH, "device %u revealed a share of device %u, which it does not hold", i, j);
    else if (x->kind != (s->d[j].masked ? OT_SA_KIND_SELF : OT_SA_KIND_MASKKEY))
      /* the invariant: a survivor's mask key and a dropped device's seed are never taken */
      rc = ot_error(OT_ERR_MISMATCH, "device %u revealed the wrong kind of share (%u) for device %u", i,
                    x->kind, j);
    else if (x->share.len != OT_SA_SHARE_BYTES || x->owner_sig.len != 64)
      rc = ot_error(OT_ERR_FORMAT, "device %u revealed a share of wrong size", i);
    for (size_t b = 0; rc == OT_OK && b < a; b++)
      if (r->shares[b]->owner == j) rc = ot_error(OT_ERR_FORMAT, "device %u revealed two shares of %u", i, j);
  }
  for (size_t a = 0; rc == OT_OK && a < r->n_shares; a++) {
    sdev *o = &s->d[r->shares[a]->owner];
    if (!o->rev && !(o->rev = malloc((size_t)(s->p.degree + 1) * OT_SA_SHARE_BYTES)))
      rc = ot_error(OT_ERR_NOMEM, "out of memory");
  }
  if (rc == OT_OK) {
    for (size_t a = 0; a < r->n_shares; a++) {
      Offtune__Secagg__RevealedShare *x = r->shares[a];
      uint8_t sm[80];
      ot_secagg_share_sig_msg(s->round, x->owner, i, x->kind, x->share.data, sm);
      if (ot_sa_get32(x->share.data) != i + 1 ||
          crypto_sign_verify_detached(x->owner_sig.data, sm, sizeof sm, s->roster[x->owner]) != 0) {
        audit(s, "device %u revealed a share of device %u that its owner did not sign: discarded", i,
              x->owner);
        continue;
      }
      sdev *o = &s->d[x->owner];
      memcpy(o->rev[o->n_rev++], x->share.data, OT_SA_SHARE_BYTES);
    }
    d->resp = 1;
  }
  offtune__secagg__unmask_response__free_unpacked(r, &ca.a);
  return rc;
}

int ot_secagg_server_receive(ot_secagg_server *s, const uint8_t *msg, size_t len, uint32_t *device) {
  if (!s || !msg) return ot_error(OT_ERR_INVALID, "ot_secagg_server_receive: NULL argument");
  if (s->stage > OT_SA_UNMASK)
    return ot_error(OT_ERR_INVALID, "secagg round %llu is over", (unsigned long long)s->round);
  size_t cap = s->stage == OT_SA_MASKED ? (size_t)s->p.dim * 4 + 4096 : CTRL_MAX;
  ot_secagg_msg m;
  int rc = ot_secagg_msg_decode_signed(msg, len, cap, (const uint8_t(*)[OT_PK_BYTES])s->roster, s->n, &m);
  if (rc) {
    audit(s, "refused a message of %zu bytes: %s", len, ot_error_detail());
    return rc;
  }
  if (m.round_id != s->round)
    rc = ot_error(OT_ERR_MISMATCH, "message of round %llu in round %llu (replay refused)",
                  (unsigned long long)m.round_id, (unsigned long long)s->round);
  else if ((int)m.stage != s->stage)
    rc = ot_error(OT_ERR_MISMATCH, "message of stage %u from device %u during stage %d", m.stage, m.device,
                  s->stage);
  else {
    switch (s->stage) {
    case OT_SA_ADVERTISE: rc = on_advertise(s, m.device, &m, msg, len); break;
    case OT_SA_SHARES: rc = on_shares(s, m.device, &m); break;
    case OT_SA_MASKED: rc = on_masked(s, m.device, &m); break;
    default: rc = on_unmask(s, m.device, &m); break;
    }
  }
  if (rc)
    audit(s, "refused a message from device %u: %s", m.device, ot_error_detail());
  else if (device)
    *device = m.device;
  ot_secagg_msg_clear(&m);
  return rc;
}

/* ---------------- advance ---------------- */

static int fail(ot_secagg_server *s, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(ot_secagg_server *s, int status, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  s->stage = OT_SA_FAILED;
  sodium_memzero(s->sum, sizeof(uint32_t) * s->p.dim);
  free_out(s);
  audit(s, "round aborted: %s; no aggregate is published", buf);
  return ot_error(status, "secure aggregation aborted: %s", buf);
}

static int wrap_out(ot_secagg_server *s, uint32_t i, uint32_t stage, const ProtobufCMessage *body) {
  uint8_t *b;
  size_t bl;
  if (ot_pb_pack(body, &b, &bl)) return ot_error(OT_ERR_NOMEM, "out of memory");
  int rc = ot_secagg_msg_encode(stage, s->round, i, b, bl, NULL, &s->d[i].out, &s->d[i].out_len);
  free(b);
  return rc;
}

static int count_flag(const ot_secagg_server *s, size_t off) {
  int c = 0;
  for (uint32_t i = 0; i < s->n; i++) c += *(const int *)((const char *)&s->d[i] + off);
  return c;
}

static int close_advertise(ot_secagg_server *s) {
  char lst[512];
  int u1 = count_flag(s, offsetof(sdev, adv));
  int *out = malloc(sizeof(int) * s->n);
  if (!out) return ot_error(OT_ERR_NOMEM, "out of memory");
  for (uint32_t i = 0; i < s->n; i++) out[i] = !s->d[i].adv;
  list_str(s, out, sizeof(int), lst, sizeof lst);
  free(out);
  audit(s, "advertise closed: %d of %u devices advertised keys; dropped: %s", u1, s->n, lst);
  if ((uint32_t)u1 < s->p.threshold)
    return fail(s, OT_ERR_RANGE, "only %d devices advertised keys, fewer than the threshold %u", u1,
                s->p.threshold);
  int rc = OT_OK;
  for (uint32_t i = 0; i < s->n && rc == OT_OK; i++) {
    if (!s->d[i].adv) continue;
    uint32_t k, c = 0;
    const uint32_t *nb = ot_secagg_graph_neighbours(s->g, i, &k);
    Offtune__Secagg__SecAggMsg **ads = calloc(k ? k : 1, sizeof *ads);
    if (!ads) return fail(s, OT_ERR_NOMEM, "out of memory");
    for (uint32_t a = 0; a < k && rc == OT_OK; a++) {
      sdev *j = &s->d[nb[a]];
      if (!j->adv) continue;
      if (!(ads[c] = offtune__secagg__sec_agg_msg__unpack(NULL, j->advert_len, j->advert)))
        rc = ot_error(OT_ERR_INTERNAL, "stored advertisement no longer unpacks");
      else
        c++;
    }
    if (rc == OT_OK) {
      Offtune__Secagg__KeyList kl = OFFTUNE__SECAGG__KEY_LIST__INIT;
      kl.n_adverts = c;
      kl.adverts = ads;
      rc = wrap_out(s, i, OT_SA_ADVERTISE, &kl.base);
    }
    for (uint32_t a = 0; a < c; a++) offtune__secagg__sec_agg_msg__free_unpacked(ads[a], NULL);
    free(ads);
  }
  if (rc) return fail(s, rc, "%s", ot_error_detail());
  s->stage = OT_SA_SHARES;
  return OT_OK;
}

static int close_shares(ot_secagg_server *s) {
  char lst[512];
  int u2 = count_flag(s, offsetof(sdev, sh));
  int *out = malloc(sizeof(int) * s->n);
  if (!out) return ot_error(OT_ERR_NOMEM, "out of memory");
  for (uint32_t i = 0; i < s->n; i++) out[i] = s->d[i].adv && !s->d[i].sh;
  list_str(s, out, sizeof(int), lst, sizeof lst);
  free(out);
  audit(s,
        "shares closed: %d devices dealt sealed shares (relayed unopened: the cloud has no key); dropped: %s",
        u2, lst);
  if ((uint32_t)u2 < s->p.threshold)
    return fail(s, OT_ERR_RANGE, "only %d devices dealt shares, fewer than the threshold %u", u2,
                s->p.threshold);
  int rc = OT_OK;
  for (uint32_t i = 0; i < s->n && rc == OT_OK; i++) {
    sdev *d = &s->d[i];
    if (!d->sh) continue;
    Offtune__Secagg__SealedShare *ss = calloc(d->n_in + 1, sizeof *ss),
                                 **ssp = calloc(d->n_in + 1, sizeof *ssp);
    if (!ss || !ssp) {
      free(ss), free(ssp);
      return fail(s, OT_ERR_NOMEM, "out of memory");
    }
    size_t c = 0;
    for (uint32_t a = 0; a < d->n_in; a++) {
      if (!s->d[d->in_from[a]].sh) continue; /* only devices that completed the stage (all of them do) */
      Offtune__Secagg__SealedShare init = OFFTUNE__SECAGG__SEALED_SHARE__INIT;
      ss[c] = init;
      ss[c].from = d->in_from[a];
      ss[c].to = i;
      ss[c].box = (ProtobufCBinaryData){OT_SA_BOX_BYTES, d->in_box[a]};
      ssp[c] = &ss[c];
      c++;
    }
    Offtune__Secagg__ShareList sl = OFFTUNE__SECAGG__SHARE_LIST__INIT;
    sl.n_shares = c;
    sl.shares = ssp;
    rc = wrap_out(s, i, OT_SA_SHARES, &sl.base);
    free(ss), free(ssp);
  }
  if (rc) return fail(s, rc, "%s", ot_error_detail());
  s->stage = OT_SA_MASKED;
  return OT_OK;
}

static int close_masked(ot_secagg_server *s) {
  char lst[512];
  int u3 = count_flag(s, offsetof(sdev, masked));
  int *out = malloc(sizeof(int) * s->n);
  if (!out) return ot_error(OT_ERR_NOMEM, "out of memory");
  for (uint32_t i = 0; i < s->n; i++) out[i] = s->d[i].sh && !s->d[i].masked;
  list_str(s, out, sizeof(int), lst, sizeof lst);
  free(out);
  audit(s, "masked inputs closed: %d survivors; dropped after dealing shares: %s", u3, lst);
  if ((uint32_t)u3 < s->p.threshold)
    return fail(s, OT_ERR_RANGE, "only %d devices sent masked inputs, fewer than the threshold %u", u3,
                s->p.threshold);
  int rc = OT_OK;
  uint32_t *sv = malloc(sizeof(uint32_t) * (s->p.degree + 1)), *dr = malloc(sizeof(uint32_t) * s->p.degree);
  if (!sv || !dr) {
    free(sv), free(dr);
    return fail(s, OT_ERR_NOMEM, "out of memory");
  }
  for (uint32_t i = 0; i < s->n && rc == OT_OK; i++) {
    if (!s->d[i].masked) continue;
    /* each survivor learns the fate of its own neighbourhood only, ascending */
    uint32_t k, ns = 0, nd = 0;
    const uint32_t *nb = ot_secagg_graph_neighbours(s->g, i, &k);
    int self_done = 0;
    for (uint32_t a = 0; a < k; a++) {
      if (!self_done && nb[a] > i) sv[ns++] = i, self_done = 1;
      sdev *j = &s->d[nb[a]];
      if (j->masked)
        sv[ns++] = nb[a];
      else if (j->sh)
        dr[nd++] = nb[a];
    }
    if (!self_done) sv[ns++] = i;
    Offtune__Secagg__UnmaskRequest ur = OFFTUNE__SECAGG__UNMASK_REQUEST__INIT;
    ur.n_survivors = ns;
    ur.survivors = sv;
    ur.n_dropped = nd;
    ur.dropped = dr;
    rc = wrap_out(s, i, OT_SA_MASKED, &ur.base);
  }
  free(sv), free(dr);
  if (rc) return fail(s, rc, "%s", ot_error_detail());
  s->stage = OT_SA_UNMASK;
  return OT_OK;
}

static int close_unmask(ot_secagg_server *s) {
  int u4 = count_flag(s, offsetof(sdev, resp));
  audit(s, "unmask closed: %d survivors answered", u4);
  uint32_t t = s->p.threshold;
  uint32_t n_self = 0, n_key = 0, n_skip = 0;
  /* 1. reconstruct and check every needed secret; collect the masks to take off */
  size_t cap = 0, m = 0;
  for (uint32_t j = 0; j < s->n; j++)
    if (s->d[j].sh) cap += s->d[j].masked ? 1 : s->p.degree;
  uint8_t(*seeds)[32] = malloc((cap ? cap : 1) * 32);
  int8_t *signs = malloc(cap ? cap : 1);
  if (!seeds || !signs) {
    free(seeds), free(signs);
    return fail(s, OT_ERR_NOMEM, "out of memory");
  }
  int rc = OT_OK, status = OT_OK;
  char why[256] = "";
  for (uint32_t j = 0; j < s->n && rc == OT_OK; j++) {
    sdev *d = &s->d[j];
    if (!d->sh) continue;
    uint8_t secret[32];
    if (d->masked) {
      if (d->n_rev < t) {
        status = OT_ERR_RANGE;
        snprintf(why, sizeof why, "device %u's self mask: %u valid shares, the threshold is %u", j, d->n_rev,
                 t);
        rc = -1;
        break;
      }
      uint8_t c[32];
      int crc = ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])d->rev, d->n_rev, t, secret);
      if (crc == OT_OK) ot_secagg_commit(secret, s->round, j, c);
      if (crc != OT_OK || sodium_memcmp(c, d->commit, 32) != 0) {
        status = OT_ERR_MISMATCH;
        snprintf(why, sizeof why, "device %u dealt inconsistent shares of its self mask", j);
        rc = -1;
      } else {
        memcpy(seeds[m], secret, 32);
        signs[m++] = -1;
        audit(
            s,
            "device %u: survived; self-mask seed reconstructed from %u of %u shares; its mask key was never "
            "requested",
            j, t, d->n_rev);
        n_self++;
      }
    } else {
      uint32_t k, users = 0;
      const uint32_t *nb = ot_secagg_graph_neighbours(s->g, j, &k);
      for (uint32_t a = 0; a < k; a++) users += s->d[nb[a]].masked;
      if (!users) {
        audit(s, "device %u: dropped; no survivor masked with it, nothing to remove; nothing reconstructed",
              j);
        n_skip++;
        continue;
      }
      if (d->n_rev < t) {
        status = OT_ERR_RANGE;
        snprintf(why, sizeof why, "dropped device %u's mask key: %u valid shares, the threshold is %u", j,
                 d->n_rev, t);
        rc = -1;
        break;
      }
      uint8_t pk[32];
      int crc = ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])d->rev, d->n_rev, t, secret);
      if (crc == OT_OK) crypto_scalarmult_base(pk, secret);
      if (crc != OT_OK || sodium_memcmp(pk, d->mask_pk, 32) != 0) {
        status = OT_ERR_MISMATCH;
        snprintf(why, sizeof why, "device %u dealt inconsistent shares of its mask key", j);
        rc = -1;
      }
      for (uint32_t a = 0; a < k && rc == OT_OK; a++) {
        uint32_t i = nb[a];
        if (!s->d[i].masked) continue;
        int arc = ot_secagg_agree(secret, d->mask_pk, j, s->d[i].mask_pk, i, s->round, 'm', seeds[m]);
        if (arc) {
          status = arc;
          snprintf(why, sizeof why, "%s", ot_error_detail());
          rc = -1;
        }
        signs[m++] = i < j ? -1 : +1; /* i added +PRG if i < j, else -PRG: take it back */
      }
      if (rc == OT_OK) {
        audit(s,
              "device %u: dropped after dealing shares; mask key reconstructed from %u of %u shares to "
              "remove its "
              "pairwise masks from %u survivors; its self-mask seed was never requested and its input is not "
              "in "
              "the sum",
              j, t, d->n_rev, users);
        n_key++;
      }
    }
    sodium_memzero(secret, sizeof secret);
  }
  /* 2. one pass over the sum */
  if (rc == OT_OK) ot_secagg_masks_apply(s->sum, s->p.dim, (const uint8_t(*)[32])seeds, signs, m);
  sodium_memzero(seeds, (cap ? cap : 1) * 32);
  free(seeds), free(signs);
  if (rc != OT_OK) return fail(s, status, "%s", why);
  audit(
      s,
      "sum of %u updates published; reconstructed %u self-mask seeds (survivors) and %u mask keys (dropped), "
      "%u dropped devices needed none; no device had both reconstructed: the server never held an "
      "individual unmasked update",
      s->included, n_self, n_key, n_skip);
  free_out(s);
  s->stage = OT_SA_DONE;
  return OT_OK;
}

int ot_secagg_server_advance(ot_secagg_server *s) {
  if (!s) return ot_error(OT_ERR_INVALID, "ot_secagg_server_advance: NULL argument");
  free_out(s);
  switch (s->stage) {
  case OT_SA_ADVERTISE: return close_advertise(s);
  case OT_SA_SHARES: return close_shares(s);
  case OT_SA_MASKED: return close_masked(s);
  case OT_SA_UNMASK: return close_unmask(s);
  default: return ot_error(OT_ERR_INVALID, "secagg round %llu is over", (unsigned long long)s->round);
  }
}

int ot_secagg_server_outgoing(const ot_secagg_server *s, uint32_t device, uint8_t **out, size_t *out_len) {
  if (!s || !out || !out_len) return ot_error(OT_ERR_INVALID, "ot_secagg_server_outgoing: NULL argument");
  if (device >= s->n || !s->d[device].out)
    return ot_error(OT_ERR_NOTFOUND, "no message for device %u", device);
  uint8_t *b = malloc(s->d[device].out_len);
  if (!b) return ot_error(OT_ERR_NOMEM, "out of memory");
  memcpy(b, s->d[device].out, s->d[device].out_len);
  *out = b;
  *out_len = s->d[device].out_len;
  return OT_OK;
}

int ot_secagg_server_result(const ot_secagg_server *s, float *sum, size_t n, uint32_t *count) {
  if (!s || !sum) return ot_error(OT_ERR_INVALID, "ot_secagg_server_result: NULL argument");
  if (s->stage != OT_SA_DONE)
    return ot_error(OT_ERR_INVALID, "secure aggregation has no result (stage %d%s)", s->stage,
                    s->stage == OT_SA_FAILED ? ": the round aborted" : "");
  if (n != s->p.dim) return ot_error(OT_ERR_MISMATCH, "result of %u values, buffer of %zu", s->p.dim, n);
  ot_secagg_dequantize(s->sum, n, ot_secagg_scale(s->p.clip, s->n), sum);
  if (count) *count = s->included;
  return OT_OK;
}
