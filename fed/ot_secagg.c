#include "ot_secagg.h"

#include <math.h>
#include <sodium.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_pb.h"
#include "secagg.pb-c.h"

int ot_secagg_params_resolve(const ot_secagg_params *in, uint32_t n, ot_secagg_params *out) {
  if (!in || !out) return ot_error(OT_ERR_INVALID, "ot_secagg_params_resolve: NULL argument");
  if (n < 3 || n > OT_SA_MAX_DEVICES)
    return ot_error(OT_ERR_INVALID, "secure aggregation needs 3 to %d devices (got %u)", OT_SA_MAX_DEVICES,
                    n);
  if (in->dim == 0 || in->dim > (1u << 28))
    return ot_error(OT_ERR_INVALID, "update length %u out of range (1..2^28)", in->dim);
  if (!(in->clip > 0) || !isfinite(in->clip))
    return ot_error(OT_ERR_INVALID, "quantisation clip must be positive and finite");
  ot_secagg_params p = *in;
  if (p.degree == 0) {
    uint32_t l = 0;
    while ((1u << l) < n) l++;
    p.degree = 4 * l; /* see docs/secagg.md: dropout tolerance per neighbourhood */
  }
  if (p.degree >= n - 1)
    p.degree = n - 1;
  else if (p.degree % 2)
    return ot_error(OT_ERR_INVALID, "neighbour degree %u must be even (or >= n-1)", p.degree);
  if (p.degree < 2) return ot_error(OT_ERR_INVALID, "neighbour degree must be at least 2");
  uint32_t h = p.degree + 1;
  if (p.threshold == 0) {
    p.threshold = h / 2 + 1; /* a majority of the holders */
    if (p.threshold < 2) p.threshold = 2;
  }
  if (p.threshold < 2 || p.threshold > h)
    return ot_error(OT_ERR_INVALID, "threshold %u out of range 2..%u (degree %u + 1)", p.threshold, h,
                    p.degree);
  *out = p;
  return OT_OK;
}

/* ---------------- quantisation ---------------- */

double ot_secagg_scale(float clip, uint32_t n) {
  if (n == 0) n = 1;
  return (2147483647.0 / n - 1.0) / clip;
}

int ot_secagg_quantize(const float *x, size_t n, float clip, double scale, int stochastic,
                       const uint8_t *rng_seed, uint32_t *q) {
  if (!x || !q || !(clip > 0) || !(scale > 0))
    return ot_error(OT_ERR_INVALID, "ot_secagg_quantize: bad argument");
  if (ot_sodium_init()) return OT_ERR_INTERNAL;
  if (stochastic) {
    uint8_t seed[32];
    if (rng_seed)
      memcpy(seed, rng_seed, 32);
    else
      randombytes_buf(seed, 32);
    randombytes_buf_deterministic(q, n * 4, seed);
    sodium_memzero(seed, sizeof seed);
  }
  for (size_t i = 0; i < n; i++) {
    double v = x[i];
    if (!(v == v)) v = 0; /* NaN contributes nothing */
    if (v > clip) v = clip;
    if (v < -clip) v = -clip;
    double s = v * scale, r;
    if (stochastic) {
      double f = floor(s), u = q[i] * (1.0 / 4294967296.0);
      r = f + (u < s - f ? 1.0 : 0.0);
    } else {
      r = nearbyint(s);
    }
    q[i] = (uint32_t)(int32_t)r;
  }
  return OT_OK;
}

void ot_secagg_dequantize(const uint32_t *sum, size_t n, double scale, float *out) {
  for (size_t i = 0; i < n; i++) out[i] = (float)((double)(int32_t)sum[i] / scale);
}

/* ---------------- masks ---------------- */

#define MASK_CHUNK 16384 /* words: 64 KiB, whole 64-byte ChaCha20 blocks */

void ot_secagg_masks_apply(uint32_t *v, size_t n, const uint8_t (*seeds)[OT_SA_SEED_BYTES],
                           const int8_t *signs, size_t m) {
  /* randombytes_buf_deterministic(buf, len, seed) is crypto_stream_chacha20_ietf(buf, len,
   * "LibsodiumDRG", seed); the _xor_ic form starts at any block, so each chunk of v gets
   * its slice of every stream while it sits in cache. */
  static const uint8_t nonce[12] = {'L', 'i', 'b', 's', 'o', 'd', 'i', 'u', 'm', 'D', 'R', 'G'};
  static const uint8_t zeros[MASK_CHUNK * 4];
  long nchunks = (long)((n + MASK_CHUNK - 1) / MASK_CHUNK);
#pragma omp parallel if (nchunks > 1 && m * n > (1u << 20))
  {
    uint32_t *buf = malloc(MASK_CHUNK * 4);
    int ok = buf != NULL;
#pragma omp for schedule(static)
    for (long c = 0; c < nchunks; c++) {
      size_t off = (size_t)c * MASK_CHUNK, len = n - off < MASK_CHUNK ? n - off : MASK_CHUNK;
      uint32_t *w = v + off;
      for (size_t k = 0; k < m; k++) {
        if (ok) {
          crypto_stream_chacha20_ietf_xor_ic((uint8_t *)buf, zeros, len * 4, nonce, (uint32_t)(off / 16),
                                             seeds[k]);
        } else { /* no scratch: the whole stream up to this chunk, one block at a time */
          uint32_t blk[16];
          for (size_t i = 0; i < len; i += 16) {
            crypto_stream_chacha20_ietf_xor_ic((uint8_t *)blk, zeros, 64, nonce, (uint32_t)((off + i) / 16),
                                               seeds[k]);
            size_t e = len - i < 16 ? len - i : 16;
            for (size_t j = 0; j < e; j++) w[i + j] += signs[k] >= 0 ? blk[j] : (uint32_t)-blk[j];
          }
          continue;
        }
        if (signs[k] >= 0)
          for (size_t i = 0; i < len; i++) w[i] += buf[i];
        else
          for (size_t i = 0; i < len; i++) w[i] -= buf[i];
      }
    }
    if (buf) sodium_memzero(buf, MASK_CHUNK * 4);
    free(buf);
  }
}

void ot_secagg_mask_apply(uint32_t *v, size_t n, const uint8_t seed[OT_SA_SEED_BYTES], int sign) {
  int8_t s = sign >= 0 ? 1 : -1;
  ot_secagg_masks_apply(v, n, (const uint8_t(*)[OT_SA_SEED_BYTES])seed, &s, 1);
}

/* ---------------- Shamir over GF(2^61 - 1) ---------------- */

static uint64_t fp_red(unsigned __int128 x) {
  uint64_t lo = (uint64_t)(x & OT_SA_P), hi = (uint64_t)(x >> 61);
  uint64_t r = lo + (hi & OT_SA_P) + (uint64_t)(hi >> 61);
  r = (r & OT_SA_P) + (r >> 61);
  return r >= OT_SA_P ? r - OT_SA_P : r;
}
static uint64_t fp_mul(uint64_t a, uint64_t b) { return fp_red((unsigned __int128)a * b); }
static uint64_t fp_add(uint64_t a, uint64_t b) {
  uint64_t r = a + b;
  return r >= OT_SA_P ? r - OT_SA_P : r;
}
static uint64_t fp_sub(uint64_t a, uint64_t b) { return a >= b ? a - b : a + OT_SA_P - b; }
static uint64_t fp_inv(uint64_t a) { /* a^(p-2) */
  uint64_t r = 1, e = OT_SA_P - 2;
  while (e) {
    if (e & 1) r = fp_mul(r, a);
    a = fp_mul(a, a);
    e >>= 1;
  }
  return r;
}
static uint64_t fp_random(void) {
  for (;;) {
    uint64_t v;
    randombytes_buf(&v, sizeof v);
    v &= OT_SA_P;
    if (v != OT_SA_P) return v;
  }
}

static void secret_to_elems(const uint8_t s[32], uint64_t e[OT_SA_ELEMS]) {
  for (int k = 0; k < 4; k++) {
    e[k] = 0;
    for (int b = 0; b < 7; b++) e[k] |= (uint64_t)s[7 * k + b] << (8 * b);
  }
  e[4] = ot_sa_get32(s + 28);
}

int ot_shamir_split(const uint8_t secret[32], uint32_t t, const uint32_t *xs, uint32_t n,
                    uint8_t (*shares)[OT_SA_SHARE_BYTES]) {
  if (!secret || !xs || !shares || t < 1 || n < t)
    return ot_error(OT_ERR_INVALID, "shamir split: need 1 <= t <= n (t=%u n=%u)", t, n);
  for (uint32_t i = 0; i < n; i++) {
    if (xs[i] == 0) return ot_error(OT_ERR_INVALID, "shamir split: share point 0");
    for (uint32_t j = 0; j < i; j++)
      if (xs[i] == xs[j]) return ot_error(OT_ERR_INVALID, "shamir split: repeated point %u", xs[i]);
  }
  if (ot_sodium_init()) return OT_ERR_INTERNAL;
  uint64_t *coef = malloc(sizeof(uint64_t) * t * OT_SA_ELEMS);
  if (!coef) return ot_error(OT_ERR_NOMEM, "out of memory");
  secret_to_elems(secret, coef); /* coefficient 0 of each polynomial */
  for (uint32_t c = 1; c < t; c++)
    for (int e = 0; e < OT_SA_ELEMS; e++) coef[c * OT_SA_ELEMS + e] = fp_random();
  for (uint32_t i = 0; i < n; i++) {
    ot_sa_put32(shares[i], xs[i]);
    for (int e = 0; e < OT_SA_ELEMS; e++) {
      uint64_t y = 0; /* Horner */
      for (uint32_t c = t; c-- > 0;) y = fp_add(fp_mul(y, xs[i]), coef[c * OT_SA_ELEMS + e]);
      ot_sa_put64(shares[i] + 4 + 8 * e, y);
    }
  }
  sodium_memzero(coef, sizeof(uint64_t) * t * OT_SA_ELEMS);
  free(coef);
  return OT_OK;
}

int ot_shamir_combine(const uint8_t (*shares)[OT_SA_SHARE_BYTES], uint32_t k, uint32_t t,
                      uint8_t secret[32]) {
  if (!shares || !secret || t < 1) return ot_error(OT_ERR_INVALID, "shamir combine: bad argument");
  if (k < t) return ot_error(OT_ERR_RANGE, "shamir combine: %u shares, threshold %u", k, t);
  uint64_t acc[OT_SA_ELEMS] = {0};
  for (uint32_t i = 0; i < t; i++) {
    uint64_t xi = ot_sa_get32(shares[i]);
    if (xi == 0) return ot_error(OT_ERR_FORMAT, "shamir combine: share at point 0");
    uint64_t num = 1, den = 1; /* Lagrange basis at 0: prod x_j / (x_j - x_i) */
    for (uint32_t j = 0; j < t; j++) {
      if (j == i) continue;
      uint64_t xj = ot_sa_get32(shares[j]);
      if (xj == xi) return ot_error(OT_ERR_FORMAT, "shamir combine: repeated point %u", (unsigned)xi);
      num = fp_mul(num, xj);
      den = fp_mul(den, fp_sub(xj, xi));
    }
    uint64_t l = fp_mul(num, fp_inv(den));
    for (int e = 0; e < OT_SA_ELEMS; e++) {
      uint64_t y = ot_sa_get64(shares[i] + 4 + 8 * e);
      if (y >= OT_SA_P) return ot_error(OT_ERR_FORMAT, "shamir combine: share element out of the field");
      acc[e] = fp_add(acc[e], fp_mul(y, l));
    }
  }
  for (int e = 0; e < 4; e++)
    if (acc[e] >> 56) return ot_error(OT_ERR_MISMATCH, "shamir combine: shares are inconsistent");
  if (acc[4] >> 32) return ot_error(OT_ERR_MISMATCH, "shamir combine: shares are inconsistent");
  for (int e = 0; e < 4; e++)
    for (int b = 0; b < 7; b++) secret[7 * e + b] = (uint8_t)(acc[e] >> (8 * b));
  ot_sa_put32(secret + 28, (uint32_t)acc[4]);
  sodium_memzero(acc, sizeof acc);
  return OT_OK;
}

/* ---------------- agreement, commitments ---------------- */

int ot_secagg_agree(const uint8_t sk[32], const uint8_t my_pk[32], uint32_t me, const uint8_t peer_pk[32],
                    uint32_t peer, uint64_t round_id, char label, uint8_t out[32]) {
  if (me == peer) return ot_error(OT_ERR_INVALID, "secagg agreement with oneself");
  if (ot_sodium_init()) return OT_ERR_INTERNAL;
  uint8_t dh[32];
  if (crypto_scalarmult(dh, sk, peer_pk) != 0)
    return ot_error(OT_ERR_FORMAT, "device %u advertised a low-order X25519 key", peer);
  uint8_t m[16 + 1 + 8 + 8 + 64];
  memcpy(m, "offtune/secagg1 ", 16);
  m[16] = (uint8_t)label;
  ot_sa_put64(m + 17, round_id);
  int lo_me = me < peer;
  ot_sa_put32(m + 25, lo_me ? me : peer);
  ot_sa_put32(m + 29, lo_me ? peer : me);
  memcpy(m + 33, lo_me ? my_pk : peer_pk, 32);
  memcpy(m + 65, lo_me ? peer_pk : my_pk, 32);
  crypto_generichash(out, 32, m, sizeof m, dh, sizeof dh);
  sodium_memzero(dh, sizeof dh);
  return OT_OK;
}

int ot_secagg_pk_ok(const uint8_t pk[32]) {
  static const uint8_t k[32] = {9}; /* any scalar: clamping makes it a multiple of 8 */
  uint8_t q[32];
  if (ot_sodium_init()) return 0;
  int ok = crypto_scalarmult(q, k, pk) == 0;
  sodium_memzero(q, sizeof q);
  return ok;
}

void ot_secagg_commit(const uint8_t seed[32], uint64_t round_id, uint32_t device, uint8_t out[32]) {
  uint8_t m[16 + 8 + 4 + 32];
  memcpy(m, "offtune/secagg1c", 16);
  ot_sa_put64(m + 16, round_id);
  ot_sa_put32(m + 24, device);
  memcpy(m + 28, seed, 32);
  crypto_generichash(out, 32, m, sizeof m, NULL, 0);
  sodium_memzero(m, sizeof m);
}

void ot_secagg_share_sig_msg(uint64_t round_id, uint32_t owner, uint32_t holder, uint32_t kind,
                             const uint8_t share[OT_SA_SHARE_BYTES], uint8_t out[80]) {
  memcpy(out, "offtune/sa1share", 16);
  ot_sa_put64(out + 16, round_id);
  ot_sa_put32(out + 24, owner);
  ot_sa_put32(out + 28, holder);
  ot_sa_put32(out + 32, kind);
  memcpy(out + 36, share, OT_SA_SHARE_BYTES);
}

/* ---------------- graph ---------------- */

struct ot_secagg_graph {
  uint32_t n, k;
  uint32_t *nb; /* n x k, each row ascending */
};

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

int ot_secagg_graph_new(uint64_t round_id, const uint8_t (*roster)[OT_PK_BYTES], uint32_t n, uint32_t degree,
                        ot_secagg_graph **out) {
  if (!roster || !out || n < 2 || n > OT_SA_MAX_DEVICES || degree < 1 || degree > n - 1 ||
      (degree < n - 1 && degree % 2))
    return ot_error(OT_ERR_INVALID, "secagg graph: bad size (n=%u degree=%u)", n, degree);
  if (ot_sodium_init()) return OT_ERR_INTERNAL;
  ot_secagg_graph *g = calloc(1, sizeof *g);
  uint32_t *pos = malloc(sizeof(uint32_t) * n), *at = malloc(sizeof(uint32_t) * n);
  uint64_t *rnd = malloc(sizeof(uint64_t) * n);
  if (g) g->nb = malloc(sizeof(uint32_t) * (size_t)n * degree);
  if (!g || !pos || !at || !rnd || !g->nb) {
    if (g) free(g->nb);
    free(g), free(pos), free(at), free(rnd);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  g->n = n, g->k = degree;
  /* seed = BLAKE2b("offtune/secagg1g" || round || BLAKE2b(roster)) */
  uint8_t m[16 + 8 + 32], seed[32];
  memcpy(m, "offtune/secagg1g", 16);
  ot_sa_put64(m + 16, round_id);
  crypto_generichash(m + 24, 32, &roster[0][0], (size_t)n * OT_PK_BYTES, NULL, 0);
  crypto_generichash(seed, 32, m, sizeof m, NULL, 0);
  randombytes_buf_deterministic(rnd, sizeof(uint64_t) * n, seed);
  for (uint32_t i = 0; i < n; i++) at[i] = i;
  for (uint32_t i = n - 1; i > 0; i--) { /* Fisher-Yates; bias n/2^64 */
    uint32_t j = (uint32_t)(rnd[i] % (i + 1));
    uint32_t tmp = at[i];
    at[i] = at[j], at[j] = tmp;
  }
  for (uint32_t p = 0; p < n; p++) pos[at[p]] = p;
  for (uint32_t i = 0; i < n; i++) {
    uint32_t *row = g->nb + (size_t)i * degree, c = 0;
    if (degree == n - 1) {
      for (uint32_t j = 0; j < n; j++)
        if (j != i) row[c++] = j;
    } else { /* Harary H(k, n): positions p +- 1..k/2 on the ring */
      for (uint32_t d = 1; d <= degree / 2; d++) {
        row[c++] = at[(pos[i] + d) % n];
        row[c++] = at[(pos[i] + n - d) % n];
      }
    }
    qsort(row, degree, sizeof(uint32_t), cmp_u32);
  }
  free(pos), free(at), free(rnd);
  *out = g;
  return OT_OK;
}

void ot_secagg_graph_free(ot_secagg_graph *g) {
  if (!g) return;
  free(g->nb);
  free(g);
}

const uint32_t *ot_secagg_graph_neighbours(const ot_secagg_graph *g, uint32_t i, uint32_t *count) {
  if (i >= g->n) {
    *count = 0;
    return NULL;
  }
  *count = g->k;
  return g->nb + (size_t)i * g->k;
}

int ot_secagg_graph_adjacent(const ot_secagg_graph *g, uint32_t i, uint32_t j) {
  if (i >= g->n || j >= g->n || i == j) return 0;
  return bsearch(&j, g->nb + (size_t)i * g->k, g->k, sizeof(uint32_t), cmp_u32) != NULL;
}

/* ---------------- messages ---------------- */

static void sig_digest(uint32_t stage, uint64_t round_id, uint32_t device, const uint8_t *body, size_t len,
                       uint8_t out[64]) {
  /* label (16) || stage || round || device || BLAKE2b-256(body): the body may be megabytes */
  memcpy(out, "offtune/secagg1m", 16);
  ot_sa_put32(out + 16, stage);
  ot_sa_put64(out + 20, round_id);
  ot_sa_put32(out + 28, device);
  crypto_generichash(out + 32, 32, body, len, NULL, 0);
}

int ot_secagg_msg_encode(uint32_t stage, uint64_t round_id, uint32_t device, const uint8_t *body, size_t len,
                         const ot_identity *id, uint8_t **out, size_t *out_len) {
  if ((!body && len) || !out || !out_len)
    return ot_error(OT_ERR_INVALID, "ot_secagg_msg_encode: bad argument");
  if (ot_sodium_init()) return OT_ERR_INTERNAL;
  Offtune__Secagg__SecAggMsg m = OFFTUNE__SECAGG__SEC_AGG_MSG__INIT;
  uint8_t sig[64], d[64];
  m.stage = stage;
  m.round_id = round_id;
  m.device = device;
  m.body.data = (uint8_t *)body;
  m.body.len = len;
  if (id) {
    sig_digest(stage, round_id, device, body, len, d);
    crypto_sign_detached(sig, NULL, d, sizeof d, id->sk);
    m.has_signature = 1;
    m.signature.data = sig;
    m.signature.len = 64;
  }
  if (ot_pb_pack(&m.base, out, out_len)) return ot_error(OT_ERR_NOMEM, "out of memory");
  return OT_OK;
}

static int decode_impl(const uint8_t *wire, size_t len, size_t max_len, const uint8_t (*roster)[OT_PK_BYTES],
                       uint32_t n, ot_secagg_msg *out) {
  if (!wire || !out) return ot_error(OT_ERR_INVALID, "ot_secagg_msg_decode: NULL argument");
  if (len > max_len)
    return ot_error(OT_ERR_RANGE, "secagg message of %zu bytes exceeds the limit of %zu", len, max_len);
  if (ot_sodium_init()) return OT_ERR_INTERNAL;
  ot_pb_alloc ca;
  ot_pb_alloc_init(&ca, 2 * len + 4096);
  Offtune__Secagg__SecAggMsg *m = offtune__secagg__sec_agg_msg__unpack(&ca.a, len, wire);
  if (!m) return ot_error(OT_ERR_FORMAT, "malformed secagg message (%zu bytes)", len);
  int rc = OT_OK;
  if (m->stage < OT_SA_ADVERTISE || m->stage > OT_SA_UNMASK)
    rc = ot_error(OT_ERR_FORMAT, "secagg message with unknown stage %u", m->stage);
  else if (roster && m->device >= n)
    rc = ot_error(OT_ERR_RANGE, "secagg message from device %u of a roster of %u", m->device, n);
  else if (roster && (!m->has_signature || m->signature.len != 64))
    rc = ot_error(OT_ERR_FORMAT, "secagg message from device %u is not signed", m->device);
  else if (roster) {
    uint8_t d[64];
    sig_digest(m->stage, m->round_id, m->device, m->body.data, m->body.len, d);
    if (crypto_sign_verify_detached(m->signature.data, d, sizeof d, roster[m->device]) != 0)
      rc = ot_error(OT_ERR_MISMATCH, "secagg message claims device %u but its signature does not verify",
                    m->device);
  }
  if (rc == OT_OK) {
    uint8_t *b = malloc(m->body.len ? m->body.len : 1);
    if (!b)
      rc = ot_error(OT_ERR_NOMEM, "out of memory");
    else {
      if (m->body.len) memcpy(b, m->body.data, m->body.len);
      out->stage = m->stage;
      out->round_id = m->round_id;
      out->device = m->device;
      out->body = b;
      out->body_len = m->body.len;
      out->signed_ = roster != NULL;
    }
  }
  offtune__secagg__sec_agg_msg__free_unpacked(m, &ca.a);
  return rc;
}

int ot_secagg_msg_decode(const uint8_t *wire, size_t len, size_t max_len, ot_secagg_msg *out) {
  return decode_impl(wire, len, max_len, NULL, 0, out);
}

int ot_secagg_msg_decode_signed(const uint8_t *wire, size_t len, size_t max_len,
                                const uint8_t (*roster)[OT_PK_BYTES], uint32_t n, ot_secagg_msg *out) {
  if (!roster) return ot_error(OT_ERR_INVALID, "ot_secagg_msg_decode_signed: NULL roster");
  return decode_impl(wire, len, max_len, roster, n, out);
}

void ot_secagg_msg_clear(ot_secagg_msg *m) {
  if (!m) return;
  free(m->body);
  memset(m, 0, sizeof *m);
}
