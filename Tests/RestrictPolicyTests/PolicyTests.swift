import RestrictPolicy
import SMTPCore
import Testing

/// An in-memory QuotaStore: the window filter the SQLite store applies, then QuotaArithmetic.
actor FakeQuotaStore: QuotaStore {
    struct Down: Error {}
    /// uid -> address -> last time counted.
    private(set) var rows: [Int64: [String: Int64]] = [:]
    private(set) var requests: [QuotaRequest] = []
    var failing = false

    func setFailing(_ f: Bool) { self.failing = f }

    func admit(_ request: QuotaRequest) async throws -> QuotaOutcome {
        self.requests.append(request)
        if self.failing { throw Down() }
        var mine = self.rows[request.budget] ?? [:]
        let counted = Set(mine.filter { _, t in request.windowStart.map { t >= $0 } ?? true }.keys)
        let sent = self.sent[request.budget] ?? []
        var volume: [VolumeCap.Kind: Int] = [:]
        for cap in request.caps.counted {
            let window = sent.filter { $0.at >= request.now - cap.period.seconds }
            volume[cap.kind] = cap.kind == .messages ? window.count : window.reduce(0) { $0 + $1.recipients }
        }
        let (outcome, record, recordMessage) = QuotaArithmetic.decide(request, counted: counted, volume: volume)
        for address in record { mine[address] = request.now }
        self.rows[request.budget] = mine
        if recordMessage { self.sent[request.budget, default: []].append((request.now, request.recipients)) }
        return outcome
    }

    /// uid -> the messages counted for its volume caps.
    private(set) var sent: [Int64: [(at: Int64, recipients: Int)]] = [:]

    func counted(_ uid: UInt32) -> Set<String> { Set((self.rows[Int64(uid)] ?? [:]).keys) }
}

private func policy(_ text: String) throws -> Policy { Policy(try config(text)) }

private let www = Sender.user(uid: 33, name: "www-data")
private let t0: Int64 = 1_800_000_000

@Suite struct RuleMatchingTests {
    static let table: [(pattern: AllowPattern, address: String, matches: Bool)] = [
        (.address("webmaster@example.org"), "webmaster@example.org", true),
        (.address("webmaster@example.org"), "WebMaster@Example.ORG", true),
        (.address("webmaster@example.org"), "webmaster@example.org.evil", false),
        (.address("webmaster@example.org"), "xwebmaster@example.org", false),
        (.address("postmaster"), "Postmaster", true),
        (.domain("example.org"), "a@example.org", true),
        (.domain("example.org"), "a@EXAMPLE.org", true),
        (.domain("example.org"), "a@sub.example.org", false),
        (.domain("example.org"), "a@notexample.org", false),
        (.domain("example.org"), "example.org@evil.example", false),
        (.domain("example.org"), "\"x@example.org\"@evil.example", false),
        (.domain("example.org"), "postmaster", false),
        (.domainAndSubdomains("example.org"), "a@example.org", true),
        (.domainAndSubdomains("example.org"), "a@sub.example.org", true),
        (.domainAndSubdomains("example.org"), "a@deep.sub.Example.org", true),
        (.domainAndSubdomains("example.org"), "a@notexample.org", false),
        (.domainAndSubdomains("example.org"), "a@example.org.evil", false),
        (.domainAndSubdomains("example.org"), "a@xexample.org", false),
        (.any, "anyone@anywhere.example", true),
        (.any, "postmaster", true),
    ]

    @Test func matchingTable() {
        for row in Self.table {
            let lower = row.address.lowercased()
            let key = AddressKey.normalize(row.address, delimiter: "")
            #expect(row.pattern.matches(address: lower, key: key) == row.matches, "\(row.pattern) vs \(row.address)")
        }
    }

    @Test func normalize() {
        let table: [(String, String, String)] = [
            ("User+Tag@Example.ORG", "+", "user@example.org"),
            ("user+tag@example.org", "", "user+tag@example.org"),
            ("user-tag@example.org", "+", "user-tag@example.org"),
            ("user-tag+x@example.org", "+-", "user@example.org"),
            ("user+tag-x@example.org", "+-", "user@example.org"),
            ("+tag@example.org", "+", "+tag@example.org"),
            ("-+tag@example.org", "+-", "-+tag@example.org"),
            ("user++@example.org", "+", "user@example.org"),
            ("user@exa+mple.org", "+", "user@exa+mple.org"),
            ("postmaster+x", "+", "postmaster"),
        ]
        for (address, delimiter, key) in table {
            #expect(AddressKey.normalize(address, delimiter: delimiter) == key, "\(address) with \(delimiter)")
        }
    }

    @Test func delimiterInPolicy() throws {
        let p = try policy("recipient_delimiter +\nuser www-data\n allow webmaster@example.org")
        #expect(p.evaluate(sender: www, recipients: ["webmaster+news@example.org"]) == .allowed)
        #expect(p.evaluate(sender: www, recipients: ["WEBMASTER+x@EXAMPLE.ORG"]) == .allowed)
        // A leading delimiter is part of the name.
        #expect(p.evaluate(sender: www, recipients: ["+webmaster@example.org"]) != .allowed)
        // An allow entry written with the extension matches it exactly, too.
        let q = try policy("recipient_delimiter +\nuser www-data\n allow list+owner@example.org")
        #expect(q.evaluate(sender: www, recipients: ["list+owner@example.org"]) == .allowed)
    }

    @Test func evaluateWithPatterns() throws {
        let p = try policy("user www-data\n allow a@x.example @y.example @.z.example")
        for ok in ["a@x.example", "A@X.EXAMPLE", "b@y.example", "c@z.example", "d@q.z.example", "e@r.q.z.example"] {
            #expect(p.evaluate(sender: www, recipients: [ok]) == .allowed, "\(ok)")
        }
        for bad in ["b@x.example", "b@sub.y.example", "c@notz.example", "c@z.example.com", "postmaster"] {
            #expect(p.evaluate(sender: www, recipients: [bad]) == .refused(recipient: bad, reason: "not on the allow list"), "\(bad)")
        }
        #expect(p.evaluate(sender: www, recipients: []) == .allowed)
    }

    /// Postfix re-routes "user%remote@local", "remote!user@local" and "\"user@remote\"@local"
    /// once it strips the local domain: a domain pattern must not allow them.
    @Test func routingLocalPartsAreNotAllowedByDomain() throws {
        let p = try policy("default\n allow @localhost @.example.org\nuser root\n allow *\nuser www-data\n allow \"a@b\"@localhost")
        let nobody = Sender.user(uid: 65534, name: "nobody")
        for sneaky in ["victim%gmail.example@localhost", "gmail.example!victim@localhost", "\"victim@gmail.example\"@localhost",
            "x%y@mail.example.org", "\"quoted\"@localhost"]
        {
            #expect(p.evaluate(sender: nobody, recipients: [sneaky]) == .refused(recipient: sneaky, reason: "not on the allow list"), "\(sneaky)")
        }
        #expect(p.evaluate(sender: nobody, recipients: ["plain@localhost"]) == .allowed)
        // "*" allows everything, and an exact entry allows exactly that address.
        #expect(p.evaluate(sender: .user(uid: 0, name: "root"), recipients: ["victim%gmail.example@localhost"]) == .allowed)
        #expect(p.evaluate(sender: www, recipients: ["\"a@b\"@localhost"]) == .allowed)
    }
}

@Suite struct PolicyDecisionTests {
    @Test func allowedAndRefused() async throws {
        let p = try policy("user www-data\n allow @example.org\nuser root\n allow *")
        let store = FakeQuotaStore()
        let ok = await p.decide(sender: www, recipients: ["a@example.org", "b@example.org"], store: store, now: t0)
        #expect(ok.kind == .relay)
        #expect(ok.code == 250)
        let root = await p.decide(sender: .user(uid: 0, name: "root"), recipients: ["x@anywhere.example"], store: store, now: t0)
        #expect(root.kind == .relay)
        // The reply names the first refused recipient.
        let no = await p.decide(sender: www, recipients: ["a@example.org", "evil@spam.example", "worse@spam.example"], store: store, now: t0)
        #expect(no == Verdict(kind: .refuse, reply: SMTPReply(550, "5.7.1", "<evil@spam.example>: not permitted for uid 33 (www-data)"),
            reason: "<evil@spam.example> not on the allow list", quota: nil))
        #expect(await store.requests.isEmpty)
    }

    @Test func noDefaultRuleRefuses() async throws {
        let p = try policy("user www-data\n allow *")
        let v = await p.decide(sender: .user(uid: 1000, name: nil), recipients: ["x@example.org"], store: FakeQuotaStore(), now: t0)
        #expect(v.kind == .refuse)
        #expect(v.code == 550)
        #expect(v.enhanced == "5.7.1")
        #expect(v.text == "<x@example.org>: not permitted for uid 1000")
        #expect(v.reason == "<x@example.org> no rule and no default rule")
        // With a default rule, it applies.
        let q = try policy("user www-data\n allow *\ndefault\n allow @localhost")
        #expect(q.evaluate(sender: .user(uid: 1000, name: "alice"), recipients: ["root@localhost"]) == .allowed)
        #expect(q.evaluate(sender: .user(uid: 1000, name: "alice"), recipients: ["x@example.org"]) != .allowed)
    }

    @Test func unknownRule() async throws {
        let sender = Sender.unidentified(reason: "first header is not pickup's Received")
        let none = try policy("default\n allow *")
        let v = await none.decide(sender: sender, recipients: ["x@example.org"], store: FakeQuotaStore(), now: t0)
        #expect(v.kind == .refuse)
        #expect(v.text == "<x@example.org>: not permitted for unidentified sender (first header is not pickup's Received)")
        #expect(v.reason == "<x@example.org> no unknown rule")
        let some = try policy("default\n allow *\nunknown\n allow @localhost")
        #expect(some.evaluate(sender: sender, recipients: ["root@localhost"]) == .allowed)
        #expect(some.evaluate(sender: sender, recipients: ["x@example.org"]) == .refused(recipient: "x@example.org", reason: "not on the allow list"))
        let refuse = try policy("unknown\n refuse")
        #expect(refuse.evaluate(sender: sender, recipients: ["root@localhost"]) == .refused(recipient: "root@localhost", reason: "rule refuses all"))
        // An identified user never falls back to the unknown rule.
        #expect(some.rule(for: .user(uid: 5, name: nil))?.selector == .default)
    }

    @Test func quotaExactlyNThenDeferred() async throws {
        let p = try policy("user www-data\n allow @example.org\n arbitrary 3 per day")
        let store = FakeQuotaStore()
        let v1 = await p.decide(sender: www, recipients: ["a@x.example", "ok@example.org", "b@x.example", "c@x.example"], store: store, now: t0)
        #expect(v1.kind == .relay)
        #expect(v1.quota == "0/3 per day")
        #expect(await store.counted(33) == ["a@x.example", "b@x.example", "c@x.example"])
        // The fourth distinct address is over quota: deferred by default, naming it.
        let v2 = await p.decide(sender: www, recipients: ["a@x.example", "d@x.example"], store: store, now: t0 + 10)
        #expect(v2 == Verdict(kind: .defer, reply: SMTPReply(451, "4.7.1",
            "<d@x.example>: quota of 3 arbitrary recipients per day exhausted for uid 33 (www-data)"),
            reason: "<d@x.example> over quota", quota: "0/3 per day"))
        #expect(await store.counted(33).count == 3)
    }

    @Test func allOrNothing() async throws {
        let p = try policy("user www-data\n arbitrary 2 per hour")
        let store = FakeQuotaStore()
        // N+1 in one message: refused, and nothing is counted.
        let v = await p.decide(sender: www, recipients: ["a@x.example", "b@x.example", "c@x.example"], store: store, now: t0)
        #expect(v.kind == .defer)
        #expect(v.text.hasPrefix("<c@x.example>:"))
        #expect(await store.counted(33).isEmpty)
        // So two of them still fit afterwards.
        #expect(await p.decide(sender: www, recipients: ["a@x.example", "b@x.example"], store: store, now: t0).kind == .relay)
        // A recipient no rule allows refuses the whole message before the store is asked.
        let q = try policy("user www-data\n allow @example.org\ndefault\n arbitrary 5")
        let store2 = FakeQuotaStore()
        let alice = Sender.user(uid: 1000, name: "alice")
        #expect(q.evaluate(sender: alice, recipients: ["x@y.example"]) == .needsQuota(addresses: ["x@y.example"], quota: Quota(limit: 5, period: nil), overQuota: .defer, written: ["x@y.example": "x@y.example"]))
        let w = await q.decide(sender: www, recipients: ["ok@example.org", "x@y.example"], store: store2, now: t0)
        #expect(w.kind == .refuse)
        #expect(await store2.requests.isEmpty)
    }

    @Test func windowEdges() async throws {
        let p = try policy("user www-data\n arbitrary 2 per hour")
        let store = FakeQuotaStore()
        #expect(await p.decide(sender: www, recipients: ["a@x.example"], store: store, now: t0).kind == .relay)
        #expect(await p.decide(sender: www, recipients: ["b@x.example"], store: store, now: t0 + 100).kind == .relay)
        // Full until the first address is older than the period.
        #expect(await p.decide(sender: www, recipients: ["c@x.example"], store: store, now: t0 + 3599).kind == .defer)
        #expect(await p.decide(sender: www, recipients: ["c@x.example"], store: store, now: t0 + 3600).kind == .defer)
        let v = await p.decide(sender: www, recipients: ["c@x.example"], store: store, now: t0 + 3601)
        #expect(v.kind == .relay)
        #expect(v.quota == "0/2 per hour")
        // b is still in the window; a has left it and would cost again.
        #expect(await p.decide(sender: www, recipients: ["b@x.example"], store: store, now: t0 + 3602).kind == .relay)
        #expect(await p.decide(sender: www, recipients: ["a@x.example"], store: store, now: t0 + 3603).kind == .defer)
        let request = QuotaRequest(uid: 33, addresses: [], quota: Quota(limit: 1, period: .hour), now: t0)
        #expect(request.windowStart == t0 - 3600)
        #expect(QuotaRequest(uid: 33, addresses: [], quota: Quota(limit: 1, period: nil), now: t0).windowStart == nil)
    }

    @Test func learnedListWithoutPeriod() async throws {
        let p = try policy("user www-data\n arbitrary 2")
        let store = FakeQuotaStore()
        #expect(await p.decide(sender: www, recipients: ["a@x.example", "b@x.example"], store: store, now: t0).kind == .relay)
        let years = t0 + 10 * 365 * 86400
        // The first two are remembered for good and cost nothing; a third never fits.
        let again = await p.decide(sender: www, recipients: ["b@x.example", "A@X.example"], store: store, now: years)
        #expect(again.kind == .relay)
        #expect(again.quota == "0/2")
        #expect(await p.decide(sender: www, recipients: ["c@x.example"], store: store, now: years).kind == .defer)
    }

    @Test func repeatsCostNothing() async throws {
        let p = try policy("recipient_delimiter +\nuser www-data\n arbitrary 2 per day")
        let store = FakeQuotaStore()
        let v = await p.decide(sender: www, recipients: ["a@x.example", "A@x.example", "a+1@x.example", "a+2@X.EXAMPLE"], store: store, now: t0)
        #expect(v.kind == .relay)
        #expect(v.quota == "1/2 per day")
        #expect(await store.requests.last?.addresses == ["a@x.example"])
        // Postfix retrying the same message pays nothing.
        let retry = await p.decide(sender: www, recipients: ["a@x.example"], store: store, now: t0 + 600)
        #expect(retry.kind == .relay)
        #expect(retry.quota == "1/2 per day")
    }

    @Test func arbitraryZeroIsNone() async throws {
        let p = try policy("user www-data\n allow @example.org\n arbitrary 0 per day")
        #expect(p.evaluate(sender: www, recipients: ["x@y.example"]) == .refused(recipient: "x@y.example", reason: "not on the allow list"))
    }

    @Test func overQuotaDeferOrReject() async throws {
        let cases: [(String, Verdict.Kind, Int, String)] = [
            ("user www-data\n arbitrary 1", .defer, 451, "4.7.1"),
            ("over_quota reject\nuser www-data\n arbitrary 1", .refuse, 550, "5.7.1"),
            ("user www-data\n arbitrary 1\n over_quota reject", .refuse, 550, "5.7.1"),
            ("over_quota reject\nuser www-data\n arbitrary 1\n over_quota defer", .defer, 451, "4.7.1"),
            ("over_quota defer\nuser www-data\n over_quota reject\n arbitrary 1", .refuse, 550, "5.7.1"),
        ]
        for (text, kind, code, enhanced) in cases {
            let p = try policy(text)
            let store = FakeQuotaStore()
            #expect(await p.decide(sender: www, recipients: ["a@x.example"], store: store, now: t0).kind == .relay)
            let v = await p.decide(sender: www, recipients: ["b@x.example"], store: store, now: t0)
            #expect(v.kind == kind, "\(text)")
            #expect(v.code == code)
            #expect(v.enhanced == enhanced)
            #expect(v.text == "<b@x.example>: quota of 1 arbitrary recipients exhausted for uid 33 (www-data)")
        }
    }

    @Test func storeFailureDefers() async throws {
        let p = try policy("user www-data\n allow @example.org\n arbitrary 5 per day")
        let store = FakeQuotaStore()
        await store.setFailing(true)
        let v = await p.decide(sender: www, recipients: ["x@y.example"], store: store, now: t0)
        #expect(v.kind == .defer)
        #expect(v.code == 451)
        #expect(v.enhanced == "4.3.0")
        #expect(v.reason.hasPrefix("quota store error"))
        // Allowed mail never needs the store.
        #expect(await p.decide(sender: www, recipients: ["a@example.org"], store: store, now: t0).kind == .relay)
        #expect(await store.requests.count == 1)
    }

    @Test func unknownRuleNeverCountsQuota() async throws {
        // The parser refuses `arbitrary` in `unknown`; a hand-built rule still never reaches the store.
        var c = Configuration()
        var rule = Rule(selector: .unknown, line: 1)
        rule.quota = Quota(limit: 5, period: .day)
        c.rules = [rule]
        let store = FakeQuotaStore()
        let v = await Policy(c).decide(sender: .unidentified(reason: "x"), recipients: ["a@b.example"], store: store, now: t0)
        #expect(v.kind == .refuse)
        #expect(await store.requests.isEmpty)
    }

    @Test func quotaArithmetic() {
        let q = QuotaRequest(uid: 1, addresses: ["a", "b", "c"], quota: Quota(limit: 3, period: .day), now: t0)
        let (ok, record) = QuotaArithmetic.decide(q, counted: ["a"])
        #expect(ok == QuotaOutcome(admitted: true, used: 3, limit: 3, firstRefused: nil))
        #expect(record == ["a", "b", "c"])
        let (no, none) = QuotaArithmetic.decide(q, counted: ["x", "y"])
        #expect(no == QuotaOutcome(admitted: false, used: 2, limit: 3, firstRefused: "b"))
        #expect(none.isEmpty)
    }
}
