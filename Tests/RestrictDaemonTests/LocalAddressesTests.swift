// The policy service's test of "is this client on this host?": loopback always, an interface's
// address once read, re-read at most once a second, and no answer when nothing can be read.

import NIOCore
import RestrictPolicy
import Synchronization
import Testing

@testable import RestrictDaemon

@Suite struct LocalAddressesTests {
    /// A reader that returns what the test sets and counts its calls.
    final class Interfaces: Sendable {
        let state = Mutex<(addresses: Set<HostAddress>?, reads: Int)>((nil, 0))
        func set(_ addresses: [String]?) {
            let parsed = addresses.map { Set($0.compactMap { HostAddress($0) }) }
            self.state.withLock { $0.addresses = parsed }
        }
        var reads: Int { self.state.withLock { $0.reads } }
        var reader: @Sendable () -> Set<HostAddress>? {
            { self.state.withLock { $0.reads += 1; return $0.addresses } }
        }
    }

    func address(_ text: String) throws -> HostAddress { try #require(HostAddress(text)) }

    @Test func loopbackIsLocalWithoutReadingTheInterfaces() throws {
        let interfaces = Interfaces()
        let local = LocalAddresses(reader: interfaces.reader)
        #expect(local.contains(try self.address("127.0.0.1")) == true)
        #expect(local.contains(try self.address("127.8.9.10")) == true)
        #expect(local.contains(try self.address("::1")) == true)
        #expect(local.contains(try self.address("::ffff:127.0.0.1")) == true)
        #expect(interfaces.reads == 0)
    }

    @Test func anInterfaceAddressIsLocalInBothFamiliesAndMapped() throws {
        let interfaces = Interfaces()
        interfaces.set(["198.51.100.7", "2001:db8::7"])
        let local = LocalAddresses(reader: interfaces.reader)
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)
        #expect(local.contains(try self.address("198.51.100.7"), now: t0) == true)
        #expect(local.contains(try self.address("::ffff:198.51.100.7"), now: t0) == true)
        #expect(local.contains(try self.address("2001:db8::7"), now: t0) == true)
        #expect(local.contains(try self.address("198.51.100.8"), now: t0) == false)
        #expect(local.contains(try self.address("2001:db8::8"), now: t0) == false)
        #expect(interfaces.reads == 1)
    }

    @Test func aNewAddressCountsAfterAtMostASecond() throws {
        let interfaces = Interfaces()
        interfaces.set(["198.51.100.7"])
        let local = LocalAddresses(reader: interfaces.reader)
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)
        let remote = try self.address("198.51.100.9")
        #expect(local.contains(remote, now: t0) == false)
        interfaces.set(["198.51.100.7", "198.51.100.9"])
        // Within the second a flood of unknown addresses costs no read.
        for _ in 0..<100 { #expect(local.contains(remote, now: t0 + .milliseconds(500)) == false) }
        #expect(interfaces.reads == 1)
        #expect(local.contains(remote, now: t0 + .milliseconds(1001)) == true)
        #expect(interfaces.reads == 2)
    }

    @Test func unreadableInterfacesGiveNoAnswerExceptForLoopback() throws {
        let interfaces = Interfaces()
        let local = LocalAddresses(reader: interfaces.reader)
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)
        #expect(local.contains(try self.address("198.51.100.7"), now: t0) == nil)
        #expect(local.contains(try self.address("198.51.100.7"), now: t0 + .milliseconds(10)) == nil)
        #expect(local.contains(try self.address("127.0.0.1"), now: t0) == true)
        interfaces.set(["198.51.100.7"])
        #expect(local.contains(try self.address("198.51.100.7"), now: t0 + .seconds(2)) == true)
    }

    @Test func thisHostsOwnInterfacesAreRead() throws {
        let mine = try #require(LocalAddresses.read())
        #expect(mine.contains(try self.address("127.0.0.1")))
    }
}
