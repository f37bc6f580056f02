import NIOCore
import SMTPCore
import Testing

/// Pushes lines until the header section ends; returns the reader and the events.
private func read(_ lines: [[UInt8]]) -> (HeaderReader, [HeaderReader.Event]) {
    var reader = HeaderReader()
    var events: [HeaderReader.Event] = []
    for line in lines {
        let event = reader.push(ByteBuffer(bytes: line).readableBytesView)
        events.append(event)
        if event == .endOfHeaders { break }
    }
    return (reader, events)
}

private func identify(_ lines: [String]) -> SenderIdentity {
    read(lines.map { Array($0) }).0.identity
}

private let date = "\tid 4A519F781B3; Fri, 27 Nov 2026 09:13:30 +0000 (UTC)"

@Suite struct PickupHeaderTests {
    static let expected: [String: (uid: UInt32, queueID: String)] = [
        "a-root-relay": (0, "62F36F78196"),
        "b-www-data-runuser-relay": (33, "1B1C1F781A8"),
        "b-www-data-su-relay": (33, "AD70FF781AD"),
        "c-forged-received-relay": (33, "4A519F781B3"),
        "d-8bit-dsn-f-relay": (33, "E07BEF781B8"),
        "e-t-utf8-rcpt-relay": (33, "9AB12F781C9"),
        "f-sendmail-bs-relay": (33, "392B4F781D0"),
        "g-all-extensions-offered": (33, "5AE2AF781D5"),
        "h-550-end-of-data": (33, "755E7F781DA"),
        "k-550-one-rcpt": (33, "B0BD4F781E0"),
    ]

    @Test(arguments: Fixture.names)
    func fixtures(_ name: String) throws {
        let want = try #require(Self.expected[name])
        let lines = try Fixture.dataLines(name)
        let (reader, events) = read(lines)
        #expect(reader.identity == .pickup(uid: want.uid, queueID: want.queueID, host: "lab.localdomain", mailName: "Postfix"))
        #expect(reader.identity.uid == want.uid)
        #expect(reader.identity.queueID == want.queueID)
        // The header section ends at the empty line.
        let blank = try #require(lines.firstIndex(of: []))
        #expect(events.count == blank + 1)
        #expect(events.last == .endOfHeaders)
        #expect(events.dropLast().allSatisfy { $0 == .header })
        #expect(reader.firstField.count == 2)
    }

    /// The submitter's own "from userid 0" below pickup's header changes nothing.
    @Test func forgedReceivedIsIgnored() throws {
        let lines = try Fixture.dataLines("c-forged-received-relay")
        #expect(String(decoding: lines[2], as: UTF8.self) == "Received: by x (Postfix, from userid 0)")
        #expect(read(lines).0.identity.uid == 33)
    }

    @Test func siteSettings() {
        #expect(identify(["Received: by mx.example.org (Foo Mail, from userid 1000)", date, ""])
            == .pickup(uid: 1000, queueID: "4A519F781B3", host: "mx.example.org", mailName: "Foo Mail"))
        // A mail_name that itself says ", from userid": the last one is the uid.
        #expect(identify(["Received: by h (X, from userid 5, from userid 7)", date]).uid == 7)
        #expect(identify(["Received: by h (Postfix, from userid 0)", date]).uid == 0)
        #expect(identify(["Received: by h (Postfix, from userid 4294967294)", date]).uid == 4_294_967_294)
        // Long queue ids (enable_long_queue_ids = yes).
        #expect(identify(["Received: by h (Postfix, from userid 33)", "\tid 4fZQ2J1GxGz9vB8; Fri, 27 Nov 2026 09:13:30 +0000"]).queueID == "4fZQ2J1GxGz9vB8")
    }

    @Test func unidentified() {
        let cases: [(String, [String])] = [
            ("missing first header", ["", "body"]),
            ("unfolded", ["Received: by h (Postfix, from userid 33) id 4A519F781B3; Fri, 27 Nov 2026", ""]),
            ("other field first", ["From: a@b", "Received: by h (Postfix, from userid 0)", date, ""]),
            ("uid = (uid_t)-1", ["Received: by h (Postfix, from userid 4294967295)", date]),
            ("uid over 32 bits", ["Received: by h (Postfix, from userid 4294967296)", date]),
            ("uid much too long", ["Received: by h (Postfix, from userid 99999999999999999999)", date]),
            ("leading zero", ["Received: by h (Postfix, from userid 033)", date]),
            ("leading zeros", ["Received: by h (Postfix, from userid 00)", date]),
            ("negative", ["Received: by h (Postfix, from userid -1)", date]),
            ("empty uid", ["Received: by h (Postfix, from userid )", date]),
            ("plus sign", ["Received: by h (Postfix, from userid +33)", date]),
            ("two spaces after by", ["Received:  by h (Postfix, from userid 33)", date]),
            ("two spaces after host", ["Received: by h  (Postfix, from userid 33)", date]),
            ("two spaces in comment", ["Received: by h (Postfix,  from userid 33)", date]),
            ("two spaces before uid", ["Received: by h (Postfix, from userid  33)", date]),
            ("trailing space", ["Received: by h (Postfix, from userid 33) ", date]),
            ("lowercase field name", ["received: by h (Postfix, from userid 33)", date]),
            ("RECEIVED", ["RECEIVED: by h (Postfix, from userid 33)", date]),
            ("from instead of by", ["Received: from h (Postfix, from userid 33)", date]),
            ("continuation first", ["\tid 4A519F781B3; Fri, 27 Nov 2026", "Received: by h (Postfix, from userid 33)", date]),
            ("no mail_name", ["Received: by h (, from userid 33)", date]),
            ("parenthesis in mail_name", ["Received: by h ((x), from userid 33)", date]),
            ("three lines", ["Received: by h (Postfix, from userid 33)", date, "\tmore"]),
            ("no id", ["Received: by h (Postfix, from userid 33)", "\t4A519F781B3; Fri, 27 Nov 2026"]),
            ("space-folded id", ["Received: by h (Postfix, from userid 33)", " id 4A519F781B3; Fri, 27 Nov 2026"]),
            ("bad queue id", ["Received: by h (Postfix, from userid 33)", "\tid 4A51-9F78; Fri, 27 Nov 2026"]),
            ("no date", ["Received: by h (Postfix, from userid 33)", "\tid 4A519F781B3;"]),
            ("no semicolon", ["Received: by h (Postfix, from userid 33)", "\tid 4A519F781B3 Fri, 27 Nov 2026"]),
            ("control in host", ["Received: by h\u{1}x (Postfix, from userid 33)", date]),
        ]
        for (why, lines) in cases {
            let identity = identify(lines)
            #expect(identity.uid == nil, "\(why): \(identity)")
            if case .unidentified(let reason) = identity { #expect(!reason.isEmpty) }
        }
    }

    @Test func directIdentify() {
        #expect(PickupHeader.identify([]) == .unidentified(reason: "no header"))
        #expect(PickupHeader.identify([Array("Received: by h (Postfix, from userid 33)")]).uid == nil)
    }

    @Test func endOfHeaders() {
        // At the empty line.
        let (_, e1) = read(["Received: by h (Postfix, from userid 33)", date, "Subject: x", "", "body"].map { Array($0) })
        #expect(e1 == [.header, .header, .header, .endOfHeaders])
        // At a line that is no header field.
        let (r2, e2) = read(["Received: by h (Postfix, from userid 33)", date, "This is no header", "Subject: x"].map { Array($0) })
        #expect(e2 == [.header, .header, .endOfHeaders])
        #expect(r2.identity.uid == 33)
        #expect(r2.lineCount == 2)
        // A colon-less first line: no header section at all.
        let (r3, e3) = read(["Hello there", "Subject: x"].map { Array($0) })
        #expect(e3 == [.endOfHeaders])
        #expect(r3.identity == .unidentified(reason: "no header"))
        // A continuation as the very first line ends the (empty) header section.
        let (r4, e4) = read(["\tid 4A519F781B3; x", "Subject: x"].map { Array($0) })
        #expect(e4 == [.endOfHeaders])
        #expect(r4.identity.uid == nil)
        // A line starting with ":" or a space before the colon is no field.
        let (_, e5) = read(["Subject: x", ": x"].map { Array($0) })
        #expect(e5 == [.header, .endOfHeaders])
        let (_, e6) = read(["Subject: x", "Sub ject: x"].map { Array($0) })
        #expect(e6 == [.header, .endOfHeaders])
    }

    @Test func firstFieldIsBounded() {
        var reader = HeaderReader()
        #expect(reader.push(ByteBuffer(string: "Received: by h (Postfix, from userid 33)").readableBytesView) == .header)
        for _ in 0..<100 { _ = reader.push(ByteBuffer(string: "\tmore").readableBytesView) }
        #expect(reader.firstField.count == 4)
        #expect(reader.identity.uid == nil)
    }
}
