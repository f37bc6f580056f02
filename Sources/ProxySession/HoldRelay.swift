// A held message's way to the hold relay (restrictpd.conf(5): over_quota hold, on_refuse
// hold, hold_relay): Postfix's smtpd there puts every message it accepts on the hold queue,
// where it waits for the admin (postsuper -H or -d).
//
// The main relay already has the envelope when the verdict comes, so it is cleared with RSET
// first; then the driver opens a new connection to the hold relay, the envelope is replayed
// there (EHLO, then MAIL, every accepted RCPT and DATA in one pipelined group), and the
// message goes as it would have gone to the main relay. Anything but a clean 2xx at the end
// of data leaves the message with the client as a 451: held mail never goes out because the
// hold relay is missing or refuses, it stays in Postfix's deferred queue.

import NIOCore
public import SMTPCore

extension ProxySession {
    /// The hold relay's greeting, after `openHoldRelay`.
    public mutating func holdRelayGreeted(_ greeting: SMTPReply) -> [SessionAction] {
        guard case .holdConnecting(let m) = self.state else { return [] }
        var actions: [SessionAction] = [.waitingForRelay(false)]
        self.onHold = true
        if self.clientEOF {
            self.endHold(abort: false, &actions)
            self.close(reusable: true, &actions)
            return actions
        }
        guard greeting.code == 220 else {
            self.holdFailed(m, "greeting \(greeting.description)", abort: true, &actions)
            return actions
        }
        // The client's own greeting when there was one, so the hold queue's Received: header
        // names the same host as the main relay's would.
        let hello = self.hello.map { $0.command.wireLine } ?? "EHLO localhost"
        actions.append(.sendRelay([Self.line(hello)], replies: 1))
        actions.append(.waitingForRelay(true))
        self.enter(.holdGreeting(m))
        return actions
    }

    /// The hold relay could not be reached (or did not greet in time), after `openHoldRelay`.
    public mutating func holdRelayUnavailable(_ why: String) -> [SessionAction] {
        guard case .holdConnecting(let m) = self.state else { return [] }
        var actions: [SessionAction] = [.waitingForRelay(false)]
        if self.clientEOF {
            self.close(reusable: true, &actions)
            return actions
        }
        self.holdFailed(m, why, abort: false, &actions)
        return actions
    }

    /// "Ok: queued as 4ABC123" in a Postfix reply: the queue id, if any.
    public static func queuedAs(_ reply: SMTPReply) -> String? {
        for line in reply.lines {
            guard let range = line.firstRange(of: "queued as ") else { continue }
            let id = line[range.upperBound...].prefix { $0.isASCII && ($0.isLetter || $0.isNumber) }
            if !id.isEmpty { return String(id.prefix(64)) }
        }
        return nil
    }

    // MARK: inside the machine

    /// A hold verdict: clear the main relay's envelope first.
    mutating func startHold(_ m: Message, _ actions: inout [SessionAction]) {
        actions.append(.sendRelay([Self.line("RSET")], replies: 1))
        actions.append(.waitingForRelay(true))
        self.enter(.holdResetting(m))
    }

    /// The main relay answered the RSET: on to the hold relay.
    mutating func mainReset(_ m: Message, _ reply: SMTPReply, _ actions: inout [SessionAction]) {
        if !reply.isPositive {
            // Its envelope may still be open: that connection serves no other message.
            actions.append(.log(.error, "relay refused RSET: \(LogText.escape(reply.description))"))
            actions.append(.abortRelay)
            self.relayAborted = true
        }
        if self.clientEOF {
            self.close(reusable: true, &actions)
            return
        }
        actions.append(.openHoldRelay)
        actions.append(.waitingForRelay(true))
        self.enter(.holdConnecting(m))
    }

    mutating func holdGreeted(_ m: Message, _ reply: SMTPReply, _ actions: inout [SessionAction]) {
        guard reply.isPositive, let mail = self.txn.mailLine, !self.txn.rcptLines.isEmpty else {
            self.holdFailed(m, "greeting refused: \(reply.description)", abort: false, &actions)
            return
        }
        var out = ByteBuffer()
        Self.append(mail, to: &out)
        for rcpt in self.txn.rcptLines { Self.append(rcpt, to: &out) }
        Self.append("DATA", to: &out)
        let replies = self.txn.rcptLines.count + 2
        actions.append(.sendRelay([out], replies: replies))
        actions.append(.waitingForRelay(true))
        self.enter(.holdEnvelope(m, remaining: replies, refused: nil))
    }

    /// One reply to the replayed envelope; the last is DATA's. Every recipient must be taken,
    /// or some would be neither held nor refused.
    mutating func holdEnvelopeReplied(
        _ m: Message, _ reply: SMTPReply, remaining: Int, refused: SMTPReply?, _ actions: inout [SessionAction]
    ) {
        if remaining > 1 {
            self.enter(.holdEnvelope(m, remaining: remaining - 1, refused: refused ?? (reply.isPositive ? nil : reply)))
            return
        }
        actions.append(.waitingForRelay(false))
        if let refused {
            // A 354 after a refused recipient waits for data that must not come.
            self.holdFailed(m, "envelope refused: \(refused.description)", abort: reply.code == 354, &actions)
            return
        }
        guard reply.code == 354 else {
            self.holdFailed(m, "DATA refused: \(reply.description)", abort: false, &actions)
            return
        }
        var m = m
        m.hold = true
        self.startBody(m, &actions)
    }

    /// The hold relay's answer to the end of data: held, or deferred with 451.
    mutating func holdAnsweredEnd(_ m: Message, _ final: SMTPReply, _ actions: inout [SessionAction]) {
        guard final.code / 100 == 2 else {
            var m = m
            m.record.relayReply = final.description
            self.holdFailed(m, "end of data refused: \(final.description)", abort: final.code / 100 == 3, &actions)
            return
        }
        var record = m.record
        record.relayReply = final.description
        record.verdict = .hold
        record.heldQueueID = Self.queuedAs(final)
        actions.append(.record(record))
        self.endHold(abort: false, &actions)
        self.resetTransaction()
        if self.clientEOF {
            self.close(reusable: true, &actions)
            return
        }
        // The client learns the hold relay's own "queued as": Postfix logs it as delivered.
        actions.append(.sendClient(Self.bytes(final)))
        self.enterCommands(&actions)
        self.advance(&actions)
    }

    /// The hold relay connection broke (or said what was not asked).
    mutating func holdLost(_ why: String, _ actions: inout [SessionAction]) {
        actions.append(.waitingForRelay(false))
        switch self.state {
        case .holdGreeting(let m), .holdEnvelope(let m, _, _), .body(let m), .final(let m):
            self.holdFailed(m, "connection lost: \(why)", abort: true, &actions)
        case .greeting, .commands, .relaying, .greeting2, .headers, .identifying, .deciding, .dataGo, .draining,
            .resetting, .holdResetting, .holdConnecting, .quitting, .closed:
            actions.append(.log(.error, "hold relay failed: \(why)"))
            self.endHold(abort: true, &actions)
        }
    }

    /// The message cannot be held: the hold relay connection goes, the main relay is the
    /// session's again, and the client gets 451 once the rest of the message is read.
    mutating func holdFailed(_ m: Message, _ why: String, abort: Bool, _ actions: inout [SessionAction]) {
        var m = m
        if self.onHold { self.endHold(abort: abort, &actions) }
        m.hold = false
        m.record.verdict = .defer
        m.record.reason += "; hold relay: \(why)"
        actions.append(.log(.error, "hold relay: \(LogText.escape(why)); message deferred"))
        self.refuse(m, Refusal(reply: Replies.holdUnavailable, record: m.record, reset: false), &actions)
    }

    /// Back to the main relay.
    mutating func endHold(abort: Bool, _ actions: inout [SessionAction]) {
        guard self.onHold else { return }
        self.onHold = false
        actions.append(.endHoldRelay(abort: abort))
    }
}
