// SMTP commands from an untrusted client (RFC 5321 4.1, ESMTP parameters of RFC 1870, 6152,
// 3461, 6531). A command line has already been framed (CRLF removed, length bounded).
// What restrictpd does not implement is recognised so that it gets 502, never relayed.

public struct ESMTPParameter: Sendable, Equatable {
    /// Upper-cased keyword.
    public let keyword: String
    public let value: String?

    public init(keyword: String, value: String?) {
        self.keyword = keyword
        self.value = value
    }

    var encoded: String { self.value.map { "\(self.keyword)=\($0)" } ?? self.keyword }
}

public enum SMTPCommand: Sendable, Equatable {
    case ehlo(String)
    case helo(String)
    /// reversePath nil is the null sender "<>".
    case mail(reversePath: Mailbox?, parameters: [ESMTPParameter])
    case rcpt(forwardPath: Mailbox, parameters: [ESMTPParameter])
    case data
    case rset
    case noop
    case quit
    /// A command restrictpd knows of but does not offer (STARTTLS, BDAT, AUTH, VRFY, ...).
    case disabled(verb: String)
    case unknown(verb: String)

    /// The canonical line to relay (without CRLF). Only envelope commands are relayed.
    public var wireLine: String {
        switch self {
        case .ehlo(let d): return "EHLO \(d)"
        case .helo(let d): return "HELO \(d)"
        case .mail(let path, let params):
            return (["MAIL FROM:<\(path?.description ?? "")>"] + params.map(\.encoded)).joined(separator: " ")
        case .rcpt(let path, let params):
            return (["RCPT TO:<\(path.description)>"] + params.map(\.encoded)).joined(separator: " ")
        case .data: return "DATA"
        case .rset: return "RSET"
        case .noop: return "NOOP"
        case .quit: return "QUIT"
        case .disabled(let v), .unknown(let v): return v
        }
    }
}

/// A command that could not be parsed; each maps to one reply.
public enum CommandError: Error, Sendable, Equatable {
    /// 501 5.5.2: the command's syntax is wrong (the design's reply table).
    case syntax(String)
    /// 501 5.1.7 (bad sender) or 501 5.1.3 (bad recipient).
    case badAddress(String, isSender: Bool)
    /// 555 5.5.4: a MAIL or RCPT parameter restrictpd does not support.
    case unsupportedParameter(String)
    /// 552 5.3.4: SIZE= over the limit.
    case tooBig(declared: Int, limit: Int)

    public var reply: SMTPReply {
        switch self {
        case .syntax(let why): return Replies.syntax(why)
        case .badAddress(let why, let isSender): return Replies.badAddress(why, sender: isSender)
        case .unsupportedParameter(let p): return Replies.unsupportedParameter(p)
        case .tooBig(_, let limit): return Replies.messageTooBig(limit)
        }
    }
}

public enum CommandParser {
    /// Verbs that exist but that restrictpd does not relay (design decision 6).
    public static let disabledVerbs: Set<String> = [
        "STARTTLS", "BDAT", "AUTH", "XCLIENT", "XFORWARD", "ETRN", "VRFY", "EXPN", "TURN", "ATRN",
        "HELP", "SEND", "SOML", "SAML", "VERB", "ONEX", "LHLO", "XEXCH50", "X-EXPS",
    ]
    public static let mailParameters: Set<String> = ["SIZE", "BODY", "SMTPUTF8", "ENVID", "RET"]
    public static let rcptParameters: Set<String> = ["NOTIFY", "ORCPT"]

    /// Parses one framed command line. `sizeLimit` 0 means unlimited.
    public static func parse(_ line: some Collection<UInt8>, sizeLimit: Int = 0) throws(CommandError) -> SMTPCommand {
        let bytes = Array(line)
        // Control characters have no place in a command (NUL, ESC, ...); TAB is tolerated as space.
        for c in bytes where c < 32 && c != 9 || c == 127 {
            throw .syntax("control character in command")
        }
        let verbEnd = bytes.firstIndex(where: { $0 == 32 || $0 == 9 }) ?? bytes.count
        guard verbEnd > 0, verbEnd <= 16 else { throw .syntax("no command") }
        let verb = String(decoding: bytes[0..<verbEnd], as: UTF8.self).uppercased()
        var argStart = verbEnd
        while argStart < bytes.count, bytes[argStart] == 32 || bytes[argStart] == 9 { argStart += 1 }
        let args = bytes[argStart...]

        switch verb {
        case "EHLO", "HELO":
            let domain = trimTrailingSpace(args)
            guard !domain.isEmpty, domain.count <= 255, !domain.contains(32), !domain.contains(9),
                let name = String(validating: domain, as: UTF8.self)
            else { throw .syntax("\(verb) needs one host name") }
            return verb == "EHLO" ? .ehlo(name) : .helo(name)
        case "MAIL":
            return try parseMail(args, sizeLimit: sizeLimit)
        case "RCPT":
            return try parseRcpt(args)
        case "DATA", "RSET", "QUIT":
            guard trimTrailingSpace(args).isEmpty else { throw .syntax("\(verb) takes no arguments") }
            return verb == "DATA" ? .data : verb == "RSET" ? .rset : .quit
        case "NOOP":
            return .noop  // RFC 5321 4.1.1.9: a parameter is allowed and ignored
        default:
            if disabledVerbs.contains(verb) { return .disabled(verb: verb) }
            guard verb.utf8.allSatisfy({ $0 >= 33 && $0 < 127 }) else { return .unknown(verb: "?") }
            return .unknown(verb: verb)
        }
    }

    /// MAIL FROM:<path> and its parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8).
    static func parseMail(_ args: ArraySlice<UInt8>, sizeLimit: Int) throws(CommandError) -> SMTPCommand {
        let (path, params) = try splitPath(args, prefix: "FROM:")
        let sender: Mailbox?
        do {
            sender = try AddressParser.parsePath(path, allowNull: true)
        } catch {
            throw .badAddress(describe(error), isSender: true)
        }
        let parameters = try parseParameters(params, allowed: mailParameters)
        if let size = parameters.first(where: { $0.keyword == "SIZE" }) {
            guard let v = size.value, !v.isEmpty, v.count <= 20, v.allSatisfy(\.isASCIIDigit),
                let n = Int(v)
            else { throw .syntax("bad SIZE value") }
            if sizeLimit > 0, n > sizeLimit { throw .tooBig(declared: n, limit: sizeLimit) }
        }
        if let body = parameters.first(where: { $0.keyword == "BODY" }) {
            guard let v = body.value?.uppercased(), v == "7BIT" || v == "8BITMIME" else {
                throw .unsupportedParameter("BODY=\(body.value ?? "")")
            }
        }
        if let p = parameters.first(where: { $0.keyword == "SMTPUTF8" }), p.value != nil {
            throw .syntax("SMTPUTF8 takes no value")
        }
        return .mail(reversePath: sender, parameters: parameters)
    }

    /// RCPT TO:<path> and its parameters (RFC 3461 NOTIFY, ORCPT).
    static func parseRcpt(_ args: ArraySlice<UInt8>) throws(CommandError) -> SMTPCommand {
        let (path, params) = try splitPath(args, prefix: "TO:")
        let rcpt: Mailbox?
        do {
            rcpt = try AddressParser.parsePath(path, allowNull: false)
        } catch {
            throw .badAddress(describe(error), isSender: false)
        }
        guard let rcpt else { throw .badAddress("empty", isSender: false) }
        return .rcpt(forwardPath: rcpt, parameters: try parseParameters(params, allowed: rcptParameters))
    }

    private static func describe(_ error: AddressError) -> String {
        switch error {
        case .missingBrackets: return "missing <>"
        case .tooLong: return "path too long"
        case .empty: return "empty address"
        case .badLocalPart: return "bad local part"
        case .badDomain: return "bad domain"
        case .badSourceRoute: return "bad source route"
        }
    }

    private static func trimTrailingSpace(_ b: ArraySlice<UInt8>) -> ArraySlice<UInt8> {
        var end = b.endIndex
        while end > b.startIndex, b[end - 1] == 32 || b[end - 1] == 9 { end -= 1 }
        return b[b.startIndex..<end]
    }

    /// "FROM:<path> params": the path with its brackets, and what follows it.
    private static func splitPath(_ args: ArraySlice<UInt8>, prefix: String) throws(CommandError) -> (ArraySlice<UInt8>, ArraySlice<UInt8>) {
        let p = Array(prefix.utf8)
        guard args.count >= p.count,
            zip(args.prefix(p.count), p).allSatisfy({ asciiUpper($0) == $1 })
        else { throw .syntax("expected \(prefix)<address>") }
        var i = args.startIndex + p.count
        while i < args.endIndex, args[i] == 32 || args[i] == 9 { i += 1 }  // tolerated, as Postfix does
        guard i < args.endIndex, args[i] == UInt8(ascii: "<") else { throw .syntax("expected \(prefix)<address>") }
        // The path ends at the first ">" outside a quoted string.
        var j = i + 1
        var quoted = false
        while j < args.endIndex {
            let c = args[j]
            if quoted, c == UInt8(ascii: "\\") { j += 2; continue }
            if c == UInt8(ascii: "\"") { quoted.toggle() }
            if !quoted, c == UInt8(ascii: ">") { break }
            j += 1
        }
        guard j < args.endIndex else { throw .syntax("unterminated address") }
        let rest = args[(j + 1)...]
        guard rest.isEmpty || rest.first == 32 || rest.first == 9 else { throw .syntax("garbage after address") }
        return (args[i...j], rest)
    }

    private static func parseParameters(_ bytes: ArraySlice<UInt8>, allowed: Set<String>) throws(CommandError) -> [ESMTPParameter] {
        var result: [ESMTPParameter] = []
        for word in bytes.split(whereSeparator: { $0 == 32 || $0 == 9 }) {
            let eq = word.firstIndex(of: UInt8(ascii: "="))
            let keyBytes = word[word.startIndex..<(eq ?? word.endIndex)]
            // esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
            guard let first = keyBytes.first, isAlnum(first), keyBytes.count <= 32,
                keyBytes.allSatisfy({ isAlnum($0) || $0 == UInt8(ascii: "-") })
            else { throw .syntax("bad parameter") }
            let keyword = String(decoding: keyBytes, as: UTF8.self).uppercased()
            var value: String? = nil
            if let eq {
                let v = word[(eq + 1)...]
                // esmtp-value = 1*(%d33-60 / %d62-126 / UTF8-non-ascii)
                guard !v.isEmpty, v.count <= 512, v.allSatisfy({ ($0 >= 33 && $0 != 61 && $0 != 127) }),
                    let s = String(validating: v, as: UTF8.self)
                else { throw .syntax("bad value for \(keyword)") }
                value = s
            }
            guard allowed.contains(keyword) else { throw .unsupportedParameter(keyword) }
            guard !result.contains(where: { $0.keyword == keyword }) else { throw .syntax("duplicate \(keyword)") }
            result.append(ESMTPParameter(keyword: keyword, value: value))
        }
        return result
    }

    private static func asciiUpper(_ c: UInt8) -> UInt8 {
        (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z")) ? c - 32 : c
    }

    private static func isAlnum(_ c: UInt8) -> Bool {
        (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z")) || (c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z"))
            || (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9"))
    }
}

extension Character {
    var isASCIIDigit: Bool { self >= "0" && self <= "9" && self.isASCII }
}
