// Docs are code: every keyword the parser knows is documented in restrictpd.conf(5) and shown
// in the shipped example, and the example passes the parser (Postfix's
// mantools/check-postconf-undocumented does the same for main.cf).

import Foundation
import RestrictPolicy
import Testing

private let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

private func read(_ relative: String) throws -> String {
    try String(contentsOf: repository.appendingPathComponent(relative), encoding: .utf8)
}

private func mentions(_ text: String, _ word: String) -> Bool {
    // The word as a whole word (not as part of a longer key such as idle_timeout in data_timeout).
    let pattern = "(^|[^A-Za-z0-9_])\(NSRegularExpression.escapedPattern(for: word))([^A-Za-z0-9_]|$)"
    return text.range(of: pattern, options: .regularExpression) != nil
}

@Suite struct DocumentationTests {
    @Test(arguments: ConfigParser.allKeys)
    func keywordIsInManualPage(_ key: String) throws {
        let manual = try read("man/restrictpd.conf.5")
        #expect(mentions(manual, key), "restrictpd.conf(5) does not document '\(key)'")
    }

    @Test(arguments: ConfigParser.allKeys)
    func keywordIsInExample(_ key: String) throws {
        let example = try read("etc/restrictpd.conf")
        #expect(mentions(example, key), "etc/restrictpd.conf does not show '\(key)'")
    }

    @Test(arguments: Setting.all)
    func defaultAndRangeAreInManualPage(_ setting: Setting) throws {
        let manual = try read("man/restrictpd.conf.5")
        #expect(manual.contains(String(setting.defaultValue)), "restrictpd.conf(5) does not give the default of \(setting.key) (\(setting.defaultValue))")
    }

    @Test func exampleParses() throws {
        let example = try read("etc/restrictpd.conf")
        let users = UserResolver { ["www-data": 33, "root": 0, "postfix": 104][$0] }
        switch ConfigParser.parse(example, file: "etc/restrictpd.conf", users: users) {
        case .success(let c):
            #expect(!c.rules.isEmpty)
        case .failure(let errors):
            Issue.record("etc/restrictpd.conf does not parse:\n\(errors)")
        }
    }
}
