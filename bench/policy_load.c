/*
 * Load generator for restrictpd's policy service (Postfix's SMTPD access policy protocol).
 * bench/bench.py compiles it with gcc and runs it; it prints one JSON object.
 *
 *   policy_load --port P [--conns N] [--seconds S] [--warmup W] [--rcpts R]
 *               [--uid-base U] [--pid PID] [--rate REQ_PER_S] [--pool K] [--threads T]
 *
 * Each of the N policy connections stands for one smtpd process serving one SMTP client:
 * restrictpd learns the client's UID by sock_diag on the request's 4-tuple, so every
 * simulated client holds a real established TCP connection to a dummy listener of this
 * program, and its requests carry that connection's addresses and ports. With --uid-base the
 * client socket of connection i is created with the file-system UID U + i (setfsuid; the
 * kernel records it as the socket's owner), so each connection is a different local user;
 * the policy connections themselves stay root's, which restrictpd's peer check admits
 * (`clients root`).
 *
 * Closed loop: each connection sends one request, waits for its answer, sends the next (at
 * once: the throughput at saturation; or, with --rate, at the next multiple of N/RATE seconds,
 * the connections staggered, so that latency is measured at a given load instead of at the
 * queueing that saturation causes: with N requests always outstanding, the mean latency is
 * N / throughput whatever the server does). T threads (1 by default) each drive every T-th
 * connection through an epoll of their own, so the generator costs about one write, one read
 * and a share of one epoll_wait per request; its CPU time is reported beside the daemon's to
 * show that it is not the bottleneck. More than one thread matters on a machine shared with
 * other work: a closed loop stalls whenever its one thread waits for a core.
 *
 * Each simulated SMTP transaction is R RCPT requests and one END-OF-MESSAGE request with the
 * same `instance`, as Postfix 3.7 sends them. The recipients are new ones each time, or with
 * --pool K each connection cycles through K recipients of its own (a sender's steady state:
 * the quota store's set of counted addresses stops growing). Only
 * requests answered inside the measurement window (after the warm-up) are counted; at the
 * window's edges the program samples the daemon's CPU time (utime + stime from
 * /proc/PID/stat, with --pid), its own (getrusage) and the machine's idle time (/proc/stat).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/fsuid.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RBUF 4096

struct conn {
    int policy;             /* connection to restrictpd's policy listener */
    int client, accepted;   /* the simulated SMTP client's connection, both ends */
    unsigned client_port;
    unsigned txn;           /* transactions started on this connection */
    int step;               /* 0..rcpts-1: RCPT requests, rcpts: END-OF-MESSAGE */
    double sent_at;
    double due;             /* with --rate: when the next request is due; 0: none pending */
    size_t rlen;
    char rbuf[RBUF];
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "policy_load: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* utime + stime of a process, in seconds; -1 when it cannot be read. */
static double proc_cpu(int pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces */
    if (!p) return -1;
    unsigned long long ut = 0, st = 0;
    /* after ")": state is field 3; utime and stime are fields 14 and 15 */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2) return -1;
    return (double)(ut + st) / sysconf(_SC_CLK_TCK);
}

static double self_cpu(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

/* The machine's (total, idle) jiffies from /proc/stat's first line. */
static void machine_cpu(unsigned long long *total, unsigned long long *idle) {
    unsigned long long v[8] = {0};
    FILE *f = fopen("/proc/stat", "r");
    *total = *idle = 0;
    if (!f) return;
    if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) == 8) {
        for (int i = 0; i < 8; i++) *total += v[i];
        *idle = v[3] + v[4];
    }
    fclose(f);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static unsigned port_of(int fd, int peer) {
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    if ((peer ? getpeername(fd, (struct sockaddr *)&sa, &len) : getsockname(fd, (struct sockaddr *)&sa, &len)) < 0) die("getsockname");
    return ntohs(sa.sin_port);
}

static int connect_loopback(unsigned port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static int rcpts = 2, pool = 0;
static unsigned server_port;

/* One request as Postfix 3.7's smtpd writes it: the same attributes in the same order. */
/* The instance's middle part: fixed for the run, so the RCPT and END-OF-MESSAGE requests of
 * one transaction carry the same instance even when a second ticks over between them. */
static unsigned run_id;

static int format_request(struct conn *c, int index, char *out, size_t cap) {
    int eom = c->step == rcpts;
    char rcpt[128] = "";
    if (!eom && pool > 0)
        snprintf(rcpt, sizeof rcpt, "p%u-c%d@example.net", (c->txn * rcpts + c->step) % pool, index);
    else if (!eom)
        snprintf(rcpt, sizeof rcpt, "r%d-c%d-t%u@example.net", c->step, index, c->txn);
    return snprintf(out, cap,
        "request=smtpd_access_policy\n"
        "protocol_state=%s\n"
        "protocol_name=ESMTP\n"
        "helo_name=bench.localdomain\n"
        "queue_id=%s\n"
        "sender=bench@lab.localdomain\n"
        "recipient=%s\n"
        "recipient_count=%d\n"
        "client_address=127.0.0.1\n"
        "client_name=localhost\n"
        "reverse_client_name=localhost\n"
        "instance=%x.%x.%x.0\n"
        "sasl_method=\nsasl_username=\nsasl_sender=\n"
        "size=%d\n"
        "ccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n"
        "encryption_protocol=\nencryption_cipher=\nencryption_keysize=0\n"
        "etrn_domain=\nstress=\n"
        "client_port=%u\n"
        "policy_context=\n"
        "server_address=127.0.0.1\n"
        "server_port=%u\n"
        "compatibility_level=3.6\n"
        "mail_version=3.7.11\n"
        "\n",
        eom ? "END-OF-MESSAGE" : "RCPT", eom ? "4Q0BenchQueue" : "", rcpt, eom ? rcpts : c->step,
        0x1000 + index, run_id, c->txn, eom ? 2048 : 0, c->client_port, server_port);
}

static void send_next(struct conn *c, int index) {
    char req[2048];
    int n = format_request(c, index, req, sizeof req);
    c->sent_at = now();
    for (int off = 0; off < n;) {
        ssize_t w = write(c->policy, req + off, n - off);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("write to the policy service");
        }
        off += w;
    }
}

/* The connections, and the measurement window, shared by the threads (read-only there). */
static struct conn *conns;
static double t_start, t_measure, t_end, interval;

/* One thread: connections index, index + stride, ... through its own epoll. */
struct worker {
    int index, stride, nconns;
    size_t nlat, lat_cap;
    double *lat;
    unsigned long long dunno, other, done_txn;
    char first_other[256];
};

static void sleep_until(double t) {
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - ts.tv_sec) * 1e9);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
}

static void *worker(void *arg) {
    struct worker *w = arg;
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    int active = 0;
    for (int i = w->index; i < w->nconns; i += w->stride) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].policy, &ev) < 0) die("epoll_ctl");
        if (interval > 0) conns[i].due = t_start + interval * i / w->nconns;
        else send_next(&conns[i], i);
        active++;
    }
    w->lat_cap = 1 << 16;
    w->lat = malloc(w->lat_cap * sizeof *w->lat);
    if (!w->lat) die("malloc");

    struct epoll_event evs[256];
    while (active > 0) {
        double soonest = 0, t0 = now();
        for (int i = w->index; i < w->nconns && interval > 0; i += w->stride) {
            struct conn *c = &conns[i];
            if (c->due > 0 && c->due <= t0) { c->due = -c->due; send_next(c, i); }
            else if (c->due > 0 && (soonest == 0 || c->due < soonest)) soonest = c->due;
        }
        struct timespec wait = {1, 0};
        if (soonest > 0) {
            double d = soonest - t0;
            wait.tv_sec = (time_t)d;
            wait.tv_nsec = (long)((d - wait.tv_sec) * 1e9);
        }
        int n = epoll_pwait2(ep, evs, 256, &wait, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        if (n == 0 && now() > t_end + 10) {
            fprintf(stderr, "policy_load: no answer for 10 s after the end\n");
            exit(3);
        }
        for (int k = 0; k < n; k++) {
            int i = evs[k].data.u32;
            struct conn *c = &conns[i];
            ssize_t r = read(c->policy, c->rbuf + c->rlen, RBUF - 1 - c->rlen);
            if (r <= 0) {
                fprintf(stderr, "policy_load: connection %d closed by the policy service (%s)\n", i, r < 0 ? strerror(errno) : "EOF");
                exit(3);
            }
            c->rlen += r;
            c->rbuf[c->rlen] = 0;
            char *end = strstr(c->rbuf, "\n\n");
            if (!end) {
                if (c->rlen >= RBUF - 1) { fprintf(stderr, "policy_load: answer too long\n"); exit(3); }
                continue;
            }
            double answered = now();
            if (end + 2 != c->rbuf + c->rlen) { fprintf(stderr, "policy_load: answer before a request\n"); exit(3); }
            int is_dunno = !strncmp(c->rbuf, "action=DUNNO\n", 13) || !strncmp(c->rbuf, "action=dunno\n", 13);
            if (answered >= t_measure && answered <= t_end) {
                if (is_dunno) w->dunno++;
                else {
                    w->other++;
                    if (!w->first_other[0]) snprintf(w->first_other, sizeof w->first_other, "%.*s", (int)(end - c->rbuf), c->rbuf);
                }
                if (w->nlat == w->lat_cap) {
                    w->lat_cap *= 2;
                    w->lat = realloc(w->lat, w->lat_cap * sizeof *w->lat);
                    if (!w->lat) die("realloc");
                }
                w->lat[w->nlat++] = answered - c->sent_at;
                if (c->step == rcpts) w->done_txn++;
            }
            c->rlen = 0;
            if (c->step == rcpts) { c->step = 0; c->txn++; }
            else c->step++;
            if (answered >= t_end) active--;
            else if (interval == 0) send_next(c, i);
            else {
                /* The next slot; a connection that fell behind does not burst to catch up. */
                double next = -c->due + interval;
                c->due = next < answered - interval ? answered : next;
            }
        }
    }
    close(ep);
    return NULL;
}

static void usage(void) {
    fprintf(stderr, "usage: policy_load --port P [--conns N] [--seconds S] [--warmup W] [--rcpts R] [--uid-base U] [--pid PID] [--rate R] [--pool K] [--threads T]\n");
    exit(2);
}

int main(int argc, char **argv) {
    unsigned port = 0;
    int nconns = 1, pid = 0, nthreads = 1;
    double seconds = 5, warmup = 1, rate = 0;
    long uid_base = -1;
    run_id = (unsigned)time(NULL);
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) usage();
        if (!strcmp(argv[i], "--port")) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--conns")) nconns = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atof(argv[++i]);
        else if (!strcmp(argv[i], "--rcpts")) rcpts = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--uid-base")) uid_base = atol(argv[++i]);
        else if (!strcmp(argv[i], "--pid")) pid = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rate")) rate = atof(argv[++i]);
        else if (!strcmp(argv[i], "--pool")) pool = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads")) nthreads = atoi(argv[++i]);
        else usage();
    }
    if (!port || nconns < 1 || nthreads < 1 || rcpts < 1 || seconds <= 0 || (pool > 0 && pool < rcpts)) usage();

    /* The dummy "smtpd": accepts the simulated clients and never reads from them. */
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0) die("socket");
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(listener, 1024) < 0) die("listen");
    server_port = port_of(listener, 0);

    conns = calloc(nconns, sizeof *conns);
    if (!conns) die("calloc");
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (uid_base >= 0) {
            /* The kernel takes a socket's owner from the file-system UID at creation. */
            setfsuid((uid_t)(uid_base + i));
            if (setfsuid((uid_t)-1) != (int)(uid_base + i)) { errno = EPERM; die("setfsuid"); }
        }
        c->client = connect_loopback(server_port);
        if (uid_base >= 0) setfsuid(0);
        c->accepted = accept(listener, NULL, NULL);
        if (c->accepted < 0) die("accept");
        c->client_port = port_of(c->client, 0);
        c->policy = connect_loopback(port);
    }

    if (nthreads > nconns) nthreads = nconns;
    struct worker *workers = calloc(nthreads, sizeof *workers);
    pthread_t *tids = calloc(nthreads, sizeof *tids);
    if (!workers || !tids) die("calloc");
    t_start = now();
    t_measure = t_start + warmup;
    t_end = t_measure + seconds;
    /* With --rate each connection sends every `interval` seconds, staggered. */
    interval = rate > 0 ? nconns / rate : 0;
    for (int t = 0; t < nthreads; t++) {
        workers[t].index = t;
        workers[t].stride = nthreads;
        workers[t].nconns = nconns;
        if (pthread_create(&tids[t], NULL, worker, &workers[t]) != 0) die("pthread_create");
    }
    /* The window's edges: the daemon's, this program's and the machine's CPU counters. */
    sleep_until(t_measure);
    double wall0 = now(), rpd0 = pid ? proc_cpu(pid) : -1, self0 = self_cpu();
    unsigned long long tot0, idle0;
    machine_cpu(&tot0, &idle0);
    sleep_until(t_end);
    double wall1 = now(), rpd1 = pid ? proc_cpu(pid) : -1, self1 = self_cpu();
    unsigned long long tot1, idle1;
    machine_cpu(&tot1, &idle1);
    double window = wall1 - wall0;
    for (int t = 0; t < nthreads; t++) pthread_join(tids[t], NULL);

    /* Merge what the threads counted. */
    size_t nlat = 0;
    unsigned long long dunno = 0, other = 0, done_txn = 0;
    char first_other[256] = "";
    for (int t = 0; t < nthreads; t++) nlat += workers[t].nlat;
    double *lat = malloc((nlat ? nlat : 1) * sizeof *lat);
    if (!lat) die("malloc");
    nlat = 0;
    for (int t = 0; t < nthreads; t++) {
        struct worker *w = &workers[t];
        memcpy(lat + nlat, w->lat, w->nlat * sizeof *lat);
        nlat += w->nlat;
        dunno += w->dunno;
        other += w->other;
        done_txn += w->done_txn;
        if (!first_other[0] && w->first_other[0]) memcpy(first_other, w->first_other, sizeof first_other);
    }

    qsort(lat, nlat, sizeof *lat, cmp_double);
#define PCT(p) (nlat ? lat[(size_t)((nlat - 1) * (p))] * 1e6 : 0)
    unsigned long long req = dunno + other;
    /* first_other is an action line: escape the JSON specials it may hold */
    char esc[600];
    size_t j = 0;
    for (const char *p = first_other; *p && j < sizeof esc - 8; p++) {
        if (*p == '"' || *p == '\\') { esc[j++] = '\\'; esc[j++] = *p; }
        else if ((unsigned char)*p < 0x20) j += snprintf(esc + j, sizeof esc - j, "\\u%04x", *p);
        else esc[j++] = *p;
    }
    esc[j] = 0;
    printf("{\"conns\": %d, \"threads\": %d, \"rate\": %.0f, \"rcpts_per_txn\": %d, \"seconds\": %.3f, \"requests\": %llu, \"transactions\": %llu, "
           "\"rps\": %.1f, \"dunno\": %llu, \"other\": %llu, \"first_other\": \"%s\", "
           "\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f, "
           "\"daemon_cpu_s\": %.3f, \"daemon_us_per_req\": %.1f, \"client_cpu_s\": %.3f, \"client_us_per_req\": %.1f, "
           "\"idle_pct\": %.1f}\n",
           nconns, nthreads, rate, rcpts, window, req, done_txn, req / window, dunno, other, esc,
           PCT(0.50), PCT(0.90), PCT(0.99), nlat ? lat[nlat - 1] * 1e6 : 0,
           rpd0 >= 0 ? rpd1 - rpd0 : -1, rpd0 >= 0 && req ? (rpd1 - rpd0) / req * 1e6 : -1,
           self1 - self0, req ? (self1 - self0) / req * 1e6 : 0,
           tot1 > tot0 ? 100.0 * (idle1 - idle0) / (tot1 - tot0) : 0);
    for (int i = 0; i < nconns; i++) {
        close(conns[i].policy);
        close(conns[i].client);
        close(conns[i].accepted);
    }
    return other ? 1 : 0;
}
