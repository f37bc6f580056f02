// The quota database's schema and its migrations.
//
// `PRAGMA user_version` holds the schema version; `PRAGMA application_id` marks the file as
// restrictpd's, so a path pointing at some other SQLite database is refused instead of altered.
// `migrations[i]` takes the file from version i to version i + 1 and runs inside the same
// `BEGIN IMMEDIATE` transaction as the version check, so two processes opening a new file at
// once cannot both create it. A shipped migration is never edited: a change is a new entry.

enum QuotaSchema {
    /// "RPDQ".
    static let applicationID: Int32 = 0x5250_4451

    static let migrations: [String] = [
        // 0 -> 1: one row per (uid, address) ever admitted and not yet pruned. The index serves
        // both the window read (uid, last_seen >= ?) and the per-uid prune (uid, last_seen < ?);
        // as an index of a WITHOUT ROWID table it also carries `address`, so the window read
        // never touches the table itself.
        """
        CREATE TABLE quota_address (
            uid        INTEGER NOT NULL,
            address    TEXT    NOT NULL,
            first_seen INTEGER NOT NULL,
            last_seen  INTEGER NOT NULL,
            PRIMARY KEY (uid, address)
        ) STRICT, WITHOUT ROWID;
        CREATE INDEX quota_address_by_last_seen ON quota_address (uid, last_seen);
        """,
        // 1 -> 2: freezing. One row per refused, over-quota or held message (pruned per uid
        // to the freeze window when the next is counted), and one row per frozen uid, kept
        // until `restrictpd --thaw`.
        """
        CREATE TABLE refusal_event (
            uid INTEGER NOT NULL,
            at  INTEGER NOT NULL
        ) STRICT;
        CREATE INDEX refusal_event_by_uid ON refusal_event (uid, at);
        CREATE TABLE frozen_uid (
            uid    INTEGER PRIMARY KEY,
            since  INTEGER NOT NULL,
            reason TEXT    NOT NULL
        ) STRICT;
        """,
        // 2 -> 3: one row per message admitted under a rule with `messages` or `recipients`
        // caps: when, and how many recipients it had. A cap's use is the count (or the sum of
        // `recipients`) of the uid's rows in its window. The index serves the window read and
        // the per-uid prune and covers `recipients`, so neither touches the table itself.
        // And the statistics (`restrictpd --stats`): one row per uid and hour (hour = epoch
        // seconds / 3600) with that hour's decisions, pruned after stats_retention_days.
        """
        CREATE TABLE quota_message (
            uid        INTEGER NOT NULL,
            at         INTEGER NOT NULL,
            recipients INTEGER NOT NULL
        ) STRICT;
        CREATE INDEX quota_message_by_time ON quota_message (uid, at, recipients);
        CREATE TABLE stats_hour (
            uid       INTEGER NOT NULL,
            hour      INTEGER NOT NULL,
            relayed   INTEGER NOT NULL DEFAULT 0,
            refused   INTEGER NOT NULL DEFAULT 0,
            deferred  INTEGER NOT NULL DEFAULT 0,
            held      INTEGER NOT NULL DEFAULT 0,
            strangers INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (uid, hour)
        ) STRICT, WITHOUT ROWID;
        CREATE INDEX stats_hour_by_hour ON stats_hour (hour);
        """,
        // 3 -> 4: the queue id of a counted refusal (NULL without one, as at the SMTP door),
        // so that Postfix retrying one deferred message counts once per freeze window.
        """
        ALTER TABLE refusal_event ADD COLUMN queue_id TEXT;
        CREATE INDEX refusal_event_by_queue_id ON refusal_event (uid, queue_id) WHERE queue_id IS NOT NULL;
        """,
    ]

    static var currentVersion: Int32 { Int32(migrations.count) }
}
