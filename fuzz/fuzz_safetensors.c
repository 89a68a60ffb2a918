/* libFuzzer harness: any byte string either fails ot_st_open_memory cleanly or yields
 * tensors whose every byte can be read and whose float tensors convert. */
#include "ot_error.h"
#include "ot_safetensors.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  ot_safetensors *st = NULL;
  if (ot_st_open_memory(data, size, &st) != OT_OK) return 0;
  /* Invariants the reader promises: findable names, in-bounds data that tiles the file. */
  uint64_t covered = 0, sum = 0;
  for (size_t i = 0; i < ot_st_count(st); i++) {
    const ot_st_tensor *t = ot_st_at(st, i);
    if (!t || ot_st_find(st, t->name) != t || t->offset != covered) abort();
    if (t->ndim < 0 || t->ndim > OT_ST_MAX_DIMS || t->numel * ot_dtype_size(t->dtype) != t->nbytes) abort();
    covered += t->nbytes;
    const unsigned char *p = ot_st_data(st, t);
    for (uint64_t b = 0; b < t->nbytes; b++) sum += p[b];
    if (t->dtype == OT_DTYPE_F32 || t->dtype == OT_DTYPE_F16 || t->dtype == OT_DTYPE_BF16) {
      float *dst = malloc(t->numel ? t->numel * sizeof *dst : 1);
      if (!dst) abort();
      if (ot_st_read_f32(st, t, dst, t->numel) != OT_OK) abort();
      for (uint64_t k = 0; k < t->numel; k++) sum += dst[k] == dst[k];
      free(dst);
    } else {
      float unused; /* integer tensors are refused before anything is written */
      if (ot_st_read_f32(st, t, &unused, t->numel) != OT_ERR_UNSUPPORTED) abort();
    }
  }
  if (covered > size) abort();
  (void)ot_st_metadata(st, "format");
  (void)ot_st_find(st, "");
  ot_st_close(st);
  /* Keep the reads from being optimised away. */
  volatile uint64_t sink = sum;
  (void)sink;
  return 0;
}
