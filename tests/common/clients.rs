//! Many client engines on their own UDP sockets, driven round-robin by one thread: an audience
//! of hundreds without hundreds of driver threads.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::Instant;

use bytes::BytesMut;

use gridcast::keys::{ChannelId, NodeId, NodeKey};
use gridcast::node::{ChannelMode, Engine, EngineConfig, NodeEvent};
use gridcast::wire::{StartAt, SubstreamSet};

/// One client: its socket, engine and the chunks it played.
pub struct Client {
    pub socket: UdpSocket,
    pub engine: Engine,
    pub played: Vec<u64>,
    pub rebound_at: Option<usize>,
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
        let now = Instant::now();
        let clients = (0..n)
            .map(|i| {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                socket.set_nonblocking(true).unwrap();
                let seed = [(i % 251) as u8, (i / 251) as u8 + 1, 0x5c, 7].repeat(8);
                let key = NodeKey::from_seed(&seed.try_into().unwrap());
                let mut engine = Engine::new(&key, EngineConfig::default()).unwrap();
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
                    engine,
                    played: Vec::new(),
                    rebound_at: None,
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
        let now = Instant::now();
        let mut busy = false;
        for c in &mut self.clients {
            loop {
                match c.socket.recv_from(&mut self.buf) {
                    Ok((n, from)) => {
                        busy = true;
                        c.engine.handle_datagram(
                            now,
                            from,
                            None,
                            None,
                            BytesMut::from(&self.buf[..n]),
                        );
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
                if let NodeEvent::Chunk { seq, .. } = ev {
                    c.played.push(seq);
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
        c.socket = socket;
        c.rebound_at = Some(c.played.len());
    }
}
