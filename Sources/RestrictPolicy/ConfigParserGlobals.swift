// The handlers of restrictpd.conf(5)'s global settings. `ConfigParser.global` has already
// checked that the line is above the first rule and the setting's first.

extension ConfigParser.Keyword {
    typealias ParseState = ConfigParser.ParseState
    typealias Directive = ConfigParser.Directive

    /// `listen ADDRESS...`.
    static func listen(_ state: inout ParseState, _ d: Directive) {
        state.addListen(d, to: \.listen, seen: \.listenSeen)
    }

    /// `policy_listen ADDRESS...`.
    static func policyListen(_ state: inout ParseState, _ d: Directive) {
        state.addListen(d, to: \.policyListen, seen: \.policyListenSeen)
    }

    /// `relay HOST:PORT`.
    static func relay(_ state: inout ParseState, _ d: Directive) {
        guard let (host, port) = state.hostAndPort(d) else { return }
        state.config.relayHost = host
        state.config.relayPort = port
    }

    /// `hold_relay HOST:PORT`.
    static func holdRelay(_ state: inout ParseState, _ d: Directive) {
        guard let (host, port) = state.hostAndPort(d) else { return }
        state.config.holdRelayHost = host
        state.config.holdRelayPort = port
    }

    /// `clients USER...`: replaces the default (postfix); an unknown user is reported, the
    /// others still count.
    static func clients(_ state: inout ParseState, _ d: Directive) {
        guard !d.args.isEmpty else { return state.error(d.line, "clients needs at least one user") }
        state.clientsSeen = true
        state.config.clients = []
        state.config.clientNames = []
        for a in d.args {
            guard let (uid, _) = ConfigParser.resolve(a, state.users) else {
                state.error(d.line, "unknown user '\(a)' in clients")
                continue
            }
            state.config.clients.append(uid)
            state.config.clientNames.append(a)
        }
    }

    /// `peer_check yes|no`.
    static func peerCheck(_ state: inout ParseState, _ d: Directive) {
        guard let v = state.value(of: d) else { return }
        switch v {
        case "yes": state.config.peerCheck = true
        case "no": state.config.peerCheck = false
        default: state.error(d.line, "peer_check takes 'yes' or 'no'")
        }
    }

    /// `unix_socket_mode MODE`, in octal.
    static func unixSocketMode(_ state: inout ParseState, _ d: Directive) {
        guard let v = state.value(of: d) else { return }
        guard v.count <= 4, let mode = UInt32(v, radix: 8), mode <= 0o777 else {
            return state.error(d.line, "unix_socket_mode takes an octal mode such as 0660")
        }
        state.config.unixSocketMode = mode
    }

    /// `unix_socket_group NAME`: looked up by the daemon, not here.
    static func unixSocketGroup(_ state: inout ParseState, _ d: Directive) {
        guard let v = state.value(of: d) else { return }
        state.config.unixSocketGroup = v
    }

    /// `state PATH|postgresql://...`.
    static func state(_ state: inout ParseState, _ d: Directive) {
        guard let v = state.value(of: d) else { return }
        if PostgresLocation.isURI(v) {
            switch PostgresLocation.parse(v) {
            case .success(let location): state.config.statePostgres = location
            case .failure(let why): state.error(d.line, why.text)
            }
            return
        }
        guard v.hasPrefix("/") else { return state.error(d.line, "state must be an absolute path or a postgresql:// URI") }
        state.config.statePath = v
    }

    /// `state_password_file PATH`.
    static func statePasswordFile(_ state: inout ParseState, _ d: Directive) {
        state.setAbsolutePath(d, \.statePasswordFile)
    }

    /// `postconf_dir PATH`.
    static func postconfDir(_ state: inout ParseState, _ d: Directive) {
        state.setAbsolutePath(d, \.postconfDir)
    }

    /// `metrics_file PATH`.
    static func metricsFile(_ state: inout ParseState, _ d: Directive) {
        state.setAbsolutePath(d, \.metricsFile)
    }

    /// `scope NAME`.
    static func scope(_ state: inout ParseState, _ d: Directive) {
        guard let v = state.value(of: d) else { return }
        guard v.utf8.count <= 255, v.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-._:".contains($0)) }) else {
            return state.error(d.line, "scope takes up to 255 letters, digits and - . _ :")
        }
        state.config.scope = v
    }

    /// `recipient_delimiter CHARACTERS`.
    static func recipientDelimiter(_ state: inout ParseState, _ d: Directive) {
        guard let v = state.value(of: d) else { return }
        guard v.count <= 8, v.allSatisfy({ $0.isASCII && !$0.isLetter && !$0.isNumber && $0 != "@" }) else {
            return state.error(d.line, "recipient_delimiter takes up to 8 punctuation characters, such as +")
        }
        state.config.recipientDelimiter = v
    }

    /// `smtp_authenticated trust|judge`.
    static func smtpAuthenticated(_ state: inout ParseState, _ d: Directive) {
        guard let v = state.value(of: d) else { return }
        guard let mode = SMTPAuthenticated(rawValue: v) else { return state.error(d.line, "smtp_authenticated takes 'trust' or 'judge'") }
        state.config.smtpAuthenticated = mode
    }

    /// `frozen hold|defer`.
    static func frozen(_ state: inout ParseState, _ d: Directive) {
        guard let v = state.value(of: d) else { return }
        guard let action = FrozenAction(rawValue: v) else { return state.error(d.line, "frozen takes 'hold' or 'defer'") }
        state.config.frozenAction = action
    }

    /// A numeric setting (`Setting.all`): a number in its range, with the units it allows.
    static func setting(_ setting: Setting) -> ConfigParser.Handler {
        return { state, d in
            guard let v = state.value(of: d) else { return }
            guard let n = ConfigParser.parseNumber(v, unit: setting.unit) else {
                return state.error(d.line, "bad value '\(v)' for \(d.key)\(ConfigParser.unitHint(setting.unit))")
            }
            guard setting.range.contains(n) else {
                let unit = setting.unit == .seconds ? " seconds" : setting.unit == .bytes ? " bytes" : ""
                return state.error(d.line, "\(d.key) \(v) is out of range (\(setting.range.lowerBound)...\(setting.range.upperBound)\(unit))")
            }
            state.config.values[d.key] = n
        }
    }
}

extension ConfigParser.ParseState {
    /// `listen` and `policy_listen`: one or more addresses a line, and several lines add up
    /// (the first line replaces the default). A bad address is reported, the others still count.
    mutating func addListen(
        _ d: ConfigParser.Directive, to list: WritableKeyPath<Configuration, [ListenAddress]>, seen: WritableKeyPath<Self, Bool>
    ) {
        guard !d.args.isEmpty else { return self.error(d.line, "\(d.key) needs HOST:PORT, [IPV6]:PORT or unix:/PATH") }
        if !self[keyPath: seen] { self.config[keyPath: list] = [] }
        self[keyPath: seen] = true
        for a in d.args {
            guard let l = ConfigParser.parseListen(a) else {
                self.error(d.line, "bad \(d.key) address '\(a)': use HOST:PORT, [IPV6]:PORT or unix:/PATH")
                continue
            }
            self.config[keyPath: list].append(l)
        }
    }

    /// The TCP address of `relay` or `hold_relay`; nil after reporting a bad one.
    mutating func hostAndPort(_ d: ConfigParser.Directive) -> (String, Int)? {
        guard let v = self.value(of: d) else { return nil }
        guard case .tcp(let host, let port)? = ConfigParser.parseListen(v) else {
            self.error(d.line, "bad \(d.key) address '\(v)': use HOST:PORT or [IPV6]:PORT")
            return nil
        }
        return (host, port)
    }

    /// A setting that names a file or directory: an absolute path.
    mutating func setAbsolutePath(_ d: ConfigParser.Directive, _ path: WritableKeyPath<Configuration, String?>) {
        guard let v = self.value(of: d) else { return }
        guard v.hasPrefix("/") else { return self.error(d.line, "\(d.key) must be an absolute path") }
        self.config[keyPath: path] = v
    }
}
