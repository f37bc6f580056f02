// Every reply restrictpd itself gives, named once: the session's, the listener's, the
// decisions', the policy service's. Codes follow RFC 5321 4.2.3 and Postfix's usage; enhanced
// codes RFC 3463. restrictpd(8) DIAGNOSTICS lists them, and a test holds the two together
// (`Replies.catalogue`). Replies that pass the relay's own answer on are not here.

public enum Replies {
    // MARK: the session (commands)

    public static let notImplemented = SMTPReply(502, "5.5.1", "Error: command not implemented")
    public static let notRecognized = SMTPReply(502, "5.5.1", "Error: command not recognized")
    public static let lineTooLong = SMTPReply(500, "5.5.2", "Error: line too long")
    public static let bareNewline = SMTPReply(521, "5.5.2", "Error: bare <CR> or <LF> received")
    public static let nestedMail = SMTPReply(503, "5.5.1", "Error: nested MAIL command")
    public static let needMail = SMTPReply(503, "5.5.1", "Error: need MAIL command")
    public static let needRecipient = SMTPReply(554, "5.5.1", "Error: no valid recipients")
    public static let tooManyRecipients = SMTPReply(452, "4.5.3", "Error: too many recipients")
    public static let pipelining = SMTPReply(554, "5.5.0", "Error: SMTP protocol synchronization")
    public static let startData = SMTPReply(code: 354, lines: ["End data with <CR><LF>.<CR><LF>"])
    public static let ok = SMTPReply(250, "2.0.0", "Ok")
    public static let bye = SMTPReply(221, "2.0.0", "Bye")
    public static let timeout = SMTPReply(421, "4.4.2", "Error: timeout exceeded, closing connection")
    public static let shuttingDown = SMTPReply(421, "4.3.2", "Service shutting down, closing connection")
    public static let afterAbort = SMTPReply(421, "4.3.0", "Closing connection after an aborted transfer")

    public static func syntax(_ why: String) -> SMTPReply { SMTPReply(501, "5.5.2", "Syntax error: \(why)") }
    public static func badAddress(_ why: String, sender: Bool) -> SMTPReply {
        SMTPReply(501, sender ? "5.1.7" : "5.1.3", "Bad \(sender ? "sender" : "recipient") address syntax: \(why)")
    }
    public static func unsupportedParameter(_ p: String) -> SMTPReply { SMTPReply(555, "5.5.4", "Unsupported option: \(p)") }

    // MARK: the message

    public static func messageTooBig(_ limit: Int) -> SMTPReply {
        SMTPReply(552, "5.3.4", "Message size exceeds fixed limit of \(limit) bytes")
    }
    public static func headerTooBig(_ limit: Int) -> SMTPReply {
        SMTPReply(552, "5.3.4", "Message header section exceeds \(limit) bytes")
    }
    public static let bareLFInData = SMTPReply(550, "5.6.0", "Message refused: bare <LF> in message data")
    public static let bareCRInData = SMTPReply(550, "5.6.0", "Message refused: bare <CR> in message data")
    public static let nulInData = SMTPReply(550, "5.6.0", "Message refused: NUL in message data")
    public static func longLineInData(_ limit: Int) -> SMTPReply {
        SMTPReply(550, "5.6.0", "Message refused: line longer than \(limit) octets")
    }

    // MARK: the relay

    public static let relayUnavailable = SMTPReply(421, "4.4.1", "Relay unavailable, try again later")
    public static let relayLost = SMTPReply(421, "4.4.2", "Relay connection lost, closing connection")
    public static let relayLostInData = SMTPReply(451, "4.4.2", "Relay connection lost during DATA, try again later")
    public static let relayConfused = SMTPReply(451, "4.4.2", "Relay protocol error, try again later")
    /// A message to be held, when the hold relay cannot be reached or does not take it: it
    /// stays in Postfix's deferred queue rather than going out.
    public static let holdUnavailable = SMTPReply(451, "4.4.1", "Hold relay unavailable, message deferred")

    // MARK: the listener (before a session starts)

    public static let peerUnverified = SMTPReply(421, "4.3.0", "Error: cannot verify the peer, try again later")
    public static let peerUnknown = SMTPReply(554, "5.7.1", "Error: peer identity unknown")
    public static func notClient(uid: UInt32) -> SMTPReply {
        SMTPReply(554, "5.7.1", "Error: uid \(uid) is not permitted to use this service")
    }
    public static let tooManySessions = SMTPReply(421, "4.3.2", "Error: too many sessions, try again later")

    // MARK: decisions (both doors)

    /// A recipient no rule allows. `who`: "uid 33 (www-data)" or "unidentified sender (...)".
    public static func notPermitted(_ recipient: String, who: String) -> SMTPReply {
        SMTPReply(550, "5.7.1", "<\(recipient)>: not permitted for \(who)")
    }
    /// The quota of arbitrary recipients is used up: 451 (Postfix retries) or, with
    /// `over_quota reject`, 550 (it bounces).
    public static func overQuota(_ recipient: String, limit: Int, period: String, who: String, permanent: Bool) -> SMTPReply {
        let text = "<\(recipient)>: quota of \(limit) arbitrary recipients\(period) exhausted for \(who)"
        return permanent ? SMTPReply(550, "5.7.1", text) : SMTPReply(451, "4.7.1", text)
    }
    /// A volume cap is reached (`cap`: "50 messages per hour", "10 recipients per message"):
    /// 451 or, with `over_quota reject`, 550, as for the quota.
    public static func overCap(_ cap: String, who: String, permanent: Bool) -> SMTPReply {
        let text = "cap of \(cap) reached for \(who)"
        return permanent ? SMTPReply(550, "5.7.1", text) : SMTPReply(451, "4.7.1", text)
    }
    public static let storeUnavailable = SMTPReply(451, "4.3.0", "Temporary failure: quota database unavailable")
    /// Every message of a frozen UID with `frozen defer` (and the text a held one carries).
    public static func frozen(who: String) -> SMTPReply {
        SMTPReply(451, "4.7.1", "Mail from \(who) is frozen until the administrator releases it")
    }

    // MARK: the policy service (answers after "action=")

    public static let policyMalformed = PolicyAction.defer(enhanced: "4.3.0", text: "Error: malformed policy request")
    public static let policyUnidentified = PolicyAction.defer(enhanced: "4.3.0", text: "Error: cannot identify the local sender, try again later")
    public static let policyStoreUnavailable = PolicyAction.defer(enhanced: "4.3.0", text: "Temporary failure: quota database unavailable")
    public static let policyBusy = PolicyAction.defer(enhanced: "4.3.0", text: "Temporary failure: quota busy, try again later")
    public static let policyUnknownTransaction = PolicyAction.defer(enhanced: "4.3.0", text: "Temporary failure: transaction expired, try again")

    /// A decision's reply as the policy service gives it at RCPT: a temporary refusal becomes
    /// DEFER_IF_PERMIT (Postfix's 450), so a later restriction may still reject outright.
    public static func policyAction(_ reply: SMTPReply) -> PolicyAction {
        guard reply.isTransient, let enhanced = reply.enhancedCode else { return .reply(reply) }
        return .deferIfPermit(enhanced: enhanced, text: String(reply.lines[0].dropFirst(enhanced.count + 1)))
    }

    /// A held message's answer at the SMTP door: Postfix puts the message on its hold queue;
    /// the text (the refusal it stands for) goes to Postfix's log.
    public static func policyHold(_ reply: SMTPReply) -> PolicyAction {
        let enhanced = reply.enhancedCode ?? "4.7.1"
        let text = String(reply.lines[0].dropFirst(reply.enhancedCode.map { $0.count + 1 } ?? 0))
        return .hold(enhanced: enhanced.hasPrefix("5") ? "4" + enhanced.dropFirst() : enhanced, text: text)
    }

    /// The same at END-OF-MESSAGE, where nothing comes after to wait for: DEFER.
    public static func policyActionAtEnd(_ reply: SMTPReply) -> PolicyAction {
        guard reply.isTransient, let enhanced = reply.enhancedCode else { return .reply(reply) }
        return .defer(enhanced: enhanced, text: String(reply.lines[0].dropFirst(enhanced.count + 1)))
    }

    /// Every reply above, with sample arguments: what restrictpd(8) DIAGNOSTICS must list.
    public static var catalogue: [(name: String, reply: SMTPReply)] {
        [
            ("notImplemented", notImplemented), ("notRecognized", notRecognized), ("lineTooLong", lineTooLong),
            ("bareNewline", bareNewline), ("nestedMail", nestedMail), ("needMail", needMail),
            ("needRecipient", needRecipient), ("tooManyRecipients", tooManyRecipients), ("pipelining", pipelining),
            ("timeout", timeout), ("shuttingDown", shuttingDown), ("afterAbort", afterAbort),
            ("syntax", syntax("x")), ("badSender", badAddress("x", sender: true)), ("badRecipient", badAddress("x", sender: false)),
            ("unsupportedParameter", unsupportedParameter("X")), ("messageTooBig", messageTooBig(1)), ("headerTooBig", headerTooBig(1)),
            ("bareLFInData", bareLFInData), ("bareCRInData", bareCRInData), ("nulInData", nulInData),
            ("longLineInData", longLineInData(1)), ("relayUnavailable", relayUnavailable), ("relayLost", relayLost),
            ("relayLostInData", relayLostInData), ("relayConfused", relayConfused), ("holdUnavailable", holdUnavailable), ("peerUnverified", peerUnverified),
            ("peerUnknown", peerUnknown), ("notClient", notClient(uid: 1)), ("tooManySessions", tooManySessions),
            ("notPermitted", notPermitted("a@b", who: "uid 1")),
            ("overQuota", overQuota("a@b", limit: 1, period: "", who: "uid 1", permanent: false)),
            ("overQuotaReject", overQuota("a@b", limit: 1, period: "", who: "uid 1", permanent: true)),
            ("overCap", overCap("1 messages per hour", who: "uid 1", permanent: false)),
            ("overCapReject", overCap("1 messages per hour", who: "uid 1", permanent: true)),
            ("storeUnavailable", storeUnavailable), ("frozen", frozen(who: "uid 1")),
        ]
    }

    /// The policy service's own answers, for restrictpd(8) DIAGNOSTICS likewise.
    public static var policyCatalogue: [(name: String, action: PolicyAction)] {
        [
            ("policyMalformed", policyMalformed), ("policyUnidentified", policyUnidentified),
            ("policyStoreUnavailable", policyStoreUnavailable), ("policyBusy", policyBusy),
            ("policyUnknownTransaction", policyUnknownTransaction),
            ("policyOverQuota", policyAction(overQuota("a@b", limit: 1, period: "", who: "uid 1", permanent: false))),
            ("policyOverQuotaAtEnd", policyActionAtEnd(overQuota("a@b", limit: 1, period: "", who: "uid 1", permanent: false))),
            ("policyHold", policyHold(overQuota("a@b", limit: 1, period: "", who: "uid 1", permanent: false))),
        ]
    }
}
