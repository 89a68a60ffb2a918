#include "tcp_relay.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_PAIRS 64

typedef struct {
  int cfd, sfd; /* client side, server side; -1 when closed */
  pthread_t th;
  int started;
  /* client-to-server framing: SP header bytes left, then length bytes, then payload */
  int hdr_left, len_have;
  uint8_t len_buf[8];
  uint64_t body_left;
  struct tcp_relay *r;
} pair;

struct tcp_relay {
  int lfd, port, target, stop, cut;
  tcp_relay_cut_fn cut_fn;
  void *arg;
  pthread_mutex_t mu;
  pthread_t accept_th;
  pair pairs[MAX_PAIRS];
  int n_pairs;
};

static void shut(int fd) {
  if (fd >= 0) shutdown(fd, SHUT_RDWR);
}

/* Walks the framing of buf; returns 1 if a message starting in it must be cut. */
static int frame(pair *p, const uint8_t *buf, size_t n) {
  tcp_relay *r = p->r;
  for (size_t i = 0; i < n;) {
    if (p->hdr_left) {
      size_t k = n - i < (size_t)p->hdr_left ? n - i : (size_t)p->hdr_left;
      p->hdr_left -= (int)k;
      i += k;
    } else if (p->body_left) {
      uint64_t k = n - i < p->body_left ? n - i : p->body_left;
      p->body_left -= k;
      i += (size_t)k;
    } else {
      p->len_buf[p->len_have++] = buf[i++];
      if (p->len_have < 8) continue;
      uint64_t len = 0;
      for (int b = 0; b < 8; b++) len = len << 8 | p->len_buf[b];
      p->len_have = 0;
      p->body_left = len;
      pthread_mutex_lock(&r->mu);
      int cut = r->cut || r->cut_fn(r->arg, len);
      if (cut) r->cut = 1;
      pthread_mutex_unlock(&r->mu);
      if (cut) return 1;
    }
  }
  return 0;
}

static int write_all(int fd, const uint8_t *b, size_t n) {
  while (n) {
    ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
    if (w <= 0) return -1;
    b += w;
    n -= (size_t)w;
  }
  return 0;
}

static void cut_all(tcp_relay *r) {
  pthread_mutex_lock(&r->mu);
  r->cut = 1;
  for (int i = 0; i < r->n_pairs; i++) {
    shut(r->pairs[i].cfd);
    shut(r->pairs[i].sfd);
  }
  pthread_mutex_unlock(&r->mu);
}

static void *pump(void *arg) {
  pair *p = arg;
  tcp_relay *r = p->r;
  uint8_t buf[1 << 16];
  for (;;) {
    struct pollfd pf[2] = {{p->cfd, POLLIN, 0}, {p->sfd, POLLIN, 0}};
    if (poll(pf, 2, 100) < 0) break;
    pthread_mutex_lock(&r->mu);
    int done = r->stop || r->cut;
    pthread_mutex_unlock(&r->mu);
    if (done) break;
    if (pf[0].revents) {
      ssize_t n = recv(p->cfd, buf, sizeof buf, 0);
      if (n <= 0) break;
      if (frame(p, buf, (size_t)n)) {
        cut_all(r);
        break;
      }
      if (write_all(p->sfd, buf, (size_t)n)) break;
    }
    if (pf[1].revents) {
      ssize_t n = recv(p->sfd, buf, sizeof buf, 0);
      if (n <= 0 || write_all(p->cfd, buf, (size_t)n)) break;
    }
  }
  shut(p->cfd);
  shut(p->sfd);
  return NULL;
}

static void *accept_loop(void *arg) {
  tcp_relay *r = arg;
  for (;;) {
    struct pollfd pf = {r->lfd, POLLIN, 0};
    poll(&pf, 1, 100);
    pthread_mutex_lock(&r->mu);
    int stop = r->stop, cut = r->cut;
    pthread_mutex_unlock(&r->mu);
    if (stop) break;
    if (!(pf.revents & POLLIN)) continue;
    int c = accept(r->lfd, NULL, NULL);
    if (c < 0) continue;
    if (cut || r->n_pairs == MAX_PAIRS) { /* the link is down: refuse at once */
      close(c);
      continue;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)r->target)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
      if (s >= 0) close(s);
      close(c);
      continue;
    }
    pthread_mutex_lock(&r->mu);
    pair *p = &r->pairs[r->n_pairs++];
    *p = (pair){.cfd = c, .sfd = s, .hdr_left = 8, .r = r};
    pthread_mutex_unlock(&r->mu);
    p->started = pthread_create(&p->th, NULL, pump, p) == 0;
  }
  return NULL;
}

tcp_relay *tcp_relay_start(int target_port, tcp_relay_cut_fn cut, void *arg) {
  tcp_relay *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->target = target_port;
  r->cut_fn = cut;
  r->arg = arg;
  pthread_mutex_init(&r->mu, NULL);
  r->lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t al = sizeof a;
  if (r->lfd < 0 || bind(r->lfd, (struct sockaddr *)&a, sizeof a) != 0 || listen(r->lfd, 64) != 0 ||
      getsockname(r->lfd, (struct sockaddr *)&a, &al) != 0 ||
      pthread_create(&r->accept_th, NULL, accept_loop, r) != 0) {
    if (r->lfd >= 0) close(r->lfd);
    free(r);
    return NULL;
  }
  r->port = ntohs(a.sin_port);
  return r;
}

int tcp_relay_port(const tcp_relay *r) { return r->port; }

int tcp_relay_was_cut(tcp_relay *r) {
  pthread_mutex_lock(&r->mu);
  int c = r->cut;
  pthread_mutex_unlock(&r->mu);
  return c;
}

void tcp_relay_stop(tcp_relay *r) {
  if (!r) return;
  pthread_mutex_lock(&r->mu);
  r->stop = 1;
  pthread_mutex_unlock(&r->mu);
  pthread_join(r->accept_th, NULL);
  for (int i = 0; i < r->n_pairs; i++) {
    shut(r->pairs[i].cfd);
    shut(r->pairs[i].sfd);
    if (r->pairs[i].started) pthread_join(r->pairs[i].th, NULL);
    close(r->pairs[i].cfd);
    close(r->pairs[i].sfd);
  }
  close(r->lfd);
  pthread_mutex_destroy(&r->mu);
  free(r);
}
