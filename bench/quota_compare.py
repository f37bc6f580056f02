#!/usr/bin/env python3
"""The quota rows of bench.py on SQLite and on PostgreSQL, interleaved, for one or more builds.

    python3 bench/quota_compare.py REPS MESSAGES LABEL=BINARY [LABEL=BINARY...]

Each repetition runs, for each build (the order rotated per repetition), bench.py's 20-session
quota rule set (20 x 10 KB, one smtp-source per session, each with its own uid) with the SQLite
store and then with the PostgreSQL store on a private cluster (bench.PostgresState, one for the
whole script, removed at the end). Prints each run's throughput, restrictpd's CPU per message,
the CPU per message of the cluster's processes and of the whole machine, and on PostgreSQL the
messages per call of restrictpd_admit (a batch, or a request decided alone, is one call), then
the medians of throughput and CPU. Run as root, with
release builds (bench/run builds one in .build-release).
"""

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def postgres_cpu_seconds(cluster):
    """CPU seconds of `cluster`'s processes now: its postmaster (with the backends it has reaped)
    and the processes it runs; 0 without a cluster or once it is gone. Other clusters on the
    machine (a test run's) are not counted."""
    if cluster is None:
        return 0.0
    try:
        with open(os.path.join(cluster.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
    except (OSError, ValueError):
        return 0.0
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(pid) != postmaster and int(fields[1]) != postmaster:
                continue
            # utime, stime, and for the postmaster cutime, cstime: its backends that ended.
            total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def admit_calls():
    """Calls of restrictpd_admit in every database of the bench's cluster (track_functions): a
    batch, or a request decided alone, each one call."""
    cluster = bench.PostgresState.cluster
    if cluster is None:
        return 0
    total = 0
    for database in bench.PostgresState.databases.values():
        out = cluster.psql("SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = 'restrictpd_admit'",
                           database)
        total += int(out or 0)
    return total


def machine_cpu_seconds():
    """CPU seconds the whole machine spent busy (user, nice, system, irq, softirq), and stolen."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick, fields[7] / tick


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    reps, total = int(sys.argv[1]), int(sys.argv[2])
    builds = [a.split("=", 1) for a in sys.argv[3:]]
    work = tempfile.mkdtemp(prefix="quota-compare-")
    sink = bench.Sink(bench.free_port())
    files = bench.write_messages(work, 10240, bench.lane_uids(20))
    results = {}
    try:
        for rep in range(reps):
            order = builds[rep % len(builds):] + builds[:rep % len(builds)]
            for label, binary in order:
                for mode, make in (("sqlite", bench.config_quota), ("pg", bench.config_quota_pg_maker(binary, work))):
                    server = [0.0]
                    machine = [0.0, 0.0]

                    def load(port):
                        before, busy, stolen = postgres_cpu_seconds(bench.PostgresState.cluster), *machine_cpu_seconds()
                        result = bench.with_cpu(sink, bench.run_lanes, port, files, total, 20)
                        server[0] = postgres_cpu_seconds(bench.PostgresState.cluster) - before
                        after_busy, after_stolen = machine_cpu_seconds()
                        machine[0], machine[1] = after_busy - busy, after_stolen - stolen
                        return result

                    calls_before = admit_calls() if mode == "pg" else 0
                    run = bench.run_proxied(binary, work, f"{label}-{mode}-{rep}", make, sink.port, load)
                    calls = 0
                    if mode == "pg":
                        # A backend reports its calls when it ends (restrictpd has stopped and
                        # closed its connections); an idle one may hold them for seconds.
                        time.sleep(1)
                        calls = admit_calls() - calls_before
                    elapsed, failures, _ = run.result
                    rate = total / elapsed
                    results.setdefault((label, mode), []).append((rate, run.cpu / total * 1e6, machine[0] / total * 1e6))
                    print(f"rep {rep + 1} {label:8} {mode:6} {rate:7.0f} msg/s {run.cpu / total * 1e6:6.0f} µs/msg "
                          f"relayed {run.relayed} failed {len(failures)} postgres {server[0] / total * 1e6:5.0f} µs/msg "
                          f"machine {machine[0] / total * 1e6:5.0f} µs/msg stolen {machine[1]:.1f} s"
                          + (f" messages/call {total / calls:.2f}" if calls else ""),
                          flush=True)
    finally:
        bench.PostgresState.stop()
        sink.stop()
    for (label, mode), rows in sorted(results.items()):
        print(f"{label:8} {mode:6} median {statistics.median(r[0] for r in rows):7.0f} msg/s  "
              f"{statistics.median(r[1] for r in rows):6.0f} µs/msg  machine {statistics.median(r[2] for r in rows):6.0f} µs/msg  "
              f"runs {[round(r[0]) for r in rows]}")


if __name__ == "__main__":
    main()
