// restrictpd --audit: restrictpd's own configuration, files and listeners.

import RestrictPolicy

#if canImport(Glibc)
import Glibc
#endif

struct RestrictpdAudit {
    let configPath: String
    /// The configuration, or nil when it does not load (the config check says why).
    let configuration: Configuration?
    /// The user the daemon runs as (--user).
    let serviceUser: String

    /// The same verdict as --check-config.
    static func configCheck(_ path: String) -> (AuditCheck, Configuration?) {
        switch ConfigurationLoader.load(path) {
        case .success(let c):
            return (.ok("restrictpd.config", "\(path) passes --check-config (\(c.rules.count) rules)"), c)
        case .failure(let errors):
            let first = errors.errors.first?.description ?? "unknown error"
            let more = errors.errors.count > 1 ? " (and \(errors.errors.count - 1) more)" : ""
            return (.fail("restrictpd.config", "\(first)\(more)", fix: "correct \(path) until restrictpd --check-config -c \(path) is clean"), nil)
        }
    }

    func all() -> [AuditCheck] {
        var checks = [self.fileOwnership()]
        guard let c = self.configuration else { return checks }
        checks += [self.stateDirectory(c), self.peerCheck(c), self.clients(c), self.unknownRule(c)]
        checks += self.listeners(c)
        return checks
    }

    /// Whoever can write the file decides who may send mail.
    func fileOwnership() -> AuditCheck {
        let name = "restrictpd.config-file"
        var st = stat()
        guard stat(self.configPath, &st) == 0 else {
            return .fail(name, "cannot stat \(self.configPath): \(String(cString: strerror(errno)))", fix: "install \(self.configPath)")
        }
        let mode = st.st_mode & 0o7777
        let octal = "0" + String(mode, radix: 8)
        if st.st_uid != 0 || mode & 0o022 != 0 {
            let who = st.st_uid != 0 ? "owned by uid \(st.st_uid)" : (mode & 0o002 != 0 ? "writable by everyone" : "writable by its group")
            return .fail(name, "\(self.configPath) is \(who) (mode \(octal)): whoever can write it decides who may send mail",
                         fix: "chown root \(self.configPath) && chmod go-w \(self.configPath)")
        }
        return .ok(name, "\(self.configPath) is owned by root, mode \(octal)")
    }

    /// The quota database's directory must belong to the service user, or quota decisions fail.
    func stateDirectory(_ c: Configuration) -> AuditCheck {
        let name = "restrictpd.state-dir"
        let dir = Self.dirname(c.statePath)
        guard let user = Users.lookup(name: self.serviceUser) else {
            return .fail(name, "the service user \(self.serviceUser) does not exist", fix: "create it (adduser --system --group \(self.serviceUser)) or name the right one with --user")
        }
        var st = stat()
        guard stat(dir, &st) == 0 else {
            return .fail(name, "\(dir) (the directory of state) is missing", fix: "install -d -o \(user.name) -g \(user.name) -m 0750 \(dir)")
        }
        guard st.st_uid == user.uid else {
            return .fail(name, "\(dir) belongs to uid \(st.st_uid), not to \(user.name) (uid \(user.uid)): the quota database cannot be written",
                         fix: "chown \(user.name): \(dir)")
        }
        return .ok(name, "\(dir) belongs to \(user.name)")
    }

    static func dirname(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    func peerCheck(_ c: Configuration) -> AuditCheck {
        guard c.peerCheck else {
            return .fail("restrictpd.peer-check", "peer_check is no: any local user can talk to the filter port and claim any uid",
                         fix: "set \"peer_check yes\" in \(self.configPath), then systemctl reload restrictpd")
        }
        return .ok("restrictpd.peer-check", "peer_check yes")
    }

    func clients(_ c: Configuration) -> AuditCheck {
        guard c.clientNames == ["postfix"] else {
            return .fail("restrictpd.clients", "clients is \(c.clientNames.joined(separator: " ")): only Postfix's smtp client (user postfix) should feed the filter",
                         fix: "set \"clients postfix\" in \(self.configPath)")
        }
        return .ok("restrictpd.clients", "clients postfix")
    }

    /// Mail without pickup's header on top must be refused. Without an unknown rule it is
    /// refused too, but the file should say so.
    func unknownRule(_ c: Configuration) -> AuditCheck {
        guard let rule = c.rule(for: .unknown) else {
            return .warn("restrictpd.unknown-rule", "no unknown rule: mail without pickup's header is refused, but the file does not say so",
                         fix: "add \"unknown\" with \"refuse\" at the end of \(self.configPath)")
        }
        guard rule.refuse || (rule.allow.isEmpty && rule.quota == nil) else {
            return .fail("restrictpd.unknown-rule", "the unknown rule at line \(rule.line) allows mail whose sender nobody can vouch for",
                         fix: "make the unknown rule \"refuse\" (\(self.configPath):\(rule.line))")
        }
        return .ok("restrictpd.unknown-rule", "the unknown rule refuses")
    }

    /// Each listen and policy_listen address accepts a connection (nothing is sent).
    func listeners(_ c: Configuration) -> [AuditCheck] {
        (c.listen.map { ("listen", $0) } + c.policyListen.map { ("policy_listen", $0) }).map { key, address in
            let name = "restrictpd.listener:\(address)"
            let targets = AuditNet.addresses(address)
            guard let target = targets.first else {
                return .fail(name, "\(key) \(address) does not resolve", fix: "correct \(key) in \(self.configPath)")
            }
            if let why = AuditNet.connectFailure(target, timeoutMS: 2000) {
                return .fail(name, "nothing accepts connections on \(key) \(address): \(why)", fix: "systemctl start restrictpd (see journalctl -u restrictpd)")
            }
            return .ok(name, "\(key) \(address) accepts connections")
        }
    }
}
