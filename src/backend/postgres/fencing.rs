//! The fencing sequence and its crash epoch, checked when a lock session opens.

use sqlx::{PgConnection, Row};

use super::session::{is_concurrent_creation, is_statement_error};
use super::sql::Statements;

/// Before a new connection draws its first fencing token: moves the sequence past the tokens
/// of the previous crash epoch if this is the first session since a crash, a failover or a
/// restore (see [`Statements::epoch_check`]). Creates whichever of the sequence and the epoch
/// table is missing.
///
/// If the epoch mechanism cannot work here (no privilege to create or use the epoch table, or
/// a table that is not unlogged and so would never be emptied by a crash), the session falls
/// back to waiting for the disk when it draws tokens (`synchronous_commit = on`), with a
/// warning: slower, never unsafe. A missing sequence that cannot be created is an error.
pub(super) fn check_fencing_epoch<'a>(
    connection: &'a mut PgConnection,
    sql: &'a Statements,
) -> futures_util::future::BoxFuture<'a, Result<(), sqlx::Error>> {
    // Boxed with an explicit `Send`: sqlx's executor lifetimes otherwise make the session
    // task's future fail the `Send` check of `tokio::spawn`.
    Box::pin(async move {
        let (sequence_exists, epochs_persistence): (bool, Option<String>) = {
            let row =
                sqlx::Executor::fetch_one(&mut *connection, sqlx::raw_sql(&sql.fencing_objects))
                    .await?;
            (row.try_get(0)?, row.try_get(1)?)
        };
        if !sequence_exists {
            match sqlx::query(&sql.create_sequence)
                .execute(&mut *connection)
                .await
            {
                Ok(_) => tracing::info!(sequence = sql.sequence, "created the fencing sequence"),
                Err(error) if is_concurrent_creation(&error) => {}
                Err(error) => {
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        sequence = sql.sequence,
                        "cannot create the fencing sequence; create it beforehand (docs/postgres.md)"
                    );
                    return Err(error);
                }
            }
        }
        let usable = match epochs_persistence.as_deref() {
            Some("u") => true,
            Some(_) => {
                tracing::warn!(
                    "the fencing epoch table is not UNLOGGED, so a crash would not reset it; \
                     drawing fencing tokens with synchronous_commit = on instead"
                );
                false
            }
            None => match sqlx::query(&sql.create_epoch_table)
                .execute(&mut *connection)
                .await
            {
                Ok(_) => true,
                Err(error) if is_concurrent_creation(&error) => true,
                Err(error) => {
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "cannot create the fencing epoch table; drawing fencing tokens with \
                         synchronous_commit = on instead (create it beforehand: docs/postgres.md)"
                    );
                    false
                }
            },
        };
        let jumped = if usable {
            // Through the executor: sqlx 0.8's `RawSql::fetch_optional` fails on no rows.
            let row =
                sqlx::Executor::fetch_optional(&mut *connection, sqlx::raw_sql(&sql.epoch_check))
                    .await
                    .and_then(|row| row.map(|row| row.try_get::<i64, _>(0)).transpose());
            match row {
                Ok(jumped) => Some(jumped),
                Err(error) if is_statement_error(&error) => {
                    tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "the fencing epoch check failed; drawing fencing tokens with \
                         synchronous_commit = on instead"
                    );
                    None
                }
                Err(error) => return Err(error),
            }
        } else {
            None
        };
        match jumped {
            Some(Some(value)) => tracing::info!(
                value,
                sequence = sql.sequence,
                "first lock session since the server started afresh (crash recovery, failover or \
                 restore): moved the fencing sequence on"
            ),
            Some(None) => {}
            None => {
                sqlx::query("SELECT set_config('synchronous_commit', 'on', false)")
                    .execute(&mut *connection)
                    .await?;
            }
        }
        Ok(())
    })
}
