//! The one HTTP layer every listener of a node shares: hyper 1 (HTTP/1.1) on a
//! current-thread tokio runtime of its own thread, off the data-plane cores. The admin
//! listener is a handler on it. The Icecast source endpoint and the players' HTTP output
//! parse their request heads with [`RequestHead`] (httparse, hyper's parser) on threads of
//! their own, bounded by `app::accept` (why they are not on hyper: ARCHITECTURE.md).
//!
//! Bad input is bounded here, once for all of them: a request head must arrive within
//! [`HttpLimits::header_timeout`] and fit [`HttpLimits::max_head_bytes`] (hyper answers 431
//! or closes), a connection idle between requests is closed, and at most
//! [`HttpLimits::max_connections`] are served at once (more are closed at accept, counted).
//! An idle connection costs a parked task, so a thousand of them stop nobody.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, mpsc};

/// A response body: whole, or streamed.
pub type Body = BoxBody<Bytes, io::Error>;

/// A handler's answer, produced on the HTTP thread.
pub type Reply = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// What answers a listener's requests.
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> Reply + Send + Sync>;

/// Limits on what a client may make a listener hold.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Time for a request head to arrive (also the idle time allowed between requests).
    pub header_timeout: Duration,
    /// Largest request head (request line and headers).
    pub max_head_bytes: usize,
    /// Most connections served at once.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(5),
            max_head_bytes: 16 * 1024,
            max_connections: 4096,
        }
    }
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections accepted and served.
    pub accepted: AtomicU64,
    /// Connections closed at accept because the limit was reached.
    pub refused: AtomicU64,
    /// Accept calls that failed (out of file descriptors, say).
    pub accept_errors: AtomicU64,
}

/// The HTTP thread and its runtime; listeners stop when it is dropped.
#[derive(Debug)]
pub struct HttpServer {
    handle: tokio::runtime::Handle,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Starts the HTTP thread.
    pub fn start() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let handle = runtime.handle().clone();
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("gridcast-http".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Open connections go with the runtime.
                runtime.shutdown_timeout(Duration::from_millis(200));
            })?;
        Ok(Self {
            handle,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Serves `listener` with `handler` until the server stops; returns its counters.
    pub fn serve(
        &self,
        listener: TcpListener,
        handler: Handler,
        limits: HttpLimits,
    ) -> io::Result<Arc<HttpStats>> {
        listener.set_nonblocking(true)?;
        let stats = Arc::new(HttpStats::default());
        let counters = Arc::clone(&stats);
        let _guard = self.handle.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        self.handle
            .spawn(accept_loop(listener, handler, limits, counters));
        Ok(stats)
    }

    /// The runtime, for handlers that start tasks of their own.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    handler: Handler,
    limits: HttpLimits,
    stats: Arc<HttpStats>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%err, "HTTP accept failed");
                // Out of descriptors: let some go before trying again.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let reply = handler(req, remote);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_head_bytes.max(8192))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(%err, %remote, "HTTP connection ended");
            }
            drop(permit);
        });
    }
}

/// A whole response body.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A response with `status`, a plain-text `text` body.
pub fn text(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(full(text.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A body streamed from a channel: every `Bytes` sent is a data frame; the body ends when
/// the sender is dropped.
pub fn streamed(rx: mpsc::Receiver<Bytes>) -> Body {
    ChannelBody { rx }.boxed()
}

struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|next| next.map(|data| Ok(Frame::data(data))))
    }
}

/// A request head parsed by `httparse` (the parser hyper uses), for the two endpoints whose
/// requests carry an unframed body or want an unframed answer (see [`crate::app::icecast`]
/// and [`crate::app::output`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method, as sent (`GET`, `PUT`, `SOURCE`).
    pub method: String,
    /// The path, without its query.
    pub path: String,
    /// The headers: lower-case names, values as sent (those that are not UTF-8 are left
    /// out).
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// Parses a complete head (request line and headers up to the blank line).
    pub fn parse(head: &[u8]) -> io::Result<Self> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut slots);
        match request.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(bad("an unfinished request head".into())),
            Err(e) => return Err(bad(format!("a malformed request head: {e}"))),
        }
        let path = request.path.unwrap_or("");
        Ok(Self {
            method: request.method.unwrap_or("").to_owned(),
            path: path.split('?').next().unwrap_or("").to_owned(),
            headers: request
                .headers
                .iter()
                .filter_map(|h| {
                    let value = std::str::from_utf8(h.value).ok()?;
                    Some((h.name.to_ascii_lowercase(), value.trim().to_owned()))
                })
                .collect(),
        })
    }

    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}
