/* The architecture-neutral model, llm.c style: plain structs, one allocation for parameters,
 * one for gradients (trainable tensors only), one for activations, forward and backward side
 * by side, every op through a backend. An architecture is a table of tensor roles and names
 * (model/ot_arch.c) plus the choices the one block code makes from the config: LayerNorm or
 * RMSNorm, a fused or separate q/k/v projection, learned positions or rotary embeddings,
 * a GELU or SwiGLU MLP. The same block code trains, evaluates, distils and serves.
 *
 * Parameters are named and shaped as in Hugging Face checkpoints of the architecture
 * (GPT-2: transformer.h.{i}.attn.c_attn.weight, Conv1D [in, out]; LLaMA family:
 * model.layers.{i}.self_attn.q_proj.weight, nn.Linear [out, in]). */
#ifndef OT_MODEL_H
#define OT_MODEL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "ot_backend.h"
#include "ot_digest.h"
#include "ot_model_config.h"
#include "ot_tokenizer.h"

/* Roles of a block's tensors; an architecture has a subset (ot_model_block_param_index
 * returns -1 for the others). GPT-2's c_attn is OT_R_QKV, attn.c_proj OT_R_O, mlp.c_fc
 * OT_R_UP and mlp.c_proj OT_R_DOWN. */
enum {
  OT_R_ATTN_NORM,
  OT_R_ATTN_NORM_B,
  OT_R_QKV,
  OT_R_QKV_B,
  OT_R_Q,
  OT_R_Q_B,
  OT_R_K,
  OT_R_K_B,
  OT_R_V,
  OT_R_V_B,
  OT_R_O,
  OT_R_O_B,
  OT_R_FFN_NORM,
  OT_R_FFN_NORM_B,
  OT_R_GATE,
  OT_R_UP,
  OT_R_UP_B,
  OT_R_DOWN,
  OT_R_DOWN_B,
  OT_R_COUNT
};

/* The linear maps of a block, where LoRA attaches. GPT-2 has QKV, O, UP, DOWN (bits 0-3,
 * as before the model layer); the LLaMA family Q, K, V, O, GATE, UP, DOWN. */
enum {
  OT_SITE_QKV = 0,
  OT_SITE_O = 1,
  OT_SITE_UP = 2,
  OT_SITE_DOWN = 3,
  OT_SITE_Q = 4,
  OT_SITE_K = 5,
  OT_SITE_V = 6,
  OT_SITE_GATE = 7,
  OT_SITE_COUNT
};
#define OT_SITES_ALL ((1u << OT_SITE_COUNT) - 1)

/* Static description of an architecture: which roles exist and their names. */
typedef struct {
  const char *block_prefix;                /* "transformer.h." / "model.layers." */
  const char *role_names[OT_R_COUNT];      /* suffix after "{prefix}{i}.", NULL = absent */
  const char *site_modules[OT_SITE_COUNT]; /* PEFT module path of each site, NULL = absent */
} ot_arch_info;
const ot_arch_info *ot_arch_get(ot_arch a);
/* Sites the architecture has (bits OT_SITE_*). */
unsigned ot_arch_sites(ot_arch a);
/* Role of the weight (and bias, -1 if none) of a site. */
int ot_site_weight_role(int site);
int ot_site_bias_role(int site);
/* Parses a comma-separated list of module names of any architecture ("c_attn,attn.c_proj",
 * "q_proj,v_proj", "all") into OT_SITE_* bits; "all" gives OT_SITES_ALL. */
int ot_lora_parse_targets(const char *list, unsigned *out);
/* The reverse: "all" or the sites' module names, comma-separated (parses back to the same bits). */
int ot_lora_format_targets(unsigned sites, char *buf, size_t n);
/* Shapes from a config alone: a LoRA site's in and out widths (0 when the architecture lacks
 * it), and a block tensor's shape in the architecture's layout (d1 0 for vectors); the latter
 * returns 0 when the model has no tensor of that role. d0, d1 may be NULL. */
void ot_arch_site_dims(const ot_model_config *cfg, int site, int *in, int *out);
int ot_arch_role_shape(const ot_model_config *cfg, int role, int *d0, int *d1);
/* Splits "{block_prefix}{i}.{rest}" of any architecture into i and rest; 0 if not a block
 * tensor (rest points into name). */
int ot_block_tensor_split(const char *name, int *layer, const char **rest);

typedef struct {
  char name[96]; /* Hugging Face name, e.g. "transformer.h.3.mlp.c_fc.weight" */
  int ndim;
  int shape[2];
  size_t numel;
  float *data; /* backend memory */
  float *grad; /* backend memory, NULL when frozen or not training */
  int trainable;
  int decay; /* weight decay applies (2-D weights; not biases, norms, positions) */
} ot_param;

typedef struct ot_model ot_model;

/* Creates a model with parameters allocated (contents undefined). */
int ot_model_create(const ot_model_config *cfg, ot_backend *be, ot_model **out);
void ot_model_free(ot_model *m);

/* Initialisation as Hugging Face does it: N(0, 0.02) weights (GPT-2 scales its residual
 * projections by 1/sqrt(2 L)), zero biases, unit norm gains. Deterministic for a seed. */
int ot_model_init_random(ot_model *m, uint64_t seed);

/* Loads a Hugging Face directory: config.json + model.safetensors, or the shards listed in
 * model.safetensors.index.json; F32/F16/BF16. GPT-2 names load with or without the
 * "transformer." prefix; attention mask buffers, rotary inv_freq buffers and a tied
 * lm_head.weight are ignored. */
int ot_model_load_dir(const char *dir, ot_backend *be, ot_model **out);
/* A checkpoint directory's model and its tokenizer (NULL when the directory has none), checked
 * to fit each other; on the given backend. */
int ot_model_open_dir(const char *dir, ot_backend *be, ot_model **m, ot_tokenizer **tok);
/* BLAKE2b-256 hex digest of a checkpoint's weights, the identity adapters are bound to:
 * the digest of model.safetensors, or for a sharded checkpoint the digest of the index file's
 * digest followed by each shard's in the order the index names them. */
int ot_model_dir_digest(const char *dir, char digest[OT_DIGEST_HEX]);
/* Loads parameters from an open set of tensors into an existing model. */
int ot_model_load_safetensors(ot_model *m, const char *path);
/* Writes config.json + model.safetensors (F32, the architecture's full names), atomically. */
int ot_model_save_dir(const ot_model *m, const char *dir);
/* The same, with the 2-D weights of blocks whose int8_blocks[l] is set stored as I8 plus
 * one F32 scale per output column ("<name>.int8_scale"); loading dequantises them. */
int ot_model_save_dir_int8(const ot_model *m, const char *dir, const unsigned char *int8_blocks);

const ot_model_config *ot_model_cfg(const ot_model *m);
ot_backend *ot_model_backend(const ot_model *m);
size_t ot_model_num_params(const ot_model *m); /* scalar count */
int ot_model_param_count(const ot_model *m);   /* tensor count */
ot_param *ot_model_param(ot_model *m, int i);
ot_param *ot_model_find_param(ot_model *m, const char *name);
/* Index of a block parameter: i = layer, which = OT_R_*; -1 where the architecture has none. */
int ot_model_block_param_index(const ot_model *m, int layer, int which);
/* Tensors outside the blocks. OT_G_HEAD is the LM head: the token embedding when tied. */
enum { OT_G_TOK, OT_G_POS, OT_G_NORM, OT_G_NORM_B, OT_G_HEAD, OT_G_COUNT };
int ot_model_global_param_index(const ot_model *m, int which); /* -1 where absent */
/* Weight layout of the architecture's linear maps (Conv1D [in, out] or nn.Linear [out, in]). */
ot_wlayout ot_model_wlayout(const ot_model *m);
/* Input and output widths of a linear site (0 when the architecture lacks it). */
void ot_model_site_dims(const ot_model *m, int site, int *in, int *out);

/* Marks every tensor trainable (1) or frozen (0); then individual tensors can be
 * changed through ot_model_param(m, i)->trainable before ot_model_prepare. */
void ot_model_set_all_trainable(ot_model *m, int trainable);

/* Allocates activations for batches up to B x T (T <= n_positions); with training,
 * also keeps every layer's activations and allocates gradients for trainable tensors
 * only. Call again to change sizes or the trainable set. */
int ot_model_prepare(ot_model *m, int B, int T, int training);

/* Forward pass on inputs[B*T] (host memory). With targets (host, -1 = ignore), returns
 * the mean loss over non-ignored targets in *loss (NaN if none). B, T within prepare. */
int ot_model_forward(ot_model *m, const int32_t *inputs, const int32_t *targets, int B, int T, float *loss);
/* Full logits [B*T, V] (host memory) of a forward pass, for tests and tools. */
int ot_model_forward_logits(ot_model *m, const int32_t *inputs, int B, int T, float *logits_out);
/* Sum of per-token losses and the number of targets of the last forward (for eval). */
int ot_model_last_loss_sum(const ot_model *m, double *sum, size_t *count);
/* Logits of the last position of row b from the last forward (copied to host, V floats).
 * Only valid after a forward without targets. */
int ot_model_last_logits(ot_model *m, int b, float *logits_out);

/* Zeroes the gradients of trainable tensors. */
int ot_model_zero_grad(ot_model *m);
/* Backward pass of the last forward (which must have had targets); accumulates into
 * gradients of trainable tensors and stops at the lowest layer that needs gradients. */
int ot_model_backward(ot_model *m);

/* Hooks for losses on hidden states (distillation) and for adapters.
 *
 * Inference forward through blocks 0..layer only; copies that block's output residual
 * [B*T, C] into out (backend memory). Skips the rest of the model; leaves nothing for
 * backward or ot_model_last_logits. */
int ot_model_forward_to_block(ot_model *m, const int32_t *inputs, int B, int T, int layer, float *out);
/* Output residual [B*T, C] of a block after the last full forward of a model prepared
 * for training (backend memory, valid until the next forward or prepare). */
int ot_model_block_output(const ot_model *m, int layer, const float **out);
/* Registers dL/d(output of block layer) [B*T, C] (backend memory, must stay valid until
 * then) to be added to the residual-stream gradient when the next ot_model_backward passes
 * that block; backward clears all registrations. The loss of that extra term is the
 * caller's; backward still needs a forward with targets. */
int ot_model_set_block_grad(ot_model *m, int layer, const float *dout);
void ot_model_clear_block_grads(ot_model *m);

/* ---- per-block extensions (adapters) ---------------------------------------------
 *
 * LoRA (Hu et al. 2021, PEFT semantics) on any of a block's linear layers, and Houlsby
 * bottleneck adapters after the attention and MLP output projections. Their tensors are
 * ordinary ot_params appended to the table (a second allocation), so optimizers, snapshots
 * and gradient checks see them; checkpoints (load/save_dir) hold the base tensors only.
 *
 * LoRA site s of block i: {prefix}{i}.{module}.lora_A.weight [r, in] and .lora_B.weight
 * [out, r]; out += scale * drop(x) A^T B^T with scale alpha/r (alpha/sqrt(r) for rsLoRA),
 * dropout only in training forwards.
 * Bottleneck: {prefix}{i}.adapter_{attn,mlp}.{down,up}.{weight,bias}, down [C, m],
 * up [m, C] (Conv1D layout); h' = h + up(gelu(down(h))) on the projection output h. */

typedef struct {
  unsigned lora_sites; /* bit s = LoRA on site OT_SITE_s (sites the architecture has); 0 = none */
  int lora_r;
  float lora_alpha, lora_dropout;
  int bottleneck;  /* hidden size m of the two bottleneck adapters; 0 = none */
  int lora_rslora; /* rank-stabilised scale alpha/sqrt(r) (Kalajdzievski 2023, PEFT use_rslora) */
} ot_block_ext;

static inline float ot_block_ext_scale(const ot_block_ext *e) {
  return e->lora_rslora ? (float)(e->lora_alpha / sqrt((double)e->lora_r)) : e->lora_alpha / (float)e->lora_r;
}

/* Adds extensions to the blocks (ext has n_layer entries) once, before prepare and the
 * optimizer; initialises them as PEFT does (A ~ U(+-1/sqrt(in)), B = 0; bottleneck down
 * N(0, 0.02), up and biases 0: the model's function is unchanged). The new tensors are
 * trainable. seed also seeds the dropout masks. Drops any prepared activations. */
int ot_model_add_extensions(ot_model *m, const ot_block_ext *ext, uint64_t seed);
/* Extensions of a block (all zero when none). */
const ot_block_ext *ot_model_block_ext(const ot_model *m, int layer);
int ot_model_base_param_count(const ot_model *m); /* tensors before the extensions */
/* Folds every LoRA site into its base weight (W += scale B A in the weight's layout) and
 * removes all extensions; refuses bottleneck adapters (they are not linear). */
int ot_model_merge_lora(ot_model *m);
/* Training step number that seeds the dropout masks (set by ot_train before each step). */
void ot_model_set_step(ot_model *m, uint64_t step);
/* Dropout in training forwards on (default) or off (held-out evaluation during training). */
void ot_model_set_dropout(ot_model *m, int on);

/* ---- batched inference with a KV cache (serving) -----------------------------------
 *
 * The same block code as training, on N rows of many sequences at once: row i is token
 * tokens[i] at position pos[i] of cache slot slot[i]. Rows come grouped in segments, each with
 * its own weights (an adapter): norms and linear maps run once per run of consecutive segments
 * sharing weights (the frozen base: the whole batch), LoRA branches per segment (one SGMV call
 * when the backend has it), bottlenecks per segment.
 *
 * What an adapter changes in one block; NULL entries are the base model's tensors. */
typedef struct {
  const float *p[OT_R_COUNT]; /* replaced tensors (offsite blocks, BitFit biases) */
  unsigned lora_sites;
  int lora_r;
  float lora_scale;
  const float *lora_a[OT_SITE_COUNT];  /* A [r, in] */
  const float *lora_b[OT_SITE_COUNT];  /* B [out, r] */
  const float *lora_bt[OT_SITE_COUNT]; /* B transposed [r, out] (lora_sgmv_fwd reads rows) */
  int bn_dim;
  const float *bn[2][4]; /* attn / mlp: down.weight, down.bias, up.weight, up.bias */
} ot_block_over;

typedef struct {
  const ot_block_over *blk; /* [n_layer] or NULL for the base model */
  int row0, n;
} ot_model_segment;

typedef struct ot_model_kv ot_model_kv;

/* A KV cache of n_slots sequences of up to T_max positions and the workspace for steps of up
 * to max_rows rows and max_last logits rows (backend memory, one allocation per buffer). */
int ot_model_kv_create(ot_model *m, int n_slots, int T_max, int max_rows, int max_last, ot_model_kv **out);
void ot_model_kv_free(ot_model_kv *kv);
/* Grows the LoRA and bottleneck scratch to rank r and size d (adapters loaded later). */
int ot_model_kv_reserve(ot_model_kv *kv, int lora_r, int bn_dim);
/* Bytes of the KV cache proper (keys and values of every layer and slot). */
size_t ot_model_kv_cache_bytes(const ot_model_kv *kv);
/* One forward over N rows (host arrays tokens, pos, slot; segments cover the rows in order).
 * Every row's key and value are stored first, so rows of one sequence sent together (a
 * prefill) see each other causally. The logits of rows last_rows[0..S) go to logits [S, V]
 * (host). The model's parameters are read, never changed. */
int ot_model_decode(ot_model *m, ot_model_kv *kv, const int32_t *tokens, const int32_t *pos,
                    const int32_t *slot, int N, const ot_model_segment *sg, int ns, const int *last_rows,
                    int S, float *logits);

/* Bytes held by parameters, gradients and activations (for reports). */
size_t ot_model_memory_bytes(const ot_model *m);

#endif
