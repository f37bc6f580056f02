// Volume caps (messages, recipients, max_recipients) through the daemon's own path:
// Policy.decide with an in-memory store and an injected clock.

import RestrictPolicy
import SMTPCore
import Testing

private let t0: Int64 = 1_700_000_000
private let www = Sender.user(uid: 33, name: "www-data")

private func policy(_ body: String) throws -> Policy {
    Policy(try config("user www-data\n" + body))
}

@Suite struct VolumeCapsTests {
    @Test func messagesExactlyNThenDeferred() async throws {
        let p = try policy("allow webmaster@example.org\nmessages 3 per hour\n")
        let store = FakeQuotaStore()
        for i in 0..<3 {
            let v = await p.decide(sender: www, recipients: ["webmaster@example.org"], store: store, now: t0 + Int64(i))
            #expect(v.kind == .relay && v.reason == "allowed")
            #expect(v.messages == "\(2 - i)/3 per hour")
        }
        let fourth = await p.decide(sender: www, recipients: ["webmaster@example.org"], store: store, now: t0 + 10)
        #expect(fourth.kind == .defer)
        #expect(fourth.reply == SMTPReply(451, "4.7.1", "cap of 3 messages per hour reached for uid 33 (www-data)"))
        #expect(fourth.reason == "over the messages cap (3 messages per hour)")
        #expect(fourth.messages == "0/3 per hour")
    }

    @Test func messagesWindowSlides() async throws {
        let p = try policy("allow *\nmessages 2 per hour\n")
        let store = FakeQuotaStore()
        #expect(await p.decide(sender: www, recipients: ["a@x.org"], store: store, now: t0).kind == .relay)
        #expect(await p.decide(sender: www, recipients: ["a@x.org"], store: store, now: t0 + 1000).kind == .relay)
        // A message counts for one period after it was accepted: at t0 + 3600 the first still counts.
        #expect(await p.decide(sender: www, recipients: ["a@x.org"], store: store, now: t0 + 3600).kind == .defer)
        #expect(await p.decide(sender: www, recipients: ["a@x.org"], store: store, now: t0 + 3601).kind == .relay)
        #expect(await p.decide(sender: www, recipients: ["a@x.org"], store: store, now: t0 + 3602).kind == .defer)
        #expect(await p.decide(sender: www, recipients: ["a@x.org"], store: store, now: t0 + 4601).kind == .relay)
    }

    @Test func recipientsCapCountsEveryRecipient() async throws {
        let p = try policy("allow *\nrecipients 5 per day\n")
        let store = FakeQuotaStore()
        let three = await p.decide(sender: www, recipients: ["a@x.org", "b@x.org", "c@x.org"], store: store, now: t0)
        #expect(three.kind == .relay && three.recipients == "2/5 per day")
        // 3 + 3 > 5: deferred whole, nothing spent.
        let over = await p.decide(sender: www, recipients: ["d@x.org", "e@x.org", "f@x.org"], store: store, now: t0 + 1)
        #expect(over.kind == .defer && over.recipients == "2/5 per day")
        #expect(over.reply.lines[0].contains("cap of 5 recipients per day reached"))
        // Exactly N: 3 + 2 = 5 fits.
        let two = await p.decide(sender: www, recipients: ["d@x.org", "e@x.org"], store: store, now: t0 + 2)
        #expect(two.kind == .relay && two.recipients == "0/5 per day")
        #expect(await p.decide(sender: www, recipients: ["g@x.org"], store: store, now: t0 + 3).kind == .defer)
        #expect(await p.decide(sender: www, recipients: ["g@x.org"], store: store, now: t0 + 86401).kind == .relay)
    }

    @Test func maxRecipientsPerMessage() async throws {
        let p = try policy("allow *\nmax_recipients 2\nover_quota reject\n")
        let store = FakeQuotaStore()
        #expect(await p.decide(sender: www, recipients: ["a@x.org", "b@x.org"], store: store, now: t0).kind == .relay)
        let three = await p.decide(sender: www, recipients: ["a@x.org", "b@x.org", "c@x.org"], store: store, now: t0)
        #expect(three.kind == .refuse)
        #expect(three.reply == SMTPReply(550, "5.7.1", "cap of 2 recipients per message reached for uid 33 (www-data)"))
        #expect(three.reason == "over the max_recipients cap (2 recipients per message)")
        // Nothing counted: no row for a rule without counted caps.
        #expect(await store.sent[33] == nil)
    }

    @Test func capsCombinedWithArbitrary() async throws {
        let p = try policy("allow webmaster@example.org\narbitrary 2 per day\nmessages 3 per hour\n")
        let store = FakeQuotaStore()
        let first = await p.decide(sender: www, recipients: ["x@y.org", "webmaster@example.org"], store: store, now: t0)
        #expect(first.kind == .relay && first.reason == "within quota" && first.quota == "1/2 per day" && first.messages == "2/3 per hour")
        // Arbitrary refuses: the cap is not spent either.
        let over = await p.decide(sender: www, recipients: ["p@y.org", "q@y.org"], store: store, now: t0 + 1)
        #expect(over.kind == .defer && over.reason == "<q@y.org> over quota" && over.messages == "2/3 per hour")
        #expect(await store.sent[33]?.count == 1)
        #expect(await p.decide(sender: www, recipients: ["webmaster@example.org"], store: store, now: t0 + 2).kind == .relay)
        #expect(await p.decide(sender: www, recipients: ["x@y.org"], store: store, now: t0 + 3).kind == .relay)
        // The cap refuses: the new arbitrary address is not counted either.
        let capped = await p.decide(sender: www, recipients: ["z@y.org"], store: store, now: t0 + 4)
        #expect(capped.kind == .defer && capped.reason == "over the messages cap (3 messages per hour)")
        #expect(capped.quota == "1/2 per day")
        #expect(await store.counted(33) == ["x@y.org"])
    }

    @Test func nothingSpentOnRefusal() async throws {
        let p = try policy("allow @example.org\nmessages 1 per hour\nrecipients 1 per hour\n")
        let store = FakeQuotaStore()
        // A recipient no rule allows: refused before the store is asked.
        let refused = await p.decide(sender: www, recipients: ["a@example.org", "b@elsewhere.org"], store: store, now: t0)
        #expect(refused.kind == .refuse && refused.reply.code == 550)
        #expect(await store.requests.isEmpty)
        // Two recipients exceed `recipients 1`: deferred, and the message cap stays unspent.
        #expect(await p.decide(sender: www, recipients: ["a@example.org", "b@example.org"], store: store, now: t0).kind == .defer)
        #expect(await store.sent[33] == nil)
        #expect(await p.decide(sender: www, recipients: ["a@example.org"], store: store, now: t0 + 1).kind == .relay)
        // A store that cannot answer defers with 4.3.0 and spends nothing.
        await store.setFailing(true)
        #expect(await p.decide(sender: www, recipients: ["a@example.org"], store: store, now: t0 + 2).reply == Replies.storeUnavailable)
        await store.setFailing(false)
        #expect(await store.sent[33]?.count == 1)
    }

    @Test func capsPerUidAndRuleWithoutCapsAsksNoStore() async throws {
        let p = Policy(try config("user www-data\nallow *\nmessages 1 per hour\nuser alice\nallow *\n"))
        let store = FakeQuotaStore()
        #expect(await p.decide(sender: www, recipients: ["a@x.org"], store: store, now: t0).kind == .relay)
        #expect(await p.decide(sender: www, recipients: ["a@x.org"], store: store, now: t0).kind == .defer)
        let alice = Sender.user(uid: 1000, name: "alice")
        #expect(await p.decide(sender: alice, recipients: ["a@x.org"], store: store, now: t0).kind == .relay)
        #expect(await store.requests.count == 2)
        #expect(p.evaluate(sender: alice, recipients: ["a@x.org"]) == .allowed)
    }

    @Test func heldVolumeCountsAsSpent() {
        let caps = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 3, period: .hour), recipients: VolumeCap(kind: .recipients, limit: 10, period: .hour))
        let request = QuotaRequest(
            uid: 33, addresses: [], quota: nil, now: t0, caps: caps, recipients: 4, heldVolume: HeldVolume(messages: 1, recipients: 5))
        let (states, refused) = QuotaArithmetic.decideCaps(request, counted: [.messages: 1, .recipients: 1])
        #expect(refused == nil)
        #expect(QuotaArithmetic.spent(states, request).map(\.used) == [3, 10])
        let more = QuotaRequest(
            uid: 33, addresses: [], quota: nil, now: t0, caps: caps, recipients: 5, heldVolume: HeldVolume(messages: 1, recipients: 5))
        #expect(QuotaArithmetic.decideCaps(more, counted: [.messages: 1, .recipients: 1]).refused == .cap(VolumeCap(kind: .recipients, limit: 10, period: .hour)))
    }
}

@Suite struct CapsFailClosedTests {
    @Test func aStoreThatDoesNotCountVolumeRefusesInsteadOfAdmitting() {
        let caps = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 100, period: .hour))
        let request = QuotaRequest(uid: 33, addresses: ["a@x"], quota: Quota(limit: 5, period: .day), now: 0, caps: caps, recipients: 1)
        let (outcome, record) = QuotaArithmetic.decide(request, counted: [])
        #expect(!outcome.admitted && record.isEmpty)
        #expect(outcome.refusedCap == .cap(VolumeCap(kind: .messages, limit: 100, period: .hour)))
        let plain = QuotaRequest(uid: 33, addresses: ["a@x"], quota: Quota(limit: 5, period: .day), now: 0)
        #expect(QuotaArithmetic.decide(plain, counted: []).0.admitted)
    }
}
