// Every bound restrictpd puts on its input, with its default and its legal range.
// The daemon reads the values from restrictpd.conf(5); the pure modules only ever see them here.

/// A closed range with a default inside it.
public struct Bound<Value: Comparable & Sendable>: Sendable {
    public let name: String
    public let defaultValue: Value
    public let range: ClosedRange<Value>

    public init(_ name: String, default defaultValue: Value, range: ClosedRange<Value>) {
        precondition(range.contains(defaultValue), "default of \(name) outside its range")
        self.name = name
        self.defaultValue = defaultValue
        self.range = range
    }
}

/// The limits one SMTP session is held to.
public struct SMTPLimits: Sendable, Equatable {
    /// RFC 5321 4.5.3.1.4 allows 512 octets for a command line; ESMTP parameters (RFC 1869) may
    /// add to that. Postfix's own `line_length_limit` is 2048.
    public static let commandLine = Bound("command_line_limit", default: 2048, range: 512...65536)
    /// RFC 5321 4.5.3.1.6: 1000 octets including CRLF. Postfix's smtp client folds at 990, so
    /// the default leaves room for other submitters without holding much per session.
    public static let dataLine = Bound("data_line_limit", default: 8192, range: 1000...1_048_576)
    /// The header section is held until the sender is known (design decision 7).
    public static let headerSection = Bound("header_limit", default: 102_400, range: 1024...10_485_760)
    /// Postfix's smtpd_recipient_limit is 1000.
    public static let recipients = Bound("recipient_limit", default: 1000, range: 1...100_000)
    /// Postfix's message_size_limit is 10240000; 0 means no limit.
    public static let messageSize = Bound("message_size_limit", default: 10_240_000, range: 0...(1 << 40))
    /// A reply line from the relay (RFC 5321 4.5.3.1.5 says 512).
    public static let replyLine = 4096
    /// Lines in one multi-line reply from the relay (an EHLO reply has a dozen).
    public static let replyLines = 64

    public var commandLine: Int
    public var dataLine: Int
    public var headerSection: Int
    public var recipients: Int
    public var messageSize: Int

    public init(
        commandLine: Int = SMTPLimits.commandLine.defaultValue,
        dataLine: Int = SMTPLimits.dataLine.defaultValue,
        headerSection: Int = SMTPLimits.headerSection.defaultValue,
        recipients: Int = SMTPLimits.recipients.defaultValue,
        messageSize: Int = SMTPLimits.messageSize.defaultValue
    ) {
        self.commandLine = commandLine
        self.dataLine = dataLine
        self.headerSection = headerSection
        self.recipients = recipients
        self.messageSize = messageSize
    }
}
