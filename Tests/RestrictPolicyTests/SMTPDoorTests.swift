import RestrictPolicy
import Testing

@Suite struct HostAddressTests {
    @Test func parsesWhatPostfixWrites() throws {
        #expect(HostAddress("127.0.0.1")?.bytes == [127, 0, 0, 1])
        #expect(HostAddress("::1")?.bytes == Array(repeating: 0, count: 15) + [1])
        #expect(HostAddress("2001:db8::5")?.description == "2001:db8::5")
        #expect(HostAddress("2001:db8:0:0:1:0:0:1")?.description == "2001:db8::1:0:0:1")
        #expect(HostAddress("fe80::1:2")?.description == "fe80::1:2")
        #expect(HostAddress("1:2:3:4:5:6:7:8")?.description == "1:2:3:4:5:6:7:8")
        #expect(HostAddress("::")?.description == "::")
    }

    @Test func foldsV4Mapped() {
        #expect(HostAddress("::ffff:127.0.0.1") == HostAddress("127.0.0.1"))
        #expect(HostAddress("::ffff:7f00:1") == HostAddress("127.0.0.1"))
        #expect(HostAddress("::ffff:192.0.2.9")?.isIPv4 == true)
        #expect(HostAddress("::ffff:192.0.2.9")?.description == "192.0.2.9")
    }

    @Test func refusesWhatIsNotAnAddress() {
        for bad in ["", "unknown", "localhost", "1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "1.2.3.-4", "[::1]",
                    "::1%lo", "1::2::3", "12345::1", "1:2:3:4:5:6:7:8:9", "g::1", ":1", "1:", "1.2.3.4:25",
                    String(repeating: "1", count: 100)] {
            #expect(HostAddress(bad) == nil, "\(bad)")
        }
    }

    @Test func localMeansLoopbackOrOneOfOurs() throws {
        let ours: Set<HostAddress> = [try #require(HostAddress("192.0.2.1")), try #require(HostAddress("2001:db8::1"))]
        #expect(HostAddress("127.0.0.1")?.isLocal(among: []) == true)
        #expect(HostAddress("127.45.6.7")?.isLocal(among: []) == true)
        #expect(HostAddress("::1")?.isLocal(among: []) == true)
        #expect(HostAddress("::ffff:127.0.0.1")?.isLocal(among: []) == true)
        #expect(HostAddress("192.0.2.1")?.isLocal(among: ours) == true)
        #expect(HostAddress("::ffff:192.0.2.1")?.isLocal(among: ours) == true)
        #expect(HostAddress("2001:db8::1")?.isLocal(among: ours) == true)
        #expect(HostAddress("192.0.2.2")?.isLocal(among: ours) == false)
        #expect(HostAddress("::2")?.isLocal(among: ours) == false)
        #expect(HostAddress("128.0.0.1")?.isLocal(among: ours) == false)
    }
}

private func connection(_ port: UInt16) -> Reservations.Connection {
    Reservations.Connection(
        clientAddress: HostAddress("127.0.0.1")!, clientPort: port, serverAddress: HostAddress("127.0.0.1")!, serverPort: 25)
}

@Suite struct ReservationTests {
    let quota = Quota(limit: 3, period: .day)

    @Test func heldAddressesCountForOthersAndTheStore() {
        var r = Reservations(timeout: 600)
        r.open(instance: "a", uid: 33, connection: connection(1000), quota: quota, overQuota: .defer, now: 0)
        r.open(instance: "b", uid: 33, connection: connection(1001), quota: quota, overQuota: .defer, now: 0)
        r.open(instance: "c", uid: 34, connection: connection(1002), quota: quota, overQuota: .defer, now: 0)
        do { let ok = r.reserve(instance: "a", address: "x@r", written: "X@r", ifVersion: r.version(33)); #expect(ok) }
        do { let ok = r.reserve(instance: "b", address: "y@r", written: "y@r", ifVersion: r.version(33)); #expect(ok) }
        do { let ok = r.reserve(instance: "c", address: "z@r", written: "z@r", ifVersion: r.version(34)); #expect(ok) }
        #expect(r.held(uid: 33) == ["x@r", "y@r"])
        #expect(r.held(uid: 33, excluding: "a") == ["y@r"])
        #expect(r.held(uid: 34) == ["z@r"])
        // The store's arithmetic sees held addresses as counted: 2 held + 1 counted leaves none.
        let request = QuotaRequest(uid: 33, addresses: ["new@r"], quota: quota, now: 0, held: r.held(uid: 33), record: false)
        let (outcome, record) = QuotaArithmetic.decide(request, counted: ["old@r"])
        #expect(!outcome.admitted && outcome.used == 3 && record.isEmpty)
        // An address someone holds, or that is counted, costs nothing more.
        let again = QuotaRequest(uid: 33, addresses: ["y@r", "old@r"], quota: quota, now: 0, held: r.held(uid: 33), record: false)
        #expect(QuotaArithmetic.decide(again, counted: ["old@r"]).0.admitted)
        #expect(QuotaArithmetic.decide(again, counted: ["old@r"]).record.isEmpty)
    }

    @Test func aReservationFailsWhenTheUidChangedMeanwhile() {
        var r = Reservations(timeout: 600)
        r.open(instance: "a", uid: 33, connection: connection(1000), quota: quota, overQuota: .defer, now: 0)
        r.open(instance: "b", uid: 33, connection: connection(1001), quota: quota, overQuota: .defer, now: 0)
        let seenByA = r.version(33)
        let seenByB = r.version(33)
        do { let ok = r.reserve(instance: "b", address: "y@r", written: "y@r", ifVersion: seenByB); #expect(ok) }
        // A asked the store before B's reservation: it must ask again.
        do { let ok = r.reserve(instance: "a", address: "x@r", written: "x@r", ifVersion: seenByA); #expect(!ok) }
        do { let ok = r.reserve(instance: "a", address: "x@r", written: "x@r", ifVersion: r.version(33)); #expect(ok) }
        // Another uid's changes do not disturb this one.
        let v = r.version(33)
        r.open(instance: "c", uid: 34, connection: connection(1002), quota: quota, overQuota: .defer, now: 0)
        do { let ok = r.reserve(instance: "c", address: "z@r", written: "z@r", ifVersion: r.version(34)); #expect(ok) }
        #expect(r.version(33) == v)
    }

    @Test func aNewTransactionOnTheConnectionEndsTheOldOne() {
        var r = Reservations(timeout: 600)
        r.open(instance: "a", uid: 33, connection: connection(1000), quota: quota, overQuota: .defer, now: 0)
        do { let ok = r.reserve(instance: "a", address: "x@r", written: "x@r", ifVersion: r.version(33)); #expect(ok) }
        // RSET, then MAIL again: Postfix gives the new transaction a new instance.
        let ended = r.open(instance: "a2", uid: 33, connection: connection(1000), quota: quota, overQuota: .defer, now: 5)
        #expect(ended.map(\.instance) == ["a"])
        #expect(r.held(uid: 33).isEmpty)
        #expect(r.count == 1)
    }

    @Test func commitKeepsAddressesHeldUntilFinished() throws {
        var r = Reservations(timeout: 600)
        r.open(instance: "a", uid: 33, connection: connection(1000), quota: quota, overQuota: .reject, now: 0)
        do { let ok = r.reserve(instance: "a", address: "x@r", written: "X@r", ifVersion: r.version(33)); #expect(ok) }
        r.allow(instance: "a", recipient: "friend@ok")
        let committed = r.commit(instance: "a")
        let t = try #require(committed)
        #expect(t.addresses == ["x@r"] && t.written["x@r"] == "X@r" && t.allowed == ["friend@ok"] && t.overQuota == .reject)
        #expect(r.held(uid: 33) == ["x@r"])
        // A committing transaction is neither expired nor offered to the dead-client sweep.
        do { let e = r.expire(now: 10_000); #expect(e.isEmpty) }
        #expect(r.open.isEmpty)
        do { let f = r.finish(instance: "a"); #expect(f?.instance == "a") }
        #expect(r.held(uid: 33).isEmpty)
        do { let c = r.commit(instance: "a"); #expect(c == nil) }
    }

    @Test func expiryWithAnInjectedClock() {
        var r = Reservations(timeout: 600)
        r.open(instance: "a", uid: 33, connection: connection(1000), quota: quota, overQuota: .defer, now: 100)
        do { let ok = r.reserve(instance: "a", address: "x@r", written: "x@r", ifVersion: r.version(33)); #expect(ok) }
        do { let e = r.expire(now: 699); #expect(e.isEmpty) }
        // Each RCPT refreshes the deadline.
        r.open(instance: "a", uid: 33, connection: connection(1000), quota: quota, overQuota: .defer, now: 650)
        do { let e = r.expire(now: 1249); #expect(e.isEmpty) }
        do { let e = r.expire(now: 1250); #expect(e.map(\.instance) == ["a"]) }
        #expect(r.held(uid: 33).isEmpty && r.count == 0)
    }

    @Test func theSameInstanceForAnotherUidStartsOver() {
        var r = Reservations(timeout: 600)
        r.open(instance: "a", uid: 33, connection: connection(1000), quota: quota, overQuota: .defer, now: 0)
        do { let ok = r.reserve(instance: "a", address: "x@r", written: "x@r", ifVersion: r.version(33)); #expect(ok) }
        let ended = r.open(instance: "a", uid: 34, connection: connection(1000), quota: quota, overQuota: .defer, now: 0)
        #expect(ended.map(\.uid) == [33])
        #expect(r.transaction("a")?.uid == 34 && r.held(uid: 33).isEmpty)
    }

    @Test func reservationsAcrossTransactionsNeverExceedTheLimit() {
        // Many transactions of one uid, each asking the store's arithmetic with what is held,
        // in an interleaving where every one reads before any reserves: only the version
        // check keeps them within the limit.
        var r = Reservations(timeout: 600)
        var counted: Set<String> = ["old@r"]
        var admitted = 0
        for i in 0..<10 { r.open(instance: "t\(i)", uid: 33, connection: connection(UInt16(2000 + i)), quota: quota, overQuota: .defer, now: 0) }
        var pending = (0..<10).map { i in (i, r.version(33), r.held(uid: 33)) }
        while !pending.isEmpty {
            let (i, version, held) = pending.removeFirst()
            let request = QuotaRequest(uid: 33, addresses: ["s\(i)@r"], quota: quota, now: 0, held: held, record: false)
            guard QuotaArithmetic.decide(request, counted: counted).0.admitted else { continue }
            if r.reserve(instance: "t\(i)", address: "s\(i)@r", written: "s\(i)@r", ifVersion: version) {
                admitted += 1
            } else {
                pending.append((i, r.version(33), r.held(uid: 33)))
            }
        }
        #expect(admitted == 2)
        #expect(r.held(uid: 33).count + counted.count == 3)
        counted.formUnion(r.held(uid: 33))
        #expect(counted.count == 3)
    }
}

@Suite struct SMTPDoorConfigTests {
    @Test func policyListenAndSMTPAuthenticated() throws {
        let c = try config("""
            policy_listen 127.0.0.1:10028
            policy_listen unix:/var/spool/postfix/private/restrictpd [::1]:10028
            smtp_authenticated judge
            policy_reservation_timeout 10m
            policy_max_connections 50
            """)
        #expect(c.policyListen == [.tcp(host: "127.0.0.1", port: 10028), .unix(path: "/var/spool/postfix/private/restrictpd"), .tcp(host: "::1", port: 10028)])
        #expect(c.smtpAuthenticated == .judge)
        #expect(c.value(.policyReservationTimeout) == 600)
        #expect(c.value(.policyMaxConnections) == 50)
        let d = try config("")
        #expect(d.policyListen.isEmpty && d.smtpAuthenticated == .trust && d.value(.policyReservationTimeout) == 1200)
    }

    @Test func badValuesNameTheirLine() {
        #expect(errors("policy_listen nowhere") == ["t.conf:1: bad policy_listen address 'nowhere': use HOST:PORT, [IPV6]:PORT or unix:/PATH"])
        #expect(errors("policy_listen") == ["t.conf:1: policy_listen needs HOST:PORT, [IPV6]:PORT or unix:/PATH"])
        #expect(errors("\nsmtp_authenticated maybe") == ["t.conf:2: smtp_authenticated takes 'trust' or 'judge'"])
        #expect(errors("smtp_authenticated trust\nsmtp_authenticated judge") == ["t.conf:2: smtp_authenticated given twice (first at line 1)"])
        #expect(errors("policy_reservation_timeout 10") == ["t.conf:1: policy_reservation_timeout 10 is out of range (60...86400 seconds)"])
    }
}

@Suite struct ReservationReleaseTests {
    @Test func releasingKeepsEarlierDecisionsValid() {
        // A reservation decided on a snapshot that still held another transaction's address is
        // within the limit after that transaction ends, committed or not: no new version.
        var r = Reservations(timeout: 600)
        let quota = Quota(limit: 2, period: .day)
        r.open(instance: "a", uid: 33, connection: connection(1000), quota: quota, overQuota: .defer, now: 0)
        r.open(instance: "b", uid: 33, connection: connection(1001), quota: quota, overQuota: .defer, now: 0)
        do { let ok = r.reserve(instance: "a", address: "x@r", written: "x@r", ifVersion: r.version(33)); #expect(ok) }
        let seen = r.version(33)
        r.finish(instance: "a")
        do { let ok = r.reserve(instance: "b", address: "y@r", written: "y@r", ifVersion: seen); #expect(ok) }
    }
}
