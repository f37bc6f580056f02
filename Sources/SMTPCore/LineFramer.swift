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
        let view = buffer.readableBytesView
        guard let lf = view.firstIndex(of: UInt8(ascii: "\n")) else {
            if view.count >= self.maxLength {
                buffer.moveReaderIndex(forwardBy: view.count)
                self.skipping = true
                throw .tooLong(limit: self.maxLength)
            }
            // A CR that is not the last byte seen so far can no longer be followed by LF.
            if let cr = view.firstIndex(of: UInt8(ascii: "\r")), cr != view.endIndex - 1 {
                buffer.moveReaderIndex(to: cr + 1)
                throw .bareCR
            }
            return nil
        }
        let start = view.startIndex
        let length = lf - start + 1
        if length > self.maxLength {
            buffer.moveReaderIndex(to: lf + 1)
            throw .tooLong(limit: self.maxLength)
        }
        guard lf > start, view[lf - 1] == UInt8(ascii: "\r") else {
            buffer.moveReaderIndex(to: lf + 1)
            throw .bareLF
        }
        if let cr = view[start..<(lf - 1)].firstIndex(of: UInt8(ascii: "\r")) {
            buffer.moveReaderIndex(to: cr + 1)
            throw .bareCR
        }
        let line = buffer.getSlice(at: start, length: length - 2)
        buffer.moveReaderIndex(to: lf + 1)
        return line
    }
}
