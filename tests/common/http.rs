//! A minimal HTTP/1.1 client for tests of the nodes' own listeners (loopback only): one
//! request per connection, bounded in time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on `addr`: the status and the body, or `None` if nothing answered within 5 s.
pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Polls `GET path` every 100 ms until `want` accepts the answer or `within` has passed;
/// the last answer.
pub fn poll(
    addr: SocketAddr,
    path: &str,
    within: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> Option<(u16, String)> {
    let deadline = std::time::Instant::now() + within;
    let mut last = None;
    while std::time::Instant::now() < deadline {
        last = get(addr, path);
        if let Some((status, body)) = &last
            && want(*status, body)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}
