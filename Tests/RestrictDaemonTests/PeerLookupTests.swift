// The netlink lookup of a loopback peer's uid, with its per-thread cached socket: right
// answers many times over, no descriptor leaked per lookup, a miss does not poison the next
// answer, and threads do not see each other's answers.

import CRestrictSys
import Dispatch
import NIOCore
import NIOEmbedded
import Testing

@testable import RestrictDaemon

#if canImport(Glibc)
import Glibc
#endif

/// A connected loopback pair made with plain system calls: (client fd, server-side fd,
/// client address, server address).
private func loopbackPair() throws -> (Int32, Int32, SocketAddress, SocketAddress) {
    let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard listener >= 0 else { throw HarnessError("socket") }
    defer { close(listener) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, len) } }
    guard bound == 0, listen(listener, 4) == 0 else { throw HarnessError("bind/listen") }
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &len) } }
    let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    let connected = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, len) } }
    guard client >= 0, connected == 0 else { throw HarnessError("connect") }
    let server = accept(listener, nil, nil)
    guard server >= 0 else { throw HarnessError("accept") }
    var clientAddr = sockaddr_in()
    var clen = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &clientAddr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(client, $0, &clen) } }
    return (client, server, SocketAddress(clientAddr, host: "127.0.0.1"), SocketAddress(addr, host: "127.0.0.1"))
}

/// Runs `body` with the addresses of a fresh loopback pair, closed afterwards.
private func withLoopbackPair(_ body: (SocketAddress, SocketAddress) throws -> Void) throws {
    let (client, server, remote, local) = try loopbackPair()
    defer {
        close(client)
        close(server)
    }
    try body(remote, local)
}

@Suite("Peer lookup (netlink sock_diag)")
struct PeerLookupTests {
    @Test("500 lookups on one thread: always our uid, all through one cached socket")
    func repeatedLookups() throws {
        try withLoopbackPair { remote, local in
            try repeatedLookups(remote: remote, local: local)
        }
    }

    private func repeatedLookups(remote: SocketAddress, local: SocketAddress) throws {
        // The first lookup may open this thread's cached netlink socket.
        #expect(try PeerCredentials.tcpOwner(remote: remote, local: local) == getuid())
        let cached = crs_inet_diag_cached_fd()
        #expect(cached >= 0)
        for _ in 0..<500 {
            #expect(try PeerCredentials.tcpOwner(remote: remote, local: local) == getuid())
        }
        // The same socket served every lookup (none opened, none leaked).
        #expect(crs_inet_diag_cached_fd() == cached)
        #expect(fcntl(cached, F_GETFD) >= 0)
    }

    @Test("a miss is notFound, and the next lookup on the same socket still answers right")
    func missThenHit() throws {
        try withLoopbackPair { remote, local in
            try missThenHit(remote: remote, local: local)
        }
    }

    private func missThenHit(remote: SocketAddress, local: SocketAddress) throws {
        // A port nobody uses for this pair: the kernel finds no such established socket.
        guard case .v4(let a) = remote else { throw HarnessError("not v4") }
        var wrong = a.address
        wrong.sin_port = (UInt16(bigEndian: wrong.sin_port) &+ 1).bigEndian
        let missing = SocketAddress(wrong, host: "127.0.0.1")
        for _ in 0..<3 {
            #expect(throws: PeerLookupError.self) { try PeerCredentials.tcpOwner(remote: missing, local: local) }
            #expect(try PeerCredentials.tcpOwner(remote: remote, local: local) == getuid())
        }
    }

    @Test("four worker threads at once, each with its own connections: every answer is right")
    func threads() async throws {
        let failures = Mutex(0)
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<4 {
                group.addTask {
                    await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                        // Dispatch worker threads run the four at once, each thread with its
                        // own cached socket.
                        DispatchQueue.global().async {
                            for _ in 0..<50 {
                                guard let (client, server, remote, local) = try? loopbackPair() else {
                                    failures.withLock { $0 += 1 }
                                    continue
                                }
                                if (try? PeerCredentials.tcpOwner(remote: remote, local: local)) != getuid() {
                                    failures.withLock { $0 += 1 }
                                }
                                close(client)
                                close(server)
                            }
                            done.resume()
                        }
                    }
                }
            }
        }
        #expect(failures.withLock { $0 } == 0)
    }
}

@Suite("Client connection read hold-back")
struct ClientHoldBackTests {
    /// Counts the reads that reach the channel (the outbound `read` events past the handler).
    final class ReadCounter: ChannelOutboundHandler, @unchecked Sendable {
        typealias OutboundIn = ByteBuffer
        var reads = 0
        func read(context: ChannelHandlerContext) {
            self.reads += 1
            context.read()
        }
    }

    /// An embedded channel with a read counter in front of the client handler.
    private func pipeline() throws -> (EmbeddedChannel, ReadCounter, ClientHandler) {
        let channel = EmbeddedChannel()
        let counter = ReadCounter()
        let handler = ClientHandler()
        try channel.pipeline.syncOperations.addHandler(counter)
        try channel.pipeline.syncOperations.addHandler(handler)
        return (channel, counter, handler)
    }

    @Test("reads pass while nothing waits; one is held while a chunk waits, and released when it is taken")
    func holdBack() throws {
        let (channel, counter, handler) = try pipeline()

        channel.read()
        #expect(counter.reads == 1)
        try channel.writeInbound(ByteBuffer(string: "MAIL FROM:<a@b>\r\n"))
        // A chunk is waiting for the session: the next read is held back.
        channel.read()
        channel.read()
        #expect(counter.reads == 1)
        #expect(handler.take().map { String(buffer: $0) } == "MAIL FROM:<a@b>\r\n")
        // Taken: the held read goes through, once.
        #expect(counter.reads == 2)
        #expect(handler.take() == nil)
        channel.read()
        #expect(counter.reads == 3)
        _ = try channel.finish()
    }

    @Test("a reader waiting gets the chunk at once, and reading goes on")
    func waitingReader() throws {
        let (channel, counter, handler) = try pipeline()
        let next = handler.next(channel.eventLoop)
        try channel.writeInbound(ByteBuffer(string: "QUIT\r\n"))
        #expect(try next.wait().map { String(buffer: $0) } == "QUIT\r\n")
        channel.read()
        #expect(counter.reads >= 1)
        let before = counter.reads
        channel.read()
        #expect(counter.reads == before + 1)
        _ = try channel.finish()
    }
}
