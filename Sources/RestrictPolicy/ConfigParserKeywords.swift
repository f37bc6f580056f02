// restrictpd.conf(5)'s keywords, each with the function that parses its line (the shape of
// OpenSMTPD's command table): rules and the lines of their bodies here, global settings in
// ConfigParserGlobals.swift.

extension ConfigParser {
    /// Parses one line of its keyword into the state.
    typealias Handler = @Sendable (inout ParseState, Directive) -> Void

    /// Every keyword and its handler. A keyword missing here is an unknown keyword.
    static let keywords: [String: Handler] = {
        let named: [(String, Handler)] = [
            // Rules.
            ("user", Keyword.user),
            ("uid", Keyword.groupOrUid),
            ("group", Keyword.groupOrUid),
            ("default", Keyword.defaultOrUnknown),
            ("unknown", Keyword.defaultOrUnknown),
            // A rule's body.
            ("allow", Keyword.allow),
            ("arbitrary", Keyword.arbitrary),
            ("refuse", Keyword.refuse),
            ("shared", Keyword.shared),
            // A rule's, or above the first rule everyone's.
            ("over_quota", Keyword.overQuota),
            ("on_refuse", Keyword.onRefuse),
            ("freeze", Keyword.freeze),
            ("notify", Keyword.notify),
            ("warn", Keyword.warn),
            // Global settings.
            ("listen", global(Keyword.listen)),
            ("policy_listen", global(Keyword.policyListen)),
            ("relay", global(Keyword.relay)),
            ("hold_relay", global(Keyword.holdRelay)),
            ("clients", global(Keyword.clients)),
            ("peer_check", global(Keyword.peerCheck)),
            ("unix_socket_mode", global(Keyword.unixSocketMode)),
            ("unix_socket_group", global(Keyword.unixSocketGroup)),
            ("state", global(Keyword.state)),
            ("state_password_file", global(Keyword.statePasswordFile)),
            ("scope", global(Keyword.scope)),
            ("recipient_delimiter", global(Keyword.recipientDelimiter)),
            ("smtp_authenticated", global(Keyword.smtpAuthenticated)),
            ("frozen", global(Keyword.frozen)),
            ("postconf_dir", global(Keyword.postconfDir)),
            ("metrics_file", global(Keyword.metricsFile)),
        ]
        let caps = capKeys.map { ($0, Keyword.cap as Handler) }
        let settings = Setting.all.map { ($0.key, global(Keyword.setting($0))) }
        // Two entries for one keyword are a mistake in this table: they stop every parse at
        // once, so no test passes with one.
        return Dictionary(uniqueKeysWithValues: named + caps + settings)
    }()

    /// A global setting's line: only above the first rule, and only once.
    static func global(_ handler: @escaping Handler) -> Handler {
        return { state, d in
            if state.current != nil {
                return state.error(d.line, "\(d.key) is a global setting: move it above the first rule")
            }
            guard state.once(d.key, d.line) else { return }
            handler(&state, d)
        }
    }

    /// The handlers of `keywords`, one a keyword or a few alike.
    enum Keyword {
        /// What a line of a rule's body outside a rule is told to start.
        static let anyRule = "'user NAME', 'default' or 'unknown'"

        /// `user NAME|UID`.
        static func user(_ state: inout ParseState, _ d: Directive) {
            state.endRule()
            guard d.args.count == 1 else { return state.error(d.line, "user takes one user name or UID") }
            guard let (uid, name) = resolve(d.args[0], state.users) else {
                state.error(d.line, "unknown user '\(d.args[0])'")
                return state.startPlaceholder(userName: d.args[0], line: d.line)
            }
            state.current = Rule(selector: .user(uid: uid), userName: name, line: d.line)
        }

        /// `default`, `unknown`.
        static func defaultOrUnknown(_ state: inout ParseState, _ d: Directive) {
            state.endRule()
            guard d.args.isEmpty else { return state.error(d.line, "\(d.key) takes no arguments") }
            state.current = Rule(selector: d.key == "default" ? .default : .unknown, line: d.line)
        }

        /// `group NAME|GID`, `uid FROM-TO`.
        static func groupOrUid(_ state: inout ParseState, _ d: Directive) {
            state.endRule()
            switch parseManyRule(d.key, d.args, line: d.line, groups: state.groups) {
            case .success(let rule):
                state.current = rule
            case .failure(let why):
                state.error(d.line, why.text)
                state.startPlaceholder(userName: nil, line: d.line)
            }
        }

        /// `shared`.
        static func shared(_ state: inout ParseState, _ d: Directive) {
            guard var rule = state.rule(for: d, start: "'group NAME' or 'uid FROM-TO'") else { return }
            if let why = parseShared(d.args, into: &rule) { state.error(d.line, why) }
            state.current = rule
        }

        /// `messages`, `recipients`, `max_recipients`.
        static func cap(_ state: inout ParseState, _ d: Directive) {
            guard var rule = state.rule(for: d, start: "'user NAME' or 'default'") else { return }
            if let why = parseCap(d.key, d.args, into: &rule) { state.error(d.line, why) }
            state.current = rule
        }

        /// `allow PATTERN...`: a bad pattern is reported, the good ones on its line still count.
        static func allow(_ state: inout ParseState, _ d: Directive) {
            guard var rule = state.rule(for: d, start: anyRule) else { return }
            guard !d.args.isEmpty else { return state.error(d.line, "allow needs at least one address, @domain, @.domain or *") }
            for arg in d.args {
                switch parsePattern(arg) {
                case .success(let p): rule.allow.append(p)
                case .failure(let why): state.error(d.line, "bad allow entry '\(arg)': \(why.text)")
                }
            }
            state.current = rule
        }

        /// `arbitrary N [per hour|day|week]`.
        static func arbitrary(_ state: inout ParseState, _ d: Directive) {
            guard var rule = state.rule(for: d, start: anyRule) else { return }
            if rule.selector == .unknown {
                return state.error(d.line, "arbitrary has no meaning for unknown senders (there is no uid to count for)")
            }
            if rule.quota != nil { return state.error(d.line, "arbitrary given twice in one rule") }
            let args = d.args
            guard args.count == 1 || (args.count == 3 && args[1] == "per"),
                let n = Int(args[0]), (0...Quota.maxLimit).contains(n)
            else {
                return state.error(d.line, "arbitrary takes 'N' or 'N per hour|day|week' with N from 0 to \(Quota.maxLimit)")
            }
            var period: QuotaPeriod? = nil
            if args.count == 3 {
                guard let p = QuotaPeriod(rawValue: args[2]) else {
                    return state.error(d.line, "unknown period '\(args[2])': use hour, day or week")
                }
                period = p
            }
            rule.quota = Quota(limit: n, period: period)
            state.current = rule
        }

        /// `refuse`.
        static func refuse(_ state: inout ParseState, _ d: Directive) {
            guard var rule = state.rule(for: d, start: anyRule) else { return }
            guard d.args.isEmpty else { return state.error(d.line, "refuse takes no arguments") }
            rule.refuse = true
            state.current = rule
        }

        /// `over_quota defer|reject|hold`.
        static func overQuota(_ state: inout ParseState, _ d: Directive) {
            guard d.args.count == 1, let v = OverQuota(rawValue: d.args[0]) else {
                return state.error(d.line, "over_quota takes 'defer', 'reject' or 'hold'")
            }
            state.set(d, inRule: { $0.overQuota = v }, global: { $0.overQuota = v })
        }

        /// `on_refuse reject|hold`.
        static func onRefuse(_ state: inout ParseState, _ d: Directive) {
            guard d.args.count == 1, let v = OnRefuse(rawValue: d.args[0]) else {
                return state.error(d.line, "on_refuse takes 'reject' or 'hold'")
            }
            state.set(d, inRule: { $0.onRefuse = v }, global: { $0.onRefuse = v })
        }

        /// `freeze after N refusals per hour|day`.
        static func freeze(_ state: inout ParseState, _ d: Directive) {
            guard let freeze = parseFreeze(d.args) else {
                return state.error(d.line, "freeze takes 'after N refusals per hour|day' with N from 1 to \(FreezeRule.maxLimit)")
            }
            state.set(d, inRule: { $0.freeze = freeze }, global: { $0.freeze = freeze })
        }

        /// `warn at N%`.
        static func warn(_ state: inout ParseState, _ d: Directive) {
            let args = d.args
            guard args.count == 2, args[0] == "at", args[1].hasSuffix("%"), args[1].count <= 4,
                let n = Int(args[1].dropLast()), (1...100).contains(n)
            else {
                return state.error(d.line, "warn takes 'at N%' with N from 1 to 100")
            }
            state.set(d, inRule: { $0.warnAt = n }, global: { $0.warnAt = n })
        }

        /// `notify ADDRESS...`: a bad address is reported, the good ones on its line still count.
        static func notify(_ state: inout ParseState, _ d: Directive) {
            var addresses: [String] = []
            for arg in d.args {
                guard case .success(.address(let a)) = parsePattern(arg), a.contains("@") else {
                    state.error(d.line, "bad notify address '\(arg)': use user@domain")
                    continue
                }
                addresses.append(a)
            }
            guard !d.args.isEmpty else { return state.error(d.line, "notify needs at least one address") }
            state.set(d, inRule: { $0.notify = addresses }, global: { $0.notify = addresses })
        }
    }
}
