// The thin NIO side of a session: feeds the ProxySession machine its events (client bytes,
// relay replies and failures, the verdict, deadlines) and carries out its actions, all on the
// connection's event loop. Writes are coalesced: each event's writes go out with one flush per
// side. Back-pressure: the client is read only while the machine wants its bytes and the relay
// takes what it is given, so at most one read's worth waits in memory, however fast the client
// writes and however slow the relay is.

import Logging
import NIOCore
import ProxySession
import RestrictPolicy
import SMTPCore

/// Event-loop confined. Lives from the relay's greeting to the machine's `close`.
final class SessionDriver {
    let runtime: Runtime
    let ruleset: Ruleset
    let logger: Logger
    let client: any Channel
    let relay: RelayConnection
    let clock: SessionClock
    private var machine: ProxySession
    /// Succeeds with "the relay connection may serve another session" when the session ends.
    let done: EventLoopPromise<Bool>
    private var clientContext: ChannelHandlerContext?
    /// A read the client channel asked for and the driver held back.
    private var heldRead = false
    private var clientFlush = false
    private var relayFlush = false
    private var finished = false

    init(runtime: Runtime, ruleset: Ruleset, logger: Logger, client: any Channel, relay: RelayConnection, clock: SessionClock) {
        self.runtime = runtime
        self.ruleset = ruleset
        self.logger = logger
        self.client = client
        self.relay = relay
        self.clock = clock
        self.machine = ProxySession(limits: ruleset.settings.limits, hello: relay.hello.withLock { $0 })
        self.machine.tracing = logger.logLevel <= .debug
        self.done = client.eventLoop.makePromise(of: Bool.self)
    }

    /// Installs the client handler and the relay's event sink, and starts the dialogue.
    func start() throws {
        try self.client.pipeline.syncOperations.addHandler(SessionClientHandler(driver: self))
        self.relay.attach { [weak self] event in self?.relayEvent(event) }
        self.feed(self.machine.relayGreeted(self.relay.greeting))
        try self.client.syncOptions?.setOption(ChannelOptions.autoRead, value: true)
    }

    // MARK: events in

    fileprivate func clientBytes(_ bytes: ByteBuffer) {
        self.clock.clientBytes()
        self.machine.shuttingDown = self.runtime.isDraining
        self.feed(self.machine.clientSent(bytes))
    }

    fileprivate func clientEnded() { self.feed(self.machine.clientClosed()) }

    private func relayEvent(_ event: RelayEvent) {
        switch event {
        case .reply(let reply):
            // The relay making progress is not the client idling.
            self.clock.touch()
            self.feed(self.machine.relayReplied(reply))
        case .failed(let failure):
            self.feed(self.machine.relayFailed("\(failure)"))
        case .writable:
            self.updateReading()
        }
    }

    /// A client deadline ran out (the session's timer, on this loop).
    func timedOut(_ why: String) { self.feed(self.machine.timedOut(why)) }

    // MARK: actions out

    private func feed(_ actions: [SessionAction]) {
        var queue = actions[...]
        while let action = queue.popFirst() {
            queue.append(contentsOf: self.perform(action))
        }
        if self.clientFlush {
            self.clientFlush = false
            self.client.flush()
        }
        if self.relayFlush {
            self.relayFlush = false
            self.relay.channel.flush()
        }
        self.updateReading()
    }

    /// Carries out one action; returns the machine's next actions when the action could be
    /// answered at once (a cached user name, a verdict that needs no store).
    private func perform(_ action: SessionAction) -> [SessionAction] {
        switch action {
        case .sendClient(let bytes):
            self.client.write(bytes, promise: nil)
            self.clientFlush = true
        case .sendRelay(let buffers, let replies):
            self.relay.write(buffers, replies: replies)
            self.relayFlush = true
        case .rememberHello(let command, let reply):
            self.relay.hello.withLock { $0 = reply.isPositive ? (command, reply) : nil }
        case .identify(let uid):
            if let cached = self.runtime.userNames.cached(uid) { return self.machine.identified(user: cached) }
            self.later { await $0.runtime.userNames.name(uid) } then: { $0.machine.identified(user: $1) }
        case .decide(let sender, let recipients):
            return self.decide(sender, recipients)
        case .abortRelay:
            self.relay.abort()
        case .record(let record):
            self.record(record)
        case .log(let level, let message):
            self.logger.log(level: level.logging, "\(message)")
        case .phase(let phase):
            let timeout = phase == .command ? self.ruleset.settings.commandTimeout : self.ruleset.settings.dataTimeout
            self.clock.phase(phase.rawValue, timeout: .seconds(timeout), fromFirstByte: phase == .command)
        case .waitingForRelay(let waiting):
            self.clock.waitingForRelay(waiting ? .seconds(self.ruleset.settings.relayTimeout) : nil)
        case .close(let reusable):
            self.finish(reusable: reusable)
        }
        return []
    }

    /// The policy: at once when no quota is involved, otherwise after the store answered.
    private func decide(_ sender: Sender, _ recipients: [String]) -> [SessionAction] {
        // `group` rules need the sender's groups: from the cache, or looked up off the loop.
        guard self.ruleset.policy.needsGroups, let uid = sender.uid else { return self.decide(sender, recipients, groups: []) }
        if let groups = self.runtime.userGroups.cached(uid) { return self.decide(sender, recipients, groups: groups) }
        self.later { await $0.runtime.userGroups.groups(uid) } then: { $0.decide(sender, recipients, groups: $1) }
        return []
    }

    private func decide(_ sender: Sender, _ recipients: [String], groups: [UInt32]) -> [SessionAction] {
        let policy = self.ruleset.policy
        let evaluation = policy.evaluate(sender: sender, recipients: recipients, groups: groups)
        let (held, volume) = sender.uid.map { uid in
            self.runtime.reservations.withLock { ($0.held(uid: uid), $0.heldVolume(uid: uid)) }
        } ?? ([], .zero)
        let request = Policy.quotaRequest(
            evaluation, sender: sender, now: self.runtime.clock(), held: held, recipients: recipients.count, heldVolume: volume)
        guard let request else {
            return self.machine.decided(Policy.verdict(evaluation, sender: sender, outcome: nil))
        }
        self.later { driver -> Result<QuotaOutcome, any Error> in
            do {
                return .success(try await driver.runtime.store.admit(request))
            } catch {
                return .failure(error)
            }
        } then: { driver, outcome in
            driver.machine.decided(Policy.verdict(evaluation, sender: sender, outcome: outcome))
        }
        return []
    }

    /// Runs `work` off this call stack (on this loop's executor) and feeds its result back.
    private func later<T: Sendable>(
        _ work: @escaping @Sendable (SessionDriver) async -> T,
        then: @escaping @Sendable (SessionDriver, T) -> [SessionAction]
    ) {
        let bound = NIOLoopBound(self, eventLoop: self.client.eventLoop)
        let loop = self.client.eventLoop
        Task(executorPreference: LoopExecutor.of(loop)) {
            let result = await work(bound.value)
            loop.execute {
                let driver = bound.value
                guard !driver.finished else { return }
                driver.feed(then(driver, result))
            }
        }
    }

    private func record(_ r: MessageRecord) {
        let record = DecisionRecord(
            queueID: r.queueID, uid: r.uid, user: r.user, from: r.from, to: r.to, verdict: r.verdict,
            reason: r.reason, quota: r.quota, relayReply: r.relayReply, messages: r.messages, recipients: r.recipients)
        self.runtime.countStats(uid: r.uid, user: r.user, verdict: r.verdict, strangers: r.verdict == .relay ? r.strangers : [])
        self.runtime.observeRemaining(uid: r.uid, user: r.user, quota: r.quota, messages: r.messages, recipients: r.recipients)
        self.runtime.count { c in
            switch r.verdict {
            case .relay: c.relayed += 1
            case .defer: c.deferred += 1
            case .refuse: c.refused += 1
            }
        }
        // The fields are built only for a sink that keeps them (the journal).
        self.logger.log(
            level: r.verdict == .relay ? .info : .warning, "\(record.line)",
            metadata: RestrictLogHandler.keepsMetadata ? record.metadata : nil)
    }

    private func finish(reusable: Bool) {
        guard !self.finished else { return }
        self.finished = true
        if self.machine.tracing, !self.machine.trace.isEmpty {
            self.logger.debug("session states: \(self.machine.trace.joined(separator: ", "))")
        }
        self.relay.detach()
        self.done.succeed(reusable)
    }

    // MARK: back-pressure

    fileprivate func attach(_ context: ChannelHandlerContext) { self.clientContext = context }

    /// The client channel asks to read again: only while the machine takes bytes and the
    /// relay's socket takes what it is given.
    fileprivate func wantsRead() -> Bool {
        guard self.readable else {
            self.heldRead = true
            return false
        }
        return true
    }

    private var readable: Bool { !self.finished && self.machine.wantsClientBytes && self.relay.channel.isWritable }

    private func updateReading() {
        if self.heldRead, self.readable {
            self.heldRead = false
            self.clientContext?.read()
        }
    }
}

/// The client channel's end of the driver.
private final class SessionClientHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    let driver: SessionDriver

    init(driver: SessionDriver) { self.driver = driver }

    func handlerAdded(context: ChannelHandlerContext) { self.driver.attach(context) }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.driver.clientBytes(self.unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.driver.clientEnded()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func read(context: ChannelHandlerContext) {
        if self.driver.wantsRead() { context.read() }
    }
}

extension SessionLogLevel {
    var logging: Logger.Level {
        switch self {
        case .debug: return .debug
        case .info: return .info
        case .warning: return .warning
        case .error: return .error
        }
    }
}
