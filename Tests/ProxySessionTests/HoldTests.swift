// Held messages: the main relay's envelope is cleared, the envelope is replayed to the hold
// relay, the message goes there; whatever goes wrong on the way leaves the message with the
// client as a 451, and the main relay serves the session on.

import NIOCore
import ProxySession
import RestrictPolicy
import SMTPCore
import Testing

private func lines(_ s: String) -> [String] { s.split(separator: "\r\n").map(String.init) }

private let holdVerdict = Verdict(
    kind: .hold, reply: Replies.overQuota("b@example.org", limit: 3, period: " per day", who: "uid 0 (root)", permanent: false),
    reason: "<b@example.org> over quota", quota: "0/3 per day")

@Suite struct HoldTests {
    var h: Harness {
        var h = Harness()
        h.verdict = { _ in holdVerdict }
        return h
    }

    @Test func aHeldMessageGoesToTheHoldRelayAndItsQueueIdIsLogged() throws {
        let t = try #require(self.h.runAll(envelope + [message(), "QUIT\r\n"]))
        #expect(t.relay == "EHLO client.test\r\nMAIL FROM:<a@lab.localdomain>\r\nRCPT TO:<b@example.org>\r\nRSET\r\n")
        #expect(t.holdRelay == "EHLO client.test\r\nMAIL FROM:<a@lab.localdomain>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" + message())
        #expect(lines(t.client).suffix(2) == ["250 2.0.0 Ok: queued as H1", "221 2.0.0 Bye"])
        let r = try #require(t.records.first)
        #expect(t.records.count == 1)
        #expect(r.verdict == .hold && r.heldQueueID == "H1" && r.queueID == "4ABC123" && r.quota == "0/3 per day")
        #expect(r.reason == "<b@example.org> over quota" && r.relayReply == "250 2.0.0 Ok: queued as H1")
        #expect(t.holdEnds == [false] && t.aborts == 0 && t.closed == true)
    }

    @Test func everyRecipientAndTheMailParametersAreReplayed() throws {
        let env = ["EHLO client.test\r\n", "MAIL FROM:<a@lab.localdomain> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"]
        let t = try #require(self.h.runAll(env + [message(), "QUIT\r\n"]))
        #expect(t.holdRelay.hasPrefix("EHLO client.test\r\nMAIL FROM:<a@lab.localdomain> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"))
        #expect(t.records.first?.verdict == .hold)
    }

    @Test func aMissingHoldRelayDefersAndTheSessionGoesOn() throws {
        var h = self.h
        h.hold = nil
        var verdicts = [holdVerdict, Verdict.relay(reason: "allowed", quota: nil)]
        let second = "MAIL FROM:<a@lab.localdomain>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        h.verdict = { _ in verdicts.count > 1 ? verdicts.removeFirst() : verdicts[0] }
        let t = h.run(envelope + [message(), second, message(), "QUIT\r\n"], chunking: .whole)
        #expect(t.client.contains("451 4.4.1 Hold relay unavailable, message deferred\r\n"))
        #expect(t.holdRelay.isEmpty && t.holdEnds.isEmpty)
        #expect(t.records.map(\.verdict) == [.defer, .relay])
        #expect(t.records.first?.reason.contains("hold relay: connection refused") == true)
        #expect(t.logs.contains { $0.hasPrefix("error: hold relay: connection refused") })
        #expect(lines(t.relay).filter { $0 == "DATA" }.count == 1 && t.closed == true)
    }

    @Test func aHoldRelayThatRefusesARecipientHoldsNothing() throws {
        var h = self.h
        h.hold?.rcpt = { _ in SMTPReply(554, "5.7.1", "Relay access denied") }
        let t = try #require(h.runAll(envelope + [message(), "QUIT\r\n"]))
        #expect(t.client.contains("451 4.4.1 Hold relay unavailable, message deferred\r\n"))
        // It answered DATA with 354 all the same: the connection is dropped, never ended.
        #expect(t.holdEnds == [true] && !t.holdRelay.contains("\r\n.\r\n"))
        #expect(t.records.first?.verdict == .defer && t.closed == true)
    }

    @Test(arguments: [
        SMTPReply(451, "4.3.0", "Error: queue file write error"), SMTPReply(554, "5.7.1", "Rejected"),
    ])
    func aHoldRelayThatRefusesTheMessageDefersIt(_ end: SMTPReply) throws {
        var h = self.h
        h.hold?.end = end
        let t = try #require(h.runAll(envelope + [message(), "QUIT\r\n"]))
        #expect(lines(t.client).suffix(2) == ["451 4.4.1 Hold relay unavailable, message deferred", "221 2.0.0 Bye"])
        #expect(t.records.first?.verdict == .defer && t.records.first?.relayReply == end.description)
        #expect(t.holdEnds == [false] && t.closed == true)
    }

    @Test func theHoldRelayLostMidMessageDefersAndTheMainRelayServesOn() {
        var h = self.h
        h.hold?.failOn = "marker"
        var verdicts = [holdVerdict, Verdict.relay(reason: "allowed", quota: nil)]
        h.verdict = { _ in verdicts.count > 1 ? verdicts.removeFirst() : verdicts[0] }
        let second = "MAIL FROM:<a@lab.localdomain>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        let t = h.run(envelope + [message(body: "marker\r\n"), second, message(), "QUIT\r\n"], chunking: .whole)
        #expect(t.client.contains("451 4.4.1 Hold relay unavailable, message deferred\r\n"))
        #expect(t.holdEnds == [true] && t.aborts == 0)
        #expect(t.records.map(\.verdict) == [.defer, .relay])
        #expect(t.client.hasSuffix("250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n") && t.closed == true)
    }

    @Test func aViolationInAHeldBodyDropsTheHoldConnectionOnly() throws {
        let t = try #require(self.h.runAll(envelope + [message(body: "fine\r\nbad\nline\r\n"), "QUIT\r\n"]))
        #expect(t.client.contains("550 5.6.0 Message refused: bare <LF> in message data\r\n"))
        #expect(t.holdEnds == [true] && t.aborts == 0 && !t.holdRelay.hasSuffix(".\r\n"))
        #expect(t.records.first?.verdict == .refuse && t.client.hasSuffix("221 2.0.0 Bye\r\n") && t.closed == true)
    }

    @Test func theClientLeavingMidHeldMessageNeverEndsTheHoldRelaysData() {
        let cut = String(message(body: String(repeating: "body line\r\n", count: 50)).dropLast(40))
        let t = self.h.run(envelope + [cut], chunking: .whole, closeAtEnd: true)
        #expect(t.holdEnds == [true] && !t.holdRelay.hasSuffix(".\r\n") && t.records.isEmpty)
        #expect(t.closed == true)
    }

    @Test func theScriptHintIsRecorded() throws {
        var h = Harness()
        h.verdict = { _ in .relay(reason: "allowed", quota: nil) }
        let withScript = "Received: by lab.localdomain (Postfix, from userid 33)\r\n\tid 4ABC123; Thu, 27 Nov 2026 09:13:34 +0100 (CET)\r\n"
            + "X-PHP-Originating-Script: 33:contact.php\r\nSubject: test\r\n\r\nhello\r\n.\r\n"
        let t = try #require(h.runAll(envelope + [withScript, "QUIT\r\n"]))
        #expect(t.records.first?.script == "33:contact.php")
        #expect(try #require(self.h.runAll(envelope + [message(), "QUIT\r\n"])).records.first?.script == nil)
    }

    @Test func queuedAs() {
        #expect(ProxySession.queuedAs(SMTPReply(250, "2.0.0", "Ok: queued as 4dLk2X1a7Tz9")) == "4dLk2X1a7Tz9")
        #expect(ProxySession.queuedAs(SMTPReply(250, "2.0.0", "Ok")) == nil)
        #expect(ProxySession.queuedAs(SMTPReply(250, "2.0.0", "Ok: queued as \u{1b}[31m")) == nil)
    }
}
