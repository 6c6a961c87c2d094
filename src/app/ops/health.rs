//! Liveness and readiness, decided from a snapshot. Pure: every check takes `now`.
//!
//! - Live: every worker still runs its loop and began a turn within [`STALE_AFTER`] (an idle
//!   worker turns at least once a second, so a stale one is stuck). What `/livez` and
//!   the systemd watchdog check.
//! - Ready: live, every worker answered its report, not draining, every channel drawn from
//!   parents has one delivering, and a source has its input. What `/readyz` checks; a load
//!   balancer or a Kubernetes readiness probe sends nobody to a node that is not.

use std::time::{Duration, Instant};

use crate::driver::pulse::PulseReading;
use crate::node::ChannelMode;

use super::Snapshot;

/// A worker whose last turn is older than this is stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// Whether every worker is alive; the first reason if not.
pub fn liveness(pulses: &[PulseReading], now: Instant) -> Result<(), String> {
    if pulses.is_empty() {
        return Err("no worker runs".to_owned());
    }
    for (w, p) in pulses.iter().enumerate() {
        if !p.running {
            return Err(format!("worker {w} has stopped"));
        }
        let age = now.saturating_duration_since(p.last_turn);
        if age > STALE_AFTER {
            return Err(format!(
                "worker {w} made no progress for {:.1} s",
                age.as_secs_f64()
            ));
        }
    }
    Ok(())
}

/// Whether the node should be sent traffic; every reason it should not, if not.
pub fn readiness(snapshot: &Snapshot, now: Instant) -> Result<(), Vec<String>> {
    let mut why = Vec::new();
    if let Err(e) = liveness(&snapshot.pulses, now) {
        why.push(e);
    }
    for (w, r) in snapshot.reports.iter().enumerate() {
        let Some(r) = r else {
            why.push(format!(
                "worker {w} did not answer within {:?}",
                super::REPORT_TIMEOUT
            ));
            continue;
        };
        if r.draining && !why.iter().any(|w| w == "draining") {
            why.push("draining".to_owned());
        }
        for c in &r.channels {
            if c.mode != ChannelMode::Source && c.delivering == Some(false) {
                let line = format!(
                    "channel {}: no parent delivers (worker {w}, {} parents)",
                    c.channel, c.parents
                );
                why.push(line);
            }
        }
    }
    if let Some(s) = &snapshot.source
        && !s.encoder_connected
    {
        why.push("no input connected".to_owned());
    }
    if why.is_empty() { Ok(()) } else { Err(why) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // one base instant; time moves by hand
    use super::*;
    use crate::driver::DriverStats;
    use crate::driver::pulse::PulseReading;

    fn pulse(at: Instant, running: bool) -> PulseReading {
        PulseReading {
            stats: DriverStats::default(),
            busy: Duration::ZERO,
            last_turn: at,
            running,
        }
    }

    #[test]
    fn a_stale_or_stopped_worker_is_not_live_and_says_which() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        assert!(liveness(&[pulse(now, true), pulse(now, true)], now).is_ok());
        let stale = liveness(&[pulse(now, true), pulse(t0, true)], now).unwrap_err();
        assert!(
            stale.contains("worker 1") && stale.contains("10.0 s"),
            "{stale}"
        );
        let stopped = liveness(&[pulse(now, false)], now).unwrap_err();
        assert!(stopped.contains("worker 0 has stopped"), "{stopped}");
        assert!(liveness(&[], now).is_err());
    }

    #[test]
    fn a_worker_that_does_not_answer_or_a_source_without_input_is_not_ready() {
        let now = Instant::now();
        let snapshot = Snapshot {
            pulses: vec![pulse(now, true)],
            reports: vec![None],
            source: Some(super::super::SourceReading::default()),
        };
        let why = readiness(&snapshot, now).unwrap_err();
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].contains("did not answer"));
        assert!(why[1].contains("no input"));
    }
}
