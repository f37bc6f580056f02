// Fixture loading and small helpers shared by the SMTPCore tests.
// The fixtures are byte-exact captures of Postfix 3.7's smtp(8) talking to a content filter
// (.c2s: what the client sent, .s2c: what the server answered).

import Foundation
import NIOCore
import Testing

enum Fixture {
    static let names = [
        "a-root-relay", "b-www-data-runuser-relay", "b-www-data-su-relay", "c-forged-received-relay",
        "d-8bit-dsn-f-relay", "e-t-utf8-rcpt-relay", "f-sendmail-bs-relay", "g-all-extensions-offered",
        "h-550-end-of-data", "k-550-one-rcpt",
    ]

    static func bytes(_ name: String) throws -> [UInt8] {
        let url = try #require(Bundle.module.url(forResource: name, withExtension: nil, subdirectory: "Fixtures"))
        return Array(try Data(contentsOf: url))
    }

    static func c2s(_ name: String) throws -> [UInt8] { try bytes(name + ".c2s") }
    static func s2c(_ name: String) throws -> [UInt8] { try bytes(name + ".s2c") }

    /// The command lines the client sent before DATA (without CRLF).
    static func commandLines(_ name: String) throws -> [[UInt8]] {
        let all = try c2s(name)
        let dataStart = try #require(all.firstRange(of: Array("\r\nDATA\r\n".utf8)))
        return all[..<(dataStart.lowerBound + 2)].split(separator: Array("\r\n".utf8)).map(Array.init)
    }

    /// The DATA part: after the line "DATA\r\n", up to and including "\r\n.\r\n".
    static func dataPart(_ name: String) throws -> [UInt8] {
        let all = try c2s(name)
        let marker = try #require(all.firstRange(of: Array("\r\nDATA\r\n".utf8)))
        let start = marker.upperBound
        let end = try #require(all[(start - 2)...].firstRange(of: Array("\r\n.\r\n".utf8)))
        return Array(all[start..<end.upperBound])
    }

    /// Lines of the DATA part's header section and body, without CRLF.
    static func dataLines(_ name: String) throws -> [[UInt8]] {
        let data = try dataPart(name)
        return data.dropLast(5).split(separator: Array("\r\n".utf8), omittingEmptySubsequences: false).map(Array.init)
    }
}

/// SplitMix64: a small seeded generator, so random chunkings are reproducible.
struct SeededRNG: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { self.state = seed }
    mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Splits `bytes` into chunks: nil = whole, 1 = byte at a time, or random sizes from `seed`.
enum Chunking: CustomStringConvertible, Sendable {
    case whole
    case bytewise
    case random(seed: UInt64)

    static let all: [Chunking] = [.whole, .bytewise] + (1...6).map { .random(seed: $0) }

    var description: String {
        switch self {
        case .whole: return "whole"
        case .bytewise: return "bytewise"
        case .random(let seed): return "random(\(seed))"
        }
    }

    func split(_ bytes: [UInt8]) -> [ArraySlice<UInt8>] {
        switch self {
        case .whole:
            return [bytes[...]]
        case .bytewise:
            return bytes.indices.map { bytes[$0...$0] }
        case .random(let seed):
            var rng = SeededRNG(seed: seed)
            var out: [ArraySlice<UInt8>] = []
            var i = 0
            while i < bytes.count {
                let n = Int.random(in: 1...17, using: &rng)
                let j = min(bytes.count, i + n)
                out.append(bytes[i..<j])
                i = j
            }
            return out
        }
    }
}

extension Array where Element == UInt8 {
    init(_ string: String) { self = Array(string.utf8) }
}

func buffer(_ string: String) -> ByteBuffer { ByteBuffer(string: string) }
func buffer(_ bytes: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: bytes) }
func text(_ buffer: ByteBuffer) -> String { String(decoding: buffer.readableBytesView, as: UTF8.self) }
