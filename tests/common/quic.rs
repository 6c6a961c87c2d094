//! A foreign child: a plain quinn client on loopback that proves a node key of its own and
//! dials a gridcast node, for tests of what a node does with clients it did not write.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use gridcast::keys::{NodeId, NodeKey};
use gridcast::node::tls::{self, Identity};

/// Dials `node` at `addr` with the node key made from `seed`; `None` if the handshake failed.
/// The endpoint is returned too: it must outlive the connection. Call inside a tokio runtime.
pub async fn dial(
    addr: SocketAddr,
    node: NodeId,
    seed: u8,
) -> Option<(quinn::Endpoint, quinn::Connection)> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let me = Identity::new(&NodeKey::from_seed(&[seed; 32])).unwrap();
    let config = quinn::ClientConfig::new(tls::client_crypto(node, &me).unwrap());
    let conn = endpoint
        .connect_with(config, addr, tls::SERVER_NAME)
        .unwrap()
        .await
        .ok()?;
    Some((endpoint, conn))
}

/// A single-threaded tokio runtime for one client's session.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A real node (portable backend, real UDP on loopback) serving one channel as its source, a
/// 16-KB chunk published every 100 ms (for at most 30 s) until [`PublishingNode::stop`].
pub struct PublishingNode {
    pub node: gridcast::driver::Node,
    pub id: NodeId,
    pub channel: gridcast::keys::ChannelId,
    done: Arc<std::sync::atomic::AtomicBool>,
    feeder: Option<std::thread::JoinHandle<()>>,
}

impl PublishingNode {
    /// Starts it, with the node key and channel key made from the seeds.
    pub fn start(node_seed: u8, channel_seed: u8) -> Self {
        use gridcast::driver::{IoBackend, Node};
        use gridcast::keys::ChannelKey;
        use gridcast::node::{ChannelMode, Engine, EngineConfig};
        use gridcast::stream::{ChunkFlags, ChunkPublisher, CodingParams};
        use gridcast::wire::Role;
        use std::sync::atomic::{AtomicBool, Ordering};

        let key = NodeKey::from_seed(&[node_seed; 32]);
        let channel_key = ChannelKey::from_seed(&[channel_seed; 32]);
        let channel = channel_key.channel_id();
        let (events, _ev) = std::sync::mpsc::channel();
        let node = Node::start(
            IoBackend::Portable,
            "127.0.0.1:0".parse().unwrap(),
            1,
            |tag| {
                Engine::new(
                    &key,
                    EngineConfig {
                        role: Role::Source,
                        serve: true,
                        worker: Some(tag),
                        ..Default::default()
                    },
                )
            },
            &events,
        )
        .unwrap();
        assert!(node.command(
            0,
            Box::new(move |e, _| e.add_channel(channel, ChannelMode::Source)),
        ));
        let done = Arc::new(AtomicBool::new(false));
        let feeder = {
            let done = Arc::clone(&done);
            let node = node.commander();
            std::thread::spawn(move || {
                let mut publisher = ChunkPublisher::new(channel_key, CodingParams::DEFAULT);
                let body = bytes::Bytes::from(vec![0x5a; 16 * 1024]);
                for seq in 0..300u64 {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    let coded = publisher
                        .publish(seq, seq * 100_000, ChunkFlags::RANDOM_ACCESS, &body)
                        .unwrap();
                    node.command(
                        0,
                        Box::new(move |e, now| e.publish(now, channel, &coded).unwrap()),
                    );
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
        };
        Self {
            node,
            id: key.node_id(),
            channel,
            done,
            feeder: Some(feeder),
        }
    }

    /// Stops publishing (the node itself stops when dropped).
    pub fn stop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(feeder) = self.feeder.take() {
            feeder.join().unwrap();
        }
    }
}

/// Opens the control stream and sends Hello and a Subscribe numbered `sub` for all 16
/// substreams of `channel` from the live edge. Returns the control stream's two halves.
pub async fn hello_and_subscribe(
    conn: &quinn::Connection,
    sub: u32,
    channel: gridcast::keys::ChannelId,
) -> (quinn::SendStream, quinn::RecvStream) {
    hello_and_subscribe_from(conn, sub, channel, gridcast::wire::StartAt::Live).await
}

/// [`hello_and_subscribe`] from `start`.
pub async fn hello_and_subscribe_from(
    conn: &quinn::Connection,
    sub: u32,
    channel: gridcast::keys::ChannelId,
    start: gridcast::wire::StartAt,
) -> (quinn::SendStream, quinn::RecvStream) {
    use gridcast::wire::{Hello, Message, PROTOCOL_VERSION, Role, Subscribe, SubstreamSet};
    let (mut control, replies) = conn.open_bi().await.unwrap();
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Peer,
        agent: "gridcast-test-child".into(),
        serves: false,
    });
    let subscribe = Message::Subscribe(Subscribe {
        sub,
        channel,
        substreams: SubstreamSet::from_bits(0xffff),
        start,
    });
    control.write_all(&hello.to_bytes()).await.unwrap();
    control.write_all(&subscribe.to_bytes()).await.unwrap();
    (control, replies)
}
