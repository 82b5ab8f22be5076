//! The sharded table behind [`InMemoryDistributedLock`](super::InMemoryDistributedLock).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{Lease, LockError};

const SHARDS: usize = 16;

/// A lock handed to a caller: by `try_take` directly, or to a queued waiter over its channel.
pub(super) struct Grant {
    pub(super) token: Uuid,
    pub(super) fencing_token: u64,
    pub(super) lease: Arc<Lease>,
}

pub(super) enum TryTake {
    /// The caller holds the lock now; the key is the table's shared copy.
    Granted(Arc<str>, Grant),
    /// Someone else holds it until `expires_at`; `queued_as` is the caller's place in the queue
    /// when it asked to wait.
    Held {
        key: Arc<str>,
        queued_as: Option<u64>,
        expires_at: Instant,
    },
}

/// Where a waiter stands after its timer fired.
pub(super) enum WaiterState {
    Granted(Grant),
    Queued { holder_expires_at: Instant },
    NotQueued,
}

pub(super) struct LockTable {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    next_fencing_token: AtomicU64,
    next_waiter_id: AtomicU64,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<Arc<str>, Entry>,
    /// Earliest moment an entry of this shard may have expired; the shard is swept then.
    next_sweep: Option<Instant>,
}

/// A held key. An entry exists exactly while some holder has the key (expired or not).
struct Entry {
    key: Arc<str>,
    holder: Holder,
    waiters: VecDeque<Waiter>,
}

struct Holder {
    token: Uuid,
    expires_at: Instant,
    lease: Arc<Lease>,
}

struct Waiter {
    id: u64,
    ttl: Duration,
    sender: oneshot::Sender<Grant>,
}

impl LockTable {
    pub(super) fn new() -> Self {
        LockTable {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            next_fencing_token: AtomicU64::new(1),
            next_waiter_id: AtomicU64::new(0),
        }
    }

    pub(super) fn len(&self) -> usize {
        (0..SHARDS)
            .map(|i| self.lock_shard_at(i).entries.len())
            .sum()
    }

    /// Takes `key` if it is free or its holder expired with nobody queued; otherwise queues the
    /// caller if it passed a `sender`.
    pub(super) fn try_take(
        &self,
        key: &str,
        ttl: Duration,
        sender: Option<oneshot::Sender<Grant>>,
    ) -> TryTake {
        let now = Instant::now();
        let mut shard = self.shard(key);
        shard.sweep_if_due(now);
        let Shard {
            entries,
            next_sweep,
        } = &mut *shard;
        if let Some(entry) = entries.get_mut(key) {
            if entry.holder.expires_at <= now {
                entry.holder.lease.mark_lost();
                if !self.hand_off(entry, now) {
                    let grant = self.new_holder(entry, now, ttl);
                    note_expiry(next_sweep, entry.holder.expires_at);
                    return TryTake::Granted(Arc::clone(&entry.key), grant);
                }
                note_expiry(next_sweep, entry.holder.expires_at);
            }
            let queued_as = sender.map(|sender| {
                let id = self.next_waiter_id.fetch_add(1, Ordering::Relaxed);
                entry.waiters.push_back(Waiter { id, ttl, sender });
                id
            });
            return TryTake::Held {
                key: Arc::clone(&entry.key),
                queued_as,
                expires_at: entry.holder.expires_at,
            };
        }
        let shared_key: Arc<str> = Arc::from(key);
        let (holder, grant) = self.grant(now, ttl);
        shard.note_expiry(holder.expires_at);
        shard.entries.insert(
            Arc::clone(&shared_key),
            Entry {
                key: Arc::clone(&shared_key),
                holder,
                waiters: VecDeque::new(),
            },
        );
        TryTake::Granted(shared_key, grant)
    }

    /// For a waiter whose timer fired: hands an expired lock to the head of the queue, then
    /// tells the waiter where it stands. `take_grant` is checked under the shard lock, so a
    /// grant cannot slip past.
    pub(super) fn recheck_waiter(
        &self,
        key: &str,
        id: u64,
        take_grant: impl FnOnce() -> Option<Grant>,
    ) -> WaiterState {
        let now = Instant::now();
        let mut shard = self.shard(key);
        let Some(entry) = shard.entries.get_mut(key) else {
            return take_grant().map_or(WaiterState::NotQueued, WaiterState::Granted);
        };
        if entry.holder.expires_at <= now {
            entry.holder.lease.mark_lost();
            self.hand_off(entry, now);
        }
        let queued = entry.waiters.iter().any(|waiter| waiter.id == id);
        let holder_expires_at = entry.holder.expires_at;
        shard.note_expiry(holder_expires_at);
        if let Some(grant) = take_grant() {
            return WaiterState::Granted(grant);
        }
        if queued {
            WaiterState::Queued { holder_expires_at }
        } else {
            WaiterState::NotQueued
        }
    }

    /// Removes a waiter that gave up; if it had been handed the lock meanwhile, passes it on
    /// and returns true.
    pub(super) fn abandon_wait(
        &self,
        key: &str,
        id: u64,
        mut receiver: oneshot::Receiver<Grant>,
    ) -> bool {
        let now = Instant::now();
        let mut shard = self.shard(key);
        // Under the shard lock no grant can be in flight: it was either sent already or the
        // waiter is still queued.
        if let Ok(grant) = receiver.try_recv() {
            let _ = shard.release(self, key, grant.token, now);
            return true;
        }
        if let Some(entry) = shard.entries.get_mut(key) {
            entry.waiters.retain(|waiter| waiter.id != id);
            if entry.waiters.is_empty() {
                let expires_at = entry.holder.expires_at;
                shard.note_expiry(expires_at);
            }
        }
        false
    }

    pub(super) fn release(&self, key: &str, token: Uuid) -> Result<(), LockError> {
        let now = Instant::now();
        self.shard(key).release(self, key, token, now)
    }

    pub(super) fn extend(&self, key: &str, token: Uuid, ttl: Duration) -> Result<(), LockError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        let entry = match shard.entries.get_mut(key) {
            Some(entry) if entry.holder.token == token && entry.holder.expires_at > now => entry,
            _ => return Err(LockError::LockLost),
        };
        entry.holder.expires_at = now + ttl;
        Ok(())
    }

    pub(super) fn is_held(&self, key: &str) -> bool {
        let now = Instant::now();
        self.shard(key)
            .entries
            .get(key)
            .is_some_and(|entry| entry.holder.expires_at > now || !entry.waiters.is_empty())
    }

    /// Gives the entry to the first waiter still listening. False if nobody was.
    fn hand_off(&self, entry: &mut Entry, now: Instant) -> bool {
        while let Some(waiter) = entry.waiters.pop_front() {
            let (holder, grant) = self.grant(now, waiter.ttl);
            let token = holder.token;
            if waiter.sender.send(grant).is_ok() {
                entry.holder = holder;
                return true;
            }
            tracing::trace!(%token, "skipped a waiter that was gone");
        }
        false
    }

    fn new_holder(&self, entry: &mut Entry, now: Instant, ttl: Duration) -> Grant {
        let (holder, grant) = self.grant(now, ttl);
        entry.holder = holder;
        grant
    }

    fn grant(&self, now: Instant, ttl: Duration) -> (Holder, Grant) {
        let token = Uuid::new_v4();
        let lease = Lease::new(now, ttl);
        let holder = Holder {
            token,
            expires_at: now + ttl,
            lease: Arc::clone(&lease),
        };
        let grant = Grant {
            token,
            fencing_token: self.next_fencing_token.fetch_add(1, Ordering::Relaxed),
            lease,
        };
        (holder, grant)
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.lock_shard_at(index)
    }

    fn lock_shard_at(&self, index: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard cannot leave it inconsistent (every update is a single
        // insert, remove or field store), so a poisoned shard is still usable.
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Shard {
    fn release(
        &mut self,
        table: &LockTable,
        key: &str,
        token: Uuid,
        now: Instant,
    ) -> Result<(), LockError> {
        let Some(entry) = self.entries.get_mut(key) else {
            return Err(LockError::LockLost);
        };
        if entry.holder.token != token {
            return Err(LockError::LockLost);
        }
        let expired = entry.holder.expires_at <= now;
        if expired {
            entry.holder.lease.mark_lost();
        }
        if table.hand_off(entry, now) {
            let expires_at = entry.holder.expires_at;
            self.note_expiry(expires_at);
        } else {
            self.entries.remove(key);
        }
        if expired {
            Err(LockError::LockLost)
        } else {
            Ok(())
        }
    }

    fn note_expiry(&mut self, expires_at: Instant) {
        note_expiry(&mut self.next_sweep, expires_at);
    }

    /// Drops entries whose holder expired with nobody waiting, once the earliest expiry passed.
    /// Entries with waiters are left to them: the first waiter's timer takes the lock over.
    fn sweep_if_due(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|at| now < at) {
            return;
        }
        let mut next_sweep = None::<Instant>;
        self.entries.retain(|_, entry| {
            if !entry.waiters.is_empty() {
                return true;
            }
            if entry.holder.expires_at <= now {
                entry.holder.lease.mark_lost();
                return false;
            }
            let at = entry.holder.expires_at;
            next_sweep = Some(next_sweep.map_or(at, |earliest| earliest.min(at)));
            true
        });
        self.next_sweep = next_sweep;
    }
}

/// Brings the shard's next sweep forward to `expires_at` if that is earlier.
fn note_expiry(next_sweep: &mut Option<Instant>, expires_at: Instant) {
    if next_sweep.is_none_or(|at| expires_at < at) {
        *next_sweep = Some(expires_at);
    }
}
