// The X-PHP-Originating-Script hint from header sections good and bad.

import SMTPCore
import Testing

private func hint(_ s: String) -> String? { ScriptHint.extract(Array(s.utf8)) }

@Suite struct ScriptHintTests {
    @Test func phpsHeader() {
        #expect(hint("Received: x\r\nX-PHP-Originating-Script: 33:contact.php\r\nSubject: s\r\n\r\nbody\r\n") == "33:contact.php")
        #expect(hint("x-php-originating-script:33:a.php\r\n\r\n") == "33:a.php")
    }

    @Test func missingEmptyOrInTheBody() {
        #expect(hint("Subject: s\r\n\r\n") == nil)
        #expect(hint("X-PHP-Originating-Script:   \r\n\r\n") == nil)
        #expect(hint("Subject: s\r\n\r\nX-PHP-Originating-Script: 1:body.php\r\n") == nil)
        #expect(hint("X-PHP-Originating-Scripts: 1:other.php\r\n\r\n") == nil)
    }

    @Test func foldedAndRepeated() {
        #expect(hint("X-PHP-Originating-Script: 33:a\r\n  b.php\r\nSubject: s\r\n\r\n") == "33:a b.php")
        // The first one counts; a second could be anyone's.
        #expect(hint("X-PHP-Originating-Script: 1:first.php\r\nX-PHP-Originating-Script: 2:second.php\r\n\r\n") == "1:first.php")
    }

    @Test func hostileBytesAreEscapedAndTruncated() throws {
        let evil = try #require(hint("X-PHP-Originating-Script: 1:\"x\" \u{1b}[2J\u{7f}ok.php\r\n\r\n"))
        #expect(evil == "1:\\\"x\\\" \\x1b[2J\\x7fok.php")
        let long = try #require(hint("X-PHP-Originating-Script: " + String(repeating: "a", count: 5000) + "\r\n\r\n"))
        #expect(long.hasSuffix("...") && long.utf8.count <= ScriptHint.limit + 3)
        // Bare LF lines and a missing end of the header section do not confuse it.
        #expect(hint("X-PHP-Originating-Script: 7:lf.php\nSubject: s") == "7:lf.php")
    }
}
