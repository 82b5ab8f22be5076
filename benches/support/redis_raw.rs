//! The least a Redis lock can do, for the Redis benchmarks' floors: `SET key token NX PX` and a
//! compare-and-delete script, with the redis crate on a multiplexed connection.

use k1s0_distributed_lock::bb8_redis::redis::{self, aio::MultiplexedConnection};

/// Deletes `KEYS[1]` if it holds `ARGV[1]`.
pub const COMPARE_AND_DELETE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// A fresh token, as the lock's own: a hyphenated UUID.
pub fn token() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// `SET key token NX PX 30000`: whether it took the key.
pub async fn set_nx_px(connection: &mut MultiplexedConnection, key: &str, token: &str) -> bool {
    let set: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(token)
        .arg("NX")
        .arg("PX")
        .arg(30_000)
        .query_async(connection)
        .await
        .unwrap();
    set.is_some()
}

/// The compare-and-delete script on `key` and `token`: whether it deleted the key.
pub async fn compare_and_delete(
    connection: &mut MultiplexedConnection,
    script: &redis::Script,
    key: &str,
    token: &str,
) -> bool {
    let deleted: i64 = script
        .key(key)
        .arg(token)
        .invoke_async(connection)
        .await
        .unwrap();
    deleted == 1
}

/// Calls the server has run since its statistics were last reset, summed over the commands
/// `counted` accepts by name (`INFO commandstats`; the commands scripts call are included).
pub async fn calls_run(admin: &mut MultiplexedConnection, counted: impl Fn(&str) -> bool) -> u64 {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap();
    // cmdstat_evalsha:calls=12,usec=...
    stats
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?;
            counted(name).then(|| calls.parse::<u64>().ok())?
        })
        .sum()
}

/// Every command the server has run since its statistics were last reset.
pub async fn commands_run(admin: &mut MultiplexedConnection) -> u64 {
    calls_run(admin, |_| true).await
}

/// The scripts (`EVALSHA`, `EVAL`) the server has run since its statistics were last reset.
pub async fn scripts_run(admin: &mut MultiplexedConnection) -> u64 {
    calls_run(admin, |name| matches!(name, "evalsha" | "eval")).await
}
