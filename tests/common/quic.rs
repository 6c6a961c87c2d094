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
