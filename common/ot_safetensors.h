/* safetensors files: 8-byte little-endian header length, JSON header
 * {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the data.
 * Readers validate everything (offsets in range, contiguous, no gaps or overlaps,
 * shapes consistent with byte sizes) before handing out a single tensor. */
#ifndef OT_SAFETENSORS_H
#define OT_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
  OT_DTYPE_F32,
  OT_DTYPE_F16,
  OT_DTYPE_BF16,
  OT_DTYPE_I8,
  OT_DTYPE_U8,
  OT_DTYPE_I32,
  OT_DTYPE_I64,
} ot_dtype;

#define OT_ST_MAX_DIMS 8

typedef struct {
  const char *name;
  ot_dtype dtype;
  int ndim;
  int64_t shape[OT_ST_MAX_DIMS];
  uint64_t numel;
  uint64_t offset; /* relative to the start of the data section */
  uint64_t nbytes;
} ot_st_tensor;

typedef struct ot_safetensors ot_safetensors;

size_t ot_dtype_size(ot_dtype dt);
const char *ot_dtype_name(ot_dtype dt);

/* Opens and validates a file (read into memory or mapped). */
int ot_st_open(const char *path, ot_safetensors **out);
/* Validates a buffer; the buffer is copied, the caller keeps ownership of `data`. */
int ot_st_open_memory(const void *data, size_t size, ot_safetensors **out);
void ot_st_close(ot_safetensors *st);

size_t ot_st_count(const ot_safetensors *st);
const ot_st_tensor *ot_st_at(const ot_safetensors *st, size_t i); /* in file order */
const ot_st_tensor *ot_st_find(const ot_safetensors *st, const char *name);
/* Value of a string entry of __metadata__, or NULL. */
const char *ot_st_metadata(const ot_safetensors *st, const char *key);
/* Raw bytes of a tensor (little-endian, as stored). Not necessarily aligned to the dtype
 * (tensors are packed back to back): copy with memcpy, or use ot_st_read_f32. */
const void *ot_st_data(const ot_safetensors *st, const ot_st_tensor *t);
/* Converts an F32, F16 or BF16 tensor to fp32; `numel` must equal t->numel. */
int ot_st_read_f32(const ot_safetensors *st, const ot_st_tensor *t, float *dst, uint64_t numel);
/* Hints that the tensor's bytes will not be read again soon: the pages of a mapped file that it
 * fills are dropped from the process (they stay in the page cache and come back if read), so a
 * checkpoint loaded tensor by tensor does not hold the whole file in memory next to the model. */
void ot_st_release(const ot_safetensors *st, const ot_st_tensor *t);

/* Writer: tensors are referenced (not copied) until save; save is atomic
 * (temporary file, fsync, rename), so a crash leaves the old file or the new one. */
typedef struct ot_st_writer ot_st_writer;
int ot_st_writer_new(ot_st_writer **out);
int ot_st_writer_add(ot_st_writer *w, const char *name, ot_dtype dtype, int ndim, const int64_t *shape,
                     const void *data);
int ot_st_writer_set_metadata(ot_st_writer *w, const char *key, const char *value);
int ot_st_writer_save(ot_st_writer *w, const char *path);
void ot_st_writer_free(ot_st_writer *w);

/* fp16/bf16 <-> fp32 conversions (round to nearest even). */
float ot_f16_to_f32(uint16_t h);
float ot_bf16_to_f32(uint16_t h);
uint16_t ot_f32_to_f16(float f);
uint16_t ot_f32_to_bf16(float f);

#endif
