// `restrictpd_admit`: decisions of the PostgreSQL store, one or a batch, in one statement.
//
// A procedure, called on its own (`CALL`, never inside a transaction block), in a READ
// COMMITTED transaction (which every connection asks for and the procedure insists on: in a
// stricter level its reads would take their snapshot before the lock is granted). It decides
// each request in turn: it takes the budget's advisory lock (waiting for it when deciding one
// request alone; a batch only takes free locks and leaves a request whose lock another
// transaction holds undecided, out of its answer), reads, decides, prunes, and when admitted
// records the addresses (a repeat only moves its last_seen forward) and adds the message to its
// second's row of restrictpd_volume. Each statement takes a new snapshot, so the read after the
// lock sees every row the lock's previous holder committed. Then it commits, and only then
// answers: an admitted message is recorded before restrictpd hears of it, so no failure after
// the answer (a crash, a terminated backend) can leave a relayed message uncounted. A failure
// before the commit records nothing and answers nothing; one between the commit and the answer
// records a message that is then deferred, or decided again (a retry, PostgresStoreError's
// isRetryable) and counted twice: an overcount, never an undercount.
//
// The read is one query, with no row written: how many addresses are counted in the window,
// those of them the request names (requested or held; found through the primary key, so a
// large quota costs its count, not its transfer), whether any of the requested ones was last
// seen before now, whether rows left the windows, and the volume counted in the caps' windows.
// Only what the decision needs is written after it: the addresses when one is fresh or was
// last seen before now, the pruning when a row left a window, the volume row when admitted.
//
// The decision is the one `QuotaArithmetic.decide` takes, reduced to whether the message is
// admitted:
// - the arbitrary quota admits when no requested address is fresh (neither counted nor held),
//   or when the counted and held addresses together with the fresh ones fit the limit;
// - `max_recipients` refuses a message with more recipients;
// - each counted cap refuses when what was counted in its window, what open transactions
//   hold, and this message together exceed it.
// It answers what it read, and the daemon decides again from that with `QuotaArithmetic`
// (the figures of the reply and the log come from there): an answer that does not agree with
// the procedure's is an error, answered 451 like any other store failure.
//
// Arguments: the scope; whether to wait for locks; then one array element per request (NULL
// given as the smallest bigint, since an array from the client holds no NULL): budget key,
// lock key; the end of its addresses in `p_addresses` and of its held addresses in `p_held`
// (request i's run from the previous request's end + 1); the arbitrary limit and the start of
// its window (none with a limit: no period); whether to record, now; the messages cap and its
// window start, the recipients cap and its window start, where volume rows are pruned (the
// longest counted cap's window), max_recipients; this message's recipients; the held messages
// and recipients. The answer is one row of arrays, an element per request decided: its index
// from 1, whether admitted, the number of counted addresses, the end of its known addresses
// in `o_known` (as for the arguments), the volume of the caps' windows.

import PostgresNIO
import RestrictPolicy

enum PostgresAdmitFunction {
    /// The statements that replace the functions of schema version 4 with the procedure.
    static let install = [
        "DROP FUNCTION IF EXISTS restrictpd_admit_batch",
        "DROP FUNCTION IF EXISTS restrictpd_admit",
        create,
    ]

    static let create = """
        CREATE PROCEDURE restrictpd_admit(
            p_scope text, p_wait boolean, p_budgets bigint[], p_locks integer[],
            p_address_ends integer[], p_addresses text[], p_held_ends integer[], p_held text[],
            p_limits bigint[], p_window_starts bigint[], p_records boolean[], p_nows bigint[],
            p_messages_limits bigint[], p_messages_froms bigint[], p_recipients_limits bigint[], p_recipients_froms bigint[],
            p_messages_befores bigint[], p_max_recipients bigint[], p_recipients bigint[],
            p_held_messages bigint[], p_held_recipients bigint[],
            INOUT o_indexes integer[] DEFAULT NULL, INOUT o_admitted boolean[] DEFAULT NULL, INOUT o_totals bigint[] DEFAULT NULL,
            INOUT o_known_ends integer[] DEFAULT NULL, INOUT o_known text[] DEFAULT NULL,
            INOUT o_messages bigint[] DEFAULT NULL, INOUT o_recipients bigint[] DEFAULT NULL)
        LANGUAGE plpgsql
        AS $procedure$
        DECLARE
            v_none CONSTANT bigint := -9223372036854775808;
            v_address_from integer := 1;
            v_held_from integer := 1;
            v_addresses text[];
            v_held text[];
            v_budget bigint;
            v_limit bigint;
            v_start bigint;
            v_now bigint;
            v_messages_limit bigint;
            v_recipients_limit bigint;
            v_before bigint;
            v_max_recipients bigint;
            v_stale_quota boolean;
            v_stale_volume boolean;
            v_touch boolean;
            v_missing bigint;
            v_held_new bigint;
            v_fresh bigint;
            v_admitted boolean;
            v_total bigint;
            v_known text[];
            v_messages bigint;
            v_recipients bigint;
        BEGIN
            IF current_setting('transaction_isolation') <> 'read committed' THEN
                RAISE EXCEPTION 'restrictpd_admit needs READ COMMITTED, not %', current_setting('transaction_isolation');
            END IF;
            o_indexes := '{}';
            o_admitted := '{}';
            o_totals := '{}';
            o_known_ends := '{}';
            o_known := '{}';
            o_messages := '{}';
            o_recipients := '{}';
            FOR i IN 1 .. coalesce(cardinality(p_budgets), 0) LOOP
                v_addresses := coalesce(p_addresses[v_address_from:p_address_ends[i]], '{}');
                v_held := coalesce(p_held[v_held_from:p_held_ends[i]], '{}');
                v_address_from := p_address_ends[i] + 1;
                v_held_from := p_held_ends[i] + 1;
                IF p_wait THEN
                    PERFORM pg_advisory_xact_lock(hashtext(p_scope), p_locks[i]);
                ELSIF NOT pg_try_advisory_xact_lock(hashtext(p_scope), p_locks[i]) THEN
                    CONTINUE;
                END IF;
                v_budget := p_budgets[i];
                v_limit := nullif(p_limits[i], v_none);
                v_start := nullif(p_window_starts[i], v_none);
                v_now := p_nows[i];
                v_messages_limit := nullif(p_messages_limits[i], v_none);
                v_recipients_limit := nullif(p_recipients_limits[i], v_none);
                v_before := nullif(p_messages_befores[i], v_none);
                v_max_recipients := nullif(p_max_recipients[i], v_none);

                SELECT c.total, c.stale, k.known, k.touch, w.messages, w.recipients, w.stale
                INTO v_total, v_stale_quota, v_known, v_touch, v_messages, v_recipients, v_stale_volume
                FROM (SELECT count(*) FILTER (WHERE q.last_seen >= coalesce(v_start, v_none)) AS total,
                             coalesce(bool_or(q.last_seen < v_start), false) AS stale
                      FROM restrictpd_quota q
                      WHERE v_limit IS NOT NULL AND q.scope = p_scope AND q.uid = v_budget) c,
                     (SELECT coalesce(array_agg(q.address), '{}') AS known,
                             coalesce(bool_or(q.last_seen < v_now AND q.address = ANY (v_addresses)), false) AS touch
                      FROM restrictpd_quota q
                      WHERE v_limit IS NOT NULL AND q.scope = p_scope AND q.uid = v_budget
                        AND q.address = ANY (v_addresses || v_held) AND q.last_seen >= coalesce(v_start, v_none)) k,
                     (SELECT coalesce(sum(v.messages) FILTER (WHERE v.at >= coalesce(nullif(p_messages_froms[i], v_none), 9223372036854775807)), 0)::bigint AS messages,
                             coalesce(sum(v.recipients) FILTER (WHERE v.at >= coalesce(nullif(p_recipients_froms[i], v_none), 9223372036854775807)), 0)::bigint AS recipients,
                             coalesce(bool_or(v.at < v_before), false) AS stale
                      FROM restrictpd_volume v
                      WHERE v_before IS NOT NULL AND v.scope = p_scope AND v.uid = v_budget) w;

                v_admitted := true;
                v_missing := 0;
                IF v_limit IS NOT NULL THEN
                    -- Requested addresses not counted (each time asked, as QuotaArithmetic
                    -- counts them), of them those not held either (fresh), and held
                    -- addresses not counted (once each). A short request all counted needs no
                    -- query; NOT IN a subquery is hashed, so a long one costs no product.
                    IF cardinality(v_addresses) <= 16 AND v_addresses <@ v_known THEN
                        v_fresh := 0;
                    ELSE
                        SELECT (SELECT count(*) FROM unnest(v_addresses) AS a WHERE a NOT IN (SELECT unnest(v_known))),
                               (SELECT count(*) FROM unnest(v_addresses) AS a
                                WHERE a NOT IN (SELECT unnest(v_known)) AND a NOT IN (SELECT unnest(v_held))),
                               (SELECT count(DISTINCT h) FROM unnest(v_held) AS h WHERE h NOT IN (SELECT unnest(v_known)))
                        INTO v_missing, v_fresh, v_held_new;
                        v_admitted := v_fresh = 0 OR v_total + v_held_new + v_fresh <= v_limit;
                    END IF;
                END IF;
                IF v_max_recipients IS NOT NULL AND p_recipients[i] > v_max_recipients THEN
                    v_admitted := false;
                END IF;
                IF v_messages_limit IS NOT NULL AND v_messages + p_held_messages[i] + 1 > v_messages_limit THEN
                    v_admitted := false;
                END IF;
                IF v_recipients_limit IS NOT NULL AND v_recipients + p_held_recipients[i] + p_recipients[i] > v_recipients_limit THEN
                    v_admitted := false;
                END IF;

                IF p_records[i] THEN
                    IF v_stale_quota THEN
                        DELETE FROM restrictpd_quota q
                        WHERE q.scope = p_scope AND q.uid = v_budget AND q.last_seen < v_start;
                    END IF;
                    IF v_stale_volume THEN
                        DELETE FROM restrictpd_volume v
                        WHERE v.scope = p_scope AND v.uid = v_budget AND v.at < v_before;
                    END IF;
                END IF;
                IF v_admitted AND p_records[i] THEN
                    IF v_limit IS NOT NULL AND (v_missing > 0 OR v_touch) THEN
                        INSERT INTO restrictpd_quota AS q (scope, uid, address, first_seen, last_seen)
                        SELECT DISTINCT p_scope, v_budget, a, v_now, v_now FROM unnest(v_addresses) AS a
                        ON CONFLICT (scope, uid, address) DO UPDATE SET last_seen = excluded.last_seen
                        WHERE q.last_seen < excluded.last_seen;
                    END IF;
                    IF v_before IS NOT NULL THEN
                        INSERT INTO restrictpd_volume AS v (scope, uid, at, messages, recipients)
                        VALUES (p_scope, v_budget, v_now, 1, p_recipients[i])
                        ON CONFLICT (scope, uid, at) DO UPDATE
                        SET messages = v.messages + 1, recipients = v.recipients + excluded.recipients;
                    END IF;
                END IF;
                o_indexes := o_indexes || i;
                o_admitted := o_admitted || v_admitted;
                o_totals := o_totals || v_total;
                o_known := o_known || v_known;
                o_known_ends := o_known_ends || cardinality(o_known);
                o_messages := o_messages || v_messages;
                o_recipients := o_recipients || v_recipients;
            END LOOP;
            COMMIT;
        END
        $procedure$
        """
}

/// `restrictpd_admit`, prepared once per connection: one request alone (waiting for its
/// budget's lock) or a batch (taking only free locks) is one Bind and Execute.
struct AdmitStatement: PostgresPreparedStatement {
    static let sql = """
        CALL restrictpd_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)
        """
    typealias Row = ([Int32], [Bool], [Int64], [Int32], [String], [Int64], [Int64])

    static var bindingDataTypes: [PostgresDataType] {
        [.text, .bool, .int8Array, .int4Array, .int4Array, .textArray, .int4Array, .textArray]
            + [.int8Array, .int8Array, .boolArray, .int8Array]
            + Array(repeating: .int8Array, count: 9)
    }

    /// Stands for NULL in the bigint arrays.
    static let none = Int64.min

    let requests: [QuotaRequest]
    let scope: String
    /// Wait for each budget's lock (one request alone), or leave a request whose lock is
    /// taken undecided (a batch).
    let wait: Bool

    func makeBindings() throws -> PostgresBindings {
        let requests = self.requests
        let none = Self.none
        var addresses: [String] = []
        var addressEnds: [Int32] = []
        var held: [String] = []
        var heldEnds: [Int32] = []
        for request in requests {
            addresses += request.addresses
            addressEnds.append(Int32(clamping: addresses.count))
            held += request.held
            heldEnds.append(Int32(clamping: held.count))
        }
        var bindings = PostgresBindings(capacity: 21)
        bindings.append(self.scope)
        bindings.append(self.wait)
        bindings.append(requests.map(\.budget))
        bindings.append(requests.map { PostgresQuotaSQL.lockKey($0.budget) })
        bindings.append(addressEnds)
        bindings.append(addresses)
        bindings.append(heldEnds)
        bindings.append(held)
        bindings.append(requests.map { $0.quota.map { Int64($0.limit) } ?? none })
        bindings.append(requests.map { $0.windowStart ?? none })
        bindings.append(requests.map(\.record))
        bindings.append(requests.map(\.now))
        bindings.append(requests.map { $0.caps.messages.map { Int64($0.limit) } ?? none })
        bindings.append(requests.map { $0.windowStart(.messages) ?? none })
        bindings.append(requests.map { $0.caps.recipients.map { Int64($0.limit) } ?? none })
        bindings.append(requests.map { $0.windowStart(.recipients) ?? none })
        bindings.append(requests.map { $0.caps.pruneBefore(now: $0.now) ?? none })
        bindings.append(requests.map { $0.caps.maxRecipients.map { Int64($0) } ?? none })
        bindings.append(requests.map { Int64($0.recipients) })
        bindings.append(requests.map { Int64($0.heldVolume.messages) })
        bindings.append(requests.map { Int64($0.heldVolume.recipients) })
        return bindings
    }

    func decodeRow(_ row: PostgresRow) throws -> Row { try row.decode(Row.self) }
}
