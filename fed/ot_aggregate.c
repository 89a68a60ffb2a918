#include "ot_aggregate.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ot_dp.h"
#include "ot_error.h"
#include "ot_safetensors.h"

static const char *agg_names[OT_AGG_NKIND] = {"fedavg",      "fedprox",      "fedadam",
                                              "fedavg-clip", "trimmed-mean", "median"};
const char *ot_agg_name(ot_agg_kind k) { return (unsigned)k < OT_AGG_NKIND ? agg_names[k] : "?"; }
int ot_agg_robust(ot_agg_kind k) { return k == OT_AGG_CLIP || k == OT_AGG_TRIMMED || k == OT_AGG_MEDIAN; }

int ot_agg_parse(const char *s, ot_agg_kind *out) {
  for (int i = 0; s && i < OT_AGG_NKIND; i++)
    if (strcmp(s, agg_names[i]) == 0) {
      *out = (ot_agg_kind)i;
      return OT_OK;
    }
  return ot_error(OT_ERR_INVALID,
                  "aggregation '%s': use fedavg, fedprox, fedadam, fedavg-clip, trimmed-mean or median",
                  s ? s : "");
}

/* All tensors of a file as fp32 host arrays, in file order. */
typedef struct {
  ot_safetensors *st;
  size_t n;
  float **data;
} tset;

static void tset_free(tset *t) {
  for (size_t i = 0; t->data && i < t->n; i++) free(t->data[i]);
  free(t->data);
  ot_st_close(t->st);
  memset(t, 0, sizeof *t);
}

static int tset_load(const char *path, tset *out) {
  tset t = {0};
  int rc = ot_st_open(path, &t.st);
  if (rc) return rc;
  t.n = ot_st_count(t.st);
  t.data = calloc(t.n ? t.n : 1, sizeof *t.data);
  if (!t.data) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  for (size_t i = 0; rc == OT_OK && i < t.n; i++) {
    const ot_st_tensor *x = ot_st_at(t.st, i);
    t.data[i] = malloc((x->numel ? x->numel : 1) * sizeof(float));
    rc = t.data[i] ? ot_st_read_f32(t.st, x, t.data[i], x->numel) : ot_error(OT_ERR_NOMEM, "cannot allocate");
  }
  if (rc) {
    tset_free(&t);
    return rc;
  }
  *out = t;
  return OT_OK;
}

int ot_agg_validate(const char *path, const char *ref_path, uint64_t max_bytes, double max_norm) {
  struct stat sb;
  if (stat(path, &sb) != 0) return ot_error(OT_ERR_NOTFOUND, "no uploaded file");
  if ((uint64_t)sb.st_size > max_bytes)
    return ot_error(OT_ERR_RANGE, "oversized: %lld bytes, the limit is %llu", (long long)sb.st_size,
                    (unsigned long long)max_bytes);
  ot_safetensors *up = NULL, *ref = NULL;
  int rc = ot_st_open(path, &up);
  if (rc) return ot_error(OT_ERR_FORMAT, "not a valid safetensors file");
  rc = ot_st_open(ref_path, &ref);
  if (rc == OT_OK && ot_st_count(up) != ot_st_count(ref))
    rc = ot_error(OT_ERR_MISMATCH, "%zu tensors, the adapter has %zu", ot_st_count(up), ot_st_count(ref));
  float *buf = NULL, *rbuf = NULL;
  double sq = 0; /* squared norm of the delta to the reference */
  for (size_t i = 0; rc == OT_OK && i < ot_st_count(ref); i++) {
    const ot_st_tensor *r = ot_st_at(ref, i), *u = ot_st_find(up, r->name);
    if (!u) {
      rc = ot_error(OT_ERR_MISMATCH, "tensor '%s' is missing", r->name);
      break;
    }
    if (u->dtype != OT_DTYPE_F32) {
      rc = ot_error(OT_ERR_MISMATCH, "tensor '%s' is %s, not F32", u->name, ot_dtype_name(u->dtype));
      break;
    }
    int same = u->ndim == r->ndim;
    for (int d = 0; same && d < r->ndim; d++) same = u->shape[d] == r->shape[d];
    if (!same) {
      rc = ot_error(OT_ERR_MISMATCH, "tensor '%s' has the wrong shape", u->name);
      break;
    }
    float *nb = realloc(buf, (u->numel ? u->numel : 1) * sizeof(float));
    if (!nb) {
      rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
      break;
    }
    buf = nb;
    rc = ot_st_read_f32(up, u, buf, u->numel);
    for (uint64_t k = 0; rc == OT_OK && k < u->numel; k++)
      if (!isfinite(buf[k]))
        rc = ot_error(OT_ERR_RANGE, "tensor '%s' has a non-finite value at %llu", u->name,
                      (unsigned long long)k);
    if (rc == OT_OK && max_norm > 0) {
      nb = realloc(rbuf, (r->numel ? r->numel : 1) * sizeof(float));
      rc = nb ? ot_st_read_f32(ref, r, nb, r->numel) : ot_error(OT_ERR_NOMEM, "cannot allocate");
      if (nb) rbuf = nb;
      for (uint64_t k = 0; rc == OT_OK && k < r->numel; k++) {
        double dk = (double)buf[k] - (double)rbuf[k];
        sq += dk * dk;
      }
    }
  }
  if (rc == OT_OK && max_norm > 0 && !(sqrt(sq) <= max_norm))
    rc = ot_error(OT_ERR_RANGE,
                  "the update's distance to the round's adapter is %.4g, over the session's bound %.4g",
                  sqrt(sq), max_norm);
  free(rbuf);
  free(buf);
  ot_st_close(up);
  ot_st_close(ref);
  return rc;
}

/* Writes flat (the reference's tensors end to end) with shape_of's names and shapes. */
static int save(const tset *shape_of, const float *flat, const char *path) {
  ot_st_writer *w = NULL;
  int rc = ot_st_writer_new(&w);
  uint64_t off = 0;
  for (size_t i = 0; rc == OT_OK && i < shape_of->n; i++) {
    const ot_st_tensor *x = ot_st_at(shape_of->st, i);
    rc = ot_st_writer_add(w, x->name, OT_DTYPE_F32, x->ndim, x->shape, flat + off);
    off += x->numel;
  }
  if (rc == OT_OK) rc = ot_st_writer_set_metadata(w, "format", "pt");
  if (rc == OT_OK) rc = ot_st_writer_save(w, path);
  ot_st_writer_free(w);
  return rc;
}

/* L2 norm of v (double accumulation); OT_ERR_RANGE when not finite. ot_dp_clip_l2 with
 * an infinite clip measures without scaling, so v is not written. */
static int l2_norm(const float *v, size_t n, double *norm) {
  return ot_dp_clip_l2((float *)(uintptr_t)v, n, INFINITY, norm);
}

int ot_agg_trim_count(int m, double trim) {
  /* trim is a float setting: 0.35f * 20 = 6.9999998 must still trim 7 */
  int k = (int)floor(trim * m * (1 + 1e-6));
  if (m >= 3 && k < 1) k = 1;
  if (k > (m - 1) / 2) k = m > 0 ? (m - 1) / 2 : 0;
  return k;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

double ot_agg_median(double *v, int m) {
  qsort(v, (size_t)m, sizeof *v, cmp_double);
  return m % 2 ? v[m / 2] : (v[m / 2 - 1] + v[m / 2]) / 2;
}

double ot_agg_trimmed_mean(double *v, int m, int k) {
  qsort(v, (size_t)m, sizeof *v, cmp_double);
  double s = 0;
  for (int i = k; i < m - k; i++) s += v[i];
  return s / (m - 2 * k);
}

int ot_agg_check_sum(const float *sum, size_t n, uint32_t count, double max_norm, double *norm) {
  double nrm = 0;
  if (l2_norm(sum, n, &nrm) != OT_OK)
    return ot_error(OT_ERR_RANGE, "the unmasked sum has a non-finite value");
  *norm = nrm;
  if (max_norm > 0 && nrm > count * max_norm)
    return ot_error(OT_ERR_RANGE,
                    "the unmasked sum of %u updates has norm %.6g > %u x the bound %g: some device sent an "
                    "update beyond the bound",
                    count, nrm, count, max_norm);
  return OT_OK;
}

/* FedAdam's step on avg (in place) from g; m and v (n each) are read and updated. */
static void fedadam_step(const ot_agg_params *p, const float *g, float *avg, float *m, float *v, uint64_t n) {
  for (uint64_t k = 0; k < n; k++) {
    float delta = avg[k] - g[k];
    m[k] = p->beta1 * m[k] + (1 - p->beta1) * delta;
    v[k] = p->beta2 * v[k] + (1 - p->beta2) * delta * delta;
    avg[k] = g[k] + p->server_lr * m[k] / (sqrtf(v[k]) + p->eps);
  }
}

/* FedAdam's state (m.<tensor>, v.<tensor>): read from state_in (NULL: zeros), stepped
 * unless keep (no update was used), written to state_out. */
static int fedadam(const ot_agg_params *p, const tset *ref, const float *g, float *avg, uint64_t dim,
                   const char *state_in, const char *state_out, int keep) {
  int rc = OT_OK;
  tset st = {0};
  float *mv = calloc(2 * dim + 1, sizeof *mv); /* m then v, each flat like g */
  char(*names)[256] = calloc(2 * ref->n + 1, sizeof *names);
  if (!mv || !names) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  if (rc == OT_OK && state_in) rc = tset_load(state_in, &st);
  uint64_t off = 0;
  for (size_t t = 0; rc == OT_OK && t < ref->n; t++) {
    const ot_st_tensor *x = ot_st_at(ref->st, t);
    for (int h = 0; h < 2 && rc == OT_OK; h++) {
      snprintf(names[2 * t + h], 256, "%c.%s", h ? 'v' : 'm', x->name);
      if (!state_in) continue;
      const ot_st_tensor *s = ot_st_find(st.st, names[2 * t + h]);
      if (!s || s->numel != x->numel)
        rc = ot_error(OT_ERR_FORMAT, "FedAdam state %s: tensor '%s' missing", state_in, names[2 * t + h]);
      else
        memcpy(mv + h * dim + off, st.data[s - ot_st_at(st.st, 0)], x->numel * sizeof(float));
    }
    off += x->numel;
  }
  if (rc == OT_OK && !keep) fedadam_step(p, g, avg, mv, mv + dim, dim);
  ot_st_writer *w = NULL;
  if (rc == OT_OK) rc = ot_st_writer_new(&w);
  off = 0;
  for (size_t t = 0; rc == OT_OK && t < ref->n; t++) {
    const ot_st_tensor *x = ot_st_at(ref->st, t);
    for (int h = 0; h < 2 && rc == OT_OK; h++)
      rc = ot_st_writer_add(w, names[2 * t + h], OT_DTYPE_F32, x->ndim, x->shape, mv + h * dim + off);
    off += x->numel;
  }
  if (rc == OT_OK) rc = ot_st_writer_save(w, state_out);
  ot_st_writer_free(w);
  free(names);
  free(mv);
  tset_free(&st);
  return rc;
}

/* Update file path as one flat vector in the reference's tensor order. */
static int load_flat(const char *path, const char *ref_path, const tset *ref, float *x) {
  int rc = ot_agg_validate(path, ref_path, UINT64_MAX, 0);
  tset u = {0};
  if (rc == OT_OK) rc = tset_load(path, &u);
  uint64_t off = 0;
  for (size_t t = 0; rc == OT_OK && t < ref->n; t++) {
    const ot_st_tensor *r = ot_st_at(ref->st, t), *y = ot_st_find(u.st, r->name);
    memcpy(x + off, u.data[y - ot_st_at(u.st, 0)], r->numel * sizeof(float));
    off += r->numel;
  }
  tset_free(&u);
  return rc;
}

int ot_aggregate(const ot_agg_params *p, const char *ref_path, const char *const *paths,
                 const double *weights, int n, const char *state_in, const char *out_path,
                 const char *state_out, ot_agg_note *notes) {
  if (n < 1) return ot_error(OT_ERR_INVALID, "no updates to aggregate");
  if ((unsigned)p->kind >= OT_AGG_NKIND) return ot_error(OT_ERR_INVALID, "aggregation kind %d", (int)p->kind);
  if (p->kind == OT_AGG_CLIP && !(p->max_norm > 0))
    return ot_error(OT_ERR_INVALID, "fedavg-clip needs a norm bound > 0");
  for (int i = 0; i < n; i++)
    if (!(weights[i] > 0)) return ot_error(OT_ERR_INVALID, "update %d has weight %g", i, weights[i]);
  int coord = p->kind == OT_AGG_TRIMMED || p->kind == OT_AGG_MEDIAN;
  tset ref = {0};
  int rc = tset_load(ref_path, &ref);
  if (rc) return rc;
  uint64_t dim = 0;
  for (size_t t = 0; t < ref.n; t++) dim += ot_st_at(ref.st, t)->numel;
  size_t nb = dim ? dim : 1;
  float *g = malloc(nb * sizeof *g), *avg = malloc(nb * sizeof *avg), *x = malloc(nb * sizeof *x);
  float *delta = malloc(nb * sizeof *delta);
  double *acc = coord ? NULL : calloc(nb, sizeof *acc); /* accumulated in double */
  float **kept = calloc((size_t)n, sizeof *kept);       /* coordinate rules: the updates used */
  if (!g || !avg || !x || !delta || (!coord && !acc) || !kept) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  uint64_t off = 0;
  for (size_t t = 0; rc == OT_OK && t < ref.n; t++) {
    memcpy(g + off, ref.data[t], ot_st_at(ref.st, t)->numel * sizeof(float));
    off += ot_st_at(ref.st, t)->numel;
  }
  double wsum = 0;
  int used = 0;
  for (int i = 0; rc == OT_OK && i < n; i++) {
    rc = load_flat(paths[i], ref_path, &ref, x);
    if (rc) break;
    for (uint64_t k = 0; k < dim; k++) delta[k] = x[k] - g[k];
    ot_agg_note note = {INFINITY, OT_UPD_REFUSED};
    /* values are finite (validated); a delta past float's range is refused as non-finite */
    if (l2_norm(delta, dim, &note.norm) != OT_OK)
      note.norm = INFINITY;
    else if (p->kind == OT_AGG_CLIP)
      note.fate = note.norm > p->max_norm ? OT_UPD_CLIPPED : OT_UPD_USED;
    else if (!(p->max_norm > 0) || note.norm <= p->max_norm)
      note.fate = OT_UPD_USED;
    if (notes) notes[i] = note;
    if (note.fate == OT_UPD_REFUSED) continue;
    wsum += weights[i];
    used++;
    if (coord) {
      kept[i] = x; /* kept whole: the rule needs every update per coordinate */
      if (!(x = malloc(nb * sizeof *x))) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    } else if (p->kind == OT_AGG_CLIP) {
      /* the scale in double: a float factor for a 1e38 update would be subnormal */
      double c = note.fate == OT_UPD_CLIPPED ? p->max_norm / note.norm : 1.0;
      for (uint64_t k = 0; k < dim; k++) acc[k] += weights[i] * (c * (double)delta[k]);
    } else {
      for (uint64_t k = 0; k < dim; k++) acc[k] += weights[i] * (double)x[k];
    }
  }
  double *col = rc == OT_OK && coord ? malloc((size_t)(used ? used : 1) * sizeof *col) : NULL;
  if (rc == OT_OK && coord && !col) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  int trim = ot_agg_trim_count(used, p->trim);
  for (uint64_t k = 0; rc == OT_OK && k < dim; k++) {
    if (used == 0) {
      avg[k] = g[k]; /* every update refused: the round leaves the adapter as it was */
    } else if (coord) {
      int j = 0;
      for (int i = 0; i < n; i++)
        if (kept[i]) col[j++] = kept[i][k];
      avg[k] =
          (float)(p->kind == OT_AGG_MEDIAN ? ot_agg_median(col, used) : ot_agg_trimmed_mean(col, used, trim));
    } else if (p->kind == OT_AGG_CLIP) {
      avg[k] = (float)((double)g[k] + acc[k] / wsum);
    } else {
      avg[k] = (float)(acc[k] / wsum);
    }
  }
  if (rc == OT_OK && p->kind == OT_AGG_FEDADAM)
    rc = fedadam(p, &ref, g, avg, dim, state_in, state_out, used == 0);
  if (rc == OT_OK) rc = save(&ref, avg, out_path);
  for (int i = 0; kept && i < n; i++) free(kept[i]);
  free(kept);
  free(col);
  free(acc);
  free(delta);
  free(x);
  free(avg);
  free(g);
  tset_free(&ref);
  return rc;
}
