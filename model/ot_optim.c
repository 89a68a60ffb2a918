#include "ot_optim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_safetensors.h"

struct ot_optimizer {
  ot_optim_config cfg;
  ot_backend *be;
  int n;
  ot_param **params; /* trainable tensors with gradients */
  float *state;      /* AdamW: m then v per tensor; SGD with momentum: buffer per tensor */
  size_t state_scalars;
  float **m, **v; /* per tensor slices of state (v NULL for SGD) */
  int t;          /* steps taken */
};

void ot_optim_config_default(ot_optim_config *c, ot_optim_kind kind) {
  memset(c, 0, sizeof *c);
  c->kind = kind;
  c->beta1 = 0.9f;
  c->beta2 = 0.999f;
  c->eps = 1e-8f;
}

int ot_optim_parse_kind(const char *name, ot_optim_kind *out) {
  if (strcmp(name, "adamw") == 0)
    *out = OT_OPTIM_ADAMW;
  else if (strcmp(name, "sgd") == 0)
    *out = OT_OPTIM_SGD;
  else
    return ot_error(OT_ERR_INVALID, "unknown optimizer '%s' (expected adamw or sgd)", name);
  return OT_OK;
}

static int state_per_tensor(const ot_optim_config *c) {
  if (c->kind == OT_OPTIM_ADAMW) return 2;
  return c->momentum != 0.0f ? 1 : 0;
}

int ot_optimizer_create(const ot_optim_config *cfg, ot_backend *be, ot_param *params, int n,
                        ot_optimizer **out) {
  if (cfg->kind == OT_OPTIM_ADAMW && (cfg->beta1 < 0 || cfg->beta1 >= 1 || cfg->beta2 < 0 || cfg->beta2 >= 1))
    return ot_error(OT_ERR_INVALID, "AdamW betas must lie in [0, 1)");
  if (cfg->grad_clip < 0 || cfg->weight_decay < 0 || cfg->momentum < 0)
    return ot_error(OT_ERR_INVALID, "gradient clip, weight decay and momentum must be >= 0");
  ot_optimizer *o = calloc(1, sizeof *o);
  if (!o) return ot_error(OT_ERR_NOMEM, "cannot allocate optimizer");
  o->cfg = *cfg;
  o->be = be;
  o->params = calloc((size_t)n + 1, sizeof *o->params);
  o->m = calloc((size_t)n + 1, sizeof *o->m);
  o->v = calloc((size_t)n + 1, sizeof *o->v);
  if (!o->params || !o->m || !o->v) {
    ot_optimizer_free(o);
    return ot_error(OT_ERR_NOMEM, "cannot allocate optimizer tables");
  }
  size_t total = 0;
  for (int i = 0; i < n; i++) {
    if (!params[i].trainable || !params[i].grad) continue;
    o->params[o->n++] = &params[i];
    total += params[i].numel;
  }
  int k = state_per_tensor(cfg);
  if (k > 0 && total > 0) {
    int rc = be->ops->alloc(be, total * k * sizeof(float), (void **)&o->state);
    if (rc == OT_OK) rc = be->ops->zero(be, o->state, total * k * sizeof(float));
    if (rc) {
      ot_optimizer_free(o);
      return rc;
    }
    o->state_scalars = total * k;
    float *s = o->state;
    for (int i = 0; i < o->n; i++) {
      o->m[i] = s;
      s += o->params[i]->numel;
      if (k == 2) {
        o->v[i] = s;
        s += o->params[i]->numel;
      }
    }
  }
  *out = o;
  return OT_OK;
}

void ot_optimizer_free(ot_optimizer *o) {
  if (!o) return;
  if (o->state) o->be->ops->free(o->be, o->state);
  free(o->params);
  free(o->m);
  free(o->v);
  free(o);
}

int ot_optimizer_steps_done(const ot_optimizer *o) { return o->t; }

int ot_optimizer_step(ot_optimizer *o, float lr, float *grad_norm) {
  const ot_backend_ops *ops = o->be->ops;
  float norm = 0.0f;
  /* The norm costs a full pass over the gradients: only when clipping or asked for. */
  if (o->cfg.grad_clip > 0.0f || grad_norm) {
    double sq = 0.0;
    for (int i = 0; i < o->n; i++) sq += ops->sumsq(o->be, o->params[i]->grad, o->params[i]->numel);
    norm = (float)sqrt(sq);
    if (!isfinite(norm))
      return ot_error(OT_ERR_RANGE, "gradient norm is not finite (%g): training diverged", norm);
  }
  if (o->cfg.grad_clip > 0.0f) {
    /* torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6), never up */
    float coef = o->cfg.grad_clip / (norm + 1e-6f);
    if (coef < 1.0f)
      for (int i = 0; i < o->n; i++) ops->scale(o->be, o->params[i]->grad, coef, o->params[i]->numel);
  }
  o->t++;
  for (int i = 0; i < o->n; i++) {
    ot_param *p = o->params[i];
    float wd = p->decay ? o->cfg.weight_decay : 0.0f;
    if (o->cfg.kind == OT_OPTIM_ADAMW)
      ops->adamw(o->be, p->data, p->grad, o->m[i], o->v[i], p->numel, lr, o->cfg.beta1, o->cfg.beta2,
                 o->cfg.eps, wd, o->t);
    else
      ops->sgd(o->be, p->data, p->grad, o->m[i], p->numel, lr, o->cfg.momentum, wd, o->t == 1);
  }
  if (grad_norm) *grad_norm = norm;
  return ops->sync(o->be);
}

int ot_optimizer_save(const ot_optimizer *o, const char *path) {
  ot_st_writer *w = NULL;
  float *host = NULL;
  int rc = ot_st_writer_new(&w);
  const float *src = o->state; /* host memory is written as is; device memory is staged */
  if (rc == OT_OK && o->state_scalars && !o->be->ops->host_visible) {
    host = malloc(o->state_scalars * sizeof(float));
    if (!host) rc = ot_error(OT_ERR_NOMEM, "cannot allocate optimizer save buffer");
    if (rc == OT_OK) rc = o->be->ops->download(o->be, host, o->state, o->state_scalars * sizeof(float));
    src = host;
  }
  char name[160], step[32];
  for (int i = 0; i < o->n && rc == OT_OK && o->state_scalars; i++) {
    int64_t shape[1] = {(int64_t)o->params[i]->numel};
    snprintf(name, sizeof name, "%s.%s", o->params[i]->name, o->v[i] ? "m" : "momentum");
    rc = ot_st_writer_add(w, name, OT_DTYPE_F32, 1, shape, src + (o->m[i] - o->state));
    if (rc == OT_OK && o->v[i]) {
      snprintf(name, sizeof name, "%s.v", o->params[i]->name);
      rc = ot_st_writer_add(w, name, OT_DTYPE_F32, 1, shape, src + (o->v[i] - o->state));
    }
  }
  snprintf(step, sizeof step, "%d", o->t);
  if (rc == OT_OK) rc = ot_st_writer_set_metadata(w, "step", step);
  if (rc == OT_OK)
    rc = ot_st_writer_set_metadata(w, "optimizer", o->cfg.kind == OT_OPTIM_ADAMW ? "adamw" : "sgd");
  if (rc == OT_OK) rc = ot_st_writer_save(w, path);
  ot_st_writer_free(w);
  free(host);
  return rc;
}

int ot_optimizer_load(ot_optimizer *o, const char *path) {
  ot_safetensors *st = NULL;
  int rc = ot_st_open(path, &st);
  if (rc) return rc;
  const char *kind = ot_st_metadata(st, "optimizer"), *step = ot_st_metadata(st, "step");
  const char *want = o->cfg.kind == OT_OPTIM_ADAMW ? "adamw" : "sgd";
  char *end = NULL;
  long t = step ? strtol(step, &end, 10) : -1;
  if (!kind || strcmp(kind, want) != 0)
    rc = ot_error(OT_ERR_MISMATCH, "%s: optimizer state is for '%s', this run uses %s", path,
                  kind ? kind : "?", want);
  else if (!step || *end || t < 0 || t > 1000000000)
    rc = ot_error(OT_ERR_FORMAT, "%s: missing or bad 'step' metadata", path);
  /* Stage everything first so a bad file leaves the optimizer untouched. */
  float *host = NULL;
  if (rc == OT_OK && o->state_scalars) {
    host = malloc(o->state_scalars * sizeof(float));
    if (!host) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  }
  char name[160];
  for (int i = 0; i < o->n && rc == OT_OK && host; i++) {
    for (int which = 0; which < (o->v[i] ? 2 : 1) && rc == OT_OK; which++) {
      float *dst = which ? o->v[i] : o->m[i];
      snprintf(name, sizeof name, "%s.%s", o->params[i]->name, which ? "v" : (o->v[i] ? "m" : "momentum"));
      const ot_st_tensor *t_ = ot_st_find(st, name);
      if (!t_)
        rc = ot_error(OT_ERR_NOTFOUND, "%s: optimizer state '%s' is missing", path, name);
      else
        rc = ot_st_read_f32(st, t_, host + (dst - o->state), o->params[i]->numel);
    }
  }
  if (rc == OT_OK && host) rc = o->be->ops->upload(o->be, o->state, host, o->state_scalars * sizeof(float));
  if (rc == OT_OK) o->t = (int)t;
  free(host);
  ot_st_close(st);
  return rc;
}

int ot_lr_parse_decay(const char *name, ot_lr_decay *out) {
  if (strcmp(name, "constant") == 0)
    *out = OT_LR_CONSTANT;
  else if (strcmp(name, "linear") == 0)
    *out = OT_LR_LINEAR;
  else if (strcmp(name, "cosine") == 0)
    *out = OT_LR_COSINE;
  else
    return ot_error(OT_ERR_INVALID, "unknown schedule '%s' (expected constant, linear or cosine)", name);
  return OT_OK;
}

float ot_lr_at(const ot_lr_schedule *s, int step) {
  if (s->warmup_steps > 0 && step < s->warmup_steps)
    return s->lr * (float)(step + 1) / (float)s->warmup_steps;
  if (s->decay == OT_LR_CONSTANT || s->total_steps <= s->warmup_steps) return s->lr;
  float progress = (float)(step - s->warmup_steps) / (float)(s->total_steps - s->warmup_steps);
  if (progress > 1.0f) progress = 1.0f;
  float min_lr = s->lr * s->min_lr_ratio;
  float shape = s->decay == OT_LR_LINEAR ? 1.0f - progress : 0.5f * (1.0f + cosf((float)M_PI * progress));
  return min_lr + (s->lr - min_lr) * shape;
}
