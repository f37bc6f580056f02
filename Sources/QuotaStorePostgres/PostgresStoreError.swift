// What can go wrong with the PostgreSQL quota store, in words an admin can act on. Every error
// reaches the daemon as a thrown error, which it answers with 451 4.3.0: never a relay.

import PostgresNIO
public import RestrictPolicy

/// How to reach a PostgreSQL quota store, as the configuration and the password file give it.
public struct PostgresStoreSettings: Sendable {
    public var location: PostgresLocation
    /// From `state_password_file`; nil: no password (trust or peer authentication).
    public var password: String?
    /// The farm key: rows are counted per (scope, uid).
    public var scope: String
    /// Seconds a decision, connecting included, may take.
    public var timeout: Int
    /// The most connections this process opens.
    public var pool: Int

    public init(location: PostgresLocation, password: String?, scope: String, timeout: Int, pool: Int) {
        self.location = location
        self.password = password
        self.scope = scope
        self.timeout = timeout
        self.pool = pool
    }
}

/// The PostgreSQL quota store could not answer.
public struct PostgresStoreError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        /// No schema: `restrictpd --init-store` has not been run.
        case schemaMissing
        /// A schema this restrictpd does not know (written by a newer one).
        case schemaNewer
        /// An older schema: `restrictpd --init-store` upgrades it.
        case schemaOlder
        /// No answer within `state_timeout`.
        case timeout
        /// The server refused (authentication, permissions, a failed statement).
        case server
        /// No connection (refused, closed, TLS).
        case connection
    }

    public let kind: Kind
    /// The redacted URI of the store.
    public let location: String
    public let message: String

    public init(_ kind: Kind, location: String, message: String) {
        self.kind = kind
        self.location = location
        self.message = message
    }

    public var description: String { "quota store \(self.location): \(self.message)" }

    /// Wraps any error from postgres-nio in words, never with the query's parameters.
    static func wrap(_ error: any Error, location: String, operation: String) -> PostgresStoreError {
        if let own = error as? PostgresStoreError { return own }
        if let answer = error as? PostgresAnswerError {
            return PostgresStoreError(.server, location: location, message: "\(operation): \(answer.message)")
        }
        guard let psql = error as? PSQLError else {
            return PostgresStoreError(.connection, location: location, message: "\(operation): \(error)")
        }
        if let info = psql.serverInfo {
            let state = info[.sqlState] ?? "?"
            let text = info[.message] ?? "server error"
            return PostgresStoreError(.server, location: location, message: "\(operation): \(text) (SQLSTATE \(state))")
        }
        let cause = psql.underlying.map { ": \($0)" } ?? ""
        return PostgresStoreError(.connection, location: location, message: "\(operation): \(psql.code)\(cause)")
    }

    /// The SQLSTATE of a server error, if `error` is one.
    static func sqlState(_ error: any Error) -> String? {
        (error as? PSQLError)?.serverInfo?[.sqlState]
    }

    /// Worth another try in a new transaction: a serialization failure or deadlock, or a
    /// pooled connection the server closed (a restarted server). A retry decides afresh from
    /// what is committed, so a commit that did land before the error only makes the repeat
    /// free for the addresses, and counts the message twice for the volume caps (the safe side).
    static func isRetryable(_ error: any Error) -> Bool {
        if let state = sqlState(error) { return state == "40001" || state == "40P01" || state == "57P01" }
        guard let psql = error as? PSQLError else { return false }
        return psql.code == .serverClosedConnection || psql.code == .uncleanShutdown || psql.code == .clientClosedConnection
    }
}

/// The database answered, but not as this build expects (no row, or a decision that
/// `QuotaArithmetic` does not take from what it read).
struct PostgresAnswerError: Error {
    let message: String
}
