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

#endif
