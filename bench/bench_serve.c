/* Serving throughput with many adapters (bench/README.md): generated tokens/s for R requests
 * - all on one LoRA adapter, in one batch;
 * - spread over R different LoRA adapters, in one batch (segments: SGMV-style LoRA);
 * - spread over R different offsite adapters (whole bottom/top blocks), in one batch;
 * - one adapter at a time (each request alone: batch 1), as a server that cannot batch across
 *   adapters serves them;
 * and the same per-adapter generation in PyTorch with a KV cache (bench/torch_serve.py), timed in
 * the same run. Random weights of a GPT-2-small-like shape; greedy decoding, EOS ignored. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_emulator.h"
#include "ot_cli.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_serve_engine.h"

static ot_peft_map emap; /* block map of the emulator at hand */

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

static const char *work;

static int resolve(void *user, const char *name, char *dir, size_t cap) {
  (void)user;
  snprintf(dir, cap, "%s/%s", work, name);
  return ot_peft_is_adapter_dir(dir) ? OT_OK : ot_error(OT_ERR_NOTFOUND, "no adapter %s", name);
}

static uint64_t rs = 88172645463325252ull;
static float noise(void) {
  rs ^= rs << 13;
  rs ^= rs >> 7;
  rs ^= rs << 17;
  return (float)((double)(rs >> 11) / 9007199254740992.0 - 0.5);
}

static int die(const char *what) {
  fprintf(stderr, "bench_serve: %s: %s\n", what, ot_error_detail());
  return 1;
}

typedef struct {
  int done;
} flag;
static void on_ev(void *user, const ot_serve_event *ev) {
  if (ev->finished) ((flag *)user)->done++;
}

/* Runs requests r[0..n) for names[] in one batch (together) or one after the other; returns
 * generated tokens per second (prefill included in the time). */
static double run(ot_serve_engine *e, char names[][32], int n, const int32_t *prompt, int np, int gen,
                  int together) {
  flag f = {0};
  double t0 = ot_now();
  for (int i = 0; i < n; i++) {
    ot_serve_request r = {names[i], prompt, (size_t)np, gen,  0.0f, 1.0f, 0,
                          0,        {NULL}, 1,          0.0f, 0.0f, NULL, 0};
    if (ot_serve_submit(e, &r, on_ev, &f, NULL)) {
      die("submit");
      exit(1);
    }
    if (!together) {
      while (f.done < i + 1)
        if (ot_serve_step(e, NULL)) exit(die("step"));
    }
  }
  while (f.done < n)
    if (ot_serve_step(e, NULL)) exit(die("step"));
  return (double)n * gen / (ot_now() - t0);
}

int main(int argc, char **argv) {
  int L = 6, C = 384, NH = 6, V = 50257, R = 32, np = 16, gen = 32, threads = 2, rank = 8, reps = 2,
      torch = 1;
  const char *dir = "bench_serve_tmp", *backend = "cpu";
  int no_torch = 0;
  const ot_opt opts[] = {
      {"layers", OT_OPT_INT, &L, "N", "blocks (default 6)"},
      {"embd", OT_OPT_INT, &C, "N", "width (default 384)"},
      {"heads", OT_OPT_INT, &NH, "N", "attention heads (default 6)"},
      {"vocab", OT_OPT_INT, &V, "N", "vocabulary (default 50257)"},
      {"requests", OT_OPT_INT, &R, "N", "requests = adapters (default 32)"},
      {"prompt", OT_OPT_INT, &np, "N", "prompt tokens (default 16)"},
      {"gen", OT_OPT_INT, &gen, "N", "generated tokens per request (default 32)"},
      {"rank", OT_OPT_INT, &rank, "R", "LoRA rank (default 8)"},
      {"threads", OT_OPT_INT, &threads, "N", "CPU threads (default 2)"},
      {"backend", OT_OPT_STR, &backend, "NAME", "serving backend: cpu (default) or cuda (falls back to cpu)"},
      {"reps", OT_OPT_INT, &reps, "N", "repetitions, best kept (default 2)"},
      {"dir", OT_OPT_STR, &dir, "DIR", "scratch directory for the model and adapters"},
      {"no-torch", OT_OPT_FLAG, &no_torch, NULL, "skip the PyTorch competitor"},
  };
  int rc = ot_cli_parse(argc - 1, argv + 1, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, "bench_serve [options]", "Multi-adapter serving throughput.", opts, N_OPTS(opts));
    return 0;
  }
  if (rc) return die("usage");
  torch = !no_torch;
  ot_backend_kind kind;
  if (ot_backend_parse(backend, &kind)) return die("--backend") + 1; /* usage: 2 */
  work = dir;
  ot_backend *be = NULL;
  ot_model *m = NULL;
  ot_model_config cfg = {.n_layer = L,
                         .n_head = NH,
                         .n_embd = C,
                         .vocab_size = V,
                         .n_positions = np + gen,
                         .layer_norm_epsilon = 1e-5f};
  char path[1200], digest[OT_DIGEST_HEX];
  if (ot_backend_cpu_create(threads, &be) || ot_model_create(&cfg, be, &m) || ot_model_init_random(m, 1))
    return die("model");
  snprintf(path, sizeof path, "%s/base", dir);
  if (ot_mkdir_p(dir) || ot_model_save_dir(m, path)) return die("saving the model");
  snprintf(path, sizeof path, "%s/base/model.safetensors", dir);
  if (ot_file_digest(path, digest)) return die("digest");
  ot_emu_plan plan;
  if (ot_emu_plan_make(L, 2, 2, 1, &plan)) return die("plan");
  snprintf(plan.base_digest, sizeof plan.base_digest, "%s", digest);
  /* R LoRA adapters (all four sites of the bottom 2 and top 2 blocks) and R offsite adapters */
  char lora[256][32], offs[256][32], one[256][32], base[256][32];
  if (R > 256) R = 256;
  fprintf(stderr, "bench_serve: writing %d LoRA and %d offsite adapters under %s\n", R, R, dir);
  for (int k = 0; k < 2 * R; k++) {
    int is_lora = k < R;
    char *nm = is_lora ? lora[k] : offs[k - R];
    snprintf(nm, 32, "%s%d", is_lora ? "lora" : "off", is_lora ? k : k - R);
    snprintf(one[k % R], 32, "lora0");
    base[k % R][0] = '\0';
    ot_model *emu = NULL;
    ot_peft_config ac;
    ot_peft_config_default(&ac);
    ac.kind = is_lora ? OT_PEFT_LORA : OT_PEFT_OFFSITE;
    ac.lora_r = rank;
    ac.seed = (uint64_t)k;
    if (ot_emu_build(m, &plan, &emu) || ot_peft_attach(emu, ot_emu_peft_map(&plan, &emap), &ac))
      return die("adapter");
    for (int i = 0; i < ot_model_param_count(emu); i++) {
      ot_param *p = ot_model_param(emu, i);
      if (p->trainable)
        for (size_t j = 0; j < p->numel; j++) p->data[j] += 0.02f * noise();
    }
    snprintf(path, sizeof path, "%s/%.31s", dir, nm);
    if (ot_peft_save(emu, ot_emu_peft_map(&plan, &emap), &ac, path)) return die("saving an adapter");
    ot_model_free(emu);
  }
  /* the files are written from the CPU; a CUDA server loads the base model onto the GPU */
  ot_backend *sbe = be;
  ot_model *sm = m;
  if (kind != OT_BACKEND_CPU) {
    int fell_back = 0;
    if (ot_backend_create_or_cpu(kind, threads, &sbe, &fell_back)) return die("backend");
    if (fell_back) fprintf(stderr, "bench_serve: warning: %s; using cpu\n", ot_error_detail());
    snprintf(path, sizeof path, "%s/base", dir);
    if (ot_model_load_dir(path, sbe, &sm)) return die("loading the model onto the serving backend");
  }
  ot_serve_config sc;
  ot_serve_config_default(&sc);
  sc.max_batch = R;
  sc.max_step_tokens = R * np > R ? R * np : R;
  sc.max_seq = np + gen;
  sc.resolve = resolve;
  sc.base_digest = digest;
  ot_serve_engine *e = NULL;
  if (ot_serve_engine_create(sm, &sc, &e)) return die("engine");
  int32_t *prompt = malloc((size_t)np * sizeof(int32_t));
  for (int i = 0; i < np; i++) prompt[i] = (i * 7919) % V;
  /* load every adapter once, so the timings are steady-state serving */
  run(e, lora, R, prompt, np, 1, 1);
  run(e, offs, R, prompt, np, 1, 1);
  ot_serve_stats st;
  ot_serve_get_stats(e, &st);
  fprintf(stderr, "bench_serve: %d adapters resident, %.1f MiB\n", st.adapters_loaded,
          st.adapter_bytes / 1048576.0);
  struct {
    const char *label;
    char (*names)[32];
    int together;
    double best;
  } sc_[] = {
      {"base model, batch of R", base, 1, 0},        {"one LoRA adapter, batch of R", one, 1, 0},
      {"R LoRA adapters, batch of R", lora, 1, 0},   {"R offsite adapters, batch of R", offs, 1, 0},
      {"R LoRA adapters one at a time", lora, 0, 0}, {"R offsite adapters one at a time", offs, 0, 0},
  };
  int ns = (int)(sizeof sc_ / sizeof sc_[0]);
  printf("offtune serving: %d blocks x %d wide, vocab %d, %d requests x (%d prompt + %d generated) tokens, "
         "LoRA r %d "
         "on 4 of %d blocks, offsite = 2 bottom + 2 top blocks, %s backend, %d threads\n",
         L, C, V, R, np, gen, rank, L, sbe->ops->name, threads);
  for (int rep = 0; rep < reps; rep++)
    for (int s = 0; s < ns; s++) {
      double t = run(e, sc_[s].names, R, prompt, np, gen, sc_[s].together);
      if (t > sc_[s].best) sc_[s].best = t;
    }
  for (int s = 0; s < ns; s++) printf("  %-36s %9.1f tokens/s\n", sc_[s].label, sc_[s].best);
  printf("  ratio R LoRA adapters / one adapter (batched):  %.2f\n", sc_[2].best / sc_[1].best);
  printf("  ratio R LoRA batched / one at a time:           %.2fx\n", sc_[2].best / sc_[4].best);
  printf("  ratio R offsite batched / one at a time:        %.2fx\n", sc_[3].best / sc_[5].best);
  printf("  ratio R offsite adapters / one LoRA adapter:    %.2f\n", sc_[3].best / sc_[1].best);
  if (torch && sbe->ops->host_visible) { /* torch_serve.py is the CPU competitor */
    char cmd[2048], line[512];
    snprintf(
        cmd, sizeof cmd,
        "OMP_NUM_THREADS=%d /usr/bin/python3 %s/torch_serve.py --layers %d --embd %d --heads %d --vocab %d "
        "--requests %d --prompt %d --gen %d --rank %d --threads %d --reps %d",
        threads, OT_BENCH_DIR, L, C, NH, V, R, np, gen, rank, threads, reps);
    FILE *p = popen(cmd, "r");
    double t1 = 0, tl = 0, to = 0;
    while (p && fgets(line, sizeof line, p)) {
      sscanf(line, "one_adapter_batch %lf", &t1);
      sscanf(line, "lora_one_at_a_time %lf", &tl);
      sscanf(line, "offsite_one_at_a_time %lf", &to);
    }
    int prc = p ? pclose(p) : -1;
    if (prc != 0 || !t1 || !tl || !to) {
      fprintf(stderr, "bench_serve: PyTorch competitor failed (exit %d): %s\n", prc, cmd);
    } else {
      printf("PyTorch %s (KV cache, same shapes and threads):\n", "torch_serve.py");
      printf("  %-36s %9.1f tokens/s\n", "one LoRA adapter, batch of R", t1);
      printf("  %-36s %9.1f tokens/s\n", "R LoRA adapters one at a time", tl);
      printf("  %-36s %9.1f tokens/s\n", "R offsite adapters one at a time", to);
      printf("  offtune R LoRA adapters batched / PyTorch one at a time:    %.2fx\n", sc_[2].best / tl);
      printf("  offtune R offsite adapters batched / PyTorch one at a time: %.2fx\n", sc_[3].best / to);
      printf("  offtune one adapter batch / PyTorch one adapter batch:      %.2fx\n", sc_[1].best / t1);
    }
  }
  free(prompt);
  ot_serve_engine_free(e);
  if (sm != m) ot_model_free(sm);
  if (sbe != be) ot_backend_free(sbe);
  ot_model_free(m);
  ot_backend_free(be);
  return 0;
}
