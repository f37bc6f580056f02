// Freezing at both doors: the frozen check before a verdict, and the count of refused,
// over-quota and held messages after one (restrictpd.conf(5): freeze, frozen). The count runs
// beside the session, never holding it up: a message that comes while it runs is judged as if
// the UID were not frozen yet.

import Logging
import RestrictPolicy
import SMTPCore

extension Runtime {
    /// Whether `sender` is frozen, when freezing is configured and the store can say.
    /// Throws when the store cannot answer.
    func frozenState(_ sender: Sender, ruleset: Ruleset) async throws -> FrozenState? {
        guard let uid = sender.uid, ruleset.policy.freezes else { return nil }
        // Rules that freeze with a store that cannot keep freezes (a reload changed the rules,
        // not the store): the mail waits rather than pass unchecked.
        guard let freezes = self.freezes else { throw FreezeUnavailable() }
        return try await freezes.frozen(uid: uid)
    }

    /// Counts a verdict that strikes (Policy.strikes) towards its sender's freeze rule
    /// (`groups`: the sender's, as the verdict was judged with them, for `group` rules;
    /// `queueID`: the message's, so that Postfix's retries of it count once; nil at the SMTP
    /// door, where every refused recipient counts).
    func strike(_ sender: Sender, evaluation: Evaluation, verdict: Verdict, ruleset: Ruleset, groups: [UInt32], queueID: String?) {
        guard Policy.strikes(evaluation, verdict), let uid = sender.uid,
            let rule = ruleset.policy.freezeRule(for: sender, groups: groups),
            let freezes = self.freezes
        else { return }
        let now = self.clock()
        let logger = self.logger
        let action = ruleset.configuration.frozenAction
        let notifier = self.notifier
        // A task of its own: the store's write transaction must not delay the session's answer.
        Task {
            do {
                let outcome = try await freezes.strike(uid: uid, rule: rule, now: now, queueID: queueID)
                guard outcome.froze else { return }
                Self.logFreeze(sender, rule: rule, count: outcome.count, action: action, logger: logger)
                let event = NotifyEvent(
                    kind: .frozen, uid: uid, user: Self.userWord(sender), time: now, recipients: [], queueID: nil,
                    reason: "frozen: \(outcome.count) refused, over-quota or held messages (freeze after \(rule))")
                notifier.add(event, policy: ruleset.policy)
            } catch {
                logger.error("cannot count a refusal of \(sender.phrase) towards freezing: \(error)")
            }
        }
    }

    static func logFreeze(_ sender: Sender, rule: FreezeRule, count: Int, action: FrozenAction, logger: Logger) {
        guard let uid = sender.uid else { return }
        let name = Self.userWord(sender)
        let what = action == .hold ? "held" : "deferred"
        logger.critical(
            "\(sender.phrase) frozen: \(count) refused, over-quota or held messages (freeze after \(rule)); every message is \(what) until restrictpd --thaw \(name)",
            metadata: [LogKey.event: "freeze", LogKey.uid: .string(String(uid)), LogKey.user: .string(LogText.escape(name, limit: 64))])
    }

    /// The user name for a command line, or the uid.
    static func userWord(_ sender: Sender) -> String {
        if case .user(let uid, let name) = sender { return name ?? String(uid) }
        return "unknown"
    }
}

extension Runtime {
    /// `warn at N%`: a notice line and a notification the first time in a quota window that
    /// `sender` has used that share of its quota. Which UIDs were warned is kept in memory
    /// (a restart may warn once more).
    /// `groups`: the sender's, for `group` rules.
    func warnIfDue(_ sender: Sender, quota: Quota, outcome: QuotaOutcome, ruleset: Ruleset, groups: [UInt32]) {
        guard let uid = sender.uid, let percent = ruleset.policy.warnAt(for: sender, groups: groups),
            Policy.warns(outcome, percent: percent)
        else { return }
        let now = self.clock()
        let window = quota.period?.seconds ?? Int64.max
        let first = self.warned.withLock { warned -> Bool in
            if let at = warned[uid], now - at < window { return false }
            warned[uid] = now
            return true
        }
        guard first else { return }
        let name = Self.userWord(sender)
        self.logger.notice(
            "\(sender.phrase) has used \(outcome.used) of \(quota) arbitrary recipients (warn at \(percent)%)",
            metadata: [LogKey.event: "warn", LogKey.uid: .string(String(uid)), LogKey.user: .string(LogText.escape(name, limit: 64))])
        let event = NotifyEvent(
            kind: .warning, uid: uid, user: name, time: now, recipients: [], queueID: nil,
            reason: "quota warning: \(outcome.used) of \(quota) arbitrary recipients used (warn at \(percent)%)",
            quota: quota.remaining(after: outcome))
        self.notifier.add(event, policy: ruleset.policy)
    }
}

/// The rules freeze, but the quota store in use does not keep freezes.
struct FreezeUnavailable: Error, CustomStringConvertible {
    var description: String { "the quota store in use does not keep freezes" }
}
