//! One io_uring worker's loop: its ring, socket, engine and mail (the node that starts the
//! workers, binds their sockets and steers packets to them is in `mod.rs`).

use super::*;

/// A datagram (or GRO batch) taken off the receive ring.
pub(super) struct Received {
    from: SocketAddr,
    info: cmsg::RecvInfo,
    payload: BytesMut,
}

/// One worker: its ring, socket, engine and mail. Field order matters: the ring closes before
/// the buffers it received into are freed.
pub(super) struct Worker {
    ring: Ring,
    bufs: BufRing,
    recv_header: RecvHeader,
    slots: Vec<SendSlot>,
    free: Vec<usize>,
    socket: Socket,
    v6: bool,
    tag: WorkerTag,
    engine: Engine,
    inbox: Receiver<Mail>,
    wake: Arc<File>,
    siblings: Vec<Mailbox>,
    events: Sender<NodeEvent>,
    stop: Arc<AtomicBool>,
    received: Vec<Received>,
    completions: Vec<(u64, i32, u32)>,
    resend: Vec<(SocketAddr, Vec<u8>, u8, Option<std::net::IpAddr>)>,
    control: Vec<u8>,
    recv_armed: bool,
    /// A reap while sending (waiting for a free slot) took a datagram or a wake-up (mail):
    /// the turn's wait must not sleep on them.
    input_mid_turn: bool,
    gso: bool,
    /// [`UringConfig::batch_window`].
    batch_window: Duration,
    /// [`UringConfig::timer_slack`].
    timer_slack: Duration,
    /// [`UringConfig::submit_after`].
    submit_after: usize,
    stats: DriverStats,
    beat: Beat,
    /// Received datagrams dated by their arrival (`driver/arrival.rs`).
    dating: crate::driver::Dating,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        tag: WorkerTag,
        config: &UringConfig,
        socket: Socket,
        engine: Engine,
        inbox: Receiver<Mail>,
        wake: Arc<File>,
        siblings: Vec<Mailbox>,
        events: Sender<NodeEvent>,
        stop: Arc<AtomicBool>,
        pulse: Arc<Pulse>,
    ) -> io::Result<Self> {
        #[allow(clippy::disallowed_methods)] // the pulse starts now
        let beat = Beat::new(pulse, Instant::now());
        let mut ring = Ring::new(config.ring_entries)?;
        if tag.index == 0 {
            tracing::info!(
                workers = tag.count,
                defer_taskrun = ring.features.defer_taskrun,
                "io_uring data plane starting"
            );
        }
        let bufs = BufRing::new(config.recv_buffers, RECV_BUF)?;
        ring.register(&bufs, BUFFER_GROUP)?;
        let slots: Vec<SendSlot> = (0..config.send_slots.max(1))
            .map(|_| SendSlot::new(16 * 1024))
            .collect();
        let free = (0..slots.len()).rev().collect();
        let v6 = socket.local_addr()?.is_ipv6();
        let mut worker = Self {
            ring,
            bufs,
            recv_header: RecvHeader::new(),
            slots,
            free,
            socket,
            v6,
            tag,
            engine,
            inbox,
            wake,
            siblings,
            events,
            stop,
            received: Vec::new(),
            completions: Vec::new(),
            resend: Vec::new(),
            control: Vec::with_capacity(128),
            recv_armed: false,
            input_mid_turn: false,
            gso: true,
            batch_window: config.batch_window,
            timer_slack: config.timer_slack,
            submit_after: config.submit_after,
            stats: DriverStats::default(),
            beat,
            dating: crate::driver::Dating::default(),
        };
        worker.arm_recv()?;
        let wake_fd = sys::raw(&*worker.wake);
        worker.ring.push_poll(wake_fd, TAG_WAKE)?;
        worker.ring.submit_and_wait(None)?;
        Ok(worker)
    }

    fn arm_recv(&mut self) -> io::Result<()> {
        let fd = sys::raw(&self.socket);
        self.ring
            .push_recv(fd, &self.recv_header, BUFFER_GROUP, TAG_RECV)?;
        self.recv_armed = true;
        Ok(())
    }

    pub(super) fn run(mut self) -> io::Result<(Engine, DriverStats)> {
        while !self.stop.load(Ordering::Relaxed) {
            self.stats.turns += 1;
            let _ = self.reap()?;
            #[allow(clippy::disallowed_methods)] // the driver owns the clock: once per turn
            let now = Instant::now();
            self.stats.cq_overflows = self.ring.overflows();
            self.beat.turn(now, &self.stats);
            // The wall clock, read only in a turn with datagrams to date.
            let real_now = (!self.received.is_empty()).then(crate::driver::wall_clock);
            for r in std::mem::take(&mut self.received) {
                let at = match real_now {
                    Some(real_now) => self.dating.date(now, real_now, r.info.arrived),
                    None => now,
                };
                if r.info.arrived.is_some() {
                    self.stats.rx_timestamped += 1;
                }
                self.deliver(at, r);
            }
            self.read_mail(now);
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine.handle_timeout(now);
            }
            let exports = self.engine.take_exports();
            if !exports.is_empty() && !self.siblings.is_empty() {
                let shared = Arc::new(exports);
                for sibling in &self.siblings {
                    let _ = sibling.queue.send(Mail::Import(Arc::clone(&shared)));
                }
                self.stats.exports += 1;
                for sibling in &self.siblings {
                    sibling.wake();
                }
            }
            self.transmit(now)?;
            // What arrives from here on is dated no earlier than this turn, whose time the
            // engine has now seen.
            self.dating.turn_seen(now);
            while let Some(event) = self.engine.poll_event() {
                let _ = self.events.send(event);
            }
            // Once a wait's window has passed, the kernel ends it for any completion in the
            // queue, this turn's own sends' too (they finish during submission): a quiet node
            // woke a window after every turn that sent, to reap them. Submitting them and
            // taking their completions first leaves the wait to input, mail and timers. Input
            // or mail taken with them waits for the window, as it would have in the wait, so
            // a busy node still gathers its children's ACKs.
            let mut gathered = false;
            if self.ring.features.min_timeout && self.ring.sends_unreaped() > 0 {
                self.stats.enters += 1;
                self.ring.submit_and_wait(Some(Duration::ZERO))?;
                gathered = self.reap()?;
            }
            let wait = self
                .engine
                .poll_timeout_coalesced(self.timer_slack)
                .map_or(MAX_WAIT, |t| t.saturating_duration_since(now))
                .min(MAX_WAIT);
            let mid_turn = std::mem::take(&mut self.input_mid_turn);
            let wait = if mid_turn || !self.resend.is_empty() {
                None
            } else if gathered {
                Some(wait.min(self.batch_window).max(Duration::from_micros(1)))
            } else {
                Some(wait.max(Duration::from_micros(1)))
            };
            self.stats.enters += 1;
            #[allow(clippy::disallowed_methods)] // and once more: where the work ends
            self.beat.worked(now, Instant::now());
            // The window gathers input but never holds a timer back: the kernel keeps a wait
            // for its whole minimum even when the timeout is shorter.
            let window = wait.map_or(self.batch_window, |w| w.min(self.batch_window));
            self.ring.submit_and_wait_past_sends(wait, window)?;
        }
        // Every neighbour hears that this node stops; `quiesce` submits the close packets
        // and waits for them to leave. Best effort: a ring that refuses them changes nothing
        // about the stop, and the teardown below must run whatever happens here.
        #[allow(clippy::disallowed_methods)] // the close's time
        let now = Instant::now();
        self.engine.close_all(now);
        if let Err(err) = self.transmit(now) {
            tracing::debug!(%err, "close packets not all sent");
        }
        self.beat.flush(now, &self.stats);
        let clean = self.quiesce();
        let Self {
            ring,
            bufs,
            slots,
            engine,
            stats,
            ..
        } = self;
        drop(ring);
        if !clean {
            // The kernel did not give everything back in a second: leak the memory it may
            // still write rather than free it under it.
            std::mem::forget(bufs);
            std::mem::forget(slots);
        }
        Ok((engine, stats))
    }

    /// Handles every completion available: received datagrams are queued for `deliver`, send
    /// slots are freed, wake-ups read. Whether any was input (a receive or a wake-up).
    fn reap(&mut self) -> io::Result<bool> {
        self.completions.clear();
        let mut completions = std::mem::take(&mut self.completions);
        self.ring.completions(&mut completions);
        let mut provided = false;
        let mut input = false;
        for &(data, res, flags) in &completions {
            match data & TAG_MASK {
                TAG_RECV => {
                    input = true;
                    provided |= self.on_recv(res, flags);
                    if !sys::cqe_more(flags) {
                        self.recv_armed = false;
                    }
                }
                TAG_SEND => self.on_sent((data & !TAG_MASK) as usize, res),
                TAG_WAKE => {
                    input = true;
                    let mut drain = [0u8; 8];
                    let _ = (&*self.wake).read(&mut drain);
                    if !sys::cqe_more(flags) {
                        let fd = sys::raw(&*self.wake);
                        self.ring.push_poll(fd, TAG_WAKE)?;
                    }
                }
                _ => {}
            }
        }
        self.completions = completions;
        if provided {
            self.bufs.publish();
        }
        if !self.recv_armed && !self.stop.load(Ordering::Relaxed) {
            self.arm_recv()?;
        }
        Ok(input)
    }

    /// One receive completion. Returns whether a buffer was replaced.
    fn on_recv(&mut self, res: i32, flags: u32) -> bool {
        if res < 0 {
            if res == -libc::ENOBUFS {
                self.stats.rx_buffers_exhausted += 1;
            } else if res != -libc::ECANCELED {
                self.stats.rx_errors += 1;
            }
            return false;
        }
        let Some(bid) = sys::cqe_buffer(flags) else {
            self.stats.rx_errors += 1;
            return false;
        };
        let Some(filled) = self.bufs.peek(bid, res as usize) else {
            self.stats.rx_errors += 1;
            return false;
        };
        let (from, info, start, len) = {
            let Ok(out) = io_uring::types::RecvMsgOut::parse(filled, self.recv_header.msghdr())
            else {
                self.stats.rx_errors += 1;
                self.bufs.recycle(bid);
                return true;
            };
            if out.is_payload_truncated() || out.is_name_data_truncated() {
                self.stats.rx_truncated += 1;
                self.bufs.recycle(bid);
                return true;
            }
            let Some(from) = cmsg::parse_sockaddr(out.name_data()) else {
                self.stats.rx_errors += 1;
                self.bufs.recycle(bid);
                return true;
            };
            let info = cmsg::parse_recv(out.control_data());
            let payload = out.payload_data();
            let start = payload.as_ptr() as usize - filled.as_ptr() as usize;
            (from, info, start, payload.len())
        };
        let payload = if len <= SMALL_DATAGRAM {
            // Acknowledgements and other small packets: copying a few bytes is cheaper than
            // a fresh 64 KiB buffer, so the buffer goes straight back to the kernel.
            let small = self
                .bufs
                .peek(bid, res as usize)
                .map(|b| BytesMut::from(&b[start..start + len]))
                .unwrap_or_default();
            self.bufs.recycle(bid);
            self.stats.rx_bytes_copied += len as u64;
            small
        } else {
            // The payload stays where the kernel put it: the buffer itself goes to the engine.
            let Some(mut buf) = self.bufs.take(bid, res as usize) else {
                self.stats.rx_errors += 1;
                return false;
            };
            buf.advance(start);
            buf.truncate(len);
            buf
        };
        self.stats.gro_batches += 1;
        self.received.push(Received {
            from,
            info,
            payload,
        });
        true
    }

    fn deliver(&mut self, now: Instant, r: Received) {
        let ecn = EcnCodepoint::from_bits(r.info.ecn);
        let stride = r.info.segment_size.unwrap_or(r.payload.len()).max(1);
        let mut rest = r.payload;
        while !rest.is_empty() {
            let datagram = if rest.len() > stride {
                rest.split_to(stride)
            } else {
                std::mem::take(&mut rest)
            };
            self.stats.datagrams_in += 1;
            self.stats.bytes_in += datagram.len() as u64;
            if self.tag.count > 1 && steered_to(&datagram, self.tag.count) != Some(self.tag.index) {
                self.stats.misrouted += 1;
            }
            self.engine
                .handle_datagram(now, r.from, r.info.dst_ip, ecn, datagram);
        }
    }

    fn read_mail(&mut self, now: Instant) {
        loop {
            match self.inbox.try_recv() {
                Ok(Mail::Command(command)) => command(&mut self.engine, now),
                Ok(Mail::Import(batch)) => {
                    self.stats.imports += 1;
                    for (channel, shards) in batch.iter() {
                        let _ = self.engine.import(now, *channel, shards);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
    }

    /// Queues every datagram the engine has, as long as send slots last.
    fn transmit(&mut self, now: Instant) -> io::Result<()> {
        let fd = sys::raw(&self.socket);
        // Datagrams of a batch the kernel refused as GSO go out one by one first.
        while !self.resend.is_empty() {
            let Some(i) = self.take_slot()? else { break };
            let Some((to, bytes, ecn, src)) = self.resend.pop() else {
                self.free.push(i);
                break;
            };
            let target = wire_addr(self.v6, to);
            let slot = &mut self.slots[i];
            slot.buf.clear();
            slot.buf.extend_from_slice(&bytes);
            cmsg::build_send(&mut self.control, self.v6, None, ecn, src);
            slot.destination = to;
            slot.segment_size = None;
            slot.ecn = ecn;
            slot.src_ip = src;
            slot.prepare(bytes.len(), target, &self.control);
            slot.busy = true;
            self.ring.push_send(fd, slot, TAG_SEND | i as u64)?;
            self.stats.sends += 1;
            self.stats.datagrams_out += 1;
            self.stats.bytes_out += bytes.len() as u64;
        }
        let mut queued = 0;
        while let Some(i) = self.take_slot()? {
            let slot = &mut self.slots[i];
            let Some(t) = self.engine.poll_transmit(now, &mut slot.buf) else {
                self.free.push(i);
                break;
            };
            let segment = t.segment_size.filter(|&s| s < t.size);
            let ecn = t.ecn.map_or(0, |e| e as u8);
            cmsg::build_send(&mut self.control, self.v6, segment, ecn, t.src_ip);
            slot.destination = t.destination;
            slot.segment_size = segment;
            slot.ecn = ecn;
            slot.src_ip = t.src_ip;
            let target = wire_addr(self.v6, t.destination);
            slot.prepare(t.size, target, &self.control);
            slot.busy = true;
            self.ring.push_send(fd, slot, TAG_SEND | i as u64)?;
            self.stats.sends += 1;
            self.stats.datagrams_out += segment.map_or(1, |s| t.size.div_ceil(s)) as u64;
            self.stats.bytes_out += t.size as u64;
            queued += t.size;
            if queued >= self.submit_after {
                // Copied by the kernel while still in cache; their slots come back for the
                // next packets (see `UringConfig::submit_after`).
                queued = 0;
                self.stats.enters += 1;
                self.ring.submit_and_wait(None)?;
                // Input taken here is the next turn's: it must not wait for it.
                self.input_mid_turn |= self.reap()?;
            }
        }
        Ok(())
    }

    /// A free send slot; when all are in flight, hands the queued sends to the kernel and waits
    /// (briefly) for some to complete. `None` if none came back.
    fn take_slot(&mut self) -> io::Result<Option<usize>> {
        if let Some(i) = self.free.pop() {
            return Ok(Some(i));
        }
        self.stats.slot_waits += 1;
        self.stats.enters += 1;
        self.ring.submit_and_wait(Some(Duration::from_millis(5)))?;
        // Mail or datagrams taken here are the next turn's: it must not wait for them.
        self.input_mid_turn |= self.reap()?;
        Ok(self.free.pop())
    }

    fn on_sent(&mut self, index: usize, res: i32) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        slot.busy = false;
        if res < 0 {
            let gso_refused =
                matches!(-res, libc::EIO | libc::EINVAL) && slot.segment_size.is_some();
            if gso_refused && self.gso {
                // The device or kernel cannot segment: stop asking, resend this batch whole.
                self.gso = false;
                self.stats.gso_disabled += 1;
                self.engine.set_max_gso_segments(1);
            }
            if gso_refused {
                if let Some(size) = slot.segment_size {
                    for part in slot.buf.chunks(size) {
                        self.resend
                            .push((slot.destination, part.to_vec(), slot.ecn, slot.src_ip));
                    }
                }
            } else {
                // Full socket buffer, unreachable host: the datagram is lost and QUIC
                // recovers it like any other loss.
                self.stats.send_refused(-res);
            }
        }
        self.free.push(index);
    }

    /// Before the buffers go: cancel the receive, let sends finish (bounded). False if the
    /// kernel still holds some of them.
    fn quiesce(&mut self) -> bool {
        if self.recv_armed {
            let _ = self.ring.push_cancel(TAG_RECV, TAG_CANCEL);
        }
        for _ in 0..100 {
            if !self.recv_armed && self.slots.iter().all(|s| !s.busy) {
                return true;
            }
            let _ = self.ring.submit_and_wait(Some(Duration::from_millis(10)));
            self.completions.clear();
            let mut completions = std::mem::take(&mut self.completions);
            self.ring.completions(&mut completions);
            for &(data, res, flags) in &completions {
                match data & TAG_MASK {
                    TAG_RECV if !sys::cqe_more(flags) => self.recv_armed = false,
                    TAG_RECV => {
                        // A datagram that raced the cancel: give its buffer back.
                        if res >= 0
                            && let Some(bid) = sys::cqe_buffer(flags)
                        {
                            let _ = self.bufs.take(bid, 0);
                        }
                    }
                    TAG_SEND => {
                        if let Some(s) = self.slots.get_mut((data & !TAG_MASK) as usize) {
                            s.busy = false;
                        }
                    }
                    _ => {}
                }
            }
            self.completions = completions;
        }
        false
    }
}
