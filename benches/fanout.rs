//! The fan-out benchmark: supernode CPU per byte of payload delivered to M subscribers over
//! loopback, against what else a user could run, measured in the same run.
//!
//! The node under test runs on CPU 0 (pinned); the subscribers, and the thread feeding
//! chunks, on CPU 1. The feed is one channel at a fixed total egress rate (every subscriber
//! gets the whole stream), chunks every 250 ms, shared in-process with the node: only fan-out
//! is measured, not ingest. Configurations:
//!
//! - `uring`: gridcast's io_uring backend, one worker.
//! - `uring_per_chunk`: the same, with one QUIC stream per chunk per subscriber instead of one
//!   per subscription (`ShardStreams`; the `stream_per_subscription_vs_per_chunk` ratio).
//! - `uring_bbr`: the same with BBR in place of the gated CUBIC (`EngineConfig::congestion`,
//!   the default since issue 16's lever 4; the `bbr_vs_cubic` ratio).
//! - `uring_window_0_5ms`: the same with the worker's wait gathering completions for 0.5 ms
//!   instead of the default 3 ms (`UringConfig::batch_window`; the `batch_window_3ms_vs_0_5ms`
//!   ratio).
//! - `uring_slack_0`: the same with every QUIC timer ending the worker's wait on time instead
//!   of up to 1 ms late (`UringConfig::timer_slack`; the `timer_slack_1ms_vs_0` ratio).
//! - `uring_submit_at_end`: the same with each loop turn's sends handed to the kernel only at
//!   the end of the turn (or when every send slot is in flight) instead of every 64 KiB
//!   (`UringConfig::submit_after`; the `submit_every_64k_vs_at_end` ratio).
//! - `uring_2_workers`: the same on 2 workers (pinned to CPUs 0 and 1, the subscribers spread
//!   over them by the steering program; the subscribers' thread runs on either CPU): worker 0
//!   publishes and hands every shard to worker 1 (the `two_workers_vs_one` ratio: CPU of both
//!   workers per byte, the cost of cross-worker fan-out).
//! - `uring_2_workers_one_core`: the same 2 workers both pinned to CPU 0, the subscribers on
//!   CPU 1 as with one worker (the `two_workers_one_core_vs_one` ratio). On this 2-core
//!   machine `uring_2_workers` shares each worker's core with the subscribers, which one
//!   worker never does, so its ratio mixes that sharing with the cost of handing shards
//!   across; here the subscribers and the node keep the cores they have in `uring`, and what
//!   is left is the second worker's own ring, timers and wake-ups and the shards handed to it.
//! - `uring_metrics`: the same with its admin listener scraped every second, as Prometheus
//!   would (the `metrics_on_vs_off` ratio; the workers' pulse is in both).
//! - `portable`: gridcast's quinn-udp backend.
//! - `quinn_tokio`: the relay a Rust developer would write today: quinn on a current-thread
//!   tokio runtime, one uni stream per chunk per subscriber, `write_chunk` of shared `Bytes`,
//!   the same TLS (AES-128-GCM) and flow-control windows as gridcast.
//! - `raw_floor`: no protocol: AES-128-GCM sealing (the suite gridcast nodes agree on) and GSO
//!   `sendmsg` of the same payload to every subscriber, in datagrams as large as gridcast's on
//!   this path (1452 bytes, the bound of its path MTU discovery, which loopback always
//!   reaches) and batches as large as its (45 of them, what fits a 64 KiB GSO send).
//! - `raw_floor_one_socket`: the same with every subscriber's datagrams sent to one receiving
//!   socket (the `floor_one_socket_vs_a_socket_each` ratio). The quinn relay's subscribers
//!   share one endpoint and socket, gridcast's and the floor's have one each, and on loopback
//!   the sender pays for delivery into the receiving socket: this shows what sharing one
//!   saves the sender, so that the quinn row can be read. The baselines are left as they are.
//!
//! Every configuration's subscribers receive with GRO, as real gridcast and quinn peers do. On
//! loopback the receiving socket's work runs on the sending thread, so a receiver without GRO
//! would charge the node for cutting each GSO batch back into datagrams: work a real network
//! card or a remote host does. The gridcast and quinn subscribers' sockets also get the 4 MiB
//! receive buffer a gridcast peer asks for; with the kernel's default they dropped part of
//! every burst, and the relay was measured retransmitting it.
//!
//! CPU is the node threads' on-CPU time (user + system, /proc/self/task/TID/schedstat) over
//! the measured window, divided by payload bytes the subscribers received in it (sent, for the
//! floor). RSS is the whole process (node and subscribers). Every configuration runs
//! `--rounds` times (3; 1 with `--quick`), the rounds interleaved so that a slow spell of the
//! machine hits all of them, each round starting one configuration further on (so that no
//! configuration always runs first), and the run with the median CPU per byte is reported: one
//! `fanout backend=… subscribers=… egress_gbps=… cpu_ns_per_byte=… rss_mb=…` line per
//! configuration, then the ratios (each run is printed too, as `fanout run round=…`).
//! `--quick`: M = 10 and 100, shorter windows. `--only <configuration>[,…]`: those alone (for
//! profiling, or one lever on and off; ratios only where both sides ran). `--subscribers <M>`: that M alone.
//! `--window <secs>`: a longer measured window (4 s; 2 with `--quick`). `--mbps <n>`: total
//! egress other than the 200 Mbit/s the targets are read at (how the cost per byte moves with
//! the node's load; the subscribers' one core caps what can be delivered).

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::disallowed_methods,
    unreachable_pub
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;

use common::clients::Clients;
use common::floor::{DATAGRAM, Sealer, TAG};
use common::sys::{own_rss_kb, pin_to, this_thread_id, thread_cpu_ns};
use gridcast::app::http::HttpServer;
use gridcast::app::ops::{Metrics, NodeRole, Watched, admin};
use gridcast::driver::uring::UringConfig;
use gridcast::driver::{IoBackend, Node};
use gridcast::keys::{ChannelKey, NodeKey};
use gridcast::node::tls;
use gridcast::node::{ChannelMode, Congestion, Engine, EngineConfig, ShardStreams, WorkerTag};
use gridcast::stream::{ChunkFlags, ChunkPublisher, CodingParams};
use gridcast::wire::Role;

/// The allocator the `gridcast` binary runs with (every configuration here shares it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHUNK: Duration = Duration::from_millis(250);

#[derive(Clone, Copy)]
struct Plan {
    subscribers: usize,
    /// Payload bytes per subscriber per chunk.
    chunk_bytes: usize,
    warmup: Duration,
    window: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Measured {
    bytes: u64,
    cpu_ns: u64,
    secs: f64,
    rss_mb: f64,
}

impl Measured {
    fn cpu_ns_per_byte(&self) -> f64 {
        self.cpu_ns as f64 / self.bytes.max(1) as f64
    }
}

fn pin(cpu: usize) {
    pin_to(&[cpu]);
}

fn rss_mb() -> f64 {
    own_rss_kb() / 1024.0
}

fn payload(len: usize, salt: u64) -> Bytes {
    (0..len as u64)
        .map(|i| ((i ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Calls `feed(n)` every chunk interval until `end`, on the calling thread.
fn pace(start: Instant, end: Instant, next: &mut u64, mut feed: impl FnMut(u64)) {
    while Instant::now() < end {
        let due = start + CHUNK * (*next as u32);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait.min(end.saturating_duration_since(Instant::now())));
            continue;
        }
        feed(*next);
        *next += 1;
    }
}

/// Runs the feed through warm-up and window; samples the CPU of threads `tids` and delivered
/// bytes around the window.
fn measure(plan: Plan, tids: &[u32], delivered: &AtomicU64, mut feed: impl FnMut(u64)) -> Measured {
    let cpu = || tids.iter().map(|&t| thread_cpu_ns(t)).sum::<u64>();
    let start = Instant::now();
    let mut next = 0;
    pace(start, start + plan.warmup, &mut next, &mut feed);
    let (c0, b0, t0) = (cpu(), delivered.load(Ordering::Relaxed), Instant::now());
    pace(start, t0 + plan.window, &mut next, &mut feed);
    let (c1, b1, t1) = (cpu(), delivered.load(Ordering::Relaxed), Instant::now());
    Measured {
        bytes: b1 - b0,
        cpu_ns: c1 - c0,
        secs: (t1 - t0).as_secs_f64(),
        rss_mb: rss_mb(),
    }
}

/// A scraper of the node's admin listener, the way Prometheus would use it (every second),
/// while it runs: the HTTP thread and the scraper run on the subscribers' core, so what the
/// node's core pays is the report each scrape asks its worker for.
struct Scraping {
    _http: HttpServer,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<u64>,
}

impl Scraping {
    fn start(node: &Node) -> Self {
        let http = HttpServer::start().unwrap();
        let watched = Watched {
            commander: node.commander(),
            pulses: node.pulses(),
            source: None,
        };
        let metrics = Arc::new(Metrics::new(NodeRole::Relay, node.workers(), "bench"));
        let (addr, _) = admin::start(
            &http,
            "127.0.0.1:0".parse().unwrap(),
            watched,
            metrics,
            None,
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut scrapes = 0;
            while !flag.load(Ordering::Relaxed) {
                if common::http::get(addr, "/metrics").is_some_and(|(s, _)| s == 200) {
                    scrapes += 1;
                }
                thread::sleep(Duration::from_secs(1));
            }
            scrapes
        });
        Self {
            _http: http,
            stop,
            thread,
        }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// One gridcast configuration of the node under test.
#[derive(Clone, Copy)]
struct Setup {
    backend: IoBackend,
    /// Its admin listener scraped every second.
    scraped: bool,
    streams: ShardStreams,
    /// Worker threads (io_uring only); worker `w` is pinned to CPU `w`.
    workers: usize,
    /// Every worker pinned to CPU 0 instead, the subscribers to CPU 1.
    one_core: bool,
    congestion: Congestion,
    /// The io_uring worker's batch window (`UringConfig::batch_window`); `None`: the default.
    batch_window: Option<Duration>,
    /// The io_uring worker's timer slack (`UringConfig::timer_slack`); `None`: the default.
    timer_slack: Option<Duration>,
    /// When the io_uring worker submits a turn's sends (`UringConfig::submit_after`); `None`:
    /// the default.
    submit_after: Option<usize>,
}

impl Setup {
    const URING: Self = Self {
        backend: IoBackend::Uring,
        scraped: false,
        streams: ShardStreams::PerSubscription,
        workers: 1,
        one_core: false,
        congestion: Congestion::GatedCubic,
        batch_window: None,
        timer_slack: None,
        submit_after: None,
    };
}

fn gridcast(plan: Plan, setup: Setup) -> Measured {
    let Setup {
        backend,
        scraped,
        streams,
        workers,
        one_core,
        congestion,
        batch_window,
        timer_slack,
        submit_after,
    } = setup;
    let key = NodeKey::from_seed(&[71; 32]);
    let channel_key = ChannelKey::from_seed(&[72; 32]);
    let channel = channel_key.channel_id();
    let (events, _ev) = mpsc::channel();
    let make = |tag: WorkerTag| {
        Engine::new(
            &key,
            EngineConfig {
                role: Role::Source,
                serve: true,
                worker: Some(tag),
                export_shards: tag.count > 1,
                max_backlog_bytes: 16 << 20,
                shard_streams: streams,
                congestion,
                ..Default::default()
            },
        )
    };
    let addr = "127.0.0.1:0".parse().unwrap();
    let node = if batch_window.is_some() || timer_slack.is_some() || submit_after.is_some() {
        let default = UringConfig::default();
        let config = UringConfig {
            workers,
            batch_window: batch_window.unwrap_or(default.batch_window),
            timer_slack: timer_slack.unwrap_or(default.timer_slack),
            submit_after: submit_after.unwrap_or(default.submit_after),
            ..default
        };
        Node::start_uring(addr, &config, make, &events)
    } else {
        Node::start(backend, addr, workers, make, &events)
    }
    .unwrap();
    // Worker 0 publishes; its siblings get every shard by import, as a relay's do.
    let (tid_tx, tid_rx) = mpsc::channel();
    for w in 0..workers {
        let tid_tx = tid_tx.clone();
        node.command(
            w,
            Box::new(move |e, _| {
                pin(if one_core { 0 } else { w });
                tid_tx.send((w, this_thread_id())).unwrap();
                let mode = if w == 0 {
                    ChannelMode::Source
                } else {
                    ChannelMode::Relay
                };
                e.add_channel(channel, mode);
            }),
        );
    }
    let mut tids: Vec<(usize, u32)> = (0..workers).map(|_| tid_rx.recv().unwrap()).collect();
    tids.sort_unstable();
    let tids: Vec<u32> = tids.into_iter().map(|(_, t)| t).collect();
    let scraping = scraped.then(|| Scraping::start(&node));

    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Clients::new(
        plan.subscribers,
        node.local_addr(),
        key.node_id(),
        channel,
        8,
    );
    let client_thread = {
        let (delivered, stop) = (Arc::clone(&delivered), Arc::clone(&stop));
        thread::spawn(move || {
            // With one worker the subscribers have CPU 1 to themselves; with two they share
            // both CPUs with the workers.
            if workers > 1 && !one_core {
                pin_to(&[0, 1]);
            } else {
                pin(1);
            }
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if !clients.turn() {
                    thread::sleep(Duration::from_micros(200));
                }
                if last.elapsed() >= Duration::from_millis(20) {
                    last = Instant::now();
                    let total: u64 = clients
                        .clients
                        .iter()
                        .filter_map(|c| c.engine.channel(&channel))
                        .map(|ch| ch.stats().bytes_in)
                        .sum();
                    delivered.store(total, Ordering::Relaxed);
                }
            }
            clients
        })
    };

    let mut publisher = ChunkPublisher::new(channel_key, CodingParams::DEFAULT);
    let body = payload(plan.chunk_bytes, 1);
    let m = measure(plan, &tids, &delivered, |seq| {
        let coded = publisher
            .publish(seq, seq * 250_000, ChunkFlags::RANDOM_ACCESS, &body)
            .unwrap();
        node.command(
            0,
            Box::new(move |e, now| e.publish(now, channel, &coded).unwrap()),
        );
    });
    // The node's side of its connections, read on its own worker: what the subscribers'
    // pace looks like from the node (smoothed RTT, congestion window), and whether anything
    // was lost. On loopback a round trip is the subscribers' thread's lag; past a few ms it
    // limits how much the node sends per round trip, not the node's own cost.
    let (stats_tx, stats_rx) = mpsc::channel();
    node.command(
        0,
        Box::new(move |e, _| {
            let _ = stats_tx.send(e.quic_stats().collect::<Vec<_>>());
        }),
    );
    if let Ok(stats) = stats_rx.recv_timeout(Duration::from_secs(5)) {
        let n = stats.len().max(1) as f64;
        let sum =
            |f: &dyn Fn(&quinn_proto::ConnectionStats) -> f64| stats.iter().map(f).sum::<f64>();
        println!(
            "fanout detail backend={backend:?} subscribers={} node_paths: rtt_ms={:.1} cwnd_kb={:.0} sent_packets={:.0} lost_packets={:.0} congestion_events={:.0}",
            plan.subscribers,
            sum(&|s| s.path.rtt.as_secs_f64() * 1e3) / n,
            sum(&|s| s.path.cwnd as f64) / n / 1e3,
            sum(&|s| s.path.sent_packets as f64),
            sum(&|s| s.path.lost_packets as f64),
            sum(&|s| s.path.congestion_events as f64),
        );
    }
    if let Some(s) = scraping {
        let scrapes = s.stop();
        assert!(scrapes > 0, "the admin listener answered no scrape");
        // What one scrape costs the node's core, measured on the worker itself: the engine
        // report it builds (the only part of metrics export on a data-plane core; the
        // engine counts into plain structs either way). The on/off CPU ratio above is
        // within this machine's run-to-run noise; this share is not.
        const REPORTS: u64 = 50;
        let (cost_tx, cost_rx) = mpsc::channel();
        node.command(
            0,
            Box::new(move |e, now| {
                // The thread's CPU clock (schedstat only moves at scheduler events).
                let clock = || {
                    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
                    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
                };
                let before = clock();
                for _ in 0..REPORTS {
                    std::hint::black_box(e.report(now));
                }
                let _ = cost_tx.send((clock() - before) / REPORTS);
            }),
        );
        if let Ok(report_ns) = cost_rx.recv_timeout(Duration::from_secs(10)) {
            let worker_ns_per_s = m.cpu_ns as f64 / m.secs.max(1e-9);
            println!(
                "fanout metrics subscribers={} report_us={:.1} worker_share_at_1_scrape_per_s={:.3}% at_15s={:.4}% (target < 1%)",
                plan.subscribers,
                report_ns as f64 / 1e3,
                100.0 * report_ns as f64 / worker_ns_per_s,
                100.0 * report_ns as f64 / 15.0 / worker_ns_per_s,
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let clients = client_thread.join().unwrap();
    let total = delivered.load(Ordering::Relaxed).max(1) as f64 / f64::from(1 << 20);
    // What the subscribers sent back: ACK frames and keep-alive PINGs.
    let (mut acks, mut pings) = (0, 0);
    for s in clients.clients.iter().flat_map(|c| c.engine.quic_stats()) {
        acks += s.frame_tx.acks;
        pings += s.frame_tx.ping;
    }
    println!(
        "fanout detail backend={backend:?} subscribers={} per_mib: subscriber_acks={:.0} subscriber_pings={:.0}",
        plan.subscribers,
        acks as f64 / total,
        pings as f64 / total,
    );
    for (_, s) in node.stop().unwrap() {
        println!(
            "fanout detail backend={backend:?} subscribers={} per_mib: datagrams_out={:.0} sends={:.1} datagrams_in={:.0} turns={:.1} send_errors={} gso_disabled={}",
            plan.subscribers,
            s.datagrams_out as f64 / total,
            s.sends as f64 / total,
            s.datagrams_in as f64 / total,
            s.turns as f64 / total,
            s.send_errors,
            s.gso_disabled,
        );
    }
    m
}

fn transport() -> Arc<quinn::TransportConfig> {
    let defaults = EngineConfig::default();
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(4096u32.into())
        .stream_receive_window(defaults.stream_window.into())
        .receive_window(defaults.connection_window.into())
        .send_window(defaults.send_window)
        .keep_alive_interval(Some(defaults.keep_alive));
    Arc::new(t)
}

fn quinn_tokio(plan: Plan) -> Measured {
    let key = NodeKey::from_seed(&[73; 32]);
    let node_id = key.node_id();
    let (chunks, _) = tokio::sync::broadcast::channel::<Bytes>(16);
    let (ready_tx, ready_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let subscribers = plan.subscribers;
    let server = {
        let chunks = chunks.clone();
        let stop = Arc::clone(&stop);
        let delivered = Arc::clone(&delivered);
        thread::spawn(move || {
            pin(0);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut config = quinn::ServerConfig::with_crypto(
                    tls::server_crypto(&tls::Identity::new(&key).unwrap()).unwrap(),
                );
                config.transport_config(transport());
                // The same 4 MiB socket buffers as gridcast's drivers: with the kernel's
                // default, a thousand subscribers' ACKs overflow it and the relay falls short
                // of the load, which would be measured as a different workload.
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                let sock = socket2::SockRef::from(&socket);
                sock.set_recv_buffer_size(4 << 20).unwrap();
                sock.set_send_buffer_size(4 << 20).unwrap();
                let endpoint = quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(config),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .unwrap();
                ready_tx
                    .send((endpoint.local_addr().unwrap(), this_thread_id()))
                    .unwrap();
                // Closing the endpoint ends the accept loop.
                let closer = endpoint.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    closer.close(0u32.into(), b"done");
                });
                let served = Arc::new(std::sync::Mutex::new(Vec::new()));
                while let Some(incoming) = endpoint.accept().await {
                    let mut rx = chunks.subscribe();
                    let served = Arc::clone(&served);
                    tokio::spawn(async move {
                        let Ok(conn) = incoming.await else { return };
                        served.lock().unwrap().push(conn.clone());
                        loop {
                            match rx.recv().await {
                                Ok(chunk) => {
                                    let Ok(mut s) = conn.open_uni().await else {
                                        return;
                                    };
                                    if s.write_chunk(chunk).await.is_err() {
                                        return;
                                    }
                                    let _ = s.finish();
                                }
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
                // The relay's side of its connections, as the gridcast node's `node_paths`
                // line: its sends per MiB are what pacing made of each subscriber's share.
                let total = delivered.load(Ordering::Relaxed).max(1) as f64 / f64::from(1 << 20);
                let stats: Vec<_> = served.lock().unwrap().iter().map(|c| c.stats()).collect();
                let n = stats.len().max(1) as f64;
                let sum = |f: &dyn Fn(&quinn::ConnectionStats) -> f64| stats.iter().map(f).sum::<f64>();
                println!(
                    "fanout detail backend=quinn_tokio subscribers={subscribers} node_paths: rtt_ms={:.1} cwnd_kb={:.0} per_mib: datagrams_out={:.0} sends={:.1}",
                    sum(&|s| s.path.rtt.as_secs_f64() * 1e3) / n,
                    sum(&|s| s.path.cwnd as f64) / n / 1e3,
                    sum(&|s| s.udp_tx.datagrams as f64) / total,
                    sum(&|s| s.udp_tx.ios as f64) / total,
                );
                endpoint.close(0u32.into(), b"done");
            });
        })
    };
    let (addr, tid) = ready_rx.recv().unwrap();

    let client = {
        let (delivered, stop) = (Arc::clone(&delivered), Arc::clone(&stop));
        thread::spawn(move || {
            pin(1);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // The subscribers' socket gets the receive buffer gridcast's peers have.
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                socket2::SockRef::from(&socket)
                    .set_recv_buffer_size(4 << 20)
                    .unwrap();
                let mut endpoint = quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .unwrap();
                // The subscribers present a certificate, as gridcast's do.
                let me = tls::Identity::new(&NodeKey::generate().unwrap()).unwrap();
                let mut config =
                    quinn::ClientConfig::new(tls::client_crypto(node_id, &me).unwrap());
                config.transport_config(transport());
                endpoint.set_default_client_config(config);
                let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
                for _ in 0..subscribers {
                    let connecting = endpoint.connect(addr, tls::SERVER_NAME).unwrap();
                    let delivered = Arc::clone(&delivered);
                    let conns = Arc::clone(&conns);
                    tokio::spawn(async move {
                        let Ok(conn) = connecting.await else { return };
                        conns.lock().unwrap().push(conn.clone());
                        while let Ok(mut s) = conn.accept_uni().await {
                            let delivered = Arc::clone(&delivered);
                            tokio::spawn(async move {
                                while let Ok(Some(c)) = s.read_chunk(usize::MAX, true).await {
                                    delivered.fetch_add(c.bytes.len() as u64, Ordering::Relaxed);
                                }
                            });
                        }
                    });
                }
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // The server's datagrams, seen from its subscribers' side.
                let total = delivered.load(Ordering::Relaxed).max(1) as f64 / f64::from(1 << 20);
                let (mut out, mut sends, mut inn) = (0, 0, 0);
                for c in conns.lock().unwrap().iter() {
                    let s = c.stats();
                    out += s.udp_rx.datagrams;
                    sends += s.udp_rx.ios;
                    inn += s.udp_tx.datagrams;
                }
                println!(
                    "fanout detail backend=quinn_tokio subscribers={subscribers} per_mib: datagrams_out={:.0} client_recv_ios={:.1} datagrams_in={:.0}",
                    out as f64 / total,
                    sends as f64 / total,
                    inn as f64 / total,
                );
                endpoint.close(0u32.into(), b"done");
            });
        })
    };

    let body = payload(plan.chunk_bytes, 2);
    let m = measure(plan, &[tid], &delivered, |_| {
        let _ = chunks.send(body.clone());
    });
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    server.join().unwrap();
    m
}

/// `shared`: every subscriber's datagrams go to one receiving socket, as the quinn relay's
/// subscribers share one endpoint; otherwise one socket each, as gridcast's.
fn raw_floor(plan: Plan, shared: bool) -> Measured {
    const BATCH: usize = 45;
    let sockets = if shared { 1 } else { plan.subscribers };
    let receivers: Vec<UdpSocket> = (0..sockets)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            // GRO on, like every other configuration's receivers (quinn-udp sets it).
            quinn_udp::UdpSocketState::new((&s).into()).unwrap();
            s
        })
        .collect();
    let targets: Vec<SocketAddr> = receivers
        .iter()
        .map(|s| s.local_addr().unwrap())
        .cycle()
        .take(plan.subscribers)
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let drain = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            pin(1);
            let mut buf = vec![0u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                let mut any = false;
                for r in &receivers {
                    while r.recv(&mut buf).is_ok() {
                        any = true;
                    }
                }
                if !any {
                    thread::sleep(Duration::from_micros(200));
                }
            }
        })
    };
    let delivered = Arc::new(AtomicU64::new(0));
    let (chunk_tx, chunk_rx) = mpsc::channel::<Bytes>();
    let (tid_tx, tid_rx) = mpsc::channel();
    let sender = {
        let delivered = Arc::clone(&delivered);
        thread::spawn(move || {
            pin(0);
            tid_tx.send(this_thread_id()).unwrap();
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let state = quinn_udp::UdpSocketState::new((&socket).into()).unwrap();
            let mut sealer = Sealer::new();
            let mut out = Vec::with_capacity(BATCH * (DATAGRAM + TAG));
            while let Ok(chunk) = chunk_rx.recv() {
                for &to in &targets {
                    for batch in chunk.chunks(DATAGRAM * BATCH) {
                        out.clear();
                        for piece in batch.chunks(DATAGRAM) {
                            sealer.seal_onto(&mut out, piece);
                        }
                        let transmit = quinn_udp::Transmit {
                            destination: to,
                            ecn: None,
                            contents: &out,
                            segment_size: Some(DATAGRAM + TAG),
                            src_ip: None,
                        };
                        // Retry while the socket buffer is full; count what went out.
                        for _ in 0..1000 {
                            if state.try_send((&socket).into(), &transmit).is_ok() {
                                delivered.fetch_add(batch.len() as u64, Ordering::Relaxed);
                                break;
                            }
                            thread::yield_now();
                        }
                    }
                }
            }
        })
    };
    let tid = tid_rx.recv().unwrap();
    let body = payload(plan.chunk_bytes, 3);
    let m = measure(plan, &[tid], &delivered, |_| {
        let _ = chunk_tx.send(body.clone());
    });
    drop(chunk_tx);
    sender.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    drain.join().unwrap();
    m
}

fn print(what: &str, name: &str, plan: Plan, m: &Measured) {
    println!(
        "{what} backend={name} subscribers={} egress_gbps={:.3} cpu_ns_per_byte={:.3} rss_mb={:.0}",
        plan.subscribers,
        m.bytes as f64 * 8.0 / m.secs / 1e9,
        m.cpu_ns_per_byte(),
        m.rss_mb
    );
}

fn run(name: &str, plan: Plan) -> Measured {
    match name {
        "uring" => gridcast(plan, Setup::URING),
        "uring_per_chunk" => gridcast(
            plan,
            Setup {
                streams: ShardStreams::PerChunk,
                ..Setup::URING
            },
        ),
        "uring_metrics" => gridcast(
            plan,
            Setup {
                scraped: true,
                ..Setup::URING
            },
        ),
        "uring_bbr" => gridcast(
            plan,
            Setup {
                congestion: Congestion::Bbr,
                ..Setup::URING
            },
        ),
        "uring_window_0_5ms" => gridcast(
            plan,
            Setup {
                batch_window: Some(Duration::from_micros(500)),
                ..Setup::URING
            },
        ),
        "uring_slack_0" => gridcast(
            plan,
            Setup {
                timer_slack: Some(Duration::ZERO),
                ..Setup::URING
            },
        ),
        "uring_submit_at_end" => gridcast(
            plan,
            Setup {
                submit_after: Some(usize::MAX),
                ..Setup::URING
            },
        ),
        "uring_2_workers" => gridcast(
            plan,
            Setup {
                workers: 2,
                ..Setup::URING
            },
        ),
        "uring_2_workers_one_core" => gridcast(
            plan,
            Setup {
                workers: 2,
                one_core: true,
                ..Setup::URING
            },
        ),
        "portable" => gridcast(
            plan,
            Setup {
                backend: IoBackend::Portable,
                ..Setup::URING
            },
        ),
        "quinn_tokio" => quinn_tokio(plan),
        "raw_floor" => raw_floor(plan, false),
        "raw_floor_one_socket" => raw_floor(plan, true),
        other => panic!("--only: no configuration named {other:?}"),
    }
}

/// The run with the median CPU per byte.
fn median(runs: &mut [Measured]) -> Measured {
    runs.sort_by(|a, b| a.cpu_ns_per_byte().total_cmp(&b.cpu_ns_per_byte()));
    runs[runs.len() / 2]
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let at = args.iter().position(|a| a == name)?;
    let value = args.get(at + 1)?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: cannot read {value:?}")),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only <configuration>` runs one (for profiling); the ratios need all four.
    let only: Option<String> = arg(&args, "--only");
    // `--subscribers <M>`: that size alone.
    let one: Option<usize> = arg(&args, "--subscribers");
    // `--window <secs>`: a longer measured window (for profiling: more samples past the
    // handshakes and warm-up).
    let window: Option<u64> = arg(&args, "--window");
    // Every configuration runs this many times, interleaved, and the median run is reported:
    // single runs on this shared machine vary by 10-15%.
    let rounds: usize = arg(&args, "--rounds").unwrap_or(if quick { 1 } else { 3 });
    let sizes: &[usize] = match &one {
        Some(m) => std::slice::from_ref(m),
        None if quick => &[10, 100],
        None => &[10, 100, 1000],
    };
    // Total egress the subscribers' core keeps up with: 200 Mbit/s. `--mbps <n>` sets another
    // (to see how the cost per byte moves with the node's load; the targets are read at 200,
    // and a rate the subscribers' core cannot take shows as egress short of it).
    let total_bps = arg::<f64>(&args, "--mbps").unwrap_or(200.0) * 1e6;
    pin(1);
    let uring = gridcast::driver::uring_available().is_ok();
    if !uring {
        println!("fanout: io_uring unavailable here; the uring rows are skipped");
    }
    let configurations: Vec<&str> = match only.as_deref() {
        Some(names) => names.split(',').collect(),
        None => [
            "uring",
            "uring_per_chunk",
            "uring_metrics",
            "uring_bbr",
            "uring_window_0_5ms",
            "uring_slack_0",
            "uring_submit_at_end",
            "uring_2_workers",
            "uring_2_workers_one_core",
            "portable",
            "quinn_tokio",
            "raw_floor",
            "raw_floor_one_socket",
        ]
        .into_iter()
        .filter(|&c| uring || !c.starts_with("uring"))
        .collect(),
    };
    for &subscribers in sizes {
        let per_chunk = (total_bps / 8.0 * CHUNK.as_secs_f64() / subscribers as f64) as usize;
        let plan = Plan {
            subscribers,
            chunk_bytes: per_chunk,
            warmup: Duration::from_millis(if quick { 1500 } else { 2500 }),
            window: Duration::from_secs(window.unwrap_or(if quick { 2 } else { 4 })),
        };
        let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); configurations.len()];
        for round in 0..rounds.max(1) {
            // Each round starts one configuration further on, so that none always runs
            // first (or right after the same one) and a position in the round cannot favour it.
            let n = configurations.len();
            for i in (0..n).map(|i| (i + round) % n) {
                let (name, runs) = (&configurations[i], &mut runs[i]);
                let m = run(name, plan);
                if rounds > 1 {
                    print(&format!("fanout run round={round}"), name, plan, &m);
                }
                runs.push(m);
            }
        }
        let medians: Vec<(&str, Measured)> = configurations
            .iter()
            .zip(&mut runs)
            .map(|(&name, runs)| (name, median(runs)))
            .collect();
        for (name, m) in &medians {
            print("fanout", name, plan, m);
        }
        let get = |name: &str| medians.iter().find(|(n, _)| *n == name).map(|(_, m)| m);
        let r = |a: &Measured, b: &Measured| a.cpu_ns_per_byte() / b.cpu_ns_per_byte();
        if let (Some(u), Some(p), Some(q), Some(f)) = (
            get("uring"),
            get("portable"),
            get("quinn_tokio"),
            get("raw_floor"),
        ) {
            println!(
                "fanout ratio subscribers={subscribers} uring_vs_quinn_tokio={:.2} (target <= 0.75) uring_vs_raw_floor={:.2} (target <= {}) uring_vs_portable={:.2} (target <= 1)",
                r(u, q),
                r(u, f),
                if subscribers >= 1000 { "3" } else { "2.5" },
                r(u, p)
            );
        }
        if let (Some(u), Some(c)) = (get("uring"), get("uring_per_chunk")) {
            println!(
                "fanout ratio subscribers={subscribers} stream_per_subscription_vs_per_chunk={:.3}",
                r(u, c)
            );
        }
        if let (Some(u), Some(b)) = (get("uring"), get("uring_bbr")) {
            println!(
                "fanout ratio subscribers={subscribers} bbr_vs_cubic={:.3}",
                r(b, u)
            );
        }
        if let (Some(u), Some(w)) = (get("uring"), get("uring_2_workers")) {
            println!(
                "fanout ratio subscribers={subscribers} two_workers_vs_one={:.3} (target < 1.10: the cost of cross-worker fan-out per byte)",
                r(w, u)
            );
        }
        if let (Some(u), Some(w)) = (get("uring"), get("uring_2_workers_one_core")) {
            println!(
                "fanout ratio subscribers={subscribers} two_workers_one_core_vs_one={:.3} (target < 1.10: cross-worker fan-out with each side on the core it has with one worker)",
                r(w, u)
            );
        }
        if let (Some(u), Some(w)) = (get("uring"), get("uring_window_0_5ms")) {
            println!(
                "fanout ratio subscribers={subscribers} batch_window_3ms_vs_0_5ms={:.3}",
                r(u, w)
            );
        }
        if let (Some(f), Some(o)) = (get("raw_floor"), get("raw_floor_one_socket")) {
            println!(
                "fanout ratio subscribers={subscribers} floor_one_socket_vs_a_socket_each={:.3} (on loopback the sender pays the receiving sockets' work; the quinn relay's subscribers share one socket, gridcast's and the floor's have one each)",
                r(o, f)
            );
        }
        if let (Some(u), Some(s)) = (get("uring"), get("uring_slack_0")) {
            println!(
                "fanout ratio subscribers={subscribers} timer_slack_1ms_vs_0={:.3}",
                r(u, s)
            );
        }
        if let (Some(u), Some(e)) = (get("uring"), get("uring_submit_at_end")) {
            println!(
                "fanout ratio subscribers={subscribers} submit_every_64k_vs_at_end={:.3}",
                r(u, e)
            );
        }
        if let (Some(u), Some(m)) = (get("uring"), get("uring_metrics")) {
            println!(
                "fanout ratio subscribers={subscribers} metrics_on_vs_off={:.3} (target < 1.01)",
                r(m, u)
            );
        }
        if let (Some(p), Some(q), Some(f)) = (get("portable"), get("quinn_tokio"), get("raw_floor"))
        {
            println!(
                "fanout ratio subscribers={subscribers} portable_vs_quinn_tokio={:.2} portable_vs_raw_floor={:.2}",
                r(p, q),
                r(p, f)
            );
        }
    }
}
