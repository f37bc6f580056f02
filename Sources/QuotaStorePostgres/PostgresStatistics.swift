// The statistics on PostgreSQL (`restrictpd --stats`), as the SQLite store keeps them: one
// row per scope, uid and hour, added to by every host of the scope (so --stats on any host
// of a farm shows the farm's), pruned to `stats_retention_days`.

import Logging
import PostgresNIO
public import RestrictPolicy

enum PostgresStatsSQL {
    /// Adds `rows` and drops the scope's hours before `keepFrom`, in one transaction.
    static func add(_ rows: [StatsRow], keepFrom: Int64, scope: String, on connection: PostgresConnection, logger: Logger) async throws {
        try await PostgresQuotaSQL.transaction(on: connection, logger: logger) {
            if !rows.isEmpty {
                let uids = rows.map { Int64($0.uid) }
                let hours = rows.map(\.hour)
                let relayed = rows.map { Int64($0.relayed) }
                let refused = rows.map { Int64($0.refused) }
                let deferred = rows.map { Int64($0.deferred) }
                let held = rows.map { Int64($0.held) }
                let strangers = rows.map { Int64($0.strangers) }
                try await connection.query(
                    """
                    INSERT INTO restrictpd_stats AS s (scope, uid, hour, relayed, refused, deferred, held, strangers)
                    SELECT \(scope), * FROM unnest(\(uids)::bigint[], \(hours)::bigint[], \(relayed)::bigint[], \(refused)::bigint[],
                        \(deferred)::bigint[], \(held)::bigint[], \(strangers)::bigint[])
                    ON CONFLICT (scope, uid, hour) DO UPDATE SET relayed = s.relayed + excluded.relayed,
                        refused = s.refused + excluded.refused, deferred = s.deferred + excluded.deferred,
                        held = s.held + excluded.held, strangers = s.strangers + excluded.strangers
                    """, logger: logger)
            }
            try await connection.query("DELETE FROM restrictpd_stats WHERE scope = \(scope) AND hour < \(keepFrom)", logger: logger)
        }
    }

    /// The scope's rows of `uid` (all when nil) from hour `since` on, by uid and hour.
    static func rows(uid: UInt32?, since: Int64, scope: String, on connection: PostgresConnection, logger: Logger) async throws -> [StatsRow] {
        let only = uid.map(Int64.init) ?? -1
        let rows = try await connection.query(
            """
            SELECT uid, hour, relayed, refused, deferred, held, strangers FROM restrictpd_stats
            WHERE scope = \(scope) AND hour >= \(since) AND (\(only) < 0 OR uid = \(only)) ORDER BY uid, hour
            """, logger: logger)
        var result: [StatsRow] = []
        for try await (uid, hour, relayed, refused, deferred, held, strangers) in rows.decode((Int64, Int64, Int64, Int64, Int64, Int64, Int64).self) {
            guard let uid = UInt32(exactly: uid) else { continue }
            result.append(StatsRow(
                uid: uid, hour: hour, relayed: Int(relayed), refused: Int(refused), deferred: Int(deferred), held: Int(held),
                strangers: Int(strangers)))
        }
        return result
    }
}

extension PostgresQuotaStore: StatisticsStore {
    /// On the pool, within `state_timeout`. A failure is logged and the rows are dropped:
    /// statistics never hold a decision up.
    public func addStats(_ rows: [StatsRow], keepFrom: Int64) async {
        guard !rows.isEmpty else { return }
        do {
            try await self.pooled("adding statistics") { connection in
                try await PostgresStatsSQL.add(rows, keepFrom: keepFrom, scope: self.settings.scope, on: connection, logger: self.logger)
            }
        } catch {
            self.logger.warning("statistics not recorded: \(error)")
        }
    }

    /// The statistics of `uid` (every uid when nil) in this scope from epoch hour `since` on.
    public func stats(uid: UInt32?, since: Int64) async throws -> [StatsRow] {
        try await self.withOwnConnection("reading statistics") { connection in
            try await PostgresSchema.check(on: connection, location: self.location, logger: self.logger)
            return try await PostgresStatsSQL.rows(uid: uid, since: since, scope: self.settings.scope, on: connection, logger: self.logger)
        }
    }
}
