#!/usr/bin/env python3
"""Bounded load test for restrictpd (not a pytest test): prints numbers.

500 concurrent sessions (max_sessions 1000): 100 slow ones that connect and dribble a byte every
0.5 s, 400 that each send one whole message through restrictpd to a sink. Checks that all 400 get
250, that the daemon stays up and exits 0 on SIGTERM, and prints the daemon's peak RSS (VmHWM),
its fd count and the elapsed time.

    python3 tests/daemon/load.py [--sessions 500] [--slow 100] [--body-kb 4] [--nofile N]

--nofile sets the daemon's soft RLIMIT_NOFILE (systemd's default soft limit is 1024).
Standard library only; loopback only; every wait bounded; the daemon is always killed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemonlib as dl  # noqa: E402

HARD_LIMIT = 240.0  # seconds for the whole run


class Sink:
    """An asyncio SMTP sink in its own thread; counts messages."""

    def __init__(self):
        self.messages = 0
        self.connections = 0
        self.max_concurrent = 0
        self.current = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)

        async def main():
            self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=2048)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            await self.server.serve_forever()
        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    async def handle(self, reader, writer):
        self.connections += 1
        self.current += 1
        self.max_concurrent = max(self.max_concurrent, self.current)
        try:
            writer.write(b"220 sink.test ESMTP\r\n")
            while True:
                line = await asyncio.wait_for(reader.readline(), 120)
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    while True:
                        dl_ = await asyncio.wait_for(reader.readline(), 120)
                        if not dl_:
                            return
                        if dl_ == b".\r\n":
                            break
                    self.messages += 1
                    writer.write(b"250 2.0.0 Ok: queued as S%d\r\n" % self.messages)
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            self.current -= 1
            writer.close()

    def close(self):
        def stop():
            self.server.close()
            for t in asyncio.all_tasks(self.loop):
                t.cancel()
        self.loop.call_soon_threadsafe(stop)
        self.thread.join(5)


async def read_reply(reader, timeout=60.0):
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError(f"closed after {lines!r}")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), lines


async def full_session(port, i, body):
    t0 = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
    try:
        code, lines = await read_reply(reader)
        if code != 220:
            return code, lines, time.monotonic() - t0
        for cmd, want in ((b"EHLO load.test", 250), (b"MAIL FROM:<load%d@lab.localdomain>" % i, 250),
                          (b"RCPT TO:<rcpt%d@example.org>" % i, 250), (b"DATA", 354)):
            writer.write(cmd + b"\r\n")
            code, lines = await read_reply(reader)
            if code != want:
                return code, lines, time.monotonic() - t0
        writer.write(dl.pickup_message(0, body, subject=b"load %d" % i) + b".\r\n")
        code, lines = await read_reply(reader, 120)
        writer.write(b"QUIT\r\n")
        try:
            await read_reply(reader, 10)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        return code, lines, time.monotonic() - t0
    finally:
        writer.close()


async def slow_session(port, stop: asyncio.Event, stats):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
    try:
        code, _ = await read_reply(reader)
        stats["slow_greeted"] += code == 220
        pattern = b"NOOP\r\n"
        i = 0
        while not stop.is_set():
            writer.write(pattern[i % len(pattern):i % len(pattern) + 1])
            await writer.drain()
            i += 1
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        stats["slow_bytes"] += i
    except (OSError, ConnectionError, asyncio.TimeoutError) as e:
        stats["slow_errors"].append(repr(e))
    finally:
        writer.close()


def vm(pid, key):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


async def load(args, port, daemon):
    stop = asyncio.Event()
    stats = {"slow_greeted": 0, "slow_bytes": 0, "slow_errors": []}
    peak_fds = 0

    async def sampler():
        nonlocal peak_fds
        while not stop.is_set():
            peak_fds = max(peak_fds, fd_count(daemon.pid) or 0)
            await asyncio.sleep(0.1)

    sampling = asyncio.create_task(sampler())
    slow = [asyncio.create_task(slow_session(port, stop, stats)) for _ in range(args.slow)]
    await asyncio.sleep(1.0)  # the slow ones are in before the rush
    body = (b"x" * 76 + b"\r\n") * max(1, args.body_kb * 1024 // 78)
    t0 = time.monotonic()
    results = await asyncio.gather(*(full_session(port, i, body) for i in range(args.sessions - args.slow)),
                                   return_exceptions=True)
    elapsed = time.monotonic() - t0
    alive_during = daemon.running
    stop.set()
    await asyncio.gather(*slow, return_exceptions=True)
    await sampling
    return results, elapsed, stats, alive_during, peak_fds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--slow", type=int, default=100)
    ap.add_argument("--body-kb", type=int, default=4)
    ap.add_argument("--nofile", type=int, default=None, help="the daemon's soft RLIMIT_NOFILE")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # our own 500 + sink 400 sockets
    dl.wait_for_binary(60)

    directory = Path(tempfile.mkdtemp(prefix="restrictpd-load-", dir="/tmp"))
    os.chmod(directory, 0o755)
    sink = Sink()
    port = dl.free_port()
    config = dl.write_config(directory / "restrictpd.conf", listen=f"127.0.0.1:{port}", relay_port=sink.port,
                             state=directory / "quota.db", settings="max_sessions 1000\n")

    def limits():
        if args.nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))

    daemon = dl.Daemon(directory, config, preexec_fn=limits)
    ok = False
    try:
        daemon.wait_ready_log(10)
        rss_idle = vm(daemon.pid, "VmRSS")
        alarm = threading.Timer(HARD_LIMIT, lambda: os.kill(os.getpid(), signal.SIGINT))
        alarm.start()
        try:
            results, elapsed, stats, alive_during, peak_fds = asyncio.run(load(args, port, daemon))
        finally:
            alarm.cancel()
        hwm = vm(daemon.pid, "VmHWM")
        rss_after = vm(daemon.pid, "VmRSS")
        codes = {}
        durations = []
        failures = []
        for r in results:
            if isinstance(r, BaseException):
                codes["exception"] = codes.get("exception", 0) + 1
                failures.append(repr(r))
                continue
            code, lines, d = r
            codes[code] = codes.get(code, 0) + 1
            durations.append(d)
            if code != 250:
                failures.append(lines)
        durations.sort()
        full = args.sessions - args.slow
        # Still serving afterwards?
        after = None
        try:
            after = dl.send_message(port, ["after@example.org"])[0]
        except Exception as e:  # noqa: BLE001
            after = repr(e)
        daemon.signal(signal.SIGTERM)
        rc = daemon.wait_exit(15)
        log = daemon.log()
        print(f"sessions: {args.sessions} concurrent ({full} full messages of ~{args.body_kb} KiB, "
              f"{args.slow} slow dribblers), max_sessions 1000"
              + (f", daemon RLIMIT_NOFILE soft {args.nofile}" if args.nofile else ""))
        print(f"end-of-data replies: {dict(sorted(codes.items(), key=str))}")
        if durations:
            print(f"per-session time: min {durations[0]:.3f}s median {durations[len(durations)//2]:.3f}s "
                  f"p95 {durations[int(len(durations)*0.95)-1]:.3f}s max {durations[-1]:.3f}s")
        print(f"elapsed for the {full} messages: {elapsed:.2f}s ({full/elapsed:.0f} msg/s)")
        print(f"slow sessions greeted: {stats['slow_greeted']}/{args.slow}, bytes dribbled {stats['slow_bytes']}, "
              f"errors {len(stats['slow_errors'])}")
        print(f"sink: {sink.messages} messages, {sink.connections} connections, "
              f"{sink.max_concurrent} concurrent at most")
        print(f"daemon RSS: idle {rss_idle} kB, peak (VmHWM) {hwm} kB, after {rss_after} kB; "
              f"peak open fds {peak_fds}")
        print(f"daemon alive during the run: {alive_during}; a session afterwards: {after}; "
              f"exit status after SIGTERM: {rc}")
        warnings = [ln for ln in log.splitlines() if "warning" in ln or "error" in ln or "fatal" in ln or "crit:" in ln]
        print(f"log: {len(log.splitlines())} lines, {len(warnings)} warnings/errors")
        for ln in warnings[:5]:
            print("   ", ln[:200])
        for f in failures[:5]:
            print("  failure:", f)
        for e in stats["slow_errors"][:3]:
            print("  slow session error:", e)
        ok = (codes.get(250, 0) == full and alive_during and after == 250 and rc == 0
              and stats["slow_greeted"] == args.slow)
        print("RESULT:", "PASS" if ok else "FAIL")
    finally:
        daemon.stop()
        sink.close()
        shutil.rmtree(directory, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
