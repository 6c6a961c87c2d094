//! When a received datagram arrived, for the engine: both drivers hand it the kernel's
//! receive time (`SO_TIMESTAMPNS`) instead of their loop turn's, so that what QUIC measures
//! leaves out the time the datagram waited for the turn.

use std::time::{Duration, Instant};

/// The instant a datagram arrived, for the engine: the kernel's wall-clock `stamp` taken back
/// from `real_now` (the wall clock read beside `now`), kept between `floor` and `now`.
///
/// QUIC dates a datagram by the `now` it is handled with: its round-trip samples, the ACK
/// delay it reports and its idle timer all start there. The turn's own `now` would add the
/// time the datagram waited in the socket for the turn (up to the batch window, and any turn
/// before it) to every round trip the node measures, which the gated CUBIC reads for queues.
/// `floor` is the turn before this one's `now` or the last arrival handed over, whichever is
/// later, so a wall clock stepped back or forth cannot date a datagram before what the engine
/// has already seen, nor after the turn.
fn arrival(now: Instant, real_now: Duration, stamp: Option<Duration>, floor: Instant) -> Instant {
    let Some(stamp) = stamp else {
        return now;
    };
    let waited = real_now.saturating_sub(stamp);
    now.checked_sub(waited)
        .unwrap_or(floor)
        .clamp(floor.min(now), now)
}

/// A driver's dating of what it receives: the floor [`arrival`] keeps to, moved by each
/// datagram dated and by each loop turn whose time the engine has seen.
#[derive(Debug, Default)]
pub(crate) struct Dating {
    last: Option<Instant>,
}

impl Dating {
    /// The time to hand the engine a datagram with, stamped `stamp` by the kernel and taken
    /// in the turn of `now` (`real_now` the wall clock read with it).
    pub(crate) fn date(
        &mut self,
        now: Instant,
        real_now: Duration,
        stamp: Option<Duration>,
    ) -> Instant {
        let at = arrival(now, real_now, stamp, self.last.unwrap_or(now));
        self.last = Some(at);
        at
    }

    /// The engine has seen the turn of `now`: nothing received later is dated before it.
    pub(crate) fn turn_seen(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

/// The wall clock, as the kernel stamps received datagrams (`CLOCK_REALTIME`).
pub(crate) fn wall_clock() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_is_dated_by_its_arrival_within_the_floor_and_the_turn() {
        #[allow(clippy::disallowed_methods)] // any instant will do
        let floor = Instant::now();
        let now = floor + Duration::from_millis(10);
        let real_now = Duration::from_secs(1_765_000_000);
        // No timestamp: the turn's time.
        assert_eq!(arrival(now, real_now, None, floor), now);
        // Stamped 3 ms before the wall clock was read: 3 ms before the turn.
        let stamped = real_now - Duration::from_millis(3);
        assert_eq!(
            arrival(now, real_now, Some(stamped), floor),
            now - Duration::from_millis(3)
        );
        // Stamped before the floor (a wall clock stepped forward since): the floor.
        let old = real_now - Duration::from_secs(30);
        assert_eq!(arrival(now, real_now, Some(old), floor), floor);
        // Stamped after the wall clock's reading (stepped back since): the turn's time.
        let ahead = real_now + Duration::from_secs(30);
        assert_eq!(arrival(now, real_now, Some(ahead), floor), now);
        // A floor past the turn (never set so by the worker) still yields the turn's time.
        let late_floor = now + Duration::from_millis(1);
        assert_eq!(arrival(now, real_now, Some(stamped), late_floor), now);
    }

    #[test]
    fn dating_never_goes_back_within_a_turn_or_across_turns() {
        #[allow(clippy::disallowed_methods)] // any instant will do
        let start = Instant::now();
        let now = start + Duration::from_millis(10);
        let real_now = Duration::from_secs(1_765_000_000);
        let mut dating = Dating::default();
        // The first datagram ever has no floor but the turn: its own time counts only from
        // the next one on.
        assert_eq!(dating.date(now, real_now, None), now);
        dating.turn_seen(start);
        let a = dating.date(now, real_now, Some(real_now - Duration::from_millis(4)));
        assert_eq!(a, now - Duration::from_millis(4));
        // Stamped earlier than the one before it: no earlier than it.
        let b = dating.date(now, real_now, Some(real_now - Duration::from_millis(8)));
        assert_eq!(b, a);
        // After the turn, nothing is dated before the turn.
        dating.turn_seen(now);
        let later = now + Duration::from_millis(5);
        let c = dating.date(later, real_now + Duration::from_millis(5), Some(real_now));
        assert_eq!(c, now);
    }
}
