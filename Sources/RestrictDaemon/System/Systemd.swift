// systemd integration through libsystemd itself: sd_notify (READY, RELOADING, STOPPING,
// STATUS, WATCHDOG), sd_listen_fds_with_names (socket activation) and sd_watchdog_enabled.
// Without systemd every call is a no-op (sd_notify returns 0 when NOTIFY_SOCKET is unset).

import CSystemd

#if canImport(Glibc)
import Glibc
#endif

public enum Systemd {
    /// Sends one notification ("READY=1\nSTATUS=..."). Returns false when nobody listens.
    @discardableResult
    public static func notify(_ state: String) -> Bool {
        sd_notify(0, state) > 0
    }

    /// Status lines are built from our own counters only; newlines would start a new field.
    public static func status(_ text: String) {
        notify("STATUS=" + text.replacingNewlines())
    }

    /// The watchdog interval systemd asked for (WatchdogSec), or nil.
    public static func watchdogInterval() -> UInt64? {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return nil }
        return usec
    }

    public struct ListenSocket: Sendable {
        public let fd: Int32
        public let name: String
    }

    /// Sockets passed by systemd (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES). The environment
    /// variables are unset afterwards so a child process would not inherit them.
    public static func listenSockets() -> [ListenSocket] {
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = nil
        let n = sd_listen_fds_with_names(1, &names)
        guard n > 0 else { return [] }
        var result: [ListenSocket] = []
        for i in 0..<Int(n) {
            var name = "unknown"
            if let names, let p = names[i] {
                name = String(cString: p)
                free(p)
            }
            result.append(ListenSocket(fd: SD_LISTEN_FDS_START + Int32(i), name: name))
        }
        free(names)
        return result
    }

    /// True when the fd is a listening stream socket (systemd may also pass other kinds).
    public static func isListeningStream(_ fd: Int32) -> Bool {
        sd_is_socket(fd, AF_UNSPEC, Int32(SOCK_STREAM.rawValue), 1) > 0
    }
}
