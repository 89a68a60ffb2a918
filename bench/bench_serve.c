/* Serving throughput with many adapters (bench/README.md): generated tokens/s for R requests
 * - all on one LoRA adapter, in one batch;
 * - spread over R different LoRA adapters, in one batch (segments: SGMV-style LoRA);
 * - spread over R different offsite adapters (whole bottom/top blocks), in one batch;
 * - one adapter at a time (each request alone: batch 1), as a server that cannot batch across
 *   adapters serves them;
 * and the same per-adapter generation in PyTorch with a KV cache (bench/torch_serve.py), timed in
 * the same run. Random weights of a GPT-2-small-like shape; greedy decoding, EOS ignored.
 * Then (bench/README.md):
 * - HTTP clients: 1, 8, 32 and 64 concurrent clients streaming completions over the R LoRA
 *   adapters through the real HTTP server on loopback sockets: throughput, p50/p99 time to first
 *   token and time per output token;
 * - KV memory: the most sequences running at once, and the throughput, in the KV memory of
 *   --kv-seqs fixed slots of --kv-ctx positions, paged (blocks of 16) against fixed slots. */
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ot_emulator.h"
#include "ot_cli.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_serve_api.h"
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

/* ---- HTTP clients ------------------------------------------------------------------- */

typedef struct {
  int port, n_req, np, gen, first, R, V;
  const int32_t *prompt;
  double *ttft, *tpot; /* [n_req], ms */
  int failed;
} client;

/* One streamed completion on a new loopback connection (Connection: close): TTFT = send -> the
 * first token's chunk, TPOT = (last token's chunk - first) / (tokens - 1), as vLLM's
 * benchmark_serving computes them. */
static int one_request(client *c, int k, double *ttft, double *tpot) {
  char body[16384], head[256];
  int n = snprintf(body, sizeof body, "{\"model\":\"lora%d\",\"prompt\":[", (c->first + k) % c->R);
  for (int i = 0; i < c->np && n < (int)sizeof body - 64; i++)
    n += snprintf(body + n, sizeof body - n, "%s%d", i ? "," : "", c->prompt[i]);
  n += snprintf(body + n, sizeof body - n,
                "],\"max_tokens\":%d,\"temperature\":0,\"stream\":true,\"ignore_eos\":true,\"logit_bias\":{",
                c->gen);
  for (int b = 0x80; b < 0x100; b++)
    n += snprintf(body + n, sizeof body - n, "%s\"%d\":-100", b > 0x80 ? "," : "", c->V - 256 + b);
  n += snprintf(body + n, sizeof body - n, "}}");
  int h = snprintf(head, sizeof head,
                   "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   "Connection: close\r\nContent-Length: %d\r\n\r\n",
                   n);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)c->port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  double t0 = ot_now();
  if (send(fd, head, (size_t)h, MSG_NOSIGNAL) != h || send(fd, body, (size_t)n, MSG_NOSIGNAL) != n) {
    close(fd);
    return -1;
  }
  static const char pat[] = "\"finish_reason\":null";
  size_t cap = 1 << 16, len = 0, scan = 0, pl = sizeof pat - 1;
  char *buf = malloc(cap);
  int tokens = 0, ok200 = 0;
  double t_first = 0, t_last = 0;
  for (;;) {
    if (!buf) break;
    if (len + 4096 > cap) {
      char *b = realloc(buf, cap *= 2);
      if (!b) break;
      buf = b;
    }
    ssize_t r = recv(fd, buf + len, cap - len - 1, 0);
    if (r <= 0) break;
    double t = ot_now();
    len += (size_t)r;
    buf[len] = '\0';
    if (!ok200 && len >= 12) ok200 = strncmp(buf, "HTTP/1.1 200", 12) == 0;
    for (char *m; (m = strstr(buf + scan, pat)); scan = (size_t)(m - buf) + pl) {
      if (!tokens++) t_first = t;
      t_last = t;
    }
    if (len >= pl && scan < len - pl + 1) scan = len - pl + 1;
  }
  close(fd);
  free(buf);
  if (!ok200 || tokens != c->gen) return -1;
  *ttft = (t_first - t0) * 1e3;
  *tpot = tokens > 1 ? (t_last - t_first) * 1e3 / (tokens - 1) : 0.0;
  return 0;
}

static void *client_main(void *arg) {
  client *c = arg;
  for (int k = 0; k < c->n_req; k++)
    if (one_request(c, k, &c->ttft[k], &c->tpot[k])) c->failed++;
  return NULL;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* The q-quantile (nearest rank) of v[0..n) (sorted in place). */
static double quantile(double *v, int n, double q) {
  qsort(v, (size_t)n, sizeof *v, cmp_d);
  int i = (int)ceil(q * n) - 1;
  return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

/* A vocabulary of V - 256 plain-ASCII tokens ("w0", "w1", ...; no merges) and the 256 byte tokens
 * on top, so every generated token is one streamed text chunk (requests bias the bytes 0x80-0xFF,
 * which could start a held-back UTF-8 character, to -100): the prompts are token ids, nothing is
 * encoded. */
static int write_vocab(const char *dir, int V, ot_tokenizer **tok) {
  char vp[1200], mp[1200];
  snprintf(vp, sizeof vp, "%s/bench_vocab.json", dir);
  snprintf(mp, sizeof mp, "%s/bench_merges.txt", dir);
  FILE *f = fopen(vp, "w"), *g = fopen(mp, "w");
  if (!f || !g) {
    if (f) fclose(f);
    if (g) fclose(g);
    return ot_error(OT_ERR_IO, "cannot write %s", vp);
  }
  /* the byte-level alphabet (GPT-2's bytes_to_unicode) the loader requires, at the top ids */
  int bu[256], nb = 0;
  for (int b = 0; b < 256; b++)
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) bu[b] = b;
  for (int b = 0; b < 256; b++)
    if (!((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))) bu[b] = 256 + nb++;
  fputc('{', f);
  for (int i = 0; i < V - 256; i++) fprintf(f, "%s\"w%d\":%d", i ? "," : "", i, i);
  for (int b = 0; b < 256; b++) { /* the code point as UTF-8, JSON-escaped where needed */
    int cp = bu[b];
    fputs(",\"", f);
    if (cp == '"' || cp == '\\')
      fprintf(f, "\\%c", cp);
    else if (cp < 0x80)
      fputc(cp, f);
    else if (cp < 0x800)
      fprintf(f, "%c%c", 0xC0 | (cp >> 6), 0x80 | (cp & 0x3F));
    fprintf(f, "\":%d", V - 256 + b);
  }
  fputs("}\n", f);
  fputs("#version: 0.2\n", g);
  fclose(f);
  fclose(g);
  return ot_tokenizer_bpe_load(vp, mp, tok);
}

/* Streams completions from 1, 8, 32 and 64 concurrent clients through the HTTP server. */
static int bench_http(ot_model *sm, const char *digest, const char *dir, int R, const int32_t *prompt, int np,
                      int gen, int scale, const int *levels, int n_levels) {
  ot_tokenizer *tok = NULL;
  int rc = write_vocab(dir, ot_model_cfg(sm)->vocab_size, &tok);
  if (rc) return die("the benchmark vocabulary");
  int maxc = 1;
  for (int i = 0; i < n_levels; i++)
    if (levels[i] > maxc) maxc = levels[i];
  ot_serve_config sc;
  ot_serve_config_default(&sc);
  sc.max_batch = maxc;
  sc.max_step_tokens = maxc * np > 512 ? maxc * np : 512;
  sc.max_seq = np + gen;
  sc.resolve = resolve;
  sc.base_digest = digest;
  sc.tok = tok;
  ot_serve_engine *e = NULL;
  ot_serve_http *api = NULL;
  if (ot_serve_engine_create(sm, &sc, &e)) return die("HTTP engine");
  char(*names)[32] = malloc((size_t)R * sizeof *names);
  if (!names) return die("names");
  for (int i = 0; i < R; i++) snprintf(names[i], 32, "lora%d", i);
  run(e, names, R, prompt, np, 1, 1); /* every adapter loaded before the clients come */
  free(names);
  if (ot_serve_start(e)) return die("HTTP engine");
  ot_serve_http_config hc = {.url = "http://127.0.0.1:0",
                             .engine = e,
                             .tok = tok,
                             .base_name = "base",
                             .eos_id = -1,
                             .max_body = 1 << 20,
                             .max_prompts = 1,
                             .max_conns = 4 * maxc + 16,
                             .max_conns_per_peer = 4 * maxc + 16};
  if (ot_serve_http_start(&hc, &api)) return die("HTTP server");
  int port = ot_serve_http_port(api);
  printf(
      "HTTP streaming (real loopback sockets, a new connection per request), %d LoRA adapters, %d prompt + "
      "%d generated tokens:\n",
      R, np, gen);
  printf("  %7s %8s %10s %10s %10s %10s %10s\n", "clients", "requests", "tokens/s", "TTFT p50", "TTFT p99",
         "TPOT p50", "TPOT p99");
  double tput1 = 0;
  for (int li = 0; li < n_levels; li++) {
    int nc = levels[li], per = (nc * 2 > 4 ? 2 : 4 / nc + (4 % nc != 0)) * scale, total = nc * per;
    client *cl = calloc((size_t)nc, sizeof *cl);
    pthread_t *th = calloc((size_t)nc, sizeof *th);
    double *ttft = malloc((size_t)total * sizeof(double)), *tpot = malloc((size_t)total * sizeof(double));
    if (!cl || !th || !ttft || !tpot) return die("HTTP clients");
    double t0 = ot_now();
    for (int i = 0; i < nc; i++) {
      cl[i] = (client){port,
                       per,
                       np,
                       gen,
                       i * per,
                       R,
                       ot_model_cfg(sm)->vocab_size,
                       prompt,
                       ttft + (size_t)i * per,
                       tpot + (size_t)i * per,
                       0};
      if (pthread_create(&th[i], NULL, client_main, &cl[i])) return die("a client thread");
    }
    int failed = 0;
    for (int i = 0; i < nc; i++) {
      pthread_join(th[i], NULL);
      failed += cl[i].failed;
    }
    double wall = ot_now() - t0;
    if (failed) {
      fprintf(stderr, "bench_serve: %d of %d HTTP requests failed\n", failed, total);
      return 1;
    }
    double tput = (double)total * gen / wall;
    if (li == 0) tput1 = tput;
    printf("  %7d %8d %10.1f %8.1fms %8.1fms %8.2fms %8.2fms\n", nc, total, tput, quantile(ttft, total, 0.5),
           quantile(ttft, total, 0.99), quantile(tpot, total, 0.5), quantile(tpot, total, 0.99));
    if (li > 0) printf("  %7s ratio tokens/s %d clients / %d: %.2fx\n", "", nc, levels[0], tput / tput1);
    free(cl);
    free(th);
    free(ttft);
    free(tpot);
  }
  ot_serve_http_stop(api);
  ot_serve_engine_free(e);
  ot_tokenizer_free(tok);
  return 0;
}

/* ---- KV memory: paged against fixed slots ------------------------------------------- */

/* n requests on R LoRA adapters in a KV pool of `blocks` blocks of `bs` positions (max_seq ctx):
 * the most running at once, tokens/s, preemptions. */
static int kv_run(ot_model *sm, const char *digest, int R, const int32_t *prompt, int np, int gen, int ctx,
                  int bs, int blocks, int n, int *max_running, double *tput, uint64_t *preempt) {
  ot_serve_config sc;
  ot_serve_config_default(&sc);
  sc.max_batch = n;
  sc.max_step_tokens = n * np > 512 ? n * np : 512;
  sc.max_seq = ctx;
  sc.kv_block_size = bs;
  sc.kv_blocks = blocks;
  sc.resolve = resolve;
  sc.base_digest = digest;
  ot_serve_engine *e = NULL;
  if (ot_serve_engine_create(sm, &sc, &e)) return die("KV engine");
  char(*names)[32] = malloc((size_t)n * sizeof *names);
  if (!names) return die("names");
  for (int i = 0; i < n; i++) snprintf(names[i], 32, "lora%d", i % R);
  run(e, names, n < R ? n : R, prompt, np, 1, 1); /* adapters loaded first */
  ot_serve_stats st0;
  ot_serve_get_stats(e, &st0);
  *tput = run(e, names, n, prompt, np, gen, 1);
  ot_serve_stats st;
  ot_serve_get_stats(e, &st);
  *max_running = st.max_running;
  *preempt = st.preemptions - st0.preemptions;
  free(names);
  ot_serve_engine_free(e);
  return 0;
}

static int bench_batch(ot_model *sm, ot_backend *sbe, const char *digest, char lora[][32], char offs[][32],
                       char one[][32], char base[][32], int R, const int32_t *prompt, int np, int gen, int L,
                       int C, int NH, int V, int rank, int threads, int reps, int torch);

int main(int argc, char **argv) {
  int L = 6, C = 384, NH = 6, V = 50257, R = 32, np = 16, gen = 32, threads = 2, rank = 8, reps = 2,
      torch = 1;
  const char *dir = "bench_serve_tmp", *backend = "cpu", *clients = "1,8,32,64", *arch = "gpt2";
  int kv_heads = 0, ff = 0;
  int no_torch = 0, no_batch = 0, no_http = 0, no_kv = 0, http_scale = 1, kv_seqs = 8, kv_ctx = 512,
      kv_requests = 0;
  const ot_opt opts[] = {
      {"layers", OT_OPT_INT, &L, "N", "blocks (default 6)"},
      {"embd", OT_OPT_INT, &C, "N", "width (default 384)"},
      {"heads", OT_OPT_INT, &NH, "N", "attention heads (default 6)"},
      {"vocab", OT_OPT_INT, &V, "N", "vocabulary (default 50257)"},
      {"arch", OT_OPT_STR, &arch, "NAME",
       "gpt2 (default) or llama (no PyTorch row: torch_serve.py is GPT-2)"},
      {"kv-heads", OT_OPT_INT, &kv_heads, "N", "key/value heads of a LLaMA shape (default: --heads)"},
      {"ff", OT_OPT_INT, &ff, "N", "MLP width of a LLaMA shape (default 8/3 width, a multiple of 16)"},
      {"requests", OT_OPT_INT, &R, "N", "requests = adapters (default 32)"},
      {"prompt", OT_OPT_INT, &np, "N", "prompt tokens (default 16)"},
      {"gen", OT_OPT_INT, &gen, "N", "generated tokens per request (default 32)"},
      {"rank", OT_OPT_INT, &rank, "R", "LoRA rank (default 8)"},
      {"threads", OT_OPT_INT, &threads, "N", "CPU threads (default 2)"},
      {"backend", OT_OPT_STR, &backend, "NAME", "serving backend: cpu (default) or cuda (falls back to cpu)"},
      {"reps", OT_OPT_INT, &reps, "N", "repetitions, best kept (default 2)"},
      {"dir", OT_OPT_STR, &dir, "DIR", "scratch directory for the model and adapters"},
      {"no-torch", OT_OPT_FLAG, &no_torch, NULL, "skip the PyTorch competitor"},
      {"no-batch", OT_OPT_FLAG, &no_batch, NULL, "skip the batching scenarios (and PyTorch)"},
      {"no-http", OT_OPT_FLAG, &no_http, NULL, "skip the HTTP clients"},
      {"http-clients", OT_OPT_STR, &clients, "LIST", "concurrent HTTP clients (default 1,8,32,64)"},
      {"http-scale", OT_OPT_INT, &http_scale, "N",
       "requests per client x N (default 1: max(2, 4/clients) each; longer runs for steadier p99)"},
      {"no-kv", OT_OPT_FLAG, &no_kv, NULL, "skip the KV memory comparison"},
      {"kv-seqs", OT_OPT_INT, &kv_seqs, "N", "KV memory = N fixed slots of --kv-ctx positions (default 8)"},
      {"kv-ctx", OT_OPT_INT, &kv_ctx, "N", "max_seq: positions a fixed slot reserves (default 512)"},
      {"kv-requests", OT_OPT_INT, &kv_requests, "N",
       "requests in the KV comparison (default 12 x --kv-seqs)"},
  };
  int rc = ot_cli_parse(argc - 1, argv + 1, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, "bench_serve [options]", "Multi-adapter serving throughput.", opts, N_OPTS(opts));
    return 0;
  }
  if (rc) return die("usage");
  ot_arch arch_id;
  if (ot_arch_parse(arch, &arch_id)) return die("--arch") + 1;
  torch = !no_torch && arch_id == OT_ARCH_GPT2;
  ot_backend_kind kind;
  if (ot_backend_parse(backend, &kind)) return die("--backend") + 1; /* usage: 2 */
  work = dir;
  ot_backend *be = NULL;
  ot_model *m = NULL;
  ot_model_config cfg = {.n_layer = L,
                         .n_head = NH,
                         .n_embd = C,
                         .vocab_size = V,
                         .n_positions = np + gen > kv_ctx ? np + gen : kv_ctx,
                         .layer_norm_epsilon = 1e-5f,
                         .arch = arch_id};
  if (arch_id != OT_ARCH_GPT2) {
    cfg.n_kv_head = kv_heads; /* 0: the config's defaults (ot_model_config_complete) */
    cfg.n_ff = ff;
    cfg.layer_norm_epsilon = 1e-6f;
  }
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
  int32_t *prompt = malloc((size_t)np * sizeof(int32_t));
  for (int i = 0; i < np; i++) prompt[i] = (i * 7919) % V;
  if (!no_batch) {
    int brc = bench_batch(sm, sbe, digest, lora, offs, one, base, R, prompt, np, gen, L, C, NH, V, rank,
                          threads, reps, torch);
    if (brc) return brc;
  }
  if (!no_http) {
    int levels[8], nl = 0;
    for (const char *p = clients; *p && nl < 8;) {
      levels[nl] = atoi(p);
      if (levels[nl] < 1) return die("--http-clients") + 1;
      nl++;
      p = strchr(p, ',');
      if (!p) break;
      p++;
    }
    int hrc = bench_http(sm, digest, dir, R, prompt, np, gen, http_scale < 1 ? 1 : http_scale, levels, nl);
    if (hrc) return hrc;
  }
  if (!no_kv) {
    if (kv_ctx < np + gen || kv_seqs < 1) return die("--kv-ctx must be >= prompt + gen, --kv-seqs >= 1") + 1;
    int n = kv_requests > 0 ? kv_requests : 12 * kv_seqs, mr[2];
    double tp[2];
    uint64_t pre[2];
    int bs = 16, blocks = (int)((size_t)kv_seqs * kv_ctx / bs);
    if (kv_run(sm, digest, R, prompt, np, gen, kv_ctx, kv_ctx, kv_seqs, n, &mr[0], &tp[0], &pre[0]) ||
        kv_run(sm, digest, R, prompt, np, gen, kv_ctx, bs, blocks, n, &mr[1], &tp[1], &pre[1]))
      return 1;
    double mib = (double)ot_model_kv_block_bytes(sm, kv_ctx) * kv_seqs / 1048576.0;
    printf("KV memory of %d fixed slots x %d positions (%.1f MiB), %d requests of %d + %d tokens on %d LoRA "
           "adapters:\n",
           kv_seqs, kv_ctx, mib, n, np, gen, R);
    printf("  %-34s %6d running at most %10.1f tokens/s\n", "fixed slots (max_seq reserved)", mr[0], tp[0]);
    printf("  %-34s %6d running at most %10.1f tokens/s  (%llu preemptions)\n", "paged (blocks of 16)", mr[1],
           tp[1], (unsigned long long)pre[1]);
    printf("  ratio paged / fixed: %.1fx sequences at once, %.2fx tokens/s\n", (double)mr[1] / mr[0],
           tp[1] / tp[0]);
  }
  free(prompt);
  if (sm != m) ot_model_free(sm);
  if (sbe != be) ot_backend_free(sbe);
  ot_model_free(m);
  ot_backend_free(be);
  return 0;
}

/* The batching scenarios (and the PyTorch competitor). */
static int bench_batch(ot_model *sm, ot_backend *sbe, const char *digest, char lora[][32], char offs[][32],
                       char one[][32], char base[][32], int R, const int32_t *prompt, int np, int gen, int L,
                       int C, int NH, int V, int rank, int threads, int reps, int torch) {
  ot_serve_config sc;
  ot_serve_config_default(&sc);
  sc.max_batch = R;
  sc.max_step_tokens = R * np > R ? R * np : R;
  sc.max_seq = np + gen;
  sc.resolve = resolve;
  sc.base_digest = digest;
  ot_serve_engine *e = NULL;
  if (ot_serve_engine_create(sm, &sc, &e)) return die("engine");
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
  const ot_model_config *mc = ot_model_cfg(sm);
  if (mc->arch != OT_ARCH_GPT2)
    printf("offtune serving: %s, %d heads / %d KV heads, MLP %d\n", ot_arch_name(mc->arch), mc->n_head,
           mc->n_kv_head, mc->n_ff);
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
  ot_serve_engine_free(e);
  return 0;
}
