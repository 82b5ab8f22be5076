//! [`LockLayer`]: a Tower middleware that holds a distributed lock for each request.
//!
//! The layer builds a key from each request with a closure, takes the lock before calling the
//! inner service, and holds it until the response is finished: through the handler, and
//! through the whole response body, extending it every third of its TTL for as long as that
//! takes (up to [`LockLayer::max_hold`]). At the end of the body the lock is released before
//! the end is passed on (a body that is complete at once is released before the head goes
//! out, and the whole response is written at once), so a client that has the whole answer can
//! lock again at once; on a body error or when the body is dropped, the guard is dropped and
//! releases in the background. A request whose lock is taken gets the conflict status (409 by
//! default, 423 if configured) or, for gRPC requests, a trailers-only `ABORTED` status.
//!
//! The split follows tower-http: [`LockLayer`] (configuration), [`LockService`] (the
//! middleware), [`ResponseFuture`] (holds the lock across the inner future), [`ResponseBody`]
//! (holds it across the body), [`key`] (key extractors) and [`Rejection`] (what a refused
//! request is answered with).
//!
//! ```
//! use axum::{routing::post, Router};
//! use k1s0_distributed_lock::{layer::key, InMemoryDistributedLock, LockConfig, LockLayer};
//!
//! let lock = InMemoryDistributedLock::new(LockConfig::new());
//! let app: Router = Router::new()
//!     .route("/orders/{id}/pay", post(|| async { "paid" }))
//!     .layer(LockLayer::new(lock, key::path()));
//! ```

mod body;
mod future;
mod held;
pub mod key;
mod lock_layer;
mod rejection;
mod service;
mod settings;
mod side;
mod waiters;

pub use body::ResponseBody;
pub use future::ResponseFuture;
pub use key::{IntoLockKey, KeyDecision};
pub use lock_layer::LockLayer;
pub use rejection::{Rejection, RejectionKind};
pub use service::LockService;
