// The quota store as the daemon holds it: the database is opened on first use and again
// after a failure, so a database that is missing or broken at startup costs 451 4.3.0 for
// quota decisions only, never a crash and never an allowed message.

import Dispatch
public import Logging
import NIOConcurrencyHelpers
public import NIOCore
public import RestrictPolicy

/// Opens the quota database on first use and again after a failure, so that a database that
/// is missing or broken at startup costs 451 4.3.0 for quota decisions only, never a crash
/// and never an allowed message.
public final class LazyQuotaStore: QuotaStore, StatisticsStore, Sendable {
    let path: String
    let logger: Logger
    /// After a failed open, decisions fail fast for this long before the next try.
    let retryAfter: TimeAmount
    private let database = NIOLockedValueBox<(db: QuotaDatabase?, failed: (NIODeadline, String)?)>((nil, nil))

    public init(path: String, logger: Logger, retryAfter: TimeAmount = .seconds(5)) {
        self.path = path
        self.logger = logger
        self.retryAfter = retryAfter
    }

    /// Opens run one at a time here; the lock above is only ever held for a moment, so an
    /// event loop asking for the state never waits for a file to open.
    private static let opener = DispatchQueue(label: "restrictpd.quota-open")

    /// The open database, or an error at once while the last failure is recent.
    private func ready() throws -> QuotaDatabase? {
        let (db, failed) = self.database.withLockedValue { ($0.db, $0.failed) }
        if let db { return db }
        if let (at, why) = failed, NIODeadline.now() - at < self.retryAfter {
            throw QuotaDatabaseError(path: self.path, code: nil, message: "quota database unavailable: \(why)", operation: "opening")
        }
        return nil
    }

    /// Opens the database unless it is open (blocking: at startup, or on `opener`).
    public func open() throws -> QuotaDatabase {
        if let db = try self.ready() { return db }
        do {
            let opened = try QuotaDatabase(path: self.path)
            self.database.withLockedValue { $0 = (opened, nil) }
            return opened
        } catch {
            self.database.withLockedValue { $0.failed = (NIODeadline.now(), "\(error)") }
            throw error
        }
    }

    /// Adds statistics when the database is open; otherwise they are dropped (statistics
    /// never hold a decision up or open the file themselves).
    public func addStats(_ rows: [StatsRow], keepFrom: Int64) async {
        guard !rows.isEmpty, let db = try? self.ready() else { return }
        do {
            try await db.addStats(rows, keepFrom: keepFrom)
        } catch {
            self.logger.warning("statistics not recorded: \(error)")
        }
    }

    /// The open database; opening (file I/O, perhaps a recovery) happens off the event loop,
    /// one at a time.
    func database() async throws -> QuotaDatabase {
        do {
            if let open = try self.ready() { return open }
            return try await withCheckedThrowingContinuation { continuation in
                Self.opener.async { continuation.resume(with: Result { try self.open() }) }
            }
        } catch {
            self.logger.error("quota database unavailable: \(error)")
            throw error
        }
    }

    public func admit(_ request: QuotaRequest) async throws -> QuotaOutcome {
        let db = try await self.database()
        do {
            return try await db.admit(request)
        } catch {
            self.logger.error("quota database error: \(error)")
            throw error
        }
    }
}
