// Untrusted text on its way to a log line (addresses, header text, replies from either side).
// Escapes CR, LF, other control bytes, backslash, double quote and bytes that are not UTF-8, and
// truncates, so that no input can forge a log line or flood one.

public enum LogText {
    public static let defaultLimit = 256

    public static func escape(_ bytes: some Collection<UInt8>, limit: Int = defaultLimit) -> String {
        var out = ""
        out.reserveCapacity(min(bytes.count, limit) + 8)
        var count = 0
        // At most `limit` bytes are taken, plus the rest of a scalar and one byte to see that
        // there is more: no need to copy a long input whole.
        var it = Array(bytes.prefix(limit + 4))[...]
        while let c = it.first {
            if count >= limit {
                out += "..."
                break
            }
            if c >= 0x80 {
                // Keep a valid UTF-8 scalar (but not C1 controls, line separators or bidi
                // controls, which could make a line read differently); escape the rest.
                let len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1
                if len > 1, it.count >= len, let s = String(validating: it.prefix(len), as: UTF8.self),
                    let scalar = s.unicodeScalars.first,
                    !(0x80...0x9F).contains(scalar.value), scalar.value != 0x2028, scalar.value != 0x2029,
                    !scalar.properties.isBidiControl
                {
                    out += s
                    it = it.dropFirst(len)
                    count += len
                    continue
                }
                out += hex(c)
            } else if c < 32 || c == 127 {
                switch c {
                case 9: out += "\\t"
                case 10: out += "\\n"
                case 13: out += "\\r"
                default: out += hex(c)
                }
            } else if c == UInt8(ascii: "\\") {
                out += "\\\\"
            } else if c == UInt8(ascii: "\"") {
                out += "\\\""
            } else {
                out.unicodeScalars.append(Unicode.Scalar(c))
            }
            it = it.dropFirst()
            count += 1
        }
        return out
    }

    public static func escape(_ string: String, limit: Int = defaultLimit) -> String {
        escape(string.utf8, limit: limit)
    }

    private static func hex(_ c: UInt8) -> String {
        let digits = Array("0123456789abcdef".unicodeScalars)
        var s = "\\x"
        s.unicodeScalars.append(digits[Int(c >> 4)])
        s.unicodeScalars.append(digits[Int(c & 15)])
        return s
    }
}
