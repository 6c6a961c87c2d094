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
pub(crate) fn arrival(
    now: Instant,
    real_now: Duration,
    stamp: Option<Duration>,
    floor: Instant,
) -> Instant {
    let Some(stamp) = stamp else {
        return now;
    };
    let waited = real_now.saturating_sub(stamp);
    now.checked_sub(waited)
        .unwrap_or(floor)
        .clamp(floor.min(now), now)
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
}
