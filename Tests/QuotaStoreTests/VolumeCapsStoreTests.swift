// Volume caps in the SQLite store: counted with the arbitrary addresses in one transaction,
// race-free, pruned, and the schema migration that added them.

import Foundation
import RestrictPolicy
import Testing

@testable import QuotaStore

/// A fresh directory under /tmp, removed when released.
private final class CapsTempDir: Sendable {
    let path: String

    init() throws {
        let path = NSTemporaryDirectory() + "restrictpd-caps-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
        self.path = path
    }

    func file(_ name: String) -> String { self.path + "/" + name }

    deinit { try? FileManager.default.removeItem(atPath: self.path) }
}

private let t0: Int64 = 1_700_000_000
private let tenPerHour = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 10, period: .hour))

private func message(
    _ uid: UInt32, _ now: Int64, caps: VolumeCaps = tenPerHour, recipients: Int = 1, addresses: [String] = [], quota: Quota? = nil
) -> QuotaRequest {
    QuotaRequest(uid: uid, addresses: addresses, quota: quota, now: now, caps: caps, recipients: recipients)
}

@Suite struct VolumeCapsStoreTests {
    @Test func concurrentAdmitsAdmitExactlyTheCap() async throws {
        let dir = try CapsTempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let outcomes = try await withThrowingTaskGroup(of: QuotaOutcome.self) { group in
            for _ in 0..<200 {
                group.addTask { try await db.admit(message(33, t0)) }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        let admitted = outcomes.filter(\.admitted)
        #expect(admitted.count == 10)
        #expect(Set(admitted.compactMap { $0.cap(.messages)?.used }) == Set(1...10))
        #expect(outcomes.filter { !$0.admitted }.allSatisfy { $0.refusedCap == .cap(VolumeCap(kind: .messages, limit: 10, period: .hour)) })
        #expect(try db.testingInteger("SELECT count(*) FROM quota_message") == 10)
    }

    @Test func twoConnectionsToOneFileNeverExceedTheCap() async throws {
        let dir = try CapsTempDir()
        let path = dir.file("quota.db")
        let a = try QuotaDatabase(path: path)
        let b = try QuotaDatabase(path: path)
        let outcomes = try await withThrowingTaskGroup(of: Bool.self) { group in
            for i in 0..<60 {
                let db = i % 2 == 0 ? a : b
                group.addTask { try await db.admit(message(33, t0)).admitted }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(outcomes.filter { $0 }.count == 10)
    }

    @Test func edgesAndSlidingWindowPersist() async throws {
        let dir = try CapsTempDir()
        let path = dir.file("quota.db")
        let caps = VolumeCaps(recipients: VolumeCap(kind: .recipients, limit: 5, period: .hour))
        do {
            let db = try QuotaDatabase(path: path)
            #expect(try await db.admit(message(33, t0, caps: caps, recipients: 3)).admitted)
            db.close()
        }
        let db = try QuotaDatabase(path: path)
        let over = try await db.admit(message(33, t0 + 10, caps: caps, recipients: 3))
        #expect(!over.admitted && over.cap(.recipients)?.used == 3)
        let exactly = try await db.admit(message(33, t0 + 20, caps: caps, recipients: 2))
        #expect(exactly.admitted && exactly.cap(.recipients)?.description == "0/5 per hour")
        #expect(try await !db.admit(message(33, t0 + 3600, caps: caps, recipients: 1)).admitted)
        // The first message left the window; the second (2 recipients) still counts.
        let slid = try await db.admit(message(33, t0 + 3601, caps: caps, recipients: 3))
        #expect(slid.admitted && slid.cap(.recipients)?.used == 5)
        // Another uid has its own count.
        #expect(try await db.admit(message(34, t0 + 3601, caps: caps, recipients: 5)).admitted)
    }

    @Test func bothCapsInOneWindowOrTwo() async throws {
        let dir = try CapsTempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let same = VolumeCaps(
            messages: VolumeCap(kind: .messages, limit: 3, period: .hour), recipients: VolumeCap(kind: .recipients, limit: 4, period: .hour))
        let first = try await db.admit(message(33, t0, caps: same, recipients: 3))
        #expect(first.admitted && first.caps.map(\.used) == [1, 3])
        let over = try await db.admit(message(33, t0 + 1, caps: same, recipients: 2))
        #expect(!over.admitted && over.refusedCap == .cap(VolumeCap(kind: .recipients, limit: 4, period: .hour)))
        let two = VolumeCaps(
            messages: VolumeCap(kind: .messages, limit: 1, period: .hour), recipients: VolumeCap(kind: .recipients, limit: 10, period: .week))
        let later = try await db.admit(message(33, t0 + 3601, caps: two, recipients: 2))
        #expect(later.admitted && later.caps.map(\.used) == [1, 5])
    }

    @Test func refusedByEitherNothingRecorded() async throws {
        let dir = try CapsTempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let quota = Quota(limit: 1, period: .day)
        let one = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 1, period: .hour))
        #expect(try await db.admit(message(33, t0, caps: one, addresses: ["a@x.org"], quota: quota)).admitted)
        // The cap refuses a repeat address: its last_seen is not refreshed.
        let capped = try await db.admit(message(33, t0 + 5, caps: one, addresses: ["a@x.org"], quota: quota))
        #expect(!capped.admitted && capped.refusedCap != nil)
        #expect(try db.entries(uid: 33).map(\.lastSeen) == [t0])
        // The quota refuses: no message row.
        let two = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 2, period: .hour))
        let refused = try await db.admit(message(33, t0 + 6, caps: two, addresses: ["b@x.org"], quota: quota))
        #expect(!refused.admitted && refused.firstRefused == "b@x.org" && refused.refusedCap == nil)
        #expect(try db.testingInteger("SELECT count(*) FROM quota_message") == 1)
        // A peek records nothing.
        #expect(try db.peek(message(33, t0 + 7, caps: two)).admitted)
        #expect(try db.testingInteger("SELECT count(*) FROM quota_message") == 1)
    }

    @Test func messageRowsArePrunedAndStayBounded() async throws {
        let dir = try CapsTempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let caps = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 1000, period: .hour))
        // Two simulated days, one message a minute: at most one hour's worth stays.
        for minute in 0..<(2 * 24 * 60) {
            #expect(try await db.admit(message(33, t0 + Int64(minute) * 60, caps: caps)).admitted)
        }
        #expect(try db.testingInteger("SELECT count(*) FROM quota_message WHERE uid = 33") <= 61)
        #expect(try db.reset(uid: 33) >= 60)
        #expect(try db.testingInteger("SELECT count(*) FROM quota_message") == 0)
    }

    @Test func versionOneFileIsMigratedKeepingItsRows() async throws {
        let dir = try CapsTempDir()
        let path = dir.file("quota.db")
        do {
            let db = try QuotaDatabase(path: path)
            _ = try await db.admit(QuotaRequest(uid: 33, addresses: ["a@x.org"], quota: Quota(limit: 5, period: nil), now: t0))
            // Back to what version 1 wrote.
            try db.testingExecute(
                "DROP TABLE quota_message; DROP TABLE stats_hour; DROP TABLE refusal_event; DROP TABLE frozen_uid; PRAGMA user_version = 1")
            db.close()
        }
        let db = try QuotaDatabase(path: path)
        #expect(try db.testingInteger("PRAGMA user_version") == Int64(QuotaDatabase.schemaVersion))
        #expect(try db.entries(uid: 33).map(\.address) == ["a@x.org"])
        #expect(try await db.admit(message(33, t0)).admitted)
        #expect(try db.testingInteger("SELECT count(*) FROM quota_message") == 1)
    }
}

@Suite struct StatisticsStoreTests {
    @Test func addsUpAndStaysBoundedOverMonths() async throws {
        let dir = try CapsTempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let retentionHours: Int64 = 35 * 24
        let firstHour = t0 / 3600
        // Three simulated months, a flush every hour for two users.
        for hour in firstHour..<(firstHour + 90 * 24) {
            let rows = [StatsRow(uid: 33, hour: hour, relayed: 2, refused: 1), StatsRow(uid: 34, hour: hour, deferred: 1, strangers: 1)]
            try await db.addStats(rows, keepFrom: hour - retentionHours)
        }
        let last = firstHour + 90 * 24 - 1
        #expect(try db.testingInteger("SELECT count(*) FROM stats_hour") == 2 * (retentionHours + 1))
        try await db.addStats([StatsRow(uid: 33, hour: last, relayed: 5, strangers: 3)], keepFrom: last - retentionHours)
        let recent = try db.stats(uid: 33, since: last)
        #expect(recent == [StatsRow(uid: 33, hour: last, relayed: 7, refused: 1, strangers: 3)])
        #expect(try db.stats(uid: nil, since: last).count == 2)
    }
}
