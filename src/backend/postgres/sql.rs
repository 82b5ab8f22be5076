//! The SQL the backend sends. Keys travel only as bound `bigint`/`int` parameters; the one
//! spliced name is the fencing sequence, checked by [`SequenceName::parse`].

use crate::LockError;

/// The `LISTEN` channel on which a release announces a key that a waiter in another process
/// flagged. The payload is the advisory key in decimal.
pub(super) const NOTIFY_CHANNEL: &str = "k1s0_distributed_lock";

/// The default fencing sequence.
pub(super) const DEFAULT_SEQUENCE: &str = "k1s0_lock_fencing_seq";

/// A validated, possibly schema-qualified sequence name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SequenceName {
    /// Quoted identifier(s), ready to splice: `"schema"."name"` or `"name"`.
    quoted: String,
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
        let quoted = parts
            .iter()
            .map(|part| format!("\"{part}\""))
            .collect::<Vec<_>>()
            .join(".");
        Ok(SequenceName { quoted })
    }
}

/// Every statement of one lock service, built once.
#[derive(Debug)]
pub(super) struct Statements {
    /// `$1` advisory key → the fencing token if the lock was taken, else NULL.
    pub(super) try_lock: String,
    /// Like `try_lock`, and on success also drops this session's waiter flag
    /// (`$2`, `$3` = [`flag_key`](super::key_hash::flag_key)) in the same statement.
    pub(super) try_lock_unflag: String,
    /// `$1` key, `$2`/`$3` flag halves → (released, notified). Notifies [`NOTIFY_CHANNEL`]
    /// with the key in decimal when some session holds the key's waiter flag.
    pub(super) unlock: String,
    /// `$1`/`$2` flag halves.
    pub(super) set_flag: &'static str,
    /// `$1`/`$2` flag halves.
    pub(super) clear_flag: &'static str,
    /// `$1`/`$2` `pg_locks` halves → whether any session holds the key.
    pub(super) is_locked: &'static str,
    /// A round trip that proves the session is alive.
    pub(super) ping: &'static str,
    /// Creates the fencing sequence if it does not exist.
    pub(super) create_sequence: String,
}

impl Statements {
    pub(super) fn new(sequence: &SequenceName) -> Self {
        let seq = &sequence.quoted;
        Statements {
            try_lock: format!(
                "SELECT CASE WHEN pg_try_advisory_lock($1) THEN nextval('{seq}') END"
            ),
            try_lock_unflag: format!(
                "SELECT t.token, CASE WHEN t.token IS NOT NULL \
                 THEN pg_advisory_unlock_shared($2, $3) END \
                 FROM (SELECT CASE WHEN pg_try_advisory_lock($1) THEN nextval('{seq}') END AS token \
                 OFFSET 0) AS t"
            ),
            // Flat (no subquery): the cheapest form, measured. Whatever order the server
            // evaluates the two columns in, a flagged key is notified at commit, and a key that
            // was not held costs at most a needless wake-up. Only a notifying release writes a
            // commit record (NOTIFY needs a transaction id); nothing in it needs to be durable,
            // so it does not wait for the WAL flush.
            unlock: format!(
                "SELECT pg_advisory_unlock($1), \
                 CASE WHEN pg_try_advisory_xact_lock($2, $3) THEN false \
                 ELSE (set_config('synchronous_commit', 'off', true) \
                 || pg_notify('{NOTIFY_CHANNEL}', $1::text)::text) IS NOT NULL END"
            ),
            set_flag: "SELECT pg_advisory_lock_shared($1, $2)",
            clear_flag: "SELECT pg_advisory_unlock_shared($1, $2)",
            is_locked: "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                        AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                        AND classid = $1::bigint::oid AND objid = $2::bigint::oid \
                        AND objsubid = 1 AND granted)",
            ping: "SELECT 1",
            create_sequence: format!(
                "CREATE SEQUENCE IF NOT EXISTS {seq} AS bigint MINVALUE 1 NO CYCLE CACHE 1"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_names_are_checked_and_quoted() {
        assert_eq!(
            SequenceName::parse("locks.fencing").unwrap().quoted,
            "\"locks\".\"fencing\""
        );
        assert_eq!(
            SequenceName::parse(DEFAULT_SEQUENCE).unwrap().quoted,
            "\"k1s0_lock_fencing_seq\""
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
