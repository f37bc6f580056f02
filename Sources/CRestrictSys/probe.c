/* restrictpd --audit: connection probes as another user, and bounded subprocesses.
 *
 * The audit runs inside a multi-threaded Swift process. After fork() only the calling thread
 * exists in the child, and any lock another thread held stays locked there, so the child
 * calls nothing that may take a lock or allocate: raw system calls only (setgroups, setgid
 * and setuid through syscall(2), which also skips glibc's all-threads credential broadcast),
 * socket, connect, poll, read, send, write and _exit. It reports through a pipe with one
 * fixed-size write. */
#define _GNU_SOURCE
#include "CRestrictSys.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

extern char **environ;

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits until fd is ready for `events` or the deadline passes: 1 ready, 0 timeout, -errno. */
static int wait_fd(int fd, short events, long long deadline) {
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) return 0;
        struct pollfd p = { .fd = fd, .events = events };
        int n = poll(&p, 1, (int)left);
        if (n > 0) return 1;
        if (n == 0) return 0;
        if (errno != EINTR) return -errno;
    }
}

/* A non-blocking connect that gives up at the deadline. Returns the socket, or -errno. */
static int connect_bounded(const struct sockaddr *sa, socklen_t len, long long deadline) {
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    if (connect(fd, sa, len) < 0) {
        if (errno != EINPROGRESS) { int e = errno; close(fd); return -e; }
        int r = wait_fd(fd, POLLOUT, deadline);
        if (r <= 0) { close(fd); return r == 0 ? -ETIMEDOUT : r; }
        int err = 0;
        socklen_t elen = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0) err = errno;
        if (err != 0) { close(fd); return -err; }
    }
    return fd;
}

/* Reads until the first LF, the buffer is full, the peer closes or the deadline passes. */
static int read_line(int fd, char *buf, int cap, long long deadline) {
    int len = 0;
    while (len < cap) {
        if (wait_fd(fd, POLLIN, deadline) <= 0) break;
        ssize_t n = read(fd, buf + len, (size_t)(cap - len));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        len += (int)n;
        if (memchr(buf, '\n', (size_t)len) != NULL) break;
    }
    return len;
}

/* The child: become the user, connect, maybe read the greeting and say QUIT, report, exit. */
static void probe_child(int report, uint32_t uid, uint32_t gid, const struct sockaddr *sa,
                        socklen_t len, int timeout_ms, int read_greeting) {
    struct crs_probe_result r;
    memset(&r, 0, sizeof r);
    /* Die with the parent, and never outlive twice the budget even if the parent forgets. */
    syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    alarm((unsigned)(timeout_ms * 2 / 1000 + 2));
    gid_t g = (gid_t)gid;
    if (syscall(SYS_setgroups, 1, &g) != 0 || syscall(SYS_setgid, g) != 0 ||
        syscall(SYS_setuid, (uid_t)uid) != 0) {
        r.error = errno;
        (void)!write(report, &r, sizeof r);
        _exit(1);
    }
    r.identity_ok = syscall(SYS_getuid) == (long)uid && syscall(SYS_geteuid) == (long)uid &&
                    syscall(SYS_getgid) == (long)gid && syscall(SYS_getegid) == (long)gid;
    long long deadline = now_ms() + timeout_ms;
    int fd = connect_bounded(sa, len, deadline);
    if (fd < 0) {
        r.error = -fd;
    } else {
        r.connected = 1;
        if (read_greeting) {
            r.greeting_len = read_line(fd, r.greeting, (int)sizeof r.greeting, now_ms() + timeout_ms);
            (void)send(fd, "QUIT\r\n", 6, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        close(fd);
    }
    (void)!write(report, &r, sizeof r);
    _exit(0);
}

/* Kills the child if it still runs, and reaps it either way. */
static void reap(pid_t pid, int kill_it) {
    if (kill_it) kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
}

int crs_probe_as(uint32_t uid, uint32_t gid, const void *addr, uint32_t addrlen,
                 int timeout_ms, int read_greeting, struct crs_probe_result *out) {
    if (uid == 0) return -EPERM;
    memset(out, 0, sizeof *out);
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return -errno;
    pid_t pid = fork();
    if (pid < 0) { int e = errno; close(p[0]); close(p[1]); return -e; }
    if (pid == 0) {
        close(p[0]);
        probe_child(p[1], uid, gid, (const struct sockaddr *)addr, (socklen_t)addrlen,
                    timeout_ms, read_greeting);
    }
    close(p[1]);
    long long deadline = now_ms() + (long long)timeout_ms * 2 + 1000;
    int got = 0;
    size_t have = 0;
    while (have < sizeof *out) {
        if (wait_fd(p[0], POLLIN, deadline) <= 0) break;
        ssize_t n = read(p[0], (char *)out + have, sizeof *out - have);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        have += (size_t)n;
    }
    got = have == sizeof *out;
    close(p[0]);
    reap(pid, !got);
    if (!got) {
        memset(out, 0, sizeof *out);
        out->timed_out = 1;
        return -ETIMEDOUT;
    }
    return 0;
}

int crs_connect_check(const void *addr, uint32_t addrlen, int timeout_ms) {
    int fd = connect_bounded((const struct sockaddr *)addr, (socklen_t)addrlen, now_ms() + timeout_ms);
    if (fd < 0) return fd;
    close(fd);
    return 1;
}

/* Reads the child's output into buf until EOF, the cap or the deadline. 0, -EFBIG, -ETIMEDOUT. */
static int collect(int fd, char *buf, size_t cap, size_t *len, long long deadline) {
    *len = 0;
    for (;;) {
        int r = wait_fd(fd, POLLIN, deadline);
        if (r == 0) return -ETIMEDOUT;
        if (r < 0) return r;
        char scratch[1];
        char *dst = *len < cap ? buf + *len : scratch;
        ssize_t n = read(fd, dst, *len < cap ? cap - *len : 1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -errno;
        if (n == 0) return 0;
        if (*len >= cap) return -EFBIG;
        *len += (size_t)n;
    }
}

int crs_run_capture(char *const argv[], int timeout_ms, char *buf, size_t cap, size_t *len,
                    int *status) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return -errno;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, p[1], 1);
    posix_spawn_file_actions_adddup2(&fa, p[1], 2);
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 34)
    /* Nothing else of ours reaches the program: a listening socket inherited by a program
     * that outlives a probe would answer connections in its place. */
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
#endif
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(p[1]);
    if (rc != 0) { close(p[0]); return -rc; }
    long long deadline = now_ms() + timeout_ms;
    int r = collect(p[0], buf, cap, len, deadline);
    close(p[0]);
    if (r != 0) { reap(pid, 1); return r; }
    /* Output ended; the program may still be finishing. Give it what is left of the time. */
    for (;;) {
        pid_t w = waitpid(pid, status, WNOHANG);
        if (w == pid) return 0;
        if (w < 0 && errno != EINTR) return -errno;
        if (now_ms() >= deadline) { reap(pid, 1); return -ETIMEDOUT; }
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
}
