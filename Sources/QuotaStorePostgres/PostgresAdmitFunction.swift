// `restrictpd_admit`: one decision of the PostgreSQL store in one statement.
//
// The statement's own transaction (READ COMMITTED, which every connection asks for and the
// function insists on: in a stricter level its reads would take their snapshot before the lock
// is granted; autocommit) does what `PostgresQuotaSQL`
// did in five round trips: it takes the budget's advisory lock, prunes what left the asking
// rule's windows, reads the counted addresses and the volume counted in the caps' windows
// (each statement of a VOLATILE function takes a new snapshot, so it sees every row the lock's
// previous holder committed), decides, and when admitted records the addresses (a repeat
// only moves its last_seen forward, and leaves a row written in this same second alone) and
// adds the message to its second's row of restrictpd_volume.
//
// The decision is the one `QuotaArithmetic.decide` takes, reduced to whether the message is
// admitted:
// - the arbitrary quota admits when no requested address is fresh (neither counted nor held),
//   or when the counted and held addresses together with the fresh ones fit the limit;
// - `max_recipients` refuses a message with more recipients;
// - each counted cap refuses when what was counted in its window, what open transactions
//   hold, and this message together exceed it.
// It returns what it read, and the daemon decides again from that with `QuotaArithmetic`
// (the figures of the reply and the log come from there): an answer that does not agree with
// the function's is an error, answered 451 like any other store failure.
//
// The answer reaches restrictpd just before the statement's transaction commits (the extended
// protocol sends the rows, then commits at Sync): a server that dies in between loses the
// decision's record while the message is relayed. Only a crash or a terminated backend does
// that: READ COMMITTED raises no serialization failure at commit, and nothing is deferred.
//
// Arguments (NULL where the rule has no such limit): scope, budget key, lock key; the
// requested addresses, the held ones; the arbitrary limit and the start of its window (NULL
// with a limit: no period); whether to record, now; the messages cap and its window start, the
// recipients cap and its window start, where message rows are pruned (the longest counted
// cap's window), max_recipients; this message's recipients; the held messages and recipients.

import PostgresNIO
import RestrictPolicy

enum PostgresAdmitFunction {
    static let create = """
        CREATE FUNCTION restrictpd_admit(
            p_scope text, p_budget bigint, p_lock integer,
            p_addresses text[], p_held text[],
            p_limit bigint, p_window_start bigint,
            p_record boolean, p_now bigint,
            p_messages_limit bigint, p_messages_from bigint,
            p_recipients_limit bigint, p_recipients_from bigint,
            p_messages_before bigint, p_max_recipients bigint, p_recipients bigint,
            p_held_messages bigint, p_held_recipients bigint,
            OUT o_admitted boolean, OUT o_counted text[], OUT o_messages bigint, OUT o_recipients bigint)
        LANGUAGE plpgsql VOLATILE
        AS $function$
        DECLARE
            v_held bigint;
            v_fresh bigint;
        BEGIN
            IF current_setting('transaction_isolation') <> 'read committed' THEN
                RAISE EXCEPTION 'restrictpd_admit needs READ COMMITTED, not %', current_setting('transaction_isolation');
            END IF;
            PERFORM pg_advisory_xact_lock(hashtext(p_scope), p_lock);
            WITH pruned_quota AS (
                DELETE FROM restrictpd_quota q
                WHERE p_record AND p_limit IS NOT NULL AND p_window_start IS NOT NULL
                  AND q.scope = p_scope AND q.uid = p_budget AND q.last_seen < p_window_start
            ), pruned_volume AS (
                DELETE FROM restrictpd_volume v
                WHERE p_record AND p_messages_before IS NOT NULL
                  AND v.scope = p_scope AND v.uid = p_budget AND v.at < p_messages_before
            )
            SELECT c.counted, w.messages, w.recipients INTO o_counted, o_messages, o_recipients
            FROM (SELECT coalesce(array_agg(q.address), '{}') AS counted FROM restrictpd_quota q
                  WHERE p_limit IS NOT NULL AND q.scope = p_scope AND q.uid = p_budget
                    AND q.last_seen >= coalesce(p_window_start, -9223372036854775808)) c,
                 (SELECT coalesce(sum(v.messages) FILTER (WHERE v.at >= coalesce(p_messages_from, 9223372036854775807)), 0)::bigint AS messages,
                         coalesce(sum(v.recipients) FILTER (WHERE v.at >= coalesce(p_recipients_from, 9223372036854775807)), 0)::bigint AS recipients
                  FROM restrictpd_volume v
                  WHERE p_messages_before IS NOT NULL AND v.scope = p_scope AND v.uid = p_budget AND v.at >= p_messages_before) w;

            o_admitted := true;
            IF p_limit IS NOT NULL THEN
                -- Held addresses not counted yet (once each), and requested addresses neither
                -- counted nor held (each time asked, as QuotaArithmetic counts them); NOT IN a
                -- subquery is hashed, so a long list costs no product of the two lengths.
                SELECT (SELECT count(DISTINCT h) FROM unnest(p_held) AS h WHERE h NOT IN (SELECT unnest(o_counted))),
                       (SELECT count(*) FROM unnest(p_addresses) AS a
                        WHERE a NOT IN (SELECT unnest(o_counted)) AND a NOT IN (SELECT unnest(p_held)))
                INTO v_held, v_fresh;
                o_admitted := v_fresh = 0 OR cardinality(o_counted) + v_held + v_fresh <= p_limit;
            END IF;
            IF p_max_recipients IS NOT NULL AND p_recipients > p_max_recipients THEN
                o_admitted := false;
            END IF;
            IF p_messages_limit IS NOT NULL AND o_messages + p_held_messages + 1 > p_messages_limit THEN
                o_admitted := false;
            END IF;
            IF p_recipients_limit IS NOT NULL AND o_recipients + p_held_recipients + p_recipients > p_recipients_limit THEN
                o_admitted := false;
            END IF;

            IF o_admitted AND p_record THEN
                IF p_limit IS NOT NULL AND cardinality(p_addresses) > 0 THEN
                    INSERT INTO restrictpd_quota AS q (scope, uid, address, first_seen, last_seen)
                    SELECT DISTINCT p_scope, p_budget, a, p_now, p_now FROM unnest(p_addresses) AS a
                    ON CONFLICT (scope, uid, address) DO UPDATE SET last_seen = excluded.last_seen
                    WHERE q.last_seen < excluded.last_seen;
                END IF;
                IF p_messages_before IS NOT NULL THEN
                    INSERT INTO restrictpd_volume AS v (scope, uid, at, messages, recipients)
                    VALUES (p_scope, p_budget, p_now, 1, p_recipients)
                    ON CONFLICT (scope, uid, at) DO UPDATE
                    SET messages = v.messages + 1, recipients = v.recipients + excluded.recipients;
                END IF;
            END IF;
        END
        $function$
        """

    /// Several decisions in one statement (see `PostgresQuotaSQL.admit(batch:)`): the requests'
    /// arguments as arrays, one element per request, NULL given as the smallest bigint (an
    /// array from the client holds no NULL); the addresses and held addresses of all requests
    /// in one array each, request i's ending at `p_address_ends[i]` (`p_held_ends[i]`). A row
    /// per request decided, by its index from 1.
    static let createBatch = """
        CREATE FUNCTION restrictpd_admit_batch(
            p_scope text, p_budgets bigint[], p_locks integer[],
            p_address_ends integer[], p_addresses text[], p_held_ends integer[], p_held text[],
            p_limits bigint[], p_window_starts bigint[], p_records boolean[], p_nows bigint[],
            p_messages_limits bigint[], p_messages_froms bigint[], p_recipients_limits bigint[], p_recipients_froms bigint[],
            p_messages_befores bigint[], p_max_recipients bigint[], p_recipients bigint[],
            p_held_messages bigint[], p_held_recipients bigint[])
        RETURNS TABLE (o_index integer, o_admitted boolean, o_counted text[], o_messages bigint, o_recipients bigint)
        LANGUAGE plpgsql VOLATILE
        AS $function$
        DECLARE
            v_none CONSTANT bigint := -9223372036854775808;
            v_address_from integer := 1;
            v_held_from integer := 1;
        BEGIN
            FOR i IN 1 .. coalesce(cardinality(p_budgets), 0) LOOP
                IF pg_try_advisory_xact_lock(hashtext(p_scope), p_locks[i]) THEN
                    o_index := i;
                    SELECT a.o_admitted, a.o_counted, a.o_messages, a.o_recipients
                    INTO o_admitted, o_counted, o_messages, o_recipients
                    FROM restrictpd_admit(
                        p_scope, p_budgets[i], p_locks[i],
                        coalesce(p_addresses[v_address_from:p_address_ends[i]], '{}'), coalesce(p_held[v_held_from:p_held_ends[i]], '{}'),
                        nullif(p_limits[i], v_none), nullif(p_window_starts[i], v_none), p_records[i], p_nows[i],
                        nullif(p_messages_limits[i], v_none), nullif(p_messages_froms[i], v_none),
                        nullif(p_recipients_limits[i], v_none), nullif(p_recipients_froms[i], v_none),
                        nullif(p_messages_befores[i], v_none), nullif(p_max_recipients[i], v_none), p_recipients[i],
                        p_held_messages[i], p_held_recipients[i]) AS a;
                    RETURN NEXT;
                END IF;
                v_address_from := p_address_ends[i] + 1;
                v_held_from := p_held_ends[i] + 1;
            END LOOP;
        END
        $function$
        """
}

/// `restrictpd_admit`, prepared once per connection: a decision is one Bind and Execute.
struct AdmitStatement: PostgresPreparedStatement {
    static let sql = """
        SELECT o_admitted, o_counted, o_messages, o_recipients
        FROM restrictpd_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
        """
    typealias Row = (Bool, [String], Int64, Int64)

    /// Given, so that a NULL in the first request a connection prepares for is typed too.
    static var bindingDataTypes: [PostgresDataType] {
        [.text, .int8, .int4, .textArray, .textArray, .int8, .int8, .bool, .int8, .int8, .int8, .int8, .int8, .int8, .int8, .int8, .int8, .int8]
    }

    let request: QuotaRequest
    let scope: String

    func makeBindings() throws -> PostgresBindings {
        let request = self.request
        var bindings = PostgresBindings(capacity: 18)
        bindings.append(self.scope)
        bindings.append(request.budget)
        bindings.append(PostgresQuotaSQL.lockKey(request.budget))
        bindings.append(request.addresses)
        bindings.append(Array(request.held))
        bindings.append(request.quota.map { Int64($0.limit) })
        bindings.append(request.windowStart)
        bindings.append(request.record)
        bindings.append(request.now)
        bindings.append(request.caps.messages.map { Int64($0.limit) })
        bindings.append(request.windowStart(.messages))
        bindings.append(request.caps.recipients.map { Int64($0.limit) })
        bindings.append(request.windowStart(.recipients))
        bindings.append(request.caps.pruneBefore(now: request.now))
        bindings.append(request.caps.maxRecipients.map { Int64($0) })
        bindings.append(Int64(request.recipients))
        bindings.append(Int64(request.heldVolume.messages))
        bindings.append(Int64(request.heldVolume.recipients))
        return bindings
    }

    func decodeRow(_ row: PostgresRow) throws -> Row { try row.decode(Row.self) }
}

/// `restrictpd_admit_batch`, prepared once per connection.
struct AdmitBatchStatement: PostgresPreparedStatement {
    static let sql = """
        SELECT o_index, o_admitted, o_counted, o_messages, o_recipients
        FROM restrictpd_admit_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
        """
    typealias Row = (Int32, Bool, [String], Int64, Int64)

    static var bindingDataTypes: [PostgresDataType] {
        [.text, .int8Array, .int4Array, .int4Array, .textArray, .int4Array, .textArray]
            + [.int8Array, .int8Array, .boolArray, .int8Array]
            + Array(repeating: .int8Array, count: 9)
    }

    /// Stands for NULL in the bigint arrays.
    static let none = Int64.min

    let requests: [QuotaRequest]
    let scope: String

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
        var bindings = PostgresBindings(capacity: 20)
        bindings.append(self.scope)
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
