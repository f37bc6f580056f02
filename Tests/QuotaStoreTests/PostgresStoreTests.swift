// What only the PostgreSQL store has: a farm's hosts (separate pools, as separate processes
// would have) sharing one budget per scope, and failing closed. Needs RESTRICTPD_TEST_POSTGRES
// (see StoreContractTests.swift).

import Foundation
import Logging
import PostgresNIO
import QuotaStore
import RestrictPolicy
import TestPorts
import Testing

@testable import QuotaStorePostgres

private let t0: Int64 = 1_700_000_000
private let day = Quota(limit: 10, period: .day)

/// 200 admits for one uid, spread over `stores` round robin, all at once.
private func storm(_ stores: [PostgresQuotaStore], uid: UInt32 = 33) async throws -> [QuotaOutcome] {
    try await withThrowingTaskGroup(of: QuotaOutcome.self) { group in
        for i in 0..<200 {
            let store = stores[i % stores.count]
            group.addTask { try await store.admit(QuotaRequest(uid: uid, addresses: ["r\(i)@x.org"], quota: day, now: t0)) }
        }
        return try await group.reduce(into: []) { $0.append($1) }
    }
}

/// Runs `body` on a connection of its own whose tables live in a fresh PostgreSQL schema
/// (namespace) at restrictpd schema `version`, dropped afterwards.
private func withSchema(
    version: Int, _ body: @escaping @Sendable (PostgresConnection, Logger, String) async throws -> Void
) async throws {
    let store = try await TestPostgres.store(scope: "s")
    defer { store.shutdown() }
    let namespace = "migration_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
    let location = store.location
    try await store.withOwnConnection("testing") { c in
        let logger = Logger(label: "test")
        try await c.query(PostgresQuery(unsafeSQL: "CREATE SCHEMA \(namespace)"), logger: logger)
        do {
            try await c.query(PostgresQuery(unsafeSQL: "SET search_path TO \(namespace)"), logger: logger)
            // In one transaction, as --init-store migrates.
            try await c.query("BEGIN", logger: logger)
            try await c.query(PostgresQuery(unsafeSQL: PostgresSchema.versionTable), logger: logger)
            for migration in PostgresSchema.migrations[0..<version] {
                for statement in migration { try await c.query(PostgresQuery(unsafeSQL: statement), logger: logger) }
            }
            try await c.query("INSERT INTO restrictpd_schema (singleton, version) VALUES (true, \(Int32(version)))", logger: logger)
            try await c.query("COMMIT", logger: logger)
            try await body(c, logger, location)
        } catch {
            _ = try? await c.query("ROLLBACK", logger: logger)
            _ = try? await c.query(PostgresQuery(unsafeSQL: "DROP SCHEMA \(namespace) CASCADE"), logger: logger)
            throw error
        }
        try await c.query(PostgresQuery(unsafeSQL: "DROP SCHEMA \(namespace) CASCADE"), logger: logger)
    }
}

@Suite("PostgreSQL store", .enabled(if: TestPostgres.uri != nil, Comment(rawValue: TestPostgres.missing)))
struct PostgresStoreTests {
    /// The advisory lock serialises decisions of one (scope, uid) across connections and pools:
    /// two "hosts" with four connections each never admit more than N together.
    @Test func twoHostsSameScopeShareOneBudget() async throws {
        let scope = "farm-" + UUID().uuidString
        let a = try await TestPostgres.store(scope: scope)
        let b = try await TestPostgres.store(scope: scope)
        defer { a.shutdown(); b.shutdown() }
        let outcomes = try await storm([a, b])
        #expect(outcomes.filter(\.admitted).count == 10)
        #expect(try await a.entries(uid: 33).count == 10)
        #expect(try await b.entries(uid: 33).count == 10)
    }

    @Test func differentScopesHaveABudgetEach() async throws {
        let a = try await TestPostgres.store()
        let b = try await TestPostgres.store()
        defer { a.shutdown(); b.shutdown() }
        let outcomes = try await storm([a, b])
        #expect(outcomes.filter(\.admitted).count == 20)
        #expect(try await a.entries(uid: 33).count == 10)
        #expect(try await b.entries(uid: 33).count == 10)
    }

    @Test func resetForgetsOneUidOfOneScope() async throws {
        let scope = "reset-" + UUID().uuidString
        let a = try await TestPostgres.store(scope: scope)
        let other = try await TestPostgres.store()
        defer { a.shutdown(); other.shutdown() }
        for store in [a, other] {
            #expect(try await store.admit(QuotaRequest(uid: 33, addresses: ["a@x.org", "b@x.org"], quota: day, now: t0)).admitted)
        }
        #expect(try await a.admit(QuotaRequest(uid: 34, addresses: ["a@x.org"], quota: day, now: t0)).admitted)
        #expect(try await a.reset(uid: 33) == 2)
        #expect(try await a.entries(uid: 33).isEmpty)
        #expect(try await a.entries(uid: 34).count == 1)
        #expect(try await other.entries(uid: 33).count == 2)
    }

    /// The volume caps and a shared budget hold across hosts as the arbitrary quota does.
    @Test func twoHostsSameScopeShareTheCapsAndSharedBudgets() async throws {
        let scope = "caps-" + UUID().uuidString
        let a = try await TestPostgres.store(scope: scope)
        let b = try await TestPostgres.store(scope: scope)
        defer { a.shutdown(); b.shutdown() }
        let caps = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 10, period: .hour))
        let group: Int64 = (1 << 32) + 1000
        let outcomes = try await withThrowingTaskGroup(of: QuotaOutcome.self) { tasks in
            for i in 0..<100 {
                let store = i % 2 == 0 ? a : b
                // Four members of one group, one budget.
                let uid = UInt32(33 + i % 4)
                tasks.addTask { try await store.admit(QuotaRequest(uid: uid, addresses: [], quota: nil, now: t0, caps: caps, recipients: 1, budget: group)) }
            }
            return try await tasks.reduce(into: []) { $0.append($1) }
        }
        #expect(outcomes.filter(\.admitted).count == 10)
        let states = try await b.capStates([CapStatesAsk(uid: 40, budget: group, caps: caps), CapStatesAsk(uid: 33, budget: nil, caps: caps)], now: t0)
        #expect(states.map { $0.map(\.used) } == [[10], [0]])
        // --test's peek sees the farm's count.
        #expect(try await !a.peek(QuotaRequest(uid: 34, addresses: [], quota: nil, now: t0, caps: caps, recipients: 1, budget: group)).admitted)
    }

    /// A database at schema version 1 (what the previous release created) is migrated by
    /// --init-store keeping its rows, and decides with caps afterwards; a store refuses to
    /// decide before. In a PostgreSQL schema (namespace) of its own.
    @Test func versionOneSchemaIsMigratedKeepingItsRows() async throws {
        try await withSchema(version: 1) { c, logger, location in
            try await c.query(
                "INSERT INTO restrictpd_quota VALUES ('s', 33, 'a@x.org', \(t0), \(t0))", logger: logger)
            await #expect(throws: PostgresStoreError.self) { try await PostgresSchema.check(on: c, location: location, logger: logger) }
            let (from, to) = try await PostgresSchema.initialize(on: c, location: location, logger: logger)
            #expect(from == 1 && to == PostgresSchema.currentVersion && to >= 2)
            try await PostgresSchema.check(on: c, location: location, logger: logger)
            #expect(try await PostgresQuotaSQL.entries(scope: "s", uid: 33, on: c, logger: logger).map(\.address) == ["a@x.org"])
            let caps = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 1, period: .hour))
            let request = QuotaRequest(uid: 33, addresses: ["a@x.org"], quota: Quota(limit: 1, period: nil), now: t0, caps: caps, recipients: 1)
            #expect(try await PostgresQuotaSQL.admit(request, scope: "s", on: c, logger: logger).admitted)
            #expect(try await !PostgresQuotaSQL.admit(request, scope: "s", on: c, logger: logger).admitted)
            // Migrated once: again is a no-op; a newer version is refused.
            let again = try await PostgresSchema.initialize(on: c, location: location, logger: logger)
            #expect(again.from == again.to)
            try await c.query("UPDATE restrictpd_schema SET version = \(Int32(PostgresSchema.currentVersion + 1))", logger: logger)
            await #expect(throws: PostgresStoreError.self) { try await PostgresSchema.initialize(on: c, location: location, logger: logger) }
        }
    }

    /// A version 3 schema's message rows become per-second volume rows (4) that count the
    /// same: three messages in one second and one in another, 2 + 1 + 4 and 3 recipients.
    @Test func versionThreeMessageRowsKeepTheirCounts() async throws {
        try await withSchema(version: 3) { c, logger, location in
            for (at, recipients) in [(t0, 2), (t0, 1), (t0, 4), (t0 + 60, 3)] {
                try await c.query(
                    "INSERT INTO restrictpd_message VALUES ('s', 33, \(at), \(Int64(recipients)))", logger: logger)
            }
            let (from, to) = try await PostgresSchema.initialize(on: c, location: location, logger: logger)
            #expect(from == 3 && to == PostgresSchema.currentVersion)
            let caps = VolumeCaps(
                messages: VolumeCap(kind: .messages, limit: 5, period: .hour),
                recipients: VolumeCap(kind: .recipients, limit: 100, period: .hour))
            let states = try await PostgresQuotaSQL.capStates(
                uid: 33, budget: nil, caps: caps, now: t0 + 120, scope: "s", on: c, logger: logger)
            #expect(states.map(\.used) == [4, 10])
            // The fifth message fits the cap of 5, a sixth does not.
            let request = QuotaRequest(uid: 33, addresses: [], quota: nil, now: t0 + 120, caps: caps, recipients: 1)
            #expect(try await PostgresQuotaSQL.admit(request, scope: "s", on: c, logger: logger).admitted)
            #expect(try await !PostgresQuotaSQL.admit(request, scope: "s", on: c, logger: logger).admitted)
            let rows = try await c.query("SELECT count(*) FROM restrictpd_volume", logger: logger)
            for try await n in rows.decode(Int64.self) { #expect(n == 3) }
        }
    }

    /// A version 4 schema's functions (what the previous release created: `restrictpd_admit`
    /// and `restrictpd_admit_batch`, here with their signatures and no body) give way to the
    /// procedure of version 5, and counted addresses still count.
    @Test func versionFourFunctionsAreReplaced() async throws {
        try await withSchema(version: 4) { c, logger, location in
            let v4Admit = "text, bigint, integer, text[], text[], bigint, bigint, boolean, bigint" + String(repeating: ", bigint", count: 9)
            let v4Batch = "text, bigint[], integer[], integer[], text[], integer[], text[], bigint[], bigint[], boolean[], bigint[]"
                + String(repeating: ", bigint[]", count: 9)
            for (name, arguments) in [("restrictpd_admit", v4Admit), ("restrictpd_admit_batch", v4Batch)] {
                try await c.query(PostgresQuery(unsafeSQL: "CREATE FUNCTION \(name)(\(arguments)) RETURNS void LANGUAGE sql AS ''"), logger: logger)
            }
            try await c.query("INSERT INTO restrictpd_quota VALUES ('s', 33, 'old@x.org', \(t0), \(t0))", logger: logger)
            let (from, to) = try await PostgresSchema.initialize(on: c, location: location, logger: logger)
            #expect(from == 4 && to == PostgresSchema.currentVersion)
            let rows = try await c.query(
                "SELECT string_agg(proname || ':' || prokind::text, ',' ORDER BY proname) FROM pg_proc WHERE pronamespace = current_schema()::regnamespace AND proname LIKE 'restrictpd%'",
                logger: logger)
            for try await kinds in rows.decode(String.self) { #expect(kinds == "restrictpd_admit:p") }
            let quota = Quota(limit: 2, period: .day)
            let fresh = QuotaRequest(uid: 33, addresses: ["new@x.org"], quota: quota, now: t0 + 60)
            #expect(try await PostgresQuotaSQL.admit(fresh, scope: "s", on: c, logger: logger).used == 2)
            let another = QuotaRequest(uid: 33, addresses: ["third@x.org"], quota: quota, now: t0 + 60)
            #expect(try await !PostgresQuotaSQL.admit(another, scope: "s", on: c, logger: logger).admitted)
        }
    }

    /// In a stricter isolation level the procedure's reads would take their snapshot before
    /// the lock is granted: it refuses to decide there (every connection of the store asks for
    /// READ COMMITTED, whatever the database's default).
    @Test func aDecisionOutsideReadCommittedIsRefused() async throws {
        let store = try await TestPostgres.store(scope: "isolation-" + UUID().uuidString)
        defer { store.shutdown() }
        let scope = store.settings.scope
        let request = QuotaRequest(uid: 33, addresses: ["a@x.org"], quota: day, now: t0)
        try await store.withOwnConnection("testing") { c in
            let logger = Logger(label: "test")
            #expect(try await PostgresQuotaSQL.admit(request, scope: scope, on: c, logger: logger).admitted)
            for level in ["repeatable read", "serializable"] {
                try await c.query(PostgresQuery(unsafeSQL: "SET default_transaction_isolation = '\(level)'"), logger: logger)
                await #expect(throws: (any Error).self) { try await PostgresQuotaSQL.admit(request, scope: scope, on: c, logger: logger) }
                await #expect(throws: (any Error).self) {
                    try await PostgresQuotaSQL.admit(batch: [request, request], scope: scope, on: c, logger: logger)
                }
            }
        }
        #expect(try await store.admit(request).admitted)
    }

    /// The procedure commits before it answers. Here the commit is made slow (a deferred
    /// trigger sleeps in it) and the backend is terminated during it: the decision fails, and
    /// nothing is recorded. Were the commit left to the end of the statement (after the answer
    /// row is sent), restrictpd would have taken "admitted" for a record that was lost: this
    /// test fails then.
    @Test func aBackendKilledWhileCommittingAdmitsNothing() async throws {
        let probe = try await TestPostgres.store(scope: "probe")
        defer { probe.shutdown() }
        try await withSchema(version: PostgresSchema.currentVersion) { c, logger, _ in
            var current = ""
            for try await name in try await c.query("SELECT current_schema()::text", logger: logger).decode(String.self) { current = name }
            let namespace = current
            try await c.query(PostgresQuery(unsafeSQL: """
                CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql
                AS $$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$
                """), logger: logger)
            try await c.query(PostgresQuery(unsafeSQL: """
                CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON restrictpd_quota
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()
                """), logger: logger)
            let request = QuotaRequest(uid: 33, addresses: ["a@x.org"], quota: day, now: t0)
            // The decision on a connection of its own, which the server then terminates.
            let admitted = try await probe.withOwnConnection("deciding") { d in
                try await d.query(PostgresQuery(unsafeSQL: "SET search_path TO \(namespace)"), logger: logger)
                var backend: Int32 = 0
                for try await pid in try await d.query("SELECT pg_backend_pid()", logger: logger).decode(Int32.self) { backend = pid }
                let pid = backend
                // Terminated once it sleeps in the commit's trigger.
                let killer = Task {
                    for _ in 0..<200 {
                        var sleeping = false
                        let rows = try await c.query(
                            "SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = \(pid)", logger: logger)
                        for try await flag in rows.decode(Bool?.self) { sleeping = flag ?? false }
                        if sleeping { break }
                        try await Task.sleep(for: .milliseconds(10))
                    }
                    try await c.query("SELECT pg_terminate_backend(\(pid))", logger: logger)
                }
                let outcome = try? await PostgresQuotaSQL.admit(request, scope: "killed", on: d, logger: logger)
                try await killer.value
                return outcome?.admitted ?? false
            }
            var rows: Int64 = -1
            for try await n in try await c.query("SELECT count(*) FROM restrictpd_quota WHERE scope = 'killed'", logger: logger).decode(Int64.self) {
                rows = n
            }
            #expect(rows == 0)
            #expect(!admitted)
        }
    }

    /// Statistics are the scope's: the hosts of a farm add to the same rows, --stats on any
    /// of them reads them all, another scope has its own; a host prunes only its scope's hours.
    @Test func statisticsAreKeptPerScope() async throws {
        let scope = "stats-" + UUID().uuidString
        let a = try await TestPostgres.store(scope: scope)
        let b = try await TestPostgres.store(scope: scope)
        let other = try await TestPostgres.store()
        defer { a.shutdown(); b.shutdown(); other.shutdown() }
        let hour = t0 / 3600
        await a.addStats([StatsRow(uid: 33, hour: hour - 100, relayed: 9), StatsRow(uid: 33, hour: hour, relayed: 1, strangers: 1)], keepFrom: 0)
        await other.addStats([StatsRow(uid: 33, hour: hour - 100, relayed: 4)], keepFrom: 0)
        await b.addStats([StatsRow(uid: 33, hour: hour, refused: 2, strangers: 1)], keepFrom: hour - 10)
        #expect(try await a.stats(uid: nil, since: 0) == [StatsRow(uid: 33, hour: hour, relayed: 1, refused: 2, strangers: 2)])
        #expect(try await other.stats(uid: 33, since: 0) == [StatsRow(uid: 33, hour: hour - 100, relayed: 4)])
        // An empty flush writes nothing and prunes nothing.
        await other.addStats([], keepFrom: hour)
        #expect(try await other.stats(uid: nil, since: 0).count == 1)
    }

    @Test func initStoreIsIdempotent() async throws {
        let store = try await TestPostgres.store()
        let again = try await store.initialize()
        #expect(again.from == PostgresQuotaStore.schemaVersion && again.to == PostgresQuotaStore.schemaVersion)
        #expect(await store.check() == nil)
    }

    @Test func wrongPasswordIsReportedPlainly() async throws {
        var settings = try TestPostgres.settings(scope: "x")
        settings.password = "not-the-password"
        let store = PostgresQuotaStore(settings: settings, logger: Logger(label: "test"))
        let why = try #require(await store.check())
        #expect(why.kind == .server)
        #expect(why.description.contains("password authentication failed"))
        #expect(!why.description.contains("not-the-password"))
    }

    /// Nothing listens there: the decision throws (the daemon answers 451) within the timeout.
    @Test func unreachableDatabaseFailsClosedWithinTheTimeout() async throws {
        var settings = try TestPostgres.settings(scope: "x", timeout: 1)
        let closed = try ClosedPort()
        defer { closed.release() }
        settings.location.port = closed.port
        let store = PostgresQuotaStore(settings: settings, logger: Logger(label: "test"))
        store.start()
        defer { store.shutdown() }
        let start = Date()
        await #expect(throws: PostgresStoreError.self) {
            try await store.admit(QuotaRequest(uid: 33, addresses: ["a@x.org"], quota: day, now: t0))
        }
        #expect(Date().timeIntervalSince(start) < 3)
        #expect(store.status.hasPrefix("store=postgresql down"))
        #expect(await store.check() != nil)
    }
}

/// The PostgreSQL store decides in the database (`restrictpd_admit`), the SQLite store with
/// `QuotaArithmetic`: the same random requests, given to both, get the same outcomes and
/// leave the same counted addresses and volume. The requests mix quotas with and without a
/// period, held addresses, decisions that record nothing, both volume caps, `max_recipients`,
/// held volume, a shared budget and a clock that moves across the windows; a disagreement on
/// admitting would also make the PostgreSQL store throw.
@Suite("PostgreSQL decides as SQLite does", .enabled(if: TestPostgres.uri != nil, Comment(rawValue: TestPostgres.missing)))
struct PostgresDifferentialTests {
    struct Generator {
        var state: UInt64
        mutating func next(_ n: Int) -> Int {
            self.state = self.state &* 6364136223846793005 &+ 1442695040888963407
            return Int((self.state >> 33) % UInt64(n))
        }
        mutating func chance(_ percent: Int) -> Bool { self.next(100) < percent }
    }

    /// `uid`: the request's, its own budget (no shared one); nil: one of two uids or a shared budget.
    static func randomRequest(_ g: inout Generator, now: Int64, uid fixed: UInt32? = nil) -> QuotaRequest {
        let pool = ["a@x.org", "b@x.org", "c@x.org", "d@x.org", "e@x.org", "f@x.org", "g@x.org"]
        var addresses: [String] = []
        for _ in 0..<g.next(4) { addresses.append(pool[g.next(pool.count)]) }
        if !g.chance(10) { addresses = addresses.reduce(into: []) { if !$0.contains($1) { $0.append($1) } } }
        // Now and then a long request, past the function's path for short ones, with a limit
        // it may fit.
        let long = g.chance(8)
        if long {
            let start = g.next(24)
            addresses = (0..<(17 + g.next(4))).map { "l\((start + $0) % 24)@x.org" }
            if g.chance(30) { addresses.append(pool[g.next(pool.count)]) }
        }
        let periods: [QuotaPeriod?] = [.hour, .day, nil]
        let quota: Quota? = g.chance(85) ? Quota(limit: (long ? 20 : 1) + g.next(5), period: periods[g.next(3)]) : nil
        var held: Set<String> = []
        if g.chance(20) { held.insert(pool[g.next(pool.count)]) }
        var caps = VolumeCaps.none
        if g.chance(50) { caps.messages = VolumeCap(kind: .messages, limit: 1 + g.next(6), period: g.chance(50) ? .hour : .day) }
        if g.chance(40) { caps.recipients = VolumeCap(kind: .recipients, limit: 1 + g.next(12), period: g.chance(50) ? .hour : .day) }
        if g.chance(20) { caps.maxRecipients = 1 + g.next(4) }
        let heldVolume = g.chance(20) ? HeldVolume(messages: g.next(2), recipients: g.next(3)) : .zero
        let uid = fixed ?? UInt32(40 + g.next(2))
        let budget: Int64? = fixed == nil && g.chance(25) ? (1 << 32) + 7 : nil
        return QuotaRequest(
            uid: uid, addresses: quota == nil ? [] : addresses, quota: quota, now: now, held: quota == nil ? [] : held,
            record: !g.chance(15), caps: caps, recipients: addresses.count + g.next(3), heldVolume: heldVolume, budget: budget)
    }

    @Test func randomRequestsGetTheSameOutcomes() async throws {
        let sqlite = try SQLiteUnderTest()
        let postgres = try await PostgresUnderTest()
        var g = Generator(state: 0x5EED_2026_1207)
        var now = t0
        var admitted = 0
        var rowsSeen = 0
        for step in 0..<600 {
            now += Int64([0, 1, 60, 600, 1800, 4000][g.next(6)])
            let request = Self.randomRequest(&g, now: now)
            let expected = try await sqlite.admit(request)
            let got = try await postgres.admit(request)
            #expect(got == expected, "step \(step): \(request)")
            if expected.admitted { admitted += 1 }
            guard got == expected else { return }
            // Every 25 steps: the same counted addresses, and the same volume in both windows.
            guard step % 25 == 24 else { continue }
            for uid: UInt32 in [40, 41] {
                let rows = try await postgres.entries(uid: uid).sorted { $0.address < $1.address }
                #expect(rows == (try await sqlite.entries(uid: uid).sorted { $0.address < $1.address }), "step \(step)")
                rowsSeen += rows.count
                let caps = VolumeCaps(
                    messages: VolumeCap(kind: .messages, limit: 100, period: .day),
                    recipients: VolumeCap(kind: .recipients, limit: 100, period: .hour))
                for budget: Int64? in [nil, (1 << 32) + 7] {
                    #expect(
                        try await postgres.capStates(uid: uid, budget: budget, caps: caps, now: now)
                            == sqlite.capStates(uid: uid, budget: budget, caps: caps, now: now), "step \(step)")
                }
            }
        }
        // Both kinds of answer, and counted addresses, were exercised.
        #expect(admitted > 100 && admitted < 500)
        #expect(rowsSeen > 20)
    }

    /// Batches: in each round, one random request for each of 12 uids, all at once to the
    /// PostgreSQL store (most of them decided in batches) and one after another
    /// to SQLite. The uids' budgets are apart, so the order within a round changes nothing:
    /// the outcomes must be the same.
    @Test func concurrentRequestsInBatchesGetTheSameOutcomes() async throws {
        let sqlite = try SQLiteUnderTest()
        let postgres = try await PostgresUnderTest()
        var g = Generator(state: 0xBA7C_4E5)
        var now = t0
        var admitted = 0
        for round in 0..<40 {
            now += Int64([0, 1, 600, 4000][g.next(4)])
            let requests = (0..<12).map { Self.randomRequest(&g, now: now, uid: UInt32(60 + $0)) }
            var expected: [QuotaOutcome] = []
            for request in requests { expected.append(try await sqlite.admit(request)) }
            let got = try await withThrowingTaskGroup(of: (Int, QuotaOutcome).self) { group in
                for (i, request) in requests.enumerated() { group.addTask { (i, try await postgres.admit(request)) } }
                var got = [QuotaOutcome?](repeating: nil, count: requests.count)
                for try await (i, outcome) in group { got[i] = outcome }
                return got
            }
            #expect(got == expected.map { $0 }, "round \(round)")
            admitted += expected.filter(\.admitted).count
        }
        #expect(admitted > 100 && admitted < 400)
        for uid: UInt32 in 60..<72 {
            #expect(
                try await postgres.entries(uid: uid).sorted { $0.address < $1.address }
                    == sqlite.entries(uid: uid).sorted { $0.address < $1.address })
        }
    }
}

/// A budget whose lock another transaction holds (a host that stopped in the middle of one)
/// holds up only its own decisions: the others, batched with them, are answered at once.
@Suite("PostgreSQL batches", .enabled(if: TestPostgres.uri != nil, Comment(rawValue: TestPostgres.missing)))
struct PostgresBatchTests {
    @Test func aLockedBudgetHoldsUpOnlyItself() async throws {
        let scope = "locked-" + UUID().uuidString
        // The schema, and the blocker's connection, come from a store with the usual deadline
        // (creating the schema waits for the other suites' --init-store).
        let other = try await TestPostgres.store(scope: scope)
        defer { other.shutdown() }
        let store = PostgresQuotaStore(settings: try TestPostgres.settings(scope: scope, timeout: 4, pool: 4), logger: Logger(label: "test"))
        store.start()
        defer { store.shutdown() }
        try await other.withOwnConnection("holding a lock") { blocker in
            let logger = Logger(label: "test")
            try await blocker.query("BEGIN", logger: logger)
            try await blocker.query("SELECT pg_advisory_xact_lock(hashtext(\(scope)), 33)", logger: logger)
            let clock = ContinuousClock()
            let start = clock.now
            let outcomes = await withTaskGroup(of: (UInt32, Result<QuotaOutcome, any Error>, Duration).self) { group in
                for i in 0..<40 {
                    let uid: UInt32 = i % 4 == 0 ? 33 : UInt32(100 + i)
                    group.addTask {
                        do {
                            let outcome = try await store.admit(QuotaRequest(uid: uid, addresses: ["r\(i)@x.org"], quota: day, now: t0))
                            return (uid, .success(outcome), clock.now - start)
                        } catch {
                            return (uid, .failure(error), clock.now - start)
                        }
                    }
                }
                return await group.reduce(into: []) { $0.append($1) }
            }
            for (uid, result, took) in outcomes {
                if uid == 33 {
                    // Deferred (451) once state_timeout is up: never admitted past the lock.
                    #expect(throws: PostgresStoreError.self) { try result.get() }
                } else {
                    #expect((try? result.get())?.admitted == true, "uid \(uid)")
                    #expect(took < .seconds(3), "uid \(uid) waited \(took)")
                }
            }
            try await blocker.query("COMMIT", logger: logger)
        }
        // The lock gone, the uid's mail flows again. (A decision whose caller gave up as the
        // lock went may have been counted: the quota here leaves room for those.)
        let roomy = Quota(limit: 100, period: .day)
        #expect(try await store.admit(QuotaRequest(uid: 33, addresses: ["late@x.org"], quota: roomy, now: t0)).admitted)
    }
}
