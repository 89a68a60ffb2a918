/* libFuzzer harness: untrusted bytes into secure aggregation. The first byte picks the
 * target: the cloud's receive (any stage's wrapper and body), a device's key list or
 * share list (cloud-to-device, unsigned), or Shamir reconstruction of raw shares.
 * Every input either fails cleanly or is accepted consistently. */
#include "ot_error.h"
#include "ot_identity.h"
#include "ot_secagg.h"
#include "ot_secagg_client.h"
#include "ot_secagg_server.h"

#include <sodium.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { N = 4 };
static ot_identity ids[N];
static uint8_t roster[N][OT_PK_BYTES];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int ready;
  if (!ready) {
    if (ot_sodium_init()) abort();
    for (int i = 0; i < N; i++) { /* fixed identities: reproducible runs */
      uint8_t seed[32] = {(uint8_t)(i + 1)};
      crypto_sign_seed_keypair(ids[i].pk, ids[i].sk, seed);
      memcpy(roster[i], ids[i].pk, OT_PK_BYTES);
    }
    ready = 1;
  }
  if (size < 1) return 0;
  uint8_t target = data[0] % 4;
  data++, size--;
  ot_secagg_params p = {.dim = 16, .clip = 1.0f};
  if (target == 0) {
    ot_secagg_server *s;
    if (ot_secagg_server_new(&p, N, (const uint8_t(*)[OT_PK_BYTES])roster, 1, &s)) abort();
    uint32_t dev;
    if (ot_secagg_server_receive(s, data, size, &dev) == OT_OK && dev >= N) abort();
    ot_secagg_server_free(s);
  } else if (target == 1 || target == 2) {
    ot_secagg_client *c;
    if (ot_secagg_client_new(&ids[0], &p, 1, (const uint8_t(*)[OT_PK_BYTES])roster, N, &c)) abort();
    uint8_t *out;
    size_t ol;
    if (ot_secagg_client_advertise(c, &out, &ol)) abort();
    free(out);
    if (target == 1) {
      if (ot_secagg_client_on_keys(c, data, size, &out, &ol) == OT_OK) free(out);
    } else if (ot_secagg_client_on_shares(c, data, size) == OT_OK) {
      abort(); /* out of order: must be refused */
    }
    ot_secagg_client_free(c);
  } else {
    size_t k = size / OT_SA_SHARE_BYTES;
    if (k == 0) return 0;
    uint8_t secret[32];
    uint32_t t = (uint32_t)(k > 1 ? k - (data[0] & 1) : 1);
    (void)ot_shamir_combine((const uint8_t(*)[OT_SA_SHARE_BYTES])data, (uint32_t)k, t, secret);
    ot_secagg_msg m;
    if (ot_secagg_msg_decode(data, size, 1 << 20, &m) == OT_OK) ot_secagg_msg_clear(&m);
  }
  return 0;
}
