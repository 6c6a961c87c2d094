//! The node's Prometheus metrics. Nothing on a hot path touches them: the engines count into
//! their plain stats, the drivers into theirs, and a scrape takes a [`Snapshot`] of those and
//! folds it into handles registered once at start ([`Metrics::new`]), then renders
//! (`metrics-exporter-prometheus`, classic text format). Every name, type and label set is
//! listed in `docs/metrics.md`, and a test holds the two equal.
//!
//! Labels come from small fixed sets only: `worker` (the worker's index), `role`, `reason`,
//! `result`, `direction`; never a peer, an address, a connection or a channel. Per-channel
//! detail is `/debug/channels`.

use std::time::{Duration, SystemTime};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

use crate::driver::pulse::PulseReading;
use crate::node::EngineReport;

use super::Snapshot;

/// Which command this process runs: it decides which families exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    /// `gridcast broadcast`.
    Source,
    /// `gridcast relay`.
    Relay,
    /// `gridcast play`.
    Peer,
}

impl NodeRole {
    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Relay => "relay",
            Self::Peer => "peer",
        }
    }
}

/// Buckets of the QUIC round-trip histogram, in seconds.
const RTT_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
];

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

/// Registers families on one recorder.
struct Registry<'a> {
    recorder: &'a PrometheusRecorder,
}

impl Registry<'_> {
    fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.clone()))
            .collect();
        Key::from_parts(name, labels)
    }

    fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> Counter {
        self.recorder
            .describe_counter(KeyName::from(name), None, SharedString::from(help));
        self.recorder
            .register_counter(&Self::key(name, labels), &metadata())
    }

    fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> Gauge {
        self.recorder
            .describe_gauge(KeyName::from(name), None, SharedString::from(help));
        self.recorder
            .register_gauge(&Self::key(name, labels), &metadata())
    }

    fn histogram(&self, name: &'static str, help: &'static str) -> Histogram {
        self.recorder
            .describe_histogram(KeyName::from(name), None, SharedString::from(help));
        self.recorder
            .register_histogram(&Self::key(name, &[]), &metadata())
    }

    /// One counter per value of `label`.
    fn counters<const N: usize>(
        &self,
        name: &'static str,
        help: &'static str,
        label: &'static str,
        values: [&'static str; N],
    ) -> [Counter; N] {
        values.map(|v| self.counter(name, help, &[(label, v.to_owned())]))
    }
}

/// One worker's families.
struct WorkerMetrics {
    turns: Counter,
    last_progress: Gauge,
    datagrams_in: Counter,
    bytes_in: Counter,
    datagrams_out: Counter,
    bytes_out: Counter,
    /// buffer_full, unreachable, too_large, other.
    send_errors: [Counter; 4],
    gso_batches: Counter,
    gso_segments: Counter,
    gro_batches: Counter,
    gro_segments: Counter,
    gso_disabled: Gauge,
    misrouted: Counter,
    buffers_exhausted: Counter,
    cq_overflows: Counter,
    truncated: Counter,
}

impl WorkerMetrics {
    fn new(r: &Registry<'_>, worker: usize) -> Self {
        let w = || [("worker", worker.to_string())];
        let send_error =
            |reason: &'static str| {
                r.counter(
                "gridcast_udp_send_errors_total",
                "UDP sends the kernel refused, by reason (the datagram is lost; QUIC recovers it).",
                &[("worker", worker.to_string()), ("reason", reason.to_owned())],
            )
            };
        Self {
            turns: r.counter(
                "gridcast_worker_loop_turns_total",
                "Turns of the worker's event loop.",
                &w(),
            ),
            last_progress: r.gauge(
                "gridcast_worker_last_progress_timestamp_seconds",
                "When the worker last began a loop turn (Unix time); a stale one means it is stuck.",
                &w(),
            ),
            datagrams_in: r.counter(
                "gridcast_udp_received_datagrams_total",
                "UDP datagrams received.",
                &w(),
            ),
            bytes_in: r.counter(
                "gridcast_udp_received_bytes_total",
                "UDP payload bytes received.",
                &w(),
            ),
            datagrams_out: r.counter(
                "gridcast_udp_sent_datagrams_total",
                "UDP datagrams sent.",
                &w(),
            ),
            bytes_out: r.counter(
                "gridcast_udp_sent_bytes_total",
                "UDP payload bytes sent.",
                &w(),
            ),
            send_errors: [
                send_error("buffer_full"),
                send_error("unreachable"),
                send_error("too_large"),
                send_error("other"),
            ],
            gso_batches: r.counter(
                "gridcast_udp_gso_batches_total",
                "Send calls or submissions made (a GSO batch is one); segments per batch is \
                 gridcast_udp_gso_segments_total over this.",
                &w(),
            ),
            gso_segments: r.counter(
                "gridcast_udp_gso_segments_total",
                "Datagrams in those sends.",
                &w(),
            ),
            gro_batches: r.counter(
                "gridcast_udp_gro_batches_total",
                "Receive completions or calls (a GRO batch is one).",
                &w(),
            ),
            gro_segments: r.counter(
                "gridcast_udp_gro_segments_total",
                "Datagrams in those receives.",
                &w(),
            ),
            gso_disabled: r.gauge(
                "gridcast_udp_gso_disabled",
                "1 once the kernel refused GSO and the worker sends datagrams one by one.",
                &w(),
            ),
            misrouted: r.counter(
                "gridcast_udp_misrouted_datagrams_total",
                "Datagrams that reached a worker other than the one their connection id names.",
                &w(),
            ),
            buffers_exhausted: r.counter(
                "gridcast_uring_buffers_exhausted_total",
                "Times the io_uring receive stopped because every provided buffer was in use.",
                &w(),
            ),
            cq_overflows: r.counter(
                "gridcast_uring_cq_overflows_total",
                "Completions the kernel dropped because the io_uring completion queue was full.",
                &w(),
            ),
            truncated: r.counter(
                "gridcast_uring_truncated_datagrams_total",
                "Datagrams dropped because they did not fit an io_uring receive buffer.",
                &w(),
            ),
        }
    }

    fn fold(&self, p: &PulseReading, now: SystemTime, monotonic_now: std::time::Instant) {
        let s = &p.stats;
        self.turns.absolute(s.turns);
        let age = monotonic_now.saturating_duration_since(p.last_turn);
        let at = now
            .checked_sub(age)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or_default();
        self.last_progress.set(at.as_secs_f64());
        self.datagrams_in.absolute(s.datagrams_in);
        self.bytes_in.absolute(s.bytes_in);
        self.datagrams_out.absolute(s.datagrams_out);
        self.bytes_out.absolute(s.bytes_out);
        let other = s.send_errors.saturating_sub(
            s.send_errors_buffer_full + s.send_errors_unreachable + s.send_errors_too_large,
        );
        for (c, v) in self.send_errors.iter().zip([
            s.send_errors_buffer_full,
            s.send_errors_unreachable,
            s.send_errors_too_large,
            other,
        ]) {
            c.absolute(v);
        }
        self.gso_batches.absolute(s.sends);
        self.gso_segments.absolute(s.datagrams_out);
        self.gro_batches.absolute(s.gro_batches);
        self.gro_segments.absolute(s.datagrams_in);
        self.gso_disabled.set(s.gso_disabled.min(1) as f64);
        self.misrouted.absolute(s.misrouted);
        self.buffers_exhausted.absolute(s.rx_buffers_exhausted);
        self.cq_overflows.absolute(s.cq_overflows);
        self.truncated.absolute(s.rx_truncated);
    }
}

/// Families every node has (folded from the engines' reports, summed over workers).
struct EngineMetrics {
    /// peer, supernode, source, unknown.
    connections: [Gauge; 4],
    /// ok, failed, proof_failed.
    handshakes: [Counter; 3],
    /// limit, draining.
    /// limit, draining, misbehaved.
    refused: [Counter; 3],
    retries: Counter,
    dial_fallbacks: Counter,
    /// asked, sent.
    punches: [Counter; 2],
    /// dropped, answered.
    unrouted: [Counter; 2],
    /// idle_timeout, application, transport_error, reset, other.
    closed: [Counter; 5],
    sent_packets: Counter,
    lost_packets: Counter,
    lost_bytes: Counter,
    congestion_events: Counter,
    rtt: Histogram,
    channels: Gauge,
    subscribers: Gauge,
    substreams: Gauge,
    shards_out: Counter,
    shard_bytes_out: Counter,
    shards_in: Counter,
    shard_bytes_in: Counter,
    duplicates: Counter,
    /// backlog, upload_cap.
    drops: [Counter; 2],
    verify_failures: Counter,
    /// bad_data, protocol_error.
    neighbours_closed: [Counter; 2],
    regenerated: Counter,
    imported: Counter,
    failovers: Counter,
    parent_moves: Counter,
    outages: Counter,
    /// sent, received.
    go_aways: [Counter; 2],
    /// turned_away, unknown_channel.
    subscriptions_refused: [Counter; 2],
    refusals_received: Counter,
    draining: Gauge,
    members: Gauge,
    uplink_queuing: Gauge,
    gossip_dropped: Counter,
    stalled_closed: Counter,
}

impl EngineMetrics {
    fn new(r: &Registry<'_>) -> Self {
        let h = "QUIC connections now, by the role the far end announced (unknown: still \
                 in its handshake).";
        Self {
            connections: ["peer", "supernode", "source", "unknown"]
                .map(|v| r.gauge("gridcast_quic_connections", h, &[("role", v.to_owned())])),
            handshakes: r.counters(
                "gridcast_quic_handshakes_total",
                "QUIC handshakes by result (proof_failed: the node dialled did not prove the id \
                 expected; failed: any other loss before the handshake completed).",
                "result",
                ["ok", "failed", "proof_failed"],
            ),
            refused: r.counters(
                "gridcast_quic_connections_refused_total",
                "Incoming connections refused at the handshake, by reason.",
                "reason",
                ["limit", "draining", "misbehaved"],
            ),
            retries: r.counter(
                "gridcast_quic_retries_total",
                "QUIC Retry packets sent: new connections from addresses not yet validated, \
                 while more handshakes were under way than the threshold allows.",
                &[],
            ),
            dial_fallbacks: r.counter(
                "gridcast_dial_fallbacks_total",
                "Dials of a node known at several addresses that completed at another than the \
                 first tried (that one did not answer within 250 ms: a host name's IPv6 \
                 address on a network whose IPv6 is broken, say).",
                &[],
            ),
            punches: r.counters(
                "gridcast_punches_total",
                "Hole punching through a parent: serving children told to open a path to a \
                 node they were named to (asked), and datagrams sent to open one (sent).",
                "kind",
                ["asked", "sent"],
            ),
            unrouted: r.counters(
                "gridcast_udp_datagrams_unrouted_total",
                "Datagrams for no connection, by outcome (dropped: malformed, unknown \
                 connection, unanswerable; answered: version negotiation or stateless reset).",
                "outcome",
                ["dropped", "answered"],
            ),
            closed: r.counters(
                "gridcast_quic_connections_closed_total",
                "QUIC connections that ended, by reason.",
                "reason",
                [
                    "idle_timeout",
                    "application",
                    "transport_error",
                    "reset",
                    "other",
                ],
            ),
            sent_packets: r.counter(
                "gridcast_quic_sent_packets_total",
                "QUIC packets sent.",
                &[],
            ),
            lost_packets: r.counter(
                "gridcast_quic_lost_packets_total",
                "QUIC packets declared lost.",
                &[],
            ),
            lost_bytes: r.counter(
                "gridcast_quic_lost_bytes_total",
                "Bytes of QUIC packets declared lost.",
                &[],
            ),
            congestion_events: r.counter(
                "gridcast_quic_congestion_events_total",
                "QUIC congestion events (a connection's window cut).",
                &[],
            ),
            rtt: r.histogram(
                "gridcast_quic_rtt_seconds",
                "Smoothed round-trip time of every established connection, one sample per \
                 connection per scrape.",
            ),
            channels: r.gauge("gridcast_channels", "Channels carried now.", &[]),
            subscribers: r.gauge(
                "gridcast_subscribers",
                "Subscriptions served now (a child drawing substreams of a channel).",
                &[],
            ),
            substreams: r.gauge(
                "gridcast_substreams",
                "Substreams served now, over every subscription.",
                &[],
            ),
            shards_out: r.counter(
                "gridcast_sent_shards_total",
                "Shards handed to QUIC for subscribers.",
                &[],
            ),
            shard_bytes_out: r.counter(
                "gridcast_sent_shard_bytes_total",
                "Shard bytes handed to QUIC for subscribers (a peer's upload).",
                &[],
            ),
            shards_in: r.counter(
                "gridcast_received_shards_total",
                "Shards received and stored after verification.",
                &[],
            ),
            shard_bytes_in: r.counter(
                "gridcast_received_shard_bytes_total",
                "Shard bytes received and stored after verification.",
                &[],
            ),
            duplicates: r.counter(
                "gridcast_duplicate_shards_total",
                "Shards received that were already held.",
                &[],
            ),
            drops: r.counters(
                "gridcast_subscriber_drops_total",
                "Sends given up for subscribers: chunk streams reset because a subscriber fell \
                 behind (backlog), or shards not sent because the upload cap was spent \
                 (upload_cap).",
                "reason",
                ["backlog", "upload_cap"],
            ),
            verify_failures: r.counter(
                "gridcast_verify_failures_total",
                "Shards or headers that failed verification (forged or corrupted): never played.",
                &[],
            ),
            neighbours_closed: r.counters(
                "gridcast_misbehaving_closed_total",
                "Connections closed because the neighbour sent bad data or undecodable bytes.",
                "reason",
                ["bad_data", "protocol_error"],
            ),
            regenerated: r.counter(
                "gridcast_regenerated_shards_total",
                "Shards computed by regeneration from K others.",
                &[],
            ),
            imported: r.counter(
                "gridcast_imported_shards_total",
                "Shards taken from sibling workers.",
                &[],
            ),
            failovers: r.counter(
                "gridcast_failovers_total",
                "Parents replaced after loss or lag.",
                &[],
            ),
            parent_moves: r.counter(
                "gridcast_parent_moves_total",
                "Parents whose substreams moved to a standby at most half as far (measured round trips).",
                &[],
            ),
            outages: r.counter(
                "gridcast_upstream_outages_total",
                "Times no parent of a channel delivered (every one lost, unreachable or silent).",
                &[],
            ),
            go_aways: r.counters(
                "gridcast_go_aways_total",
                "Go-aways (move to another parent) sent to subscribers or received from parents.",
                "direction",
                ["sent", "received"],
            ),
            subscriptions_refused: r.counters(
                "gridcast_subscriptions_refused_total",
                "Subscriptions refused, by reason: turned away (subscriber limit, draining) or \
                 for a channel not carried.",
                "reason",
                ["turned_away", "unknown_channel"],
            ),
            refusals_received: r.counter(
                "gridcast_refusals_received_total",
                "Subscriptions that parents refused this node.",
                &[],
            ),
            draining: r.gauge(
                "gridcast_draining",
                "1 while the node drains (sends its subscribers away before it stops).",
                &[],
            ),
            members: r.gauge(
                "gridcast_members",
                "Other supernodes the membership knows to be up.",
                &[],
            ),
            uplink_queuing: r.gauge(
                "gridcast_uplink_queuing_delay_seconds",
                "Queuing delay this node's uplink adds, as its yielding uploads measure it \
                 (upload priority low, LEDBAT: the largest any connection saw in the last 3 s of \
                 its estimates); 0 when its uploads do not yield.",
                &[],
            ),
            gossip_dropped: r.counter(
                "gridcast_gossip_dropped_total",
                "Gossip datagrams dropped (from a peer or an unproven sender, or not sendable).",
                &[],
            ),
            stalled_closed: r.counter(
                "gridcast_stalled_closed_total",
                "Connections closed because they took none of the data waiting for them for the \
                 stall timeout (a subscriber that stopped reading).",
                &[],
            ),
        }
    }

    fn fold(&self, reports: &[&EngineReport]) {
        let sum = |f: &dyn Fn(&EngineReport) -> u64| reports.iter().map(|r| f(r)).sum::<u64>();
        let conns = [
            sum(&|r| r.connections.peer as u64),
            sum(&|r| r.connections.supernode as u64),
            sum(&|r| r.connections.source as u64),
            sum(&|r| r.connections.unknown as u64),
        ];
        for (g, v) in self.connections.iter().zip(conns) {
            g.set(v as f64);
        }
        let failed = sum(&|r| r.stats.handshakes_failed);
        let proof = sum(&|r| r.stats.handshakes_proof_failed);
        for (c, v) in self.handshakes.iter().zip([
            sum(&|r| r.stats.handshakes_ok),
            failed.saturating_sub(proof),
            proof,
        ]) {
            c.absolute(v);
        }
        let refused = sum(&|r| r.stats.connections_refused);
        let draining = sum(&|r| r.stats.connections_refused_draining);
        let misbehaved = sum(&|r| r.stats.connections_refused_misbehaved);
        self.refused[0].absolute(refused.saturating_sub(draining + misbehaved));
        self.refused[1].absolute(draining);
        self.refused[2].absolute(misbehaved);
        self.retries.absolute(sum(&|r| r.stats.retries_sent));
        self.dial_fallbacks
            .absolute(sum(&|r| r.stats.dial_fallbacks));
        self.punches[0].absolute(sum(&|r| r.stats.punches_asked));
        self.punches[1].absolute(sum(&|r| r.stats.punches_sent));
        self.unrouted[0].absolute(sum(&|r| r.stats.datagrams_dropped));
        self.unrouted[1].absolute(sum(&|r| r.stats.datagrams_answered));
        for (c, v) in self.closed.iter().zip([
            sum(&|r| r.stats.closed.idle_timeout),
            sum(&|r| r.stats.closed.application),
            sum(&|r| r.stats.closed.transport_error),
            sum(&|r| r.stats.closed.reset),
            sum(&|r| r.stats.closed.other),
        ]) {
            c.absolute(v);
        }
        self.sent_packets.absolute(sum(&|r| r.quic.sent_packets));
        self.lost_packets.absolute(sum(&|r| r.quic.lost_packets));
        self.lost_bytes.absolute(sum(&|r| r.quic.lost_bytes));
        self.congestion_events
            .absolute(sum(&|r| r.quic.congestion_events));
        for r in reports {
            for rtt in &r.rtts {
                self.rtt.record(rtt.as_secs_f64());
            }
        }
        // A channel is carried by every worker of a relay: count it once.
        let channels = reports.iter().map(|r| r.channels.len()).max().unwrap_or(0);
        self.channels.set(channels as f64);
        self.subscribers
            .set(sum(&|r| r.subscriptions as u64) as f64);
        self.substreams
            .set(sum(&|r| r.substreams_served as u64) as f64);
        self.shards_out.absolute(sum(&|r| r.stats.shards_out));
        self.shard_bytes_out
            .absolute(sum(&|r| r.stats.shard_bytes_out));
        self.shards_in
            .absolute(sum(&|r| r.channel_totals.shards_in));
        self.shard_bytes_in
            .absolute(sum(&|r| r.channel_totals.bytes_in));
        self.duplicates
            .absolute(sum(&|r| r.channel_totals.duplicates));
        self.drops[0].absolute(sum(&|r| r.stats.backlog_drops));
        self.drops[1].absolute(sum(&|r| r.stats.upload_cap_drops));
        self.verify_failures
            .absolute(sum(&|r| r.channel_totals.verify_failures));
        self.neighbours_closed[0].absolute(sum(&|r| r.stats.misbehaving_closed));
        self.neighbours_closed[1].absolute(sum(&|r| r.stats.protocol_errors));
        self.regenerated
            .absolute(sum(&|r| r.channel_totals.regenerated));
        self.imported.absolute(sum(&|r| r.stats.shards_imported));
        self.failovers.absolute(sum(&|r| r.stats.failovers));
        self.parent_moves.absolute(sum(&|r| r.stats.parent_moves));
        self.outages.absolute(sum(&|r| r.stats.upstream_outages));
        self.go_aways[0].absolute(sum(&|r| r.stats.go_aways_sent));
        self.go_aways[1].absolute(sum(&|r| r.stats.go_aways_received));
        self.subscriptions_refused[0].absolute(sum(&|r| r.stats.subscriptions_turned_away));
        self.subscriptions_refused[1].absolute(sum(&|r| r.stats.unknown_channel_refusals));
        self.refusals_received
            .absolute(sum(&|r| r.stats.refusals_received));
        let drains = reports.iter().any(|r| r.draining);
        self.draining.set(if drains { 1.0 } else { 0.0 });
        let members = reports.iter().map(|r| r.members).max().unwrap_or(0);
        self.members.set(members as f64);
        let queuing = reports
            .iter()
            .filter_map(|r| r.uplink_queuing_delay)
            .max()
            .unwrap_or_default();
        self.uplink_queuing.set(queuing.as_secs_f64());
        self.gossip_dropped
            .absolute(sum(&|r| r.stats.gossip_dropped));
        self.stalled_closed
            .absolute(sum(&|r| r.stats.stalled_closed));
    }
}

/// A source's families.
struct SourceMetrics {
    published: Counter,
    ingest: Counter,
    connected: Gauge,
}

/// A player's families.
struct PlayerMetrics {
    /// played, skipped.
    chunks: [Counter; 2],
    startup: Gauge,
    buffer: Gauge,
    parents: Gauge,
}

/// Every family of this node, registered once.
pub struct Metrics {
    recorder: PrometheusRecorder,
    process: metrics_process::Collector,
    workers: Vec<WorkerMetrics>,
    engine: EngineMetrics,
    source: Option<SourceMetrics>,
    player: Option<PlayerMetrics>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// HELP of the one family rendered by hand (see [`Metrics::render`]).
const BUSY_HELP: &str = "Time the worker spent working, outside its wait for input.";

impl Metrics {
    /// Registers every family of a `role` node with `workers` workers on `backend`.
    pub fn new(role: NodeRole, workers: usize, backend: &str) -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("gridcast_quic_rtt_seconds".to_owned()),
                RTT_BUCKETS,
            )
            .map_or_else(
                |_| PrometheusBuilder::new().build_recorder(),
                |b| b.build_recorder(),
            );
        let r = Registry {
            recorder: &recorder,
        };
        r.gauge(
            "gridcast_build_info",
            "Always 1; the labels say which build runs, as what, on which data plane.",
            &[
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("role", role.as_str().to_owned()),
                ("io_backend", backend.to_owned()),
            ],
        )
        .set(1.0);
        r.gauge(
            "gridcast_workers",
            "Data-plane workers (one per core with io_uring).",
            &[],
        )
        .set(workers as f64);
        let workers = (0..workers).map(|w| WorkerMetrics::new(&r, w)).collect();
        let engine = EngineMetrics::new(&r);
        let source = (role == NodeRole::Source).then(|| SourceMetrics {
            published: r.counter(
                "gridcast_source_chunks_published_total",
                "Chunks the source cut, coded, signed and published.",
                &[],
            ),
            ingest: r.counter(
                "gridcast_source_ingest_bytes_total",
                "Bytes read from the input (the encoder).",
                &[],
            ),
            connected: r.gauge(
                "gridcast_source_encoder_connected",
                "1 while an input is connected and delivering (a file being read, an encoder \
                 pushing).",
                &[],
            ),
        });
        let player = (role == NodeRole::Peer).then(|| PlayerMetrics {
            chunks: r.counters(
                "gridcast_player_chunks_total",
                "Chunks played out complete and in order (played), or given up on (skipped): \
                 continuity is played over both.",
                "result",
                ["played", "skipped"],
            ),
            startup: r.gauge(
                "gridcast_player_startup_seconds",
                "Time from the first subscription to the first chunk played.",
                &[],
            ),
            buffer: r.gauge(
                "gridcast_player_buffer_seconds",
                "Stream time buffered ahead of playout.",
                &[],
            ),
            parents: r.gauge(
                "gridcast_player_parents",
                "Parents the player draws substreams from now.",
                &[],
            ),
        });
        let process = metrics_process::Collector::default();
        metrics::with_local_recorder(&recorder, || process.describe());
        Self {
            recorder,
            process,
            workers,
            engine,
            source,
            player,
        }
    }

    /// Folds `snapshot` into the handles and renders the exposition (text format 0.0.4);
    /// `wall` and `mono` are the time of the scrape on both clocks.
    pub fn render(
        &self,
        snapshot: &Snapshot,
        wall: SystemTime,
        mono: std::time::Instant,
    ) -> String {
        for (m, p) in self.workers.iter().zip(&snapshot.pulses) {
            m.fold(p, wall, mono);
        }
        let reports: Vec<&EngineReport> = snapshot.reports.iter().flatten().collect();
        self.engine.fold(&reports);
        if let (Some(m), Some(s)) = (&self.source, &snapshot.source) {
            m.published.absolute(s.chunks_published);
            m.ingest.absolute(s.ingest_bytes);
            m.connected.set(if s.encoder_connected { 1.0 } else { 0.0 });
        }
        if let Some(m) = &self.player {
            let played = reports
                .iter()
                .flat_map(|r| &r.channels)
                .find(|c| c.mode == crate::node::ChannelMode::Play);
            if let Some(c) = played {
                m.chunks[0].absolute(c.stats.chunks_played);
                m.chunks[1].absolute(c.stats.chunks_skipped);
                if let Some(s) = c.stats.startup {
                    m.startup.set(s.as_secs_f64());
                }
                m.buffer
                    .set(c.buffer.unwrap_or(Duration::ZERO).as_secs_f64());
                m.parents.set(c.parents as f64);
            }
        }
        metrics::with_local_recorder(&self.recorder, || self.process.collect());
        let mut out = self.recorder.handle().render();
        precise_cpu_seconds(&mut out);
        // The one family with fractional counter values (the exporter's counters are
        // integers), written by hand in the same format.
        out.push_str(&format!(
            "# HELP gridcast_worker_busy_seconds_total {BUSY_HELP}\n\
             # TYPE gridcast_worker_busy_seconds_total counter\n"
        ));
        for (w, p) in snapshot.pulses.iter().enumerate() {
            out.push_str(&format!(
                "gridcast_worker_busy_seconds_total{{worker=\"{w}\"}} {:.6}\n",
                p.busy.as_secs_f64()
            ));
        }
        out
    }
}

/// metrics-process records `process_cpu_seconds_total` through the facade, whose counters
/// are integers, so it would come out in whole seconds (a relay using a tenth of a core
/// would show 0 for ten seconds at a time, then jump): its sample is rewritten from the
/// process's CPU clock, to the microsecond.
fn precise_cpu_seconds(out: &mut String) {
    let cpu = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let seconds = cpu.tv_sec as f64 + cpu.tv_nsec as f64 / 1e9;
    let sample = "process_cpu_seconds_total ";
    let start = if out.starts_with(sample) {
        Some(0)
    } else {
        out.find(&format!("\n{sample}")).map(|at| at + 1)
    };
    if let Some(start) = start {
        let value = start + sample.len();
        let end = out[value..].find('\n').map_or(out.len(), |e| value + e);
        out.replace_range(value..end, &format!("{seconds:.6}"));
    }
}

#[cfg(test)]
mod cpu_tests {
    #[test]
    fn the_cpu_sample_is_rewritten_with_a_fraction_and_nothing_else_changes() {
        let mut out = "# TYPE process_cpu_seconds_total counter\n\
                       process_cpu_seconds_total 0\n\
                       process_open_fds 18\n"
            .to_owned();
        // Burn a little CPU, so the clock is past zero.
        let mut x = 0u64;
        for i in 0..200_000u64 {
            x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        super::precise_cpu_seconds(&mut out);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "# TYPE process_cpu_seconds_total counter");
        let value: f64 = lines[1]
            .strip_prefix("process_cpu_seconds_total ")
            .unwrap()
            .parse()
            .unwrap();
        assert!(value > 0.0 && lines[1].contains('.'), "{}", lines[1]);
        assert_eq!(lines[2], "process_open_fds 18");
    }
}
