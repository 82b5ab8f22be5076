//! A counter kept in PostgreSQL or Redis and updated by a non-atomic read-modify-write: a
//! separate read, then a separate write. Without mutual exclusion, concurrent updates are lost.

#[cfg(feature = "postgres")]
pub mod postgres {
    use sqlx::PgPool;

    /// A row per counter in `k1s0_test_counters`.
    #[derive(Clone)]
    pub struct PostgresCounter {
        pool: PgPool,
        name: String,
    }

    impl PostgresCounter {
        pub async fn new(pool: PgPool, name: &str) -> Self {
            // Parallel tests race to create the table: serialise the creation, so that a real
            // error is not mistaken for the race.
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query("SELECT pg_advisory_xact_lock(4242, 4242)")
                .execute(&mut *tx)
                .await
                .expect("serialise table creation");
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS k1s0_test_counters (name text PRIMARY KEY, value bigint NOT NULL)",
            )
            .execute(&mut *tx)
            .await
            .expect("create counter table");
            tx.commit().await.expect("commit");
            sqlx::query("INSERT INTO k1s0_test_counters (name, value) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING")
                .bind(name)
                .execute(&pool)
                .await
                .expect("counter row");
            PostgresCounter {
                pool,
                name: name.to_owned(),
            }
        }

        pub async fn read(&self) -> i64 {
            sqlx::query_scalar("SELECT value FROM k1s0_test_counters WHERE name = $1")
                .bind(&self.name)
                .fetch_one(&self.pool)
                .await
                .expect("read counter")
        }

        pub async fn write(&self, value: i64) {
            sqlx::query("UPDATE k1s0_test_counters SET value = $2 WHERE name = $1")
                .bind(&self.name)
                .bind(value)
                .execute(&self.pool)
                .await
                .expect("write counter");
        }

        /// One non-atomic increment: read, yield, write.
        pub async fn increment(&self) {
            let value = self.read().await;
            tokio::task::yield_now().await;
            self.write(value + 1).await;
        }
    }
}

#[cfg(feature = "redis")]
pub mod redis {
    use redis::aio::MultiplexedConnection;
    use redis::AsyncCommands;

    /// A plain string key holding the number.
    #[derive(Clone)]
    pub struct RedisCounter {
        connection: MultiplexedConnection,
        name: String,
    }

    impl RedisCounter {
        pub async fn new(url: &str, name: &str) -> Self {
            RedisCounter {
                connection: crate::common::redis_conn::connection(url).await,
                name: name.to_owned(),
            }
        }

        pub async fn read(&self) -> i64 {
            let value: Option<i64> = self.connection.clone().get(&self.name).await.expect("GET");
            value.unwrap_or(0)
        }

        pub async fn write(&self, value: i64) {
            let () = self
                .connection
                .clone()
                .set_ex(&self.name, value, 3600)
                .await
                .expect("SET");
        }

        /// One non-atomic increment: read, yield, write.
        pub async fn increment(&self) {
            let value = self.read().await;
            tokio::task::yield_now().await;
            self.write(value + 1).await;
        }
    }
}
