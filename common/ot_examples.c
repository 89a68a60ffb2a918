/* Supervised examples (ot_examples.h): JSONL -> one masked token stream. */
#include "ot_examples.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"
#include "ot_fileio.h"

/* The same cap as a plain text file: only stops a wrong path from exhausting memory. */
#define OT_EXAMPLES_MAX_FILE ((size_t)2 << 30)

int ot_examples_is_jsonl(const char *path) {
  size_t n = path ? strlen(path) : 0;
  return n >= 6 && strcmp(path + n - 6, ".jsonl") == 0;
}

void ot_text_pieces_free(ot_text_piece *p, size_t n) {
  if (!p) return;
  for (size_t i = 0; i < n; i++) free(p[i].text);
  free(p);
}

static int piece_add(ot_text_piece **p, size_t *n, const char *a, const char *b, int target) {
  size_t la = strlen(a), lb = b ? strlen(b) : 0;
  char *t = malloc(la + lb + 1);
  ot_text_piece *np = realloc(*p, (*n + 1) * sizeof **p);
  if (!t || !np) {
    free(t);
    if (np) *p = np;
    return ot_error(OT_ERR_NOMEM, "cannot allocate a rendered message");
  }
  *p = np;
  memcpy(t, a, la);
  if (lb) memcpy(t + la, b, lb);
  t[la + lb] = '\0';
  np[*n].text = t;
  np[*n].target = target;
  (*n)++;
  return OT_OK;
}

int ot_chat_render_plain(void *ctx, const ot_chat_msg *msgs, size_t n, ot_text_piece **pieces,
                         size_t *n_pieces) {
  (void)ctx;
  ot_text_piece *p = NULL;
  size_t np = 0;
  int rc = OT_OK;
  for (size_t i = 0; i < n && rc == OT_OK; i++) {
    const char *r = msgs[i].role;
    const char *head = strcmp(r, "system") == 0 ? "System:" : strcmp(r, "user") == 0 ? "User:" : "Assistant:";
    int target = strcmp(r, "assistant") == 0;
    rc = piece_add(&p, &np, head, NULL, 0);
    if (rc == OT_OK) rc = piece_add(&p, &np, " ", msgs[i].content, target);
    if (rc == OT_OK) rc = piece_add(&p, &np, "\n", NULL, target);
  }
  if (rc) {
    ot_text_pieces_free(p, np);
    return rc;
  }
  *pieces = p;
  *n_pieces = np;
  return OT_OK;
}

/* The growing token stream. */
typedef struct {
  int32_t *ids;
  uint8_t *mask;
  size_t n, cap;
} stream;

static int stream_push(stream *s, const int32_t *ids, size_t n, uint8_t flag) {
  if (s->n + n > s->cap) {
    size_t cap = s->cap ? s->cap : 4096;
    while (cap < s->n + n) cap *= 2;
    int32_t *ni = realloc(s->ids, cap * sizeof *ni);
    if (ni) s->ids = ni;
    uint8_t *nm = ni ? realloc(s->mask, cap) : NULL;
    if (!nm) return ot_error(OT_ERR_NOMEM, "out of memory after %zu tokens of examples", s->n);
    s->mask = nm;
    s->cap = cap;
  }
  memcpy(s->ids + s->n, ids, n * sizeof *ids);
  memset(s->mask + s->n, flag, n);
  s->n += n;
  return OT_OK;
}

/* Encodes the pieces of one example onto the stream: adjacent pieces with the same flag are
 * encoded as one text (so "User:" " hi" "\n" tokenizes as the whole line would), context and
 * target runs separately, a later run as the continuation of the text. */
static int push_example(stream *s, const ot_tokenizer *tok, const ot_text_piece *p, size_t np, int32_t eot,
                        const char *path, size_t line) {
  size_t start = s->n;
  int rc = OT_OK, last_target = 0;
  for (size_t i = 0; i < np && rc == OT_OK;) {
    size_t j = i, len = 0;
    while (j < np && p[j].target == p[i].target) len += strlen(p[j++].text);
    char *run = malloc(len + 1);
    if (!run) return ot_error(OT_ERR_NOMEM, "cannot allocate");
    size_t off = 0;
    for (size_t k = i; k < j; k++) {
      size_t l = strlen(p[k].text);
      memcpy(run + off, p[k].text, l);
      off += l;
    }
    run[off] = '\0';
    int32_t *ids = NULL;
    size_t n = 0;
    /* a later run continues the text: no second start-of-text "▁" (Llama 2) before it */
    if (len) rc = ot_tokenizer_encode_ex(tok, run, len, i > 0 ? OT_TOK_CONTINUATION : 0, &ids, &n);
    free(run);
    if (rc == OT_OK && n) {
      rc = stream_push(s, ids, n, p[i].target ? OT_TOK_TARGET : 0);
      last_target = p[i].target;
    }
    free(ids);
    i = j;
  }
  if (rc == OT_OK && last_target && eot >= 0) rc = stream_push(s, &eot, 1, OT_TOK_TARGET);
  if (rc) return rc;
  if (s->n == start) return ot_error(OT_ERR_FORMAT, "%s:%zu: the example encodes to no tokens", path, line);
  s->mask[start] |= OT_TOK_START;
  return OT_OK;
}

static const char *str_field(const cJSON *o, const char *k) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* One parsed line -> its rendered pieces. */
static int render_line(const cJSON *j, const ot_chat_renderer *chat, const char *path, size_t line,
                       ot_text_piece **p, size_t *np) {
  if (!cJSON_IsObject(j))
    return ot_error(OT_ERR_FORMAT, "%s:%zu: a line must be one JSON object", path, line);
  const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(j, "messages");
  const cJSON *pr = cJSON_GetObjectItemCaseSensitive(j, "prompt"),
              *co = cJSON_GetObjectItemCaseSensitive(j, "completion"),
              *tx = cJSON_GetObjectItemCaseSensitive(j, "text");
  int kinds = !!msgs + !!(pr || co) + !!tx;
  if (kinds != 1)
    return ot_error(OT_ERR_FORMAT,
                    "%s:%zu: an example has exactly one of \"prompt\"+\"completion\", \"messages\" or "
                    "\"text\"",
                    path, line);
  int rc = OT_OK;
  if (tx) {
    if (!cJSON_IsString(tx)) return ot_error(OT_ERR_FORMAT, "%s:%zu: \"text\" must be a string", path, line);
    return piece_add(p, np, tx->valuestring, NULL, 1);
  }
  if (!msgs) {
    if (!cJSON_IsString(pr) || !cJSON_IsString(co))
      return ot_error(OT_ERR_FORMAT, "%s:%zu: \"prompt\" and \"completion\" must both be strings", path,
                      line);
    rc = piece_add(p, np, pr->valuestring, NULL, 0);
    if (rc == OT_OK) rc = piece_add(p, np, co->valuestring, NULL, 1);
    return rc;
  }
  int n = cJSON_GetArraySize(msgs);
  if (!cJSON_IsArray(msgs) || n < 1)
    return ot_error(OT_ERR_FORMAT, "%s:%zu: \"messages\" must be a non-empty array", path, line);
  ot_chat_msg *m = calloc((size_t)n, sizeof *m);
  if (!m) return ot_error(OT_ERR_NOMEM, "cannot allocate");
  int assistant = 0, i = 0;
  const cJSON *v;
  cJSON_ArrayForEach(v, msgs) {
    m[i].role = str_field(v, "role");
    m[i].content = str_field(v, "content");
    if (!m[i].role || !m[i].content) {
      rc = ot_error(OT_ERR_FORMAT, "%s:%zu: messages[%d] needs string \"role\" and \"content\"", path, line,
                    i);
      break;
    }
    if (strcmp(m[i].role, "system") != 0 && strcmp(m[i].role, "user") != 0 &&
        strcmp(m[i].role, "assistant") != 0) {
      rc = ot_error(OT_ERR_FORMAT, "%s:%zu: messages[%d].role \"%.32s\" is not system, user or assistant",
                    path, line, i, m[i].role);
      break;
    }
    assistant |= strcmp(m[i].role, "assistant") == 0;
    i++;
  }
  if (rc == OT_OK && !assistant)
    rc = ot_error(OT_ERR_FORMAT, "%s:%zu: no assistant message: nothing to learn from", path, line);
  if (rc == OT_OK) {
    ot_chat_render_fn fn = chat && chat->render ? chat->render : ot_chat_render_plain;
    ot_text_piece *rp = NULL;
    size_t rn = 0;
    rc = fn(chat ? chat->ctx : NULL, m, (size_t)n, &rp, &rn);
    if (rc == OT_OK) {
      ot_text_pieces_free(*p, *np);
      *p = rp;
      *np = rn;
    }
  }
  free(m);
  return rc;
}

int ot_jsonl_next(const char *buf, size_t len, size_t *pos, size_t *line, const char *path, cJSON **out) {
  *out = NULL;
  for (size_t i = *pos; i < len;) {
    size_t e = i;
    while (e < len && buf[e] != '\n') e++;
    ++*line;
    size_t a = i, b = e;
    i = e + 1;
    *pos = i < len ? i : len;
    while (a < b && (buf[a] == ' ' || buf[a] == '\t' || buf[a] == '\r')) a++;
    while (b > a && (buf[b - 1] == ' ' || buf[b - 1] == '\t' || buf[b - 1] == '\r')) b--;
    if (a == b) continue;
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(buf + a, b - a, &end, 0);
    if (!j) {
      size_t col = end && end >= buf + a ? (size_t)(end - (buf + a)) + 1 : 1;
      return ot_error(OT_ERR_FORMAT, "%s:%zu: not valid JSON (at column %zu)", path, *line, col);
    }
    if (end && end < buf + b) {
      cJSON_Delete(j);
      return ot_error(OT_ERR_FORMAT, "%s:%zu: text after the JSON object (one object per line)", path, *line);
    }
    *out = j;
    return OT_OK;
  }
  *pos = len;
  return OT_OK;
}

int ot_examples_read(const char *path, const ot_tokenizer *tok, const ot_chat_renderer *chat,
                     ot_tokens *out) {
  if (!path || !out) return ot_error(OT_ERR_INVALID, "ot_examples_read: NULL argument");
  if (!tok) return ot_error(OT_ERR_INVALID, "%s: examples are text and need a tokenizer", path);
  char *buf = NULL;
  size_t len = 0;
  int rc = ot_file_read_all(path, OT_EXAMPLES_MAX_FILE, &buf, &len);
  if (rc) return rc;
  int32_t eot = -1;
  if (ot_tokenizer_token_id(tok, "<|endoftext|>", &eot) != OT_OK) eot = -1;
  ot_error_clear();
  stream s = {NULL, NULL, 0, 0};
  size_t line = 0, examples = 0;
  for (size_t i = 0; rc == OT_OK;) {
    cJSON *j = NULL;
    rc = ot_jsonl_next(buf, len, &i, &line, path, &j);
    if (rc || !j) break;
    ot_text_piece *p = NULL;
    size_t np = 0;
    rc = render_line(j, chat, path, line, &p, &np);
    cJSON_Delete(j);
    if (rc == OT_OK) rc = push_example(&s, tok, p, np, eot, path, line);
    ot_text_pieces_free(p, np);
    examples++;
  }
  free(buf);
  if (rc == OT_OK && examples == 0) rc = ot_error(OT_ERR_FORMAT, "%s: no examples (empty file)", path);
  if (rc) {
    free(s.ids);
    free(s.mask);
    return rc;
  }
  out->ids = s.ids;
  out->mask = s.mask;
  out->n = s.n;
  return OT_OK;
}
