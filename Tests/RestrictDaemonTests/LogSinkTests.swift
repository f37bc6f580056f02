// Where log lines go and how their level reads: the admin commands log to the journal
// wherever journald runs, and only a line the daemon does not outlive says "fatal:".

import Logging
import Testing

@testable import RestrictDaemon

@Suite struct LogSinkTests {
    @Test func theDaemonUsesTheJournalOnlyUnderSystemd() {
        let auto = LogTarget.auto
        #expect(auto.resolved(admin: false, underSystemd: true, journal: true, syslog: true) == .journal)
        #expect(auto.resolved(admin: false, underSystemd: false, journal: true, syslog: true) == .syslog)
        #expect(auto.resolved(admin: false, underSystemd: true, journal: false, syslog: true) == .syslog)
        #expect(auto.resolved(admin: false, underSystemd: false, journal: false, syslog: false) == .stderr)
    }

    @Test func anAdminCommandFromAShellUsesTheJournalWhenItsSocketExists() {
        let auto = LogTarget.auto
        #expect(auto.resolved(admin: true, underSystemd: false, journal: true, syslog: true) == .journal)
        #expect(auto.resolved(admin: true, underSystemd: false, journal: false, syslog: true) == .syslog)
        #expect(auto.resolved(admin: true, underSystemd: false, journal: false, syslog: false) == .stderr)
        // An explicit --log wins.
        #expect(LogTarget.syslog.resolved(admin: true, underSystemd: true, journal: true, syslog: true) == .syslog)
    }

    @Test func onlyALineTheDaemonDoesNotOutliveSaysFatal() {
        #expect(RestrictLogHandler.prefix(.critical, metadata: [LogKey.event: "freeze"]) == "crit: ")
        #expect(RestrictLogHandler.prefix(.critical) == "crit: ")
        #expect(RestrictLogHandler.prefix(.critical, metadata: [LogKey.event: .string(LogKey.fatalEvent)]) == "fatal: ")
        #expect(RestrictLogHandler.prefix(.error) == "error: " && RestrictLogHandler.prefix(.warning) == "warning: ")
        #expect(RestrictLogHandler.prefix(.notice).isEmpty && RestrictLogHandler.prefix(.info).isEmpty)
    }

    @Test func fatalLogsAtCritWithTheFatalEvent() {
        let logs = LogRecorder()
        let logger = Logger(label: "test") { _ in RecordingLogHandler(recorder: logs) }
        logger.fatal("cannot listen on 127.0.0.1:10027: address in use")
        let line = logs.all.first
        #expect(line?.level == .critical && line?.metadata[LogKey.event] == .string(LogKey.fatalEvent))
    }
}
