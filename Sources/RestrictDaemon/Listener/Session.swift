// One client connection: SMTP from Postfix's content_filter in, SMTP to the relay out.
//
// Trusts: nothing from the client (a local user may have connected, if the peer check is off
// or was passed by the postfix user itself); the relay's replies are bounded and parsed, and
// passed on. Envelope commands are relayed as restrictpd re-encodes them; the message is held
// until its header section ends (header_limit), decided on, and then streamed with
// back-pressure. The client learns the end-of-data reply only from the relay (or a refusal),
// so nothing is acknowledged that the relay did not accept (design decisions 4 to 8).

import Logging
import NIOCore
import NIOPosix
import RestrictPolicy
import SMTPCore

struct Session {
    let runtime: Runtime
    let ruleset: Ruleset
    var logger: Logger
    var settings: SessionSettings { self.ruleset.settings }

    struct Transaction {
        enum Mail { case none, pending, accepted(Mailbox?) }
        var mail: Mail = .none
        var pendingRecipients = 0
        var recipients: [Mailbox] = []
        var generation = 0
    }
    var txn = Transaction()
    var relayAborted = false
    var warnedLongLine = false

    init(runtime: Runtime, ruleset: Ruleset, logger: Logger) {
        self.runtime = runtime
        self.ruleset = ruleset
        self.logger = logger
    }

    private enum Step {
        case local(SMTPReply)
        case mail(Mailbox?, generation: Int)
        case rcpt(Mailbox, generation: Int)
        case rset
    }

    private enum Terminal {
        case data
        case quit
        case hello(SMTPCommand)
        case hangup(SMTPReply)
        case eof
    }

    /// Runs the SMTP dialogue until QUIT, an error, or the client leaving. Returns true when
    /// the relay connection is left with no transaction open and may serve another session.
    mutating func converse(client: inout ClientIO, relay: inout RelayIO) async throws -> Bool {
        let greeting = relay.connection.greeting
        guard greeting.code == 220 else {
            self.logger.error("relay refused the connection: \(LogText.escape(greeting.description))")
            try await client.send(Replies.relayUnavailable)
            return false
        }
        try await client.send(greeting)

        do {
            while try await self.batch(client: &client, relay: &relay) {}
        } catch let failure as RelayFailure {
            self.logger.error("relay failed: \(failure)")
            try? await client.send(Replies.relayLost)
            return false
        }
        if self.relayAborted { return false }
        if case .none = self.txn.mail, self.txn.pendingRecipients == 0 { return true }
        // The client left in the middle of an envelope: clear it before lending the connection.
        do {
            return try await relay.reset().isPositive
        } catch {
            return false
        }
    }

    /// Reads every command the client pipelined (up to a terminal command), relays the
    /// envelope commands in one write, and answers them in order. False when the session ends.
    private mutating func batch(client: inout ClientIO, relay: inout RelayIO) async throws -> Bool {
        var steps: [Step] = []
        var relayOut = ByteBuffer()
        var terminal: Terminal? = nil
        var wait = true
        client.clock.phase("command", timeout: .seconds(self.settings.commandTimeout), fromFirstByte: true)

        while terminal == nil, steps.count < 1024 {
            guard let item = try await client.nextLine(wait: wait) else { break }
            wait = false
            switch item {
            case .eof:
                terminal = .eof
            case .error(.tooLong(let limit)):
                // Once per session: a client repeating it must not flood the log.
                if !self.warnedLongLine {
                    self.logger.warning("command line longer than \(limit) bytes from client")
                    self.warnedLongLine = true
                }
                steps.append(.local(Replies.lineTooLong))
            case .error(.bareLF), .error(.bareCR):
                self.logger.warning("bare <CR> or <LF> in a command line from client: closing")
                terminal = .hangup(Replies.bareNewline)
            case .line(let line):
                let command: SMTPCommand
                do {
                    command = try CommandParser.parse(line.readableBytesView, sizeLimit: self.settings.limits.messageSize)
                } catch {
                    steps.append(.local(error.reply))
                    continue
                }
                if self.relayAborted {
                    // The relay connection went with the aborted message; only QUIT is left.
                    terminal = command == .quit ? .quit : .hangup(Replies.afterAbort)
                    continue
                }
                switch command {
                case .ehlo, .helo:
                    terminal = .hello(command)
                case .mail(let sender, _):
                    if self.runtime.isDraining {
                        terminal = .hangup(Replies.shuttingDown)
                        continue
                    }
                    guard case .none = self.txn.mail else {
                        steps.append(.local(Replies.nestedMail))
                        continue
                    }
                    self.txn.mail = .pending
                    append(command.wireLine, to: &relayOut)
                    steps.append(.mail(sender, generation: self.txn.generation))
                case .rcpt(let path, _):
                    if case .none = self.txn.mail {
                        steps.append(.local(Replies.needMail))
                        continue
                    }
                    guard self.txn.recipients.count + self.txn.pendingRecipients < self.settings.limits.recipients else {
                        steps.append(.local(Replies.tooManyRecipients))
                        continue
                    }
                    self.txn.pendingRecipients += 1
                    append(command.wireLine, to: &relayOut)
                    steps.append(.rcpt(path, generation: self.txn.generation))
                case .rset:
                    self.resetTransaction()
                    append("RSET", to: &relayOut)
                    steps.append(.rset)
                case .noop:
                    steps.append(.local(Replies.ok))
                case .data:
                    terminal = .data
                case .quit:
                    terminal = .quit
                case .disabled:
                    steps.append(.local(Replies.notImplemented))
                case .unknown:
                    steps.append(.local(Replies.notRecognized))
                }
            }
        }

        let relayed = steps.reduce(0) { n, step in if case .local = step { return n } else { return n + 1 } }
        if relayOut.readableBytes > 0 { try await relay.send(relayOut, replies: relayed) }
        var out = ByteBuffer()
        for step in steps {
            switch step {
            case .local(let reply):
                reply.write(to: &out)
            case .mail(let sender, let generation):
                let reply = try await relay.reply()
                if generation == self.txn.generation, case .pending = self.txn.mail {
                    self.txn.mail = reply.isPositive ? .accepted(sender) : .none
                }
                reply.write(to: &out)
            case .rcpt(let path, let generation):
                let reply = try await relay.reply()
                if generation == self.txn.generation {
                    self.txn.pendingRecipients -= 1
                    if reply.isPositive { self.txn.recipients.append(path) }
                }
                reply.write(to: &out)
            case .rset:
                try await relay.reply().write(to: &out)
            }
        }

        switch terminal {
        case nil:
            try await client.send(out)
            return true
        case .eof:
            try await client.send(out)
            return false
        case .hangup(let reply):
            reply.write(to: &out)
            try await client.send(out)
            return false
        case .quit:
            // The relay connection stays open for the next session (RelayPool).
            Replies.bye.write(to: &out)
            try await client.send(out)
            return false
        case .hello(let command):
            let reply: SMTPReply
            if case .none = self.txn.mail, self.txn.pendingRecipients == 0,
                let cached = relay.connection.hello.withLock({ $0 }), cached.command == command
            {
                // A pooled connection already greeted the relay with this very command, and no
                // transaction is open: the relay's answer would be the same.
                reply = cached.reply
            } else {
                try await relay.send(command.wireLine)
                reply = try await relay.reply()
                relay.connection.hello.withLock { $0 = reply.isPositive ? (command, reply) : nil }
            }
            // Postfix's smtpd resets its transaction only when it accepts the greeting.
            if reply.isPositive { self.resetTransaction() }
            if case .ehlo = command {
                EHLOFilter.filter(reply, sizeLimit: self.settings.limits.messageSize).write(to: &out)
            } else {
                reply.write(to: &out)
            }
            try await client.send(out)
            return true
        case .data:
            return try await self.data(client: &client, relay: &relay, out: &out)
        }
    }

    mutating func resetTransaction() {
        let generation = self.txn.generation + 1
        self.txn = Transaction()
        self.txn.generation = generation
    }

    func append(_ line: String, to buffer: inout ByteBuffer) {
        buffer.writeString(line)
        buffer.writeStaticString("\r\n")
    }
}
