// One client connection as a state machine: SMTP from Postfix's content_filter in, SMTP to the
// relay out (design decisions 4 to 8). No I/O and no clock: events come in as method calls
// (client bytes, relay replies, the verdict, failures, timeouts) and each returns the actions
// its driver carries out. Every state change passes through `enter`, which can trace it.
//
// Trusts nothing from the client. Envelope commands are re-encoded and relayed, a pipelined
// group in one write, answered in order; the message is held until its header section ends
// (header_limit), decided on, then streamed as the scanner's canonical output. The client
// learns the end-of-data reply only from the relay (or a refusal), so nothing is acknowledged
// that the relay did not accept. A message with a hold verdict goes to the hold relay instead
// (HoldRelay.swift), on a connection of its own while the main relay waits. Bounded: one
// pipelined group (`maxPipelined` commands), the client bytes the driver hands in while the
// machine waits (one read's worth: see `wantsClientBytes`), the header section, and each line.

public import NIOCore
public import RestrictPolicy
public import SMTPCore

public struct ProxySession: Sendable {
    /// Commands taken in one pipelined group before they are answered.
    public static let maxPipelined = 1024

    public let limits: SMTPLimits
    /// Set by the driver when the daemon is shutting down: MAIL is then refused with 421.
    public var shuttingDown = false
    /// Transitions, for a debug trace.
    public private(set) var trace: [String] = []
    public var tracing = false

    var state: State = .greeting
    var buffer = ByteBuffer()
    var framer: LineFramer
    var txn = Transaction()
    var relayAborted = false
    /// The hold relay connection is the session's relay now (between `openHoldRelay` and
    /// `endHoldRelay`); the main relay waits, its envelope cleared.
    var onHold = false
    var warnedLongLine = false
    /// The client closed its side; noticed when the machine next needs its bytes.
    var clientEOF = false
    /// The relay's answer to the last HELO/EHLO on this connection (kept across sessions).
    var hello: (command: SMTPCommand, reply: SMTPReply)?

    public init(limits: SMTPLimits, hello: (command: SMTPCommand, reply: SMTPReply)? = nil) {
        self.limits = limits
        self.framer = LineFramer(maxLength: limits.commandLine)
        self.hello = hello
    }

    struct Transaction {
        enum Mail { case none, pending, accepted(Mailbox?) }
        var mail: Mail = .none
        var pendingRecipients = 0
        var recipients: [Mailbox] = []
        /// The accepted MAIL and RCPT lines as relayed, for replay to the hold relay.
        var mailLine: String? = nil
        var rcptLines: [String] = []
        var generation = 0
        var isClear: Bool {
            if case .none = self.mail, self.pendingRecipients == 0 { return true }
            return false
        }
    }

    enum Step {
        case local(SMTPReply)
        case mail(Mailbox?, line: String, generation: Int)
        case rcpt(Mailbox, line: String, generation: Int)
        case rset
    }

    enum Terminal {
        case data, quit, eof
        case hello(SMTPCommand)
        case hangup(SMTPReply)
    }

    /// A pipelined group: its steps answered in order, the replies so far, what ends it.
    struct Batch {
        var steps: [Step] = []
        var next = 0
        var out = ByteBuffer()
        var terminal: Terminal? = nil
    }

    enum State {
        case greeting
        case commands
        case relaying(Batch)
        case greeting2(SMTPCommand, out: ByteBuffer)
        case headers(Message)
        case identifying(Message)
        case deciding(Message)
        case dataGo(Message)
        case body(Message)
        case final(Message)
        case draining(Message, Refusal)
        case resetting(Refusal)
        /// A held message: RSET went to the main relay.
        case holdResetting(Message)
        /// A held message: the driver connects to the hold relay.
        case holdConnecting(Message)
        /// A held message: EHLO went to the hold relay.
        case holdGreeting(Message)
        /// A held message: MAIL, RCPT and DATA went to the hold relay; `remaining` replies due.
        case holdEnvelope(Message, remaining: Int, refused: SMTPReply?)
        case quitting
        case closed

        var name: String {
            switch self {
            case .greeting: return "greeting"
            case .commands: return "commands"
            case .relaying: return "relaying"
            case .greeting2: return "hello"
            case .headers: return "headers"
            case .identifying: return "identifying"
            case .deciding: return "deciding"
            case .dataGo: return "data-go"
            case .body: return "body"
            case .final: return "final"
            case .draining: return "draining"
            case .resetting: return "resetting"
            case .holdResetting: return "hold-resetting"
            case .holdConnecting: return "hold-connecting"
            case .holdGreeting: return "hold-greeting"
            case .holdEnvelope: return "hold-envelope"
            case .quitting: return "quitting"
            case .closed: return "closed"
            }
        }
    }

    /// The message in progress.
    struct Message {
        var scanner: DataScanner
        var reader = HeaderReader()
        var held = ByteBuffer()
        var size = 0
        var failure: DataFailure? = nil
        var ended = false
        var record: MessageRecord
        var identity: SenderIdentity = .unidentified(reason: "no header section")
        /// The message goes to the hold relay (the session's relay from DATA on).
        var hold = false
    }

    /// What is said and logged when a message is refused: `reset` sends the relay an RSET
    /// first, to clear its envelope.
    struct Refusal {
        var reply: SMTPReply
        var record: MessageRecord?
        var reset: Bool
    }

    /// Why a message is refused before the policy is asked.
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

    /// False while the machine waits for the relay or the policy: the driver then stops
    /// reading the client, so no more than one read's worth waits here.
    public var wantsClientBytes: Bool {
        switch self.state {
        case .commands, .headers, .body, .draining: return true
        case .greeting, .relaying, .greeting2, .identifying, .deciding, .dataGo, .final, .resetting, .quitting, .closed,
            .holdResetting, .holdConnecting, .holdGreeting, .holdEnvelope:
            return false
        }
    }

    public var isClosed: Bool {
        if case .closed = self.state { return true }
        return false
    }

    /// Unconsumed client bytes (the 354 rule and tests).
    public var bufferedClientBytes: Int { self.buffer.readableBytes }

    // MARK: events

    /// The relay's greeting (a pooled connection's, or a new one's).
    public mutating func relayGreeted(_ greeting: SMTPReply) -> [SessionAction] {
        guard case .greeting = self.state else { return [] }
        guard greeting.code == 220 else {
            self.enter(.closed)
            return [.log(.error, "relay refused the connection: \(LogText.escape(greeting.description))"),
                    .sendClient(Self.bytes(Replies.relayUnavailable)), .close(relayReusable: false)]
        }
        var actions: [SessionAction] = [.sendClient(Self.bytes(greeting))]
        self.enterCommands(&actions)
        return actions
    }

    /// Bytes from the client.
    public mutating func clientSent(_ bytes: ByteBuffer) -> [SessionAction] {
        if case .closed = self.state { return [] }
        var bytes = bytes
        if self.buffer.readableBytes == 0 {
            self.buffer = bytes
        } else {
            if self.buffer.readerIndex > 65536 { self.buffer.discardReadBytes() }
            self.buffer.writeBuffer(&bytes)
        }
        var actions: [SessionAction] = []
        self.advance(&actions)
        return actions
    }

    /// The client closed its side (or the connection broke). Bytes it sent before are still
    /// taken; the machine notices the end when it next needs more.
    public mutating func clientClosed() -> [SessionAction] {
        guard !self.clientEOF else { return [] }
        self.clientEOF = true
        var actions: [SessionAction] = []
        switch self.state {
        case .closed, .quitting, .final:
            // In `final` the relay has the whole message: its answer is still logged.
            return []
        case .dataGo:
            // DATA went to the relay; it must not see an end of data now.
            actions.append(.abortRelay)
            self.close(reusable: false, &actions)
        case .greeting:
            self.close(reusable: false, &actions)
        case .commands, .headers, .body, .draining:
            self.advance(&actions)
        case .relaying, .greeting2, .identifying, .deciding, .resetting, .holdResetting, .holdConnecting:
            // Noticed when the awaited answer comes.
            break
        case .holdGreeting, .holdEnvelope:
            // Nothing reached the hold relay's queue: drop it; the main relay's envelope is
            // already cleared.
            self.endHold(abort: true, &actions)
            self.close(reusable: true, &actions)
        }
        return actions
    }

    /// A reply from the relay (one per command the machine sent, in order).
    public mutating func relayReplied(_ reply: SMTPReply) -> [SessionAction] {
        var actions: [SessionAction] = []
        switch self.state {
        case .relaying(var batch):
            self.answerStep(&batch, reply)
            self.continueBatch(batch, &actions)
        case .greeting2(let command, var out):
            actions.append(.waitingForRelay(false))
            self.hello = reply.isPositive ? (command, reply) : nil
            actions.append(.rememberHello(command, reply))
            // Postfix's smtpd resets its transaction only when it accepts the greeting.
            if reply.isPositive { self.resetTransaction() }
            Self.write(command.isEHLO ? EHLOFilter.filter(reply, sizeLimit: self.limits.messageSize) : reply, to: &out)
            actions.append(.sendClient(out))
            self.enterCommands(&actions)
            self.advance(&actions)
        case .dataGo(let m):
            actions.append(.waitingForRelay(false))
            self.relayAnsweredData(m, reply, &actions)
        case .final(let m):
            actions.append(.waitingForRelay(false))
            self.relayAnsweredEnd(m, reply, &actions)
        case .resetting(let refusal):
            actions.append(.waitingForRelay(false))
            self.answer(refusal, &actions)
        case .holdResetting(let m):
            actions.append(.waitingForRelay(false))
            self.mainReset(m, reply, &actions)
        case .holdGreeting(let m):
            actions.append(.waitingForRelay(false))
            self.holdGreeted(m, reply, &actions)
        case .holdEnvelope(let m, let remaining, let refused):
            self.holdEnvelopeReplied(m, reply, remaining: remaining, refused: refused, &actions)
        case .quitting:
            actions.append(.waitingForRelay(false))
            self.enter(.closed)
            actions.append(.close(relayReusable: reply.isPositive))
        case .greeting, .commands, .headers, .identifying, .deciding, .body, .draining, .closed, .holdConnecting:
            // Nothing was asked: an unsolicited reply. The connection cannot be trusted again.
            actions.append(.log(.error, "\(self.onHold ? "hold relay" : "relay") sent an unexpected reply: \(LogText.escape(reply.description))"))
            if self.onHold {
                self.holdLost("unexpected reply", &actions)
            } else {
                self.relayLost("unexpected reply", &actions)
            }
        }
        return actions
    }

    /// The relay connection broke, or answered what SMTP does not allow.
    public mutating func relayFailed(_ why: String) -> [SessionAction] {
        var actions: [SessionAction] = []
        if self.onHold {
            self.holdLost(why, &actions)
        } else {
            self.relayLost(why, &actions)
        }
        return actions
    }

    /// The user name of the sender's uid (after `identify`).
    public mutating func identified(user: String?) -> [SessionAction] {
        guard case .identifying(var m) = self.state else { return [] }
        m.record.user = user
        var actions: [SessionAction] = []
        // Whoever left cannot be answered: the message is not relayed.
        if self.clientEOF {
            self.end(&actions)
            return actions
        }
        self.headersDone(m, &actions)
        return actions
    }

    /// The policy's verdict (after `decide`).
    public mutating func decided(_ verdict: Verdict) -> [SessionAction] {
        guard case .deciding(var m) = self.state else { return [] }
        var actions: [SessionAction] = []
        if self.clientEOF {
            self.end(&actions)
            return actions
        }
        m.record.quota = verdict.quota
        m.record.messages = verdict.messages
        m.record.recipients = verdict.recipients
        m.record.strangers = verdict.strangers
        m.record.reason = verdict.reason
        if case .unidentified(let why) = m.identity { m.record.reason += " (unidentified: \(why))" }
        if verdict.kind == .hold, !self.relayAborted {
            m.record.verdict = .hold
            self.startHold(m, &actions)
            return actions
        }
        guard verdict.kind == .relay || verdict.kind == .hold else {
            m.record.verdict = verdict.kind
            self.refuse(m, Refusal(reply: verdict.reply, record: m.record, reset: true), &actions)
            return actions
        }
        if self.relayAborted {
            actions.append(.sendClient(Self.bytes(Replies.relayLost)))
            self.close(reusable: false, &actions)
            return actions
        }
        actions.append(.sendRelay([Self.line("DATA")], replies: 1))
        actions.append(.waitingForRelay(true))
        self.enter(.dataGo(m))
        return actions
    }

    /// A client deadline ran out (idle, command or data timeout).
    public mutating func timedOut(_ why: String) -> [SessionAction] {
        if case .closed = self.state { return [] }
        var actions: [SessionAction] = [.log(.warning, "timeout: \(why); closing"), .sendClient(Self.bytes(Replies.timeout)), .abortRelay]
        self.close(reusable: false, &actions)
        return actions
    }

    // MARK: commands

    mutating func enterCommands(_ actions: inout [SessionAction]) {
        self.enter(.commands)
        actions.append(.phase(.command))
    }

    /// Consumes buffered client bytes as far as the state allows.
    mutating func advance(_ actions: inout [SessionAction]) {
        while true {
            switch self.state {
            case .commands:
                guard self.readBatch(&actions) else { return }
            case .headers(let m):
                guard self.readHeaders(m, &actions) else { return }
            case .body(let m):
                guard self.readBody(m, &actions) else { return }
            case .draining(let m, let refusal):
                guard self.drain(m, refusal, &actions) else { return }
            case .greeting, .relaying, .greeting2, .identifying, .deciding, .dataGo, .final, .resetting, .quitting, .closed,
                .holdResetting, .holdConnecting, .holdGreeting, .holdEnvelope:
                return
            }
        }
    }

    /// Reads every complete command line buffered (up to a terminal command), relays the
    /// envelope commands in one write. True when the machine should go on reading.
    mutating func readBatch(_ actions: inout [SessionAction]) -> Bool {
        var batch = Batch()
        var relayOut = ByteBuffer()
        var relayed = 0
        while batch.terminal == nil, batch.steps.count < Self.maxPipelined {
            let line: ByteBuffer
            do {
                guard let next = try self.framer.next(&self.buffer) else {
                    if self.clientEOF { batch.terminal = .eof }
                    break
                }
                line = next
            } catch .tooLong(let limit) {
                // Once per session: a client repeating it must not flood the log.
                if !self.warnedLongLine {
                    actions.append(.log(.warning, "command line longer than \(limit) bytes from client"))
                    self.warnedLongLine = true
                }
                batch.steps.append(.local(Replies.lineTooLong))
                continue
            } catch {
                actions.append(.log(.warning, "bare <CR> or <LF> in a command line from client: closing"))
                batch.terminal = .hangup(Replies.bareNewline)
                break
            }
            self.take(line, into: &batch, relayOut: &relayOut, relayed: &relayed)
        }
        guard !batch.steps.isEmpty || batch.terminal != nil else { return false }
        if relayed > 0 {
            actions.append(.sendRelay([relayOut], replies: relayed))
            actions.append(.waitingForRelay(true))
        }
        self.continueBatch(batch, &actions)
        if case .commands = self.state { return true }
        return self.wantsClientBytes
    }

    /// One command line into the group: a local answer, a relayed command, or its end.
    mutating func take(_ line: ByteBuffer, into batch: inout Batch, relayOut: inout ByteBuffer, relayed: inout Int) {
        let command: SMTPCommand
        do {
            command = try CommandParser.parse(line.readableBytesView, sizeLimit: self.limits.messageSize)
        } catch {
            batch.steps.append(.local(error.reply))
            return
        }
        if self.relayAborted {
            // The relay connection went with an aborted message; only QUIT is left.
            batch.terminal = command == .quit ? .quit : .hangup(Replies.afterAbort)
            return
        }
        switch command {
        case .ehlo, .helo:
            batch.terminal = .hello(command)
        case .mail(let sender, _):
            if self.shuttingDown {
                batch.terminal = .hangup(Replies.shuttingDown)
                return
            }
            guard case .none = self.txn.mail else { return batch.steps.append(.local(Replies.nestedMail)) }
            self.txn.mail = .pending
            Self.append(command.wireLine, to: &relayOut)
            relayed += 1
            batch.steps.append(.mail(sender, line: command.wireLine, generation: self.txn.generation))
        case .rcpt(let path, _):
            if case .none = self.txn.mail { return batch.steps.append(.local(Replies.needMail)) }
            guard self.txn.recipients.count + self.txn.pendingRecipients < self.limits.recipients else {
                return batch.steps.append(.local(Replies.tooManyRecipients))
            }
            self.txn.pendingRecipients += 1
            Self.append(command.wireLine, to: &relayOut)
            relayed += 1
            batch.steps.append(.rcpt(path, line: command.wireLine, generation: self.txn.generation))
        case .rset:
            self.resetTransaction()
            Self.append("RSET", to: &relayOut)
            relayed += 1
            batch.steps.append(.rset)
        case .noop: batch.steps.append(.local(Replies.ok))
        case .data: batch.terminal = .data
        case .quit: batch.terminal = .quit
        case .disabled: batch.steps.append(.local(Replies.notImplemented))
        case .unknown: batch.steps.append(.local(Replies.notRecognized))
        }
    }

    /// Answers the group's steps in order as far as replies are in; then its end.
    mutating func continueBatch(_ batch: Batch, _ actions: inout [SessionAction]) {
        var batch = batch
        while batch.next < batch.steps.count {
            guard case .local(let reply) = batch.steps[batch.next] else {
                self.enter(.relaying(batch))
                return
            }
            Self.write(reply, to: &batch.out)
            batch.next += 1
        }
        if batch.steps.contains(where: { if case .local = $0 { return false } else { return true } }) {
            actions.append(.waitingForRelay(false))
        }
        self.finish(batch, &actions)
    }

    /// A relay reply for the group's next relayed step.
    mutating func answerStep(_ batch: inout Batch, _ reply: SMTPReply) {
        switch batch.steps[batch.next] {
        case .mail(let sender, let line, let generation):
            if generation == self.txn.generation, case .pending = self.txn.mail {
                self.txn.mail = reply.isPositive ? .accepted(sender) : .none
                self.txn.mailLine = reply.isPositive ? line : nil
            }
        case .rcpt(let path, let line, let generation):
            if generation == self.txn.generation {
                self.txn.pendingRecipients -= 1
                if reply.isPositive {
                    self.txn.recipients.append(path)
                    self.txn.rcptLines.append(line)
                }
            }
        case .rset, .local:
            break
        }
        Self.write(reply, to: &batch.out)
        batch.next += 1
    }

    /// Every step answered: the group's end.
    mutating func finish(_ batch: Batch, _ actions: inout [SessionAction]) {
        var out = batch.out
        switch batch.terminal {
        case nil:
            if out.readableBytes > 0 { actions.append(.sendClient(out)) }
            self.enterCommands(&actions)
        case .eof:
            if out.readableBytes > 0 { actions.append(.sendClient(out)) }
            self.end(&actions)
        case .hangup(let reply):
            Self.write(reply, to: &out)
            actions.append(.sendClient(out))
            self.end(&actions)
        case .quit:
            // The relay connection stays open for the next session (the driver's pool).
            Self.write(Replies.bye, to: &out)
            actions.append(.sendClient(out))
            self.end(&actions)
        case .hello(let command):
            if self.txn.isClear, let cached = self.hello, cached.command == command {
                // A pooled connection already greeted the relay with this very command, and no
                // transaction is open: the relay's answer would be the same.
                self.resetTransaction()
                Self.write(command.isEHLO ? EHLOFilter.filter(cached.reply, sizeLimit: self.limits.messageSize) : cached.reply, to: &out)
                actions.append(.sendClient(out))
                self.enterCommands(&actions)
            } else {
                actions.append(.sendRelay([Self.line(command.wireLine)], replies: 1))
                actions.append(.waitingForRelay(true))
                self.enter(.greeting2(command, out: out))
            }
        case .data:
            self.startData(out, &actions)
        }
    }

    // MARK: the message

    mutating func startData(_ out: ByteBuffer, _ actions: inout [SessionAction]) {
        var out = out
        guard case .accepted(let reversePath) = self.txn.mail else {
            Self.write(Replies.needMail, to: &out)
            actions.append(.sendClient(out))
            self.enterCommands(&actions)
            return
        }
        guard !self.txn.recipients.isEmpty else {
            Self.write(Replies.needRecipient, to: &out)
            actions.append(.sendClient(out))
            self.enterCommands(&actions)
            return
        }
        // RFC 2920: DATA ends a pipelined group; the client must wait for 354. Bytes already
        // here would be read as message content by one side and as commands by another.
        if self.buffer.readableBytes > 0 {
            actions.append(.log(.warning, "improper command pipelining after DATA: \(self.buffer.readableBytes) bytes sent before 354; closing"))
            Self.write(Replies.pipelining, to: &out)
            actions.append(.sendClient(out))
            self.end(&actions)
            return
        }
        Self.write(Replies.startData, to: &out)
        actions.append(.sendClient(out))
        actions.append(.phase(.data))
        let record = MessageRecord(
            queueID: nil, uid: nil, user: nil, from: reversePath?.description ?? "",
            to: self.txn.recipients.map(\.description), verdict: .refuse, reason: "")
        self.enter(.headers(Message(scanner: DataScanner(maxLineLength: self.limits.dataLine), record: record)))
    }

    /// The header section, line by line, held until it ends. True to go on reading.
    mutating func readHeaders(_ m: Message, _ actions: inout [SessionAction]) -> Bool {
        var m = m
        while !m.ended {
            guard let event = m.scanner.next(&self.buffer, oneLine: true) else {
                self.enter(.headers(m))
                if self.clientEOF { self.end(&actions) }
                return false
            }
            switch event {
            case .end:
                m.ended = true
            case .violation(let v):
                m.failure = m.failure ?? .violation(v)
            case .content(let line):
                m.size += line.readableBytes
                if self.limits.messageSize > 0, m.size > self.limits.messageSize {
                    m.failure = m.failure ?? .tooBig
                    m.scanner.discardRest()
                    continue
                }
                if m.held.readableBytes + line.readableBytes > self.limits.headerSection {
                    m.failure = m.failure ?? .headerTooBig
                    m.scanner.discardRest()
                    continue
                }
                let end = m.reader.push(ByteBufferView(line.readableBytesView.dropLast(2)))
                m.held.writeImmutableBuffer(line)
                if end == .endOfHeaders {
                    self.identify(m, &actions)
                    return self.wantsClientBytes
                }
            }
        }
        self.identify(m, &actions)
        return self.wantsClientBytes
    }

    mutating func identify(_ m: Message, _ actions: inout [SessionAction]) {
        var m = m
        m.identity = m.reader.identity
        m.record.queueID = m.identity.queueID
        m.record.script = ScriptHint.extract(m.held.readableBytesView)
        m.record.uid = m.identity.uid
        if let uid = m.identity.uid {
            actions.append(.identify(uid: uid))
            self.enter(.identifying(m))
        } else {
            self.headersDone(m, &actions)
        }
    }

    /// The sender is known: refuse a broken message, or ask the policy.
    mutating func headersDone(_ m: Message, _ actions: inout [SessionAction]) {
        var m = m
        if let failure = m.failure {
            m.record.reason = failure.reason
            self.refuse(m, Refusal(reply: failure.reply(self.limits), record: m.record, reset: true), &actions)
            return
        }
        let sender: Sender
        switch m.identity {
        case .pickup(let uid, _, _, _): sender = .user(uid: uid, name: m.record.user)
        case .unidentified(let reason): sender = .unidentified(reason: reason)
        }
        actions.append(.decide(sender: sender, recipients: m.record.to, queueID: m.identity.queueID))
        self.enter(.deciding(m))
    }

    mutating func relayAnsweredData(_ m: Message, _ go: SMTPReply, _ actions: inout [SessionAction]) {
        var m = m
        guard go.code == 354 else {
            m.record.relayReply = go.description
            if go.isPositive {
                // A 2xx to DATA would read to the client as if the message had been taken.
                m.record.verdict = .defer
                m.record.reason = "relay answered DATA without 354"
                self.refuse(m, Refusal(reply: Replies.relayConfused, record: m.record, reset: true), &actions)
            } else {
                m.record.verdict = go.isTransient ? .defer : .refuse
                m.record.reason = "relay refused DATA"
                self.refuse(m, Refusal(reply: go, record: m.record, reset: true), &actions)
            }
            return
        }
        self.startBody(m, &actions)
    }

    /// The relay said 354: the held header section goes, then the body as it streams.
    mutating func startBody(_ m: Message, _ actions: inout [SessionAction]) {
        var m = m
        actions.append(.sendRelay([m.held], replies: 0))
        m.held = ByteBuffer()
        if m.ended {
            self.sendEnd([], m, &actions)
            return
        }
        self.enter(.body(m))
        self.advance(&actions)
    }

    /// The body as it streams, in the scanner's canonical form. True to go on reading.
    mutating func readBody(_ m: Message, _ actions: inout [SessionAction]) -> Bool {
        var m = m
        var pending: [ByteBuffer] = []
        var abort: DataFailure? = nil
        scan: while let event = m.scanner.next(&self.buffer) {
            switch event {
            case .end:
                m.ended = true
                break scan
            case .violation(let v):
                abort = .violation(v)
                break scan
            case .content(let span):
                m.size += span.readableBytes
                if self.limits.messageSize > 0, m.size > self.limits.messageSize {
                    abort = .tooBig
                    m.scanner.discardRest()
                    break scan
                }
                pending.append(span)
            }
        }
        if let abort {
            // Part of the message already went to the relay: drop that connection so it
            // never sees an end of data, then answer the client.
            if m.hold {
                self.endHold(abort: true, &actions)
            } else {
                actions.append(.abortRelay)
                self.relayAborted = true
            }
            m.record.verdict = .refuse
            m.record.reason = abort.reason
            self.refuse(m, Refusal(reply: abort.reply(self.limits), record: m.record, reset: false), &actions)
            return self.wantsClientBytes
        }
        if m.ended {
            self.sendEnd(pending, m, &actions)
            return false
        }
        if !pending.isEmpty { actions.append(.sendRelay(pending, replies: 0)) }
        self.enter(.body(m))
        if self.clientEOF {
            // The client left mid-message: the relay must not see an end of data.
            if m.hold {
                self.endHold(abort: true, &actions)
            } else {
                actions.append(.abortRelay)
            }
            actions.append(.log(.warning, "\(m.record.queueID ?? "NOQUEUE"): client disconnected during DATA; message discarded"))
            self.close(reusable: m.hold, &actions)
        }
        return false
    }

    mutating func sendEnd(_ pending: [ByteBuffer], _ m: Message, _ actions: inout [SessionAction]) {
        var dot = ByteBuffer()
        dot.writeStaticString(".\r\n")
        actions.append(.sendRelay(pending + [dot], replies: 1))
        actions.append(.waitingForRelay(true))
        self.enter(.final(m))
    }

    mutating func relayAnsweredEnd(_ m: Message, _ final: SMTPReply, _ actions: inout [SessionAction]) {
        if m.hold { return self.holdAnsweredEnd(m, final, &actions) }
        var record = m.record
        record.relayReply = final.description
        // Only a 2xx means the relay took the message; a 3xx here is a protocol error.
        let answer = final.code / 100 == 3 ? Replies.relayConfused : final
        record.verdict = answer.code / 100 == 2 ? .relay : answer.isTransient ? .defer : .refuse
        if answer.code / 100 != 2 {
            record.reason = final.code / 100 == 3 ? "relay answered the end of data with 3xx" : "relay refused the message"
        }
        // Logged before the answer: if the client is gone by now, the relay still has the
        // message, and the line must say so.
        actions.append(.record(record))
        if final.code / 100 == 3 {
            actions.append(.abortRelay)
            self.relayAborted = true
        }
        self.resetTransaction()
        if self.clientEOF {
            self.close(reusable: true, &actions)
            return
        }
        actions.append(.sendClient(Self.bytes(answer)))
        self.enterCommands(&actions)
        self.advance(&actions)
    }

    /// Refuses the message: first drop the rest of it, then (with `reset`) clear the relay's
    /// envelope, then log and answer.
    mutating func refuse(_ m: Message, _ refusal: Refusal, _ actions: inout [SessionAction]) {
        var m = m
        if !m.ended, !m.scanner.isFinished {
            m.scanner.discardRest()
            self.enter(.draining(m, refusal))
            self.advance(&actions)
            return
        }
        self.afterDrain(refusal, &actions)
    }

    /// Reads and drops the rest of the message up to its end of data. True to go on reading.
    mutating func drain(_ m: Message, _ refusal: Refusal, _ actions: inout [SessionAction]) -> Bool {
        var m = m
        while let event = m.scanner.next(&self.buffer) {
            if case .end = event {
                self.afterDrain(refusal, &actions)
                return self.wantsClientBytes
            }
        }
        self.enter(.draining(m, refusal))
        if self.clientEOF { self.end(&actions) }
        return false
    }

    mutating func afterDrain(_ refusal: Refusal, _ actions: inout [SessionAction]) {
        if refusal.reset, !self.relayAborted {
            actions.append(.sendRelay([Self.line("RSET")], replies: 1))
            actions.append(.waitingForRelay(true))
            self.enter(.resetting(refusal))
            return
        }
        self.answer(refusal, &actions)
    }

    /// The refusal's log line and reply; the session goes on with the next command.
    mutating func answer(_ refusal: Refusal, _ actions: inout [SessionAction]) {
        self.resetTransaction()
        if let record = refusal.record { actions.append(.record(record)) }
        actions.append(.sendClient(Self.bytes(refusal.reply)))
        self.enterCommands(&actions)
        self.advance(&actions)
    }

    // MARK: failures and the end

    mutating func relayLost(_ why: String, _ actions: inout [SessionAction]) {
        // After the machine's own abort, the connection's end is only its echo.
        guard !self.relayAborted else { return }
        self.relayAborted = true
        switch self.state {
        case .closed:
            return
        case .quitting:
            actions.append(.waitingForRelay(false))
            self.close(reusable: false, &actions)
        case .body(var m):
            actions.append(.waitingForRelay(false))
            actions.append(.abortRelay)
            m.record.verdict = .defer
            m.record.reason = "relay connection lost during DATA"
            self.refuse(m, Refusal(reply: Replies.relayLostInData, record: m.record, reset: false), &actions)
        case .final(var m):
            actions.append(.waitingForRelay(false))
            actions.append(.abortRelay)
            m.record.verdict = .defer
            m.record.reason = "relay connection lost at end of data: \(why)"
            if self.clientEOF {
                actions.append(.record(m.record))
                self.close(reusable: false, &actions)
                return
            }
            self.answer(Refusal(reply: Replies.relayLostInData, record: m.record, reset: false), &actions)
        case .resetting(let refusal):
            // The decision stands and is still answered and logged; only QUIT is left after.
            actions.append(.waitingForRelay(false))
            actions.append(.abortRelay)
            self.answer(refusal, &actions)
        case .holdResetting, .holdConnecting, .holdGreeting, .holdEnvelope:
            // The main relay, waiting behind the hold relay: its end is the session's.
            actions.append(.waitingForRelay(false))
            actions.append(.log(.error, "relay failed: \(why)"))
            if self.onHold { self.endHold(abort: true, &actions) }
            actions.append(.sendClient(Self.bytes(Replies.relayLost)))
            self.close(reusable: false, &actions)
        case .headers, .identifying, .deciding, .draining:
            // Noticed when the relay is next needed (or not at all, for a refused message).
            actions.append(.log(.error, "relay failed: \(why)"))
        case .greeting, .commands, .relaying, .greeting2, .dataGo:
            actions.append(.waitingForRelay(false))
            actions.append(.log(.error, "relay failed: \(why)"))
            actions.append(.sendClient(Self.bytes(Replies.relayLost)))
            self.close(reusable: false, &actions)
        }
    }

    /// The session ends where it stands: an open envelope is cleared with RSET first, so the
    /// relay connection can serve another session.
    mutating func end(_ actions: inout [SessionAction]) {
        if self.relayAborted {
            self.close(reusable: false, &actions)
        } else if self.txn.isClear, !self.inMessage {
            self.close(reusable: true, &actions)
        } else {
            actions.append(.sendRelay([Self.line("RSET")], replies: 1))
            actions.append(.waitingForRelay(true))
            self.enter(.quitting)
        }
    }

    var inMessage: Bool {
        switch self.state {
        case .headers, .identifying, .deciding, .draining, .resetting: return true
        default: return false
        }
    }

    mutating func close(reusable: Bool, _ actions: inout [SessionAction]) {
        self.enter(.closed)
        actions.append(.close(relayReusable: reusable && !self.relayAborted))
    }

    mutating func resetTransaction() {
        let generation = self.txn.generation + 1
        self.txn = Transaction()
        self.txn.generation = generation
    }

    /// The one place every state change passes through.
    mutating func enter(_ next: State) {
        if self.tracing, self.state.name != next.name { self.trace.append("\(self.state.name) -> \(next.name)") }
        self.state = next
    }

    // MARK: helpers

    static func append(_ line: String, to buffer: inout ByteBuffer) {
        buffer.writeString(line)
        buffer.writeStaticString("\r\n")
    }

    static func line(_ text: String) -> ByteBuffer {
        var b = ByteBuffer()
        append(text, to: &b)
        return b
    }

    static func write(_ reply: SMTPReply, to buffer: inout ByteBuffer) { reply.write(to: &buffer) }

    static func bytes(_ reply: SMTPReply) -> ByteBuffer {
        var b = ByteBuffer()
        reply.write(to: &b)
        return b
    }
}

extension SMTPCommand {
    var isEHLO: Bool {
        if case .ehlo = self { return true }
        return false
    }
}
