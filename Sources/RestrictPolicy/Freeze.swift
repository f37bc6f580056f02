// Freezing: an automatic stop for a UID that keeps being refused (restrictpd.conf(5):
// freeze after N refusals per hour|day, frozen hold|defer). Refused, over-quota and held
// messages count per UID in the store; the message that brings the count in the window to N
// freezes the UID, and from then on every message of it is held (or deferred) until the admin
// thaws it (restrictpd --thaw USER). Pure: the store and the clock are outside.

import SMTPCore

/// `freeze after N refusals per hour|day`.
public struct FreezeRule: Sendable, Equatable, CustomStringConvertible {
    public let limit: Int
    public let period: QuotaPeriod

    public init(limit: Int, period: QuotaPeriod) {
        self.limit = limit
        self.period = period
    }

    public static let maxLimit = 100_000

    public var description: String { "\(self.limit) refusals per \(self.period.rawValue)" }

    /// The first instant of the window ending at `now`: events before it no longer count.
    public func windowStart(now: Int64) -> Int64 { now - self.period.seconds }

    /// True when `count` events in the window reach the limit.
    public func freezes(count: Int) -> Bool { count >= self.limit }
}

/// What a frozen UID's mail gets (`frozen hold|defer`).
public enum FrozenAction: String, Sendable, Equatable {
    /// Every message goes to the hold queue (the default).
    case hold
    /// Every message gets 451 4.7.1 and stays in Postfix's deferred queue.
    case `defer`
}

/// A frozen UID, as the store keeps it.
public struct FrozenState: Sendable, Equatable {
    public let uid: UInt32
    /// Seconds since the epoch.
    public let since: Int64
    /// Why, for --quota and the log: "3 refusals per hour".
    public let reason: String

    public init(uid: UInt32, since: Int64, reason: String) {
        self.uid = uid
        self.since = since
        self.reason = reason
    }
}

/// What counting one refusal did.
public struct StrikeOutcome: Sendable, Equatable {
    /// Events of the UID in the window, this one included.
    public let count: Int
    /// This event froze the UID (it was not frozen before).
    public let froze: Bool

    public init(count: Int, froze: Bool) {
        self.count = count
        self.froze = froze
    }
}

/// The store side of freezing; both quota stores implement it, beside the quota (the SQLite
/// file; the PostgreSQL database, per scope).
public protocol FreezeStore: Sendable {
    /// Counts one refused, over-quota or held message of `uid` at `now` and, when the count in
    /// the rule's window reaches its limit, freezes the UID; in one transaction. A message
    /// whose `queueID` is already counted in the window (Postfix retrying a deferred message)
    /// is not counted again: the outcome is the count as it stands. Without a queue id (the
    /// SMTP door) every call counts.
    func strike(uid: UInt32, rule: FreezeRule, now: Int64, queueID: String?) async throws -> StrikeOutcome
    /// The UID's frozen state, nil when it is not frozen.
    func frozen(uid: UInt32) async throws -> FrozenState?
}

extension FreezeStore {
    /// A strike without a queue id: it always counts.
    public func strike(uid: UInt32, rule: FreezeRule, now: Int64) async throws -> StrikeOutcome {
        try await self.strike(uid: uid, rule: rule, now: now, queueID: nil)
    }
}

extension Policy {
    /// The freeze rule for `sender`: its rule's, else the global one. `groups`: the sender's
    /// groups, so that a `group` rule's setting counts (no default: forgetting them would
    /// silently fall back to the `default` rule).
    public func freezeRule(for sender: Sender, groups: [UInt32]) -> FreezeRule? {
        guard sender.uid != nil else { return nil }
        return self.rule(for: sender, groups: groups)?.freeze ?? self.configuration.freeze
    }

    /// True when some rule or the global settings freeze: only then is the store asked
    /// whether a sender is frozen.
    public var freezes: Bool {
        self.configuration.freeze != nil || self.configuration.rules.contains { $0.freeze != nil }
    }

    /// The verdict for every message of a frozen UID.
    public static func frozenVerdict(_ state: FrozenState, sender: Sender, action: FrozenAction) -> Verdict {
        let reply = Replies.frozen(who: sender.phrase)
        let reason = "uid frozen since \(state.since) (\(state.reason))"
        return Verdict(kind: action == .hold ? .hold : .defer, reply: reply, reason: reason, quota: nil)
    }

    /// True when `verdict` counts towards freezing: a recipient refused by rule, over quota,
    /// or a held message (not a store error, not the frozen verdict itself).
    public static func strikes(_ evaluation: Evaluation, _ verdict: Verdict) -> Bool {
        switch evaluation {
        case .allowed: return false
        case .refused: return true
        case .needsQuota: return verdict.kind != .relay && verdict.reply != Replies.storeUnavailable
        }
    }
}
