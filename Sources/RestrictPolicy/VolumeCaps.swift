// Volume caps (restrictpd.conf(5) `messages`, `recipients`, `max_recipients`): limits on how
// much a uid sends, whatever the recipients, beside the quota of distinct arbitrary
// recipients. `messages` and `recipients` are counted in the quota store over a sliding
// window; `max_recipients` is a limit per message. Pure values and arithmetic.

/// `messages N per PERIOD` or `recipients N per PERIOD`.
public struct VolumeCap: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable, Equatable, CaseIterable {
        /// Messages accepted for relay.
        case messages
        /// Recipients of the messages accepted for relay.
        case recipients
    }

    public let kind: Kind
    public let limit: Int
    public let period: QuotaPeriod

    public init(kind: Kind, limit: Int, period: QuotaPeriod) {
        self.kind = kind
        self.limit = limit
        self.period = period
    }

    /// "50 per hour", as the rule was written.
    public var description: String { "\(self.limit) per \(self.period.rawValue)" }

    /// "50 messages per hour", for replies.
    public var phrase: String { "\(self.limit) \(self.kind.rawValue) per \(self.period.rawValue)" }

    public static let maxLimit = 10_000_000
}

/// The caps of one rule.
public struct VolumeCaps: Sendable, Equatable {
    public var messages: VolumeCap?
    public var recipients: VolumeCap?
    /// Recipients one message may have.
    public var maxRecipients: Int?

    public init(messages: VolumeCap? = nil, recipients: VolumeCap? = nil, maxRecipients: Int? = nil) {
        self.messages = messages
        self.recipients = recipients
        self.maxRecipients = maxRecipients
    }

    public static let none = VolumeCaps()

    public var isEmpty: Bool { self.messages == nil && self.recipients == nil && self.maxRecipients == nil }

    /// The caps counted in the store (a message row is recorded for each accepted message).
    public var counted: [VolumeCap] { [self.messages, self.recipients].compactMap { $0 } }

    /// Message rows older than this are outside every counted cap's window.
    public func pruneBefore(now: Int64) -> Int64? {
        self.counted.map(\.period.seconds).max().map { now - $0 }
    }

    public static let maxRecipientsLimit = 100_000
}

/// Messages and recipients that open SMTP transactions of a uid have accepted at RCPT but
/// not yet spent: they count as if spent (see `Reservations`).
public struct HeldVolume: Sendable, Equatable {
    public var messages: Int
    public var recipients: Int

    public init(messages: Int = 0, recipients: Int = 0) {
        self.messages = messages
        self.recipients = recipients
    }

    public static let zero = HeldVolume()
}

/// One counted cap after a decision: how much of it is used, with this message when it was
/// admitted, without it when refused.
public struct VolumeCapState: Sendable, Equatable, CustomStringConvertible {
    public let cap: VolumeCap
    public let used: Int

    public init(cap: VolumeCap, used: Int) {
        self.cap = cap
        self.used = used
    }

    public var remaining: Int { max(0, self.cap.limit - self.used) }

    /// "47/50 per hour": what is left of the cap, as the decision line shows it (the same
    /// reading as the arbitrary quota's figure).
    public var description: String { "\(self.remaining)/\(self.cap.limit) per \(self.cap.period.rawValue)" }
}

/// Which cap refused a message.
public enum CapRefusal: Sendable, Equatable {
    case cap(VolumeCap)
    case maxRecipients(Int)

    /// "50 messages per hour", "10 recipients per message": for replies and the log.
    public var phrase: String {
        switch self {
        case .cap(let cap): return cap.phrase
        case .maxRecipients(let n): return "\(n) recipients per message"
        }
    }

    /// "messages", "recipients", "max_recipients": the keyword of the cap.
    public var keyword: String {
        switch self {
        case .cap(let cap): return cap.kind.rawValue
        case .maxRecipients: return "max_recipients"
        }
    }
}

extension QuotaArithmetic {
    /// The caps of `request` against what the store counted in each cap's window
    /// (`counted[kind]`: messages, or the sum of their recipients). The message asked about
    /// adds one message and `request.recipients` recipients; held volume counts as spent.
    /// The states returned are those before the message; `spent` adds it.
    public static func decideCaps(
        _ request: QuotaRequest, counted: [VolumeCap.Kind: Int]
    ) -> (states: [VolumeCapState], refused: CapRefusal?) {
        var refused: CapRefusal? = nil
        if let max = request.caps.maxRecipients, request.recipients > max { refused = .maxRecipients(max) }
        var states: [VolumeCapState] = []
        for cap in request.caps.counted {
            let held = cap.kind == .messages ? request.heldVolume.messages : request.heldVolume.recipients
            let before = (counted[cap.kind] ?? 0) + held
            if before + adds(cap.kind, request) > cap.limit, refused == nil { refused = .cap(cap) }
            states.append(VolumeCapState(cap: cap, used: before))
        }
        return (states, refused)
    }

    /// The states once the message of `request` is spent.
    public static func spent(_ states: [VolumeCapState], _ request: QuotaRequest) -> [VolumeCapState] {
        states.map { VolumeCapState(cap: $0.cap, used: $0.used + adds($0.cap.kind, request)) }
    }

    /// What the message of `request` adds to a cap of `kind`.
    static func adds(_ kind: VolumeCap.Kind, _ request: QuotaRequest) -> Int {
        kind == .messages ? 1 : request.recipients
    }
}
