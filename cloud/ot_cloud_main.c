/* offtune-cloud: the model owner's side. Holds the full model; scores, trains and
 * samples it. (Distillation, sessions and serving join in later commands.) */
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ot_cli.h"
#include "ot_cloud_cmd.h"
#include "ot_data.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_identity.h"

static int cmd_keygen(int argc, char **argv) {
  return ot_keygen_command("offtune-cloud", "cloud", argc, argv);
}

static const ot_cli_command commands[] = {
    {"pretrain", ot_cmd_pretrain, "train a small GPT-2 from scratch (default: the embedded Brown model)"},
    {"finetune", ot_cmd_finetune, "full fine-tuning of a model on a text or token file"},
    {"distill", ot_cmd_distill, "build and distill the Offsite-Tuning emulator of a model"},
    {"eval", ot_cmd_eval, "perplexity of a model (optionally with an adapter) on a text or token file"},
    {"merge", ot_cmd_merge, "fold a LoRA adapter into the base weights; writes a normal checkpoint"},
    {"import-peft", ot_cmd_import_peft, "import a LoRA trained with Hugging Face PEFT, bound to its base model"},
    {"generate", ot_cmd_generate, "sample a continuation of a prompt"},
    {"serve-model", ot_cmd_serve_model,
     "serve a model and its adapters: OpenAI-style HTTP API, nng request API"},
    {"tokenize", ot_cmd_tokenize, "print the token ids of a text file"},
    {"corpus", ot_cmd_corpus, "write the plain text of Brown corpus genres (the project's data splits)"},
    {"access", ot_cmd_access, "allow or revoke a device, or issue a one-time enrolment token"},
    {"serve", ot_cmd_serve, "the cloud daemon: federated tuning sessions with enrolled devices"},
    {"session", ot_cmd_session, "create, list and show sessions on the running daemon"},
    {"device", ot_cmd_device, "list or revoke enrolled devices"},
    {"token", ot_cmd_token, "issue a one-time enrolment token for a device"},
    {"adapter", ot_cmd_adapter, "list, publish or delete the sessions' adapters"},
    {"keys", ot_cmd_keys, "create, revoke or list the serving HTTP API's keys (tenants)"},
    {"report", ot_cmd_report, "a session's report: one self-contained HTML page with its charts"},
    {"keygen", cmd_keygen,
     "create the cloud's long-term Ed25519 identity (DIR/cloud.key 0600, DIR/cloud.pub)"},
};

int main(int argc, char **argv) {
  /* a server's connections, sessions and files share one descriptor table: use all of
   * the hard limit (the transport and HTTP caps are derived from it) */
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  if (argc == 2 && strcmp(argv[1], "--version") == 0) {
    printf("offtune-cloud %s\n", OT_VERSION);
    return 0;
  }
  return ot_cli_dispatch("offtune-cloud",
                         "The model owner's side of offtune: holds the full model and never ships it.",
                         commands, (int)(sizeof commands / sizeof commands[0]), argc, argv);
}

int ot_cmd_fail(const char *what, int status) { return ot_cli_fail("offtune-cloud", what, status); }

int ot_cmd_load_model(const char *dir, const char *backend, int threads, ot_backend **be, ot_model **m,
                      ot_tokenizer **tok) {
  ot_backend_kind kind;
  ot_backend *b = NULL;
  int rc = ot_backend_parse(backend ? backend : "cpu", &kind);
  int fell_back = 0;
  if (rc == OT_OK) rc = ot_backend_create_or_cpu(kind, threads, &b, &fell_back);
  if (rc == OT_OK && fell_back) fprintf(stderr, "offtune-cloud: warning: %s; using cpu\n", ot_error_detail());
  if (rc == OT_OK) rc = ot_model_open_dir(dir, b, m, tok);
  if (rc) {
    ot_backend_free(b);
    return rc;
  }
  *be = b;
  return OT_OK;
}

void ot_cmd_npm_dir(char *dir, size_t n) {
  const char *env = getenv("OT_NPM_DIR");
  if (env && *env) {
    snprintf(dir, n, "%s", env);
    return;
  }
  /* build/cloud/offtune-cloud -> <repo>/third_party/npm/node_modules */
  char exe[3800];
  ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (len > 0) {
    exe[len] = '\0';
    char *slash = strrchr(exe, '/');
    if (slash) *slash = '\0';
    snprintf(dir, n, "%s/../../third_party/npm/node_modules", exe);
    if (access(dir, F_OK) == 0) return;
  }
  snprintf(dir, n, "third_party/npm/node_modules");
}
