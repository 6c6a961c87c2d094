//! The Icecast-compatible source endpoint of `gridcast broadcast`: encoders that push to an
//! Icecast server (ffmpeg's `icecast://` output, BUTT, liquidsoap, ices) push to this instead,
//! unchanged.
//!
//! What an Icecast 2 server does for a source, and so what this does:
//! - `PUT /mount` (Icecast 2.4 and later) or the legacy `SOURCE /mount` (older clients), with
//!   HTTP Basic authentication (any user name, usually `source`; the password is checked);
//! - `Expect: 100-continue` is answered with `100 Continue`, anything else with `200 OK`, and
//!   the request body is then the stream, until the encoder disconnects;
//! - one source per mount at a time: a second one gets `403` while the first is live; after the
//!   first leaves, the next one carries the stream on (a new Ogg header is captured then).
//!
//! The head is parsed by `httparse` and the credentials decoded by `data-encoding`; the
//! connection itself is not handed to hyper, because an Icecast source sends its stream as
//! an unframed request body (no `Content-Length`, no chunking), which HTTP/1.1 and so hyper
//! read as an empty one.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use super::accept;
use super::http::RequestHead;
use super::output::read_request_head;

/// Where encoders push, and the password they must give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceEndpoint {
    /// The mount point, starting with `/`.
    pub mount: String,
    /// The source password.
    pub password: String,
}

/// Accepts encoders on `listener`, for as long as the process runs, and passes each one's
/// stream bytes to `tx` (an encoder whose bytes nobody takes any more is let go).
pub(crate) fn serve(
    listener: &TcpListener,
    endpoint: SourceEndpoint,
    tx: &SyncSender<io::Result<Vec<u8>>>,
) {
    let endpoint = Arc::new(endpoint);
    let busy = Arc::new(AtomicBool::new(false));
    let tx = tx.clone();
    // One encoder is served at a time; the places beyond it are for those turned away
    // (and for idle connections, each closed by the head timeout).
    accept::serve_threaded(
        listener,
        "icecast-source",
        accept::MAX_CONNECTIONS,
        move |conn| {
            let peer = conn.peer_addr().ok();
            match source(conn, &endpoint, &busy, &tx) {
                Ok(()) => tracing::info!(?peer, "icecast source left"),
                // Idle and abandoned connections (no head before the timeout) are routine.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    tracing::debug!(?peer, %e, "icecast connection without a request")
                }
                Err(e) => tracing::warn!(?peer, %e, "icecast source refused or failed"),
            }
        },
    );
}

/// Why a source request is turned away.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Malformed,
    Method,
    Mount,
    Auth,
    Chunked,
}

/// Checks a request head against the endpoint. Returns whether the client expects
/// `100 Continue`.
fn check(head: &str, endpoint: &SourceEndpoint) -> Result<bool, Refusal> {
    let head = RequestHead::parse(head.as_bytes()).map_err(|_| Refusal::Malformed)?;
    if head.method != "PUT" && head.method != "SOURCE" {
        return Err(Refusal::Method);
    }
    if head.path != endpoint.mount {
        return Err(Refusal::Mount);
    }
    if head
        .header("transfer-encoding")
        .is_some_and(|v| !v.eq_ignore_ascii_case("identity"))
    {
        return Err(Refusal::Chunked);
    }
    let authorised = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| data_encoding::BASE64.decode(b64.trim().as_bytes()).ok())
        .and_then(|cred| {
            let colon = cred.iter().position(|&b| b == b':')?;
            Some(same(&cred[colon + 1..], endpoint.password.as_bytes()))
        })
        .unwrap_or(false);
    if !authorised {
        return Err(Refusal::Auth);
    }
    Ok(head
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue")))
}

fn source(
    mut conn: TcpStream,
    endpoint: &SourceEndpoint,
    busy: &AtomicBool,
    tx: &SyncSender<io::Result<Vec<u8>>>,
) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    // The head is read through a buffer; whatever of the body it swallowed is kept.
    let mut reader = io::BufReader::new(conn.try_clone()?);
    let head = read_request_head(&mut reader)?;
    let expect_continue = match check(&head, endpoint) {
        Ok(expect) => expect,
        Err(refusal) => {
            let answer: &[u8] = match refusal {
                Refusal::Malformed => b"HTTP/1.0 400 Bad Request\r\n\r\n",
                Refusal::Method => b"HTTP/1.0 405 Method Not Allowed\r\nAllow: PUT, SOURCE\r\n\r\n",
                Refusal::Mount => b"HTTP/1.0 404 Not Found\r\n\r\n",
                Refusal::Auth => {
                    b"HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"gridcast\"\r\n\r\n"
                }
                Refusal::Chunked => b"HTTP/1.0 501 Not Implemented\r\n\r\n",
            };
            conn.write_all(answer)?;
            return Err(io::Error::other(format!("{refusal:?}")));
        }
    };
    if busy.swap(true, Ordering::AcqRel) {
        conn.write_all(b"HTTP/1.0 403 Forbidden\r\n\r\nMountpoint in use\r\n")?;
        return Err(io::Error::other("a source is already connected"));
    }
    let result = (|| {
        if expect_continue {
            conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        } else {
            conn.write_all(b"HTTP/1.0 200 OK\r\n\r\n")?;
        }
        // A live encoder may pause; one that sends nothing for a minute is gone.
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        tracing::info!(mount = %endpoint.mount, "icecast source connected");
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if tx.send(Ok(buf[..n].to_vec())).is_err() {
                return Ok(());
            }
        }
    })();
    busy.store(false, Ordering::Release);
    result
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

    #[test]
    fn source_requests_are_checked() {
        let ok = "PUT /live HTTP/1.1\r\nAuthorization: Basic c291cmNlOmhhY2ttZQ==\r\n\
                  Expect: 100-continue\r\nContent-Type: audio/ogg\r\n\r\n";
        assert_eq!(check(ok, &endpoint()), Ok(true));
        let legacy =
            "SOURCE /live?x=1 HTTP/1.0\r\nauthorization: Basic c291cmNlOmhhY2ttZQ==\r\n\r\n";
        assert_eq!(check(legacy, &endpoint()), Ok(false));
        let wrong = "PUT /live HTTP/1.1\r\nAuthorization: Basic c291cmNlOmhhY2ttZg==\r\n\r\n";
        assert_eq!(check(wrong, &endpoint()), Err(Refusal::Auth));
        let none = "PUT /live HTTP/1.1\r\n\r\n";
        assert_eq!(check(none, &endpoint()), Err(Refusal::Auth));
        let other = "PUT /other HTTP/1.1\r\nAuthorization: Basic c291cmNlOmhhY2ttZQ==\r\n\r\n";
        assert_eq!(check(other, &endpoint()), Err(Refusal::Mount));
        assert_eq!(
            check("GET /live HTTP/1.1\r\n\r\n", &endpoint()),
            Err(Refusal::Method)
        );
        let chunked = "PUT /live HTTP/1.1\r\nAuthorization: Basic c291cmNlOmhhY2ttZQ==\r\n\
                       Transfer-Encoding: chunked\r\n\r\n";
        assert_eq!(check(chunked, &endpoint()), Err(Refusal::Chunked));
        let garbage = "PUT /live HTTP/1.1\r\nno colon here\r\n\r\n";
        assert_eq!(check(garbage, &endpoint()), Err(Refusal::Malformed));
    }
}
