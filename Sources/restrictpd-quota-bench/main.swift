// Throughput of the SQLite quota store (bench/quota-bench runs it in a release build).
//
//   restrictpd-quota-bench run DIR [DECISIONS] [USERS] [CALLERS]
//       admit decisions for USERS uids with `arbitrary 20 per day` on fresh files in DIR,
//       sequentially, then from CALLERS concurrent tasks; prints decisions per second.
//   restrictpd-quota-bench contend FILE UID COUNT LIMIT [AT]
//       COUNT concurrent admits of distinct new addresses for UID against `arbitrary LIMIT per
//       day`, starting at the Unix time AT (so several processes start together); prints how
//       many were admitted.
//   restrictpd-quota-bench pg URI PASSWORD [DECISIONS] [USERS] [CALLERS] [POOL]
//       the `run` workload on the PostgreSQL store (Postgres.swift).

import Glibc
import QuotaStore
import RestrictPolicy

/// xorshift64*: reproducible, good enough to pick users and addresses.
struct Random {
    var state: UInt64
    mutating func next(_ bound: Int) -> Int {
        self.state ^= self.state >> 12
        self.state ^= self.state << 25
        self.state ^= self.state >> 27
        return Int((self.state &* 2_685_821_657_736_338_717) % UInt64(bound))
    }
}

struct Tally: Sendable {
    var admitted = 0
    var refused = 0
    var latencies: [Duration] = []

    mutating func add(_ other: Tally) {
        self.admitted += other.admitted
        self.refused += other.refused
        self.latencies += other.latencies
    }
}

let quota = Quota(limit: 20, period: .day)
let start: Int64 = 1_700_000_000

/// The `index`th decision of the workload: a user, one to three of its 40 likely addresses
/// (so repeats, new addresses and refusals all occur), time moving 5 s per decision so the
/// window slides (20000 decisions span more than a day) and pruning happens.
func decision(_ index: Int, users: Int, random: inout Random) -> QuotaRequest {
    let uid = UInt32(1000 + random.next(users))
    let count = 1 + random.next(3)
    var addresses: [String] = []
    for _ in 0..<count {
        let address = "dest\(random.next(40))-\(uid)@example.org"
        if !addresses.contains(address) { addresses.append(address) }
    }
    return QuotaRequest(uid: uid, addresses: addresses, quota: quota, now: start + Int64(index) * 5)
}

func milliseconds(_ d: Duration) -> Double {
    Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
}

func report(_ label: String, _ tally: Tally, _ elapsed: Duration, _ db: QuotaDatabase) throws {
    let total = tally.admitted + tally.refused
    let seconds = milliseconds(elapsed) / 1000
    let sorted = tally.latencies.sorted()
    let p50 = milliseconds(sorted[sorted.count / 2])
    let p99 = milliseconds(sorted[min(sorted.count - 1, sorted.count * 99 / 100)])
    let rows = try db.entries(uid: nil).count
    print(
        label.padding(21) + "\(total) decisions in \(format(seconds, 3)) s = \(Int(Double(total) / seconds)) decisions/s"
            + "  (p50 \(format(p50, 3)) ms, p99 \(format(p99, 3)) ms; admitted \(tally.admitted), refused \(tally.refused); \(rows) rows kept)")
}

func format(_ value: Double, _ decimals: Int) -> String {
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let n = Int((value * scale).rounded())
    let whole = n / Int(scale)
    var fraction = String(n % Int(scale))
    while fraction.count < decimals { fraction = "0" + fraction }
    return "\(whole).\(fraction)"
}

extension String {
    func padding(_ width: Int) -> String { self + String(repeating: " ", count: max(1, width - self.count)) }
}

func fileSize(_ path: String) -> Int {
    var info = stat()
    return stat(path, &info) == 0 ? Int(info.st_size) : 0
}

func run(dir: String, decisions: Int, users: Int, callers: Int) async throws {
    print("quota store benchmark: \(decisions) admit decisions, \(users) users, quota \(quota), SQLite file in \(dir)")

    let sequentialPath = dir + "/sequential.db"
    let db = try QuotaDatabase(path: sequentialPath)
    var random = Random(state: 0x9E37_79B9_7F4A_7C15)
    var tally = Tally()
    let clock = ContinuousClock()
    let begin = clock.now
    for i in 0..<decisions {
        try await timed(db, decision(i, users: users, random: &random), into: &tally)
    }
    try report("sequential:", tally, clock.now - begin, db)
    print("  file: \(fileSize(sequentialPath)) bytes, wal: \(fileSize(sequentialPath + "-wal")) bytes")
    db.close()

    let concurrentPath = dir + "/concurrent.db"
    let shared = try QuotaDatabase(path: concurrentPath)
    let perCaller = decisions / callers
    let began = clock.now
    let total = try await withThrowingTaskGroup(of: Tally.self) { group in
        for caller in 0..<callers {
            group.addTask {
                var random = Random(state: 0x9E37_79B9_7F4A_7C15 &+ UInt64(caller) &* 7919)
                var tally = Tally()
                for i in 0..<perCaller {
                    // Interleave the callers' clocks so time still moves forward overall.
                    try await timed(shared, decision(i * callers + caller, users: users, random: &random), into: &tally)
                }
                return tally
            }
        }
        return try await group.reduce(into: Tally()) { $0.add($1) }
    }
    try report("\(callers) concurrent callers:", total, clock.now - began, shared)
    print("  file: \(fileSize(concurrentPath)) bytes, wal: \(fileSize(concurrentPath + "-wal")) bytes")

    // The dry-run path of `restrictpd --test`: read-only connection, no transaction.
    let reader = try QuotaDatabase(path: concurrentPath, mode: .readOnly)
    let peekBegin = clock.now
    var peeks = 0
    for i in 0..<decisions {
        _ = try reader.peek(decision(i, users: users, random: &random))
        peeks += 1
    }
    let peekSeconds = milliseconds(clock.now - peekBegin) / 1000
    print("peek (read-only):".padding(21) + "\(peeks) decisions in \(format(peekSeconds, 3)) s = \(Int(Double(peeks) / peekSeconds)) decisions/s")
}

func contend(path: String, uid: UInt32, count: Int, limit: Int, at: Int) async throws {
    let db = try QuotaDatabase(path: path)
    let pid = getpid()
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    let wait = (at - now.tv_sec) * 1_000_000_000 - now.tv_nsec
    if wait > 0 { try await Task.sleep(for: .nanoseconds(wait)) }
    let outcomes = try await withThrowingTaskGroup(of: Bool.self) { group in
        for i in 0..<count {
            group.addTask {
                try await db.admit(QuotaRequest(
                    uid: uid, addresses: ["p\(pid)-\(i)@example.org"], quota: Quota(limit: limit, period: .day), now: start))
                    .admitted
            }
        }
        return try await group.reduce(into: 0) { $0 += $1 ? 1 : 0 }
    }
    print(outcomes)
}

let arguments = CommandLine.arguments
func usage() -> Never {
    print("usage: restrictpd-quota-bench run DIR [DECISIONS] [USERS] [CALLERS] | contend FILE UID COUNT LIMIT [AT] | pg URI PASSWORD [DECISIONS] [USERS] [CALLERS] [POOL]")
    exit(2)
}
do {
    switch arguments.dropFirst().first {
    case "run":
        guard arguments.count >= 3 else { usage() }
        let decisions = arguments.count > 3 ? Int(arguments[3]) ?? 20000 : 20000
        let users = arguments.count > 4 ? Int(arguments[4]) ?? 1000 : 1000
        let callers = arguments.count > 5 ? Int(arguments[5]) ?? 20 : 20
        guard decisions > 0, users > 0, callers > 0 else { usage() }
        try await run(dir: arguments[2], decisions: decisions, users: users, callers: callers)
    case "pg":
        guard arguments.count >= 4 else { usage() }
        let number = { (i: Int, fallback: Int) in arguments.count > i ? Int(arguments[i]) ?? fallback : fallback }
        let (decisions, users, callers, pool) = (number(4, 20000), number(5, 1000), number(6, 20), number(7, 20))
        guard decisions > 0, users > 0, callers > 0, pool > 0 else { usage() }
        try await runPostgres(uri: arguments[2], password: arguments[3], decisions: decisions, users: users, callers: callers, pool: pool)
    case "contend":
        guard arguments.count == 6 || arguments.count == 7, let uid = UInt32(arguments[3]), let count = Int(arguments[4]),
            let limit = Int(arguments[5]), let at = arguments.count == 7 ? Int(arguments[6]) : 0
        else { usage() }
        try await contend(path: arguments[2], uid: uid, count: count, limit: limit, at: at)
    default:
        usage()
    }
} catch {
    print("restrictpd-quota-bench: \(error)")
    exit(1)
}
