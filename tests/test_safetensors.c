/* safetensors reader/writer, fp16/bf16 conversions and the file helpers they sit on. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "ot_digest.h"
#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_safetensors.h"
#include "ot_test_util.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static uint32_t fbits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
static float bitsf(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Same float, bit for bit (so -0 != 0), or both NaN. */
static int same_float(float a, float b) { return (isnan(a) && isnan(b)) || fbits(a) == fbits(b); }

static char *path_in(const char *dir, const char *name) {
  char *p = NULL;
  assert_int_equal(ot_path_join(dir, name, &p), OT_OK);
  return p;
}

static unsigned char *slurp(const char *path, size_t *len) {
  char *buf = NULL;
  assert_int_equal(ot_file_read_all(path, (size_t)1 << 30, &buf, len), OT_OK);
  return (unsigned char *)buf;
}

/* Number of entries in dir other than . and .. (to catch leftover temporary files). */
static int count_entries(const char *dir) {
  DIR *d = opendir(dir);
  assert_non_null(d);
  int n = 0;
  for (struct dirent *e; (e = readdir(d));)
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
  closedir(d);
  return n;
}

/* ---- fp16 / bf16 ---- */

static void test_dtype_info(void **state) {
  (void)state;
  assert_int_equal(ot_dtype_size(OT_DTYPE_F32), 4);
  assert_int_equal(ot_dtype_size(OT_DTYPE_F16), 2);
  assert_int_equal(ot_dtype_size(OT_DTYPE_BF16), 2);
  assert_int_equal(ot_dtype_size(OT_DTYPE_I8), 1);
  assert_int_equal(ot_dtype_size(OT_DTYPE_U8), 1);
  assert_int_equal(ot_dtype_size(OT_DTYPE_I32), 4);
  assert_int_equal(ot_dtype_size(OT_DTYPE_I64), 8);
  assert_string_equal(ot_dtype_name(OT_DTYPE_BF16), "BF16");
  assert_string_equal(ot_dtype_name(OT_DTYPE_I64), "I64");
  assert_int_equal(ot_dtype_size((ot_dtype)99), 0);
}

static void test_f16_known_bits(void **state) {
  (void)state;
  static const struct {
    uint16_t h;
    uint32_t f;
  } exact[] = {
      {0x0000, 0x00000000}, {0x8000, 0x80000000}, {0x3c00, 0x3f800000},
      {0xc000, 0xc0000000}, {0x7bff, 0x477fe000},                       /* 65504, largest finite */
      {0x0400, 0x38800000},                                             /* 2^-14, smallest normal */
      {0x03ff, 0x387fc000},                                             /* largest subnormal */
      {0x0001, 0x33800000},                                             /* 2^-24, smallest subnormal */
      {0x8001, 0xb3800000}, {0x0200, 0x38000000}, {0x3555, 0x3eaaa000}, /* 0.333251953125 */
      {0x7c00, 0x7f800000}, {0xfc00, 0xff800000},
  };
  for (size_t i = 0; i < sizeof exact / sizeof exact[0]; i++) {
    assert_int_equal(fbits(ot_f16_to_f32(exact[i].h)), exact[i].f);
    assert_int_equal(ot_f32_to_f16(bitsf(exact[i].f)), exact[i].h);
  }
  assert_true(isnan(ot_f16_to_f32(0x7e00)));
  assert_true(isnan(ot_f16_to_f32(0x7c01))); /* signalling NaN stays NaN */
  assert_true(isnan(ot_f16_to_f32(0xfe00)));

  static const struct {
    float f;
    uint16_t h;
  } rounding[] = {
      {65519.0f, 0x7bff}, /* below the halfway point to 65536 */
      {65520.0f, 0x7c00}, /* halfway: ties to even, which is inf */
      {1e10f, 0x7c00},
      {-1e10f, 0xfc00},
      {0x1p-25f, 0x0000},        /* halfway between 0 and 2^-24: even is 0 */
      {0x1.000002p-25f, 0x0001}, /* just above halfway */
      {0x1.8p-24f, 0x0002},      /* 1.5 ulp: tie, rounds to even 2 */
      {0x1.4p-23f, 0x0002},      /* 2.5 ulp: tie, rounds to even 2 */
      {0x1.cp-23f, 0x0004},      /* 3.5 ulp: tie, rounds to even 4 */
      {1e-10f, 0x0000},
      {-1e-10f, 0x8000},
      {0x1p-149f, 0x0000},         /* fp32 subnormal */
      {1.0f + 0x1p-11f, 0x3c00},   /* tie at 1: stays even */
      {1.0f + 0x1.8p-10f, 0x3c02}, /* tie at 1+ulp: up to even */
      {0x1.002002p+0f, 0x3c01},    /* 1 + 2^-11 + 2^-23: just above the tie */
      {0x1.ffcp-15f, 0x0400},      /* rounds up from the subnormals into the normals */
      {2048.5f, 0x6800},
      {2049.0f, 0x6800},
      {2051.0f, 0x6802},
  };
  for (size_t i = 0; i < sizeof rounding / sizeof rounding[0]; i++)
    if (ot_f32_to_f16(rounding[i].f) != rounding[i].h)
      fail_msg("f32->f16 %a: got %04x want %04x", (double)rounding[i].f, ot_f32_to_f16(rounding[i].f),
               rounding[i].h);
  uint16_t n = ot_f32_to_f16(NAN);
  assert_true((n & 0x7c00) == 0x7c00 && (n & 0x3ff) != 0);
  n = ot_f32_to_f16(bitsf(0x7f800001)); /* payload only in bits dropped by the narrowing */
  assert_true((n & 0x7c00) == 0x7c00 && (n & 0x3ff) != 0);
  assert_int_equal(ot_f32_to_f16(INFINITY), 0x7c00);
  assert_int_equal(ot_f32_to_f16(-INFINITY), 0xfc00);

  /* Every fp16 value survives fp16 -> fp32 -> fp16. */
  for (uint32_t h = 0; h < 0x10000; h++) {
    float f = ot_f16_to_f32((uint16_t)h);
    int is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
    if (is_nan != isnan(f)) fail_msg("f16 %04x NaN-ness lost", h);
    if (!is_nan && ot_f32_to_f16(f) != h) fail_msg("f16 %04x round trip gave %04x", h, ot_f32_to_f16(f));
  }
}

static void test_bf16_known_bits(void **state) {
  (void)state;
  static const struct {
    uint16_t h;
    uint32_t f;
  } exact[] = {
      {0x0000, 0x00000000}, {0x8000, 0x80000000}, {0x3f80, 0x3f800000}, {0x4049, 0x40490000}, /* 3.140625 */
      {0x0001, 0x00010000},                                                                   /* subnormal */
      {0x0080, 0x00800000}, {0x7f7f, 0x7f7f0000}, {0x7f80, 0x7f800000}, {0xff80, 0xff800000},
  };
  for (size_t i = 0; i < sizeof exact / sizeof exact[0]; i++) {
    assert_int_equal(fbits(ot_bf16_to_f32(exact[i].h)), exact[i].f);
    assert_int_equal(ot_f32_to_bf16(bitsf(exact[i].f)), exact[i].h);
  }
  static const struct {
    uint32_t f;
    uint16_t h;
  } rounding[] = {
      {0x3f808000, 0x3f80},                                             /* tie, even stays */
      {0x3f818000, 0x3f82},                                             /* tie, odd rounds up */
      {0x3f808001, 0x3f81}, {0x3f807fff, 0x3f80}, {0x7f7fffff, 0x7f80}, /* FLT_MAX rounds to inf */
      {0x00008000, 0x0000}, {0x00018000, 0x0002},                       /* subnormal ties */
      {0x80008001, 0x8001},
  };
  for (size_t i = 0; i < sizeof rounding / sizeof rounding[0]; i++)
    if (ot_f32_to_bf16(bitsf(rounding[i].f)) != rounding[i].h)
      fail_msg("f32->bf16 %08x: got %04x want %04x", rounding[i].f, ot_f32_to_bf16(bitsf(rounding[i].f)),
               rounding[i].h);
  assert_true(isnan(ot_bf16_to_f32(0x7fc0)));
  assert_true(isnan(ot_bf16_to_f32(ot_f32_to_bf16(bitsf(0x7f800001))))); /* NaN must not become inf */
  assert_true(isnan(ot_bf16_to_f32(ot_f32_to_bf16(bitsf(0xffffffff)))));
  for (uint32_t h = 0; h < 0x10000; h++) {
    float f = ot_bf16_to_f32((uint16_t)h);
    if (!isnan(f) && ot_f32_to_bf16(f) != h) fail_msg("bf16 %04x round trip", h);
  }
}

/* ---- round trip through the writer ---- */

static const float rt_f32[6] = {1.5f, -2.25f, 0.0f, -0.0f, 3.4028235e38f, 1e-45f};
static const float rt_f16_src[5] = {1.0f, -0.5f, 65504.0f, 0x1p-24f, INFINITY};
static const float rt_bf16_src[4] = {3.140625f, -1e30f, 0x1p-133f, -INFINITY};
static const int8_t rt_i8[3] = {-128, 0, 127};
static const uint8_t rt_u8[3] = {0, 200, 255};
static const int32_t rt_i32[2] = {INT32_MIN, INT32_MAX};
static const int64_t rt_i64[2] = {INT64_MIN, INT64_MAX};
static const float rt_scalar = 7.0f;

/* Writes the round-trip file; returns its path. */
static char *write_roundtrip(const char *dir, uint16_t *f16, uint16_t *bf16) {
  for (int i = 0; i < 5; i++) f16[i] = ot_f32_to_f16(rt_f16_src[i]);
  for (int i = 0; i < 4; i++) bf16[i] = ot_f32_to_bf16(rt_bf16_src[i]);
  ot_st_writer *w = NULL;
  assert_int_equal(ot_st_writer_new(&w), OT_OK);
  int64_t s23[2] = {2, 3}, s5[1] = {5}, s22[2] = {2, 2}, s3[1] = {3}, s2[1] = {2}, s05[2] = {0, 5};
  assert_int_equal(ot_st_writer_add(w, "transformer.wte.weight", OT_DTYPE_F32, 2, s23, rt_f32), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "half", OT_DTYPE_F16, 1, s5, f16), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "brain", OT_DTYPE_BF16, 2, s22, bf16), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "i8", OT_DTYPE_I8, 1, s3, rt_i8), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "u8", OT_DTYPE_U8, 1, s3, rt_u8), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "i32", OT_DTYPE_I32, 1, s2, rt_i32), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "i64", OT_DTYPE_I64, 1, s2, rt_i64), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "scalar", OT_DTYPE_F32, 0, NULL, &rt_scalar), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "empty \"quoted\"\n", OT_DTYPE_F32, 2, s05, NULL), OT_OK);
  assert_int_equal(ot_st_writer_set_metadata(w, "format", "pt"), OT_OK);
  assert_int_equal(ot_st_writer_set_metadata(w, "blocks", "0,1"), OT_OK);
  assert_int_equal(ot_st_writer_set_metadata(w, "format", "offtune"), OT_OK); /* replaces */
  char *path = path_in(dir, "rt.safetensors");
  assert_int_equal(ot_st_writer_save(w, path), OT_OK);
  ot_st_writer_free(w);
  return path;
}

static void check_roundtrip(const ot_safetensors *st, const uint16_t *f16, const uint16_t *bf16) {
  static const char *const order[] = {
      "transformer.wte.weight", "half", "brain", "i8", "u8", "i32", "i64", "scalar", "empty \"quoted\"\n"};
  assert_int_equal(ot_st_count(st), 9);
  uint64_t off = 0;
  for (size_t i = 0; i < 9; i++) {
    const ot_st_tensor *t = ot_st_at(st, i);
    assert_non_null(t);
    assert_string_equal(t->name, order[i]);
    assert_ptr_equal(ot_st_find(st, order[i]), t);
    assert_int_equal(t->offset, off); /* insertion order, contiguous */
    off += t->nbytes;
  }
  assert_null(ot_st_at(st, 9));
  assert_null(ot_st_find(st, "missing"));
  assert_null(ot_st_find(st, ""));
  assert_string_equal(ot_st_metadata(st, "format"), "offtune");
  assert_string_equal(ot_st_metadata(st, "blocks"), "0,1");
  assert_null(ot_st_metadata(st, "nope"));

  const ot_st_tensor *t = ot_st_find(st, "transformer.wte.weight");
  assert_int_equal(t->dtype, OT_DTYPE_F32);
  assert_int_equal(t->ndim, 2);
  assert_int_equal(t->shape[0], 2);
  assert_int_equal(t->shape[1], 3);
  assert_int_equal(t->numel, 6);
  assert_int_equal(t->nbytes, 24);
  assert_memory_equal(ot_st_data(st, t), rt_f32, sizeof rt_f32);
  float out[6];
  assert_int_equal(ot_st_read_f32(st, t, out, 6), OT_OK);
  for (int i = 0; i < 6; i++) assert_true(same_float(out[i], rt_f32[i]));
  assert_int_equal(ot_st_read_f32(st, t, out, 5), OT_ERR_MISMATCH);

  t = ot_st_find(st, "half");
  assert_int_equal(t->dtype, OT_DTYPE_F16);
  assert_memory_equal(ot_st_data(st, t), f16, 10);
  assert_int_equal(ot_st_read_f32(st, t, out, 5), OT_OK);
  for (int i = 0; i < 5; i++) assert_true(same_float(out[i], rt_f16_src[i])); /* all exact in fp16 */

  t = ot_st_find(st, "brain");
  assert_int_equal(t->dtype, OT_DTYPE_BF16);
  assert_memory_equal(ot_st_data(st, t), bf16, 8);
  assert_int_equal(ot_st_read_f32(st, t, out, 4), OT_OK);
  assert_true(same_float(out[0], 3.140625f));
  assert_true(same_float(out[1], ot_bf16_to_f32(ot_f32_to_bf16(-1e30f))));
  assert_true(same_float(out[2], 0x1p-133f));
  assert_true(same_float(out[3], -INFINITY));

  t = ot_st_find(st, "i8");
  assert_memory_equal(ot_st_data(st, t), rt_i8, 3);
  assert_int_equal(ot_st_read_f32(st, t, out, 3), OT_ERR_UNSUPPORTED);
  assert_memory_equal(ot_st_data(st, ot_st_find(st, "u8")), rt_u8, 3);
  assert_memory_equal(ot_st_data(st, ot_st_find(st, "i32")), rt_i32, 8);
  assert_memory_equal(ot_st_data(st, ot_st_find(st, "i64")), rt_i64, 16);

  t = ot_st_find(st, "scalar");
  assert_int_equal(t->ndim, 0);
  assert_int_equal(t->numel, 1);
  assert_int_equal(ot_st_read_f32(st, t, out, 1), OT_OK);
  assert_true(out[0] == 7.0f);

  t = ot_st_find(st, "empty \"quoted\"\n");
  assert_int_equal(t->numel, 0);
  assert_int_equal(t->nbytes, 0);
  assert_int_equal(ot_st_read_f32(st, t, NULL, 0), OT_OK);
}

static void test_roundtrip_all_dtypes(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("st_roundtrip");
  uint16_t f16[5], bf16[4];
  char *path = write_roundtrip(dir, f16, bf16);
  assert_int_equal(count_entries(dir), 1); /* no temporary file left behind */

  /* Layout: header length a multiple of 8, padded with spaces, tensors right after. */
  size_t len = 0;
  unsigned char *raw = slurp(path, &len);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | raw[i];
  assert_int_equal(hlen % 8, 0);
  assert_true(8 + hlen <= len);
  assert_int_equal(raw[8], '{');
  size_t last = 8 + hlen - 1;
  while (raw[last] == ' ') last--;
  assert_int_equal(raw[last], '}');

  ot_safetensors *st = NULL;
  assert_int_equal(ot_st_open(path, &st), OT_OK);
  check_roundtrip(st, f16, bf16);
  ot_st_close(st);

  st = NULL;
  assert_int_equal(ot_st_open_memory(raw, len, &st), OT_OK);
  memset(raw, 0xAA, len); /* the reader owns a copy */
  check_roundtrip(st, f16, bf16);
  ot_st_close(st);
  free(raw);

  /* Saving again replaces the file in place. */
  ot_st_writer *w = NULL;
  assert_int_equal(ot_st_writer_new(&w), OT_OK);
  assert_int_equal(ot_st_writer_save(w, path), OT_OK);
  ot_st_writer_free(w);
  assert_int_equal(ot_st_open(path, &st), OT_OK);
  assert_int_equal(ot_st_count(st), 0);
  assert_null(ot_st_metadata(st, "format"));
  ot_st_close(st);
  assert_int_equal(count_entries(dir), 1);
  free(path);
  free(dir);
}

static void test_writer_errors(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("st_writer_errors");
  ot_st_writer *w = NULL;
  assert_int_equal(ot_st_writer_new(&w), OT_OK);
  float x[4] = {0};
  int64_t s[9] = {4, 1, 1, 1, 1, 1, 1, 1, 1}, neg[1] = {-1}, big[3] = {1LL << 40, 1LL << 40, 1LL << 40};
  assert_int_equal(ot_st_writer_add(w, "a", OT_DTYPE_F32, 1, s, x), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "a", OT_DTYPE_F32, 1, s, x), OT_ERR_INVALID);
  assert_non_null(strstr(ot_error_detail(), "'a'"));
  assert_int_equal(ot_st_writer_add(w, "", OT_DTYPE_F32, 1, s, x), OT_ERR_INVALID);
  assert_int_equal(ot_st_writer_add(w, "__metadata__", OT_DTYPE_F32, 1, s, x), OT_ERR_INVALID);
  assert_int_equal(ot_st_writer_add(w, "b", OT_DTYPE_F32, 9, s, x), OT_ERR_INVALID);
  assert_int_equal(ot_st_writer_add(w, "b", OT_DTYPE_F32, -1, s, x), OT_ERR_INVALID);
  assert_int_equal(ot_st_writer_add(w, "b", OT_DTYPE_F32, 1, neg, x), OT_ERR_INVALID);
  assert_int_equal(ot_st_writer_add(w, "b", OT_DTYPE_F32, 3, big, x), OT_ERR_INVALID);
  assert_int_equal(ot_st_writer_add(w, "b", OT_DTYPE_F32, 1, s, NULL), OT_ERR_INVALID);
  assert_int_equal(ot_st_writer_add(w, "b", (ot_dtype)42, 1, s, x), OT_ERR_INVALID);
  assert_int_equal(ot_st_writer_add(w, NULL, OT_DTYPE_F32, 1, s, x), OT_ERR_INVALID);
  assert_int_equal(ot_st_writer_set_metadata(w, "k", NULL), OT_ERR_INVALID);

  /* A directory that does not exist: error, and nothing created. */
  char *bad = path_in(dir, "no/such/dir/x.safetensors");
  int rc = ot_st_writer_save(w, bad);
  assert_true(rc == OT_ERR_NOTFOUND || rc == OT_ERR_IO);
  assert_non_null(strstr(ot_error_detail(), "x.safetensors"));
  assert_int_equal(count_entries(dir), 0);
  free(bad);
  ot_st_writer_free(w);
  ot_st_writer_free(NULL);
  free(dir);
}

/* ---- malformed input ---- */

/* A safetensors image from a header text and `data_len` bytes of data. */
static unsigned char *mk(const char *header, size_t data_len, size_t *size) {
  size_t h = strlen(header);
  *size = 8 + h + data_len;
  unsigned char *b = calloc(1, *size);
  assert_non_null(b);
  for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)h >> (8 * i));
  memcpy(b + 8, header, h);
  return b;
}

/* Expects `rc` from opening the image, a detail that mentions `needle`, and no output. */
static void expect_bad(const char *header, size_t data_len, int rc, const char *needle) {
  size_t size;
  unsigned char *b = mk(header, data_len, &size);
  ot_safetensors *st = (ot_safetensors *)&size; /* sentinel: must not be overwritten */
  ot_error_clear();
  int got = ot_st_open_memory(b, size, &st);
  if (got != rc) fail_msg("header %s: got %d (%s), want %d", header, got, ot_error_detail(), rc);
  assert_ptr_equal(st, (ot_safetensors *)&size);
  if (needle && !strstr(ot_error_detail(), needle))
    fail_msg("header %s: detail '%s' lacks '%s'", header, ot_error_detail(), needle);
  free(b);
}

static void expect_good(const char *header, size_t data_len, size_t count) {
  size_t size;
  unsigned char *b = mk(header, data_len, &size);
  ot_safetensors *st = NULL;
  int rc = ot_st_open_memory(b, size, &st);
  if (rc != OT_OK) fail_msg("header %s: %s", header, ot_error_detail());
  assert_int_equal(ot_st_count(st), count);
  ot_st_close(st);
  free(b);
}

static void test_malformed_headers(void **state) {
  (void)state;
  const int F = OT_ERR_FORMAT, U = OT_ERR_UNSUPPORTED;
  expect_good("{}", 0, 0);
  expect_good("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}   ", 4, 1);
  expect_good(
      "  {\"__metadata__\":null,\"a\":{\"shape\":[],\"data_offsets\":[0,1],\"dtype\":\"U8\",\"x\":1}}\n", 1,
      1);
  /* A zero dimension makes any other dimension harmless. */
  expect_good("{\"z\":{\"dtype\":\"F32\",\"shape\":[9007199254740992,0],\"data_offsets\":[0,0]}}", 0, 1);

  /* Not JSON, or not an object. */
  expect_bad("", 0, F, "JSON");
  expect_bad("not json", 0, F, "JSON");
  expect_bad("{", 0, F, "JSON");
  expect_bad("{\"a\":}", 0, F, "JSON");
  expect_bad("[1,2]", 0, F, "object");
  expect_bad("\"str\"", 0, F, "object");
  expect_bad("{} x", 0, F, "junk");
  expect_bad("{}{}", 0, F, "junk");
  /* Wrong types. */
  expect_bad("{\"a\":5}", 0, F, "'a'");
  expect_bad("{\"a\":{\"dtype\":5,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, F, "dtype");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":\"1\",\"data_offsets\":[0,4]}}", 4, F, "shape");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4, F, "shape");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, F, "shape");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, F, "shape");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[null],\"data_offsets\":[0,4]}}", 4, F, "shape");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, F, "data_offsets");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, F, "data_offsets");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":{\"0\":4}}}", 4, F, "data_offsets");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[\"0\",\"4\"]}}", 4, F,
             "data_offsets");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, F, "data_offsets");
  expect_bad("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, F, "dtype");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, F, "shape");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, F, "data_offsets");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, F,
             "twice");
  expect_bad("{\"__metadata__\":[\"x\"]}", 0, F, "__metadata__");
  expect_bad("{\"__metadata__\":{\"k\":1}}", 0, F, "'k'");
  expect_bad("{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", 0, F, "twice");
  expect_bad("{\"__metadata__\":{},\"__metadata__\":{}}", 0, F, "twice");
  /* Unsupported dtypes name the dtype. */
  expect_bad("{\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8, U, "F64");
  expect_bad("{\"a\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, U, "BOOL");
  expect_bad("{\"a\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, U, "f32");
  expect_bad("{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, U, "F8_E4M3");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, U,
             "dimensions");
  /* Shape and byte size disagree. */
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, F, "'a'");
  expect_bad("{\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, F, "F16");
  /* Offsets out of range. */
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, F, "outside");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8, F, "outside");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[18446744073709551612,"
             "18446744073709551616]}}",
             4, F, "data_offsets");
  /* Tiling: gap, overlap, leftover bytes, data with no tensors. */
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
             "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
             12, F, "gap");
  expect_bad("{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]},"
             "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
             8, F, "overlap");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, F, "gap");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8, F, "cover");
  expect_bad("{}", 1, F, "cover");
  /* Duplicates. */
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
             "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
             8, F, "twice");
  expect_bad("{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]},"
             "\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
             0, F, "twice");
  /* Huge dimensions: element count or byte size overflows 64 bits, or past 2^53. */
  expect_bad(
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,4]}}", 4, F,
      "overflow");
  expect_bad("{\"a\":{\"dtype\":\"I64\",\"shape\":[2147483648,2147483648],\"data_offsets\":[0,0]}}", 0, F,
             "overflow");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[9007199254740994],\"data_offsets\":[0,4]}}", 4, F,
             "shape");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,4]}}", 4, F, "shape");
  expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1e999],\"data_offsets\":[0,4]}}", 4, F, "shape");
}

static void test_malformed_lengths(void **state) {
  (void)state;
  /* Header length past the end of the file, and absurd lengths. */
  unsigned char b[64];
  memset(b, ' ', sizeof b);
  memcpy(b + 8, "{}", 2);
  ot_safetensors *st = NULL;
  for (int i = 0; i < 8; i++) b[i] = 0;
  b[0] = 57;
  assert_int_equal(ot_st_open_memory(b, sizeof b, &st), OT_ERR_FORMAT);
  assert_non_null(strstr(ot_error_detail(), "past the end"));
  b[0] = 56;
  assert_int_equal(ot_st_open_memory(b, sizeof b, &st), OT_OK); /* "{}" + 54 spaces */
  ot_st_close(st);
  st = NULL;
  for (int i = 0; i < 8; i++) b[i] = 0xff;
  assert_int_equal(ot_st_open_memory(b, sizeof b, &st), OT_ERR_FORMAT);
  b[7] = 0;
  b[0] = b[1] = b[2] = b[3] = b[4] = b[5] = b[6] = 0;
  b[3] = 0x10; /* 256 MiB, over the header cap */
  assert_int_equal(ot_st_open_memory(b, sizeof b, &st), OT_ERR_FORMAT);
  assert_non_null(strstr(ot_error_detail(), "limit"));
  for (size_t n = 0; n < 8; n++) assert_int_equal(ot_st_open_memory(b, n, &st), OT_ERR_FORMAT);
  assert_int_equal(ot_st_open_memory(NULL, 0, &st), OT_ERR_FORMAT);
  assert_int_equal(ot_st_open_memory(NULL, 5, &st), OT_ERR_INVALID);
  /* A NUL inside the header. */
  memcpy(b, (unsigned char[8]){4, 0, 0, 0, 0, 0, 0, 0}, 8);
  memcpy(b + 8, "{}\0 ", 4);
  assert_int_equal(ot_st_open_memory(b, 12, &st), OT_ERR_FORMAT);
  assert_null(st);

  /* Every truncation of a valid file fails cleanly, in memory and on disk. */
  char *dir = ot_test_tmpdir("st_truncated");
  uint16_t f16[5], bf16[4];
  char *path = write_roundtrip(dir, f16, bf16);
  size_t len = 0;
  unsigned char *raw = slurp(path, &len);
  for (size_t n = 0; n < len; n++) {
    int rc = ot_st_open_memory(raw, n, &st);
    if (rc != OT_ERR_FORMAT) fail_msg("truncated to %zu of %zu: got %d (%s)", n, len, rc, ot_error_detail());
  }
  char *cut = path_in(dir, "cut.safetensors");
  for (size_t n = 0; n < len; n += 37) {
    assert_int_equal(ot_file_write_atomic(cut, raw, n), OT_OK);
    assert_int_equal(ot_st_open(cut, &st), OT_ERR_FORMAT);
    assert_non_null(strstr(ot_error_detail(), "cut.safetensors"));
  }
  /* Extra bytes at the end are not tensor data either. */
  unsigned char *longer = malloc(len + 1);
  assert_non_null(longer);
  memcpy(longer, raw, len);
  longer[len] = 0;
  assert_int_equal(ot_st_open_memory(longer, len + 1, &st), OT_ERR_FORMAT);
  /* Every single-byte corruption of the header is refused or yields a consistent file. */
  for (size_t i = 0; i < len; i++) {
    unsigned char save = raw[i];
    raw[i] ^= 0x5a;
    if (ot_st_open_memory(raw, len, &st) == OT_OK) {
      for (size_t k = 0; k < ot_st_count(st); k++) {
        const ot_st_tensor *t = ot_st_at(st, k);
        assert_ptr_equal(ot_st_find(st, t->name), t);
      }
      ot_st_close(st);
      st = NULL;
    }
    raw[i] = save;
  }
  assert_null(st);
  free(longer);
  free(raw);
  free(cut);
  free(path);
  free(dir);
}

static void test_open_errors(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("st_open_errors");
  char *missing = path_in(dir, "missing.safetensors");
  ot_safetensors *st = NULL;
  assert_int_equal(ot_st_open(missing, &st), OT_ERR_NOTFOUND);
  assert_non_null(strstr(ot_error_detail(), "missing.safetensors"));
  assert_int_equal(ot_st_open(dir, &st), OT_ERR_IO);
  assert_null(st);
  free(missing);
  free(dir);
}

/* ---- cross-check with the Python reference ---- */

/* Checks an open file against a dump written by tests/ref/st_write.py. */
static void check_against_dump(const ot_safetensors *st, const char *dump_path) {
  size_t len = 0;
  char *text = (char *)slurp(dump_path, &len);
  size_t n_tensors = 0;
  char *save_line = NULL;
  for (char *line = strtok_r(text, "\n", &save_line); line; line = strtok_r(NULL, "\n", &save_line)) {
    char *save = NULL;
    char *kind = strtok_r(line, " ", &save);
    if (strcmp(kind, "meta") == 0) {
      char *k = strtok_r(NULL, " ", &save), *v = strtok_r(NULL, " ", &save);
      assert_non_null(ot_st_metadata(st, k));
      assert_string_equal(ot_st_metadata(st, k), v);
      continue;
    }
    assert_string_equal(kind, "tensor");
    const char *name = strtok_r(NULL, " ", &save);
    const ot_st_tensor *t = ot_st_find(st, name);
    if (!t) fail_msg("tensor %s missing", name);
    assert_ptr_equal(ot_st_at(st, n_tensors), t); /* both list tensors by data offset */
    n_tensors++;
    assert_string_equal(ot_dtype_name(t->dtype), strtok_r(NULL, " ", &save));
    assert_int_equal(t->ndim, atoi(strtok_r(NULL, " ", &save)));
    for (int d = 0; d < t->ndim; d++)
      assert_int_equal(t->shape[d], strtoll(strtok_r(NULL, " ", &save), NULL, 10));
    uint64_t numel = strtoull(strtok_r(NULL, " ", &save), NULL, 10);
    assert_int_equal(t->numel, numel);
    int is_float = t->dtype == OT_DTYPE_F32 || t->dtype == OT_DTYPE_F16 || t->dtype == OT_DTYPE_BF16;
    float *f = malloc((numel ? numel : 1) * sizeof *f);
    assert_non_null(f);
    if (is_float) assert_int_equal(ot_st_read_f32(st, t, f, numel), OT_OK);
    const unsigned char *raw = ot_st_data(st, t);
    for (uint64_t i = 0; i < numel; i++) {
      const char *tok = strtok_r(NULL, " ", &save);
      assert_non_null(tok);
      if (is_float) {
        float want = strtof(tok, NULL);
        if (!same_float(f[i], want))
          fail_msg("%s[%llu]: %a, python says %s", name, (unsigned long long)i, (double)f[i], tok);
        continue;
      }
      long long want = strtoll(tok, NULL, 10), got = 0;
      switch (t->dtype) {
      case OT_DTYPE_I8: got = (int8_t)raw[i]; break;
      case OT_DTYPE_U8: got = raw[i]; break;
      case OT_DTYPE_I32: {
        int32_t v;
        memcpy(&v, raw + 4 * i, 4);
        got = v;
        break;
      }
      case OT_DTYPE_I64: {
        int64_t v;
        memcpy(&v, raw + 8 * i, 8);
        got = v;
        break;
      }
      default: fail_msg("unexpected dtype");
      }
      if (got != want) fail_msg("%s[%llu]: %lld, python says %lld", name, (unsigned long long)i, got, want);
    }
    assert_null(strtok_r(NULL, " ", &save));
    free(f);
  }
  assert_int_equal(n_tensors, ot_st_count(st));
  free(text);
}

static const char *python(void) {
  const char *py = getenv("OT_PYTHON");
  return py && *py ? py : "python3";
}

static void test_python_written_file_loads(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("st_python");
  assert_int_equal(
      ot_test_system("%s '%s/tests/ref/st_write.py' write '%s'", python(), ot_test_source_dir(), dir), 0);
  char *path = path_in(dir, "ref.safetensors"), *txt = path_in(dir, "ref.txt");
  ot_safetensors *st = NULL;
  assert_int_equal(ot_st_open(path, &st), OT_OK);
  assert_int_equal(ot_st_count(st), 9);
  check_against_dump(st, txt);
  assert_string_equal(ot_st_metadata(st, "format"), "pt");
  ot_st_close(st);

  /* fp32 -> fp16/bf16 rounding agrees with numpy and torch on every case they produced. */
  char *conv = path_in(dir, "conv.txt");
  size_t len = 0;
  char *text = (char *)slurp(conv, &len);
  size_t n = 0;
  char *save = NULL;
  for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    unsigned x, h, b;
    if (sscanf(line, "conv %x %x %x", &x, &h, &b) != 3) fail_msg("bad line %s", line);
    float f = bitsf(x);
    uint16_t gh = ot_f32_to_f16(f), gb = ot_f32_to_bf16(f);
    if (gh != h) fail_msg("f32 %08x (%a) -> f16: got %04x, numpy %04x", x, (double)f, gh, h);
    if (gb != b) fail_msg("f32 %08x (%a) -> bf16: got %04x, torch %04x", x, (double)f, gb, b);
    n++;
  }
  assert_true(n > 10000);
  free(text);
  free(conv);
  free(txt);
  free(path);
  free(dir);
}

static void test_c_written_file_reads_in_python(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("st_c_to_python");
  ot_st_writer *w = NULL;
  assert_int_equal(ot_st_writer_new(&w), OT_OK);
  float big[1000];
  for (int i = 0; i < 1000; i++) big[i] = (float)i * 0.37f - 100.0f;
  uint16_t h[1000], bh[1000];
  for (int i = 0; i < 1000; i++) {
    h[i] = ot_f32_to_f16(big[i]);
    bh[i] = ot_f32_to_bf16(big[i]);
  }
  int64_t s[2] = {10, 100}, s1[1] = {2};
  assert_int_equal(ot_st_writer_add(w, "w.f32", OT_DTYPE_F32, 2, s, big), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "w.f16", OT_DTYPE_F16, 2, s, h), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "w.bf16", OT_DTYPE_BF16, 2, s, bh), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "w.i8", OT_DTYPE_I8, 1, s1, rt_i8), OT_OK);
  assert_int_equal(ot_st_writer_add(w, "w.i64", OT_DTYPE_I64, 1, s1, rt_i64), OT_OK);
  assert_int_equal(ot_st_writer_set_metadata(w, "format", "pt"), OT_OK);
  char *p2 = path_in(dir, "c.safetensors"), *dump = path_in(dir, "c.txt");
  assert_int_equal(ot_st_writer_save(w, p2), OT_OK);
  ot_st_writer_free(w);
  assert_int_equal(ot_test_system("%s '%s/tests/ref/st_write.py' dump '%s' '%s'", python(),
                                  ot_test_source_dir(), p2, dump),
                   0);
  ot_safetensors *st = NULL;
  assert_int_equal(ot_st_open(p2, &st), OT_OK);
  check_against_dump(st, dump);
  float back[1000];
  assert_int_equal(ot_st_read_f32(st, ot_st_find(st, "w.f32"), back, 1000), OT_OK);
  assert_memory_equal(back, big, sizeof big);
  ot_st_close(st);
  free(p2);
  free(dump);
  free(dir);
}

/* ---- file helpers ---- */

static void test_fileio(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("fileio");
  char *p = NULL;
  assert_int_equal(ot_path_join("a/", "b", &p), OT_OK);
  assert_string_equal(p, "a/b");
  free(p);
  assert_int_equal(ot_path_join("a", "b", &p), OT_OK);
  assert_string_equal(p, "a/b");
  free(p);
  assert_int_equal(ot_path_join("", "b", &p), OT_OK);
  assert_string_equal(p, "b");
  free(p);

  char *nested = path_in(dir, "x/y//z/");
  assert_int_equal(ot_mkdir_p(nested), OT_OK);
  assert_int_equal(ot_mkdir_p(nested), OT_OK); /* already there */
  assert_true(ot_file_exists(nested));
  char *file = path_in(dir, "x/f.txt");
  assert_false(ot_file_exists(file));
  assert_int_equal(ot_file_write_atomic(file, "hello", 5), OT_OK);
  assert_true(ot_file_exists(file));
  struct stat sb;
  assert_int_equal(stat(file, &sb), 0);
  assert_int_equal(sb.st_mode & 0777, 0644);
  char *under_file = path_in(file, "sub");
  assert_int_equal(ot_mkdir_p(under_file), OT_ERR_IO);
  assert_int_equal(ot_mkdir_p(file), OT_ERR_IO);

  char *buf = NULL;
  size_t len = 0;
  assert_int_equal(ot_file_read_all(file, 5, &buf, &len), OT_OK);
  assert_int_equal(len, 5);
  assert_string_equal(buf, "hello");
  free(buf);
  buf = NULL;
  assert_int_equal(ot_file_read_all(file, 4, &buf, &len), OT_ERR_RANGE);
  assert_null(buf);
  assert_int_equal(ot_file_write_atomic(file, "", 0), OT_OK); /* replaces */
  assert_int_equal(ot_file_read_all(file, 0, &buf, &len), OT_OK);
  assert_int_equal(len, 0);
  assert_string_equal(buf, "");
  free(buf);
  buf = NULL;
  char *missing = path_in(dir, "nope");
  assert_int_equal(ot_file_read_all(missing, 100, &buf, &len), OT_ERR_NOTFOUND);
  assert_non_null(strstr(ot_error_detail(), "nope"));
  assert_int_equal(ot_file_read_all(dir, 100, &buf, &len), OT_ERR_IO);
  /* A FIFO (no writer), a device and a directory are refused at once, without reading. */
  char *fifo = path_in(dir, "fifo");
  assert_int_equal(ot_test_system("rm -f %s && mkfifo %s", fifo, fifo), 0);
  assert_int_equal(ot_file_read_all(fifo, 100, &buf, &len), OT_ERR_IO);
  assert_non_null(strstr(ot_error_detail(), "FIFO"));
  ot_safetensors *fst = NULL;
  assert_int_equal(ot_st_open(fifo, &fst), OT_ERR_IO);
  assert_int_equal(ot_file_read_all("/dev/zero", 1 << 20, &buf, &len), OT_ERR_IO);
  assert_non_null(strstr(ot_error_detail(), "character device"));
  assert_int_equal(ot_st_open("/dev/zero", &fst), OT_ERR_IO);
  assert_null(buf);
  char hex[OT_DIGEST_HEX];
  assert_int_equal(ot_file_digest("/dev/urandom", hex), OT_ERR_IO);
  assert_int_equal(ot_file_digest(fifo, hex), OT_ERR_IO);
  free(fifo);
  /* /proc files say they are empty: read until EOF, still capped. */
  assert_int_equal(ot_file_read_all("/proc/self/status", 1 << 20, &buf, &len), OT_OK);
  assert_true(len > 0 && strlen(buf) == len);
  free(buf);
  buf = NULL;
  assert_int_equal(ot_file_read_all("/proc/self/status", 10, &buf, &len), OT_ERR_RANGE);
  assert_null(buf);

  /* Aborting a streamed write leaves nothing behind; committing publishes it. */
  char *xdir = path_in(dir, "x");
  int before = count_entries(xdir);
  ot_atomic_file *af = NULL;
  char *stream = path_in(dir, "x/stream.bin");
  assert_int_equal(ot_atomic_open(stream, &af), OT_OK);
  assert_int_equal(ot_atomic_write(af, "abc", 3), OT_OK);
  ot_atomic_abort(af);
  assert_int_equal(count_entries(xdir), before);
  assert_int_equal(ot_atomic_open(stream, &af), OT_OK);
  assert_int_equal(ot_atomic_write(af, "abc", 3), OT_OK);
  assert_int_equal(ot_atomic_write(af, "def", 3), OT_OK);
  assert_int_equal(ot_atomic_commit(af), OT_OK);
  assert_int_equal(ot_file_read_all(stream, 100, &buf, &len), OT_OK);
  assert_string_equal(buf, "abcdef");
  assert_int_equal(count_entries(xdir), before + 1);
  free(buf);
  free(stream);
  free(xdir);
  free(missing);
  free(under_file);
  free(file);
  free(nested);
  free(dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_dtype_info),
      cmocka_unit_test(test_f16_known_bits),
      cmocka_unit_test(test_bf16_known_bits),
      cmocka_unit_test(test_roundtrip_all_dtypes),
      cmocka_unit_test(test_writer_errors),
      cmocka_unit_test(test_malformed_headers),
      cmocka_unit_test(test_malformed_lengths),
      cmocka_unit_test(test_open_errors),
      cmocka_unit_test(test_python_written_file_loads),
      cmocka_unit_test(test_c_written_file_reads_in_python),
      cmocka_unit_test(test_fileio),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
