// The connection to the relay (Postfix's smtpd on 10026), and a small pool of them.
//
// A relay connection outlives one client session: Postfix's content filter opens a connection
// per message, and a fresh relay connection for each would cost a TCP handshake, a greeting,
// an EHLO and a QUIT more per message. A connection goes back to the pool only in a known
// state (every command answered, no transaction open), and is used again only on the same
// event loop and while the relay has said nothing unasked. Idle connections are closed after
// a few seconds, well inside the relay's own idle timeout.
//
// Trusts the relay to speak SMTP, but reads its replies bounded (ReplyParser) and never
// queues more replies than commands were sent.

import NIOCore
import NIOPosix
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

/// What a session's driver hears from its relay connection.
enum RelayEvent {
    case reply(SMTPReply)
    case failed(RelayFailure)
    /// The socket takes data again.
    case writable
}

/// Parses the relay's replies and hands them out one at a time (the greeting), or to the
/// attached session's sink as they come. Event-loop confined.
final class RelayHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private var buffer = ByteBuffer()
    private var parser = ReplyParser()
    private var ready = CircularBuffer<SMTPReply>()
    private var waiting: EventLoopPromise<SMTPReply>?
    private(set) var failure: RelayFailure?
    /// Replies the relay may still owe: anything beyond is unasked for.
    var outstanding = 0
    /// The session driving this connection now, if any: replies and failures go there.
    var sink: ((RelayEvent) -> Void)?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var chunk = self.unwrapInboundIn(data)
        if self.buffer.readableBytes == 0 {
            self.buffer = chunk
        } else {
            self.buffer.writeBuffer(&chunk)
        }
        do {
            while let reply = try self.parser.next(&self.buffer) {
                if let sink = self.sink {
                    self.outstanding = max(0, self.outstanding - 1)
                    sink(.reply(reply))
                } else if let waiting = self.waiting {
                    self.waiting = nil
                    waiting.succeed(reply)
                } else {
                    guard self.ready.count < 1024 else { throw RelayFailure.protocolError("too many unsolicited replies") }
                    self.ready.append(reply)
                }
            }
        } catch {
            self.fail(error as? RelayFailure ?? .protocolError("\(error)"))
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.fail(.closed)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.fail(.closed)
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { self.sink?(.writable) }
        context.fireChannelWritabilityChanged()
    }

    private func fail(_ failure: RelayFailure) {
        guard self.failure == nil else { return }
        self.failure = failure
        self.waiting?.fail(failure)
        self.waiting = nil
        self.sink?(.failed(failure))
    }

    /// A reply already received, if any.
    func take() -> SMTPReply? { self.ready.popFirst() }

    func nextReply(_ eventLoop: any EventLoop) -> EventLoopFuture<SMTPReply> {
        if let reply = self.ready.popFirst() { return eventLoop.makeSucceededFuture(reply) }
        if let failure = self.failure { return eventLoop.makeFailedFuture(failure) }
        precondition(self.waiting == nil, "two readers of one relay connection")
        let promise = eventLoop.makePromise(of: SMTPReply.self)
        self.waiting = promise
        return promise.futureResult
    }

    /// Nothing unread, nothing failed, nothing owed: safe to lend to another session.
    var isIdle: Bool { self.failure == nil && self.ready.isEmpty && self.waiting == nil && self.outstanding == 0 }
}

/// One connection to the relay, with the greeting and EHLO reply it got.
final class RelayConnection: Sendable {
    let channel: any Channel
    let handler: NIOLoopBound<RelayHandler>
    let greeting: SMTPReply
    /// The last HELO/EHLO sent on this connection and the relay's reply to it.
    let hello = Mutex<(command: SMTPCommand, reply: SMTPReply)?>(nil)
    /// Sessions served and RSETs sent. Postfix's smtpd counts RSET as a "junk" command and
    /// forgives only after a message it received, so a run of refused messages on one
    /// connection would end in smtpd's error sleep and a 421: connections retire first.
    let wear = Mutex<(sessions: Int, resets: Int)>((0, 0))
    static let maxSessions = 100
    static let maxResets = 20

    private init(channel: any Channel, handler: NIOLoopBound<RelayHandler>, greeting: SMTPReply) {
        self.channel = channel
        self.handler = handler
        self.greeting = greeting
    }

    /// Connects and reads the greeting.
    static func connect(
        to address: SocketAddress, on eventLoop: any EventLoop, timeout: TimeAmount, greetingTimeout: TimeAmount
    ) async throws -> RelayConnection {
        let channel = try await ClientBootstrap(group: eventLoop)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .connectTimeout(timeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(RelayHandler()) }
            }
            .connect(to: address).get()
        let handler = try await channel.eventLoop.submit {
            NIOLoopBound(try channel.pipeline.syncOperations.handler(type: RelayHandler.self), eventLoop: channel.eventLoop)
        }.get()
        // A relay that accepts but never greets (all its processes busy) must not hold the
        // session forever: close it after `greetingTimeout`, and the wait below fails.
        let deadline = channel.eventLoop.scheduleTask(in: greetingTimeout) { channel.close(promise: nil) }
        defer { deadline.cancel() }
        let greeting = try await Self.next(channel: channel, handler: handler)
        return RelayConnection(channel: channel, handler: handler, greeting: greeting)
    }

    static func next(channel: any Channel, handler: NIOLoopBound<RelayHandler>) async throws -> SMTPReply {
        let el = channel.eventLoop
        if el.inEventLoop { return try await handler.value.nextReply(el).get() }
        return try await el.flatSubmit { handler.value.nextReply(el) }.get()
    }

    var isIdle: Bool {
        get async {
            guard self.channel.isActive else { return false }
            if self.channel.eventLoop.inEventLoop { return self.handler.value.isIdle }
            let handler = self.handler
            return (try? await self.channel.eventLoop.submit { handler.value.isIdle }.get()) ?? false
        }
    }

    /// Hands the connection's replies and failures to `sink` (a session's driver, on this
    /// connection's event loop) until `detach`.
    func attach(_ sink: @escaping (RelayEvent) -> Void) {
        self.channel.eventLoop.preconditionInEventLoop()
        let handler = self.handler.value
        handler.sink = sink
        while let ready = handler.take() {
            handler.outstanding = max(0, handler.outstanding - 1)
            sink(.reply(ready))
        }
        if let failure = handler.failure { sink(.failed(failure)) }
    }

    func detach() {
        self.handler.value.sink = nil
    }

    /// Writes without flushing (the driver flushes once per event); `replies` is how many
    /// replies these bytes ask for. A failed write closes the connection, which the sink hears.
    func write(_ buffers: [ByteBuffer], replies: Int) {
        self.handler.value.outstanding += replies
        for buffer in buffers { self.channel.write(buffer, promise: nil) }
    }

    /// Says goodbye and closes (an idle connection leaving the pool).
    func quit() {
        var out = ByteBuffer()
        out.writeStaticString("QUIT\r\n")
        let channel = self.channel
        channel.writeAndFlush(out).whenComplete { _ in channel.close(promise: nil) }
    }

    /// Drops the connection at once: a message in progress is discarded by the relay.
    func abort() {
        self.channel.close(mode: .all, promise: nil)
    }
}

/// Idle relay connections, by event loop.
final class RelayPool: Sendable {
    static let idleTime: TimeAmount = .seconds(5)
    /// How often an event loop with idle connections looks for expired ones: an idle
    /// connection lives between idleTime and idleTime + sweepInterval.
    static let sweepInterval: TimeAmount = .seconds(1)

    private struct Idle {
        let connection: RelayConnection
        let since: NIODeadline
    }
    private struct State {
        var connections: [ObjectIdentifier: [Idle]] = [:]
        /// Event loops with a sweep scheduled (one per loop, not one per connection).
        var sweeping: Set<ObjectIdentifier> = []
        var closed = false
    }
    private let state = Mutex(State())

    /// An idle connection on `eventLoop` to `address`, or a new one.
    func checkout(
        on eventLoop: any EventLoop, address: SocketAddress, timeout: TimeAmount, greetingTimeout: TimeAmount
    ) async throws -> RelayConnection {
        let key = ObjectIdentifier(eventLoop)
        while let candidate = self.state.withLock({ state -> RelayConnection? in
            // The most recently used first: the oldest are left to expire.
            guard var list = state.connections[key], let last = list.popLast() else { return nil }
            state.connections[key] = list
            return last.connection
        }) {
            if candidate.channel.remoteAddress == address, await candidate.isIdle { return candidate }
            candidate.quit()
        }
        return try await RelayConnection.connect(to: address, on: eventLoop, timeout: timeout, greetingTimeout: greetingTimeout)
    }

    /// Takes back a connection whose session left it with nothing open; closes it otherwise.
    /// `capacity`: idle connections kept on this connection's event loop (relay_pool, shared
    /// out among the loops: each idle connection holds one of the relay's smtpd processes).
    func checkin(_ connection: RelayConnection, capacity: Int) async {
        let wear = connection.wear.withLock { w -> (Int, Int) in
            w.sessions += 1
            return (w.sessions, w.resets)
        }
        guard wear.0 < RelayConnection.maxSessions, wear.1 < RelayConnection.maxResets else {
            connection.quit()
            return
        }
        guard await connection.isIdle else {
            connection.abort()
            return
        }
        let eventLoop = connection.channel.eventLoop
        let key = ObjectIdentifier(eventLoop)
        let (accepted, startSweep) = self.state.withLock { state -> (Bool, Bool) in
            guard !state.closed, (state.connections[key]?.count ?? 0) < capacity else { return (false, false) }
            state.connections[key, default: []].append(Idle(connection: connection, since: .now()))
            return (true, state.sweeping.insert(key).inserted)
        }
        guard accepted else {
            connection.quit()
            return
        }
        if startSweep { self.scheduleSweep(on: eventLoop) }
    }

    /// Closes the connections of `eventLoop` idle for idleTime or more; runs again while any
    /// are left.
    private func scheduleSweep(on eventLoop: any EventLoop) {
        let key = ObjectIdentifier(eventLoop)
        eventLoop.scheduleTask(in: Self.sweepInterval) {
            let now = NIODeadline.now()
            let (expired, again) = self.state.withLock { state -> ([RelayConnection], Bool) in
                let list = state.connections[key] ?? []
                let expired = list.filter { now - $0.since >= Self.idleTime }.map(\.connection)
                let kept = list.filter { now - $0.since < Self.idleTime }
                state.connections[key] = kept
                let again = !kept.isEmpty && !state.closed
                if !again { state.sweeping.remove(key) }
                return (expired, again)
            }
            expired.forEach { $0.quit() }
            if again { self.scheduleSweep(on: eventLoop) }
        }
    }

    /// Closes every idle connection and takes no more (shutdown).
    func closeAll() {
        let all = self.state.withLock { state -> [RelayConnection] in
            state.closed = true
            let all = state.connections.values.flatMap { $0.map(\.connection) }
            state.connections = [:]
            return all
        }
        all.forEach { $0.quit() }
    }
}
