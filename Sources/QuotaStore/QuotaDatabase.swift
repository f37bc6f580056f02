// The SQLite quota store (design decision 3): the counted destinations of every uid, in one
// file in the state directory, WAL mode, so a restart, a crash or a reload never resets them.
//
// Threading: every SQLite call of one `QuotaDatabase` runs on its own serial DispatchQueue,
// never on the caller's thread (in particular never on a NIO event loop). `admit` hands the
// result back through a continuation; the admin calls (`entries`, `count`, `reset`, `peek`) are
// synchronous for the command line and wait on the queue.
//
// Concurrency: `admit` checks and records inside one `BEGIN IMMEDIATE` transaction, which takes
// SQLite's write lock before reading. Concurrent sessions (serialized by the queue) and other
// connections to the same file (a second daemon instance, `restrictpd --reset-quota` from
// another process; they wait up to the busy timeout) can therefore never together exceed N.

public import RestrictPolicy
import CSQLite
import Dispatch
import NIOConcurrencyHelpers

/// One counted destination of a uid, as `restrictpd --quota` shows it.
public struct QuotaEntry: Sendable, Equatable {
    public let uid: UInt32
    /// Normalized (lower-cased, delimiter-stripped) address.
    public let address: String
    /// Seconds since the epoch: when the address was first admitted.
    public let firstSeen: Int64
    /// Seconds since the epoch: when the address was last admitted (a repeat refreshes it).
    public let lastSeen: Int64

    public init(uid: UInt32, address: String, firstSeen: Int64, lastSeen: Int64) {
        self.uid = uid
        self.address = address
        self.firstSeen = firstSeen
        self.lastSeen = lastSeen
    }
}

/// One uid's question for `capStates` (`restrictpd --stats`): its rule's caps, counted under `budget` (nil: the uid).
public struct CapStatesAsk: Sendable {
    public let uid: UInt32
    public let budget: Int64?
    public let caps: VolumeCaps

    public init(uid: UInt32, budget: Int64?, caps: VolumeCaps) {
        self.uid = uid
        self.budget = budget
        self.caps = caps
    }
}

/// The quota database could not answer. The daemon turns this into `451 4.3.0`.
public struct QuotaDatabaseError: Error, CustomStringConvertible, Sendable {
    /// The database file.
    public let path: String
    /// SQLite's extended result code (e.g. 26 SQLITE_NOTADB, 8 SQLITE_READONLY, 1032
    /// SQLITE_READONLY_DBMOVED); nil when restrictpd itself refused the file (schema version,
    /// foreign file).
    public let code: Int32?
    /// SQLite's message, or restrictpd's reason.
    public let message: String
    /// What was being done, e.g. "opening", "starting a write transaction".
    public let operation: String

    public init(path: String, code: Int32?, message: String, operation: String) {
        self.path = path
        self.code = code
        self.message = message
        self.operation = operation
    }

    /// The primary result code (`code & 0xff`), e.g. SQLITE_READONLY for every read-only variant.
    public var primaryCode: Int32? { self.code.map { $0 & 0xFF } }

    public var description: String {
        let sqlite = self.code.map { " (SQLite code \($0))" } ?? ""
        return "quota database \(self.path): \(self.operation): \(self.message)\(sqlite)"
    }
}

public final class QuotaDatabase: QuotaStore, Sendable {
    public enum Mode: Sendable, Equatable {
        /// The daemon, `--reset-quota`: creates the file and its schema when missing.
        case readWrite
        /// `--test`, `--quota`: never writes, so a dry run spends nothing. The file must exist
        /// and carry the current schema (the daemon creates it when it starts).
        case readOnly
    }

    /// The schema version this build writes and understands (`PRAGMA user_version`).
    public static var schemaVersion: Int32 { QuotaSchema.currentVersion }

    public let path: String
    public let mode: Mode
    let queue: DispatchQueue
    /// Confined to `queue`.
    let connection: QuotaConnection

    /// Opens (and in `.readWrite` mode creates or migrates) the database at `path`.
    /// `busyTimeout`: milliseconds to wait for another connection's write lock.
    public init(path: String, mode: Mode = .readWrite, busyTimeout: Int32 = 5000) throws {
        let queue = DispatchQueue(label: "restrictpd.quota-database")
        self.connection = try queue.sync {
            try QuotaConnection(path: path, readOnly: mode == .readOnly, busyTimeout: busyTimeout)
        }
        self.path = path
        self.mode = mode
        self.queue = queue
    }

    /// Decides and, when admitted, records every requested address, in one transaction.
    /// Throws `QuotaDatabaseError` when the database cannot answer; nothing is recorded then.
    /// Requests that arrive while the database is busy wait and are then taken together, in
    /// order, in one transaction (a savepoint each; see `QuotaConnection.admit(batch:)`).
    public func admit(_ request: QuotaRequest) async throws -> QuotaOutcome {
        try await withCheckedThrowingContinuation { continuation in
            let start = self.pending.withLockedValue { state -> Bool in
                state.requests.append((request, continuation))
                if state.draining { return false }
                state.draining = true
                return true
            }
            if start { self.queue.async { self.drain() } }
        }
    }

    /// At most this many requests share a transaction.
    static let batchLimit = 64

    private typealias Waiting = (request: QuotaRequest, continuation: CheckedContinuation<QuotaOutcome, any Error>)
    private let pending = NIOLockedValueBox<(requests: [Waiting], draining: Bool)>(([], false))

    /// On `queue`: answers the waiting requests, a batch at a time, until none are left.
    private func drain() {
        while true {
            let batch = self.pending.withLockedValue { state -> [Waiting] in
                let batch = Array(state.requests.prefix(Self.batchLimit))
                state.requests.removeFirst(batch.count)
                if batch.isEmpty { state.draining = false }
                return batch
            }
            if batch.isEmpty { return }
            let results = self.connection.admit(batch: batch.map(\.request))
            for (waiting, result) in zip(batch, results) { waiting.continuation.resume(with: result) }
        }
    }

    /// The decision `admit` would take now, without recording or pruning anything.
    public func peek(_ request: QuotaRequest) throws -> QuotaOutcome {
        try self.queue.sync { try self.connection.peek(request) }
    }

    /// The counted destinations of `uid` (every uid when nil), by uid, then first use, then address.
    /// Rows outside a uid's current window may still be listed until that uid's next `admit`
    /// prunes them: compare `lastSeen` with the window start.
    public func entries(uid: UInt32?) throws -> [QuotaEntry] {
        try self.queue.sync { try self.connection.entries(uid: uid) }
    }

    /// Distinct addresses of `uid` with `lastSeen >= windowStart` (all of them when nil).
    public func count(uid: UInt32, windowStart: Int64?) throws -> Int {
        try self.queue.sync { try self.connection.count(uid: uid, windowStart: windowStart) }
    }

    /// Adds decisions to the statistics and drops the hours before `keepFrom` (epoch hours).
    public func addStats(_ rows: [StatsRow], keepFrom: Int64) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            self.queue.async { continuation.resume(with: Result { try self.connection.addStats(rows, keepFrom: keepFrom) }) }
        }
    }

    /// What `uid` (or the shared `budget`) has used of each counted cap of `caps` now.
    public func capStates(uid: UInt32, budget: Int64?, caps: VolumeCaps, now: Int64) throws -> [VolumeCapState] {
        try self.queue.sync { try self.connection.capStates(uid: uid, budget: budget, caps: caps, now: now) }
    }

    /// The statistics of `uid` (every uid when nil) from epoch hour `since` on.
    public func stats(uid: UInt32?, since: Int64) throws -> [StatsRow] {
        try self.queue.sync { try self.connection.stats(uid: uid, since: since) }
    }

    /// Forgets every counted destination of `uid`; returns how many rows were deleted.
    @discardableResult
    public func reset(uid: UInt32) throws -> Int {
        try self.queue.sync { try self.connection.reset(uid: uid) }
    }

    /// Closes the connection (checkpointing the WAL when it is the last one). Later calls throw.
    /// Also done when the object is released.
    public func close() {
        self.queue.sync { self.connection.close() }
    }

    // MARK: internal

    /// For tests: one batch in one transaction, as `drain` runs it.
    func testingAdmit(batch requests: [QuotaRequest]) -> [Result<QuotaOutcome, any Error>] {
        self.queue.sync { self.connection.admit(batch: requests) }
    }

    /// For tests: runs SQL that returns no rows (e.g. a PRAGMA) on this connection.
    func testingExecute(_ sql: String) throws {
        try self.queue.sync { try self.connection.execute(sql, "testing") }
    }

    /// For tests: the first column of the first row of `sql` as an integer.
    func testingInteger(_ sql: String) throws -> Int64 {
        try self.queue.sync { try self.connection.integer(sql, "testing") }
    }
}
