//! The Redis protocol on a server in cluster mode. A one-node cluster that owns every slot
//! enforces the cluster rules (a script's keys must all live in one slot, else `CROSSSLOT`)
//! while a plain client can still talk to it: the whole protocol must run there unchanged.
#![cfg(feature = "redis")]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k1s0_distributed_lock::bb8_redis::redis::{self, aio::MultiplexedConnection};
use k1s0_distributed_lock::{DistributedLock, LockConfig, LockError};

/// A `redis-server --cluster-enabled yes` of this test's own, on a free port; killed on drop.
struct ClusterNode {
    port: u16,
    process: Child,
    directory: std::path::PathBuf,
}

impl ClusterNode {
    async fn start() -> ClusterNode {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let directory = std::env::temp_dir().join(format!("k1s0-cluster-{port}"));
        std::fs::create_dir_all(&directory).unwrap();
        let process = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&directory)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for this test");
        let node = ClusterNode {
            port,
            process,
            directory,
        };
        let mut connection = node.connect().await;
        let () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query_async(&mut connection)
            .await
            .expect("take every slot");
        let ready = common::wait::eventually(Duration::from_secs(10), || {
            let mut connection = connection.clone();
            async move {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                info.contains("cluster_state:ok")
            }
        })
        .await;
        assert!(ready, "the one-node cluster never became ready");
        node
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn connect(&self) -> MultiplexedConnection {
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..200 {
            if let Ok(connection) = client.get_multiplexed_async_connection().await {
                return connection;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the cluster node never answered");
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_protocol_runs_on_a_server_in_cluster_mode() {
    let node = ClusterNode::start().await;
    let mut admin = node.connect().await;

    // A script whose keys span two slots is refused here: the check this test relies on.
    let cross: redis::RedisResult<()> = redis::cmd("EVAL")
        .arg("return redis.call('MSET', KEYS[1], 1, KEYS[2], 2)")
        .arg(2)
        .arg("a")
        .arg("b")
        .query_async(&mut admin)
        .await;
    let refusal = format!("{:?}", cross.unwrap_err()).to_lowercase();
    assert!(refusal.contains("crossslot"), "{refusal}");

    let lock_object = || async {
        common::redis_conn::lock_builder(&node.url(), &node.url())
            .await
            .config(
                LockConfig::new()
                    .ttl(Duration::from_secs(5))
                    .retry_interval(Duration::from_millis(20))
                    .max_retries(100),
            )
            .build()
            .unwrap()
    };
    // The waiter on a lock object of its own, as another process: it waits in Redis (a waiter
    // of the holder's own lock object would wait in the process).
    let (lock, other) = (lock_object().await, lock_object().await);

    for key in [
        "order:1",
        "a{b}c",
        "{",
        "}{",
        "%7B",
        "spaced key\n",
        "ключ",
        "*",
    ] {
        // acquire, extend, a contended acquire (queue, pub/sub wake-up), release, is_locked.
        let guard = lock.try_acquire(key).await.unwrap();
        guard.extend(Duration::from_secs(5)).await.unwrap();
        assert!(matches!(
            lock.try_acquire(key).await,
            Err(LockError::AlreadyLocked)
        ));
        let waiter = tokio::spawn({
            let (other, key) = (other.clone(), key.to_owned());
            async move { other.acquire(&key).await }
        });
        // The waiter is queued once the queue key exists.
        let queue = format!("{}:line", lock.redis_key(key));
        let queued = common::wait::eventually(Duration::from_secs(5), || {
            let (mut admin, queue) = (admin.clone(), queue.clone());
            async move {
                redis::cmd("ZCARD")
                    .arg(&queue)
                    .query_async::<usize>(&mut admin)
                    .await
                    .unwrap()
                    == 1
            }
        })
        .await;
        assert!(queued, "{key:?}: the waiter never queued");
        lock.release(guard).await.unwrap();
        let next = waiter.await.unwrap().unwrap();
        assert!(lock.is_locked(key).await.unwrap());
        other.release(next).await.unwrap();
        assert!(!lock.is_locked(key).await.unwrap());

        // Every key of this lock is in one slot, by the server's own reckoning.
        let base = lock.redis_key(key);
        let mut slots = Vec::new();
        for name in [
            base.clone(),
            format!("{base}:fence"),
            queue,
            format!("{base}:waiters"),
        ] {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&name)
                .query_async(&mut admin)
                .await
                .unwrap();
            slots.push(slot);
        }
        assert!(slots.windows(2).all(|w| w[0] == w[1]), "{key:?}: {slots:?}");
    }
}
