//! The upstream policy put to work: dialling candidates and standbys, handing substream sets
//! to parents, and replacing a parent that is lost, lagging or short (the arithmetic and state
//! are in [`crate::node::upstream`]).

use std::time::{Duration, Instant};

use quinn_proto::ConnectionHandle;

use crate::keys::{ChannelId, NodeId};
use crate::node::channel::Channel;
use crate::node::upstream::{
    Candidate, HEALTHY_RATIO, SHORT_RATIO, Slot, Tally, Upstream, assign_with, rebalance,
    resume_point,
};
use crate::stream::ChunkFlags;
use crate::wire::{ParentCandidate, RefuseReason, StartAt, SubstreamSet};

use super::conn::mark;
use super::{Engine, EngineError, FailoverWhy, NodeEvent, close_code};

/// How many stall timeouts every parent may be quiet, while none lacks a chunk another has,
/// before the stream is announced as not arriving ([`NodeEvent::UpstreamLost`]).
const OUTAGE_QUIET: u32 = 3;

impl Engine {
    /// Lets the engine choose parents for `channel` among `candidates` and keep them: draws
    /// substreams so that losing any [`UpstreamConfig::tolerate`] parents still leaves K, keeps
    /// warm standbys, and replaces a lost or lagging parent without waiting for a QUIC timeout.
    pub fn set_upstream(
        &mut self,
        now: Instant,
        channel: ChannelId,
        candidates: Vec<Candidate>,
    ) -> Result<(), EngineError> {
        if !self.channels.contains_key(&channel) {
            return Err(EngineError::UnknownChannel(channel));
        }
        let me = self.node;
        let candidates: Vec<Candidate> = candidates.into_iter().filter(|c| c.node != me).collect();
        // A supernode joins the membership through the nodes it was told of.
        self.gossip_join(now, &candidates);
        self.upstream_start(now, channel, candidates);
        self.drive(now);
        Ok(())
    }

    /// [`Engine::set_upstream`] from inside the engine (while a connection's input is being
    /// applied): the same, except that it does not drive; the caller's loop does.
    pub(super) fn upstream_start(
        &mut self,
        now: Instant,
        channel: ChannelId,
        candidates: Vec<Candidate>,
    ) {
        let rotation = usize::from(self.node.as_bytes()[0]);
        let candidates = candidates
            .into_iter()
            .filter(|c| c.node != self.node)
            .collect();
        self.upstreams.insert(
            channel,
            Upstream::new(self.config.upstream.clone(), candidates, rotation, now),
        );
        self.upstream_fill(now, channel);
    }

    /// Substreams drawn for `channel` by the upstream policy, and from how many parents.
    pub fn upstream_status(&self, channel: &ChannelId) -> Option<(usize, usize)> {
        self.upstreams
            .get(channel)
            .map(|u| (u.substreams_held(), u.active()))
    }

    /// The parents `channel` is drawn from: where each is, what it carries, how far it is.
    pub fn upstream_parents(&self, channel: &ChannelId) -> Vec<super::ParentReport> {
        self.upstreams.get(channel).map_or_else(Vec::new, |u| {
            u.candidates
                .iter()
                .filter_map(|(c, s)| match s {
                    Slot::Active { set, .. } => Some(super::ParentReport {
                        addr: c.addr,
                        substreams: set.len(),
                        min_rtt: u.distance.get(&c.node).copied(),
                    }),
                    _ => None,
                })
                .collect()
        })
    }

    /// Whether some parent delivered `channel` within the stall timeout (`None`: the channel
    /// has no upstream policy).
    pub fn upstream_delivering(&self, channel: &ChannelId) -> Option<bool> {
        self.upstreams.get(channel).map(|u| u.outage.is_none())
    }

    /// Dials `cand` as a standby for `channel`. The probe is an empty subscription, which
    /// makes the node answer with ChannelInfo (and Have for each new chunk) and nothing else.
    pub(super) fn dial_standby(
        &mut self,
        now: Instant,
        channel: ChannelId,
        cand: Candidate,
    ) -> Result<Slot, EngineError> {
        let (conn, sub) = self.subscribe_inner(
            now,
            cand.addr,
            cand.node,
            channel,
            SubstreamSet::EMPTY,
            StartAt::Live,
            None,
        )?;
        Ok(Slot::Standby {
            conn,
            sub,
            latest: None,
        })
    }

    /// Connects standbys and hands unassigned substream sets to them.
    pub(super) fn upstream_fill(&mut self, now: Instant, channel: ChannelId) {
        let Some(mut up) = self.upstreams.remove(&channel) else {
            return;
        };
        // Failed candidates become eligible again after their back-off.
        for (_, slot) in &mut up.candidates {
            if let Slot::Failed { until, .. } = slot
                && *until <= now
            {
                *slot = Slot::Idle;
            }
        }
        // Keep parents + standby connections.
        let want = up.config.parents + up.config.standby;
        let mut connected = up
            .candidates
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Active { .. } | Slot::Standby { .. }))
            .count();
        for i in 0..up.candidates.len() {
            if connected >= want {
                break;
            }
            let (cand, slot) = up.candidates[i].clone();
            if slot != Slot::Idle || self.refused.contains(&cand.node) {
                continue;
            }
            match self.dial_standby(now, channel, cand) {
                Ok(standby) => {
                    up.candidates[i].1 = standby;
                    connected += 1;
                }
                Err(_) => {
                    let until = up.strike(cand.node, now);
                    up.candidates[i].1 = Slot::Failed {
                        until,
                        refused: false,
                    };
                }
            }
        }
        // First assignment once K and N are known.
        if let Some(params) = up.params
            && up.active() == 0
            && up.unassigned.is_empty()
        {
            let parents = up.config.parents.min(connected).max(1);
            let start = up.first_start;
            up.unassigned = assign_with(
                params,
                parents,
                up.config.tolerate,
                up.rotation,
                up.config.all_from_one,
            )
            .into_iter()
            .map(|set| (set, start))
            .collect();
        }
        // Hand sets to standbys: the nearest first (lowest measured round trip among those
        // whose handshake is done; one still connecting only when none is ready).
        while let Some(&(set, start)) = up.unassigned.first() {
            let conns = &self.conns;
            let Some(i) = up
                .candidates
                .iter()
                .enumerate()
                .filter_map(|(i, (_, s))| match s {
                    Slot::Standby { conn, .. } => {
                        let rtt = conns
                            .get(conn)
                            .filter(|c| c.established)
                            .map(|c| c.quic.rtt());
                        Some((i, rtt.is_none(), rtt))
                    }
                    _ => None,
                })
                .min_by_key(|&(i, connecting, rtt)| (connecting, rtt, i))
                .map(|(i, _, _)| i)
            else {
                break;
            };
            let (cand, slot) = up.candidates[i].clone();
            let Slot::Standby { conn, sub, .. } = slot else {
                break;
            };
            match self.subscribe_inner(now, cand.addr, cand.node, channel, set, start, Some(sub)) {
                Ok(_) => {
                    up.unassigned.remove(0);
                    up.candidates[i].1 = Slot::activated(conn, sub, set, start, now);
                }
                Err(_) => {
                    let until = up.strike(cand.node, now);
                    up.candidates[i].1 = Slot::Failed {
                        until,
                        refused: false,
                    };
                }
            }
        }
        // No parent left to take them: the surviving parents' sets grow until losing any
        // `tolerate` of them again leaves K (with two survivors of K = 8, eight each), so the
        // node keeps K through the next loss too while any path to the source remains.
        let spare = up.candidates.iter().any(|(c, s)| {
            matches!(s, Slot::Standby { .. })
                || (*s == Slot::Idle && !self.refused.contains(&c.node))
        });
        let actives: Vec<usize> = (0..up.candidates.len())
            .filter(|&i| matches!(up.candidates[i].1, Slot::Active { .. }))
            .collect();
        if !spare
            && !actives.is_empty()
            && !up.unassigned.is_empty()
            && let Some(params) = up.params
        {
            let resume = up
                .unassigned
                .drain(..)
                .filter_map(|(_, start)| match start {
                    StartAt::Seq(s) => Some(s),
                    StartAt::Live => None,
                })
                .min();
            let sets: Vec<SubstreamSet> = actives
                .iter()
                .map(|&i| match &up.candidates[i].1 {
                    Slot::Active { set, .. } => *set,
                    _ => SubstreamSet::EMPTY,
                })
                .collect();
            let grown = rebalance(
                params,
                &sets,
                up.config.tolerate,
                up.rotation,
                up.config.all_from_one,
            );
            for ((slot_ix, old), union) in actives.into_iter().zip(sets).zip(grown) {
                if union == old {
                    continue;
                }
                let (cand, slot) = up.candidates[slot_ix].clone();
                let Slot::Active {
                    conn,
                    sub,
                    newest,
                    last_shard,
                    ..
                } = slot
                else {
                    continue;
                };
                let start = resume.map_or(StartAt::Live, StartAt::Seq);
                if self
                    .subscribe_inner(now, cand.addr, cand.node, channel, union, start, Some(sub))
                    .is_ok()
                {
                    up.candidates[slot_ix].1 = Slot::Active {
                        conn,
                        sub,
                        set: union,
                        newest,
                        last_shard,
                        missing: None,
                        since: now,
                        start,
                        // A larger set: count afresh.
                        tally: Tally::default(),
                    };
                }
            }
        }
        self.upstream_grow(now, channel, &mut up);
        if up.next_check.is_none() {
            up.next_check = Some(now + up.config.check_every);
        }
        self.upstreams.insert(channel, up);
    }

    /// When the parents drawn from cannot lose one without leaving fewer than K (the node
    /// started with the one candidate it knew, and answers named more since), a ready standby
    /// becomes a parent for substreams nobody carries yet: one more parent per call, until the
    /// invariant holds or `parents` is reached.
    fn upstream_grow(&mut self, now: Instant, channel: ChannelId, up: &mut Upstream) {
        let Some(params) = up.params else { return };
        if !up.unassigned.is_empty() {
            return;
        }
        let sets: Vec<SubstreamSet> = up
            .candidates
            .iter()
            .filter_map(|(_, s)| match s {
                Slot::Active { set, .. } => Some(*set),
                _ => None,
            })
            .collect();
        let held: usize = sets.iter().map(|s| s.len()).sum();
        let biggest = sets.iter().map(|s| s.len()).max().unwrap_or(0);
        if sets.is_empty() || sets.len() >= up.config.parents || held - biggest >= params.original()
        {
            return;
        }
        let ready = up.candidates.iter().position(|(_, s)| match s {
            Slot::Standby { conn, .. } => self.conns.get(conn).is_some_and(|c| c.established),
            _ => false,
        });
        let Some(i) = ready else { return };
        let mut with = sets;
        with.push(SubstreamSet::EMPTY);
        let grown = rebalance(
            params,
            &with,
            up.config.tolerate,
            up.rotation,
            up.config.all_from_one,
        );
        let Some(&set) = grown.last().filter(|s| !s.is_empty()) else {
            return;
        };
        let best = up.best_newest();
        let start = best.map_or(up.first_start, |b| StartAt::Seq(b.saturating_sub(1)));
        let (cand, slot) = up.candidates[i].clone();
        let Slot::Standby { conn, sub, .. } = slot else {
            return;
        };
        if self
            .subscribe_inner(now, cand.addr, cand.node, channel, set, start, Some(sub))
            .is_ok()
        {
            up.candidates[i].1 = Slot::activated(conn, sub, set, start, now);
        }
    }

    /// Finds lost, lagging, short and unreachable parents and moves their substreams; notices
    /// when no parent delivers at all (and when one does again).
    pub(super) fn upstream_check(&mut self, now: Instant) {
        let channels: Vec<ChannelId> = self.upstreams.keys().copied().collect();
        for channel in channels {
            let Some(up) = self.upstreams.get_mut(&channel) else {
                continue;
            };
            up.calm(now);
            // A parent that answered its stall's probe with shards: the stall was not its own
            // (this node's address moved, say, and every parent's packets went to the old
            // one), so it has the stall timeout to deliver what it owes before it can be
            // judged behind; at most once per CATCH_UP_EVERY, so that a parent that lags and
            // delivers in bursts is still judged.
            for (_, slot) in &up.candidates {
                if let Slot::Active {
                    conn, last_shard, ..
                } = slot
                    && let Some(c) = self.conns.get_mut(conn)
                    && let Some(p) = c.probed
                    && *last_shard > p
                    && c.caught_up.is_none_or(|(g, _)| {
                        g < p && now.saturating_duration_since(g) >= CATCH_UP_EVERY
                    })
                {
                    c.caught_up = Some((now, now + up.config.stall_timeout));
                }
            }
            let lost_conns = &self.lost_conns;
            let conns = &self.conns;
            let gone = |conn: &quinn_proto::ConnectionHandle| {
                lost_conns.contains(conn) || conns.get(conn).is_none_or(|c| c.closed)
            };
            // Not one datagram for a while, not even an acknowledgement of a keep-alive: the
            // path is cut, whatever the other parents do.
            let unreachable = |conn: &quinn_proto::ConnectionHandle| {
                conns.get(conn).is_some_and(|c| {
                    now.saturating_duration_since(c.last_rx) >= up.config.unreachable_after
                })
            };
            let best = up.best_newest();
            // What exists upstream: the newest chunk any parent delivered or any standby said
            // it holds. A parent that lacks it has something to send; one that lacks nothing
            // waits on the stream, however long that has been quiet (a source whose encoder
            // flushes once a second keeps every parent a second quiet before each burst).
            let standby_latest = up
                .candidates
                .iter()
                .filter_map(|(_, s)| match s {
                    Slot::Standby { latest, .. } => *latest,
                    _ => None,
                })
                .max();
            let known = best.max(standby_latest);
            let mut probe = Vec::new();
            for (_, slot) in &mut up.candidates {
                if let Slot::Active {
                    conn,
                    newest,
                    missing,
                    last_shard,
                    ..
                } = slot
                {
                    if missing.is_some_and(|(seq, _)| newest.is_some_and(|n| n >= seq)) {
                        *missing = None;
                    }
                    if missing.is_none()
                        && let Some(k) = known
                        && newest.is_none_or(|n| n < k)
                    {
                        *missing = Some((k, now));
                    }
                    let probed = conns.get(conn).and_then(|c| c.probed);
                    // Quiet while it lacks a chunk that exists (for long enough that it is
                    // not a parent a little later than another with each chunk): probed,
                    // once per stall.
                    if missing.is_some_and(|(_, seen)| {
                        now.saturating_duration_since(seen) >= PROBE_LACKING
                    }) && now.saturating_duration_since(*last_shard) >= PROBE_STALLED
                        && probed.is_none_or(|p| p < *last_shard)
                    {
                        probe.push(*conn);
                    }
                }
            }
            // Delivery ratios: a parent is short only if another one is healthy (otherwise the
            // bottleneck is our own link), and only the worst short parent moves per check.
            let ratios: Vec<Option<f64>> = up
                .candidates
                .iter()
                .map(|(_, s)| match s {
                    Slot::Active {
                        set, tally, newest, ..
                    } => tally.ratio(set.len(), *newest, now),
                    _ => None,
                })
                .collect();
            let healthy = ratios.iter().flatten().any(|&r| r >= HEALTHY_RATIO);
            let shortest = ratios
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.map(|r| (i, r)))
                .filter(|&(_, r)| healthy && r < SHORT_RATIO)
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(i, _)| i);
            let mut failed = Vec::new();
            for (i, (_, slot)) in up.candidates.iter().enumerate() {
                match slot {
                    Slot::Active {
                        conn,
                        newest,
                        last_shard,
                        missing,
                        set,
                        since,
                        start,
                        ..
                    } => {
                        let settled =
                            now.saturating_duration_since(*since) >= up.config.stall_timeout;
                        // A quiet parent is judged behind only once it has been probed and
                        // has had twice its round trip (at least PROBE_STALLED) to answer.
                        let unprobed = now.saturating_duration_since(*last_shard) >= PROBE_STALLED
                            && conns.get(conn).is_some_and(|c| {
                                c.probed.is_none_or(|p| {
                                    p < *last_shard
                                        || now.saturating_duration_since(p)
                                            < (c.quic.rtt() * 2).max(PROBE_STALLED)
                                })
                            });
                        let catching_up = conns
                            .get(conn)
                            .is_some_and(|c| c.caught_up.is_some_and(|(_, until)| now < until));
                        let behind = match (best, newest) {
                            (Some(b), Some(n)) => {
                                settled
                                    && !unprobed
                                    && !catching_up
                                    && b.saturating_sub(*n) >= up.lag_allow
                            }
                            _ => false,
                        };
                        let quiet =
                            now.saturating_duration_since(*last_shard) >= up.config.stall_timeout;
                        // Nothing from it for the stall timeout while it lacks a chunk that
                        // exists; or no datagram at all, whatever the others do.
                        let starved = missing.is_some_and(|(_, seen)| {
                            now.saturating_duration_since(seen.max(*last_shard))
                                >= up.config.stall_timeout
                        });
                        let silent = starved || (quiet && unreachable(conn));
                        let why = if gone(conn) {
                            Some(FailoverWhy::Lost)
                        } else if behind {
                            Some(FailoverWhy::Behind)
                        } else if silent {
                            Some(FailoverWhy::Silent)
                        } else if shortest == Some(i) {
                            Some(FailoverWhy::Short)
                        } else {
                            None
                        };
                        if let Some(why) = why {
                            // Resume where the lost parent stopped, or earlier: a player resumes
                            // at its next chunk to play, so nothing not yet output is missed.
                            // With nothing to go by (no parent delivered, nothing played yet),
                            // the set starts again where it was asked to start here.
                            let next = self.channels.get(&channel).and_then(Channel::next_play);
                            let resume = resume_point(newest.or(best), next);
                            // A parent that was never reached (its handshake never finished)
                            // and gave nothing is a dial that failed, not a failover: a node
                            // redialling its only upstream through an outage would otherwise
                            // count and announce one per attempt.
                            let reached =
                                newest.is_some() || conns.get(conn).is_some_and(|c| c.established);
                            failed.push(GaveUp {
                                slot: i,
                                conn: *conn,
                                set: *set,
                                again: resume.map_or(*start, StartAt::Seq),
                                resume: resume.unwrap_or(0),
                                why,
                                failover: reached,
                                delivering: matches!(why, FailoverWhy::Behind | FailoverWhy::Short)
                                    && now.saturating_duration_since(*last_shard)
                                        < DELIVERING_WITHIN,
                            });
                        }
                    }
                    Slot::Standby { conn, .. } if gone(conn) || unreachable(conn) => {
                        failed.push(GaveUp {
                            slot: i,
                            conn: *conn,
                            set: SubstreamSet::EMPTY,
                            again: StartAt::Live,
                            resume: 0,
                            why: FailoverWhy::Lost,
                            failover: false,
                            delivering: false,
                        });
                    }
                    _ => {}
                }
            }
            for (_, slot) in &mut up.candidates {
                if let Slot::Active { tally, .. } = slot {
                    tally.roll(best);
                }
            }
            // A parent replaced for lagging that has served well for `retry_after` since it
            // came back is forgiven: its next failure starts the back-off over.
            let failing: Vec<usize> = failed.iter().map(|f| f.slot).collect();
            for (i, (cand, slot)) in up.candidates.iter().enumerate() {
                if let Slot::Active { since, .. } = slot
                    && !failing.contains(&i)
                    && now.saturating_duration_since(*since) >= up.config.retry_after
                    && up.lagged.remove(&cand.node)
                {
                    up.strikes.remove(&cand.node);
                }
            }
            let delivering_behind = failed
                .iter()
                .filter(|f| f.failover && f.why == FailoverWhy::Behind)
                .count();
            up.replaced_behind(now, delivering_behind);
            let mut moved = Vec::new();
            for f in failed {
                let (i, conn) = (f.slot, f.conn);
                let node = up.candidates[i].0.node;
                // Slow but alive: its comeback's first shard does not forgive it. Gone (killed,
                // cut off): the old rule, so that it is taken back as soon as it answers again.
                if f.failover && f.delivering {
                    up.lagged.insert(node);
                } else {
                    up.lagged.remove(&node);
                }
                let until = up.strike(node, now);
                up.candidates[i].1 = Slot::Failed {
                    until,
                    refused: false,
                };
                if !f.set.is_empty() {
                    up.unassigned.push((f.set, f.again));
                    if f.failover {
                        up.failovers += 1;
                        moved.push((up.candidates[i].0.addr, f.resume, f.why));
                    }
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.close(now, close_code::DONE, "parent replaced");
                    mark(&mut self.dirty, c, conn);
                }
            }
            // A stalled parent is sent a PING before it is judged: if this node's address
            // changed (a new lease, a NAT rebinding), every parent's packets go to the old one
            // until this node sends something, and a player that only acknowledges sends
            // nothing while nothing arrives. Whichever parent's keep-alive fires first moves
            // to the new path and delivers its backlog at once; the PING moves the others
            // (QUIC migration) instead of their being replaced as behind in that instant.
            for handle in probe {
                if let Some(c) = self.conns.get_mut(&handle)
                    && !c.closed
                    && c.established
                {
                    c.probed = Some(now);
                    c.quic.ping();
                    mark(&mut self.dirty, c, handle);
                }
            }
            self.upstream_fill(now, channel);
            for (lost, resume, why) in moved {
                self.stats.failovers += 1;
                let replacement = self.upstreams.get(&channel).and_then(|u| {
                    u.candidates.iter().find_map(|(c, s)| match s {
                        Slot::Active {
                            set, newest: None, ..
                        } if !set.is_empty() => Some(c.addr),
                        _ => None,
                    })
                });
                self.events.push_back(NodeEvent::Failover {
                    channel,
                    lost,
                    replacement,
                    resume,
                    why,
                });
            }
            self.upstream_locality(now, channel);
            self.upstream_outage(now, channel);
            if let Some(up) = self.upstreams.get_mut(&channel) {
                up.next_check = Some(now + up.config.check_every);
            }
        }
        self.lost_conns.clear();
        self.ask_again(now);
        self.drop_idle_channels(now);
    }

    /// A standby told us the newest chunk it holds.
    pub(super) fn upstream_have(&mut self, channel: ChannelId, handle: ConnectionHandle, at: u64) {
        if let Some(up) = self.upstreams.get_mut(&channel)
            && let Some(i) = up.slot_of(handle)
            && let Slot::Standby { latest, .. } = &mut up.candidates[i].1
        {
            *latest = Some(latest.map_or(at, |l| l.max(at)));
        }
    }

    /// A parent refused our subscription to `channel` on `handle`: that candidate fails (with
    /// back-off), its substreams, if it had any, go to another, and the nodes it named become
    /// candidates.
    pub(super) fn upstream_refused(
        &mut self,
        now: Instant,
        channel: ChannelId,
        handle: ConnectionHandle,
        from: Option<NodeId>,
        alternatives: &[ParentCandidate],
        reason: RefuseReason,
    ) {
        let next_play = self.channels.get(&channel).and_then(Channel::next_play);
        let me = self.node;
        let Some(up) = self.upstreams.get_mut(&channel) else {
            return;
        };
        up.add_alternatives(alternatives, from, me);
        if let Some(i) = up.slot_of(handle) {
            let node = up.candidates[i].0.node;
            if let Slot::Active { set, newest, .. } = up.candidates[i].1.clone()
                && !set.is_empty()
            {
                let start = match newest {
                    Some(n) => {
                        let resume = n.saturating_sub(1);
                        StartAt::Seq(next_play.map_or(resume, |p| p.min(resume)))
                    }
                    None => up.first_start,
                };
                up.unassigned.push((set, start));
            }
            let until = up.strike(node, now);
            up.candidates[i].1 = Slot::Failed {
                until,
                // Full may change; not carrying the channel, or draining, will not for this.
                refused: reason == RefuseReason::Full,
            };
        }
        if let Some(c) = self.conns.get_mut(&handle)
            && c.taken.is_empty()
        {
            c.close(now, close_code::DONE, "refused");
            mark(&mut self.dirty, c, handle);
        }
        self.upstream_fill(now, channel);
    }

    /// Tells the application once when no parent has delivered `channel` for the stall
    /// timeout (every one lost, unreachable or silent), and once when one delivers again.
    fn upstream_outage(&mut self, now: Instant, channel: ChannelId) {
        // A source that finished flags its last chunk: silence after it is no fault.
        let ended = self.channels.get(&channel).is_some_and(|ch| {
            ch.range()
                .and_then(|(_, newest)| ch.chunk(newest))
                .is_some_and(|c| c.header().header.flags.contains(ChunkFlags::END_OF_STREAM))
        });
        let Some(up) = self.upstreams.get_mut(&channel) else {
            return;
        };
        // A parent that lacks nothing anyone has is waiting on the stream: it counts as
        // delivering for OUTAGE_QUIET stall timeouts, so that a source whose input comes in
        // bursts about a second apart is not announced lost before every burst, while a
        // stream that stops altogether still is, a few seconds later.
        let delivering = up.candidates.iter().any(|(_, s)| match s {
            Slot::Active {
                newest,
                last_shard,
                missing,
                ..
            } => {
                let allowed = if missing.is_none() {
                    up.config.stall_timeout * OUTAGE_QUIET
                } else {
                    up.config.stall_timeout
                };
                newest.is_some() && now.saturating_duration_since(*last_shard) < allowed
            }
            _ => false,
        });
        let grace = up.config.stall_timeout * 2;
        let mut ask_refusers = false;
        match up.outage {
            None if !delivering && now.saturating_duration_since(up.since) >= grace => {
                up.outage = Some(now);
                up.outage_ended = ended;
                up.outages += 1;
                // Those that turned this node away did so while others carried the channel
                // for it (a source sends peers to its relays): with every parent gone, that
                // may no longer hold, and they judge it afresh. Asked at once, and as often
                // as if they had never refused, rather than after a back-off grown while
                // the other parents served.
                for (cand, slot) in &mut up.candidates {
                    if let Slot::Failed { refused: true, .. } = slot {
                        *slot = Slot::Idle;
                        up.strikes.remove(&cand.node);
                        ask_refusers = true;
                    }
                }
                self.stats.upstream_outages += 1;
                let connected = up
                    .candidates
                    .iter()
                    .filter(|(_, s)| matches!(s, Slot::Active { .. } | Slot::Standby { .. }))
                    .count();
                self.events.push_back(NodeEvent::UpstreamLost {
                    channel,
                    candidates: up.candidates.len(),
                    connected,
                    ended,
                });
            }
            // An outage that began at the stream's end lasts while the newest chunk held ends
            // the stream: what parents deliver then is the end's chunks again (a replacement
            // resumes a little before the newest). It flows again with a chunk past the end,
            // a restarted broadcast.
            Some(since) if delivering && !(ended && up.outage_ended) => {
                up.outage = None;
                self.events.push_back(NodeEvent::UpstreamRestored {
                    channel,
                    after: now.saturating_duration_since(since),
                });
            }
            _ => {}
        }
        if ask_refusers {
            self.upstream_fill(now, channel);
        }
    }
}

/// A parent slot the check gives up on.
struct GaveUp {
    slot: usize,
    conn: quinn_proto::ConnectionHandle,
    /// The substreams it was to deliver (empty for a standby).
    set: SubstreamSet,
    /// Where that set starts at the next parent.
    again: StartAt,
    /// The chunk the failover resumes at, as reported.
    resume: u64,
    why: FailoverWhy,
    /// Counted and announced as a failover (a parent that was reached, or delivered).
    failover: bool,
    /// It was still delivering shards when it was replaced: slow, not gone.
    delivering: bool,
}

/// A parent replaced as behind or short that delivered a shard this recently is alive and
/// slow (a player yielding its uplink, a parent at its upload cap), not dead: one killed is
/// judged behind only once the others are 3 chunks (750 ms) ahead of its last shard.
const DELIVERING_WITHIN: Duration = Duration::from_millis(400);

/// A parent that has sent nothing this long while it lacks a chunk that exists is sent a
/// PING, once per stall (see `Engine::upstream_check`): well inside the 3 chunks (750 ms)
/// after which a parent killed is replaced as behind, so that its probe has gone unanswered
/// by then, and short of the 1-s keep-alive.
const PROBE_STALLED: Duration = Duration::from_millis(200);

/// …and has lacked that chunk this long: a parent a few tens of milliseconds later than
/// another with every chunk (one tier further from the source) is not probed for it.
const PROBE_LACKING: Duration = Duration::from_millis(250);

/// A parent that answers a stall's probe with shards is given the stall timeout to catch up
/// at most this often.
const CATCH_UP_EVERY: Duration = Duration::from_secs(3);
