// The daemon's lookups for group rules and `allow local`, on this host.

import Logging
import RestrictPolicy
import Testing

@testable import RestrictDaemon

@Suite struct HostLookupsTests {
    @Test func rootsGroupsIncludeItsPrimaryGroup() async {
        #expect(Users.groups(uid: 0)?.first == 0)
        #expect(Users.groups(uid: 4_000_000_000) == nil)
        let cache = UserGroups()
        #expect(cache.cached(0) == nil)
        #expect(await cache.groups(0).contains(0))
        #expect(cache.cached(0)?.contains(0) == true)
        #expect(Users.allMembers().contains { $0.uid == 0 && $0.groups.contains(0) })
    }

    @Test func allowLocalMatchesNothingWhenPostconfFails() throws {
        var configuration = try ConfigParser.parse(
            "postconf_dir /nonexistent/restrictpd-test\ndefault\n    allow local\n", file: "t.conf",
            users: UserResolver { _ in nil }).get()
        #expect(PostfixDomains.read(for: configuration, logger: Logger(label: "test")).isEmpty)
        // Without `allow local` postconf is not run at all.
        configuration.rules = []
        #expect(PostfixDomains.read(for: configuration, logger: Logger(label: "test")).isEmpty)
    }
}
