// Volume caps through the content filter's session: the reply names the cap, the decision
// line carries each cap's state, and a refused message spends nothing.

import RestrictPolicy
import Testing

@testable import RestrictDaemon

@Suite("Session: volume caps", .serialized, .timeLimit(.minutes(2)))
struct SessionCapsTests {
    static let rules = """
        user root
            allow @example.com
            messages 1 per hour
            recipients 5 per day
            max_recipients 2
        """

    @Test("over max_recipients: 451 4.7.1 naming the cap, nothing spent; then one message, then the messages cap")
    func capsInASession() async throws {
        try await withDaemon(Self.rules) { h in
            let client = try await h.ready()
            let three = try await SessionPolicyTests.transaction(client, recipients: ["a@example.com", "b@example.com", "c@example.com"])
            #expect(three.lines == ["451 4.7.1 cap of 2 recipients per message reached for uid 0 (root)"])
            SessionPolicyTests.expectRelayReset(h)
            let refused = h.logs.decisions.first?.message ?? ""
            #expect(refused.contains(#" verdict=deferred reason="over the max_recipients cap (2 recipients per message)" messages="1/1 per hour" recipients="5/5 per day""#), "\(refused)")
            // Nothing was spent: a message of two fits.
            #expect(try await client.command("RSET").code == 250)
            let two = try await SessionPolicyTests.transaction(client, recipients: ["a@example.com", "b@example.com"])
            #expect(two.code == 250, "\(two)")
            let relayed = h.logs.decisions.dropFirst().first?.message ?? ""
            #expect(relayed.contains(#" verdict=relayed reason="allowed" messages="0/1 per hour" recipients="3/5 per day""#), "\(relayed)")
            let again = try await SessionPolicyTests.transaction(client, recipients: ["a@example.com"])
            #expect(again.lines == ["451 4.7.1 cap of 1 messages per hour reached for uid 0 (root)"])
        }
    }
}
