// restrictpd --stats [USER] [--since 24h] [--json]: per uid, the messages relayed, refused
// and deferred and the distinct strangers, in total and per hour, from the store's hourly
// statistics (SQLite, or PostgreSQL for this host's scope); what is used of each volume cap
// now; and whether the uid is frozen, in --quota's words. Read-only.

import Glibc
import QuotaStore
import QuotaStorePostgres
import RestrictPolicy
import SMTPCore

/// One uid's statistics over the period asked.
struct UserStats {
    let uid: UInt32
    let name: String?
    let hours: [StatsRow]
    let caps: [VolumeCapState]
    /// Set when the uid is frozen now.
    var frozen: FrozenState? = nil

    func total(_ field: KeyPath<StatsRow, Int>) -> Int { self.hours.reduce(0) { $0 + $1[keyPath: field] } }
}

extension Admin {
    /// "24h", "7d", "30m", "90s" or plain seconds; nil when malformed or not positive.
    public static func parseSince(_ text: String) -> Int64? {
        let units: [Character: Int64] = ["s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400]
        var digits = Substring(text)
        var factor: Int64 = 1
        if let last = text.last, let unit = units[last] {
            digits = text.dropLast()
            factor = unit
        }
        guard !digits.isEmpty, digits.count <= 9, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int64(digits), n > 0
        else { return nil }
        return n * factor
    }

    public static func stats(configPath: String, user: String?, since: Int64, json: Bool, now: Int64) -> AdminOutput {
        var out = AdminOutput()
        guard let configuration = load(configPath, into: &out) else { return out }
        guard let only = self.onlyUID(user, into: &out) else { return out }
        let firstHour = (now - since) / 3600
        var users: [UserStats] = []
        guard case .success(let postgres) = self.postgresStore(configuration, into: &out) else { return out }
        if let postgres {
            let read = self.blocking { () -> [UserStats] in
                let rows = try await postgres.stats(uid: only, since: firstHour)
                let plan = self.statsPlan(rows, configuration: configuration)
                let states = try await postgres.capStates(plan.compactMap(\.caps), now: now)
                let frozen = try await postgres.frozenList(uid: only)
                var next = states.makeIterator()
                let users = plan.map { p in UserStats(uid: p.uid, name: p.name, hours: p.hours, caps: p.caps == nil ? [] : next.next() ?? []) }
                return self.withFrozen(users, frozen)
            }
            guard let read = self.value(read, into: &out) else { return out }
            users = read
        } else if SystemFiles.exists(configuration.statePath) {
            guard becomeOwner(of: configuration.statePath, into: &out) else { return out }
            do {
                let db = try QuotaDatabase(path: configuration.statePath, mode: .readOnly)
                defer { db.close() }
                users = try self.statsPlan(db.stats(uid: only, since: firstHour), configuration: configuration).map { p in
                    let caps = try p.caps.map { try db.capStates(uid: $0.uid, budget: $0.budget, caps: $0.caps, now: now) } ?? []
                    return UserStats(uid: p.uid, name: p.name, hours: p.hours, caps: caps)
                }
                users = self.withFrozen(users, try db.frozenList(uid: only))
            } catch {
                out.stderr.append("restrictpd: \(error)")
                out.status = 1
                return out
            }
        }
        out.stdout = json ? [self.statsJSON(users, since: now - since, now: now)] : self.statsText(users, since: now - since)
        return out
    }

    /// The uids of `rows` in order, each with its name, its hours, and its rule's counted caps
    /// to read from the store (nil when the rule counts none).
    static func statsPlan(_ rows: [StatsRow], configuration: Configuration) -> [(uid: UInt32, name: String?, hours: [StatsRow], caps: CapStatesAsk?)] {
        let policy = Policy(configuration)
        return Dictionary(grouping: rows, by: \.uid).sorted(by: { $0.key < $1.key }).map { uid, hours in
            let name = Users.lookup(uid: uid)?.name
            let groups = policy.needsGroups ? Users.groups(uid: uid) ?? [] : []
            let rule = policy.rule(for: .user(uid: uid, name: name), groups: groups)
            let caps = rule.flatMap { $0.caps.counted.isEmpty ? nil : CapStatesAsk(uid: uid, budget: $0.budget, caps: $0.caps) }
            return (uid, name, hours, caps)
        }
    }

    /// `users` with the frozen state of each that is in `frozen`.
    static func withFrozen(_ users: [UserStats], _ frozen: [FrozenState]) -> [UserStats] {
        let byUID = Dictionary(frozen.map { ($0.uid, $0) }, uniquingKeysWith: { first, _ in first })
        return users.map { u in
            var u = u
            u.frozen = byUID[u.uid]
            return u
        }
    }

    static func statsText(_ users: [UserStats], since: Int64) -> [String] {
        guard !users.isEmpty else { return ["no statistics since \(timestamp(since))"] }
        var lines: [String] = []
        for u in users {
            let who = Sender.user(uid: u.uid, name: u.name).phrase
            var line = "\(who): relayed \(u.total(\.relayed)), refused \(u.total(\.refused)), deferred \(u.total(\.deferred)), held \(u.total(\.held)), strangers \(u.total(\.strangers))"
            for state in u.caps { line += "; \(state.cap.kind.rawValue)=\"\(state)\"" }
            lines.append(line)
            if let frozen = u.frozen { lines.append("  " + self.frozenPhrase(frozen, name: u.name)) }
            for h in u.hours {
                lines.append("  \(timestamp(h.hour * 3600))  relayed \(h.relayed) refused \(h.refused) deferred \(h.deferred) held \(h.held) strangers \(h.strangers)")
            }
        }
        return lines
    }

    static func statsJSON(_ users: [UserStats], since: Int64, now: Int64) -> String {
        func counts(_ relayed: Int, _ refused: Int, _ deferred: Int, _ held: Int, _ strangers: Int) -> String {
            "\"relayed\":\(relayed),\"refused\":\(refused),\"deferred\":\(deferred),\"held\":\(held),\"strangers\":\(strangers)"
        }
        let entries = users.map { u -> String in
            let caps = u.caps.map { s in
                "\(JSONText.quote(s.cap.kind.rawValue)):{\"used\":\(s.used),\"limit\":\(s.cap.limit),\"remaining\":\(s.remaining),\"period\":\(JSONText.quote(s.cap.period.rawValue))}"
            }
            let hours = u.hours.map { h in
                "{\"hour\":\(h.hour * 3600),\"time\":\(JSONText.quote(timestamp(h.hour * 3600))),\(counts(h.relayed, h.refused, h.deferred, h.held, h.strangers))}"
            }
            let name = u.name.map(JSONText.quote) ?? "null"
            let frozen = u.frozen.map { f in
                "{\"since\":\(f.since),\"time\":\(JSONText.quote(timestamp(f.since))),\"reason\":\(JSONText.quote(f.reason))}"
            } ?? "null"
            return "{\"uid\":\(u.uid),\"user\":\(name),"
                + counts(u.total(\.relayed), u.total(\.refused), u.total(\.deferred), u.total(\.held), u.total(\.strangers))
                + ",\"frozen\":\(frozen),\"caps\":{\(caps.joined(separator: ","))},\"hours\":[\(hours.joined(separator: ","))]}"
        }
        return "{\"since\":\(since),\"until\":\(now),\"users\":[\(entries.joined(separator: ","))]}"
    }
}
