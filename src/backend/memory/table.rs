//! The sharded table behind [`InMemoryDistributedLock`](super::InMemoryDistributedLock).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use uuid::Uuid;

use crate::backend::want::Want;
use crate::{Lease, LockError, LockMode};

const SHARDS: usize = 16;

/// A lock handed to a caller: by `try_take` directly, or to a queued waiter over its channel.
pub(super) struct Grant {
    pub(super) token: Uuid,
    pub(super) mode: LockMode,
    pub(super) fencing_token: u64,
    pub(super) lease: Arc<Lease>,
}

pub(super) enum TryTake {
    /// The caller holds the lock now; the key is the table's shared copy.
    Granted(Arc<str>, Grant),
    /// Others hold it, the first of their leases ending at `expires_at`; `queued_as` is the
    /// caller's place in the queue when it asked to wait.
    Held {
        key: Arc<str>,
        queued_as: Option<u64>,
        expires_at: Instant,
    },
}

/// How the table reaches a queued caller: the grant when it is let in, and a nudge to look
/// again when the moment it should wake has come earlier (a holder with a shorter lease was let
/// in, a lease was shortened, the waiter became first in line).
pub(super) struct Listener {
    pub(super) grant: oneshot::Sender<Grant>,
    pub(super) recheck: Arc<Notify>,
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
    /// Shared with the other table of the same lock object (locks and permits draw from one
    /// sequence).
    next_fencing_token: Arc<AtomicU64>,
    next_waiter_id: AtomicU64,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<Arc<str>, Entry>,
    /// Earliest moment an entry of this shard may have expired; the shard is swept then.
    next_sweep: Option<Instant>,
}

/// A held key. An entry exists exactly while the key has a holder (expired or not); a key
/// with waiters always has a holder, since the first waiter is let in as soon as it fits.
struct Entry {
    key: Arc<str>,
    /// One exclusive holder, or any number of shared ones.
    holders: Vec<Holder>,
    /// First in, first out. A waiter is let in when it fits beside the holders, and only
    /// from the front: a shared caller queues behind a waiting exclusive one (writers are not
    /// starved), and the shared waiters between two exclusive ones go in together.
    waiters: VecDeque<Waiter>,
}

struct Holder {
    token: Uuid,
    mode: LockMode,
    expires_at: Instant,
    lease: Arc<Lease>,
}

struct Waiter {
    id: u64,
    want: Want,
    ttl: Duration,
    listener: Listener,
    /// The moment this waiter was last told to look again at (the first lease to end then).
    told: Instant,
}

impl Entry {
    /// Whether a caller asking for `want`, with `ahead` waiters before it, goes in now. A
    /// lock's caller goes in only with nobody ahead and if it fits beside the holders (an
    /// exclusive holder is always alone, so the first holder's mode is that of all of them).
    /// A permit's caller goes in while the holders and the waiters ahead of it are fewer than
    /// its limit: the waiters ahead count as let in, so nobody passes a waiter that the same
    /// limit would let in.
    fn admits(&self, want: Want, ahead: usize) -> bool {
        match (want, self.holders.first()) {
            (Want::Permit { limit }, _) => self.holders.len() + ahead < limit as usize,
            (_, _) if ahead > 0 => false,
            (_, None) => true,
            (Want::Lock(LockMode::Shared), Some(holder)) => holder.mode == LockMode::Shared,
            (Want::Lock(LockMode::Exclusive), Some(_)) => false,
        }
    }

    /// When the first of the holders' leases ends.
    fn next_expiry(&self) -> Option<Instant> {
        self.holders.iter().map(|holder| holder.expires_at).min()
    }

    /// Tells the first waiter to look again if the first lease now ends sooner than the
    /// moment it was told (the others wait behind it, whatever happens to the holders).
    fn nudge_first_waiter_if_sooner(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let Some(expiry) = self.next_expiry() else {
            return;
        };
        let first = self.waiters.front_mut().expect("a waiter");
        if expiry < first.told {
            first.told = expiry;
            first.listener.recheck.notify_one();
        }
    }

    /// Drops the holders whose lease ran out (they are lost).
    fn drop_expired(&mut self, now: Instant) {
        self.holders.retain(|holder| {
            let live = holder.expires_at > now;
            if !live {
                holder.lease.mark_lost();
            }
            live
        });
    }
}

impl LockTable {
    /// An empty table drawing fencing tokens from `next_fencing_token`.
    pub(super) fn new(next_fencing_token: Arc<AtomicU64>) -> Self {
        LockTable {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            next_fencing_token,
            next_waiter_id: AtomicU64::new(0),
        }
    }

    pub(super) fn len(&self) -> usize {
        (0..SHARDS)
            .map(|i| self.lock_shard_at(i).entries.len())
            .sum()
    }

    /// Takes `key` as `want` says if that fits beside its live holders and nobody waits;
    /// otherwise queues the caller if it passed a `listener`.
    pub(super) fn try_take(
        &self,
        key: &str,
        want: Want,
        ttl: Duration,
        listener: Option<Listener>,
    ) -> TryTake {
        let now = Instant::now();
        let mut shard = self.shard(key);
        shard.sweep_if_due(now);
        if let Some(entry) = shard.entries.get_mut(key) {
            self.settle(entry, now);
            let outcome = if entry.admits(want, entry.waiters.len()) {
                let (holder, grant) = self.grant(now, want.mode(), ttl);
                entry.holders.push(holder);
                TryTake::Granted(Arc::clone(&entry.key), grant)
            } else {
                // A caller that does not fit, or has waiters ahead, finds holders.
                let told = entry.next_expiry().expect("a key with waiters has holders");
                let queued_as = listener.map(|listener| {
                    let id = self.next_waiter_id.fetch_add(1, Ordering::Relaxed);
                    entry.waiters.push_back(Waiter {
                        id,
                        want,
                        ttl,
                        listener,
                        told,
                    });
                    id
                });
                TryTake::Held {
                    key: Arc::clone(&entry.key),
                    queued_as,
                    expires_at: told,
                }
            };
            let next_expiry = entry.next_expiry();
            shard.tidy(key, next_expiry);
            return outcome;
        }
        let shared_key: Arc<str> = Arc::from(key);
        let (holder, grant) = self.grant(now, want.mode(), ttl);
        shard.note_expiry(holder.expires_at);
        shard.entries.insert(
            Arc::clone(&shared_key),
            Entry {
                key: Arc::clone(&shared_key),
                holders: vec![holder],
                waiters: VecDeque::new(),
            },
        );
        TryTake::Granted(shared_key, grant)
    }

    /// For a waiter whose timer fired: drops expired holders and lets waiters in, then tells
    /// the waiter where it stands. `take_grant` is checked under the shard lock, so a grant
    /// cannot slip past.
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
        self.settle(entry, now);
        let holder_expires_at = entry.next_expiry();
        let waiter = entry.waiters.iter_mut().find(|waiter| waiter.id == id);
        let queued = waiter.is_some();
        if let (Some(waiter), Some(at)) = (waiter, holder_expires_at) {
            waiter.told = at;
        }
        shard.tidy(key, holder_expires_at);
        if let Some(grant) = take_grant() {
            return WaiterState::Granted(grant);
        }
        match holder_expires_at {
            Some(holder_expires_at) if queued => WaiterState::Queued { holder_expires_at },
            _ => WaiterState::NotQueued,
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
            // An exclusive waiter that leaves may have held shared ones up behind it; and the
            // next one may be first now, told of a later moment to wake (settle sees to both).
            self.settle(entry, now);
            let next_expiry = entry.next_expiry();
            shard.tidy(key, next_expiry);
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
        let holder = shard.entries.get_mut(key).and_then(|entry| {
            entry
                .holders
                .iter_mut()
                .find(|holder| holder.token == token && holder.expires_at > now)
        });
        let Some(holder) = holder else {
            return Err(LockError::LockLost);
        };
        let shortened = now + ttl < holder.expires_at;
        holder.expires_at = now + ttl;
        if shortened {
            let entry = shard.entries.get_mut(key).expect("the holder's entry");
            entry.nudge_first_waiter_if_sooner();
            shard.note_expiry(now + ttl);
        }
        Ok(())
    }

    /// How many live holders `key` has.
    pub(super) fn holders(&self, key: &str) -> usize {
        let now = Instant::now();
        self.shard(key).entries.get(key).map_or(0, |entry| {
            entry
                .holders
                .iter()
                .filter(|holder| holder.expires_at > now)
                .count()
        })
    }

    pub(super) fn is_held(&self, key: &str) -> bool {
        let now = Instant::now();
        self.shard(key).entries.get(key).is_some_and(|entry| {
            !entry.waiters.is_empty() || entry.holders.iter().any(|h| h.expires_at > now)
        })
    }

    /// Drops the entry's expired holders, then lets in the waiters that go in now (skipping
    /// those gone): of a lock, from the front of the queue while they fit (one exclusive
    /// waiter, or the run of shared ones); of permits, each whose limit leaves room for the
    /// holders and the waiters still ahead of it. Then the first waiter (maybe a new one) is
    /// told to look again if the first lease to end (maybe a new holder's) ends sooner than the
    /// moment it was told.
    fn settle(&self, entry: &mut Entry, now: Instant) {
        entry.drop_expired(now);
        let mut ahead = 0;
        while let Some(waiter) = entry.waiters.get(ahead) {
            if !entry.admits(waiter.want, ahead) {
                if let Want::Lock(_) = waiter.want {
                    break;
                }
                ahead += 1;
                continue;
            }
            let waiter = entry.waiters.remove(ahead).expect("the waiter looked at");
            let (holder, grant) = self.grant(now, waiter.want.mode(), waiter.ttl);
            let token = holder.token;
            if waiter.listener.grant.send(grant).is_ok() {
                entry.holders.push(holder);
            } else {
                tracing::trace!(%token, "skipped a waiter that was gone");
            }
        }
        entry.nudge_first_waiter_if_sooner();
    }

    fn grant(&self, now: Instant, mode: LockMode, ttl: Duration) -> (Holder, Grant) {
        let token = Uuid::new_v4();
        let lease = Lease::new(now, ttl);
        let holder = Holder {
            token,
            mode,
            expires_at: now + ttl,
            lease: Arc::clone(&lease),
        };
        let grant = Grant {
            token,
            mode,
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
        let Some(index) = entry.holders.iter().position(|h| h.token == token) else {
            return Err(LockError::LockLost);
        };
        let holder = entry.holders.swap_remove(index);
        let expired = holder.expires_at <= now;
        if expired {
            holder.lease.mark_lost();
        }
        table.settle(entry, now);
        let next_expiry = entry.next_expiry();
        self.tidy(key, next_expiry);
        if expired {
            Err(LockError::LockLost)
        } else {
            Ok(())
        }
    }

    /// After a change to `key`'s entry, whose first lease now ends at `next_expiry`: removes
    /// it if nobody holds the key (then nobody waits either), else brings the next sweep
    /// forward to that moment.
    fn tidy(&mut self, key: &str, next_expiry: Option<Instant>) {
        match next_expiry {
            Some(expires_at) => self.note_expiry(expires_at),
            None => {
                let entry = self.entries.remove(key);
                debug_assert!(
                    entry.is_none_or(|entry| entry.waiters.is_empty()),
                    "waiters are let in when free"
                );
            }
        }
    }

    fn note_expiry(&mut self, expires_at: Instant) {
        note_expiry(&mut self.next_sweep, expires_at);
    }

    /// Drops expired holders of entries nobody waits for, and the entries left without a
    /// holder, once the earliest expiry passed. Entries with waiters are left to them: the
    /// first waiter's timer lets it in.
    fn sweep_if_due(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|at| now < at) {
            return;
        }
        let mut next_sweep = None::<Instant>;
        self.entries.retain(|_, entry| {
            if !entry.waiters.is_empty() {
                return true;
            }
            entry.drop_expired(now);
            let Some(at) = entry.next_expiry() else {
                return false;
            };
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
