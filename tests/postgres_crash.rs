//! PostgreSQL backend: fencing tokens keep increasing across a real server crash.
//!
//! The lock sessions draw tokens without waiting for the disk, so a crash can take the
//! sequence back below tokens already handed out; the first session after crash recovery must
//! jump it ahead. This test starts its own PostgreSQL cluster (initdb on a free loopback port,
//! as the `postgres` user when run as root), draws tokens, crashes the server with
//! `pg_ctl stop -m immediate` (no shutdown checkpoint: the next start runs crash recovery), and
//! checks the next token. It needs the server binaries (`initdb`, `pg_ctl`): found under
//! `/usr/lib/postgresql/<version>/bin`, or in `PG_BIN`.
#![cfg(feature = "postgres")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use k1s0_distributed_lock::{DistributedLock, LockConfig, PostgresDistributedLock};
use sqlx::Connection;

/// A throwaway cluster; stopped and deleted on drop.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

impl Cluster {
    fn create() -> Cluster {
        let bin = server_binaries();
        let as_postgres_user = run_output("id", &["-u"]).trim() == "0";
        let dir =
            std::env::temp_dir().join(format!("k1s0-pg-crash-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        if as_postgres_user {
            run_output("chown", &["postgres:postgres", dir.to_str().unwrap()]);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Cluster {
            bin,
            dir,
            port,
            as_postgres_user,
        };
        let data = cluster.data_dir();
        cluster.pg(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        cluster
    }

    fn data_dir(&self) -> String {
        self.dir.join("data").to_str().unwrap().to_owned()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.to_str().unwrap()
        );
        let log = self.dir.join("server.log");
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server without a shutdown checkpoint, as a crash would.
    fn crash(&self) {
        self.pg(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"],
        );
    }

    fn pg(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let program = program.to_str().unwrap();
        if self.as_postgres_user {
            let mut full = vec!["-u", "postgres", "--", program];
            full.extend_from_slice(args);
            run_output("runuser", &full);
        } else {
            run_output(program, args);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let program = self.bin.join("pg_ctl");
        let data = self.data_dir();
        let stop = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if self.as_postgres_user {
            let mut full = vec!["-u", "postgres", "--", program.to_str().unwrap()];
            full.extend_from_slice(&stop);
            Command::new("runuser").args(full).output()
        } else {
            Command::new(&program).args(stop).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn server_binaries() -> PathBuf {
    if let Some(bin) = std::env::var_os("PG_BIN") {
        return PathBuf::from(bin);
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|error| {
            panic!("PostgreSQL server binaries not found in {root:?} ({error}); set PG_BIN")
        })
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no initdb under /usr/lib/postgresql/*/bin; set PG_BIN")
}

fn run_output(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn lock_on(url: &str) -> PostgresDistributedLock {
    let pool = common::backends::postgres_pool_of(Some(url.to_owned()), 3).await;
    PostgresDistributedLock::new(pool, LockConfig::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_keep_increasing_across_a_server_crash() {
    let cluster = Cluster::create();
    cluster.start();
    let key = format!("{}k", common::unique_prefix("pg_crash"));

    // Tokens drawn right before the crash: over several of the sequence's 32-value write-ahead
    // steps, none of which waited for the disk.
    let lock = lock_on(&cluster.url()).await;
    let mut last = 0;
    for _ in 0..100 {
        let guard = lock.acquire(&key).await.unwrap();
        assert!(guard.fencing_token() > last);
        last = guard.fencing_token();
        guard.release().await.unwrap();
    }
    let held = lock.acquire(&key).await.unwrap();
    last = last.max(held.fencing_token());
    cluster.crash();
    cluster.start();

    // Crash recovery emptied the unlogged epoch table: the premise of the jump.
    let mut admin = sqlx::PgConnection::connect(&cluster.url()).await.unwrap();
    let markers: i64 = sqlx::query_scalar("SELECT count(*) FROM k1s0_lock_fencing_epochs")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(markers, 0, "crash recovery keeps unlogged tables empty");

    let after = lock_on(&cluster.url()).await;
    let guard = after.acquire(&key).await.unwrap();
    assert!(
        guard.fencing_token() > last,
        "token {} after the crash, {last} before it",
        guard.fencing_token()
    );
    assert!(held.is_lost() || held.release().await.is_err());
    guard.release().await.unwrap();
    drop((lock, after, admin));
}
