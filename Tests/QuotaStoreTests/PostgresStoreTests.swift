// What only the PostgreSQL store has: a farm's hosts (separate pools, as separate processes
// would have) sharing one budget per scope, and failing closed. Needs RESTRICTPD_TEST_POSTGRES
// (see StoreContractTests.swift).

import Foundation
import Logging
import QuotaStore
import QuotaStorePostgres
import RestrictPolicy
import Testing

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
        settings.location.port = try Self.closedPort()
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

    /// A loopback port nothing listens on (bound, then closed).
    static func closedPort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw PostgresStoreError(.connection, location: "-", message: "no free port") }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}
