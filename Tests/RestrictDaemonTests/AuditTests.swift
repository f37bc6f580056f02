// restrictpd --audit's pure parts (the JSON reader and writer, postconf's output, Postfix's
// list and endpoint syntax, the smtpd guard rule, header_checks actions; the firewall, hold
// listener and service checks are in AuditWiringTests.swift) and its C helpers (bounded
// subprocesses; probes as another user, when run as root).

import RestrictPolicy
import Testing

@testable import RestrictDaemon

#if canImport(Glibc)
import Glibc
#endif

@Suite struct AuditJSONTests {
    @Test func decodesEscapes() {
        #expect(JSONValue.parse(#""a\"b\\c\/d\n\u00e9\ud83d\ude00""#) == .string("a\"b\\c/d\né😀"))
        #expect(JSONValue.parse("[1, -2.5e3, true, false, null]") == .array([.number(1), .number(-2500), .bool(true), .bool(false), .null]))
    }

    @Test func refusesWhatIsNotJSON() {
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "\"\\ud83d\"", "\"a\u{01}\"", "tru", "[1] x", "{\"a\":1,}"] {
            #expect(JSONValue.parse(bad) == nil, "\(bad)")
        }
        let deep = String(repeating: "[", count: 100) + String(repeating: "]", count: 100)
        #expect(JSONValue.parse(deep) == nil)
    }

    @Test func quoteRoundTrips() {
        let s = "tab\there \"q\" back\\slash \u{01} nl\n é"
        #expect(JSONValue.parse(JSONText.quote(s)) == .string(s))
    }

    @Test func reportTextAndJSONCarryTheSameChecks() throws {
        let report = AuditReport(checks: [
            .ok("a.one", "fine"), .fail("b.two", "broken\nline", fix: "mend it"), .warn("c.three", "odd", fix: "look"),
        ])
        #expect(report.failed)
        #expect(report.textLines == ["OK   a.one: fine", "FAIL b.two: broken line -- fix: mend it", "WARN c.three: odd -- fix: look"])
        let doc = try #require(JSONValue.parse(report.json))
        #expect(doc["ok"] == .bool(false))
        let names = try #require(doc["checks"]?.arrayValue).map { $0["name"]?.stringValue }
        #expect(names == ["a.one", "b.two", "c.three"])
    }
}

@Suite struct AuditPostconfTests {
    static let master = """
        smtp       inet  n       -       y       -       -       smtpd
        pickup     unix  n       -       y       60      1       pickup -o content_filter=smtp:[127.0.0.1]:10027
        127.0.0.1:10026 inet n   -       n       -       10      smtpd -o content_filter= -o {smtpd_relay_restrictions=permit_mynetworks, reject}
        postconf: warning: something
        """
    static let overrides = """
        pickup/unix/content_filter = smtp:[127.0.0.1]:10027
        127.0.0.1:10026/inet/content_filter =
        127.0.0.1:10026/inet/smtpd_relay_restrictions = permit_mynetworks, reject
        """

    @Test func parsesServicesAndOverrides() throws {
        let services = Postconf.services(Self.master, overrides: Self.overrides)
        #expect(services.map(\.id) == ["smtp/inet", "pickup/unix", "127.0.0.1:10026/inet"])
        let relay = try #require(services.last)
        #expect(relay.command == "smtpd")
        #expect(relay.overrides == ["content_filter": "", "smtpd_relay_restrictions": "permit_mynetworks, reject"])
    }

    @Test func parsesParameters() {
        let p = Postconf.parameters("a = 1\nb =\nc = x = y\npostconf: warning: d = e\n")
        #expect(p == ["a": "1", "b": "", "c": "x = y"])
    }

    @Test func effectiveValueIsOverrideThenMainThenDefault() {
        let s = PostfixService(name: "smtp", type: "inet", command: "smtpd", overrides: ["x": "o"])
        let c = PostfixConfig(main: ["x": "m", "y": "m"], defaults: ["x": "d", "y": "d", "z": "d"], services: [s])
        #expect(c.value("x", in: s) == "o")
        #expect(c.value("y", in: s) == "m")
        #expect(c.value("z", in: s) == "d")
        #expect(c.value("x") == "m")
    }

    @Test func listsAndPolicyServers() {
        #expect(PostfixList.items("a, b\tc,,d") == ["a", "b", "c", "d"])
        let items = PostfixList.items("check_policy_service { inet:127.0.0.1:10028, timeout=10s }, permit_mynetworks")
        #expect(items == ["check_policy_service", "{ inet:127.0.0.1:10028, timeout=10s }", "permit_mynetworks"])
        #expect(PostfixList.policyServer(items[1]) == "inet:127.0.0.1:10028")
    }

    @Test func endpoints() {
        #expect(InetEndpoint.parse("smtp") == InetEndpoint(host: nil, port: 25))
        #expect(InetEndpoint.parse("[::1]:10026") == InetEndpoint(host: "::1", port: 10026))
        #expect(InetEndpoint.parse("127.0.0.1:submission") == InetEndpoint(host: "127.0.0.1", port: 587))
        #expect(InetEndpoint.parse("nonsense") == nil)
        let listen: [ListenAddress] = [.tcp(host: "127.0.0.1", port: 10027), .unix(path: "/run/restrictpd/policy.sock")]
        #expect(AuditEndpoints.filterNames("smtp:[127.0.0.1]:10027", oneOf: listen, queueDirectory: "/q"))
        #expect(AuditEndpoints.filterNames("smtp:localhost:10027", oneOf: listen, queueDirectory: "/q"))
        #expect(!AuditEndpoints.filterNames("smtp:[127.0.0.1]", oneOf: listen, queueDirectory: "/q"))
        #expect(!AuditEndpoints.filterNames("smtp:[127.0.0.2]:10027", oneOf: listen, queueDirectory: "/q"))
        #expect(AuditEndpoints.names("unix:/run/restrictpd/policy.sock", oneOf: listen, queueDirectory: "/q"))
        #expect(!AuditEndpoints.names("unix:private/policy", oneOf: listen, queueDirectory: "/q"))
    }
}

@Suite struct AuditSmtpdGuardTests {
    func audit(main relay: String, override: [String: String] = [:]) -> PostfixAudit {
        var r = Configuration()
        r.policyListen = [.tcp(host: "127.0.0.1", port: 10028)]
        let smtp = PostfixService(name: "smtp", type: "inet", command: "smtpd", overrides: override)
        let reinject = PostfixService(name: "127.0.0.1:10026", type: "inet", command: "smtpd", overrides: ["smtpd_relay_restrictions": "permit_mynetworks,reject"])
        let pf = PostfixConfig(main: ["smtpd_relay_restrictions": relay, "smtpd_recipient_restrictions": ""], services: [smtp, reinject])
        return PostfixAudit(postfix: pf, restrictpd: r)
    }

    @Test func policyBeforePermitMynetworksGuards() throws {
        let checks = self.audit(main: "check_policy_service inet:127.0.0.1:10028, permit_mynetworks, defer_unauth_destination").smtpdGuards()
        #expect(checks.map(\.name) == ["postfix.smtpd-guard:smtp"])
        #expect(checks.first?.status == .ok)
    }

    @Test func permitMynetworksFirstFails() throws {
        for relay in ["permit_mynetworks, check_policy_service inet:127.0.0.1:10028, defer_unauth_destination",
                      "check_policy_service inet:127.0.0.1:9999, permit_mynetworks, reject"] {
            let check = try #require(self.audit(main: relay).smtpdGuards().first)
            #expect(check.status == .fail, "\(relay)")
            #expect(check.detail.contains("any local user can relay through port 25"))
        }
    }

    @Test func overrideWinsAndNoLocalPermitIsFine() throws {
        let guarded = "check_policy_service inet:127.0.0.1:10028, permit_mynetworks, reject"
        let overridden = try #require(self.audit(main: guarded, override: ["smtpd_relay_restrictions": "permit_mynetworks, reject"]).smtpdGuards().first)
        #expect(overridden.status == .fail)
        let closed = try #require(self.audit(main: "permit_sasl_authenticated, reject_unauth_destination").smtpdGuards().first)
        #expect(closed.status == .ok)
    }

    @Test func pickupOverridesKeepHeaderChecksAndMiltersOff() throws {
        var r = Configuration()
        r.policyListen = [.tcp(host: "127.0.0.1", port: 10028)]
        let cleanup = PostfixService(name: "cleanup", type: "unix", command: "cleanup")
        var pickup = PostfixService(name: "pickup", type: "unix", command: "pickup")
        let main = ["header_checks": "inline:{ { /^Subject:/ = PREPEND X-A: b } }", "non_smtpd_milters": "inet:127.0.0.1:8891"]
        let plain = PostfixAudit(postfix: PostfixConfig(main: main, services: [pickup, cleanup]), restrictpd: r).pickupHeaders()
        #expect(plain.map(\.status) == [.fail, .warn])
        pickup.overrides["receive_override_options"] = "no_header_body_checks, no_milters"
        let off = PostfixAudit(postfix: PostfixConfig(main: main, services: [pickup, cleanup]), restrictpd: r).pickupHeaders()
        #expect(off.map(\.status) == [.ok, .ok])
        #expect(off.map(\.name) == ["postfix.header-checks", "postfix.milters"])
    }

    @Test func headerMapActions() {
        #expect(HeaderMap.actions("inline:{ { /^Subject:/ = PREPEND X-A: b } }") == ["PREPEND"])
        #expect(HeaderMap.actions("inline:{ { /^Subject:/ = replace Subject: x } }") == ["REPLACE"])
        #expect(HeaderMap.actions("inline:{ { /^X-Spam:/ = IGNORE } }") == [])
        #expect(HeaderMap.actions("ldap:/etc/postfix/ldap.cf") == nil)
        #expect(HeaderMap.actions("regexp:/nonexistent/header_checks") == nil)
    }
}

@Suite struct AuditSystemCallTests {
    @Test func commandOutputStatusAndLimits() throws {
        let echo = try AuditCommand.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]).get()
        #expect(echo.exitStatus == 3)
        #expect(echo.text.split(separator: "\n").sorted() == ["err", "out"])
        let started = Runtime.wallClock()
        guard case .failure = AuditCommand.run(["/bin/sleep", "5"], timeoutMS: 300) else { Issue.record("sleep not stopped"); return }
        #expect(Runtime.wallClock() - started < 3)
        guard case .failure = AuditCommand.run(["/usr/bin/yes"], timeoutMS: 5000, cap: 1000) else { Issue.record("yes not stopped"); return }
        guard case .failure = AuditCommand.run(["/nonexistent/program"]) else { Issue.record("ran a missing program"); return }
    }

    @Test(.enabled(if: getuid() == 0, "probes need root"))
    func probeAsAnotherUser() throws {
        let nobody = try #require(Users.lookup(name: "nobody"))
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, len) } }
        #expect(listen(listener, 4) == 0)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &len) } }
        let port = Int(UInt16(bigEndian: addr.sin_port))
        let target = try #require(AuditNet.resolve(host: "127.0.0.1", port: port).first)
        let open = AuditProbe.connect(as: nobody.uid, gid: nobody.gid, to: target, timeoutMS: 1000, greeting: false)
        #expect(open.connected && !open.broken)
        close(listener)
        let closed = AuditProbe.connect(as: nobody.uid, gid: nobody.gid, to: target, timeoutMS: 1000, greeting: false)
        #expect(!closed.connected && !closed.broken)
        #expect(AuditProbe.connect(as: 0, gid: 0, to: target, timeoutMS: 1000, greeting: false).broken)
    }
}
