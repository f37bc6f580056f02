// restrictpd --audit: what table inet restrictpd of `nft -j list ruleset` guards. A port is
// guarded when a rule of an output base chain matches "tcp dport" on it and either checks the
// socket's owner itself (meta skuid) and rejects or drops, or jumps to a chain that does (the
// shape of etc/nftables/restrictpd.nft). A rule with oifname "lo" covers only this host's
// ports; one with oifname != "lo" only other hosts'.

/// The ports table inet restrictpd guards, for connections over loopback and to other hosts.
struct FirewallTable: Sendable, Equatable {
    var loopback: [ClosedRange<Int>] = []
    var outbound: [ClosedRange<Int>] = []

    func guardsLoopback(_ port: Int) -> Bool { self.loopback.contains { $0.contains(port) } }
    func guardsOutbound(_ port: Int) -> Bool { self.outbound.contains { $0.contains(port) } }

    static let family = "inet", table = "restrictpd"

    /// The table in `ruleset`, or nil when it is not loaded.
    static func parse(_ ruleset: JSONValue) -> FirewallTable? {
        guard let items = ruleset["nftables"]?.arrayValue else { return nil }
        let mine = { (o: JSONValue) in o["family"]?.stringValue == Self.family && o["table"]?.stringValue == Self.table }
        guard items.contains(where: { $0["table"].map { $0["family"]?.stringValue == Self.family && $0["name"]?.stringValue == Self.table } ?? false }) else { return nil }
        var outputChains = Set<String>()
        var rules: [String: [[JSONValue]]] = [:]
        for item in items {
            if let chain = item["chain"], mine(chain), chain["hook"]?.stringValue == "output", let name = chain["name"]?.stringValue {
                outputChains.insert(name)
            }
            if let rule = item["rule"], mine(rule), let chain = rule["chain"]?.stringValue, let expr = rule["expr"]?.arrayValue {
                rules[chain, default: []].append(expr)
            }
        }
        var found = FirewallTable()
        for chain in outputChains.sorted() {
            for expr in rules[chain] ?? [] {
                let ports = Self.dports(expr)
                guard !ports.isEmpty else { continue }
                let target = expr.lazy.compactMap { ($0["jump"] ?? $0["goto"])?["target"]?.stringValue }.first
                let checks = Self.checksOwner(expr) && Self.refuses(expr)
                guard checks || target.map({ Self.chainChecksOwner(rules[$0] ?? []) }) == true else { continue }
                let scope = Self.interfaceScope(expr)
                if scope != .outbound { found.loopback += ports }
                if scope != .loopback { found.outbound += ports }
            }
        }
        return found
    }

    /// {"match": {"op": OP, "left": LEFT, "right": RIGHT}} items of a rule.
    static func matches(_ expr: [JSONValue]) -> [(op: String, left: JSONValue, right: JSONValue)] {
        expr.compactMap { e in
            guard let m = e["match"], let op = m["op"]?.stringValue, let left = m["left"], let right = m["right"] else { return nil }
            return (op, left, right)
        }
    }

    static func isMeta(_ left: JSONValue, _ key: String) -> Bool { left["meta"]?["key"]?.stringValue == key }

    /// The ports of "tcp dport PORT", "{ P1, P2 }" or "P1-P2" matches.
    static func dports(_ expr: [JSONValue]) -> [ClosedRange<Int>] {
        var ports: [ClosedRange<Int>] = []
        for m in self.matches(expr) where m.op == "==" || m.op == "in" {
            guard let payload = m.left["payload"], payload["protocol"]?.stringValue == "tcp", payload["field"]?.stringValue == "dport" else { continue }
            let elements = m.right["set"]?.arrayValue ?? [m.right]
            ports += elements.compactMap(self.portRange)
        }
        return ports
    }

    /// 25, or {"range": [25, 587]}.
    static func portRange(_ v: JSONValue) -> ClosedRange<Int>? {
        func port(_ v: JSONValue) -> Int? {
            guard case .number(let d) = v, let n = Int(exactly: d), (0...65535).contains(n) else { return nil }
            return n
        }
        if let n = port(v) { return n...n }
        guard let r = v["range"]?.arrayValue, r.count == 2, let a = port(r[0]), let b = port(r[1]), a <= b else { return nil }
        return a...b
    }

    static func checksOwner(_ expr: [JSONValue]) -> Bool { self.matches(expr).contains { self.isMeta($0.left, "skuid") } }

    static func refuses(_ expr: [JSONValue]) -> Bool { expr.contains { $0["reject"] != nil || $0["drop"] != nil } }

    /// A chain that lets some socket owners through and refuses the rest.
    static func chainChecksOwner(_ rules: [[JSONValue]]) -> Bool {
        rules.contains(where: self.checksOwner) && rules.contains(where: self.refuses)
    }

    enum Scope { case loopback, outbound, any }

    /// oifname "lo": this host's ports only; oifname != "lo": other hosts' only.
    static func interfaceScope(_ expr: [JSONValue]) -> Scope {
        for m in self.matches(expr) where self.isMeta(m.left, "oifname") && m.right.stringValue == "lo" {
            return m.op == "!=" ? .outbound : .loopback
        }
        return .any
    }
}
