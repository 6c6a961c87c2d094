//! Channel links: what a broadcaster or operator publishes and a viewer pastes.
//!
//! ```text
//! gridcast://<channel-id>@<host>:<port>/<node-id>[,<host>:<port>/<node-id>…]
//! ```
//!
//! The channel id says which stream (and carries the key every chunk is checked against); each
//! entry names a node to start from and the node id its TLS handshake must prove, so a link is
//! self-authenticating: nobody on the path can stand in for a listed node. Hosts are IPv4
//! literals, `[v6]` literals or DNS names.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use crate::keys::{ChannelId, ChannelIdError, NodeId, NodeIdError};
use crate::node::Candidate;

/// The scheme every link starts with.
pub const SCHEME: &str = "gridcast://";

/// A parsed channel link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelLink {
    /// The channel.
    pub channel: ChannelId,
    /// Nodes to start from, in the order given.
    pub nodes: Vec<LinkNode>,
}

/// One node of a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkNode {
    /// `host:port` as written (resolved when dialling).
    pub host: String,
    /// The identity the node must prove.
    pub node: NodeId,
}

/// Why a link was rejected.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Not a gridcast link.
    #[error("a channel link starts with {SCHEME}")]
    Scheme,
    /// No `@` between the channel id and the nodes.
    #[error("a channel link is {SCHEME}<channel-id>@<host>:<port>/<node-id>")]
    Shape,
    /// The channel id part is bad.
    #[error("bad channel id in link: {0}")]
    Channel(#[from] ChannelIdError),
    /// A node entry lacks its `/<node-id>`.
    #[error("node entry {0:?} has no /<node-id>")]
    MissingNodeId(String),
    /// A node id is bad.
    #[error("bad node id in entry {entry:?}: {source}")]
    NodeId {
        /// The entry.
        entry: String,
        /// Why.
        source: NodeIdError,
    },
    /// A host lacks a port.
    #[error("node entry {0:?} needs host:port")]
    Port(String),
    /// The link is longer than any real one.
    #[error("a channel link of {0} characters is too long (at most {MAX_LINK_LEN})")]
    TooLong(usize),
    /// A host did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// host:port.
        host: String,
        /// Why.
        source: std::io::Error,
    },
    /// A host resolved only to addresses of the other IP family than the local socket's.
    #[error(
        "{host} is {found}, which a node listening on {local} cannot reach; listen on {hint} \
         (--listen)"
    )]
    Unreachable {
        /// host:port.
        host: String,
        /// What it resolved to.
        found: String,
        /// The local address.
        local: SocketAddr,
        /// A listening address that reaches it (dual-stack).
        hint: SocketAddr,
    },
}

/// Whether a socket bound to `local` can send to `to`. An IPv4 socket reaches IPv4 addresses
/// only; one bound to the IPv6 wildcard is dual-stack (the drivers clear `IPV6_V6ONLY`) and
/// reaches both; one bound to a particular IPv6 address reaches IPv6 only.
pub fn reaches(local: SocketAddr, to: SocketAddr) -> bool {
    match local.ip() {
        std::net::IpAddr::V4(_) => to.is_ipv4(),
        std::net::IpAddr::V6(ip) => ip.is_unspecified() || to.is_ipv6(),
    }
}

/// The longest link accepted: room for dozens of nodes, far less than a pasted file.
pub const MAX_LINK_LEN: usize = 4096;

/// An entry as quoted in an error: whole if short, else its start (never the whole of a
/// pasted blob).
fn clip(entry: &str) -> String {
    const SHOWN: usize = 80;
    match entry.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}…", &entry[..cut]),
        None => entry.to_owned(),
    }
}

impl FromStr for ChannelLink {
    type Err = LinkError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() > MAX_LINK_LEN {
            return Err(LinkError::TooLong(text.len()));
        }
        // A bare channel id names no node: the nodes are found on the local network.
        if !text.contains("://")
            && let Ok(channel) = text.trim().parse::<ChannelId>()
        {
            return Ok(Self {
                channel,
                nodes: Vec::new(),
            });
        }
        let rest = text.trim().strip_prefix(SCHEME).ok_or(LinkError::Scheme)?;
        let (channel, nodes) = rest.split_once('@').ok_or(LinkError::Shape)?;
        let channel: ChannelId = channel.parse()?;
        let nodes = nodes
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<LinkNode>, _>>()?;
        Ok(Self { channel, nodes })
    }
}

impl FromStr for LinkNode {
    type Err = LinkError;

    /// `host:port/node-id`, one node of a link (and a relay's `--bootstrap`).
    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        if entry.len() > MAX_LINK_LEN {
            return Err(LinkError::TooLong(entry.len()));
        }
        let (host, id) = entry
            .rsplit_once('/')
            .ok_or_else(|| LinkError::MissingNodeId(clip(entry)))?;
        let node = id.parse().map_err(|source| LinkError::NodeId {
            entry: clip(entry),
            source,
        })?;
        let port = host.rsplit_once(':').map(|(_, p)| p);
        if port.is_none_or(|p| p.parse::<u16>().is_err()) {
            return Err(LinkError::Port(clip(entry)));
        }
        Ok(LinkNode {
            host: host.to_owned(),
            node,
        })
    }
}

impl LinkNode {
    /// The node as a dialling candidate for a node listening on `local`: its host resolved,
    /// the first address of a family that `local` reaches (a name with IPv6 and IPv4
    /// addresses, dialled from an IPv4 socket, is dialled at its IPv4 one).
    pub fn candidate(&self, local: SocketAddr) -> Result<Candidate, LinkError> {
        let found: Vec<SocketAddr> = self
            .host
            .to_socket_addrs()
            .map_err(|source| LinkError::Resolve {
                host: self.host.clone(),
                source,
            })?
            .collect();
        let Some(&addr) = found.iter().find(|&&a| reaches(local, a)) else {
            let Some(first) = found.first() else {
                return Err(LinkError::Resolve {
                    host: self.host.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
                });
            };
            // The IPv6 wildcard is dual-stack: it reaches both families.
            let hint = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), local.port());
            let family = if first.is_ipv6() { "IPv6" } else { "IPv4" };
            let list: Vec<String> = found.iter().take(4).map(|a| a.ip().to_string()).collect();
            return Err(LinkError::Unreachable {
                host: self.host.clone(),
                found: format!("{family} only ({})", list.join(", ")),
                local,
                hint,
            });
        };
        Ok(Candidate {
            addr,
            node: self.node,
        })
    }
}

impl fmt::Display for ChannelLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}@", self.channel)?;
        for (i, n) in self.nodes.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}/{}", n.host, n.node)?;
        }
        Ok(())
    }
}

impl ChannelLink {
    /// A link naming one node by address.
    pub fn single(channel: ChannelId, addr: SocketAddr, node: NodeId) -> Self {
        Self {
            channel,
            nodes: vec![LinkNode {
                host: addr.to_string(),
                node,
            }],
        }
    }

    /// The nodes as dialling candidates for a node listening on `local` (DNS names resolved,
    /// the first address `local` reaches each; see [`LinkNode::candidate`]).
    pub fn candidates(&self, local: SocketAddr) -> Result<Vec<Candidate>, LinkError> {
        self.nodes.iter().map(|n| n.candidate(local)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{ChannelKey, NodeKey};

    #[test]
    fn a_bare_channel_id_is_a_link_naming_no_node() {
        let channel = ChannelKey::from_seed(&[2; 32]).channel_id();
        let link: ChannelLink = channel.to_string().parse().unwrap();
        assert_eq!(link.channel, channel);
        assert!(link.nodes.is_empty());
        let typo = format!("{}x", &channel.to_string()[1..]);
        assert!(typo.parse::<ChannelLink>().is_err());
    }

    #[test]
    fn a_node_is_dialled_at_an_address_the_local_socket_reaches() {
        let any6: SocketAddr = "[::]:0".parse().unwrap();
        let any4: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let lo6: SocketAddr = "[::1]:0".parse().unwrap();
        let (v4, v6): (SocketAddr, SocketAddr) = (
            "127.0.0.1:4433".parse().unwrap(),
            "[::1]:4433".parse().unwrap(),
        );
        assert!(
            reaches(any6, v4) && reaches(any6, v6),
            "the wildcard is dual-stack"
        );
        assert!(reaches(any4, v4) && !reaches(any4, v6));
        assert!(reaches(lo6, v6) && !reaches(lo6, v4));

        let node = NodeKey::from_seed(&[2; 32]).node_id();
        let entry: LinkNode = format!("[::1]:4433/{node}").parse().unwrap();
        assert_eq!(entry.candidate(any6).unwrap().addr, v6);
        let err = entry.candidate(any4).unwrap_err().to_string();
        assert!(
            err.contains("IPv6 only (::1)") && err.contains("0.0.0.0:0") && err.contains("[::]:0"),
            "{err}"
        );
        let entry: LinkNode = format!("127.0.0.1:4433/{node}").parse().unwrap();
        assert_eq!(entry.candidate(any4).unwrap().addr, v4);
        assert!(
            entry
                .candidate(lo6)
                .unwrap_err()
                .to_string()
                .contains("IPv4 only")
        );
    }

    #[test]
    fn an_over_long_link_or_entry_is_not_echoed_whole() {
        let huge = format!("gridcast://{}", "x".repeat(100_000));
        let err = huge.parse::<ChannelLink>().unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
        assert!(err.contains("too long"));
        let channel = ChannelKey::from_seed(&[1; 32]).channel_id();
        let entry = format!("gridcast://{channel}@{}:1", "h".repeat(1000));
        let err = entry.parse::<ChannelLink>().unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
        assert!(err.contains("has no /<node-id>"), "{err}");
    }

    fn sample() -> ChannelLink {
        ChannelLink {
            channel: ChannelKey::from_seed(&[1; 32]).channel_id(),
            nodes: vec![
                LinkNode {
                    host: "127.0.0.1:4433".into(),
                    node: NodeKey::from_seed(&[2; 32]).node_id(),
                },
                LinkNode {
                    host: "[::1]:4434".into(),
                    node: NodeKey::from_seed(&[3; 32]).node_id(),
                },
            ],
        }
    }

    #[test]
    fn a_link_round_trips_through_its_text() {
        let link = sample();
        let text = link.to_string();
        assert!(text.starts_with("gridcast://"));
        assert_eq!(text.parse::<ChannelLink>().unwrap(), link);
        let c = link.candidates("[::]:0".parse().unwrap()).unwrap();
        assert_eq!(c[1].addr, "[::1]:4434".parse().unwrap());
        assert_eq!(c[0].node, link.nodes[0].node);
    }

    #[test]
    fn bad_links_name_what_is_wrong() {
        let good = sample().to_string();
        let id = sample().channel.to_string();
        let typo = format!("{}{}", &id[..5], if &id[5..6] == "a" { "b" } else { "a" });
        let cases = [
            ("http://x".to_owned(), "starts with"),
            ("gridcast://abc".to_owned(), "<channel-id>@"),
            (good.replacen(&id[..6], &typo, 1), "channel id"),
            (
                good.replace("/", "|")
                    .replacen("gridcast:||", "gridcast://", 1),
                "no /<node-id>",
            ),
            (good.replace(":4433", ""), "host:port"),
            (good[..good.len() - 3].to_owned(), "bad node id"),
        ];
        for (text, want) in cases {
            let err = text.parse::<ChannelLink>().unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
