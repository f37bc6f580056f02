// The admin's commands: --check-config, --test, --quota, --reset-quota (and --init-store, in
// AdminStore.swift). They read the same configuration and quota store as the running daemon,
// through their own connection (SQLite's busy timeout lets them run beside it; a PostgreSQL
// store is a server). --test and --quota never write.

import RestrictPolicy
import Logging
import QuotaStore
import SMTPCore

#if canImport(Glibc)
import Glibc
#endif

public struct AdminOutput: Sendable {
    public var stdout: [String] = []
    public var stderr: [String] = []
    public var status: Int32 = 0
}

public enum Admin {
    /// Run as root, the commands that open the quota database become the database file's
    /// owner first (the service user), so that SQLite's -wal and -shm files are never left
    /// owned by root where the service could not open them.
    /// False, with the reason in `out`, when that fails.
    static func becomeOwner(of path: String, into out: inout AdminOutput) -> Bool {
        guard getuid() == 0 else { return true }
        var st = stat()
        guard stat(path, &st) == 0, st.st_uid != 0 else { return true }
        var gid = st.st_gid
        guard setgroups(1, &gid) == 0, setgid(st.st_gid) == 0, setuid(st.st_uid) == 0 else {
            out.stderr.append("restrictpd: cannot become uid \(st.st_uid), the owner of \(path)")
            out.status = 1
            return false
        }
        return true
    }

    /// The configuration, or nil with its errors (and status 1) in `out`.
    static func load(_ path: String, into out: inout AdminOutput) -> Configuration? {
        switch ConfigurationLoader.load(path) {
        case .success(let c):
            return c
        case .failure(let errors):
            out.stderr = errors.errors.map(\.description)
            out.status = 1
            return nil
        }
    }

    public static func checkConfig(_ path: String) -> AdminOutput {
        var out = AdminOutput()
        switch ConfigurationLoader.load(path) {
        case .success(let c):
            out.stdout.append("\(path): OK: \(c.rules.count) rules, listen \(c.listen.map(\.description).joined(separator: " ")), relay \(c.relayHost):\(c.relayPort)")
            if !c.peerCheck { out.stdout.append("\(path): warning: peer_check is off: any local user can claim any uid") }
            if c.peerCheck, c.clients.isEmpty {
                out.stdout.append("\(path): warning: no user in clients (\(c.clientNames.joined(separator: " "))) exists here: every connection would be refused")
            }
            self.checkStore(c, path: path, into: &out)
        case .failure(let errors):
            out.stderr = errors.errors.map(\.description)
            out.status = 1
        }
        return out
    }

    /// Resolves "www-data", "33" or "unknown" to a sender.
    static func sender(_ word: String) -> Sender? {
        if word == "unknown" { return .unidentified(reason: "as asked with --test unknown") }
        if let uid = UInt32(word), word.allSatisfy(\.isNumber) { return .user(uid: uid, name: Users.lookup(uid: uid)?.name) }
        guard let entry = Users.lookup(name: word) else { return nil }
        return .user(uid: entry.uid, name: entry.name)
    }

    /// The verdict the rules would give now, spending nothing. Exit 0: would relay; 2: would
    /// refuse or defer; 1: error.
    public static func test(configPath: String, user: String, recipients: [String], now: Int64) -> AdminOutput {
        var out = AdminOutput()
        guard let configuration = load(configPath, into: &out) else { return out }
        guard let sender = self.sender(user) else {
            out.stderr.append("restrictpd: no such user: \(user)")
            out.status = 1
            return out
        }
        let policy = Policy(configuration, localDomains: PostfixDomains.read(for: configuration, logger: Logger(label: "restrictpd")))
        let groups = policy.needsGroups ? sender.uid.flatMap { Users.groups(uid: $0) } ?? [] : []
        guard let rule = policy.rule(for: sender, groups: groups) else {
            out.stdout.append("\(sender.phrase): no rule applies (no \(sender.uid == nil ? "unknown" : "default") rule): refused")
            let verdict = Policy.verdict(policy.evaluate(sender: sender, recipients: recipients, groups: groups), sender: sender, outcome: nil)
            out.stdout.append("verdict=\(verdict.kind.rawValue) reason=\"\(verdict.reason)\" reply=\"\(verdict.reply.code) \(verdict.reply.lines[0])\"")
            out.status = 2
            return out
        }
        let ruleName: String
        switch rule.selector {
        case .user: ruleName = "user \(rule.userName ?? String(sender.uid ?? 0))"
        case .uidRange(let from, let to): ruleName = "uid \(from)-\(to)"
        case .group(let gid): ruleName = "group \(rule.groupName ?? String(gid))"
        case .default: ruleName = "default"
        case .unknown: ruleName = "unknown"
        }
        out.stdout.append("\(sender.phrase): rule '\(ruleName)' at \(configPath):\(rule.line)")
        // The daemon's own functions: evaluate, the store's answer (a read-only peek), verdict.
        let evaluation = policy.evaluate(sender: sender, recipients: recipients, groups: groups)
        var outcome: Result<QuotaOutcome, any Error>? = nil
        if let request = Policy.quotaRequest(evaluation, sender: sender, now: now, record: false, recipients: recipients.count) {
            if let quota = request.quota {
                out.stdout.append("outside the allow list: \(request.addresses.map { "<\($0)>" }.joined(separator: ",")) (arbitrary \(quota))")
            }
            guard let peeked = self.peek(request, configuration, into: &out) else { return out }
            outcome = .success(peeked)
        }
        let verdict = Policy.verdict(evaluation, sender: sender, outcome: outcome)
        var line = "verdict=\(verdict.kind.rawValue) reason=\"\(verdict.reason)\""
        if let q = verdict.quota { line += " quota=\"\(q)\"" }
        if let m = verdict.messages { line += " messages=\"\(m)\"" }
        if let r = verdict.recipients { line += " recipients=\"\(r)\"" }
        if verdict.kind != .relay { line += " reply=\"\(verdict.reply.code) \(verdict.reply.lines[0])\"" }
        out.stdout.append(line)
        out.status = verdict.kind == .relay ? 0 : 2
        return out
    }

    /// The decision the quota store would take now, spending nothing; nil with the error in `out`.
    static func peek(_ request: QuotaRequest, _ configuration: Configuration, into out: inout AdminOutput) -> QuotaOutcome? {
        guard case .success(let postgres) = self.postgresStore(configuration, into: &out) else { return nil }
        if let postgres { return self.value(self.blocking({ try await postgres.peek(request) }), into: &out) }
        // No SQLite file yet: nothing is counted.
        guard SystemFiles.exists(configuration.statePath) else { return QuotaArithmetic.decide(request, counted: [], volume: [:]).0 }
        guard becomeOwner(of: configuration.statePath, into: &out) else { return nil }
        do {
            let db = try QuotaDatabase(path: configuration.statePath, mode: .readOnly)
            defer { db.close() }
            return try db.peek(request)
        } catch {
            out.stderr.append("restrictpd: \(error)")
            out.status = 1
            return nil
        }
    }

    /// The uid a command is limited to: `.some(nil)` for every user, `.some(uid)` for `user`;
    /// nil, with the error and status 1 in `out`, when `user` names nobody.
    static func onlyUID(_ user: String?, into out: inout AdminOutput) -> UInt32?? {
        guard let user else { return .some(nil) }
        guard let s = self.sender(user), let uid = s.uid else {
            out.stderr.append("restrictpd: no such user: \(user)")
            out.status = 1
            return nil
        }
        return .some(uid)
    }

    public static func showQuota(configPath: String, user: String?, now: Int64) -> AdminOutput {
        var out = AdminOutput()
        guard let configuration = load(configPath, into: &out) else { return out }
        guard let only = self.onlyUID(user, into: &out) else { return out }
        guard case .success(let postgres) = self.postgresStore(configuration, into: &out) else { return out }
        let entries: [QuotaEntry]
        var frozen: [FrozenState] = []
        if let postgres {
            let uid = only
            let read = self.blocking { (try await postgres.entries(uid: uid), try await postgres.frozenList(uid: uid)) }
            guard let (e, f) = self.value(read, into: &out) else { return out }
            entries = e
            frozen = f
        } else if !SystemFiles.exists(configuration.statePath) {
            out.stdout.append("no quota database at \(configuration.statePath) yet: nothing counted")
            return out
        } else {
            guard becomeOwner(of: configuration.statePath, into: &out) else { return out }
            do {
                let db = try QuotaDatabase(path: configuration.statePath, mode: .readOnly)
                defer { db.close() }
                entries = try db.entries(uid: only)
                frozen = try db.frozenList(uid: only)
            } catch {
                out.stderr.append("restrictpd: \(error)")
                out.status = 1
                return out
            }
        }
        let policy = Policy(configuration)
        let byUID = Dictionary(grouping: entries, by: \.uid)
        for uid in byUID.keys.sorted() {
            let name = Users.lookup(uid: uid)?.name
            let sender = Sender.user(uid: uid, name: name)
            let groups = policy.needsGroups ? Users.groups(uid: uid) ?? [] : []
            let quota = policy.rule(for: sender, groups: groups)?.quota
            let windowStart = quota?.period.map { now - $0.seconds }
            let live = (byUID[uid] ?? []).filter { e in windowStart.map { e.lastSeen >= $0 } ?? true }
            if let quota {
                out.stdout.append("\(sender.phrase): \(live.count) of \(quota) used, \(max(0, quota.limit - live.count)) left")
            } else {
                out.stdout.append("\(sender.phrase): \(live.count) counted (the rule now grants no arbitrary destinations)")
            }
            for e in live {
                out.stdout.append("  \(LogText.escape(e.address))  first=\(timestamp(e.firstSeen)) last=\(timestamp(e.lastSeen))")
            }
        }
        out.stdout.append(contentsOf: self.frozenLines(frozen))
        if byUID.isEmpty, frozen.isEmpty { out.stdout.append("nothing counted") }
        return out
    }

    public static func resetQuota(configPath: String, user: String) -> AdminOutput {
        var out = AdminOutput()
        guard let configuration = load(configPath, into: &out) else { return out }
        guard let s = self.sender(user), let uid = s.uid else {
            out.stderr.append("restrictpd: no such user: \(user)")
            out.status = 1
            return out
        }
        guard case .success(let postgres) = self.postgresStore(configuration, into: &out) else { return out }
        if let postgres {
            guard let n = self.value(self.blocking({ try await postgres.reset(uid: uid) }), into: &out) else { return out }
            out.stdout.append("\(s.phrase): \(n) counted destinations forgotten (scope \(postgres.settings.scope))")
            return out
        }
        guard SystemFiles.exists(configuration.statePath) else {
            out.stdout.append("\(s.phrase): nothing counted (no quota database at \(configuration.statePath) yet)")
            return out
        }
        guard becomeOwner(of: configuration.statePath, into: &out) else { return out }
        do {
            let db = try QuotaDatabase(path: configuration.statePath)
            defer { db.close() }
            let n = try db.reset(uid: uid)
            out.stdout.append("\(s.phrase): \(n) counted destinations forgotten")
        } catch {
            out.stderr.append("restrictpd: \(error)")
            out.status = 1
        }
        return out
    }

    /// "2026-11-27 09:13:28 UTC"
    static func timestamp(_ t: Int64) -> String {
        var time = time_t(t)
        var tm = Glibc.tm()
        gmtime_r(&time, &tm)
        var buffer = [CChar](repeating: 0, count: 64)
        let n = strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%S UTC", &tm)
        return String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
