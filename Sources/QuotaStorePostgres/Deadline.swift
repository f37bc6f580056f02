// A deadline for work that may not honour cancellation (a query on a connection whose server
// went silent): the caller gets an error when the time is up, the work is cancelled and its
// result, whenever it comes, is dropped.

import NIOConcurrencyHelpers

enum Deadline {
    static func run<T: Sendable>(
        seconds: Int, onTimeout: @escaping @Sendable () -> any Error, _ body: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        let waiting = NIOLockedValueBox<CheckedContinuation<T, any Error>?>(nil)
        let timer = NIOLockedValueBox<Task<Void, Never>?>(nil)
        return try await withCheckedThrowingContinuation { continuation in
            waiting.withLockedValue { $0 = continuation }
            let work = Task {
                let result: Result<T, any Error>
                do { result = .success(try await body()) } catch { result = .failure(error) }
                timer.withLockedValue { $0 }?.cancel()
                waiting.withLockedValue { w in defer { w = nil }; return w }?.resume(with: result)
            }
            let clock = Task {
                guard (try? await Task.sleep(nanoseconds: UInt64(seconds) * 1_000_000_000)) != nil else { return }
                guard let late = waiting.withLockedValue({ w in defer { w = nil }; return w }) else { return }
                work.cancel()
                late.resume(throwing: onTimeout())
            }
            timer.withLockedValue { $0 = clock }
        }
    }
}
