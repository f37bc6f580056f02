// A deadline for work that may not honour cancellation (a query on a connection whose server
// went silent): the caller gets an error when the time is up, the work is cancelled and its
// result, whenever it comes, is dropped.
//
// Called on an event loop (a session's task runs on its connection's loop), the work runs as a
// task on that same loop and the timer is the loop's: the work and its answer then need no hop
// to a thread of Swift's global pool and back, each a wake-up of another thread.

import LoopExecutor
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

enum Deadline {
    static func run<T: Sendable>(
        seconds: Int, onTimeout: @escaping @Sendable () -> any Error, _ body: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        let waiting = NIOLockedValueBox<CheckedContinuation<T, any Error>?>(nil)
        let stopTimer = NIOLockedValueBox<(@Sendable () -> Void)?>(nil)
        let loop = MultiThreadedEventLoopGroup.currentEventLoop
        return try await withCheckedThrowingContinuation { continuation in
            waiting.withLockedValue { $0 = continuation }
            let run: @Sendable () async -> Void = {
                let result: Result<T, any Error>
                do { result = .success(try await body()) } catch { result = .failure(error) }
                stopTimer.withLockedValue { $0 }?()
                waiting.withLockedValue { w in defer { w = nil }; return w }?.resume(with: result)
            }
            let work = loop.map { Task(executorPreference: LoopExecutor.of($0), operation: run) } ?? Task(operation: run)
            let expire: @Sendable () -> Void = {
                guard let late = waiting.withLockedValue({ w in defer { w = nil }; return w }) else { return }
                work.cancel()
                late.resume(throwing: onTimeout())
            }
            if let loop {
                let timer = loop.scheduleTask(in: .seconds(Int64(seconds)), expire)
                stopTimer.withLockedValue { $0 = { timer.cancel() } }
            } else {
                let clock = Task {
                    guard (try? await Task.sleep(nanoseconds: UInt64(seconds) * 1_000_000_000)) != nil else { return }
                    expire()
                }
                stopTimer.withLockedValue { $0 = { clock.cancel() } }
            }
        }
    }
}
