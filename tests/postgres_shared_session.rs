//! PostgreSQL backend: many keys share one lock session, so the session must survive callers
//! that misbehave in every way a future can: polled once and then kept without being polled,
//! run on a runtime that goes away, or dropped with their runtime mid-statement. Each case
//! reads the server's lock table (`pg_locks`) afterwards.
//!
//! Each session is one task that runs its commands one at a time (docs/postgres.md, "Who runs
//! a session"). Every lock here has one session, so all of its keys share it.
#![cfg(feature = "postgres")]

mod common;
mod pg_support;

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use k1s0_distributed_lock::{
    DistributedLock, LockConfig, LockError, LockGuard, PostgresDistributedLock,
};
use tokio::runtime::Runtime;

/// A lock service with one session, so that all its keys share one connection.
async fn one_session_lock(config: LockConfig) -> PostgresDistributedLock {
    pg_support::one_session_lock(config, |builder| builder).await
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

type Acquire = Pin<Box<dyn Future<Output = Result<LockGuard, LockError>> + Send>>;

/// A `try_acquire` polled once with its statement in flight, then kept: on loopback the answer
/// can arrive within that first poll, so this tries fresh keys (`prefix` + a number) until one
/// is still pending. Returns the key and the parked future.
async fn parked_acquire(lock: &PostgresDistributedLock, prefix: &str) -> (String, Acquire) {
    for attempt in 0..100 {
        let key = format!("{prefix}parked{attempt}");
        let (lock, owned_key) = (lock.clone(), key.clone());
        let mut acquire: Acquire = Box::pin(async move { lock.try_acquire(&owned_key).await });
        match futures::poll!(acquire.as_mut()) {
            Poll::Pending => return (key, acquire),
            Poll::Ready(guard) => guard.unwrap().release().await.unwrap(),
        }
    }
    panic!("every first poll of 100 acquires found the answer already there");
}

/// Generous: these operations take milliseconds; only a deadlock comes near it.
const NO_DEADLOCK: Duration = Duration::from_secs(20);

/// An acquire polled once (its statement under way) and then kept without being polled must
/// not keep the session from the others: another key is still taken and
/// released, and the parked acquire completes when it is polled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_acquire_does_not_hold_up_the_session() {
    let prefix = common::unique_prefix("pg_parked");
    let other_key = format!("{prefix}other");
    let lock = one_session_lock(LockConfig::new()).await;
    let mut admin = pg_support::admin().await;
    // Opens the session's connection, so that the next acquire's statement goes out at once.
    pg_support::take_and_release(&lock, &other_key).await;

    let (parked_key, parked) = parked_acquire(&lock, &prefix).await;
    let others = async {
        for _ in 0..20 {
            let guard = lock.try_acquire(&other_key).await.unwrap();
            assert!(lock.is_locked(&other_key).await.unwrap());
            guard.release().await.unwrap();
        }
    };
    tokio::time::timeout(NO_DEADLOCK, others)
        .await
        .expect("the other key's commands ran while the parked acquire was not polled");
    assert_eq!(pg_support::advisory_locks(&mut admin, &other_key).await, 0);

    let guard = parked.await.expect("the parked acquire completes");
    assert_eq!(pg_support::advisory_locks(&mut admin, &parked_key).await, 1);
    guard.release().await.unwrap();
    assert_eq!(pg_support::advisory_locks(&mut admin, &parked_key).await, 0);
}

/// The pattern that deadlocked an earlier design: a `buffered` stream of acquires (which polls
/// the next ones while the first is handed out), with each guard released inside the loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_acquires_with_releases_in_the_loop_complete() {
    let prefix = common::unique_prefix("pg_buffered");
    let keys: Vec<String> = (0..64).map(|i| format!("{prefix}{i}")).collect();
    let lock = one_session_lock(LockConfig::new()).await;
    pg_support::take_and_release(&lock, &keys[0]).await;
    let mut admin = pg_support::admin().await;

    let run = async {
        let mut acquires = stream::iter(&keys).map(|key| lock.acquire(key)).buffered(8);
        let mut released = 0;
        while let Some(guard) = acquires.next().await {
            guard.unwrap().release().await.unwrap();
            released += 1;
        }
        released
    };
    let released = tokio::time::timeout(NO_DEADLOCK, run)
        .await
        .expect("no deadlock between buffered acquires and releases");
    assert_eq!(released, keys.len());
    for key in &keys {
        assert_eq!(
            pg_support::advisory_locks(&mut admin, key).await,
            0,
            "{key}"
        );
    }
}

/// While an acquire is parked mid-statement, the session still enforces the leases of its
/// other locks: a guard that is not extended is released on time and reports the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_acquire_does_not_stop_lease_expiry() {
    let prefix = common::unique_prefix("pg_parked_lease");
    let leased_key = format!("{prefix}leased");
    // The server's own idle timeout (the network timeout) would free the lock of a session
    // that went quiet too: keep it well beyond this test's patience.
    let lock = pg_support::one_session_lock(
        LockConfig::new().ttl(Duration::from_millis(300)),
        |builder| builder.network_timeout(Duration::from_secs(120)),
    )
    .await;
    let admin = tokio::sync::Mutex::new(pg_support::admin().await);

    let leased = lock.try_acquire(&leased_key).await.unwrap();
    let (parked_key, parked) = parked_acquire(&lock, &prefix).await;

    common::wait::assert_eventually_within(
        NO_DEADLOCK,
        "the lease ran out and the server lock went with it",
        || async {
            leased.is_lost()
                && pg_support::advisory_locks(&mut *admin.lock().await, &leased_key).await == 0
        },
    )
    .await;
    assert!(matches!(leased.release().await, Err(LockError::LockLost)));
    // The parked acquire was finished meanwhile; its own lease may have run out as well.
    let guard = parked.await.expect("the parked acquire completes");
    drop(guard);
    common::wait::assert_eventually("the parked key is free again", || async {
        pg_support::advisory_locks(&mut *admin.lock().await, &parked_key).await == 0
    })
    .await;
}

/// A session's connection must belong to the runtime the session started on, whoever asked for
/// it. Here the connection breaks (its server process is terminated) and the next commands come
/// from a caller on a runtime of its own that then shuts down: the connection those commands
/// opened must not die with that runtime.
#[test]
fn a_connection_reopened_for_a_short_lived_runtime_outlives_it() {
    let main = runtime();
    let prefix = common::unique_prefix("pg_short_runtime");
    let key = format!("{prefix}k");
    let lock = main.block_on(async {
        let lock = one_session_lock(LockConfig::new()).await;
        let guard = lock.try_acquire(&key).await.unwrap();
        let mut admin = pg_support::admin().await;
        let holders = pg_support::holders(&mut admin, &key).await;
        assert_eq!(holders.len(), 1);
        pg_support::terminate(&mut admin, holders[0]).await;
        common::wait::assert_eventually("the terminated holder's guard is lost", || async {
            guard.is_lost() || guard.extend(Duration::from_secs(30)).await.is_err()
        })
        .await;
        lock
    });

    let lock_for_thread = lock.clone();
    let key_for_thread = key.clone();
    std::thread::spawn(move || {
        let short = runtime();
        short.block_on(async {
            // The first command may still meet the broken connection; the next ones open a new
            // one (on the session's own runtime) and take the key.
            let mut taken = None;
            for _ in 0..3 {
                if let Ok(guard) = lock_for_thread.try_acquire(&key_for_thread).await {
                    taken = Some(guard);
                    break;
                }
            }
            taken
                .expect("the session reconnected")
                .release()
                .await
                .unwrap();
        });
        drop(short);
    })
    .join()
    .unwrap();

    main.block_on(async {
        let guard = lock
            .try_acquire(&key)
            .await
            .expect("the session's connection outlived the caller's runtime");
        let mut admin = pg_support::admin().await;
        assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 1);
        guard.release().await.unwrap();
        assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, 0);
    });
}

/// A runtime that shuts down while callers on it are in the middle of their statements (they
/// take and release keys in a loop) takes the session with it: the connection closes, and the
/// server frees every lock, the one a guard held and any the looping callers had just taken.
#[test]
fn a_runtime_shutdown_mid_statement_frees_every_lock() {
    let prefix = common::unique_prefix("pg_shutdown_mid");
    let held_key = format!("{prefix}held");
    let looping_keys: Vec<String> = (0..4).map(|i| format!("{prefix}loop{i}")).collect();
    let doomed = runtime();
    let (lock, guard) = doomed.block_on(async {
        let lock = one_session_lock(LockConfig::new()).await;
        let guard = lock.try_acquire(&held_key).await.unwrap();
        (lock, guard)
    });
    let (cycles, mut cycled) = tokio::sync::mpsc::unbounded_channel();
    for key in &looping_keys {
        let (lock, key, cycles) = (lock.clone(), key.clone(), cycles.clone());
        doomed.spawn(async move {
            loop {
                if let Ok(guard) = lock.try_acquire(&key).await {
                    let _ = guard.release().await;
                }
                let _ = cycles.send(());
            }
        });
    }
    // Shut down once every looping caller is well under way.
    doomed.block_on(async {
        for _ in 0..200 {
            cycled.recv().await.unwrap();
        }
    });
    drop(doomed);

    let after = runtime();
    after.block_on(async {
        assert!(guard.is_lost(), "the guard's session went with its runtime");
        let admin = tokio::sync::Mutex::new(pg_support::admin().await);
        for key in std::iter::once(&held_key).chain(&looping_keys) {
            common::wait::assert_eventually("the server freed the key", || async {
                pg_support::advisory_locks(&mut *admin.lock().await, key).await == 0
            })
            .await;
        }
        let other = pg_support::lock(LockConfig::new()).await;
        for key in std::iter::once(&held_key).chain(&looping_keys) {
            pg_support::take_and_release(&other, key).await;
        }
    });
}

/// Much longer than any operation here takes (well under a millisecond each on loopback), and
/// much shorter than the command timeout of [`callers_on_many_threads_share_one_session`]: an
/// operation that takes this long waited for a timer instead of being woken.
const NO_LOST_WAKE_UP: Duration = Duration::from_secs(2);

/// Callers send commands and wait for their replies. Here many of them, on several
/// threads at once (the workers of the session's runtime, a second runtime's thread, and plain
/// threads outside any runtime), take, check and release their own keys on one session. Every
/// operation succeeds, none waits for a timer to wake it (the command timeout is raised far
/// above [`NO_LOST_WAKE_UP`], so a lost wake-up shows as a slow operation, not as an error),
/// and the keys are free at the end.
#[test]
fn callers_on_many_threads_share_one_session() {
    const ROUNDS: usize = 150;
    let prefix = common::unique_prefix("pg_many_threads");
    let home = runtime();
    let lock = home.block_on(pg_support::one_session_lock(LockConfig::new(), |builder| {
        builder
            .command_timeout(Duration::from_secs(60))
            .network_timeout(Duration::from_secs(300))
    }));
    // The session task starts on the runtime of the first operation: make that this one.
    let first = format!("{prefix}first");
    home.block_on(pg_support::take_and_release(&lock, &first));
    let worker = |lock: PostgresDistributedLock, name: String| async move {
        let mut slowest = Duration::ZERO;
        for round in 0..ROUNDS {
            let key = format!("{name}:{}", round % 3);
            let started = std::time::Instant::now();
            let guard = lock.try_acquire(&key).await.expect("own key");
            assert!(lock.is_locked(&key).await.expect("is_locked"));
            guard.release().await.expect("release");
            slowest = slowest.max(started.elapsed());
        }
        slowest
    };
    let plain: Vec<String> = (0..2).map(|i| format!("{prefix}plain{i}")).collect();
    let elsewhere = format!("{prefix}elsewhere");
    let home_workers: Vec<String> = (0..6).map(|i| format!("{prefix}home{i}")).collect();
    let mut slowest = Vec::new();
    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for name in &plain {
            let (lock, name) = (lock.clone(), name.clone());
            threads.push(scope.spawn(move || futures::executor::block_on(worker(lock, name))));
        }
        let (lock_elsewhere, name) = (lock.clone(), elsewhere.clone());
        threads.push(scope.spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(worker(lock_elsewhere, name))
        }));
        let home_tasks: Vec<_> = home_workers
            .iter()
            .map(|name| home.spawn(worker(lock.clone(), name.clone())))
            .collect();
        for task in home_tasks {
            slowest.push(home.block_on(task).unwrap());
        }
        for thread in threads {
            slowest.push(thread.join().unwrap());
        }
    });
    let slowest = slowest.into_iter().max().unwrap();
    assert!(
        slowest < NO_LOST_WAKE_UP,
        "an operation took {slowest:?}: it waited for a timer"
    );
    // Every worker took and released each of its three keys: none is left on the server.
    home.block_on(async {
        let mut admin = pg_support::admin().await;
        let worker_keys = plain
            .iter()
            .chain([&elsewhere])
            .chain(&home_workers)
            .flat_map(|name| (0..3).map(move |n| format!("{name}:{n}")));
        for key in std::iter::once(first).chain(worker_keys) {
            assert_eq!(
                pg_support::advisory_locks(&mut admin, &key).await,
                0,
                "{key} is still locked on the server"
            );
        }
    });
}

/// Starts `operation` on a plain thread, outside any runtime, and runs it to completion there.
fn outside<T: Send, F: Future<Output = T>>(operation: impl FnOnce() -> F + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| futures::executor::block_on(operation()))
            .join()
            .unwrap()
    })
}

/// A session starts on the runtime of its first operation. A first operation outside any
/// runtime gets a clear error (not a panic) and takes nothing; once the session runs, callers
/// outside any runtime use it like the others (see `callers_on_many_threads_share_one_session`).
#[test]
fn a_first_operation_outside_any_runtime_is_refused_cleanly() {
    let prefix = common::unique_prefix("pg_no_runtime");
    let key = format!("{prefix}key");
    let home = runtime();
    let lock = home.block_on(one_session_lock(LockConfig::new()));
    let held_on_server = |expected: i64| {
        home.block_on(async {
            let mut admin = pg_support::admin().await;
            assert_eq!(pg_support::advisory_locks(&mut admin, &key).await, expected);
            assert_eq!(lock.is_locked(&key).await.unwrap(), expected == 1);
        })
    };
    match outside(|| lock.try_acquire(&key)) {
        Err(LockError::BackendError(error)) => {
            assert!(error.to_string().contains("runtime"), "{error}")
        }
        other => panic!("expected a BackendError, got {other:?}"),
    }
    held_on_server(0);

    // `is_locked` above started the session on `home`: now a caller outside any runtime takes
    // the key (the server sees it held) and releases it (the server sees it free).
    let guard = outside(|| lock.try_acquire(&key))
        .expect("the running session serves callers outside any runtime");
    held_on_server(1);
    outside(|| guard.release()).expect("a release from outside any runtime");
    held_on_server(0);
}

/// A caller that was polled once and then parked must not hold up another caller that waits
/// for its own statement. Here the other caller's statement is one that waits on the server: an
/// admin connection blocks the lock's fencing sequence (an open `ALTER SEQUENCE`), so the lock
/// statement waits for it. The parked acquire's statement queues behind it. When the admin lets
/// go, the waiting `acquire` must get its answer at once (the command timeout is 60 s: a
/// wake-up that went only to the parked caller would leave it waiting that long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_caller_does_not_hold_up_another_waiting_caller() {
    let prefix = common::unique_prefix("pg_parked_driver");
    let awaited = format!("{prefix}awaited");
    let sequence = format!("k1s0_test_seq_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = sequence_cleanup(&sequence);
    let lock = pg_support::one_session_lock(LockConfig::new(), |builder| {
        builder
            .command_timeout(Duration::from_secs(60))
            .network_timeout(Duration::from_secs(300))
            .fencing_sequence(sequence.clone())
    })
    .await;
    pg_support::take_and_release(&lock, &format!("{prefix}warm")).await;

    let mut holder = pg_support::admin().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(&format!("ALTER SEQUENCE \"{sequence}\" CACHE 1"))
        .execute(&mut holder)
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let (lock, awaited) = (lock.clone(), awaited.clone());
        async move { lock.acquire(&awaited).await }
    });
    let admin = tokio::sync::Mutex::new(pg_support::admin().await);
    let blocked = format!(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = to_regclass('\"{sequence}\"')"
    );
    common::wait::assert_eventually(
        "the acquire's lock statement waits on the server",
        || async {
            sqlx::query_scalar::<_, i64>(&blocked)
                .fetch_one(&mut *admin.lock().await)
                .await
                .unwrap()
                == 1
        },
    )
    .await;

    // A second caller's statement queues behind the blocked one; it is then kept without
    // being polled.
    let (parked_key, parked) = parked_acquire(&lock, &prefix).await;

    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let let_go = std::time::Instant::now();
    let guard = waiting
        .await
        .unwrap()
        .expect("the waiting acquire gets the key");
    assert!(
        let_go.elapsed() < NO_LOST_WAKE_UP,
        "the waiting acquire took {:?} after the key was let go: its answer waited for the \
         parked caller",
        let_go.elapsed()
    );
    guard.release().await.unwrap();
    drop(parked);
    lock.acquire(&parked_key)
        .await
        .expect("the parked acquire, dropped, leaves its key free")
        .release()
        .await
        .unwrap();
}

/// Removes a test's own fencing sequence and its epoch row when the test ends, however it ends.
fn sequence_cleanup(sequence: &str) -> pg_support::DropOnExit {
    pg_support::DropOnExit::new(vec![
        format!("DELETE FROM k1s0_lock_fencing_epochs WHERE sequence = '\"{sequence}\"'"),
        format!("DROP SEQUENCE IF EXISTS \"{sequence}\""),
    ])
}

/// Runs `sql` on `conn` with `$1` the advisory key `advisory` and `$2`/`$3` its waiter flag.
async fn on_key_and_flag(conn: &mut sqlx::PgConnection, sql: &str, advisory: i64) {
    let (high, low) = ((advisory >> 32) as i32, advisory as i32);
    sqlx::query(sql)
        .bind(advisory)
        .bind(high)
        .bind(low)
        .execute(conn)
        .await
        .unwrap();
}

/// A statement that runs past the command timeout is an ordinary statement error, not a lost
/// session: the server's own `lock_timeout` / `statement_timeout` fire before the client's
/// deadline. Here another connection blocks the fencing sequence (an open `ALTER SEQUENCE`), so
/// the lock statement of one key waits inside the server; the acquire fails, and every other
/// lock on the session stays held. Then another process holds a key and, exclusively, its
/// waiter flag: the waiter's flag statement must not wait inside the server either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_that_overruns_keeps_the_other_locks_on_the_session() {
    let prefix = common::unique_prefix("pg_overrun");
    let sequence = format!("k1s0_test_seq_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = sequence_cleanup(&sequence);
    let config = LockConfig::new()
        .retry_interval(Duration::from_millis(20))
        .max_retries(10);
    let lock = pg_support::one_session_lock(config, |builder| {
        builder
            .command_timeout(Duration::from_millis(800))
            .fencing_sequence(sequence.clone())
    })
    .await;
    let bystanders: Vec<String> = (0..3).map(|i| format!("{prefix}bystander{i}")).collect();
    let mut guards = Vec::new();
    for key in &bystanders {
        guards.push(lock.try_acquire(key).await.unwrap());
    }
    let mut admin = pg_support::admin().await;
    let check_bystanders = |round: usize, guards: &[LockGuard]| {
        assert!(
            guards.iter().all(|guard| !guard.is_lost()),
            "round {round}: a bystander guard was lost"
        );
    };

    let victim = format!("{prefix}victim");
    let mut blocker = pg_support::admin().await;
    for round in 0..3 {
        sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
        sqlx::query(&format!("ALTER SEQUENCE \"{sequence}\" CACHE 1"))
            .execute(&mut blocker)
            .await
            .unwrap();
        let refused = lock.try_acquire(&victim).await;
        sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
        assert!(
            matches!(refused, Err(LockError::BackendError(_))),
            "round {round}: {refused:?}"
        );
        check_bystanders(round, &guards);
        for key in &bystanders {
            assert_eq!(pg_support::advisory_locks(&mut admin, key).await, 1);
        }
        assert_eq!(pg_support::advisory_locks(&mut admin, &victim).await, 0);
    }

    let advisory = PostgresDistributedLock::advisory_key(&victim);
    on_key_and_flag(
        &mut blocker,
        "SELECT pg_advisory_lock($1), pg_advisory_lock($2, $3)",
        advisory,
    )
    .await;
    // The waiter's flag statement is a try: it never queues on the server (which would hold
    // up every other key of the session until the server's timeout). The waiter is refused the
    // flag, polls, and runs out of its budget (Timeout); a flag statement that waited on the
    // server would end in the server's own timeout instead (BackendError). Until the waiter
    // ends, no flag request of the key waits on the server.
    let waiting = lock.acquire(&victim);
    let mut watcher = pg_support::admin().await;
    let watch_the_queue = async {
        loop {
            assert_eq!(
                pg_support::queued_flags(&mut watcher, &victim).await,
                0,
                "a flag statement waits inside the server"
            );
        }
    };
    let waited = tokio::time::timeout(NO_DEADLOCK, async {
        tokio::select! {
            waited = waiting => waited,
            _ = watch_the_queue => unreachable!("the watch ends only by failing the test"),
        }
    })
    .await
    .expect("the waiter ends within its budget");
    assert!(matches!(waited, Err(LockError::Timeout)), "{waited:?}");
    check_bystanders(3, &guards);
    for key in &bystanders {
        assert_eq!(pg_support::advisory_locks(&mut admin, key).await, 1);
    }
    on_key_and_flag(
        &mut blocker,
        "SELECT pg_advisory_unlock($1), pg_advisory_unlock($2, $3)",
        advisory,
    )
    .await;
    lock.acquire(&victim)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    for guard in guards {
        guard.release().await.unwrap();
    }
}

/// Lease expiry runs whatever the load on the session: with 128 tasks taking and releasing
/// other keys on the same session, a lock whose lease ran out is unlocked on the server within
/// its TTL plus one statement or so, not once the command queue happens to be empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_expires_on_time_while_the_session_is_busy() {
    /// Far above one statement here (well under a millisecond), far below the load's length.
    const LATE: Duration = Duration::from_millis(250);
    let ttl = Duration::from_millis(300);
    let prefix = common::unique_prefix("pg_busy_expiry");
    let leased_key = format!("{prefix}leased");
    let lock = pg_support::one_session_lock(LockConfig::new().ttl(ttl), |builder| {
        builder.network_timeout(Duration::from_secs(120))
    })
    .await;
    let mut admin = pg_support::admin().await;
    let sent_at = tokio::time::Instant::now();
    let leased = lock.try_acquire(&leased_key).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..128)
        .map(|task| {
            let (lock, stop) = (lock.clone(), stop.clone());
            let key = format!("{prefix}load{task}");
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(guard) = lock.try_acquire(&key).await {
                        guard.release().await.unwrap();
                    }
                }
            })
        })
        .collect();
    let give_up = sent_at + ttl + Duration::from_secs(3);
    while pg_support::advisory_locks(&mut admin, &leased_key).await == 1 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the expired lock stayed on the server"
        );
    }
    let freed_after = sent_at.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(leased.is_lost());
    assert!(
        freed_after < ttl + LATE,
        "the lock left the server {freed_after:?} after it was taken, with a TTL of {ttl:?}"
    );
}

/// A lock service first used on a runtime that then shut down: its sessions and its LISTEN
/// connection went with that runtime, and are started again on the runtime of the next
/// operations. Every attempt on the new runtime works, and a waiter there is woken by the
/// release of another process (the retry interval is far longer than the test's patience).
#[test]
fn a_lock_first_used_on_a_runtime_that_shut_down_works_on_a_new_one() {
    let prefix = common::unique_prefix("pg_new_runtime");
    let config = LockConfig::new()
        .retry_interval(Duration::from_secs(30))
        .max_retries(2);
    let first = runtime();
    let lock = first.block_on(async {
        let lock = one_session_lock(config).await;
        // Starts the session and, with a wait on a key another process holds, the listener.
        handed_over_by_another_process(&lock, &format!("{prefix}warm")).await;
        lock
    });
    drop(first);

    let second = runtime();
    second.block_on(async {
        for attempt in 0..3 {
            let key = format!("{prefix}again{attempt}");
            match lock.try_acquire(&key).await {
                Ok(guard) => guard.release().await.unwrap(),
                Err(error) => panic!("attempt {attempt} on the new runtime: {error:?}"),
            }
        }
        let took = handed_over_by_another_process(&lock, &format!("{prefix}notified")).await;
        assert!(
            took < NO_LOST_WAKE_UP,
            "the waiter took {took:?}: no LISTEN connection woke it"
        );
    });
}

/// Another lock service (as another process) holds `key` while `lock` waits for it with its
/// waiter flag set; then it releases. Returns how long after the release `lock` had the key.
async fn handed_over_by_another_process(
    lock: &PostgresDistributedLock,
    key: &str,
) -> std::time::Duration {
    let other = pg_support::lock(LockConfig::new()).await;
    let held = other.try_acquire(key).await.unwrap();
    let mut admin = pg_support::admin().await;
    let (waiting, _) = pg_support::spawn_flagged_waiter(lock, key, &mut admin, NO_DEADLOCK).await;
    held.release().await.unwrap();
    let let_go = std::time::Instant::now();
    let guard = waiting.await.unwrap().unwrap();
    let took = let_go.elapsed();
    guard.release().await.unwrap();
    took
}
