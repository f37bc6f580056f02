// The PostgreSQL quota store's schema and its migrations.
//
// `restrictpd_schema` holds one row: the schema version. `restrictpd --init-store` creates it and
// runs `migrations[v...]` inside one transaction under an advisory lock, so two admins (or two
// nodes' packages) initialising at once cannot both migrate. The daemon only checks the version:
// it never alters the schema, so its database role needs no DDL rights. A shipped migration is
// never edited: a change is a new entry. Functions are the exception: a migration that
// replaces them drops the earlier ones if they are there, and the migration that created
// those then need not create them (3 -> 4 no longer does).

import Logging
import PostgresNIO

enum PostgresSchema {
    /// The advisory lock key `--init-store` holds while it migrates ("RPDQ").
    static let migrationLock: Int64 = 0x5250_4451

    static let versionTable = """
        CREATE TABLE IF NOT EXISTS restrictpd_schema (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            version   integer NOT NULL
        )
        """

    /// `migrations[i]`: the statements that take the schema from version i to i + 1.
    static let migrations: [[String]] = [
        // 0 -> 1: one row per (scope, uid, address) admitted and not yet pruned. The index
        // serves the window read (scope, uid, last_seen >= ?) and the per-uid prune (<).
        [
            """
            CREATE TABLE restrictpd_quota (
                scope      text   NOT NULL,
                uid        bigint NOT NULL,
                address    text   NOT NULL,
                first_seen bigint NOT NULL,
                last_seen  bigint NOT NULL,
                PRIMARY KEY (scope, uid, address)
            )
            """,
            "CREATE INDEX restrictpd_quota_by_last_seen ON restrictpd_quota (scope, uid, last_seen)",
        ],
        // 1 -> 2: what the SQLite store's versions 2 and 3 added, keyed by scope as well.
        // `uid` is the uid or a `shared` rule's budget key (above every uid), as in
        // restrictpd_quota, whose `uid` now holds budget keys too.
        // restrictpd_message: one row per message admitted under a rule with `messages` or
        // `recipients` caps; a cap's use is the count (or the sum of `recipients`) of the rows
        // in its window. The index serves the window read and the prune and covers `recipients`.
        // restrictpd_refusal and restrictpd_frozen: freezing (refused, over-quota and held
        // messages per uid, pruned to the freeze window; the frozen uids, kept until --thaw).
        // restrictpd_stats: `restrictpd --stats`, one row per scope, uid and hour (epoch
        // seconds / 3600), pruned after stats_retention_days.
        [
            """
            CREATE TABLE restrictpd_message (
                scope      text   NOT NULL,
                uid        bigint NOT NULL,
                at         bigint NOT NULL,
                recipients bigint NOT NULL
            )
            """,
            "CREATE INDEX restrictpd_message_by_time ON restrictpd_message (scope, uid, at, recipients)",
            """
            CREATE TABLE restrictpd_refusal (
                scope text   NOT NULL,
                uid   bigint NOT NULL,
                at    bigint NOT NULL
            )
            """,
            "CREATE INDEX restrictpd_refusal_by_uid ON restrictpd_refusal (scope, uid, at)",
            """
            CREATE TABLE restrictpd_frozen (
                scope  text   NOT NULL,
                uid    bigint NOT NULL,
                since  bigint NOT NULL,
                reason text   NOT NULL,
                PRIMARY KEY (scope, uid)
            )
            """,
            """
            CREATE TABLE restrictpd_stats (
                scope     text   NOT NULL,
                uid       bigint NOT NULL,
                hour      bigint NOT NULL,
                relayed   bigint NOT NULL DEFAULT 0,
                refused   bigint NOT NULL DEFAULT 0,
                deferred  bigint NOT NULL DEFAULT 0,
                held      bigint NOT NULL DEFAULT 0,
                strangers bigint NOT NULL DEFAULT 0,
                PRIMARY KEY (scope, uid, hour)
            )
            """,
            "CREATE INDEX restrictpd_stats_by_hour ON restrictpd_stats (scope, hour)",
        ],
        // 2 -> 3: the queue id of a counted refusal (NULL without one, as at the SMTP door),
        // so that Postfix retrying one deferred message counts once per freeze window.
        [
            "ALTER TABLE restrictpd_refusal ADD COLUMN queue_id text",
            """
            CREATE INDEX restrictpd_refusal_by_queue_id ON restrictpd_refusal (scope, uid, queue_id)
                WHERE queue_id IS NOT NULL
            """,
        ],
        // 3 -> 4: the volume the caps count, kept per second: restrictpd_volume has one row
        // per scope, budget and second in which messages were admitted (their number, the sum
        // of their recipients) where restrictpd_message had one per message. A cap's window
        // starts on a second, so the counts are the same; a busy uid's window is read in as
        // many rows as seconds it sent in, and a message adds to its second's row in place.
        [
            """
            CREATE TABLE restrictpd_volume (
                scope      text   NOT NULL,
                uid        bigint NOT NULL,
                at         bigint NOT NULL,
                messages   bigint NOT NULL,
                recipients bigint NOT NULL,
                PRIMARY KEY (scope, uid, at)
            )
            """,
            // Daemons of the previous version may still be adding message rows: they wait
            // until the table is gone (and then fail, 451, until they are upgraded).
            "LOCK TABLE restrictpd_message IN EXCLUSIVE MODE",
            """
            INSERT INTO restrictpd_volume (scope, uid, at, messages, recipients)
            SELECT scope, uid, at, count(*), sum(recipients) FROM restrictpd_message GROUP BY scope, uid, at
            """,
            "DROP TABLE restrictpd_message",
        ],
        // 4 -> 5: restrictpd_admit is a procedure that decides one request or a batch
        // (restrictpd_admit_batch is gone), reads of the counted addresses only their number
        // and those a request names, and commits before it answers. The functions version 4
        // had are dropped where an earlier build created them.
        PostgresAdmitFunction.install,
    ]

    static var currentVersion: Int { migrations.count }
}

extension PostgresSchema {
    /// The schema version in the database; nil when there is no restrictpd schema.
    static func version(on connection: PostgresConnection, logger: Logger) async throws -> Int? {
        let exists = try await connection.query("SELECT to_regclass('restrictpd_schema') IS NOT NULL", logger: logger)
        var found = false
        for try await present in exists.decode(Bool.self) { found = present }
        guard found else { return nil }
        let rows = try await connection.query("SELECT version FROM restrictpd_schema", logger: logger)
        var version: Int? = nil
        for try await v in rows.decode(Int32.self) { version = Int(v) }
        return version
    }

    /// Throws unless the database carries exactly the schema this build understands.
    static func check(on connection: PostgresConnection, location: String, logger: Logger) async throws {
        let found = try await self.version(on: connection, logger: logger)
        try self.judge(found, location: location)
    }

    static func judge(_ found: Int?, location: String) throws {
        let current = self.currentVersion
        guard let found, found > 0 else {
            throw PostgresStoreError(
                .schemaMissing, location: location,
                message: "no restrictpd schema in this database: create it with restrictpd --init-store")
        }
        if found > current {
            throw PostgresStoreError(
                .schemaNewer, location: location,
                message: "schema version \(found) is newer than this restrictpd understands (\(current)): upgrade restrictpd on this host")
        }
        if found < current {
            throw PostgresStoreError(
                .schemaOlder, location: location,
                message: "schema version \(found) needs an upgrade to \(current): run restrictpd --init-store")
        }
    }

    /// Creates or migrates the schema in one transaction; returns the versions before and after.
    static func initialize(on connection: PostgresConnection, location: String, logger: Logger) async throws -> (from: Int, to: Int) {
        try await PostgresQuotaSQL.transaction(on: connection, logger: logger) {
            try await connection.query("SELECT pg_advisory_xact_lock(\(self.migrationLock))", logger: logger)
            try await connection.query(PostgresQuery(unsafeSQL: self.versionTable), logger: logger)
            let found = try await self.version(on: connection, logger: logger) ?? 0
            if found > self.currentVersion { try self.judge(found, location: location) }
            for migration in self.migrations[found...] {
                for statement in migration { try await connection.query(PostgresQuery(unsafeSQL: statement), logger: logger) }
            }
            let to = Int32(self.currentVersion)
            try await connection.query(
                """
                INSERT INTO restrictpd_schema (singleton, version) VALUES (true, \(to))
                ON CONFLICT (singleton) DO UPDATE SET version = excluded.version
                """, logger: logger)
            return (found, self.currentVersion)
        }
    }
}
