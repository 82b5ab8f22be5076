//! Private `redis-server` processes for tests that kill, restart or replicate a server: each on
//! a free loopback port with a data directory of its own, killed (and the directory removed)
//! when dropped, also when an assertion fails.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k1s0_distributed_lock::bb8_redis::redis;

/// A `redis-server` of this test's own.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    process: Option<Child>,
}

impl RedisServer {
    /// A server without persistence (`SAVE` still writes `dump.rdb` into its directory).
    pub async fn start() -> RedisServer {
        Self::start_with(&[]).await
    }

    /// A server with `args` added to its command line (`["--replicaof", ...]`, say).
    pub async fn start_with(args: &[&str]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("k1s0-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("a data directory for redis-server");
        let mut server = RedisServer {
            port: free_port(),
            dir,
            args: args.iter().map(|arg| arg.to_string()).collect(),
            process: None,
        };
        server.run().await;
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where the server listens, for a proxy in front of it.
    pub fn address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether `key` exists on this server.
    pub async fn has_key(&self, key: &str) -> bool {
        let mut connection = super::redis_conn::connection(&self.url()).await;
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut connection)
            .await
            .unwrap()
            == 1
    }

    /// Waits (at most 5 s, failing the test otherwise) until `INFO <section>` on this server
    /// contains `needle`: `("replication", "master_link_status:up")` for a replica that
    /// synced, say.
    pub async fn await_info(&self, section: &str, needle: &str) {
        let connection = super::redis_conn::connection(&self.url()).await;
        let what = format!("INFO {section} on port {} shows {needle}", self.port);
        super::wait::assert_eventually(&what, || {
            let mut connection = connection.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg(section)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                info.contains(needle)
            }
        })
        .await;
    }

    /// Kills the server at once (`SIGKILL`: no save on the way out).
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts the server again on the same port and directory, so it loads what its last
    /// `SAVE` wrote there.
    pub async fn restart(&mut self) {
        self.kill();
        self.run().await;
    }

    async fn run(&mut self) {
        let process = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dbfilename",
                "dump.rdb",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for this test");
        self.process = Some(process);
        self.wait_until_ready().await;
    }

    /// Waits until the server answers and has loaded its data.
    async fn wait_until_ready(&self) {
        let client = redis::Client::open(self.url()).unwrap();
        let ready = super::wait::eventually(Duration::from_secs(10), || {
            let client = client.clone();
            async move {
                let Ok(Ok(mut conn)) = tokio::time::timeout(
                    Duration::from_millis(500),
                    client.get_multiplexed_async_connection(),
                )
                .await
                else {
                    return false;
                };
                // Not `PING`, which a server still loading its data answers.
                let probe: redis::RedisResult<Option<String>> = redis::cmd("GET")
                    .arg("k1s0:probe")
                    .query_async(&mut conn)
                    .await;
                probe.is_ok()
            }
        })
        .await;
        assert!(ready, "redis-server on port {} did not start", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
