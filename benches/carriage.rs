//! What quinn-proto itself charges a sender per payload byte for each way gridcast could carry
//! shards to a subscriber (issue 16, lever 1), measured without the rest of the node:
//!
//! - `stream`: one stream per subscription carrying every chunk, handed over whole;
//! - `stream_pieces`: the same, each chunk handed over the way gridcast frames it (the signed
//!   header, then per shard a 13-byte frame prefix and the shard: 17 buffers for 8 shards);
//! - `per_chunk`: one stream per chunk, finished after it;
//! - `datagram`: QUIC DATAGRAM frames (RFC 9221), the chunk cut into pieces of the largest
//!   datagram the path takes.
//!
//! Pairs of quinn-proto connections in memory on a virtual clock, no sockets: every datagram a
//! sender builds reaches its receiver after 5 ms, and the receiver's ACKs come back the same
//! way. Only the senders' calls are timed (writing, building and sealing packets, taking ACKs,
//! timers), so the figure is the protocol's own cost, the part of the fan-out worker the
//! carriage can change; the kernel's send and gridcast's queues are not in it. The transport
//! settings are the engine's for a serving connection (send fairness off, the ACK-frequency
//! threshold, the windows), and path MTU discovery runs before anything is timed.
//!
//! Chunk sizes are a subscriber's share of a chunk in the fan-out bench's three rows (0.2 Gbit/s
//! over 10, 100 and 1000 subscribers, a chunk every 250 ms), each with one connection alone
//! (everything in cache) and with as many as the row has, served in turn. Every mode runs
//! `--rounds` times (5), interleaved, and the median is printed: `carriage mode=… chunk_bytes=…
//! connections=… ns_per_byte=… packets_per_chunk=… transmits_per_chunk=… acks_per_chunk=…`,
//! then `carriage ratio … datagram_vs_stream=… per_chunk_vs_stream=… pieces_vs_stream=…`.
//! `--sleep-us <n>` sleeps that long before each connection's chunk: the cost of a loop turn
//! that starts cold, as the fan-out node's mostly do.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::disallowed_methods,
    unreachable_pub
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    AckFrequencyConfig, ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint,
    EndpointConfig, ServerConfig, StreamId, TransportConfig, VarInt,
};

use gridcast::keys::{NodeKey, SIGNATURE_LEN};
use gridcast::node::{EngineConfig, tls};
use gridcast::stream::SHARD_HASH_LEN;
use gridcast::stream::header::HEADER_FIXED_LEN;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHUNK_GAP: Duration = Duration::from_millis(250);
/// One-way delay of the in-memory path: a 10 ms round trip, what the fan-out bench's node sees
/// at 10 and 100 subscribers on loopback (its subscribers' thread's lag).
const ONE_WAY: Duration = Duration::from_millis(5);
/// Datagrams per `poll_transmit`, as the engine asks (a 64 KiB GSO batch of 1452-byte ones).
const BATCH: usize = 45;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Stream,
    /// One stream per subscription, each chunk handed over as gridcast frames it: the signed
    /// header, then per shard a 13-byte frame prefix and the shard, 17 buffers for 8 shards.
    StreamPieces,
    PerChunk,
    Datagram,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Stream => "stream",
            Self::StreamPieces => "stream_pieces",
            Self::PerChunk => "per_chunk",
            Self::Datagram => "datagram",
        }
    }
}

fn transport(serving: bool) -> TransportConfig {
    let c = EngineConfig::default();
    let mut t = TransportConfig::default();
    t.max_concurrent_uni_streams(VarInt::from_u32(if serving { 0 } else { 4096 }))
        .stream_receive_window(VarInt::from_u32(c.stream_window))
        .receive_window(VarInt::from_u32(c.connection_window))
        .send_window(c.send_window)
        .send_fairness(false)
        .datagram_send_buffer_size(4 << 20)
        .datagram_receive_buffer_size(Some(4 << 20));
    if serving {
        let mut ack = AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(c.ack_eliciting_threshold));
        t.ack_frequency_config(Some(ack));
    }
    t
}

/// A datagram on its way, due at the far end at `at`.
struct InFlight {
    at: Instant,
    to_receiver: bool,
    data: BytesMut,
}

/// The datagrams of one transmit (several, with `segment_size`) on their way.
fn put_on_wire(
    wire: &mut Vec<InFlight>,
    buf: &[u8],
    out: &quinn_proto::Transmit,
    now: Instant,
    to_receiver: bool,
) {
    let size = out.segment_size.unwrap_or(out.size);
    for d in buf[..out.size].chunks(size) {
        wire.push(InFlight {
            at: now + ONE_WAY,
            to_receiver,
            data: BytesMut::from(d),
        });
    }
}

struct Pair {
    now: Instant,
    sender_ep: Endpoint,
    receiver_ep: Endpoint,
    sender: Option<(ConnectionHandle, Connection)>,
    receiver: (ConnectionHandle, Connection),
    sender_addr: SocketAddr,
    receiver_addr: SocketAddr,
    wire: Vec<InFlight>,
    buf: Vec<u8>,
    /// Time spent in the sender's calls.
    sender_ns: u128,
    /// `poll_transmit` calls that gave the sender something to send.
    transmits: u64,
    received: u64,
    stream: Option<StreamId>,
    /// The receiver's streams not yet finished.
    stream_ids_read: Vec<StreamId>,
}

impl Pair {
    fn new() -> Self {
        let now = Instant::now();
        let key = NodeKey::from_seed(&[5; 32]);
        let identity = tls::Identity::new(&key).unwrap();
        let mut server = ServerConfig::with_crypto(tls::server_crypto(&identity).unwrap());
        server.transport_config(Arc::new(transport(true)));
        let sender_ep = Endpoint::new(
            Arc::new(EndpointConfig::default()),
            Some(Arc::new(server)),
            true,
            Some([1; 32]),
        );
        let mut receiver_ep = Endpoint::new(
            Arc::new(EndpointConfig::default()),
            None,
            true,
            Some([2; 32]),
        );
        let me = tls::Identity::new(&NodeKey::from_seed(&[6; 32])).unwrap();
        let mut client = ClientConfig::new(tls::client_crypto(key.node_id(), &me).unwrap());
        client.transport_config(Arc::new(transport(false)));
        let sender_addr: SocketAddr = "10.0.0.1:4433".parse().unwrap();
        let receiver_addr: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let receiver = receiver_ep
            .connect(now, client, sender_addr, tls::SERVER_NAME)
            .unwrap();
        let mut pair = Self {
            now,
            sender_ep,
            receiver_ep,
            sender: None,
            receiver,
            sender_addr,
            receiver_addr,
            wire: Vec::new(),
            buf: Vec::new(),
            sender_ns: 0,
            transmits: 0,
            received: 0,
            stream: None,
            stream_ids_read: Vec::new(),
        };
        // Handshake and path MTU discovery (loopback's bound, 1452) before anything is timed.
        let until = pair.now + Duration::from_secs(3);
        pair.run_until(until);
        assert!(pair.sender.is_some(), "the handshake did not complete");
        pair
    }

    fn sender(&mut self) -> &mut Connection {
        &mut self.sender.as_mut().unwrap().1
    }

    /// Moves datagrams and fires timers until `until` (virtual time) or nothing is left to do.
    fn run_until(&mut self, until: Instant) {
        for _ in 0..1_000_000 {
            self.transmit();
            // The next event: a datagram arriving or a timer.
            let arrival = self.wire.iter().map(|d| d.at).min();
            let timers = [
                self.sender.as_mut().and_then(|(_, c)| c.poll_timeout()),
                self.receiver.1.poll_timeout(),
            ];
            let next = timers.into_iter().flatten().chain(arrival).min();
            let Some(next) = next.filter(|&t| t <= until) else {
                self.now = until;
                self.timeouts();
                return;
            };
            self.now = self.now.max(next);
            self.deliver();
            self.timeouts();
        }
        panic!("the pair never went quiet");
    }

    fn timeouts(&mut self) {
        let now = self.now;
        if let Some((_, c)) = &mut self.sender {
            let t = Instant::now();
            c.handle_timeout(now);
            self.sender_ns += t.elapsed().as_nanos();
        }
        self.receiver.1.handle_timeout(now);
        self.events();
    }

    /// Both sides' outgoing datagrams onto the wire.
    fn transmit(&mut self) {
        let now = self.now;
        if let Some((_, c)) = &mut self.sender {
            loop {
                self.buf.clear();
                let t = Instant::now();
                let out = c.poll_transmit(now, BATCH, &mut self.buf);
                self.sender_ns += t.elapsed().as_nanos();
                let Some(out) = out else { break };
                self.transmits += 1;
                put_on_wire(&mut self.wire, &self.buf, &out, now, true);
            }
        }
        loop {
            self.buf.clear();
            let Some(out) = self.receiver.1.poll_transmit(now, BATCH, &mut self.buf) else {
                break;
            };
            put_on_wire(&mut self.wire, &self.buf, &out, now, false);
        }
    }

    /// Every datagram due by now, to its side.
    fn deliver(&mut self) {
        let now = self.now;
        let due: Vec<InFlight>;
        (due, self.wire) = std::mem::take(&mut self.wire)
            .into_iter()
            .partition(|d| d.at <= now);
        let mut response = Vec::new();
        for d in due {
            if d.to_receiver {
                if let Some(DatagramEvent::ConnectionEvent(_, ev)) = self.receiver_ep.handle(
                    now,
                    self.sender_addr,
                    None,
                    None,
                    d.data,
                    &mut response,
                ) {
                    self.receiver.1.handle_event(ev);
                }
            } else {
                let t = Instant::now();
                match self.sender_ep.handle(
                    now,
                    self.receiver_addr,
                    None,
                    None,
                    d.data,
                    &mut response,
                ) {
                    Some(DatagramEvent::NewConnection(incoming)) => {
                        let accepted = self
                            .sender_ep
                            .accept(incoming, now, &mut response, None)
                            .unwrap();
                        self.sender = Some(accepted);
                    }
                    Some(DatagramEvent::ConnectionEvent(_, ev)) => {
                        if let Some((_, c)) = &mut self.sender {
                            c.handle_event(ev);
                        }
                    }
                    Some(DatagramEvent::Response(_)) | None => {}
                }
                self.sender_ns += t.elapsed().as_nanos();
            }
        }
    }

    /// Endpoint events both ways, and whatever reached the receiver read out of it.
    fn events(&mut self) {
        if let Some((h, c)) = &mut self.sender {
            let t = Instant::now();
            while let Some(ev) = c.poll_endpoint_events() {
                if let Some(back) = self.sender_ep.handle_event(*h, ev) {
                    c.handle_event(back);
                }
            }
            while c.poll().is_some() {}
            self.sender_ns += t.elapsed().as_nanos();
        }
        let (h, c) = &mut self.receiver;
        while let Some(ev) = c.poll_endpoint_events() {
            if let Some(back) = self.receiver_ep.handle_event(*h, ev) {
                c.handle_event(back);
            }
        }
        while c.poll().is_some() {}
        while let Some(id) = c.streams().accept(Dir::Uni) {
            self.stream_ids_read.push(id);
        }
        let ids = std::mem::take(&mut self.stream_ids_read);
        let mut open = Vec::with_capacity(ids.len());
        for id in ids {
            let mut s = c.recv_stream(id);
            let mut finished = false;
            if let Ok(mut chunks) = s.read(true) {
                loop {
                    match chunks.next(usize::MAX) {
                        Ok(Some(ch)) => self.received += ch.bytes.len() as u64,
                        Ok(None) => {
                            finished = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let _ = chunks.finalize();
            }
            if !finished {
                open.push(id);
            }
        }
        self.stream_ids_read = open;
        while let Some(d) = c.datagrams().recv() {
            self.received += d.len() as u64;
        }
    }

    /// Hands one chunk to the sender the way `mode` carries it (timed).
    fn write(&mut self, mode: Mode, chunk: &Bytes) {
        let t = Instant::now();
        match mode {
            Mode::Stream => {
                let id = match self.stream {
                    Some(id) => id,
                    None => {
                        let id = self.sender().streams().open(Dir::Uni).unwrap();
                        self.stream = Some(id);
                        id
                    }
                };
                let mut s = self.sender().send_stream(id);
                let mut rest = [chunk.clone()];
                s.write_chunks(&mut rest).unwrap();
            }
            Mode::StreamPieces => {
                let id = match self.stream {
                    Some(id) => id,
                    None => {
                        let id = self.sender().streams().open(Dir::Uni).unwrap();
                        self.stream = Some(id);
                        id
                    }
                };
                // A 16-shard chunk's signed header, as the stream model lays it out.
                const HEADER: usize = HEADER_FIXED_LEN + 16 * SHARD_HASH_LEN + SIGNATURE_LEN;
                const PREFIX: usize = 13;
                let shard = (chunk.len() - HEADER) / 8 - PREFIX;
                let mut pieces = vec![chunk.slice(..HEADER)];
                let mut at = HEADER;
                for _ in 0..8 {
                    pieces.push(chunk.slice(at..at + PREFIX));
                    let end = if pieces.len() == 16 {
                        chunk.len()
                    } else {
                        at + PREFIX + shard
                    };
                    pieces.push(chunk.slice(at + PREFIX..end));
                    at = end;
                }
                let mut s = self.sender().send_stream(id);
                s.write_chunks(&mut pieces).unwrap();
            }
            Mode::PerChunk => {
                let c = self.sender();
                let id = c.streams().open(Dir::Uni).unwrap();
                let mut s = c.send_stream(id);
                let mut rest = [chunk.clone()];
                s.write_chunks(&mut rest).unwrap();
                s.finish().unwrap();
            }
            Mode::Datagram => {
                let c = self.sender();
                let piece = c.datagrams().max_size().unwrap();
                let mut at = 0;
                while at < chunk.len() {
                    let end = (at + piece).min(chunk.len());
                    c.datagrams().send(chunk.slice(at..end), false).unwrap();
                    at = end;
                }
            }
        }
        self.sender_ns += t.elapsed().as_nanos();
    }
}

struct Measured {
    ns_per_byte: f64,
    transmits_per_chunk: f64,
    packets_per_chunk: f64,
    acks_per_chunk: f64,
}

fn run(
    mode: Mode,
    chunk_bytes: usize,
    connections: usize,
    total: usize,
    sleep: Duration,
) -> Measured {
    let mut pairs: Vec<Pair> = (0..connections).map(|_| Pair::new()).collect();
    let chunk: Bytes = (0..chunk_bytes)
        .map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()[7])
        .collect::<Vec<u8>>()
        .into();
    let chunks = (total / chunk_bytes / connections).max(1);
    let turn = |pairs: &mut Vec<Pair>| {
        for pair in pairs.iter_mut() {
            if !sleep.is_zero() {
                std::thread::sleep(sleep);
            }
            pair.write(mode, &chunk);
            let until = pair.now + CHUNK_GAP;
            pair.run_until(until);
        }
    };
    // Warm-up: the congestion windows grow to the chunk.
    for _ in 0..8 {
        turn(&mut pairs);
    }
    let sum = |pairs: &mut Vec<Pair>| {
        let (mut ns, mut bytes, mut packets, mut acks, mut transmits) = (0, 0, 0, 0, 0);
        for p in pairs.iter_mut() {
            let s = p.sender().stats();
            ns += p.sender_ns;
            transmits += p.transmits;
            bytes += p.received;
            packets += s.path.sent_packets;
            acks += s.frame_rx.acks;
        }
        (ns, bytes, packets, acks, transmits)
    };
    let before = sum(&mut pairs);
    for _ in 0..chunks {
        turn(&mut pairs);
    }
    let after = sum(&mut pairs);
    let bytes = after.1 - before.1;
    let sent = (chunk_bytes * chunks * connections) as u64;
    assert_eq!(
        bytes, sent,
        "{mode:?}: the receivers did not get every byte"
    );
    let subscriber_chunks = (chunks * connections) as f64;
    Measured {
        ns_per_byte: (after.0 - before.0) as f64 / bytes as f64,
        transmits_per_chunk: (after.4 - before.4) as f64 / subscriber_chunks,
        packets_per_chunk: (after.2 - before.2) as f64 / subscriber_chunks,
        acks_per_chunk: (after.3 - before.3) as f64 / subscriber_chunks,
    }
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = arg(&args, "--rounds").unwrap_or(5);
    // `--sleep-us <n>`: the thread sleeps this long (wall time) before each connection's
    // chunk, as a node that is mostly idle does between loop turns: what a cold start of each
    // turn costs.
    let sleep = Duration::from_micros(arg(&args, "--sleep-us").unwrap_or(0));
    let modes = [
        Mode::Stream,
        Mode::PerChunk,
        Mode::Datagram,
        Mode::StreamPieces,
    ];
    for subscribers in [10usize, 100, 1000] {
        let chunk_bytes = 200_000_000 / 8 / 4 / subscribers;
        // One connection alone (the protocol's cost with everything in cache), then as many
        // as the fan-out row has, served in turn (each one's state cold again at its turn).
        for connections in [1, subscribers] {
            let mut runs: Vec<Vec<Measured>> = modes.iter().map(|_| Vec::new()).collect();
            for _ in 0..rounds.max(1) {
                for (i, &mode) in modes.iter().enumerate() {
                    runs[i].push(run(mode, chunk_bytes, connections, 64 << 20, sleep));
                }
            }
            let mut medians = Vec::new();
            for (i, &mode) in modes.iter().enumerate() {
                let r = &mut runs[i];
                r.sort_by(|a, b| a.ns_per_byte.total_cmp(&b.ns_per_byte));
                let m = &r[r.len() / 2];
                println!(
                    "carriage mode={} chunk_bytes={chunk_bytes} connections={connections} ns_per_byte={:.3} packets_per_chunk={:.1} transmits_per_chunk={:.1} acks_per_chunk={:.2}",
                    mode.name(),
                    m.ns_per_byte,
                    m.packets_per_chunk,
                    m.transmits_per_chunk,
                    m.acks_per_chunk
                );
                medians.push(m.ns_per_byte);
            }
            println!(
                "carriage ratio chunk_bytes={chunk_bytes} connections={connections} datagram_vs_stream={:.2} per_chunk_vs_stream={:.2} pieces_vs_stream={:.2}",
                medians[2] / medians[0],
                medians[1] / medians[0],
                medians[3] / medians[0]
            );
        }
    }
}
