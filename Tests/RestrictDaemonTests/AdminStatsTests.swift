// restrictpd --stats: a frozen uid is shown as frozen, in --quota's words, in the text and
// in the JSON.

import RestrictPolicy
import Testing

@testable import RestrictDaemon

@Suite struct AdminStatsTests {
    static let hour: Int64 = 500_000

    @Test func aFrozenUIDIsShownFrozen() {
        let frozen = FrozenState(uid: 33, since: Self.hour * 3600 + 60, reason: "3 refusals per hour")
        let users = Admin.withFrozen(
            [
                UserStats(uid: 33, name: "www-data", hours: [StatsRow(uid: 33, hour: Self.hour, refused: 3)], caps: []),
                UserStats(uid: 1000, name: nil, hours: [StatsRow(uid: 1000, hour: Self.hour, relayed: 1)], caps: []),
            ], [frozen, FrozenState(uid: 77, since: 0, reason: "1 refusals per day")])
        let text = Admin.statsText(users, since: Self.hour * 3600)
        #expect(text[0] == "uid 33 (www-data): relayed 0, refused 3, deferred 0, held 0, strangers 0")
        #expect(text[1] == "  FROZEN since 2027-01-15 08:01:00 UTC (freeze after 3 refusals per hour); its mail is held or deferred until restrictpd --thaw www-data")
        #expect(text.filter { $0.contains("FROZEN") }.count == 1, "only the uids shown, only the frozen one")
        #expect(Admin.frozenLines([frozen]).first?.hasSuffix(": " + text[1].dropFirst(2)) == true, "the words of --quota")

        let json = Admin.statsJSON(users, since: 0, now: Self.hour * 3600 + 3600)
        #expect(json.contains("\"uid\":33,\"user\":\"www-data\",\"relayed\":0,\"refused\":3,\"deferred\":0,\"held\":0,\"strangers\":0,"
            + "\"frozen\":{\"since\":1800000060,\"time\":\"2027-01-15 08:01:00 UTC\",\"reason\":\"3 refusals per hour\"}"))
        #expect(json.contains("\"uid\":1000,\"user\":null,\"relayed\":1,\"refused\":0,\"deferred\":0,\"held\":0,\"strangers\":0,\"frozen\":null"))
    }
}
