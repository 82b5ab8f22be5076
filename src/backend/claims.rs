//! In-process exclusion: one task of this process works on a key at a time, or several that
//! all want its shared side.
//!
//! A [`KeyClaim`] is the local right to hold, or to try for, one key, in a [`LockMode`]. An
//! exclusive claim excludes every other claim of the key; shared claims coexist. Tasks that
//! must wait queue first in, first out; a shared claimant queues too while any task waits, so a
//! waiting exclusive claimant is not starved. Dropping the last claim of a key hands it
//! straight to the longest-waiting task that is still listening, and with a shared claimant to
//! every shared claimant queued before the next exclusive one. The backends use it so that
//! the tasks of one process hand a lock to each other at once, and only the first in line
//! talks to the server: PostgreSQL, whose advisory locks are re-entrant per session (the
//! server cannot tell two tasks sharing a session apart), and Redis, whose waiters would
//! otherwise each poll the server.
//!
//! A queued task whose waiting budget runs out must tell a key that stayed held (`Timeout`)
//! from a server that did not answer (`BackendError`), though only the task ahead of it talks
//! to the server. So the table also records, per key, whether the last statement sent for it
//! is still unanswered ([`KeyClaim::asking_server`], [`KeyClaim::answered`]), and
//! [`ClaimTable::overdue`] decides from that.

use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::collections::VecDeque;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use crate::LockMode;

const SHARDS: usize = 16;

/// The claims of one lock service, on keys of type `K` hashed with `S`.
pub(crate) struct ClaimTable<K: Hash + Eq + Clone, S: BuildHasher = RandomState, B = ()> {
    hashing: S,
    shards: [Mutex<Shard<K, S, B>>; SHARDS],
}

/// The claimed keys whose hash falls in one shard.
type Shard<K, S, B> = HashMap<K, KeyEntry<K, S, B>, S>;

impl<K: Hash + Eq + Clone, S: BuildHasher + Default + Clone, B> Default for ClaimTable<K, S, B> {
    fn default() -> Self {
        let hashing = S::default();
        ClaimTable {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::with_hasher(hashing.clone()))),
            hashing,
        }
    }
}

/// A claimed key: who has it, the tasks queued for it, and whether the server owes an answer
/// about it.
struct KeyEntry<K: Hash + Eq + Clone, S: BuildHasher, B> {
    /// The live shared claims; 0 while an exclusive claim has the key.
    shared: usize,
    /// Those of the shared claims whose holders have their lock on the server.
    granted_shared: usize,
    /// Told when a shared claim's holder gets its lock; made by the first task that waits for
    /// it (see [`ClaimTable::grant_signal`]).
    granted: Option<Arc<Notify>>,
    queue: VecDeque<Queued<K, S, B>>,
    /// Statements about this key sent and not answered yet (several shared claims may ask at
    /// once).
    in_flight: usize,
    /// The last statement about this key that ended got no answer (a stalled server, a
    /// command timeout, a lost session). Stays set when the claim passes on after a failure;
    /// cleared by the next answer, or when the key is unclaimed.
    failed: bool,
    /// Told when the key stops being [`unanswered`](Self::unanswered); made by the first
    /// overdue task that waits for it.
    answered: Option<watch::Sender<()>>,
}

/// A task waiting for its claim.
struct Queued<K: Hash + Eq + Clone, S: BuildHasher, B> {
    /// Tells this place apart from the others (see [`Turn::id`]).
    id: u64,
    mode: LockMode,
    turn: oneshot::Sender<KeyClaim<K, S, B>>,
}

impl<K: Hash + Eq + Clone, S: BuildHasher, B> KeyEntry<K, S, B> {
    fn new(mode: LockMode) -> Self {
        KeyEntry {
            shared: usize::from(mode == LockMode::Shared),
            granted_shared: 0,
            granted: None,
            queue: VecDeque::new(),
            in_flight: 0,
            failed: false,
            answered: None,
        }
    }

    /// Whether the server owes an answer about the key: a statement is in flight, or the last
    /// one failed.
    fn unanswered(&self) -> bool {
        self.in_flight > 0 || self.failed
    }

    /// Wakes the tasks waiting on [`ClaimTable::grant_signal`].
    fn tell_grant_watchers(&self) {
        if let Some(granted) = &self.granted {
            granted.notify_waiters();
        }
    }

    /// Tells the overdue tasks waiting for an answer, once none is owed.
    fn tell_if_answered(&self) {
        if !self.unanswered() {
            if let Some(answered) = &self.answered {
                answered.send_replace(());
            }
        }
    }

    /// Whether a new claimant in `mode` joins the claims the key has now: only a shared one
    /// joining shared ones, and only while no task waits.
    fn admits(&self, mode: LockMode) -> bool {
        mode == LockMode::Shared
            && self.shared > 0
            && self.queue.iter().all(|queued| queued.turn.is_closed())
    }
}

/// What a queued task learns from [`ClaimTable::overdue`] once its waiting budget is spent.
pub(crate) enum Overdue<K: Hash + Eq + Clone, S: BuildHasher = RandomState, B = ()> {
    /// The task ahead holds the key, or the server's last answer about it said it is held.
    Held,
    /// The last statement about the key got no answer (in time): nobody can tell whether the
    /// key stayed held.
    Unanswered,
    /// The key came to this task after all, with the server's last answer in: the task ahead
    /// gave it up before asking.
    Claimed(KeyClaim<K, S, B>),
}

/// What [`ClaimTable::claim_or_queue`] gives.
pub(crate) enum Claim<K: Hash + Eq + Clone, S: BuildHasher = RandomState, B = ()> {
    /// The key was free locally: the caller has it.
    Claimed(KeyClaim<K, S, B>),
    /// Another task has it; the claim arrives on this channel when it is the caller's turn.
    Queued(Turn<K, S, B>),
}

/// A queued task's place in a key's line: resolves to its claim when its turn comes. Dropping it
/// leaves the line (a claim that reached it meanwhile is passed on).
pub(crate) struct Turn<K: Hash + Eq + Clone, S: BuildHasher = RandomState, B = ()> {
    table: Arc<ClaimTable<K, S, B>>,
    key: K,
    /// The id of its place in the queue.
    id: u64,
    receiver: oneshot::Receiver<KeyClaim<K, S, B>>,
}

impl<K: Hash + Eq + Clone, S: BuildHasher, B> Turn<K, S, B> {
    /// The claim, if the turn has come.
    pub(crate) fn try_recv(&mut self) -> Result<KeyClaim<K, S, B>, oneshot::error::TryRecvError> {
        self.receiver.try_recv()
    }
}

impl<K: Hash + Eq + Clone, S: BuildHasher, B> Future for Turn<K, S, B> {
    type Output = Result<KeyClaim<K, S, B>, oneshot::error::RecvError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.get_mut().receiver).poll(cx)
    }
}

// Nothing in a turn is pinned: it only forwards to its receiver.
impl<K: Hash + Eq + Clone, S: BuildHasher, B> Unpin for Turn<K, S, B> {}

impl<K: Hash + Eq + Clone, S: BuildHasher, B> Drop for Turn<K, S, B> {
    fn drop(&mut self) {
        self.receiver.close();
        match self.receiver.try_recv() {
            // Dropping it passes it on.
            Ok(claim) => drop(claim),
            Err(_) => self.table.left_the_line(&self.key),
        }
    }
}

/// The local right to one key, exclusive or shared. Dropping the last claim of a key passes it
/// on, with its baton if it carries one.
pub(crate) struct KeyClaim<K: Hash + Eq + Clone, S: BuildHasher = RandomState, B = ()> {
    table: Arc<ClaimTable<K, S, B>>,
    key: K,
    mode: LockMode,
    /// Its holder has the lock on the server ([`mark_granted`](Self::mark_granted)).
    granted: bool,
    /// False only for the claim `pass_on` retires when no task waits: dropping it must not
    /// pass it on again.
    live: bool,
    /// Set when the lock was just released to waiters of other processes: the task that gets
    /// the claim next lets them go first (see `PostgresDistributedLock::acquire`).
    yield_to_others: bool,
    /// A question this claim's holder asked is still open: neither answered nor failed.
    asking: bool,
    /// What the previous holder handed over with the claim (the Redis backend: a lock it
    /// already took in the server for the next task), for the next holder to take.
    baton: Option<B>,
}

impl<K: Hash + Eq + Clone, S: BuildHasher, B> ClaimTable<K, S, B> {
    /// Claims `key` in `mode` if no task of this process has it, or (shared) if only shared
    /// claims have it and no task waits.
    pub(crate) fn try_claim(self: &Arc<Self>, key: K, mode: LockMode) -> Option<KeyClaim<K, S, B>> {
        match self.shard(&key).entry(key.clone()) {
            Entry::Occupied(mut entry) if entry.get().admits(mode) => {
                entry.get_mut().shared += 1;
                Some(self.new_claim(key, mode))
            }
            Entry::Occupied(_) => None,
            Entry::Vacant(slot) => {
                slot.insert(KeyEntry::new(mode));
                Some(self.new_claim(key, mode))
            }
        }
    }

    /// Claims `key` in `mode` as [`try_claim`](Self::try_claim) does, or queues the caller
    /// behind the tasks that have or want it.
    pub(crate) fn claim_or_queue(self: &Arc<Self>, key: K, mode: LockMode) -> Claim<K, S, B> {
        match self.shard(&key).entry(key.clone()) {
            Entry::Occupied(mut entry) if entry.get().admits(mode) => {
                entry.get_mut().shared += 1;
                Claim::Claimed(self.new_claim(key, mode))
            }
            Entry::Occupied(mut entry) => {
                static NEXT_PLACE: AtomicU64 = AtomicU64::new(0);
                let id = NEXT_PLACE.fetch_add(1, Ordering::Relaxed);
                let (turn, receiver) = oneshot::channel();
                entry.get_mut().queue.push_back(Queued { id, mode, turn });
                Claim::Queued(Turn {
                    table: Arc::clone(self),
                    key,
                    id,
                    receiver,
                })
            }
            Entry::Vacant(slot) => {
                slot.insert(KeyEntry::new(mode));
                Claim::Claimed(self.new_claim(key, mode))
            }
        }
    }

    /// Decides the outcome of a task queued for `key` (its place is `turn`) whose waiting
    /// budget is spent. If nothing is owed by the server, the key stayed held: `Held`. If a
    /// statement about it is in flight, its answer decides: a reply in time means the key is
    /// held by the task ahead (it got the lock, or the server said someone else has it); none
    /// by `give_up_at`, or a failure (the claim then reaches this task with the answer still
    /// owed), is `Unanswered`.
    pub(crate) async fn overdue(
        self: &Arc<Self>,
        key: &K,
        mut turn: Turn<K, S, B>,
        give_up_at: Instant,
    ) -> Overdue<K, S, B> {
        loop {
            // A claim that reached this task as its budget ended is its turn after all.
            if let Ok(claim) = turn.try_recv() {
                return if claim.is_unanswered() {
                    Overdue::Unanswered
                } else {
                    Overdue::Claimed(claim)
                };
            }
            let mut answered = {
                let mut shard = self.shard(key);
                match shard.get_mut(key) {
                    Some(entry) if entry.unanswered() => entry
                        .answered
                        .get_or_insert_with(|| watch::channel(()).0)
                        .subscribe(),
                    _ => return Overdue::Held,
                }
            };
            tokio::select! {
                claim = &mut turn => return match claim {
                    Ok(claim) if claim.is_unanswered() => Overdue::Unanswered,
                    Ok(claim) => Overdue::Claimed(claim),
                    Err(_) => Overdue::Unanswered,
                },
                // Answered (or the sender went with the entry): look again.
                _ = answered.changed() => {}
                () = tokio::time::sleep_until(give_up_at) => return Overdue::Unanswered,
            }
        }
    }

    /// Whether `turn` is the first place still listening in its key's queue, behind shared
    /// claims whose holders all have their lock on the server ([`KeyClaim::mark_granted`]):
    /// then none of them waits for anything, and no other claim can go in before `turn` (new
    /// shared claimants queue behind it).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn is_next_behind_granted_readers(&self, turn: &Turn<K, S, B>) -> bool {
        self.shard(&turn.key).get(&turn.key).is_some_and(|entry| {
            entry.shared > 0
                && entry.granted_shared == entry.shared
                && entry
                    .queue
                    .iter()
                    .find(|queued| !queued.turn.is_closed())
                    .is_some_and(|first| first.id == turn.id)
        })
    }

    /// Told whenever [`is_next_behind_granted_readers`](Self::is_next_behind_granted_readers)
    /// may have become true for a task queued for `key` (a shared claim was granted, or one that
    /// was not went, or a queued task left); `None` if nobody has claimed `key`.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn grant_signal(&self, key: &K) -> Option<Arc<Notify>> {
        self.shard(key)
            .get_mut(key)
            .map(|entry| Arc::clone(entry.granted.get_or_insert_with(Arc::default)))
    }

    /// Whether some task of this process has claimed `key`.
    #[cfg(test)]
    pub(crate) fn is_claimed(&self, key: &K) -> bool {
        self.shard(key).contains_key(key)
    }

    fn new_claim(self: &Arc<Self>, key: K, mode: LockMode) -> KeyClaim<K, S, B> {
        KeyClaim {
            table: Arc::clone(self),
            key,
            mode,
            granted: false,
            live: true,
            yield_to_others: false,
            asking: false,
            baton: None,
        }
    }

    /// Takes back a dropped claim in `mode`. Once the key has no claim left, gives it to the
    /// first queued task still listening (with the baton if that task wants the exclusive
    /// side), and if that task wants the shared side, to every shared claimant queued after it
    /// up to the next exclusive one; or frees the key. A baton nobody takes is dropped.
    fn pass_on(
        self: &Arc<Self>,
        key: &K,
        mode: LockMode,
        granted: bool,
        yield_to_others: bool,
        mut baton: Option<B>,
    ) {
        let mut shard = self.shard(key);
        let Some(entry) = shard.get_mut(key) else {
            debug_assert!(false, "a live claim always has its table entry");
            return;
        };
        if mode == LockMode::Shared {
            entry.shared -= 1;
            if granted {
                entry.granted_shared -= 1;
            } else if entry.shared > 0 {
                entry.tell_grant_watchers();
            }
        }
        if entry.shared == 0 {
            let passed_exclusive = self.admit(key, entry, yield_to_others, &mut baton);
            if !passed_exclusive && entry.shared == 0 {
                shard.remove(key);
            }
        }
        drop(shard);
        // A baton nobody took goes outside the shard's lock.
        drop(baton);
    }

    /// Lets in the tasks at the front of `key`'s queue that may go in now: with no claim left,
    /// the first one still listening (with the baton if it wants the exclusive side); while
    /// shared claims have the key, every shared claimant up to the next exclusive one. Returns
    /// whether an exclusive claim went out.
    fn admit(
        self: &Arc<Self>,
        key: &K,
        entry: &mut KeyEntry<K, S, B>,
        yield_to_others: bool,
        baton: &mut Option<B>,
    ) -> bool {
        while let Some(next) = entry.queue.front() {
            if entry.shared > 0 && next.mode == LockMode::Exclusive {
                if !next.turn.is_closed() {
                    return false;
                }
                // That task left the line: the shared claimants behind it may join.
                entry.queue.pop_front();
                continue;
            }
            let Queued { mode, turn, .. } = entry.queue.pop_front().expect("looked at just now");
            let mut claim = self.new_claim(key.clone(), mode);
            claim.yield_to_others = yield_to_others;
            if mode == LockMode::Exclusive {
                claim.baton = baton.take();
            }
            match turn.send(claim) {
                Ok(()) if mode == LockMode::Exclusive => return true,
                Ok(()) => entry.shared += 1,
                // That task gave up waiting: the claim comes back; retire it (dropping it must
                // not pass it on) and keep its baton for the next task.
                Err(mut refused) => {
                    refused.live = false;
                    *baton = refused.baton.take().or(baton.take());
                }
            }
        }
        false
    }

    /// A queued task left the line: if shared claims have the key, the shared claimants it
    /// held back may join them, and the task behind it may now be next.
    fn left_the_line(self: &Arc<Self>, key: &K) {
        let mut shard = self.shard(key);
        if let Some(entry) = shard.get_mut(key) {
            if entry.shared > 0 {
                self.admit(key, entry, false, &mut None);
            }
            entry.tell_grant_watchers();
        }
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K, S, B>> {
        // Every update is a single insert, remove or queue operation, so a shard poisoned by a
        // panic elsewhere is still consistent.
        // Middle bits: the shard's own map places entries by the low bits of the same hash
        // (and tags them with the top ones).
        let shard = ((self.hashing.hash_one(key) >> 32) % SHARDS as u64) as usize;
        self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K: Hash + Eq + Clone, S: BuildHasher, B> KeyClaim<K, S, B> {
    /// The claimed key.
    pub(crate) fn key(&self) -> &K {
        &self.key
    }

    /// Records that this claim's holder has its lock on the server (it waits for nothing any
    /// more); see [`ClaimTable::is_next_behind_granted_readers`].
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn mark_granted(&mut self) {
        if self.mode == LockMode::Shared && !std::mem::replace(&mut self.granted, true) {
            self.with_entry(|entry| {
                entry.granted_shared += 1;
                entry.tell_grant_watchers();
            });
        }
    }

    /// The side of the key this claim has.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn mode(&self) -> LockMode {
        self.mode
    }

    /// Whether the next task of this process that waits for the key wants its exclusive side
    /// (it may leave right after): the task an exclusive holder can hand its lock to.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn has_successor(&self) -> bool {
        self.table
            .shard(&self.key)
            .get(&self.key)
            .is_some_and(|entry| {
                entry
                    .queue
                    .iter()
                    .find(|next| !next.turn.is_closed())
                    .is_some_and(|next| next.mode == LockMode::Exclusive)
            })
    }

    /// Passes the claim on with `baton` for the next task; if no task takes the claim, the
    /// baton is dropped.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn pass_with(mut self, baton: B) {
        self.baton = Some(baton);
    }

    /// What the previous holder handed over with the claim, if anything.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn take_baton(&mut self) -> Option<B> {
        self.baton.take()
    }

    /// Records that the lock was released while tasks of other processes waited for it.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn set_yield_to_others(&mut self) {
        self.yield_to_others = true;
    }

    /// Whether the previous holder released while other processes waited: the new claimant
    /// should give them a head start instead of retaking the lock at once.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn yield_to_others(&self) -> bool {
        self.yield_to_others
    }

    /// Records that a statement about this key is being sent: until [`answered`](Self::answered),
    /// tasks queued behind this one cannot tell whether the key is held.
    pub(crate) fn asking_server(&mut self) {
        if !std::mem::replace(&mut self.asking, true) {
            self.with_entry(|entry| entry.in_flight += 1);
        }
    }

    /// Records that the server answered a statement about this key.
    pub(crate) fn answered(&mut self) {
        self.end_question(|entry| entry.failed = false);
    }

    /// Records that the statement got no answer: the doubt stays for the tasks queued behind.
    pub(crate) fn failed(&mut self) {
        self.end_question(|entry| entry.failed = true);
    }

    /// Undoes [`asking_server`](Self::asking_server) when the statement was never run (its
    /// caller left before the session got to it).
    pub(crate) fn not_asked(&mut self) {
        self.end_question(|_| {});
    }

    /// Ends this claim's open question (if any) with `outcome`.
    fn end_question(&mut self, outcome: impl FnOnce(&mut KeyEntry<K, S, B>)) {
        let was_asking = std::mem::replace(&mut self.asking, false);
        self.with_entry(|entry| {
            if was_asking {
                entry.in_flight -= 1;
            }
            outcome(entry);
            entry.tell_if_answered();
        });
    }

    /// Gives the claim up; a question still open is withdrawn ([`not_asked`](Self::not_asked)),
    /// for a caller that leaves with its statement in flight: the next task asks itself.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn withdraw(mut self) {
        if self.asking {
            self.not_asked();
        }
    }

    fn is_unanswered(&self) -> bool {
        self.with_entry(|entry| entry.unanswered())
    }

    fn with_entry<T: Default>(&self, f: impl FnOnce(&mut KeyEntry<K, S, B>) -> T) -> T {
        let mut shard = self.table.shard(&self.key);
        match shard.get_mut(&self.key) {
            Some(entry) => f(entry),
            None => {
                debug_assert!(false, "a live claim always has its table entry");
                T::default()
            }
        }
    }
}

impl<K, S, B> Drop for KeyClaim<K, S, B>
where
    K: Hash + Eq + Clone,
    S: BuildHasher,
{
    fn drop(&mut self) {
        if self.live {
            if self.asking {
                // Dropped with its question open: the answer is owed to the tasks behind.
                self.failed();
            }
            let baton = self.baton.take();
            // A claim dropped inside `pass_on` (a queued task dropped its receiver with the
            // claim in it) is not possible under the shard lock: `send` hands back refused
            // claims instead of dropping them.
            let table = Arc::clone(&self.table);
            table.pass_on(
                &self.key,
                self.mode,
                self.granted,
                self.yield_to_others,
                baton,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: LockMode = LockMode::Exclusive;
    const S: LockMode = LockMode::Shared;

    #[test]
    fn a_claim_is_exclusive_and_passes_in_order() {
        let table = Arc::new(ClaimTable::<i64>::default());
        let first = table.try_claim(7, X).expect("free key");
        assert!(table.try_claim(7, X).is_none());
        let Claim::Queued(mut second) = table.claim_or_queue(7, X) else {
            panic!("claimed key must queue");
        };
        let Claim::Queued(gone) = table.claim_or_queue(7, X) else {
            panic!("claimed key must queue");
        };
        let Claim::Queued(mut third) = table.claim_or_queue(7, X) else {
            panic!("claimed key must queue");
        };
        drop(gone);
        drop(first);
        let second = second.try_recv().expect("first in line gets it");
        assert!(third.try_recv().is_err());
        drop(second);
        let third = third.try_recv().expect("the task that left is skipped");
        assert!(table.is_claimed(&7));
        drop(third);
        assert!(!table.is_claimed(&7));
        assert!(table.try_claim(7, X).is_some());
    }

    fn queued(table: &Arc<ClaimTable<i64>>, key: i64) -> Turn<i64> {
        match table.claim_or_queue(key, X) {
            Claim::Queued(turn) => turn,
            Claim::Claimed(_) => panic!("claimed key must queue"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_overdue_task_sees_whether_the_server_owes_an_answer() {
        let table = Arc::new(ClaimTable::<i64>::default());
        let give_up_at = || Instant::now() + std::time::Duration::from_secs(1);

        // Nothing asked, or asked and answered: the key is held by the task ahead.
        let mut first = table.try_claim(3, X).expect("free key");
        assert!(matches!(
            table.overdue(&3, queued(&table, 3), give_up_at()).await,
            Overdue::Held
        ));
        first.asking_server();
        first.answered();
        assert!(matches!(
            table.overdue(&3, queued(&table, 3), give_up_at()).await,
            Overdue::Held
        ));

        // Asked and never answered: no answer by the bound.
        first.asking_server();
        let started = Instant::now();
        assert!(matches!(
            table.overdue(&3, queued(&table, 3), give_up_at()).await,
            Overdue::Unanswered
        ));
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(1));

        // An answer that arrives while the task waits: held.
        let waiting = tokio::spawn({
            let (table, turn) = (Arc::clone(&table), queued(&table, 3));
            async move { table.overdue(&3, turn, give_up_at()).await }
        });
        tokio::task::yield_now().await;
        first.answered();
        assert!(matches!(waiting.await.unwrap(), Overdue::Held));

        // A failure (the claim passes on with the answer owed) reaches every overdue task in
        // turn, and a task that then asks and gets an answer clears it.
        first.asking_server();
        let (second, third) = (queued(&table, 3), queued(&table, 3));
        let second = tokio::spawn({
            let table = Arc::clone(&table);
            async move { table.overdue(&3, second, give_up_at()).await }
        });
        let third = tokio::spawn({
            let table = Arc::clone(&table);
            async move { table.overdue(&3, third, give_up_at()).await }
        });
        let Claim::Queued(fourth) = table.claim_or_queue(3, X) else {
            panic!("claimed key must queue");
        };
        tokio::task::yield_now().await;
        let started = Instant::now();
        drop(first);
        assert!(matches!(second.await.unwrap(), Overdue::Unanswered));
        assert!(matches!(third.await.unwrap(), Overdue::Unanswered));
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
        let mut fourth = fourth.await.expect("the claim reaches the next task");
        assert!(fourth.is_unanswered());
        fourth.asking_server();
        fourth.answered();
        assert!(!fourth.is_unanswered());
        drop(fourth);
        assert!(!table.is_claimed(&3));
    }

    #[test]
    fn a_claim_dropped_in_its_channel_passes_on() {
        let table = Arc::new(ClaimTable::<i64>::default());
        let first = table.try_claim(1, X).expect("free key");
        let Claim::Queued(second) = table.claim_or_queue(1, X) else {
            panic!("claimed key must queue");
        };
        let Claim::Queued(mut third) = table.claim_or_queue(1, X) else {
            panic!("claimed key must queue");
        };
        drop(first); // sent to `second`, which is never read
        drop(second);
        assert!(third.try_recv().is_ok());
    }

    #[test]
    fn shared_claims_coexist_and_queue_behind_a_waiting_exclusive_one() {
        let table = Arc::new(ClaimTable::<i64>::default());
        let first = table.try_claim(5, S).expect("free key");
        let second = table.try_claim(5, S).expect("readers share");
        assert!(table.try_claim(5, X).is_none());
        let mut writer = queued_as(&table, 5, X);
        // A reader that comes after a waiting writer queues behind it.
        assert!(table.try_claim(5, S).is_none());
        let mut late_reader = queued_as(&table, 5, S);
        let mut later_reader = queued_as(&table, 5, S);
        let mut last_writer = queued_as(&table, 5, X);
        drop(first);
        assert!(writer.try_recv().is_err(), "one reader still holds");
        drop(second);
        let writer = writer.try_recv().expect("the writer is next");
        assert_eq!(writer.mode(), X);
        assert!(late_reader.try_recv().is_err());
        assert!(!writer.has_successor(), "the next in line is a reader");
        drop(writer);
        // Both readers queued before the next writer go in together.
        let late_reader = late_reader.try_recv().expect("first reader in");
        let later_reader = later_reader.try_recv().expect("second reader in with it");
        assert_eq!(later_reader.mode(), S);
        assert!(last_writer.try_recv().is_err());
        drop(late_reader);
        assert!(last_writer.try_recv().is_err());
        drop(later_reader);
        let last_writer = last_writer.try_recv().expect("then the writer");
        drop(last_writer);
        assert!(!table.is_claimed(&5));
    }

    #[test]
    fn a_reader_that_left_the_line_is_skipped_and_the_batch_stops_at_a_writer() {
        let table = Arc::new(ClaimTable::<i64>::default());
        let writer = table.try_claim(9, X).expect("free key");
        let gone = queued_as(&table, 9, S);
        let mut reader = queued_as(&table, 9, S);
        let mut next_writer = queued_as(&table, 9, X);
        let mut behind = queued_as(&table, 9, S);
        drop(gone);
        drop(writer);
        let reader = reader.try_recv().expect("the listening reader is let in");
        assert!(next_writer.try_recv().is_err());
        assert!(behind.try_recv().is_err(), "a reader behind a writer waits");
        drop(reader);
        let next_writer = next_writer.try_recv().expect("then the writer");
        drop(next_writer);
        let behind = behind.try_recv().expect("then the last reader");
        drop(behind);
        assert!(!table.is_claimed(&9));
    }

    #[test]
    fn a_writer_that_leaves_the_line_lets_the_readers_behind_it_join() {
        let table = Arc::new(ClaimTable::<i64>::default());
        let reader = table.try_claim(4, S).expect("free key");
        let writer = queued_as(&table, 4, X);
        let mut second = queued_as(&table, 4, S);
        let mut third = queued_as(&table, 4, S);
        let mut last_writer = queued_as(&table, 4, X);
        assert!(second.try_recv().is_err());
        drop(writer);
        let (second, third) = (
            second.try_recv().expect("joins the reader"),
            third.try_recv().expect("so does the next"),
        );
        assert!(last_writer.try_recv().is_err());
        drop((reader, second, third));
        drop(last_writer.try_recv().expect("then the last writer"));
        assert!(!table.is_claimed(&4));
    }

    /// Two shared claims ask at once; one is answered, the other withdraws its question: nothing
    /// is owed any more, so a writer whose budget ran out behind them learns the key is held.
    #[tokio::test(start_paused = true)]
    async fn questions_of_shared_claims_end_in_any_order() {
        let table = Arc::new(ClaimTable::<i64>::default());
        let give_up_at = Instant::now() + std::time::Duration::from_secs(1);
        let mut first = table.try_claim(6, S).expect("free key");
        let mut second = table.try_claim(6, S).expect("readers share");
        first.asking_server();
        second.asking_server();
        first.answered();
        assert!(second.is_unanswered(), "the second question is still open");
        second.withdraw();
        let started = Instant::now();
        assert!(matches!(
            table.overdue(&6, queued_as(&table, 6, X), give_up_at).await,
            Overdue::Held
        ));
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
        // A failure keeps the doubt until the next answer.
        first.asking_server();
        first.failed();
        assert!(first.is_unanswered());
        first.asking_server();
        first.answered();
        assert!(!first.is_unanswered());
    }

    /// A writer queued behind shared claims learns when it is next and every one of them has
    /// its lock on the server, and is told when that may have changed.
    #[tokio::test]
    async fn a_writer_learns_when_it_is_next_behind_readers_that_all_hold() {
        let table = Arc::new(ClaimTable::<i64>::default());
        let mut first = table.try_claim(8, S).expect("free key");
        let mut second = table.try_claim(8, S).expect("readers share");
        let ahead = queued_as(&table, 8, X);
        let writer = queued_as(&table, 8, X);
        let signal = table.grant_signal(&8).expect("claimed key");
        let told = signal.notified();
        first.mark_granted();
        told.await;
        assert!(
            !table.is_next_behind_granted_readers(&writer),
            "one reader still waits"
        );
        second.mark_granted();
        second.mark_granted(); // counted once
        assert!(
            !table.is_next_behind_granted_readers(&writer),
            "a writer is ahead"
        );
        let told = signal.notified();
        drop(ahead);
        told.await;
        assert!(table.is_next_behind_granted_readers(&writer));
        drop(first);
        assert!(table.is_next_behind_granted_readers(&writer));
        // A reader that is not granted yet and goes lets the writer be next again.
        drop(second);
        let mut writer = writer;
        let writer_claim = writer.try_recv().expect("the writer's turn");
        drop(writer_claim);
        assert!(!table.is_claimed(&8));
    }

    fn queued_as(table: &Arc<ClaimTable<i64>>, key: i64, mode: LockMode) -> Turn<i64> {
        match table.claim_or_queue(key, mode) {
            Claim::Queued(turn) => turn,
            Claim::Claimed(_) => panic!("this claim must queue"),
        }
    }
}
