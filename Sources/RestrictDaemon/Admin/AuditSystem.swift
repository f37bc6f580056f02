// restrictpd --audit: the service under systemd, and the firewall table in the live ruleset.

#if canImport(Glibc)
import Glibc
#endif

enum SystemAudit {
    static func all() -> [AuditCheck] {
        [self.service(), self.firewall()]
    }

    /// `systemctl is-active restrictpd`, where systemd runs.
    static func service() -> AuditCheck {
        let name = "system.service"
        guard SystemFiles.exists("/run/systemd/system") else {
            return .warn(name, "systemd is not running here (no /run/systemd/system): the service's state was not checked", fix: "start restrictpd under systemd (debian/restrictpd.service), or check it by hand")
        }
        guard let systemctl = AuditCommand.find(["/usr/bin/systemctl", "/bin/systemctl"]) else {
            return .warn(name, "systemctl not found", fix: "check that restrictpd runs")
        }
        switch AuditCommand.run([systemctl, "is-active", "restrictpd"], timeoutMS: 5000, cap: 4096) {
        case .failure(let e):
            return .warn(name, "\(e)", fix: "check systemctl status restrictpd")
        case .success(let out):
            let state = out.text.split(separator: "\n").first.map(String.init) ?? "unknown"
            guard state == "active" else {
                return .fail(name, "restrictpd.service is \(state)", fix: "systemctl enable --now restrictpd (see journalctl -u restrictpd)")
            }
            return .ok(name, "restrictpd.service is active")
        }
    }

    /// `nft -j list ruleset`: is table inet restrictpd loaded?
    static func firewall() -> AuditCheck {
        let name = "system.firewall"
        let fix = "nft -f /etc/nftables/restrictpd.nft (etc/nftables/restrictpd.nft), and include it from /etc/nftables.conf"
        guard let nft = AuditCommand.find(["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]) else {
            return .warn(name, "nft not found: the firewall table was not checked", fix: "apt-get install nftables; " + fix)
        }
        switch AuditCommand.run([nft, "-j", "list", "ruleset"], timeoutMS: 10_000, cap: 16 << 20) {
        case .failure(let e):
            return .warn(name, "\(e)", fix: "run restrictpd --audit as root")
        case .success(let out):
            guard out.exitStatus == 0, let ruleset = JSONValue.parse(out.text) else {
                return .warn(name, "nft -j list ruleset did not give JSON (exit \(out.exitStatus.map(String.init) ?? "signal"))", fix: "run restrictpd --audit as root")
            }
            guard self.hasTable(ruleset, family: "inet", name: "restrictpd") else {
                return .fail(name, "table inet restrictpd is not loaded: nothing keeps local users off the reinjection port", fix: fix)
            }
            return .ok(name, "table inet restrictpd is loaded")
        }
    }

    /// {"nftables": [{"metainfo": ...}, {"table": {"family": "inet", "name": "restrictpd"}}, ...]}
    static func hasTable(_ ruleset: JSONValue, family: String, name: String) -> Bool {
        guard let items = ruleset["nftables"]?.arrayValue else { return false }
        return items.contains { item in
            guard let table = item["table"] else { return false }
            return table["family"]?.stringValue == family && table["name"]?.stringValue == name
        }
    }
}
