"""What every Python test of restrictpd shares: waiting with a deadline, free loopback ports,
probing a port, process liveness, and the hard per-test time limit. tests/conftest.py puts this
directory on sys.path, so tests/daemon, tests/e2e and the rest import it by name."""

from __future__ import annotations

import signal
import socket
import time
from contextlib import contextmanager
from typing import Callable


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               what: str = "condition"):
    """Poll `predicate` until it returns something truthy; return that value. Raises
    TimeoutError (naming `what`) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def free_port(family: int = socket.AF_INET) -> int:
    """A TCP port on loopback that nothing listens on right now."""
    return free_ports(1, family)[0]


def free_ports(n: int, family: int = socket.AF_INET) -> list[int]:
    """n distinct such ports (all held open together while they are chosen)."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True when a TCP connect to host:port succeeds (the socket is closed again at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            return True
        except OSError:
            return False


def pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return True


@contextmanager
def time_limit(seconds: int):
    """Aborts the body (SIGALRM) if it runs past every deadline of its own, e.g. on a wedged
    subprocess."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded the hard limit of {seconds}s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
