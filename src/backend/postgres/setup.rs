//! What a connection goes through before it serves as a lock session.

use sqlx::PgConnection;

use super::fencing::check_fencing_epoch;
use super::sql::Statements;

/// Sets the session's server settings (`names[i] = values[i]`, skipping any the server does not
/// know), then checks the fencing sequence and its epoch.
pub(super) async fn prepare_session(
    connection: &mut PgConnection,
    names: &[String],
    values: &[String],
    sql: &Statements,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT count(set_config(s.name, s.value, false)) \
         FROM unnest($1::text[], $2::text[]) AS s(name, value) \
         WHERE s.name IN (SELECT name FROM pg_settings)",
    )
    .bind(names)
    .bind(values)
    .execute(&mut *connection)
    .await?;
    check_fencing_epoch(connection, sql).await
}
