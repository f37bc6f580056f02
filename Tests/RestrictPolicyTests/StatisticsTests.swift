// The statistics gathered in memory before they reach the store.

import RestrictPolicy
import Testing

@Suite struct StatisticsTests {
    @Test func countsPerUidAndHourWithDistinctStrangers() {
        var s = StatsAccumulator()
        let t0: Int64 = 1_700_000_000 / 3600 * 3600
        s.add(uid: 33, at: t0, verdict: .relay, strangers: ["a@x", "b@x"])
        s.add(uid: 33, at: t0 + 10, verdict: .relay, strangers: ["a@x"])
        s.add(uid: 33, at: t0 + 20, verdict: .defer, strangers: ["c@x"])
        s.add(uid: 33, at: t0 + 30, verdict: .refuse)
        s.add(uid: 34, at: t0 + 3600, verdict: .relay)
        #expect(s.drain(now: t0 + 40) == [
            StatsRow(uid: 33, hour: t0 / 3600, relayed: 2, refused: 1, deferred: 1, strangers: 2),
            StatsRow(uid: 34, hour: t0 / 3600 + 1, relayed: 1),
        ])
        // Within the same hour a stranger already counted is not counted again.
        s.add(uid: 33, at: t0 + 50, verdict: .relay, strangers: ["a@x", "d@x"])
        #expect(s.drain(now: t0 + 60) == [StatsRow(uid: 33, hour: t0 / 3600, relayed: 1, strangers: 1)])
        #expect(s.drain(now: t0 + 70).isEmpty)
    }
}

@Suite struct StatisticsConfigTests {
    @Test func metricsFileAndRetention() throws {
        let c = try config("metrics_file /var/lib/node/restrictpd.prom\nstats_retention_days 90\n")
        #expect(c.metricsFile == "/var/lib/node/restrictpd.prom")
        #expect(c.value(.statsRetentionDays) == 90)
        #expect(try config("").value(.statsRetentionDays) == 35)
        #expect(errors("metrics_file restrictpd.prom\nstats_retention_days 0\n") == [
            "t.conf:1: metrics_file must be an absolute path",
            "t.conf:2: stats_retention_days 0 is out of range (1...3660)",
        ])
    }
}
