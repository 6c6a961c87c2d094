//! Drivers: the only code that touches sockets, threads and the clock. Each runs
//! [`Engine`](crate::node::Engine)s on real UDP sockets, following the engine's call order.
//!
//! - [`uring`] (Linux): one worker per core, each with its own io_uring, socket (one
//!   `SO_REUSEPORT` group, connection-id steering) and engine. The supernode data plane.
//! - [`portable`]: one thread, one UDP socket through quinn-udp (GSO, GRO, ECN and local-address
//!   control messages where the platform has them). Runs everywhere; it is the fallback where
//!   io_uring is refused.
//!
//! [`Node::start`] picks one by [`IoBackend`] and gives both the same handle.

mod arrival;
pub mod portable;
pub mod pulse;
#[cfg(target_os = "linux")]
pub mod uring;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::thread::{self, JoinHandle};
use std::time::Instant;

pub(crate) use arrival::{Dating, wall_clock};

use crate::node::{Engine, EngineError, NodeEvent, WorkerTag};

/// Work for the engine, run on the driver's thread with the instant of its loop turn.
pub type Command = Box<dyn FnOnce(&mut Engine, Instant) + Send>;

/// Counters kept by a driver (one set per worker).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Receive completions or calls (a GRO batch is one).
    pub gro_batches: u64,
    /// `sendmsg` calls or submissions made (a GSO batch is one).
    pub sends: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Bytes received (UDP payload).
    pub bytes_in: u64,
    /// Bytes sent (UDP payload).
    pub bytes_out: u64,
    /// Sends the kernel refused (the datagram is lost; QUIC recovers), all reasons.
    pub send_errors: u64,
    /// Of those, refused for a full socket buffer (EAGAIN, ENOBUFS).
    pub send_errors_buffer_full: u64,
    /// Of those, refused because the destination is unreachable (ECONNREFUSED, EHOSTUNREACH,
    /// ENETUNREACH).
    pub send_errors_unreachable: u64,
    /// Of those, refused as too large for the path (EMSGSIZE).
    pub send_errors_too_large: u64,
    /// Loop turns.
    pub turns: u64,
    /// Received bytes copied out of the socket buffers into engine buffers: every byte with
    /// the portable backend; with io_uring only datagrams of at most 512 bytes (mostly
    /// acknowledgements), larger ones are handed over in the buffer the kernel filled.
    pub rx_bytes_copied: u64,
    /// io_uring: `io_uring_enter` calls made by the loop.
    pub enters: u64,
    /// io_uring: times the loop waited for a free send slot.
    pub slot_waits: u64,
    /// io_uring: times the kernel refused GSO and it was switched off (0 or 1).
    pub gso_disabled: u64,
    /// io_uring: times the receive stopped because every provided buffer was in use (it is
    /// re-armed at once).
    pub rx_buffers_exhausted: u64,
    /// io_uring: completions the kernel dropped because the completion queue was full.
    pub cq_overflows: u64,
    /// io_uring: datagrams dropped because they did not fit a receive buffer.
    pub rx_truncated: u64,
    /// Receives that carried the kernel's arrival time (`SO_TIMESTAMPNS`), by which the engine
    /// dates them.
    pub rx_timestamped: u64,
    /// io_uring: receive completions with an error.
    pub rx_errors: u64,
    /// io_uring: datagrams whose connection id belongs to another worker (steering failed).
    pub misrouted: u64,
    /// io_uring: shard batches taken from sibling workers.
    pub imports: u64,
    /// io_uring: shard batches handed to sibling workers.
    pub exports: u64,
    /// portable: waits ended by a command or the stop flag (the driver's own waker).
    pub wakes: u64,
}

/// Which data plane to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBackend {
    /// io_uring where the kernel allows it, else portable (with one log line saying why).
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// quinn-udp sockets, one thread.
    Portable,
}

impl std::str::FromStr for IoBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Self::Uring),
            "portable" => Ok(Self::Portable),
            other => Err(format!(
                "unknown io backend {other:?} (expected auto, uring or portable)"
            )),
        }
    }
}

/// The backend a node actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    /// io_uring workers.
    Uring,
    /// The portable thread.
    Portable,
}

impl std::fmt::Display for Chosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Uring => "uring",
            Self::Portable => "portable",
        })
    }
}

/// Resolves `requested` on this machine. `Auto` probes io_uring (see [`uring::probe`]) and
/// logs one line when it falls back; `Uring` fails with the kernel's answer if refused.
pub fn choose(requested: IoBackend) -> io::Result<Chosen> {
    match requested {
        IoBackend::Portable => Ok(Chosen::Portable),
        IoBackend::Uring => uring_available().map(|()| Chosen::Uring).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("io_uring backend requested but unavailable: {e}"),
            )
        }),
        IoBackend::Auto => match uring_available() {
            Ok(()) => Ok(Chosen::Uring),
            Err(e) => {
                tracing::warn!(
                    "io_uring unavailable ({e}); using the portable backend (quinn-udp, one thread)"
                );
                Ok(Chosen::Portable)
            }
        },
    }
}

/// Whether the io_uring backend can run here; the error is the kernel's (or the platform's)
/// answer.
#[cfg(target_os = "linux")]
pub fn uring_available() -> io::Result<()> {
    uring::probe()
}

/// Whether the io_uring backend can run here: never, off Linux.
#[cfg(not(target_os = "linux"))]
pub fn uring_available() -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "io_uring exists only on Linux",
    ))
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A socket or ring call failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// An engine could not be made.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Another gridcast process already serves the address and port (or the port on every
    /// address).
    #[error(
        "another gridcast node already serves UDP {0}; a second node there would split or take over its connections"
    )]
    PortShared(SocketAddr),
}

enum Running {
    #[cfg(target_os = "linux")]
    Uring(uring::UringNode),
    Portable {
        mailbox: portable::Mailbox,
        stop: Arc<AtomicBool>,
        thread: JoinHandle<io::Result<(Engine, DriverStats)>>,
        pulse: Arc<pulse::Pulse>,
    },
}

/// Runs commands on a node's workers from another thread (see [`Node::commander`]).
#[derive(Clone)]
pub struct Commander(CommanderInner);

#[derive(Clone)]
enum CommanderInner {
    #[cfg(target_os = "linux")]
    Uring(Vec<uring::Mailbox>),
    Portable(portable::Mailbox),
}

impl std::fmt::Debug for Commander {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commander")
            .field("workers", &self.workers())
            .finish()
    }
}

impl Commander {
    /// Number of workers.
    pub fn workers(&self) -> usize {
        match &self.0 {
            #[cfg(target_os = "linux")]
            CommanderInner::Uring(m) => m.len(),
            CommanderInner::Portable(_) => 1,
        }
    }

    /// Runs `command` on worker `worker`'s engine. False if it has stopped or does not exist.
    pub fn command(&self, worker: usize, command: Command) -> bool {
        match &self.0 {
            #[cfg(target_os = "linux")]
            CommanderInner::Uring(m) => m.get(worker).is_some_and(|m| m.command(command)),
            CommanderInner::Portable(mailbox) => worker == 0 && mailbox.command(command),
        }
    }
}

/// A node's engines running on a backend.
pub struct Node {
    chosen: Chosen,
    local: SocketAddr,
    workers: usize,
    running: Running,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("backend", &self.chosen)
            .field("local", &self.local)
            .field("workers", &self.workers)
            .finish()
    }
}

impl DriverStats {
    /// Counts a refused send by its OS error number.
    pub(crate) fn send_refused(&mut self, errno: i32) {
        self.send_errors += 1;
        match errno {
            libc::EAGAIN | libc::ENOBUFS => self.send_errors_buffer_full += 1,
            libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH => {
                self.send_errors_unreachable += 1;
            }
            libc::EMSGSIZE => self.send_errors_too_large += 1,
            _ => {}
        }
    }
}

impl Node {
    /// Binds `addr` and runs engines made by `make` on the chosen backend: `workers` of them
    /// with io_uring, one with the portable backend. `make` gets each engine's [`WorkerTag`]
    /// (put it in [`crate::node::EngineConfig::worker`], and set `export_shards` when there is
    /// more than one worker). Events of every engine go to `events`.
    pub fn start(
        backend: IoBackend,
        addr: SocketAddr,
        workers: usize,
        mut make: impl FnMut(WorkerTag) -> Result<Engine, EngineError>,
        events: &Sender<NodeEvent>,
    ) -> Result<Self, StartError> {
        match choose(backend)? {
            #[cfg(target_os = "linux")]
            Chosen::Uring => {
                let config = uring::UringConfig {
                    workers: workers.max(1),
                    ..Default::default()
                };
                Self::run_uring(addr, &config, make, events)
            }
            #[cfg(not(target_os = "linux"))]
            Chosen::Uring => Err(io::Error::from(io::ErrorKind::Unsupported).into()),
            Chosen::Portable => {
                let engine = make(WorkerTag { index: 0, count: 1 })?;
                let driver = portable::PortableDriver::bind(addr, engine)?;
                let local = driver.local_addr();
                let (commands, inbox) = mpsc::channel::<Command>();
                let mailbox = driver.mailbox(commands);
                let stop = Arc::new(AtomicBool::new(false));
                let events = events.clone();
                let flag = Arc::clone(&stop);
                #[allow(clippy::disallowed_methods)] // the pulse starts now
                let pulse = pulse::Pulse::new(Instant::now());
                let beat = Arc::clone(&pulse);
                let thread =
                    thread::Builder::new()
                        .name("gridcast-io".into())
                        .spawn(move || {
                            let result = driver.run(&inbox, &events, &flag, &beat);
                            beat.mark_stopped();
                            result
                        })?;
                Ok(Self {
                    chosen: Chosen::Portable,
                    local,
                    workers: 1,
                    running: Running::Portable {
                        mailbox,
                        stop,
                        thread,
                        pulse,
                    },
                })
            }
        }
    }

    /// Like [`Node::start`] with the io_uring backend, on settings of the caller's (the
    /// benchmarks measure them one at a time).
    #[cfg(target_os = "linux")]
    pub fn start_uring(
        addr: SocketAddr,
        config: &uring::UringConfig,
        make: impl FnMut(WorkerTag) -> Result<Engine, EngineError>,
        events: &Sender<NodeEvent>,
    ) -> Result<Self, StartError> {
        choose(IoBackend::Uring)?;
        Self::run_uring(addr, config, make, events)
    }

    #[cfg(target_os = "linux")]
    fn run_uring(
        addr: SocketAddr,
        config: &uring::UringConfig,
        make: impl FnMut(WorkerTag) -> Result<Engine, EngineError>,
        events: &Sender<NodeEvent>,
    ) -> Result<Self, StartError> {
        let node = uring::UringNode::start(addr, config, make, events)?;
        Ok(Self {
            chosen: Chosen::Uring,
            local: node.local_addr(),
            workers: node.workers(),
            running: Running::Uring(node),
        })
    }

    /// The backend running.
    pub fn backend(&self) -> Chosen {
        self.chosen
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Number of engines (workers).
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// A handle that runs commands on the workers from any thread, for as long as they run.
    pub fn commander(&self) -> Commander {
        match &self.running {
            #[cfg(target_os = "linux")]
            Running::Uring(node) => Commander(CommanderInner::Uring(node.mailboxes())),
            Running::Portable { mailbox, .. } => {
                Commander(CommanderInner::Portable(mailbox.clone()))
            }
        }
    }

    /// Every worker's pulse, in worker order (see [`pulse`]).
    pub fn pulses(&self) -> Vec<Arc<pulse::Pulse>> {
        match &self.running {
            #[cfg(target_os = "linux")]
            Running::Uring(node) => node.pulses(),
            Running::Portable { pulse, .. } => vec![Arc::clone(pulse)],
        }
    }

    /// Runs `command` on worker `worker`'s engine (0 for the portable backend). False if it
    /// has stopped or does not exist.
    pub fn command(&self, worker: usize, command: Command) -> bool {
        match &self.running {
            #[cfg(target_os = "linux")]
            Running::Uring(node) => node.command(worker, command),
            Running::Portable { mailbox, .. } => worker == 0 && mailbox.command(command),
        }
    }

    /// Stops the node as a crash would: no neighbour is told, so they find out by silence
    /// (the demo's supernode killed without warning). [`Node::stop`] tells every neighbour.
    pub fn halt(self) -> io::Result<Vec<(Engine, DriverStats)>> {
        let (tx, rx) = mpsc::channel();
        let mut asked = 0;
        for w in 0..self.workers() {
            let tx = tx.clone();
            let command: Command = Box::new(move |e, _| {
                e.set_farewell(false);
                let _ = tx.send(());
            });
            if self.command(w, command) {
                asked += 1;
            }
        }
        for _ in 0..asked {
            if rx.recv_timeout(std::time::Duration::from_secs(1)).is_err() {
                break;
            }
        }
        self.stop()
    }

    /// Stops the node, closing every connection first so that each neighbour learns it at
    /// once; returns each engine and its driver counters, in worker order.
    pub fn stop(self) -> io::Result<Vec<(Engine, DriverStats)>> {
        match self.running {
            #[cfg(target_os = "linux")]
            Running::Uring(node) => node.stop(),
            Running::Portable {
                stop,
                thread,
                mailbox,
                ..
            } => {
                stop.store(true, Ordering::Relaxed);
                mailbox.wake();
                let result = thread
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("portable driver panicked")))?;
                Ok(vec![result])
            }
        }
    }
}
