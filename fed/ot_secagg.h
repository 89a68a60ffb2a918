/* Secure aggregation: what the cloud (fed/ot_secagg_server.h) and the devices
 * (fed/ot_secagg_client.h) share. Bonawitz et al. (2017) pairwise masking with
 * SecAgg+ sparse neighbourhoods (Bell et al. 2020); docs/secagg.md has the protocol.
 *
 *   quantisation   clip to [-clip, clip], scale, round (deterministic or stochastic)
 *                  to integers mod 2^32 so that the sum of n devices cannot wrap
 *   masks          ChaCha20 expansion of a 32-byte seed (randombytes_buf_deterministic)
 *   Shamir         t-of-h sharing of 32-byte secrets over GF(2^61 - 1)
 *   agreement      X25519 + BLAKE2b bound to the round, both indices and both keys
 *   graph          each device's neighbours: a k-regular Harary graph over a
 *                  permutation of the roster drawn from the round id, so every party
 *                  computes the same graph without talking
 *   messages       protocol/secagg.proto, decoded with size caps and strict checks
 *
 * All functions return OT_OK or a negative ot_status (common/ot_error.h). */
#ifndef OT_SECAGG_H
#define OT_SECAGG_H

#include <stddef.h>
#include <stdint.h>

#include "ot_identity.h"

#define OT_SA_SEED_BYTES 32
#define OT_SA_P ((1ULL << 61) - 1) /* the Shamir field GF(2^61 - 1) */
#define OT_SA_ELEMS 5              /* a 32-byte secret = 4 x 56 bits + 32 bits */
#define OT_SA_SHARE_BYTES 44       /* x (u32) || 5 x u64 */
#define OT_SA_MAX_DEVICES 100000
/* A sealed share pair: nonce (24) || AEAD of from, to, 2 x (share || owner signature) || tag */
#define OT_SA_BOX_BYTES (24 + 8 + 2 * (OT_SA_SHARE_BYTES + 64) + 16)

/* Stages, in order; also the `stage` field of every message. */
typedef enum {
  OT_SA_ADVERTISE = 1, /* device: keys       cloud: KeyList to each device   */
  OT_SA_SHARES = 2,    /* device: shares     cloud: ShareList to each device */
  OT_SA_MASKED = 3,    /* device: masked in  cloud: UnmaskRequest             */
  OT_SA_UNMASK = 4,    /* device: shares     cloud: the sum                   */
  OT_SA_DONE = 5,
  OT_SA_FAILED = 6,
} ot_secagg_stage;

/* Share kinds revealed at the unmask stage. */
enum { OT_SA_KIND_SELF = 0, OT_SA_KIND_MASKKEY = 1 };

typedef struct {
  uint32_t dim;       /* update length (floats) */
  float clip;         /* quantisation range [-clip, clip] per coordinate */
  int stochastic;     /* 1: unbiased stochastic rounding; 0: round to nearest */
  uint32_t degree;    /* neighbours per device (even; 0: 4 * ceil(log2 n)); >= n-1: all */
  uint32_t threshold; /* t of the h = degree + 1 holders (0: floor(h/2) + 1, at least 2) */
} ot_secagg_params;

/* Validates `in` for a round of n devices and fills the defaults into *out
 * (degree capped at n-1, threshold within [2, degree + 1]). */
int ot_secagg_params_resolve(const ot_secagg_params *in, uint32_t n, ot_secagg_params *out);

/* ---- quantisation ---- */

/* The scale s such that n values in [-clip*s - 1, clip*s + 1] sum inside int32. */
double ot_secagg_scale(float clip, uint32_t n);
/* q[i] = round(clamp(x[i]) * scale) mod 2^32. Stochastic rounding draws from a ChaCha20
 * stream keyed by rng_seed (NULL: a fresh random seed). */
int ot_secagg_quantize(const float *x, size_t n, float clip, double scale, int stochastic,
                       const uint8_t *rng_seed, uint32_t *q);
/* out[i] = (int32)sum[i] / scale. */
void ot_secagg_dequantize(const uint32_t *sum, size_t n, double scale, float *out);

/* ---- masks ---- */

/* v[i] += sign * PRG(seed)[i] mod 2^32 (sign +1 or -1). PRG(seed) is exactly
 * randombytes_buf_deterministic(seed) read as u32 words (ChaCha20-IETF keyed by the seed,
 * nonce "LibsodiumDRG"), generated 64 KiB at a time from its block counter. */
void ot_secagg_mask_apply(uint32_t *v, size_t n, const uint8_t seed[OT_SA_SEED_BYTES], int sign);
/* The same for m masks in one pass over v, chunk by chunk (cache-resident keystream),
 * the chunks shared among OpenMP threads. */
void ot_secagg_masks_apply(uint32_t *v, size_t n, const uint8_t (*seeds)[OT_SA_SEED_BYTES],
                           const int8_t *signs, size_t m);

/* ---- Shamir over GF(2^61 - 1) ---- */

/* Splits a 32-byte secret into n shares at the distinct non-zero points xs[i]
 * (degree t-1 polynomials with fresh random coefficients). */
int ot_shamir_split(const uint8_t secret[32], uint32_t t, const uint32_t *xs, uint32_t n,
                    uint8_t (*shares)[OT_SA_SHARE_BYTES]);
/* Reconstructs from the first t of k shares (k >= t; distinct non-zero x, elements < p).
 * OT_ERR_MISMATCH when the result is not a valid secret (inconsistent shares). */
int ot_shamir_combine(const uint8_t (*shares)[OT_SA_SHARE_BYTES], uint32_t k, uint32_t t, uint8_t secret[32]);

/* ---- pairwise agreement ---- */

/* BLAKE2b-256 keyed by X25519(sk, peer_pk) over "offtune/secagg1" || label || round ||
 * both indices and both public keys ordered by index. Both ends get the same key;
 * refuses a low-order peer key. label: 'm' mask seed, 'e' share encryption. */
int ot_secagg_agree(const uint8_t sk[32], const uint8_t my_pk[32], uint32_t me, const uint8_t peer_pk[32],
                    uint32_t peer, uint64_t round_id, char label, uint8_t out[32]);
/* 1 if pk is a usable X25519 public key (not of small order), else 0. */
int ot_secagg_pk_ok(const uint8_t pk[32]);
/* BLAKE2b-256 commitment to a self-mask seed. */
void ot_secagg_commit(const uint8_t seed[32], uint64_t round_id, uint32_t device, uint8_t out[32]);

/* ---- neighbour graph ---- */

typedef struct ot_secagg_graph ot_secagg_graph;

/* The round's graph: n devices (roster = their Ed25519 keys), `degree` neighbours each. */
int ot_secagg_graph_new(uint64_t round_id, const uint8_t (*roster)[OT_PK_BYTES], uint32_t n, uint32_t degree,
                        ot_secagg_graph **out);
void ot_secagg_graph_free(ot_secagg_graph *g);
/* Device i's neighbours in ascending order (the pointer lives as long as g). */
const uint32_t *ot_secagg_graph_neighbours(const ot_secagg_graph *g, uint32_t i, uint32_t *count);
int ot_secagg_graph_adjacent(const ot_secagg_graph *g, uint32_t i, uint32_t j);

/* ---- messages (the SecAggMsg wrapper) ---- */

typedef struct {
  uint32_t stage;
  uint64_t round_id;
  uint32_t device;
  uint8_t *body; /* malloc'd copy */
  size_t body_len;
  int signed_; /* a valid signature by roster[device] was present and checked */
} ot_secagg_msg;

/* Wraps body; signs it with id when id is non-NULL (device to cloud). */
int ot_secagg_msg_encode(uint32_t stage, uint64_t round_id, uint32_t device, const uint8_t *body, size_t len,
                         const ot_identity *id, uint8_t **out, size_t *out_len);
/* Unwraps at most max_len bytes. With signer_pk non-NULL the signature is required and
 * checked against it (pass the roster key of the claimed device: decode first with
 * signer_pk NULL to learn m.device, or use ot_secagg_msg_decode_signed). */
int ot_secagg_msg_decode(const uint8_t *wire, size_t len, size_t max_len, ot_secagg_msg *out);
/* Decodes and checks the signature against roster[device] (device < n). */
int ot_secagg_msg_decode_signed(const uint8_t *wire, size_t len, size_t max_len,
                                const uint8_t (*roster)[OT_PK_BYTES], uint32_t n, ot_secagg_msg *out);
void ot_secagg_msg_clear(ot_secagg_msg *m);

/* Signature over a share an owner deals to a holder (verified by holder and cloud). */
void ot_secagg_share_sig_msg(uint64_t round_id, uint32_t owner, uint32_t holder, uint32_t kind,
                             const uint8_t share[OT_SA_SHARE_BYTES], uint8_t out[80]);

/* Little-endian helpers shared by the two sides. */
static inline void ot_sa_put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void ot_sa_put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint32_t ot_sa_get32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t ot_sa_get64(const uint8_t *p) {
  return (uint64_t)ot_sa_get32(p) | (uint64_t)ot_sa_get32(p + 4) << 32;
}

#endif
