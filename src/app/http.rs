//! The one HTTP layer every listener of a node uses: hyper 1 (HTTP/1.1) on a current-thread
//! tokio runtime in a thread of its own per [`HttpServer`], off the data-plane cores (each
//! endpoint starts its own, so a slow scrape never delays an encoder or a player). The admin
//! listener and the players' HTTP output are handlers on it; the Icecast source endpoint
//! is a takeover handler ([`HttpServer::serve_takeover`]): hyper reads and answers its one
//! request, then the connection, whose stream follows the head unframed, is handed over.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

/// A response body: whole, or streamed.
pub type Body = BoxBody<Bytes, io::Error>;

/// A handler's answer, produced on the HTTP thread.
pub type Reply = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// What answers a listener's requests.
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> Reply + Send + Sync>;

/// What takes a connection over once its answer is written: the connection (blocking), and
/// the bytes already read past the request head. Dropped unrun when the answer could not be
/// written.
pub type Takeover = Box<dyn FnOnce(std::net::TcpStream, Bytes) + Send>;

/// A takeover handler's answer: the response, and what then takes the connection over
/// (`None`: the connection closes after the response).
pub type TakeoverReply = Pin<Box<dyn Future<Output = (Response<Body>, Option<Takeover>)> + Send>>;

/// What answers the one request of each connection of a takeover listener.
pub type TakeoverHandler =
    Arc<dyn Fn(Request<Incoming>, SocketAddr) -> TakeoverReply + Send + Sync>;

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
        self.listen(listener, Mode::Requests(handler), limits)
    }

    /// Serves `listener` one request per connection with `handler`, whose answer may take
    /// the connection over once it is written: for a request whose body HTTP cannot frame
    /// (an Icecast source's stream follows its head unframed, which HTTP/1.1 reads as no
    /// body at all). Returns the listener's counters.
    pub fn serve_takeover(
        &self,
        listener: TcpListener,
        handler: TakeoverHandler,
        limits: HttpLimits,
    ) -> io::Result<Arc<HttpStats>> {
        self.listen(listener, Mode::Takeover(handler), limits)
    }

    fn listen(
        &self,
        listener: TcpListener,
        mode: Mode,
        limits: HttpLimits,
    ) -> io::Result<Arc<HttpStats>> {
        listener.set_nonblocking(true)?;
        let stats = Arc::new(HttpStats::default());
        let _guard = self.handle.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        self.handle
            .spawn(accept_loop(listener, mode, limits, Arc::clone(&stats)));
        Ok(stats)
    }

    /// Keeps the HTTP thread and its listeners running until the process exits (for a
    /// listener that serves as long as the node runs, with no owner to drop it).
    pub fn keep_for_process(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // The thread stops when this sender is sent to or dropped; it is neither.
            std::mem::forget(shutdown);
        }
        self.thread.take();
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

/// What a listener does with each connection.
enum Mode {
    /// Requests answered by a handler, kept alive between requests.
    Requests(Handler),
    /// One request per connection, whose answer may take the connection over.
    Takeover(TakeoverHandler),
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    mode: Mode,
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
            let refused = stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    limit = limits.max_connections,
                    refused,
                    "HTTP connections beyond the limit closed at accept"
                );
            }
            drop(stream);
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_head_bytes.max(8192))
            // `Content-Type`, not `content-type`: some hardware radios match header names
            // exactly, as they were written before HTTP/2 lowered them.
            .title_case_headers(true);
        match &mode {
            Mode::Requests(handler) => {
                let handler = Arc::clone(handler);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let reply = handler(req, remote);
                        async move { Ok::<_, Infallible>(reply.await) }
                    });
                    let served = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(err) = served {
                        tracing::debug!(%err, %remote, "HTTP connection ended");
                    }
                    drop(permit);
                });
            }
            Mode::Takeover(handler) => {
                let handler = Arc::clone(handler);
                tokio::spawn(serve_takeover(builder, stream, remote, handler, permit));
            }
        }
    }
}

/// Serves one request on `stream`, then hands the connection, with whatever hyper read
/// beyond the request head, to the takeover the handler returned (on a thread of its own).
async fn serve_takeover(
    mut builder: hyper::server::conn::http1::Builder,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    handler: TakeoverHandler,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let taken: Arc<std::sync::Mutex<Option<Takeover>>> = Arc::default();
    let slot = Arc::clone(&taken);
    let service = service_fn(move |req| {
        let reply = handler(req, remote);
        let slot = Arc::clone(&slot);
        async move {
            let (response, takeover) = reply.await;
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = takeover;
            Ok::<_, Infallible>(response)
        }
    });
    // Not kept alive: after its answer the connection is the takeover's, or closed.
    let served = builder
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .without_shutdown()
        .await;
    let takeover = taken.lock().unwrap_or_else(PoisonError::into_inner).take();
    let parts = match served {
        Ok(parts) => parts,
        Err(err) => {
            tracing::debug!(%err, %remote, "HTTP connection ended");
            return;
        }
    };
    let Some(takeover) = takeover else { return };
    let handed = parts.io.into_inner().into_std().and_then(|conn| {
        conn.set_nonblocking(false)?;
        let read_buf = parts.read_buf;
        std::thread::Builder::new()
            .name("gridcast-http-takeover".into())
            .spawn(move || {
                takeover(conn, read_buf);
                drop(permit);
            })
            .map(drop)
    });
    if let Err(err) = handed {
        tracing::warn!(%err, %remote, "could not hand an HTTP connection over");
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    fn connect(addr: SocketAddr) -> TcpStream {
        let c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    fn read_all(c: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    }

    #[test]
    fn connections_beyond_the_limit_are_closed_at_accept_and_a_freed_place_is_taken_again() {
        let server = HttpServer::start().unwrap();
        let listener = crate::app::accept::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|_, _| Box::pin(async { text(StatusCode::OK, "hello\n") }));
        let limits = HttpLimits {
            max_connections: 2,
            ..HttpLimits::default()
        };
        let stats = server.serve(listener, handler, limits).unwrap();
        // Two idle connections hold both places; the third is closed unanswered.
        let idle = [connect(addr), connect(addr)];
        for _ in 0..500 {
            if stats.accepted.load(Ordering::Relaxed) == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut third = connect(addr);
        let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(read_all(&mut third), "");
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
        drop(idle);
        // Freed places are taken again (the close may take a moment to be seen).
        let mut answered = String::new();
        for _ in 0..100 {
            let mut c = connect(addr);
            let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            answered = read_all(&mut c);
            if !answered.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(answered.starts_with("HTTP/1.1 200 OK\r\n"), "{answered}");
        assert!(answered.ends_with("hello\n"), "{answered}");
    }

    #[test]
    fn a_takeover_gets_the_connection_and_the_bytes_read_past_the_head() {
        let server = HttpServer::start().unwrap();
        let listener = crate::app::accept::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let tx = std::sync::Mutex::new(tx);
        let handler: TakeoverHandler = Arc::new(move |request, _| {
            if request.uri().path() != "/take" {
                return Box::pin(async { (text(StatusCode::NOT_FOUND, "no\n"), None) });
            }
            let tx = tx.lock().unwrap().clone();
            let takeover: Takeover = Box::new(move |mut conn, early| {
                let mut got = early.to_vec();
                let _ = conn.read_to_end(&mut got);
                let _ = tx.send(got);
            });
            Box::pin(async move { (text(StatusCode::OK, ""), Some(takeover)) })
        });
        server
            .serve_takeover(listener, handler, HttpLimits::default())
            .unwrap();
        // The unframed body follows the head in the same write, so hyper reads some of it.
        let mut c = connect(addr);
        c.write_all(b"PUT /take HTTP/1.1\r\nHost: x\r\n\r\nfirst|")
            .unwrap();
        let mut head = [0u8; 17];
        c.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200 OK\r\n");
        c.write_all(b"second|").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got, b"first|second|");
        // Refused: answered and closed, nothing taken over.
        let mut c = connect(addr);
        c.write_all(b"PUT /other HTTP/1.1\r\nHost: x\r\n\r\nbody")
            .unwrap();
        assert!(read_all(&mut c).starts_with("HTTP/1.1 404"));
        assert!(rx.try_recv().is_err());
    }
}
