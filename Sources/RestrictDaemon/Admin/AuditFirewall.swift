// restrictpd --audit: what table inet restrictpd of `nft -j list ruleset` guards. A port is
// guarded when a rule of an output base chain matches "tcp dport" on it and either refuses
// every socket owner but some itself (meta skuid != ... reject or drop), or jumps to a chain
// that lets only listed owners through (meta skuid == ... accept) and then refuses the rest
// unconditionally (the shape of etc/nftables/restrictpd.nft). An earlier rule of the base
// chain that may accept the port first leaves it unguarded. A rule with oifname "lo" covers
// only this host's ports; one with oifname != "lo" only other hosts'. Anything this reading
// does not understand counts as not guarded: a false FAIL, never a false OK.

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
        return Self.guarded(outputChains.sorted(), rules: rules)
    }

    /// The ports the base chains guard, read rule by rule in order.
    static func guarded(_ baseChains: [String], rules: [String: [[JSONValue]]]) -> FirewallTable {
        var found = FirewallTable()
        for chain in baseChains {
            var opened = FirewallTable()
            for expr in rules[chain] ?? [] {
                let ports = Self.dports(expr)
                let scope = Self.interfaceScope(expr)
                let target = expr.lazy.compactMap { ($0["jump"] ?? $0["goto"])?["target"]?.stringValue }.first
                let guards = !ports.isEmpty
                    && (Self.refusesAllButSome(expr) || target.map { Self.chainGuards(rules[$0] ?? []) } == true)
                if guards {
                    let unopened = { (open: [ClosedRange<Int>]) in ports.filter { r in !open.contains { $0.overlaps(r) } } }
                    if scope != .outbound { found.loopback += unopened(opened.loopback) }
                    if scope != .loopback { found.outbound += unopened(opened.outbound) }
                } else if Self.accepts(expr) || target.map({ (rules[$0] ?? []).contains(where: Self.accepts) }) == true {
                    // It may let a connection through before a later guard sees it.
                    let all = [0...65535]
                    if scope != .outbound { opened.loopback += ports.isEmpty ? all : ports }
                    if scope != .loopback { opened.outbound += ports.isEmpty ? all : ports }
                }
            }
        }
        return found
    }

    /// One rule that refuses every socket owner but those it names: meta skuid != ... with
    /// reject or drop.
    static func refusesAllButSome(_ expr: [JSONValue]) -> Bool {
        self.refuses(expr) && self.matches(expr).contains { self.isMeta($0.left, "skuid") && $0.op == "!=" }
    }

    /// A chain that accepts only listed socket owners (meta skuid == ... accept) and refuses
    /// everything else: its rules in order, until one refuses unconditionally (or refuses all
    /// but some owners). Another jump, or an accept on other grounds, is not understood.
    static func chainGuards(_ rules: [[JSONValue]]) -> Bool {
        for expr in rules {
            if expr.contains(where: { $0["jump"] != nil || $0["goto"] != nil }) { return false }
            if self.accepts(expr) {
                let listed = self.matches(expr).contains { self.isMeta($0.left, "skuid") && ($0.op == "==" || $0.op == "in") }
                if !listed { return false }
                continue
            }
            if self.refuses(expr) && (self.unconditional(expr) || self.refusesAllButSome(expr)) { return true }
        }
        return false
    }

    /// No match but on the protocol ("reject with tcp reset" adds meta l4proto tcp): for the
    /// TCP connections in question, a rule that always applies.
    static func unconditional(_ expr: [JSONValue]) -> Bool {
        self.matches(expr).allSatisfy { self.isMeta($0.left, "l4proto") || self.isMeta($0.left, "nfproto") }
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

    static func refuses(_ expr: [JSONValue]) -> Bool { expr.contains { $0["reject"] != nil || $0["drop"] != nil } }

    static func accepts(_ expr: [JSONValue]) -> Bool { expr.contains { $0["accept"] != nil } }

    enum Scope { case loopback, outbound, any }

    /// oifname "lo": this host's ports only; oifname != "lo": other hosts' only.
    static func interfaceScope(_ expr: [JSONValue]) -> Scope {
        for m in self.matches(expr) where self.isMeta(m.left, "oifname") && m.right.stringValue == "lo" {
            return m.op == "!=" ? .outbound : .loopback
        }
        return .any
    }
}
