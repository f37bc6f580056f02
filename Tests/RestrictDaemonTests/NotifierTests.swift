// The notifier's sending: one SMTP dialogue with the relay from <>, and a relay that is down
// costs a retry later, not the notification.

import Logging
import NIOPosix
import RestrictPolicy
import TestPorts
import Testing

@testable import RestrictDaemon

@Suite("Notifier", .serialized, .timeLimit(.minutes(1)))
struct NotifierTests {
    static let t0: Int64 = 1_800_000_000

    @Test func aRelayThatIsDownIsTriedAgainAfterBackOff() async throws {
        var config = Configuration()
        let dead = try ClosedPort()
        defer { dead.release() }
        config.relayPort = dead.port
        config.notify = ["admin@example.org"]
        let logs = LogRecorder()
        let logger = Logger(label: "test") { _ in RecordingLogHandler(recorder: logs) }
        let runtime = Runtime(ruleset: Ruleset(config), store: FakeQuotaStore(), logger: logger, clock: { Self.t0 })
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        runtime.notifier.add(
            NotifyEvent(kind: .held, uid: 33, user: "www-data", time: Self.t0, recipients: ["x@example.com"], queueID: "H1",
                        reason: "<x@example.com> over quota"),
            policy: runtime.ruleset.policy)
        await runtime.notifier.tick(runtime: runtime, eventLoop: loop, host: "lab", now: Self.t0)
        #expect(logs.all.contains { $0.level == .warning && $0.message.contains("not sent (try 1), again in 60 s") })

        let relay = try await ScriptedRelay.start(RelayScript())
        config.relayPort = relay.port
        runtime.replace(Ruleset(config))
        await runtime.notifier.tick(runtime: runtime, eventLoop: loop, host: "lab", now: Self.t0 + 59)
        #expect(relay.log.connections.isEmpty, "not before its time")
        await runtime.notifier.tick(runtime: runtime, eventLoop: loop, host: "lab", now: Self.t0 + 60)
        try await eventually("the relay has the notification") { relay.log.connections.first?.endsOfData == 1 }
        let c = relay.log.connection
        #expect(Array(c.commands.prefix(4)) == ["EHLO lab", "MAIL FROM:<>", "RCPT TO:<admin@example.org>", "DATA"])
        let text = String(decoding: c.messages.first ?? [], as: UTF8.self)
        #expect(text.contains("Subject: restrictpd: uid 33 (www-data): 1 held\r\n"))
        #expect(text.contains("Auto-Submitted: auto-generated\r\n") && text.contains("  held  queue id H1  to <x@example.com>\r\n"))
        #expect(logs.all.contains { $0.level == .info && $0.message.hasPrefix("notification about uid 33 sent to admin@example.org: 250") })
        // Sent once: the next round has nothing.
        await runtime.notifier.tick(runtime: runtime, eventLoop: loop, host: "lab", now: Self.t0 + 120)
        #expect(relay.log.connections.count == 1)
        await relay.stop()
    }

    /// A `group` rule's notify list: the uid's groups come from NSS (root is in group 0 here),
    /// not cached before, so the event waits for the lookup.
    @Test func aGroupRulesNotifyListIsUsed() async throws {
        let text = "notify admin@example.org\ngroup 0\n    allow *\n    notify wheel@example.org\ndefault\n    allow @localhost\n"
        var config = try ConfigParser.parse(text, file: "t.conf", users: UserResolver { _ in nil }, groups: GroupResolver { _ in nil }).get()
        let relay = try await ScriptedRelay.start(RelayScript())
        config.relayPort = relay.port
        let runtime = Runtime(ruleset: Ruleset(config), store: FakeQuotaStore(), logger: Logger(label: "test"), clock: { Self.t0 })
        #expect(runtime.userGroups.cached(0) == nil)
        runtime.notifier.add(
            NotifyEvent(kind: .refused, uid: 0, user: "root", time: Self.t0, recipients: ["x@example.com"], queueID: "Q1", reason: "x"),
            policy: runtime.ruleset.policy)
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        for _ in 0..<100 where relay.log.connections.first?.endsOfData != 1 {
            await runtime.notifier.tick(runtime: runtime, eventLoop: loop, host: "lab", now: Self.t0)
            try await Task.sleep(nanoseconds: 50_000_000)
        }
        try await eventually("the relay has the notification") { relay.log.connections.first?.endsOfData == 1 }
        #expect(relay.log.connection.commands.contains("RCPT TO:<wheel@example.org>"))
        #expect(!relay.log.connection.commands.contains("RCPT TO:<admin@example.org>"))
        await relay.stop()
    }
}
