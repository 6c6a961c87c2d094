//! The messages that send a node elsewhere: parent queries and their answers, go-aways, and
//! refusals, each naming candidate parents ([`ParentCandidate`]: node id, addresses, load).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes};

use super::{
    Codec, DecodeError, MAX_ADDRS_PER_PARENT, MAX_PARENTS, get_array, get_len, get_u8, get_u16,
    put_varint, varint_len,
};
use crate::keys::{ChannelId, NodeId, PUBLIC_KEY_LEN};

use super::messages::get_sub;

/// Ask a node for candidate parents carrying a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentQuery {
    /// Query id, echoed in the answer.
    pub query: u32,
    /// The channel.
    pub channel: ChannelId,
    /// Most candidates wanted (at most [`MAX_PARENTS`]).
    pub max: u8,
}

impl Codec for ParentQuery {
    fn encoded_len(&self) -> usize {
        varint_len(u64::from(self.query)) + PUBLIC_KEY_LEN + 1
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_varint(buf, u64::from(self.query));
        self.channel.encode(buf);
        buf.put_u8(self.max);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let query = get_sub(buf, "parent_query.query")?;
        let channel = ChannelId::decode(buf)?;
        let max = get_u8(buf, "parent_query.max")?;
        if max == 0 || usize::from(max) > MAX_PARENTS {
            return Err(DecodeError::Invalid("parent_query.max"));
        }
        Ok(Self {
            query,
            channel,
            max,
        })
    }
}

/// A node that can serve substreams, as named in answers and go-aways.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentCandidate {
    /// Its node id, checked against its TLS certificate when dialled.
    pub node: NodeId,
    /// Addresses to dial (1 to [`MAX_ADDRS_PER_PARENT`]).
    pub addrs: Vec<SocketAddr>,
    /// Load in permille of its capacity (0 idle ..= 1000 full).
    pub load_permille: u16,
}

fn addr_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 1 + 4 + 2,
        SocketAddr::V6(_) => 1 + 16 + 2,
    }
}

fn put_addr(buf: &mut impl BufMut, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            buf.put_u8(4);
            buf.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            buf.put_u8(6);
            buf.put_slice(&ip.octets());
        }
    }
    buf.put_u16(addr.port());
}

fn get_addr(buf: &mut Bytes, what: &'static str) -> Result<SocketAddr, DecodeError> {
    let ip = match get_u8(buf, what)? {
        4 => IpAddr::V4(Ipv4Addr::from(get_array::<4>(buf, what)?)),
        6 => IpAddr::V6(Ipv6Addr::from(get_array::<16>(buf, what)?)),
        _ => return Err(DecodeError::Invalid(what)),
    };
    let port = get_u16(buf, what)?;
    Ok(SocketAddr::new(ip, port))
}

impl Codec for ParentCandidate {
    fn encoded_len(&self) -> usize {
        PUBLIC_KEY_LEN
            + varint_len(self.addrs.len() as u64)
            + self.addrs.iter().map(addr_len).sum::<usize>()
            + 2
    }

    fn encode(&self, buf: &mut impl BufMut) {
        buf.put_slice(self.node.as_bytes());
        put_varint(buf, self.addrs.len() as u64);
        for addr in &self.addrs {
            put_addr(buf, addr);
        }
        buf.put_u16(self.load_permille);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let node = NodeId::from_bytes(get_array(buf, "parent.node")?);
        let count = get_len(buf, MAX_ADDRS_PER_PARENT, "parent.addrs")?;
        if count == 0 {
            return Err(DecodeError::Invalid("parent.addrs"));
        }
        let mut addrs = Vec::with_capacity(count);
        for _ in 0..count {
            addrs.push(get_addr(buf, "parent.addr")?);
        }
        let load_permille = get_u16(buf, "parent.load")?;
        if load_permille > 1000 {
            return Err(DecodeError::Invalid("parent.load"));
        }
        Ok(Self {
            node,
            addrs,
            load_permille,
        })
    }
}

/// From a parent to a serving child it has just named to another node: that node will dial
/// the child from `addr`. The child sends `addr` a datagram first, which opens the child's NAT
/// or stateful firewall to it (hole punching, with the parent as the go-between that both
/// already reach).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Punch {
    /// Where the node the child was named to will dial it from, as the parent sees that node.
    pub addr: SocketAddr,
}

impl Codec for Punch {
    fn encoded_len(&self) -> usize {
        addr_len(&self.addr)
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_addr(buf, &self.addr);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        Ok(Self {
            addr: get_addr(buf, "punch.addr")?,
        })
    }
}

fn parents_len(parents: &[ParentCandidate]) -> usize {
    varint_len(parents.len() as u64) + parents.iter().map(Codec::encoded_len).sum::<usize>()
}

fn put_parents(buf: &mut impl BufMut, parents: &[ParentCandidate]) {
    put_varint(buf, parents.len() as u64);
    for p in parents {
        p.encode(buf);
    }
}

fn get_parents(buf: &mut Bytes, what: &'static str) -> Result<Vec<ParentCandidate>, DecodeError> {
    let count = get_len(buf, MAX_PARENTS, what)?;
    let mut parents = Vec::with_capacity(count);
    for _ in 0..count {
        parents.push(ParentCandidate::decode(buf)?);
    }
    Ok(parents)
}

/// Candidate parents for a channel, best first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentAnswer {
    /// The query answered.
    pub query: u32,
    /// Candidates (at most [`MAX_PARENTS`]).
    pub parents: Vec<ParentCandidate>,
}

impl Codec for ParentAnswer {
    fn encoded_len(&self) -> usize {
        varint_len(u64::from(self.query)) + parents_len(&self.parents)
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_varint(buf, u64::from(self.query));
        put_parents(buf, &self.parents);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        Ok(Self {
            query: get_sub(buf, "parent_answer.query")?,
            parents: get_parents(buf, "parent_answer.parents")?,
        })
    }
}

/// Why a node is asking its neighbours to leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GoAwayReason {
    /// The node is draining before shutdown.
    Shutdown,
    /// The node is over capacity.
    Overloaded,
    /// The node stopped carrying the channel(s).
    ChannelGone,
}

/// Leave this node soon; here are alternatives. Sent on drain, before the connection closes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoAway {
    /// Why.
    pub reason: GoAwayReason,
    /// Parents to move to (at most [`MAX_PARENTS`]).
    pub alternatives: Vec<ParentCandidate>,
}

impl Codec for GoAway {
    fn encoded_len(&self) -> usize {
        1 + parents_len(&self.alternatives)
    }

    fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(match self.reason {
            GoAwayReason::Shutdown => 0,
            GoAwayReason::Overloaded => 1,
            GoAwayReason::ChannelGone => 2,
        });
        put_parents(buf, &self.alternatives);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let reason = match get_u8(buf, "go_away.reason")? {
            0 => GoAwayReason::Shutdown,
            1 => GoAwayReason::Overloaded,
            2 => GoAwayReason::ChannelGone,
            _ => return Err(DecodeError::Invalid("go_away.reason")),
        };
        Ok(Self {
            reason,
            alternatives: get_parents(buf, "go_away.alternatives")?,
        })
    }
}

/// Why a node refuses a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// The node does not carry the channel.
    NotCarried,
    /// The node serves as many subscriptions as it may.
    Full,
    /// The node is draining before shutdown.
    Draining,
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotCarried => "does not carry the channel",
            Self::Full => "is full",
            Self::Draining => "is draining",
        })
    }
}

/// The answer to a [`Subscribe`] the node will not serve, sent at once so that the asker never
/// waits in silence; it names other nodes that carry the channel when the refusing node
/// knows some.
///
/// Body: `sub (varint) | channel | reason u8 | parents`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The refused subscription.
    pub sub: u32,
    /// Its channel.
    pub channel: ChannelId,
    /// Why.
    pub reason: RefuseReason,
    /// Nodes to ask instead (at most [`MAX_PARENTS`]).
    pub alternatives: Vec<ParentCandidate>,
}

impl Codec for Refused {
    fn encoded_len(&self) -> usize {
        varint_len(u64::from(self.sub)) + PUBLIC_KEY_LEN + 1 + parents_len(&self.alternatives)
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_varint(buf, u64::from(self.sub));
        self.channel.encode(buf);
        buf.put_u8(match self.reason {
            RefuseReason::NotCarried => 0,
            RefuseReason::Full => 1,
            RefuseReason::Draining => 2,
        });
        put_parents(buf, &self.alternatives);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let sub = get_sub(buf, "refused.sub")?;
        let channel = ChannelId::decode(buf)?;
        let reason = match get_u8(buf, "refused.reason")? {
            0 => RefuseReason::NotCarried,
            1 => RefuseReason::Full,
            2 => RefuseReason::Draining,
            _ => return Err(DecodeError::Invalid("refused.reason")),
        };
        Ok(Self {
            sub,
            channel,
            reason,
            alternatives: get_parents(buf, "refused.alternatives")?,
        })
    }
}
