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

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::thread;
use std::time::Duration;

use super::output::read_request_head;

/// Where encoders push, and the password they must give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceEndpoint {
    /// The mount point, starting with `/`.
    pub mount: String,
    /// The source password.
    pub password: String,
}

/// Accepts encoders on `listener` and passes each one's stream bytes to `tx`, until nobody
/// listens on `tx` any more.
pub(crate) fn serve(
    listener: &TcpListener,
    endpoint: SourceEndpoint,
    tx: &SyncSender<io::Result<Vec<u8>>>,
) {
    let endpoint = Arc::new(endpoint);
    let busy = Arc::new(AtomicBool::new(false));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (endpoint, busy, tx) = (Arc::clone(&endpoint), Arc::clone(&busy), tx.clone());
        let spawned = thread::Builder::new()
            .name("icecast-source".into())
            .spawn(move || {
                let peer = conn.peer_addr().ok();
                match source(conn, &endpoint, &busy, &tx) {
                    Ok(()) => tracing::info!(?peer, "icecast source left"),
                    Err(e) => tracing::warn!(?peer, %e, "icecast source refused or failed"),
                }
            });
        if spawned.is_err() {
            tracing::warn!("cannot start a thread for an icecast source");
        }
    }
}

/// Why a source request is turned away.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Method,
    Mount,
    Auth,
    Chunked,
}

/// Checks a request head against the endpoint. Returns whether the client expects
/// `100 Continue`.
fn check(head: &str, endpoint: &SourceEndpoint) -> Result<bool, Refusal> {
    let mut lines = head.lines();
    let mut words = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if method != "PUT" && method != "SOURCE" {
        return Err(Refusal::Method);
    }
    let path = path.split('?').next().unwrap_or("");
    if path != endpoint.mount {
        return Err(Refusal::Mount);
    }
    let mut authorised = false;
    let mut expect_continue = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "authorization" => {
                authorised = value
                    .strip_prefix("Basic ")
                    .and_then(base64_decode)
                    .and_then(|cred| {
                        let colon = cred.iter().position(|&b| b == b':')?;
                        Some(same(&cred[colon + 1..], endpoint.password.as_bytes()))
                    })
                    .unwrap_or(false);
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            "transfer-encoding" if !value.eq_ignore_ascii_case("identity") => {
                return Err(Refusal::Chunked);
            }
            _ => {}
        }
    }
    if !authorised {
        return Err(Refusal::Auth);
    }
    Ok(expect_continue)
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

/// Standard base64 with padding, as HTTP Basic authentication uses it.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim().trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
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
    fn base64_decodes_basic_credentials() {
        assert_eq!(
            base64_decode("c291cmNlOmhhY2ttZQ==").as_deref(),
            Some(&b"source:hackme"[..])
        );
        assert_eq!(base64_decode("YQ").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("!!"), None);
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
    }
}
