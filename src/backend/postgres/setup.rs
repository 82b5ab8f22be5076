//! What a connection goes through before it serves as a lock session: the check that it has a
//! server session of its own (no pooler in transaction or statement mode), its server
//! settings, then the fencing checks. Everything up to the settings runs on the simple query
//! protocol (see [`check_own_server_session`]), in three round trips.

use sqlx::{Connection, PgConnection, Row};

use super::fencing::check_fencing_epoch;
use super::sql::Statements;

/// The session-level setting that marks a server backend as serving a lock session.
const SESSION_MARKER: &str = "k1s0.session_marker";

/// Checks that the connection has a server session of its own ([`check_own_server_session`]),
/// then sets the session's server settings (`names[i] = values[i]`, skipping any the server
/// does not know), then checks the fencing sequence and its epoch.
pub(super) async fn prepare_session(
    connection: &mut PgConnection,
    names: &[String],
    values: &[String],
    sql: &Statements,
) -> Result<(), sqlx::Error> {
    check_own_server_session(connection).await?;
    end_probe_and_apply_settings(connection, names, values).await?;
    check_fencing_epoch(connection, sql).await
}

/// Refuses a connection whose server backend is not its own for the connection's lifetime: a
/// pooler such as PgBouncer in transaction or statement pool mode. Advisory locks, and the
/// session's settings, belong to the server backend; behind such a pooler another client's
/// statements run on it between ours (two holders of one lock, locks left behind, our
/// `synchronous_commit = off` in their transactions), and ours may run on another backend.
///
/// Runs first, before anything changes the server session, with the simple query protocol
/// only: sqlx's named prepared statements are per server backend, so behind such a pooler the
/// first prepared statement already fails (`prepared statement "sqlx_s_1" already exists`) and
/// would hide the cause.
///
/// What it detects, one round trip each:
/// 1. Reads [`SESSION_MARKER`] and sets it to a fresh random value, and counts the named
///    protocol-level prepared statements of the server backend (autocommit). The marker is
///    only ever set here, on connections that are closed, never returned to a pool: on a
///    direct connection or behind PgBouncer in session mode (whose `server_reset_query`,
///    `DISCARD ALL` by default, resets it) a new connection never finds one. Finding one means
///    this server backend served an earlier lock session of another client without a reset.
///    Likewise, a named prepared statement on the server that this connection's statement
///    cache does not hold was prepared by another client.
/// 2. Opens a transaction block and reads the marker and `pg_backend_pid()` back: a different
///    value or process means that another client's transaction ran on our backend in
///    between, or that ours moved to another backend.
/// 3. The block stays open to the next round trip, which [`end_probe_and_apply_settings`]
///    starts with `ROLLBACK`: PgBouncer in statement mode refuses a transaction block that
///    outlives a round trip ("transaction blocks not allowed in statement pooling mode"),
///    whatever other clients do.
///
/// Comparing `pg_backend_pid()` alone is not enough: the pooler can hand the same backend to
/// another client in between and back. What no single client can see: PgBouncer in
/// transaction mode, with no other client using the backend before or during the check,
/// gives the backend back each time, exactly as session mode does; the check then passes.
/// The marker it leaves makes the next lock session on that backend fail.
///
/// A false alarm on a direct connection is possible in one case: a pool connection whose
/// earlier user dropped a query future after sqlx had sent the `Parse` of a named statement
/// but before sqlx cached it. The session then fails to open and closes that connection; the
/// next attempt takes another.
async fn check_own_server_session(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let cached = connection.cached_statements_size() as i64;
    // The marker is a random hex string: safe to splice, and no parameters keeps this on the
    // simple query protocol.
    let first = sqlx::Executor::fetch_one(
        &mut *connection,
        sqlx::raw_sql(&format!(
            "SELECT current_setting('{SESSION_MARKER}', true), \
             set_config('{SESSION_MARKER}', '{marker}', false), pg_backend_pid(), \
             (SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql)"
        )),
    )
    .await?;
    let found: Option<String> = first.try_get(0)?;
    let pid: i32 = first.try_get(2)?;
    let prepared: i64 = first.try_get(3)?;
    if found.as_deref().is_some_and(|found| !found.is_empty()) {
        return Err(shared_backend(
            "its server backend carries the session state of an earlier lock session of \
             another client",
        ));
    }
    if prepared > cached {
        return Err(shared_backend(&format!(
            "its server backend holds {prepared} prepared statements of which this \
             connection made {cached}"
        )));
    }
    let row = sqlx::Executor::fetch_one(
        &mut *connection,
        sqlx::raw_sql(&format!(
            "BEGIN; SELECT current_setting('{SESSION_MARKER}', true), pg_backend_pid()"
        )),
    )
    .await
    .map_err(statement_pooling_or)?;
    let (now_marker, now_pid): (Option<String>, i32) = (row.try_get(0)?, row.try_get(1)?);
    if now_marker.as_deref() != Some(marker.as_str()) || now_pid != pid {
        return Err(shared_backend(
            "its server session changed between two of its own statements",
        ));
    }
    Ok(())
}

/// Ends the transaction block that [`check_own_server_session`] left open, then sets the
/// session's server settings, in one round trip. The names and values are the backend's own
/// (no user input), spliced as quoted literals to stay on the simple query protocol.
async fn end_probe_and_apply_settings(
    connection: &mut PgConnection,
    names: &[String],
    values: &[String],
) -> Result<(), sqlx::Error> {
    let literals = |items: &[String]| {
        items
            .iter()
            .map(|item| format!("'{}'", item.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    sqlx::Executor::execute(
        &mut *connection,
        sqlx::raw_sql(&format!(
            "ROLLBACK; \
             SELECT count(set_config(s.name, s.value, false)) \
             FROM unnest(ARRAY[{}]::text[], ARRAY[{}]::text[]) AS s(name, value) \
             WHERE s.name IN (SELECT name FROM pg_settings)",
            literals(names),
            literals(values)
        )),
    )
    .await
    .map_err(statement_pooling_or)?;
    Ok(())
}

/// PgBouncer's refusal of a transaction block in statement mode becomes the pooler error; any
/// other error stays as it is.
fn statement_pooling_or(error: sqlx::Error) -> sqlx::Error {
    match &error {
        sqlx::Error::Database(database) if database.message().contains("pooling mode") => {
            shared_backend(&format!("the pooler said: {}", database.message()))
        }
        _ => error,
    }
}

/// The error for a connection that shares its server backend, with the evidence.
fn shared_backend(evidence: &str) -> sqlx::Error {
    tracing::error!(
        evidence,
        "PostgreSQL lock session refused: its connection does not have a server session of its \
         own (PgBouncer in transaction or statement pool mode?)"
    );
    sqlx::Error::Configuration(
        format!(
            "a PostgreSQL lock session needs a server session of its own for the life of its \
             connection, and this one does not ({evidence}): a connection pooler shares server \
             backends between clients, such as PgBouncer with pool_mode = transaction or \
             pool_mode = statement. Advisory locks there would have two holders, stay stuck and \
             leak this session's settings to other clients. Connect the lock's pool to \
             PostgreSQL directly, or through PgBouncer with pool_mode = session \
             (docs/postgres.md, \"Connection poolers\")"
        )
        .into(),
    )
}
