//! What a connection goes through before it serves as a lock session: the check that it has a
//! server session of its own (no pooler in transaction or statement mode), its server
//! settings, then the fencing checks. Everything up to the settings runs on the simple query
//! protocol (see [`check_own_server_session`]), in three round trips and a witness's question.

use sqlx::{Connection, PgConnection, PgPool, Row};

use super::fencing::check_fencing_epoch;
use super::sql::Statements;

/// The session-level setting that marks a server backend as serving a lock session.
const SESSION_MARKER: &str = "k1s0.session_marker";

/// Checks that the connection has a server session of its own ([`check_own_server_session`]),
/// then sets the session's server settings (`names[i] = values[i]`, skipping any the server
/// does not know), then checks the fencing sequence and its epoch.
pub(super) async fn prepare_session(
    connection: &mut PgConnection,
    pool: &PgPool,
    names: &[String],
    values: &[String],
    sql: &Statements,
) -> Result<(), sqlx::Error> {
    check_own_server_session(connection, pool).await?;
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
/// What it detects:
/// 1. Reads [`SESSION_MARKER`] and sets it to a fresh random value, and counts the named
///    protocol-level prepared statements of the server backend (autocommit). The marker is
///    only ever set here, on connections that are closed, never returned to a pool: on a
///    direct connection or behind PgBouncer in session mode (whose `server_reset_query`,
///    `DISCARD ALL` by default, resets it) a new connection never finds one. Finding one means
///    this server backend served an earlier lock session of another client without a reset.
///    Likewise, a named prepared statement on the server that this connection's statement
///    cache does not hold was prepared by another client.
/// 2. A witness, another client of the same server (an idle connection of the pool, else a
///    new connection with the pool's options), reads the marker and its `pg_backend_pid()`:
///    finding ours means it was given our server backend while we sat between statements,
///    which is what a pooler in transaction mode does (PgBouncer hands out the server
///    connection released last). This needs no other client to have used the pooler.
/// 3. Opens a transaction block and reads the marker and `pg_backend_pid()` back: a different
///    value or process means that another client's transaction ran on our backend in
///    between, or that ours moved to another backend.
/// 4. The block stays open to the next round trip, which [`end_probe_and_apply_settings`]
///    starts with `ROLLBACK`: PgBouncer in statement mode refuses a transaction block that
///    outlives a round trip ("transaction blocks not allowed in statement pooling mode").
///
/// Comparing `pg_backend_pid()` alone is not enough: the pooler can hand the same backend to
/// another client in between and back. What the witness cannot see: a transaction-mode pooler
/// that gives it another idle server backend (one that is not the last released, as with
/// PgBouncer's `server_round_robin = 1`) while no other client used ours; the marker it leaves
/// then makes the next lock session on that backend fail.
///
/// A false alarm on a direct connection is possible in one case: a pool connection whose
/// earlier user dropped a query future after sqlx had sent the `Parse` of a named statement
/// but before sqlx cached it. The session then fails to open and closes that connection; the
/// next attempt takes another.
async fn check_own_server_session(
    connection: &mut PgConnection,
    pool: &PgPool,
) -> Result<(), sqlx::Error> {
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
    if witness_shares_backend(pool, &marker, pid).await {
        return Err(shared_backend(
            "another client of the same server was given its server backend between two of \
             its statements",
        ));
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

/// Whether another client of the server, asking now, finds our session `marker` or backend
/// `pid` (see [`check_own_server_session`], step 2). The witness only reads: an idle pool
/// connection goes back to the pool as it was; a new one is closed. Best effort: a witness
/// that cannot connect or ask (the server is at `max_connections`, say) sees nothing, and the
/// other checks still run.
async fn witness_shares_backend(pool: &PgPool, marker: &str, pid: i32) -> bool {
    // The marker is a random hex string: safe to splice, on the simple query protocol.
    let query = format!(
        "SELECT current_setting('{SESSION_MARKER}', true) = '{marker}' OR pg_backend_pid() = {pid}"
    );
    let answer = match pool.try_acquire() {
        Some(mut idle) => sqlx::Executor::fetch_one(&mut *idle, sqlx::raw_sql(&query)).await,
        None => match PgConnection::connect_with(&pool.connect_options()).await {
            Ok(mut new) => {
                let answer = sqlx::Executor::fetch_one(&mut new, sqlx::raw_sql(&query)).await;
                let _ = new.close().await;
                answer
            }
            Err(error) => Err(error),
        },
    };
    match answer.and_then(|row| row.try_get::<Option<bool>, _>(0)) {
        Ok(shared) => shared.unwrap_or(false),
        Err(error) => {
            tracing::debug!(
                error = &error as &dyn std::error::Error,
                "no witness for the lock session's server backend check"
            );
            false
        }
    }
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
