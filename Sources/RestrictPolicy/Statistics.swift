// Statistics per uid and hour (restrictpd --stats, the metrics file): what the daemon
// decided, gathered in memory and added to the store every few seconds. Pure values.

/// One uid's decisions in one hour.
public struct StatsRow: Sendable, Equatable {
    public let uid: UInt32
    /// Seconds since the epoch / 3600.
    public let hour: Int64
    public var relayed = 0
    public var refused = 0
    public var deferred = 0
    /// Messages parked in Postfix's hold queue (hold verdicts and frozen senders).
    public var held = 0
    /// Distinct addresses outside the allow list in the relayed messages of the hour (as
    /// counted by one daemon run; a restart within the hour may count an address again).
    public var strangers = 0

    public init(uid: UInt32, hour: Int64, relayed: Int = 0, refused: Int = 0, deferred: Int = 0, held: Int = 0, strangers: Int = 0) {
        self.uid = uid
        self.hour = hour
        self.relayed = relayed
        self.refused = refused
        self.deferred = deferred
        self.held = held
        self.strangers = strangers
    }
}

/// The decisions not yet written, and the distinct strangers of the current hour.
public struct StatsAccumulator: Sendable {
    private var pending: [StatsKey: StatsRow] = [:]
    private var strangers: [StatsKey: Set<String>] = [:]

    struct StatsKey: Hashable { let uid: UInt32; let hour: Int64 }

    public init() {}

    /// Notes one decision (`strangers`: the addresses outside the allow list it relayed).
    public mutating func add(uid: UInt32, at now: Int64, verdict: Verdict.Kind, strangers: [String] = []) {
        let key = StatsKey(uid: uid, hour: now / 3600)
        var row = self.pending[key] ?? StatsRow(uid: uid, hour: key.hour)
        switch verdict {
        case .relay: row.relayed += 1
        case .refuse: row.refused += 1
        case .defer: row.deferred += 1
        case .hold: row.held += 1
        }
        if verdict == .relay, !strangers.isEmpty {
            var seen = self.strangers[key] ?? []
            let before = seen.count
            seen.formUnion(strangers)
            row.strangers += seen.count - before
            self.strangers[key] = seen
        }
        self.pending[key] = row
    }

    /// The rows to add to the store; forgets them and the strangers of hours before `now`'s.
    public mutating func drain(now: Int64) -> [StatsRow] {
        let rows = self.pending.values.sorted { ($0.uid, $0.hour) < ($1.uid, $1.hour) }
        self.pending = [:]
        self.strangers = self.strangers.filter { $0.key.hour >= now / 3600 }
        return rows
    }
}

/// The store side of the statistics; both quota stores implement it.
public protocol StatisticsStore: Sendable {
    /// Adds decisions and drops the hours before `keepFrom` (epoch hours). Never throws: rows
    /// the store cannot take are logged and dropped, and never hold a decision up.
    func addStats(_ rows: [StatsRow], keepFrom: Int64) async
}
