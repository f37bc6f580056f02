// What every session shares: the rules in force (replaced whole on reload), the quota store,
// counters for STATUS=, and whether the daemon is draining.

public import Logging
public import NIOCore
public import RestrictPolicy
public import SMTPCore
import QuotaStore

/// The settings one session runs under, taken from the configuration when it starts.
public struct SessionSettings: Sendable {
    public var limits: SMTPLimits
    public var idleTimeout: Int64
    public var commandTimeout: Int64
    public var dataTimeout: Int64
    public var relayTimeout: Int64
    public var relayConnectTimeout: Int64
    public var relayHost: String
    public var relayPort: Int
    public var holdRelayHost: String
    public var holdRelayPort: Int

    public init(_ c: Configuration) {
        self.limits = SMTPLimits(
            commandLine: c.value(.commandLineLimit),
            dataLine: c.value(.dataLineLimit),
            headerSection: c.value(.headerLimit),
            recipients: c.value(.recipientLimit),
            messageSize: c.value(.messageSizeLimit)
        )
        self.idleTimeout = Int64(c.value(.idleTimeout))
        self.commandTimeout = Int64(c.value(.commandTimeout))
        self.dataTimeout = Int64(c.value(.dataTimeout))
        self.relayTimeout = Int64(c.value(.relayTimeout))
        self.relayConnectTimeout = Int64(c.value(.relayConnectTimeout))
        self.relayHost = c.relayHost
        self.relayPort = c.relayPort
        self.holdRelayHost = c.holdRelayHost
        self.holdRelayPort = c.holdRelayPort
    }
}

/// The rules and settings in force; a reload swaps the whole value.
public struct Ruleset: Sendable {
    public let configuration: Configuration
    public let policy: Policy
    public let settings: SessionSettings
    public let clients: Set<UInt32>
    /// The relay's address, resolved once per load rather than once per session.
    public let relayAddress: SocketAddress?
    /// The hold relay's (hold_relay), likewise.
    public let holdRelayAddress: SocketAddress?

    public init(_ configuration: Configuration, localDomains: Set<String> = []) {
        self.configuration = configuration
        self.policy = Policy(configuration, localDomains: localDomains)
        self.settings = SessionSettings(configuration)
        self.clients = Set(configuration.clients)
        self.relayAddress = try? SocketAddress.makeAddressResolvingHost(configuration.relayHost, port: configuration.relayPort)
        self.holdRelayAddress = try? SocketAddress.makeAddressResolvingHost(configuration.holdRelayHost, port: configuration.holdRelayPort)
    }
}

public struct Counters: Sendable {
    public var sessions = 0
    public var relayed = 0
    public var refused = 0
    public var deferred = 0
    public var held = 0
    public var peersRefused = 0

    public var status: String {
        "sessions=\(self.sessions) relayed=\(self.relayed) refused=\(self.refused) deferred=\(self.deferred) held=\(self.held) peers_refused=\(self.peersRefused)"
    }
}

public final class Runtime: Sendable {
    private let current: Mutex<Ruleset>
    public let store: any QuotaStore
    /// The same store's freeze tables, when it has them.
    let freezes: (any FreezeStore)?
    /// The admin's notifications (notify); its interval and limit are those at startup.
    let notifier: Notifier
    /// `warn at N%`: when each UID was last warned.
    let warned = Mutex<[UInt32: Int64]>([:])
    public let logger: Logger
    let counters = Mutex(Counters())
    let draining = Mutex(false)
    let userNames = UserNames()
    let userGroups: UserGroups
    /// Decisions not yet added to the store's statistics (`flushStats`).
    let stats = Mutex(StatsAccumulator())
    let clock: @Sendable () -> Int64
    /// Quota reserved by open SMTP transactions (the policy service), seen by both doors.
    let reservations: Mutex<Reservations>

    /// metrics_file, when configured.
    let metrics: MetricsFile?

    public init(
        ruleset: Ruleset, store: any QuotaStore, logger: Logger, clock: @escaping @Sendable () -> Int64 = Runtime.wallClock,
        metricsFile: String? = nil
    ) {
        self.metrics = metricsFile.map { MetricsFile(path: $0) }
        self.current = Mutex(ruleset)
        self.reservations = Mutex(Reservations(timeout: Int64(ruleset.configuration.value(.policyReservationTimeout))))
        self.store = store
        self.freezes = store as? any FreezeStore
        let userGroups = UserGroups()
        self.userGroups = userGroups
        self.notifier = Notifier(ruleset.configuration, userGroups: userGroups)
        self.logger = logger
        self.clock = clock
    }

    public var ruleset: Ruleset { self.current.withLock { $0 } }

    public func replace(_ ruleset: Ruleset) {
        self.current.withLock { $0 = ruleset }
        self.reservations.withLock { $0.timeout = Int64(ruleset.configuration.value(.policyReservationTimeout)) }
    }

    public var isDraining: Bool { self.draining.withLock { $0 } }

    public func count(_ body: (inout Counters) -> Void) { self.counters.withLock(body) }

    /// Notes one decision for the statistics.
    func countStats(uid: UInt32?, user: String?, verdict: Verdict.Kind, strangers: [String] = []) {
        guard let uid else { return }
        let now = self.clock()
        self.stats.withLock { $0.add(uid: uid, at: now, verdict: verdict, strangers: strangers) }
        self.metrics?.message(uid: uid, user: user, verdict: verdict)
    }

    /// What is left of a uid's quota and caps after a decision, for the metrics file.
    func observeRemaining(uid: UInt32?, user: String?, quota: String?, messages: String?, recipients: String?) {
        guard let metrics = self.metrics, let uid else { return }
        metrics.remaining(uid: uid, user: user, kind: "arbitrary", figure: quota)
        metrics.remaining(uid: uid, user: user, kind: "messages", figure: messages)
        metrics.remaining(uid: uid, user: user, kind: "recipients", figure: recipients)
    }

    /// Writes the metrics file, if there is one.
    func writeMetrics() {
        guard let metrics = self.metrics else { return }
        metrics.gauges(self.snapshot, reservations: self.reservations.withLock { $0.count })
        do {
            try metrics.write()
        } catch {
            self.logger.warning("metrics_file \(metrics.path) not written: \(error)")
        }
    }

    /// Adds the decisions gathered since the last call to the store's statistics.
    func flushStats() async {
        let now = self.clock()
        // Drained whatever the store: one that keeps no statistics must not make them pile up.
        let rows = self.stats.withLock { $0.drain(now: now) }
        guard let store = self.store as? any StatisticsStore else { return }
        let retention = Int64(self.ruleset.configuration.value(.statsRetentionDays)) * 24
        await store.addStats(rows, keepFrom: now / 3600 - retention)
    }

    public var snapshot: Counters { self.counters.withLock { $0 } }

    public static let wallClock: @Sendable () -> Int64 = {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec)
    }
}

#if canImport(Glibc)
import Glibc
#endif
