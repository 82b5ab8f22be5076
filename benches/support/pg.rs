//! The PostgreSQL server the PostgreSQL benches use, and the bare statements they compare the
//! backend with.

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// The server `DATABASE_URL` names, or the local one this project's machines run.
pub fn url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A pool of at most `max_connections` connections on [`url`].
pub async fn pool(max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .connect(&url())
        .await
        .expect("connect to PostgreSQL")
}

/// A connection of its own on [`url`].
pub async fn connection() -> PgConnection {
    PgConnection::connect(&url())
        .await
        .expect("connect to PostgreSQL")
}

/// `pg_try_advisory_lock($1)` then `pg_advisory_unlock($1)` on one connection (prepared, like
/// the backend's statements).
pub async fn raw_cycle(conn: &mut PgConnection, key: i64) {
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(taken);
    let released: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(released);
}
