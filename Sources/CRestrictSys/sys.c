#define _GNU_SOURCE
#include "CRestrictSys.h"

#include <errno.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <linux/inet_diag.h>

/* One netlink socket per thread, kept between queries (a socket, a setsockopt and a close
 * less per connection). Any failure closes it, and the next query opens a new one. */
static __thread int diag_fd = -1;
static __thread uint32_t diag_seq = 0;

static void diag_reset(void) {
    if (diag_fd >= 0) close(diag_fd);
    diag_fd = -1;
}

int crs_inet_diag_cached_fd(void) { return diag_fd; }

static int diag_socket(void) {
    if (diag_fd >= 0) return diag_fd;
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0) return -errno;
    // A kernel that never answers must not hang a session.
    struct timeval tv = { .tv_sec = 1, .tv_usec = 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    diag_fd = fd;
    return fd;
}

int crs_inet_diag_uid(int family, const uint8_t *src, uint16_t sport,
                      const uint8_t *dst, uint16_t dport, uint32_t *uid) {
    if (family != AF_INET && family != AF_INET6) return -EAFNOSUPPORT;
    int fd = diag_socket();
    if (fd < 0) return fd;

    struct {
        struct nlmsghdr nlh;
        struct inet_diag_req_v2 req;
    } msg;
    memset(&msg, 0, sizeof msg);
    msg.nlh.nlmsg_len = sizeof msg;
    msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    msg.nlh.nlmsg_flags = NLM_F_REQUEST;
    // Each query has its own sequence number: an answer to an earlier one (after a timeout)
    // is skipped, never taken for this one's.
    uint32_t seq = ++diag_seq;
    if (seq == 0) seq = ++diag_seq;
    msg.nlh.nlmsg_seq = seq;
    msg.req.sdiag_family = (uint8_t)family;
    msg.req.sdiag_protocol = IPPROTO_TCP;
    // Established sockets only: a socket in TIME_WAIT or an orphan reports uid 0 (root).
    msg.req.idiag_states = 1U << TCP_ESTABLISHED;
    msg.req.id.idiag_sport = htons(sport);
    msg.req.id.idiag_dport = htons(dport);
    size_t alen = family == AF_INET ? 4 : 16;
    memcpy(msg.req.id.idiag_src, src, alen);
    memcpy(msg.req.id.idiag_dst, dst, alen);
    msg.req.id.idiag_if = 0;
    msg.req.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
    msg.req.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;

    struct sockaddr_nl nladdr = { .nl_family = AF_NETLINK };
    if (sendto(fd, &msg, sizeof msg, 0, (struct sockaddr *)&nladdr, sizeof nladdr) < 0) {
        int e = errno; diag_reset(); return -e;
    }
    union { struct nlmsghdr h; char buf[8192]; } reply;
    // A stale answer is skipped; a few at most can be queued (one per timed-out query).
    for (int tries = 0; tries < 8; tries++) {
        ssize_t n = recv(fd, &reply, sizeof reply, 0);
        if (n < 0) { int e = errno; diag_reset(); return -e; }
        int stale = 0;
        for (struct nlmsghdr *h = &reply.h; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != seq) { stale = 1; break; }
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *err = NLMSG_DATA(h);
                if (h->nlmsg_len < NLMSG_LENGTH(sizeof *err)) { diag_reset(); return -EPROTO; }
                return err->error != 0 ? err->error : -ENOENT;
            }
            if (h->nlmsg_type == SOCK_DIAG_BY_FAMILY) {
                if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg))) { diag_reset(); return -EPROTO; }
                struct inet_diag_msg *m = NLMSG_DATA(h);
                // The kernel matched on the 4-tuple; check it anyway before trusting the owner.
                if (m->id.idiag_sport != htons(sport) || m->id.idiag_dport != htons(dport)) return -ENOENT;
                if (m->idiag_state != TCP_ESTABLISHED || m->idiag_inode == 0) return -ENOENT;
                *uid = m->idiag_uid;
                return 0;
            }
            if (h->nlmsg_type == NLMSG_DONE) break;
        }
        if (!stale) return -ENOENT;
    }
    diag_reset();
    return -EPROTO;
}

int crs_getresuid(uint32_t *r, uint32_t *e, uint32_t *s) {
    uid_t a, b, c;
    if (getresuid(&a, &b, &c) < 0) return -errno;
    *r = a; *e = b; *s = c;
    return 0;
}

int crs_getresgid(uint32_t *r, uint32_t *e, uint32_t *s) {
    gid_t a, b, c;
    if (getresgid(&a, &b, &c) < 0) return -errno;
    *r = a; *e = b; *s = c;
    return 0;
}

void crs_openlog(const char *ident, int facility) { openlog(ident, LOG_PID | LOG_NDELAY, facility); }
void crs_syslog(int priority, const char *message) { syslog(priority, "%s", message); }
