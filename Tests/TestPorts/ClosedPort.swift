// For the tests: a loopback TCP port on which nothing listens, held until the test ends.

#if canImport(Glibc)
import Glibc
#endif

/// A loopback port held by a socket bound to it that does not listen, until `release()`: a
/// connection there is refused, and no other test's listener can take the port meanwhile (a
/// port bound and closed at once could be taken, and the code under test would reach that
/// test's server).
public final class ClosedPort: Sendable {
    public let port: Int
    private let fd: Int32

    public struct Unavailable: Error, CustomStringConvertible {
        public var description: String { "no free loopback port" }
    }

    public init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = fd >= 0 && withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else {
            if fd >= 0 { close(fd) }
            throw Unavailable()
        }
        self.fd = fd
        self.port = Int(UInt16(bigEndian: address.sin_port))
    }

    public func release() { close(self.fd) }
}
