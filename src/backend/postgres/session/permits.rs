//! The session's side of permits ([`crate::DistributedSemaphore`]): taking a slot of a key's
//! permit base, counting the key's permits, and making sure a failed attempt leaves no slot
//! behind. Releasing, extending and expiring a permit go through the same paths as a lock
//! (see [`Hold::Permit`]).

use super::handle::{PermitAttempt, Reply};
use super::{Args, Failure, Hold, PermitTry, Session};
use crate::backend::postgres::wait_marks::Marks;
use crate::LockError;

impl Session {
    /// Tries to take a permit of `attempt.base` within the caller's limit (see
    /// [`Statements::try_permit`](super::super::sql::Statements)), skipping the slots this
    /// session holds already. With a waiter flag, a success also drops the flag (if no other
    /// waiter of this session holds it).
    pub(super) async fn try_permit(&mut self, attempt: PermitAttempt, reply: Reply<PermitTry>) {
        if reply.is_closed() {
            // The caller gave up before its turn.
            return;
        }
        let PermitAttempt {
            base,
            limit,
            flag,
            ttl,
            sent_at,
        } = attempt;
        let held = self.permit_slots.get(&base).cloned().unwrap_or_default();
        let to_drop = flag.map_or(Marks::NONE, |id| self.marks_only_of(base, id)) & Marks::FLAG;
        // A limit above `i32::MAX` was refused by the caller (`MAX_PERMITS`).
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let answer = self
            .query::<(Option<i32>, Option<i64>, Option<bool>, Option<bool>)>(
                |sql| &sql.try_permit,
                Args::Permit(base, limit, held.clone(), !to_drop.is_empty()),
            )
            .await;
        let (slot, token, dropped) = match answer {
            Ok((Some(slot), Some(token), dropped, _)) => (slot, token, dropped),
            Ok(_) => {
                let marks = self.waiter_marks(base, flag);
                let _ = reply.send(Ok(PermitTry::Busy(marks)));
                return;
            }
            Err(failure) => {
                if let Failure::Statement(_) = &failure {
                    // A slot taken before the error would stay locked for the session's life.
                    self.unlock_unknown_permits(base, held).await;
                }
                let _ = reply.send(Err(failure.into_error()));
                return;
            }
        };
        if let Some(id) = flag {
            // The statement dropped the flag if this waiter alone held it.
            let dropped = if dropped == Some(true) {
                Marks::FLAG
            } else {
                Marks::NONE
            };
            let left = self.forget_flag(base, id) - dropped;
            if !left.is_empty() {
                if let Err(lost) = self.clear_marks(base, left).await {
                    // The permit went with the session.
                    let _ = reply.send(Err(lost));
                    return;
                }
            }
        }
        self.permit_slots.entry(base).or_default().push(slot);
        let key = base + i64::from(slot);
        let hold = Hold::Permit { base, slot };
        let Some((id, granted)) = self.record_hold(key, hold, sent_at, ttl, token).await else {
            return;
        };
        if let Err(Ok(PermitTry::Granted(unwanted))) = reply.send(Ok(PermitTry::Granted(granted))) {
            tracing::debug!(
                permit_base = base,
                slot,
                "acquire cancelled as the permit was granted; unlocking"
            );
            self.undo_unwanted(id, unwanted).await;
        }
    }

    /// Answers how many permits of `base` are held, by any session.
    pub(super) async fn permits_held(&mut self, base: i64, reply: Reply<u32>) {
        if reply.is_closed() {
            return;
        }
        let result = self
            .query::<(i64,)>(|sql| &sql.permits_held, Args::Base(base))
            .await;
        let _ = reply.send(
            result
                .map(|(held,)| u32::try_from(held).unwrap_or(u32::MAX))
                .map_err(Failure::into_error),
        );
    }

    /// After a failed permit statement: unlocks every slot of `base` that this session holds
    /// on the server but not for a guard (`known`). If that fails too, closes the session,
    /// which frees them for sure (its guards report lost).
    async fn unlock_unknown_permits(&mut self, base: i64, known: Vec<i32>) {
        let result = self
            .query::<(i64,)>(
                |sql| &sql.unlock_unknown_permits,
                Args::BaseAndSlots(base, known),
            )
            .await;
        match result {
            Ok((0,)) => {}
            Ok((unlocked,)) => {
                tracing::debug!(
                    permit_base = base,
                    unlocked,
                    "unlocked a permit slot that a failed statement had taken"
                );
            }
            Err(Failure::Statement(error)) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    permit_base = base,
                    "cleanup after a failed permit statement failed; closing the session"
                );
                self.lose_session(LockError::backend(error));
            }
            // `query` closed the session.
            Err(Failure::SessionLost(_)) => {}
        }
    }

    /// Forgets `slot` of `base` once its hold is gone.
    pub(super) fn forget_permit_slot(&mut self, base: i64, slot: i32) {
        if let Some(slots) = self.permit_slots.get_mut(&base) {
            slots.retain(|&held| held != slot);
            if slots.is_empty() {
                self.permit_slots.remove(&base);
            }
        }
    }
}
