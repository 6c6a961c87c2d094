//! Where `play` puts the stream: a writer (stdout, a file) or a local HTTP server that any number
//! of local players can open at any time.
//!
//! Every output goes through a [`Gate`]: it starts a player at a random-access chunk and puts
//! the stream header (Ogg header pages, an fMP4 initialisation segment) in front of it, exactly
//! once, whether the header came with the channel information or in-band as a chunk.
//!
//! The HTTP server answers the way an Icecast server answers its listeners: `HTTP/1.0 200`
//! and the stream until the connection closes, which every player and old hardware radio
//! reads. Its request heads are parsed by `httparse`; it does not run on hyper (as the admin
//! listener does) because hyper answers an HTTP/1.1 request without a length in chunked
//! encoding. A thread serves each player.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use bytes::Bytes;

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

#[derive(Debug, Default)]
struct Hub {
    header: Option<Bytes>,
    /// From the newest random-access chunk on.
    backlog: Vec<(ChunkFlags, Bytes)>,
    backlog_bytes: usize,
    content_type: Option<&'static str>,
    clients: Vec<SyncSender<(ChunkFlags, Bytes)>>,
    /// Players dropped for falling a whole queue behind.
    dropped: u64,
}

/// A local HTTP server that streams the channel to every player that opens it.
#[derive(Debug, Clone)]
pub struct HttpOutput {
    hub: Arc<Mutex<Hub>>,
    addr: SocketAddr,
}

impl HttpOutput {
    /// Listens on `addr` and serves players from a background thread.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = crate::app::accept::listen(addr)?;
        let addr = listener.local_addr()?;
        let hub = Arc::new(Mutex::new(Hub::default()));
        let accept_hub = Arc::clone(&hub);
        thread::Builder::new()
            .name("http-output".into())
            .spawn(move || {
                crate::app::accept::serve_threaded(
                    &listener,
                    "http-player",
                    crate::app::accept::MAX_CONNECTIONS,
                    move |conn| serve_player(&accept_hub, conn),
                );
            })?;
        Ok(Self { hub, addr })
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

    /// Passes one chunk to every player, dropping those that fell too far behind.
    pub fn chunk(&self, flags: ChunkFlags, chunk: &Bytes) {
        let mut hub = self.lock();
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
        let before = hub.clients.len();
        hub.clients
            .retain(|client| match client.try_send((flags, chunk.clone())) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!("an HTTP player fell a minute behind; dropping it");
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
        hub.dropped += (before - hub.clients.len()) as u64;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One player's connection: reads the request, answers, then writes the stream until the
/// player goes away.
fn serve_player(hub: &Mutex<Hub>, conn: TcpStream) {
    let peer = conn.peer_addr().ok();
    if let Err(e) = serve_player_inner(hub, conn) {
        tracing::debug!(?peer, %e, "HTTP player gone");
    }
}

fn serve_player_inner(hub: &Mutex<Hub>, mut conn: TcpStream) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = read_request_head(&mut BufReader::new(&mut conn))?;
    let request = super::http::RequestHead::parse(request.as_bytes())?;
    let method = request.method.as_str();
    if method != "GET" && method != "HEAD" {
        conn.write_all(
            b"HTTP/1.0 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Length: 0\r\n\r\n",
        )?;
        return Ok(());
    }
    // Wait for the first chunk, so the content type is known.
    let mut waited = Duration::ZERO;
    let content_type = loop {
        if let Some(ct) = hub
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .content_type
        {
            break ct;
        }
        if waited >= FIRST_CHUNK_WAIT {
            conn.write_all(
                b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n",
            )?;
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
    };
    conn.write_all(
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache, no-store\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )?;
    if method == "HEAD" {
        return Ok(());
    }
    let rx = register(hub);
    let mut gate = Gate::new();
    conn.set_nodelay(true)?;
    for (flags, chunk) in rx {
        for part in gate.admit(flags, chunk) {
            conn.write_all(&part)?;
        }
    }
    Ok(())
}

/// Adds a player: it gets the header and the backlog from the newest random-access chunk
/// first, then every chunk as it comes.
fn register(hub: &Mutex<Hub>) -> Receiver<(ChunkFlags, Bytes)> {
    let (tx, rx) = mpsc::sync_channel(CLIENT_QUEUE + 1024);
    let mut hub = hub.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(header) = &hub.header {
        let _ = tx.try_send((ChunkFlags::STREAM_HEADER, header.clone()));
    }
    for (flags, chunk) in &hub.backlog {
        let _ = tx.try_send((*flags, chunk.clone()));
    }
    hub.clients.push(tx);
    rx
}

/// Longest request head accepted.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// The request line and headers, up to the blank line (at most 16 KiB). Reads nothing past it,
/// so a request body stays in `reader`. A connection that sends no complete head before its
/// read timeout fails with `TimedOut`, one that closes first with `UnexpectedEof` (neither
/// is worth more than a debug line: idle and abandoned connections are routine), an
/// oversized head with `InvalidData`.
pub(crate) fn read_request_head(reader: &mut impl BufRead) -> io::Result<String> {
    let mut head = String::new();
    loop {
        let before = head.len();
        let room = (MAX_REQUEST_HEAD - head.len()) as u64;
        let read = Read::take(&mut *reader, room)
            .read_line(&mut head)
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no complete request head within the head timeout",
                ),
                _ => e,
            })?;
        if read == 0 {
            return Err(if room == 0 {
                io::Error::new(io::ErrorKind::InvalidData, "the request head is too long")
            } else {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the request ended before its headers did",
                )
            });
        }
        if head[before..].trim_end_matches(['\r', '\n']).is_empty() {
            return Ok(head);
        }
    }
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
        let out = HttpOutput::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        out.chunk(HDR, &b("OggS-header|"));
        out.chunk(RA, &b("a|"));
        out.chunk(ChunkFlags::empty(), &b("b|"));
        let get = |out: &HttpOutput| {
            let mut c = TcpStream::connect(out.local_addr()).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            c
        };
        let mut early = get(&out);
        // Wait until it is registered, then more chunks flow.
        for _ in 0..200 {
            if out.players() == 1 {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(out.players(), 1);
        out.chunk(ChunkFlags::empty(), &b("c|"));
        out.chunk(RA, &b("d|"));
        let mut late = get(&out);
        for _ in 0..200 {
            if out.players() == 2 {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        out.chunk(ChunkFlags::empty(), &b("e|"));
        drop(out);
        let read_upto = |c: &mut TcpStream, end: &str| {
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            while !String::from_utf8_lossy(&got).ends_with(end) {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            String::from_utf8(got).unwrap()
        };
        let early = read_upto(&mut early, "e|");
        let late = read_upto(&mut late, "e|");
        assert!(early.starts_with("HTTP/1.0 200 OK\r\n"), "{early}");
        assert!(
            early.contains("Content-Type: application/ogg\r\n"),
            "{early}"
        );
        let body = |s: &str| s.split("\r\n\r\n").nth(1).unwrap().to_owned();
        assert_eq!(body(&early), "OggS-header|a|b|c|d|e|");
        assert_eq!(body(&late), "OggS-header|d|e|");
    }
}
