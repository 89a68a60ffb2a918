/* Every adapter kind in one place: attach (for training), save, load, apply, merge, import.
 *
 * Kinds:
 * - offsite: whole adapter blocks (Offsite-Tuning's bottom and top), under the full model's
 *   own tensor names;
 * - lora: LoRA on any linear site of the blocks (model/ hooks, OT_SITE_*), in Hugging Face
 *   PEFT layout: keys base_model.model.{block prefix}{i}.{module}.lora_A.weight [r, in] and
 *   lora_B.weight [out, r], scale alpha/r (alpha/sqrt(r) with use_rslora);
 * - bottleneck: Houlsby adapters after the attention and MLP output projections;
 * - bitfit: the biases the architecture has (norm biases too).
 *
 * An adapter directory holds adapter_model.safetensors (F32), offtune_adapter.json
 * (format_version 2: adapter_type, architecture, the full-model blocks it covers, bottleneck
 * size, base_model_digest and adapter_digest = BLAKE2b-256 of the safetensors file) and, for
 * LoRA only, PEFT's adapter_config.json with PEFT's keys alone, so Hugging Face PEFT loads it.
 * Format 1 (offtune's fields inside adapter_config.json) is still read.
 *
 * Block indices in files are the full model's; an ot_peft_map says where they sit in the
 * model at hand (the full model, or an emulator's adapter blocks). Loading verifies the base
 * digest, the file digest, every name and shape before anything is returned; applying changes
 * nothing on error. */
#ifndef OT_PEFT_H
#define OT_PEFT_H

#include <stddef.h>
#include <stdint.h>

#include "ot_digest.h"
#include "ot_model.h"

#define OT_PEFT_MAX_LAYERS 256

typedef enum { OT_PEFT_OFFSITE = 0, OT_PEFT_LORA, OT_PEFT_BOTTLENECK, OT_PEFT_BITFIT } ot_peft_kind;

typedef struct {
  ot_peft_kind kind;
  int lora_r;
  float lora_alpha, lora_dropout;
  unsigned lora_sites; /* bits OT_SITE_*; OT_SITES_ALL = every site the model has */
  int bottleneck_dim;
  uint64_t seed;   /* initialisation and dropout masks */
  int lora_rslora; /* scale alpha/sqrt(r) (PEFT use_rslora) */
} ot_peft_config;

/* offsite; LoRA r 8, alpha 16, dropout 0.05 on every linear layer; bottleneck 16. */
void ot_peft_config_default(ot_peft_config *c);
int ot_peft_parse_kind(const char *name, ot_peft_kind *out);
const char *ot_peft_kind_name(ot_peft_kind k);

/* Where adapter blocks sit in a model: block i of the model is full-model block full[i];
 * adapter[i] says whether it is one the adapter trains (attach, save). */
typedef struct {
  int n_layer;
  int full[OT_PEFT_MAX_LAYERS];
  unsigned char adapter[OT_PEFT_MAX_LAYERS];
  char base_digest[OT_DIGEST_HEX]; /* the full model's ot_model_dir_digest */
  char base_name[128];             /* PEFT's base_model_name_or_path; "" = unknown (null) */
} ot_peft_map;

/* The full model itself: block i is block i, every block may carry an adapter. */
int ot_peft_map_full(int n_layer, const char *base_digest, ot_peft_map *out);

/* ---- training --------------------------------------------------------------------- */

/* Adds the adapter's tensors to the adapter blocks (LoRA, bottleneck) and makes exactly the
 * adapter's tensors trainable. Before ot_model_prepare and the optimizer. */
int ot_peft_attach(ot_model *m, const ot_peft_map *map, const ot_peft_config *c);
/* Writes the adapter attached to m (c NULL: offsite) under full-model block indices. */
int ot_peft_save(ot_model *m, const ot_peft_map *map, const ot_peft_config *c, const char *dir);

/* ---- loading and applying ------------------------------------------------------------ */

/* One tensor of a loaded adapter. */
typedef enum { OT_PEFT_T_BLOCK = 0, OT_PEFT_T_LORA_A, OT_PEFT_T_LORA_B, OT_PEFT_T_BN } ot_peft_what;
typedef struct {
  int block; /* full-model block index */
  ot_peft_what what;
  int index; /* BLOCK: OT_R_* role; LORA_A/B: OT_SITE_*; BN: site (0 attn, 1 mlp) * 4 + part
              * (0 down.weight, 1 down.bias, 2 up.weight, 3 up.bias) */
  int ndim, shape[2];
  size_t numel;
  const float *data; /* host memory owned by the adapter */
} ot_peft_tensor;

typedef struct ot_peft_adapter ot_peft_adapter;

/* Kind of the adapter in dir (unverified). */
int ot_peft_read_kind(const char *dir, ot_peft_kind *out);
/* 1 if dir holds an adapter's metadata (offtune's, or PEFT's config of a foreign LoRA). */
int ot_peft_is_adapter_dir(const char *dir);
/* The files an adapter directory may hold (what travels to devices), NULL-terminated. */
extern const char *const ot_peft_files[];
int ot_peft_is_file_name(const char *name);

/* Reads and verifies the adapter in dir for a model of config cfg (the full model's config
 * or an emulator's: only the architecture and widths matter) whose base digest is given. */
int ot_peft_load(const char *dir, const ot_model_config *cfg, const char *base_digest, ot_peft_adapter **out);
void ot_peft_free(ot_peft_adapter *a);
const ot_peft_config *ot_peft_adapter_config(const ot_peft_adapter *a);
int ot_peft_tensor_count(const ot_peft_adapter *a);
const ot_peft_tensor *ot_peft_tensor_at(const ot_peft_adapter *a, int i);
/* Scale of the adapter's LoRA products (alpha/r, alpha/sqrt(r) for rsLoRA). */
float ot_peft_lora_scale(const ot_peft_config *c);

/* Plugs a loaded adapter into m at the map's blocks. LoRA and bottleneck tensors become m's
 * extensions (m must have none, or the same). On error m is unchanged. */
int ot_peft_apply(ot_model *m, const ot_peft_map *map, const ot_peft_adapter *a);
/* ot_peft_load + ot_peft_apply with m's config and the map's base digest. */
int ot_peft_apply_dir(ot_model *m, const ot_peft_map *map, const char *dir);
/* The same on the full model m (block i is block i). */
int ot_peft_apply_full(ot_model *m, const char *base_digest, const char *dir);
/* Applies a LoRA adapter to the full model m and folds it into the base weights, leaving a
 * plain model (ot_model_save_dir writes a normal checkpoint). */
int ot_peft_merge(ot_model *m, const char *base_digest, const char *dir);

/* Writes new_dir's metadata for the adapter_model.safetensors already there: prev_dir's
 * with the new file's digest (federated rounds produce new tensors for the same adapter). */
int ot_peft_reseal(const char *prev_dir, const char *new_dir);

/* ---- PEFT interoperability ------------------------------------------------------------- */

typedef struct {
  int r, n_blocks, n_tensors;
  float alpha;
  unsigned sites;
  int rslora;
} ot_peft_import_info;

/* Imports a LoRA saved by Hugging Face PEFT (adapter_config.json + adapter_model.safetensors,
 * F32/F16/BF16) for the model of config cfg whose checkpoint digest is base_digest: checks
 * every key PEFT may write (flags that change the maths are honoured or refused by name),
 * the tensors' names and shapes, and writes an offtune adapter bound to that base in out_dir. */
int ot_peft_import(const char *peft_dir, const ot_model_config *cfg, const char *base_digest,
                   const char *base_name, const char *out_dir, ot_peft_import_info *info);

#endif
