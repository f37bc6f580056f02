// The deadlines of one session (restrictpd.conf(5): idle_timeout, command_timeout,
// data_timeout, relay_timeout). The session machine says which phase it is in and when it
// waits for the relay; a timer on the connection's event loop asks `check` what ran out.

import NIOCore
import SMTPCore

/// Deadlines of one session, checked by a timer on the client's event loop (ConnectionHandler).
final class SessionClock: Sendable {
    struct State {
        var lastActivity = NIODeadline.now()
        var phase = "command"
        var phaseDeadline: NIODeadline? = nil
        /// A phase whose deadline starts with the client's next bytes (a command: silence
        /// before it is idle_timeout's business, not command_timeout's).
        var pendingPhaseTimeout: TimeAmount? = nil
        var relayDeadline: NIODeadline? = nil
        var relayWaitStart: NIODeadline? = nil
        var relayChannel: (any Channel)? = nil
        var expired: String? = nil
    }
    enum Expiry { case client(String), relay }

    let state = Mutex(State())
    let idle: TimeAmount

    init(idle: TimeAmount) { self.idle = idle }

    func touch() { self.state.withLock { $0.lastActivity = .now() } }

    /// Bytes from the client: activity, and the start of a pending phase deadline.
    func clientBytes() {
        self.state.withLock { s in
            let now = NIODeadline.now()
            s.lastActivity = now
            if let pending = s.pendingPhaseTimeout {
                s.phaseDeadline = now + pending
                s.pendingPhaseTimeout = nil
            }
        }
    }

    /// A new phase whose deadline runs from now (DATA) or, with `fromFirstByte`, from the
    /// client's next bytes (a command).
    func phase(_ name: String, timeout: TimeAmount, fromFirstByte: Bool = false) {
        self.state.withLock {
            $0.phase = name
            $0.phaseDeadline = fromFirstByte ? nil : .now() + timeout
            $0.pendingPhaseTimeout = fromFirstByte ? timeout : nil
        }
    }

    /// While the session waits for the relay (bounded by relay_timeout), the client's idle and
    /// phase deadlines stand still: the client is waiting for us, not idling.
    func waitingForRelay(_ timeout: TimeAmount?) {
        self.state.withLock { s in
            let now = NIODeadline.now()
            s.relayDeadline = timeout.map { now + $0 }
            if timeout != nil {
                s.relayWaitStart = now
            } else if let start = s.relayWaitStart {
                s.relayWaitStart = nil
                s.phaseDeadline = s.phaseDeadline.map { $0 + (now - start) }
                s.lastActivity = max(s.lastActivity, now)
            }
        }
    }

    func relay(_ channel: (any Channel)?) { self.state.withLock { $0.relayChannel = channel } }

    var expired: String? { self.state.withLock { $0.expired } }

    /// What has run out, once.
    func check(now: NIODeadline) -> (Expiry, (any Channel)?)? {
        self.state.withLock { s in
            guard s.expired == nil else { return nil }
            if s.relayWaitStart == nil, now - s.lastActivity > self.idle {
                s.expired = "idle for \(self.idle.nanoseconds / 1_000_000_000)s in \(s.phase)"
                return (.client(s.expired ?? ""), s.relayChannel)
            }
            if s.relayWaitStart == nil, let d = s.phaseDeadline, now > d {
                s.expired = "\(s.phase) took too long"
                return (.client(s.expired ?? ""), s.relayChannel)
            }
            if let d = s.relayDeadline, now > d {
                s.relayDeadline = nil
                return (.relay, s.relayChannel)
            }
            return nil
        }
    }
}
