//! Permits across OS processes, on each server backend: 3 processes × 16 tasks take one of 4
//! permits of one key in a loop, counting themselves in and out of a count kept on the server;
//! its maximum never exceeds 4 and reaches it. Then a process killed while it holds a permit
//! gives it back (on PostgreSQL at once, its session ending; on Redis at its TTL).
//!
//! No harness: run plainly, this binary is the parent and starts itself as the children
//! (selected by `K1S0_PERMIT_CHILD=<backend>:<role>`).

mod common;

#[cfg(any(feature = "postgres", feature = "redis"))]
fn main() {
    processes::main();
}

#[cfg(not(any(feature = "postgres", feature = "redis")))]
fn main() {
    println!("0 passed, 0 failed (no server backend in this build)");
}

/// The parent and its children, in a build with a server backend.
#[cfg(any(feature = "postgres", feature = "redis"))]
mod processes {
    use std::process::Stdio;
    use std::time::Duration;

    use crate::common;
    use common::backends::Backend;
    use common::in_flight::InFlight;
    use k1s0_distributed_lock::{DistributedSemaphore, LockConfig, LockError};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::process::Command;

    const CHILD_VARIABLE: &str = "K1S0_PERMIT_CHILD";
    const PREFIX_VARIABLE: &str = "K1S0_PERMIT_PREFIX";
    const PROCESSES: usize = 3;
    const TASKS_PER_PROCESS: usize = 16;
    const ROUNDS: usize = 10;
    const LIMIT: u32 = 4;
    /// The TTL of the killed holder's permit: what a Redis waiter waits at most for it.
    const KILLED_TTL: Duration = Duration::from_secs(2);

    fn config() -> LockConfig {
        LockConfig::new()
            .ttl(Duration::from_secs(30))
            .retry_interval(Duration::from_millis(100))
            .wait_timeout(Duration::from_secs(60))
    }

    pub fn main() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        if let Ok(child) = std::env::var(CHILD_VARIABLE) {
            let (name, role) = child.split_once(':').expect("backend:role");
            let backend = Backend::from_name(name).expect("a compiled backend");
            let prefix = std::env::var(PREFIX_VARIABLE).unwrap();
            runtime.block_on(async {
                match role {
                    "load" => load_child(backend, &prefix).await,
                    "holder" => holding_child(backend, &prefix).await,
                    other => panic!("unknown child role {other}"),
                }
            });
            return;
        }
        let mut passed = 0;
        for backend in Backend::servers() {
            runtime.block_on(never_more_than_the_limit_across_processes(backend));
            println!(
                "test {PROCESSES}_processes_hold_at_most_{LIMIT}_permits_on_{} ... ok",
                backend.name()
            );
            runtime.block_on(a_killed_holder_gives_its_permit_back(backend));
            println!(
                "test a_killed_holder_gives_its_permit_back_on_{} ... ok",
                backend.name()
            );
            passed += 2;
        }
        println!("{passed} passed, 0 failed");
    }

    fn child(backend: Backend, role: &str, prefix: &str) -> Command {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .env(CHILD_VARIABLE, format!("{}:{role}", backend.name()))
            .env(PREFIX_VARIABLE, prefix)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // A parent that fails early must not leave its children running.
            .kill_on_drop(true);
        command
    }

    async fn never_more_than_the_limit_across_processes(backend: Backend) {
        let prefix = common::unique_prefix(&format!("permit-processes-{}", backend.name()));
        let mut children: Vec<_> = (0..PROCESSES)
            .map(|_| child(backend, "load", &prefix).spawn().unwrap())
            .collect();
        // The starting gate: every child says "ready" once connected, then waits for a line on
        // its standard input, so that the processes contend from the same moment on.
        for child in &mut children {
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let said = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("the child gets ready")
                .unwrap();
            assert_eq!(said.as_deref(), Some("ready"));
        }
        for child in &mut children {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"go\n")
                .await
                .unwrap();
        }
        for (index, child) in children.iter_mut().enumerate() {
            let status = child.wait().await.unwrap();
            assert!(status.success(), "{} child {index} failed", backend.name());
        }
        let (inside, most) = InFlight::new(backend, &format!("{prefix}in-flight"))
            .await
            .read()
            .await;
        assert_eq!(inside, 0, "{}: tasks left inside", backend.name());
        assert!(
            most <= i64::from(LIMIT),
            "{}: {most} tasks held permits at once",
            backend.name()
        );
        assert_eq!(
            most,
            i64::from(LIMIT),
            "{}: the limit was never reached",
            backend.name()
        );
        let lock = backend.lock(config()).await;
        assert_eq!(lock.permits_held(&format!("{prefix}key")).await.unwrap(), 0);
    }

    /// 16 tasks, each taking a permit of the key `ROUNDS` times, counting itself in and out.
    async fn load_child(backend: Backend, prefix: &str) {
        let lock = backend.lock(config()).await;
        let in_flight = InFlight::new(backend, &format!("{prefix}in-flight")).await;
        let key = format!("{prefix}key");
        // Connected (a first look at the key): wait at the gate.
        lock.permits_held(&key).await.unwrap();
        println!("ready");
        let mut go = String::new();
        BufReader::new(tokio::io::stdin())
            .read_line(&mut go)
            .await
            .unwrap();
        assert_eq!(go, "go\n", "the parent lets the children go");
        let tasks: Vec<_> = (0..TASKS_PER_PROCESS)
            .map(|_| {
                let (lock, in_flight, key) = (lock.clone(), in_flight.clone(), key.clone());
                tokio::spawn(async move {
                    for _ in 0..ROUNDS {
                        let permit = lock
                            .acquire_permit(&key, LIMIT)
                            .await
                            .expect("a permit within the budget");
                        in_flight.enter().await;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        in_flight.leave().await;
                        permit.release().await.expect("release of a held permit");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }

    /// A child takes the key's one permit and says so; the parent kills it; a waiter of the
    /// parent gets the permit (on Redis once its TTL ran out), and never while the child lives.
    async fn a_killed_holder_gives_its_permit_back(backend: Backend) {
        let prefix = common::unique_prefix(&format!("permit-killed-{}", backend.name()));
        let key = format!("{prefix}key");
        let mut holder = child(backend, "holder", &prefix).spawn().unwrap();
        let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
        let said = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the child takes the permit")
            .unwrap();
        assert_eq!(said.as_deref(), Some("held"));
        let lock = backend.lock(config()).await;
        assert!(matches!(
            lock.try_acquire_permit(&key, 1).await,
            Err(LockError::AlreadyLocked)
        ));
        holder.kill().await.unwrap();
        let permit = tokio::time::timeout(
            KILLED_TTL + Duration::from_secs(10),
            lock.acquire_permit(&key, 1),
        )
        .await
        .expect("the killed holder's permit comes back")
        .expect("a permit");
        assert_eq!(lock.permits_held(&key).await.unwrap(), 1);
        permit.release().await.unwrap();
    }

    async fn holding_child(backend: Backend, prefix: &str) {
        let lock = backend.lock(config().ttl(KILLED_TTL)).await;
        let permit = lock
            .try_acquire_permit(&format!("{prefix}key"), 1)
            .await
            .unwrap();
        println!("held");
        // Held until the parent kills this process (the lease is not extended).
        std::future::pending::<()>().await;
        drop(permit);
    }
}
