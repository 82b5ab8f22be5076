//! Wake-on-release: one pub/sub connection per lock object, kept by one task, subscribed to the
//! channel of every local task that waits in a Redis line.
//!
//! A release publishes the token of the waiter at the head of the key's line on that waiter's
//! own channel (`<lock key>:released:<token>`, so a release reaches one subscriber however many
//! wait); the hub wakes that waiter. While its channel is subscribed, a waiter relies on these messages and
//! looks at the lock only to keep its place in line (see `RedisDistributedLock::take`). The
//! task pings the connection; when a ping goes unanswered or the connection closes, every
//! waiter is woken and polls until the channels are subscribed again, on a new connection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// How often the pub/sub connection is pinged, and a lost one retried.
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(1);

/// The pub/sub side of one [`RedisDistributedLock`](super::RedisDistributedLock).
pub(crate) struct WakeHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    client: redis::Client,
    timeout: Duration,
    state: Mutex<HubState>,
    /// Tells the subscriber task that a channel gained its first waiter or lost its last.
    changed: Arc<Notify>,
    /// Bumped whenever subscriptions were confirmed or lost; a waiter that waits for its
    /// channel's confirmation watches it.
    confirmations: watch::Sender<u64>,
}

#[derive(Default)]
struct HubState {
    channels: HashMap<String, Channel>,
    /// The subscriber task, started by the first waiter.
    subscriber: Option<AbortHandle>,
    /// Whether a connection failed since the last one was opened (for the metrics).
    failed_since_open: bool,
}

/// The channel of one waiting task (each waiter has a channel of its own).
struct Channel {
    /// The waiter's wake-up.
    notify: Arc<Notify>,
    /// Whether the current connection confirmed the subscription.
    subscribed: bool,
}

/// One waiting task's channel. Dropping it unsubscribes it.
pub(crate) struct Registration {
    hub: Arc<HubInner>,
    channel: String,
    notify: Arc<Notify>,
}

impl WakeHub {
    pub(crate) fn new(client: redis::Client, timeout: Duration) -> Self {
        WakeHub {
            inner: Arc::new(HubInner {
                client,
                timeout,
                state: Mutex::default(),
                changed: Arc::new(Notify::new()),
                confirmations: watch::Sender::new(0),
            }),
        }
    }

    /// Registers a waiter on its own `channel`; the subscriber task subscribes it. Must be
    /// called on a Tokio runtime (it starts that task with the first waiter).
    pub(crate) fn register(&self, channel: String) -> Registration {
        let notify = Arc::new(Notify::new());
        let waiter = Channel {
            notify: Arc::clone(&notify),
            subscribed: false,
        };
        self.inner.state().channels.insert(channel.clone(), waiter);
        self.inner.ensure_subscriber();
        self.inner.changed.notify_one();
        Registration {
            hub: Arc::clone(&self.inner),
            channel,
            notify,
        }
    }
}

impl Registration {
    /// Resolves when a release named this waiter, or the pub/sub connection was lost (or
    /// either happened since the last call).
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Whether the current pub/sub connection has confirmed this waiter's channel: a release
    /// will reach it as a message. When it has not, makes sure the subscriber task runs (it
    /// ends with the runtime that started it), so that the channel gets subscribed.
    pub(crate) fn is_subscribed(&self) -> bool {
        let subscribed = self.hub.is_subscribed(&self.channel);
        if !subscribed {
            self.hub.ensure_subscriber();
        }
        subscribed
    }

    /// Waits up to `limit` for the channel to be subscribed; returns whether it is.
    pub(crate) async fn subscribed_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut confirmations = self.hub.confirmations.subscribe();
        loop {
            if self.is_subscribed() {
                return true;
            }
            match tokio::time::timeout_at(deadline, confirmations.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.is_subscribed(),
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.state().channels.remove(&self.channel);
        self.hub.changed.notify_one();
    }
}

impl HubInner {
    fn state(&self) -> MutexGuard<'_, HubState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the subscriber task if it is not running: with the first waiter, and again when
    /// it ended because its runtime shut down. Must be called on a Tokio runtime.
    fn ensure_subscriber(self: &Arc<Self>) {
        let mut state = self.state();
        let running = state
            .subscriber
            .as_ref()
            .is_some_and(|task| !task.is_finished());
        if !running {
            let task = keep_subscriptions(Arc::downgrade(self), Arc::clone(&self.changed));
            state.subscriber = Some(tokio::spawn(task).abort_handle());
        }
    }

    fn is_subscribed(&self, channel: &str) -> bool {
        self.state()
            .channels
            .get(channel)
            .is_some_and(|channel| channel.subscribed)
    }

    fn wake(&self, channel: &str) {
        if let Some(waiter) = self.state().channels.get(channel) {
            waiter.notify.notify_one();
        }
    }

    /// Makes the server's subscriptions match the channels that have waiters: every missing
    /// channel in one `SUBSCRIBE`, every unused one in one `UNSUBSCRIBE`, on a new connection
    /// if there is none.
    async fn sync(&self, link: &mut Option<Link>) -> redis::RedisResult<()> {
        let link = match link {
            Some(link) => link,
            None if self.state().channels.is_empty() => return Ok(()),
            // Connected first, so that waiters that come meanwhile are in the same command.
            None => {
                let opened = self.bounded(Link::open(&self.client)).await?;
                if std::mem::take(&mut self.state().failed_since_open) {
                    crate::observe::reconnected("redis", "pubsub");
                }
                link.insert(opened)
            }
        };
        let (missing, unused) = {
            let state = self.state();
            let missing: Vec<String> = state
                .channels
                .iter()
                .filter(|(_, channel)| !channel.subscribed)
                .map(|(name, _)| name.clone())
                .collect();
            let unused: Vec<String> = link
                .channels
                .iter()
                .filter(|name| !state.channels.contains_key(*name))
                .cloned()
                .collect();
            (missing, unused)
        };
        if !unused.is_empty() {
            self.bounded(link.sink.unsubscribe(&unused)).await?;
            for name in &unused {
                link.channels.remove(name);
            }
        }
        if !missing.is_empty() {
            self.bounded(link.sink.subscribe(&missing)).await?;
            let mut state = self.state();
            for name in missing {
                if let Some(channel) = state.channels.get_mut(&name) {
                    channel.subscribed = true;
                }
                link.channels.insert(name);
            }
            drop(state);
            self.confirmations.send_modify(|count| *count += 1);
        }
        Ok(())
    }

    /// The connection failed: nothing is subscribed any more, and every waiter that relied on
    /// it is woken, to poll until the subscriber task has subscribed its channel on a new
    /// connection.
    fn lost(&self, link: &mut Option<Link>) {
        *link = None;
        let mut state = self.state();
        state.failed_since_open = true;
        for channel in state.channels.values_mut() {
            // Those that relied on the connection look at the lock now, and poll from then on.
            if std::mem::take(&mut channel.subscribed) {
                channel.notify.notify_one();
            }
        }
        drop(state);
        self.confirmations.send_modify(|count| *count += 1);
    }

    /// `future` within the command timeout; running out of it is an error like the others.
    async fn bounded<T>(
        &self,
        future: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        tokio::time::timeout(self.timeout, future)
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the pub/sub connection did not answer within the command timeout",
                )))
            })
    }
}

impl Drop for HubInner {
    fn drop(&mut self) {
        // The lock object is gone: stop its subscriber task, which closes the connection.
        if let Some(subscriber) = self.state().subscriber.take() {
            subscriber.abort();
        }
    }
}

/// A pub/sub connection and the channels it is subscribed to.
struct Link {
    sink: PubSubSink,
    stream: PubSubStream,
    channels: HashSet<String>,
}

impl Link {
    async fn open(client: &redis::Client) -> redis::RedisResult<Link> {
        let (sink, stream) = client.get_async_pubsub().await?.split();
        Ok(Link {
            sink,
            stream,
            channels: HashSet::new(),
        })
    }
}

/// Dropped with the subscriber task: when the task ends while the lock object lives (its
/// runtime shut down), nothing is subscribed any more; its waiters poll, and the next waiter
/// starts a new task.
struct SubscriberEnding(Weak<HubInner>);

impl Drop for SubscriberEnding {
    fn drop(&mut self) {
        if let Some(hub) = self.0.upgrade() {
            hub.lost(&mut None);
        }
    }
}

/// What woke the subscriber task.
enum Event {
    Changed,
    Ping,
    Message(redis::Msg),
    Closed,
}

/// The hub's task: owns the pub/sub connection, delivers its messages, keeps its
/// subscriptions equal to the channels that have waiters, and pings it every
/// [`PING_INTERVAL`]. A connection that fails is replaced at the next change or ping.
async fn keep_subscriptions(hub: Weak<HubInner>, changed: Arc<Notify>) {
    let _ending = SubscriberEnding(hub.clone());
    let mut link: Option<Link> = None;
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let event = {
            let message = async {
                match link.as_mut() {
                    Some(link) => link.stream.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = changed.notified() => Event::Changed,
                _ = ping.tick() => Event::Ping,
                message = message => message.map_or(Event::Closed, Event::Message),
            }
        };
        let Some(hub) = hub.upgrade() else { return };
        match event {
            Event::Message(message) => {
                hub.wake(message.get_channel_name());
                continue;
            }
            Event::Closed => {
                tracing::warn!("the pub/sub connection closed; waiters poll until it is back");
                hub.lost(&mut link);
            }
            Event::Ping => {
                if let Some(current) = link.as_mut() {
                    if let Err(error) = hub.bounded(current.sink.ping::<()>()).await {
                        tracing::warn!(
                            error = &error as &dyn std::error::Error,
                            "the pub/sub connection did not answer a ping; waiters poll until it is back"
                        );
                        hub.lost(&mut link);
                    }
                }
            }
            Event::Changed => {}
        }
        if let Err(error) = hub.sync(&mut link).await {
            tracing::debug!(
                error = &error as &dyn std::error::Error,
                "could not subscribe the release channels; waiters poll, retrying in {PING_INTERVAL:?}"
            );
            hub.lost(&mut link);
        }
    }
}
