// Who is on the other end of a connection (design decision 9). Only the users in `clients`
// (Postfix's smtp client runs as `postfix`) may talk to restrictpd; anyone else could write
// their own "from userid 0" header.
//
// TCP on loopback: the kernel's socket table through NETLINK_SOCK_DIAG (an exact 4-tuple
// query), with /proc/net/tcp and /proc/net/tcp6 as the fallback. UNIX sockets: SO_PEERCRED.
// If the owner cannot be learned the connection is refused: never fail open.

import CRestrictSys
public import NIOCore
public import RestrictPolicy

#if canImport(Glibc)
import Glibc
#endif

public enum PeerLookupError: Error, CustomStringConvertible, Sendable {
    case notLocal(String)
    case notFound(String)
    case failed(String)

    public var description: String {
        switch self {
        case .notLocal(let s): return "peer \(s) is not a local socket"
        case .notFound(let s): return "no socket found for \(s)"
        case .failed(let s): return s
        }
    }
}

public enum PeerCredentials {
    struct UCred: Sendable {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
    }

    /// "127.0.0.1:40000", "[::1]:40000" or "unix" for log lines.
    public static func describe(_ address: SocketAddress?) -> String {
        guard let address else { return "unknown" }
        switch address {
        case .unixDomainSocket: return "unix"
        case .v4: return "\(address.ipAddress ?? "?"):\(address.port ?? 0)"
        case .v6: return "[\(address.ipAddress ?? "?")]:\(address.port ?? 0)"
        }
    }

    /// The UID of the process that owns the remote end of `channel`.
    public static func uid(of channel: any Channel) async throws -> UInt32 {
        guard let remote = channel.remoteAddress, let local = channel.localAddress else {
            throw PeerLookupError.failed("connection has no addresses")
        }
        switch remote {
        case .unixDomainSocket:
            guard let provider = channel as? any SocketOptionProvider else {
                throw PeerLookupError.failed("no socket options on this channel")
            }
            let cred: UCred = try await provider.unsafeGetSocketOption(
                level: NIOBSDSocket.OptionLevel(rawValue: SOL_SOCKET),
                name: NIOBSDSocket.Option(rawValue: SO_PEERCRED)
            ).get()
            return cred.uid
        case .v4, .v6:
            // The netlink query is answered by the kernel at once; the text-table fallback
            // reads a file, so it runs off the event loop.
            switch try netlinkOwner(remote: remote, local: local) {
            case .found(let uid):
                return uid
            case .unavailable(let why, let endpoints):
                return try await Offload.run { try procOwner(endpoints, why: why) }
            }
        }
    }

    /// The UID that owns the client's end of a TCP connection between two addresses of this
    /// host, as a Postfix policy request describes it (the SMTP door). A client socket of
    /// the IPv6 family talking to an IPv4 address is found under its v4-mapped form.
    public static func uid(client: HostAddress, clientPort: UInt16, server: HostAddress, serverPort: UInt16) async throws -> UInt32 {
        guard client.isIPv4 == server.isIPv4 else {
            throw PeerLookupError.notLocal("\(client) talking to \(server)")
        }
        var forms: [Endpoints] = [(client.isIPv4 ? AF_INET : AF_INET6, client.bytes, clientPort, server.bytes, serverPort)]
        if client.isIPv4 {
            let mapped: ([UInt8]) -> [UInt8] = { Array(repeating: 0, count: 10) + [0xFF, 0xFF] + $0 }
            forms.append((AF_INET6, mapped(client.bytes), clientPort, mapped(server.bytes), serverPort))
        }
        var unavailable: (String, Endpoints)? = nil
        for e in forms {
            var uid: UInt32 = 0
            let rc = e.src.withUnsafeBufferPointer { s in
                e.dst.withUnsafeBufferPointer { d in crs_inet_diag_uid(e.family, s.baseAddress, e.sport, d.baseAddress, e.dport, &uid) }
            }
            if rc == 0 { return uid }
            if rc != -ENOENT, unavailable == nil { unavailable = ("sock_diag: \(String(cString: strerror(-rc)))", e) }
        }
        guard let (why, first) = unavailable else {
            throw PeerLookupError.notFound("\(client):\(clientPort)")
        }
        let all = forms
        return try await Offload.run {
            for e in all {
                if let found = procNetOwner(family: e.family, src: e.src, sport: e.sport, dst: e.dst, dport: e.dport) { return found }
            }
            throw PeerLookupError.failed("\(why); /proc/net fallback found nothing for \(first.sport)")
        }
    }

    typealias Endpoints = (family: Int32, src: [UInt8], sport: UInt16, dst: [UInt8], dport: UInt16)
    enum NetlinkAnswer {
        case found(UInt32)
        case unavailable(String, Endpoints)
    }

    /// The kernel's answer through NETLINK_SOCK_DIAG; `.unavailable` when netlink itself failed.
    static func netlinkOwner(remote: SocketAddress, local: SocketAddress) throws -> NetlinkAnswer {
        guard let (family, src, sport) = endpoint(remote), let (lfamily, dst, dport) = endpoint(local), family == lfamily else {
            throw PeerLookupError.notLocal("\(remote)")
        }
        var uid: UInt32 = 0
        let rc = src.withUnsafeBufferPointer { s in
            dst.withUnsafeBufferPointer { d in
                crs_inet_diag_uid(family, s.baseAddress, sport, d.baseAddress, dport, &uid)
            }
        }
        if rc == 0 { return .found(uid) }
        // The kernel answered that there is no such established socket: the text table would
        // say the same, only slower (and a peer that resets in a loop must not make us read it).
        if rc == -ENOENT { throw PeerLookupError.notFound("\(remote)") }
        return .unavailable("sock_diag: \(String(cString: strerror(-rc)))", (family, src, sport, dst, dport))
    }

    /// Fallback when netlink is unavailable: the same table as text.
    static func procOwner(_ e: Endpoints, why: String) throws -> UInt32 {
        if let found = procNetOwner(family: e.family, src: e.src, sport: e.sport, dst: e.dst, dport: e.dport) {
            return found
        }
        throw PeerLookupError.failed("\(why); /proc/net fallback found nothing")
    }

    /// The owner of the TCP socket whose local end is `remote` and whose peer is `local`
    /// (our side), that is, the client's socket.
    /// `netlinkOwner`, then the text table, synchronously (tests and tools).
    static func tcpOwner(remote: SocketAddress, local: SocketAddress) throws -> UInt32 {
        switch try netlinkOwner(remote: remote, local: local) {
        case .found(let uid): return uid
        case .unavailable(let why, let endpoints): return try procOwner(endpoints, why: why)
        }
    }

    /// (family, address bytes in network order, port) with v4-mapped IPv6 folded to IPv4.
    static func endpoint(_ address: SocketAddress) -> (Int32, [UInt8], UInt16)? {
        switch address {
        case .v4(let a):
            var sin = a.address
            let bytes = withUnsafeBytes(of: &sin.sin_addr) { Array($0) }
            return (AF_INET, bytes, UInt16(bigEndian: sin.sin_port))
        case .v6(let a):
            var sin6 = a.address
            let bytes = withUnsafeBytes(of: &sin6.sin6_addr) { Array($0) }
            let port = UInt16(bigEndian: sin6.sin6_port)
            if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xff && bytes[11] == 0xff {
                return (AF_INET, Array(bytes[12..<16]), port)
            }
            return (AF_INET6, bytes, port)
        case .unixDomainSocket:
            return nil
        }
    }

    /// Reads /proc/net/tcp or /proc/net/tcp6 for the socket with local (src, sport) and remote
    /// (dst, dport). Addresses there are printed as 32-bit words in host order.
    static func procNetOwner(family: Int32, src: [UInt8], sport: UInt16, dst: [UInt8], dport: UInt16) -> UInt32? {
        let path = family == AF_INET ? "/proc/net/tcp" : "/proc/net/tcp6"
        guard let text = try? SystemFiles.readText(path, limit: 64 << 20) else { return nil }
        let want = procAddress(src, sport) + " " + procAddress(dst, dport)
        for line in text.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count > 7 else { continue }
            // State 01 is ESTABLISHED; a socket in TIME_WAIT reports uid 0.
            if "\(fields[1]) \(fields[2])" == want, fields[3] == "01", let uid = UInt32(fields[7]) { return uid }
        }
        return nil
    }

    static func procAddress(_ bytes: [UInt8], _ port: UInt16) -> String {
        var hex = ""
        // Each 4-byte group is printed as a host-order (little-endian here) 32-bit number.
        for group in stride(from: 0, to: bytes.count, by: 4) {
            let word = UInt32(bytes[group]) | UInt32(bytes[group + 1]) << 8 | UInt32(bytes[group + 2]) << 16 | UInt32(bytes[group + 3]) << 24
            hex += hex8(word)
        }
        return hex + ":" + String(hex8(UInt32(port)).suffix(4))
    }

    private static func hex8(_ v: UInt32) -> String {
        let s = String(v, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, 8 - s.count)) + s
    }
}
