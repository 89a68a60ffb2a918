/* libFuzzer harness: the JSONL files a user hands the commands, read as the commands read
 * them: supervised examples (ot_examples_read, then packed into rows as training does) and
 * task items (ot_task_read), both with the byte tokenizer.
 *
 * Invariants: examples that read have a mask with OT_TOK_START on their first token, and
 * every packed target is -1 or an id of the stream; a task that reads has at least one
 * item; anything else is an error code with a detail, never a crash. */
#include "ot_data.h"
#include "ot_error.h"
#include "ot_examples.h"
#include "ot_task.h"
#include "ot_tokenizer.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char path[300];
static ot_tokenizer *tok;

static void cleanup(void) {
  unlink(path);
  ot_tokenizer_free(tok);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  snprintf(path, sizeof path, "%s/ot-fuzz-jsonl-%d.jsonl",
           access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (int)getpid());
  if (ot_tokenizer_byte_new(&tok) != OT_OK) abort();
  atexit(cleanup);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  FILE *f = fopen(path, "wb");
  if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f)) abort();
  ot_tokens t = {NULL, 0, NULL};
  if (ot_examples_read(path, tok, NULL, &t) == OT_OK) {
    if (!t.n || !t.mask || !(t.mask[0] & OT_TOK_START)) abort();
    int32_t *in = NULL, *tg = NULL;
    size_t rows = 0, cut = 0;
    if (ot_pack_rows(&t, 8, &in, &tg, &rows, &cut) == OT_OK) {
      for (size_t i = 0; i < rows * 8; i++)
        if (tg[i] < -1 || tg[i] > 255 || in[i] < 0 || in[i] > 255) abort();
      free(in);
      free(tg);
    }
    ot_tokens_free(&t);
  } else if (!ot_error_detail()[0]) {
    abort();
  }
  ot_task *task = NULL;
  if (ot_task_read(path, tok, &task) == OT_OK) {
    if (ot_task_count(task) == 0) abort();
    ot_task_free(task);
  } else if (!ot_error_detail()[0]) {
    abort();
  }
  return 0;
}
