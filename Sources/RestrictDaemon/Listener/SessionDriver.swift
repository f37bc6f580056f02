// The thin NIO side of a session: feeds the ProxySession machine its events (client bytes,
// relay replies and failures, the verdict, deadlines) and carries out its actions, all on the
// connection's event loop. Writes are coalesced: each event's writes go out with one flush per
// side. Back-pressure: the client is read only while the machine wants its bytes and the relay
// takes what it is given, so at most one read's worth waits in memory, however fast the client
// writes and however slow the relay is. For a held message the driver opens a connection to
// the hold relay, makes it the session's relay until the machine ends it, and never pools it.

import Logging
import LoopExecutor
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
    /// The main relay connection (pooled); `hold` is the session's relay while a held
    /// message goes to the hold relay.
    let relay: RelayConnection
    private var hold: RelayConnection?
    /// A relay connection whose events go to the machine from the end of the current event
    /// on: attaching hands over replies that waited, and those must not overtake the
    /// event's own actions.
    private var pendingAttach: RelayConnection?
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
    /// Pickup's queue id of the message being decided (a retried message strikes once).
    private var decidingQueueID: String?
    /// Drivers alive in this process: a session's driver must go with its connection.
    static let live = Mutex(0)

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
        Self.live.withLock { $0 += 1 }
    }

    deinit { Self.live.withLock { $0 -= 1 } }

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
            self.hold?.channel.flush()
        }
        if let attach = self.pendingAttach, !self.finished {
            self.pendingAttach = nil
            attach.attach { [weak self] event in self?.relayEvent(event) }
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
            (self.hold ?? self.relay).write(buffers, replies: replies)
            self.relayFlush = true
        case .rememberHello(let command, let reply):
            self.relay.hello.withLock { $0 = reply.isPositive ? (command, reply) : nil }
        case .identify(let uid):
            if let cached = self.runtime.userNames.cached(uid) { return self.machine.identified(user: cached) }
            self.later { await $0.runtime.userNames.name(uid) } then: { $0.machine.identified(user: $1) }
        case .decide(let sender, let recipients, let queueID):
            self.decidingQueueID = queueID
            return self.decide(sender, recipients)
        case .abortRelay:
            self.relay.abort()
        case .openHoldRelay:
            return self.openHold()
        case .endHoldRelay(let abort):
            self.endHold(abort: abort)
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

    /// A frozen sender's mail is held (or deferred) whatever its recipients; the store is
    /// asked only where freezing is configured.
    private func decide(_ sender: Sender, _ recipients: [String]) -> [SessionAction] {
        guard sender.uid != nil, self.ruleset.policy.freezes, self.runtime.freezes != nil else {
            return self.withGroups(sender, recipients)
        }
        self.later { driver -> Result<FrozenState?, any Error> in
            do {
                return .success(try await driver.runtime.frozenState(sender, ruleset: driver.ruleset))
            } catch {
                return .failure(error)
            }
        } then: { driver, frozen in
            switch frozen {
            case .success(let state?):
                return driver.machine.decided(Policy.frozenVerdict(state, sender: sender, action: driver.ruleset.configuration.frozenAction))
            case .success(nil):
                return driver.withGroups(sender, recipients)
            case .failure(let error):
                return driver.machine.decided(Verdict(kind: .defer, reply: Replies.storeUnavailable, reason: "quota store error: \(error)", quota: nil))
            }
        }
        return []
    }

    /// `group` rules need the sender's groups: from the cache, or looked up off the loop.
    private func withGroups(_ sender: Sender, _ recipients: [String]) -> [SessionAction] {
        guard self.ruleset.policy.needsGroups, let uid = sender.uid else { return self.judge(sender, recipients, groups: []) }
        if let groups = self.runtime.userGroups.cached(uid) { return self.judge(sender, recipients, groups: groups) }
        self.later { await $0.runtime.userGroups.groups(uid) } then: { $0.judge(sender, recipients, groups: $1) }
        return []
    }

    /// The policy: at once when no quota is involved, otherwise after the store answered.
    private func judge(_ sender: Sender, _ recipients: [String], groups: [UInt32]) -> [SessionAction] {
        let policy = self.ruleset.policy
        let evaluation = policy.evaluate(sender: sender, recipients: recipients, groups: groups)
        let (held, volume) = sender.uid.map { uid in
            self.runtime.reservations.withLock { ($0.held(uid: uid), $0.heldVolume(uid: uid)) }
        } ?? ([], .zero)
        let request = Policy.quotaRequest(
            evaluation, sender: sender, now: self.runtime.clock(), held: held, recipients: recipients.count, heldVolume: volume)
        guard let request else {
            return self.decided(evaluation, sender, Policy.verdict(evaluation, sender: sender, outcome: nil), groups: groups)
        }
        self.later { driver -> Result<QuotaOutcome, any Error> in
            do {
                return .success(try await driver.runtime.store.admit(request))
            } catch {
                return .failure(error)
            }
        } then: { driver, outcome in
            if case .success(let o) = outcome, let quota = request.quota {
                driver.runtime.warnIfDue(sender, quota: quota, outcome: o, ruleset: driver.ruleset, groups: groups)
            }
            return driver.decided(evaluation, sender, Policy.verdict(evaluation, sender: sender, outcome: outcome), groups: groups)
        }
        return []
    }

    private func decided(_ evaluation: Evaluation, _ sender: Sender, _ verdict: Verdict, groups: [UInt32]) -> [SessionAction] {
        self.runtime.strike(
            sender, evaluation: evaluation, verdict: verdict, ruleset: self.ruleset, groups: groups, queueID: self.decidingQueueID)
        return self.machine.decided(verdict)
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
            reason: r.reason, quota: r.quota, relayReply: r.relayReply, messages: r.messages, recipients: r.recipients,
            heldQueueID: r.heldQueueID, script: r.script)
        self.runtime.countStats(uid: r.uid, user: r.user, verdict: r.verdict, strangers: r.verdict == .relay ? r.strangers : [])
        self.runtime.observeRemaining(uid: r.uid, user: r.user, quota: r.quota, messages: r.messages, recipients: r.recipients)
        self.runtime.count { c in
            switch r.verdict {
            case .relay: c.relayed += 1
            case .defer: c.deferred += 1
            case .refuse: c.refused += 1
            case .hold: c.held += 1
            }
        }
        self.runtime.notifier.note(record, now: self.runtime.clock(), policy: self.ruleset.policy)
        // The fields are built only for a sink that keeps them (the journal).
        self.logger.log(
            level: r.verdict == .relay ? .info : .warning, "\(record.line)",
            metadata: RestrictLogHandler.keepsMetadata ? record.metadata : nil)
    }

    // MARK: the hold relay

    /// A new connection to the hold relay (never pooled: it is needed rarely, and a pooled
    /// one would hold one of its smtpd processes for nothing). The main relay's events wait
    /// meanwhile.
    private func openHold() -> [SessionAction] {
        self.relay.detach()
        self.clock.relay(nil)
        let settings = self.ruleset.settings
        guard let address = self.ruleset.holdRelayAddress else {
            self.pendingAttach = self.relay
            self.clock.relay(self.relay.channel)
            return self.machine.holdRelayUnavailable("cannot resolve \(settings.holdRelayHost)")
        }
        let loop = self.client.eventLoop
        let bound = NIOLoopBound(self, eventLoop: loop)
        Task(executorPreference: LoopExecutor.of(loop)) {
            let result: Result<RelayConnection, any Error>
            do {
                result = .success(try await RelayConnection.connect(
                    to: address, on: loop, timeout: .seconds(settings.relayConnectTimeout),
                    greetingTimeout: .seconds(settings.relayTimeout)))
            } catch {
                result = .failure(error)
            }
            loop.execute { bound.value.holdConnected(result) }
        }
        return []
    }

    private func holdConnected(_ result: Result<RelayConnection, any Error>) {
        switch result {
        case .success(let connection):
            guard !self.finished else { return connection.abort() }
            self.hold = connection
            self.clock.relay(connection.channel)
            self.pendingAttach = connection
            self.feed(self.machine.holdRelayGreeted(connection.greeting))
        case .failure(let error):
            guard !self.finished else { return }
            let settings = self.ruleset.settings
            self.pendingAttach = self.relay
            self.clock.relay(self.relay.channel)
            self.feed(self.machine.holdRelayUnavailable("cannot connect to \(settings.holdRelayHost):\(settings.holdRelayPort): \(error)"))
        }
    }

    private func endHold(abort: Bool) {
        guard let hold = self.hold else { return }
        self.hold = nil
        hold.detach()
        if abort { hold.abort() } else { hold.quit() }
        self.clock.relay(self.relay.channel)
        self.pendingAttach = self.relay
    }

    /// The session could not start (the client left while it was being set up): ends the
    /// driver without a dialogue, so that its promise is completed and nothing it attached
    /// outlives it.
    func abandon(_ error: any Error) {
        guard !self.finished else { return }
        self.finished = true
        self.relay.detach()
        self.clientContext = nil
        self.pendingAttach = nil
        self.done.fail(error)
    }

    private func finish(reusable: Bool) {
        guard !self.finished else { return }
        self.finished = true
        if self.machine.tracing, !self.machine.trace.isEmpty {
            self.logger.debug("session states: \(self.machine.trace.joined(separator: ", "))")
        }
        self.relay.detach()
        // The handler, its context and this driver hold one another: let go of the context
        // so that all three go with the channel.
        self.clientContext = nil
        self.pendingAttach = nil
        if let hold = self.hold {
            self.hold = nil
            hold.detach()
            hold.abort()
        }
        self.done.succeed(reusable)
    }

    // MARK: back-pressure

    fileprivate func attach(_ context: ChannelHandlerContext) { self.clientContext = context }

    fileprivate func detachClient() { self.clientContext = nil }

    /// The client channel asks to read again: only while the machine takes bytes and the
    /// relay's socket takes what it is given.
    fileprivate func wantsRead() -> Bool {
        guard self.readable else {
            self.heldRead = true
            return false
        }
        return true
    }

    private var readable: Bool { !self.finished && self.machine.wantsClientBytes && (self.hold ?? self.relay).channel.isWritable }

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

    func handlerRemoved(context: ChannelHandlerContext) { self.driver.detachClient() }

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
