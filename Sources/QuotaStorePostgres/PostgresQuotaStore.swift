// The quota store on PostgreSQL: one budget for the hosts of a farm (rows keyed by scope).
// The same protocol and semantics as the SQLite store: `QuotaArithmetic` decides (the
// arbitrary quota and the volume caps), one transaction per decision, serialised per (scope,
// budget) by an advisory lock (PostgresQuotaSQL).
//
// Failure is closed and loud: no connection, no answer within `state_timeout`, a schema that
// is missing or not this build's, or a failure still there after a few retries makes `admit`
// throw, which the daemon answers 451 4.3.0 (mail waits in Postfix's queue), and logs an error.
// The pool (at most `state_pool` connections) reconnects with back-off by itself.

public import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import PostgresNIO
public import QuotaStore
public import RestrictPolicy

public final class PostgresQuotaStore: QuotaStore, Sendable {
    public let settings: PostgresStoreSettings
    let logger: Logger
    /// The decisions waiting for the database, and their connections (DecisionLane): one for
    /// the batches, and what `state_pool` leaves after it and `queries` for decisions that wait
    /// for a budget's lock. One lane for the whole daemon: its batches grow with the load, so the
    /// database is woken once for many decisions. A lane per event loop would spare the
    /// sessions of the other loops a hop between threads, but would wake the database more
    /// often for smaller batches, which costs more (BENCHMARKS.md).
    let lane: DecisionLane
    /// One connection for the store's other queries (freezing, statistics), which neither wait
    /// behind the batches nor hold them up (a refusal's strike may wait for another host's
    /// freeze lock); with `state_pool` 2 or less, the batches' connection.
    let queries: PostgresClient
    /// Tries per decision for a retryable failure (see `PostgresStoreError.isRetryable`).
    static let attempts = 3

    private struct State {
        var running: Task<Void, Never>? = nil
        /// The schema was found right since the last failure.
        var schemaChecked = false
        /// For STATUS=: "up", or why not.
        var health = "not yet used"
        var lastDiagnosis: NIODeadline? = nil
    }
    private let state = NIOLockedValueBox(State())

    public init(settings: PostgresStoreSettings, logger: Logger) {
        self.settings = settings
        self.logger = logger
        // Every connection on one loop, the lane's, where its batches are sent and answered.
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        func client(_ connections: Int) -> PostgresClient {
            var configuration = PostgresConfiguration.client(settings)
            configuration.options.maximumConnections = connections
            return PostgresClient(configuration: configuration, eventLoopGroup: loop, backgroundLogger: logger)
        }
        let batches = client(1)
        self.queries = settings.pool > 2 ? client(1) : batches
        let others = settings.pool - (settings.pool > 2 ? 2 : 1)
        self.lane = DecisionLane(loop: loop, batches: batches, others: others > 0 ? client(others) : batches)
    }

    /// The redacted URI, for messages.
    public var location: String { self.settings.location.description }

    /// Runs the pool in the background until `shutdown`.
    public func start() {
        self.state.withLockedValue { state in
            guard state.running == nil else { return }
            var clients = [self.lane.batches]
            for client in [self.lane.others, self.queries] where !clients.contains(where: { $0 === client }) { clients.append(client) }
            state.running = Task {
                await withDiscardingTaskGroup { group in
                    for client in clients { group.addTask { await client.run() } }
                }
            }
        }
    }

    public func shutdown() {
        self.state.withLockedValue { $0.running }?.cancel()
    }

    /// "store=postgresql up" or "store=postgresql down (why)", for systemd's STATUS=.
    public var status: String {
        let health = self.state.withLockedValue { $0.health }
        return health == "up" ? "store=postgresql up" : "store=postgresql \(health)"
    }

    /// Decides in a batch with the decisions waiting in the lane, or alone (DecisionLane),
    /// within `state_timeout` from the call, waiting included.
    public func admit(_ request: QuotaRequest) async throws -> QuotaOutcome {
        try await self.guarded("deciding") { try await self.decide(request, on: self.lane) }
    }

    /// Runs `body` (one transaction, or reads) on a pooled connection within `state_timeout`,
    /// again after a retryable failure; a failure is logged and thrown as a
    /// `PostgresStoreError`, which the daemon answers 451 4.3.0.
    func pooled<T: Sendable>(_ operation: String, _ body: @escaping @Sendable (PostgresConnection) async throws -> T) async throws -> T {
        let client = self.queries
        return try await self.guarded(operation) { try await self.retrying(operation, on: client, body) }
    }

    /// `work` within `state_timeout`; the store's health after it; a failure logged and thrown
    /// as a `PostgresStoreError`.
    func guarded<T: Sendable>(_ operation: String, _ work: @escaping @Sendable () async throws -> T) async throws -> T {
        do {
            let value = try await Deadline.run(seconds: self.settings.timeout, onTimeout: self.timeoutError, work)
            self.state.withLockedValue { $0.health = "up" }
            return value
        } catch {
            let wrapped = PostgresStoreError.wrap(error, location: self.location, operation: operation)
            self.failed(wrapped)
            throw wrapped
        }
    }

    func retrying<T: Sendable>(
        _ operation: String, on client: PostgresClient, _ body: @escaping @Sendable (PostgresConnection) async throws -> T
    ) async throws -> T {
        var attempt = 1
        while true {
            do {
                return try await client.withConnection { connection in
                    try await self.ensureSchema(on: connection)
                    return try await body(connection)
                }
            } catch {
                guard attempt < Self.attempts, PostgresStoreError.isRetryable(error), !Task.isCancelled else { throw error }
                self.logger.warning("quota store \(self.location): retrying after: \(PostgresStoreError.wrap(error, location: self.location, operation: operation).message)")
                attempt += 1
            }
        }
    }

    private func ensureSchema(on connection: PostgresConnection) async throws {
        guard !self.state.withLockedValue({ $0.schemaChecked }) else { return }
        try await PostgresSchema.check(on: connection, location: self.location, logger: self.logger)
        self.state.withLockedValue { $0.schemaChecked = true }
    }

    var timeoutError: @Sendable () -> any Error {
        let location = self.location
        let seconds = self.settings.timeout
        return { PostgresStoreError(.timeout, location: location, message: "no answer within state_timeout (\(seconds) s): database down or unreachable?") }
    }

    /// Logs the failure and, at most every 10 s, finds out why on a connection of its own (a
    /// pool that cannot connect only says it timed out): a wrong password, a missing schema.
    private func failed(_ error: PostgresStoreError) {
        let diagnose = self.state.withLockedValue { state -> Bool in
            state.schemaChecked = false
            state.health = "down (\(error.message))"
            if let last = state.lastDiagnosis, NIODeadline.now() - last < .seconds(10) { return false }
            state.lastDiagnosis = NIODeadline.now()
            return error.kind == .timeout
        }
        self.logger.error("\(error) (quota decisions are deferred with 451 4.3.0)")
        guard diagnose else { return }
        Task {
            guard let why = await self.check() else { return }
            self.state.withLockedValue { $0.health = "down (\(why.message))" }
            self.logger.error("\(why)")
        }
    }
}

// MARK: the admin's operations, each on a connection of its own

extension PostgresQuotaStore {
    /// Connects outside the pool (within `state_timeout`), runs `body`, closes.
    func withOwnConnection<T: Sendable>(
        _ operation: String, _ body: @escaping @Sendable (PostgresConnection) async throws -> T
    ) async throws -> T {
        let settings = self.settings
        let logger = self.logger
        let location = self.location
        do {
            return try await Deadline.run(seconds: settings.timeout, onTimeout: self.timeoutError) {
                let configuration = try PostgresConfiguration.connection(settings)
                let connection = try await PostgresConnection.connect(
                    on: PostgresConnection.defaultEventLoopGroup.next(), configuration: configuration, id: 0, logger: logger
                ).get()
                do {
                    let value = try await body(connection)
                    try? await connection.close()
                    return value
                } catch {
                    try? await connection.close()
                    throw error
                }
            }
        } catch {
            throw PostgresStoreError.wrap(error, location: location, operation: operation)
        }
    }

    /// Nil when the store can be reached and carries this build's schema; else why not.
    public func check() async -> PostgresStoreError? {
        do {
            try await self.withOwnConnection("connecting") { connection in
                try await PostgresSchema.check(on: connection, location: self.location, logger: self.logger)
            }
            return nil
        } catch {
            return PostgresStoreError.wrap(error, location: self.location, operation: "connecting")
        }
    }

    /// Creates or upgrades the schema (`--init-store`); the versions before and after.
    public func initialize() async throws -> (from: Int, to: Int) {
        try await self.withOwnConnection("creating the schema") { connection in
            try await PostgresSchema.initialize(on: connection, location: self.location, logger: self.logger)
        }
    }

    /// The schema version this build writes.
    public static var schemaVersion: Int { PostgresSchema.currentVersion }

    public func peek(_ request: QuotaRequest) async throws -> QuotaOutcome {
        try await self.withOwnConnection("reading") { connection in
            try await PostgresSchema.check(on: connection, location: self.location, logger: self.logger)
            return try await PostgresQuotaSQL.peek(request, scope: self.settings.scope, on: connection, logger: self.logger)
        }
    }

    /// What `uid` (or the shared `budget`) has used of each counted cap of `caps` now, for
    /// each of `asks`, on one connection (`restrictpd --stats`).
    public func capStates(_ asks: [CapStatesAsk], now: Int64) async throws -> [[VolumeCapState]] {
        try await self.withOwnConnection("reading caps") { connection in
            try await PostgresSchema.check(on: connection, location: self.location, logger: self.logger)
            var result: [[VolumeCapState]] = []
            for ask in asks {
                result.append(try await PostgresQuotaSQL.capStates(
                    uid: ask.uid, budget: ask.budget, caps: ask.caps, now: now, scope: self.settings.scope, on: connection, logger: self.logger))
            }
            return result
        }
    }

    public func entries(uid: UInt32?) async throws -> [QuotaEntry] {
        try await self.withOwnConnection("listing entries") { connection in
            try await PostgresSchema.check(on: connection, location: self.location, logger: self.logger)
            return try await PostgresQuotaSQL.entries(scope: self.settings.scope, uid: uid, on: connection, logger: self.logger)
        }
    }

    @discardableResult
    public func reset(uid: UInt32) async throws -> Int {
        try await self.withOwnConnection("resetting") { connection in
            try await PostgresSchema.check(on: connection, location: self.location, logger: self.logger)
            return try await PostgresQuotaSQL.reset(scope: self.settings.scope, uid: uid, on: connection, logger: self.logger)
        }
    }
}
