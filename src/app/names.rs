//! Host names in links are looked up again while the node runs. A broadcaster at home is
//! often reached by a dynamic-DNS name. When the line reconnects and gets a new address, the
//! name moves to the new address, and the source keeps running there. QUIC connections
//! cannot follow a server's new address, and a name looked up once at start names the old
//! address for good: the relays' redials go there and the grid never finds the source again.
//!
//! So the names a role was given are looked up again:
//! - Every [`IN_OUTAGE`] while some channel has no parent delivering ([`Names::set_outage`],
//!   from the role's `UpstreamLost` and `UpstreamRestored` events).
//! - Every [`OTHERWISE`] the rest of the time.
//!
//! A node whose addresses changed gets the new list in every worker's engine
//! (`Engine::learn_addresses`), and the next dial of it goes there first. The lookups run on
//! a thread of their own: a slow resolver never holds up the role's event loop. A lookup that
//! fails keeps what was known. Entries that name addresses, not names, are looked up with
//! their node's names, so that a node's list keeps them too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::link::{LinkNode, Resolved, address_book};
use crate::driver::Commander;
use crate::keys::NodeId;

/// How often names are looked up while a channel has no parent delivering.
pub(crate) const IN_OUTAGE: Duration = Duration::from_secs(3);

/// How often names are looked up otherwise.
pub(crate) const OTHERWISE: Duration = Duration::from_secs(60);

/// The thread that looks a role's host names up again; stopped when dropped.
pub(crate) struct Names {
    outage: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Names {
    /// Starts looking up again the names among `nodes` (a role's links and bootstrap nodes),
    /// for a node listening on `local`, handing changes to every worker of `commander`.
    /// `started` is what the role resolved them to at start. `None` if no entry is a name.
    pub(crate) fn watch(
        commander: Commander,
        nodes: Vec<LinkNode>,
        local: SocketAddr,
        started: &Resolved,
    ) -> std::io::Result<Option<Self>> {
        let named: Vec<NodeId> = nodes
            .iter()
            .filter(|n| n.is_name())
            .map(|n| n.node)
            .collect();
        if named.is_empty() {
            return Ok(None);
        }
        // Every entry of a node that some entry names by host name.
        let nodes: Vec<LinkNode> = nodes
            .into_iter()
            .filter(|n| named.contains(&n.node))
            .collect();
        let known: Vec<(NodeId, Vec<SocketAddr>)> = started
            .candidates
            .iter()
            .map(|c| {
                let all = started.addresses.iter().find(|(n, _)| *n == c.node);
                (c.node, all.map_or_else(|| vec![c.addr], |(_, a)| a.clone()))
            })
            .collect();
        let outage = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, s) = (Arc::clone(&outage), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("gridcast-names".into())
            .spawn(move || run(&commander, &nodes, local, known, &o, &s))?;
        Ok(Some(Self {
            outage,
            stop,
            thread: Some(thread),
        }))
    }

    /// Whether some channel has no parent delivering: names are then looked up every
    /// [`IN_OUTAGE`], starting at once.
    pub(crate) fn set_outage(&self, on: bool) {
        self.outage.store(on, Ordering::Relaxed);
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[allow(clippy::disallowed_methods)] // the thread paces itself by the clock
fn run(
    commander: &Commander,
    nodes: &[LinkNode],
    local: SocketAddr,
    mut known: Vec<(NodeId, Vec<SocketAddr>)>,
    outage: &AtomicBool,
    stop: &AtomicBool,
) {
    let mut last = Instant::now();
    let mut was_out = false;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let out = outage.load(Ordering::Relaxed);
        let every = if out { IN_OUTAGE } else { OTHERWISE };
        // An outage that has just begun is looked into at once.
        let begun = out && !was_out;
        if !begun && last.elapsed() < every {
            continue;
        }
        was_out = out;
        last = Instant::now();
        let book = match address_book(nodes, local) {
            Ok(book) => book,
            Err(err) => {
                tracing::debug!(%err, "looking host names up again; keeping what was known");
                continue;
            }
        };
        for (node, addrs) in book {
            if known.iter().any(|(n, a)| *n == node && *a == addrs) {
                continue;
            }
            tracing::info!(%node, addrs = ?addrs, "a node's host name now resolves to other addresses; dialling it there");
            for w in 0..commander.workers() {
                let list = addrs.clone();
                commander.command(w, Box::new(move |e, _| e.learn_addresses(node, &list)));
            }
            known.retain(|(n, _)| *n != node);
            known.push((node, addrs));
        }
    }
}
