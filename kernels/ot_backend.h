/* Compute backends behind one interface (ggml-style): the model code calls ops
 * through an ot_backend and never touches device memory directly. The CPU
 * backend is the reference; every other backend is tested op by op against it.
 *
 * Conventions for every op:
 * - pointers are backend memory (host memory for the CPU backend);
 * - N = rows (B*T), C = channels; row-major everywhere;
 * - "dX +=" ops accumulate, "dX =" ops overwrite; a NULL gradient output means
 *   "not needed" (frozen parameter) and the work for it is skipped.
 * Ops do not fail once memory exists; asynchronous backends report errors at sync. */
#ifndef OT_BACKEND_H
#define OT_BACKEND_H

#include <stddef.h>
#include <stdint.h>

typedef struct ot_backend ot_backend;

/* Weight layout of a linear map y = x W + b: Hugging Face Conv1D stores W as
 * [in, out]; nn.Linear (tied LM head, LoRA A/B) stores it as [out, in]. */
typedef enum { OT_W_IN_OUT = 0, OT_W_OUT_IN = 1 } ot_wlayout;
/* Low-precision storage of a frozen weight: bf16, or int8 with one fp32 scale per output feature. */
typedef enum { OT_LOWP_BF16 = 0, OT_LOWP_INT8 = 1 } ot_lowp;

typedef struct {
  const char *name;
  int host_visible; /* backend memory is ordinary host memory (no staging copies needed) */
  void (*destroy)(ot_backend *be);
  /* memory */
  int (*alloc)(ot_backend *be, size_t bytes, void **out);
  void (*free)(ot_backend *be, void *p);
  int (*upload)(ot_backend *be, void *dst, const void *src, size_t bytes);
  int (*download)(ot_backend *be, void *dst, const void *src, size_t bytes);
  int (*copy)(ot_backend *be, void *dst, const void *src, size_t bytes); /* within the backend */
  int (*zero)(ot_backend *be, void *p, size_t bytes);
  int (*sync)(ot_backend *be);
  /* optional (NULL: a no-op): the bytes of an allocation will not be read again before it is
   * freed, so their memory may go back to the system now (a model shrinking in place) */
  void (*discard)(ot_backend *be, void *p, size_t bytes);

  /* out[N,C] = wte[tokens] + wpe[t]; wpe NULL: no positions (rotary architectures) */
  void (*encoder_fwd)(ot_backend *be, float *out, const int32_t *tokens, const float *wte, const float *wpe,
                      int B, int T, int C);
  /* dwte += scatter(dout), dwpe += sum over batch (either may be NULL) */
  void (*encoder_bwd)(ot_backend *be, float *dwte, float *dwpe, const float *dout, const int32_t *tokens,
                      int B, int T, int C);
  /* out = (inp - mean) * rstd * w + b; mean/rstd [N] saved for backward (may be NULL) */
  void (*layernorm_fwd)(ot_backend *be, float *out, float *mean, float *rstd, const float *inp,
                        const float *w, const float *b, int N, int C, float eps);
  /* dinp += ..., dw += ..., db += ... */
  void (*layernorm_bwd)(ot_backend *be, float *dinp, float *dw, float *db, const float *dout,
                        const float *inp, const float *w, const float *mean, const float *rstd, int N, int C);
  /* out[N,OUT] = inp[N,IN] W + bias (bias may be NULL) */
  void (*matmul_fwd)(ot_backend *be, float *out, const float *inp, const float *w, const float *bias, int N,
                     int IN, int OUT, ot_wlayout layout);
  /* dinp = dout W^T, dw += inp^T dout (in W's layout), dbias += colsum(dout) */
  void (*matmul_bwd)(ot_backend *be, float *dinp, float *dw, float *dbias, const float *dout,
                     const float *inp, const float *w, int N, int IN, int OUT, ot_wlayout layout);
  /* The same with W stored in low precision (a frozen weight kept at a half or a quarter of its
   * memory; the product widens blocks of W as it goes): bf16 values, or int8 values times
   * scale[o] of output feature o. out = inp W + bias, and dinp = dout W^T (no dW: W is frozen).
   * NULL where the backend lacks them. */
  void (*matmul_fwd_lowp)(ot_backend *be, float *out, const float *inp, const void *w, ot_lowp kind,
                          const float *scale, const float *bias, int N, int IN, int OUT, ot_wlayout layout);
  void (*matmul_bwd_lowp)(ot_backend *be, float *dinp, const float *dout, const void *w, ot_lowp kind,
                          const float *scale, int N, int IN, int OUT, ot_wlayout layout);
  /* causal multi-head attention over qkv[N,3C] (q | k | v); out[N,C]; att[B,NH,T,T]
   * keeps the softmax probabilities for backward */
  void (*attention_fwd)(ot_backend *be, float *out, float *att, const float *qkv, int B, int T, int C,
                        int NH);
  /* dqkv = ...; datt [B,NH,T,T] is scratch */
  void (*attention_bwd)(ot_backend *be, float *dqkv, float *datt, const float *dout, const float *qkv,
                        const float *att, int B, int T, int C, int NH);
  /* GELU, tanh approximation */
  void (*gelu_fwd)(ot_backend *be, float *out, const float *inp, size_t n);
  /* dinp = gelu'(inp) * dout */
  void (*gelu_bwd)(ot_backend *be, float *dinp, const float *inp, const float *dout, size_t n);
  /* out = a + b */
  void (*add)(ot_backend *be, float *out, const float *a, const float *b, size_t n);
  /* probs = softmax(logits) (may alias); losses[i] = -log probs[i, targets[i]], 0 where target < 0 */
  void (*crossentropy_fwd)(ot_backend *be, float *losses, float *probs, const float *logits,
                           const int32_t *targets, int N, int V);
  /* dlogits = (probs - onehot(target)) * scale, 0 rows where target < 0 (may alias probs) */
  void (*crossentropy_bwd)(ot_backend *be, float *dlogits, const float *probs, const int32_t *targets,
                           float scale, int N, int V);
  /* Hidden-state distillation, per row i: r_i = sqrt(mean_c t[i,c]^2) + eps;
   * losses[i] = sum_c ((t[i,c] - s[i,c]) / r_i)^2 (student s, teacher t, both [N,C]) */
  void (*kd_fwd)(ot_backend *be, float *losses, const float *s, const float *t, int N, int C, float eps);
  /* ds = scale * 2 (s - t) / r_i^2, the gradient of scale * sum(losses) */
  void (*kd_bwd)(ot_backend *be, float *ds, const float *s, const float *t, float scale, int N, int C,
                 float eps);
  /* LoRA branch (PEFT): t[N,r] = drop(x) A^T is saved for backward; out[N,OUT] += scale * t B^T.
   * A [r,IN], B [OUT,r] (nn.Linear layout). With p > 0, element i of x is kept iff
   * ot_dropout_keep(seed, i, p) and scaled by 1/(1-p); xd [N,IN] is scratch (unused when p == 0). */
  void (*lora_fwd)(ot_backend *be, float *out, float *t, float *xd, const float *x, const float *A,
                   const float *B, int N, int IN, int OUT, int r, float scale, float p, uint64_t seed);
  /* dB += scale dout^T t; dt = scale dout B; dA += dt^T drop(x); dx += drop'(dt A). The mask is
   * regenerated from seed, not stored; dt [N,r] and xd [N,IN] are scratch. */
  void (*lora_bwd)(ot_backend *be, float *dx, float *dA, float *dB, float *dt, float *xd, const float *dout,
                   const float *x, const float *t, const float *A, const float *B, int N, int IN, int OUT,
                   int r, float scale, float p, uint64_t seed);
  /* AdamW with PyTorch semantics: p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p), t >= 1.
   * Consumes the gradient: g is zeroed, so the next backward starts from zero without
   * a separate pass over memory. */
  void (*adamw)(ot_backend *be, float *p, float *g, float *m, float *v, size_t n, float lr, float beta1,
                float beta2, float eps, float wd, int t);
  /* PyTorch SGD: g' = g + wd p; buf = momentum buf + g' (buf = g' at first step); p -= lr * buf.
   * buf may be NULL when momentum == 0. Consumes (zeroes) g like adamw. */
  void (*sgd)(ot_backend *be, float *p, float *g, float *buf, size_t n, float lr, float momentum, float wd,
              int first_step);
  /* x *= s */
  void (*scale)(ot_backend *be, float *x, float s, size_t n);
  /* returns sum(x^2) in double (synchronises) */
  double (*sumsq)(ot_backend *be, const float *x, size_t n);

  /* Ops below were added after the core; a backend may leave any of them NULL
   * (designated initialisers), and callers check with OT_BACKEND_REQUIRE. */

  /* Floats of `att` (and of the `datt` scratch) attention_fwd/bwd need for these shapes;
   * NULL means B*NH*T*T (probabilities kept). A backend with fused attention (CUDA's
   * flash path) keeps only the row log-sum-exp [B,NH,T] in att and recomputes the rest:
   * att is then opaque, meaningful only to the same backend's attention_bwd. */
  size_t (*attention_state)(ot_backend *be, int B, int T, int C, int NH);
  /* Inference with a KV cache (serve/ot_serve_engine.c). */
  /* out[N,C] = wte[tokens[i]] + wpe[pos[i]]: rows at arbitrary positions (tokens, pos [N]) */
  void (*embed_fwd)(ot_backend *be, float *out, const int32_t *tokens, const int32_t *pos, const float *wte,
                    const float *wpe, int N, int C);
  /* Causal attention of new rows against a paged KV cache (vLLM's PagedAttention layout). Row i
   * of qkv[N,3C] (q | k | v) is the token at position pos[i] of sequence slot[i]; kcache, vcache
   * [n_blocks, block_size, C] (one layer) are a pool of blocks of block_size positions, and
   * table [n_slots, max_blocks] lists each sequence's blocks: position p of sequence s lives at
   * offset p % block_size of block table[s * max_blocks + p / block_size]. First every row's k
   * and v are stored; then out[i] (heads of C/NH) attends to positions 0..pos[i] of its
   * sequence, so rows of one sequence sent together (a prefill) see each other causally.
   * Fixed slots are block_size = T_max, max_blocks 1, table[s] = s. pos, slot, table are
   * backend memory. Keys are visited in chunks of 64 positions whatever the block size, so the
   * result does not depend on it. */
  void (*attention_kv_fwd)(ot_backend *be, float *out, float *kcache, float *vcache, const float *qkv,
                           const int32_t *pos, const int32_t *slot, const int32_t *table, int N, int C,
                           int NH, int block_size, int max_blocks);
  /* Multi-adapter LoRA for serving (Punica's SGMV), no dropout: segment s owns rows row0[s] ..
   * row0[s]+n[s]-1 of x[N,IN] and out[N,OUT] (segments do not overlap; rows in none are left
   * alone) and out[those rows] += scale[s] (x A_s^T) Bt_s with A_s = A[s] [r[s], IN] (nn.Linear
   * layout) and Bt_s = Bt[s] [r[s], OUT] (B transposed, so the expand reads rows). Ranks differ
   * per segment. One call for every adapter of a batch. The tables (row0, n, r, scale, A, Bt:
   * S entries) are HOST memory (the batch schedule lives on the host); the tensors are backend
   * memory. NULL: the engine calls lora_fwd per segment instead. */
  void (*lora_sgmv_fwd)(ot_backend *be, float *out, const float *x, const float *const *A,
                        const float *const *Bt, const int *row0, const int *n, const int *r,
                        const float *scale, int S, int IN, int OUT);

  /* Ops of the LLaMA family. */
  /* RMSNorm: out = inp * rstd * w, rstd = 1 / sqrt(mean(inp^2) + eps); rstd [N] saved for
   * backward (may be NULL) */
  void (*rmsnorm_fwd)(ot_backend *be, float *out, float *rstd, const float *inp, const float *w, int N, int C,
                      float eps);
  /* dinp += ..., dw += ... (either may be NULL) */
  void (*rmsnorm_bwd)(ot_backend *be, float *dinp, float *dw, const float *dout, const float *inp,
                      const float *w, const float *rstd, int N, int C);
  /* Rotary embedding in place, Hugging Face's rotate-half convention: x [N, H, D]; in row i and
   * head h the pair (j, j + D/2) turns by the angle pos[i] * inv_freq[j] (inv_freq [D/2]); inverse
   * turns it back (the backward of the rotation). pos and inv_freq are backend memory. */
  void (*rope)(ot_backend *be, float *x, const int32_t *pos, const float *inv_freq, int N, int H, int D,
               int inverse);
  /* out = silu(gate) * up */
  void (*swiglu_fwd)(ot_backend *be, float *out, const float *gate, const float *up, size_t n);
  /* dgate = dout * up * silu'(gate), dup = dout * silu(gate) (overwrite; may alias dout) */
  void (*swiglu_bwd)(ot_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                     const float *up, size_t n);
  /* Causal grouped-query attention over separate q [B*T, NH*D] and k, v [B*T, NKV*D]: head h reads
   * key/value head h / (NH / NKV). out [B*T, NH*D]; att [B, NH, T, T] keeps the probabilities. */
  void (*gqa_fwd)(ot_backend *be, float *out, float *att, const float *q, const float *k, const float *v,
                  int B, int T, int NH, int NKV, int D);
  /* dq, dk, dv = ... (overwrite); datt [B, NH, T, T] is scratch */
  void (*gqa_bwd)(ot_backend *be, float *dq, float *dk, float *dv, float *datt, const float *dout,
                  const float *q, const float *k, const float *v, const float *att, int B, int T, int NH,
                  int NKV, int D);
  /* attention_kv_fwd for grouped-query attention: row i's k [NKV*D] and v are stored at position
   * pos[i] of sequence slot[i] in the paged kcache, vcache [n_blocks, block_size, NKV*D] (table
   * as attention_kv_fwd); then out[i] [NH*D] attends to positions 0..pos[i] of its sequence. */
  void (*gqa_kv_fwd)(ot_backend *be, float *out, float *kcache, float *vcache, const float *q, const float *k,
                     const float *v, const int32_t *pos, const int32_t *slot, const int32_t *table, int N,
                     int NH, int NKV, int D, int block_size, int max_blocks);
} ot_backend_ops;

/* Host and CUDA device code share these (one definition of the dropout mask). */
#ifdef __CUDACC__
#define OT_HD __host__ __device__
#else
#define OT_HD
#endif

/* splitmix64's finaliser: a counter-based hash, so any backend can regenerate a mask. */
OT_HD static inline uint64_t ot_mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
/* Seed of one dropout site at one training step. */
OT_HD static inline uint64_t ot_dropout_seed(uint64_t seed, uint64_t step, uint64_t site) {
  return ot_mix64(ot_mix64(ot_mix64(seed) + step) + site);
}
/* Dropout keeps element i iff u >= p, u uniform in [0,1) from (seed, i). */
OT_HD static inline int ot_dropout_keep(uint64_t seed, uint64_t i, float p) {
  return (double)(ot_mix64(seed ^ ot_mix64(i)) >> 11) * (1.0 / 9007199254740992.0) >= (double)p;
}

struct ot_backend {
  const ot_backend_ops *ops;
  void *ctx;
  int n_threads;
};

typedef enum { OT_BACKEND_CPU = 0, OT_BACKEND_CUDA = 1 } ot_backend_kind;

/* Creates a backend; n_threads <= 0 means all cores (CPU). A backend that is not
 * built or has no device gives OT_ERR_UNSUPPORTED with a detail saying why.
 * OT_BACKEND_CUDA takes its flags from the environment: OT_CUDA_BF16=1 (bf16 matrix
 * products), OT_CUDA_FLASH=0 (materialised attention instead of the fused kernel). */
int ot_backend_create(ot_backend_kind kind, int n_threads, ot_backend **out);
/* For commands: like ot_backend_create, but a CUDA backend that cannot start (not
 * built, no device) falls back to the CPU; *fell_back says so and ot_error_detail()
 * keeps the reason for the warning the caller prints. */
int ot_backend_create_or_cpu(ot_backend_kind kind, int n_threads, ot_backend **out, int *fell_back);
void ot_backend_free(ot_backend *be);
/* "cpu" / "cuda" -> kind */
int ot_backend_parse(const char *name, ot_backend_kind *out);
/* OT_OK if the op exists, else OT_ERR_UNSUPPORTED naming the backend and the op. */
int ot_backend_check_op(const ot_backend *be, int present, const char *op);
#define OT_BACKEND_REQUIRE(be, op) ot_backend_check_op((be), (be)->ops->op != NULL, #op)

int ot_backend_cpu_create(int n_threads, ot_backend **out);

/* CUDA backend flags */
enum {
  OT_CUDA_BF16 = 1,     /* matrix products in bf16 (fp32 accumulate, fp32 master weights) */
  OT_CUDA_NO_FLASH = 2, /* materialised softmax attention instead of the fused kernel */
};
/* Creates the CUDA backend on `device`; without a usable GPU (or a build without CUDA)
 * OT_ERR_UNSUPPORTED, detail "no CUDA device: <CUDA's reason>". */
int ot_backend_cuda_create(int device, unsigned flags, ot_backend **out);

#endif
