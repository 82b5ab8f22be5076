//! Timing of the lock sessions: the builder's timeouts and what derives from them (the ping
//! interval, how long a lock is known to outlive the last answer, the server's own statement
//! bound and the server settings of a session).

use std::time::Duration;

/// Timing of a session; see [`PostgresDistributedLockBuilder`](super::PostgresDistributedLockBuilder).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionSettings {
    /// Bound on taking a connection from the pool and on every statement.
    pub(crate) command_timeout: Duration,
    /// How long the server keeps a session whose client went silent (idle_session_timeout,
    /// TCP keepalive and tcp_user_timeout are derived from it).
    pub(crate) network_timeout: Duration,
    /// Close the connection after holding nothing for this long.
    pub(crate) idle_close: Duration,
}

impl SessionSettings {
    /// Pings come this often when nothing else reaches the server, well inside the server's
    /// `idle_session_timeout`.
    pub(crate) fn ping_interval(&self) -> Duration {
        self.network_timeout / 4
    }

    /// How long after the send time of a statement the server answered the connection is sure
    /// to keep its locks: the server ends a session it has not heard from for
    /// `network_timeout` (`idle_session_timeout`, `tcp_user_timeout`), less a tenth for timer
    /// slack. A lock is not counted on past this without a newer answer.
    pub(crate) fn connection_bound(&self) -> Duration {
        self.network_timeout - self.network_timeout / 10
    }

    /// The server's own bound on a statement (`statement_timeout`, `lock_timeout`): below the
    /// client's `command_timeout` by a quarter of it (at most 1 s), so that a statement that
    /// runs long is cancelled by the server (an ordinary statement error, the session and its
    /// locks stay) before the client would have to give up on the connection.
    pub(crate) fn server_statement_timeout(&self) -> Duration {
        let margin = (self.command_timeout / 4).min(Duration::from_secs(1));
        (self.command_timeout - margin).max(Duration::from_millis(1))
    }

    /// The server's TCP keepalives, `(idle, interval, count)` in whole seconds: they end a silent
    /// client's session no sooner than `network_timeout` (rounded up), like
    /// `tcp_user_timeout`, which servers other than Linux ignore; sooner would free its locks
    /// while its guards still count on them.
    fn keepalives(&self) -> (u64, u64, u64) {
        let network_s = self.network_timeout.as_millis().div_ceil(1000).max(2) as u64;
        (network_s.div_ceil(2), network_s.div_ceil(8), 4)
    }

    /// The `(name, value)` server settings of a lock session.
    pub(crate) fn server_settings(&self) -> (Vec<String>, Vec<String>) {
        let network_ms = self.network_timeout.as_millis().max(1);
        let (idle_s, interval_s, count) = self.keepalives();
        let statement_ms = self.server_statement_timeout().as_millis().max(1);
        let settings = [
            ("application_name", "k1s0-distributed-lock".to_owned()),
            ("idle_session_timeout", format!("{network_ms}ms")),
            ("tcp_keepalives_idle", idle_s.to_string()),
            ("tcp_keepalives_interval", interval_s.to_string()),
            ("tcp_keepalives_count", count.to_string()),
            ("tcp_user_timeout", network_ms.to_string()),
            ("statement_timeout", format!("{statement_ms}ms")),
            ("lock_timeout", format!("{statement_ms}ms")),
            // Drawing a fencing token does not wait for the disk; the crash epoch check at
            // connect keeps tokens increasing across a crash (see `Statements::epoch_check`).
            ("synchronous_commit", "off".to_owned()),
        ];
        settings
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .unzip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_end_a_silent_session_no_sooner_than_the_network_timeout() {
        for millis in (2_000..100_000).step_by(100) {
            let settings = SessionSettings {
                command_timeout: Duration::from_secs(1),
                network_timeout: Duration::from_millis(millis),
                idle_close: Duration::from_secs(60),
            };
            let (idle, interval, count) = settings.keepalives();
            assert!(interval >= 1);
            let ends_after = Duration::from_secs(idle + interval * count);
            assert!(
                ends_after >= settings.network_timeout,
                "{:?}: keepalives end it after {ends_after:?}",
                settings.network_timeout
            );
        }
    }
}
