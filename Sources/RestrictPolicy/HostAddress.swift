// IP addresses as Postfix's policy requests write them ("127.0.0.1", "::1", "2001:db8::5"),
// and the question the SMTP door asks of them: is this client on this host? Pure: the
// addresses of this host's interfaces are an argument (the daemon reads them with getifaddrs).

/// An IPv4 or IPv6 address as bytes in network order; IPv4-mapped IPv6 is folded to IPv4.
public struct HostAddress: Sendable, Hashable, CustomStringConvertible {
    /// 4 bytes (IPv4) or 16 bytes (IPv6).
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        if bytes.count == 16, bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xFF, bytes[11] == 0xFF {
            self.bytes = Array(bytes[12...])
        } else if bytes.count == 4 || bytes.count == 16 {
            self.bytes = bytes
        } else {
            return nil
        }
    }

    /// Parses dotted-quad IPv4 or RFC 4291 IPv6 text (with "::" and a trailing dotted quad);
    /// nil for anything else, including zone indexes and brackets.
    public init?(_ text: String) {
        guard !text.isEmpty, text.utf8.count <= 45 else { return nil }
        if !text.contains(":") {
            guard let v4 = Self.parseIPv4(Substring(text)) else { return nil }
            self.bytes = v4
            return
        }
        guard let v6 = Self.parseIPv6(text), let folded = HostAddress(bytes: v6) else { return nil }
        self = folded
    }

    public var isIPv4: Bool { self.bytes.count == 4 }

    /// 127.0.0.0/8 or ::1.
    public var isLoopback: Bool {
        if self.isIPv4 { return self.bytes[0] == 127 }
        return self.bytes[0..<15].allSatisfy { $0 == 0 } && self.bytes[15] == 1
    }

    /// Is a client at this address on this host? Loopback, or one of `local`, the addresses of
    /// this host's interfaces.
    public func isLocal(among local: Set<HostAddress>) -> Bool {
        self.isLoopback || local.contains(self)
    }

    public var description: String {
        if self.isIPv4 { return self.bytes.map(String.init).joined(separator: ".") }
        var groups: [UInt16] = []
        for i in stride(from: 0, to: 16, by: 2) { groups.append(UInt16(self.bytes[i]) << 8 | UInt16(self.bytes[i + 1])) }
        // The longest run of two or more zero groups becomes "::" (RFC 5952).
        var best = (start: -1, count: 0)
        var i = 0
        while i < 8 {
            guard groups[i] == 0 else { i += 1; continue }
            var j = i
            while j < 8, groups[j] == 0 { j += 1 }
            if j - i > best.count, j - i >= 2 { best = (i, j - i) }
            i = j
        }
        let hex = groups.map { String($0, radix: 16) }
        guard best.start >= 0 else { return hex.joined(separator: ":") }
        let head = hex[..<best.start].joined(separator: ":")
        let tail = hex[(best.start + best.count)...].joined(separator: ":")
        return head + "::" + tail
    }

    static func parseIPv4(_ text: Substring) -> [UInt8]? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var out: [UInt8] = []
        for p in parts {
            guard !p.isEmpty, p.count <= 3, p.allSatisfy({ $0.isASCII && $0.isNumber }),
                !(p.count > 1 && p.first == "0"), let n = UInt8(p)
            else { return nil }
            out.append(n)
        }
        return out
    }

    static func parseIPv6(_ text: String) -> [UInt8]? {
        let halves = text.components(separatedByDoubleColon: ())
        guard halves.count <= 2 else { return nil }
        func groups(_ s: Substring, allowV4Tail: Bool) -> [UInt8]? {
            if s.isEmpty { return [] }
            var out: [UInt8] = []
            let fields = s.split(separator: ":", omittingEmptySubsequences: false)
            for (i, f) in fields.enumerated() {
                if allowV4Tail, i == fields.count - 1, f.contains(".") {
                    guard let v4 = parseIPv4(f) else { return nil }
                    out += v4
                    continue
                }
                guard !f.isEmpty, f.count <= 4, let n = UInt16(f, radix: 16), f.allSatisfy(\.isHexDigit) else { return nil }
                out += [UInt8(n >> 8), UInt8(n & 0xFF)]
            }
            return out
        }
        if halves.count == 1 {
            guard let all = groups(halves[0], allowV4Tail: true), all.count == 16 else { return nil }
            return all
        }
        guard let head = groups(halves[0], allowV4Tail: false), let tail = groups(halves[1], allowV4Tail: true),
            head.count + tail.count <= 14
        else { return nil }
        return head + Array(repeating: 0, count: 16 - head.count - tail.count) + tail
    }
}

extension String {
    /// Splits at "::" (at most the first two pieces matter: a second "::" is an error).
    fileprivate func components(separatedByDoubleColon: ()) -> [Substring] {
        var pieces: [Substring] = []
        var start = self.startIndex
        var i = self.startIndex
        while i < self.endIndex {
            let next = self.index(after: i)
            if self[i] == ":", next < self.endIndex, self[next] == ":" {
                pieces.append(self[start..<i])
                start = self.index(after: next)
                i = start
                continue
            }
            i = next
        }
        pieces.append(self[start...])
        return pieces
    }
}
