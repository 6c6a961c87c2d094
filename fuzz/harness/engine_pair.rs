//! A connected engine pair for fuzzing: a real gridcast [`Engine`] (a player) subscribed to
//! a hostile parent that is a bare quinn-proto server endpoint, the two joined in memory with
//! a virtual clock. The fuzz input is a script of what the hostile parent does on the QUIC
//! connection: control frames (valid messages with arbitrary fields, or raw bytes), genuine
//! signed shards of a real channel (whole, with a byte flipped, under another subscription or
//! another chunk, or signed for another channel), raw bytes on shard streams, streams finished
//! or reset, and time passing.
//!
//! After every step the player is held to three things: it never panics; every chunk it
//! plays is byte for byte the genuine chunk of that sequence number (nothing unverified is
//! played); and its memory stays bounded (its channel window and its connection backlog
//! under their limits).
//!
//! Used by the `engine_pair` fuzz target and replayed over the committed corpus by
//! `tests/fuzz_corpora.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gridcast::keys::{ChannelKey, NodeKey};
use gridcast::node::tls::{self, Identity};
use gridcast::node::{ChannelConfig, ChannelMode, Engine, EngineConfig, NodeEvent};
use gridcast::stream::{ChunkFlags, ChunkPublisher, CodedChunk, CodingParams};
use gridcast::wire::{ChannelInfo, Have, Hello, Message, Role, ShardFrame, StartAt, SubstreamSet};
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ServerConfig, StreamId,
};

/// Chunks of the genuine channel the hostile parent holds.
const CHUNKS: u64 = 6;
/// The first chunk's sequence number.
const FIRST_SEQ: u64 = 1_000;
/// Most script steps, and most datagram exchanges per step: every run is bounded.
const MAX_STEPS: usize = 96;
const MAX_EXCHANGES: usize = 400;
/// Control frame types of version 1.
const KINDS: [u64; 11] = [
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x10,
];

/// The script, read a byte at a time (zeros once it runs out).
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

struct Pair {
    now: Instant,
    victim: Engine,
    victim_addr: SocketAddr,
    parent: Endpoint,
    parent_addr: SocketAddr,
    conn: Option<(ConnectionHandle, quinn_proto::Connection)>,
    control: Option<StreamId>,
    uni: Option<StreamId>,
    /// The victim's subscription id, read from its Subscribe.
    sub: u32,
    control_rx: BytesMut,
    genuine: HashMap<u64, Bytes>,
    played: usize,
    chunks: Vec<CodedChunk>,
    foreign: Vec<CodedChunk>,
    info: ChannelInfo,
    window_bound: usize,
    backlog_bound: usize,
    buf: Vec<u8>,
}

fn payload(seq: u64) -> Bytes {
    let len = 1_500 + (seq % 7) as usize * 611;
    (0..len)
        .map(|i| (i as u64).wrapping_mul(seq | 1).to_le_bytes()[0] ^ (i >> 8) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn coded(key: ChannelKey, params: CodingParams) -> Vec<CodedChunk> {
    let mut publisher = ChunkPublisher::new(key, params);
    (FIRST_SEQ..FIRST_SEQ + CHUNKS)
        .map(|seq| {
            let flags = if seq == FIRST_SEQ {
                ChunkFlags::RANDOM_ACCESS
            } else {
                ChunkFlags::empty()
            };
            publisher
                .publish(seq, seq * 500_000, flags, &payload(seq))
                .expect("a genuine chunk codes")
        })
        .collect()
}

impl Pair {
    fn new() -> Self {
        let now = Instant::now();
        let params = CodingParams::DEFAULT;
        let key = ChannelKey::from_seed(&[0x31; 32]);
        let channel = key.channel_id();
        let chunks = coded(key, params);
        let foreign = coded(ChannelKey::from_seed(&[0x32; 32]), params);
        let genuine = (FIRST_SEQ..FIRST_SEQ + CHUNKS)
            .map(|seq| (seq, payload(seq)))
            .collect();

        let parent_key = NodeKey::from_seed(&[0x33; 32]);
        let parent_identity = Identity::new(&parent_key).expect("identity");
        let server = ServerConfig::with_crypto(tls::server_crypto(&parent_identity).expect("tls"));
        let parent = Endpoint::new(
            Arc::new(EndpointConfig::default()),
            Some(Arc::new(server)),
            false,
            Some([7; 32]),
        );
        let parent_addr: SocketAddr = "10.0.0.1:4433".parse().expect("address");
        let victim_addr: SocketAddr = "10.0.0.2:5000".parse().expect("address");

        let config = EngineConfig {
            rng_seed: Some([9; 32]),
            ..Default::default()
        };
        let window_bound = ChannelConfig::default().window_bytes;
        let backlog_bound = config.max_backlog_bytes + 64 * 1024;
        let mut victim =
            Engine::new(&NodeKey::from_seed(&[0x34; 32]), config).expect("victim engine");
        victim.add_channel(channel, ChannelMode::Play);
        victim
            .subscribe(
                now,
                parent_addr,
                parent_key.node_id(),
                channel,
                SubstreamSet::first(16),
                StartAt::Live,
            )
            .expect("subscribe");
        let info = ChannelInfo {
            channel,
            params,
            chunk_ms: 500,
            latest: Some(FIRST_SEQ + CHUNKS - 1),
            stream_header: None,
        };
        Self {
            now,
            victim,
            victim_addr,
            parent,
            parent_addr,
            conn: None,
            control: None,
            uni: None,
            sub: 0,
            control_rx: BytesMut::new(),
            genuine,
            played: 0,
            chunks,
            foreign,
            info,
            window_bound,
            backlog_bound,
            buf: Vec::new(),
        }
    }

    /// Moves datagrams both ways and runs both sides' events until quiet (bounded).
    fn exchange(&mut self) {
        for _ in 0..MAX_EXCHANGES {
            let mut moved = false;
            while let Some(t) = self.victim.poll_transmit(self.now, &mut self.buf) {
                moved = true;
                let size = t.segment_size.unwrap_or(t.size).max(1);
                let data = self.buf[..t.size].to_vec();
                for datagram in data.chunks(size) {
                    self.deliver_to_parent(datagram);
                }
            }
            if let Some((_, conn)) = &mut self.conn {
                loop {
                    // quinn-proto writes after whatever the buffer holds.
                    self.buf.clear();
                    let Some(t) = conn.poll_transmit(self.now, 1, &mut self.buf) else {
                        break;
                    };
                    moved = true;
                    self.victim.handle_datagram(
                        self.now,
                        self.parent_addr,
                        None,
                        None,
                        BytesMut::from(&self.buf[..t.size]),
                    );
                }
            }
            self.parent_events();
            if !moved {
                break;
            }
        }
        self.check();
    }

    fn deliver_to_parent(&mut self, datagram: &[u8]) {
        let mut response = Vec::new();
        match self.parent.handle(
            self.now,
            self.victim_addr,
            None,
            None,
            BytesMut::from(datagram),
            &mut response,
        ) {
            Some(DatagramEvent::NewConnection(incoming)) if self.conn.is_none() => {
                if let Ok(accepted) = self.parent.accept(incoming, self.now, &mut response, None) {
                    self.conn = Some(accepted);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => self.parent.ignore(incoming),
            Some(DatagramEvent::ConnectionEvent(h, ev)) => {
                if let Some((ch, conn)) = &mut self.conn
                    && *ch == h
                {
                    conn.handle_event(ev);
                }
            }
            Some(DatagramEvent::Response(t)) => {
                self.victim.handle_datagram(
                    self.now,
                    self.parent_addr,
                    None,
                    None,
                    BytesMut::from(&response[..t.size]),
                );
            }
            None => {}
        }
    }

    /// The hostile parent's side: endpoint events, the victim's control stream accepted and
    /// whatever it sends read and thrown away.
    fn parent_events(&mut self) {
        let Some((ch, conn)) = &mut self.conn else {
            return;
        };
        while let Some(ev) = conn.poll_endpoint_events() {
            if let Some(back) = self.parent.handle_event(*ch, ev) {
                conn.handle_event(back);
            }
        }
        while let Some(ev) = conn.poll() {
            if let Event::Stream(quinn_proto::StreamEvent::Opened { dir: Dir::Bi }) = ev
                && let Some(id) = conn.streams().accept(Dir::Bi)
                && self.control.is_none()
            {
                self.control = Some(id);
            }
        }
        if let Some(id) = self.control {
            let mut stream = conn.recv_stream(id);
            if let Ok(mut chunks) = stream.read(true) {
                while let Ok(Some(c)) = chunks.next(usize::MAX) {
                    if self.control_rx.len() < 1 << 16 {
                        self.control_rx.extend_from_slice(&c.bytes);
                    }
                }
                let _ = chunks.finalize();
            }
            while let Ok(Some(msg)) = Message::decode_frame(&mut self.control_rx) {
                if let Message::Subscribe(sub) = msg {
                    self.sub = sub.sub;
                }
            }
        }
    }

    fn write_control(&mut self, bytes: &[u8]) {
        let (Some((_, conn)), Some(id)) = (&mut self.conn, self.control) else {
            return;
        };
        let _ = conn.send_stream(id).write(bytes);
    }

    fn write_uni(&mut self, bytes: &[u8]) {
        let Some((_, conn)) = &mut self.conn else {
            return;
        };
        if self.uni.is_none() {
            self.uni = conn.streams().open(Dir::Uni);
        }
        if let Some(id) = self.uni {
            let _ = conn.send_stream(id).write(bytes);
        }
    }

    /// Every chunk played must be the genuine one; memory stays within the limits.
    fn check(&mut self) {
        while let Some(ev) = self.victim.poll_event() {
            if let NodeEvent::Chunk { seq, payload, .. } = ev {
                assert_eq!(
                    self.genuine.get(&seq),
                    Some(&payload.to_bytes()),
                    "chunk {seq} played but not the genuine one"
                );
                self.played += 1;
            }
        }
        let channel = self.info.channel;
        if let Some(ch) = self.victim.channel(&channel) {
            assert!(ch.window_bytes() <= self.window_bound, "window unbounded");
        }
        assert!(
            self.victim.max_connection_backlog() <= self.backlog_bound,
            "backlog unbounded"
        );
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        if self.victim.poll_timeout().is_some_and(|t| t <= self.now) {
            self.victim.handle_timeout(self.now);
        }
        if let Some((_, conn)) = &mut self.conn
            && conn.poll_timeout().is_some_and(|t| t <= self.now)
        {
            conn.handle_timeout(self.now);
        }
        self.exchange();
    }

    fn step(&mut self, script: &mut Script<'_>) {
        match script.byte() % 10 {
            // A control message of any type: valid with arbitrary fields if the body
            // decodes, else the raw frame.
            0 => {
                let kind = KINDS[usize::from(script.byte()) % KINDS.len()];
                let len = usize::from(script.byte());
                let body = Bytes::copy_from_slice(script.bytes(len));
                match Message::decode_body(kind, body.clone()) {
                    Ok(msg) => self.write_control(&msg.to_bytes()),
                    Err(_) => {
                        let mut raw = vec![kind as u8, len.min(63) as u8];
                        raw.extend_from_slice(&body[..body.len().min(63)]);
                        self.write_control(&raw);
                    }
                }
            }
            // The genuine channel information.
            1 => self.write_control(&Message::ChannelInfo(self.info.clone()).to_bytes()),
            // A genuine shard, possibly tampered with.
            2 => {
                let c = usize::from(script.byte()) % self.chunks.len();
                let index = script.byte() % 16;
                let header = script.byte();
                let tamper = script.byte();
                let at = usize::from(script.byte());
                let chunk = &self.chunks[c];
                let mut frame = ShardFrame {
                    sub: self.sub,
                    seq: chunk.header().header.seq,
                    index,
                    header: (header & 1 == 1).then(|| (**chunk.header()).clone()),
                    shard: chunk.shards()[usize::from(index)].clone(),
                };
                match tamper % 6 {
                    1 => {
                        let mut bad = frame.shard.to_vec();
                        if !bad.is_empty() {
                            let i = at % bad.len();
                            bad[i] ^= 0x40;
                        }
                        frame.shard = bad.into();
                    }
                    2 => frame.sub = frame.sub.wrapping_add(u32::from(at as u8) + 1),
                    3 => {
                        let other = &self.chunks[(c + 1) % self.chunks.len()];
                        frame.shard = other.shards()[usize::from(index)].clone();
                    }
                    4 => {
                        // Signed, and genuine, but for another channel.
                        let other = &self.foreign[c];
                        frame.header = Some((**other.header()).clone());
                        frame.shard = other.shards()[usize::from(index)].clone();
                    }
                    5 => frame.index = (at % 256) as u8,
                    _ => {}
                }
                let mut out = Message::Shard(frame).to_bytes().to_vec();
                if tamper >= 200 && !out.is_empty() {
                    let i = at % out.len();
                    out[i] ^= 0x01;
                }
                self.write_uni(&out);
            }
            // Raw bytes on the shard stream.
            3 => {
                let len = usize::from(script.byte());
                let bytes = script.bytes(len).to_vec();
                self.write_uni(&bytes);
            }
            // The shard stream finished, or reset; the next shard opens another.
            4 => {
                if let (Some((_, conn)), Some(id)) = (&mut self.conn, self.uni.take()) {
                    if script.byte() & 1 == 0 {
                        let _ = conn.send_stream(id).finish();
                    } else {
                        let _ = conn.send_stream(id).reset(0u32.into());
                    }
                }
            }
            // A have, of any range.
            5 => {
                let oldest = FIRST_SEQ + u64::from(script.byte() % 16);
                let latest = oldest + u64::from(script.byte());
                let have = Message::Have(Have {
                    channel: self.info.channel,
                    oldest,
                    latest,
                });
                self.write_control(&have.to_bytes());
            }
            // A hello.
            6 => {
                let hello = Message::Hello(Hello {
                    version: u16::from(script.byte() % 3),
                    role: Role::Supernode,
                    agent: "fuzz".into(),
                    serves: true,
                });
                self.write_control(&hello.to_bytes());
            }
            // Every genuine shard of one chunk, in order, with its header.
            7 => {
                let c = usize::from(script.byte()) % self.chunks.len();
                for index in 0..16u8 {
                    let chunk = &self.chunks[c];
                    let frame = ShardFrame {
                        sub: self.sub,
                        seq: chunk.header().header.seq,
                        index,
                        header: Some((**chunk.header()).clone()),
                        shard: chunk.shards()[usize::from(index)].clone(),
                    };
                    let out = Message::Shard(frame).to_bytes();
                    self.write_uni(&out);
                }
            }
            // Time passes.
            _ => {
                let ms = u64::from(script.byte()) * 20;
                self.advance(Duration::from_millis(ms));
                return;
            }
        }
        self.exchange();
    }
}

/// Runs one script against a fresh pair: how many chunks the player played (each checked
/// to be the genuine one).
pub fn run(data: &[u8]) -> usize {
    let mut pair = Pair::new();
    pair.exchange();
    // The handshake and the subscription reach the parent; it answers with its hello.
    for _ in 0..4 {
        pair.advance(Duration::from_millis(5));
    }
    let hello = Message::Hello(Hello {
        version: gridcast::wire::PROTOCOL_VERSION,
        role: Role::Supernode,
        agent: "fuzz".into(),
        serves: true,
    });
    pair.write_control(&hello.to_bytes());
    pair.exchange();
    let mut script = Script(data);
    for _ in 0..MAX_STEPS {
        if script.done() {
            break;
        }
        pair.step(&mut script);
    }
    // Playout catches up with whatever was delivered.
    for _ in 0..10 {
        pair.advance(Duration::from_millis(500));
    }
    pair.played
}
