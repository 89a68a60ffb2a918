#include "ot_model.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_rng.h"
#include "ot_safetensors.h"

/* Activations of one block. In training every block keeps its own set; in inference one
 * set is reused by all blocks. Architectures use the subset their block code needs. */
typedef struct {
  float *ln1, *ln1_mean, *ln1_rstd; /* [N,C], [N], [N] */
  float *qkv;                       /* fused [N, 3C] (GPT-2) */
  float *q, *k, *v;                 /* separate [N, QW], [N, KW], [N, KW] after rotary (LLaMA) */
  float *atty;                      /* [N, QW] attention output before the o projection */
  float *att;                       /* [B,NH,T,T] softmax probabilities */
  float *residual2;                 /* [N,C] after attention */
  float *ln2, *ln2_mean, *ln2_rstd;
  float *gate, *up, *act; /* [N,F]: gate (SwiGLU), up / c_fc output, activation */
  float *residual3;       /* [N,C] block output */
  /* extensions */
  float *lora_t[OT_SITE_COUNT];        /* [N,r] drop(x) A^T per LoRA site */
  float *bn_in[2], *bn_z[2], *bn_g[2]; /* bottleneck after attn / mlp: h [N,C], down(h), gelu [N,m] */
} ot_block_acts;

/* Parameter indices of a block's extensions, -1 where absent. */
typedef struct {
  int lora[OT_SITE_COUNT][2]; /* A, B */
  int bn[2][4];               /* down.weight, down.bias, up.weight, up.bias */
} ot_ext_idx;

struct ot_model {
  ot_model_config cfg;
  const ot_arch_info *ai;
  ot_backend *be;
  int gpt2;          /* LayerNorm, fused qkv, GELU, learned positions; else RMSNorm, RoPE, SwiGLU */
  ot_wlayout layout; /* of every linear weight of the base model */
  int QW, KW;        /* widths of q and of k / v */

  int n_params;
  ot_param *params;
  float *param_mem;
  unsigned char *lowp_mem;         /* frozen weights kept in low precision (ot_model_freeze_lowp) */
  size_t lowp_scalars, lowp_bytes; /* values; bytes they take with the int8 scales */
  size_t n_scalars;
  int (*bidx)[OT_R_COUNT]; /* [L] role -> parameter index, -1 = absent */
  int gidx[OT_G_COUNT];
  float *inv_freq; /* [head_dim / 2] rotary frequencies (backend memory) */

  /* gradients of trainable tensors, one allocation */
  float *grad_mem;
  size_t grad_scalars;

  /* activations, one allocation, sized for (maxB, maxT) */
  void *act_mem;
  size_t act_bytes;
  int maxB, maxT, training;
  int n_act_blocks;
  ot_block_acts *blocks;
  float *encoded;                   /* [N,C] */
  float *proj;                      /* [N,C] scratch for output projections */
  float *lnf, *lnf_mean, *lnf_rstd; /* [N,C] */
  float *lnf_last;                  /* [B,C] last positions (inference) */
  float *logits;                    /* [N,V] logits, then probabilities, then dlogits */
  float *losses;                    /* [N] */
  int32_t *tokens, *targets, *pos;  /* [N] backend copies; pos = position of each row */
  /* backward scratch, shared by all blocks */
  float *dresidual, *dln, *dln2, *datty, *dqkv, *dq, *dk, *dv, *datt, *dgate, *dup, *dact;

  /* host-side results of the last forward */
  float *host_losses;
  int32_t *host_targets, *host_pos;
  int last_B, last_T, last_has_targets;
  double last_loss_sum;
  size_t last_count;

  /* extensions: tensors n_base.. of the table live in ext_mem */
  int n_base;
  float *ext_mem;
  size_t ext_scalars;
  ot_block_ext *ext; /* [L], NULL when none */
  ot_ext_idx *eidx;  /* [L] */
  uint64_t drop_seed, step;
  int dropout_on, last_dropout;
  float *lora_xd, *lora_dt;             /* [N, widest input], [N,rmax] scratch */
  float *bn_up, *bn_dh, *bn_dg, *bn_dz; /* [N,C], [N,C], [N,m], [N,m] scratch */

  /* extra gradients dL/d(block output) for the next backward (backend memory, [N,C]) */
  const float **extra_grad;
};

static void set_param(ot_param *p, const char *name, int d0, int d1) {
  snprintf(p->name, sizeof p->name, "%s", name);
  p->ndim = d1 > 0 ? 2 : 1;
  p->shape[0] = d0;
  p->shape[1] = d1 > 0 ? d1 : 0;
  p->numel = (size_t)d0 * (size_t)(d1 > 0 ? d1 : 1);
  p->trainable = 1;
  p->decay = d1 > 0;
}

void ot_model_site_dims(const ot_model *m, int site, int *in, int *out) {
  ot_arch_site_dims(&m->cfg, site, in, out);
}

static int role_present(const ot_model *m, int r) { return ot_arch_role_shape(&m->cfg, r, NULL, NULL); }

static void role_shape(const ot_model *m, int r, int *d0, int *d1) { ot_arch_role_shape(&m->cfg, r, d0, d1); }

/* HF's rotary frequencies: theta^(-2j/D), with Llama 3's long-context rescaling when the config
 * has it (transformers' _compute_llama3_parameters). */
static void rope_freqs(const ot_model_config *c, float *out) {
  int D = c->head_dim;
  for (int j = 0; j < D / 2; j++) {
    double f = 1.0 / pow((double)c->rope_theta, (2.0 * j) / D);
    if (c->rope_factor != 0.0f) {
      double lo_wl = c->rope_original_ctx / (double)c->rope_low_freq_factor;
      double hi_wl = c->rope_original_ctx / (double)c->rope_high_freq_factor;
      double wl = 2.0 * M_PI / f;
      if (wl > lo_wl) {
        f /= c->rope_factor;
      } else if (wl >= hi_wl) {
        double smooth = (c->rope_original_ctx / wl - c->rope_low_freq_factor) /
                        (c->rope_high_freq_factor - c->rope_low_freq_factor);
        f = (1.0 - smooth) * f / c->rope_factor + smooth * f;
      }
    }
    out[j] = (float)f;
  }
}

static void model_release(ot_model *m) {
  if (m->param_mem) m->be->ops->free(m->be, m->param_mem);
  if (m->lowp_mem) m->be->ops->free(m->be, m->lowp_mem);
  if (m->inv_freq) m->be->ops->free(m->be, m->inv_freq);
  free(m->params);
  free(m->extra_grad);
  free(m->bidx);
  free(m);
}

int ot_model_create(const ot_model_config *cfg_in, ot_backend *be, ot_model **out) {
  if (!cfg_in || !be || !out) return ot_error(OT_ERR_INVALID, "ot_model_create: NULL argument");
  ot_model_config cfg = *cfg_in;
  int rc = ot_model_config_complete(&cfg);
  if (rc) return rc;
  if (cfg.arch != OT_ARCH_GPT2) {
    const char *need[] = {"rmsnorm_fwd", "rope", "swiglu_fwd", "gqa_fwd"};
    const int have[] = {be->ops->rmsnorm_fwd != NULL, be->ops->rope != NULL, be->ops->swiglu_fwd != NULL,
                        be->ops->gqa_fwd != NULL};
    for (int i = 0; i < 4; i++) {
      rc = ot_backend_check_op(be, have[i], need[i]);
      if (rc) return rc;
    }
  }
  ot_model *m = calloc(1, sizeof *m);
  if (!m) return ot_error(OT_ERR_NOMEM, "cannot allocate model");
  m->cfg = cfg;
  m->be = be;
  m->ai = ot_arch_get(cfg.arch);
  m->gpt2 = cfg.arch == OT_ARCH_GPT2;
  m->layout = m->gpt2 ? OT_W_IN_OUT : OT_W_OUT_IN;
  m->QW = cfg.n_head * cfg.head_dim;
  m->KW = cfg.n_kv_head * cfg.head_dim;
  int L = cfg.n_layer, C = cfg.n_embd;
  int per_block = 0;
  for (int r = 0; r < OT_R_COUNT; r++) per_block += role_present(m, r);
  m->n_params = L * per_block + 5;
  m->params = calloc((size_t)m->n_params, sizeof *m->params);
  m->extra_grad = calloc((size_t)L, sizeof *m->extra_grad);
  m->bidx = calloc((size_t)L, sizeof *m->bidx);
  if (!m->params || !m->extra_grad || !m->bidx) {
    model_release(m);
    return ot_error(OT_ERR_NOMEM, "cannot allocate parameter table");
  }
  /* table order = checkpoint order: embeddings, blocks, final norm, head */
  int n = 0;
  for (int g = 0; g < OT_G_COUNT; g++) m->gidx[g] = -1;
  m->gidx[OT_G_TOK] = n;
  set_param(&m->params[n++], m->gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight", cfg.vocab_size,
            C);
  if (m->gpt2) {
    m->gidx[OT_G_POS] = n;
    set_param(&m->params[n], "transformer.wpe.weight", cfg.n_positions, C);
    m->params[n++].decay = 0;
  }
  for (int l = 0; l < L; l++)
    for (int r = 0; r < OT_R_COUNT; r++) {
      m->bidx[l][r] = -1;
      if (!role_present(m, r)) continue;
      char name[96];
      int d0, d1;
      role_shape(m, r, &d0, &d1);
      snprintf(name, sizeof name, "%s%d.%s", m->ai->block_prefix, l, m->ai->role_names[r]);
      m->bidx[l][r] = n;
      set_param(&m->params[n++], name, d0, d1);
    }
  m->gidx[OT_G_NORM] = n;
  set_param(&m->params[n++], m->gpt2 ? "transformer.ln_f.weight" : "model.norm.weight", C, 0);
  if (m->gpt2) {
    m->gidx[OT_G_NORM_B] = n;
    set_param(&m->params[n++], "transformer.ln_f.bias", C, 0);
  }
  m->gidx[OT_G_HEAD] = m->gidx[OT_G_TOK];
  if (!cfg.tie_embeddings) {
    m->gidx[OT_G_HEAD] = n;
    set_param(&m->params[n++], "lm_head.weight", cfg.vocab_size, C);
  }
  m->n_params = n;
  for (int i = 0; i < m->n_params; i++) m->n_scalars += m->params[i].numel;
  m->n_base = m->n_params;
  m->dropout_on = 1;
  rc = be->ops->alloc(be, m->n_scalars * sizeof(float), (void **)&m->param_mem);
  if (rc == OT_OK && !m->gpt2) {
    float fr[4096];
    int half = cfg.head_dim / 2;
    if (half > (int)(sizeof fr / sizeof fr[0]))
      rc = ot_error(OT_ERR_RANGE, "head_dim %d too large", cfg.head_dim);
    if (rc == OT_OK) rc = be->ops->alloc(be, (size_t)half * sizeof(float), (void **)&m->inv_freq);
    if (rc == OT_OK) {
      rope_freqs(&cfg, fr);
      rc = be->ops->upload(be, m->inv_freq, fr, (size_t)half * sizeof(float));
    }
  }
  if (rc) {
    model_release(m);
    return rc;
  }
  float *p = m->param_mem;
  for (int i = 0; i < m->n_params; i++) {
    m->params[i].data = p;
    p += m->params[i].numel;
  }
  *out = m;
  return OT_OK;
}

static void free_acts(ot_model *m) {
  if (m->act_mem) m->be->ops->free(m->be, m->act_mem);
  m->act_mem = NULL;
  m->act_bytes = 0;
  free(m->blocks);
  m->blocks = NULL;
  free(m->host_losses);
  m->host_losses = NULL;
  free(m->host_targets);
  m->host_targets = NULL;
  free(m->host_pos);
  m->host_pos = NULL;
  m->maxB = m->maxT = 0;
}

static void free_grads(ot_model *m) {
  if (m->grad_mem) m->be->ops->free(m->be, m->grad_mem);
  m->grad_mem = NULL;
  m->grad_scalars = 0;
  for (int i = 0; i < m->n_params; i++) m->params[i].grad = NULL;
}

void ot_model_free(ot_model *m) {
  if (!m) return;
  free_acts(m);
  free_grads(m);
  if (m->ext_mem) m->be->ops->free(m->be, m->ext_mem);
  free(m->ext);
  free(m->eidx);
  model_release(m);
}

const ot_model_config *ot_model_cfg(const ot_model *m) { return &m->cfg; }
ot_backend *ot_model_backend(const ot_model *m) { return m->be; }
ot_wlayout ot_model_wlayout(const ot_model *m) { return m->layout; }
size_t ot_model_num_params(const ot_model *m) { return m->n_scalars + m->ext_scalars; }
int ot_model_base_param_count(const ot_model *m) { return m->n_base; }
int ot_model_param_count(const ot_model *m) { return m->n_params; }
ot_param *ot_model_param(ot_model *m, int i) { return (i >= 0 && i < m->n_params) ? &m->params[i] : NULL; }

int ot_model_block_param_index(const ot_model *m, int layer, int which) {
  if (layer < 0 || layer >= m->cfg.n_layer || which < 0 || which >= OT_R_COUNT) return -1;
  return m->bidx[layer][which];
}

int ot_model_global_param_index(const ot_model *m, int which) {
  return which >= 0 && which < OT_G_COUNT ? m->gidx[which] : -1;
}

ot_param *ot_model_find_param(ot_model *m, const char *name) {
  for (int i = 0; i < m->n_params; i++)
    if (strcmp(m->params[i].name, name) == 0) return &m->params[i];
  return NULL;
}

void ot_model_set_all_trainable(ot_model *m, int trainable) {
  for (int i = 0; i < m->n_params; i++) m->params[i].trainable = trainable;
}

size_t ot_model_memory_bytes(const ot_model *m) {
  return (m->n_scalars - m->lowp_scalars + m->ext_scalars) * sizeof(float) + m->lowp_bytes +
         m->grad_scalars * sizeof(float) + m->act_bytes;
}

/* What needs every weight in fp32 refuses a model whose frozen weights are in low precision. */
static int need_fp32(const ot_model *m, const char *what) {
  (void)m;
  return ot_error(OT_ERR_UNSUPPORTED, "%s: the model keeps its frozen weights in low precision", what);
}

/* ---- initialisation -------------------------------------------------------------- */

/* Block and role of parameter i; 0 outside the blocks. */
static int param_where(const ot_model *m, int i, int *layer, int *role) {
  for (int l = 0; l < m->cfg.n_layer; l++)
    for (int r = 0; r < OT_R_COUNT; r++)
      if (m->bidx[l][r] == i) {
        *layer = l;
        *role = r;
        return 1;
      }
  return 0;
}

int ot_model_init_random(ot_model *m, uint64_t seed) {
  if (m->lowp_mem) return need_fp32(m, "initialisation");
  uint64_t s = seed;
  float *host = malloc(m->n_scalars * sizeof(float));
  if (!host) return ot_error(OT_ERR_NOMEM, "cannot allocate init buffer");
  float *h = host;
  double resid_std = 0.02 / sqrt(2.0 * m->cfg.n_layer);
  for (int i = 0; i < m->n_base; i++) {
    ot_param *p = &m->params[i];
    int l, r = -1;
    if (!param_where(m, i, &l, &r)) r = -1;
    int is_norm = r == OT_R_ATTN_NORM || r == OT_R_FFN_NORM || i == m->gidx[OT_G_NORM];
    if (is_norm) {
      for (size_t j = 0; j < p->numel; j++) h[j] = 1.0f;
    } else if (p->ndim == 1) { /* biases */
      memset(h, 0, p->numel * sizeof(float));
    } else {
      double std = m->gpt2 && (r == OT_R_O || r == OT_R_DOWN) ? resid_std : 0.02;
      ot_rng_fill_normal(&s, std, h, p->numel);
    }
    h += p->numel;
  }
  int rc = m->be->ops->upload(m->be, m->param_mem, host, m->n_scalars * sizeof(float));
  free(host);
  return rc;
}

/* ---- checkpoints ----------------------------------------------------------------- */

/* Maps a checkpoint tensor name to a parameter index; -1 = ignore (mask and rotary buffers, a
 * tied LM head), -2 = unknown. */
static int map_name(ot_model *m, const char *name) {
  char full[160];
  const char *n = name;
  int layer;
  const char *rest;
  if (m->gpt2) {
    if (strncmp(n, "transformer.", 12) == 0) n += 12;
    if (ot_block_tensor_split(n, &layer, &rest) &&
        (strcmp(rest, "attn.bias") == 0 || strcmp(rest, "attn.masked_bias") == 0))
      return -1;
    snprintf(full, sizeof full, "transformer.%s", n);
    n = full;
  } else if (ot_block_tensor_split(n, &layer, &rest) && strcmp(rest, "self_attn.rotary_emb.inv_freq") == 0) {
    return -1; /* a buffer older checkpoints carry; recomputed from the config */
  }
  if (strcmp(n, "lm_head.weight") == 0 || strcmp(n, "transformer.lm_head.weight") == 0) {
    if (m->cfg.tie_embeddings) return -1;
    n = "lm_head.weight";
  }
  for (int i = 0; i < m->n_base; i++)
    if (strcmp(m->params[i].name, n) == 0) return i;
  return -2;
}

/* Scales of an int8 weight are per output channel: columns of [in, out], rows of [out, in]. */
static int out_channels(const ot_model *m, const ot_param *p) {
  return m->layout == OT_W_IN_OUT ? p->shape[1] : p->shape[0];
}

/* An int8 weight with its per-output-channel scales (ot_model_save_dir_int8), to fp32. */
static int read_int8(const ot_model *m, ot_safetensors *st, const ot_st_tensor *t, const char *path,
                     float *dst, const ot_param *p) {
  char sname[200];
  snprintf(sname, sizeof sname, "%s.int8_scale", t->name);
  const ot_st_tensor *s = ot_st_find(st, sname);
  int nc = p->ndim == 2 ? out_channels(m, p) : 0;
  if (p->ndim != 2 || !s || s->dtype != OT_DTYPE_F32 || s->ndim != 1 || s->shape[0] != nc)
    return ot_error(OT_ERR_FORMAT, "%s: int8 tensor '%s' needs an F32 '%s' of %d scales", path, t->name,
                    sname, nc);
  float *scale = malloc((size_t)nc * sizeof(float));
  if (!scale) return ot_error(OT_ERR_NOMEM, "cannot allocate scales");
  int rc = ot_st_read_f32(st, s, scale, (uint64_t)nc);
  const int8_t *q = ot_st_data(st, t);
  for (int j = 0; j < nc && rc == OT_OK; j++)
    if (!isfinite(scale[j]) || scale[j] < 0)
      rc = ot_error(OT_ERR_FORMAT, "%s: '%s' holds a negative or non-finite scale", path, sname);
  int cols = p->shape[1];
  for (int i = 0; i < p->shape[0] && rc == OT_OK; i++)
    for (int j = 0; j < cols; j++)
      dst[(size_t)i * cols + j] = (float)q[(size_t)i * cols + j] * scale[m->layout == OT_W_IN_OUT ? j : i];
  free(scale);
  return rc;
}

/* Loads the tensors of one file into the model; seen[] marks what was loaded (across shards). */
static int load_file(ot_model *m, const char *path, char *seen) {
  ot_safetensors *st = NULL;
  int rc = ot_st_open(path, &st);
  if (rc) return rc;
  float *stage = NULL;
  size_t stage_n = 0;
  for (size_t i = 0; i < ot_st_count(st) && rc == OT_OK; i++) {
    const ot_st_tensor *t = ot_st_at(st, i);
    size_t nl = strlen(t->name);
    if (nl > 11 && strcmp(t->name + nl - 11, ".int8_scale") == 0) continue; /* read with its weight */
    int idx = map_name(m, t->name);
    if (idx == -1) {
      if (strstr(t->name, "lm_head.weight") &&
          (t->ndim != 2 || t->shape[0] != m->cfg.vocab_size || t->shape[1] != m->cfg.n_embd))
        rc = ot_error(OT_ERR_MISMATCH, "%s: lm_head.weight has the wrong shape", path);
      continue;
    }
    if (idx == -2) {
      rc = ot_error(OT_ERR_FORMAT, "%s: unexpected tensor '%s' for a %s model with this config", path,
                    t->name, ot_arch_name(m->cfg.arch));
      break;
    }
    ot_param *p = &m->params[idx];
    int shape_ok =
        t->ndim == p->ndim && t->shape[0] == p->shape[0] && (p->ndim == 1 || t->shape[1] == p->shape[1]);
    if (!shape_ok) {
      char got[64] = "";
      for (int d = 0; d < t->ndim && d < 4; d++)
        snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? "," : "", (long long)t->shape[d]);
      rc = ot_error(OT_ERR_MISMATCH, "%s: tensor '%s' has shape [%s], the config needs [%d%s%.0d]", path,
                    t->name, got, p->shape[0], p->ndim == 2 ? "," : "", p->ndim == 2 ? p->shape[1] : 0);
      break;
    }
    if (seen[idx]) {
      rc = ot_error(OT_ERR_FORMAT, "%s: tensor '%s' appears twice", path, t->name);
      break;
    }
    seen[idx] = 1;
    /* host memory: straight into the tensor; otherwise through a staging buffer */
    float *dst = m->be->ops->host_visible && t->dtype != OT_DTYPE_I8 ? p->data : NULL;
    if (!dst && stage_n < p->numel) {
      free(stage);
      stage = malloc(p->numel * sizeof(float));
      stage_n = stage ? p->numel : 0;
      if (!stage) {
        rc = ot_error(OT_ERR_NOMEM, "cannot allocate staging buffer");
        break;
      }
    }
    if (t->dtype == OT_DTYPE_I8)
      rc = read_int8(m, st, t, path, stage, p);
    else
      rc = ot_st_read_f32(st, t, dst ? dst : stage, p->numel);
    if (rc == OT_OK && !dst) rc = m->be->ops->upload(m->be, p->data, stage, p->numel * sizeof(float));
    ot_st_release(st, t);
  }
  free(stage);
  ot_st_close(st);
  return rc;
}

static int check_all_seen(const ot_model *m, const char *where, const char *seen) {
  for (int i = 0; i < m->n_base; i++)
    if (!seen[i]) return ot_error(OT_ERR_NOTFOUND, "%s: tensor '%s' is missing", where, m->params[i].name);
  return OT_OK;
}

int ot_model_load_safetensors(ot_model *m, const char *path) {
  if (m->lowp_mem) return need_fp32(m, "loading weights");
  char *seen = calloc((size_t)m->n_params, 1);
  if (!seen) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  int rc = load_file(m, path, seen);
  if (rc == OT_OK) rc = check_all_seen(m, path, seen);
  free(seen);
  return rc;
}

/* Sharded checkpoints: every file model.safetensors.index.json's weight_map names, once each.
 * Shard names are plain file names inside dir (no paths). */
static int load_sharded(ot_model *m, const char *dir, const char *index_path) {
  char *text = NULL;
  int rc = ot_file_read_all(index_path, (size_t)64 << 20, &text, NULL);
  if (rc) return rc;
  cJSON *j = cJSON_Parse(text);
  free(text);
  const cJSON *map = j ? cJSON_GetObjectItemCaseSensitive(j, "weight_map") : NULL;
  if (!cJSON_IsObject(map)) {
    cJSON_Delete(j);
    return ot_error(OT_ERR_FORMAT, "%s: no weight_map object", index_path);
  }
  char *seen = calloc((size_t)m->n_params, 1);
  int n_files = cJSON_GetArraySize(map), n_done = 0;
  const char **done = calloc((size_t)(n_files ? n_files : 1), sizeof *done);
  if (!seen || !done) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  const cJSON *e;
  cJSON_ArrayForEach(e, map) {
    if (rc) break;
    if (!cJSON_IsString(e) || !e->valuestring[0] || strchr(e->valuestring, '/') || e->valuestring[0] == '.') {
      rc = ot_error(OT_ERR_FORMAT, "%s: shard of '%.64s' is not a plain file name", index_path, e->string);
      break;
    }
    int dup = 0;
    for (int i = 0; i < n_done && !dup; i++) dup = strcmp(done[i], e->valuestring) == 0;
    if (dup) continue;
    done[n_done++] = e->valuestring;
    char *path = NULL;
    rc = ot_path_join(dir, e->valuestring, &path);
    if (rc == OT_OK) rc = load_file(m, path, seen);
    free(path);
  }
  if (rc == OT_OK) rc = check_all_seen(m, index_path, seen);
  free(done);
  free(seen);
  cJSON_Delete(j);
  return rc;
}

int ot_model_load_dir(const char *dir, ot_backend *be, ot_model **out) {
  char *cfg_path = NULL, *st_path = NULL, *idx_path = NULL;
  ot_model_config cfg;
  ot_model *m = NULL;
  int rc = ot_path_join(dir, "config.json", &cfg_path);
  if (rc == OT_OK) rc = ot_path_join(dir, "model.safetensors", &st_path);
  if (rc == OT_OK) rc = ot_path_join(dir, "model.safetensors.index.json", &idx_path);
  if (rc == OT_OK) rc = ot_model_config_load(cfg_path, &cfg);
  if (rc == OT_OK) rc = ot_model_create(&cfg, be, &m);
  if (rc == OT_OK) {
    if (ot_file_exists(st_path) || !ot_file_exists(idx_path))
      rc = ot_model_load_safetensors(m, st_path);
    else
      rc = load_sharded(m, dir, idx_path);
  }
  free(cfg_path);
  free(st_path);
  free(idx_path);
  if (rc) {
    ot_model_free(m);
    return rc;
  }
  *out = m;
  return OT_OK;
}

int ot_model_open_dir(const char *dir, ot_backend *be, ot_model **m, ot_tokenizer **tok) {
  ot_model *g = NULL;
  ot_tokenizer *t = NULL;
  int rc = ot_model_load_dir(dir, be, &g);
  if (rc == OT_OK) rc = ot_tokenizer_load_dir_optional(dir, &t);
  if (rc == OT_OK && t && ot_tokenizer_vocab_size(t) > ot_model_cfg(g)->vocab_size)
    rc = ot_error(OT_ERR_MISMATCH, "%s: tokenizer has %d tokens but the model only %d", dir,
                  ot_tokenizer_vocab_size(t), ot_model_cfg(g)->vocab_size);
  if (rc) {
    ot_tokenizer_free(t);
    ot_model_free(g);
    return rc;
  }
  *m = g;
  *tok = t;
  return OT_OK;
}

int ot_model_dir_digest(const char *dir, char digest[OT_DIGEST_HEX]) {
  char *st = NULL, *idx = NULL;
  int rc = ot_path_join(dir, "model.safetensors", &st);
  if (rc == OT_OK) rc = ot_path_join(dir, "model.safetensors.index.json", &idx);
  if (rc == OT_OK && (ot_file_exists(st) || !ot_file_exists(idx))) {
    rc = ot_file_digest(st, digest);
    free(st);
    free(idx);
    return rc;
  }
  /* sharded: the index's digest, then each shard's once, in the index's order */
  char *text = NULL, d[OT_DIGEST_HEX];
  size_t cap = 0, len = 0;
  char *all = NULL;
  if (rc == OT_OK) rc = ot_file_digest(idx, d);
  if (rc == OT_OK) rc = ot_file_read_all(idx, (size_t)64 << 20, &text, NULL);
  cJSON *j = rc == OT_OK ? cJSON_Parse(text) : NULL;
  const cJSON *map = j ? cJSON_GetObjectItemCaseSensitive(j, "weight_map") : NULL, *e;
  if (rc == OT_OK && !cJSON_IsObject(map)) rc = ot_error(OT_ERR_FORMAT, "%s: no weight_map object", idx);
  cap = (size_t)(cJSON_GetArraySize(map) + 1) * OT_DIGEST_HEX + 1;
  if (rc == OT_OK && !(all = malloc(cap))) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
  if (rc == OT_OK) len += (size_t)snprintf(all, cap, "%s", d);
  cJSON_ArrayForEach(e, map) {
    if (rc) break;
    if (!cJSON_IsString(e) || strchr(e->valuestring, '/') || e->valuestring[0] == '.') {
      rc = ot_error(OT_ERR_FORMAT, "%s: shard of '%.64s' is not a plain file name", idx, e->string);
      break;
    }
    int seen = 0;
    for (const cJSON *p = map->child; p != e && !seen; p = p->next)
      seen = strcmp(p->valuestring, e->valuestring) == 0;
    if (seen) continue;
    char *shard = NULL;
    rc = ot_path_join(dir, e->valuestring, &shard);
    if (rc == OT_OK) rc = ot_file_digest(shard, d);
    free(shard);
    if (rc == OT_OK) len += (size_t)snprintf(all + len, cap - len, "%s", d);
  }
  if (rc == OT_OK) rc = ot_digest_bytes(all, len, digest);
  cJSON_Delete(j);
  free(all);
  free(text);
  free(st);
  free(idx);
  return rc;
}

/* Symmetric int8 with one scale per output channel: scale = max |W| / 127 over the channel,
 * q = round(W / scale). */
static void quantize_int8(const ot_model *m, const float *w, int rows, int cols, int8_t *q, float *scale) {
  int by_col = m->layout == OT_W_IN_OUT, nc = by_col ? cols : rows;
  for (int j = 0; j < nc; j++) scale[j] = 0.0f;
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) {
      float a = fabsf(w[(size_t)i * cols + j]) / 127.0f;
      float *s = &scale[by_col ? j : i];
      if (a > *s) *s = a;
    }
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) {
      float s = scale[by_col ? j : i];
      float v = s > 0.0f ? w[(size_t)i * cols + j] / s : 0.0f;
      v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
      q[(size_t)i * cols + j] = (int8_t)lrintf(v);
    }
}

/* Which tensors ot_model_freeze_lowp converts: the frozen linear weights of the blocks. */
static int lowp_candidate(const ot_model *m, int i) {
  int layer, role;
  if (i >= m->n_base || m->params[i].trainable || !param_where(m, i, &layer, &role)) return 0;
  for (int s = 0; s < OT_SITE_COUNT; s++)
    if (m->ai->site_modules[s] && ot_site_weight_role(s) == role) return 1;
  return 0;
}

int ot_model_freeze_lowp(ot_model *m, ot_lowp kind, size_t *saved) {
  const ot_backend_ops *o = m->be->ops;
  if (m->lowp_mem) return ot_error(OT_ERR_INVALID, "the frozen weights are already in low precision");
  if (kind != OT_LOWP_BF16 && kind != OT_LOWP_INT8)
    return ot_error(OT_ERR_INVALID, "unknown low precision %d", kind);
  if (!o->matmul_fwd_lowp || !o->matmul_bwd_lowp || !o->host_visible)
    return ot_error(OT_ERR_UNSUPPORTED, "the %s backend has no low-precision weight products yet", o->name);
  size_t n_lowp = 0, n_scale = 0, esz = kind == OT_LOWP_BF16 ? sizeof(uint16_t) : sizeof(int8_t);
  for (int i = 0; i < m->n_base; i++)
    if (lowp_candidate(m, i)) {
      n_lowp += m->params[i].numel;
      n_scale += kind == OT_LOWP_INT8 ? (size_t)out_channels(m, &m->params[i]) : 0;
    }
  if (n_lowp == 0) return ot_error(OT_ERR_INVALID, "no frozen linear weight to keep in low precision");
  float *mem32 = NULL;
  unsigned char *memq = NULL;
  /* The int8 scales and the low-precision values in one allocation, made and filled first; each
   * weight's fp32 pages go back to the system once converted, so converting never holds the
   * old and the new copies of every weight at once. Then the fp32 tensors move to their own. */
  size_t scale_bytes = n_scale * sizeof(float);
  int rc = o->alloc(m->be, scale_bytes + n_lowp * esz, (void **)&memq);
  if (rc) return rc;
  free_acts(m);
  free_grads(m);
  float *ps = (float *)(void *)memq;
  unsigned char *pq = memq + scale_bytes;
  for (int i = 0; i < m->n_base; i++) {
    ot_param *p = &m->params[i];
    if (!lowp_candidate(m, i)) continue;
    if (kind == OT_LOWP_BF16) {
      uint16_t *q = (uint16_t *)(void *)pq;
      for (size_t j = 0; j < p->numel; j++) q[j] = ot_f32_to_bf16(p->data[j]);
    } else {
      quantize_int8(m, p->data, p->shape[0], p->shape[1], (int8_t *)pq, ps);
      p->lowp_scale = ps;
      ps += out_channels(m, p);
    }
    if (o->discard) o->discard(m->be, p->data, p->numel * sizeof(float));
    p->lowp = pq;
    p->lowp_kind = kind;
    p->data = NULL;
    pq += p->numel * esz;
  }
  rc = o->alloc(m->be, (m->n_scalars - n_lowp) * sizeof(float), (void **)&mem32);
  if (rc) { /* the converted weights stay usable: the model keeps the old block for the rest */
    m->lowp_mem = memq;
    m->lowp_bytes = n_lowp * esz + scale_bytes;
    m->lowp_scalars = n_lowp;
    return rc;
  }
  float *p32 = mem32;
  for (int i = 0; i < m->n_base; i++) {
    ot_param *p = &m->params[i];
    if (p->lowp) continue;
    memcpy(p32, p->data, p->numel * sizeof(float));
    p->data = p32;
    p32 += p->numel;
  }
  o->free(m->be, m->param_mem);
  m->param_mem = mem32;
  m->lowp_mem = memq;
  m->lowp_bytes = n_lowp * esz + n_scale * sizeof(float);
  if (saved) *saved = n_lowp * sizeof(float) - m->lowp_bytes;
  m->lowp_scalars = n_lowp;
  return OT_OK;
}

int ot_model_save_dir_int8(const ot_model *m, const char *dir, const unsigned char *int8_blocks) {
  if (m->lowp_mem) return need_fp32(m, "saving");
  int rc = ot_mkdir_p(dir);
  if (rc) return rc;
  char *cfg_path = NULL, *st_path = NULL;
  ot_st_writer *w = NULL;
  float *host = NULL;
  /* int8 copies and their scales live until the writer has saved */
  int8_t **qs = calloc((size_t)m->n_base, sizeof *qs);
  float **ss = calloc((size_t)m->n_base, sizeof *ss);
  char(*snames)[112] = calloc((size_t)m->n_base, sizeof *snames);
  rc = qs && ss && snames ? OT_OK : ot_error(OT_ERR_NOMEM, "cannot allocate save tables");
  if (rc == OT_OK) rc = ot_path_join(dir, "config.json", &cfg_path);
  if (rc == OT_OK) rc = ot_path_join(dir, "model.safetensors", &st_path);
  /* a device backend's parameters are staged on the host; host memory is written as is */
  const float *src = m->param_mem;
  if (rc == OT_OK && !m->be->ops->host_visible) {
    host = malloc(m->n_scalars * sizeof(float));
    if (!host) rc = ot_error(OT_ERR_NOMEM, "cannot allocate save buffer");
    if (rc == OT_OK) rc = m->be->ops->download(m->be, host, m->param_mem, m->n_scalars * sizeof(float));
    src = host;
  }
  if (rc == OT_OK) rc = ot_st_writer_new(&w);
  if (rc == OT_OK) rc = ot_st_writer_set_metadata(w, "format", "pt");
  for (int i = 0; i < m->n_base && rc == OT_OK; i++) { /* a plain checkpoint: no extensions */
    const ot_param *p = &m->params[i];
    const float *data = src + (p->data - m->param_mem);
    int64_t shape[2] = {p->shape[0], p->shape[1]};
    int layer, role;
    if (int8_blocks && param_where(m, i, &layer, &role) && int8_blocks[layer] && p->ndim == 2) {
      int nc = out_channels(m, p);
      qs[i] = malloc(p->numel);
      ss[i] = malloc((size_t)nc * sizeof(float));
      if (!qs[i] || !ss[i]) {
        rc = ot_error(OT_ERR_NOMEM, "cannot allocate int8 copy of %s", p->name);
        break;
      }
      quantize_int8(m, data, p->shape[0], p->shape[1], qs[i], ss[i]);
      int64_t sshape[1] = {nc};
      snprintf(snames[i], sizeof snames[i], "%s.int8_scale", p->name);
      rc = ot_st_writer_add(w, p->name, OT_DTYPE_I8, 2, shape, qs[i]);
      if (rc == OT_OK) rc = ot_st_writer_add(w, snames[i], OT_DTYPE_F32, 1, sshape, ss[i]);
    } else {
      rc = ot_st_writer_add(w, p->name, OT_DTYPE_F32, p->ndim, shape, data);
    }
  }
  if (rc == OT_OK) rc = ot_st_writer_save(w, st_path);
  if (rc == OT_OK) rc = ot_model_config_save(cfg_path, &m->cfg);
  ot_st_writer_free(w);
  for (int i = 0; qs && ss && i < m->n_base; i++) {
    free(qs[i]);
    free(ss[i]);
  }
  free(qs);
  free(ss);
  free(snames);
  free(host);
  free(cfg_path);
  free(st_path);
  return rc;
}

int ot_model_save_dir(const ot_model *m, const char *dir) { return ot_model_save_dir_int8(m, dir, NULL); }

/* ---- memory plan ----------------------------------------------------------------- */

typedef struct {
  size_t off;
  int dry; /* first pass only measures */
  char *base;
} carver;

/* Hands out 64-byte aligned slices of one allocation; zero bytes give NULL. */
static void *carve(carver *cv, size_t bytes) {
  if (bytes == 0) return NULL;
  size_t off = (cv->off + 63) & ~(size_t)63;
  cv->off = off + bytes;
  return cv->dry ? NULL : cv->base + off;
}

/* Extensions an activation set must hold: its own block's in training, the union of
 * all blocks' when one set serves every block. */
static ot_block_ext ext_need(const ot_model *m, int act_block) {
  ot_block_ext e = {0};
  if (!m->ext) return e;
  int l0 = m->training ? act_block : 0, l1 = m->training ? act_block + 1 : m->cfg.n_layer;
  for (int l = l0; l < l1; l++) {
    const ot_block_ext *x = &m->ext[l];
    e.lora_sites |= x->lora_sites;
    if (x->lora_sites && x->lora_r > e.lora_r) e.lora_r = x->lora_r;
    if (x->lora_sites && x->lora_dropout > e.lora_dropout) e.lora_dropout = x->lora_dropout;
    if (x->bottleneck > e.bottleneck) e.bottleneck = x->bottleneck;
  }
  return e;
}

static void plan_acts(ot_model *m, carver *cv, int B, int T, int training) {
  size_t N = (size_t)B * T, C = m->cfg.n_embd, V = m->cfg.vocab_size, NH = m->cfg.n_head, F = m->cfg.n_ff;
  size_t QW = m->QW, KW = m->KW, fl = sizeof(float);
  /* a fused-attention backend keeps less than the B x NH x T x T probabilities */
  size_t att_n = m->gpt2 && m->be->ops->attention_state
                     ? m->be->ops->attention_state(m->be, B, T, (int)C, (int)NH)
                     : (size_t)B * NH * T * T;
  size_t widest_in = C > F ? C : F; /* LoRA dropout scratch holds any site's input */
  if (QW > widest_in) widest_in = QW;
  ot_block_ext all = {0}; /* maxima over the blocks, for shared scratch */
  for (int l = 0; l < m->n_act_blocks; l++) {
    ot_block_acts *a = &m->blocks[l];
    ot_block_ext e = ext_need(m, l);
    for (int s = 0; s < OT_SITE_COUNT; s++)
      a->lora_t[s] = (e.lora_sites >> s) & 1 ? carve(cv, N * (size_t)e.lora_r * fl) : NULL;
    for (int s = 0; s < 2; s++) {
      a->bn_in[s] = e.bottleneck ? carve(cv, N * C * fl) : NULL;
      a->bn_z[s] = e.bottleneck ? carve(cv, N * (size_t)e.bottleneck * fl) : NULL;
      a->bn_g[s] = e.bottleneck ? carve(cv, N * (size_t)e.bottleneck * fl) : NULL;
    }
    if (e.lora_r > all.lora_r) all.lora_r = e.lora_r;
    if (e.lora_dropout > all.lora_dropout) all.lora_dropout = e.lora_dropout;
    if (e.bottleneck > all.bottleneck) all.bottleneck = e.bottleneck;
    a->ln1 = carve(cv, N * C * fl);
    a->ln1_mean = m->gpt2 ? carve(cv, N * fl) : NULL;
    a->ln1_rstd = carve(cv, N * fl);
    a->qkv = m->gpt2 ? carve(cv, N * 3 * C * fl) : NULL;
    a->q = m->gpt2 ? NULL : carve(cv, N * QW * fl);
    a->k = m->gpt2 ? NULL : carve(cv, N * KW * fl);
    a->v = m->gpt2 ? NULL : carve(cv, N * KW * fl);
    a->atty = carve(cv, N * QW * fl);
    a->att = carve(cv, att_n * fl);
    a->residual2 = carve(cv, N * C * fl);
    a->ln2 = carve(cv, N * C * fl);
    a->ln2_mean = m->gpt2 ? carve(cv, N * fl) : NULL;
    a->ln2_rstd = carve(cv, N * fl);
    a->gate = m->gpt2 ? NULL : carve(cv, N * F * fl);
    a->up = carve(cv, N * F * fl);
    a->act = carve(cv, N * F * fl);
    a->residual3 = carve(cv, N * C * fl);
  }
  m->encoded = carve(cv, N * C * fl);
  m->proj = carve(cv, N * C * fl);
  m->lnf = carve(cv, N * C * fl);
  m->lnf_mean = m->gpt2 ? carve(cv, N * fl) : NULL;
  m->lnf_rstd = carve(cv, N * fl);
  m->lnf_last = carve(cv, (size_t)B * C * fl);
  m->logits = carve(cv, N * V * fl);
  m->losses = carve(cv, N * fl);
  m->tokens = carve(cv, N * sizeof(int32_t));
  m->targets = carve(cv, N * sizeof(int32_t));
  m->pos = m->gpt2 ? NULL : carve(cv, N * sizeof(int32_t));
  m->lora_xd = training && all.lora_dropout > 0.0f ? carve(cv, N * widest_in * fl) : NULL;
  m->lora_dt = training && all.lora_r ? carve(cv, N * (size_t)all.lora_r * fl) : NULL;
  m->bn_up = all.bottleneck ? carve(cv, N * C * fl) : NULL;
  m->bn_dh = training && all.bottleneck ? carve(cv, N * C * fl) : NULL;
  m->bn_dg = training && all.bottleneck ? carve(cv, N * (size_t)all.bottleneck * fl) : NULL;
  m->bn_dz = training && all.bottleneck ? carve(cv, N * (size_t)all.bottleneck * fl) : NULL;
  m->dresidual = m->dln = m->dln2 = m->datty = m->dqkv = m->dq = m->dk = m->dv = m->datt = NULL;
  m->dgate = m->dup = m->dact = NULL;
  if (training) {
    m->dresidual = carve(cv, N * C * fl);
    m->dln = carve(cv, N * C * fl);
    m->dln2 = m->gpt2 ? NULL : carve(cv, N * C * fl);
    m->datty = carve(cv, N * QW * fl);
    m->dqkv = m->gpt2 ? carve(cv, N * 3 * C * fl) : NULL;
    m->dq = m->gpt2 ? NULL : carve(cv, N * QW * fl);
    m->dk = m->gpt2 ? NULL : carve(cv, N * KW * fl);
    m->dv = m->gpt2 ? NULL : carve(cv, N * KW * fl);
    m->datt = carve(cv, att_n * fl);
    m->dgate = m->gpt2 ? NULL : carve(cv, N * F * fl);
    m->dup = carve(cv, N * F * fl);
    m->dact = carve(cv, N * F * fl);
  }
}

int ot_model_prepare(ot_model *m, int B, int T, int training) {
  if (B <= 0 || T <= 0) return ot_error(OT_ERR_INVALID, "batch %d x %d: both must be positive", B, T);
  if (T > m->cfg.n_positions)
    return ot_error(OT_ERR_RANGE, "sequence length %d exceeds the model's n_positions %d", T,
                    m->cfg.n_positions);
  for (int i = 0; training && i < m->n_params; i++)
    if (m->params[i].trainable && m->params[i].lowp)
      return ot_error(OT_ERR_UNSUPPORTED, "%s is kept in low precision and cannot train", m->params[i].name);
  free_acts(m);
  free_grads(m);
  m->training = training;
  m->n_act_blocks = training ? m->cfg.n_layer : 1;
  m->blocks = calloc((size_t)m->n_act_blocks, sizeof *m->blocks);
  m->host_losses = malloc((size_t)B * T * sizeof(float));
  m->host_targets = malloc((size_t)B * T * sizeof(int32_t));
  m->host_pos = malloc((size_t)B * T * sizeof(int32_t));
  if (!m->blocks || !m->host_losses || !m->host_targets || !m->host_pos) {
    free_acts(m);
    return ot_error(OT_ERR_NOMEM, "cannot allocate activation tables");
  }
  carver cv = {0, 1, NULL};
  plan_acts(m, &cv, B, T, training);
  int rc = m->be->ops->alloc(m->be, cv.off, &m->act_mem);
  if (rc) {
    free_acts(m);
    return rc;
  }
  m->act_bytes = cv.off;
  cv = (carver){0, 0, m->act_mem};
  plan_acts(m, &cv, B, T, training);
  m->maxB = B;
  m->maxT = T;
  if (training) {
    size_t n = 0;
    for (int i = 0; i < m->n_params; i++)
      if (m->params[i].trainable) n += m->params[i].numel;
    if (n > 0) {
      rc = m->be->ops->alloc(m->be, n * sizeof(float), (void **)&m->grad_mem);
      if (rc) {
        free_acts(m);
        return rc;
      }
      m->grad_scalars = n;
      float *g = m->grad_mem;
      for (int i = 0; i < m->n_params; i++) {
        if (!m->params[i].trainable) continue;
        m->params[i].grad = g;
        g += m->params[i].numel;
      }
      rc = ot_model_zero_grad(m);
    }
  }
  m->last_B = 0;
  return rc;
}

int ot_model_zero_grad(ot_model *m) {
  if (!m->grad_mem) return OT_OK;
  return m->be->ops->zero(m->be, m->grad_mem, m->grad_scalars * sizeof(float));
}

/* ---- forward / backward ---------------------------------------------------------- */

/* Data and gradient of block l's role r; NULL where the architecture has none. */
static float *BP(const ot_model *m, int l, int r) {
  int i = m->bidx[l][r];
  return i >= 0 ? m->params[i].data : NULL;
}
static float *BG(const ot_model *m, int l, int r) {
  int i = m->bidx[l][r];
  return i >= 0 ? m->params[i].grad : NULL;
}
#define XP(m, i) ((m)->params[i].data)
#define XG(m, i) ((m)->params[i].grad)
#define GP(m, g) ((m)->gidx[g] >= 0 ? (m)->params[(m)->gidx[g]].data : NULL)
#define GG(m, g) ((m)->gidx[g] >= 0 ? (m)->params[(m)->gidx[g]].grad : NULL)

static int has_lora(const ot_model *m, int l, int s) { return m->ext && ((m->ext[l].lora_sites >> s) & 1); }
static int has_bn(const ot_model *m, int l) { return m->ext && m->ext[l].bottleneck > 0; }

static float lora_p(const ot_model *m, int l) { return m->last_dropout ? m->ext[l].lora_dropout : 0.0f; }
/* GPT-2's sites 0-3 keep the dropout seeds they had before the model layer */
static uint64_t lora_seed(const ot_model *m, int l, int s) {
  return ot_dropout_seed(m->drop_seed, m->step, (uint64_t)l * (m->gpt2 ? 4 : OT_SITE_COUNT) + (uint64_t)s);
}

/* ---- the block code, shared by training, evaluation and serving ------------------- */

/* Serving state: the paged KV cache and a one-block workspace for steps of up to max_rows rows. */
struct ot_model_kv {
  ot_model *m;
  int n_slots, T_max, max_rows, max_last;
  float *kc, *vc; /* the pool: [L, n_blocks, block_size, KW] */
  int block_size, n_blocks, max_blocks;
  int32_t *h_table;  /* [n_slots, max_blocks] host block tables (-1: none) */
  int *n_held;       /* [n_slots] blocks each slot holds */
  int32_t *free_ids; /* [n_blocks] a stack of free blocks */
  int n_free;
  int32_t *d_table; /* backend copy of h_table, refreshed before a step when dirty */
  int table_dirty;
  ot_block_acts a;
  float *proj, *bn_up, *last, *lastn, *logits;
  float *lora_t; /* [max_rows, rcap] (segments without SGMV) */
  int rcap;
  float *bn_z, *bn_g; /* [max_rows, dcap] */
  int dcap;
  int32_t *d_tokens, *d_pos, *d_slot;
  /* lora_sgmv_fwd tables, one entry per segment */
  const float **sg_A, **sg_Bt;
  int *sg_row0, *sg_n, *sg_r;
  float *sg_scale;
  int sg_cap;
};

/* One forward pass over rows: training/eval (kv NULL: B sequences of T, causal; the model's own
 * extensions) or serving (kv: rows at pos/slot against the cache; per-segment weights). */
typedef struct {
  int B, T, N;
  ot_block_acts *a;
  float *proj, *bn_up;
  const int32_t *pos; /* backend positions of the rows (rotary embeddings) */
  ot_model_kv *kv;
  const ot_model_segment *sg;
  int ns;
} fwd_ctx;

/* Tensor of role r of block l for segment s (serving) or the model's own. */
static const float *W(const ot_model *m, const fwd_ctx *c, int s, int l, int r) {
  if (r < 0) return NULL;
  const ot_block_over *o = c->kv && c->sg[s].blk ? &c->sg[s].blk[l] : NULL;
  return o && o->p[r] ? o->p[r] : BP(m, l, r);
}

/* Norm of the architecture: LayerNorm (w, b) or RMSNorm (w); statistics saved when asked. */
static void norm_rows(ot_model *m, float *out, float *mean, float *rstd, const float *in, const float *w,
                      const float *b, int N) {
  if (m->gpt2)
    m->be->ops->layernorm_fwd(m->be, out, mean, rstd, in, w, b, N, m->cfg.n_embd, m->cfg.layer_norm_epsilon);
  else
    m->be->ops->rmsnorm_fwd(m->be, out, rstd, in, w, N, m->cfg.n_embd, m->cfg.layer_norm_epsilon);
}

/* Norm of block l (roles rw, rb): once per run of segments sharing weights. */
static void norm_fwd(ot_model *m, const fwd_ctx *c, int l, int rw, int rb, float *out, float *mean,
                     float *rstd, const float *in) {
  if (!c->kv) {
    norm_rows(m, out, mean, rstd, in, BP(m, l, rw), rb >= 0 ? BP(m, l, rb) : NULL, c->N);
    return;
  }
  size_t C = m->cfg.n_embd;
  for (int s = 0; s < c->ns;) {
    const float *w = W(m, c, s, l, rw), *b = W(m, c, s, l, rb);
    int t = s + 1, n = c->sg[s].n;
    while (t < c->ns && W(m, c, t, l, rw) == w && W(m, c, t, l, rb) == b) n += c->sg[t++].n;
    norm_rows(m, out + c->sg[s].row0 * C, NULL, NULL, in + c->sg[s].row0 * C, w, b, n);
    s = t;
  }
}

/* out = x W + b at site s of block l plus the LoRA branch: training saves t for backward; serving
 * runs the shared GEMM once per run of segments with the same weights, then every segment's
 * branch on its own rows (Punica's SGMV: shrink x A^T, expand (.) B^T, scaled). */
static void lin_fwd(ot_model *m, const fwd_ctx *c, int l, int site, float *out, const float *x) {
  const ot_backend_ops *o = m->be->ops;
  int in, outw, wr = ot_site_weight_role(site), br = ot_site_bias_role(site);
  ot_model_site_dims(m, site, &in, &outw);
  if (!c->kv) {
    const ot_param *W = &m->params[m->bidx[l][wr]];
    if (W->lowp)
      o->matmul_fwd_lowp(m->be, out, x, W->lowp, W->lowp_kind, W->lowp_scale, br >= 0 ? BP(m, l, br) : NULL,
                         c->N, in, outw, m->layout);
    else
      o->matmul_fwd(m->be, out, x, BP(m, l, wr), br >= 0 ? BP(m, l, br) : NULL, c->N, in, outw, m->layout);
    if (!has_lora(m, l, site)) return;
    const ot_block_ext *e = &m->ext[l];
    o->lora_fwd(m->be, out, c->a->lora_t[site], m->lora_xd, x, XP(m, m->eidx[l].lora[site][0]),
                XP(m, m->eidx[l].lora[site][1]), c->N, in, outw, e->lora_r, ot_block_ext_scale(e),
                lora_p(m, l), lora_seed(m, l, site));
    return;
  }
  for (int s = 0; s < c->ns;) {
    const float *w = W(m, c, s, l, wr), *b = W(m, c, s, l, br);
    int t = s + 1, n = c->sg[s].n;
    while (t < c->ns && W(m, c, t, l, wr) == w && W(m, c, t, l, br) == b) n += c->sg[t++].n;
    o->matmul_fwd(m->be, out + (size_t)c->sg[s].row0 * outw, x + (size_t)c->sg[s].row0 * in, w, b, n, in,
                  outw, m->layout);
    s = t;
  }
  ot_model_kv *kv = c->kv;
  int S = 0;
  for (int s = 0; s < c->ns; s++) {
    const ot_block_over *bo = c->sg[s].blk ? &c->sg[s].blk[l] : NULL;
    if (!bo || !((bo->lora_sites >> site) & 1)) continue;
    if (!o->lora_sgmv_fwd) {
      o->lora_fwd(m->be, out + (size_t)c->sg[s].row0 * outw, kv->lora_t, NULL, x + (size_t)c->sg[s].row0 * in,
                  bo->lora_a[site], bo->lora_b[site], c->sg[s].n, in, outw, bo->lora_r, bo->lora_scale, 0.0f,
                  0);
      continue;
    }
    kv->sg_A[S] = bo->lora_a[site];
    kv->sg_Bt[S] = bo->lora_bt[site];
    kv->sg_row0[S] = c->sg[s].row0;
    kv->sg_n[S] = c->sg[s].n;
    kv->sg_r[S] = bo->lora_r;
    kv->sg_scale[S++] = bo->lora_scale;
  }
  if (S)
    o->lora_sgmv_fwd(m->be, out, x, kv->sg_A, kv->sg_Bt, kv->sg_row0, kv->sg_n, kv->sg_r, kv->sg_scale, S, in,
                     outw);
}

/* Bottleneck k of block l after the output projection: h += up(gelu(down(h))). Training keeps h
 * (a->bn_in[k]) and the hidden activations for backward and writes the sum to c->proj; serving
 * adds in place on the segments that have one. */
static void bn_fwd(ot_model *m, const fwd_ctx *c, int l, int k) {
  const ot_backend_ops *o = m->be->ops;
  int C = m->cfg.n_embd;
  if (!c->kv) {
    int d = m->ext[l].bottleneck;
    const int *ix = m->eidx[l].bn[k];
    ot_block_acts *a = c->a;
    o->matmul_fwd(m->be, a->bn_z[k], a->bn_in[k], XP(m, ix[0]), XP(m, ix[1]), c->N, C, d, OT_W_IN_OUT);
    o->gelu_fwd(m->be, a->bn_g[k], a->bn_z[k], (size_t)c->N * d);
    o->matmul_fwd(m->be, c->bn_up, a->bn_g[k], XP(m, ix[2]), XP(m, ix[3]), c->N, d, C, OT_W_IN_OUT);
    o->add(m->be, c->proj, a->bn_in[k], c->bn_up, (size_t)c->N * C);
    return;
  }
  ot_model_kv *kv = c->kv;
  for (int s = 0; s < c->ns; s++) {
    const ot_block_over *bo = c->sg[s].blk ? &c->sg[s].blk[l] : NULL;
    if (!bo || !bo->bn_dim) continue;
    int d = bo->bn_dim, n = c->sg[s].n;
    float *hs = c->proj + (size_t)c->sg[s].row0 * C;
    o->matmul_fwd(m->be, kv->bn_z, hs, bo->bn[k][0], bo->bn[k][1], n, C, d, OT_W_IN_OUT);
    o->gelu_fwd(m->be, kv->bn_g, kv->bn_z, (size_t)n * d);
    o->matmul_fwd(m->be, c->bn_up, kv->bn_g, bo->bn[k][2], bo->bn[k][3], n, d, C, OT_W_IN_OUT);
    o->add(m->be, hs, hs, c->bn_up, (size_t)n * C);
  }
}

/* Has block l a bottleneck in this pass (training: its own extension; serving: any segment)? */
static int bn_here(const ot_model *m, const fwd_ctx *c, int l) {
  if (!c->kv) return has_bn(m, l);
  for (int s = 0; s < c->ns; s++)
    if (c->sg[s].blk && c->sg[s].blk[l].bn_dim) return 1;
  return 0;
}

/* One block: residual -> a->residual3. Attention is causal within each sequence: over the B rows
 * of T in training, against the cache in serving. */
static void block_fwd(ot_model *m, const fwd_ctx *c, int l, const float *residual) {
  const ot_backend_ops *o = m->be->ops;
  ot_backend *be = m->be;
  ot_block_acts *a = c->a;
  int C = m->cfg.n_embd, NH = m->cfg.n_head, N = c->N;
  int bn_train = !c->kv && has_bn(m, l); /* training keeps the bottleneck's input apart */
  norm_fwd(m, c, l, OT_R_ATTN_NORM, OT_R_ATTN_NORM_B, a->ln1, a->ln1_mean, a->ln1_rstd, residual);
  size_t layer_kv = c->kv ? (size_t)c->kv->n_blocks * c->kv->block_size * m->KW : 0;
  float *kc = c->kv ? c->kv->kc + l * layer_kv : NULL, *vc = c->kv ? c->kv->vc + l * layer_kv : NULL;
  if (m->gpt2) {
    lin_fwd(m, c, l, OT_SITE_QKV, a->qkv, a->ln1);
    if (c->kv)
      o->attention_kv_fwd(be, a->atty, kc, vc, a->qkv, c->kv->d_pos, c->kv->d_slot, c->kv->d_table, N, C, NH,
                          c->kv->block_size, c->kv->max_blocks);
    else
      o->attention_fwd(be, a->atty, a->att, a->qkv, c->B, c->T, C, NH);
  } else {
    int D = m->cfg.head_dim, NKV = m->cfg.n_kv_head;
    lin_fwd(m, c, l, OT_SITE_Q, a->q, a->ln1);
    lin_fwd(m, c, l, OT_SITE_K, a->k, a->ln1);
    lin_fwd(m, c, l, OT_SITE_V, a->v, a->ln1);
    o->rope(be, a->q, c->pos, m->inv_freq, N, NH, D, 0);
    o->rope(be, a->k, c->pos, m->inv_freq, N, NKV, D, 0);
    if (c->kv)
      o->gqa_kv_fwd(be, a->atty, kc, vc, a->q, a->k, a->v, c->kv->d_pos, c->kv->d_slot, c->kv->d_table, N, NH,
                    NKV, D, c->kv->block_size, c->kv->max_blocks);
    else
      o->gqa_fwd(be, a->atty, a->att, a->q, a->k, a->v, c->B, c->T, NH, NKV, D);
  }
  lin_fwd(m, c, l, OT_SITE_O, bn_train ? a->bn_in[0] : c->proj, a->atty);
  if (bn_here(m, c, l)) bn_fwd(m, c, l, 0);
  o->add(be, a->residual2, residual, c->proj, (size_t)N * C);
  norm_fwd(m, c, l, OT_R_FFN_NORM, OT_R_FFN_NORM_B, a->ln2, a->ln2_mean, a->ln2_rstd, a->residual2);
  size_t NF = (size_t)N * m->cfg.n_ff;
  if (m->gpt2) {
    lin_fwd(m, c, l, OT_SITE_UP, a->up, a->ln2);
    o->gelu_fwd(be, a->act, a->up, NF);
  } else {
    lin_fwd(m, c, l, OT_SITE_GATE, a->gate, a->ln2);
    lin_fwd(m, c, l, OT_SITE_UP, a->up, a->ln2);
    o->swiglu_fwd(be, a->act, a->gate, a->up, NF);
  }
  lin_fwd(m, c, l, OT_SITE_DOWN, bn_train ? a->bn_in[1] : c->proj, a->act);
  if (bn_here(m, c, l)) bn_fwd(m, c, l, 1);
  o->add(be, a->residual3, a->residual2, c->proj, (size_t)N * C);
}

static void norm_bwd(ot_model *m, float *dinp, float *dw, float *db, const float *dout, const float *in,
                     const float *w, const float *mean, const float *rstd, int N) {
  if (m->gpt2)
    m->be->ops->layernorm_bwd(m->be, dinp, dw, db, dout, in, w, mean, rstd, N, m->cfg.n_embd);
  else
    m->be->ops->rmsnorm_bwd(m->be, dinp, dw, dout, in, w, rstd, N, m->cfg.n_embd);
}

/* dx = dout W^T (overwrite) plus the LoRA branch; dW, db, dA, dB accumulate. */
static void lin_bwd(ot_model *m, int l, ot_block_acts *a, int s, float *dx, const float *dout, const float *x,
                    int N) {
  int in, outw, wr = ot_site_weight_role(s), br = ot_site_bias_role(s);
  ot_model_site_dims(m, s, &in, &outw);
  const ot_param *W = &m->params[m->bidx[l][wr]];
  float *db = br >= 0 ? BG(m, l, br) : NULL;
  if (W->lowp) { /* frozen: dx only, and the bias's gradient when BitFit trains it */
    m->be->ops->matmul_bwd_lowp(m->be, dx, dout, W->lowp, W->lowp_kind, W->lowp_scale, N, in, outw,
                                m->layout);
    if (db) m->be->ops->matmul_bwd(m->be, NULL, NULL, db, dout, x, NULL, N, in, outw, m->layout);
  } else {
    m->be->ops->matmul_bwd(m->be, dx, BG(m, l, wr), db, dout, x, BP(m, l, wr), N, in, outw, m->layout);
  }
  if (!has_lora(m, l, s)) return;
  const ot_block_ext *e = &m->ext[l];
  int ia = m->eidx[l].lora[s][0], ib = m->eidx[l].lora[s][1];
  m->be->ops->lora_bwd(m->be, dx, XG(m, ia), XG(m, ib), m->lora_dt, m->lora_xd, dout, x, a->lora_t[s],
                       XP(m, ia), XP(m, ib), N, in, outw, e->lora_r, ot_block_ext_scale(e), lora_p(m, l),
                       lora_seed(m, l, s));
}

/* dh = dout + (adapter's Jacobian)^T dout into m->bn_dh; returns it. */
static const float *bn_bwd(ot_model *m, int l, ot_block_acts *a, int k, const float *dout, int N) {
  const ot_backend_ops *o = m->be->ops;
  int C = m->cfg.n_embd, d = m->ext[l].bottleneck;
  const int *ix = m->eidx[l].bn[k];
  o->matmul_bwd(m->be, m->bn_dg, XG(m, ix[2]), XG(m, ix[3]), dout, a->bn_g[k], XP(m, ix[2]), N, d, C,
                OT_W_IN_OUT);
  o->gelu_bwd(m->be, m->bn_dz, a->bn_z[k], m->bn_dg, (size_t)N * d);
  o->matmul_bwd(m->be, m->bn_dh, XG(m, ix[0]), XG(m, ix[1]), m->bn_dz, a->bn_in[k], XP(m, ix[0]), N, C, d,
                OT_W_IN_OUT);
  o->add(m->be, m->bn_dh, m->bn_dh, dout, (size_t)N * C);
  return m->bn_dh;
}

/* Backward of block l: m->dresidual holds dL/d(residual3) and becomes dL/d(residual) when
 * input_grad (else only the block's parameter gradients are made). */
static void block_bwd(ot_model *m, int l, ot_block_acts *a, const float *residual, int B, int T,
                      int input_grad) {
  const ot_backend_ops *o = m->be->ops;
  ot_backend *be = m->be;
  int C = m->cfg.n_embd, NH = m->cfg.n_head, N = B * T, bn = has_bn(m, l);
  size_t NF = (size_t)N * m->cfg.n_ff;
  /* residual3 = residual2 + down(...): dresidual flows to both */
  const float *dh = bn ? bn_bwd(m, l, a, 1, m->dresidual, N) : m->dresidual;
  lin_bwd(m, l, a, OT_SITE_DOWN, m->dact, dh, a->act, N);
  if (m->gpt2) {
    o->gelu_bwd(be, m->dup, a->up, m->dact, NF);
    lin_bwd(m, l, a, OT_SITE_UP, m->dln, m->dup, a->ln2, N);
  } else {
    o->swiglu_bwd(be, m->dgate, m->dup, m->dact, a->gate, a->up, NF);
    lin_bwd(m, l, a, OT_SITE_GATE, m->dln, m->dgate, a->ln2, N);
    lin_bwd(m, l, a, OT_SITE_UP, m->dln2, m->dup, a->ln2, N);
    o->add(be, m->dln, m->dln, m->dln2, (size_t)N * C);
  }
  norm_bwd(m, m->dresidual, BG(m, l, OT_R_FFN_NORM), BG(m, l, OT_R_FFN_NORM_B), m->dln, a->residual2,
           BP(m, l, OT_R_FFN_NORM), a->ln2_mean, a->ln2_rstd, N);
  /* residual2 = residual + o(...) */
  dh = bn ? bn_bwd(m, l, a, 0, m->dresidual, N) : m->dresidual;
  lin_bwd(m, l, a, OT_SITE_O, m->datty, dh, a->atty, N);
  if (m->gpt2) {
    o->attention_bwd(be, m->dqkv, m->datt, m->datty, a->qkv, a->att, B, T, C, NH);
    lin_bwd(m, l, a, OT_SITE_QKV, m->dln, m->dqkv, a->ln1, N);
  } else {
    int D = m->cfg.head_dim, NKV = m->cfg.n_kv_head;
    o->gqa_bwd(be, m->dq, m->dk, m->dv, m->datt, m->datty, a->q, a->k, a->v, a->att, B, T, NH, NKV, D);
    /* the rotation is orthogonal: its backward turns the gradient back */
    o->rope(be, m->dq, m->pos, m->inv_freq, N, NH, D, 1);
    o->rope(be, m->dk, m->pos, m->inv_freq, N, NKV, D, 1);
    lin_bwd(m, l, a, OT_SITE_Q, m->dln, m->dq, a->ln1, N);
    lin_bwd(m, l, a, OT_SITE_K, m->dln2, m->dk, a->ln1, N);
    o->add(be, m->dln, m->dln, m->dln2, (size_t)N * C);
    lin_bwd(m, l, a, OT_SITE_V, m->dln2, m->dv, a->ln1, N);
    o->add(be, m->dln, m->dln, m->dln2, (size_t)N * C);
  }
  norm_bwd(m, input_grad ? m->dresidual : NULL, BG(m, l, OT_R_ATTN_NORM), BG(m, l, OT_R_ATTN_NORM_B), m->dln,
           residual, BP(m, l, OT_R_ATTN_NORM), a->ln1_mean, a->ln1_rstd, N);
}

/* Embeddings, blocks 0..n_blocks-1 and, when all blocks ran, the final norm into m->lnf. */
static int forward_trunk(ot_model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
                         int n_blocks) {
  if (!m->act_mem) return ot_error(OT_ERR_INVALID, "forward before ot_model_prepare");
  if (B <= 0 || T <= 0 || B > m->maxB || T > m->maxT || (size_t)B * T > (size_t)m->maxB * m->maxT)
    return ot_error(OT_ERR_RANGE, "batch %d x %d exceeds the prepared %d x %d", B, T, m->maxB, m->maxT);
  const ot_backend_ops *o = m->be->ops;
  ot_backend *be = m->be;
  int C = m->cfg.n_embd, V = m->cfg.vocab_size, L = m->cfg.n_layer;
  int N = B * T;
  for (int i = 0; i < N; i++) {
    if (inputs[i] < 0 || inputs[i] >= V)
      return ot_error(OT_ERR_RANGE, "input token %d at position %d is outside the vocabulary (%d)", inputs[i],
                      i, V);
    if (targets && (targets[i] < -1 || targets[i] >= V))
      return ot_error(OT_ERR_RANGE, "target token %d at position %d is outside the vocabulary (%d)",
                      targets[i], i, V);
  }
  int rc = o->upload(be, m->tokens, inputs, (size_t)N * sizeof(int32_t));
  if (rc) return rc;
  if (targets) {
    rc = o->upload(be, m->targets, targets, (size_t)N * sizeof(int32_t));
    if (rc) return rc;
    memcpy(m->host_targets, targets, (size_t)N * sizeof(int32_t));
  }
  if (m->pos) {
    for (int i = 0; i < N; i++) m->host_pos[i] = i % T;
    rc = o->upload(be, m->pos, m->host_pos, (size_t)N * sizeof(int32_t));
    if (rc) return rc;
  }

  /* dropout only in training forwards with targets; backward reuses this decision */
  m->last_dropout = m->training && m->dropout_on && targets != NULL;
  o->encoder_fwd(be, m->encoded, m->tokens, GP(m, OT_G_TOK), GP(m, OT_G_POS), B, T, C);
  float *residual = m->encoded;
  fwd_ctx c = {.B = B, .T = T, .N = N, .proj = m->proj, .bn_up = m->bn_up, .pos = m->pos};
  for (int l = 0; l < n_blocks; l++) {
    c.a = &m->blocks[m->training ? l : 0];
    block_fwd(m, &c, l, residual);
    residual = c.a->residual3;
  }
  if (n_blocks < L) {
    m->last_B = 0; /* a partial forward leaves nothing for backward or last_logits */
    return OT_OK;
  }
  norm_rows(m, m->lnf, m->lnf_mean, m->lnf_rstd, residual, GP(m, OT_G_NORM), GP(m, OT_G_NORM_B), N);
  m->last_B = B;
  m->last_T = T;
  m->last_has_targets = targets != NULL;
  return OT_OK;
}

int ot_model_forward(ot_model *m, const int32_t *inputs, const int32_t *targets, int B, int T, float *loss) {
  int rc = forward_trunk(m, inputs, targets, B, T, m->cfg.n_layer);
  if (rc) return rc;
  const ot_backend_ops *o = m->be->ops;
  ot_backend *be = m->be;
  int C = m->cfg.n_embd, V = m->cfg.vocab_size, N = B * T;
  const float *head = GP(m, OT_G_HEAD);
  if (!targets) {
    /* Generation needs only the last position of each row: B x V logits, not N x V. */
    for (int b = 0; b < B; b++)
      o->copy(be, m->lnf_last + (size_t)b * C, m->lnf + ((size_t)b * T + T - 1) * C,
              (size_t)C * sizeof(float));
    o->matmul_fwd(be, m->logits, m->lnf_last, head, NULL, B, C, V, OT_W_OUT_IN);
    return o->sync(be);
  }
  o->matmul_fwd(be, m->logits, m->lnf, head, NULL, N, C, V, OT_W_OUT_IN);
  o->crossentropy_fwd(be, m->losses, m->logits, m->logits, m->targets, N, V);
  rc = o->download(be, m->host_losses, m->losses, (size_t)N * sizeof(float));
  if (rc) return rc;
  double sum = 0.0;
  size_t count = 0;
  for (int i = 0; i < N; i++) {
    if (targets[i] < 0) continue;
    sum += m->host_losses[i];
    count++;
  }
  m->last_loss_sum = sum;
  m->last_count = count;
  if (loss) *loss = count ? (float)(sum / count) : NAN;
  return OT_OK;
}

int ot_model_forward_logits(ot_model *m, const int32_t *inputs, int B, int T, float *logits_out) {
  int rc = forward_trunk(m, inputs, NULL, B, T, m->cfg.n_layer);
  if (rc) return rc;
  int C = m->cfg.n_embd, V = m->cfg.vocab_size, N = B * T;
  m->last_B = 0; /* the logits buffer no longer holds last-position logits */
  m->be->ops->matmul_fwd(m->be, m->logits, m->lnf, GP(m, OT_G_HEAD), NULL, N, C, V, OT_W_OUT_IN);
  return m->be->ops->download(m->be, logits_out, m->logits, (size_t)N * V * sizeof(float));
}

int ot_model_last_loss_sum(const ot_model *m, double *sum, size_t *count) {
  if (!m->last_B || !m->last_has_targets) return ot_error(OT_ERR_INVALID, "no forward with targets yet");
  *sum = m->last_loss_sum;
  *count = m->last_count;
  return OT_OK;
}

int ot_model_last_logits(ot_model *m, int b, float *logits_out) {
  if (!m->last_B || m->last_has_targets)
    return ot_error(OT_ERR_INVALID, "last logits need a forward without targets");
  if (b < 0 || b >= m->last_B) return ot_error(OT_ERR_RANGE, "row %d outside batch %d", b, m->last_B);
  size_t V = m->cfg.vocab_size;
  return m->be->ops->download(m->be, logits_out, m->logits + (size_t)b * V, V * sizeof(float));
}

/* Does block l have a trainable tensor (its own or an extension's)? */
static int block_trainable(const ot_model *m, int l) {
  for (int r = 0; r < OT_R_COUNT; r++) {
    int i = m->bidx[l][r];
    if (i >= 0 && m->params[i].trainable) return 1;
  }
  if (!m->ext) return 0;
  const int *ix = &m->eidx[l].lora[0][0];
  for (int k = 0; k < (int)(sizeof(ot_ext_idx) / sizeof(int)); k++)
    if (ix[k] >= 0 && m->params[ix[k]].trainable) return 1;
  return 0;
}

int ot_model_backward(ot_model *m) {
  if (!m->training) return ot_error(OT_ERR_INVALID, "backward on a model not prepared for training");
  if (!m->last_B || !m->last_has_targets)
    return ot_error(OT_ERR_INVALID, "backward needs a forward with targets");
  if (m->last_count == 0) { /* nothing to learn from */
    ot_model_clear_block_grads(m);
    return OT_OK;
  }
  const ot_backend_ops *o = m->be->ops;
  ot_backend *be = m->be;
  int B = m->last_B, T = m->last_T, C = m->cfg.n_embd, V = m->cfg.vocab_size, L = m->cfg.n_layer;
  int N = B * T;

  /* Lowest layer whose parameters (or anything below) need gradients. */
  int tok = m->gidx[OT_G_TOK], pos = m->gidx[OT_G_POS], head = m->gidx[OT_G_HEAD];
  int emb_trainable = m->params[tok].trainable || (pos >= 0 && m->params[pos].trainable);
  int stop = L;
  for (int l = 0; l < L && stop == L; l++)
    if (block_trainable(m, l)) stop = l;
  if (emb_trainable) stop = 0;
  int nb = m->gidx[OT_G_NORM_B];
  int lnf_trainable = m->params[m->gidx[OT_G_NORM]].trainable || (nb >= 0 && m->params[nb].trainable);
  if (stop == L && !lnf_trainable && !m->params[head].trainable) { /* all frozen */
    ot_model_clear_block_grads(m);
    return OT_OK;
  }

  o->crossentropy_bwd(be, m->logits, m->logits, m->targets, 1.0f / (float)m->last_count, N, V);
  o->matmul_bwd(be, m->dln, m->params[head].grad, NULL, m->logits, m->lnf, m->params[head].data, N, C, V,
                OT_W_OUT_IN);
  o->zero(be, m->dresidual, (size_t)N * C * sizeof(float));
  norm_bwd(m, stop < L ? m->dresidual : NULL, GG(m, OT_G_NORM), GG(m, OT_G_NORM_B), m->dln,
           m->blocks[L - 1].residual3, GP(m, OT_G_NORM), m->lnf_mean, m->lnf_rstd, N);
  for (int l = L - 1; l >= stop; l--) {
    if (m->extra_grad[l]) o->add(be, m->dresidual, m->dresidual, m->extra_grad[l], (size_t)N * C);
    block_bwd(m, l, &m->blocks[l], l == 0 ? m->encoded : m->blocks[l - 1].residual3, B, T,
              l > stop || emb_trainable);
  }
  if (emb_trainable) o->encoder_bwd(be, GG(m, OT_G_TOK), GG(m, OT_G_POS), m->dresidual, m->tokens, B, T, C);
  ot_model_clear_block_grads(m);
  return o->sync(be);
}

int ot_model_forward_to_block(ot_model *m, const int32_t *inputs, int B, int T, int layer, float *out) {
  if (layer < 0 || layer >= m->cfg.n_layer)
    return ot_error(OT_ERR_RANGE, "block %d outside 0..%d", layer, m->cfg.n_layer - 1);
  int rc = forward_trunk(m, inputs, NULL, B, T, layer + 1);
  if (rc) return rc;
  ot_block_acts *a = &m->blocks[m->training ? layer : 0];
  rc = m->be->ops->copy(m->be, out, a->residual3, (size_t)B * T * m->cfg.n_embd * sizeof(float));
  m->last_B = 0;
  return rc == OT_OK ? m->be->ops->sync(m->be) : rc;
}

int ot_model_block_output(const ot_model *m, int layer, const float **out) {
  if (!m->training || !m->last_B)
    return ot_error(OT_ERR_INVALID, "block outputs need a full forward on a model prepared for training");
  if (layer < 0 || layer >= m->cfg.n_layer)
    return ot_error(OT_ERR_RANGE, "block %d outside 0..%d", layer, m->cfg.n_layer - 1);
  *out = m->blocks[layer].residual3;
  return OT_OK;
}

int ot_model_set_block_grad(ot_model *m, int layer, const float *dout) {
  if (layer < 0 || layer >= m->cfg.n_layer)
    return ot_error(OT_ERR_RANGE, "block %d outside 0..%d", layer, m->cfg.n_layer - 1);
  m->extra_grad[layer] = dout;
  return OT_OK;
}

void ot_model_clear_block_grads(ot_model *m) {
  for (int l = 0; l < m->cfg.n_layer; l++) m->extra_grad[l] = NULL;
}

/* ---- serving: KV cache and batched decode ---------------------------------------- */

void ot_model_kv_free(ot_model_kv *kv) {
  if (!kv) return;
  ot_backend *be = kv->m->be;
  ot_block_acts *a = &kv->a;
  void *bufs[] = {kv->kc,   kv->vc,       a->ln1,    a->qkv,     a->q,       a->k,       a->v,
                  a->atty,  a->residual2, a->ln2,    a->gate,    a->up,      a->act,     a->residual3,
                  kv->proj, kv->bn_up,    kv->last,  kv->lastn,  kv->logits, kv->lora_t, kv->bn_z,
                  kv->bn_g, kv->d_tokens, kv->d_pos, kv->d_slot, kv->d_table};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    if (bufs[i]) be->ops->free(be, bufs[i]);
  free(kv->h_table);
  free(kv->n_held);
  free(kv->free_ids);
  free(kv->sg_A);
  free(kv->sg_Bt);
  free(kv->sg_row0);
  free(kv->sg_n);
  free(kv->sg_r);
  free(kv->sg_scale);
  free(kv);
}

size_t ot_model_kv_block_bytes(const ot_model *m, int block_size) {
  return 2 * (size_t)m->cfg.n_layer * (size_t)block_size * m->KW * sizeof(float);
}

int ot_model_kv_create(ot_model *m, const ot_model_kv_config *kc, ot_model_kv **out) {
  if (m && m->lowp_mem) return need_fp32(m, "serving");
  if (!m || !kc || !out || kc->n_slots < 1 || kc->T_max < 1 || kc->max_rows < 1 || kc->max_last < 1 ||
      kc->block_size < 0 || kc->n_blocks < 0)
    return ot_error(OT_ERR_INVALID, "ot_model_kv_create: sizes must be positive");
  int n_slots = kc->n_slots, T_max = kc->T_max, max_rows = kc->max_rows, max_last = kc->max_last;
  if (T_max > m->cfg.n_positions)
    return ot_error(OT_ERR_RANGE, "sequence length %d exceeds the model's n_positions %d", T_max,
                    m->cfg.n_positions);
  int bs = kc->block_size ? kc->block_size : 16;
  if (bs > T_max) bs = T_max;
  int mb = (T_max + bs - 1) / bs;
  int nb = kc->n_blocks ? kc->n_blocks : n_slots * mb;
  if (nb < mb)
    return ot_error(OT_ERR_RANGE,
                    "a KV cache of %d blocks of %d positions cannot hold one sequence of %d positions "
                    "(%d blocks)",
                    nb, bs, T_max, mb);
  if ((size_t)nb * bs > (size_t)INT32_MAX / 2)
    return ot_error(OT_ERR_RANGE, "a KV cache of %d blocks of %d positions is too large", nb, bs);
  ot_backend *be = m->be;
  int rc = OT_BACKEND_REQUIRE(be, embed_fwd);
  if (rc == OT_OK)
    rc = m->gpt2 ? OT_BACKEND_REQUIRE(be, attention_kv_fwd) : OT_BACKEND_REQUIRE(be, gqa_kv_fwd);
  if (rc == OT_OK) rc = OT_BACKEND_REQUIRE(be, lora_fwd);
  if (rc) return rc;
  ot_model_kv *kv = calloc(1, sizeof *kv);
  if (!kv) return ot_error(OT_ERR_NOMEM, "cannot allocate the KV cache");
  kv->m = m;
  kv->n_slots = n_slots;
  kv->T_max = T_max;
  kv->max_rows = max_rows;
  kv->max_last = max_last;
  kv->block_size = bs;
  kv->n_blocks = nb;
  kv->max_blocks = mb;
  size_t N = (size_t)max_rows, C = m->cfg.n_embd, F = m->cfg.n_ff, QW = m->QW, KW = m->KW, fl = sizeof(float);
  size_t cache = ot_model_kv_block_bytes(m, bs) / 2 * (size_t)nb;
  ot_block_acts *a = &kv->a;
  struct {
    void **p;
    size_t bytes;
  } bufs[] = {{(void **)&kv->kc, cache},
              {(void **)&kv->vc, cache},
              {(void **)&a->ln1, N * C * fl},
              {(void **)&a->qkv, m->gpt2 ? N * 3 * C * fl : 0},
              {(void **)&a->q, m->gpt2 ? 0 : N * QW * fl},
              {(void **)&a->k, m->gpt2 ? 0 : N * KW * fl},
              {(void **)&a->v, m->gpt2 ? 0 : N * KW * fl},
              {(void **)&a->atty, N * QW * fl},
              {(void **)&a->residual2, N * C * fl},
              {(void **)&a->ln2, N * C * fl},
              {(void **)&a->gate, m->gpt2 ? 0 : N * F * fl},
              {(void **)&a->up, N * F * fl},
              {(void **)&a->act, N * F * fl},
              {(void **)&a->residual3, N * C * fl},
              {(void **)&kv->proj, N * C * fl},
              {(void **)&kv->bn_up, N * C * fl},
              {(void **)&kv->last, (size_t)max_last * C * fl},
              {(void **)&kv->lastn, (size_t)max_last * C * fl},
              {(void **)&kv->logits, (size_t)max_last * m->cfg.vocab_size * fl},
              {(void **)&kv->d_tokens, N * sizeof(int32_t)},
              {(void **)&kv->d_pos, N * sizeof(int32_t)},
              {(void **)&kv->d_slot, N * sizeof(int32_t)},
              {(void **)&kv->d_table, (size_t)n_slots * mb * sizeof(int32_t)}};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0] && rc == OT_OK; i++)
    if (bufs[i].bytes) rc = be->ops->alloc(be, bufs[i].bytes, bufs[i].p);
  kv->h_table = malloc((size_t)n_slots * mb * sizeof(int32_t));
  kv->n_held = calloc((size_t)n_slots, sizeof(int));
  kv->free_ids = malloc((size_t)nb * sizeof(int32_t));
  if (rc == OT_OK && (!kv->h_table || !kv->n_held || !kv->free_ids))
    rc = ot_error(OT_ERR_NOMEM, "cannot allocate the KV block tables");
  if (rc == OT_OK) {
    /* unheld entries point at block 0, so a table never sends the kernels out of the pool */
    memset(kv->h_table, 0, (size_t)n_slots * mb * sizeof(int32_t));
    for (int i = 0; i < nb; i++) kv->free_ids[i] = nb - 1 - i; /* block 0 on top */
    kv->n_free = nb;
    kv->table_dirty = 1;
  }
  kv->sg_cap = max_rows;
  kv->sg_A = malloc(N * sizeof *kv->sg_A);
  kv->sg_Bt = malloc(N * sizeof *kv->sg_Bt);
  kv->sg_row0 = malloc(N * sizeof(int));
  kv->sg_n = malloc(N * sizeof(int));
  kv->sg_r = malloc(N * sizeof(int));
  kv->sg_scale = malloc(N * sizeof(float));
  if (rc == OT_OK && (!kv->sg_A || !kv->sg_Bt || !kv->sg_row0 || !kv->sg_n || !kv->sg_r || !kv->sg_scale))
    rc = ot_error(OT_ERR_NOMEM, "cannot allocate the SGMV tables");
  if (rc) {
    ot_model_kv_free(kv);
    return rc;
  }
  *out = kv;
  return OT_OK;
}

size_t ot_model_kv_cache_bytes(const ot_model_kv *kv) {
  return ot_model_kv_block_bytes(kv->m, kv->block_size) * (size_t)kv->n_blocks;
}

int ot_model_kv_block_size(const ot_model_kv *kv) { return kv->block_size; }
int ot_model_kv_blocks_total(const ot_model_kv *kv) { return kv->n_blocks; }
int ot_model_kv_blocks_free(const ot_model_kv *kv) { return kv->n_free; }

int ot_model_kv_blocks_needed(const ot_model_kv *kv, int slot, int n_positions) {
  if (slot < 0 || slot >= kv->n_slots) return 0;
  int want = (n_positions + kv->block_size - 1) / kv->block_size;
  return want > kv->n_held[slot] ? want - kv->n_held[slot] : 0;
}

int ot_model_kv_grow(ot_model_kv *kv, int slot, int n_positions) {
  if (!kv || slot < 0 || slot >= kv->n_slots || n_positions < 0)
    return ot_error(OT_ERR_INVALID, "ot_model_kv_grow: bad slot %d", slot);
  if (n_positions > kv->T_max)
    return ot_error(OT_ERR_RANGE, "%d positions exceed the sequence limit %d", n_positions, kv->T_max);
  int need = ot_model_kv_blocks_needed(kv, slot, n_positions);
  if (need > kv->n_free)
    return ot_error(OT_ERR_NOMEM, "the KV cache has %d free blocks; %d needed", kv->n_free, need);
  int32_t *t = kv->h_table + (size_t)slot * kv->max_blocks;
  for (int i = 0; i < need; i++) t[kv->n_held[slot]++] = kv->free_ids[--kv->n_free];
  if (need) kv->table_dirty = 1;
  return OT_OK;
}

void ot_model_kv_release(ot_model_kv *kv, int slot) {
  if (!kv || slot < 0 || slot >= kv->n_slots) return;
  int32_t *t = kv->h_table + (size_t)slot * kv->max_blocks;
  while (kv->n_held[slot] > 0) { /* last taken goes back on top: LIFO reuse */
    int k = --kv->n_held[slot];
    kv->free_ids[kv->n_free++] = t[k];
    t[k] = 0;
  }
  kv->table_dirty = 1;
}

int ot_model_kv_reserve(ot_model_kv *kv, int r, int d) {
  ot_backend *be = kv->m->be;
  if (r > kv->rcap) {
    float *t = NULL;
    int rc = be->ops->alloc(be, (size_t)kv->max_rows * r * sizeof(float), (void **)&t);
    if (rc) return rc;
    if (kv->lora_t) be->ops->free(be, kv->lora_t);
    kv->lora_t = t;
    kv->rcap = r;
  }
  if (d > kv->dcap) {
    float *z = NULL, *g = NULL;
    int rc = be->ops->alloc(be, (size_t)kv->max_rows * d * sizeof(float), (void **)&z);
    if (rc == OT_OK) rc = be->ops->alloc(be, (size_t)kv->max_rows * d * sizeof(float), (void **)&g);
    if (rc) {
      if (z) be->ops->free(be, z);
      return rc;
    }
    if (kv->bn_z) be->ops->free(be, kv->bn_z);
    if (kv->bn_g) be->ops->free(be, kv->bn_g);
    kv->bn_z = z;
    kv->bn_g = g;
    kv->dcap = d;
  }
  return OT_OK;
}

/* Segments must tile rows 0..N in order, with adapters that fit the reserved scratch. */
static int check_segments(const ot_model *m, const ot_model_kv *kv, const ot_model_segment *sg, int ns,
                          int N) {
  int row = 0;
  for (int s = 0; s < ns; s++) {
    if (sg[s].row0 != row || sg[s].n < 1)
      return ot_error(OT_ERR_INVALID, "segment %d does not continue the rows at %d", s, row);
    row += sg[s].n;
    for (int l = 0; sg[s].blk && l < m->cfg.n_layer; l++) {
      const ot_block_over *b = &sg[s].blk[l];
      if ((b->lora_sites && b->lora_r > kv->rcap && !m->be->ops->lora_sgmv_fwd) || b->bn_dim > kv->dcap)
        return ot_error(OT_ERR_INVALID, "segment %d: adapter larger than the reserved scratch", s);
      if (b->lora_sites & ~ot_arch_sites(m->cfg.arch))
        return ot_error(OT_ERR_INVALID, "segment %d: LoRA on a site the model lacks", s);
    }
  }
  if (row != N) return ot_error(OT_ERR_INVALID, "segments cover %d of %d rows", row, N);
  return OT_OK;
}

int ot_model_decode(ot_model *m, ot_model_kv *kv, const int32_t *tokens, const int32_t *pos,
                    const int32_t *slot, int N, const ot_model_segment *sg, int ns, const int *last_rows,
                    int S, float *logits) {
  if (!m || !kv || kv->m != m || !tokens || !pos || !slot || (S && (!last_rows || !logits)))
    return ot_error(OT_ERR_INVALID, "ot_model_decode: bad arguments");
  if (N < 1 || N > kv->max_rows || S < 0 || S > kv->max_last || ns < 1 || ns > kv->sg_cap)
    return ot_error(OT_ERR_RANGE, "decode step of %d rows, %d logits, %d segments exceeds the workspace", N,
                    S, ns);
  int V = m->cfg.vocab_size, C = m->cfg.n_embd;
  for (int i = 0; i < N; i++)
    if (tokens[i] < 0 || tokens[i] >= V || pos[i] < 0 || pos[i] >= kv->T_max || slot[i] < 0 ||
        slot[i] >= kv->n_slots || pos[i] / kv->block_size >= kv->n_held[slot[i]])
      return ot_error(OT_ERR_RANGE,
                      "row %d: token %d at position %d of slot %d is outside the model or the slot's KV "
                      "blocks",
                      i, tokens[i], pos[i], slot[i]);
  for (int i = 0; i < S; i++)
    if (last_rows[i] < 0 || last_rows[i] >= N)
      return ot_error(OT_ERR_RANGE, "logits row %d outside the step", i);
  int rc = check_segments(m, kv, sg, ns, N);
  if (rc) return rc;
  ot_backend *be = m->be;
  const ot_backend_ops *o = be->ops;
  rc = o->upload(be, kv->d_tokens, tokens, (size_t)N * sizeof(int32_t));
  if (rc == OT_OK) rc = o->upload(be, kv->d_pos, pos, (size_t)N * sizeof(int32_t));
  if (rc == OT_OK) rc = o->upload(be, kv->d_slot, slot, (size_t)N * sizeof(int32_t));
  if (rc == OT_OK && kv->table_dirty)
    rc = o->upload(be, kv->d_table, kv->h_table, (size_t)kv->n_slots * kv->max_blocks * sizeof(int32_t));
  if (rc) return rc;
  kv->table_dirty = 0;
  float *x = kv->a.residual3; /* the residual stream: each block reads it before rewriting it */
  o->embed_fwd(be, x, kv->d_tokens, kv->d_pos, GP(m, OT_G_TOK), GP(m, OT_G_POS), N, C);
  fwd_ctx c = {.N = N,
               .a = &kv->a,
               .proj = kv->proj,
               .bn_up = kv->bn_up,
               .pos = kv->d_pos,
               .kv = kv,
               .sg = sg,
               .ns = ns};
  for (int l = 0; l < m->cfg.n_layer; l++) block_fwd(m, &c, l, x);
  if (S == 0) return o->sync(be);
  for (int i = 0; i < S && rc == OT_OK; i++)
    rc = o->copy(be, kv->last + (size_t)i * C, x + (size_t)last_rows[i] * C, (size_t)C * sizeof(float));
  if (rc) return rc;
  norm_rows(m, kv->lastn, NULL, NULL, kv->last, GP(m, OT_G_NORM), GP(m, OT_G_NORM_B), S);
  o->matmul_fwd(be, kv->logits, kv->lastn, GP(m, OT_G_HEAD), NULL, S, C, V, OT_W_OUT_IN);
  return o->download(be, logits, kv->logits, (size_t)S * V * sizeof(float));
}

/* ---- extensions ------------------------------------------------------------------ */

static const char *bn_names[2] = {"adapter_attn", "adapter_mlp"};
static const char *bn_parts[4] = {"down.weight", "down.bias", "up.weight", "up.bias"};

static const ot_block_ext no_ext = {0};

const ot_block_ext *ot_model_block_ext(const ot_model *m, int layer) {
  if (!m->ext || layer < 0 || layer >= m->cfg.n_layer) return &no_ext;
  return &m->ext[layer];
}

void ot_model_set_step(ot_model *m, uint64_t step) { m->step = step; }
void ot_model_set_dropout(ot_model *m, int on) { m->dropout_on = on; }

static int ext_check(const ot_model *m, const ot_block_ext *ext) {
  unsigned sites = ot_arch_sites(m->cfg.arch);
  for (int l = 0; l < m->cfg.n_layer; l++) {
    const ot_block_ext *e = &ext[l];
    if (e->lora_sites & ~sites) {
      int s = __builtin_ctz(e->lora_sites & ~sites);
      const char *name = ot_arch_get(OT_ARCH_GPT2)->site_modules[s]
                             ? ot_arch_get(OT_ARCH_GPT2)->site_modules[s]
                             : ot_arch_get(OT_ARCH_LLAMA)->site_modules[s];
      return ot_error(OT_ERR_UNSUPPORTED, "block %d: a %s model has no LoRA site '%s'", l,
                      ot_arch_name(m->cfg.arch), name);
    }
    if (e->lora_sites && (e->lora_r < 1 || !(e->lora_alpha > 0.0f) || !isfinite(e->lora_alpha) ||
                          !(e->lora_dropout >= 0.0f && e->lora_dropout < 1.0f)))
      return ot_error(OT_ERR_INVALID, "block %d: LoRA needs r >= 1, alpha > 0 and dropout in [0, 1)", l);
    if (e->bottleneck < 0) return ot_error(OT_ERR_INVALID, "block %d: negative bottleneck size", l);
  }
  return OT_OK;
}

int ot_model_add_extensions(ot_model *m, const ot_block_ext *ext, uint64_t seed) {
  if (m->ext) return ot_error(OT_ERR_INVALID, "the model already has extensions");
  int rc = ext_check(m, ext);
  if (rc) return rc;
  if (!m->be->ops->lora_fwd || !m->be->ops->lora_bwd)
    return ot_error(OT_ERR_UNSUPPORTED, "the %s backend has no LoRA ops yet", m->be->ops->name);
  int L = m->cfg.n_layer, C = m->cfg.n_embd, n_new = 0;
  for (int l = 0; l < L; l++)
    n_new += 2 * __builtin_popcount(ext[l].lora_sites) + (ext[l].bottleneck ? 8 : 0);
  ot_param *params = calloc((size_t)(m->n_params + n_new), sizeof *params);
  ot_block_ext *e = calloc((size_t)L, sizeof *e);
  ot_ext_idx *ix = calloc((size_t)L, sizeof *ix);
  if (!params || !e || !ix) {
    free(params);
    free(e);
    free(ix);
    return ot_error(OT_ERR_NOMEM, "cannot allocate the extension table");
  }
  free_acts(m);
  free_grads(m);
  memcpy(params, m->params, (size_t)m->n_params * sizeof *params);
  memcpy(e, ext, (size_t)L * sizeof *e);
  int n = m->n_params;
  const char *pre = m->ai->block_prefix;
  for (int l = 0; l < L; l++) {
    memset(&ix[l], 0xff, sizeof ix[l]); /* -1 */
    char name[96];
    for (int s = 0; s < OT_SITE_COUNT; s++) {
      const char *mod = m->ai->site_modules[s]; /* present: ext_check */
      if (!((e[l].lora_sites >> s) & 1) || !mod) continue;
      int in, out;
      ot_model_site_dims(m, s, &in, &out);
      snprintf(name, sizeof name, "%s%d.%s.lora_A.weight", pre, l, mod);
      set_param(&params[n], name, e[l].lora_r, in);
      ix[l].lora[s][0] = n++;
      snprintf(name, sizeof name, "%s%d.%s.lora_B.weight", pre, l, mod);
      set_param(&params[n], name, out, e[l].lora_r);
      ix[l].lora[s][1] = n++;
    }
    int d = e[l].bottleneck;
    for (int k = 0; d && k < 2; k++) {
      const int dims[4][2] = {{C, d}, {d, 0}, {d, C}, {C, 0}};
      for (int j = 0; j < 4; j++) {
        snprintf(name, sizeof name, "%s%d.%s.%s", pre, l, bn_names[k], bn_parts[j]);
        set_param(&params[n], name, dims[j][0], dims[j][1]);
        ix[l].bn[k][j] = n++;
      }
    }
  }
  size_t total = 0;
  for (int i = m->n_params; i < n; i++) total += params[i].numel;
  float *mem = NULL, *host = malloc((total ? total : 1) * sizeof(float));
  rc = host ? OT_OK : ot_error(OT_ERR_NOMEM, "cannot allocate the extension init buffer");
  if (rc == OT_OK && total) rc = m->be->ops->alloc(m->be, total * sizeof(float), (void **)&mem);
  /* PEFT init: A kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0; bottleneck
   * down N(0, 0.02), up and biases 0, so the model starts as it was */
  uint64_t st = seed ^ 0x5EEDADA97E55ull;
  float *h = host;
  for (int i = m->n_params; i < n && rc == OT_OK; i++) {
    ot_param *p = &params[i];
    size_t len = strlen(p->name);
    int is_a = strstr(p->name, ".lora_A.") != NULL,
        is_down = len > 12 && !strcmp(p->name + len - 12, ".down.weight");
    if (is_a) {
      double bound = 1.0 / sqrt((double)p->shape[1]);
      for (size_t j = 0; j < p->numel; j++) h[j] = (float)((2.0 * ot_rng_open01(&st) - 1.0) * bound);
    } else if (is_down) {
      ot_rng_fill_normal(&st, 0.02, h, p->numel);
    } else {
      memset(h, 0, p->numel * sizeof(float));
    }
    p->data = mem + (h - host);
    h += p->numel;
  }
  if (rc == OT_OK && total) rc = m->be->ops->upload(m->be, mem, host, total * sizeof(float));
  free(host);
  if (rc) {
    if (mem) m->be->ops->free(m->be, mem);
    free(params);
    free(e);
    free(ix);
    return rc;
  }
  free(m->params);
  m->params = params;
  m->n_params = n;
  m->ext = e;
  m->eidx = ix;
  m->ext_mem = mem;
  m->ext_scalars = total;
  m->drop_seed = seed;
  return OT_OK;
}

int ot_model_merge_lora(ot_model *m) {
  if (m->lowp_mem) return need_fp32(m, "merging");
  if (!m->ext) return OT_OK;
  int L = m->cfg.n_layer;
  for (int l = 0; l < L; l++)
    if (m->ext[l].bottleneck) return ot_error(OT_ERR_UNSUPPORTED, "bottleneck adapters cannot be merged");
  ot_backend *be = m->be;
  int rc = OT_OK;
  for (int l = 0; l < L && rc == OT_OK; l++) {
    for (int s = 0; s < OT_SITE_COUNT && rc == OT_OK; s++) {
      if (!has_lora(m, l, s)) continue;
      ot_param *W = &m->params[m->bidx[l][ot_site_weight_role(s)]];
      ot_param *A = &m->params[m->eidx[l].lora[s][0]], *Bp = &m->params[m->eidx[l].lora[s][1]];
      int in, out, r = m->ext[l].lora_r;
      ot_model_site_dims(m, s, &in, &out);
      double scale = ot_block_ext_scale(&m->ext[l]);
      float *w = malloc(W->numel * sizeof(float)), *a = malloc(A->numel * sizeof(float)),
            *b = malloc(Bp->numel * sizeof(float));
      rc = w && a && b ? OT_OK : ot_error(OT_ERR_NOMEM, "cannot allocate merge buffers");
      if (rc == OT_OK) rc = be->ops->download(be, w, W->data, W->numel * sizeof(float));
      if (rc == OT_OK) rc = be->ops->download(be, a, A->data, A->numel * sizeof(float));
      if (rc == OT_OK) rc = be->ops->download(be, b, Bp->data, Bp->numel * sizeof(float));
      /* W += scale (B A) in W's layout ([in, out] holds its transpose), the product in double */
      for (int i = 0; rc == OT_OK && i < in; i++)
        for (int o = 0; o < out; o++) {
          double acc = 0.0;
          for (int k = 0; k < r; k++) acc += (double)b[(size_t)o * r + k] * a[(size_t)k * in + i];
          size_t at = m->layout == OT_W_IN_OUT ? (size_t)i * out + o : (size_t)o * in + i;
          w[at] = (float)(w[at] + scale * acc);
        }
      if (rc == OT_OK) rc = be->ops->upload(be, W->data, w, W->numel * sizeof(float));
      free(w);
      free(a);
      free(b);
    }
  }
  if (rc) return rc;
  free_acts(m);
  free_grads(m);
  if (m->ext_mem) be->ops->free(be, m->ext_mem);
  m->ext_mem = NULL;
  m->ext_scalars = 0;
  m->n_params = m->n_base;
  free(m->ext);
  free(m->eidx);
  m->ext = NULL;
  m->eidx = NULL;
  return be->ops->sync(be);
}
