"""The SMTP door's benchmark: restrictpd as Postfix's access policy service.

Imported by bench/bench.py, which prints these tables after its own. Two measurements:

policy: requests straight to restrictpd's policy listener from bench/policy_load.c (compiled
  here with gcc), a closed-loop client in C: a thread per core, each with an epoll over its
  share of the connections, one request outstanding per connection. Each connection stands for one smtpd process with its SMTP client: the client
  holds a real TCP connection to a dummy listener, whose 4-tuple the requests carry, so that
  restrictpd's sock_diag lookup finds its owner. Each simulated transaction is 2 RCPT requests
  and 1 END-OF-MESSAGE request, the attributes Postfix 3.7 sends. Shapes:
    allow-all: `default` rule `allow *`;
    quota: 1000 `user` rules (uids 20000...20999), each an allow list that the recipients miss
      and `arbitrary 1000 per day`. Each connection is its own uid (the client socket is
      created with that file-system uid) and cycles through 40 recipients of its own, so that
      every RCPT goes to the quota store and every END-OF-MESSAGE commits in a write
      transaction, while the counted addresses stay at the size of a real sender's;
    quota, one uid: 20 connections whose clients are all root (`user root`, the same quota):
      one user sending in parallel, as a web application with a mail queue does;
  over 1 connection and 20, each at saturation (the next request as soon as the answer is
  there: requests/s, restrictpd's CPU per request from /proc/PID/stat) and, for 20
  connections, paced at 10,000 requests/s in total (latency at the target rate, since at
  saturation 20 outstanding requests queue by construction: mean latency = 20 / throughput).

smtpd: smtp-source (one process, 20 sessions, one connection per message) into a private
  Postfix's smtpd on loopback that relays to smtp-sink, through three smtpd services of one
  Postfix instance: one with Postfix's restrictions only, two that ask restrictpd first
  (check_policy_service before permit_mynetworks in smtpd_relay_restrictions, and in
  smtpd_end_of_data_restrictions, as etc/postfix/main.cf.restrictpd wires it), each its own
  restrictpd: smtp-source runs as root, whose rule is `allow *` in one and a quota in the other
  (every message to the same recipient: counted once, then refreshed at each END-OF-MESSAGE).
  msg/s is smtp-source's rate (smtpd's replies); the queue is drained to the sink between
  runs, so that no run pays for the one before.

Environment overrides (besides bench.py's):
  BENCH_SKIP_POLICY=1, BENCH_SKIP_SMTPD=1
  BENCH_POLICY_SECONDS   measured seconds per policy run (3; quick: 2), after 1 s of warm-up
  BENCH_POLICY_RATE      the paced rate in requests/s (10000)
  BENCH_SMTPD_MSGS       messages per smtpd run (3000; quick: 1000)
"""

import os
import json
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

import bench

QUICK = bench.QUICK
POLICY_SECONDS = float(os.environ.get("BENCH_POLICY_SECONDS") or (2 if QUICK else 3))
POLICY_RATE = bench.env_int("BENCH_POLICY_RATE", 10000)
SMTPD_MSGS = bench.env_int("BENCH_SMTPD_MSGS", 1000 if QUICK else 3000)
SMTPD_SESSIONS = 20
SMTPD_MODES = ["without", "with", "with-quota"]
POLICY_TARGET_RPS = 10000
POLICY_TARGET_P99_US = 2000
SMTPD_TARGET = 0.9
POLICY_QUOTA = 1000     # arbitrary N per day: far above what one connection's 40 recipients use
POOL = 40               # distinct recipients per connection (uid), cycled
HERE = os.path.dirname(os.path.abspath(__file__))


def build_load(workdir):
    """Compiles bench/policy_load.c; returns the binary's path."""
    out = os.path.join(workdir, "policy_load")
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", out, os.path.join(HERE, "policy_load.c")], check=True)
    return out


def config_policy(policy_port, quota, relay=None, clients="root"):
    """A restrictpd configuration with a policy listener (the content filter's listener and
    relay are required but idle here). `clients`: the peer check's list; Postfix's smtpd
    asks as postfix, the C client as root."""
    listen = bench.free_port()
    text = bench.base_config(listen, relay or bench.free_port(), "@STATE@", f"policy_listen 127.0.0.1:{policy_port}\n")
    text = text.replace("clients root\n", f"clients {clients}\n")
    if not quota:
        return listen, text + "\ndefault\n    allow *\n"
    parts = [text, "\n"]
    for uid in range(bench.UID_BASE, bench.UID_BASE + bench.UID_COUNT):
        parts.append(f"user {uid}\n    allow webmaster@example.org u{uid}@example.net\n"
                     f"    arbitrary {POLICY_QUOTA} per day\n")
    parts.append(f"user root\n    allow webmaster@example.org\n    arbitrary {POLICY_QUOTA} per day\n")
    return listen, "".join(parts)


# The policy shapes: (key, label, rules, connections, paced, uid base or None for root's).
SHAPES = [
    ("allow-1", "allow-all", False, 1, False, 20000),
    ("allow-20", "allow-all", False, 20, False, 20100),
    ("allow-20-paced", "allow-all", False, 20, True, 20200),
    ("quota-1", "quota", True, 1, False, 20000),
    ("quota-20", "quota", True, 20, False, 20100),
    ("quota-20-paced", "quota", True, 20, True, 20200),
    ("quota-20-root", "quota, all 20 clients one uid (root)", True, 20, False, None),
]


def run_policy(binary, workdir):
    """Every shape, REPS times; a fresh restrictpd (and empty quota store) per rules set and
    repetition. Returns key -> list of policy_load's JSON results."""
    load = build_load(workdir)
    results = {key: [] for key, *_ in SHAPES}
    for rep in range(bench.REPS):
        for quota in (False, True):
            policy_port = bench.free_port()
            listen, text = config_policy(policy_port, quota)
            rpd = bench.Restrictpd(binary, workdir, f"policy-{'quota' if quota else 'allow'}", text, listen)
            try:
                for key, label, q, conns, paced, uid_base in SHAPES:
                    if q != quota:
                        continue
                    argv = [load, "--port", str(policy_port), "--conns", str(conns), "--seconds", str(POLICY_SECONDS),
                            "--warmup", "1", "--rcpts", "2", "--pool", str(POOL), "--pid", str(rpd.pid),
                            "--threads", str(min(conns, os.cpu_count() or 1))]
                    if uid_base is not None:
                        argv += ["--uid-base", str(uid_base)]
                    if paced:
                        argv += ["--rate", str(POLICY_RATE)]
                    p = subprocess.run(argv, capture_output=True, text=True, timeout=POLICY_SECONDS + 60)
                    try:
                        r = json.loads(p.stdout)
                    except ValueError:
                        r = {"error": (p.stderr or p.stdout).strip()[:300]}
                    results[key].append(r)
                    if "error" in r:
                        bench.log(f"policy rep {rep + 1}: {key}: FAILED {r['error']}")
                    else:
                        bench.log(f"policy rep {rep + 1}: {key}: {r['rps']:.0f} req/s, {r['daemon_us_per_req']:.0f} µs CPU/req, "
                                  f"p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs, client {r['client_us_per_req']:.1f} µs/req"
                                  + (f", {r['other']} not DUNNO: {r['first_other']}" if r["other"] else ""))
            finally:
                rpd.stop()
    return results


def report_policy(results):
    out = ["| policy shape | connections | requests/s (median) | runs (req/s) | restrictpd CPU µs/request | p50 µs | p99 µs | "
           "answers not DUNNO | client CPU µs/request | idle % | target | met |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for key, label, quota, conns, paced, _ in SHAPES:
        runs = [r for r in results.get(key, []) if "error" not in r]
        errors = [r["error"] for r in results.get(key, []) if "error" in r]
        if not runs:
            if errors:
                out.append(f"| {label} | {conns} | - | failed: {errors[0]} | | | | | | | | |")
            continue

        def med(k):
            return statistics.median(r[k] for r in runs)
        rps, p99 = med("rps"), med("p99_us")
        shape = f"{label}, paced at {POLICY_RATE} req/s" if paced else f"{label}, saturated"
        if paced:
            target = f"p99 < {POLICY_TARGET_P99_US} µs at {POLICY_RATE} req/s"
            met = "yes" if p99 < POLICY_TARGET_P99_US and rps >= 0.95 * POLICY_RATE else "NO"
        elif conns == 20 and key != "quota-20-root":
            target = f">= {POLICY_TARGET_RPS} req/s"
            met = "yes" if rps >= POLICY_TARGET_RPS else "NO"
        else:
            target, met = "-", "-"
        others = sum(r["other"] for r in runs)
        if others and met != "-":
            met = "NO (answers not DUNNO)"
        first = next((r["first_other"] for r in runs if r["other"]), "")
        out.append(
            f"| {shape} | {conns} | {rps:.0f} | {', '.join('%.0f' % r['rps'] for r in runs)} | {med('daemon_us_per_req'):.0f} | "
            f"{med('p50_us'):.0f} | {p99:.0f} | {others}{' (' + first + ')' if first else ''} | {med('client_us_per_req'):.1f} | "
            f"{med('idle_pct'):.0f} | {target} | {met} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- a private Postfix

MASTER_CF = """\
# generated by bench/policy_bench.py: Debian's services, none chrooted, three smtpd listeners:
# Postfix's restrictions only, restrictpd allow-all, restrictpd with a quota for root
127.0.0.1:{plain} inet n - n - - smtpd
  -o syslog_name=postfix/plain
  -o smtpd_relay_restrictions=permit_mynetworks,reject_unauth_destination
  -o smtpd_end_of_data_restrictions=
127.0.0.1:{policy} inet n - n - - smtpd
  -o syslog_name=postfix/policy
127.0.0.1:{quota} inet n - n - - smtpd
  -o syslog_name=postfix/quota
  -o smtpd_relay_restrictions=check_policy_service,inet:127.0.0.1:{quota_policy},permit_mynetworks,reject_unauth_destination
  -o smtpd_end_of_data_restrictions=check_policy_service,inet:127.0.0.1:{quota_policy}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
# generated by bench/policy_bench.py: a private instance, loopback only, relaying to smtp-sink
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {spool}
data_directory = {data}
maillog_file = {maillog}
myhostname = lab.localdomain
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink}
smtp_dns_support_level = disabled
local_transport = error:no local delivery in the bench
local_recipient_maps =
alias_maps =
alias_database =
biff = no
default_destination_concurrency_limit = 20
# As etc/postfix/main.cf.restrictpd wires the SMTP door (the "plain" smtpd overrides both)
smtpd_relay_restrictions =
    check_policy_service inet:127.0.0.1:{policy},
    permit_mynetworks, reject_unauth_destination
smtpd_end_of_data_restrictions =
    check_policy_service inet:127.0.0.1:{policy}
"""

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class Postfix:
    def __init__(self, sink_port, policy_port, quota_policy_port):
        # Under /var: maillog_file must be under one of maillog_file_prefixes (/var, /dev/stdout).
        os.makedirs("/var/tmp/restrictpd-bench", exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="postfix-", dir="/var/tmp/restrictpd-bench")
        os.chmod(self.dir, 0o755)
        self.etc, self.spool, self.data = (os.path.join(self.dir, d) for d in ("etc", "spool", "data"))
        for d in (self.etc, self.spool, self.data):
            os.makedirs(d)
            os.chmod(d, 0o755)
        shutil.chown(self.data, "postfix", "postfix")
        self.maillog = os.path.join(self.dir, "maillog")
        self.plain_port, self.policy_smtpd_port, self.quota_smtpd_port = (bench.free_port() for _ in range(3))
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(etc=self.etc, spool=self.spool, data=self.data, maillog=self.maillog,
                                   sink=sink_port, policy=policy_port))
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(plain=self.plain_port, policy=self.policy_smtpd_port, quota=self.quota_smtpd_port,
                                     quota_policy=quota_policy_port))
        p = subprocess.run(["postfix", "-c", self.etc, "start"], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"postfix start failed: {p.stderr.strip()[:500]}")
        bench.wait_port(self.plain_port)
        bench.wait_port(self.policy_smtpd_port)
        bench.wait_port(self.quota_smtpd_port)

    def cpu_seconds(self):
        """CPU seconds of the whole instance: master with the children it has reaped (smtpd
        processes exit after max_use sessions), plus the children alive now."""
        with open(os.path.join(self.spool, "pid", "master.pid")) as f:
            master = int(f.read().split()[0])
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, ppid = int(entry), int(fields[1])
            if pid == master:
                total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
            elif ppid == master:
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def queued(self):
        n = 0
        for q in QUEUES:
            for _, _, files in os.walk(os.path.join(self.spool, q)):
                n += len(files)
        return n

    def wait_drained(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.queued() == 0:
                return True
            time.sleep(0.1)
        return False

    def stop(self):
        subprocess.run(["postfix", "-c", self.etc, "stop"], capture_output=True, timeout=60)
        try:
            with open(os.path.join(self.spool, "pid", "master.pid")) as f:
                pid = int(f.read().split()[0])
            deadline = time.time() + 10
            while time.time() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def smtp_source(port, msgs, sessions):
    t0 = time.perf_counter()
    p = subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(msgs), "-l", "1024",
                        "-f", "bench@lab.localdomain", "-t", "b@example.com", f"127.0.0.1:{port}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - t0, ([] if p.returncode == 0 else [p.stderr.strip()[:200]])


def run_smtpd(binary, workdir, sink):
    """smtp-source into the three smtpd services, in rotating order, REPS times each after a
    warm-up. Returns (mode -> list of (msg/s, restrictpd CPU µs/msg or None, note, drain
    seconds, idle %), verdicts per restrictpd, the Postfix directory)."""
    daemons = {}
    pf = None
    results = {m: [] for m in SMTPD_MODES}
    try:
        for mode, quota in (("with", False), ("with-quota", True)):
            port = bench.free_port()
            listen, text = config_policy(port, quota=quota, relay=sink.port, clients="postfix root")
            daemons[mode] = (bench.Restrictpd(binary, workdir, f"smtpd-{mode}", text, listen), port)
        pf = Postfix(sink.port, daemons["with"][1], daemons["with-quota"][1])
        ports = {"without": pf.plain_port, "with": pf.policy_smtpd_port, "with-quota": pf.quota_smtpd_port}
        for mode in SMTPD_MODES:  # warm-up: smtpd processes started, policy connections open
            smtp_source(ports[mode], 200, SMTPD_SESSIONS)
        pf.wait_drained()
        for rep in range(bench.REPS):
            k = rep % len(SMTPD_MODES)
            for mode in SMTPD_MODES[k:] + SMTPD_MODES[:k]:
                rpd = daemons[mode][0] if mode in daemons else None
                # CPU of everything on the mail path, until the queue is drained: on a shared
                # machine the cost per message compares the modes even when other work takes
                # a varying share of the cores.
                cpu0 = rpd.cpu_seconds() if rpd else 0
                pf0, src0 = pf.cpu_seconds(), bench.children_cpu()
                total0, idle0 = cpu_idle()
                el, fails = smtp_source(ports[mode], SMTPD_MSGS, SMTPD_SESSIONS)
                total1, idle1 = cpu_idle()
                idle = 100.0 * (idle1 - idle0) / max(1, total1 - total0)
                t0 = time.perf_counter()
                drained = pf.wait_drained()
                drain = time.perf_counter() - t0
                cpu = rpd.cpu_seconds() - cpu0 if rpd else None
                pcpu = pf.cpu_seconds() - pf0 + bench.children_cpu() - src0
                note = "; ".join(fails) + ("" if drained else "; queue not drained")
                per = 1e6 / SMTPD_MSGS
                results[mode].append((SMTPD_MSGS / el, cpu * per if rpd else None, note, drain, idle, pcpu * per))
                bench.log(f"smtpd rep {rep + 1}: {mode} policy {SMTPD_MSGS / el:.0f} msg/s"
                          + (f", restrictpd {cpu * per:.0f} µs/msg" if rpd else "")
                          + f", Postfix + smtp-source {pcpu * per:.0f} µs/msg"
                          + f", idle {idle:.0f}%, queue drained in {drain:.1f} s {note}")
    finally:
        if pf:
            pf.stop()
        for rpd, _ in daemons.values():
            rpd.stop()
    verdicts = {mode: rpd.verdicts() for mode, (rpd, _) in daemons.items()}
    where = pf.dir if pf else None
    if pf and not any(r[2] for runs in results.values() for r in runs):
        # Nothing to look into: its maillog grows by about 2 kB a message.
        shutil.rmtree(pf.dir, ignore_errors=True)
        where = "removed (every run completed)"
    return results, verdicts, where


def cpu_idle():
    """The machine's (total, idle) jiffies."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v), v[3] + v[4]


def report_smtpd(res):
    results, verdicts, pdir = res
    out = [f"| smtpd on loopback, smtp-source {SMTPD_SESSIONS} sessions x 1 KB, {SMTPD_MSGS} msgs | msg/s (median) | runs (msg/s) | "
           "ratio to without | target | met | restrictpd CPU µs/msg | Postfix + smtp-source CPU µs/msg | "
           "CPU ratio (without / with, all of it) | idle % | queue drain after run, s |",
           "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    labels = {"without": "without the policy service", "with": "with it, root's rule `allow *`",
              "with-quota": "with it, root's rule a quota (`arbitrary 1000 per day`, one recipient)"}
    base = statistics.median(r[0] for r in results["without"]) if results["without"] else None
    base_cpu = statistics.median(r[5] for r in results["without"]) if results["without"] else None
    for mode in SMTPD_MODES:
        runs = results[mode]
        if not runs:
            continue
        # A run in which smtp-source gave up (it stops at the first 4xx or 5xx) measured
        # nothing comparable: it is shown as stopped, not judged.
        if any(r[2] for r in runs):
            out.append(f"| {labels[mode]} | stopped | - | - | {SMTPD_TARGET} | NO (smtp-source stopped, see the note) | "
                       "- | - | - | - | - |")
            continue
        m = statistics.median(r[0] for r in runs)
        ratio = m / base if base and mode != "without" else None
        cpu = statistics.median(r[1] for r in runs) if mode != "without" else None
        pcpu = statistics.median(r[5] for r in runs)
        cpu_ratio = base_cpu / (pcpu + cpu) if base_cpu and cpu is not None else None
        met = "-" if ratio is None else ("yes" if ratio >= SMTPD_TARGET else "NO")
        out.append(f"| {labels[mode]} | {m:.0f} | {', '.join('%.0f' % r[0] for r in runs)} | "
                   f"{bench.fmt(ratio, '{:.2f}')} | {'-' if ratio is None else SMTPD_TARGET} | "
                   f"{met} | {bench.fmt(cpu)} | {pcpu:.0f} | {bench.fmt(cpu_ratio, '{:.2f}')} | "
                   f"{statistics.median(r[4] for r in runs):.0f} | {statistics.median(r[3] for r in runs):.1f} |")
    notes = [f"{mode}: {r[2]}" for mode in results for r in results[mode] if r[2]]
    text = "\n".join(out) + "\n"
    text += f"\nrestrictpd's verdicts during the smtpd runs (warm-up included): {verdicts}; Postfix instance {pdir}\n"
    for n in sorted(set(notes)):
        text += f"\nnote (smtpd, {notes.count(n)} of {bench.REPS} runs): {n}\n"
    return text
