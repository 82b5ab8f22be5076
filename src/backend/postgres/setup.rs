//! What a connection goes through before it serves as a lock session: taken from the pool and
//! never given back ([`SessionConnection`]), the check that it has a server session of its own
//! (no pooler in transaction or statement mode), its server settings, then the fencing checks. Everything up to the settings runs on the simple query
//! protocol (see [`check_own_server_session`]), in three round trips and a witness's question.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row};

use super::timing::SessionSettings;
use crate::LockError;

use super::fencing::check_fencing_epoch;
use super::sql::Statements;

/// The session-level setting that marks a server backend as serving a lock session.
const SESSION_MARKER: &str = "k1s0.session_marker";

/// Takes a connection from the pool (and a witness beside it) and sets it up as a lock session:
/// within `command_timeout` for taking the connection, again for the check that its server
/// backend is its own, and again for its settings and the fencing epoch check, so that a slow
/// link that allows each step is not failed by their sum.
pub(super) async fn open_session(
    pool: &PgPool,
    settings: &SessionSettings,
    sql: &Statements,
) -> Result<SessionConnection, LockError> {
    let timeout = settings.command_timeout;
    let (names, values) = settings.server_settings();
    let what = "taking a connection for a PostgreSQL lock session";
    let (connection, witness) = tokio::join!(
        within(timeout, what, pool.acquire()),
        Witness::open(pool, timeout)
    );
    let mut connection = connection?;
    // Whatever happens from here on, this connection is never returned to the pool.
    connection.close_on_drop();
    let mut connection = SessionConnection(Some(connection));
    let conn = connection.get_mut().expect("just stored");
    let what = "checking that a PostgreSQL lock session has a server backend of its own";
    within(timeout, what, check_own_server_session(conn, witness)).await?;
    let set_up = apply_settings_and_check_fencing(conn, &names, &values, sql);
    within(timeout, "setting up a PostgreSQL lock session", set_up).await?;
    Ok(connection)
}

/// Runs `work` within `timeout`, else fails saying that `what` took longer.
async fn within<T, E>(
    timeout: Duration,
    what: &str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, LockError>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result.map_err(LockError::backend),
        Err(_) => Err(LockError::backend_msg(format!(
            "{what} took longer than {timeout:?}"
        ))),
    }
}

/// A pool connection that is closed, never returned, however it is dropped.
pub(super) struct SessionConnection(Option<PoolConnection<Postgres>>);

impl SessionConnection {
    pub(super) fn get_mut(&mut self) -> Option<&mut PgConnection> {
        self.0.as_deref_mut()
    }

    /// Says goodbye to the server (within `timeout`) and closes the connection.
    pub(super) async fn close(mut self, timeout: Duration) {
        if let Some(connection) = self.0.take() {
            let _ = tokio::time::timeout(timeout, connection.close()).await;
        }
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

/// After [`check_own_server_session`]: ends its probe, sets the session's server settings
/// (`names[i] = values[i]`, skipping any the server does not know), then checks the fencing
/// sequence and its epoch.
async fn apply_settings_and_check_fencing(
    connection: &mut PgConnection,
    names: &[String],
    values: &[String],
    sql: &Statements,
) -> Result<(), sqlx::Error> {
    end_probe_and_apply_settings(connection, names, values).await?;
    check_fencing_epoch(connection, sql).await
}

/// Another client of the same server for [`check_own_server_session`]: an idle connection of
/// the pool, else a new connection with the pool's options. It only reads.
struct Witness {
    connection: WitnessConnection,
    /// How long it may take to answer; longer counts as "saw nothing".
    patience: Duration,
}

enum WitnessConnection {
    Idle(PoolConnection<Postgres>),
    New(PgConnection),
}

impl Witness {
    /// Takes an idle pool connection, else opens one within `timeout` (opened while the lock
    /// session takes its own connection, so a slow link pays for one connect, not two). Best
    /// effort: `None` if none can be had (the server is at `max_connections`, say), and the
    /// other checks still run. Its question gets a quarter of `timeout`, at most 500 ms: a
    /// pooler in session mode with every server connection taken queues a new client, and
    /// that wait must not fail the lock session.
    async fn open(pool: &PgPool, timeout: Duration) -> Option<Witness> {
        let patience = (timeout / 4).min(Duration::from_millis(500));
        if let Some(idle) = pool.try_acquire() {
            let connection = WitnessConnection::Idle(idle);
            return Some(Witness {
                connection,
                patience,
            });
        }
        let options = pool.connect_options();
        match tokio::time::timeout(timeout, PgConnection::connect_with(&options)).await {
            Ok(Ok(new)) => Some(Witness {
                connection: WitnessConnection::New(new),
                patience,
            }),
            Ok(Err(error)) => {
                tracing::debug!(
                    error = &error as &dyn std::error::Error,
                    "no witness for the lock session's server backend check"
                );
                None
            }
            Err(_) => None,
        }
    }

    /// Whether this witness, asking now, finds the session `marker` or the backend `pid`
    /// (see [`check_own_server_session`], step 2). A witness that fails to answer in time
    /// sees nothing; it is closed then, not given back to the pool.
    async fn shares_backend(self, marker: &str, pid: i32) -> bool {
        // The marker is a random hex string: safe to splice, on the simple query protocol.
        let query = format!(
            "SELECT current_setting('{SESSION_MARKER}', true) = '{marker}' \
             OR pg_backend_pid() = {pid}"
        );
        let mut connection = self.connection;
        let asked: &mut PgConnection = match &mut connection {
            WitnessConnection::Idle(idle) => idle,
            WitnessConnection::New(new) => new,
        };
        let question = sqlx::Executor::fetch_one(asked, sqlx::raw_sql(&query));
        let answer = tokio::time::timeout(self.patience, question).await;
        match (connection, answer.is_ok()) {
            (WitnessConnection::Idle(mut idle), false) => idle.close_on_drop(),
            (WitnessConnection::New(new), true) => {
                let _ = new.close().await;
            }
            _ => {}
        }
        let Ok(answer) = answer else {
            tracing::debug!("the lock session's witness did not answer in time");
            return false;
        };
        match answer.and_then(|row| row.try_get::<Option<bool>, _>(0)) {
            Ok(shared) => shared.unwrap_or(false),
            Err(error) => {
                tracing::debug!(
                    error = &error as &dyn std::error::Error,
                    "the lock session's witness could not ask"
                );
                false
            }
        }
    }
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
    witness: Option<Witness>,
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
    let witnessed = match witness {
        Some(witness) => witness.shares_backend(&marker, pid).await,
        None => false,
    };
    if witnessed {
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
