//! What a [`LockLayer`](super::LockLayer) was configured with, shared by its services.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode};

use super::Rejection;

pub(crate) type KeyExtractor = dyn Fn(&Parts) -> Option<String> + Send + Sync;
pub(crate) type Responder = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;

#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) extractor: Arc<KeyExtractor>,
    pub(crate) wait: bool,
    pub(crate) conflict_status: StatusCode,
    pub(crate) fail_open: bool,
    pub(crate) retry_after: Duration,
    pub(crate) responder: Option<Arc<Responder>>,
}

impl Settings {
    pub(crate) fn new(extractor: Arc<KeyExtractor>) -> Self {
        Settings {
            extractor,
            wait: false,
            conflict_status: StatusCode::CONFLICT,
            fail_open: false,
            retry_after: Duration::from_secs(1),
            responder: None,
        }
    }

    /// The response for a refused request: the custom responder's, or the default one.
    pub(crate) fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        match &self.responder {
            Some(responder) => responder(rejection),
            None => rejection.default_response(),
        }
    }
}
