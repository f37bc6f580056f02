import SMTPCore
import Testing

private func parse(_ line: String, sizeLimit: Int = 0) throws(CommandError) -> SMTPCommand {
    try CommandParser.parse(Array(line), sizeLimit: sizeLimit)
}

private func mailbox(_ path: String) throws -> Mailbox {
    try #require(try AddressParser.parsePath(Array(path), allowNull: false))
}

@Suite struct CommandParserTests {
    @Test func simpleVerbs() throws {
        #expect(try parse("EHLO lab.localdomain") == .ehlo("lab.localdomain"))
        #expect(try parse("HELO lab.localdomain") == .helo("lab.localdomain"))
        #expect(try parse("ehlo [127.0.0.1]") == .ehlo("[127.0.0.1]"))
        #expect(try parse("DATA") == .data)
        #expect(try parse("RSET") == .rset)
        #expect(try parse("QUIT") == .quit)
        #expect(try parse("quit  ") == .quit)
        #expect(try parse("NOOP") == .noop)
        #expect(try parse("NOOP whatever you like") == .noop)
        #expect(try parse("data") == .data)
    }

    @Test func verbArgumentErrors() {
        for line in ["EHLO", "EHLO ", "EHLO a b", "HELO a\tb", "DATA x", "RSET now", "QUIT please", "", " MAIL FROM:<a@b>", "ABCDEFGHIJKLMNOPQ"] {
            #expect(throws: CommandError.self, "\(line.debugDescription)") { try parse(line) }
        }
    }

    @Test func mailAndRcpt() throws {
        let m = try parse("MAIL FROM:<www-data@lab.localdomain>")
        #expect(m == .mail(reversePath: try mailbox("<www-data@lab.localdomain>"), parameters: []))
        #expect(try parse("mail from:<a@b.example>") == .mail(reversePath: try mailbox("<a@b.example>"), parameters: []))
        // A space after the colon is tolerated, as Postfix does.
        #expect(try parse("MAIL FROM: <a@b.example>") == .mail(reversePath: try mailbox("<a@b.example>"), parameters: []))
        let r = try parse("RCPT TO:<carol@example.com>")
        #expect(r == .rcpt(forwardPath: try mailbox("<carol@example.com>"), parameters: []))
    }

    @Test func nullSenderAndPostmaster() throws {
        #expect(try parse("MAIL FROM:<>") == .mail(reversePath: nil, parameters: []))
        #expect(try parse("MAIL FROM:<>").wireLine == "MAIL FROM:<>")
        guard case .rcpt(let pm, _) = try parse("RCPT TO:<Postmaster>") else {
            Issue.record("not a RCPT")
            return
        }
        #expect(pm.localPart == "Postmaster")
        #expect(pm.domain == nil)
        #expect(pm.description == "Postmaster")
        #expect(throws: CommandError.badAddress("empty address", isSender: false)) { try parse("RCPT TO:<>") }
        #expect(throws: CommandError.badAddress("bad domain", isSender: false)) { try parse("RCPT TO:<webmaster>") }
    }

    /// Every command line Postfix sent in the fixtures parses, and its wire form is the line itself.
    @Test(arguments: Fixture.names)
    func fixtureCommandsRoundTrip(_ name: String) throws {
        for line in try Fixture.commandLines(name) {
            let cmd = try CommandParser.parse(line, sizeLimit: 10_240_000)
            #expect(cmd.wireLine == String(decoding: line, as: UTF8.self))
            #expect(try CommandParser.parse(Array(cmd.wireLine.utf8)) == cmd)
        }
    }

    @Test func fixtureParameterSets() throws {
        let d = try parse("MAIL FROM:<spoofed@evil.example> SIZE=390 BODY=8BITMIME ENVID=envid-123 RET=HDRS SMTPUTF8")
        #expect(d == .mail(reversePath: try mailbox("<spoofed@evil.example>"), parameters: [
            ESMTPParameter(keyword: "SIZE", value: "390"), ESMTPParameter(keyword: "BODY", value: "8BITMIME"),
            ESMTPParameter(keyword: "ENVID", value: "envid-123"), ESMTPParameter(keyword: "RET", value: "HDRS"),
            ESMTPParameter(keyword: "SMTPUTF8", value: nil),
        ]))
        let r = try parse("RCPT TO:<erin@example.com> ORCPT=rfc822;erin@example.com NOTIFY=SUCCESS,FAILURE,DELAY")
        #expect(r == .rcpt(forwardPath: try mailbox("<erin@example.com>"), parameters: [
            ESMTPParameter(keyword: "ORCPT", value: "rfc822;erin@example.com"),
            ESMTPParameter(keyword: "NOTIFY", value: "SUCCESS,FAILURE,DELAY"),
        ]))
        let u = try parse("RCPT TO:<frédéric@example.com> ORCPT=utf-8;fr\\x{E9}d\\x{E9}ric@example.com")
        guard case .rcpt(let box, let params) = u else {
            Issue.record("not a RCPT")
            return
        }
        #expect(box.localPart == "frédéric")
        #expect(box.domain == "example.com")
        #expect(params == [ESMTPParameter(keyword: "ORCPT", value: "utf-8;fr\\x{E9}d\\x{E9}ric@example.com")])
        // Keywords are case-insensitive and relayed upper-cased.
        #expect(try parse("MAIL FROM:<a@b.example> size=10 body=7bit").wireLine == "MAIL FROM:<a@b.example> SIZE=10 BODY=7bit")
    }

    @Test func utf8Addresses() throws {
        guard case .mail(let box?, _) = try parse("MAIL FROM:<frédéric@exämple.com> SMTPUTF8") else {
            Issue.record("not a MAIL")
            return
        }
        #expect(box.description == "frédéric@exämple.com")
        // Not UTF-8: refused.
        var bad = Array("RCPT TO:<fr")
        bad += [0xE9] + Array("d@example.com>")
        #expect(throws: CommandError.badAddress("bad local part", isSender: false)) { try CommandParser.parse(bad) }
    }

    @Test func sourceRoutesAreAcceptedAndDropped() throws {
        let cmd = try parse("RCPT TO:<@a.example,@b.example:user@c.example>")
        #expect(cmd == .rcpt(forwardPath: try mailbox("<user@c.example>"), parameters: []))
        #expect(cmd.wireLine == "RCPT TO:<user@c.example>")
        #expect(throws: CommandError.badAddress("bad source route", isSender: true)) { try parse("MAIL FROM:<@a..b:u@c.example>") }
        #expect(throws: CommandError.badAddress("bad source route", isSender: false)) { try parse("RCPT TO:<@a.example,b.example:u@c.example>") }
        #expect(throws: CommandError.badAddress("bad source route", isSender: false)) { try parse("RCPT TO:<@a.example>") }
    }

    @Test func quotedLocalParts() throws {
        let a = try parse("RCPT TO:<\"john doe\"@example.com>")
        #expect(a.wireLine == "RCPT TO:<\"john doe\"@example.com>")
        // A ">" and an escaped quote inside the quoted string do not end the path.
        let b = try parse("RCPT TO:<\"a>b\\\"c\"@example.com> NOTIFY=NEVER")
        guard case .rcpt(let box, let params) = b else {
            Issue.record("not a RCPT")
            return
        }
        #expect(box.localPart == "\"a>b\\\"c\"")
        #expect(params == [ESMTPParameter(keyword: "NOTIFY", value: "NEVER")])
        #expect(try parse(b.wireLine) == b)
        #expect(throws: CommandError.self) { try parse("RCPT TO:<\"unterminated@example.com>") }
    }

    @Test func badSyntax() {
        let cases: [(String, CommandError)] = [
            ("MAIL FROM:a@b.example", .syntax("expected FROM:<address>")),
            ("MAIL TO:<a@b.example>", .syntax("expected FROM:<address>")),
            ("RCPT FROM:<a@b.example>", .syntax("expected TO:<address>")),
            ("MAIL", .syntax("expected FROM:<address>")),
            ("RCPT TO:<a@b.example", .syntax("unterminated address")),
            ("MAIL FROM:<a@b.example>x", .syntax("garbage after address")),
            ("MAIL FROM:<a@@b.example>", .badAddress("bad domain", isSender: true)),
            ("MAIL FROM:<a..b@c.example>", .badAddress("bad local part", isSender: true)),
            ("RCPT TO:<a@-b.example>", .badAddress("bad domain", isSender: false)),
            ("RCPT TO:<a b@c.example>", .badAddress("bad local part", isSender: false)),
            ("MAIL FROM:<a@b.example> SIZE", .syntax("bad SIZE value")),
            ("MAIL FROM:<a@b.example> SIZE=12k", .syntax("bad SIZE value")),
            ("MAIL FROM:<a@b.example> SIZE=", .syntax("bad value for SIZE")),
            ("MAIL FROM:<a@b.example> SIZE=1 SIZE=2", .syntax("duplicate SIZE")),
            ("MAIL FROM:<a@b.example> SMTPUTF8=yes", .syntax("SMTPUTF8 takes no value")),
            ("MAIL FROM:<a@b.example> =x", .syntax("bad parameter")),
            ("MAIL FROM:<a@b.example> -X", .syntax("bad parameter")),
            ("MAIL FROM:<a@b.example> ENVID=a=b", .syntax("bad value for ENVID")),
        ]
        for (line, error) in cases {
            #expect(throws: error, "\(line)") { try parse(line) }
        }
        for (_, error) in cases {
            #expect(error.reply.code == 501)
            #expect(error.reply.enhancedCode?.hasPrefix("5.") == true)
        }
        #expect(CommandError.badAddress("x", isSender: true).reply.enhancedCode == "5.1.7")
        #expect(CommandError.badAddress("x", isSender: false).reply.enhancedCode == "5.1.3")
    }

    @Test func controlCharacters() {
        for c: UInt8 in [0, 1, 8, 10, 13, 27, 127] {
            let line = Array("MAIL FROM:<a") + [c] + Array("@b.example>")
            #expect(throws: CommandError.syntax("control character in command")) { try CommandParser.parse(line) }
        }
        // TAB separates like a space.
        #expect(throws: Never.self) { try parse("MAIL\tFROM:<a@b.example>") }
    }

    @Test func unsupportedParameters() {
        let cases: [(String, String)] = [
            ("MAIL FROM:<a@b.example> AUTH=<>", "AUTH"),
            ("MAIL FROM:<a@b.example> XYZ", "XYZ"),
            ("MAIL FROM:<a@b.example> NOTIFY=NEVER", "NOTIFY"),
            ("MAIL FROM:<a@b.example> BODY=BINARYMIME", "BODY=BINARYMIME"),
            ("MAIL FROM:<a@b.example> REQUIRETLS", "REQUIRETLS"),
            ("RCPT TO:<a@b.example> SIZE=10", "SIZE"),
            ("RCPT TO:<a@b.example> RET=FULL", "RET"),
        ]
        for (line, param) in cases {
            #expect(throws: CommandError.unsupportedParameter(param), "\(line)") { try parse(line) }
        }
        let reply = CommandError.unsupportedParameter("XYZ").reply
        #expect(reply.code == 555)
        #expect(reply.enhancedCode == "5.5.4")
    }

    @Test func sizeLimit() throws {
        #expect(throws: Never.self) { try parse("MAIL FROM:<a@b.example> SIZE=10240000", sizeLimit: 10_240_000) }
        #expect(throws: CommandError.tooBig(declared: 10_240_001, limit: 10_240_000)) {
            try parse("MAIL FROM:<a@b.example> SIZE=10240001", sizeLimit: 10_240_000)
        }
        // No limit of our own.
        #expect(throws: Never.self) { try parse("MAIL FROM:<a@b.example> SIZE=99999999999", sizeLimit: 0) }
        let reply = CommandError.tooBig(declared: 2, limit: 1).reply
        #expect(reply.code == 552)
        #expect(reply.enhancedCode == "5.3.4")
    }

    @Test func disabledVerbs() throws {
        for verb in ["STARTTLS", "BDAT 100 LAST", "AUTH PLAIN AGFiYwBkZWY=", "XCLIENT ADDR=1.2.3.4", "XFORWARD NAME=x",
            "ETRN example.com", "VRFY root", "EXPN staff", "HELP", "TURN"]
        {
            let word = String(verb.split(separator: " ")[0])
            #expect(try parse(verb) == .disabled(verb: word))
            #expect(try parse(verb.lowercased()) == .disabled(verb: word))
        }
    }

    @Test func unknownVerbs() throws {
        #expect(try parse("FOO bar") == .unknown(verb: "FOO"))
        #expect(try parse("GET / HTTP/1.0") == .unknown(verb: "GET"))
        #expect(try parse("MÄIL FROM:<a@b>") == .unknown(verb: "?"))
        #expect(try parse("ABCDEFGHIJKLMNOP") == .unknown(verb: "ABCDEFGHIJKLMNOP"))
    }

    @Test func wireLineRoundTrip() throws {
        let lines = [
            "EHLO lab.localdomain", "HELO x", "MAIL FROM:<>", "MAIL FROM:<a@b.example> SIZE=1 BODY=8BITMIME SMTPUTF8",
            "RCPT TO:<postmaster>", "RCPT TO:<a@[127.0.0.1]> NOTIFY=NEVER", "RCPT TO:<\"x y\"@z.example> ORCPT=rfc822;x@z.example",
            "DATA", "RSET", "NOOP", "QUIT", "VRFY", "FOO",
        ]
        for line in lines {
            let cmd = try parse(line)
            #expect(cmd.wireLine == line)
            #expect(try parse(cmd.wireLine) == cmd)
        }
    }
}

@Suite struct AddressParserTests {
    private func path(_ s: String, allowNull: Bool = false) throws(AddressError) -> Mailbox? {
        try AddressParser.parsePath(Array(s), allowNull: allowNull)
    }

    @Test func brackets() throws {
        #expect(throws: AddressError.missingBrackets) { try path("a@b.example") }
        #expect(throws: AddressError.missingBrackets) { try path("<a@b.example") }
        #expect(throws: AddressError.missingBrackets) { try path("a@b.example>") }
        #expect(throws: AddressError.missingBrackets) { try path("<") }
        #expect(try path("<>", allowNull: true) == nil)
        #expect(throws: AddressError.empty) { try path("<>") }
    }

    /// RFC 5321 4.5.3.1.3: 256 octets including the brackets.
    @Test func pathLimit() throws {
        let local = String(repeating: "l", count: 64)
        let domain189 = String(repeating: "a", count: 63) + "." + String(repeating: "b", count: 63) + "." + String(repeating: "c", count: 61)
        let ok = "<\(local)@\(domain189)>"
        #expect(ok.utf8.count == 256)
        #expect(try path(ok)?.domain == domain189)
        let tooLong = "<\(local)@\(domain189)c>"
        #expect(tooLong.utf8.count == 257)
        #expect(throws: AddressError.tooLong) { try path(tooLong) }
        #expect(AddressParser.maxPathLength == 256)
    }

    @Test func localPartAndLabelLimits() throws {
        #expect(try path("<\(String(repeating: "x", count: 64))@a.example>") != nil)
        #expect(throws: AddressError.badLocalPart) { try path("<\(String(repeating: "x", count: 65))@a.example>") }
        #expect(try path("<\"\(String(repeating: "x", count: 64))\"@a.example>") != nil)
        #expect(throws: AddressError.badLocalPart) { try path("<\"\(String(repeating: "x", count: 65))\"@a.example>") }
        #expect(try path("<a@\(String(repeating: "d", count: 63)).example>") != nil)
        #expect(throws: AddressError.badDomain) { try path("<a@\(String(repeating: "d", count: 64)).example>") }
    }

    @Test func localParts() throws {
        for good in ["<a.b@c.example>", "<a+tag@c.example>", "<!#$%&'*+-/=?^_`{|}~@c.example>", "<\"\"@c.example>",
            "<\"a b\"@c.example>", "<\"a\\\\b\"@c.example>", "<ü@c.example>"]
        {
            #expect(throws: Never.self, "\(good)") { try path(good) }
        }
        for bad in ["<.a@c.example>", "<a.@c.example>", "<a..b@c.example>", "<a(b)@c.example>", "<a,b@c.example>",
            "<\"abc@c.example>", "<\"a\\\u{1}\"@c.example>", "<\"a\u{7f}\"@c.example>", "<\"a\"b@c.example>", "<@c.example:>"]
        {
            #expect(throws: AddressError.self, "\(bad)") { try path(bad) }
        }
    }

    @Test func domains() throws {
        for good in ["<a@b>", "<a@b-c.example>", "<a@[127.0.0.1]>", "<a@[IPv6:::1]>", "<a@exämple.com>", "<a@1.2.3.4>"] {
            #expect(throws: Never.self, "\(good)") { try path(good) }
        }
        for bad in ["<a@>", "<a@-b.example>", "<a@b-.example>", "<a@b..example>", "<a@b.example.>", "<a@.b.example>",
            "<a@b_c.example>", "<a@[]>", "<a@[1 2]>", "<a@[a]b>", "<a@b@c>"]
        {
            #expect(throws: AddressError.badDomain, "\(bad)") { try path(bad) }
        }
    }

    @Test func postmaster() throws {
        #expect(try path("<postmaster>")?.domain == nil)
        #expect(try path("<POSTMASTER>")?.localPart == "POSTMASTER")
        #expect(throws: AddressError.badDomain) { try path("<root>") }
        #expect(throws: AddressError.badDomain) { try path("<\"postmaster\">") }
    }

    @Test func sourceRoute() throws {
        #expect(try path("<@a,@b.example:x@y.example>")?.description == "x@y.example")
        #expect(throws: AddressError.badLocalPart) { try path("<@a:@b:x@y.example>") }
        #expect(throws: AddressError.badSourceRoute) { try path("<@:x@y.example>") }
        #expect(throws: AddressError.badSourceRoute) { try path("<@a,:x@y.example>") }
    }

    @Test func parseMailboxDirect() throws {
        #expect(try AddressParser.parseMailbox(Array("user@example.org")).description == "user@example.org")
        #expect(throws: AddressError.empty) { try AddressParser.parseMailbox([UInt8]()) }
        #expect(throws: AddressError.tooLong) { try AddressParser.parseMailbox(Array(String(repeating: "a", count: 257))) }
    }
}
