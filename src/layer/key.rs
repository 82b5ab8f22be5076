//! Key extractors for [`LockLayer::new`](super::LockLayer::new), and what an extractor may
//! return.
//!
//! An extractor is a closure over the request head. It returns anything that implements
//! [`IntoLockKey`]: a `String`, a `&'static str` or a `Cow<'static, str>` locks that key;
//! `None` lets the request through unlocked; a [`KeyDecision`] can also refuse the request
//! (400, or gRPC `INVALID_ARGUMENT`).
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
//!
//! The path extractors lock the *normalised* path ([`normalize_path`]): two requests that
//! reach the same handler with the same path parameters lock the same key, however the client
//! percent-encoded them.

use std::borrow::Cow;
use std::fmt;

use http::request::Parts;
use http::HeaderName;

/// What a key extractor decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyDecision {
    /// Lock this key for the whole request.
    Lock(String),
    /// Let the request through without a lock.
    PassUnlocked,
    /// Refuse the request as malformed: 400 (gRPC 3 `INVALID_ARGUMENT`), with this reason in
    /// the [`Rejection`](super::Rejection)'s error. The handler never runs.
    Refuse(Cow<'static, str>),
}

/// What a key extractor may return: converts into a [`KeyDecision`].
///
/// Implemented for `String`, `&'static str` and `Cow<'static, str>` (lock that key),
/// `Option` of any of them (`None` passes unlocked), and `KeyDecision` itself.
pub trait IntoLockKey {
    /// The decision this value stands for.
    fn into_lock_key(self) -> KeyDecision;
}

impl IntoLockKey for KeyDecision {
    fn into_lock_key(self) -> KeyDecision {
        self
    }
}

impl IntoLockKey for String {
    fn into_lock_key(self) -> KeyDecision {
        KeyDecision::Lock(self)
    }
}

impl IntoLockKey for &'static str {
    fn into_lock_key(self) -> KeyDecision {
        KeyDecision::Lock(self.to_owned())
    }
}

impl IntoLockKey for Cow<'static, str> {
    fn into_lock_key(self) -> KeyDecision {
        KeyDecision::Lock(self.into_owned())
    }
}

impl<T: IntoLockKey> IntoLockKey for Option<T> {
    fn into_lock_key(self) -> KeyDecision {
        self.map_or(KeyDecision::PassUnlocked, IntoLockKey::into_lock_key)
    }
}

/// Locks the value of header `name` (for example `Idempotency-Key`), as `name:value`.
///
/// * No such header: the request passes unlocked.
/// * A value that is not visible ASCII (say the UTF-8 bytes of `café`) still locks: bytes
///   outside visible ASCII, and `%`, are written as `%XX`, so distinct values give distinct
///   keys.
/// * The header repeated: the request is refused with 400. A handler may read the first value
///   or all of them, so no single key is safe to lock.
///
/// # Panics
///
/// If `name` is not a valid header name: a mistake in the program, found at start-up.
/// [`try_header`] returns the error instead.
pub fn header<N>(name: N) -> impl Fn(&Parts) -> KeyDecision + Clone + Send + Sync + 'static
where
    N: TryInto<HeaderName>,
    N::Error: fmt::Display,
{
    match try_header(name) {
        Ok(extractor) => extractor,
        Err(error) => panic!("key::header: not a valid header name: {error}"),
    }
}

/// Like [`header`], returning the conversion's error (for a string,
/// [`InvalidHeaderName`](http::header::InvalidHeaderName)) instead of panicking.
pub fn try_header<N>(
    name: N,
) -> Result<impl Fn(&Parts) -> KeyDecision + Clone + Send + Sync + 'static, N::Error>
where
    N: TryInto<HeaderName>,
{
    let name: HeaderName = name.try_into()?;
    Ok(move |parts: &Parts| {
        let mut values = parts.headers.get_all(&name).iter();
        let Some(value) = values.next() else {
            return KeyDecision::PassUnlocked;
        };
        if values.next().is_some() {
            return KeyDecision::Refuse(format!("the {name} header is repeated").into());
        }
        let mut key = format!("{name}:");
        escape_into(&mut key, value.as_bytes(), |byte| {
            byte.is_ascii_graphic() || byte == b' '
        });
        KeyDecision::Lock(key)
    })
}

/// Locks the normalised request path ([`normalize_path`]): every request to the same
/// resource is serialised, whatever the method.
pub fn path() -> impl Fn(&Parts) -> String + Clone + Send + Sync + 'static {
    |parts: &Parts| normalize_path(parts.uri.path())
}

/// Locks the method and the normalised path, so that `GET /x` and `POST /x` do not exclude
/// each other.
pub fn method_and_path() -> impl Fn(&Parts) -> String + Clone + Send + Sync + 'static {
    |parts: &Parts| format!("{} {}", parts.method, normalize_path(parts.uri.path()))
}

/// Locks the route axum matched and the normalised path, as `"{route} {path}"` (for example
/// `/orders/{id}/pay /orders/42/pay`). For [`Router::route_layer`](axum::Router::route_layer),
/// which runs after routing: axum's [`MatchedPath`](axum::extract::MatchedPath) is in the
/// request then. A request without one (the fallback, for example: `Router::layer` also wraps
/// it) passes unlocked, so a 404 takes no lock.
///
/// ```
/// use axum::{routing::post, Router};
/// use k1s0_distributed_lock::{layer::key, InMemoryDistributedLock, LockConfig, LockLayer};
///
/// let lock = InMemoryDistributedLock::new(LockConfig::new());
/// let app: Router = Router::new()
///     .route("/orders/{id}/pay", post(|| async { "paid" }))
///     .route_layer(LockLayer::new(lock, key::matched_path()));
/// ```
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub fn matched_path() -> impl Fn(&Parts) -> Option<String> + Clone + Send + Sync + 'static {
    |parts: &Parts| {
        let route = parts.extensions.get::<axum::extract::MatchedPath>()?;
        Some(format!(
            "{} {}",
            route.as_str(),
            normalize_path(parts.uri.path())
        ))
    }
}

/// The path as a handler sees it, in one spelling: each segment is percent-decoded, then
/// written again with every byte that is not an unreserved or sub-delimiter character (and
/// every `%` and `/` that a segment held encoded) as upper-case `%XX`.
///
/// `/orders/%34%32/pay` and `/orders/42/pay` both become `/orders/42/pay`, the way axum's
/// `Path` extractor decodes both to `42`; `/a%2Fb` stays one segment (`/a%2Fb`), distinct from
/// `/a/b`, as it is to axum's router.
///
/// ```
/// use k1s0_distributed_lock::layer::key::normalize_path;
///
/// assert_eq!(normalize_path("/orders/%34%32/pay"), "/orders/42/pay");
/// assert_eq!(normalize_path("/caf%c3%a9"), normalize_path("/caf%C3%A9"));
/// assert_eq!(normalize_path("/a%2fb"), "/a%2Fb");
/// ```
pub fn normalize_path(path: &str) -> String {
    let mut normalized = String::with_capacity(path.len());
    let mut decoded = Vec::new();
    for (index, segment) in path.split('/').enumerate() {
        if index > 0 {
            normalized.push('/');
        }
        decoded.clear();
        percent_decode_into(&mut decoded, segment.as_bytes());
        escape_into(&mut normalized, &decoded, is_path_char);
    }
    normalized
}

/// Characters a path segment carries as they are (RFC 3986 `pchar` without `%`).
fn is_path_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&byte)
}

fn percent_decode_into(out: &mut Vec<u8>, input: &[u8]) {
    let mut index = 0;
    while index < input.len() {
        let byte = input[index];
        if byte == b'%' && index + 2 < input.len() {
            if let (Some(high), Some(low)) = (hex(input[index + 1]), hex(input[index + 2])) {
                out.push(high << 4 | low);
                index += 3;
                continue;
            }
        }
        out.push(byte);
        index += 1;
    }
}

fn hex(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|value| value as u8)
}

/// Appends `bytes` to `out`, keeping the bytes `keep` accepts (never `%`) and writing every
/// other one as `%XX`.
fn escape_into(out: &mut String, bytes: &[u8], keep: impl Fn(u8) -> bool) {
    for &byte in bytes {
        if byte != b'%' && keep(byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(request: Request<()>) -> Parts {
        request.into_parts().0
    }

    fn with_headers(values: &[&[u8]]) -> Parts {
        let mut builder = Request::post("/pay");
        for value in values {
            builder = builder.header("idempotency-key", *value);
        }
        parts(builder.body(()).unwrap())
    }

    #[test]
    fn header_keys_by_name_and_value_and_skips_missing_headers() {
        let extract = header("Idempotency-Key");
        assert_eq!(
            extract(&with_headers(&[b"abc-123"])),
            KeyDecision::Lock("idempotency-key:abc-123".into())
        );
        assert_eq!(extract(&with_headers(&[])), KeyDecision::PassUnlocked);
    }

    #[test]
    fn a_header_value_that_is_not_ascii_still_locks_and_stays_distinct() {
        let extract = header(HeaderName::from_static("idempotency-key"));
        let cafe = extract(&with_headers(&["café".as_bytes()]));
        assert_eq!(cafe, KeyDecision::Lock("idempotency-key:caf%C3%A9".into()));
        // The escaped spelling sent literally is a different value, and a different key.
        assert_ne!(extract(&with_headers(&[b"caf%C3%A9"])), cafe);
    }

    #[test]
    fn a_repeated_header_is_refused() {
        let extract = header("idempotency-key");
        assert!(matches!(
            extract(&with_headers(&[b"a", b"b"])),
            KeyDecision::Refuse(_)
        ));
    }

    #[test]
    fn an_invalid_header_name_is_an_error_or_a_documented_panic() {
        assert!(try_header("bad header").is_err());
        let caught = std::panic::catch_unwind(|| header("bad header"));
        assert!(caught.is_err());
    }

    #[test]
    fn path_and_method_keys_are_normalised() {
        let request = parts(Request::put("/orders/%37?x=1").body(()).unwrap());
        assert_eq!(path()(&request), "/orders/7");
        assert_eq!(method_and_path()(&request), "PUT /orders/7");
    }

    #[test]
    fn spellings_of_one_path_normalise_alike_and_different_paths_differ() {
        let same = [
            ("/orders/%34%32/pay", "/orders/42/pay"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%21b", "/a!b"),
            ("/a%7eb", "/a~b"),
        ];
        for (left, right) in same {
            assert_eq!(
                normalize_path(left),
                normalize_path(right),
                "{left} {right}"
            );
        }
        let different = [
            ("/a%2Fb", "/a/b"),
            ("/orders/42/", "/orders/42"),
            ("//x", "/x"),
            ("/A", "/a"),
        ];
        for (left, right) in different {
            assert_ne!(
                normalize_path(left),
                normalize_path(right),
                "{left} {right}"
            );
        }
        // Broken escapes stay as the literal characters axum's Path would give.
        assert_eq!(normalize_path("/%zz"), normalize_path("/%25zz"));
        assert_eq!(normalize_path("/a%"), normalize_path("/a%25"));
        assert_eq!(normalize_path("/%"), "/%25");
    }

    #[test]
    fn every_return_type_the_docs_promise_converts() {
        assert_eq!("global".into_lock_key(), KeyDecision::Lock("global".into()));
        assert_eq!(
            Cow::Borrowed("a").into_lock_key(),
            KeyDecision::Lock("a".into())
        );
        assert_eq!(
            String::from("b").into_lock_key(),
            KeyDecision::Lock("b".into())
        );
        assert_eq!(None::<String>.into_lock_key(), KeyDecision::PassUnlocked);
        assert_eq!(Some("c").into_lock_key(), KeyDecision::Lock("c".into()));
    }
}
