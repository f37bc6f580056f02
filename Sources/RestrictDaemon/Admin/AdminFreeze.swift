// The admin's side of freezing: --thaw USER, and the frozen lines of --quota.

import Logging
import QuotaStore
import RestrictPolicy
import SMTPCore

extension Admin {
    /// `restrictpd --thaw USER`: the UID's mail flows again and its counted refusals are
    /// forgotten. Logged at notice, as the freeze was at crit: to the journal, with its
    /// fields, wherever journald runs (even from a shell), else to syslog.
    public static func thaw(configPath: String, user: String) -> AdminOutput {
        var out = AdminOutput()
        guard let configuration = load(configPath, into: &out) else { return out }
        guard let s = self.sender(user), let uid = s.uid else {
            out.stderr.append("restrictpd: no such user: \(user)")
            out.status = 1
            return out
        }
        guard case .success(let postgres) = self.postgresStore(configuration, into: &out) else { return out }
        if let postgres {
            guard let was = self.value(self.blocking({ try await postgres.thaw(uid: uid) }), into: &out) else { return out }
            self.thawed(s, uid: uid, user: user, was: was, scope: postgres.settings.scope, into: &out)
            return out
        }
        guard SystemFiles.exists(configuration.statePath) else {
            out.stdout.append("\(s.phrase): not frozen (no quota database at \(configuration.statePath) yet)")
            return out
        }
        guard becomeOwner(of: configuration.statePath, into: &out) else { return out }
        do {
            let db = try QuotaDatabase(path: configuration.statePath)
            defer { db.close() }
            self.thawed(s, uid: uid, user: user, was: try db.thaw(uid: uid), scope: nil, into: &out)
        } catch {
            out.stderr.append("restrictpd: \(error)")
            out.status = 1
        }
        return out
    }

    /// --thaw's answer and its notice (`scope`: the PostgreSQL store's, where the thaw holds
    /// for every host of the scope).
    private static func thawed(_ s: Sender, uid: UInt32, user: String, was: Bool, scope: String?, into out: inout AdminOutput) {
        let farm = scope.map { " (scope \($0))" } ?? ""
        guard was else {
            out.stdout.append("\(s.phrase): not frozen\(farm)")
            return
        }
        out.stdout.append("\(s.phrase): thawed\(farm); its mail flows again")
        let logger = Logger(label: "restrictpd") { RestrictLogHandler(label: $0, target: LogTarget.auto.resolved(admin: true), level: .info) }
        logger.notice(
            "\(s.phrase) thawed by restrictpd --thaw",
            metadata: [LogKey.event: "thaw", LogKey.uid: .string(String(uid)), LogKey.user: .string(LogText.escape(user, limit: 64))])
    }

    /// --quota's lines for frozen UIDs.
    static func frozenLines(_ list: [FrozenState]) -> [String] {
        list.map { state in
            let name = Users.lookup(uid: state.uid)?.name
            return "\(Sender.user(uid: state.uid, name: name).phrase): \(self.frozenPhrase(state, name: name))"
        }
    }

    /// What --quota and --stats say of a frozen UID: "FROZEN since ... (freeze after ...); ...".
    static func frozenPhrase(_ state: FrozenState, name: String?) -> String {
        "FROZEN since \(timestamp(state.since)) (freeze after \(LogText.escape(state.reason))); "
            + "its mail is held or deferred until restrictpd --thaw \(name ?? String(state.uid))"
    }
}
