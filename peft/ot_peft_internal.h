/* Shared by the files of peft/ (not a public interface). */
#ifndef OT_PEFT_INTERNAL_H
#define OT_PEFT_INTERNAL_H

#include "ot_peft.h"

#define OT_PEFT_CONFIG_FILE "adapter_config.json" /* PEFT's (LoRA) */
#define OT_PEFT_META_FILE "offtune_adapter.json"  /* offtune's fields */
#define OT_PEFT_TENSOR_FILE "adapter_model.safetensors"
#define OT_PEFT_KEY_PREFIX "base_model.model." /* PeftModel's prefix of LoRA keys */
#define OT_PEFT_FORMAT 2
#define OT_PEFT_VERSION "0.14.0" /* the PEFT release whose adapter_config.json keys are written */

struct ot_peft_adapter {
  ot_peft_config c; /* lora_sites: the actual sites, never OT_SITES_ALL */
  ot_arch arch;
  int blocks[OT_PEFT_MAX_LAYERS], n_blocks; /* full-model indices */
  char base_digest[OT_DIGEST_HEX];
  char base_name[128];
  int n;
  ot_peft_tensor *t;
  float *mem;
};

/* An expected tensor and its name in the file. */
typedef struct {
  ot_peft_tensor t; /* data NULL */
  char file[192];
} ot_peft_want;

/* The tensors an adapter of config c has on the given full-model blocks. */
int ot_peft_want_list(const ot_model_config *cfg, const ot_peft_config *c, const int *blocks, int n,
                      ot_peft_want **out, int *count);
/* a->t and a->mem for the wanted tensors (data uninitialised). */
int ot_peft_adapter_alloc(ot_peft_adapter *a, const ot_peft_want *w, int n);
void ot_peft_adapter_free_tensors(ot_peft_adapter *a);
/* Writes an adapter directory (format 2) from a's tensors named as in w. */
int ot_peft_write(const ot_peft_adapter *a, const ot_peft_want *w, const char *dir);
/* LoRA settings of a PEFT adapter_config.json for architecture cfg->arch: every key PEFT may
 * write is known; those that change the maths are honoured or refused by name. Fills c's LoRA
 * fields and, when the file lists them, blocks (n_blocks -1 when layers_to_transform is null). */
int ot_peft_parse_lora_config(const cJSON *j, const ot_model_config *cfg, ot_peft_config *c, int *blocks,
                              int *n_blocks);

#endif
