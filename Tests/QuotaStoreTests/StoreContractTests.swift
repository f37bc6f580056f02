// The semantics every quota store must share, as one set of cases run against each store:
// the SQLite file and PostgreSQL. The PostgreSQL cases need a server: scripts/test starts a
// private cluster and passes it in RESTRICTPD_TEST_POSTGRES (a postgresql:// URI) and
// RESTRICTPD_TEST_POSTGRES_PASSWORD. Each case uses a scope of its own, so cases never see
// each other's rows.

import Foundation
import Logging
import RestrictPolicy
import Testing

@testable import QuotaStore
@testable import QuotaStorePostgres

/// A store under test, with the reads the cases need.
protocol StoreUnderTest: Sendable {
    func admit(_ request: QuotaRequest) async throws -> QuotaOutcome
    func peek(_ request: QuotaRequest) async throws -> QuotaOutcome
    func entries(uid: UInt32) async throws -> [QuotaEntry]
    func capStates(uid: UInt32, budget: Int64?, caps: VolumeCaps, now: Int64) async throws -> [VolumeCapState]
    @discardableResult func reset(uid: UInt32) async throws -> Int
    func addStats(_ rows: [StatsRow], keepFrom: Int64) async throws
    func stats(uid: UInt32?, since: Int64) async throws -> [StatsRow]
}

final class SQLiteUnderTest: StoreUnderTest {
    let db: QuotaDatabase
    let dir: String

    init() throws {
        let dir = NSTemporaryDirectory() + "restrictpd-contract-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        self.dir = dir
        self.db = try QuotaDatabase(path: dir + "/quota.db")
    }

    deinit { try? FileManager.default.removeItem(atPath: self.dir) }

    func admit(_ request: QuotaRequest) async throws -> QuotaOutcome { try await self.db.admit(request) }
    func peek(_ request: QuotaRequest) async throws -> QuotaOutcome { try self.db.peek(request) }
    func entries(uid: UInt32) async throws -> [QuotaEntry] { try self.db.entries(uid: uid) }
    func capStates(uid: UInt32, budget: Int64?, caps: VolumeCaps, now: Int64) async throws -> [VolumeCapState] {
        try self.db.capStates(uid: uid, budget: budget, caps: caps, now: now)
    }
    func reset(uid: UInt32) async throws -> Int { try self.db.reset(uid: uid) }
    func addStats(_ rows: [StatsRow], keepFrom: Int64) async throws { try await self.db.addStats(rows, keepFrom: keepFrom) }
    func stats(uid: UInt32?, since: Int64) async throws -> [StatsRow] { try self.db.stats(uid: uid, since: since) }
}

enum TestPostgres {
    static let environment = ProcessInfo.processInfo.environment
    static var uri: String? { environment["RESTRICTPD_TEST_POSTGRES"] }
    static let missing = "RESTRICTPD_TEST_POSTGRES is not set: the PostgreSQL store's cases did NOT run (scripts/test starts a private cluster and sets it)"

    static func settings(scope: String, timeout: Int = 30, pool: Int = 4) throws -> PostgresStoreSettings {
        guard let uri, case .success(let location) = PostgresLocation.parse(uri) else {
            throw PostgresStoreError(.connection, location: "-", message: "bad RESTRICTPD_TEST_POSTGRES")
        }
        return PostgresStoreSettings(
            location: location, password: environment["RESTRICTPD_TEST_POSTGRES_PASSWORD"], scope: scope, timeout: timeout, pool: pool)
    }

    /// A started store on a scope of its own; the schema is created when missing.
    static func store(scope: String = "test-" + UUID().uuidString, pool: Int = 4) async throws -> PostgresQuotaStore {
        let store = PostgresQuotaStore(settings: try settings(scope: scope, pool: pool), logger: Logger(label: "test"))
        _ = try await store.initialize()
        store.start()
        return store
    }
}

final class PostgresUnderTest: StoreUnderTest {
    let store: PostgresQuotaStore

    init(scope: String = "test-" + UUID().uuidString) async throws {
        self.store = try await TestPostgres.store(scope: scope)
    }

    deinit { self.store.shutdown() }

    func admit(_ request: QuotaRequest) async throws -> QuotaOutcome { try await self.store.admit(request) }
    func peek(_ request: QuotaRequest) async throws -> QuotaOutcome { try await self.store.peek(request) }
    func entries(uid: UInt32) async throws -> [QuotaEntry] { try await self.store.entries(uid: uid) }
    func capStates(uid: UInt32, budget: Int64?, caps: VolumeCaps, now: Int64) async throws -> [VolumeCapState] {
        try await self.store.capStates([CapStatesAsk(uid: uid, budget: budget, caps: caps)], now: now).first ?? []
    }
    func reset(uid: UInt32) async throws -> Int { try await self.store.reset(uid: uid) }
    /// The daemon's call, which logs and drops what the store cannot take; a test wants to know.
    func addStats(_ rows: [StatsRow], keepFrom: Int64) async throws {
        try await self.store.pooled("adding statistics") { connection in
            try await PostgresStatsSQL.add(rows, keepFrom: keepFrom, scope: self.store.settings.scope, on: connection, logger: self.store.logger)
        }
    }
    func stats(uid: UInt32?, since: Int64) async throws -> [StatsRow] { try await self.store.stats(uid: uid, since: since) }
}

private let t0: Int64 = 1_700_000_000

private func request(_ uid: UInt32, _ addresses: [String], _ quota: Quota, _ now: Int64, held: Set<String> = [], record: Bool = true) -> QuotaRequest {
    QuotaRequest(uid: uid, addresses: addresses, quota: quota, now: now, held: held, record: record)
}

private func addresses(_ store: some StoreUnderTest, _ uid: UInt32) async throws -> [String] {
    try await store.entries(uid: uid).map(\.address).sorted()
}

/// The cases, each given a fresh store.
enum StoreContract {
    static func slidingWindowEdges(_ s: some StoreUnderTest) async throws {
        let hour = Quota(limit: 2, period: .hour)
        #expect(try await s.admit(request(33, ["a@x.org"], hour, t0)).admitted)
        #expect(try await s.admit(request(33, ["b@x.org"], hour, t0 + 10)).admitted)
        #expect(try await s.admit(request(33, ["c@x.org"], hour, t0 + 20)) == QuotaOutcome(admitted: false, used: 2, limit: 2, firstRefused: "c@x.org"))
        // windowStart = now - 3600 = t0: a row with last_seen == windowStart still counts.
        #expect(try await !s.admit(request(33, ["c@x.org"], hour, t0 + 3600)).admitted)
        // One second later a@ has left the window (and is pruned): c@ fits, b@ still counts.
        #expect(try await s.admit(request(33, ["c@x.org"], hour, t0 + 3601)) == QuotaOutcome(admitted: true, used: 2, limit: 2, firstRefused: nil))
        #expect(try await addresses(s, 33) == ["b@x.org", "c@x.org"])
        // A repeat refreshes last_seen.
        #expect(try await s.admit(request(33, ["b@x.org"], hour, t0 + 3605)).admitted)
        let afterB = try await s.admit(request(33, ["d@x.org"], hour, t0 + 3611))
        #expect(!afterB.admitted && afterB.used == 2)
        let b = try await s.entries(uid: 33).first { $0.address == "b@x.org" }
        #expect(b == QuotaEntry(uid: 33, address: "b@x.org", firstSeen: t0 + 10, lastSeen: t0 + 3605))
    }

    static func learnedAllowList(_ s: some StoreUnderTest) async throws {
        let forever = Quota(limit: 2, period: nil)
        #expect(try await s.admit(request(33, ["a@x.org", "b@x.org"], forever, t0)).admitted)
        let tenYears: Int64 = 10 * 365 * 86400
        #expect(try await s.admit(request(33, ["c@x.org"], forever, t0 + tenYears)) == QuotaOutcome(admitted: false, used: 2, limit: 2, firstRefused: "c@x.org"))
        #expect(try await s.admit(request(33, ["b@x.org", "a@x.org"], forever, t0 + tenYears)).admitted)
        #expect(try await addresses(s, 33) == ["a@x.org", "b@x.org"])
    }

    static func repeatsAreFree(_ s: some StoreUnderTest) async throws {
        let one = Quota(limit: 1, period: .day)
        for i in 0..<5 {
            #expect(try await s.admit(request(33, ["a@x.org"], one, t0 + Int64(i))) == QuotaOutcome(admitted: true, used: 1, limit: 1, firstRefused: nil))
        }
        #expect(try await !s.admit(request(33, ["b@x.org"], one, t0 + 10)).admitted)
        #expect(try await s.entries(uid: 33) == [QuotaEntry(uid: 33, address: "a@x.org", firstSeen: t0, lastSeen: t0 + 4)])
    }

    /// All or nothing: a refused decision records none of its addresses, refreshes none.
    static func refusedRecordsNothing(_ s: some StoreUnderTest) async throws {
        let two = Quota(limit: 2, period: .day)
        #expect(try await s.admit(request(33, ["a@x.org"], two, t0)).admitted)
        let refused = try await s.admit(request(33, ["a@x.org", "b@x.org", "c@x.org"], two, t0 + 100))
        #expect(refused == QuotaOutcome(admitted: false, used: 1, limit: 2, firstRefused: "c@x.org"))
        #expect(try await s.entries(uid: 33) == [QuotaEntry(uid: 33, address: "a@x.org", firstSeen: t0, lastSeen: t0)])
    }

    static func usersAreSeparate(_ s: some StoreUnderTest) async throws {
        let one = Quota(limit: 1, period: nil)
        #expect(try await s.admit(request(33, ["a@x.org"], one, t0)).admitted)
        #expect(try await s.admit(request(34, ["b@x.org"], one, t0)).admitted)
        #expect(try await !s.admit(request(33, ["b@x.org"], one, t0)).admitted)
        // A uid beyond Int32 (the advisory lock's key is the same 32 bits).
        #expect(try await s.admit(request(4_000_000_000, ["a@x.org"], one, t0)).admitted)
    }

    /// Held addresses count against the limit but are not recorded (their holder does that).
    static func heldCountsAgainstTheLimit(_ s: some StoreUnderTest) async throws {
        let two = Quota(limit: 2, period: .day)
        let out = try await s.admit(request(33, ["a@x.org", "b@x.org"], two, t0, held: ["h@x.org"]))
        #expect(out == QuotaOutcome(admitted: false, used: 1, limit: 2, firstRefused: "b@x.org"))
        #expect(try await s.admit(request(33, ["a@x.org"], two, t0, held: ["h@x.org"])) == QuotaOutcome(admitted: true, used: 2, limit: 2, firstRefused: nil))
        #expect(try await addresses(s, 33) == ["a@x.org"])
        // A held address that is also asked for is counted once.
        #expect(try await s.admit(request(33, ["h@x.org"], two, t0 + 1, held: ["h@x.org"])).admitted)
    }

    /// record: false decides and records nothing, prunes nothing; peek is the same.
    static func decisionOnlyRecordsNothing(_ s: some StoreUnderTest) async throws {
        let hour = Quota(limit: 2, period: .hour)
        #expect(try await s.admit(request(33, ["a@x.org"], hour, t0)).admitted)
        #expect(try await s.admit(request(33, ["b@x.org"], hour, t0 + 7200, record: false)).admitted)
        #expect(try await s.peek(request(33, ["c@x.org", "d@x.org"], hour, t0 + 7200)).admitted)
        // a@ is outside the window at t0 + 7200 but was not pruned, b@ was not recorded.
        #expect(try await addresses(s, 33) == ["a@x.org"])
    }

    static func concurrentAdmitsNeverExceed(_ s: some StoreUnderTest) async throws {
        let day = Quota(limit: 10, period: .day)
        let outcomes = try await withThrowingTaskGroup(of: QuotaOutcome.self) { group in
            for i in 0..<200 { group.addTask { try await s.admit(request(33, ["r\(i)@x.org"], day, t0)) } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        let admitted = outcomes.filter(\.admitted)
        #expect(admitted.count == 10)
        #expect(Set(admitted.map(\.used)) == Set(1...10))
        #expect(try await s.entries(uid: 33).count == 10)
    }
}

/// The volume caps and shared budgets, each given a fresh store.
enum CapsContract {
    static let tenPerHour = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 10, period: .hour))

    static func message(
        _ uid: UInt32, _ now: Int64, caps: VolumeCaps = tenPerHour, recipients: Int = 1, addresses: [String] = [],
        quota: Quota? = nil, budget: Int64? = nil, record: Bool = true
    ) -> QuotaRequest {
        QuotaRequest(uid: uid, addresses: addresses, quota: quota, now: now, record: record, caps: caps, recipients: recipients, budget: budget)
    }

    static func concurrentAdmitsAdmitExactlyTheCap(_ s: some StoreUnderTest) async throws {
        let outcomes = try await withThrowingTaskGroup(of: QuotaOutcome.self) { group in
            for _ in 0..<200 { group.addTask { try await s.admit(message(33, t0)) } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        let admitted = outcomes.filter(\.admitted)
        #expect(admitted.count == 10)
        #expect(Set(admitted.compactMap { $0.cap(.messages)?.used }) == Set(1...10))
        #expect(outcomes.filter { !$0.admitted }.allSatisfy { $0.refusedCap == .cap(VolumeCap(kind: .messages, limit: 10, period: .hour)) })
        #expect(try await s.capStates(uid: 33, budget: nil, caps: tenPerHour, now: t0).map(\.used) == [10])
    }

    static func edgesAndSlidingWindow(_ s: some StoreUnderTest) async throws {
        let caps = VolumeCaps(recipients: VolumeCap(kind: .recipients, limit: 5, period: .hour))
        #expect(try await s.admit(message(33, t0, caps: caps, recipients: 3)).admitted)
        let over = try await s.admit(message(33, t0 + 10, caps: caps, recipients: 3))
        #expect(!over.admitted && over.cap(.recipients)?.used == 3)
        let exactly = try await s.admit(message(33, t0 + 20, caps: caps, recipients: 2))
        #expect(exactly.admitted && exactly.cap(.recipients)?.description == "0/5 per hour")
        // windowStart = now - 3600 = t0: the first message still counts.
        #expect(try await !s.admit(message(33, t0 + 3600, caps: caps, recipients: 1)).admitted)
        // The first message left the window; the second (2 recipients) still counts.
        let slid = try await s.admit(message(33, t0 + 3601, caps: caps, recipients: 3))
        #expect(slid.admitted && slid.cap(.recipients)?.used == 5)
        // Another uid has its own count.
        #expect(try await s.admit(message(34, t0 + 3601, caps: caps, recipients: 5)).admitted)
    }

    static func bothCapsInOneWindowOrTwo(_ s: some StoreUnderTest) async throws {
        let same = VolumeCaps(
            messages: VolumeCap(kind: .messages, limit: 3, period: .hour), recipients: VolumeCap(kind: .recipients, limit: 4, period: .hour))
        let first = try await s.admit(message(33, t0, caps: same, recipients: 3))
        #expect(first.admitted && first.caps.map(\.used) == [1, 3])
        let over = try await s.admit(message(33, t0 + 1, caps: same, recipients: 2))
        #expect(!over.admitted && over.refusedCap == .cap(VolumeCap(kind: .recipients, limit: 4, period: .hour)))
        let two = VolumeCaps(
            messages: VolumeCap(kind: .messages, limit: 1, period: .hour), recipients: VolumeCap(kind: .recipients, limit: 10, period: .week))
        let later = try await s.admit(message(33, t0 + 3601, caps: two, recipients: 2))
        #expect(later.admitted && later.caps.map(\.used) == [1, 5])
        #expect(try await s.capStates(uid: 33, budget: nil, caps: two, now: t0 + 3602).map(\.used) == [1, 5])
    }

    /// All or nothing across the quota and the caps; a peek and a decision-only request
    /// record nothing; max_recipients refuses before anything is counted.
    static func refusedByEitherNothingRecorded(_ s: some StoreUnderTest) async throws {
        let quota = Quota(limit: 1, period: .day)
        let one = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 1, period: .hour))
        #expect(try await s.admit(message(33, t0, caps: one, addresses: ["a@x.org"], quota: quota)).admitted)
        // The cap refuses a repeat address: its last_seen is not refreshed.
        let capped = try await s.admit(message(33, t0 + 5, caps: one, addresses: ["a@x.org"], quota: quota))
        #expect(!capped.admitted && capped.refusedCap != nil)
        #expect(try await s.entries(uid: 33).map(\.lastSeen) == [t0])
        // The quota refuses: no message row.
        let two = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 2, period: .hour))
        let refused = try await s.admit(message(33, t0 + 6, caps: two, addresses: ["b@x.org"], quota: quota))
        #expect(!refused.admitted && refused.firstRefused == "b@x.org" && refused.refusedCap == nil)
        #expect(try await s.capStates(uid: 33, budget: nil, caps: two, now: t0 + 6).map(\.used) == [1])
        // A peek and a decision-only request record nothing.
        #expect(try await s.peek(message(33, t0 + 7, caps: two)).admitted)
        #expect(try await s.admit(message(33, t0 + 7, caps: two, record: false)).admitted)
        #expect(try await s.capStates(uid: 33, budget: nil, caps: two, now: t0 + 7).map(\.used) == [1])
        let peeked = try await s.peek(message(33, t0 + 8, caps: one))
        #expect(!peeked.admitted && peeked.refusedCap == .cap(VolumeCap(kind: .messages, limit: 1, period: .hour)))
        let wide = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 100, period: .hour), maxRecipients: 2)
        let tooMany = try await s.admit(message(33, t0 + 9, caps: wide, recipients: 3))
        #expect(!tooMany.admitted && tooMany.refusedCap == .maxRecipients(2))
        #expect(try await s.capStates(uid: 33, budget: nil, caps: wide, now: t0 + 9).map(\.used) == [1])
        // A reset forgets the messages too.
        try await s.reset(uid: 33)
        #expect(try await s.capStates(uid: 33, budget: nil, caps: wide, now: t0 + 9).map(\.used) == [0])
    }

    /// `shared`: the members of a group count together under the budget key, apart from
    /// their own budgets; --quota's listing of every uid leaves the budget out.
    static func sharedBudget(_ s: some StoreUnderTest) async throws {
        let group: Int64 = (1 << 32) + 1000
        let quota = Quota(limit: 2, period: .day)
        let caps = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 3, period: .hour))
        #expect(try await s.admit(message(33, t0, caps: caps, addresses: ["a@x.org"], quota: quota, budget: group)).admitted)
        #expect(try await s.admit(message(34, t0 + 1, caps: caps, addresses: ["b@x.org"], quota: quota, budget: group)).admitted)
        let third = try await s.admit(message(35, t0 + 2, caps: caps, addresses: ["c@x.org"], quota: quota, budget: group))
        #expect(!third.admitted && third.used == 2 && third.firstRefused == "c@x.org")
        // A repeat of a member's address is free for another member; the messages cap is shared too.
        let repeated = try await s.admit(message(35, t0 + 3, caps: caps, addresses: ["a@x.org"], quota: quota, budget: group))
        #expect(repeated.admitted && repeated.cap(.messages)?.used == 3)
        let capped = try await s.admit(message(33, t0 + 4, caps: caps, budget: group))
        #expect(!capped.admitted && capped.refusedCap == .cap(VolumeCap(kind: .messages, limit: 3, period: .hour)))
        #expect(try await s.capStates(uid: 36, budget: group, caps: caps, now: t0 + 5).map(\.used) == [3])
        // The members' own budgets, and another group's, are untouched.
        #expect(try await s.admit(message(33, t0 + 5, caps: caps, addresses: ["c@x.org"], quota: quota)).admitted)
        #expect(try await s.admit(message(33, t0 + 6, caps: caps, budget: group + 1)).admitted)
        #expect(try await s.capStates(uid: 33, budget: nil, caps: caps, now: t0 + 6).map(\.used) == [1])
        #expect(try await s.entries(uid: 33).map(\.address) == ["c@x.org"])
    }

    /// Message rows older than the longest counted window are pruned at the next decision.
    static func messageRowsArePruned(_ s: some StoreUnderTest) async throws {
        let hour = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 1000, period: .hour))
        for minute in 0..<180 {
            #expect(try await s.admit(message(33, t0 + Int64(minute) * 60, caps: hour)).admitted)
        }
        // At most one hour's worth (61 rows) stays: the reset counts what was left.
        let left = try await s.reset(uid: 33)
        #expect(left >= 60 && left <= 61)
    }
}

/// The statistics, each given a fresh store.
enum StatsContract {
    /// Flushes add up per uid and hour, and stay bounded by the retention.
    static func addUpAndStayBounded(_ s: some StoreUnderTest) async throws {
        let retentionHours: Int64 = 35 * 24
        let firstHour = t0 / 3600
        // Two simulated months, a flush every hour for two users (one beyond Int32).
        for hour in firstHour..<(firstHour + 60 * 24) {
            let rows = [StatsRow(uid: 33, hour: hour, relayed: 2, refused: 1), StatsRow(uid: 4_000_000_000, hour: hour, deferred: 1, strangers: 1)]
            try await s.addStats(rows, keepFrom: hour - retentionHours)
        }
        let last = firstHour + 60 * 24 - 1
        #expect(try await s.stats(uid: nil, since: 0).count == 2 * Int(retentionHours + 1))
        try await s.addStats([StatsRow(uid: 33, hour: last, relayed: 5, held: 1, strangers: 3)], keepFrom: last - retentionHours)
        #expect(try await s.stats(uid: 33, since: last) == [StatsRow(uid: 33, hour: last, relayed: 7, refused: 1, held: 1, strangers: 3)])
        #expect(try await s.stats(uid: nil, since: last) == [
            StatsRow(uid: 33, hour: last, relayed: 7, refused: 1, held: 1, strangers: 3),
            StatsRow(uid: 4_000_000_000, hour: last, deferred: 1, strangers: 1),
        ])
        #expect(try await s.stats(uid: 34, since: 0).isEmpty)
    }
}

@Suite("quota store contract: SQLite") struct SQLiteStoreContract {
    @Test func slidingWindowEdges() async throws { try await StoreContract.slidingWindowEdges(try SQLiteUnderTest()) }
    @Test func learnedAllowList() async throws { try await StoreContract.learnedAllowList(try SQLiteUnderTest()) }
    @Test func repeatsAreFree() async throws { try await StoreContract.repeatsAreFree(try SQLiteUnderTest()) }
    @Test func refusedRecordsNothing() async throws { try await StoreContract.refusedRecordsNothing(try SQLiteUnderTest()) }
    @Test func usersAreSeparate() async throws { try await StoreContract.usersAreSeparate(try SQLiteUnderTest()) }
    @Test func heldCountsAgainstTheLimit() async throws { try await StoreContract.heldCountsAgainstTheLimit(try SQLiteUnderTest()) }
    @Test func decisionOnlyRecordsNothing() async throws { try await StoreContract.decisionOnlyRecordsNothing(try SQLiteUnderTest()) }
    @Test func concurrentAdmitsNeverExceed() async throws { try await StoreContract.concurrentAdmitsNeverExceed(try SQLiteUnderTest()) }
    @Test func capsConcurrent() async throws { try await CapsContract.concurrentAdmitsAdmitExactlyTheCap(try SQLiteUnderTest()) }
    @Test func capsEdges() async throws { try await CapsContract.edgesAndSlidingWindow(try SQLiteUnderTest()) }
    @Test func capsBoth() async throws { try await CapsContract.bothCapsInOneWindowOrTwo(try SQLiteUnderTest()) }
    @Test func capsAllOrNothing() async throws { try await CapsContract.refusedByEitherNothingRecorded(try SQLiteUnderTest()) }
    @Test func sharedBudget() async throws { try await CapsContract.sharedBudget(try SQLiteUnderTest()) }
    @Test func messageRowsArePruned() async throws { try await CapsContract.messageRowsArePruned(try SQLiteUnderTest()) }
    @Test func statistics() async throws { try await StatsContract.addUpAndStayBounded(try SQLiteUnderTest()) }
}

@Suite("quota store contract: PostgreSQL", .enabled(if: TestPostgres.uri != nil, Comment(rawValue: TestPostgres.missing)))
struct PostgresStoreContract {
    @Test func slidingWindowEdges() async throws { try await StoreContract.slidingWindowEdges(try await PostgresUnderTest()) }
    @Test func learnedAllowList() async throws { try await StoreContract.learnedAllowList(try await PostgresUnderTest()) }
    @Test func repeatsAreFree() async throws { try await StoreContract.repeatsAreFree(try await PostgresUnderTest()) }
    @Test func refusedRecordsNothing() async throws { try await StoreContract.refusedRecordsNothing(try await PostgresUnderTest()) }
    @Test func usersAreSeparate() async throws { try await StoreContract.usersAreSeparate(try await PostgresUnderTest()) }
    @Test func heldCountsAgainstTheLimit() async throws { try await StoreContract.heldCountsAgainstTheLimit(try await PostgresUnderTest()) }
    @Test func decisionOnlyRecordsNothing() async throws { try await StoreContract.decisionOnlyRecordsNothing(try await PostgresUnderTest()) }
    @Test func concurrentAdmitsNeverExceed() async throws { try await StoreContract.concurrentAdmitsNeverExceed(try await PostgresUnderTest()) }
    @Test func capsConcurrent() async throws { try await CapsContract.concurrentAdmitsAdmitExactlyTheCap(try await PostgresUnderTest()) }
    @Test func capsEdges() async throws { try await CapsContract.edgesAndSlidingWindow(try await PostgresUnderTest()) }
    @Test func capsBoth() async throws { try await CapsContract.bothCapsInOneWindowOrTwo(try await PostgresUnderTest()) }
    @Test func capsAllOrNothing() async throws { try await CapsContract.refusedByEitherNothingRecorded(try await PostgresUnderTest()) }
    @Test func sharedBudget() async throws { try await CapsContract.sharedBudget(try await PostgresUnderTest()) }
    @Test func messageRowsArePruned() async throws { try await CapsContract.messageRowsArePruned(try await PostgresUnderTest()) }
    @Test func statistics() async throws { try await StatsContract.addUpAndStayBounded(try await PostgresUnderTest()) }
}
