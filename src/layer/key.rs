//! Ready-made key extractors for [`LockLayer::new`](super::LockLayer::new).
//!
//! Each returns a closure over the request head that yields `Some(key)` to lock, or `None` to
//! let the request through unlocked.
//!
//! ```
//! use axum::{routing::post, Router};
//! use k1s0_distributed_lock::{layer::key, InMemoryDistributedLock, LockConfig, LockLayer};
//!
//! let lock = InMemoryDistributedLock::new(LockConfig::new());
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { "ok" }))
//!     .layer(LockLayer::new(lock, key::header("Idempotency-Key")));
//! ```

use http::request::Parts;
use http::HeaderName;

/// Locks the value of header `name` (for example `Idempotency-Key`). Requests without the
/// header, or with a value that is not visible ASCII, pass through unlocked.
///
/// # Panics
///
/// If `name` is not a valid header name.
pub fn header(name: &str) -> impl Fn(&Parts) -> Option<String> + Clone + Send + Sync + 'static {
    let name = HeaderName::from_bytes(name.as_bytes())
        .unwrap_or_else(|_| panic!("key::header: {name:?} is not a valid header name"));
    move |parts: &Parts| {
        let value = parts.headers.get(&name)?.to_str().ok()?;
        Some(format!("{name}:{value}"))
    }
}

/// Locks the request path: every request to the same path is serialised.
pub fn path() -> impl Fn(&Parts) -> Option<String> + Clone + Send + Sync + 'static {
    |parts: &Parts| Some(parts.uri.path().to_owned())
}

/// Locks the method and path, so that `GET /x` and `POST /x` do not exclude each other.
pub fn method_and_path() -> impl Fn(&Parts) -> Option<String> + Clone + Send + Sync + 'static {
    |parts: &Parts| Some(format!("{} {}", parts.method, parts.uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(request: Request<()>) -> Parts {
        request.into_parts().0
    }

    #[test]
    fn header_keys_by_name_and_value_and_skips_missing_headers() {
        let extract = header("Idempotency-Key");
        let with = parts(
            Request::post("/pay")
                .header("idempotency-key", "abc-123")
                .body(())
                .unwrap(),
        );
        assert_eq!(extract(&with).as_deref(), Some("idempotency-key:abc-123"));
        assert_eq!(
            extract(&parts(Request::post("/pay").body(()).unwrap())),
            None
        );
    }

    #[test]
    fn path_and_method_keys() {
        let request = parts(Request::put("/orders/7?x=1").body(()).unwrap());
        assert_eq!(path()(&request).as_deref(), Some("/orders/7"));
        assert_eq!(
            method_and_path()(&request).as_deref(),
            Some("PUT /orders/7")
        );
    }

    #[test]
    #[should_panic(expected = "not a valid header name")]
    fn an_invalid_header_name_is_refused_at_start_up() {
        let _ = header("bad header");
    }
}
