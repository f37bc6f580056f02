// The freeze tables of the quota database (schema version 2): refused, over-quota and held
// messages per uid, and the frozen uids. Same threading as the quota: every SQLite call on the
// database's serial queue, a strike checked and recorded in one BEGIN IMMEDIATE transaction.

public import RestrictPolicy
import CSQLite

extension QuotaConnection {
    private static let pruneEvents = "DELETE FROM refusal_event WHERE uid = ?1 AND at < ?2"
    private static let insertEvent = "INSERT INTO refusal_event (uid, at, queue_id) VALUES (?1, ?2, ?3)"
    private static let seenEvent = "SELECT count(*) FROM refusal_event WHERE uid = ?1 AND queue_id = ?2 AND at >= ?3"
    private static let countEvents = "SELECT count(*) FROM refusal_event WHERE uid = ?1 AND at >= ?2"
    private static let selectFrozen = "SELECT uid, since, reason FROM frozen_uid WHERE uid = ?1"
    private static let insertFrozen = "INSERT OR IGNORE INTO frozen_uid (uid, since, reason) VALUES (?1, ?2, ?3)"

    func strike(uid: UInt32, rule: FreezeRule, now: Int64, queueID: String?) throws -> StrikeOutcome {
        try self.execute("BEGIN IMMEDIATE", "starting a write transaction")
        do {
            let id = Int64(uid)
            let start = rule.windowStart(now: now)
            try self.run(Self.pruneEvents, [.integer(id), .integer(start)], "pruning refusals")
            var seen: Int64 = 0
            if let queueID {
                try self.query(Self.seenEvent, [.integer(id), .text(queueID), .integer(start)], "looking for a retry") {
                    seen = sqlite3_column_int64($0, 0)
                }
            }
            if seen == 0 {
                try self.run(Self.insertEvent, [.integer(id), .integer(now), queueID.map { .text($0) } ?? .null], "counting a refusal")
            }
            var count: Int64 = 0
            try self.query(Self.countEvents, [.integer(id), .integer(start)], "counting refusals") { count = sqlite3_column_int64($0, 0) }
            var froze = false
            if seen == 0, rule.freezes(count: Int(count)), try self.frozen(uid: uid) == nil {
                try self.run(Self.insertFrozen, [.integer(id), .integer(now), .text(rule.description)], "freezing")
                froze = true
            }
            try self.execute("COMMIT", "committing")
            return StrikeOutcome(count: Int(count), froze: froze)
        } catch {
            self.rollback()
            throw error
        }
    }

    func frozen(uid: UInt32?) throws -> FrozenState? { try self.frozenList(uid: uid).first }

    func frozenList(uid: UInt32?) throws -> [FrozenState] {
        var list: [FrozenState] = []
        let sql = uid == nil ? "SELECT uid, since, reason FROM frozen_uid ORDER BY uid" : Self.selectFrozen
        try self.query(sql, uid.map { [.integer(Int64($0))] } ?? [], "reading frozen uids") { statement in
            guard let uid = UInt32(exactly: sqlite3_column_int64(statement, 0)) else { return }
            list.append(FrozenState(uid: uid, since: sqlite3_column_int64(statement, 1), reason: Self.columnText(statement, 2)))
        }
        return list
    }

    /// Thaws `uid` and forgets its counted refusals; true when it was frozen.
    func thaw(uid: UInt32) throws -> Bool {
        try self.execute("BEGIN IMMEDIATE", "starting a write transaction")
        do {
            let db = try self.handle("thawing")
            try self.run("DELETE FROM frozen_uid WHERE uid = ?1", [.integer(Int64(uid))], "thawing")
            let was = sqlite3_changes64(db) > 0
            try self.run("DELETE FROM refusal_event WHERE uid = ?1", [.integer(Int64(uid))], "thawing")
            try self.execute("COMMIT", "committing")
            return was
        } catch {
            self.rollback()
            throw error
        }
    }
}

extension QuotaDatabase: FreezeStore {
    public func strike(uid: UInt32, rule: FreezeRule, now: Int64, queueID: String?) async throws -> StrikeOutcome {
        try await self.onQueue { try $0.strike(uid: uid, rule: rule, now: now, queueID: queueID) }
    }

    public func frozen(uid: UInt32) async throws -> FrozenState? {
        try await self.onQueue { try $0.frozen(uid: uid) }
    }

    /// The frozen uids (all when nil), for --quota.
    public func frozenList(uid: UInt32?) throws -> [FrozenState] {
        try self.queue.sync { try self.connection.frozenList(uid: uid) }
    }

    /// Thaws `uid` (restrictpd --thaw); true when it was frozen.
    @discardableResult
    public func thaw(uid: UInt32) throws -> Bool {
        try self.queue.sync { try self.connection.thaw(uid: uid) }
    }

    private func onQueue<T: Sendable>(_ body: @escaping @Sendable (QuotaConnection) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            self.queue.async { continuation.resume(with: Result { try body(self.connection) }) }
        }
    }
}

extension LazyQuotaStore: FreezeStore {
    public func strike(uid: UInt32, rule: FreezeRule, now: Int64, queueID: String?) async throws -> StrikeOutcome {
        try await self.database().strike(uid: uid, rule: rule, now: now, queueID: queueID)
    }

    public func frozen(uid: UInt32) async throws -> FrozenState? {
        try await self.database().frozen(uid: uid)
    }
}
