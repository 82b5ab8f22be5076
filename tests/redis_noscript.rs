//! A server that forgot the scripts (restarted, flushed, another node) answers `NOSCRIPT`; the
//! lock then sends the script's source with `EVAL`, one round trip on a command that carries
//! its keys, instead of a keyless `SCRIPT LOAD` and the `EVALSHA` again. On a `redis-server` of
//! the test's own, whose command statistics count exactly this test's calls.
#![cfg(feature = "redis")]

mod common;

use common::redis_server::RedisServer;

use k1s0_distributed_lock::bb8_redis::redis;
use k1s0_distributed_lock::DistributedLock;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_scripts_are_sent_again_with_eval() {
    let server = RedisServer::start().await;
    let prefix = common::unique_prefix("redis_noscript");
    let lock = common::redis_conn::plain_lock(&server.url(), &prefix).await;
    common::redis_conn::take_and_release(&lock, "k").await;

    let mut admin = common::redis_conn::connection(&server.url()).await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    common::redis_conn::reset_stats(&admin).await;
    let guard = lock.try_acquire("k").await.unwrap();
    guard.release().await.unwrap();

    let calls_run = common::redis_conn::calls_run;
    assert_eq!(calls_run(&admin, &["script|load"]).await, 0);
    assert_eq!(
        calls_run(&admin, &["eval"]).await,
        2,
        "acquire and release, each once"
    );
}
