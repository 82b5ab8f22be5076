//! PostgreSQL backend behind a real PgBouncer: refused with a clear error in transaction and
//! statement pool mode (where advisory locks would have two holders), working in session mode.
//!
//! Each test starts its own `pgbouncer` (the Debian package; `.ci/run` installs it) on a free
//! loopback port in front of the test server, and stops it when the test ends, also when an
//! assertion fails. Run as root, PgBouncer runs as the `postgres` user (`-u postgres`).
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError, PostgresDistributedLock};

/// A PgBouncer process in front of the test server's `test` database; killed on drop.
struct PgBouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl PgBouncer {
    async fn start(pool_mode: &str) -> PgBouncer {
        let dir =
            std::env::temp_dir().join(format!("k1s0-pgbouncer-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let auth_file = dir.join("users.txt");
        std::fs::write(&auth_file, "\"postgres\" \"\"\n").unwrap();
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 test = host=127.0.0.1 port=5432 dbname=test\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {auth}\n\
                 pool_mode = {pool_mode}\n\
                 ignore_startup_parameters = extra_float_digits\n",
                auth = auth_file.display()
            ),
        )
        .unwrap();
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
            .unwrap_or(false);
        let mut command = Command::new(pgbouncer_binary());
        if as_root {
            Command::new("chown")
                .args(["-R", "postgres:postgres", dir.to_str().unwrap()])
                .status()
                .unwrap();
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let bouncer = PgBouncer { child, dir, port };
        bouncer.wait_until_listening().await;
        bouncer
    }

    async fn wait_until_listening(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pgbouncer did not listen on {} within 10 s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/test", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pgbouncer_binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .expect("pgbouncer not installed (apt-get install pgbouncer; .ci/run does)")
}

/// Another client of the same PgBouncer, an application using it with sqlx as usual: its
/// statements are prepared on the server backend that the lock session gets next.
async fn application_uses(bouncer: &PgBouncer) -> sqlx::PgPool {
    let app = common::backends::postgres_pool_of(Some(bouncer.url()), 1).await;
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&app)
        .await
        .unwrap();
    assert_eq!(one, 1);
    app
}

/// What an earlier lock session of another process leaves on its server backend behind a
/// transaction-mode pooler: its session marker. Set here by a plain client with the simple
/// query protocol (no prepared statement), which then disconnects.
async fn earlier_lock_session_marks_backend(bouncer: &PgBouncer) {
    use sqlx::Connection;
    let mut earlier = sqlx::PgConnection::connect(&bouncer.url()).await.unwrap();
    sqlx::Executor::execute(
        &mut earlier,
        sqlx::raw_sql("SELECT set_config('k1s0.session_marker', 'earlier', false)"),
    )
    .await
    .unwrap();
    earlier.close().await.unwrap();
}

/// Another client of `bouncer` used it first, then a lock service on its own pool tries a
/// key: refused with a clear error, nothing locked.
async fn refused_behind(pool_mode: &str, earlier_client: Earlier) {
    let bouncer = PgBouncer::start(pool_mode).await;
    let key = format!("{}k", common::unique_prefix("pg_bouncer"));
    let _app = match earlier_client {
        Earlier::Application => Some(application_uses(&bouncer).await),
        Earlier::LockSession => {
            earlier_lock_session_marks_backend(&bouncer).await;
            None
        }
        Earlier::Nobody => None,
    };
    let pool = common::backends::postgres_pool_of(Some(bouncer.url()), 3).await;
    let lock = PostgresDistributedLock::new(pool, LockConfig::new());

    let error = lock.try_acquire(&key).await.expect_err("refused");
    let message = error_chain(&error);
    assert!(
        matches!(error, LockError::BackendError(_))
            && message.contains("PgBouncer")
            && message.contains("pool_mode = transaction")
            && message.contains("pool_mode = statement")
            && !message.contains("sqlx_s_"),
        "unclear error: {message}"
    );
    let mut admin = pg_support::admin().await;
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    // Nothing was left behind: the key is free for a direct client.
    let direct = pg_support::lock(LockConfig::new()).await;
    pg_support::take_and_release(&direct, &key).await;
}

/// The error and its sources, as a log line shows them.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// Who used the PgBouncer before the lock service.
enum Earlier {
    /// An application querying with sqlx (its prepared statements stay on the backend).
    Application,
    /// A lock session of another process (its marker stays on the backend).
    LockSession,
    /// Nobody: the lock session is PgBouncer's first client.
    Nobody,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pool_mode_is_refused_with_a_clear_error() {
    refused_behind("transaction", Earlier::Application).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pool_mode_after_an_earlier_lock_session_is_refused() {
    refused_behind("transaction", Earlier::LockSession).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_pool_mode_is_refused_with_a_clear_error() {
    refused_behind("statement", Earlier::Application).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_pool_mode_is_refused_even_for_its_first_client() {
    refused_behind("statement", Earlier::Nobody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pool_mode_locks_exclude_direct_clients_and_release() {
    let bouncer = PgBouncer::start("session").await;
    let key = format!("{}k", common::unique_prefix("pg_bouncer"));
    let _app = application_uses(&bouncer).await;
    let pool = common::backends::postgres_pool_of(Some(bouncer.url()), 3).await;
    let behind = PostgresDistributedLock::new(pool, LockConfig::new());
    let direct = pg_support::lock(LockConfig::new()).await;
    let mut admin = pg_support::admin().await;

    let guard = behind
        .try_acquire(&key)
        .await
        .expect("lock through PgBouncer");
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 1);
    assert!(matches!(
        direct.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    guard.release().await.unwrap();
    assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    let direct_guard = direct.try_acquire(&key).await.expect("free after release");
    assert!(matches!(
        behind.try_acquire(&key).await,
        Err(LockError::AlreadyLocked)
    ));
    direct_guard.release().await.unwrap();
    pg_support::take_and_release(&behind, &key).await;
}
