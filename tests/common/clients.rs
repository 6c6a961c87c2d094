//! Many client engines on their own UDP sockets, driven round-robin by one thread: an audience
//! of hundreds without hundreds of driver threads. Each socket receives with GRO where the
//! kernel has it (through quinn-udp), and with the 4 MiB receive buffer, as a gridcast peer's
//! does: a relay's GSO batches then reach a client whole, instead of being cut into datagrams
//! at the receiving socket.

use std::io::{ErrorKind, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::time::Instant;

use bytes::BytesMut;

use gridcast::keys::{ChannelId, NodeId, NodeKey};
use gridcast::node::{ChannelMode, Engine, EngineConfig, NodeEvent};
use gridcast::wire::{StartAt, SubstreamSet};

/// One client: its socket, engine and the chunks it played.
pub struct Client {
    pub socket: UdpSocket,
    state: quinn_udp::UdpSocketState,
    pub engine: Engine,
    pub played: Vec<u64>,
    /// Stream bytes in the chunks it played.
    pub played_bytes: u64,
    pub rebound_at: Option<usize>,
    /// Connections of this client that ended (refused, closed by the relay, timed out).
    pub lost: usize,
}

/// Every client's engine on its own socket, driven round-robin on this thread.
pub struct Clients {
    pub clients: Vec<Client>,
    buf: Vec<u8>,
    tx: Vec<u8>,
}

impl Clients {
    pub fn new(
        n: usize,
        relay: SocketAddr,
        relay_id: NodeId,
        channel: ChannelId,
        substreams: usize,
    ) -> Self {
        Self::with_config(
            n,
            relay,
            relay_id,
            channel,
            substreams,
            EngineConfig::default,
        )
    }

    /// As [`Clients::new`], each client's engine made with `config()`.
    pub fn with_config(
        n: usize,
        relay: SocketAddr,
        relay_id: NodeId,
        channel: ChannelId,
        substreams: usize,
        config: impl Fn() -> EngineConfig,
    ) -> Self {
        let now = Instant::now();
        let clients = (0..n)
            .map(|i| {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                socket.set_nonblocking(true).unwrap();
                // The receive buffer gridcast's own drivers ask for: with the kernel's default
                // a relay's burst overflows it, and the relay would be measured retransmitting
                // what a real peer's socket never dropped.
                let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
                let state = quinn_udp::UdpSocketState::new((&socket).into()).unwrap();
                let seed = [(i % 251) as u8, (i / 251) as u8 + 1, 0x5c, 7].repeat(8);
                let key = NodeKey::from_seed(&seed.try_into().unwrap());
                let mut engine = Engine::new(&key, config()).unwrap();
                engine.add_channel(channel, ChannelMode::Play);
                engine
                    .subscribe(
                        now,
                        relay,
                        relay_id,
                        channel,
                        SubstreamSet::first(substreams),
                        StartAt::Live,
                    )
                    .unwrap();
                Client {
                    socket,
                    state,
                    engine,
                    played: Vec::new(),
                    played_bytes: 0,
                    rebound_at: None,
                    lost: 0,
                }
            })
            .collect();
        Self {
            clients,
            buf: vec![0; 64 * 1024],
            tx: Vec::new(),
        }
    }

    /// One pass over every client. Returns whether anything happened.
    pub fn turn(&mut self) -> bool {
        let mut busy = false;
        for c in &mut self.clients {
            // Each client reads the clock itself, as a peer on its own host does: with one
            // reading per round over hundreds of clients, late rounds would stamp datagrams
            // and fire ACK timers milliseconds late, and the relay would see peers slower
            // than any real one.
            let now = Instant::now();
            loop {
                let mut meta = [quinn_udp::RecvMeta::default()];
                let received = c.state.recv(
                    (&c.socket).into(),
                    &mut [IoSliceMut::new(&mut self.buf)],
                    &mut meta,
                );
                match received {
                    Ok(_) => {
                        busy = true;
                        let [meta] = meta;
                        for datagram in self.buf[..meta.len].chunks(meta.stride.max(1)) {
                            c.engine.handle_datagram(
                                now,
                                meta.addr,
                                None,
                                None,
                                BytesMut::from(datagram),
                            );
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                    Err(e) => panic!("client recv: {e}"),
                }
            }
            if c.engine.poll_timeout().is_some_and(|t| t <= now) {
                c.engine.handle_timeout(now);
            }
            while let Some(t) = c.engine.poll_transmit(now, &mut self.tx) {
                busy = true;
                let size = t.segment_size.unwrap_or(t.size).max(1);
                for datagram in self.tx[..t.size].chunks(size) {
                    let _ = c.socket.send_to(datagram, t.destination);
                }
            }
            while let Some(ev) = c.engine.poll_event() {
                match ev {
                    NodeEvent::Chunk { seq, payload, .. } => {
                        c.played.push(seq);
                        c.played_bytes += payload.len() as u64;
                    }
                    NodeEvent::ConnectionLost { .. } => c.lost += 1,
                    _ => {}
                }
            }
        }
        busy
    }

    /// Moves client `i` to a new local port, as a NAT rebinding does.
    pub fn rebind(&mut self, i: usize) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let c = &mut self.clients[i];
        c.state = quinn_udp::UdpSocketState::new((&socket).into()).unwrap();
        c.socket = socket;
        c.rebound_at = Some(c.played.len());
    }
}
