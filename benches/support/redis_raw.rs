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
