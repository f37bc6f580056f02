// The DATA phase of a session: hold the header section, decide, then relay or refuse.

import Logging
import NIOCore
import RestrictPolicy
import SMTPCore

extension Session {
    /// Why a message is refused before the policy is even asked.
    enum DataFailure {
        case violation(DataViolation)
        case headerTooBig
        case tooBig

        func reply(_ limits: SMTPLimits) -> SMTPReply {
            switch self {
            case .violation(let v): return v.reply
            case .headerTooBig: return Replies.headerTooBig(limits.headerSection)
            case .tooBig: return Replies.messageTooBig(limits.messageSize)
            }
        }

        var reason: String {
            switch self {
            case .violation(let v): return "\(v.logName) in message data"
            case .headerTooBig: return "header section over header_limit"
            case .tooBig: return "message over message_size_limit"
            }
        }
    }

    /// Handles DATA up to the reply to the end of data. False when the session must end.
    mutating func data(client: inout ClientIO, relay: inout RelayIO, out: inout ByteBuffer) async throws -> Bool {
        guard case .accepted(let reversePath) = self.txn.mail else {
            Replies.needMail.write(to: &out)
            try await client.send(out)
            return true
        }
        guard !self.txn.recipients.isEmpty else {
            Replies.needRecipient.write(to: &out)
            try await client.send(out)
            return true
        }
        // RFC 2920: DATA ends a pipelined group; the client must wait for 354. Bytes already
        // here would be read as message content by one side and as commands by another.
        if client.buffer.readableBytes > 0 {
            self.logger.warning("improper command pipelining after DATA: \(client.buffer.readableBytes) bytes sent before 354; closing")
            Replies.pipelining.write(to: &out)
            try await client.send(out)
            return false
        }
        Replies.startData.write(to: &out)
        try await client.send(out)
        out.clear()

        let limits = self.settings.limits
        client.clock.phase("DATA", timeout: .seconds(self.settings.dataTimeout))
        var scanner = DataScanner(maxLineLength: limits.dataLine)
        var held = ByteBuffer()
        var reader = HeaderReader()
        var size = 0
        var failure: DataFailure? = nil
        var ended = false
        let recipients = self.txn.recipients.map(\.description)
        let from = reversePath?.description ?? ""

        // 1. The header section, line by line, held until it ends.
        headers: while !ended {
            guard let event = try await client.dataEvent(&scanner, oneLine: true) else { return false }
            switch event {
            case .end:
                ended = true
            case .violation(let v):
                failure = failure ?? .violation(v)
            case .content(let line):
                size += line.readableBytes
                if limits.messageSize > 0, size > limits.messageSize {
                    failure = .tooBig
                    scanner.discardRest()
                    continue
                }
                if held.readableBytes + line.readableBytes > limits.headerSection {
                    failure = .headerTooBig
                    scanner.discardRest()
                    continue
                }
                let text = line.readableBytesView.dropLast(2)
                let event = reader.push(ByteBufferView(text))
                held.writeImmutableBuffer(line)
                if event == .endOfHeaders { break headers }
            }
        }

        let identity = reader.identity
        var user: String? = nil
        if let uid = identity.uid { user = await self.runtime.userNames.name(uid) }
        var record = DecisionRecord(
            queueID: identity.queueID, uid: identity.uid, user: user,
            from: from, to: recipients, verdict: .refuse, reason: "", quota: nil, relayReply: nil)

        if let failure {
            try await self.drain(&scanner, client: &client, ended: ended)
            let reply = failure.reply(limits)
            record.reason = failure.reason
            try await self.finishRefused(reply: reply, record: record, client: &client, relay: &relay)
            return true
        }

        // 2. The decision.
        let sender: Sender
        switch identity {
        case .pickup(let uid, _, _, _): sender = .user(uid: uid, name: record.user)
        case .unidentified(let reason): sender = .unidentified(reason: reason)
        }
        let verdict = await self.ruleset.policy.decide(
            sender: sender, recipients: recipients, store: self.runtime.store, now: self.runtime.clock(),
            held: sender.uid.map { uid in self.runtime.reservations.withLock { $0.held(uid: uid) } } ?? [])
        record.quota = verdict.quota
        record.reason = verdict.reason
        if case .unidentified(let why) = sender { record.reason += " (unidentified: \(why))" }
        guard verdict.kind == Verdict.Kind.relay else {
            scanner.discardRest()
            try await self.drain(&scanner, client: &client, ended: ended)
            record.verdict = verdict.kind
            let reply = verdict.reply
            try await self.finishRefused(reply: reply, record: record, client: &client, relay: &relay)
            return true
        }

        // 3. Relay: DATA, the held header section, the body as it streams, the end of data.
        try await relay.send("DATA")
        let go = try await relay.reply()
        guard go.code == 354 else {
            scanner.discardRest()
            try await self.drain(&scanner, client: &client, ended: ended)
            record.relayReply = go.description
            if go.isPositive {
                // A 2xx to DATA would read to the client as if the message had been taken.
                record.verdict = .defer
                record.reason = "relay answered DATA without 354"
                try await self.finishRefused(reply: Replies.relayConfused, record: record, client: &client, relay: &relay)
                return true
            }
            record.verdict = go.isTransient ? .defer : .refuse
            record.reason = "relay refused DATA"
            try await self.finishRefused(reply: go, record: record, client: &client, relay: &relay)
            return true
        }

        var pending: [ByteBuffer] = [held]
        var abort: DataFailure? = nil
        do {
            body: while !ended {
                while let event = scanner.next(&client.buffer) {
                    switch event {
                    case .end:
                        ended = true
                        break body
                    case .violation(let v):
                        abort = .violation(v)
                        break body
                    case .content(let span):
                        size += span.readableBytes
                        if limits.messageSize > 0, size > limits.messageSize {
                            abort = .tooBig
                            scanner.discardRest()
                            break body
                        }
                        pending.append(span)
                    }
                }
                if !pending.isEmpty {
                    try await relay.send(contentsOf: pending, replies: 0)
                    pending.removeAll(keepingCapacity: true)
                }
                guard try await client.fill() else {
                    // The client left mid-message: the relay must not see an end of data.
                    self.dropRelay(relay)
                    self.logger.warning("\(record.queueID ?? "NOQUEUE"): client disconnected during DATA; message discarded")
                    return false
                }
            }
        } catch is RelayFailure {
            self.dropRelay(relay)
            scanner.discardRest()
            try await self.drain(&scanner, client: &client, ended: ended)
            record.verdict = .defer
            record.reason = "relay connection lost during DATA"
            self.log(record, level: .warning)
            try await client.send(Replies.relayLostInData)
            return true
        }

        if let abort {
            // Part of the message already went to the relay: drop that connection so it
            // never sees an end of data, then answer the client.
            self.dropRelay(relay)
            try await self.drain(&scanner, client: &client, ended: false)
            record.verdict = .refuse
            record.reason = abort.reason
            self.log(record, level: .warning)
            try await client.send(abort.reply(limits))
            return true
        }

        var dot = ByteBuffer()
        dot.writeStaticString(".\r\n")
        pending.append(dot)
        let final: SMTPReply
        do {
            try await relay.send(contentsOf: pending, replies: 1)
            final = try await relay.reply()
        } catch let failure as RelayFailure {
            // Lost with the last lines or before its reply: the relay did not take the
            // message, so it is deferred and logged like a loss earlier in DATA.
            self.dropRelay(relay)
            record.verdict = .defer
            record.reason = "relay connection lost at end of data: \(failure)"
            self.log(record, level: .warning)
            try await client.send(Replies.relayLostInData)
            return true
        }
        record.relayReply = final.description
        // Only a 2xx means the relay took the message; a 3xx here is a protocol error.
        let answer = final.code / 100 == 3 ? Replies.relayConfused : final
        record.verdict = answer.code / 100 == 2 ? .relay : answer.isTransient ? .defer : .refuse
        if answer.code / 100 != 2 { record.reason = final.code / 100 == 3 ? "relay answered the end of data with 3xx" : "relay refused the message" }
        // Logged before the answer: if the client is gone by now, the relay still has the
        // message, and the line must say so.
        self.log(record, level: record.verdict == .relay ? .info : .warning)
        if answer.code / 100 == 3 { self.dropRelay(relay) }
        try await client.send(answer)
        self.resetTransaction()
        client.clock.phase("command", timeout: .seconds(self.settings.commandTimeout), fromFirstByte: true)
        return true
    }

    /// Closes the relay connection mid-transaction (the relay discards what it has); the
    /// session can only end after this.
    mutating func dropRelay(_ relay: RelayIO) {
        relay.abort()
        self.relayAborted = true
    }

    /// Reads and drops the rest of the message up to its end of data.
    func drain(_ scanner: inout DataScanner, client: inout ClientIO, ended: Bool) async throws {
        guard !ended, !scanner.isFinished else { return }
        scanner.discardRest()
        while true {
            guard let event = try await client.dataEvent(&scanner, oneLine: false) else { throw ClientGone() }
            if case .end = event { return }
        }
    }

    struct ClientGone: Error {}

    /// The message is refused (or deferred): clear the relay's envelope, answer, log.
    mutating func finishRefused(reply: SMTPReply, record: DecisionRecord, client: inout ClientIO, relay: inout RelayIO) async throws {
        do {
            _ = try await relay.reset()
        } catch is RelayFailure {
            // The decision stands and is still answered and logged; only QUIT is left after.
            self.dropRelay(relay)
        }
        self.resetTransaction()
        client.clock.phase("command", timeout: .seconds(self.settings.commandTimeout), fromFirstByte: true)
        self.log(record, level: .warning)
        try await client.send(reply)
    }

    func log(_ record: DecisionRecord, level: Logger.Level) {
        self.runtime.count { c in
            switch record.verdict {
            case .relay: c.relayed += 1
            case .defer: c.deferred += 1
            case .refuse: c.refused += 1
            }
        }
        // The fields are built only for a sink that keeps them (the journal).
        self.logger.log(level: level, "\(record.line)", metadata: RestrictLogHandler.keepsMetadata ? record.metadata : nil)
    }
}
