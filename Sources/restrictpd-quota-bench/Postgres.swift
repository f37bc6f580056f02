// `restrictpd-quota-bench pg URI PASSWORD [DECISIONS] [USERS] [CALLERS] [POOL]`: the same workload
// as `run`, on the PostgreSQL store (a scope of its own per run, so runs never share rows).

import Glibc
import Logging
import QuotaStore
import QuotaStorePostgres
import RestrictPolicy

func postgresStore(uri: String, password: String, pool: Int, scope: String) async throws -> PostgresQuotaStore {
    guard case .success(let location) = PostgresLocation.parse(uri) else {
        throw PostgresStoreError(.connection, location: uri, message: "not a postgresql:// URI")
    }
    let settings = PostgresStoreSettings(location: location, password: password, scope: scope, timeout: 30, pool: pool)
    let store = PostgresQuotaStore(settings: settings, logger: Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() }))
    _ = try await store.initialize()
    store.start()
    return store
}

func timed(_ store: some QuotaStore, _ request: QuotaRequest, into tally: inout Tally) async throws {
    let clock = ContinuousClock()
    let begin = clock.now
    let outcome = try await store.admit(request)
    tally.latencies.append(clock.now - begin)
    if outcome.admitted { tally.admitted += 1 } else { tally.refused += 1 }
}

func reportPostgres(_ label: String, _ tally: Tally, _ elapsed: Duration) {
    let total = tally.admitted + tally.refused
    let seconds = milliseconds(elapsed) / 1000
    let sorted = tally.latencies.sorted()
    let p50 = milliseconds(sorted[sorted.count / 2])
    let p99 = milliseconds(sorted[min(sorted.count - 1, sorted.count * 99 / 100)])
    print(
        label.padding(21) + "\(total) decisions in \(format(seconds, 3)) s = \(Int(Double(total) / seconds)) decisions/s"
            + "  (p50 \(format(p50, 3)) ms, p99 \(format(p99, 3)) ms; admitted \(tally.admitted), refused \(tally.refused))")
}

func runPostgres(uri: String, password: String, decisions: Int, users: Int, callers: Int, pool: Int) async throws {
    print("quota store benchmark: \(decisions) admit decisions, \(users) users, quota \(quota), PostgreSQL, pool \(pool)")
    let clock = ContinuousClock()
    let sequential = try await postgresStore(uri: uri, password: password, pool: pool, scope: "bench-seq-\(getpid())-\(time(nil))")
    var random = Random(state: 0x9E37_79B9_7F4A_7C15)
    var tally = Tally()
    let begin = clock.now
    for i in 0..<decisions {
        try await timed(sequential, decision(i, users: users, random: &random), into: &tally)
    }
    reportPostgres("sequential:", tally, clock.now - begin)
    sequential.shutdown()

    let shared = try await postgresStore(uri: uri, password: password, pool: pool, scope: "bench-con-\(getpid())-\(time(nil))")
    let perCaller = decisions / callers
    let began = clock.now
    let total = try await withThrowingTaskGroup(of: Tally.self) { group in
        for caller in 0..<callers {
            group.addTask {
                var random = Random(state: 0x9E37_79B9_7F4A_7C15 &+ UInt64(caller) &* 7919)
                var tally = Tally()
                for i in 0..<perCaller {
                    try await timed(shared, decision(i * callers + caller, users: users, random: &random), into: &tally)
                }
                return tally
            }
        }
        return try await group.reduce(into: Tally()) { $0.add($1) }
    }
    reportPostgres("\(callers) concurrent callers:", total, clock.now - began)
    shared.shutdown()
}
