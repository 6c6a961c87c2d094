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

/// The body of an HTTP/1.1 chunked message: every chunk's data in order, up to the last
/// chunk or, for a stream cut short, up to the last whole chunk. `None` if it is not
/// chunked encoding.
pub fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return Some(body);
        };
        let size_field = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size_hex = size_field.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        let data = &raw[line_end + 2..];
        if data.len() < size + 2 {
            return Some(body);
        }
        if &data[size..size + 2] != b"\r\n" {
            return None;
        }
        body.extend_from_slice(&data[..size]);
        raw = &data[size + 2..];
    }
}

/// The value of the sample `series` (name and labels exactly as exported) in a scrape.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} is not in the scrape"))
}
