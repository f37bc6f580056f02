// A task executor that runs a task's jobs on one NIO event loop. A session's task runs on its
// connection's loop, and the quota store's work for it on the same loop, so that reads, writes
// and continuations never cross to another thread (on a busy host, each crossing is a wake-up).

public import NIOCore
import NIOConcurrencyHelpers

public final class LoopExecutor: TaskExecutor {
    public let loop: any EventLoop

    init(_ loop: any EventLoop) { self.loop = loop }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let executor = self.asUnownedTaskExecutor()
        self.loop.execute { job.runSynchronously(on: executor) }
    }

    private static let cache = NIOLockedValueBox<[ObjectIdentifier: LoopExecutor]>([:])

    /// The executor of `loop`, one per loop.
    public static func of(_ loop: any EventLoop) -> LoopExecutor {
        self.cache.withLockedValue { cache in
            if let e = cache[ObjectIdentifier(loop)] { return e }
            let e = LoopExecutor(loop)
            cache[ObjectIdentifier(loop)] = e
            return e
        }
    }
}
