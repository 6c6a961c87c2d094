//! Every connection's next QUIC deadline, in a binary min-heap that knows where each
//! connection's entry sits.
//!
//! A connection's deadline moves about twice for each chunk it is sent (sending arms loss
//! detection, the acknowledgement disarms it), so moving one must be cheap: here it is one
//! sift along a path of at most log2(n) entries of a contiguous array, where an ordered set
//! removes and inserts, walking and rebalancing tree nodes. Entries are ordered by
//! (deadline, handle), as the ordered set was, so connections due at the same instant are
//! handled in the same order and the simulator stays deterministic.

use std::time::Instant;

use quinn_proto::ConnectionHandle;

/// No entry for this handle.
const ABSENT: u32 = u32::MAX;

/// Most entries [`Timers::last_until`] looks at.
const LOOK_AT: usize = 64;

/// Connection deadlines (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: Vec<(Instant, ConnectionHandle)>,
    /// Each handle's index in `heap` (`ABSENT` if none); handles are small dense integers.
    slot: Vec<u32>,
}

impl Timers {
    /// The earliest deadline and its connection.
    pub(super) fn first(&self) -> Option<(Instant, ConnectionHandle)> {
        self.heap.first().copied()
    }

    /// Sets `handle`'s deadline: files, moves or (with `None`) drops its entry; an unchanged
    /// deadline costs a look at its entry.
    pub(super) fn set(&mut self, handle: ConnectionHandle, at: Option<Instant>) {
        let Some(at) = at else {
            self.remove(handle);
            return;
        };
        if self.slot.len() <= handle.0 {
            self.slot.resize(handle.0 + 1, ABSENT);
        }
        match self.slot[handle.0] {
            ABSENT => {
                self.heap.push((at, handle));
                let i = self.heap.len() - 1;
                self.slot[handle.0] = i as u32;
                self.sift_up(i);
            }
            i => {
                let i = i as usize;
                let was = self.heap[i].0;
                if at == was {
                    return;
                }
                self.heap[i].0 = at;
                if at < was {
                    self.sift_up(i);
                } else {
                    self.sift_down(i);
                }
            }
        }
    }

    /// Drops `handle`'s entry, if it has one.
    pub(super) fn remove(&mut self, handle: ConnectionHandle) {
        let Some(&i) = self.slot.get(handle.0) else {
            return;
        };
        if i == ABSENT {
            return;
        }
        self.slot[handle.0] = ABSENT;
        let i = i as usize;
        let last = self.heap.len() - 1;
        if i == last {
            self.heap.pop();
            return;
        }
        self.heap.swap_remove(i);
        self.slot[self.heap[i].1.0] = i as u32;
        // The entry moved into the hole may belong above it or below it.
        if i > 0 && self.heap[i] < self.heap[(i - 1) / 2] {
            self.sift_up(i);
        } else {
            self.sift_down(i);
        }
    }

    /// Takes the earliest entry if it is due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<ConnectionHandle> {
        let (at, handle) = self.first()?;
        if at > now {
            return None;
        }
        self.remove(handle);
        Some(handle)
    }

    /// The latest deadline no later than `end` among the first [`LOOK_AT`] entries that are
    /// (the entries up to `end` are a subtree at the root, walked from it), if any. Where more
    /// than that many fall before `end`, the answer may be an earlier one of them: a driver
    /// that wakes for it wakes no later than it must, and one turn's walk stays bounded
    /// however many connections' deadlines bunch together.
    pub(super) fn last_until(&self, end: Instant) -> Option<Instant> {
        let mut budget = LOOK_AT;
        self.last_under(0, end, &mut budget)
    }

    fn last_under(&self, i: usize, end: Instant, budget: &mut usize) -> Option<Instant> {
        if *budget == 0 {
            return None;
        }
        let &(at, _) = self.heap.get(i).filter(|(at, _)| *at <= end)?;
        *budget -= 1;
        let left = self.last_under(2 * i + 1, end, budget);
        let right = self.last_under(2 * i + 2, end, budget);
        Some(at.max(left.unwrap_or(at)).max(right.unwrap_or(at)))
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[parent] <= self.heap[i] {
                break;
            }
            self.exchange(i, parent);
            i = parent;
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let (left, right) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if left < n && self.heap[left] < self.heap[least] {
                least = left;
            }
            if right < n && self.heap[right] < self.heap[least] {
                least = right;
            }
            if least == i {
                break;
            }
            self.exchange(i, least);
            i = least;
        }
    }

    fn exchange(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.slot[self.heap[a].1.0] = a as u32;
        self.slot[self.heap[b].1.0] = b as u32;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // one base instant; time moves by hand
    use std::collections::BTreeSet;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    /// An operation on both the heap and an ordered set that serves as the model.
    #[derive(Debug, Clone)]
    enum Op {
        Set(usize, Option<u64>),
        Remove(usize),
        PopDue(u64),
        LastUntil(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..40, proptest::option::weighted(0.9, 0u64..200)).prop_map(|(h, t)| Op::Set(h, t)),
            1 => (0usize..40).prop_map(Op::Remove),
            1 => (0u64..200).prop_map(Op::PopDue),
            1 => (0u64..200).prop_map(Op::LastUntil),
        ]
    }

    proptest! {
        /// Whatever the order of operations, the heap answers as an ordered set of
        /// (deadline, handle) with one entry per handle does.
        #[test]
        fn the_heap_answers_as_an_ordered_set_of_deadlines(ops in proptest::collection::vec(op(), 1..300)) {
            let base = Instant::now();
            let at = |ms: u64| base + Duration::from_millis(ms);
            let mut timers = Timers::default();
            let mut model: BTreeSet<(Instant, ConnectionHandle)> = BTreeSet::new();
            let mut held: Vec<Option<Instant>> = vec![None; 40];
            for op in ops {
                match op {
                    Op::Set(h, t) => {
                        let handle = ConnectionHandle(h);
                        if let Some(old) = held[h].take() {
                            model.remove(&(old, handle));
                        }
                        if let Some(t) = t {
                            model.insert((at(t), handle));
                            held[h] = Some(at(t));
                        }
                        timers.set(handle, t.map(at));
                    }
                    Op::Remove(h) => {
                        if let Some(old) = held[h].take() {
                            model.remove(&(old, ConnectionHandle(h)));
                        }
                        timers.remove(ConnectionHandle(h));
                    }
                    Op::PopDue(now) => {
                        let want = model.first().copied().filter(|(t, _)| *t <= at(now));
                        if let Some(entry) = want {
                            model.remove(&entry);
                            held[entry.1.0] = None;
                        }
                        prop_assert_eq!(timers.pop_due(at(now)), want.map(|(_, h)| h));
                    }
                    Op::LastUntil(end) => {
                        let want = model.range(..=(at(end), ConnectionHandle(usize::MAX))).next_back().map(|(t, _)| *t);
                        prop_assert_eq!(timers.last_until(at(end)), want);
                    }
                }
                prop_assert_eq!(timers.first(), model.first().copied());
                prop_assert_eq!(timers.heap.len(), model.len());
            }
        }
    }

    #[test]
    fn the_walk_for_the_last_deadline_in_a_window_is_bounded() {
        let now = Instant::now();
        let mut timers = Timers::default();
        for h in 0..1000 {
            timers.set(
                ConnectionHandle(h),
                Some(now + Duration::from_micros(h as u64)),
            );
        }
        let end = now + Duration::from_millis(1);
        let last = timers.last_until(end).unwrap();
        // Some deadline at or after the first and within the window, found without a walk over
        // all 1000 that fall in it.
        assert!(last > now && last <= end, "{last:?}");
        let (first, _) = timers.first().unwrap();
        assert!(first < last);
        // A window with fewer entries than the walk may visit gets the exact answer.
        assert_eq!(
            timers.last_until(now + Duration::from_micros(30)),
            Some(now + Duration::from_micros(30))
        );
    }

    #[test]
    fn connections_due_at_once_come_out_in_handle_order() {
        let now = Instant::now();
        let mut timers = Timers::default();
        for h in [5, 2, 9, 0, 7] {
            timers.set(ConnectionHandle(h), Some(now));
        }
        timers.set(ConnectionHandle(3), Some(now + Duration::from_millis(1)));
        let order: Vec<usize> = std::iter::from_fn(|| timers.pop_due(now))
            .map(|h| h.0)
            .collect();
        assert_eq!(order, [0, 2, 5, 7, 9]);
        assert_eq!(timers.first().map(|(_, h)| h.0), Some(3));
    }
}
