//! A scavenger congestion controller for a peer's uploads: LEDBAT (RFC 6817), with the
//! reduced gains and the delay-triggered slow-start exit of LEDBAT++
//! (draft-irtf-iccrg-ledbat-plus-plus), as a quinn-proto [`Controller`].
//!
//! A player that relays shares its home uplink with its user's own traffic. A loss-based
//! controller (CUBIC) fills the uplink's queue until it overflows: everything else the user
//! sends waits behind the whole queue (a video call, a game), and a competing upload gets
//! about half the link. This controller watches the queue instead. It estimates the delay the
//! path adds over its emptiest (the base delay) and keeps it near a target well under a
//! home router's queue: it grows while the added delay is under the target, shrinks in
//! proportion to how far it is over, and halves on loss as CUBIC does. A loss-based flow
//! sharing the queue pushes the delay past the target, so this one backs off to its minimum
//! window and the other flow takes the link; the children of a starved peer find other
//! parents, as they do for any parent that lags.
//!
//! Delay is measured as round-trip time: QUIC acknowledges with no sender timestamps, so the
//! one-way delay RFC 6817 measures is not available (LEDBAT++ makes the same choice). A
//! sample is the age of the newest packet an acknowledgement covers; the current delay is the
//! least of the last [`CURRENT_FILTER`] samples within 100 ms of the newest, which drops the
//! receiver's occasional ACK delay; the base delay is the least sample of the last
//! [`BASE_BUCKETS`] minutes, so a route that changes is learnt within ten minutes.
//!
//! A connection opened while the queue is already full never sees the path empty, so its base
//! delay includes the queue and it takes the queue for the path (RFC 6817's latecomer
//! problem). A child that reconnects to a busy home player is such a latecomer every time.
//! The queue that matters to a peer is its own uplink's, which every one of its connections
//! crosses, so the connections of one node share what they see: each publishes its queuing
//! delay, and each acts on the largest any of them published in the last [`FRESH`] (a
//! player's connection to its parent, older than its children's, has usually measured the
//! path empty). The price is that a child's slow downlink, whose queue that child's own
//! connection keeps near the target, also holds the node's other connections there: a
//! scavenger errs on the side of yielding.
//!
//! Left out of LEDBAT++: its periodic slowdowns (two round trips at the minimum window every
//! so often, to re-measure the base delay when flows keep the queue from ever emptying). A
//! live stream is sent in bursts, one per chunk, and while the link carries it the queue
//! empties between them, which re-measures the base delay on its own; where the link cannot
//! carry it, the children move to other parents.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use quinn_proto::RttEstimator;
use quinn_proto::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// The queuing delay the controller aims for (LEDBAT++'s 60 ms; RFC 6817 allows up to 100).
pub const TARGET: Duration = Duration::from_millis(60);

/// Delay samples the current delay is the least of, at most.
pub const CURRENT_FILTER: usize = 4;

/// ... and only those this close to the newest: a connection that is sent little (a player's
/// connection to its parent carries keep-alives a second apart) has the newest alone.
const CURRENT_SPAN: Duration = Duration::from_millis(100);

/// Minutes of history the base delay is the least of.
pub const BASE_BUCKETS: usize = 10;

/// Length of one bucket of base-delay history.
const BASE_BUCKET: Duration = Duration::from_secs(60);

/// The window never falls below this many packets.
const MIN_WINDOW_PACKETS: u64 = 2;

/// The window a connection starts with, as quinn-proto's own controllers (10 packets of
/// 1200 bytes).
const INITIAL_WINDOW: u64 = 12_000;

/// How long a connection's published queuing delay counts for the others (longer than the
/// keep-alive interval, so that a connection that sends nothing else still counts).
const FRESH: Duration = Duration::from_secs(3);

/// How often a connection looks again at what the others published.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// The largest gain divisor (LEDBAT++: the gain is 1 / min(16, ⌈2 · target / base⌉)).
const MAX_GAIN_DIVISOR: f64 = 16.0;

/// Builds a [`Ledbat`] for each connection ([`quinn_proto::TransportConfig::
/// congestion_controller_factory`]).
#[derive(Debug, Clone)]
pub struct LedbatConfig {
    /// The queuing delay aimed for.
    pub target: Duration,
    /// The window a connection starts with, in bytes.
    pub initial_window: u64,
    /// What the controllers this factory built publish to each other (one node's).
    host: Host,
}

impl Default for LedbatConfig {
    fn default() -> Self {
        Self {
            target: TARGET,
            initial_window: INITIAL_WINDOW,
            host: Host::default(),
        }
    }
}

impl LedbatConfig {
    /// The queuing delay the node's uplink adds, as its connections measure it: the largest
    /// any of them published within [`FRESH`] before `now`. `None` when none has (nothing
    /// sent lately: nothing known of the queue, which a node that stopped uploading no longer
    /// adds to).
    pub fn uplink_queuing_delay(&self, now: Instant) -> Option<Duration> {
        self.host.largest(now)
    }
}

impl ControllerFactory for LedbatConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Ledbat::new(&self, now, current_mtu))
    }
}

/// One connection's published queuing delay.
#[derive(Debug)]
struct Published {
    /// (queuing delay, when it was estimated).
    estimate: Mutex<Option<(Duration, Instant)>>,
}

/// The connections of one node (those one factory built), each publishing its queuing delay.
#[derive(Debug, Clone, Default)]
struct Host(Arc<Mutex<Vec<Weak<Published>>>>);

impl Host {
    fn join(&self) -> Arc<Published> {
        let own = Arc::new(Published {
            estimate: Mutex::new(None),
        });
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&own));
        own
    }

    /// The largest queuing delay published within [`FRESH`] before `now`.
    fn largest(&self, now: Instant) -> Option<Duration> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.iter()
            .filter_map(Weak::upgrade)
            .filter_map(|p| *p.estimate.lock().unwrap_or_else(|e| e.into_inner()))
            .filter(|&(_, at)| now.saturating_duration_since(at) <= FRESH)
            .map(|(queuing, _)| queuing)
            .max()
    }

    /// The largest queuing delay another connection published recently.
    fn others(&self, own: &Arc<Published>, now: Instant) -> Option<Duration> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.iter()
            .filter_map(Weak::upgrade)
            .filter(|p| !Arc::ptr_eq(p, own))
            .filter_map(|p| {
                let estimate = *p.estimate.lock().unwrap_or_else(|e| e.into_inner());
                let (queuing, at) = estimate?;
                (now.saturating_duration_since(at) <= FRESH).then_some(queuing)
            })
            .max()
    }
}

/// One connection's controller; see the module doc.
#[derive(Debug, Clone)]
pub struct Ledbat {
    target: Duration,
    initial_window: u64,
    mtu: u64,
    /// Bytes that may be in flight (kept fractional so small increments add up).
    window: f64,
    /// Slow start runs while the window is below this.
    ssthresh: f64,
    /// The start of the last loss response: losses of packets sent before it are the same
    /// congestion episode.
    recovery_start: Option<Instant>,
    /// The newest delay samples, with when they were taken.
    current: VecDeque<(Instant, Duration)>,
    /// (bucket start, least sample in it), oldest first.
    base: VecDeque<(Instant, Duration)>,
    /// What the acknowledgements of the batch under way have covered.
    batch_bytes: u64,
    batch_sample: Option<Duration>,
    /// This connection's entry among its node's, and the node's.
    published: Arc<Published>,
    host: Host,
    /// The oldest other connection's queuing delay, and when it was looked up.
    others: Option<Duration>,
    looked: Option<Instant>,
}

impl Ledbat {
    /// A controller for a new connection.
    pub fn new(config: &LedbatConfig, _now: Instant, mtu: u16) -> Self {
        let mtu = u64::from(mtu);
        Self {
            target: config.target,
            initial_window: config.initial_window.max(MIN_WINDOW_PACKETS * mtu),
            mtu,
            window: config.initial_window.max(MIN_WINDOW_PACKETS * mtu) as f64,
            ssthresh: f64::INFINITY,
            recovery_start: None,
            current: VecDeque::with_capacity(CURRENT_FILTER),
            base: VecDeque::with_capacity(BASE_BUCKETS),
            batch_bytes: 0,
            batch_sample: None,
            published: config.host.join(),
            host: config.host.clone(),
            others: None,
            looked: None,
        }
    }

    fn min_window(&self) -> f64 {
        (MIN_WINDOW_PACKETS * self.mtu) as f64
    }

    /// Whether slow start is still running.
    pub fn in_slow_start(&self) -> bool {
        self.window < self.ssthresh
    }

    /// The least delay of the history: the path with its queues empty.
    pub fn base_delay(&self) -> Option<Duration> {
        self.base.iter().map(|&(_, d)| d).min()
    }

    /// The path's delay now, noise filtered: the least of the newest samples.
    pub fn current_delay(&self) -> Option<Duration> {
        let &(newest, _) = self.current.back()?;
        self.current
            .iter()
            .filter(|&&(at, _)| newest.saturating_duration_since(at) <= CURRENT_SPAN)
            .map(|&(_, d)| d)
            .min()
    }

    /// The delay queues add now, as this connection sees it: its current delay over its base.
    pub fn own_queuing_delay(&self) -> Duration {
        match (self.current_delay(), self.base_delay()) {
            (Some(c), Some(b)) => c.saturating_sub(b),
            _ => Duration::ZERO,
        }
    }

    /// The queuing delay acted on: the larger of this connection's own and the largest its
    /// node's other connections published recently.
    pub fn queuing_delay(&self) -> Duration {
        self.own_queuing_delay()
            .max(self.others.unwrap_or(Duration::ZERO))
    }

    /// LEDBAT++'s gain: slower growth where the base delay is short, so that a flow on a
    /// short path does not outgrow the others sharing the queue.
    fn gain(&self) -> f64 {
        let base = self.base_delay().unwrap_or(self.target).as_secs_f64();
        let divisor = if base <= 0.0 {
            MAX_GAIN_DIVISOR
        } else {
            (2.0 * self.target.as_secs_f64() / base)
                .ceil()
                .clamp(1.0, MAX_GAIN_DIVISOR)
        };
        1.0 / divisor
    }

    /// One delay sample: `at` is when the acknowledgement carrying it arrived. Publishes the
    /// new estimate to the node's other connections and looks at theirs.
    pub fn on_delay_sample(&mut self, at: Instant, sample: Duration) {
        self.record_sample(at, sample);
        *self
            .published
            .estimate
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((self.own_queuing_delay(), at));
        if self
            .looked
            .is_none_or(|l| at.saturating_duration_since(l) >= LOOK_EVERY)
        {
            self.looked = Some(at);
            self.others = self.host.others(&self.published, at);
        }
    }

    fn record_sample(&mut self, at: Instant, sample: Duration) {
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

    /// `bytes` newly acknowledged, with the delay estimates up to date.
    pub fn on_acked(&mut self, bytes: u64, app_limited: bool) {
        if bytes == 0 {
            return;
        }
        let target = self.target.as_secs_f64();
        let queuing = self.queuing_delay().as_secs_f64();
        let gain = self.gain();
        let bytes = bytes as f64;
        if self.in_slow_start() {
            if queuing > 0.75 * target {
                // The queue is filling: slow start is over before anything is lost.
                self.ssthresh = self.window;
            } else {
                if !app_limited {
                    self.window += gain * bytes;
                }
                return;
            }
        }
        let mtu = self.mtu as f64;
        let packets = self.window / mtu;
        // Per round trip, in packets: grow by up to the gain while under the target; over
        // it, shrink in proportion to the excess, by at most half.
        let per_rtt = if queuing < target {
            if app_limited {
                return;
            }
            gain * (target - queuing) / target
        } else {
            (gain - packets * (queuing / target - 1.0)).max(-packets / 2.0)
        };
        // This acknowledgement's share of a round trip's worth of acknowledgements.
        self.window += per_rtt * mtu * bytes / self.window;
        self.window = self.window.max(self.min_window());
    }

    /// A loss (or an ECN mark) of a packet sent at `sent`, noticed at `now`.
    pub fn on_loss(&mut self, now: Instant, sent: Instant, persistent: bool) {
        if persistent {
            self.window = self.min_window();
            self.ssthresh = self.window;
            self.recovery_start = Some(now);
            return;
        }
        if self.recovery_start.is_some_and(|start| sent <= start) {
            return;
        }
        self.recovery_start = Some(now);
        self.window = (self.window / 2.0).max(self.min_window());
        self.ssthresh = self.window;
    }
}

impl Controller for Ledbat {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        _app_limited: bool,
        _rtt: &RttEstimator,
    ) {
        self.batch_bytes += bytes;
        let age = now.saturating_duration_since(sent);
        self.batch_sample = Some(self.batch_sample.map_or(age, |s| s.min(age)));
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        _in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        if let Some(sample) = self.batch_sample.take() {
            self.on_delay_sample(now, sample);
        }
        let bytes = std::mem::take(&mut self.batch_bytes);
        self.on_acked(bytes, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        self.on_loss(now, sent, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.window = self.window.max(self.min_window());
    }

    fn window(&self) -> u64 {
        self.window as u64
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = ControllerMetrics::default();
        metrics.congestion_window = self.window();
        metrics.ssthresh = self.ssthresh.is_finite().then_some(self.ssthresh as u64);
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial_window
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
    const MS: Duration = Duration::from_millis(1);

    fn controller() -> (Ledbat, Instant) {
        let now = Instant::now();
        (Ledbat::new(&LedbatConfig::default(), now, MTU), now)
    }

    /// One round trip of acknowledgements: a window's worth, in packets, each batch carrying
    /// a delay sample of `rtt`.
    fn round_trip(c: &mut Ledbat, now: &mut Instant, rtt: Duration, app_limited: bool) {
        let packets = (c.window() / u64::from(MTU)).max(1);
        for _ in 0..packets {
            *now += rtt / packets as u32;
            c.on_delay_sample(*now, rtt);
            c.on_acked(u64::from(MTU), app_limited);
        }
    }

    #[test]
    fn slow_start_grows_and_ends_when_the_queue_builds_not_at_a_loss() {
        let (mut c, mut now) = controller();
        let start = c.window();
        for _ in 0..20 {
            round_trip(&mut c, &mut now, 20 * MS, false);
        }
        assert!(c.in_slow_start());
        assert!(c.window() > 2 * start, "{} from {start}", c.window());
        // The delay rises 50 ms over the base (above 3/4 of the 60 ms target).
        round_trip(&mut c, &mut now, 70 * MS, false);
        assert!(!c.in_slow_start());
    }

    #[test]
    fn under_the_target_it_grows_over_it_it_shrinks_to_the_minimum() {
        let (mut c, mut now) = controller();
        round_trip(&mut c, &mut now, 20 * MS, false);
        c.ssthresh = c.window;
        let before = c.window();
        for _ in 0..50 {
            round_trip(&mut c, &mut now, 50 * MS, false);
        }
        let grown = c.window();
        assert!(grown > before, "{grown} <= {before}");
        // A loss-based flow fills the queue: 100 ms over the base.
        for _ in 0..50 {
            round_trip(&mut c, &mut now, 120 * MS, false);
        }
        assert_eq!(c.window(), 2 * u64::from(MTU));
        // And when it has gone, the window grows again.
        for _ in 0..50 {
            round_trip(&mut c, &mut now, 25 * MS, false);
        }
        assert!(c.window() > 2 * u64::from(MTU));
    }

    #[test]
    fn a_small_excess_shrinks_it_a_little_a_large_one_by_half_a_round_trip() {
        let (mut c, mut now) = controller();
        round_trip(&mut c, &mut now, 20 * MS, false);
        c.ssthresh = 0.0;
        c.window = 100.0 * f64::from(MTU);
        // 66 ms queued: 10% over the target.
        round_trip(&mut c, &mut now, 86 * MS, false);
        let small = c.window() as f64 / (100.0 * f64::from(MTU));
        assert!((0.85..0.97).contains(&small), "{small}");
        c.window = 100.0 * f64::from(MTU);
        // 300 ms queued: five times the target.
        round_trip(&mut c, &mut now, 320 * MS, false);
        let large = c.window() as f64 / (100.0 * f64::from(MTU));
        assert!((0.45..0.65).contains(&large), "{large}");
    }

    #[test]
    fn an_application_limited_flow_does_not_grow() {
        let (mut c, mut now) = controller();
        let start = c.window();
        for _ in 0..20 {
            round_trip(&mut c, &mut now, 20 * MS, true);
        }
        assert_eq!(c.window(), start);
        c.ssthresh = 0.0;
        for _ in 0..20 {
            round_trip(&mut c, &mut now, 20 * MS, true);
        }
        assert_eq!(c.window(), start);
    }

    #[test]
    fn losses_of_one_episode_halve_the_window_once() {
        let (mut c, mut now) = controller();
        c.window = 64.0 * f64::from(MTU);
        let sent = now;
        now += 30 * MS;
        c.on_loss(now, sent, false);
        assert_eq!(c.window(), 32 * u64::from(MTU));
        assert!(!c.in_slow_start());
        // Another packet of the same flight, sent before the response.
        c.on_loss(now + MS, sent + MS, false);
        assert_eq!(c.window(), 32 * u64::from(MTU));
        // A packet sent after it: a new episode.
        c.on_loss(now + 40 * MS, now + 5 * MS, false);
        assert_eq!(c.window(), 16 * u64::from(MTU));
        c.on_loss(now + 80 * MS, now + 50 * MS, true);
        assert_eq!(c.window(), 2 * u64::from(MTU));
    }

    #[test]
    fn the_base_delay_is_the_least_of_the_last_ten_minutes() {
        let (mut c, mut now) = controller();
        c.on_delay_sample(now, 20 * MS);
        // The route changes: every sample is 80 ms from now on.
        for _ in 0..9 {
            now += BASE_BUCKET;
            c.on_delay_sample(now, 80 * MS);
        }
        assert_eq!(c.base_delay(), Some(20 * MS));
        assert_eq!(c.queuing_delay(), 60 * MS);
        now += BASE_BUCKET;
        c.on_delay_sample(now, 80 * MS);
        assert_eq!(c.base_delay(), Some(80 * MS));
        assert_eq!(c.queuing_delay(), Duration::ZERO);
    }

    #[test]
    fn the_current_delay_ignores_one_late_acknowledgement_but_not_a_stale_sample() {
        let (mut c, mut now) = controller();
        for d in [30, 30, 30] {
            now += 10 * MS;
            c.on_delay_sample(now, d * MS);
        }
        c.on_delay_sample(now, 55 * MS);
        assert_eq!(c.current_delay(), Some(30 * MS));
        for _ in 0..CURRENT_FILTER {
            c.on_delay_sample(now, 55 * MS);
        }
        assert_eq!(c.current_delay(), Some(55 * MS));
        // Samples a second apart (keep-alives): the newest alone.
        c.on_delay_sample(now + 1000 * MS, 20 * MS);
        c.on_delay_sample(now + 2000 * MS, 90 * MS);
        assert_eq!(c.current_delay(), Some(90 * MS));
    }

    #[test]
    fn the_gain_is_smaller_on_short_paths() {
        let (mut c, now) = controller();
        c.on_delay_sample(now, 5 * MS);
        assert!((c.gain() - 1.0 / 16.0).abs() < 1e-9);
        let (mut c, now) = controller();
        c.on_delay_sample(now, 40 * MS);
        assert!((c.gain() - 1.0 / 3.0).abs() < 1e-9);
        let (mut c, now) = controller();
        c.on_delay_sample(now, 200 * MS);
        assert!((c.gain() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_latecomer_acts_on_the_queue_an_older_connection_of_its_node_sees() {
        let config = LedbatConfig::default();
        let mut now = Instant::now();
        let mut old = Ledbat::new(&config, now, MTU);
        old.on_delay_sample(now, 20 * MS);
        now += 5 * BASE_BUCKET;
        // Another flow fills the uplink: 80 ms of queue.
        for _ in 0..CURRENT_FILTER {
            old.on_delay_sample(now, 100 * MS);
        }
        assert_eq!(old.queuing_delay(), 80 * MS);
        // A connection opened now sees the full queue from its first sample on.
        let mut late = Ledbat::new(&config, now, MTU);
        late.ssthresh = 0.0;
        late.window = 40.0 * f64::from(MTU);
        for _ in 0..CURRENT_FILTER {
            now += 10 * MS;
            late.on_delay_sample(now, 100 * MS);
            old.on_delay_sample(now, 100 * MS);
        }
        assert_eq!(late.own_queuing_delay(), Duration::ZERO);
        assert_eq!(late.queuing_delay(), 80 * MS);
        assert_eq!(config.uplink_queuing_delay(now), Some(80 * MS));
        for _ in 0..20 {
            round_trip(&mut late, &mut now, 100 * MS, false);
            old.on_delay_sample(now, 100 * MS);
        }
        assert_eq!(late.window(), 2 * u64::from(MTU));
        // The older one does not take the latecomer's view of an empty queue.
        old.on_delay_sample(now + LOOK_EVERY, 100 * MS);
        assert_eq!(old.queuing_delay(), 80 * MS);
        // An estimate more than a second old, or of a connection gone, does not count.
        now += FRESH + LOOK_EVERY + MS;
        late.on_delay_sample(now, 100 * MS);
        assert_eq!(late.queuing_delay(), Duration::ZERO);
        old.on_delay_sample(now, 100 * MS);
        drop(old);
        late.on_delay_sample(now + LOOK_EVERY, 100 * MS);
        assert_eq!(late.queuing_delay(), Duration::ZERO);
        assert_eq!(config.uplink_queuing_delay(now), Some(Duration::ZERO));
        // Nothing measured lately: nothing reported (the last figure would go stale).
        assert_eq!(
            config.uplink_queuing_delay(now + LOOK_EVERY + FRESH + MS),
            None
        );
        // Connections of another node never count.
        let fresh = LedbatConfig::default();
        assert_eq!(fresh.uplink_queuing_delay(now), None);
        let mut other = Ledbat::new(&fresh, now, MTU);
        other.on_delay_sample(now, 100 * MS);
        assert_eq!(other.queuing_delay(), Duration::ZERO);
    }

    #[test]
    fn the_window_follows_the_mtu_and_reports_its_threshold() {
        let (mut c, _) = controller();
        c.window = 100.0;
        c.on_mtu_update(1452);
        assert_eq!(c.window(), 2 * 1452);
        assert_eq!(c.metrics().ssthresh, None);
        c.ssthresh = 5000.0;
        assert_eq!(c.metrics().ssthresh, Some(5000));
        assert_eq!(c.metrics().congestion_window, 2 * 1452);
    }
}
