"""The SMTP door (design decision 11): restrictpd as Postfix's access policy service, driven
the way Postfix's smtpd drives it, against the real daemon. The "SMTP clients" are real TCP
connections to a stand-in smtpd listener, opened as real local users, so the daemon finds
their UID in the kernel's socket table by the 4-tuple each request names."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import subprocess
import time

import pytest

import daemonlib as dl

RULES = """user www-data
    allow friend@example.org
    arbitrary 3 per day
user root
    allow *
default
    allow @localhost
unknown
    refuse
"""


class FakeSMTPD:
    """A listener standing in for Postfix's smtpd: local users connect to it, and the test
    then asks the policy service about those connections."""

    def __init__(self, host: str = "127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.children: list[subprocess.Popen] = []

    def client(self, user: str) -> int:
        """A connection opened by `user` that stays open; returns its source port."""
        code = ("import socket,sys,time\n"
                f"s=socket.create_connection(({self.host!r},{self.port}))\n"
                "print(s.getsockname()[1],flush=True)\n"
                "sys.stdin.read()\n")
        p = subprocess.Popen(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", code],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.children.append(p)
        port = int(p.stdout.readline())
        conn, _ = self.sock.accept()
        self.held.append(conn)
        return port

    def drop(self, index: int):
        """The client of the index-th connection goes away."""
        p = self.children[index]
        p.stdin.close()
        p.wait(timeout=10)
        self.held[index].close()

    def close(self):
        for p in self.children:
            if p.poll() is None:
                p.kill()
                p.wait()
        for c in self.held:
            c.close()
        self.sock.close()


def request(state: str, *, client_port: int, server_port: int, recipient: str = "", instance: str = "i1",
            client: str = "127.0.0.1", server: str = "127.0.0.1", drop: tuple[str, ...] = (), **extra) -> bytes:
    attrs = {
        "request": "smtpd_access_policy", "protocol_state": state, "protocol_name": "ESMTP",
        "client_address": client, "client_name": "localhost", "client_port": str(client_port),
        "server_address": server, "server_port": str(server_port), "helo_name": "lab",
        "sender": "someone@lab", "recipient": recipient, "recipient_count": "0", "queue_id": "",
        "instance": instance, "size": "0", "sasl_username": "",
    }
    attrs.update({k: str(v) for k, v in extra.items()})
    for name in drop:
        del attrs[name]
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


class PolicyClient:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""

    def ask(self, raw: bytes) -> str:
        self.sock.sendall(raw)
        return self.answer()

    def answer(self) -> str:
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("policy service closed the connection")
            self.buf += chunk
        text, self.buf = self.buf.split(b"\n\n", 1)
        assert text.startswith(b"action="), text
        return text[len(b"action="):].decode()

    def close(self):
        self.sock.close()


@pytest.fixture
def door(lab):
    smtpd = FakeSMTPD()
    lab.cleanups.append(smtpd.close)
    policy_port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{dl.free_port()}", rules=RULES,
                        settings=f"policy_listen 127.0.0.1:{policy_port}")
    daemon = lab.daemon(config, log_level="debug")
    daemon.wait_listening(policy_port)
    return smtpd, policy_port, daemon, config


def test_each_recipient_judged_by_the_client_uid(door):
    smtpd, policy_port, daemon, _ = door
    www = smtpd.client("www-data")
    root = smtpd.client("root")
    nobody = smtpd.client("nobody")
    p = PolicyClient(policy_port)
    ask = lambda port, rcpt, inst: p.ask(request("RCPT", client_port=port, server_port=smtpd.port, recipient=rcpt, instance=inst))
    assert ask(www, "friend@example.org", "w1") == "DUNNO"
    assert ask(root, "anyone@example.net", "r1") == "DUNNO"
    assert ask(nobody, "x@localhost", "n1") == "DUNNO"
    refused = ask(nobody, "x@example.net", "n1")
    assert refused == "550 5.7.1 <x@example.net>: not permitted for uid 65534 (nobody)", refused
    daemon.wait_log(r"NOQUEUE: uid=33 user=www-data door=smtp client=127\.0\.0\.1:\d+ from=<someone@lab> "
                    r"to=<friend@example\.org> verdict=relayed reason=\"allowed\"")
    daemon.wait_log(r"uid=65534 user=nobody door=smtp .* to=<x@example\.net> verdict=refused")


def test_quota_reserved_at_rcpt_spent_at_end_of_message(door, lab):
    smtpd, policy_port, daemon, config = door
    www = smtpd.client("www-data")
    other = smtpd.client("www-data")
    p = PolicyClient(policy_port)
    rcpt = lambda port, r, inst: p.ask(request("RCPT", client_port=port, server_port=smtpd.port, recipient=r, instance=inst))
    eom = lambda port, inst: p.ask(request("END-OF-MESSAGE", client_port=port, server_port=smtpd.port, instance=inst))
    assert rcpt(www, "a@example.net", "t1") == "DUNNO"
    assert rcpt(www, "b@example.net", "t1") == "DUNNO"
    # Another open transaction of the same uid sees the two reserved: one place left.
    assert rcpt(other, "c@example.net", "t2") == "DUNNO"
    over = rcpt(other, "d@example.net", "t2")
    assert over.startswith("DEFER_IF_PERMIT 4.7.1 <d@example.net>: quota of 3 arbitrary recipients per day exhausted"), over
    # A held address costs nothing more.
    assert rcpt(other, "A@example.net", "t2") == "DUNNO"
    # Nothing is spent until END-OF-MESSAGE.
    assert "a@example.net" not in quota(config)
    # What is left counts what other transactions hold: none.
    assert eom(www, "t1") == "DUNNO"
    daemon.wait_log(r"door=smtp .* to=<a@example\.net>,<b@example\.net> verdict=relayed reason=\"within quota\" quota=\"0/3 per day\"")
    q = quota(config)
    assert "a@example.net" in q and "b@example.net" in q and "c@example.net" not in q


def test_a_new_transaction_or_a_vanished_client_releases_reservations(door):
    smtpd, policy_port, daemon, config = door
    a = smtpd.client("www-data")
    b = smtpd.client("www-data")
    p = PolicyClient(policy_port)
    rcpt = lambda port, r, inst: p.ask(request("RCPT", client_port=port, server_port=smtpd.port, recipient=r, instance=inst))
    for r in ("a@example.net", "b@example.net", "c@example.net"):
        assert rcpt(a, r, "t1") == "DUNNO"
    assert rcpt(b, "z@example.net", "t2").startswith("DEFER_IF_PERMIT 4.7.1")
    # RSET and MAIL again on a's connection: a new instance; the old reservations go.
    assert rcpt(a, "x@example.net", "t1b") == "DUNNO"
    assert rcpt(b, "z@example.net", "t2") == "DUNNO"
    assert rcpt(b, "y@example.net", "t2") == "DUNNO"
    assert rcpt(b, "w@example.net", "t2").startswith("DEFER_IF_PERMIT 4.7.1")
    # a's client disconnects: its reservation is released when it would block someone.
    smtpd.drop(0)
    assert rcpt(b, "w@example.net", "t2") == "DUNNO"
    daemon.wait_log(r"policy: t1b: client 127\.0\.0\.1:\d+ is gone; released 1 reserved recipients")
    # Nothing was spent by any of it.
    assert "example.net" not in quota(config)


def test_client_whose_uid_cannot_be_learned_is_deferred(door):
    smtpd, policy_port, daemon, _ = door
    p = PolicyClient(policy_port)
    # No such connection exists: never DUNNO.
    gone = p.ask(request("RCPT", client_port=1, server_port=smtpd.port, recipient="friend@example.org"))
    assert gone.startswith("DEFER 4.3.0"), gone
    missing = p.ask(request("RCPT", client_port="", server_port=smtpd.port, recipient="friend@example.org"))
    assert missing.startswith("DEFER 4.3.0"), missing
    daemon.wait_log(r"verdict=deferred reason=\"cannot learn the client's uid")


@pytest.mark.parametrize("stage", ["RCPT", "END-OF-MESSAGE"])
def test_a_request_missing_what_the_door_needs_is_deferred_never_dunno(door, stage):
    """Every attribute the door needs to name the sender, the transaction or the recipient,
    missing, empty or malformed, gives DEFER 4.3.0 for a real local client (never DUNNO), and
    the connection serves on."""
    smtpd, policy_port, daemon, _ = door
    www = smtpd.client("www-data")
    p = PolicyClient(policy_port)
    def ask(**overrides) -> str:
        attrs = dict(client_port=www, server_port=smtpd.port, recipient="x@example.net", instance="m1")
        attrs.update(overrides)
        drop = attrs.pop("drop", ())
        return p.ask(request(stage, drop=drop, **attrs))
    if stage == "END-OF-MESSAGE":
        # An open transaction, so that the whole request would pass.
        assert p.ask(request("RCPT", client_port=www, server_port=smtpd.port, recipient="friend@example.org",
                             instance="m1")) == "DUNNO"
    needed = ["request", "protocol_state", "client_address", "client_port", "server_address", "server_port", "instance"]
    if stage == "RCPT":
        needed.append("recipient")
    for name in needed:
        missing = ask(drop=(name,))
        assert missing.startswith("DEFER 4.3.0"), (name, "missing", missing)
        empty = ask(**{name: ""})
        assert empty.startswith("DEFER 4.3.0"), (name, "empty", empty)
    for name, bad in (("client_address", "localhost"), ("client_port", "x25"), ("server_port", "99999"),
                      ("server_address", "::ffff:not-an-ip")):
        answer = ask(**{name: bad})
        assert answer.startswith("DEFER 4.3.0"), (name, bad, answer)
    daemon.wait_log(r"policy request refused: no protocol_state attribute")
    daemon.wait_log(r"policy request deferred: no instance attribute")
    if stage == "RCPT":
        daemon.wait_log(r"policy request deferred: RCPT without a recipient")
    # The whole request passes: a stranger within www-data's quota, or the end of the open
    # transaction.
    assert ask() == "DUNNO"


def test_remote_clients_get_dunno(door):
    smtpd, policy_port, daemon, _ = door
    p = PolicyClient(policy_port)
    for client in ("192.0.2.7", "2001:db8::7", "::ffff:198.51.100.1"):
        answer = p.ask(request("RCPT", client=client, client_port=4000, server_port=25, recipient="x@example.net"))
        assert answer == "DUNNO", (client, answer)
    # ...but one of this host's own (non-loopback) addresses is local: judged, here deferred
    # because no such connection exists.
    own = [a for a in local_addresses() if not a.startswith("127.") and a != "::1"]
    if own:
        answer = p.ask(request("RCPT", client=own[0], client_port=4000, server_port=25, recipient="x@example.net"))
        assert answer.startswith("DEFER 4.3.0"), (own[0], answer)


def test_malformed_and_oversized_requests_are_deferred_and_the_connection_goes_on(door):
    smtpd, policy_port, daemon, _ = door
    www = smtpd.client("www-data")
    p = PolicyClient(policy_port)
    assert p.ask(b"no equals sign here\n\n").startswith("DEFER 4.3.0 Error: malformed policy request")
    assert p.ask(b"request=smtpd_access_policy\nrequest=smtpd_access_policy\n\n").startswith("DEFER 4.3.0")
    assert p.ask(b"a=" + b"x" * 100_000 + b"\n\n").startswith("DEFER 4.3.0")
    assert p.ask(b"".join(b"a%d=1\n" % i for i in range(1000)) + b"\n").startswith("DEFER 4.3.0")
    assert p.ask(b"request=something_else\n\n").startswith("DEFER 4.3.0")
    # Other stages are none of the door's business.
    assert p.ask(request("MAIL", client_port=www, server_port=smtpd.port)) == "DUNNO"
    # And the same connection still serves a good request.
    assert p.ask(request("RCPT", client_port=www, server_port=smtpd.port, recipient="friend@example.org")) == "DUNNO"
    daemon.wait_log(r"warning: policy request from .* refused: malformed attribute line")
    assert daemon.running


def test_many_requests_on_one_connection_and_many_connections(door):
    smtpd, policy_port, daemon, _ = door
    ports = [smtpd.client("www-data") for _ in range(16)]

    def conversation(n: int) -> list[str]:
        p = PolicyClient(policy_port)
        try:
            # Pipelined: all requests written at once, the answers come back in order.
            raw = b"".join(request("RCPT", client_port=ports[n], server_port=smtpd.port,
                                   recipient="friend@example.org" if i % 2 == 0 else f"x{i}@example.net",
                                   instance=f"c{n}") for i in range(50))
            p.sock.sendall(raw)
            return [p.answer() for _ in range(50)]
        finally:
            p.close()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(conversation, range(16)))
    for answers in results:
        assert len(answers) == 50
        assert all(a == "DUNNO" for a in answers[0::2]), answers
    # One uid's reservations are decided one at a time: contention never ends in "quota busy".
    assert not [a for answers in results for a in answers if "busy" in a], results
    # Sixteen open transactions of one uid with 3 places: never more than 3 distinct strangers held.
    admitted = {f"x{i}" for answers in results for i, a in enumerate(answers) if i % 2 and a == "DUNNO"}
    assert 1 <= len(admitted) <= 3, admitted


def test_peer_check_applies_to_the_policy_listener(lab):
    policy_port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{dl.free_port()}", rules=RULES, clients="postfix",
                        settings=f"policy_listen 127.0.0.1:{policy_port}")
    daemon = lab.daemon(config)
    daemon.wait_listening(policy_port)
    # root is not postfix: closed without an answer, and an alarm in the log.
    p = PolicyClient(policy_port)
    p.sock.sendall(request("RCPT", client_port=1, server_port=25, recipient="x@example.net"))
    with pytest.raises((EOFError, ConnectionResetError)):
        p.answer()
    daemon.wait_log(r"warning: policy connect from 127\.0\.0\.1:\d+ uid=0 user=root refused: not in clients")


def test_policy_service_on_a_unix_socket(lab):
    """policy_listen unix:PATH (what a chrooted smtpd reaches under private/): the peer check
    reads the caller's uid from SO_PEERCRED, and a caller in clients is answered as over TCP."""
    smtpd = FakeSMTPD()
    lab.cleanups.append(smtpd.close)
    path = str(lab.dir / "policy.sock")
    config = lab.config(listen=f"127.0.0.1:{dl.free_port()}", rules=RULES,
                        settings=f"policy_listen unix:{path}\nunix_socket_mode 0666")
    daemon = lab.daemon(config)
    dl.wait_until(lambda: os.path.exists(path), 10, what="the policy socket")
    daemon.wait_ready_log()
    www = smtpd.client("www-data")
    nobody = smtpd.client("nobody")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    p = PolicyClient.__new__(PolicyClient)
    p.sock, p.buf = s, b""
    assert p.ask(request("RCPT", client_port=www, server_port=smtpd.port, recipient="friend@example.org")) == "DUNNO"
    refused = p.ask(request("RCPT", client_port=nobody, server_port=smtpd.port, recipient="x@example.net", instance="n1"))
    assert refused == "550 5.7.1 <x@example.net>: not permitted for uid 65534 (nobody)", refused
    p.close()
    # nobody may open the socket (mode 0666) but is not in clients: closed without an answer.
    probe = dl.run_as("nobody", f"""
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(10); s.connect({path!r})
s.sendall(b"request=smtpd_access_policy\\nprotocol_state=RCPT\\n\\n")
print(repr(s.recv(100)))
""")
    assert probe.stdout.strip() in ("b''", ""), probe.stdout + probe.stderr
    daemon.wait_log(r"warning: policy connect from .*uid=65534 user=nobody refused: not in clients")


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="no systemd-socket-activate")
def test_socket_activation_routes_the_policy_socket(lab):
    smtp_port = dl.free_port()
    policy_port = dl.free_port()
    config = lab.config(listen=f"127.0.0.1:{dl.free_port()}", rules=RULES,
                        settings=f"policy_listen 127.0.0.1:{policy_port}")
    daemon = lab.daemon(config, argv_prefix=[shutil.which("systemd-socket-activate"),
                                             "-l", f"127.0.0.1:{smtp_port}", "-l", f"127.0.0.1:{policy_port}",
                                             "--fdname=restrictpd"])
    dl.wait_until(lambda: dl.port_accepts(policy_port), 10, what="systemd-socket-activate listening")
    daemon.wait_log(r"listening on restrictpd \(fd 4, from systemd\) \(policy service\)", timeout=10)
    daemon.wait_ready_log()
    p = PolicyClient(policy_port)
    assert p.ask(request("RCPT", client="192.0.2.1", client_port=4, server_port=25, recipient="x@y.org")) == "DUNNO"
    with dl.Client(smtp_port) as c:
        assert c.reply()[0] == 220


def quota(config) -> str:
    r = subprocess.run([dl.binary(), "--config", str(config), "--quota", "www-data"],
                       capture_output=True, text=True, timeout=30)
    return r.stdout + r.stderr


def local_addresses() -> list[str]:
    r = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=10)
    out = []
    for line in r.stdout.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[2] in ("inet", "inet6"):
            addr = fields[3].split("/")[0]
            if not addr.startswith("fe80"):
                out.append(addr)
    return out


def test_end_of_message_for_a_transaction_not_held_is_deferred(door):
    """A transaction restrictpd no longer holds (expired, or restrictpd restarted between RCPT
    and END-OF-MESSAGE) had its quota reserved, never spent: the message must not pass."""
    smtpd, policy_port, daemon, _ = door
    www = smtpd.client("www-data")
    p = PolicyClient(policy_port)
    answer = p.ask(request("END-OF-MESSAGE", client_port=www, server_port=smtpd.port, instance="never-seen", recipient_count=1))
    assert answer.startswith("DEFER 4.3.0"), answer
    daemon.wait_log(r"verdict=deferred reason=\"END-OF-MESSAGE for a transaction restrictpd no longer holds\"")
    # A transaction it does hold, with allowed recipients only, passes as before.
    assert p.ask(request("RCPT", client_port=www, server_port=smtpd.port, recipient="friend@example.org", instance="t9")) == "DUNNO"
    assert p.ask(request("END-OF-MESSAGE", client_port=www, server_port=smtpd.port, instance="t9", recipient_count=1)) == "DUNNO"
