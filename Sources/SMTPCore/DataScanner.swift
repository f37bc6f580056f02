// The DATA stream of RFC 5321 4.1.1.4 and 4.5.2, read strictly (design decision 8).
//
// Trusts nothing. Accepts only CRLF-terminated lines without NUL, each at most `maxLineLength`
// octets; the end of data is exactly CRLF "." CRLF. Everything else is a violation, after which
// the scanner drops input up to that exact end of data, so that what follows is read as commands
// again and nothing inside a refused message is ever mistaken for one ("SMTP smuggling").
//
// Output is the canonical encoding of the message: every line ends in CRLF and every line that
// starts with "." is stuffed. For canonical input that encoding is byte-identical to the input,
// so `content` events are slices of the input, not copies; the only line that differs (a
// leading "." that is not doubled, which RFC 5321 4.5.2 says to remove) is emitted without it.
// Holds no bytes itself: an incomplete line stays in the caller's buffer.

public import NIOCore

public enum DataViolation: Error, Sendable, Equatable {
    case bareLF
    case bareCR
    case nul
    case lineTooLong(limit: Int)

    /// 550 5.6.0 for every violation (design's reply table).
    public var reply: SMTPReply {
        switch self {
        case .bareLF: return Replies.bareLFInData
        case .bareCR: return Replies.bareCRInData
        case .nul: return Replies.nulInData
        case .lineTooLong(let limit): return Replies.longLineInData(limit)
        }
    }

    public var logName: String {
        switch self {
        case .bareLF: return "bare LF"
        case .bareCR: return "bare CR"
        case .nul: return "NUL"
        case .lineTooLong: return "line too long"
        }
    }
}

public enum DataEvent: Sendable, Equatable {
    /// Canonical message bytes: one or more complete lines, CRLF included, stuffed.
    case content(ByteBuffer)
    /// The end of data was consumed. The scanner is finished.
    case end
    /// The message is broken; the scanner now drops input until the end of data, then `.end`.
    case violation(DataViolation)
}

public struct DataScanner: Sendable {
    public let maxLineLength: Int
    private enum State: Sendable {
        case lines
        /// Dropping input; `match` counts how much of CRLF "." CRLF has been seen, where the
        /// stream started at a line start (so the first CRLF counts as seen).
        case discarding(match: Int)
        case finished
    }
    private var state: State = .lines
    /// Bytes of the incomplete line at the buffer's reader index already found clean, so that a
    /// line dripped in byte by byte is not scanned again from its start on every read.
    private var checked = 0

    public init(maxLineLength: Int) {
        precondition(maxLineLength >= 3)
        self.maxLineLength = maxLineLength
    }

    public var isFinished: Bool {
        if case .finished = self.state { return true }
        return false
    }

    public var isDiscarding: Bool {
        if case .discarding = self.state { return true }
        return false
    }

    /// Stops producing content: drop everything up to the end of data. Called by the session
    /// when the message is refused or over a limit. Only valid between events (at a line start).
    public mutating func discardRest() {
        if case .lines = self.state { self.state = .discarding(match: 2) }
    }

    /// The next event, or nil when `buffer` holds no complete line (and no violation) yet.
    /// With `oneLine`, a content event holds exactly one line (used for the header section).
    public mutating func next(_ buffer: inout ByteBuffer, oneLine: Bool = false) -> DataEvent? {
        switch self.state {
        case .finished:
            return nil
        case .discarding(let match):
            return self.discard(&buffer, match: match)
        case .lines:
            return self.scanLines(&buffer, oneLine: oneLine)
        }
    }

    private mutating func discard(_ buffer: inout ByteBuffer, match: Int) -> DataEvent? {
        // CR LF . CR LF, as positions 0...4; `match` bytes of it have been seen.
        let pattern: [UInt8] = [13, 10, 46, 13, 10]
        var m = match
        var consumed = 0
        let found: Bool = buffer.withUnsafeReadableBytes { raw in
            for byte in raw {
                consumed += 1
                if byte == pattern[m] {
                    m += 1
                    if m == pattern.count { return true }
                } else {
                    m = byte == 13 ? 1 : 0
                }
            }
            return false
        }
        buffer.moveReaderIndex(forwardBy: consumed)
        if found {
            self.state = .finished
            return .end
        }
        self.state = .discarding(match: m)
        return nil
    }

    private mutating func violation(_ v: DataViolation, _ buffer: inout ByteBuffer, at index: Int) -> DataEvent {
        // Resume the search for the end of data just after the offending byte. A bare LF there
        // is not a line start: only the exact CRLF "." CRLF ends the data.
        buffer.moveReaderIndex(to: index)
        self.state = .discarding(match: 0)
        return .violation(v)
    }

    private mutating func scanLines(_ buffer: inout ByteBuffer, oneLine: Bool) -> DataEvent? {
        let maxLine = self.maxLineLength

        // One pass over the bytes: most are above CR and cost one comparison.
        let resume = self.checked
        let (consumed, stop, checked): (Int, Stop, Int) = buffer.withUnsafeReadableBytes { raw in
            let count = raw.count
            var p = 0  // start of the line under examination
            while p < count {
                let limit = min(count, p + maxLine)
                var i = p == 0 ? min(resume, count) : p
                var lf = -1
                while i < limit {
                    let c = raw[i]
                    if c <= 13 {
                        if c == 13 {
                            if i + 1 < count {
                                guard raw[i + 1] == 10 else { return (p, .violation(.bareCR, i + 1), 0) }
                                if i + 1 >= p + maxLine { return (p, .violation(.lineTooLong(limit: maxLine), p + 1), 0) }
                                lf = i + 1
                                break
                            }
                            // A CR as the last byte so far: its LF may be in the next read.
                            return (p, .needMore, i - p)
                        }
                        if c == 10 { return (p, .violation(.bareLF, i + 1), 0) }
                        if c == 0 { return (p, .violation(.nul, i + 1), 0) }
                    }
                    i += 1
                }
                guard lf >= 0 else {
                    if count - p >= maxLine { return (p, .violation(.lineTooLong(limit: maxLine), p + 1), 0) }
                    return (p, .needMore, i - p)
                }
                if raw[p] == 46 {  // "."
                    if lf == p + 2 { return (p, .endOfData, 0) }  // ".\r\n"
                    if raw[p + 1] != 46 { return (p, .singleDot, 0) }  // ".x": not stuffed
                }
                p = lf + 1
                if oneLine { return (p, .needMore, 0) }
            }
            return (p, .needMore, 0)
        }
        self.checked = checked
        return self.event(consumed: consumed, stop: stop, &buffer)
    }

    enum Stop { case needMore, endOfData, singleDot, violation(DataViolation, Int) }

    /// The event for one scan: the complete canonical lines first; whatever stopped the scan is
    /// seen on the next call.
    private mutating func event(consumed: Int, stop: Stop, _ buffer: inout ByteBuffer) -> DataEvent? {
        if consumed > 0 {
            guard let slice = buffer.readSlice(length: consumed) else { preconditionFailure("scanned past the buffer") }
            return .content(slice)
        }
        let start = buffer.readerIndex
        switch stop {
        case .needMore:
            return nil
        case .endOfData:
            buffer.moveReaderIndex(forwardBy: 3)
            self.state = .finished
            return .end
        case .singleDot:
            guard let lf = buffer.readableBytesView.firstIndex(of: 10),
                let slice = buffer.getSlice(at: start + 1, length: lf - start)
            else { preconditionFailure("single-dot line without its LF") }
            buffer.moveReaderIndex(to: lf + 1)
            return .content(slice)
        case .violation(let v, let resumeAt):
            return self.violation(v, &buffer, at: start + resumeAt)
        }
    }
}
