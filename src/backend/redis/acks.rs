//! Opt-in replica acknowledgement: `WAIT numreplicas timeout` after the scripts that take or
//! renew a lock (see [`replica_acks`](super::RedisDistributedLockBuilder::replica_acks)).
//!
//! Which connection `WAIT` goes over matters twice:
//!
//! * It counts the replicas that acknowledged the writes *of the connection it is sent on*:
//!   Redis remembers, per client, the replication offset after that client's last write, and
//!   `WAIT` compares the replicas' acknowledged offsets with it. Sent on a connection that did
//!   not run the script, it says nothing about the script's writes: on a connection that wrote
//!   nothing it answers at once with every connected replica, acknowledged or not (seen on
//!   Redis 7.0 with a stopped replica: `WAIT 1 500` on a second connection answered `1` in
//!   2 ms, on the writing connection `0` after 500 ms).
//! * It blocks the connection it is sent on until it answers, up to its timeout. Sent on the
//!   lock object's shared multiplexed connection, it would hold up every other command of the
//!   lock object behind it for as long as the replicas take.
//!
//! So the script and its `WAIT` go over a connection that nothing else uses meanwhile: one
//! taken from a small stack of idle connections of this lock object (opened like the shared
//! one, by the pool's manager, with the same command timeout), and put back once `WAIT`
//! answered. A connection that failed is not put back, and one opened before any connection
//! of the lock object failed or reached a server that is not the primary, or older than the
//! connection age, is not used again.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use super::connection::Connections;
use super::handle::millis;
use crate::LockError;

/// At most this many idle replica-ack connections are kept per lock object; more are opened
/// while more operations run at once, and closed when they finish.
const MAX_IDLE: usize = 16;

/// The replica-ack setting of a lock object and its idle connections.
pub(crate) struct ReplicaAcks {
    replicas: u32,
    timeout: Duration,
    idle: Mutex<Vec<Exclusive>>,
}

/// A connection used by one operation at a time: a script and the `WAIT` after it.
pub(crate) struct Exclusive {
    pub(crate) connection: MultiplexedConnection,
    opened_at: Instant,
    generation: u64,
}

impl Exclusive {
    fn usable(&self, connections: &Connections) -> bool {
        self.generation == connections.generation()
            && self.opened_at.elapsed() < connections.max_age()
    }
}

impl ReplicaAcks {
    pub(crate) fn new(replicas: u32, timeout: Duration) -> Self {
        ReplicaAcks {
            replicas,
            timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn replicas(&self) -> u32 {
        self.replicas
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Exclusive>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection that is still usable, or a new one.
    pub(crate) async fn take(&self, connections: &Connections) -> Result<Exclusive, LockError> {
        let reused = {
            let mut idle = self.idle();
            std::iter::from_fn(|| idle.pop()).find(|exclusive| exclusive.usable(connections))
        };
        if let Some(exclusive) = reused {
            return Ok(exclusive);
        }
        // Read before opening: a failure while it opens outdates it.
        let generation = connections.generation();
        let connection = connections.open().await?;
        Ok(Exclusive {
            connection,
            opened_at: Instant::now(),
            generation,
        })
    }

    /// Puts a connection back after its last command answered.
    pub(crate) fn give_back(&self, connections: &Connections, exclusive: Exclusive) {
        let mut idle = self.idle();
        idle.retain(|kept| kept.usable(connections));
        if idle.len() < MAX_IDLE && exclusive.usable(connections) {
            idle.push(exclusive);
        }
    }

    /// A handle to `exclusive`'s connection for a command that may queue behind a `WAIT` on
    /// it: its response timeout covers the `WAIT`'s timeout as well as its own. (Redis runs a
    /// client's commands in order and drops those still queued when the client goes, so a
    /// command that gave up after the command timeout would close the connection and be lost.)
    pub(crate) fn patient(
        &self,
        connections: &Connections,
        exclusive: &Exclusive,
    ) -> MultiplexedConnection {
        let mut connection = exclusive.connection.clone();
        connection.set_response_timeout(connections.timeout().saturating_add(self.timeout));
        connection
    }

    /// Sends `WAIT` on the connection that just ran a script that wrote, and gives the
    /// connection back once it answered. `Ok` when enough replicas acknowledged the script's
    /// writes within the timeout; otherwise [`LockError::BackendError`] saying how many did,
    /// followed by `consequence` (what became of the lock).
    pub(crate) async fn wait(
        &self,
        connections: &Connections,
        exclusive: Exclusive,
        consequence: &str,
    ) -> Result<(), LockError> {
        let mut waiting = self.patient(connections, &exclusive);
        let answer: redis::RedisResult<i64> = redis::cmd("WAIT")
            .arg(self.replicas)
            .arg(millis(self.timeout))
            .query_async(&mut waiting)
            .await;
        let acknowledged = answer.map_err(|error| connections.failed("WAIT", error))?;
        self.give_back(connections, exclusive);
        if acknowledged >= i64::from(self.replicas) {
            return Ok(());
        }
        tracing::warn!(
            acknowledged,
            replicas = self.replicas,
            timeout = ?self.timeout,
            consequence,
            "Redis replicas did not acknowledge a lock write in time"
        );
        Err(LockError::backend_msg(format!(
            "{acknowledged} of the {} Redis replicas asked for acknowledged the write within \
             {:?}: {consequence}",
            self.replicas, self.timeout
        )))
    }
}
