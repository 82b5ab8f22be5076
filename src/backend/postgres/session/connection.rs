//! The connection of a lock session: a pool connection that is closed rather than returned.

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};

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
