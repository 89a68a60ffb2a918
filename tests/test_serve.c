/* Serving engine (serve/ot_serve_engine.h) on a small random GPT-2 with adapters of every
 * kind made in-test: KV-cache logits equal the full-sequence forward at every position; greedy
 * output equals ot_generate's for each adapter kind; mixed-adapter batches, continuous batching
 * and LRU eviction under a small budget give exactly the texts of serving alone; sampling with a
 * seed equals ot_generate's; stop strings, EOS and refusals; a LoRA-per-segment batch against
 * PyTorch (tests/ref/serve_ref.py). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ot_peft.h"
#include "ot_error.h"
#include "ot_eval.h"
#include "ot_fileio.h"
#include "ot_model.h"
#include "ot_safetensors.h"
#include "ot_serve_engine.h"
#include "ot_serve_request.h"
#include "ot_test_util.h"
#include "serve.pb-c.h"
#include "serve_fixture.h"

#define LOGIT_TOL 1e-4 /* relative, per position */

static int setup(void **state) {
  (void)state;
  return serve_fixture_setup("serve");
}

static int teardown(void **state) {
  (void)state;
  return serve_fixture_teardown();
}

/* Everything a request's events carried. */
typedef struct {
  int32_t toks[128];
  int n;
  float *logits; /* [128, V] */
  char text[1024];
  size_t text_len;
  int done;
  ot_finish_reason reason;
  int error;
} sink;

static void on_event(void *user, const ot_serve_event *ev) {
  sink *s = user;
  for (int i = 0; i < ev->n_tokens && s->n < 128; i++) {
    if (s->logits && ev->logits)
      memcpy(s->logits + (size_t)s->n * ev->vocab, ev->logits, ev->vocab * sizeof(float));
    s->toks[s->n++] = ev->tokens[i];
  }
  assert_true(s->text_len + ev->text_len < sizeof s->text);
  memcpy(s->text + s->text_len, ev->text, ev->text_len);
  s->text_len += ev->text_len;
  if (ev->finished) {
    assert_false(s->done);
    s->done = 1;
    s->reason = ev->reason;
    s->error = ev->error;
  }
}

static void submit(ot_serve_engine *e, const char *model, const char *prompt, int max_tokens, sink *s) {
  size_t n = 0;
  int32_t *ids = encode(prompt, &n);
  ot_serve_request r = {model, ids, n, max_tokens, 0.0f, 1.0f, 0, 0, {NULL}, 0, 0.0f, 0.0f, NULL, 0};
  int rc = ot_serve_submit(e, &r, on_event, s, NULL);
  if (rc) fail_msg("submit %s: %s", model, ot_error_detail());
  free(ids);
}

static void run_all(ot_serve_engine *e) {
  int busy = 1, guard = 0;
  while (busy) {
    assert_int_equal(ot_serve_step(e, &busy), 0);
    assert_true(++guard < 100000);
  }
}

static void check_same(const sink *s, int k, int p) {
  assert_true(s->done);
  if (s->n != GEN || memcmp(s->toks, want[k][p], GEN * sizeof(int32_t)) != 0)
    fail_msg("model '%s' prompt %d: the engine's %d tokens differ from ot_generate's", models[k], p, s->n);
  assert_int_equal(s->reason, OT_FINISH_LENGTH);
}

/* KV-cache logits of every generated position, all models in one batch with chunked prefills,
 * against the full-sequence forward of the adapter-applied model. */
static void test_kv_logits(void **state) {
  (void)state;
  ot_serve_engine *e = engine(8, 16, 0, -1);
  static sink s[N_MODELS];
  int V = 256, P = 2; /* the long prompt: prefill in 3 chunks */
  for (int k = 0; k < N_MODELS; k++) {
    memset(&s[k], 0, sizeof s[k]);
    s[k].logits = malloc((size_t)128 * V * sizeof(float));
    submit(e, models[k], prompts[P], 26, &s[k]);
  }
  run_all(e);
  size_t n = 0;
  int32_t *prompt = encode(prompts[P], &n);
  float *full = malloc((size_t)64 * V * sizeof(float));
  double worst = 0.0;
  for (int k = 0; k < N_MODELS; k++) {
    assert_int_equal(s[k].n, 26);
    int32_t ids[64];
    memcpy(ids, prompt, n * sizeof(int32_t));
    memcpy(ids + n, s[k].toks, 26 * sizeof(int32_t));
    int T = (int)n + 25; /* the last token's logits are never needed */
    assert_int_equal(ot_model_forward_logits(ref[k], ids, 1, T, full), 0);
    for (int j = 0; j < 26; j++) {
      double err = ot_test_rel_err(s[k].logits + (size_t)j * V, full + (size_t)(n - 1 + j) * V, (size_t)V);
      if (err > worst) worst = err;
      if (!(err <= LOGIT_TOL))
        fail_msg("model '%s' position %zu: relative error %.3g", models[k], n - 1 + j, err);
    }
    free(s[k].logits);
  }
  printf("KV-cache logits vs full forward: worst relative error %.3g over %d models x 26 positions\n", worst,
         N_MODELS);
  free(full);
  free(prompt);
  ot_serve_engine_free(e);
}

/* One request at a time: greedy output equals ot_generate's for every adapter kind. */
static void test_greedy_alone(void **state) {
  (void)state;
  ot_serve_engine *e = engine(1, 64, 0, -1);
  for (int k = 0; k < N_MODELS; k++)
    for (int p = 0; p < N_PROMPTS; p++) {
      sink s;
      memset(&s, 0, sizeof s);
      submit(e, models[k], prompts[p], GEN, &s);
      run_all(e);
      check_same(&s, k, p);
      /* the byte tokenizer's text is the tokens */
      assert_int_equal(s.text_len, GEN);
      for (int i = 0; i < GEN; i++) assert_int_equal((unsigned char)s.text[i], s.toks[i]);
    }
  ot_serve_engine_free(e);
}

/* Every model and prompt in one batch: the same tokens as alone. */
static void test_mixed_batch(void **state) {
  (void)state;
  ot_serve_engine *e = engine(32, 512, 0, -1);
  static sink s[N_MODELS][N_PROMPTS];
  memset(s, 0, sizeof s);
  for (int p = 0; p < N_PROMPTS; p++)
    for (int k = 0; k < N_MODELS; k++) submit(e, models[k], prompts[p], GEN, &s[k][p]);
  run_all(e);
  for (int k = 0; k < N_MODELS; k++)
    for (int p = 0; p < N_PROMPTS; p++) check_same(&s[k][p], k, p);
  ot_serve_stats st;
  ot_serve_get_stats(e, &st);
  assert_int_equal(st.loads, N_MODELS - 1);
  assert_int_equal(st.tokens_generated, N_MODELS * N_PROMPTS * GEN);
  /* one batch: every decode step computed all 21 rows together */
  assert_true(st.steps <= GEN + 1);
  ot_serve_engine_free(e);
}

/* Requests join mid-flight (small batch, chunked prefills next to decodes). */
static void test_continuous(void **state) {
  (void)state;
  ot_serve_engine *e = engine(5, 12, 0, -1);
  static sink s[N_MODELS][N_PROMPTS];
  memset(s, 0, sizeof s);
  int next = 0, busy = 1, steps = 0;
  while (next < N_MODELS * N_PROMPTS || busy) {
    /* 2 new requests every 3 steps */
    if (steps % 3 == 0)
      for (int j = 0; j < 2 && next < N_MODELS * N_PROMPTS; j++, next++)
        submit(e, models[next % N_MODELS], prompts[next / N_MODELS], GEN,
               &s[next % N_MODELS][next / N_MODELS]);
    assert_int_equal(ot_serve_step(e, &busy), 0);
    assert_true(++steps < 10000);
  }
  for (int k = 0; k < N_MODELS; k++)
    for (int p = 0; p < N_PROMPTS; p++) check_same(&s[k][p], k, p);
  ot_serve_engine_free(e);
}

/* A budget that holds about two adapters: loads and evictions, same texts; an adapter larger
 * than the whole budget is refused. */
static void test_lru(void **state) {
  (void)state;
  size_t C = 32, offsite = 2 * (12 * C * C + 13 * C + 12 * 16) * sizeof(float);
  ot_serve_engine *e = engine(3, 64, offsite * 3 / 2, -1);
  static sink s[N_MODELS][N_PROMPTS];
  memset(s, 0, sizeof s);
  for (int p = 0; p < N_PROMPTS; p++)
    for (int k = 0; k < N_MODELS; k++) submit(e, models[k], prompts[p], GEN, &s[k][p]);
  run_all(e);
  for (int k = 0; k < N_MODELS; k++)
    for (int p = 0; p < N_PROMPTS; p++) check_same(&s[k][p], k, p);
  ot_serve_stats st;
  ot_serve_get_stats(e, &st);
  printf("LRU: %llu loads, %llu evictions, %zu bytes resident (budget %zu)\n", (unsigned long long)st.loads,
         (unsigned long long)st.evictions, st.adapter_bytes, offsite * 3 / 2);
  assert_true(st.evictions > 0);
  assert_true(st.loads > N_MODELS - 1);
  assert_true(st.adapter_bytes <= offsite * 3 / 2);
  ot_serve_engine_free(e);

  e = engine(2, 64, 1000, -1);
  sink big, small;
  memset(&big, 0, sizeof big);
  memset(&small, 0, sizeof small);
  submit(e, "off1", prompts[0], GEN, &big);
  submit(e, "", prompts[0], GEN, &small);
  run_all(e);
  assert_int_equal(big.reason, OT_FINISH_ERROR);
  assert_int_equal(big.error, OT_ERR_RANGE);
  check_same(&small, 0, 0);
  ot_serve_engine_free(e);
}

/* Temperature + top-p with a seed draws what ot_generate draws; top-k 1 is greedy. */
static void test_sampling(void **state) {
  (void)state;
  ot_serve_engine *e = engine(4, 64, 0, -1);
  for (int k = 0; k < N_MODELS; k += 3) {
    size_t n = 0, n_out = 0;
    int32_t *ids = encode(prompts[0], &n), *out = NULL;
    ot_sample_config sc = {GEN, 0.9f, 0.95f, 1234};
    assert_int_equal(ot_generate(ref[k], ids, n, &sc, &out, &n_out), 0);
    ot_serve_request r = {models[k], ids, n, GEN, 0.9f, 0.95f, 0, 1234, {NULL}, 0, 0.0f, 0.0f, NULL, 0};
    ot_serve_result res;
    assert_int_equal(ot_serve_generate(e, &r, &res), 0);
    assert_int_equal(res.n_tokens, GEN);
    assert_memory_equal(res.tokens, out + n, GEN * sizeof(int32_t));
    ot_serve_result_free(&res);
    r.top_k = 1;
    r.temperature = 1.0f;
    r.top_p = 1.0f;
    assert_int_equal(ot_serve_generate(e, &r, &res), 0);
    assert_memory_equal(res.tokens, want[k][0], GEN * sizeof(int32_t));
    ot_serve_result_free(&res);
    free(ids);
    free(out);
  }
  ot_serve_engine_free(e);
}

/* Stop strings cut the text before them (and never leak in a delta); EOS ends without showing. */
static void test_stop_eos(void **state) {
  (void)state;
  int k = 3, p = 0;
  char full[GEN + 1];
  for (int i = 0; i < GEN; i++) full[i] = (char)want[k][p][i];
  full[GEN] = '\0';
  /* a 3-byte stop string from the middle of the greedy text (no NUL byte: a C string) */
  int at = 8;
  while (at + 3 <= GEN && (!full[at] || !full[at + 1] || !full[at + 2])) at++;
  if (at + 3 > GEN) {
    printf("SKIP test_stop_eos: the greedy text has no 3 non-NUL bytes in a row after byte 8\n");
    skip();
  }
  char stop[4];
  memcpy(stop, full + at, 3);
  stop[3] = '\0';
  size_t cut = 0;
  while (memcmp(full + cut, stop, 3) != 0) cut++;
  ot_serve_engine *e = engine(2, 64, 0, -1);
  size_t n = 0;
  int32_t *ids = encode(prompts[p], &n);
  ot_serve_request r = {models[k], ids, n, GEN, 0.0f, 1.0f, 0, 0, {stop, NULL}, 0, 0.0f, 0.0f, NULL, 0};
  sink s;
  memset(&s, 0, sizeof s);
  assert_int_equal(ot_serve_submit(e, &r, on_event, &s, NULL), 0);
  run_all(e);
  assert_int_equal(s.reason, OT_FINISH_STOP);
  assert_int_equal(s.text_len, cut);
  assert_memory_equal(s.text, full, cut);
  ot_serve_engine_free(e);

  /* EOS: the token at position 5 ends the completion at its first occurrence */
  int32_t eos = want[k][p][5];
  int first = 0;
  while (want[k][p][first] != eos) first++;
  e = engine(2, 64, 0, eos);
  memset(&s, 0, sizeof s);
  r.stop[0] = NULL;
  assert_int_equal(ot_serve_submit(e, &r, on_event, &s, NULL), 0);
  run_all(e);
  assert_int_equal(s.reason, OT_FINISH_STOP);
  assert_int_equal(s.n, first);
  assert_int_equal(s.text_len, (size_t)first);
  /* ignore_eos goes on to max_tokens */
  memset(&s, 0, sizeof s);
  r.ignore_eos = 1;
  assert_int_equal(ot_serve_submit(e, &r, on_event, &s, NULL), 0);
  run_all(e);
  check_same(&s, k, p);
  free(ids);
  ot_serve_engine_free(e);
}

/* Refusals at submit, and adapters that fail their checks end with an error, others unaffected. */
static void test_errors(void **state) {
  (void)state;
  char path[700];
  /* a tampered copy of lora1 and an adapter for another base */
  assert_int_equal(
      ot_test_system(
          "rm -rf %s/bad && cp -r %s/lora1 %s/bad && printf 'x' | dd of=%s/bad/adapter_model.safetensors "
          "bs=1 seek=200 conv=notrunc 2>/dev/null",
          dir, dir, dir, dir),
      0);
  assert_int_equal(
      ot_test_system(
          "rm -rf %s/other && cp -r %s/lora2 %s/other && sed -i 's/%s/%064d/' %s/other/offtune_adapter.json",
          dir, dir, dir, digest, 0, dir),
      0);
  (void)path;
  ot_serve_engine *e = engine(4, 64, 0, -1);
  size_t n = 0;
  int32_t *ids = encode(prompts[0], &n);
  ot_serve_request r = {"nope", ids, n, GEN, 0.0f, 1.0f, 0, 0, {NULL}, 0, 0.0f, 0.0f, NULL, 0};
  assert_int_equal(ot_serve_submit(e, &r, on_event, NULL, NULL), OT_ERR_NOTFOUND);
  r.adapter = "";
  r.temperature = -1.0f;
  assert_int_equal(ot_serve_submit(e, &r, on_event, NULL, NULL), OT_ERR_INVALID);
  r.temperature = 0.0f;
  r.top_p = 0.0f;
  assert_int_equal(ot_serve_submit(e, &r, on_event, NULL, NULL), OT_ERR_INVALID);
  r.top_p = 1.0f;
  r.n_prompt = 0;
  assert_int_equal(ot_serve_submit(e, &r, on_event, NULL, NULL), OT_ERR_INVALID);
  int32_t longp[65] = {0};
  r.prompt = longp;
  r.n_prompt = 65;
  assert_int_equal(ot_serve_submit(e, &r, on_event, NULL, NULL), OT_ERR_RANGE);
  longp[3] = 300;
  r.n_prompt = 10;
  assert_int_equal(ot_serve_submit(e, &r, on_event, NULL, NULL), OT_ERR_RANGE);
  /* a long prompt stops at the context limit with "length" */
  longp[3] = 1;
  r.n_prompt = 60;
  r.max_tokens = 50;
  sink s[4];
  memset(s, 0, sizeof s);
  assert_int_equal(ot_serve_submit(e, &r, on_event, &s[0], NULL), 0);
  r.prompt = ids;
  r.n_prompt = n;
  r.max_tokens = GEN;
  r.adapter = "bad";
  assert_int_equal(ot_serve_submit(e, &r, on_event, &s[1], NULL), 0);
  r.adapter = "other";
  assert_int_equal(ot_serve_submit(e, &r, on_event, &s[2], NULL), 0);
  r.adapter = "lora1";
  assert_int_equal(ot_serve_submit(e, &r, on_event, &s[3], NULL), 0);
  run_all(e);
  assert_int_equal(s[0].reason, OT_FINISH_LENGTH);
  assert_int_equal(s[0].n, 64 + 1 - 60);
  assert_int_equal(s[1].reason, OT_FINISH_ERROR);
  assert_int_equal(s[1].error, OT_ERR_MISMATCH);
  assert_int_equal(s[2].reason, OT_FINISH_ERROR);
  assert_int_equal(s[2].error, OT_ERR_MISMATCH);
  check_same(&s[3], 3, 0);
  /* cancel: a queued request ends "cancelled" */
  sink c;
  memset(&c, 0, sizeof c);
  uint64_t id = 0;
  assert_int_equal(ot_serve_submit(e, &r, on_event, &c, &id), 0);
  ot_serve_cancel(e, id);
  run_all(e);
  assert_int_equal(c.reason, OT_FINISH_CANCELLED);
  free(ids);
  ot_serve_engine_free(e);
}

/* Engine thread: concurrent blocking generations from several threads. */
#include <pthread.h>
/* Adapter directories whose files are devices, FIFOs or huge (issue 14: /dev/zero as the
 * tensors hung the engine for every tenant). Each request fails at once with its own error;
 * the base model and a good adapter in the same batch are served as usual. */
static void test_hostile_adapter_files(void **state) {
  (void)state;
  const char *setup_sh = "cd %s && rm -rf zero urand fifo huge cfgdir && "
                         "for d in zero urand fifo huge cfgdir; do cp -r lora1 $d; done && "
                         "ln -sf /dev/zero zero/adapter_model.safetensors && "
                         "ln -sf /dev/urandom urand/adapter_model.safetensors && "
                         "rm fifo/adapter_config.json && mkfifo fifo/adapter_config.json && "
                         "truncate -s 4G huge/adapter_model.safetensors && "
                         "rm cfgdir/adapter_config.json && mkdir cfgdir/adapter_config.json";
  assert_int_equal(ot_test_system(setup_sh, dir), 0);
  const char *names[] = {"zero", "urand", "fifo", "huge", "cfgdir"};
  const int want_err[] = {OT_ERR_IO, OT_ERR_IO, OT_ERR_IO, OT_ERR_RANGE, OT_ERR_IO};
  enum { NH = 5 };
  ot_serve_engine *e = engine(8, 64, 0, -1);
  size_t n = 0;
  int32_t *ids = encode(prompts[0], &n);
  ot_serve_request r = {"", ids, n, GEN, 0.0f, 1.0f, 0, 0, {NULL}, 0, 0.0f, 0.0f, NULL, 0};
  sink s[NH + 2];
  memset(s, 0, sizeof s);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < NH; i++) {
    r.adapter = names[i];
    assert_int_equal(ot_serve_submit(e, &r, on_event, &s[i], NULL), 0);
  }
  r.adapter = "";
  assert_int_equal(ot_serve_submit(e, &r, on_event, &s[NH], NULL), 0);
  r.adapter = "lora1";
  assert_int_equal(ot_serve_submit(e, &r, on_event, &s[NH + 1], NULL), 0);
  run_all(e);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double secs = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  printf("hostile adapter files refused, base and lora1 served, in %.3f s\n", secs);
  for (int i = 0; i < NH; i++) {
    if (s[i].reason != OT_FINISH_ERROR || s[i].error != want_err[i])
      fail_msg("%s: finish %d error %d (wanted error %d)", names[i], s[i].reason, s[i].error, want_err[i]);
  }
  check_same(&s[NH], 0, 0);
  check_same(&s[NH + 1], 3, 0);
  assert_true(secs < 5.0);
  free(ids);
  ot_serve_engine_free(e);
  assert_int_equal(ot_test_system("cd %s && rm -rf zero urand fifo huge cfgdir", dir), 0);
}

typedef struct {
  ot_serve_engine *e;
  int k, p, ok;
} job;
static void *job_main(void *arg) {
  job *j = arg;
  size_t n = 0;
  int32_t *ids = NULL;
  if (ot_tokenizer_encode(tok, prompts[j->p], strlen(prompts[j->p]), &ids, &n)) return NULL;
  ot_serve_request r = {models[j->k], ids, n, GEN, 0.0f, 1.0f, 0, 0, {NULL}, 0, 0.0f, 0.0f, NULL, 0};
  ot_serve_result res;
  if (ot_serve_generate(j->e, &r, &res) == OT_OK) {
    j->ok = res.n_tokens == GEN && memcmp(res.tokens, want[j->k][j->p], GEN * sizeof(int32_t)) == 0;
    ot_serve_result_free(&res);
  }
  free(ids);
  return NULL;
}

static void test_thread(void **state) {
  (void)state;
  ot_serve_engine *e = engine(8, 64, 0, -1);
  assert_int_equal(ot_serve_start(e), 0);
  job jobs[N_MODELS * N_PROMPTS];
  pthread_t th[N_MODELS * N_PROMPTS];
  for (int i = 0; i < N_MODELS * N_PROMPTS; i++) {
    jobs[i] = (job){e, i % N_MODELS, i / N_MODELS, 0};
    assert_int_equal(pthread_create(&th[i], NULL, job_main, &jobs[i]), 0);
  }
  for (int i = 0; i < N_MODELS * N_PROMPTS; i++) {
    pthread_join(th[i], NULL);
    if (!jobs[i].ok) fail_msg("threaded request %s/%d differs", models[jobs[i].k], jobs[i].p);
  }
  ot_serve_engine_free(e);
}

/* PyTorch float64: three rows in one batch, LoRA adapters lora1 and lora2 on two of them and
 * the base on the third; the engine's logits at every generated position. */
static void test_torch_lora(void **state) {
  (void)state;
  ot_serve_engine *e = engine(4, 64, 0, -1);
  const char *names[3] = {"lora1", "", "lora2"};
  static sink s[3];
  int V = 256, G = 12;
  for (int i = 0; i < 3; i++) {
    memset(&s[i], 0, sizeof s[i]);
    s[i].logits = malloc((size_t)128 * V * sizeof(float));
    submit(e, names[i], prompts[i], G, &s[i]);
  }
  run_all(e);
  /* inputs for the reference: each row's full token sequence and adapter */
  char path[700];
  snprintf(path, sizeof path, "%s/serve_rows.json", dir);
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fprintf(f, "{\"digest\": \"%s\", \"rows\": [", digest);
  for (int i = 0; i < 3; i++) {
    size_t n = 0;
    int32_t *ids = encode(prompts[i], &n);
    fprintf(f, "%s{\"adapter\": \"%s\", \"n_prompt\": %zu, \"ids\": [", i ? ", " : "", names[i], n);
    for (size_t j = 0; j < n; j++) fprintf(f, "%s%d", j ? ", " : "", ids[j]);
    for (int j = 0; j < G; j++) fprintf(f, ", %d", s[i].toks[j]);
    fprintf(f, "]}");
    free(ids);
  }
  fprintf(f, "]}\n");
  fclose(f);
  assert_int_equal(ot_test_ref("serve_ref.py", dir), 0);
  snprintf(path, sizeof path, "%s/serve_ref.safetensors", dir);
  ot_safetensors *st = NULL;
  assert_int_equal(ot_st_open(path, &st), 0);
  double worst = 0.0;
  for (int i = 0; i < 3; i++) {
    char name[32];
    snprintf(name, sizeof name, "logits.%d", i);
    size_t cnt = 0;
    float *want_l = ot_test_st_f32(st, name, &cnt);
    assert_int_equal(cnt, (size_t)G * V);
    assert_int_equal(s[i].n, G);
    for (int j = 0; j < G; j++) {
      double err = ot_test_rel_err(s[i].logits + (size_t)j * V, want_l + (size_t)j * V, (size_t)V);
      if (err > worst) worst = err;
      if (!(err <= LOGIT_TOL))
        fail_msg("row %d (%s) step %d: relative error %.3g vs torch", i, names[i], j, err);
    }
    free(want_l);
    free(s[i].logits);
  }
  printf("LoRA per segment vs PyTorch float64: worst relative error %.3g (tolerance %g)\n", worst, LOGIT_TOL);
  ot_st_close(st);
  ot_serve_engine_free(e);
}

/* The serving ops against the training ops they replace: attention_kv_fwd in two calls (a
 * chunked prefill, rows of two sequences interleaved, slots 3 and 1) = attention_fwd over the
 * whole sequences; embed_fwd at explicit positions = encoder_fwd; lora_sgmv_fwd = lora_fwd on
 * each segment. */
static void test_kv_ops(void **state) {
  (void)state;
  enum { B = 2, T = 13, C = 32, NH = 4, SLOTS = 4, TMAX = 16 };
  const ot_backend_ops *o = be->ops;
  float *qkv = malloc(sizeof(float) * B * T * 3 * C), *ref_out = malloc(sizeof(float) * B * T * C),
        *att = malloc(sizeof(float) * B * NH * T * T), *out = malloc(sizeof(float) * B * T * C),
        *kc = calloc(SLOTS * TMAX * C, sizeof(float)), *vc = calloc(SLOTS * TMAX * C, sizeof(float)),
        *rows = malloc(sizeof(float) * B * T * 3 * C), *o2 = malloc(sizeof(float) * B * T * C);
  uint64_t x = 99;
  for (int i = 0; i < B * T * 3 * C; i++) {
    x = x * 6364136223846793005ull + 1;
    qkv[i] = (float)((double)(x >> 11) / 9007199254740992.0 - 0.5) * 4.0f;
  }
  o->attention_fwd(be, ref_out, att, qkv, B, T, C, NH);
  /* rows in the order a step sends them: interleaved sequences, chunk 0..6 then 7..12 */
  const int32_t slot_of[B] = {3, 1};
  int32_t pos[B * T], slot[B * T];
  int n = 0, map[B * T];
  for (int chunk = 0; chunk < 2; chunk++) {
    int n0 = n;
    for (int t = chunk ? 7 : 0; t < (chunk ? T : 7); t++)
      for (int b = 0; b < B; b++) {
        memcpy(rows + (size_t)n * 3 * C, qkv + ((size_t)b * T + t) * 3 * C, sizeof(float) * 3 * C);
        pos[n] = t;
        slot[n] = slot_of[b];
        map[n++] = b * T + t;
      }
    o->attention_kv_fwd(be, o2 + (size_t)n0 * C, kc, vc, rows + (size_t)n0 * 3 * C, pos + n0, slot + n0,
                        n - n0, C, NH, TMAX);
  }
  for (int i = 0; i < n; i++) memcpy(out + (size_t)map[i] * C, o2 + (size_t)i * C, sizeof(float) * C);
  double err = ot_test_rel_err(out, ref_out, (size_t)B * T * C);
  printf("attention_kv_fwd vs attention_fwd: relative error %.3g\n", err);
  assert_true(err < 1e-6);
  /* embed_fwd = encoder_fwd when positions are 0..T-1 per row */
  int32_t toks[B * T], p2[B * T];
  for (int i = 0; i < B * T; i++) {
    toks[i] = (i * 37) % 256;
    p2[i] = i % T;
  }
  const float *wte = ot_model_find_param(base, "transformer.wte.weight")->data,
              *wpe = ot_model_find_param(base, "transformer.wpe.weight")->data;
  o->encoder_fwd(be, ref_out, toks, wte, wpe, B, T, C);
  o->embed_fwd(be, out, toks, p2, wte, wpe, B * T, C);
  assert_memory_equal(out, ref_out, sizeof(float) * B * T * C);

  /* lora_sgmv_fwd = lora_fwd per segment: segments of 3, 1 and 7 rows (a gap between the first
   * two), ranks 4, 70 (over the op's 64-rank chunk) and 1 */
  enum { N = 14, IN = 24, OUT = 40 };
  const int row0[3] = {0, 4, 7}, nr[3] = {3, 1, 7}, rk[3] = {4, 70, 1};
  const float sc[3] = {2.0f, 0.5f, -1.0f};
  float *xs = malloc(sizeof(float) * N * IN), *y1 = malloc(sizeof(float) * N * OUT),
        *y2 = malloc(sizeof(float) * N * OUT), *tt = malloc(sizeof(float) * N * 70), *Am[3], *Bm[3], *Btm[3];
  for (int i = 0; i < N * IN; i++) xs[i] = qkv[i];
  for (int i = 0; i < N * OUT; i++) y1[i] = y2[i] = qkv[i + 7];
  for (int k = 0; k < 3; k++) {
    Am[k] = malloc(sizeof(float) * rk[k] * IN);
    Bm[k] = malloc(sizeof(float) * OUT * rk[k]);
    Btm[k] = malloc(sizeof(float) * rk[k] * OUT);
    for (int i = 0; i < rk[k] * IN; i++) Am[k][i] = qkv[(i * 7 + k) % (B * T * 3 * C)];
    for (int o2i = 0; o2i < OUT; o2i++)
      for (int c = 0; c < rk[k]; c++)
        Bm[k][o2i * rk[k] + c] = Btm[k][c * OUT + o2i] = qkv[(o2i * 13 + c * 5 + k) % 999];
    o->lora_fwd(be, y1 + (size_t)row0[k] * OUT, tt, NULL, xs + (size_t)row0[k] * IN, Am[k], Bm[k], nr[k], IN,
                OUT, rk[k], sc[k], 0.0f, 0);
  }
  o->lora_sgmv_fwd(be, y2, xs, (const float *const *)Am, (const float *const *)Btm, row0, nr, rk, sc, 3, IN,
                   OUT);
  err = ot_test_rel_err(y2, y1, (size_t)N * OUT);
  printf("lora_sgmv_fwd vs lora_fwd per segment: relative error %.3g\n", err);
  assert_true(err < 1e-6);
  for (int i = 3 * OUT; i < 4 * OUT; i++) assert_true(y2[i] == qkv[i + 7]); /* the gap row is untouched */
  for (int k = 0; k < 3; k++) {
    free(Am[k]);
    free(Bm[k]);
    free(Btm[k]);
  }
  free(xs);
  free(y1);
  free(y2);
  free(tt);
  free(qkv);
  free(ref_out);
  free(att);
  free(out);
  free(kc);
  free(vc);
  free(rows);
  free(o2);
}

/* Request parsers without a server (fuzz_http_request, fuzz_messages): numbers no int holds are
 * refused, never converted (undefined behaviour); a GenerateRequest's stop strings are bounded
 * as over HTTP, since the engine scans each at every token for every tenant. */
static void test_hostile_requests(void **state) {
  (void)state;
  ot_serve_parse_cfg pc = {.tok = NULL, .base_name = "base", .eos_id = -1, .max_prompts = 1};
  ot_serve_completion c;
  ot_serve_req_error e;
  static const char *bodies[] = {"{\"prompt\":[1],\"max_tokens\":1e20}", "{\"prompt\":[1],\"top_k\":-3e9}",
                                 "{\"prompt\":[1e20]}", "{\"prompt\":[1,2147483648]}"};
  for (int i = 0; i < 4; i++) {
    assert_int_equal(ot_serve_parse_completion(bodies[i], strlen(bodies[i]), &pc, &c, &e), OT_ERR_INVALID);
    assert_int_equal(e.status, 400);
  }
  const char *ok = "{\"prompt\":[1,2147483647],\"max_tokens\":1000000}";
  assert_int_equal(ot_serve_parse_completion(ok, strlen(ok), &pc, &c, &e), OT_OK);
  assert_int_equal(c.prompts[0].ids[1], 2147483647);
  ot_serve_completion_free(&c);

  char long_stop[OT_SERVE_STOP_LEN + 1];
  memset(long_stop, 'x', sizeof long_stop - 1);
  long_stop[OT_SERVE_STOP_LEN] = '\0';
  for (int n = OT_SERVE_STOP_LEN - 1; n <= OT_SERVE_STOP_LEN; n++) {
    char *stops[2] = {"\n", long_stop + (OT_SERVE_STOP_LEN - n)};
    int32_t ids[1] = {1};
    Offtune__GenerateRequest g = OFFTUNE__GENERATE_REQUEST__INIT;
    g.adapter = "base"; /* the base model's own name means the base */
    g.n_prompt_ids = 1;
    g.prompt_ids = ids;
    g.n_stop = 2;
    g.stop = stops;
    uint8_t buf[1024];
    size_t len = offtune__generate_request__pack(&g, buf);
    struct Offtune__GenerateRequest *q = NULL;
    ot_serve_request sr;
    int32_t *out = NULL;
    int rc = ot_serve_generate_decode(buf, len, &pc, &q, &sr, &out);
    assert_non_null(q); /* answered either way */
    if (n < OT_SERVE_STOP_LEN) {
      assert_int_equal(rc, OT_OK);
      assert_string_equal(sr.adapter, "");
      assert_int_equal(strlen(sr.stop[1]), n);
    } else {
      assert_int_equal(rc, OT_ERR_INVALID);
    }
    free(out);
    offtune__generate_request__free_unpacked(q, NULL);
  }
}

/* logit_bias and the presence/frequency penalties: the math against PyTorch
 * (tests/ref/penalty_ref.py), then the engine's greedy output with them against a step-by-step
 * reference: the raw next-token logits of prompt + completion so far (the engine, one token,
 * nothing applied), adjusted with counts made here the slow way, then argmax. */
static void raw_logits_cb(void *user, const ot_serve_event *ev) {
  float *dst = user;
  if (ev->n_tokens > 0 && ev->logits) memcpy(dst, ev->logits, (size_t)ev->vocab * sizeof(float));
}

static void test_penalties(void **state) {
  (void)state;
  char *d = ot_test_tmpdir("serve_penalty");
  enum { V = 40, N_CASES = 3 };
  float logits[N_CASES][V];
  int32_t completion[N_CASES][12] = {{3, 5, 3, 3, 7, 39, 0, 5, 3, 1, 1, 2}, {1, 1, 1, 1}, {0}};
  int n_comp[N_CASES] = {12, 4, 0};
  float pres[N_CASES] = {0.7f, -1.5f, 2.0f}, freq[N_CASES] = {0.3f, 2.0f, -0.5f};
  ot_serve_logit_bias bias[N_CASES][3] = {
      {{5, -100.0f}, {39, 2.5f}, {11, 100.0f}}, {{1, 1.0f}}, {{0, -3.0f}}};
  int n_bias[N_CASES] = {3, 1, 1};
  uint64_t rng = 7;
  char path[800];
  snprintf(path, sizeof path, "%s/penalty_in.json", d);
  FILE *f = fopen(path, "w");
  fprintf(f, "[");
  for (int c = 0; c < N_CASES; c++) {
    fprintf(f, "%s{\"logits\": [", c ? ", " : "");
    for (int j = 0; j < V; j++) {
      rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
      logits[c][j] = (float)((double)(rng >> 40) / (double)(1 << 24) * 8.0 - 4.0);
      fprintf(f, "%s%.9g", j ? ", " : "", logits[c][j]);
    }
    fprintf(f, "], \"completion\": [");
    for (int i = 0; i < n_comp[c]; i++) fprintf(f, "%s%d", i ? ", " : "", completion[c][i]);
    fprintf(f, "], \"presence\": %.9g, \"frequency\": %.9g, \"bias\": [", pres[c], freq[c]);
    for (int i = 0; i < n_bias[c]; i++)
      fprintf(f, "%s[%d, %.9g]", i ? ", " : "", bias[c][i].token, bias[c][i].bias);
    fprintf(f, "]}");
  }
  fprintf(f, "]");
  fclose(f);
  assert_int_equal(ot_test_ref("penalty_ref.py", d), 0);
  snprintf(path, sizeof path, "%s/penalty_out.json", d);
  f = fopen(path, "r");
  char buf[16384];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = '\0';
  fclose(f);
  cJSON *want_j = cJSON_Parse(buf);
  assert_non_null(want_j);
  int count[V] = {0};
  for (int c = 0; c < N_CASES; c++) {
    ot_serve_adjust_logits(logits[c], V, completion[c], n_comp[c], pres[c], freq[c], bias[c], n_bias[c],
                           count);
    for (int j = 0; j < V; j++) {
      assert_int_equal(count[j], 0); /* the scratch is left zero */
      double w = cJSON_GetArrayItem(cJSON_GetArrayItem(want_j, c), j)->valuedouble;
      if (fabs(logits[c][j] - w) > 1e-4 * (1 + fabs(w)))
        fail_msg("case %d token %d: %g, PyTorch %g", c, j, logits[c][j], w);
    }
  }
  cJSON_Delete(want_j);
  free(d);

  /* the engine, greedy, for a LoRA adapter and the base */
  ot_serve_engine *e = engine(4, 64, 0, -1);
  const int Vm = ot_model_cfg(base)->vocab_size;
  float *raw = malloc((size_t)Vm * sizeof(float));
  for (int k = 0; k < N_MODELS; k += 3) {
    size_t np = 0;
    int32_t *ids = encode(prompts[1], &np);
    int32_t seq[256];
    memcpy(seq, ids, np * sizeof *seq);
    ot_serve_logit_bias lb[2] = {{'e', 4.0f}, {' ', -2.5f}};
    ot_serve_request r = {.adapter = models[k],
                          .prompt = ids,
                          .n_prompt = np,
                          .max_tokens = GEN,
                          .top_p = 1.0f,
                          .presence_penalty = 1.2f,
                          .frequency_penalty = 0.8f,
                          .logit_bias = lb,
                          .n_logit_bias = 2};
    ot_serve_result res;
    assert_int_equal(ot_serve_generate(e, &r, &res), 0);
    assert_int_equal(res.n_tokens, GEN);
    int differs = 0;
    for (int t = 0; t < GEN; t++) {
      ot_serve_request one = {
          .adapter = models[k], .prompt = seq, .n_prompt = np + (size_t)t, .max_tokens = 1, .top_p = 1.0f};
      uint64_t id;
      assert_int_equal(ot_serve_submit(e, &one, raw_logits_cb, raw, &id), 0);
      int busy = 1;
      while (busy) assert_int_equal(ot_serve_step(e, &busy), 0);
      int best = 0;
      double best_v = -1e300;
      for (int j = 0; j < Vm; j++) {
        int c = 0;
        for (int i = 0; i < t; i++) c += seq[np + (size_t)i] == j;
        double v = raw[j] - 0.8 * c - (c > 0 ? 1.2 : 0.0) + (j == 'e' ? 4.0 : j == ' ' ? -2.5 : 0.0);
        if (v > best_v) {
          best_v = v;
          best = j;
        }
      }
      seq[np + (size_t)t] = best;
      differs |= best != want[k][1][t];
    }
    assert_memory_equal(res.tokens, seq + np, GEN * sizeof(int32_t));
    assert_true(differs); /* the adjustments changed the greedy text */
    ot_serve_result_free(&res);
    /* refused: a penalty out of range, a bias for a token outside the vocabulary */
    r.presence_penalty = 2.5f;
    assert_int_equal(ot_serve_generate(e, &r, &res), OT_ERR_INVALID);
    r.presence_penalty = 0;
    lb[1].token = Vm;
    assert_int_equal(ot_serve_generate(e, &r, &res), OT_ERR_RANGE);
    free(ids);
  }
  free(raw);
  ot_serve_engine_free(e);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_kv_ops),           cmocka_unit_test(test_kv_logits),
      cmocka_unit_test(test_greedy_alone),     cmocka_unit_test(test_mixed_batch),
      cmocka_unit_test(test_continuous),       cmocka_unit_test(test_lru),
      cmocka_unit_test(test_sampling),         cmocka_unit_test(test_stop_eos),
      cmocka_unit_test(test_errors),           cmocka_unit_test(test_hostile_adapter_files),
      cmocka_unit_test(test_thread),           cmocka_unit_test(test_torch_lora),
      cmocka_unit_test(test_hostile_requests), cmocka_unit_test(test_penalties),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
