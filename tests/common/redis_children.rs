//! Tests that run as several OS processes: this test binary started again as children, which
//! start their work together once all of them are connected (a Redis list is the starting
//! gate).

use std::process::Stdio;

use k1s0_distributed_lock::bb8_redis::redis::{self, aio::MultiplexedConnection, AsyncCommands};
use tokio::process::{Child, Command};

/// Starts `count` copies of this test binary with `variable` = `value` and `REDIS_URL` = `url`,
/// their standard output piped; a child still running when its handle is dropped (a parent
/// that failed early) is killed.
pub fn spawn(variable: &str, value: &str, url: &str, count: usize) -> Vec<Child> {
    let exe = std::env::current_exe().unwrap();
    (0..count)
        .map(|_| {
            Command::new(&exe)
                .env(variable, value)
                .env("REDIS_URL", url)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        })
        .collect()
}

/// The parent's side of the gate: waits (30 s at most) until `count` children said they are
/// ready under `prefix`, then lets them all go.
pub async fn start_together(conn: &mut MultiplexedConnection, prefix: &str, count: usize) {
    for _ in 0..count {
        let ready: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(format!("{prefix}ready"))
            .arg(30)
            .query_async(conn)
            .await
            .unwrap();
        assert!(ready.is_some(), "a child never got ready");
    }
    let _: () = conn
        .rpush(format!("{prefix}go"), vec![1; count])
        .await
        .unwrap();
}

/// A child's side of the gate: says it is ready, then waits (30 s at most) to be let go.
pub async fn ready_then_go(conn: &mut MultiplexedConnection, prefix: &str) {
    let _: () = conn.rpush(format!("{prefix}ready"), 1).await.unwrap();
    let go: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(format!("{prefix}go"))
        .arg(30)
        .query_async(conn)
        .await
        .unwrap();
    assert!(go.is_some(), "the parent never said go");
}
