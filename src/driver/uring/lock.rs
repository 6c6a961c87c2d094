//! One gridcast process per address and port. A reuseport group is one address and one port,
//! so nodes on different addresses of a host may share a port, each address's datagrams going
//! to its own; two processes in one group would split its connections between them. The lock
//! is an abstract Unix socket named after the address and port, held for the node's life and
//! released by the kernel when the process exits. The wildcard addresses of both families
//! count as one (`any`). A node on one address also refuses a port that a node on every
//! address serves, whose connections through that address it would take over; a wildcard
//! node that starts later takes nothing from it (the kernel prefers the socket bound to the
//! exact address).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;

use super::StartError;

/// Takes the lock for `ip` (the node's listening address) and `port`, held while the returned
/// socket lives. [`StartError::PortShared`] names what another node already serves.
pub(super) fn lock_port(ip: IpAddr, port: u16) -> Result<UnixDatagram, StartError> {
    let ip = ip.to_canonical();
    let lock = |host: &str| -> Result<UnixDatagram, StartError> {
        let name = format!("gridcast/udp/{host}/{port}");
        let name = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        UnixDatagram::bind_addr(&name).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                // The address the other node serves.
                let held = match (host, ip) {
                    ("any", IpAddr::V4(_)) => IpAddr::from([0; 4]),
                    ("any", IpAddr::V6(_)) => IpAddr::from([0u16; 8]),
                    _ => ip,
                };
                StartError::PortShared(SocketAddr::new(held, port))
            } else {
                StartError::Io(e)
            }
        })
    };
    if ip.is_unspecified() {
        return lock("any");
    }
    // Only probed: see the module documentation.
    drop(lock("any")?);
    lock(&ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_per_address_and_port_and_none_beside_a_wildcard_one() {
        // A port no test or node is likely to hold: the locks are host-wide names.
        let port = 61_917;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let first = lock_port(ip("127.0.0.1"), port).unwrap();
        assert!(matches!(
            lock_port(ip("::ffff:127.0.0.1"), port),
            Err(StartError::PortShared(a)) if a == SocketAddr::new(ip("127.0.0.1"), port)
        ));
        let beside = lock_port(ip("127.0.0.2"), port).unwrap();
        let every = lock_port(ip("::"), port).unwrap();
        assert!(matches!(
            lock_port(ip("0.0.0.0"), port),
            Err(StartError::PortShared(_))
        ));
        assert!(matches!(
            lock_port(ip("127.0.0.3"), port),
            Err(StartError::PortShared(a)) if a == SocketAddr::new(ip("0.0.0.0"), port)
        ));
        drop((first, beside, every));
        // Released with the socket.
        let again = lock_port(ip("127.0.0.1"), port).unwrap();
        drop(again);
    }
}
