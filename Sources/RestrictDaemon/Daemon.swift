// The daemon's life: configuration, listeners, privileges, the quota store, readiness,
// signals (SIGHUP reload, SIGTERM/SIGINT drain), systemd status and watchdog.

import Dispatch
public import Logging
import NIOCore
import NIOPosix
public import RestrictPolicy
import QuotaStore
import SMTPCore

#if canImport(Glibc)
import Glibc
#endif

public struct DaemonOptions: Sendable {
    public var configPath: String
    /// The user to run as when started as root.
    public var user: String

    public init(configPath: String, user: String) {
        self.configPath = configPath
        self.user = user
    }
}

public enum ConfigurationLoader {
    /// Reads and parses a configuration file, resolving user names through the passwd database.
    public static func load(_ path: String) -> Result<Configuration, ConfigErrors> {
        let text: String
        do {
            text = try SystemFiles.readText(path, limit: ConfigParser.maxFileSize)
        } catch {
            return .failure(ConfigErrors([ConfigError(file: path, line: 0, message: "\(error)")]))
        }
        let parsed = ConfigParser.parse(
            text, file: path, users: UserResolver { Users.lookup(name: $0)?.uid }, groups: GroupResolver { Users.groupID(name: $0) })
        guard case .success(let configuration) = parsed else { return parsed }
        // Two group rules that both cover an existing user, with nothing more specific, would
        // leave its rule to the order of the file: refused, naming both lines.
        let groupRules = configuration.rules.count { if case .group = $0.selector { return true } else { return false } }
        guard groupRules > 1 else { return parsed }
        let ambiguous = ConfigParser.ambiguousGroups(configuration, members: Users.allMembers(), file: path)
        return ambiguous.isEmpty ? parsed : .failure(ConfigErrors(ambiguous))
    }
}

/// What `Daemon.prepare` made while the process was still single-threaded.
public struct PreparedDaemon: Sendable {
    /// A listening socket, the name the log gives it, and whether it serves the policy service.
    typealias Socket = (fd: Int32, name: String, policy: Bool)

    let options: DaemonOptions
    let configuration: Configuration
    /// Listening sockets: ours, bound from `listen` and `policy_listen` lines, or systemd's.
    let sockets: [Socket]
    /// The PostgreSQL store's password, read while still root.
    var statePassword: String? = nil
}

/// The daemon's listeners: SMTP for Postfix's content_filter, and the policy service.
struct Listeners: Sendable {
    var smtp: [Listener] = []
    var policy: [Listener] = []
}

/// What serves the listeners, over the quota store.
struct Services: Sendable {
    let runtime: Runtime
    /// The quota store's part of STATUS=.
    let storeStatus: @Sendable () -> String
    /// The SMTP sessions in progress, which a drain waits for.
    let registry: SessionRegistry
    let handler: ConnectionHandler
    let policyService: PolicyService
    /// Postfix keeps policy connections open between requests: a drain closes them at once
    /// rather than waiting for them.
    let policyRegistry: SessionRegistry
    let policy: PolicyConnection

    /// Opens the quota store and reads Postfix's local domains, then builds the services over them.
    static func open(_ prepared: PreparedDaemon, group: any EventLoopGroup, logger: Logger) async -> Services {
        let configuration = prepared.configuration
        let (store, storeStatus) = await QuotaStores.open(configuration, password: prepared.statePassword, logger: logger)
        let localDomains = (try? await Offload.run { PostfixDomains.read(for: configuration, logger: logger) }) ?? []
        let runtime = Runtime(
            ruleset: Ruleset(configuration, localDomains: localDomains), store: store, logger: logger,
            metricsFile: configuration.metricsFile)
        let registry = SessionRegistry()
        let handler = ConnectionHandler(runtime: runtime, registry: registry, group: group)
        let policyService = PolicyService(runtime: runtime)
        let policyRegistry = SessionRegistry()
        let policy = PolicyConnection(service: policyService, registry: policyRegistry)
        return Services(
            runtime: runtime, storeStatus: storeStatus, registry: registry, handler: handler, policyService: policyService,
            policyRegistry: policyRegistry, policy: policy)
    }
}

/// Why the daemon could not start, as the process's exit status.
public enum StartFailure: Error, Sendable {
    /// The configuration is wrong (the file, or a name in it): starting again cannot help,
    /// so the exit status is EX_CONFIG from sysexits.h, which the unit's
    /// RestartPreventExitStatus= names to stop systemd from restarting in a loop.
    case configuration
    /// Anything else (a socket that cannot be bound, a missing run-as user, a failed privilege
    /// drop): status 1, and systemd may try again.
    case other

    public var exitStatus: Int32 {
        switch self {
        case .configuration: return 78
        case .other: return 1
        }
    }
}

public enum Daemon {
    /// After drain_timeout, how long the sessions answered 421 get to take the answer and go.
    static let closeGrace: TimeAmount = .seconds(5)

    /// The part that must run before any thread exists: configuration, listening sockets, and
    /// the privilege drop. Fails (after logging why) when the daemon cannot start.
    public static func prepare(_ options: DaemonOptions, logger: Logger) -> Result<PreparedDaemon, StartFailure> {
        let configuration: Configuration
        switch ConfigurationLoader.load(options.configPath) {
        case .success(let c): configuration = c
        case .failure(let errors):
            for e in errors.errors { logger.fatal("\(e)") }
            return .failure(.configuration)
        }
        warnAboutConfiguration(configuration, logger: logger)
        let sockets: [PreparedDaemon.Socket]
        switch listeningSockets(configuration, logger: logger) {
        case .success(let s): sockets = s
        case .failure(let failure): return .failure(failure)
        }
        guard !sockets.isEmpty else {
            logger.fatal("nothing to listen on")
            return .failure(.other)
        }
        let statePassword: String?
        do {
            statePassword = try QuotaStores.password(configuration)
        } catch {
            logger.fatal("state_password_file: \(error)")
            return .failure(.configuration)
        }
        if let failure = dropPrivileges(options, logger: logger) { return .failure(failure) }
        return .success(PreparedDaemon(options: options, configuration: configuration, sockets: sockets, statePassword: statePassword))
    }

    /// Settings that start a daemon that cannot work as meant: said at once, in the log.
    static func warnAboutConfiguration(_ configuration: Configuration, logger: Logger) {
        if !configuration.peerCheck {
            logger.warning("peer_check is off: any local user who can connect can claim any uid")
        }
        if configuration.peerCheck, configuration.clients.isEmpty {
            logger.warning("no user in clients exists on this system: every connection will be refused")
        }
        if let (soft, _) = Privileges.raiseFileLimit() {
            let needed = UInt64(configuration.value(.maxSessions)) * 2 + 64
            if soft < needed {
                logger.warning("open file limit \(soft) is below what max_sessions \(configuration.value(.maxSessions)) needs (\(needed)): raise LimitNOFILE")
            }
        }
    }

    /// The sockets systemd passed, or else ours, bound from `listen` and `policy_listen`.
    static func listeningSockets(_ configuration: Configuration, logger: Logger) -> Result<[PreparedDaemon.Socket], StartFailure> {
        let passed = Systemd.listenSockets()
        if !passed.isEmpty { return .success(systemdSockets(passed, configuration: configuration, logger: logger)) }
        let gid = configuration.unixSocketGroup.flatMap { Users.groupID(name: $0) }
        if let name = configuration.unixSocketGroup, gid == nil {
            logger.fatal("unix_socket_group: no group named \(name)")
            return .failure(.configuration)
        }
        var sockets: [PreparedDaemon.Socket] = []
        let all = configuration.listen.map { ($0, false) } + configuration.policyListen.map { ($0, true) }
        for (address, policy) in all {
            do {
                let fd = try ListenSocket.open(address, mode: configuration.unixSocketMode, group: gid)
                sockets.append((fd, policy ? "\(address) (policy service)" : "\(address)", policy))
            } catch {
                logger.fatal("cannot listen on \(address): \(error)")
                return .failure(.other)
            }
        }
        return .success(sockets)
    }

    /// systemd's sockets that are listening streams. A socket named "policy"
    /// (FileDescriptorName=), or one bound to a policy_listen address, serves the policy
    /// service; every other one SMTP.
    static func systemdSockets(
        _ passed: [Systemd.ListenSocket], configuration: Configuration, logger: Logger
    ) -> [PreparedDaemon.Socket] {
        var sockets: [PreparedDaemon.Socket] = []
        for socket in passed {
            guard Systemd.isListeningStream(socket.fd) else {
                logger.warning("ignoring socket \(socket.name) (fd \(socket.fd)) from systemd: not a listening stream socket")
                continue
            }
            let policy = socket.name == "policy" || ListenSocket.isBound(socket.fd, toOneOf: configuration.policyListen)
            sockets.append((socket.fd, "\(socket.name) (fd \(socket.fd), from systemd)\(policy ? " (policy service)" : "")", policy))
        }
        if !configuration.policyListen.isEmpty, !sockets.contains(where: \.policy) {
            logger.warning("policy_listen is set, but systemd passed no socket for it (name it \"policy\" or bind it to a policy_listen address): the SMTP door is closed, and Postfix answers its default action")
        }
        return sockets
    }

    /// Started as root, becomes `options.user` (unless that is root). Returns why it could not.
    static func dropPrivileges(_ options: DaemonOptions, logger: Logger) -> StartFailure? {
        guard getuid() == 0, options.user != "root" else { return nil }
        guard let user = Users.lookup(name: options.user) else {
            logger.fatal("user \(options.user) does not exist (create it with adduser --system \(options.user), or pass --user root)")
            return .other
        }
        do {
            try Privileges.dropWhileSingleThreaded(to: user)
        } catch {
            logger.fatal("cannot drop privileges to \(options.user): \(error)")
            return .other
        }
        logger.info("running as \(options.user) (uid \(user.uid))")
        return nil
    }

    /// Runs the prepared daemon to its end from synchronous code (the executable's main, which
    /// stays blocked here rather than parked by an async main). Returns the exit status.
    public static func runBlocking(_ prepared: PreparedDaemon, logger: Logger) -> Int32 {
        let status = Mutex<Int32>(1)
        let done = DispatchSemaphore(value: 0)
        Task.detached {
            let s = await Self.run(prepared, logger: logger)
            status.withLock { $0 = s }
            done.signal()
        }
        done.wait()
        return status.withLock { $0 }
    }

    /// Runs until SIGTERM or SIGINT. Returns the process exit status.
    public static func run(_ prepared: PreparedDaemon, logger: Logger) async -> Int32 {
        let configuration = prepared.configuration
        let (signals, sources) = Self.catchSignals()
        defer { sources.forEach { $0.cancel() } }

        let group = MultiThreadedEventLoopGroup.singleton
        guard let listeners = await Self.adoptListeners(prepared.sockets, group: group, logger: logger) else { return 1 }
        let services = await Services.open(prepared, group: group, logger: logger)
        let runtime = services.runtime
        logger.info("restrictpd \(Version.string) ready: \(configuration.rules.count) rules, relay \(configuration.relayHost):\(configuration.relayPort)")
        Systemd.notify("READY=1\nSTATUS=ready; \(runtime.snapshot.status) \(services.storeStatus())")

        await withTaskGroup(of: Void.self) { tasks in
            Self.startServing(listeners, services: services, in: &tasks, logger: logger)
            await Self.waitForStop(signals, options: prepared.options, services: services, listeners: listeners, logger: logger)
            tasks.cancelAll()
        }
        await runtime.flushStats()
        _ = try? await Offload.run { runtime.writeMetrics() }
        logger.info("stopped: \(runtime.snapshot.status)")
        return 0
    }

    /// SIGHUP, SIGTERM and SIGINT as a stream, and the Dispatch sources that feed it (to
    /// cancel at the end). SIGPIPE is ignored.
    static func catchSignals() -> (AsyncStream<Int32>, [any DispatchSourceSignal]) {
        // Ignore the signals before anything can deliver them; Dispatch sources read them.
        for sig in [SIGHUP, SIGTERM, SIGINT, SIGPIPE] { signal(sig, SIG_IGN) }
        let (signals, continuation) = AsyncStream<Int32>.makeStream()
        let sources = [SIGHUP, SIGTERM, SIGINT].map { sig in
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { continuation.yield(sig) }
            source.resume()
            return source
        }
        return (signals, sources)
    }

    /// The SMTP and policy listeners on the prepared sockets; nil (after logging why) when one
    /// cannot be adopted.
    static func adoptListeners(_ sockets: [PreparedDaemon.Socket], group: any EventLoopGroup, logger: Logger) async -> Listeners? {
        var listeners = Listeners()
        for socket in sockets {
            do {
                let listener = try await ListenerFactory.adopt(fd: socket.fd, group: group)
                if socket.policy { listeners.policy.append(listener) } else { listeners.smtp.append(listener) }
                logger.info("listening on \(socket.name)")
            } catch {
                logger.fatal("cannot listen on \(socket.name): \(error)")
                return nil
            }
        }
        return listeners
    }

    /// One task for each listener, the housekeeping and the notifier.
    static func startServing(_ listeners: Listeners, services: Services, in tasks: inout TaskGroup<Void>, logger: Logger) {
        let runtime = services.runtime
        for listener in listeners.smtp {
            tasks.addTask { await services.handler.run(listener) }
        }
        for listener in listeners.policy {
            tasks.addTask { await listener.serve(.policy(services.policy), logger: logger) }
        }
        let sweeper: PolicyService? = listeners.policy.isEmpty ? nil : services.policyService
        tasks.addTask { await Self.housekeeping(runtime: runtime, policy: sweeper, storeStatus: services.storeStatus) }
        let notifyLoop = services.handler.group.next()
        tasks.addTask { await runtime.notifier.run(runtime: runtime, eventLoop: notifyLoop) }
    }

    /// Reloads on each SIGHUP until SIGTERM or SIGINT, then drains.
    static func waitForStop(
        _ signals: AsyncStream<Int32>, options: DaemonOptions, services: Services, listeners: Listeners, logger: Logger
    ) async {
        let registry = services.registry
        for await sig in signals {
            if sig == SIGHUP {
                // Reading the file, user lookups and resolving the relay block: not on an
                // event loop, which sessions share.
                _ = try? await Offload.run { Self.reload(options, runtime: services.runtime, logger: logger) }
                continue
            }
            logger.info("signal \(sig == SIGTERM ? "TERM" : "INT"): stopping; draining \(registry.count) sessions")
            Systemd.notify("STOPPING=1\nSTATUS=draining \(registry.count) sessions")
            await Self.drain(services, listeners: listeners, logger: logger)
            return
        }
    }

    /// Stops accepting and closes the policy connections at once; then gives the SMTP
    /// sessions drain_timeout to end.
    static func drain(_ services: Services, listeners: Listeners, logger: Logger) async {
        services.runtime.draining.withLock { $0 = true }
        for listener in listeners.policy {
            try? await listener.channel.close()
        }
        services.policyRegistry.closeAll()
        for listener in listeners.smtp {
            // Stop accepting first; a connection accepted meanwhile is answered
            // 421 4.3.2 by its session (the runtime is draining).
            try? await listener.channel.setOption(ChannelOptions.autoRead, value: false).get()
            try? await listener.channel.close()
        }
        services.handler.pool.closeAll()
        let drain = Int64(services.runtime.ruleset.configuration.value(.drainTimeout))
        await Self.waitForSessions(services.registry, drainTimeout: drain, logger: logger)
    }

    /// Waits up to `drainTimeout` seconds for the sessions to end; then answers the ones left
    /// 421 4.3.2 and gives them `closeGrace` to take the answer and go.
    static func waitForSessions(_ registry: SessionRegistry, drainTimeout: Int64, logger: Logger) async {
        let deadline = NIODeadline.now() + .seconds(drainTimeout)
        while registry.count > 0, NIODeadline.now() < deadline {
            try? await Task.sleep(nanoseconds: 100_000_000)
        }
        guard registry.count > 0 else { return }
        logger.warning("drain_timeout: closing \(registry.count) sessions with 421 4.3.2")
        registry.closeAll(with: Replies.shuttingDown)
        let grace = NIODeadline.now() + Self.closeGrace
        while registry.count > 0, NIODeadline.now() < grace {
            try? await Task.sleep(nanoseconds: 50_000_000)
        }
    }

    /// STATUS= every few seconds, and the watchdog at half of WatchdogSec.
    /// With the policy service, also sweeps its reservations as often as STATUS= goes out.
    /// `storeStatus`: the quota store's part of STATUS= (a PostgreSQL store: up or down, and why).
    static func housekeeping(runtime: Runtime, policy: PolicyService?, storeStatus: @escaping @Sendable () -> String = { "" }) async {
        let watchdog = Systemd.watchdogInterval()
        let statusEvery: UInt64 = 5_000_000_000
        let tick: UInt64 = watchdog.map { min(statusEvery, $0 * 1000 / 2) } ?? statusEvery
        var sinceStatus: UInt64 = 0
        var sinceMetrics: UInt64 = 0
        var lastStatus = ""
        // A flush still running (a PostgreSQL store waits up to state_timeout when the database
        // is down): the next one waits its turn, and the watchdog and STATUS= never wait.
        let flushing = Mutex(false)
        while !Task.isCancelled {
            if watchdog != nil { Systemd.notify("WATCHDOG=1") }
            if let policy, sinceStatus >= statusEvery || lastStatus.isEmpty {
                await policy.sweep(logger: runtime.logger)
            }
            if sinceStatus >= statusEvery || lastStatus.isEmpty {
                // Statistics reach the store every few seconds, not once per message.
                let start = flushing.withLock { busy -> Bool in
                    guard !busy else { return false }
                    busy = true
                    return true
                }
                if start {
                    Task {
                        await runtime.flushStats()
                        flushing.withLock { $0 = false }
                    }
                }
                sinceMetrics += sinceStatus
                if runtime.metrics != nil, sinceMetrics >= MetricsFile.interval * 1_000_000_000 || lastStatus.isEmpty {
                    // File I/O: never on an event loop (the global executor runs on them).
                    _ = try? await Offload.run { runtime.writeMetrics() }
                    sinceMetrics = 0
                }
                let status = "\(runtime.snapshot.status) \(storeStatus())"
                if status != lastStatus { Systemd.status(status) }
                lastStatus = status
                sinceStatus = 0
            }
            do {
                try await Task.sleep(nanoseconds: tick)
            } catch {
                return
            }
            sinceStatus += tick
        }
    }

    static func reload(_ options: DaemonOptions, runtime: Runtime, logger: Logger) {
        Systemd.notify("RELOADING=1\nSTATUS=reloading \(options.configPath)")
        switch ConfigurationLoader.load(options.configPath) {
        case .success(let configuration):
            let old = runtime.ruleset.configuration
            if configuration.listen != old.listen || configuration.policyListen != old.policyListen || configuration.statePath != old.statePath
                || configuration.statePostgres != old.statePostgres || configuration.scope != old.scope
                || configuration.unixSocketMode != old.unixSocketMode || configuration.unixSocketGroup != old.unixSocketGroup
            {
                logger.notice("reload: listen, policy_listen, unix_socket_*, state and scope changes take effect only at restart")
            }
            if !configuration.peerCheck, old.peerCheck {
                logger.warning("reload: peer_check is now off: any local user who can connect can claim any uid")
            }
            runtime.replace(Ruleset(configuration, localDomains: PostfixDomains.read(for: configuration, logger: logger)))
            runtime.userNames.forget()
            runtime.userGroups.forget()
            logger.info("reloaded \(options.configPath): \(configuration.rules.count) rules")
            Systemd.notify("READY=1\nSTATUS=reloaded; \(runtime.snapshot.status)")
        case .failure(let errors):
            for e in errors.errors { logger.error("reload failed: \(e)") }
            logger.error("reload failed: keeping the rules in force (\(errors.errors.count) errors)")
            Systemd.notify("READY=1\nSTATUS=reload failed (\(errors.errors.count) errors), old rules kept; \(runtime.snapshot.status)")
        }
    }
}

public enum Version {
    public static let string = "0.1.0"
}
