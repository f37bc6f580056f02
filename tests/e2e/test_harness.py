"""The harness proves itself without restrictpd: sink, private Postfix, sendmail as users.

A transparent byte relay stands where restrictpd goes (pickup -> content filter -> reinjection
-> sink), so a failure in the restrictpd tests can be blamed on restrictpd, not the harness.
"""

import smtplib

import harness


def test_sink_stores_envelope_and_raw_bytes(sink):
    sink.clear()
    data = "Subject: x\r\n\r\nline\r\n.dot\r\n8-bit: \u00e9t\u00e9\r\n".encode()
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
        code, caps = s.ehlo("client.example")
        assert code == 250
        for cap in (b"PIPELINING", b"8BITMIME", b"SMTPUTF8", b"DSN", b"ENHANCEDSTATUSCODES", b"SIZE"):
            assert cap in caps
        s.sendmail("a@example.com", ["b@example.com", "c@example.com"], data,
                   mail_options=["BODY=8BITMIME"])
    [m] = sink.wait_for(1, 5)
    assert m.mail_from == "a@example.com"
    assert "BODY=8BITMIME" in m.mail_params
    assert m.rcpts == ["b@example.com", "c@example.com"]
    assert m.data == data
    sink.clear()


def test_postfix_pickup_filter_reinjection_sink(postfix, sink):
    """root and www-data submit with sendmail -C; a pass-through filter relays to 10026."""
    relay = harness.PassThroughFilter(postfix.filter_port, postfix.relay_port).start()
    try:
        msg0, mid0 = harness.make_message(sender="root@lab.localdomain", to=["alice@example.com"],
                                          subject="harness root", body="hello\n.dot\n")
        msg33, mid33 = harness.make_message(sender="www-data@lab.localdomain",
                                            to=["carol@example.com"], subject="harness www-data",
                                            body="hello\n")
        postfix.sendmail(["alice@example.com"], msg0)
        postfix.sendmail(["carol@example.com"], msg33, user="www-data")
        sink.wait_for(2, 30)
        [a] = sink.messages_to("alice@example.com")
        [c] = sink.messages_to("carol@example.com")
        assert b"(Postfix, from userid 0)" in a.data
        assert b"(Postfix, from userid 33)" in c.data
        assert a.data.endswith(harness.to_crlf(b"\nhello\n.dot\n"))
        qid = postfix.queue_id_for(mid33, postfix.test_log_mark)
        assert postfix.grep(rf"pickup\[\d+\]: {qid}: uid=33 from=<www-data>", postfix.test_log_mark)
        postfix.wait_queue_empty(20)
    finally:
        relay.stop()


def test_postfix_defers_when_no_filter_listens(postfix, sink):
    """Nothing on the content-filter port: deferred with 4.4.1, then a flush delivers once."""
    mark = postfix.log_mark()
    msg, mid = harness.make_message(sender="root@lab.localdomain", to=["dave@example.com"],
                                    subject="harness deferred", body="later\n")
    postfix.sendmail(["dave@example.com"], msg)
    postfix.wait_log(r"to=<dave@example\.com>.*dsn=4\.4\.1, status=deferred .*Connection refused",
                     mark, 30)
    assert [q["queue_id"] for q in postfix.queue()]
    relay = harness.PassThroughFilter(postfix.filter_port, postfix.relay_port).start()
    try:
        postfix.flush()
        sink.wait_for(1, 30)
        postfix.wait_queue_empty(20)
        assert len(sink.messages_to("dave@example.com")) == 1
    finally:
        relay.stop()
