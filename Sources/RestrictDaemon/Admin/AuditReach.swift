// restrictpd --audit: reachability, measured. For every user the rules restrict, a forked
// child becomes that user and connects, on loopback, to the reinjection smtpd (must not
// accept), to restrictpd's listeners (must answer 554), and to every other smtpd (must be
// guarded by the policy service, or closed); with --probe, to a remote mail server (must not
// connect). Only a greeting is read and QUIT sent; nothing else is written.

import RestrictPolicy

struct ReachAudit {
    let configuration: Configuration
    /// The Postfix side, when postconf could be read.
    let postfix: PostfixAudit?
    /// --probe HOST[:PORT]
    let probe: InetEndpoint?
    let timeoutMS: Int32 = 2000

    /// The users whose mail the rules restrict: every "user" rule without "allow *", and
    /// nobody for the default rule. Root cannot be probed (it passes every firewall rule
    /// restrictpd's example has, and a probe never runs as root).
    func restrictedUsers() -> [Users.Entry] {
        var users: [Users.Entry] = []
        for rule in self.configuration.rules where !rule.allow.contains(.any) {
            switch rule.selector {
            case .user(let uid): if uid != 0, let u = Users.lookup(uid: uid) { users.append(u) }
            case .default: if let u = Users.lookup(name: "nobody") { users.append(u) }
            case .uidRange(let from, _): if from != 0, let u = Users.lookup(uid: from) { users.append(u) }
            case .group, .unknown: break
            }
        }
        if self.configuration.rule(for: .default) == nil, let u = Users.lookup(name: "nobody") { users.append(u) }
        var seen = Set<UInt32>()
        return users.filter { seen.insert($0.uid).inserted }
    }

    func all() -> [AuditCheck] {
        let users = self.restrictedUsers()
        guard !users.isEmpty else { return [.ok("reach", "the rules restrict no user that could be probed")] }
        var checks: [AuditCheck] = []
        for user in users {
            checks.append(self.relay(user))
            checks += self.configuration.listen.map { self.filter(user, $0) }
            checks += (self.postfix?.smtpDoors ?? []).map { self.door(user, $0) }
            if let probe { checks.append(self.outbound(user, probe)) }
        }
        return checks
    }

    func connect(_ user: Users.Entry, _ address: AuditSocketAddress, greeting: Bool) -> ProbeOutcome {
        AuditProbe.connect(as: user.uid, gid: user.gid, to: address, timeoutMS: self.timeoutMS, greeting: greeting)
    }

    static func broken(_ name: String, _ outcome: ProbeOutcome) -> AuditCheck {
        .warn(name, "could not measure: \(outcome.reason)", fix: "run restrictpd --audit as root")
    }

    /// The reinjection smtpd trusts whoever connects: only restrictpd's user may reach it.
    func relay(_ user: Users.Entry) -> AuditCheck {
        let name = "reach.relay:\(user.name)"
        let endpoint = InetEndpoint(host: self.configuration.relayHost, port: self.configuration.relayPort)
        guard let address = AuditNet.resolve(host: self.configuration.relayHost, port: self.configuration.relayPort).first else {
            return .fail(name, "relay \(endpoint) does not resolve", fix: "correct relay in restrictpd.conf")
        }
        let outcome = self.connect(user, address, greeting: false)
        if outcome.broken { return Self.broken(name, outcome) }
        guard !outcome.connected else {
            return .fail(name, "\(user.name) (uid \(user.uid)) can connect to the reinjection smtpd at \(address.text): mail sent there skips restrictpd",
                         fix: "load the firewall example so that only restrictpd's user reaches port \(endpoint.port): " + SystemAudit.firewallFix)
        }
        return .ok(name, "\(user.name) cannot connect to \(address.text) (\(outcome.reason))")
    }

    /// restrictpd's filter port answers 554 to anyone not in `clients`.
    func filter(_ user: Users.Entry, _ listen: ListenAddress) -> AuditCheck {
        let name = "reach.filter:\(user.name):\(listen)"
        guard let address = AuditNet.addresses(listen).first else { return .warn(name, "\(listen) does not resolve", fix: "correct listen in restrictpd.conf") }
        let outcome = self.connect(user, address, greeting: true)
        if outcome.broken { return Self.broken(name, outcome) }
        guard outcome.connected else { return .ok(name, "\(user.name) cannot connect to \(listen) (\(outcome.reason))") }
        guard outcome.greeting.hasPrefix("554") else {
            let said = outcome.greeting.isEmpty ? "no greeting" : "\"\(outcome.greeting)\""
            return .fail(name, "\(user.name) connected to \(listen) and got \(said), not 554: it could hand restrictpd mail with a forged pickup header",
                         fix: "set \"peer_check yes\" and \"clients postfix\" in restrictpd.conf, and check that restrictpd is what listens there")
        }
        return .ok(name, "\(listen) answers \(user.name) with 554")
    }

    /// An smtpd a local user reaches must ask the policy service (or not relay for it).
    func door(_ user: Users.Entry, _ door: SMTPDoor) -> AuditCheck {
        let name = "reach.smtpd:\(user.name):\(door.listener.name)"
        guard let endpoint = AuditEndpoints.endpoint(of: door.listener), let postfix = self.postfix,
              let address = AuditNet.resolve(host: endpoint.host ?? "127.0.0.1", port: endpoint.port).first else {
            return .warn(name, "\(door.listener.id): no address to probe", fix: "check the service name in master.cf")
        }
        let outcome = self.connect(user, address, greeting: true)
        if outcome.broken { return Self.broken(name, outcome) }
        guard outcome.connected else { return .ok(name, "\(user.name) cannot connect to \(address.text) (\(outcome.reason))") }
        let state = postfix.guardState(door)
        if state.guarded || !state.relaysLocal {
            return .ok(name, "\(user.name) reaches \(address.text); \(state.guarded ? "restrictpd's policy service judges it" : "it does not relay for local clients")")
        }
        return .fail(name, "\(user.name) reaches \(address.text), which relays for local clients without restrictpd's policy service",
                     fix: "ask the policy service before permit_mynetworks there (see postfix.smtpd-guard:\(door.listener.name)), or close the port to untrusted users: nft -f \(SystemAudit.examples)/nftables/restrictpd-no-policy.nft")
    }

    /// Direct SMTP out: a user who can connect to a remote mail server needs no Postfix.
    func outbound(_ user: Users.Entry, _ target: InetEndpoint) -> AuditCheck {
        let name = "reach.out:\(user.name)"
        guard let host = target.host, let address = AuditNet.resolve(host: host, port: target.port).first else {
            return .warn(name, "--probe \(target) does not resolve", fix: "give --probe a reachable HOST[:PORT]")
        }
        let outcome = self.connect(user, address, greeting: false)
        if outcome.broken { return Self.broken(name, outcome) }
        guard !outcome.connected else {
            return .fail(name, "user \(user.name) can open SMTP connections out (\(address.text) accepted)",
                         fix: "load the outbound rules of the firewall example, which let only postfix connect to port 25, 465 and 587 of other hosts: " + SystemAudit.firewallFix)
        }
        return .ok(name, "\(user.name) cannot connect to \(address.text) (\(outcome.reason))")
    }
}
