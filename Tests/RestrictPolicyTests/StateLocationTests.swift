// `state postgresql://...`, `state_password_file` and `scope` in restrictpd.conf.

import RestrictPolicy
import Testing

@Suite struct StateLocationTests {
    @Test func postgresURIs() throws {
        let c = try config("state postgresql://restrictpd@db.example.org:6543/quota?sslmode=verify-full\nscope web-farm\nstate_password_file /etc/restrictpd/pw")
        #expect(c.statePostgres == PostgresLocation(user: "restrictpd", host: "db.example.org", port: 6543, database: "quota", sslMode: .verifyFull))
        #expect(c.scope == "web-farm")
        #expect(c.statePasswordFile == "/etc/restrictpd/pw")
        #expect(c.statePath == "/var/lib/restrictpd/quota.db")
        let short = try config("state postgres://u@[::1]/d")
        #expect(short.statePostgres == PostgresLocation(user: "u", host: "::1", port: 5432, database: "d", sslMode: .prefer))
        #expect(short.statePostgres?.description == "postgresql://u@[::1]:5432/d?sslmode=prefer")
        let escaped = try config("state postgresql://farm%2Dnode@10.0.0.5/restrict%70d?sslmode=disable")
        #expect(escaped.statePostgres?.user == "farm-node" && escaped.statePostgres?.database == "restrictpd")
        #expect(escaped.statePostgres?.sslMode == .disable)
        #expect(try config("").statePostgres == nil && config("").scope == nil)
    }

    @Test func aPasswordInTheURIIsRefusedAndNotRepeated() {
        let found = errors("state postgresql://restrictpd:hunter2@db/quota")
        #expect(found == ["t.conf:1: state must not carry a password: put it in the file named by state_password_file"])
        #expect(!found.joined().contains("hunter2"))
    }

    @Test func badURIs() {
        #expect(errors("state postgresql://db/quota") == ["t.conf:1: state needs a user: postgresql://USER@HOST[:PORT]/DB"])
        #expect(errors("state postgresql://u@db") == ["t.conf:1: state needs a database: postgresql://USER@HOST[:PORT]/DB"])
        #expect(errors("state postgresql://u@db/") == ["t.conf:1: state: bad or empty database name"])
        #expect(errors("state postgresql://u@db:0/q").first?.contains("bad host or port") == true)
        #expect(errors("state postgresql://u@db:99999/q").first?.contains("bad host or port") == true)
        #expect(errors("state postgresql://u@d%20b/q").first?.contains("bad host or port") == true)
        #expect(errors("state postgresql://u@db/q?sslmode=verify-ca").first?.contains("sslmode=") == true)
        #expect(errors("state postgresql://u@db/q?application_name=x").first?.contains("sslmode=") == true)
        #expect(errors("state postgresql://%ZZ@db/q") == ["t.conf:1: state: bad or empty user name"])
    }

    /// The PostgreSQL store keeps what the SQLite one does: caps, shared budgets, freezing.
    @Test func postgresTakesCapsSharedBudgetsAndFreezing() throws {
        let c = try config("""
            state postgresql://restrictpd@db.example.org/quota
            scope web-farm
            freeze after 3 refusals per hour
            uid 3000-3999
                allow @localhost
                arbitrary 5 per day
                messages 50 per hour
                recipients 200 per day
                max_recipients 20
                freeze after 10 refusals per day
                shared
            """)
        #expect(c.statePostgres != nil && c.freeze == FreezeRule(limit: 3, period: .hour))
        let rule = try #require(c.rules.first { $0.selector == .uidRange(from: 3000, to: 3999) })
        #expect(rule.shared && rule.caps.maxRecipients == 20 && rule.caps.counted.count == 2)
    }

    @Test func scopeAndPasswordFileAndLimits() throws {
        #expect(errors("scope web farm") == ["t.conf:1: scope takes one value"])
        #expect(errors("scope a/b") == ["t.conf:1: scope takes up to 255 letters, digits and - . _ :"])
        #expect(errors("state_password_file pw") == ["t.conf:1: state_password_file must be an absolute path"])
        let c = try config("state_timeout 5s\nstate_pool 10")
        #expect(c.value(.stateTimeout) == 5 && c.value(.statePool) == 10)
        #expect(try config("").value(.stateTimeout) == 2 && config("").value(.statePool) == 4)
        #expect(errors("state_timeout 0") == ["t.conf:1: state_timeout 0 is out of range (1...60 seconds)"])
        #expect(errors("state_pool 101") == ["t.conf:1: state_pool 101 is out of range (1...100)"])
    }
}
