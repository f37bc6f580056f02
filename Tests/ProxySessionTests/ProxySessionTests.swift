// The session machine, byte level: a transcript in, what the driver is asked to do out, the
// same whether the client's turns come whole, byte by byte or in random chunks.

import NIOCore
import ProxySession
import RestrictPolicy
import SMTPCore
import Testing

private func lines(_ s: String) -> [String] { s.split(separator: "\r\n").map(String.init) }

@Suite struct ProxySessionTests {
    let h = Harness()

    @Test func aPostfixLikeSessionIsRelayedCanonically() throws {
        let body = "line one\r\n..dot-stuffed\r\n\r\nlast\r\n"
        let t = try #require(self.h.runAll(envelope + [message(body: body), "QUIT\r\n"]))
        #expect(lines(t.client) == [
            "220 2.0.0 relay.test ESMTP", "250-relay.test", "250-PIPELINING", "250-SIZE 100000", "250-8BITMIME",
            "250 ENHANCEDSTATUSCODES", "250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued as Q1", "221 2.0.0 Bye",
        ])
        #expect(t.relay == "EHLO client.test\r\nMAIL FROM:<a@lab.localdomain>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" + message(body: body))
        #expect(t.records.count == 1)
        let r = try #require(t.records.first)
        #expect(r.verdict == .relay && r.uid == 0 && r.user == "root" && r.queueID == "4ABC123" && r.to == ["b@example.org"])
        #expect(r.relayReply == "250 2.0.0 Ok: queued as Q1")
        #expect(t.closed == true)
    }

    @Test func severalMessagesAndRSET() throws {
        let turns = envelope + [message(), "RSET\r\nMAIL FROM:<>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n", message(uid: 33), "QUIT\r\n"]
        let t = try #require(self.h.runAll(turns))
        #expect(t.records.map(\.uid) == [0, 33])
        #expect(t.records.last?.from == "" && t.records.last?.user == "www-data")
        #expect(lines(t.relay).filter { $0 == "RSET" }.count == 1)
        #expect(t.closed == true)
    }

    @Test func dataMustWaitFor354() throws {
        // A group ending in DATA is fine; bytes after DATA before the 354 are not. (Whole: in
        // chunks the DATA line may come alone, which is legal.)
        let t = self.h.run(["EHLO x\r\n", "MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nSubject: smuggled\r\n"], chunking: .whole)
        #expect(t.client.hasSuffix("554 5.5.0 Error: SMTP protocol synchronization\r\n"))
        #expect(!t.relay.contains("smuggled") && !t.relay.contains("DATA\r\n"))
        #expect(t.logs.contains { $0.contains("improper command pipelining after DATA") })
        // The relay's envelope is cleared before the connection is lent again.
        #expect(t.relay.hasSuffix("RSET\r\n") && t.closed == true)
    }

    @Test(arguments: [
        ("bare LF", "x\ny\r\n", "550 5.6.0 Message refused: bare <LF> in message data"),
        ("bare CR", "x\ry\r\n", "550 5.6.0 Message refused: bare <CR> in message data"),
        ("NUL", "x\u{0}y\r\n", "550 5.6.0 Message refused: NUL in message data"),
        ("long line", String(repeating: "x", count: 1200) + "\r\n", "550 5.6.0 Message refused: line longer than 1000 octets"),
    ])
    func violationsInTheBodyAbortTheRelay(_ name: String, _ bad: String, _ reply: String) throws {
        let t = try #require(self.h.runAll(envelope + [message(body: "fine\r\n" + bad + "more\r\n"), "QUIT\r\n"]))
        #expect(t.client.contains(reply + "\r\n"), "\(name)")
        #expect(t.aborts >= 1 && !t.relay.hasSuffix(".\r\n"), "\(name): the relay must never see an end of data")
        #expect(t.records.first?.verdict == .refuse)
        #expect(t.client.hasSuffix("221 2.0.0 Bye\r\n") && t.closed == false)
    }

    @Test func aViolationInTheHeaderSectionRefusesBeforeTheRelaySeesAnything() throws {
        let t = try #require(self.h.runAll(envelope + ["Received: by lab (Postfix, from userid 0)\r\n\tid X; d\r\nBad\nheader\r\n\r\nbody\r\n.\r\n", "QUIT\r\n"]))
        #expect(t.client.contains("550 5.6.0 Message refused: bare <LF> in message data\r\n"))
        #expect(!t.relay.contains("DATA\r\n") && t.relay.hasSuffix("RSET\r\n"))
        #expect(t.decisions.isEmpty && t.records.first?.reason == "bare LF in message data")
        #expect(t.closed == true)
    }

    @Test func limits() throws {
        var h = self.h
        h.limits.headerSection = 300
        let bigHeader = "Received: by lab (Postfix, from userid 0)\r\n\tid X; d\r\n" + String(repeating: "X-Pad: 0123456789\r\n", count: 30) + "\r\nbody\r\n.\r\n"
        let t1 = try #require(h.runAll(envelope + [bigHeader]))
        #expect(t1.client.contains("552 5.3.4 Message header section exceeds 300 bytes"))
        h.limits.messageSize = 500
        let big = message(body: String(repeating: "0123456789012345678\r\n", count: 40))
        let t2 = try #require(h.runAll(envelope + [big]))
        #expect(t2.client.contains("552 5.3.4 Message size exceeds fixed limit of 500 bytes") && t2.aborts >= 1)
        let rcpts = (1...7).map { "RCPT TO:<r\($0)@example.org>\r\n" }.joined()
        let t3 = try #require(self.h.runAll(["EHLO x\r\n", "MAIL FROM:<a@b.c>\r\n" + rcpts]))
        #expect(lines(t3.client).filter { $0.hasPrefix("452 4.5.3") }.count == 2)
        let t4 = try #require(self.h.runAll(["EHLO x\r\n", "NOOP " + String(repeating: "x", count: 600) + "\r\n", "NOOP\r\n"]))
        #expect(t4.client.contains("500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"))
    }

    @Test func commandErrorsAndRefusals() throws {
        let t = try #require(self.h.runAll([
            "EHLO x\r\n", "RCPT TO:<a@b.c>\r\n", "MAIL FROM:<a@b.c>\r\n", "MAIL FROM:<a@b.c>\r\n", "VRFY root\r\n", "FOO\r\n",
            "MAIL FROM:<a@b.c> BODY=8BITMIME FOO=1\r\n", "RSET\r\nDATA\r\n", "QUIT\r\n",
        ]))
        #expect(lines(t.client).dropFirst(6) == [
            "503 5.5.1 Error: need MAIL command", "250 2.1.0 Ok", "503 5.5.1 Error: nested MAIL command",
            "502 5.5.1 Error: command not implemented", "502 5.5.1 Error: command not recognized",
            "555 5.5.4 Unsupported option: FOO", "250 2.0.0 Ok", "503 5.5.1 Error: need MAIL command", "221 2.0.0 Bye",
        ])
    }

    @Test func theVerdictRefusesAndTheRelayIsReset() throws {
        var h = self.h
        h.verdict = { rcpts in Verdict(kind: .refuse, reply: Replies.notPermitted(rcpts[0], who: "uid 33 (www-data)"), reason: "not on the allow list", quota: nil) }
        let t = try #require(h.runAll(envelope + [message(uid: 33, body: String(repeating: "spam\r\n", count: 50)), "QUIT\r\n"]))
        #expect(t.client.contains("550 5.7.1 <b@example.org>: not permitted for uid 33 (www-data)\r\n221"))
        #expect(!t.relay.contains("DATA\r\n") && !t.relay.contains("spam") && t.relay.contains("RSET\r\n"))
        #expect(t.records.first?.verdict == .refuse && t.records.first?.user == "www-data")
        #expect(t.closed == true)
    }

    @Test func anUnidentifiedSenderIsDecidedAsSuch() throws {
        var h = self.h
        h.verdict = { _ in Verdict(kind: .refuse, reply: Replies.notPermitted("b@example.org", who: "unidentified sender"), reason: "rule refuses all", quota: nil) }
        let t = try #require(h.runAll(envelope + ["Subject: no pickup header\r\n\r\nhi\r\n.\r\n"]))
        #expect(t.records.first?.uid == nil && t.records.first?.reason.contains("(unidentified: ") == true)
    }

    @Test func relayFailuresAtEveryStep() throws {
        var h = self.h
        for (failOn, expectClient, reusable) in [
            ("EHLO", "421 4.4.2 Relay connection lost, closing connection\r\n", false),
            ("RCPT", "421 4.4.2 Relay connection lost, closing connection\r\n", false),
            ("DATA", "421 4.4.2 Relay connection lost, closing connection\r\n", false),
            ("hello", "451 4.4.2 Relay connection lost during DATA, try again later\r\n", false),
        ] {
            h.relay.failOn = failOn
            // Whole turns: which pipelined replies come before a failure depends on the chunks.
            let t = h.run(envelope + [message(), "QUIT\r\n"], chunking: .whole)
            #expect(t.client.contains(expectClient), "\(failOn)")
            #expect(t.closed == reusable, "\(failOn)")
        }
        // Refused by the relay: at RCPT (passed on), at DATA, at the end of data.
        h.relay.failOn = nil
        h.relay.rcpt = { $0.contains("bad") ? SMTPReply(550, "5.1.1", "no such user") : SMTPReply(250, "2.1.5", "Ok") }
        let t1 = try #require(h.runAll(["EHLO x\r\n", "MAIL FROM:<a@b.c>\r\nRCPT TO:<bad@x.y>\r\nDATA\r\n", "QUIT\r\n"]))
        #expect(t1.client.contains("550 5.1.1 no such user\r\n554 5.5.1 Error: no valid recipients\r\n"))
        h.relay.data = SMTPReply(451, "4.3.0", "try later")
        let t2 = try #require(h.runAll(envelope + [message(), "QUIT\r\n"]))
        #expect(t2.client.contains("451 4.3.0 try later\r\n") && t2.records.first?.verdict == .defer)
        h.relay.data = SMTPReply(code: 354, lines: ["go"])
        h.relay.end = SMTPReply(354, "3.0.0", "confused")
        let t3 = try #require(h.runAll(envelope + [message(), "QUIT\r\n"]))
        #expect(t3.client.contains("451 4.4.2 Relay protocol error, try again later\r\n") && t3.closed == false)
    }

    @Test func theClientLeavingMidMessageNeverEndsTheRelaysData() throws {
        let t = try #require(self.h.runAll(envelope + [String(message().dropLast(3))], closeAtEnd: true))
        #expect(t.aborts == 1 && !t.relay.hasSuffix("\r\n.\r\n") && t.closed == false)
        #expect(t.logs.contains { $0.contains("client disconnected during DATA") })
        // Leaving between commands with an envelope open: RSET first, then reusable.
        let t2 = try #require(self.h.runAll(["EHLO x\r\n", "MAIL FROM:<a@b.c>\r\n"], closeAtEnd: true))
        #expect(t2.relay.hasSuffix("RSET\r\n") && t2.closed == true)
    }

    @Test func bareNewlineInACommandClosesTheSession() throws {
        let t = try #require(self.h.runAll(["EHLO x\n"]))
        #expect(t.client.hasSuffix("521 5.5.2 Error: bare <CR> or <LF> received\r\n") && t.closed == true)
    }

    @Test func aTimeoutAnswers421AndDropsTheRelay() {
        var machine = ProxySession(limits: self.h.limits)
        _ = machine.relayGreeted(SMTPReply(220, "2.0.0", "hi"))
        let actions = machine.timedOut("idle for 300s in command")
        #expect(actions.contains(.abortRelay))
        #expect(actions.contains(.close(relayReusable: false)))
        #expect(actions.contains { if case .sendClient(let b) = $0 { return String(buffer: b).hasPrefix("421 4.4.2") } else { return false } })
        #expect(machine.isClosed)
    }

    @Test func shuttingDownRefusesMAIL() throws {
        var machine = ProxySession(limits: self.h.limits)
        machine.shuttingDown = true
        _ = machine.relayGreeted(SMTPReply(220, "2.0.0", "hi"))
        let actions = machine.clientSent(ByteBuffer(string: "MAIL FROM:<a@b.c>\r\n"))
        #expect(actions.contains { if case .sendClient(let b) = $0 { return String(buffer: b) == "421 4.3.2 Service shutting down, closing connection\r\n" } else { return false } })
    }

    @Test func theMachineStopsReadingWhileItWaits() {
        var machine = ProxySession(limits: self.h.limits)
        _ = machine.relayGreeted(SMTPReply(220, "2.0.0", "hi"))
        #expect(machine.wantsClientBytes)
        _ = machine.clientSent(ByteBuffer(string: "MAIL FROM:<a@b.c>\r\n"))
        #expect(!machine.wantsClientBytes)
        _ = machine.relayReplied(SMTPReply(250, "2.1.0", "Ok"))
        #expect(machine.wantsClientBytes)
    }
}
