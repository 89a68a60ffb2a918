/* libFuzzer harness: the tokenizer files of a checkpoint or of an emulator package the cloud
 * sends a device (vocab.json + merges.txt, or tokenizer_config.json naming the byte tokenizer),
 * read by ot_tokenizer_load_dir from a directory as the loaders do.
 *
 * Input: vocab.json, a NUL byte, merges.txt; without a NUL byte the input is
 * tokenizer_config.json alone. A tokenizer that loads must encode any bytes into ids of its
 * vocabulary and decode them back exactly, and the files ot_tokenizer_save_dir writes for it
 * must load back into a tokenizer that encodes the same. */
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

static char dir[256], saved[300], vocab[300], merges[300], config[300];

static void remove_dirs(void) {
  static const char *names[] = {"vocab.json", "merges.txt", "tokenizer_config.json"};
  char p[400];
  for (int i = 0; i < 3; i++) {
    snprintf(p, sizeof p, "%s/%s", saved, names[i]);
    unlink(p);
    snprintf(p, sizeof p, "%s/%s", dir, names[i]);
    unlink(p);
  }
  rmdir(saved);
  rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  snprintf(dir, sizeof dir, "%s/ot-fuzz-tok-XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  if (!mkdtemp(dir)) abort();
  snprintf(saved, sizeof saved, "%s/saved", dir);
  snprintf(vocab, sizeof vocab, "%s/vocab.json", dir);
  snprintf(merges, sizeof merges, "%s/merges.txt", dir);
  snprintf(config, sizeof config, "%s/tokenizer_config.json", dir);
  atexit(remove_dirs);
  return 0;
}

static void put(const char *path, const void *d, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f || (n && fwrite(d, 1, n, f) != n) || fclose(f)) abort();
}

/* encode -> ids inside the vocabulary -> decode gives the bytes back; the ids for comparison */
static int32_t *round_trip(const ot_tokenizer *t, const char *s, size_t n, size_t *n_ids) {
  int32_t *ids = NULL;
  char *back = NULL;
  size_t len = 0;
  if (ot_tokenizer_encode(t, s, n, &ids, n_ids) != OT_OK) abort(); /* any bytes encode */
  for (size_t i = 0; i < *n_ids; i++)
    if (ids[i] < 0 || ids[i] >= ot_tokenizer_vocab_size(t)) abort();
  if (ot_tokenizer_decode(t, ids, *n_ids, &back, &len) != OT_OK || len != n || memcmp(back, s, n) != 0)
    abort();
  free(back);
  return ids;
}

static void check(const ot_tokenizer *t, const uint8_t *data, size_t size) {
  static const char sample[] = "Hello world, the cat's 12 \xe2\x82\xac\n\n  <|endoftext|>\xff\x00z";
  size_t n1, n2;
  int32_t *a = round_trip(t, sample, sizeof sample - 1, &n1);
  free(round_trip(t, (const char *)data, size < 4096 ? size : 4096, &n2));
  /* what save_dir writes loads back to the same tokenizer */
  ot_tokenizer *again = NULL;
  static const char *names[] = {"vocab.json", "merges.txt", "tokenizer_config.json"};
  char p[400];
  for (int i = 0; i < 3; i++) { /* the last input's files must not answer for this one */
    snprintf(p, sizeof p, "%s/%s", saved, names[i]);
    unlink(p);
  }
  if (ot_mkdir_p(saved) || ot_tokenizer_save_dir(t, saved) != OT_OK) abort();
  if (ot_tokenizer_load_dir(saved, &again) != OT_OK) abort();
  if (ot_tokenizer_vocab_size(again) != ot_tokenizer_vocab_size(t)) abort();
  int32_t *b = round_trip(again, sample, sizeof sample - 1, &n2);
  if (n1 != n2 || memcmp(a, b, n1 * sizeof *a) != 0) abort();
  free(a);
  free(b);
  ot_tokenizer_free(again);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const uint8_t *nul = memchr(data, '\0', size);
  unlink(vocab);
  unlink(merges);
  unlink(config);
  if (nul) {
    put(vocab, data, (size_t)(nul - data));
    put(merges, nul + 1, size - (size_t)(nul + 1 - data));
  } else {
    put(config, data, size);
  }
  ot_tokenizer *t = NULL;
  if (ot_tokenizer_load_dir(dir, &t) == OT_OK) {
    if (ot_tokenizer_vocab_size(t) < 256) abort(); /* every byte has a token */
    check(t, data, size);
    ot_tokenizer_free(t);
  }
  /* small models take the first merges only */
  if (nul && ot_tokenizer_bpe_load_first(vocab, merges, 2, &t) == OT_OK) {
    check(t, data, size);
    ot_tokenizer_free(t);
  }
  ot_error_clear();
  return 0;
}
