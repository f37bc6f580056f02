// The model of /etc/restrictpd.conf (restrictpd.conf(5)). Pure values; the parser builds them,
// the daemon reads them. Every numeric setting is a `Setting` with a default and a legal range.

/// A numeric setting's name, default and range, as restrictpd.conf(5) documents them.
public struct Setting: Sendable {
    public enum Unit: Sendable { case count, bytes, seconds }
    public let key: String
    public let defaultValue: Int
    public let range: ClosedRange<Int>
    public let unit: Unit

    public init(_ key: String, _ defaultValue: Int, _ range: ClosedRange<Int>, _ unit: Unit) {
        self.key = key
        self.defaultValue = defaultValue
        self.range = range
        self.unit = unit
    }

    // The SMTP limits: the daemon hands their values to SMTPCore as `SMTPLimits`.
    // command_line_limit: RFC 5321 4.5.3.1.4 allows 512 octets, ESMTP parameters (RFC 1869)
    // add to that; Postfix's line_length_limit is 2048. data_line_limit: RFC 5321 4.5.3.1.6
    // says 1000 octets with CRLF, Postfix's smtp client folds at 990; the default leaves room
    // for other submitters. header_limit: the header section is held until the sender is
    // known (design decision 7). recipient_limit and message_size_limit: Postfix's defaults.
    public static let commandLineLimit = Setting("command_line_limit", 2048, 512...65536, .bytes)
    public static let dataLineLimit = Setting("data_line_limit", 8192, 1000...1_048_576, .bytes)
    public static let headerLimit = Setting("header_limit", 102_400, 1024...10_485_760, .bytes)
    public static let recipientLimit = Setting("recipient_limit", 1000, 1...100_000, .count)
    public static let messageSizeLimit = Setting("message_size_limit", 10_240_000, 0...(1 << 40), .bytes)
    public static let maxSessions = Setting("max_sessions", 100, 1...10_000, .count)
    public static let idleTimeout = Setting("idle_timeout", 300, 1...3600, .seconds)
    public static let commandTimeout = Setting("command_timeout", 300, 1...3600, .seconds)
    public static let dataTimeout = Setting("data_timeout", 3600, 1...86400, .seconds)
    public static let relayTimeout = Setting("relay_timeout", 300, 1...3600, .seconds)
    public static let relayConnectTimeout = Setting("relay_connect_timeout", 30, 1...600, .seconds)
    public static let drainTimeout = Setting("drain_timeout", 60, 0...3600, .seconds)
    /// Idle relay connections kept for the next session; each holds one relay smtpd process.
    public static let relayPool = Setting("relay_pool", 4, 0...1000, .count)
    /// The SMTP door: how long quota reserved at RCPT stays held without END-OF-MESSAGE
    /// (a client that vanished is noticed sooner, by a sweep of the kernel's socket table).
    /// Postfix's own smtpd gives up on a silent client after 300 s per read.
    public static let policyReservationTimeout = Setting("policy_reservation_timeout", 1200, 60...86400, .seconds)
    /// Open connections to the policy listeners: Postfix keeps one per smtpd process.
    public static let policyMaxConnections = Setting("policy_max_connections", 200, 1...10_000, .count)
    /// A PostgreSQL quota store: the longest a decision (connecting included) may take before
    /// it is answered 451 4.3.0, and the most connections one daemon opens to the database.
    public static let stateTimeout = Setting("state_timeout", 2, 1...60, .seconds)
    public static let statePool = Setting("state_pool", 4, 1...100, .count)

    public static let all: [Setting] = [
        commandLineLimit, dataLineLimit, headerLimit, recipientLimit, messageSizeLimit, maxSessions,
        idleTimeout, commandTimeout, dataTimeout, relayTimeout, relayConnectTimeout, drainTimeout, relayPool,
        policyReservationTimeout, policyMaxConnections, stateTimeout, statePool,
    ]
}

public enum ListenAddress: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)

    public var description: String {
        switch self {
        case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): return "unix:\(path)"
        }
    }
}

public enum QuotaPeriod: String, Sendable, Equatable, CaseIterable {
    case hour, day, week

    public var seconds: Int64 {
        switch self {
        case .hour: return 3600
        case .day: return 86400
        case .week: return 7 * 86400
        }
    }
}

/// `arbitrary N [per PERIOD]`: N distinct recipients outside the allow list.
public struct Quota: Sendable, Equatable, CustomStringConvertible {
    public let limit: Int
    /// nil: the first N addresses are remembered for good (a learned allow list).
    public let period: QuotaPeriod?

    public init(limit: Int, period: QuotaPeriod?) {
        self.limit = limit
        self.period = period
    }

    public var description: String { "\(self.limit)\(self.periodSuffix)" }

    /// " per day", or "" without a period.
    public var periodSuffix: String { self.period.map { " per \($0.rawValue)" } ?? "" }

    public static let maxLimit = 1_000_000
}

public enum OverQuota: String, Sendable, Equatable {
    /// 451 4.7.1: Postfix keeps the message queued and retries.
    case `defer`
    /// 550 5.7.1: the message bounces.
    case reject
}

/// What the SMTP door does with mail from a SASL-authenticated session.
public enum SMTPAuthenticated: String, Sendable, Equatable {
    /// The mailbox user's mail (webmail sends for everyone as www-data): Postfix decides.
    case trust
    /// Judged by the uid that owns the client's socket, like any other.
    case judge
}

public enum AllowPattern: Sendable, Equatable, CustomStringConvertible {
    case any
    /// A whole address, lower-cased ("webmaster@example.org", or "postmaster").
    case address(String)
    /// "@example.org": that domain only.
    case domain(String)
    /// "@.example.org": that domain and every subdomain.
    case domainAndSubdomains(String)

    public var description: String {
        switch self {
        case .any: return "*"
        case .address(let a): return a
        case .domain(let d): return "@\(d)"
        case .domainAndSubdomains(let d): return "@.\(d)"
        }
    }
}

public enum RuleSelector: Sendable, Equatable, Hashable, CustomStringConvertible {
    case user(uid: UInt32)
    /// Every identified user without a rule of its own.
    case `default`
    /// A message whose first header is not pickup's.
    case unknown

    public var description: String {
        switch self {
        case .user(let uid): return "user \(uid)"
        case .default: return "default"
        case .unknown: return "unknown"
        }
    }
}

public struct Rule: Sendable, Equatable {
    public var selector: RuleSelector
    /// The name the rule was written with, if any ("www-data").
    public var userName: String?
    public var allow: [AllowPattern] = []
    public var quota: Quota? = nil
    public var overQuota: OverQuota? = nil
    /// `refuse`: nothing is allowed (the same as a rule with no allow and no arbitrary line).
    public var refuse = false
    /// The line the rule starts on, for messages.
    public var line: Int

    public init(selector: RuleSelector, userName: String? = nil, line: Int) {
        self.selector = selector
        self.userName = userName
        self.line = line
    }
}

public struct Configuration: Sendable, Equatable {
    public var listen: [ListenAddress] = [.tcp(host: "127.0.0.1", port: 10027)]
    /// The policy service's listeners (the SMTP door); none unless configured.
    public var policyListen: [ListenAddress] = []
    public var smtpAuthenticated: SMTPAuthenticated = .trust
    public var relayHost = "127.0.0.1"
    public var relayPort = 10026
    /// Local users allowed to connect (resolved to UIDs), and the names they were given as.
    public var clients: [UInt32] = []
    public var clientNames: [String] = ["postfix"]
    public var peerCheck = true
    public var unixSocketMode: UInt32 = 0o660
    public var unixSocketGroup: String? = nil
    /// The SQLite quota database; unused when `statePostgres` is set.
    public var statePath = "/var/lib/restrictpd/quota.db"
    /// `state postgresql://...`: the quota store is a PostgreSQL database, shared by a farm.
    public var statePostgres: PostgresLocation? = nil
    /// The file holding the PostgreSQL password (its first line), if any.
    public var statePasswordFile: String? = nil
    /// The farm key of a PostgreSQL store: nodes with the same scope share every uid's quota.
    /// nil: the host name. The SQLite store, on one host only, ignores it.
    public var scope: String? = nil
    public var recipientDelimiter = ""
    public var overQuota: OverQuota = .defer
    /// Numeric settings by key; absent keys take the setting's default.
    public var values: [String: Int] = [:]
    public var rules: [Rule] = []

    public init() {}

    public func value(_ setting: Setting) -> Int { self.values[setting.key] ?? setting.defaultValue }

    public func rule(for selector: RuleSelector) -> Rule? { self.rules.first { $0.selector == selector } }

    /// The rules by selector, for lookups on every message.
    public var rulesBySelector: [RuleSelector: Rule] {
        Dictionary(self.rules.map { ($0.selector, $0) }, uniquingKeysWith: { first, _ in first })
    }
}
