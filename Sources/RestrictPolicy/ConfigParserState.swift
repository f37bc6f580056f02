// What restrictpd.conf(5)'s parser carries from line to line: the configuration so far, the
// errors, the rule whose body the lines are in, and what it needs to find settings and rules
// given twice. The keyword handlers (ConfigParserKeywords.swift) act on it one line at a time;
// `end` makes the checks that need the whole file.

extension ConfigParser {
    /// One line of the file: its keyword, the words after it, and its number.
    struct Directive: Sendable {
        let key: String
        let args: [String]
        let line: Int
    }

    struct ParseState {
        let file: String
        let users: UserResolver
        let groups: GroupResolver
        var config = Configuration()
        var errors: [ConfigError] = []
        /// The rule the lines belong to, from its first line until the next rule starts.
        var current: Rule? = nil
        /// The line each rule was first given at, to refuse a second rule for the same users.
        var firstLine: [RuleSelector: Int] = [:]
        /// Global settings other than `listen` and `policy_listen` take one value: the line
        /// of each one's first, to refuse a second.
        var globalLine: [String: Int] = [:]
        /// Whether a `clients`, `listen` or `policy_listen` line has replaced the default.
        var clientsSeen = false
        var listenSeen = false
        var policyListenSeen = false

        init(file: String, users: UserResolver, groups: GroupResolver) {
            self.file = file
            self.users = users
            self.groups = groups
        }

        mutating func error(_ line: Int, _ message: String) {
            self.errors.append(ConfigError(file: self.file, line: line, message: message))
        }

        /// True the first time a global setting is given; a second line is an error.
        mutating func once(_ key: String, _ line: Int) -> Bool {
            if key == "listen" || key == "policy_listen" { return true }
            if let first = self.globalLine[key] {
                self.error(line, "\(key) given twice (first at line \(first))")
                return false
            }
            self.globalLine[key] = line
            return true
        }

        /// Closes the current rule: it joins the configuration unless its users already have one.
        mutating func endRule() {
            guard let rule = self.current else { return }
            self.current = nil
            if let first = self.firstLine[rule.selector] {
                self.error(rule.line, "duplicate rule for \(rule.selector)\(rule.userName.map { " (\($0))" } ?? "") (first at line \(first))")
                return
            }
            self.firstLine[rule.selector] = rule.line
            self.config.rules.append(rule)
        }

        /// Stands in for a rule whose first line is wrong, so the lines of its body are still
        /// parsed and their own errors reported. Never a duplicate; `end` drops it.
        mutating func startPlaceholder(userName: String?, line: Int) {
            self.current = Rule(selector: .user(uid: UInt32.max), userName: userName, line: line)
            self.firstLine[.user(uid: UInt32.max)] = nil
        }

        /// The rule a line of a rule's body belongs to; outside a rule, nil and an error
        /// that says how to start one (`start`).
        mutating func rule(for d: Directive, start: String) -> Rule? {
            if self.current == nil { self.error(d.line, "\(d.key) outside a rule: start one with \(start)") }
            return self.current
        }

        /// A setting both a rule and the whole file can have: inside a rule it is the rule's,
        /// above the first rule the global one (given once).
        mutating func set(_ d: Directive, inRule: (inout Rule) -> Void, global: (inout Configuration) -> Void) {
            if var rule = self.current {
                inRule(&rule)
                self.current = rule
            } else if self.once(d.key, d.line) {
                global(&self.config)
            }
        }

        /// The only value of a global setting that takes one.
        mutating func value(of d: Directive) -> String? {
            guard d.args.count == 1 else {
                self.error(d.line, "\(d.key) takes one value")
                return nil
            }
            return d.args[0]
        }

        /// After the last line: the checks that need every rule, then the configuration or
        /// every error found.
        mutating func end() -> Result<Configuration, ConfigErrors> {
            self.endRule()
            self.checkRuleCombinations()
            self.checkHoldRelay()
            self.config.rules.removeAll { $0.selector == .user(uid: UInt32.max) }
            self.errors += overlappingRanges(self.config.rules, file: self.file)
            if !self.clientsSeen {
                if let uid = self.users.uid("postfix") {
                    self.config.clients = [uid]
                } else {
                    self.config.clients = []
                }
            }
            return self.errors.isEmpty ? .success(self.config) : .failure(ConfigErrors(self.errors))
        }

        /// Held mail sent to `relay` would be delivered: where anything can be held, the two
        /// must be different listeners. A configuration that never holds does not use
        /// hold_relay, so its value does not matter.
        mutating func checkHoldRelay() {
            let c = self.config
            guard !c.holdReasons.isEmpty, c.holdRelayPort == c.relayPort, Self.sameHost(c.holdRelayHost, c.relayHost) else { return }
            let line = self.globalLine["hold_relay"] ?? self.globalLine["relay"] ?? 0
            let host = c.holdRelayHost.contains(":") ? "[\(c.holdRelayHost)]" : c.holdRelayHost
            self.error(line, "hold_relay \(host):\(c.holdRelayPort) is relay's address: held mail would be delivered (hold_relay must be the hold listener)")
        }

        /// May `a` and `b` reach the same listener? The same address, or two loopback
        /// addresses ("localhost" among them): one master.cf entry without an address listens
        /// on all of them.
        static func sameHost(_ a: String, _ b: String) -> Bool {
            let a = a.lowercased(), b = b.lowercased()
            if a == b { return true }
            let loopback = { (h: String) in h == "localhost" || HostAddress(h)?.isLoopback == true }
            if loopback(a) && loopback(b) { return true }
            if let x = HostAddress(a), let y = HostAddress(b) { return x == y }
            return false
        }

        /// What rules may not carry.
        mutating func checkRuleCombinations() {
            // A `refuse` rule may carry nothing else.
            for rule in self.config.rules where rule.refuse && (!rule.allow.isEmpty || rule.quota != nil) {
                self.error(rule.line, "a rule with 'refuse' cannot also allow or grant arbitrary destinations")
            }
            for rule in self.config.rules where rule.refuse && !rule.caps.isEmpty {
                self.error(rule.line, "a rule with 'refuse' sends nothing: it takes no messages, recipients or max_recipients")
            }
        }
    }
}
