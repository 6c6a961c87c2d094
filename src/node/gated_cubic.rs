//! CUBIC that does not take random loss for congestion: a loss cuts the window only when the
//! path has lately shown a queue.
//!
//! A loss-based controller reads every lost packet as a full queue. On a path that loses
//! packets at random (a radio link, a lossy peering) that caps it at about
//! MSS / RTT · 1.22 / √p whatever the path could carry: at 5% loss and 80 ms, some
//! 0.7 Mbit/s, below what a supernode sends a viewer of a 1 Mbit/s stream, and the viewer
//! falls seconds behind (the grid bench's `--streams`). BBR ignores random loss but took
//! others' share behind a shared uplink (docs/performance.md).
//!
//! This keeps quinn-proto's CUBIC, unchanged, and looks at the round trips before passing it
//! a loss, as TCP Veno does: a queue that overflows has first filled, and a filling queue
//! shows as a smoothed round trip above the path's least. The smoothed round trip is
//! quinn-proto's, with the receiver's reported ACK delay taken out (a child acknowledges
//! every tenth packet or after its ACK delay, so raw samples of a thin flow all carry that
//! delay and look like a queue). A queue is seen when the smoothed round trip is
//! [`QUEUE_SIGN`] (or an eighth of the least, on a long path whose round trips jitter more)
//! over the least, and is remembered for two least round trips after it was last seen, since
//! the loss a queue caused is noticed a round trip later, when the queue may have drained.
//! A loss noticed with no queue seen is taken as random and left out; CUBIC still sees every
//! acknowledgement, so its growth and its slow start run as they would.
//!
//! Passed on unchanged, as CUBIC would take them: ECN marks (a queue said so), persistent
//! congestion (every packet of a span lost), any loss before the first round trip is known,
//! and every loss while the path has lost more than [`LOSS_CEILING`] of the bytes it carried
//! lately, which no random loss a link keeps working with explains (a policer, a link
//! failing): there the window shrinks as CUBIC's would.
//!
//! What it gives up: a bottleneck whose whole queue drains faster than [`QUEUE_SIGN`] (a
//! gigabit switch's shallow buffer) overflows without showing delay, and a flow through it
//! backs off only past the loss ceiling.
//!
//! What it does not reach: a path whose round trips jitter by ±10 ms or more. Its least round
//! trip sits 15–20 ms under its smoothed one with no queue at all, so every loss is passed on
//! and this is CUBIC (on the resilience bed at 6% loss with ±10 ms of jitter, players ended
//! 8–11 s behind the input, as on CUBIC; without jitter 0.1–0.2 s, against CUBIC's 5–9 s).
//! Measuring the queue from the least smoothed round trip of the last 30 s instead reached
//! the jittered bed (0.2 s) but took a bursty drop-tail queue's standing part for the path:
//! in the grid bench's 50-ms queue 10–20% more datagrams dropped than CUBIC. Not kept: a
//! random-loss gate must not make a real queue's losses worse, and jitter and a bursty queue
//! look alike in round trips alone. A live stream's flows are held to the stream's rate
//! by the stream itself, so what this lets through beyond CUBIC is the stream and its
//! retransmissions, not a window grown without bound.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::RttEstimator;
use quinn_proto::congestion::{
    Controller, ControllerFactory, ControllerMetrics, Cubic, CubicConfig,
};

/// The smoothed round trip over the least that shows a queue (at least; an eighth of the
/// least on a path longer than 80 ms).
pub const QUEUE_SIGN: Duration = Duration::from_millis(10);

/// The share of bytes lost beyond which every loss is congestion, queue or not.
pub const LOSS_CEILING: f64 = 0.15;

/// The loss share is of what was acknowledged and lost in about this long (both halved each
/// period).
const LOSS_PERIOD: Duration = Duration::from_secs(2);

/// Builds a [`GatedCubic`] for each connection ([`quinn_proto::TransportConfig::
/// congestion_controller_factory`]).
#[derive(Debug, Clone, Default)]
pub struct GatedCubicConfig {
    cubic: Arc<CubicConfig>,
}

impl ControllerFactory for GatedCubicConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(GatedCubic::new(Cubic::new(
            Arc::clone(&self.cubic),
            now,
            current_mtu,
        )))
    }
}

/// One connection's controller; see the module doc.
#[derive(Clone)]
pub struct GatedCubic {
    /// quinn-proto's CUBIC, held by value so that its calls (the window is asked for with
    /// every packet) are direct.
    cubic: Cubic,
    /// quinn-proto's smoothed round trip and least, as of the last acknowledgement.
    rtt: Option<(Duration, Duration)>,
    /// Bytes acknowledged in the batch under way.
    batch_bytes: u64,
    /// When a queue was last seen (forgotten two least round trips later).
    queue_seen: Option<Instant>,
    /// Bytes acknowledged and lost lately (halved every [`LOSS_PERIOD`]), and since when.
    acked: f64,
    lost: f64,
    period_start: Option<Instant>,
    /// Losses left out as random, and passed on as congestion, since the connection began.
    random: u64,
    congestive: u64,
}

impl std::fmt::Debug for GatedCubic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatedCubic")
            .field("window", &self.cubic.window())
            .field("rtt", &self.rtt)
            .field("random", &self.random)
            .field("congestive", &self.congestive)
            .finish_non_exhaustive()
    }
}

impl GatedCubic {
    /// Gates `cubic`: it receives every call but the losses left out.
    pub fn new(cubic: Cubic) -> Self {
        Self {
            cubic,
            rtt: None,
            batch_bytes: 0,
            queue_seen: None,
            acked: 0.0,
            lost: 0.0,
            period_start: None,
            random: 0,
            congestive: 0,
        }
    }

    /// Losses left out as random, and passed on as congestion.
    pub fn verdicts(&self) -> (u64, u64) {
        (self.random, self.congestive)
    }

    /// The share of bytes lost lately.
    pub fn loss_share(&self) -> f64 {
        let total = self.acked + self.lost;
        if total <= 0.0 { 0.0 } else { self.lost / total }
    }

    /// Whether a loss noticed at `now` is congestion: a queue seen lately, the loss ceiling
    /// passed, or nothing known of the path yet.
    pub fn is_congestion(&self, now: Instant) -> bool {
        let Some((_, least)) = self.rtt else {
            return true;
        };
        self.queue_seen
            .is_some_and(|seen| now.saturating_duration_since(seen) <= 2 * least)
            || self.loss_share() > LOSS_CEILING
    }

    /// An acknowledgement of `bytes`, when the path's smoothed round trip was `smoothed` and
    /// its least `least` (what the batch's end looks at).
    fn note_ack(&mut self, bytes: u64, smoothed: Duration, least: Duration) {
        self.batch_bytes += bytes;
        self.rtt = Some((smoothed, least));
    }

    /// The end of an acknowledgement batch at `now`: its bytes counted, and a queue noted if
    /// the round trips show one.
    fn end_batch(&mut self, now: Instant) {
        self.age(now);
        self.acked += std::mem::take(&mut self.batch_bytes) as f64;
        if let Some((smoothed, least)) = self.rtt
            && smoothed.saturating_sub(least) >= QUEUE_SIGN.max(least / 8)
        {
            self.queue_seen = Some(now);
        }
    }

    fn age(&mut self, now: Instant) {
        let start = *self.period_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= LOSS_PERIOD {
            self.acked /= 2.0;
            self.lost /= 2.0;
            self.period_start = Some(now);
        }
    }
}

impl Controller for GatedCubic {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.cubic.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.note_ack(bytes, rtt.get(), rtt.min());
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.end_batch(now);
        self.cubic
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.age(now);
        self.lost += lost_bytes as f64;
        // An ECN mark (no bytes lost) and persistent congestion are congestion whatever the
        // round trips say.
        if lost_bytes == 0 || is_persistent_congestion || self.is_congestion(now) {
            self.congestive += 1;
            self.cubic
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        } else {
            self.random += 1;
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.cubic.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.cubic.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.cubic.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.cubic.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // one base instant; time moves by hand
    use super::*;

    const MTU: u16 = 1200;

    fn controller() -> (GatedCubic, Instant) {
        let now = Instant::now();
        let cubic = Cubic::new(Arc::new(CubicConfig::default()), now, MTU);
        (GatedCubic::new(cubic), now)
    }

    /// 20 ms on, `packets` full packets acknowledged with the smoothed round trip at
    /// `smoothed` and the least at `least`.
    fn acked(c: &mut GatedCubic, now: &mut Instant, smoothed: u64, least: u64, packets: u64) {
        *now += Duration::from_millis(20);
        for _ in 0..packets {
            c.note_ack(
                u64::from(MTU),
                Duration::from_millis(smoothed),
                Duration::from_millis(least),
            );
        }
        c.on_end_acks(*now, 0, true, None);
    }

    fn lose(c: &mut GatedCubic, now: &mut Instant, packets: u64) {
        *now += Duration::from_millis(1);
        let sent = *now - Duration::from_millis(100);
        c.on_congestion_event(*now, sent, false, packets * u64::from(MTU));
    }

    #[test]
    fn a_loss_with_no_queue_leaves_the_window_alone() {
        let (mut c, mut now) = controller();
        for _ in 0..20 {
            acked(&mut c, &mut now, 85, 80, 10);
        }
        let window = c.window();
        lose(&mut c, &mut now, 1);
        assert_eq!(c.window(), window);
        assert_eq!(c.verdicts(), (1, 0));
    }

    #[test]
    fn a_loss_behind_a_queue_cuts_the_window_as_cubic_does() {
        let (mut c, mut now) = controller();
        for _ in 0..20 {
            acked(&mut c, &mut now, 80, 80, 10);
        }
        acked(&mut c, &mut now, 95, 80, 10);
        let window = c.window();
        lose(&mut c, &mut now, 1);
        assert!(c.window() < window, "{} !< {window}", c.window());
        assert_eq!(c.verdicts(), (0, 1));
    }

    #[test]
    fn a_queue_is_remembered_for_two_least_round_trips() {
        let (mut c, mut now) = controller();
        acked(&mut c, &mut now, 100, 80, 10);
        // Drained at once, but the loss it caused comes a round trip later.
        acked(&mut c, &mut now, 82, 80, 10);
        assert!(c.is_congestion(now));
        for _ in 0..8 {
            acked(&mut c, &mut now, 82, 80, 10);
        }
        assert!(!c.is_congestion(now), "180 ms after the queue was seen");
    }

    #[test]
    fn a_long_path_needs_an_eighth_of_its_round_trip_to_show_a_queue() {
        // 300 ms least: 30 ms over it is under its eighth (37.5 ms), 40 ms is not.
        let (mut c, mut now) = controller();
        acked(&mut c, &mut now, 330, 300, 10);
        assert!(!c.is_congestion(now));
        acked(&mut c, &mut now, 340, 300, 10);
        assert!(c.is_congestion(now));
    }

    #[test]
    fn ecn_persistent_congestion_and_a_loss_before_any_round_trip_are_passed_on() {
        let (mut c, mut now) = controller();
        let window = c.window();
        lose(&mut c, &mut now, 1);
        assert!(c.window() < window, "no round trip yet: CUBIC's cut");

        let (mut c, mut now) = controller();
        for _ in 0..4 {
            acked(&mut c, &mut now, 80, 80, 10);
        }
        let window = c.window();
        now += Duration::from_millis(1);
        c.on_congestion_event(now, now - Duration::from_millis(50), false, 0);
        let after_ecn = c.window();
        assert!(after_ecn < window, "an ECN mark is congestion");

        now += Duration::from_secs(1);
        c.on_congestion_event(now, now - Duration::from_millis(10), true, 12_000);
        assert!(
            c.window() < after_ecn,
            "persistent congestion collapses the window"
        );
        assert_eq!(c.verdicts(), (0, 2));
    }

    #[test]
    fn past_the_loss_ceiling_every_loss_is_congestion() {
        let (mut c, mut now) = controller();
        // 100 packets carried, then 5 lost: 5% is random.
        for _ in 0..10 {
            acked(&mut c, &mut now, 80, 80, 10);
        }
        for _ in 0..5 {
            lose(&mut c, &mut now, 1);
        }
        assert_eq!(c.verdicts(), (5, 0));
        let window = c.window();
        // 20 more lost of the 125: past 15%, with no queue.
        for _ in 0..20 {
            lose(&mut c, &mut now, 1);
        }
        assert!(c.loss_share() > LOSS_CEILING, "{}", c.loss_share());
        assert!(c.window() < window);
        let (random, congestive) = c.verdicts();
        assert!(random > 5 && congestive > 0, "{random} / {congestive}");
        // Seconds of clean delivery bring the share back under the ceiling.
        for _ in 0..400 {
            acked(&mut c, &mut now, 80, 80, 10);
        }
        assert!(c.loss_share() < LOSS_CEILING, "{}", c.loss_share());
        assert!(!c.is_congestion(now));
    }
}
