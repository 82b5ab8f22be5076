//! What an acquire asks of a key: one side of its lock, or one of its permits.

use super::keys::LockKeys;
use crate::LockMode;

/// What an acquire asks for. The waiting loop is the same for all; the keys, the scripts and
/// whether the tasks of the lock object take turns in the process differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// The key's lock, on this side.
    Lock(LockMode),
    /// One of the key's permits, while fewer than `limit` are held.
    Permit { limit: u32 },
}

impl Want {
    /// `exclusive`, `shared` or `permit`, as spans show it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Want::Lock(mode) => mode.as_str(),
            Want::Permit { .. } => "permit",
        }
    }

    /// The mode of the token and of the guard: a permit's holders coexist, like shared ones,
    /// and its token is a shared (`s:`) one.
    pub(crate) fn mode(self) -> LockMode {
        match self {
            Want::Lock(mode) => mode,
            Want::Permit { .. } => LockMode::Shared,
        }
    }

    /// The names in Redis of what this asks for on `key`.
    pub(crate) fn keys(self, prefix: &str, key: &str) -> LockKeys {
        match self {
            Want::Lock(_) => LockKeys::lock(prefix, key),
            Want::Permit { .. } => LockKeys::permits(prefix, key),
        }
    }
}
