// restrictpd --audit: the Postfix checks. Each function looks at one part of the wiring
// restrictpd(8) and etc/postfix/README describe and returns its checks.

import RestrictPolicy

struct PostfixAudit {
    let postfix: PostfixConfig
    let restrictpd: Configuration

    var queueDirectory: String { self.postfix.value("queue_directory") }

    func all() -> [AuditCheck] {
        var checks = [self.pickupFilter()]
        checks += self.reinjection()
        checks.append(self.holdListener())
        checks += self.pickupHeaders()
        checks.append(self.filterHeaders())
        checks += [self.loginSenderMaps(), self.submitUsers()]
        checks += self.smtpdGuards()
        return checks
    }

    /// pickup's content_filter must name a restrictpd listener, or local mail is not judged.
    func pickupFilter() -> AuditCheck {
        let name = "postfix.pickup-filter"
        let listen = self.restrictpd.listen.map(\.description)
        let fix = "in master.cf, give pickup \"-o content_filter=\(self.filterSpec)\" (\(SystemAudit.examples)/postfix/master.cf.restrictpd), then postfix reload"
        guard let pickup = self.postfix.service("pickup", type: "unix") else {
            return .fail(name, "master.cf has no pickup service: mail from sendmail(1) is never picked up", fix: fix)
        }
        let filter = self.postfix.value("content_filter", in: pickup)
        if filter.isEmpty {
            return .fail(name, "pickup has no content_filter: mail submitted with sendmail(1) is delivered unjudged", fix: fix)
        }
        if AuditEndpoints.filterNames(filter, oneOf: self.restrictpd.listen, queueDirectory: self.queueDirectory) {
            return .ok(name, "pickup's content_filter \(filter) is restrictpd's listener")
        }
        return .fail(name, "pickup's content_filter \(filter) is not one of restrictpd's listeners (\(listen.joined(separator: " ")))", fix: fix)
    }

    /// The content_filter value that names restrictpd's first TCP listener.
    var filterSpec: String {
        for case .tcp(let host, let port) in self.restrictpd.listen { return "smtp:[\(host)]:\(port)" }
        return "smtp:[127.0.0.1]:10027"
    }

    /// The inet smtpd services that a connection to restrictpd's `relay` reaches.
    var reinjectionServices: [PostfixService] {
        self.postfix.services.filter { s in
            s.command == "smtpd" && (AuditEndpoints.endpoint(of: s)?.serves(host: self.restrictpd.relayHost, port: self.restrictpd.relayPort) ?? false)
        }
    }

    /// The reinjection smtpd: present where `relay` points, no content filter, bare newlines
    /// refused, and no policy service (what arrives there was judged already).
    func reinjection() -> [AuditCheck] {
        let relay = InetEndpoint(host: self.restrictpd.relayHost, port: self.restrictpd.relayPort)
        let services = self.reinjectionServices
        guard !services.isEmpty else {
            return [.fail("postfix.reinjection", "no smtpd service in master.cf listens on \(relay), where restrictpd relays allowed mail",
                          fix: "add the \(relay) smtpd entry of \(SystemAudit.examples)/postfix/master.cf.restrictpd to master.cf, then postfix reload")]
        }
        var checks = [AuditCheck.ok("postfix.reinjection", "smtpd service \(services.map(\.id).joined(separator: " ")) receives restrictpd's relay at \(relay)")]
        for s in services {
            checks.append(self.reinjectionFilter(s))
            checks.append(self.reinjectionBareNewline(s))
            checks.append(self.reinjectionPolicy(s))
        }
        return checks
    }

    func reinjectionFilter(_ s: PostfixService) -> AuditCheck {
        let filter = self.postfix.value("content_filter", in: s)
        guard filter.isEmpty else {
            return .fail("postfix.reinjection-filter", "\(s.id) has content_filter=\(filter): relayed mail goes through a filter again (a loop if it is restrictpd)",
                         fix: "add \"-o content_filter=\" to \(s.name) in master.cf")
        }
        return .ok("postfix.reinjection-filter", "\(s.id) has an empty content_filter")
    }

    func reinjectionBareNewline(_ s: PostfixService) -> AuditCheck {
        let name = "postfix.reinjection-bare-newline"
        let fix = "add \"-o smtpd_forbid_bare_newline=reject -o smtpd_forbid_bare_newline_exclusions=\" to \(s.name) in master.cf (Postfix 3.5.23, 3.6.13, 3.7.9, 3.8.4 or later)"
        guard self.postfix.defaults["smtpd_forbid_bare_newline"] != nil else {
            return .fail(name, "this Postfix does not know smtpd_forbid_bare_newline: bare LF is accepted on \(s.id) (SMTP smuggling)", fix: "upgrade Postfix; then " + fix)
        }
        let value = self.postfix.value("smtpd_forbid_bare_newline", in: s).lowercased()
        guard ["reject", "yes", "normalize"].contains(value) else {
            return .fail(name, "\(s.id) has smtpd_forbid_bare_newline=\(value.isEmpty ? "(empty)" : value): bare LF is accepted (SMTP smuggling)", fix: fix)
        }
        return .ok(name, "\(s.id) has smtpd_forbid_bare_newline=\(value)")
    }

    static let restrictionLists = [
        "smtpd_client_restrictions", "smtpd_helo_restrictions", "smtpd_sender_restrictions", "smtpd_relay_restrictions",
        "smtpd_recipient_restrictions", "smtpd_data_restrictions", "smtpd_end_of_data_restrictions", "smtpd_etrn_restrictions",
    ]

    /// The restriction lists of `s` that ask restrictpd's policy service.
    func listsAskingPolicy(_ s: PostfixService) -> [String] {
        Self.restrictionLists.filter { self.policyIndex(in: PostfixList.items(self.postfix.value($0, in: s))) != nil }
    }

    func reinjectionPolicy(_ s: PostfixService) -> AuditCheck {
        let asking = self.listsAskingPolicy(s)
        guard asking.isEmpty else {
            return .fail("postfix.reinjection-policy", "\(s.id) asks restrictpd's policy service in \(asking.joined(separator: ", ")): mail restrictpd relays would be judged again as restrictpd's own user",
                         fix: "override them on \(s.name) in master.cf: " + asking.map { "-o \($0)=\($0 == "smtpd_end_of_data_restrictions" ? "" : "permit_mynetworks,reject")" }.joined(separator: " "))
        }
        return .ok("postfix.reinjection-policy", "\(s.id) does not ask the policy service")
    }

    /// Where in `items` restrictpd's policy service is asked, or nil.
    func policyIndex(in items: [String]) -> Int? {
        for (i, item) in items.enumerated() where item == "check_policy_service" && i + 1 < items.count {
            let server = PostfixList.policyServer(items[i + 1])
            if AuditEndpoints.names(server, oneOf: self.restrictpd.policyListen, queueDirectory: self.queueDirectory) { return i }
        }
        return nil
    }
}
