// The decision for one message: who sent it, which rule applies, whether every recipient is
// allowed or fits the quota (design decisions 1 to 4). Pure: the quota store is reached through
// the `QuotaStore` protocol and the clock is an argument.

public import SMTPCore

/// The sender, as the daemon read it from the first header.
public enum Sender: Sendable, Equatable {
    case user(uid: UInt32, name: String?)
    case unidentified(reason: String)

    public var uid: UInt32? {
        if case .user(let uid, _) = self { return uid }
        return nil
    }

    /// "uid 33 (www-data)" or "unidentified sender".
    public var phrase: String {
        switch self {
        case .user(let uid, let name): return name.map { "uid \(uid) (\($0))" } ?? "uid \(uid)"
        case .unidentified: return "unidentified sender"
        }
    }
}

/// Recipient addresses as restrictpd compares and counts them.
public enum AddressKey {
    /// Lower-cased; with a recipient delimiter, "user+tag@domain" becomes "user@domain".
    public static func normalize(_ address: String, delimiter: String) -> String {
        let lower = address.lowercased()
        guard !delimiter.isEmpty else { return lower }
        let at = lower.lastIndex(of: "@") ?? lower.endIndex
        let local = lower[..<at]
        guard let d = local.firstIndex(where: { delimiter.contains($0) }), d != local.startIndex else { return lower }
        return String(local[..<d]) + lower[at...]
    }

    /// True when the local part can route the mail on by itself once the domain is stripped:
    /// Postfix's trivial-rewrite re-resolves "user%remote@local", "remote!user@local" and
    /// "\"user@remote\"@local" (allow_percent_hack, swap_bangpath, resolve_dequoted). Such an
    /// address says nothing about where the mail goes by its domain, so domain patterns do not
    /// allow it.
    public static func routesOnward(_ address: String) -> Bool {
        let at = address.lastIndex(of: "@") ?? address.endIndex
        let local = address[..<at]
        return local.hasPrefix("\"") || local.contains("%") || local.contains("!") || local.contains("@")
    }

    static func domain(of address: String) -> Substring? {
        guard let at = address.lastIndex(of: "@") else { return nil }
        return address[address.index(after: at)...]
    }
}

extension AllowPattern {
    /// `address` is lower-cased; `key` is its normalized form; `local`: the domains Postfix
    /// delivers itself, for `allow local`.
    public func matches(address: String, key: String, local: Set<String> = []) -> Bool {
        if AddressKey.routesOnward(address) {
            // Only "*" or the very address may allow a routing local part (see routesOnward).
            switch self {
            case .any: return true
            case .address(let a): return a == address
            case .domain, .domainAndSubdomains, .local: return false
            }
        }
        switch self {
        case .any:
            return true
        case .address(let a):
            return a == key || a == address
        case .domain(let d):
            return AddressKey.domain(of: key).map { $0 == d } ?? false
        case .domainAndSubdomains(let d):
            guard let domain = AddressKey.domain(of: key) else { return false }
            return domain == d || domain.hasSuffix("." + d)
        case .local:
            return AddressKey.domain(of: key).map { local.contains(String($0)) } ?? false
        }
    }
}

/// What the quota store is asked: may `uid` write to these addresses now, and does the
/// message fit the rule's volume caps?
public struct QuotaRequest: Sendable, Equatable {
    public let uid: UInt32
    /// Distinct normalized addresses outside the allow list, in recipient order.
    public let addresses: [String]
    /// The rule's quota of arbitrary recipients; nil when the rule has none (then
    /// `addresses` is empty and only the caps are asked about).
    public let quota: Quota?
    /// Seconds since the epoch.
    public let now: Int64
    /// Addresses that open SMTP transactions of this uid have reserved (see `Reservations`):
    /// they count against the limit as if counted, so the two doors together never exceed it.
    public let held: Set<String>
    /// False: only the decision is asked for; nothing is recorded or pruned.
    public let record: Bool
    /// The rule's volume caps.
    public let caps: VolumeCaps
    /// The message's recipients (all of them, allowed or not), for `recipients` and
    /// `max_recipients`.
    public let recipients: Int
    /// Messages and recipients open SMTP transactions of this uid have accepted at RCPT.
    public let heldVolume: HeldVolume
    /// The key the store counts under: the uid, or a `shared` rule's budget (`Rule.budget`).
    public let budget: Int64

    public init(
        uid: UInt32, addresses: [String], quota: Quota?, now: Int64, held: Set<String> = [], record: Bool = true,
        caps: VolumeCaps = .none, recipients: Int = 0, heldVolume: HeldVolume = .zero, budget: Int64? = nil
    ) {
        self.budget = budget ?? Int64(uid)
        self.uid = uid
        self.addresses = addresses
        self.quota = quota
        self.now = now
        self.held = held
        self.record = record
        self.caps = caps
        self.recipients = recipients
        self.heldVolume = heldVolume
    }

    /// Rows last used before this instant no longer count; nil: they always count.
    public var windowStart: Int64? { self.quota?.period.map { self.now - $0.seconds } }

    /// Where the window of a counted cap of this kind starts.
    public func windowStart(_ kind: VolumeCap.Kind) -> Int64? {
        self.caps.counted.first { $0.kind == kind }.map { self.now - $0.period.seconds }
    }
}

extension Quota {
    /// What `outcome` leaves of this quota, as the decision log shows it: "49/50 per day".
    public func remaining(after outcome: QuotaOutcome) -> String {
        "\(max(0, outcome.limit - outcome.used))/\(outcome.limit)\(self.periodSuffix)"
    }
}

public struct QuotaOutcome: Sendable, Equatable {
    public let admitted: Bool
    /// Distinct addresses counted in the window after this decision.
    public let used: Int
    public let limit: Int
    /// The first address that did not fit, when refused.
    public let firstRefused: String?
    /// Each counted volume cap, after this decision.
    public let caps: [VolumeCapState]
    /// The cap that refused the message (the arbitrary quota admitted it, or was not asked).
    public let refusedCap: CapRefusal?

    public init(
        admitted: Bool, used: Int, limit: Int, firstRefused: String?, caps: [VolumeCapState] = [], refusedCap: CapRefusal? = nil
    ) {
        self.admitted = admitted
        self.used = used
        self.limit = limit
        self.firstRefused = firstRefused
        self.caps = caps
        self.refusedCap = refusedCap
    }

    /// The state of the cap of `kind`, if the rule has one.
    public func cap(_ kind: VolumeCap.Kind) -> VolumeCapState? { self.caps.first { $0.cap.kind == kind } }
}

/// The addresses counted in a quota's window, as the arithmetic needs them: how many there
/// are, and those of them among a request's addresses and held ones. A store may know them all
/// (`init(_:)`); one that reads only the request's (the PostgreSQL store) gives the number
/// and those.
public struct CountedAddresses: Sendable, Equatable {
    /// How many addresses are counted in the window.
    public let total: Int
    /// Counted addresses: at least those among the request's addresses and held ones.
    public let known: Set<String>

    public init(_ all: Set<String>) {
        self.total = all.count
        self.known = all
    }

    /// `total` below `known.count` is taken as `known.count`.
    public init(total: Int, known: Set<String>) {
        self.total = max(total, known.count)
        self.known = known
    }
}

/// The arithmetic of design decision 3, shared by every store.
public enum QuotaArithmetic {
    /// `counted`: the addresses already counted in the window (for this uid).
    /// Returns the outcome and the addresses to record (all requested ones when admitted: a
    /// repeat refreshes its time, so "distinct addresses in any window" stays exact).
    /// Addresses in `request.held` count as if counted; recording them is their holder's job.
    /// A store that calls this form has not counted the volume caps: a request with counted
    /// caps is then refused (the caps taken as full), never admitted unchecked; such a store
    /// must use `decide(_:counted:volume:)`.
    public static func decide(_ request: QuotaRequest, counted: Set<String>) -> (QuotaOutcome, record: [String]) {
        if !request.caps.isEmpty {
            let unknown = Dictionary(uniqueKeysWithValues: request.caps.counted.map { ($0.kind, Int.max / 4) })
            let (outcome, record, _) = decide(request, counted: counted, volume: unknown)
            return (outcome, record)
        }
        return decideArbitrary(request, counted: CountedAddresses(counted))
    }

    /// The arbitrary quota alone.
    static func decideArbitrary(_ request: QuotaRequest, counted: CountedAddresses) -> (QuotaOutcome, record: [String]) {
        guard let quota = request.quota else {
            return (QuotaOutcome(admitted: true, used: 0, limit: 0, firstRefused: nil), [])
        }
        // The counted addresses with the held ones: held addresses not counted add to them.
        let base = counted.total + request.held.subtracting(counted.known).count
        var used = base
        for address in request.addresses where !counted.known.contains(address) && !request.held.contains(address) {
            if used >= quota.limit {
                return (QuotaOutcome(admitted: false, used: base, limit: quota.limit, firstRefused: address), [])
            }
            used += 1
        }
        return (QuotaOutcome(admitted: true, used: used, limit: quota.limit, firstRefused: nil), request.record ? request.addresses : [])
    }

    /// The whole decision: the arbitrary quota, then the volume caps (`volume`: what the store
    /// counted in each cap's window). Returns the outcome, the addresses to record, and
    /// whether a message row is to be recorded. Nothing is recorded unless both admit.
    public static func decide(
        _ request: QuotaRequest, counted: Set<String>, volume: [VolumeCap.Kind: Int]
    ) -> (QuotaOutcome, record: [String], recordMessage: Bool) {
        decide(request, counted: CountedAddresses(counted), volume: volume)
    }

    /// As `decide(_:counted:volume:)`, from the number of counted addresses and those of them
    /// the request names.
    public static func decide(
        _ request: QuotaRequest, counted: CountedAddresses, volume: [VolumeCap.Kind: Int]
    ) -> (QuotaOutcome, record: [String], recordMessage: Bool) {
        let (arbitrary, record) = decideArbitrary(request, counted: counted)
        let (states, refused) = decideCaps(request, counted: volume)
        let admitted = arbitrary.admitted && refused == nil
        // Refused: the arbitrary figure and the caps as they stand, without this message.
        let fresh = Set(request.addresses).subtracting(counted.known).subtracting(request.held).count
        let used = admitted || !arbitrary.admitted ? arbitrary.used : arbitrary.used - fresh
        let outcome = QuotaOutcome(
            admitted: admitted, used: used, limit: arbitrary.limit, firstRefused: arbitrary.firstRefused,
            caps: admitted ? spent(states, request) : states, refusedCap: arbitrary.admitted ? refused : nil)
        guard admitted, request.record else { return (outcome, [], false) }
        return (outcome, record, !request.caps.counted.isEmpty)
    }
}

public protocol QuotaStore: Sendable {
    /// Decides and records in one transaction. Throws when the store cannot answer.
    func admit(_ request: QuotaRequest) async throws -> QuotaOutcome
}

/// The outcome of the allow lists, before any quota is spent.
public enum Evaluation: Sendable, Equatable {
    /// Every recipient is on the allow list.
    case allowed
    /// Some recipients need the quota, or the rule has volume caps; the store must be asked.
    /// `quota` is nil when no recipient needs it (`addresses` is empty then).
    /// `written`: each counted key with the recipient as the client wrote it, for replies.
    /// `budget`: the store key of a `shared` rule (nil: the uid's own).
    case needsQuota(
        addresses: [String], quota: Quota?, overQuota: OverQuota, written: [String: String], caps: VolumeCaps = .none,
        budget: Int64? = nil)
    /// A recipient no rule allows: the message is refused (550 5.7.1), or held with
    /// `on_refuse hold` (`hold`).
    case refused(recipient: String, reason: String, hold: Bool = false)
}

public struct Verdict: Sendable, Equatable {
    public enum Kind: String, Sendable { case relay = "relayed", refuse = "refused", `defer` = "deferred", hold = "held" }
    public let kind: Kind
    /// What the client is told when the message is not relayed (from `Replies`); when it is,
    /// the relay's own reply is passed on instead.
    public let reply: SMTPReply
    /// For the log: why.
    public let reason: String
    /// For the log: "17/20 per day" when a quota was involved.
    public let quota: String?
    /// For the log: what is left of the `messages` and `recipients` caps ("47/50 per hour").
    public let messages: String?
    public let recipients: String?
    /// Relayed: the addresses outside the allow list it counted, for the statistics.
    public var strangers: [String] = []

    public init(kind: Kind, reply: SMTPReply, reason: String, quota: String?, messages: String? = nil, recipients: String? = nil) {
        self.kind = kind
        self.reply = reply
        self.reason = reason
        self.quota = quota
        self.messages = messages
        self.recipients = recipients
    }

    public static func relay(reason: String, quota: String?, messages: String? = nil, recipients: String? = nil) -> Verdict {
        Verdict(kind: .relay, reply: Replies.ok, reason: reason, quota: quota, messages: messages, recipients: recipients)
    }

    public var code: Int { self.reply.code }
    public var enhanced: String { self.reply.enhancedCode ?? "" }
    /// The reply's text after its enhanced code.
    public var text: String {
        let line = self.reply.lines[0]
        return self.reply.enhancedCode.map { String(line.dropFirst($0.count + 1)) } ?? line
    }
}

public struct Policy: Sendable {
    public let configuration: Configuration
    private let rules: [RuleSelector: Rule]
    /// `uid` range rules, and `group` rules in file order.
    private let ranges: [Rule]
    private let groupRules: [Rule]
    /// The domains `allow local` matches (read from Postfix by the daemon).
    public let localDomains: Set<String>

    public init(_ configuration: Configuration, localDomains: Set<String> = []) {
        self.configuration = configuration
        self.localDomains = localDomains
        self.rules = configuration.rulesBySelector
        self.ranges = configuration.rules.filter { if case .uidRange = $0.selector { return true } else { return false } }
        self.groupRules = configuration.rules.filter { if case .group = $0.selector { return true } else { return false } }
    }

    /// True when some rule is chosen by group: the daemon then looks the sender's groups up.
    public var needsGroups: Bool { !self.groupRules.isEmpty }

    /// The sender's rule, from most to least specific: `user`, `uid` range, `group` (the
    /// first in the file among the sender's `groups`, primary and supplementary), `default`.
    public func rule(for sender: Sender, groups: [UInt32] = []) -> Rule? {
        switch sender {
        case .user(let uid, _):
            if let rule = self.ruleBeforeGroups(uid: uid) { return rule }
            if !groups.isEmpty, let rule = self.groupRules.first(where: { rule in
                if case .group(let gid) = rule.selector { return groups.contains(gid) } else { return false }
            }) {
                return rule
            }
            return self.rules[.default]
        case .unidentified:
            return self.rules[.unknown]
        }
    }

    /// The `user` rule or `uid` range of `uid`, if any.
    public func ruleBeforeGroups(uid: UInt32) -> Rule? {
        if let rule = self.rules[.user(uid: uid)] { return rule }
        return self.ranges.first { rule in
            if case .uidRange(let from, let to) = rule.selector { return (from...to).contains(uid) } else { return false }
        }
    }

    /// Checks every recipient against the sender's rule (`groups`: the sender's groups, for
    /// `group` rules).
    public func evaluate(sender: Sender, recipients: [String], groups: [UInt32] = []) -> Evaluation {
        let delimiter = self.configuration.recipientDelimiter
        guard let rule = self.rule(for: sender, groups: groups) else {
            let why = sender.uid == nil ? "no unknown rule" : "no rule and no default rule"
            return .refused(recipient: recipients.first ?? "", reason: why)
        }
        var needQuota: [String] = []
        var seen = Set<String>()
        var written: [String: String] = [:]
        for recipient in recipients {
            let lower = recipient.lowercased()
            let key = AddressKey.normalize(recipient, delimiter: delimiter)
            if !rule.refuse, rule.allow.contains(where: { $0.matches(address: lower, key: key, local: self.localDomains) }) { continue }
            guard let quota = rule.quota, quota.limit > 0, sender.uid != nil else {
                let hold = (rule.onRefuse ?? self.configuration.onRefuse) == .hold && sender.uid != nil
                return .refused(recipient: recipient, reason: rule.refuse ? "rule refuses all" : "not on the allow list", hold: hold)
            }
            if seen.insert(key).inserted {
                needQuota.append(key)
                written[key] = recipient
            }
        }
        // Unidentified senders have no uid to count for: the parser allows no caps there.
        let caps = sender.uid == nil ? VolumeCaps.none : rule.caps
        let quota = needQuota.isEmpty ? nil : rule.quota
        if quota == nil && caps.isEmpty { return .allowed }
        let overQuota = rule.overQuota ?? self.configuration.overQuota
        return .needsQuota(addresses: needQuota, quota: quota, overQuota: overQuota, written: written, caps: caps, budget: rule.budget)
    }

    /// The whole decision, asking `store` when a quota is involved.
    /// The whole decision: what the rules say, the store asked once when a quota is
    /// involved (`held`: addresses the uid's open SMTP transactions reserved), and the
    /// verdict of the two. The daemon's one place that awaits the store.
    public func decide(
        sender: Sender, recipients: [String], store: any QuotaStore, now: Int64, held: Set<String> = [], groups: [UInt32] = []
    ) async -> Verdict {
        let evaluation = self.evaluate(sender: sender, recipients: recipients, groups: groups)
        let request = Self.quotaRequest(evaluation, sender: sender, now: now, held: held, recipients: recipients.count)
        guard let request else {
            return Self.verdict(evaluation, sender: sender, outcome: nil)
        }
        do {
            return Self.verdict(evaluation, sender: sender, outcome: .success(try await store.admit(request)))
        } catch {
            return Self.verdict(evaluation, sender: sender, outcome: .failure(error))
        }
    }

    /// The question for the quota store, when the evaluation needs one.
    /// `recipients`: the message's recipients, allowed or not; `heldVolume`: what open SMTP
    /// transactions of the uid accepted and have not spent yet.
    public static func quotaRequest(
        _ evaluation: Evaluation, sender: Sender, now: Int64, held: Set<String> = [], record: Bool = true,
        recipients: Int = 0, heldVolume: HeldVolume = .zero
    ) -> QuotaRequest? {
        guard case .needsQuota(let addresses, let quota, _, _, let caps, let budget) = evaluation, let uid = sender.uid else { return nil }
        return QuotaRequest(
            uid: uid, addresses: addresses, quota: quota, now: now, held: held, record: record,
            caps: caps, recipients: recipients, heldVolume: heldVolume, budget: budget)
    }

    /// The verdict of an evaluation and, where a quota was involved, the store's answer (nil:
    /// not asked). Pure: the daemon, the policy service and `--test` all end here.
    public static func verdict(_ evaluation: Evaluation, sender: Sender, outcome: Result<QuotaOutcome, any Error>?) -> Verdict {
        switch evaluation {
        case .allowed:
            return .relay(reason: "allowed", quota: nil)
        case .refused(let rcpt, let reason, let hold):
            // A held message's reply is the text the policy service's HOLD carries; the
            // content filter passes the hold relay's own answer on instead.
            return Verdict(kind: hold ? .hold : .refuse, reply: Replies.notPermitted(rcpt, who: Self.who(sender)), reason: "<\(rcpt)> \(reason)", quota: nil)
        case .needsQuota(let addresses, let quota, let overQuota, let written, _, _):
            guard sender.uid != nil, let outcome else {
                return Verdict(kind: .refuse, reply: Replies.notPermitted(addresses.first ?? "", who: Self.who(sender)), reason: "no uid", quota: nil)
            }
            switch outcome {
            case .failure(let error):
                return Verdict(kind: .defer, reply: Replies.storeUnavailable, reason: "quota store error: \(error)", quota: nil)
            case .success(let outcome):
                return Self.verdict(outcome, quota: quota, overQuota: overQuota, addresses: addresses, written: written, sender: sender)
            }
        }
    }

    /// The verdict of the store's answer: relayed, or the rule's over_quota answer naming the
    /// arbitrary quota or the cap that refused.
    static func verdict(
        _ outcome: QuotaOutcome, quota: Quota?, overQuota: OverQuota, addresses: [String], written: [String: String], sender: Sender
    ) -> Verdict {
        let figure = quota.map { $0.remaining(after: outcome) }
        let messages = outcome.cap(.messages)?.description
        let recipients = outcome.cap(.recipients)?.description
        if outcome.admitted {
            var relay = Verdict.relay(reason: quota == nil ? "allowed" : "within quota", quota: figure, messages: messages, recipients: recipients)
            relay.strangers = addresses
            return relay
        }
        let kind: Verdict.Kind = overQuota == .reject ? .refuse : overQuota == .hold ? .hold : .defer
        let permanent = overQuota == .reject
        if let cap = outcome.refusedCap {
            let reply = Replies.overCap(cap.phrase, who: sender.phrase, permanent: permanent)
            return Verdict(
                kind: kind, reply: reply, reason: "over the \(cap.keyword) cap (\(cap.phrase))", quota: figure,
                messages: messages, recipients: recipients)
        }
        let key = outcome.firstRefused ?? addresses.first ?? ""
        let rcpt = written[key] ?? key
        let limit = quota?.limit ?? 0
        let reply = Replies.overQuota(rcpt, limit: limit, period: quota?.periodSuffix ?? "", who: sender.phrase, permanent: permanent)
        return Verdict(kind: kind, reply: reply, reason: "<\(rcpt)> over quota", quota: figure, messages: messages, recipients: recipients)
    }

    /// "uid 33 (www-data)", or "unidentified sender (why)" for replies.
    static func who(_ sender: Sender) -> String {
        if case .unidentified(let why) = sender { return "unidentified sender (\(why))" }
        return sender.phrase
    }
}
