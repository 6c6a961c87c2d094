//! How every TCP listener of a node is bound: the HTTP layer's listeners (admin, Icecast
//! source endpoint, players' output) and the `tcp://` input.

use std::net::TcpListener;

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
