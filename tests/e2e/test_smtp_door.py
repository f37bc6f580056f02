"""The SMTP door: restrictpd as Postfix's access policy service (issue 10), end to end.

A private Postfix of its own (a slot of its own, a sink of its own) wired as
etc/postfix/main.cf.restrictpd and master.cf.restrictpd say:

- "door": an smtpd on a loopback port standing in for port 25, Debian's default mynetworks,
  smtpd_relay_restrictions = check_policy_service (restrictpd's policy_listen) before
  permit_mynetworks, the policy service again at END-OF-MESSAGE, and Cyrus SASL (sasldb)
  for the authenticated-session tests;
- pickup -> content_filter (restrictpd) -> reinjection smtpd as today; the reinjection
  listeners override both restriction lists so they never ask the policy service.

Clients run as www-data / root in processes of their own (swaks, or harness.smtp_sessions),
so the kernel names their UID as the owner of the client socket.

Rules (unless a test says otherwise):
    user www-data   allow webmaster@example.org @lists.example.org
    user root       allow *
    default         allow @localhost
    unknown         refuse
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import harness

pytestmark = pytest.mark.needs_restrictpd

DELIVERY_TIMEOUT = 40
SETTLE = 3                       # after the expected mail arrived: time for any unexpected extra
WWW = "www-data"
WWW_FROM = "www-data@lab.localdomain"
ALLOWED = "webmaster@example.org"
DEBIAN_MYNETWORKS = "127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128"
SASL_DOMAIN = "mail.example"
SASL_USER, SASL_PASSWORD = "alice", "door-test-secret"
SASL_LOGIN = f"{SASL_USER}@{SASL_DOMAIN}"
RELAYED_DOMAIN = "relayed.example"      # relay_domains: Postfix relays it for anyone
NETNS = "rpd-e2e-door"
VETH_HOST, VETH_NS = "rpde2e0", "rpde2e1"
HOST_ADDR, NS_ADDR = "192.0.2.1", "192.0.2.2"   # TEST-NET-1, only on the test's veth pair
DOOR_MAXPROC = 60                       # 50 parallel sessions must all get an smtpd

ETC_POSTFIX = harness.repo_root() / "etc" / "postfix"
SHIPPED_POLICY_PORT = "10028"


def rules(www_extra: str = "") -> str:
    return ("user www-data\n"
            "    allow webmaster@example.org @lists.example.org\n"
            f"{www_extra}"
            "\nuser root\n    allow *\n\n"
            "default\n    allow @localhost\n\n"
            "unknown\n    refuse\n")


# ----------------------------------------------------------------------------------------------
# the wiring, taken from the files restrictpd ships


def postfix_parameters(text: str) -> dict[str, str]:
    """name = value pairs of a main.cf text (continuation lines joined, comments dropped)."""
    params: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and name:
            params[name] = (params[name] + " " + line.strip()).strip()
            continue
        key, _, value = line.partition("=")
        name = key.strip()
        params[name] = value.strip()
    return params


def shipped_main_cf(policy_port: int) -> dict[str, str]:
    """The SMTP door's settings from etc/postfix/main.cf.restrictpd, pointed at `policy_port`."""
    params = postfix_parameters((ETC_POSTFIX / "main.cf.restrictpd").read_text())
    door = {k: v.replace(f"inet:127.0.0.1:{SHIPPED_POLICY_PORT}", f"inet:127.0.0.1:{policy_port}")
            for k, v in params.items() if k.startswith("smtpd_")}
    return door


def shipped_reinjection_overrides() -> list[str]:
    """The -o options of the 10026 reinjection smtpd in etc/postfix/master.cf.restrictpd that
    keep it from asking the policy service."""
    text = (ETC_POSTFIX / "master.cf.restrictpd").read_text()
    options, inside = [], False
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if not line[0].isspace():
            inside = line.startswith("127.0.0.1:10026")
            continue
        if inside:
            options += re.findall(r"-o\s+(\S+)", line)
    return [o for o in options
            if o.split("=", 1)[0] in ("smtpd_relay_restrictions", "smtpd_end_of_data_restrictions")]


def test_shipped_wiring_asks_restrictpd_before_permit_mynetworks():
    """What the door instance below copies: policy service first, END-OF-MESSAGE too, never on
    the reinjection smtpd."""
    door = shipped_main_cf(12345)
    relay = [r.strip() for r in door["smtpd_relay_restrictions"].split(",")]
    assert relay[0] == "check_policy_service inet:127.0.0.1:12345", relay
    assert "permit_mynetworks" in relay[1:]
    assert door["smtpd_end_of_data_restrictions"] == "check_policy_service inet:127.0.0.1:12345"
    overrides = dict(o.split("=", 1) for o in shipped_reinjection_overrides())
    assert "check_policy_service" not in overrides.get("smtpd_relay_restrictions", "x check_policy_service")
    assert overrides.get("smtpd_end_of_data_restrictions", None) == ""


# ----------------------------------------------------------------------------------------------
# fixtures: a Postfix with the SMTP door, restrictpd with policy_listen


class Door:
    """The module's Postfix instance, its sink and its ports."""

    def __init__(self, pf: harness.PostfixInstance, sink: harness.Sink, door_port: int,
                 policy_port: int):
        self.pf, self.sink, self.port, self.policy_port = pf, sink, door_port, policy_port
        self.mark = 0


def door_master_cf(door_port: int, extra: str = "") -> str:
    return (f"# the SMTP door: stand-in for port 25 (Debian: smtp inet n - y - - smtpd)\n"
            f"127.0.0.1:{door_port} inet n - n - {DOOR_MAXPROC} smtpd\n"
            f"  -o syslog_name=postfix/door\n"
            f"  -o smtpd_sasl_auth_enable=yes\n"
            f"{extra}")


def setup_sasl(pf: harness.PostfixInstance):
    """Cyrus SASL with a sasldb of one mailbox user, read from $config_directory/sasl."""
    saslpasswd2 = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"
    if not Path(saslpasswd2).exists():
        return "saslpasswd2 not installed (apt-get install sasl2-bin libsasl2-modules)"
    db = pf.dir / "sasldb2"
    harness.run([saslpasswd2, "-f", str(db), "-c", "-p", "-u", SASL_DOMAIN, SASL_USER],
                input=SASL_PASSWORD.encode())
    shutil.chown(db, "postfix", "postfix")
    os_chmod(db, 0o600)
    (pf.etc / "sasl").mkdir(exist_ok=True)
    (pf.etc / "sasl" / "smtpd.conf").write_text(
        "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
        f"sasldb_path: {db}\n")
    return None


def os_chmod(path: Path, mode: int):
    import os
    os.chmod(path, mode)


@pytest.fixture(scope="module")
def door_instance(e2e_environment):
    slot = harness.Slot.acquire()
    sink = pf = None
    try:
        sink = harness.Sink(slot.path / "sink").start()
        # every port of the instance in one go, so that none is handed out twice
        door_port, policy_port, filter_port, relay_port, relay_port_debian = harness.free_ports(5)
        settings = shipped_main_cf(policy_port)
        main = "\n".join(f"{k} = {v}" for k, v in settings.items())
        main += (f"\nmynetworks = {DEBIAN_MYNETWORKS}\n"
                 f"relay_domains = {RELAYED_DOMAIN}\n"
                 f"smtpd_sasl_local_domain =\nsmtpd_sasl_authenticated_header = yes\n"
                 f"broken_sasl_auth_clients = no\n")
        pf = harness.PostfixInstance(slot, sink.port, filter_port, relay_port, relay_port_debian,
                                     extra_main_cf=main,
                                     extra_master_cf=door_master_cf(door_port),
                                     reinject_options=" ".join(
                                         f"-o {o}" for o in shipped_reinjection_overrides()))
        pf.configure()
        sasl_problem = setup_sasl(pf)
        pf.start()
        harness.wait_until(lambda: harness.port_accepts(door_port), 30, 0.1, "the door smtpd")
        door = Door(pf, sink, door_port, policy_port)
        door.sasl_problem = sasl_problem
        yield door
    finally:
        if pf is not None:
            pf.purge()
            pf.stop()
        if sink is not None:
            sink.stop()
        slot.release()


@pytest.fixture
def door(door_instance, request):
    """The module's door instance with an empty queue and an empty sink."""
    d = door_instance
    d.pf.purge()
    d.sink.clear()
    d.mark = d.pf.log_mark()
    try:
        yield d
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print("\n---- Postfix maillog during the test (last 80 lines) ----")
            print("\n".join(d.pf.log_lines(d.mark)[-80:]))
            print("---- postqueue -p ----")
            print(d.pf.mailq_text())
        d.pf.purge()
        d.sink.clear()


@pytest.fixture
def door_restrictpd(door, restrictpd_binary, tmp_path, request):
    """make(rules=..., extra_globals='', start=True) -> Restrictpd with policy_listen on the
    door's policy port and the content filter on the instance's filter port."""
    made: list[harness.Restrictpd] = []

    def config(rules_text: str, extra_globals: str = "") -> str:
        return harness.restrictpd_config(
            port=door.pf.filter_port, relay_port=door.pf.relay_port,
            state=tmp_path / "rpd" / "quota.db", rules=rules_text,
            extra_globals=f"policy_listen 127.0.0.1:{door.policy_port}\n{extra_globals}")

    def make(rules_text: str = rules(), extra_globals: str = "", start: bool = True):
        r = harness.Restrictpd(tmp_path / "rpd", config(rules_text, extra_globals),
                               door.pf.filter_port, restrictpd_binary)
        r.make_config = config
        made.append(r)
        if start:
            r.start()
            harness.wait_until(lambda: harness.port_accepts(door.policy_port), 10, 0.1,
                               "restrictpd's policy listener")
        return r

    try:
        yield make
    finally:
        rep = getattr(request.node, "rep_call", None)
        for r in made:
            r.stop()
            if rep is not None and rep.failed:
                print(f"\n---- restrictpd log {r.log} (last 60 lines) ----")
                print("\n".join(r.log_text().splitlines()[-60:]))


# ----------------------------------------------------------------------------------------------
# helpers


def smtp_code(out: str, after: str) -> str | None:
    """The first server reply line (e.g. "550 5.7.1 ...") after the client line starting with
    `after` in a swaks transcript."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(" -> ") and line[4:].upper().startswith(after.upper()):
            for reply in lines[i + 1:]:
                m = re.match(r"^(?:<-|<\*\*)\s+(\d{3}[ ].*)$", reply)
                if m:
                    return m.group(1)
            return None
    return None


def delivered_to(sink: harness.Sink, addr: str) -> int:
    return len(sink.messages_to(addr))


def settle_count(sink: harness.Sink, seconds: float = SETTLE) -> int:
    time.sleep(seconds)
    return len(sink.messages())


# ----------------------------------------------------------------------------------------------
# 1. allowed, refused, root


def test_www_data_allowed_arrives_stranger_refused_root_arrives(door, door_restrictpd):
    rpd = door_restrictpd()
    mark = rpd.log_mark()

    ok = harness.swaks(port=door.port, to=ALLOWED, sender=WWW_FROM, user=WWW)
    out = ok.stdout.decode(errors="replace")
    assert ok.returncode == 0, out
    assert smtp_code(out, "RCPT TO").startswith("250"), out
    door.sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: ALLOWED in m.rcpts)
    line = rpd.wait_log(r"uid=33 user=www-data door=smtp client=127\.0\.0\.1:\d+ "
                        rf"from=<{re.escape(WWW_FROM)}> to=<{re.escape(ALLOWED)}> verdict=relayed", mark)
    assert line

    bad = harness.swaks(port=door.port, to="stranger@example.com", sender=WWW_FROM, user=WWW)
    out = bad.stdout.decode(errors="replace")
    reply = smtp_code(out, "RCPT TO")
    assert reply and reply.startswith("550 5.7.1 "), out
    assert "<stranger@example.com>: not permitted for uid 33 (www-data)" in reply, reply
    rpd.wait_log(r"NOQUEUE: uid=33 user=www-data door=smtp .*to=<stranger@example\.com> "
                 r"verdict=refused", mark)

    root = harness.swaks(port=door.port, to="anyone@example.net", sender="root@lab.localdomain")
    out = root.stdout.decode(errors="replace")
    assert root.returncode == 0, out
    door.sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "anyone@example.net" in m.rcpts)
    rpd.wait_log(r"uid=0 user=root door=smtp .*to=<anyone@example\.net> verdict=relayed", mark)

    assert settle_count(door.sink) == 2
    assert delivered_to(door.sink, "stranger@example.com") == 0
    # the reinjection smtpd never asked: restrictpd's decisions are the door's 2 + 1 (RCPT) lines
    # and no pickup lines (this mail never went through pickup)
    assert not rpd.grep(r"door=pickup", mark)
