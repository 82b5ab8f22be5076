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

use crate::backend::want::Want;
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

/// The names of everything one key uses in Redis for what an acquire asks of it: its lock
/// (either side), or its permits. Each variant's scripts are picked by the caller
/// ([`LockRef`](super::handle::LockRef), the acquire).
#[derive(Debug, Clone)]
pub(crate) enum LockKeys {
    Lock(LockNames),
    Permits(PermitNames),
}

/// The names of a key's lock.
#[derive(Debug, Clone)]
pub(crate) struct LockNames {
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

/// The names of a key's permits: a namespace of their own beside the lock's, in the same hash
/// slot, with the lock's fencing counter.
#[derive(Debug, Clone)]
pub(crate) struct PermitNames {
    /// `<prefix>{<escaped>}`, the lock's own name: *extend*'s first key, which a permit's
    /// (`s:`) token leaves untouched.
    pub(crate) lock: String,
    /// `…:permits`: a sorted set of the permit holders' tokens scored by the end of their
    /// lease (server time in ms).
    pub(crate) permits: String,
    /// `…:fence`: the key's fencing counter, shared with its lock.
    pub(crate) fence: String,
    /// `…:permits:line`: waiter tokens scored by their place in line (arrival order).
    pub(crate) line: String,
    /// `…:permits:waiters`: the same tokens scored by the deadline of their place.
    pub(crate) waiters: String,
    /// `…:permits:released`: the prefix of the waiters' channels, `…:permits:released:<token>`.
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
/// The suffix of the permit holders' sorted set; the permits' line, waiters and channels
/// follow it (`…:permits:line`…), so no permit name can equal a lock name of the same key.
pub(crate) const PERMITS: &str = ":permits";

/// The lock's own key, `<prefix>{<escaped key>}`, without the other names.
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
    /// The names in Redis of what `want` asks for on `key`.
    pub(crate) fn of(want: Want, prefix: &str, key: &str) -> Self {
        match want {
            Want::Lock(_) => LockKeys::lock(prefix, key),
            Want::Permit { .. } => LockKeys::permits(prefix, key),
        }
    }

    /// The names of `key`'s lock.
    pub(crate) fn lock(prefix: &str, key: &str) -> Self {
        LockKeys::Lock(LockNames::new(prefix, key))
    }

    /// The names of `key`'s permits.
    pub(crate) fn permits(prefix: &str, key: &str) -> Self {
        LockKeys::Permits(PermitNames::new(prefix, key))
    }

    /// The prefix of the waiters' channels: a waiter is told on `<channel>:<its token>`.
    pub(crate) fn channel(&self) -> &str {
        match self {
            LockKeys::Lock(names) => &names.channel,
            LockKeys::Permits(names) => &names.channel,
        }
    }

    /// `KEYS` of *extend*, which renews either kind of holder: the lock, and the sorted set
    /// that holds a shared holder (`…:readers`, or `…:permits` for a permit).
    pub(crate) fn extending(&self) -> [&str; 2] {
        match self {
            LockKeys::Lock(names) => [&names.lock, &names.readers],
            LockKeys::Permits(names) => [&names.lock, &names.permits],
        }
    }
}

impl LockNames {
    pub(crate) fn new(prefix: &str, key: &str) -> Self {
        let lock = lock_name(prefix, key);
        LockNames {
            fence: with_suffix(&lock, FENCE),
            line: with_suffix(&lock, LINE),
            waiters: with_suffix(&lock, WAITERS),
            readers: with_suffix(&lock, READERS),
            writers: with_suffix(&lock, WRITERS),
            channel: with_suffix(&lock, RELEASED),
            lock,
        }
    }

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

impl PermitNames {
    pub(crate) fn new(prefix: &str, key: &str) -> Self {
        let lock = lock_name(prefix, key);
        let permits = with_suffix(&lock, PERMITS);
        PermitNames {
            fence: with_suffix(&lock, FENCE),
            line: with_suffix(&permits, LINE),
            waiters: with_suffix(&permits, WAITERS),
            channel: with_suffix(&permits, RELEASED),
            permits,
            lock,
        }
    }

    /// `KEYS` of *permit_acquire*: permits, fence, line, waiters.
    pub(crate) fn taking(&self) -> [&str; 4] {
        [&self.permits, &self.fence, &self.line, &self.waiters]
    }

    /// `KEYS` of *permit_release* and *permit_abandon*: permits, line, waiters.
    pub(crate) fn freeing(&self) -> [&str; 3] {
        [&self.permits, &self.line, &self.waiters]
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
            let keys = LockNames::new("lock:", user_key);
            let permits = PermitNames::new("lock:", user_key);
            let tag = hash_tag(&keys.lock);
            for name in keys.taking().into_iter().chain(permits.taking()) {
                assert_eq!(hash_tag(name), tag, "{name:?}");
            }
            assert!(!tag.contains('}'));
        }
    }

    #[test]
    fn escaping_is_injective_and_readable() {
        let keys = ["{", "%7B", "%", "%25", "}", "%7D", "a{b", "a%7Bb"];
        let locks: std::collections::HashSet<_> =
            keys.iter().map(|k| LockNames::new("p:", k).lock).collect();
        assert_eq!(locks.len(), keys.len());
        assert_eq!(LockNames::new("lock:", "order:42").lock, "lock:{order:42}");
        assert_eq!(LockNames::new("lock:", "a{b}%").lock, "lock:{a%7Bb%7D%25}");
    }

    /// A key's permits live beside its lock: names of their own (their waiters' channels
    /// included), the lock's fencing counter.
    #[test]
    fn permit_names_are_their_own_but_share_the_fence() {
        let lock = LockNames::new("lock:", "k");
        let permits = PermitNames::new("lock:", "k");
        assert_eq!(permits.permits, "lock:{k}:permits");
        assert_eq!(permits.line, "lock:{k}:permits:line");
        assert_eq!(permits.waiters, "lock:{k}:permits:waiters");
        assert_eq!(permits.channel, "lock:{k}:permits:released");
        assert_eq!(permits.fence, lock.fence);
        assert_eq!(permits.lock, lock.lock);
        let lock_names: std::collections::HashSet<&str> = lock
            .taking()
            .into_iter()
            .chain([lock.channel.as_str()])
            .collect();
        for name in [
            &permits.permits,
            &permits.line,
            &permits.waiters,
            &permits.channel,
        ] {
            assert!(!lock_names.contains(name.as_str()), "{name}");
        }
        // Waiters' channels are `<prefix>:<token>`: neither prefix starts the other.
        assert!(!permits.channel.starts_with(&format!("{}:", lock.channel)));
        assert!(!lock.channel.starts_with(&format!("{}:", permits.channel)));
    }

    #[test]
    fn braces_in_the_prefix_are_refused() {
        assert!(validate_prefix("app:{x}:").is_err());
        assert!(validate_prefix("app:").is_ok());
        assert!(validate_prefix("").is_ok());
    }
}
