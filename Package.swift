// swift-tools-version:6.0
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("InternalImportsByDefault"),
]

let package = Package(
    name: "restrictpd",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "restrictpd", targets: ["restrictpd"]),
        .library(name: "SMTPCore", targets: ["SMTPCore"]),
        .library(name: "RestrictPolicy", targets: ["RestrictPolicy"]),
        .library(name: "ProxySession", targets: ["ProxySession"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        // metrics_file: counters through swift-metrics, the text format by swift-prometheus.
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
    ],
    targets: [
        // Wire grammar, no I/O.
        .target(
            name: "SMTPCore",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: strict
        ),
        // The SMTP session as a state machine: events in, actions out; no I/O.
        .target(
            name: "ProxySession",
            dependencies: ["SMTPCore", "RestrictPolicy", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: strict
        ),
        // Runs a task's jobs on one NIO event loop (sessions, and the quota store's work for them).
        .target(
            name: "LoopExecutor",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        // Configuration, rules, quota arithmetic; no I/O.
        .target(name: "RestrictPolicy", dependencies: ["SMTPCore"], swiftSettings: strict),
        .systemLibrary(
            name: "CSystemd",
            pkgConfig: "libsystemd",
            providers: [.apt(["libsystemd-dev"])]
        ),
        .systemLibrary(
            name: "CSQLite",
            pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]
        ),
        // Kernel interfaces Swift cannot import directly: netlink sock_diag, syslog, ucred.
        .target(name: "CRestrictSys"),
        // The quota store behind RestrictPolicy's protocol: SQLite, embedded.
        .target(
            name: "QuotaStore",
            dependencies: [
                "RestrictPolicy", "CSQLite",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        // The quota store on PostgreSQL, shared by the hosts of a farm; only the daemon links it.
        .target(
            name: "QuotaStorePostgres",
            dependencies: [
                "RestrictPolicy", "QuotaStore", "LoopExecutor",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        .target(
            name: "RestrictDaemon",
            dependencies: [
                "SMTPCore", "RestrictPolicy", "ProxySession", "QuotaStore", "QuotaStorePostgres", "LoopExecutor", "CSystemd",
                "CRestrictSys",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "restrictpd",
            dependencies: [
                "RestrictDaemon", "RestrictPolicy",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        // bench/quota-bench: throughput of the quota stores (SQLite, and PostgreSQL when given one).
        .executableTarget(
            name: "restrictpd-quota-bench",
            dependencies: ["QuotaStore", "QuotaStorePostgres", "RestrictPolicy", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict
        ),
        // For the tests: a loopback port that refuses connections (TestPorts/ClosedPort.swift).
        .target(name: "TestPorts", path: "Tests/TestPorts", swiftSettings: strict),
        .testTarget(
            name: "SMTPCoreTests",
            dependencies: ["SMTPCore", .product(name: "NIOCore", package: "swift-nio")],
            resources: [.copy("Fixtures")],
            swiftSettings: strict
        ),
        .testTarget(
            name: "ProxySessionTests",
            dependencies: ["ProxySession", "SMTPCore", "RestrictPolicy", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: strict
        ),
        .testTarget(name: "RestrictPolicyTests", dependencies: ["RestrictPolicy", "SMTPCore"], swiftSettings: strict),
        .testTarget(
            name: "QuotaStoreTests",
            dependencies: [
                "QuotaStore", "QuotaStorePostgres", "RestrictPolicy", "TestPorts", .product(name: "Logging", package: "swift-log"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "RestrictDaemonTests",
            dependencies: [
                "RestrictDaemon", "SMTPCore", "RestrictPolicy", "CRestrictSys", "TestPorts",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
    ],
    swiftLanguageModes: [.v6]
)
