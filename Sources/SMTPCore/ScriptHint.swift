// The X-PHP-Originating-Script header (PHP's mail.add_x_header): "UID:script.php", the script
// that called mail(). A hint only: the message's author writes the whole header section and
// can put anything there, so it is shown escaped, truncated and labelled as such, and never
// decides anything.

public enum ScriptHint {
    /// The field's value as shown (escaped, at most `limit` bytes of it).
    public static let limit = 128
    static let name = Array("x-php-originating-script:".utf8)

    /// The first X-PHP-Originating-Script field of `header` (the header section, CRLF lines),
    /// unfolded, trimmed, escaped; nil when there is none or it is empty.
    public static func extract(_ header: some Collection<UInt8>) -> String? {
        var value: [UInt8]? = nil
        for line in Self.lines(header) {
            if var v = value {
                // A continuation line (folded field) belongs to the value; any other ends it.
                guard let first = line.first, first == 0x20 || first == 0x09 else { break }
                v.append(0x20)
                v.append(contentsOf: line.drop { $0 == 0x20 || $0 == 0x09 })
                value = v
                if v.count > Self.limit * 4 { break }
                continue
            }
            if line.count >= Self.name.count, line.prefix(Self.name.count).map(Self.lower).elementsEqual(Self.name) {
                value = Array(line.dropFirst(Self.name.count))
            }
        }
        guard let raw = value else { return nil }
        let trimmed = raw.drop { $0 == 0x20 || $0 == 0x09 }.reversed().drop { $0 == 0x20 || $0 == 0x09 }.reversed()
        guard !trimmed.isEmpty else { return nil }
        return LogText.escape(Array(trimmed), limit: Self.limit)
    }

    /// The header section's lines without their CRLF, up to its empty line.
    static func lines(_ header: some Collection<UInt8>) -> [ArraySlice<UInt8>] {
        var out: [ArraySlice<UInt8>] = []
        for line in Array(header).split(separator: 0x0A, omittingEmptySubsequences: false) {
            let l = line.last == 0x0D ? line.dropLast() : line
            if l.isEmpty { break }
            out.append(l)
        }
        return out
    }

    static func lower(_ c: UInt8) -> UInt8 { (0x41...0x5A).contains(c) ? c + 32 : c }
}
