// restrictpd --audit: the C helpers (CRestrictSys/probe.c) seen from Swift: bounded
// subprocesses, socket addresses, and connection probes, as root or as another user.

import CRestrictSys
import RestrictPolicy

#if canImport(Glibc)
import Glibc
#endif

/// What a program printed and how it ended.
struct CommandOutput: Sendable {
    /// The exit status, or nil when it was killed by a signal.
    var exitStatus: Int32?
    var text: String
}

enum AuditCommand {
    /// Runs `argv` (argv[0] an absolute path) for at most `timeoutMS`, keeping at most `cap`
    /// bytes of stdout and stderr together. A program that overruns either is killed.
    static func run(_ argv: [String], timeoutMS: Int32 = 10_000, cap: Int = 4 << 20) -> Result<CommandOutput, SystemError> {
        var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        cArgs.append(nil)
        defer { for p in cArgs { free(p) } }
        var buffer = [CChar](repeating: 0, count: cap)
        var length = 0
        var status: Int32 = 0
        let rc = buffer.withUnsafeMutableBufferPointer { buf in
            cArgs.withUnsafeMutableBufferPointer { args in
                crs_run_capture(args.baseAddress, timeoutMS, buf.baseAddress, cap, &length, &status)
            }
        }
        let name = argv.first ?? "?"
        switch rc {
        case 0: break
        case -ETIMEDOUT: return .failure(SystemError("\(name) did not finish within \(timeoutMS / 1000) s", errno: 0))
        case -EFBIG: return .failure(SystemError("\(name) wrote more than \(cap) bytes", errno: 0))
        default: return .failure(SystemError("cannot run \(name)", errno: -rc))
        }
        let text = String(decoding: buffer.prefix(length).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // WIFEXITED and WEXITSTATUS, which Swift cannot import (macros).
        let exited = status & 0x7F == 0
        return .success(CommandOutput(exitStatus: exited ? (status >> 8) & 0xFF : nil, text: text))
    }

    /// The first of `paths` that is an executable file.
    static func find(_ paths: [String]) -> String? { paths.first { access($0, X_OK) == 0 } }
}

/// A socket address as bytes, ready for connect(2), with its text for messages.
struct AuditSocketAddress: Sendable {
    var bytes: [UInt8]
    var text: String
}

enum AuditNet {
    /// The TCP addresses `host` resolves to (numeric, or a name from the hosts file or DNS).
    static func resolve(host: String, port: Int) -> [AuditSocketAddress] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>? = nil
        let bare = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        guard getaddrinfo(bare, String(port), &hints, &list) == 0 else { return [] }
        defer { freeaddrinfo(list) }
        var out: [AuditSocketAddress] = []
        var cursor = list
        while let ai = cursor {
            if let sa = ai.pointee.ai_addr {
                let raw = UnsafeRawBufferPointer(start: sa, count: Int(ai.pointee.ai_addrlen))
                let text = ai.pointee.ai_family == AF_INET6 ? "[\(bare)]:\(port)" : "\(bare):\(port)"
                out.append(AuditSocketAddress(bytes: Array(raw), text: text))
            }
            cursor = ai.pointee.ai_next
        }
        return out
    }

    /// A sockaddr_un for `path`, or nil when the path does not fit.
    static func unix(path: String) -> AuditSocketAddress? {
        let pathBytes = Array(path.utf8)
        var addr = sockaddr_un()
        guard pathBytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return nil }
        addr.sun_family = sa_family_t(AF_UNIX)
        var bytes = withUnsafeBytes(of: &addr) { Array($0) }
        let offset = MemoryLayout<sockaddr_un>.offset(of: \.sun_path) ?? 2
        for (i, b) in pathBytes.enumerated() { bytes[offset + i] = b }
        return AuditSocketAddress(bytes: Array(bytes.prefix(offset + pathBytes.count + 1)), text: "unix:\(path)")
    }

    static func addresses(_ listen: ListenAddress) -> [AuditSocketAddress] {
        switch listen {
        case .tcp(let host, let port): return resolve(host: host, port: port)
        case .unix(let path): return unix(path: path).map { [$0] } ?? []
        }
    }

    /// Does anything accept a connection at `address`? nil when it does, else the reason.
    static func connectFailure(_ address: AuditSocketAddress, timeoutMS: Int32) -> String? {
        let rc = address.bytes.withUnsafeBytes { crs_connect_check($0.baseAddress, UInt32($0.count), timeoutMS) }
        return rc == 1 ? nil : String(cString: strerror(-rc))
    }
}

/// What a child that became a local user saw when it connected somewhere.
struct ProbeOutcome: Sendable {
    var connected: Bool
    /// Why it did not connect (strerror), or why the probe itself failed.
    var reason: String
    /// The server's first line, when one was asked for and came.
    var greeting: String
    /// The probe could not be made as asked (no child, wrong identity): the result says nothing.
    var broken: Bool
}

enum AuditProbe {
    /// Connects to `address` from a child that is `uid`:`gid` and nothing else; with
    /// `greeting`, reads the server's first line and sends QUIT.
    static func connect(as uid: UInt32, gid: UInt32, to address: AuditSocketAddress, timeoutMS: Int32, greeting: Bool) -> ProbeOutcome {
        var result = crs_probe_result()
        let rc = address.bytes.withUnsafeBytes {
            crs_probe_as(uid, gid, $0.baseAddress, UInt32($0.count), timeoutMS, greeting ? 1 : 0, &result)
        }
        if rc != 0 {
            return ProbeOutcome(connected: false, reason: "probe failed: \(String(cString: strerror(-rc)))", greeting: "", broken: true)
        }
        if result.identity_ok == 0 {
            return ProbeOutcome(connected: false, reason: "the probe could not become uid \(uid)", greeting: "", broken: true)
        }
        // The first line only, without its CR LF (bytes: "\r\n" is one Character in Swift).
        let bytes = withUnsafeBytes(of: result.greeting) { raw in
            Array(raw.prefix(Int(max(0, min(result.greeting_len, 256)))))
        }
        var line = Array(bytes.prefix { $0 != 0x0A })
        if line.last == 0x0D { line.removeLast() }
        let reason = result.connected != 0 ? "connected" : String(cString: strerror(result.error))
        return ProbeOutcome(
            connected: result.connected != 0, reason: reason,
            greeting: String(decoding: line, as: UTF8.self), broken: false)
    }
}
