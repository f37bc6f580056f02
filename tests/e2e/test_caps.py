"""Volume caps through the private Postfix: a `messages N per hour` cap on mail to an
allowed address (the content filter door, sendmail -> pickup -> restrictpd)."""

import re
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
