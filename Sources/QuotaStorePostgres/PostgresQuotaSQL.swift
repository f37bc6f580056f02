// The quota store's statements, on one PostgreSQL connection.
//
// Serialisation: every decision that records runs in a READ COMMITTED transaction, that of
// the one statement `CALL restrictpd_admit(...)` (PostgresAdmitFunction), which first takes
// `pg_advisory_xact_lock(hashtext(scope), key)`, the key being the budget's (the uid, or a
// `shared` rule's budget key; see `lockKey`). Decisions for one (scope, budget), from any
// process on any host, therefore run one after another; the lock is released when the
// procedure commits (or by the server, when the connection dies). Each later statement
// inside the procedure takes a new snapshot, after the lock was granted, so it sees
// every row the previous holder committed: counting (the addresses and the volume caps),
// deciding and recording cannot interleave, and the processes of a farm together never exceed
// N. The advisory lock writes no row and needs no lock table. Two scopes (or budgets) whose
// keys hash alike share a lock: that only makes them wait for each other, it never merges
// their counts (rows are keyed by scope and budget).

import Logging
import PostgresNIO
import QuotaStore
import RestrictPolicy

enum PostgresQuotaSQL {
    /// The advisory lock's second key (int4) for a budget: a uid bit for bit; a shared
    /// budget's key (2^32 + gid, 2^33 + first uid) folded into 32 bits. A fold that meets
    /// another budget's key only serialises the two.
    static func lockKey(_ budget: Int64) -> Int32 {
        if let uid = UInt32(exactly: budget) { return Int32(bitPattern: uid) }
        return Int32(truncatingIfNeeded: budget ^ (budget >> 32))
    }

    /// What `restrictpd_admit` read and decided for one request.
    typealias Answer = (admitted: Bool, total: Int64, known: [String], messages: Int64, recipients: Int64)

    /// Decides, and when admitted records, in one statement: `restrictpd_admit` (see
    /// PostgresAdmitFunction) takes the lock, waiting for it, reads, decides, prunes, records
    /// and commits before it answers.
    static func admit(_ request: QuotaRequest, scope: String, on connection: PostgresConnection, logger: Logger) async throws -> QuotaOutcome {
        let outcomes = try await self.admit([request], wait: true, scope: scope, on: connection, logger: logger)
        guard let outcome = outcomes.first ?? nil else {
            throw PostgresAnswerError(message: "restrictpd_admit decided nothing")
        }
        return try outcome.get()
    }

    /// Decides the requests of a batch in one statement: each in turn whose budget's lock is
    /// free or already the batch's, as `admit` would. A request whose lock another transaction
    /// holds is left undecided (nil), to be decided alone: a batch never waits for a lock, so
    /// it can neither deadlock nor be held up by one budget.
    static func admit(batch requests: [QuotaRequest], scope: String, on connection: PostgresConnection, logger: Logger) async throws -> [Result<QuotaOutcome, any Error>?] {
        try await self.admit(requests, wait: false, scope: scope, on: connection, logger: logger)
    }

    private static func admit(
        _ requests: [QuotaRequest], wait: Bool, scope: String, on connection: PostgresConnection, logger: Logger
    ) async throws -> [Result<QuotaOutcome, any Error>?] {
        let rows = try await connection.execute(AdmitStatement(requests: requests, scope: scope, wait: wait), logger: logger)
        var answer: AdmitStatement.Row? = nil
        for try await row in rows {
            guard answer == nil else { throw PostgresAnswerError(message: "restrictpd_admit answered more than one row") }
            answer = row
        }
        guard let (indexes, admitted, totals, knownEnds, known, messages, recipients) = answer else {
            throw PostgresAnswerError(message: "restrictpd_admit answered no row")
        }
        let count = indexes.count
        guard admitted.count == count, totals.count == count, knownEnds.count == count, messages.count == count,
              recipients.count == count
        else {
            throw PostgresAnswerError(message: "restrictpd_admit answered arrays of different lengths")
        }
        var results: [Result<QuotaOutcome, any Error>?] = Array(repeating: nil, count: requests.count)
        var knownFrom = 0
        for n in 0..<count {
            let i = Int(indexes[n]) - 1
            let knownEnd = Int(knownEnds[n])
            guard results.indices.contains(i), results[i] == nil, knownFrom <= knownEnd, knownEnd <= known.count else {
                throw PostgresAnswerError(message: "restrictpd_admit answered request \(indexes[n]) of \(requests.count) twice, out of range or with its addresses out of range")
            }
            let answer = (admitted[n], totals[n], Array(known[knownFrom..<knownEnd]), messages[n], recipients[n])
            results[i] = Result { try self.outcome(requests[i], answer) }
            knownFrom = knownEnd
        }
        return results
    }

    /// The outcome is `QuotaArithmetic`'s, from what the procedure read; where the two do not
    /// agree on admitting, the store is not trusted (an error, 451).
    static func outcome(_ request: QuotaRequest, _ answer: Answer) throws -> QuotaOutcome {
        var volume: [VolumeCap.Kind: Int] = [:]
        for cap in request.caps.counted {
            volume[cap.kind] = self.figure(cap.kind == .messages ? answer.messages : answer.recipients)
        }
        let counted = CountedAddresses(total: self.figure(answer.total), known: Set(answer.known))
        let outcome = QuotaArithmetic.decide(request, counted: counted, volume: volume).0
        guard outcome.admitted == answer.admitted else {
            throw PostgresAnswerError(
                message: "the database \(answer.admitted ? "admitted" : "refused") a message this restrictpd would have \(outcome.admitted ? "admitted" : "refused") (uid \(request.uid)): is restrictpd_admit this build's?")
        }
        return outcome
    }

    /// A count the database gave, as the arithmetic takes it: clamped far below Int.max, since
    /// the arithmetic adds held volume and the message to it.
    static func figure(_ value: Int64) -> Int {
        Int(max(0, min(value, Int64(Int.max / 4))))
    }

    /// The decision `admit` would take, recording and pruning nothing, locking nothing.
    static func peek(_ request: QuotaRequest, scope: String, on connection: PostgresConnection, logger: Logger) async throws -> QuotaOutcome {
        let counted = request.quota == nil ? [] : try await self.counted(
            scope: scope, uid: request.budget, since: request.windowStart, on: connection, logger: logger)
        let volume = try await self.volume(request, scope: scope, on: connection, logger: logger)
        return QuotaArithmetic.decide(request, counted: counted, volume: volume).0
    }

    /// What the uid (or shared `budget`) has used of each counted cap of `caps` now.
    static func capStates(
        uid: UInt32, budget: Int64?, caps: VolumeCaps, now: Int64, scope: String, on connection: PostgresConnection, logger: Logger
    ) async throws -> [VolumeCapState] {
        let request = QuotaRequest(uid: uid, addresses: [], quota: nil, now: now, caps: caps, budget: budget)
        let volume = try await self.volume(request, scope: scope, on: connection, logger: logger)
        return QuotaArithmetic.decideCaps(request, counted: volume).states
    }

    /// Messages, and the sum of their recipients, of the request's budget in the window of
    /// each counted cap, in one read (the two caps may have different periods); for reading
    /// only (a decision reads and prunes inside `restrictpd_admit`). Empty when the rule counts
    /// no caps.
    static func volume(
        _ request: QuotaRequest, scope: String, on connection: PostgresConnection, logger: Logger
    ) async throws -> [VolumeCap.Kind: Int] {
        guard let from = request.caps.pruneBefore(now: request.now) else { return [:] }
        let uid = request.budget
        // A kind without a cap: a start no row reaches (its figure is not used).
        let messagesFrom = request.windowStart(.messages) ?? Int64.max
        let recipientsFrom = request.windowStart(.recipients) ?? Int64.max
        let rows = try await connection.query(
            """
            SELECT coalesce(sum(messages) FILTER (WHERE at >= \(messagesFrom)), 0)::bigint,
                   coalesce(sum(recipients) FILTER (WHERE at >= \(recipientsFrom)), 0)::bigint
            FROM restrictpd_volume WHERE scope = \(scope) AND uid = \(uid) AND at >= \(from)
            """, logger: logger)
        var counts: (messages: Int64, recipients: Int64) = (0, 0)
        for try await row in rows.decode((Int64, Int64).self) { counts = row }
        var result: [VolumeCap.Kind: Int] = [:]
        for cap in request.caps.counted {
            result[cap.kind] = self.figure(cap.kind == .messages ? counts.messages : counts.recipients)
        }
        return result
    }

    /// The addresses counted in the window from `start` (all when nil), for reading only.
    static func counted(
        scope: String, uid: Int64, since start: Int64?, on connection: PostgresConnection, logger: Logger
    ) async throws -> Set<String> {
        let since = start ?? Int64.min
        let rows = try await connection.query(
            "SELECT address FROM restrictpd_quota WHERE scope = \(scope) AND uid = \(uid) AND last_seen >= \(since)",
            logger: logger)
        var counted = Set<String>()
        for try await address in rows.decode(String.self) { counted.insert(address) }
        return counted
    }

    static func entries(scope: String, uid: UInt32?, on connection: PostgresConnection, logger: Logger) async throws -> [QuotaEntry] {
        let rows: PostgresRowSequence
        if let uid {
            rows = try await connection.query(
                """
                SELECT uid, address, first_seen, last_seen FROM restrictpd_quota
                WHERE scope = \(scope) AND uid = \(Int64(uid)) ORDER BY uid, first_seen, address
                """, logger: logger)
        } else {
            rows = try await connection.query(
                """
                SELECT uid, address, first_seen, last_seen FROM restrictpd_quota
                WHERE scope = \(scope) AND uid <= 4294967295 ORDER BY uid, first_seen, address
                """, logger: logger)
        }
        var result: [QuotaEntry] = []
        for try await (uid, address, first, last) in rows.decode((Int64, String, Int64, Int64).self) {
            guard let uid = UInt32(exactly: uid) else { continue }
            result.append(QuotaEntry(uid: uid, address: address, firstSeen: first, lastSeen: last))
        }
        return result
    }

    /// Forgets the uid's counted addresses and messages, in one transaction; how many of each
    /// together it forgot.
    static func reset(scope: String, uid: UInt32, on connection: PostgresConnection, logger: Logger) async throws -> Int {
        try await self.transaction(on: connection, logger: logger) {
            let id = Int64(uid)
            // The budget's lock first, as a decision takes it: no deadlock with one.
            try await connection.query("SELECT pg_advisory_xact_lock(hashtext(\(scope)), \(self.lockKey(id)))", logger: logger)
            var n = 0
            let addresses = try await connection.query(
                "DELETE FROM restrictpd_quota WHERE scope = \(scope) AND uid = \(id) RETURNING 1", logger: logger)
            for try await _ in addresses { n += 1 }
            let messages = try await connection.query(
                "DELETE FROM restrictpd_volume WHERE scope = \(scope) AND uid = \(id) RETURNING messages", logger: logger)
            for try await count in messages.decode(Int64.self) { n += Int(count) }
            return n
        }
    }

    /// BEGIN, `body`, COMMIT; ROLLBACK when `body` throws (and the connection still works).
    static func transaction<T: Sendable>(
        on connection: PostgresConnection, logger: Logger, _ body: () async throws -> T
    ) async throws -> T {
        try await connection.query("BEGIN ISOLATION LEVEL READ COMMITTED", logger: logger)
        do {
            let value = try await body()
            try await connection.query("COMMIT", logger: logger)
            return value
        } catch {
            _ = try? await connection.query("ROLLBACK", logger: logger)
            throw error
        }
    }
}
