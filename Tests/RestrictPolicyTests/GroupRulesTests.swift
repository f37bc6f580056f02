// Rules for many users: `group`, `uid FROM-TO`, `shared`; precedence, errors on the right
// lines, and shared budgets.

import RestrictPolicy
import SMTPCore
import Testing

private let groups = GroupResolver { ["sites": 2000, "staff": 50, "web": 2001][$0] }

private func parseGroups(_ text: String) -> Result<Configuration, ConfigErrors> {
    ConfigParser.parse(text, file: "t.conf", users: users, groups: groups)
}

private func groupConfig(_ text: String) throws -> Configuration { try parseGroups(text).get() }

private func groupErrors(_ text: String) -> [String] {
    switch parseGroups(text) {
    case .success: return []
    case .failure(let e): return e.errors.map(\.description)
    }
}

private let t0: Int64 = 1_700_000_000

@Suite struct GroupRulesTests {
    @Test func parsesGroupAndRangeRules() throws {
        let c = try groupConfig("""
            group sites
                allow *
                messages 10 per hour
                shared
            group 50
                allow @localhost
            uid 3000-3999
                arbitrary 5 per day
            """)
        #expect(c.rules.map(\.selector) == [.group(gid: 2000), .group(gid: 50), .uidRange(from: 3000, to: 3999)])
        #expect(c.rules[0].groupName == "sites" && c.rules[0].shared && !c.rules[1].shared)
        #expect(c.rules[0].budget == (Int64(1) << 32) + 2000)
        #expect(c.rules[2].budget == nil)
    }

    @Test func errorsOnTheRightLines() {
        let text = """
            group nosuch
                allow *
            group sites
            group sites
            uid 10-5
            uid 1000-1999
            uid 1500-2500
            uid 2500-2600
            uid x
            default
                shared
            user alice
                shared yes
            """
        #expect(groupErrors(text) == [
            "t.conf:1: unknown group 'nosuch'",
            "t.conf:4: duplicate rule for group 2000 (first at line 3)",
            "t.conf:5: bad uid range '10-5': use FROM-TO with FROM <= TO",
            "t.conf:9: bad uid range 'x': use FROM-TO with FROM <= TO",
            "t.conf:11: shared belongs in a 'group' or 'uid' rule",
            "t.conf:13: shared takes no arguments",
            "t.conf:7: uid range 1500-2500 overlaps uid range 1000-1999 at line 6",
            "t.conf:8: uid range 2500-2600 overlaps uid range 1500-2500 at line 7",
        ])
    }

    @Test func precedenceUserRangeGroupDefault() throws {
        let p = Policy(try groupConfig("""
            default
                allow @default.example
            group sites
                allow @group.example
            uid 1000-1999
                allow @range.example
            user alice
                allow @user.example
            """))
        func chosen(_ uid: UInt32, _ groups: [UInt32]) -> [AllowPattern]? { p.rule(for: .user(uid: uid, name: nil), groups: groups)?.allow }
        #expect(chosen(1000, [2000]) == [.domain("user.example")])
        #expect(chosen(1001, [2000]) == [.domain("range.example")])
        #expect(chosen(2500, [100, 2000]) == [.domain("group.example")])
        #expect(chosen(2500, [100]) == [.domain("default.example")])
        #expect(p.evaluate(sender: .user(uid: 2500, name: nil), recipients: ["a@group.example"], groups: [2000]) == .allowed)
        #expect(p.needsGroups)
    }

    @Test func ambiguousGroupsNameBothLines() throws {
        let c = try groupConfig("""
            group sites
                allow *
            group web
                allow @localhost
            uid 5000-5999
                allow *
            user mallory
                allow *
            """)
        let members = [
            GroupMember(name: "alice", uid: 1000, groups: [1000, 2000]),  // one group rule: fine
            GroupMember(name: "bob", uid: 1002, groups: [2000, 2001]),  // two: ambiguous
            GroupMember(name: "carol", uid: 1003, groups: [2001, 2000]),  // the same pair: one error
            GroupMember(name: "mallory", uid: 1001, groups: [2000, 2001]),  // a user rule decides
            GroupMember(name: "site1", uid: 5001, groups: [2000, 2001]),  // the range decides
        ]
        #expect(ConfigParser.ambiguousGroups(c, members: members, file: "t.conf").map(\.description) == [
            "t.conf:3: ambiguous group rules: user bob (uid 1002) is in group 2000 (line 1) and group 2001 (line 3); give it a 'user' rule"
        ])
    }

    @Test func eachMemberHasItsOwnBudgetUnlessShared() async throws {
        let own = Policy(try groupConfig("group sites\n    allow *\n    messages 1 per hour\n"))
        let store = FakeQuotaStore()
        let a = Sender.user(uid: 3001, name: nil)
        let b = Sender.user(uid: 3002, name: nil)
        #expect(await own.decide(sender: a, recipients: ["x@y.org"], store: store, now: t0, groups: [2000]).kind == .relay)
        #expect(await own.decide(sender: b, recipients: ["x@y.org"], store: store, now: t0, groups: [2000]).kind == .relay)
        #expect(await own.decide(sender: a, recipients: ["x@y.org"], store: store, now: t0, groups: [2000]).kind == .defer)

        let shared = Policy(try groupConfig("group sites\n    allow *\n    messages 1 per hour\n    arbitrary 1 per day\n    shared\n"))
        let one = FakeQuotaStore()
        #expect(await shared.decide(sender: a, recipients: ["x@y.org"], store: one, now: t0, groups: [2000]).kind == .relay)
        let second = await shared.decide(sender: b, recipients: ["x@y.org"], store: one, now: t0, groups: [2000])
        #expect(second.kind == .defer && second.reason == "over the messages cap (1 messages per hour)")
        #expect(await one.sent[(Int64(1) << 32) + 2000]?.count == 1)
        #expect(await one.sent[3001] == nil)
    }

    /// freeze, warn and notify set in a `group` rule apply to its members; the global
    /// settings to everyone else.
    @Test func freezeWarnAndNotifyOfAGroupRule() throws {
        let p = Policy(try groupConfig("""
            freeze after 9 refusals per day
            warn at 90%
            notify admin@example.org
            group sites
                arbitrary 10 per day
                freeze after 2 refusals per hour
                warn at 50%
                notify web@example.org
            default
                allow @localhost
            """))
        let member = Sender.user(uid: 3001, name: nil)
        #expect(p.freezeRule(for: member, groups: [2000]) == FreezeRule(limit: 2, period: .hour))
        #expect(p.warnAt(for: member, groups: [2000]) == 50)
        #expect(p.notifyAddresses(uid: 3001, groups: [50, 2000]) == ["web@example.org"])
        #expect(p.freezeRule(for: member, groups: [50]) == FreezeRule(limit: 9, period: .day))
        #expect(p.warnAt(for: member, groups: []) == 90)
        #expect(p.notifyAddresses(uid: 3001, groups: [50]) == ["admin@example.org"])
    }
}
