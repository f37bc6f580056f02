// Listening sockets made with plain system calls, before any thread exists: the daemon binds
// them as root (a port below 1024 or a socket in /run needs it), then drops privileges while
// the process is still single-threaded, and only then hands the descriptors to SwiftNIO.
// (setuid(2) in a threaded process relies on glibc signalling every thread; a thread parked
// by the Swift runtime's async main is not reached and would keep root.)

import CRestrictSys
import NIOCore
public import RestrictPolicy

#if canImport(Glibc)
import Glibc
#endif

public enum ListenSocket {
    /// True when `fd` is bound to one of `addresses` (TCP by address and port, with names
    /// resolved; UNIX by path).
    public static func isBound(_ fd: Int32, toOneOf addresses: [ListenAddress]) -> Bool {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        guard rc == 0 else { return false }
        let bound: (HostAddress, Int)?
        var path: String? = nil
        switch Int32(storage.ss_family) {
        case AF_INET:
            bound = withUnsafeBytes(of: &storage) { raw in
                let sin = raw.load(as: sockaddr_in.self)
                var a = sin.sin_addr
                return HostAddress(bytes: withUnsafeBytes(of: &a) { Array($0) }).map { ($0, Int(UInt16(bigEndian: sin.sin_port))) }
            }
        case AF_INET6:
            bound = withUnsafeBytes(of: &storage) { raw in
                let sin6 = raw.load(as: sockaddr_in6.self)
                var a = sin6.sin6_addr
                return HostAddress(bytes: withUnsafeBytes(of: &a) { Array($0) }).map { ($0, Int(UInt16(bigEndian: sin6.sin6_port))) }
            }
        case AF_UNIX:
            bound = nil
            path = withUnsafeBytes(of: &storage) { raw in
                let sun = raw.load(as: sockaddr_un.self)
                return withUnsafeBytes(of: sun.sun_path) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            }
        default:
            return false
        }
        return addresses.contains { address in
            switch address {
            case .unix(let p):
                return p == path
            case .tcp(let host, let port):
                guard let (a, p) = bound, p == port else { return false }
                guard let resolved = try? SocketAddress.makeAddressResolvingHost(host, port: port), let ip = resolved.ipAddress else { return false }
                return HostAddress(ip) == a
            }
        }
    }

    /// socket, bind, listen; for `unix:` also the mode and group of the socket file.
    public static func open(_ address: ListenAddress, mode: UInt32, group gid: UInt32?, backlog: Int32 = 256) throws -> Int32 {
        switch address {
        case .tcp(let host, let port):
            let resolved = try SocketAddress.makeAddressResolvingHost(host, port: port)
            let family: Int32 = resolved.protocol == .inet6 ? AF_INET6 : AF_INET
            let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw SystemError("socket for \(address)") }
            do {
                var one: Int32 = 1
                guard setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
                    throw SystemError("SO_REUSEADDR on \(address)")
                }
                if family == AF_INET6 {
                    // [::1]:10027 means IPv6 only; IPv4 gets a listen line of its own.
                    guard setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
                        throw SystemError("IPV6_V6ONLY on \(address)")
                    }
                }
                let rc = resolved.withSockAddr { sa, len in Glibc.bind(fd, sa, socklen_t(len)) }
                guard rc == 0 else { throw SystemError("bind \(address)") }
                guard listen(fd, backlog) == 0 else { throw SystemError("listen \(address)") }
                return fd
            } catch {
                close(fd)
                throw error
            }
        case .unix(let path):
            // Remove only a socket left over from an earlier run, never another kind of file.
            var st = stat()
            if lstat(path, &st) == 0 {
                guard (st.st_mode & S_IFMT) == S_IFSOCK else { throw SystemError("\(path) exists and is not a socket", errno: 0) }
                guard unlink(path) == 0 else { throw SystemError("unlink \(path)") }
            }
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw SystemError("socket for \(address)") }
            do {
                let resolved = try SocketAddress(unixDomainSocketPath: path)
                let rc = resolved.withSockAddr { sa, len in Glibc.bind(fd, sa, socklen_t(len)) }
                guard rc == 0 else { throw SystemError("bind \(address)") }
                guard chmod(path, mode_t(mode)) == 0 else { throw SystemError("chmod \(path)") }
                if let gid, chown(path, UInt32.max, gid) != 0 { throw SystemError("chown \(path)") }
                guard listen(fd, backlog) == 0 else { throw SystemError("listen \(address)") }
                return fd
            } catch {
                close(fd)
                throw error
            }
        }
    }
}

extension Privileges {
    /// The number of threads of this process (from /proc/self/task).
    static func threadCount() -> Int? {
        guard let dir = opendir("/proc/self/task") else { return nil }
        defer { closedir(dir) }
        var n = 0
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != ".", name != ".." { n += 1 }
        }
        return n
    }

    /// Drops to `user`, which must happen while the process has a single thread, and checks
    /// the result the way an attacker would look: every real, effective and saved ID changed.
    public static func dropWhileSingleThreaded(to user: Users.Entry) throws {
        if let n = threadCount(), n != 1 {
            throw SystemError("refusing to drop privileges with \(n) threads running (a thread could keep root)", errno: 0)
        }
        try drop(to: user)
        var r: UInt32 = 0, e: UInt32 = 0, s: UInt32 = 0
        guard crs_getresuid(&r, &e, &s) == 0, r == user.uid, e == user.uid, s == user.uid else {
            throw SystemError("uids are not all \(user.uid) after setuid", errno: 0)
        }
        var rg: UInt32 = 0, eg: UInt32 = 0, sg: UInt32 = 0
        guard crs_getresgid(&rg, &eg, &sg) == 0, rg == user.gid, eg == user.gid, sg == user.gid else {
            throw SystemError("gids are not all \(user.gid) after setgid", errno: 0)
        }
    }

    /// Raises the soft limit on open files to the hard limit: each session holds two sockets,
    /// and systemd's default soft limit (1024) would run out near 500 sessions.
    public static func raiseFileLimit() -> (soft: UInt64, hard: UInt64)? {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
        }
        return (UInt64(limit.rlim_cur), UInt64(limit.rlim_max))
    }
}
