#include "ot_dp.h"

#include <math.h>
#include <sodium.h>
#include <string.h>

#include "ot_error.h"

int ot_dp_clip_l2(float *v, size_t n, double clip, double *norm) {
  if ((!v && n) || !(clip > 0)) return ot_error(OT_ERR_INVALID, "ot_dp_clip_l2: bad argument");
  double ss = 0;
  for (size_t i = 0; i < n; i++) ss += (double)v[i] * v[i];
  if (!isfinite(ss)) return ot_error(OT_ERR_RANGE, "update has a non-finite value or norm");
  double nrm = sqrt(ss);
  if (nrm > clip) {
    float f = (float)(clip / nrm);
    for (size_t i = 0; i < n; i++) v[i] *= f;
  }
  if (norm) *norm = nrm;
  return OT_OK;
}

int ot_dp_rng_init(ot_dp_rng *r, const uint8_t *seed) {
  if (!r) return ot_error(OT_ERR_INVALID, "ot_dp_rng_init: NULL argument");
  if (sodium_init() < 0) return ot_error(OT_ERR_INTERNAL, "libsodium failed to initialise");
  if (seed)
    memcpy(r->key, seed, 32);
  else
    randombytes_buf(r->key, 32);
  r->block = 0;
  return OT_OK;
}

void ot_dp_rng_wipe(ot_dp_rng *r) {
  if (r) sodium_memzero(r, sizeof *r);
}

int ot_dp_add_gaussian(ot_dp_rng *r, float *v, size_t n, double stddev) {
  if (!r || (!v && n) || !(stddev >= 0) || !isfinite(stddev))
    return ot_error(OT_ERR_INVALID, "ot_dp_add_gaussian: bad argument");
  enum { BLK = 4096 }; /* values per ChaCha20 block seed */
  uint64_t u[BLK];
  for (size_t off = 0; off < n; off += BLK) {
    /* block seed = BLAKE2b(key, counter): an unbounded stream from randombytes_buf_deterministic */
    uint8_t seed[32], ctr[8];
    for (int i = 0; i < 8; i++) ctr[i] = (uint8_t)(r->block >> (8 * i));
    r->block++;
    crypto_generichash(seed, 32, ctr, 8, r->key, 32);
    size_t m = n - off < BLK ? n - off : BLK, pairs = (m + 1) / 2;
    randombytes_buf_deterministic(u, pairs * 2 * sizeof(uint64_t), seed);
    sodium_memzero(seed, sizeof seed);
    for (size_t p = 0; p < pairs; p++) {
      double u1 = ((double)(u[2 * p] >> 11) + 0.5) * 0x1p-53, u2 = (double)(u[2 * p + 1] >> 11) * 0x1p-53;
      double rad = sqrt(-2.0 * log(u1)) * stddev, th = 2.0 * M_PI * u2;
      v[off + 2 * p] += (float)(rad * cos(th));
      if (2 * p + 1 < m) v[off + 2 * p + 1] += (float)(rad * sin(th));
    }
  }
  sodium_memzero(u, sizeof u);
  return OT_OK;
}

double ot_dp_central_stddev(double z, double clip) { return z * clip; }
double ot_dp_device_stddev(double z, double clip, uint32_t m) { return m ? z * clip / sqrt((double)m) : 0; }

static const uint32_t orders[OT_DP_N_ORDERS] = {
    2,   3,   4,   5,   6,   7,   8,   9,   10,  11,  12,  13,  14,  15,  16,  17,  18,  19, 20,  21,
    22,  23,  24,  25,  26,  27,  28,  29,  30,  31,  32,  33,  34,  35,  36,  37,  38,  39, 40,  41,
    42,  43,  44,  45,  46,  47,  48,  49,  50,  51,  52,  53,  54,  55,  56,  57,  58,  59, 60,  61,
    62,  63,  64,  65,  66,  67,  68,  69,  70,  71,  72,  73,  74,  75,  76,  77,  78,  79, 80,  81,
    82,  83,  84,  85,  86,  87,  88,  89,  90,  91,  92,  93,  94,  95,  96,  97,  98,  99, 100, 110,
    120, 130, 140, 150, 160, 170, 180, 190, 200, 256, 320, 384, 512, 640, 768, 896, 1024};

const uint32_t *ot_dp_orders(void) { return orders; }

int ot_dp_rdp(double q, double z, uint32_t alpha, double *out) {
  if (!out || !(q >= 0 && q <= 1) || !(z > 0) || !isfinite(z) || alpha < 2)
    return ot_error(OT_ERR_INVALID, "ot_dp_rdp: need q in [0,1], z > 0, integer order >= 2");
  if (q == 0) {
    *out = 0;
    return OT_OK;
  }
  if (q == 1) {
    *out = alpha / (2.0 * z * z);
    return OT_OK;
  }
  /* A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 z^2)). Since the binomial weights
   * sum to 1, A_a - 1 = sum_{k>=2} C(a,k) (1-q)^(a-k) q^k expm1((k^2-k)/(2 z^2)): all
   * terms positive, summed in log space, so a tiny epsilon keeps its digits. */
  double lq = log(q), l1q = log1p(-q), la1 = lgamma(alpha + 1.0), mx = -INFINITY;
  double terms[1025];
  if (alpha > 1024) return ot_error(OT_ERR_RANGE, "RDP order %u above 1024", alpha);
  for (uint32_t k = 2; k <= alpha; k++) {
    double x = ((double)k * k - k) / (2.0 * z * z);
    double lem1 = x > 30 ? x + log1p(-exp(-x)) : log(expm1(x));
    double t = la1 - lgamma(k + 1.0) - lgamma(alpha - k + 1.0) + (alpha - k) * l1q + k * lq + lem1;
    terms[k] = t;
    if (t > mx) mx = t;
  }
  double s = 0;
  for (uint32_t k = 2; k <= alpha; k++) s += exp(terms[k] - mx);
  double lam1 = mx + log(s); /* log(A - 1) */
  double la = lam1 > 30 ? lam1 + log1p(exp(-lam1)) : log1p(exp(lam1));
  *out = la / (alpha - 1.0);
  return OT_OK;
}

void ot_dp_accountant_init(ot_dp_accountant *a) { memset(a, 0, sizeof *a); }

int ot_dp_accountant_step(ot_dp_accountant *a, double q, double z, uint32_t rounds) {
  if (!a) return ot_error(OT_ERR_INVALID, "ot_dp_accountant_step: NULL argument");
  double r[OT_DP_N_ORDERS];
  for (int i = 0; i < OT_DP_N_ORDERS; i++) {
    int rc = ot_dp_rdp(q, z, orders[i], &r[i]);
    if (rc) return rc;
  }
  for (int i = 0; i < OT_DP_N_ORDERS; i++) a->rdp[i] += rounds * r[i];
  a->rounds += rounds;
  return OT_OK;
}

static double eps_at(const double rdp[OT_DP_N_ORDERS], double delta, uint32_t *order) {
  double best = INFINITY;
  uint32_t bo = 0;
  for (int i = 0; i < OT_DP_N_ORDERS; i++) {
    double al = orders[i];
    double e = rdp[i] + log1p(-1.0 / al) - (log(delta) + log(al)) / (al - 1.0);
    if (e < best) best = e, bo = orders[i];
  }
  if (order) *order = bo;
  return best < 0 ? 0 : best;
}

int ot_dp_epsilon(const ot_dp_accountant *a, double delta, double *eps, uint32_t *order) {
  if (!a || !eps || !(delta > 0 && delta < 1))
    return ot_error(OT_ERR_INVALID, "ot_dp_epsilon: need 0 < delta < 1");
  if (a->rounds == 0) { /* nothing released yet; the conversion's slack would say otherwise */
    *eps = 0;
    if (order) *order = 0;
    return OT_OK;
  }
  *eps = eps_at(a->rdp, delta, order);
  return OT_OK;
}

int ot_dp_would_exceed(const ot_dp_accountant *a, double q, double z, double budget, double delta,
                       int *exceeds, double *eps_next) {
  if (!a || !exceeds || !(budget >= 0)) return ot_error(OT_ERR_INVALID, "ot_dp_would_exceed: bad argument");
  ot_dp_accountant next = *a;
  int rc = ot_dp_accountant_step(&next, q, z, 1);
  double e;
  if (rc == OT_OK) rc = ot_dp_epsilon(&next, delta, &e, NULL);
  if (rc) return rc;
  *exceeds = e > budget;
  if (eps_next) *eps_next = e;
  return OT_OK;
}

static int eps_for(double q, uint32_t rounds, double z, double delta, double *eps) {
  ot_dp_accountant a;
  ot_dp_accountant_init(&a);
  int rc = ot_dp_accountant_step(&a, q, z, rounds);
  return rc ? rc : ot_dp_epsilon(&a, delta, eps, NULL);
}

int ot_dp_find_noise(double q, uint32_t rounds, double eps, double delta, double *z) {
  if (!z || !(eps > 0) || rounds == 0 || !(q > 0 && q <= 1) || !(delta > 0 && delta < 1))
    return ot_error(OT_ERR_INVALID, "ot_dp_find_noise: need eps > 0, rounds > 0, 0 < q <= 1, 0 < delta < 1");
  double lo = 1e-2, hi = 1e4, e;
  int rc = eps_for(q, rounds, hi, delta, &e);
  if (rc) return rc;
  if (e > eps)
    return ot_error(OT_ERR_RANGE, "epsilon %g over %u rounds needs a noise multiplier above %g", eps, rounds,
                    hi);
  if ((rc = eps_for(q, rounds, lo, delta, &e))) return rc;
  if (e <= eps) {
    *z = lo;
    return OT_OK;
  }
  while (hi / lo > 1 + 1e-7) { /* epsilon falls as z grows: bisect in log z */
    double mid = sqrt(lo * hi);
    if ((rc = eps_for(q, rounds, mid, delta, &e))) return rc;
    if (e <= eps)
      hi = mid;
    else
      lo = mid;
  }
  *z = hi;
  return OT_OK;
}
