// Sessions against a scripted relay: what the client sees, and what the relay received.

import RestrictPolicy
import TestPorts
import Testing

@testable import RestrictDaemon

@Suite("Session: relaying", .serialized, .timeLimit(.minutes(2)))
struct SessionRelayTests {
    static let envelope =
        "MAIL FROM:<root@lab.localdomain> SIZE=345 BODY=8BITMIME\r\n"
        + "RCPT TO:<alice@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice@example.com\r\n"
        + "RCPT TO:<bob@example.org> ORCPT=rfc822;bob@example.org\r\n"
        + "DATA\r\n"

    static let content =
        pickupHeader(uid: 0, queueID: "62F36F78196")
        + "From: Root User <root@lab.localdomain>\r\n"
        + "To: alice@example.com\r\n"
        + "Subject: test (a) from root\r\n"
        + "\r\n"
        + "Hello from root.\r\n"
        + "..leading dot line\r\n"
        + "last line\r\n"

    @Test("a relay that accepts but never greets: 421 4.4.1 after relay_timeout, not a hung session")
    func relayNeverGreets() async throws {
        var script = RelayScript()
        script.greeting = .silent
        try await withDaemon("relay_timeout 1\n" + rootAllowsAll, relay: script) { h in
            let client = try await h.client()
            let start = ContinuousClock.now
            let reply = try await client.reply(within: 5)
            #expect(reply.code == 421 && reply.enhanced == "4.4.1", "\(reply)")
            #expect(ContinuousClock.now - start < .seconds(4))
            try await client.waitClosed()
        }
    }

    @Test("a relay answering DATA with 250 (no 354): the client gets 451 4.4.2, never a false acceptance")
    func relayAnswersDataWith250() async throws {
        var script = RelayScript()
        script.command = { $0 == "DATA" ? .reply("250 2.0.0 Ok: queued as SURPRISE") : nil }
        try await withDaemon(relay: script) { h in
            let client = try await h.ready()
            try await client.send(Self.envelope)
            #expect(try await client.replies(4).map(\.code) == [250, 250, 250, 354])
            try await client.send(Self.content + ".\r\n")
            let reply = try await client.reply()
            #expect(reply.code == 451 && reply.enhanced == "4.4.2", "\(reply)")
            #expect(h.logs.decisions.map(\.message).allSatisfy { $0.contains("verdict=deferred") })
        }
    }

    @Test("a session's driver goes with its connection: none is left after 200 sessions")
    func driversAreReleased() async throws {
        try await withDaemon { h in
            for _ in 0..<200 {
                let client = try await h.greeted()
                try await client.send(Self.envelope)
                _ = try await client.replies(4)
                try await client.send(Self.content + ".\r\nQUIT\r\n")
                _ = try await client.replies(2)
                try await client.waitClosed()
            }
            try await eventually("every session's driver to be released") { SessionDriver.live.withLock { $0 } == 0 }
        }
    }

    @Test("relay connections serve the next sessions: no new connection, no second EHLO")
    func relayConnectionIsReused() async throws {
        try await withDaemon { h in
            for n in 0..<3 {
                let client = try await h.greeted()
                #expect(try await client.command("EHLO lab.localdomain").code == 250)
                try await client.send(Self.envelope)
                #expect(try await client.replies(4).map(\.code) == [250, 250, 250, 354])
                try await client.send(Self.content + ".\r\nQUIT\r\n")
                #expect(try await client.reply().code == 250, "message \(n)")
                #expect(try await client.reply().code == 221)
                try await client.waitClosed()
            }
            // Pools are per event loop: at most one relay connection per loop, one EHLO each.
            let connections = h.relay.log.connections
            #expect(connections.count <= 2, "relay connections: \(connections.count)")
            #expect(connections.map { $0.commands.filter { $0.hasPrefix("EHLO") }.count } == connections.map { _ in 1 })
            #expect(connections.map(\.endsOfData).reduce(0, +) == 3)
            #expect(connections.flatMap(\.messages).count == 3)
        }
    }

    @Test("a session that leaves mid-envelope clears the relay before the next one uses it")
    func relayIsResetBeforeReuse() async throws {
        try await withDaemon { h in
            let first = try await h.greeted()
            #expect(try await first.command("EHLO lab.localdomain").code == 250)
            #expect(try await first.command("MAIL FROM:<root@lab.localdomain>").code == 250)
            #expect(try await first.command("RCPT TO:<victim@example.net>").code == 250)
            #expect(try await first.command("QUIT").code == 221)
            try await first.waitClosed()

            let second = try await h.greeted()
            #expect(try await second.command("EHLO lab.localdomain").code == 250)
            try await second.send(Self.envelope)
            #expect(try await second.replies(4).map(\.code) == [250, 250, 250, 354])
            try await second.send(Self.content + ".\r\nQUIT\r\n")
            #expect(try await second.reply().code == 250)
            // Wherever the second session ran, the abandoned envelope was reset on its
            // connection before anything else could use it.
            for relay in h.relay.log.connections where relay.commands.contains("RCPT TO:<victim@example.net>") {
                let commands = relay.commands
                guard let victim = commands.firstIndex(of: "RCPT TO:<victim@example.net>"), let rset = commands.lastIndex(of: "RSET") else {
                    Issue.record("no RSET after the abandoned envelope: \(commands)")
                    continue
                }
                #expect(victim < rset)
                #expect(!commands[victim...].contains("DATA") || commands[victim..<rset].allSatisfy { $0 != "DATA" })
            }
            #expect(h.relay.log.connections.flatMap(\.messages).count == 1)
        }
    }

    @Test("a Postfix-like session is relayed byte for byte")
    func wholeSession() async throws {
        try await withDaemon { h in
            let client = try await h.greeted()
            let ehlo = try await client.command("EHLO lab.localdomain")
            #expect(ehlo.code == 250)
            #expect(ehlo.lines[0] == "250-relay.test")
            #expect(Set(ehlo.keywords) == ["PIPELINING", "SIZE 10240000", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"])
            #expect(ehlo.keywords.count == 6)

            try await client.send(Self.envelope)
            let envelope = try await client.replies(4)
            #expect(envelope.map(\.code) == [250, 250, 250, 354])
            #expect(envelope.map(\.enhanced).prefix(3) == ["2.1.0", "2.1.5", "2.1.5"])

            try await client.send(Self.content + ".\r\nQUIT\r\n")
            let end = try await client.reply()
            #expect(end.lines == ["250 2.0.0 Ok: queued as 4RELAY0"])
            let bye = try await client.reply()
            #expect(bye.code == 221)
            try await client.waitClosed()

            let relay = h.relay.log.connection
            #expect(relay.commands == [
                "EHLO lab.localdomain",
                "MAIL FROM:<root@lab.localdomain> SIZE=345 BODY=8BITMIME",
                "RCPT TO:<alice@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice@example.com",
                "RCPT TO:<bob@example.org> ORCPT=rfc822;bob@example.org",
                "DATA",
            ])
            #expect(relay.messages == [[UInt8](Self.content)])
            #expect(relay.endsOfData == 1)
            #expect(relay.bytes.count(of: [UInt8]("\r\n.\r\n")) == 1)
            #expect(relay.bytes.contains([UInt8]("\r\n..leading dot line\r\n")))

            let decisions = h.logs.decisions
            #expect(decisions.map(\.message) == [
                "62F36F78196: uid=0 user=root door=pickup from=<root@lab.localdomain> to=<alice@example.com>,<bob@example.org> "
                    + "verdict=relayed reason=\"allowed\" relay=\"250 2.0.0 Ok: queued as 4RELAY0\""
            ])
            #expect(decisions.first?.level == .info)
        }
    }

    @Test("relay unreachable at connect: 421 4.4.1")
    func relayDown() async throws {
        let dead = try ClosedPort()
        defer { dead.release() }
        try await withDaemon(relayPort: dead.port) { h in
            let client = try await h.client()
            try await client.expectFinalReply(421, "4.4.1")
        }
    }

    @Test("relay greeting 554: 421 4.4.1")
    func relayRefusesAtGreeting() async throws {
        var script = RelayScript()
        script.greeting = .reply("554 5.3.2 relay.test closed")
        try await withDaemon(relay: script) { h in
            let client = try await h.client()
            try await client.expectFinalReply(421, "4.4.1")
        }
    }

    @Test("a recipient the relay refuses gets the relay's 550; only the others are judged")
    func relayRefusesOneRecipient() async throws {
        var script = RelayScript()
        script.command = { line in
            line.hasPrefix("RCPT TO:<bob@") ? .reply("550 5.1.1 <bob@example.org>: Recipient address rejected: unknown") : nil
        }
        let rules = """
            user root
                allow alice@example.com carol@example.net
            """
        try await withDaemon(rules, relay: script) { h in
            let client = try await h.ready()
            try await client.send(
                "MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"
                    + "RCPT TO:<carol@example.net>\r\nDATA\r\n")
            let replies = try await client.replies(5)
            #expect(replies.map(\.code) == [250, 250, 550, 250, 354])
            #expect(replies[2].lines == ["550 5.1.1 <bob@example.org>: Recipient address rejected: unknown"])
            try await client.send(message())
            let end = try await client.reply()
            #expect(end.code == 250)
            #expect(h.relay.log.connection.endsOfData == 1)
            let line = h.logs.decisions.first?.message ?? ""
            #expect(line.contains(" to=<alice@example.com>,<carol@example.net> verdict=relayed"), "\(line)")
        }
    }

    @Test("relay 451 at end of data: the client gets it, the decision says deferred")
    func relayDefersAtEndOfData() async throws {
        var script = RelayScript()
        script.endOfData = { _ in .reply("451 4.3.0 Error: queue file write error") }
        try await withDaemon(relay: script) { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(message())
            let end = try await client.reply()
            #expect(end.lines == ["451 4.3.0 Error: queue file write error"])
            let line = h.logs.decisions.first?.message ?? ""
            #expect(line.contains(" verdict=deferred "), "\(line)")
            #expect(line.hasSuffix(" relay=\"451 4.3.0 Error: queue file write error\""), "\(line)")
            #expect(h.logs.decisions.first?.level == .warning)
            // The session goes on.
            #expect(try await client.command("NOOP").code == 250)
        }
    }

    @Test("client leaving mid-DATA: the relay never sees an end of data and is disconnected")
    func clientDisconnectsInData() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(pickupHeader() + "Subject: half\r\n\r\nfirst body line\r\n")
            try await eventually("the relay to receive the header section") {
                h.relay.log.connections.first?.bytes.contains([UInt8]("Subject: half\r\n")) ?? false
            }
            await client.close()
            try await eventually("the relay connection to be closed") { h.relay.log.connections.first?.closed ?? false }
            let relay = h.relay.log.connection
            #expect(relay.endsOfData == 0)
            #expect(!relay.bytes.contains([UInt8]("\r\n.\r\n")))
            #expect(!relay.commands.contains("QUIT"))
        }
    }

    @Test("relay closing mid-DATA: 451 4.4.2")
    func relayClosesInData() async throws {
        var script = RelayScript()
        script.closeInDataAfter = 1
        try await withDaemon(relay: script) { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(pickupHeader() + "Subject: cut\r\n\r\nfirst body line\r\n")
            try await eventually("the relay to close") { h.relay.log.connections.first?.closed ?? false }
            try await client.send("second body line\r\n.\r\n")
            let reply = try await client.reply()
            #expect(reply.code == 451)
            #expect(reply.enhanced == "4.4.2")
            #expect(h.relay.log.connection.endsOfData == 0)
            let line = h.logs.decisions.first?.message ?? ""
            #expect(line.contains(" verdict=deferred "), "\(line)")
        }
    }

    @Test("relay closing instead of answering the end of data: 451 4.4.2, logged as deferred")
    func relayClosesAtEndOfData() async throws {
        var script = RelayScript()
        script.endOfData = { _ in .close }
        try await withDaemon(relay: script) { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(message())
            let reply = try await client.reply()
            #expect(reply.code == 451)
            #expect(reply.enhanced == "4.4.2")
            let line = h.logs.decisions.first?.message ?? ""
            #expect(line.contains(" verdict=deferred "), "\(line)")
        }
    }

    @Test("several messages in one session, RSET between, RSET pipelined with MAIL")
    func severalMessages() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(message(queueID: "AAA111"))
            #expect(try await client.reply().lines == ["250 2.0.0 Ok: queued as 4RELAY0"])

            #expect(try await client.command("RSET").code == 250)

            // A transaction abandoned by RSET, then a new one, all in one write.
            try await client.send(
                "MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<dropped@example.com>\r\nRSET\r\n"
                    + "MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
            #expect(try await client.replies(6).map(\.code) == [250, 250, 250, 250, 250, 354])
            try await client.send(message(queueID: "BBB222"))
            #expect(try await client.reply().lines == ["250 2.0.0 Ok: queued as 4RELAY1"])
            #expect(try await client.command("QUIT").code == 221)

            let relay = h.relay.log.connection
            #expect(relay.endsOfData == 2)
            #expect(relay.commands.filter { $0 == "RSET" }.count == 2)
            let lines = h.logs.decisions.map(\.message)
            #expect(lines.count == 2)
            #expect(lines.first?.hasPrefix("AAA111: uid=0 user=root door=pickup from=<root@lab.localdomain> to=<alice@example.com> ") == true)
            #expect(lines.last?.hasPrefix("BBB222: uid=0 user=root door=pickup from=<root@lab.localdomain> to=<bob@example.org> ") == true)
        }
    }
}

@Suite("Session: relay replies", .serialized, .timeLimit(.minutes(2)))
struct SessionRelayReplyTests {
    @Test("every RCPT refused by the relay: DATA gets 554 5.5.1, the relay no DATA")
    func noValidRecipients() async throws {
        var script = RelayScript()
        script.command = { $0.hasPrefix("RCPT") ? .reply("550 5.1.1 unknown user") : nil }
        try await withDaemon(relay: script) { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<nobody@example.com>\r\nDATA\r\n")
            let replies = try await client.replies(3)
            #expect(replies.map(\.code) == [250, 550, 554])
            #expect(replies[2].enhanced == "5.5.1")
            #expect(!h.relay.log.connection.commands.contains("DATA"))
            #expect(try await client.command("RSET").code == 250)
        }
    }

    @Test("the relay refusing MAIL: its reply passes through, RCPT then needs MAIL")
    func relayRefusesMail() async throws {
        var script = RelayScript()
        script.command = { $0.hasPrefix("MAIL") ? .reply("451 4.3.5 Server configuration problem") : nil }
        try await withDaemon(relay: script) { h in
            let client = try await h.ready()
            #expect(try await client.command("MAIL FROM:<root@lab.localdomain>").lines == ["451 4.3.5 Server configuration problem"])
            let rcpt = try await client.command("RCPT TO:<alice@example.com>")
            #expect(rcpt.code == 503)
        }
    }

    @Test("the relay refusing DATA after the decision: its reply passes through, logged, no message relayed")
    func relayRefusesData() async throws {
        var script = RelayScript()
        script.command = { $0 == "DATA" ? .reply("554 5.5.1 Error: no valid recipients") : nil }
        try await withDaemon(relay: script) { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(message())
            let reply = try await client.reply()
            #expect(reply.lines == ["554 5.5.1 Error: no valid recipients"])
            #expect(h.relay.log.connection.messages.isEmpty)
            #expect(h.relay.log.connection.commands.last == "RSET")
            let line = h.logs.decisions.first?.message ?? ""
            #expect(line.contains(" verdict=refused "), "\(line)")
            #expect(try await client.command("NOOP").code == 250)
        }
    }

    @Test("EHLO SIZE is the smaller of the relay's and message_size_limit; HELO passes through")
    func ehloSizeAndHelo() async throws {
        try await withDaemon("message_size_limit 2000\n" + rootAllowsAll) { h in
            let client = try await h.greeted()
            let ehlo = try await client.command("EHLO lab.localdomain")
            #expect(ehlo.keywords.contains("SIZE 2000"))
            #expect(!ehlo.keywords.contains { $0.hasPrefix("STARTTLS") || $0.hasPrefix("AUTH") || $0.hasPrefix("CHUNKING") || $0.hasPrefix("XCLIENT") })
            let helo = try await client.command("HELO lab.localdomain")
            #expect(helo.lines == ["250 relay.test"])
        }
    }
}
