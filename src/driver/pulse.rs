//! A worker's pulse: what a running driver thread publishes about itself for the admin
//! listener (metrics, `/livez`, the systemd watchdog) without anyone having to ask it. The
//! loop counts into its own [`DriverStats`] as always and copies them here at most every
//! [`PUBLISH_EVERY`] of its turns' clock, so the hot path pays one clock comparison per
//! turn and an uncontended lock ten times a second. A worker that stops turning stops
//! publishing: its last turn ages, and that is what liveness checks read.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::DriverStats;

/// How often a worker copies its counters into its pulse.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// One worker's published state.
#[derive(Debug, Clone, Copy)]
pub struct PulseReading {
    /// The worker's counters when it last published.
    pub stats: DriverStats,
    /// Time spent working (outside the wait for input) up to then.
    pub busy: Duration,
    /// The start of its last loop turn.
    pub last_turn: Instant,
    /// Whether the thread still runs its loop (false once it returned, by stop or error).
    pub running: bool,
}

/// A worker's pulse, shared between the worker and whoever watches it.
#[derive(Debug)]
pub struct Pulse {
    reading: Mutex<PulseReading>,
}

impl Pulse {
    /// A pulse for a worker starting at `now`.
    pub fn new(now: Instant) -> Arc<Self> {
        Arc::new(Self {
            reading: Mutex::new(PulseReading {
                stats: DriverStats::default(),
                busy: Duration::ZERO,
                last_turn: now,
                running: true,
            }),
        })
    }

    /// The latest reading.
    pub fn read(&self) -> PulseReading {
        *self.reading.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The worker's loop has returned (stopped, or failed).
    pub fn mark_stopped(&self) {
        self.reading
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .running = false;
    }

    fn store(&self, stats: &DriverStats, busy: Duration, last_turn: Instant, running: bool) {
        let mut r = self.reading.lock().unwrap_or_else(PoisonError::into_inner);
        r.stats = *stats;
        r.busy = busy;
        r.last_turn = last_turn;
        r.running = running;
    }
}

/// The worker's side: busy-time accounting and rate-limited publishing.
#[derive(Debug)]
pub(crate) struct Beat {
    pulse: Arc<Pulse>,
    busy: Duration,
    published: Instant,
}

impl Beat {
    pub(crate) fn new(pulse: Arc<Pulse>, now: Instant) -> Self {
        Self {
            pulse,
            busy: Duration::ZERO,
            published: now,
        }
    }

    /// A turn that started at `start` worked until `until` (when it began to wait).
    pub(crate) fn worked(&mut self, start: Instant, until: Instant) {
        self.busy += until.saturating_duration_since(start);
    }

    /// Publishes if the last publication is [`PUBLISH_EVERY`] old at `now` (a turn start).
    pub(crate) fn turn(&mut self, now: Instant, stats: &DriverStats) {
        if now.saturating_duration_since(self.published) >= PUBLISH_EVERY {
            self.published = now;
            self.pulse.store(stats, self.busy, now, true);
        }
    }

    /// Publishes now (the loop is ending: its final counters).
    pub(crate) fn flush(&mut self, now: Instant, stats: &DriverStats) {
        self.published = now;
        self.pulse.store(stats, self.busy, now, true);
    }
}
