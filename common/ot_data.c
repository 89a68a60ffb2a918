#include "ot_data.h"

#include "ot_error.h"
#include "ot_examples.h"
#include "ot_fileio.h"
#include "ot_rng.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Token and text files are read whole; these caps only stop a wrong path (a device,
 * a disk image) from exhausting memory. */
#define OT_TOKENS_MAX_FILE ((size_t)4 << 30)
#define OT_TEXT_MAX_FILE ((size_t)2 << 30)

static int is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

int ot_tokens_read(const char *path, int vocab_size, ot_tokens *out) {
  if (!path || !out) return ot_error(OT_ERR_INVALID, "ot_tokens_read: NULL argument");
  char *buf = NULL;
  size_t len = 0;
  int rc = ot_file_read_all(path, OT_TOKENS_MAX_FILE, &buf, &len);
  if (rc != OT_OK) return rc;

  int32_t *ids = NULL;
  size_t n = 0, cap = 0;
  size_t line = 1;
  size_t i = 0;
  rc = OT_OK;
  while (i < len) {
    char c = buf[i];
    if (c == '\n') {
      line++;
      i++;
      continue;
    }
    if (is_space(c)) {
      i++;
      continue;
    }
    if (c < '0' || c > '9') {
      if (c == '-')
        rc = ot_error(OT_ERR_FORMAT, "%s:%zu: negative token id", path, line);
      else if (c >= 0x21 && c < 0x7f)
        rc =
            ot_error(OT_ERR_FORMAT, "%s:%zu: unexpected character '%c' (expected a token id)", path, line, c);
      else
        rc = ot_error(OT_ERR_FORMAT, "%s:%zu: unexpected byte 0x%02x (expected a token id)", path, line,
                      (unsigned)(unsigned char)c);
      goto fail;
    }
    int64_t v = 0;
    while (i < len && buf[i] >= '0' && buf[i] <= '9') {
      v = v * 10 + (buf[i] - '0');
      if (v > INT32_MAX) {
        rc = ot_error(OT_ERR_RANGE, "%s:%zu: token id does not fit in 32 bits", path, line);
        goto fail;
      }
      i++;
    }
    if (i < len && !is_space(buf[i])) {
      char d = buf[i];
      if (d >= 0x21 && d < 0x7f)
        rc = ot_error(OT_ERR_FORMAT, "%s:%zu: unexpected character '%c' after token id", path, line, d);
      else
        rc = ot_error(OT_ERR_FORMAT, "%s:%zu: unexpected byte 0x%02x after token id", path, line,
                      (unsigned)(unsigned char)d);
      goto fail;
    }
    if (vocab_size > 0 && v >= vocab_size) {
      rc = ot_error(OT_ERR_RANGE, "%s:%zu: token id %lld is outside the vocabulary (size %d)", path, line,
                    (long long)v, vocab_size);
      goto fail;
    }
    if (n == cap) {
      size_t ncap = cap ? cap * 2 : 4096;
      int32_t *p = realloc(ids, ncap * sizeof *ids);
      if (!p) {
        rc = ot_error(OT_ERR_NOMEM, "%s: out of memory after %zu token ids", path, n);
        goto fail;
      }
      ids = p;
      cap = ncap;
    }
    ids[n++] = (int32_t)v;
  }
  if (n == 0) {
    rc = ot_error(OT_ERR_FORMAT, "%s: no token ids (empty file)", path);
    goto fail;
  }
  free(buf);
  /* Give back the slack of the doubling; failure to shrink is harmless. */
  int32_t *shrunk = realloc(ids, n * sizeof *ids);
  out->ids = shrunk ? shrunk : ids;
  out->n = n;
  return OT_OK;

fail:
  free(ids);
  free(buf);
  return rc;
}

int ot_tokens_write(const char *path, const ot_tokens *t) {
  if (!path || !t || (!t->ids && t->n)) return ot_error(OT_ERR_INVALID, "ot_tokens_write: NULL argument");
  /* An empty file would not read back (ot_tokens_read rejects it). */
  if (t->n == 0) return ot_error(OT_ERR_INVALID, "%s: refusing to write an empty token file", path);
  for (size_t i = 0; i < t->n; i++)
    if (t->ids[i] < 0) return ot_error(OT_ERR_RANGE, "%s: token %zu has negative id %d", path, i, t->ids[i]);

  ot_atomic_file *f = NULL;
  int rc = ot_atomic_open(path, &f);
  if (rc != OT_OK) return rc;
  /* Streamed in chunks: a token stream can be far larger than its text form is worth buffering. */
  enum { CHUNK = 1 << 16, PER_LINE = 16 };
  char buf[CHUNK];
  size_t used = 0;
  for (size_t i = 0; i < t->n; i++) {
    if (used > CHUNK - 16) {
      rc = ot_atomic_write(f, buf, used);
      if (rc != OT_OK) goto fail;
      used = 0;
    }
    char sep = (i + 1 == t->n || (i + 1) % PER_LINE == 0) ? '\n' : ' ';
    used += (size_t)snprintf(buf + used, CHUNK - used, "%d%c", (int)t->ids[i], sep);
  }
  rc = ot_atomic_write(f, buf, used);
  if (rc != OT_OK) goto fail;
  return ot_atomic_commit(f);

fail:
  ot_atomic_abort(f);
  return rc;
}

int ot_tokens_from_text(const ot_tokenizer *tok, const char *path, ot_tokens *out) {
  if (!tok || !path || !out) return ot_error(OT_ERR_INVALID, "ot_tokens_from_text: NULL argument");
  char *text = NULL;
  size_t len = 0;
  int rc = ot_file_read_all(path, OT_TEXT_MAX_FILE, &text, &len);
  if (rc != OT_OK) return rc;
  if (len == 0) {
    free(text);
    return ot_error(OT_ERR_FORMAT, "%s: empty text file", path);
  }
  int32_t *ids = NULL;
  size_t n = 0;
  rc = ot_tokenizer_encode(tok, text, len, &ids, &n);
  free(text);
  if (rc != OT_OK) return rc;
  if (n == 0) {
    free(ids);
    return ot_error(OT_ERR_FORMAT, "%s: text encodes to no tokens", path);
  }
  out->ids = ids;
  out->n = n;
  return OT_OK;
}

int ot_tokens_load_input(const char *text_path, const char *tokens_path, const ot_tokenizer *tok,
                         int vocab_size, ot_tokens *out) {
  if (!!text_path == !!tokens_path)
    return ot_error(OT_ERR_INVALID, "give exactly one of --text FILE or --tokens FILE");
  if (tokens_path) return ot_tokens_read(tokens_path, vocab_size, out);
  if (ot_examples_is_jsonl(text_path)) return ot_examples_read(text_path, tok, NULL, out);
  return ot_tokens_from_text(tok, text_path, out);
}

void ot_tokens_free(ot_tokens *t) {
  if (!t) return;
  free(t->ids);
  free(t->mask);
  t->ids = NULL;
  t->mask = NULL;
  t->n = 0;
}

int ot_tokens_split(const ot_tokens *t, size_t tail_tokens, ot_tokens *head, ot_tokens *tail) {
  if (!t || !head || !tail || tail_tokens >= t->n)
    return ot_error(OT_ERR_INVALID, "ot_tokens_split: bad arguments");
  size_t cut = t->n - tail_tokens;
  if (t->mask)
    while (cut < t->n && !(t->mask[cut] & OT_TOK_START)) cut++;
  if (cut == 0 || cut >= t->n)
    return ot_error(OT_ERR_INVALID, "%zu tokens%s cannot be split into two non-empty parts", t->n,
                    t->mask ? " of examples" : "");
  ot_tokens h = {t->ids, cut, t->mask}, l = {t->ids + cut, t->n - cut, t->mask ? t->mask + cut : NULL};
  *head = h;
  *tail = l;
  return OT_OK;
}

int ot_pack_rows(const ot_tokens *t, int T, int32_t **in_out, int32_t **tg_out, size_t *n_rows_out,
                 size_t *n_truncated_out) {
  if (!t || !t->mask || T <= 0 || !in_out || !tg_out || !n_rows_out)
    return ot_error(OT_ERR_INVALID, "ot_pack_rows: needs examples and T > 0");
  size_t W = (size_t)T + 1;
  /* pass 1 counts rows, pass 2 fills them */
  size_t n_rows = 0, truncated = 0;
  int32_t *in = NULL, *tg = NULL;
  for (int pass = 0; pass < 2; pass++) {
    size_t row = 0, fill = 0;
    for (size_t s = 0; s < t->n;) {
      size_t e = s + 1;
      while (e < t->n && !(t->mask[e] & OT_TOK_START)) e++;
      size_t len = e - s, from = s;
      if (len > W) {
        from = e - W; /* keep the end: the completion */
        len = W;
        if (pass == 0) truncated++;
      }
      if (fill && fill + len > W) {
        row++;
        fill = 0;
      }
      if (pass == 1) {
        int32_t *ri = in + row * (size_t)T, *rt = tg + row * (size_t)T;
        for (size_t k = 0; k < len; k++) {
          size_t p = fill + k; /* position in the row's T+1 tokens */
          if (p < (size_t)T) ri[p] = t->ids[from + k];
          /* token p is the target of input p-1; an example's first token never is */
          if (p > 0 && k > 0 && (t->mask[from + k] & OT_TOK_TARGET)) rt[p - 1] = t->ids[from + k];
        }
      }
      fill += len;
      s = e;
    }
    if (pass == 0) {
      n_rows = row + 1;
      if (t->n == 0) return ot_error(OT_ERR_INVALID, "no examples to pack");
      in = malloc(n_rows * (size_t)T * sizeof *in);
      tg = malloc(n_rows * (size_t)T * sizeof *tg);
      if (!in || !tg) {
        free(in);
        free(tg);
        return ot_error(OT_ERR_NOMEM, "cannot allocate %zu rows of %d tokens", n_rows, T);
      }
      for (size_t i = 0; i < n_rows * (size_t)T; i++) {
        in[i] = 0;
        tg[i] = -1;
      }
    }
  }
  size_t any = 0;
  for (size_t i = 0; i < n_rows * (size_t)T && !any; i++) any = tg[i] >= 0;
  if (!any) {
    free(in);
    free(tg);
    return ot_error(OT_ERR_INVALID, "the examples have no target tokens (empty completions?)");
  }
  *in_out = in;
  *tg_out = tg;
  *n_rows_out = n_rows;
  if (n_truncated_out) *n_truncated_out = truncated;
  return OT_OK;
}

/* Uniform in [0, bound) without modulo bias (rejection of the short last bucket). */
static uint64_t rng_below(uint64_t *state, uint64_t bound) {
  uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
  uint64_t r = ot_splitmix64(state);
  while (r >= limit) r = ot_splitmix64(state);
  return r % bound;
}

int ot_batcher_init(ot_batcher *b, const ot_tokens *t, int B, int T, int shuffle, uint64_t seed) {
  if (!b || !t || (!t->ids && t->n)) return ot_error(OT_ERR_INVALID, "ot_batcher_init: NULL argument");
  if (B <= 0 || T <= 0)
    return ot_error(OT_ERR_INVALID, "batch size %d and sequence length %d must be positive", B, T);
  if (t->mask) {
    ot_batcher nb = {.ids = t->ids, .n = t->n, .B = B, .T = T, .shuffle = shuffle != 0, .rng = seed};
    int rc = ot_pack_rows(t, T, &nb.rows_in, &nb.rows_tg, &nb.n_rows, &nb.n_truncated);
    if (rc) return rc;
    *b = nb;
    return OT_OK;
  }
  size_t bt = (size_t)B * (size_t)T;
  if (t->n < bt + 1)
    return ot_error(OT_ERR_RANGE,
                    "token stream too short: %zu tokens, a batch of %d x %d needs at least %zu (B*T+1)", t->n,
                    B, T, bt + 1);
  ot_batcher nb = {.ids = t->ids, .n = t->n, .B = B, .T = T, .pos = 0, .shuffle = shuffle != 0, .rng = seed};
  *b = nb;
  return OT_OK;
}

void ot_batcher_next(ot_batcher *b, int32_t *inputs, int32_t *targets) {
  size_t T = (size_t)b->T, bt = (size_t)b->B * T;
  if (b->rows_in) {
    for (int r = 0; r < b->B; r++) {
      size_t row;
      if (b->shuffle) {
        row = (size_t)rng_below(&b->rng, b->n_rows);
      } else {
        if (b->pos >= b->n_rows) b->pos = 0;
        row = b->pos++;
      }
      memcpy(inputs + (size_t)r * T, b->rows_in + row * T, T * sizeof *inputs);
      memcpy(targets + (size_t)r * T, b->rows_tg + row * T, T * sizeof *targets);
    }
    return;
  }
  if (b->shuffle) {
    /* Start s must leave room for T inputs and the target after them: s + T <= n - 1. */
    uint64_t span = (uint64_t)(b->n - T);
    for (int r = 0; r < b->B; r++) {
      size_t s = (size_t)rng_below(&b->rng, span);
      memcpy(inputs + (size_t)r * T, b->ids + s, T * sizeof *inputs);
      memcpy(targets + (size_t)r * T, b->ids + s + 1, T * sizeof *targets);
    }
    return;
  }
  if (b->pos > b->n || b->n - b->pos < bt + 1) b->pos = 0;
  memcpy(inputs, b->ids + b->pos, bt * sizeof *inputs);
  memcpy(targets, b->ids + b->pos + 1, bt * sizeof *targets);
  b->pos += bt;
}

void ot_batcher_skip(ot_batcher *b, uint64_t steps) {
  if (!steps) return;
  if (b->rows_in) {
    b->pos = (size_t)((b->pos + steps * (uint64_t)b->B) % b->n_rows);
    return;
  }
  /* plain text wraps when fewer than B*T+1 tokens remain; start anywhere before that */
  size_t bt = (size_t)b->B * (size_t)b->T;
  b->pos = (size_t)(steps * (uint64_t)bt % (b->n - bt));
}

void ot_batcher_free(ot_batcher *b) {
  if (!b) return;
  free(b->rows_in);
  free(b->rows_tg);
  b->rows_in = b->rows_tg = NULL;
  b->n_rows = 0;
}

size_t ot_eval_window_count(size_t n_tokens, int T) {
  if (T <= 0 || n_tokens < 2) return 0;
  return (n_tokens - 1 + (size_t)T - 1) / (size_t)T;
}

int ot_eval_window_len(size_t n_tokens, int T, size_t k) {
  if (k >= ot_eval_window_count(n_tokens, T)) return 0;
  size_t start = k * (size_t)T, left = n_tokens - 1 - start;
  return left < (size_t)T ? (int)left : T;
}
