/* UTF-8 decoding, the code point classes that the pre-tokenisation regexes need, and NFC. */
#ifndef OT_UNICODE_H
#define OT_UNICODE_H

#include <stddef.h>
#include <stdint.h>

/* Classes of the gpt-3-encoder regex: \p{L}, \p{N}, \s, and everything else. */
enum { OT_UC_OTHER = 0, OT_UC_LETTER = 1, OT_UC_NUMBER = 2, OT_UC_SPACE = 3 };

/* Class of a code point (tables generated from Node's regex engine). */
int ot_unicode_class(uint32_t cp);

/* Decodes one UTF-8 sequence at s[0..n), n > 0. Returns its length (1..4) and
 * stores the code point, or returns 0 if s does not start with a well-formed
 * sequence (stray continuation byte, overlong form, surrogate, > U+10FFFF,
 * truncated); *cp is then the first byte. */
size_t ot_utf8_decode(const uint8_t *s, size_t n, uint32_t *cp);

/* Unicode canonical composition (NFC) of UTF-8 text, into a malloc'd buffer. Bytes that are
 * not well-formed UTF-8 pass through unchanged (as starters that compose with nothing). Text
 * with a code point whose normalization the tables cannot vouch for (newer than their Unicode
 * version; common/ot_nfc_table.h) is OT_ERR_UNSUPPORTED naming it. */
int ot_utf8_nfc(const uint8_t *s, size_t n, uint8_t **out, size_t *out_len);

#endif
