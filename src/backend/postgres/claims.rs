//! In-process exclusion: at most one task of this process works on an advisory key at a time.
//!
//! PostgreSQL advisory locks are re-entrant per session and this backend multiplexes many locks
//! over a few sessions, so the server cannot tell two tasks of this process apart. A
//! [`KeyClaim`] is the local right to hold, or to try for, one advisory key. Claims are
//! exclusive per key; tasks that want a claimed key queue first in, first out, and dropping a
//! claim hands it straight to the longest-waiting task that is still listening.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::key_hash::AdvisoryKeyMap;

const SHARDS: usize = 16;

/// The claims of one lock service.
#[derive(Default)]
pub(super) struct ClaimTable {
    shards: [Mutex<AdvisoryKeyMap<VecDeque<oneshot::Sender<KeyClaim>>>>; SHARDS],
}

/// What [`ClaimTable::claim_or_queue`] gives.
pub(super) enum Claim {
    /// The key was free locally: the caller has it.
    Claimed(KeyClaim),
    /// Another task has it; the claim arrives on this channel when it is the caller's turn.
    Queued(oneshot::Receiver<KeyClaim>),
}

/// The exclusive local right to one advisory key. Dropping it passes it on.
pub(super) struct KeyClaim {
    table: Arc<ClaimTable>,
    key: i64,
    /// False only for the claim `pass_on` retires when no task waits: dropping it must not
    /// pass it on again.
    live: bool,
    /// Set when the lock was just released to waiters of other processes: the task that gets
    /// the claim next lets them go first (see `PostgresDistributedLock::acquire`).
    yield_to_others: bool,
}

impl ClaimTable {
    /// Claims `key` if no task of this process has it.
    pub(super) fn try_claim(self: &Arc<Self>, key: i64) -> Option<KeyClaim> {
        match self.shard(key).entry(key) {
            Entry::Occupied(_) => None,
            Entry::Vacant(slot) => {
                slot.insert(VecDeque::new());
                Some(self.new_claim(key))
            }
        }
    }

    /// Claims `key`, or queues the caller behind the tasks that have or want it.
    pub(super) fn claim_or_queue(self: &Arc<Self>, key: i64) -> Claim {
        match self.shard(key).entry(key) {
            Entry::Occupied(mut queue) => {
                let (sender, receiver) = oneshot::channel();
                queue.get_mut().push_back(sender);
                Claim::Queued(receiver)
            }
            Entry::Vacant(slot) => {
                slot.insert(VecDeque::new());
                Claim::Claimed(self.new_claim(key))
            }
        }
    }

    /// Whether some task of this process has claimed `key`.
    #[cfg(test)]
    pub(super) fn is_claimed(&self, key: i64) -> bool {
        self.shard(key).contains_key(&key)
    }

    fn new_claim(self: &Arc<Self>, key: i64) -> KeyClaim {
        KeyClaim {
            table: Arc::clone(self),
            key,
            live: true,
            yield_to_others: false,
        }
    }

    /// Gives a dropped claim to the first queued task still listening, or frees the key.
    fn pass_on(self: &Arc<Self>, key: i64, yield_to_others: bool) {
        let mut shard = self.shard(key);
        let Some(queue) = shard.get_mut(&key) else {
            debug_assert!(false, "a live claim always has its table entry");
            return;
        };
        let mut claim = self.new_claim(key);
        claim.yield_to_others = yield_to_others;
        while let Some(next) = queue.pop_front() {
            match next.send(claim) {
                Ok(()) => return,
                // That task gave up waiting; try the next one with the same claim.
                Err(returned) => claim = returned,
            }
        }
        claim.live = false;
        shard.remove(&key);
    }

    fn shard(
        &self,
        key: i64,
    ) -> MutexGuard<'_, AdvisoryKeyMap<VecDeque<oneshot::Sender<KeyClaim>>>> {
        // Every update is a single insert, remove or queue operation, so a shard poisoned by a
        // panic elsewhere is still consistent.
        self.shards[(key as u64 % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl KeyClaim {
    /// The claimed advisory key.
    pub(super) fn key(&self) -> i64 {
        self.key
    }

    /// Records that the lock was released while tasks of other processes waited for it.
    pub(super) fn set_yield_to_others(&mut self) {
        self.yield_to_others = true;
    }

    /// Whether the previous holder released while other processes waited: the new claimant
    /// should give them a head start instead of retaking the lock at once.
    pub(super) fn yield_to_others(&self) -> bool {
        self.yield_to_others
    }
}

impl Drop for KeyClaim {
    fn drop(&mut self) {
        if self.live {
            // A claim dropped inside `pass_on` (a queued task dropped its receiver with the
            // claim in it) is not possible under the shard lock: `send` hands back refused
            // claims instead of dropping them.
            Arc::clone(&self.table).pass_on(self.key, self.yield_to_others);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_exclusive_and_passes_in_order() {
        let table = Arc::new(ClaimTable::default());
        let first = table.try_claim(7).expect("free key");
        assert!(table.try_claim(7).is_none());
        let Claim::Queued(mut second) = table.claim_or_queue(7) else {
            panic!("claimed key must queue");
        };
        let Claim::Queued(gone) = table.claim_or_queue(7) else {
            panic!("claimed key must queue");
        };
        let Claim::Queued(mut third) = table.claim_or_queue(7) else {
            panic!("claimed key must queue");
        };
        drop(gone);
        drop(first);
        let second = second.try_recv().expect("first in line gets it");
        assert!(third.try_recv().is_err());
        drop(second);
        let third = third.try_recv().expect("the task that left is skipped");
        assert!(table.is_claimed(7));
        drop(third);
        assert!(!table.is_claimed(7));
        assert!(table.try_claim(7).is_some());
    }

    #[test]
    fn a_claim_dropped_in_its_channel_passes_on() {
        let table = Arc::new(ClaimTable::default());
        let first = table.try_claim(1).expect("free key");
        let Claim::Queued(second) = table.claim_or_queue(1) else {
            panic!("claimed key must queue");
        };
        let Claim::Queued(mut third) = table.claim_or_queue(1) else {
            panic!("claimed key must queue");
        };
        drop(first); // sent to `second`, which is never read
        drop(second);
        assert!(third.try_recv().is_ok());
    }
}
