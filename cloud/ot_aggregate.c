#include "ot_aggregate.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ot_error.h"
#include "ot_safetensors.h"

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

int ot_agg_validate(const char *path, const char *ref_path, uint64_t max_bytes) {
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
  float *buf = NULL;
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
  }
  free(buf);
  ot_st_close(up);
  ot_st_close(ref);
  return rc;
}

static int save(const tset *shape_of, float **data, const char *path) {
  ot_st_writer *w = NULL;
  int rc = ot_st_writer_new(&w);
  for (size_t i = 0; rc == OT_OK && i < shape_of->n; i++) {
    const ot_st_tensor *x = ot_st_at(shape_of->st, i);
    rc = ot_st_writer_add(w, x->name, OT_DTYPE_F32, x->ndim, x->shape, data[i]);
  }
  if (rc == OT_OK) rc = ot_st_writer_set_metadata(w, "format", "pt");
  if (rc == OT_OK) rc = ot_st_writer_save(w, path);
  ot_st_writer_free(w);
  return rc;
}

int ot_aggregate(const ot_agg_params *p, const char *ref_path, const char *const *paths,
                 const double *weights, int n, const char *state_in, const char *out_path,
                 const char *state_out) {
  if (n < 1) return ot_error(OT_ERR_INVALID, "no updates to aggregate");
  double wsum = 0;
  for (int i = 0; i < n; i++) {
    if (!(weights[i] > 0)) return ot_error(OT_ERR_INVALID, "update %d has weight %g", i, weights[i]);
    wsum += weights[i];
  }
  tset ref = {0}, st = {0};
  int rc = tset_load(ref_path, &ref);
  if (rc) return rc;
  /* avg accumulates in double, one tensor at a time over every update */
  double **acc = calloc(ref.n ? ref.n : 1, sizeof *acc);
  float **avg = calloc(ref.n ? ref.n : 1, sizeof *avg);
  if (!acc || !avg) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  for (size_t t = 0; rc == OT_OK && t < ref.n; t++) {
    uint64_t ne = ot_st_at(ref.st, t)->numel;
    acc[t] = calloc(ne ? ne : 1, sizeof(double));
    avg[t] = malloc((ne ? ne : 1) * sizeof(float));
    if (!acc[t] || !avg[t]) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  }
  for (int i = 0; rc == OT_OK && i < n; i++) {
    rc = ot_agg_validate(paths[i], ref_path, UINT64_MAX);
    tset u = {0};
    if (rc == OT_OK) rc = tset_load(paths[i], &u);
    for (size_t t = 0; rc == OT_OK && t < ref.n; t++) {
      const ot_st_tensor *x = ot_st_at(ref.st, t);
      const ot_st_tensor *y = ot_st_find(u.st, x->name);
      const float *d = u.data[y - ot_st_at(u.st, 0)];
      for (uint64_t k = 0; k < x->numel; k++) acc[t][k] += weights[i] * (double)d[k];
    }
    tset_free(&u);
  }
  for (size_t t = 0; rc == OT_OK && t < ref.n; t++)
    for (uint64_t k = 0; k < ot_st_at(ref.st, t)->numel; k++) avg[t][k] = (float)(acc[t][k] / wsum);
  if (rc == OT_OK && p->kind == OT_AGG_FEDADAM) {
    /* state file: m.<name> and v.<name> for every tensor */
    float **mv = calloc(2 * ref.n + 1, sizeof *mv);
    if (!mv) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    if (rc == OT_OK && state_in) rc = tset_load(state_in, &st);
    for (size_t t = 0; rc == OT_OK && t < ref.n; t++) {
      const ot_st_tensor *x = ot_st_at(ref.st, t);
      for (int h = 0; h < 2 && rc == OT_OK; h++) {
        mv[2 * t + h] = calloc(x->numel ? x->numel : 1, sizeof(float));
        if (!mv[2 * t + h]) {
          rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
          break;
        }
        if (state_in) {
          char nm[256];
          snprintf(nm, sizeof nm, "%c.%s", h ? 'v' : 'm', x->name);
          const ot_st_tensor *s = ot_st_find(st.st, nm);
          if (!s || s->numel != x->numel)
            rc = ot_error(OT_ERR_FORMAT, "FedAdam state %s: tensor '%s' missing", state_in, nm);
          else
            memcpy(mv[2 * t + h], st.data[s - ot_st_at(st.st, 0)], x->numel * sizeof(float));
        }
      }
      if (rc) break;
      float *m = mv[2 * t], *v = mv[2 * t + 1], *g = ref.data[t];
      for (uint64_t k = 0; k < x->numel; k++) {
        float delta = avg[t][k] - g[k];
        m[k] = p->beta1 * m[k] + (1 - p->beta1) * delta;
        v[k] = p->beta2 * v[k] + (1 - p->beta2) * delta * delta;
        avg[t][k] = g[k] + p->server_lr * m[k] / (sqrtf(v[k]) + p->eps);
      }
    }
    /* the state file, with names m.<tensor> / v.<tensor> */
    ot_st_writer *w = NULL;
    char(*names)[256] = rc == OT_OK ? calloc(2 * ref.n + 1, sizeof *names) : NULL;
    if (rc == OT_OK && !names) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    if (rc == OT_OK) rc = ot_st_writer_new(&w);
    for (size_t t = 0; rc == OT_OK && t < ref.n; t++) {
      const ot_st_tensor *x = ot_st_at(ref.st, t);
      for (int h = 0; h < 2 && rc == OT_OK; h++) {
        snprintf(names[2 * t + h], 256, "%c.%s", h ? 'v' : 'm', x->name);
        rc = ot_st_writer_add(w, names[2 * t + h], OT_DTYPE_F32, x->ndim, x->shape, mv[2 * t + h]);
      }
    }
    if (rc == OT_OK) rc = ot_st_writer_save(w, state_out);
    ot_st_writer_free(w);
    free(names);
    for (size_t t = 0; mv && t < 2 * ref.n; t++) free(mv[t]);
    free(mv);
  }
  if (rc == OT_OK) rc = save(&ref, avg, out_path);
  for (size_t t = 0; t < ref.n; t++) {
    if (acc) free(acc[t]);
    if (avg) free(avg[t]);
  }
  free(acc);
  free(avg);
  tset_free(&st);
  tset_free(&ref);
  return rc;
}
