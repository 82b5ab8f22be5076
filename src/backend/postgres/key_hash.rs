//! The mapping from a lock key to PostgreSQL's 64-bit advisory lock key.
//!
//! `advisory_key(key)` = the first 8 bytes of SHA-256 over the key's UTF-8 bytes, read as a
//! big-endian two's-complement `i64`. Any language reproduces it; in SQL:
//!
//! ```sql
//! SELECT ('x' || encode(substring(sha256(convert_to('order:42', 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint;
//! -- -2708853543617250617
//! ```
//!
//! The key never travels to the server, only this number, so quotes, backslashes and NUL bytes
//! in keys cannot reach SQL text.

use sha2::{Digest, Sha256};

/// The advisory lock key (`pg_advisory_lock(bigint)`) of a lock key.
pub(crate) fn advisory_key(key: &str) -> i64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The two halves of an advisory key as PostgreSQL's `pg_locks` shows them for the bigint form
/// (`classid` = high 32 bits, `objid` = low 32 bits, both unsigned), widened to `i64` so they
/// bind as `bigint` and cast to `oid`.
pub(crate) fn pg_locks_halves(key: i64) -> (i64, i64) {
    let bits = key as u64;
    (i64::from((bits >> 32) as u32), i64::from(bits as u32))
}

/// The same halves as signed 32-bit integers, for the two-argument advisory lock functions
/// (`pg_advisory_lock_shared(int, int)`), which live in a lock space separate from the bigint
/// form. The backend uses that space for its "a waiter in another process" flag.
pub(crate) fn flag_key(key: i64) -> (i32, i32) {
    let bits = key as u64;
    ((bits >> 32) as u32 as i32, bits as u32 as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_documented_test_vectors() {
        // First 8 bytes of SHA-256, big-endian. Also in docs/postgres.md.
        assert_eq!(advisory_key("order:42"), -2_708_853_543_617_250_617); // da68380de022bac7
        assert_eq!(advisory_key("ключ"), 2_153_681_812_738_117_024); // 1de36a32af798da0
        assert_eq!(advisory_key("a'b\\c\0d"), 807_657_165_946_115_799); // 0b355fe9cc8456d7
    }

    #[test]
    fn halves_recombine_to_the_key() {
        for key in [0_i64, -1, i64::MIN, i64::MAX, advisory_key("order:42")] {
            let (high, low) = pg_locks_halves(key);
            assert!((0..=i64::from(u32::MAX)).contains(&high));
            assert!((0..=i64::from(u32::MAX)).contains(&low));
            assert_eq!(((high as u64) << 32 | low as u64) as i64, key);
            let (flag_high, flag_low) = flag_key(key);
            assert_eq!(flag_high as u32 as i64, high);
            assert_eq!(flag_low as u32 as i64, low);
        }
    }
}
