//! The operations endpoint of `serve`: `/metrics`, `/healthz` and `/readyz` over plain
//! HTTP/1 on `metrics.listen`.
//!
//! - `/metrics`: the process's [`metrics`](crate::metrics) in the Prometheus text format.
//! - `/healthz`: 200 whenever the runtime answers at all: a wedged runtime does not, and is
//!   restarted.
//! - `/readyz`: 200 once NATS is connected and the initial plugin routes are loaded, until
//!   the first SIGTERM; otherwise 503 with the reason as one line of text. A draining host
//!   stays up (it serves metrics while its jobs finish) but asks for no traffic.
//!
//! The endpoint runs until the process exits, through the grace period.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::catalogue::Catalogue;
use crate::metrics::metrics;

/// A client that sends no complete request head within this is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics and probes on {address} (metrics.listen): {source}")]
pub struct BindError {
    pub address: SocketAddr,
    pub source: std::io::Error,
}

/// What `/readyz` reports, set by the parts of the host it depends on.
pub struct Readiness {
    shutdown: CancellationToken,
    nats: OnceLock<async_nats::Client>,
    routes_loaded: AtomicBool,
}

impl Readiness {
    /// Not ready until NATS connects and the routes load; draining once `shutdown` is
    /// cancelled.
    pub fn new(shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            shutdown,
            nats: OnceLock::new(),
            routes_loaded: AtomicBool::new(false),
        })
    }

    /// The host's NATS client has connected; from now on its connection state counts.
    pub fn nats_connected(&self, client: &async_nats::Client) {
        self.nats.set(client.clone()).ok();
    }

    /// Every catalogue source delivered its first view and those versions loaded or were
    /// refused.
    pub fn routes_loaded(&self) {
        self.routes_loaded.store(true, Ordering::SeqCst);
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.shutdown.is_cancelled() {
            return Err("draining: shutting down after SIGTERM");
        }
        match self.nats.get().map(|client| client.connection_state()) {
            Some(async_nats::connection::State::Connected) => {}
            Some(_) => return Err("NATS is not connected"),
            None => return Err("NATS has not connected yet"),
        }
        if !self.routes_loaded.load(Ordering::SeqCst) {
            return Err("plugin routes are not loaded yet");
        }
        Ok(())
    }
}

/// Binds the endpoint's address, so that `serve` fails at once when it is taken.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BindError { address, source })
}

/// Answers requests on `listener` until the process exits.
pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>, catalogue: Arc<Catalogue>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %error, "Metrics endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let readiness = readiness.clone();
        let catalogue = catalogue.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let response = respond(&request, &readiness, &catalogue);
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "Metrics endpoint connection ended with an error");
            }
        });
    }
}

fn respond(
    request: &Request<Incoming>,
    readiness: &Readiness,
    catalogue: &Catalogue,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            let body = metrics().encode(Some(catalogue));
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                ),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
