"""Process-level test helpers for restrictpd (the daemon as a black box).

Standard library only. Everything listens on loopback (127.0.0.1, ::1, or a UNIX socket in a
temporary directory). Every wait has a deadline; every spawned process is killed at teardown.

Pieces:
  binary()         the restrictpd executable (env RESTRICTPD_BIN or .build/debug/restrictpd)
  free_port()      a free loopback TCP port (bind port 0, read it, close)
  Relay            a threaded, scriptable SMTP server standing in for Postfix's 10026 smtpd:
                   it accepts everything, records connections and messages, and can be told
                   to delay its greeting or its end-of-data reply
  NotifyListener   an AF_UNIX datagram socket playing systemd's NOTIFY_SOCKET
  Daemon           restrictpd as a subprocess, log (--log stderr) captured to a file
  Client           a raw SMTP client over TCP or a UNIX socket, reading whole (multi-line) replies
  write_config()   a restrictpd.conf with a listen line, the relay, clients, state, rules
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# The shared test library, also for scripts that import this module outside pytest.
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "lib"))
from testlib import free_port, has_ipv6_loopback, port_accepts, wait_until  # noqa: E402,F401

import errno
import os
import re
import signal
import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

PICKUP_HEADER = (
    b"Received: by lab.localdomain (Postfix, from userid {uid})\r\n"
    b"\tid ABC123; Fri, 27 Nov 2026 09:13:28 +0000 (UTC)\r\n"
)

# Variables a test run must not leak into the daemon (systemd's protocol, journal logging).
SYSTEMD_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
               "WATCHDOG_PID", "INVOCATION_ID", "JOURNAL_STREAM")


def binary() -> str:
    return os.environ.get("RESTRICTPD_BIN") or str(REPO / ".build" / "debug" / "restrictpd")


def wait_for_binary(timeout: float = 120.0) -> str:
    """The daemon engineer rebuilds the binary; if it is missing (mid-build), wait a while."""
    path = binary()
    deadline = time.monotonic() + timeout
    while not (os.path.isfile(path) and os.access(path, os.X_OK)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"restrictpd binary {path} missing after {timeout}s")
        time.sleep(1.0)
    return path










def pickup_message(uid: int = 0, body: bytes = b"hello\r\n", subject: bytes = b"test",
                   queue_id: str = "ABC123") -> bytes:
    """A message as Postfix's pickup hands it on: the Received header first. No final dot.
    Postfix keeps a message's queue id across retries: give each new message its own."""
    return (PICKUP_HEADER.replace(b"{uid}", str(uid).encode()).replace(b"ABC123", queue_id.encode())
            + b"From: sender@lab.localdomain\r\nSubject: " + subject + b"\r\n\r\n" + body)


# ----------------------------------------------------------------------------------------------
# the relay (the 10026 reinjection smtpd stand-in)


class Relay:
    """Threaded SMTP server on loopback. Accepts everything unless told otherwise.

    messages: list of dicts {mail, rcpts, data} (data dot-unstuffed, without the final dot).
    connections: number of connections accepted so far.
    greeting_delay / data_delay: seconds to wait before the greeting / the end-of-data reply.
    data_reply: the reply to the end of data (default 250 2.0.0 Ok: queued as Q<n>).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.lock = threading.Lock()
        self.messages: list[dict] = []
        self.connections = 0
        self.greeting_delay = 0.0
        self.data_delay = 0.0
        self.data_reply: bytes | None = None
        relay = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 120

            def handle(self):
                with relay.lock:
                    relay.connections += 1
                try:
                    relay._converse(self.rfile, self.wfile)
                except (OSError, ValueError):
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 1024
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.server = Server((host, port), Handler)
        self.host = host
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    def _converse(self, rfile, wfile):
        def say(text: bytes):
            wfile.write(text)
            wfile.flush()

        if self.greeting_delay:
            time.sleep(self.greeting_delay)
        say(b"220 relay.test ESMTP scripted\r\n")
        mail, rcpts = None, []
        while True:
            line = rfile.readline(65536)
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                say(b"250-relay.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
                    b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")
            elif verb == b"HELO":
                say(b"250 relay.test\r\n")
            elif verb == b"MAIL":
                mail, rcpts = line.rstrip(b"\r\n"), []
                say(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(line.rstrip(b"\r\n"))
                say(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                say(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                data = bytearray()
                while True:
                    dl = rfile.readline(1 << 20)
                    if not dl:
                        return
                    if dl == b".\r\n":
                        break
                    if dl.startswith(b"."):
                        dl = dl[1:]
                    data += dl
                with self.lock:
                    self.messages.append({"mail": mail, "rcpts": rcpts, "data": bytes(data)})
                    n = len(self.messages)
                if self.data_delay:
                    time.sleep(self.data_delay)
                say(self.data_reply or b"250 2.0.0 Ok: queued as Q%d\r\n" % n)
                mail, rcpts = None, []
            elif verb == b"RSET":
                mail, rcpts = None, []
                say(b"250 2.0.0 Ok\r\n")
            elif verb == b"NOOP":
                say(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                say(b"221 2.0.0 Bye\r\n")
                return
            else:
                say(b"502 5.5.2 Error: command not recognized\r\n")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------------------------
# systemd's notification socket


class NotifyListener:
    """An AF_UNIX datagram socket at DIR/notify.sock collecting sd_notify messages.

    messages: list of (monotonic time, text). on_message(text) is called in the reader thread
    for every message (used to probe the port at the very moment READY=1 arrives).
    """

    def __init__(self, directory: Path, on_message: Callable[[str], None] | None = None):
        self.path = str(Path(directory) / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o777)  # a daemon that dropped privileges must still reach it
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.on_message = on_message
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            text = data.decode("utf-8", "replace")
            now = time.monotonic()
            if self.on_message:
                try:
                    self.on_message(text)
                except Exception:  # noqa: BLE001 - a probe's failure must not kill the reader
                    pass
            with self.lock:
                self.messages.append((now, text))

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.messages)

    def texts(self) -> list[str]:
        return [t for _, t in self.snapshot()]

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, start: int = 0,
                 what: str = "notification") -> int:
        """Index of the first message at or after `start` that satisfies `predicate`."""
        def find():
            msgs = self.snapshot()
            for i in range(start, len(msgs)):
                if predicate(msgs[i][1]):
                    return i + 1  # +1 so that index 0 is truthy
            return None
        try:
            return wait_until(find, timeout, what=what) - 1
        except TimeoutError as e:
            raise TimeoutError(f"{e}; got so far: {self.texts()!r}") from None

    def close(self):
        self.running = False
        self.thread.join(timeout=2)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def fields(text: str) -> dict[str, str]:
    """sd_notify payload 'A=1\\nB=2' -> {'A': '1', 'B': '2'}."""
    out = {}
    for line in text.split("\n"):
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# the daemon


def clean_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV}
    if extra:
        env.update(extra)
    return env


def write_config(path: Path, *, listen: str | Sequence[str], relay_port: int, state: Path,
                 clients: str = "root", settings: str = "", rules: str = "user root\n    allow *\n") -> Path:
    listen_words = listen if isinstance(listen, str) else " ".join(listen)
    text = (f"listen {listen_words}\n"
            f"relay 127.0.0.1:{relay_port}\n"
            f"clients {clients}\n"
            f"state {state}\n"
            f"{settings}\n"
            f"{rules}")
    path.write_text(text)
    return path


def spawn(start: Callable[[], object], timeout: float = 90.0):
    """Runs `start` (a Popen or subprocess.run), retrying while the binary is being rebuilt
    (ETXTBSY while the linker writes it, ENOENT while it is replaced)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return start()
        except OSError as e:
            if e.errno not in (errno.ETXTBSY, errno.ENOENT) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


class Daemon:
    """restrictpd as a child process. The log goes to DIR/daemon.log (--log stderr)."""

    def __init__(self, directory: Path, config: Path, *, user: str = "root",
                 env: dict | None = None, extra_args: Sequence[str] = (),
                 shell_prefix: str | None = None, pass_fds: Iterable[int] = (),
                 preexec_fn=None, close_fds: bool = True, argv_prefix: Sequence[str] = (),
                 log_level: str = "info"):
        self.directory = Path(directory)
        self.config = Path(config)
        self.log_path = self.directory / f"daemon-{time.monotonic_ns()}.log"
        argv = [binary(), "--config", str(config), "--user", user, "--log", "stderr",
                "--log-level", log_level, *extra_args]
        if shell_prefix is not None:
            # `sh -c 'PREFIX; exec "$0" "$@"'` keeps the pid, so $$ is the daemon's pid.
            argv = ["/bin/sh", "-c", f'{shell_prefix}; exec "$0" "$@"', *argv]
        argv = [*argv_prefix, *argv]
        self.argv = argv
        self._log = open(self.log_path, "wb")
        self.proc = spawn(lambda: subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=clean_env(env), pass_fds=tuple(pass_fds), preexec_fn=preexec_fn, close_fds=close_fds))
        self.pid = self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 5.0, count: int = 1) -> list[str]:
        rx = re.compile(pattern)

        def found():
            lines = [ln for ln in self.log().splitlines() if rx.search(ln)]
            return lines if len(lines) >= count else None
        try:
            return wait_until(found, timeout, what=f"log line /{pattern}/")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n--- daemon log ---\n{self.log()}") from None

    def wait_listening(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"restrictpd exited with {self.proc.returncode}:\n{self.log()}")
            return port_accepts(port, host, timeout=0.5)
        wait_until(up, timeout, what=f"restrictpd listening on {host}:{port}")

    def wait_ready_log(self, timeout: float = 10.0):
        """Waits for the 'ready' log line (for tests without a notify socket)."""
        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"restrictpd exited with {self.proc.returncode}:\n{self.log()}")
            return re.search(r"\bready: ", self.log())
        wait_until(up, timeout, what="restrictpd ready")

    def signal(self, sig: int):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


# ----------------------------------------------------------------------------------------------
# a raw SMTP client


class SMTPClosed(Exception):
    pass


class Client:
    """Raw SMTP client. reply() reads one whole reply: (code, [lines]) with text lines decoded."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", *, unix: str | None = None,
                 timeout: float = 10.0):
        if unix is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = unix
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            target = (host, port)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.sock.connect(target)
        self.buffer = b""

    def _line(self, timeout: float | None) -> bytes:
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while b"\r\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no reply line in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SMTPClosed(f"connection closed; partial: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self, timeout: float | None = None) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = self._line(timeout)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), lines

    def send(self, data: bytes):
        self.sock.sendall(data)

    def cmd(self, line: str | bytes, timeout: float | None = None) -> tuple[int, list[str]]:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply(timeout)

    def at_eof(self, timeout: float = 2.0) -> bool:
        """True when the server closes the connection within `timeout` (data before it is dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            self.buffer += chunk

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def send_message(port: int | None, rcpts: Sequence[str], *, uid: int = 0, host: str = "127.0.0.1",
                 unix: str | None = None, body: bytes = b"hello\r\n",
                 mail_from: str = "sender@lab.localdomain", queue_id: str = "ABC123") -> tuple[int, list[str]]:
    """One whole session (EHLO, MAIL, RCPT..., DATA, message, QUIT). Returns the end-of-data reply."""
    with Client(port, host, unix=unix) as c:
        code, lines = c.reply()
        assert code == 220, lines
        code, lines = c.cmd("EHLO client.test")
        assert code == 250, lines
        code, lines = c.cmd(f"MAIL FROM:<{mail_from}>")
        assert code == 250, lines
        for r in rcpts:
            code, lines = c.cmd(f"RCPT TO:<{r}>")
            assert code == 250, lines
        code, lines = c.cmd("DATA")
        assert code == 354, lines
        c.send(pickup_message(uid, body, queue_id=queue_id) + b".\r\n")
        result = c.reply()
        try:
            c.cmd("QUIT", timeout=3)
        except (SMTPClosed, OSError):
            pass
        return result


def run_as(user: str, code: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
    """Runs `python3 -c code` as another local user (runuser), output captured."""
    return subprocess.run(["runuser", "-u", user, "--", "python3", "-c", code],
                          capture_output=True, text=True, timeout=timeout, env=clean_env(),
                          cwd="/")
