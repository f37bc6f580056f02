// Freezing in the quota stores, with an injected clock: refused, over-quota and held messages
// counted per uid in a sliding window, the freeze persistent, --thaw. The contract cases run
// against SQLite and PostgreSQL (which needs RESTRICTPD_TEST_POSTGRES, see
// StoreContractTests.swift); a PostgreSQL freeze holds for every host of its scope.

import Foundation
import QuotaStorePostgres
import RestrictPolicy
import Testing

@testable import QuotaStore

private let t0: Int64 = 1_700_000_000
private let threePerHour = FreezeRule(limit: 3, period: .hour)

/// What only the SQLite store shows; the cases both stores share are in `FreezeContract`.
@Suite struct FreezeTests {
    @Test func refusalsOutsideTheWindowArePruned() async throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        _ = try await db.strike(uid: 33, rule: threePerHour, now: t0)
        _ = try await db.strike(uid: 33, rule: threePerHour, now: t0 + 1800)
        // The first is an hour and a second old: two in the window, not three.
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 3601) == StrikeOutcome(count: 2, froze: false))
        #expect(try await db.frozen(uid: 33) == nil)
        // And pruned: the table keeps no more than one window's worth.
        #expect(try db.testingInteger("SELECT count(*) FROM refusal_event WHERE uid = 33") == 2)
        let perDay = FreezeRule(limit: 3, period: .day)
        #expect(try await db.strike(uid: 33, rule: perDay, now: t0 + 7200) == StrikeOutcome(count: 3, froze: true))
    }

    @Test func aFreezeSurvivesReopeningAndThawForgets() async throws {
        let dir = try TempDir()
        let path = dir.file("quota.db")
        do {
            let db = try QuotaDatabase(path: path)
            for i in 0..<3 { _ = try await db.strike(uid: 33, rule: threePerHour, now: t0 + Int64(i)) }
            db.close()
        }
        let reader = try QuotaDatabase(path: path, mode: .readOnly)
        #expect(try reader.frozenList(uid: nil).map(\.uid) == [33])
        reader.close()
        let db = try QuotaDatabase(path: path)
        #expect(try db.thaw(uid: 33))
        #expect(try await db.frozen(uid: 33) == nil)
        #expect(try db.thaw(uid: 33) == false)
        // Thawing forgets the counted refusals: the next one starts from one.
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 10) == StrikeOutcome(count: 1, froze: false))
    }

    @Test func aVersion1FileIsMigratedAndKeepsItsQuota() async throws {
        let dir = try TempDir()
        let path = dir.file("quota.db")
        do {
            let db = try QuotaDatabase(path: path)
            _ = try await db.admit(QuotaRequest(uid: 33, addresses: ["a@b.test"], quota: Quota(limit: 5, period: .day), now: t0))
            // Back to what version 1 wrote.
            try db.testingExecute(
                "DROP TABLE refusal_event; DROP TABLE frozen_uid; DROP TABLE quota_message; DROP TABLE stats_hour; PRAGMA user_version = 1")
            db.close()
        }
        let db = try QuotaDatabase(path: path)
        #expect(try db.testingInteger("PRAGMA user_version") == Int64(QuotaDatabase.schemaVersion))
        #expect(try db.entries(uid: 33).map(\.address) == ["a@b.test"])
        #expect(try await db.strike(uid: 33, rule: FreezeRule(limit: 1, period: .day), now: t0).froze)
    }
}

/// A store's freeze side under test: the daemon's `FreezeStore` and the admin's reads.
protocol FreezeUnderTest: FreezeStore {
    func frozenList(uid: UInt32?) async throws -> [FrozenState]
    @discardableResult func thaw(uid: UInt32) async throws -> Bool
}

extension QuotaDatabase: FreezeUnderTest {}
extension PostgresQuotaStore: FreezeUnderTest {}

/// The cases both stores share.
enum FreezeContract {
    static func theThirdRefusalInTheHourFreezes(_ db: some FreezeUnderTest) async throws {
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0) == StrikeOutcome(count: 1, froze: false))
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 600) == StrikeOutcome(count: 2, froze: false))
        #expect(try await db.frozen(uid: 33) == nil)
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 1200) == StrikeOutcome(count: 3, froze: true))
        #expect(try await db.frozen(uid: 33) == FrozenState(uid: 33, since: t0 + 1200, reason: "3 refusals per hour"))
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 1300) == StrikeOutcome(count: 4, froze: false))
        #expect(try await db.frozen(uid: 33)?.since == t0 + 1200)
        #expect(try await db.frozen(uid: 34) == nil)
        // A uid beyond Int32.
        #expect(try await db.strike(uid: 4_000_000_000, rule: FreezeRule(limit: 1, period: .day), now: t0).froze)
        #expect(try await db.frozenList(uid: nil).map(\.uid) == [33, 4_000_000_000])
    }

    static func refusalsOutsideTheWindowDoNotCount(_ db: some FreezeUnderTest) async throws {
        _ = try await db.strike(uid: 33, rule: threePerHour, now: t0)
        _ = try await db.strike(uid: 33, rule: threePerHour, now: t0 + 1800)
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 3601) == StrikeOutcome(count: 2, froze: false))
        #expect(try await db.frozen(uid: 33) == nil)
        // The first was pruned: a day's window now counts the two left and this one.
        #expect(try await db.strike(uid: 33, rule: FreezeRule(limit: 3, period: .day), now: t0 + 7200) == StrikeOutcome(count: 3, froze: true))
    }

    /// Postfix retrying one deferred message: its queue id counts once in the window.
    static func aRetriedMessageCountsOncePerWindow(_ db: some FreezeUnderTest) async throws {
        let q = "4dLk2X1a7Tz9"
        for dt: Int64 in [0, 300, 900] {
            #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + dt, queueID: q) == StrikeOutcome(count: 1, froze: false))
        }
        #expect(try await db.frozen(uid: 33) == nil)
        // Other messages, and strikes without a queue id (the SMTP door), count as before.
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 1000, queueID: "5eMm3Y2b8Ua0") == StrikeOutcome(count: 2, froze: false))
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 1100, queueID: nil) == StrikeOutcome(count: 3, froze: true))
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 1150, queueID: nil) == StrikeOutcome(count: 4, froze: false))
        // The same queue id of another uid is another message; once its first try has left
        // the window, a retry counts again.
        #expect(try await db.strike(uid: 34, rule: threePerHour, now: t0 + 1200, queueID: q) == StrikeOutcome(count: 1, froze: false))
        #expect(try await db.strike(uid: 34, rule: threePerHour, now: t0 + 1300, queueID: "6fNn4Z3c9Vb1") == StrikeOutcome(count: 2, froze: false))
        #expect(try await db.strike(uid: 34, rule: threePerHour, now: t0 + 1200 + 3599, queueID: q) == StrikeOutcome(count: 2, froze: false))
        #expect(try await db.strike(uid: 34, rule: threePerHour, now: t0 + 1200 + 3601, queueID: q) == StrikeOutcome(count: 2, froze: false))
        #expect(try await db.strike(uid: 34, rule: threePerHour, now: t0 + 1200 + 3602, queueID: q) == StrikeOutcome(count: 2, froze: false))
        #expect(try await db.strike(uid: 34, rule: threePerHour, now: t0 + 1300 + 3601, queueID: nil) == StrikeOutcome(count: 2, froze: false))
    }

    static func thawForgets(_ db: some FreezeUnderTest) async throws {
        for i in 0..<3 { _ = try await db.strike(uid: 33, rule: threePerHour, now: t0 + Int64(i)) }
        #expect(try await db.frozenList(uid: 33).map(\.uid) == [33])
        #expect(try await db.thaw(uid: 33))
        #expect(try await db.frozen(uid: 33) == nil)
        #expect(try await db.thaw(uid: 33) == false)
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 10) == StrikeOutcome(count: 1, froze: false))
    }

    /// Strikes at once: exactly one of them freezes, and the count reaches the total.
    static func concurrentStrikesFreezeOnce(_ stores: [any FreezeUnderTest]) async throws {
        let rule = FreezeRule(limit: 20, period: .hour)
        let outcomes = try await withThrowingTaskGroup(of: StrikeOutcome.self) { group in
            for i in 0..<60 {
                let db = stores[i % stores.count]
                group.addTask { try await db.strike(uid: 33, rule: rule, now: t0) }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(outcomes.filter(\.froze).count == 1)
        #expect(outcomes.first(where: \.froze)?.count == 20)
        #expect(Set(outcomes.map(\.count)) == Set(1...60))
    }
}

@Suite("freezing contract: SQLite") struct SQLiteFreezeContract {
    private func store(_ dir: TempDir) throws -> QuotaDatabase { try QuotaDatabase(path: dir.file("quota.db")) }
    @Test func thirdFreezes() async throws { let d = try TempDir(); try await FreezeContract.theThirdRefusalInTheHourFreezes(try store(d)) }
    @Test func window() async throws { let d = try TempDir(); try await FreezeContract.refusalsOutsideTheWindowDoNotCount(try store(d)) }
    @Test func thaw() async throws { let d = try TempDir(); try await FreezeContract.thawForgets(try store(d)) }
    @Test func retries() async throws { let d = try TempDir(); try await FreezeContract.aRetriedMessageCountsOncePerWindow(try store(d)) }
    @Test func concurrent() async throws {
        let d = try TempDir()
        try await FreezeContract.concurrentStrikesFreezeOnce([try store(d), try store(d)])
    }
}

@Suite("freezing contract: PostgreSQL", .enabled(if: TestPostgres.uri != nil, Comment(rawValue: TestPostgres.missing)))
struct PostgresFreezeContract {
    @Test func thirdFreezes() async throws {
        let s = try await TestPostgres.store()
        defer { s.shutdown() }
        try await FreezeContract.theThirdRefusalInTheHourFreezes(s)
    }
    @Test func window() async throws {
        let s = try await TestPostgres.store()
        defer { s.shutdown() }
        try await FreezeContract.refusalsOutsideTheWindowDoNotCount(s)
    }
    @Test func thaw() async throws {
        let s = try await TestPostgres.store()
        defer { s.shutdown() }
        try await FreezeContract.thawForgets(s)
    }
    @Test func retries() async throws {
        let s = try await TestPostgres.store()
        defer { s.shutdown() }
        try await FreezeContract.aRetriedMessageCountsOncePerWindow(s)
    }
    /// Two hosts of one scope: their strikes count together and freeze once.
    @Test func concurrent() async throws {
        let scope = "freeze-" + UUID().uuidString
        let a = try await TestPostgres.store(scope: scope)
        let b = try await TestPostgres.store(scope: scope)
        defer { a.shutdown(); b.shutdown() }
        try await FreezeContract.concurrentStrikesFreezeOnce([a, b])
    }

    /// A farm: a uid frozen by one host is frozen on every host of its scope, and a thaw on
    /// any of them thaws it for all; another scope is not touched.
    @Test func aFreezeHoldsForTheScopeOnly() async throws {
        let scope = "farm-" + UUID().uuidString
        let a = try await TestPostgres.store(scope: scope)
        let b = try await TestPostgres.store(scope: scope)
        let other = try await TestPostgres.store()
        defer { a.shutdown(); b.shutdown(); other.shutdown() }
        let once = FreezeRule(limit: 2, period: .hour)
        #expect(try await a.strike(uid: 33, rule: once, now: t0) == StrikeOutcome(count: 1, froze: false))
        #expect(try await b.strike(uid: 33, rule: once, now: t0 + 1) == StrikeOutcome(count: 2, froze: true))
        #expect(try await a.frozen(uid: 33) == FrozenState(uid: 33, since: t0 + 1, reason: "2 refusals per hour"))
        #expect(try await other.frozen(uid: 33) == nil)
        #expect(try await other.strike(uid: 33, rule: once, now: t0 + 2) == StrikeOutcome(count: 1, froze: false))
        #expect(try await other.frozenList(uid: nil).isEmpty)
        #expect(try await a.thaw(uid: 33))
        #expect(try await b.frozen(uid: 33) == nil)
        #expect(try await b.frozenList(uid: nil).isEmpty)
    }
}
