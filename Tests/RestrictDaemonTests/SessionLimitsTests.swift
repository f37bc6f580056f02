// Sessions that break the wire rules or exceed a bound: DATA violations, size limits, recipient
// limit, command-line limits, disabled commands, pipelining into DATA.

import RestrictPolicy
import Testing

@testable import RestrictDaemon

@Suite("Session: limits and protocol errors", .serialized, .timeLimit(.minutes(2)))
struct SessionLimitsTests {
    static let envelope = "MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"

    static func startData(_ client: TestClient) async throws {
        try await client.send(Self.envelope)
        #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
    }

    /// A line that breaks the DATA rules (CRLF included where it has one).
    enum Violation: String, CaseIterable, CustomTestStringConvertible {
        case bareLF, bareCR, nul, overlong

        var line: String {
            switch self {
            case .bareLF: return "X-Bad: one\ntwo\r\n"
            case .bareCR: return "X-Bad: one\rtwo\r\n"
            case .nul: return "X-Bad: one\u{0}two\r\n"
            case .overlong: return "X-Bad: " + String(repeating: "x", count: 1200) + "\r\n"
            }
        }

        var testDescription: String { self.rawValue }
    }

    static let dataLineLimit = "data_line_limit 1000\n" + rootAllowsAll

    @Test("a DATA violation in the header section: 550 5.6.0, relay reset, session goes on", arguments: Violation.allCases)
    func violationInHeaders(_ violation: Violation) async throws {
        try await withDaemon(Self.dataLineLimit) { h in
            let client = try await h.ready()
            try await Self.startData(client)
            try await client.send(pickupHeader() + violation.line + "Subject: x\r\n\r\nbody\r\n.\r\n")
            let reply = try await client.reply()
            #expect(reply.code == 550)
            #expect(reply.enhanced == "5.6.0")
            let relay = h.relay.log.connection
            #expect(!relay.commands.contains("DATA"))
            #expect(relay.commands.last == "RSET")
            #expect(try await client.command("MAIL FROM:<root@lab.localdomain>").code == 250)
            #expect(h.logs.decisions.first?.message.contains(" verdict=refused ") == true)
        }
    }

    @Test("a DATA violation in the body: 550 5.6.0, relay dropped, next MAIL 421 4.3.0", arguments: Violation.allCases)
    func violationInBodyThenMail(_ violation: Violation) async throws {
        try await withDaemon(Self.dataLineLimit) { h in
            let client = try await h.ready()
            try await Self.startData(client)
            try await client.send(pickupHeader() + "Subject: x\r\n\r\nbody\r\n" + violation.line + "more\r\n.\r\n")
            let reply = try await client.reply()
            #expect(reply.code == 550)
            #expect(reply.enhanced == "5.6.0")
            try await eventually("the relay connection to be dropped") { h.relay.log.connections.first?.closed ?? false }
            let relay = h.relay.log.connection
            #expect(relay.endsOfData == 0)
            #expect(!relay.bytes.contains([UInt8]("\r\n.\r\n")))
            let next = try await client.command("MAIL FROM:<root@lab.localdomain>")
            #expect(next.code == 421)
            #expect(next.enhanced == "4.3.0")
            try await client.waitClosed()
        }
    }

    @Test("a DATA violation in the body, then QUIT: 221")
    func violationInBodyThenQuit() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await Self.startData(client)
            try await client.send(pickupHeader() + "Subject: x\r\n\r\nbody\nbare\r\n.\r\n")
            #expect(try await client.reply().code == 550)
            #expect(try await client.command("QUIT").code == 221)
            try await client.waitClosed()
            #expect(h.relay.log.connection.endsOfData == 0)
        }
    }

    @Test("header section over header_limit: 552 5.3.4")
    func headerTooBig() async throws {
        try await withDaemon("header_limit 1024\n" + rootAllowsAll) { h in
            let client = try await h.ready()
            try await Self.startData(client)
            var headers = pickupHeader()
            for i in 0..<40 { headers += "X-Filler-\(i): " + String(repeating: "h", count: 40) + "\r\n" }
            try await client.send(headers + "\r\nbody\r\n.\r\n")
            let reply = try await client.reply()
            #expect(reply.code == 552)
            #expect(reply.enhanced == "5.3.4")
            #expect(!h.relay.log.connection.commands.contains("DATA"))
            #expect(try await client.command("NOOP").code == 250)
        }
    }

    @Test("message over message_size_limit: 552 5.3.4, no end of data at the relay")
    func messageTooBig() async throws {
        try await withDaemon("message_size_limit 2000\n" + rootAllowsAll) { h in
            let client = try await h.ready()
            try await Self.startData(client)
            var body = ""
            for _ in 0..<50 { body += String(repeating: "b", count: 70) + "\r\n" }
            try await client.send(pickupHeader() + "Subject: big\r\n\r\n" + body + ".\r\n")
            let reply = try await client.reply()
            #expect(reply.code == 552)
            #expect(reply.enhanced == "5.3.4")
            try await eventually("the relay connection to be dropped") { h.relay.log.connections.first?.closed ?? false }
            #expect(h.relay.log.connection.endsOfData == 0)
        }
    }

    @Test("MAIL SIZE= over message_size_limit: 552 5.3.4, not relayed")
    func declaredSizeTooBig() async throws {
        try await withDaemon("message_size_limit 2000\n" + rootAllowsAll) { h in
            let client = try await h.ready()
            let reply = try await client.command("MAIL FROM:<root@lab.localdomain> SIZE=2001")
            #expect(reply.code == 552)
            #expect(reply.enhanced == "5.3.4")
            #expect(try await client.command("MAIL FROM:<root@lab.localdomain> SIZE=2000").code == 250)
            #expect(h.relay.log.connection.commands.filter { $0.hasPrefix("MAIL") } == ["MAIL FROM:<root@lab.localdomain> SIZE=2000"])
        }
    }

    @Test("recipient_limit 2: the third RCPT gets 452 4.5.3")
    func tooManyRecipients() async throws {
        try await withDaemon("recipient_limit 2\n" + rootAllowsAll) { h in
            let client = try await h.ready()
            try await client.send(
                "MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n")
            let replies = try await client.replies(4)
            #expect(replies.map(\.code) == [250, 250, 250, 452])
            #expect(replies[3].enhanced == "4.5.3")
            #expect(h.relay.log.connection.commands.filter { $0.hasPrefix("RCPT") }.count == 2)
        }
    }

    @Test("a command line over command_line_limit: 500 5.5.2, the session goes on")
    func commandTooLong() async throws {
        try await withDaemon("command_line_limit 512\n" + rootAllowsAll) { h in
            let client = try await h.ready()
            let reply = try await client.command("NOOP " + String(repeating: "x", count: 600))
            #expect(reply.code == 500)
            #expect(reply.enhanced == "5.5.2")
            #expect(try await client.command("NOOP").code == 250)
        }
    }

    @Test("bare LF in a command line: 521 5.5.2 and close")
    func bareLFInCommand() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await client.send("NOOP\n")
            try await client.expectFinalReply(521, "5.5.2")
        }
    }

    @Test(
        "commands restrictpd does not offer: 502 5.5.1, never relayed",
        arguments: ["STARTTLS", "BDAT 10 LAST", "AUTH PLAIN AGFsaWNl", "VRFY root", "XCLIENT NAME=spoof.test", "ETRN example.com", "FROB"])
    func disabledCommands(_ command: String) async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            let reply = try await client.command(command)
            #expect(reply.code == 502)
            #expect(reply.enhanced == "5.5.1")
            #expect(try await client.command("NOOP").code == 250)
            #expect(h.relay.log.connection.commands == ["EHLO client.test"])
        }
    }

    @Test("MAIL syntax errors: 501", arguments: ["MAIL FROM:root@lab.localdomain", "MAIL FROM:<root@lab.localdomain", "MAIL TO:<a@b>", "MAIL FROM:<a@b>x"])
    func mailSyntax(_ command: String) async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            let reply = try await client.command(command)
            #expect(reply.code == 501)
            #expect(reply.enhanced.hasPrefix("5.5.") || reply.enhanced.hasPrefix("5.1."), "\(reply)")
            #expect(try await client.command("MAIL FROM:<root@lab.localdomain>").code == 250)
        }
    }

    @Test("message content sent before the 354: 554 5.5.0 and close, nothing relayed")
    func dataBefore354() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await client.send(Self.envelope + message())
            let replies = try await client.replies(3)
            #expect(replies.map(\.code) == [250, 250, 554])
            #expect(replies[2].enhanced == "5.5.0")
            try await client.waitClosed()
            let relay = h.relay.log.connection
            #expect(!relay.commands.contains("DATA"))
            #expect(relay.endsOfData == 0)
        }
    }
}
