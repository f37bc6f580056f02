// A session's life around the dialogue: deadlines, draining, the session limit, the peer check,
// and what reaches the log.

import Logging
import NIOCore
import RestrictPolicy
import Testing

@testable import RestrictDaemon

@Suite("Session: life and logs", .serialized, .timeLimit(.minutes(2)))
struct SessionLifecycleTests {
    @Test("idle_timeout 1: 421 4.4.2 and close within about two seconds")
    func idleTimeout() async throws {
        try await withDaemon("idle_timeout 1\n" + rootAllowsAll) { h in
            let client = try await h.greeted()
            let start = ContinuousClock.now
            let reply = try await client.reply(within: 5)
            #expect(reply.code == 421)
            #expect(reply.enhanced == "4.4.2")
            try await client.waitClosed(within: 5)
            let elapsed = ContinuousClock.now - start
            #expect(elapsed < .seconds(3), "closed after \(elapsed)")
            #expect(elapsed > .milliseconds(900), "closed after \(elapsed)")
            try await eventually("the relay connection to close") { h.relay.log.connections.first?.closed ?? false }
        }
    }

    @Test("command_timeout 1 with a client dripping one byte per 300 ms: 421 4.4.2")
    func commandTimeout() async throws {
        try await withDaemon("command_timeout 1\n" + rootAllowsAll) { h in
            let client = try await h.greeted()
            let start = ContinuousClock.now
            for byte in "NOOP and more and more\r\n".utf8 {
                if !client.unread.isEmpty || client.inbox.isClosed { break }
                try await client.send(bytes: [byte])
                try await Task.sleep(for: .milliseconds(300))
            }
            let reply = try await client.reply(within: 5)
            #expect(reply.code == 421)
            #expect(reply.enhanced == "4.4.2")
            try await client.waitClosed(within: 5)
            #expect(ContinuousClock.now - start < .seconds(4))
        }
    }

    @Test("draining: MAIL gets 421 4.3.2, and so does a new connection")
    func draining() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            h.runtime.draining.withLock { $0 = true }
            let reply = try await client.command("MAIL FROM:<root@lab.localdomain>")
            #expect(reply.code == 421)
            #expect(reply.enhanced == "4.3.2")
            try await client.waitClosed()
            #expect(!h.relay.log.connection.commands.contains { $0.hasPrefix("MAIL") })

            let late = try await h.client()
            try await late.expectFinalReply(421, "4.3.2")
        }
    }

    @Test("max_sessions 1: a second concurrent connection gets 421 4.3.2")
    func maxSessions() async throws {
        try await withDaemon("max_sessions 1\n" + rootAllowsAll) { h in
            let first = try await h.ready()
            let second = try await h.client()
            try await second.expectFinalReply(421, "4.3.2")
            #expect(try await first.command("NOOP").code == 250)
            #expect(h.relay.log.connections.count == 1)
            // The refused connection did not keep its place: once the first leaves, a new one is served.
            #expect(try await first.command("QUIT").code == 221)
            try await first.waitClosed()
            try await eventually("the first session to end") { h.runtime.snapshot.sessions == 0 }
            let third = try await h.greeted()
            #expect(try await third.command("NOOP").code == 250)
        }
    }

    @Test("peer_check on, peer uid in clients: served")
    func peerCheckServes() async throws {
        try await withDaemon(configure: { $0.peerCheck = true; $0.clients = [0] }) { h in
            let client = try await h.ready()
            #expect(try await client.command("QUIT").code == 221)
        }
    }

    @Test("peer_check on, peer uid not in clients: 554 5.7.1, close, warning")
    func peerCheckRefuses() async throws {
        try await withDaemon(configure: { $0.peerCheck = true; $0.clients = [65534] }) { h in
            let client = try await h.client()
            try await client.expectFinalReply(554, "5.7.1")
            #expect(h.relay.log.connections.isEmpty)
            let warnings = h.logs.all.filter { $0.level == .warning && $0.message.contains("refused") }
            #expect(warnings.count == 1)
            #expect(warnings.first?.message.contains("uid=0 user=root refused: not in clients") == true)
        }
    }

    @Test("the relay's reply text cannot forge a log line")
    func relayReplyEscaped() async throws {
        var script = RelayScript()
        script.endOfData = { _ in
            .reply(["250-2.0.0 Ok: queued as X \u{1b}[2J", "250 2.0.0 \u{2028}QUEUE2: uid=0 verdict=relayed\u{7f}"])
        }
        try await withDaemon(relay: script) { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(message())
            #expect(try await client.reply().code == 250)
            let lines = h.logs.decisions.map(\.message)
            #expect(lines.count == 1)
            let line = lines.first ?? ""
            #expect(!line.contains { $0 == "\r" || $0 == "\n" || $0 == "\u{2028}" || $0 == "\u{1b}" || $0 == "\u{7f}" }, "\(line)")
            #expect(line.hasSuffix(
                " relay=\"250 2.0.0 Ok: queued as X \\x1b[2J / 250 2.0.0 \\xe2\\x80\\xa8QUEUE2: uid=0 verdict=relayed\\x7f\""),
                "\(line)")
        }
    }

    @Test("CR or LF in the MAIL address never reaches the log")
    func mailAddressCannotForge() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<evil@x.test\rQUEUE: uid=0 verdict=relayed>\r\n")
            let reply = try await client.reply()
            #expect(reply.code == 521)
            try await client.waitClosed()

            let again = try await h.ready()
            let quoted = try await again.command("MAIL FROM:<\"evil\u{2028}QUEUE: uid=0\"@x.test>")
            if quoted.code == 250 {
                try await again.send("RCPT TO:<alice@example.com>\r\nDATA\r\n")
                #expect(try await again.replies(2).map(\.code) == [250, 354])
                try await again.send(message())
                #expect(try await again.reply().code == 250)
                let line = h.logs.decisions.first?.message ?? ""
                #expect(!line.contains { $0 == "\r" || $0 == "\n" || $0 == "\u{2028}" }, "\(line)")
                #expect(line.contains("evil\\xe2\\x80\\xa8QUEUE: uid=0"), "\(line)")
            } else {
                #expect(quoted.code == 501 || quoted.code == 553, "\(quoted)")
            }
            #expect(h.logs.all.allSatisfy { !$0.message.contains("\r") && !$0.message.contains("\n") })
        }
    }
}

@Suite("Session: deadlines around a slow relay", .serialized, .timeLimit(.minutes(2)))
struct SessionSlowRelayTests {
    static let envelope = "MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"

    @Test("a relay slower than idle_timeout (within relay_timeout) at end of data: the client still gets its reply")
    func slowEndOfDataIsNotClientIdle() async throws {
        var script = RelayScript()
        script.endOfData = { _ in .delayed(2000, ["250 2.0.0 Ok: queued as SLOW"]) }
        try await withDaemon("idle_timeout 1\nrelay_timeout 10\n" + rootAllowsAll, relay: script) { h in
            let client = try await h.ready()
            try await client.send(Self.envelope)
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(message())
            let reply = try await client.reply()
            #expect(reply.lines == ["250 2.0.0 Ok: queued as SLOW"])
        }
    }

    @Test("a relay slower than command_timeout (within relay_timeout) on MAIL: the client still gets its reply")
    func slowMailIsNotCommandTimeout() async throws {
        var script = RelayScript()
        script.command = { $0.hasPrefix("MAIL") ? .delayed(2000, ["250 2.1.0 Ok"]) : nil }
        try await withDaemon("command_timeout 1\nrelay_timeout 10\n" + rootAllowsAll, relay: script) { h in
            let client = try await h.ready()
            let reply = try await client.command("MAIL FROM:<root@lab.localdomain>")
            #expect(reply.lines == ["250 2.1.0 Ok"])
            #expect(try await client.command("RCPT TO:<alice@example.com>").code == 250)
        }
    }

    @Test("relay_timeout 1, no reply to the end of data: 451 4.4.2, logged as deferred")
    func relayTimeoutAtEndOfData() async throws {
        var script = RelayScript()
        script.endOfData = { _ in .silent }
        try await withDaemon("relay_timeout 1\n" + rootAllowsAll, relay: script) { h in
            let client = try await h.ready()
            try await client.send(Self.envelope)
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(message())
            let reply = try await client.reply(within: 5)
            #expect(reply.code == 451)
            #expect(reply.enhanced == "4.4.2")
            #expect(h.logs.decisions.first?.message.contains(" verdict=deferred ") == true)
            try await eventually("the relay connection to be dropped") { h.relay.log.connections.first?.closed ?? false }
        }
    }

    @Test("relay_timeout 1, no reply to MAIL: 421 4.4.2 and close")
    func relayTimeoutOnMail() async throws {
        var script = RelayScript()
        script.command = { $0.hasPrefix("MAIL") ? .silent : nil }
        try await withDaemon("relay_timeout 1\n" + rootAllowsAll, relay: script) { h in
            let client = try await h.ready()
            let reply = try await client.command("MAIL FROM:<root@lab.localdomain>")
            #expect(reply.code == 421)
            #expect(reply.enhanced == "4.4.2")
            try await client.waitClosed()
        }
    }
}
