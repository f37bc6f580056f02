// The decisions waiting for the database, one batch at a time.
//
// A decision waits in the lane until the lane's task takes it: at once, in the next turn of the
// lane's loop, when the lane is idle, so the decisions asked in the meantime go together; else
// when the batch that is out is back. A batch is one statement (`restrictpd_admit`, taking
// only free locks, at most `batchLimit` decisions): under load, one round trip and one
// transaction serve many sessions, and the database does a fraction of the work per
// decision; with nothing else waiting a decision costs about what it would alone.
//
// A batch never waits for a budget's lock: a request whose lock another transaction (another
// host, or a request decided alone) holds is left undecided by the batch and decided alone
// (`restrictpd_admit` with that request only, waiting for the lock) on the lane's other
// connections, in a task of its own, while the lane goes on. Each caller waits at most
// `state_timeout` from its call (PostgresQuotaStore.admit): one that gives up while still
// waiting is taken out of the lane and never decided; one whose batch is already out may
// still be counted (its message is deferred, and Postfix's retry finds its addresses counted:
// repeats are free), as a decision alone may be when its answer comes too late. A batch that
// does not answer within `state_timeout` fails its requests, and the lane goes on.

import LoopExecutor
import NIOConcurrencyHelpers
import NIOCore
import PostgresNIO
import RestrictPolicy

final class DecisionLane: Sendable {
    let loop: any EventLoop
    /// One connection, for the batches.
    let batches: PostgresClient
    /// The connections for decisions that wait for a budget's lock (`batches` itself with
    /// `state_pool 1`).
    let others: PostgresClient

    /// Decisions in one batch at most: each adds a few hundred bytes to the statement and a
    /// row to its answer; beyond a few dozen the round trip it saves is a small share of its work.
    static let batchLimit = 32

    struct Waiting: Sendable {
        let id: UInt64
        let request: QuotaRequest
        let continuation: CheckedContinuation<QuotaOutcome, any Error>
    }

    private struct Queue: Sendable {
        var waiting: [Waiting] = []
        /// A decision or batch is out: later ones wait.
        var busy = false
        var nextID: UInt64 = 0
    }
    private let queue = NIOLockedValueBox(Queue())

    init(loop: any EventLoop, batches: PostgresClient, others: PostgresClient) {
        self.loop = loop
        self.batches = batches
        self.others = others
    }

    /// Adds a waiting decision; true when the lane was idle, so the caller must start draining it.
    func add(_ request: QuotaRequest, id: UInt64, _ continuation: CheckedContinuation<QuotaOutcome, any Error>) -> Bool {
        self.queue.withLockedValue { queue in
            queue.waiting.append(Waiting(id: id, request: request, continuation: continuation))
            guard !queue.busy else { return false }
            queue.busy = true
            return true
        }
    }

    func newID() -> UInt64 {
        self.queue.withLockedValue { queue in
            defer { queue.nextID &+= 1 }
            return queue.nextID
        }
    }

    /// Takes a waiting decision out of the lane (its caller gave up); nil when already taken.
    func remove(_ id: UInt64) -> Waiting? {
        self.queue.withLockedValue { queue in
            guard let index = queue.waiting.firstIndex(where: { $0.id == id }) else { return nil }
            return queue.waiting.remove(at: index)
        }
    }

    /// The next batch; empty, and the lane idle again, when nothing waits.
    func next() -> [Waiting] {
        self.queue.withLockedValue { queue in
            let batch = Array(queue.waiting.prefix(Self.batchLimit))
            queue.waiting.removeFirst(batch.count)
            if batch.isEmpty { queue.busy = false }
            return batch
        }
    }
}

extension PostgresQuotaStore {
    /// Decides `request` on `lane`, in the lane's next batch.
    func decide(_ request: QuotaRequest, on lane: DecisionLane) async throws -> QuotaOutcome {
        let id = lane.newID()
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                if lane.add(request, id: id, continuation) { self.drainInBackground(lane) }
                // Cancelled before it was added: the handler below found nothing to take out.
                if Task.isCancelled { lane.remove(id)?.continuation.resume(throwing: CancellationError()) }
            }
        } onCancel: {
            lane.remove(id)?.continuation.resume(throwing: CancellationError())
        }
    }

    /// Decides what waits on `lane`, a batch at a time, in a task on the lane's loop. The task
    /// runs after the work the loop already has, so the decisions of sessions served in the
    /// same turn of the loop go in one batch.
    private func drainInBackground(_ lane: DecisionLane) {
        Task(executorPreference: LoopExecutor.of(lane.loop)) {
            while true {
                let batch = lane.next()
                if batch.isEmpty { return }
                await self.decide(batch: batch, on: lane)
            }
        }
    }

    /// One decision in one statement, within `state_timeout` of its own: the lane must go on
    /// even when the caller, who has the same deadline, has gone.
    private func decideAlone(_ request: QuotaRequest, on lane: DecisionLane) async -> Result<QuotaOutcome, any Error> {
        do {
            return .success(try await Deadline.run(seconds: self.settings.timeout, onTimeout: self.timeoutError) {
                try await self.retrying("deciding", on: lane.others) { connection in
                    try await PostgresQuotaSQL.admit(request, scope: self.settings.scope, on: connection, logger: self.logger)
                }
            })
        } catch {
            return .failure(error)
        }
    }

    /// One batch: answers the decided requests, and decides the undecided ones alone, each in
    /// a task of its own.
    private func decide(batch: [DecisionLane.Waiting], on lane: DecisionLane) async {
        let results = await self.tryBatch(batch.map(\.request), on: lane)
        for (waiting, result) in zip(batch, results) {
            if let result {
                waiting.continuation.resume(with: result)
            } else {
                Task(executorPreference: LoopExecutor.of(lane.loop)) {
                    waiting.continuation.resume(with: await self.decideAlone(waiting.request, on: lane))
                }
            }
        }
    }

    /// The batch's statement within `state_timeout`: each request's outcome, nil for one
    /// whose budget's lock was taken. A failure is every request's, but for an error the server
    /// gave a batch of several other than a timeout: the statement may have failed for one
    /// request's data, so each is decided alone.
    private func tryBatch(_ requests: [QuotaRequest], on lane: DecisionLane) async -> [Result<QuotaOutcome, any Error>?] {
        do {
            return try await Deadline.run(seconds: self.settings.timeout, onTimeout: self.timeoutError) {
                try await self.retrying("deciding", on: lane.batches) { connection in
                    try await PostgresQuotaSQL.admit(batch: requests, scope: self.settings.scope, on: connection, logger: self.logger)
                }
            }
        } catch {
            if requests.count > 1, let state = PostgresStoreError.sqlState(error), state != "57014" {
                self.logger.warning("quota store \(self.location): a batch of \(requests.count) failed (SQLSTATE \(state)): deciding each alone")
                return requests.map { _ in nil }
            }
            return requests.map { _ in .failure(error) }
        }
    }
}
