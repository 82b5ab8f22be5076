//! How spans and log events show a lock's key.

use std::fmt;

/// How the spans and log events of lock operations show the key ([`LockConfig::trace_keys`](crate::LockConfig::trace_keys)).
///
/// Keys can carry personal data (a user id, an e-mail address). Metrics never carry the key in
/// any form: one series per key would grow without bound.
///
/// ```
/// use k1s0_distributed_lock::{KeyVisibility, LockConfig};
///
/// let config = LockConfig::new().trace_keys(KeyVisibility::Raw);
/// assert_eq!(config.get_trace_keys(), KeyVisibility::Raw);
/// assert_eq!(LockConfig::new().get_trace_keys(), KeyVisibility::Hashed);
/// assert_eq!(KeyVisibility::Hashed.render("order:42").as_deref(), Some("fnv1a64:0cef508660eaa9b1"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyVisibility {
    /// The key as given.
    Raw,
    /// `fnv1a64:` and the 64-bit FNV-1a hash of the key's bytes in 16 hex digits: the same
    /// key gives the same text in every process (and in any language that computes FNV-1a),
    /// so the spans of one key can be followed without showing it. It hides the key from a
    /// reader, not from someone who can guess candidate keys and hash them.
    #[default]
    Hashed,
    /// No key at all.
    Hidden,
}

impl KeyVisibility {
    /// The text a span shows for `key`, or `None` for [`Hidden`](Self::Hidden).
    pub fn render(self, key: &str) -> Option<String> {
        self.shown(key).map(|shown| shown.to_string())
    }

    /// `key` as a span's `key` field shows it, or `None` for [`Hidden`](Self::Hidden) (the
    /// field stays empty). Formatted only if the span is recorded.
    pub(crate) fn shown(self, key: &str) -> Option<ShownKey<'_>> {
        (self != KeyVisibility::Hidden).then(|| self.show(key))
    }

    /// `key` as a log event's `key` field shows it: formatted only if the event is written,
    /// and `hidden` for [`Hidden`](Self::Hidden).
    pub(crate) fn show(self, key: &str) -> ShownKey<'_> {
        ShownKey { key, keys: self }
    }
}

/// A key in a log event, as its [`KeyVisibility`] says (`key = %keys.show(key)`).
pub(crate) struct ShownKey<'a> {
    key: &'a str,
    keys: KeyVisibility,
}

impl fmt::Display for ShownKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.keys {
            KeyVisibility::Raw => f.write_str(self.key),
            KeyVisibility::Hashed => write!(f, "fnv1a64:{:016x}", fnv1a64(self.key.as_bytes())),
            KeyVisibility::Hidden => f.write_str("hidden"),
        }
    }
}

/// FNV-1a, 64 bit.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
