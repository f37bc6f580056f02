// postgres-nio's configurations from restrictpd's settings: TLS as libpq's sslmode means it,
// timeouts from `state_timeout`, the pool bounded by `state_pool`.

import NIOCore
import NIOSSL
import PostgresNIO
import RestrictPolicy

enum PostgresConfiguration {
    /// Server-side bounds, so a statement or a lock wait never outlives the client's deadline;
    /// READ COMMITTED whatever the database's or role's default, as `restrictpd_admit` needs.
    static func startupParameters(_ settings: PostgresStoreSettings) -> [(String, String)] {
        let ms = String(settings.timeout * 1000)
        return [
            ("application_name", "restrictpd"), ("statement_timeout", ms), ("lock_timeout", ms),
            ("default_transaction_isolation", "read committed"),
        ]
    }

    /// libpq's sslmode: prefer and require encrypt without verifying; verify-full verifies the
    /// certificate against the system's roots and the host name.
    static func tlsConfiguration(_ mode: PostgresSSLMode) -> TLSConfiguration? {
        var tls = TLSConfiguration.makeClientConfiguration()
        switch mode {
        case .disable: return nil
        case .prefer, .require: tls.certificateVerification = .none
        case .verifyFull: tls.certificateVerification = .fullVerification
        }
        return tls
    }

    static func client(_ settings: PostgresStoreSettings) -> PostgresClient.Configuration {
        let location = settings.location
        let tls: PostgresClient.Configuration.TLS
        switch (settings.location.sslMode, self.tlsConfiguration(settings.location.sslMode)) {
        case (.prefer, let config?): tls = .prefer(config)
        case (.require, let config?), (.verifyFull, let config?): tls = .require(config)
        default: tls = .disable
        }
        var configuration = PostgresClient.Configuration(
            host: location.host, port: location.port, username: location.user, password: settings.password,
            database: location.database, tls: tls)
        configuration.options.connectTimeout = .seconds(Int64(settings.timeout))
        configuration.options.maximumConnections = settings.pool
        configuration.options.minimumConnections = 0
        configuration.options.additionalStartupParameters = self.startupParameters(settings)
        return configuration
    }

    /// One connection outside the pool, for the admin's commands and for diagnosis.
    static func connection(_ settings: PostgresStoreSettings) throws -> PostgresConnection.Configuration {
        let location = settings.location
        let tls: PostgresConnection.Configuration.TLS
        switch (settings.location.sslMode, self.tlsConfiguration(settings.location.sslMode)) {
        case (.prefer, let config?): tls = .prefer(try NIOSSLContext(configuration: config))
        case (.require, let config?), (.verifyFull, let config?): tls = .require(try NIOSSLContext(configuration: config))
        default: tls = .disable
        }
        var configuration = PostgresConnection.Configuration(
            host: location.host, port: location.port, username: location.user, password: settings.password,
            database: location.database, tls: tls)
        configuration.options.connectTimeout = .seconds(Int64(settings.timeout))
        configuration.options.additionalStartupParameters = self.startupParameters(settings)
        return configuration
    }
}
