// The hold settings: over_quota hold and on_refuse hold (global or per rule), hold_relay, and
// the verdicts they give at both doors.

import RestrictPolicy
import SMTPCore
import Testing

private let www = Sender.user(uid: 33, name: "www-data")

@Suite struct HoldPolicyTests {
    @Test func settingsParse() throws {
        let c = try config("hold_relay 127.0.0.1:10030\non_refuse hold\nover_quota hold\nuser www-data\n on_refuse reject\n over_quota defer\ndefault\n allow *")
        #expect(c.holdRelayHost == "127.0.0.1" && c.holdRelayPort == 10030)
        #expect(c.onRefuse == .hold && c.overQuota == .hold)
        #expect(c.rule(for: .user(uid: 33))?.onRefuse == .reject && c.rule(for: .user(uid: 33))?.overQuota == .defer)
        #expect(c.rule(for: .default)?.onRefuse == nil)
        let d = try config("default\n allow *")
        #expect(d.holdRelayHost == "127.0.0.1" && d.holdRelayPort == 10029 && d.onRefuse == .reject && d.overQuota == .defer)
    }

    @Test func settingErrors() {
        #expect(errors("on_refuse defer") == ["t.conf:1: on_refuse takes 'reject' or 'hold'"])
        #expect(errors("hold_relay unix:/x") == ["t.conf:1: bad hold_relay address 'unix:/x': use HOST:PORT or [IPV6]:PORT"])
        #expect(errors("on_refuse hold\non_refuse reject") == ["t.conf:2: on_refuse given twice (first at line 1)"])
    }

    @Test func holdRelayMustNotBeTheRelay() {
        let same = "is relay's address: held mail would be delivered (hold_relay must be the hold listener)"
        let holds = "\non_refuse hold"
        #expect(errors("hold_relay 127.0.0.1:10026" + holds) == ["t.conf:1: hold_relay 127.0.0.1:10026 " + same])
        #expect(errors("relay 127.0.0.1:10029\ndefault\n allow *\n over_quota hold") == ["t.conf:1: hold_relay 127.0.0.1:10029 " + same])
        #expect(errors("relay localhost:2525\nhold_relay 127.0.0.1:2525" + holds) == ["t.conf:2: hold_relay 127.0.0.1:2525 " + same])
        #expect(errors("relay [::1]:2525\nhold_relay [0:0::1]:2525" + holds) == ["t.conf:2: hold_relay [0:0::1]:2525 " + same])
        // Two loopback addresses may be one listener (a master.cf entry without an address).
        #expect(errors("relay 127.0.0.1:2525\nhold_relay [::1]:2525" + holds) == ["t.conf:2: hold_relay [::1]:2525 " + same])
        #expect(errors("relay 127.0.0.1:2525\nhold_relay 127.0.0.2:2525\nfreeze after 3 refusals per hour") == ["t.conf:2: hold_relay 127.0.0.2:2525 " + same])
        #expect(errors("relay 127.0.0.1:2525\nhold_relay 127.0.0.1:2526\ndefault\n allow *" + holds) == [])
        #expect(errors("relay 192.0.2.1:2525\nhold_relay 192.0.2.2:2525\ndefault\n allow *" + holds) == [])
        // Nothing is ever held: hold_relay is not used, whatever it says.
        #expect(errors("relay 127.0.0.1:10029\ndefault\n allow *") == [])
        #expect(errors("relay 127.0.0.1:10029\nfreeze after 3 refusals per hour\nfrozen defer\ndefault\n allow *") == [])
    }

    @Test func onRefuseHoldHoldsARecipientOutsideTheAllowList() throws {
        let p = Policy(try config("user www-data\n allow @example.org\n on_refuse hold"))
        let e = p.evaluate(sender: www, recipients: ["a@example.org", "x@elsewhere.test"])
        let v = Policy.verdict(e, sender: www, outcome: nil)
        #expect(v.kind == .hold && v.reason == "<x@elsewhere.test> not on the allow list")
        #expect(v.reply == Replies.notPermitted("x@elsewhere.test", who: "uid 33 (www-data)"))
        #expect(Policy.verdict(p.evaluate(sender: www, recipients: ["a@example.org"]), sender: www, outcome: nil).kind == .relay)
    }

    @Test func onRefuseHoldNeverHoldsAnUnidentifiedSender() throws {
        // Without a uid there is no one to hold for, and nothing for the admin to thaw.
        let p = Policy(try config("on_refuse hold\nunknown\n refuse"))
        let s = Sender.unidentified(reason: "no header")
        #expect(Policy.verdict(p.evaluate(sender: s, recipients: ["x@y.test"]), sender: s, outcome: nil).kind == .refuse)
    }

    @Test func overQuotaHold() throws {
        let p = Policy(try config("user www-data\n arbitrary 1 per day\n over_quota hold"))
        let e = p.evaluate(sender: www, recipients: ["x@y.test"])
        let over = QuotaOutcome(admitted: false, used: 1, limit: 1, firstRefused: "x@y.test")
        let v = Policy.verdict(e, sender: www, outcome: .success(over))
        #expect(v.kind == .hold && v.quota == "0/1 per day" && v.reason == "<x@y.test> over quota")
        #expect(v.code == 451)
        let within = QuotaOutcome(admitted: true, used: 1, limit: 1, firstRefused: nil)
        #expect(Policy.verdict(e, sender: www, outcome: .success(within)).kind == .relay)
    }

    @Test func theSMTPDoorAnswersHOLD() {
        let reply = Replies.overQuota("x@y.test", limit: 1, period: " per day", who: "uid 33 (www-data)", permanent: false)
        #expect(Replies.policyHold(reply).description == "HOLD 4.7.1 <x@y.test>: quota of 1 arbitrary recipients per day exhausted for uid 33 (www-data)")
        // A permanent refusal's text is held with a temporary code: the message is kept.
        #expect(Replies.policyHold(Replies.notPermitted("x@y.test", who: "uid 33")).description == "HOLD 4.7.1 <x@y.test>: not permitted for uid 33")
    }
}

@Suite struct FreezePolicyTests {
    @Test func settingsParse() throws {
        let c = try config("freeze after 3 refusals per hour\nfrozen defer\nuser www-data\n freeze after 10 refusals per day\ndefault\n allow *")
        #expect(c.freeze == FreezeRule(limit: 3, period: .hour) && c.frozenAction == .defer)
        #expect(c.rule(for: .user(uid: 33))?.freeze == FreezeRule(limit: 10, period: .day))
        let p = Policy(c)
        #expect(p.freezes)
        #expect(p.freezeRule(for: www, groups: []) == FreezeRule(limit: 10, period: .day))
        #expect(p.freezeRule(for: .user(uid: 1000, name: nil), groups: []) == FreezeRule(limit: 3, period: .hour))
        #expect(p.freezeRule(for: .unidentified(reason: "x"), groups: []) == nil)
        let none = try config("default\n allow *")
        #expect(none.freeze == nil && none.frozenAction == .hold && !Policy(none).freezes)
    }

    @Test func settingErrors() {
        let e = "freeze takes 'after N refusals per hour|day' with N from 1 to 100000"
        #expect(errors("freeze after 0 refusals per hour") == ["t.conf:1: \(e)"])
        #expect(errors("freeze after 3 refusals per week") == ["t.conf:1: \(e)"])
        #expect(errors("freeze 3 per hour") == ["t.conf:1: \(e)"])
        #expect(errors("frozen bounce") == ["t.conf:1: frozen takes 'hold' or 'defer'"])
        #expect(errors("default\n frozen hold") == ["t.conf:2: frozen is a global setting: move it above the first rule"])
    }

    @Test func whatStrikes() throws {
        let p = Policy(try config("user www-data\n allow @example.org\n arbitrary 1 per day\n over_quota hold"))
        let allowed = p.evaluate(sender: www, recipients: ["a@example.org"])
        #expect(!Policy.strikes(allowed, Policy.verdict(allowed, sender: www, outcome: nil)))
        let quota = p.evaluate(sender: www, recipients: ["x@y.test"])
        let over = Policy.verdict(quota, sender: www, outcome: .success(QuotaOutcome(admitted: false, used: 1, limit: 1, firstRefused: "x@y.test")))
        let within = Policy.verdict(quota, sender: www, outcome: .success(QuotaOutcome(admitted: true, used: 1, limit: 1, firstRefused: nil)))
        struct Down: Error {}
        let broken = Policy.verdict(quota, sender: www, outcome: .failure(Down()))
        #expect(Policy.strikes(quota, over) && !Policy.strikes(quota, within) && !Policy.strikes(quota, broken))
        let q = Policy(try config("user www-data\n allow @example.org"))
        let refused = q.evaluate(sender: www, recipients: ["x@y.test"])
        #expect(Policy.strikes(refused, Policy.verdict(refused, sender: www, outcome: nil)))
    }

    @Test func aFrozenSendersVerdict() {
        let state = FrozenState(uid: 33, since: 1_700_000_000, reason: "3 refusals per hour")
        let held = Policy.frozenVerdict(state, sender: www, action: .hold)
        #expect(held.kind == .hold && held.reason == "uid frozen since 1700000000 (3 refusals per hour)")
        let deferred = Policy.frozenVerdict(state, sender: www, action: .defer)
        #expect(deferred.kind == .defer && deferred.reply.description == "451 4.7.1 Mail from uid 33 (www-data) is frozen until the administrator releases it")
    }
}
