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
    /// How many days of hourly statistics (restrictpd --stats) the store keeps.
    public static let statsRetentionDays = Setting("stats_retention_days", 35, 1...3660, .count)

    /// Notifications (`notify`): at most one per UID in this interval, and `notify_limit` an
    /// hour in all.
    public static let notifyInterval = Setting("notify_interval", 3600, 60...86400, .seconds)
    public static let notifyLimit = Setting("notify_limit", 30, 1...10_000, .count)

    /// A PostgreSQL quota store: the longest a decision (connecting included) may take before
    /// it is answered 451 4.3.0, and the most connections one daemon opens to the database.
    public static let stateTimeout = Setting("state_timeout", 2, 1...60, .seconds)
    public static let statePool = Setting("state_pool", 4, 1...100, .count)

    public static let all: [Setting] = [
        commandLineLimit, dataLineLimit, headerLimit, recipientLimit, messageSizeLimit, maxSessions,
        idleTimeout, commandTimeout, dataTimeout, relayTimeout, relayConnectTimeout, drainTimeout, relayPool,
        policyReservationTimeout, policyMaxConnections, notifyInterval, notifyLimit, statsRetentionDays, stateTimeout, statePool,
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
    /// The message goes to the hold relay and waits in Postfix's hold queue for the admin.
    case hold
}

/// What happens to a message with a recipient outside the allow list (`on_refuse`).
public enum OnRefuse: String, Sendable, Equatable {
    /// 550 5.7.1: the message bounces (the default).
    case reject
    /// The message goes to the hold relay and waits in Postfix's hold queue for the admin.
    case hold
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
    /// "local": the domains Postfix delivers itself (`LocalDomains`).
    case local

    public var description: String {
        switch self {
        case .any: return "*"
        case .address(let a): return a
        case .domain(let d): return "@\(d)"
        case .domainAndSubdomains(let d): return "@.\(d)"
        case .local: return "local"
        }
    }
}

public enum RuleSelector: Sendable, Equatable, Hashable, CustomStringConvertible {
    case user(uid: UInt32)
    /// `uid FROM-TO`: every uid in the range without a `user` rule.
    case uidRange(from: UInt32, to: UInt32)
    /// `group NAME|GID`: every member (primary or supplementary group) without a `user` rule
    /// or a `uid` range.
    case group(gid: UInt32)
    /// Every identified user without a rule of its own.
    case `default`
    /// A message whose first header is not pickup's.
    case unknown

    public var description: String {
        switch self {
        case .user(let uid): return "user \(uid)"
        case .uidRange(let from, let to): return "uid \(from)-\(to)"
        case .group(let gid): return "group \(gid)"
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
    public var onRefuse: OnRefuse? = nil
    public var freeze: FreezeRule? = nil
    /// Where notifications about this rule's users go (`notify`); nil: the global list.
    public var notify: [String]? = nil
    /// `warn at N%`: this rule's share of the quota that warns; nil: the global one.
    public var warnAt: Int? = nil
    /// `messages`, `recipients`, `max_recipients`.
    public var caps = VolumeCaps.none
    /// `shared` (group and uid range rules): one budget for all the members, counted in
    /// the store under `budget` instead of each uid.
    public var shared = false
    /// The group name the rule was written with, if any.
    public var groupName: String? = nil
    /// `refuse`: nothing is allowed (the same as a rule with no allow and no arbitrary line).
    public var refuse = false
    /// The line the rule starts on, for messages.
    public var line: Int

    public init(selector: RuleSelector, userName: String? = nil, line: Int) {
        self.selector = selector
        self.userName = userName
        self.line = line
    }

    /// The store key a `shared` rule counts under: above every uid (which are 32-bit), so a
    /// shared budget never mixes with one user's. Groups: 2^32 + gid; uid ranges: 2^33 + the
    /// range's first uid. nil: each uid counts for itself.
    public var budget: Int64? {
        guard self.shared else { return nil }
        switch self.selector {
        case .group(let gid): return (Int64(1) << 32) + Int64(gid)
        case .uidRange(let from, _): return (Int64(1) << 33) + Int64(from)
        case .user, .default, .unknown: return nil
        }
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
    /// `postconf_dir`: the Postfix instance whose local domains `allow local` matches
    /// (postconf -c); nil: the default instance.
    public var postconfDir: String? = nil
    /// `metrics_file`: where the Prometheus text exposition is written every 30 s.
    public var metricsFile: String? = nil
    /// `state postgresql://...`: the quota store is a PostgreSQL database, shared by a farm.
    public var statePostgres: PostgresLocation? = nil
    /// The file holding the PostgreSQL password (its first line), if any.
    public var statePasswordFile: String? = nil
    /// The farm key of a PostgreSQL store: nodes with the same scope share every uid's quota.
    /// nil: the host name. The SQLite store, on one host only, ignores it.
    public var scope: String? = nil
    public var recipientDelimiter = ""
    public var overQuota: OverQuota = .defer
    public var onRefuse: OnRefuse = .reject
    /// Postfix's smtpd that puts every message it accepts on hold (`hold_relay`).
    public var holdRelayHost = "127.0.0.1"
    public var holdRelayPort = 10029
    /// `freeze after N refusals per hour|day`: none by default.
    public var freeze: FreezeRule? = nil
    public var frozenAction: FrozenAction = .hold
    /// `notify ADDRESS...`: the admins told about refusals, holds and freezes; none by default.
    public var notify: [String] = []
    /// `warn at N%`: a notice (and a notification) once a UID has used this share of its
    /// quota; none by default.
    public var warnAt: Int? = nil
    /// Numeric settings by key; absent keys take the setting's default.
    public var values: [String: Int] = [:]
    public var rules: [Rule] = []

    public init() {}

    public func value(_ setting: Setting) -> Int { self.values[setting.key] ?? setting.defaultValue }

    /// True when some rule says `allow local`: the daemon then reads Postfix's local domains.
    public var usesLocalDomains: Bool { self.rules.contains { $0.allow.contains(.local) } }

    public func rule(for selector: RuleSelector) -> Rule? { self.rules.first { $0.selector == selector } }

    /// The rules by selector, for lookups on every message.
    public var rulesBySelector: [RuleSelector: Rule] {
        Dictionary(self.rules.map { ($0.selector, $0) }, uniquingKeysWith: { first, _ in first })
    }
}
