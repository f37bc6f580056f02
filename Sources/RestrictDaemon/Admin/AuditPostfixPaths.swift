// restrictpd --audit: what happens to local mail before restrictpd sees it (header_checks
// and milters in pickup's cleanup), who may submit and choose a sender, and which smtpd
// services relay for local clients without asking restrictpd's policy service.

import RestrictPolicy

extension PostfixAudit {
    /// The cleanup service pickup hands mail to.
    var pickupCleanup: PostfixService? {
        let pickup = self.postfix.service("pickup", type: "unix")
        let name = self.postfix.value("cleanup_service_name", in: pickup)
        return self.postfix.service(name.isEmpty ? "cleanup" : name, type: "unix")
    }

    /// restrictpd reads the sender's uid from the first header, which pickup's cleanup writes.
    /// A header_checks PREPEND puts a header above it (the mail becomes "unknown"); a REPLACE
    /// could rewrite it; a milter may insert headers anywhere.
    func pickupHeaders() -> [AuditCheck] {
        let cleanup = self.pickupCleanup
        // pickup's receive_override_options can switch both off for the mail it picks up.
        let pickup = self.postfix.service("pickup", type: "unix")
        let overrides = Set(PostfixList.items(self.postfix.value("receive_override_options", in: pickup)))
        var checks: [AuditCheck] = []
        if overrides.contains("no_header_body_checks") {
            checks.append(.ok("postfix.header-checks", "pickup has receive_override_options=no_header_body_checks: no header_checks apply to local mail"))
        } else {
            checks.append(self.headerChecks(self.headerMaps(cleanup), cleanup: cleanup?.id ?? "cleanup/unix"))
        }
        if overrides.contains("no_milters") {
            checks.append(.ok("postfix.milters", "pickup has receive_override_options=no_milters: no milter sees local mail"))
        } else {
            checks.append(self.milters(cleanup))
        }
        return checks
    }

    /// The header tables `cleanup` applies, each once.
    func headerMaps(_ cleanup: PostfixService?) -> [String] {
        var maps: [String] = []
        for parameter in ["header_checks", "mime_header_checks", "milter_header_checks"] {
            for map in PostfixList.items(self.postfix.value(parameter, in: cleanup)) where !maps.contains(map) { maps.append(map) }
        }
        return maps
    }

    func headerChecks(_ maps: [String], cleanup: String) -> AuditCheck {
        let fix = "remove the PREPEND lines, or keep header_checks off local mail: \"-o receive_override_options=no_header_body_checks\" on pickup in master.cf"
        return Self.headerTables("postfix.header-checks", maps, parameter: "header_checks", place: "\(cleanup), pickup's cleanup", fix: fix)
    }

    /// The verdict on header tables that act on local mail before restrictpd reads pickup's
    /// header: a PREPEND fails, a REPLACE or a table that cannot be read warns.
    static func headerTables(_ name: String, _ maps: [String], parameter: String, place: String, fix: String) -> AuditCheck {
        guard !maps.isEmpty else { return .ok(name, "no \(parameter) in \(place)") }
        var prepends: [String] = [], replaces: [String] = [], unreadable: [String] = []
        for map in maps {
            switch HeaderMap.actions(map) {
            case .none: unreadable.append(map)
            case .some(let actions):
                if actions.contains("PREPEND") { prepends.append(map) }
                if actions.contains("REPLACE") { replaces.append(map) }
            }
        }
        if !prepends.isEmpty {
            return .fail(name, "\(prepends.joined(separator: " ")) PREPENDs headers in \(place): a header above pickup's turns local mail into \"unknown\"", fix: fix)
        }
        if !replaces.isEmpty || !unreadable.isEmpty {
            let what = replaces.map { "\($0) REPLACEs headers" } + unreadable.map { "\($0) cannot be read here" }
            return .warn(name, what.joined(separator: "; ") + " (\(place)): make sure nothing rewrites or precedes pickup's Received: header", fix: fix)
        }
        return .ok(name, "\(maps.joined(separator: " ")) in \(place) neither PREPENDs nor REPLACEs")
    }

    /// A milter on locally submitted mail can insert a header above pickup's (a DKIM signer
    /// does): the audit cannot tell what it does, so it warns.
    func milters(_ cleanup: PostfixService?) -> AuditCheck {
        let milters = self.postfix.value("non_smtpd_milters", in: cleanup)
        guard !milters.isEmpty else { return .ok("postfix.milters", "no non_smtpd_milters on local mail") }
        return .warn("postfix.milters", "non_smtpd_milters=\(milters) sees local mail before restrictpd and may insert a header above pickup's (restrictpd then treats it as \"unknown\")",
                     fix: "make sure the milter only appends headers, or move it after the reinjection smtpd (-o non_smtpd_milters= on pickup's cleanup)")
    }

    /// Bounces bypass restrictpd: without local_login_sender_maps any local user can choose
    /// the envelope sender and aim a bounce at a stranger.
    func loginSenderMaps() -> AuditCheck {
        let value = self.postfix.value("local_login_sender_maps")
        guard !value.isEmpty, value != "static:*" else {
            return .fail("postfix.login-sender-maps", "local_login_sender_maps=\(value.isEmpty ? "(empty)" : value): any local user may choose any envelope sender (bounces of refused mail go to it, past restrictpd)",
                         fix: "set local_login_sender_maps as in \(SystemAudit.examples)/postfix/main.cf.restrictpd, then postfix reload")
        }
        return .ok("postfix.login-sender-maps", "local_login_sender_maps=\(value)")
    }

    /// Reported, not judged: restrictpd is there to judge every submitter, so "everyone may
    /// submit" is the expected setting; a narrower list is a further wall.
    func submitUsers() -> AuditCheck {
        let value = self.postfix.value("authorized_submit_users")
        let meaning = value == "static:anyone" ? "every local user may submit with sendmail(1); restrictpd judges each" : "only users matched by it may submit with sendmail(1)"
        return .ok("postfix.submit-users", "authorized_submit_users=\(value.isEmpty ? "(empty: nobody)" : value): \(meaning)")
    }
}

/// The actions a header_checks table uses.
enum HeaderMap {
    /// "PREPEND", "REPLACE", ... found in `map`'s source, or nil when it cannot be read here
    /// (a database without its source file, ldap:, mysql:, ...).
    static func actions(_ map: String) -> Set<String>? {
        var spec = map
        while spec.hasPrefix("proxy:") { spec = String(spec.dropFirst(6)) }
        guard let colon = spec.firstIndex(of: ":") else { return nil }
        let type = String(spec[..<colon])
        let rest = String(spec[spec.index(after: colon)...])
        let text: String
        switch type {
        case "inline", "static": text = rest
        case "regexp", "pcre", "texthash", "hash", "btree", "lmdb", "cdb", "dbm", "sdbm":
            guard let t = try? SystemFiles.readText(rest, limit: 4 << 20) else { return nil }
            text = t
        default: return nil
        }
        var found = Set<String>()
        for line in text.split(whereSeparator: { $0 == "\n" }) where !line.trimmingCharacters(in: " \t").hasPrefix("#") {
            for word in line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "=" || $0 == "," || $0 == "{" }) {
                let w = word.uppercased()
                if w == "PREPEND" || w == "REPLACE" { found.insert(w) }
            }
        }
        return found
    }
}
