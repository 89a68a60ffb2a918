#include "ot_peft.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_json.h"
#include "ot_peft_internal.h"
#include "ot_safetensors.h"

static const char *kind_names[] = {"offsite", "lora", "bottleneck", "bitfit"};
/* BitFit trains the biases an architecture has, norm biases included, in this order */
static const int bias_roles[] = {OT_R_ATTN_NORM_B, OT_R_QKV_B,      OT_R_Q_B,  OT_R_K_B,   OT_R_V_B,
                                 OT_R_O_B,         OT_R_FFN_NORM_B, OT_R_UP_B, OT_R_DOWN_B};
#define N_BIAS ((int)(sizeof bias_roles / sizeof bias_roles[0]))
static const char *bn_sites[2] = {"attn", "mlp"};
static const char *bn_parts[4] = {"down.weight", "down.bias", "up.weight", "up.bias"};

const char *const ot_peft_files[] = {OT_PEFT_CONFIG_FILE, OT_PEFT_META_FILE, OT_PEFT_TENSOR_FILE, NULL};

int ot_peft_is_file_name(const char *name) {
  for (int i = 0; name && ot_peft_files[i]; i++)
    if (strcmp(name, ot_peft_files[i]) == 0) return 1;
  return 0;
}

void ot_peft_config_default(ot_peft_config *c) {
  *c = (ot_peft_config){OT_PEFT_OFFSITE, 8, 16.0f, 0.05f, OT_SITES_ALL, 16, 0, 0};
}

int ot_peft_parse_kind(const char *name, ot_peft_kind *out) {
  for (int k = 0; k < 4; k++)
    if (name && strcmp(name, kind_names[k]) == 0) {
      *out = (ot_peft_kind)k;
      return OT_OK;
    }
  return ot_error(OT_ERR_INVALID, "adapter kind '%s': expected offsite, lora, bottleneck or bitfit",
                  name ? name : "");
}

const char *ot_peft_kind_name(ot_peft_kind k) { return (unsigned)k < 4 ? kind_names[k] : "?"; }

float ot_peft_lora_scale(const ot_peft_config *c) {
  ot_block_ext e = {.lora_r = c->lora_r, .lora_alpha = c->lora_alpha, .lora_rslora = c->lora_rslora};
  return ot_block_ext_scale(&e);
}

int ot_peft_map_full(int n_layer, const char *base_digest, ot_peft_map *out) {
  if (n_layer < 1 || n_layer > OT_PEFT_MAX_LAYERS)
    return ot_error(OT_ERR_RANGE, "%d blocks: adapters cover models of 1..%d blocks", n_layer,
                    OT_PEFT_MAX_LAYERS);
  memset(out, 0, sizeof *out);
  out->n_layer = n_layer;
  for (int i = 0; i < n_layer; i++) {
    out->full[i] = i;
    out->adapter[i] = 1;
  }
  snprintf(out->base_digest, sizeof out->base_digest, "%s", base_digest ? base_digest : "");
  return OT_OK;
}

/* Block of m holding full-model block f; -1 if none. */
static int local_block(const ot_peft_map *map, int f) {
  for (int i = 0; i < map->n_layer; i++)
    if (map->full[i] == f) return i;
  return -1;
}

static int config_check(const ot_peft_config *c) {
  if ((unsigned)c->kind > OT_PEFT_BITFIT) return ot_error(OT_ERR_INVALID, "unknown adapter kind %d", c->kind);
  if (c->kind == OT_PEFT_LORA && (c->lora_r < 1 || !(c->lora_alpha > 0.0f) || !isfinite(c->lora_alpha) ||
                                  !(c->lora_dropout >= 0.0f && c->lora_dropout < 1.0f) || !c->lora_sites ||
                                  c->lora_sites >> OT_SITE_COUNT))
    return ot_error(OT_ERR_INVALID,
                    "LoRA needs r >= 1, alpha > 0, dropout in [0, 1) and at least one target");
  if (c->kind == OT_PEFT_BOTTLENECK && c->bottleneck_dim < 1)
    return ot_error(OT_ERR_INVALID, "bottleneck size %d must be >= 1", c->bottleneck_dim);
  return OT_OK;
}

/* LoRA sites of c on an architecture: "all" means the sites it has; naming one it lacks is
 * refused, not ignored. */
static int lora_sites_for(const ot_model_config *cfg, const ot_peft_config *c, unsigned *out) {
  unsigned have = ot_arch_sites(cfg->arch);
  if (c->lora_sites == OT_SITES_ALL) {
    *out = have;
    return OT_OK;
  }
  if (c->lora_sites & ~have)
    return ot_error(OT_ERR_UNSUPPORTED, "LoRA targets name a module a %s model does not have",
                    ot_arch_name(cfg->arch));
  *out = c->lora_sites;
  return OT_OK;
}

/* ---- the tensors of an adapter ------------------------------------------------------- */

int ot_peft_want_list(const ot_model_config *cfg, const ot_peft_config *c, const int *blocks, int n,
                      ot_peft_want **out, int *count) {
  unsigned sites = 0;
  int rc = c->kind == OT_PEFT_LORA ? lora_sites_for(cfg, c, &sites) : OT_OK;
  if (rc) return rc;
  ot_peft_want *w = calloc((size_t)n * (OT_R_COUNT + 2 * OT_SITE_COUNT) + 1, sizeof *w);
  if (!w) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  const ot_arch_info *ai = ot_arch_get(cfg->arch);
  int C = cfg->n_embd, k = 0;
  for (int b = 0; b < n; b++) {
    int f = blocks[b];
#define ADD(WHAT, INDEX, D0, D1, ...)                                                                        \
  do {                                                                                                       \
    ot_peft_want *w_ = &w[k++];                                                                              \
    w_->t.block = f;                                                                                         \
    w_->t.what = (WHAT);                                                                                     \
    w_->t.index = (INDEX);                                                                                   \
    w_->t.ndim = (D1) ? 2 : 1;                                                                               \
    w_->t.shape[0] = (D0);                                                                                   \
    w_->t.shape[1] = (D1);                                                                                   \
    w_->t.numel = (size_t)(D0) * ((D1) ? (D1) : 1);                                                          \
    snprintf(w_->file, sizeof w_->file, __VA_ARGS__);                                                        \
  } while (0)
    if (c->kind == OT_PEFT_OFFSITE || c->kind == OT_PEFT_BITFIT) {
      for (int r = 0; r < OT_R_COUNT; r++) {
        int d0, d1, bias = 0;
        for (int j = 0; j < N_BIAS; j++) bias |= bias_roles[j] == r;
        if ((c->kind == OT_PEFT_BITFIT && !bias) || !ot_arch_role_shape(cfg, r, &d0, &d1)) continue;
        ADD(OT_PEFT_T_BLOCK, r, d0, d1, "%s%d.%s", ai->block_prefix, f, ai->role_names[r]);
      }
    } else if (c->kind == OT_PEFT_LORA) {
      for (int s = 0; s < OT_SITE_COUNT; s++) {
        int in, outw;
        if (!((sites >> s) & 1)) continue;
        ot_arch_site_dims(cfg, s, &in, &outw);
        ADD(OT_PEFT_T_LORA_A, s, c->lora_r, in, OT_PEFT_KEY_PREFIX "%s%d.%s.lora_A.weight", ai->block_prefix,
            f, ai->site_modules[s]);
        ADD(OT_PEFT_T_LORA_B, s, outw, c->lora_r, OT_PEFT_KEY_PREFIX "%s%d.%s.lora_B.weight",
            ai->block_prefix, f, ai->site_modules[s]);
      }
    } else {
      int d = c->bottleneck_dim;
      const int sh[4][2] = {{C, d}, {d, 0}, {d, C}, {C, 0}};
      for (int s = 0; s < 2; s++)
        for (int j = 0; j < 4; j++)
          ADD(OT_PEFT_T_BN, s * 4 + j, sh[j][0], sh[j][1], "%s%d.adapter_%s.%s", ai->block_prefix, f,
              bn_sites[s], bn_parts[j]);
    }
#undef ADD
  }
  *out = w;
  *count = k;
  return OT_OK;
}

/* Name of tensor t in a model where its block is local block l (no PEFT key prefix). */
static void local_name(const ot_model_config *cfg, const ot_peft_tensor *t, int l, char *buf, size_t n) {
  const ot_arch_info *ai = ot_arch_get(cfg->arch);
  if (t->what == OT_PEFT_T_BLOCK)
    snprintf(buf, n, "%s%d.%s", ai->block_prefix, l, ai->role_names[t->index]);
  else if (t->what == OT_PEFT_T_BN)
    snprintf(buf, n, "%s%d.adapter_%s.%s", ai->block_prefix, l, bn_sites[t->index / 4],
             bn_parts[t->index % 4]);
  else
    snprintf(buf, n, "%s%d.%s.lora_%c.weight", ai->block_prefix, l, ai->site_modules[t->index],
             t->what == OT_PEFT_T_LORA_A ? 'A' : 'B');
}

/* The model tensor t goes to (block l of m); NULL if m has none of that name and size. */
static ot_param *model_tensor(ot_model *m, const ot_peft_tensor *t, int l) {
  ot_param *p = NULL;
  if (t->what == OT_PEFT_T_BLOCK) {
    int i = ot_model_block_param_index(m, l, t->index);
    p = i >= 0 ? ot_model_param(m, i) : NULL;
  } else {
    char nm[160];
    local_name(ot_model_cfg(m), t, l, nm, sizeof nm);
    p = ot_model_find_param(m, nm);
  }
  return p && p->numel == t->numel ? p : NULL;
}

void ot_peft_adapter_free_tensors(ot_peft_adapter *a) {
  free(a->t);
  free(a->mem);
  a->t = NULL;
  a->mem = NULL;
}

void ot_peft_free(ot_peft_adapter *a) {
  if (!a) return;
  ot_peft_adapter_free_tensors(a);
  free(a);
}

const ot_peft_config *ot_peft_adapter_config(const ot_peft_adapter *a) { return &a->c; }
int ot_peft_tensor_count(const ot_peft_adapter *a) { return a->n; }
const ot_peft_tensor *ot_peft_tensor_at(const ot_peft_adapter *a, int i) {
  return i >= 0 && i < a->n ? &a->t[i] : NULL;
}

int ot_peft_adapter_alloc(ot_peft_adapter *a, const ot_peft_want *w, int n) {
  size_t total = 0;
  for (int i = 0; i < n; i++) total += w[i].t.numel;
  a->t = calloc((size_t)n + 1, sizeof *a->t);
  a->mem = malloc((total ? total : 1) * sizeof(float));
  if (!a->t || !a->mem) {
    ot_peft_adapter_free_tensors(a);
    return ot_error(OT_ERR_NOMEM, "cannot allocate %zu adapter values", total);
  }
  float *h = a->mem;
  for (int i = 0; i < n; i++) {
    a->t[i] = w[i].t;
    a->t[i].data = h;
    h += w[i].t.numel;
  }
  a->n = n;
  return OT_OK;
}

/* ---- training -------------------------------------------------------------------------- */

static ot_block_ext block_ext(const ot_peft_config *c, unsigned sites) {
  ot_block_ext e = {0};
  if (c->kind == OT_PEFT_LORA)
    e = (ot_block_ext){.lora_sites = sites,
                       .lora_r = c->lora_r,
                       .lora_alpha = c->lora_alpha,
                       .lora_dropout = c->lora_dropout,
                       .lora_rslora = c->lora_rslora};
  if (c->kind == OT_PEFT_BOTTLENECK) e.bottleneck = c->bottleneck_dim;
  return e;
}

static int map_fits(const ot_model *m, const ot_peft_map *map) {
  if (!map || map->n_layer != ot_model_cfg(m)->n_layer)
    return ot_error(OT_ERR_MISMATCH, "the block map has %d blocks, the model %d", map ? map->n_layer : 0,
                    ot_model_cfg(m)->n_layer);
  return OT_OK;
}

/* The adapter blocks of the map, as full-model indices (ascending in the model's order). */
static int adapter_blocks(const ot_peft_map *map, int *full) {
  int n = 0;
  for (int i = 0; i < map->n_layer; i++)
    if (map->adapter[i]) full[n++] = map->full[i];
  return n;
}

int ot_peft_attach(ot_model *m, const ot_peft_map *map, const ot_peft_config *c) {
  int rc = config_check(c);
  if (rc == OT_OK) rc = map_fits(m, map);
  if (rc) return rc;
  const ot_model_config *cfg = ot_model_cfg(m);
  int blocks[OT_PEFT_MAX_LAYERS], n = adapter_blocks(map, blocks), nw = 0, L = cfg->n_layer;
  ot_peft_want *w = NULL;
  rc = ot_peft_want_list(cfg, c, blocks, n, &w, &nw);
  if (rc) return rc;
  if (c->kind == OT_PEFT_BITFIT && nw == 0)
    rc = ot_error(OT_ERR_UNSUPPORTED, "a %s model without biases has nothing for BitFit to train",
                  ot_arch_name(cfg->arch));
  unsigned sites = 0;
  if (rc == OT_OK && c->kind == OT_PEFT_LORA) rc = lora_sites_for(cfg, c, &sites);
  if (rc == OT_OK && (c->kind == OT_PEFT_LORA || c->kind == OT_PEFT_BOTTLENECK)) {
    ot_block_ext *ext = calloc((size_t)L, sizeof *ext);
    if (!ext) rc = ot_error(OT_ERR_NOMEM, "cannot allocate");
    for (int i = 0; ext && i < L; i++)
      if (map->adapter[i]) ext[i] = block_ext(c, sites);
    if (rc == OT_OK) rc = ot_model_add_extensions(m, ext, c->seed);
    free(ext);
  }
  if (rc == OT_OK) {
    ot_model_set_all_trainable(m, 0);
    for (int i = 0; i < nw && rc == OT_OK; i++) {
      ot_param *p = model_tensor(m, &w[i].t, local_block(map, w[i].t.block));
      if (!p) rc = ot_error(OT_ERR_INTERNAL, "%s: not in the model after attaching", w[i].file);
      if (p) p->trainable = 1;
    }
  }
  free(w);
  return rc;
}

int ot_peft_save(ot_model *m, const ot_peft_map *map, const ot_peft_config *cfg_in, const char *dir) {
  ot_peft_config c;
  ot_peft_config_default(&c);
  if (cfg_in) c = *cfg_in;
  int rc = config_check(&c);
  if (rc == OT_OK) rc = map_fits(m, map);
  if (rc) return rc;
  ot_peft_adapter a = {.c = c};
  a.n_blocks = adapter_blocks(map, a.blocks);
  snprintf(a.base_digest, sizeof a.base_digest, "%s", map->base_digest);
  snprintf(a.base_name, sizeof a.base_name, "%s", map->base_name);
  a.arch = ot_model_cfg(m)->arch;
  if (c.kind == OT_PEFT_LORA) rc = lora_sites_for(ot_model_cfg(m), &c, &a.c.lora_sites);
  ot_peft_want *w = NULL;
  int nw = 0;
  if (rc == OT_OK) rc = ot_peft_want_list(ot_model_cfg(m), &c, a.blocks, a.n_blocks, &w, &nw);
  if (rc == OT_OK) rc = ot_peft_adapter_alloc(&a, w, nw);
  ot_backend *be = ot_model_backend(m);
  for (int i = 0; i < a.n && rc == OT_OK; i++) {
    ot_param *p = model_tensor(m, &a.t[i], local_block(map, a.t[i].block));
    if (!p)
      rc = ot_error(OT_ERR_INVALID, "%s: the %s adapter is not attached to this model", w[i].file,
                    kind_names[c.kind]);
    else
      rc = be->ops->download(be, (float *)a.t[i].data, p->data, p->numel * sizeof(float));
  }
  if (rc == OT_OK) rc = ot_peft_write(&a, w, dir);
  ot_peft_adapter_free_tensors(&a);
  free(w);
  return rc;
}

/* ---- applying ---------------------------------------------------------------------------- */

static int ext_equal(const ot_block_ext *a, const ot_block_ext *b) {
  return a->lora_sites == b->lora_sites && a->bottleneck == b->bottleneck &&
         (!a->lora_sites ||
          (a->lora_r == b->lora_r && a->lora_alpha == b->lora_alpha && a->lora_rslora == b->lora_rslora));
}

int ot_peft_apply(ot_model *m, const ot_peft_map *map, const ot_peft_adapter *a) {
  int rc = map_fits(m, map);
  if (rc) return rc;
  const ot_model_config *cfg = ot_model_cfg(m);
  int L = cfg->n_layer;
  if (a->arch != cfg->arch)
    return ot_error(OT_ERR_MISMATCH, "a %s adapter does not fit a %s model", ot_arch_name(a->arch),
                    ot_arch_name(cfg->arch));
  for (int i = 0; i < a->n_blocks; i++)
    if (local_block(map, a->blocks[i]) < 0)
      return ot_error(OT_ERR_MISMATCH, "adapter block %d does not exist in this model", a->blocks[i]);
  /* LoRA and bottleneck tensors need their extensions: added here, or already the same */
  if (a->c.kind == OT_PEFT_LORA || a->c.kind == OT_PEFT_BOTTLENECK) {
    ot_block_ext *ext = calloc((size_t)L, sizeof *ext);
    if (!ext) return ot_error(OT_ERR_NOMEM, "cannot allocate");
    for (int i = 0; i < a->n_blocks; i++)
      ext[local_block(map, a->blocks[i])] = block_ext(&a->c, a->c.lora_sites);
    if (ot_model_param_count(m) > ot_model_base_param_count(m)) {
      for (int l = 0; l < L && rc == OT_OK; l++)
        if (!ext_equal(&ext[l], ot_model_block_ext(m, l)))
          rc = ot_error(OT_ERR_MISMATCH, "the model already carries other adapter tensors (block %d)", l);
    } else {
      rc = ot_model_add_extensions(m, ext, a->c.seed);
    }
    free(ext);
  }
  for (int i = 0; i < a->n && rc == OT_OK; i++)
    if (!model_tensor(m, &a->t[i], local_block(map, a->t[i].block)))
      rc =
          ot_error(OT_ERR_MISMATCH, "adapter tensor %d (block %d) does not fit this model", i, a->t[i].block);
  ot_backend *be = ot_model_backend(m);
  for (int i = 0; i < a->n && rc == OT_OK; i++) {
    ot_param *p = model_tensor(m, &a->t[i], local_block(map, a->t[i].block));
    rc = be->ops->upload(be, p->data, a->t[i].data, p->numel * sizeof(float));
  }
  if (rc == OT_OK) rc = be->ops->sync(be);
  return rc;
}

int ot_peft_apply_dir(ot_model *m, const ot_peft_map *map, const char *dir) {
  ot_peft_adapter *a = NULL;
  int rc = ot_peft_load(dir, ot_model_cfg(m), map->base_digest, &a);
  if (rc == OT_OK) rc = ot_peft_apply(m, map, a);
  ot_peft_free(a);
  return rc;
}

int ot_peft_apply_full(ot_model *m, const char *base_digest, const char *dir) {
  ot_peft_map map;
  int rc = ot_peft_map_full(ot_model_cfg(m)->n_layer, base_digest, &map);
  return rc ? rc : ot_peft_apply_dir(m, &map, dir);
}

int ot_peft_merge(ot_model *m, const char *base_digest, const char *dir) {
  ot_peft_map map;
  ot_peft_adapter *a = NULL;
  int rc = ot_peft_map_full(ot_model_cfg(m)->n_layer, base_digest, &map);
  if (rc == OT_OK) rc = ot_peft_load(dir, ot_model_cfg(m), base_digest, &a);
  if (rc == OT_OK && a->c.kind != OT_PEFT_LORA)
    rc = ot_error(OT_ERR_UNSUPPORTED, "%s: only LoRA adapters merge into the base weights (this one is %s)",
                  dir, kind_names[a->c.kind]);
  if (rc == OT_OK && ot_model_param_count(m) > ot_model_base_param_count(m))
    rc = ot_error(OT_ERR_INVALID, "merge needs a plain model without adapter tensors");
  if (rc == OT_OK) rc = ot_peft_apply(m, &map, a);
  ot_peft_free(a);
  return rc ? rc : ot_model_merge_lora(m);
}
