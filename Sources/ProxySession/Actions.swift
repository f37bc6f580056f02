// What the session machine asks its driver to do, and the record of one message's fate.
// Values only: the driver (RestrictDaemon's listener) carries the actions out in order.

public import NIOCore
public import RestrictPolicy
public import SMTPCore

public enum SessionLogLevel: Sendable, Equatable { case debug, info, warning, error }

/// Which deadline runs for the client (restrictpd.conf(5): command_timeout, data_timeout).
public enum SessionPhase: String, Sendable, Equatable {
    /// A command line: its deadline starts with the client's next bytes.
    case command
    /// The message: its deadline starts now.
    case data = "DATA"
}

/// One message's decision, as the decision line logs it.
public struct MessageRecord: Sendable, Equatable {
    public var queueID: String?
    public var uid: UInt32?
    public var user: String?
    public var from: String
    public var to: [String]
    public var verdict: Verdict.Kind
    public var reason: String
    public var quota: String?
    /// What is left of the rule's `messages` and `recipients` caps ("47/50 per hour").
    public var messages: String?
    public var recipients: String?
    /// The addresses outside the allow list the decision counted, for the statistics.
    public var strangers: [String] = []
    public var relayReply: String?
    /// The queue id the hold relay gave a held message ("queued as ID").
    public var heldQueueID: String?
    /// The X-PHP-Originating-Script hint (ScriptHint): forgeable, shown, never judged.
    public var script: String?

    public init(queueID: String?, uid: UInt32?, user: String?, from: String, to: [String], verdict: Verdict.Kind, reason: String) {
        self.queueID = queueID
        self.uid = uid
        self.user = user
        self.from = from
        self.to = to
        self.verdict = verdict
        self.reason = reason
    }
}

public enum SessionAction: Sendable, Equatable {
    /// Write to the client (flushed once the event's actions are done).
    case sendClient(ByteBuffer)
    /// Write to the relay; `replies` is how many replies these bytes ask for.
    case sendRelay([ByteBuffer], replies: Int)
    /// The relay's answer to this greeting command, for the next session on the connection.
    case rememberHello(SMTPCommand, SMTPReply)
    /// Look up the user name of `uid`; answer with `identified(user:)`.
    case identify(uid: UInt32)
    /// Ask the policy; answer with `decided(_:)`. `queueID`: pickup's, from the first header
    /// (freezing counts a retried message once).
    case decide(sender: Sender, recipients: [String], queueID: String?)
    /// Close the relay connection at once: the relay discards the message in progress.
    case abortRelay
    /// Open a new connection to the hold relay and make it the session's relay until
    /// `endHoldRelay`; answer with `holdRelayGreeted(_:)` or `holdRelayUnavailable(_:)`.
    /// Replies on the main relay connection wait for its return.
    case openHoldRelay
    /// Close the hold relay connection (at once with `abort`: it discards the message in
    /// progress; otherwise after QUIT) and make the main relay connection the session's again.
    case endHoldRelay(abort: Bool)
    /// The decision line of one message.
    case record(MessageRecord)
    case log(SessionLogLevel, String)
    /// A new client deadline.
    case phase(SessionPhase)
    /// The session waits for the relay (relay_timeout runs, the client's deadlines stand
    /// still) or no longer does.
    case waitingForRelay(Bool)
    /// The session is over; the relay connection may serve another session when reusable.
    case close(relayReusable: Bool)
}
