//! proptest strategies for hostile keys and configurations.

use std::time::Duration;

use k1s0_distributed_lock::LockConfig;
use proptest::prelude::*;

/// Keys from every corner: any UTF-8, empty, huge, and metacharacters of Redis, Lua and SQL.
pub fn hostile_key() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        Just(String::new()),
        "[{}*?'\"\\\\\0\n\r\t ;%_$-]{1,40}",
        "\\PC{1,64}",
        (0usize..1200).prop_map(|n| "k".repeat(n)),
        Just("'; DROP TABLE x; --".to_owned()),
        Just("]] redis.call('FLUSHALL') --[[".to_owned()),
        Just("{tag}".to_owned()),
        Just("\u{0}".to_owned()),
        Just("é".repeat(300)),
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        (1u64..1_000_000).prop_map(Duration::from_nanos),
        (1u64..5_000).prop_map(Duration::from_millis),
        any::<u64>().prop_map(Duration::from_secs),
        Just(Duration::MAX),
    ]
}

/// Configurations with zero, tiny, normal and huge durations, any retry count, and a wait
/// timeout or none.
pub fn hostile_config() -> impl Strategy<Value = LockConfig> {
    (
        duration(),
        duration(),
        prop_oneof![Just(0u32), 1u32..50, any::<u32>()],
        proptest::option::of(duration()),
    )
        .prop_map(|(ttl, retry_interval, max_retries, wait_timeout)| {
            let config = LockConfig::new()
                .ttl(ttl)
                .retry_interval(retry_interval)
                .max_retries(max_retries);
            match wait_timeout {
                Some(timeout) => config.wait_timeout(timeout),
                None => config,
            }
        })
}
