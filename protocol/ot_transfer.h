/* Chunked transfer of large tensors.
 *
 * A transfer has a 16-byte id chosen by the sender, a total size and a chunk size
 * (<= OT_CHUNK_MAX). Chunk i travels as its own sealed envelope (so each chunk is its
 * own AEAD message, and the Chunk body it carries names the transfer id, the index and
 * the final flag, all authenticated). The final marker (final = 1, index = n, no data)
 * carries the digest of the whole:
 *   h_i    = BLAKE2b-256("offtune/1 chunk"  || u64 i || chunk i)
 *   digest = BLAKE2b-256("offtune/1 digest" || u64 total || u64 chunk || h_0 .. h_{n-1})
 * (a hash list: chunks can be hashed by whichever thread handles them). The receiver
 * keeps one bit and one 32-byte hash per chunk, writes each chunk through a sink, and
 * commits only when every chunk is there and the digest matches; otherwise the sink is
 * aborted and nothing is left behind. A sender that lost its connection asks again
 * with the same id and resumes from the receiver's contiguous prefix. */
#ifndef OT_TRANSFER_H
#define OT_TRANSFER_H

#include <stddef.h>
#include <stdint.h>

#define OT_CHUNK_MAX ((uint32_t)(4u << 20))
#define OT_TRANSFER_ID_BYTES 16
#define OT_DIGEST_BYTES 32

/* Where received chunks go. write_at may be called from several threads with
 * disjoint ranges; commit is called once with everything verified; abort discards. */
typedef struct {
  int (*write_at)(void *self, uint64_t off, const void *data, size_t len);
  int (*commit)(void *self);
  void (*abort)(void *self);
  void *self;
} ot_sink;

/* Writes to PATH.partial (0600) and renames it to PATH on commit; abort removes it. */
int ot_file_sink_open(const char *path, ot_sink *out);
/* Receives into a malloc'd buffer of `size` bytes; after commit, ot_mem_sink_take
 * hands the buffer over (NULL if not committed). */
int ot_mem_sink_open(uint64_t size, ot_sink *out);
uint8_t *ot_mem_sink_take(ot_sink *s, uint64_t *size);
void ot_mem_sink_free(ot_sink *s);

void ot_chunk_hash(uint64_t index, const uint8_t *data, size_t len, uint8_t out[32]);
void ot_transfer_digest(const uint8_t (*hashes)[32], uint64_t n, uint64_t total, uint32_t chunk,
                        uint8_t out[32]);
/* Digest of a whole in-memory buffer. */
void ot_transfer_digest_buf(const uint8_t *data, uint64_t total, uint32_t chunk, uint8_t out[32]);
uint64_t ot_transfer_chunks(uint64_t total, uint32_t chunk);

/* Receiver state (thread-safe). Takes ownership of sink. */
typedef struct ot_rx ot_rx;
int ot_rx_new(const uint8_t id[16], uint64_t total, uint32_t chunk, uint64_t max_total, ot_sink sink,
              ot_rx **out);
int ot_rx_chunk(ot_rx *r, uint64_t index, const uint8_t *data, size_t len);
int ot_rx_final(ot_rx *r, const uint8_t digest[32]);
uint64_t ot_rx_prefix(ot_rx *r);
int ot_rx_committed(ot_rx *r);
/* Aborts the sink unless committed. */
void ot_rx_free(ot_rx *r);

/* Wire bodies. */
typedef struct {
  uint8_t id[16];
  uint64_t index;
  int final;
  const uint8_t *data;
  size_t len;
  int has_digest;
  uint8_t digest[32];
  void *priv;
} ot_chunk;
int ot_chunk_pack(const uint8_t id[16], uint64_t index, int final, const uint8_t *data, size_t len,
                  const uint8_t *digest, uint8_t **out, size_t *out_len);
/* data points into body (no copy): valid while body is. */
int ot_chunk_decode(const uint8_t *body, size_t len, ot_chunk *out);
void ot_chunk_release(ot_chunk *c);
/* Exact packed size, and packing into a buffer of that size (a data chunk has
 * final = 0 and data; a final marker has no data and a digest). */
size_t ot_chunk_packed_len(uint64_t index, int final, size_t len, int has_digest);
int ot_chunk_pack_to(const uint8_t id[16], uint64_t index, int final, const uint8_t *data, size_t len,
                     const uint8_t *digest, uint8_t *out, size_t out_len);

typedef struct {
  uint8_t id[16];
  char name[256];
  uint64_t total;
  uint32_t chunk;
} ot_transfer_begin;
int ot_begin_pack(const ot_transfer_begin *b, uint8_t **out, size_t *out_len);
int ot_begin_decode(const uint8_t *body, size_t len, ot_transfer_begin *out);

typedef struct {
  uint8_t id[16];
  uint64_t have_prefix;
  int committed;
} ot_transfer_status;
int ot_status_pack(const ot_transfer_status *s, uint8_t **out, size_t *out_len);
int ot_status_decode(const uint8_t *body, size_t len, ot_transfer_status *out);

/* Fetch (download) bodies: FetchOpen, FetchInfo, FetchChunk (docs/protocol.md). */
typedef struct {
  char name[256];
  uint32_t chunk; /* 0: the server's default */
} ot_fetch_open_body;
int ot_fetch_open_pack(const ot_fetch_open_body *b, uint8_t **out, size_t *out_len);
int ot_fetch_open_decode(const uint8_t *body, size_t len, ot_fetch_open_body *out);

typedef struct {
  uint8_t id[16];
  uint64_t size;
  uint32_t chunk;
  uint8_t digest[32];
} ot_fetch_info;
int ot_fetch_info_pack(const ot_fetch_info *f, uint8_t **out, size_t *out_len);
int ot_fetch_info_decode(const uint8_t *body, size_t len, ot_fetch_info *out);

int ot_fetch_chunk_pack(const uint8_t id[16], uint64_t index, uint8_t **out, size_t *out_len);
int ot_fetch_chunk_decode(const uint8_t *body, size_t len, uint8_t id[16], uint64_t *index);

#endif
