// restrictpd --audit: Postfix's configuration as postconf(1) reports it. main.cf values come
// from `postconf -x` ($name expanded, defaults included), the defaults themselves from
// `postconf -d`, master.cf services from `postconf -M` and their -o overrides from
// `postconf -P -x`. A parameter's effective value for a service is its override, else
// main.cf's value, else the default.

import RestrictPolicy

/// One master.cf entry: "pickup unix n - y 60 1 pickup" and its -o overrides.
struct PostfixService: Sendable, Equatable {
    var name: String
    var type: String
    /// The program: the first word of the command field, without a directory ("smtpd",
    /// "pickup", "postscreen").
    var command: String
    var overrides: [String: String] = [:]

    var id: String { "\(self.name)/\(self.type)" }
}

struct PostfixConfig: Sendable {
    var main: [String: String] = [:]
    var defaults: [String: String] = [:]
    var services: [PostfixService] = []

    /// The value `parameter` has in `service`'s processes.
    func value(_ parameter: String, in service: PostfixService? = nil) -> String {
        service?.overrides[parameter] ?? self.main[parameter] ?? self.defaults[parameter] ?? ""
    }

    func service(_ name: String, type: String) -> PostfixService? {
        self.services.first { $0.name == name && $0.type == type }
    }
}

enum Postconf {
    static let paths = ["/usr/sbin/postconf", "/usr/bin/postconf"]

    /// Reads the instance in `configDir` (postconf -c), or the default one (MAIL_CONFIG or
    /// /etc/postfix) when nil.
    static func load(configDir: String?) -> Result<PostfixConfig, SystemError> {
        guard let postconf = AuditCommand.find(self.paths) else {
            return .failure(SystemError("postconf not found (\(self.paths.joined(separator: ", ")))", errno: 0))
        }
        let base = [postconf] + (configDir.map { ["-c", $0] } ?? [])
        var outputs: [String] = []
        for flags in [["-x"], ["-d"], ["-M"], ["-P", "-x"]] {
            switch AuditCommand.run(base + flags) {
            case .failure(let e): return .failure(e)
            case .success(let out):
                guard out.exitStatus == 0 else {
                    let why = out.text.split(separator: "\n").first.map(String.init) ?? "no output"
                    return .failure(SystemError("\((base + flags).joined(separator: " ")) failed: \(why)", errno: 0))
                }
                outputs.append(out.text)
            }
        }
        var config = PostfixConfig(main: parameters(outputs[0]), defaults: parameters(outputs[1]))
        config.services = services(outputs[2], overrides: outputs[3])
        return .success(config)
    }

    /// "name = value" lines; postconf's own warnings ("postconf: warning: ...") are skipped.
    static func parameters(_ text: String) -> [String: String] {
        var out: [String: String] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("postconf:") {
            guard let (key, value) = self.assignment(line) else { continue }
            out[key] = value
        }
        return out
    }

    static func assignment(_ line: Substring) -> (String, String)? {
        guard let eq = line.firstIndex(of: "=") else { return nil }
        let key = line[..<eq].trimmingCharacters(in: " \t")
        let value = line[line.index(after: eq)...].trimmingCharacters(in: " \t")
        return key.isEmpty || key.contains(" ") ? nil : (key, value)
    }

    /// `postconf -M` lines (one per service), with the overrides of `postconf -P`
    /// ("service/type/name = value").
    static func services(_ master: String, overrides: String) -> [PostfixService] {
        var list: [PostfixService] = []
        for line in master.split(separator: "\n") where !line.hasPrefix("postconf:") {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 8 else { continue }
            let program = fields[7].split(separator: "/").last ?? fields[7]
            list.append(PostfixService(name: String(fields[0]), type: String(fields[1]), command: String(program)))
        }
        for line in overrides.split(separator: "\n") where !line.hasPrefix("postconf:") {
            guard let (key, value) = self.assignment(line) else { continue }
            let parts = key.split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count >= 3 else { continue }
            let name = parts.dropLast(2).joined(separator: "/")
            let type = String(parts[parts.count - 2])
            guard let i = list.firstIndex(where: { $0.name == name && $0.type == type }) else { continue }
            list[i].overrides[String(parts[parts.count - 1])] = value
        }
        return list
    }
}

/// Postfix's list syntax: items separated by commas and white space; "{ ... }" is one item.
enum PostfixList {
    static func items(_ value: String) -> [String] {
        var items: [String] = []
        var current = ""
        var depth = 0
        for c in value {
            if c == "{" { depth += 1 }
            if c == "}" { depth = max(0, depth - 1) }
            if depth == 0, c == "," || c == " " || c == "\t" || c == "\n" {
                if !current.isEmpty { items.append(current) }
                current = ""
            } else {
                current.append(c)
            }
        }
        if !current.isEmpty { items.append(current) }
        return items
    }

    /// The server an item after "check_policy_service" names: "inet:127.0.0.1:10028", or the
    /// first word of the braced form "{ inet:127.0.0.1:10028, timeout=10s }".
    static func policyServer(_ item: String) -> String {
        guard item.hasPrefix("{") else { return item }
        let inner = item.dropFirst().trimmingCharacters(in: "} \t")
        return self.items(inner).first ?? ""
    }
}

extension StringProtocol {
    /// The text without leading and trailing characters from `set`.
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let c = s.first, set.contains(c) { s = s.dropFirst() }
        while let c = s.last, set.contains(c) { s = s.dropLast() }
        return String(s)
    }
}
