import NIOCore
import SMTPCore
import Testing

/// Replies parsed from `chunks`, stopping at the first error (given as its description).
private func replies(_ chunks: [ArraySlice<UInt8>]) -> (replies: [SMTPReply], error: ReplyError?) {
    var parser = ReplyParser()
    var buf = ByteBuffer()
    var out: [SMTPReply] = []
    for chunk in chunks {
        buf.writeBytes(chunk)
        do {
            while let r = try parser.next(&buf) { out.append(r) }
        } catch {
            return (out, error)
        }
    }
    return (out, nil)
}

private func replies(_ s: String) -> (replies: [SMTPReply], error: ReplyError?) { replies([Array(s)[...]]) }

/// The EHLO reply of a fixture: its second reply (the first is the greeting).
private func ehloReply(_ name: String) throws -> SMTPReply {
    let (all, error) = replies([try Fixture.s2c(name)[...]])
    #expect(error == nil)
    return try #require(all.dropFirst().first)
}

@Suite struct ReplyParserTests {
    @Test func singleLine() {
        let (r, e) = replies("250 2.0.0 Ok: queued as 6810AF781A5\r\n")
        #expect(e == nil)
        #expect(r == [SMTPReply(code: 250, lines: ["2.0.0 Ok: queued as 6810AF781A5"])])
        #expect(r.first?.enhancedCode == "2.0.0")
        #expect(r.first?.isPositive == true)
        #expect(replies("250\r\n").replies == [SMTPReply(code: 250, lines: [""])])
        #expect(replies("451 4.3.0 x\r\n").replies.first?.isTransient == true)
        #expect(replies("550 5.7.1 x\r\n").replies.first?.isPermanent == true)
    }

    @Test func multiLine() {
        let (r, e) = replies("250-a.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n221 2.0.0 Bye\r\n")
        #expect(e == nil)
        #expect(r == [SMTPReply(code: 250, lines: ["a.example", "PIPELINING", "SIZE 100"]), SMTPReply(221, "2.0.0", "Bye")])
    }

    @Test(arguments: Fixture.names)
    func fixtures(_ name: String) throws {
        let bytes = try Fixture.s2c(name)
        let whole = replies([bytes[...]])
        #expect(whole.error == nil)
        // One reply per line whose fourth byte is a space.
        let finals = bytes.split(separator: Array("\r\n"))
            .filter { $0.count >= 4 && $0[$0.startIndex + 3] == 32 }.count
        #expect(whole.replies.count == finals)
        #expect(whole.replies.first?.code == 220)
        #expect(whole.replies.last == SMTPReply(221, "2.0.0", "Bye"))
        for chunking in Chunking.all {
            let r = replies(chunking.split(bytes))
            #expect(r.replies == whole.replies, "\(chunking)")
            #expect(r.error == nil)
        }
        // Written back, the replies are the fixture byte for byte.
        var out = ByteBuffer()
        for reply in whole.replies { reply.write(to: &out) }
        #expect(Array(out.readableBytesView) == bytes)
    }

    @Test func ehloFixture() throws {
        let r = try ehloReply("g-all-extensions-offered")
        #expect(r.code == 250)
        #expect(r.lines.count == 12)
        #expect(r.lines.first == "capture.localdomain")
        #expect(r.lines.last == "STARTTLS")
    }

    @Test func badCodes() {
        for line in ["650 x\r\n", "199 x\r\n", "25 x\r\n", "2a0 x\r\n", "x\r\n", "\r\n", "25\r\n", "000 x\r\n"] {
            let (r, e) = replies(line)
            #expect(r.isEmpty)
            guard case .malformed? = e else {
                Issue.record("\(line.debugDescription): \(String(describing: e))")
                continue
            }
        }
        #expect(replies("250x\r\n").error == .malformed("bad separator"))
        #expect(replies("250\tOk\r\n").error == .malformed("bad separator"))
    }

    @Test func codeChangeMidReply() {
        #expect(replies("250-a\r\n251 b\r\n").error == .malformed("code changed within a reply"))
        #expect(replies("250-a\r\n550 b\r\n").error == .malformed("code changed within a reply"))
    }

    @Test func tooManyLines() {
        let ok = String(repeating: "250-x\r\n", count: SMTPLimits.replyLines - 1) + "250 y\r\n"
        #expect(replies(ok).replies.first?.lines.count == SMTPLimits.replyLines)
        let tooMany = String(repeating: "250-x\r\n", count: SMTPLimits.replyLines) + "250 y\r\n"
        #expect(replies(tooMany).error == .tooManyLines)
    }

    @Test func framing() {
        #expect(replies("250 ok\n").error == .framing(.bareLF))
        #expect(replies("250 o\rk\r\n").error == .framing(.bareCR))
        let long = "250 " + String(repeating: "x", count: SMTPLimits.replyLine) + "\r\n"
        #expect(replies(long).error == .framing(.tooLong(limit: SMTPLimits.replyLine)))
    }

    @Test(arguments: Chunking.all)
    func dripFed(_ chunking: Chunking) {
        let input = Array("220 hi\r\n250-a\r\n250-b\r\n250 c\r\n354 go\r\n")
        let r = replies(chunking.split(input))
        #expect(r.error == nil)
        #expect(r.replies.map(\.code) == [220, 250, 354])
        #expect(r.replies[1].lines == ["a", "b", "c"])
    }

    @Test func needMore() throws {
        var parser = ReplyParser()
        var buf = buffer("250-a\r\n250 b")
        #expect(try parser.next(&buf) == nil)
        buf.writeString("\r\n")
        #expect(try parser.next(&buf) == SMTPReply(code: 250, lines: ["a", "b"]))
    }

    @Test func enhancedCode() {
        #expect(SMTPReply(code: 250, lines: ["Ok"]).enhancedCode == nil)
        #expect(SMTPReply(code: 250, lines: ["2.1.5 Ok"]).enhancedCode == "2.1.5")
        #expect(SMTPReply(code: 250, lines: ["3.1.5 Ok"]).enhancedCode == nil)
        #expect(SMTPReply(code: 250, lines: ["2.1000.5 Ok"]).enhancedCode == nil)
        #expect(SMTPReply(code: 250, lines: ["2..5 Ok"]).enhancedCode == nil)
        #expect(SMTPReply(code: 250, lines: []).lines == [""])
        #expect(SMTPReply(code: 250, lines: ["a", "b"]).description == "250 a / 250 b")
    }
}

@Suite struct EHLOFilterTests {
    static let offered = ["PIPELINING", "SIZE 10240000", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"]
    static let never = ["STARTTLS", "CHUNKING", "XCLIENT", "XFORWARD", "AUTH", "ETRN", "VRFY"]

    @Test(arguments: ["g-all-extensions-offered", "a-root-relay", "e-t-utf8-rcpt-relay", "k-550-one-rcpt"])
    func fixtureReplies(_ name: String) throws {
        let reply = try ehloReply(name)
        let filtered = EHLOFilter.filter(reply, sizeLimit: 10_240_000)
        #expect(filtered.code == 250)
        #expect(filtered.lines.first == reply.lines.first)
        #expect(Set(filtered.lines.dropFirst()) == Set(Self.offered))
        #expect(filtered.lines.count == Self.offered.count + 1)
        for word in Self.never {
            #expect(!filtered.lines.contains { $0.uppercased().hasPrefix(word) }, "\(word)")
        }
    }

    @Test func exactOutputForAllExtensions() throws {
        let filtered = EHLOFilter.filter(try ehloReply("g-all-extensions-offered"), sizeLimit: 10_240_000)
        #expect(filtered == SMTPReply(code: 250, lines: ["capture.localdomain"] + Self.offered))
        var out = ByteBuffer()
        filtered.write(to: &out)
        #expect(text(out) == "250-capture.localdomain\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n")
    }

    @Test func sizeIsTheSmallerLimit() {
        func size(relay: String, ours: Int) -> String? {
            let reply = SMTPReply(code: 250, lines: ["relay", relay])
            return EHLOFilter.filter(reply, sizeLimit: ours).lines.dropFirst().first
        }
        #expect(size(relay: "SIZE 10240000", ours: 5000) == "SIZE 5000")
        #expect(size(relay: "SIZE 5000", ours: 10_240_000) == "SIZE 5000")
        #expect(size(relay: "SIZE 5000", ours: 0) == "SIZE 5000")
        #expect(size(relay: "SIZE", ours: 7000) == "SIZE 7000")
        #expect(size(relay: "SIZE 0", ours: 7000) == "SIZE 7000")
        #expect(size(relay: "SIZE", ours: 0) == "SIZE")
        #expect(size(relay: "size 100", ours: 0) == "SIZE 100")
    }

    @Test func otherReplies() {
        let refused = SMTPReply(550, "5.7.1", "go away")
        #expect(EHLOFilter.filter(refused, sizeLimit: 100) == refused)
        let oneLine = SMTPReply(code: 250, lines: ["relay.example"])
        #expect(EHLOFilter.filter(oneLine, sizeLimit: 100) == oneLine)
        let lower = SMTPReply(code: 250, lines: ["relay", "pipelining", "auth=login plain", "starttls", "8bitmime"])
        #expect(EHLOFilter.filter(lower, sizeLimit: 0).lines == ["relay", "PIPELINING", "8BITMIME"])
    }
}
