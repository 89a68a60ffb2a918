/* Model configuration: the architecture and its sizes, read from and written to a Hugging
 * Face config.json. One struct for every architecture; fields an architecture does not use
 * stay zero. Positional initialisers ({L, NH, C, V, P, eps}) give a GPT-2 config: the
 * fields after them default (0 = GPT-2, n_kv_head = n_head, n_ff = 4 C, head_dim = C / NH)
 * and ot_model_config_complete fills them in. */
#ifndef OT_MODEL_CONFIG_H
#define OT_MODEL_CONFIG_H

#include <stddef.h>

typedef enum {
  OT_ARCH_GPT2 = 0,    /* pre-LayerNorm, fused c_attn, GELU MLP, learned positions, tied head */
  OT_ARCH_LLAMA = 1,   /* RMSNorm, RoPE, SwiGLU, grouped-query attention: llama, mistral */
  OT_ARCH_QWEN2 = 2,   /* LLaMA with q/k/v biases */
  OT_ARCH_MISTRAL = 3, /* LLaMA without a sliding window shorter than the context */
  OT_ARCH_COUNT
} ot_arch;

typedef struct {
  int n_layer;
  int n_head;
  int n_embd;
  int vocab_size;
  int n_positions;          /* context length (n_positions / max_position_embeddings) */
  float layer_norm_epsilon; /* the norm's epsilon (layer_norm_epsilon / rms_norm_eps) */
  ot_arch arch;
  int n_kv_head;      /* key/value heads (grouped-query attention); n_head when equal */
  int head_dim;       /* q/k/v width per head; n_embd / n_head unless the config says */
  int n_ff;           /* MLP hidden width */
  int tie_embeddings; /* LM head = token embedding (always for GPT-2) */
  int attn_bias;      /* q, k, v projections have biases (Qwen2; LLaMA attention_bias) */
  int o_bias;         /* o_proj has a bias (LLaMA attention_bias) */
  float rope_theta;
  /* rope_scaling {"rope_type": "llama3", ...}; factor 0 = none */
  float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
  int rope_original_ctx;
} ot_model_config;

/* "gpt2", "llama", "qwen2", "mistral" */
const char *ot_arch_name(ot_arch a);

/* "gpt2", "llama", "qwen2", "mistral" -> arch (OT_ERR_INVALID naming the choices otherwise). */
int ot_arch_parse(const char *name, ot_arch *out);
/* Fills the fields a short (GPT-2 style) initialiser leaves zero, then validates; for the LLaMA
 * family n_kv_head = n_head, n_ff = 8/3 n_embd rounded up to 16, rope_theta 10000. */
int ot_model_config_complete(ot_model_config *cfg);

/* Parses config.json text. GPT-2 (n_ctx, n_inner null, gelu_new) and the LLaMA family
 * (model_type llama, mistral, qwen2: hidden_size, num_key_value_heads, rope_theta,
 * rope_scaling "llama3", attention_bias, tie_word_embeddings). Anything that would change
 * the maths and is not implemented is refused by name (other activations, sliding windows
 * shorter than the context, other rope scalings, MLP biases, dropout). */
int ot_model_config_parse(const char *json, size_t len, ot_model_config *out);
int ot_model_config_load(const char *path, ot_model_config *out);
/* Writes a config.json that Hugging Face transformers loads as the same model
 * (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM). */
int ot_model_config_save(const char *path, const ot_model_config *cfg);
/* 1 when two configs describe the same model (compared as completed). */
int ot_model_config_equal(const ot_model_config *a, const ot_model_config *b);
/* Checks ranges and divisibility (of the config as ot_model_config_complete would fill it). */
int ot_model_config_validate(const ot_model_config *cfg);

#endif
