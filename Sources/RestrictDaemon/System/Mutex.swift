// A lock-protected value. Synchronization.Mutex needs a newer deployment target on some
// platforms; NIO's lock is available everywhere the daemon runs.

import NIOConcurrencyHelpers

final class Mutex<Value: Sendable>: Sendable {
    private let box: NIOLockedValueBox<Value>

    init(_ value: Value) { self.box = NIOLockedValueBox(value) }

    func withLock<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        try self.box.withLockedValue(body)
    }
}
