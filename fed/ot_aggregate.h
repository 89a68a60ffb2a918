/* Aggregation of adapter updates (safetensors files of fp32 tensors with the same names
 * and shapes as the round's global adapter), and the checks an upload must pass first. */
#ifndef OT_AGGREGATE_H
#define OT_AGGREGATE_H

#include <stddef.h>
#include <stdint.h>

/* FedAvg, FedProx and FedAdam; then the robust rules (docs/daemon.md, "Robust
 * aggregation"), which need each device's update and so exclude secure aggregation:
 * norm-clipped FedAvg, coordinate-wise trimmed mean, coordinate-wise median. */
typedef enum {
  OT_AGG_FEDAVG = 0,
  OT_AGG_FEDPROX = 1,
  OT_AGG_FEDADAM = 2,
  OT_AGG_CLIP = 3,
  OT_AGG_TRIMMED = 4,
  OT_AGG_MEDIAN = 5,
  OT_AGG_NKIND
} ot_agg_kind;

/* "fedavg", "fedprox", "fedadam", "fedavg-clip", "trimmed-mean", "median"; "?" otherwise. */
const char *ot_agg_name(ot_agg_kind k);
/* The kind named s; OT_ERR_INVALID (with the names in the detail) if none. */
int ot_agg_parse(const char *s, ot_agg_kind *out);
/* 1 for the rules that need each update (clip, trimmed mean, median). */
int ot_agg_robust(ot_agg_kind k);

/* An upload is accepted only if: at most max_bytes, a valid safetensors file, exactly
 * the reference's tensor names, each F32 with the reference's shape, every value
 * finite, and (max_norm > 0) the L2 norm of its difference to the reference at most
 * max_norm. The error detail says which check failed. */
int ot_agg_validate(const char *path, const char *ref_path, uint64_t max_bytes, double max_norm);

typedef struct {
  ot_agg_kind kind;
  float server_lr, beta1, beta2, eps; /* FedAdam */
  double max_norm;                    /* L2 bound on an update's delta; 0: none */
  double trim;                        /* trimmed-mean: fraction trimmed per side */
} ot_agg_params;

/* What became of one update: its delta's L2 norm (infinite when the delta overflows
 * float) and whether it was used as is, clipped to max_norm (fedavg-clip) or refused
 * (norm above max_norm, or not finite). */
typedef enum { OT_UPD_USED = 0, OT_UPD_CLIPPED = 1, OT_UPD_REFUSED = 2 } ot_upd_fate;
typedef struct {
  double norm;
  ot_upd_fate fate;
} ot_agg_note;

/* The round's new adapter from updates u_i (files paths[i], weights w_i = tokens) and
 * the round's adapter g (ref_path); delta_i = u_i - g. Every update whose delta's norm
 * exceeds max_norm (when > 0) or is not finite is refused first (fedavg-clip: scaled to
 * max_norm instead). Then, over the m updates left:
 *   fedavg, fedprox  sum_i w_i u_i / sum_i w_i (FedProx's proximal term acts on devices)
 *   fedadam          (Reddi et al. 2021) delta = avg - g as a pseudo-gradient:
 *                    m = b1 m + (1-b1) delta, v = b2 v + (1-b2) delta^2,
 *                    g += lr m / (sqrt(v) + eps); m and v from state_in (NULL: zeros),
 *                    written to state_out
 *   fedavg-clip      g + sum_i w_i c_i delta_i / sum_i w_i, c_i = min(1, max_norm/|delta_i|)
 *   trimmed-mean     per coordinate: the mean of the u_i left after dropping the
 *                    ot_agg_trim_count(m, trim) lowest and as many highest (unweighted)
 *   median           per coordinate: the median of the u_i (unweighted; even m: the mean
 *                    of the middle two)
 * With m = 0 the result is g (and FedAdam's moments are kept). The result goes to
 * out_path (atomic write), in the reference's tensor order; notes (NULL or n entries)
 * say what became of each update. The robust rules hold all m updates in memory. */
int ot_aggregate(const ot_agg_params *p, const char *ref_path, const char *const *paths,
                 const double *weights, int n, const char *state_in, const char *out_path,
                 const char *state_out, ot_agg_note *notes);

/* Values trimmed per side of m: floor(trim m), at least 1 when m >= 3, at most (m-1)/2. */
int ot_agg_trim_count(int m, double trim);
/* The median and the trimmed mean (k per side) of v[0..m-1]; v is sorted in place. */
double ot_agg_median(double *v, int m);
double ot_agg_trimmed_mean(double *v, int m, int k);

/* The unmasked sum of count updates (secure aggregation): each update is bounded by
 * max_norm, so the sum must be finite with L2 norm <= count x max_norm (max_norm 0: only
 * finite). *norm = its norm. OT_ERR_RANGE when it is not. */
int ot_agg_check_sum(const float *sum, size_t n, uint32_t count, double max_norm, double *norm);

#endif
