// Small wrappers over libc: reading a bounded file, local users, privileges.
// No Foundation: the daemon stays small and its failure modes stay visible.

import Dispatch

#if canImport(Glibc)
import Glibc
#endif

public struct SystemError: Error, CustomStringConvertible, Sendable {
    public let what: String
    public let errno: Int32

    /// Captures the current errno.
    public init(_ what: String) {
        self.what = what
        self.errno = Glibc.errno
    }

    public init(_ what: String, errno: Int32) {
        self.what = what
        self.errno = errno
    }

    public var description: String {
        self.errno == 0 ? self.what : "\(self.what): \(String(cString: strerror(self.errno)))"
    }
}

public enum SystemFiles {
    /// Reads a whole file of at most `limit` bytes.
    public static func read(_ path: String, limit: Int) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("cannot open \(path)") }
        defer { close(fd) }
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("cannot read \(path)")
            }
            if n == 0 { break }
            result.append(contentsOf: chunk[0..<n])
            if result.count > limit { throw SystemError("\(path) is larger than \(limit) bytes", errno: 0) }
        }
        return result
    }

    public static func readText(_ path: String, limit: Int) throws -> String {
        String(decoding: try read(path, limit: limit), as: UTF8.self)
    }

    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }
}

/// The passwd database.
public enum Users {
    public struct Entry: Sendable {
        public let name: String
        public let uid: UInt32
        public let gid: UInt32
    }

    public static func lookup(name: String) -> Entry? {
        withPasswd { pw, buf, result in getpwnam_r(name, pw, buf, 16384, result) }
    }

    public static func lookup(uid: UInt32) -> Entry? {
        withPasswd { pw, buf, result in getpwuid_r(uid, pw, buf, 16384, result) }
    }

    private static func withPasswd(
        _ call: (UnsafeMutablePointer<passwd>, UnsafeMutablePointer<CChar>, UnsafeMutablePointer<UnsafeMutablePointer<passwd>?>) -> Int32
    ) -> Entry? {
        var pw = passwd()
        var result: UnsafeMutablePointer<passwd>? = nil
        var buffer = [CChar](repeating: 0, count: 16384)
        let rc = buffer.withUnsafeMutableBufferPointer { buf -> Int32 in
            guard let base = buf.baseAddress else { return ERANGE }
            return call(&pw, base, &result)
        }
        guard rc == 0, result != nil, let namePointer = pw.pw_name else { return nil }
        return Entry(name: String(cString: namePointer), uid: pw.pw_uid, gid: pw.pw_gid)
    }

    public static func groupID(name: String) -> UInt32? {
        var gr = Glibc.group()
        var result: UnsafeMutablePointer<Glibc.group>? = nil
        var buffer = [CChar](repeating: 0, count: 16384)
        let rc = buffer.withUnsafeMutableBufferPointer { buf -> Int32 in
            guard let base = buf.baseAddress else { return ERANGE }
            return getgrnam_r(name, &gr, base, 16384, &result)
        }
        guard rc == 0, result != nil else { return nil }
        return gr.gr_gid
    }
}

/// A cache of uid -> user name for log lines (the passwd lookup can be slow with NSS modules,
/// and a uid without an entry costs a dozen failed file opens each time). Bounded; a uid
/// without a name is remembered too. Replaced whole on reload, when users may have changed.
final class UserNames: Sendable {
    static let capacity = 4096
    private let cache = Mutex<[UInt32: String?]>([:])

    /// The name of `uid`, or nil when it has none. A name not cached yet is looked up off the
    /// event loop (NSS may read files or ask a directory service).
    func name(_ uid: UInt32) async -> String? {
        if let hit = self.cache.withLock({ $0[uid] }) { return hit }
        let name = (try? await Offload.run { Users.lookup(uid: uid)?.name }) ?? nil
        self.cache.withLock {
            if $0.count >= Self.capacity { $0.removeAll(keepingCapacity: true) }
            $0[uid] = .some(name)
        }
        return name
    }

    /// The name when it is cached: `.some(nil)` for a uid known to have none.
    func cached(_ uid: UInt32) -> String?? { self.cache.withLock { $0[uid] } }

    func forget() { self.cache.withLock { $0.removeAll() } }
}

public enum Privileges {
    /// Drops from root to `user` for good (groups, gid, uid), and checks it cannot come back.
    public static func drop(to user: Users.Entry) throws {
        var gid = user.gid
        guard setgroups(1, &gid) == 0 else { throw SystemError("setgroups") }
        guard setgid(user.gid) == 0 else { throw SystemError("setgid \(user.gid)") }
        guard setuid(user.uid) == 0 else { throw SystemError("setuid \(user.uid)") }
        if user.uid != 0, setuid(0) == 0 { throw SystemError("could regain root after dropping privileges", errno: 0) }
    }
}

/// Runs blocking work (a file read, an NSS lookup, opening a database) on a Dispatch worker
/// thread, never on an event loop.
enum Offload {
    /// `queue`: a serial queue where such work must run one at a time.
    static func run<T: Sendable>(
        on queue: DispatchQueue = .global(qos: .utility), _ body: @escaping @Sendable () throws -> T
    ) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            queue.async {
                continuation.resume(with: Result { try body() })
            }
        }
    }
}
