//! Real processes on separate hosts of the resilience bed (`common::bed`: a network namespace
//! per host, each plugged into one switch that delays, jitters and drops its traffic). Host 0 runs
//! `gridcast broadcast` fed a live ffmpeg stream, hosts 1-3 a `relay` each, hosts 4-6 a `play`
//! each drawing from all three relays, each player's uplink limited to 10 Mbit/s. In the peer
//! scenarios the players on hosts 5 and 6 are given only the link of the player on host 4
//! (which has a node key and a fixed address for it), learn its parents from it, and draw
//! from it as well: its uplink is then lost, or it is capped with `--upload` below what they
//! ask of it; the test reads every player's metrics from its admin listener inside its host.
//! Every scenario breaks the network, the relays or a relaying player the
//! way a user's network would, and then holds every player's file to the rule the loopback
//! tests hold it to: a byte-exact run of the encoder's bytes from where it joined to the very
//! end, that `ffmpeg -v error` decodes without a word. Each prints what every player saw:
//! `bed scenario=… player=… startup_ms=… end_behind_input_ms=… played_bytes=… share=…`
//! (end_behind_input_ms: from the end of the encoder's output to the player's file's last
//! growth: how far behind live the player was at the end).
//!
//! `GRIDCAST_BED_LOG=info` (or debug) sets the processes' log level (warn otherwise).
//!
//! Needs root, iproute2 and ffmpeg; skipped (with a message) without them unless
//! `GRIDCAST_REQUIRE_NETNS=1` and `GRIDCAST_REQUIRE_FFMPEG=1` (CI) make that a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use common::bed::{Bed, PORT, Relay, Shape, start_relay};
use common::http::sample;
use common::procs::*;

const SOURCE: usize = 0;
const RELAYS: [usize; 3] = [1, 2, 3];
const PLAYERS: [usize; 3] = [4, 5, 6];
/// How long the source serves its last chunks after its input ends.
const LINGER: Duration = Duration::from_secs(6);

/// Half of a path's 40 ms ± 10 ms and 2% loss on each end of it.
const LOSSY: Shape = Shape {
    delay_ms: 20,
    jitter_ms: 5,
    loss_pct: 1.0,
    rate_kbit: None,
    max_frame: None,
};

/// Half of a path's 40 ms ± 10 ms on each end of it, without loss.
const DELAYED: Shape = Shape {
    loss_pct: 0.0,
    ..LOSSY
};

/// What goes wrong, and when (seconds into the stream).
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Nothing: the lossy, delayed network alone.
    None,
    /// Relay host 1's link cut at the given second, for the rest of the stream.
    Cut(u64),
    /// Each relay in turn SIGKILLed and started again on the same address and key, from the
    /// given second, one every `gap` seconds (never two down at once).
    KillEach { from: u64, gap: u64 },
    /// A rolling restart: each relay in turn sent SIGTERM, waited for, started again.
    RollEach { from: u64, gap: u64 },
    /// Players on [`CHILDREN`] are given only the player on [`RELAYING`] (its link, as a
    /// friend's shared link would name it), which draws from the relays; from the given
    /// second its uplink loses every frame (its downlink still works).
    PeerUplinkLost(u64),
    /// As for [`Fault::PeerUplinkLost`], but the relaying player runs with `--upload` at
    /// this many bits per second, below what its children ask of it, and keeps its uplink.
    PeerCapped(u64),
    /// Every player's downlink limited to this many kbit/s behind the switch's 100-ms queue,
    /// from the start: a thin access link that every parent's packets cross, which the
    /// parents' chunk bursts overflow together. How often each player replaced a parent is
    /// printed.
    ThinDownlink(u32),
}

impl Fault {
    /// Whether players on [`CHILDREN`] draw from the player on [`RELAYING`].
    fn peer_tier(self) -> bool {
        matches!(self, Self::PeerUplinkLost(_) | Self::PeerCapped(_))
    }
}

/// The player that relays to the others in the peer scenarios.
const RELAYING: usize = 4;
/// The players that know only [`RELAYING`] in the peer scenarios.
const CHILDREN: [usize; 2] = [5, 6];
/// Each player's uplink rate limit (kbit/s): a home connection's, far above the stream's.
const PEER_UPLINK_KBIT: u32 = 10_000;
/// The port of every player's admin listener, each on its own host.
const ADMIN_PORT: u16 = 9100;
/// A player's shard bytes sent to its children.
const RELAYED: &str = "gridcast_sent_shard_bytes_total";

/// What a watcher saw of a player's file.
struct Seen {
    /// From the player's start to its first byte.
    first_byte: Option<Duration>,
    /// When the file last grew.
    last_growth: Option<Instant>,
}

/// Watches `out` every 20 ms until `stop`: when it first held a byte (from `since`) and when
/// it last grew.
fn watch(out: PathBuf, since: Instant, stop: Arc<AtomicBool>) -> thread::JoinHandle<Seen> {
    thread::spawn(move || {
        let mut seen = Seen {
            first_byte: None,
            last_growth: None,
        };
        let mut size = 0;
        // Bounded: a scenario is over well within 5 minutes.
        while !stop.load(Ordering::Relaxed) && since.elapsed() < Duration::from_secs(300) {
            let now = std::fs::metadata(&out).map_or(0, |m| m.len());
            if now > size {
                size = now;
                seen.last_growth = Some(Instant::now());
                seen.first_byte.get_or_insert(since.elapsed());
            }
            thread::sleep(Duration::from_millis(20));
        }
        seen
    })
}

/// Taken shared by every scenario, and alone by the peer scenarios. Their premise is a
/// relaying player that its children still draw from when the fault comes, and a player a hop
/// further from the source that the CPU serves late (another bed running beside it on a
/// two-core machine) falls behind the relays, and its children move off it before it: once
/// in CI at 3f2016f they left it within 4 s and had not come back 12 s later.
static ALONE: RwLock<()> = RwLock::new(());

/// Runs one scenario; returns how long after the input's end each player's file last grew,
/// in ms (below zero: before it), or nothing when the bed cannot run here.
fn scenario(name: &str, secs: u64, shape: Shape, fault: Fault) -> Vec<Option<i128>> {
    if !Bed::can_run() || !have_ffmpeg() {
        return Vec::new();
    }
    // A scenario that panicked poisons the lock; the others still run.
    let (_shared, _alone) = if fault.peer_tier() {
        (
            None,
            Some(ALONE.write().unwrap_or_else(PoisonError::into_inner)),
        )
    } else {
        (
            Some(ALONE.read().unwrap_or_else(PoisonError::into_inner)),
            None,
        )
    };
    let mut bed = Bed::new(7, shape, shape);
    for h in PLAYERS {
        let up = Shape {
            rate_kbit: Some(PEER_UPLINK_KBIT),
            ..shape
        };
        let down = match fault {
            Fault::ThinDownlink(kbit) => Shape {
                rate_kbit: Some(kbit),
                ..shape
            },
            _ => shape,
        };
        bed.reshape(h, up, down);
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let key = keygen(dir);
    let live = Live::start(
        bed.gridcast(
            SOURCE,
            &[
                "broadcast",
                "--key",
                key.to_str().unwrap(),
                "--listen",
                &format!("{}:{PORT}", bed.addr(SOURCE)),
                "--linger",
                &LINGER.as_secs().to_string(),
            ],
        ),
        secs,
    );
    let started = Instant::now();
    let relay_keys: Vec<PathBuf> = RELAYS
        .iter()
        .map(|h| dir.join(format!("relay{h}.key")))
        .collect();
    let mut relays: Vec<Relay> = RELAYS
        .iter()
        .zip(&relay_keys)
        .map(|(&h, k)| start_relay(&bed, h, &live.link, k))
        .collect();
    let channel = live.link.split_once('@').unwrap().0.to_owned();
    let play_link = format!(
        "{channel}@{}",
        relays
            .iter()
            .map(|r| nodes_of(&r.link))
            .collect::<Vec<_>>()
            .join(",")
    );
    thread::sleep(Duration::from_secs(1));
    let outputs: Vec<PathBuf> = PLAYERS
        .iter()
        .map(|h| dir.join(format!("player{h}.ts")))
        .collect();
    let mut watchers = Vec::new();
    let watched = Arc::new(AtomicBool::new(false));
    let mut players = Vec::new();
    // In the peer scenarios the relaying player has a node key, so its link is known
    // before it starts.
    let peer_key = gridcast::keys::NodeKey::generate().unwrap();
    let peer_key_file = dir.join("peer.key");
    peer_key.save(&peer_key_file, false).unwrap();
    let peer_link = format!(
        "{channel}@{}:{PORT}/{}",
        bed.addr(RELAYING),
        peer_key.node_id()
    );
    for (&h, out) in PLAYERS.iter().zip(&outputs) {
        let admin = format!("{}:{ADMIN_PORT}", bed.addr(h));
        let mut args = vec![
            "play".to_owned(),
            play_link.clone(),
            "--output".into(),
            out.to_str().unwrap().into(),
            "--connect-timeout".into(),
            "20".into(),
            "--admin".into(),
            admin,
        ];
        if fault.peer_tier() && h == RELAYING {
            args.extend([
                "--node-key".into(),
                peer_key_file.to_str().unwrap().into(),
                "--listen".into(),
                format!("{}:{PORT}", bed.addr(h)),
            ]);
            if let Fault::PeerCapped(bps) = fault {
                args.extend(["--upload".into(), bps.to_string()]);
            }
        }
        if fault.peer_tier() && CHILDREN.contains(&h) {
            // The relaying player has had its parents for a moment when they ask it.
            if h == CHILDREN[0] {
                thread::sleep(Duration::from_secs(2));
            }
            args[1].clone_from(&peer_link);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let asked = Instant::now();
        let child = bed.gridcast(h, &args).spawn().unwrap();
        players.push(bed.keep(child));
        watchers.push(watch(out.clone(), asked, Arc::clone(&watched)));
    }
    // A player's metric, from its admin listener inside its host.
    let metric = |h: usize, series: &str| {
        let admin = format!("{}:{ADMIN_PORT}", bed.addr(h)).parse().unwrap();
        let (_, body) = bed
            .get(h, admin, "/metrics")
            .unwrap_or_else(|| panic!("player host {h} does not answer /metrics"));
        sample(&body, series)
    };
    let at = |s: u64| {
        let due = started + Duration::from_secs(s);
        thread::sleep(due.saturating_duration_since(Instant::now()));
    };
    match fault {
        Fault::None => {}
        Fault::Cut(s) => {
            at(s);
            println!("bed scenario={name}: relay host {} cut", RELAYS[0]);
            bed.cut(RELAYS[0]);
        }
        Fault::KillEach { from, gap } | Fault::RollEach { from, gap } => {
            for i in 0..relays.len() {
                at(from + gap * i as u64);
                let r = &mut relays[i];
                if let Fault::KillEach { .. } = fault {
                    r.child.kill().unwrap();
                } else {
                    signal(&r.child, "-TERM");
                }
                let status = r.child.wait().unwrap();
                println!(
                    "bed scenario={name}: relay host {} stopped ({status}) at {:.1} s",
                    RELAYS[i],
                    started.elapsed().as_secs_f64()
                );
                if let Fault::RollEach { .. } = fault {
                    assert!(status.success(), "the drained relay failed: {status}");
                }
                // A moment down, then back on the same address with the same node id.
                thread::sleep(Duration::from_secs(1));
                let again = start_relay(&bed, RELAYS[i], &live.link, &relay_keys[i]);
                assert_eq!(
                    nodes_of(&again.link),
                    nodes_of(&r.link),
                    "the restarted relay changed address or id"
                );
                *r = again;
            }
        }
        Fault::PeerUplinkLost(s) => {
            // The relaying player is relaying at the cut: it sent its children shards in
            // the second before. A child may have moved off it for a while (it is a hop
            // further from the source than the relays, so it can fall behind them); the cut
            // waits up to 6 s for a second in which it relayed.
            at(s - 1);
            let mut before = metric(RELAYING, RELAYED);
            let mut relayed = before;
            for _ in 0..7 {
                thread::sleep(Duration::from_secs(1));
                relayed = metric(RELAYING, RELAYED);
                if relayed > before {
                    break;
                }
                before = relayed;
            }
            println!(
                "bed scenario={name}: player host {RELAYING} loses its uplink at {:.1} s, \
                 having relayed {relayed} shard bytes ({} in the last second)",
                started.elapsed().as_secs_f64(),
                relayed - before
            );
            assert!(
                relayed > before,
                "the relaying player was not relaying in any second of the 6 s before its \
                 uplink went"
            );
            let lost = Shape {
                loss_pct: 100.0,
                rate_kbit: Some(PEER_UPLINK_KBIT),
                ..shape
            };
            bed.reshape(RELAYING, lost, shape);
        }
        Fault::PeerCapped(_) | Fault::ThinDownlink(_) => {}
    }
    if let Fault::ThinDownlink(_) = fault {
        // Read while every player still runs.
        at(secs - 2);
        let failovers: Vec<f64> = PLAYERS
            .iter()
            .map(|&h| metric(h, "gridcast_failovers_total"))
            .collect();
        println!("bed scenario={name} player_failovers={failovers:?}");
    }
    if fault.peer_tier() {
        // Read while every player still runs: a player writing a file ends with the stream.
        at(secs - 2);
        peer_tier_figures(name, fault, &bed, &metric, started);
    }
    let (reference, input_ended) = live.finish_at();
    // The last chunks reach the players within the start delay, the playout delay and the
    // path's delay; a player whose parents fell silent finds out within its lag rule.
    thread::sleep(Duration::from_secs(5));
    for &p in &players {
        signal(bed.child(p), "-TERM");
    }
    for &p in &players {
        let status = bed.child(p).wait().unwrap();
        assert!(status.success(), "play failed: {status}");
    }
    drop(relays);
    watched.store(true, Ordering::Relaxed);
    // The switch did what the scenario says: it lost frames where loss was asked for, and
    // none where neither loss nor a cut was.
    let counts = bed.counts();
    let sent: u64 = counts.iter().map(|c| c.sent).sum();
    let lost: u64 = counts.iter().map(|c| c.lost).sum();
    let queue_drops: u64 = counts.iter().map(|c| c.queue_drops).sum();
    println!("bed scenario={name} frames_sent={sent} frames_lost={lost} queue_drops={queue_drops}");
    if shape.loss_pct > 0.0 {
        assert!(
            lost as f64 >= sent as f64 * shape.loss_pct / 200.0,
            "the switch lost {lost} of {sent} frames, asked for {}% each way",
            shape.loss_pct
        );
    } else if !matches!(fault, Fault::Cut(_) | Fault::PeerUplinkLost(_)) {
        assert_eq!(lost, 0, "the switch lost frames on loss-free links");
    }
    let mut ends = Vec::new();
    for ((out, watcher), h) in outputs.iter().zip(watchers).zip(PLAYERS) {
        let seen = watcher.join().unwrap();
        let played = std::fs::metadata(out).map_or(0, |m| m.len());
        let end = seen.last_growth.map(|t| {
            let ms = |d: Duration| d.as_millis() as i128;
            ms(t.saturating_duration_since(input_ended))
                - ms(input_ended.saturating_duration_since(t))
        });
        ends.push(end);
        println!(
            "bed scenario={name} player={h} startup_ms={} end_behind_input_ms={} \
             played_bytes={played} share={:.3}",
            seen.first_byte
                .map_or("none".into(), |d| d.as_millis().to_string()),
            end.map_or("none".into(), |e| e.to_string()),
            played as f64 / reference.len() as f64
        );
    }
    for (out, h) in outputs.iter().zip(PLAYERS) {
        // A player without an uplink cannot acknowledge what it is sent: its own parents
        // stop sending to it. What is asked here is its children's.
        if matches!(fault, Fault::PeerUplinkLost(_)) && h == RELAYING {
            continue;
        }
        assert_tail(out, &reference, 0.6);
    }
    ends
}

/// What the relaying player sent and what its children did about it; asserts that the
/// children moved off it, and that a capped one kept to its cap.
fn peer_tier_figures(
    name: &str,
    fault: Fault,
    bed: &Bed,
    metric: &dyn Fn(usize, &str) -> f64,
    since: Instant,
) {
    let secs = since.elapsed().as_secs_f64();
    let relayed = metric(RELAYING, RELAYED);
    let cap_drops = metric(
        RELAYING,
        "gridcast_subscriber_drops_total{reason=\"upload_cap\"}",
    );
    let port = bed.counts()[RELAYING];
    for h in CHILDREN {
        let failovers = metric(h, "gridcast_failovers_total");
        let parents = metric(h, "gridcast_player_parents");
        println!("bed scenario={name} child={h} failovers={failovers} parents_at_end={parents}");
        assert!(
            failovers >= 1.0,
            "player host {h} never moved off the relaying player"
        );
    }
    println!(
        "bed scenario={name} relaying_player={RELAYING} relayed_shard_bytes={relayed} \
         upload_cap_drops={cap_drops} uplink_bytes={} downlink_bytes={} secs={secs:.1}",
        port.sent_bytes, port.delivered_bytes
    );
    if let Fault::PeerCapped(bps) = fault {
        let cap = bps as f64 / 8.0;
        // The token bucket: the cap's rate over the run, plus its one second of burst.
        assert!(
            relayed <= cap * (secs + 1.0),
            "the relaying player sent {relayed} shard bytes in {secs:.1} s over a cap of \
             {cap} bytes/s"
        );
        // On the wire: those shards with their packets' framing (at most a tenth more),
        // plus what a player sends for what it receives (acknowledgements, control), at
        // most a tenth of its downlink.
        let bound = 1.1 * cap * (secs + 1.0) + 0.1 * port.delivered_bytes as f64;
        assert!(
            (port.sent_bytes as f64) <= bound,
            "the relaying player's uplink carried {} bytes in {secs:.1} s, over {bound:.0}",
            port.sent_bytes
        );
        assert!(
            cap_drops > 0.0,
            "the cap never bit: the children asked no more than it"
        );
    }
}

#[test]
fn two_percent_loss_and_forty_ms_of_jittered_delay_on_every_link_cost_nothing() {
    scenario("loss_delay", 60, LOSSY, Fault::None);
}

#[test]
fn a_relay_host_cut_off_mid_stream_costs_its_players_nothing() {
    scenario("link_cut", 20, LOSSY, Fault::Cut(8));
}

#[test]
fn relays_killed_and_restarted_one_after_another_cost_the_players_nothing() {
    scenario(
        "kill_restart",
        30,
        LOSSY,
        Fault::KillEach { from: 6, gap: 7 },
    );
}

#[test]
fn a_rolling_restart_of_every_relay_costs_the_players_nothing() {
    scenario(
        "rolling_restart",
        34,
        LOSSY,
        Fault::RollEach { from: 6, gap: 8 },
    );
}

#[test]
fn forty_ms_of_jittered_delay_on_every_link_costs_nothing() {
    scenario("delay", 20, DELAYED, Fault::None);
}

#[test]
fn a_relay_host_cut_off_mid_stream_on_delayed_links_costs_its_players_nothing() {
    scenario("link_cut_delay", 20, DELAYED, Fault::Cut(8));
}

#[test]
fn relays_killed_and_restarted_on_delayed_links_cost_the_players_nothing() {
    scenario(
        "kill_restart_delay",
        30,
        DELAYED,
        Fault::KillEach { from: 6, gap: 7 },
    );
}

#[test]
fn a_rolling_restart_on_delayed_links_costs_the_players_nothing() {
    scenario(
        "rolling_restart_delay",
        34,
        DELAYED,
        Fault::RollEach { from: 6, gap: 8 },
    );
}

#[test]
fn a_relaying_player_that_loses_its_uplink_costs_its_children_nothing() {
    scenario("peer_uplink_lost", 26, DELAYED, Fault::PeerUplinkLost(10));
}

#[test]
fn players_behind_a_thin_access_link_play_every_byte() {
    // About 0.75 Mbit/s of stream, of which a player draws 12 of 16 substreams from three
    // relays and, as they are named, from the other players: about 1.15 Mbit/s with the
    // packets' overhead through a 2 Mbit/s link with 25 KB of queue. The parents' chunk
    // bursts overflow it. Every player's file is a byte-exact, timely tail; what this does
    // not assert, it prints: the three players replaced a parent 55, 65 and 59 times in all
    // in three runs before the lag allowance (`tests/sim_access.rs` holds the count down in
    // the simulator), 30, 26 and 28 with it, some of them relaying players that had fallen
    // behind themselves.
    scenario("thin_downlink", 40, DELAYED, Fault::ThinDownlink(2_000));
}

#[test]
fn a_relaying_player_capped_below_what_its_children_ask_keeps_its_cap_and_they_move() {
    scenario("peer_capped", 24, LOSSY, Fault::PeerCapped(250_000));
}

/// Half of a path's 40 ms and 3% loss on each end of it (about 6% a path), without jitter: a
/// path CUBIC alone cannot carry a relay's draw over (about 0.7 Mbit/s at 6% and 80 ms,
/// against the 0.75 Mbit/s a relay draws from the source).
const VERY_LOSSY: Shape = Shape {
    jitter_ms: 0,
    loss_pct: 3.0,
    ..LOSSY
};

#[test]
fn six_percent_random_loss_on_every_link_costs_nothing() {
    // Random loss is not congestion: the source's and the relays' connections run the gated
    // CUBIC. On plain CUBIC the relays could not keep up with the source, and the players,
    // byte-exact all the same, played the stream's end 4.8-9.4 s after the input's (the gated
    // CUBIC: 0.09-0.19 s). Falling behind grows with every second a grid cannot carry its
    // stream, so the bound below is a property of the grid, not of this machine's speed.
    let ends = scenario("loss6", 60, VERY_LOSSY, Fault::None);
    for (end, h) in ends.iter().zip(PLAYERS) {
        let end = end.expect("the player's file grew");
        assert!(
            end < 2_500,
            "player {h} played the stream's end {end} ms after the input's: the grid fell \
             behind on a path that loses packets at random"
        );
    }
}
