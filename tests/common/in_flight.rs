//! A count of tasks inside a section, kept on the server and updated atomically, with the
//! largest value it reached: what a permit limit bounds, seen from outside every process.

use super::backends::Backend;

/// The count `name` on `backend`'s server (a row in PostgreSQL, two keys in Redis).
#[derive(Clone)]
pub enum InFlight {
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool, String),
    #[cfg(feature = "redis")]
    Redis(redis::aio::MultiplexedConnection, String),
}

/// Adds one to the count and raises the maximum to it, in one step.
#[cfg(feature = "redis")]
const ENTER: &str = "local n = redis.call('INCR', KEYS[1]) \
    if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end \
    return n";

impl InFlight {
    pub async fn new(backend: Backend, name: &str) -> InFlight {
        match backend {
            Backend::Memory => panic!("the in-memory backend has no server"),
            #[cfg(feature = "postgres")]
            Backend::Postgres => {
                let pool = super::backends::postgres_pool(None).await;
                let mut tx = pool.begin().await.expect("begin");
                // Parallel tests race to create the table: serialise the creation.
                sqlx::query("SELECT pg_advisory_xact_lock(4242, 4243)")
                    .execute(&mut *tx)
                    .await
                    .expect("serialise table creation");
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS k1s0_test_in_flight \
                     (name text PRIMARY KEY, inside bigint NOT NULL, most bigint NOT NULL)",
                )
                .execute(&mut *tx)
                .await
                .expect("create the in-flight table");
                tx.commit().await.expect("commit");
                sqlx::query(
                    "INSERT INTO k1s0_test_in_flight VALUES ($1, 0, 0) ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .execute(&pool)
                .await
                .expect("in-flight row");
                InFlight::Postgres(pool, name.to_owned())
            }
            #[cfg(feature = "redis")]
            Backend::Redis => {
                let client = redis::Client::open(super::redis_url().await).expect("redis url");
                let connection = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect to the test Redis");
                InFlight::Redis(connection, name.to_owned())
            }
        }
    }

    /// A task comes in; returns the count with it.
    pub async fn enter(&self) -> i64 {
        match self {
            #[cfg(feature = "postgres")]
            InFlight::Postgres(pool, name) => sqlx::query_scalar(
                "UPDATE k1s0_test_in_flight SET inside = inside + 1, \
                 most = GREATEST(most, inside + 1) WHERE name = $1 RETURNING inside",
            )
            .bind(name)
            .fetch_one(pool)
            .await
            .expect("enter"),
            #[cfg(feature = "redis")]
            InFlight::Redis(connection, name) => redis::Script::new(ENTER)
                .key(format!("{name}:inside"))
                .key(format!("{name}:most"))
                .invoke_async(&mut connection.clone())
                .await
                .expect("enter"),
        }
    }

    /// A task goes out.
    pub async fn leave(&self) {
        match self {
            #[cfg(feature = "postgres")]
            InFlight::Postgres(pool, name) => {
                sqlx::query("UPDATE k1s0_test_in_flight SET inside = inside - 1 WHERE name = $1")
                    .bind(name)
                    .execute(pool)
                    .await
                    .expect("leave");
            }
            #[cfg(feature = "redis")]
            InFlight::Redis(connection, name) => {
                let _: i64 = redis::cmd("DECR")
                    .arg(format!("{name}:inside"))
                    .query_async(&mut connection.clone())
                    .await
                    .expect("leave");
            }
        }
    }

    /// (tasks inside now, the most that were ever inside at once).
    pub async fn read(&self) -> (i64, i64) {
        match self {
            #[cfg(feature = "postgres")]
            InFlight::Postgres(pool, name) => {
                sqlx::query_as("SELECT inside, most FROM k1s0_test_in_flight WHERE name = $1")
                    .bind(name)
                    .fetch_one(pool)
                    .await
                    .expect("read")
            }
            #[cfg(feature = "redis")]
            InFlight::Redis(connection, name) => {
                let (inside, most): (Option<i64>, Option<i64>) = redis::cmd("MGET")
                    .arg(format!("{name}:inside"))
                    .arg(format!("{name}:most"))
                    .query_async(&mut connection.clone())
                    .await
                    .expect("read");
                (inside.unwrap_or(0), most.unwrap_or(0))
            }
        }
    }
}
