//! The bare PostgreSQL statements the PostgreSQL benches compare the backend with.

use sqlx::PgConnection;

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
