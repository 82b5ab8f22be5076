//! The SQL the backend sends. Keys travel only as bound `bigint`/`int` parameters; the only
//! spliced names are the fencing sequence's and its epoch table's, checked by
//! [`SequenceName::parse`].

use crate::LockError;

/// The `LISTEN` channel on which a release announces a key that a waiter in another process
/// flagged. The payload is the advisory key in decimal.
pub(super) const NOTIFY_CHANNEL: &str = "k1s0_distributed_lock";

/// The default fencing sequence, schema-qualified so that every role uses the same one
/// whatever its `search_path`.
pub(super) const DEFAULT_SEQUENCE: &str = "public.k1s0_lock_fencing_seq";

/// The default fencing sequence's name before it was schema-qualified: it resolved through
/// each role's `search_path`. A deployment whose sequence lives under it in another schema is
/// refused rather than given a new sequence (see [`Statements::fencing_objects`]).
const UNQUALIFIED_DEFAULT_SEQUENCE: &str = "k1s0_lock_fencing_seq";

/// The unlogged table, in the sequence's schema, whose row for a sequence says that the
/// sequence was moved past every token of the previous crash epoch (see
/// [`Statements::epoch_check`]).
pub(super) const EPOCH_TABLE: &str = "k1s0_lock_fencing_epochs";

/// How far the fencing sequence jumps after a crash, a failover or a restore: more tokens
/// than can have been handed out without reaching the disk (2^40, over a trillion).
pub(super) const EPOCH_JUMP: i64 = 1 << 40;

/// A validated, possibly schema-qualified sequence name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SequenceName {
    /// Quoted identifier(s), ready to splice: `"schema"."name"` or `"name"`.
    quoted: String,
    /// The epoch table in the same schema, quoted likewise.
    epochs_quoted: String,
}

impl SequenceName {
    /// Accepts `name` or `schema.name`, each part 1 to 63 ASCII letters, digits or `_`, not
    /// starting with a digit.
    pub(super) fn parse(name: &str) -> Result<Self, LockError> {
        let parts: Vec<&str> = name.split('.').collect();
        let valid_part = |part: &str| {
            !part.is_empty()
                && part.len() <= 63
                && !part.starts_with(|c: char| c.is_ascii_digit())
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if parts.len() > 2 || !parts.iter().all(|part| valid_part(part)) {
            return Err(LockError::invalid_config(format!(
                "fencing sequence name {name:?} must be `name` or `schema.name`, each part 1-63 \
                 ASCII letters, digits or '_', not starting with a digit"
            )));
        }
        let quote = |parts: &[&str]| {
            parts
                .iter()
                .map(|part| format!("\"{part}\""))
                .collect::<Vec<_>>()
                .join(".")
        };
        let mut epochs = parts.clone();
        *epochs.last_mut().expect("split gives one part at least") = EPOCH_TABLE;
        Ok(SequenceName {
            quoted: quote(&parts),
            epochs_quoted: quote(&epochs),
        })
    }

    /// The sequence's name as its epoch-table row stores it.
    pub(super) fn quoted(&self) -> &str {
        &self.quoted
    }
}

/// The waiter flag's two `int4` halves of the advisory key `$1`, computed by the server so
/// that the hot statements bind one parameter: the same values as
/// `key_hash::flag_key` (the high 32 bits and the low 32 bits, each read as
/// a signed 32-bit integer; PostgreSQL's `>>` on `bigint` is arithmetic).
const FLAG_HIGH: &str = "($1 >> 32)::int4";
/// See [`FLAG_HIGH`].
const FLAG_LOW: &str = "(($1 << 32) >> 32)::int4";
/// The writer-waiting mark's halves: those of `~$1` (the advisory key's bits inverted), the
/// same values as `key_hash::writer_mark_key`.
const WRITER_HIGH: &str = "((~$1) >> 32)::int4";
/// See [`WRITER_HIGH`].
const WRITER_LOW: &str = "(((~$1) << 32) >> 32)::int4";
/// The readers'-turn mark's halves: those of `$1 # 6148914691236517205` (the advisory key
/// XOR `0x5555_5555_5555_5555`), the same values as
/// `key_hash::readers_mark_key`.
const READERS_HIGH: &str = "(($1 # 6148914691236517205) >> 32)::int4";
/// See [`READERS_HIGH`].
const READERS_LOW: &str = "((($1 # 6148914691236517205) << 32) >> 32)::int4";

/// Whether a session other than this one holds the mark whose halves are `high` and `low`
/// (marks are shared advisory locks in the two-`int4` key space). Asked only after the mark's
/// statement-scoped check was refused: that check is an exclusive lock, which the same check of
/// a concurrent statement also refuses, with no mark held anywhere.
fn mark_held_elsewhere(high: &str, low: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND classid = {high}::oid AND objid = {low}::oid AND objsubid = 2 \
         AND mode = 'ShareLock' AND granted AND pid <> pg_backend_pid())"
    )
}

/// The end of a release: `pg_notify`s [`NOTIFY_CHANNEL`] with `$1` in decimal when another
/// session holds the waiter flag of `$1` (see [`FLAG_HIGH`]); answers whether it did. The flag is
/// checked with a statement-scoped exclusive try, which a session's own shared hold of it does
/// not refuse. Only a notifying release writes a commit record (NOTIFY needs a transaction id);
/// nothing in it needs to be durable, so it does not wait for the WAL flush.
fn notify_if_flagged() -> String {
    format!(
        "CASE WHEN pg_try_advisory_xact_lock({FLAG_HIGH}, {FLAG_LOW}) THEN false \
         ELSE (set_config('synchronous_commit', 'off', true) \
         || pg_notify('{NOTIFY_CHANNEL}', $1::text)::text) IS NOT NULL END"
    )
}

/// The granted `pg_locks` rows of the permits of the permit base `$1` (see
/// `key_hash::permit_base`): bigint advisory locks (`objsubid = 1`) whose `classid` is the
/// base's high 32 bits and whose `objid` lies in the 65,536 values from the base's low 32 bits
/// on (the base's low 16 bits are 0, so they never spill into the next `classid`).
const PERMIT_ROWS: &str = "locktype = 'advisory' \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND classid = ($1 >> 32)::int4::oid \
     AND objid::int8 BETWEEN ($1 & 4294967295) AND ($1 & 4294967295) + 65535 \
     AND objsubid = 1 AND granted";

/// Every statement of one lock service, built once.
#[derive(Debug)]
pub(super) struct Statements {
    /// The fencing sequence's quoted name, as the epoch table stores it.
    pub(super) sequence: String,
    /// Whether the sequence is [`DEFAULT_SEQUENCE`].
    pub(super) default_sequence: bool,
    /// `$1` advisory key → the fencing token if the exclusive lock was taken, else NULL.
    /// Takes nothing while some session holds the key's readers'-turn mark (see
    /// [`READERS_HIGH`]): readers that waited through a writer go in before the next writer.
    pub(super) try_lock: String,
    /// Like `try_lock`, and on success also drops, in the same statement, this session's
    /// waiter flag (the halves of `$1`, see [`FLAG_HIGH`]) if `$2`, and its writer-waiting
    /// mark (see [`WRITER_HIGH`]) if `$3` → (token, flag dropped, mark dropped).
    pub(super) try_lock_unflag: String,
    /// `$1` advisory key, `$2` heed the writer-waiting mark, `$3` drop the waiter flag, `$4`
    /// drop the readers'-turn mark on success → (no writer waits, the fencing token if the
    /// shared lock was taken, a writer holds the key, flag dropped, mark dropped). With `$2`,
    /// takes nothing while some session holds the writer-waiting mark (the first column is then
    /// false, and the third says whether a writer holds the key meanwhile); a NULL token with
    /// the first column true means an exclusive holder has the key.
    pub(super) try_lock_shared: String,
    /// `$1` key → (released, notified). Notifies [`NOTIFY_CHANNEL`] with the key in decimal
    /// when some session holds the key's waiter flag (the halves of `$1`, see [`FLAG_HIGH`]).
    pub(super) unlock: String,
    /// Like `unlock`, for one shared hold of the key.
    pub(super) unlock_shared: String,
    /// `$1` advisory key → (the fencing epoch is current, the fencing token if the lock was
    /// taken, else NULL), run on the caller's own transaction: `pg_try_advisory_xact_lock` on
    /// the same advisory key as [`try_lock`](Self::try_lock), released when that transaction
    /// ends. Neither locks nor draws when the sequence's epoch row is missing (the first
    /// session since a crash has not moved the sequence on yet), so a token is never drawn
    /// from a sequence that a crash may have taken back.
    pub(super) transaction_try_lock: String,
    /// `$1` advisory key; takes (shared) the waiter flag if `$2`, the writer-waiting mark if
    /// `$3`, the readers'-turn mark if `$4` → for each, whether it was taken (NULL if not
    /// asked). A try: each is refused only for the length of a statement that checks it.
    pub(super) set_marks: String,
    /// `$1` advisory key; drops (one shared hold of) the waiter flag if `$2`, the
    /// writer-waiting mark if `$3`, the readers'-turn mark if `$4`.
    pub(super) clear_marks: String,
    /// `$1`/`$2` `pg_locks` halves → whether any session holds the key.
    pub(super) is_locked: &'static str,
    /// `$1` permit base (`int8`), `$2` the caller's limit (`int4`, 1 to 65,536), `$3` the slots
    /// of the base this session holds already (`int4[]`), `$4` drop the waiter flag on success
    /// → (the slot taken, its fencing token, flag dropped, notified). Tries the slots `0..$2`
    /// in order, skipping `$3` (advisory locks are re-entrant within a session), and takes the
    /// first free one; then counts the key's permits held (its own included) and keeps the slot
    /// only if that is at most `$2`: the token is then drawn. Over the limit it unlocks the
    /// slot again (NULL token), notifying as [`unlock_permit`](Self::unlock_permit) does.
    ///
    /// It can never take two slots: the tries run in the `WHERE` of a row source under
    /// `LIMIT 1`, pulled one row at a time from a set-returning function in a select list
    /// (evaluated one value per call), and a `Limit` node asks for no row past its count.
    pub(super) try_permit: String,
    /// `$1` permit base, `$2` slot → (released, notified): unlocks `$1 + $2` and notifies
    /// [`NOTIFY_CHANNEL`] with the base in decimal when another session holds the base's
    /// waiter flag.
    pub(super) unlock_permit: String,
    /// `$1` permit base → how many of its permits are held, by any session.
    pub(super) permits_held: String,
    /// `$1` permit base, `$2` the slots of the base this session holds for its guards
    /// (`int4[]`) → how many others of the base it held and unlocked. Run after a failed
    /// [`try_permit`](Self::try_permit), which may have taken a slot before its error.
    pub(super) unlock_unknown_permits: String,
    /// A round trip that proves the session is alive.
    pub(super) ping: &'static str,
    /// Creates the fencing sequence if it does not exist.
    pub(super) create_sequence: String,
    /// Creates the epoch table if it does not exist.
    pub(super) create_epoch_table: String,
    /// → (the relation named as the sequence exists, the epoch table's `relpersistence` or
    /// NULL if it is missing, the sequence's `CACHE`, `INCREMENT` and `CYCLE` or NULLs if it is
    /// not a sequence, the schema in which [`UNQUALIFIED_DEFAULT_SEQUENCE`] resolves through
    /// the `search_path` or NULL). No parameters: one round trip as a simple query.
    pub(super) fencing_objects: String,
    /// → whether the epoch table has the sequence's row (this crash epoch's jump is done).
    pub(super) epoch_row_exists: String,
    /// Run once per connection, before its first token. Returns a row (the sequence's new
    /// value) only if it moved the sequence on.
    ///
    /// The lock sessions draw tokens with `synchronous_commit = off`, so the sequence's
    /// write-ahead (once per 32 values) does not wait for the disk, and a crash can take the
    /// sequence back below tokens already handed out. Crash recovery also empties every
    /// unlogged table (so does promoting a standby or restoring a backup); a clean restart
    /// keeps them. So the first session of a new crash epoch finds no row for the sequence,
    /// inserts one and jumps the sequence [`EPOCH_JUMP`] ahead, in one transaction that does
    /// wait for the disk. Concurrent first sessions queue on the row's primary key; the later
    /// ones find it and draw no token until the jump is committed. The jump waits for the
    /// local disk only (`synchronous_commit = local`): with a synchronous standby down, `on`
    /// would wait for ever; a standby promoted without the jump starts with an empty epoch
    /// table and jumps again.
    pub(super) epoch_check: String,
}

impl Statements {
    pub(super) fn new(sequence: &SequenceName) -> Self {
        let seq = &sequence.quoted;
        // Whether another session holds the readers' turn mark (an exclusive try takes nothing
        // then): its statement-scoped check first, `pg_locks` only when that is refused. CASE,
        // not AND or OR: its branches are evaluated in order.
        let readers_turn = format!(
            "CASE WHEN pg_try_advisory_xact_lock({READERS_HIGH}, {READERS_LOW}) THEN false \
             ELSE {} END",
            mark_held_elsewhere(READERS_HIGH, READERS_LOW)
        );
        let writer_waits = mark_held_elsewhere(WRITER_HIGH, WRITER_LOW);
        // Whether another session holds the key exclusively.
        let writer_holds = "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid = ($1 >> 32)::int4::oid AND objid = (($1 << 32) >> 32)::int4::oid \
             AND objsubid = 1 AND mode = 'ExclusiveLock' AND granted AND pid <> pg_backend_pid())";
        Statements {
            sequence: sequence.quoted().to_owned(),
            default_sequence: *sequence == SequenceName::parse(DEFAULT_SEQUENCE).expect("valid"),
            // Nothing is locked while the readers' turn mark is held elsewhere.
            try_lock: format!(
                "SELECT CASE WHEN {readers_turn} THEN NULL \
                 WHEN pg_try_advisory_lock($1) THEN nextval('{seq}') END"
            ),
            try_lock_unflag: format!(
                "SELECT t.token, \
                 CASE WHEN t.token IS NOT NULL AND $2 \
                 THEN pg_advisory_unlock_shared({FLAG_HIGH}, {FLAG_LOW}) END, \
                 CASE WHEN t.token IS NOT NULL AND $3 \
                 THEN pg_advisory_unlock_shared({WRITER_HIGH}, {WRITER_LOW}) END \
                 FROM (SELECT CASE WHEN {readers_turn} THEN NULL \
                 WHEN pg_try_advisory_lock($1) THEN nextval('{seq}') END AS token \
                 OFFSET 0) AS t"
            ),
            try_lock_shared: format!(
                "SELECT t.writer_free, t.token, \
                 CASE WHEN t.writer_free THEN false ELSE {writer_holds} END, \
                 CASE WHEN t.token IS NOT NULL AND $3 \
                 THEN pg_advisory_unlock_shared({FLAG_HIGH}, {FLAG_LOW}) END, \
                 CASE WHEN t.token IS NOT NULL AND $4 \
                 THEN pg_advisory_unlock_shared({READERS_HIGH}, {READERS_LOW}) END \
                 FROM (SELECT w.free AS writer_free, CASE WHEN NOT w.free THEN NULL \
                 WHEN pg_try_advisory_lock_shared($1) THEN nextval('{seq}') END AS token \
                 FROM (SELECT CASE WHEN NOT $2 THEN true \
                 WHEN pg_try_advisory_xact_lock({WRITER_HIGH}, {WRITER_LOW}) THEN true \
                 ELSE NOT {writer_waits} END AS free OFFSET 0) AS w OFFSET 0) AS t"
            ),
            // CASE, not AND: its branches are evaluated in order, so a missing epoch row takes
            // no lock and draws no token.
            transaction_try_lock: format!(
                "SELECT e.current, CASE WHEN NOT e.current THEN NULL \
                 WHEN pg_try_advisory_xact_lock($1) THEN nextval('{seq}') END \
                 FROM (SELECT EXISTS (SELECT 1 FROM {epochs} WHERE sequence = '{name}') AS current \
                 OFFSET 0) AS e",
                epochs = sequence.epochs_quoted,
                name = sequence.quoted.replace('\'', "''")
            ),
            // Flat (no subquery): the cheapest form, measured. PostgreSQL evaluates the select
            // list left to right, so the flag is checked after the unlock: a waiter whose flag
            // was refused by that check retries at once and finds the key free. (Were the check
            // to run first, such a waiter would find the key still held and wait for its next
            // poll.) A key that was not held costs at most a needless wake-up.
            unlock: format!("SELECT pg_advisory_unlock($1), {}", notify_if_flagged()),
            unlock_shared: format!(
                "SELECT pg_advisory_unlock_shared($1), {}",
                notify_if_flagged()
            ),
            // Tries: the flag and the marks are held exclusively only by a statement that checks
            // them (for its length), and nothing ever waits inside the server.
            set_marks: format!(
                "SELECT CASE WHEN $2 THEN pg_try_advisory_lock_shared({FLAG_HIGH}, {FLAG_LOW}) END, \
                 CASE WHEN $3 THEN pg_try_advisory_lock_shared({WRITER_HIGH}, {WRITER_LOW}) END, \
                 CASE WHEN $4 THEN pg_try_advisory_lock_shared({READERS_HIGH}, {READERS_LOW}) END"
            ),
            clear_marks: format!(
                "SELECT CASE WHEN $2 THEN pg_advisory_unlock_shared({FLAG_HIGH}, {FLAG_LOW}) END, \
                 CASE WHEN $3 THEN pg_advisory_unlock_shared({WRITER_HIGH}, {WRITER_LOW}) END, \
                 CASE WHEN $4 THEN pg_advisory_unlock_shared({READERS_HIGH}, {READERS_LOW}) END"
            ),
            is_locked: "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                        AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                        AND classid = $1::bigint::oid AND objid = $2::bigint::oid \
                        AND objsubid = 1 AND granted)",
            // The slot's try runs first (`s`, fenced by OFFSET 0 and evaluated once), the count
            // after it (CASE evaluates its branches in order, and the count's subquery only when
            // its branch is reached), so the count includes the slot just taken and every slot
            // taken by other sessions before it: of two sessions taking a slot at once, the
            // later count sees both. `t` is fenced too, so that the token is drawn once though
            // the outer select reads it twice.
            try_permit: format!(
                "SELECT t.slot, t.token, \
                 CASE WHEN t.token IS NOT NULL AND $4 \
                 THEN pg_advisory_unlock_shared({FLAG_HIGH}, {FLAG_LOW}) END, \
                 CASE WHEN t.slot IS NOT NULL AND t.token IS NULL THEN {notify} END \
                 FROM (SELECT s.slot, CASE WHEN s.slot IS NULL THEN NULL \
                 WHEN (SELECT count(*) FROM pg_locks WHERE {PERMIT_ROWS}) <= $2 \
                 THEN nextval('{seq}') \
                 WHEN pg_advisory_unlock($1 + s.slot) THEN NULL END AS token \
                 FROM (SELECT (SELECT g.slot \
                 FROM (SELECT generate_series(0, $2 - 1) AS slot) AS g \
                 WHERE CASE WHEN g.slot = ANY($3) THEN false \
                 ELSE pg_try_advisory_lock($1 + g.slot) END \
                 LIMIT 1) AS slot OFFSET 0) AS s OFFSET 0) AS t",
                notify = notify_if_flagged()
            ),
            unlock_permit: format!(
                "SELECT pg_advisory_unlock($1 + $2), {}",
                notify_if_flagged()
            ),
            permits_held: format!("SELECT count(*) FROM pg_locks WHERE {PERMIT_ROWS}"),
            // The rows are found first (fenced by OFFSET 0), then each is unlocked, so nothing
            // outside them is ever unlocked whatever order the planner gives the conditions.
            unlock_unknown_permits: format!(
                "SELECT count(*) FILTER (WHERE CASE WHEN p.slot = ANY($2) THEN false \
                 ELSE pg_advisory_unlock($1 + p.slot) END) \
                 FROM (SELECT (objid::int8 - ($1 & 4294967295))::int4 AS slot FROM pg_locks \
                 WHERE {PERMIT_ROWS} AND pid = pg_backend_pid() OFFSET 0) AS p"
            ),
            ping: "SELECT 1",
            create_sequence: format!(
                "CREATE SEQUENCE IF NOT EXISTS {seq} AS bigint MINVALUE 1 NO CYCLE CACHE 1"
            ),
            fencing_objects: format!(
                "SELECT to_regclass('{seq}') IS NOT NULL, \
                 (SELECT relpersistence::text FROM pg_class WHERE oid = to_regclass('{epochs}')), \
                 s.seqcache, s.seqincrement, s.seqcycle, \
                 (SELECT n.nspname::text FROM pg_class c \
                  JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE c.oid = to_regclass('{UNQUALIFIED_DEFAULT_SEQUENCE}')) \
                 FROM (SELECT 1) AS one \
                 LEFT JOIN pg_sequence s ON s.seqrelid = to_regclass('{seq}')",
                seq = seq.replace('\'', "''"),
                epochs = sequence.epochs_quoted.replace('\'', "''")
            ),
            epoch_row_exists: format!(
                "SELECT EXISTS (SELECT 1 FROM {epochs} WHERE sequence = '{name}')",
                epochs = sequence.epochs_quoted,
                name = sequence.quoted.replace('\'', "''")
            ),
            create_epoch_table: format!(
                "CREATE UNLOGGED TABLE IF NOT EXISTS {epochs} (sequence text PRIMARY KEY)",
                epochs = sequence.epochs_quoted
            ),
            // No parameters (the names are validated), so that it runs as a simple query in one
            // round trip when a session opens.
            epoch_check: format!(
                "WITH marked AS (INSERT INTO {epochs} (sequence) VALUES ('{name}') \
                 ON CONFLICT DO NOTHING RETURNING 1) \
                 SELECT setval('{seq}', nextval('{seq}') + {EPOCH_JUMP}) \
                 FROM marked WHERE set_config('synchronous_commit', 'local', true) = 'local'",
                epochs = sequence.epochs_quoted,
                name = sequence.quoted.replace('\'', "''")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/postgres.md ("Locks inside your own transaction", "A client in another language",
    /// "Reader-writer locks: the shared side", "Permits") shows the statements a client in
    /// another language must run: they must be the crate's own, to the character (whitespace
    /// aside).
    #[test]
    fn the_foreign_client_section_shows_the_statements_the_crate_runs() {
        let normalize = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
        let doc = include_str!("../../../docs/postgres.md");
        let start = doc
            .find("## Locks inside your own transaction")
            .expect("the transaction locks section");
        let end = doc[start..].find("## Errors").expect("the Errors section") + start;
        let doc = normalize(&doc[start..end]);
        let sql = Statements::new(&SequenceName::parse(DEFAULT_SEQUENCE).unwrap());
        for (name, statement) in [
            ("epoch_check", sql.epoch_check.as_str()),
            ("try_lock", &sql.try_lock),
            ("unlock", &sql.unlock),
            ("set_marks", &sql.set_marks),
            ("try_lock_unflag", &sql.try_lock_unflag),
            ("clear_marks", &sql.clear_marks),
            ("try_lock_shared", &sql.try_lock_shared),
            ("unlock_shared", &sql.unlock_shared),
            ("is_locked", sql.is_locked),
            ("transaction_try_lock", &sql.transaction_try_lock),
            ("try_permit", &sql.try_permit),
            ("unlock_permit", &sql.unlock_permit),
            ("permits_held", &sql.permits_held),
            ("unlock_unknown_permits", &sql.unlock_unknown_permits),
        ] {
            assert!(
                doc.contains(&normalize(statement)),
                "docs/postgres.md does not show the {name} statement as the crate runs it:\n{statement}"
            );
        }
    }

    #[test]
    fn sequence_names_are_checked_and_quoted() {
        assert_eq!(
            SequenceName::parse("locks.fencing").unwrap().quoted,
            "\"locks\".\"fencing\""
        );
        assert_eq!(
            SequenceName::parse(DEFAULT_SEQUENCE).unwrap().quoted,
            "\"public\".\"k1s0_lock_fencing_seq\""
        );
        assert_eq!(
            SequenceName::parse("locks.fencing").unwrap().epochs_quoted,
            "\"locks\".\"k1s0_lock_fencing_epochs\""
        );
        assert_eq!(
            SequenceName::parse(DEFAULT_SEQUENCE).unwrap().epochs_quoted,
            "\"public\".\"k1s0_lock_fencing_epochs\""
        );
        for bad in [
            "",
            "a.b.c",
            "1seq",
            "seq'; DROP TABLE x; --",
            "a b",
            "\"q\"",
            &"s".repeat(64),
        ] {
            assert!(
                matches!(
                    SequenceName::parse(bad),
                    Err(LockError::InvalidConfig { .. })
                ),
                "{bad:?} was accepted"
            );
        }
    }
}
