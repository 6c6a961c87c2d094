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
    /// Whether the host is a name (looked up, and so able to change), not an address.
    pub fn is_name(&self) -> bool {
        self.host.parse::<SocketAddr>().is_err()
    }

    /// Every address of the node that a node listening on `local` can dial, in the order to
    /// try them: the resolver's (RFC 6724's preference), with the two IP families taking
    /// turns after the first (RFC 8305, section 4), so that a family whose addresses all fail
    /// costs one attempt, not all of them. A name with IPv6 and IPv4 addresses, dialled from
    /// an IPv4 socket, gives its IPv4 ones only.
    pub fn addresses(&self, local: SocketAddr) -> Result<Vec<SocketAddr>, LinkError> {
        let found: Vec<SocketAddr> = self
            .host
            .to_socket_addrs()
            .map_err(|source| LinkError::Resolve {
                host: self.host.clone(),
                source,
            })?
            .collect();
        let usable: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|&a| reaches(local, a))
            .collect();
        if usable.is_empty() {
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
        }
        Ok(interleave_families(usable))
    }

    /// The node as a dialling candidate for a node listening on `local`: the first of its
    /// [`LinkNode::addresses`].
    pub fn candidate(&self, local: SocketAddr) -> Result<Candidate, LinkError> {
        let addrs = self.addresses(local)?;
        Ok(Candidate {
            addr: addrs[0],
            node: self.node,
        })
    }
}

/// `addrs` without repeats, the family of the first and the other taking turns.
fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut unique: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
    for a in addrs {
        if !unique.contains(&a) {
            unique.push(a);
        }
    }
    let Some(first) = unique.first() else {
        return unique;
    };
    let v6_first = first.is_ipv6();
    let (mut lead, mut other): (std::collections::VecDeque<_>, std::collections::VecDeque<_>) =
        unique.iter().partition(|a| a.is_ipv6() == v6_first);
    let mut out = Vec::with_capacity(unique.len());
    loop {
        match (lead.pop_front(), other.pop_front()) {
            (None, None) => break,
            (a, b) => out.extend(a.into_iter().chain(b).copied()),
        }
    }
    out
}

/// A link's nodes resolved for dialling (see [`ChannelLink::resolve`]).
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    /// Each node once, at the first address to dial it at.
    pub candidates: Vec<Candidate>,
    /// The nodes known at more than one address, with all of them in the order to try them:
    /// for [`crate::node::Engine::learn_addresses`].
    pub addresses: Vec<(NodeId, Vec<SocketAddr>)>,
}

impl Resolved {
    /// Adds `more`'s nodes (another link's): a node already here gains the addresses it
    /// did not have, after its own.
    pub fn merge(&mut self, more: Resolved) {
        let mut book = std::mem::take(&mut self.addresses);
        for c in &self.candidates {
            if !book.iter().any(|(n, _)| *n == c.node) {
                book.push((c.node, vec![c.addr]));
            }
        }
        for c in more.candidates {
            let addrs = more
                .addresses
                .iter()
                .find(|(n, _)| *n == c.node)
                .map_or_else(|| vec![c.addr], |(_, a)| a.clone());
            match book.iter_mut().find(|(n, _)| *n == c.node) {
                Some((_, known)) => {
                    for a in addrs {
                        if !known.contains(&a) {
                            known.push(a);
                        }
                    }
                }
                None => {
                    self.candidates.push(c);
                    book.push((c.node, addrs));
                }
            }
        }
        book.retain(|(_, a)| a.len() > 1);
        self.addresses = book;
    }

    /// Removes node `node` (a relay's own id in a link it joins).
    pub fn without(mut self, node: NodeId) -> Self {
        self.candidates.retain(|c| c.node != node);
        self.addresses.retain(|(n, _)| *n != node);
        self
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

    /// The nodes as dialling candidates for a node listening on `local`: each node once, at
    /// the first address `local` reaches (see [`ChannelLink::resolve`]).
    pub fn candidates(&self, local: SocketAddr) -> Result<Vec<Candidate>, LinkError> {
        Ok(self.resolve(local)?.candidates)
    }

    /// The nodes resolved for a node listening on `local` (DNS names looked up, each entry's
    /// [`LinkNode::addresses`]). A node the link names more than once is one candidate with
    /// every entry's addresses, in the link's order; an entry `local` cannot reach is an
    /// error only if its node has no other.
    pub fn resolve(&self, local: SocketAddr) -> Result<Resolved, LinkError> {
        resolve_nodes(&self.nodes, local)
    }
}

/// `nodes` resolved for a node listening on `local`, as [`ChannelLink::resolve`] does (a
/// link's entries, or a relay's bootstrap nodes).
pub fn resolve_nodes(nodes: &[LinkNode], local: SocketAddr) -> Result<Resolved, LinkError> {
    let mut book = address_book(nodes, local)?;
    let candidates = book
        .iter()
        .map(|(node, addrs)| Candidate {
            addr: addrs[0],
            node: *node,
        })
        .collect();
    book.retain(|(_, addrs)| addrs.len() > 1);
    Ok(Resolved {
        candidates,
        addresses: book,
    })
}

/// Every node of `nodes` once, with all its addresses that a node listening on `local`
/// reaches, in the order to try them (each entry's [`LinkNode::addresses`], the entries in
/// order). An entry that does not resolve, or that `local` cannot reach, is an error only
/// if its node has no other.
pub fn address_book(
    nodes: &[LinkNode],
    local: SocketAddr,
) -> Result<Vec<(NodeId, Vec<SocketAddr>)>, LinkError> {
    let mut book: Vec<(NodeId, Vec<SocketAddr>)> = Vec::new();
    let mut failed: Vec<(NodeId, LinkError)> = Vec::new();
    for n in nodes {
        match n.addresses(local) {
            Ok(addrs) => match book.iter_mut().find(|(id, _)| *id == n.node) {
                Some((_, known)) => {
                    for a in addrs {
                        if !known.contains(&a) {
                            known.push(a);
                        }
                    }
                }
                None => book.push((n.node, addrs)),
            },
            Err(err) => failed.push((n.node, err)),
        }
    }
    for (node, err) in failed {
        if !book.iter().any(|(id, _)| *id == node) {
            return Err(err);
        }
    }
    Ok(book)
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
    fn the_families_take_turns_after_the_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let list = vec![
            a("[2001:db8::1]:1"),
            a("[2001:db8::2]:1"),
            a("[2001:db8::1]:1"),
            a("192.0.2.1:1"),
            a("[2001:db8::3]:1"),
            a("192.0.2.2:1"),
        ];
        assert_eq!(
            interleave_families(list),
            vec![
                a("[2001:db8::1]:1"),
                a("192.0.2.1:1"),
                a("[2001:db8::2]:1"),
                a("192.0.2.2:1"),
                a("[2001:db8::3]:1"),
            ]
        );
        let v4_first = vec![a("192.0.2.1:1"), a("[2001:db8::1]:1"), a("[2001:db8::2]:1")];
        assert_eq!(
            interleave_families(v4_first),
            vec![a("192.0.2.1:1"), a("[2001:db8::1]:1"), a("[2001:db8::2]:1")]
        );
    }

    #[test]
    fn a_node_named_twice_is_one_candidate_with_both_addresses() {
        let any6: SocketAddr = "[::]:0".parse().unwrap();
        let any4: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let channel = ChannelKey::from_seed(&[2; 32]).channel_id();
        let x = NodeKey::from_seed(&[3; 32]).node_id();
        let y = NodeKey::from_seed(&[4; 32]).node_id();
        let link: ChannelLink =
            format!("gridcast://{channel}@[::1]:4433/{x},127.0.0.1:4434/{y},127.0.0.1:4433/{x}")
                .parse()
                .unwrap();
        let r = link.resolve(any6).unwrap();
        let addrs: Vec<(NodeId, SocketAddr)> =
            r.candidates.iter().map(|c| (c.node, c.addr)).collect();
        assert_eq!(
            addrs,
            vec![
                (x, "[::1]:4433".parse().unwrap()),
                (y, "127.0.0.1:4434".parse().unwrap())
            ]
        );
        assert_eq!(
            r.addresses,
            vec![(
                x,
                vec![
                    "[::1]:4433".parse().unwrap(),
                    "127.0.0.1:4433".parse().unwrap()
                ]
            )]
        );
        // An IPv4 socket cannot reach the IPv6 entry; the node's other one serves.
        let r = link.resolve(any4).unwrap();
        let at = |r: &Resolved, n: NodeId| r.candidates.iter().find(|c| c.node == n).unwrap().addr;
        assert_eq!(at(&r, x), "127.0.0.1:4433".parse().unwrap());
        assert!(r.addresses.is_empty());
        // A node with no entry the socket reaches is still an error.
        let only6: ChannelLink = format!("gridcast://{channel}@[::1]:4433/{x},127.0.0.1:4434/{y}")
            .parse()
            .unwrap();
        assert!(only6.resolve(any4).is_err());

        // Two links naming the same node at different addresses: one candidate, every
        // address once, the first link's first.
        let other: ChannelLink = format!("gridcast://{channel}@127.0.0.2:4433/{x}")
            .parse()
            .unwrap();
        let mut all = link.resolve(any6).unwrap();
        all.merge(other.resolve(any6).unwrap());
        assert_eq!(all.candidates.len(), 2);
        assert_eq!(
            all.addresses,
            vec![(
                x,
                vec![
                    "[::1]:4433".parse().unwrap(),
                    "127.0.0.1:4433".parse().unwrap(),
                    "127.0.0.2:4433".parse().unwrap()
                ]
            )]
        );
        assert!(all.without(x).addresses.is_empty());
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
