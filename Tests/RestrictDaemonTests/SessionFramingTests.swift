// The byte stream itself: drip-fed input, dot-stuffing, and end-of-data look-alikes that a
// lenient relay would read as the end of the message ("SMTP smuggling", CVE-2023-51764).

import RestrictPolicy
import Testing

@testable import RestrictDaemon

@Suite("Session: framing", .serialized, .timeLimit(.minutes(2)))
struct SessionFramingTests {
    static let envelope = "MAIL FROM:<root@lab.localdomain>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"

    @Test("a whole session drip-fed three bytes at a time is relayed byte for byte")
    func dripFed() async throws {
        try await withDaemon { h in
            let client = try await h.greeted()
            let content = pickupHeader() + "Subject: drip\r\n\r\nline one\r\n..dot\r\n\r\nlast\r\n"
            func drip(_ text: String) async throws {
                let bytes = [UInt8](text)
                var i = 0
                while i < bytes.count {
                    try await client.send(bytes: Array(bytes[i..<min(i + 3, bytes.count)]))
                    try await Task.sleep(for: .milliseconds(1))
                    i += 3
                }
            }
            try await drip("EHLO lab.localdomain\r\n")
            #expect(try await client.reply().code == 250)
            try await drip(Self.envelope)
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await drip(content + ".\r\n")
            #expect(try await client.reply().code == 250)
            try await drip("QUIT\r\n")
            #expect(try await client.reply().code == 221)
            let relay = h.relay.log.connection
            #expect(relay.messages == [[UInt8](content)])
            #expect(relay.endsOfData == 1)
            #expect(h.runtime.snapshot.relayed == 1)
        }
    }

    @Test("a message with a header section only (no empty line, no body) is relayed whole")
    func headersOnly() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await client.send(Self.envelope)
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            let content = pickupHeader() + "Subject: no body\r\n"
            try await client.send(content + ".\r\n")
            #expect(try await client.reply().code == 250)
            #expect(h.relay.log.connection.messages == [[UInt8](content)])
        }
    }

    @Test("a stuffed lone dot stays stuffed; an unstuffed leading dot is removed (RFC 5321 4.5.2)")
    func dotStuffing() async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await client.send(Self.envelope)
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(pickupHeader() + "Subject: dots\r\n\r\n..\r\n.x\r\n...\r\nend\r\n.\r\n")
            #expect(try await client.reply().code == 250)
            let relay = h.relay.log.connection
            #expect(relay.messages == [[UInt8](pickupHeader() + "Subject: dots\r\n\r\n..\r\nx\r\n...\r\nend\r\n")])
            #expect(relay.endsOfData == 1)
        }
    }

    @Test(
        "end-of-data look-alikes in the body refuse the message and smuggle nothing",
        arguments: ["\n.\n", "\n.\r\n", "\r\n.\n", "\r\n.\r\r\n", "\r.\r", "\r\n\0.\r\n"])
    func smugglingSequences(_ fake: String) async throws {
        try await withDaemon { h in
            let client = try await h.ready()
            try await client.send(Self.envelope)
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            let smuggled = "MAIL FROM:<evil@lab.localdomain>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nsmuggled-body\r\n"
            try await client.send(pickupHeader() + "Subject: s\r\n\r\nbody" + fake + smuggled + ".\r\n")
            let reply = try await client.reply()
            #expect(reply.code == 550)
            #expect(reply.enhanced == "5.6.0")
            // Nothing after the violation was read as a command.
            try await Task.sleep(for: .milliseconds(100))
            #expect(client.unread.isEmpty, "\(client.unread.text.debugDescription)")
            try await eventually("the relay connection to be dropped") { h.relay.log.connections.first?.closed ?? false }
            let relay = h.relay.log.connection
            #expect(relay.endsOfData == 0)
            #expect(!relay.commands.contains { $0.contains("evil") })
            #expect(!relay.bytes.contains([UInt8]("victim")))
        }
    }

    @Test("data_timeout 1 with a message trickling in: 421 4.4.2")
    func dataTimeout() async throws {
        try await withDaemon("data_timeout 1\n" + rootAllowsAll) { h in
            let client = try await h.ready()
            try await client.send(Self.envelope)
            #expect(try await client.replies(3).map(\.code) == [250, 250, 354])
            try await client.send(pickupHeader() + "Subject: slow\r\n\r\n")
            for _ in 0..<12 {
                if !client.unread.isEmpty || client.inbox.isClosed { break }
                try await client.send("line\r\n")
                try await Task.sleep(for: .milliseconds(300))
            }
            let reply = try await client.reply(within: 5)
            #expect(reply.code == 421)
            #expect(reply.enhanced == "4.4.2")
            try await client.waitClosed()
            try await eventually("the relay connection to be dropped") { h.relay.log.connections.first?.closed ?? false }
            #expect(h.relay.log.connection.endsOfData == 0)
        }
    }
}
