// SMTP replies (RFC 5321 4.2) with enhanced status codes (RFC 3463).
// Replies come from two places: restrictpd itself, and the relay (Postfix's smtpd on 10026),
// which is trusted to speak SMTP but is still read with bounded lines and a bounded count.

public import NIOCore

public struct SMTPReply: Sendable, Equatable, CustomStringConvertible {
    public let code: Int
    /// The text of each line, without the code and separator.
    public let lines: [String]

    public init(code: Int, lines: [String]) {
        precondition((200...599).contains(code))
        self.code = code
        self.lines = lines.isEmpty ? [""] : lines
    }

    /// A one-line reply "code enhanced text".
    public init(_ code: Int, _ enhanced: String, _ text: String) {
        self.init(code: code, lines: ["\(enhanced) \(text)"])
    }

    public var isPositive: Bool { (200...399).contains(self.code) }
    public var isTransient: Bool { (400...499).contains(self.code) }
    public var isPermanent: Bool { (500...599).contains(self.code) }

    /// The enhanced status code at the start of the first line, if there is one.
    public var enhancedCode: String? {
        let first = self.lines[0]
        guard let word = first.split(separator: " ", maxSplits: 1).first else { return nil }
        let parts = word.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, parts.allSatisfy({ !$0.isEmpty && $0.count <= 3 && $0.allSatisfy(\.isASCIIDigit) }),
            let cls = parts.first, cls == "2" || cls == "4" || cls == "5"
        else { return nil }
        return String(word)
    }

    /// All lines joined by " / ", for logs.
    public var description: String {
        self.lines.map { "\(self.code) \($0)" }.joined(separator: " / ")
    }

    public func write(to buffer: inout ByteBuffer) {
        for (i, line) in self.lines.enumerated() {
            buffer.writeString(String(self.code))
            buffer.writeStaticString(i == self.lines.count - 1 ? " " : "-")
            buffer.writeString(line)
            buffer.writeStaticString("\r\n")
        }
    }
}

public enum ReplyError: Error, Sendable, Equatable {
    case framing(LineError)
    case malformed(String)
    case tooManyLines
}

/// Reads replies from the relay: push bytes in, pull complete replies out.
public struct ReplyParser: Sendable {
    private var framer = LineFramer(maxLength: SMTPLimits.replyLine)
    private var pendingCode: Int? = nil
    private var pendingLines: [String] = []

    public init() {}

    /// The next complete reply, or nil if more bytes are needed.
    public mutating func next(_ buffer: inout ByteBuffer) throws(ReplyError) -> SMTPReply? {
        while true {
            let line: ByteBuffer?
            do {
                line = try self.framer.next(&buffer)
            } catch {
                throw .framing(error)
            }
            guard let line else { return nil }
            let bytes = line.readableBytesView
            guard bytes.count >= 3 else { throw .malformed("short reply line") }
            let d = Array(bytes.prefix(3))
            guard (UInt8(ascii: "2")...UInt8(ascii: "5")).contains(d[0]),
                (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(d[1]),
                (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(d[2])
            else { throw .malformed("bad reply code") }
            let code = Int(d[0] - 48) * 100 + Int(d[1] - 48) * 10 + Int(d[2] - 48)
            let sep: UInt8? = bytes.count > 3 ? bytes[bytes.startIndex + 3] : nil
            guard sep == nil || sep == UInt8(ascii: " ") || sep == UInt8(ascii: "-") else {
                throw .malformed("bad separator")
            }
            if let pendingCode, pendingCode != code { throw .malformed("code changed within a reply") }
            let text = String(decoding: bytes.dropFirst(4), as: UTF8.self)
            self.pendingLines.append(text)
            guard self.pendingLines.count <= SMTPLimits.replyLines else { throw .tooManyLines }
            if sep == UInt8(ascii: "-") {
                self.pendingCode = code
                continue
            }
            let reply = SMTPReply(code: code, lines: self.pendingLines)
            self.pendingCode = nil
            self.pendingLines = []
            return reply
        }
    }
}

/// Filters the relay's EHLO reply down to what restrictpd implements (design decision 6).
public enum EHLOFilter {
    public static let offered: Set<String> = ["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"]

    /// `sizeLimit` 0 means restrictpd sets no limit of its own.
    public static func filter(_ reply: SMTPReply, sizeLimit: Int) -> SMTPReply {
        guard reply.code == 250 else { return reply }
        var out = [reply.lines[0]]
        var seen = Set<String>()
        for line in reply.lines.dropFirst() {
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let keyword = words.first?.uppercased(), offered.contains(keyword), seen.insert(keyword).inserted else { continue }
            if keyword == "SIZE" {
                let relayLimit = words.count > 1 ? Int(words[1]) ?? 0 : 0
                let limit: Int
                switch (relayLimit, sizeLimit) {
                case (0, let ours): limit = ours
                case (let theirs, 0): limit = theirs
                case (let theirs, let ours): limit = min(theirs, ours)
                }
                out.append(limit > 0 ? "SIZE \(limit)" : "SIZE")
            } else {
                out.append(keyword)
            }
        }
        return SMTPReply(code: 250, lines: out)
    }
}
