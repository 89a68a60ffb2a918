/* libFuzzer harness: a Hugging Face tokenizer.json (and tokenizer_config.json) of a checkpoint,
 * read by ot_tokenizer_load_dir from a directory as the loaders do.
 *
 * Input: tokenizer.json, then optionally a NUL byte and tokenizer_config.json. A tokenizer that
 * loads must encode any bytes (with and without special tokens added or matched) into ids of
 * its vocabulary, or refuse cleanly when a character has neither a token nor an unk_token;
 * decode must take back every id it produced; and the files ot_tokenizer_save_dir writes for
 * it must load back into a tokenizer that encodes the same. */
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_tokenizer.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[256], saved[300], tj[300], config[300];
static const char *names[] = {"tokenizer.json", "tokenizer_config.json"};

static void clear(const char *d) {
  char p[400];
  for (int i = 0; i < 2; i++) {
    snprintf(p, sizeof p, "%s/%s", d, names[i]);
    unlink(p);
  }
}

static void remove_dirs(void) {
  clear(saved);
  clear(dir);
  rmdir(saved);
  rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  snprintf(dir, sizeof dir, "%s/ot-fuzz-tokjson-XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  if (!mkdtemp(dir)) abort();
  snprintf(saved, sizeof saved, "%s/saved", dir);
  snprintf(tj, sizeof tj, "%s/tokenizer.json", dir);
  snprintf(config, sizeof config, "%s/tokenizer_config.json", dir);
  atexit(remove_dirs);
  return 0;
}

static void put(const char *path, const void *d, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f || (n && fwrite(d, 1, n, f) != n) || fclose(f)) abort();
}

/* encode -> ids inside the vocabulary -> decode works; NULL on a clean refusal */
static int32_t *encode(const ot_tokenizer *t, const char *s, size_t n, unsigned flags, size_t *n_ids) {
  int32_t *ids = NULL;
  char *back = NULL;
  size_t len = 0;
  int rc = ot_tokenizer_encode_ex(t, s, n, flags, &ids, n_ids);
  if (rc == OT_ERR_UNSUPPORTED && strstr(ot_error_detail(), "no unk_token")) return NULL;
  if (rc != OT_OK) abort();
  for (size_t i = 0; i < *n_ids; i++)
    if (ids[i] < 0 || ids[i] >= ot_tokenizer_vocab_size(t)) abort();
  for (unsigned f = 0; f < 2; f++) {
    if (ot_tokenizer_decode_ex(t, ids, *n_ids, f ? OT_TOK_SKIP_SPECIAL | OT_TOK_CONTINUATION : 0, &back,
                               &len) != OT_OK ||
        strlen(back) > len)
      abort();
    free(back);
  }
  return ids;
}

static void check(const ot_tokenizer *t, const uint8_t *data, size_t size) {
  static const char sample[] =
      "Hello world, the cat's 12345 \xe2\x82\xac\n\n  <s> <|endoftext|>\xff\x00z \xe2\x96\x81x";
  static const unsigned flags[] = {0, OT_TOK_ADD_SPECIAL, OT_TOK_SPECIAL_AS_TEXT};
  size_t n1 = 0, n2 = 0;
  int32_t *a = encode(t, sample, sizeof sample - 1, OT_TOK_ADD_SPECIAL, &n1);
  for (int i = 0; i < 3; i++) free(encode(t, (const char *)data, size < 4096 ? size : 4096, flags[i], &n2));
  (void)ot_tokenizer_bos_id(t), (void)ot_tokenizer_eos_id(t), (void)ot_tokenizer_chat_template(t);
  /* what save_dir writes loads back to the same tokenizer */
  ot_tokenizer *again = NULL;
  clear(saved); /* the last input's files must not answer for this one */
  if (ot_mkdir_p(saved) || ot_tokenizer_save_dir(t, saved) != OT_OK) abort();
  if (ot_tokenizer_load_dir(saved, &again) != OT_OK) abort();
  if (ot_tokenizer_vocab_size(again) != ot_tokenizer_vocab_size(t)) abort();
  int32_t *b = encode(again, sample, sizeof sample - 1, OT_TOK_ADD_SPECIAL, &n2);
  if (!a != !b || (a && (n1 != n2 || memcmp(a, b, n1 * sizeof *a) != 0))) abort();
  free(a);
  free(b);
  ot_tokenizer_free(again);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const uint8_t *nul = memchr(data, '\0', size);
  unlink(config);
  put(tj, data, nul ? (size_t)(nul - data) : size);
  if (nul) put(config, nul + 1, size - (size_t)(nul + 1 - data));
  ot_tokenizer *t = NULL;
  if (ot_tokenizer_load_dir(dir, &t) == OT_OK) {
    if (ot_tokenizer_vocab_size(t) < 1) abort();
    check(t, data, size);
    ot_tokenizer_free(t);
  }
  ot_error_clear();
  return 0;
}
