// `allow local`: postconf's output parsed, and the pattern matching only those domains.

import RestrictPolicy
import Testing

@Suite struct LocalDomainsTests {
    @Test func parsesPostconfOutput() {
        let text = """
            lab.localdomain, localhost.localdomain, localhost
            hash:/etc/postfix/vdomains Mail.Example.NET.
            /etc/postfix/patterns
            postconf: warning: /etc/postfix/main.cf: unused parameter: x=y

            """
        let (domains, skipped) = LocalDomains.parse(text)
        #expect(domains == ["lab.localdomain", "localhost.localdomain", "localhost", "mail.example.net"])
        #expect(skipped == ["hash:/etc/postfix/vdomains", "/etc/postfix/patterns"])
        #expect(LocalDomains.parse("\n\n\n").domains.isEmpty)
    }

    @Test func allowLocalMatchesOnlyPostfixsDomains() throws {
        let c = try config("postconf_dir /etc/postfix-out\nuser www-data\n    allow local\n")
        #expect(c.postconfDir == "/etc/postfix-out")
        #expect(c.usesLocalDomains)
        let p = Policy(c, localDomains: ["lab.localdomain", "localhost"])
        let www = Sender.user(uid: 33, name: "www-data")
        #expect(p.evaluate(sender: www, recipients: ["alice@lab.localdomain", "Bob+x@LOCALHOST"]) == .allowed)
        #expect(p.evaluate(sender: www, recipients: ["alice@sub.lab.localdomain"]) != .allowed)
        #expect(p.evaluate(sender: www, recipients: ["x@example.com"]) != .allowed)
        // A local part that routes onward is not local mail.
        #expect(p.evaluate(sender: www, recipients: ["victim%gmail.example@localhost"]) != .allowed)
        // postconf failed: local matches nothing, never everything.
        #expect(Policy(c).evaluate(sender: www, recipients: ["alice@lab.localdomain"]) != .allowed)
    }

    @Test func configErrors() throws {
        #expect(errors("postconf_dir etc/postfix\n") == ["t.conf:1: postconf_dir must be an absolute path"])
        #expect(try config("user www-data\n    allow @localhost\n").usesLocalDomains == false)
    }
}
