// restrictpd --audit: the checks of the wiring around restrictpd from what postconf, nft and
// systemd report: the content filter's smtp client's header checks, the hold listener, the
// firewall table (read from `nft -j list ruleset` fixtures) and the systemd service.

import RestrictPolicy
import Testing

@testable import RestrictDaemon

private func parsed(_ text: String) throws -> Configuration {
    let users = UserResolver { $0 == "www-data" ? 33 : ($0 == "postfix" ? 102 : nil) }
    return try ConfigParser.parse(text, file: "t.conf", users: users).get()
}

private func audit(_ r: Configuration, main: [String: String] = [:], services: [PostfixService]) -> PostfixAudit {
    PostfixAudit(postfix: PostfixConfig(main: main, services: services), restrictpd: r)
}

@Suite struct AuditFilterHeaderTests {
    static let prepend = "inline:{ { /^Subject:/ = PREPEND X-A: b } }"

    static func pickup(_ filter: String) -> PostfixService {
        PostfixService(name: "pickup", type: "unix", command: "pickup", overrides: ["content_filter": filter])
    }

    @Test func smtpHeaderChecksOfTheFilterTransport() throws {
        let smtp = PostfixService(name: "smtp", type: "unix", command: "smtp")
        let services = [Self.pickup("smtp:[127.0.0.1]:10027"), smtp]
        let failed = audit(Configuration(), main: ["smtp_header_checks": Self.prepend], services: services).filterHeaders()
        #expect(failed.name == "postfix.smtp-header-checks" && failed.status == .fail)
        #expect(failed.detail.contains("PREPENDs headers in smtp/unix, the smtp client of pickup's content_filter"))
        #expect(failed.fix.contains("-o smtp_header_checks= -o smtp_mime_header_checks= -o smtp_nested_header_checks= on smtp in master.cf"))
        let nested = audit(Configuration(), main: ["smtp_nested_header_checks": Self.prepend], services: services).filterHeaders()
        #expect(nested.status == .fail)
        var quiet = smtp
        quiet.overrides["smtp_header_checks"] = ""
        #expect(audit(Configuration(), main: ["smtp_header_checks": Self.prepend], services: [Self.pickup("smtp:[127.0.0.1]:10027"), quiet]).filterHeaders().status == .ok)
        // cleanup's header_checks are postfix.header-checks' business, not the smtp client's.
        #expect(audit(Configuration(), main: ["header_checks": Self.prepend], services: services).filterHeaders().status == .ok)
    }

    @Test func aNamedLmtpTransportUsesItsOwnParameters() throws {
        let scan = PostfixService(name: "scan", type: "unix", command: "lmtp", overrides: ["lmtp_mime_header_checks": Self.prepend])
        let services = [Self.pickup("scan:[127.0.0.1]:10027"), PostfixService(name: "smtp", type: "unix", command: "smtp"), scan]
        let check = audit(Configuration(), main: ["smtp_header_checks": Self.prepend], services: services).filterHeaders()
        #expect(check.status == .fail && check.detail.contains("scan/unix, the lmtp client"))
        var clean = scan
        clean.overrides = [:]
        let ok = audit(Configuration(), main: ["smtp_header_checks": Self.prepend], services: [services[0], services[1], clean]).filterHeaders()
        #expect(ok.status == .ok)
        let missing = audit(Configuration(), services: [Self.pickup("nowhere:[127.0.0.1]:10027")]).filterHeaders()
        #expect(missing.status == .warn)
    }
}

@Suite struct AuditHoldListenerTests {
    static let holding = PostfixService(name: "127.0.0.1:10029", type: "inet", command: "smtpd",
                                        overrides: ["smtpd_client_restrictions": "check_client_access,static:HOLD"])

    @Test func nothingHeldNothingNeeded() throws {
        let c = try parsed("freeze after 3 refusals per hour\nfrozen defer\ndefault\n allow *")
        #expect(c.holdReasons.isEmpty)
        let check = audit(c, services: []).holdListener()
        #expect(check.name == "postfix.hold-listener" && check.status == .ok && check.detail.contains("holds no mail"))
    }

    @Test func whatHolds() throws {
        #expect(try parsed("over_quota hold\non_refuse hold").holdReasons == ["over_quota hold", "on_refuse hold"])
        #expect(try parsed("user www-data\n allow *\n on_refuse hold").holdReasons == ["on_refuse hold in user www-data"])
        #expect(try parsed("default\n over_quota hold").holdReasons == ["over_quota hold in default"])
        #expect(try parsed("user www-data\n freeze after 2 refusals per day").holdReasons == ["freeze with frozen hold"])
    }

    @Test func theListenerMustHoldEverything() throws {
        let c = try parsed("over_quota hold\ndefault\n allow *")
        #expect(audit(c, services: [Self.holding]).holdListener().status == .ok)
        var anyAddress = Self.holding
        anyAddress.name = "10029"
        #expect(audit(c, services: [anyAddress]).holdListener().status == .ok)
        let missing = audit(c, services: []).holdListener()
        #expect(missing.status == .fail && missing.detail.contains("no smtpd service in master.cf listens on hold_relay 127.0.0.1:10029"))
        var leaking = Self.holding
        leaking.overrides["smtpd_client_restrictions"] = "permit_mynetworks, reject"
        let open = audit(c, services: [leaking]).holdListener()
        #expect(open.status == .fail && open.detail.contains("held mail would be delivered (over_quota hold)"))
        #expect(open.fix.contains("-o smtpd_client_restrictions=check_client_access,static:HOLD"))
    }

    @Test func holdRelayIsNotTheRelay() throws {
        // The parser refuses this; a configuration made otherwise still fails the audit.
        var c = try parsed("on_refuse hold\ndefault\n allow *")
        c.holdRelayHost = "localhost"
        c.holdRelayPort = c.relayPort
        let reinjection = PostfixService(name: "127.0.0.1:10026", type: "inet", command: "smtpd")
        let check = audit(c, services: [reinjection, Self.holding]).holdListener()
        #expect(check.status == .fail && check.detail.contains("is relay's address: held mail would be delivered"))
    }
}

@Suite struct AuditFirewallTests {
    func table(_ text: String) throws -> FirewallTable? { FirewallTable.parse(try #require(JSONValue.parse(text))) }

    @Test func theShippedExampleGuardsEverything() throws {
        let t = try #require(try self.table(NftFixture.shipped))
        for port in [10026, 10027, 10029] { #expect(t.guardsLoopback(port) && !t.guardsOutbound(port), "\(port)") }
        // This host's SMTP ports stay open (the policy service judges them); other hosts' are closed.
        for port in [25, 465, 587] { #expect(t.guardsOutbound(port) && !t.guardsLoopback(port), "\(port)") }
        #expect(!t.guardsOutbound(443))
        var hold = Configuration()
        hold.overQuota = .hold
        #expect(SystemAudit.firewallVerdict(t, Configuration()).status == .ok)
        #expect(SystemAudit.firewallVerdict(t, hold).status == .ok)
    }

    @Test func theNoPolicyFileAloneIsNotTheTable() throws {
        #expect(try self.table(NftFixture.noPolicyAlone) == nil)
        let check = SystemAudit.firewallVerdict(nil, Configuration())
        #expect(check.status == .fail && check.detail.contains("table inet restrictpd is not loaded"))
        #expect(check.fix.hasPrefix("nft -f /usr/share/doc/restrictpd/examples/nftables/restrictpd.nft;"))
    }

    @Test func theReinjectionRuleAloneLacksOutboundSMTP() throws {
        let t = try #require(try self.table(NftFixture.reinjectionOnly))
        #expect(t.guardsLoopback(10026) && !t.guardsLoopback(10029) && !t.guardsOutbound(25))
        let check = SystemAudit.firewallVerdict(t, Configuration())
        #expect(check.status == .fail)
        #expect(check.detail == "table inet restrictpd is loaded but has no outbound SMTP rule (tcp dport 25, 465, 587 to other hosts with a meta skuid check)")
        var hold = Configuration()
        hold.onRefuse = .hold
        #expect(SystemAudit.firewallVerdict(t, hold).detail.contains("no meta skuid check that refuses other users on port 10029 (the hold listener, hold_relay)"))
        var moved = Configuration()
        moved.relayPort = 10030
        #expect(SystemAudit.firewallVerdict(t, moved).detail.contains("port 10030 (the reinjection smtpd, relay)"))
    }

    static func ruleset(chains: String, rules: [(chain: String, expr: String)], family: String = "inet") -> String {
        let items = [#"{"table": {"family": "\#(family)", "name": "restrictpd"}}"#, chains]
            + rules.map { #"{"rule": {"family": "\#(family)", "table": "restrictpd", "chain": "\#($0.chain)", "expr": [\#($0.expr)]}}"# }
        return #"{"nftables": [\#(items.joined(separator: ", "))]}"#
    }

    static let output = #"{"chain": {"family": "inet", "table": "restrictpd", "name": "output", "hook": "output"}}, {"chain": {"family": "inet", "table": "restrictpd", "name": "other"}}"#
    static func dport(_ right: String) -> String { #"{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": \#(right)}}"# }
    static let skuid = #"{"match": {"op": "!=", "left": {"meta": {"key": "skuid"}}, "right": 0}}"#
    static let owner = #"{"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": 0}}"#

    @Test func ruleShapes() throws {
        // A range and drop count; a rule that only accepts, a rule outside an output base chain,
        // a jump to a chain that refuses nobody, and another family's table do not.
        let ranged = try #require(try self.table(Self.ruleset(chains: Self.output, rules: [("output", Self.dport(#"{"set": [{"range": [20, 30]}, 587]}"#) + ", " + Self.skuid + #", {"drop": null}"#)])))
        #expect(ranged.guardsOutbound(25) && ranged.guardsLoopback(587) && !ranged.guardsOutbound(465))
        let accepting = try #require(try self.table(Self.ruleset(chains: Self.output, rules: [("output", Self.dport("25") + ", " + Self.skuid + #", {"accept": null}"#)])))
        #expect(!accepting.guardsOutbound(25))
        let elsewhere = try #require(try self.table(Self.ruleset(chains: Self.output, rules: [("other", Self.dport("25") + ", " + Self.skuid + #", {"reject": null}"#)])))
        #expect(!elsewhere.guardsOutbound(25))
        let jumpRules = [("output", Self.dport("25") + #", {"jump": {"target": "other"}}"#), ("other", Self.owner + #", {"accept": null}"#)]
        #expect(try self.table(Self.ruleset(chains: Self.output, rules: jumpRules))?.guardsOutbound(25) == false)
        let refusing = jumpRules + [("other", #"{"reject": null}"#)]
        #expect(try self.table(Self.ruleset(chains: Self.output, rules: refusing))?.guardsOutbound(25) == true)
        #expect(try self.table(Self.ruleset(chains: Self.output, rules: refusing, family: "ip")) == nil)
    }

    /// Rules that name the owner the wrong way round, or come too late, guard nothing.
    @Test func whatLooksLikeAGuardButIsNot() throws {
        let guarded = { (rules: [(chain: String, expr: String)]) in try self.table(Self.ruleset(chains: Self.output, rules: rules))?.guardsOutbound(25) }
        // Drops root's connections only.
        #expect(try guarded([("output", Self.dport("25") + ", " + Self.owner + #", {"drop": null}"#)]) == false)
        // Accepts everyone but root, then refuses root.
        let allButRoot = [("output", Self.dport("25") + #", {"jump": {"target": "other"}}"#),
                          ("other", Self.skuid + #", {"accept": null}"#), ("other", #"{"reject": null}"#)]
        #expect(try guarded(allButRoot) == false)
        // A refusal with a condition of its own does not refuse the rest.
        let conditional = [("output", Self.dport("25") + #", {"jump": {"target": "other"}}"#),
                           ("other", Self.owner + #", {"accept": null}"#), ("other", Self.dport("26") + #", {"reject": null}"#)]
        #expect(try guarded(conditional) == false)
        // The shipped shape, with an accept of port 25 before it, or of everything.
        let guardRule = ("output", Self.dport("25") + ", " + Self.skuid + #", {"reject": null}"#)
        #expect(try guarded([guardRule]) == true)
        #expect(try guarded([("output", Self.dport("25") + #", {"accept": null}"#), guardRule]) == false)
        #expect(try guarded([("output", Self.dport("587") + #", {"accept": null}"#), guardRule]) == true)
        #expect(try guarded([("output", #"{"accept": null}"#), guardRule]) == false)
        #expect(try guarded([guardRule, ("output", Self.dport("25") + #", {"accept": null}"#)]) == true)
    }
}

@Suite struct AuditServiceTests {
    @Test func installedMeansRunning() {
        #expect(SystemAudit.serviceVerdict(systemd: false, unitFile: nil, state: nil).status == .warn)
        let absent = SystemAudit.serviceVerdict(systemd: true, unitFile: nil, state: nil)
        #expect(absent.status == .warn && absent.detail.hasPrefix("restrictpd.service is not installed"))
        let unit = "/lib/systemd/system/restrictpd.service"
        let inactive = SystemAudit.serviceVerdict(systemd: true, unitFile: unit, state: .success("inactive"))
        #expect(inactive.status == .fail && inactive.detail == "restrictpd.service (\(unit)) is inactive")
        #expect(SystemAudit.serviceVerdict(systemd: true, unitFile: unit, state: .success("active")).status == .ok)
        #expect(SystemAudit.serviceVerdict(systemd: true, unitFile: unit, state: .failure(SystemError("no systemctl", errno: 0))).status == .warn)
    }
}
