//! A private PostgreSQL cluster for tests that need a server setting the shared server does not
//! have, or that crash the server: `initdb` on a free loopback port (as the `postgres` user
//! when run as root), stopped and deleted on drop. It needs the server binaries (`initdb`,
//! `pg_ctl`): found under `/usr/lib/postgresql/<version>/bin`, or in `PG_BIN`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A throwaway cluster; stopped and deleted on drop.
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

impl Cluster {
    /// initdb on a free loopback port (not started).
    pub fn create() -> Cluster {
        let bin = server_binaries();
        let as_postgres_user = run_output("id", &["-u"]).trim() == "0";
        let dir =
            std::env::temp_dir().join(format!("k1s0-pg-cluster-{}", uuid::Uuid::new_v4().simple()));
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

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server.
    pub fn start(&self) {
        self.start_with(&[]);
    }

    /// Starts the server with extra `name=value` settings (`-c`).
    pub fn start_with(&self, settings: &[&str]) {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.to_str().unwrap()
        );
        for setting in settings {
            options.push_str(" -c ");
            options.push_str(setting);
        }
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
    pub fn crash(&self) {
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
