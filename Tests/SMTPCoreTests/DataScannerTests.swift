import NIOCore
import SMTPCore
import Testing

/// What a scanner made of a byte stream.
struct ScanResult: Equatable, CustomStringConvertible {
    enum Mark: Equatable { case end, violation(DataViolation) }
    /// Every content event, concatenated.
    var content: [UInt8] = []
    /// The non-content events in order, with how much content preceded each.
    var marks: [Mark] = []
    var contentBeforeMark: [Int] = []
    /// Content events seen after `.end` (must stay empty).
    var contentAfterEnd = 0
    /// Bytes left in the buffer when the input ran out.
    var rest: [UInt8] = []
    /// Number of content events (differs with chunking; not compared).
    var contentEvents = 0

    static func == (a: ScanResult, b: ScanResult) -> Bool {
        a.content == b.content && a.marks == b.marks && a.contentBeforeMark == b.contentBeforeMark
            && a.contentAfterEnd == b.contentAfterEnd && a.rest == b.rest
    }

    var description: String {
        "content=\(String(decoding: content, as: UTF8.self).debugDescription) marks=\(marks) rest=\(String(decoding: rest, as: UTF8.self).debugDescription)"
    }

    var ends: Int { self.marks.filter { $0 == .end }.count }
}

func scan(_ chunks: [ArraySlice<UInt8>], maxLine: Int = 1000, oneLine: Bool = false,
    discardAfterFirstContent: Bool = false, lineCheck: ((ByteBuffer) -> Void)? = nil) -> ScanResult
{
    var scanner = DataScanner(maxLineLength: maxLine)
    var buf = ByteBuffer()
    var r = ScanResult()
    var ended = false
    for chunk in chunks {
        buf.writeBytes(chunk)
        while !ended, let event = scanner.next(&buf, oneLine: oneLine) {
            switch event {
            case .content(let slice):
                if r.ends > 0 { r.contentAfterEnd += 1 }
                r.content += slice.readableBytesView
                r.contentEvents += 1
                lineCheck?(slice)
                if discardAfterFirstContent { scanner.discardRest() }
            case .end:
                r.marks.append(.end)
                r.contentBeforeMark.append(r.content.count)
                ended = true
                #expect(scanner.isFinished)
            case .violation(let v):
                r.marks.append(.violation(v))
                r.contentBeforeMark.append(r.content.count)
                #expect(scanner.isDiscarding)
            }
        }
    }
    // A finished scanner yields nothing more.
    #expect(ended == scanner.isFinished)
    if ended { #expect(scanner.next(&buf) == nil) }
    r.rest = Array(buf.readableBytesView)
    return r
}

func scan(_ bytes: [UInt8], _ chunking: Chunking = .whole, maxLine: Int = 1000, oneLine: Bool = false) -> ScanResult {
    scan(chunking.split(bytes), maxLine: maxLine, oneLine: oneLine)
}

func scan(_ s: String, _ chunking: Chunking = .whole, maxLine: Int = 1000) -> ScanResult {
    scan(Array(s), chunking, maxLine: maxLine)
}

@Suite struct DataScannerTests {
    /// Canonical fixtures come out byte for byte, minus the final ".\r\n", however they arrive.
    @Test(arguments: Fixture.names)
    func fixturesWholeBytewiseAndChunked(_ name: String) throws {
        let data = try Fixture.dataPart(name)
        let whole = scan(data, .whole)
        #expect(whole.content == Array(data.dropLast(3)))
        #expect(whole.marks == [.end])
        #expect(whole.rest.isEmpty)
        for chunking in Chunking.all {
            #expect(scan(data, chunking) == whole, "\(chunking)")
        }
        // Bytes after the end are left alone.
        let more = data + Array("QUIT\r\n")
        for chunking in Chunking.all {
            let r = scan(more, chunking)
            #expect(r.rest == Array("QUIT\r\n"), "\(chunking)")
            #expect(r.marks == [.end])
        }
    }

    @Test(arguments: Fixture.names)
    func fixturesOneLineMode(_ name: String) throws {
        let data = try Fixture.dataPart(name)
        let r = scan(Chunking.whole.split(data), oneLine: true) { slice in
            let v = slice.readableBytesView
            #expect(v.count >= 2)
            #expect(v.firstIndex(of: 10) == v.index(before: v.endIndex))
        }
        #expect(r.content == Array(data.dropLast(3)))
        #expect(r.contentEvents == (try Fixture.dataLines(name)).count)
    }

    @Test func emptyMessage() {
        let r = scan(".\r\nQUIT\r\n")
        #expect(r.content.isEmpty)
        #expect(r.marks == [.end])
        #expect(r.rest == Array("QUIT\r\n"))
    }

    @Test(arguments: Chunking.all)
    func dotStuffing(_ chunking: Chunking) {
        // Stuffed lines stay stuffed (the output is canonical, and relayed as it is).
        #expect(scan("..x\r\n.\r\n", chunking).content == Array("..x\r\n"))
        #expect(scan("..\r\n.\r\n", chunking).content == Array("..\r\n"))
        // An unstuffed leading dot is removed (RFC 5321 4.5.2).
        #expect(scan(".x\r\n.\r\n", chunking).content == Array("x\r\n"))
        #expect(scan("a\r\n.x.\r\nb\r\n.\r\n", chunking).content == Array("a\r\nx.\r\nb\r\n"))
        // A dot not at a line start is just a dot.
        #expect(scan("a.\r\n.\r\n", chunking).content == Array("a.\r\n"))
        #expect(scan(" .\r\n.\r\n", chunking).content == Array(" .\r\n"))
    }

    @Test(arguments: Chunking.all)
    func violationsThenDiscardToTheRealEnd(_ chunking: Chunking) {
        let cases: [(String, DataViolation, String)] = [
            ("ok\r\nbad\nline\r\n", .bareLF, "ok\r\n"),
            ("ok\r\n\n", .bareLF, "ok\r\n"),
            ("ok\r\nbad\rline\r\n", .bareCR, "ok\r\n"),
            ("ok\r\nbad\r\rline\r\n", .bareCR, "ok\r\n"),
            ("ok\r\nnul\u{0}line\r\n", .nul, "ok\r\n"),
            ("\u{0}\r\n", .nul, ""),
        ]
        for (prefix, violation, content) in cases {
            // After the violation, "\n.\r\n" and ".\r\n" after a bare LF do not end the data.
            let input = prefix + "x\n.\r\nmore\r\n.\r\nQUIT\r\n"
            let r = scan(input, chunking)
            #expect(r.marks == [.violation(violation), .end], "\(prefix.debugDescription)")
            #expect(r.content == Array(content))
            #expect(r.rest == Array("QUIT\r\n"), "\(prefix.debugDescription) \(r)")
        }
    }

    @Test(arguments: Chunking.all)
    func overlongLine(_ chunking: Chunking) {
        let long = String(repeating: "a", count: 2000)
        let r = scan("ok\r\n\(long)\r\n.\r\nQUIT\r\n", chunking)
        #expect(r.marks == [.violation(.lineTooLong(limit: 1000)), .end])
        #expect(r.content == Array("ok\r\n"))
        #expect(r.rest == Array("QUIT\r\n"))
        // The limit counts the CRLF.
        let exact = String(repeating: "b", count: 998)
        #expect(scan("\(exact)\r\n.\r\n", chunking).marks == [.end])
        #expect(scan("\(exact)b\r\n.\r\n", chunking).marks == [.violation(.lineTooLong(limit: 1000)), .end])
    }

    /// The violation reported is that of the earliest offending byte, however the bytes arrive,
    /// so the reply and the log never depend on TCP segmentation.
    @Test(arguments: Chunking.all)
    func violationDoesNotDependOnSegmentation(_ chunking: Chunking) {
        let long = String(repeating: "a", count: 1200)
        for input in ["a\rb\n.\r\n\r\n.\r\n", "a\u{0}\n\r\n.\r\n", "x\r\u{0}\r\n.\r\n", "a\r\(long)\r\n.\r\n", "\u{0}\(long)\r\n.\r\n",
            "\(String(repeating: "c", count: 998))\r\r\n.\r\n", "\(String(repeating: "c", count: 999))\r\n\r\n.\r\n"]
        {
            #expect(scan(input, chunking) == scan(input, .whole), "\(input.prefix(20).debugDescription)")
        }
    }

    static let smuggling = [
        "\n.\n", "\n.\r\n", "\r.\r", "\r.\n", "\n.\r", "\r\n.\n", "\r.\r\n", "\r\n.\r", "\r\n.\r\r\n", "\r\n\u{0}.\r\n",
        "\r\n.\u{0}\r\n",
    ]

    /// SMTP smuggling (CVE-2023-51764): no sloppy end of data ends the message early.
    @Test(arguments: smuggling)
    func smugglingNeverEndsData(_ sequence: String) {
        let smuggled = "MAIL FROM:<x@y>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nevil\r\n.\r\n"
        let input = "Subject: hi\r\n\r\nbody" + sequence + smuggled + "QUIT\r\n"
        let whole = scan(input, .whole)
        #expect(whole.ends == 1)
        #expect(whole.marks.first != .end)
        #expect(whole.marks.count == 2)
        #expect(whole.rest == Array("QUIT\r\n"), "\(whole)")
        #expect(!String(decoding: whole.content, as: UTF8.self).contains("MAIL"))
        for chunking in Chunking.all {
            #expect(scan(input, chunking) == whole, "\(chunking)")
        }
    }

    @Test(arguments: Chunking.all)
    func discardRest(_ chunking: Chunking) {
        // The first content event arrives, then the session refuses the message.
        let input = Array("Subject: a\r\n\r\nbody\n.\n\r\n.x\r\nmore\r\n.\r\nQUIT\r\n")
        let r = scan(chunking.split(input), oneLine: true, discardAfterFirstContent: true)
        #expect(r.content == Array("Subject: a\r\n"))
        #expect(r.marks == [.end])
        #expect(r.rest == Array("QUIT\r\n"))
    }

    @Test func discardRestAtTheStart() {
        var scanner = DataScanner(maxLineLength: 1000)
        scanner.discardRest()
        #expect(scanner.isDiscarding)
        var buf = buffer(".\r\nQUIT\r\n")
        #expect(scanner.next(&buf) == .end)
        #expect(text(buf) == "QUIT\r\n")
        // After the end, discardRest changes nothing.
        scanner.discardRest()
        #expect(scanner.isFinished)
    }

    @Test func needMoreLeavesTheBufferAlone() {
        var scanner = DataScanner(maxLineLength: 1000)
        var buf = buffer("partial line\r")
        #expect(scanner.next(&buf) == nil)
        #expect(text(buf) == "partial line\r")
        buf.writeString("\n.")
        #expect(scanner.next(&buf) == .content(buffer("partial line\r\n")))
        #expect(scanner.next(&buf) == nil)
        #expect(text(buf) == ".")
    }

    @Test func violationReplies() {
        for v in [DataViolation.bareLF, .bareCR, .nul, .lineTooLong(limit: 1000)] {
            #expect(v.reply.code == 550)
            #expect(v.reply.enhancedCode == "5.6.0")
            #expect(!v.logName.isEmpty)
        }
    }

    /// A long line dripped in one byte at a time is checked once, not from its start on every
    /// read; the result is the same as whole.
    @Test func dripFedLongLineIsScannedOnce() {
        let long = String(repeating: "x", count: 8000)
        var scanner = DataScanner(maxLineLength: 8192)
        var buffer = ByteBuffer()
        var events: [DataEvent] = []
        for byte in Array("\(long)\r\n.\r\n".utf8) {
            buffer.writeInteger(byte)
            while let e = scanner.next(&buffer) { events.append(e) }
        }
        guard events.count == 2, case .content(let line) = events[0] else {
            Issue.record("events: \(events)")
            return
        }
        #expect(line.readableBytes == 8002)
        #expect(events[1] == .end)
    }
}
