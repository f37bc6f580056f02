// Postfix's SMTPD access policy delegation protocol (SMTPD_POLICY_README), the server's side:
// a request is "name=value" lines ended by LF, then an empty line; the answer is one
// "action=..." line and an empty line. Many requests follow each other on one connection.
//
// Trusts nothing: the peer is checked to be Postfix before a byte is read, but a request is
// still parsed as hostile. A line, the number of attributes and the whole request are
// bounded; a bad request is an error the caller answers (DEFER) and the decoder then skips
// to the request's empty line, so one bad request never poisons the next. Holds no bytes of
// its own beyond the attributes of the request in progress.

public import NIOCore

/// The bounds of one request. Postfix 3.7 sends about 35 attributes; the longest values it
/// can send are names bounded by its own line_length_limit (2048), so 4 KiB a line leaves room.
public enum PolicyLimits {
    /// One "name=value" line, LF included.
    public static let line = 4096
    /// Attributes in one request.
    public static let attributes = 128
    /// All the lines of one request together.
    public static let request = 64 * 1024
}

public enum PolicyRequestError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A line longer than `PolicyLimits.line`.
    case lineTooLong
    /// More than `PolicyLimits.attributes` attributes.
    case tooManyAttributes
    /// More than `PolicyLimits.request` bytes.
    case requestTooLarge
    /// A line without "=", with an empty or odd name, or with a NUL byte.
    case malformedLine(String)
    /// The same attribute twice in one request.
    case duplicate(String)

    public var description: String {
        switch self {
        case .lineTooLong: return "attribute line longer than \(PolicyLimits.line) bytes"
        case .tooManyAttributes: return "more than \(PolicyLimits.attributes) attributes"
        case .requestTooLarge: return "request larger than \(PolicyLimits.request) bytes"
        case .malformedLine(let l): return "malformed attribute line \"\(LogText.escape(l, limit: 64))\""
        case .duplicate(let n): return "attribute \(LogText.escape(n, limit: 64)) given twice"
        }
    }
}

/// One complete request: its attributes by name.
public struct PolicyRequest: Sendable, Equatable {
    public var attributes: [String: String]

    public init(_ attributes: [String: String]) { self.attributes = attributes }

    public subscript(_ name: String) -> String? { self.attributes[name] }
}

public enum PolicyEvent: Sendable, Equatable {
    case request(PolicyRequest)
    /// A request that broke a rule; its remaining lines, up to its empty line, are skipped.
    case invalid(PolicyRequestError)
}

public struct PolicyDecoder: Sendable {
    private var attributes: [String: String] = [:]
    private var size = 0
    /// Set after an error: lines are dropped until the request's empty line.
    private var skipping = false
    /// Set after an over-long line: bytes are dropped until its LF.
    private var skippingLine = false

    public init() {}

    /// The next complete request or error, or nil when more bytes are needed. Consumes what
    /// it has read from `buffer`; "need more" leaves a partial line in place.
    public mutating func next(_ buffer: inout ByteBuffer) -> PolicyEvent? {
        while true {
            let view = buffer.readableBytesView
            if self.skippingLine {
                guard let lf = view.firstIndex(of: UInt8(ascii: "\n")) else {
                    buffer.moveReaderIndex(forwardBy: view.count)
                    return nil
                }
                buffer.moveReaderIndex(to: lf + 1)
                self.skippingLine = false
                continue
            }
            let window = view.prefix(PolicyLimits.line)
            guard let lf = window.firstIndex(of: UInt8(ascii: "\n")) else {
                guard view.count >= PolicyLimits.line else { return nil }
                // Drop the window only: the line's LF, and whatever follows, may be after it.
                buffer.moveReaderIndex(forwardBy: PolicyLimits.line)
                self.skippingLine = true
                // A request already answered as bad gets no second answer.
                if self.skipping { continue }
                return self.fail(.lineTooLong)
            }
            var end = lf
            // Postfix writes LF; a CR before it is tolerated and dropped.
            if end > view.startIndex, view[end - 1] == UInt8(ascii: "\r") { end -= 1 }
            let line = view[view.startIndex..<end]
            buffer.moveReaderIndex(to: lf + 1)
            if line.isEmpty {
                if self.skipping {
                    self.skipping = false
                    continue
                }
                let request = PolicyRequest(self.attributes)
                self.reset()
                // Stray empty lines between requests are not requests.
                if request.attributes.isEmpty { continue }
                return .request(request)
            }
            if self.skipping { continue }
            self.size += line.count + 1
            if self.size > PolicyLimits.request { return self.fail(.requestTooLarge) }
            if self.attributes.count >= PolicyLimits.attributes { return self.fail(.tooManyAttributes) }
            guard let eq = line.firstIndex(of: UInt8(ascii: "=")), !line.contains(0) else {
                return self.fail(.malformedLine(String(decoding: line, as: UTF8.self)))
            }
            let name = line[line.startIndex..<eq]
            guard !name.isEmpty, name.allSatisfy(Self.isNameByte) else {
                return self.fail(.malformedLine(String(decoding: line, as: UTF8.self)))
            }
            let key = String(decoding: name, as: UTF8.self)
            guard self.attributes[key] == nil else { return self.fail(.duplicate(key)) }
            self.attributes[key] = String(decoding: line[(eq + 1)...], as: UTF8.self)
        }
    }

    /// Attribute names are lower-case words: "client_address", "protocol_state".
    static func isNameByte(_ b: UInt8) -> Bool {
        (b >= UInt8(ascii: "a") && b <= UInt8(ascii: "z")) || (b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9"))
            || b == UInt8(ascii: "_") || (b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z"))
    }

    private mutating func fail(_ error: PolicyRequestError) -> PolicyEvent {
        self.reset()
        self.skipping = true
        return .invalid(error)
    }

    private mutating func reset() {
        self.attributes = [:]
        self.size = 0
    }
}

/// The answer to one request, as Postfix's access(5) table actions.
public enum PolicyAction: Sendable, Equatable, CustomStringConvertible {
    /// No opinion: Postfix goes on with its own restrictions.
    case dunno
    /// "550 5.7.1 text" and the like: a reply with its own code (permanent or temporary).
    case reply(SMTPReply)
    /// "DEFER_IF_PERMIT 4.7.1 text": temporary, unless a later restriction rejects anyway.
    case deferIfPermit(enhanced: String, text: String)
    /// "DEFER 4.3.0 text": temporary, at once.
    case `defer`(enhanced: String, text: String)
    /// "HOLD 4.7.1 text": Postfix accepts the message and puts it on its hold queue.
    case hold(enhanced: String, text: String)

    /// The action's text: what follows "action=". Newlines in texts are replaced, since one
    /// would end the answer early.
    public var description: String {
        switch self {
        case .dunno: return "DUNNO"
        case .reply(let r): return "\(r.code) \(Self.flat(r.lines[0]))"
        case .deferIfPermit(let e, let t): return "DEFER_IF_PERMIT \(e) \(Self.flat(t))"
        case .defer(let e, let t): return "DEFER \(e) \(Self.flat(t))"
        case .hold(let e, let t): return "HOLD \(e) \(Self.flat(t))"
        }
    }

    /// The whole answer on the wire.
    public func write(to buffer: inout ByteBuffer) {
        buffer.writeString("action=")
        buffer.writeString(self.description)
        buffer.writeString("\n\n")
    }

    private static func flat(_ text: String) -> String {
        String(text.map { $0 == "\n" || $0 == "\r" || $0 == "\0" ? " " : $0 }.prefix(512))
    }
}
