// Log keys and the one decision line per message, in Postfix's key=value manner:
//   QUEUEID: uid=33 user=www-data door=pickup from=<a@b> to=<c@d>,<e@f> verdict=refused reason="..." relay="..."
//   QUEUEID: uid=33 user=www-data door=pickup from=<a@b> to=<c@d> verdict=held reason="..." held_as=HOLDID relay="..."
//   NOQUEUE: uid=33 user=www-data door=smtp client=127.0.0.1:40000 from=<a@b> to=<c@d> verdict=refused reason="..."
// followed, where the rule has them, by quota="17/20 per day" messages="47/50 per hour"
// recipients="190/200 per day" (what is left of each).
// Every value that came from outside is escaped and truncated by LogText first.

import Logging
import RestrictPolicy
import SMTPCore

enum LogKey {
    static let uid = "uid"
    static let user = "user"
    static let queueID = "queue_id"
    static let from = "from"
    static let to = "to"
    static let verdict = "verdict"
    static let reason = "reason"
    static let quota = "quota"
    static let messages = "messages"
    static let recipients = "recipients"
    static let relay = "relay"
    static let heldQueueID = "held_queue_id"
    /// freeze, thaw, warn, fatal: events other than a message's decision.
    static let event = "event"
    /// The event of a line after which the daemon stops (Logger.fatal).
    static let fatalEvent = "fatal"
    static let script = "script"
    static let peer = "peer"
    static let peerUID = "peer_uid"
    static let door = "door"
    static let client = "client"
    static let sasl = "sasl"
}

/// Which way the mail came in (design decision 11).
enum Door: String {
    /// sendmail(1): pickup(8) and the content filter.
    case pickup
    /// SMTP to Postfix's smtpd, judged through the policy service.
    case smtp
}

struct DecisionRecord {
    /// Recipients named on the line; the rest are counted ("...(N in all)"), so a message to
    /// thousands of recipients still makes one readable line.
    static let recipientsShown = 20
    /// Recipients in the journal field, which no one reads by eye but which is still bounded.
    static let recipientsInField = 100

    var queueID: String?
    var uid: UInt32?
    var user: String?
    var from: String
    var to: [String]
    var verdict: Verdict.Kind
    var reason: String
    var quota: String?
    var relayReply: String?
    /// What is left of the rule's `messages` and `recipients` caps ("47/50 per hour").
    var messages: String? = nil
    var recipients: String? = nil
    /// A held message: the queue id it has in Postfix's hold queue.
    var heldQueueID: String? = nil
    /// The X-PHP-Originating-Script hint, already escaped and truncated (ScriptHint).
    var script: String? = nil
    var door: Door = .pickup
    /// The SMTP door: the client's address and port.
    var client: String? = nil
    /// The SMTP door: the SASL login name of an authenticated session.
    var sasl: String? = nil

    var line: String {
        var s = "\(self.queueID.map { LogText.escape($0, limit: 64) } ?? "NOQUEUE"): "
        s += "uid=\(self.uid.map(String.init) ?? "unknown")"
        if let user { s += " user=\(LogText.escape(user, limit: 64))" }
        s += " door=\(self.door.rawValue)"
        if let client { s += " client=\(LogText.escape(client, limit: 64))" }
        s += " from=<\(LogText.escape(self.from))>"
        let shown = self.to.prefix(Self.recipientsShown).map { "<\(LogText.escape($0))>" }.joined(separator: ",")
        s += " to=\(shown)\(self.to.count > Self.recipientsShown ? ",...(\(self.to.count) in all)" : "")"
        s += " verdict=\(self.verdict.rawValue) reason=\"\(LogText.escape(self.reason, limit: 512))\""
        if let quota { s += " quota=\"\(quota)\"" }
        if let messages { s += " messages=\"\(messages)\"" }
        if let recipients { s += " recipients=\"\(recipients)\"" }
        if let heldQueueID { s += " held_as=\(LogText.escape(heldQueueID, limit: 64))" }
        if let script { s += " script=\"\(script)\"" }
        if let sasl { s += " sasl=\"\(LogText.escape(sasl, limit: 128))\"" }
        if let relayReply { s += " relay=\"\(LogText.escape(relayReply, limit: 512))\"" }
        return s
    }

    var metadata: Logger.Metadata {
        var m: Logger.Metadata = [
            LogKey.verdict: .string(self.verdict.rawValue),
            LogKey.from: .string(LogText.escape(self.from)),
            LogKey.to: .string(self.to.prefix(Self.recipientsInField).map { LogText.escape($0) }.joined(separator: ",")),
            LogKey.reason: .string(LogText.escape(self.reason, limit: 512)),
            LogKey.door: .string(self.door.rawValue),
        ]
        if let client { m[LogKey.client] = .string(LogText.escape(client, limit: 64)) }
        if let sasl { m[LogKey.sasl] = .string(LogText.escape(sasl, limit: 128)) }
        if let queueID { m[LogKey.queueID] = .string(LogText.escape(queueID, limit: 64)) }
        if let uid { m[LogKey.uid] = .string(String(uid)) }
        if let user { m[LogKey.user] = .string(LogText.escape(user, limit: 64)) }
        if let quota { m[LogKey.quota] = .string(quota) }
        if let messages { m[LogKey.messages] = .string(messages) }
        if let recipients { m[LogKey.recipients] = .string(recipients) }
        if let heldQueueID { m[LogKey.heldQueueID] = .string(LogText.escape(heldQueueID, limit: 64)) }
        if let script { m[LogKey.script] = .string(script) }
        if let relayReply { m[LogKey.relay] = .string(LogText.escape(relayReply, limit: 512)) }
        return m
    }
}
