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

#endif
