#include "ot_unicode.h"

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
