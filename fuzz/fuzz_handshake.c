/* libFuzzer harness: the handshake state machine on hostile bytes.
 *   byte 0 % 4 == 0: the rest is a ClientHello sent to the server;
 *              == 1: the rest is a ServerHello sent to a client that said hello;
 *              == 2: the rest is a ClientFinish for a real pending server handshake;
 *              == 3: a real handshake whose messages get the rest XORed in.
 * Nothing may crash or leak, and no session may open with a tampered message. */
#include "ot_access.h"
#include "ot_error.h"
#include "ot_handshake.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ot_identity srv_id, dev_id;
static ot_access *acl;

static void init_once(void) {
  if (acl) return;
  if (ot_identity_generate(&srv_id) || ot_identity_generate(&dev_id) || ot_access_new(&acl) ||
      ot_access_allow(acl, dev_id.pk))
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  init_once();
  if (size < 1) return 0;
  int mode = data[0] % 4;
  data++;
  size--;
  ot_hs_server_config sc = {&srv_id, &ot_access_memory_ops, acl, 4, 60, 1u << 20};
  ot_hs_client_config cc = {&dev_id, srv_id.pk, NULL, NULL, 0, 0};
  ot_hs_pending p;
  uint8_t *m1 = NULL, *r1 = NULL, *m2 = NULL, *r2 = NULL;
  size_t l1 = 0, rl1 = 0, l2 = 0, rl2 = 0;
  ot_session cs, ss;
  ot_hs_client *c = NULL;
  if (mode == 0) {
    (void)ot_hs_server_on_hello(&sc, data, size, &p, &r1, &rl1); /* r1 is freed below */
  } else if (mode == 1) {
    if (ot_hs_client_new(&cc, &c) || ot_hs_client_hello(c, &m1, &l1)) abort();
    if (ot_hs_client_on_server_hello(c, data, size, &m2, &l2) == OT_OK) abort(); /* unsigned by srv_id */
  } else if (mode == 2) {
    if (ot_hs_client_new(&cc, &c) || ot_hs_client_hello(c, &m1, &l1)) abort();
    if (ot_hs_server_on_hello(&sc, m1, l1, &p, &r1, &rl1)) abort();
    if (ot_hs_server_on_finish(&sc, &p, data, size, &ss, &r2, &rl2, NULL) == OT_OK) abort(); /* no keys */
  } else {
    int changed = 0;
    if (ot_hs_client_new(&cc, &c) || ot_hs_client_hello(c, &m1, &l1)) abort();
    if (ot_hs_server_on_hello(&sc, m1, l1, &p, &r1, &rl1)) abort();
    size_t half = size / 2;
    for (size_t i = 0; i < half && i < rl1; i++) changed |= data[i], r1[i] ^= data[i];
    int rc = ot_hs_client_on_server_hello(c, r1, rl1, &m2, &l2);
    if (rc == OT_OK) {
      for (size_t i = half; i < size && i - half < l2; i++) changed |= data[i], m2[i - half] ^= data[i];
      rc = ot_hs_server_on_finish(&sc, &p, m2, l2, &ss, &r2, &rl2, NULL);
      if (rc == OT_OK) rc = ot_hs_client_on_server_finish(c, r2, rl2, &cs);
    }
    if (rc == OT_OK && changed) abort();
  }
  ot_hs_client_free(c);
  free(m1);
  free(r1);
  free(m2);
  free(r2);
  ot_error_clear();
  return 0;
}
