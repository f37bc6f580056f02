// `state postgresql://USER@HOST[:PORT]/DB[?sslmode=MODE]`: where a farm keeps its shared quota
// store. Parsed here, without I/O; the daemon connects. A password is never taken from the URI
// (it would end up in logs, `ps` output of tools and backups of the file): it comes from the file
// named by `state_password_file`.

/// libpq's sslmode values that postgres-nio can honour.
public enum PostgresSSLMode: String, Sendable, Equatable, CaseIterable {
    /// Plain TCP.
    case disable
    /// TLS when the server offers it, without verifying it (libpq's default).
    case prefer
    /// TLS or no connection, without verifying the server's certificate.
    case require
    /// TLS, the certificate verified against the system's roots and the host name.
    case verifyFull = "verify-full"
}

/// A PostgreSQL quota store's address.
public struct PostgresLocation: Sendable, Equatable, CustomStringConvertible {
    public var user: String
    public var host: String
    public var port: Int
    public var database: String
    public var sslMode: PostgresSSLMode

    public init(user: String, host: String, port: Int = 5432, database: String, sslMode: PostgresSSLMode = .prefer) {
        self.user = user
        self.host = host
        self.port = port
        self.database = database
        self.sslMode = sslMode
    }

    /// The URI as logs show it: never with a password (it has none).
    public var description: String {
        let host = self.host.contains(":") ? "[\(self.host)]" : self.host
        return "postgresql://\(self.user)@\(host):\(self.port)/\(self.database)?sslmode=\(self.sslMode.rawValue)"
    }

    /// True when `value` names a PostgreSQL store rather than a file.
    public static func isURI(_ value: String) -> Bool {
        value.hasPrefix("postgresql://") || value.hasPrefix("postgres://")
    }

    /// Parses `postgresql://USER@HOST[:PORT]/DB[?sslmode=MODE]`. Error texts never repeat the
    /// user-info part, which might hold a password.
    public static func parse(_ value: String) -> Result<PostgresLocation, LocationError> {
        let scheme = ["postgresql://", "postgres://"].first { value.hasPrefix($0) }
        guard let scheme else { return .failure(.init("not a postgresql:// URI")) }
        var rest = Substring(value.dropFirst(scheme.count))
        var query: Substring = ""
        if let q = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: q)...]
            rest = rest[..<q]
        }
        guard let at = rest.lastIndex(of: "@") else { return .failure(.init("state needs a user: postgresql://USER@HOST[:PORT]/DB")) }
        let userInfo = rest[..<at]
        guard !userInfo.contains(":") else {
            return .failure(.init("state must not carry a password: put it in the file named by state_password_file"))
        }
        guard let user = percentDecoded(userInfo), !user.isEmpty else { return .failure(.init("state: bad or empty user name")) }
        let hostPart = rest[rest.index(after: at)...]
        guard let slash = hostPart.firstIndex(of: "/") else { return .failure(.init("state needs a database: postgresql://USER@HOST[:PORT]/DB")) }
        guard let db = percentDecoded(hostPart[hostPart.index(after: slash)...]), !db.isEmpty, !db.contains("/") else {
            return .failure(.init("state: bad or empty database name"))
        }
        guard let (host, port) = hostAndPort(hostPart[..<slash]) else {
            return .failure(.init("state: bad host or port (HOST, HOST:PORT or [IPV6]:PORT, port 1 to 65535)"))
        }
        guard let sslMode = parseQuery(query) else {
            return .failure(.init("state: the only parameter is sslmode=disable|prefer|require|verify-full"))
        }
        return .success(PostgresLocation(user: user, host: host, port: port, database: db, sslMode: sslMode))
    }

    public struct LocationError: Error, Sendable, Equatable {
        public let text: String
        init(_ text: String) { self.text = text }
    }

    static func hostAndPort(_ s: Substring) -> (String, Int)? {
        var host = s
        var portText: Substring? = nil
        if s.hasPrefix("[") {
            guard let close = s.firstIndex(of: "]") else { return nil }
            host = s[s.index(after: s.startIndex)..<close]
            let after = s[s.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { return nil }
                portText = after.dropFirst()
            }
        } else if let colon = s.lastIndex(of: ":") {
            host = s[..<colon]
            portText = s[s.index(after: colon)...]
        }
        let okHost = !host.isEmpty && host.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-.:_".contains($0)) }
        guard okHost else { return nil }
        guard let portText else { return (String(host), 5432) }
        guard let port = Int(portText), (1...65535).contains(port), portText.allSatisfy(\.isNumber) else { return nil }
        return (String(host), port)
    }

    static func parseQuery(_ query: Substring) -> PostgresSSLMode? {
        var mode = PostgresSSLMode.prefer
        for pair in query.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1)
            guard parts.count == 2, parts[0] == "sslmode", let m = PostgresSSLMode(rawValue: String(parts[1])) else { return nil }
            mode = m
        }
        return mode
    }

    /// "%XX" escapes decoded; nil for a bad escape, invalid UTF-8 or a control character.
    static func percentDecoded(_ s: Substring) -> String? {
        var bytes: [UInt8] = []
        var i = s.utf8.startIndex
        while i != s.utf8.endIndex {
            let b = s.utf8[i]
            if b == UInt8(ascii: "%") {
                let h = s.utf8.index(after: i)
                guard h != s.utf8.endIndex, s.utf8.index(after: h) != s.utf8.endIndex else { return nil }
                let l = s.utf8.index(after: h)
                guard let v = UInt8(String(decoding: [s.utf8[h], s.utf8[l]], as: UTF8.self), radix: 16) else { return nil }
                bytes.append(v)
                i = s.utf8.index(after: l)
            } else {
                bytes.append(b)
                i = s.utf8.index(after: i)
            }
        }
        guard let text = String(validating: bytes, as: UTF8.self), !text.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) else {
            return nil
        }
        return text
    }
}
