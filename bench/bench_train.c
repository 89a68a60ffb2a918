/* Training-step throughput of offtune's GPT-2 or LLaMA (CPU or CUDA backend): random init,
 * random tokens, AdamW, the same work bench/torch_train.py gives PyTorch. Prints one JSON line.
 * --backend cuda takes OT_CUDA_BF16 / OT_CUDA_FLASH from the environment and never falls
 * back to the CPU: a benchmark must measure what it says. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "ot_cli.h"
#include "ot_error.h"
#include "ot_model.h"
#include "ot_optim.h"

int main(int argc, char **argv) {
  int layers = 12, heads = 12, embd = 768, vocab = 50257, ctx = 1024, B = 4, T = 64, steps = 5, warmup = 1,
      threads = 2, kv_heads = 0, ff = 0, tied = 1;
  float rope_theta = 10000.0f;
  const char *backend = "cpu", *arch = "gpt2";
  const ot_opt opts[] = {
      {"backend", OT_OPT_STR, &backend, "NAME", "cpu (default) or cuda"},
      {"arch", OT_OPT_STR, &arch, "NAME", "gpt2 (default) or llama"},
      {"kv-heads", OT_OPT_INT, &kv_heads, "K", "llama: key/value heads (default: heads)"},
      {"ff", OT_OPT_INT, &ff, "F", "llama: SwiGLU width (default 8 C / 3 rounded to 16)"},
      {"tied", OT_OPT_INT, &tied, "0|1", "llama: LM head tied to the embedding (default 1)"},
      {"rope-theta", OT_OPT_FLOAT, &rope_theta, "T", "llama: rotary base (default 10000)"},
      {"layers", OT_OPT_INT, &layers, "L", "blocks"},
      {"heads", OT_OPT_INT, &heads, "H", "heads"},
      {"embd", OT_OPT_INT, &embd, "C", "width"},
      {"vocab", OT_OPT_INT, &vocab, "V", "vocabulary"},
      {"ctx", OT_OPT_INT, &ctx, "P", "positions"},
      {"batch", OT_OPT_INT, &B, "B", "batch"},
      {"seq-len", OT_OPT_INT, &T, "T", "sequence"},
      {"steps", OT_OPT_INT, &steps, "N", "timed steps"},
      {"warmup", OT_OPT_INT, &warmup, "N", "untimed steps"},
      {"threads", OT_OPT_INT, &threads, "N", "threads"},
  };
  int n_opts = (int)(sizeof opts / sizeof opts[0]);
  int rc = ot_cli_parse(argc - 1, argv + 1, opts, n_opts);
  if (rc) {
    ot_cli_usage(rc == 1 ? stdout : stderr, "bench_train [options]", "Times GPT-2 or LLaMA training steps.",
                 opts, n_opts);
    return rc == 1 ? 0 : 2;
  }
  ot_backend *be;
  ot_model *m;
  ot_optimizer *opt;
  ot_model_config cfg = {.n_layer = layers,
                         .n_head = heads,
                         .n_embd = embd,
                         .vocab_size = vocab,
                         .n_positions = ctx,
                         .layer_norm_epsilon = 1e-5f};
  ot_optim_config oc;
  ot_optim_config_default(&oc, OT_OPTIM_ADAMW);
  ot_backend_kind kind;
  rc = ot_arch_parse(arch, &cfg.arch);
  if (rc == OT_OK && cfg.arch != OT_ARCH_GPT2) { /* as offtune-cloud pretrain makes them */
    cfg.layer_norm_epsilon = 1e-5f;
    cfg.n_kv_head = kv_heads; /* 0: the config's defaults (ot_model_config_complete) */
    cfg.n_ff = ff;
    cfg.rope_theta = rope_theta;
    cfg.tie_embeddings = tied;
  }
  if (rc == OT_OK) rc = ot_model_config_complete(&cfg);
  if (rc == OT_OK) rc = ot_backend_parse(backend, &kind);
  if (rc == OT_OK) rc = ot_backend_create(kind, threads, &be);
  if (rc == OT_OK) rc = ot_model_create(&cfg, be, &m);
  if (rc == OT_OK) rc = ot_model_init_random(m, 1);
  if (rc == OT_OK) rc = ot_model_prepare(m, B, T, 1);
  if (rc == OT_OK) rc = ot_optimizer_create(&oc, be, ot_model_param(m, 0), ot_model_param_count(m), &opt);
  if (rc) {
    fprintf(stderr, "bench_train: %s: %s\n", ot_strerror(rc), ot_error_detail());
    return 1;
  }
  int32_t *in = malloc(sizeof(int32_t) * B * T), *tg = malloc(sizeof(int32_t) * B * T);
  uint64_t s = 42;
  for (int i = 0; i < B * T; i++) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    in[i] = (int32_t)((s >> 33) % (uint64_t)vocab);
    tg[i] = (int32_t)((s >> 17) % (uint64_t)vocab);
  }
  double t0 = 0;
  float loss = 0;
  for (int i = 0; i < warmup + steps; i++) {
    if (i == warmup) t0 = ot_now();
    rc = ot_model_forward(m, in, tg, B, T, &loss);
    if (rc == OT_OK) rc = ot_model_backward(m);
    if (rc == OT_OK) rc = ot_optimizer_step(opt, 1e-4f, NULL);
    if (rc) {
      fprintf(stderr, "bench_train: %s: %s\n", ot_strerror(rc), ot_error_detail());
      return 1;
    }
  }
  double dt = (ot_now() - t0) / steps;
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  const char *bf16 = getenv("OT_CUDA_BF16");
  const char *impl = kind == OT_BACKEND_CPU               ? "offtune"
                     : bf16 && *bf16 && strcmp(bf16, "0") ? "offtune-cuda-bf16"
                                                          : "offtune-cuda";
  printf("{\"impl\": \"%s\", ", impl);
  printf("\"step_s\": %.4f, \"tokens_per_s\": %.1f, \"peak_rss_mib\": %.1f, "
         "\"loss\": %.4f, "
         "\"params\": %zu}\n",
         dt, B * T / dt, ru.ru_maxrss / 1024.0, loss, ot_model_num_params(m));
  free(in);
  free(tg);
  ot_optimizer_free(opt);
  ot_model_free(m);
  ot_backend_free(be);
  return 0;
}
