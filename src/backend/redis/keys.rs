//! The Redis key names of one lock: prefix, hash tag and the escaping of the user's key.
//!
//! Every key of one lock is `<prefix>{<escaped key>}<suffix>`. The escaping replaces `%` by
//! `%25`, `{` by `%7B` and `}` by `%7D` and leaves every other byte alone, so:
//!
//! * the hash tag (the text between the first `{` and the first `}` after it) is exactly the
//!   escaped user key — the prefix may not contain braces — and all keys of one lock map to
//!   the same Redis Cluster slot;
//! * distinct user keys give distinct escaped keys (percent-escaping is injective), and no key
//!   of one lock can equal a key of another, because the escaped key never contains `}`.

use crate::LockError;

/// The default key prefix.
pub(crate) const DEFAULT_PREFIX: &str = "lock:";
/// The longest key prefix accepted, in bytes.
pub(crate) const MAX_PREFIX_LEN: usize = 256;

/// Checks a key prefix given to the builder.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), LockError> {
    if prefix.contains(['{', '}']) {
        return Err(LockError::invalid_config(format!(
            "key prefix {prefix:?} contains a brace: the lock keys carry their own hash tag"
        )));
    }
    if prefix.len() > MAX_PREFIX_LEN {
        return Err(LockError::invalid_config(format!(
            "key prefix is {} bytes long; the maximum is {MAX_PREFIX_LEN}",
            prefix.len()
        )));
    }
    Ok(())
}

/// The names of everything one lock uses in Redis.
#[derive(Debug, Clone, Default)]
pub(crate) struct LockKeys {
    /// `<prefix>{<escaped>}`: the lock itself, value = holder token, with a PX expiry.
    pub(crate) lock: String,
    /// `…:fence`: the last fencing token handed out for this key.
    pub(crate) fence: String,
    /// `…:line`: a sorted set of waiter tokens scored by their place in line (arrival order).
    pub(crate) line: String,
    /// `…:waiters`: a sorted set of waiter tokens scored by the deadline of their queue entry.
    pub(crate) waiters: String,
    /// `…:readers`: a sorted set of the shared holders' tokens scored by the end of their
    /// lease (server time in ms).
    pub(crate) readers: String,
    /// `…:writers`: the exclusive waiters of `line`, with the same scores (their places).
    pub(crate) writers: String,
    /// `…:released`: the prefix of the waiters' pub/sub channels: a release tells the next
    /// waiter on `…:released:<its token>`.
    pub(crate) channel: String,
}

const FENCE: &str = ":fence";
const LINE: &str = ":line";
/// The suffix of the waiters' sorted set, for callers that need only it and the lock.
pub(crate) const WAITERS: &str = ":waiters";
/// The suffix of the shared holders' sorted set, for callers that need only it.
pub(crate) const READERS: &str = ":readers";
const WRITERS: &str = ":writers";
const RELEASED: &str = ":released";

/// The lock's own key, `<prefix>{<escaped key>}`, without the other four names.
pub(crate) fn lock_name(prefix: &str, key: &str) -> String {
    let mut lock = String::with_capacity(prefix.len() + key.len() + 2);
    lock.push_str(prefix);
    lock.push('{');
    escape_into(key, &mut lock);
    lock.push('}');
    lock
}

/// `lock` followed by `suffix`, in one allocation.
pub(crate) fn with_suffix(lock: &str, suffix: &str) -> String {
    let mut name = String::with_capacity(lock.len() + suffix.len());
    name.push_str(lock);
    name.push_str(suffix);
    name
}

impl LockKeys {
    pub(crate) fn new(prefix: &str, key: &str) -> Self {
        let lock = lock_name(prefix, key);
        LockKeys {
            fence: with_suffix(&lock, FENCE),
            line: with_suffix(&lock, LINE),
            waiters: with_suffix(&lock, WAITERS),
            readers: with_suffix(&lock, READERS),
            writers: with_suffix(&lock, WRITERS),
            channel: with_suffix(&lock, RELEASED),
            lock,
        }
    }
}

impl LockKeys {
    /// `KEYS` of the scripts that take the lock and draw a fencing token (*acquire*,
    /// *hand_over*): lock, fence, line, waiters, readers, writers.
    pub(crate) fn taking(&self) -> [&str; 6] {
        [
            &self.lock,
            &self.fence,
            &self.line,
            &self.waiters,
            &self.readers,
            &self.writers,
        ]
    }

    /// `KEYS` of the scripts that free the key and tell waiters (*release*, *abandon*): lock,
    /// line, waiters, readers, writers.
    pub(crate) fn freeing(&self) -> [&str; 5] {
        [
            &self.lock,
            &self.line,
            &self.waiters,
            &self.readers,
            &self.writers,
        ]
    }
}

/// Appends `key` with `%`, `{` and `}` percent-escaped.
fn escape_into(key: &str, out: &mut String) {
    let mut rest = key;
    while let Some(at) = rest.find(['%', '{', '}']) {
        out.push_str(&rest[..at]);
        out.push_str(match rest.as_bytes()[at] {
            b'%' => "%25",
            b'{' => "%7B",
            _ => "%7D",
        });
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash tag of a key by Redis Cluster's rule.
    fn hash_tag(key: &str) -> &str {
        if let Some(open) = key.find('{') {
            if let Some(len) = key[open + 1..].find('}') {
                if len > 0 {
                    return &key[open + 1..open + 1 + len];
                }
            }
        }
        key
    }

    #[test]
    fn every_key_of_a_lock_shares_one_hash_tag() {
        for user_key in ["plain", "{", "}", "{x}", "a}b{c", "%7B", "日本 *\n", "}{"] {
            let keys = LockKeys::new("lock:", user_key);
            let tag = hash_tag(&keys.lock);
            for name in [
                &keys.fence,
                &keys.line,
                &keys.waiters,
                &keys.readers,
                &keys.writers,
            ] {
                assert_eq!(hash_tag(name), tag, "{name:?}");
            }
            assert!(!tag.contains('}'));
        }
    }

    #[test]
    fn escaping_is_injective_and_readable() {
        let keys = ["{", "%7B", "%", "%25", "}", "%7D", "a{b", "a%7Bb"];
        let locks: std::collections::HashSet<_> =
            keys.iter().map(|k| LockKeys::new("p:", k).lock).collect();
        assert_eq!(locks.len(), keys.len());
        assert_eq!(LockKeys::new("lock:", "order:42").lock, "lock:{order:42}");
        assert_eq!(LockKeys::new("lock:", "a{b}%").lock, "lock:{a%7Bb%7D%25}");
    }

    #[test]
    fn braces_in_the_prefix_are_refused() {
        assert!(validate_prefix("app:{x}:").is_err());
        assert!(validate_prefix("app:").is_ok());
        assert!(validate_prefix("").is_ok());
    }
}
