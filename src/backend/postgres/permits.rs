//! Permits ([`DistributedSemaphore`]) on PostgreSQL: up to `limit` holders of a key, each
//! holding one of the advisory locks `base + 0 … base + limit - 1` of the key's permit base
//! ([`permit_base`]), taken on the lock sessions like locks and released, extended and expired
//! like them.
//!
//! * **One statement** takes the first free slot (skipping the slots its session holds
//!   already: advisory locks are re-entrant within a session), counts the key's permits held
//!   and keeps the slot only within the caller's limit, drawing the fencing token (see
//!   `sql::Statements::try_permit`).
//! * **In this process** the tasks of this lock service waiting for a permit of one key form a
//!   line, first in first out ([`Inner::permit_line`](super::Inner), a claim table of its
//!   own): the first in line is the only one that asks the server. A permit released by this
//!   lock service wakes it at once ([`WakeHub::wake_local`](super::notify::WakeHub)); once it
//!   has its permit, the next one asks at once.
//! * **Across processes** the first in line flags the base (the waiter flag, as a lock waiter
//!   does its key) and listens: a release elsewhere that finds the flag notifies the base.
//!   Retries every `retry_interval` cover lost notifications and permits freed without a
//!   release (a session that ended). A release of this process that notified waiters elsewhere
//!   gives them a head start before its own waiter retries.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::claims::{self, Claim};
use super::key_hash::{advisory_key, permit_base, MAX_PERMITS};
use super::notify::Wake;
use super::session::{PermitTry, SessionHandle, WaitFlag};
use super::wait_marks::Marks;
use super::{OpenQuestion, PostgresDistributedLock, WaitError};
use crate::backend::jitter::Jitter;
use crate::backend::semaphore::validate_limit;
use crate::backend::want::PERMIT_LABEL;
use crate::observe::{observe_acquire, Mode};
use crate::{validate_key, DistributedSemaphore, LockError, LockGuard, LockMode};

impl DistributedSemaphore for PostgresDistributedLock {
    fn try_acquire_permit(
        &self,
        key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "postgres",
            keys,
            key,
            Mode::Try,
            PERMIT_LABEL,
            self.try_acquire_permit_once(key, limit),
        )
    }

    fn acquire_permit(
        &self,
        key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "postgres",
            keys,
            key,
            Mode::Wait,
            PERMIT_LABEL,
            self.acquire_permit_waiting(key, limit),
        )
    }

    fn permits_held(&self, key: &str) -> impl Future<Output = Result<u32, LockError>> + Send {
        self.permits_held_now(key)
    }
}

/// Refuses a limit of 0, and one above the [`MAX_PERMITS`] slots a permit base has.
fn check_limit(limit: u32) -> Result<(), LockError> {
    validate_limit(limit)?;
    if limit > MAX_PERMITS {
        return Err(LockError::invalid_config(format!(
            "a permit limit of {limit} is above the {MAX_PERMITS} permits a key can have on \
             PostgreSQL"
        )));
    }
    Ok(())
}

impl PostgresDistributedLock {
    /// The permit base of `key`: its permits ([`DistributedSemaphore`]) are the bigint advisory
    /// locks `base + 0` to `base + limit - 1`. The base is [`advisory_key`](Self::advisory_key)
    /// XOR `0x7065_726D_6974_0000` ("permit" in ASCII) with its low 16 bits cleared, so a key's
    /// permits never meet its own lock. In `pg_locks` they show as `classid` = the base's high 32
    /// bits and `objid` from its low 32 bits to 65,535 above (`objsubid` = 1); see
    /// docs/postgres.md, "Permits".
    ///
    /// ```
    /// use k1s0_distributed_lock::PostgresDistributedLock;
    ///
    /// assert_eq!(PostgresDistributedLock::permit_base("order:42"), -6193212134083133440);
    /// ```
    pub fn permit_base(key: &str) -> i64 {
        permit_base(advisory_key(key))
    }

    async fn try_acquire_permit_once(&self, key: &str, limit: u32) -> Result<LockGuard, LockError> {
        validate_key(key)?;
        check_limit(limit)?;
        self.inner.config.validate()?;
        let advisory = self.inner.key_cache.advisory_key(key);
        let base = permit_base(advisory);
        // A task of this lock service waits for a permit of the key: it goes first.
        if self.inner.hub.has_waiters(base) {
            return Err(LockError::AlreadyLocked);
        }
        let session = self.session_for(advisory)?;
        let ttl = self.inner.config.get_ttl();
        match session
            .try_permit(base, limit, None, ttl, Instant::now())
            .await?
        {
            PermitTry::Granted(granted) => Ok(self.guard(key, LockMode::Shared, granted)),
            PermitTry::Busy(_) => Err(LockError::AlreadyLocked),
        }
    }

    async fn acquire_permit_waiting(&self, key: &str, limit: u32) -> Result<LockGuard, LockError> {
        validate_key(key)?;
        check_limit(limit)?;
        let config = self.inner.config;
        config.validate()?;
        let deadline = Instant::now() + config.wait_budget();
        let advisory = self.inner.key_cache.advisory_key(key);
        self.wait_again_if_session_lost(key, deadline, || {
            self.wait_for_permit(key, advisory, limit, deadline)
        })
        .await
    }

    /// One wait for a permit of `key` (whose advisory key is `advisory`) within `limit` until
    /// `deadline`: in this process's line, then on the server.
    async fn wait_for_permit(
        &self,
        key: &str,
        advisory: i64,
        limit: u32,
        deadline: Instant,
    ) -> Result<LockGuard, WaitError> {
        let base = permit_base(advisory);
        let line = &self.inner.permit_line;
        // First in line among the tasks of this process.
        let mut claim = match line.claim_or_queue(base, LockMode::Exclusive) {
            Claim::Claimed(claim) => claim,
            Claim::Queued(mut turn) => {
                tracing::debug!(key = %self.shown_key(key), line = "process", "waiting for a permit");
                let waited = tokio::time::timeout_at(deadline, &mut turn).await.ok();
                self.turn_taken(line, base, turn, waited, deadline).await?
            }
        };
        let session = self.session_for(advisory)?;
        if let PermitTry::Granted(granted) = self
            .ask_for_permit(&session, &mut claim, base, limit, None)
            .await?
        {
            return Ok(self.guard(key, LockMode::Shared, granted));
        }
        if Instant::now() >= deadline {
            return Err(LockError::Timeout.into());
        }

        // No permit within the limit: listen (for releases here and elsewhere), flag the base,
        // retry on a wake-up or the timer. Subscribed before the flag and the retry after it,
        // so no release after the first attempt goes unseen.
        tracing::debug!(key = %self.shown_key(key), line = "backend", "waiting for a permit");
        let woken = self.inner.hub.subscribe(base);
        let flag_sent_at = Instant::now();
        let flag = session.wait_flag(base);
        let mut marked = Self::mark(&session, &mut claim, &flag, Marks::FLAG).await?;
        let head_start = self.head_start(flag_sent_at.elapsed());
        let listening = self.listening_by(deadline).await;
        let mut jitter = Jitter::new(uuid::Uuid::new_v4());
        // The flag was refused because a release was checking it: retry at once, once.
        let mut retry_now = !marked.contains(Marks::FLAG);
        // Races lost after a notification: each one shortens this waiter's random delay.
        let mut races_lost = 0;
        loop {
            match self
                .ask_for_permit(&session, &mut claim, base, limit, Some(&flag))
                .await
                .map_err(WaitError::while_waiting)?
            {
                PermitTry::Granted(granted) => {
                    return Ok(self.guard(key, LockMode::Shared, granted))
                }
                // A flag lost with a connection is set again below.
                PermitTry::Busy(still_marked) => marked = still_marked,
            }
            if Instant::now() >= deadline {
                return Err(LockError::Timeout.into());
            }
            if !marked.contains(Marks::FLAG) {
                marked = Self::mark(&session, &mut claim, &flag, Marks::FLAG).await?;
                if !marked.contains(Marks::FLAG) && !std::mem::replace(&mut retry_now, true) {
                    continue;
                }
            }
            retry_now = false;
            // Without a flag no release elsewhere notifies this process: poll.
            let notifiable = listening && marked.contains(Marks::FLAG);
            let retry_at =
                (Instant::now() + self.poll_interval(notifiable, &mut jitter)).min(deadline);
            let wake = tokio::select! {
                wake = woken.woken() => Some(wake),
                () = tokio::time::sleep_until(retry_at) => None,
            };
            let delay = match wake {
                None | Some(Wake::Released) => Duration::ZERO,
                // This process released a permit that waiters elsewhere were told of: they go
                // first, as for locks (see `acquire_waiting`). Not cut short by a notification:
                // this process's listener hears that same release too.
                Some(Wake::ReleasedToOthers) => head_start,
                // Waiters of several processes race for the permit: a random delay below the
                // head start makes each race a draw, shorter for a waiter that lost races.
                Some(Wake::Notified) => {
                    races_lost += 1;
                    jitter.between(Duration::ZERO, head_start / races_lost)
                }
            };
            if !delay.is_zero() {
                tokio::time::sleep_until((Instant::now() + delay).min(deadline)).await;
            }
        }
    }

    /// Asks `session` for a permit of `base` within `limit` for the first task in line (its
    /// `claim` records the question, so that the tasks behind it can tell a key that stayed
    /// taken from a server that did not answer).
    async fn ask_for_permit(
        &self,
        session: &SessionHandle,
        claim: &mut claims::KeyClaim,
        base: i64,
        limit: u32,
        flag: Option<&WaitFlag>,
    ) -> Result<PermitTry, LockError> {
        claim.asking_server();
        // Dropped mid-way (the caller left), the question is withdrawn: the session skips a
        // command whose caller is gone, and undoes a permit granted to nobody.
        let question = OpenQuestion(claim);
        let ttl = self.inner.config.get_ttl();
        let answer = session
            .try_permit(base, limit, flag, ttl, Instant::now())
            .await;
        match &answer {
            Ok(_) => question.0.answered(),
            Err(_) => question.0.failed(),
        }
        answer
    }

    async fn permits_held_now(&self, key: &str) -> Result<u32, LockError> {
        validate_key(key)?;
        let advisory = self.inner.key_cache.advisory_key(key);
        let base = permit_base(advisory);
        self.session_for(advisory)?.permits_held(base).await
    }
}
