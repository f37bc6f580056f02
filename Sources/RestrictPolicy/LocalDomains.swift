// `allow local`: the domains Postfix delivers itself, as `postconf -h -x` prints them:
// mydestination, virtual_mailbox_domains, virtual_alias_domains (relay_domains is mail
// Postfix passes on, not its own). Pure: the daemon runs postconf and hands the text here.

public enum LocalDomains {
    /// The parameters read, in the order postconf is asked for them.
    public static let parameters = ["mydestination", "virtual_mailbox_domains", "virtual_alias_domains"]

    /// The domains in postconf's output (one line per parameter, values separated by
    /// commas or white space), lower-cased. Lookup tables ("hash:/etc/postfix/domains") and
    /// pattern files ("/etc/postfix/domains") cannot be listed: they are returned in
    /// `skipped`, for a warning, and match nothing.
    public static func parse(_ text: String) -> (domains: Set<String>, skipped: [String]) {
        var domains = Set<String>()
        var skipped: [String] = []
        for line in text.split(whereSeparator: \.isNewline) where !line.hasPrefix("postconf: ") {
            for word in line.split(whereSeparator: { $0 == "," || $0 == " " || $0 == "\t" }) {
                var entry = word.lowercased()
                if entry.hasSuffix(".") { entry.removeLast() }
                if entry.contains(":") || entry.hasPrefix("/") || !ConfigParser.isDomain(entry) {
                    skipped.append(String(word))
                    continue
                }
                domains.insert(entry)
            }
        }
        return (domains, skipped)
    }
}
