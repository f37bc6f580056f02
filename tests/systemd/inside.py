#!/usr/bin/env python3
"""Runs inside the booted test system (systemd as PID 1), as root: installs restrictpd's .deb
as an admin would, wires the system's Postfix to it, and checks the package and its units
under the real systemd. One function per step, run in the order of STEPS; each prints
"PASS name (N s)", "FAIL name: why" or, for what this build does not have, "SKIP name: why";
the first failure ends the run (later steps build on earlier ones) with exit status 1.

    python3 inside.py /path/to/restrictpd_VERSION_ARCH.deb

Everything stays on the container's own loopback: Postfix's relayhost is a small sink
(smtp_sink.py, beside this file) on 127.0.0.1:2525, and DNS is off.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONF = Path("/etc/restrictpd.conf")
STATE_DIR = Path("/var/lib/restrictpd")
SINK_DIR = Path("/run/test-sink")
SINK_PORT = 2525
FILTER_PORT = 10027
REINJECT_PORT = 10026
DOMAIN = "example.org"

# The rules the mail steps use: www-data may mail the webmaster and two other destinations
# a day, and is refused beyond that (reject, so Postfix bounces at once instead of retrying).
RULES = """\
# restrictpd.conf written by the package test
policy_listen 127.0.0.1:10028
user www-data
    allow webmaster@example.org
    arbitrary 2 per day
    over_quota reject
user root
    allow *
user postfix
    allow *
default
    allow @localhost
unknown
    refuse
"""


class StepFailed(Exception):
    pass


class StepSkipped(Exception):
    """A step whose subject this build does not have; reported as SKIP, never as PASS."""


def check(condition, message):
    if not condition:
        raise StepFailed(message)


def log(text):
    print(f"    {text}", flush=True)


def run(*argv, check_rc=True, input=None, timeout=60, user=None):
    """Runs a command; with check_rc a non-zero exit fails the step and shows its output."""
    if user is not None:
        argv = ("runuser", "-u", user, "--", *argv)
    r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check_rc and r.returncode != 0:
        raise StepFailed(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def wait_until(predicate, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StepFailed(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def listening(port, host="127.0.0.1"):
    """Whether a TCP socket listens on HOST:PORT, asked of the kernel (ss) rather than by
    connecting: a probe connection to 10027 would be a refused peer in restrictpd's log."""
    r = run("ss", "-Hltn", f"src {host}:{port}", check_rc=False)
    return bool(r.stdout.strip())


def port_accepts(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# systemd and the journal


def unit_props(unit, *names):
    r = run("systemctl", "show", unit, "-p", ",".join(names))
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def is_active(unit):
    return run("systemctl", "is-active", unit, check_rc=False).stdout.strip()


def main_pid(unit="restrictpd.service"):
    return int(unit_props(unit, "MainPID")["MainPID"])


def journal_mark():
    """A point in time for journal(since=...): entries written after this call."""
    return int(time.time() * 1_000_000)


def journal(unit="restrictpd.service", since=0, identifier=None):
    """The unit's journal entries (the daemon's and systemd's own about the unit) as dicts."""
    argv = ["journalctl", "--no-pager", "-o", "json"]
    if identifier:
        argv += ["-t", identifier]
    else:
        argv += ["-u", unit]
    r = run(*argv)
    entries = []
    for line in r.stdout.splitlines():
        e = json.loads(line)
        if int(e.get("__REALTIME_TIMESTAMP", 0)) >= since:
            entries.append(e)
    return entries


def message(entry):
    """MESSAGE as text: journalctl's JSON gives a field that is not valid UTF-8 as a byte list."""
    m = entry.get("MESSAGE")
    if isinstance(m, list):
        return bytes(m).decode("utf-8", "replace")
    return m if isinstance(m, str) else ""


def messages(entries):
    return [message(e) for e in entries]


def wait_journal(pattern, since, timeout=15, unit="restrictpd.service", identifier=None):
    rx = re.compile(pattern)

    def found():
        return [m for m in messages(journal(unit, since, identifier)) if rx.search(m)]
    try:
        return wait_until(found, timeout, f"a journal line /{pattern}/", interval=0.5)
    except StepFailed as e:
        tail = "\n".join(messages(journal(unit, since, identifier))[-20:])
        raise StepFailed(f"{e}; the unit's journal since then:\n{tail}") from None


def decisions(since):
    """The daemon's decision entries (those with RESTRICTPD_VERDICT) since a mark."""
    return [e for e in journal(since=since) if "RESTRICTPD_VERDICT" in e]


def install_drop_in(name, text):
    d = Path("/etc/systemd/system/restrictpd.service.d")
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)
    run("systemctl", "daemon-reload")


def remove_drop_in(name):
    p = Path("/etc/systemd/system/restrictpd.service.d") / name
    p.unlink(missing_ok=True)
    run("systemctl", "daemon-reload")


# ----------------------------------------------------------------------------------------------
# mail


def sink_messages():
    out = []
    for p in sorted(SINK_DIR.glob("*.json")):
        out.append(json.loads(p.read_text()))
    return out


def sendmail(recipient, token, user=None, sender=None):
    """Submits one message with sendmail(1), as root or as USER; its Subject carries TOKEN."""
    text = f"Subject: {token}\nFrom: {user or 'root'}@{DOMAIN}\n\nbody of {token}\n"
    argv = ["/usr/sbin/sendmail", "-i"]
    if sender:
        argv += ["-f", sender]
    run(*argv, recipient, input=text, user=user)


def wait_delivered(recipient, token, timeout=30):
    def found():
        return [m for m in sink_messages() if f"<{recipient}>" in m["rcpts"] and token in m["data"]]
    try:
        return wait_until(found, timeout, f"{token} for <{recipient}> at the sink", interval=0.3)
    except StepFailed as e:
        q = run("postqueue", "-p", check_rc=False).stdout
        raise StepFailed(f"{e}\npostqueue -p:\n{q}") from None


def write_rules(text=RULES):
    CONF.write_text(text)
    os.chmod(CONF, 0o644)


class FilterSession:
    """A raw SMTP session with restrictpd on 10027, opened as the postfix user (the daemon
    checks the UID that owns the client's socket): the socket is created under postfix's
    effective UID, then root's is taken back."""

    def __init__(self):
        pw = pwd.getpwnam("postfix")
        os.seteuid(pw.pw_uid)
        try:
            self.sock = socket.create_connection(("127.0.0.1", FILTER_PORT), timeout=10)
        finally:
            os.seteuid(0)
        self.file = self.sock.makefile("rb")

    def reply(self):
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise StepFailed(f"connection closed; reply so far {lines}")
            lines.append(line.decode().rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                return int(lines[-1][:3]), lines

    def send(self, data: bytes):
        self.sock.sendall(data)

    def cmd(self, line):
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self):
        self.sock.close()


# ----------------------------------------------------------------------------------------------
# the steps


def step_install_package(deb):
    """apt-get install ./restrictpd_*.deb: the user, the state directory, the service active."""
    local = Path("/root") / Path(deb).name
    shutil.copy(deb, local)
    r = run("apt-get", "install", "-y", "--no-install-recommends", str(local), timeout=180)
    log(r.stdout.strip().splitlines()[-1])
    status = run("dpkg-query", "-W", "-f=${Status}", "restrictpd").stdout
    check(status == "install ok installed", f"dpkg status: {status}")
    user = pwd.getpwnam("restrict")
    check(user.pw_uid < 1000, f"restrict is not a system user: uid {user.pw_uid}")
    st = STATE_DIR.stat()
    check((st.st_uid, st.st_gid, st.st_mode & 0o7777) == (user.pw_uid, user.pw_gid, 0o750),
          f"{STATE_DIR}: uid {st.st_uid} gid {st.st_gid} mode {oct(st.st_mode)}")
    check(is_active("restrictpd.service") == "active", "restrictpd.service is not active after install")
    check(run("systemctl", "is-enabled", "restrictpd.service").stdout.strip() == "enabled", "service not enabled")
    enabled = run("systemctl", "is-enabled", "restrictpd.socket", check_rc=False).stdout.strip()
    check(enabled == "disabled", f"restrictpd.socket is {enabled}, the package ships it disabled")
    props = unit_props("restrictpd.service", "User", "Type", "MainPID", "StatusText")
    log(f"user restrict uid {user.pw_uid}; {STATE_DIR} restrict:restrict 0750; service active, {props}")
    pid = int(props["MainPID"])
    uid = [line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:")][0]
    check(int(uid) == user.pw_uid, f"the daemon runs as uid {uid}")
    check(listening(FILTER_PORT), f"nothing listens on 127.0.0.1:{FILTER_PORT}")


def start_sink():
    """The final destination of all mail: smtp_sink.py as a transient unit (stopped with the
    container, like every other process of the test)."""
    if is_active("test-sink.service") == "active":
        return
    run("systemd-run", "--unit=test-sink", "--property=Type=exec", "--",
        "/usr/bin/python3", str(HERE / "smtp_sink.py"), "127.0.0.1", str(SINK_PORT), str(SINK_DIR))
    wait_until(lambda: port_accepts(SINK_PORT), 10, "the sink on 127.0.0.1:2525")


def wire_postfix_content_filter():
    """Postfix as restrictpd's README says: pickup's content_filter to 127.0.0.1:10027 and
    the 10026 reinjection smtpd (master.cf lines from the package's example), the sender
    map from main.cf.restrictpd; and, for the test, no DNS, no local delivery, and every
    other destination relayed to the sink on loopback."""
    examples = Path("/usr/share/doc/restrictpd/examples/postfix")
    run("postconf", "-e",
        f"myhostname=restrictpd-test.{DOMAIN}", f"mydomain={DOMAIN}", f"myorigin={DOMAIN}",
        "mydestination=", "local_transport=error:5.1.1 no local delivery in this test",
        f"relayhost=[127.0.0.1]:{SINK_PORT}", "smtp_dns_support_level=disabled",
        "inet_interfaces=loopback-only", "inet_protocols=ipv4", "alias_maps=", "alias_database=",
        "smtp_tls_security_level=none", "mynetworks=127.0.0.0/8",
        "minimal_backoff_time=2s", "maximal_backoff_time=4s", "queue_run_delay=2s")
    # main.cf.restrictpd: who may choose an envelope sender.
    main_example = (examples / "main.cf.restrictpd").read_text()
    setting = re.search(r"^local_login_sender_maps =.*?(?=^\S|^$|\Z)", main_example, re.M | re.S)
    check(setting, "main.cf.restrictpd has no local_login_sender_maps")
    value = " ".join(setting.group(0).split("=", 1)[1].split())
    run("postconf", "-e", f"local_login_sender_maps={value}")
    Path("/etc/postfix/login_senders").write_text(f"/(.+)/ $1 $1@{DOMAIN}\n")
    # master.cf.restrictpd replaces the stock pickup entry and adds the 10026 smtpd.
    master = Path("/etc/postfix/master.cf")
    lines, skip = [], False
    for line in master.read_text().splitlines():
        if re.match(r"^pickup\s", line):
            skip = True
            continue
        if skip and re.match(r"^\s", line) and line.strip():
            continue
        skip = False
        lines.append(line)
    entries = [ln for ln in (examples / "master.cf.restrictpd").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    master.write_text("\n".join(lines + entries) + "\n")
    run("postfix", "check")
    run("systemctl", "restart", "postfix")
    wait_until(lambda: port_accepts(REINJECT_PORT), 20, f"Postfix's smtpd on 127.0.0.1:{REINJECT_PORT}")
    log("postconf -M pickup: " + run("postconf", "-M", "pickup/unix").stdout.strip())
    log("postconf -P pickup: " + run("postconf", "-P", "pickup/unix/content_filter").stdout.strip())


def step_wire_postfix():
    """Postfix wired to restrictpd as the README says, and the local sink behind it."""
    start_sink()
    wire_postfix_content_filter()
    write_rules()
    # As the README orders it: check the rules, then (re)start restrictpd with them.
    run("restrictpd", "--check-config")
    run("systemctl", "restart", "restrictpd")
    check(is_active("restrictpd.service") == "active", "restrictpd not active with the test rules")


STATE = {}


def step_mail_as_root_and_www_data():
    """sendmail as root (allow *) and as www-data (the webmaster, two arbitrary destinations,
    then refused once the quota is used up) goes through pickup, restrictpd and 10026."""
    since = journal_mark()
    STATE["mail_since"] = since
    token = f"t{int(time.time())}"
    sendmail("anyone@example.com", f"{token}-root")
    wait_delivered("anyone@example.com", f"{token}-root")
    log("root -> anyone@example.com: delivered")
    sendmail("webmaster@example.org", f"{token}-web", user="www-data")
    wait_delivered("webmaster@example.org", f"{token}-web")
    log("www-data -> webmaster@example.org (allow list): delivered")
    for n in (1, 2):
        sendmail(f"q{n}@example.net", f"{token}-q{n}", user="www-data")
        wait_delivered(f"q{n}@example.net", f"{token}-q{n}")
        log(f"www-data -> q{n}@example.net (arbitrary {n}/2): delivered")
    sendmail("q3@example.net", f"{token}-q3", user="www-data")
    wait_journal(r"to=<q3@example\.net>.*verdict=refused", since)
    # Postfix bounces it (550 from the filter); the sink may get the bounce to www-data, never
    # the message itself.
    wait_journal(r"to=<q3@example\.net>.*status=bounced", since, identifier="postfix/smtp")
    check(not [m for m in sink_messages() if "<q3@example.net>" in m["rcpts"]], "q3@example.net reached the sink")
    log("www-data -> q3@example.net (over quota, over_quota reject): refused, bounced by Postfix, not delivered")


def wire_postfix_smtp_door():
    """main.cf.restrictpd's SMTP door: the policy service before permit_mynetworks in
    smtpd_relay_restrictions and at END-OF-MESSAGE, as the package's example has them."""
    main_example = Path("/usr/share/doc/restrictpd/examples/postfix/main.cf.restrictpd").read_text()
    for name in ("smtpd_relay_restrictions", "smtpd_end_of_data_restrictions"):
        setting = re.search(rf"^{name} =.*?(?=^\S|^$|\Z)", main_example, re.M | re.S)
        check(setting, f"main.cf.restrictpd has no {name}")
        run("postconf", "-e", f"{name}={' '.join(setting.group(0).split('=', 1)[1].split())}")
    run("postfix", "check")
    run("systemctl", "reload", "postfix")


def smtp_as(user, recipient, token):
    """An SMTP session to Postfix's smtpd on 127.0.0.1:25 run as `user`: the RCPT reply, and
    the end-of-data reply when the recipient was taken."""
    code = f"""
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", 25, timeout=30)
s.ehlo("door.test")
s.mail("{user}@{DOMAIN}")
c, m = s.rcpt({recipient!r})
print(c, m.decode())
if c < 300:
    print(*s.data("Subject: {token}\\r\\n\\r\\n{token}\\r\\n"))
s.quit()
"""
    return run("runuser", "-u", user, "--", "/usr/bin/python3", "-c", code, timeout=60).stdout


def step_smtp_door():
    """SMTP to the local smtpd, wired as main.cf.restrictpd says: www-data's mail to its
    allowed address arrives, to a stranger over its quota it is refused at RCPT (the policy
    service judged the uid that owns the client's socket), and the journal says door=smtp."""
    wire_postfix_smtp_door()
    check(listening(10028), "nothing listens on the policy service's 127.0.0.1:10028")
    since = journal_mark()
    token = f"d{int(time.time())}"
    allowed = smtp_as("www-data", "webmaster@example.org", token)
    check(allowed.startswith("250"), f"www-data over SMTP to webmaster@example.org: {allowed}")
    wait_delivered("webmaster@example.org", token)
    log("www-data over SMTP -> webmaster@example.org: delivered")
    refused = smtp_as("www-data", "stranger@example.net", token)
    check(refused.startswith("550") and "uid 33" in refused, f"www-data over SMTP to a stranger: {refused}")
    log(f"www-data over SMTP -> stranger@example.net: {refused.strip()}")
    wait_journal(r"uid=33 user=www-data door=smtp client=127\.0\.0\.1:\d+ .*to=<stranger@example\.net> verdict=refused", since)
    root = smtp_as("root", "anyone@example.com", token + "r")
    check(root.startswith("250"), f"root over SMTP: {root}")
    wait_delivered("anyone@example.com", token + "r")
    log("root over SMTP -> anyone@example.com: delivered")


def step_decision_journal_fields():
    """journalctl -u restrictpd -o json: the decision lines carry the RESTRICTPD_* fields."""
    entries = decisions(STATE["mail_since"])
    check(len(entries) >= 5, f"{len(entries)} decision entries in the journal, expected 5")
    by_to = {e.get("RESTRICTPD_TO"): e for e in entries}
    refused = [e for e in entries if "q3@example.net" in e.get("RESTRICTPD_TO", "")]
    check(refused and refused[-1]["RESTRICTPD_VERDICT"] == "refused", f"no refused entry for q3: {by_to}")
    r = refused[-1]
    check(r.get("RESTRICTPD_UID") == "33" and r.get("RESTRICTPD_USER") == "www-data",
          f"uid/user fields: {r.get('RESTRICTPD_UID')} {r.get('RESTRICTPD_USER')}")
    relayed = [e for e in entries if "q1@example.net" in e.get("RESTRICTPD_TO", "")]
    check(relayed and relayed[-1]["RESTRICTPD_VERDICT"] == "relayed", "no relayed entry for q1")
    q1 = relayed[-1]
    for field in ("RESTRICTPD_QUOTA", "RESTRICTPD_RELAY", "RESTRICTPD_FROM", "RESTRICTPD_REASON", "RESTRICTPD_QUEUE_ID"):
        check(field in q1, f"{field} missing from the decision entry: {sorted(q1)}")
    check(q1.get("_SYSTEMD_UNIT") == "restrictpd.service", f"_SYSTEMD_UNIT {q1.get('_SYSTEMD_UNIT')}")
    root = [e for e in entries if e.get("RESTRICTPD_UID") == "0"]
    check(root and root[-1]["RESTRICTPD_VERDICT"] == "relayed", "no relayed entry for root")
    fields = sorted(k for k in q1 if k.startswith("RESTRICTPD_"))
    log(f"{len(entries)} decision entries; fields {', '.join(fields)}")
    log(f"q1: {message(q1)}")
    log(f"q3: {message(r)}")


def quota_report():
    return run("restrictpd", "--quota", "www-data").stdout.strip()


def step_quota_survives_restart():
    """The quota store is writable under ProtectSystem=strict, and its counts survive
    systemctl restart (restrictpd --quota before and after)."""
    db = STATE_DIR / "quota.db"
    check(db.exists(), f"{db} was not created")
    owner = pwd.getpwuid(db.stat().st_uid).pw_name
    check(owner == "restrict", f"{db} is owned by {owner}")
    before = quota_report()
    log(f"before restart: {before}")
    check(re.search(r"\b2 of 2\b", before), f"restrictpd --quota www-data: {before!r}")
    pid = main_pid()
    run("systemctl", "restart", "restrictpd")
    check(is_active("restrictpd.service") == "active" and main_pid() != pid, "restart did not restart")
    after = quota_report()
    log(f"after restart:  {after}")
    check(after == before, f"the counts changed across the restart: {before!r} -> {after!r}")
    # The daemon still uses them: q1 was counted, so writing to it again costs nothing, while
    # a new address is refused.
    since = journal_mark()
    token = f"r{int(time.time())}"
    sendmail("q1@example.net", f"{token}-q1", user="www-data")
    wait_delivered("q1@example.net", f"{token}-q1")
    sendmail("q4@example.net", f"{token}-q4", user="www-data")
    wait_journal(r"to=<q4@example\.net>.*verdict=refused", since)
    files = sorted(f"{p.name}:{pwd.getpwuid(p.stat().st_uid).pw_name}" for p in STATE_DIR.iterdir())
    check(all(f.endswith(":restrict") for f in files), f"state files not all owned by restrict: {files}")
    log(f"after restart q1 (already counted) delivered, q4 refused; {STATE_DIR}: {' '.join(files)}")


def step_reload_good_then_bad():
    """systemctl reload with a good file, then with a bad one: the service keeps running, the
    bad file's errors (FILE:LINE) are in the journal, and the old rules stay in force."""
    pid = main_pid()
    since = journal_mark()
    good = RULES.replace("allow webmaster@example.org", "allow webmaster@example.org reloaded@example.org")
    write_rules(good)
    run("systemctl", "reload", "restrictpd")
    wait_journal(r"reloaded /etc/restrictpd\.conf", since)
    check(main_pid() == pid and is_active("restrictpd.service") == "active", "the good reload changed the process")
    token = f"g{int(time.time())}"
    sendmail("reloaded@example.org", f"{token}", user="www-data")
    wait_delivered("reloaded@example.org", token)
    log("good file: reloaded, same PID, the new allow entry is in force")

    since = journal_mark()
    bad = good + "no_such_setting 1\n"
    bad_line = len(bad.splitlines())
    write_rules(bad)
    r = run("systemctl", "reload", "restrictpd", check_rc=False)
    check(r.returncode != 0, "systemctl reload succeeded with a bad file")
    lines = wait_journal(rf"/etc/restrictpd\.conf:{bad_line}:", since)
    check(main_pid() == pid and is_active("restrictpd.service") == "active", "the bad reload stopped the service")
    log(f"bad file: systemctl reload exit {r.returncode}; journal: {lines[0]}")
    # A SIGHUP that does not go through ExecReload's check: the daemon itself keeps its rules.
    since = journal_mark()
    run("systemctl", "kill", "-s", "HUP", "--kill-whom=main", "restrictpd")
    lines = wait_journal(r"reload failed: keeping the rules in force", since)
    check(main_pid() == pid and is_active("restrictpd.service") == "active", "SIGHUP with a bad file stopped the service")
    token = f"h{int(time.time())}"
    sendmail("reloaded@example.org", f"{token}", user="www-data")
    wait_delivered("reloaded@example.org", token)
    log(f"SIGHUP with the bad file: {lines[0]}; still running, old rules in force")
    write_rules()
    run("systemctl", "reload", "restrictpd")


def step_stop_drains():
    """systemctl stop drains: a session in the middle of DATA finishes with 250 while the
    unit is deactivating, new connections are refused, and the unit then stops cleanly."""
    pid = main_pid()
    c = FilterSession()
    check(c.reply()[0] == 220, "no greeting")
    check(c.cmd("EHLO localhost")[0] == 250, "EHLO")
    check(c.cmd(f"MAIL FROM:<root@{DOMAIN}>")[0] == 250, "MAIL")
    check(c.cmd("RCPT TO:<drained@example.org>")[0] == 250, "RCPT")
    check(c.cmd("DATA")[0] == 354, "DATA")
    token = f"d{int(time.time())}"
    c.send(f"Received: by restrictpd-test.{DOMAIN} (Postfix, from userid 0)\r\n"
           f"\tid 4AB12C; Mon, 1 Jan 2024 00:00:00 +0000 (UTC)\r\nSubject: {token}\r\n\r\nfirst part\r\n".encode())
    since = journal_mark()
    t0 = time.monotonic()
    run("systemctl", "stop", "--no-block", "restrictpd")
    wait_journal(r"signal TERM: stopping; draining 1 sessions", since)
    check(is_active("restrictpd.service") == "deactivating", f"unit is {is_active('restrictpd.service')} while draining")
    wait_until(lambda: not listening(FILTER_PORT), 5, "the listener to close")
    check(not port_accepts(FILTER_PORT), "a new connection was accepted while draining")
    c.send(b"second part\r\n.\r\n")
    code, lines = c.reply()
    check(code == 250, f"the drained session's message got {lines}")
    code, lines = c.cmd(f"MAIL FROM:<root@{DOMAIN}>")
    check(code == 421, f"a new transaction while draining got {lines}")
    c.close()
    wait_until(lambda: is_active("restrictpd.service") == "inactive", 15, "the unit to stop")
    props = unit_props("restrictpd.service", "Result", "ExecMainStatus", "ExecMainCode")
    check(props["Result"] == "success" and props["ExecMainStatus"] == "0", f"stop result {props}")
    wait_delivered("drained@example.org", token)
    log(f"session in DATA finished with 250 after stop; new transaction 421; stopped in "
        f"{time.monotonic() - t0:.1f} s with {props}; PID {pid} gone; the message was delivered")


def step_socket_activation():
    """restrictpd.socket enabled, the service stopped: the first connection (Postfix's, for
    a message sent with sendmail) starts the service on systemd's socket. Stopped again with
    the socket still listening, the first connection to the policy port (smtpd asking
    about a message on port 25) starts it too."""
    check(is_active("restrictpd.service") == "inactive", "the service should be stopped here")
    run("systemctl", "enable", "--now", "restrictpd.socket")
    check(is_active("restrictpd.socket") == "active", "restrictpd.socket is not active")
    check(is_active("restrictpd.service") == "inactive", "enabling the socket started the service")
    since = journal_mark()
    token = f"s{int(time.time())}"
    sendmail("socket@example.com", token)
    wait_delivered("socket@example.com", token)
    check(is_active("restrictpd.service") == "active", "the service is not active after the connection")
    lines = wait_journal(r"listening on smtp \(fd 3, from systemd\)", since)
    log(f"mail delivered through the socket-activated service; {lines[0]}")
    run("systemctl", "stop", "restrictpd.service")
    check(is_active("restrictpd.service") == "inactive", "the service did not stop")
    check(is_active("restrictpd.socket") == "active" and listening(10028), "the socket does not listen on 10028 any more")
    since = journal_mark()
    answer = smtp_as("root", "policy-socket@example.com", token + "p")
    check(answer.startswith("250"), f"root over SMTP with the service stopped: {answer}")
    wait_delivered("policy-socket@example.com", token + "p")
    check(is_active("restrictpd.service") == "active", "the service is not active after the policy connection")
    lines = wait_journal(r"listening on \S+ \(fd \d+, from systemd\) \(policy service\)", since)
    wait_journal(r"door=smtp .*to=<policy-socket@example\.com> verdict=relayed", since)
    log(f"policy request on 10028 started the service; {lines[0]}; the door's decision relayed")
    run("systemctl", "disable", "--now", "restrictpd.socket")
    run("systemctl", "restart", "restrictpd.service")
    check(is_active("restrictpd.service") == "active", "the service did not start on its own sockets again")
    check(listening(FILTER_PORT), "nothing listens on 10027 after going back to the service's own socket")


HOLD_PORT = 10029
HOLD_USER = "rpdhold"


def postqueue_entries():
    """postqueue -j: one dict per queued message (queue_name, queue_id, recipients, ...)."""
    out = run("postqueue", "-j").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def step_hold():
    """on_refuse hold for a test user, through the hold listener (127.0.0.1:10029, from
    master.cf.restrictpd, restrictpd's default hold_relay): its message to a stranger waits
    in Postfix's hold queue, the journal says verdict=held held_as=ID, nothing is
    delivered; postsuper -H ID delivers it exactly once, without passing restrictpd again."""
    check(listening(HOLD_PORT), f"nothing listens on the hold listener 127.0.0.1:{HOLD_PORT}")
    if run("id", HOLD_USER, check_rc=False).returncode != 0:
        run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", HOLD_USER)
    write_rules(RULES.replace("user www-data", f"user {HOLD_USER}\n    allow @localhost\n    on_refuse hold\nuser www-data"))
    since = journal_mark()
    run("systemctl", "reload", "restrictpd")
    wait_journal(r"reloaded /etc/restrictpd\.conf", since)
    token = f"hold{int(time.time())}"
    rcpt = "stranger-hold@example.net"
    sendmail(rcpt, token, user=HOLD_USER)
    line = wait_journal(rf"user={HOLD_USER} .*to=<{re.escape(rcpt)}> verdict=held .*held_as=[0-9A-Za-z]+", since)[0]
    held_id = re.search(r"held_as=([0-9A-Za-z]+)", line).group(1)

    def held():
        return [q for q in postqueue_entries() if q.get("queue_name") == "hold" and q.get("queue_id") == held_id]
    [entry] = wait_until(held, 15, f"{held_id} in the hold queue")
    check([r["address"] for r in entry["recipients"]] == [rcpt], f"held entry {entry}")
    time.sleep(3)  # a few of the test's 2 s queue runs: held mail stays put
    check(held(), f"{held_id} left the hold queue on its own")
    check(not [m for m in sink_messages() if f"<{rcpt}>" in m["rcpts"]], "held mail reached the sink")
    log(f"journal: {line}")
    log(f"postqueue -j: {held_id} queue_name=hold, recipients {rcpt}; nothing delivered after 3 s")
    released = journal_mark()
    run("postsuper", "-H", held_id)
    wait_delivered(rcpt, token)
    wait_until(lambda: not [q for q in postqueue_entries() if q.get("queue_id") == held_id], 15, f"{held_id} to leave the queue")
    time.sleep(2)
    copies = [m for m in sink_messages() if f"<{rcpt}>" in m["rcpts"] and token in m["data"]]
    check(len(copies) == 1, f"released mail delivered {len(copies)} times")
    again = [e for e in decisions(released) if rcpt in e.get("RESTRICTPD_TO", "")]
    check(not again, f"released mail passed restrictpd again: {messages(again)}")
    log(f"postsuper -H {held_id}: delivered once, no new decision line")
    write_rules()
    run("systemctl", "reload", "restrictpd")


WATCHDOG_TEST_SEC = 5


def step_watchdog_restarts_hung_daemon():
    """kill -STOP the main PID: the watchdog fires and Restart= brings the daemon back. The
    shipped WatchdogSec=30 is shortened to 5 s with a drop-in for this step only."""
    install_drop_in("watchdog-test.conf", f"[Service]\nWatchdogSec={WATCHDOG_TEST_SEC}\n")
    try:
        run("systemctl", "restart", "restrictpd")
        props = unit_props("restrictpd.service", "WatchdogUSec", "NRestarts", "MainPID")
        check(props["WatchdogUSec"] in (f"{WATCHDOG_TEST_SEC}s", str(WATCHDOG_TEST_SEC * 1_000_000)),
              f"WatchdogUSec={props['WatchdogUSec']}")
        pid, restarts = int(props["MainPID"]), int(props["NRestarts"])
        # The daemon pings while it runs: it is still the same process after two periods.
        time.sleep(WATCHDOG_TEST_SEC * 2)
        check(main_pid() == pid, "the daemon was restarted while it was not hung (no watchdog pings?)")
        since = journal_mark()
        t0 = time.monotonic()
        os.kill(pid, 19)  # SIGSTOP
        wait_until(lambda: int(unit_props("restrictpd.service", "NRestarts")["NRestarts"]) > restarts
                   and is_active("restrictpd.service") == "active" and main_pid() not in (0, pid),
                   WATCHDOG_TEST_SEC + 100, "the watchdog restart")
        took = time.monotonic() - t0
        lines = wait_journal(r"[Ww]atchdog timeout", since)
        log(f"{lines[0]}; back as PID {main_pid()} {took:.1f} s after SIGSTOP")
        check(listening(FILTER_PORT), "nothing listens on 10027 after the watchdog restart")
    finally:
        remove_drop_in("watchdog-test.conf")
        run("systemctl", "restart", "restrictpd", check_rc=False)


def broken_rules():
    """RULES with a user that does not exist, and the line number of that error."""
    text = RULES + "user no-such-user-here\n    allow *\n"
    return text, len(text.splitlines()) - 1


def step_config_error_stops_unit():
    """A configuration error at start: systemctl restart fails, the unit ends 'failed' with
    exit status 78 and is not restarted (RestartPreventExitStatus=78), the journal has the
    FILE:LINE error."""
    text, line = broken_rules()
    write_rules(text)
    since = journal_mark()
    r = run("systemctl", "restart", "restrictpd", check_rc=False)
    check(r.returncode != 0, "systemctl restart succeeded with a broken configuration")
    # Long enough for Restart=on-failure (RestartSec 100 ms) to have started it again many times.
    time.sleep(3)
    props = unit_props("restrictpd.service", "ActiveState", "Result", "ExecMainStatus", "NRestarts", "SubState")
    check(props["ActiveState"] == "failed" and props["Result"] == "exit-code" and props["ExecMainStatus"] == "78",
          f"after a start with a broken configuration: {props}")
    check(props["NRestarts"] == "0", f"systemd restarted it: {props}")
    # systemd's own "Starting" lines (the daemon's "ready" line of the start before may
    # still arrive after the mark: it is logged after READY=1).
    starts = [m for m in messages(journal(since=since)) if m.startswith("Starting restrictpd.service")]
    check(len(starts) == 1, f"systemd started it {len(starts)} times: {starts}")
    err = wait_journal(rf"/etc/restrictpd\.conf:{line}: .*no-such-user-here", since)
    status = wait_journal(r"status=78", since)
    log(f"systemctl restart exit {r.returncode}; {props}")
    log(f"journal: {err[0]} | {status[0]}")
    write_rules()
    run("systemctl", "reset-failed", "restrictpd")
    run("systemctl", "start", "restrictpd")


def dpkg_is_configured():
    status = run("dpkg-query", "-W", "-f=${Status}", "restrictpd", check_rc=False).stdout
    audit = run("dpkg", "--audit", check_rc=False).stdout.strip()
    return status, audit


def step_reinstall_with_broken_config(deb):
    """apt-get install --reinstall while the configuration is broken: the postinst's restart
    fails, the package is still configured (dpkg --audit is clean), the unit is failed with 78."""
    text, _ = broken_rules()
    write_rules(text)
    r = run("apt-get", "install", "--reinstall", "-y", str(Path("/root") / Path(deb).name), check_rc=False, timeout=180)
    check(r.returncode == 0, f"apt-get install --reinstall failed:\n{r.stdout}{r.stderr}")
    status, audit = dpkg_is_configured()
    check(status == "install ok installed" and not audit, f"dpkg: {status!r}; dpkg --audit: {audit!r}")
    time.sleep(2)
    props = unit_props("restrictpd.service", "ActiveState", "ExecMainStatus", "NRestarts")
    check(props["ActiveState"] == "failed" and props["ExecMainStatus"] == "78", f"unit after the reinstall: {props}")
    log(f"apt-get exit 0, dpkg '{status}', dpkg --audit clean; unit {props}")
    write_rules()
    run("systemctl", "reset-failed", "restrictpd")
    run("systemctl", "start", "restrictpd")
    check(is_active("restrictpd.service") == "active", "not active again after the fix")


UNIT_FILE = "/lib/systemd/system/restrictpd.service"


def exposure(*argv):
    """systemd-analyze security's overall exposure level for restrictpd.service, and its
    findings (the lines marked ✗)."""
    r = run("systemd-analyze", "security", "--no-pager", *argv, check_rc=False)
    m = re.search(r"Overall exposure level for restrictpd\.service: ([0-9.]+)", r.stdout)
    check(m, f"no overall exposure level from systemd-analyze security {' '.join(argv)}:\n{r.stdout}{r.stderr}")
    return float(m.group(1)), [" ".join(line.split()) for line in r.stdout.splitlines() if line.startswith("✗")]


def step_security_score():
    """systemd-analyze security on the running unit scores the same as or better than the
    shipped unit file alone, analysed offline on this same system (scripts/package-check
    bounds that score): nothing at run time (a drop-in, a missing kernel feature) weakens
    the sandbox the file asks for. The file is analysed in a root of its own, since
    systemd-analyze also reads the system's drop-ins for a unit given by path."""
    live, findings = exposure("restrictpd.service")
    root = Path("/run/restrictpd-test-shipped-unit")
    shutil.rmtree(root, ignore_errors=True)
    (root / "lib/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT_FILE, root / "lib/systemd/system/restrictpd.service")
    offline, offline_findings = exposure("--offline=true", f"--root={root}", "restrictpd.service")
    shutil.rmtree(root)
    for line in findings:
        log(line)
    for line in sorted(set(findings) ^ set(offline_findings)):
        log(f"{'live only' if line in findings else 'offline only'}: {line}")
    log(f"exposure: live unit {live}, shipped file {UNIT_FILE} alone, offline {offline}")
    check(live <= offline, f"the live unit's exposure {live} is worse than the shipped file's {offline}")


def open_files(pid):
    """The (soft, hard) limit on open files of a process, from /proc/PID/limits."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    m = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M)
    check(m, f"no open-files line in /proc/{pid}/limits")
    return int(m.group(1)), int(m.group(2))


def step_limits_read():
    """systemd reads the unit's limits as debian/restrictpd.service writes them; the daemon
    runs with the file limit. Whether the cgroup carries memory.max and pids.max depends on
    the controllers the host hands the container: shown, not judged (run-qemu checks them)."""
    props = unit_props("restrictpd.service", "LimitNOFILE", "LimitNOFILESoft", "TasksMax", "MemoryHigh", "MemoryMax", "ControlGroup")
    want = {"LimitNOFILE": "65536", "LimitNOFILESoft": "65536", "TasksMax": "1024",
            "MemoryHigh": str(768 << 20), "MemoryMax": str(1 << 30)}
    check(all(props.get(k) == v for k, v in want.items()), f"unit properties {props}, expected {want}")
    # systemd cannot raise a limit above its own hard one, which nspawn inherits from
    # whoever started it on the host: the daemon gets the lower of the two.
    ceiling = open_files(1)[1]
    daemon = open_files(main_pid())
    check(daemon == (min(65536, ceiling),) * 2, f"the daemon's open files {daemon}, PID 1's hard limit {ceiling}")
    cgroup = Path(f"/sys/fs/cgroup{props['ControlGroup']}")
    files = {n: (cgroup / n).read_text().strip() if (cgroup / n).exists() else "absent" for n in ("memory.max", "pids.max")}
    log(f"{', '.join(f'{k}={v}' for k, v in want.items())}")
    log(f"the daemon's open files soft {daemon[0]}, hard {daemon[1]} (PID 1's hard limit {ceiling}); cgroup here: {files}")


def step_audit():
    """restrictpd --audit on the live system, where the binary has it: its report is shown
    (the wiring here is the test's, not a production one, so its verdicts are not judged)."""
    if "--audit" not in run("restrictpd", "--help", check_rc=False).stdout:
        raise StepSkipped("this build of restrictpd has no --audit")
    r = run("restrictpd", "--audit", check_rc=False, timeout=120)
    for line in r.stdout.splitlines():
        log(line)
    check(0 <= r.returncode < 64 and r.stdout.strip(), f"restrictpd --audit exit {r.returncode}:\n{r.stdout}{r.stderr}")
    log(f"exit status {r.returncode}")


def step_remove():
    """apt-get remove stops the daemon and removes the binary and the units, and keeps the
    conffiles and the quota database (a later install finds the counts again)."""
    run("apt-get", "remove", "-y", "restrictpd", timeout=120)
    status = run("dpkg-query", "-W", "-f=${Status}", "restrictpd", check_rc=False).stdout
    check(status == "deinstall ok config-files", f"dpkg status after remove: {status!r}")
    gone = ["/usr/sbin/restrictpd", "/lib/systemd/system/restrictpd.service", "/lib/systemd/system/restrictpd.socket"]
    kept = ["/etc/restrictpd.conf", "/etc/default/restrictpd", str(STATE_DIR / "quota.db")]
    check(not [p for p in gone if os.path.lexists(p)], f"still there after remove: {[p for p in gone if os.path.lexists(p)]}")
    check(all(os.path.exists(p) for p in kept), f"missing after remove: {[p for p in kept if not os.path.exists(p)]}")
    procs = run("pgrep", "-u", "restrict", check_rc=False).stdout.split()
    check(not procs, f"processes of restrict still running: {procs}")
    log(f"removed: {', '.join(gone)}; kept: {', '.join(kept)}")


def step_purge():
    """apt-get purge (after remove) removes the conffiles and the quota database; the system
    user 'restrict' stays (Debian does not remove system users: files elsewhere may still
    belong to the UID)."""
    run("apt-get", "purge", "-y", "restrictpd", timeout=120)
    status = run("dpkg-query", "-W", "-f=${Status}", "restrictpd", check_rc=False)
    check(status.returncode != 0 or "not-installed" in status.stdout, f"dpkg still knows restrictpd: {status.stdout}")
    gone = ["/usr/sbin/restrictpd", "/lib/systemd/system/restrictpd.service", "/lib/systemd/system/restrictpd.socket",
            "/etc/restrictpd.conf", "/etc/default/restrictpd", "/etc/logcheck/ignore.d.server/restrictpd",
            "/etc/systemd/system/multi-user.target.wants/restrictpd.service", str(STATE_DIR)]
    left = [p for p in gone if os.path.lexists(p)]
    check(not left, f"still there after purge: {left}")
    load = unit_props("restrictpd.service", "LoadState")["LoadState"]
    check(load == "not-found", f"restrictpd.service LoadState={load}")
    procs = run("pgrep", "-u", "restrict", check_rc=False).stdout.split()
    check(not procs, f"processes of restrict still running: {procs}")
    check(pwd.getpwnam("restrict"), "the restrict user was removed")
    log(f"removed: {', '.join(gone)}; kept: the system user restrict (uid {pwd.getpwnam('restrict').pw_uid})")


def step_install_with_port_taken(deb):
    """A fresh install while 127.0.0.1:10027 is taken: the service cannot start, yet apt-get
    succeeds and dpkg leaves the package configured; once the port is free it starts."""
    run("systemd-run", "--unit=test-port-squatter", "--property=Type=exec", "--", "/usr/bin/python3", "-c",
        "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('127.0.0.1', {FILTER_PORT})); s.listen(); time.sleep(3600)")
    wait_until(lambda: listening(FILTER_PORT), 10, "the squatter on 10027")
    since = journal_mark()
    r = run("apt-get", "install", "-y", str(Path("/root") / Path(deb).name), check_rc=False, timeout=180)
    check(r.returncode == 0, f"apt-get install failed:\n{r.stdout}{r.stderr}")
    status, audit = dpkg_is_configured()
    check(status == "install ok installed" and not audit, f"dpkg: {status!r}; dpkg --audit: {audit!r}")
    err = wait_journal(r"cannot listen on 127\.0\.0\.1:10027", since)
    state = is_active("restrictpd.service")
    check(state != "active", f"restrictpd.service is {state} with the port taken")
    log(f"apt-get exit 0, dpkg '{status}', dpkg --audit clean; unit {state}; journal: {err[0]}")
    run("systemctl", "stop", "test-port-squatter")
    run("systemctl", "reset-failed", "restrictpd")
    run("systemctl", "restart", "restrictpd")
    check(is_active("restrictpd.service") == "active", "restrictpd did not start once the port was free")
    log("port freed: restrictpd.service active")


# The order matters: each step starts from the state the previous one left. A check of
# another listener of the package (e.g. a policy service on its own port) belongs after
# step_socket_activation, built from the same helpers (FilterSession, wait_journal, unit_props).
STEPS = [
    ("install the package", step_install_package),
    ("wire Postfix", step_wire_postfix),
    ("mail as root and www-data", step_mail_as_root_and_www_data),
    ("decision lines in the journal", step_decision_journal_fields),
    ("the SMTP door (policy service)", step_smtp_door),
    ("quota store survives restart", step_quota_survives_restart),
    ("reload good then bad", step_reload_good_then_bad),
    ("stop drains", step_stop_drains),
    ("socket activation", step_socket_activation),
    ("hold queue (on_refuse hold)", step_hold),
    ("watchdog restarts a hung daemon", step_watchdog_restarts_hung_daemon),
    ("configuration error stops the unit", step_config_error_stops_unit),
    ("reinstall with a broken configuration", step_reinstall_with_broken_config),
    ("systemd-analyze security", step_security_score),
    ("limits as systemd reads them", step_limits_read),
    ("restrictpd --audit", step_audit),
    ("remove", step_remove),
    ("purge", step_purge),
    ("install with the port taken", step_install_with_port_taken),
]


def main():
    deb = sys.argv[1]
    os.environ["DEBIAN_FRONTEND"] = "noninteractive"
    os.environ.setdefault("LANG", "C.UTF-8")
    failed = None
    for name, fn in STEPS:
        if failed:
            print(f"NOT RUN {name}", flush=True)
            continue
        print(f"=== {name}", flush=True)
        t0 = time.monotonic()
        try:
            if fn.__code__.co_argcount:
                fn(deb)
            else:
                fn()
        except StepSkipped as e:
            print(f"SKIP {name}: {e}", flush=True)
            continue
        except (StepFailed, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as e:
            failed = name
            print(f"FAIL {name} ({time.monotonic() - t0:.1f} s): {e}", flush=True)
            continue
        print(f"PASS {name} ({time.monotonic() - t0:.1f} s)", flush=True)
    if failed:
        print(f"inside: FAILED at '{failed}'", flush=True)
        return 1
    print(f"inside: all {len(STEPS)} steps passed or were skipped as shown", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
