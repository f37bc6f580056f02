// Parser for restrictpd.conf(5). Input: the file's text, from a file that only root should be
// able to write, but parsed as if it were hostile: every error is collected with its line
// number, nothing is guessed. User names are resolved through the resolver the caller passes,
// so this module reads no system files itself.

public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public let file: String
    public let line: Int
    public let message: String

    public init(file: String, line: Int, message: String) {
        self.file = file
        self.line = line
        self.message = message
    }

    public var description: String { "\(self.file):\(self.line): \(self.message)" }
}

/// Looks up local users; the daemon passes getpwnam(3), tests pass a table.
public struct UserResolver: Sendable {
    public let uid: @Sendable (String) -> UInt32?
    public init(uid: @escaping @Sendable (String) -> UInt32?) { self.uid = uid }
}

/// Every error found in one file.
public struct ConfigErrors: Error, Sendable, Equatable, CustomStringConvertible {
    public let errors: [ConfigError]
    public init(_ errors: [ConfigError]) { self.errors = errors }
    public var description: String { self.errors.map(\.description).joined(separator: "\n") }
}

public enum ConfigParser {
    public static let globalKeys: [String] = [
        "listen", "policy_listen", "relay", "clients", "peer_check", "unix_socket_mode", "unix_socket_group", "state",
        "recipient_delimiter", "over_quota", "smtp_authenticated", "on_refuse", "hold_relay", "freeze", "frozen", "notify", "warn",
        "postconf_dir", "metrics_file", "state_password_file", "scope",
    ] + Setting.all.map(\.key)
    public static let ruleStarts: [String] = ["user", "uid", "group", "default", "unknown"]
    public static let ruleKeys: [String] = ["allow", "arbitrary", "over_quota", "on_refuse", "freeze", "notify", "warn", "refuse", "shared"] + capKeys
    /// Every word restrictpd.conf(5) must document.
    public static var allKeys: [String] {
        var seen = Set<String>()
        return (globalKeys + ruleStarts + ruleKeys).filter { seen.insert($0).inserted }
    }

    public static let maxFileSize = 4 << 20
    public static let maxLineLength = 65536

    public static func parse(
        _ text: String, file: String, users: UserResolver, groups: GroupResolver = .numericOnly
    ) -> Result<Configuration, ConfigErrors> {
        if text.utf8.count > maxFileSize {
            return .failure(ConfigErrors([ConfigError(file: file, line: 0, message: "file larger than \(maxFileSize) bytes")]))
        }
        var state = ParseState(file: file, users: users, groups: groups)
        var lineNumber = 0
        // "\r\n" is one Character in Swift: split on it too, or a CRLF file is a single line.
        for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" }) {
            lineNumber += 1
            if rawLine.utf8.count > maxLineLength {
                state.error(lineNumber, "line longer than \(maxLineLength) bytes")
                continue
            }
            let words = Self.words(of: rawLine)
            guard let key = words.first else { continue }
            guard let handler = keywords[key] else {
                state.error(lineNumber, "unknown keyword '\(key)'")
                continue
            }
            handler(&state, Directive(key: key, args: Array(words.dropFirst()), line: lineNumber))
        }
        return state.end()
    }

    /// A line's words, without its comment.
    static func words(of line: Substring) -> [String] {
        var line = line
        if let hash = line.firstIndex(of: "#") { line = line[..<hash] }
        return line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }).map(String.init)
    }

    /// "after N refusals per hour|day".
    static func parseFreeze(_ args: [String]) -> FreezeRule? {
        guard args.count == 5, args[0] == "after", args[2] == "refusals" || args[2] == "refusal", args[3] == "per",
            args[1].count <= 6, let n = Int(args[1]), (1...FreezeRule.maxLimit).contains(n),
            let period = QuotaPeriod(rawValue: args[4]), period != .week
        else { return nil }
        return FreezeRule(limit: n, period: period)
    }

    static func resolve(_ word: String, _ users: UserResolver) -> (UInt32, String?)? {
        if !word.isEmpty, word.allSatisfy({ $0.isASCII && $0.isNumber }), word.count <= 10,
            let n = UInt64(word), n < UInt64(UInt32.max)
        {
            return (UInt32(n), nil)
        }
        guard let uid = users.uid(word) else { return nil }
        return (uid, word)
    }

    static func parsePattern(_ arg: String) -> Result<AllowPattern, PatternError> {
        let lower = arg.lowercased()
        if lower == "*" { return .success(.any) }
        if lower == "local" { return .success(.local) }
        if lower.hasPrefix("@.") {
            let d = String(lower.dropFirst(2))
            return isDomain(d) ? .success(.domainAndSubdomains(d)) : .failure(.init("bad domain"))
        }
        if lower.hasPrefix("@") {
            let d = String(lower.dropFirst())
            return isDomain(d) ? .success(.domain(d)) : .failure(.init("bad domain"))
        }
        if lower == "postmaster" { return .success(.address(lower)) }
        guard let at = lower.lastIndex(of: "@") else {
            return .failure(.init("an address needs a domain (or use @domain, @.domain, *)"))
        }
        let local = lower[..<at]
        let domain = String(lower[lower.index(after: at)...])
        guard !local.isEmpty, !local.contains(where: { $0 == "<" || $0 == ">" || $0 == "," || $0.isWhitespace }),
            isDomain(domain)
        else { return .failure(.init("bad address")) }
        return .success(.address(lower))
    }

    struct PatternError: Error {
        let text: String
        init(_ text: String) { self.text = text }
    }

    static func isDomain(_ d: String) -> Bool {
        guard !d.isEmpty, d.utf8.count <= 255 else { return false }
        return d.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
            !label.isEmpty && label.utf8.count <= 63 && label.first != "-" && label.last != "-"
                && label.unicodeScalars.allSatisfy { ($0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || $0 == "-")) || !$0.isASCII }
        }
    }

    static func unitHint(_ unit: Setting.Unit) -> String {
        switch unit {
        case .count: return ": a whole number"
        case .bytes: return ": bytes, or with k, m or g"
        case .seconds: return ": seconds, or with s, m or h"
        }
    }

    static func parseNumber(_ v: String, unit: Setting.Unit) -> Int? {
        var digits = Substring(v)
        var factor = 1
        if let last = v.last, !last.isNumber {
            digits = v.dropLast()
            switch (unit, last) {
            case (.bytes, "k"), (.bytes, "K"): factor = 1024
            case (.bytes, "m"), (.bytes, "M"): factor = 1024 * 1024
            case (.bytes, "g"), (.bytes, "G"): factor = 1024 * 1024 * 1024
            case (.seconds, "s"): factor = 1
            case (.seconds, "m"): factor = 60
            case (.seconds, "h"): factor = 3600
            default: return nil
            }
        }
        guard !digits.isEmpty, digits.count <= 13, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int(digits) else {
            return nil
        }
        // "9999999999999g" must be an error, not an overflow trap.
        let (product, overflow) = n.multipliedReportingOverflow(by: factor)
        return overflow ? nil : product
    }

    public static func parseListen(_ s: String) -> ListenAddress? {
        if s.hasPrefix("unix:") {
            let path = String(s.dropFirst(5))
            guard path.hasPrefix("/"), path.utf8.count < 108 else { return nil }
            return .unix(path: path)
        }
        let host: Substring
        let portText: Substring
        if s.hasPrefix("[") {
            guard let close = s.firstIndex(of: "]"), s[s.index(after: close)...].hasPrefix(":") else { return nil }
            host = s[s.index(after: s.startIndex)..<close]
            portText = s[s.index(close, offsetBy: 2)...]
            guard host.contains(":") else { return nil }
        } else {
            guard let colon = s.lastIndex(of: ":") else { return nil }
            host = s[..<colon]
            portText = s[s.index(after: colon)...]
            guard !host.contains(":") else { return nil }
        }
        guard !host.isEmpty, host.allSatisfy({ $0.isASCII && ($0.isHexDigit || $0 == "." || $0 == ":" || $0.isLetter || $0 == "-") }),
            let port = Int(portText), (1...65535).contains(port)
        else { return nil }
        return .tcp(host: String(host), port: port)
    }
}
