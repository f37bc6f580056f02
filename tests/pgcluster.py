"""A private PostgreSQL cluster for restrictpd's tests, on a free loopback port.

initdb refuses to run as root, so the cluster belongs to the `postgres` user (Debian's
postgresql package creates it) and every server command runs through runuser. The cluster
lives in a temporary directory, listens on 127.0.0.1 only (and on a UNIX socket in the same
directory), and is stopped and removed by stop(). TCP logins use scram-sha-256, so a wrong
password is refused as on a real server; the superuser logs in over the socket.

As a command (for scripts/test):
  python3 tests/pgcluster.py start DIR   prints URI and PASSWORD lines; the cluster keeps running
  python3 tests/pgcluster.py stop DIR    stops it and removes DIR
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROLE = "restrictpd"
DATABASE = "restrictpd"
PASSWORD = "farm-secret"


def bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found (install Debian's postgresql)")
    return os.path.dirname(found[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, directory: str | None = None, port: int | None = None, server_options: str = ""):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="restrictpd-pg-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.port = port or free_port()
        self.bin = bindir()
        self.password_file = self.dir / "password"
        # After the test defaults (fsync=off), so they win: the benchmark's durability settings.
        self.server_options = server_options

    def _as_postgres(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], check=check, timeout=timeout,
                              capture_output=True, text=True)

    def init(self) -> "Cluster":
        os.chmod(self.dir, 0o755)
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(f"{self.bin}/initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                          "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        self.start()
        self.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        self.password_file.write_text(PASSWORD + "\n")
        os.chmod(self.password_file, 0o640)
        return self

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100 "
                f"{self.server_options}")
        self._as_postgres(f"{self.bin}/pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"),
                          "-o", opts, "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop",
                              check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = self._as_postgres(f"{self.bin}/psql", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres",
                                   "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql)
        return result.stdout.strip()

    @property
    def uri(self) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}?sslmode=disable"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "start":
        cluster = Cluster(argv[2]).init()
        print(f"URI={cluster.uri}")
        print(f"PASSWORD={PASSWORD}")
        print(f"PORT={cluster.port}")
        return 0
    directory = Path(argv[2])
    data = directory / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run(["runuser", "-u", "postgres", "--", f"{bindir()}/pg_ctl", "-D", str(data), "-m", "fast",
                        "-w", "-t", "30", "stop"], check=False)
    shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
