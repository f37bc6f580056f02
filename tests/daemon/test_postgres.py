"""The quota store on PostgreSQL, with real restrictpd processes and a private cluster.

A farm: two daemons with the same `scope` on one database never admit more than N together;
with different scopes each has N. A `messages` cap holds across the farm, the refusals it
causes freeze the UID on every daemon of the scope, and --quota, --stats and --thaw see and
act on the scope's state. Faults: the database stopped mid-run defers with 451 4.3.0
and relays nothing, and mail flows again once it is back, without restarting restrictpd; a
wrong password, a missing schema and a newer schema are reported plainly by --check-config
and at start; a daemon that deferred for want of a schema lets mail flow once --init-store
has run, and one whose schema changed under it defers until it fits again.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import daemonlib as dl  # noqa: E402
import pgcluster  # noqa: E402

RULES = "default\n    arbitrary 10 per day\n"


@pytest.fixture(scope="module")
def pg():
    cluster = pgcluster.Cluster().init()
    try:
        yield cluster
    finally:
        cluster.destroy()


def pg_settings(cluster: pgcluster.Cluster, scope: str, password_file: Path | None = None,
                database: str = pgcluster.DATABASE, extra: str = "") -> str:
    uri = cluster.uri.replace(f"/{pgcluster.DATABASE}?", f"/{database}?")
    return (f"state {uri}\nstate_password_file {password_file or cluster.password_file}\n"
            f"scope {scope}\n{extra}")


def pg_config(lab, cluster, name: str, scope: str, rules: str = RULES, **kw) -> tuple[Path, int]:
    port = dl.free_port()
    path = lab.dir / name
    text_settings = pg_settings(cluster, scope, **kw)
    dl.write_config(path, listen=f"127.0.0.1:{port}", relay_port=lab.relay.port, state=lab.state, rules=rules)
    # write_config puts `state PATH` first; the PostgreSQL settings replace it.
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("state ")]
    path.write_text("\n".join(lines[:3]) + "\n" + text_settings + "\n" + "\n".join(lines[3:]) + "\n")
    return path, port


def admin(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([dl.binary(), "--config", str(config), *args], capture_output=True, text=True,
                          timeout=30, env=dl.clean_env())


def storm(ports: list[int], count: int = 200, uid: int = 33, prefix: str = "r") -> list[int]:
    """`count` sessions at once, each to one new recipient, spread over `ports`; their end-of-data codes."""
    codes: list[int] = [0] * count

    def one(i: int):
        try:
            codes[i] = dl.send_message(ports[i % len(ports)], [f"{prefix}{i}@x.org"], uid=uid)[0]
        except Exception as e:  # noqa: BLE001
            codes[i] = -1
            print(f"session {i}: {e!r}", file=sys.stderr)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return codes


def start_farm(lab, pg, scopes: list[str]) -> list[int]:
    ports = []
    for n, scope in enumerate(scopes):
        # A generous state_timeout: this test is about serialisation, and 200 decisions for
        # one uid queue up behind its lock (a loaded machine must not turn them into 4.3.0).
        config, port = pg_config(lab, pg, f"farm{n}.conf", scope, extra="state_timeout 30\n")
        if n == 0:
            result = admin(config, "--init-store")
            assert result.returncode == 0, result.stderr
        d = lab.daemon(config)
        d.wait_listening(port)
        d.wait_log(r"quota store postgresql://.*schema version", timeout=10)
        ports.append(port)
    return ports


def test_two_daemons_with_one_scope_share_one_budget(lab, pg):
    ports = start_farm(lab, pg, ["farm-one", "farm-one"])
    codes = storm(ports)
    assert codes.count(250) == 10, codes
    assert codes.count(451) == 190, codes
    assert sum(d.log().count("over quota\"") for d in lab.daemons) == 190, "every other message deferred as over quota (4.7.1), none for a store error"
    assert len(lab.relay.messages) == 10
    config = lab.dir / "farm0.conf"
    shown = admin(config, "--quota", "33")
    assert shown.returncode == 0, shown.stderr
    assert "10 of 10 per day used, 0 left" in shown.stdout


def test_two_daemons_with_two_scopes_have_a_budget_each(lab, pg):
    ports = start_farm(lab, pg, ["scope-a", "scope-b"])
    codes = storm(ports)
    assert codes.count(250) == 20, codes
    per_port = [sum(1 for i, c in enumerate(codes) if c == 250 and i % 2 == n) for n in range(2)]
    assert per_port == [10, 10]
    assert len(lab.relay.messages) == 20


def test_admin_commands_against_postgres(lab, pg):
    config, port = pg_config(lab, pg, "admin.conf", "admin-scope", rules="default\n    arbitrary 2 per day\n")
    assert admin(config, "--init-store").returncode == 0
    ok = admin(config, "--check-config")
    assert ok.returncode == 0, ok.stderr
    assert "quota store postgresql://restrictpd@127.0.0.1" in ok.stdout and re.search(r"schema version [1-9]", ok.stdout), ok.stdout
    assert pgcluster.PASSWORD not in ok.stdout + ok.stderr
    d = lab.daemon(config)
    d.wait_listening(port)
    assert dl.send_message(port, ["a@x.org", "b@x.org"], uid=33)[0] == 250
    test = admin(config, "--test", "33", "c@x.org")
    assert test.returncode == 2 and "verdict=deferred" in test.stdout, test.stdout + test.stderr
    assert admin(config, "--test", "33", "a@x.org").returncode == 0
    reset = admin(config, "--reset-quota", "33")
    assert reset.returncode == 0 and "2 counted destinations forgotten" in reset.stdout, reset.stdout + reset.stderr
    assert admin(config, "--test", "33", "c@x.org").returncode == 0


CAPPED = "default\n    allow @ok.org\n    messages 2 per hour\n"


def test_messages_cap_and_freeze_hold_across_the_farm(lab, pg):
    scope = "capfarm"
    extra = "freeze after 3 refusals per hour\nfrozen defer\nstate_timeout 10\n"
    config_a, port_a = pg_config(lab, pg, "capa.conf", scope, rules=CAPPED, extra=extra)
    config_b, port_b = pg_config(lab, pg, "capb.conf", scope, rules=CAPPED, extra=extra)
    assert admin(config_a, "--init-store").returncode == 0
    a, b = lab.daemon(config_a), lab.daemon(config_b)
    a.wait_listening(port_a)
    b.wait_listening(port_b)
    # The cap is the farm's: one message on each daemon, then both defer.
    assert dl.send_message(port_a, ["one@ok.org"], uid=33)[0] == 250
    assert dl.send_message(port_b, ["two@ok.org"], uid=33)[0] == 250
    # Two deferred messages, then Postfix retrying the first on the other host: deferred again
    # but not counted again towards freezing (its queue id is counted in the window).
    for n, port, queue_id in [(0, port_a, "MORE0"), (1, port_b, "MORE1"), (0, port_b, "MORE0")]:
        code, lines = dl.send_message(port, [f"more{n}@ok.org"], uid=33, queue_id=queue_id)
        assert code == 451 and "4.7.1" in lines[0], lines
    time.sleep(1)
    assert "FROZEN" not in admin(config_a, "--quota", "33").stdout, "a retry counted as a new refusal"
    code, lines = dl.send_message(port_a, ["more2@ok.org"], uid=33, queue_id="MORE2")
    assert code == 451 and "4.7.1" in lines[0], lines
    assert len(lab.relay.messages) == 2
    assert a.log().count("over the messages cap") + b.log().count("over the messages cap") == 4
    test = admin(config_b, "--test", "33", "x@ok.org")
    assert test.returncode == 2 and 'messages="0/2 per hour"' in test.stdout, test.stdout + test.stderr
    # The third refusal, counted on either daemon, froze uid 33 for both.
    dl.wait_until(lambda: "frozen: 3 refused" in a.log() + b.log(), timeout=10, what="the freeze logged")
    dl.wait_until(lambda: "FROZEN since" in admin(config_b, "--quota", "33").stdout, timeout=10, interval=0.5, what="--quota listing the freeze")
    for port, d in [(port_b, b), (port_a, a)]:
        code, lines = dl.send_message(port, ["frozen@ok.org"], uid=33)
        assert code == 451, lines
        d.wait_log(r"uid frozen since", timeout=5)
    # --stats on either host shows the farm's decisions and the cap's state.
    def stats_seen() -> bool:
        out = admin(config_a, "--stats", "33").stdout
        return "relayed 2," in out and 'messages="0/2 per hour"' in out
    dl.wait_until(stats_seen, timeout=20, interval=1.0, what="--stats with both daemons' decisions")
    # ... and the freeze, in --quota's words, on either host.
    for config in (config_a, config_b):
        out = admin(config, "--stats", "33").stdout
        assert "  FROZEN since " in out and "its mail is held or deferred until restrictpd --thaw" in out, out
    thawed = admin(config_a, "--thaw", "33")
    assert thawed.returncode == 0 and "thawed (scope capfarm)" in thawed.stdout, thawed.stdout + thawed.stderr
    assert "FROZEN" not in admin(config_b, "--quota", "33").stdout
    assert "FROZEN" not in admin(config_b, "--stats", "33").stdout
    # Thawed on both: the cap, not the freeze, defers the next message.
    before = b.log().count("over the messages cap")
    code, _ = dl.send_message(port_b, ["after@ok.org"], uid=33)
    assert code == 451
    dl.wait_until(lambda: b.log().count("over the messages cap") == before + 1, timeout=5, what="a cap refusal after the thaw")
    assert len(lab.relay.messages) == 2


def expect_store_error(lab, pg, name: str, pattern: str, **kw):
    """--check-config fails with `pattern`; a daemon started anyway logs it and defers. Returns
    its configuration and port."""
    config, port = pg_config(lab, pg, f"{name}.conf", name, **kw)
    checked = admin(config, "--check-config")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert pattern in checked.stderr, checked.stderr
    d = lab.daemon(config)
    d.wait_listening(port)
    d.wait_log(pattern, timeout=10)
    code, lines = dl.send_message(port, ["someone@x.org"], uid=33)
    assert code == 451 and "4.3.0" in lines[0], lines
    assert not lab.relay.messages
    return config, port


def test_wrong_password_is_reported(lab, pg):
    wrong = lab.dir / "wrong-password"
    wrong.write_text("not-the-password\n")
    expect_store_error(lab, pg, "wrongpw", "password authentication failed for user", password_file=wrong)


def test_missing_schema_is_reported(lab, pg):
    pg.psql(f"CREATE DATABASE empty OWNER {pgcluster.ROLE}")
    expect_store_error(lab, pg, "missing", "no restrictpd schema in this database", database="empty")


def test_schema_created_while_running_lets_mail_flow_without_restart(lab, pg):
    """A farm's first start, or an upgrade that changes the schema: a daemon that finds no
    schema defers, checks again at each decision, and lets mail flow as soon as --init-store has
    run, without a restart."""
    pg.psql(f"CREATE DATABASE later OWNER {pgcluster.ROLE}")
    config, port = expect_store_error(lab, pg, "later", "no restrictpd schema in this database", database="later")
    assert admin(config, "--init-store").returncode == 0

    def flows():
        return dl.send_message(port, ["later@x.org"], uid=33)[0] == 250
    dl.wait_until(flows, timeout=15, interval=0.5, what="mail flowing once the schema was created")
    assert len(lab.relay.messages) == 1


def test_a_schema_changed_under_a_running_daemon_defers_until_it_fits_again(lab, pg):
    """A node not yet upgraded when another ran --init-store: once a statement fails on the changed
    schema, the daemon checks the version again, defers while it is not its own, and goes on
    once it is (here the change is undone, as upgrading the node would make it fit)."""
    pg.psql(f"CREATE DATABASE moved OWNER {pgcluster.ROLE}")
    config, port = pg_config(lab, pg, "moved.conf", "moved", database="moved")
    assert admin(config, "--init-store").returncode == 0
    version = pg.psql("SELECT version FROM restrictpd_schema", database="moved")
    d = lab.daemon(config)
    d.wait_listening(port)
    assert dl.send_message(port, ["first@x.org"], uid=33)[0] == 250
    pg.psql("ALTER PROCEDURE restrictpd_admit RENAME TO restrictpd_admit_moved", database="moved")
    pg.psql("UPDATE restrictpd_schema SET version = 99", database="moved")
    for i in range(2):
        code, lines = dl.send_message(port, [f"moved{i}@x.org"], uid=33)
        assert code == 451 and "4.3.0" in lines[0], lines
    d.wait_log("schema version 99 is newer than this restrictpd understands", timeout=10)
    assert len(lab.relay.messages) == 1
    pg.psql("ALTER PROCEDURE restrictpd_admit_moved RENAME TO restrictpd_admit", database="moved")
    pg.psql(f"UPDATE restrictpd_schema SET version = {version}", database="moved")

    def flows():
        return dl.send_message(port, ["back@x.org"], uid=33)[0] == 250
    dl.wait_until(flows, timeout=15, interval=0.5, what="mail flowing once the schema fits again")
    assert len(lab.relay.messages) == 2


def test_newer_schema_is_reported(lab, pg):
    pg.psql(f"CREATE DATABASE newer OWNER {pgcluster.ROLE}")
    config, _ = pg_config(lab, pg, "newer-init.conf", "newer", database="newer")
    assert admin(config, "--init-store").returncode == 0
    pg.psql("UPDATE restrictpd_schema SET version = 99", database="newer")
    expect_store_error(lab, pg, "newerschema", "schema version 99 is newer than this restrictpd understands",
                       database="newer")
    refused = admin(config, "--init-store")
    assert refused.returncode == 1 and "newer than this restrictpd" in refused.stderr


def test_password_in_the_uri_is_refused(lab, pg):
    config, _ = pg_config(lab, pg, "inuri.conf", "x")
    text = config.read_text().replace(f"{pgcluster.ROLE}@", f"{pgcluster.ROLE}:hunter2@")
    config.write_text(text)
    checked = admin(config, "--check-config")
    assert checked.returncode == 1
    assert "must not carry a password" in checked.stderr
    assert "hunter2" not in checked.stderr


def test_database_down_defers_then_recovers_without_restart(lab):
    cluster = pgcluster.Cluster().init()
    try:
        config, port = pg_config(lab, cluster, "fault.conf", "fault", extra="state_timeout 1\n")
        assert admin(config, "--init-store").returncode == 0
        notify = lab.notify()
        d = lab.daemon(config, env={"NOTIFY_SOCKET": notify.path})
        d.wait_listening(port)
        notify.wait_for(lambda t: "READY=1" in t and "store=postgresql" in t, 10, what="READY=1 with the store's state")
        assert dl.send_message(port, ["before@x.org"], uid=33)[0] == 250
        notify.wait_for(lambda t: "store=postgresql up" in t, 12, what="STATUS= with store=postgresql up")
        cluster.stop()
        for i in range(3):
            code, lines = dl.send_message(port, [f"down{i}@x.org"], uid=33)
            assert code == 451 and "4.3.0" in lines[0], lines
        assert len(lab.relay.messages) == 1
        d.wait_log(r"error.*quota store postgresql://", timeout=5)
        # systemd's status line says the store is down, and why.
        notify.wait_for(lambda t: "store=postgresql down" in t, 12, what="STATUS= with store=postgresql down")
        cluster.start()

        def flows():
            return dl.send_message(port, ["after@x.org"], uid=33)[0] == 250
        dl.wait_until(flows, timeout=30, interval=1.0, what="mail flowing again after the database restarted")
        assert len(lab.relay.messages) == 2
        assert d.running
    finally:
        cluster.destroy()


def test_init_store_on_sqlite_creates_the_file_for_the_service_user(lab):
    """--init-store with a SQLite state: the file and its schema, owned like the state directory."""
    import os
    import pwd
    state_dir = lab.dir / "sqlite-state"
    state_dir.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(state_dir, nobody.pw_uid, nobody.pw_gid)
    config = dl.write_config(lab.dir / "sqlite.conf", listen=f"127.0.0.1:{dl.free_port()}", relay_port=lab.relay.port,
                             state=state_dir / "quota.db", rules=RULES)
    first = admin(config, "--init-store")
    # The SQLite schema's current version, whatever it is: created, not merely found.
    assert first.returncode == 0 and re.search(r"quota\.db: schema version [1-9][0-9]*\n", first.stdout), first.stdout + first.stderr
    assert (state_dir / "quota.db").stat().st_uid == nobody.pw_uid
    again = admin(config, "--init-store")
    assert again.returncode == 0, again.stderr
