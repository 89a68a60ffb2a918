#include "ot_corpus.h"

#include "ot_error.h"
#include "ot_fileio.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Brown documents are ~20 KB and cats.txt ~6 KB; the caps only guard against a wrong path. */
#define OT_BROWN_MAX_DOC ((size_t)16 << 20)
#define OT_BROWN_MAX_CATS ((size_t)1 << 20)

/* ---- growable output buffer ---- */

typedef struct {
  char *p;
  size_t len, cap;
  int oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->oom = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_putc(sbuf *b, char c) { sb_put(b, &c, 1); }

/* ---- detokenizer ---- */

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

static int word_is(const char *w, size_t n, const char *s) { return n == strlen(s) && memcmp(w, s, n) == 0; }

/* Tokens glued to the word before them: closing punctuation and contraction suffixes
 * (the corpus mostly keeps contractions whole, "didn't/dod*", but split forms exist
 * in other tagged corpora and cost nothing to handle). */
static int attaches_left(const char *w, size_t n) {
  static const char *const suffixes[] = {"n't", "'s", "'ll", "'re", "'ve", "'d", "'m"};
  if (n == 1 && strchr(",.;:?!)]}%", w[0])) return 1;
  for (size_t i = 0; i < sizeof suffixes / sizeof suffixes[0]; i++)
    if (n == strlen(suffixes[i]) && strncasecmp(w, suffixes[i], n) == 0) return 1;
  return 0;
}

/* The distribution doubles every ; ? ! : tagged as sentence end ("?/. ?/.") and some
 * commas after numbers ("Henry 4/cd ,/, ,/,"); a repeated single punctuation mark is
 * never real text. */
static int collapses_repeat(const char *w, size_t n) { return n == 1 && strchr(";?!:,", w[0]); }

typedef struct {
  sbuf out;
  int par_open;     /* this paragraph has text */
  int glue_next;    /* previous token wants no space after it: ( `` and opening ' */
  int squote;       /* a lone ' is open in this paragraph */
  const char *prev; /* previous word, for collapsing doubled punctuation */
  size_t prev_n;
} detok;

static void par_break(detok *d) {
  if (d->par_open) sb_putc(&d->out, '\n');
  d->par_open = 0;
  d->glue_next = 0;
  d->squote = 0;
  d->prev = NULL;
  d->prev_n = 0;
}

static void emit_word(detok *d, const char *w, size_t n) {
  if (n == 0) return;
  if (d->prev && collapses_repeat(w, n) && d->prev_n == n && memcmp(d->prev, w, n) == 0) return;
  /* Inches are tagged twice, "10''/nn ''/''": the second mark is no closing quote. */
  if (d->prev && word_is(w, n, "''") && d->prev_n > 2 && memcmp(d->prev + d->prev_n - 2, "''", 2) == 0)
    return;
  /* "Jr./np ./." : the abbreviation's period ends the sentence too. */
  if (d->prev && word_is(w, n, ".") && d->prev_n > 1 && d->prev[d->prev_n - 1] == '.') return;
  /* The corpus always puts , . ? ! after a closing quote (received '' ,); American text
   * puts them inside: received," -- unless the quote already ends in . ? or ! */
  if (d->prev && n == 1 && strchr(",.?!", w[0]) && word_is(d->prev, d->prev_n, "''") && d->out.len >= 2 &&
      !d->out.oom) {
    char before = d->out.p[d->out.len - 2];
    if (before != '.' && before != '?' && before != '!') {
      d->out.p[d->out.len - 1] = w[0];
      sb_putc(&d->out, '"');
    }
    d->prev = w;
    d->prev_n = n;
    return;
  }
  int open_quote = 0, close_quote = 0;
  const char *text = w;
  size_t tn = n;
  if (word_is(w, n, "``")) {
    text = "\"", tn = 1, open_quote = 1;
  } else if (word_is(w, n, "''")) {
    text = "\"", tn = 1, close_quote = 1;
  } else if (word_is(w, n, "'")) {
    /* Lone single quotes alternate open/close within a paragraph. */
    if (d->squote)
      close_quote = 1;
    else
      open_quote = 1;
    d->squote = !d->squote;
  }
  int space = d->par_open && !d->glue_next && !close_quote && !attaches_left(w, n);
  if (space) sb_putc(&d->out, ' ');
  sb_put(&d->out, text, tn);
  d->par_open = 1;
  d->glue_next = open_quote || word_is(w, n, "(") || word_is(w, n, "[") || word_is(w, n, "{");
  d->prev = w;
  d->prev_n = n;
}

/* A headline line: every token's tag carries the -hl suffix ("Merger/nn-hl proposed/vbn-hl"). */
static int line_is_headline(const char *s, size_t len, size_t i) {
  int any = 0;
  while (i < len && s[i] != '\n') {
    if (is_ws(s[i])) {
      i++;
      continue;
    }
    size_t st = i;
    while (i < len && !is_ws(s[i])) i++;
    size_t slash = SIZE_MAX;
    for (size_t k = st; k < i; k++)
      if (s[k] == '/') slash = k;
    if (slash == SIZE_MAX) return 0;
    int hl = 0;
    for (size_t k = slash + 1; k + 3 <= i; k++)
      if (memcmp(s + k, "-hl", 3) == 0) hl = 1;
    if (!hl) return 0;
    any = 1;
  }
  return any;
}

/* Paragraph structure of the files: sentences are lines; a paragraph starts after a
 * blank line, usually followed by a tab. Three newlines without a tab occur inside
 * sentences ("on/in a/at \n\n\nfreshman/nn") and are just spaces. Headline lines
 * ("-hl" tags) become paragraphs of their own. */
int ot_brown_strip(const char *tagged, size_t len, char **text, size_t *text_len) {
  if ((!tagged && len) || !text) return ot_error(OT_ERR_INVALID, "ot_brown_strip: NULL argument");
  detok d = {0};
  sb_put(&d.out, "", 0);
  size_t i = 0;
  int prev_headline = -1; /* -1: no line seen yet */
  int cur_headline = 0;
  size_t newlines = 0;
  int tab = 0, at_line_start = 1;
  while (i < len) {
    char c = tagged[i];
    if (is_ws(c)) {
      if (c == '\n') {
        newlines++;
        at_line_start = 1;
      } else if (c == '\t' && newlines > 0) {
        tab = 1;
      }
      i++;
      continue;
    }
    if (at_line_start) {
      /* First token of a new line: decide whether the whitespace run breaks the paragraph. */
      cur_headline = line_is_headline(tagged, len, i);
      int brk = prev_headline >= 0 &&
                (tab || newlines == 2 || newlines >= 4 || (newlines > 0 && cur_headline != prev_headline));
      if (brk) par_break(&d);
      prev_headline = cur_headline;
      at_line_start = 0;
    }
    newlines = 0;
    tab = 0;
    size_t st = i;
    while (i < len && !is_ws(tagged[i])) i++;
    size_t end = i;
    for (size_t k = end; k > st; k--)
      if (tagged[k - 1] == '/') {
        end = k - 1;
        break;
      }
    emit_word(&d, tagged + st, end - st);
  }
  if (d.out.oom) {
    free(d.out.p);
    return ot_error(OT_ERR_NOMEM, "ot_brown_strip: out of memory");
  }
  *text = d.out.p;
  if (text_len) *text_len = d.out.len;
  return OT_OK;
}

/* ---- documents and genres ---- */

typedef struct {
  char *file;
  char *genre;
} brown_doc;

static void free_docs(brown_doc *docs, size_t n) {
  for (size_t i = 0; i < n; i++) {
    free(docs[i].file);
    free(docs[i].genre);
  }
  free(docs);
}

static char *dup_range(const char *s, size_t n) {
  char *p = malloc(n + 1);
  if (p) {
    memcpy(p, s, n);
    p[n] = '\0';
  }
  return p;
}

/* cats.txt: one "<file> <genre>" per line. */
static int read_cats(const char *corpus_dir, brown_doc **out, size_t *n_out) {
  char *path = NULL, *buf = NULL;
  size_t len = 0;
  int rc = ot_path_join(corpus_dir, "cats.txt", &path);
  if (rc != OT_OK) return rc;
  rc = ot_file_read_all(path, OT_BROWN_MAX_CATS, &buf, &len);
  if (rc != OT_OK) {
    free(path);
    return rc;
  }
  brown_doc *docs = NULL;
  size_t n = 0, cap = 0, line = 0;
  const char *p = buf, *end = buf + len;
  while (p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    if (!eol) eol = end;
    line++;
    const char *f0 = p;
    while (f0 < eol && is_ws(*f0)) f0++;
    const char *f1 = f0;
    while (f1 < eol && !is_ws(*f1)) f1++;
    const char *g0 = f1;
    while (g0 < eol && is_ws(*g0)) g0++;
    const char *g1 = g0;
    while (g1 < eol && !is_ws(*g1)) g1++;
    const char *rest = g1;
    while (rest < eol && is_ws(*rest)) rest++;
    p = eol + 1;
    if (f0 == eol) continue; /* blank line */
    if (g0 == g1 || rest != eol) {
      rc = ot_error(OT_ERR_FORMAT, "%s:%zu: expected \"<file> <genre>\"", path, line);
      goto fail;
    }
    /* File names come from the corpus, not the user, but must still stay inside it. */
    if (memchr(f0, '/', (size_t)(f1 - f0)) || (f1 - f0 <= 2 && f0[0] == '.')) {
      rc = ot_error(OT_ERR_FORMAT, "%s:%zu: bad document name", path, line);
      goto fail;
    }
    if (n == cap) {
      size_t ncap = cap ? cap * 2 : 512;
      brown_doc *nd = realloc(docs, ncap * sizeof *nd);
      if (!nd) {
        rc = ot_error(OT_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
      }
      docs = nd;
      cap = ncap;
    }
    docs[n].file = dup_range(f0, (size_t)(f1 - f0));
    docs[n].genre = dup_range(g0, (size_t)(g1 - g0));
    n++;
    if (!docs[n - 1].file || !docs[n - 1].genre) {
      rc = ot_error(OT_ERR_NOMEM, "%s: out of memory", path);
      goto fail;
    }
  }
  if (n == 0) {
    rc = ot_error(OT_ERR_FORMAT, "%s: no documents listed", path);
    goto fail;
  }
  free(buf);
  free(path);
  *out = docs;
  *n_out = n;
  return OT_OK;

fail:
  free_docs(docs, n);
  free(buf);
  free(path);
  return rc;
}

/* Marks the documents whose genre is in the comma-separated list. */
static int select_genres(const char *genres, const brown_doc *docs, size_t n, unsigned char *sel) {
  const char *p = genres;
  int any = 0;
  for (;;) {
    const char *e = strchr(p, ',');
    if (!e) e = p + strlen(p);
    const char *a = p, *b = e;
    while (a < b && is_ws(*a)) a++;
    while (b > a && is_ws(b[-1])) b--;
    if (a == b) return ot_error(OT_ERR_INVALID, "empty genre name in \"%s\"", genres);
    int found = 0;
    for (size_t i = 0; i < n; i++)
      if (word_is(a, (size_t)(b - a), docs[i].genre)) {
        sel[i] = 1;
        found = 1;
      }
    if (!found) return ot_error(OT_ERR_NOTFOUND, "unknown Brown genre \"%.*s\"", (int)(b - a), a);
    any = 1;
    if (!*e) break;
    p = e + 1;
  }
  return any ? OT_OK : ot_error(OT_ERR_INVALID, "no genres given");
}

int ot_brown_text(const char *corpus_dir, const char *genres, int part, char **text, size_t *len) {
  if (!corpus_dir || !genres || !text) return ot_error(OT_ERR_INVALID, "ot_brown_text: NULL argument");
  if (part != OT_BROWN_ALL && part != OT_BROWN_TRAIN && part != OT_BROWN_HELDOUT)
    return ot_error(OT_ERR_INVALID, "ot_brown_text: unknown part %d", part);
  brown_doc *docs = NULL;
  size_t n = 0;
  int rc = read_cats(corpus_dir, &docs, &n);
  if (rc != OT_OK) return rc;
  unsigned char *sel = calloc(n, 1);
  sbuf out = {0};
  char *path = NULL, *raw = NULL, *plain = NULL;
  if (!sel) {
    rc = ot_error(OT_ERR_NOMEM, "ot_brown_text: out of memory");
    goto done;
  }
  rc = select_genres(genres, docs, n, sel);
  if (rc != OT_OK) goto done;
  sb_put(&out, "", 0);
  for (size_t i = 0; i < n; i++) {
    if (!sel[i]) continue;
    /* Last document of its genre = no later document shares the genre. */
    int last = 1;
    for (size_t j = i + 1; j < n && last; j++)
      if (strcmp(docs[j].genre, docs[i].genre) == 0) last = 0;
    if ((part == OT_BROWN_TRAIN && last) || (part == OT_BROWN_HELDOUT && !last)) continue;
    size_t raw_len = 0, plain_len = 0;
    rc = ot_path_join(corpus_dir, docs[i].file, &path);
    if (rc != OT_OK) goto done;
    rc = ot_file_read_all(path, OT_BROWN_MAX_DOC, &raw, &raw_len);
    if (rc != OT_OK) goto done;
    rc = ot_brown_strip(raw, raw_len, &plain, &plain_len);
    if (rc != OT_OK) goto done;
    if (out.len) sb_put(&out, "\n\n", 2);
    sb_put(&out, plain, plain_len);
    free(path), free(raw), free(plain);
    path = raw = plain = NULL;
  }
  if (out.oom) {
    rc = ot_error(OT_ERR_NOMEM, "ot_brown_text: out of memory");
    goto done;
  }
  *text = out.p;
  if (len) *len = out.len;
  out.p = NULL;
  rc = OT_OK;

done:
  free(out.p);
  free(path);
  free(raw);
  free(plain);
  free(sel);
  free_docs(docs, n);
  return rc;
}
