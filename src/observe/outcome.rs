//! The labels of an operation: how it was called and how it ended.

use crate::LockError;

/// How an acquire was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `try_acquire`: at once or never.
    Try,
    /// `acquire`: within the waiting budget.
    Wait,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Try => "try",
            Mode::Wait => "wait",
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Done: the lock taken, released or extended.
    Ok,
    /// Someone else holds the key (`AlreadyLocked`).
    Conflict,
    /// The waiting budget ran out (`Timeout`).
    Timeout,
    /// The lock was gone (`LockLost`).
    Lost,
    /// The backend failed or did not answer (`BackendError`).
    Error,
    /// A key or configuration the lock refuses (`InvalidKey`, `InvalidConfig`).
    Invalid,
}

impl Outcome {
    pub(crate) fn of<T>(result: &Result<T, LockError>) -> Self {
        match result {
            Ok(_) => Outcome::Ok,
            Err(LockError::AlreadyLocked) => Outcome::Conflict,
            Err(LockError::Timeout) => Outcome::Timeout,
            Err(LockError::LockLost) => Outcome::Lost,
            Err(LockError::BackendError(_)) => Outcome::Error,
            Err(LockError::InvalidKey { .. } | LockError::InvalidConfig { .. }) => Outcome::Invalid,
        }
    }

    /// The label: `acquired` for a successful acquire, `ok` for the other operations.
    pub(crate) fn label(self, acquire: bool) -> &'static str {
        match self {
            Outcome::Ok if acquire => "acquired",
            Outcome::Ok => "ok",
            Outcome::Conflict => "conflict",
            Outcome::Timeout => "timeout",
            Outcome::Lost => "lost",
            Outcome::Error => "error",
            Outcome::Invalid => "invalid",
        }
    }
}
