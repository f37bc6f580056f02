// Strict CRLF line framing for SMTP commands and replies.
// Trusts nothing: a bare LF, a bare CR or a line over the limit is an error, never a line.
// Holds no bytes of its own; the caller's buffer is the only storage, and its reader index
// moves only past what was consumed.

public import NIOCore

public enum LineError: Error, Equatable, Sendable {
    /// A line longer than the limit (CRLF included). The framer skips up to the next LF.
    case tooLong(limit: Int)
    /// An LF not preceded by CR.
    case bareLF
    /// A CR not followed by LF.
    case bareCR
}

public struct LineFramer: Sendable {
    public let maxLength: Int
    /// Set after `tooLong`: the rest of that line is dropped as it arrives.
    public private(set) var skipping = false

    public init(maxLength: Int) {
        precondition(maxLength >= 3)
        self.maxLength = maxLength
    }

    /// The next complete line without its CRLF, or nil when more bytes are needed.
    /// Consumes the line (or, while skipping, the bytes skipped) from `buffer`.
    public mutating func next(_ buffer: inout ByteBuffer) throws(LineError) -> ByteBuffer? {
        if self.skipping {
            guard let lf = buffer.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) else {
                buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
                return nil
            }
            buffer.moveReaderIndex(to: lf + 1)
            self.skipping = false
        }
        // The error reported is always that of the earliest offending byte, so that it does not
        // depend on how the bytes were segmented. Only the first `maxLength` bytes are examined.
        let view = buffer.readableBytesView
        let start = view.startIndex
        let windowEnd = start + min(view.count, self.maxLength)
        guard let lf = view[start..<windowEnd].firstIndex(of: UInt8(ascii: "\n")) else {
            // A CR before the window's last byte is followed by something other than LF.
            if windowEnd - start > 1, let cr = view[start..<(windowEnd - 1)].firstIndex(of: UInt8(ascii: "\r")) {
                buffer.moveReaderIndex(to: cr + 1)
                throw .bareCR
            }
            if view.count >= self.maxLength {
                // No LF within the limit: the line is too long. Drop it up to its LF.
                buffer.moveReaderIndex(to: windowEnd)
                self.skipping = true
                throw .tooLong(limit: self.maxLength)
            }
            return nil
        }
        let crlf = lf > start && view[lf - 1] == UInt8(ascii: "\r")
        if let cr = view[start..<(crlf ? lf - 1 : lf)].firstIndex(of: UInt8(ascii: "\r")) {
            buffer.moveReaderIndex(to: cr + 1)
            throw .bareCR
        }
        guard crlf else {
            buffer.moveReaderIndex(to: lf + 1)
            throw .bareLF
        }
        let line = buffer.getSlice(at: start, length: lf - 1 - start)
        buffer.moveReaderIndex(to: lf + 1)
        return line
    }
}
