/* One interface for every adapter kind, so the cloud and device code do not care which:
 * - offsite: the emulator's whole bottom and top blocks (ot_offsite_save/apply);
 * - lora: LoRA on the adapter blocks' linear layers, written in Hugging Face PEFT layout
 *   (adapter_config.json with PEFT's keys + offtune's, adapter_model.safetensors keys
 *   base_model.model.{block prefix}{i}.{module}.lora_A.weight [r, in], lora_B [out, r]);
 * - bottleneck: Houlsby adapters after both output projections of the adapter blocks;
 * - bitfit: only the biases (LayerNorm biases too) of the adapter blocks train (refused for an
 *   architecture without biases).
 * Every file carries format_version 1, base_model_digest and adapter_digest (BLAKE2b-256 of
 * the safetensors file) and the full-model block indices (layers_to_transform); applying
 * refuses another base, a tampered file, tensors that do not fit, and changes nothing then. */
#ifndef OT_ADAPTER_H
#define OT_ADAPTER_H

#include <stdint.h>

#include "ot_emulator.h"

typedef enum {
  OT_ADAPTER_OFFSITE = 0,
  OT_ADAPTER_LORA,
  OT_ADAPTER_BOTTLENECK,
  OT_ADAPTER_BITFIT
} ot_adapter_kind;

typedef struct {
  ot_adapter_kind kind;
  int lora_r;
  float lora_alpha, lora_dropout;
  unsigned lora_sites; /* bits OT_SITE_* of ot_model.h; OT_SITES_ALL = every site the model has */
  int bottleneck_dim;
  uint64_t seed; /* initialisation and dropout masks */
} ot_adapter_config;

/* offsite; LoRA r 8, alpha 16, dropout 0.05 on every linear layer; bottleneck 16. */
void ot_adapter_config_default(ot_adapter_config *c);
int ot_adapter_parse_kind(const char *name, ot_adapter_kind *out);
const char *ot_adapter_kind_name(ot_adapter_kind k);

/* Adds the adapter's tensors to the emulator's adapter blocks (LoRA, bottleneck) and makes
 * exactly the adapter's tensors trainable. Before ot_model_prepare and the optimizer. */
int ot_adapter_attach(ot_model *emu, const ot_emu_plan *p, const ot_adapter_config *c);
/* Writes the adapter of an emulator it was attached to (c NULL: offsite) under full-model
 * block indices. */
int ot_adapter_save(ot_model *emu, const ot_emu_plan *p, const ot_adapter_config *c, const char *dir);
/* Plugs an adapter of any kind into m: the full model (plan NULL, base_digest = digest of its
 * model.safetensors) or an emulator (plan given). LoRA and bottleneck tensors attach to the
 * blocks with the same full-model indices (m must have no other extensions). On error m is
 * unchanged. */
int ot_adapter_apply(ot_model *m, const ot_emu_plan *plan, const char *base_digest, const char *dir);
/* Kind of the adapter in dir (from adapter_config.json, unverified). */
int ot_adapter_read_kind(const char *dir, ot_adapter_kind *out);
/* Applies a LoRA adapter to the full model and folds it into the base weights, leaving a
 * plain model (ot_model_save_dir writes a normal checkpoint). */
int ot_adapter_merge(ot_model *m, const char *base_digest, const char *dir);

#endif
