/* A TCP relay for fault tests: forwards loopback connections to a target port and parses
 * nng's SP-over-TCP framing (an 8-byte header, then messages as an 8-byte big-endian length
 * and the payload) in the client-to-server direction, so a test can cut the link at an
 * exact message. Once cut, every connection is closed and new ones are closed at once. */
#ifndef TCP_RELAY_H
#define TCP_RELAY_H

#include <stdint.h>

typedef struct tcp_relay tcp_relay;

/* Called with the length of each client-to-server message before it is forwarded;
 * non-zero cuts the link (that message is not delivered). */
typedef int (*tcp_relay_cut_fn)(void *arg, uint64_t msg_len);

/* Listens on 127.0.0.1 (any port), relays to 127.0.0.1:target_port; NULL on error. */
tcp_relay *tcp_relay_start(int target_port, tcp_relay_cut_fn cut, void *arg);
int tcp_relay_port(const tcp_relay *r);
int tcp_relay_was_cut(tcp_relay *r);
void tcp_relay_stop(tcp_relay *r);

#endif
