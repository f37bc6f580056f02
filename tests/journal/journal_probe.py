"""Runs inside a private mount namespace (unshare -m): puts a datagram socket where
libsystemd's sd_journal_sendv writes (/run/systemd/journal/socket), runs restrictpd with
--log journal, relays one message through it and prints the journal entries it received
as JSON. Used by test_journal.py; needs root."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

BIN = os.environ.get("RESTRICTPD_BIN", os.path.join(os.path.dirname(__file__), "../../.build/debug/restrictpd"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_entry(data):
    """The journal's native protocol: KEY=value lines, or KEY\\n<le64 length>value\\n."""
    fields = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            fields[k.decode()] = v.decode(errors="replace")
            i = nl + 1
        else:
            size = int.from_bytes(data[nl + 1:nl + 9], "little")
            fields[line.decode()] = data[nl + 9:nl + 9 + size].decode(errors="replace")
            i = nl + 9 + size + 1
    return fields


def main():
    subprocess.run(["mkdir", "-p", "/run/systemd/journal"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run/systemd/journal"], check=True)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind("/run/systemd/journal/socket")
    journal.settimeout(0.2)

    work = tempfile.mkdtemp()
    os.chmod(work, 0o777)
    listen, relay = free_port(), free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{relay}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conf = os.path.join(work, "r.conf")
    with open(conf, "w") as f:
        f.write(f"listen 127.0.0.1:{listen}\nrelay 127.0.0.1:{relay}\nclients root\n"
                f"state {work}/quota.db\nuser root\n allow *\nunknown\n refuse\n")
    daemon = subprocess.Popen([BIN, "-c", conf, "--user", "root", "--log", "journal"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    entries = []
    try:
        deadline = time.time() + 20
        while True:
            try:
                c = socket.create_connection(("127.0.0.1", listen), timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        f = c.makefile("rwb")

        def reply():
            lines = []
            while True:
                line = f.readline()
                lines.append(line.decode())
                if len(line) < 4 or line[3:4] != b"-":
                    return lines

        reply()
        for cmd in [b"EHLO probe", b"MAIL FROM:<root@lab.localdomain>", b"RCPT TO:<alice@example.com>", b"DATA"]:
            f.write(cmd + b"\r\n")
            f.flush()
            reply()
        f.write(b"Received: by lab.localdomain (Postfix, from userid 0)\r\n"
                b"\tid 4ABCDEF12; Fri, 27 Nov 2026 09:13:28 +0000 (UTC)\r\nSubject: j\r\n\r\nbody\r\n.\r\n")
        f.flush()
        final = reply()
        f.write(b"QUIT\r\n")
        f.flush()
        reply()
        c.close()
        end = time.time() + 3
        while time.time() < end:
            try:
                data = journal.recv(65536)
            except socket.timeout:
                if any("verdict=" in e.get("MESSAGE", "") for e in entries):
                    break
                continue
            entries.append(parse_entry(data))
        print(json.dumps({"final": final, "entries": entries}))
    finally:
        daemon.terminate()
        sink.terminate()
        daemon.wait(10)
        sink.wait(10)


if __name__ == "__main__":
    sys.exit(main())
