/* Internal: protobuf-c helpers. Untrusted bytes are unpacked with an allocator that
 * refuses to hand out more than `cap` bytes in total (protobuf-c has no limit of its
 * own; unpack returns NULL and frees what it made when the allocator refuses). */
#ifndef OT_PB_H
#define OT_PB_H

#include <protobuf-c/protobuf-c.h>
#include <stdint.h>
#include <stdlib.h>

#include "offtune.pb-c.h"

typedef struct {
  ProtobufCAllocator a;
  size_t used, cap;
} ot_pb_alloc;

static inline void *ot_pb_alloc_fn(void *data, size_t n) {
  ot_pb_alloc *c = data;
  if (n > c->cap - c->used || n > SIZE_MAX - 16) return NULL;
  size_t *p = malloc(n + 16);
  if (!p) return NULL;
  p[0] = n;
  c->used += n;
  return (char *)p + 16;
}

static inline void ot_pb_free_fn(void *data, void *ptr) {
  ot_pb_alloc *c = data;
  if (!ptr) return;
  size_t *p = (size_t *)(void *)((char *)ptr - 16);
  c->used -= p[0];
  free(p);
}

static inline void ot_pb_alloc_init(ot_pb_alloc *c, size_t cap) {
  c->a.alloc = ot_pb_alloc_fn;
  c->a.free = ot_pb_free_fn;
  c->a.allocator_data = c;
  c->used = 0;
  c->cap = cap;
}

/* Packs a message into a fresh malloc'd buffer. */
static inline int ot_pb_pack(const ProtobufCMessage *m, uint8_t **out, size_t *len) {
  size_t n = protobuf_c_message_get_packed_size(m);
  uint8_t *b = malloc(n ? n : 1);
  if (!b) return -1;
  protobuf_c_message_pack(m, b);
  *out = b;
  *len = n;
  return 0;
}

/* A minimal protobuf reader and writer for the data path (envelopes and chunks):
 * fields are read in place, without protobuf-c's copy of every bytes field. */
typedef struct {
  const uint8_t *p, *end;
} ot_pbr;

static inline int ot_pbr_varint(ot_pbr *r, uint64_t *v) {
  uint64_t x = 0;
  for (int shift = 0; shift < 70; shift += 7) {
    if (r->p >= r->end) return -1;
    uint8_t b = *r->p++;
    if (shift == 63 && b > 1) return -1;
    x |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) {
      *v = x;
      return 0;
    }
  }
  return -1;
}

/* The next field's number and wire type: 1, 0 at the end, -1 when malformed. */
static inline int ot_pbr_next(ot_pbr *r, uint32_t *field, int *wt) {
  if (r->p >= r->end) return 0;
  uint64_t tag;
  const uint8_t *start = r->p;
  /* at most 5 bytes, like protobuf-c's tag parser */
  if (ot_pbr_varint(r, &tag) || r->p - start > 5 || (tag >> 3) == 0 || (tag >> 3) > 0x1fffffff) return -1;
  *field = (uint32_t)(tag >> 3);
  *wt = (int)(tag & 7);
  return 1;
}

static inline int ot_pbr_bytes(ot_pbr *r, const uint8_t **d, size_t *len) {
  uint64_t n;
  if (ot_pbr_varint(r, &n) || n > (uint64_t)(r->end - r->p)) return -1;
  *d = r->p;
  *len = (size_t)n;
  r->p += n;
  return 0;
}

static inline int ot_pbr_fixed64(ot_pbr *r, uint64_t *v) {
  if (r->end - r->p < 8) return -1;
  uint64_t x = 0;
  for (int i = 0; i < 8; i++) x |= (uint64_t)r->p[i] << (8 * i);
  r->p += 8;
  *v = x;
  return 0;
}

/* Skips an unknown field (varint, fixed64, bytes, fixed32; groups are refused). */
static inline int ot_pbr_skip(ot_pbr *r, int wt) {
  uint64_t v;
  const uint8_t *d;
  size_t n;
  switch (wt) {
  case 0: return ot_pbr_varint(r, &v);
  case 1: return ot_pbr_fixed64(r, &v);
  case 2: return ot_pbr_bytes(r, &d, &n);
  case 5:
    if (r->end - r->p < 4) return -1;
    r->p += 4;
    return 0;
  default: return -1;
  }
}

static inline size_t ot_pb_varint_len(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

static inline uint8_t *ot_pbw_varint(uint8_t *p, uint64_t v) {
  while (v >= 0x80) {
    *p++ = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  *p++ = (uint8_t)v;
  return p;
}

static inline uint8_t *ot_pbw_fixed64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) *p++ = (uint8_t)(v >> (8 * i));
  return p;
}

#endif
