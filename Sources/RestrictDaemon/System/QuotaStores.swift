// Which quota store the configuration names, and how to open it: the embedded SQLite file (the
// default), or PostgreSQL (`state postgresql://...`), shared by the hosts of a farm.

import Logging
import QuotaStore
import QuotaStorePostgres
import RestrictPolicy

#if canImport(Glibc)
import Glibc
#endif

enum QuotaStores {
    /// gethostname(2): the default scope, so hosts share nothing unless told to.
    static func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
        let name = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return name.isEmpty ? "localhost" : name
    }

    static func scope(_ configuration: Configuration) -> String { configuration.scope ?? self.hostName() }

    /// The first line of `state_password_file` (read as root, before privileges are dropped);
    /// nil without the setting.
    static func password(_ configuration: Configuration) throws -> String? {
        guard let path = configuration.statePasswordFile else { return nil }
        let text = try SystemFiles.readText(path, limit: 4096)
        let line = text.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        return String(line.hasSuffix("\r") ? line.dropLast() : line)
    }

    static func postgresSettings(_ configuration: Configuration, password: String?) -> PostgresStoreSettings? {
        guard let location = configuration.statePostgres else { return nil }
        return PostgresStoreSettings(
            location: location, password: password, scope: self.scope(configuration),
            timeout: configuration.value(.stateTimeout), pool: configuration.value(.statePool))
    }

    /// The daemon's store and its part of STATUS=. A store that cannot be used yet is logged,
    /// and quota decisions are deferred with 451 4.3.0 until it can.
    static func open(_ configuration: Configuration, password: String?, logger: Logger) async -> (any QuotaStore, @Sendable () -> String) {
        guard let settings = self.postgresSettings(configuration, password: password) else {
            let store = LazyQuotaStore(path: configuration.statePath, logger: logger)
            do {
                _ = try store.open()
            } catch {
                logger.error("quota database \(configuration.statePath) unavailable (quota decisions will be deferred with 451 4.3.0 until it opens): \(error)")
            }
            return (store, { "store=sqlite" })
        }
        let store = PostgresQuotaStore(settings: settings, logger: logger)
        store.start()
        if let why = await store.check() {
            logger.error("\(why) (quota decisions will be deferred with 451 4.3.0 until this is fixed)")
        } else {
            logger.info("quota store \(store.location), scope \(settings.scope): schema version \(PostgresQuotaStore.schemaVersion)")
        }
        return (store, { store.status })
    }
}
