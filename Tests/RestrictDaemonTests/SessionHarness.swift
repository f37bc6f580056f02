// In-process harness for the session tests: the daemon's real listener and ConnectionHandler on
// 127.0.0.1:0, a scripted relay that records every byte it receives, a scripted client that
// writes exact bytes, and a log handler that records every line. Every wait has a deadline.

import Logging
import NIOCore
import NIOPosix
import RestrictPolicy
import SMTPCore
import Testing

@testable import RestrictDaemon

struct HarnessTimeout: Error, CustomStringConvertible {
    let what: String
    var description: String { "timed out waiting for \(self.what)" }
}

struct HarnessError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Polls `condition` every 10 ms until it holds or `seconds` pass.
func eventually(_ what: String, within seconds: Double = 10, _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while !condition() {
        guard ContinuousClock.now < deadline else { throw HarnessTimeout(what: what) }
        try await Task.sleep(for: .milliseconds(10))
    }
}

extension Array where Element == UInt8 {
    init(_ string: String) { self = Array(string.utf8) }

    func contains(_ needle: [UInt8]) -> Bool { self.firstRange(of: needle) != nil }

    func count(of needle: [UInt8]) -> Int {
        var n = 0
        var rest = self[...]
        while let r = rest.firstRange(of: needle) {
            n += 1
            rest = rest[r.upperBound...]
        }
        return n
    }

    var text: String { String(decoding: self, as: UTF8.self) }
}

// MARK: - Bytes received by one end

/// What one socket received, and whether its peer closed it.
final class Inbox: Sendable {
    private struct State {
        var bytes: [UInt8] = []
        var closed = false
    }
    private let state = Mutex(State())

    func append(_ buffer: ByteBuffer) { self.state.withLock { $0.bytes += buffer.readableBytesView } }
    func markClosed() { self.state.withLock { $0.closed = true } }
    var bytes: [UInt8] { self.state.withLock { $0.bytes } }
    var isClosed: Bool { self.state.withLock { $0.closed } }
}

final class CollectingHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let inbox: Inbox
    init(_ inbox: Inbox) { self.inbox = inbox }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.inbox.append(Self.unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.inbox.markClosed()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

// MARK: - Scripted client

/// One reply as the client saw it, lines in full ("250-PIPELINING").
struct Reply: CustomStringConvertible {
    let code: Int
    let lines: [String]

    /// The enhanced status code of the first line ("5.7.1"), or "".
    var enhanced: String {
        let text = self.lines[0].dropFirst(4)
        return String(text.split(separator: " ", maxSplits: 1).first ?? "")
    }

    /// The first line without its code.
    var text: String { String(self.lines[0].dropFirst(4)) }

    /// EHLO keywords (every line after the first, without its code).
    var keywords: [String] { self.lines.dropFirst().map { String($0.dropFirst(4)) } }

    var description: String { self.lines.joined(separator: " | ") }

    /// A complete reply at the start of `bytes`, and how many bytes it took.
    static func parse(_ bytes: ArraySlice<UInt8>) -> (Reply, Int)? {
        var lines: [String] = []
        var i = bytes.startIndex
        while let lf = bytes[i...].firstIndex(of: 10) {
            var end = lf
            if end > i, bytes[end - 1] == 13 { end -= 1 }
            let line = String(decoding: bytes[i..<end], as: UTF8.self)
            lines.append(line)
            i = lf + 1
            let u = Array(line.utf8)
            if u.count < 4 || u[3] != UInt8(ascii: "-") {
                return (Reply(code: Int(line.prefix(3)) ?? 0, lines: lines), i - bytes.startIndex)
            }
        }
        return nil
    }
}

final class TestClient: Sendable {
    let channel: any Channel
    let inbox: Inbox
    private let cursor = Mutex(0)

    private init(channel: any Channel, inbox: Inbox) {
        self.channel = channel
        self.inbox = inbox
    }

    static func connect(port: Int) async throws -> TestClient {
        let inbox = Inbox()
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connectTimeout(.seconds(5))
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(CollectingHandler(inbox)) }
            }
            .connect(host: "127.0.0.1", port: port).get()
        return TestClient(channel: channel, inbox: inbox)
    }

    func send(_ text: String) async throws { try await self.send(bytes: Array(text.utf8)) }

    func send(bytes: [UInt8]) async throws {
        try await self.channel.writeAndFlush(ByteBuffer(bytes: bytes)).get()
    }

    /// The next reply, waiting at most `seconds`.
    func reply(within seconds: Double = 10) async throws -> Reply {
        var found: Reply? = nil
        try await eventually("a reply (have \(self.unread.text.debugDescription))", within: seconds) {
            let bytes = self.inbox.bytes
            return self.cursor.withLock { at in
                guard let (reply, used) = Reply.parse(bytes[at...]) else { return false }
                at += used
                found = reply
                return true
            }
        }
        guard let found else { throw HarnessError("no reply") }
        return found
    }

    func replies(_ n: Int, within seconds: Double = 10) async throws -> [Reply] {
        var out: [Reply] = []
        for _ in 0..<n { out.append(try await self.reply(within: seconds)) }
        return out
    }

    /// Sends `text` and returns the one reply to it.
    func command(_ text: String) async throws -> Reply {
        try await self.send(text + "\r\n")
        return try await self.reply()
    }

    /// Bytes received and not yet read as replies.
    var unread: [UInt8] {
        let bytes = self.inbox.bytes
        return self.cursor.withLock { Array(bytes[min($0, bytes.count)...]) }
    }

    /// The next reply is `code` with `enhanced`, and then the daemon closes the connection.
    func expectFinalReply(_ code: Int, _ enhanced: String, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let reply = try await self.reply()
        #expect(reply.code == code, sourceLocation: sourceLocation)
        #expect(reply.enhanced == enhanced, sourceLocation: sourceLocation)
        try await self.waitClosed()
    }

    func waitClosed(within seconds: Double = 10) async throws {
        try await eventually("the daemon to close the client connection", within: seconds) { self.inbox.isClosed }
    }

    func close() async {
        try? await self.channel.close()
    }
}

// MARK: - Scripted relay

enum RelayAction: Sendable {
    /// Reply lines, each sent with CRLF.
    case reply([String])
    /// Close the connection instead of replying.
    case close
    /// Say nothing.
    case silent
    /// Reply lines after a delay in milliseconds (the connection reads on meanwhile).
    case delayed(Int64, [String])

    static func reply(_ line: String) -> RelayAction { .reply([line]) }
}

struct RelayScript: Sendable {
    var greeting: RelayAction = .reply("220 relay.test ESMTP Postfix")
    var ehlo: RelayAction = .reply([
        "250-relay.test", "250-PIPELINING", "250-SIZE 10240000", "250-VRFY", "250-ETRN", "250-STARTTLS",
        "250-AUTH PLAIN LOGIN", "250-XCLIENT NAME ADDR", "250-XFORWARD NAME ADDR PROTO HELO",
        "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-DSN", "250-SMTPUTF8", "250 CHUNKING",
    ])
    /// A reply for a command line, or nil for the default.
    var command: @Sendable (String) -> RelayAction? = { _ in nil }
    /// The reply to the end of data of the Nth message (0-based) on a connection.
    var endOfData: @Sendable (Int) -> RelayAction = { n in .reply("250 2.0.0 Ok: queued as 4RELAY\(n)") }
    /// Close the connection once this many bytes of message data have arrived.
    var closeInDataAfter: Int? = nil
}

/// Everything one relay connection received.
struct RelayConnection: Sendable {
    var bytes: [UInt8] = []
    var commands: [String] = []
    /// Each complete message's data, up to and including the CRLF before the final ".".
    var messages: [[UInt8]] = []
    /// How many times "." CRLF ended a message.
    var endsOfData = 0
    var closed = false
}

final class RelayLog: Sendable {
    private let state = Mutex<[RelayConnection]>([])

    func open() -> Int {
        self.state.withLock {
            $0.append(RelayConnection())
            return $0.count - 1
        }
    }

    func update(_ index: Int, _ body: (inout RelayConnection) -> Void) { self.state.withLock { body(&$0[index]) } }

    var connections: [RelayConnection] { self.state.withLock { $0 } }

    /// The only connection; fails the test when there is not exactly one.
    var connection: RelayConnection {
        let all = self.connections
        #expect(all.count == 1, "relay connections: \(all.count)")
        return all.first ?? RelayConnection()
    }
}

final class RelayHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let script: RelayScript
    let log: RelayLog
    let index: Int
    private var pending: [UInt8] = []
    private var inData = false
    private var dataBytes = 0
    private var messageCount = 0

    init(script: RelayScript, log: RelayLog) {
        self.script = script
        self.log = log
        self.index = log.open()
    }

    func channelActive(context: ChannelHandlerContext) {
        self.perform(self.script.greeting, context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.log.update(self.index) { $0.closed = true }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = Array(Self.unwrapInboundIn(data).readableBytesView)
        self.log.update(self.index) { $0.bytes += bytes }
        self.pending += bytes
        self.process(context: context)
    }

    private func process(context: ChannelHandlerContext) {
        while context.channel.isActive {
            if self.inData {
                let terminator: [UInt8] = [13, 10, 46, 13, 10]
                let end: Range<Int>?
                if self.pending.starts(with: [46, 13, 10]) {
                    end = 0..<3
                } else if let r = self.pending.firstRange(of: terminator) {
                    end = r
                } else {
                    end = nil
                }
                guard let end else {
                    if let limit = self.script.closeInDataAfter, self.dataBytes + self.pending.count >= limit {
                        context.close(promise: nil)
                    }
                    return
                }
                let bodyEnd = end.lowerBound == 0 ? 0 : end.lowerBound + 2
                let message = Array(self.pending[0..<bodyEnd])
                self.pending.removeFirst(end.upperBound)
                self.inData = false
                self.dataBytes = 0
                let n = self.messageCount
                self.messageCount += 1
                self.log.update(self.index) {
                    $0.messages.append(message)
                    $0.endsOfData += 1
                }
                self.perform(self.script.endOfData(n), context: context)
                continue
            }
            guard let lf = self.pending.firstIndex(of: 10) else { return }
            var end = lf
            if end > 0, self.pending[end - 1] == 13 { end -= 1 }
            let line = String(decoding: self.pending[0..<end], as: UTF8.self)
            self.pending.removeFirst(lf + 1)
            self.log.update(self.index) { $0.commands.append(line) }
            let action = self.script.command(line) ?? self.defaultAction(line)
            switch action {
            case .reply(let lines), .delayed(_, let lines):
                if lines.last?.hasPrefix("354") == true { self.inData = true }
            case .close, .silent:
                break
            }
            self.perform(action, context: context)
            if line.uppercased() == "QUIT", case .reply = action { context.close(promise: nil) }
        }
    }

    private func defaultAction(_ line: String) -> RelayAction {
        let verb = line.split(separator: " ", maxSplits: 1).first.map { $0.uppercased() } ?? ""
        switch verb {
        case "EHLO": return self.script.ehlo
        case "HELO": return .reply("250 relay.test")
        case "MAIL": return .reply("250 2.1.0 Ok")
        case "RCPT": return .reply("250 2.1.5 Ok")
        case "DATA": return .reply("354 End data with <CR><LF>.<CR><LF>")
        case "RSET", "NOOP": return .reply("250 2.0.0 Ok")
        case "QUIT": return .reply("221 2.0.0 Bye")
        default: return .reply("502 5.5.2 Error: command not recognized")
        }
    }

    private func perform(_ action: RelayAction, context: ChannelHandlerContext) {
        switch action {
        case .reply(let lines):
            var out = context.channel.allocator.buffer(capacity: 64)
            for line in lines {
                out.writeString(line)
                out.writeStaticString("\r\n")
            }
            context.writeAndFlush(Self.wrapOutboundOut(out), promise: nil)
        case .close:
            context.close(promise: nil)
        case .silent:
            break
        case .delayed(let ms, let lines):
            var out = context.channel.allocator.buffer(capacity: 64)
            for line in lines {
                out.writeString(line)
                out.writeStaticString("\r\n")
            }
            let channel = context.channel
            context.eventLoop.scheduleTask(in: .milliseconds(ms)) { [out] in
                channel.writeAndFlush(out, promise: nil)
            }
        }
    }
}

final class ScriptedRelay: Sendable {
    let server: any Channel
    let log: RelayLog
    /// Accepted connections, filled by the child initializer, closed by `stop`.
    private let children: Mutex<[any Channel]>

    var port: Int { self.server.localAddress?.port ?? 0 }

    private init(server: any Channel, log: RelayLog, children: Mutex<[any Channel]>) {
        self.server = server
        self.log = log
        self.children = children
    }

    static func start(_ script: RelayScript) async throws -> ScriptedRelay {
        let log = RelayLog()
        let children = Mutex<[any Channel]>([])
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                children.withLock { $0.append(ch) }
                return ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(RelayHandler(script: script, log: log))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return ScriptedRelay(server: server, log: log, children: children)
    }

    func stop() async {
        try? await self.server.close()
        for child in self.children.withLock({ $0 }) { try? await child.close() }
    }
}

// MARK: - Logs

final class LogRecorder: Sendable {
    struct Entry: Sendable {
        let level: Logger.Level
        let message: String
        let metadata: Logger.Metadata
    }
    private let entries = Mutex<[Entry]>([])

    func append(_ entry: Entry) { self.entries.withLock { $0.append(entry) } }

    var all: [Entry] { self.entries.withLock { $0 } }

    /// The decision lines (one per message).
    var decisions: [Entry] { self.all.filter { $0.message.contains(" verdict=") } }
}

struct RecordingLogHandler: LogHandler {
    let recorder: LogRecorder
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        self.recorder.append(.init(
            level: event.level, message: event.message.description,
            metadata: self.metadata.merging(event.metadata ?? [:]) { $1 }))
    }
}

// MARK: - Quota store

/// An in-memory quota store with the real arithmetic, or one that always fails.
actor FakeQuotaStore: QuotaStore {
    struct Failure: Error {}
    let failing: Bool
    private var counted: [UInt32: Set<String>] = [:]
    private(set) var requests: [QuotaRequest] = []

    init(failing: Bool = false) { self.failing = failing }

    func admit(_ request: QuotaRequest) async throws -> QuotaOutcome {
        self.requests.append(request)
        if self.failing { throw Failure() }
        // Volume caps: the messages counted so far, whatever their time (tests run within a window).
        let sent = self.sent[request.uid] ?? []
        let volume: [VolumeCap.Kind: Int] = [.messages: sent.count, .recipients: sent.reduce(0, +)]
        let (outcome, record, recordMessage) = QuotaArithmetic.decide(request, counted: self.counted[request.uid] ?? [], volume: volume)
        self.counted[request.uid, default: []].formUnion(record)
        if recordMessage { self.sent[request.uid, default: []].append(request.recipients) }
        return outcome
    }

    /// uid -> the recipients of each message counted for its volume caps.
    private var sent: [UInt32: [Int]] = [:]
}

// MARK: - The daemon under test

struct Harness: Sendable {
    let port: Int
    let relay: ScriptedRelay
    let runtime: Runtime
    let logs: LogRecorder
    private let clients: Mutex<[TestClient]>

    init(port: Int, relay: ScriptedRelay, runtime: Runtime, logs: LogRecorder) {
        self.port = port
        self.relay = relay
        self.runtime = runtime
        self.logs = logs
        self.clients = Mutex([])
    }

    /// A connected client, closed when the test ends.
    func client() async throws -> TestClient {
        let client = try await TestClient.connect(port: self.port)
        self.clients.withLock { $0.append(client) }
        return client
    }

    /// A connected client that has read the greeting (and checked it is the relay's 220).
    func greeted() async throws -> TestClient {
        let client = try await self.client()
        let greeting = try await client.reply()
        #expect(greeting.code == 220, "greeting: \(greeting)")
        return client
    }

    /// A client after the greeting and EHLO.
    func ready() async throws -> TestClient {
        let client = try await self.greeted()
        let ehlo = try await client.command("EHLO client.test")
        #expect(ehlo.code == 250, "EHLO: \(ehlo)")
        return client
    }

    func closeClients() async {
        for client in self.clients.withLock({ $0 }) { await client.close() }
    }
}

/// A configuration from restrictpd.conf text; the relay port is set by `withDaemon`.
func configuration(_ text: String) throws -> Configuration {
    let users = UserResolver { name in name == "root" ? 0 : name == "nobody" ? 65534 : nil }
    switch ConfigParser.parse(text, file: "test.conf", users: users) {
    case .success(let c): return c
    case .failure(let errors): throw errors
    }
}

let rootAllowsAll = """
    user root
        allow *
    unknown
        refuse
    """

/// Runs `body` against a daemon listening on 127.0.0.1:0 that relays to a scripted relay.
/// peer_check is off unless `configure` turns it on.
func withDaemon(
    _ config: String = rootAllowsAll,
    relay script: RelayScript = RelayScript(),
    relayPort: Int? = nil,
    store: any QuotaStore = FakeQuotaStore(),
    configure: (inout Configuration) -> Void = { _ in },
    _ body: (Harness) async throws -> Void
) async throws {
    let relay = try await ScriptedRelay.start(script)
    var configuration = try configuration(config)
    configuration.relayHost = "127.0.0.1"
    configuration.relayPort = relayPort ?? relay.port
    configuration.peerCheck = false
    configure(&configuration)

    let recorder = LogRecorder()
    let logger = Logger(label: "restrictpd.test") { _ in RecordingLogHandler(recorder: recorder) }
    let runtime = Runtime(ruleset: Ruleset(configuration), store: store, logger: logger)
    let group = MultiThreadedEventLoopGroup.singleton
    let listener = try await ListenerFactory.bind(.tcp(host: "127.0.0.1", port: 0), group: group, mode: 0o660, group: nil)
    guard let port = listener.channel.localAddress?.port else { throw HarnessError("listener has no port") }
    let handler = ConnectionHandler(runtime: runtime, registry: SessionRegistry(), group: group)
    let harness = Harness(port: port, relay: relay, runtime: runtime, logs: recorder)

    try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { await handler.run(listener) }
        let outcome: Result<Void, any Error>
        do {
            try await body(harness)
            outcome = .success(())
        } catch {
            outcome = .failure(error)
        }
        await harness.closeClients()
        await relay.stop()
        try? await listener.channel.close()
        tasks.cancelAll()
        try? await tasks.waitForAll()
        try outcome.get()
    }
}

// MARK: - Message text

/// Postfix pickup's first header for `uid`, as pickup(8) writes it.
func pickupHeader(uid: UInt32 = 0, queueID: String = "62F36F78196") -> String {
    "Received: by lab.localdomain (Postfix, from userid \(uid))\r\n\tid \(queueID); Fri, 27 Nov 2026 09:13:28 +0000 (UTC)\r\n"
}

/// A small message with pickup's header, ready to send after 354 (ends with the end of data).
func message(uid: UInt32? = 0, queueID: String = "62F36F78196", body: String = "Hello.\r\n") -> String {
    (uid.map { pickupHeader(uid: $0, queueID: queueID) } ?? "")
        + "From: Root <root@lab.localdomain>\r\nSubject: test\r\n\r\n" + body + ".\r\n"
}
