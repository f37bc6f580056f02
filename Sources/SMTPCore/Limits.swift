// The bounds one SMTP session is held to. Their defaults and legal ranges are settings of
// restrictpd.conf(5) (RestrictPolicy's `Setting`); the pure modules only ever see the values.

/// The limits one SMTP session is held to.
public struct SMTPLimits: Sendable, Equatable {
    /// A reply line from the relay (RFC 5321 4.5.3.1.5 says 512).
    public static let replyLine = 4096
    /// Lines in one multi-line reply from the relay (an EHLO reply has a dozen).
    public static let replyLines = 64

    public var commandLine: Int
    public var dataLine: Int
    public var headerSection: Int
    public var recipients: Int
    public var messageSize: Int

    public init(commandLine: Int, dataLine: Int, headerSection: Int, recipients: Int, messageSize: Int) {
        self.commandLine = commandLine
        self.dataLine = dataLine
        self.headerSection = headerSection
        self.recipients = recipients
        self.messageSize = messageSize
    }
}
