/* offtune-cloud eval, generate and tokenize. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_error.h"
#include "ot_data.h"
#include "ot_peft.h"
#include "ot_eval.h"
#include "ot_task.h"

#define N_OPTS(o) ((int)(sizeof(o) / sizeof((o)[0])))

int ot_cmd_eval(int argc, char **argv) {
  const char *model = NULL, *text = NULL, *tokens = NULL, *backend = "cpu", *adapter = NULL, *task = NULL,
             *details = NULL;
  int seq_len = 0, batch = 8, json = 0, threads = 0;
  const ot_opt opts[] = {
      {"model", OT_OPT_STR, &model, "DIR",
       "checkpoint directory (config.json, model.safetensors; tokenizer files for --text)"},
      {"adapter", OT_OPT_STR, &adapter, "DIR",
       "plug in an adapter of any kind (from offtune-device tune) first"},
      {"text", OT_OPT_STR, &text, "FILE",
       "UTF-8 text to score (tokenized with the model's tokenizer); a .jsonl file of examples is scored on "
       "its completions"},
      {"tokens", OT_OPT_STR, &tokens, "FILE", "whitespace-separated token ids to score"},
      {"task", OT_OPT_STR, &task, "FILE",
       "task items (JSONL: multiple_choice, cloze, generate; docs/tasks.md): accuracy instead of perplexity"},
      {"details", OT_OPT_STR, &details, "FILE", "with --task: one JSON line per item (scores, prediction)"},
      {"seq-len", OT_OPT_INT, &seq_len, "T", "window length (default: the model's n_positions)"},
      {"batch", OT_OPT_INT, &batch, "B", "windows scored at once (default 8)"},
      {"json", OT_OPT_FLAG, &json, NULL,
       "print {\"loss\", \"perplexity\", \"tokens\"} (with --task: {\"n\", per kind its metrics and "
       "standard errors}) as one JSON object"},
      {"backend", OT_OPT_STR, &backend, "NAME", "cpu (default) or cuda"},
      {"threads", OT_OPT_INT, &threads, "N", "CPU threads (default: all cores)"},
  };
  const char *syn = "offtune-cloud eval --model DIR [--adapter DIR] (--text FILE | --tokens FILE | --task "
                    "FILE) [--seq-len T] "
                    "[--json]";
  const char *desc = "Scores the token stream in non-overlapping windows of T: window k has inputs\n"
                     "tokens[kT : kT+T] and targets tokens[kT+1 : kT+T+1]; the last window may be shorter.\n"
                     "Prints the mean negative log-likelihood per target token (nats) and the perplexity.";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, desc, opts, N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && !model) rc = ot_error(OT_ERR_INVALID, "--model is required");
  if (rc == OT_OK && batch < 1) rc = ot_error(OT_ERR_INVALID, "--batch must be >= 1");
  if (rc == OT_OK && seq_len < 0) rc = ot_error(OT_ERR_INVALID, "--seq-len must be >= 1");
  if (rc == OT_OK && !!text + !!tokens + !!task != 1)
    rc = ot_error(OT_ERR_INVALID, "give exactly one of --text, --tokens or --task");
  if (rc == OT_OK && details && !task) rc = ot_error(OT_ERR_INVALID, "--details goes with --task");
  if (rc) {
    fprintf(stderr, "offtune-cloud eval: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_backend *be;
  ot_model *m;
  ot_tokenizer *tok;
  rc = ot_cmd_load_model(model, backend, threads, &be, &m, &tok);
  if (rc) return ot_cmd_fail("loading the model", rc);
  if (adapter) {
    char digest[OT_DIGEST_HEX];
    rc = ot_model_dir_digest(model, digest);
    if (rc == OT_OK) rc = ot_peft_apply_full(m, digest, adapter);
    if (rc) {
      ot_tokenizer_free(tok);
      ot_model_free(m);
      ot_backend_free(be);
      return ot_cmd_fail("plugging in the adapter", rc);
    }
  }
  if (task) {
    ot_task_result tr;
    const char *what = NULL;
    rc = ot_task_eval_file(m, tok, model, task, details, batch, stderr, &tr, &what);
    ot_tokenizer_free(tok);
    ot_model_free(m);
    ot_backend_free(be);
    if (rc) return ot_cmd_fail(what, rc);
    ot_task_print(stdout, &tr, json);
    return OT_EXIT_OK;
  }
  ot_tokens toks = {NULL, 0, NULL};
  int T = seq_len ? seq_len : ot_model_cfg(m)->n_positions;
  ot_eval_result res;
  rc = text ? ot_tokenizer_require(tok, model, "give token ids with --tokens FILE") : OT_OK;
  if (rc == OT_OK) rc = ot_tokens_load_input(text, tokens, tok, ot_model_cfg(m)->vocab_size, &toks);
  const char *what = "reading the input";
  if (rc == OT_OK) {
    what = "scoring";
    rc = ot_eval_input(m, &toks, T, batch, stderr, &res);
  }
  ot_tokens_free(&toks);
  ot_tokenizer_free(tok);
  ot_model_free(m);
  ot_backend_free(be);
  if (rc) return ot_cmd_fail(what, rc);
  ot_eval_print(stdout, &res, json);
  return OT_EXIT_OK;
}

int ot_cmd_generate(int argc, char **argv) {
  const char *model = NULL, *prompt = NULL, *backend = "cpu";
  int max_tokens = 64, seed = 0, threads = 0;
  float temperature = 0.8f, top_p = 0.95f;
  const ot_opt opts[] = {
      {"model", OT_OPT_STR, &model, "DIR", "checkpoint directory"},
      {"prompt", OT_OPT_STR, &prompt, "TEXT", "text to continue"},
      {"max-tokens", OT_OPT_INT, &max_tokens, "N", "tokens to sample (default 64)"},
      {"temperature", OT_OPT_FLOAT, &temperature, "X", "sampling temperature, 0 = greedy (default 0.8)"},
      {"top-p", OT_OPT_FLOAT, &top_p, "P", "nucleus sampling mass (default 0.95)"},
      {"seed", OT_OPT_INT, &seed, "S", "random seed (default 0)"},
      {"backend", OT_OPT_STR, &backend, "NAME", "cpu (default) or cuda"},
      {"threads", OT_OPT_INT, &threads, "N", "CPU threads (default: all cores)"},
  };
  const char *syn =
      "offtune-cloud generate --model DIR --prompt TEXT [--max-tokens N --temperature X --top-p P "
      "--seed S]";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, "Samples a continuation of the prompt and prints prompt + continuation.", opts,
                 N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && (!model || !prompt)) rc = ot_error(OT_ERR_INVALID, "--model and --prompt are required");
  if (rc == OT_OK && (max_tokens < 0 || temperature < 0 || top_p <= 0 || top_p > 1))
    rc = ot_error(OT_ERR_INVALID, "need --max-tokens >= 0, --temperature >= 0, 0 < --top-p <= 1");
  if (rc) {
    fprintf(stderr, "offtune-cloud generate: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_backend *be;
  ot_model *m;
  ot_tokenizer *tok;
  rc = ot_cmd_load_model(model, backend, threads, &be, &m, &tok);
  if (rc) return ot_cmd_fail("loading the model", rc);
  int32_t *pids = NULL, *all = NULL;
  size_t np = 0, na = 0;
  char *out = NULL;
  size_t out_len = 0;
  ot_sample_config sc = {max_tokens, temperature, top_p, (uint64_t)seed};
  rc = ot_tokenizer_require(tok, model, "--prompt TEXT needs one (serve-model takes token-id prompts)");
  if (rc == OT_OK) rc = ot_tokenizer_encode(tok, prompt, strlen(prompt), &pids, &np);
  if (rc == OT_OK) rc = ot_model_prepare(m, 1, ot_model_cfg(m)->n_positions, 0);
  if (rc == OT_OK) rc = ot_generate(m, pids, np, &sc, &all, &na);
  if (rc == OT_OK) rc = ot_tokenizer_decode(tok, all, na, &out, &out_len);
  if (rc == OT_OK) {
    fwrite(out, 1, out_len, stdout);
    fputc('\n', stdout);
  }
  free(out);
  free(all);
  free(pids);
  ot_tokenizer_free(tok);
  ot_model_free(m);
  ot_backend_free(be);
  return rc ? ot_cmd_fail("generating", rc) : OT_EXIT_OK;
}

int ot_cmd_tokenize(int argc, char **argv) {
  const char *model = NULL, *text = NULL;
  const ot_opt opts[] = {
      {"model", OT_OPT_STR, &model, "DIR", "checkpoint directory (its tokenizer files)"},
      {"text", OT_OPT_STR, &text, "FILE", "UTF-8 text file"},
  };
  const char *syn = "offtune-cloud tokenize --model DIR --text FILE";
  int rc = ot_cli_parse(argc, argv, opts, N_OPTS(opts));
  if (rc == 1) {
    ot_cli_usage(stdout, syn, "Prints the token ids of the text, space-separated, on one line.", opts,
                 N_OPTS(opts));
    return OT_EXIT_OK;
  }
  if (rc == OT_OK && (!model || !text)) rc = ot_error(OT_ERR_INVALID, "--model and --text are required");
  if (rc) {
    fprintf(stderr, "offtune-cloud tokenize: %s\n", ot_error_detail());
    ot_cli_usage(stderr, syn, NULL, opts, N_OPTS(opts));
    return OT_EXIT_USAGE;
  }
  ot_tokenizer *tok;
  rc = ot_tokenizer_load_dir(model, &tok);
  if (rc) return ot_cmd_fail("loading the tokenizer", rc);
  ot_tokens toks = {NULL, 0, NULL};
  rc = ot_tokens_load_input(text, NULL, tok, 0, &toks);
  if (rc == OT_OK) {
    for (size_t i = 0; i < toks.n; i++) printf(i ? " %d" : "%d", toks.ids[i]);
    printf("\n");
  }
  ot_tokens_free(&toks);
  ot_tokenizer_free(tok);
  return rc ? ot_cmd_fail("tokenizing", rc) : OT_EXIT_OK;
}
