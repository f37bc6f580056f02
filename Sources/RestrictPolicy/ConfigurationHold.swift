// Which settings send mail to the hold listener: `--check-config` refuses a hold_relay that is
// relay's address only where something can be held, and `--audit` names the settings.

extension Configuration {
    /// The settings that send mail to `hold_relay`: over_quota hold, on_refuse hold (global or
    /// in a rule), and a freeze while `frozen` is hold. Empty when nothing is ever held.
    public var holdReasons: [String] {
        var reasons: [String] = []
        if self.overQuota == .hold { reasons.append("over_quota hold") }
        if self.onRefuse == .hold { reasons.append("on_refuse hold") }
        for rule in self.rules {
            let label = rule.userName.map { "user \($0)" } ?? rule.groupName.map { "group \($0)" } ?? rule.selector.description
            if rule.overQuota == .hold { reasons.append("over_quota hold in \(label)") }
            if rule.onRefuse == .hold { reasons.append("on_refuse hold in \(label)") }
        }
        let freezes = self.freeze != nil || self.rules.contains { $0.freeze != nil }
        if freezes && self.frozenAction == .hold { reasons.append("freeze with frozen hold") }
        return reasons
    }
}
