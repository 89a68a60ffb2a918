#include "ot_safetensors.h"

#include "ot_error.h"
#include "ot_fileio.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The format is little-endian and tensors are handed out as raw bytes. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "offtune assumes a little-endian host");

#define ST_MAX_HEADER ((uint64_t)100 * 1024 * 1024)
/* Largest integer a JSON number (a double in cJSON) holds exactly. */
#define ST_MAX_JSON_INT 9007199254740992.0

static const struct {
  const char *name;
  size_t size;
} dtype_info[] = {
    [OT_DTYPE_F32] = {"F32", 4}, [OT_DTYPE_F16] = {"F16", 2}, [OT_DTYPE_BF16] = {"BF16", 2},
    [OT_DTYPE_I8] = {"I8", 1},   [OT_DTYPE_U8] = {"U8", 1},   [OT_DTYPE_I32] = {"I32", 4},
    [OT_DTYPE_I64] = {"I64", 8},
};
#define N_DTYPES (sizeof dtype_info / sizeof dtype_info[0])

static int dtype_valid(ot_dtype dt) { return (unsigned)dt < N_DTYPES; }

size_t ot_dtype_size(ot_dtype dt) { return dtype_valid(dt) ? dtype_info[dt].size : 0; }
const char *ot_dtype_name(ot_dtype dt) { return dtype_valid(dt) ? dtype_info[dt].name : "?"; }

/* ---- fp16 / bf16 ---- */

static uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
static float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

float ot_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) {
    /* Zero or subnormal: mant * 2^-24 is exact in fp32. */
    float v = (float)mant * 0x1p-24f;
    return bits_f32(f32_bits(v) | sign);
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13)); /* inf, NaN keeps its payload */
  return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

float ot_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t ot_f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00 | (uint16_t)((ax >> 13) & 0x1ff); /* quiet NaN */
  if (ax >= 0x47800000u) return sign | 0x7c00;                                 /* >= 65536 or inf */
  uint32_t exp = ax >> 23, mant = ax & 0x7fffff;
  uint32_t r, rem, half;
  if (exp < 113) {
    /* fp16 subnormal range: count units of 2^-24, value = m * 2^(exp-150). */
    if (exp < 102) return sign; /* below 2^-25: rounds to zero */
    uint32_t m = mant | 0x800000, shift = 126 - exp;
    r = m >> shift;
    rem = m & ((1u << shift) - 1);
    half = 1u << (shift - 1);
  } else {
    r = ((exp - 112) << 10) | (mant >> 13);
    rem = mant & 0x1fff;
    half = 0x1000;
  }
  /* Round to nearest even; a carry into the exponent (even up to inf) is the right answer. */
  if (rem > half || (rem == half && (r & 1))) r++;
  return sign | (uint16_t)r;
}

uint16_t ot_f32_to_bf16(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040); /* quiet NaN */
  x += 0x7fffu + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

/* ---- reader ---- */

typedef struct {
  char *key, *val;
} st_meta;

struct ot_safetensors {
  unsigned char *base; /* whole file: mapped or malloc'd */
  size_t size;
  int mapped;
  const unsigned char *data; /* start of the data section */
  uint64_t data_size;
  ot_st_tensor *tensors; /* sorted by offset (file order) */
  size_t n;
  size_t *by_name; /* indices into tensors, sorted by name */
  st_meta *meta;   /* sorted by key */
  size_t n_meta;
};

void ot_st_close(ot_safetensors *st) {
  if (!st) return;
  for (size_t i = 0; i < st->n; i++) free((char *)st->tensors[i].name);
  free(st->tensors);
  free(st->by_name);
  for (size_t i = 0; i < st->n_meta; i++) {
    free(st->meta[i].key);
    free(st->meta[i].val);
  }
  free(st->meta);
  if (st->mapped)
    munmap(st->base, st->size);
  else
    free(st->base);
  free(st);
}

/* Number of members of `obj` called `key` (cJSON keeps duplicates). */
static int count_key(const cJSON *obj, const char *key) {
  int n = 0;
  for (const cJSON *c = obj->child; c; c = c->next)
    if (c->string && strcmp(c->string, key) == 0) n++;
  return n;
}

/* A JSON number that is a non-negative integer the double holds exactly. */
static int json_uint(const cJSON *v, uint64_t *out) {
  if (!cJSON_IsNumber(v)) return 0;
  double d = v->valuedouble;
  if (!(d >= 0 && d <= ST_MAX_JSON_INT) || d != floor(d)) return 0;
  *out = (uint64_t)d;
  return 1;
}

static int parse_dtype(const char *label, const char *name, const cJSON *v, ot_dtype *out) {
  if (!cJSON_IsString(v))
    return ot_error(OT_ERR_FORMAT, "%s: tensor '%s': dtype is not a string", label, name);
  for (size_t i = 0; i < N_DTYPES; i++) {
    if (strcmp(v->valuestring, dtype_info[i].name) == 0) {
      *out = (ot_dtype)i;
      return OT_OK;
    }
  }
  return ot_error(OT_ERR_UNSUPPORTED, "%s: tensor '%s': dtype '%.32s' is not supported", label, name,
                  v->valuestring);
}

static int parse_tensor(const char *label, const cJSON *e, uint64_t data_size, ot_st_tensor *t) {
  const char *name = e->string;
  if (!cJSON_IsObject(e)) return ot_error(OT_ERR_FORMAT, "%s: tensor '%s' is not a JSON object", label, name);
  static const char *const fields[] = {"dtype", "shape", "data_offsets"};
  for (size_t i = 0; i < 3; i++) {
    int c = count_key(e, fields[i]);
    if (c == 0) return ot_error(OT_ERR_FORMAT, "%s: tensor '%s' has no %s", label, name, fields[i]);
    if (c > 1) return ot_error(OT_ERR_FORMAT, "%s: tensor '%s' has %s twice", label, name, fields[i]);
  }
  int rc = parse_dtype(label, name, cJSON_GetObjectItemCaseSensitive(e, "dtype"), &t->dtype);
  if (rc != OT_OK) return rc;

  const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
  if (!cJSON_IsArray(shape))
    return ot_error(OT_ERR_FORMAT, "%s: tensor '%s': shape is not an array", label, name);
  int ndim = cJSON_GetArraySize(shape);
  if (ndim > OT_ST_MAX_DIMS)
    return ot_error(OT_ERR_UNSUPPORTED, "%s: tensor '%s' has %d dimensions, at most %d are supported", label,
                    name, ndim, OT_ST_MAX_DIMS);
  t->ndim = ndim;
  int has_zero = 0;
  const cJSON *d = shape->child;
  for (int i = 0; i < ndim; i++, d = d->next) {
    uint64_t v;
    if (!json_uint(d, &v))
      return ot_error(OT_ERR_FORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer below 2^53",
                      label, name, i);
    t->shape[i] = (int64_t)v;
    has_zero |= v == 0;
  }
  for (int i = ndim; i < OT_ST_MAX_DIMS; i++) t->shape[i] = 0;
  uint64_t numel = 1;
  if (has_zero)
    numel = 0;
  else
    for (int i = 0; i < ndim; i++)
      if (__builtin_mul_overflow(numel, (uint64_t)t->shape[i], &numel))
        return ot_error(OT_ERR_FORMAT, "%s: tensor '%s': shape overflows the element count", label, name);
  uint64_t nbytes;
  if (__builtin_mul_overflow(numel, (uint64_t)ot_dtype_size(t->dtype), &nbytes))
    return ot_error(OT_ERR_FORMAT, "%s: tensor '%s': shape overflows the byte size", label, name);
  t->numel = numel;
  t->nbytes = nbytes;

  const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
  uint64_t begin, end;
  if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 || !json_uint(offs->child, &begin) ||
      !json_uint(offs->child->next, &end))
    return ot_error(OT_ERR_FORMAT, "%s: tensor '%s': data_offsets is not [begin, end] of integers", label,
                    name);
  if (begin > end || end > data_size)
    return ot_error(
        OT_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] outside the data section of %llu bytes",
        label, name, (unsigned long long)begin, (unsigned long long)end, (unsigned long long)data_size);
  if (end - begin != nbytes)
    return ot_error(OT_ERR_FORMAT, "%s: tensor '%s': data_offsets span %llu bytes, shape and %s need %llu",
                    label, name, (unsigned long long)(end - begin), ot_dtype_name(t->dtype),
                    (unsigned long long)nbytes);
  t->offset = begin;
  return OT_OK;
}

static int cmp_meta(const void *a, const void *b) {
  return strcmp(((const st_meta *)a)->key, ((const st_meta *)b)->key);
}

static int parse_metadata(const char *label, const cJSON *m, ot_safetensors *st) {
  if (cJSON_IsNull(m)) return OT_OK; /* what serde writes for an absent Option */
  if (!cJSON_IsObject(m)) return ot_error(OT_ERR_FORMAT, "%s: __metadata__ is not a JSON object", label);
  size_t n = (size_t)cJSON_GetArraySize(m);
  st->meta = calloc(n ? n : 1, sizeof *st->meta);
  if (!st->meta) return ot_error(OT_ERR_NOMEM, "%s: cannot allocate metadata", label);
  for (const cJSON *c = m->child; c; c = c->next) {
    if (!cJSON_IsString(c))
      return ot_error(OT_ERR_FORMAT, "%s: __metadata__ entry '%s' is not a string", label, c->string);
    st_meta *e = &st->meta[st->n_meta++]; /* counted first so close() frees a half-made pair */
    e->key = strdup(c->string);
    e->val = strdup(c->valuestring);
    if (!e->key || !e->val) return ot_error(OT_ERR_NOMEM, "%s: cannot copy metadata", label);
  }
  /* Sorted, duplicates are neighbours: linear in a hostile header with millions of keys. */
  qsort(st->meta, st->n_meta, sizeof *st->meta, cmp_meta);
  for (size_t i = 1; i < st->n_meta; i++)
    if (strcmp(st->meta[i - 1].key, st->meta[i].key) == 0)
      return ot_error(OT_ERR_FORMAT, "%s: __metadata__ has key '%s' twice", label, st->meta[i].key);
  return OT_OK;
}

static int cmp_offset(const void *a, const void *b) {
  const ot_st_tensor *x = a, *y = b;
  if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
  if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
  return strcmp(x->name, y->name);
}

/* qsort has no context argument; sort pointers to the tensors instead of indices. */
static int cmp_name_ptr(const void *a, const void *b) {
  const ot_st_tensor *const *x = a, *const *y = b;
  return strcmp((*x)->name, (*y)->name);
}

/* Validates st->base[0..size) and fills in the rest of st. */
static int st_parse(ot_safetensors *st, const char *label) {
  if (st->size < 8)
    return ot_error(OT_ERR_FORMAT, "%s: %zu bytes, too short for a safetensors file", label, st->size);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | st->base[i];
  if (hlen > ST_MAX_HEADER)
    return ot_error(OT_ERR_FORMAT, "%s: header length %llu is over the limit of %llu bytes", label,
                    (unsigned long long)hlen, (unsigned long long)ST_MAX_HEADER);
  if (hlen > st->size - 8)
    return ot_error(OT_ERR_FORMAT, "%s: header length %llu runs past the end of the %zu-byte file", label,
                    (unsigned long long)hlen, st->size);
  const char *hdr = (const char *)st->base + 8;
  st->data = st->base + 8 + hlen;
  st->data_size = st->size - 8 - hlen;

  const char *end = NULL;
  cJSON *root = cJSON_ParseWithLengthOpts(hdr, (size_t)hlen, &end, 0);
  if (!root) return ot_error(OT_ERR_FORMAT, "%s: header is not valid JSON", label);
  int rc = OT_OK;
  /* Only the space padding may follow the JSON value. */
  for (const char *p = end; p < hdr + hlen; p++) {
    if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
      rc = ot_error(OT_ERR_FORMAT, "%s: junk after the JSON header at byte %td", label, p - hdr);
      goto done;
    }
  }
  if (!cJSON_IsObject(root)) {
    rc = ot_error(OT_ERR_FORMAT, "%s: header is not a JSON object", label);
    goto done;
  }
  size_t n = 0;
  int n_meta_entries = 0;
  for (const cJSON *c = root->child; c; c = c->next) {
    if (strcmp(c->string, "__metadata__") == 0)
      n_meta_entries++;
    else
      n++;
  }
  if (n_meta_entries > 1) {
    rc = ot_error(OT_ERR_FORMAT, "%s: __metadata__ appears twice", label);
    goto done;
  }
  st->tensors = calloc(n ? n : 1, sizeof *st->tensors);
  st->by_name = calloc(n ? n : 1, sizeof *st->by_name);
  if (!st->tensors || !st->by_name) {
    rc = ot_error(OT_ERR_NOMEM, "%s: cannot allocate %zu tensor entries", label, n);
    goto done;
  }
  for (const cJSON *c = root->child; c; c = c->next) {
    if (strcmp(c->string, "__metadata__") == 0) {
      rc = parse_metadata(label, c, st);
      if (rc != OT_OK) goto done;
      continue;
    }
    ot_st_tensor *t = &st->tensors[st->n];
    rc = parse_tensor(label, c, st->data_size, t);
    if (rc != OT_OK) goto done;
    t->name = strdup(c->string);
    if (!t->name) {
      rc = ot_error(OT_ERR_NOMEM, "%s: cannot copy tensor name", label);
      goto done;
    }
    st->n++;
  }

  qsort(st->tensors, n, sizeof *st->tensors, cmp_offset);

  /* Name index for ot_st_find; duplicates are caught here, before the tiling check,
   * because two equal names would otherwise surface as a confusing overlap. */
  const ot_st_tensor **sorted = malloc((n ? n : 1) * sizeof *sorted);
  if (!sorted) {
    rc = ot_error(OT_ERR_NOMEM, "%s: cannot allocate name index", label);
    goto done;
  }
  for (size_t i = 0; i < n; i++) sorted[i] = &st->tensors[i];
  qsort(sorted, n, sizeof *sorted, cmp_name_ptr);
  for (size_t i = 0; i < n; i++) {
    if (i > 0 && strcmp(sorted[i - 1]->name, sorted[i]->name) == 0) {
      rc = ot_error(OT_ERR_FORMAT, "%s: tensor '%s' appears twice", label, sorted[i]->name);
      free(sorted);
      goto done;
    }
    st->by_name[i] = (size_t)(sorted[i] - st->tensors);
  }
  free(sorted);

  /* Tensors must tile the data section exactly: no gaps, no overlaps, nothing left over. */
  uint64_t expect = 0;
  for (size_t i = 0; i < n; i++) {
    const ot_st_tensor *t = &st->tensors[i];
    if (t->offset != expect) {
      rc = ot_error(OT_ERR_FORMAT, "%s: tensor '%s' starts at data offset %llu, expected %llu (%s)", label,
                    t->name, (unsigned long long)t->offset, (unsigned long long)expect,
                    t->offset > expect ? "gap" : "overlap");
      goto done;
    }
    expect = t->offset + t->nbytes;
  }
  if (expect != st->data_size) {
    rc = ot_error(OT_ERR_FORMAT, "%s: tensors cover %llu bytes of a %llu-byte data section", label,
                  (unsigned long long)expect, (unsigned long long)st->data_size);
    goto done;
  }

done:
  cJSON_Delete(root);
  return rc;
}

int ot_st_open_memory(const void *data, size_t size, ot_safetensors **out) {
  if (!out || (!data && size)) return ot_error(OT_ERR_INVALID, "ot_st_open_memory: NULL argument");
  ot_safetensors *st = calloc(1, sizeof *st);
  if (!st) return ot_error(OT_ERR_NOMEM, "cannot allocate safetensors reader");
  st->base = malloc(size ? size : 1);
  if (!st->base) {
    free(st);
    return ot_error(OT_ERR_NOMEM, "cannot copy %zu-byte safetensors buffer", size);
  }
  if (size) memcpy(st->base, data, size);
  st->size = size;
  int rc = st_parse(st, "<memory>");
  if (rc != OT_OK) {
    ot_st_close(st);
    return rc;
  }
  *out = st;
  return OT_OK;
}

int ot_st_open(const char *path, ot_safetensors **out) {
  if (!path || !out) return ot_error(OT_ERR_INVALID, "ot_st_open: NULL argument");
  int fd = -1;
  uint64_t size = 0;
  int rc = ot_file_open_regular(path, SIZE_MAX, &fd, &size);
  if (rc) return rc;
  ot_safetensors *st = calloc(1, sizeof *st);
  if (!st) {
    close(fd);
    return ot_error(OT_ERR_NOMEM, "cannot allocate safetensors reader");
  }
  st->size = (size_t)size;
  if (st->size >= 8) {
    /* Map rather than read: multi-GB checkpoints then cost page cache, not heap. */
    void *p = mmap(NULL, st->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      close(fd);
      free(st);
      return ot_error(e == ENOMEM ? OT_ERR_NOMEM : OT_ERR_IO, "cannot map %s: %s", path, strerror(e));
    }
    st->base = p;
    st->mapped = 1;
  }
  close(fd);
  rc = st_parse(st, path);
  if (rc != OT_OK) {
    ot_st_close(st);
    return rc;
  }
  *out = st;
  return OT_OK;
}

size_t ot_st_count(const ot_safetensors *st) { return st ? st->n : 0; }

const ot_st_tensor *ot_st_at(const ot_safetensors *st, size_t i) {
  return st && i < st->n ? &st->tensors[i] : NULL;
}

const ot_st_tensor *ot_st_find(const ot_safetensors *st, const char *name) {
  if (!st || !name) return NULL;
  size_t lo = 0, hi = st->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const ot_st_tensor *t = &st->tensors[st->by_name[mid]];
    int c = strcmp(name, t->name);
    if (c == 0) return t;
    if (c < 0)
      hi = mid;
    else
      lo = mid + 1;
  }
  return NULL;
}

const char *ot_st_metadata(const ot_safetensors *st, const char *key) {
  if (!st || !key) return NULL;
  st_meta probe = {(char *)key, NULL};
  const st_meta *e = st->n_meta ? bsearch(&probe, st->meta, st->n_meta, sizeof *st->meta, cmp_meta) : NULL;
  return e ? e->val : NULL;
}

const void *ot_st_data(const ot_safetensors *st, const ot_st_tensor *t) {
  if (!st || !t) return NULL;
  return st->data + t->offset;
}

int ot_st_read_f32(const ot_safetensors *st, const ot_st_tensor *t, float *dst, uint64_t numel) {
  if (!st || !t || (!dst && numel)) return ot_error(OT_ERR_INVALID, "ot_st_read_f32: NULL argument");
  if (numel != t->numel)
    return ot_error(OT_ERR_MISMATCH, "tensor '%s' has %llu elements, caller expects %llu", t->name,
                    (unsigned long long)t->numel, (unsigned long long)numel);
  const unsigned char *src = st->data + t->offset;
  switch (t->dtype) {
  case OT_DTYPE_F32:
    if (numel) memcpy(dst, src, (size_t)t->nbytes);
    return OT_OK;
  case OT_DTYPE_F16:
  case OT_DTYPE_BF16: {
    float (*conv)(uint16_t) = t->dtype == OT_DTYPE_F16 ? ot_f16_to_f32 : ot_bf16_to_f32;
    for (uint64_t i = 0; i < numel; i++) {
      uint16_t h = (uint16_t)(src[2 * i] | src[2 * i + 1] << 8); /* data may be unaligned */
      dst[i] = conv(h);
    }
    return OT_OK;
  }
  default:
    return ot_error(OT_ERR_UNSUPPORTED, "tensor '%s' is %s, not a floating-point type", t->name,
                    ot_dtype_name(t->dtype));
  }
}

void ot_st_release(const ot_safetensors *st, const ot_st_tensor *t) {
  if (!st || !t || !st->mapped) return;
  uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  uintptr_t a = (uintptr_t)(st->data + t->offset), b = a + t->nbytes;
  a = (a + page - 1) / page * page; /* whole pages only: the neighbours may still be read */
  b = b / page * page;
  if (b > a) (void)madvise((void *)a, b - a, MADV_DONTNEED); /* read-only: nothing is lost */
}

/* ---- writer ---- */

typedef struct {
  char *name;
  ot_dtype dtype;
  int ndim;
  int64_t shape[OT_ST_MAX_DIMS];
  const void *data;
  uint64_t nbytes;
} wr_entry;

struct ot_st_writer {
  wr_entry *e;
  size_t n, cap;
  char **meta_keys, **meta_vals;
  size_t n_meta, cap_meta;
};

int ot_st_writer_new(ot_st_writer **out) {
  if (!out) return ot_error(OT_ERR_INVALID, "ot_st_writer_new: NULL argument");
  ot_st_writer *w = calloc(1, sizeof *w);
  if (!w) return ot_error(OT_ERR_NOMEM, "cannot allocate safetensors writer");
  *out = w;
  return OT_OK;
}

void ot_st_writer_free(ot_st_writer *w) {
  if (!w) return;
  for (size_t i = 0; i < w->n; i++) free(w->e[i].name);
  free(w->e);
  for (size_t i = 0; i < w->n_meta; i++) {
    free(w->meta_keys[i]);
    free(w->meta_vals[i]);
  }
  free(w->meta_keys);
  free(w->meta_vals);
  free(w);
}

int ot_st_writer_add(ot_st_writer *w, const char *name, ot_dtype dtype, int ndim, const int64_t *shape,
                     const void *data) {
  if (!w || !name) return ot_error(OT_ERR_INVALID, "ot_st_writer_add: NULL argument");
  if (!*name) return ot_error(OT_ERR_INVALID, "safetensors writer: empty tensor name");
  if (strcmp(name, "__metadata__") == 0)
    return ot_error(OT_ERR_INVALID, "safetensors writer: '__metadata__' is reserved, not a tensor name");
  if (!dtype_valid(dtype))
    return ot_error(OT_ERR_INVALID, "safetensors writer: tensor '%s': bad dtype %d", name, (int)dtype);
  if (ndim < 0 || ndim > OT_ST_MAX_DIMS || (ndim > 0 && !shape))
    return ot_error(OT_ERR_INVALID, "safetensors writer: tensor '%s': bad ndim %d", name, ndim);
  uint64_t numel = 1;
  int has_zero = 0;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0 || (double)shape[i] > ST_MAX_JSON_INT)
      return ot_error(OT_ERR_INVALID, "safetensors writer: tensor '%s': bad dimension %lld", name,
                      (long long)shape[i]);
    has_zero |= shape[i] == 0;
  }
  if (has_zero)
    numel = 0;
  else
    for (int i = 0; i < ndim; i++)
      if (__builtin_mul_overflow(numel, (uint64_t)shape[i], &numel))
        return ot_error(OT_ERR_INVALID, "safetensors writer: tensor '%s': shape overflows", name);
  uint64_t nbytes;
  if (__builtin_mul_overflow(numel, (uint64_t)ot_dtype_size(dtype), &nbytes) || nbytes > SIZE_MAX)
    return ot_error(OT_ERR_INVALID, "safetensors writer: tensor '%s': shape overflows", name);
  if (nbytes && !data) return ot_error(OT_ERR_INVALID, "safetensors writer: tensor '%s': NULL data", name);
  for (size_t i = 0; i < w->n; i++)
    if (strcmp(w->e[i].name, name) == 0)
      return ot_error(OT_ERR_INVALID, "safetensors writer: tensor '%s' added twice", name);
  if (w->n == w->cap) {
    size_t ncap = w->cap ? w->cap * 2 : 16;
    wr_entry *ne = realloc(w->e, ncap * sizeof *ne);
    if (!ne) return ot_error(OT_ERR_NOMEM, "safetensors writer: cannot grow tensor list");
    w->e = ne;
    w->cap = ncap;
  }
  wr_entry *e = &w->e[w->n];
  memset(e, 0, sizeof *e);
  e->name = strdup(name);
  if (!e->name) return ot_error(OT_ERR_NOMEM, "safetensors writer: cannot copy name '%s'", name);
  e->dtype = dtype;
  e->ndim = ndim;
  for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
  e->data = data;
  e->nbytes = nbytes;
  w->n++;
  return OT_OK;
}

int ot_st_writer_set_metadata(ot_st_writer *w, const char *key, const char *value) {
  if (!w || !key || !value) return ot_error(OT_ERR_INVALID, "ot_st_writer_set_metadata: NULL argument");
  char *v = strdup(value);
  if (!v) return ot_error(OT_ERR_NOMEM, "safetensors writer: cannot copy metadata '%s'", key);
  for (size_t i = 0; i < w->n_meta; i++) {
    if (strcmp(w->meta_keys[i], key) == 0) {
      free(w->meta_vals[i]);
      w->meta_vals[i] = v;
      return OT_OK;
    }
  }
  if (w->n_meta == w->cap_meta) {
    size_t ncap = w->cap_meta ? w->cap_meta * 2 : 8;
    char **nk = realloc(w->meta_keys, ncap * sizeof *nk);
    if (!nk) {
      free(v);
      return ot_error(OT_ERR_NOMEM, "safetensors writer: cannot grow metadata");
    }
    w->meta_keys = nk;
    char **nv = realloc(w->meta_vals, ncap * sizeof *nv);
    if (!nv) {
      free(v);
      return ot_error(OT_ERR_NOMEM, "safetensors writer: cannot grow metadata");
    }
    w->meta_vals = nv;
    w->cap_meta = ncap;
  }
  char *k = strdup(key);
  if (!k) {
    free(v);
    return ot_error(OT_ERR_NOMEM, "safetensors writer: cannot copy metadata key '%s'", key);
  }
  w->meta_keys[w->n_meta] = k;
  w->meta_vals[w->n_meta] = v;
  w->n_meta++;
  return OT_OK;
}

/* Integers go in as raw text: cJSON prints large doubles in exponent form, which
 * strict readers (serde's usize) refuse. */
static int add_raw_u64(cJSON *arr, uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "%llu", (unsigned long long)v);
  cJSON *item = cJSON_CreateRaw(buf);
  return item && cJSON_AddItemToArray(arr, item);
}

static char *build_header(const ot_st_writer *w, uint64_t *data_size) {
  cJSON *root = cJSON_CreateObject();
  if (!root) return NULL;
  if (w->n_meta) {
    cJSON *m = cJSON_AddObjectToObject(root, "__metadata__");
    if (!m) goto fail;
    for (size_t i = 0; i < w->n_meta; i++)
      if (!cJSON_AddStringToObject(m, w->meta_keys[i], w->meta_vals[i])) goto fail;
  }
  uint64_t off = 0;
  for (size_t i = 0; i < w->n; i++) {
    const wr_entry *e = &w->e[i];
    cJSON *t = cJSON_AddObjectToObject(root, e->name);
    if (!t || !cJSON_AddStringToObject(t, "dtype", ot_dtype_name(e->dtype))) goto fail;
    cJSON *shape = cJSON_AddArrayToObject(t, "shape");
    if (!shape) goto fail;
    for (int d = 0; d < e->ndim; d++)
      if (!add_raw_u64(shape, (uint64_t)e->shape[d])) goto fail;
    cJSON *offs = cJSON_AddArrayToObject(t, "data_offsets");
    if (!offs || !add_raw_u64(offs, off) || !add_raw_u64(offs, off + e->nbytes)) goto fail;
    off += e->nbytes;
  }
  char *s = cJSON_PrintUnformatted(root);
  cJSON_Delete(root);
  *data_size = off;
  return s;
fail:
  cJSON_Delete(root);
  return NULL;
}

int ot_st_writer_save(ot_st_writer *w, const char *path) {
  if (!w || !path) return ot_error(OT_ERR_INVALID, "ot_st_writer_save: NULL argument");
  uint64_t data_size = 0, total = 0;
  char *json = build_header(w, &data_size);
  if (!json) return ot_error(OT_ERR_NOMEM, "%s: cannot build safetensors header", path);
  size_t jlen = strlen(json);
  size_t hlen = (jlen + 7) / 8 * 8; /* spaces pad the header to a multiple of 8 */
  if (__builtin_add_overflow(8 + (uint64_t)hlen, data_size, &total)) {
    cJSON_free(json);
    return ot_error(OT_ERR_RANGE, "%s: tensors too large", path);
  }
  unsigned char *hdr = malloc(8 + hlen);
  if (!hdr) {
    cJSON_free(json);
    return ot_error(OT_ERR_NOMEM, "%s: cannot allocate %zu-byte header", path, hlen);
  }
  for (int i = 0; i < 8; i++) hdr[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
  memcpy(hdr + 8, json, jlen);
  memset(hdr + 8 + jlen, ' ', hlen - jlen);
  cJSON_free(json);

  ot_atomic_file *f = NULL;
  int rc = ot_atomic_open(path, &f);
  if (rc == OT_OK) rc = ot_atomic_write(f, hdr, 8 + hlen);
  free(hdr);
  /* Tensor bytes stream straight from the caller's buffers: no second copy of the model. */
  for (size_t i = 0; rc == OT_OK && i < w->n; i++)
    rc = ot_atomic_write(f, w->e[i].data, (size_t)w->e[i].nbytes);
  if (rc != OT_OK) {
    ot_atomic_abort(f);
    return rc;
  }
  return ot_atomic_commit(f);
}
