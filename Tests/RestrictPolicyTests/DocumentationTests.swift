// Docs are code: every keyword the parser knows is documented in restrictpd.conf(5) and shown
// in the shipped example, and the example passes the parser (Postfix's
// mantools/check-postconf-undocumented does the same for main.cf).

import Foundation
import RestrictPolicy
import SMTPCore
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

    /// restrictpd(8) DIAGNOSTICS, as the text between its heading and the next section.
    private func diagnostics() throws -> String {
        let manual = try read("man/restrictpd.8")
        guard let start = manual.range(of: "\n.Sh DIAGNOSTICS\n"),
            let end = manual.range(of: "\n.Sh ", range: start.upperBound..<manual.endIndex)
        else { return "" }
        return String(manual[start.upperBound..<end.lowerBound])
    }

    @Test func everyReplyIsInDiagnostics() throws {
        let text = try diagnostics()
        for (name, reply) in Replies.catalogue {
            let code = "\(reply.code) \(reply.enhancedCode ?? "")"
            #expect(text.contains(code), "restrictpd(8) DIAGNOSTICS does not list \(code) (Replies.\(name))")
        }
        for (name, action) in Replies.policyCatalogue {
            let words = action.description.split(separator: " ").prefix(2).joined(separator: " ")
            #expect(text.contains(words), "restrictpd(8) DIAGNOSTICS does not list \(words) (Replies.\(name))")
        }
    }

    @Test func diagnosticsListOnlyRepliesThatExist() throws {
        let text = try diagnostics()
        let known = Set(Replies.catalogue.map { "\($0.reply.code) \($0.reply.enhancedCode ?? "")" })
            .union(Replies.policyCatalogue.map { $0.action.description.split(separator: " ").prefix(2).joined(separator: " ") })
        // Postfix's own answer when the policy service cannot be reached, and a relay's reply
        // in a log example: named for the admin, not given by restrictpd.
        let postfix: Set<String> = ["451 4.3.5", "250 2.0.0"]
        let regex = try NSRegularExpression(pattern: "(DEFER(_IF_PERMIT)?|[245][0-9][0-9]) [245]\\.[0-9]{1,3}\\.[0-9]{1,3}")
        let range = NSRange(text.startIndex..., in: text)
        for match in regex.matches(in: text, range: range) {
            guard let r = Range(match.range, in: text) else { continue }
            let code = String(text[r])
            #expect(known.contains(code) || postfix.contains(code), "restrictpd(8) DIAGNOSTICS lists \(code), which no reply in Replies gives")
        }
    }
}
