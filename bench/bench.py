#!/usr/bin/env python3
"""restrictpd benchmark (issue 6). Run through bench/run, which installs and builds first.

Measures, side by side and in one run:
  direct:    smtp-source -> smtp-sink
  allow-all: smtp-source -> restrictpd (`default` rule, `allow *`) -> smtp-sink
  quota:     smtp-source -> restrictpd (1000 `user UID` rules, each an allow list,
             `arbitrary 50 per day` and volume caps `messages` and `recipients` high enough
             never to refuse; every recipient is outside the allow list, so every message is
             decided by the SQLite quota store, which also counts it against the caps) -> smtp-sink
  quota-pg:  the same on the PostgreSQL quota store (a private cluster on loopback, started
             and removed by this script, fsync on and synchronous_commit off, as durable as the
             SQLite store's WAL with synchronous=NORMAL; default state_pool and state_timeout; a
             scope of its own per run, so every run starts with nothing counted)
  haproxy:   smtp-source -> HAProxy (Debian's, TCP mode, 2 threads, a new sink connection per
             client connection: a byte-copying proxy, the anchor) -> smtp-sink
for 20 sessions x 10 KB and 1 session x 1 KB, one TCP connection per message (smtp-source's
default), medians of 3; and restrictpd's peak RSS (VmHWM) while relaying one 1 GiB message and
while holding 200 concurrent sessions mid-DATA.

Every message starts with a pickup-style header (`Received: by lab.localdomain (Postfix, from
userid N)` + `\tid QUEUEID; DATE`), sent with `smtp-source -F FILE`. smtp-source sends one file
per process, so a run with S sessions is S smtp-source processes in parallel (`-s 1`, one TCP
connection per message), each with its own uid (20999, 20949, ...: spread over the rule set from
its last rule down). Every mode, direct included, runs the same processes with the same files,
so the ratios compare like with like; a reference row gives direct with one smtp-source process
(`-s S -m N`), the shape of the issue's baseline.
All messages go to b@example.com, which no allow list holds: in the quota mode every message is
admitted by the SQLite store (one write transaction each; a uid's first message records the
address, the others find it counted and refresh it, the steady state of a real sender, whose new
destinations are at most 50 a day). Rotating the uid per message would take one process per uid
and message: a first version ran 40 messages per smtp-source process, and the spawning cost as
much CPU as smtp-source itself on 2 cores, which flattered restrictpd's ratio.

restrictpd runs with the peer check on (`clients root`: smtp-source runs as root), logs one
info line per message to stderr (a file), starts afresh with an empty quota database for every
run, and runs under /usr/bin/time as a cross-check of its peak RSS.

Environment overrides:
  BENCH_QUICK=1          short run: 2000 / 500 messages, 1 repetition, a 64 MiB big message
  BENCH_REPS             repetitions per measurement (3)
  BENCH_MSGS_MULTI       messages for the multi-session case (20000)
  BENCH_SESSIONS_MULTI   sessions of the multi-session case (20)
  BENCH_MSGS_SINGLE      messages for the single-session case (5000)
  BENCH_BIG_MIB          size of the big message in MiB (1024)
  BENCH_CONCURRENT       concurrent sessions of the memory test (200)
  BENCH_SKIP_THROUGHPUT=1, BENCH_SKIP_MEMORY=1
  BENCH_QUOTA_CAPS=0     the quota rule without the volume caps (for comparison)
  BENCH_MODES            comma list of modes to run (direct,haproxy,allow-all,quota,quota-pg)
  BENCH_STATE_POOL       state_pool of the quota-pg mode (4, restrictpd's default)
  BENCH_OUT              where to write the table (bench/results/latest.md; a dated copy too)
  BENCH_SKIP_POLICY=1, BENCH_SKIP_SMTPD=1, BENCH_POLICY_SECONDS, BENCH_POLICY_RATE,
  BENCH_SMTPD_MSGS       the SMTP door's rows (policy service, smtpd with and without it): see
                         bench/policy_bench.py
"""

import argparse
import os
import resource
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

UID_BASE = 20000
UID_COUNT = 1000
QUOTA = 50
# The quota rule's volume caps: counted for every message, never reached.
QUOTA_CAPS = os.environ.get("BENCH_QUOTA_CAPS", "1") != "0"
# Targets against direct delivery with the same client shape: one smtp-source process per
# session ("lanes"), one smtp-source process for all sessions ("1proc"), and one session.
TARGETS = {("multi", "lanes"): 0.75, ("multi", "1proc"): 0.60, ("single", "lanes"): 0.70}
# Targets against HAProxy with the same client shape: allow-all at least as fast, with the
# quota store at least 0.9 of it.
HAPROXY_TARGETS = {"allow-all": 1.0, "allow-all-1proc": 1.0, "quota": 0.9}
# restrictpd's CPU per message at 20 sessions (allow-all), in µs.
CPU_TARGET_US = 180
MEM_TARGET_BIG_MIB = 48
MEM_TARGET_CONCURRENT_MIB = 96


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


QUICK = os.environ.get("BENCH_QUICK") == "1"
REPS = env_int("BENCH_REPS", 1 if QUICK else 3)
MSGS_MULTI = env_int("BENCH_MSGS_MULTI", 2000 if QUICK else 20000)
SESSIONS_MULTI = env_int("BENCH_SESSIONS_MULTI", 20)
MSGS_SINGLE = env_int("BENCH_MSGS_SINGLE", 500 if QUICK else 5000)
BIG_MIB = env_int("BENCH_BIG_MIB", 64 if QUICK else 1024)
CONCURRENT = env_int("BENCH_CONCURRENT", 200)
MODES = [m for m in os.environ.get("BENCH_MODES", "direct,haproxy,allow-all,quota,quota-pg").split(",") if m]
# The PostgreSQL row against the SQLite row, at 20 sessions.
PG_TARGET = 0.8


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(2)
                try:
                    s.recv(512)  # the greeting (or a refusal): the service is up
                except OSError:
                    pass
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


# ---------------------------------------------------------------- messages


def pickup_header(uid, queue_id):
    return (
        f"Received: by lab.localdomain (Postfix, from userid {uid})\n"
        f"\tid {queue_id}; Fri, 27 Nov 2026 10:00:00 +0000 (UTC)\n"
    )


def message_text(uid, body_bytes):
    """A message file for smtp-source -F (LF lines; smtp-source sends them with CRLF).
    body_bytes counts the body as sent (CRLF lines), as smtp-source -l counts its payload."""
    qid = f"4Q{uid:05d}Bench"
    head = pickup_header(uid, qid) + (
        "From: bench@lab.localdomain\n"
        "To: b@example.com\n"
        f"Subject: restrictpd benchmark, uid {uid}\n"
        f"Message-Id: <{qid}@lab.localdomain>\n"
        "\n"
    )
    lines = []
    left = body_bytes
    n = 0
    while left > 0:
        width = min(78, left) - 2
        if width < 1:
            break
        stem = f"{n:06d} "
        line = (stem + "The quick brown fox jumps over the lazy dog. " * 2)[:width].ljust(width, "x")
        lines.append(line)
        left -= width + 2
        n += 1
    return head + "\n".join(lines) + "\n"


def write_messages(directory, body_bytes, uids):
    paths = {}
    for uid in uids:
        p = os.path.join(directory, f"msg-{body_bytes}-{uid}.txt")
        with open(p, "w") as f:
            f.write(message_text(uid, body_bytes))
        paths[uid] = p
    return paths


# ---------------------------------------------------------------- configurations


def base_config(listen_port, sink_port, state, extra=""):
    return (
        "# generated by bench/bench.py\n"
        f"listen 127.0.0.1:{listen_port}\n"
        f"relay 127.0.0.1:{sink_port}\n"
        "clients root\n"
        f"state {state}\n"
        "max_sessions 1000\n"
        # As restrictpd.conf(5) advises: as many kept relay connections as concurrent
        # sessions, which the relay (smtp-sink, no process limit) can take.
        f"relay_pool {os.environ.get('BENCH_RELAY_POOL', '20')}\n"
        f"{extra}"
    )


def config_allow_all(listen_port, sink_port, state, extra=""):
    return base_config(listen_port, sink_port, state, extra) + "\ndefault\n    allow *\n"


def config_quota(listen_port, sink_port, state, extra="", caps=None):
    caps = QUOTA_CAPS if caps is None else caps
    parts = [base_config(listen_port, sink_port, state, extra), "\n"]
    for uid in range(UID_BASE, UID_BASE + UID_COUNT):
        parts.append(
            f"user {uid}\n"
            f"    allow webmaster@example.org @lists.example.org u{uid}@example.net\n"
            f"    arbitrary {QUOTA} per day\n"
            + ("    messages 10000000 per day\n    recipients 10000000 per day\n" if caps else "")
        )
    return "".join(parts)


class PostgresState:
    """A private PostgreSQL cluster for the quota-pg mode (tests/pgcluster.py), started on first
    use, with a database per restrictpd binary (so builds of different schema versions can be
    compared), its schema created once with that binary's --init-store; stop() removes it."""

    cluster = None
    databases = {}
    runs = 0

    @classmethod
    def settings(cls, binary, workdir):
        if cls.cluster is None:
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
            import pgcluster
            # Durable as the SQLite store is in WAL mode with synchronous=NORMAL: nothing is
            # corrupted by a crash, the last commits may be lost to a power cut. track_functions
            # counts the calls of restrictpd_admit (quota_compare.py's messages per call).
            cls.cluster = pgcluster.Cluster(tempfile.mkdtemp(prefix="pg-", dir="/tmp"),
                                            server_options="-c fsync=on -c synchronous_commit=off -c track_functions=pl").init()
        if binary not in cls.databases:
            database = f"restrictpd{len(cls.databases)}" if cls.databases else pgcluster_database()
            if cls.databases:
                cls.cluster.psql(f"CREATE DATABASE {database} OWNER restrictpd")
            cls.databases[binary] = database
            init = os.path.join(workdir, f"init-store-{database}.conf")
            with open(init, "w") as f:
                f.write(cls.text("init", binary) + "default\n    allow *\n")
            subprocess.run([binary, "--config", init, "--init-store"], check=True, capture_output=True, text=True)
        cls.runs += 1
        return cls.text(f"bench-{os.getpid()}-{cls.runs}", binary)

    @classmethod
    def text(cls, scope, binary):
        pool = os.environ.get("BENCH_STATE_POOL", "4")
        uri = cls.cluster.uri.replace(f"/{pgcluster_database()}?", f"/{cls.databases[binary]}?")
        return (f"state {uri}\nstate_password_file {cls.cluster.password_file}\nscope {scope}\n"
                f"state_pool {pool}\n")

    @classmethod
    def stop(cls):
        if cls.cluster is not None:
            cls.cluster.destroy()
            cls.cluster = None
            cls.databases = {}


def pgcluster_database():
    """The database tests/pgcluster.py creates."""
    import pgcluster
    return pgcluster.DATABASE


def config_quota_pg_maker(binary, workdir):
    def make(listen_port, sink_port, state, extra=""):
        text = config_quota(listen_port, sink_port, state, extra)
        return text.replace(f"state {state}\n", PostgresState.settings(binary, workdir), 1)
    return make


# ---------------------------------------------------------------- processes


class Restrictpd:
    """restrictpd under /usr/bin/time, with a fresh state directory."""

    def __init__(self, binary, workdir, name, config_text, listen_port):
        self.dir = tempfile.mkdtemp(prefix=f"rpd-{name}-", dir=workdir)
        self.config = os.path.join(self.dir, "restrictpd.conf")
        with open(self.config, "w") as f:
            f.write(config_text.replace("@STATE@", os.path.join(self.dir, "quota.db")))
        self.log_path = os.path.join(self.dir, "restrictpd.log")
        self.time_path = os.path.join(self.dir, "time.txt")
        self.port = listen_port
        check = subprocess.run([binary, "--check-config", "--config", self.config], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"bad bench config {self.config}:\n{check.stdout}{check.stderr}")
        self.logf = open(self.log_path, "w")
        self.time_proc = subprocess.Popen(
            ["/usr/bin/time", "-o", self.time_path, "-f", "%M %e %U %S",
             binary, "--config", self.config, "--user", "root", "--log", "stderr", "--log-level", "info"],
            stdout=self.logf, stderr=self.logf)
        self.pid = self._child_pid()
        wait_port(listen_port, proc=self.time_proc)

    def _child_pid(self):
        deadline = time.time() + 10
        tp = self.time_proc.pid
        while time.time() < deadline:
            try:
                with open(f"/proc/{tp}/task/{tp}/children") as f:
                    kids = f.read().split()
                if kids:
                    return int(kids[0])
            except OSError:
                pass
            if self.time_proc.poll() is not None:
                raise RuntimeError(f"restrictpd exited at once; log {self.log_path}")
            time.sleep(0.01)
        raise RuntimeError("restrictpd did not start")

    def status(self, key):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])  # kB
        raise KeyError(key)

    def hwm_mib(self):
        return self.status("VmHWM") / 1024.0

    def rss_mib(self):
        return self.status("VmRSS") / 1024.0

    def cpu_seconds(self):
        return proc_cpu(self.pid)

    def stop(self):
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.time_proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.time_proc.wait()
        self.logf.close()
        try:
            with open(self.time_path) as f:
                last = f.read().strip().splitlines()[-1].split()
            return int(last[0]) / 1024.0  # maxrss from /usr/bin/time, MiB
        except (OSError, IndexError, ValueError):
            return None

    def verdicts(self):
        counts = {}
        with open(self.log_path, errors="replace") as f:
            for line in f:
                i = line.find("verdict=")
                if i >= 0:
                    v = line[i + 8:].split()[0]
                    counts[v] = counts.get(v, 0) + 1
        return counts


def proc_cpu(pid, kernel_only=False):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    if kernel_only:
        return int(fields[12]) / os.sysconf("SC_CLK_TCK")  # stime
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Sink:
    def cpu_seconds(self):
        return proc_cpu(self.proc.pid)

    def __init__(self, port):
        self.port = port
        # -u nobody: required as root; 1024: listen backlog. Discards every message.
        self.proc = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "1024"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, proc=self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class HAProxy:
    """The anchor: Debian's haproxy in TCP mode with 2 threads, copying bytes between the
    client and the sink without understanding SMTP, one new sink connection per client
    connection. It stands for what a well-built loopback proxy costs on this machine."""

    def __init__(self, workdir, port, sink_port):
        self.port = port
        self.config = os.path.join(workdir, f"haproxy-{port}.cfg")
        with open(self.config, "w") as f:
            f.write(
                "global\n"
                "    nbthread 2\n"
                "    maxconn 4096\n"
                "defaults\n"
                "    mode tcp\n"
                "    timeout connect 5s\n"
                "    timeout client 120s\n"
                "    timeout server 120s\n"
                "listen smtp\n"
                f"    bind 127.0.0.1:{port}\n"
                f"    server sink 127.0.0.1:{sink_port}\n")
        # -db: foreground, no daemon; the process measured is this one.
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", self.config],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, proc=self.proc)

    def cpu_seconds(self):
        return proc_cpu(self.proc.pid)

    def kernel_seconds(self):
        return proc_cpu(self.proc.pid, kernel_only=True)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_haproxy(workdir, sink_port, load):
    """A fresh HAProxy in front of the sink, under `load(port)`: its CPU and kernel seconds."""
    port = free_port()
    proxy = HAProxy(workdir, port, sink_port)
    try:
        cpu0, sys0 = proxy.cpu_seconds(), proxy.kernel_seconds()
        result = load(port)
        cpu, kernel = proxy.cpu_seconds() - cpu0, proxy.kernel_seconds() - sys0
    finally:
        proxy.stop()
    return result, cpu, kernel


# ---------------------------------------------------------------- load


def lane_uids(sessions):
    """One uid per lane, spread over the rule set from its last rule down (the last rule is the
    worst case for a lookup that scans the rules in order)."""
    step = max(1, UID_COUNT // sessions)
    return [UID_BASE + UID_COUNT - 1 - (i * step) % UID_COUNT for i in range(sessions)]


def run_lanes(port, files, total, sessions):
    """`sessions` smtp-source processes in parallel, one session each, each with its own uid."""
    procs = []
    t0 = time.perf_counter()
    for i, uid in enumerate(lane_uids(sessions)):
        m = total // sessions + (1 if i < total % sessions else 0)
        procs.append((uid, subprocess.Popen(
            ["smtp-source", "-s", "1", "-m", str(m), "-F", files[uid],
             "-f", "bench@lab.localdomain", "-t", "b@example.com", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    failures = []
    for uid, p in procs:
        err = p.communicate()[1]
        if p.returncode != 0:
            failures.append(f"uid {uid}: {err.strip()[:200]}")
    return time.perf_counter() - t0, failures


def run_single_process(port, file, total, sessions):
    t0 = time.perf_counter()
    p = subprocess.run(
        ["smtp-source", "-s", str(sessions), "-m", str(total), "-F", file,
         "-f", "bench@lab.localdomain", "-t", "b@example.com", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - t0, ([] if p.returncode == 0 else [p.stderr.strip()[:200]])


# ---------------------------------------------------------------- a tiny SMTP client


class Client:
    def __init__(self, port, timeout=600):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def reply(self):
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise RuntimeError(f"connection closed; got {lines!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode(errors="replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), lines

    def cmd(self, text, expect):
        self.sock.sendall(text.encode() + b"\r\n")
        code, lines = self.reply()
        if code != expect:
            raise RuntimeError(f"{text!r}: expected {expect}, got {lines}")
        return lines

    def start_data(self, uid, rcpt="b@example.com"):
        code, lines = self.reply()
        if code != 220:
            raise RuntimeError(f"greeting {lines}")
        self.cmd("EHLO bench.localdomain", 250)
        self.cmd("MAIL FROM:<bench@lab.localdomain>", 250)
        self.cmd(f"RCPT TO:<{rcpt}>", 250)
        self.cmd("DATA", 354)
        hdr = pickup_header(uid, f"4Q{uid:05d}Big") + "Subject: big\n\n"
        self.sock.sendall(hdr.replace("\n", "\r\n").encode())

    def finish(self):
        self.sock.sendall(b".\r\n")
        code, lines = self.reply()
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except (OSError, RuntimeError):
            pass
        self.sock.close()
        return code, lines


LINE = b"y" * 998 + b"\r\n"  # 1000-byte lines


def memory_big(binary, workdir, sink_port):
    port = free_port()
    cfg = config_allow_all(port, sink_port, "@STATE@", "message_size_limit 0\ndata_timeout 1h\n")
    rpd = Restrictpd(binary, workdir, "big", cfg, port)
    try:
        idle = rpd.hwm_mib()
        total = BIG_MIB * 1024 * 1024
        chunk = LINE * 1024  # 1000 lines, 1 024 000 bytes
        c = Client(port)
        c.start_data(UID_BASE)
        sent = 0
        t0 = time.perf_counter()
        while sent < total:
            c.sock.sendall(chunk)
            sent += len(chunk)
        code, lines = c.finish()
        elapsed = time.perf_counter() - t0
        hwm = rpd.hwm_mib()
    finally:
        maxrss = rpd.stop()
    return {"bytes": sent, "code": code, "reply": lines[-1], "seconds": elapsed, "idle_hwm": idle,
            "hwm": hwm, "time_maxrss": maxrss}


def memory_concurrent(binary, workdir, sink_port):
    port = free_port()
    cfg = config_allow_all(port, sink_port, "@STATE@")  # max_sessions 1000 is in every bench config
    rpd = Restrictpd(binary, workdir, "concurrent", cfg, port)
    clients = []
    try:
        idle = rpd.hwm_mib()
        part = LINE * 64  # 64 000 bytes before the hold, as much again after
        for i in range(CONCURRENT):
            c = Client(port, timeout=120)
            c.start_data(UID_BASE + i % UID_COUNT)
            c.sock.sendall(part)
            clients.append(c)
        time.sleep(1.0)  # let restrictpd relay what it has; every session is now mid-DATA
        open_sessions = sum(1 for _ in os.listdir(f"/proc/{rpd.pid}/fd"))
        held_hwm = rpd.hwm_mib()
        held_rss = rpd.rss_mib()
        for c in clients:
            c.sock.sendall(part)
        codes = {}
        for c in clients:
            code, _ = c.finish()
            codes[code] = codes.get(code, 0) + 1
        hwm = rpd.hwm_mib()
    finally:
        for c in clients:
            try:
                c.sock.close()
            except OSError:
                pass
        maxrss = rpd.stop()
    return {"sessions": len(clients), "codes": codes, "idle_hwm": idle, "held_hwm": held_hwm,
            "held_rss": held_rss, "hwm": hwm, "time_maxrss": maxrss, "fds_while_held": open_sessions}


# ---------------------------------------------------------------- throughput


def with_cpu(sink, fn, *a):
    """Runs a load; returns (elapsed, failures, smtp-source + smtp-sink CPU seconds)."""
    c0, s0 = children_cpu(), sink.cpu_seconds()
    el, fails = fn(*a)
    return el, fails, (children_cpu() - c0) + (sink.cpu_seconds() - s0)


class ProxiedRun:
    """What run_proxied measured: the load's own result, and restrictpd's side of it."""

    def __init__(self, result, cpu, kernel, hwm, verdicts, log_path):
        self.result, self.cpu, self.kernel, self.hwm = result, cpu, kernel, hwm
        self.verdicts, self.log_path = verdicts, log_path
        self.relayed = verdicts.get("relayed", 0)


def run_proxied(binary, workdir, name, make, sink_port, load):
    """A fresh restrictpd (configuration from `make`) in front of the sink, under `load(port)`:
    restrictpd's CPU and kernel seconds during the load, its VmHWM, and its verdicts."""
    port = free_port()
    rpd = Restrictpd(binary, workdir, name, make(port, sink_port, "@STATE@"), port)
    try:
        cpu0, sys0 = rpd.cpu_seconds(), proc_cpu(rpd.pid, kernel_only=True)
        result = load(port)
        cpu = rpd.cpu_seconds() - cpu0
        kernel = proc_cpu(rpd.pid, kernel_only=True) - sys0
        hwm = rpd.hwm_mib()
    finally:
        rpd.stop()
    return ProxiedRun(result, cpu, kernel, hwm, rpd.verdicts(), rpd.log_path)


def measure_throughput(binary, workdir, sink, files, scenario, total, sessions):
    """Returns rows: mode -> list of (msg/s, hwm, restrictpd CPU µs/msg, note, source+sink CPU µs/msg)."""
    sink_port = sink.port
    results = {m: [] for m in MODES}
    results["direct-1proc"] = []
    everything = ["direct-1proc"] + MODES
    for proxy in ("allow-all", "haproxy"):
        if sessions > 1 and proxy in MODES:
            # Like for like with the reference row: the same single smtp-source process (one
            # uid), through the proxy.
            results[f"{proxy}-1proc"] = []
            everything.append(f"{proxy}-1proc")
    for rep in range(REPS):
        # The order rotates with each repetition, so that no mode always runs first or last
        # (on a shared machine the load drifts, and each run leaves TIME_WAIT sockets behind).
        k = rep % len(everything)
        for mode in everything[k:] + everything[:k]:
            if mode == "direct-1proc":
                # Reference: one smtp-source process, as the baseline was measured.
                el, fails, lc = with_cpu(sink, run_single_process, sink_port, files[lane_uids(1)[0]], total, sessions)
                results[mode].append((total / el, None, None, f"{len(fails)} failed" if fails else "", lc / total * 1e6))
                log(f"{scenario} rep {rep + 1}: direct (one smtp-source) {total / el:.0f} msg/s")
                continue
            if mode == "direct":
                el, fails, lc = with_cpu(sink, run_lanes, sink_port, files, total, sessions)
                note = f"{len(fails)} smtp-source runs failed: {fails[0]}" if fails else ""
                results[mode].append((total / el, None, None, note, lc / total * 1e6))
                log(f"{scenario} rep {rep + 1}: direct {total / el:.0f} msg/s {note}")
                continue
            if mode in ("haproxy", "haproxy-1proc"):
                one = mode == "haproxy-1proc"

                def load(port, one=one):
                    if one:
                        return with_cpu(sink, run_single_process, port, files[lane_uids(1)[0]], total, sessions)
                    return with_cpu(sink, run_lanes, port, files, total, sessions)
                (el, fails, lc), cpu, kernel = run_haproxy(workdir, sink_port, load)
                note = f"{len(fails)} smtp-source runs failed: {fails[0]}" if fails else ""
                results[mode].append((total / el, None, cpu / total * 1e6, note, lc / total * 1e6,
                                      kernel / cpu if cpu > 0 else 0.0))
                log(f"{scenario} rep {rep + 1}: {mode} {total / el:.0f} msg/s, CPU {cpu / total * 1e6:.0f} µs/msg {note}")
                continue
            make = {"quota": config_quota, "quota-pg": config_quota_pg_maker(binary, workdir)}.get(mode, config_allow_all)
            if mode == "allow-all-1proc":
                def load(port):
                    return with_cpu(sink, run_single_process, port, files[lane_uids(1)[0]], total, sessions)
            else:
                def load(port):
                    return with_cpu(sink, run_lanes, port, files, total, sessions)
            run = run_proxied(binary, workdir, f"{mode}-{scenario}", make, sink_port, load)
            el, fails, lc = run.result
            cpu, hwm = run.cpu, run.hwm
            kernel_share = run.kernel / cpu if cpu > 0 else 0.0
            notes = []
            if fails:
                notes.append(f"{len(fails)} smtp-source runs failed: {fails[0]}")
            if run.relayed != total:
                notes.append(f"relayed {run.relayed} of {total}; verdicts {run.verdicts}; log {run.log_path}")
            note = "; ".join(notes)
            results[mode].append((total / el, hwm, cpu / total * 1e6, note, lc / total * 1e6, kernel_share))
            log(f"{scenario} rep {rep + 1}: {mode} {total / el:.0f} msg/s, VmHWM {hwm:.1f} MiB, "
                f"CPU {cpu / total * 1e6:.0f} µs/msg {note}")
    return results


# ---------------------------------------------------------------- report


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    return {"nproc": os.cpu_count(), "model": model, "mem": mem, "kernel": platform.release(),
            "os": open("/etc/debian_version").read().strip() if os.path.exists("/etc/debian_version") else "?"}


def git_rev(repo):
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "Sources", "Package.swift"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (Sources modified)" if dirty else "")
    except OSError:
        return "?"


def fmt(x, spec="{:.0f}"):
    return "-" if x is None else spec.format(x)


def report(args, m, load_before, load_after, thr, mem, door=None):
    out = []
    out.append("# restrictpd benchmark")
    out.append("")
    out.append(f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    out.append(f"- machine: {m['nproc']} CPUs, {m['model']}, {m['mem']} RAM, Linux {m['kernel']}, Debian {m['os']}")
    out.append(f"- load average before / after: {load_before} / {load_after}")
    out.append(f"- restrictpd: {args.restrictpd} (release), commit {git_rev(args.repo)}")
    out.append(f"- command: bench/run{' (BENCH_QUICK=1)' if QUICK else ''}; {REPS} repetition(s), median shown, "
               f"one TCP connection per message, one smtp-source process per session, each with its own uid")
    out.append("")
    if thr:
        out.append("| scenario | path | msg/s (median) | runs (msg/s) | ratio to direct (same client shape) | target | met | "
                   "ratio to HAProxy (same client shape) | target | met | restrictpd VmHWM MiB | "
                   "proxy CPU µs/msg (kernel share) | smtp-source+sink CPU µs/msg |")
        out.append("|---|---|---:|---|---:|---:|---|---:|---:|---|---:|---:|---:|")
        labels = {
            "direct-1proc": "direct, one smtp-source process (reference)",
            "direct": "direct: smtp-source -> smtp-sink",
            "haproxy": "HAProxy, TCP mode (anchor)",
            "haproxy-1proc": "HAProxy, TCP mode, one smtp-source process",
            "allow-all": "restrictpd, allow-all rule",
            "allow-all-1proc": "restrictpd, allow-all rule, one smtp-source process (like the reference)",
            "quota": "restrictpd, 1000 users, quota (SQLite)",
            "quota-pg": "restrictpd, 1000 users, quota (PostgreSQL, local cluster)",
        }
        proxied = ("allow-all", "quota", "quota-pg", "allow-all-1proc", "haproxy", "haproxy-1proc")
        for key, (title, total, sessions) in thr["scenarios"].items():
            res = thr["results"][key]

            def median(mode):
                return statistics.median(r[0] for r in res[mode]) if res.get(mode) else None
            for mode in ["direct-1proc"] + MODES + ["allow-all-1proc", "haproxy-1proc"]:
                runs = res.get(mode) or []
                if not runs:
                    continue
                med = statistics.median(r[0] for r in runs)
                # Each proxy row against the direct row and the HAProxy row with the same
                # smtp-source processes.
                one = mode.endswith("-1proc")
                same = median("direct-1proc" if one else "direct")
                anchor = median("haproxy-1proc" if one else "haproxy")
                ratio = med / same if same and mode in proxied else None
                # The targets are restrictpd's; HAProxy's rows show its ratio without one.
                ours = mode in proxied and not mode.startswith("haproxy")
                target = TARGETS.get((key, "1proc" if one else "lanes")) if ours else None
                met = "-" if target is None or ratio is None else ("yes" if ratio >= target else "NO")
                hratio = med / anchor if anchor and mode in HAPROXY_TARGETS else None
                htarget = HAPROXY_TARGETS.get(mode)
                hmet = "-" if hratio is None else ("yes" if hratio >= htarget else "NO")
                hwm = max((r[1] for r in runs if r[1] is not None), default=None)
                cpu = statistics.median([r[2] for r in runs if r[2] is not None]) if mode in proxied else None
                lcpu = statistics.median(r[4] for r in runs)
                ksh = statistics.median(r[5] for r in runs) if mode in proxied else None
                cpu_text = "-" if cpu is None else f"{cpu:.0f} ({ksh * 100:.0f}%)"
                out.append(
                    f"| {title} | {labels[mode]} | {med:.0f} | {', '.join(f'{r[0]:.0f}' for r in runs)} | "
                    f"{fmt(ratio, '{:.2f}')} | {fmt(target, '{:.2f}')} | {met} | {fmt(hratio, '{:.2f}')} | "
                    f"{fmt(htarget, '{:.1f}')} | {hmet} | {fmt(hwm, '{:.1f}')} | {cpu_text} | {fmt(lcpu)} |")
            if sessions > 1 and res.get("allow-all"):
                cpu = statistics.median(r[2] for r in res["allow-all"])
                met = "yes" if cpu < CPU_TARGET_US else "NO"
                out.append(f"\nrestrictpd CPU per message, allow-all ({title}): {cpu:.0f} µs "
                           f"(target under {CPU_TARGET_US}: {met})")
            if res.get("quota") and res.get("quota-pg"):
                pg = statistics.median(r[0] for r in res["quota-pg"]) / statistics.median(r[0] for r in res["quota"])
                met = "yes" if pg >= PG_TARGET else "NO"
                out.append(f"\nquota on PostgreSQL / quota on SQLite ({title}): {pg:.2f} (target {PG_TARGET} at 20 sessions: {met})")
            notes = [f"{mode}: {r[3]}" for mode in res for r in res[mode] if r[3]]
            for n in notes:
                out.append(f"\nnote ({title}): {n}")
        out.append("")
    if mem:
        out.append("| memory test | restrictpd VmHWM MiB | target MiB | met | detail |")
        out.append("|---|---:|---:|---|---|")
        if "big" in mem:
            b = mem["big"]
            ok = b["hwm"] < MEM_TARGET_BIG_MIB and b["code"] == 250
            out.append(
                f"| one {b['bytes'] / 2**20:.0f} MiB message (1000-byte lines) | {b['hwm']:.1f} | < {MEM_TARGET_BIG_MIB} | "
                f"{'yes' if ok else 'NO'} | reply {b['code']}, {b['bytes'] / 2**20 / b['seconds']:.0f} MiB/s through restrictpd, "
                f"idle VmHWM {b['idle_hwm']:.1f}, /usr/bin/time maxrss {fmt(b['time_maxrss'], '{:.1f}')} |")
        if "concurrent" in mem:
            c = mem["concurrent"]
            ok = c["hwm"] < MEM_TARGET_CONCURRENT_MIB and c["codes"].get(250, 0) == c["sessions"]
            out.append(
                f"| {c['sessions']} concurrent sessions held mid-DATA | {c['hwm']:.1f} | < {MEM_TARGET_CONCURRENT_MIB} | "
                f"{'yes' if ok else 'NO'} | replies {c['codes']}, VmHWM while held {c['held_hwm']:.1f} "
                f"(RSS {c['held_rss']:.1f}, {c['fds_while_held']} fds), idle VmHWM {c['idle_hwm']:.1f}, "
                f"/usr/bin/time maxrss {fmt(c['time_maxrss'], '{:.1f}')} |")
        for k in ("error_big", "error_concurrent"):
            if k in mem:
                out.append(f"\nmemory test failed ({k[6:]}): {mem[k]}")
        out.append("")
    for text in (door or []):
        out.append(text)
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--restrictpd", required=True)
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="restrictpd-bench-")
    load_before = " ".join(open("/proc/loadavg").read().split()[:3])
    log(f"work directory {workdir}")
    sink_port = free_port()
    sink = Sink(sink_port)
    thr = None
    mem = {}
    door = []
    try:
        if os.environ.get("BENCH_SKIP_THROUGHPUT") != "1":
            scenarios = {
                "multi": (f"{SESSIONS_MULTI} sessions x 10 KB, {MSGS_MULTI} msgs", MSGS_MULTI, SESSIONS_MULTI, 10240),
                "single": (f"1 session x 1 KB, {MSGS_SINGLE} msgs", MSGS_SINGLE, 1, 1024),
            }
            thr = {"scenarios": {}, "results": {}}
            for key, (title, total, sessions, size) in scenarios.items():
                files = write_messages(workdir, size, set(lane_uids(sessions)))
                thr["scenarios"][key] = (title, total, sessions)
                thr["results"][key] = measure_throughput(args.restrictpd, workdir, sink, files, key, total, sessions)
        if os.environ.get("BENCH_SKIP_MEMORY") != "1":
            try:
                log(f"memory: one {BIG_MIB} MiB message")
                mem["big"] = memory_big(args.restrictpd, workdir, sink_port)
                log(f"memory: big message VmHWM {mem['big']['hwm']:.1f} MiB, reply {mem['big']['reply']}")
            except Exception as e:  # keep the throughput table
                mem["error_big"] = repr(e)
                log(f"memory: big message test failed: {e!r}")
            try:
                log(f"memory: {CONCURRENT} concurrent sessions")
                mem["concurrent"] = memory_concurrent(args.restrictpd, workdir, sink_port)
                log(f"memory: concurrent VmHWM {mem['concurrent']['hwm']:.1f} MiB, replies {mem['concurrent']['codes']}")
            except Exception as e:
                mem["error_concurrent"] = repr(e)
                log(f"memory: concurrent test failed: {e!r}")
        # The SMTP door: the policy service alone, then Postfix's smtpd with and without it.
        import policy_bench
        if os.environ.get("BENCH_SKIP_POLICY") != "1":
            try:
                log("policy service: closed-loop C client")
                door.append(policy_bench.report_policy(policy_bench.run_policy(args.restrictpd, workdir)))
            except Exception as e:
                door.append(f"policy test failed: {e!r}\n")
                log(f"policy: failed: {e!r}")
        if os.environ.get("BENCH_SKIP_SMTPD") != "1":
            try:
                log("smtpd: smtp-source into a private Postfix, with and without the policy service")
                door.append(policy_bench.report_smtpd(policy_bench.run_smtpd(args.restrictpd, workdir, sink)))
            except Exception as e:
                door.append(f"smtpd test failed: {e!r}\n")
                log(f"smtpd: failed: {e!r}")
    finally:
        sink.stop()
        PostgresState.stop()
    load_after = " ".join(open("/proc/loadavg").read().split()[:3])
    text = report(args, machine(), load_before, load_after, thr, mem, door)
    print(text)
    out = os.environ.get("BENCH_OUT") or os.path.join(args.repo, "bench", "results", "latest.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    dated = os.path.join(os.path.dirname(out), time.strftime("bench-%Y%m%d-%H%M%S.md"))
    with open(dated, "w") as f:
        f.write(text)
    for name in os.listdir(workdir):  # the message files; the logs and configurations stay
        if name.startswith("msg-"):
            os.remove(os.path.join(workdir, name))
    log(f"table written to {out} and {dated}; logs and configurations in {workdir}")


if __name__ == "__main__":
    main()
