/* Client-level differential privacy for federated rounds (docs/secagg.md):
 *
 *   clipping     each device's update is scaled to L2 norm <= C (device side, or the
 *                cloud's when it sees updates; under secure aggregation the device
 *                clips before masking)
 *   noise        Gaussian N(0, (z C)^2) per coordinate on the sum: added by the cloud
 *                after unmasking (central), or split over the m devices as
 *                N(0, (z C)^2 / m) each, so the masked sum carries the full variance
 *                (distributed; it holds while all m devices are honest and included)
 *   accountant   Renyi DP of the Poisson-subsampled Gaussian mechanism at integer
 *                orders (Mironov, Talwar, Zhang 2019, Sec. 3.3), composed over rounds,
 *                converted to (epsilon, delta) by Balle et al. (2020), Thm 21:
 *                eps = min_a rdp(a) + log((a-1)/a) - (log delta + log a)/(a-1)
 *
 * Sensitivity: one device's whole update (add/remove one device), so z is the noise
 * multiplier of the sum and q = devices sampled per round / population. */
#ifndef OT_DP_H
#define OT_DP_H

#include <stddef.h>
#include <stdint.h>

/* Scales v in place to L2 norm <= clip; *norm (optional) = the norm before. Non-finite
 * values are refused (OT_ERR_RANGE) and v is left untouched. */
int ot_dp_clip_l2(float *v, size_t n, double clip, double *norm);

/* Gaussian noise from a ChaCha20 stream (libsodium); Box-Muller on 53-bit uniforms. */
typedef struct {
  uint8_t key[32];
  uint64_t block;
} ot_dp_rng;

/* seed NULL: a fresh random key (production); a fixed seed for tests. */
int ot_dp_rng_init(ot_dp_rng *r, const uint8_t *seed);
void ot_dp_rng_wipe(ot_dp_rng *r);
/* v[i] += N(0, stddev^2). */
int ot_dp_add_gaussian(ot_dp_rng *r, float *v, size_t n, double stddev);
/* Central noise on the sum: stddev z * clip. Distributed: each of m devices adds
 * z * clip / sqrt(m). */
double ot_dp_central_stddev(double z, double clip);
double ot_dp_device_stddev(double z, double clip, uint32_t m);

/* The RDP orders the accountant tracks (integers 2..1024). */
#define OT_DP_N_ORDERS 117
const uint32_t *ot_dp_orders(void);

/* RDP at integer order alpha >= 2 of one round of the Poisson-subsampled Gaussian
 * (sampling rate q in [0, 1], noise multiplier z > 0). */
int ot_dp_rdp(double q, double z, uint32_t alpha, double *out);

typedef struct {
  double rdp[OT_DP_N_ORDERS]; /* composed over the rounds so far */
  uint32_t rounds;
} ot_dp_accountant;

void ot_dp_accountant_init(ot_dp_accountant *a);
/* Composes `rounds` more rounds at (q, z). */
int ot_dp_accountant_step(ot_dp_accountant *a, double q, double z, uint32_t rounds);
/* epsilon spent at delta; *order (optional) = the order that gave it. */
int ot_dp_epsilon(const ot_dp_accountant *a, double delta, double *eps, uint32_t *order);
/* Whether one more round at (q, z) would take epsilon (at delta) over budget:
 * *exceeds = 1 or 0, *eps_next (optional) = epsilon after that round. */
int ot_dp_would_exceed(const ot_dp_accountant *a, double q, double z, double budget, double delta,
                       int *exceeds, double *eps_next);
/* The smallest noise multiplier z (to 1e-6 relative) with epsilon(R rounds at q) <= eps. */
int ot_dp_find_noise(double q, uint32_t rounds, double eps, double delta, double *z);

#endif
