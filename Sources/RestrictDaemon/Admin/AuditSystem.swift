// restrictpd --audit: the service under systemd, and the firewall table in the live ruleset.

import RestrictPolicy

#if canImport(Glibc)
import Glibc
#endif

enum SystemAudit {
    static func all(_ configuration: Configuration) -> [AuditCheck] {
        [self.service(), self.firewall(configuration)]
    }

    /// Where systemd looks for restrictpd.service (systemd.unit(5), the system instance).
    static let unitDirectories = ["/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"]

    /// Where the package installs etc/postfix/ and etc/nftables/ (debian/restrictpd.install).
    static let examples = "/usr/share/doc/restrictpd/examples"
    static let nftExample = "\(examples)/nftables/restrictpd.nft"
    static let firewallFix = "nft -f \(nftExample); to keep it across reboots, copy it to /etc/nftables/ and include it from /etc/nftables.conf"

    /// `systemctl is-active restrictpd`, where systemd runs and the unit is installed.
    static func service() -> AuditCheck {
        let systemd = SystemFiles.exists("/run/systemd/system")
        let unit = self.unitDirectories.map { $0 + "/restrictpd.service" }.first(where: SystemFiles.exists)
        guard systemd, unit != nil else { return self.serviceVerdict(systemd: systemd, unitFile: unit, state: nil) }
        guard let systemctl = AuditCommand.find(["/usr/bin/systemctl", "/bin/systemctl"]) else {
            return .warn("system.service", "systemctl not found", fix: "check that restrictpd runs")
        }
        let state = AuditCommand.run([systemctl, "is-active", "restrictpd"], timeoutMS: 5000, cap: 4096).map { out in
            out.text.split(separator: "\n").first.map(String.init) ?? "unknown"
        }
        return self.serviceVerdict(systemd: true, unitFile: unit, state: state)
    }

    /// The check from what was found: whether systemd runs, the unit file, and what
    /// `systemctl is-active` said (nil when it was not asked).
    static func serviceVerdict(systemd: Bool, unitFile: String?, state: Result<String, SystemError>?) -> AuditCheck {
        let name = "system.service"
        guard systemd else {
            return .warn(name, "systemd is not running here (no /run/systemd/system): the service's state was not checked", fix: "start restrictpd under systemd (debian/restrictpd.service), or check it by hand")
        }
        guard let unitFile else {
            return .warn(name, "restrictpd.service is not installed (no unit file in \(self.unitDirectories.joined(separator: " "))): restrictpd does not run as a systemd service here; the restrictpd.listener checks say whether it runs",
                         fix: "install the package, which enables restrictpd.service, or keep restrictpd running under a supervisor of your own")
        }
        switch state {
        case .none:
            return .warn(name, "\(unitFile) exists, but systemctl was not asked", fix: "check systemctl status restrictpd")
        case .failure(let e)?:
            return .warn(name, "\(e)", fix: "check systemctl status restrictpd")
        case .success(let state)?:
            guard state == "active" else {
                return .fail(name, "restrictpd.service (\(unitFile)) is \(state)", fix: "systemctl enable --now restrictpd (see journalctl -u restrictpd)")
            }
            return .ok(name, "restrictpd.service is active")
        }
    }

    /// `nft -j list ruleset`: table inet restrictpd, with its uid checks on the reinjection
    /// port (and the hold listener's, when mail can be held) and on outbound SMTP.
    static func firewall(_ configuration: Configuration) -> AuditCheck {
        let name = "system.firewall"
        guard let nft = AuditCommand.find(["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]) else {
            return .warn(name, "nft not found: the firewall table was not checked", fix: "apt-get install nftables; " + self.firewallFix)
        }
        switch AuditCommand.run([nft, "-j", "list", "ruleset"], timeoutMS: 10_000, cap: 16 << 20) {
        case .failure(let e):
            return .warn(name, "\(e)", fix: "run restrictpd --audit as root")
        case .success(let out):
            guard out.exitStatus == 0, let ruleset = JSONValue.parse(out.text) else {
                return .warn(name, "nft -j list ruleset did not give JSON (exit \(out.exitStatus.map(String.init) ?? "signal"))", fix: "run restrictpd --audit as root")
            }
            return self.firewallVerdict(FirewallTable.parse(ruleset), configuration)
        }
    }

    static let smtpPorts = [25, 465, 587]

    static func firewallVerdict(_ table: FirewallTable?, _ c: Configuration) -> AuditCheck {
        let name = "system.firewall"
        guard let table else {
            return .fail(name, "table inet restrictpd is not loaded: nothing keeps local users off the reinjection port", fix: self.firewallFix)
        }
        var ports = [(c.relayPort, "the reinjection smtpd, relay")]
        if !c.holdReasons.isEmpty, c.holdRelayPort != c.relayPort { ports.append((c.holdRelayPort, "the hold listener, hold_relay")) }
        var missing = ports.filter { !table.guardsLoopback($0.0) }.map { "no meta skuid check that refuses other users on port \($0.0) (\($0.1))" }
        let open = self.smtpPorts.filter { !table.guardsOutbound($0) }
        if !open.isEmpty {
            missing.append("no outbound SMTP rule (tcp dport \(open.map(String.init).joined(separator: ", ")) to other hosts with a meta skuid check)")
        }
        guard missing.isEmpty else {
            return .fail(name, "table inet restrictpd is loaded but has " + missing.joined(separator: "; "), fix: self.firewallFix)
        }
        let guarded = ports.map { String($0.0) }.joined(separator: ", ")
        return .ok(name, "table inet restrictpd guards port \(guarded) and outbound SMTP (\(self.smtpPorts.map(String.init).joined(separator: ", ")))")
    }
}
