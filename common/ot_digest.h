/* Content digests: BLAKE2b-256 of a file, as 64 lowercase hex digits. One helper for every
 * object the project names by its content (models, adapters, emulator packages, updates). */
#ifndef OT_DIGEST_H
#define OT_DIGEST_H

#include <stddef.h>
#include <stdint.h>

#define OT_DIGEST_HEX 65 /* 64 hex digits of BLAKE2b-256 + NUL */

/* Digest of a regular file of at most max_bytes (ot_file_open_regular: a FIFO, device or
 * directory is refused without reading it). hex is written only on success. */
int ot_file_digest_max(const char *path, uint64_t max_bytes, char hex[OT_DIGEST_HEX]);
/* The same without a size bound, for the operator's own files (a base model). */
int ot_file_digest(const char *path, char hex[OT_DIGEST_HEX]);
/* The same digest of bytes in memory. */
int ot_digest_bytes(const void *data, size_t len, char hex[OT_DIGEST_HEX]);

#endif
