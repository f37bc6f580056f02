// restrictpd(8): argument parsing and wiring; everything else lives in RestrictDaemon.
// The main function is synchronous: see Daemon.prepare.

import ArgumentParser
import Logging
import NIOCore
import NIOPosix
import RestrictDaemon

#if canImport(Glibc)
import Glibc
#endif

@main
struct Main: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restrictpd",
        abstract: "Restrict which recipients each local user may send mail to (a Postfix content filter).",
        discussion: """
            Without an action flag, runs the daemon in the foreground. See restrictpd(8) and \
            restrictpd.conf(5).
            """,
        version: Version.string
    )

    @Option(name: .shortAndLong, help: ArgumentHelp("The configuration file.", valueName: "file"))
    var config = "/etc/restrictpd.conf"

    @Flag(name: .customLong("check-config"), help: "Check the configuration file, print every error as FILE:LINE: message, and exit.")
    var checkConfig = false

    @Option(name: .customLong("test"), help: ArgumentHelp("Print the verdict the rules give USER (name, uid, or 'unknown') for the recipients, spending no quota.", valueName: "user"))
    var testUser: String?

    @Flag(name: .customLong("quota"), help: "Show counted destinations and remaining quota (of USER, given as the argument, or of all).")
    var showQuota = false

    @Option(name: .customLong("reset-quota"), help: ArgumentHelp("Forget the counted destinations of a user.", valueName: "user"))
    var resetQuota: String?

    @Option(name: .customLong("thaw"), help: ArgumentHelp("Thaw a frozen user: its mail flows again.", valueName: "user"))
    var thaw: String?

    @Flag(help: "Show per user the messages relayed, refused and deferred, the distinct strangers and the volume caps, in total and per hour (of USER, given as the argument, or of all).")
    var stats = false

    @Option(help: ArgumentHelp("With --stats: the period to show, such as 24h, 7d or 90m.", valueName: "period"))
    var since: String?

    @Flag(help: "Check the live wiring (Postfix, restrictpd, firewall, what restricted users can reach), one line per check; exit 1 if any check fails. Root; changes nothing.")
    var audit = false

    @Flag(help: "With --audit or --stats: print one JSON object.")
    var json = false

    @Option(help: ArgumentHelp("With --audit: also check that restricted users cannot connect to this remote mail server (port 25 unless given).", valueName: "host[:port]"))
    var probe: String?

    @Option(name: .customLong("postfix-config"), help: ArgumentHelp("With --audit: the Postfix instance's configuration directory (postconf -c; default $MAIL_CONFIG, else Postfix's own).", valueName: "dir"))
    var postfixConfig: String?
    @Flag(name: .customLong("init-store"), help: "Create or upgrade the quota store's schema (the SQLite file, or the PostgreSQL database of a postgresql:// state), and exit.")
    var initStore = false

    @Option(help: ArgumentHelp("When started as root, run as this user.", valueName: "user"))
    var user = "restrict"

    @Option(help: ArgumentHelp("Where to log: auto, journal, syslog or stderr.", valueName: "target"))
    var log: String = "auto"

    @Option(name: .customLong("log-level"), help: ArgumentHelp("debug, info, notice, warning or error.", valueName: "level"))
    var logLevel: String = "info"

    @Argument(help: "Recipients for --test; a user for --quota.")
    var arguments: [String] = []

    func validate() throws {
        let actions = [self.checkConfig, self.testUser != nil, self.showQuota, self.resetQuota != nil, self.thaw != nil, self.audit, self.stats, self.initStore].filter { $0 }.count
        guard actions <= 1 else { throw ValidationError("give at most one of --check-config, --test, --quota, --reset-quota, --thaw, --audit, --stats, --init-store") }
        if !self.audit, self.probe != nil || self.postfixConfig != nil {
            throw ValidationError("--probe and --postfix-config go with --audit")
        }
        if !self.audit, !self.stats, self.json { throw ValidationError("--json goes with --audit or --stats") }
        if !self.stats, self.since != nil { throw ValidationError("--since goes with --stats") }
        if let since = self.since, Admin.parseSince(since) == nil { throw ValidationError("--since takes a period such as 24h, 7d or 90m") }
        if self.stats, self.arguments.count > 1 { throw ValidationError("--stats takes at most one user") }
        if self.testUser != nil, self.arguments.isEmpty { throw ValidationError("--test needs at least one recipient") }
        if self.showQuota, self.arguments.count > 1 { throw ValidationError("--quota takes at most one user") }
        if actions == 0 || self.checkConfig || self.resetQuota != nil || self.thaw != nil || self.audit || self.initStore, !self.arguments.isEmpty {
            throw ValidationError("unexpected arguments: \(self.arguments.joined(separator: " "))")
        }
        guard LogTarget(rawValue: self.log) != nil else { throw ValidationError("--log takes auto, journal, syslog or stderr") }
        guard Logger.Level(rawValue: self.logLevel) != nil else { throw ValidationError("--log-level takes debug, info, notice, warning or error") }
    }

    func run() throws {
        let output: AdminOutput
        let now = Runtime.wallClock()
        if self.checkConfig {
            output = Admin.checkConfig(self.config)
        } else if let user = self.testUser {
            output = Admin.test(configPath: self.config, user: user, recipients: self.arguments, now: now)
        } else if self.showQuota {
            output = Admin.showQuota(configPath: self.config, user: self.arguments.first, now: now)
        } else if let user = self.resetQuota {
            output = Admin.resetQuota(configPath: self.config, user: user)
        } else if let user = self.thaw {
            output = Admin.thaw(configPath: self.config, user: user)
        } else if self.stats {
            let since = self.since.flatMap(Admin.parseSince) ?? 86400
            output = Admin.stats(configPath: self.config, user: self.arguments.first, since: since, json: self.json, now: now)
        } else if self.audit {
            output = Admin.audit(AuditOptions(configPath: self.config, serviceUser: self.user, postfixConfig: self.postfixConfig, probe: self.probe, json: self.json))
        } else if self.initStore {
            output = Admin.initStore(configPath: self.config)
        } else {
            let target = (LogTarget(rawValue: self.log) ?? .auto).resolved()
            let level = Logger.Level(rawValue: self.logLevel) ?? .info
            LoggingSystem.bootstrap { label in RestrictLogHandler(label: label, target: target, level: level) }
            RestrictLogHandler.installed()
            let logger = Logger(label: "restrictpd")
            // Synchronous on purpose: sockets are bound and privileges dropped while this is
            // the only thread (see ListenSocket.swift), and then this thread waits.
            let prepared: PreparedDaemon
            switch Daemon.prepare(DaemonOptions(configPath: self.config, user: self.user), logger: logger) {
            case .success(let p): prepared = p
            case .failure(let failure): throw ExitCode(failure.exitStatus)
            }
            // Sessions are async code doing I/O on NIO's event loops: run Swift Concurrency on
            // those same threads, so no read or write crosses to another thread and back.
            NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
            let status = Daemon.runBlocking(prepared, logger: logger)
            if status != 0 { throw ExitCode(status) }
            return
        }
        for line in output.stdout { print(line) }
        for line in output.stderr { Self.printError(line) }
        if output.status != 0 { throw ExitCode(output.status) }
    }

    static func printError(_ line: String) {
        let text = line + "\n"
        _ = text.withCString { write(2, $0, strlen($0)) }
    }
}
