//! A real PgBouncer (the Debian package's binary; `.ci/run` installs it when missing) on a free
//! loopback port in front of the test server, stopped when dropped, also when an assertion
//! fails. Run as root, it runs as the `postgres` user (`-u postgres`), as PgBouncer refuses
//! root.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use crate::common;

pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl PgBouncer {
    /// PgBouncer with `pool_mode` (`session`, `transaction` or `statement`) and at most
    /// `pool_size` server connections, serving the test server's database as `test`.
    pub async fn start(pool_mode: &str, pool_size: u32) -> PgBouncer {
        let server = sqlx::postgres::PgConnectOptions::from_str(&common::postgres_url().await)
            .expect("test server URL");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("k1s0-pgbouncer-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 test = host={host} port={server_port} dbname={db} user={user}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = any\n\
                 pool_mode = {pool_mode}\n\
                 default_pool_size = {pool_size}\n\
                 max_client_conn = 100\n\
                 ignore_startup_parameters = extra_float_digits, options\n",
                host = server.get_host(),
                server_port = server.get_port(),
                db = server.get_database().unwrap_or("test"),
                user = server.get_username(),
            ),
        )
        .unwrap();
        let mut command = Command::new(binary());
        if is_root() {
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
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The URL of the test database through this PgBouncer.
    pub fn url(&self) -> String {
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

fn binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .expect("pgbouncer not installed (apt-get install pgbouncer; .ci/run does)")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|status| {
            status
                .lines()
                .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
