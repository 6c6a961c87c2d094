//! The accept loop of the two thread-per-connection HTTP endpoints (the Icecast source
//! endpoint and the players' HTTP output; why they are not on hyper: ARCHITECTURE.md). Each
//! connection gets a thread, at most `max` at once: one beyond that is closed at accept, so
//! a flood of idle connections costs bounded threads (each already has a head timeout) and
//! the ones being served go on. A failed accept (out of file descriptors, for example) waits
//! a moment instead of spinning, and is logged once per run of failures.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

/// Connections each endpoint holds at once (requests still arriving, each closed by its
/// head timeout, and those being served), as many as the admin listener's: a thousand idle
/// connections leave room for the encoder and the players; more than this are closed at
/// accept.
pub(crate) const MAX_CONNECTIONS: usize = 4096;

/// How long a failed accept waits before the next: the usual cause (no file descriptor
/// left) clears only when connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The listen backlog of every TCP listener of a node (std's is 128). A burst of
/// connections beyond the backlog is not refused but trickles in on the kernel's SYN-ACK
/// retransmissions, seconds late, and a real client arriving meanwhile has its SYN dropped:
/// with a thousand idle connections opened at once an encoder waited 5 s to be heard.
/// The kernel caps it at `net.core.somaxconn` (4096 on current kernels).
const BACKLOG: i32 = 4096;

/// Binds a TCP listener on `addr` with [`BACKLOG`] (and `SO_REUSEADDR`, as std does).
pub(crate) fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Holds one of the endpoint's places while its connection is served.
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts on `listener` for ever, serving each connection with `serve` on its own thread
/// named `name`, at most `max` at once; connections beyond that are closed at once.
pub(crate) fn serve_threaded<F>(listener: &TcpListener, name: &str, max: usize, serve: F)
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    let open = Arc::new(AtomicUsize::new(0));
    let mut failing = false;
    let mut refused: u64 = 0;
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) => {
                if !failing {
                    tracing::warn!(endpoint = name, %e, "cannot accept connections; retrying");
                    failing = true;
                }
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        failing = false;
        if open.fetch_add(1, Ordering::AcqRel) >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    endpoint = name,
                    max,
                    refused,
                    "too many connections: closing new ones at accept"
                );
            }
            drop(conn);
            continue;
        }
        let place = Place(Arc::clone(&open));
        let serve = Arc::clone(&serve);
        let spawned = thread::Builder::new().name(name.into()).spawn(move || {
            let _place = place;
            serve(conn);
        });
        if spawned.is_err() {
            tracing::warn!(endpoint = name, "cannot start a thread for a connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn connections_beyond_the_limit_are_closed_and_a_freed_place_is_taken_again() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel::<mpsc::Receiver<()>>();
        let tx = std::sync::Mutex::new(tx);
        thread::spawn(move || {
            serve_threaded(&listener, "test-conn", 2, move |mut conn| {
                // Holds its place until the test lets it go, then says goodbye.
                let (go_tx, go_rx) = mpsc::channel();
                tx.lock().unwrap().send(go_rx).unwrap();
                drop(go_tx);
                let mut byte = [0u8; 1];
                let _ = conn.read(&mut byte);
                let _ = conn.write_all(b"bye");
            });
        });
        let timeout = Some(Duration::from_secs(5));
        let open = |n: usize| {
            (0..n)
                .map(|_| {
                    let c = TcpStream::connect(addr).unwrap();
                    c.set_read_timeout(timeout).unwrap();
                    c
                })
                .collect::<Vec<_>>()
        };
        let mut held = open(2);
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        // A third is closed at accept: it reads the end at once, no "bye".
        let mut third = open(1).pop().unwrap();
        let mut got = Vec::new();
        third.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "the third connection was served: {got:?}");
        // One held connection ends; its place serves a new one.
        let mut first = held.remove(0);
        first.write_all(b"x").unwrap();
        let mut bye = Vec::new();
        first.read_to_end(&mut bye).unwrap();
        assert_eq!(bye, b"bye");
        // (Its thread gives the place back just after closing: a new connection may come
        // a moment too early and be closed; the place is free within a bounded while.)
        let mut fourth = None;
        for _ in 0..250 {
            let c = open(1).pop().unwrap();
            if rx.recv_timeout(Duration::from_millis(20)).is_ok() {
                fourth = Some(c);
                break;
            }
        }
        let mut fourth = fourth.expect("the freed place never served a new connection");
        fourth.write_all(b"x").unwrap();
        let mut bye = Vec::new();
        fourth.read_to_end(&mut bye).unwrap();
        assert_eq!(bye, b"bye");
    }
}
