#!/usr/bin/env python3
"""A/B comparison of restrictpd builds on one throughput scenario (issue 6 work).

    sudo python3 bench/compare.py [--reps 3] [--sessions 20] [--messages 10000] [--size 10240]
                                  [--quota] [--one-process] LABEL=BINARY [LABEL=BINARY ...]

BINARY `direct` measures smtp-source -> smtp-sink with no proxy, and `haproxy` through HAProxy
in TCP mode (the byte-copying anchor of bench/run). With --quota, `BINARY,nocaps` runs that
build on the quota rule set without its volume caps (`messages`, `recipients`), so that the cost
of the caps is measured side by side. The runs are interleaved (A, B,
A, B, ...) so that the drift of a shared machine falls on every build alike; the medians are
printed with, per message, restrictpd's CPU time (user + kernel), its kernel part, and how
idle the machine was during the run (near 0 %: CPU-bound; more: latency-bound). Same load as
bench/run (one smtp-source process per session, pickup header, one connection per message,
the same configurations), without the memory tests; build the binaries first, for example
`swift build -c release --scratch-path /tmp/a` on each commit.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def cpu_idle():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields), fields[3]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--size", type=int, default=10 * 1024, help="body bytes per message")
    ap.add_argument("--quota", action="store_true", help="the 1000-user quota rule set instead of allow-all")
    ap.add_argument("--one-process", action="store_true",
                    help="one smtp-source process for all sessions (one uid) instead of one per session")
    ap.add_argument("builds", nargs="+", metavar="LABEL=BINARY")
    args = ap.parse_args()
    builds = [b.split("=", 1) for b in args.builds]

    workdir = tempfile.mkdtemp(prefix="restrictpd-compare-")
    files = bench.write_messages(workdir, args.size, bench.lane_uids(args.sessions))
    sink = bench.Sink(bench.free_port())
    results = {label: [] for label, _ in builds}

    def load(port):
        if args.one_process:
            return bench.run_single_process(port, files[bench.lane_uids(1)[0]], args.messages, args.sessions)
        return bench.run_lanes(port, files, args.messages, args.sessions)
    try:
        for rep in range(args.reps):
            for label, binary in builds:
                total0, idle0 = cpu_idle()
                if binary == "direct":
                    el, fails = load(sink.port)
                    cpu = kernel = 0.0
                elif binary == "haproxy":
                    (el, fails), cpu, kernel = bench.run_haproxy(workdir, sink.port, load)
                else:
                    binary, _, variant = binary.partition(",")
                    if args.quota:
                        def make(port, sink_port, state, caps=variant != "nocaps"):
                            return bench.config_quota(port, sink_port, state, caps=caps)
                    else:
                        make = bench.config_allow_all
                    run = bench.run_proxied(binary, workdir, label, make, sink.port, load)
                    (el, fails), cpu, kernel = run.result, run.cpu, run.kernel
                    if run.relayed != args.messages:
                        fails = fails + [f"relayed {run.relayed} of {args.messages}, log {run.log_path}"]
                total1, idle1 = cpu_idle()
                idle = 100.0 * (idle1 - idle0) / max(1, total1 - total0)
                row = (args.messages / el, cpu / args.messages * 1e6, kernel / args.messages * 1e6, idle)
                results[label].append(row)
                note = f"  ({'; '.join(fails)[:200]})" if fails else ""
                print(f"rep {rep + 1} {label:12s} {row[0]:6.0f} msg/s  {row[1]:4.0f} µs/msg  kernel {row[2]:4.0f}  "
                      f"idle {row[3]:3.0f}%{note}", flush=True)
    finally:
        sink.stop()
    print(f"\nmedians of {args.reps}: {args.sessions} sessions, {args.messages} messages of {args.size} bytes, "
          f"{'quota' if args.quota else 'allow-all'} rules, "
          f"{'one smtp-source process' if args.one_process else 'one smtp-source process per session'}")
    for label, rows in results.items():
        med = [statistics.median(r[i] for r in rows) for i in range(4)]
        print(f"{label:12s} {med[0]:6.0f} msg/s  proxy {med[1]:4.0f} µs/msg (kernel {med[2]:4.0f})  idle {med[3]:3.0f}%")


if __name__ == "__main__":
    main()
