// restrictpd.conf(5) rules for many users: `group NAME|GID`, `uid FROM-TO`, and `shared`
// inside them; the checks that keep their precedence unambiguous.

/// Looks up local groups; the daemon passes getgrnam(3), tests pass a table.
public struct GroupResolver: Sendable {
    public let gid: @Sendable (String) -> UInt32?
    public init(gid: @escaping @Sendable (String) -> UInt32?) { self.gid = gid }

    /// Numeric GIDs only.
    public static let numericOnly = GroupResolver { _ in nil }
}

/// A local user as the ambiguity check sees it: its uid and every group it is in.
public struct GroupMember: Sendable, Equatable {
    public let name: String
    public let uid: UInt32
    public let groups: [UInt32]

    public init(name: String, uid: UInt32, groups: [UInt32]) {
        self.name = name
        self.uid = uid
        self.groups = groups
    }
}

extension ConfigParser {
    /// The rule a `group` or `uid` line starts, or the error message.
    static func parseManyRule(_ key: String, _ args: [String], line: Int, groups: GroupResolver) -> Result<Rule, PatternError> {
        guard args.count == 1 else {
            return .failure(.init(key == "group" ? "group takes one group name or GID" : "uid takes a range FROM-TO"))
        }
        let word = args[0]
        if key == "group" {
            if let gid = numericID(word) { return .success(Rule(selector: .group(gid: gid), line: line)) }
            guard let gid = groups.gid(word) else { return .failure(.init("unknown group '\(word)'")) }
            var rule = Rule(selector: .group(gid: gid), line: line)
            rule.groupName = word
            return .success(rule)
        }
        let parts = word.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, let from = numericID(String(parts[0])), let to = numericID(String(parts[1])), from <= to else {
            return .failure(.init("bad uid range '\(word)': use FROM-TO with FROM <= TO"))
        }
        return .success(Rule(selector: .uidRange(from: from, to: to), line: line))
    }

    /// A decimal uid or gid below 2^32 - 1.
    static func numericID(_ word: String) -> UInt32? {
        guard !word.isEmpty, word.count <= 10, word.allSatisfy({ $0.isASCII && $0.isNumber }), let n = UInt64(word),
            n < UInt64(UInt32.max)
        else { return nil }
        return UInt32(n)
    }

    /// `shared`: only in a group or uid range rule.
    static func parseShared(_ args: [String], into rule: inout Rule) -> String? {
        guard args.isEmpty else { return "shared takes no arguments" }
        switch rule.selector {
        case .group, .uidRange:
            rule.shared = true
            return nil
        case .user, .default, .unknown:
            return "shared belongs in a 'group' or 'uid' rule"
        }
    }

    /// Overlapping `uid` ranges: each named with the line of the range it overlaps.
    static func overlappingRanges(_ rules: [Rule], file: String) -> [ConfigError] {
        var errors: [ConfigError] = []
        var seen: [(from: UInt32, to: UInt32, line: Int)] = []
        for rule in rules {
            guard case .uidRange(let from, let to) = rule.selector else { continue }
            if let other = seen.first(where: { $0.from <= to && from <= $0.to }) {
                errors.append(ConfigError(
                    file: file, line: rule.line,
                    message: "uid range \(from)-\(to) overlaps uid range \(other.from)-\(other.to) at line \(other.line)"))
            }
            seen.append((from, to, rule.line))
        }
        return errors
    }

    /// Users that two `group` rules would both cover, with no `user` rule or `uid` range to
    /// decide between them: one error per pair of rules, at the later rule's line, naming
    /// the first such user.
    public static func ambiguousGroups(_ config: Configuration, members: [GroupMember], file: String) -> [ConfigError] {
        let groupRules = config.rules.filter { if case .group = $0.selector { return true } else { return false } }
        guard groupRules.count > 1 else { return [] }
        let policy = Policy(config)
        var reported = Set<[Int]>()
        var errors: [ConfigError] = []
        for member in members where policy.ruleBeforeGroups(uid: member.uid) == nil {
            let mine = groupRules.filter { rule in
                if case .group(let gid) = rule.selector { return member.groups.contains(gid) } else { return false }
            }
            guard mine.count > 1 else { continue }
            let (first, second) = (mine[0], mine[1])
            guard reported.insert([first.line, second.line]).inserted else { continue }
            errors.append(ConfigError(
                file: file, line: second.line,
                message: "ambiguous group rules: user \(member.name) (uid \(member.uid)) is in \(first.selector) (line \(first.line)) and \(second.selector) (line \(second.line)); give it a 'user' rule"))
        }
        return errors
    }
}
