// libFuzzer entry point over SMTPCore's untrusted-input parsers.
//
// One input drives every parser. Besides "no crash, no sanitizer report", it checks:
//   - CommandParser: a parsed command's wireLine parses back to the same command;
//   - ReplyParser and DataScanner: the same result read whole and read in chunks (the chunk
//     sizes are derived from the input), so no verdict depends on TCP segmentation;
//   - DataScanner: at most one .end, no content after it, bytes after it left in the buffer,
//     content is only complete CRLF lines without NUL or bare CR/LF;
//   - HeaderReader/PickupHeader: a uid is only ever found in a two-line first field;
//   - PolicyDecoder: the same requests and errors read whole and in chunks;
//   - ProxySession: the whole machine, with a relay that says yes to everything, fed the
//     input as client bytes whole and in chunks: never a crash, never an end of data to the
//     relay that the scanner did not see, never more than one close.
// The file is not main.swift: SwiftPM links libFuzzer's main (see swift-notes "libFuzzer").

import NIOCore
import ProxySession
import RestrictPolicy
import SMTPCore

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data, size > 0 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    fuzzCommands(bytes)
    fuzzReplies(bytes)
    fuzzData(bytes)
    fuzzHeaders(bytes)
    fuzzPolicy(bytes)
    fuzzSession(bytes)
    return 0
}

/// Chunk sizes from the input itself: the first byte seeds a small generator.
func chunks(_ bytes: [UInt8]) -> [ArraySlice<UInt8>] {
    var state = UInt64(bytes[0]) &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(bytes.count)
    var out: [ArraySlice<UInt8>] = []
    var i = 0
    while i < bytes.count {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        let n = Int((state >> 33) % 7) + 1
        let j = min(bytes.count, i + n)
        out.append(bytes[i..<j])
        i = j
    }
    return out
}

func fuzzCommands(_ bytes: [UInt8]) {
    var framer = LineFramer(maxLength: 512)
    var buf = ByteBuffer(bytes: bytes)
    var errors = 0
    while errors < 64 {
        let line: ByteBuffer?
        do {
            line = try framer.next(&buf)
        } catch {
            errors += 1
            continue
        }
        guard let line else { break }
        let lineBytes = Array(line.readableBytesView)
        precondition(!lineBytes.contains(13) && !lineBytes.contains(10), "framer returned CR or LF")
        for limit in [0, 1000] {
            guard let cmd = try? CommandParser.parse(lineBytes, sizeLimit: limit) else { continue }
            let again = try? CommandParser.parse(Array(cmd.wireLine.utf8), sizeLimit: limit)
            precondition(again == cmd, "wireLine does not round-trip: \(cmd)")
            if case .rcpt(let box, _) = cmd { _ = LogText.escape(box.description) }
        }
        _ = LogText.escape(lineBytes, limit: 64)
    }
}

enum ReplyOutcome: Equatable {
    case reply(SMTPReply)
    case error(ReplyError)
}

func readReplies(_ chunks: [ArraySlice<UInt8>]) -> [ReplyOutcome] {
    var parser = ReplyParser()
    var buf = ByteBuffer()
    var out: [ReplyOutcome] = []
    for chunk in chunks {
        buf.writeBytes(chunk)
        do {
            while let reply = try parser.next(&buf) {
                out.append(.reply(reply))
                _ = EHLOFilter.filter(reply, sizeLimit: 10_240_000)
                var written = ByteBuffer()
                reply.write(to: &written)
            }
        } catch {
            out.append(.error(error))
            return out  // the daemon drops a relay connection on any reply error
        }
    }
    return out
}

func fuzzReplies(_ bytes: [UInt8]) {
    let whole = readReplies([bytes[...]])
    let chunked = readReplies(chunks(bytes))
    precondition(whole == chunked, "ReplyParser depends on segmentation: \(whole) vs \(chunked)")
}

struct Scan: Equatable {
    var content: [UInt8] = []
    var marks: [String] = []
    var rest: [UInt8] = []
}

func scanData(_ chunks: [ArraySlice<UInt8>], maxLine: Int, oneLine: Bool) -> Scan {
    var scanner = DataScanner(maxLineLength: maxLine)
    var buf = ByteBuffer()
    var s = Scan()
    var ended = false
    for chunk in chunks {
        buf.writeBytes(chunk)
        while let event = scanner.next(&buf, oneLine: oneLine) {
            precondition(!ended, "event after .end")
            switch event {
            case .content(let slice):
                let v = Array(slice.readableBytesView)
                precondition(v.count >= 2 && v[v.count - 2] == 13 && v[v.count - 1] == 10, "content is not CRLF lines")
                precondition(!v.contains(0), "NUL in content")
                for (i, c) in v.enumerated() {
                    if c == 13 { precondition(i + 1 < v.count && v[i + 1] == 10, "bare CR in content") }
                    if c == 10 { precondition(i > 0 && v[i - 1] == 13, "bare LF in content") }
                }
                if oneLine { precondition(v.firstIndex(of: 10) == v.count - 1, "oneLine gave more than a line") }
                s.content += v
                s.marks.append("c\(s.content.count)")
            case .end:
                s.marks.append("end")
                ended = true
            case .violation(let v):
                precondition(!ended)
                s.marks.append("\(v)@\(s.content.count)")
            }
        }
    }
    s.rest = Array(buf.readableBytesView)
    // Content events are coalesced differently with chunking; keep only the other marks.
    s.marks = s.marks.filter { !$0.hasPrefix("c") }
    precondition(s.marks.filter { $0 == "end" }.count <= 1, "more than one .end")
    precondition(ended == scanner.isFinished)
    if ended {
        // What the scanner consumed ends in CRLF "." CRLF.
        let consumed = chunks.reduce(0) { $0 + $1.count } - s.rest.count
        let all = Array(chunks.joined())
        precondition(consumed >= 3 && Array(all[(consumed - 3)..<consumed]) == [46, 13, 10], "end is not CRLF.CRLF")
        if consumed >= 5 { precondition(Array(all[(consumed - 5)..<(consumed - 3)]) == [13, 10]) }
    }
    return s
}

func fuzzData(_ bytes: [UInt8]) {
    for maxLine in [16, 1000] {
        for oneLine in [false, true] {
            let whole = scanData([bytes[...]], maxLine: maxLine, oneLine: oneLine)
            let chunked = scanData(chunks(bytes), maxLine: maxLine, oneLine: oneLine)
            precondition(whole == chunked, "DataScanner depends on segmentation: \(whole.marks) vs \(chunked.marks)")
        }
    }
}

func fuzzHeaders(_ bytes: [UInt8]) {
    var reader = HeaderReader()
    var lines: [[UInt8]] = []
    var start = 0
    var i = 0
    while i + 1 < bytes.count {
        if bytes[i] == 13 && bytes[i + 1] == 10 {
            lines.append(Array(bytes[start..<i]))
            start = i + 2
            i += 2
        } else {
            i += 1
        }
    }
    for line in lines.prefix(200) {
        if reader.push(ByteBuffer(bytes: line).readableBytesView) == .endOfHeaders { break }
    }
    let identity = reader.identity
    if identity.uid != nil { precondition(reader.firstField.count == 2, "uid from a field that is not two lines") }
    _ = PickupHeader.identify(lines.prefix(3).map { $0 })
}

func fuzzPolicy(_ bytes: [UInt8]) {
    func run(_ parts: [ArraySlice<UInt8>]) -> [PolicyEvent] {
        var decoder = PolicyDecoder()
        var buf = ByteBuffer()
        var out: [PolicyEvent] = []
        for part in parts {
            buf.writeBytes(part)
            while let e = decoder.next(&buf) { out.append(e) }
            buf.discardReadBytes()
            precondition(buf.readableBytes <= PolicyLimits.line, "policy decoder held more than a line")
        }
        return out
    }
    precondition(run([bytes[...]]) == run(chunks(bytes)), "policy decoder depends on segmentation")
}

/// The session machine with a relay that accepts everything and a policy that relays every
/// other message and holds the rest (through a hold relay that accepts everything too).
func fuzzSession(_ bytes: [UInt8]) {
    for parts in [[bytes[...]], chunks(bytes)] {
        let limits = SMTPLimits(commandLine: 512, dataLine: 1000, headerSection: 4096, recipients: 10, messageSize: 65536)
        var machine = ProxySession(limits: limits)
        var pending = machine.relayGreeted(SMTPReply(220, "2.0.0", "fuzz"))
        var closes = 0
        var decisions = 0
        func drive(_ actions: [SessionAction]) {
            var queue = actions[...]
            var steps = 0
            while let action = queue.popFirst() {
                steps += 1
                precondition(steps < 100_000, "the machine does not settle")
                switch action {
                case .sendRelay(let buffers, let replies):
                    let last = buffers.last.map { String(buffer: $0) }
                    for i in 0..<replies {
                        // A group that ends in DATA (the hold relay's replayed envelope) gets 354 last.
                        let reply = last == ".\r\n" ? SMTPReply(250, "2.0.0", "queued")
                            : last?.hasSuffix("DATA\r\n") == true && i == replies - 1 ? SMTPReply(code: 354, lines: ["go"]) : SMTPReply(250, "2.0.0", "Ok")
                        queue.append(contentsOf: machine.relayReplied(reply))
                    }
                case .identify: queue.append(contentsOf: machine.identified(user: "u"))
                case .decide:
                    decisions += 1
                    let verdict = decisions % 2 == 0
                        ? Verdict(kind: .hold, reply: SMTPReply(451, "4.7.1", "fuzz"), reason: "fuzz", quota: nil)
                        : .relay(reason: "fuzz", quota: nil)
                    queue.append(contentsOf: machine.decided(verdict))
                case .openHoldRelay: queue.append(contentsOf: machine.holdRelayGreeted(SMTPReply(220, "2.0.0", "hold")))
                case .close: closes += 1
                case .sendClient, .rememberHello, .abortRelay, .endHoldRelay, .record, .log, .phase, .waitingForRelay: break
                }
            }
        }
        drive(pending)
        for part in parts where !machine.isClosed {
            pending = machine.clientSent(ByteBuffer(bytes: part))
            drive(pending)
        }
        drive(machine.clientClosed())
        precondition(closes <= 1, "the session closed twice")
    }
}
