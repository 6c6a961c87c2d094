//! Upstream policy: which parents a node draws a channel's substreams from, and how it replaces
//! one that is lost or lagging.
//!
//! ```text
//!  candidates ─▶ connect parents + standby (probe: empty Subscribe ─▶ ChannelInfo gives K, N)
//!             ─▶ assign(K, N, parents, f): disjoint substream sets, losing any f still ≥ K
//!  shard from parent p ─▶ progress(p, seq)
//!  tick: p lost (connection gone) or lagging (newest seq ≥ lag_chunks behind the best parent,
//!        or silent for stall_timeout while it lacks a chunk others have)
//!        ─▶ p's set moves to a warm standby (Subscribe, StartAt::Seq(resume)) ─▶ one round trip
//!        ─▶ a new standby is dialled to keep the reserve
//!        ─▶ no standby left: the survivors' sets are topped up until losing any f of them
//!           still leaves K again (rebalance)
//!  every parent lost: an outage, announced once; candidates are redialled with back-off
//! ```
//!
//! This module holds the state and the pure arithmetic; [`super::engine`] executes the moves.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn_proto::ConnectionHandle;

use crate::keys::NodeId;
use crate::stream::CodingParams;
use crate::wire::{ParentCandidate, StartAt, SubstreamSet};

/// Settings of the upstream policy.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Parents to draw substreams from at once (default 3).
    pub parents: usize,
    /// Parents that may be lost at once with at least K substreams left (default 1).
    pub tolerate: usize,
    /// Extra parents kept connected and ready (default 2).
    pub standby: usize,
    /// A parent whose newest chunk is this many chunks behind the best parent is lagging.
    pub lag_chunks: u64,
    /// A parent that sends nothing for this long while it lacks a chunk another parent or a
    /// standby has is lagging.
    pub stall_timeout: Duration,
    /// A parent from which not a single datagram arrived for this long (no shard, no
    /// acknowledgement, no keep-alive) is unreachable, and lost even when every other parent
    /// is silent too. Must exceed the QUIC keep-alive interval.
    pub unreachable_after: Duration,
    /// The first back-off after a candidate fails; it doubles with every failure in a row.
    pub retry_min: Duration,
    /// The longest back-off: a failed candidate is tried again at least this often.
    pub retry_after: Duration,
    /// With a single parent, draw all N substreams from it rather than K (a relay, which then
    /// needs to regenerate nothing; a peer keeps K to spare its parent's upload).
    pub all_from_one: bool,
    /// How often the policy checks its parents.
    pub check_every: Duration,
    /// Prefer near parents: try candidates never measured as extra standbys now and then, and
    /// move a settled parent's set to a standby at most half as far (see
    /// `engine::nearer`).
    pub locality: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            parents: 3,
            tolerate: 1,
            standby: 2,
            lag_chunks: 3,
            stall_timeout: Duration::from_millis(1000),
            unreachable_after: Duration::from_millis(1500),
            retry_min: Duration::from_millis(500),
            retry_after: Duration::from_secs(10),
            all_from_one: false,
            check_every: Duration::from_millis(100),
            locality: true,
        }
    }
}

impl UpstreamConfig {
    /// A supernode's policy: the peer's. A relay with a single upstream (a first tier under
    /// the source) draws K substreams from it, as a peer does, and regenerates the rest for
    /// its children. Drawing all N doubled what the upstream's one connection had to carry:
    /// under 2% loss and an 80 ms round trip CUBIC could not carry it, and in the resilience
    /// bed the players fell 5.9 s behind live in 30 s of stream, against 0.2 s with K.
    pub fn relay() -> Self {
        Self::default()
    }
}

/// A node that may serve the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// Where to dial it.
    pub addr: SocketAddr,
    /// The node id it must prove.
    pub node: NodeId,
}

/// Shards a parent delivered over a window of chunks, to catch a parent that keeps up in
/// sequence but sends only part of its substreams (an exhausted upload cap, a stalled stream).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// First chunk of the window.
    pub(crate) first: Option<u64>,
    /// When the window's first shard arrived.
    pub(crate) since: Option<Instant>,
    /// Shards received from the parent for chunks from `first` on.
    pub(crate) shards: u64,
}

/// Most candidates a policy keeps: what neighbours name can never make a node dial more.
pub(crate) const MAX_CANDIDATES: usize = 64;

/// Chunks a tally must span before it is judged.
const TALLY_MIN_CHUNKS: u64 = 8;
/// Chunks after which a tally starts over, so later degradation shows too.
const TALLY_MAX_CHUNKS: u64 = 32;
/// Newest chunks not yet expected to be complete (shards in flight).
const TALLY_SLACK_CHUNKS: u64 = 2;
/// A window is not judged before this long after its first shard (backlog still arriving).
const TALLY_GRACE: Duration = Duration::from_secs(2);
/// Below this share of the expected shards a parent is short…
pub(crate) const SHORT_RATIO: f64 = 0.75;
/// …provided another parent delivers at least this share (else the bottleneck is our own).
pub(crate) const HEALTHY_RATIO: f64 = 0.9;

impl Tally {
    /// Counts a shard of chunk `seq` received at `now`.
    pub(crate) fn count(&mut self, seq: u64, now: Instant) {
        match self.first {
            None => {
                self.first = Some(seq);
                self.since = Some(now);
                self.shards = 1;
            }
            Some(first) if seq >= first => self.shards += 1,
            Some(_) => {}
        }
    }

    /// The share of the expected shards (what `set_len` substreams carry over the chunks up to
    /// `newest`, the parent's own newest) that arrived; `None` until the window is long and
    /// old enough to judge. It measures what a parent leaves out of the chunks it sends, not
    /// how far behind the others it is: lag is the *behind* rule's, with its allowance, and a
    /// tally against the best parent's newest made a parent 4 chunks behind look short
    /// (5 of 7 chunks' worth in an 8-chunk window) whatever the allowance.
    pub(crate) fn ratio(&self, set_len: usize, newest: Option<u64>, now: Instant) -> Option<f64> {
        let (Some(first), Some(newest), Some(since)) = (self.first, newest, self.since) else {
            return None;
        };
        let span = newest.saturating_sub(first);
        if span < TALLY_MIN_CHUNKS || now.saturating_duration_since(since) < TALLY_GRACE {
            return None;
        }
        let expected = set_len as u64 * (span + 1 - TALLY_SLACK_CHUNKS);
        Some(self.shards as f64 / expected.max(1) as f64)
    }

    /// Starts a new window once the current one is long.
    pub(crate) fn roll(&mut self, best: Option<u64>) {
        if let (Some(first), Some(best)) = (self.first, best)
            && best.saturating_sub(first) >= TALLY_MAX_CHUNKS
        {
            *self = Self::default();
        }
    }
}

/// What the policy knows about one candidate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Not connected.
    Idle,
    /// Connected (or connecting), not drawing substreams: a warm standby. `latest` is the
    /// newest chunk it said it holds (Have), so starved parents show against it.
    Standby {
        conn: ConnectionHandle,
        sub: u32,
        latest: Option<u64>,
    },
    /// Drawing `set`.
    Active {
        conn: ConnectionHandle,
        sub: u32,
        set: SubstreamSet,
        /// Newest chunk received from it.
        newest: Option<u64>,
        /// When it last delivered a shard (or was activated).
        last_shard: Instant,
        /// A chunk another parent or a standby has and it has not sent yet, and when that was
        /// first seen: a parent is silent only while it lacks something that exists, never for
        /// the pauses of the stream itself.
        missing: Option<(u64, Instant)>,
        /// When its set was last given or changed: a parent still sending the backlog it was
        /// asked for is not judged behind before the stall timeout has passed.
        since: Instant,
        /// Where it was asked to start its set: where the set starts again elsewhere if this
        /// parent delivers nothing of it.
        start: StartAt,
        /// Shards delivered over the current window.
        tally: Tally,
    },
    /// Lost, lagging or refusing; not tried again before `until`. `refused`: it answered,
    /// and turned the subscription away as full (its first tier, or a source sending peers
    /// to the relays it serves): tried again at once when every parent is lost, since that
    /// may be what changed.
    Failed { until: Instant, refused: bool },
}

impl Slot {
    /// A parent just given `set` on `conn`, starting at `start`: nothing received from it yet.
    pub(crate) fn activated(
        conn: ConnectionHandle,
        sub: u32,
        set: SubstreamSet,
        start: StartAt,
        now: Instant,
    ) -> Self {
        Slot::Active {
            conn,
            sub,
            set,
            newest: None,
            last_shard: now,
            missing: None,
            since: now,
            start,
            tally: Tally::default(),
        }
    }
}

/// Where a parent's substreams resume elsewhere: a chunk before `newest` (the newest it
/// delivered, or else the best parent's), or `next_play` (the player's next chunk to play) if
/// that is earlier, so that nothing not yet output is missed. `None` with nothing to go by.
pub(crate) fn resume_point(newest: Option<u64>, next_play: Option<u64>) -> Option<u64> {
    match (newest.map(|n| n.saturating_sub(1)), next_play) {
        (Some(r), Some(n)) => Some(r.min(n)),
        (r, n) => r.or(n),
    }
}

/// The upstream state of one channel.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) config: UpstreamConfig,
    pub(crate) candidates: Vec<(Candidate, Slot)>,
    /// K and N, once a parent told us (a hint for assignment; shards are still verified).
    pub(crate) params: Option<CodingParams>,
    /// Substream sets still to be handed to a parent, with where the new parent starts.
    pub(crate) unassigned: Vec<(SubstreamSet, StartAt)>,
    pub(crate) next_check: Option<Instant>,
    /// Where the first subscriptions start: far enough behind the edge for the target delay.
    pub(crate) first_start: StartAt,
    pub(crate) failovers: u64,
    /// Node-specific rotation so that peers spread load over all N substreams.
    pub(crate) rotation: usize,
    /// Failures in a row per candidate (the back-off doubles with each); cleared when the
    /// candidate delivers, or for one in [`Upstream::lagged`] once it has served well for
    /// `retry_after`.
    pub(crate) strikes: HashMap<NodeId, u32>,
    /// Candidates replaced as behind or short while they still delivered (slow, not dead).
    /// Their first shard after a comeback does not clear their back-off,
    /// which would take back a parent that lags for good (a player yielding its uplink to
    /// other traffic, a parent at its upload cap) every second or two, and move its
    /// substreams away again each time; only `retry_after` of service without a failover
    /// does.
    pub(crate) lagged: HashSet<NodeId>,
    /// Since when no parent has delivered (every one lost or unreachable).
    pub(crate) outage: Option<Instant>,
    /// Whether the outage began with the newest chunk held ending the stream.
    pub(crate) outage_ended: bool,
    /// Times every parent was lost at once.
    pub(crate) outages: u64,
    /// When the policy started (a young channel's first parents get time to deliver).
    pub(crate) since: Instant,
    /// The least round trip measured to each node that was a parent or standby.
    pub(crate) distance: HashMap<NodeId, Duration>,
    /// Candidates dialled to be measured (each is explored once).
    pub(crate) explored: HashSet<NodeId>,
    /// When a candidate never measured may next be tried as an extra standby.
    pub(crate) next_explore: Instant,
    /// When a parent last moved to a nearer standby.
    pub(crate) last_move: Option<Instant>,
    /// Parents moved to nearer standbys.
    pub(crate) moves: u64,
    /// How many chunks behind the best parent a parent may fall before it is replaced as
    /// behind: `config.lag_chunks`, raised while such replacements come
    /// close together ([`Upstream::replaced_behind`]), lowered again in calm.
    pub(crate) lag_allow: u64,
    /// When a parent was last replaced as behind, or the allowance last stepped down.
    pub(crate) last_behind: Option<Instant>,
}

/// Replacements of delivering parents as behind this close together mean that the lag is
/// this node's own: its access link, which every parent shares (see
/// [`Upstream::replaced_behind`]).
pub(crate) const BEHIND_RECENT: Duration = Duration::from_secs(10);

/// How long without such a replacement before the allowance steps back down.
pub(crate) const BEHIND_CALM: Duration = Duration::from_secs(30);

/// The allowance grows to at most this many times `lag_chunks`.
pub(crate) const LAG_ALLOW_MAX: u64 = 8;

impl Upstream {
    pub(crate) fn new(
        config: UpstreamConfig,
        candidates: Vec<Candidate>,
        rotation: usize,
        now: Instant,
    ) -> Self {
        Self {
            lag_allow: config.lag_chunks,
            config,
            candidates: candidates.into_iter().map(|c| (c, Slot::Idle)).collect(),
            params: None,
            unassigned: Vec::new(),
            next_check: None,
            first_start: StartAt::Live,
            failovers: 0,
            rotation,
            strikes: HashMap::new(),
            lagged: HashSet::new(),
            outage: None,
            outage_ended: false,
            outages: 0,
            since: now,
            distance: HashMap::new(),
            explored: HashSet::new(),
            next_explore: now + crate::node::engine::EXPLORE_EVERY,
            last_move: None,
            moves: 0,
            last_behind: None,
        }
    }

    /// `count` parents were replaced as behind at `now`. Several at once,
    /// or one within [`BEHIND_RECENT`] of the last, is this node's own bottleneck showing,
    /// not its parents': on a viewer's access link with a short queue, the parents' chunk
    /// bursts meet and overflow it, one parent's packets happen to be lost more than the
    /// others', its loss-based congestion control backs off, and it falls behind the rest.
    /// Replacing it helps nothing, since the replacement shares the same link, and costs a
    /// resend from the resume point into that link, which makes another parent fall behind:
    /// in the simulator a viewer on 10 Mbit/s drawing 4 Mbit/s from three relays replaced a
    /// parent about once a second. So each such repeat doubles the lag allowed (up to
    /// [`LAG_ALLOW_MAX`] times `lag_chunks`), and [`Upstream::calm`] halves it back. A parent
    /// that truly cannot keep up falls further behind without bound and is still replaced,
    /// later; one that stops delivering is replaced as silent whatever the allowance.
    pub(crate) fn replaced_behind(&mut self, now: Instant, count: usize) {
        if count == 0 {
            return;
        }
        let recent = self
            .last_behind
            .is_some_and(|t| now.saturating_duration_since(t) < BEHIND_RECENT);
        if count > 1 || recent {
            self.lag_allow = (self.lag_allow * 2).min(self.config.lag_chunks * LAG_ALLOW_MAX);
        }
        self.last_behind = Some(now);
    }

    /// Steps the lag allowance halfway back to `lag_chunks` after [`BEHIND_CALM`] without a
    /// parent replaced as behind.
    pub(crate) fn calm(&mut self, now: Instant) {
        if self.lag_allow > self.config.lag_chunks
            && self
                .last_behind
                .is_none_or(|t| now.saturating_duration_since(t) >= BEHIND_CALM)
        {
            self.lag_allow = (self.lag_allow / 2).max(self.config.lag_chunks);
            self.last_behind = Some(now);
        }
    }

    /// Adds the nodes a parent named (in a go-away or refusal) as idle candidates, except the
    /// naming node itself, this node, and candidates already known.
    pub(crate) fn add_alternatives(
        &mut self,
        alternatives: &[ParentCandidate],
        from: Option<NodeId>,
        me: NodeId,
    ) {
        for alt in alternatives {
            if self.candidates.len() >= MAX_CANDIDATES {
                break;
            }
            if Some(alt.node) != from
                && alt.node != me
                && let Some(&addr) = alt.addrs.first()
                && !self.candidates.iter().any(|(c, _)| c.node == alt.node)
            {
                self.candidates.push((
                    Candidate {
                        addr,
                        node: alt.node,
                    },
                    Slot::Idle,
                ));
            }
        }
    }

    /// Records a failure of `node` and returns when it may be tried again: `retry_min`,
    /// doubled with each failure in a row, at most `retry_after`.
    pub(crate) fn strike(&mut self, node: NodeId, now: Instant) -> Instant {
        let strikes = self.strikes.entry(node).or_insert(0);
        let backoff = self
            .config
            .retry_min
            .saturating_mul(1u32 << (*strikes).min(16))
            .min(self.config.retry_after);
        *strikes += 1;
        now + backoff
    }

    /// The active parent on `conn`, if any.
    pub(crate) fn slot_of(&self, conn: ConnectionHandle) -> Option<usize> {
        self.candidates.iter().position(|(_, s)| match s {
            Slot::Active { conn: c, .. } | Slot::Standby { conn: c, .. } => *c == conn,
            _ => false,
        })
    }

    /// The newest chunk any parent delivered.
    pub(crate) fn best_newest(&self) -> Option<u64> {
        self.candidates
            .iter()
            .filter_map(|(_, s)| match s {
                Slot::Active { newest, .. } => *newest,
                _ => None,
            })
            .max()
    }

    /// Parents currently drawing substreams.
    pub(crate) fn active(&self) -> usize {
        self.candidates
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Active { .. }))
            .count()
    }

    /// Substreams currently drawn, over all parents.
    pub(crate) fn substreams_held(&self) -> usize {
        self.candidates
            .iter()
            .map(|(_, s)| match s {
                Slot::Active { set, .. } => set.len(),
                _ => 0,
            })
            .sum()
    }
}

/// Substreams each of `parents` parents carries so that losing any `tolerate` of them leaves at
/// least K: `ceil(K / (parents - tolerate))`, or as many as N allows when that is too many; all
/// N spread over them when they cannot tolerate a loss at all and `all_from_one` asks for it.
fn per_parent(params: CodingParams, parents: usize, tolerate: usize, all_from_one: bool) -> usize {
    let k = params.original();
    let n = params.total();
    if parents == 0 {
        return 0;
    }
    if parents <= tolerate && all_from_one {
        return n / parents;
    }
    let survivors = parents.saturating_sub(tolerate).max(1);
    let per = k.div_ceil(survivors);
    if per * parents > n {
        // Not enough substreams for the redundancy asked: spread all N as evenly as possible.
        return (n / parents).max(1);
    }
    per
}

/// Splits substreams among `parents` parents so that losing any `tolerate` of them leaves at
/// least K: each parent gets `c = ceil(K / (parents - tolerate))` distinct substreams, starting
/// at `rotation` so that different nodes load different substreams. With too few substreams
/// for the rule the sets are as large as N allows; with one parent it carries K
/// ([`assign_all_from_one`] for all N). Returns one set per parent used (never more than N).
pub fn assign(
    params: CodingParams,
    parents: usize,
    tolerate: usize,
    rotation: usize,
) -> Vec<SubstreamSet> {
    assign_with(params, parents, tolerate, rotation, false)
}

/// [`assign`], except that parents too few to tolerate a loss carry all N between them.
pub fn assign_all_from_one(
    params: CodingParams,
    parents: usize,
    tolerate: usize,
    rotation: usize,
) -> Vec<SubstreamSet> {
    assign_with(params, parents, tolerate, rotation, true)
}

pub(crate) fn assign_with(
    params: CodingParams,
    parents: usize,
    tolerate: usize,
    rotation: usize,
    all_from_one: bool,
) -> Vec<SubstreamSet> {
    let n = params.total();
    // More parents than substreams cannot all get a distinct one.
    let parents = parents.min(n);
    let per = per_parent(params, parents, tolerate, all_from_one);
    (0..parents)
        .map(|p| {
            let mut set = SubstreamSet::EMPTY;
            for j in 0..per {
                set.insert((rotation + p * per + j) % n);
            }
            set
        })
        .collect()
}

/// Tops up the sets of the parents that are left (disjoint, as [`assign`] made them) with
/// substreams nobody carries, until each has as many as the invariant asks for their number:
/// after a loss with no standby to take over, losing any `tolerate` of the survivors again
/// leaves K. A set never shrinks, so no parent restarts what it already sends. Returns the new
/// sets in the same order.
pub(crate) fn rebalance(
    params: CodingParams,
    sets: &[SubstreamSet],
    tolerate: usize,
    rotation: usize,
    all_from_one: bool,
) -> Vec<SubstreamSet> {
    let n = params.total();
    let per = per_parent(params, sets.len(), tolerate, all_from_one);
    let mut held = sets.iter().fold(0u128, |acc, s| acc | s.bits());
    let mut free = (0..n)
        .map(|j| (rotation + j) % n)
        .filter(|&i| held & (1u128 << i) == 0)
        .collect::<Vec<_>>()
        .into_iter();
    sets.iter()
        .map(|set| {
            let mut set = *set;
            while set.len() < per {
                let Some(i) = free.next() else { break };
                set.insert(i);
                held |= 1u128 << i;
            }
            set
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // one base instant; time moves by hand
    use super::*;

    fn p(k: u8, r: u8) -> CodingParams {
        CodingParams::new(k, r).unwrap()
    }

    #[test]
    fn a_parent_sending_part_of_its_substreams_is_short() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3);
        let mut full = Tally::default();
        let mut partial = Tally::default();
        for seq in 100..=110 {
            for i in 0..4 {
                full.count(seq, t0);
                if i < 2 {
                    partial.count(seq, t0);
                }
            }
        }
        assert!(full.ratio(4, Some(110), later).unwrap() >= HEALTHY_RATIO);
        assert!(partial.ratio(4, Some(110), later).unwrap() < SHORT_RATIO);
        // Too short or too young a window is never judged.
        assert_eq!(partial.ratio(4, Some(104), later), None);
        assert_eq!(
            partial.ratio(4, Some(110), t0 + Duration::from_secs(1)),
            None
        );
        let mut rolled = partial;
        rolled.roll(Some(140));
        assert_eq!(rolled, Tally::default());
    }

    #[test]
    fn behind_replacements_close_together_raise_the_lag_allowed_and_calm_lowers_it() {
        let t0 = Instant::now();
        let config = UpstreamConfig::default();
        let base = config.lag_chunks;
        let mut up = Upstream::new(config, Vec::new(), 0, t0);
        assert_eq!(up.lag_allow, base);
        // A first replacement is a parent's fault as far as anyone can tell.
        up.replaced_behind(t0, 1);
        assert_eq!(up.lag_allow, base);
        // Another within BEHIND_RECENT: the node's own link.
        let t1 = t0 + Duration::from_secs(3);
        up.replaced_behind(t1, 1);
        assert_eq!(up.lag_allow, 2 * base);
        // Two at once say the same.
        up.replaced_behind(t1 + Duration::from_secs(20), 2);
        assert_eq!(up.lag_allow, 4 * base);
        // Up to the bound, however many follow.
        for i in 0..10 {
            up.replaced_behind(t1 + Duration::from_secs(21 + i), 1);
        }
        assert_eq!(up.lag_allow, LAG_ALLOW_MAX * base);
        // Nothing changes before a calm period has passed, then it halves once per period.
        let last = t1 + Duration::from_secs(30);
        up.calm(last + BEHIND_CALM - Duration::from_secs(1));
        assert_eq!(up.lag_allow, LAG_ALLOW_MAX * base);
        up.calm(last + BEHIND_CALM);
        assert_eq!(up.lag_allow, LAG_ALLOW_MAX * base / 2);
        up.calm(last + BEHIND_CALM + Duration::from_secs(1));
        assert_eq!(up.lag_allow, LAG_ALLOW_MAX * base / 2);
        let mut at = last + BEHIND_CALM;
        for _ in 0..10 {
            at += BEHIND_CALM;
            up.calm(at);
        }
        assert_eq!(up.lag_allow, base);
        // No replacement at all changes nothing.
        up.replaced_behind(at, 0);
        assert_eq!(up.lag_allow, base);
    }

    #[test]
    fn a_single_parent_carries_k_for_a_peer_and_all_n_for_a_relay() {
        assert_eq!(assign(p(8, 8), 1, 1, 3)[0].len(), 8);
        assert_eq!(assign_all_from_one(p(8, 8), 1, 1, 3)[0].len(), 16);
        // Two parents tolerate one loss either way: K each.
        assert_eq!(
            assign_all_from_one(p(8, 8), 2, 1, 0),
            assign(p(8, 8), 2, 1, 0)
        );
    }

    #[test]
    fn rebalance_restores_the_invariant_for_the_survivors_without_shrinking_a_set() {
        for k in 1..=12u8 {
            for r in 1..=12u8 {
                let params = p(k, r);
                for parents in 2..=6 {
                    let sets = assign(params, parents, 1, 7);
                    for lost in 0..parents {
                        let left: Vec<SubstreamSet> = sets
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| *i != lost)
                            .map(|(_, s)| *s)
                            .collect();
                        let grown = rebalance(params, &left, 1, 7, false);
                        let mut union = 0u128;
                        for (old, new) in left.iter().zip(&grown) {
                            assert_eq!(old.bits() & !new.bits(), 0, "a set shrank");
                            assert_eq!(union & new.bits(), 0, "overlap");
                            union |= new.bits();
                        }
                        let feasible = left.len() > 1
                            && (k as usize).div_ceil(left.len() - 1) * left.len() <= params.total();
                        if feasible {
                            for again in 0..left.len() {
                                let still: usize = grown
                                    .iter()
                                    .enumerate()
                                    .filter(|(i, _)| *i != again)
                                    .map(|(_, s)| s.len())
                                    .sum();
                                assert!(still >= k as usize, "k={k} r={r} parents={parents}");
                            }
                        }
                        // One survivor: K for a peer, all N for a relay.
                        if left.len() == 1 {
                            assert!(grown[0].len() >= k as usize);
                            let relay = rebalance(params, &left, 1, 7, true);
                            assert_eq!(relay[0].len(), params.total());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn back_off_doubles_up_to_the_longest_and_starts_over_after_delivery() {
        let t0 = Instant::now();
        let mut up = Upstream::new(UpstreamConfig::default(), Vec::new(), 0, t0);
        let node = crate::keys::NodeKey::generate().unwrap().node_id();
        let waits: Vec<Duration> = (0..8).map(|_| up.strike(node, t0) - t0).collect();
        assert_eq!(waits[0], Duration::from_millis(500));
        assert_eq!(waits[1], Duration::from_secs(1));
        assert_eq!(waits[2], Duration::from_secs(2));
        assert_eq!(waits[7], Duration::from_secs(10));
        up.strikes.remove(&node);
        assert_eq!(up.strike(node, t0) - t0, Duration::from_millis(500));
    }

    #[test]
    fn design_examples_hold() {
        // DESIGN.md: 3 × 4 = 12 for K = 8; 5 × 2 = 10; 9 × 1 = 9.
        assert_eq!(
            assign(p(8, 8), 3, 1, 0)
                .iter()
                .map(|s| s.len())
                .collect::<Vec<_>>(),
            [4, 4, 4]
        );
        assert_eq!(
            assign(p(8, 8), 5, 1, 0)
                .iter()
                .map(|s| s.len())
                .sum::<usize>(),
            10
        );
        assert_eq!(
            assign(p(8, 8), 9, 1, 0)
                .iter()
                .map(|s| s.len())
                .sum::<usize>(),
            9
        );
    }

    #[test]
    fn losing_any_tolerated_parents_leaves_k_for_every_shape() {
        for k in 1..=16u8 {
            for r in 1..=16u8 {
                let params = p(k, r);
                for parents in 2..=8 {
                    for rotation in [0, 5, 17] {
                        let sets = assign(params, parents, 1, rotation);
                        // Disjoint.
                        let union = sets.iter().fold(0u128, |acc, s| {
                            assert_eq!(acc & s.bits(), 0, "overlap k={k} r={r} parents={parents}");
                            acc | s.bits()
                        });
                        assert!(union.count_ones() as usize <= params.total());
                        let feasible =
                            (k as usize).div_ceil(parents - 1) * parents <= params.total();
                        if feasible {
                            for lost in 0..parents {
                                let left: usize = sets
                                    .iter()
                                    .enumerate()
                                    .filter(|(i, _)| *i != lost)
                                    .map(|(_, s)| s.len())
                                    .sum();
                                assert!(
                                    left >= k as usize,
                                    "k={k} r={r} parents={parents} lost={lost}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
