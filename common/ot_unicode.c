#include "ot_unicode.h"

#include "ot_error.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "ot_nfc_table.h"
#include "ot_unicode_table.h"

int ot_unicode_class(uint32_t cp) {
  if (cp < 128) return ot_uc_ascii[cp];
  size_t lo = 0, hi = sizeof ot_uc_ranges / sizeof ot_uc_ranges[0];
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (cp < ot_uc_ranges[mid].lo)
      hi = mid;
    else if (cp > ot_uc_ranges[mid].hi)
      lo = mid + 1;
    else
      return ot_uc_ranges[mid].cls;
  }
  return OT_UC_OTHER;
}

size_t ot_utf8_decode(const uint8_t *s, size_t n, uint32_t *cp) {
  uint32_t b0 = s[0];
  *cp = b0;
  if (b0 < 0x80) return 1;
  size_t len;
  uint32_t c, min;
  if (b0 >= 0xC2 && b0 <= 0xDF)
    len = 2, c = b0 & 0x1F, min = 0x80;
  else if (b0 >= 0xE0 && b0 <= 0xEF)
    len = 3, c = b0 & 0x0F, min = 0x800;
  else if (b0 >= 0xF0 && b0 <= 0xF4)
    len = 4, c = b0 & 0x07, min = 0x10000;
  else
    return 0; /* continuation byte, C0/C1 (always overlong) or F5..FF */
  if (n < len) return 0;
  for (size_t i = 1; i < len; i++) {
    if ((s[i] & 0xC0) != 0x80) return 0;
    c = (c << 6) | (s[i] & 0x3F);
  }
  if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return 0;
  *cp = c;
  return len;
}

/* ------------------------------------------------------------------ NFC */

#define HANGUL_S 0xAC00u
#define HANGUL_L 0x1100u
#define HANGUL_V 0x1161u
#define HANGUL_T 0x11A7u
#define HANGUL_NV 21u
#define HANGUL_NT 28u
#define HANGUL_COUNT 11172u
#define RAW_BYTE 0x80000000u /* an invalid byte kept as it is: a starter that never composes */

static int nfc_ccc(uint32_t cp) {
  size_t lo = 0, hi = sizeof ot_nfc_ccc / sizeof ot_nfc_ccc[0];
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (ot_nfc_ccc[mid][0] == cp) return (int)ot_nfc_ccc[mid][1];
    if (ot_nfc_ccc[mid][0] < cp)
      lo = mid + 1;
    else
      hi = mid;
  }
  return 0;
}

static const uint32_t *nfc_dec(uint32_t cp, size_t *len) {
  size_t lo = 0, hi = sizeof ot_nfc_dec / sizeof ot_nfc_dec[0];
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (ot_nfc_dec[mid][0] == cp) {
      *len = ot_nfc_dec[mid][2];
      return ot_nfc_dec_cps + ot_nfc_dec[mid][1];
    }
    if (ot_nfc_dec[mid][0] < cp)
      lo = mid + 1;
    else
      hi = mid;
  }
  return NULL;
}

/* The primary composite of (a, b), or 0. */
static uint32_t nfc_compose(uint32_t a, uint32_t b) {
  if (a >= HANGUL_L && a < HANGUL_L + 19 && b >= HANGUL_V && b < HANGUL_V + HANGUL_NV)
    return HANGUL_S + ((a - HANGUL_L) * HANGUL_NV + (b - HANGUL_V)) * HANGUL_NT;
  if (a >= HANGUL_S && a < HANGUL_S + HANGUL_COUNT && (a - HANGUL_S) % HANGUL_NT == 0 && b > HANGUL_T &&
      b < HANGUL_T + HANGUL_NT)
    return a + (b - HANGUL_T);
  size_t lo = 0, hi = sizeof ot_nfc_comp / sizeof ot_nfc_comp[0];
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const uint32_t *e = ot_nfc_comp[mid];
    if (e[0] == a && e[1] == b) return e[2];
    if (e[0] < a || (e[0] == a && e[1] < b))
      lo = mid + 1;
    else
      hi = mid;
  }
  return 0;
}

static bool nfc_refused(uint32_t cp) {
  size_t lo = 0, hi = sizeof ot_nfc_refuse / sizeof ot_nfc_refuse[0];
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (ot_nfc_refuse[mid] == cp) return true;
    if (ot_nfc_refuse[mid] < cp)
      lo = mid + 1;
    else
      hi = mid;
  }
  return false;
}

static size_t utf8_encode(uint32_t cp, uint8_t *o) {
  if (cp & RAW_BYTE) {
    o[0] = (uint8_t)cp;
    return 1;
  }
  if (cp < 0x80) {
    o[0] = (uint8_t)cp;
    return 1;
  }
  if (cp < 0x800) {
    o[0] = (uint8_t)(0xC0 | (cp >> 6));
    o[1] = (uint8_t)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    o[0] = (uint8_t)(0xE0 | (cp >> 12));
    o[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    o[2] = (uint8_t)(0x80 | (cp & 0x3F));
    return 3;
  }
  o[0] = (uint8_t)(0xF0 | (cp >> 18));
  o[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
  o[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
  o[3] = (uint8_t)(0x80 | (cp & 0x3F));
  return 4;
}

int ot_utf8_nfc(const uint8_t *s, size_t n, uint8_t **out, size_t *out_len) {
  if ((!s && n) || !out || !out_len) return ot_error(OT_ERR_INVALID, "ot_utf8_nfc: NULL argument");
  bool simple = true; /* no code point from U+0300 on (lead byte 0xCC and up): already NFC */
  for (size_t i = 0; i < n && simple; i++) simple = s[i] < 0xCC;
  if (simple || n > SIZE_MAX / (4 * sizeof(uint32_t))) {
    if (!simple) return ot_error(OT_ERR_RANGE, "text of %zu bytes too long to normalize", n);
    uint8_t *o = malloc(n ? n : 1);
    if (!o) return ot_error(OT_ERR_NOMEM, "cannot allocate %zu bytes for NFC", n);
    if (n) memcpy(o, s, n);
    *out = o;
    *out_len = n;
    return OT_OK;
  }
  /* Decompose (at most 4 code points per input byte's character: Hangul gives 3, tables 4). */
  uint32_t *d = malloc(4 * (n + 1) * sizeof *d);
  uint8_t *o = NULL;
  if (!d) return ot_error(OT_ERR_NOMEM, "cannot allocate NFC scratch for %zu bytes", n);
  size_t m = 0;
  for (size_t i = 0; i < n;) {
    uint32_t cp;
    size_t l = ot_utf8_decode(s + i, n - i, &cp);
    if (l == 0) {
      d[m++] = RAW_BYTE | s[i++];
      continue;
    }
    i += l;
    if (nfc_refused(cp)) {
      free(d);
      return ot_error(OT_ERR_UNSUPPORTED,
                      "U+%04X: its NFC normalization is newer than offtune's Unicode tables "
                      "(scripts/gen_nfc_table.py)",
                      cp);
    }
    size_t dl = 0;
    const uint32_t *dc;
    if (cp >= HANGUL_S && cp < HANGUL_S + HANGUL_COUNT) {
      uint32_t x = cp - HANGUL_S;
      d[m++] = HANGUL_L + x / (HANGUL_NV * HANGUL_NT);
      d[m++] = HANGUL_V + (x % (HANGUL_NV * HANGUL_NT)) / HANGUL_NT;
      if (x % HANGUL_NT) d[m++] = HANGUL_T + x % HANGUL_NT;
    } else if ((dc = nfc_dec(cp, &dl)) != NULL) {
      for (size_t k = 0; k < dl; k++) d[m++] = dc[k];
    } else {
      d[m++] = cp;
    }
  }
  /* Canonical order: a stable sort of each run of marks by combining class. */
  for (size_t i = 1; i < m; i++) {
    int c = (d[i] & RAW_BYTE) ? 0 : nfc_ccc(d[i]);
    for (size_t j = i; c > 0 && j > 0;) {
      int p = (d[j - 1] & RAW_BYTE) ? 0 : nfc_ccc(d[j - 1]);
      if (p <= c) break;
      uint32_t tmp = d[j - 1];
      d[j - 1] = d[j];
      d[j] = tmp;
      j--;
    }
  }
  /* Compose: each mark joins the last starter unless a mark of the same or a higher class, or a
   * starter, stands between them (UAX #15). */
  size_t w = 0, starter = SIZE_MAX;
  int last = 0;
  for (size_t i = 0; i < m; i++) {
    uint32_t c = d[i];
    int cc = (c & RAW_BYTE) ? 0 : nfc_ccc(c);
    uint32_t comp = 0;
    if (starter != SIZE_MAX && !(c & RAW_BYTE) && !(d[starter] & RAW_BYTE) &&
        (w == starter + 1 || (last != 0 && last < cc)))
      comp = nfc_compose(d[starter], c);
    if (comp) {
      d[starter] = comp;
      continue;
    }
    if (cc == 0) starter = w;
    last = cc;
    d[w++] = c;
  }
  o = malloc(4 * w + 1);
  if (!o) {
    free(d);
    return ot_error(OT_ERR_NOMEM, "cannot allocate %zu bytes for NFC", 4 * w + 1);
  }
  size_t ol = 0;
  for (size_t i = 0; i < w; i++) ol += utf8_encode(d[i], o + ol);
  free(d);
  *out = o;
  *out_len = ol;
  return OT_OK;
}
