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

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The advisory lock key (`pg_advisory_lock(bigint)`) of a lock key.
pub(crate) fn advisory_key(key: &str) -> i64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// What an advisory key is XORed with to give its permit base: "permit" in ASCII, in the high
/// 48 bits. Not 0, not all ones and not `0x5555…`, so a permit base differs in its high 48 bits
/// from the key's own advisory key, its waiter flag and its two marks (see [`permit_base`]).
const PERMIT_XOR: i64 = 0x7065_726D_6974_0000;

/// How many permits a key can have on PostgreSQL: the slots `0..MAX_PERMITS` of a permit base.
pub(crate) const MAX_PERMITS: u32 = 1 << 16;

/// The permit base of an advisory key: `(advisory ^ 0x7065_726D_6974_0000)` with its low 16
/// bits cleared. Permit `i` of the key (`0 ≤ i < limit ≤ 65,536`) is the bigint advisory lock
/// `base + i`, so a key's permits are the advisory locks whose high 48 bits are the base's; those
/// bits differ from the advisory key's own, so no permit is ever the key's lock. The permits'
/// waiter flag is the base in the two-`int4` key space, as a lock's is its advisory key, and
/// their notifications carry the base.
pub(crate) fn permit_base(advisory: i64) -> i64 {
    (advisory ^ PERMIT_XOR) & !(MAX_PERMITS as i64 - 1)
}

/// Remembers the advisory keys of recently used lock keys. SHA-256 of a short key costs about
/// a microsecond on a CPU without SHA instructions (this VM's), a noticeable share of an
/// uncontended `try_acquire` + `release`; a hot key (one that many requests lock in turn) then
/// pays it once. A direct-mapped table of [`SLOTS`](Self::SLOTS) entries: a key evicts whatever
/// shared its slot, and a slot that another task is using at that moment is simply skipped.
pub(crate) struct AdvisoryKeyCache {
    slots: Box<[Mutex<Option<CachedKey>>]>,
    hashing: AdvisoryKeyHashing,
}

/// A lock key and its advisory key.
type CachedKey = (String, i64);

impl AdvisoryKeyCache {
    const SLOTS: usize = 256;

    /// [`advisory_key`] of `key`, from the table if it is there.
    pub(crate) fn advisory_key(&self, key: &str) -> i64 {
        let slot = (self.hashing.hash_one(key) as usize) & (Self::SLOTS - 1);
        let Ok(mut entry) = self.slots[slot].try_lock() else {
            return advisory_key(key);
        };
        match &mut *entry {
            Some((cached, advisory)) if cached == key => *advisory,
            Some((cached, advisory)) => {
                // Reuses the evicted key's buffer.
                *advisory = advisory_key(key);
                cached.clear();
                cached.push_str(key);
                *advisory
            }
            empty => {
                let advisory = advisory_key(key);
                *empty = Some((key.to_owned(), advisory));
                advisory
            }
        }
    }
}

impl Default for AdvisoryKeyCache {
    fn default() -> Self {
        AdvisoryKeyCache {
            slots: (0..Self::SLOTS).map(|_| Mutex::new(None)).collect(),
            hashing: AdvisoryKeyHashing::default(),
        }
    }
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
/// form. The backend uses that space for its waiter flag and marks (the server computes them
/// from the advisory key, see `sql`; these give the tests the same numbers).
#[cfg(test)]
pub(crate) fn flag_key(key: i64) -> (i32, i32) {
    let bits = key as u64;
    ((bits >> 32) as u32 as i32, bits as u32 as i32)
}

/// The writer-waiting mark of an advisory key: the halves (as [`flag_key`]) of the key with
/// every bit inverted. A session holds it (shared) while an exclusive acquire of its process
/// waits for the key on the server; a shared try that heeds it takes nothing meanwhile.
#[cfg(test)]
pub(crate) fn writer_mark_key(key: i64) -> (i32, i32) {
    flag_key(!key)
}

/// What the readers'-turn mark's key is XORed with: alternate bits, so that it differs from
/// the key, from the waiter flag and from the writer-waiting mark in every half.
#[cfg(test)]
const READERS_MARK_XOR: i64 = 0x5555_5555_5555_5555;

/// The readers'-turn mark of an advisory key: the halves (as [`flag_key`]) of the key XOR
/// `0x5555_5555_5555_5555`. A session holds it (shared) while a shared acquire of its process
/// that found the key held exclusively waits for it; an exclusive try takes nothing meanwhile.
#[cfg(test)]
pub(crate) fn readers_mark_key(key: i64) -> (i32, i32) {
    flag_key(key ^ READERS_MARK_XOR)
}

/// A map keyed by advisory key. Advisory keys are already uniform (SHA-256), so they only need
/// mixing with a per-map random seed, not SipHash: a keyed folded multiply, which spreads every
/// bit of the key over the bucket bits so that keys ground to share low bits do not collide.
pub(crate) type AdvisoryKeyMap<V> = HashMap<i64, V, AdvisoryKeyHashing>;

/// The [`BuildHasher`] of [`AdvisoryKeyMap`]: a random seed per map.
#[derive(Clone)]
pub(crate) struct AdvisoryKeyHashing {
    seed: u64,
}

impl Default for AdvisoryKeyHashing {
    fn default() -> Self {
        AdvisoryKeyHashing {
            seed: RandomState::new().hash_one(0_u64) | 1,
        }
    }
}

impl BuildHasher for AdvisoryKeyHashing {
    type Hasher = AdvisoryKeyHasher;

    fn build_hasher(&self) -> AdvisoryKeyHasher {
        AdvisoryKeyHasher { state: self.seed }
    }
}

/// See [`AdvisoryKeyHashing`].
pub(crate) struct AdvisoryKeyHasher {
    state: u64,
}

impl AdvisoryKeyHasher {
    fn mix(&mut self, value: u64) {
        const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;
        let product = u128::from(self.state ^ value) * u128::from(MULTIPLIER);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for AdvisoryKeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0_u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_i64(&mut self, value: i64) {
        self.mix(value as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
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
    fn permit_bases_match_the_documented_test_vector_and_never_meet_the_key_s_own_locks() {
        // Also in docs/postgres.md ("Permits"), which the next test reads.
        let key = advisory_key("order:42");
        let base = permit_base(key);
        assert_eq!(base, -6_193_212_134_083_133_440); // aa0d4a6089560000
        assert_eq!(flag_key(base), (-1_441_969_568, -1_990_852_608));
        assert_eq!(pg_locks_halves(base), (2_852_997_728, 2_304_114_688));
        // Every slot has the base's high 48 bits, which are never those of the key itself,
        // of its waiter flag or of its marks.
        for advisory in [0_i64, -1, i64::MIN, i64::MAX, key, 0x5555_5555_5555_5555] {
            let base = permit_base(advisory);
            assert_eq!(base & 0xFFFF, 0);
            for other in [advisory, !advisory, advisory ^ READERS_MARK_XOR] {
                assert_ne!(base >> 16, other >> 16, "{advisory:#x}");
            }
        }
    }

    #[test]
    fn the_documented_permit_vector_is_the_crate_s() {
        let doc = include_str!("../../../docs/postgres.md");
        let start = doc.find("## Permits").expect("the permits section");
        let section = &doc[start..];
        let base = permit_base(advisory_key("order:42"));
        let (high, low) = flag_key(base);
        let (classid, objid) = pg_locks_halves(base);
        for expected in [
            format!("`{base}`"),
            format!("`{high}`, `{low}`"),
            format!("`{classid}`, `{objid}`"),
        ] {
            assert!(
                section.contains(&expected),
                "docs/postgres.md (Permits) lacks {expected}"
            );
        }
    }

    #[test]
    fn the_marks_match_the_documented_test_vectors() {
        // Also in docs/postgres.md ("Reader-writer locks: the shared side"), which the test
        // below reads.
        let key = advisory_key("order:42");
        assert_eq!(flag_key(key), (-630_704_115, -534_594_873));
        assert_eq!(writer_mark_key(key), (630_704_114, 534_594_872));
        assert_eq!(readers_mark_key(key), (-1_891_799_720, -1_250_431_086));
    }

    #[test]
    fn the_documented_mark_halves_are_the_crate_s() {
        let doc = include_str!("../../../docs/postgres.md");
        let start = doc
            .find("## Reader-writer locks: the shared side")
            .expect("the shared-side section");
        let section = &doc[start..];
        let key = advisory_key("order:42");
        for (name, (high, low)) in [
            ("waiter flag F", flag_key(key)),
            ("writer-waiting mark W", writer_mark_key(key)),
            ("readers' turn mark R", readers_mark_key(key)),
        ] {
            let halves = format!("`{high}`, `{low}`");
            assert!(
                section
                    .lines()
                    .any(|line| line.starts_with(&format!("| {name} |")) && line.contains(&halves)),
                "docs/postgres.md lacks the {name} row with {halves}"
            );
        }
    }

    #[test]
    fn the_cache_always_answers_the_hash() {
        // Far more keys than slots, twice over, so that slots are hit, missed and evicted.
        let cache = AdvisoryKeyCache::default();
        let keys: Vec<String> = (0..2_000).map(|i| format!("order:{i}")).collect();
        for _ in 0..2 {
            for key in &keys {
                assert_eq!(cache.advisory_key(key), advisory_key(key), "{key}");
            }
        }
        // The last use of a key leaves it in its slot.
        let slot_of =
            |key: &str| (cache.hashing.hash_one(key) as usize) & (AdvisoryKeyCache::SLOTS - 1);
        assert_eq!(cache.advisory_key("order:42"), advisory_key("order:42"));
        assert_eq!(
            cache.slots[slot_of("order:42")].lock().unwrap().as_ref(),
            Some(&("order:42".to_owned(), advisory_key("order:42")))
        );
        // A slot poisoned with a wrong value in it is bypassed, never trusted.
        let poisoned = std::panic::catch_unwind(|| {
            let mut held = cache.slots[slot_of("order:42")].lock().unwrap();
            *held = Some(("order:42".to_owned(), 0));
            panic!("poison the slot");
        });
        assert!(poisoned.is_err());
        assert_eq!(cache.advisory_key("order:42"), advisory_key("order:42"));
    }

    #[test]
    fn keys_that_share_their_low_bits_spread_over_buckets() {
        // 1,024 keys that agree in their low 32 bits: the low 10 bits of their hashes (the
        // bucket of a 1,024-slot table) must still spread, or such keys would pile up.
        let hashing = AdvisoryKeyHashing::default();
        let buckets: std::collections::HashSet<u64> = (0..1024_i64)
            .map(|high| hashing.hash_one(high << 32 | 0x1234) & 1023)
            .collect();
        assert!(buckets.len() > 500, "only {} buckets used", buckets.len());
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
