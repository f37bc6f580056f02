// restrictpd --audit: matching Postfix's ways of naming an endpoint against restrictpd's
// listen, policy_listen and relay addresses. master.cf names inet services "smtp",
// "2525", "127.0.0.1:10026" or "[::1]:10026"; a content_filter is "smtp:[127.0.0.1]:10027";
// a policy server is "inet:127.0.0.1:10028" or "unix:/path".

import RestrictPolicy

/// A TCP endpoint; host nil means every address of the host (master.cf "smtp", "2525").
struct InetEndpoint: Sendable, Equatable, CustomStringConvertible {
    var host: String?
    var port: Int

    var description: String {
        guard let host else { return "*:\(self.port)" }
        return host.contains(":") ? "[\(host)]:\(self.port)" : "\(host):\(self.port)"
    }

    /// Well-known service names master.cf uses, so that no services(5) lookup is needed.
    static let servicePorts = ["smtp": 25, "submission": 587, "submissions": 465, "smtps": 465, "lmtp": 24]

    static func port(_ text: String) -> Int? {
        if let n = Int(text), (1...65535).contains(n) { return n }
        return self.servicePorts[text]
    }

    /// "HOST:PORT", "[HOST]:PORT", "PORT" or a service name.
    static func parse(_ text: String) -> InetEndpoint? {
        guard let colon = text.lastIndex(of: ":") else { return self.port(text).map { InetEndpoint(host: nil, port: $0) } }
        let host = String(text[..<colon]).trimmingCharacters(in: "[]")
        guard let port = self.port(String(text[text.index(after: colon)...])) else { return nil }
        return InetEndpoint(host: host.isEmpty ? nil : host, port: port)
    }

    static func isLoopbackName(_ host: String) -> Bool {
        host == "localhost" || HostAddress(host)?.isLoopback == true
    }

    /// Does a connection to `host`:`port` reach this endpoint? A name "localhost" stands for
    /// every loopback address; an endpoint without a host takes every address.
    func serves(host: String, port: Int) -> Bool {
        guard self.port == port else { return false }
        guard let mine = self.host else { return true }
        if mine == host { return true }
        if let a = HostAddress(mine), let b = HostAddress(host) { return a == b }
        return (mine == "localhost" && Self.isLoopbackName(host)) || (host == "localhost" && Self.isLoopbackName(mine))
    }
}

enum AuditEndpoints {
    /// Is `server` ("inet:HOST:PORT", "HOST:PORT", "unix:PATH") one of `addresses`?
    /// `queueDirectory`: Postfix resolves a relative unix path there.
    static func names(_ server: String, oneOf addresses: [ListenAddress], queueDirectory: String) -> Bool {
        if server.hasPrefix("unix:") || server.hasPrefix("/") || server.hasPrefix("private/") || server.hasPrefix("public/") {
            var path = server.hasPrefix("unix:") ? String(server.dropFirst(5)) : server
            if !path.hasPrefix("/") { path = queueDirectory + "/" + path }
            return addresses.contains { $0 == .unix(path: path) }
        }
        let rest = server.hasPrefix("inet:") ? String(server.dropFirst(5)) : server
        guard let endpoint = InetEndpoint.parse(rest), let host = endpoint.host else { return false }
        return addresses.contains { a in
            guard case .tcp(let h, let p) = a else { return false }
            return InetEndpoint(host: h, port: p).serves(host: host, port: endpoint.port)
        }
    }

    /// The next hop of a content_filter ("smtp:[127.0.0.1]:10027", "lmtp:unix:/path"):
    /// is it one of restrictpd's listeners?
    static func filterNames(_ filter: String, oneOf addresses: [ListenAddress], queueDirectory: String) -> Bool {
        guard let colon = filter.firstIndex(of: ":") else { return false }
        let nexthop = String(filter[filter.index(after: colon)...])
        if nexthop.hasPrefix("unix:") || nexthop.hasPrefix("inet:") {
            return self.names(nexthop, oneOf: addresses, queueDirectory: queueDirectory)
        }
        // "[host]:port" or "host:port"; without a port the smtp client uses 25.
        let withPort = nexthop.hasSuffix("]") || !nexthop.contains(":") ? nexthop + ":25" : nexthop
        return self.names(withPort, oneOf: addresses, queueDirectory: queueDirectory)
    }

    /// The endpoint an inet service of master.cf listens on.
    static func endpoint(of service: PostfixService) -> InetEndpoint? {
        service.type == "inet" ? InetEndpoint.parse(service.name) : nil
    }
}
