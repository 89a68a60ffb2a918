/* GPT-2 model configuration, read from and written to Hugging Face config.json. */
#ifndef OT_CONFIG_H
#define OT_CONFIG_H

#include <stddef.h>

typedef struct {
  int n_layer;
  int n_head;
  int n_embd;
  int vocab_size;
  int n_positions;
  float layer_norm_epsilon;
} ot_model_config;

/* Parses config.json text. Accepts real GPT-2 configs (n_ctx, n_inner null,
 * activation_function gelu_new); refuses values it cannot run with a clear error
 * (n_embd not divisible by n_head, n_inner other than 4*n_embd, other activations,
 * non-positive or absurd sizes). */
int ot_model_config_parse(const char *json, size_t len, ot_model_config *out);
int ot_model_config_load(const char *path, ot_model_config *out);
/* Writes a config.json that Hugging Face transformers loads as GPT2LMHeadModel. */
int ot_model_config_save(const char *path, const ot_model_config *cfg);
/* Checks ranges and divisibility; used by parse and by programmatic configs. */
int ot_model_config_validate(const ot_model_config *cfg);

#endif
