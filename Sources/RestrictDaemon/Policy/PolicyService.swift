// The SMTP door (design decision 11): restrictpd as Postfix's access policy service. Local
// processes that send mail over SMTP (PHPMailer, a CMS's "SMTP" setting) reach Postfix's
// smtpd on loopback, where permit_mynetworks would relay for them unjudged. smtpd asks this
// service at RCPT and at END-OF-MESSAGE (check_policy_service before permit_mynetworks); the
// service learns the UID that owns the client's socket from the kernel, by the 4-tuple the
// request carries, and judges each recipient with that UID's rule: the same rules, quota
// store and log line as the content filter.
//
// Trusts: only peers in `clients` (Postfix) may connect, as on the content filter's port. The
// request's attributes are Postfix's word about the SMTP client; the client's UID is the
// kernel's. Never fails open: a local client whose UID cannot be learned, a malformed request,
// or a store that cannot answer gets DEFER, never DUNNO. A client that is not on this host is
// not ours to judge: DUNNO.

import Dispatch
import Logging
import NIOCore
import RestrictPolicy
import SMTPCore

#if canImport(Glibc)
import Glibc
#endif

/// The addresses of this host's interfaces, read with getifaddrs(3). Re-read when an address
/// is asked about that is not among them, at most once a second, so a new address counts as
/// local within a second and a flood of remote clients costs one read a second.
final class LocalAddresses: Sendable {
    private let state = Mutex<(addresses: Set<HostAddress>, read: NIODeadline?, failed: Bool)>(([], nil, false))
    private let reader: @Sendable () -> Set<HostAddress>?
    static let rereadAfter: TimeAmount = .seconds(1)

    /// `reader` lists the interfaces' addresses, nil when they cannot be read (tests give
    /// their own).
    init(reader: @escaping @Sendable () -> Set<HostAddress>? = LocalAddresses.read) {
        self.reader = reader
    }

    /// True when `address` is this host's; nil when this host's addresses cannot be read
    /// (then nobody can tell, and the caller must not wave the client through).
    func contains(_ address: HostAddress, now: NIODeadline = .now()) -> Bool? {
        let (known, read, failed) = self.state.withLock { ($0.addresses, $0.read, $0.failed) }
        if address.isLocal(among: known) { return true }
        if let read, now - read < Self.rereadAfter { return failed ? nil : false }
        let fresh = self.reader()
        self.state.withLock { $0 = (fresh ?? [], now, fresh == nil) }
        guard let fresh else { return nil }
        return address.isLocal(among: fresh)
    }

    static func read() -> Set<HostAddress>? {
        var list: UnsafeMutablePointer<ifaddrs>? = nil
        guard getifaddrs(&list) == 0 else { return nil }
        defer { freeifaddrs(list) }
        var result = Set<HostAddress>()
        var next = list
        while let entry = next {
            defer { next = entry.pointee.ifa_next }
            guard let sa = entry.pointee.ifa_addr else { continue }
            switch Int32(sa.pointee.sa_family) {
            case AF_INET:
                let bytes = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { p in
                    var a = p.pointee.sin_addr
                    return withUnsafeBytes(of: &a) { Array($0) }
                }
                if let h = HostAddress(bytes: bytes) { result.insert(h) }
            case AF_INET6:
                let bytes = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { p in
                    var a = p.pointee.sin6_addr
                    return withUnsafeBytes(of: &a) { Array($0) }
                }
                if let h = HostAddress(bytes: bytes) { result.insert(h) }
            default:
                continue
            }
        }
        return result
    }
}

/// Judges policy requests. One per daemon; every connection shares it.
struct PolicyService: Sendable {
    let runtime: Runtime
    let local: LocalAddresses
    let gate = UIDGate()
    /// A reservation is tried again this often when another of the same uid came in between.
    static let reserveAttempts = 8

    init(runtime: Runtime, local: LocalAddresses = LocalAddresses()) {
        self.runtime = runtime
        self.local = local
    }

    /// The answer to one request; logs each recipient's verdict.
    func answer(_ request: PolicyRequest, logger: Logger) async -> PolicyAction {
        switch self.localClient(request, logger: logger) {
        case .failure(let early):
            guard let remote = early.remote else { return early.action }
            return await self.remoteUnlessTheKernelKnowsIt(request, stage: remote.stage, client: remote.client, logger: logger)
        case .success(let (stage, client)): return await self.judge(request, stage: stage, client: client, logger: logger)
        }
    }

    /// An answer given before the client's UID is asked for; `remote` when the answer is DUNNO
    /// because the client's address is not among this host's.
    struct Early: Error {
        let action: PolicyAction
        var remote: (stage: String, client: HostAddress)? = nil
    }

    /// The interfaces' addresses are read at most once a second, so an address the host
    /// gained since (an IPv6 temporary address, a new DHCP lease) looks remote for up to a
    /// second. The kernel has the last word: if it holds the client's end of the connection,
    /// the client is on this host and is judged; otherwise DUNNO, as for any remote client.
    private func remoteUnlessTheKernelKnowsIt(
        _ request: PolicyRequest, stage: String, client: HostAddress, logger: Logger
    ) async -> PolicyAction {
        guard let c = Self.connection(request, client: client),
            (try? await PeerCredentials.uid(
                client: c.clientAddress, clientPort: c.clientPort, server: c.serverAddress, serverPort: c.serverPort)) != nil
        else {
            logger.debug("policy: client \(client) is not on this host: DUNNO")
            return .dunno
        }
        logger.notice("policy: client \(client) is on this host, though not among the interface addresses last read: judged")
        return await self.judge(request, stage: stage, client: client, logger: logger)
    }

    /// The request's stage and client when the request is one to judge: a well-formed
    /// smtpd_access_policy request, at RCPT or END-OF-MESSAGE, from a client on this host.
    private func localClient(_ request: PolicyRequest, logger: Logger) -> Result<(String, HostAddress), Early> {
        guard request["request"] == "smtpd_access_policy" else {
            logger.warning("policy request refused: not an smtpd_access_policy request (request=\(LogText.escape(request["request"] ?? "", limit: 64)))")
            return .failure(Early(action: Replies.policyMalformed))
        }
        // Postfix always names the stage; a request without one cannot be placed, so it must
        // not pass as "another stage's business".
        guard let stage = request["protocol_state"], !stage.isEmpty else {
            logger.warning("policy request refused: no protocol_state attribute")
            return .failure(Early(action: Replies.policyMalformed))
        }
        guard stage == "RCPT" || stage == "END-OF-MESSAGE" else { return .failure(Early(action: .dunno)) }
        guard let clientText = request["client_address"], let client = HostAddress(clientText) else {
            logger.warning("policy request deferred: client_address \"\(LogText.escape(request["client_address"] ?? "", limit: 64))\" is not an IP address")
            return .failure(Early(action: Replies.policyUnidentified))
        }
        switch self.local.contains(client) {
        case nil:
            logger.error("policy request deferred: cannot read this host's addresses to tell whether \(client) is local")
            return .failure(Early(action: Replies.policyUnidentified))
        case false?:
            return .failure(Early(action: .dunno, remote: (stage, client)))
        case true?:
            return .success((stage, client))
        }
    }

    /// A local client's request: its UID from the kernel, then the recipient or the end of
    /// the message.
    private func judge(_ request: PolicyRequest, stage: String, client: HostAddress, logger: Logger) async -> PolicyAction {
        let ruleset = self.runtime.ruleset
        let sasl = request["sasl_username"] ?? ""
        guard let connection = Self.connection(request, client: client) else {
            logger.warning("policy request deferred: client_port, server_address or server_port missing or malformed")
            return Replies.policyUnidentified
        }
        var record = DecisionRecord(
            queueID: request["queue_id"].flatMap { $0.isEmpty ? nil : $0 }, uid: nil, user: nil,
            from: request["sender"] ?? "", to: [request["recipient"] ?? ""], verdict: .relay, reason: "",
            quota: nil, relayReply: nil, door: .smtp, client: connection.description, sasl: sasl.isEmpty ? nil : sasl)

        let uid: UInt32?
        do {
            uid = try await PeerCredentials.uid(
                client: connection.clientAddress, clientPort: connection.clientPort,
                server: connection.serverAddress, serverPort: connection.serverPort)
        } catch {
            uid = nil
            if sasl.isEmpty || ruleset.configuration.smtpAuthenticated == .judge {
                record.verdict = .defer
                record.reason = "cannot learn the client's uid: \(error)"
                self.log(record, level: .error, logger: logger)
                return Replies.policyUnidentified
            }
        }
        if let uid { record.uid = uid; record.user = await self.runtime.userNames.name(uid) }
        if !sasl.isEmpty, ruleset.configuration.smtpAuthenticated == .trust {
            // A mailbox user's mail (webmail sends as www-data for everyone): Postfix decides.
            if stage == "RCPT" {
                record.reason = "SASL-authenticated session trusted (smtp_authenticated trust)"
                self.log(record, level: .info, logger: logger)
            }
            return .dunno
        }
        guard let uid else { return Replies.policyUnidentified }
        let sender = Sender.user(uid: uid, name: record.user)
        guard let instance = request["instance"], !instance.isEmpty else {
            logger.warning("policy request deferred: no instance attribute")
            return Replies.policyMalformed
        }
        if stage == "RCPT" {
            return await self.recipient(request, sender: sender, instance: instance, connection: connection, ruleset: ruleset, record: record, logger: logger)
        }
        return await self.endOfMessage(sender: sender, instance: instance, record: record, logger: logger)
    }

    /// RCPT: the recipient against the uid's rule; quota is reserved, not spent.
    private func recipient(
        _ request: PolicyRequest, sender: Sender, instance: String, connection: Reservations.Connection,
        ruleset: Ruleset, record: DecisionRecord, logger: Logger
    ) async -> PolicyAction {
        var record = record
        guard let recipient = request["recipient"], !recipient.isEmpty, let uid = sender.uid else {
            logger.warning("policy request deferred: RCPT without a recipient")
            return Replies.policyMalformed
        }
        if let frozen = await self.frozen(sender, ruleset: ruleset, record: record, logger: logger) { return frozen }
        let policy = ruleset.policy
        let groups = policy.needsGroups ? await self.runtime.userGroups.groups(uid) : []
        let rule = policy.rule(for: sender, groups: groups)
        let overQuota = rule?.overQuota ?? ruleset.configuration.overQuota
        let now = self.runtime.clock()
        let opening = Opening(instance: instance, uid: uid, connection: connection, rule: rule, overQuota: overQuota, now: now)
        self.open(opening, logger: logger)
        let evaluation = policy.evaluate(sender: sender, recipients: [recipient], groups: groups)
        switch evaluation {
        case .allowed:
            self.runtime.reservations.withLock { $0.allow(instance: instance, recipient: recipient) }
            record.reason = "allowed"
            self.log(record, level: .info, logger: logger)
            return .dunno
        case .refused:
            return self.strike(evaluation, outcome: nil, sender: sender, ruleset: ruleset, groups: groups, record: record, logger: logger)
        case .needsQuota(let addresses, _, _, _, let caps, let budget):
            self.runtime.reservations.withLock { $0.setCaps(instance: instance, caps: caps, budget: budget) }
            let reservation = Reservation(
                opening: opening, sender: sender, recipient: recipient, key: addresses.first, evaluation: evaluation, groups: groups)
            return await self.reserve(reservation, record: record, logger: logger)
        }
    }

    /// A refusal at RCPT that counts towards freezing (each refused recipient counts).
    private func strike(
        _ evaluation: Evaluation, outcome: Result<QuotaOutcome, any Error>?, sender: Sender, ruleset: Ruleset,
        groups: [UInt32], record: DecisionRecord, logger: Logger
    ) -> PolicyAction {
        let verdict = Policy.verdict(evaluation, sender: sender, outcome: outcome)
        self.runtime.strike(sender, evaluation: evaluation, verdict: verdict, ruleset: ruleset, groups: groups, queueID: nil)
        return self.refuse(verdict, record: record, atEnd: false, logger: logger)
    }

    /// A frozen sender's answer at RCPT (HOLD, or DEFER_IF_PERMIT with `frozen defer`); nil
    /// when it is not frozen.
    private func frozen(_ sender: Sender, ruleset: Ruleset, record: DecisionRecord, logger: Logger) async -> PolicyAction? {
        do {
            guard let state = try await self.runtime.frozenState(sender, ruleset: ruleset) else { return nil }
            let verdict = Policy.frozenVerdict(state, sender: sender, action: ruleset.configuration.frozenAction)
            return self.refuse(verdict, record: record, atEnd: false, logger: logger)
        } catch {
            let verdict = Verdict(kind: .defer, reply: Replies.storeUnavailable, reason: "quota store error: \(error)", quota: nil)
            return self.refuse(verdict, record: record, atEnd: false, logger: logger)
        }
    }

    /// A transaction as the RCPT that opens or refreshes it sees it.
    struct Opening {
        let instance: String
        let uid: UInt32
        let connection: Reservations.Connection
        let rule: Rule?
        let overQuota: OverQuota
        let now: Int64
    }

    /// One recipient that needs the store: an address outside the allow list (`key`), or an
    /// allowed one that counts against the rule's volume caps (`key` nil).
    struct Reservation {
        let opening: Opening
        let sender: Sender
        let recipient: String
        let key: String?
        let evaluation: Evaluation
        /// The sender's groups, for `group` rules.
        let groups: [UInt32]
    }

    /// Asks the store whether the recipient fits (the arbitrary quota and the caps, with what
    /// the uid's open transactions hold), then holds it for the transaction. Nothing is spent.
    private func reserve(_ r: Reservation, record: DecisionRecord, logger: Logger) async -> PolicyAction {
        let (uid, instance) = (r.opening.uid, r.opening.instance)
        // One reservation of a uid at a time: concurrent ones would each read the store before
        // the other's reservation and have to ask again, and again.
        await self.gate.enter(uid)
        defer { self.gate.leave(uid) }
        var sweptDead = false
        for _ in 0..<Self.reserveAttempts {
            self.open(r.opening, logger: logger)
            let (version, held, volume, mine, accepted) = self.runtime.reservations.withLock { res in
                let t = res.transaction(instance)
                let mine = r.key.map { t?.addresses.contains($0) ?? false } ?? false
                return (res.version(uid), res.held(uid: uid), res.heldVolume(uid: uid, excluding: instance), mine, t?.accepted ?? 0)
            }
            if mine { return .dunno }
            guard let request = Policy.quotaRequest(
                r.evaluation, sender: r.sender, now: r.opening.now, held: held, record: false,
                recipients: accepted + 1, heldVolume: volume)
            else { return .dunno }
            let outcome: QuotaOutcome
            do {
                outcome = try await self.runtime.store.admit(request)
            } catch {
                return self.refuse(Policy.verdict(r.evaluation, sender: r.sender, outcome: .failure(error)), record: record, atEnd: false, logger: logger)
            }
            let verdict = Policy.verdict(r.evaluation, sender: r.sender, outcome: .success(outcome))
            if !outcome.admitted {
                // Reservations of clients that are gone must not keep the quota: look once.
                if !held.isEmpty || volume.messages > 0, !sweptDead, await self.releaseDead(uid: uid, logger: logger) > 0 {
                    sweptDead = true
                    continue
                }
                self.runtime.strike(
                    r.sender, evaluation: r.evaluation, verdict: verdict, ruleset: self.runtime.ruleset, groups: r.groups, queueID: nil)
                return self.refuse(verdict, record: record, atEnd: false, logger: logger)
            }
            let reserved = self.runtime.reservations.withLock { res in
                guard let key = r.key else { return res.accept(instance: instance, recipient: r.recipient, ifVersion: version) }
                return res.reserve(instance: instance, address: key, written: r.recipient, ifVersion: version)
            }
            guard reserved else { continue }
            if r.key == nil {
                var record = record
                (record.reason, record.messages, record.recipients) = (verdict.reason, verdict.messages, verdict.recipients)
                self.log(record, level: .info, logger: logger)
            } else {
                logger.debug("policy: \(instance): reserved <\(LogText.escape(r.recipient))> for uid \(uid) (\(outcome.used)/\(outcome.limit) with those held)")
            }
            return .dunno
        }
        var record = record
        record.verdict = .defer
        record.reason = "<\(r.recipient)> quota reservation contended"
        self.log(record, level: .warning, logger: logger)
        return Replies.policyBusy
    }

    /// END-OF-MESSAGE: the transaction's reserved addresses and its volume are spent, in one
    /// store transaction; the store has the last word, so the two doors together never
    /// exceed a limit.
    private func endOfMessage(sender: Sender, instance: String, record: DecisionRecord, logger: Logger) async -> PolicyAction {
        var record = record
        guard let uid = sender.uid else { return Replies.policyUnidentified }
        guard let t = self.runtime.reservations.withLock({ $0.commit(instance: instance) }) else {
            // No transaction for a message whose RCPTs were judged here: it expired
            // (policy_reservation_timeout) or restrictpd restarted in between. Its reserved
            // quota was never spent, so the message must not pass: Postfix defers it and the
            // client tries again (a frozen sender's message was answered HOLD at RCPT).
            if let frozen = await self.frozen(sender, ruleset: self.runtime.ruleset, record: record, logger: logger) { return frozen }
            var record = record
            record.verdict = .defer
            record.reason = "END-OF-MESSAGE for a transaction restrictpd no longer holds"
            self.log(record, level: .warning, logger: logger)
            return Replies.policyUnknownTransaction
        }
        defer { self.runtime.reservations.withLock { _ = $0.finish(instance: instance) } }
        guard t.uid == uid else {
            logger.error("policy: \(instance): END-OF-MESSAGE from uid \(uid), but the transaction was opened by uid \(t.uid)")
            return Replies.policyUnidentified
        }
        let quota = t.addresses.isEmpty ? nil : t.quota
        guard quota != nil || (!t.caps.isEmpty && t.accepted > 0) else {
            // Statistics count the SMTP door's messages here, once each.
            if t.accepted > 0 { self.runtime.countStats(uid: uid, user: record.user, verdict: .relay) }
            return .dunno
        }
        let reserved = t.addresses.map { t.written[$0] ?? $0 }
        record.to = t.caps.isEmpty ? reserved : t.allowed + reserved
        let (held, volume) = self.runtime.reservations.withLock { ($0.held(uid: uid, excluding: instance), $0.heldVolume(uid: uid, excluding: instance)) }
        let evaluation = Evaluation.needsQuota(
            addresses: t.addresses, quota: quota, overQuota: t.overQuota, written: t.written, caps: t.caps, budget: t.budget)
        let outcome: Result<QuotaOutcome, any Error>
        do {
            outcome = .success(try await self.runtime.store.admit(
                QuotaRequest(
                    uid: uid, addresses: t.addresses, quota: quota, now: self.runtime.clock(), held: held,
                    caps: t.caps, recipients: t.accepted, heldVolume: volume, budget: t.budget)))
        } catch {
            outcome = .failure(error)
        }
        let verdict = Policy.verdict(evaluation, sender: sender, outcome: outcome)
        if case .success(let o) = outcome, let quota {
            let ruleset = self.runtime.ruleset
            let groups = ruleset.policy.needsGroups ? await self.runtime.userGroups.groups(uid) : []
            self.runtime.warnIfDue(sender, quota: quota, outcome: o, ruleset: ruleset, groups: groups)
        }
        guard verdict.kind == .relay else { return self.refuse(verdict, record: record, atEnd: true, logger: logger) }
        self.runtime.countStats(uid: uid, user: record.user, verdict: .relay, strangers: verdict.strangers)
        (record.reason, record.quota) = (verdict.reason, verdict.quota)
        (record.messages, record.recipients) = (verdict.messages, verdict.recipients)
        self.log(record, level: .info, logger: logger)
        return .dunno
    }

    /// A verdict other than relay, logged and answered. At RCPT a temporary refusal is
    /// DEFER_IF_PERMIT (a later restriction may still reject outright); at the end of the
    /// message there is nothing after it to wait for.
    private func refuse(_ verdict: Verdict, record: DecisionRecord, atEnd: Bool, logger: Logger) -> PolicyAction {
        var record = record
        record.verdict = verdict.kind
        record.reason = verdict.reason
        record.quota = verdict.quota
        (record.messages, record.recipients) = (verdict.messages, verdict.recipients)
        self.runtime.countStats(uid: record.uid, user: record.user, verdict: verdict.kind)
        self.log(record, level: verdict.reply == Replies.storeUnavailable ? .error : .warning, logger: logger)
        if verdict.reply == Replies.storeUnavailable { return Replies.policyStoreUnavailable }
        // Held: Postfix takes the message and parks it on its own hold queue.
        if verdict.kind == .hold { return Replies.policyHold(verdict.reply) }
        return atEnd ? Replies.policyActionAtEnd(verdict.reply) : Replies.policyAction(verdict.reply)
    }

    private func open(_ o: Opening, logger: Logger) {
        let ended = self.runtime.reservations.withLock {
            $0.open(instance: o.instance, uid: o.uid, connection: o.connection, quota: o.rule?.quota, overQuota: o.overQuota, now: o.now)
        }
        for t in ended where t.accepted > 0 {
            logger.debug("policy: \(t.instance): released \(t.addresses.count) reserved recipients (a new transaction on \(t.connection))")
        }
    }

    /// Releases the open transactions (of `uid`, or all) whose client connection no longer
    /// exists. Returns how many were released.
    @discardableResult
    func releaseDead(uid: UInt32? = nil, logger: Logger) async -> Int {
        let open = self.runtime.reservations.withLock { $0.open }.filter { uid == nil || $0.uid == uid }
        var released = 0
        for t in open {
            let c = t.connection
            do {
                _ = try await PeerCredentials.uid(client: c.clientAddress, clientPort: c.clientPort, server: c.serverAddress, serverPort: c.serverPort)
            } catch PeerLookupError.notFound {
                if self.runtime.reservations.withLock({ $0.finish(instance: t.instance) }) != nil {
                    released += 1
                    logger.debug("policy: \(t.instance): client \(c) is gone; released \(t.addresses.count) reserved recipients")
                }
            } catch {
                // Cannot tell: the reservation stays until its timeout.
            }
        }
        return released
    }

    /// Drops transactions past policy_reservation_timeout and those whose client is gone.
    func sweep(logger: Logger) async {
        let expired = self.runtime.reservations.withLock { $0.expire(now: self.runtime.clock()) }
        for t in expired where !t.addresses.isEmpty {
            logger.info("policy: \(t.instance): no END-OF-MESSAGE within policy_reservation_timeout; released \(t.addresses.count) reserved recipients of uid \(t.uid)")
        }
        await self.releaseDead(logger: logger)
    }

    static func connection(_ request: PolicyRequest, client: HostAddress) -> Reservations.Connection? {
        guard let cp = request["client_port"].flatMap({ UInt16($0) }), cp > 0,
            let serverText = request["server_address"], let server = HostAddress(serverText),
            let sp = request["server_port"].flatMap({ UInt16($0) }), sp > 0
        else { return nil }
        return Reservations.Connection(clientAddress: client, clientPort: cp, serverAddress: server, serverPort: sp)
    }

    func log(_ record: DecisionRecord, level: Logger.Level, logger: Logger) {
        self.runtime.observeRemaining(
            uid: record.uid, user: record.user, quota: record.quota, messages: record.messages, recipients: record.recipients)
        self.runtime.count { c in
            switch record.verdict {
            case .relay: c.relayed += 1
            case .defer: c.deferred += 1
            case .refuse: c.refused += 1
            case .hold: c.held += 1
            }
        }
        self.runtime.notifier.note(record, now: self.runtime.clock(), policy: self.runtime.ruleset.policy)
        logger.log(level: level, "\(record.line)", metadata: RestrictLogHandler.keepsMetadata ? record.metadata : nil)
    }
}

/// One connection from Postfix's policy client: requests in, one answer each, in order.
struct PolicyConnection: Sendable {
    let service: PolicyService
    let registry: SessionRegistry

    /// Closes the connection once no request came for `idle` (Postfix opens a new one).
    static func idleTimer(_ channel: any Channel, idle: TimeAmount, lastRequest: Mutex<NIODeadline>, logger: Logger) -> RepeatedTask {
        let peer = PeerCredentials.describe(channel.remoteAddress)
        return channel.eventLoop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { task in
            if NIODeadline.now() - lastRequest.withLock({ $0 }) > idle {
                logger.debug("policy connection from \(peer) idle for idle_timeout; closing")
                channel.close(promise: nil)
                task.cancel()
            }
        }
    }

    /// Serves one accepted connection to its end. Never throws.
    func serve(_ channel: any Channel) async {
        let client: ClientConnection
        do {
            client = try await ClientConnection.adopt(channel)
        } catch {
            channel.close(promise: nil)
            return
        }
        defer { client.close() }
        let runtime = self.service.runtime
        let open = self.registry.add(channel)
        defer { self.registry.remove(channel) }
        let peer = PeerCredentials.describe(channel.remoteAddress)
        var logger = runtime.logger
        logger[metadataKey: LogKey.peer] = .string(peer)
        let ruleset = runtime.ruleset
        if ruleset.configuration.peerCheck {
            guard await PeerGate.admit(channel, clients: ruleset.clients, runtime: runtime, peer: peer, service: "policy", logger: logger) else {
                return
            }
        }
        if open > ruleset.configuration.value(.policyMaxConnections) {
            logger.warning("policy connect from \(peer) refused: \(open - 1) connections already (policy_max_connections)")
            return
        }
        let lastRequest = Mutex(NIODeadline.now())
        let timer = Self.idleTimer(channel, idle: .seconds(Int64(ruleset.configuration.value(.idleTimeout))), lastRequest: lastRequest, logger: logger)
        defer { timer.cancel() }
        var decoder = PolicyDecoder()
        var buffer = ByteBuffer()
        do {
            while let chunk = try await client.read() {
                var chunk = chunk
                buffer.writeBuffer(&chunk)
                var out = ByteBuffer()
                while let event = decoder.next(&buffer) {
                    lastRequest.withLock { $0 = .now() }
                    let action: PolicyAction
                    switch event {
                    case .request(let request):
                        action = await self.service.answer(request, logger: logger)
                    case .invalid(let why):
                        logger.warning("policy request from \(peer) refused: \(why)")
                        action = Replies.policyMalformed
                    }
                    action.write(to: &out)
                }
                buffer.discardReadBytes()
                if out.readableBytes > 0 { try await client.write(out) }
            }
        } catch {
            logger.debug("policy connection from \(peer) ended: \(error)")
        }
    }
}

/// An async lock per uid: `enter` waits until no other task of the same uid is inside, in
/// order of arrival; `leave` lets the next one in. Tasks of other uids never wait.
final class UIDGate: Sendable {
    private let inside = Mutex<[UInt32: [CheckedContinuation<Void, Never>]]>([:])

    func enter(_ uid: UInt32) async {
        let free = self.inside.withLock { waiting -> Bool in
            guard waiting[uid] == nil else { return false }
            waiting[uid] = []
            return true
        }
        if free { return }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            // The gate may have been left meanwhile: then this task is in at once.
            let now = self.inside.withLock { waiting -> Bool in
                guard waiting[uid] != nil else {
                    waiting[uid] = []
                    return true
                }
                waiting[uid, default: []].append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    func leave(_ uid: UInt32) {
        let next = self.inside.withLock { waiting -> CheckedContinuation<Void, Never>? in
            guard var queue = waiting[uid] else { return nil }
            guard !queue.isEmpty else {
                waiting[uid] = nil
                return nil
            }
            let first = queue.removeFirst()
            waiting[uid] = queue
            return first
        }
        next?.resume()
    }
}
