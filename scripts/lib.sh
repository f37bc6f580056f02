# Sourced by restrictpd's scripts: one way to find the Swift toolchain, to require root, and to
# install the Debian packages everything needs (scripts/install-deps).

# The Swift toolchain on PATH: /opt/swift/usr/bin when it exists (the machines this project
# runs on keep it there), else whatever swift PATH already has. $1 names the caller for errors.
rpd_use_swift() {
    if [ -x /opt/swift/usr/bin/swift ]; then
        export PATH="/opt/swift/usr/bin:$PATH"
    fi
    command -v swift >/dev/null 2>&1 && return 0
    echo "${1:-restrictpd}: swift not found (PATH or /opt/swift/usr/bin); install Swift 6" >&2
    return 1
}

# Exits unless running as root. $1 names the caller, $2 says why root is needed.
rpd_need_root() {
    [ "$(id -u)" -eq 0 ] && return 0
    echo "${1:-restrictpd}: run as root (${2:-it installs packages})" >&2
    exit 1
}

# The Debian packages of the build, the tests, the demo and the package (idempotent).
rpd_install_deps() {
    "$(dirname "${BASH_SOURCE[0]}")/install-deps"
}
