// The header section of a message and the sender UID in its first field.
//
// Postfix's pickup(8) prepends exactly (src/pickup/pickup.c):
//     Received: by MYHOSTNAME (MAIL_NAME, from userid UID)
//     <TAB>id QUEUEID; DATE
// Only that first field is trusted: anything below it was written by the submitter
// (design decision 1). myhostname and mail_name are site settings, so the structure is
// matched, not the words. Limits: the first field is read from the bounded header section.

public import NIOCore

/// Who sent a message, as far as the first header tells.
public enum SenderIdentity: Sendable, Equatable {
    case pickup(uid: UInt32, queueID: String, host: String, mailName: String)
    /// The first header is not pickup's; the reason says what was there instead.
    case unidentified(reason: String)

    public var uid: UInt32? {
        if case .pickup(let uid, _, _, _) = self { return uid }
        return nil
    }

    public var queueID: String? {
        if case .pickup(_, let id, _, _) = self { return id }
        return nil
    }
}

/// Pushes header lines in, says when the header section has ended, and keeps its first field.
public struct HeaderReader: Sendable {
    public enum Event: Sendable, Equatable {
        /// The line belongs to the header section.
        case header
        /// This line ended the header section (the empty line, or a line that is no header
        /// field); it is the first line of the body part of the message.
        case endOfHeaders
    }

    public private(set) var firstField: [[UInt8]] = []
    private var firstFieldDone = false
    public private(set) var lineCount = 0

    public init() {}

    /// Push one line without its CRLF. The caller bounds the section's total size.
    public mutating func push(_ line: ByteBufferView) -> Event {
        let isContinuation = line.first == 32 || line.first == 9
        let isFieldStart = !isContinuation && Self.looksLikeFieldStart(line)
        if line.isEmpty || (!isContinuation && !isFieldStart) || (isContinuation && self.lineCount == 0) {
            self.firstFieldDone = true
            return .endOfHeaders
        }
        self.lineCount += 1
        if !self.firstFieldDone {
            if self.lineCount == 1 || isContinuation {
                // The first field is at most a few lines; more is not pickup's and not needed.
                if self.firstField.count < 4 { self.firstField.append(Array(line)) }
            } else {
                self.firstFieldDone = true
            }
        }
        return .header
    }

    public var identity: SenderIdentity { PickupHeader.identify(self.firstField) }

    /// field-name ":" with field-name = 1*ftext (printable US-ASCII except ":") (RFC 5322 3.6.8).
    static func looksLikeFieldStart(_ line: ByteBufferView) -> Bool {
        var n = 0
        for c in line {
            if c == UInt8(ascii: ":") { return n > 0 }
            guard c >= 33, c <= 126 else { return false }
            n += 1
            if n > 256 { return false }
        }
        return false
    }
}

public enum PickupHeader {
    /// Reads the first header field, given as its physical lines without CRLF.
    public static func identify(_ lines: [[UInt8]]) -> SenderIdentity {
        guard let first = lines.first else { return .unidentified(reason: "no header") }
        let prefix = Array("Received: by ".utf8)
        guard first.count > prefix.count, Array(first.prefix(prefix.count)) == prefix else {
            return .unidentified(reason: "first header is not pickup's Received")
        }
        guard lines.count == 2 else {
            return .unidentified(reason: lines.count == 1 ? "first Received is not folded as pickup's" : "first Received has \(lines.count) lines")
        }
        // HOST ends at the first space; it cannot contain one.
        let rest = first[prefix.count...]
        guard let space = rest.firstIndex(of: 32) else { return .unidentified(reason: "malformed Received") }
        let host = rest[rest.startIndex..<space]
        guard !host.isEmpty, host.allSatisfy({ $0 > 32 && $0 < 127 }) else {
            return .unidentified(reason: "malformed Received host")
        }
        let comment = first[(space + 1)...]
        let tail = Array(", from userid ".utf8)
        guard comment.first == UInt8(ascii: "("), comment.last == UInt8(ascii: ")") else {
            return .unidentified(reason: "malformed Received comment")
        }
        let inner = Array(comment.dropFirst().dropLast())
        // The uid is the last ", from userid N" in the comment; MAIL_NAME is what precedes it.
        guard let at = lastIndex(of: tail, in: inner) else {
            return .unidentified(reason: "first Received has no userid")
        }
        let mailName = inner[0..<at]
        let digits = inner[(at + tail.count)...]
        guard !mailName.isEmpty, !mailName.contains(UInt8(ascii: "(")), !mailName.contains(UInt8(ascii: ")")),
            mailName.allSatisfy({ $0 >= 32 && $0 < 127 })
        else { return .unidentified(reason: "malformed mail_name") }
        guard !digits.isEmpty, digits.count <= 10, digits.allSatisfy({ $0 >= 48 && $0 <= 57 }),
            digits.count == 1 || digits.first != 48,
            let value = UInt64(String(decoding: digits, as: UTF8.self)), value < UInt64(UInt32.max)
        else { return .unidentified(reason: "malformed userid") }

        // Second line: TAB "id " QUEUEID "; " DATE
        let second = lines[1]
        let idPrefix = Array("\tid ".utf8)
        guard second.count > idPrefix.count, Array(second.prefix(idPrefix.count)) == idPrefix,
            let semi = second.firstIndex(of: UInt8(ascii: ";"))
        else { return .unidentified(reason: "first Received has no queue id") }
        let queueID = second[idPrefix.count..<semi]
        guard !queueID.isEmpty, queueID.count <= 64,
            queueID.allSatisfy({ ($0 >= 48 && $0 <= 57) || ($0 >= 65 && $0 <= 90) || ($0 >= 97 && $0 <= 122) })
        else { return .unidentified(reason: "malformed queue id") }
        guard semi + 2 < second.count, second[semi + 1] == 32 else {
            return .unidentified(reason: "first Received has no date")
        }
        return .pickup(
            uid: UInt32(value),
            queueID: String(decoding: queueID, as: UTF8.self),
            host: String(decoding: host, as: UTF8.self),
            mailName: String(decoding: mailName, as: UTF8.self)
        )
    }

    private static func lastIndex(of needle: [UInt8], in hay: [UInt8]) -> Int? {
        guard hay.count >= needle.count else { return nil }
        var i = hay.count - needle.count
        while i >= 0 {
            if hay[i..<(i + needle.count)].elementsEqual(needle) { return i }
            i -= 1
        }
        return nil
    }
}
