// The admin's commands against a PostgreSQL quota store (`state postgresql://...`), and
// --init-store for either store. Each command opens one connection of its own, within
// `state_timeout`, and says plainly what is wrong: a wrong password, no schema, a newer schema.

import Dispatch
import Logging
import QuotaStore
import QuotaStorePostgres
import RestrictPolicy

extension Admin {
    /// Runs async work from the synchronous command line and waits for it.
    static func blocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) -> Result<T, any Error> {
        let result = Mutex<Result<T, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Task.detached {
            let r: Result<T, any Error>
            do { r = .success(try await body()) } catch { r = .failure(error) }
            result.withLock { $0 = r }
            done.signal()
        }
        done.wait()
        return result.withLock { $0 } ?? .failure(SystemError("the operation did not finish"))
    }

    /// The configuration's PostgreSQL store (nil for SQLite), or a failure in `out`.
    static func postgresStore(_ configuration: Configuration, into out: inout AdminOutput) -> Result<PostgresQuotaStore?, AdminFailed> {
        guard configuration.statePostgres != nil else { return .success(nil) }
        let password: String?
        do {
            password = try QuotaStores.password(configuration)
        } catch {
            out.stderr.append("restrictpd: state_password_file: \(error)")
            out.status = 1
            return .failure(AdminFailed())
        }
        guard let settings = QuotaStores.postgresSettings(configuration, password: password) else { return .success(nil) }
        return .success(PostgresQuotaStore(settings: settings, logger: .init(label: "restrictpd-admin", factory: { _ in SwiftLogNoOpLogHandler() })))
    }

    struct AdminFailed: Error {}

    /// Appends the error of `result` to `out` (status 1); the value otherwise.
    static func value<T>(_ result: Result<T, any Error>, into out: inout AdminOutput) -> T? {
        switch result {
        case .success(let v): return v
        case .failure(let error):
            out.stderr.append("restrictpd: \(error)")
            out.status = 1
            return nil
        }
    }

    /// --check-config's lines about a PostgreSQL store: reachable, the password right, the schema this build's.
    static func checkStore(_ configuration: Configuration, path: String, into out: inout AdminOutput) {
        guard case .success(let store?) = self.postgresStore(configuration, into: &out) else { return }
        let why: String?
        switch self.blocking({ await store.check() }) {
        case .success(nil): why = nil
        case .success(let error?): why = "\(error)"
        case .failure(let error): why = "\(error)"
        }
        if let why {
            out.stderr.append("\(path): \(why)")
            out.status = 1
            return
        }
        out.stdout.append("\(path): quota store \(store.location), scope \(store.settings.scope): OK, schema version \(PostgresQuotaStore.schemaVersion)")
    }

    /// --init-store: creates or upgrades the quota store's schema (a PostgreSQL database), or
    /// creates the SQLite file with its schema.
    public static func initStore(configPath: String) -> AdminOutput {
        var out = AdminOutput()
        guard let configuration = load(configPath, into: &out) else { return out }
        switch self.postgresStore(configuration, into: &out) {
        case .failure: return out
        case .success(let store?):
            guard let (from, to) = self.value(self.blocking({ try await store.initialize() }), into: &out) else { return out }
            let what = from == to ? "already at schema version \(to)" : from == 0 ? "schema version \(to) created" : "schema upgraded from version \(from) to \(to)"
            out.stdout.append("quota store \(store.location): \(what)")
        case .success(nil):
            let path = configuration.statePath
            // A new file must belong to the service user, who owns the state directory.
            let owner = SystemFiles.exists(path) ? path : String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
            guard becomeOwner(of: owner.isEmpty ? "/" : owner, into: &out) else { return out }
            do {
                let db = try QuotaDatabase(path: path)
                db.close()
                out.stdout.append("quota database \(path): schema version \(QuotaDatabase.schemaVersion)")
            } catch {
                out.stderr.append("restrictpd: \(error)")
                out.status = 1
            }
        }
        return out
    }
}
