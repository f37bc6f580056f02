// Kernel and libc interfaces that Swift cannot import on its own: the netlink sock_diag
// structures (behind function-like macros) and syslog(3), which is variadic.
#ifndef CRESTRICTSYS_H
#define CRESTRICTSYS_H

#include <stdint.h>
#include <sys/types.h>

/// Asks the kernel (NETLINK_SOCK_DIAG, inet_diag) for the owner UID of the TCP socket whose
/// local end is (src, sport) and remote end is (dst, dport). Addresses are in network byte
/// order, 4 bytes for AF_INET and 16 for AF_INET6; ports in host byte order.
/// Returns 0 and sets *uid on success, or -errno (-ENOENT when no such socket exists).
int crs_inet_diag_uid(int family, const uint8_t *src, uint16_t sport,
                      const uint8_t *dst, uint16_t dport, uint32_t *uid);
/* This thread's cached sock_diag socket, or -1 when none is open (for tests). */
int crs_inet_diag_cached_fd(void);

/// getresuid(2) and getresgid(2), which glibc declares only with _GNU_SOURCE.
int crs_getresuid(uint32_t *r, uint32_t *e, uint32_t *s);
int crs_getresgid(uint32_t *r, uint32_t *e, uint32_t *s);

/// syslog(3) with a fixed "%s" format, since Swift cannot call variadic C functions.
void crs_openlog(const char *ident, int facility);
void crs_syslog(int priority, const char *message);

/* --audit: connection probes made by a forked child that has become another user, and
 * bounded subprocesses (postconf, nft, systemctl). See probe.c. */

/* What one probe saw. */
struct crs_probe_result {
    int32_t connected;     /* 1: the connection was accepted */
    int32_t error;         /* errno of the failed connect (ETIMEDOUT when it did not finish) */
    int32_t timed_out;     /* 1: the child did not report in time and was killed */
    int32_t identity_ok;   /* 1: the child held exactly the asked uid and gid when it connected */
    int32_t greeting_len;  /* bytes in greeting */
    char greeting[256];    /* the first line the server sent, if asked to read one */
};

/* Forks a child that drops to (uid, gid) with no supplementary groups, connects to `addr`
 * with a timeout, and, when `read_greeting` is set, reads the server's first line and sends
 * "QUIT
"; nothing else is written. The parent waits at most timeout_ms * 2 + 1000 ms,
 * then kills and reaps the child. Returns 0 with *out filled, or -errno when no child could
 * be started or no report came. uid 0 is refused (-EPERM): a probe must not run as root. */
int crs_probe_as(uint32_t uid, uint32_t gid, const void *addr, uint32_t addrlen,
                 int timeout_ms, int read_greeting, struct crs_probe_result *out);

/* The same connection attempt without forking, as the calling process (root): is anything
 * listening at `addr`? Returns 1 (accepted), or -errno. Writes nothing. */
int crs_connect_check(const void *addr, uint32_t addrlen, int timeout_ms);

/* Runs argv[0] (an absolute path) with argv and the current environment, stdin from
 * /dev/null, stdout and stderr into `buf` (at most `cap` bytes). The child is killed when it
 * runs longer than timeout_ms or writes more than cap bytes. Returns 0 with *len and *status
 * (as waitpid reports it) set, -ETIMEDOUT, -EFBIG (output over cap), or another -errno. */
int crs_run_capture(char *const argv[], int timeout_ms, char *buf, size_t cap, size_t *len,
                    int *status);

#endif
