// Freezing seen from a pickup session: each refused message strikes with pickup's queue id,
// so that the store can count a message Postfix retries once.

import RestrictPolicy
import Testing

@testable import RestrictDaemon

/// A quota store that keeps freezes: it records each strike and never freezes.
actor FakeFreezeStore: QuotaStore, FreezeStore {
    struct Strike: Equatable {
        let uid: UInt32
        let queueID: String?
    }
    private(set) var strikes: [Strike] = []
    private let quota = FakeQuotaStore()

    func admit(_ request: QuotaRequest) async throws -> QuotaOutcome { try await self.quota.admit(request) }

    func strike(uid: UInt32, rule: FreezeRule, now: Int64, queueID: String?) async throws -> StrikeOutcome {
        self.strikes.append(Strike(uid: uid, queueID: queueID))
        return StrikeOutcome(count: self.strikes.count, froze: false)
    }

    func frozen(uid: UInt32) async throws -> FrozenState? { nil }
}

@Suite("Session: freezing", .serialized, .timeLimit(.minutes(1)))
struct SessionFreezeTests {
    @Test("a refused message strikes with pickup's queue id, each try of it with the same")
    func strikesCarryTheQueueID() async throws {
        let rules = """
            freeze after 10 refusals per hour
            user root
                allow @example.com
            """
        let store = FakeFreezeStore()
        try await withDaemon(rules, store: store) { h in
            let client = try await h.ready()
            for queueID in ["62F36F78196", "62F36F78196", "7A1B2C3D4E5"] {
                let reply = try await SessionPolicyTests.transaction(
                    client, recipients: ["evil@spam.test"], content: message(uid: 0, queueID: queueID))
                #expect(reply.code == 550)
            }
            // Strikes are counted beside the session.
            for _ in 0..<200 where await store.strikes.count < 3 { try await Task.sleep(for: .milliseconds(10)) }
        }
        let strikes = await store.strikes
        #expect(strikes == [.init(uid: 0, queueID: "62F36F78196"), .init(uid: 0, queueID: "62F36F78196"), .init(uid: 0, queueID: "7A1B2C3D4E5")])
    }
}
