// Notifications to the admin (restrictpd.conf(5): notify, notify_interval, notify_limit):
// a UID's first refusal, hold or freeze in an interval is reported at once in one plain-text
// mail; what follows in the interval waits for the next one, so an attack cannot mail-bomb
// the admin: at most one message per UID per interval and `limit` messages an hour in all.
// Pure: the clock is an argument, sending is the daemon's business.

import SMTPCore

/// One thing the admin hears about.
public struct NotifyEvent: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable { case refused, held, deferred, frozen, warning }
    public var kind: Kind
    public var uid: UInt32
    public var user: String?
    /// Seconds since the epoch.
    public var time: Int64
    public var recipients: [String]
    /// The message's queue id (pickup's, or the hold queue's for a held message).
    public var queueID: String?
    public var reason: String
    public var quota: String?
    /// The X-PHP-Originating-Script hint, escaped and truncated; a sender can forge it.
    public var script: String?

    public init(kind: Kind, uid: UInt32, user: String?, time: Int64, recipients: [String], queueID: String?, reason: String, quota: String? = nil, script: String? = nil) {
        self.kind = kind
        self.uid = uid
        self.user = user
        self.time = time
        self.recipients = recipients
        self.queueID = queueID
        self.reason = reason
        self.quota = quota
        self.script = script
    }
}

/// One mail to the admin.
public struct Notification: Sendable, Equatable {
    public var uid: UInt32
    public var to: [String]
    public var subject: String
    public var body: String
}

extension Policy {
    /// The share of its quota (percent) at which `sender` is warned about, if any (`groups`:
    /// the sender's, for `group` rules).
    public func warnAt(for sender: Sender, groups: [UInt32]) -> Int? {
        guard sender.uid != nil else { return nil }
        return self.rule(for: sender, groups: groups)?.warnAt ?? self.configuration.warnAt
    }

    /// True when `outcome` has used `percent` of its limit or more (an admitted message only:
    /// a refused one is reported as refused).
    public static func warns(_ outcome: QuotaOutcome, percent: Int) -> Bool {
        outcome.admitted && outcome.limit > 0 && outcome.used * 100 >= outcome.limit * percent
    }

    /// Where notifications about `uid` go: its rule's list, else the global one (`groups`:
    /// the uid's, for `group` rules).
    public func notifyAddresses(uid: UInt32, groups: [UInt32]) -> [String] {
        self.rule(for: .user(uid: uid, name: nil), groups: groups)?.notify ?? self.configuration.notify
    }
}

public struct NotificationBook: Sendable {
    /// Recipients listed in one message, over all its events; also the most events kept.
    public static let maxSamples = 20
    public let interval: Int64
    /// Messages an hour, over all UIDs.
    public let limit: Int

    struct Pending {
        var addresses: [String]
        var since: Int64
        var counts: [NotifyEvent.Kind: Int] = [:]
        /// Events listed, their recipients cut so that at most maxSamples are listed in all.
        var samples: [NotifyEvent] = []
        var listed = 0
        /// Recipients and events not listed.
        var moreRecipients = 0
        var moreEvents = 0
        /// The last quota figure an event carried ("17/20 per day").
        var quota: String?
        var last: NotifyEvent
    }
    private var pending: [UInt32: Pending] = [:]
    private var lastSent: [UInt32: Int64] = [:]
    private var sent: [Int64] = []

    public init(interval: Int64, limit: Int) {
        self.interval = interval
        self.limit = limit
    }

    /// Notes `event` for the admins at `addresses`.
    public mutating func add(_ event: NotifyEvent, to addresses: [String]) {
        guard !addresses.isEmpty else { return }
        var p = self.pending[event.uid] ?? Pending(addresses: addresses, since: event.time, last: event)
        p.addresses = addresses
        p.counts[event.kind, default: 0] += 1
        let room = Self.maxSamples - p.listed
        if p.samples.count < Self.maxSamples, room > 0 || event.recipients.isEmpty {
            var sample = event
            sample.recipients = Array(event.recipients.prefix(room))
            p.listed += sample.recipients.count
            p.moreRecipients += event.recipients.count - sample.recipients.count
            p.samples.append(sample)
        } else {
            p.moreRecipients += event.recipients.count
            p.moreEvents += 1
        }
        if let quota = event.quota { p.quota = quota }
        p.last = event
        self.pending[event.uid] = p
    }

    /// The UIDs whose message `due(now:)` would send now, in order.
    public func dueUIDs(now: Int64) -> [UInt32] {
        let room = max(0, self.limit - self.sent.filter { now - $0 < 3600 }.count)
        let ready = self.pending.keys.sorted().filter { uid in self.lastSent[uid].map { now - $0 >= self.interval } ?? true }
        return Array(ready.prefix(room))
    }

    /// The messages to send now: a UID's pending events when its last message is at least an
    /// interval old, within the hourly limit (the rest waits for a later call). `quotas`: what
    /// is left of each UID's quota now, where its rule has one ("17/20 per day"); a UID not
    /// in it shows the figure its last event with one carried.
    public mutating func due(now: Int64, host: String, quotas: [UInt32: String] = [:]) -> [Notification] {
        let uids = self.dueUIDs(now: now)
        self.sent.removeAll { now - $0 >= 3600 }
        var out: [Notification] = []
        for uid in uids {
            guard let p = self.pending[uid] else { continue }
            out.append(Self.render(p, host: host, quota: quotas[uid] ?? p.quota))
            self.pending[uid] = nil
            self.lastSent[uid] = now
            self.sent.append(now)
        }
        return out
    }

    public var isEmpty: Bool { self.pending.isEmpty }
}

extension NotificationBook {
    static func render(_ p: Pending, host: String, quota: String?) -> Notification {
        let e = p.last
        // Names, addresses and reasons came from outside: escaped and bounded, as in the log.
        let user = e.user.map { LogText.escape($0, limit: 64) }
        let who = user.map { "uid \(e.uid) (\($0))" } ?? "uid \(e.uid)"
        let word = user ?? String(e.uid)
        let counts = NotifyEvent.Kind.allCases.compactMap { k in p.counts[k].map { "\($0) \(k.rawValue)" } }.joined(separator: ", ")
        var lines = [
            "restrictpd on \(host) stopped mail from \(who).", "",
            "What happened (since \(Self.utc(p.since))): \(counts).",
        ]
        if p.counts[.frozen] != nil {
            lines.append("The user is FROZEN: every message of it is held or deferred until restrictpd --thaw \(word).")
        }
        if let quota { lines.append("Arbitrary recipients left of the quota (left/limit): \(LogText.escape(quota, limit: 64)).") }
        lines += [""] + Self.samples(p)
        lines += [
            "", "What to do:",
            "  postqueue -p                 list the queue; held mail is marked with !",
            "  postcat -q ID                show a message",
            "  postsuper -H ID              release a held message (delivered without restrictpd)",
            "  postsuper -d ID              delete a message",
            "  restrictpd --thaw \(word)".padding(31) + "let a frozen user's mail flow again",
            "  restrictpd --quota \(word)".padding(31) + "show what its quota has counted",
            "", "Further events within notify_interval come together in the next message.",
        ]
        let subject = "restrictpd: \(who): \(counts)"
        return Notification(uid: e.uid, to: p.addresses, subject: subject, body: lines.joined(separator: "\n") + "\n")
    }

    /// The events with their recipients (at most maxSamples in all) and queue ids, and how
    /// many were left out.
    static func samples(_ p: Pending) -> [String] {
        var lines = ["Messages (up to \(Self.maxSamples) recipients in all):"]
        for s in p.samples {
            let rcpts = s.recipients.map { "<\(LogText.escape($0))>" }.joined(separator: ", ")
            let to = rcpts.isEmpty ? "" : "  to \(rcpts)"
            lines.append("  \(s.kind.rawValue)  queue id \(LogText.escape(s.queueID ?? "none", limit: 64))\(to)")
            lines.append("      \(LogText.escape(s.reason, limit: 512))")
            // As the decision line shows it (already escaped there), labelled for what it is.
            if let script = s.script { lines.append("      script=\"\(script)\" (a hint: the sender can forge this header)") }
        }
        if p.moreRecipients > 0 || p.moreEvents > 0 {
            let events = p.moreEvents > 0 ? " (\(p.moreEvents) more events not listed)" : ""
            lines.append("  ... and \(p.moreRecipients) more recipients\(events).")
        }
        return lines
    }

    /// "2026-11-29 22:43:57 UTC", by arithmetic (days to civil date, proleptic Gregorian).
    static func utc(_ t: Int64) -> String {
        let days = t >= 0 ? t / 86400 : (t - 86399) / 86400
        let secs = t - days * 86400
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yoe + era * 400 + (month <= 2 ? 1 : 0)
        func two(_ n: Int64) -> String { n < 10 ? "0\(n)" : "\(n)" }
        return "\(year)-\(two(month))-\(two(day)) \(two(secs / 3600)):\(two(secs % 3600 / 60)):\(two(secs % 60)) UTC"
    }
}

extension String {
    /// Padded with spaces to `width` characters (at least one space after).
    fileprivate func padding(_ width: Int) -> String {
        self + String(repeating: " ", count: max(1, width - self.count))
    }
}
