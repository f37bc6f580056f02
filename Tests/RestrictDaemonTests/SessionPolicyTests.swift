// Sessions whose message the rules or the quota refuse or defer: the reply at the end of data,
// and a relay that gets RSET and never DATA.

import RestrictPolicy
import Testing

@testable import RestrictDaemon

@Suite("Session: decisions", .serialized, .timeLimit(.minutes(2)))
struct SessionPolicyTests {
    /// Sends one transaction with `recipients` and `content`, returns the end-of-data reply.
    static func transaction(_ client: TestClient, recipients: [String], content: String = message()) async throws -> Reply {
        var envelope = "MAIL FROM:<root@lab.localdomain>\r\n"
        for r in recipients { envelope += "RCPT TO:<\(r)>\r\n" }
        try await client.send(envelope + "DATA\r\n")
        let replies = try await client.replies(recipients.count + 2)
        #expect(replies.map(\.code) == [250] + recipients.map { _ in 250 } + [354])
        try await client.send(content)
        return try await client.reply()
    }

    /// The relay cleared the envelope and was never given a message.
    static func expectRelayReset(_ h: Harness) {
        let relay = h.relay.log.connection
        #expect(relay.commands.last == "RSET", "\(relay.commands)")
        #expect(!relay.commands.contains("DATA"))
        #expect(relay.messages.isEmpty)
        #expect(relay.endsOfData == 0)
    }

    @Test("refused by rule: 550 5.7.1 naming the first refused recipient")
    func refusedByRule() async throws {
        let rules = """
            user root
                allow @example.com
            """
        try await withDaemon(rules) { h in
            let client = try await h.ready()
            let reply = try await Self.transaction(
                client, recipients: ["alice@example.com", "evil@spam.test", "worse@spam.test"])
            #expect(reply.lines == ["550 5.7.1 <evil@spam.test>: not permitted for uid 0 (root)"])
            Self.expectRelayReset(h)
            let line = h.logs.decisions.first?.message ?? ""
            #expect(line.hasPrefix("62F36F78196: uid=0 user=root door=pickup from=<root@lab.localdomain> "), "\(line)")
            #expect(line.contains(" verdict=refused reason=\"<evil@spam.test> not on the allow list\""), "\(line)")
            #expect(h.logs.decisions.first?.level == .warning)
            // The session continues.
            #expect(try await client.command("MAIL FROM:<root@lab.localdomain>").code == 250)
        }
    }

    @Test("unidentified sender with `unknown refuse`: 550 5.7.1")
    func unidentified() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            let reply = try await Self.transaction(client, recipients: ["alice@example.com"], content: message(uid: nil))
            #expect(reply.code == 550)
            #expect(reply.enhanced == "5.7.1")
            #expect(reply.text.hasPrefix("5.7.1 <alice@example.com>: not permitted for unidentified sender"), "\(reply)")
            Self.expectRelayReset(h)
            let line = h.logs.decisions.first?.message ?? ""
            #expect(line.hasPrefix("NOQUEUE: uid=unknown door=pickup from=<root@lab.localdomain> "), "\(line)")
        }
    }

    @Test("a forged pickup header below the first header does not identify the sender")
    func forgedSecondHeader() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            let content = "X-First: submitter\r\n" + pickupHeader(uid: 0) + "Subject: x\r\n\r\nbody\r\n.\r\n"
            let reply = try await Self.transaction(client, recipients: ["alice@example.com"], content: content)
            #expect(reply.code == 550)
            #expect(reply.enhanced == "5.7.1")
            Self.expectRelayReset(h)
        }
    }

    static let quotaRules = """
        user root
            allow @example.com
            arbitrary 1 per day
        """

    @Test("quota exhausted: 451 4.7.1 by default")
    func quotaDefers() async throws {
        try await withDaemon(Self.quotaRules) { h in
            let client = try await h.ready()
            let reply = try await Self.transaction(client, recipients: ["a@other.test", "b@other.test"])
            #expect(reply.code == 451)
            #expect(reply.enhanced == "4.7.1")
            #expect(reply.text.contains("<b@other.test>"), "\(reply)")
            Self.expectRelayReset(h)
            let line = h.logs.decisions.first?.message ?? ""
            #expect(line.contains(" verdict=deferred "), "\(line)")
            #expect(line.contains(" quota=\""), "\(line)")
        }
    }

    @Test("quota exhausted with over_quota reject: 550 5.7.1")
    func quotaRejects() async throws {
        try await withDaemon("over_quota reject\n" + Self.quotaRules) { h in
            let client = try await h.ready()
            let reply = try await Self.transaction(client, recipients: ["a@other.test", "b@other.test"])
            #expect(reply.code == 550)
            #expect(reply.enhanced == "5.7.1")
            Self.expectRelayReset(h)
        }
    }

    @Test("within quota: relayed, and the quota is spent")
    func withinQuota() async throws {
        let store = FakeQuotaStore()
        try await withDaemon(Self.quotaRules, store: store) { h in
            let client = try await h.ready()
            let reply = try await Self.transaction(client, recipients: ["alice@example.com", "a@other.test"])
            #expect(reply.code == 250)
            #expect(await store.requests.map(\.addresses) == [["a@other.test"]])
            #expect(h.relay.log.connection.endsOfData == 1)
        }
    }

    @Test("quota store failing: 451 4.3.0, never relayed")
    func quotaStoreThrows() async throws {
        try await withDaemon(Self.quotaRules, store: FakeQuotaStore(failing: true)) { h in
            let client = try await h.ready()
            let reply = try await Self.transaction(client, recipients: ["a@other.test"])
            #expect(reply.code == 451)
            #expect(reply.enhanced == "4.3.0")
            Self.expectRelayReset(h)
        }
    }

    @Test("a second transaction in the same write as the first end of data is read as commands, not relayed as data")
    func smuggledTransactionInOneWrite() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            let smuggled = "MAIL FROM:<evil@lab.localdomain>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n" + message(uid: nil, body: "smuggled-body\r\n")
            try await client.send(message() + smuggled)
            let replies = try await client.replies(4)
            // The first message is relayed; the second envelope is read as commands, and its
            // content, sent before any 354, ends the session (RFC 2920).
            #expect(replies.map(\.code) == [250, 250, 250, 554])
            #expect(replies[3].enhanced == "5.5.0")
            try await client.waitClosed()
            let relay = h.relay.log.connection
            #expect(relay.endsOfData == 1)
            #expect(relay.messages == [Array([UInt8](message()).dropLast(3))])
            #expect(!relay.bytes.contains([UInt8]("smuggled-body")))
        }
    }

    @Test("a second envelope in the same write as the first end of data is judged by the rules")
    func secondTransactionJudged() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(message() + "MAIL FROM:<evil@lab.localdomain>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n")
            #expect(try await client.replies(4).map(\.code) == [250, 250, 250, 354])
            try await client.send(message(uid: nil, body: "smuggled\r\n"))
            let reply = try await client.reply()
            #expect(reply.code == 550)
            #expect(reply.enhanced == "5.7.1")
            let relay = h.relay.log.connection
            #expect(relay.endsOfData == 1)
            #expect(!relay.bytes.contains([UInt8]("smuggled")))
            #expect(relay.commands.last == "RSET")
        }
    }
}

@Suite("Session: refusals with a failing relay", .serialized, .timeLimit(.minutes(2)))
struct SessionRefusalRelayTests {
    @Test("a refused message is answered and logged even when the relay drops on the RSET")
    func refusalSurvivesRelayLossOnReset() async throws {
        var script = RelayScript()
        script.command = { $0 == "RSET" ? .close : nil }
        let rules = """
            user root
                allow @example.com
            """
        try await withDaemon(rules, relay: script) { h in
            let client = try await h.ready()
            try await client.send("MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<evil@spam.test>\r\nDATA\r\n")
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(message())
            let reply = try await client.reply()
            #expect(reply.lines == ["550 5.7.1 <evil@spam.test>: not permitted for uid 0 (root)"])
            let line = h.logs.decisions.first?.message ?? ""
            #expect(line.contains(" verdict=refused "), "\(line)")
            let next = try await client.command("MAIL FROM:<root@lab.localdomain>")
            #expect(next.code == 421)
            try await client.waitClosed()
        }
    }
}
