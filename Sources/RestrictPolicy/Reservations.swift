// Quota held by SMTP transactions that are still open (design decision 11). Over SMTP each
// recipient is answered at RCPT, but the message may yet be abandoned, so quota is reserved
// at RCPT and spent only at END-OF-MESSAGE. While reserved, an address counts against its
// uid's limit for every other transaction and for the pickup door too (`QuotaRequest.held`),
// so concurrent transactions of one uid never together exceed it.
//
// Pure: the clock is an argument. The daemon keeps one of these behind a lock; the quota
// store is asked between `snapshot` and `reserve`, and `version` tells whether another
// reservation of the same uid came in meanwhile (then the caller asks again).

public struct Reservations: Sendable {
    /// The client's TCP connection to Postfix's smtpd, as the policy request gives it.
    public struct Connection: Sendable, Hashable, CustomStringConvertible {
        public let clientAddress: HostAddress
        public let clientPort: UInt16
        public let serverAddress: HostAddress
        public let serverPort: UInt16

        public init(clientAddress: HostAddress, clientPort: UInt16, serverAddress: HostAddress, serverPort: UInt16) {
            self.clientAddress = clientAddress
            self.clientPort = clientPort
            self.serverAddress = serverAddress
            self.serverPort = serverPort
        }

        /// "127.0.0.1:40000" or "[::1]:40000": the client's side, for log lines.
        public var description: String {
            self.clientAddress.isIPv4 ? "\(self.clientAddress):\(self.clientPort)" : "[\(self.clientAddress)]:\(self.clientPort)"
        }
    }

    /// One open transaction: its uid, and the addresses it has reserved, in RCPT order.
    public struct Transaction: Sendable, Equatable {
        public let instance: String
        public let uid: UInt32
        public let connection: Connection
        public var quota: Quota?
        public var overQuota: OverQuota
        public var addresses: [String] = []
        /// Each reserved address as the client wrote it, for log lines and replies.
        public var written: [String: String] = [:]
        /// Recipients answered DUNNO at RCPT because a rule allows them (not reserved).
        public var allowed: [String] = []
        /// When it is dropped if no END-OF-MESSAGE came (seconds since the epoch).
        public var expires: Int64
        /// Set at END-OF-MESSAGE while the store records the addresses: they stay held.
        public var committing = false
        /// The rule's volume caps, spent at END-OF-MESSAGE.
        public var caps = VolumeCaps.none
        /// A `shared` rule's store key (nil: the uid's own).
        public var budget: Int64? = nil

        /// Recipients accepted so far (allowed and reserved): what the message spends of a
        /// `recipients` cap.
        public var accepted: Int { self.allowed.count + self.addresses.count }
    }

    private var transactions: [String: Transaction] = [:]
    private var byConnection: [Connection: String] = [:]
    private var versions: [UInt32: UInt64] = [:]
    /// How long an open transaction may hold quota without a word from Postfix.
    public var timeout: Int64

    public init(timeout: Int64) { self.timeout = timeout }

    public var count: Int { self.transactions.count }

    public func transaction(_ instance: String) -> Transaction? { self.transactions[instance] }

    /// Changes whenever the addresses held for `uid` change.
    public func version(_ uid: UInt32) -> UInt64 { self.versions[uid] ?? 0 }

    /// Messages and recipients held for `uid` by open transactions other than `excluding`
    /// (a transaction holds a message once it has accepted a recipient).
    public func heldVolume(uid: UInt32, excluding instance: String? = nil) -> HeldVolume {
        var held = HeldVolume()
        for t in self.transactions.values where t.uid == uid && t.instance != instance && t.accepted > 0 {
            held.messages += 1
            held.recipients += t.accepted
        }
        return held
    }

    /// Every address held for `uid` by open transactions other than `excluding`.
    public func held(uid: UInt32, excluding instance: String? = nil) -> Set<String> {
        var held = Set<String>()
        for t in self.transactions.values where t.uid == uid && t.instance != instance {
            held.formUnion(t.addresses)
        }
        return held
    }

    /// Opens (or refreshes) the transaction `instance`. A new transaction on a connection
    /// ends the one before it: Postfix gives every MAIL FROM a new instance, so the old one
    /// was reset or finished without END-OF-MESSAGE. Returns the transactions so ended.
    @discardableResult
    public mutating func open(
        instance: String, uid: UInt32, connection: Connection, quota: Quota?, overQuota: OverQuota, now: Int64
    ) -> [Transaction] {
        var ended: [Transaction] = []
        if let previous = self.byConnection[connection], previous != instance, let t = self.remove(previous) {
            ended.append(t)
        }
        if var t = self.transactions[instance] {
            if t.uid != uid {
                // The same instance for another uid cannot come from Postfix: start over.
                if let old = self.remove(instance) { ended.append(old) }
            } else {
                t.expires = now + self.timeout
                t.quota = quota
                t.overQuota = overQuota
                self.transactions[instance] = t
                return ended
            }
        }
        self.transactions[instance] = Transaction(
            instance: instance, uid: uid, connection: connection, quota: quota, overQuota: overQuota, expires: now + self.timeout)
        self.byConnection[connection] = instance
        return ended
    }

    /// Notes a recipient that a rule allows outright.
    public mutating func allow(instance: String, recipient: String) {
        self.transactions[instance]?.allowed.append(recipient)
    }

    /// Notes an allowed recipient that counts against the uid's volume caps, if nothing
    /// changed for its uid since `version` was read. False: ask the store again.
    public mutating func accept(instance: String, recipient: String, ifVersion version: UInt64) -> Bool {
        guard var t = self.transactions[instance], self.version(t.uid) == version else { return false }
        t.allowed.append(recipient)
        self.versions[t.uid, default: 0] &+= 1
        self.transactions[instance] = t
        return true
    }

    /// Sets the caps the transaction spends at END-OF-MESSAGE, and the budget it counts under.
    public mutating func setCaps(instance: String, caps: VolumeCaps, budget: Int64? = nil) {
        self.transactions[instance]?.caps = caps
        self.transactions[instance]?.budget = budget
    }

    /// Holds `address` for `instance`, if nothing changed for its uid since `version` was
    /// read. False: ask the store again.
    public mutating func reserve(instance: String, address: String, written: String, ifVersion version: UInt64) -> Bool {
        guard var t = self.transactions[instance], self.version(t.uid) == version else { return false }
        if !t.addresses.contains(address) {
            t.addresses.append(address)
            t.written[address] = written
            self.versions[t.uid, default: 0] &+= 1
        }
        self.transactions[instance] = t
        return true
    }

    /// END-OF-MESSAGE: the transaction, marked as committing (its addresses stay held until
    /// `finish`), or nil when there is none.
    public mutating func commit(instance: String) -> Transaction? {
        guard var t = self.transactions[instance] else { return nil }
        t.committing = true
        self.transactions[instance] = t
        return t
    }

    /// Ends a transaction (committed, released or lost); returns it.
    @discardableResult
    public mutating func finish(instance: String) -> Transaction? { self.remove(instance) }

    /// Drops the transactions whose time is up; returns them.
    public mutating func expire(now: Int64) -> [Transaction] {
        let due = self.transactions.values.filter { !$0.committing && $0.expires <= now }.map(\.instance)
        return due.compactMap { self.remove($0) }
    }

    /// The open transactions, for a sweep that checks their connections still exist.
    public var open: [Transaction] { self.transactions.values.filter { !$0.committing } }

    private mutating func remove(_ instance: String) -> Transaction? {
        guard let t = self.transactions.removeValue(forKey: instance) else { return nil }
        if self.byConnection[t.connection] == instance { self.byConnection[t.connection] = nil }
        // No new version: what it held is released (or, committed, now counted by the store
        // instead), so a reservation decided on what was read before stays within the limit.
        return t
    }
}
