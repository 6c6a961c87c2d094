//! Locality: a node keeps drawing from the nearest parents it can find, measured, not guessed.
//!
//! The upstream policy dials `parents + standby` candidates in the order answers name them
//! and hands sets to the nearest standbys (lowest round trip) first. What it could not do was
//! learn of a nearer node it had not dialled, or leave a far parent that keeps up. Here, once
//! per channel and check:
//!
//! - **Measure.** The least round trip quinn-proto has seen on each parent's and standby's
//!   current connection (`min_rtt`: a path's propagation, not the queue a busy parent or a
//!   yielding uplink adds) is kept per node, also after its connection is gone.
//! - **Explore.** Every [`EXPLORE_EVERY`], while every parent and standby is in place, one
//!   candidate never measured nor explored is dialled as an extra standby (a handshake and an
//!   empty subscription: the channel information, nothing of the stream).
//! - **Trim.** Once every standby is measured, a standby beyond the policy's count is closed:
//!   the farthest, which is the newcomer itself when it is no nearer.
//! - **Move.** A parent that has served for [`SETTLED`] and is at least twice as far as a
//!   caught-up standby (one that has not failed or lagged lately), and [`NEARER_BY`] farther,
//!   hands its set to that standby, resuming one chunk before the parent's newest (as a
//!   failover does, so nothing is missed), and becomes a standby itself. At most one move per
//!   [`MOVE_EVERY`], so the grid does not churn; an equal-distance grid never moves.
//!
//! A node's distance is its current connection's least round trip: a route that grows longer
//! under a live connection shows only once the node is dialled afresh.

use std::time::{Duration, Instant};

use crate::keys::ChannelId;
use crate::node::channel::Channel;
use crate::node::upstream::{Slot, resume_point};
use crate::wire::{StartAt, SubstreamSet};

use super::conn::mark;
use super::{Engine, NodeEvent, close_code};

/// How often a candidate never measured is tried as an extra standby.
pub(crate) const EXPLORE_EVERY: Duration = Duration::from_secs(15);
/// How long a parent serves before it may be moved for distance.
pub(crate) const SETTLED: Duration = Duration::from_secs(10);
/// At most one move per channel this often.
pub(crate) const MOVE_EVERY: Duration = Duration::from_secs(10);
/// A standby must be nearer than a parent by this much (besides half its round trip) to take
/// its set: jitter and a few milliseconds of processing never move anything.
pub(crate) const NEARER_BY: Duration = Duration::from_millis(20);

impl Engine {
    /// Measures, explores, trims and moves for `channel` (see the module documentation).
    pub(super) fn upstream_locality(&mut self, now: Instant, channel: ChannelId) {
        let Some(mut up) = self.upstreams.remove(&channel) else {
            return;
        };
        if up.config.locality {
            self.locality_of(now, channel, &mut up);
        }
        self.upstreams.insert(channel, up);
    }

    fn locality_of(
        &mut self,
        now: Instant,
        channel: ChannelId,
        up: &mut crate::node::upstream::Upstream,
    ) {
        // Measure.
        let mut standbys = 0;
        let mut unmeasured_standby = false;
        for (cand, slot) in &up.candidates {
            let (Slot::Active { conn, .. } | Slot::Standby { conn, .. }) = slot else {
                continue;
            };
            let is_standby = matches!(slot, Slot::Standby { .. });
            standbys += usize::from(is_standby);
            match self.conns.get(conn).filter(|c| c.established && !c.closed) {
                // The current connection's least round trip: a node dialled afresh is measured
                // afresh, so a route that grew longer shows.
                Some(c) => {
                    up.distance.insert(cand.node, c.quic.min_rtt());
                }
                None => unmeasured_standby |= is_standby,
            }
        }
        let settled = up.unassigned.is_empty() && up.active() > 0;
        // Trim: a standby beyond the count, the farthest, once all are measured.
        if settled && standbys > up.config.standby && !unmeasured_standby {
            let farthest = up
                .candidates
                .iter()
                .enumerate()
                .filter_map(|(i, (c, s))| match s {
                    Slot::Standby { conn, .. } => Some((i, *conn, up.distance.get(&c.node))),
                    _ => None,
                })
                .max_by_key(|&(_, _, d)| d.copied());
            if let Some((i, conn, _)) = farthest {
                up.candidates[i].1 = Slot::Idle;
                self.close_unless_shared(
                    now,
                    channel,
                    conn,
                    "standby trimmed: a nearer one is kept",
                );
            }
            return;
        }
        // Explore: one never-measured candidate, while everything else is in place.
        if settled
            && standbys == up.config.standby
            && up.active() >= up.config.parents
            && now >= up.next_explore
        {
            up.next_explore = now + EXPLORE_EVERY;
            // Each candidate is explored once: one that cannot be reached (behind a firewall,
            // gone) must not be the only one ever tried.
            let fresh = up.candidates.iter().position(|(c, s)| {
                *s == Slot::Idle
                    && !up.distance.contains_key(&c.node)
                    && !up.explored.contains(&c.node)
                    && !self.refused.contains(&c.node)
            });
            if let Some(i) = fresh {
                let cand = up.candidates[i].0;
                up.explored.insert(cand.node);
                if let Ok(standby) = self.dial_standby(now, channel, cand) {
                    up.candidates[i].1 = standby;
                }
                return;
            }
        }
        // Move: the farthest settled parent to the nearest caught-up standby.
        if !settled
            || up
                .last_move
                .is_some_and(|at| now.saturating_duration_since(at) < MOVE_EVERY)
        {
            return;
        }
        let best = up.best_newest();
        let distance = |i: usize| up.distance.get(&up.candidates[i].0.node).copied();
        let established = |conn| {
            self.conns
                .get(conn)
                .is_some_and(|c| c.established && !c.closed)
        };
        let far = (0..up.candidates.len())
            .filter(|&i| match &up.candidates[i].1 {
                Slot::Active {
                    conn,
                    since,
                    newest,
                    ..
                } => {
                    established(conn)
                        && now.saturating_duration_since(*since) >= SETTLED
                        && newest.is_some()
                }
                _ => false,
            })
            .filter_map(|i| distance(i).map(|d| (i, d)))
            .max_by_key(|&(_, d)| d);
        let near = (0..up.candidates.len())
            .filter(|&i| match &up.candidates[i].1 {
                // Not one that failed or lagged lately: an overloaded near node would be left
                // as short and taken back for being near, over and over.
                Slot::Standby { conn, latest, .. } => {
                    let node = up.candidates[i].0.node;
                    established(conn)
                        && latest.zip(best).is_some_and(|(l, b)| l + 1 >= b)
                        && !up.strikes.contains_key(&node)
                        && !up.lagged.contains(&node)
                }
                _ => false,
            })
            .filter_map(|i| distance(i).map(|d| (i, d)))
            .min_by_key(|&(_, d)| d);
        let (Some((p, far_rtt)), Some((s, near_rtt))) = (far, near) else {
            return;
        };
        if near_rtt * 2 > far_rtt || far_rtt.saturating_sub(near_rtt) < NEARER_BY {
            return;
        }
        let Slot::Active {
            conn: p_conn,
            sub: p_sub,
            set,
            newest,
            ..
        } = up.candidates[p].1.clone()
        else {
            return;
        };
        let Slot::Standby {
            conn: s_conn,
            sub: s_sub,
            ..
        } = up.candidates[s].1.clone()
        else {
            return;
        };
        // Resume as a failover would: a chunk before the parent's newest, or the next chunk to
        // play if that is earlier.
        let next = self.channels.get(&channel).and_then(Channel::next_play);
        let resume = resume_point(newest, next).unwrap_or(0);
        let (near_cand, far_cand) = (up.candidates[s].0, up.candidates[p].0);
        let start = StartAt::Seq(resume);
        if self
            .subscribe_inner(
                now,
                near_cand.addr,
                near_cand.node,
                channel,
                set,
                start,
                Some(s_sub),
            )
            .is_err()
        {
            return;
        }
        up.candidates[s].1 = Slot::activated(s_conn, s_sub, set, start, now);
        // The far parent stops sending its set and stays connected, as a standby.
        let _ = self.subscribe_inner(
            now,
            far_cand.addr,
            far_cand.node,
            channel,
            SubstreamSet::EMPTY,
            StartAt::Live,
            Some(p_sub),
        );
        up.candidates[p].1 = Slot::Standby {
            conn: p_conn,
            sub: p_sub,
            latest: newest,
        };
        up.last_move = Some(now);
        up.moves += 1;
        self.stats.parent_moves += 1;
        self.events.push_back(NodeEvent::ParentMoved {
            channel,
            from: far_cand.addr,
            to: near_cand.addr,
            from_rtt: far_rtt,
            to_rtt: near_rtt,
            resume,
        });
    }

    /// Closes `conn`, unless another channel's upstream still has it as a parent or standby.
    fn close_unless_shared(
        &mut self,
        now: Instant,
        channel: ChannelId,
        conn: quinn_proto::ConnectionHandle,
        why: &'static str,
    ) {
        let shared = self
            .upstreams
            .iter()
            .any(|(ch, up)| *ch != channel && up.slot_of(conn).is_some());
        if shared {
            return;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.close(now, close_code::DONE, why);
            mark(&mut self.dirty, c, conn);
        }
    }
}
