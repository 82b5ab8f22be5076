//! The connection of a lock session: its server settings, a pool connection that is closed
//! rather than returned, and which errors leave the session intact.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgDatabaseError;
use sqlx::postgres::PgSeverity::{Fatal, Panic};
use sqlx::{PgConnection, Postgres};

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
    pub(super) fn server_statement_timeout(&self) -> Duration {
        let margin = (self.command_timeout / 4).min(Duration::from_secs(1));
        (self.command_timeout - margin).max(Duration::from_millis(1))
    }

    /// The `(name, value)` server settings of a lock session.
    pub(super) fn server_settings(&self) -> (Vec<String>, Vec<String>) {
        let network_ms = self.network_timeout.as_millis().max(1);
        let network_s = self.network_timeout.as_secs().max(2);
        let statement_ms = self.server_statement_timeout().as_millis().max(1);
        let settings = [
            ("application_name", "k1s0-distributed-lock".to_owned()),
            ("idle_session_timeout", format!("{network_ms}ms")),
            ("tcp_keepalives_idle", (network_s / 2).to_string()),
            (
                "tcp_keepalives_interval",
                (network_s / 8).max(1).to_string(),
            ),
            ("tcp_keepalives_count", "4".to_owned()),
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

/// A pool connection that is closed, never returned, however it is dropped.
pub(super) struct SessionConnection(pub(super) Option<PoolConnection<Postgres>>);

impl SessionConnection {
    pub(super) fn get_mut(&mut self) -> Option<&mut PgConnection> {
        self.0.as_deref_mut()
    }
}

impl Drop for SessionConnection {
    fn drop(&mut self) {
        if let Some(connection) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                drop(connection.detach());
            } else {
                // Without a runtime the pool cannot be told (sqlx needs one to do so); the
                // socket still closes.
                drop(connection.leak());
            }
        }
    }
}

/// Errors after which the session is known to be intact: the statement failed on its own.
pub(in crate::backend::postgres) fn is_statement_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(database) => {
            // A FATAL error (53200 at connection start, say) ends the server's session,
            // whatever its class.
            let fatal = database
                .try_downcast_ref::<PgDatabaseError>()
                .is_some_and(|error| matches!(error.severity(), Fatal | Panic));
            // syntax/undefined objects, data, integrity, object state, transaction rollback,
            // insufficient privilege, insufficient resources (53200: the server's lock table
            // is full), program limits, and a statement_timeout cancel.
            let classes = ["42", "22", "23", "55", "40", "53", "54"];
            !fatal
                && database.code().is_some_and(|code| {
                    classes.iter().any(|class| code.starts_with(class)) || code == "57014"
                })
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. } => true,
        _ => false,
    }
}
