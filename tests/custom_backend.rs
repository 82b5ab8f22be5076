//! A backend written outside the crate, with the public extension API: LockGuard::new,
//! Lease and LockHandle.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k1s0_distributed_lock::{DistributedLock, Lease, LockError, LockGuard, LockHandle, Uuid};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// A lock that never refuses and reports every release on a channel. Its release can be made
/// to hang until `let_release_finish` is notified.
struct RecordingLock {
    released: mpsc::UnboundedSender<Uuid>,
    fencing: AtomicU64,
    release_gate: Option<Arc<Notify>>,
}

struct RecordingHandle {
    token: Uuid,
    released: mpsc::UnboundedSender<Uuid>,
    release_gate: Option<Arc<Notify>>,
}

impl LockHandle for RecordingHandle {
    fn release(&self) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(async move {
            if let Some(gate) = &self.release_gate {
                gate.notified().await;
            }
            self.released.send(self.token).unwrap();
            Ok(())
        })
    }

    fn extend(&self, _ttl: Duration) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(async { Err(LockError::LockLost) })
    }
}

impl DistributedLock for RecordingLock {
    fn try_acquire(&self, key: &str) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let token = Uuid::new_v4();
        let guard = LockGuard::new(
            key,
            token,
            self.fencing.fetch_add(1, Ordering::SeqCst) + 1,
            Lease::new(Instant::now(), Duration::from_secs(30)),
            RecordingHandle {
                token,
                released: self.released.clone(),
                release_gate: self.release_gate.clone(),
            },
        );
        async move { Ok(guard) }
    }

    async fn acquire(&self, key: &str) -> Result<LockGuard, LockError> {
        self.try_acquire(key).await
    }

    async fn is_locked(&self, _key: &str) -> Result<bool, LockError> {
        Ok(false)
    }
}

fn recording(release_gate: Option<Arc<Notify>>) -> (RecordingLock, mpsc::UnboundedReceiver<Uuid>) {
    let (released, rx) = mpsc::unbounded_channel();
    let lock = RecordingLock {
        released,
        fencing: AtomicU64::new(0),
        release_gate,
    };
    (lock, rx)
}

#[tokio::test]
async fn a_dropped_guard_is_released_in_the_background_promptly() {
    let (lock, mut released) = recording(None);
    let guard = lock.try_acquire("job").await.unwrap();
    let token = guard.token();
    drop(guard);
    assert_eq!(released.recv().await, Some(token));
}

#[tokio::test]
async fn an_explicit_release_runs_once_and_drop_does_not_repeat_it() {
    let (lock, mut released) = recording(None);
    let guard = lock.try_acquire("job").await.unwrap();
    let token = guard.token();
    lock.release(guard).await.unwrap();
    assert_eq!(released.recv().await, Some(token));
    drop(lock);
    assert_eq!(released.recv().await, None, "released twice");
}

#[tokio::test]
async fn a_cancelled_release_still_happens_in_the_background() {
    let gate = Arc::new(Notify::new());
    let (lock, mut released) = recording(Some(gate.clone()));
    let guard = lock.try_acquire("job").await.unwrap();
    let token = guard.token();
    let attempt = tokio::time::timeout(Duration::from_millis(1), guard.release()).await;
    assert!(
        attempt.is_err(),
        "the release was expected to hang at the gate"
    );
    // The background retry waits at the same gate; open it once for it.
    gate.notify_one();
    assert_eq!(released.recv().await, Some(token));
}

#[tokio::test]
async fn a_failed_extend_marks_the_guard_lost() {
    let (lock, _released) = recording(None);
    let guard = lock.try_acquire("job").await.unwrap();
    assert_eq!(guard.fencing_token(), 1);
    assert!(!guard.is_lost());
    assert!(matches!(
        guard.extend(Duration::from_secs(1)).await,
        Err(LockError::LockLost)
    ));
    assert!(guard.is_lost());
}

#[tokio::test]
async fn a_lost_guard_answers_lock_lost_at_once_and_cleans_up_in_the_background() {
    let gate = Arc::new(Notify::new());
    let (lock, mut released) = recording(Some(gate.clone()));
    let guard = lock.try_acquire("job").await.unwrap();
    let token = guard.token();
    assert!(guard.extend(Duration::from_secs(1)).await.is_err());
    assert!(guard.is_lost());
    // The backend's release hangs at the gate (as an unreachable server would): the answer
    // must not wait for it.
    let answer = tokio::time::timeout(Duration::from_secs(5), guard.release()).await;
    assert!(matches!(answer, Ok(Err(LockError::LockLost))), "{answer:?}");
    gate.notify_one();
    assert_eq!(released.recv().await, Some(token), "no background clean-up");
}
