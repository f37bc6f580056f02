// One SQLite connection and its prepared statements. Not thread-safe by itself: a
// `QuotaDatabase` confines it to its serial queue, hence `@unchecked Sendable` (the connection
// is opened with SQLITE_OPEN_NOMUTEX, SQLite's multi-thread mode, which allows one connection
// to be used from different threads as long as never at the same time).

import CSQLite
import RestrictPolicy

final class QuotaConnection: @unchecked Sendable {
    let path: String
    private var db: OpaquePointer?
    private var statements: [String: OpaquePointer] = [:]

    private static let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
    /// Upper bound for the WAL file after a checkpoint.
    private static let journalSizeLimit = 4 * 1024 * 1024

    init(path: String, readOnly: Bool, busyTimeout: Int32) throws {
        self.path = path
        var flags = SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE
        flags |= readOnly ? SQLITE_OPEN_READONLY : (SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
        var handle: OpaquePointer?
        let rc = sqlite3_open_v2(path, &handle, flags, nil)
        guard rc == SQLITE_OK, let handle else {
            let message = handle.map { String(cString: sqlite3_errmsg($0)) } ?? String(cString: sqlite3_errstr(rc))
            sqlite3_close_v2(handle)
            throw QuotaDatabaseError(path: path, code: rc, message: message, operation: "opening")
        }
        self.db = handle
        do {
            sqlite3_busy_timeout(handle, busyTimeout)
            if readOnly {
                try self.checkSchema(readOnly: true)
            } else {
                let mode = try self.text("PRAGMA journal_mode = WAL", "switching to WAL mode")
                guard mode.lowercased() == "wal" else {
                    throw QuotaDatabaseError(
                        path: path, code: nil, message: "journal mode is \(mode), not wal",
                        operation: "switching to WAL mode")
                }
                // In WAL mode NORMAL never corrupts; a power cut may lose the last commits.
                try self.execute("PRAGMA synchronous = NORMAL", "configuring")
                try self.execute("PRAGMA journal_size_limit = \(Self.journalSizeLimit)", "configuring")
                try self.checkSchema(readOnly: false)
            }
        } catch {
            self.close()
            throw error
        }
    }

    deinit { self.close() }

    func close() {
        for statement in self.statements.values { sqlite3_finalize(statement) }
        self.statements = [:]
        if let db = self.db { sqlite3_close_v2(db) }
        self.db = nil
    }

    // MARK: schema

    /// Checks the file is ours and of a version we know; in read-write mode creates or migrates
    /// it inside one write transaction.
    private func checkSchema(readOnly: Bool) throws {
        if !readOnly { try self.execute("BEGIN IMMEDIATE", "starting the schema transaction") }
        do {
            let application = try self.integer("PRAGMA application_id", "reading the application id")
            let version = try self.integer("PRAGMA user_version", "reading the schema version")
            let tables = try self.integer("SELECT count(*) FROM sqlite_schema", "reading the schema")
            let current = Int64(QuotaSchema.currentVersion)
            let checking = "checking the schema"
            if application != Int64(QuotaSchema.applicationID) && !(application == 0 && version == 0 && tables == 0) {
                throw QuotaDatabaseError(
                    path: self.path, code: nil,
                    message: "not a restrictpd quota database (application_id \(application), user_version \(version))",
                    operation: checking)
            }
            if version > current || version < 0 {
                throw QuotaDatabaseError(
                    path: self.path, code: nil,
                    message: "quota database schema version \(version) is newer than this restrictpd understands (\(current))",
                    operation: checking)
            }
            if version < current {
                if readOnly {
                    throw QuotaDatabaseError(
                        path: self.path, code: nil,
                        message: "schema version \(version) needs an upgrade to \(current); open it read-write once (start the daemon)",
                        operation: checking)
                }
                for migration in QuotaSchema.migrations[Int(version)...] {
                    try self.execute(migration, "migrating the schema")
                }
                try self.execute("PRAGMA application_id = \(QuotaSchema.applicationID)", "migrating the schema")
                try self.execute("PRAGMA user_version = \(current)", "migrating the schema")
            }
            if !readOnly { try self.execute("COMMIT", "committing the schema") }
        } catch {
            self.rollback()
            throw error
        }
    }

    // MARK: quota operations

    private static let selectCounted = "SELECT address FROM quota_address WHERE uid = ?1 AND last_seen >= ?2"
    private static let pruneExpired = "DELETE FROM quota_address WHERE uid = ?1 AND last_seen < ?2"
    // max(): a clock stepped backwards never makes an address look older than it is.
    private static let upsert = """
        INSERT INTO quota_address (uid, address, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
        ON CONFLICT (uid, address) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)
        """

    func admit(_ request: QuotaRequest) throws -> QuotaOutcome {
        try self.execute("BEGIN IMMEDIATE", "starting a write transaction")
        do {
            let outcome = try self.decideAndRecord(request)
            try self.execute("COMMIT", "committing")
            return outcome
        } catch {
            self.rollback()
            throw error
        }
    }

    /// Several requests in one write transaction, in order, each in a savepoint of its own:
    /// a request that fails leaves the others' work standing (its result is its error), later
    /// requests see what earlier ones recorded, and nothing is reported admitted unless the
    /// commit succeeded. One transaction costs the file locks and the WAL write once for all.
    func admit(batch requests: [QuotaRequest]) -> [Result<QuotaOutcome, any Error>] {
        if requests.count == 1, let only = requests.first { return [Result { try self.admit(only) }] }
        do {
            try self.execute("BEGIN IMMEDIATE", "starting a write transaction")
        } catch {
            return requests.map { _ in .failure(error) }
        }
        var results: [Result<QuotaOutcome, any Error>] = []
        results.reserveCapacity(requests.count)
        for request in requests {
            do {
                try self.execute("SAVEPOINT admit", "starting a savepoint")
                let outcome = try self.decideAndRecord(request)
                try self.execute("RELEASE admit", "releasing a savepoint")
                results.append(.success(outcome))
            } catch let failure {
                do {
                    try self.execute("ROLLBACK TO admit", "rolling back a savepoint")
                    try self.execute("RELEASE admit", "releasing a savepoint")
                    results.append(.failure(failure))
                } catch {
                    // SQLite rolled the whole transaction back (a full disk, an I/O error):
                    // nothing of the batch is recorded, and every request gets the cause.
                    self.rollback()
                    return requests.map { _ in .failure(failure) }
                }
            }
        }
        do {
            try self.execute("COMMIT", "committing")
        } catch {
            self.rollback()
            return requests.map { _ in .failure(error) }
        }
        return results
    }

    /// The decision for one request and, when admitted, its record; inside a transaction.
    private func decideAndRecord(_ request: QuotaRequest) throws -> QuotaOutcome {
        let uid = request.budget
        // Pruning happens here, per uid, with the window of the rule asking now: a row of
        // this uid with last_seen < windowStart is outside this window, and since `now`
        // only moves forward and last_seen is only ever raised, it is outside every later
        // window of the same rule too, so deleting it changes no present or future count.
        // Rules without a period have no window start and never prune (the learned allow
        // list is kept for good). The live rows of a uid are therefore at most the addresses
        // admitted within one period, so the file does not grow without bound.
        // Limits, all on the permissive side and bounded by one period's worth: lengthening
        // a rule's period (day -> week, or dropping the period) forgets what was pruned
        // under the shorter one; rows of a uid that no longer has a quota stay until
        // `reset(uid:)`.
        if request.record, let start = request.windowStart {
            try self.run(Self.pruneExpired, [.integer(uid), .integer(start)], "pruning")
        }
        // Message rows are pruned the same way, before the longest counted cap's window.
        if request.record, let start = request.caps.pruneBefore(now: request.now) {
            try self.run(Self.pruneMessages, [.integer(uid), .integer(start)], "pruning messages")
        }
        let counted = request.quota == nil ? [] : try self.counted(uid: uid, since: request.windowStart)
        let volume = try self.volume(request)
        let (outcome, record, recordMessage) = QuotaArithmetic.decide(request, counted: counted, volume: volume)
        for address in record {
            try self.run(Self.upsert, [.integer(uid), .text(address), .integer(request.now)], "recording")
        }
        if recordMessage {
            try self.run(Self.insertMessage, [.integer(uid), .integer(request.now), .integer(Int64(request.recipients))], "recording a message")
        }
        return outcome
    }

    func peek(_ request: QuotaRequest) throws -> QuotaOutcome {
        let counted = request.quota == nil ? [] : try self.counted(uid: request.budget, since: request.windowStart)
        return QuotaArithmetic.decide(request, counted: counted, volume: try self.volume(request)).0
    }

    /// What the uid (or shared budget) has used of each counted cap in its window now.
    func capStates(uid: UInt32, budget: Int64?, caps: VolumeCaps, now: Int64) throws -> [VolumeCapState] {
        let request = QuotaRequest(uid: uid, addresses: [], quota: nil, now: now, caps: caps, budget: budget)
        return QuotaArithmetic.decideCaps(request, counted: try self.volume(request)).states
    }

    private static let pruneMessages = "DELETE FROM quota_message WHERE uid = ?1 AND at < ?2"
    private static let insertMessage = "INSERT INTO quota_message (uid, at, recipients) VALUES (?1, ?2, ?3)"
    private static let selectVolume = "SELECT count(*), coalesce(sum(recipients), 0) FROM quota_message WHERE uid = ?1 AND at >= ?2"

    /// Messages and recipients of the uid in each counted cap's window (one read when both
    /// caps have the same period: the read gives both).
    private func volume(_ request: QuotaRequest) throws -> [VolumeCap.Kind: Int] {
        var result: [VolumeCap.Kind: Int] = [:]
        var read: [QuotaPeriod: (messages: Int, recipients: Int)] = [:]
        for cap in request.caps.counted {
            if read[cap.period] == nil {
                var counts = (messages: 0, recipients: 0)
                let start = request.now - cap.period.seconds
                try self.query(Self.selectVolume, [.integer(request.budget), .integer(start)], "reading messages") {
                    counts = (Int(sqlite3_column_int64($0, 0)), Int(sqlite3_column_int64($0, 1)))
                }
                read[cap.period] = counts
            }
            let counts = read[cap.period] ?? (0, 0)
            result[cap.kind] = cap.kind == .messages ? counts.messages : counts.recipients
        }
        return result
    }

    private func counted(uid: Int64, since start: Int64?) throws -> Set<String> {
        var counted = Set<String>()
        try self.query(Self.selectCounted, [.integer(uid), .integer(start ?? Int64.min)], "reading counted addresses") {
            counted.insert(Self.columnText($0, 0))
        }
        return counted
    }

    func entries(uid: UInt32?) throws -> [QuotaEntry] {
        let sql = "SELECT uid, address, first_seen, last_seen FROM quota_address"
        let order = " ORDER BY uid, first_seen, address"
        var result: [QuotaEntry] = []
        let operation = "listing entries"
        let row: (OpaquePointer) throws -> Void = { statement in
            guard let uid = UInt32(exactly: sqlite3_column_int64(statement, 0)) else {
                throw QuotaDatabaseError(path: self.path, code: nil, message: "a row has an invalid uid", operation: operation)
            }
            result.append(QuotaEntry(
                uid: uid, address: Self.columnText(statement, 1),
                firstSeen: sqlite3_column_int64(statement, 2), lastSeen: sqlite3_column_int64(statement, 3)))
        }
        if let uid {
            try self.query(sql + " WHERE uid = ?1" + order, [.integer(Int64(uid))], operation, row)
        } else {
            // Shared budgets count under keys above every uid (Rule.budget): not a user's rows.
            try self.query(sql + " WHERE uid <= 4294967295" + order, [], operation, row)
        }
        return result
    }

    func count(uid: UInt32, windowStart: Int64?) throws -> Int {
        var count: Int64 = 0
        try self.query(
            "SELECT count(*) FROM quota_address WHERE uid = ?1 AND last_seen >= ?2",
            [.integer(Int64(uid)), .integer(windowStart ?? Int64.min)], "counting"
        ) { count = sqlite3_column_int64($0, 0) }
        return Int(count)
    }

    func reset(uid: UInt32) throws -> Int {
        let db = try self.handle("resetting")
        try self.run("DELETE FROM quota_address WHERE uid = ?1", [.integer(Int64(uid))], "resetting")
        let addresses = Int(sqlite3_changes64(db))
        try self.run("DELETE FROM quota_message WHERE uid = ?1", [.integer(Int64(uid))], "resetting")
        return addresses + Int(sqlite3_changes64(db))
    }

    // MARK: statistics

    private static let addStats = """
        INSERT INTO stats_hour (uid, hour, relayed, refused, deferred, held, strangers) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
        ON CONFLICT (uid, hour) DO UPDATE SET relayed = relayed + excluded.relayed, refused = refused + excluded.refused,
            deferred = deferred + excluded.deferred, held = held + excluded.held, strangers = strangers + excluded.strangers
        """

    /// Adds `rows` and drops the hours before `keepFrom`, in one transaction: the table holds
    /// at most the retention's hours for each uid that sent mail.
    func addStats(_ rows: [StatsRow], keepFrom: Int64) throws {
        try self.execute("BEGIN IMMEDIATE", "starting a write transaction")
        do {
            for r in rows {
                let values: [Value] = [
                    .integer(Int64(r.uid)), .integer(r.hour), .integer(Int64(r.relayed)), .integer(Int64(r.refused)),
                    .integer(Int64(r.deferred)), .integer(Int64(r.held)), .integer(Int64(r.strangers)),
                ]
                try self.run(Self.addStats, values, "adding statistics")
            }
            try self.run("DELETE FROM stats_hour WHERE hour < ?1", [.integer(keepFrom)], "pruning statistics")
            try self.execute("COMMIT", "committing")
        } catch {
            self.rollback()
            throw error
        }
    }

    /// The rows of `uid` (all when nil) from hour `since` on, by uid and hour.
    func stats(uid: UInt32?, since: Int64) throws -> [StatsRow] {
        var rows: [StatsRow] = []
        let sql = "SELECT uid, hour, relayed, refused, deferred, held, strangers FROM stats_hour WHERE hour >= ?1 AND (?2 < 0 OR uid = ?2) ORDER BY uid, hour"
        try self.query(sql, [.integer(since), .integer(uid.map(Int64.init) ?? -1)], "reading statistics") { s in
            guard let uid = UInt32(exactly: sqlite3_column_int64(s, 0)) else { return }
            rows.append(StatsRow(
                uid: uid, hour: sqlite3_column_int64(s, 1), relayed: Int(sqlite3_column_int64(s, 2)),
                refused: Int(sqlite3_column_int64(s, 3)), deferred: Int(sqlite3_column_int64(s, 4)),
                held: Int(sqlite3_column_int64(s, 5)), strangers: Int(sqlite3_column_int64(s, 6))))
        }
        return rows
    }

    // MARK: statements

    enum Value {
        case integer(Int64)
        case text(String)
        case null
    }

    func handle(_ operation: String) throws -> OpaquePointer {
        guard let db = self.db else {
            throw QuotaDatabaseError(path: self.path, code: SQLITE_MISUSE, message: "the database is closed", operation: operation)
        }
        return db
    }

    private func failure(_ code: Int32, _ operation: String) -> QuotaDatabaseError {
        let message = self.db.map { String(cString: sqlite3_errmsg($0)) } ?? String(cString: sqlite3_errstr(code))
        return QuotaDatabaseError(path: self.path, code: code, message: message, operation: operation)
    }

    /// A cached statement prepared once for the life of the connection.
    private func prepared(_ sql: String, _ operation: String) throws -> OpaquePointer {
        if let statement = self.statements[sql] { return statement }
        let db = try self.handle(operation)
        var statement: OpaquePointer?
        let rc = sqlite3_prepare_v3(db, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &statement, nil)
        guard rc == SQLITE_OK, let statement else {
            sqlite3_finalize(statement)
            throw self.failure(rc, operation)
        }
        self.statements[sql] = statement
        return statement
    }

    /// Runs `sql` with `values` bound to ?1, ?2, ... and calls `row` for every result row.
    func query(
        _ sql: String, _ values: [Value], _ operation: String, _ row: (OpaquePointer) throws -> Void
    ) throws {
        let statement = try self.prepared(sql, operation)
        defer {
            sqlite3_reset(statement)
            sqlite3_clear_bindings(statement)
        }
        for (offset, value) in values.enumerated() {
            let index = Int32(offset + 1)
            let rc: Int32
            switch value {
            case .integer(let n):
                rc = sqlite3_bind_int64(statement, index, n)
            case .text(let s):
                rc = sqlite3_bind_text64(statement, index, s, sqlite3_uint64(s.utf8.count), Self.transient, UInt8(SQLITE_UTF8))
            case .null:
                rc = sqlite3_bind_null(statement, index)
            }
            guard rc == SQLITE_OK else { throw self.failure(rc, operation) }
        }
        while true {
            let rc = sqlite3_step(statement)
            if rc == SQLITE_DONE { return }
            guard rc == SQLITE_ROW else { throw self.failure(rc, operation) }
            try row(statement)
        }
    }

    func run(_ sql: String, _ values: [Value], _ operation: String) throws {
        try self.query(sql, values, operation) { _ in }
    }

    /// Runs fixed SQL (one or more statements, no parameters, not cached).
    func execute(_ sql: String, _ operation: String) throws {
        let db = try self.handle(operation)
        let rc = sqlite3_exec(db, sql, nil, nil, nil)
        guard rc == SQLITE_OK else { throw self.failure(rc, operation) }
    }

    func integer(_ sql: String, _ operation: String) throws -> Int64 {
        var value: Int64 = 0
        try self.query(sql, [], operation) { value = sqlite3_column_int64($0, 0) }
        return value
    }

    private func text(_ sql: String, _ operation: String) throws -> String {
        var value = ""
        try self.query(sql, [], operation) { value = Self.columnText($0, 0) }
        return value
    }

    func rollback() {
        guard let db = self.db, sqlite3_get_autocommit(db) == 0 else { return }
        sqlite3_exec(db, "ROLLBACK", nil, nil, nil)
    }

    static func columnText(_ statement: OpaquePointer, _ column: Int32) -> String {
        guard let bytes = sqlite3_column_text(statement, column) else { return "" }
        let count = Int(sqlite3_column_bytes(statement, column))
        return String(decoding: UnsafeBufferPointer(start: bytes, count: count), as: UTF8.self)
    }
}
