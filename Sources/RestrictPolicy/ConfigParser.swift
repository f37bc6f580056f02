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
        var config = Configuration()
        var errors: [ConfigError] = []
        var clientsSeen = false
        var listenSeen = false
        // Global settings other than `listen` take one value: a second line is a mistake.
        var globalLine: [String: Int] = [:]
        var policyListenSeen = false
        func once(_ key: String, _ line: Int) -> Bool {
            if key == "listen" || key == "policy_listen" { return true }
            if let first = globalLine[key] {
                error(line, "\(key) given twice (first at line \(first))")
                return false
            }
            globalLine[key] = line
            return true
        }
        var current: Rule? = nil
        var firstLine: [RuleSelector: Int] = [:]

        func error(_ line: Int, _ message: String) { errors.append(ConfigError(file: file, line: line, message: message)) }

        func finish(_ rule: Rule?) {
            guard let rule else { return }
            if let first = firstLine[rule.selector] {
                error(rule.line, "duplicate rule for \(rule.selector)\(rule.userName.map { " (\($0))" } ?? "") (first at line \(first))")
                return
            }
            firstLine[rule.selector] = rule.line
            config.rules.append(rule)
        }

        if text.utf8.count > maxFileSize {
            return .failure(ConfigErrors([ConfigError(file: file, line: 0, message: "file larger than \(maxFileSize) bytes")]))
        }
        var lineNumber = 0
        // "\r\n" is one Character in Swift: split on it too, or a CRLF file is a single line.
        for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" }) {
            lineNumber += 1
            if rawLine.utf8.count > maxLineLength {
                error(lineNumber, "line longer than \(maxLineLength) bytes")
                continue
            }
            var line = Substring(rawLine)
            if let hash = line.firstIndex(of: "#") { line = line[..<hash] }
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }).map(String.init)
            guard let key = words.first else { continue }
            let args = Array(words.dropFirst())

            switch key {
            case "user", "default", "unknown":
                finish(current)
                current = nil
                let rule: Rule
                if key == "user" {
                    guard args.count == 1 else {
                        error(lineNumber, "user takes one user name or UID")
                        continue
                    }
                    guard let (uid, name) = resolve(args[0], users) else {
                        error(lineNumber, "unknown user '\(args[0])'")
                        // Keep parsing the rule's body so its own errors are reported too.
                        current = Rule(selector: .user(uid: UInt32.max), userName: args[0], line: lineNumber)
                        firstLine[.user(uid: UInt32.max)] = nil
                        continue
                    }
                    rule = Rule(selector: .user(uid: uid), userName: name, line: lineNumber)
                } else {
                    guard args.isEmpty else {
                        error(lineNumber, "\(key) takes no arguments")
                        continue
                    }
                    rule = Rule(selector: key == "default" ? .default : .unknown, line: lineNumber)
                }
                current = rule

            case "group", "uid":
                finish(current)
                switch parseManyRule(key, args, line: lineNumber, groups: groups) {
                case .success(let rule):
                    current = rule
                case .failure(let why):
                    error(lineNumber, why.text)
                    // Keep parsing the rule's body so its own errors are reported too.
                    current = Rule(selector: .user(uid: UInt32.max), line: lineNumber)
                    firstLine[.user(uid: UInt32.max)] = nil
                }

            case "shared":
                guard var rule = current else {
                    error(lineNumber, "shared outside a rule: start one with 'group NAME' or 'uid FROM-TO'")
                    continue
                }
                if let why = parseShared(args, into: &rule) { error(lineNumber, why) }
                current = rule

            case _ where capKeys.contains(key):
                guard var rule = current else {
                    error(lineNumber, "\(key) outside a rule: start one with 'user NAME' or 'default'")
                    continue
                }
                if let why = parseCap(key, args, into: &rule) { error(lineNumber, why) }
                current = rule

            case "allow", "arbitrary", "refuse":
                guard var rule = current else {
                    error(lineNumber, "\(key) outside a rule: start one with 'user NAME', 'default' or 'unknown'")
                    continue
                }
                defer { current = rule }
                switch key {
                case "allow":
                    guard !args.isEmpty else {
                        error(lineNumber, "allow needs at least one address, @domain, @.domain or *")
                        continue
                    }
                    for arg in args {
                        switch parsePattern(arg) {
                        case .success(let p): rule.allow.append(p)
                        case .failure(let why): error(lineNumber, "bad allow entry '\(arg)': \(why.text)")
                        }
                    }
                case "arbitrary":
                    if rule.selector == .unknown {
                        error(lineNumber, "arbitrary has no meaning for unknown senders (there is no uid to count for)")
                        continue
                    }
                    if rule.quota != nil {
                        error(lineNumber, "arbitrary given twice in one rule")
                        continue
                    }
                    guard args.count == 1 || (args.count == 3 && args[1] == "per"),
                        let n = Int(args[0]), (0...Quota.maxLimit).contains(n)
                    else {
                        error(lineNumber, "arbitrary takes 'N' or 'N per hour|day|week' with N from 0 to \(Quota.maxLimit)")
                        continue
                    }
                    var period: QuotaPeriod? = nil
                    if args.count == 3 {
                        guard let p = QuotaPeriod(rawValue: args[2]) else {
                            error(lineNumber, "unknown period '\(args[2])': use hour, day or week")
                            continue
                        }
                        period = p
                    }
                    rule.quota = Quota(limit: n, period: period)
                case "refuse":
                    guard args.isEmpty else {
                        error(lineNumber, "refuse takes no arguments")
                        continue
                    }
                    rule.refuse = true
                default:
                    break
                }

            case "over_quota":
                guard args.count == 1, let v = OverQuota(rawValue: args[0]) else {
                    error(lineNumber, "over_quota takes 'defer', 'reject' or 'hold'")
                    continue
                }
                if current != nil {
                    current?.overQuota = v
                } else if once(key, lineNumber) {
                    config.overQuota = v
                }

            case "freeze":
                guard let rule = parseFreeze(args) else {
                    error(lineNumber, "freeze takes 'after N refusals per hour|day' with N from 1 to \(FreezeRule.maxLimit)")
                    continue
                }
                if current != nil {
                    current?.freeze = rule
                } else if once(key, lineNumber) {
                    config.freeze = rule
                }

            case "warn":
                guard args.count == 2, args[0] == "at", args[1].hasSuffix("%"), args[1].count <= 4,
                    let n = Int(args[1].dropLast()), (1...100).contains(n)
                else {
                    error(lineNumber, "warn takes 'at N%' with N from 1 to 100")
                    continue
                }
                if current != nil {
                    current?.warnAt = n
                } else if once(key, lineNumber) {
                    config.warnAt = n
                }

            case "notify":
                var addresses: [String] = []
                for arg in args {
                    guard case .success(.address(let a)) = parsePattern(arg), a.contains("@") else {
                        error(lineNumber, "bad notify address '\(arg)': use user@domain")
                        continue
                    }
                    addresses.append(a)
                }
                guard !args.isEmpty else {
                    error(lineNumber, "notify needs at least one address")
                    continue
                }
                if current != nil {
                    current?.notify = addresses
                } else if once(key, lineNumber) {
                    config.notify = addresses
                }

            case "on_refuse":
                guard args.count == 1, let v = OnRefuse(rawValue: args[0]) else {
                    error(lineNumber, "on_refuse takes 'reject' or 'hold'")
                    continue
                }
                if current != nil {
                    current?.onRefuse = v
                } else if once(key, lineNumber) {
                    config.onRefuse = v
                }

            default:
                guard globalKeys.contains(key) else {
                    error(lineNumber, "unknown keyword '\(key)'")
                    continue
                }
                if current != nil {
                    error(lineNumber, "\(key) is a global setting: move it above the first rule")
                    continue
                }
                guard once(key, lineNumber) else { continue }
                if key == "policy_listen" {
                    parseListenList(key, args, line: lineNumber, into: &config.policyListen, seen: &policyListenSeen, error: error)
                    continue
                }
                parseGlobal(key, args, line: lineNumber, into: &config, users: users, error: error,
                    clientsSeen: &clientsSeen, listenSeen: &listenSeen)
            }
        }
        finish(current)

        // A `refuse` rule may carry nothing else.
        for rule in config.rules where rule.refuse && (!rule.allow.isEmpty || rule.quota != nil) {
            error(rule.line, "a rule with 'refuse' cannot also allow or grant arbitrary destinations")
        }
        // The PostgreSQL store counts arbitrary destinations only: a rule that needs more of it
        // would go unenforced there, so it is refused rather than silently weakened.
        for rule in config.rules where rule.refuse && !rule.caps.isEmpty {
            error(rule.line, "a rule with 'refuse' sends nothing: it takes no messages, recipients or max_recipients")
        }
        config.rules.removeAll { $0.selector == .user(uid: UInt32.max) }
        errors += overlappingRanges(config.rules, file: file)
        if !clientsSeen {
            if let uid = users.uid("postfix") {
                config.clients = [uid]
            } else {
                config.clients = []
            }
        }
        return errors.isEmpty ? .success(config) : .failure(ConfigErrors(errors))
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

    static func parseGlobal(
        _ key: String, _ args: [String], line: Int, into config: inout Configuration, users: UserResolver,
        error: (Int, String) -> Void, clientsSeen: inout Bool, listenSeen: inout Bool
    ) {
        func one() -> String? {
            guard args.count == 1 else {
                error(line, "\(key) takes one value")
                return nil
            }
            return args[0]
        }
        switch key {
        case "listen":
            parseListenList(key, args, line: line, into: &config.listen, seen: &listenSeen, error: error)
        case "smtp_authenticated":
            guard let v = one() else { return }
            guard let mode = SMTPAuthenticated(rawValue: v) else { return error(line, "smtp_authenticated takes 'trust' or 'judge'") }
            config.smtpAuthenticated = mode
        case "relay":
            guard let v = one() else { return }
            guard case .tcp(let host, let port)? = parseListen(v) else {
                return error(line, "bad relay address '\(v)': use HOST:PORT or [IPV6]:PORT")
            }
            config.relayHost = host
            config.relayPort = port
        case "frozen":
            guard let v = one() else { return }
            guard let action = FrozenAction(rawValue: v) else { return error(line, "frozen takes 'hold' or 'defer'") }
            config.frozenAction = action
        case "hold_relay":
            guard let v = one() else { return }
            guard case .tcp(let host, let port)? = parseListen(v) else {
                return error(line, "bad hold_relay address '\(v)': use HOST:PORT or [IPV6]:PORT")
            }
            config.holdRelayHost = host
            config.holdRelayPort = port
        case "clients":
            guard !args.isEmpty else { return error(line, "clients needs at least one user") }
            clientsSeen = true
            config.clients = []
            config.clientNames = []
            for a in args {
                guard let (uid, _) = resolve(a, users) else {
                    error(line, "unknown user '\(a)' in clients")
                    continue
                }
                config.clients.append(uid)
                config.clientNames.append(a)
            }
        case "peer_check":
            guard let v = one() else { return }
            switch v {
            case "yes": config.peerCheck = true
            case "no": config.peerCheck = false
            default: error(line, "peer_check takes 'yes' or 'no'")
            }
        case "unix_socket_mode":
            guard let v = one() else { return }
            guard v.count <= 4, let mode = UInt32(v, radix: 8), mode <= 0o777 else {
                return error(line, "unix_socket_mode takes an octal mode such as 0660")
            }
            config.unixSocketMode = mode
        case "unix_socket_group":
            guard let v = one() else { return }
            config.unixSocketGroup = v
        case "state":
            guard let v = one() else { return }
            if PostgresLocation.isURI(v) {
                switch PostgresLocation.parse(v) {
                case .success(let location): config.statePostgres = location
                case .failure(let why): error(line, why.text)
                }
                return
            }
            guard v.hasPrefix("/") else { return error(line, "state must be an absolute path or a postgresql:// URI") }
            config.statePath = v
        case "metrics_file":
            guard let v = one() else { return }
            guard v.hasPrefix("/") else { return error(line, "metrics_file must be an absolute path") }
            config.metricsFile = v
        case "postconf_dir":
            guard let v = one() else { return }
            guard v.hasPrefix("/") else { return error(line, "postconf_dir must be an absolute path") }
            config.postconfDir = v
        case "state_password_file":
            guard let v = one() else { return }
            guard v.hasPrefix("/") else { return error(line, "state_password_file must be an absolute path") }
            config.statePasswordFile = v
        case "scope":
            guard let v = one() else { return }
            guard v.utf8.count <= 255, v.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-._:".contains($0)) }) else {
                return error(line, "scope takes up to 255 letters, digits and - . _ :")
            }
            config.scope = v
        case "recipient_delimiter":
            guard let v = one() else { return }
            guard v.count <= 8, v.allSatisfy({ $0.isASCII && !$0.isLetter && !$0.isNumber && $0 != "@" }) else {
                return error(line, "recipient_delimiter takes up to 8 punctuation characters, such as +")
            }
            config.recipientDelimiter = v
        default:
            guard let setting = Setting.all.first(where: { $0.key == key }), let v = one() else { return }
            guard let n = parseNumber(v, unit: setting.unit) else {
                return error(line, "bad value '\(v)' for \(key)\(unitHint(setting.unit))")
            }
            guard setting.range.contains(n) else {
                return error(line, "\(key) \(v) is out of range (\(setting.range.lowerBound)...\(setting.range.upperBound)\(setting.unit == .seconds ? " seconds" : setting.unit == .bytes ? " bytes" : ""))")
            }
            config.values[key] = n
        }
    }

    /// `listen` and `policy_listen`: one or more addresses a line, and several lines add up
    /// (the first line replaces the default).
    static func parseListenList(
        _ key: String, _ args: [String], line: Int, into list: inout [ListenAddress], seen: inout Bool, error: (Int, String) -> Void
    ) {
        guard !args.isEmpty else { return error(line, "\(key) needs HOST:PORT, [IPV6]:PORT or unix:/PATH") }
        if !seen { list = [] }
        seen = true
        for a in args {
            guard let l = parseListen(a) else {
                error(line, "bad \(key) address '\(a)': use HOST:PORT, [IPV6]:PORT or unix:/PATH")
                continue
            }
            list.append(l)
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
