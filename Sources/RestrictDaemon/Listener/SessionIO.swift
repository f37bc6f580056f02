// The two byte streams of a session: the client (Postfix's smtp client, or whoever connected)
// and the relay (Postfix's smtpd on 10026). Reads are bounded by the framers and the scanner;
// nothing here buffers more than one read plus one incomplete line.

import NIOCore
import SMTPCore

enum RelayFailure: Error, CustomStringConvertible {
    case closed
    case protocolError(String)

    var description: String {
        switch self {
        case .closed: return "relay closed the connection"
        case .protocolError(let s): return "relay protocol error: \(s)"
        }
    }
}

/// Deadlines of one session, checked by a timer on the client's event loop (see Session).
final class SessionClock: Sendable {
    struct State {
        var lastActivity = NIODeadline.now()
        var phase = "command"
        var phaseDeadline: NIODeadline? = nil
        /// A phase whose deadline starts with the client's next bytes (a command: silence
        /// before it is idle_timeout's business, not command_timeout's).
        var pendingPhaseTimeout: TimeAmount? = nil
        var relayDeadline: NIODeadline? = nil
        var relayWaitStart: NIODeadline? = nil
        var relayChannel: (any Channel)? = nil
        var expired: String? = nil
    }
    enum Expiry { case client(String), relay }

    let state = Mutex(State())
    let idle: TimeAmount

    init(idle: TimeAmount) { self.idle = idle }

    func touch() { self.state.withLock { $0.lastActivity = .now() } }

    /// Bytes from the client: activity, and the start of a pending phase deadline.
    func clientBytes() {
        self.state.withLock { s in
            let now = NIODeadline.now()
            s.lastActivity = now
            if let pending = s.pendingPhaseTimeout {
                s.phaseDeadline = now + pending
                s.pendingPhaseTimeout = nil
            }
        }
    }

    /// A new phase whose deadline runs from now (DATA) or, with `fromFirstByte`, from the
    /// client's next bytes (a command).
    func phase(_ name: String, timeout: TimeAmount, fromFirstByte: Bool = false) {
        self.state.withLock {
            $0.phase = name
            $0.phaseDeadline = fromFirstByte ? nil : .now() + timeout
            $0.pendingPhaseTimeout = fromFirstByte ? timeout : nil
        }
    }

    /// While the session waits for the relay (bounded by relay_timeout), the client's idle and
    /// phase deadlines stand still: the client is waiting for us, not idling.
    func waitingForRelay(_ timeout: TimeAmount?) {
        self.state.withLock { s in
            let now = NIODeadline.now()
            s.relayDeadline = timeout.map { now + $0 }
            if timeout != nil {
                s.relayWaitStart = now
            } else if let start = s.relayWaitStart {
                s.relayWaitStart = nil
                s.phaseDeadline = s.phaseDeadline.map { $0 + (now - start) }
                s.lastActivity = max(s.lastActivity, now)
            }
        }
    }

    func relay(_ channel: (any Channel)?) { self.state.withLock { $0.relayChannel = channel } }

    var expired: String? { self.state.withLock { $0.expired } }

    /// What has run out, once.
    func check(now: NIODeadline) -> (Expiry, (any Channel)?)? {
        self.state.withLock { s in
            guard s.expired == nil else { return nil }
            if s.relayWaitStart == nil, now - s.lastActivity > self.idle {
                s.expired = "idle for \(self.idle.nanoseconds / 1_000_000_000)s in \(s.phase)"
                return (.client(s.expired ?? ""), s.relayChannel)
            }
            if s.relayWaitStart == nil, let d = s.phaseDeadline, now > d {
                s.expired = "\(s.phase) took too long"
                return (.client(s.expired ?? ""), s.relayChannel)
            }
            if let d = s.relayDeadline, now > d {
                s.relayDeadline = nil
                return (.relay, s.relayChannel)
            }
            return nil
        }
    }
}

struct ClientIO {
    let connection: ClientConnection
    var buffer = ByteBuffer()
    var framer: LineFramer
    let clock: SessionClock

    enum Line {
        case line(ByteBuffer)
        case error(LineError)
        case eof
    }

    /// Reads one more chunk from the client. False at end of stream.
    mutating func fill() async throws -> Bool {
        guard var chunk = try await self.connection.read() else { return false }
        self.clock.clientBytes()
        if self.buffer.readableBytes == 0 {
            self.buffer = chunk
        } else {
            if self.buffer.readerIndex > 65536 { self.buffer.discardReadBytes() }
            self.buffer.writeBuffer(&chunk)
        }
        return true
    }

    /// The next command line; with `wait` false, nil when no complete line is buffered.
    mutating func nextLine(wait: Bool) async throws -> Line? {
        while true {
            do {
                if let line = try self.framer.next(&self.buffer) { return .line(line) }
            } catch {
                return .error(error)
            }
            if !wait { return nil }
            if try await !self.fill() { return .eof }
        }
    }

    /// The next DATA event, reading as needed; nil when the client went away.
    mutating func dataEvent(_ scanner: inout DataScanner, oneLine: Bool) async throws -> DataEvent? {
        while true {
            if let event = scanner.next(&self.buffer, oneLine: oneLine) { return event }
            if try await !self.fill() { return nil }
        }
    }

    func send(_ reply: SMTPReply) async throws {
        var out = ByteBuffer()
        reply.write(to: &out)
        try await self.connection.write(out)
    }

    func send(_ buffer: ByteBuffer) async throws {
        guard buffer.readableBytes > 0 else { return }
        try await self.connection.write(buffer)
    }
}

struct RelayIO {
    let connection: RelayConnection
    let clock: SessionClock
    let timeout: TimeAmount

    /// The next reply; the wait counts against relay_timeout, not against the client.
    func reply() async throws -> SMTPReply {
        self.clock.waitingForRelay(self.timeout)
        defer { self.clock.waitingForRelay(nil) }
        do {
            let reply = try await self.connection.reply()
            // The relay making progress is not the client idling.
            self.clock.touch()
            return reply
        } catch let failure as RelayFailure {
            throw failure
        } catch {
            throw RelayFailure.closed
        }
    }

    /// RSET, sent by restrictpd itself to clear the relay's envelope; counted towards the
    /// connection's retirement (see RelayConnection.wear). Returns the relay's reply.
    func reset() async throws -> SMTPReply {
        self.connection.wear.withLock { $0.resets += 1 }
        try await self.send("RSET")
        return try await self.reply()
    }

    func send(_ line: String) async throws {
        var out = ByteBuffer()
        out.reserveCapacity(line.utf8.count + 2)
        out.writeString(line)
        out.writeStaticString("\r\n")
        try await self.connection.send([out], replies: 1)
    }

    /// `replies`: how many replies these bytes ask for.
    func send(_ buffer: ByteBuffer, replies: Int) async throws {
        try await self.connection.send([buffer], replies: replies)
    }

    func send(contentsOf buffers: [ByteBuffer], replies: Int) async throws {
        try await self.connection.send(buffers, replies: replies)
    }

    /// Drops the connection without an end of data: the relay discards the message.
    func abort() {
        self.connection.abort()
    }
}
