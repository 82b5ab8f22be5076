//! The fencing sequence and its crash epoch, checked when a lock session opens.

use sqlx::{PgConnection, Row};

use super::sql::Statements;
use super::statement_errors::is_statement_error;

/// Before a new connection draws its first fencing token: moves the sequence past the tokens
/// of the previous crash epoch if this is the first session since a crash, a failover or a
/// restore (see [`Statements::epoch_check`]). Creates whichever of the sequence and the epoch
/// table is missing.
///
/// A sequence created beforehand is refused if it could hand out tokens that do not increase
/// (`CACHE` above 1, a non-positive `INCREMENT`, `CYCLE`), and so is the default sequence's
/// old unqualified name resolving to another schema than `public` (see [`FencingObjects`]).
///
/// If the epoch mechanism cannot work here, the session falls back to waiting for the disk
/// when it draws tokens (`synchronous_commit = on`), with a warning: slower, never unsafe.
/// * No epoch table, and no privilege to create it: no session ever drew a token without
///   waiting for the disk (a session that can draw so creates the table first).
/// * An epoch table that is not unlogged (a crash would never empty it): every session sees it
///   and falls back, so again none draws without waiting for the disk.
/// * An unlogged epoch table this role cannot write (the jump failed): other roles may draw
///   without waiting for the disk, so this session must find the current epoch's row (another
///   session made the jump since the last crash) before its first token, or fail. Drawing from
///   a sequence a crash took back would hand out tokens again.
///
/// A missing sequence that cannot be created is an error.
pub(super) fn check_fencing_epoch<'a>(
    connection: &'a mut PgConnection,
    sql: &'a Statements,
) -> futures_util::future::BoxFuture<'a, Result<(), sqlx::Error>> {
    // Boxed with an explicit `Send`: sqlx's executor lifetimes otherwise make the session
    // task's future fail the `Send` check of `tokio::spawn`.
    Box::pin(async move {
        let usable = ensure_fencing_objects(connection, sql).await?;
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
                         synchronous_commit = on instead, once this epoch's jump is found done"
                    );
                    require_epoch_row(connection, sql).await?;
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

/// Reads the fencing objects, refuses an unfit sequence (see
/// [`FencingObjects::refuse_unfit_sequence`]) and creates whichever of the sequence and the
/// epoch table is missing. Returns whether the epoch table is usable: it exists and is
/// unlogged. Simple-protocol statements only, so that it also runs behind PgBouncer in
/// transaction mode (the path of the transaction locks).
pub(super) async fn ensure_fencing_objects(
    connection: &mut PgConnection,
    sql: &Statements,
) -> Result<bool, sqlx::Error> {
    let objects = FencingObjects::read(connection, sql).await?;
    objects.refuse_unfit_sequence(sql)?;
    let FencingObjects {
        sequence_exists,
        epochs_persistence,
        ..
    } = objects;
    if !sequence_exists {
        match sqlx::Executor::execute(&mut *connection, sqlx::raw_sql(&sql.create_sequence)).await {
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
        None => {
            match sqlx::Executor::execute(&mut *connection, sqlx::raw_sql(&sql.create_epoch_table))
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
            }
        }
    };
    Ok(usable)
}

/// What the server has of the fencing objects, read in one round trip
/// ([`Statements::fencing_objects`]).
struct FencingObjects {
    /// A relation of the sequence's name exists (not necessarily a sequence).
    sequence_exists: bool,
    /// The epoch table's `relpersistence` (`u` for unlogged), or `None` if it is missing.
    epochs_persistence: Option<String>,
    /// `CACHE`, `INCREMENT` and `CYCLE` of the sequence, or `None` if it is not a sequence.
    options: Option<(i64, i64, bool)>,
    /// The schema in which the default sequence's old unqualified name resolves.
    unqualified_default_schema: Option<String>,
}

impl FencingObjects {
    async fn read(connection: &mut PgConnection, sql: &Statements) -> Result<Self, sqlx::Error> {
        let row = sqlx::Executor::fetch_one(&mut *connection, sqlx::raw_sql(&sql.fencing_objects))
            .await?;
        let cache: Option<i64> = row.try_get(2)?;
        let increment: Option<i64> = row.try_get(3)?;
        let cycle: Option<bool> = row.try_get(4)?;
        Ok(FencingObjects {
            sequence_exists: row.try_get(0)?,
            epochs_persistence: row.try_get(1)?,
            options: cache.zip(increment).zip(cycle).map(|((c, i), y)| (c, i, y)),
            unqualified_default_schema: row.try_get(5)?,
        })
    }

    /// Refuses a sequence that exists but cannot give increasing tokens, and a default
    /// sequence that would replace one of an earlier version in another schema.
    fn refuse_unfit_sequence(&self, sql: &Statements) -> Result<(), sqlx::Error> {
        let sequence = &sql.sequence;
        // An earlier version, under this role's search_path, used a sequence in another
        // schema: a process of that version (or this one with the default) would draw from a
        // different sequence for the same keys, or a new one would restart the tokens.
        if let Some(schema) = &self.unqualified_default_schema {
            if sql.default_sequence && schema != "public" {
                return Err(unfit(format!(
                    "the default fencing sequence is {sequence}, but k1s0_lock_fencing_seq \
                     resolves through this role's search_path to schema {schema:?}, where an \
                     earlier version of this crate created and used it; tokens from two \
                     sequences would not be ordered, and a new one would restart them. Name it \
                     with fencing_sequence(\"{schema}.k1s0_lock_fencing_seq\") in every \
                     process, or move it to public"
                )));
            }
        }
        if !self.sequence_exists {
            return Ok(());
        }
        let Some((cache, increment, cycle)) = self.options else {
            return Err(unfit(format!(
                "the fencing sequence {sequence} exists but is not a sequence"
            )));
        };
        let mut faults = Vec::new();
        if cache > 1 {
            faults.push(format!(
                "CACHE {cache} (each session would draw from its own block of values, out of \
                 order across sessions; CACHE 1 is needed)"
            ));
        }
        if increment <= 0 {
            faults.push(format!(
                "INCREMENT {increment} (tokens must increase; a positive increment is needed)"
            ));
        }
        if cycle {
            faults.push(
                "CYCLE (it would start again from its minimum; NO CYCLE is needed)".to_owned(),
            );
        }
        if faults.is_empty() {
            Ok(())
        } else {
            Err(unfit(format!(
                "the fencing sequence {sequence} cannot give increasing fencing tokens: it has {}; \
                 ALTER SEQUENCE it (docs/postgres.md, \"Fencing tokens\")",
                faults.join(", ")
            )))
        }
    }
}

/// A fallback session (it could not make the jump itself) may draw only once the current crash
/// epoch's row exists: another session made the jump since the last crash, failover or
/// restore.
async fn require_epoch_row(
    connection: &mut PgConnection,
    sql: &Statements,
) -> Result<(), sqlx::Error> {
    let found = sqlx::Executor::fetch_one(&mut *connection, sqlx::raw_sql(&sql.epoch_row_exists))
        .await
        .and_then(|row| row.try_get::<bool, _>(0));
    match found {
        Ok(true) => Ok(()),
        Ok(false) => Err(unfit(format!(
            "this is the first lock session on {} since a crash, a failover or a restore, and its \
             role cannot move the sequence on (it needs INSERT on the epoch table and UPDATE on \
             the sequence): drawing tokens now could hand out tokens again. Grant those \
             privileges, or let a session of a role that has them connect first",
            sql.sequence
        ))),
        Err(error) if is_statement_error(&error) => Err(unfit(format!(
            "this role can neither move the fencing sequence {} on after a crash nor read \
             whether that was done ({error}); grant INSERT and SELECT on the epoch table and \
             UPDATE on the sequence",
            sql.sequence
        ))),
        Err(error) => Err(error),
    }
}

/// A fencing setup that cannot keep tokens increasing: refused, the message says why.
fn unfit(reason: String) -> sqlx::Error {
    tracing::error!(reason, "PostgreSQL lock session refused");
    sqlx::Error::Configuration(reason.into())
}

/// What `CREATE ... IF NOT EXISTS` raises when another session creates the same object at the
/// same moment: a unique violation in the catalog (23505), duplicate_table (42P07), or, for a
/// table, duplicate_object (42710) on its row type.
fn is_concurrent_creation(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Database(database)
            if matches!(database.code().as_deref(), Some("23505" | "42P07" | "42710"))
    )
}
