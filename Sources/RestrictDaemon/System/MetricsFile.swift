// metrics_file: the daemon's counters in the Prometheus text format, for node_exporter's
// textfile collector. The counters go through swift-metrics (MetricsSystem, bootstrapped
// with swift-prometheus's factory), and swift-prometheus renders the exposition; the file is
// written whole to a temporary name and renamed, so a reader never sees half of it. No
// network listener.

import Glibc
import Metrics
import Prometheus
import RestrictPolicy

final class MetricsFile: Sendable {
    let path: String
    /// How often the file is written, in seconds.
    static let interval: UInt64 = 30

    /// The process's registry: MetricsSystem can be bootstrapped only once, so the first
    /// MetricsFile does it (a static let is initialized once, thread-safely).
    private static let registry: PrometheusCollectorRegistry = {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        return registry
    }()

    private var registry: PrometheusCollectorRegistry { Self.registry }

    init(path: String) {
        self.path = path
        _ = Self.registry
    }

    /// One message decided (counted as the statistics count it).
    func message(uid: UInt32, user: String?, verdict: Verdict.Kind) {
        Counter(label: "restrictpd_messages_total", dimensions: [("user", user ?? ""), ("uid", String(uid)), ("verdict", verdict.rawValue)])
            .increment()
    }

    /// What is left of a uid's quota or cap after its last decision ("17/20 per day").
    func remaining(uid: UInt32, user: String?, kind: String, figure: String?) {
        guard let figure, let slash = figure.firstIndex(of: "/"), let left = Int(figure[..<slash]) else { return }
        Gauge(label: "restrictpd_quota_remaining", dimensions: [("user", user ?? ""), ("uid", String(uid)), ("kind", kind)])
            .record(left)
    }

    /// The gauges of the daemon as a whole.
    func gauges(_ counters: Counters, reservations: Int) {
        Gauge(label: "restrictpd_sessions").record(counters.sessions)
        Gauge(label: "restrictpd_policy_transactions").record(reservations)
        Gauge(label: "restrictpd_peers_refused").record(counters.peersRefused)
    }

    /// Writes the exposition to `path` through a temporary file in the same directory.
    func write() throws {
        let bytes = self.registry.emitToBuffer()
        let temporary = self.path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SystemError("open \(temporary)") }
        var written = 0
        while written < bytes.count {
            let n = bytes[written...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else {
                close(fd)
                throw SystemError("write \(temporary)")
            }
            written += n
        }
        guard close(fd) == 0 else { throw SystemError("close \(temporary)") }
        guard rename(temporary, self.path) == 0 else { throw SystemError("rename \(temporary) to \(self.path)") }
    }
}
