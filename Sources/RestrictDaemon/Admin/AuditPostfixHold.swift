// restrictpd --audit: the two Postfix services on either side of restrictpd that the pickup
// and reinjection checks do not cover. The smtp (or lmtp) client that pickup's
// content_filter delivers through can PREPEND a header above pickup's, like cleanup's
// header_checks. The hold listener (hold_relay) must put everything on hold: held mail it
// accepted otherwise would simply be delivered.

import RestrictPolicy

extension PostfixAudit {
    /// The master.cf service pickup's content_filter delivers through ("smtp" of
    /// "smtp:[127.0.0.1]:10027"): its name, and the service when master.cf has it.
    var filterTransport: (name: String, service: PostfixService?)? {
        let pickup = self.postfix.service("pickup", type: "unix")
        let filter = self.postfix.value("content_filter", in: pickup)
        guard let colon = filter.firstIndex(of: ":"), colon != filter.startIndex else { return nil }
        let name = String(filter[..<colon])
        return (name, self.postfix.service(name, type: "unix"))
    }

    /// smtp_header_checks, smtp_mime_header_checks and smtp_nested_header_checks (lmtp_* for
    /// an lmtp client) of the content filter's transport: its -o overrides, else main.cf's.
    func filterHeaders() -> AuditCheck {
        let name = "postfix.smtp-header-checks"
        guard let transport = self.filterTransport else {
            return .ok(name, "pickup has no content_filter transport: no smtp client carries local mail to restrictpd")
        }
        guard let service = transport.service, service.command == "smtp" || service.command == "lmtp" else {
            return .warn(name, "pickup's content_filter names transport \(transport.name), which is no smtp or lmtp service of master.cf: its header checks were not examined",
                         fix: "let pickup's content_filter use the smtp transport (\(self.filterSpec)) or an smtp service of master.cf")
        }
        let prefix = service.command
        let parameters = ["header_checks", "mime_header_checks", "nested_header_checks"].map { "\(prefix)_\($0)" }
        var maps: [String] = []
        for parameter in parameters {
            for map in PostfixList.items(self.postfix.value(parameter, in: service)) where !maps.contains(map) { maps.append(map) }
        }
        let fix = "remove the PREPEND lines, or keep them off the content filter's transport: "
            + parameters.map { "-o \($0)=" }.joined(separator: " ") + " on \(service.name) in master.cf"
            + " (or a copy of that entry under a name of its own, for pickup's content_filter alone)"
        return Self.headerTables(name, maps, parameter: "\(prefix)_header_checks", place: "\(service.id), the \(prefix) client of pickup's content_filter", fix: fix)
    }

    /// The smtpd services a connection to `host`:`port` reaches.
    func smtpdServices(host: String, port: Int) -> [PostfixService] {
        self.postfix.services.filter { s in
            s.command == "smtpd" && (AuditEndpoints.endpoint(of: s)?.serves(host: host, port: port) ?? false)
        }
    }

    /// When restrictpd can hold mail, hold_relay must be an smtpd that holds everything
    /// (check_client_access static:HOLD first) and not the reinjection smtpd.
    func holdListener() -> AuditCheck {
        let name = "postfix.hold-listener"
        let r = self.restrictpd
        let hold = InetEndpoint(host: r.holdRelayHost, port: r.holdRelayPort)
        let reasons = r.holdReasons
        guard !reasons.isEmpty else {
            return .ok(name, "restrictpd.conf holds no mail (no over_quota hold, on_refuse hold, or freeze with frozen hold): hold_relay \(hold) is not used")
        }
        let why = reasons.joined(separator: ", ")
        let entry = "the \(hold) smtpd entry of \(SystemAudit.examples)/postfix/master.cf.restrictpd (-o smtpd_client_restrictions=check_client_access,static:HOLD)"
        if InetEndpoint(host: r.relayHost, port: r.relayPort).serves(host: r.holdRelayHost, port: r.holdRelayPort) {
            return .fail(name, "hold_relay \(hold) is relay's address: held mail would be delivered (\(why))",
                         fix: "point hold_relay in restrictpd.conf at the hold listener, \(entry)")
        }
        let services = self.smtpdServices(host: r.holdRelayHost, port: r.holdRelayPort)
        guard !services.isEmpty else {
            return .fail(name, "no smtpd service in master.cf listens on hold_relay \(hold): held mail (\(why)) goes to whatever listens there, or is deferred",
                         fix: "add \(entry) to master.cf, then postfix reload")
        }
        let leaking = services.filter { !self.holdsEverything($0) }
        guard leaking.isEmpty else {
            return .fail(name, "\(leaking.map(\.id).joined(separator: " ")) at hold_relay \(hold) does not begin smtpd_client_restrictions with check_client_access static:HOLD: held mail would be delivered (\(why))",
                         fix: "give \(leaking.map(\.name).joined(separator: " ")) \"-o smtpd_client_restrictions=check_client_access,static:HOLD\" in master.cf, as \(entry), then postfix reload")
        }
        return .ok(name, "\(services.map(\.id).joined(separator: " ")) at hold_relay \(hold) holds every message it accepts (\(why))")
    }
}
