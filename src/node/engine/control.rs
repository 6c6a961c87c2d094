//! The control protocol: subscriptions made and served, channel information, go-aways and
//! drain, and what happens to a neighbour that misbehaves.

use std::collections::{HashMap, HashSet, VecDeque};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use quinn_proto::ConnectionHandle;

use crate::keys::{ChannelId, NodeId};
use crate::node::channel::{Channel, Rejected, StoredShard};
use crate::node::upstream::Candidate;
use crate::stream::CodingParams;
use crate::wire::{
    ChannelInfo, GoAway, GoAwayReason, MAX_PARENTS, Message, PROTOCOL_VERSION, ParentCandidate,
    RefuseReason, Refused, StartAt, Subscribe, SubstreamSet,
};

use super::conn::{Input, Served, mark};
use super::{Engine, EngineError, NodeEvent, close_code};

/// The channel information a parent sends its subscribers (`corrupt`: fault injection, see
/// [`EngineConfig::corrupt_outgoing_shards`]).
pub(super) fn channel_info(ch: &Channel, params: CodingParams, corrupt: bool) -> Message {
    let mut stream_header = ch.stream_header().cloned();
    if corrupt && let Some(header) = &mut stream_header {
        let mut bad = header.data.to_vec();
        if let Some(b) = bad.first_mut() {
            *b ^= 0x5a;
        }
        header.data = bad.into();
    }
    Message::ChannelInfo(ChannelInfo {
        channel: ch.id(),
        params,
        chunk_ms: ch.chunk_ms_estimate(),
        latest: ch.range().map(|(_, newest)| newest),
        stream_header,
    })
}

/// A go-away naming the alternatives for `channels` (each node once, at most the message's
/// limit).
pub(super) fn go_away(
    reason: GoAwayReason,
    alternatives: &HashMap<ChannelId, Vec<ParentCandidate>>,
    channels: impl IntoIterator<Item = ChannelId>,
) -> Message {
    let mut list: Vec<ParentCandidate> = Vec::new();
    for channel in channels {
        for c in alternatives.get(&channel).into_iter().flatten() {
            if list.len() < MAX_PARENTS && !list.iter().any(|p| p.node == c.node) {
                list.push(ParentCandidate {
                    load_permille: 0,
                    ..c.clone()
                });
            }
        }
    }
    Message::GoAway(GoAway {
        reason,
        alternatives: list,
    })
}

impl Engine {
    /// The nodes that also carry `channel`: what answers name besides this node's own
    /// children, and where a go-away sends subscribers.
    pub fn set_alternatives(&mut self, channel: ChannelId, nodes: Vec<Candidate>) {
        let named = nodes
            .into_iter()
            .map(|c| ParentCandidate {
                node: c.node,
                addrs: vec![c.addr],
                load_permille: 0,
            })
            .collect();
        self.alternatives.insert(channel, named);
    }

    /// [`Engine::set_alternatives`] with every address each node is announced at (what the
    /// member worker of a multi-worker relay knows of the carriers, handed to the others).
    pub fn set_alternatives_named(&mut self, channel: ChannelId, nodes: Vec<ParentCandidate>) {
        self.alternatives.insert(channel, nodes);
    }

    /// Starts a graceful drain: every subscriber gets a go-away naming the alternatives, new
    /// connections and subscriptions are refused, and serving goes on until the subscribers
    /// have moved (watch [`Engine::served_subscriptions`]).
    pub fn drain(&mut self, now: Instant) {
        self.draining = true;
        // Members stop naming this node at once.
        self.gossip_info(now);
        let mut per_conn: HashMap<ConnectionHandle, Vec<ChannelId>> = HashMap::new();
        for (channel, listed) in &self.subscribers {
            for &(handle, _) in listed {
                let channels = per_conn.entry(handle).or_default();
                if !channels.contains(channel) {
                    channels.push(*channel);
                }
            }
        }
        for (handle, channels) in per_conn {
            let go = go_away(GoAwayReason::Shutdown, &self.alternatives, channels);
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.send_control(&go);
                mark(&mut self.dirty, conn, handle);
                self.stats.go_aways_sent += 1;
            }
        }
        self.drive(now);
    }

    /// Subscriptions served now (a draining node is done when this reaches 0).
    pub fn served_subscriptions(&self) -> usize {
        self.subscribers.values().map(Vec::len).sum()
    }

    /// Subscribes to `substreams` of `channel` at the node `parent_id` reachable at `parent`,
    /// reusing an open connection to it. Returns the connection.
    pub fn subscribe(
        &mut self,
        now: Instant,
        parent: SocketAddr,
        parent_id: NodeId,
        channel: ChannelId,
        substreams: SubstreamSet,
        start: StartAt,
    ) -> Result<ConnectionHandle, EngineError> {
        let (handle, _) =
            self.subscribe_inner(now, parent, parent_id, channel, substreams, start, None)?;
        self.drive(now);
        Ok(handle)
    }

    /// Subscribes (or, with `sub`, changes an existing subscription). Does not drive.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn subscribe_inner(
        &mut self,
        now: Instant,
        parent: SocketAddr,
        parent_id: NodeId,
        channel: ChannelId,
        substreams: SubstreamSet,
        start: StartAt,
        sub: Option<u32>,
    ) -> Result<(ConnectionHandle, u32), EngineError> {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return Err(EngineError::UnknownChannel(channel));
        };
        ch.mark_joined(now);
        if self.refused.contains(&parent_id) {
            return Err(EngineError::Refused(parent_id));
        }
        let dialling = &self.dialling;
        let existing = self
            .conns
            .iter()
            .find(|(_, c)| {
                !c.closed
                    && !c.spare
                    && c.node == Some(parent_id)
                    && dialling.same_node(parent_id, c.remote, parent)
            })
            .map(|(h, _)| h);
        let handle = match existing {
            Some(h) => h,
            None => self.connect(now, parent, parent_id)?,
        };
        let sub = sub.unwrap_or_else(|| {
            self.next_sub += 1;
            self.next_sub - 1
        });
        if let Some(conn) = self.conns.get_mut(&handle) {
            conn.taken.insert(sub, channel);
            conn.send_control(&Message::Subscribe(Subscribe {
                sub,
                channel,
                substreams,
                start,
            }));
            mark(&mut self.dirty, conn, handle);
        }
        Ok((handle, sub))
    }

    pub(super) fn apply(&mut self, now: Instant, handle: ConnectionHandle, input: Input) {
        match input {
            Input::Undecodable(e) => self.protocol_error(now, handle, &e.to_string()),
            Input::Control(msg) => self.apply_control(now, handle, msg),
            Input::Gossip(data) => self.gossip_received(now, handle, &data),
            Input::Shard(stream, frame) => self.apply_shard(now, handle, stream, frame),
            Input::StreamDone(stream) => {
                if let Some(conn) = self.conns.get_mut(&handle) {
                    conn.in_streams.remove(&stream);
                }
            }
        }
    }

    pub(super) fn apply_control(&mut self, now: Instant, handle: ConnectionHandle, msg: Message) {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        match msg {
            Message::Hello(hello) => {
                if hello.version != PROTOCOL_VERSION {
                    conn.close(now, close_code::VERSION, "unsupported protocol version");
                } else {
                    conn.hello = Some(hello);
                }
            }
            Message::Subscribe(sub) => {
                if sub.sub == crate::wire::SUB_OF_STREAM {
                    // 0 means "the stream's subscription" on shard streams: no subscription
                    // may be numbered so.
                    return self.protocol_error(now, handle, "subscription numbered 0");
                }
                if !self.channels.contains_key(&sub.channel) && !self.open_channel(now, sub.channel)
                {
                    // Say so at once, naming the nodes membership knows to carry it: the
                    // asker moves on instead of waiting for shards that never come.
                    self.stats.unknown_channel_refusals += 1;
                    self.refuse(now, handle, &sub, RefuseReason::NotCarried);
                    return;
                }
                let known = self
                    .subscribers
                    .get(&sub.channel)
                    .is_some_and(|l| l.contains(&(handle, sub.sub)));
                let full = self.config.max_subscribers.is_some_and(|max| {
                    self.subscribers.values().map(Vec::len).sum::<usize>() >= max
                });
                if !known && !self.draining && self.over_first_tier(now, handle, sub.channel) {
                    // The first tier is full (or this is a peer and relays carry the channel):
                    // name the relays instead.
                    self.stats.subscriptions_turned_away += 1;
                    self.refuse(now, handle, &sub, RefuseReason::Full);
                    return;
                }
                let Some(conn) = self.conns.get_mut(&handle) else {
                    return;
                };
                let Some(channel) = self.channels.get(&sub.channel) else {
                    return;
                };
                if !known && (self.draining || full) {
                    self.stats.subscriptions_turned_away += 1;
                    let reason = if self.draining {
                        GoAwayReason::Shutdown
                    } else {
                        GoAwayReason::Overloaded
                    };
                    let go = go_away(reason, &self.alternatives, [sub.channel]);
                    conn.send_control(&go);
                    return;
                }
                let listed = self.subscribers.entry(sub.channel).or_default();
                if !listed.contains(&(handle, sub.sub)) {
                    listed.push((handle, sub.sub));
                }
                let Some(params) = channel.params() else {
                    // Nothing received yet: serve what arrives from now on, and send the
                    // channel information with the first chunk (the asker waits for it to
                    // choose its substreams).
                    let waiting = self.awaiting_info.entry(sub.channel).or_default();
                    if !waiting.contains(&handle) {
                        waiting.push(handle);
                    }
                    conn.served.insert(
                        sub.sub,
                        Served {
                            channel: sub.channel,
                            substreams: sub.substreams,
                        },
                    );
                    return;
                };
                conn.served.insert(
                    sub.sub,
                    Served {
                        channel: sub.channel,
                        substreams: sub.substreams,
                    },
                );
                let info = channel_info(channel, params, self.config.corrupt_outgoing_shards);
                conn.send_control(&info);
                if let Some(title) = channel.title() {
                    conn.send_control(&Message::StreamTitle(title.clone()));
                }
                // Backlog: from the requested point, everything still held.
                let from = match sub.start {
                    StartAt::Live => channel.newest_random_access(),
                    StartAt::Seq(seq) => Some(seq),
                };
                let mut backlog = Vec::new();
                if let Some(from) = from {
                    for seq in channel.seqs_from(from) {
                        if let Some(chunk) = channel.chunk(seq) {
                            for index in sub.substreams.iter() {
                                if let Some(shard) = chunk.shard(index) {
                                    backlog.push(StoredShard {
                                        header: Arc::clone(chunk.header()),
                                        index,
                                        shard: shard.clone(),
                                    });
                                }
                            }
                        }
                    }
                }
                // Framed for this subscriber alone, around the stored shard's own bytes: a
                // shared frame made for one subscriber would copy each shard once more.
                for shard in &backlog {
                    self.send_shard(now, handle, sub.sub, sub.substreams, shard, None);
                }
            }
            Message::Unsubscribe(unsub) => {
                if unsub.substreams.is_empty() {
                    if let Some(served) = conn.served.remove(&unsub.sub) {
                        // Its stream is finished at the next flush.
                        conn.subs_ended = true;
                        if let Some(listed) = self.subscribers.get_mut(&served.channel) {
                            listed.retain(|entry| *entry != (handle, unsub.sub));
                        }
                    }
                } else if let Some(served) = conn.served.get_mut(&unsub.sub) {
                    served.substreams = SubstreamSet::from_bits(
                        served.substreams.bits() & !unsub.substreams.bits(),
                    );
                }
            }
            Message::ChannelInfo(info) => {
                // A parent that answers may know others: ask it once.
                self.ask_for_parents(now, handle, info.channel);
                if let Some(header) = &info.stream_header
                    && self.channels.contains_key(&info.channel)
                {
                    if !header.signature_valid(&info.channel) {
                        self.misbehaved(now, handle, &Rejected::StreamHeader(header.serial));
                        return;
                    }
                    if self.store_stream_header(info.channel, header.clone(), info.params) {
                        self.events.push_back(NodeEvent::StreamHeader {
                            channel: info.channel,
                            header: header.clone(),
                        });
                    }
                }
                if let Some(up) = self.upstreams.get_mut(&info.channel)
                    && up.params.is_none()
                {
                    // Hints for assignment and the starting point only: every header is still
                    // verified.
                    up.params = Some(info.params);
                    let behind = u64::from(self.config.channel.target_delay.as_millis() as u32)
                        .div_ceil(u64::from(info.chunk_ms.max(1)));
                    up.first_start = info.latest.map_or(StartAt::Live, |latest| {
                        StartAt::Seq(latest.saturating_sub(behind))
                    });
                    self.upstream_fill(now, info.channel);
                }
            }
            Message::GoAway(go) => {
                // A parent leaving (or full): move off it now, while it still serves, rather
                // than after it has gone; its alternatives become candidates.
                self.stats.go_aways_received += 1;
                let from = conn.node;
                let channels: Vec<ChannelId> = conn.taken.values().copied().collect();
                let via = conn.remote;
                let alternatives = self.heard_of(via, &go.alternatives);
                for channel in channels {
                    let me = self.node;
                    if let Some(up) = self.upstreams.get_mut(&channel) {
                        up.add_alternatives(&alternatives, from, me);
                        up.next_check = Some(now);
                    }
                }
                self.lost_conns.push(handle);
            }
            Message::Refused(refused) => {
                if conn.taken.get(&refused.sub) != Some(&refused.channel) {
                    return;
                }
                self.stats.refusals_received += 1;
                conn.taken.remove(&refused.sub);
                let remote = conn.remote;
                let from = conn.node;
                self.events.push_back(NodeEvent::SubscriptionRefused {
                    channel: refused.channel,
                    remote,
                    reason: refused.reason,
                });
                let alternatives = self.heard_of(remote, &refused.alternatives);
                self.upstream_refused(
                    now,
                    refused.channel,
                    handle,
                    from,
                    &alternatives,
                    refused.reason,
                );
            }
            Message::Have(have) => self.upstream_have(have.channel, handle, have.latest),
            Message::StreamTitle(title) => {
                if !self.channels.contains_key(&title.channel) {
                    return;
                }
                if !title.signature_valid() {
                    self.misbehaved(now, handle, &Rejected::Title(title.serial));
                    return;
                }
                if self.store_title(title.clone()) {
                    self.events.push_back(NodeEvent::StreamTitle { title });
                }
            }
            Message::Punch(punch) => self.punch(now, handle, punch.addr),
            Message::ParentQuery(query) => self.answer_parent_query(now, handle, &query),
            Message::ParentAnswer(answer) => self.take_parent_answer(handle, &answer),
            Message::Shard(_) => self.protocol_error(now, handle, "shard on the control stream"),
        }
    }

    /// Refuses a subscription, naming the nodes this one knows to carry its channel.
    fn refuse(
        &mut self,
        now: Instant,
        handle: ConnectionHandle,
        sub: &Subscribe,
        reason: RefuseReason,
    ) {
        let alternatives = self.candidates_for(now, handle, sub.channel, MAX_PARENTS);
        self.punch_for(handle, &alternatives);
        if let Some(conn) = self.conns.get_mut(&handle) {
            conn.send_control(&Message::Refused(Refused {
                sub: sub.sub,
                channel: sub.channel,
                reason,
                alternatives,
            }));
        }
    }

    pub(super) fn misbehaved(&mut self, now: Instant, handle: ConnectionHandle, why: &Rejected) {
        self.stats.misbehaving_closed += 1;
        if let Some(conn) = self.conns.get_mut(&handle) {
            if let Some(node) = conn.peer
                && self.refused.insert(node)
            {
                self.events.push_back(NodeEvent::NodeRefused { node });
            }
            self.events.push_back(NodeEvent::Misbehaved {
                remote: conn.remote,
                node: conn.node,
                reason: why.to_string(),
            });
            conn.close(now, close_code::BAD_DATA, "bad shard or header");
        }
    }

    /// Refuses `node` from now on, as if it had sent this engine bad data: a sibling worker
    /// caught it ([`NodeEvent::NodeRefused`]). Its connections here are closed.
    pub fn refuse_node(&mut self, now: Instant, node: NodeId) {
        self.refused.insert(node);
        let theirs: Vec<ConnectionHandle> = self
            .conns
            .iter()
            .filter(|(_, c)| c.peer == Some(node) && !c.closed)
            .map(|(h, _)| h)
            .collect();
        for handle in theirs {
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.close(now, close_code::BAD_DATA, "sent bad data before");
                mark(&mut self.dirty, conn, handle);
            }
        }
        self.drive(now);
    }

    /// Closes a connection whose bytes do not decode (or break the protocol's rules), and
    /// refuses its node from then on, as [`Engine::misbehaved`] does for bad data.
    pub(super) fn protocol_error(&mut self, now: Instant, handle: ConnectionHandle, why: &str) {
        self.stats.protocol_errors += 1;
        if let Some(conn) = self.conns.get_mut(&handle) {
            if let Some(node) = conn.peer
                && self.refused.insert(node)
            {
                self.events.push_back(NodeEvent::NodeRefused { node });
            }
            conn.close(now, close_code::PROTOCOL, why);
        }
    }
}

/// Node ids that sent bad data or undecodable bytes, refused from then on: dialled nodes are
/// not dialled again, and their connections in are closed once their handshake proves the id.
/// Only the newest [`RefusedNodes::CAP`] are kept, since an attacker makes new ids for free
/// and the set must not grow without bound.
#[derive(Debug, Default)]
pub(super) struct RefusedNodes {
    set: HashSet<NodeId>,
    order: VecDeque<NodeId>,
}

impl RefusedNodes {
    pub(super) const CAP: usize = 4096;

    pub(super) fn contains(&self, node: &NodeId) -> bool {
        self.set.contains(node)
    }

    /// Whether `node` is newly refused.
    pub(super) fn insert(&mut self, node: NodeId) -> bool {
        if !self.set.insert(node) {
            return false;
        }
        self.order.push_back(node);
        if self.order.len() > Self::CAP
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}
