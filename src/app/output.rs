//! Where `play` puts the stream: a writer (stdout, a file) or a local HTTP server that any number
//! of local players can open at any time.
//!
//! Every output goes through a [`Gate`]: it starts a player at a random-access chunk and puts
//! the stream header (Ogg header pages, an fMP4 initialisation segment) in front of it, exactly
//! once, whether the header came with the channel information or in-band as a chunk.
//!
//! The HTTP server is a handler on the HTTP layer (hyper): `GET` (or `HEAD`) on any path
//! answers `200` and the stream, with no length: chunked to an HTTP/1.1 player, until the
//! connection closes to an HTTP/1.0 one (old hardware radios), as Icecast answers. A player
//! that asks for ICY metadata (`Icy-MetaData: 1`) also gets the channel's title in band
//! ([`super::icy`]).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use tokio::sync::mpsc::{self, error::TrySendError};

use super::http::{self, Handler, HttpLimits, HttpServer};
use super::icy::{self, Icy};
use crate::stream::ChunkFlags;

/// Decides, chunk by chunk, what one player receives.
#[derive(Debug, Default)]
pub struct Gate {
    /// The newest stream header known.
    header: Option<Bytes>,
    /// The header last written, and whether stream data followed it.
    written_header: Option<Bytes>,
    data_since_header: bool,
    started: bool,
}

impl Gate {
    /// A gate for a player that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A stream header arrived with the channel information.
    pub fn set_header(&mut self, header: Bytes) {
        self.header = Some(header);
    }

    /// Whether anything has been let through.
    pub fn started(&self) -> bool {
        self.started
    }

    /// What to write for one chunk, in order: nothing (a player cannot start here, or the
    /// header was just written), the chunk, or the stream header and then the chunk.
    pub fn admit(&mut self, flags: ChunkFlags, chunk: Bytes) -> Vec<Bytes> {
        if flags.contains(ChunkFlags::STREAM_HEADER) {
            self.header = Some(chunk.clone());
            if self.written_header.as_ref() == Some(&chunk) && !self.data_since_header {
                return Vec::new();
            }
            self.started = true;
            self.written_header = Some(chunk.clone());
            self.data_since_header = false;
            return vec![chunk];
        }
        let mut out = Vec::with_capacity(2);
        if !self.started {
            if !flags.contains(ChunkFlags::RANDOM_ACCESS) {
                return out;
            }
            self.started = true;
            if let Some(header) = &self.header
                && self.written_header.as_ref() != Some(header)
            {
                self.written_header = Some(header.clone());
                out.push(header.clone());
            }
        }
        self.data_since_header = true;
        out.push(chunk);
        out
    }
}

/// The content type of a stream that starts with `head`.
pub fn sniff_content_type(head: &[u8]) -> &'static str {
    let find = |needle: &[u8]| head.windows(needle.len()).any(|w| w == needle);
    if head.starts_with(b"OggS") {
        if find(b"\x80theora") {
            "video/ogg"
        } else if find(b"OpusHead") || find(b"\x01vorbis") || find(b"\x7fFLAC") {
            "audio/ogg"
        } else {
            "application/ogg"
        }
    } else if head.get(4..8) == Some(b"ftyp") {
        "video/mp4"
    } else if head.first() == Some(&0x47) && head.get(188) == Some(&0x47) {
        "video/mp2t"
    } else if head.starts_with(b"ID3")
        || (head.len() >= 2 && head[0] == 0xff && head[1] & 0xe6 == 0xe2)
    {
        "audio/mpeg"
    } else if head.len() >= 2 && head[0] == 0xff && head[1] & 0xf6 == 0xf0 {
        "audio/aac"
    } else if head.starts_with(&[0x1a, 0x45, 0xdf, 0xa3]) {
        "video/webm"
    } else {
        "application/octet-stream"
    }
}

/// Chunks a slow HTTP player may have queued before it is dropped (about a minute at 4 chunks
/// per second).
const CLIENT_QUEUE: usize = 256;
/// A new player starts at the newest random-access chunk, from a backlog of at most this much.
const MAX_BACKLOG: usize = 16 * 1024 * 1024;
/// How long a player that connects before the first chunk waits for it.
const FIRST_CHUNK_WAIT: Duration = Duration::from_secs(10);

/// What goes to one HTTP player.
#[derive(Debug, Clone)]
enum Item {
    Chunk(ChunkFlags, Bytes),
    /// What plays from the next chunk on.
    Title(Arc<str>),
}

#[derive(Debug, Default)]
struct Hub {
    header: Option<Bytes>,
    /// What plays now, for players that join.
    title: Option<Arc<str>>,
    /// From the newest random-access chunk on.
    backlog: Vec<(ChunkFlags, Bytes)>,
    backlog_bytes: usize,
    content_type: Option<&'static str>,
    clients: Vec<mpsc::Sender<Item>>,
    /// Players dropped for falling a whole queue behind.
    dropped: u64,
    /// The source finished the broadcast, and nothing has come since.
    ended: bool,
}

/// A local HTTP server that streams the channel to every player that opens it.
#[derive(Debug, Clone)]
pub struct HttpOutput {
    hub: Arc<Mutex<Hub>>,
    addr: SocketAddr,
    /// Serves the players until the last clone is dropped.
    _server: Arc<HttpServer>,
}

impl HttpOutput {
    /// Listens on `addr` and serves players from an HTTP thread.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = crate::app::accept::listen(addr)?;
        let addr = listener.local_addr()?;
        let hub = Arc::new(Mutex::new(Hub::default()));
        let server = HttpServer::start()?;
        let served = Arc::clone(&hub);
        let handler: Handler = Arc::new(move |request, _remote| {
            let (parts, _) = request.into_parts();
            // Icecast's clients ask for metadata with this header; only "1" means yes.
            let icy = parts
                .headers
                .get("icy-metadata")
                .is_some_and(|v| v.as_bytes().trim_ascii() == b"1");
            Box::pin(answer(Arc::clone(&served), parts.method, icy))
        });
        server.serve(listener, handler, HttpLimits::default())?;
        Ok(Self {
            hub,
            addr,
            _server: Arc::new(server),
        })
    }

    /// The address players open.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Players connected now.
    pub fn players(&self) -> usize {
        self.lock().clients.len()
    }

    /// A stream header arrived with the channel information.
    pub fn set_header(&self, header: Bytes) {
        let mut hub = self.lock();
        if hub.content_type.is_none() {
            hub.content_type = Some(sniff_content_type(&header));
        }
        hub.header = Some(header);
    }

    /// What plays from the next chunk on: players that asked for ICY metadata are told.
    pub fn set_title(&self, title: &str) {
        let title: Arc<str> = Arc::from(title);
        let mut hub = self.lock();
        hub.title = Some(Arc::clone(&title));
        hub.send(&Item::Title(title));
    }

    /// The source finished the broadcast: every player's stream ends once it has what it was
    /// sent (an HTTP/1.1 body's last chunk, an HTTP/1.0 connection's close), as an Icecast
    /// server ends its listeners' when a source leaves, so a player stops instead of waiting in
    /// silence. Players that come after the end are told so (`503`) until a stream starts
    /// again (a restarted source's first chunk).
    pub fn end(&self) {
        let mut hub = self.lock();
        hub.ended = true;
        hub.clients.clear();
        hub.backlog.clear();
        hub.backlog_bytes = 0;
    }

    /// Passes one chunk to every player, dropping those that fell too far behind.
    pub fn chunk(&self, flags: ChunkFlags, chunk: &Bytes) {
        let mut hub = self.lock();
        hub.ended = false;
        if hub.content_type.is_none() {
            hub.content_type = Some(sniff_content_type(chunk));
        }
        if flags.contains(ChunkFlags::STREAM_HEADER) {
            hub.header = Some(chunk.clone());
            hub.backlog.clear();
            hub.backlog_bytes = 0;
        } else if flags.contains(ChunkFlags::RANDOM_ACCESS) {
            hub.backlog.clear();
            hub.backlog_bytes = chunk.len();
            hub.backlog.push((flags, chunk.clone()));
        } else if !hub.backlog.is_empty() && hub.backlog_bytes + chunk.len() <= MAX_BACKLOG {
            hub.backlog_bytes += chunk.len();
            hub.backlog.push((flags, chunk.clone()));
        }
        hub.send(&Item::Chunk(flags, chunk.clone()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        lock(&self.hub)
    }
}

impl Hub {
    /// Queues `item` for every player, dropping those that fell too far behind.
    fn send(&mut self, item: &Item) {
        let before = self.clients.len();
        self.clients
            .retain(|client| match client.try_send(item.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!("an HTTP player fell a minute behind; dropping it");
                    false
                }
                Err(TrySendError::Closed(_)) => false,
            });
        self.dropped += (before - self.clients.len()) as u64;
    }
}

fn lock(hub: &Mutex<Hub>) -> std::sync::MutexGuard<'_, Hub> {
    hub.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Answers one player's request: once the content type is known (the first chunk came),
/// `200` and the stream until the player goes away or falls a whole queue behind; with ICY
/// metadata in it if `icy` (the player asked).
async fn answer(hub: Arc<Mutex<Hub>>, method: Method, icy: bool) -> Response<http::Body> {
    if method != Method::GET && method != Method::HEAD {
        let mut refused = http::text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        refused
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return refused;
    }
    // Wait for the first chunk, so the content type is known.
    let known = tokio::time::timeout(FIRST_CHUNK_WAIT, async {
        loop {
            if let Some(ct) = lock(&hub).content_type {
                break ct;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let ended = lock(&hub).ended;
    if ended {
        let mut over = http::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broadcast has ended; try again later\n",
        );
        over.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        return over;
    }
    let Ok(content_type) = known.await else {
        let mut unavailable = http::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no stream data yet; try again\n",
        );
        unavailable
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        return unavailable;
    };
    let body = if method == Method::HEAD {
        http::full(Bytes::new())
    } else {
        GatedBody {
            rx: register(&hub),
            gate: Gate::new(),
            pending: VecDeque::new(),
            icy: icy.then(Icy::new),
        }
        .boxed()
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    if icy {
        headers.insert("icy-metaint", HeaderValue::from(icy::METAINT));
    }
    response
}

/// One player's stream: the chunks queued for it, each through its own [`Gate`].
struct GatedBody {
    rx: mpsc::Receiver<Item>,
    gate: Gate,
    pending: VecDeque<Bytes>,
    /// The player asked for ICY metadata.
    icy: Option<Icy>,
}

impl http_body::Body for GatedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(part) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(part))));
            }
            match std::task::ready!(this.rx.poll_recv(cx)) {
                // Dropped from the hub: the stream ends.
                None => return Poll::Ready(None),
                Some(Item::Chunk(flags, chunk)) => {
                    let parts = this.gate.admit(flags, chunk);
                    match &mut this.icy {
                        Some(icy) => {
                            for part in parts {
                                icy.interleave(part, &mut this.pending);
                            }
                        }
                        None => this.pending.extend(parts),
                    }
                }
                Some(Item::Title(title)) => {
                    if let Some(icy) = &mut this.icy {
                        icy.set_title(&title);
                    }
                }
            }
        }
    }
}

/// Adds a player: it gets the header and the backlog from the newest random-access chunk
/// first, then every chunk as it comes.
fn register(hub: &Mutex<Hub>) -> mpsc::Receiver<Item> {
    let (tx, rx) = mpsc::channel(CLIENT_QUEUE + 1024);
    let mut hub = lock(hub);
    if let Some(title) = &hub.title {
        let _ = tx.try_send(Item::Title(Arc::clone(title)));
    }
    if let Some(header) = &hub.header {
        let _ = tx.try_send(Item::Chunk(ChunkFlags::STREAM_HEADER, header.clone()));
    }
    for (flags, chunk) in &hub.backlog {
        let _ = tx.try_send(Item::Chunk(*flags, chunk.clone()));
    }
    hub.clients.push(tx);
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    const RA: ChunkFlags = ChunkFlags::RANDOM_ACCESS;
    const HDR: ChunkFlags = ChunkFlags::STREAM_HEADER;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn gate_starts_at_random_access_with_the_header_first() {
        let mut g = Gate::new();
        g.set_header(b("H"));
        assert!(g.admit(ChunkFlags::empty(), b("x")).is_empty());
        assert!(!g.started());
        assert_eq!(g.admit(RA, b("a")), [b("H"), b("a")]);
        assert_eq!(g.admit(ChunkFlags::empty(), b("b")), [b("b")]);
        // A new header in-band (an encoder restart) goes out where it is.
        assert_eq!(g.admit(HDR, b("H2")), [b("H2")]);
        assert_eq!(g.admit(RA, b("c")), [b("c")]);
    }

    #[test]
    fn gate_writes_a_header_once_when_it_also_comes_in_band() {
        // The header from the channel information, then the same header as a chunk.
        let mut g = Gate::new();
        g.set_header(b("H"));
        assert_eq!(g.admit(HDR, b("H")), [b("H")]);
        assert_eq!(g.admit(RA, b("a")), [b("a")]);
        // A player registered with the header queued first, then the in-band copy.
        let mut g = Gate::new();
        assert_eq!(g.admit(HDR, b("H")), [b("H")]);
        assert!(g.admit(HDR, b("H")).is_empty());
        assert_eq!(g.admit(RA, b("a")), [b("a")]);
        // The same header again after data is a real repeat (a restarted encoder).
        assert_eq!(g.admit(HDR, b("H")), [b("H")]);
        // No header known: data passes from the first random-access chunk.
        let mut g = Gate::new();
        assert_eq!(g.admit(RA, b("a")), [b("a")]);
    }

    #[test]
    fn content_types_are_recognised() {
        let mut ts = vec![0u8; 400];
        ts[0] = 0x47;
        ts[188] = 0x47;
        assert_eq!(sniff_content_type(&ts), "video/mp2t");
        assert_eq!(
            sniff_content_type(b"OggS\0\x02.......\x01vorbis..."),
            "audio/ogg"
        );
        assert_eq!(sniff_content_type(b"OggS\0\x02....OpusHead"), "audio/ogg");
        assert_eq!(sniff_content_type(b"OggS\0\x02....\x80theora"), "video/ogg");
        assert_eq!(sniff_content_type(b"\0\0\0\x18ftypiso5"), "video/mp4");
        assert_eq!(sniff_content_type(b"ID3\x04"), "audio/mpeg");
        assert_eq!(sniff_content_type(&[0xff, 0xfb, 0x90, 0x64]), "audio/mpeg");
        assert_eq!(sniff_content_type(&[0xff, 0xf1, 0x50, 0x80]), "audio/aac");
        assert_eq!(sniff_content_type(b"hello"), "application/octet-stream");
    }

    #[test]
    fn http_players_get_the_header_and_start_at_random_access() {
        use std::io::{Read, Write};
        let out = HttpOutput::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        out.chunk(HDR, &b("OggS-header|"));
        out.chunk(RA, &b("a|"));
        out.chunk(ChunkFlags::empty(), &b("b|"));
        let get = |out: &HttpOutput, request: &str| {
            let mut c = std::net::TcpStream::connect(out.local_addr()).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(request.as_bytes()).unwrap();
            c
        };
        let wait_for = |out: &HttpOutput, players: usize| {
            for _ in 0..500 {
                if out.players() == players {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(out.players(), players);
        };
        // An old radio's HTTP/1.0 request, and a current player's HTTP/1.1 one.
        let mut early = get(&out, "GET / HTTP/1.0\r\n\r\n");
        wait_for(&out, 1);
        out.chunk(ChunkFlags::empty(), &b("c|"));
        out.chunk(RA, &b("d|"));
        let mut late = get(&out, "GET /any HTTP/1.1\r\nHost: x\r\n\r\n");
        wait_for(&out, 2);
        out.chunk(ChunkFlags::empty(), &b("e|"));
        let read_upto = |c: &mut std::net::TcpStream, end: &str| {
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            while !String::from_utf8_lossy(&got).contains(end) {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            String::from_utf8(got).unwrap()
        };
        let early = read_upto(&mut early, "e|");
        let late = read_upto(&mut late, "e|\r\n");
        let (early_head, early_body) = early.split_once("\r\n\r\n").unwrap();
        assert!(early_head.starts_with("HTTP/1.0 200 OK\r\n"), "{early}");
        assert!(
            early_head.contains("Content-Type: application/ogg"),
            "{early}"
        );
        assert!(!early_head.contains("Transfer-Encoding"), "{early}");
        // Close-delimited: the body is the stream itself.
        assert_eq!(early_body, "OggS-header|a|b|c|d|e|");
        let (late_head, late_body) = late.split_once("\r\n\r\n").unwrap();
        assert!(late_head.starts_with("HTTP/1.1 200 OK\r\n"), "{late}");
        assert!(late_head.contains("Transfer-Encoding: chunked"), "{late}");
        // One HTTP chunk per part the gate let through.
        assert_eq!(late_body, "C\r\nOggS-header|\r\n2\r\nd|\r\n2\r\ne|\r\n");
        let mut refused = get(
            &out,
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        );
        let refused = read_upto(&mut refused, "\r\n\r\n");
        assert!(refused.starts_with("HTTP/1.1 405"), "{refused}");
        assert!(refused.contains("Allow: GET, HEAD"), "{refused}");
        let mut malformed = get(&out, "GET / HTTP/1.1\r\nno colon here\r\n\r\n");
        let malformed = read_upto(&mut malformed, "\r\n");
        assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    }
}
