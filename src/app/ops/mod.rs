//! Operating a node: the admin listener (`--admin`: `/metrics`, `/livez`, `/readyz`,
//! `/debug/channels`), its Prometheus metrics, and systemd notification. It runs on the
//! HTTP thread ([`super::http`]) and reads the data plane two ways, neither of which the
//! data plane waits for: every worker's pulse ([`crate::driver::pulse`]), and a report each
//! engine answers between two loop turns ([`crate::node::EngineReport`]), asked for with a
//! deadline so that a stuck worker delays a scrape by at most [`REPORT_TIMEOUT`].
//!
//! - `health`: liveness and readiness, pure, with the reason when not.
//! - `metrics`: the families and the fold of a snapshot into them.
//! - `admin`: the routes.
//! - `notify`: `READY=1`, `STOPPING=1` and the watchdog for systemd.

pub mod admin;
pub mod health;
pub mod metrics;
pub mod notify;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::driver::Commander;
use crate::driver::pulse::{Pulse, PulseReading};
use crate::node::EngineReport;

pub use metrics::{Metrics, NodeRole};

/// Longest a scrape or health check waits for a worker's report.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// A source's own counters, kept by its input loop.
#[derive(Debug, Default)]
pub struct SourceCounters {
    /// Chunks published.
    pub chunks_published: AtomicU64,
    /// Input bytes read.
    pub ingest_bytes: AtomicU64,
    /// An input is connected and delivering.
    pub encoder_connected: AtomicBool,
}

/// A reading of [`SourceCounters`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceReading {
    /// Chunks published.
    pub chunks_published: u64,
    /// Input bytes read.
    pub ingest_bytes: u64,
    /// An input is connected and delivering.
    pub encoder_connected: bool,
}

impl SourceCounters {
    /// The counters now.
    pub fn read(&self) -> SourceReading {
        SourceReading {
            chunks_published: self.chunks_published.load(Ordering::Relaxed),
            ingest_bytes: self.ingest_bytes.load(Ordering::Relaxed),
            encoder_connected: self.encoder_connected.load(Ordering::Relaxed),
        }
    }
}

/// What the data plane looks like at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Every worker's pulse, in worker order.
    pub pulses: Vec<PulseReading>,
    /// Every worker's report (`None`: it did not answer in time).
    pub reports: Vec<Option<EngineReport>>,
    /// A source's counters.
    pub source: Option<SourceReading>,
}

/// What the admin listener watches.
#[derive(Clone)]
pub struct Watched {
    /// Runs report commands on the workers.
    pub commander: Commander,
    /// The workers' pulses.
    pub pulses: Vec<Arc<Pulse>>,
    /// A source's counters.
    pub source: Option<Arc<SourceCounters>>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("workers", &self.pulses.len())
            .finish_non_exhaustive()
    }
}

impl Watched {
    /// Asks every worker for its report and reads the pulses (on the HTTP thread).
    pub async fn snapshot(&self) -> Snapshot {
        let mut waiting = Vec::with_capacity(self.pulses.len());
        for worker in 0..self.pulses.len() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let asked = self.commander.command(
                worker,
                Box::new(move |engine, now| {
                    let _ = tx.send(engine.report(now));
                }),
            );
            waiting.push(asked.then_some(rx));
        }
        let mut reports = Vec::with_capacity(waiting.len());
        for rx in waiting {
            let report = match rx {
                Some(rx) => tokio::time::timeout(REPORT_TIMEOUT, rx)
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            reports.push(report);
        }
        Snapshot {
            pulses: self.pulses.iter().map(|p| p.read()).collect(),
            reports,
            source: self.source.as_ref().map(|s| s.read()),
        }
    }
}

/// Where the admin listener listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum AdminListen {
    /// No admin listener.
    Off,
    /// This address.
    At(std::net::SocketAddr),
}

impl std::str::FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse().map(Self::At).map_err(|e| {
            let shown: String = s.chars().take(60).collect();
            format!("admin {shown:?}: give host:port (like 127.0.0.1:9464) or off: {e}")
        })
    }
}

impl TryFrom<String> for AdminListen {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// A running node's operations side: the admin listener and the watchdog. Dropping it
/// stops both.
pub struct Ops {
    _http: Option<super::http::HttpServer>,
    stop: Arc<AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    /// Where the admin listener listens, if it does.
    pub admin: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").field("admin", &self.admin).finish()
    }
}

impl Ops {
    /// Starts the admin listener at `listen` (`default`: the address was not given, so a
    /// port already taken is a warning, not an error) and the watchdog, then tells systemd
    /// the node is ready.
    pub fn start(
        node: &crate::driver::Node,
        role: NodeRole,
        listen: AdminListen,
        default: bool,
        source: Option<Arc<SourceCounters>>,
        titles: Option<admin::TitleRoute>,
    ) -> anyhow::Result<Self> {
        let watched = Watched {
            commander: node.commander(),
            pulses: node.pulses(),
            source,
        };
        let mut http = None;
        let mut admin = None;
        if let AdminListen::At(addr) = listen {
            let server = super::http::HttpServer::start()?;
            let metrics = Arc::new(Metrics::new(
                role,
                node.workers(),
                &node.backend().to_string(),
            ));
            let routes = if titles.is_some() {
                "/metrics /livez /readyz /debug/channels /admin/metadata"
            } else {
                "/metrics /livez /readyz /debug/channels"
            };
            match admin::start(&server, addr, watched.clone(), metrics, titles) {
                Ok((bound, _)) => {
                    tracing::info!(addr = %bound, routes, "admin listener");
                    admin = Some(bound);
                    http = Some(server);
                }
                Err(err) if default => {
                    tracing::warn!(%addr, %err, "no admin listener (give --admin to choose another address)");
                }
                Err(err) => {
                    return Err(anyhow::anyhow!("admin listener on {addr}: {err}"));
                }
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pulses = watched.pulses;
        let watchdog = notify::watchdog(pulses, Arc::clone(&stop));
        notify::ready(&format!(
            "{} serving on {} ({} workers, {})",
            role.as_str(),
            node.local_addr(),
            node.workers(),
            node.backend()
        ));
        Ok(Self {
            _http: http,
            stop,
            watchdog,
            admin,
        })
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}
