import SMTPCore
import Testing

@Suite struct LogTextTests {
    @Test func lineBreaksCannotForgeLogLines() {
        #expect(LogText.escape("a\r\nwarning: forged") == "a\\r\\nwarning: forged")
        #expect(LogText.escape("\n") == "\\n")
        #expect(LogText.escape("\r") == "\\r")
    }

    @Test func controls() {
        #expect(LogText.escape("\t") == "\\t")
        #expect(LogText.escape([0, 1, 27, 31, 127]) == "\\x00\\x01\\x1b\\x1f\\x7f")
        #expect(LogText.escape("plain text 123 <a@b>") == "plain text 123 <a@b>")
    }

    @Test func backslashAndQuotes() {
        #expect(LogText.escape("a\\b") == "a\\\\b")
        #expect(LogText.escape("say \"hi\"") == "say \\\"hi\\\"")
        // An escaped escape cannot be mistaken for an escape sequence.
        #expect(LogText.escape("\\x41") == "\\\\x41")
    }

    @Test func utf8() {
        #expect(LogText.escape("frédéric@example.com") == "frédéric@example.com")
        #expect(LogText.escape("€ 𝄞 日本") == "€ 𝄞 日本")
        // Invalid UTF-8: stray continuation, truncated sequence, overlong encoding, surrogate, 0xFF.
        #expect(LogText.escape([0x80]) == "\\x80")
        #expect(LogText.escape([0xC3]) == "\\xc3")
        #expect(LogText.escape([0xC3, 0x41]) == "\\xc3A")
        #expect(LogText.escape([0xC0, 0xAF]) == "\\xc0\\xaf")
        #expect(LogText.escape([0xED, 0xA0, 0x80]) == "\\xed\\xa0\\x80")
        #expect(LogText.escape([0xFF, 0xFE]) == "\\xff\\xfe")
        #expect(LogText.escape([0xE2, 0x82]) == "\\xe2\\x82")
        // C1 controls and Unicode line separators are escaped too.
        #expect(LogText.escape("\u{85}") == "\\xc2\\x85")
        #expect(LogText.escape("\u{2028}x\u{2029}") == "\\xe2\\x80\\xa8x\\xe2\\x80\\xa9")
        // Bidi controls, which could make a line read in another order: all of them.
        #expect(LogText.escape("a\u{202E}b") == "a\\xe2\\x80\\xaeb")
        #expect(LogText.escape("a\u{2067}b") == "a\\xe2\\x81\\xa7b")
        #expect(LogText.escape("a\u{61C}b") == "a\\xd8\\x9cb")
    }

    @Test func truncation() {
        let long = String(repeating: "a", count: 300)
        #expect(LogText.escape(long) == String(repeating: "a", count: LogText.defaultLimit) + "...")
        let exact = String(repeating: "b", count: LogText.defaultLimit)
        #expect(LogText.escape(exact) == exact)
        #expect(LogText.escape("abcdef", limit: 3) == "abc...")
        #expect(LogText.escape("", limit: 3) == "")
        // The limit counts input bytes; escaping may lengthen the output, but only boundedly.
        let nasty = [UInt8](repeating: 1, count: 10_000)
        #expect(LogText.escape(nasty).utf8.count <= LogText.defaultLimit * 4 + 3)
        // A multi-byte character is never cut in half.
        #expect(LogText.escape("aé", limit: 2) == "aé")
        #expect(LogText.escape("aéb", limit: 2) == "aé...")
        // A long input is cut at the limit whatever its length.
        #expect(LogText.escape(String(repeating: "€", count: 100_000), limit: 5) == "€€...")
    }
}
