// `allow local`: the domains Postfix delivers itself, read with `postconf -h -x` (of the
// instance in `postconf_dir`, or the default one) when the configuration is loaded, at start
// and on reload, never on an event loop. When postconf cannot answer, `local` matches
// nothing and a warning says so: it never matches everything.

import Logging
import RestrictPolicy

enum PostfixDomains {
    /// The local domains for `configuration`; empty (without running postconf) when no rule
    /// says `allow local`.
    static func read(for configuration: Configuration, logger: Logger) -> Set<String> {
        guard configuration.usesLocalDomains else { return [] }
        guard let postconf = AuditCommand.find(Postconf.paths) else {
            logger.warning("allow local matches nothing: postconf not found (\(Postconf.paths.joined(separator: ", ")))")
            return []
        }
        let argv = [postconf] + (configuration.postconfDir.map { ["-c", $0] } ?? []) + ["-h", "-x"] + LocalDomains.parameters
        switch AuditCommand.run(argv, timeoutMS: 10_000, cap: 1 << 20) {
        case .failure(let error):
            logger.warning("allow local matches nothing: \(argv.joined(separator: " ")): \(error)")
            return []
        case .success(let out):
            guard out.exitStatus == 0 else {
                let why = out.text.split(separator: "\n").first.map(String.init) ?? "no output"
                logger.warning("allow local matches nothing: \(argv.joined(separator: " ")) failed: \(why)")
                return []
            }
            let (domains, skipped) = LocalDomains.parse(out.text)
            if !skipped.isEmpty {
                logger.warning("allow local: cannot list \(skipped.joined(separator: ", ")) (lookup tables and pattern files match nothing)")
            }
            logger.info("allow local: \(domains.count) domains Postfix delivers itself: \(domains.sorted().prefix(20).joined(separator: ", "))")
            return domains
        }
    }
}
