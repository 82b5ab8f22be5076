//! [`Want`]: what an acquire asks of a key, one side of its lock or one of its permits, for
//! the backends whose acquire path serves both.

use super::semaphore::validate_limit;
use crate::{LockError, LockMode};

/// How spans and metrics name a permit acquisition (`lock_mode`).
pub(crate) const PERMIT_LABEL: &str = "permit";

/// What an acquire asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// The key's lock, on this side.
    Lock(LockMode),
    /// One of the key's permits, while fewer than `limit` are held.
    Permit { limit: u32 },
}

impl Want {
    /// `exclusive`, `shared` or `permit`, as spans and metrics show it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Want::Lock(mode) => mode.as_str(),
            Want::Permit { .. } => PERMIT_LABEL,
        }
    }

    /// The mode of the guard it gets: a permit's holders coexist, like shared ones.
    pub(crate) fn mode(self) -> LockMode {
        match self {
            Want::Lock(mode) => mode,
            Want::Permit { .. } => LockMode::Shared,
        }
    }

    /// Refuses what no backend can grant: a permit limit of 0.
    pub(crate) fn validate(self) -> Result<(), LockError> {
        match self {
            Want::Lock(_) => Ok(()),
            Want::Permit { limit } => validate_limit(limit),
        }
    }
}
