// Where log lines go: the journal (with structured fields, through libsystemd), syslog
// (facility mail, as Postfix logs), or standard error. Chosen once at startup.
// Every message that reaches a sink has already had its untrusted parts escaped (LogText);
// the sinks add nothing from outside.

import CRestrictSys
import CSystemd
public import Logging

#if canImport(Glibc)
import Glibc
#endif

public enum LogTarget: String, Sendable, CaseIterable {
    case auto, journal, syslog, stderr

    static let journalSocket = "/run/systemd/journal/socket"

    /// auto: the journal when systemd started us (and its socket is there), else syslog when a
    /// syslog socket exists, else standard error. sd_journal_sendv returns success even with no
    /// journald listening, so the decision is made from the environment, not from its result.
    /// `admin`: an admin command (--thaw) run from a shell, not by systemd, whose notice must
    /// still reach the journal with its fields (RESTRICTPD_EVENT=thaw) where there is one.
    public func resolved(admin: Bool = false) -> LogTarget {
        self.resolved(
            admin: admin, underSystemd: getenv("INVOCATION_ID") != nil || getenv("JOURNAL_STREAM") != nil,
            journal: SystemFiles.exists(Self.journalSocket), syslog: SystemFiles.exists("/dev/log"))
    }

    /// The choice itself, from what the environment offers.
    func resolved(admin: Bool, underSystemd: Bool, journal: Bool, syslog: Bool) -> LogTarget {
        guard self == .auto else { return self }
        if journal, underSystemd || admin { return .journal }
        if syslog { return .syslog }
        return .stderr
    }
}

extension Logger {
    /// A line after which the daemon stops (a start that cannot go on): logged at crit with
    /// Postfix's `fatal:` prefix and RESTRICTPD_EVENT=fatal. Other crit lines, which the
    /// daemon outlives (a freeze), say `crit:`.
    func fatal(_ message: @autoclosure () -> Logger.Message) {
        self.critical(message(), metadata: [LogKey.event: .string(LogKey.fatalEvent)])
    }
}

/// Journal field names for logger metadata keys (`uid` -> `RESTRICTPD_UID`).
enum JournalField {
    static func name(_ key: String) -> String {
        "RESTRICTPD_" + String(key.uppercased().map { $0.isLetter || $0.isNumber ? $0 : "_" })
    }
}

public struct RestrictLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    let target: LogTarget
    let label: String

    public init(label: String, target: LogTarget, level: Logger.Level) {
        self.label = label
        self.target = target
        self.logLevel = level
        if target == .syslog { crs_openlog("restrictpd", LOG_MAIL) }
        if target == .journal || target == .auto { Self.structured.withLock { $0 = true } }
    }

    private static let structured = Mutex(false)
    /// Whether a handler that keeps metadata (the journal's) is in use. Until the logging
    /// system is bootstrapped with this handler (tests, other handlers), metadata is built.
    static var keepsMetadata: Bool {
        Self.structured.withLock { $0 } || !Self.bootstrapped.withLock { $0 }
    }
    private static let bootstrapped = Mutex(false)
    /// Called once the logging system uses this handler.
    public static func installed() { Self.bootstrapped.withLock { $0 = true } }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let level = event.level
        let message = event.message
        switch self.target {
        case .journal, .auto:
            // Only the journal keeps metadata (as fields): the other sinks never build it.
            var merged = self.metadata
            if let extra = event.metadata { merged.merge(extra) { _, new in new } }
            Self.journal(level: level, message: "\(message)", metadata: merged)
        case .syslog:
            crs_syslog(Self.priority(level), "\(Self.prefix(level, metadata: event.metadata))\(message)")
        case .stderr:
            var line = "restrictpd[\(getpid())]: \(Self.prefix(level, metadata: event.metadata))\(message)\n"
            line.withUTF8 { buf in
                guard let base = buf.baseAddress else { return }
                var offset = 0
                while offset < buf.count {
                    let n = write(2, base + offset, buf.count - offset)
                    if n <= 0 { break }
                    offset += n
                }
            }
        }
    }

    /// Postfix's manner: "warning: ..." and "error: ..."; info lines bare. A crit line is
    /// "fatal: ..." only when the daemon stops after it (Logger.fatal), else "crit: ...":
    /// an admin reading "fatal" takes the daemon for dead.
    static func prefix(_ level: Logger.Level, metadata: Logger.Metadata? = nil) -> String {
        switch level {
        case .trace, .debug: return "debug: "
        case .info, .notice: return ""
        case .warning: return "warning: "
        case .error: return "error: "
        case .critical: return metadata?[LogKey.event] == .string(LogKey.fatalEvent) ? "fatal: " : "crit: "
        }
    }

    static func priority(_ level: Logger.Level) -> Int32 {
        switch level {
        case .trace, .debug: return LOG_DEBUG
        case .info: return LOG_INFO
        case .notice: return LOG_NOTICE
        case .warning: return LOG_WARNING
        case .error: return LOG_ERR
        case .critical: return LOG_CRIT
        }
    }

    static func journal(level: Logger.Level, message: String, metadata: Logger.Metadata) {
        var fields = [
            "MESSAGE=\(prefix(level, metadata: metadata))\(message)",
            "PRIORITY=\(priority(level))",
            "SYSLOG_IDENTIFIER=restrictpd",
            "SYSLOG_FACILITY=\(LOG_MAIL >> 3)",
        ]
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) {
            // Values are single-line by construction (escaped), but the journal would accept
            // newlines; strip them anyway so a field never spans entries.
            let v = "\(value)".replacingNewlines()
            fields.append("\(JournalField.name(key))=\(v)")
        }
        // One contiguous buffer, so every iovec points into memory alive for the whole call.
        var storage: [UInt8] = []
        var ranges: [Range<Int>] = []
        for field in fields {
            let start = storage.count
            storage.append(contentsOf: field.utf8)
            ranges.append(start..<storage.count)
        }
        storage.withUnsafeMutableBytes { raw in
            guard let base = raw.baseAddress else { return }
            let iovecs = ranges.map { iovec(iov_base: base + $0.lowerBound, iov_len: $0.count) }
            _ = iovecs.withUnsafeBufferPointer { sd_journal_sendv($0.baseAddress, Int32($0.count)) }
        }
    }
}

extension String {
    func replacingNewlines() -> String {
        String(self.map { $0 == "\n" || $0 == "\r" ? " " : $0 })
    }
}
