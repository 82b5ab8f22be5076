//! Wake-on-release: one pub/sub connection per lock object, subscribed to the release channel
//! of every key some local task waits for.
//!
//! A release publishes the token of the waiter at the head of the key's queue; the hub wakes
//! exactly that waiter. Messages can be lost (the pub/sub connection dropped, the waiter was
//! not subscribed yet): waiters also poll, so a lost message costs latency, never correctness.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

/// The pub/sub side of one [`RedisDistributedLock`](super::RedisDistributedLock).
pub(crate) struct WakeHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    client: redis::Client,
    timeout: Duration,
    state: Mutex<HubState>,
    /// The live subscription connection; held while (un)subscribing so that commands for one
    /// channel reach the server in the order they were decided.
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    /// Whether a subscription attempt is running (see `Registration::ensure_subscribed`).
    attempt_in_flight: AtomicBool,
}

#[derive(Default)]
struct HubState {
    channels: HashMap<String, Channel>,
    /// Counts pub/sub connections, so that the end of an old one does not unconfirm the
    /// subscriptions of the current one.
    generation: u64,
    /// The task reading the current connection's messages; it owns the connection.
    reader: Option<AbortHandle>,
}

#[derive(Default)]
struct Channel {
    /// Waiter token (hyphenated UUID) → its wake-up.
    waiters: HashMap<String, Arc<Notify>>,
    /// Whether the current connection confirmed the subscription.
    subscribed: bool,
}

/// One waiting task's interest in a channel. Dropping it unsubscribes when it was the last.
pub(crate) struct Registration {
    hub: Arc<HubInner>,
    channel: String,
    token: String,
    notify: Arc<Notify>,
}

impl WakeHub {
    pub(crate) fn new(client: redis::Client, timeout: Duration) -> Self {
        WakeHub {
            inner: Arc::new(HubInner {
                client,
                timeout,
                state: Mutex::default(),
                sink: tokio::sync::Mutex::new(None),
                attempt_in_flight: AtomicBool::new(false),
            }),
        }
    }

    /// Registers a waiter and makes sure the channel is subscribed, trying for at most `limit`
    /// (and the command timeout). A failure to subscribe is logged and leaves the waiter to
    /// polling.
    pub(crate) async fn register(
        &self,
        channel: &str,
        token: String,
        limit: Duration,
    ) -> Registration {
        let notify = Arc::new(Notify::new());
        self.inner
            .state()
            .channels
            .entry(channel.to_owned())
            .or_default()
            .waiters
            .insert(token.clone(), Arc::clone(&notify));
        let registration = Registration {
            hub: Arc::clone(&self.inner),
            channel: channel.to_owned(),
            token,
            notify,
        };
        registration.ensure_subscribed(limit).await;
        registration
    }
}

impl Registration {
    /// Resolves when a release named this waiter (or a wake-up arrived since the last call).
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Subscribes the channel if the current connection has not confirmed it yet (a lost
    /// connection unconfirms every channel). Cheap when it is subscribed.
    ///
    /// The attempt runs in a task of its own, bounded by the command timeout, so that it is
    /// never cut short by the waiter; the waiter only waits for it up to `limit` (its poll
    /// interval), so a slow pub/sub connection never keeps it from refreshing its place in the
    /// queue. One attempt per lock object at a time: a new connection subscribes every channel
    /// that has waiters.
    pub(crate) async fn ensure_subscribed(&self, limit: Duration) {
        if self.hub.is_subscribed(&self.channel) {
            return;
        }
        let Some(in_flight) = AttemptInFlight::start(&self.hub) else {
            return;
        };
        let channel = self.channel.clone();
        let attempt = tokio::spawn(async move {
            let hub = &in_flight.0;
            match tokio::time::timeout(hub.timeout, hub.subscribe(&channel)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(error = &error as &dyn std::error::Error, %channel, "could not subscribe to the release channel; polling");
                }
                Err(_) => {
                    tracing::debug!(%channel, "subscribing to the release channel timed out; polling");
                }
            }
        });
        let _ = tokio::time::timeout(limit, attempt).await;
    }
}

/// Marks a subscription attempt of the hub as running, until dropped.
struct AttemptInFlight(Arc<HubInner>);

impl AttemptInFlight {
    fn start(hub: &Arc<HubInner>) -> Option<Self> {
        let was_running = hub.attempt_in_flight.swap(true, Ordering::AcqRel);
        (!was_running).then(|| AttemptInFlight(Arc::clone(hub)))
    }
}

impl Drop for AttemptInFlight {
    fn drop(&mut self) {
        self.0.attempt_in_flight.store(false, Ordering::Release);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let now_unused = {
            let mut state = self.hub.state();
            match state.channels.get_mut(&self.channel) {
                Some(channel) => {
                    channel.waiters.remove(&self.token);
                    if channel.waiters.is_empty() {
                        state.channels.remove(&self.channel);
                        true
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if now_unused {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let hub = Arc::clone(&self.hub);
                let channel = std::mem::take(&mut self.channel);
                runtime.spawn(async move {
                    let timeout = hub.timeout;
                    let _ =
                        tokio::time::timeout(timeout, hub.unsubscribe_if_unused(&channel)).await;
                });
            }
        }
    }
}

impl HubInner {
    fn state(&self) -> MutexGuard<'_, HubState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_subscribed(&self, channel: &str) -> bool {
        self.state()
            .channels
            .get(channel)
            .is_some_and(|channel| channel.subscribed)
    }

    async fn subscribe(self: &Arc<Self>, channel: &str) -> redis::RedisResult<()> {
        let mut sink = self.sink.lock().await;
        if self.is_subscribed(channel) {
            return Ok(());
        }
        if let Some(current) = sink.as_mut() {
            match tokio::time::timeout(self.timeout, current.subscribe(channel)).await {
                Ok(Ok(())) => {
                    self.mark_subscribed(channel);
                    return Ok(());
                }
                Ok(Err(error)) => {
                    tracing::debug!(
                        error = &error as &dyn std::error::Error,
                        "the pub/sub connection failed; reconnecting"
                    );
                    *sink = None;
                }
                Err(_) => {
                    tracing::debug!("the pub/sub connection did not answer; reconnecting");
                    *sink = None;
                }
            }
        }
        // (Re)connect and subscribe every channel that has waiters.
        let (mut new_sink, stream) = self.client.get_async_pubsub().await?.split();
        {
            let mut state = self.state();
            state.generation += 1;
            let reader = tokio::spawn(dispatch(Arc::downgrade(self), stream, state.generation));
            if let Some(previous) = state.reader.replace(reader.abort_handle()) {
                previous.abort();
            }
        }
        let channels: Vec<String> = self.state().channels.keys().cloned().collect();
        if !channels.is_empty() {
            new_sink.subscribe(&channels).await?;
            let mut state = self.state();
            for name in &channels {
                if let Some(channel) = state.channels.get_mut(name) {
                    channel.subscribed = true;
                }
            }
        }
        *sink = Some(new_sink);
        Ok(())
    }

    fn mark_subscribed(&self, channel: &str) {
        if let Some(channel) = self.state().channels.get_mut(channel) {
            channel.subscribed = true;
        }
    }

    async fn unsubscribe_if_unused(&self, channel: &str) {
        let mut sink = self.sink.lock().await;
        if self.state().channels.contains_key(channel) {
            return; // A new waiter came; it keeps (or renews) the subscription.
        }
        if let Some(current) = sink.as_mut() {
            if let Err(error) = current.unsubscribe(channel).await {
                tracing::debug!(
                    error = &error as &dyn std::error::Error,
                    "unsubscribing a release channel failed"
                );
                *sink = None;
            }
        }
    }

    /// The connection of `generation` ended: if it was the current one, nothing is subscribed
    /// any more, and the next subscribe reconnects.
    fn connection_lost(&self, generation: u64) {
        let mut state = self.state();
        if state.generation == generation {
            for channel in state.channels.values_mut() {
                channel.subscribed = false;
            }
        }
    }

    fn wake(&self, channel: &str, token: &[u8]) {
        let state = self.state();
        let waiter = std::str::from_utf8(token)
            .ok()
            .and_then(|token| state.channels.get(channel)?.waiters.get(token));
        if let Some(notify) = waiter {
            notify.notify_one();
        }
    }
}

impl Drop for HubInner {
    fn drop(&mut self) {
        // The reader holds the connection open; the lock object is gone, so close it.
        if let Some(reader) = self.state().reader.take() {
            reader.abort();
        }
    }
}

/// Reads the messages of one pub/sub connection until it ends.
async fn dispatch(hub: Weak<HubInner>, mut stream: PubSubStream, generation: u64) {
    while let Some(message) = stream.next().await {
        let Some(hub) = hub.upgrade() else { return };
        hub.wake(message.get_channel_name(), message.get_payload_bytes());
    }
    if let Some(hub) = hub.upgrade() {
        tracing::debug!("the pub/sub connection closed; waiters poll until it is back");
        hub.connection_lost(generation);
    }
}
