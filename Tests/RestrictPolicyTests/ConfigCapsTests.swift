// restrictpd.conf(5) volume caps: what the parser takes, and its errors on the right lines.

import RestrictPolicy
import Testing

@Suite struct ConfigCapsTests {
    @Test func capsInARule() throws {
        let c = try config("""
            user www-data
                allow *
                messages 50 per hour
                recipients 200 per day
                max_recipients 10
            default
                messages 5 per week
            """)
        let www = c.rule(for: .user(uid: 33))
        #expect(www?.caps == VolumeCaps(
            messages: VolumeCap(kind: .messages, limit: 50, period: .hour),
            recipients: VolumeCap(kind: .recipients, limit: 200, period: .day), maxRecipients: 10))
        #expect(c.rule(for: .default)?.caps.messages == VolumeCap(kind: .messages, limit: 5, period: .week))
        #expect(c.rule(for: .default)?.caps.recipients == nil)
    }

    @Test func capErrorsOnTheirLines() {
        let text = """
            messages 5 per hour
            user www-data
                messages 5
                messages 5 per fortnight
                recipients -1 per day
                recipients 10 per day
                recipients 11 per day
                max_recipients 0
                max_recipients 3 4
            unknown
                messages 1 per hour
            user alice
                refuse
                max_recipients 2
            """
        #expect(errors(text) == [
            "t.conf:1: messages outside a rule: start one with 'user NAME' or 'default'",
            "t.conf:3: messages takes 'N per hour|day|week' with N from 0 to 10000000",
            "t.conf:4: unknown period 'fortnight': use hour, day or week",
            "t.conf:5: recipients takes 'N per hour|day|week' with N from 0 to 10000000",
            "t.conf:7: recipients given twice in one rule",
            "t.conf:8: max_recipients takes N with N from 1 to 100000",
            "t.conf:9: max_recipients takes N with N from 1 to 100000",
            "t.conf:11: messages has no meaning for unknown senders (there is no uid to count for)",
            "t.conf:12: a rule with 'refuse' sends nothing: it takes no messages, recipients or max_recipients",
        ])
    }
}
