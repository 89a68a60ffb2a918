#include "ot_secagg_client.h"

#include <sodium.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_pb.h"
#include "secagg.pb-c.h"

/* Sealed share plaintext: from, to, self-seed share + owner signature, mask-key share +
 * owner signature. */
#define PT_BYTES (8 + 2 * (OT_SA_SHARE_BYTES + 64))
#define BOX_BYTES OT_SA_BOX_BYTES
#define CTRL_MAX (1u << 20)

typedef struct {
  uint32_t idx;
  int advertised, in_mask_set, have_share;
  uint8_t enc_pk[32], mask_pk[32];
  uint8_t share[2][OT_SA_SHARE_BYTES], sig[2][64]; /* what it dealt to us */
} nbr;

struct ot_secagg_client {
  ot_identity id;
  ot_secagg_params p;
  uint64_t round;
  uint32_t n, me, k, bad;
  uint8_t (*roster)[OT_PK_BYTES];
  nbr *nb;
  uint8_t enc_pk[32], enc_sk[32], mask_pk[32], mask_sk[32], seed[32];
  uint8_t own_share[2][OT_SA_SHARE_BYTES], own_sig[2][64];
  int stage; /* next expected call: 1 advertise, 2 keys, 3 shares, 4 mask, 5 unmask, 6 done */
};

static nbr *find_nbr(ot_secagg_client *c, uint32_t j) {
  uint32_t lo = 0, hi = c->k;
  while (lo < hi) {
    uint32_t m = (lo + hi) / 2;
    if (c->nb[m].idx == j) return &c->nb[m];
    if (c->nb[m].idx < j)
      lo = m + 1;
    else
      hi = m;
  }
  return NULL;
}

int ot_secagg_client_new(const ot_identity *id, const ot_secagg_params *params, uint64_t round_id,
                         const uint8_t (*roster)[OT_PK_BYTES], uint32_t n, ot_secagg_client **out) {
  if (!id || !params || !roster || !out)
    return ot_error(OT_ERR_INVALID, "ot_secagg_client_new: NULL argument");
  ot_secagg_params p;
  int rc = ot_secagg_params_resolve(params, n, &p);
  if (rc) return rc;
  uint32_t me = n;
  for (uint32_t i = 0; i < n; i++)
    if (sodium_memcmp(roster[i], id->pk, OT_PK_BYTES) == 0) {
      if (me != n) return ot_error(OT_ERR_INVALID, "device key appears twice in the roster");
      me = i;
    }
  if (me == n) return ot_error(OT_ERR_NOTFOUND, "this device is not in the round's roster");
  ot_secagg_graph *g;
  if ((rc = ot_secagg_graph_new(round_id, roster, n, p.degree, &g))) return rc;
  ot_secagg_client *c = sodium_malloc(sizeof *c);
  if (!c) {
    ot_secagg_graph_free(g);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  memset(c, 0, sizeof *c);
  c->roster = malloc((size_t)n * OT_PK_BYTES);
  c->nb = calloc(p.degree, sizeof(nbr));
  if (!c->roster || !c->nb) {
    ot_secagg_graph_free(g);
    ot_secagg_client_free(c);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  memcpy(c->roster, roster, (size_t)n * OT_PK_BYTES);
  c->id = *id;
  c->p = p;
  c->round = round_id;
  c->n = n;
  c->me = me;
  uint32_t k;
  const uint32_t *nbi = ot_secagg_graph_neighbours(g, me, &k);
  c->k = k;
  for (uint32_t i = 0; i < k; i++) c->nb[i].idx = nbi[i];
  ot_secagg_graph_free(g);
  c->stage = 1;
  *out = c;
  return OT_OK;
}

void ot_secagg_client_free(ot_secagg_client *c) {
  if (!c) return;
  if (c->nb) sodium_memzero(c->nb, sizeof(nbr) * c->p.degree);
  free(c->nb);
  free(c->roster);
  sodium_free(c); /* zeroes the keys, seeds and own shares */
}

uint32_t ot_secagg_client_index(const ot_secagg_client *c) { return c->me; }
uint32_t ot_secagg_client_bad_shares(const ot_secagg_client *c) { return c->bad; }

static int wrong_stage(ot_secagg_client *c, int want, const char *what) {
  if (c->stage == want) return OT_OK;
  return ot_error(OT_ERR_INVALID, "secagg device %u: %s out of order (stage %d, expected %d)", c->me, what,
                  c->stage, want);
}

/* Decodes a cloud-to-device wrapper for this round, stage and device. */
static int open_wrapper(ot_secagg_client *c, const uint8_t *in, size_t len, size_t cap, uint32_t stage,
                        ot_secagg_msg *m) {
  int rc = ot_secagg_msg_decode(in, len, cap, m);
  if (rc) return rc;
  if (m->round_id != c->round || m->stage != stage || m->device != c->me) {
    rc = ot_error(OT_ERR_MISMATCH, "secagg message for round %llu stage %u device %u, expected %llu/%u/%u",
                  (unsigned long long)m->round_id, m->stage, m->device, (unsigned long long)c->round, stage,
                  c->me);
    ot_secagg_msg_clear(m);
  }
  return rc;
}

static int emit(ot_secagg_client *c, uint32_t stage, const ProtobufCMessage *body, uint8_t **out,
                size_t *len) {
  uint8_t *b;
  size_t bl;
  if (ot_pb_pack(body, &b, &bl)) return ot_error(OT_ERR_NOMEM, "out of memory");
  int rc = ot_secagg_msg_encode(stage, c->round, c->me, b, bl, &c->id, out, len);
  free(b);
  return rc;
}

int ot_secagg_client_advertise(ot_secagg_client *c, uint8_t **out, size_t *out_len) {
  int rc = wrong_stage(c, 1, "advertise");
  if (rc) return rc;
  if (ot_sodium_init()) return OT_ERR_INTERNAL;
  crypto_box_keypair(c->enc_pk, c->enc_sk);
  crypto_box_keypair(c->mask_pk, c->mask_sk);
  randombytes_buf(c->seed, 32);
  uint8_t commit[32];
  ot_secagg_commit(c->seed, c->round, c->me, commit);
  Offtune__Secagg__Advertise a = OFFTUNE__SECAGG__ADVERTISE__INIT;
  a.enc_pk = (ProtobufCBinaryData){32, c->enc_pk};
  a.mask_pk = (ProtobufCBinaryData){32, c->mask_pk};
  a.self_commit = (ProtobufCBinaryData){32, commit};
  if ((rc = emit(c, OT_SA_ADVERTISE, &a.base, out, out_len))) return rc;
  c->stage = 2;
  return OT_OK;
}

static void seal_share(const ot_secagg_client *c, const nbr *j, const uint8_t key[32],
                       const uint8_t sh[2][OT_SA_SHARE_BYTES], const uint8_t sig[2][64],
                       uint8_t box[BOX_BYTES]) {
  uint8_t pt[PT_BYTES], ad[16 + 8 + 8];
  ot_sa_put32(pt, c->me);
  ot_sa_put32(pt + 4, j->idx);
  for (int k = 0; k < 2; k++) {
    memcpy(pt + 8 + k * (OT_SA_SHARE_BYTES + 64), sh[k], OT_SA_SHARE_BYTES);
    memcpy(pt + 8 + k * (OT_SA_SHARE_BYTES + 64) + OT_SA_SHARE_BYTES, sig[k], 64);
  }
  memcpy(ad, "offtune/sa1box  ", 16);
  ot_sa_put64(ad + 16, c->round);
  ot_sa_put32(ad + 24, c->me);
  ot_sa_put32(ad + 28, j->idx);
  randombytes_buf(box, 24);
  crypto_aead_xchacha20poly1305_ietf_encrypt(box + 24, NULL, pt, sizeof pt, ad, sizeof ad, NULL, box, key);
  sodium_memzero(pt, sizeof pt);
}

int ot_secagg_client_on_keys(ot_secagg_client *c, const uint8_t *in, size_t in_len, uint8_t **out,
                             size_t *out_len) {
  int rc = wrong_stage(c, 2, "key list");
  if (rc) return rc;
  ot_secagg_msg m;
  if ((rc = open_wrapper(c, in, in_len, CTRL_MAX, OT_SA_ADVERTISE, &m))) return rc;
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 2 * m.body_len + 4096);
  Offtune__Secagg__KeyList *kl = offtune__secagg__key_list__unpack(&ca.a, m.body_len, m.body);
  uint8_t *seen = calloc(c->k ? c->k : 1, 1);
  uint8_t(*enc)[32] = calloc(c->k ? c->k : 1, 32), (*msk)[32] = calloc(c->k ? c->k : 1, 32);
  if (!kl)
    rc = ot_error(OT_ERR_FORMAT, "malformed key list");
  else if (!seen || !enc || !msk)
    rc = ot_error(OT_ERR_NOMEM, "out of memory");
  uint32_t count = 0;
  for (size_t a = 0; rc == OT_OK && a < kl->n_adverts; a++) {
    Offtune__Secagg__SecAggMsg *w = kl->adverts[a];
    uint8_t *wb;
    size_t wl;
    if (ot_pb_pack(&w->base, &wb, &wl)) {
      rc = ot_error(OT_ERR_NOMEM, "out of memory");
      break;
    }
    ot_secagg_msg am;
    rc = ot_secagg_msg_decode_signed(wb, wl, CTRL_MAX, (const uint8_t(*)[OT_PK_BYTES])c->roster, c->n, &am);
    free(wb);
    if (rc) break;
    nbr *j = find_nbr(c, am.device);
    Offtune__Secagg__Advertise *ad = NULL;
    if (am.stage != OT_SA_ADVERTISE || am.round_id != c->round)
      rc = ot_error(OT_ERR_MISMATCH, "key list holds an advertisement of another stage or round");
    else if (!j)
      rc = ot_error(OT_ERR_MISMATCH, "key list holds device %u, which is not a neighbour of %u", am.device,
                    c->me);
    else if (seen[j - c->nb])
      rc = ot_error(OT_ERR_FORMAT, "key list names device %u twice", am.device);
    else if (!(ad = offtune__secagg__advertise__unpack(NULL, am.body_len, am.body)))
      rc = ot_error(OT_ERR_FORMAT, "malformed advertisement of device %u", am.device);
    else if (ad->enc_pk.len != 32 || ad->mask_pk.len != 32 || ad->self_commit.len != 32)
      rc = ot_error(OT_ERR_FORMAT, "advertisement of device %u has wrong key sizes", am.device);
    else if (!ot_secagg_pk_ok(ad->enc_pk.data) || !ot_secagg_pk_ok(ad->mask_pk.data))
      rc = ot_error(OT_ERR_FORMAT, "advertisement of device %u has a small-order X25519 key", am.device);
    if (rc == OT_OK) {
      seen[j - c->nb] = 1;
      memcpy(enc[j - c->nb], ad->enc_pk.data, 32);
      memcpy(msk[j - c->nb], ad->mask_pk.data, 32);
      count++;
    }
    if (ad) offtune__secagg__advertise__free_unpacked(ad, NULL);
    ot_secagg_msg_clear(&am);
  }
  if (rc == OT_OK && count + 1 < c->p.threshold)
    rc = ot_error(OT_ERR_RANGE, "only %u of %u neighbours advertised keys: fewer than the threshold %u - 1",
                  count, c->k, c->p.threshold);
  /* Deal: holders are this device (x = me+1) and every neighbour that advertised. */
  uint32_t h = count + 1;
  uint32_t *xs = NULL;
  uint8_t(*sh)[OT_SA_SHARE_BYTES] = NULL;
  uint8_t(*boxes)[BOX_BYTES] = NULL;
  Offtune__Secagg__SealedShare *ss = NULL, **ssp = NULL;
  if (rc == OT_OK) {
    xs = malloc(sizeof(uint32_t) * h);
    sh = malloc((size_t)2 * h * OT_SA_SHARE_BYTES);
    boxes = malloc((size_t)(h - 1) * BOX_BYTES + 1);
    ss = calloc(h, sizeof *ss);
    ssp = calloc(h, sizeof *ssp);
    if (!xs || !sh || !boxes || !ss || !ssp) rc = ot_error(OT_ERR_NOMEM, "out of memory");
  }
  if (rc == OT_OK) {
    xs[0] = c->me + 1;
    for (uint32_t i = 0, w = 1; i < c->k; i++)
      if (seen[i]) xs[w++] = c->nb[i].idx + 1;
    if ((rc = ot_shamir_split(c->seed, c->p.threshold, xs, h, sh)) == OT_OK)
      rc = ot_shamir_split(c->mask_sk, c->p.threshold, xs, h, sh + h);
  }
  if (rc == OT_OK) {
    for (uint32_t w = 0; w < h && rc == OT_OK; w++) {
      uint8_t sig[2][64], sm[80];
      for (int kind = 0; kind < 2; kind++) {
        ot_secagg_share_sig_msg(c->round, c->me, xs[w] - 1, (uint32_t)kind, sh[kind * h + w], sm);
        crypto_sign_detached(sig[kind], NULL, sm, sizeof sm, c->id.sk);
      }
      uint8_t pair[2][OT_SA_SHARE_BYTES];
      memcpy(pair[0], sh[w], OT_SA_SHARE_BYTES);
      memcpy(pair[1], sh[h + w], OT_SA_SHARE_BYTES);
      if (w == 0) {
        memcpy(c->own_share, pair, sizeof pair);
        memcpy(c->own_sig, sig, sizeof sig);
      } else {
        nbr *j = find_nbr(c, xs[w] - 1);
        uint8_t key[32];
        rc = ot_secagg_agree(c->enc_sk, c->enc_pk, c->me, enc[j - c->nb], j->idx, c->round, 'e', key);
        if (rc == OT_OK)
          seal_share(c, j, key, (const uint8_t(*)[OT_SA_SHARE_BYTES])pair, (const uint8_t(*)[64])sig,
                     boxes[w - 1]);
        sodium_memzero(key, sizeof key);
        Offtune__Secagg__SealedShare init = OFFTUNE__SECAGG__SEALED_SHARE__INIT;
        ss[w - 1] = init;
        ss[w - 1].from = c->me;
        ss[w - 1].to = j->idx;
        ss[w - 1].box = (ProtobufCBinaryData){BOX_BYTES, boxes[w - 1]};
        ssp[w - 1] = &ss[w - 1];
      }
      sodium_memzero(pair, sizeof pair);
    }
  }
  if (rc == OT_OK) {
    Offtune__Secagg__Shares s = OFFTUNE__SECAGG__SHARES__INIT;
    s.n_shares = h - 1;
    s.shares = ssp;
    rc = emit(c, OT_SA_SHARES, &s.base, out, out_len);
  }
  if (rc == OT_OK) {
    for (uint32_t i = 0; i < c->k; i++)
      if (seen[i]) {
        c->nb[i].advertised = 1;
        memcpy(c->nb[i].enc_pk, enc[i], 32);
        memcpy(c->nb[i].mask_pk, msk[i], 32);
      }
    c->stage = 3;
  }
  if (sh) sodium_memzero(sh, (size_t)2 * h * OT_SA_SHARE_BYTES);
  free(xs), free(sh), free(boxes), free(ss), free(ssp), free(seen), free(enc), free(msk);
  if (kl) offtune__secagg__key_list__free_unpacked(kl, &ca.a);
  ot_secagg_msg_clear(&m);
  return rc;
}

/* Opens one sealed share addressed to us; 0 on success. */
static int open_share(ot_secagg_client *c, nbr *j, const uint8_t *box, size_t len,
                      uint8_t sh[2][OT_SA_SHARE_BYTES], uint8_t sig[2][64]) {
  if (len != BOX_BYTES) return -1;
  uint8_t key[32], pt[PT_BYTES], ad[32];
  if (ot_secagg_agree(c->enc_sk, c->enc_pk, c->me, j->enc_pk, j->idx, c->round, 'e', key)) return -1;
  memcpy(ad, "offtune/sa1box  ", 16);
  ot_sa_put64(ad + 16, c->round);
  ot_sa_put32(ad + 24, j->idx);
  ot_sa_put32(ad + 28, c->me);
  int bad = crypto_aead_xchacha20poly1305_ietf_decrypt(pt, NULL, NULL, box + 24, len - 24, ad, sizeof ad, box,
                                                       key) != 0;
  sodium_memzero(key, sizeof key);
  if (!bad && (ot_sa_get32(pt) != j->idx || ot_sa_get32(pt + 4) != c->me)) bad = 1;
  for (int k = 0; k < 2 && !bad; k++) {
    const uint8_t *s = pt + 8 + k * (OT_SA_SHARE_BYTES + 64);
    uint8_t sm[80];
    ot_secagg_share_sig_msg(c->round, j->idx, c->me, (uint32_t)k, s, sm);
    if (ot_sa_get32(s) != c->me + 1 ||
        crypto_sign_verify_detached(s + OT_SA_SHARE_BYTES, sm, sizeof sm, c->roster[j->idx]) != 0)
      bad = 1;
    else {
      memcpy(sh[k], s, OT_SA_SHARE_BYTES);
      memcpy(sig[k], s + OT_SA_SHARE_BYTES, 64);
    }
  }
  sodium_memzero(pt, sizeof pt);
  return bad ? -1 : 0;
}

int ot_secagg_client_on_shares(ot_secagg_client *c, const uint8_t *in, size_t in_len) {
  int rc = wrong_stage(c, 3, "share list");
  if (rc) return rc;
  ot_secagg_msg m;
  if ((rc = open_wrapper(c, in, in_len, CTRL_MAX, OT_SA_SHARES, &m))) return rc;
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 2 * m.body_len + 4096);
  Offtune__Secagg__ShareList *sl = offtune__secagg__share_list__unpack(&ca.a, m.body_len, m.body);
  uint8_t *seen = calloc(c->k ? c->k : 1, 1);
  if (!sl)
    rc = ot_error(OT_ERR_FORMAT, "malformed share list");
  else if (!seen)
    rc = ot_error(OT_ERR_NOMEM, "out of memory");
  for (size_t i = 0; rc == OT_OK && i < sl->n_shares; i++) {
    nbr *j = find_nbr(c, sl->shares[i]->from);
    if (!j || !j->advertised)
      rc = ot_error(OT_ERR_MISMATCH, "share list holds a share from device %u, not an advertised neighbour",
                    sl->shares[i]->from);
    else if (sl->shares[i]->to != c->me)
      rc = ot_error(OT_ERR_MISMATCH, "share list holds a share for device %u", sl->shares[i]->to);
    else if (seen[j - c->nb])
      rc = ot_error(OT_ERR_FORMAT, "share list names device %u twice", j->idx);
    else
      seen[j - c->nb] = 1;
  }
  uint32_t count = 0;
  for (uint32_t i = 0; rc == OT_OK && i < c->k; i++) count += seen[i];
  if (rc == OT_OK && count + 1 < c->p.threshold)
    rc =
        ot_error(OT_ERR_RANGE,
                 "only %u neighbours hold this device's shares: fewer than the threshold %u - 1; not masking",
                 count, c->p.threshold);
  if (rc == OT_OK) {
    for (size_t i = 0; i < sl->n_shares; i++) {
      nbr *j = find_nbr(c, sl->shares[i]->from);
      j->in_mask_set = 1; /* masks with it even if its share is bad: the cloud expects the mask */
      uint8_t sh[2][OT_SA_SHARE_BYTES], sig[2][64];
      if (open_share(c, j, sl->shares[i]->box.data, sl->shares[i]->box.len, sh, sig) == 0) {
        memcpy(j->share, sh, sizeof sh);
        memcpy(j->sig, sig, sizeof sig);
        j->have_share = 1;
      } else {
        c->bad++;
      }
      sodium_memzero(sh, sizeof sh);
    }
    c->stage = 4;
  }
  free(seen);
  if (sl) offtune__secagg__share_list__free_unpacked(sl, &ca.a);
  ot_secagg_msg_clear(&m);
  return rc;
}

int ot_secagg_client_mask_input(ot_secagg_client *c, const float *update, size_t n, uint8_t **out,
                                size_t *out_len) {
  int rc = wrong_stage(c, 4, "masked input");
  if (rc) return rc;
  if (!update || n != c->p.dim)
    return ot_error(OT_ERR_MISMATCH, "update of %zu values, the round aggregates %u", n, c->p.dim);
  uint32_t *y = malloc(sizeof(uint32_t) * n);
  uint8_t(*seeds)[32] = sodium_malloc((size_t)(c->k + 1) * 32);
  int8_t *signs = malloc(c->k + 1);
  if (!y || !seeds || !signs) {
    free(y), free(signs);
    if (seeds) sodium_free(seeds);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  rc = ot_secagg_quantize(update, n, c->p.clip, ot_secagg_scale(c->p.clip, c->n), c->p.stochastic, NULL, y);
  size_t m = 0;
  if (rc == OT_OK) {
    memcpy(seeds[m], c->seed, 32);
    signs[m++] = +1;
    for (uint32_t i = 0; i < c->k && rc == OT_OK; i++) {
      nbr *j = &c->nb[i];
      if (!j->in_mask_set) continue;
      rc = ot_secagg_agree(c->mask_sk, c->mask_pk, c->me, j->mask_pk, j->idx, c->round, 'm', seeds[m]);
      signs[m++] = c->me < j->idx ? +1 : -1;
    }
  }
  if (rc == OT_OK) ot_secagg_masks_apply(y, n, (const uint8_t(*)[32])seeds, signs, m);
  sodium_free(seeds); /* wipes the pairwise seeds */
  free(signs);
  if (rc == OT_OK) {
    Offtune__Secagg__MaskedInput mi = OFFTUNE__SECAGG__MASKED_INPUT__INIT;
    mi.dim = (uint32_t)n;
    /* u32 little-endian on the wire: this build targets little-endian machines */
    mi.data = (ProtobufCBinaryData){n * 4, (uint8_t *)y};
    rc = emit(c, OT_SA_MASKED, &mi.base, out, out_len);
  }
  free(y);
  if (rc == OT_OK) c->stage = 5;
  return rc;
}

static int u32_in(const uint32_t *v, size_t n, uint32_t x) {
  size_t lo = 0, hi = n;
  while (lo < hi) {
    size_t m = (lo + hi) / 2;
    if (v[m] == x) return 1;
    if (v[m] < x)
      lo = m + 1;
    else
      hi = m;
  }
  return 0;
}

static int strictly_ascending(const uint32_t *v, size_t n, uint32_t limit) {
  for (size_t i = 0; i < n; i++)
    if (v[i] >= limit || (i && v[i] <= v[i - 1])) return 0;
  return 1;
}

int ot_secagg_client_on_unmask(ot_secagg_client *c, const uint8_t *in, size_t in_len, uint8_t **out,
                               size_t *out_len) {
  int rc = wrong_stage(c, 5, "unmask request");
  if (rc) return rc;
  ot_secagg_msg m;
  if ((rc = open_wrapper(c, in, in_len, CTRL_MAX, OT_SA_MASKED, &m))) return rc;
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 2 * m.body_len + 4096);
  Offtune__Secagg__UnmaskRequest *ur = offtune__secagg__unmask_request__unpack(&ca.a, m.body_len, m.body);
  Offtune__Secagg__RevealedShare *rs = NULL, **rsp = NULL;
  if (!ur)
    rc = ot_error(OT_ERR_FORMAT, "malformed unmask request");
  else if (!strictly_ascending(ur->survivors, ur->n_survivors, c->n) ||
           !strictly_ascending(ur->dropped, ur->n_dropped, c->n))
    rc = ot_error(OT_ERR_FORMAT, "unmask request lists are not ascending device indices");
  else if (!u32_in(ur->survivors, ur->n_survivors, c->me))
    rc = ot_error(OT_ERR_MISMATCH, "unmask request does not count this device (%u) as a survivor", c->me);
  for (size_t i = 0; rc == OT_OK && i < ur->n_dropped; i++)
    if (u32_in(ur->survivors, ur->n_survivors, ur->dropped[i]))
      rc = ot_error(OT_ERR_MISMATCH, "unmask request lists device %u as both survivor and dropped",
                    ur->dropped[i]);
  if (rc == OT_OK) {
    rs = calloc(c->k + 1, sizeof *rs);
    rsp = calloc(c->k + 1, sizeof *rsp);
    if (!rs || !rsp) rc = ot_error(OT_ERR_NOMEM, "out of memory");
  }
  size_t nr = 0;
  if (rc == OT_OK) {
    Offtune__Secagg__RevealedShare init = OFFTUNE__SECAGG__REVEALED_SHARE__INIT;
    rs[nr] = init; /* our own self-mask seed share: we survived */
    rs[nr].owner = c->me;
    rs[nr].kind = OT_SA_KIND_SELF;
    rs[nr].share = (ProtobufCBinaryData){OT_SA_SHARE_BYTES, c->own_share[0]};
    rs[nr].owner_sig = (ProtobufCBinaryData){64, c->own_sig[0]};
    rsp[nr] = &rs[nr];
    nr++;
    for (uint32_t i = 0; i < c->k; i++) {
      nbr *j = &c->nb[i];
      if (!j->have_share) continue;
      int kind;
      if (u32_in(ur->survivors, ur->n_survivors, j->idx))
        kind = OT_SA_KIND_SELF;
      else if (u32_in(ur->dropped, ur->n_dropped, j->idx))
        kind = OT_SA_KIND_MASKKEY;
      else
        continue;
      rs[nr] = init;
      rs[nr].owner = j->idx;
      rs[nr].kind = (uint32_t)kind;
      rs[nr].share = (ProtobufCBinaryData){OT_SA_SHARE_BYTES, j->share[kind]};
      rs[nr].owner_sig = (ProtobufCBinaryData){64, j->sig[kind]};
      rsp[nr] = &rs[nr];
      nr++;
    }
    Offtune__Secagg__UnmaskResponse r = OFFTUNE__SECAGG__UNMASK_RESPONSE__INIT;
    r.n_shares = nr;
    r.shares = rsp;
    rc = emit(c, OT_SA_UNMASK, &r.base, out, out_len);
  }
  if (rc == OT_OK) c->stage = 6; /* one answer per round: never both kinds for a device */
  free(rs), free(rsp);
  if (ur) offtune__secagg__unmask_request__free_unpacked(ur, &ca.a);
  ot_secagg_msg_clear(&m);
  return rc;
}

int ot_secagg_client_held_share(const ot_secagg_client *c, uint32_t owner, uint32_t kind,
                                uint8_t share[OT_SA_SHARE_BYTES]) {
  if (kind > 1) return ot_error(OT_ERR_INVALID, "share kind %u", kind);
  if (c->stage < 4) return ot_error(OT_ERR_INVALID, "no shares held yet");
  if (owner == c->me) {
    memcpy(share, c->own_share[kind], OT_SA_SHARE_BYTES);
    return OT_OK;
  }
  const nbr *j = find_nbr((ot_secagg_client *)c, owner);
  if (!j || !j->have_share) return ot_error(OT_ERR_NOTFOUND, "no share of device %u held", owner);
  memcpy(share, j->share[kind], OT_SA_SHARE_BYTES);
  return OT_OK;
}
