// Drives the session machine with a scripted relay and policy, no sockets: a conversation is a
// list of client turns (what the client sends before it waits for an answer), and the result
// is everything the machine made its driver do. The relay and the policy answer at once.

import NIOCore
import ProxySession
import RestrictPolicy
import SMTPCore

struct Transcript: Equatable {
    var client = ""
    var relay = ""
    var records: [MessageRecord] = []
    var logs: [String] = []
    var aborts = 0
    var closed: Bool? = nil
    var decisions: [[String]] = []
    /// What the hold relay received, and how each hold connection ended (true: aborted).
    var holdRelay = ""
    var holdEnds: [Bool] = []
    var onHold = false
}

enum Chunking: CaseIterable { case whole, bytes, random }

/// What the scripted relay says: by default 250 to everything, 354 to DATA, a queue id at the end.
struct ScriptedRelay {
    var greeting = SMTPReply(220, "2.0.0", "relay.test ESMTP")
    var rcpt: (String) -> SMTPReply = { _ in SMTPReply(250, "2.1.5", "Ok") }
    var data = SMTPReply(code: 354, lines: ["End data with <CR><LF>.<CR><LF>"])
    var end = SMTPReply(250, "2.0.0", "Ok: queued as Q1")
    /// Fail (connection lost) when the relay receives bytes containing this.
    var failOn: String? = nil

    func replies(to buffers: [String], count: Int) -> [SMTPReply]? {
        let bytes = buffers.joined()
        if let failOn, bytes.contains(failOn) { return nil }
        if count == 0 { return [] }
        // The end of data travels as a buffer of its own, last.
        if buffers.last == ".\r\n" { return [self.end] }
        return bytes.split(separator: "\r\n", omittingEmptySubsequences: true).prefix(count).map { line in
            if line.hasPrefix("EHLO") {
                return SMTPReply(code: 250, lines: ["relay.test", "PIPELINING", "SIZE 10240000", "STARTTLS", "8BITMIME", "ENHANCEDSTATUSCODES"])
            }
            if line.hasPrefix("HELO") { return SMTPReply(code: 250, lines: ["relay.test"]) }
            if line.hasPrefix("RCPT") { return self.rcpt(String(line)) }
            if line == "DATA" { return self.data }
            if line == "RSET" { return SMTPReply(250, "2.0.0", "Ok") }
            return SMTPReply(250, "2.1.0", "Ok")
        }
    }
}

struct Harness {
    var limits = SMTPLimits(commandLine: 512, dataLine: 1000, headerSection: 2048, recipients: 5, messageSize: 100_000)
    var relay = ScriptedRelay()
    var verdict: ([String]) -> Verdict = { _ in .relay(reason: "allowed", quota: nil) }
    /// The hold relay; nil: it cannot be reached.
    var hold: ScriptedRelay? = ScriptedRelay(end: SMTPReply(250, "2.0.0", "Ok: queued as H1"))

    /// Runs `turns`, each split as `chunking` says; `closeAtEnd`: the client closes after.
    func run(_ turns: [String], chunking: Chunking, closeAtEnd: Bool = false, seed: UInt64 = 1) -> Transcript {
        var machine = ProxySession(limits: self.limits)
        var out = Transcript()
        var rng = SplitMix(seed: seed)
        self.perform(machine.relayGreeted(self.relay.greeting), &machine, &out)
        for turn in turns {
            for chunk in Self.split(Array(turn.utf8), chunking, &rng) {
                if out.closed != nil { break }
                self.perform(machine.clientSent(ByteBuffer(bytes: chunk)), &machine, &out)
            }
        }
        if closeAtEnd, out.closed == nil { self.perform(machine.clientClosed(), &machine, &out) }
        return out
    }

    func perform(_ actions: [SessionAction], _ machine: inout ProxySession, _ out: inout Transcript) {
        var queue = actions[...]
        while let action = queue.popFirst() {
            switch action {
            case .sendClient(let b): out.client += String(buffer: b)
            case .sendRelay(let buffers, let count):
                let texts = buffers.map { String(buffer: $0) }
                let script = out.onHold ? (self.hold ?? self.relay) : self.relay
                if out.onHold { out.holdRelay += texts.joined() } else { out.relay += texts.joined() }
                guard let replies = script.replies(to: texts, count: count) else {
                    queue.append(contentsOf: machine.relayFailed("relay closed the connection"))
                    continue
                }
                for r in replies { queue.append(contentsOf: machine.relayReplied(r)) }
            case .rememberHello: break
            case .identify(let uid): queue.append(contentsOf: machine.identified(user: uid == 33 ? "www-data" : "root"))
            case .decide(_, let recipients, _):
                out.decisions.append(recipients)
                queue.append(contentsOf: machine.decided(self.verdict(recipients)))
            case .abortRelay: out.aborts += 1
            case .openHoldRelay:
                guard let hold = self.hold else {
                    queue.append(contentsOf: machine.holdRelayUnavailable("connection refused"))
                    continue
                }
                out.onHold = true
                queue.append(contentsOf: machine.holdRelayGreeted(hold.greeting))
            case .endHoldRelay(let abort):
                out.onHold = false
                out.holdEnds.append(abort)
            case .record(let r): out.records.append(r)
            case .log(let level, let text): out.logs.append("\(level): \(text)")
            case .phase, .waitingForRelay: break
            case .close(let reusable): out.closed = reusable
            }
        }
    }

    static func split(_ bytes: [UInt8], _ chunking: Chunking, _ rng: inout SplitMix) -> [[UInt8]] {
        switch chunking {
        case .whole: return [bytes]
        case .bytes: return bytes.map { [$0] }
        case .random:
            var chunks: [[UInt8]] = []
            var i = 0
            while i < bytes.count {
                let n = Int(rng.next() % 37) + 1
                chunks.append(Array(bytes[i..<min(bytes.count, i + n)]))
                i += n
            }
            return chunks
        }
    }

    /// The same transcript whole, byte by byte and in random chunks (several seeds). Once the
    /// relay connection was aborted, how much of the message had reached it depends on how the
    /// bytes came (and the relay discards it): that part is not compared.
    func runAll(_ turns: [String], closeAtEnd: Bool = false) -> Transcript? {
        let whole = Self.normalized(self.run(turns, chunking: .whole, closeAtEnd: closeAtEnd))
        for chunking in [Chunking.bytes, .random] {
            for seed in UInt64(1)...(chunking == .random ? 8 : 1) {
                let other = Self.normalized(self.run(turns, chunking: chunking, closeAtEnd: closeAtEnd, seed: seed))
                guard other == whole else { return nil }
            }
        }
        return whole
    }

    static func normalized(_ t: Transcript) -> Transcript {
        var n = t
        if t.aborts > 0, let data = t.relay.firstRange(of: "\r\nDATA\r\n") {
            n.relay = String(t.relay[..<data.upperBound])
        }
        // Likewise a hold relay connection dropped mid-message.
        if t.holdEnds.contains(true), let data = t.holdRelay.firstRange(of: "\r\nDATA\r\n") {
            n.holdRelay = String(t.holdRelay[..<data.upperBound])
        }
        return n
    }
}

struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { self.state = seed }
    mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A message as pickup writes it for `uid`.
func message(uid: Int = 0, body: String = "hello\r\n") -> String {
    "Received: by lab.localdomain (Postfix, from userid \(uid))\r\n\tid 4ABC123; Thu, 27 Nov 2026 09:13:34 +0100 (CET)\r\n"
        + "From: someone@lab.localdomain\r\nSubject: test\r\n\r\n" + body + ".\r\n"
}

let envelope = ["EHLO client.test\r\n", "MAIL FROM:<a@lab.localdomain>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"]
