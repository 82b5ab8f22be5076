//! Wake-ups for waiters whose key is held by another process: one `LISTEN` connection per lock
//! service, fanning `pg_notify` payloads (advisory keys, or permit bases) out to the local
//! waiters of that key (one exclusive waiter, or every shared one waiting on the server at
//! once). A permit released by this process wakes its key's waiter here directly
//! ([`WakeHub::wake_local`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{oneshot, Notify};

use super::sql::NOTIFY_CHANNEL;
use crate::LockError;

/// Who waits for which key, shared by the listener task, the lock sessions and the waiters.
#[derive(Default)]
pub(super) struct WakeHub {
    waiters: Mutex<HashMap<i64, Vec<Arc<Waiter>>>>,
}

/// One subscription's side of the hub.
#[derive(Default)]
struct Waiter {
    notify: Notify,
    /// The last wake-up's [`Wake`], as a number.
    last: AtomicU8,
}

/// What woke a waiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Wake {
    /// A notification from another process (or the listener reconnecting): waiters of several
    /// processes may have been woken by it.
    Notified = 0,
    /// A release in this process that notified no other process.
    Released = 1,
    /// A release in this process that notified waiters of other processes too: they should
    /// get a head start.
    ReleasedToOthers = 2,
}

impl Wake {
    fn from_u8(value: u8) -> Wake {
        match value {
            1 => Wake::Released,
            2 => Wake::ReleasedToOthers,
            _ => Wake::Notified,
        }
    }
}

/// A waiter's registration for one key. Dropping it unregisters.
pub(super) struct Subscription {
    hub: Arc<WakeHub>,
    key: i64,
    waiter: Arc<Waiter>,
}

impl WakeHub {
    /// Registers interest in `key`. A wake-up that arrives before the waiter waits is kept.
    pub(super) fn subscribe(self: &Arc<Self>, key: i64) -> Subscription {
        let waiter = Arc::new(Waiter::default());
        self.lock()
            .entry(key)
            .or_default()
            .push(Arc::clone(&waiter));
        Subscription {
            hub: Arc::clone(self),
            key,
            waiter,
        }
    }

    /// Wakes every waiter of `key` for a notification.
    pub(super) fn wake(&self, key: i64) {
        self.wake_as(key, Wake::Notified);
    }

    /// Wakes every waiter of `key` for a release in this process, which notified waiters of
    /// other processes too if `others_notified`.
    pub(super) fn wake_local(&self, key: i64, others_notified: bool) {
        let wake = if others_notified {
            Wake::ReleasedToOthers
        } else {
            Wake::Released
        };
        self.wake_as(key, wake);
    }

    fn wake_as(&self, key: i64, wake: Wake) {
        if let Some(waiters) = self.lock().get(&key) {
            for waiter in waiters {
                waiter.wake(wake);
            }
        }
    }

    /// Wakes every waiter (after the listener lost its connection and may have missed some).
    pub(super) fn wake_all(&self) {
        for waiter in self.lock().values().flatten() {
            waiter.wake(Wake::Notified);
        }
    }

    /// Whether some task of this process waits for `key`.
    pub(super) fn has_waiters(&self, key: i64) -> bool {
        self.lock().contains_key(&key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Vec<Arc<Waiter>>>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Waiter {
    fn wake(&self, wake: Wake) {
        // Before the permit is stored, so that the waiter it lets through reads this.
        self.last.store(wake as u8, Ordering::Release);
        self.notify.notify_one();
    }
}

impl Subscription {
    /// Resolves at the next wake-up for this key (or at once if one arrived since the last),
    /// saying what it was (of several since the last, the latest).
    pub(super) async fn woken(&self) -> Wake {
        self.waiter.notify.notified().await;
        Wake::from_u8(self.waiter.last.load(Ordering::Acquire))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut waiters = self.hub.lock();
        if let Some(of_key) = waiters.get_mut(&self.key) {
            of_key.retain(|waiter| !Arc::ptr_eq(waiter, &self.waiter));
            if of_key.is_empty() {
                waiters.remove(&self.key);
            }
        }
    }
}

/// The running listener. Dropping it stops the task, which gives its connection back to the
/// pool (it holds no locks, only a `LISTEN`, which sqlx undoes with `UNLISTEN *`).
pub(super) struct Listener {
    _stop: oneshot::Sender<()>,
}

impl Listener {
    /// Takes a connection from `pool`, `LISTEN`s, and forwards notifications to `hub` until
    /// dropped. Returns once the `LISTEN` is active, so a waiter that flags its key after this
    /// cannot miss the release's notification.
    pub(super) async fn start(
        pool: &PgPool,
        hub: Arc<WakeHub>,
        timeout: Duration,
    ) -> Result<Self, LockError> {
        let connect = async {
            let mut listener = PgListener::connect_with(pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let listener = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(listener)) => listener,
            Ok(Err(error)) => return Err(LockError::backend(error)),
            Err(_) => {
                return Err(LockError::backend_msg(format!(
                    "starting the LISTEN connection took longer than {timeout:?}"
                )))
            }
        };
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(forward(listener, hub, stopped));
        Ok(Listener { _stop: stop })
    }

    /// Whether its task still runs (it ends with its runtime).
    pub(super) fn is_running(&self) -> bool {
        !self._stop.is_closed()
    }
}

async fn forward(mut listener: PgListener, hub: Arc<WakeHub>, mut stopped: oneshot::Receiver<()>) {
    loop {
        let received = tokio::select! {
            _ = &mut stopped => return,
            received = listener.try_recv() => received,
        };
        match received {
            Ok(Some(notification)) => match notification.payload().parse::<i64>() {
                Ok(key) => hub.wake(key),
                Err(_) => tracing::debug!(
                    payload = notification.payload(),
                    "ignored a notification that is not an advisory key"
                ),
            },
            Ok(None) => {
                // Reconnecting: notifications may have been missed, so every waiter retries.
                tracing::debug!("lock notification listener lost its connection; reconnecting");
                hub.wake_all();
            }
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "lock notification listener failed; retrying in 1 s"
                );
                hub.wake_all();
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
