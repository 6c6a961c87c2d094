//! Hostile traffic for real processes: bounded floods of junk datagrams and of real QUIC
//! Initial packets from many source addresses on loopback (127.0.0.0/8 is all local, so a
//! socket may bind any of its addresses and still receive what the target answers).
//!
//! Every flood is bounded in count and in time, and counts what it sent and what came back to
//! each of its sockets, so that a test can hold the target to QUIC's amplification limit.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gridcast::keys::{NodeId, NodeKey};
use gridcast::node::tls::{self, Identity};

/// What a flood sent, and what came back, per source socket.
#[derive(Debug, Default, Clone)]
pub struct FloodCounts {
    /// Datagrams and bytes sent, over every socket.
    pub sent: u64,
    pub sent_bytes: u64,
    /// Datagrams and bytes received, over every socket.
    pub received: u64,
    pub received_bytes: u64,
    /// The largest bytes received ÷ bytes sent of any one source socket (address and port).
    pub worst_amplification: f64,
}

/// Sources: one socket on each of `addresses` loopback addresses from 127.0.1.1 up, each on
/// `ports` ports.
fn sources(addresses: u8, ports: usize) -> Vec<UdpSocket> {
    let mut out = Vec::new();
    for a in 0..addresses {
        for _ in 0..ports {
            let ip = Ipv4Addr::new(127, 0, 1, a + 1);
            let s = UdpSocket::bind((ip, 0)).unwrap();
            s.set_nonblocking(true).unwrap();
            out.push(s);
        }
    }
    out
}

/// Reads whatever waits on every socket into the per-socket tallies.
fn drain(sockets: &[UdpSocket], got: &mut [u64], counts: &mut FloodCounts) {
    let mut buf = [0u8; 65536];
    for (s, got) in sockets.iter().zip(got.iter_mut()) {
        for _ in 0..1000 {
            match s.recv_from(&mut buf) {
                Ok((n, _)) => {
                    counts.received += 1;
                    counts.received_bytes += n as u64;
                    *got += n as u64;
                }
                Err(_) => break,
            }
        }
    }
}

/// A small fast generator (xorshift64*): junk, not secrets.
struct Junk(u64);

impl Junk {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// One junk datagram, of the shapes a QUIC endpoint must sort out without state: pure noise;
/// a long header of QUIC v1 (an Initial or a Handshake packet of no connection, with garbage
/// for keys); a long header of an unknown version, big enough to earn a version negotiation;
/// a short header with an 8-byte connection id nobody issued.
fn junk(rng: &mut Junk, buf: &mut Vec<u8>) {
    let shape = rng.next() % 4;
    let len = match shape {
        2 => 1200 + (rng.next() % 200) as usize,
        _ => 1 + (rng.next() % 1400) as usize,
    };
    buf.resize(len, 0);
    rng.fill(buf);
    match shape {
        1 if len > 6 => {
            buf[0] = 0xc0 | (buf[0] & 0x3f);
            buf[1..5].copy_from_slice(&1u32.to_be_bytes());
            buf[5] = 8;
        }
        2 => {
            buf[0] |= 0x80;
            buf[1..5].copy_from_slice(&0x1a2a_3a4au32.to_be_bytes());
            buf[5] = 8;
        }
        3 => buf[0] = 0x40 | (buf[0] & 0x3f),
        _ => {}
    }
}

/// Sends `count` junk datagrams at `target` from `addresses` source addresses over about
/// `over`, reading what comes back.
pub fn junk_flood(target: SocketAddr, count: u64, over: Duration, addresses: u8) -> FloodCounts {
    let sockets = sources(addresses, 2);
    let mut rng = Junk(0x9e37_79b9_7f4a_7c15);
    let mut buf = Vec::new();
    flood(
        &sockets,
        target,
        count,
        over,
        Duration::from_secs(1),
        |_| {
            junk(&mut rng, &mut buf);
            buf.clone()
        },
    )
}

/// Sends `count` real QUIC Initial packets (each a new connection's first flight, from a
/// quinn-proto client that will never answer) at `target`, whose node id is `node`, over
/// about `over`, from `addresses` source addresses with several ports each, reading what
/// comes back.
pub fn initial_flood(
    target: SocketAddr,
    node: NodeId,
    count: u64,
    over: Duration,
    addresses: u8,
) -> FloodCounts {
    let sockets = sources(addresses, 4);
    let mut first = first_flights(target, node);
    flood(
        &sockets,
        target,
        count,
        over,
        Duration::from_secs(1),
        |_| first(),
    )
}

/// Sends one real QUIC Initial at `target` (node id `node`) from each of `n` fresh source
/// sockets, then reads for `wait` while the target retransmits its handshake flight to
/// clients that never answer: the largest bytes received ÷ bytes sent of any one socket.
/// Without QUIC's anti-amplification limit (three times what an address has sent, until it
/// is validated), a server's backed-off retransmissions alone would exceed three.
pub fn initial_probe(target: SocketAddr, node: NodeId, n: u8, wait: Duration) -> FloodCounts {
    let sockets = sources(n, 1);
    let mut first = first_flights(target, node);
    flood(
        &sockets,
        target,
        u64::from(n),
        Duration::from_millis(50),
        wait,
        |_| first(),
    )
}

/// A maker of first flights: each call starts a new quinn-proto client connection to
/// `target` (node id `node`) and returns its first Initial datagram. The connection is
/// dropped at once: nothing will ever answer the server.
fn first_flights(target: SocketAddr, node: NodeId) -> impl FnMut() -> Vec<u8> {
    let identity = Identity::new(&NodeKey::from_seed(&[0x66; 32])).unwrap();
    let crypto = tls::client_crypto(node, &identity).unwrap();
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let mut buf = Vec::new();
    move || {
        let now = Instant::now();
        let config = quinn_proto::ClientConfig::new(crypto.clone());
        let (_, mut conn) = endpoint
            .connect(now, config, target, tls::SERVER_NAME)
            .unwrap();
        buf.clear();
        let t = conn.poll_transmit(now, 1, &mut buf).unwrap();
        buf[..t.size].to_vec()
    }
}

/// Sends `count` datagrams made by `make` round-robin from `sockets` to `target`, paced over
/// `over`, draining replies as it goes and for `tail` after.
fn flood(
    sockets: &[UdpSocket],
    target: SocketAddr,
    count: u64,
    over: Duration,
    tail: Duration,
    mut make: impl FnMut(u64) -> Vec<u8>,
) -> FloodCounts {
    let mut counts = FloodCounts::default();
    let mut sent = vec![0u64; sockets.len()];
    let mut got = vec![0u64; sockets.len()];
    let start = Instant::now();
    let deadline = start + over + Duration::from_secs(5);
    for i in 0..count {
        // Paced: datagram i leaves at i/count of the way through.
        let due = start + over.mul_f64(i as f64 / count as f64);
        while Instant::now() < due {
            drain(sockets, &mut got, &mut counts);
            std::thread::sleep(Duration::from_micros(200));
        }
        if Instant::now() > deadline {
            break;
        }
        let data = make(i);
        let k = (i as usize) % sockets.len();
        if sockets[k].send_to(&data, target).is_ok() {
            counts.sent += 1;
            counts.sent_bytes += data.len() as u64;
            sent[k] += data.len() as u64;
        }
    }
    let tail = Instant::now() + tail;
    while Instant::now() < tail {
        drain(sockets, &mut got, &mut counts);
        std::thread::sleep(Duration::from_millis(5));
    }
    counts.worst_amplification = sent
        .iter()
        .zip(&got)
        .filter(|(s, _)| **s > 0)
        .map(|(s, g)| *g as f64 / *s as f64)
        .fold(0.0, f64::max);
    counts
}
