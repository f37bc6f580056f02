// Notifications to the admin: coalescing per UID and interval, the hourly limit, rendering.

import RestrictPolicy
import Testing

private let t0: Int64 = 1_800_000_000

private func event(_ i: Int, kind: NotifyEvent.Kind = .refused, uid: UInt32 = 33, at time: Int64 = t0) -> NotifyEvent {
    NotifyEvent(kind: kind, uid: uid, user: "www-data", time: time, recipients: ["x\(i)@example.com"],
                queueID: "Q\(i)", reason: "<x\(i)@example.com> not on the allow list", quota: "0/20 per day")
}

@Suite struct NotifyTests {
    @Test func aHundredEventsMakeOneMessageAndTheNextIntervalTheNext() {
        var book = NotificationBook(interval: 3600, limit: 30)
        for i in 0..<100 { book.add(event(i, at: t0 + Int64(i)), to: ["admin@example.org"]) }
        let first = book.due(now: t0 + 100, host: "lab")
        #expect(first.count == 1 && first[0].to == ["admin@example.org"] && first[0].subject == "restrictpd: uid 33 (www-data): 100 refused")
        #expect(book.isEmpty)
        // More in the same interval wait; nothing goes out until the interval has passed.
        for i in 100..<150 { book.add(event(i, kind: .held, at: t0 + 200), to: ["admin@example.org"]) }
        #expect(book.due(now: t0 + 200, host: "lab").isEmpty)
        #expect(book.due(now: t0 + 3699, host: "lab").isEmpty)
        let second = book.due(now: t0 + 3700, host: "lab")
        #expect(second.count == 1 && second[0].subject == "restrictpd: uid 33 (www-data): 50 held")
        #expect(book.due(now: t0 + 9000, host: "lab").isEmpty)
    }

    @Test func theFirstEventOfAQuietUIDGoesAtOnce() {
        var book = NotificationBook(interval: 3600, limit: 30)
        book.add(event(1), to: ["a@example.org"])
        #expect(book.due(now: t0, host: "lab").count == 1)
        book.add(event(2, uid: 34), to: ["a@example.org"])
        #expect(book.due(now: t0 + 1, host: "lab").map(\.uid) == [34])
        // Nobody to notify: nothing kept.
        book.add(event(3, uid: 35), to: [])
        #expect(book.isEmpty)
    }

    @Test func theHourlyLimitHoldsTheRestBack() {
        var book = NotificationBook(interval: 60, limit: 2)
        for uid in UInt32(1)...5 { book.add(event(Int(uid), uid: uid), to: ["a@example.org"]) }
        #expect(book.due(now: t0, host: "lab").map(\.uid) == [1, 2])
        #expect(book.due(now: t0 + 1800, host: "lab").isEmpty)
        #expect(book.due(now: t0 + 3600, host: "lab").map(\.uid) == [3, 4])
    }

    @Test func rendering() throws {
        var book = NotificationBook(interval: 3600, limit: 30)
        for i in 0..<25 { book.add(event(i), to: ["admin@example.org"]) }
        book.add(NotifyEvent(kind: .frozen, uid: 33, user: "www-data", time: t0, recipients: [], queueID: nil,
                             reason: "frozen: 3 refused, over-quota or held messages (freeze after 3 refusals per hour)"),
                 to: ["admin@example.org"])
        let n = try #require(book.due(now: t0, host: "lab.example.org").first)
        #expect(n.subject == "restrictpd: uid 33 (www-data): 25 refused, 1 frozen")
        let body = n.body
        #expect(body.hasPrefix("restrictpd on lab.example.org stopped mail from uid 33 (www-data).\n"))
        #expect(body.contains("What happened (since 2027-01-15 08:00:00 UTC): 25 refused, 1 frozen."))
        #expect(body.contains("The user is FROZEN: every message of it is held or deferred until restrictpd --thaw www-data."))
        #expect(body.contains("  refused  queue id Q0  to <x0@example.com>\n      <x0@example.com> not on the allow list\n"))
        #expect(body.contains("queue id Q19 ") && !body.contains("queue id Q20 "), "at most 20 recipients")
        #expect(body.contains("  ... and 5 more recipients (6 more events not listed).\n"), "5 refusals and the freeze left out")
        for command in ["postqueue -p", "postcat -q ID", "postsuper -H ID", "postsuper -d ID", "restrictpd --thaw www-data", "restrictpd --quota www-data"] {
            #expect(body.contains("  " + command), "\(command)")
        }
        // The frozen event came last and has no quota: the last figure an event carried shows.
        #expect(body.contains("Arbitrary recipients left of the quota (left/limit): 0/20 per day.\n"))
    }

    /// At most 20 recipients in all, however they are spread over the messages, each with
    /// its message's queue id; the rest is counted.
    @Test func twentyRecipientsInAll() throws {
        var book = NotificationBook(interval: 3600, limit: 30)
        for i in 0..<3 {
            let rcpts = (0..<8).map { "r\(i)-\($0)@example.com" }
            book.add(NotifyEvent(kind: .held, uid: 33, user: nil, time: t0, recipients: rcpts, queueID: "H\(i)", reason: "held"),
                     to: ["a@example.org"])
        }
        book.add(NotifyEvent(kind: .refused, uid: 33, user: nil, time: t0, recipients: ["late@example.com"], queueID: "R9", reason: "x"),
                 to: ["a@example.org"])
        let body = try #require(book.due(now: t0, host: "lab").first).body
        #expect(body.components(separatedBy: "@example.com>").count - 1 == 20)
        #expect(body.contains("  held  queue id H2  to <r2-0@example.com>, <r2-1@example.com>, <r2-2@example.com>, <r2-3@example.com>\n"))
        #expect(!body.contains("r2-4@") && !body.contains("late@") && !body.contains("queue id R9"))
        #expect(body.contains("  ... and 5 more recipients (1 more events not listed).\n"))
    }

    /// The uid's quota now, when the daemon looked it up, wins over what the events carried;
    /// with neither there is no quota line.
    @Test func theQuotaLine() throws {
        var book = NotificationBook(interval: 60, limit: 30)
        let frozen = NotifyEvent(kind: .frozen, uid: 33, user: "www-data", time: t0, recipients: [], queueID: nil, reason: "frozen")
        book.add(frozen, to: ["a@example.org"])
        let none = try #require(book.due(now: t0, host: "lab").first).body
        #expect(!none.contains("Arbitrary recipients left"))
        book.add(frozen, to: ["a@example.org"])
        #expect(book.dueUIDs(now: t0 + 59).isEmpty && book.dueUIDs(now: t0 + 60) == [33])
        let now = try #require(book.due(now: t0 + 60, host: "lab", quotas: [33: "3/20 per day"]).first).body
        #expect(now.contains("\nArbitrary recipients left of the quota (left/limit): 3/20 per day.\n"))
    }

    /// The script hint reads as in the decision line, labelled as forgeable.
    @Test func theScriptLine() throws {
        var book = NotificationBook(interval: 3600, limit: 30)
        book.add(NotifyEvent(kind: .refused, uid: 33, user: "www-data", time: t0, recipients: ["x@example.com"], queueID: "Q1",
                             reason: "<x@example.com> not on the allow list", script: "33:/var/www/x.php"), to: ["a@example.org"])
        let body = try #require(book.due(now: t0, host: "lab").first).body
        #expect(body.contains("\n      script=\"33:/var/www/x.php\" (a hint: the sender can forge this header)\n"))
        #expect(!body.contains("script (a hint"))
    }

    @Test func datesAreUTC() {
        var book = NotificationBook(interval: 60, limit: 30)
        for (i, t) in [Int64(0), 951_782_400, 4_102_444_799].enumerated() {
            book.add(event(i, uid: UInt32(i + 1), at: t), to: ["a@example.org"])
        }
        let bodies = book.due(now: t0, host: "lab").map(\.body)
        #expect(bodies.count == 3)
        #expect(bodies[0].contains("(since 1970-01-01 00:00:00 UTC)"))
        #expect(bodies[1].contains("(since 2000-02-29 00:00:00 UTC)"))
        #expect(bodies[2].contains("(since 2099-12-31 23:59:59 UTC)"))
    }

    @Test func outsideTextIsEscaped() throws {
        var book = NotificationBook(interval: 3600, limit: 30)
        book.add(NotifyEvent(kind: .refused, uid: 7, user: "evil\nSubject: x", time: t0, recipients: ["a\u{1b}b@example.com"],
                             queueID: "Q\r\n", reason: "r\nBcc: victim@example.com"), to: ["admin@example.org"])
        let n = try #require(book.due(now: t0, host: "lab").first)
        #expect(!n.subject.contains("\n") && !n.body.contains("\nBcc:") && !n.body.contains("\u{1b}") && !n.body.contains("\r"))
    }

    @Test func notifySettings() throws {
        let c = try config("notify admin@example.org ops@example.org\nnotify_interval 30m\nnotify_limit 5\nuser www-data\n notify web@example.org\ndefault\n allow *")
        #expect(c.notify == ["admin@example.org", "ops@example.org"] && c.value(.notifyInterval) == 1800 && c.value(.notifyLimit) == 5)
        let p = Policy(c)
        #expect(p.notifyAddresses(uid: 33, groups: []) == ["web@example.org"] && p.notifyAddresses(uid: 1000, groups: []) == ["admin@example.org", "ops@example.org"])
        #expect(errors("notify root") == ["t.conf:1: bad notify address 'root': use user@domain"])
        #expect(errors("notify") == ["t.conf:1: notify needs at least one address"])
        #expect(try config("default\n allow *").notify.isEmpty)
    }
}

@Suite struct WarnTests {
    @Test func settingsAndThreshold() throws {
        let c = try config("warn at 80%\nuser www-data\n arbitrary 20 per day\n warn at 50%\ndefault\n arbitrary 5")
        let p = Policy(c)
        #expect(c.warnAt == 80 && p.warnAt(for: .user(uid: 33, name: nil), groups: []) == 50 && p.warnAt(for: .user(uid: 1000, name: nil), groups: []) == 80)
        #expect(p.warnAt(for: .unidentified(reason: "x"), groups: []) == nil)
        #expect(errors("warn at 0%") == ["t.conf:1: warn takes 'at N%' with N from 1 to 100"])
        #expect(errors("warn 80%") == ["t.conf:1: warn takes 'at N%' with N from 1 to 100"])
        #expect(errors("warn at 80") == ["t.conf:1: warn takes 'at N%' with N from 1 to 100"])
        #expect(try config("default\n allow *").warnAt == nil)
    }

    @Test func warnsFromTheShareOn() {
        func o(_ used: Int, _ limit: Int, admitted: Bool = true) -> QuotaOutcome {
            QuotaOutcome(admitted: admitted, used: used, limit: limit, firstRefused: nil)
        }
        #expect(!Policy.warns(o(15, 20), percent: 80) && Policy.warns(o(16, 20), percent: 80) && Policy.warns(o(20, 20), percent: 80))
        #expect(!Policy.warns(o(3, 5), percent: 80) && Policy.warns(o(4, 5), percent: 80))
        #expect(!Policy.warns(o(20, 20, admitted: false), percent: 80) && !Policy.warns(o(0, 0), percent: 80))
    }
}
