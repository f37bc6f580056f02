// restrictpd --audit: a read-only look at the live system. It reads Postfix's configuration
// through postconf, restrictpd's configuration and files, the firewall through nft and the
// service through systemctl, and measures what restricted users can reach. It changes
// nothing; the probes leave a "554" warning per restricted user in restrictpd's log and a
// short session in Postfix's.

import RestrictPolicy

#if canImport(Glibc)
import Glibc
#endif

public struct AuditOptions: Sendable {
    public var configPath: String
    /// The user restrictpd runs as (--user): the owner the state directory must have.
    public var serviceUser: String
    /// The Postfix instance's config directory (postconf -c), or nil for MAIL_CONFIG or the default.
    public var postfixConfig: String?
    /// --probe HOST[:PORT]: a remote mail server restricted users must not reach.
    public var probe: String?
    public var json: Bool

    public init(configPath: String, serviceUser: String, postfixConfig: String?, probe: String?, json: Bool) {
        self.configPath = configPath
        self.serviceUser = serviceUser
        self.postfixConfig = postfixConfig
        self.probe = probe
        self.json = json
    }
}

extension Admin {
    /// Exit 0 when no check fails, 1 otherwise (and for a usage error).
    public static func audit(_ options: AuditOptions) -> AdminOutput {
        var out = AdminOutput()
        guard getuid() == 0 else {
            out.stderr.append("restrictpd: --audit must run as root (it reads root-only state and probes as other users)")
            out.status = 1
            return out
        }
        var probe: InetEndpoint? = nil
        if let text = options.probe {
            guard let endpoint = self.probeEndpoint(text) else {
                out.stderr.append("restrictpd: --probe takes HOST[:PORT], not \(text)")
                out.status = 1
                return out
            }
            probe = endpoint
        }
        let report = AuditReport(checks: self.auditChecks(options, probe: probe))
        out.stdout = options.json ? [report.json] : report.textLines
        out.status = report.failed ? 1 : 0
        return out
    }

    static func auditChecks(_ options: AuditOptions, probe: InetEndpoint?) -> [AuditCheck] {
        let (configCheck, configuration) = RestrictpdAudit.configCheck(options.configPath)
        // Without a usable file the Postfix checks compare against restrictpd's defaults.
        let effective = configuration ?? Configuration()
        var checks: [AuditCheck] = []
        var postfixAudit: PostfixAudit? = nil
        let postfixDir = options.postfixConfig ?? Self.mailConfigFromEnvironment()
        switch Postconf.load(configDir: postfixDir) {
        case .success(let postfix):
            checks.append(.ok("postfix.postconf", "read \(postfixDir ?? "the default instance") through postconf (\(postfix.services.count) master.cf services)"))
            postfixAudit = PostfixAudit(postfix: postfix, restrictpd: effective)
            checks += postfixAudit?.all() ?? []
        case .failure(let e):
            checks.append(.fail("postfix.postconf", "\(e)", fix: "install Postfix, or name its config directory with --postfix-config DIR"))
        }
        checks.append(configCheck)
        checks += RestrictpdAudit(configPath: options.configPath, configuration: configuration, serviceUser: options.serviceUser).all()
        if let configuration {
            checks += ReachAudit(configuration: configuration, postfix: postfixAudit, probe: probe).all()
        }
        checks += SystemAudit.all(effective)
        return checks
    }

    static func mailConfigFromEnvironment() -> String? {
        guard let value = getenv("MAIL_CONFIG") else { return nil }
        let s = String(cString: value)
        return s.isEmpty ? nil : s
    }

    /// "mx.example.org", "192.0.2.7:587", "[2001:db8::7]:25" or a bare IPv6 address; port 25
    /// when none is given.
    static func probeEndpoint(_ text: String) -> InetEndpoint? {
        guard !text.isEmpty, !text.contains(" ") else { return nil }
        let colons = text.filter { $0 == ":" }.count
        if text.hasPrefix("[") || colons == 1 {
            guard let e = InetEndpoint.parse(text), e.host != nil else { return nil }
            return e
        }
        return InetEndpoint(host: text, port: 25)
    }
}
