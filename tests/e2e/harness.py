"""End-to-end harness for restrictpd: a private Postfix, an SMTP sink, restrictpd itself.

Standard library only. Everything listens on 127.0.0.1. Every wait has a deadline.

Pieces:
  Sink               threaded SMTP server that accepts everything and stores one file per
                     message (envelope lines, a blank line, then the raw DATA bytes,
                     dot-unstuffed, exactly as received).
  PostfixInstance    a Postfix 3.x instance with its own config_directory and queue_directory
                     under a "slot" directory, pickup -> content_filter smtp:[127.0.0.1]:FILTER
                     -> restrictpd -> reinjection smtpd 127.0.0.1:RELAY -> relayhost = the sink.
                     It has two reinjection listeners: `relay_port` (hardened, as restrictpd's
                     documentation ships it: smtpd_forbid_bare_newline=reject) and
                     `relay_port_debian` (as Debian 12 ships Postfix: bare LF accepted).
  Restrictpd         restrictpd as a subprocess with a config written by the caller; stderr
                     (the log, `--log stderr`) captured to a file.
  SMTPClient         a raw-bytes SMTP client for hand-made (and malicious) sessions.
  PassThroughFilter  a transparent byte relay (no restrictpd) to prove the harness itself.

Why "slots": a non-root `sendmail -C DIR` only works when DIR is listed in
`alternate_config_directories` of the *default* /etc/postfix/main.cf. Random temp dirs would
make that list grow forever, so instances live in a fixed small set of directories
/var/tmp/restrictpd-e2e/slotN (N < SLOTS), each guarded by an flock so that concurrent runs
(the test suite and the demo, say) never share one. /var is also inside Postfix's default
maillog_file_prefixes, so the instance's maillog can live there too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import sys as _sys
from pathlib import Path as _Path

# The shared test library, also for scripts that import this module outside pytest.
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "lib"))
from testlib import free_port, free_ports, pid_alive, port_accepts, wait_until  # noqa: E402,F401

SLOT_ROOT = Path(os.environ.get("RESTRICTPD_E2E_ROOT", "/var/tmp/restrictpd-e2e"))
SLOTS = 8
SYSTEM_MAIN_CF = Path("/etc/postfix/main.cf")
POSTFIX = "/usr/sbin/postfix"
SENDMAIL = "/usr/sbin/sendmail"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"
POSTCONF = "/usr/sbin/postconf"
MYHOSTNAME = "lab.localdomain"


# ----------------------------------------------------------------------------------------------
# small utilities


class HarnessError(RuntimeError):
    pass


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def restrictpd_binary() -> Path:
    env = os.environ.get("RESTRICTPD_BIN")
    if env:
        return Path(env)
    return repo_root() / ".build" / "debug" / "restrictpd"


def snapshot_binary(binary: Path, directory: Path, timeout: float = 60) -> Path:
    """Copy `binary` into `directory` once its size and mtime are stable (not being linked)."""
    def stable():
        try:
            a = binary.stat()
            time.sleep(0.5)
            b = binary.stat()
        except FileNotFoundError:
            return None
        return b if (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns) and b.st_size else None
    wait_until(stable, timeout, 0.5, f"{binary} to be completely written")
    dest = Path(directory) / binary.name
    shutil.copy2(binary, dest)
    os.chmod(dest, 0o755)
    return dest












def run(cmd: Sequence[str], *, input: bytes | None = None, timeout: float = 30,
        check: bool = True, user: str | None = None) -> subprocess.CompletedProcess:
    """Run a command (optionally as another user via runuser) with a bounded wait."""
    argv = list(cmd)
    if user is not None and user != "root":
        argv = ["runuser", "-u", user, "--"] + argv
    proc = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise HarnessError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n"
            f"stdout: {proc.stdout.decode(errors='replace')}\n"
            f"stderr: {proc.stderr.decode(errors='replace')}")
    return proc


def environment_problem() -> str | None:
    """Why the end-to-end suite cannot run here, or None."""
    if os.geteuid() != 0:
        return "the end-to-end tests must run as root (private Postfix, runuser)"
    for tool in (POSTFIX, SENDMAIL, POSTQUEUE, POSTSUPER, POSTCONF, "/usr/sbin/runuser"):
        if not os.access(tool, os.X_OK):
            return f"{tool} not found (apt-get install postfix)"
    for user in ("postfix", "www-data", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"user {user} does not exist"
    return None


# ----------------------------------------------------------------------------------------------
# the system's default main.cf


def ensure_alternate_config_directories(dirs: Iterable[str | Path]) -> None:
    """Make every dir in `dirs` appear in alternate_config_directories of /etc/postfix/main.cf.

    Idempotent: entries already there are left alone, nothing is ever listed twice. If there
    is no /etc/postfix/main.cf (Debian's "No configuration" install), a minimal one is
    created: it only names the compatibility level and the list, which keeps the system's
    Postfix as unconfigured as it was (no listener, no delivery settings)."""
    wanted = [str(d) for d in dirs]
    lock_path = SLOT_ROOT / "main-cf.lock"
    SLOT_ROOT.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not SYSTEM_MAIN_CF.exists():
            SYSTEM_MAIN_CF.parent.mkdir(parents=True, exist_ok=True)
            tmp = SYSTEM_MAIN_CF.with_name("main.cf.restrictpd-e2e.tmp")
            tmp.write_text(
                "# Minimal main.cf created by restrictpd's end-to-end tests (tests/e2e/harness.py)\n"
                "# because none existed. It only lets private test instances of Postfix use\n"
                "# `sendmail -C DIR` as non-root users; the system's Postfix stays unconfigured.\n"
                "compatibility_level = 3.6\n"
                "alternate_config_directories =\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, SYSTEM_MAIN_CF)
        current = run([POSTCONF, "-c", "/etc/postfix", "-h", "alternate_config_directories"],
                      check=False).stdout.decode().strip()
        entries = [e for e in re.split(r"[\s,]+", current) if e]
        missing = [d for d in wanted if d not in entries]
        if missing:
            value = " ".join(entries + missing)
            run([POSTCONF, "-c", "/etc/postfix", "-e", f"alternate_config_directories = {value}"])


def all_slot_config_dirs() -> list[Path]:
    return [SLOT_ROOT / f"slot{i}" / "etc" for i in range(SLOTS)]


# ----------------------------------------------------------------------------------------------
# the SMTP sink


@dataclass
class SinkMessage:
    path: Path
    seq: int
    helo: str
    mail_from: str           # address without <>
    mail_params: str
    rcpts: list[str]         # addresses without <>
    rcpt_params: list[str]
    data: bytes              # raw DATA as received, dot-unstuffed, CRLF line ends, no final "."

    @property
    def header_bytes(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[0] + b"\r\n"

    @property
    def body(self) -> bytes:
        parts = self.data.split(b"\r\n\r\n", 1)
        return parts[1] if len(parts) == 2 else b""

    def header(self, name: str) -> list[str]:
        """Unfolded values of every header called `name`."""
        text = self.header_bytes.decode("utf-8", errors="replace")
        unfolded = re.sub(r"\r\n[ \t]", " ", text)
        out = []
        for line in unfolded.split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                if k.strip().lower() == name.lower():
                    out.append(v.strip())
        return out

    @classmethod
    def load(cls, path: Path) -> "SinkMessage":
        raw = path.read_bytes()
        env, data = raw.split(b"\r\n\r\n", 1)
        seq, helo, mail_from, mail_params = 0, "", "", ""
        rcpts, rcpt_params = [], []
        for line in env.decode("utf-8", errors="surrogateescape").split("\r\n"):
            key, _, value = line.partition(": ")
            if key == "X-Sink-Seq":
                seq = int(value)
            elif key == "X-Sink-Helo":
                helo = value
            elif key == "X-Sink-Mail":
                mail_from, mail_params = _split_path(value)
            elif key == "X-Sink-Rcpt":
                addr, params = _split_path(value)
                rcpts.append(addr)
                rcpt_params.append(params)
        return cls(path, seq, helo, mail_from, mail_params, rcpts, rcpt_params, data)


def _split_path(arg: str) -> tuple[str, str]:
    m = re.match(r"\s*<([^>]*)>\s*(.*)$", arg)
    if m:
        return m.group(1), m.group(2)
    first, _, rest = arg.strip().partition(" ")
    return first, rest


class _SinkHandler(socketserver.StreamRequestHandler):
    timeout = 60

    def handle(self):
        sink: Sink = self.server.sink  # type: ignore[attr-defined]
        w = self.wfile

        def reply(text: str):
            w.write(text.encode() + b"\r\n")
            w.flush()

        reply("220 sink.example ESMTP restrictpd-e2e sink")
        helo, mail, rcpts = "", None, []
        while True:
            line = self.rfile.readline(65536)
            if not line:
                return
            cmdline = line.rstrip(b"\r\n").decode("utf-8", errors="surrogateescape")
            verb = cmdline.split(" ", 1)[0].upper()
            arg = cmdline[len(verb):].strip()
            if verb == "EHLO":
                helo = arg
                mail, rcpts = None, []
                w.write(b"250-sink.example\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
                        b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n"
                        b"250 ENHANCEDSTATUSCODES\r\n")
                w.flush()
            elif verb == "HELO":
                helo = arg
                mail, rcpts = None, []
                reply("250 sink.example")
            elif verb == "MAIL":
                mail = re.sub(r"^FROM:\s*", "", arg, flags=re.I)
                rcpts = []
                reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                if mail is None:
                    reply("503 5.5.1 Error: need MAIL command")
                    continue
                rcpts.append(re.sub(r"^TO:\s*", "", arg, flags=re.I))
                reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail is None or not rcpts:
                    reply("503 5.5.1 Error: need RCPT command")
                    continue
                reply("354 End data with <CR><LF>.<CR><LF>")
                chunks = []
                while True:
                    dl = self.rfile.readline(10 * 1024 * 1024)
                    if not dl:
                        return
                    if dl == b".\r\n":
                        break
                    if dl.startswith(b"."):
                        dl = dl[1:]
                    chunks.append(dl)
                sink._store(helo, mail, rcpts, b"".join(chunks))
                reply("250 2.0.0 Ok: queued")
                mail, rcpts = None, []
            elif verb == "RSET":
                mail, rcpts = None, []
                reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                reply("221 2.0.0 Bye")
                return
            else:
                reply("502 5.5.1 Error: command not implemented")


class _ThreadingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Sink:
    """Accept-everything SMTP server on 127.0.0.1 writing one file per message."""

    def __init__(self, directory: Path, port: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._server = _ThreadingServer(("127.0.0.1", port), _SinkHandler)
        self._server.sink = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._lock = threading.Lock()
        self._seq = 0
        self._thread: threading.Thread | None = None

    def start(self) -> "Sink":
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True,
                                        name="smtp-sink")
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def _store(self, helo: str, mail: str, rcpts: list[str], data: bytes):
        with self._lock:
            self._seq += 1
            seq = self._seq
        env = [f"X-Sink-Seq: {seq}", f"X-Sink-Helo: {helo}", f"X-Sink-Mail: {mail}"]
        env += [f"X-Sink-Rcpt: {r}" for r in rcpts]
        blob = ("\r\n".join(env)).encode("utf-8", errors="surrogateescape") + b"\r\n\r\n" + data
        tmp = self.directory / f".msg-{seq:06d}.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, self.directory / f"msg-{seq:06d}.eml")

    def messages(self) -> list[SinkMessage]:
        return [SinkMessage.load(p) for p in sorted(self.directory.glob("msg-*.eml"))]

    def messages_to(self, addr: str) -> list[SinkMessage]:
        a = addr.lower()
        return [m for m in self.messages() if a in (r.lower() for r in m.rcpts)]

    def clear(self):
        for p in self.directory.glob("msg-*.eml"):
            p.unlink(missing_ok=True)

    def wait_for(self, n: int, timeout: float = 30,
                 match: Callable[[SinkMessage], bool] | None = None) -> list[SinkMessage]:
        """Wait until at least n (matching) messages are there; return them."""
        def check():
            msgs = [m for m in self.messages() if match is None or match(m)]
            return msgs if len(msgs) >= n else None
        return wait_until(check, timeout, 0.1, f"{n} message(s) at the sink")


# ----------------------------------------------------------------------------------------------
# the private Postfix instance


MAIN_CF = """\
# private Postfix instance for restrictpd end-to-end tests (generated by tests/e2e/harness.py)
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {spool}
data_directory = {data}
myhostname = {myhostname}
mydomain = localdomain
myorigin = $myhostname
mydestination =
relay_domains =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled
local_transport = error:local delivery is disabled in this test instance
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtputf8_enable = yes
maillog_file = {maillog}
minimal_backoff_time = 5s
maximal_backoff_time = 10s
queue_run_delay = 5s
delay_warning_time = 0
smtp_connection_cache_on_demand = no
smtpd_banner = $myhostname ESMTP $mail_name (restrictpd-e2e)
# As etc/postfix/main.cf.restrictpd: only root and postfix may choose the envelope sender.
local_login_sender_maps = inline:{{ {{ root = * }}, {{ postfix = * }} }}, regexp:{etc}/login_senders
"""

PICKUP_LINE = re.compile(r"^pickup\s+unix\s")


def _debian_master_cf() -> str:
    for p in (Path("/usr/share/postfix/master.cf.dist"), Path("/etc/postfix/master.cf.proto"),
              Path("/etc/postfix/master.cf")):
        if p.exists():
            return p.read_text()
    raise HarnessError("no Debian master.cf found (/usr/share/postfix/master.cf.dist)")


def build_master_cf(filter_port: int | None, relay_port: int, relay_port_debian: int,
                    reinject_options: str = "", extra: str = "") -> str:
    """Debian's master.cf with: no port 25 listener, chroot off everywhere (no resolver
    files needed in a chroot), pickup through the content filter, and two reinjection
    listeners (hardened and Debian-default).

    `reinject_options` ("-o name=value ...") is added to both reinjection listeners (e.g. the
    SMTP door's overrides from etc/postfix/master.cf.restrictpd); `extra` is appended as is
    (more services)."""
    out = []
    for line in _debian_master_cf().splitlines():
        if line.startswith("#") or not line.strip() or line[0].isspace():
            out.append(line)
            continue
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "inet" and fields[0] in ("smtp", "submission", "smtps"):
            out.append("#" + line + "    # disabled by restrictpd-e2e")
            continue
        if len(fields) >= 8 and fields[4] == "y":
            fields[4] = "n"
        out.append("\t".join(fields[:8]) + ("\t" + " ".join(fields[8:]) if len(fields) > 8 else ""))
        if fields[0] == "pickup" and filter_port is not None:
            out.append(f"  -o content_filter=smtp:[127.0.0.1]:{filter_port}")
    out.append("")
    out.append("# reinjection listener as restrictpd documents it (bare LF refused)")
    out.append(f"127.0.0.1:{relay_port} inet n - n - 10 smtpd")
    out.append("  -o syslog_name=postfix/reinject")
    out.append("  -o content_filter= -o local_recipient_maps= -o myhostname=localhost.example")
    out.append("  -o smtpd_recipient_restrictions=permit_mynetworks,reject -o mynetworks=127.0.0.0/8")
    out.append("  -o smtpd_forbid_bare_newline=reject -o smtpd_forbid_bare_newline_exclusions=")
    out.append("# reinjection listener as Debian 12 ships Postfix 3.7 (bare LF accepted from mynetworks)")
    out.append(f"127.0.0.1:{relay_port_debian} inet n - n - 10 smtpd")
    out.append("  -o syslog_name=postfix/reinject-debian")
    out.append("  -o content_filter= -o local_recipient_maps= -o myhostname=localhost.example")
    out.append("  -o smtpd_recipient_restrictions=permit_mynetworks,reject -o mynetworks=127.0.0.0/8")
    if reinject_options:
        # both reinjection listeners are the two lines that start with "127.0.0.1:{port} inet"
        done = []
        for line in out:
            done.append(line)
            if line.startswith(f"127.0.0.1:{relay_port} inet ") or \
                    line.startswith(f"127.0.0.1:{relay_port_debian} inet "):
                done.append("  " + reinject_options.strip())
        out = done
    if extra:
        out.append(extra.rstrip("\n"))
    return "\n".join(out) + "\n"


class Slot:
    """An flock-guarded directory /var/tmp/restrictpd-e2e/slotN."""

    def __init__(self, index: int, path: Path, lock_file):
        self.index, self.path, self._lock_file = index, path, lock_file

    @classmethod
    def acquire(cls) -> "Slot":
        SLOT_ROOT.mkdir(parents=True, exist_ok=True)
        os.chmod(SLOT_ROOT, 0o755)
        for i in range(SLOTS):
            f = open(SLOT_ROOT / f"slot{i}.lock", "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            path = SLOT_ROOT / f"slot{i}"
            slot = cls(i, path, f)
            slot._scrub()
            return slot
        raise HarnessError(f"all {SLOTS} e2e slots under {SLOT_ROOT} are busy")

    def _scrub(self):
        """Stop whatever a crashed earlier run left in this slot, then empty it."""
        etc = self.path / "etc"
        if (etc / "main.cf").exists():
            subprocess.run([POSTFIX, "-c", str(etc), "abort"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
        pidfile = self.path / "spool" / "pid" / "master.pid"
        with contextlib.suppress(Exception):
            pid = int(pidfile.read_text().split()[0])
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        os.chmod(self.path, 0o755)

    def release(self):
        with contextlib.suppress(Exception):
            shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(Exception):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()


def log_text(path: Path) -> str:
    """A log file's whole text ("" while it does not exist)."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def log_mark(path: Path) -> int:
    """Where a log file ends now, for reading only what comes after."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_lines(path: Path, since: int = 0) -> list[str]:
    """The lines of a log file from byte offset `since` on."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            return f.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []


class PostfixInstance:
    def __init__(self, slot: Slot, sink_port: int, filter_port: int | None = None,
                 relay_port: int | None = None, relay_port_debian: int | None = None,
                 extra_main_cf: str = "", extra_master_cf: str = "", reinject_options: str = ""):
        self.slot = slot
        self.dir = slot.path
        self.etc = self.dir / "etc"
        self.spool = self.dir / "spool"
        self.data = self.dir / "data"
        self.maillog = self.dir / "maillog"
        ports = free_ports(3)
        self.sink_port = sink_port
        self.filter_port = filter_port if filter_port is not None else ports[0]
        self.relay_port = relay_port or ports[1]
        self.relay_port_debian = relay_port_debian or ports[2]
        # Added after the generated main.cf (later settings win) and master.cf; options for
        # both reinjection listeners. Empty by default: the instance every other test uses.
        self.extra_main_cf = extra_main_cf
        self.extra_master_cf = extra_master_cf
        self.reinject_options = reinject_options
        self._content_filter = True
        self.running = False

    # -- setup and life cycle

    def configure(self, content_filter: bool = True):
        for d in (self.etc, self.spool, self.data):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        shutil.chown(self.data, "postfix", "postfix")
        main_cf = MAIN_CF.format(
            etc=self.etc, spool=self.spool, data=self.data, myhostname=MYHOSTNAME,
            sink_port=self.sink_port, maillog=self.maillog)
        if self.extra_main_cf:
            # a parameter set again in extra_main_cf replaces the generated line (no warnings
            # about "overriding earlier entry")
            names = set(re.findall(r"^([a-z0-9_]+)\s*=", self.extra_main_cf, re.M))
            main_cf = "\n".join(l for l in main_cf.splitlines()
                                if not (m := re.match(r"^([a-z0-9_]+)\s*=", l)) or m.group(1) not in names)
            main_cf += f"\n# added by the test\n{self.extra_main_cf.rstrip()}\n"
        (self.etc / "main.cf").write_text(main_cf)
        self._content_filter = content_filter
        self.write_master_cf()
        (self.etc / "login_senders").write_text(f"/(.+)/ $1 $1@{MYHOSTNAME}\n")
        for f in ("main.cf", "master.cf", "login_senders"):
            os.chmod(self.etc / f, 0o644)
        self.maillog.touch()
        ensure_alternate_config_directories(all_slot_config_dirs())

    def write_master_cf(self, extra_master_cf: str | None = None):
        """(Re)write master.cf; `extra_master_cf` replaces the extra services if given.
        A running instance needs reload() to see it."""
        if extra_master_cf is not None:
            self.extra_master_cf = extra_master_cf
        (self.etc / "master.cf").write_text(build_master_cf(
            self.filter_port if self._content_filter else None, self.relay_port,
            self.relay_port_debian, self.reinject_options, self.extra_master_cf))
        os.chmod(self.etc / "master.cf", 0o644)

    def reload(self, timeout: float = 30):
        """`postfix reload`: master re-reads master.cf (new listeners), daemons restart."""
        proc = run([POSTFIX, "-c", str(self.etc), "reload"], check=False, timeout=timeout)
        if proc.returncode != 0:
            raise HarnessError("postfix reload failed:\n" + proc.stderr.decode(errors="replace"))

    def start(self, timeout: float = 30):
        proc = run([POSTFIX, "-c", str(self.etc), "start"], check=False, timeout=timeout)
        if proc.returncode != 0:
            raise HarnessError("postfix start failed:\n" + proc.stderr.decode(errors="replace")
                               + "\nmaillog:\n" + self.log_text()[-3000:])
        self.running = True
        wait_until(lambda: port_accepts(self.relay_port) and port_accepts(self.relay_port_debian),
                   timeout, 0.1, "the reinjection listeners of the private Postfix")
        wait_until(lambda: (self.spool / "public" / "pickup").exists(), timeout, 0.1,
                   "the pickup fifo")

    def master_pid(self) -> int | None:
        with contextlib.suppress(Exception):
            return int((self.spool / "pid" / "master.pid").read_text().split()[0])
        return None

    def stop(self, timeout: float = 30):
        """Stop the instance; never raises, always tries harder (abort, SIGKILL)."""
        if not (self.etc / "main.cf").exists():
            return
        pid = self.master_pid()
        with contextlib.suppress(Exception):
            subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=timeout)
        if pid:
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                with contextlib.suppress(Exception):
                    subprocess.run([POSTFIX, "-c", str(self.etc), "abort"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   timeout=timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # children that outlive master (smtpd, smtp, ...) would keep the reinjection ports
        self._kill_leftovers()
        self.running = False

    def _kill_leftovers(self):
        """Kill Postfix processes still using this instance's config directory."""
        needle = str(self.etc).encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(Exception):
                env = Path(f"/proc/{entry}/environ").read_bytes()
                if b"MAIL_CONFIG=" + needle in env and pid_alive(int(entry)):
                    os.kill(int(entry), signal.SIGKILL)

    # -- submission

    def sendmail(self, recipients: Sequence[str], message: bytes | str, *, user: str = "root",
                 options: Sequence[str] = (), timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        if isinstance(message, str):
            message = message.encode()
        argv = [SENDMAIL, "-C", str(self.etc), "-i", *options, "--", *recipients]
        return run(argv, input=message, user=user, timeout=timeout, check=check)

    def sendmail_async(self, recipients: Sequence[str], message: bytes, *, user: str = "root",
                       options: Sequence[str] = ()) -> subprocess.Popen:
        argv = [SENDMAIL, "-C", str(self.etc), "-i", *options, "--", *recipients]
        if user != "root":
            argv = ["runuser", "-u", user, "--"] + argv
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        p.stdin.write(message)
        p.stdin.close()
        return p

    # -- the queue

    def queue(self) -> list[dict]:
        """`postqueue -j`: one dict per queued message (queue_name, queue_id, recipients...)."""
        out = run([POSTQUEUE, "-c", str(self.etc), "-j"], check=False, timeout=30).stdout
        items = []
        for line in out.decode("utf-8", errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    items.append(json.loads(line))
        return items

    def mailq_text(self) -> str:
        return run([POSTQUEUE, "-c", str(self.etc), "-p"], check=False,
                   timeout=30).stdout.decode("utf-8", errors="replace")

    def flush(self):
        run([POSTQUEUE, "-c", str(self.etc), "-f"], check=False, timeout=30)

    def purge(self):
        run([POSTSUPER, "-c", str(self.etc), "-d", "ALL"], check=False, timeout=30)

    def wait_queue_empty(self, timeout: float = 30):
        wait_until(lambda: not self.queue(), timeout, 0.2, "an empty Postfix queue")

    # -- the log

    def log_text(self) -> str:
        return log_text(self.maillog)

    def log_mark(self) -> int:
        return log_mark(self.maillog)

    def log_lines(self, since: int = 0) -> list[str]:
        return log_lines(self.maillog, since)

    def grep(self, pattern: str, since: int = 0) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.log_lines(since) if rx.search(line)]

    def wait_log(self, pattern: str, since: int = 0, timeout: float = 30, count: int = 1) -> list[str]:
        """Wait for `count` maillog lines (after offset `since`) matching `pattern`."""
        return wait_until(lambda: (lambda m: m if len(m) >= count else None)(self.grep(pattern, since)),
                          timeout, 0.1, f"{count} maillog line(s) matching {pattern!r}")

    def queue_id_for(self, message_id: str, since: int = 0, timeout: float = 30) -> str:
        """Pickup's queue id of the message submitted with Message-ID <message_id>."""
        pat = r"/cleanup\[\d+\]: ([0-9A-F]+): message-id=<" + re.escape(message_id) + ">"
        for line in self.wait_log(pat, since, timeout):
            m = re.search(pat, line)
            qid = m.group(1)
            # the first cleanup line is the pickup copy; later ones are the reinjected copies
            if self.grep(rf"/pickup\[\d+\]: {qid}: uid=", since):
                return qid
        # pickup line may lag the cleanup line by a moment
        def find():
            for line in self.grep(pat, since):
                qid = re.search(pat, line).group(1)
                if self.grep(rf"/pickup\[\d+\]: {qid}: uid=", since):
                    return qid
            return None
        return wait_until(find, timeout, 0.1, f"pickup queue id for <{message_id}>")


# ----------------------------------------------------------------------------------------------
# the SMTP door: an smtpd standing in for port 25, wired as etc/postfix/*.restrictpd say


DEBIAN_MYNETWORKS = "127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128"   # Debian 12's default
SHIPPED_POLICY_PORT = 10028                                          # in etc/postfix/main.cf.restrictpd


def postfix_parameters(text: str) -> dict[str, str]:
    """name = value pairs of a main.cf text (continuation lines joined, comments dropped)."""
    params: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and name:
            params[name] = (params[name] + " " + line.strip()).strip()
            continue
        key, _, value = line.partition("=")
        name = key.strip()
        params[name] = value.strip()
    return params


def shipped_door_main_cf(policy_port: int) -> dict[str, str]:
    """The smtpd_* settings of etc/postfix/main.cf.restrictpd (the SMTP door's wiring and the
    policy client's settings), the policy service moved to 127.0.0.1:`policy_port`."""
    params = postfix_parameters((repo_root() / "etc" / "postfix" / "main.cf.restrictpd").read_text())
    return {k: v.replace(f"inet:127.0.0.1:{SHIPPED_POLICY_PORT}", f"inet:127.0.0.1:{policy_port}")
            for k, v in params.items() if k.startswith("smtpd_")}


def shipped_hold_listener(port: int) -> str:
    """The hold listener's entry of etc/postfix/master.cf.restrictpd (127.0.0.1:10029, whose
    smtpd puts every message on hold), moved to `port`."""
    lines = (repo_root() / "etc" / "postfix" / "master.cf.restrictpd").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("127.0.0.1:10029 "))
    entry = [lines[start]]
    for l in lines[start + 1:]:
        if not l[:1].isspace():
            break
        entry.append(l)
    return "\n".join(entry).replace("127.0.0.1:10029 ", f"127.0.0.1:{port} ", 1) + "\n"


def shipped_reinjection_overrides() -> list[str]:
    """The `-o` options of the 10026 reinjection smtpd in etc/postfix/master.cf.restrictpd that
    keep it from asking the policy service (smtpd_relay_restrictions and
    smtpd_end_of_data_restrictions)."""
    text = (repo_root() / "etc" / "postfix" / "master.cf.restrictpd").read_text()
    options, inside = [], False
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if not line[0].isspace():
            inside = line.startswith("127.0.0.1:10026")
            continue
        if inside:
            options += re.findall(r"-o\s+(\S+)", line)
    return [o for o in options
            if o.split("=", 1)[0] in ("smtpd_relay_restrictions", "smtpd_end_of_data_restrictions")]


def door_master_cf(door_port: int, maxproc: int = 60, options: Sequence[str] = (),
                   extra: str = "") -> str:
    """master.cf lines of the door smtpd on 127.0.0.1:`door_port` (Debian's port 25 line,
    not chrooted), then `extra`."""
    lines = [f"# the SMTP door: stand-in for port 25 (Debian: smtp inet n - y - - smtpd)",
             f"127.0.0.1:{door_port} inet n - n - {maxproc} smtpd",
             "  -o syslog_name=postfix/door"]
    lines += [f"  -o {o}" for o in options]
    return "\n".join(lines) + "\n" + extra


def door_postfix(slot: Slot, sink_port: int, *, door_options: Sequence[str] = (),
                 extra_main_cf: str = "", maxproc: int = 60) -> "PostfixInstance":
    """A PostfixInstance with the SMTP door: main.cf gets the shipped smtpd_* settings (policy
    service before permit_mynetworks, END-OF-MESSAGE too) and Debian's default mynetworks; the
    reinjection listeners get the shipped overrides; master.cf gets the door smtpd. Ports in
    `pf.door_port` and `pf.policy_port` (restrictpd's policy_listen). Not configured yet."""
    door_port, policy_port, filter_port, relay_port, relay_port_debian = free_ports(5)
    main = "\n".join(f"{k} = {v}" for k, v in shipped_door_main_cf(policy_port).items())
    main += f"\nmynetworks = {DEBIAN_MYNETWORKS}\n{extra_main_cf}"
    pf = PostfixInstance(slot, sink_port, filter_port, relay_port, relay_port_debian,
                         extra_main_cf=main,
                         extra_master_cf=door_master_cf(door_port, maxproc, door_options),
                         reinject_options=" ".join(f"-o {o}" for o in shipped_reinjection_overrides()))
    pf.door_port, pf.policy_port = door_port, policy_port
    return pf


# ----------------------------------------------------------------------------------------------
# restrictpd as a subprocess


@contextlib.contextmanager
def running_postfix(slot: "Slot", sink_port: int):
    """A private Postfix on `slot`, configured as the tests expect and started; stopped after."""
    pf = PostfixInstance(slot, sink_port)
    try:
        pf.configure()
        pf.start()
        yield pf
    finally:
        pf.stop()


def failed(request) -> bool:
    """True when the test behind a fixture's `request` failed (the root conftest records it)."""
    rep = getattr(request.node, "rep_call", None)
    return rep is not None and rep.failed


def stop_restrictpds(made: Sequence["Restrictpd"], request) -> None:
    """Stops the restrictpd instances a fixture started; prints their logs when the test failed."""
    for r in made:
        r.stop()
        if failed(request):
            print(f"\n---- restrictpd log {r.log} (last 60 lines) ----")
            print("\n".join(r.log_text().splitlines()[-60:]))


def clean_postfix(pf: "PostfixInstance", sink, mark, request) -> None:
    """After a test: prints Postfix's log and queue when it failed, then empties both."""
    if failed(request):
        print("\n---- Postfix maillog during the test (last 80 lines) ----")
        print("\n".join(pf.log_lines(mark)[-80:]))
        print("---- postqueue -p ----")
        print(pf.mailq_text())
    pf.purge()
    sink.clear()


class Restrictpd:
    def __init__(self, workdir: Path, config_text: str, port: int, binary: Path | None = None,
                 extra_args: Sequence[str] = ()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = Path(binary or restrictpd_binary())
        self.port = port
        self.config = self.workdir / "restrictpd.conf"
        self.config.write_text(config_text)
        self.log = self.workdir / "restrictpd.log"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        return [str(self.binary), "--config", str(self.config), "--user", "root",
                "--log", "stderr", *self.extra_args]

    def start(self, timeout: float = 20) -> "Restrictpd":
        if not self.binary.exists():
            raise HarnessError(f"restrictpd binary {self.binary} does not exist "
                               "(swift build, or set RESTRICTPD_BIN)")
        logf = open(self.log, "ab")
        logf.write(f"==== harness: start #{self.starts + 1}: {' '.join(self.argv())}\n".encode())
        logf.flush()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=logf, start_new_session=True)
        logf.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"restrictpd exited with {self.proc.returncode} during startup; "
                                   f"log:\n{self.log_text()[-4000:]}")
            if self._greets():
                return self
            if time.monotonic() >= deadline:
                self.kill()
                raise HarnessError(f"restrictpd did not accept connections on 127.0.0.1:{self.port} "
                                   f"within {timeout}s; log:\n{self.log_text()[-4000:]}")
            time.sleep(0.1)

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.settimeout(3)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                with contextlib.suppress(OSError):
                    s.sendall(b"QUIT\r\n")
                return data[:1] in (b"2", b"4", b"5")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Signal restrictpd and wait for it; SIGKILL at the deadline. Never raises."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        rc = self.proc.returncode
        return rc

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.proc.wait(5)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return log_text(self.log)

    def log_mark(self) -> int:
        return log_mark(self.log)

    def grep(self, pattern: str, since: int = 0) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in log_lines(self.log, since) if rx.search(line)]

    def wait_log(self, pattern: str, since: int = 0, timeout: float = 15, count: int = 1) -> list[str]:
        return wait_until(lambda: (lambda m: m if len(m) >= count else None)(self.grep(pattern, since)),
                          timeout, 0.1, f"{count} restrictpd log line(s) matching {pattern!r}")

    def reload(self, config_text: str | None = None, timeout: float = 15):
        """Write a new configuration (if given), send SIGHUP, wait for the "reloaded" line."""
        if config_text is not None:
            self.config.write_text(config_text)
        mark = self.log_mark()
        if self.proc is None or self.proc.poll() is not None:
            raise HarnessError("restrictpd is not running")
        self.proc.send_signal(signal.SIGHUP)
        self.wait_log(r"reloaded |reload failed", mark, timeout)
        if self.grep(r"reload failed", mark):
            raise HarnessError("restrictpd reload failed:\n" + "\n".join(self.grep("", mark)))

    def quota(self, user: str | None = None, timeout: float = 30) -> str:
        """`restrictpd --quota [USER] -c CONFIG` (what is counted and left)."""
        argv = [str(self.binary), "--quota", "-c", str(self.config)] + ([user] if user else [])
        return run(argv, timeout=timeout).stdout.decode(errors="replace")


def restrictpd_config(*, port: int, relay_port: int, state: Path, rules: str,
                      extra_globals: str = "") -> str:
    return (f"# written by tests/e2e\n"
            f"listen 127.0.0.1:{port}\n"
            f"relay 127.0.0.1:{relay_port}\n"
            f"clients postfix root\n"
            f"state {state}\n"
            f"drain_timeout 2s\n"
            f"{extra_globals}"
            f"\n{rules}")


STANDARD_RULES = """\
user www-data
    allow webmaster@example.org @lists.example.org

user root
    allow *

default
    allow @localhost

unknown
    refuse
"""


# ----------------------------------------------------------------------------------------------
# raw SMTP client


class SMTPClient:
    """A byte-exact SMTP client: send anything, read replies with deadlines."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.timeout = timeout
        self.transcript: list[tuple[str, bytes]] = []
        self.closed_by_peer = False

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data: bytes | str):
        if isinstance(data, str):
            data = data.encode()
        self.transcript.append(("C", data))
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out waiting for an SMTP reply")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("timed out waiting for an SMTP reply")
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed_by_peer = True
            return False
        self.buf += chunk
        return True

    def reply(self, timeout: float | None = None) -> tuple[int, list[str]] | None:
        """One (possibly multi-line) reply, or None when the peer closed first."""
        deadline = time.monotonic() + (timeout or self.timeout)
        lines = []
        while True:
            while b"\n" not in self.buf:
                if not self._fill(deadline):
                    return None if not lines else (int(lines[-1][:3]), lines)
            line, self.buf = self.buf.split(b"\n", 1)
            text = line.rstrip(b"\r").decode("utf-8", errors="replace")
            self.transcript.append(("S", line + b"\n"))
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                try:
                    return int(text[:3]), lines
                except ValueError:
                    return 0, lines

    def replies_until_close(self, timeout: float = 10) -> list[tuple[int, list[str]]]:
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = self.reply(max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                break
            if r is None:
                break
            out.append(r)
        return out

    def command(self, line: str | bytes, timeout: float | None = None):
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply(timeout)


# ----------------------------------------------------------------------------------------------
# SMTP sessions run as another user (the SMTP door: the kernel tells who owns the socket)


SWAKS = "/usr/bin/swaks"

# Runs as the user under test (e.g. www-data): reads {"host","port","timeout","sessions"} as
# JSON on stdin, runs every session in a thread of its own (all connected at once), prints
# one JSON list per session: [step, code, reply text] (code 0: no reply / connection closed).
# Steps: an SMTP command line; "<DATA>text" (DATA, then text, then "."); "<BARRIER>" (wait
# until every session got here); "<WAIT>/path" (wait until that file exists: the test's cue);
# "<DROP>" (close the socket without QUIT).
_SESSION_SCRIPT = r"""
import json, os, socket, sys, threading, time
job = json.load(sys.stdin)
sessions, timeout = job["sessions"], job["timeout"]
barrier = threading.Barrier(len(sessions), timeout=timeout)
results = [None] * len(sessions)

def reply(f):
    lines = []
    while True:
        line = f.readline(65536)
        if not line:
            return 0, " | ".join(lines)
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text)
        if len(text) < 4 or text[3] != "-":
            try:
                return int(text[:3]), " | ".join(lines)
            except ValueError:
                return 0, " | ".join(lines)

def session(i, steps):
    out = []
    results[i] = out
    try:
        src = (job["source"], 0) if job.get("source") else None
        s = socket.create_connection((job["host"], job["port"]), timeout=timeout, source_address=src)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        out.append(["<GREETING>", *reply(f)])
        for step in steps:
            if step == "<BARRIER>":
                barrier.wait()
                continue
            if step.startswith("<WAIT>"):
                path, deadline = step[len("<WAIT>"):], time.monotonic() + timeout
                while not os.path.exists(path):
                    if time.monotonic() > deadline:
                        raise TimeoutError("waited too long for " + path)
                    time.sleep(0.05)
                continue
            if step == "<DROP>":
                s.close()
                out.append([step, 0, ""])
                return
            if step.startswith("<DATA>"):
                s.sendall(b"DATA\r\n")
                code, text = reply(f)
                out.append(["DATA", code, text])
                if code != 354:
                    continue
                body = step[len("<DATA>"):].replace("\r\n", "\n").replace("\n", "\r\n")
                lines = [("." + l if l.startswith(".") else l) for l in body.split("\r\n")]
                s.sendall("\r\n".join(lines).encode() + b"\r\n.\r\n")
                out.append(["<END-OF-DATA>", *reply(f)])
                continue
            s.sendall(step.encode() + b"\r\n")
            code, text = reply(f)
            out.append([step, code, text])
            if code == 0:
                return
        s.close()
    except Exception as e:  # noqa: BLE001 - reported to the caller
        out.append(["<ERROR>", 0, repr(e)])
        try:
            barrier.abort()
        except Exception:
            pass

threads = [threading.Thread(target=session, args=(i, st)) for i, st in enumerate(sessions)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout + 5)
json.dump(results, sys.stdout)
"""

_python_for: dict[str, str] = {}


def python_for(user: str) -> str:
    """A python3 that `user` may execute (pytest's own may live under /root)."""
    if user not in _python_for:
        for candidate in ("/usr/bin/python3", shutil.which("python3") or ""):
            if candidate and subprocess.run(
                    ["runuser", "-u", user, "--", candidate, "-c", "0"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, timeout=20).returncode == 0:
                _python_for[user] = candidate
                break
        else:
            raise HarnessError(f"no python3 that user {user} can execute")
    return _python_for[user]


def _as_user(argv: list[str], user: str, netns: str | None) -> list[str]:
    if user != "root":
        argv = ["runuser", "-u", user, "--"] + argv
    if netns:
        argv = ["ip", "netns", "exec", netns] + argv
    return argv


def smtp_sessions(port: int, sessions: Sequence[Sequence[str]], *, user: str = "root",
                  host: str = "127.0.0.1", timeout: float = 60, netns: str | None = None,
                  source: str | None = None) -> list[list[tuple[str, int, str]]]:
    """Run SMTP sessions as `user` (its own process, so the kernel sees that uid as the owner of
    each client socket), all connected at once, one thread each; optionally inside network
    namespace `netns`, from local address `source`. Returns, per session, (step, reply code, reply text) tuples; the first
    is ("<GREETING>", 220, ...). See _SESSION_SCRIPT for the steps."""
    job = json.dumps({"host": host, "port": port, "timeout": timeout, "source": source,
                      "sessions": [list(s) for s in sessions]}).encode()
    argv = _as_user([python_for(user), "-c", _SESSION_SCRIPT], user, netns)
    proc = subprocess.run(argv, input=job, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout + 30)
    if proc.returncode != 0:
        raise HarnessError(f"SMTP session script failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return [[tuple(step) for step in s] for s in json.loads(proc.stdout)]


def transaction(sender: str, recipients: Sequence[str], body: str = "", *,
                helo: str = "client.example", data: bool = True, quit: bool = True) -> list[str]:
    """The steps of one ordinary transaction for smtp_sessions()."""
    steps = [f"EHLO {helo}", f"MAIL FROM:<{sender}>", *[f"RCPT TO:<{r}>" for r in recipients]]
    if data:
        steps.append("<DATA>" + (body or f"Subject: test\n\nto {', '.join(recipients)}\n"))
    if quit:
        steps.append("QUIT")
    return steps


def reply_to(session: Sequence[tuple[str, int, str]], step_prefix: str) -> tuple[int, str] | None:
    """The (code, text) answering the first step that starts with `step_prefix`."""
    for step, code, text in session:
        if step.startswith(step_prefix):
            return code, text
    return None


def swaks(*, port: int, to: str | Sequence[str], sender: str, server: str = "127.0.0.1",
          user: str = "root", auth: tuple[str, str] | None = None, netns: str | None = None,
          body: str | None = None, timeout: float = 60,
          extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """swaks as `user` (and inside `netns`), transcript in stdout; never raises on SMTP errors.
    `auth` = (username, password) for AUTH PLAIN."""
    rcpts = ",".join([to] if isinstance(to, str) else to)
    argv = [SWAKS, "--server", server, "--port", str(port), "--from", sender, "--to", rcpts,
            "--helo", "client.example", "--timeout", str(int(timeout)), "--hide-informational"]
    if auth:
        argv += ["--auth", "PLAIN", "--auth-user", auth[0], "--auth-password", auth[1]]
    if body is not None:
        argv += ["--body", body]
    argv += list(extra)
    return subprocess.run(_as_user(argv, user, netns), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout + 30)


# ----------------------------------------------------------------------------------------------
# a transparent byte relay standing in for the content filter (harness self-test, control)


class PassThroughFilter:
    """Listens on 127.0.0.1:port and copies bytes both ways to 127.0.0.1:upstream."""

    def __init__(self, port: int, upstream: int):
        self.port, self.upstream = port, upstream
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", port))
        self.lsock.listen(16)
        self.lsock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="passthrough")

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.lsock.close()

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                c, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            except OSError:
                c.close()
                continue
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        src.settimeout(120)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


# ----------------------------------------------------------------------------------------------
# messages


_counter = 0
_counter_lock = threading.Lock()


def unique_id(tag: str = "e2e") -> str:
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    return f"{tag}.{os.getpid()}.{int(time.time() * 1000)}.{n}@test.restrictpd"


def make_message(*, sender: str, to: Sequence[str], subject: str, body: str | bytes,
                 message_id: str | None = None, extra_headers: Sequence[str] = (),
                 prefix: bytes = b"") -> tuple[bytes, str]:
    """A complete message with LF line ends (as a local program would pipe it to sendmail).

    Returns (bytes, message_id). `prefix` goes before every header (e.g. a forged Received:)."""
    mid = message_id or unique_id()
    headers = [f"From: {sender}", f"To: {', '.join(to)}", f"Subject: {subject}",
               "Date: Fri, 27 Nov 2026 09:13:28 +0000", f"Message-ID: <{mid}>", *extra_headers]
    if isinstance(body, str):
        body = body.encode()
    return prefix + ("\n".join(headers) + "\n\n").encode() + body, mid


def to_crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def ensure_user(name: str) -> bool:
    """Create a system user without home or shell; True if this call created it."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
    return True


def remove_user(name: str):
    subprocess.run(["userdel", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=30)
