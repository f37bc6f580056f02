// Mailbox syntax of RFC 5321 4.1.2 with the UTF-8 extension of RFC 6531.
// Input: the bytes between "<" and ">" of a MAIL or RCPT path, from an untrusted client.
// Limit: a path is at most 256 octets (RFC 5321 4.5.3.1.3).

public struct Mailbox: Sendable, Hashable, CustomStringConvertible {
    /// The local part as written (a quoted string keeps its quotes).
    public let localPart: String
    /// The domain or address literal; nil only for the unqualified "postmaster" (RFC 5321 4.1.1.3).
    public let domain: String?

    public var description: String {
        if let domain { return "\(self.localPart)@\(domain)" }
        return self.localPart
    }
}

public enum AddressError: Error, Equatable, Sendable {
    case missingBrackets
    case tooLong
    case empty
    case badLocalPart
    case badDomain
    case badSourceRoute
}

public enum AddressParser {
    public static let maxPathLength = 256
    public static let maxLocalPart = 64
    public static let maxDomain = 255

    /// Parses "<...>" (brackets included). `allowNull` accepts "<>" as the null reverse path.
    /// Returns nil for the null path.
    public static func parsePath(_ bytes: some Collection<UInt8>, allowNull: Bool) throws(AddressError) -> Mailbox? {
        let b = Array(bytes)
        guard b.count >= 2, b.first == UInt8(ascii: "<"), b.last == UInt8(ascii: ">") else {
            throw .missingBrackets
        }
        guard b.count <= maxPathLength else { throw .tooLong }
        var inner = b[1..<(b.count - 1)]
        if inner.isEmpty {
            if allowNull { return nil }
            throw .empty
        }
        // A source route ("@a,@b:") must be accepted and may be ignored (RFC 5321 4.1.1.3, C.).
        if inner.first == UInt8(ascii: "@") {
            guard let colon = inner.firstIndex(of: UInt8(ascii: ":")) else { throw .badSourceRoute }
            for hop in inner[inner.startIndex..<colon].split(separator: UInt8(ascii: ","), omittingEmptySubsequences: false) {
                guard hop.first == UInt8(ascii: "@"), isDomain(ArraySlice(hop.dropFirst())) else { throw .badSourceRoute }
            }
            inner = inner[(colon + 1)...]
        }
        return try parseMailbox(inner)
    }

    /// Parses "local@domain" (or the unqualified "postmaster").
    public static func parseMailbox(_ bytes: some Collection<UInt8>) throws(AddressError) -> Mailbox {
        let b = Array(bytes)
        guard !b.isEmpty else { throw .empty }
        guard b.count <= maxPathLength else { throw .tooLong }
        var i = 0
        if b[0] == UInt8(ascii: "\"") {
            i = 1
            var closed = false
            while i < b.count {
                let c = b[i]
                if c == UInt8(ascii: "\\") {
                    guard i + 1 < b.count, b[i + 1] >= 32, b[i + 1] != 127 else { throw .badLocalPart }
                    i += 2
                    continue
                }
                if c == UInt8(ascii: "\"") { closed = true; i += 1; break }
                // qtextSMTP: %d32-33 / %d35-91 / %d93-126 / UTF8-non-ascii
                guard c >= 32, c != 127 else { throw .badLocalPart }
                i += 1
            }
            guard closed else { throw .badLocalPart }
        } else {
            while i < b.count, b[i] != UInt8(ascii: "@") {
                guard isAtext(b[i]) || b[i] == UInt8(ascii: ".") else { throw .badLocalPart }
                i += 1
            }
            let dotString = b[0..<i]
            guard !dotString.isEmpty, dotString.first != UInt8(ascii: "."), dotString.last != UInt8(ascii: "."),
                !containsDoubleDot(dotString)
            else { throw .badLocalPart }
        }
        guard i <= maxLocalPart || b[0] == UInt8(ascii: "\"") && i <= maxLocalPart + 2 else { throw .badLocalPart }
        guard let local = String(validating: b[0..<i], as: UTF8.self) else { throw .badLocalPart }
        if i == b.count {
            // RFC 5321 4.1.1.3: "postmaster" without a domain, in any case.
            guard local.lowercased() == "postmaster" else { throw .badDomain }
            return Mailbox(localPart: local, domain: nil)
        }
        guard b[i] == UInt8(ascii: "@") else { throw .badLocalPart }
        let domainBytes = b[(i + 1)...]
        guard isDomain(domainBytes) || isAddressLiteral(domainBytes),
            let domain = String(validating: domainBytes, as: UTF8.self)
        else { throw .badDomain }
        return Mailbox(localPart: local, domain: domain)
    }

    static func isAtext(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"),
            UInt8(ascii: "'"), UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "/"),
            UInt8(ascii: "="), UInt8(ascii: "?"), UInt8(ascii: "^"), UInt8(ascii: "_"), UInt8(ascii: "`"),
            UInt8(ascii: "{"), UInt8(ascii: "|"), UInt8(ascii: "}"), UInt8(ascii: "~"):
            return true
        case 0x80...0xFF:
            return true  // UTF-8 (RFC 6531); validity is checked on the whole part
        default:
            return false
        }
    }

    static func containsDoubleDot(_ b: ArraySlice<UInt8>) -> Bool {
        var previousDot = false
        for c in b {
            let dot = c == UInt8(ascii: ".")
            if dot && previousDot { return true }
            previousDot = dot
        }
        return false
    }

    /// sub-domain *("." sub-domain), letters, digits, hyphens and UTF-8 (U-labels).
    static func isDomain(_ bytes: ArraySlice<UInt8>) -> Bool {
        guard !bytes.isEmpty, bytes.count <= maxDomain else { return false }
        for label in bytes.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) {
            guard !label.isEmpty, label.count <= 63, label.first != UInt8(ascii: "-"),
                label.last != UInt8(ascii: "-")
            else { return false }
            for c in label {
                switch c {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), 0x80...0xFF:
                    continue
                default:
                    return false
                }
            }
        }
        return true
    }

    /// "[" ( IPv4 / "IPv6:" IPv6 / tag ":" text ) "]", checked for its character set only.
    static func isAddressLiteral(_ bytes: ArraySlice<UInt8>) -> Bool {
        guard bytes.count >= 3, bytes.count <= maxDomain, bytes.first == UInt8(ascii: "["),
            bytes.last == UInt8(ascii: "]")
        else { return false }
        for c in bytes.dropFirst().dropLast() {
            // dcontent: %d33-90 / %d94-126
            guard (33...90).contains(c) || (94...126).contains(c) else { return false }
        }
        return true
    }
}
