//! Lock key validation, shared by every backend.

use crate::LockError;

/// The longest key, in bytes of UTF-8, that any backend accepts.
///
/// Longer keys get [`LockError::InvalidKey`]. Keys may otherwise hold any UTF-8, including
/// spaces, quotes, braces, newlines and NUL: backends send them as bound parameters or hash
/// them, never splice them into SQL or Lua.
pub const MAX_KEY_LEN: usize = 512;

/// Checks a key against the rules every backend shares.
///
/// ```
/// use k1s0_distributed_lock::{validate_key, LockError, MAX_KEY_LEN};
///
/// assert!(validate_key("order:42").is_ok());
/// assert!(matches!(validate_key(""), Err(LockError::InvalidKey { .. })));
/// assert!(matches!(validate_key(&"k".repeat(MAX_KEY_LEN + 1)), Err(LockError::InvalidKey { .. })));
/// ```
pub fn validate_key(key: &str) -> Result<(), LockError> {
    if key.is_empty() {
        return Err(LockError::invalid_key("the key is empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(LockError::invalid_key(format!(
            "the key is {} bytes long; the maximum is {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}
