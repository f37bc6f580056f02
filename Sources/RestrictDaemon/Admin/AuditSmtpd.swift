// restrictpd --audit: every smtpd that local users can reach (port 25, 587, a postscreen
// in front of one) must ask restrictpd's policy service before permit_mynetworks, or not
// relay for local clients at all. Any local user can connect to any address of the host, so
// every inet smtpd counts, except the reinjection smtpd (guarded by the firewall instead).

import RestrictPolicy

/// An inet service that ends in an smtpd, and the smtpd whose restrictions apply.
struct SMTPDoor: Sendable {
    /// The master.cf entry that listens ("smtp/inet").
    var listener: PostfixService
    /// The smtpd that serves it: the listener itself, or postscreen's pass service.
    var smtpd: PostfixService
}

extension PostfixAudit {
    static let localPermits: Set<String> = ["permit", "permit_mynetworks", "permit_inet_interfaces"]

    /// Inet smtpd services other than the reinjection one; a postscreen stands for the smtpd
    /// pass service it hands clients to (its smtpd_service_name, default "smtpd").
    var smtpDoors: [SMTPDoor] {
        let reinjection = Set(self.reinjectionServices.map(\.id))
        var doors: [SMTPDoor] = []
        for s in self.postfix.services where s.type == "inet" && !reinjection.contains(s.id) {
            if s.command == "smtpd" {
                doors.append(SMTPDoor(listener: s, smtpd: s))
            } else if s.command == "postscreen" {
                let passName = self.postfix.value("smtpd_service_name", in: s)
                if let pass = self.postfix.service(passName.isEmpty ? "smtpd" : passName, type: "pass") {
                    doors.append(SMTPDoor(listener: s, smtpd: pass))
                }
            }
        }
        return doors
    }

    /// Is restrictpd asked before anything that lets a local client through, in `items`?
    func asksPolicyFirst(_ items: [String]) -> Bool {
        guard let at = self.policyIndex(in: items) else { return false }
        return !items[..<at].contains { Self.localPermits.contains($0) }
    }

    /// The hold listener (restrictpd.conf(5) hold_relay): an smtpd whose client restrictions
    /// begin with "check_client_access static:HOLD" puts every message it accepts on hold, so
    /// nothing a local user hands it goes out before the admin releases it.
    func holdsEverything(_ smtpd: PostfixService) -> Bool {
        let client = PostfixList.items(self.postfix.value("smtpd_client_restrictions", in: smtpd))
        return client.count >= 2 && client[0] == "check_client_access" && client[1].lowercased() == "static:hold"
    }

    /// Guarded, relaying unguarded, or not relaying for local clients (a hold listener relays
    /// nothing without the admin).
    func guardState(_ door: SMTPDoor) -> (guarded: Bool, relaysLocal: Bool, lists: String) {
        let relay = PostfixList.items(self.postfix.value("smtpd_relay_restrictions", in: door.smtpd))
        let recipient = PostfixList.items(self.postfix.value("smtpd_recipient_restrictions", in: door.smtpd))
        let guarded = self.asksPolicyFirst(relay) || self.asksPolicyFirst(recipient)
        if self.holdsEverything(door.smtpd) { return (guarded, false, "smtpd_client_restrictions=check_client_access,static:HOLD: every message is held") }
        let relaysLocal = (relay + recipient).contains { Self.localPermits.contains($0) }
        let lists = "smtpd_relay_restrictions=\(relay.joined(separator: ",")) smtpd_recipient_restrictions=\(recipient.joined(separator: ","))"
        return (guarded, relaysLocal, lists)
    }

    func smtpdGuards() -> [AuditCheck] {
        let doors = self.smtpDoors
        guard !doors.isEmpty else { return [.ok("postfix.smtpd-guard", "no smtpd service besides the reinjection one")] }
        return doors.map(self.smtpdGuard)
    }

    func smtpdGuard(_ door: SMTPDoor) -> AuditCheck {
        let name = "postfix.smtpd-guard:\(door.listener.name)"
        let via = door.smtpd.id == door.listener.id ? "" : " (through \(door.smtpd.id))"
        let state = self.guardState(door)
        if state.guarded { return .ok(name, "\(door.listener.id)\(via) asks restrictpd's policy service before permit_mynetworks") }
        guard state.relaysLocal else { return .ok(name, "\(door.listener.id)\(via) does not relay for local clients (\(state.lists))") }
        let policy = self.restrictpd.policyListen.first.map { "check_policy_service \(Self.policySpec($0))" } ?? "check_policy_service inet:127.0.0.1:10028 (and policy_listen 127.0.0.1:10028 in restrictpd.conf)"
        return .fail(name, "any local user can relay through port \(AuditEndpoints.endpoint(of: door.listener)?.port ?? 0) (\(door.listener.id)\(via)): permit_mynetworks without restrictpd's policy service (\(state.lists))",
                     fix: "put \"\(policy)\" before permit_mynetworks in smtpd_relay_restrictions (main.cf, or the service's -o override in master.cf), as in \(SystemAudit.examples)/postfix/main.cf.restrictpd")
    }

    /// How main.cf names a policy_listen address.
    static func policySpec(_ a: ListenAddress) -> String {
        switch a {
        case .tcp(let host, let port): return "inet:\(host):\(port)"
        case .unix(let path): return "unix:\(path)"
        }
    }
}
