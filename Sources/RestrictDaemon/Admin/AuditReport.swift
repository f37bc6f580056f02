// restrictpd --audit: the checklist it prints. Each check is OK, WARN or FAIL, has a short
// name, a detail saying what was found, and for WARN and FAIL the change that fixes it. The
// text form is one line per check; the JSON form carries the same checks for monitoring.

public enum AuditStatus: String, Sendable, Equatable {
    case ok = "OK"
    case warn = "WARN"
    case fail = "FAIL"
}

public struct AuditCheck: Sendable, Equatable {
    public var name: String
    public var status: AuditStatus
    public var detail: String
    /// The change that makes this check pass; empty for OK.
    public var fix: String

    public init(_ name: String, _ status: AuditStatus, _ detail: String, fix: String = "") {
        self.name = name
        self.status = status
        self.detail = detail
        self.fix = fix
    }

    static func ok(_ name: String, _ detail: String) -> AuditCheck { AuditCheck(name, .ok, detail) }
    static func warn(_ name: String, _ detail: String, fix: String) -> AuditCheck { AuditCheck(name, .warn, detail, fix: fix) }
    static func fail(_ name: String, _ detail: String, fix: String) -> AuditCheck { AuditCheck(name, .fail, detail, fix: fix) }
}

public struct AuditReport: Sendable {
    public var checks: [AuditCheck] = []

    public init(checks: [AuditCheck] = []) { self.checks = checks }

    public var failed: Bool { self.checks.contains { $0.status == .fail } }

    /// "FAIL postfix.pickup-filter: detail -- fix: change": one line per check, the
    /// status padded so that the names line up.
    public var textLines: [String] {
        self.checks.map { c in
            var line = c.status.rawValue.padding(4) + " " + c.name + ": " + Self.oneLine(c.detail)
            if c.status != .ok, !c.fix.isEmpty { line += " -- fix: " + Self.oneLine(c.fix) }
            return line
        }
    }

    /// {"ok": BOOL, "checks": [{"name", "status", "detail", "fix"}, ...]} on one line.
    public var json: String {
        let items = self.checks.map { c in
            "{\"name\":\(JSONText.quote(c.name)),\"status\":\(JSONText.quote(c.status.rawValue)),"
                + "\"detail\":\(JSONText.quote(c.detail)),\"fix\":\(JSONText.quote(c.fix))}"
        }
        return "{\"ok\":\(self.failed ? "false" : "true"),\"checks\":[\(items.joined(separator: ","))]}"
    }

    /// Control characters (from file names or a server's greeting) never break the line.
    static func oneLine(_ s: String) -> String {
        String(String.UnicodeScalarView(s.unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7F ? " " : $0 }))
    }
}

extension String {
    /// The string padded with spaces on the right to `width` characters.
    func padding(_ width: Int) -> String {
        self.count >= width ? self : self + String(repeating: " ", count: width - self.count)
    }
}
