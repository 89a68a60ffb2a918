/* splitmix64, the one host-side RNG: tiny, full-period over 2^64 states, any seed (0 included)
 * is fine, and a saved state resumes the exact sequence. */
#ifndef OT_RNG_H
#define OT_RNG_H

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

#endif
