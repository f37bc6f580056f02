"""Volume caps through the private Postfix: a `messages N per hour` cap on mail to an
allowed address (the content filter door, sendmail -> pickup -> restrictpd)."""

import grp
import json
import pwd
import signal
import re
import subprocess
import time

import pytest

import harness
from harness import make_message

pytestmark = pytest.mark.needs_restrictpd

DELIVERY_TIMEOUT = 40
SETTLE = 3


def test_messages_five_per_hour_sixth_waits(postfix, sink, restrictpd_factory, rpdtest_user):
    rules = (f"user {rpdtest_user}\n"
             f"    allow webmaster@example.org\n"
             f"    messages 5 per hour\n\n" + harness.STANDARD_RULES)
    rpd = restrictpd_factory(rules=rules)
    for i in range(1, 7):
        msg, _ = make_message(sender=f"{rpdtest_user}@lab.localdomain", to=["webmaster@example.org"],
                              subject=f"caps {i}", body=f"message {i}\n")
        postfix.sendmail(["webmaster@example.org"], msg, user=rpdtest_user)
        # One at a time, so the five that pass are the first five.
        harness.wait_until(lambda: len(rpd.grep(rf"user={rpdtest_user} .*verdict=")) >= i, DELIVERY_TIMEOUT, 0.2,
                           f"decision {i}")

    sink.wait_for(5, DELIVERY_TIMEOUT)
    postfix.wait_log(r"to=<webmaster@example\.org>.*dsn=4\.7\.1, status=deferred", postfix.test_log_mark,
                     DELIVERY_TIMEOUT)
    time.sleep(SETTLE)
    subjects = sorted(re.search(rb"Subject: (caps \d)", m.data).group(1).decode() for m in sink.messages())
    assert subjects == [f"caps {i}" for i in range(1, 6)], subjects
    [queued] = postfix.queue()
    [rc] = queued["recipients"]
    assert "4.7.1" in rc.get("delay_reason", "") and "cap of 5 messages per hour" in rc["delay_reason"], rc
    relayed = rpd.grep(rf"user={rpdtest_user} .*verdict=relayed")
    assert len(relayed) == 5
    assert 'messages="0/5 per hour"' in relayed[-1] and 'messages="4/5 per hour"' in relayed[0]
    [deferred] = rpd.grep(rf"user={rpdtest_user} .*verdict=deferred")
    assert 'reason="over the messages cap (5 messages per hour)"' in deferred
    assert 'messages="0/5 per hour"' in deferred


# ----------------------------------------------------------------------------------------------
# rules for many users: a group rule covers two new system users


@pytest.fixture
def group_users(e2e_environment):
    """Two throw-away system users in a throw-away group (the first by primary group, the
    second by supplementary group), removed afterwards."""
    group, users = "rpdcapsgrp", ["rpdcaps1", "rpdcaps2"]
    harness.run(["groupadd", "--system", group])
    try:
        harness.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-g", group, users[0]])
        harness.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", group, users[1]])
        yield group, users
    finally:
        for u in users:
            harness.remove_user(u)
        subprocess.run(["groupdel", group], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def test_group_rule_covers_two_new_users(postfix, sink, restrictpd_factory, group_users):
    group, users = group_users
    rules = (f"group {group}\n"
             f"    allow webmaster@example.org\n"
             f"    messages 1 per hour\n\n" + harness.STANDARD_RULES)
    rpd = restrictpd_factory(rules=rules)
    for u in users:
        for rcpt in ("webmaster@example.org", "stranger@example.com"):
            msg, _ = make_message(sender=f"{u}@lab.localdomain", to=[rcpt], subject=f"group {u} {rcpt}", body="x\n")
            postfix.sendmail([rcpt], msg, user=u)
    sink.wait_for(2, DELIVERY_TIMEOUT)
    for u in users:
        rpd.wait_log(rf"user={u} .*to=<stranger@example\.com> verdict=refused")
        [relayed] = rpd.wait_log(rf"user={u} .*to=<webmaster@example\.org> verdict=relayed")
        # Each member has its own budget of one message an hour.
        assert 'messages="0/1 per hour"' in relayed
    time.sleep(SETTLE)
    # The sink also gets the bounces of the refused messages (null sender).
    sent = [m for m in sink.messages() if m.mail_from]
    assert sorted(m.mail_from for m in sent) == sorted(f"{u}@lab.localdomain" for u in users)
    assert all(m.rcpts == ["webmaster@example.org"] for m in sent)


# ----------------------------------------------------------------------------------------------
# allow local: the domains the instance delivers itself


def test_allow_local_reaches_mydestination_refuses_another(postfix, sink, restrictpd_factory, rpdtest_user):
    postconf = "/usr/sbin/postconf"
    etc = str(postfix.etc)
    # The instance delivers local.example itself, and hands its "local" mail to the sink.
    harness.run([postconf, "-c", etc, "-e", "mydestination = local.example",
                 f"local_transport = smtp:[127.0.0.1]:{postfix.sink_port}"])
    postfix.reload()
    try:
        rules = (f"postconf_dir {etc}\n"
                 f"user {rpdtest_user}\n"
                 f"    allow local\n\n" + harness.STANDARD_RULES)
        rpd = restrictpd_factory(rules=rules)
        rpd.wait_log(r"allow local: 1 domains Postfix delivers itself: local\.example")
        for rcpt in ("alice@local.example", "bob@example.com"):
            msg, _ = make_message(sender=f"{rpdtest_user}@lab.localdomain", to=[rcpt], subject=f"local {rcpt}", body="x\n")
            postfix.sendmail([rcpt], msg, user=rpdtest_user)
        sink.wait_for(1, DELIVERY_TIMEOUT, match=lambda m: "alice@local.example" in m.rcpts)
        rpd.wait_log(r"to=<alice@local\.example> verdict=relayed")
        rpd.wait_log(r"to=<bob@example\.com> verdict=refused")
        time.sleep(SETTLE)
        assert [r for m in sink.messages() if m.mail_from for r in m.rcpts] == ["alice@local.example"]
    finally:
        harness.run([postconf, "-c", etc, "-e", "mydestination =",
                     "local_transport = error:local delivery is disabled in this test instance"])
        postfix.reload()


# ----------------------------------------------------------------------------------------------
# restrictpd --stats --json against what the sink received


def stats_json(rpd, user: str) -> dict:
    argv = [str(rpd.binary), "--stats", user, "--since", "2h", "--json", "-c", str(rpd.config)]
    return json.loads(harness.run(argv, timeout=30).stdout)


def test_stats_json_matches_the_sink(postfix, sink, restrictpd_factory, rpdtest_user):
    rules = (f"user {rpdtest_user}\n"
             f"    allow webmaster@example.org\n"
             f"    arbitrary 2 per day\n"
             f"    messages 10 per hour\n\n" + harness.STANDARD_RULES)
    rpd = restrictpd_factory(rules=rules)
    rcpts = ["webmaster@example.org", "s1@example.com", "s2@example.com", "s3@example.com"]
    for i, rcpt in enumerate(rcpts, 1):
        msg, _ = make_message(sender=f"{rpdtest_user}@lab.localdomain", to=[rcpt], subject=f"stats {rcpt}", body="x\n")
        postfix.sendmail([rcpt], msg, user=rpdtest_user)
        harness.wait_until(lambda: len(rpd.grep(rf"user={rpdtest_user} .*verdict=")) >= i, DELIVERY_TIMEOUT, 0.2,
                           f"decision {i}")
    sink.wait_for(3, DELIVERY_TIMEOUT)
    time.sleep(SETTLE)
    delivered = [m for m in sink.messages() if m.mail_from]
    assert len(delivered) == 3

    # The daemon adds its statistics to the store every 5 seconds.
    def settled():
        s = stats_json(rpd, rpdtest_user)
        return s if s["users"] and s["users"][0]["relayed"] == 3 and s["users"][0]["deferred"] >= 1 else None

    stats = harness.wait_until(settled, 30, 1, "statistics of 3 relayed and 1 deferred")
    [user] = stats["users"]
    assert user["user"] == rpdtest_user
    assert user["relayed"] == len(delivered)
    assert user["refused"] == 0
    assert user["strangers"] == 2
    assert user["deferred"] == len(rpd.grep(rf"user={rpdtest_user} .*verdict=deferred"))
    assert user["caps"]["messages"] == {"used": 3, "limit": 10, "remaining": 7, "period": "hour"}
    assert sum(h["relayed"] for h in user["hours"]) == 3


# ----------------------------------------------------------------------------------------------
# metrics_file: the Prometheus text format, parsed by prometheus_client


def test_metrics_file_parses_and_counts_match(postfix, sink, restrictpd_factory, rpdtest_user, tmp_path):
    parser = pytest.importorskip("prometheus_client.parser", reason="pip install prometheus_client (scripts/install-deps)")
    metrics = tmp_path / "restrictpd.prom"
    rules = (f"user {rpdtest_user}\n"
             f"    allow webmaster@example.org\n"
             f"    messages 3 per hour\n\n" + harness.STANDARD_RULES)
    rpd = restrictpd_factory(rules=rules, extra_globals=f"metrics_file {metrics}\n")
    for i, rcpt in enumerate(["webmaster@example.org", "webmaster@example.org", "x@example.com"], 1):
        msg, _ = make_message(sender=f"{rpdtest_user}@lab.localdomain", to=[rcpt], subject=f"metrics {i}", body="x\n")
        postfix.sendmail([rcpt], msg, user=rpdtest_user)
        harness.wait_until(lambda: len(rpd.grep(rf"user={rpdtest_user} .*verdict=")) >= i, DELIVERY_TIMEOUT, 0.2,
                           f"decision {i}")
    sink.wait_for(2, DELIVERY_TIMEOUT, match=lambda m: bool(m.mail_from))
    # The file is written at start, every 30 seconds and when the daemon stops.
    assert rpd.stop(signal.SIGTERM) == 0
    assert not (tmp_path / "restrictpd.prom.tmp").exists()
    samples = {}
    for family in parser.text_string_to_metric_families(metrics.read_text()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    uid = str(pwd.getpwnam(rpdtest_user).pw_uid)

    def value(name, **labels):
        return samples.get((name, tuple(sorted({"user": rpdtest_user, "uid": uid, **labels}.items()))))

    delivered = len([m for m in sink.messages() if m.mail_from])
    assert value("restrictpd_messages_total", verdict="relayed") == delivered == 2
    assert value("restrictpd_messages_total", verdict="refused") == 1
    assert value("restrictpd_quota_remaining", kind="messages") == 1
    assert samples[("restrictpd_sessions", ())] == 0


def test_check_config_refuses_ambiguous_group_rules(restrictpd_binary, group_users, tmp_path):
    group, users = group_users
    second = grp.getgrgid(pwd.getpwnam(users[1]).pw_gid).gr_name   # rpdcaps2's own primary group
    conf = tmp_path / "restrictpd.conf"
    conf.write_text(f"group {group}\n    allow *\n\ngroup {second}\n    allow @localhost\n")
    proc = subprocess.run([str(restrictpd_binary), "--check-config", "-c", str(conf)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert proc.returncode == 1
    uid = pwd.getpwnam(users[1]).pw_uid
    gid1, gid2 = grp.getgrnam(group).gr_gid, grp.getgrnam(second).gr_gid
    assert proc.stderr.decode().strip() == (
        f"{conf}:4: ambiguous group rules: user {users[1]} (uid {uid}) is in group {gid1} (line 1) "
        f"and group {gid2} (line 4); give it a 'user' rule")
    # A user rule decides for it: accepted.
    conf.write_text(conf.read_text() + f"\nuser {users[1]}\n    allow *\n")
    assert subprocess.run([str(restrictpd_binary), "--check-config", "-c", str(conf)], timeout=30).returncode == 0
