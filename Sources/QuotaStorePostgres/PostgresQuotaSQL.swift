// The quota store's statements, on one PostgreSQL connection.
//
// Serialisation: every decision that records runs in its own READ COMMITTED transaction that
// first takes `pg_advisory_xact_lock(hashtext(scope), uid)`. Decisions for one (scope, uid),
// from any process on any host, therefore run one after another; the lock is released by
// COMMIT or ROLLBACK (or the server, when the connection dies). Each later statement of the
// transaction takes a new snapshot, after the lock was granted, so it sees every row the
// previous holder committed: counting, deciding and recording cannot interleave, and the
// processes of a farm together never exceed N. The advisory lock costs one round trip, writes
// no row and needs no lock table. Two scopes whose names hash alike share a lock: that only
// makes them wait for each other, it never merges their counts (rows are keyed by scope).

import Logging
import PostgresNIO
import QuotaStore
import RestrictPolicy

enum PostgresQuotaSQL {
    /// The uid as PostgreSQL's int4 for the advisory lock's second key, bit for bit.
    static func lockKey(_ uid: UInt32) -> Int32 { Int32(bitPattern: uid) }

    /// Decides, and when admitted records, in one transaction (see above).
    static func admit(_ request: QuotaRequest, scope: String, on connection: PostgresConnection, logger: Logger) async throws -> QuotaOutcome {
        try await self.transaction(on: connection, logger: logger) {
            let uid = Int64(request.uid)
            let key = self.lockKey(request.uid)
            try await connection.query("SELECT pg_advisory_xact_lock(hashtext(\(scope)), \(key))", logger: logger)
            // Pruning: as in the SQLite store, a row last used before the window start of the
            // rule asking now is outside every later window of that rule too. The SELECT sees
            // the snapshot from before the DELETE, but asks only for rows the DELETE keeps.
            let counted = try await self.counted(
                scope: scope, uid: uid, since: request.windowStart, prune: request.record, on: connection, logger: logger)
            let (outcome, record) = QuotaArithmetic.decide(request, counted: counted)
            if !record.isEmpty {
                try await self.record(Array(Set(record)), scope: scope, uid: uid, now: request.now, on: connection, logger: logger)
            }
            return outcome
        }
    }

    /// The decision `admit` would take, recording and pruning nothing, locking nothing.
    static func peek(_ request: QuotaRequest, scope: String, on connection: PostgresConnection, logger: Logger) async throws -> QuotaOutcome {
        let counted = try await self.counted(
            scope: scope, uid: Int64(request.uid), since: request.windowStart, prune: false, on: connection, logger: logger)
        return QuotaArithmetic.decide(request, counted: counted).0
    }

    static func counted(
        scope: String, uid: Int64, since start: Int64?, prune: Bool, on connection: PostgresConnection, logger: Logger
    ) async throws -> Set<String> {
        let rows: PostgresRowSequence
        if let start, prune {
            rows = try await connection.query(
                """
                WITH pruned AS (DELETE FROM restrictpd_quota WHERE scope = \(scope) AND uid = \(uid) AND last_seen < \(start))
                SELECT address FROM restrictpd_quota WHERE scope = \(scope) AND uid = \(uid) AND last_seen >= \(start)
                """, logger: logger)
        } else {
            let since = start ?? Int64.min
            rows = try await connection.query(
                "SELECT address FROM restrictpd_quota WHERE scope = \(scope) AND uid = \(uid) AND last_seen >= \(since)",
                logger: logger)
        }
        var counted = Set<String>()
        for try await address in rows.decode(String.self) { counted.insert(address) }
        return counted
    }

    /// GREATEST: a clock stepped backwards never makes an address look older than it is.
    static func record(
        _ addresses: [String], scope: String, uid: Int64, now: Int64, on connection: PostgresConnection, logger: Logger
    ) async throws {
        try await connection.query(
            """
            INSERT INTO restrictpd_quota (scope, uid, address, first_seen, last_seen)
            SELECT \(scope), \(uid), a, \(now), \(now) FROM unnest(\(addresses)::text[]) AS a
            ON CONFLICT (scope, uid, address) DO UPDATE SET last_seen = GREATEST(restrictpd_quota.last_seen, excluded.last_seen)
            """, logger: logger)
    }

    static func entries(scope: String, uid: UInt32?, on connection: PostgresConnection, logger: Logger) async throws -> [QuotaEntry] {
        let rows: PostgresRowSequence
        if let uid {
            rows = try await connection.query(
                """
                SELECT uid, address, first_seen, last_seen FROM restrictpd_quota
                WHERE scope = \(scope) AND uid = \(Int64(uid)) ORDER BY uid, first_seen, address
                """, logger: logger)
        } else {
            rows = try await connection.query(
                """
                SELECT uid, address, first_seen, last_seen FROM restrictpd_quota
                WHERE scope = \(scope) ORDER BY uid, first_seen, address
                """, logger: logger)
        }
        var result: [QuotaEntry] = []
        for try await (uid, address, first, last) in rows.decode((Int64, String, Int64, Int64).self) {
            guard let uid = UInt32(exactly: uid) else { continue }
            result.append(QuotaEntry(uid: uid, address: address, firstSeen: first, lastSeen: last))
        }
        return result
    }

    static func reset(scope: String, uid: UInt32, on connection: PostgresConnection, logger: Logger) async throws -> Int {
        let rows = try await connection.query(
            "DELETE FROM restrictpd_quota WHERE scope = \(scope) AND uid = \(Int64(uid)) RETURNING 1", logger: logger)
        var n = 0
        for try await _ in rows { n += 1 }
        return n
    }

    /// BEGIN, `body`, COMMIT; ROLLBACK when `body` throws (and the connection still works).
    static func transaction<T: Sendable>(
        on connection: PostgresConnection, logger: Logger, _ body: () async throws -> T
    ) async throws -> T {
        try await connection.query("BEGIN ISOLATION LEVEL READ COMMITTED", logger: logger)
        do {
            let value = try await body()
            try await connection.query("COMMIT", logger: logger)
            return value
        } catch {
            _ = try? await connection.query("ROLLBACK", logger: logger)
            throw error
        }
    }
}
