// A small JSON reader and string quoting for --audit: it reads `nft -j list ruleset` and
// writes --json. The daemon does not link Foundation (System.swift), so this is done by hand.
// The reader takes RFC 8259 JSON with a nesting limit; anything else is an error, not a guess.

enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    static func == (a: JSONValue, b: JSONValue) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case (.bool(let x), .bool(let y)): return x == y
        case (.number(let x), .number(let y)): return x == y
        case (.string(let x), .string(let y)): return x == y
        case (.array(let x), .array(let y)): return x == y
        case (.object(let x), .object(let y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    /// The member `key` of an object, or nil.
    subscript(key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        return members.first { $0.0 == key }?.1
    }

    var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    var arrayValue: [JSONValue]? {
        if case .array(let a) = self { return a }
        return nil
    }

    static func parse(_ text: String) -> JSONValue? {
        var reader = JSONReader(bytes: Array(text.utf8))
        guard let value = reader.value(depth: 0) else { return nil }
        reader.skipSpace()
        return reader.at == reader.bytes.count ? value : nil
    }
}

struct JSONReader {
    let bytes: [UInt8]
    var at = 0
    static let maxDepth = 64

    init(bytes: [UInt8]) { self.bytes = bytes }

    mutating func skipSpace() {
        while self.at < self.bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(self.bytes[self.at]) { self.at += 1 }
    }

    mutating func literal(_ word: String, _ value: JSONValue) -> JSONValue? {
        let w = Array(word.utf8)
        guard self.at + w.count <= self.bytes.count, Array(self.bytes[self.at..<self.at + w.count]) == w else { return nil }
        self.at += w.count
        return value
    }

    mutating func value(depth: Int) -> JSONValue? {
        guard depth < Self.maxDepth else { return nil }
        self.skipSpace()
        guard self.at < self.bytes.count else { return nil }
        switch self.bytes[self.at] {
        case UInt8(ascii: "{"): return self.object(depth: depth)
        case UInt8(ascii: "["): return self.array(depth: depth)
        case UInt8(ascii: "\""): return self.string().map(JSONValue.string)
        case UInt8(ascii: "t"): return self.literal("true", .bool(true))
        case UInt8(ascii: "f"): return self.literal("false", .bool(false))
        case UInt8(ascii: "n"): return self.literal("null", .null)
        default: return self.number()
        }
    }

    mutating func array(depth: Int) -> JSONValue? {
        self.at += 1
        var items: [JSONValue] = []
        self.skipSpace()
        if self.at < self.bytes.count, self.bytes[self.at] == UInt8(ascii: "]") { self.at += 1; return .array(items) }
        while true {
            guard let v = self.value(depth: depth + 1) else { return nil }
            items.append(v)
            self.skipSpace()
            guard self.at < self.bytes.count else { return nil }
            let c = self.bytes[self.at]
            self.at += 1
            if c == UInt8(ascii: "]") { return .array(items) }
            guard c == UInt8(ascii: ",") else { return nil }
        }
    }

    mutating func object(depth: Int) -> JSONValue? {
        self.at += 1
        var members: [(String, JSONValue)] = []
        self.skipSpace()
        if self.at < self.bytes.count, self.bytes[self.at] == UInt8(ascii: "}") { self.at += 1; return .object(members) }
        while true {
            self.skipSpace()
            guard self.at < self.bytes.count, self.bytes[self.at] == UInt8(ascii: "\""), let key = self.string() else { return nil }
            self.skipSpace()
            guard self.at < self.bytes.count, self.bytes[self.at] == UInt8(ascii: ":") else { return nil }
            self.at += 1
            guard let v = self.value(depth: depth + 1) else { return nil }
            members.append((key, v))
            self.skipSpace()
            guard self.at < self.bytes.count else { return nil }
            let c = self.bytes[self.at]
            self.at += 1
            if c == UInt8(ascii: "}") { return .object(members) }
            guard c == UInt8(ascii: ",") else { return nil }
        }
    }

    mutating func number() -> JSONValue? {
        let start = self.at
        while self.at < self.bytes.count, "+-0123456789.eE".utf8.contains(self.bytes[self.at]) { self.at += 1 }
        guard self.at > start, let d = Double(String(decoding: self.bytes[start..<self.at], as: UTF8.self)) else { return nil }
        return .number(d)
    }

    /// A string starting at the opening quote; escapes decoded (\uXXXX with surrogate pairs).
    mutating func string() -> String? {
        self.at += 1
        var scalars = String.UnicodeScalarView()
        var raw: [UInt8] = []
        func flush() {
            scalars.append(contentsOf: String(decoding: raw, as: UTF8.self).unicodeScalars)
            raw.removeAll()
        }
        while self.at < self.bytes.count {
            let c = self.bytes[self.at]
            self.at += 1
            if c == UInt8(ascii: "\"") { flush(); return String(scalars) }
            if c < 0x20 { return nil }
            guard c == UInt8(ascii: "\\") else { raw.append(c); continue }
            flush()
            guard let s = self.escape() else { return nil }
            scalars.append(s)
        }
        return nil
    }

    mutating func escape() -> Unicode.Scalar? {
        guard self.at < self.bytes.count else { return nil }
        let c = self.bytes[self.at]
        self.at += 1
        switch c {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): return Unicode.Scalar(c)
        case UInt8(ascii: "b"): return "\u{08}"
        case UInt8(ascii: "f"): return "\u{0C}"
        case UInt8(ascii: "n"): return "\n"
        case UInt8(ascii: "r"): return "\r"
        case UInt8(ascii: "t"): return "\t"
        case UInt8(ascii: "u"):
            guard let high = self.hex4() else { return nil }
            if (0xD800..<0xDC00).contains(high) {
                guard self.at + 1 < self.bytes.count, self.bytes[self.at] == UInt8(ascii: "\\"), self.bytes[self.at + 1] == UInt8(ascii: "u") else { return nil }
                self.at += 2
                guard let low = self.hex4(), (0xDC00..<0xE000).contains(low) else { return nil }
                return Unicode.Scalar(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
            }
            return Unicode.Scalar(high)
        default: return nil
        }
    }

    mutating func hex4() -> UInt32? {
        guard self.at + 4 <= self.bytes.count else { return nil }
        let text = String(decoding: self.bytes[self.at..<self.at + 4], as: UTF8.self)
        self.at += 4
        return UInt32(text, radix: 16)
    }
}

enum JSONText {
    /// A JSON string literal: quotes, backslashes and control characters escaped.
    static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7F {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }
}
