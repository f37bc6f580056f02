// swift-tools-version:6.0
// libFuzzer target over SMTPCore and the session machine, a package of its own so that the root package never builds
// it (sanitizer flags would rebuild everything). Built and run by scripts/fuzz.
import PackageDescription

let package = Package(
    name: "restrictpd-fuzz",
    dependencies: [
        .package(name: "restrictpd", path: ".."),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
    ],
    targets: [
        .executableTarget(
            name: "Fuzz",
            dependencies: [
                .product(name: "SMTPCore", package: "restrictpd"),
                .product(name: "ProxySession", package: "restrictpd"),
                .product(name: "RestrictPolicy", package: "restrictpd"),
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        )
    ],
    swiftLanguageModes: [.v6]
)
