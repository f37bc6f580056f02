// Sends the admin's notifications (restrictpd.conf(5): notify): events are noted at once
// from sessions (a lock, no I/O), and a loop of its own turns what is due into mails and
// sends them through the relay, from <> and past restrictpd's own rules (they never reach
// the content filter). A send that fails is tried again with back-off; sessions never wait.

import Logging
import NIOCore
import RestrictPolicy
import SMTPCore

#if canImport(Glibc)
import Glibc
#endif

final class Notifier: Sendable {
    struct Outgoing {
        var notification: Notification
        var attempts = 0
        var next: Int64
    }
    private struct State {
        var book: NotificationBook
        var outbox: [Outgoing] = []
    }
    /// Tries of one message before it is given up (logged at error).
    static let maxAttempts = 8
    static let maxOutbox = 1000
    private let state: Mutex<State>
    /// The runtime's cache of users' groups: a `group` rule's notify list needs them.
    private let userGroups: UserGroups

    init(_ configuration: Configuration, userGroups: UserGroups) {
        let book = NotificationBook(
            interval: Int64(configuration.value(.notifyInterval)), limit: configuration.value(.notifyLimit))
        self.state = Mutex(State(book: book))
        self.userGroups = userGroups
    }

    /// A decision line's record, when it is one the admin hears of (refused or held, of a
    /// known UID with someone to notify).
    func note(_ record: DecisionRecord, now: Int64, policy: Policy) {
        guard let uid = record.uid, record.verdict == .refuse || record.verdict == .hold else { return }
        let kind: NotifyEvent.Kind = record.verdict == .hold ? .held : .refused
        let event = NotifyEvent(
            kind: kind, uid: uid, user: record.user, time: now, recipients: record.to,
            queueID: record.heldQueueID ?? record.queueID, reason: record.reason, quota: record.quota, script: record.script)
        self.add(event, policy: policy)
    }

    /// Notes `event` for the admins its uid's rule names (a `group` rule's too: the uid's
    /// groups come from the cache, or are looked up off the caller's thread).
    func add(_ event: NotifyEvent, policy: Policy) {
        guard policy.needsGroups else { return self.add(event, to: policy.notifyAddresses(uid: event.uid, groups: [])) }
        if let groups = self.userGroups.cached(event.uid) {
            return self.add(event, to: policy.notifyAddresses(uid: event.uid, groups: groups))
        }
        let userGroups = self.userGroups
        Task {
            let groups = await userGroups.groups(event.uid)
            self.add(event, to: policy.notifyAddresses(uid: event.uid, groups: groups))
        }
    }

    private func add(_ event: NotifyEvent, to addresses: [String]) {
        guard !addresses.isEmpty else { return }
        self.state.withLock { $0.book.add(event, to: addresses) }
    }

    /// Runs until cancelled: once a second, what is due goes out.
    func run(runtime: Runtime, eventLoop: any EventLoop) async {
        let host = Self.hostName()
        while !Task.isCancelled {
            await self.tick(runtime: runtime, eventLoop: eventLoop, host: host, now: runtime.clock())
            do {
                try await Task.sleep(nanoseconds: 1_000_000_000)
            } catch {
                return
            }
        }
    }

    func tick(runtime: Runtime, eventLoop: any EventLoop, host: String, now: Int64) async {
        var quotas: [UInt32: String] = [:]
        for uid in self.state.withLock({ $0.book.dueUIDs(now: now) }) {
            quotas[uid] = await Self.quotaLeft(uid: uid, runtime: runtime, now: now)
        }
        let (ready, dropped) = self.state.withLock { s -> ([Outgoing], [Notification]) in
            var dropped: [Notification] = []
            for n in s.book.due(now: now, host: host, quotas: quotas) {
                guard s.outbox.count < Self.maxOutbox else {
                    dropped.append(n)
                    continue
                }
                s.outbox.append(Outgoing(notification: n, next: now))
            }
            let ready = s.outbox.filter { $0.next <= now }
            s.outbox.removeAll { $0.next <= now }
            return (ready, dropped)
        }
        for n in dropped {
            runtime.logger.error("notification about uid \(n.uid) dropped: \(Self.maxOutbox) notifications already wait to be sent")
        }
        for var item in ready {
            do {
                let reply = try await self.send(item.notification, runtime: runtime, eventLoop: eventLoop, host: host, now: now)
                runtime.logger.info("notification about uid \(item.notification.uid) sent to \(item.notification.to.joined(separator: ",")): \(LogText.escape(reply.description))")
            } catch {
                item.attempts += 1
                guard item.attempts < Self.maxAttempts else {
                    runtime.logger.error("notification about uid \(item.notification.uid) given up after \(item.attempts) tries: \(error)")
                    continue
                }
                // 60 s, 2, 4 ... minutes, at most an hour apart.
                item.next = now + min(3600, Int64(60) << (item.attempts - 1))
                runtime.logger.warning("notification about uid \(item.notification.uid) not sent (try \(item.attempts)), again in \(item.next - now) s: \(error)")
                let retry = item
                self.state.withLock { $0.outbox.append(retry) }
            }
        }
    }

    /// What is left of `uid`'s quota of arbitrary recipients now ("17/20 per day"), when its
    /// rule has one; nil otherwise or when the store cannot say (the mail then shows the
    /// figure its events carried). Asks the store without recording anything.
    static func quotaLeft(uid: UInt32, runtime: Runtime, now: Int64) async -> String? {
        let policy = runtime.ruleset.policy
        let groups = policy.needsGroups ? await runtime.userGroups.groups(uid) : []
        guard let rule = policy.rule(for: .user(uid: uid, name: nil), groups: groups), let quota = rule.quota, quota.limit > 0
        else { return nil }
        let request = QuotaRequest(uid: uid, addresses: [], quota: quota, now: now, record: false, budget: rule.budget)
        guard let outcome = try? await runtime.store.admit(request) else { return nil }
        return quota.remaining(after: outcome)
    }

    struct Refused: Error, CustomStringConvertible {
        let step: String
        let reply: SMTPReply
        var description: String { "relay answered \(step) with \(LogText.escape(self.reply.description))" }
    }

    /// One SMTP dialogue with the relay, a new connection each time.
    private func send(_ n: Notification, runtime: Runtime, eventLoop: any EventLoop, host: String, now: Int64) async throws -> SMTPReply {
        let ruleset = runtime.ruleset
        guard let address = ruleset.relayAddress else { throw SystemError("cannot resolve \(ruleset.settings.relayHost)", errno: 0) }
        let timeout = TimeAmount.seconds(ruleset.settings.relayTimeout)
        let relay = try await RelayConnection.connect(
            to: address, on: eventLoop, timeout: .seconds(ruleset.settings.relayConnectTimeout), greetingTimeout: timeout)
        defer { relay.quit() }
        guard relay.greeting.code == 220 else { throw Refused(step: "the connection", reply: relay.greeting) }
        let deadline = eventLoop.scheduleTask(in: timeout) { relay.abort() }
        defer { deadline.cancel() }
        let steps = ["EHLO \(host)", "MAIL FROM:<>"] + n.to.map { "RCPT TO:<\($0)>" } + ["DATA"]
        for step in steps {
            let reply = try await relay.exchange(step + "\r\n")
            guard reply.isPositive || (step == "DATA" && reply.code == 354) else { throw Refused(step: step, reply: reply) }
        }
        let reply = try await relay.exchange(Self.message(n, host: host, now: now))
        guard reply.code / 100 == 2 else { throw Refused(step: "the end of data", reply: reply) }
        return reply
    }

    /// The message on the wire: headers, the dot-stuffed body in CRLF lines, the end of data.
    static func message(_ n: Notification, host: String, now: Int64) -> String {
        var text = "From: restrictpd <MAILER-DAEMON@\(host)>\r\n"
        text += "To: \(n.to.joined(separator: ", "))\r\n"
        text += "Subject: \(n.subject)\r\n"
        text += "Date: \(Self.date(now))\r\n"
        text += "Message-ID: <restrictpd.\(n.uid).\(now)@\(host)>\r\n"
        text += "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        for line in n.body.split(separator: "\n", omittingEmptySubsequences: false).dropLast() {
            text += (line.hasPrefix(".") ? "." : "") + line + "\r\n"
        }
        return text + ".\r\n"
    }

    /// RFC 5322 date, in UTC.
    static func date(_ t: Int64) -> String {
        var time = time_t(t)
        var tm = Glibc.tm()
        gmtime_r(&time, &tm)
        var buffer = [CChar](repeating: 0, count: 64)
        let n = strftime(&buffer, buffer.count, "%a, %d %b %Y %H:%M:%S +0000", &tm)
        return String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
        let name = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let ok = !name.isEmpty && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == ".") }
        return ok ? name : "localhost"
    }
}

extension RelayConnection {
    /// Writes `text` and waits for the one reply it asks for (the notifier's dialogue; no
    /// session is attached to this connection).
    func exchange(_ text: String) async throws -> SMTPReply {
        var buffer = ByteBuffer()
        buffer.writeString(text)
        try await self.channel.writeAndFlush(buffer)
        return try await Self.next(channel: self.channel, handler: self.handler)
    }
}
