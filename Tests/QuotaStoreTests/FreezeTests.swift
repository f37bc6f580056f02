// Freezing in the SQLite store, with an injected clock: refused, over-quota and held messages
// counted per uid in a sliding window, the freeze persistent, --thaw.

import Foundation
import RestrictPolicy
import Testing

@testable import QuotaStore

private let t0: Int64 = 1_700_000_000
private let threePerHour = FreezeRule(limit: 3, period: .hour)

@Suite struct FreezeTests {
    @Test func theThirdRefusalInTheHourFreezes() async throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0) == StrikeOutcome(count: 1, froze: false))
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 600) == StrikeOutcome(count: 2, froze: false))
        #expect(try await db.frozen(uid: 33) == nil)
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 1200) == StrikeOutcome(count: 3, froze: true))
        #expect(try await db.frozen(uid: 33) == FrozenState(uid: 33, since: t0 + 1200, reason: "3 refusals per hour"))
        // Frozen once: later strikes count but do not freeze again (the since stays).
        #expect(try await db.strike(uid: 33, rule: threePerHour, now: t0 + 1300) == StrikeOutcome(count: 4, froze: false))
        #expect(try await db.frozen(uid: 33)?.since == t0 + 1200)
        // Other uids are not touched.
        #expect(try await db.frozen(uid: 34) == nil)
    }

    @Test func refusalsOutsideTheWindowDoNotCount() async throws {
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
