/* splitmix64, the one host-side RNG: tiny, full-period over 2^64 states, any seed (0 included)
 * is fine, and a saved state resumes the exact sequence. */
#ifndef OT_RNG_H
#define OT_RNG_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

static inline uint64_t ot_splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* Uniform double in [0, 1) from the top 53 bits of the next draw. */
static inline double ot_rng_uniform(uint64_t *state) {
  return (double)(ot_splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
}

/* Uniform double in (0, 1): the midpoint of the top 53 bits' cell, never 0 (a log's argument). */
static inline double ot_rng_open01(uint64_t *state) {
  return ((ot_splitmix64(state) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

/* out[0..n) = independent N(0, sd^2) draws (Box-Muller, both outputs of each pair of uniforms;
 * an odd n drops the last pair's second). */
static inline void ot_rng_fill_normal(uint64_t *state, double sd, float *out, size_t n) {
  for (size_t j = 0; j < n; j += 2) {
    double rad = sd * sqrt(-2.0 * log(ot_rng_open01(state)));
    double a = 2.0 * 3.14159265358979323846 * ot_rng_open01(state);
    out[j] = (float)(rad * cos(a));
    if (j + 1 < n) out[j + 1] = (float)(rad * sin(a));
  }
}

#endif
