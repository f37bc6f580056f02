// The SMTP door's reservations and volume caps: recipients accepted at RCPT by open
// transactions are held against the caps until END-OF-MESSAGE spends or the end releases them.

import RestrictPolicy
import Testing

private func connection(_ port: UInt16) -> Reservations.Connection? {
    guard let local = HostAddress("127.0.0.1") else { return nil }
    return Reservations.Connection(clientAddress: local, clientPort: port, serverAddress: local, serverPort: 25)
}

@Suite struct ReservationCapsTests {
    @Test func acceptedRecipientsAreHeldVolume() throws {
        let caps = VolumeCaps(messages: VolumeCap(kind: .messages, limit: 2, period: .hour))
        var r = Reservations(timeout: 600)
        let (c1, c2) = (try #require(connection(1000)), try #require(connection(1001)))
        r.open(instance: "a", uid: 33, connection: c1, quota: nil, overQuota: .defer, now: 0)
        r.open(instance: "b", uid: 33, connection: c2, quota: nil, overQuota: .defer, now: 0)
        r.setCaps(instance: "a", caps: caps)
        // An open transaction with no recipient yet holds nothing.
        #expect(r.heldVolume(uid: 33) == .zero)
        let before = r.version(33)
        let accepted = r.accept(instance: "a", recipient: "w@ok", ifVersion: before)
        let stale = r.accept(instance: "b", recipient: "w@ok", ifVersion: before)
        #expect(accepted && !stale, "the version moved on")
        let reserved = r.reserve(instance: "a", address: "x@r", written: "x@r", ifVersion: r.version(33))
        #expect(reserved)
        #expect(r.transaction("a")?.accepted == 2)
        #expect(r.transaction("a")?.caps == caps)
        #expect(r.heldVolume(uid: 33) == HeldVolume(messages: 1, recipients: 2))
        #expect(r.heldVolume(uid: 33, excluding: "a") == .zero)
        // The store sees the held message: with one counted, a second transaction cannot start.
        let request = QuotaRequest(
            uid: 33, addresses: [], quota: nil, now: 0, record: false, caps: caps, recipients: 1,
            heldVolume: r.heldVolume(uid: 33, excluding: "b"))
        #expect(QuotaArithmetic.decideCaps(request, counted: [.messages: 1]).refused != nil)
        #expect(QuotaArithmetic.decideCaps(request, counted: [:]).refused == nil)
        // Finishing releases the volume; a decision read before it stays within the caps, so
        // the version (which sends a reservation back to the store) does not move.
        let version = r.version(33)
        r.finish(instance: "a")
        #expect(r.heldVolume(uid: 33) == .zero && r.version(33) == version)
    }
}
