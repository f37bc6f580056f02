#!/usr/bin/env python3
"""The PostgreSQL server's cost of one `CALL restrictpd_admit(...)`, without restrictpd.

    python3 bench/procedure_cost.py BINARY [SECONDS] [PROCEDURE.sql]

Starts a private cluster (tests/pgcluster.py; fsync on, synchronous_commit off, as bench.py's
quota-pg mode) with pg_stat_statements loaded, creates the schema with BINARY's --init-store,
and runs pgbench (one client, prepared) for SECONDS (default 6) per shape: a call deciding one
request, and a batch of three (three budgets), each the bench's steady state (one address,
already counted, and both volume caps). Each run has a scope of its own, so the rows of one run
do not slow the next. Prints the calls per second and the server's CPU per call (the
cluster's processes, from /proc), then, from a second run with pg_stat_statements tracking the
statements inside the procedure, each statement's mean execution time: what the procedure
spends outside them is its PL/pgSQL, the statements' start-up and the call itself. Run as root; removes the cluster at the end.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgcluster  # noqa: E402
import quota_compare  # noqa: E402

NONE = -9223372036854775808


def call(scope, uids, now):
    """A CALL of restrictpd_admit for one request per uid, in pgbench's syntax (:u is random)."""
    n = len(uids)
    start = now - 86400

    def arr(values, cast="bigint"):
        return f"ARRAY[{', '.join(str(v) for v in values)}]::{cast}[]"

    return (f"CALL restrictpd_admit('{scope}', false, {arr(uids)}, {arr(uids, 'int')}, "
            f"{arr(range(1, n + 1), 'int')}, {arr([repr('b@example.com')] * n, 'text')}, {arr([0] * n, 'int')}, "
            f"'{{}}'::text[], {arr([50] * n)}, {arr([start] * n)}, {arr(['true'] * n, 'boolean')}, "
            f"ARRAY[{', '.join(['extract(epoch from now())::bigint'] * n)}], "
            f"{arr([10000000] * n)}, {arr([start] * n)}, {arr([10000000] * n)}, {arr([start] * n)}, {arr([start] * n)}, "
            f"{arr([NONE] * n)}, {arr([1] * n)}, {arr([0] * n)}, {arr([0] * n)});\n")


def pgbench(cluster, script, seconds):
    """Runs `script` with pgbench; the transactions done. Exits with pgbench's words when it
    fails (a body to try that does not run)."""
    result = subprocess.run(
        ["runuser", "-u", "postgres", "--", "env", f"PGPASSWORD={pgcluster.PASSWORD}", f"{cluster.bin}/pgbench",
         "-n", "-M", "prepared", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", pgcluster.ROLE, "-c", "1", "-j", "1",
         "-T", str(seconds), "-f", script, pgcluster.DATABASE], capture_output=True, text=True)
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        if "number of transactions actually processed" in line:
            return int(line.split(":")[1].split()[0])
    sys.exit(f"pgbench said:\n{result.stdout}\n{result.stderr}")


def main():
    if len(sys.argv) not in (2, 3, 4):
        sys.exit(__doc__)
    binary, seconds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) >= 3 else 6
    procedure = open(sys.argv[3]).read() if len(sys.argv) == 4 else None
    work = tempfile.mkdtemp(prefix="procedure-cost-")
    os.chmod(work, 0o755)  # the cluster's directory and pgbench's scripts are read as postgres
    # pg_stat_statements.track is set with ALTER SYSTEM per run: an option given to the server
    # would override it.
    cluster = pgcluster.Cluster(os.path.join(work, "pg"), server_options=(
        "-c fsync=on -c synchronous_commit=off -c shared_preload_libraries=pg_stat_statements"))
    try:
        cluster.init()
        cluster.psql("CREATE EXTENSION pg_stat_statements", pgcluster.DATABASE)
        config = os.path.join(work, "init.conf")
        with open(config, "w") as f:
            f.write(f"state {cluster.uri}\nstate_password_file {cluster.password_file}\nscope cost\n"
                    "default\n    allow *\n")
        subprocess.run([binary, "--config", config, "--init-store"], check=True, capture_output=True, text=True)
        if procedure is not None:
            try:
                cluster.psql(procedure, pgcluster.DATABASE)
            except subprocess.CalledProcessError as e:
                sys.exit(f"the procedure to try was refused:\n{e.stderr}")
        runs = 0
        for shape, uids in (("one request", [":u"]), ("three requests", [":u", ":u + 1", ":u + 2"])):
            for tracked in (False, True):
                runs += 1
                script = os.path.join(work, f"run{runs}.sql")
                with open(script, "w") as f:
                    f.write("\\set u random(20000, 20019) * 3\n" + call(f"cost-{runs}", uids, int(time.time())))
                os.chmod(script, 0o644)
                cluster.psql(f"ALTER SYSTEM SET pg_stat_statements.track = '{'all' if tracked else 'none'}'")
                cluster.psql("SELECT pg_reload_conf()")
                time.sleep(0.5)
                tracking = cluster.psql("SHOW pg_stat_statements.track")
                if tracking != ("all" if tracked else "none"):
                    sys.exit(f"pg_stat_statements.track is {tracking!r} after the reload")
                cluster.psql("SELECT pg_stat_statements_reset()", pgcluster.DATABASE)
                before = quota_compare.postgres_cpu_seconds(cluster)
                done = pgbench(cluster, script, seconds)
                cpu = quota_compare.postgres_cpu_seconds(cluster) - before
                if not tracked:
                    print(f"{shape:15} {done / seconds:7.0f} calls/s  server {cpu / done * 1e6:5.0f} µs/call", flush=True)
                    continue
                rows = cluster.psql(
                    "SELECT calls, round((total_exec_time * 1000 / calls)::numeric, 1), "
                    "left(regexp_replace(query, '\\s+', ' ', 'g'), 70) FROM pg_stat_statements "
                    "WHERE calls > 0 AND query NOT LIKE '%pg_stat_statements%' ORDER BY total_exec_time DESC LIMIT 6",
                    pgcluster.DATABASE)
                print(f"{shape:15} with the statements tracked (mean µs of each, calls):")
                for row in rows.splitlines():
                    calls, mean, query = row.split("|", 2)
                    print(f"    {mean:>7} µs  {calls:>6} calls  {query}")
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
