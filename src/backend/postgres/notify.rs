//! Wake-ups for waiters whose key is held by another process: one `LISTEN` connection per lock
//! service, fanning `pg_notify` payloads (advisory keys) out to the local waiters of that key
//! (one exclusive waiter, or every shared one waiting on the server at once).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{oneshot, Notify};

use super::sql::NOTIFY_CHANNEL;
use crate::LockError;

/// Who waits for which key, shared by the listener task and the waiters.
#[derive(Default)]
pub(super) struct WakeHub {
    waiters: Mutex<HashMap<i64, Vec<Arc<Notify>>>>,
}

/// A waiter's registration for one key. Dropping it unregisters.
pub(super) struct Subscription {
    hub: Arc<WakeHub>,
    key: i64,
    notify: Arc<Notify>,
}

impl WakeHub {
    /// Registers interest in `key`. A wake-up that arrives before the waiter waits is kept.
    pub(super) fn subscribe(self: &Arc<Self>, key: i64) -> Subscription {
        let notify = Arc::new(Notify::new());
        self.lock()
            .entry(key)
            .or_default()
            .push(Arc::clone(&notify));
        Subscription {
            hub: Arc::clone(self),
            key,
            notify,
        }
    }

    /// Wakes every waiter of `key`.
    pub(super) fn wake(&self, key: i64) {
        if let Some(waiters) = self.lock().get(&key) {
            for notify in waiters {
                notify.notify_one();
            }
        }
    }

    /// Wakes every waiter (after the listener lost its connection and may have missed some).
    pub(super) fn wake_all(&self) {
        for notify in self.lock().values().flatten() {
            notify.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Vec<Arc<Notify>>>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Subscription {
    /// Resolves at the next wake-up for this key (or at once if one arrived since the last).
    pub(super) async fn woken(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut waiters = self.hub.lock();
        if let Some(of_key) = waiters.get_mut(&self.key) {
            of_key.retain(|notify| !Arc::ptr_eq(notify, &self.notify));
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
