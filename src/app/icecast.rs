//! The Icecast-compatible source endpoint of `gridcast broadcast`: encoders that push to an
//! Icecast server (ffmpeg's `icecast://` output, BUTT, liquidsoap, ices) push to this instead,
//! unchanged.
//!
//! What an Icecast 2 server does for a source, and so what this does:
//! - `PUT /mount` (Icecast 2.4 and later) or the legacy `SOURCE /mount` (older clients), with
//!   HTTP Basic authentication (any user name, usually `source`; the password is checked);
//! - the source is answered `200 OK`, and the rest of the connection is then the stream,
//!   until the encoder disconnects;
//! - one source per mount at a time: a second one gets `403` while the first is live; after the
//!   first leaves, the next one carries the stream on (a new Ogg header is captured then);
//! - song titles: `GET /admin/metadata?mode=updinfo&mount=/mount&song=…` with the source
//!   password (what BUTT, liquidsoap, Mixxx and ices send as the song changes; `charset=`
//!   names the encoding, UTF-8 when absent and valid, else Latin-1 as Icecast assumes), and
//!   SHOUTcast's `GET /admin.cgi?mode=updinfo&pass=…&song=…`. The title is signed and
//!   carried to every listener ([`crate::wire::StreamTitle`]).
//!
//! It runs on the HTTP layer (hyper) as a takeover listener: hyper reads and bounds the
//! request head, and writes the answer; then the connection is handed to a thread that reads
//! the stream, which follows the head unframed (no `Content-Length`, no chunking) and which
//! HTTP/1.1 would read as an empty body. One difference from Icecast: an encoder that sends
//! `Expect: 100-continue` (ffmpeg does) gets the final `200 OK` instead of `100 Continue`,
//! since hyper writes no informational answer for a request without a framed body; a client
//! that waits for `100` may go on at a final `2xx` (RFC 9110, 10.1.1), and ffmpeg does.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::http::{self, HttpLimits, HttpServer, Takeover, TakeoverHandler};

/// Where encoders push, and the password they must give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceEndpoint {
    /// The mount point, starting with `/`.
    pub mount: String,
    /// The source password.
    pub password: String,
}

/// Accepts encoders on `listener`, on `server`, for as long as it runs, and passes each
/// one's stream bytes to `tx` (an encoder whose bytes nobody takes any more is let go), and
/// the song titles they set to `titles`.
pub(crate) fn serve(
    server: &HttpServer,
    listener: TcpListener,
    endpoint: SourceEndpoint,
    tx: SyncSender<io::Result<Vec<u8>>>,
    titles: SyncSender<String>,
) -> io::Result<()> {
    let endpoint = Arc::new(endpoint);
    let busy = Arc::new(AtomicBool::new(false));
    let handler: TakeoverHandler = Arc::new(move |request, remote| {
        let answer = if is_metadata(&request) {
            let gate = TitleGate {
                password: &endpoint.password,
                mount: Some(&endpoint.mount),
            };
            (metadata(&request, remote, gate, &titles), None)
        } else {
            answer(&request, remote, &endpoint, &busy, &tx)
        };
        Box::pin(async move { answer })
    });
    server.serve_takeover(listener, handler, HttpLimits::default())?;
    Ok(())
}

/// Why a source request is turned away.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Method,
    Mount,
    Auth,
    Chunked,
}

impl Refusal {
    fn response(&self) -> Response<http::Body> {
        let mut response = match self {
            Refusal::Method => {
                let mut r = http::text(StatusCode::METHOD_NOT_ALLOWED, "PUT or SOURCE only\n");
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("PUT, SOURCE"));
                r
            }
            Refusal::Mount => http::text(StatusCode::NOT_FOUND, "no such mount point\n"),
            Refusal::Auth => {
                let mut r = http::text(StatusCode::UNAUTHORIZED, "wrong or missing password\n");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"gridcast\""),
                );
                r
            }
            Refusal::Chunked => http::text(
                StatusCode::NOT_IMPLEMENTED,
                "chunked source bodies are not supported\n",
            ),
        };
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

/// Checks a source request against the endpoint.
fn check<B>(request: &Request<B>, endpoint: &SourceEndpoint) -> Result<(), Refusal> {
    let method = request.method().as_str();
    if method != "PUT" && method != "SOURCE" {
        return Err(Refusal::Method);
    }
    if request.uri().path() != endpoint.mount {
        return Err(Refusal::Mount);
    }
    if !basic_auth(request, &endpoint.password) {
        return Err(Refusal::Auth);
    }
    if request
        .headers()
        .get(header::TRANSFER_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(Refusal::Chunked);
    }
    Ok(())
}

/// Whether the request's HTTP Basic credentials give `password` (any user name).
fn basic_auth<B>(request: &Request<B>, password: &str) -> bool {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Basic "))
        .and_then(|b64| data_encoding::BASE64.decode(b64.trim_ascii()).ok())
        .and_then(|cred| {
            let colon = cred.iter().position(|&b| b == b':')?;
            Some(same(&cred[colon + 1..], password.as_bytes()))
        })
        .unwrap_or(false)
}

/// A metadata update (Icecast's or SHOUTcast's), not a source.
pub(crate) fn is_metadata<B>(request: &Request<B>) -> bool {
    request.method() == hyper::Method::GET
        && matches!(request.uri().path(), "/admin/metadata" | "/admin.cgi")
}

/// Why a metadata update is turned away.
#[derive(Debug, PartialEq, Eq)]
enum BadUpdate {
    Auth,
    Mount,
    Mode,
    NoSong,
}

/// What a title update must give: the source password, and the mount where there is one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TitleGate<'a> {
    pub(crate) password: &'a str,
    /// The Icecast input's mount; `None` on the broadcast's admin listener, whose input (stdin,
    /// a file, TCP, UDP) has no mount: there any `mount=` is taken.
    pub(crate) mount: Option<&'a str>,
}

/// The title a metadata update sets.
fn title_update<B>(request: &Request<B>, gate: TitleGate<'_>) -> Result<String, BadUpdate> {
    let query = request.uri().query().unwrap_or("").as_bytes();
    let (mut mode, mut mount, mut song, mut charset, mut pass) = (None, None, None, None, None);
    // A form-encoded query, decoded to bytes: the song may be Latin-1.
    for pair in query.split(|&b| b == b'&') {
        let (key, value) =
            pair.split_at(pair.iter().position(|&b| b == b'=').unwrap_or(pair.len()));
        let value = value.get(1..).unwrap_or_default();
        let spaced: Vec<u8> = value
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        let value: Vec<u8> = percent_encoding::percent_decode(&spaced).collect();
        let text = || String::from_utf8_lossy(&value).into_owned();
        match key {
            b"mode" => mode = Some(text()),
            b"mount" => mount = Some(text()),
            b"charset" => charset = Some(text()),
            b"pass" => pass = Some(text()),
            b"song" => song = Some(value),
            _ => {}
        }
    }
    let shoutcast = request.uri().path() == "/admin.cgi";
    let authorised = basic_auth(request, gate.password)
        || (shoutcast && pass.is_some_and(|p| same(p.as_bytes(), gate.password.as_bytes())));
    if !authorised {
        return Err(BadUpdate::Auth);
    }
    if mode.as_deref() != Some("updinfo") {
        return Err(BadUpdate::Mode);
    }
    // SHOUTcast has one stream and no mount; Icecast names it.
    if let Some(want) = gate.mount
        && !shoutcast
        && mount.as_deref() != Some(want)
    {
        return Err(BadUpdate::Mount);
    }
    let song = song.ok_or(BadUpdate::NoSong)?;
    let latin1 = |bytes: &[u8]| bytes.iter().map(|&b| char::from(b)).collect::<String>();
    Ok(match charset.map(|c| c.to_ascii_lowercase()).as_deref() {
        Some("iso-8859-1" | "latin1" | "latin-1") => latin1(&song),
        _ => String::from_utf8(song).unwrap_or_else(|e| latin1(e.as_bytes())),
    })
}

/// Answers a metadata update as Icecast does, and passes the title on.
pub(crate) fn metadata<B>(
    request: &Request<B>,
    remote: SocketAddr,
    gate: TitleGate<'_>,
    titles: &SyncSender<String>,
) -> Response<http::Body> {
    match title_update(request, gate) {
        Ok(title) => {
            tracing::info!(%remote, %title, "title set");
            match titles.try_send(title) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(%remote, "titles come faster than they are published; one was dropped");
                }
            }
            let mut ok = Response::new(http::full(Bytes::from_static(
                b"<?xml version=\"1.0\"?>\n<iceresponse><message>Metadata update successful</message><return>1</return></iceresponse>\n",
            )));
            ok.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
            ok
        }
        Err(BadUpdate::Auth) => {
            tracing::warn!(%remote, "title update refused: wrong or missing password");
            Refusal::Auth.response()
        }
        Err(bad) => {
            tracing::warn!(%remote, ?bad, "title update refused");
            let why = match bad {
                BadUpdate::Mount => "no such mount point\n",
                BadUpdate::Mode => "only mode=updinfo is supported\n",
                _ => "no song given\n",
            };
            let status = if bad == BadUpdate::Mount {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            http::text(status, why)
        }
    }
}

/// Marks the mount busy while held; frees it when dropped, also when the takeover holding
/// it never runs (the answer could not be written).
struct Live(Arc<AtomicBool>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn answer(
    request: &Request<hyper::body::Incoming>,
    remote: SocketAddr,
    endpoint: &SourceEndpoint,
    busy: &Arc<AtomicBool>,
    tx: &SyncSender<io::Result<Vec<u8>>>,
) -> (Response<http::Body>, Option<Takeover>) {
    if let Err(refusal) = check(request, endpoint) {
        tracing::warn!(%remote, ?refusal, "icecast source refused");
        return (refusal.response(), None);
    }
    if busy.swap(true, Ordering::AcqRel) {
        tracing::warn!(%remote, "icecast source refused: a source is already connected");
        return (
            http::text(StatusCode::FORBIDDEN, "Mountpoint in use\n"),
            None,
        );
    }
    let live = Live(Arc::clone(busy));
    let tx = tx.clone();
    let mount = endpoint.mount.clone();
    let takeover: Takeover = Box::new(move |conn, early| {
        tracing::info!(%mount, %remote, "icecast source connected");
        match pump(conn, &early, &tx) {
            Ok(()) => tracing::info!(%remote, "icecast source left"),
            Err(err) => tracing::warn!(%remote, %err, "icecast source failed"),
        }
        drop(live);
    });
    let mut ok = Response::new(http::full(Bytes::new()));
    ok.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    (ok, Some(takeover))
}

/// Reads the stream: the bytes read with the head first, then the connection's.
fn pump(mut conn: TcpStream, early: &[u8], tx: &SyncSender<io::Result<Vec<u8>>>) -> io::Result<()> {
    if !early.is_empty() && tx.send(Ok(early.to_vec())).is_err() {
        return Ok(());
    }
    // A live encoder may pause; one that sends nothing for a minute is gone.
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if tx.send(Ok(buf[..n].to_vec())).is_err() {
            return Ok(());
        }
    }
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> SourceEndpoint {
        SourceEndpoint {
            mount: "/live".into(),
            password: "hackme".into(),
        }
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn source_requests_are_checked() {
        let good = ("Authorization", "Basic c291cmNlOmhhY2ttZQ==");
        let ok = request("PUT", "/live", &[good, ("Expect", "100-continue")]);
        assert_eq!(check(&ok, &endpoint()), Ok(()));
        let legacy = request("SOURCE", "/live?x=1", &[good]);
        assert_eq!(check(&legacy, &endpoint()), Ok(()));
        let wrong = request(
            "PUT",
            "/live",
            &[("Authorization", "Basic c291cmNlOmhhY2ttZg==")],
        );
        assert_eq!(check(&wrong, &endpoint()), Err(Refusal::Auth));
        let not_base64 = request("PUT", "/live", &[("Authorization", "Basic !!!")]);
        assert_eq!(check(&not_base64, &endpoint()), Err(Refusal::Auth));
        let none = request("PUT", "/live", &[]);
        assert_eq!(check(&none, &endpoint()), Err(Refusal::Auth));
        let other = request("PUT", "/other", &[good]);
        assert_eq!(check(&other, &endpoint()), Err(Refusal::Mount));
        let get = request("GET", "/live", &[good]);
        assert_eq!(check(&get, &endpoint()), Err(Refusal::Method));
        let chunked = request("PUT", "/live", &[good, ("Transfer-Encoding", "chunked")]);
        assert_eq!(check(&chunked, &endpoint()), Err(Refusal::Chunked));
    }

    #[test]
    fn title_updates_are_decoded_and_checked() {
        let good = [("Authorization", "Basic c291cmNlOmhhY2ttZQ==")];
        let update = |uri: &str, headers: &[(&str, &str)]| {
            let r = request("GET", uri, headers);
            assert!(is_metadata(&r));
            let endpoint = endpoint();
            let gate = TitleGate {
                password: &endpoint.password,
                mount: Some(&endpoint.mount),
            };
            title_update(&r, gate)
        };
        // '+' is a space, %2B a plus; UTF-8 by default.
        assert_eq!(
            update(
                "/admin/metadata?mode=updinfo&mount=/live&song=AC%2FDC+%2B+caf%C3%A9",
                &good
            ),
            Ok("AC/DC + café".to_owned())
        );
        // Not UTF-8: Latin-1, as Icecast reads an MP3 mount's titles; or when charset says so.
        assert_eq!(
            update(
                "/admin/metadata?mode=updinfo&mount=/live&song=caf%E9",
                &good
            ),
            Ok("café".to_owned())
        );
        assert_eq!(
            update(
                "/admin/metadata?mode=updinfo&mount=/live&charset=ISO-8859-1&song=%C3%A9",
                &good
            ),
            Ok("Ã©".to_owned())
        );
        // SHOUTcast: the password in the query, no mount.
        assert_eq!(
            update("/admin.cgi?pass=hackme&mode=updinfo&song=x", &[]),
            Ok("x".to_owned())
        );
        assert_eq!(
            update("/admin.cgi?pass=nope&mode=updinfo&song=x", &[]),
            Err(BadUpdate::Auth)
        );
        // Icecast takes the password only as Basic credentials.
        assert_eq!(
            update(
                "/admin/metadata?pass=hackme&mode=updinfo&mount=/live&song=x",
                &[]
            ),
            Err(BadUpdate::Auth)
        );
        assert_eq!(
            update("/admin/metadata?mode=updinfo&mount=/other&song=x", &good),
            Err(BadUpdate::Mount)
        );
        assert_eq!(
            update("/admin/metadata?mode=fallbacks&mount=/live&song=x", &good),
            Err(BadUpdate::Mode)
        );
        assert_eq!(
            update("/admin/metadata?mode=updinfo&mount=/live", &good),
            Err(BadUpdate::NoSong)
        );
        assert!(!is_metadata(&request("PUT", "/admin/metadata", &good)));
        // The admin listener of a broadcast whose input has no mount: any mount, or none.
        let no_mount = |uri: &str| {
            let gate = TitleGate {
                password: "hackme",
                mount: None,
            };
            title_update(&request("GET", uri, &good), gate)
        };
        assert_eq!(
            no_mount("/admin/metadata?mode=updinfo&song=x"),
            Ok("x".to_owned())
        );
        assert_eq!(
            no_mount("/admin/metadata?mode=updinfo&mount=/any&song=y"),
            Ok("y".to_owned())
        );
        let gate = TitleGate {
            password: "other",
            mount: None,
        };
        assert_eq!(
            title_update(
                &request("GET", "/admin/metadata?mode=updinfo&song=x", &good),
                gate
            ),
            Err(BadUpdate::Auth)
        );
    }
}
