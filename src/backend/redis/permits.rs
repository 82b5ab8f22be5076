//! Permits ([`DistributedSemaphore`]) on Redis: up to each caller's limit of holders per key, in
//! names of their own beside the key's lock (see docs/redis.md, "Permits"). Acquiring runs the
//! lock's waiting loop with [`Want::Permit`]; the guards release, extend and abandon through
//! the permit scripts that their [`LockKeys`](super::keys::LockKeys) pick.

use std::future::Future;

use super::keys;
use super::scripts::PERMITS_HELD;
use super::RedisDistributedLock;
use crate::backend::want::Want;
use crate::observe::{observe_acquire, Mode};
use crate::{validate_key, DistributedSemaphore, LockError, LockGuard};

impl DistributedSemaphore for RedisDistributedLock {
    fn try_acquire_permit(
        &self,
        key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let want = Want::Permit { limit };
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "redis",
            keys,
            key,
            Mode::Try,
            want.label(),
            self.take(key, want, false),
        )
    }

    fn acquire_permit(
        &self,
        key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let want = Want::Permit { limit };
        let keys = self.config().get_trace_keys();
        observe_acquire(
            "redis",
            keys,
            key,
            Mode::Wait,
            want.label(),
            self.take(key, want, true),
        )
    }

    /// Counts the permits whose lease has not run out, by the server's clock (one script, which
    /// changes nothing).
    async fn permits_held(&self, key: &str) -> Result<u32, LockError> {
        validate_key(key)?;
        let permits = keys::with_suffix(&keys::lock_name(&self.shared.prefix, key), keys::PERMITS);
        let held = self
            .shared
            .connections
            .script(&PERMITS_HELD, &[permits.as_str()], &[])
            .await?;
        Ok(u32::try_from(held).unwrap_or(u32::MAX))
    }
}
