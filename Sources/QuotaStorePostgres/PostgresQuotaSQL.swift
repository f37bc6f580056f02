// The quota store's statements, on one PostgreSQL connection.
//
// Serialisation: every decision that records runs in its own READ COMMITTED transaction that
// first takes `pg_advisory_xact_lock(hashtext(scope), key)`, the key being the budget's (the
// uid, or a `shared` rule's budget key; see `lockKey`). Decisions for one (scope, budget),
// from any process on any host, therefore run one after another; the lock is released by
// COMMIT or ROLLBACK (or the server, when the connection dies). Each later statement of the
// transaction takes a new snapshot, after the lock was granted, so it sees every row the
// previous holder committed: counting (the addresses and the volume caps), deciding and
// recording cannot interleave, and the processes of a farm together never exceed N. The
// advisory lock costs one round trip, writes no row and needs no lock table. Two scopes (or
// budgets) whose keys hash alike share a lock: that only makes them wait for each other, it
// never merges their counts (rows are keyed by scope and budget).

import Logging
import PostgresNIO
import QuotaStore
import RestrictPolicy

enum PostgresQuotaSQL {
    /// The advisory lock's second key (int4) for a budget: a uid bit for bit; a shared
    /// budget's key (2^32 + gid, 2^33 + first uid) folded into 32 bits. A fold that meets
    /// another budget's key only serialises the two.
    static func lockKey(_ budget: Int64) -> Int32 {
        if let uid = UInt32(exactly: budget) { return Int32(bitPattern: uid) }
        return Int32(truncatingIfNeeded: budget ^ (budget >> 32))
    }

    /// Decides, and when admitted records, in one transaction (see above). The same steps as
    /// the SQLite store's `QuotaConnection.decideAndRecord`: prune what left the asking rule's
    /// windows, count, decide with `QuotaArithmetic`, record the addresses and the message.
    static func admit(_ request: QuotaRequest, scope: String, on connection: PostgresConnection, logger: Logger) async throws -> QuotaOutcome {
        try await self.transaction(on: connection, logger: logger) {
            let budget = request.budget
            try await connection.query(
                "SELECT pg_advisory_xact_lock(hashtext(\(scope)), \(self.lockKey(budget)))", logger: logger)
            // Pruning: as in the SQLite store, a row last used before the window start of the
            // rule asking now is outside every later window of that rule too. The SELECT sees
            // the snapshot from before the DELETE, but asks only for rows the DELETE keeps.
            let counted = request.quota == nil ? [] : try await self.counted(
                scope: scope, uid: budget, since: request.windowStart, prune: request.record, on: connection, logger: logger)
            let volume = try await self.volume(request, scope: scope, prune: request.record, on: connection, logger: logger)
            let (outcome, record, recordMessage) = QuotaArithmetic.decide(request, counted: counted, volume: volume)
            if !record.isEmpty {
                try await self.record(Array(Set(record)), scope: scope, uid: budget, now: request.now, on: connection, logger: logger)
            }
            if recordMessage {
                try await connection.query(
                    """
                    INSERT INTO restrictpd_message (scope, uid, at, recipients)
                    VALUES (\(scope), \(budget), \(request.now), \(Int64(request.recipients)))
                    """, logger: logger)
            }
            return outcome
        }
    }

    /// The decision `admit` would take, recording and pruning nothing, locking nothing.
    static func peek(_ request: QuotaRequest, scope: String, on connection: PostgresConnection, logger: Logger) async throws -> QuotaOutcome {
        let counted = request.quota == nil ? [] : try await self.counted(
            scope: scope, uid: request.budget, since: request.windowStart, prune: false, on: connection, logger: logger)
        let volume = try await self.volume(request, scope: scope, prune: false, on: connection, logger: logger)
        return QuotaArithmetic.decide(request, counted: counted, volume: volume).0
    }

    /// What the uid (or shared `budget`) has used of each counted cap of `caps` now.
    static func capStates(
        uid: UInt32, budget: Int64?, caps: VolumeCaps, now: Int64, scope: String, on connection: PostgresConnection, logger: Logger
    ) async throws -> [VolumeCapState] {
        let request = QuotaRequest(uid: uid, addresses: [], quota: nil, now: now, caps: caps, budget: budget)
        let volume = try await self.volume(request, scope: scope, prune: false, on: connection, logger: logger)
        return QuotaArithmetic.decideCaps(request, counted: volume).states
    }

    /// Messages, and the sum of their recipients, of the request's budget in the window of
    /// each counted cap, in one read (the two caps may have different periods). With `prune`,
    /// message rows before the longest window go first, as in the SQLite store: they are
    /// outside every counted cap's window now and later. Empty when the rule counts no caps.
    static func volume(
        _ request: QuotaRequest, scope: String, prune: Bool, on connection: PostgresConnection, logger: Logger
    ) async throws -> [VolumeCap.Kind: Int] {
        guard let from = request.caps.pruneBefore(now: request.now) else { return [:] }
        let uid = request.budget
        // A kind without a cap: a start no row reaches (its figure is not used).
        let messagesFrom = request.windowStart(.messages) ?? Int64.max
        let recipientsFrom = request.windowStart(.recipients) ?? Int64.max
        let rows: PostgresRowSequence
        if prune {
            rows = try await connection.query(
                """
                WITH pruned AS (DELETE FROM restrictpd_message WHERE scope = \(scope) AND uid = \(uid) AND at < \(from))
                SELECT count(*) FILTER (WHERE at >= \(messagesFrom)),
                       coalesce(sum(recipients) FILTER (WHERE at >= \(recipientsFrom)), 0)::bigint
                FROM restrictpd_message WHERE scope = \(scope) AND uid = \(uid) AND at >= \(from)
                """, logger: logger)
        } else {
            rows = try await connection.query(
                """
                SELECT count(*) FILTER (WHERE at >= \(messagesFrom)),
                       coalesce(sum(recipients) FILTER (WHERE at >= \(recipientsFrom)), 0)::bigint
                FROM restrictpd_message WHERE scope = \(scope) AND uid = \(uid) AND at >= \(from)
                """, logger: logger)
        }
        var counts: (messages: Int64, recipients: Int64) = (0, 0)
        for try await row in rows.decode((Int64, Int64).self) { counts = row }
        var result: [VolumeCap.Kind: Int] = [:]
        for cap in request.caps.counted {
            result[cap.kind] = Int(cap.kind == .messages ? counts.messages : counts.recipients)
        }
        return result
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
                WHERE scope = \(scope) AND uid <= 4294967295 ORDER BY uid, first_seen, address
                """, logger: logger)
        }
        var result: [QuotaEntry] = []
        for try await (uid, address, first, last) in rows.decode((Int64, String, Int64, Int64).self) {
            guard let uid = UInt32(exactly: uid) else { continue }
            result.append(QuotaEntry(uid: uid, address: address, firstSeen: first, lastSeen: last))
        }
        return result
    }

    /// Forgets the uid's counted addresses and messages, in one transaction; the rows deleted.
    static func reset(scope: String, uid: UInt32, on connection: PostgresConnection, logger: Logger) async throws -> Int {
        try await self.transaction(on: connection, logger: logger) {
            let id = Int64(uid)
            var n = 0
            let addresses = try await connection.query(
                "DELETE FROM restrictpd_quota WHERE scope = \(scope) AND uid = \(id) RETURNING 1", logger: logger)
            for try await _ in addresses { n += 1 }
            let messages = try await connection.query(
                "DELETE FROM restrictpd_message WHERE scope = \(scope) AND uid = \(id) RETURNING 1", logger: logger)
            for try await _ in messages { n += 1 }
            return n
        }
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
