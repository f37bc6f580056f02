// The parser's keyword table and the keyword lists the documentation tests read name the same
// words: a keyword the parser takes is documented, a documented one is parsed.

@testable import RestrictPolicy
import Testing

@Suite struct KeywordTableTests {
    @Test func tableHasEveryListedKeywordAndNoOther() {
        let table = Set(ConfigParser.keywords.keys)
        let listed = Set(ConfigParser.allKeys)
        #expect(table.subtracting(listed).isEmpty, "parsed but not listed: \(table.subtracting(listed).sorted())")
        #expect(listed.subtracting(table).isEmpty, "listed but not parsed: \(listed.subtracting(table).sorted())")
    }
}
