//! LAN discovery by mDNS (the `mdns-sd` crate, an adapter outside the engine): a relay
//! announces `_gridcast._udp.local.` with its node id and the channels it carries in the TXT
//! record; `gridcast play <channel id>` with no address browses for a node that carries the
//! channel and draws from it. A record is only a hint: the TLS handshake proves the node id
//! it names, so a spoofed record costs a failed dial and nothing else.
//!
//! TXT keys: `node` (the node id), `c0`, `c1`, … (channel ids, at most [`MAX_CHANNELS`]).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context;
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::keys::{ChannelId, NodeId};
use crate::node::Candidate;

/// The DNS-SD service type.
pub const SERVICE: &str = "_gridcast._udp.local.";
/// Most channels one record lists (a TXT record holds about 8 KB; 56 characters each).
pub const MAX_CHANNELS: usize = 64;
/// Most nodes a browse keeps.
const MAX_FOUND: usize = 32;

/// A node's announcement, withdrawn when dropped.
pub struct LanAnnouncer {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for LanAnnouncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanAnnouncer")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

impl LanAnnouncer {
    /// Announces `node` serving on `port` (on every interface address, or on `ip` only when
    /// the node listens on one), carrying `channels`.
    pub fn start(
        node: NodeId,
        ip: Option<IpAddr>,
        port: u16,
        channels: &[ChannelId],
    ) -> anyhow::Result<Self> {
        let daemon = ServiceDaemon::new().context("starting mDNS")?;
        let id = node.to_string();
        let mut props: Vec<(String, String)> = vec![("node".to_owned(), id.clone())];
        for (i, c) in channels.iter().take(MAX_CHANNELS).enumerate() {
            props.push((format!("c{i}"), c.to_string()));
        }
        let host = format!("gridcast-{}.local.", &id[..16]);
        let addrs = ip.map(|ip| ip.to_string()).unwrap_or_default();
        let mut info = ServiceInfo::new(SERVICE, &id, &host, addrs.as_str(), port, &props[..])
            .context("building the mDNS record")?;
        if ip.is_none() {
            info = info.enable_addr_auto();
        }
        let fullname = info.get_fullname().to_owned();
        daemon.register(info).context("announcing by mDNS")?;
        Ok(Self { daemon, fullname })
    }
}

impl Drop for LanAnnouncer {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

/// Browses the local network for nodes that carry `channel`: waits up to `wait`, and once one
/// is found at most `settle` more for others. Returns them as dialling candidates (each
/// address of each node), nearest-looking first (IPv4 before IPv6).
#[allow(clippy::disallowed_methods)] // the browse deadline reads the clock
pub fn find(
    channel: ChannelId,
    wait: Duration,
    settle: Duration,
) -> anyhow::Result<Vec<Candidate>> {
    let daemon = ServiceDaemon::new().context("starting mDNS")?;
    let events = daemon.browse(SERVICE).context("browsing by mDNS")?;
    let wanted = channel.to_string();
    let started = Instant::now();
    let mut deadline = started + wait;
    let mut found: Vec<Candidate> = Vec::new();
    let mut seen: HashSet<SocketAddr> = HashSet::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(event) = events.recv_timeout(left) else {
            break;
        };
        let ServiceEvent::ServiceResolved(info) = event else {
            continue;
        };
        let props = &info.txt_properties;
        let Some(node) = props
            .get_property_val_str("node")
            .and_then(|n| n.parse::<NodeId>().ok())
        else {
            continue;
        };
        let carries = (0..MAX_CHANNELS)
            .any(|i| props.get_property_val_str(&format!("c{i}")) == Some(wanted.as_str()));
        if !carries {
            continue;
        }
        let mut addrs: Vec<SocketAddr> = info
            .get_addresses()
            .iter()
            .filter_map(|a| dialable(a, info.port))
            .collect();
        addrs.sort_by_key(SocketAddr::is_ipv6);
        for addr in addrs {
            if found.len() < MAX_FOUND && seen.insert(addr) {
                found.push(Candidate { addr, node });
            }
        }
        if !found.is_empty() {
            deadline = deadline.min(Instant::now() + settle);
        }
    }
    let _ = daemon.shutdown();
    Ok(found)
}

/// An announced address as one to dial. An IPv6 link-local address is only usable with the
/// interface it was seen on (its scope): kept with it, dropped where the record lacks one.
fn dialable(ip: &mdns_sd::ScopedIp, port: u16) -> Option<SocketAddr> {
    match ip {
        mdns_sd::ScopedIp::V6(v6) if v6.addr().is_unicast_link_local() => {
            let scope = v6.scope_id().index;
            (scope != 0).then(|| std::net::SocketAddrV6::new(*v6.addr(), port, 0, scope).into())
        }
        other => Some(SocketAddr::new(other.to_ip_addr(), port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_local_address_without_its_interface_is_not_dialled() {
        let at = |ip: &str| {
            dialable(
                &mdns_sd::ScopedIp::from(ip.parse::<IpAddr>().unwrap()),
                4434,
            )
        };
        assert_eq!(at("192.0.2.7"), Some("192.0.2.7:4434".parse().unwrap()));
        assert_eq!(
            at("2001:db8::7"),
            Some("[2001:db8::7]:4434".parse().unwrap())
        );
        // A record without a scope: an fe80:: address that no socket could send to.
        assert_eq!(at("fe80::1"), None);
    }
}
