/* Aggregation of adapter updates (safetensors files of fp32 tensors with the same names
 * and shapes as the round's global adapter), and the checks an upload must pass first. */
#ifndef OT_AGGREGATE_H
#define OT_AGGREGATE_H

#include <stdint.h>

#include "ot_session.h"

/* An upload is accepted only if: at most max_bytes, a valid safetensors file, exactly
 * the reference's tensor names, each F32 with the reference's shape, every value
 * finite. The error detail says which check failed. */
int ot_agg_validate(const char *path, const char *ref_path, uint64_t max_bytes);

typedef struct {
  ot_agg_kind kind;
  float server_lr, beta1, beta2, eps; /* FedAdam */
} ot_agg_params;

/* avg = sum_i w_i u_i / sum_i w_i (FedAvg weighted by tokens; also FedProx, whose
 * proximal term acts on the devices). FedAdam (Reddi et al. 2021) treats
 * delta = avg - global as a pseudo-gradient: m = b1 m + (1-b1) delta,
 * v = b2 v + (1-b2) delta^2, global += lr m / (sqrt(v) + eps), with m and v read from
 * state_in (NULL: zeros) and written to state_out. The result goes to out_path
 * (atomic write), in the reference's tensor order. */
int ot_aggregate(const ot_agg_params *p, const char *ref_path, const char *const *paths,
                 const double *weights, int n, const char *state_in, const char *out_path,
                 const char *state_out);

#endif
