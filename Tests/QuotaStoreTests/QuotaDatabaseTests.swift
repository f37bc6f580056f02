// The SQLite quota store on real files in a temporary directory.

import Foundation
import Logging
import RestrictPolicy
import Testing

@testable import QuotaStore

/// A fresh directory under /tmp, removed when released.
final class TempDir: Sendable {
    let path: String

    init() throws {
        var base = NSTemporaryDirectory()
        while base.count > 1 && base.hasSuffix("/") { base.removeLast() }
        var template = Array((base + "/restrictpd-quota-XXXXXX").utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer -> Bool in
            guard let base = buffer.baseAddress else { return false }
            return mkdtemp(base) != nil
        }
        guard made else { throw CocoaError(.fileWriteUnknown) }
        self.path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    func file(_ name: String) -> String { self.path + "/" + name }

    deinit { try? FileManager.default.removeItem(atPath: self.path) }
}

private let day = Quota(limit: 10, period: .day)
private let t0: Int64 = 1_700_000_000

private func request(_ uid: UInt32, _ addresses: [String], _ quota: Quota, _ now: Int64) -> QuotaRequest {
    QuotaRequest(uid: uid, addresses: addresses, quota: quota, now: now)
}

private func addresses(_ db: QuotaDatabase, _ uid: UInt32) throws -> [String] {
    try db.entries(uid: uid).map(\.address).sorted()
}

/// A database with one address recorded for `uid` and no room for more pages (max_page_count
/// stands in for a full disk, which also fails for root), and a request too big to fit.
private func fullDatabase(_ dir: TempDir, seed uid: UInt32) async throws -> (QuotaDatabase, [String]) {
    let db = try QuotaDatabase(path: dir.file("quota.db"))
    _ = try await db.admit(request(uid, ["a@x.org"], day, t0))
    let pages = try db.testingInteger("PRAGMA page_count")
    try db.testingExecute("PRAGMA max_page_count = \(pages)")
    return (db, (0..<2000).map { "recipient-with-a-rather-long-local-part-\($0)@example.org" })
}

/// True when opening the file, listing it or admitting into it throws (and nothing crashes).
private func openingOrUsingThrows(_ path: String) async -> Bool {
    do {
        let db = try QuotaDatabase(path: path)
        _ = try db.entries(uid: nil)
        _ = try await db.admit(request(33, ["new@example.org"], day, t0))
        _ = try db.entries(uid: nil)
        return false
    } catch is QuotaDatabaseError {
        return true
    } catch {
        Issue.record("unexpected error type: \(error)")
        return true
    }
}

@Suite struct QuotaDatabaseTests {
    // MARK: decisions

    @Test func persistsAcrossCloseAndReopen() async throws {
        let dir = try TempDir()
        let path = dir.file("quota.db")
        do {
            let db = try QuotaDatabase(path: path)
            let outcome = try await db.admit(request(33, ["a@x.org", "b@x.org"], day, t0))
            #expect(outcome == QuotaOutcome(admitted: true, used: 2, limit: 10, firstRefused: nil))
            db.close()
        }
        let db = try QuotaDatabase(path: path)
        #expect(try addresses(db, 33) == ["a@x.org", "b@x.org"])
        let outcome = try await db.admit(request(33, ["c@x.org"], day, t0 + 60))
        #expect(outcome.admitted && outcome.used == 3)
        let entries = try db.entries(uid: 33)
        #expect(entries.first == QuotaEntry(uid: 33, address: "a@x.org", firstSeen: t0, lastSeen: t0))
    }

    @Test func closedDatabaseThrows() async throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        db.close()
        await #expect(throws: QuotaDatabaseError.self) { try await db.admit(request(33, ["a@x.org"], day, t0)) }
        #expect(throws: QuotaDatabaseError.self) { try db.entries(uid: nil) }
    }

    @Test func slidingWindowEdges() async throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let hour = Quota(limit: 2, period: .hour)
        #expect(try await db.admit(request(33, ["a@x.org"], hour, t0)).admitted)
        #expect(try await db.admit(request(33, ["b@x.org"], hour, t0 + 10)).admitted)
        let full = try await db.admit(request(33, ["c@x.org"], hour, t0 + 20))
        #expect(full == QuotaOutcome(admitted: false, used: 2, limit: 2, firstRefused: "c@x.org"))
        // windowStart = now - 3600 = t0: a row with last_seen == windowStart still counts.
        #expect(try await !db.admit(request(33, ["c@x.org"], hour, t0 + 3600)).admitted)
        #expect(try db.count(uid: 33, windowStart: t0) == 2)
        // One second later a@ has left the window: c@ fits, b@ still counts.
        let later = try await db.admit(request(33, ["c@x.org"], hour, t0 + 3601))
        #expect(later == QuotaOutcome(admitted: true, used: 2, limit: 2, firstRefused: nil))
        // a@ was pruned from the file; b@ and c@ remain.
        #expect(try addresses(db, 33) == ["b@x.org", "c@x.org"])
        // A repeat refreshes last_seen: b@ used again at t0 + 3605 stays counted past t0 + 10 + 3600.
        #expect(try await db.admit(request(33, ["b@x.org"], hour, t0 + 3605)).admitted)
        let afterB = try await db.admit(request(33, ["d@x.org"], hour, t0 + 3611))
        #expect(!afterB.admitted && afterB.used == 2)
        #expect(try db.entries(uid: 33).first { $0.address == "b@x.org" } == QuotaEntry(uid: 33, address: "b@x.org", firstSeen: t0 + 10, lastSeen: t0 + 3605))
    }

    @Test func noPeriodIsALearnedAllowList() async throws {
        let dir = try TempDir()
        let path = dir.file("quota.db")
        let forever = Quota(limit: 2, period: nil)
        do {
            let db = try QuotaDatabase(path: path)
            #expect(try await db.admit(request(33, ["a@x.org", "b@x.org"], forever, t0)).admitted)
            #expect(try await !db.admit(request(33, ["c@x.org"], forever, t0 + 1)).admitted)
        }
        let db = try QuotaDatabase(path: path)
        let tenYears: Int64 = 10 * 365 * 86400
        let c = try await db.admit(request(33, ["c@x.org"], forever, t0 + tenYears))
        #expect(c == QuotaOutcome(admitted: false, used: 2, limit: 2, firstRefused: "c@x.org"))
        #expect(try await db.admit(request(33, ["b@x.org", "a@x.org"], forever, t0 + tenYears)).admitted)
        #expect(try addresses(db, 33) == ["a@x.org", "b@x.org"])
    }

    @Test func repeatsAreFree() async throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let one = Quota(limit: 1, period: .day)
        for i in 0..<5 {
            let outcome = try await db.admit(request(33, ["a@x.org"], one, t0 + Int64(i)))
            #expect(outcome == QuotaOutcome(admitted: true, used: 1, limit: 1, firstRefused: nil))
        }
        #expect(try await !db.admit(request(33, ["b@x.org"], one, t0 + 10)).admitted)
        #expect(try db.entries(uid: 33) == [QuotaEntry(uid: 33, address: "a@x.org", firstSeen: t0, lastSeen: t0 + 4)])
    }

    @Test func refusedDecisionRecordsNothing() async throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let two = Quota(limit: 2, period: .day)
        #expect(try await db.admit(request(33, ["a@x.org"], two, t0)).admitted)
        let refused = try await db.admit(request(33, ["a@x.org", "b@x.org", "c@x.org"], two, t0 + 100))
        #expect(refused == QuotaOutcome(admitted: false, used: 1, limit: 2, firstRefused: "c@x.org"))
        // Neither b@ (which would have fitted) is recorded nor a@'s time refreshed.
        #expect(try db.entries(uid: 33) == [QuotaEntry(uid: 33, address: "a@x.org", firstSeen: t0, lastSeen: t0)])
    }

    @Test func usersAreCountedSeparately() async throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let one = Quota(limit: 1, period: nil)
        #expect(try await db.admit(request(33, ["a@x.org"], one, t0)).admitted)
        #expect(try await db.admit(request(34, ["b@x.org"], one, t0)).admitted)
        #expect(try await !db.admit(request(33, ["b@x.org"], one, t0)).admitted)
    }

    @Test func peekDecidesWithoutRecording() async throws {
        let dir = try TempDir()
        let path = dir.file("quota.db")
        let writer = try QuotaDatabase(path: path)
        let two = Quota(limit: 2, period: .day)
        #expect(try await writer.admit(request(33, ["a@x.org"], two, t0)).admitted)
        let reader = try QuotaDatabase(path: path, mode: .readOnly)
        #expect(try reader.peek(request(33, ["b@x.org"], two, t0 + 1)) == QuotaOutcome(admitted: true, used: 2, limit: 2, firstRefused: nil))
        #expect(try reader.peek(request(33, ["b@x.org", "c@x.org"], two, t0 + 1)).firstRefused == "c@x.org")
        #expect(try writer.peek(request(33, ["b@x.org"], two, t0 + 1)).admitted)
        #expect(try addresses(writer, 33) == ["a@x.org"])
        #expect(try addresses(reader, 33) == ["a@x.org"])
    }

    // MARK: concurrency

    @Test func concurrentAdmitsNeverExceedTheQuota() async throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let outcomes = try await withThrowingTaskGroup(of: QuotaOutcome.self) { group in
            for i in 0..<200 {
                group.addTask { try await db.admit(request(33, ["r\(i)@x.org"], day, t0)) }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        let admitted = outcomes.filter(\.admitted)
        #expect(admitted.count == 10)
        #expect(Set(admitted.map(\.used)) == Set(1...10))
        #expect(outcomes.filter { !$0.admitted }.allSatisfy { $0.used == 10 && $0.firstRefused != nil })
        #expect(try db.entries(uid: 33).count == 10)
        #expect(try db.count(uid: 33, windowStart: nil) == 10)
    }

    /// Also without a period: then admit deletes nothing, so only BEGIN IMMEDIATE (not the
    /// prune's write) takes the write lock before the read.
    @Test(arguments: [day, Quota(limit: 10, period: nil)])
    func twoConnectionsOnOneFileNeverExceedTheQuota(quota: Quota) async throws {
        let dir = try TempDir()
        let path = dir.file("quota.db")
        // The daemon's connection and two more (admin command line, a second daemon).
        let connections = try (0..<3).map { _ in try QuotaDatabase(path: path) }
        for uid: UInt32 in 33..<38 {
            let outcomes = try await withThrowingTaskGroup(of: QuotaOutcome.self) { group in
                for i in 0..<200 {
                    let db = connections[i % connections.count]
                    group.addTask { try await db.admit(request(uid, ["r\(i)@x.org"], quota, t0)) }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(outcomes.filter(\.admitted).count == 10)
            for db in connections { #expect(try db.entries(uid: uid).count == 10) }
        }
    }

    // MARK: pruning

    @Test func slidingWindowFileDoesNotGrowWithoutBound() async throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let quota = Quota(limit: 1000, period: .hour)
        let users: [UInt32] = Array(1000..<1020)
        var midPages: Int64 = 0
        // Every minute every user writes to a new address, for three hours.
        for minute in 0..<180 {
            let now = t0 + Int64(minute) * 60
            for uid in users {
                #expect(try await db.admit(request(uid, ["m\(minute)-\(uid)@x.org"], quota, now)).admitted)
            }
            if minute == 90 { midPages = try db.testingInteger("PRAGMA page_count") }
        }
        // Only the last hour (61 minutes, both window ends inclusive) is kept.
        #expect(try db.entries(uid: nil).count == users.count * 61)
        #expect(try db.count(uid: 1000, windowStart: nil) == 61)
        let endPages = try db.testingInteger("PRAGMA page_count")
        #expect(midPages > 5)
        #expect(endPages <= midPages + 2, "pages: \(midPages) after 90 minutes, \(endPages) after 180")
    }

    // MARK: schema

    @Test func newFileGetsTheCurrentSchema() throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        #expect(try db.testingInteger("PRAGMA user_version") == Int64(QuotaDatabase.schemaVersion))
        #expect(QuotaDatabase.schemaVersion == 4)
        #expect(try db.testingInteger("PRAGMA application_id") == Int64(QuotaSchema.applicationID))
        #expect(try db.testingInteger("SELECT count(*) FROM pragma_journal_mode WHERE journal_mode = 'wal'") == 1)
        // Reopening a current file changes nothing and keeps the rows.
        db.close()
        let again = try QuotaDatabase(path: dir.file("quota.db"))
        #expect(try again.testingInteger("PRAGMA user_version") == Int64(QuotaDatabase.schemaVersion))
    }

    @Test func newerSchemaVersionIsRefused() throws {
        let dir = try TempDir()
        let path = dir.file("quota.db")
        do {
            let db = try QuotaDatabase(path: path)
            try db.testingExecute("PRAGMA user_version = \(QuotaDatabase.schemaVersion + 1)")
        }
        for mode in [QuotaDatabase.Mode.readWrite, .readOnly] {
            let error = #expect(throws: QuotaDatabaseError.self) { try QuotaDatabase(path: path, mode: mode) }
            #expect(error?.message == "quota database schema version \(QuotaDatabase.schemaVersion + 1) is newer than this restrictpd understands (\(QuotaDatabase.schemaVersion))")
            #expect(error?.description.contains(path) == true)
        }
    }

    @Test func foreignSQLiteFileIsRefusedNotAltered() throws {
        let dir = try TempDir()
        let path = dir.file("other.db")
        do {
            let db = try QuotaDatabase(path: path)
            try db.testingExecute("PRAGMA application_id = 42")
        }
        let error = #expect(throws: QuotaDatabaseError.self) { try QuotaDatabase(path: path) }
        #expect(error?.message.contains("not a restrictpd quota database") == true)
    }

    // MARK: failures

    @Test func garbageFileThrows() async throws {
        let dir = try TempDir()
        let path = dir.file("quota.db")
        try Data(repeating: 0x5A, count: 10_000).write(to: URL(fileURLWithPath: path))
        let error = #expect(throws: QuotaDatabaseError.self) { try QuotaDatabase(path: path) }
        #expect(error?.primaryCode == 26)  // SQLITE_NOTADB
        #expect(await openingOrUsingThrows(path))
    }

    @Test func directoryAndImpossiblePathsThrow() async throws {
        let dir = try TempDir()
        let plain = dir.file("plain")
        try Data("x".utf8).write(to: URL(fileURLWithPath: plain))
        // These fail for root too: a directory is no database, and no file can exist below a
        // regular file or in a missing directory.
        for path in [dir.path, plain + "/quota.db", dir.file("missing/quota.db")] {
            #expect(throws: QuotaDatabaseError.self) { try QuotaDatabase(path: path) }
            #expect(await openingOrUsingThrows(path))
        }
        // Read-only mode never creates the file.
        #expect(throws: QuotaDatabaseError.self) { try QuotaDatabase(path: dir.file("absent.db"), mode: .readOnly) }
        #expect(!FileManager.default.fileExists(atPath: dir.file("absent.db")))
    }

    /// A file with a few hundred rows spread over several pages, closed (WAL checkpointed).
    private func populated(_ dir: TempDir) async throws -> (path: String, pages: Int64) {
        let path = dir.file("quota.db")
        let db = try QuotaDatabase(path: path)
        for i in 0..<40 {
            let batch = (0..<25).map { "someone-with-a-long-name-\(i)-\($0)@example.org" }
            _ = try await db.admit(request(UInt32(i), batch, Quota(limit: 100, period: nil), t0))
        }
        let pages = try db.testingInteger("PRAGMA page_count")
        db.close()
        #expect(!FileManager.default.fileExists(atPath: path + "-wal"))
        return (path, pages)
    }

    @Test func truncatedFileThrows() async throws {
        let dir = try TempDir()
        let (path, pages) = try await self.populated(dir)
        #expect(pages > 4)
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try handle.truncate(atOffset: 2 * 4096)
        try handle.close()
        #expect(await openingOrUsingThrows(path))
    }

    @Test func overwrittenPagesThrow() async throws {
        let dir = try TempDir()
        let (path, pages) = try await self.populated(dir)
        #expect(pages > 4)
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try handle.seek(toOffset: 4096)
        try handle.write(contentsOf: Data(repeating: 0xA5, count: Int(pages - 1) * 4096))
        try handle.close()
        #expect(await openingOrUsingThrows(path))
    }

    /// SQLITE_OPEN_READONLY stands in for a read-only file: root ignores file and directory
    /// modes, but SQLite refuses every write on a read-only connection whoever runs it.
    @Test func readOnlyDatabaseMakesAdmitThrow() async throws {
        let dir = try TempDir()
        let path = dir.file("quota.db")
        let writer = try QuotaDatabase(path: path)
        _ = try await writer.admit(request(33, ["a@x.org"], day, t0))
        let reader = try QuotaDatabase(path: path, mode: .readOnly)
        let error = await #expect(throws: QuotaDatabaseError.self) {
            try await reader.admit(request(33, ["b@x.org"], day, t0 + 1))
        }
        #expect(error?.primaryCode == 8)  // SQLITE_READONLY
        #expect(try reader.entries(uid: 33).map(\.address) == ["a@x.org"])
        // A repeat would only refresh a time, and even that must not be written.
        await #expect(throws: QuotaDatabaseError.self) { try await reader.admit(request(33, ["a@x.org"], day, t0 + 1)) }
        #expect(throws: QuotaDatabaseError.self) { try reader.reset(uid: 33) }
        // Read-only mode also works when no writer has the file open (no -wal/-shm yet).
        writer.close()
        reader.close()
        let alone = try QuotaDatabase(path: path, mode: .readOnly)
        #expect(try alone.count(uid: 33, windowStart: nil) == 1)
    }

    /// SQLITE_FULL in the middle of a transaction: admit throws, the transaction is rolled back, and the
    /// database works again once there is room.
    @Test func fullDatabaseRollsBack() async throws {
        let dir = try TempDir()
        let (db, many) = try await fullDatabase(dir, seed: 33)
        let error = await #expect(throws: QuotaDatabaseError.self) {
            try await db.admit(request(33, many, Quota(limit: 5000, period: nil), t0 + 1))
        }
        #expect(error?.primaryCode == 13)  // SQLITE_FULL
        #expect(try addresses(db, 33) == ["a@x.org"])
        try db.testingExecute("PRAGMA max_page_count = 1073741823")
        #expect(try await db.admit(request(33, ["b@x.org"], day, t0 + 2)).admitted)
        #expect(try addresses(db, 33) == ["a@x.org", "b@x.org"])
    }

    /// A batch is one transaction: later requests see what earlier ones recorded.
    @Test func batchIsInOrder() async throws {
        let dir = try TempDir()
        let db = try QuotaDatabase(path: dir.file("quota.db"))
        let one = Quota(limit: 1, period: .day)
        let results = db.testingAdmit(batch: [
            request(33, ["a@x.org"], one, t0), request(33, ["b@x.org"], one, t0), request(34, ["b@x.org"], one, t0),
        ])
        let outcomes = try results.map { try $0.get() }
        #expect(outcomes.map(\.admitted) == [true, false, true])
        #expect(try addresses(db, 33) == ["a@x.org"])
        #expect(try addresses(db, 34) == ["b@x.org"])
    }

    /// A request that fails inside a batch (the file is full) is reported failed and records
    /// nothing; every request reported admitted is in the file.
    @Test func batchWithAFailingRequest() async throws {
        let dir = try TempDir()
        let (db, many) = try await fullDatabase(dir, seed: 1)
        let big = Quota(limit: 5000, period: nil)
        let results = db.testingAdmit(batch: [
            request(40, ["small@x.org"], day, t0), request(41, many, big, t0), request(42, ["small@x.org"], day, t0),
        ])
        #expect(results.count == 3)
        guard case .failure(let error) = results[1] else {
            Issue.record("the request that cannot fit was admitted")
            return
        }
        #expect((error as? QuotaDatabaseError)?.primaryCode == 13)  // SQLITE_FULL
        #expect(try addresses(db, 41).isEmpty)
        for (i, uid) in [(0, UInt32(40)), (2, UInt32(42))] {
            switch results[i] {
            case .success(let outcome):
                #expect(outcome.admitted)
                #expect(try addresses(db, uid) == ["small@x.org"])
            case .failure:
                #expect(try addresses(db, uid).isEmpty)
            }
        }
        try db.testingExecute("PRAGMA max_page_count = 1073741823")
        #expect(try await db.admit(request(41, ["b@x.org"], day, t0 + 2)).admitted)
    }

    // MARK: admin

    @Test func entriesCountAndReset() async throws {
        let dir = try TempDir()
        let path = dir.file("quota.db")
        let db = try QuotaDatabase(path: path)
        _ = try await db.admit(request(33, ["b@x.org", "a@x.org"], day, t0))
        _ = try await db.admit(request(33, ["c@x.org"], day, t0 + 100))
        _ = try await db.admit(request(7, ["z@x.org"], day, t0 + 50))
        #expect(try db.entries(uid: nil).map { "\($0.uid) \($0.address)" } == ["7 z@x.org", "33 a@x.org", "33 b@x.org", "33 c@x.org"])
        #expect(try db.entries(uid: 33).map(\.lastSeen) == [t0, t0, t0 + 100])
        #expect(try db.entries(uid: 99).isEmpty)
        #expect(try db.count(uid: 33, windowStart: t0 + 1) == 1)
        #expect(try db.count(uid: 33, windowStart: nil) == 3)
        // The admin command line has its own connection while the daemon's stays open.
        let admin = try QuotaDatabase(path: path)
        #expect(try admin.reset(uid: 33) == 3)
        #expect(try admin.reset(uid: 33) == 0)
        #expect(try db.entries(uid: nil).map(\.address) == ["z@x.org"])
        let fresh = try await db.admit(request(33, ["d@x.org"], day, t0 + 200))
        #expect(fresh == QuotaOutcome(admitted: true, used: 1, limit: 10, firstRefused: nil))
    }
}

@Suite struct LazyQuotaStoreTests {
    /// Missing directory: decisions fail (and fail fast until the retry time), then the store
    /// opens once the directory exists; concurrent first decisions open one database.
    @Test func opensLaterAndOnce() async throws {
        let dir = try TempDir()
        let missing = dir.file("later")
        let store = LazyQuotaStore(path: missing + "/quota.db", logger: Logger(label: "test"), retryAfter: .seconds(2))
        await #expect(throws: (any Error).self) { try await store.admit(request(33, ["a@x.org"], day, t0)) }
        #expect(mkdir(missing, 0o700) == 0)
        // Within the retry time: refused at once, without a second try.
        let fast = await #expect(throws: QuotaDatabaseError.self) { try await store.admit(request(33, ["a@x.org"], day, t0)) }
        #expect(fast?.description.contains("quota database unavailable") == true)
        // The retry time is long enough that a loaded machine does not outrun it above.
        try await Task.sleep(nanoseconds: 2_100_000_000)
        let outcomes = try await withThrowingTaskGroup(of: QuotaOutcome.self) { group in
            for i in 0..<20 {
                group.addTask { try await store.admit(request(33, ["r\(i)@x.org"], day, t0)) }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(outcomes.filter(\.admitted).count == 10)
        #expect(try store.open().entries(uid: 33).count == 10)
    }
}
