// restrictpd.conf(5) volume caps inside a rule: `messages N per hour|day|week`,
// `recipients N per hour|day|week`, `max_recipients N`.

extension ConfigParser {
    public static let capKeys: [String] = ["messages", "recipients", "max_recipients"]

    /// Adds the cap on one line to `rule`; returns the error message, or nil.
    static func parseCap(_ key: String, _ args: [String], into rule: inout Rule) -> String? {
        if rule.selector == .unknown {
            return "\(key) has no meaning for unknown senders (there is no uid to count for)"
        }
        if key == "max_recipients" {
            guard rule.caps.maxRecipients == nil else { return "max_recipients given twice in one rule" }
            guard args.count == 1, let n = Int(args[0]), (1...VolumeCaps.maxRecipientsLimit).contains(n) else {
                return "max_recipients takes N with N from 1 to \(VolumeCaps.maxRecipientsLimit)"
            }
            rule.caps.maxRecipients = n
            return nil
        }
        guard let kind = VolumeCap.Kind(rawValue: key) else { return "unknown cap '\(key)'" }
        let existing = kind == .messages ? rule.caps.messages : rule.caps.recipients
        guard existing == nil else { return "\(key) given twice in one rule" }
        guard args.count == 3, args[1] == "per", let n = Int(args[0]), (0...VolumeCap.maxLimit).contains(n) else {
            return "\(key) takes 'N per hour|day|week' with N from 0 to \(VolumeCap.maxLimit)"
        }
        guard let period = QuotaPeriod(rawValue: args[2]) else { return "unknown period '\(args[2])': use hour, day or week" }
        let cap = VolumeCap(kind: kind, limit: n, period: period)
        if kind == .messages { rule.caps.messages = cap } else { rule.caps.recipients = cap }
        return nil
    }
}
