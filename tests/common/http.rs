//! A real axum server on a loopback port and a real HTTP/1.1 client for the layer tests.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Serves `app` on 127.0.0.1 on a free port until the test's runtime ends.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(
    client: &HttpClient,
    address: SocketAddr,
    method: &str,
    path: &str,
) -> Response<Incoming> {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"))
        .body(Empty::new())
        .unwrap();
    client.request(request).await.expect("the server answers")
}

/// Sends a request and reads the whole answer.
pub async fn fetch(
    client: &HttpClient,
    address: SocketAddr,
    path: &str,
) -> (StatusCode, http::HeaderMap, String) {
    let response = send(client, address, "POST", path).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("a complete body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// A key extractor that locks `{prefix}{path}`, so that tests sharing a server never collide.
pub fn prefixed_path(
    prefix: &str,
) -> impl Fn(&http::request::Parts) -> String + Send + Sync + 'static {
    let prefix = prefix.to_owned();
    move |req| format!("{prefix}{}", req.uri.path())
}
