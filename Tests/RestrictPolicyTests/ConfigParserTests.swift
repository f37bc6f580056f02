import RestrictPolicy
import Testing

let users = UserResolver { name in
    ["root": 0, "www-data": 33, "postfix": 107, "alice": 1000, "mallory": 1001][name]
}

func parse(_ text: String, file: String = "t.conf") -> Result<Configuration, ConfigErrors> {
    ConfigParser.parse(text, file: file, users: users)
}

func config(_ text: String) throws -> Configuration {
    switch parse(text) {
    case .success(let c): return c
    case .failure(let e):
        Issue.record("unexpected errors:\n\(e)")
        throw e
    }
}

/// The `FILE:LINE: message` lines a bad file gives.
func errors(_ text: String) -> [String] {
    switch parse(text) {
    case .success: return []
    case .failure(let e): return e.errors.map(\.description)
    }
}

@Suite struct ConfigParserTests {
    @Test func defaults() throws {
        let c = try config("")
        #expect(c.listen == [.tcp(host: "127.0.0.1", port: 10027)])
        #expect(c.relayHost == "127.0.0.1")
        #expect(c.relayPort == 10026)
        #expect(c.clients == [107])
        #expect(c.clientNames == ["postfix"])
        #expect(c.peerCheck)
        #expect(c.unixSocketMode == 0o660)
        #expect(c.statePath == "/var/lib/restrictpd/quota.db")
        #expect(c.recipientDelimiter == "")
        #expect(c.overQuota == .defer)
        #expect(c.rules.isEmpty)
        for s in Setting.all { #expect(c.value(s) == s.defaultValue) }
    }

    @Test func designExample() throws {
        let c = try config("""
            listen   127.0.0.1:10027          # or unix:/run/restrictpd/smtp.sock; systemd sockets win
            relay    127.0.0.1:10026
            clients  postfix                  # local users allowed to connect
            state    /var/lib/restrictpd/quota.db

            user www-data
                allow  webmaster@example.org @lists.example.org
                arbitrary 20 per day          # 20 distinct other recipients in any 24 hours

            user root
                allow  *

            default                           # every other identified user
                allow  @localhost

            unknown                           # no Postfix "from userid" header at the top
                refuse
            """)
        #expect(c.rules.count == 4)
        let www = try #require(c.rule(for: .user(uid: 33)))
        #expect(www.userName == "www-data")
        #expect(www.allow == [.address("webmaster@example.org"), .domain("lists.example.org")])
        #expect(www.quota == Quota(limit: 20, period: .day))
        #expect(www.line == 6)
        #expect(c.rule(for: .user(uid: 0))?.allow == [.any])
        #expect(c.rule(for: .default)?.allow == [.domain("localhost")])
        #expect(c.rule(for: .unknown)?.refuse == true)
    }

    @Test func globals() throws {
        let c = try config("""
            listen 127.0.0.1:10027 [::1]:10027
            listen unix:/run/restrictpd/smtp.sock
            relay [::1]:2526
            clients postfix 1000
            peer_check no
            unix_socket_mode 0600
            unix_socket_group postdrop
            state /tmp/q.db
            recipient_delimiter +-
            over_quota reject
            max_sessions 7
            """)
        #expect(c.listen == [.tcp(host: "127.0.0.1", port: 10027), .tcp(host: "::1", port: 10027), .unix(path: "/run/restrictpd/smtp.sock")])
        #expect(c.listen.map(\.description) == ["127.0.0.1:10027", "[::1]:10027", "unix:/run/restrictpd/smtp.sock"])
        #expect(c.relayHost == "::1")
        #expect(c.relayPort == 2526)
        #expect(c.clients == [107, 1000])
        #expect(c.clientNames == ["postfix", "1000"])
        #expect(!c.peerCheck)
        #expect(c.unixSocketMode == 0o600)
        #expect(c.unixSocketGroup == "postdrop")
        #expect(c.statePath == "/tmp/q.db")
        #expect(c.recipientDelimiter == "+-")
        #expect(c.overQuota == .reject)
        #expect(c.value(.maxSessions) == 7)
    }

    @Test func unitSuffixes() throws {
        let c = try config("""
            message_size_limit 10m
            header_limit 100k
            data_line_limit 1K
            command_line_limit 2048
            data_timeout 2h
            idle_timeout 5m
            command_timeout 30s
            relay_timeout 45
            drain_timeout 0
            """)
        #expect(c.value(.messageSizeLimit) == 10 * 1024 * 1024)
        #expect(c.value(.headerLimit) == 102_400)
        #expect(c.value(.dataLineLimit) == 1024)
        #expect(c.value(.commandLineLimit) == 2048)
        #expect(c.value(.dataTimeout) == 7200)
        #expect(c.value(.idleTimeout) == 300)
        #expect(c.value(.commandTimeout) == 30)
        #expect(c.value(.relayTimeout) == 45)
        #expect(c.value(.drainTimeout) == 0)
        #expect(try config("message_size_limit 1g").value(.messageSizeLimit) == 1 << 30)
        #expect(try config("message_size_limit 0").value(.messageSizeLimit) == 0)
        #expect(errors("idle_timeout 5k") == ["t.conf:1: bad value '5k' for idle_timeout: seconds, or with s, m or h"])
        #expect(errors("header_limit 1h") == ["t.conf:1: bad value '1h' for header_limit: bytes, or with k, m or g"])
        #expect(errors("max_sessions 5k") == ["t.conf:1: bad value '5k' for max_sessions: a whole number"])
        #expect(errors("max_sessions -1") == ["t.conf:1: bad value '-1' for max_sessions: a whole number"])
        #expect(errors("max_sessions k") == ["t.conf:1: bad value 'k' for max_sessions: a whole number"])
        #expect(errors("idle_timeout") == ["t.conf:1: idle_timeout takes one value"])
    }

    /// A number whose suffix makes it overflow is an error, not a crash.
    @Test func hugeNumbersDoNotOverflow() {
        #expect(errors("message_size_limit 9999999999999g") == ["t.conf:1: bad value '9999999999999g' for message_size_limit: bytes, or with k, m or g"])
        #expect(errors("data_timeout 9999999999999h") == ["t.conf:1: data_timeout 9999999999999h is out of range (1...86400 seconds)"])
        #expect(errors("data_timeout 9999999999999999h") == ["t.conf:1: bad value '9999999999999999h' for data_timeout: seconds, or with s, m or h"])
        #expect(errors("message_size_limit 99999999999999999999") == ["t.conf:1: bad value '99999999999999999999' for message_size_limit: bytes, or with k, m or g"])
    }

    @Test func singleValuedSettingGivenTwice() {
        #expect(errors("relay 127.0.0.1:10026\nrelay 127.0.0.1:10025") == ["t.conf:2: relay given twice (first at line 1)"])
        #expect(errors("over_quota defer\n\nover_quota reject") == ["t.conf:3: over_quota given twice (first at line 1)"])
        // listen may be repeated; over_quota inside a rule is the rule's own.
        #expect(errors("listen 127.0.0.1:10027\nlisten [::1]:10027").isEmpty)
        #expect(errors("over_quota defer\nuser 0\n over_quota reject").isEmpty)
    }

    @Test func outOfRange() {
        #expect(errors("command_line_limit 100") == ["t.conf:1: command_line_limit 100 is out of range (512...65536 bytes)"])
        #expect(errors("idle_timeout 2h") == ["t.conf:1: idle_timeout 2h is out of range (1...3600 seconds)"])
        #expect(errors("max_sessions 0") == ["t.conf:1: max_sessions 0 is out of range (1...10000)"])
        #expect(errors("message_size_limit 2g").isEmpty)
        #expect(errors("message_size_limit 1048577m") == ["t.conf:1: message_size_limit 1048577m is out of range (0...1099511627776 bytes)"])
        #expect(errors("user alice\n arbitrary 1000001") == ["t.conf:2: arbitrary takes 'N' or 'N per hour|day|week' with N from 0 to 1000000"])
        #expect(errors("unix_socket_mode 1777") == ["t.conf:1: unix_socket_mode takes an octal mode such as 0660"])
        #expect(errors("unix_socket_mode 0999") == ["t.conf:1: unix_socket_mode takes an octal mode such as 0660"])
    }

    @Test func badListenAddresses() {
        for bad in ["1.2.3.4", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:", ":25", "::1:25", "[::1]25", "[::1]:",
            "[127.0.0.1]:25", "unix:relative/path", "unix:", "a_b:25"]
        {
            #expect(errors("listen \(bad)") == ["t.conf:1: bad listen address '\(bad)': use HOST:PORT, [IPV6]:PORT or unix:/PATH"], "\(bad)")
        }
        #expect(errors("listen unix:/\(String(repeating: "x", count: 120))").count == 1)
        #expect(errors("listen") == ["t.conf:1: listen needs HOST:PORT, [IPV6]:PORT or unix:/PATH"])
        #expect(errors("relay unix:/x") == ["t.conf:1: bad relay address 'unix:/x': use HOST:PORT or [IPV6]:PORT"])
        #expect(errors("relay a:1 b:2") == ["t.conf:1: relay takes one value"])
        #expect(ConfigParser.parseListen("localhost:25") == .tcp(host: "localhost", port: 25))
    }

    @Test func unknownKeyAndUser() {
        #expect(errors("# comment\nfrobnicate yes") == ["t.conf:2: unknown keyword 'frobnicate'"])
        #expect(errors("user nosuch\n  allow *\n  frob x") == ["t.conf:1: unknown user 'nosuch'", "t.conf:3: unknown keyword 'frob'"])
        #expect(errors("clients postfix nosuch") == ["t.conf:1: unknown user 'nosuch' in clients"])
        #expect(errors("user") == ["t.conf:1: user takes one user name or UID"])
        #expect(errors("user a b") == ["t.conf:1: user takes one user name or UID"])
        #expect(errors("default x") == ["t.conf:1: default takes no arguments"])
        // Two unknown users are two errors, not a duplicate rule.
        #expect(errors("user nosuch\nuser other") == ["t.conf:1: unknown user 'nosuch'", "t.conf:2: unknown user 'other'"])
    }

    @Test func duplicateRules() {
        #expect(errors("user 33\n  allow *\nuser www-data\n  allow @x.example")
            == ["t.conf:3: duplicate rule for user 33 (www-data) (first at line 1)"])
        #expect(errors("user www-data\nuser 33") == ["t.conf:2: duplicate rule for user 33 (first at line 1)"])
        #expect(errors("default\ndefault") == ["t.conf:2: duplicate rule for default (first at line 1)"])
        #expect(errors("unknown\n refuse\nunknown\n refuse") == ["t.conf:3: duplicate rule for unknown (first at line 1)"])
    }

    @Test func badAllowEntries() {
        #expect(errors("default\n allow a@") == ["t.conf:2: bad allow entry 'a@': bad address"])
        #expect(errors("default\n allow @") == ["t.conf:2: bad allow entry '@': bad domain"])
        #expect(errors("default\n allow @.") == ["t.conf:2: bad allow entry '@.': bad domain"])
        #expect(errors("default\n allow @a..b") == ["t.conf:2: bad allow entry '@a..b': bad domain"])
        #expect(errors("default\n allow @-a.example") == ["t.conf:2: bad allow entry '@-a.example': bad domain"])
        #expect(errors("default\n allow user") == ["t.conf:2: bad allow entry 'user': an address needs a domain (or use @domain, @.domain, *)"])
        #expect(errors("default\n allow <a@b.example>") == ["t.conf:2: bad allow entry '<a@b.example>': bad address"])
        #expect(errors("default\n allow @b.example a@ *") == ["t.conf:2: bad allow entry 'a@': bad address"])
        #expect(errors("default\n allow") == ["t.conf:2: allow needs at least one address, @domain, @.domain or *"])
        #expect(errors("allow *") == ["t.conf:1: allow outside a rule: start one with 'user NAME', 'default' or 'unknown'"])
    }

    @Test func allowEntriesAreLowerCased() throws {
        let c = try config("default\n allow WebMaster@Example.ORG @Lists.Example.org @.EXAMPLE.net postmaster *")
        #expect(c.rules[0].allow == [.address("webmaster@example.org"), .domain("lists.example.org"), .domainAndSubdomains("example.net"), .address("postmaster"), .any])
    }

    @Test func globalKeyInsideRule() {
        #expect(errors("user alice\n  allow *\n  relay 127.0.0.1:1") == ["t.conf:3: relay is a global setting: move it above the first rule"])
        #expect(errors("default\n max_sessions 5") == ["t.conf:2: max_sessions is a global setting: move it above the first rule"])
    }

    @Test func refuseCombinedWithAllow() {
        #expect(errors("unknown\n  refuse\n  allow *") == ["t.conf:1: a rule with 'refuse' cannot also allow or grant arbitrary destinations"])
        #expect(errors("user alice\n  arbitrary 3\n  refuse") == ["t.conf:1: a rule with 'refuse' cannot also allow or grant arbitrary destinations"])
        #expect(errors("default\n refuse now") == ["t.conf:2: refuse takes no arguments"])
    }

    @Test func arbitrary() throws {
        #expect(errors("unknown\n  arbitrary 5 per day") == ["t.conf:2: arbitrary has no meaning for unknown senders (there is no uid to count for)"])
        #expect(errors("default\n arbitrary 5 per month") == ["t.conf:2: unknown period 'month': use hour, day or week"])
        #expect(errors("default\n arbitrary 5 each day") == ["t.conf:2: arbitrary takes 'N' or 'N per hour|day|week' with N from 0 to 1000000"])
        #expect(errors("default\n arbitrary -1") == ["t.conf:2: arbitrary takes 'N' or 'N per hour|day|week' with N from 0 to 1000000"])
        #expect(errors("default\n arbitrary 1\n arbitrary 2") == ["t.conf:3: arbitrary given twice in one rule"])
        #expect(try config("default\n arbitrary 0").rules[0].quota == Quota(limit: 0, period: nil))
        #expect(try config("default\n arbitrary 7 per week").rules[0].quota?.description == "7 per week")
        #expect(try config("default\n arbitrary 7").rules[0].quota?.description == "7")
    }

    @Test func overQuota() throws {
        let c = try config("over_quota reject\nuser alice\n over_quota defer\ndefault\n allow *")
        #expect(c.overQuota == .reject)
        #expect(c.rule(for: .user(uid: 1000))?.overQuota == .defer)
        #expect(c.rule(for: .default)?.overQuota == nil)
        #expect(errors("over_quota maybe") == ["t.conf:1: over_quota takes 'defer', 'reject' or 'hold'"])
    }

    @Test func otherGlobalErrors() {
        #expect(errors("peer_check maybe") == ["t.conf:1: peer_check takes 'yes' or 'no'"])
        #expect(errors("state relative.db") == ["t.conf:1: state must be an absolute path or a postgresql:// URI"])
        #expect(errors("recipient_delimiter a") == ["t.conf:1: recipient_delimiter takes up to 8 punctuation characters, such as +"])
        #expect(errors("recipient_delimiter @") == ["t.conf:1: recipient_delimiter takes up to 8 punctuation characters, such as +"])
        #expect(errors("clients") == ["t.conf:1: clients needs at least one user"])
    }

    /// Every error in the file, each with its own line, in file order.
    @Test func allErrorsAreCollected() {
        let text = """
            listen nowhere
            max_sessions 0
            user nosuch
              allow bad@
            user 33
              allow *
            user www-data
              arbitrary 3 per fortnight
            unknown
              refuse
              allow *
            """
        #expect(errors(text) == [
            "t.conf:1: bad listen address 'nowhere': use HOST:PORT, [IPV6]:PORT or unix:/PATH",
            "t.conf:2: max_sessions 0 is out of range (1...10000)",
            "t.conf:3: unknown user 'nosuch'",
            "t.conf:4: bad allow entry 'bad@': bad address",
            "t.conf:8: unknown period 'fortnight': use hour, day or week",
            "t.conf:7: duplicate rule for user 33 (www-data) (first at line 5)",
            "t.conf:9: a rule with 'refuse' cannot also allow or grant arbitrary destinations",
        ])
    }

    @Test func fileNameAndCRLF() throws {
        #expect(errors("frob\r\n") == ["t.conf:1: unknown keyword 'frob'"])
        #expect(ConfigParser.parse("x", file: "/etc/restrictpd.conf", users: users).failureDescription == "/etc/restrictpd.conf:1: unknown keyword 'x'")
        let c = try config("user alice\r\n  allow a@b.example\r\n")
        #expect(c.rules[0].allow == [.address("a@b.example")])
        // Line numbers count CRLF lines too.
        #expect(errors("# one\r\n\r\nfrob\r\n") == ["t.conf:3: unknown keyword 'frob'"])
    }

    @Test func sizeLimits() {
        #expect(errors("x" + String(repeating: " ", count: ConfigParser.maxLineLength)) == ["t.conf:1: line longer than 65536 bytes"])
        #expect(errors(String(repeating: "#\n", count: ConfigParser.maxFileSize / 2 + 1)) == ["t.conf:0: file larger than 4194304 bytes"])
    }

    @Test func allKeysAreUnique() {
        #expect(Set(ConfigParser.allKeys).count == ConfigParser.allKeys.count)
        for key in ["listen", "relay", "clients", "over_quota", "allow", "arbitrary", "refuse", "user", "default", "unknown", "drain_timeout"] {
            #expect(ConfigParser.allKeys.contains(key))
        }
    }
}

extension Result where Failure == ConfigErrors {
    var failureDescription: String? {
        if case .failure(let e) = self { return e.description }
        return nil
    }
}
