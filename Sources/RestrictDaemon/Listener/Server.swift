// Listeners and the per-connection life: peer check, session limit, relay connection, the
// session itself, and its deadlines. One task per connection, on the connection's event
// loop; a failing connection ends only itself.

import Logging
import LoopExecutor
public import NIOCore
import NIOPosix
public import RestrictPolicy
import SMTPCore

#if canImport(Glibc)
import Glibc
#endif

/// A listening socket. It accepts nothing until a `ConnectionHandler` runs it; then each
/// accepted connection starts its session right where NIO sets the connection up, on the
/// connection's own event loop (no accept loop and async sequence in between).
public final class Listener: Sendable {
    public let channel: any Channel
    fileprivate let box: AcceptorBox

    fileprivate init(channel: any Channel, box: AcceptorBox) {
        self.channel = channel
        self.box = box
    }

    /// Accepts connections until the listener closes. Each connection is a task of its own
    /// on its connection's event loop; connections in progress outlive the listener (a drain
    /// closes it first and waits for them through the registry).
    func serve(_ acceptor: Acceptor, logger: Logger) async {
        self.box.handler.withLock { $0 = acceptor }
        do {
            try await self.channel.setOption(ChannelOptions.autoRead, value: true).get()
            try await self.channel.closeFuture.get()
        } catch {
            logger.debug("listener closed: \(error)")
        }
    }
}

/// What a listener's connections are served by.
enum Acceptor: Sendable {
    /// SMTP from Postfix's content_filter.
    case smtp(ConnectionHandler)
    /// Postfix's access policy client.
    case policy(PolicyConnection)
}

/// Who serves accepted connections: set once by `ConnectionHandler.run` or `PolicyConnection.run`.
fileprivate final class AcceptorBox: Sendable {
    let handler = Mutex<Acceptor?>(nil)

    /// Runs on the new connection's event loop, before it is registered. A connection has no
    /// session until the session takes it over (ClientConnection), so it does not read yet;
    /// the session starts once the connection is active.
    func initialize(_ channel: any Channel) -> EventLoopFuture<Void> {
        channel.eventLoop.makeCompletedFuture {
            try channel.syncOptions?.setOption(ChannelOptions.autoRead, value: false)
            try channel.pipeline.syncOperations.addHandler(SessionStarter(box: self))
        }
    }
}

/// Starts the session when its connection becomes active, then leaves the pipeline.
private final class SessionStarter: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    let box: AcceptorBox

    init(box: AcceptorBox) { self.box = box }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        guard let handler = self.box.handler.withLock({ $0 }) else {
            // The listener only accepts once a handler runs it: not reached.
            context.close(promise: nil)
            return
        }
        let channel = context.channel
        switch handler {
        case .smtp(let smtp):
            Task(executorPreference: LoopExecutor.of(channel.eventLoop)) { await smtp.serve(channel) }
        case .policy(let policy):
            Task(executorPreference: LoopExecutor.of(channel.eventLoop)) { await policy.serve(channel) }
        }
    }
}

public enum ListenerFactory {
    /// Binds a listening socket for `address` (see `ListenSocket.open`) and hands it to NIO.
    public static func bind(_ address: ListenAddress, group: any EventLoopGroup, mode: UInt32, group gid: UInt32?) async throws -> Listener {
        try await adopt(fd: ListenSocket.open(address, mode: mode, group: gid), group: group)
    }

    /// A bound, listening socket: one of ours (`ListenSocket.open`) or one systemd passed us.
    public static func adopt(fd: Int32, group: any EventLoopGroup) async throws -> Listener {
        var type: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &type, &len)
        let box = AcceptorBox()
        var bootstrap = ServerBootstrap(group: group)
            // Not accepting until a ConnectionHandler runs this listener.
            .serverChannelOption(.autoRead, value: false)
            .childChannelInitializer { box.initialize($0) }
            // A message comes in a few reads rather than many small ones.
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 16384, maximum: 65536))
        if type == AF_INET || type == AF_INET6 {
            bootstrap = bootstrap.childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
        }
        let channel = try await bootstrap.withBoundSocket(fd).get()
        return Listener(channel: channel, box: box)
    }
}

/// Client channels in progress, so a drain can answer the stragglers.
final class SessionRegistry: Sendable {
    private let channels = Mutex<[ObjectIdentifier: any Channel]>([:])

    func add(_ channel: any Channel) -> Int {
        self.channels.withLock {
            $0[ObjectIdentifier(channel)] = channel
            return $0.count
        }
    }

    func remove(_ channel: any Channel) {
        self.channels.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(channel)) }
    }

    var count: Int { self.channels.withLock { $0.count } }

    /// Closes every connection still open, saying nothing.
    func closeAll() {
        for channel in self.channels.withLock({ Array($0.values) }) { channel.close(promise: nil) }
    }

    /// Answers every session still open with `reply` and closes it.
    func closeAll(with reply: SMTPReply) {
        let all = self.channels.withLock { Array($0.values) }
        for channel in all {
            var out = ByteBuffer()
            reply.write(to: &out)
            channel.writeAndFlush(out).whenComplete { _ in channel.close(promise: nil) }
        }
    }
}

/// An accepted SMTP connection as the steps of its session see it.
private struct AcceptedClient: Sendable {
    let channel: any Channel
    /// The rules in force when the connection came: the session keeps them to its end.
    let ruleset: Ruleset
    /// The peer's address, for messages.
    let peer: String
    let logger: Logger

    /// Answers `reply` to a client that gets no session.
    func refuse(_ reply: SMTPReply) async throws {
        var out = ByteBuffer()
        reply.write(to: &out)
        try await self.channel.writeAndFlush(out)
    }
}

/// Whether an accepted connection gets a session.
private enum Admission {
    case admitted
    /// The peer left before it could be identified: nothing to answer.
    case gone
    /// Told `reply`, then closed.
    case refused(SMTPReply)
}

public struct ConnectionHandler: Sendable {
    let runtime: Runtime
    let registry: SessionRegistry
    let group: any EventLoopGroup
    let pool: RelayPool
    /// relay_pool is shared out among the event loops (a connection is reused on its own loop).
    let loopCount: Int

    init(runtime: Runtime, registry: SessionRegistry, group: any EventLoopGroup, pool: RelayPool = RelayPool()) {
        self.runtime = runtime
        self.registry = registry
        self.group = group
        self.pool = pool
        self.loopCount = max(1, Array(group.makeIterator()).count)
    }

    /// Serves one accepted connection to its end. Never throws: a connection's failure is its own.
    func serve(_ channel: any Channel) async {
        defer { channel.close(promise: nil) }
        let active = self.registry.add(channel)
        self.runtime.count { $0.sessions = self.registry.count }
        defer {
            self.registry.remove(channel)
            self.runtime.count { $0.sessions = self.registry.count }
        }
        let peer = PeerCredentials.describe(channel.remoteAddress)
        var logger = self.runtime.logger
        logger[metadataKey: LogKey.peer] = .string(peer)
        let client = AcceptedClient(channel: channel, ruleset: self.runtime.ruleset, peer: peer, logger: logger)
        do {
            switch await self.admission(client, active: active) {
            case .admitted: break
            case .gone: return
            case .refused(let reply):
                try await client.refuse(reply)
                return
            }
            let clock = SessionClock(idle: .seconds(client.ruleset.settings.idleTimeout))
            guard let relay = try await self.checkoutRelay(client) else { return }
            try await self.runSession(client, relay: relay, clock: clock)
        } catch {
            logger.debug("session with \(peer) ended: \(error)")
        }
    }

    /// Whether the connection gets a session: the peer check, then max_sessions (`active`
    /// counts this connection), then a drain in progress.
    private func admission(_ client: AcceptedClient, active: Int) async -> Admission {
        let configuration = client.ruleset.configuration
        // The peer check comes first: nothing else is said to a stranger.
        if configuration.peerCheck {
            switch await PeerGate.check(
                client.channel, clients: client.ruleset.clients, runtime: self.runtime, peer: client.peer, label: "connect",
                logger: client.logger)
            {
            case .admitted: break
            case .gone: return .gone
            // A local failure: refuse as a temporary condition, so Postfix retries.
            case .failed: return .refused(Replies.peerUnverified)
            case .unknown: return .refused(Replies.peerUnknown)
            case .notClient(let uid): return .refused(Replies.notClient(uid: uid))
            }
        }
        if active > configuration.value(.maxSessions) {
            client.logger.warning("connect from \(client.peer) refused: \(active - 1) sessions already (max_sessions)")
            return .refused(Replies.tooManySessions)
        }
        if self.runtime.isDraining { return .refused(Replies.shuttingDown) }
        return .admitted
    }

    /// A connection to the relay, from the pool or new; nil once the client has been told
    /// the relay is unavailable.
    private func checkoutRelay(_ client: AcceptedClient) async throws -> RelayConnection? {
        let settings = client.ruleset.settings
        do {
            guard let address = client.ruleset.relayAddress else {
                throw SystemError("cannot resolve \(settings.relayHost)", errno: 0)
            }
            return try await self.pool.checkout(
                on: client.channel.eventLoop, address: address, timeout: .seconds(settings.relayConnectTimeout),
                greetingTimeout: .seconds(settings.relayTimeout))
        } catch {
            client.logger.error("cannot connect to relay \(settings.relayHost):\(settings.relayPort): \(error)")
            try await client.refuse(Replies.relayUnavailable)
            return nil
        }
    }

    /// Runs the session to its end, then returns the relay connection to the pool when the
    /// session left it reusable, or closes it.
    private func runSession(_ client: AcceptedClient, relay: RelayConnection, clock: SessionClock) async throws {
        clock.relay(relay.channel)
        let (timer, done) = try await self.startSession(client, relay: relay, clock: clock)
        defer { timer.cancel() }
        let reusable: Bool
        do {
            reusable = try await done.get()
        } catch {
            relay.abort()
            throw error
        }
        // The session's timer must not touch the connection once another session may
        // have it.
        timer.cancel()
        clock.relay(nil)
        let capacity = (client.ruleset.configuration.value(.relayPool) + self.loopCount - 1) / self.loopCount
        if reusable, capacity > 0, clock.expired == nil, !self.runtime.isDraining {
            await self.pool.checkin(relay, capacity: capacity)
        } else {
            relay.abort()
        }
    }

    /// Starts the session's driver and its deadline timer on the connection's loop. From
    /// then on the session runs as events on that loop; the future says, at its end, whether
    /// the relay connection can serve another session.
    private func startSession(
        _ client: AcceptedClient, relay: RelayConnection, clock: SessionClock
    ) async throws -> (RepeatedTask, EventLoopFuture<Bool>) {
        let channel = client.channel
        let settings = client.ruleset.settings
        return try await channel.eventLoop.submit {
            let driver = SessionDriver(
                runtime: self.runtime, ruleset: client.ruleset, logger: client.logger, client: channel, relay: relay, clock: clock)
            let shortest = min(settings.idleTimeout, settings.commandTimeout, settings.dataTimeout, settings.relayTimeout)
            let bound = NIOLoopBound(driver, eventLoop: channel.eventLoop)
            let timer = self.startTimer(clock: clock, channel: channel, shortest: shortest, logger: client.logger) { why in
                bound.value.timedOut(why)
            }
            do {
                try driver.start()
            } catch {
                // The client left before the session could start: nothing holds the
                // relay connection or the timer but this, and the driver's promise
                // must be completed before the driver goes.
                timer.cancel()
                driver.abandon(error)
                relay.abort()
                throw error
            }
            return (timer, driver.done.futureResult)
        }.get()
    }

    /// Checks the session's deadlines every tick: a client deadline goes to `expired` (the
    /// session answers 421 and closes), the relay's closes the relay connection.
    private func startTimer(
        clock: SessionClock, channel: any Channel, shortest: Int64, logger: Logger, expired: @escaping @Sendable (String) -> Void
    ) -> RepeatedTask {
        // A quarter of the shortest timeout, between 100 ms and 1 s: late by at most that.
        let tick: TimeAmount = .milliseconds(max(100, min(1000, shortest * 250)))
        return channel.eventLoop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { task in
            guard let (expiry, relay) = clock.check(now: .now()) else { return }
            switch expiry {
            case .client(let why):
                expired(why)
                task.cancel()
            case .relay:
                logger.error("relay did not answer within relay_timeout; closing the relay connection")
                relay?.close(promise: nil)
            }
        }
    }

    /// Accepts connections on one listener until it closes. Each session is a task of its
    /// own on its connection's event loop; sessions in progress outlive the listener (a drain
    /// closes it first and waits for them through the registry).
    public func run(_ listener: Listener) async {
        await listener.serve(.smtp(self), logger: self.runtime.logger)
    }
}

/// The peer check of every listener (design decision 9): only the users in `clients` may talk
/// to restrictpd. Logs each refusal; a stranger's is a warning (an intrusion alarm).
enum PeerGate {
    enum Outcome {
        case admitted
        /// The peer left before it could be identified.
        case gone
        /// A local failure (out of file descriptors, netlink unavailable).
        case failed
        /// The kernel knows no such socket.
        case unknown
        case notClient(UInt32)
    }

    static func check(
        _ channel: any Channel, clients: Set<UInt32>, runtime: Runtime, peer: String, label: String, logger: Logger
    ) async -> Outcome {
        let uid: UInt32
        do {
            uid = try await PeerCredentials.uid(of: channel)
        } catch where !channel.isActive {
            logger.info("\(label) from \(peer): gone before it could be identified")
            return .gone
        } catch PeerLookupError.notFound {
            // No established socket at the other end: the peer has already closed (a port
            // probe, a health check). Whoever is still connected is always found.
            logger.info("\(label) from \(peer): gone before it could be identified")
            return .gone
        } catch PeerLookupError.failed(let why) {
            logger.error("\(label) from \(peer) refused: cannot learn the peer's uid: \(why)")
            return .failed
        } catch {
            runtime.count { $0.peersRefused += 1 }
            logger.warning("\(label) from \(peer) refused: cannot learn the peer's uid: \(error)")
            return .unknown
        }
        guard clients.contains(uid) else {
            runtime.count { $0.peersRefused += 1 }
            let name = await runtime.userNames.name(uid) ?? "unknown"
            logger.warning(
                "\(label) from \(peer) uid=\(uid) user=\(name) refused: not in clients",
                metadata: [LogKey.peerUID: .string(String(uid))])
            return .notClient(uid)
        }
        return .admitted
    }

    /// For listeners that cannot answer a refusal in their protocol: admitted or not.
    static func admit(_ channel: any Channel, clients: Set<UInt32>, runtime: Runtime, peer: String, service: String, logger: Logger) async -> Bool {
        if case .admitted = await check(channel, clients: clients, runtime: runtime, peer: peer, label: "\(service) connect", logger: logger) {
            return true
        }
        return false
    }
}
