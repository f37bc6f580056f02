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

int crs_inet_diag_uid(int family, const uint8_t *src, uint16_t sport,
                      const uint8_t *dst, uint16_t dport, uint32_t *uid) {
    if (family != AF_INET && family != AF_INET6) return -EAFNOSUPPORT;
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0) return -errno;
    // A kernel that never answers must not hang a session.
    struct timeval tv = { .tv_sec = 1, .tv_usec = 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    struct {
        struct nlmsghdr nlh;
        struct inet_diag_req_v2 req;
    } msg;
    memset(&msg, 0, sizeof msg);
    msg.nlh.nlmsg_len = sizeof msg;
    msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    msg.nlh.nlmsg_flags = NLM_F_REQUEST;
    msg.nlh.nlmsg_seq = 1;
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
        int e = errno; close(fd); return -e;
    }
    union { struct nlmsghdr h; char buf[8192]; } reply;
    ssize_t n = recv(fd, &reply, sizeof reply, 0);
    int e = errno;
    close(fd);
    if (n < 0) return -e;
    for (struct nlmsghdr *h = &reply.h; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
        if (h->nlmsg_type == NLMSG_ERROR) {
            struct nlmsgerr *err = NLMSG_DATA(h);
            if (h->nlmsg_len < NLMSG_LENGTH(sizeof *err)) return -EPROTO;
            return err->error != 0 ? err->error : -ENOENT;
        }
        if (h->nlmsg_type == SOCK_DIAG_BY_FAMILY) {
            if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg))) return -EPROTO;
            struct inet_diag_msg *m = NLMSG_DATA(h);
            // The kernel matched on the 4-tuple; check it anyway before trusting the owner.
            if (m->id.idiag_sport != htons(sport) || m->id.idiag_dport != htons(dport)) return -ENOENT;
            if (m->idiag_state != TCP_ESTABLISHED || m->idiag_inode == 0) return -ENOENT;
            *uid = m->idiag_uid;
            return 0;
        }
        if (h->nlmsg_type == NLMSG_DONE) break;
    }
    return -ENOENT;
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
