import NIOCore
import SMTPCore
import Testing

/// Everything a decoder makes of `chunks`: requests as sorted "k=v" lists, errors as "!error".
private func decode(_ chunks: [[UInt8]]) -> [String] {
    var decoder = PolicyDecoder()
    var buf = ByteBuffer()
    var out: [String] = []
    for chunk in chunks {
        buf.writeBytes(chunk)
        while let event = decoder.next(&buf) {
            switch event {
            case .request(let r): out.append(r.attributes.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ","))
            case .invalid(let e): out.append("!\(e)")
            }
        }
        buf.discardReadBytes()
    }
    return out
}

private func decode(_ s: String) -> [String] { decode([Array(s.utf8)]) }

/// A request as Postfix 3.7 sent it at RCPT (captured from a private instance).
private let rcptRequest = """
    request=smtpd_access_policy
    protocol_state=RCPT
    protocol_name=ESMTP
    client_address=127.0.0.1
    client_name=localhost
    client_port=58106
    reverse_client_name=localhost
    server_address=127.0.0.1
    server_port=2526
    helo_name=lab
    sender=www-data@lab
    recipient=carol@example.com
    recipient_count=0
    queue_id=
    instance=1f7.6b0c91cb.adc71.0
    size=0
    etrn_domain=
    stress=
    sasl_method=
    sasl_username=
    sasl_sender=
    ccert_subject=
    ccert_issuer=
    ccert_fingerprint=
    ccert_pubkey_fingerprint=
    encryption_protocol=
    encryption_cipher=
    encryption_keysize=0
    policy_context=
    compatibility_level=3.6
    mail_version=3.7.11


    """

@Suite struct PolicyProtocolTests {
    @Test func postfixRequest() throws {
        let out = decode(rcptRequest)
        #expect(out.count == 1)
        var decoder = PolicyDecoder()
        var buf = ByteBuffer(string: rcptRequest)
        guard case .request(let r)? = decoder.next(&buf) else { Issue.record("no request"); return }
        #expect(r["client_address"] == "127.0.0.1")
        #expect(r["client_port"] == "58106")
        #expect(r["queue_id"] == "")
        #expect(r["instance"] == "1f7.6b0c91cb.adc71.0")
        #expect(r.attributes.count == 31)
    }

    @Test func wholeByteByByteAndChunksAgree() {
        let two = rcptRequest + rcptRequest.replacingOccurrences(of: "RCPT", with: "END-OF-MESSAGE")
        let bytes = Array(two.utf8)
        let whole = decode([bytes])
        #expect(whole.count == 2)
        #expect(decode(bytes.map { [$0] }) == whole)
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20 {
            var chunks: [[UInt8]] = []
            var i = 0
            while i < bytes.count {
                let n = Int.random(in: 1...40, using: &rng)
                chunks.append(Array(bytes[i..<min(bytes.count, i + n)]))
                i += n
            }
            #expect(decode(chunks) == whole)
        }
    }

    @Test func valuesMayHoldEqualsAndCRIsDropped() {
        #expect(decode("a=b=c\r\nx=\n\n") == ["a=b=c,x="])
    }

    @Test func strayEmptyLinesAreNotRequests() {
        #expect(decode("\n\na=1\n\n\n") == ["a=1"])
    }

    @Test func malformedLinesFailTheirRequestOnly() {
        // No "=", a folded (indented) continuation, a name with odd bytes, a NUL: each request
        // fails alone and the next one is read as usual.
        #expect(decode("a=1\nfoo bar\nb=2\n\nc=3\n\n") == ["!malformed attribute line \"foo bar\"", "c=3"])
        #expect(decode("a=1\n  folded=yes\n\nc=3\n\n") == ["!malformed attribute line \"  folded=yes\"", "c=3"])
        #expect(decode("=x\n\nc=3\n\n") == ["!malformed attribute line \"=x\"", "c=3"])
        #expect(decode("a-b=1\n\n").first?.hasPrefix("!malformed") == true)
        #expect(decode("a=\u{0}\n\nc=3\n\n").last == "c=3")
        #expect(decode("a=\u{0}\n\nc=3\n\n").first?.hasPrefix("!malformed") == true)
    }

    @Test func duplicateAttributeIsRefused() {
        #expect(decode("client_address=127.0.0.1\nclient_address=192.0.2.1\n\n") == ["!attribute client_address given twice"])
    }

    @Test func oversizeLineIsSkippedToItsEnd() {
        let long = String(repeating: "x", count: PolicyLimits.line + 10)
        #expect(decode("a=\(long)\nb=1\n\nc=3\n\n") == ["!attribute line longer than \(PolicyLimits.line) bytes", "c=3"])
        // Without its LF yet: the decoder holds no more than a line's worth.
        var decoder = PolicyDecoder()
        var buf = ByteBuffer(string: "a=" + long)
        #expect(decoder.next(&buf) == .invalid(.lineTooLong))
        #expect(decoder.next(&buf) == nil)
        #expect(buf.readableBytes == 0)
        buf.writeString(String(repeating: "y", count: 100_000))
        #expect(decoder.next(&buf) == nil)
        #expect(buf.readableBytes == 0)
        buf.writeString("\n\nc=3\n\n")
        #expect(decoder.next(&buf) == .request(PolicyRequest(["c": "3"])))
    }

    @Test func aBadRequestIsAnsweredOnceHoweverManyLongLinesItHas() {
        // Two over-long lines in one request: one answer, or every later answer would go to
        // the request before it.
        let long = String(repeating: "x", count: PolicyLimits.line + 10)
        #expect(decode("a=\(long)\nb=\(long)\nc=\(long)\n\nd=4\n\n") == ["!attribute line longer than \(PolicyLimits.line) bytes", "d=4"])
        #expect(decode([Array("a=1\nfoo\nb=\(long)\n\nd=4\n\n".utf8)]) == ["!malformed attribute line \"foo\"", "d=4"])
    }

    @Test func tooManyAttributesAndTooLargeRequests() {
        let many = (0...PolicyLimits.attributes).map { "a\($0)=1\n" }.joined() + "\n"
        #expect(decode(many + "c=3\n\n") == ["!more than \(PolicyLimits.attributes) attributes", "c=3"])
        let big = (0..<20).map { "a\($0)=\(String(repeating: "v", count: 4000))\n" }.joined() + "\n"
        #expect(decode(big + "c=3\n\n") == ["!request larger than \(PolicyLimits.request) bytes", "c=3"])
    }

    @Test func needMoreLeavesThePartialLine() {
        var decoder = PolicyDecoder()
        var buf = ByteBuffer(string: "a=1\nb=")
        #expect(decoder.next(&buf) == nil)
        #expect(buf.readableBytes == 2)
        buf.writeString("2\n\n")
        #expect(decoder.next(&buf) == .request(PolicyRequest(["a": "1", "b": "2"])))
    }

    @Test func answers() {
        func wire(_ a: PolicyAction) -> String {
            var b = ByteBuffer()
            a.write(to: &b)
            return String(buffer: b)
        }
        #expect(wire(.dunno) == "action=DUNNO\n\n")
        #expect(wire(.reply(SMTPReply(550, "5.7.1", "<a@b>: not permitted for uid 33 (www-data)")))
            == "action=550 5.7.1 <a@b>: not permitted for uid 33 (www-data)\n\n")
        #expect(wire(.deferIfPermit(enhanced: "4.7.1", text: "over")) == "action=DEFER_IF_PERMIT 4.7.1 over\n\n")
        #expect(wire(.defer(enhanced: "4.3.0", text: "no\nnewline")) == "action=DEFER 4.3.0 no newline\n\n")
    }
}
