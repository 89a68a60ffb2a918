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

enum { KIND_BYTE = 1, KIND_BPE = 2 };

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
  if (kind == KIND_BPE) {
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
      return ot_error(OT_ERR_FORMAT, "%s: entry %zu (\"%.40s\") has %s", path, n + 1, c->string ? c->string : "",
                      why);
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

#define NO_TOKENIZER_FILES "vocab.json + merges.txt, or tokenizer_config.json naming \"" BYTE_CLASS "\""

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
  /* tokenizer.json is not read yet, but a broken one is still an error, not "no tokenizer" */
  if (ot_file_exists(tj)) {
    cJSON *root = NULL;
    rc = read_json(tj, &root);
    if (rc == OT_OK && !cJSON_IsObject(root)) rc = ot_error(OT_ERR_FORMAT, "%s: not a JSON object", tj);
    cJSON_Delete(root);
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
  char *tj = NULL;
  bool has_tj = dir && ot_path_join(dir, "tokenizer.json", &tj) == OT_OK && ot_file_exists(tj);
  free(tj);
  return ot_error(OT_ERR_NOTFOUND, "%s has no tokenizer (" NO_TOKENIZER_FILES ")%s%s%s", dir ? dir : "(null)",
                  has_tj ? "; its tokenizer.json is not supported yet" : "", hint ? ": " : "",
                  hint ? hint : "");
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
  int32_t *sym, *next, *prev;
  size_t cap;
  heap_ent *heap, *batch;
  size_t hn, hcap, bn, bcap;
} scratch;

static void scratch_free(scratch *s) {
  free(s->sym);
  free(s->next);
  free(s->prev);
  free(s->heap);
  free(s->batch);
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
  if (n > s->cap) {
    int32_t *a = realloc(s->sym, n * sizeof *a);
    if (a) s->sym = a;
    int32_t *b = realloc(s->next, n * sizeof *b);
    if (b) s->next = b;
    int32_t *c = realloc(s->prev, n * sizeof *c);
    if (c) s->prev = c;
    if (!a || !b || !c) return ot_error(OT_ERR_NOMEM, "cannot allocate BPE scratch for %zu bytes", n);
    s->cap = n;
  }
  int32_t len = (int32_t)n;
  for (int32_t i = 0; i < len; i++) {
    s->sym[i] = t->byte_id[w[i]];
    s->prev[i] = i - 1;
    s->next[i] = i + 1 < len ? i + 1 : -1;
  }
  s->hn = 0;
  int rc = OT_OK;
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
  if (n == 1) {
    out->v[out->n++] = t->byte_id[w[0]];
    return OT_OK;
  }
  if (n > CACHE_MAX_WORD) return bpe_merge(t, w, n, s, out);
  uint64_t h = hash_bytes(w, n) | 1;
  cache_shard *sh = &t->cache[h >> 60];
  pthread_mutex_lock(&sh->mu);
  bool hit = cache_get(sh, h, w, n, out);
  pthread_mutex_unlock(&sh->mu);
  if (hit) return OT_OK;
  size_t start = out->n;
  rc = bpe_merge(t, w, n, s, out);
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

int ot_tokenizer_encode(const ot_tokenizer *tok, const char *text, size_t len, int32_t **ids, size_t *n_ids) {
  if (!tok || !ids || !n_ids || (!text && len))
    return ot_error(OT_ERR_INVALID, "ot_tokenizer_encode: NULL argument");
  const uint8_t *s = (const uint8_t *)text;
  ivec out = {0};
  int rc = ivec_reserve(&out, tok->kind == KIND_BYTE ? len + 1 : len / 4 + 16);
  if (rc != OT_OK) return rc;
  if (tok->kind == KIND_BYTE) {
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
  if (!tok || !text || (!ids && n_ids)) return ot_error(OT_ERR_INVALID, "ot_tokenizer_decode: NULL argument");
  size_t total = 0;
  for (size_t i = 0; i < n_ids; i++) {
    int32_t id = ids[i];
    if (id < 0 || id >= tok->vocab_size || (tok->kind == KIND_BPE && tok->text_len[id] == UINT32_MAX))
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
    uint32_t a = tok->raw_off[ids[i]], b = tok->raw_off[ids[i] + 1];
    memcpy(out + o, tok->raw + a, b - a);
    o += b - a;
  }
  out[o] = '\0';
  *text = out;
  if (len) *len = o;
  return OT_OK;
}
