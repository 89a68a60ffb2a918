/* Tokenizers: GPT-2 byte-level BPE and a plain byte tokenizer.
 *
 * The BPE reproduces the npm package gpt-3-encoder (Encoder.js) id for id:
 *  - pre-tokenisation is a hand-written matcher for its regex
 *    /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu
 *    with character classes generated from Node (ot_unicode_table.h);
 *  - each pre-token's bytes go through the byte-to-unicode map and the merge
 *    loop: repeatedly take the lowest-ranked adjacent pair and merge all its
 *    occurrences left to right.
 *  Encoder.js looks ranks up by the string `first + "," + second`, so a pair
 *  such as ('",', '"') borrows the rank of the merge ('"', ',"'); we add those
 *  aliases at load time (11 of them in the GPT-2 merges) to stay identical.
 *
 * Invalid UTF-8: every byte that does not start a well-formed sequence is one
 * "other" (symbol) character for pre-tokenisation, exactly the class of the
 * U+FFFD that JavaScript would substitute, and its raw byte is BPE-encoded like
 * any other byte. Nothing is rejected, and decode(encode(x)) == x for all x.
 *
 * Thread safety: encode, decode and vocab_size may run concurrently on one
 * handle. The per-word cache is sharded and each shard has its own mutex. */
#include "ot_tokenizer.h"

#include "ot_error.h"
#include "ot_fileio.h"
#include "ot_unicode.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOK_MAX_FILE ((size_t)256 << 20) /* vocab.json / merges.txt size limit */
#define TOK_MAX_VOCAB (1 << 24)
#define TOK_MAX_WORD (INT32_MAX / 4) /* positions in a pre-token are int32 */
#define CACHE_SHARDS 16
#define CACHE_MAX_WORD 255 /* longer pre-tokens are rare: not worth caching */
#define CACHE_MIN_SLOTS 1024u
#define CACHE_MAX_SLOTS (1u << 15)
#define CACHE_MAX_KEY_BYTES (1u << 20) /* per shard; a full shard starts over */
#define BYTE_CLASS "offtune-byte"
#define BPE_CLASS "GPT2Tokenizer"

enum { KIND_BYTE = 1, KIND_BPE = 2, KIND_HF = 3 };

struct hf_spec;
static void hf_free(struct hf_spec *h);

typedef struct {
  uint64_t key; /* (a << 32) | b; UINT64_MAX when empty */
  int32_t rank, merged;
} pair_slot;

typedef struct {
  uint64_t hash; /* 0 when empty */
  uint32_t key_off, ids_off;
  uint16_t key_len, n_ids;
} cache_slot;

typedef struct {
  pthread_mutex_t mu;
  cache_slot *slots;
  uint32_t cap, count;
  uint8_t *keys;
  uint32_t keys_len, keys_cap;
  int32_t *ids;
  uint32_t ids_len, ids_cap;
} cache_shard;

struct ot_tokenizer {
  int kind;
  int32_t vocab_size; /* largest id + 1 */
  /* BPE only from here on. */
  char *text;                    /* token strings as in vocab.json, NUL-separated */
  uint32_t *text_off, *text_len; /* per id; text_len is UINT32_MAX for a gap in the ids */
  uint8_t *raw;                  /* the bytes each token decodes to */
  uint32_t *raw_off;             /* vocab_size + 1 prefix offsets into raw */
  int32_t *vmap;                 /* token string -> id, open addressing, -1 empty */
  uint64_t vmap_mask;
  int32_t (*merges)[2]; /* merges.txt in file order, kept for save */
  size_t n_merges;
  pair_slot *pairs; /* (a, b) -> rank and merged id */
  uint64_t pairs_mask, pairs_count;
  int32_t byte_id[256];
  uint8_t ascii_cls[128];
  cache_shard *cache; /* CACHE_SHARDS shards, mutexes initialised */
  struct hf_spec *hf; /* KIND_HF only */
};

/* ---------------------------------------------------------------- helpers */

static uint64_t hash_bytes(const void *p, size_t n) {
  const uint8_t *s = p;
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
  h ^= h >> 32;
  h *= 0xd6e8feb86659fd93ull;
  h ^= h >> 32;
  return h;
}

static uint64_t hash_u64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

static uint64_t pow2_at_least(uint64_t n) {
  uint64_t c = 16;
  while (c < n) c <<= 1;
  return c;
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the other
 * 68 bytes to U+0100.. in byte order, so every byte is a visible character. */
static void bytes_to_unicode(uint16_t cp_of[256]) {
  uint16_t n = 0;
  for (int b = 0; b < 256; b++) {
    bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    cp_of[b] = printable ? (uint16_t)b : (uint16_t)(256 + n++);
  }
}

static size_t utf8_put(uint32_t cp, char *out) {
  if (cp < 0x80) {
    out[0] = (char)cp;
    return 1;
  }
  /* Only code points below U+0800 come out of bytes_to_unicode. */
  out[0] = (char)(0xC0 | (cp >> 6));
  out[1] = (char)(0x80 | (cp & 0x3F));
  return 2;
}

static int32_t vocab_find(const ot_tokenizer *t, const char *s, size_t len) {
  for (uint64_t i = hash_bytes(s, len) & t->vmap_mask;; i = (i + 1) & t->vmap_mask) {
    int32_t id = t->vmap[i];
    if (id < 0) return -1;
    if (t->text_len[id] == len && memcmp(t->text + t->text_off[id], s, len) == 0) return id;
  }
}

static const pair_slot *pair_find(const ot_tokenizer *t, int32_t a, int32_t b) {
  uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
  for (uint64_t i = hash_u64(key) & t->pairs_mask;; i = (i + 1) & t->pairs_mask) {
    const pair_slot *s = &t->pairs[i];
    if (s->key == key) return s;
    if (s->key == UINT64_MAX) return NULL;
  }
}

static void pair_insert(pair_slot *slots, uint64_t mask, uint64_t key, int32_t rank, int32_t merged,
                        uint64_t *count) {
  uint64_t i = hash_u64(key) & mask;
  while (slots[i].key != UINT64_MAX && slots[i].key != key) i = (i + 1) & mask;
  if (slots[i].key == UINT64_MAX) ++*count;
  slots[i] = (pair_slot){key, rank, merged};
}

/* Sets (or overwrites: later merges win, as in Encoder.js) the rank of a pair. */
static int pair_set(ot_tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t merged) {
  if ((t->pairs_count + 1) * 2 > t->pairs_mask + 1) {
    uint64_t ncap = (t->pairs_mask + 1) * 2;
    pair_slot *ns = malloc(ncap * sizeof *ns);
    if (!ns) return ot_error(OT_ERR_NOMEM, "cannot allocate the BPE merge table");
    for (uint64_t i = 0; i < ncap; i++) ns[i].key = UINT64_MAX;
    uint64_t cnt = 0;
    for (uint64_t i = 0; i <= t->pairs_mask; i++)
      if (t->pairs[i].key != UINT64_MAX)
        pair_insert(ns, ncap - 1, t->pairs[i].key, t->pairs[i].rank, t->pairs[i].merged, &cnt);
    free(t->pairs);
    t->pairs = ns;
    t->pairs_mask = ncap - 1;
  }
  uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
  pair_insert(t->pairs, t->pairs_mask, key, rank, merged, &t->pairs_count);
  return OT_OK;
}

static int read_json(const char *path, cJSON **out) {
  char *buf = NULL;
  size_t len = 0;
  int rc = ot_file_read_all(path, TOK_MAX_FILE, &buf, &len);
  if (rc != OT_OK) return rc;
  cJSON *root = cJSON_ParseWithLength(buf, len);
  free(buf);
  if (!root) return ot_error(OT_ERR_FORMAT, "%s: not valid JSON", path);
  *out = root;
  return OT_OK;
}

typedef struct {
  char *p;
  size_t n, cap;
  bool oom;
} sbuf;

static void sb_put(sbuf *b, const void *s, size_t n) {
  if (b->oom) return;
  if (b->n + n + 1 > b->cap) {
    size_t c = b->cap ? b->cap : 4096;
    while (c < b->n + n + 1) c *= 2;
    char *p = realloc(b->p, c);
    if (!p) {
      b->oom = true;
      return;
    }
    b->p = p;
    b->cap = c;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
}

static void sb_json_string(sbuf *b, const char *s, size_t n) {
  sb_put(b, "\"", 1);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    char esc[8];
    if (c == '"' || c == '\\') {
      esc[0] = '\\';
      esc[1] = (char)c;
      sb_put(b, esc, 2);
    } else if (c < 0x20) {
      snprintf(esc, sizeof esc, "\\u%04x", c);
      sb_put(b, esc, 6);
    } else {
      sb_put(b, s + i, 1);
    }
  }
  sb_put(b, "\"", 1);
}

/* ------------------------------------------------------------ construction */

static ot_tokenizer *tok_alloc(int kind) {
  ot_tokenizer *t = calloc(1, sizeof *t);
  if (!t) return NULL;
  t->kind = kind;
  for (uint32_t c = 0; c < 128; c++) t->ascii_cls[c] = (uint8_t)ot_unicode_class(c);
  if (kind != KIND_BYTE) {
    t->cache = calloc(CACHE_SHARDS, sizeof *t->cache);
    if (!t->cache) {
      free(t);
      return NULL;
    }
    for (int i = 0; i < CACHE_SHARDS; i++) pthread_mutex_init(&t->cache[i].mu, NULL);
  }
  return t;
}

void ot_tokenizer_free(ot_tokenizer *t) {
  if (!t) return;
  if (t->cache) {
    for (int i = 0; i < CACHE_SHARDS; i++) {
      pthread_mutex_destroy(&t->cache[i].mu);
      free(t->cache[i].slots);
      free(t->cache[i].keys);
      free(t->cache[i].ids);
    }
    free(t->cache);
  }
  free(t->text);
  free(t->text_off);
  free(t->text_len);
  free(t->raw);
  free(t->raw_off);
  free(t->vmap);
  free(t->merges);
  free(t->pairs);
  hf_free(t->hf);
  free(t);
}

int ot_tokenizer_byte_new(ot_tokenizer **out) {
  if (!out) return ot_error(OT_ERR_INVALID, "ot_tokenizer_byte_new: NULL argument");
  ot_tokenizer *t = tok_alloc(KIND_BYTE);
  if (!t) return ot_error(OT_ERR_NOMEM, "cannot allocate a byte tokenizer");
  t->vocab_size = 256;
  *out = t;
  return OT_OK;
}

/* Checks one vocabulary entry (token string, id); NULL when fine, else why not. */
static const char *vocab_entry_problem(const char *str, const cJSON *id) {
  if (!str || !*str) return "an empty token string";
  if (!cJSON_IsNumber(id)) return "an id that is not a number";
  if (!(id->valuedouble >= 0 && id->valuedouble < TOK_MAX_VOCAB) || id->valuedouble != floor(id->valuedouble))
    return "an id that is not an integer in [0, 2^24)";
  return NULL;
}

/* The vocabulary from a JSON object mapping token strings to ids, plus (added not NULL)
 * tokenizer.json's added_tokens array, whose entries may repeat a vocabulary entry.
 * id_limit >= 0 keeps only ids below it (a truncated vocabulary). */
static int vocab_build(ot_tokenizer *t, const cJSON *root, const cJSON *added, const char *path,
                       int32_t id_limit) {
  if (!cJSON_IsObject(root))
    return ot_error(OT_ERR_FORMAT, "%s: expected a JSON object mapping token strings to ids", path);
  size_t n = 0, bytes = 0;
  int32_t max_id = -1;
  for (const cJSON *c = root->child; c; c = c->next) {
    const char *why = vocab_entry_problem(c->string, c);
    if (why)
      return ot_error(OT_ERR_FORMAT, "%s: entry %zu (\"%.40s\") has %s", path, n + 1,
                      c->string ? c->string : "", why);
    if (id_limit >= 0 && (int32_t)c->valuedouble >= id_limit) continue;
    if ((int32_t)c->valuedouble > max_id) max_id = (int32_t)c->valuedouble;
    bytes += strlen(c->string) + 1;
    n++;
  }
  size_t k = 0;
  for (const cJSON *a = added ? added->child : NULL; a; a = a->next, k++) {
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(a, "content");
    const char *str = cJSON_IsString(content) ? content->valuestring : NULL;
    const char *why = vocab_entry_problem(str, cJSON_GetObjectItemCaseSensitive(a, "id"));
    if (why) return ot_error(OT_ERR_FORMAT, "%s: added_tokens[%zu] has %s", path, k, why);
    int32_t id = (int32_t)cJSON_GetObjectItemCaseSensitive(a, "id")->valuedouble;
    if (id > max_id) max_id = id;
    bytes += strlen(str) + 1;
    n++;
  }
  if (n == 0) return ot_error(OT_ERR_FORMAT, "%s: the vocabulary is empty", path);
  t->vocab_size = max_id + 1;
  t->text = malloc(bytes);
  t->text_off = malloc((size_t)t->vocab_size * sizeof *t->text_off);
  t->text_len = malloc((size_t)t->vocab_size * sizeof *t->text_len);
  t->vmap_mask = pow2_at_least(2 * (uint64_t)n) - 1;
  t->vmap = malloc((t->vmap_mask + 1) * sizeof *t->vmap);
  if (!t->text || !t->text_off || !t->text_len || !t->vmap)
    return ot_error(OT_ERR_NOMEM, "cannot allocate the vocabulary of %s", path);
  for (int32_t i = 0; i < t->vocab_size; i++) t->text_len[i] = UINT32_MAX;
  memset(t->vmap, 0xff, (t->vmap_mask + 1) * sizeof *t->vmap);
  size_t off = 0;
  const cJSON *c = root->child, *a = added ? added->child : NULL;
  while (c || a) {
    bool is_added = c == NULL;
    const cJSON *e = is_added ? a : c;
    const char *str = is_added ? cJSON_GetObjectItemCaseSensitive(e, "content")->valuestring : e->string;
    int32_t id = (int32_t)(is_added ? cJSON_GetObjectItemCaseSensitive(e, "id") : e)->valuedouble;
    if (is_added)
      a = a->next;
    else
      c = c->next;
    if (!is_added && id_limit >= 0 && id >= id_limit) continue;
    size_t len = strlen(str);
    int32_t have = vocab_find(t, str, len);
    if (is_added && have == id) continue; /* an added token that the model vocabulary has too */
    if (t->text_len[id] != UINT32_MAX)
      return ot_error(OT_ERR_FORMAT, "%s: id %d is used by both \"%.40s\" and \"%.40s\"", path, id,
                      t->text + t->text_off[id], str);
    if (have >= 0) return ot_error(OT_ERR_FORMAT, "%s: token \"%.40s\" appears twice", path, str);
    memcpy(t->text + off, str, len + 1);
    t->text_off[id] = (uint32_t)off;
    t->text_len[id] = (uint32_t)len;
    off += len + 1;
    uint64_t h = hash_bytes(str, len) & t->vmap_mask;
    while (t->vmap[h] >= 0) h = (h + 1) & t->vmap_mask;
    t->vmap[h] = id;
  }
  return OT_OK;
}

static int load_vocab(ot_tokenizer *t, const char *path, int32_t id_limit) {
  cJSON *root = NULL;
  int rc = read_json(path, &root);
  if (rc != OT_OK) return rc;
  rc = vocab_build(t, root, NULL, path, id_limit);
  cJSON_Delete(root);
  return rc;
}

/* Splits one merges.txt line into exactly two fields separated by spaces/tabs. */
static bool split_merge_line(const char *s, size_t n, const char **f, size_t *fl) {
  int k = 0;
  size_t i = 0;
  while (i < n) {
    while (i < n && (s[i] == ' ' || s[i] == '\t')) i++;
    if (i == n) break;
    size_t j = i;
    while (j < n && s[j] != ' ' && s[j] != '\t') j++;
    if (k == 2) return false;
    f[k] = s + i;
    fl[k] = j - i;
    k++;
    i = j;
  }
  return k == 2;
}

/* Adds every pair (x, y) whose Encoder.js lookup key x + "," + y equals the
 * key of merge `rank`, including the merge itself (see the top comment). */
static int add_merge_pairs(ot_tokenizer *t, int32_t rank, char *buf) {
  int32_t a = t->merges[rank][0], b = t->merges[rank][1];
  size_t la = t->text_len[a], lb = t->text_len[b];
  const char *sa = t->text + t->text_off[a], *sb = t->text + t->text_off[b];
  memcpy(buf, sa, la);
  memcpy(buf + la, sb, lb);
  int rc = pair_set(t, a, b, rank, vocab_find(t, buf, la + lb));
  if (rc != OT_OK || (!memchr(sa, ',', la) && !memchr(sb, ',', lb))) return rc;
  /* key = a "," b; try the key's other commas as the separator. */
  size_t klen = la + 1 + lb;
  char *key = buf + la + lb;
  memcpy(key, sa, la);
  key[la] = ',';
  memcpy(key + la + 1, sb, lb);
  char *joined = key + klen;
  for (size_t p = 0; p < klen; p++) {
    if (key[p] != ',' || p == la) continue;
    int32_t x = vocab_find(t, key, p), y = vocab_find(t, key + p + 1, klen - p - 1);
    if (x < 0 || y < 0) continue;
    memcpy(joined, key, p);
    memcpy(joined + p, key + p + 1, klen - p - 1);
    /* Encoder.js would emit an undefined id if x + y were not a token; we leave such a pair unmerged. */
    int32_t xy = vocab_find(t, joined, klen - 1);
    if (xy < 0) continue;
    rc = pair_set(t, x, y, rank, xy);
    if (rc != OT_OK) return rc;
  }
  return OT_OK;
}

/* Reads at most max_merges merges (SIZE_MAX: all). */
static int load_merges(ot_tokenizer *t, const char *path, size_t max_merges) {
  char *buf = NULL;
  size_t len = 0;
  int rc = ot_file_read_all(path, TOK_MAX_FILE, &buf, &len);
  if (rc != OT_OK) return rc;
  size_t cap = 0, line_no = 0, longest = 0;
  char *tmp = NULL;
  for (size_t p = 0; p < len && rc == OT_OK && t->n_merges < max_merges;) {
    const char *line = buf + p;
    const char *nl = memchr(line, '\n', len - p);
    size_t n = nl ? (size_t)(nl - line) : len - p;
    p += n + (nl ? 1 : 0);
    line_no++;
    if (n > 0 && line[n - 1] == '\r') n--;
    if (line_no == 1 && n >= 8 && memcmp(line, "#version", 8) == 0) continue;
    const char *f[2];
    size_t fl[2];
    bool blank = true;
    for (size_t i = 0; i < n; i++) blank = blank && (line[i] == ' ' || line[i] == '\t');
    if (blank) continue;
    if (!split_merge_line(line, n, f, fl)) {
      rc = ot_error(OT_ERR_FORMAT, "%s:%zu: expected two tokens separated by a space, got \"%.*s\"", path,
                    line_no, (int)(n > 60 ? 60 : n), line);
      break;
    }
    int32_t a = vocab_find(t, f[0], fl[0]), b = vocab_find(t, f[1], fl[1]);
    if (a < 0 || b < 0) {
      int k = a < 0 ? 0 : 1;
      rc = ot_error(OT_ERR_FORMAT, "%s:%zu: token \"%.*s\" is not in the vocabulary", path, line_no,
                    (int)(fl[k] > 60 ? 60 : fl[k]), f[k]);
      break;
    }
    if (t->n_merges == (size_t)INT32_MAX) {
      rc = ot_error(OT_ERR_RANGE, "%s: too many merges", path);
      break;
    }
    if (t->n_merges == cap) {
      cap = cap ? 2 * cap : 1024;
      void *m = realloc(t->merges, cap * sizeof *t->merges);
      if (!m) {
        rc = ot_error(OT_ERR_NOMEM, "cannot allocate the merges of %s", path);
        break;
      }
      t->merges = m;
    }
    t->merges[t->n_merges][0] = a;
    t->merges[t->n_merges][1] = b;
    t->n_merges++;
    if (fl[0] + fl[1] > longest) longest = fl[0] + fl[1];
  }
  free(buf);
  if (rc != OT_OK) return rc;
  /* Scratch for add_merge_pairs: a+b, then the key a,b, then a candidate join. */
  tmp = malloc(3 * longest + 4);
  t->pairs_mask = pow2_at_least(2 * (uint64_t)t->n_merges + 2) - 1;
  t->pairs = malloc((t->pairs_mask + 1) * sizeof *t->pairs);
  if (!tmp || !t->pairs) {
    free(tmp);
    return ot_error(OT_ERR_NOMEM, "cannot allocate the merge table of %s", path);
  }
  for (uint64_t i = 0; i <= t->pairs_mask; i++) t->pairs[i].key = UINT64_MAX;
  for (size_t r = 0; r < t->n_merges && rc == OT_OK; r++) {
    rc = add_merge_pairs(t, (int32_t)r, tmp);
    if (rc != OT_OK) break;
    const pair_slot *s = pair_find(t, t->merges[r][0], t->merges[r][1]);
    if (s->merged < 0) {
      int32_t a = t->merges[r][0], b = t->merges[r][1];
      rc = ot_error(OT_ERR_FORMAT,
                    "%s: merge %zu (\"%.40s %.40s\") makes a token that is not in the vocabulary", path,
                    r + 1, t->text + t->text_off[a], t->text + t->text_off[b]);
    }
  }
  free(tmp);
  return rc;
}

/* Byte -> id of its one-character token, and id -> the bytes it decodes to. */
static int build_byte_tables(ot_tokenizer *t, const char *vocab_path) {
  uint16_t cp_of[256];
  int16_t byte_of[512];
  bytes_to_unicode(cp_of);
  for (int i = 0; i < 512; i++) byte_of[i] = -1;
  for (int b = 0; b < 256; b++) {
    char s[2];
    size_t n = utf8_put(cp_of[b], s);
    t->byte_id[b] = vocab_find(t, s, n);
    if (t->byte_id[b] < 0)
      return ot_error(OT_ERR_FORMAT,
                      "%s: no token for byte 0x%02x (\"%.*s\"): not a byte-level BPE vocabulary", vocab_path,
                      b, (int)n, s);
    byte_of[cp_of[b]] = (int16_t)b;
  }
  /* A byte-level token decodes to at most as many bytes as its UTF-8 text has. */
  size_t total = 0;
  for (int32_t id = 0; id < t->vocab_size; id++)
    if (t->text_len[id] != UINT32_MAX) total += t->text_len[id];
  t->raw = malloc(total ? total : 1);
  t->raw_off = malloc(((size_t)t->vocab_size + 1) * sizeof *t->raw_off);
  if (!t->raw || !t->raw_off) return ot_error(OT_ERR_NOMEM, "cannot allocate the decoder of %s", vocab_path);
  size_t off = 0;
  for (int32_t id = 0; id < t->vocab_size; id++) {
    t->raw_off[id] = (uint32_t)off;
    if (t->text_len[id] == UINT32_MAX) continue;
    const uint8_t *s = (const uint8_t *)t->text + t->text_off[id];
    size_t n = t->text_len[id], start = off;
    bool ok = true;
    for (size_t i = 0; i < n && ok;) {
      uint32_t cp;
      size_t l = ot_utf8_decode(s + i, n - i, &cp);
      if (l == 0 || cp >= 512 || byte_of[cp] < 0)
        ok = false;
      else
        t->raw[off++] = (uint8_t)byte_of[cp], i += l;
    }
    /* Not byte-level text (an added token): decode to its own UTF-8, as Hugging Face does. */
    if (!ok) {
      memcpy(t->raw + start, s, n);
      off = start + n;
    }
  }
  t->raw_off[t->vocab_size] = (uint32_t)off;
  return OT_OK;
}

static int bpe_load(const char *vocab_json_path, const char *merges_path, int32_t id_limit, size_t max_merges,
                    ot_tokenizer **out) {
  if (!vocab_json_path || !merges_path || !out)
    return ot_error(OT_ERR_INVALID, "ot_tokenizer_bpe_load: NULL argument");
  ot_tokenizer *t = tok_alloc(KIND_BPE);
  if (!t) return ot_error(OT_ERR_NOMEM, "cannot allocate a BPE tokenizer");
  int rc = load_vocab(t, vocab_json_path, id_limit);
  if (rc == OT_OK) rc = build_byte_tables(t, vocab_json_path);
  if (rc == OT_OK) rc = load_merges(t, merges_path, max_merges);
  if (rc == OT_OK && t->n_merges < max_merges && max_merges != SIZE_MAX)
    rc =
        ot_error(OT_ERR_RANGE, "%s has only %zu merges, %zu asked for", merges_path, t->n_merges, max_merges);
  if (rc != OT_OK) {
    ot_tokenizer_free(t);
    return rc;
  }
  *out = t;
  return OT_OK;
}

int ot_tokenizer_bpe_load(const char *vocab_json_path, const char *merges_path, ot_tokenizer **out) {
  return bpe_load(vocab_json_path, merges_path, -1, SIZE_MAX, out);
}

int ot_tokenizer_bpe_load_first(const char *vocab_json_path, const char *merges_path, int n_merges,
                                ot_tokenizer **out) {
  if (n_merges < 1 || n_merges > TOK_MAX_VOCAB - 256)
    return ot_error(OT_ERR_INVALID, "merge count %d out of range", n_merges);
  return bpe_load(vocab_json_path, merges_path, 256 + n_merges, (size_t)n_merges, out);
}

/* ---------------------------------------------------------- tokenizer.json */

/* Hugging Face tokenizers' format: the pipeline is added-token splitting ->
 * normalizer -> pre-tokenizer -> BPE model -> post-processor on encode, and
 * token strings -> decoder on decode. Each component that offtune implements is
 * parsed into hf_spec; any other component, or an option of one that changes
 * the result, is refused by name at load time. The BPE follows tokenizers'
 * (and transformers.js's) merge order: the lowest-ranked adjacent pair first,
 * the leftmost one among equal ranks, one merge at a time. */

#define SPIECE "\xe2\x96\x81" /* U+2581, SentencePiece's visible space */
#define HF_MAX_TEMPLATE 8

/* The Split regexes offtune matches by hand, as they appear in tokenizer.json. */
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
#define RE_LLAMA3_HEAD "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
#define RE_LLAMA3_TAIL "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_LLAMA3 RE_LLAMA3_HEAD "\\p{N}{1,3}" RE_LLAMA3_TAIL
#define RE_QWEN2 RE_LLAMA3_HEAD "\\p{N}" RE_LLAMA3_TAIL

enum { SPLIT_NONE = 0, SPLIT_GPT2, SPLIT_LLAMA3, SPLIT_QWEN2 };
enum { NORM_PREPEND = 1, NORM_REPLACE, NORM_NFC };
enum { PREPEND_ALWAYS = 0, PREPEND_FIRST, PREPEND_NEVER };
enum { DEC_REPLACE = 1, DEC_BYTE_FALLBACK, DEC_BYTE_LEVEL };

typedef struct {
  int kind;
  char *a, *b; /* Prepend: a; Replace: a -> b */
  size_t la, lb;
} hf_step;

typedef struct {
  const char *s; /* the token's text in t->text */
  uint32_t len;
  int32_t id;
  bool lstrip, rstrip, special;
} added_tok;

typedef struct hf_spec {
  hf_step *norm, *dec; /* normalizer steps; per-token decoder steps before Fuse */
  size_t n_norm, n_dec;
  int split;        /* Split pre-tokenizer */
  bool byte_level;  /* ByteLevel pre-tokenizer: bytes are the model's symbols */
  bool bl_prefix;   /* its add_prefix_space */
  int bl_split;     /* its use_regex: SPLIT_GPT2, else SPLIT_NONE */
  bool meta;        /* Metaspace pre-tokenizer */
  char meta_rep[8]; /* its replacement character */
  size_t meta_rep_len;
  int meta_scheme; /* PREPEND_* */
  bool byte_fallback, fuse_unk, ignore_merges;
  int32_t unk_id;      /* -1: none */
  int32_t bf_id[256];  /* <0xXX> tokens, -1 where absent */
  uint16_t cp_of[256]; /* GPT-2's byte -> code point map */
  added_tok *added;    /* sorted by first byte, then longest first */
  size_t n_added;
  uint32_t added_start[257];
  uint8_t *special; /* per id: 1 for a special added token */
  int32_t pre[HF_MAX_TEMPLATE], suf[HF_MAX_TEMPLATE];
  int n_pre, n_suf;               /* what OT_TOK_ADD_SPECIAL adds */
  size_t strip_start, strip_stop; /* Strip decoder after Fuse */
  char strip_ch[8];
  size_t strip_ch_len;
  char *bos, *eos, *chat_template;
  bool split_special;  /* tokenizer_config's split_special_tokens */
  bool sp_cut;         /* SentencePiece-style words may be cut before "▁" (sp_words) */
  char *json, *config; /* the files as read, written back by save */
  size_t json_len, config_len;
} hf_spec;

static void hf_free(hf_spec *h) {
  if (!h) return;
  for (size_t i = 0; i < h->n_norm; i++) free(h->norm[i].a), free(h->norm[i].b);
  for (size_t i = 0; i < h->n_dec; i++) free(h->dec[i].a), free(h->dec[i].b);
  free(h->norm);
  free(h->dec);
  free(h->added);
  free(h->special);
  free(h->bos);
  free(h->eos);
  free(h->chat_template);
  free(h->json);
  free(h->config);
  free(h);
}

static int unsupported(const char *path, const char *what, const char *name, const char *have) {
  return ot_error(OT_ERR_UNSUPPORTED, "%s: %s \"%.60s\" is not supported (offtune implements %s)", path, what,
                  name, have);
}

static const char *jstr(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* A boolean option: absent or null -> dflt; anything but a boolean is an error. */
static int jbool(const cJSON *o, const char *key, bool dflt, bool *out, const char *path, const char *where) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  if (!v || cJSON_IsNull(v)) {
    *out = dflt;
    return OT_OK;
  }
  if (!cJSON_IsBool(v)) return ot_error(OT_ERR_FORMAT, "%s: %s \"%s\" is not a boolean", path, where, key);
  *out = cJSON_IsTrue(v);
  return OT_OK;
}

/* True when o has key with a value other than null, false, 0 or "". */
static bool jset(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  if (!v || cJSON_IsNull(v) || cJSON_IsFalse(v)) return false;
  if (cJSON_IsNumber(v)) return v->valuedouble != 0;
  if (cJSON_IsString(v)) return v->valuestring[0] != '\0';
  return true;
}

static int add_step(hf_step **steps, size_t *n, int kind, const char *a, const char *b) {
  hf_step *p = realloc(*steps, (*n + 1) * sizeof *p);
  if (!p) return ot_error(OT_ERR_NOMEM, "cannot allocate a tokenizer step");
  *steps = p;
  hf_step *s = &p[(*n)++];
  *s = (hf_step){kind, a ? strdup(a) : NULL, b ? strdup(b) : NULL, a ? strlen(a) : 0, b ? strlen(b) : 0};
  if ((a && !s->a) || (b && !s->b)) return ot_error(OT_ERR_NOMEM, "cannot allocate a tokenizer step");
  return OT_OK;
}

/* A Replace step's {"String": s} pattern (Regex patterns are refused). */
static int replace_pattern(const cJSON *node, const char *path, const char *where, const char **pat,
                           const char **content) {
  const cJSON *p = cJSON_GetObjectItemCaseSensitive(node, "pattern");
  *pat = jstr(p, "String");
  *content = jstr(node, "content");
  if (!*pat && jstr(p, "Regex"))
    return unsupported(path, where, "Replace with a Regex pattern", "String patterns");
  if (!*pat || !**pat || !*content)
    return ot_error(OT_ERR_FORMAT, "%s: %s Replace needs a non-empty pattern.String and a content string",
                    path, where);
  return OT_OK;
}

static int parse_normalizer(hf_spec *h, const cJSON *n, const char *path) {
  if (!n || cJSON_IsNull(n)) return OT_OK;
  const char *type = jstr(n, "type");
  if (!type) return ot_error(OT_ERR_FORMAT, "%s: normalizer without a \"type\"", path);
  if (strcmp(type, "Sequence") == 0) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
    if (!cJSON_IsArray(list)) return ot_error(OT_ERR_FORMAT, "%s: normalizer Sequence without a list", path);
    for (const cJSON *c = list->child; c; c = c->next) {
      int rc = parse_normalizer(h, c, path);
      if (rc != OT_OK) return rc;
    }
    return OT_OK;
  }
  if (strcmp(type, "Prepend") == 0) {
    const char *p = jstr(n, "prepend");
    if (!p) return ot_error(OT_ERR_FORMAT, "%s: normalizer Prepend without a \"prepend\" string", path);
    return add_step(&h->norm, &h->n_norm, NORM_PREPEND, p, NULL);
  }
  if (strcmp(type, "Replace") == 0) {
    const char *pat, *content;
    int rc = replace_pattern(n, path, "normalizer", &pat, &content);
    return rc != OT_OK ? rc : add_step(&h->norm, &h->n_norm, NORM_REPLACE, pat, content);
  }
  if (strcmp(type, "NFC") == 0) return add_step(&h->norm, &h->n_norm, NORM_NFC, NULL, NULL); /* Qwen2 */
  return unsupported(path, "normalizer", type, "NFC, Prepend, Replace with a String pattern and Sequence");
}

static int parse_split_regex(const char *re, int *kind) {
  if (strcmp(re, RE_LLAMA3) == 0)
    *kind = SPLIT_LLAMA3;
  else if (strcmp(re, RE_QWEN2) == 0)
    *kind = SPLIT_QWEN2;
  else if (strcmp(re, RE_GPT2) == 0)
    *kind = SPLIT_GPT2;
  else
    return -1;
  return OT_OK;
}

/* Accepted shapes: [Split] [ByteLevel], in that order, or Metaspace alone. */
static int parse_pre(hf_spec *h, const cJSON *n, const char *path, int *seen) {
  if (!n || cJSON_IsNull(n)) return OT_OK;
  const char *type = jstr(n, "type");
  if (!type) return ot_error(OT_ERR_FORMAT, "%s: pre_tokenizer without a \"type\"", path);
  int rc = OT_OK;
  if (strcmp(type, "Sequence") == 0) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "pretokenizers");
    if (!cJSON_IsArray(list))
      return ot_error(OT_ERR_FORMAT, "%s: pre_tokenizer Sequence without a list", path);
    for (const cJSON *c = list->child; c && rc == OT_OK; c = c->next) rc = parse_pre(h, c, path, seen);
    return rc;
  }
  const char *order = "a Split, then a ByteLevel, or a Metaspace alone";
  if (strcmp(type, "Split") == 0) {
    if (*seen)
      return unsupported(path, "pre_tokenizer sequence with", "Split after another pre-tokenizer", order);
    *seen = 1;
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(n, "pattern");
    const char *re = jstr(p, "Regex"), *behavior = jstr(n, "behavior");
    bool invert = false;
    if ((rc = jbool(n, "invert", false, &invert, path, "pre_tokenizer Split")) != OT_OK) return rc;
    if (!re)
      return unsupported(path, "pre_tokenizer Split", "with a String pattern", "the Regex patterns below");
    if (parse_split_regex(re, &h->split) != OT_OK)
      return unsupported(path, "pre_tokenizer Split regex", re, "the Llama 3, Qwen2 and GPT-2 patterns");
    if (!behavior || strcmp(behavior, "Isolated") != 0)
      return unsupported(path, "pre_tokenizer Split behavior", behavior ? behavior : "(none)", "Isolated");
    if (invert) return unsupported(path, "pre_tokenizer Split", "invert: true", "invert: false");
    return OT_OK;
  }
  if (strcmp(type, "ByteLevel") == 0) {
    if (*seen >= 2)
      return unsupported(path, "pre_tokenizer sequence with", "ByteLevel after ByteLevel", order);
    *seen = 2;
    bool use_regex = true;
    h->byte_level = true;
    if ((rc = jbool(n, "add_prefix_space", true, &h->bl_prefix, path, "pre_tokenizer ByteLevel")) != OT_OK ||
        (rc = jbool(n, "use_regex", true, &use_regex, path, "pre_tokenizer ByteLevel")) != OT_OK)
      return rc;
    h->bl_split = use_regex ? SPLIT_GPT2 : SPLIT_NONE;
    return OT_OK;
  }
  if (strcmp(type, "Metaspace") == 0) {
    if (*seen)
      return unsupported(path, "pre_tokenizer sequence with", "Metaspace after another pre-tokenizer", order);
    *seen = 3;
    const char *rep = jstr(n, "replacement"), *scheme = jstr(n, "prepend_scheme");
    uint32_t cp;
    if (!rep || !*rep || strlen(rep) >= sizeof h->meta_rep ||
        ot_utf8_decode((const uint8_t *)rep, strlen(rep), &cp) != strlen(rep))
      return ot_error(OT_ERR_FORMAT, "%s: pre_tokenizer Metaspace needs a one-character replacement", path);
    memcpy(h->meta_rep, rep, strlen(rep) + 1);
    h->meta_rep_len = strlen(rep);
    h->meta = true;
    bool prefix = true, split = true;
    if ((rc = jbool(n, "add_prefix_space", true, &prefix, path, "pre_tokenizer Metaspace")) != OT_OK ||
        (rc = jbool(n, "split", true, &split, path, "pre_tokenizer Metaspace")) != OT_OK)
      return rc;
    if (split) return unsupported(path, "pre_tokenizer Metaspace", "split: true (or absent)", "split: false");
    if (!scheme || strcmp(scheme, "always") == 0)
      h->meta_scheme = PREPEND_ALWAYS;
    else if (strcmp(scheme, "first") == 0)
      h->meta_scheme = PREPEND_FIRST;
    else if (strcmp(scheme, "never") == 0)
      h->meta_scheme = PREPEND_NEVER;
    else
      return unsupported(path, "pre_tokenizer Metaspace prepend_scheme", scheme, "always, first and never");
    if (!prefix) h->meta_scheme = PREPEND_NEVER;
    return OT_OK;
  }
  return unsupported(path, "pre_tokenizer", type, "Split, ByteLevel, Metaspace and Sequence");
}

/* Special tokens that OT_TOK_ADD_SPECIAL puts around the text (TemplateProcessing "single"). */
static int parse_post(hf_spec *h, const ot_tokenizer *t, const cJSON *n, const char *path) {
  if (!n || cJSON_IsNull(n)) return OT_OK;
  const char *type = jstr(n, "type");
  if (!type) return ot_error(OT_ERR_FORMAT, "%s: post_processor without a \"type\"", path);
  if (strcmp(type, "ByteLevel") == 0) return OT_OK; /* offsets only: no effect on ids */
  if (strcmp(type, "Sequence") == 0) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "processors");
    if (!cJSON_IsArray(list))
      return ot_error(OT_ERR_FORMAT, "%s: post_processor Sequence without a list", path);
    for (const cJSON *c = list->child; c; c = c->next) {
      int rc = parse_post(h, t, c, path);
      if (rc != OT_OK) return rc;
    }
    return OT_OK;
  }
  if (strcmp(type, "TemplateProcessing") != 0)
    return unsupported(path, "post_processor", type, "TemplateProcessing, ByteLevel and Sequence");
  if (h->n_pre || h->n_suf)
    return unsupported(path, "post_processor", "with two TemplateProcessing", "one TemplateProcessing");
  const cJSON *single = cJSON_GetObjectItemCaseSensitive(n, "single");
  const cJSON *specials = cJSON_GetObjectItemCaseSensitive(n, "special_tokens");
  if (!cJSON_IsArray(single))
    return ot_error(OT_ERR_FORMAT, "%s: TemplateProcessing without \"single\"", path);
  int seq = 0;
  for (const cJSON *c = single->child; c; c = c->next) {
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(c, "SpecialToken");
    if (cJSON_GetObjectItemCaseSensitive(c, "Sequence")) {
      if (seq++) return unsupported(path, "TemplateProcessing single", "with two sequences", "one $A");
      continue;
    }
    const char *name = jstr(st, "id");
    const cJSON *ids =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(specials, name), "ids");
    if (!name || !cJSON_IsArray(ids))
      return ot_error(OT_ERR_FORMAT, "%s: TemplateProcessing names a special token \"%.40s\" without ids",
                      path, name ? name : "");
    for (const cJSON *i = ids->child; i; i = i->next) {
      int *cnt = seq ? &h->n_suf : &h->n_pre;
      int32_t *dst = seq ? h->suf : h->pre;
      if (!cJSON_IsNumber(i) || i->valuedouble < 0 || i->valuedouble >= t->vocab_size ||
          t->text_len[(int32_t)i->valuedouble] == UINT32_MAX)
        return ot_error(OT_ERR_FORMAT,
                        "%s: TemplateProcessing special token \"%.40s\" has an id outside the "
                        "vocabulary",
                        path, name);
      if (*cnt == HF_MAX_TEMPLATE)
        return ot_error(OT_ERR_UNSUPPORTED, "%s: TemplateProcessing adds more than %d tokens", path,
                        HF_MAX_TEMPLATE);
      dst[(*cnt)++] = (int32_t)i->valuedouble;
    }
  }
  if (seq != 1) return ot_error(OT_ERR_FORMAT, "%s: TemplateProcessing single has no $A sequence", path);
  return OT_OK;
}

/* Per-token steps before Fuse, then Strip after it; *fused tracks Fuse. */
static int parse_decoder(hf_spec *h, const cJSON *n, const char *path, bool *fused) {
  const char *type = jstr(n, "type");
  if (!type) return ot_error(OT_ERR_FORMAT, "%s: decoder without a \"type\"", path);
  const char *have = "ByteLevel, Replace, ByteFallback, Metaspace, Fuse, Strip and Sequence";
  if (strcmp(type, "Sequence") == 0) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "decoders");
    if (!cJSON_IsArray(list)) return ot_error(OT_ERR_FORMAT, "%s: decoder Sequence without a list", path);
    for (const cJSON *c = list->child; c; c = c->next) {
      int rc = parse_decoder(h, c, path, fused);
      if (rc != OT_OK) return rc;
    }
    return OT_OK;
  }
  if (strcmp(type, "Fuse") == 0) {
    *fused = true;
    return OT_OK;
  }
  if (strcmp(type, "Strip") == 0) {
    const char *content = jstr(n, "content");
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(n, "start"),
                *b = cJSON_GetObjectItemCaseSensitive(n, "stop");
    uint32_t cp;
    if (!content || !*content || strlen(content) >= sizeof h->strip_ch ||
        ot_utf8_decode((const uint8_t *)content, strlen(content), &cp) != strlen(content) ||
        !cJSON_IsNumber(a) || !cJSON_IsNumber(b) || a->valuedouble < 0 || b->valuedouble < 0 ||
        a->valuedouble > 64 || b->valuedouble > 64)
      return ot_error(OT_ERR_FORMAT, "%s: decoder Strip needs a one-character content and small start/stop",
                      path);
    if (a->valuedouble == 0 && b->valuedouble == 0) return OT_OK;
    if (!*fused || h->strip_start || h->strip_stop)
      return unsupported(path, "decoder", "Strip before Fuse (or twice)", "one Strip after Fuse");
    memcpy(h->strip_ch, content, strlen(content) + 1);
    h->strip_ch_len = strlen(content);
    h->strip_start = (size_t)a->valuedouble;
    h->strip_stop = (size_t)b->valuedouble;
    return OT_OK;
  }
  if (*fused) return unsupported(path, "decoder after Fuse:", type, "only Strip after Fuse");
  if (strcmp(type, "ByteLevel") == 0) return add_step(&h->dec, &h->n_dec, DEC_BYTE_LEVEL, NULL, NULL);
  if (strcmp(type, "ByteFallback") == 0) return add_step(&h->dec, &h->n_dec, DEC_BYTE_FALLBACK, NULL, NULL);
  if (strcmp(type, "Replace") == 0) {
    const char *pat, *content;
    int rc = replace_pattern(n, path, "decoder", &pat, &content);
    return rc != OT_OK ? rc : add_step(&h->dec, &h->n_dec, DEC_REPLACE, pat, content);
  }
  if (strcmp(type, "Metaspace") == 0) {
    /* Replacement -> space in every token; the first token loses one leading space unless never prepended. */
    const char *rep = jstr(n, "replacement"), *scheme = jstr(n, "prepend_scheme");
    bool prefix = true;
    int rc = jbool(n, "add_prefix_space", true, &prefix, path, "decoder Metaspace");
    if (rc != OT_OK) return rc;
    if (!rep || !*rep) return ot_error(OT_ERR_FORMAT, "%s: decoder Metaspace without a replacement", path);
    if ((rc = add_step(&h->dec, &h->n_dec, DEC_REPLACE, rep, " ")) != OT_OK) return rc;
    if (prefix && !(scheme && strcmp(scheme, "never") == 0)) {
      if (h->strip_start) return unsupported(path, "decoder", "Metaspace with another Strip", have);
      h->strip_start = 1;
      h->strip_ch[0] = ' ';
      h->strip_ch_len = 1;
    }
    return OT_OK;
  }
  return unsupported(path, "decoder", type, have);
}

/* Replaces every occurrence of a (la > 0) in s[0..n) with b, appending to out. */
static void replace_all(sbuf *out, const char *s, size_t n, const char *a, size_t la, const char *b,
                        size_t lb) {
  size_t i = 0;
  while (i < n) {
    const char *hit = la <= n - i ? memmem(s + i, n - i, a, la) : NULL;
    if (!hit) break;
    sb_put(out, s + i, (size_t)(hit - (s + i)));
    sb_put(out, b, lb);
    i = (size_t)(hit - s) + la;
  }
  sb_put(out, s + i, n - i);
}

/* "<0xHH>" -> the byte, as the ByteFallback decoder reads it; -1 otherwise. */
static int byte_token(const char *s, size_t n) {
  if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
  int v = 0;
  for (int i = 3; i < 5; i++) {
    char c = s[i];
    int d = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                   : -1;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

/* What each id decodes to: its text through the decoder's per-token steps. */
static int hf_build_decoder(ot_tokenizer *t, const char *path) {
  const hf_spec *h = t->hf;
  int16_t byte_of[512];
  for (int i = 0; i < 512; i++) byte_of[i] = -1;
  for (int b = 0; b < 256; b++) byte_of[h->cp_of[b]] = (int16_t)b;
  t->raw_off = malloc(((size_t)t->vocab_size + 1) * sizeof *t->raw_off);
  sbuf out = {0}, cur = {0}, nxt = {0};
  if (!t->raw_off) return ot_error(OT_ERR_NOMEM, "cannot allocate the decoder of %s", path);
  for (int32_t id = 0; id < t->vocab_size; id++) {
    t->raw_off[id] = (uint32_t)out.n;
    if (t->text_len[id] == UINT32_MAX) continue;
    cur.n = 0;
    sb_put(&cur, t->text + t->text_off[id], t->text_len[id]);
    bool is_byte = false;
    for (size_t k = 0; k < h->n_dec && !cur.oom && !is_byte; k++) {
      const hf_step *st = &h->dec[k];
      nxt.n = 0;
      if (st->kind == DEC_REPLACE) {
        replace_all(&nxt, cur.p, cur.n, st->a, st->la, st->b, st->lb);
      } else if (st->kind == DEC_BYTE_FALLBACK) {
        int v = byte_token(cur.p, cur.n);
        if (v < 0) continue;
        uint8_t c = (uint8_t)v;
        sb_put(&nxt, &c, 1);
        is_byte = true; /* a raw byte is final: later steps see text, not bytes */
      } else {
        bool ok = true;
        for (size_t i = 0; i < cur.n && ok;) {
          uint32_t cp;
          size_t l = ot_utf8_decode((const uint8_t *)cur.p + i, cur.n - i, &cp);
          if (l == 0 || cp >= 512 || byte_of[cp] < 0) {
            ok = false;
          } else {
            uint8_t c = (uint8_t)byte_of[cp];
            sb_put(&nxt, &c, 1);
            i += l;
          }
        }
        if (!ok) continue; /* not byte-level text (an added token): its own UTF-8, as tokenizers does */
      }
      sbuf tmp = cur;
      cur = nxt;
      nxt = tmp;
    }
    sb_put(&out, cur.p, cur.n);
    if (out.n > UINT32_MAX / 2) out.oom = true;
  }
  t->raw_off[t->vocab_size] = (uint32_t)out.n;
  bool oom = out.oom || cur.oom || nxt.oom;
  free(cur.p);
  free(nxt.p);
  if (oom) {
    free(out.p);
    return ot_error(OT_ERR_NOMEM, "cannot allocate the decoder of %s", path);
  }
  t->raw = (uint8_t *)out.p;
  if (!t->raw) t->raw = malloc(1);
  return t->raw ? OT_OK : ot_error(OT_ERR_NOMEM, "cannot allocate the decoder of %s", path);
}

/* The BPE model: vocabulary (with added tokens), merges in either format, options. */
static int parse_model(ot_tokenizer *t, const cJSON *root, const char *path) {
  hf_spec *h = t->hf;
  const cJSON *m = cJSON_GetObjectItemCaseSensitive(root, "model");
  if (!cJSON_IsObject(m)) return ot_error(OT_ERR_FORMAT, "%s: no \"model\" object", path);
  const char *type = jstr(m, "type");
  if (type && strcmp(type, "BPE") != 0) return unsupported(path, "model", type, "BPE");
  if (!type && !cJSON_GetObjectItemCaseSensitive(m, "merges"))
    return ot_error(OT_ERR_FORMAT, "%s: model without a \"type\" or BPE merges", path);
  const char *opts[] = {"dropout", "continuing_subword_prefix", "end_of_word_suffix"};
  for (size_t i = 0; i < 3; i++)
    if (jset(m, opts[i])) return unsupported(path, "BPE option", opts[i], "none of dropout and word affixes");
  int rc;
  if ((rc = jbool(m, "byte_fallback", false, &h->byte_fallback, path, "model")) != OT_OK ||
      (rc = jbool(m, "fuse_unk", false, &h->fuse_unk, path, "model")) != OT_OK ||
      (rc = jbool(m, "ignore_merges", false, &h->ignore_merges, path, "model")) != OT_OK)
    return rc;
  const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
  if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added))
    return ot_error(OT_ERR_FORMAT, "%s: \"added_tokens\" is not a list", path);
  if ((rc = vocab_build(t, cJSON_GetObjectItemCaseSensitive(m, "vocab"), cJSON_IsArray(added) ? added : NULL,
                        path, -1)) != OT_OK)
    return rc;
  const char *unk = jstr(m, "unk_token");
  h->unk_id = unk ? vocab_find(t, unk, strlen(unk)) : -1;
  if (unk && h->unk_id < 0)
    return ot_error(OT_ERR_FORMAT, "%s: unk_token \"%.40s\" is not in the vocabulary", path, unk);
  for (int b = 0; b < 256; b++) {
    char s[8];
    snprintf(s, sizeof s, "<0x%02X>", b);
    h->bf_id[b] = vocab_find(t, s, 6);
  }
  const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
  if (!cJSON_IsArray(merges)) return ot_error(OT_ERR_FORMAT, "%s: BPE model without a \"merges\" list", path);
  size_t n = (size_t)cJSON_GetArraySize(merges);
  t->pairs_mask = pow2_at_least(2 * (uint64_t)n + 2) - 1;
  t->pairs = malloc((t->pairs_mask + 1) * sizeof *t->pairs);
  if (!t->pairs) return ot_error(OT_ERR_NOMEM, "cannot allocate the merge table of %s", path);
  for (uint64_t i = 0; i <= t->pairs_mask; i++) t->pairs[i].key = UINT64_MAX;
  sbuf joined = {0};
  size_t r = 0;
  for (const cJSON *c = merges->child; c && rc == OT_OK; c = c->next, r++) {
    const char *a = NULL, *b = NULL;
    size_t la = 0, lb = 0;
    if (cJSON_IsString(c)) { /* "a b" (tokenizers < 0.20) */
      const char *sp = strchr(c->valuestring, ' ');
      if (sp && !strchr(sp + 1, ' ')) a = c->valuestring, la = (size_t)(sp - a), b = sp + 1, lb = strlen(b);
    } else if (cJSON_IsArray(c) && cJSON_GetArraySize(c) == 2 && cJSON_IsString(c->child) &&
               cJSON_IsString(c->child->next)) { /* ["a", "b"] */
      a = c->child->valuestring, la = strlen(a), b = c->child->next->valuestring, lb = strlen(b);
    }
    if (!a || !la || !lb) {
      rc = ot_error(OT_ERR_FORMAT, "%s: merge %zu is neither \"a b\" (one space) nor a pair [\"a\", \"b\"]",
                    path, r);
      break;
    }
    int32_t ia = vocab_find(t, a, la), ib = vocab_find(t, b, lb);
    joined.n = 0;
    sb_put(&joined, a, la);
    sb_put(&joined, b, lb);
    if (joined.oom) {
      rc = ot_error(OT_ERR_NOMEM, "cannot allocate a merge of %s", path);
      break;
    }
    int32_t ij = vocab_find(t, joined.p, joined.n);
    if (ia < 0 || ib < 0 || ij < 0) {
      rc = ot_error(OT_ERR_FORMAT,
                    "%s: merge %zu (\"%.*s\" + \"%.*s\") uses or makes a token that is not in the "
                    "vocabulary",
                    path, r, (int)(la > 40 ? 40 : la), a, (int)(lb > 40 ? 40 : lb), b);
      break;
    }
    if (r >= (size_t)INT32_MAX) rc = ot_error(OT_ERR_RANGE, "%s: too many merges", path);
    if (rc == OT_OK) rc = pair_set(t, ia, ib, (int32_t)r, ij);
  }
  free(joined.p);
  return rc;
}

static int added_cmp(const void *x, const void *y) {
  const added_tok *a = x, *b = y;
  uint8_t fa = (uint8_t)a->s[0], fb = (uint8_t)b->s[0];
  if (fa != fb) return fa < fb ? -1 : 1;
  return a->len != b->len ? (a->len > b->len ? -1 : 1) : (a->id > b->id) - (a->id < b->id);
}

static int parse_added(ot_tokenizer *t, const cJSON *root, const char *path) {
  hf_spec *h = t->hf;
  const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
  h->special = calloc((size_t)t->vocab_size, 1);
  size_t n = cJSON_IsArray(added) ? (size_t)cJSON_GetArraySize(added) : 0;
  h->added = calloc(n ? n : 1, sizeof *h->added);
  if (!h->special || !h->added) return ot_error(OT_ERR_NOMEM, "cannot allocate the added tokens of %s", path);
  bool normalizes = h->n_norm > 0;
  for (const cJSON *a = n ? added->child : NULL; a; a = a->next) {
    added_tok *k = &h->added[h->n_added];
    const char *content = jstr(a, "content");
    k->id = (int32_t)cJSON_GetObjectItemCaseSensitive(a, "id")->valuedouble; /* checked by vocab_build */
    k->s = t->text + t->text_off[k->id];
    k->len = (uint32_t)strlen(content);
    bool single_word = false, normalized = false;
    int rc;
    if ((rc = jbool(a, "lstrip", false, &k->lstrip, path, "added token")) != OT_OK ||
        (rc = jbool(a, "rstrip", false, &k->rstrip, path, "added token")) != OT_OK ||
        (rc = jbool(a, "special", false, &k->special, path, "added token")) != OT_OK ||
        (rc = jbool(a, "single_word", false, &single_word, path, "added token")) != OT_OK ||
        (rc = jbool(a, "normalized", false, &normalized, path, "added token")) != OT_OK)
      return rc;
    if (single_word)
      return unsupported(path, "added token option single_word: true on", content, "single_word: false");
    if (normalized && normalizes)
      return unsupported(path, "added token option normalized: true (with a normalizer) on", content,
                         "normalized: false, or no normalizer");
    h->special[k->id] = k->special;
    h->n_added++;
  }
  qsort(h->added, h->n_added, sizeof *h->added, added_cmp);
  for (int b = 0, k = 0; b <= 256; b++) {
    while (k < (int)h->n_added && (uint8_t)h->added[k].s[0] < b) k++;
    h->added_start[b] = (uint32_t)k;
  }
  return OT_OK;
}

/* A token named in tokenizer_config.json: a string or {"content": ...}. */
static int config_token(const cJSON *cfg, const char *key, char **out, const char *path) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
  const char *s = cJSON_IsString(v) ? v->valuestring : jstr(v, "content");
  if (!v || cJSON_IsNull(v)) return OT_OK;
  if (!s) return ot_error(OT_ERR_FORMAT, "%s: \"%s\" is neither a string nor {\"content\": ...}", path, key);
  *out = strdup(s);
  return *out ? OT_OK : ot_error(OT_ERR_NOMEM, "cannot copy %s", key);
}

static int parse_config(ot_tokenizer *t, const cJSON *cfg, const char *path) {
  hf_spec *h = t->hf;
  int rc;
  if ((rc = config_token(cfg, "bos_token", &h->bos, path)) != OT_OK ||
      (rc = config_token(cfg, "eos_token", &h->eos, path)) != OT_OK ||
      (rc = jbool(cfg, "split_special_tokens", false, &h->split_special, path, "setting")) != OT_OK)
    return rc;
  const char *names[2] = {h->bos, h->eos};
  for (int i = 0; i < 2; i++)
    if (names[i] && vocab_find(t, names[i], strlen(names[i])) < 0)
      return ot_error(OT_ERR_FORMAT, "%s: %s \"%.40s\" is not in the vocabulary", path,
                      i ? "eos_token" : "bos_token", names[i]);
  /* add_bos_token / add_eos_token replace the template's specials, as LlamaTokenizerFast does. */
  const cJSON *ab = cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token");
  const cJSON *ae = cJSON_GetObjectItemCaseSensitive(cfg, "add_eos_token");
  if ((ab && !cJSON_IsNull(ab)) || (ae && !cJSON_IsNull(ae))) {
    bool add_bos = false, add_eos = false;
    if ((rc = jbool(cfg, "add_bos_token", false, &add_bos, path, "setting")) != OT_OK ||
        (rc = jbool(cfg, "add_eos_token", false, &add_eos, path, "setting")) != OT_OK)
      return rc;
    if ((add_bos && !h->bos) || (add_eos && !h->eos))
      return ot_error(OT_ERR_FORMAT, "%s: add_%s_token is true but there is no %s_token", path,
                      add_bos && !h->bos ? "bos" : "eos", add_bos && !h->bos ? "bos" : "eos");
    h->n_pre = h->n_suf = 0;
    if (add_bos) h->pre[h->n_pre++] = vocab_find(t, h->bos, strlen(h->bos));
    if (add_eos) h->suf[h->n_suf++] = vocab_find(t, h->eos, strlen(h->eos));
  }
  const cJSON *ct = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
  const char *tmpl = cJSON_IsString(ct) ? ct->valuestring : NULL;
  if (cJSON_IsArray(ct)) /* [{"name", "template"}]: the "default" one, as transformers picks */
    for (const cJSON *c = ct->child; c; c = c->next)
      if (jstr(c, "name") && strcmp(jstr(c, "name"), "default") == 0) tmpl = jstr(c, "template");
  if (tmpl && !(h->chat_template = strdup(tmpl)))
    return ot_error(OT_ERR_NOMEM, "cannot copy the chat template");
  return OT_OK;
}

static int hf_parse(ot_tokenizer *t, const cJSON *root, const cJSON *cfg, const char *path,
                    const char *cfg_path) {
  hf_spec *h = t->hf;
  if (!cJSON_IsObject(root)) return ot_error(OT_ERR_FORMAT, "%s: not a JSON object", path);
  const char *opts[] = {"truncation", "padding"};
  for (size_t i = 0; i < 2; i++)
    if (jset(root, opts[i]))
      return unsupported(path, "top-level option", opts[i], "truncation and padding null");
  int rc = parse_model(t, root, path);
  int seen = 0;
  bool fused = false;
  if (rc == OT_OK) rc = parse_normalizer(h, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), path);
  if (rc == OT_OK) rc = parse_pre(h, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), path, &seen);
  if (rc == OT_OK) rc = parse_post(h, t, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), path);
  if (rc == OT_OK) {
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (!d || cJSON_IsNull(d))
      rc = unsupported(path, "decoder", "null",
                       "the decoders listed below; tokenizers joins tokens with spaces");
    else
      rc = parse_decoder(h, d, path, &fused);
  }
  if (rc == OT_OK) rc = parse_added(t, root, path);
  if (rc != OT_OK) return rc;
  bytes_to_unicode(h->cp_of);
  if (h->byte_level)
    for (int b = 0; b < 256; b++) {
      char s[2];
      size_t n = utf8_put(h->cp_of[b], s);
      if ((t->byte_id[b] = vocab_find(t, s, n)) < 0)
        return ot_error(OT_ERR_FORMAT, "%s: ByteLevel pre-tokenizer but no token for byte 0x%02x", path, b);
    }
  if (cfg && (rc = parse_config(t, cfg, cfg_path)) != OT_OK) return rc;
  /* sp_words may cut a word before a "▁" that follows another character when no token has
   * such a "▁" inside (true of Llama 2's and Mistral's vocabularies): no merge can cross the cut. */
  h->sp_cut = !h->byte_level && !h->ignore_merges && vocab_find(t, SPIECE, 3) >= 0;
  for (int32_t id = 0; id < t->vocab_size && h->sp_cut; id++) {
    const char *x = t->text + t->text_off[id];
    size_t n = t->text_len[id];
    for (size_t k = 1; n != UINT32_MAX && k + 3 <= n && h->sp_cut; k++)
      if (memcmp(x + k, SPIECE, 3) == 0 && !(k >= 3 && memcmp(x + k - 3, SPIECE, 3) == 0)) h->sp_cut = false;
  }
  return hf_build_decoder(t, path);
}

int ot_tokenizer_hf_load(const char *tokenizer_json_path, const char *config_path, ot_tokenizer **out) {
  if (!tokenizer_json_path || !out) return ot_error(OT_ERR_INVALID, "ot_tokenizer_hf_load: NULL argument");
  ot_tokenizer *t = tok_alloc(KIND_HF);
  if (!t || !(t->hf = calloc(1, sizeof *t->hf))) {
    ot_tokenizer_free(t);
    return ot_error(OT_ERR_NOMEM, "cannot allocate a tokenizer");
  }
  hf_spec *h = t->hf;
  cJSON *root = NULL, *cfg = NULL;
  int rc = ot_file_read_all(tokenizer_json_path, TOK_MAX_FILE, &h->json, &h->json_len);
  if (rc == OT_OK && !(root = cJSON_ParseWithLength(h->json, h->json_len)))
    rc = ot_error(OT_ERR_FORMAT, "%s: not valid JSON", tokenizer_json_path);
  if (rc == OT_OK && config_path) {
    rc = ot_file_read_all(config_path, TOK_MAX_FILE, &h->config, &h->config_len);
    if (rc == OT_OK && !(cfg = cJSON_ParseWithLength(h->config, h->config_len)))
      rc = ot_error(OT_ERR_FORMAT, "%s: not valid JSON", config_path);
    if (rc == OT_OK && !cJSON_IsObject(cfg))
      rc = ot_error(OT_ERR_FORMAT, "%s: not a JSON object", config_path);
  }
  if (rc == OT_OK) rc = hf_parse(t, root, cfg, tokenizer_json_path, config_path);
  cJSON_Delete(root);
  cJSON_Delete(cfg);
  if (rc != OT_OK) {
    ot_tokenizer_free(t);
    return rc;
  }
  *out = t;
  return OT_OK;
}

#define NO_TOKENIZER_FILES                                                                                   \
  "tokenizer.json, vocab.json + merges.txt, or tokenizer_config.json naming \"" BYTE_CLASS "\""

int ot_tokenizer_load_dir_optional(const char *dir, ot_tokenizer **out) {
  if (!dir || !out) return ot_error(OT_ERR_INVALID, "ot_tokenizer_load_dir_optional: NULL argument");
  *out = NULL;
  char *vocab = NULL, *merges = NULL, *config = NULL, *tj = NULL;
  int rc = ot_path_join(dir, "vocab.json", &vocab);
  if (rc == OT_OK) rc = ot_path_join(dir, "merges.txt", &merges);
  if (rc == OT_OK) rc = ot_path_join(dir, "tokenizer_config.json", &config);
  if (rc == OT_OK) rc = ot_path_join(dir, "tokenizer.json", &tj);
  if (rc != OT_OK) goto done;
  bool has_vocab = ot_file_exists(vocab), has_merges = ot_file_exists(merges);
  if (ot_file_exists(tj)) {
    rc = ot_tokenizer_hf_load(tj, ot_file_exists(config) ? config : NULL, out);
    goto done;
  }
  if (has_vocab && has_merges) {
    rc = ot_tokenizer_bpe_load(vocab, merges, out);
    goto done;
  }
  if (ot_file_exists(config)) {
    cJSON *root = NULL;
    rc = read_json(config, &root);
    if (rc != OT_OK) goto done;
    const cJSON *cls = cJSON_GetObjectItemCaseSensitive(root, "tokenizer_class");
    bool is_byte = cJSON_IsString(cls) && strcmp(cls->valuestring, BYTE_CLASS) == 0;
    cJSON_Delete(root);
    if (is_byte) {
      rc = ot_tokenizer_byte_new(out);
      goto done;
    }
  }
  if (has_vocab || has_merges) {
    rc = ot_error(OT_ERR_NOTFOUND, "%s has %s but no %s", dir, has_vocab ? "vocab.json" : "merges.txt",
                  has_vocab ? "merges.txt" : "vocab.json");
    goto done;
  }
done:
  free(vocab);
  free(merges);
  free(config);
  free(tj);
  return rc;
}

int ot_tokenizer_require(const ot_tokenizer *tok, const char *dir, const char *hint) {
  if (tok) return OT_OK;
  return ot_error(OT_ERR_NOTFOUND, "%s has no tokenizer (" NO_TOKENIZER_FILES ")%s%s", dir ? dir : "(null)",
                  hint ? ": " : "", hint ? hint : "");
}

int ot_tokenizer_load_dir(const char *dir, ot_tokenizer **out) {
  if (!dir || !out) return ot_error(OT_ERR_INVALID, "ot_tokenizer_load_dir: NULL argument");
  int rc = ot_tokenizer_load_dir_optional(dir, out);
  if (rc == OT_OK) rc = ot_tokenizer_require(*out, dir, NULL);
  return rc;
}

/* ------------------------------------------------------------------ saving */

static int write_file(const char *dir, const char *name, const sbuf *b) {
  if (b->oom) return ot_error(OT_ERR_NOMEM, "cannot build %s/%s in memory", dir, name);
  char *path = NULL;
  int rc = ot_path_join(dir, name, &path);
  if (rc == OT_OK) rc = ot_file_write_atomic(path, b->p ? b->p : "", b->n);
  free(path);
  return rc;
}

int ot_tokenizer_save_dir(const ot_tokenizer *tok, const char *dir) {
  if (!dir) return ot_error(OT_ERR_INVALID, "ot_tokenizer_save_dir: NULL argument");
  if (!tok) return OT_OK; /* a model without a tokenizer: nothing to write */
  int rc = ot_mkdir_p(dir);
  if (rc != OT_OK) return rc;
  sbuf b = {0};
  if (tok->kind == KIND_HF) { /* the files as they were read */
    sb_put(&b, tok->hf->json, tok->hf->json_len);
    rc = write_file(dir, "tokenizer.json", &b);
    if (rc == OT_OK && tok->hf->config) {
      b.n = 0;
      sb_put(&b, tok->hf->config, tok->hf->config_len);
      rc = write_file(dir, "tokenizer_config.json", &b);
    }
    free(b.p);
    return rc;
  }
  if (tok->kind == KIND_BYTE) {
    const char cfg[] = "{\n  \"tokenizer_class\": \"" BYTE_CLASS "\",\n  \"vocab_size\": 256\n}\n";
    sb_put(&b, cfg, sizeof cfg - 1);
    rc = write_file(dir, "tokenizer_config.json", &b);
    free(b.p);
    return rc;
  }
  /* vocab.json in id order, laid out like encoder.json. */
  sb_put(&b, "{", 1);
  bool first = true;
  for (int32_t id = 0; id < tok->vocab_size; id++) {
    if (tok->text_len[id] == UINT32_MAX) continue;
    char num[24];
    if (!first) sb_put(&b, ", ", 2);
    first = false;
    sb_json_string(&b, tok->text + tok->text_off[id], tok->text_len[id]);
    sb_put(&b, num, (size_t)snprintf(num, sizeof num, ": %d", id));
  }
  sb_put(&b, "}", 1);
  rc = write_file(dir, "vocab.json", &b);
  if (rc == OT_OK) {
    b.n = 0;
    const char hdr[] = "#version: 0.2\n";
    sb_put(&b, hdr, sizeof hdr - 1);
    for (size_t i = 0; i < tok->n_merges; i++) {
      int32_t a = tok->merges[i][0], c = tok->merges[i][1];
      sb_put(&b, tok->text + tok->text_off[a], tok->text_len[a]);
      sb_put(&b, " ", 1);
      sb_put(&b, tok->text + tok->text_off[c], tok->text_len[c]);
      sb_put(&b, "\n", 1);
    }
    rc = write_file(dir, "merges.txt", &b);
  }
  if (rc == OT_OK) {
    b.n = 0;
    const char cfg[] = "{\n  \"tokenizer_class\": \"" BPE_CLASS "\",\n  \"add_prefix_space\": false\n}\n";
    sb_put(&b, cfg, sizeof cfg - 1);
    rc = write_file(dir, "tokenizer_config.json", &b);
  }
  free(b.p);
  return rc;
}

/* ----------------------------------------------------------------- queries */

int ot_tokenizer_vocab_size(const ot_tokenizer *tok) { return tok ? tok->vocab_size : 0; }

int ot_tokenizer_token_id(const ot_tokenizer *tok, const char *token, int32_t *id) {
  if (!tok || !token || !id) return ot_error(OT_ERR_INVALID, "ot_tokenizer_token_id: NULL argument");
  size_t n = strlen(token);
  int32_t r = -1;
  if (tok->kind == KIND_BYTE)
    r = n == 1 ? (int32_t)(unsigned char)token[0] : -1;
  else
    r = vocab_find(tok, token, n);
  if (r < 0) return ot_error(OT_ERR_NOTFOUND, "token \"%.40s\" is not in the vocabulary", token);
  *id = r;
  return OT_OK;
}

/* ---------------------------------------------------------------- encoding */

typedef struct {
  int32_t *v;
  size_t n, cap;
} ivec;

static int ivec_reserve(ivec *v, size_t extra) {
  if (v->cap - v->n >= extra) return OT_OK;
  size_t c = v->cap ? v->cap : 64;
  while (c - v->n < extra) {
    if (c > SIZE_MAX / 2 / sizeof *v->v) return ot_error(OT_ERR_NOMEM, "token array too large");
    c *= 2;
  }
  int32_t *p = realloc(v->v, c * sizeof *p);
  if (!p) return ot_error(OT_ERR_NOMEM, "cannot allocate %zu token ids", c);
  v->v = p;
  v->cap = c;
  return OT_OK;
}

typedef struct {
  int32_t rank, pos, a, b, merged;
} heap_ent;

/* Per-encode-call scratch, so concurrent encodes share nothing but the cache. */
typedef struct {
  int32_t *sym, *next, *prev, *off;
  size_t cap;
  heap_ent *heap, *batch;
  size_t hn, hcap, bn, bcap;
  sbuf norm[2], prefixed, mapped; /* tokenizer.json pipeline buffers */
} scratch;

static void scratch_free(scratch *s) {
  free(s->sym);
  free(s->next);
  free(s->prev);
  free(s->off);
  free(s->heap);
  free(s->batch);
  free(s->norm[0].p);
  free(s->norm[1].p);
  free(s->prefixed.p);
  free(s->mapped.p);
}

/* Room for a word of n symbols (n + 1 offsets). */
static int scratch_reserve(scratch *s, size_t n) {
  if (n + 1 <= s->cap) return OT_OK;
  int32_t **arrs[4] = {&s->sym, &s->next, &s->prev, &s->off};
  for (int k = 0; k < 4; k++) {
    int32_t *p = realloc(*arrs[k], (n + 1) * sizeof *p);
    if (!p) return ot_error(OT_ERR_NOMEM, "cannot allocate BPE scratch for %zu bytes", n);
    *arrs[k] = p;
  }
  s->cap = n + 1;
  return OT_OK;
}

static int grow_ents(heap_ent **p, size_t *cap, size_t need) {
  if (need <= *cap) return OT_OK;
  size_t c = *cap ? *cap * 2 : 64;
  while (c < need) c *= 2;
  heap_ent *n = realloc(*p, c * sizeof *n);
  if (!n) return ot_error(OT_ERR_NOMEM, "cannot allocate BPE scratch");
  *p = n;
  *cap = c;
  return OT_OK;
}

static bool ent_less(const heap_ent *x, const heap_ent *y) {
  return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static int heap_push(scratch *s, heap_ent e) {
  int rc = grow_ents(&s->heap, &s->hcap, s->hn + 1);
  if (rc != OT_OK) return rc;
  size_t i = s->hn++;
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (!ent_less(&e, &s->heap[p])) break;
    s->heap[i] = s->heap[p];
    i = p;
  }
  s->heap[i] = e;
  return OT_OK;
}

static heap_ent heap_pop(scratch *s) {
  heap_ent top = s->heap[0], last = s->heap[--s->hn];
  size_t i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= s->hn) break;
    if (c + 1 < s->hn && ent_less(&s->heap[c + 1], &s->heap[c])) c++;
    if (!ent_less(&s->heap[c], &last)) break;
    s->heap[i] = s->heap[c];
    i = c;
  }
  if (s->hn > 0) s->heap[i] = last;
  return top;
}

static int push_pair(const ot_tokenizer *t, scratch *s, int32_t pos) {
  int32_t q = s->next[pos];
  if (q < 0) return OT_OK;
  const pair_slot *ps = pair_find(t, s->sym[pos], s->sym[q]);
  if (!ps) return OT_OK;
  return heap_push(s, (heap_ent){ps->rank, pos, s->sym[pos], s->sym[q], ps->merged});
}

static bool ent_valid(const scratch *s, const heap_ent *e) {
  int32_t q = s->next[e->pos];
  return s->sym[e->pos] == e->a && q >= 0 && s->sym[q] == e->b;
}

/* Encoder.js's bpe(): while some adjacent pair has a rank, take the lowest rank
 * (the last such pair in the word if several pairs share it), merge all its
 * occurrences left to right. A heap keyed by (rank, position) finds it. */
static int bpe_merge(const ot_tokenizer *t, const uint8_t *w, size_t n, scratch *s, ivec *out) {
  if (n > TOK_MAX_WORD) return ot_error(OT_ERR_RANGE, "a pre-token of %zu bytes is too long to encode", n);
  int rc = scratch_reserve(s, n);
  if (rc != OT_OK) return rc;
  int32_t len = (int32_t)n;
  for (int32_t i = 0; i < len; i++) {
    s->sym[i] = t->byte_id[w[i]];
    s->prev[i] = i - 1;
    s->next[i] = i + 1 < len ? i + 1 : -1;
  }
  s->hn = 0;
  for (int32_t i = 0; i + 1 < len && rc == OT_OK; i++) rc = push_pair(t, s, i);
  while (rc == OT_OK && s->hn > 0) {
    heap_ent top = heap_pop(s);
    if (!ent_valid(s, &top)) continue; /* stale: one of its symbols was merged away */
    s->bn = 0;
    rc = grow_ents(&s->batch, &s->bcap, 1);
    if (rc != OT_OK) break;
    s->batch[s->bn++] = top;
    while (rc == OT_OK && s->hn > 0 && s->heap[0].rank == top.rank) {
      rc = grow_ents(&s->batch, &s->bcap, s->bn + 1);
      if (rc == OT_OK) s->batch[s->bn++] = heap_pop(s);
    }
    if (rc != OT_OK) break;
    const heap_ent *chosen = &s->batch[0];
    for (size_t k = s->bn; k-- > 0;)
      if (ent_valid(s, &s->batch[k])) {
        chosen = &s->batch[k];
        break;
      }
    int32_t ca = chosen->a, cb = chosen->b;
    for (size_t k = 0; k < s->bn && rc == OT_OK; k++) {
      heap_ent e = s->batch[k];
      if (e.a != ca || e.b != cb) {
        rc = heap_push(s, e); /* an alias pair with the same rank: its turn comes in a later round */
        continue;
      }
      if (!ent_valid(s, &e)) continue;
      int32_t p = e.pos, q = s->next[p], r = s->next[q];
      s->sym[p] = e.merged;
      s->sym[q] = -1;
      s->next[p] = r;
      if (r >= 0) s->prev[r] = p;
      if (s->prev[p] >= 0) rc = push_pair(t, s, s->prev[p]);
      if (rc == OT_OK) rc = push_pair(t, s, p);
    }
  }
  if (rc != OT_OK) return rc;
  for (int32_t i = 0; i >= 0; i = s->next[i]) out->v[out->n++] = s->sym[i];
  return OT_OK;
}

static int bb_reserve(sbuf *b, size_t need) {
  if (need <= b->cap) return OT_OK;
  size_t c = b->cap ? b->cap : 256;
  while (c < need) c *= 2;
  char *p = realloc(b->p, c);
  if (!p) return ot_error(OT_ERR_NOMEM, "cannot allocate %zu bytes of tokenizer scratch", c);
  b->p = p;
  b->cap = c;
  return OT_OK;
}

static void hf_push(const ot_tokenizer *t, scratch *s, int32_t pos, int *rc) {
  int32_t q = s->next[pos];
  if (*rc != OT_OK || q < 0 || s->sym[pos] < 0 || s->sym[q] < 0) return;
  const pair_slot *ps = pair_find(t, s->sym[pos], s->sym[q]);
  if (ps) *rc = heap_push(s, (heap_ent){ps->rank, pos, s->sym[pos], s->sym[q], ps->merged});
}

/* One pre-token through the BPE model: symbols are bytes (ByteLevel) or characters
 * (SentencePiece style, -1 for a character without a token); merges lowest rank,
 * then leftmost, first; leftover unknown characters become <0xXX> byte tokens
 * (byte_fallback) or unk_token (fused when fuse_unk). */
static int hf_merge(const ot_tokenizer *t, const uint8_t *w, size_t n, scratch *s, ivec *out) {
  const hf_spec *h = t->hf;
  if (n > TOK_MAX_WORD) return ot_error(OT_ERR_RANGE, "a pre-token of %zu bytes is too long to encode", n);
  if (h->ignore_merges) { /* a pre-token that is itself a token is taken whole */
    sbuf *m = &s->mapped;
    int32_t id = -1;
    if (!h->byte_level) {
      id = vocab_find(t, (const char *)w, n);
    } else if (bb_reserve(m, 2 * n) == OT_OK) {
      m->n = 0;
      for (size_t i = 0; i < n; i++) m->n += utf8_put(h->cp_of[w[i]], m->p + m->n);
      id = vocab_find(t, m->p, m->n);
    }
    if (id >= 0) {
      out->v[out->n++] = id;
      return OT_OK;
    }
  }
  int rc = scratch_reserve(s, n);
  if (rc != OT_OK) return rc;
  int32_t len = 0;
  for (size_t i = 0; i < n; len++) {
    size_t l = 1;
    int32_t id;
    if (h->byte_level) {
      id = t->byte_id[w[i]];
    } else {
      uint32_t cp;
      l = ot_utf8_decode(w + i, n - i, &cp);
      id = l ? vocab_find(t, (const char *)w + i, l) : -1;
      if (!l) l = 1; /* an invalid byte: unknown, falls back to itself */
    }
    s->sym[len] = id;
    s->off[len] = (int32_t)i;
    s->prev[len] = len - 1;
    s->next[len] = len + 1;
    i += l;
  }
  s->next[len - 1] = -1;
  s->off[len] = (int32_t)n;
  s->hn = 0;
  for (int32_t i = 0; i + 1 < len; i++) hf_push(t, s, i, &rc);
  while (rc == OT_OK && s->hn > 0) {
    heap_ent e = heap_pop(s);
    if (!ent_valid(s, &e)) continue;
    int32_t p = e.pos, q = s->next[p], r = s->next[q];
    s->sym[p] = e.merged;
    s->sym[q] = -2;
    s->next[p] = r;
    if (r >= 0) s->prev[r] = p;
    if (s->prev[p] >= 0) hf_push(t, s, s->prev[p], &rc);
    hf_push(t, s, p, &rc);
  }
  if (rc != OT_OK) return rc;
  bool unk_before = false;
  for (int32_t i = 0; i >= 0; i = s->next[i]) {
    if (s->sym[i] >= 0) {
      out->v[out->n++] = s->sym[i];
      unk_before = false;
      continue;
    }
    /* An unknown symbol was never merged: its bytes are those of slot i alone. */
    size_t a = (size_t)s->off[i], b = (size_t)s->off[i + 1];
    bool all = h->byte_fallback;
    for (size_t k = a; k < b && all; k++) all = h->bf_id[w[k]] >= 0;
    if (all) {
      for (size_t k = a; k < b; k++) out->v[out->n++] = h->bf_id[w[k]];
      unk_before = false;
      continue;
    }
    if (h->unk_id < 0)
      return ot_error(OT_ERR_UNSUPPORTED, "\"%.*s\" has no token and the tokenizer has no unk_token",
                      (int)(b - a), (const char *)w + a);
    if (!(h->fuse_unk && unk_before)) out->v[out->n++] = h->unk_id;
    unk_before = true;
  }
  return OT_OK;
}

/* The top hash bits pick the shard and bit 0 is forced on (0 marks an empty slot): probe from the rest. */
static uint32_t slot_of(uint64_t h) { return (uint32_t)(h >> 1); }

static bool cache_get(cache_shard *sh, uint64_t h, const uint8_t *w, size_t n, ivec *out) {
  if (!sh->slots) return false;
  uint32_t mask = sh->cap - 1;
  for (uint32_t i = slot_of(h) & mask;; i = (i + 1) & mask) {
    const cache_slot *s = &sh->slots[i];
    if (s->hash == 0) return false;
    if (s->hash == h && s->key_len == n && memcmp(sh->keys + s->key_off, w, n) == 0) {
      memcpy(out->v + out->n, sh->ids + s->ids_off, s->n_ids * sizeof *out->v);
      out->n += s->n_ids;
      return true;
    }
  }
}

static void cache_reset(cache_shard *sh) {
  memset(sh->slots, 0, sh->cap * sizeof *sh->slots);
  sh->count = sh->keys_len = sh->ids_len = 0;
}

static bool grow_arena(void **p, uint32_t *cap, uint32_t need, size_t elem) {
  if (need <= *cap) return true;
  uint32_t c = *cap ? *cap : 4096;
  while (c < need) c *= 2;
  void *np = realloc(*p, (size_t)c * elem);
  if (!np) return false;
  *p = np;
  *cap = c;
  return true;
}

/* Best effort: the cache only saves time, so allocation failures just skip it. */
static void cache_put(cache_shard *sh, uint64_t h, const uint8_t *w, size_t n, const int32_t *ids,
                      size_t n_ids) {
  if (!sh->slots) {
    sh->slots = calloc(CACHE_MIN_SLOTS, sizeof *sh->slots);
    if (!sh->slots) return;
    sh->cap = CACHE_MIN_SLOTS;
  }
  if ((sh->count + 1) * 2 > sh->cap) {
    cache_slot *ns = sh->cap < CACHE_MAX_SLOTS ? calloc((size_t)sh->cap * 2, sizeof *ns) : NULL;
    if (ns) {
      uint32_t mask = sh->cap * 2 - 1;
      for (uint32_t i = 0; i < sh->cap; i++) {
        if (sh->slots[i].hash == 0) continue;
        uint32_t j = slot_of(sh->slots[i].hash) & mask;
        while (ns[j].hash != 0) j = (j + 1) & mask;
        ns[j] = sh->slots[i];
      }
      free(sh->slots);
      sh->slots = ns;
      sh->cap *= 2;
    } else {
      cache_reset(sh);
    }
  }
  if (sh->keys_len + n > CACHE_MAX_KEY_BYTES) cache_reset(sh);
  if (!grow_arena((void **)&sh->keys, &sh->keys_cap, sh->keys_len + (uint32_t)n, 1) ||
      !grow_arena((void **)&sh->ids, &sh->ids_cap, sh->ids_len + (uint32_t)n_ids, sizeof *sh->ids))
    return;
  uint32_t mask = sh->cap - 1, i = slot_of(h) & mask;
  while (sh->slots[i].hash != 0) i = (i + 1) & mask;
  sh->slots[i] = (cache_slot){h, sh->keys_len, sh->ids_len, (uint16_t)n, (uint16_t)n_ids};
  memcpy(sh->keys + sh->keys_len, w, n);
  memcpy(sh->ids + sh->ids_len, ids, n_ids * sizeof *ids);
  sh->keys_len += (uint32_t)n;
  sh->ids_len += (uint32_t)n_ids;
  sh->count++;
}

static int bpe_word(const ot_tokenizer *t, const uint8_t *w, size_t n, scratch *s, ivec *out) {
  /* Every token is at least one byte, so a word yields at most n ids. */
  int rc = ivec_reserve(out, n);
  if (rc != OT_OK) return rc;
  int (*merge)(const ot_tokenizer *, const uint8_t *, size_t, scratch *, ivec *) =
      t->kind == KIND_HF ? hf_merge : bpe_merge;
  if (n == 1 && (t->kind == KIND_BPE || t->hf->byte_level)) {
    out->v[out->n++] = t->byte_id[w[0]];
    return OT_OK;
  }
  if (n > CACHE_MAX_WORD) return merge(t, w, n, s, out);
  uint64_t h = hash_bytes(w, n) | 1;
  cache_shard *sh = &t->cache[h >> 60];
  pthread_mutex_lock(&sh->mu);
  bool hit = cache_get(sh, h, w, n, out);
  pthread_mutex_unlock(&sh->mu);
  if (hit) return OT_OK;
  size_t start = out->n;
  rc = merge(t, w, n, s, out);
  if (rc != OT_OK) return rc;
  pthread_mutex_lock(&sh->mu);
  cache_put(sh, h, w, n, out->v + start, out->n - start);
  pthread_mutex_unlock(&sh->mu);
  return OT_OK;
}

/* Class of the character at s[i] and its length; an invalid byte is one "other" character. */
static inline int char_at(const ot_tokenizer *t, const uint8_t *s, size_t n, size_t i, size_t *len) {
  if (s[i] < 0x80) {
    *len = 1;
    return t->ascii_cls[s[i]];
  }
  uint32_t cp;
  size_t l = ot_utf8_decode(s + i, n - i, &cp);
  if (l == 0) {
    *len = 1;
    return OT_UC_OTHER;
  }
  *len = l;
  return ot_unicode_class(cp);
}

/* End of the regex match that starts at s[i] (the alternatives in order). */
static size_t pretoken_end(const ot_tokenizer *t, const uint8_t *s, size_t n, size_t i) {
  if (s[i] == '\'' && i + 1 < n) { /* 's|'t|'re|'ve|'m|'ll|'d */
    uint8_t a = s[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 < n) {
      uint8_t b = s[i + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
  }
  size_t l;
  int cls = char_at(t, s, n, i, &l);
  size_t j = i;
  if (s[i] == ' ' && i + 1 < n) { /* " ?" before a letter, number or symbol run */
    int c1 = char_at(t, s, n, i + 1, &l);
    if (c1 != OT_UC_SPACE) cls = c1, j = i + 1;
  }
  if (cls != OT_UC_SPACE) { /* ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ */
    while (j < n && char_at(t, s, n, j, &l) == cls) j += l;
    return j;
  }
  /* \s+(?!\S) leaves the last space of a run for the next word; else \s+ */
  size_t last = i;
  while (j < n && char_at(t, s, n, j, &l) == OT_UC_SPACE) last = j, j += l;
  if (j == n) return n;
  return last > i ? last : j;
}

/* End of the match at s[i] of the Llama 3 / Qwen2 regex (max_digits 3 / 1):
 * (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static size_t llama3_end(const ot_tokenizer *t, const uint8_t *s, size_t n, size_t i, int max_digits) {
  if (s[i] == '\'' && i + 1 < n) {
    uint8_t a = s[i + 1] >= 'A' && s[i + 1] <= 'Z' ? s[i + 1] + 32 : s[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 < n) {
      uint8_t b = s[i + 2] >= 'A' && s[i + 2] <= 'Z' ? s[i + 2] + 32 : s[i + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
  }
  size_t l0, l;
  int c0 = char_at(t, s, n, i, &l0);
  bool nl0 = s[i] == '\r' || s[i] == '\n';
  size_t j = i;
  if (c0 != OT_UC_LETTER && c0 != OT_UC_NUMBER && !nl0 && i + l0 < n &&
      char_at(t, s, n, i + l0, &l) == OT_UC_LETTER)
    j = i + l0; /* one leading non-letter, non-digit, non-newline before letters */
  if (c0 == OT_UC_LETTER || j > i) {
    while (j < n && char_at(t, s, n, j, &l) == OT_UC_LETTER) j += l;
    return j;
  }
  if (c0 == OT_UC_NUMBER) {
    for (int d = 0; d < max_digits && j < n && char_at(t, s, n, j, &l) == OT_UC_NUMBER; d++) j += l;
    return j;
  }
  if (s[i] == ' ' && i + 1 < n && char_at(t, s, n, i + 1, &l) == OT_UC_OTHER) j = i + 1;
  if (j > i || c0 == OT_UC_OTHER) {
    while (j < n && char_at(t, s, n, j, &l) == OT_UC_OTHER) j += l;
    while (j < n && (s[j] == '\r' || s[j] == '\n')) j++;
    return j;
  }
  /* c0 is white space. \s*[\r\n]+ ends after the run's last newline, if it has one. */
  size_t last_nl = SIZE_MAX, last = i;
  while (j < n && char_at(t, s, n, j, &l) == OT_UC_SPACE) {
    if (s[j] == '\r' || s[j] == '\n') last_nl = j;
    last = j;
    j += l;
  }
  if (last_nl != SIZE_MAX) return last_nl + 1;
  if (j == n) return n;
  return last > i ? last : j; /* \s+(?!\S) leaves the last space to the next word; else \s+ */
}

static size_t split_end(const ot_tokenizer *t, int kind, const uint8_t *s, size_t n, size_t i) {
  switch (kind) {
  case SPLIT_GPT2: return pretoken_end(t, s, n, i);
  case SPLIT_LLAMA3: return llama3_end(t, s, n, i, 3);
  case SPLIT_QWEN2: return llama3_end(t, s, n, i, 1);
  default: return n;
  }
}

/* One piece of a section after the Split pre-tokenizer: ByteLevel's prefix space and regex. */
static int hf_piece(const ot_tokenizer *t, const uint8_t *p, size_t n, scratch *sc, ivec *out) {
  const hf_spec *h = t->hf;
  if (h->bl_prefix && p[0] != ' ') {
    sbuf *b = &sc->prefixed;
    int rc = bb_reserve(b, n + 1);
    if (rc != OT_OK) return rc;
    b->p[0] = ' ';
    memcpy(b->p + 1, p, n);
    p = (const uint8_t *)b->p;
    n++;
  }
  int rc = OT_OK;
  for (size_t i = 0; i < n && rc == OT_OK;) {
    size_t end = split_end(t, h->bl_split, p, n, i);
    rc = bpe_word(t, p + i, end - i, sc, out);
    i = end;
  }
  return rc;
}

/* A SentencePiece-style word (no pre-tokenizer splits it: a whole paragraph can be one word),
 * cut before each "▁" that follows another character when sp_cut allows: the pieces' merges
 * are those of the whole, since none crosses a cut, and the pieces are short enough for the
 * word cache. UTF-8 lead byte 0xE2 is never a continuation byte, so cuts fall between
 * characters. */
static int sp_words(const ot_tokenizer *t, const uint8_t *s, size_t n, scratch *sc, ivec *out) {
  if (!t->hf->sp_cut) return bpe_word(t, s, n, sc, out);
  size_t a = 0;
  int rc = OT_OK;
  for (size_t i = 1; i + 3 <= n && rc == OT_OK; i++)
    if (memcmp(s + i, SPIECE, 3) == 0 && !(i >= 3 && memcmp(s + i - 3, SPIECE, 3) == 0)) {
      rc = bpe_word(t, s + a, i - a, sc, out);
      a = i;
    }
  if (rc == OT_OK && a < n) rc = bpe_word(t, s + a, n - a, sc, out);
  return rc;
}

/* Text between added tokens: normalizer, then pre-tokenizer, then the model. */
/* first: the section starts the text (Metaspace's prepend_scheme "first"); cont: it continues
 * earlier text, so the Prepend normalizer adds nothing before it. */
static int hf_section(const ot_tokenizer *t, const uint8_t *s, size_t n, bool first, bool cont, scratch *sc,
                      ivec *out) {
  const hf_spec *h = t->hf;
  sbuf *cur = &sc->norm[0], *nxt = &sc->norm[1];
  if (h->n_norm) {
    cur->n = 0;
    sb_put(cur, s, n);
    for (size_t k = 0; k < h->n_norm && cur->n; k++) {
      const hf_step *st = &h->norm[k];
      nxt->n = 0;
      if (st->kind == NORM_PREPEND) {
        if (!cont) sb_put(nxt, st->a, st->la);
        sb_put(nxt, cur->p, cur->n);
      } else if (st->kind == NORM_NFC) {
        uint8_t *nfc = NULL;
        size_t nl = 0;
        int rc = ot_utf8_nfc((const uint8_t *)cur->p, cur->n, &nfc, &nl);
        if (rc != OT_OK) return rc;
        sb_put(nxt, nfc, nl);
        free(nfc);
      } else {
        replace_all(nxt, cur->p, cur->n, st->a, st->la, st->b, st->lb);
      }
      sbuf *tmp = cur;
      cur = nxt;
      nxt = tmp;
    }
    if (cur->oom) return ot_error(OT_ERR_NOMEM, "cannot allocate a normalized text of %zu bytes", n);
    s = (const uint8_t *)cur->p;
    n = cur->n;
  }
  if (n == 0) return OT_OK;
  if (h->meta) { /* spaces -> replacement, which starts the text unless the scheme says not */
    /* not when the text already starts with it, after the replacement */
    bool pre = (h->meta_scheme == PREPEND_ALWAYS || (h->meta_scheme == PREPEND_FIRST && first)) &&
               s[0] != ' ' && !(n >= h->meta_rep_len && memcmp(s, h->meta_rep, h->meta_rep_len) == 0);
    nxt->n = 0;
    if (pre) sb_put(nxt, h->meta_rep, h->meta_rep_len);
    replace_all(nxt, (const char *)s, n, " ", 1, h->meta_rep, h->meta_rep_len);
    if (nxt->oom) return ot_error(OT_ERR_NOMEM, "cannot allocate a pre-tokenized text of %zu bytes", n);
    return sp_words(t, (const uint8_t *)nxt->p, nxt->n, sc, out);
  }
  int rc = OT_OK;
  for (size_t i = 0; i < n && rc == OT_OK;) {
    size_t end = split_end(t, h->split, s, n, i);
    rc = h->byte_level ? hf_piece(t, s + i, end - i, sc, out) : sp_words(t, s + i, end - i, sc, out);
    i = end;
  }
  return rc;
}

static bool is_space_at(const ot_tokenizer *t, const uint8_t *s, size_t n, size_t i, size_t *len) {
  return char_at(t, s, n, i, len) == OT_UC_SPACE;
}

/* Start of the trailing white space of s[a..b). */
static size_t trim_end(const ot_tokenizer *t, const uint8_t *s, size_t a, size_t b) {
  size_t i = a, keep = a, l;
  while (i < b) {
    bool sp = is_space_at(t, s, b, i, &l);
    i += l;
    if (!sp) keep = i;
  }
  return keep;
}

/* The leftmost added token at or after *pos (longest at that place); false if none. */
static bool next_added(const ot_tokenizer *t, const uint8_t *s, size_t n, size_t from, bool plain_special,
                       size_t *at, const added_tok **tok) {
  const hf_spec *h = t->hf;
  if (!h->n_added) return false;
  for (size_t i = from; i < n; i++) {
    for (uint32_t k = h->added_start[s[i]]; k < h->added_start[s[i] + 1]; k++) {
      const added_tok *a = &h->added[k];
      if (a->len <= n - i && memcmp(s + i, a->s, a->len) == 0 && !(plain_special && a->special)) {
        *at = i;
        *tok = a;
        return true;
      }
    }
  }
  return false;
}

static int hf_encode(const ot_tokenizer *t, const uint8_t *s, size_t n, unsigned flags, ivec *out) {
  const hf_spec *h = t->hf;
  bool plain_special = h->split_special || (flags & OT_TOK_SPECIAL_AS_TEXT);
  scratch sc = {0};
  int rc = ivec_reserve(out, HF_MAX_TEMPLATE);
  if (rc == OT_OK && (flags & OT_TOK_ADD_SPECIAL))
    for (int k = 0; k < h->n_pre; k++) out->v[out->n++] = h->pre[k];
  size_t pos = 0;
  bool rstrip = false;
  while (rc == OT_OK) {
    size_t at = n, l;
    const added_tok *a = NULL;
    /* rstrip takes the white space first, even an added token made of white space */
    if (rstrip)
      while (pos < n && is_space_at(t, s, n, pos, &l)) pos += l;
    bool found = next_added(t, s, n, pos, plain_special, &at, &a);
    size_t b = at;
    if (found && a->lstrip) b = trim_end(t, s, pos, b);
    bool cont = pos == 0 && (flags & OT_TOK_CONTINUATION);
    if (b > pos) rc = hf_section(t, s + pos, b - pos, pos == 0 && !cont, cont, &sc, out);
    if (!found || rc != OT_OK) break;
    rc = ivec_reserve(out, 1);
    if (rc == OT_OK) out->v[out->n++] = a->id;
    pos = at + a->len;
    rstrip = a->rstrip;
  }
  if (rc == OT_OK && (flags & OT_TOK_ADD_SPECIAL)) { /* the words may have used all the room */
    rc = ivec_reserve(out, HF_MAX_TEMPLATE);
    for (int k = 0; rc == OT_OK && k < h->n_suf; k++) out->v[out->n++] = h->suf[k];
  }
  scratch_free(&sc);
  return rc;
}

int ot_tokenizer_encode(const ot_tokenizer *tok, const char *text, size_t len, int32_t **ids, size_t *n_ids) {
  return ot_tokenizer_encode_ex(tok, text, len, 0, ids, n_ids);
}

int ot_tokenizer_encode_ex(const ot_tokenizer *tok, const char *text, size_t len, unsigned flags,
                           int32_t **ids, size_t *n_ids) {
  if (!tok || !ids || !n_ids || (!text && len))
    return ot_error(OT_ERR_INVALID, "ot_tokenizer_encode: NULL argument");
  const uint8_t *s = (const uint8_t *)text;
  ivec out = {0};
  int rc = ivec_reserve(&out, tok->kind == KIND_BYTE ? len + 1 : len / 4 + 16);
  if (rc != OT_OK) return rc;
  if (tok->kind == KIND_HF) {
    rc = hf_encode(tok, s, len, flags, &out);
    if (rc != OT_OK) {
      free(out.v);
      return rc;
    }
  } else if (tok->kind == KIND_BYTE) {
    for (size_t i = 0; i < len; i++) out.v[i] = s[i];
    out.n = len;
  } else {
    scratch sc = {0};
    for (size_t i = 0; i < len && rc == OT_OK;) {
      size_t end = pretoken_end(tok, s, len, i);
      rc = bpe_word(tok, s + i, end - i, &sc, &out);
      i = end;
    }
    scratch_free(&sc);
    if (rc != OT_OK) {
      free(out.v);
      return rc;
    }
  }
  *ids = out.v;
  *n_ids = out.n;
  return OT_OK;
}

int ot_tokenizer_decode(const ot_tokenizer *tok, const int32_t *ids, size_t n_ids, char **text, size_t *len) {
  return ot_tokenizer_decode_ex(tok, ids, n_ids, 0, text, len);
}

/* Strips up to k copies of the character c (cl bytes) from the start (or end) of s[*a..*b). */
static void strip_chars(const char *s, size_t *a, size_t *b, const char *c, size_t cl, size_t k,
                        bool at_end) {
  for (size_t i = 0; i < k && *b - *a >= cl; i++) {
    const char *p = at_end ? s + *b - cl : s + *a;
    if (memcmp(p, c, cl) != 0) break;
    if (at_end)
      *b -= cl;
    else
      *a += cl;
  }
}

int ot_tokenizer_decode_ex(const ot_tokenizer *tok, const int32_t *ids, size_t n_ids, unsigned flags,
                           char **text, size_t *len) {
  if (!tok || !text || (!ids && n_ids)) return ot_error(OT_ERR_INVALID, "ot_tokenizer_decode: NULL argument");
  const hf_spec *h = tok->hf;
  bool skip = h && (flags & OT_TOK_SKIP_SPECIAL);
  size_t total = 0;
  for (size_t i = 0; i < n_ids; i++) {
    int32_t id = ids[i];
    if (id < 0 || id >= tok->vocab_size || (tok->kind != KIND_BYTE && tok->text_len[id] == UINT32_MAX))
      return ot_error(OT_ERR_RANGE, "token id %d at position %zu is not in the vocabulary (size %d)", id, i,
                      tok->vocab_size);
    total += tok->kind == KIND_BYTE ? 1 : tok->raw_off[id + 1] - tok->raw_off[id];
  }
  char *out = malloc(total + 1);
  if (!out) return ot_error(OT_ERR_NOMEM, "cannot allocate %zu bytes of decoded text", total + 1);
  size_t o = 0;
  for (size_t i = 0; i < n_ids; i++) {
    if (tok->kind == KIND_BYTE) {
      out[o++] = (char)ids[i];
      continue;
    }
    if (skip && h->special[ids[i]]) continue;
    uint32_t a = tok->raw_off[ids[i]], b = tok->raw_off[ids[i] + 1];
    memcpy(out + o, tok->raw + a, b - a);
    o += b - a;
  }
  /* The Strip decoder works on the whole text, which a continuation is not. */
  if (h && !(flags & OT_TOK_CONTINUATION) && (h->strip_start || h->strip_stop)) {
    size_t a = 0, b = o;
    strip_chars(out, &a, &b, h->strip_ch, h->strip_ch_len, h->strip_start, false);
    strip_chars(out, &a, &b, h->strip_ch, h->strip_ch_len, h->strip_stop, true);
    memmove(out, out + a, b - a);
    o = b - a;
  }
  out[o] = '\0';
  *text = out;
  if (len) *len = o;
  return OT_OK;
}

int ot_tokenizer_bos_id(const ot_tokenizer *tok) {
  return tok && tok->hf && tok->hf->bos ? vocab_find(tok, tok->hf->bos, strlen(tok->hf->bos)) : -1;
}

int ot_tokenizer_eos_id(const ot_tokenizer *tok) {
  return tok && tok->hf && tok->hf->eos ? vocab_find(tok, tok->hf->eos, strlen(tok->hf->eos)) : -1;
}

const char *ot_tokenizer_bos_token(const ot_tokenizer *tok) { return tok && tok->hf ? tok->hf->bos : NULL; }

const char *ot_tokenizer_eos_token(const ot_tokenizer *tok) { return tok && tok->hf ? tok->hf->eos : NULL; }

const char *ot_tokenizer_chat_template(const ot_tokenizer *tok) {
  return tok && tok->hf ? tok->hf->chat_template : NULL;
}

int ot_tokenizer_is_special(const ot_tokenizer *tok, int32_t id) {
  return tok && tok->hf && id >= 0 && id < tok->vocab_size && tok->hf->special[id];
}
