// Group membership through NSS, for `group` rules: a uid's primary and supplementary
// groups with getgrouplist(3), cached like user names; and every passwd user with its groups,
// for the ambiguity check when the configuration is loaded.

import Dispatch
import Glibc
import RestrictPolicy

extension Users {
    /// Every group of `uid` (its primary group first), or nil when the uid has no passwd entry.
    static func groups(uid: UInt32) -> [UInt32]? {
        guard let entry = Users.lookup(uid: uid) else { return nil }
        return groups(name: entry.name, gid: entry.gid)
    }

    /// getgrouplist(3), growing the buffer when a user is in more groups than it holds.
    static func groups(name: String, gid: UInt32) -> [UInt32] {
        var count: Int32 = 64
        for _ in 0..<4 {
            var list = [gid_t](repeating: 0, count: Int(count))
            var n = count
            let rc = list.withUnsafeMutableBufferPointer { buf -> Int32 in
                guard let base = buf.baseAddress else { return -1 }
                return getgrouplist(name, gid, base, &n)
            }
            if rc >= 0 { return Array(list.prefix(Int(max(0, n)))) }
            // -1 with n set to the number needed.
            count = max(n, count * 2)
        }
        return [gid]
    }

    /// getpwent(3) is not reentrant: one walk of the passwd database at a time.
    private static let walk = Mutex(())

    /// Every user in the passwd database with its groups (NSS: files, and any directory
    /// service that enumerates).
    static func allMembers() -> [GroupMember] {
        var entries: [(String, UInt32, UInt32)] = []
        walk.withLock { _ in
            setpwent()
            defer { endpwent() }
            while let pw = getpwent() {
                guard let name = pw.pointee.pw_name else { continue }
                entries.append((String(cString: name), pw.pointee.pw_uid, pw.pointee.pw_gid))
            }
        }
        return entries.map { GroupMember(name: $0.0, uid: $0.1, groups: groups(name: $0.0, gid: $0.2)) }
    }
}

/// A cache of uid -> groups for `group` rules. Bounded; a uid without a passwd entry is
/// remembered with no groups. Emptied on reload, when memberships may have changed.
final class UserGroups: Sendable {
    static let capacity = 4096
    private let cache = Mutex<[UInt32: [UInt32]]>([:])

    /// The groups of `uid`, looked up off the event loop when not cached.
    func groups(_ uid: UInt32) async -> [UInt32] {
        if let hit = self.cached(uid) { return hit }
        let groups = (try? await Offload.run { Users.groups(uid: uid) ?? [] }) ?? []
        self.cache.withLock {
            if $0.count >= Self.capacity { $0.removeAll(keepingCapacity: true) }
            $0[uid] = groups
        }
        return groups
    }

    func cached(_ uid: UInt32) -> [UInt32]? { self.cache.withLock { $0[uid] } }

    func forget() { self.cache.withLock { $0.removeAll() } }
}
