#include "ot_chat_template.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ot_error.h"

#define OUT_CAP (16u << 20)
#define ARENA_CAP (256u << 20)
#define MAX_DEPTH 200    /* nesting of expressions and blocks */
#define MAX_OPS 20000000 /* evaluations and loop iterations of one render */

/* ---- arena: every node and value lives until its template (or render) is freed ------------ */

typedef struct chunk {
  struct chunk *next;
  size_t used, cap;
  _Alignas(16) unsigned char data[];
} chunk;

typedef struct {
  chunk *head;
  size_t total;
  int failed;
} arena;

static void *ar_alloc(arena *a, size_t n) {
  n = (n + 15) & ~(size_t)15;
  if (!a->head || a->head->used + n > a->head->cap) {
    size_t cap = n > 65536 ? n : 65536;
    if (a->total + cap > ARENA_CAP) {
      a->failed = 1;
      return NULL;
    }
    chunk *c = malloc(sizeof *c + cap);
    if (!c) {
      a->failed = 1;
      return NULL;
    }
    c->next = a->head;
    c->used = 0;
    c->cap = cap;
    a->head = c;
    a->total += cap;
  }
  void *p = a->head->data + a->head->used;
  a->head->used += n;
  memset(p, 0, n);
  return p;
}

static void ar_free(arena *a) {
  for (chunk *c = a->head, *n; c; c = n) {
    n = c->next;
    free(c);
  }
  a->head = NULL;
}

static char *ar_strndup(arena *a, const char *s, size_t n) {
  char *p = ar_alloc(a, n + 1);
  if (p) {
    memcpy(p, s, n);
    p[n] = '\0';
  }
  return p;
}

/* ---- values -------------------------------------------------------------------------------- */

enum { V_UNDEF, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_LIST, V_DICT, V_FUNC };

typedef struct val val;
struct val {
  int t;
  int ns; /* a namespace(): attributes may be set */
  long long i;
  double f;
  const char *s;
  size_t n; /* bytes of s; items of a list or dict */
  size_t cap;
  val **a;          /* list items, dict values */
  const char **k;   /* dict keys */
  size_t *kn;       /* dict key lengths */
  const char *name; /* V_UNDEF: the name; V_FUNC: the builtin */
  val *self;        /* V_FUNC: a bound method's object */
};

static val NONE = {.t = V_NONE}, TRUE_ = {.t = V_BOOL, .i = 1}, FALSE_ = {.t = V_BOOL};

/* ---- template tokens --------------------------------------------------------------------------- */

enum {
  T_DATA,
  T_VAR_BEGIN,
  T_VAR_END,
  T_BLOCK_BEGIN,
  T_BLOCK_END,
  T_NAME,
  T_STRING,
  T_INT,
  T_FLOAT,
  T_OP,
  T_EOF
};

typedef struct {
  int k;
  const char *s; /* T_DATA/T_NAME/T_STRING (decoded)/T_OP: text */
  size_t n;
  long long i;
  double f;
  int line;
} tok;

/* ---- AST ----------------------------------------------------------------------------------------- */

enum {
  E_LIT,
  E_VAR,
  E_ATTR,
  E_INDEX,
  E_SLICE,
  E_CALL,
  E_FILTER,
  E_TEST,
  E_BIN,
  E_CMP,
  E_NOT,
  E_NEG,
  E_POS,
  E_AND,
  E_OR,
  E_COND,
  E_LIST,
  E_DICT
};

typedef struct expr expr;
struct expr {
  int k, line;
  char op[4];
  val *lit;
  const char *name; /* E_VAR, E_ATTR, E_FILTER, E_TEST, kwargs */
  expr *a, *b, *c;
  expr **args; /* call/filter/test arguments; list items; dict keys then values; E_CMP operands */
  const char **kw;
  int nargs;
  int negate;
  char (*ops)[4]; /* E_CMP: nargs - 1 operators ("==", "in", "ni" = not in) */
};

enum { N_TEXT, N_OUT, N_IF, N_FOR, N_SET, N_BREAK, N_CONTINUE };

typedef struct node node;
struct node {
  int k, line;
  const char *text;
  size_t len;
  expr *e;       /* OUT, SET value, FOR iterable */
  expr **conds;  /* IF: n_br conditions */
  node **bodies; /* IF: n_br bodies; FOR: [body, else] */
  int n_br;
  node *else_body;              /* IF */
  const char *target[2], *attr; /* SET: name [. attr]; FOR: 1 or 2 names */
  int n_target;
  expr *filter; /* FOR ... if */
  node *next;
};

struct ot_chat_template {
  arena ar;
  node *root;
};

/* ---- lexer --------------------------------------------------------------------------------------- */

typedef struct {
  arena *ar;
  const char *src;
  size_t len, pos;
  int line;
  tok *t;
  int n, cap;
  char err[256];
} lexer;

static int lex_fail(lexer *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int lex_fail(lexer *L, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char m[200];
  vsnprintf(m, sizeof m, fmt, ap);
  va_end(ap);
  snprintf(L->err, sizeof L->err, "line %d: %s", L->line, m);
  return -1;
}

static int push(lexer *L, int k, const char *s, size_t n) {
  if (L->n == L->cap) {
    int cap = L->cap ? L->cap * 2 : 256;
    tok *t = realloc(L->t, (size_t)cap * sizeof *t);
    if (!t) return lex_fail(L, "out of memory");
    L->t = t;
    L->cap = cap;
  }
  L->t[L->n++] = (tok){.k = k, .s = s, .n = n, .line = L->line};
  return 0;
}

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

static void count_lines(lexer *L, size_t from, size_t to) {
  for (size_t i = from; i < to; i++) L->line += L->src[i] == '\n';
}

static int put_utf8(char *o, unsigned long cp) {
  if (cp < 0x80) {
    o[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    o[0] = (char)(0xE0 | (cp >> 12));
    o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  o[0] = (char)(0xF0 | (cp >> 18));
  o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
  o[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

/* A string literal at L->pos (quote included): Python's escapes, as Jinja decodes them. */
static int lex_string(lexer *L) {
  char q = L->src[L->pos];
  size_t i = L->pos + 1;
  char *o = ar_alloc(L->ar, L->len - L->pos + 1); /* never longer than the source */
  if (!o) return lex_fail(L, "out of memory");
  size_t k = 0;
  int line0 = L->line;
  for (;; i++) {
    if (i >= L->len) {
      L->line = line0;
      return lex_fail(L, "unterminated string");
    }
    char c = L->src[i];
    if (c == q) break;
    if (c == '\n') L->line++;
    if (c != '\\') {
      o[k++] = c;
      continue;
    }
    if (++i >= L->len) return lex_fail(L, "unterminated string");
    char e = L->src[i];
    int hex = e == 'x' ? 2 : e == 'u' ? 4 : e == 'U' ? 8 : 0;
    if (hex) {
      unsigned long cp = 0;
      for (int h = 0; h < hex; h++) {
        char d = i + 1 + (size_t)h < L->len ? L->src[i + 1 + h] : 0;
        if (!isxdigit((unsigned char)d)) return lex_fail(L, "bad \\%c escape in a string", e);
        cp = cp * 16 +
             (unsigned long)(isdigit((unsigned char)d) ? d - '0' : (tolower((unsigned char)d) - 'a' + 10));
      }
      if (cp > 0x10FFFF || cp == 0) return lex_fail(L, "bad \\%c escape in a string", e);
      i += (size_t)hex;
      k += (size_t)put_utf8(o + k, cp);
      continue;
    }
    switch (e) {
    case 'n': o[k++] = '\n'; break;
    case 't': o[k++] = '\t'; break;
    case 'r': o[k++] = '\r'; break;
    case '\\': o[k++] = '\\'; break;
    case '\'': o[k++] = '\''; break;
    case '"': o[k++] = '"'; break;
    case 'a': o[k++] = '\a'; break;
    case 'b': o[k++] = '\b'; break;
    case 'f': o[k++] = '\f'; break;
    case 'v': o[k++] = '\v'; break;
    case '\n': L->line++; break; /* a line continuation */
    default:                     /* unknown escapes keep their backslash, as Python does */
      o[k++] = '\\';
      o[k++] = e;
      if (e == '\n') L->line++;
    }
  }
  o[k] = '\0';
  L->pos = i + 1;
  if (push(L, T_STRING, o, k)) return -1;
  return 0;
}

static const char *const OPS[] = {"==", "!=", "<=", ">=", "//", "**", "<", ">", "+", "-", "*", "/", "%",
                                  "~",  "(",  ")",  "[",  "]",  "{",  "}", ",", ".", ":", "|", "="};

/* The inside of a tag up to its end ("}}" or "%}", with an optional '-'); returns the end's
 * whitespace sign ('-', '+' or 0). */
static int lex_tag(lexer *L, const char *end, int *sign) {
  int depth = 0;
  for (;;) {
    while (L->pos < L->len && is_ws(L->src[L->pos])) {
      L->line += L->src[L->pos] == '\n';
      L->pos++;
    }
    if (L->pos >= L->len) return lex_fail(L, "'%s' expected before the end of the template", end);
    const char *p = L->src + L->pos;
    size_t left = L->len - L->pos;
    if (depth == 0) {
      for (int s = 0; s < 3; s++) {
        const char *pre = s == 0 ? "-" : s == 1 ? "+" : "";
        size_t pl = strlen(pre);
        if (left >= pl + 2 && memcmp(p, pre, pl) == 0 && memcmp(p + pl, end, 2) == 0) {
          L->pos += pl + 2;
          *sign = *pre;
          return 0;
        }
      }
    }
    char c = *p;
    if (c == '\'' || c == '"') {
      if (lex_string(L)) return -1;
      continue;
    }
    if (isdigit((unsigned char)c)) {
      char *e1;
      errno = 0;
      long long iv = strtoll(p, &e1, 10);
      int isf = *e1 == '.' && isdigit((unsigned char)e1[1]);
      if (isf || *e1 == 'e' || *e1 == 'E') {
        double fv = strtod(p, &e1);
        if (push(L, T_FLOAT, NULL, 0)) return -1;
        L->t[L->n - 1].f = fv;
      } else {
        if (errno) return lex_fail(L, "integer out of range");
        if (push(L, T_INT, NULL, 0)) return -1;
        L->t[L->n - 1].i = iv;
      }
      L->pos += (size_t)(e1 - p);
      continue;
    }
    if (isalpha((unsigned char)c) || c == '_') {
      size_t n = 1;
      while (n < left && (isalnum((unsigned char)p[n]) || p[n] == '_')) n++;
      if (push(L, T_NAME, p, n)) return -1;
      L->pos += n;
      continue;
    }
    int found = 0;
    for (size_t o = 0; o < sizeof OPS / sizeof *OPS && !found; o++) {
      size_t ol = strlen(OPS[o]);
      if (left >= ol && memcmp(p, OPS[o], ol) == 0) {
        if (push(L, T_OP, OPS[o], ol)) return -1;
        L->pos += ol;
        found = 1;
        if (ol == 1 && strchr("([{", c)) depth++;
        if (ol == 1 && strchr(")]}", c)) {
          if (depth == 0) return lex_fail(L, "unexpected '%c'", c);
          depth--;
        }
      }
    }
    if (!found) return lex_fail(L, "unexpected character '%c'", c);
  }
}

/* Jinja's lexer with trim_blocks and lstrip_blocks (HF's settings). */
static int lex(lexer *L) {
  int line_starting = 1, strip_next = 0;
  for (;;) {
    /* the next tag */
    size_t i = L->pos;
    const char *tag = NULL;
    for (; i + 1 < L->len; i++)
      if (L->src[i] == '{' && (L->src[i + 1] == '{' || L->src[i + 1] == '%' || L->src[i + 1] == '#')) {
        tag = L->src + i;
        break;
      }
    size_t dstart = L->pos, dend = tag ? i : L->len;
    if (strip_next)
      while (dstart < dend && is_ws(L->src[dstart])) dstart++;
    char sign = tag && i + 2 < L->len ? L->src[i + 2] : 0;
    if (sign != '-' && sign != '+') sign = 0;
    if (tag && sign == '-') {
      while (dend > dstart && is_ws(L->src[dend - 1])) dend--;
    } else if (tag && sign != '+' && tag[1] != '{') { /* lstrip_blocks */
      size_t lp = dend;                               /* just after the text's last newline (dstart: none) */
      while (lp > dstart && L->src[lp - 1] != '\n') lp--;
      if (lp > dstart || line_starting) {
        size_t q = lp;
        while (q < dend && is_ws(L->src[q])) q++;
        if (q == dend) dend = lp;
      }
    }
    if (dend > dstart && push(L, T_DATA, L->src + dstart, dend - dstart)) return -1;
    count_lines(L, L->pos, tag ? i : L->len);
    if (!tag) break;
    L->pos = i + 2 + (sign ? 1 : 0);
    int esign = 0;
    size_t after;
    if (tag[1] == '#') {
      const char *e = NULL;
      for (size_t j = L->pos; j + 1 < L->len; j++)
        if (L->src[j] == '#' && L->src[j + 1] == '}') {
          e = L->src + j;
          break;
        }
      if (!e) return lex_fail(L, "unterminated comment");
      size_t j = (size_t)(e - L->src);
      if (j > L->pos && L->src[j - 1] == '-') esign = '-';
      if (j > L->pos && L->src[j - 1] == '+') esign = '+';
      count_lines(L, L->pos, j + 2);
      L->pos = j + 2;
    } else {
      int var = tag[1] == '{';
      if (push(L, var ? T_VAR_BEGIN : T_BLOCK_BEGIN, NULL, 0)) return -1;
      if (lex_tag(L, var ? "}}" : "%}", &esign)) return -1;
      if (push(L, var ? T_VAR_END : T_BLOCK_END, NULL, 0)) return -1;
    }
    after = L->pos;
    strip_next = esign == '-';
    if (!esign && tag[1] != '{' && L->pos < L->len && L->src[L->pos] == '\n') { /* trim_blocks */
      L->pos++;
      L->line++;
    }
    /* Jinja: a line starts when the text the tag's match ate ends in a newline */
    if (strip_next) {
      size_t q = L->pos;
      while (q < L->len && is_ws(L->src[q])) q++;
      line_starting = q > L->pos && L->src[q - 1] == '\n';
    } else {
      line_starting = L->pos > after;
    }
  }
  return push(L, T_EOF, NULL, 0);
}

/* ---- parser --------------------------------------------------------------------------------- */

typedef struct {
  arena *ar;
  tok *t;
  int p, n;
  int depth;
  char err[256];
} parser;

static int perr(parser *P, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int perr(parser *P, const char *fmt, ...) {
  if (P->err[0]) return -1;
  va_list ap;
  va_start(ap, fmt);
  char m[200];
  vsnprintf(m, sizeof m, fmt, ap);
  va_end(ap);
  snprintf(P->err, sizeof P->err, "line %d: %s", P->t[P->p].line, m);
  return -1;
}

static tok *cur(parser *P) { return &P->t[P->p]; }
static int is_op(parser *P, const char *op) {
  tok *t = cur(P);
  return t->k == T_OP && t->n == strlen(op) && memcmp(t->s, op, t->n) == 0;
}
static int is_name(parser *P, const char *nm) {
  tok *t = cur(P);
  return t->k == T_NAME && t->n == strlen(nm) && memcmp(t->s, nm, t->n) == 0;
}
static int accept_op(parser *P, const char *op) {
  if (!is_op(P, op)) return 0;
  P->p++;
  return 1;
}
static int expect_op(parser *P, const char *op) {
  if (accept_op(P, op)) return 0;
  return perr(P, "'%s' expected", op);
}
static const char *take_name(parser *P) {
  if (cur(P)->k != T_NAME) {
    perr(P, "a name expected");
    return NULL;
  }
  tok *t = &P->t[P->p++];
  return ar_strndup(P->ar, t->s, t->n);
}

static expr *mk(parser *P, int k) {
  expr *e = ar_alloc(P->ar, sizeof *e);
  if (!e) {
    perr(P, "out of memory");
    return NULL;
  }
  e->k = k;
  e->line = cur(P)->line;
  return e;
}

static expr *parse_expr(parser *P);
static expr *parse_or(parser *P);
static expr *parse_unary(parser *P, int with_filter);

static const char *const FILTERS[] = {
    "trim", "length", "count", "upper", "lower",   "capitalize", "title", "default", "d",   "first",  "last",
    "join", "string", "int",   "float", "replace", "items",      "list",  "reverse", "abs", "tojson", "safe"};
static const char *const TESTS[] = {"defined",     "undefined", "none",     "string", "number",
                                    "integer",     "float",     "boolean",  "true",   "false",
                                    "mapping",     "iterable",  "sequence", "odd",    "even",
                                    "divisibleby", "eq",        "equalto",  "sameas"};

static int known(const char *const *list, size_t n, const char *name) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(list[i], name) == 0) return 1;
  return 0;
}

/* (args) after a callee: positional and name=value arguments. */
static int parse_args(parser *P, expr *e) {
  expr *args[64];
  const char *kw[64];
  int n = 0;
  while (!accept_op(P, ")")) {
    if (n && expect_op(P, ",")) return -1;
    if (accept_op(P, ")")) break;
    if (n == 64) return perr(P, "too many arguments");
    kw[n] = NULL;
    if (cur(P)->k == T_NAME && P->t[P->p + 1].k == T_OP && P->t[P->p + 1].n == 1 &&
        P->t[P->p + 1].s[0] == '=') {
      kw[n] = take_name(P);
      P->p++;
    }
    if (!(args[n++] = parse_expr(P))) return -1;
  }
  e->args = ar_alloc(P->ar, (size_t)(n ? n : 1) * sizeof *e->args);
  e->kw = ar_alloc(P->ar, (size_t)(n ? n : 1) * sizeof *e->kw);
  if (!e->args || !e->kw) return perr(P, "out of memory");
  memcpy(e->args, args, (size_t)n * sizeof *args);
  memcpy(e->kw, kw, (size_t)n * sizeof *kw);
  e->nargs = n;
  return 0;
}

static val *lit(parser *P, int t) {
  val *v = ar_alloc(P->ar, sizeof *v);
  if (!v) perr(P, "out of memory");
  if (v) v->t = t;
  return v;
}

static expr *parse_primary(parser *P) {
  tok *t = cur(P);
  expr *e = NULL;
  if (t->k == T_NAME) {
    static const char *const lits[] = {"true", "True", "false", "False", "none", "None"};
    for (int i = 0; i < 6; i++)
      if (is_name(P, lits[i])) {
        P->p++;
        if (!(e = mk(P, E_LIT))) return NULL;
        e->lit = i < 2 ? &TRUE_ : i < 4 ? &FALSE_ : &NONE;
        return e;
      }
    if (!(e = mk(P, E_VAR))) return NULL;
    e->name = take_name(P);
    return e->name ? e : NULL;
  }
  if (t->k == T_STRING) {
    /* adjacent strings concatenate */
    size_t total = 0;
    int q = P->p;
    while (P->t[q].k == T_STRING) total += P->t[q++].n;
    if (!(e = mk(P, E_LIT)) || !(e->lit = lit(P, V_STR))) return NULL;
    char *s = ar_alloc(P->ar, total + 1);
    if (!s) {
      perr(P, "out of memory");
      return NULL;
    }
    size_t k = 0;
    while (cur(P)->k == T_STRING) {
      memcpy(s + k, cur(P)->s, cur(P)->n);
      k += cur(P)->n;
      P->p++;
    }
    e->lit->s = s;
    e->lit->n = total;
    return e;
  }
  if (t->k == T_INT || t->k == T_FLOAT) {
    if (!(e = mk(P, E_LIT)) || !(e->lit = lit(P, t->k == T_INT ? V_INT : V_FLOAT))) return NULL;
    e->lit->i = t->i;
    e->lit->f = t->f;
    P->p++;
    return e;
  }
  if (accept_op(P, "(")) {
    if (accept_op(P, ")")) {
      if (!(e = mk(P, E_LIST))) return NULL;
      e->args = NULL;
      return e;
    }
    expr *first = parse_expr(P);
    if (!first) return NULL;
    if (accept_op(P, ")")) return first;
    /* a tuple: evaluated as a list */
    expr *items[256];
    int n = 0;
    items[n++] = first;
    while (accept_op(P, ",")) {
      if (is_op(P, ")")) break;
      if (n == 256) {
        perr(P, "tuple too long");
        return NULL;
      }
      if (!(items[n++] = parse_expr(P))) return NULL;
    }
    if (expect_op(P, ")")) return NULL;
    if (!(e = mk(P, E_LIST)) || !(e->args = ar_alloc(P->ar, (size_t)n * sizeof *items))) return NULL;
    memcpy(e->args, items, (size_t)n * sizeof *items);
    e->nargs = n;
    return e;
  }
  if (is_op(P, "[") || is_op(P, "{")) {
    int dict = is_op(P, "{");
    P->p++;
    expr *items[512];
    int n = 0;
    const char *close = dict ? "}" : "]";
    while (!accept_op(P, close)) {
      if (n && expect_op(P, ",")) return NULL;
      if (accept_op(P, close)) break;
      if (n >= 510) {
        perr(P, "literal too long");
        return NULL;
      }
      if (!(items[n++] = parse_expr(P))) return NULL;
      if (dict && (expect_op(P, ":") || !(items[n++] = parse_expr(P)))) return NULL;
    }
    if (!(e = mk(P, dict ? E_DICT : E_LIST))) return NULL;
    e->args = ar_alloc(P->ar, (size_t)(n ? n : 1) * sizeof *items);
    if (!e->args) return NULL;
    memcpy(e->args, items, (size_t)n * sizeof *items);
    e->nargs = n;
    return e;
  }
  perr(P, t->k == T_VAR_END || t->k == T_BLOCK_END ? "an expression expected" : "unexpected token");
  return NULL;
}

static expr *parse_postfix(parser *P, expr *e) {
  for (;;) {
    if (accept_op(P, ".")) {
      expr *a = mk(P, E_ATTR);
      if (!a) return NULL;
      a->a = e;
      if (cur(P)->k == T_INT) { /* x.0 is x[0] */
        a->k = E_INDEX;
        if (!(a->b = mk(P, E_LIT)) || !(a->b->lit = lit(P, V_INT))) return NULL;
        a->b->lit->i = cur(P)->i;
        P->p++;
      } else if (!(a->name = take_name(P))) {
        return NULL;
      }
      e = a;
    } else if (accept_op(P, "[")) {
      expr *parts[3] = {NULL, NULL, NULL};
      int np = 0, slice = 0;
      for (;;) {
        if (!is_op(P, ":") && !is_op(P, "]") && !(parts[np] = parse_expr(P))) return NULL;
        if (accept_op(P, ":")) {
          slice = 1;
          if (++np > 2) {
            perr(P, "bad slice");
            return NULL;
          }
          continue;
        }
        break;
      }
      if (expect_op(P, "]")) return NULL;
      if (!slice && !parts[0]) {
        perr(P, "an index expected");
        return NULL;
      }
      expr *x = mk(P, slice ? E_SLICE : E_INDEX);
      if (!x) return NULL;
      x->a = e;
      if (slice) {
        x->args = ar_alloc(P->ar, 3 * sizeof *x->args);
        if (!x->args) return NULL;
        memcpy(x->args, parts, sizeof parts);
      } else {
        x->b = parts[0];
      }
      e = x;
    } else if (accept_op(P, "(")) {
      expr *c = mk(P, E_CALL);
      if (!c) return NULL;
      c->a = e;
      if (parse_args(P, c)) return NULL;
      e = c;
    } else {
      return e;
    }
  }
}

static expr *parse_filters(parser *P, expr *e) {
  for (;;) {
    if (accept_op(P, "|")) {
      expr *f = mk(P, E_FILTER);
      if (!f || !(f->name = take_name(P))) return NULL;
      if (!known(FILTERS, sizeof FILTERS / sizeof *FILTERS, f->name)) {
        P->p--;
        perr(P, "no filter named '%s'", f->name);
        return NULL;
      }
      f->a = e;
      if (accept_op(P, "(") && parse_args(P, f)) return NULL;
      e = f;
    } else if (is_name(P, "is")) {
      P->p++;
      expr *t = mk(P, E_TEST);
      if (!t) return NULL;
      if (is_name(P, "not")) {
        P->p++;
        t->negate = 1;
      }
      if (is_name(P, "none") || is_name(P, "true") || is_name(P, "false")) {
        t->name = ar_strndup(P->ar, cur(P)->s, cur(P)->n);
        P->p++;
      } else if (!(t->name = take_name(P))) {
        return NULL;
      }
      if (!known(TESTS, sizeof TESTS / sizeof *TESTS, t->name)) {
        P->p--;
        perr(P, "no test named '%s'", t->name);
        return NULL;
      }
      t->a = e;
      if (accept_op(P, "(")) {
        if (parse_args(P, t)) return NULL;
      } else {
        tok *k = cur(P);
        int arg = k->k == T_STRING || k->k == T_INT || k->k == T_FLOAT || is_op(P, "[") || is_op(P, "{") ||
                  (k->k == T_NAME && !is_name(P, "else") && !is_name(P, "or") && !is_name(P, "and") &&
                   !is_name(P, "if") && !is_name(P, "is") && !is_name(P, "in") && !is_name(P, "not"));
        if (arg) {
          expr *a = parse_unary(P, 0);
          if (!a || !(t->args = ar_alloc(P->ar, sizeof *t->args))) return NULL;
          t->args[0] = a;
          t->nargs = 1;
        }
      }
      e = t;
    } else if (accept_op(P, "(")) {
      expr *c = mk(P, E_CALL);
      if (!c) return NULL;
      c->a = e;
      if (parse_args(P, c)) return NULL;
      e = c;
    } else {
      return e;
    }
  }
}

static expr *parse_unary(parser *P, int with_filter) {
  if (++P->depth > MAX_DEPTH) {
    perr(P, "expression nested too deeply");
    return NULL;
  }
  expr *e;
  if (is_op(P, "-") || is_op(P, "+")) {
    int neg = is_op(P, "-");
    P->p++;
    if (!(e = mk(P, neg ? E_NEG : E_POS)) || !(e->a = parse_unary(P, 0))) return NULL;
  } else {
    e = parse_primary(P);
  }
  if (e) e = parse_postfix(P, e);
  if (e && with_filter) e = parse_filters(P, e);
  P->depth--;
  return e;
}

static expr *binop(parser *P, expr *a, const char *op, expr *(*next)(parser *)) {
  expr *e = mk(P, E_BIN);
  if (!e) return NULL;
  snprintf(e->op, sizeof e->op, "%s", op);
  e->a = a;
  e->b = next(P);
  return e->b ? e : NULL;
}

static expr *parse_pow(parser *P) {
  expr *e = parse_unary(P, 1);
  while (e && accept_op(P, "**")) e = binop(P, e, "**", parse_pow);
  return e;
}

static expr *parse_math2(parser *P) {
  expr *e = parse_pow(P);
  while (e) {
    const char *ops[] = {"*", "//", "/", "%"};
    int m = -1;
    for (int i = 0; i < 4 && m < 0; i++)
      if (is_op(P, ops[i])) m = i;
    if (m < 0) break;
    P->p++;
    e = binop(P, e, ops[m], parse_pow);
  }
  return e;
}

static expr *parse_concat(parser *P) {
  expr *e = parse_math2(P);
  while (e && accept_op(P, "~")) e = binop(P, e, "~", parse_math2);
  return e;
}

static expr *parse_math1(parser *P) {
  expr *e = parse_concat(P);
  while (e && (is_op(P, "+") || is_op(P, "-"))) {
    const char *op = is_op(P, "+") ? "+" : "-";
    P->p++;
    e = binop(P, e, op, parse_concat);
  }
  return e;
}

static expr *parse_compare(parser *P) {
  expr *first = parse_math1(P);
  if (!first) return NULL;
  expr *opnd[64];
  char ops[64][4];
  int n = 0;
  opnd[0] = first;
  for (;;) {
    const char *cmp[] = {"==", "!=", "<=", ">=", "<", ">"};
    const char *op = NULL;
    for (int i = 0; i < 6 && !op; i++)
      if (is_op(P, cmp[i])) op = cmp[i];
    if (op) {
      P->p++;
    } else if (is_name(P, "in")) {
      P->p++;
      op = "in";
    } else if (is_name(P, "not") && P->t[P->p + 1].k == T_NAME && P->t[P->p + 1].n == 2 &&
               memcmp(P->t[P->p + 1].s, "in", 2) == 0) {
      P->p += 2;
      op = "ni";
    } else {
      break;
    }
    if (n == 63) {
      perr(P, "comparison chain too long");
      return NULL;
    }
    snprintf(ops[n], 4, "%s", op);
    if (!(opnd[++n] = parse_math1(P))) return NULL;
  }
  if (n == 0) return first;
  expr *e = mk(P, E_CMP);
  if (!e) return NULL;
  e->args = ar_alloc(P->ar, (size_t)(n + 1) * sizeof *opnd);
  e->ops = ar_alloc(P->ar, (size_t)n * sizeof *ops);
  if (!e->args || !e->ops) return NULL;
  memcpy(e->args, opnd, (size_t)(n + 1) * sizeof *opnd);
  memcpy(e->ops, ops, (size_t)n * sizeof *ops);
  e->nargs = n + 1;
  return e;
}

static expr *parse_not(parser *P) {
  if (is_name(P, "not")) {
    P->p++;
    expr *e = mk(P, E_NOT);
    if (!e || !(e->a = parse_not(P))) return NULL;
    return e;
  }
  return parse_compare(P);
}

static expr *parse_and(parser *P) {
  expr *e = parse_not(P);
  while (e && is_name(P, "and")) {
    P->p++;
    expr *x = mk(P, E_AND);
    if (!x) return NULL;
    x->a = e;
    if (!(x->b = parse_not(P))) return NULL;
    e = x;
  }
  return e;
}

static expr *parse_or(parser *P) {
  expr *e = parse_and(P);
  while (e && is_name(P, "or")) {
    P->p++;
    expr *x = mk(P, E_OR);
    if (!x) return NULL;
    x->a = e;
    if (!(x->b = parse_and(P))) return NULL;
    e = x;
  }
  return e;
}

static expr *parse_expr(parser *P) {
  if (++P->depth > MAX_DEPTH) {
    perr(P, "expression nested too deeply");
    return NULL;
  }
  expr *e = parse_or(P);
  while (e && is_name(P, "if")) {
    P->p++;
    expr *c = mk(P, E_COND);
    if (!c) return NULL;
    c->a = e;
    if (!(c->b = parse_or(P))) return NULL;
    if (is_name(P, "else")) {
      P->p++;
      if (!(c->c = parse_expr(P))) return NULL;
    }
    e = c;
  }
  P->depth--;
  return e;
}

/* ---- statements ----------------------------------------------------------------------------- */

static node *mknode(parser *P, int k) {
  node *n = ar_alloc(P->ar, sizeof *n);
  if (!n) perr(P, "out of memory");
  if (n) {
    n->k = k;
    n->line = cur(P)->line;
  }
  return n;
}

/* Parses nodes until a block tag whose name is one of `ends` (NULL-terminated list); leaves
 * P->p on that name and returns the list. At top level (ends NULL) runs to the end. */
static int parse_body(parser *P, const char *const *ends, node **out);

static int block_end(parser *P) {
  if (cur(P)->k != T_BLOCK_END) return perr(P, "'%%}' expected");
  P->p++;
  return 0;
}

static int parse_if(parser *P, node *n) {
  static const char *const ends[] = {"elif", "else", "endif", NULL};
  expr *conds[256];
  node *bodies[256];
  int nb = 0;
  for (;;) {
    if (nb == 256) return perr(P, "too many elif");
    if (!(conds[nb] = parse_expr(P)) || block_end(P) || parse_body(P, ends, &bodies[nb])) return -1;
    nb++;
    if (is_name(P, "elif")) {
      P->p++;
      continue;
    }
    if (is_name(P, "else")) {
      static const char *const ends2[] = {"endif", NULL};
      P->p++;
      if (block_end(P) || parse_body(P, ends2, &n->else_body)) return -1;
    }
    P->p++; /* endif */
    break;
  }
  n->conds = ar_alloc(P->ar, (size_t)nb * sizeof *conds);
  n->bodies = ar_alloc(P->ar, (size_t)nb * sizeof *bodies);
  if (!n->conds || !n->bodies) return perr(P, "out of memory");
  memcpy(n->conds, conds, (size_t)nb * sizeof *conds);
  memcpy(n->bodies, bodies, (size_t)nb * sizeof *bodies);
  n->n_br = nb;
  return block_end(P);
}

static int parse_for(parser *P, node *n) {
  static const char *const ends[] = {"else", "endfor", NULL};
  if (!(n->target[0] = take_name(P))) return -1;
  n->n_target = 1;
  if (accept_op(P, ",")) {
    if (!(n->target[1] = take_name(P))) return -1;
    n->n_target = 2;
  }
  if (!is_name(P, "in")) return perr(P, "'in' expected");
  P->p++;
  /* the iterable stops before a filtering 'if' (no conditional expression there) */
  if (!(n->e = parse_or(P))) return -1;
  if (is_name(P, "if")) {
    P->p++;
    if (!(n->filter = parse_or(P))) return -1;
  }
  if (is_name(P, "recursive")) return perr(P, "recursive loops are not supported");
  n->bodies = ar_alloc(P->ar, 2 * sizeof *n->bodies);
  if (!n->bodies) return perr(P, "out of memory");
  if (block_end(P) || parse_body(P, ends, &n->bodies[0])) return -1;
  if (is_name(P, "else")) {
    static const char *const ends2[] = {"endfor", NULL};
    P->p++;
    if (block_end(P) || parse_body(P, ends2, &n->bodies[1])) return -1;
  }
  P->p++; /* endfor */
  return block_end(P);
}

static int parse_set(parser *P, node *n) {
  if (!(n->target[0] = take_name(P))) return -1;
  n->n_target = 1;
  if (accept_op(P, ".")) {
    if (!(n->attr = take_name(P))) return -1;
  } else if (is_op(P, ",")) {
    return perr(P, "tuple assignment is not supported");
  }
  if (!is_op(P, "=")) return perr(P, "block assignment ({%% set x %%}...{%% endset %%}) is not supported");
  P->p++;
  if (!(n->e = parse_expr(P))) return -1;
  return block_end(P);
}

static int parse_body(parser *P, const char *const *ends, node **out) {
  node *head = NULL, **tail = &head;
  if (++P->depth > MAX_DEPTH) return perr(P, "blocks nested too deeply");
  for (;;) {
    tok *t = cur(P);
    node *n = NULL;
    if (t->k == T_EOF) {
      if (ends) {
        int last = 0;
        while (ends[last + 1]) last++;
        return perr(P, "'{%% %s %%}' expected before the end of the template", ends[last]);
      }
      break;
    }
    if (t->k == T_DATA) {
      if (!(n = mknode(P, N_TEXT))) return -1;
      n->text = t->s;
      n->len = t->n;
      P->p++;
    } else if (t->k == T_VAR_BEGIN) {
      P->p++;
      if (!(n = mknode(P, N_OUT)) || !(n->e = parse_expr(P))) return -1;
      if (cur(P)->k != T_VAR_END) return perr(P, "'}}' expected");
      P->p++;
    } else if (t->k == T_BLOCK_BEGIN) {
      P->p++;
      if (cur(P)->k != T_NAME) return perr(P, "a tag name expected");
      for (int i = 0; ends && ends[i]; i++)
        if (is_name(P, ends[i])) {
          *out = head;
          P->depth--;
          return 0;
        }
      if (is_name(P, "if")) {
        P->p++;
        if (!(n = mknode(P, N_IF)) || parse_if(P, n)) return -1;
      } else if (is_name(P, "for")) {
        P->p++;
        if (!(n = mknode(P, N_FOR)) || parse_for(P, n)) return -1;
      } else if (is_name(P, "set")) {
        P->p++;
        if (!(n = mknode(P, N_SET)) || parse_set(P, n)) return -1;
      } else if (is_name(P, "break") || is_name(P, "continue")) {
        if (!(n = mknode(P, is_name(P, "break") ? N_BREAK : N_CONTINUE))) return -1;
        P->p++;
        if (block_end(P)) return -1;
      } else {
        char nm[64];
        snprintf(nm, sizeof nm, "%.*s", (int)(t[1].n < 60 ? t[1].n : 60), t[1].s);
        if (ends) {
          int last = 0;
          while (ends[last + 1]) last++;
          return perr(P, "unexpected tag '%s' (expected '%s')", nm, ends[last]);
        }
        return perr(P, "unknown or unexpected tag '%s'", nm);
      }
    } else {
      return perr(P, "unexpected token");
    }
    *tail = n;
    tail = &n->next;
  }
  *out = head;
  P->depth--;
  return 0;
}

int ot_chat_template_parse(const char *src, size_t len, ot_chat_template **out) {
  if (!src || !out) return ot_error(OT_ERR_INVALID, "ot_chat_template_parse: NULL argument");
  ot_chat_template *t = calloc(1, sizeof *t);
  if (!t) return ot_error(OT_ERR_NOMEM, "cannot allocate a chat template");
  /* Jinja normalises newlines to \n and drops one trailing newline */
  char *s = ar_alloc(&t->ar, len + 1);
  if (!s) {
    free(t);
    return ot_error(OT_ERR_NOMEM, "cannot allocate a chat template");
  }
  size_t k = 0;
  for (size_t i = 0; i < len; i++) {
    if (src[i] == '\r') {
      s[k++] = '\n';
      if (i + 1 < len && src[i + 1] == '\n') i++;
    } else {
      s[k++] = src[i];
    }
  }
  if (k && s[k - 1] == '\n') k--;
  s[k] = '\0';
  lexer L = {.ar = &t->ar, .src = s, .len = k, .line = 1};
  int rc = lex(&L);
  char err[300] = "";
  if (rc == 0) {
    parser P = {.ar = &t->ar, .t = L.t, .n = L.n};
    rc = parse_body(&P, NULL, &t->root);
    if (rc || t->ar.failed) snprintf(err, sizeof err, "%s", P.err[0] ? P.err : "out of memory");
  } else {
    snprintf(err, sizeof err, "%s", L.err);
  }
  free(L.t);
  if (rc || t->ar.failed) {
    ot_chat_template_free(t);
    return ot_error(OT_ERR_FORMAT, "chat template: %s", err);
  }
  *out = t;
  return OT_OK;
}

void ot_chat_template_free(ot_chat_template *t) {
  if (!t) return;
  ar_free(&t->ar);
  free(t);
}

/* ---- rendering -------------------------------------------------------------------------------- */

typedef struct scope {
  struct scope *up;
  const char **names;
  val **vals;
  int n, cap;
} scope;

typedef struct {
  arena ar;
  char *out;
  size_t len, cap;
  char err[512];
  int brk, cont; /* a break/continue is unwinding */
  int depth;
  uint64_t ops; /* evaluations and loop iterations so far (MAX_OPS: a runaway template) */
} rctx;

static int rfail(rctx *R, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int rfail(rctx *R, const char *fmt, ...) {
  if (R->err[0]) return -1;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(R->err, sizeof R->err, fmt, ap);
  va_end(ap);
  return -1;
}

static val *nv(rctx *R, int t) {
  val *v = ar_alloc(&R->ar, sizeof *v);
  if (!v) {
    rfail(R, "out of memory");
    return NULL;
  }
  v->t = t;
  return v;
}

static val *mkstr(rctx *R, const char *s, size_t n) {
  val *v = nv(R, V_STR);
  if (!v) return NULL;
  char *c = ar_strndup(&R->ar, s, n);
  if (!c) {
    rfail(R, "out of memory");
    return NULL;
  }
  v->s = c;
  v->n = n;
  return v;
}

static val *mkint(rctx *R, long long i) {
  val *v = nv(R, V_INT);
  if (v) v->i = i;
  return v;
}

static val *mkfloat(rctx *R, double f) {
  val *v = nv(R, V_FLOAT);
  if (v) v->f = f;
  return v;
}

static val *mkbool(int b) { return b ? &TRUE_ : &FALSE_; }

static int list_push(rctx *R, val *l, val *x) {
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 8;
    val **a = ar_alloc(&R->ar, cap * sizeof *a);
    if (!a) return rfail(R, "out of memory");
    if (l->n) memcpy(a, l->a, l->n * sizeof *a);
    l->a = a;
    l->cap = cap;
  }
  l->a[l->n++] = x;
  return 0;
}

static int dict_set(rctx *R, val *d, const char *k, size_t kn, val *x) {
  for (size_t i = 0; i < d->n; i++)
    if (d->kn[i] == kn && memcmp(d->k[i], k, kn) == 0) {
      d->a[i] = x;
      return 0;
    }
  if (d->n == d->cap) {
    size_t cap = d->cap ? d->cap * 2 : 8;
    val **a = ar_alloc(&R->ar, cap * sizeof *a);
    const char **ks = ar_alloc(&R->ar, cap * sizeof *ks);
    size_t *kns = ar_alloc(&R->ar, cap * sizeof *kns);
    if (!a || !ks || !kns) return rfail(R, "out of memory");
    if (d->n) {
      memcpy(a, d->a, d->n * sizeof *a);
      memcpy(ks, d->k, d->n * sizeof *ks);
      memcpy(kns, d->kn, d->n * sizeof *kns);
    }
    d->a = a;
    d->k = ks;
    d->kn = kns;
    d->cap = cap;
  }
  d->k[d->n] = k;
  d->kn[d->n] = kn;
  d->a[d->n++] = x;
  return 0;
}

static val *dict_get(const val *d, const char *k, size_t kn) {
  for (size_t i = 0; i < d->n; i++)
    if (d->kn[i] == kn && memcmp(d->k[i], k, kn) == 0) return d->a[i];
  return NULL;
}

static int truthy(const val *v) {
  switch (v->t) {
  case V_UNDEF:
  case V_NONE: return 0;
  case V_BOOL:
  case V_INT: return v->i != 0;
  case V_FLOAT: return v->f != 0.0;
  case V_STR:
  case V_LIST:
  case V_DICT: return v->n != 0 || v->ns;
  default: return 1;
  }
}

static const char *type_name(const val *v) {
  static const char *const n[] = {"Undefined", "NoneType", "bool", "int",     "float",
                                  "str",       "list",     "dict", "function"};
  return v->ns ? "Namespace" : n[v->t];
}

/* -- strings: Python's str() and repr() -- */

typedef struct {
  char *s;
  size_t n, cap;
  int fail; /* 1: out of memory or over OUT_CAP; SB_TOO_DEEP: values nested deeper than VAL_DEPTH */
} sbuf;
#define SB_TOO_DEEP 2
/* Nesting of values walked by repr, tojson and ==: a loop can nest lists without a bound, and the
 * walkers recurse (fuzz_chat_template found the stack overflow). */
#define VAL_DEPTH (MAX_DEPTH * 4)
static const char *sb_why(const sbuf *b) {
  return b->fail == SB_TOO_DEEP ? "values nested too deeply" : "out of memory";
}

static void sb_add(sbuf *b, const char *s, size_t n) {
  if (b->fail) return;
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + n + 1) cap *= 2;
    if (cap > OUT_CAP + 64) {
      b->fail = 1;
      return;
    }
    char *p = realloc(b->s, cap);
    if (!p) {
      b->fail = 1;
      return;
    }
    b->s = p;
    b->cap = cap;
  }
  memcpy(b->s + b->n, s, n);
  b->n += n;
  b->s[b->n] = '\0';
}
static void sb_str(sbuf *b, const char *s) { sb_add(b, s, strlen(s)); }

static void fmt_float(sbuf *b, double f) {
  char t[64];
  if (isnan(f)) {
    sb_str(b, "nan");
    return;
  }
  if (isinf(f)) {
    sb_str(b, f > 0 ? "inf" : "-inf");
    return;
  }
  /* Python's repr: the shortest form that reads back the same */
  for (int p = 1; p <= 17; p++) {
    snprintf(t, sizeof t, "%.*g", p, f);
    if (strtod(t, NULL) == f) break;
  }
  int exp = strchr(t, 'e') != NULL;
  if (exp) { /* Python writes 1e+16 as 1e+16, 1e-05 as 1e-05: same as C */
    sb_str(b, t);
    return;
  }
  sb_str(b, t);
  if (!strchr(t, '.') && !strchr(t, 'n') && !strchr(t, 'i')) sb_str(b, ".0");
}

static void repr_at(sbuf *b, const val *v, int depth);
static void repr(sbuf *b, const val *v) { repr_at(b, v, 0); }

static void str_of(sbuf *b, const val *v) {
  char t[32];
  switch (v->t) {
  case V_UNDEF: break;
  case V_NONE: sb_str(b, "None"); break;
  case V_BOOL: sb_str(b, v->i ? "True" : "False"); break;
  case V_INT:
    snprintf(t, sizeof t, "%lld", v->i);
    sb_str(b, t);
    break;
  case V_FLOAT: fmt_float(b, v->f); break;
  case V_STR: sb_add(b, v->s, v->n); break;
  default: repr(b, v);
  }
}

static void repr_str(sbuf *b, const char *s, size_t n) {
  int dq = memchr(s, '\'', n) && !memchr(s, '"', n);
  char q = dq ? '"' : '\'';
  sb_add(b, &q, 1);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    char t[8];
    if (c == '\\' || c == (unsigned char)q) {
      t[0] = '\\';
      t[1] = (char)c;
      sb_add(b, t, 2);
    } else if (c == '\n') {
      sb_str(b, "\\n");
    } else if (c == '\r') {
      sb_str(b, "\\r");
    } else if (c == '\t') {
      sb_str(b, "\\t");
    } else if (c < 0x20 || c == 0x7f) {
      snprintf(t, sizeof t, "\\x%02x", c);
      sb_str(b, t);
    } else {
      sb_add(b, s + i, 1);
    }
  }
  sb_add(b, &q, 1);
}

static void repr_at(sbuf *b, const val *v, int depth) {
  if (depth > VAL_DEPTH) {
    if (!b->fail) b->fail = SB_TOO_DEEP;
    return;
  }
  if (v->t == V_STR) {
    repr_str(b, v->s, v->n);
  } else if (v->t == V_LIST) {
    sb_str(b, "[");
    for (size_t i = 0; i < v->n; i++) {
      if (i) sb_str(b, ", ");
      repr_at(b, v->a[i], depth + 1);
    }
    sb_str(b, "]");
  } else if (v->t == V_DICT && v->ns) {
    sb_str(b, "<Namespace ");
    for (size_t i = 0; i < v->n; i++) {
      if (i) sb_str(b, ", ");
      sb_add(b, v->k[i], v->kn[i]);
      sb_str(b, "=");
      repr_at(b, v->a[i], depth + 1);
    }
    sb_str(b, ">");
  } else if (v->t == V_DICT) {
    sb_str(b, "{");
    for (size_t i = 0; i < v->n; i++) {
      if (i) sb_str(b, ", ");
      repr_str(b, v->k[i], v->kn[i]);
      sb_str(b, ": ");
      repr_at(b, v->a[i], depth + 1);
    }
    sb_str(b, "}");
  } else if (v->t == V_FUNC) {
    sb_str(b, "<function>");
  } else {
    str_of(b, v);
  }
}

/* json.dumps(v, ensure_ascii=False, indent=indent (-1: None), sort_keys=sort) */
static int to_json_at(rctx *R, sbuf *b, const val *v, int indent, int sort, int level);

static void json_nl(sbuf *b, int indent, int level) {
  sb_str(b, "\n");
  for (int i = 0; i < indent * level; i++) sb_str(b, " ");
}

static int to_json_at(rctx *R, sbuf *b, const val *v, int indent, int sort, int level) {
  if (level > VAL_DEPTH) return rfail(R, "values nested too deeply");
  switch (v->t) {
  case V_NONE: sb_str(b, "null"); return 0;
  case V_BOOL: sb_str(b, v->i ? "true" : "false"); return 0;
  case V_INT:
  case V_FLOAT:
    if (v->t == V_FLOAT && (isnan(v->f) || isinf(v->f))) {
      sb_str(b, isnan(v->f) ? "NaN" : v->f > 0 ? "Infinity" : "-Infinity");
      return 0;
    }
    str_of(b, v);
    return 0;
  case V_STR:
    sb_str(b, "\"");
    for (size_t i = 0; i < v->n; i++) {
      unsigned char c = (unsigned char)v->s[i];
      char t[8];
      if (c == '"' || c == '\\') {
        t[0] = '\\';
        t[1] = (char)c;
        sb_add(b, t, 2);
      } else if (c == '\n') {
        sb_str(b, "\\n");
      } else if (c == '\r') {
        sb_str(b, "\\r");
      } else if (c == '\t') {
        sb_str(b, "\\t");
      } else if (c == '\b') {
        sb_str(b, "\\b");
      } else if (c == '\f') {
        sb_str(b, "\\f");
      } else if (c < 0x20) {
        snprintf(t, sizeof t, "\\u%04x", c);
        sb_str(b, t);
      } else {
        sb_add(b, v->s + i, 1);
      }
    }
    sb_str(b, "\"");
    return 0;
  case V_LIST:
    sb_str(b, "[");
    for (size_t i = 0; i < v->n; i++) {
      if (i) sb_str(b, indent >= 0 ? "," : ", ");
      if (indent >= 0) json_nl(b, indent, level + 1);
      if (to_json_at(R, b, v->a[i], indent, sort, level + 1)) return -1;
    }
    if (indent >= 0 && v->n) json_nl(b, indent, level);
    sb_str(b, "]");
    return 0;
  case V_DICT: {
    if (v->ns) break;
    size_t *order = v->n ? malloc(v->n * sizeof *order) : NULL;
    if (v->n && !order) return rfail(R, "out of memory");
    for (size_t i = 0; i < v->n; i++) order[i] = i;
    for (size_t i = 1; sort && i < v->n; i++) /* insertion sort by key bytes (code point order) */
      for (size_t k = i; k > 0; k--) {
        size_t x = order[k - 1], y = order[k], m = v->kn[x] < v->kn[y] ? v->kn[x] : v->kn[y];
        int c = memcmp(v->k[x], v->k[y], m);
        if (c < 0 || (c == 0 && v->kn[x] <= v->kn[y])) break;
        order[k - 1] = y;
        order[k] = x;
      }
    sb_str(b, "{");
    int rc = 0;
    for (size_t j = 0; j < v->n && !rc; j++) {
      size_t i = order[j];
      if (j) sb_str(b, indent >= 0 ? "," : ", ");
      if (indent >= 0) json_nl(b, indent, level + 1);
      val k = {.t = V_STR, .s = v->k[i], .n = v->kn[i]};
      to_json_at(R, b, &k, indent, sort, level + 1);
      sb_str(b, ": ");
      rc = to_json_at(R, b, v->a[i], indent, sort, level + 1);
    }
    free(order);
    if (rc) return -1;
    if (indent >= 0 && v->n) json_nl(b, indent, level);
    sb_str(b, "}");
    return 0;
  }
  default: break;
  }
  return rfail(R, "TypeError: Object of type %s is not JSON serializable", type_name(v));
}

static val *str_val(rctx *R, const val *v) {
  if (v->t == V_STR) return (val *)v;
  sbuf b = {0};
  str_of(&b, v);
  val *r = b.fail ? NULL : mkstr(R, b.s ? b.s : "", b.n);
  if (b.fail) rfail(R, "%s", sb_why(&b));
  free(b.s);
  return r;
}

/* -- UTF-8 code points: Python indexes strings by them -- */

static size_t cp_len(const char *s, size_t n) {
  size_t k = 0;
  for (size_t i = 0; i < n; i++) k += ((unsigned char)s[i] & 0xC0) != 0x80;
  return k;
}

/* byte offset of code point index ci */
static size_t cp_off(const char *s, size_t n, size_t ci) {
  size_t k = 0, i = 0;
  for (; i < n; i++) {
    if (((unsigned char)s[i] & 0xC0) != 0x80) {
      if (k == ci) return i;
      k++;
    }
  }
  return n;
}

/* Python's str.isspace for the code point at s (its byte length in *len). */
static int py_space(const unsigned char *s, size_t n, size_t *len) {
  *len = 1;
  if (n >= 1 && (s[0] == ' ' || (s[0] >= 0x09 && s[0] <= 0x0d) || (s[0] >= 0x1c && s[0] <= 0x1f))) return 1;
  if (n >= 2 && s[0] == 0xC2 && (s[1] == 0x85 || s[1] == 0xA0)) {
    *len = 2;
    return 1;
  }
  if (n >= 3) {
    unsigned cp = ((unsigned)(s[0] & 0x0F) << 12) | ((unsigned)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    if ((s[0] & 0xF0) == 0xE0 && (cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
                                  cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000)) {
      *len = 3;
      return 1;
    }
  }
  return 0;
}

static val *strip(rctx *R, const val *v, int left, int right) {
  const unsigned char *s = (const unsigned char *)v->s;
  size_t a = 0, b = v->n, l;
  while (left && a < b && py_space(s + a, b - a, &l)) a += l;
  while (right && b > a) {
    size_t back = 1;
    while (back < 3 && b - back > a && (s[b - back] & 0xC0) == 0x80) back++;
    if (py_space(s + b - back, back, &l) && l == back)
      b -= back;
    else
      break;
  }
  return mkstr(R, v->s + a, b - a);
}

static val *ascii_case(rctx *R, const val *v, int mode /* 0 lower 1 upper 2 capitalize 3 title */) {
  val *r = mkstr(R, v->s, v->n);
  if (!r) return NULL;
  char *s = (char *)r->s;
  int start = 1;
  for (size_t i = 0; i < r->n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (mode == 0)
      s[i] = (char)tolower(c);
    else if (mode == 1)
      s[i] = (char)toupper(c);
    else if (mode == 2)
      s[i] = (char)(i == 0 ? toupper(c) : tolower(c));
    else {
      s[i] = (char)(start ? toupper(c) : tolower(c));
      start = !isalpha(c);
    }
  }
  return r;
}

static val *replace(rctx *R, const val *s, const val *from, const val *to) {
  if (from->t != V_STR || to->t != V_STR) {
    rfail(R, "TypeError: replace() arguments must be str");
    return NULL;
  }
  sbuf b = {0};
  if (from->n == 0) { /* Python inserts between every character */
    for (size_t i = 0; i < s->n;) {
      sb_add(&b, to->s, to->n);
      size_t l = 1;
      while (i + l < s->n && ((unsigned char)s->s[i + l] & 0xC0) == 0x80) l++;
      sb_add(&b, s->s + i, l);
      i += l;
    }
    sb_add(&b, to->s, to->n);
  } else {
    for (size_t i = 0; i < s->n;) {
      if (i + from->n <= s->n && memcmp(s->s + i, from->s, from->n) == 0) {
        sb_add(&b, to->s, to->n);
        i += from->n;
      } else {
        sb_add(&b, s->s + i++, 1);
      }
    }
  }
  val *r = b.fail ? NULL : mkstr(R, b.s ? b.s : "", b.n);
  if (b.fail) rfail(R, "%s", sb_why(&b));
  free(b.s);
  return r;
}

/* -- comparisons -- */

static int is_num(const val *v) { return v->t == V_BOOL || v->t == V_INT || v->t == V_FLOAT; }
static double num(const val *v) { return v->t == V_FLOAT ? v->f : (double)v->i; }

/* Beyond VAL_DEPTH levels two values compare unequal (no error channel here; no real template
 * nests that deep). */
static int eq_at(const val *a, const val *b, int depth);
static int eq(const val *a, const val *b) { return eq_at(a, b, 0); }
static int eq_at(const val *a, const val *b, int depth) {
  if (depth > VAL_DEPTH) return 0;
  if (is_num(a) && is_num(b)) {
    if (a->t != V_FLOAT && b->t != V_FLOAT) return a->i == b->i;
    return num(a) == num(b);
  }
  if (a->t != b->t) return 0;
  switch (a->t) {
  case V_UNDEF:
  case V_NONE: return 1;
  case V_STR: return a->n == b->n && memcmp(a->s, b->s, a->n) == 0;
  case V_LIST:
    if (a->n != b->n) return 0;
    for (size_t i = 0; i < a->n; i++)
      if (!eq_at(a->a[i], b->a[i], depth + 1)) return 0;
    return 1;
  case V_DICT:
    if (a->ns || b->ns) return a == b;
    if (a->n != b->n) return 0;
    for (size_t i = 0; i < a->n; i++) {
      val *o = dict_get(b, a->k[i], a->kn[i]);
      if (!o || !eq_at(a->a[i], o, depth + 1)) return 0;
    }
    return 1;
  default: return a == b;
  }
}

/* <0, 0, >0; -2 with an error for types that do not order */
static int order(rctx *R, const val *a, const val *b, const char *op, int *out) {
  if (is_num(a) && is_num(b)) {
    double x = num(a), y = num(b);
    if (a->t != V_FLOAT && b->t != V_FLOAT)
      *out = a->i < b->i ? -1 : a->i > b->i;
    else
      *out = x < y ? -1 : x > y;
    return 0;
  }
  if (a->t == V_STR && b->t == V_STR) {
    size_t m = a->n < b->n ? a->n : b->n;
    int c = memcmp(a->s, b->s, m); /* UTF-8 byte order is code point order */
    *out = c ? c : a->n < b->n ? -1 : a->n > b->n;
    return 0;
  }
  return rfail(R, "TypeError: '%s' not supported between instances of '%s' and '%s'", op, type_name(a),
               type_name(b));
}

static int contains(rctx *R, const val *hay, const val *x, int *out) {
  if (hay->t == V_STR) {
    if (x->t != V_STR)
      return rfail(R, "TypeError: 'in <string>' requires string as left operand, not %s", type_name(x));
    *out = x->n == 0 || (hay->n >= x->n && memmem(hay->s, hay->n, x->s, x->n) != NULL);
    return 0;
  }
  if (hay->t == V_LIST) {
    *out = 0;
    for (size_t i = 0; i < hay->n && !*out; i++) *out = eq(hay->a[i], x);
    return 0;
  }
  if (hay->t == V_DICT) {
    *out = x->t == V_STR && dict_get(hay, x->s, x->n) != NULL;
    return 0;
  }
  return rfail(R, "TypeError: argument of type '%s' is not iterable", type_name(hay));
}

/* -- evaluation -- */

static val *eval(rctx *R, scope *S, const expr *e);

static val *lookup(scope *S, const char *name) {
  for (; S; S = S->up)
    for (int i = S->n - 1; i >= 0; i--)
      if (strcmp(S->names[i], name) == 0) return S->vals[i];
  return NULL;
}

static int scope_set(rctx *R, scope *S, const char *name, val *v) {
  for (int i = 0; i < S->n; i++)
    if (strcmp(S->names[i], name) == 0) {
      S->vals[i] = v;
      return 0;
    }
  if (S->n == S->cap) {
    int cap = S->cap ? S->cap * 2 : 16;
    const char **n = ar_alloc(&R->ar, (size_t)cap * sizeof *n);
    val **v2 = ar_alloc(&R->ar, (size_t)cap * sizeof *v2);
    if (!n || !v2) return rfail(R, "out of memory");
    if (S->n) {
      memcpy(n, S->names, (size_t)S->n * sizeof *n);
      memcpy(v2, S->vals, (size_t)S->n * sizeof *v2);
    }
    S->names = n;
    S->vals = v2;
    S->cap = cap;
  }
  S->names[S->n] = name;
  S->vals[S->n++] = v;
  return 0;
}

static val *undef(rctx *R, const char *name) {
  val *v = nv(R, V_UNDEF);
  if (v) v->name = name;
  return v;
}

static val *getattr_(rctx *R, val *o, const char *name, size_t n) {
  if (o->t == V_UNDEF) {
    rfail(R, "UndefinedError: '%s' is undefined", o->name ? o->name : "value");
    return NULL;
  }
  if (o->t == V_DICT) {
    val *v = dict_get(o, name, n);
    if (v) return v;
    if (o->ns) return undef(R, ar_strndup(&R->ar, name, n));
  }
  static const char *const methods[] = {"strip",      "lstrip",   "rstrip", "upper",   "lower",
                                        "startswith", "endswith", "split",  "replace", "title",
                                        "capitalize", "items",    "keys",   "values",  "get"};
  for (size_t i = 0; i < sizeof methods / sizeof *methods; i++)
    if (strlen(methods[i]) == n && memcmp(methods[i], name, n) == 0) {
      int dict_m = i >= 11;
      if ((dict_m && o->t == V_DICT && !o->ns) || (!dict_m && o->t == V_STR)) {
        val *f = nv(R, V_FUNC);
        if (f) {
          f->name = methods[i];
          f->self = o;
        }
        return f;
      }
    }
  return undef(R, ar_strndup(&R->ar, name, n));
}

static int to_index(rctx *R, const val *i, long long n, long long *out) {
  if (i->t != V_INT && i->t != V_BOOL)
    return rfail(R, "TypeError: indices must be integers, not %s", type_name(i));
  long long k = i->i < 0 ? i->i + n : i->i;
  *out = k;
  return 0;
}

static val *index_(rctx *R, val *o, val *i) {
  if (o->t == V_DICT) {
    if (i->t == V_STR) {
      val *v = dict_get(o, i->s, i->n);
      if (v) return v;
    }
    return undef(R, NULL);
  }
  if (o->t == V_LIST || o->t == V_STR) {
    if (i->t == V_STR) return getattr_(R, o, i->s, i->n);
    long long n = o->t == V_LIST ? (long long)o->n : (long long)cp_len(o->s, o->n), k = 0;
    if (to_index(R, i, n, &k)) return NULL;
    if (k < 0 || k >= n) return undef(R, NULL); /* jinja: an undefined, not an error */
    if (o->t == V_LIST) return o->a[k];
    size_t a = cp_off(o->s, o->n, (size_t)k), b = cp_off(o->s, o->n, (size_t)k + 1);
    return mkstr(R, o->s + a, b - a);
  }
  if (o->t == V_UNDEF) {
    rfail(R, "UndefinedError: '%s' is undefined", o->name ? o->name : "value");
    return NULL;
  }
  return undef(R, NULL);
}

/* Python slice semantics */
static val *slice_(rctx *R, val *o, val *parts[3]) {
  if (o->t != V_LIST && o->t != V_STR) {
    rfail(R, "TypeError: '%s' object is not subscriptable", type_name(o));
    return NULL;
  }
  long long n = o->t == V_LIST ? (long long)o->n : (long long)cp_len(o->s, o->n);
  long long step = 1, start, stop;
  for (int p = 0; p < 3; p++)
    if (parts[p] && parts[p]->t != V_NONE && parts[p]->t != V_INT && parts[p]->t != V_BOOL) {
      rfail(R, "TypeError: slice indices must be integers or None");
      return NULL;
    }
  if (parts[2] && parts[2]->t != V_NONE) step = parts[2]->i;
  if (step == 0) {
    rfail(R, "ValueError: slice step cannot be zero");
    return NULL;
  }
  if (!parts[0] || parts[0]->t == V_NONE) {
    start = step > 0 ? 0 : n - 1;
  } else {
    start = parts[0]->i;
    if (start < 0) start += n;
    if (start < 0) start = step > 0 ? 0 : -1;
    if (start >= n) start = step > 0 ? n : n - 1;
  }
  if (!parts[1] || parts[1]->t == V_NONE) {
    stop = step > 0 ? n : -1;
  } else {
    stop = parts[1]->i;
    if (stop < 0) stop += n;
    if (stop < 0) stop = step > 0 ? 0 : -1;
    if (stop >= n) stop = step > 0 ? n : n - 1;
  }
  val *r = nv(R, o->t == V_LIST ? V_LIST : V_STR);
  if (!r) return NULL;
  sbuf b = {0};
  for (long long k = start; step > 0 ? k < stop : k > stop; k += step) {
    if (o->t == V_LIST) {
      if (list_push(R, r, o->a[k])) return NULL;
    } else {
      size_t x = cp_off(o->s, o->n, (size_t)k), y = cp_off(o->s, o->n, (size_t)k + 1);
      sb_add(&b, o->s + x, y - x);
    }
  }
  if (o->t == V_STR) {
    val *s = b.fail ? NULL : mkstr(R, b.s ? b.s : "", b.n);
    free(b.s);
    return s;
  }
  return r;
}

static val *add(rctx *R, val *a, val *b, const char *op) {
  if (op[0] == '~') {
    val *x = str_val(R, a), *y = x ? str_val(R, b) : NULL;
    if (!y) return NULL;
    val *r = nv(R, V_STR);
    char *s = r ? ar_alloc(&R->ar, x->n + y->n + 1) : NULL;
    if (!s) {
      rfail(R, "out of memory");
      return NULL;
    }
    memcpy(s, x->s, x->n);
    memcpy(s + x->n, y->s, y->n);
    r->s = s;
    r->n = x->n + y->n;
    return r;
  }
  if (a->t == V_UNDEF || b->t == V_UNDEF) {
    const val *u = a->t == V_UNDEF ? a : b;
    rfail(R, "UndefinedError: '%s' is undefined", u->name ? u->name : "value");
    return NULL;
  }
  if (op[0] == '+' && a->t == V_STR && b->t == V_STR) return add(R, a, b, "~");
  if (op[0] == '+' && a->t == V_LIST && b->t == V_LIST) {
    val *r = nv(R, V_LIST);
    for (size_t i = 0; r && i < a->n; i++)
      if (list_push(R, r, a->a[i])) return NULL;
    for (size_t i = 0; r && i < b->n; i++)
      if (list_push(R, r, b->a[i])) return NULL;
    return r;
  }
  if (op[0] == '*' && op[1] == 0 &&
      ((a->t == V_STR && (b->t == V_INT || b->t == V_BOOL)) ||
       (b->t == V_STR && (a->t == V_INT || a->t == V_BOOL)))) {
    const val *s = a->t == V_STR ? a : b;
    long long k = a->t == V_STR ? b->i : a->i;
    if (k > 0 && (size_t)k * s->n > OUT_CAP) {
      rfail(R, "string too long");
      return NULL;
    }
    sbuf sb = {0};
    for (long long i = 0; i < k; i++) sb_add(&sb, s->s, s->n);
    val *r = sb.fail ? NULL : mkstr(R, sb.s ? sb.s : "", sb.n);
    free(sb.s);
    return r;
  }
  if (!is_num(a) || !is_num(b)) {
    rfail(R, "TypeError: unsupported operand type(s) for %s: '%s' and '%s'", op, type_name(a), type_name(b));
    return NULL;
  }
  int ints = a->t != V_FLOAT && b->t != V_FLOAT;
  long long x = a->i, y = b->i;
  double fx = num(a), fy = num(b);
  switch (op[0]) {
  case '+':
    return ints ? mkint(R, (long long)((unsigned long long)x + (unsigned long long)y)) : mkfloat(R, fx + fy);
  case '-':
    return ints ? mkint(R, (long long)((unsigned long long)x - (unsigned long long)y)) : mkfloat(R, fx - fy);
  case '*':
    if (op[1] == '*') {
      if (ints && y >= 0) {
        long long r = 1;
        for (long long i = 0; i < y && i < 64; i++)
          r = (long long)((unsigned long long)r * (unsigned long long)x);
        return mkint(R, r);
      }
      return mkfloat(R, pow(fx, fy));
    }
    return ints ? mkint(R, (long long)((unsigned long long)x * (unsigned long long)y)) : mkfloat(R, fx * fy);
  case '/':
    if (ints ? y == 0 : fy == 0.0) {
      rfail(R, "ZeroDivisionError: division by zero");
      return NULL;
    }
    if (op[1] == '/') {
      if (ints) {
        if (x == LLONG_MIN && y == -1) return mkint(R, x);
        long long q = x / y;
        if ((x % y != 0) && ((x < 0) != (y < 0))) q--;
        return mkint(R, q);
      }
      return mkfloat(R, floor(fx / fy));
    }
    return mkfloat(R, fx / fy);
  case '%':
    if (ints ? y == 0 : fy == 0.0) {
      rfail(R, "ZeroDivisionError: modulo by zero");
      return NULL;
    }
    if (ints) {
      if (y == -1) return mkint(R, 0);
      long long m = x % y;
      if (m != 0 && ((m < 0) != (y < 0))) m += y;
      return mkint(R, m);
    } else {
      double m = fmod(fx, fy);
      if (m != 0 && ((m < 0) != (fy < 0))) m += fy;
      return mkfloat(R, m);
    }
  default: break;
  }
  rfail(R, "unknown operator %s", op);
  return NULL;
}

static val *iterate(rctx *R, val *v); /* as a list */

static val *call_method(rctx *R, val *f, val **args, int n) {
  val *o = f->self;
  const char *m = f->name;
  if (!strcmp(m, "strip") || !strcmp(m, "lstrip") || !strcmp(m, "rstrip")) {
    if (n > 0 && args[0]->t != V_NONE) { /* strip(chars) */
      if (args[0]->t != V_STR) {
        rfail(R, "TypeError: strip arg must be None or str");
        return NULL;
      }
      size_t a = 0, b = o->n;
      if (m[0] != 'r')
        while (a < b && memchr(args[0]->s, o->s[a], args[0]->n)) a++;
      if (m[0] != 'l')
        while (b > a && memchr(args[0]->s, o->s[b - 1], args[0]->n)) b--;
      return mkstr(R, o->s + a, b - a);
    }
    return strip(R, o, m[0] != 'r', m[0] != 'l');
  }
  if (!strcmp(m, "upper")) return ascii_case(R, o, 1);
  if (!strcmp(m, "lower")) return ascii_case(R, o, 0);
  if (!strcmp(m, "capitalize")) return ascii_case(R, o, 2);
  if (!strcmp(m, "title")) return ascii_case(R, o, 3);
  if (!strcmp(m, "startswith") || !strcmp(m, "endswith")) {
    if (n < 1 || args[0]->t != V_STR) {
      rfail(R, "TypeError: %s first arg must be str", m);
      return NULL;
    }
    const val *p = args[0];
    if (p->n > o->n) return &FALSE_;
    return mkbool(m[0] == 's' ? memcmp(o->s, p->s, p->n) == 0 : memcmp(o->s + o->n - p->n, p->s, p->n) == 0);
  }
  if (!strcmp(m, "replace")) {
    if (n < 2) {
      rfail(R, "TypeError: replace expected 2 arguments");
      return NULL;
    }
    return replace(R, o, args[0], args[1]);
  }
  if (!strcmp(m, "split")) {
    val *r = nv(R, V_LIST);
    if (!r) return NULL;
    if (n > 0 && args[0]->t == V_STR) {
      if (args[0]->n == 0) {
        rfail(R, "ValueError: empty separator");
        return NULL;
      }
      size_t s = 0;
      for (size_t i = 0; i + args[0]->n <= o->n;) {
        if (memcmp(o->s + i, args[0]->s, args[0]->n) == 0) {
          if (list_push(R, r, mkstr(R, o->s + s, i - s))) return NULL;
          i += args[0]->n;
          s = i;
        } else {
          i++;
        }
      }
      if (list_push(R, r, mkstr(R, o->s + s, o->n - s))) return NULL;
      return r;
    }
    size_t i = 0, l;
    for (;;) { /* runs of whitespace */
      while (i < o->n && py_space((const unsigned char *)o->s + i, o->n - i, &l)) i += l;
      if (i >= o->n) break;
      size_t s = i;
      while (i < o->n && !py_space((const unsigned char *)o->s + i, o->n - i, &l)) i++;
      if (list_push(R, r, mkstr(R, o->s + s, i - s))) return NULL;
    }
    return r;
  }
  if (!strcmp(m, "items") || !strcmp(m, "keys") || !strcmp(m, "values")) {
    val *r = nv(R, V_LIST);
    for (size_t i = 0; r && i < o->n; i++) {
      val *k = mkstr(R, o->k[i], o->kn[i]), *x = k;
      if (m[0] == 'v') x = o->a[i];
      if (m[0] == 'i') {
        x = nv(R, V_LIST);
        if (!x || list_push(R, x, k) || list_push(R, x, o->a[i])) return NULL;
      }
      if (!x || list_push(R, r, x)) return NULL;
    }
    return r;
  }
  if (!strcmp(m, "get")) {
    if (n < 1) {
      rfail(R, "TypeError: get expected at least 1 argument");
      return NULL;
    }
    val *v = args[0]->t == V_STR ? dict_get(o, args[0]->s, args[0]->n) : NULL;
    return v ? v : n > 1 ? args[1] : &NONE;
  }
  rfail(R, "'%s' is not callable", m);
  return NULL;
}

static val *call(rctx *R, scope *S, const expr *e) {
  val *args[64];
  int n = e->nargs;
  for (int i = 0; i < n; i++)
    if (!(args[i] = eval(R, S, e->args[i]))) return NULL;
  if (e->a->k == E_VAR && !lookup(S, e->a->name)) {
    const char *f = e->a->name;
    if (!strcmp(f, "raise_exception")) {
      sbuf b = {0};
      if (n > 0) str_of(&b, args[0]);
      rfail(R, "%s", b.s ? b.s : "");
      free(b.s);
      return NULL;
    }
    if (!strcmp(f, "namespace")) {
      val *d = nv(R, V_DICT);
      if (!d) return NULL;
      d->ns = 1;
      for (int i = 0; i < n; i++) {
        if (e->kw[i]) {
          if (dict_set(R, d, e->kw[i], strlen(e->kw[i]), args[i])) return NULL;
        } else if (args[i]->t == V_DICT) {
          for (size_t k = 0; k < args[i]->n; k++)
            if (dict_set(R, d, args[i]->k[k], args[i]->kn[k], args[i]->a[k])) return NULL;
        }
      }
      return d;
    }
    if (!strcmp(f, "range")) {
      long long a = 0, b = 0, st = 1;
      for (int i = 0; i < n; i++)
        if (args[i]->t != V_INT && args[i]->t != V_BOOL) {
          rfail(R, "TypeError: range() arguments must be integers");
          return NULL;
        }
      if (n == 1) b = args[0]->i;
      if (n >= 2) {
        a = args[0]->i;
        b = args[1]->i;
      }
      if (n >= 3) st = args[2]->i;
      if (n < 1 || n > 3 || st == 0) {
        rfail(R, "TypeError: bad range() arguments");
        return NULL;
      }
      val *r = nv(R, V_LIST);
      for (long long k = a; r && (st > 0 ? k < b : k > b); k += st) {
        if (r->n >= 100000) {
          rfail(R, "range too big");
          return NULL;
        }
        if (list_push(R, r, mkint(R, k))) return NULL;
      }
      return r;
    }
    rfail(R, "UndefinedError: '%s' is undefined", f);
    return NULL;
  }
  val *f = eval(R, S, e->a);
  if (!f) return NULL;
  if (f->t == V_FUNC) return call_method(R, f, args, n);
  if (f->t == V_UNDEF)
    rfail(R, "UndefinedError: '%s' is undefined", f->name ? f->name : "value");
  else
    rfail(R, "TypeError: '%s' object is not callable", type_name(f));
  return NULL;
}

static val *iterate(rctx *R, val *v) {
  if (v->t == V_LIST) return v;
  val *r = nv(R, V_LIST);
  if (!r) return NULL;
  if (v->t == V_UNDEF) return r; /* Jinja iterates an undefined as empty */
  if (v->t == V_DICT && !v->ns) {
    for (size_t i = 0; i < v->n; i++)
      if (list_push(R, r, mkstr(R, v->k[i], v->kn[i]))) return NULL;
    return r;
  }
  if (v->t == V_STR) {
    for (size_t i = 0; i < v->n;) {
      size_t l = 1;
      while (i + l < v->n && ((unsigned char)v->s[i + l] & 0xC0) == 0x80) l++;
      if (list_push(R, r, mkstr(R, v->s + i, l))) return NULL;
      i += l;
    }
    return r;
  }
  rfail(R, "TypeError: '%s' object is not iterable", type_name(v));
  return NULL;
}

static val *filter(rctx *R, scope *S, const expr *e) {
  val *x = eval(R, S, e->a);
  if (!x) return NULL;
  val *args[64];
  for (int i = 0; i < e->nargs; i++)
    if (!(args[i] = eval(R, S, e->args[i]))) return NULL;
  const char *f = e->name;
  int n = e->nargs;
  if (!strcmp(f, "default") || !strcmp(f, "d")) {
    int boolean = n > 1 && truthy(args[1]);
    if (x->t == V_UNDEF || (boolean && !truthy(x))) return n > 0 ? args[0] : mkstr(R, "", 0);
    return x;
  }
  if (!strcmp(f, "safe")) return x;
  if (x->t == V_UNDEF && strcmp(f, "string") && strcmp(f, "length") && strcmp(f, "count") &&
      strcmp(f, "list")) {
    rfail(R, "UndefinedError: '%s' is undefined", x->name ? x->name : "value");
    return NULL;
  }
  if (!strcmp(f, "trim")) {
    val *s = str_val(R, x);
    if (!s) return NULL;
    if (n > 0 && args[0]->t == V_STR) {
      val fv = {.t = V_FUNC, .name = "strip", .self = s};
      return call_method(R, &fv, args, 1);
    }
    return strip(R, s, 1, 1);
  }
  if (!strcmp(f, "length") || !strcmp(f, "count")) {
    if (x->t == V_STR) return mkint(R, (long long)cp_len(x->s, x->n));
    if (x->t == V_LIST || (x->t == V_DICT && !x->ns)) return mkint(R, (long long)x->n);
    if (x->t == V_UNDEF) return mkint(R, 0);
    rfail(R, "TypeError: object of type '%s' has no len()", type_name(x));
    return NULL;
  }
  if (!strcmp(f, "upper") || !strcmp(f, "lower") || !strcmp(f, "capitalize") || !strcmp(f, "title")) {
    val *s = str_val(R, x);
    int mode = f[0] == 'l' ? 0 : f[0] == 'u' ? 1 : f[0] == 'c' ? 2 : 3;
    return s ? ascii_case(R, s, mode) : NULL;
  }
  if (!strcmp(f, "string")) return str_val(R, x);
  if (!strcmp(f, "first") || !strcmp(f, "last")) {
    val *l = iterate(R, x);
    if (!l) return NULL;
    if (!l->n) return undef(R, NULL);
    return f[0] == 'f' ? l->a[0] : l->a[l->n - 1];
  }
  if (!strcmp(f, "list")) return iterate(R, x);
  if (!strcmp(f, "reverse")) {
    if (x->t == V_STR) {
      val *ps[3] = {NULL, NULL, mkint(R, -1)};
      return slice_(R, x, ps);
    }
    val *l = iterate(R, x), *r = l ? nv(R, V_LIST) : NULL;
    for (size_t i = l ? l->n : 0; r && i > 0; i--)
      if (list_push(R, r, l->a[i - 1])) return NULL;
    return r;
  }
  if (!strcmp(f, "join")) {
    val *l = iterate(R, x);
    if (!l) return NULL;
    sbuf b = {0};
    for (size_t i = 0; i < l->n; i++) {
      if (i && n > 0) str_of(&b, args[0]);
      str_of(&b, l->a[i]);
    }
    val *r = b.fail ? NULL : mkstr(R, b.s ? b.s : "", b.n);
    free(b.s);
    return r;
  }
  if (!strcmp(f, "int") || !strcmp(f, "float")) {
    double d = 0;
    if (is_num(x))
      d = num(x);
    else if (x->t == V_STR) {
      char *end;
      d = strtod(x->s, &end);
      if (end == x->s) d = n > 0 && is_num(args[0]) ? num(args[0]) : 0;
    }
    if (f[0] == 'i') return x->t == V_INT ? x : mkint(R, (long long)d);
    return mkfloat(R, d);
  }
  if (!strcmp(f, "abs")) {
    if (x->t == V_FLOAT) return mkfloat(R, fabs(x->f));
    if (is_num(x)) return mkint(R, x->i < 0 ? -x->i : x->i);
    rfail(R, "TypeError: bad operand type for abs(): '%s'", type_name(x));
    return NULL;
  }
  if (!strcmp(f, "replace")) {
    val *s = str_val(R, x);
    if (!s) return NULL;
    if (n < 2) {
      rfail(R, "TypeError: replace expected 2 arguments");
      return NULL;
    }
    return replace(R, s, args[0], args[1]);
  }
  if (!strcmp(f, "items")) {
    if (x->t != V_DICT || x->ns) {
      rfail(R, "TypeError: items() of a %s", type_name(x));
      return NULL;
    }
    val fv = {.t = V_FUNC, .name = "items", .self = x};
    return call_method(R, &fv, NULL, 0);
  }
  if (!strcmp(f, "tojson")) { /* HF's tojson(x, ensure_ascii=False, indent=None, ..., sort_keys=False) */
    int indent = -1, sort = 0;
    for (int i = 0; i < n; i++) {
      const char *kw = e->kw[i] ? e->kw[i] : "";
      if (!strcmp(kw, "indent") && (args[i]->t == V_INT || args[i]->t == V_NONE))
        indent = args[i]->t == V_INT ? (int)(args[i]->i < 0 ? 0 : args[i]->i > 64 ? 64 : args[i]->i) : -1;
      else if (!strcmp(kw, "sort_keys"))
        sort = truthy(args[i]);
      else if (!strcmp(kw, "ensure_ascii") && !truthy(args[i]))
        continue;
      else {
        rfail(R, "tojson: unsupported argument %s", *kw ? kw : "(positional)");
        return NULL;
      }
    }
    sbuf b = {0};
    int rc = to_json_at(R, &b, x, indent, sort, 0);
    val *r = rc || b.fail ? NULL : mkstr(R, b.s ? b.s : "", b.n);
    free(b.s);
    return r;
  }
  rfail(R, "no filter named '%s'", f);
  return NULL;
}

static val *test(rctx *R, scope *S, const expr *e) {
  val *x = eval(R, S, e->a);
  if (!x) return NULL;
  val *arg = NULL;
  if (e->nargs > 0 && !(arg = eval(R, S, e->args[0]))) return NULL;
  const char *t = e->name;
  int r;
  if (!strcmp(t, "defined"))
    r = x->t != V_UNDEF;
  else if (!strcmp(t, "undefined"))
    r = x->t == V_UNDEF;
  else if (!strcmp(t, "none"))
    r = x->t == V_NONE;
  else if (!strcmp(t, "string"))
    r = x->t == V_STR;
  else if (!strcmp(t, "number"))
    r = is_num(x);
  else if (!strcmp(t, "integer"))
    r = x->t == V_INT;
  else if (!strcmp(t, "float"))
    r = x->t == V_FLOAT;
  else if (!strcmp(t, "boolean"))
    r = x->t == V_BOOL;
  else if (!strcmp(t, "true"))
    r = x->t == V_BOOL && x->i;
  else if (!strcmp(t, "false"))
    r = x->t == V_BOOL && !x->i;
  else if (!strcmp(t, "mapping"))
    r = x->t == V_DICT && !x->ns;
  else if (!strcmp(t, "iterable"))
    r = x->t == V_STR || x->t == V_LIST || (x->t == V_DICT && !x->ns);
  else if (!strcmp(t, "sequence"))
    r = x->t == V_STR || x->t == V_LIST || (x->t == V_DICT && !x->ns);
  else if (!strcmp(t, "odd") || !strcmp(t, "even") || !strcmp(t, "divisibleby")) {
    long long d = t[0] == 'd' ? (arg && (arg->t == V_INT || arg->t == V_BOOL) ? arg->i : 0) : 2;
    if ((x->t != V_INT && x->t != V_BOOL) || d == 0) {
      rfail(R, "TypeError: test '%s' needs integers", t);
      return NULL;
    }
    long long m = d == -1 ? 0 : x->i % d;
    r = t[0] == 'o' ? m != 0 : m == 0;
  } else if (!strcmp(t, "eq") || !strcmp(t, "equalto")) {
    r = arg && eq(x, arg);
  } else if (!strcmp(t, "sameas")) {
    r = arg && (x == arg || (x->t == arg->t && (x->t == V_NONE || x->t == V_BOOL) && x->i == arg->i));
  } else {
    rfail(R, "no test named '%s'", t);
    return NULL;
  }
  return mkbool(e->negate ? !r : r);
}

static val *eval(rctx *R, scope *S, const expr *e) {
  if (++R->ops > MAX_OPS) {
    rfail(R, "the template takes too long to render (over %d operations)", MAX_OPS);
    return NULL;
  }
  if (++R->depth > MAX_DEPTH * 4) {
    rfail(R, "expression nested too deeply");
    return NULL;
  }
  val *r = NULL, *a, *b;
  switch (e->k) {
  case E_LIT: r = e->lit; break;
  case E_VAR:
    r = lookup(S, e->name);
    if (!r) r = undef(R, e->name);
    break;
  case E_ATTR:
    if ((a = eval(R, S, e->a))) r = getattr_(R, a, e->name, strlen(e->name));
    break;
  case E_INDEX:
    if ((a = eval(R, S, e->a)) && (b = eval(R, S, e->b))) r = index_(R, a, b);
    break;
  case E_SLICE: {
    val *parts[3] = {NULL, NULL, NULL};
    if (!(a = eval(R, S, e->a))) break;
    int ok = 1;
    for (int p = 0; p < 3 && ok; p++)
      if (e->args[p] && !(parts[p] = eval(R, S, e->args[p]))) ok = 0;
    if (ok) r = slice_(R, a, parts);
    break;
  }
  case E_CALL: r = call(R, S, e); break;
  case E_FILTER: r = filter(R, S, e); break;
  case E_TEST: r = test(R, S, e); break;
  case E_BIN:
    if ((a = eval(R, S, e->a)) && (b = eval(R, S, e->b))) r = add(R, a, b, e->op);
    break;
  case E_CMP: {
    val *x = eval(R, S, e->args[0]);
    r = &TRUE_;
    for (int i = 1; x && i < e->nargs; i++) {
      val *y = eval(R, S, e->args[i]);
      if (!y) {
        x = NULL;
        break;
      }
      const char *op = e->ops[i - 1];
      int ok = 0, c = 0;
      if (!strcmp(op, "=="))
        ok = eq(x, y);
      else if (!strcmp(op, "!="))
        ok = !eq(x, y);
      else if (!strcmp(op, "in") || !strcmp(op, "ni")) {
        if (contains(R, y, x, &ok)) {
          x = NULL;
          break;
        }
        if (op[0] == 'n') ok = !ok;
      } else {
        if (order(R, x, y, op, &c)) {
          x = NULL;
          break;
        }
        ok = !strcmp(op, "<") ? c < 0 : !strcmp(op, "<=") ? c <= 0 : !strcmp(op, ">") ? c > 0 : c >= 0;
      }
      if (!ok) {
        r = &FALSE_;
        break;
      }
      x = y;
    }
    if (!x) r = NULL;
    break;
  }
  case E_NOT:
    if ((a = eval(R, S, e->a))) r = mkbool(!truthy(a));
    break;
  case E_NEG:
  case E_POS:
    if ((a = eval(R, S, e->a))) {
      if (a->t == V_FLOAT)
        r = mkfloat(R, e->k == E_NEG ? -a->f : a->f);
      else if (is_num(a))
        r = mkint(R, e->k == E_NEG ? (long long)(0ULL - (unsigned long long)a->i) : a->i);
      else
        rfail(R, "TypeError: bad operand type for unary -: '%s'", type_name(a));
    }
    break;
  case E_AND: /* Python's and/or return an operand */
    if ((a = eval(R, S, e->a))) r = truthy(a) ? eval(R, S, e->b) : a;
    break;
  case E_OR:
    if ((a = eval(R, S, e->a))) r = truthy(a) ? a : eval(R, S, e->b);
    break;
  case E_COND:
    if ((a = eval(R, S, e->b))) r = truthy(a) ? eval(R, S, e->a) : e->c ? eval(R, S, e->c) : undef(R, NULL);
    break;
  case E_LIST:
    r = nv(R, V_LIST);
    for (int i = 0; r && i < e->nargs; i++) {
      val *x = eval(R, S, e->args[i]);
      if (!x || list_push(R, r, x)) r = NULL;
    }
    break;
  case E_DICT:
    r = nv(R, V_DICT);
    for (int i = 0; r && i + 1 < e->nargs; i += 2) {
      val *k = eval(R, S, e->args[i]), *x = k ? eval(R, S, e->args[i + 1]) : NULL;
      if (!x) {
        r = NULL;
      } else if (k->t != V_STR) {
        rfail(R, "dict keys must be strings here");
        r = NULL;
      } else if (dict_set(R, r, k->s, k->n, x)) {
        r = NULL;
      }
    }
    break;
  default: rfail(R, "bad expression");
  }
  R->depth--;
  if (!r && !R->err[0]) rfail(R, "out of memory");
  return r;
}

static int emit(rctx *R, const char *s, size_t n) {
  if (R->len + n > OUT_CAP) return rfail(R, "the rendered prompt is over %u bytes", OUT_CAP);
  if (R->len + n + 1 > R->cap) {
    size_t cap = R->cap ? R->cap : 1024;
    while (cap < R->len + n + 1) cap *= 2;
    char *o = realloc(R->out, cap);
    if (!o) return rfail(R, "out of memory");
    R->out = o;
    R->cap = cap;
  }
  memcpy(R->out + R->len, s, n);
  R->len += n;
  R->out[R->len] = '\0';
  return 0;
}

static int run(rctx *R, scope *S, const node *n);

static int run_for(rctx *R, scope *S, const node *n) {
  val *it = eval(R, S, n->e);
  if (!it) return -1;
  val *l = iterate(R, it);
  if (!l) return -1;
  /* a filtered loop: loop.* counts the kept items (Jinja filters first) */
  if (n->filter) {
    val *kept = nv(R, V_LIST);
    if (!kept) return -1;
    for (size_t i = 0; i < l->n; i++) {
      scope in = {.up = S};
      if (n->n_target == 1 ? scope_set(R, &in, n->target[0], l->a[i]) : 0) return -1;
      if (n->n_target == 2) {
        val *p = l->a[i];
        if (p->t != V_LIST || p->n != 2) return rfail(R, "ValueError: cannot unpack into 2 names");
        if (scope_set(R, &in, n->target[0], p->a[0]) || scope_set(R, &in, n->target[1], p->a[1])) return -1;
      }
      val *c = eval(R, &in, n->filter);
      if (!c) return -1;
      if (truthy(c) && list_push(R, kept, l->a[i])) return -1;
    }
    l = kept;
  }
  if (l->n == 0) return n->bodies[1] ? run(R, S, n->bodies[1]) : 0;
  for (size_t i = 0; i < l->n; i++) {
    if (++R->ops > MAX_OPS)
      return rfail(R, "the template takes too long to render (over %d operations)", MAX_OPS);
    scope in = {.up = S};
    val *loop = nv(R, V_DICT);
    if (!loop) return -1;
    long long len = (long long)l->n, k = (long long)i;
    if (dict_set(R, loop, "index0", 6, mkint(R, k)) || dict_set(R, loop, "index", 5, mkint(R, k + 1)) ||
        dict_set(R, loop, "revindex0", 9, mkint(R, len - k - 1)) ||
        dict_set(R, loop, "revindex", 8, mkint(R, len - k)) ||
        dict_set(R, loop, "first", 5, mkbool(i == 0)) ||
        dict_set(R, loop, "last", 4, mkbool(i + 1 == l->n)) ||
        dict_set(R, loop, "length", 6, mkint(R, len)) ||
        dict_set(R, loop, "previtem", 8, i ? l->a[i - 1] : undef(R, "previtem")) ||
        dict_set(R, loop, "nextitem", 8, i + 1 < l->n ? l->a[i + 1] : undef(R, "nextitem")) ||
        scope_set(R, &in, "loop", loop))
      return -1;
    if (n->n_target == 1) {
      if (scope_set(R, &in, n->target[0], l->a[i])) return -1;
    } else {
      val *p = l->a[i];
      if (p->t != V_LIST || p->n != 2) return rfail(R, "ValueError: cannot unpack into 2 names");
      if (scope_set(R, &in, n->target[0], p->a[0]) || scope_set(R, &in, n->target[1], p->a[1])) return -1;
    }
    if (run(R, &in, n->bodies[0])) return -1;
    R->cont = 0;
    if (R->brk) {
      R->brk = 0;
      break;
    }
  }
  return 0;
}

static int run(rctx *R, scope *S, const node *n) {
  if (++R->depth > MAX_DEPTH * 4) return rfail(R, "blocks nested too deeply");
  int rc = 0;
  for (; n && !rc && !R->brk && !R->cont; n = n->next) {
    switch (n->k) {
    case N_TEXT: rc = emit(R, n->text, n->len); break;
    case N_OUT: {
      val *v = eval(R, S, n->e);
      if (!v) {
        rc = -1;
        break;
      }
      if (v->t == V_STR) {
        rc = emit(R, v->s, v->n);
      } else {
        sbuf b = {0};
        str_of(&b, v);
        rc = b.fail ? rfail(R, "%s", sb_why(&b)) : emit(R, b.s ? b.s : "", b.n);
        free(b.s);
      }
      break;
    }
    case N_IF: {
      const node *body = n->else_body;
      for (int i = 0; i < n->n_br; i++) {
        val *c = eval(R, S, n->conds[i]);
        if (!c) {
          rc = -1;
          break;
        }
        if (truthy(c)) {
          body = n->bodies[i];
          break;
        }
      }
      if (!rc) rc = run(R, S, body);
      break;
    }
    case N_FOR: rc = run_for(R, S, n); break;
    case N_SET: {
      val *v = eval(R, S, n->e);
      if (!v) {
        rc = -1;
        break;
      }
      if (n->attr) {
        val *o = lookup(S, n->target[0]);
        if (!o || o->t != V_DICT || !o->ns) {
          rc = rfail(R, "cannot assign attribute on non-namespace object '%s'", n->target[0]);
          break;
        }
        rc = dict_set(R, o, n->attr, strlen(n->attr), v);
      } else {
        rc = scope_set(R, S, n->target[0], v);
      }
      break;
    }
    case N_BREAK: R->brk = 1; break;
    case N_CONTINUE: R->cont = 1; break;
    default: rc = rfail(R, "bad node");
    }
    if (R->err[0]) rc = -1;
  }
  R->depth--;
  return rc;
}

int ot_chat_template_render(const ot_chat_template *t, const ot_chat_msg *msgs, size_t n_msgs,
                            const ot_chat_vars *vars, char **out, size_t *out_len) {
  if (!t || (!msgs && n_msgs) || !out)
    return ot_error(OT_ERR_INVALID, "ot_chat_template_render: NULL argument");
  rctx R;
  memset(&R, 0, sizeof R);
  scope top = {0};
  val *list = nv(&R, V_LIST);
  for (size_t i = 0; list && i < n_msgs; i++) {
    val *m = nv(&R, V_DICT);
    val *role =
        m ? mkstr(&R, msgs[i].role ? msgs[i].role : "", msgs[i].role ? strlen(msgs[i].role) : 0) : NULL;
    val *content =
        role ? (msgs[i].content ? mkstr(&R, msgs[i].content, strlen(msgs[i].content)) : &NONE) : NULL;
    if (!content || dict_set(&R, m, "role", 4, role) || dict_set(&R, m, "content", 7, content) ||
        list_push(&R, list, m))
      list = NULL;
  }
  int rc = list ? scope_set(&R, &top, "messages", list) : -1;
  const char *names[] = {"bos_token", "eos_token", "unk_token", "pad_token"};
  const char *vals[] = {vars ? vars->bos_token : NULL, vars ? vars->eos_token : NULL,
                        vars ? vars->unk_token : NULL, vars ? vars->pad_token : NULL};
  for (int i = 0; i < 4 && !rc; i++)
    if (vals[i]) {
      val *v = mkstr(&R, vals[i], strlen(vals[i]));
      rc = v ? scope_set(&R, &top, names[i], v) : -1;
    }
  if (!rc) rc = scope_set(&R, &top, "add_generation_prompt", mkbool(vars && vars->add_generation_prompt));
  if (!rc) rc = run(&R, &top, t->root);
  if (rc || R.err[0]) {
    int st = strstr(R.err, "out of memory") ? OT_ERR_NOMEM : OT_ERR_INVALID;
    ot_error(st, "%s", R.err[0] ? R.err : "out of memory");
    free(R.out);
    ar_free(&R.ar);
    return st;
  }
  if (!R.out && emit(&R, "", 0)) {
    ar_free(&R.ar);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  ar_free(&R.ar);
  *out = R.out;
  if (out_len) *out_len = R.len;
  return OT_OK;
}

/* ---- tokenizer_config.json ----------------------------------------------------------------- */

static char *token_text(const cJSON *v) {
  if (cJSON_IsString(v)) return strdup(v->valuestring);
  if (cJSON_IsObject(v)) {
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(v, "content");
    if (cJSON_IsString(c)) return strdup(c->valuestring);
  }
  return NULL;
}

static int add_special(ot_chat_config *c, const char *s) {
  if (!s || !*s) return OT_OK;
  for (int i = 0; i < c->n_specials; i++)
    if (strcmp(c->specials[i], s) == 0) return OT_OK;
  char **a = realloc(c->specials, (size_t)(c->n_specials + 1) * sizeof *a);
  if (!a) return OT_ERR_NOMEM;
  c->specials = a;
  if (!(a[c->n_specials] = strdup(s))) return OT_ERR_NOMEM;
  c->n_specials++;
  return OT_OK;
}

int ot_chat_config_parse(const char *json, size_t len, const char *where, ot_chat_config **out) {
  if (!json || !out) return ot_error(OT_ERR_INVALID, "ot_chat_config_parse: NULL argument");
  if (!where) where = "tokenizer_config.json";
  cJSON *j = cJSON_ParseWithLength(json, len);
  if (!j || !cJSON_IsObject(j)) {
    cJSON_Delete(j);
    return ot_error(OT_ERR_FORMAT, "%s: not a JSON object", where);
  }
  ot_chat_config *c = calloc(1, sizeof *c);
  if (!c) {
    cJSON_Delete(j);
    return ot_error(OT_ERR_NOMEM, "out of memory");
  }
  int rc = OT_OK;
  char **slots[] = {&c->bos_token, &c->eos_token, &c->unk_token, &c->pad_token};
  const char *keys[] = {"bos_token", "eos_token", "unk_token", "pad_token"};
  for (int i = 0; i < 4; i++) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, keys[i]);
    if (!v || cJSON_IsNull(v)) continue;
    if (!(*slots[i] = token_text(v))) {
      rc = ot_error(OT_ERR_FORMAT, "%s: '%s' must be a string or an object with \"content\"", where, keys[i]);
      break;
    }
    if (add_special(c, *slots[i])) rc = ot_error(OT_ERR_NOMEM, "out of memory");
  }
  const cJSON *added = cJSON_GetObjectItemCaseSensitive(j, "added_tokens_decoder"), *a;
  if (cJSON_IsObject(added)) cJSON_ArrayForEach(a, added) {
      const cJSON *sp = cJSON_GetObjectItemCaseSensitive(a, "special");
      char *s = cJSON_IsTrue(sp) ? token_text(a) : NULL;
      if (s && add_special(c, s)) rc = ot_error(OT_ERR_NOMEM, "out of memory");
      free(s);
    }
  if (rc == OT_OK && add_special(c, "<|endoftext|>")) rc = ot_error(OT_ERR_NOMEM, "out of memory");
  const cJSON *ct = cJSON_GetObjectItemCaseSensitive(j, "chat_template");
  const char *src = NULL;
  if (rc == OT_OK && ct && !cJSON_IsNull(ct)) {
    if (cJSON_IsString(ct)) {
      src = ct->valuestring;
    } else if (cJSON_IsArray(ct)) { /* named templates: the "default" one */
      const cJSON *e;
      cJSON_ArrayForEach(e, ct) {
        const cJSON *nm = cJSON_GetObjectItemCaseSensitive(e, "name"),
                    *tp = cJSON_GetObjectItemCaseSensitive(e, "template");
        if (cJSON_IsString(nm) && cJSON_IsString(tp) && strcmp(nm->valuestring, "default") == 0)
          src = tp->valuestring;
      }
      if (!src)
        rc = ot_error(OT_ERR_FORMAT, "%s: 'chat_template' is a list without a \"default\" template", where);
    } else {
      rc = ot_error(OT_ERR_FORMAT, "%s: 'chat_template' must be a string", where);
    }
  }
  if (rc == OT_OK && src && ot_chat_template_parse(src, strlen(src), &c->tmpl) != OT_OK) {
    char d[512];
    snprintf(d, sizeof d, "%s", ot_error_detail());
    rc = ot_error(OT_ERR_FORMAT, "%s: %s", where, d);
  }
  cJSON_Delete(j);
  if (rc) {
    ot_chat_config_free(c);
    return rc;
  }
  *out = c;
  return OT_OK;
}

int ot_chat_config_load_dir(const char *dir, ot_chat_config **out) {
  if (!dir || !out) return ot_error(OT_ERR_INVALID, "ot_chat_config_load_dir: NULL argument");
  char path[4096];
  snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
  FILE *f = fopen(path, "rb");
  if (!f) {
    if (errno != ENOENT) return ot_error(OT_ERR_IO, "%s: %s", path, strerror(errno));
    ot_chat_config *c = calloc(1, sizeof *c);
    if (!c || add_special(c, "<|endoftext|>")) {
      ot_chat_config_free(c);
      return ot_error(OT_ERR_NOMEM, "out of memory");
    }
    *out = c;
    return OT_OK;
  }
  char *buf = NULL;
  size_t n = 0, cap = 0;
  int rc = OT_OK;
  for (;;) {
    if (n + 65536 > cap) {
      if (cap > (64u << 20)) {
        rc = ot_error(OT_ERR_FORMAT, "%s: too large", path);
        break;
      }
      char *b = realloc(buf, cap = cap ? cap * 2 : 65536 * 2);
      if (!b) {
        rc = ot_error(OT_ERR_NOMEM, "out of memory");
        break;
      }
      buf = b;
    }
    size_t r = fread(buf + n, 1, cap - n, f);
    n += r;
    if (r == 0) break;
  }
  if (rc == OT_OK && ferror(f)) rc = ot_error(OT_ERR_IO, "%s: read error", path);
  fclose(f);
  if (rc == OT_OK) rc = ot_chat_config_parse(buf, n, path, out);
  free(buf);
  return rc;
}

void ot_chat_config_free(ot_chat_config *c) {
  if (!c) return;
  ot_chat_template_free(c->tmpl);
  free(c->bos_token);
  free(c->eos_token);
  free(c->unk_token);
  free(c->pad_token);
  for (int i = 0; i < c->n_specials; i++) free(c->specials[i]);
  free(c->specials);
  free(c);
}

int ot_chat_encode(const ot_chat_config *c, const ot_tokenizer *tok, const char *text, size_t len,
                   int32_t **ids, size_t *n_ids) {
  if (!tok || !ids || !n_ids) return ot_error(OT_ERR_INVALID, "ot_chat_encode: no tokenizer");
  int32_t *all = NULL;
  size_t n = 0, cap = 0;
  int rc = OT_OK;
  size_t pos = 0;
  while (pos <= len && rc == OT_OK) {
    /* the earliest special token at or after pos (the longest on a tie) that the vocabulary has */
    size_t best = len, blen = 0;
    int32_t bid = -1;
    for (int i = 0; c && i < c->n_specials; i++) {
      size_t sl = strlen(c->specials[i]);
      int32_t id;
      if (sl == 0 || sl > len - pos) continue;
      const char *hit = memmem(text + pos, len - pos, c->specials[i], sl);
      if (!hit) continue;
      size_t at = (size_t)(hit - text);
      if ((at < best || (at == best && sl > blen)) &&
          ot_tokenizer_token_id(tok, c->specials[i], &id) == OT_OK) {
        best = at;
        blen = sl;
        bid = id;
      }
    }
    int32_t *part = NULL;
    size_t np = 0;
    if (best > pos && (rc = ot_tokenizer_encode(tok, text + pos, best - pos, &part, &np)) != OT_OK) break;
    size_t need = n + np + (bid >= 0);
    if (need > cap) {
      size_t nc = cap ? cap : 256;
      while (nc < need) nc *= 2;
      int32_t *a = realloc(all, nc * sizeof *a);
      if (!a) {
        free(part);
        rc = ot_error(OT_ERR_NOMEM, "out of memory");
        break;
      }
      all = a;
      cap = nc;
    }
    if (np) memcpy(all + n, part, np * sizeof *part);
    n += np;
    free(part);
    if (bid < 0) break;
    all[n++] = bid;
    pos = best + blen;
  }
  if (rc) {
    free(all);
    return rc;
  }
  if (!all && !(all = malloc(sizeof *all))) return ot_error(OT_ERR_NOMEM, "out of memory");
  *ids = all;
  *n_ids = n;
  return OT_OK;
}
