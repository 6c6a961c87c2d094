//! What a connection's acknowledgements say about the queues on its path, sample by sample,
//! for LEDBAT ([`crate::node::ledbat`]), which keeps the queue it adds near a target.
//!
//! QUIC acknowledges with no sender timestamps, so delay is measured as round-trip time. A
//! sample is the age of the newest packet an acknowledgement batch covers (its other packets
//! waited at the receiver for the rest of the batch). The current delay is the least of the
//! last [`CURRENT_FILTER`] samples within 100 ms of the newest, which drops the receiver's
//! occasional ACK delay; the base delay is the least sample of the last [`BASE_BUCKETS`]
//! minutes, the path with its queues empty, so a route that changes is learnt within ten
//! minutes. Their difference is the queuing delay.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Delay samples the current delay is the least of, at most.
pub const CURRENT_FILTER: usize = 4;

/// ... and only those this close to the newest: a connection that is sent little (a player's
/// connection to its parent carries keep-alives a second apart) has the newest alone.
const CURRENT_SPAN: Duration = Duration::from_millis(100);

/// Minutes of history the base delay is the least of.
pub const BASE_BUCKETS: usize = 10;

/// Length of one bucket of base-delay history.
pub const BASE_BUCKET: Duration = Duration::from_secs(60);

/// One connection's delay history.
#[derive(Debug, Clone)]
pub struct DelayEstimate {
    /// The newest samples, with when they were taken.
    current: VecDeque<(Instant, Duration)>,
    /// (bucket start, least sample in it), oldest first.
    base: VecDeque<(Instant, Duration)>,
}

impl Default for DelayEstimate {
    fn default() -> Self {
        Self {
            current: VecDeque::with_capacity(CURRENT_FILTER),
            base: VecDeque::with_capacity(BASE_BUCKETS),
        }
    }
}

impl DelayEstimate {
    /// The least delay of the history: the path with its queues empty.
    pub fn base(&self) -> Option<Duration> {
        self.base.iter().map(|&(_, d)| d).min()
    }

    /// The path's delay now, noise filtered: the least of the newest samples.
    pub fn current(&self) -> Option<Duration> {
        let &(newest, _) = self.current.back()?;
        self.current
            .iter()
            .filter(|&&(at, _)| newest.saturating_duration_since(at) <= CURRENT_SPAN)
            .map(|&(_, d)| d)
            .min()
    }

    /// The delay queues add now: the current delay over the base (zero before any sample).
    pub fn queuing(&self) -> Duration {
        match (self.current(), self.base()) {
            (Some(c), Some(b)) => c.saturating_sub(b),
            _ => Duration::ZERO,
        }
    }

    /// One sample: `at` is when the acknowledgement carrying it arrived.
    pub fn record(&mut self, at: Instant, sample: Duration) {
        if self.current.len() == CURRENT_FILTER {
            self.current.pop_front();
        }
        self.current.push_back((at, sample));
        match self.base.back_mut() {
            Some((start, least)) if at.saturating_duration_since(*start) < BASE_BUCKET => {
                *least = (*least).min(sample);
            }
            _ => {
                if self.base.len() == BASE_BUCKETS {
                    self.base.pop_front();
                }
                self.base.push_back((at, sample));
            }
        }
    }
}

/// What the acknowledgements of one batch covered (quinn-proto calls `on_ack` per packet,
/// then `on_end_acks` once per batch).
#[derive(Debug, Clone, Default)]
pub struct AckBatch {
    bytes: u64,
    sample: Option<Duration>,
}

impl AckBatch {
    /// A packet of `bytes` sent at `sent` acknowledged at `now`.
    pub fn acked(&mut self, now: Instant, sent: Instant, bytes: u64) {
        self.bytes += bytes;
        let age = now.saturating_duration_since(sent);
        self.sample = Some(self.sample.map_or(age, |s| s.min(age)));
    }

    /// The batch's bytes and its delay sample (the newest packet's age), and a fresh batch.
    pub fn take(&mut self) -> (u64, Option<Duration>) {
        let taken = std::mem::take(self);
        (taken.bytes, taken.sample)
    }
}
