#!/usr/bin/env python3
"""A CPU profile of restrictpd under the benchmark's main load (issue 12's "the profile of
whatever still stands between restrictpd and the targets").

    sudo python3 bench/profile.py BINARY [MESSAGES]      then: perf report -i /tmp/restrictpd.perf

Starts a sink and restrictpd (allow-all, bench.py's configuration), records `perf record -g
-F 999 -p PID` while 20 smtp-source processes send MESSAGES (6000) messages of 10 KB, and prints
the throughput and restrictpd's context switches. Build the binary first (bench/run does, in
.build-release); perf comes with Debian's linux-perf package.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    binary = sys.argv[1]
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 6000
    output = os.environ.get("PROFILE_OUT", "/tmp/restrictpd.perf")
    workdir = tempfile.mkdtemp(prefix="restrictpd-profile-")
    files = bench.write_messages(workdir, 10240, bench.lane_uids(20))
    sink = bench.Sink(bench.free_port())
    port = bench.free_port()
    rpd = bench.Restrictpd(binary, workdir, "profile", bench.config_allow_all(port, sink.port, "@STATE@"), port)
    try:
        perf = subprocess.Popen(["perf", "record", "-g", "-F", "999", "-o", output, "-p", str(rpd.pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # perf attaches before the load starts
        elapsed, failures = bench.run_lanes(port, files, messages, 20)
        perf.send_signal(signal.SIGINT)
        perf.wait()
        print(f"{messages / elapsed:.0f} msg/s, {len(failures)} smtp-source runs failed; profile in {output}")
        # Every thread's, not only the main thread's (/proc/PID/status).
        switches = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
        for task in os.listdir(f"/proc/{rpd.pid}/task"):
            with open(f"/proc/{rpd.pid}/task/{task}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in switches:
                        switches[key] += int(value)
        for key, value in switches.items():
            print(f"{key}: {value} ({value / messages:.2f} per message)")
    finally:
        rpd.stop()
        sink.stop()


if __name__ == "__main__":
    main()
