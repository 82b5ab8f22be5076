//! [`LockLayer`]: a Tower middleware that holds a distributed lock for each request.
//!
//! The layer builds a key from each request with a closure, takes the lock before calling the
//! inner service, and holds it until the response is finished: through the handler, and
//! through the whole response body. At the end of the body the lock is released before the end
//! is passed on (an empty response is answered once its lock is released), so a client that
//! has the whole answer can lock again at once; on a body error or when the body is dropped,
//! the guard is dropped and releases in the background. A request whose lock is taken gets the conflict status
//! (409 by default, 423 if configured) or, for gRPC requests, a trailers-only `ABORTED` status.
//!
//! The split follows tower-http: [`LockLayer`] (configuration), [`LockService`] (the
//! middleware), [`ResponseFuture`] (holds the lock across the inner future), [`ResponseBody`]
//! (holds it across the body), [`key`] (ready-made key extractors) and [`Rejection`] (what a
//! refused request is answered with).
//!
//! ```
//! use axum::{routing::post, Router};
//! use k1s0_distributed_lock::{InMemoryDistributedLock, LockConfig, LockLayer};
//!
//! let lock = InMemoryDistributedLock::new(LockConfig::new());
//! let app: Router = Router::new()
//!     .route("/orders/{id}/pay", post(|| async { "paid" }))
//!     .layer(LockLayer::new(lock, |req| format!("order:{}", req.uri.path())));
//! ```

mod body;
mod future;
pub mod key;
#[allow(clippy::module_inception)]
mod layer;
mod rejection;
mod service;
mod settings;

pub use body::ResponseBody;
pub use future::ResponseFuture;
pub use layer::LockLayer;
pub use rejection::{Rejection, RejectionKind};
pub use service::LockService;
