import NIOCore
import SMTPCore
import Testing

/// Everything a framer makes of `chunks`: lines as strings, errors as "!error".
private func frame(_ chunks: [ArraySlice<UInt8>], maxLength: Int = 16) -> [String] {
    var framer = LineFramer(maxLength: maxLength)
    var buf = ByteBuffer()
    var out: [String] = []
    for chunk in chunks {
        buf.writeBytes(chunk)
        while true {
            do {
                guard let line = try framer.next(&buf) else { break }
                out.append(text(line))
            } catch {
                out.append("!\(error)")
            }
        }
    }
    return out
}

private func frame(_ s: String, maxLength: Int = 16) -> [String] { frame([Array(s)[...]], maxLength: maxLength) }

@Suite struct LineFramerTests {
    @Test func crlfLines() {
        #expect(frame("EHLO x\r\nQUIT\r\n") == ["EHLO x", "QUIT"])
        #expect(frame("\r\n") == [""])
    }

    @Test func needMoreLeavesBufferUntouched() throws {
        var framer = LineFramer(maxLength: 16)
        var buf = buffer("EHLO x\r")
        let before = buf.readerIndex
        #expect(try framer.next(&buf) == nil)
        #expect(buf.readerIndex == before)
        #expect(buf.readableBytes == 7)
        buf.writeString("\n")
        let line = try #require(try framer.next(&buf))
        #expect(text(line) == "EHLO x")
        #expect(buf.readableBytes == 0)
    }

    @Test func bareLF() {
        #expect(frame("EHLO x\nQUIT\r\n") == ["!bareLF", "QUIT"])
        #expect(frame("\n") == ["!bareLF"])
    }

    @Test func bareCR() {
        #expect(frame("EH\rLO\r\nQUIT\r\n") == ["!bareCR", "LO", "QUIT"])
        // Known bad before the LF arrives: the CR is not the last byte seen.
        #expect(frame("EH\rL") == ["!bareCR"])
        #expect(frame("\r\r\n") == ["!bareCR", ""])
    }

    @Test func lengthLimitIncludesCRLF() {
        #expect(frame("12345678901234\r\n", maxLength: 16) == ["12345678901234"])
        #expect(frame("123456789012345\r\nOK\r\n", maxLength: 16) == ["!tooLong(limit: 16)", "OK"])
    }

    @Test func tooLongSkipsToNextLFAndRecovers() {
        // The rest of the long line arrives later; it is dropped, and the next line is read.
        let chunks = [Array("0123456789abcdefghij")[...], Array("klmnop")[...], Array("qr\r\nQUIT\r\n")[...]]
        #expect(frame(chunks, maxLength: 16) == ["!tooLong(limit: 16)", "QUIT"])
        // Whole: the same.
        #expect(frame("0123456789abcdefghijklmnopqr\r\nQUIT\r\n", maxLength: 16) == ["!tooLong(limit: 16)", "QUIT"])
    }

    @Test func skippingState() throws {
        var framer = LineFramer(maxLength: 8)
        var buf = buffer("123456789")
        #expect(throws: LineError.tooLong(limit: 8)) { try framer.next(&buf) }
        #expect(framer.skipping)
        buf.writeString("xyz\r\nNOOP\r\n")
        let line = try #require(try framer.next(&buf))
        #expect(text(line) == "NOOP")
        #expect(!framer.skipping)
    }

    @Test(arguments: Chunking.all)
    func dripFeedingGivesTheSameResult(_ chunking: Chunking) {
        let input = Array("EHLO lab.localdomain\r\nMAIL FROM:<a@b>\r\nbad\nline\r\nx\ry\r\n\r\nRCPT TO:<c@d>\r\n0123456789012345678901234567890123456789\r\nQUIT\r\n")
        let expected = frame([input[...]], maxLength: 32)
        #expect(expected == [
            "EHLO lab.localdomain", "MAIL FROM:<a@b>", "!bareLF", "line", "!bareCR", "y", "", "RCPT TO:<c@d>",
            "!tooLong(limit: 32)", "QUIT",
        ])
        #expect(frame(chunking.split(input), maxLength: 32) == expected)
    }

    /// The error reported is that of the earliest offending byte, however the bytes arrive.
    @Test(arguments: Chunking.all)
    func errorsDoNotDependOnSegmentation(_ chunking: Chunking) {
        let cases = ["a\rb\nNOOP\r\n", "a\rbcdefghijklmnopqrstuvwxyz\r\nNOOP\r\n", "abcdefghijklmn\r\nNOOP\r\n", "abcdefghijklmno\rx\nNOOP\r\n"]
        for c in cases {
            let input = Array(c)
            #expect(frame(chunking.split(input), maxLength: 16) == frame([input[...]], maxLength: 16), "\(c.debugDescription)")
        }
    }
}
