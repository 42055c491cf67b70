// netlab's user-space delay stage (this kernel has no netem): a transparent wire between two interfaces of a
// "wire" namespace that holds every Ethernet frame for a fixed one-way delay per direction, then writes it on.
//
// Usage: delay IF_A IF_B DELAY_A2B_US DELAY_B2A_US QUEUE_BYTES MAX_SECONDS RT_PRIORITY
//
// Frames are read with AF_PACKET raw sockets (so addresses, TTLs and MACs are untouched: both ends see each
// other as on one Ethernet segment) with PACKET_VNET_HDR, which keeps GSO super-frames (up to 64 KiB) and
// partial checksums intact from one veth to the other: one syscall moves up to 44 segments. Each frame is due
// at its kernel arrival time (SO_TIMESTAMPNS) + the delay; frames leave in arrival order (the delay is constant
// per direction). A frame that does not fit in the direction's QUEUE_BYTES ring is dropped and counted
// (dropsQueue); so are the shaper's tail drops (dropsShaper: send() says ENOBUFS) and anything else (dropsOther).
// RT_PRIORITY > 0 asks for SCHED_FIFO at that priority, so that the wire keeps its timing on a loaded machine
// (the loop sleeps between due frames; the kernel's RT throttling bounds it anyway); 0 keeps the normal policy.
// Prints "ready" once both sockets are bound; on SIGUSR1 and at exit (SIGTERM/SIGINT, MAX_SECONDS, or the
// parent's death) one JSON line of statistics per direction: frames, bytes, drops, and how late frames left
// (send time - due time) as p50/p99/max in microseconds, from a 20 µs histogram.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

#define FRAME_MAX (sizeof(struct virtio_net_hdr) + 65536 + 64)
#define DRAIN_MAX 512          /* frames read per socket per wake-up: the loop stays responsive to due frames */
#define HIST_US 20             /* lateness histogram bucket width */
#define HIST_N 2000            /* 2000 x 20 us = 40 ms, beyond that the last bucket */

typedef struct {
  uint32_t len;                /* bytes of data (vnet header + frame); 0 marks a wrap to the ring's start */
  uint32_t pad;
  int64_t due_ns;
} rec_t;

typedef struct {
  const char *name;
  int in_fd, out_fd;           /* read from in_fd, write to out_fd */
  int64_t delay_ns;
  uint8_t *ring;
  size_t cap, head, tail, used;  /* bytes; head = oldest record, tail = next free byte */
  uint64_t frames, bytes, drops_queue, drops_send, drops_other, gso;
  int last_errno;              /* of the last send that failed with something other than ENOBUFS */
  uint64_t hist[HIST_N];
  int64_t late_max_ns;
  int blocked;                 /* the last send said EAGAIN: wait for POLLOUT */
} dir_t;

static volatile sig_atomic_t stop_sig = 0, dump_sig = 0;
static uint64_t wakeups = 0;
static void on_stop(int s) { stop_sig = s; }
static void on_dump(int s) { (void)s; dump_sig = 1; }

static int64_t clock_ns(clockid_t c) {
  struct timespec t;
  clock_gettime(c, &t);
  return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void die(const char *what, const char *arg) {
  fprintf(stderr, "delay: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(errno));
  exit(2);
}

static int open_if(const char *ifname, int sndbuf) {
  int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);  /* protocol 0: nothing until bound */
  if (fd < 0) die("socket(AF_PACKET)", ifname);
  int one = 1, rcv = 32 << 20;
  if (setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0) die("PACKET_VNET_HDR on", ifname);
  setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);  /* older kernels: pkttype check below */
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv) < 0) die("SO_RCVBUFFORCE on", ifname);
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf) < 0) die("SO_SNDBUFFORCE on", ifname);
  if (setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) < 0) die("SO_TIMESTAMPNS on", ifname);
  struct sockaddr_ll a;
  memset(&a, 0, sizeof a);
  a.sll_family = AF_PACKET;
  a.sll_protocol = htons(ETH_P_ALL);
  a.sll_ifindex = (int)if_nametoindex(ifname);
  if (a.sll_ifindex == 0) die("no interface", ifname);
  if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind", ifname);
  return fd;
}

/* Room for a record of n data bytes at the tail; wraps (leaving a len=0 marker) when the end is too short. */
static rec_t *ring_reserve(dir_t *d, size_t n) {
  size_t need = sizeof(rec_t) + ((n + 7) & ~(size_t)7);
  if (d->used + need > d->cap) return NULL;
  if (d->tail + need > d->cap) {                          /* not enough room before the end: wrap */
    size_t waste = d->cap - d->tail;
    if (d->used + waste + need > d->cap || d->head < need) return NULL;
    if (waste >= sizeof(rec_t)) ((rec_t *)(d->ring + d->tail))->len = 0;
    d->used += waste;
    d->tail = 0;
  }
  return (rec_t *)(d->ring + d->tail);
}

static void ring_commit(dir_t *d, size_t n) {
  size_t need = sizeof(rec_t) + ((n + 7) & ~(size_t)7);
  d->tail = (d->tail + need) % d->cap;
  d->used += need;
}

static rec_t *ring_head(dir_t *d) {
  if (d->used == 0) return NULL;
  if (d->cap - d->head < sizeof(rec_t) || ((rec_t *)(d->ring + d->head))->len == 0) {  /* wrap marker */
    d->used -= d->cap - d->head;
    d->head = 0;
    if (d->used == 0) { d->tail = 0; return NULL; }
  }
  return (rec_t *)(d->ring + d->head);
}

static void ring_pop(dir_t *d, rec_t *r) {
  size_t need = sizeof(rec_t) + ((r->len + 7) & ~(size_t)7);
  d->head = (d->head + need) % d->cap;
  d->used -= need;
  if (d->used == 0) d->head = d->tail = 0;
}

/* Reads up to DRAIN_MAX frames from d->in_fd into d's ring. */
static void drain(dir_t *d) {
  static uint8_t buf[FRAME_MAX];
  char cbuf[CMSG_SPACE(sizeof(struct timespec))];
  for (int i = 0; i < DRAIN_MAX; i++) {
    struct sockaddr_ll from;
    struct iovec iov = {buf, sizeof buf};
    struct msghdr m = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov, .msg_iovlen = 1,
                       .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    ssize_t n = recvmsg(d->in_fd, &m, MSG_DONTWAIT | MSG_TRUNC);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return;
      die("recvmsg", d->name);
    }
    if (from.sll_pkttype == PACKET_OUTGOING) continue;     /* our own writes, where IGNORE_OUTGOING is missing */
    if ((size_t)n > sizeof buf || (size_t)n <= sizeof(struct virtio_net_hdr)) { d->drops_other++; continue; }  /* truncated or empty */
    int64_t now_mono = clock_ns(CLOCK_MONOTONIC), arrival = now_mono;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
        struct timespec ts;
        memcpy(&ts, CMSG_DATA(c), sizeof ts);
        int64_t age = clock_ns(CLOCK_REALTIME) - ((int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec);
        if (age >= 0 && age < 1000000000LL) arrival = now_mono - age;   /* time spent in our receive queue */
      }
    }
    rec_t *r = ring_reserve(d, (size_t)n);
    if (!r) { d->drops_queue++; continue; }
    r->len = (uint32_t)n;
    r->due_ns = arrival + d->delay_ns;
    memcpy(r + 1, buf, (size_t)n);
    ring_commit(d, (size_t)n);
    if (((struct virtio_net_hdr *)buf)->gso_type != VIRTIO_NET_HDR_GSO_NONE) d->gso++;
  }
}

/* Sends every due frame; returns the due time of the next one (or INT64_MAX). */
static int64_t flush(dir_t *d, int64_t now) {
  rec_t *r;
  while ((r = ring_head(d)) != NULL) {
    if (r->due_ns > now) return r->due_ns;
    ssize_t n = send(d->out_fd, r + 1, r->len, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) { d->blocked = 1; return now + 1000000; }  /* POLLOUT or 1 ms */
    if (n < 0 && errno == ENOBUFS) d->drops_send++;       /* the shaper's queue is full: a tail drop */
    else if (n < 0) { d->drops_other++; d->last_errno = errno; }
    else {
      d->frames++;
      d->bytes += r->len - sizeof(struct virtio_net_hdr);
      int64_t late = now - r->due_ns;
      if (late > d->late_max_ns) d->late_max_ns = late;
      int64_t b = late / (HIST_US * 1000);
      d->hist[b < HIST_N ? b : HIST_N - 1]++;
    }
    d->blocked = 0;
    ring_pop(d, r);
  }
  return INT64_MAX;
}

static long pct_us(const dir_t *d, double p) {
  uint64_t total = 0, acc = 0;
  for (int i = 0; i < HIST_N; i++) total += d->hist[i];
  if (total == 0) return 0;
  uint64_t want = (uint64_t)(p * (double)total);
  if (want >= total) want = total - 1;
  for (int i = 0; i < HIST_N; i++) {
    acc += d->hist[i];
    if (acc > want) return (long)(i + 1) * HIST_US;          /* upper edge of the bucket */
  }
  return (long)HIST_N * HIST_US;
}

static void dump(const dir_t *d0, const dir_t *d1, const char *why) {
  struct rusage u;
  getrusage(RUSAGE_SELF, &u);
  long user_ms = u.ru_utime.tv_sec * 1000L + u.ru_utime.tv_usec / 1000L, sys_ms = u.ru_stime.tv_sec * 1000L + u.ru_stime.tv_usec / 1000L;
  printf("{\"event\":\"%s\",\"cpuMs\":%ld,\"userMs\":%ld,\"sysMs\":%ld,\"wakeups\":%" PRIu64, why, user_ms + sys_ms, user_ms, sys_ms, wakeups);
  const dir_t *ds[2] = {d0, d1};
  for (int i = 0; i < 2; i++) {
    const dir_t *d = ds[i];
    printf(",\"%s\":{\"frames\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"gsoFrames\":%" PRIu64 ",\"dropsQueue\":%" PRIu64
           ",\"dropsShaper\":%" PRIu64 ",\"dropsOther\":%" PRIu64 ",\"lastError\":\"%s\",\"lateP50Us\":%ld,\"lateP99Us\":%ld,\"lateMaxUs\":%" PRId64 ",\"queuedBytes\":%zu}",
           d->name, d->frames, d->bytes, d->gso, d->drops_queue, d->drops_send, d->drops_other, d->last_errno ? strerror(d->last_errno) : "", pct_us(d, 0.5), pct_us(d, 0.99),
           d->late_max_ns / 1000, d->used);
  }
  printf("}\n");
  fflush(stdout);
}

static long arg_num(const char *s, const char *what, long lo, long hi) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *end || v < lo || v > hi) {
    fprintf(stderr, "delay: %s must be an integer in [%ld, %ld], got \"%s\"\n", what, lo, hi, s);
    exit(2);
  }
  return v;
}

int main(int argc, char **argv) {
  if (argc != 8) {
    fprintf(stderr, "usage: delay IF_A IF_B DELAY_A2B_US DELAY_B2A_US QUEUE_BYTES MAX_SECONDS RT_PRIORITY\n");
    return 2;
  }
  long d_ab = arg_num(argv[3], "DELAY_A2B_US", 0, 10000000), d_ba = arg_num(argv[4], "DELAY_B2A_US", 0, 10000000);
  long qbytes = arg_num(argv[5], "QUEUE_BYTES", 1 << 20, 1L << 30), max_s = arg_num(argv[6], "MAX_SECONDS", 1, 86400);
  long rt = arg_num(argv[7], "RT_PRIORITY", 0, 99);
  if (rt > 0) {
    struct sched_param sp = {.sched_priority = (int)rt};
    if (sched_setscheduler(0, SCHED_FIFO, &sp) < 0) fprintf(stderr, "delay: note: SCHED_FIFO %ld refused (%s); normal policy\n", rt, strerror(errno));
  }
  prctl(PR_SET_PDEATHSIG, SIGTERM);                        /* the lab's process died: the wire goes too */
  prctl(PR_SET_TIMERSLACK, 1UL);                           /* wake at the due time, not up to 50 us later */
  if (getppid() == 1) return 3;                            /* parent already gone */

  int sndbuf = 64 << 20;                                   /* > any shaper queue: its skbs are charged to us */
  int fa = open_if(argv[1], sndbuf), fb = open_if(argv[2], sndbuf);
  static dir_t ab, ba;
  ab = (dir_t){.name = "a2b", .in_fd = fa, .out_fd = fb, .delay_ns = d_ab * 1000LL, .cap = (size_t)qbytes};
  ba = (dir_t){.name = "b2a", .in_fd = fb, .out_fd = fa, .delay_ns = d_ba * 1000LL, .cap = (size_t)qbytes};
  ab.ring = malloc(ab.cap);
  ba.ring = malloc(ba.cap);
  if (!ab.ring || !ba.ring) die("malloc", NULL);

  sigset_t block, wait_mask;
  sigemptyset(&block);
  sigaddset(&block, SIGTERM); sigaddset(&block, SIGINT); sigaddset(&block, SIGUSR1); sigaddset(&block, SIGHUP);
  sigprocmask(SIG_BLOCK, &block, &wait_mask);              /* signals arrive only inside ppoll: no lost wake-up */
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_stop;
  sigaction(SIGTERM, &sa, NULL); sigaction(SIGINT, &sa, NULL); sigaction(SIGHUP, &sa, NULL);
  sa.sa_handler = on_dump;
  sigaction(SIGUSR1, &sa, NULL);
  sigdelset(&wait_mask, SIGTERM); sigdelset(&wait_mask, SIGINT); sigdelset(&wait_mask, SIGUSR1); sigdelset(&wait_mask, SIGHUP);

  printf("ready\n");
  fflush(stdout);
  int64_t deadline = clock_ns(CLOCK_MONOTONIC) + max_s * 1000000000LL;
  while (!stop_sig) {
    int64_t now = clock_ns(CLOCK_MONOTONIC);
    if (now >= deadline) break;
    int64_t next = flush(&ab, now), n2 = flush(&ba, now);
    if (n2 < next) next = n2;
    if (deadline < next) next = deadline;
    struct pollfd p[2] = {{fa, POLLIN | (ba.blocked ? POLLOUT : 0), 0}, {fb, POLLIN | (ab.blocked ? POLLOUT : 0), 0}};
    int64_t wait = next - clock_ns(CLOCK_MONOTONIC);
    if (wait < 0) wait = 0;
    struct timespec ts = {(time_t)(wait / 1000000000LL), (long)(wait % 1000000000LL)};
    int r = ppoll(p, 2, &ts, &wait_mask);
    wakeups++;
    if (r < 0 && errno != EINTR) die("ppoll", NULL);
    if (dump_sig) { dump_sig = 0; dump(&ab, &ba, "stats"); }
    if (r > 0) {
      if (p[0].revents & POLLIN) drain(&ab);
      if (p[1].revents & POLLIN) drain(&ba);
      if ((p[0].revents | p[1].revents) & (POLLERR | POLLNVAL)) { errno = EIO; die("socket error on", argv[1]); }
    }
  }
  dump(&ab, &ba, "exit");
  return 0;
}
