// Freezing on PostgreSQL (restrictpd.conf(5) FREEZING): refused, over-quota and held messages
// per (scope, uid), and the frozen uids, with the semantics of the SQLite store's freeze
// tables. Keyed by scope: a uid frozen by one host of a farm is frozen on every host with
// the same scope, and `restrictpd --thaw` on any of them thaws it for all.
//
// A strike is one transaction under an advisory lock of its own per (scope, uid), taken
// before counting, so strikes from any number of hosts are counted one after another and the
// one that reaches N is the one that freezes. The lock's first key is the scope's hash with
// " freeze" appended, apart from the quota's lock, so a strike never waits for a decision.

import Logging
import PostgresNIO
public import RestrictPolicy

enum PostgresFreezeSQL {
    static func strike(
        uid: UInt32, rule: FreezeRule, now: Int64, queueID: String?, scope: String, on connection: PostgresConnection, logger: Logger
    ) async throws -> StrikeOutcome {
        try await PostgresQuotaSQL.transaction(on: connection, logger: logger) {
            let id = Int64(uid)
            let start = rule.windowStart(now: now)
            try await connection.query(
                "SELECT pg_advisory_xact_lock(hashtext(\(scope) || ' freeze'), \(PostgresQuotaSQL.lockKey(id)))", logger: logger)
            try await connection.query(
                "DELETE FROM restrictpd_refusal WHERE scope = \(scope) AND uid = \(id) AND at < \(start)", logger: logger)
            let seen = try await Self.counted(queueID, uid: id, since: start, scope: scope, on: connection, logger: logger)
            if !seen {
                try await connection.query(
                    "INSERT INTO restrictpd_refusal (scope, uid, at, queue_id) VALUES (\(scope), \(id), \(now), \(queueID))", logger: logger)
            }
            let rows = try await connection.query(
                "SELECT count(*) FROM restrictpd_refusal WHERE scope = \(scope) AND uid = \(id) AND at >= \(start)", logger: logger)
            var count: Int64 = 0
            for try await n in rows.decode(Int64.self) { count = n }
            var froze = false
            if !seen, rule.freezes(count: Int(count)) {
                // Frozen already: the since and the reason stay.
                let inserted = try await connection.query(
                    """
                    INSERT INTO restrictpd_frozen (scope, uid, since, reason) VALUES (\(scope), \(id), \(now), \(rule.description))
                    ON CONFLICT (scope, uid) DO NOTHING RETURNING 1
                    """, logger: logger)
                for try await _ in inserted { froze = true }
            }
            return StrikeOutcome(count: Int(count), froze: froze)
        }
    }

    /// True when a refusal of `queueID` (a retried message) is counted since `start`.
    private static func counted(
        _ queueID: String?, uid: Int64, since start: Int64, scope: String, on connection: PostgresConnection, logger: Logger
    ) async throws -> Bool {
        guard let queueID else { return false }
        let rows = try await connection.query(
            """
            SELECT count(*) FROM restrictpd_refusal
            WHERE scope = \(scope) AND uid = \(uid) AND queue_id = \(queueID) AND at >= \(start)
            """, logger: logger)
        var n: Int64 = 0
        for try await c in rows.decode(Int64.self) { n = c }
        return n > 0
    }

    /// The frozen uids of the scope (only `uid` when given), by uid.
    static func frozenList(uid: UInt32?, scope: String, on connection: PostgresConnection, logger: Logger) async throws -> [FrozenState] {
        let rows: PostgresRowSequence
        if let uid {
            rows = try await connection.query(
                "SELECT uid, since, reason FROM restrictpd_frozen WHERE scope = \(scope) AND uid = \(Int64(uid))", logger: logger)
        } else {
            rows = try await connection.query(
                "SELECT uid, since, reason FROM restrictpd_frozen WHERE scope = \(scope) ORDER BY uid", logger: logger)
        }
        var list: [FrozenState] = []
        for try await (uid, since, reason) in rows.decode((Int64, Int64, String).self) {
            guard let uid = UInt32(exactly: uid) else { continue }
            list.append(FrozenState(uid: uid, since: since, reason: reason))
        }
        return list
    }

    /// Thaws `uid` and forgets its counted refusals, in one transaction; true when it was frozen.
    /// Under the strikes' lock: a strike counting at that moment finishes first, so it cannot
    /// freeze the uid again right after the thaw with the refusals the thaw forgets.
    static func thaw(uid: UInt32, scope: String, on connection: PostgresConnection, logger: Logger) async throws -> Bool {
        try await PostgresQuotaSQL.transaction(on: connection, logger: logger) {
            let id = Int64(uid)
            try await connection.query(
                "SELECT pg_advisory_xact_lock(hashtext(\(scope) || ' freeze'), \(PostgresQuotaSQL.lockKey(id)))", logger: logger)
            let rows = try await connection.query(
                "DELETE FROM restrictpd_frozen WHERE scope = \(scope) AND uid = \(id) RETURNING 1", logger: logger)
            var was = false
            for try await _ in rows { was = true }
            try await connection.query("DELETE FROM restrictpd_refusal WHERE scope = \(scope) AND uid = \(id)", logger: logger)
            return was
        }
    }
}

extension PostgresQuotaStore: FreezeStore {
    /// On the pool, within `state_timeout`, as a decision.
    public func strike(uid: UInt32, rule: FreezeRule, now: Int64, queueID: String?) async throws -> StrikeOutcome {
        try await self.pooled("counting a refusal") { connection in
            try await PostgresFreezeSQL.strike(
                uid: uid, rule: rule, now: now, queueID: queueID, scope: self.settings.scope, on: connection, logger: self.logger)
        }
    }

    /// On the pool, within `state_timeout`: asked before every decision of a sender whose
    /// rules freeze; a failure defers the message (451 4.3.0).
    public func frozen(uid: UInt32) async throws -> FrozenState? {
        try await self.pooled("reading the frozen state") { connection in
            try await PostgresFreezeSQL.frozenList(uid: uid, scope: self.settings.scope, on: connection, logger: self.logger).first
        }
    }

    /// The frozen uids of this scope (all when nil), for `restrictpd --quota`.
    public func frozenList(uid: UInt32?) async throws -> [FrozenState] {
        try await self.withOwnConnection("reading frozen uids") { connection in
            try await PostgresSchema.check(on: connection, location: self.location, logger: self.logger)
            return try await PostgresFreezeSQL.frozenList(uid: uid, scope: self.settings.scope, on: connection, logger: self.logger)
        }
    }

    /// Thaws `uid` in this scope (`restrictpd --thaw`); true when it was frozen.
    @discardableResult
    public func thaw(uid: UInt32) async throws -> Bool {
        try await self.withOwnConnection("thawing") { connection in
            try await PostgresSchema.check(on: connection, location: self.location, logger: self.logger)
            return try await PostgresFreezeSQL.thaw(uid: uid, scope: self.settings.scope, on: connection, logger: self.logger)
        }
    }
}
