//! Real processes on separate hosts of the resilience bed (`common::bed`: a network namespace
//! per host, each plugged into one switch that delays, jitters and drops its traffic). Host 0 runs
//! `gridcast broadcast` fed a live ffmpeg stream, hosts 1-3 a `relay` each, hosts 4-6 a `play`
//! each drawing from all three relays. Every scenario breaks the network or the relays the
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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::bed::{Bed, PORT, Relay, Shape, start_relay};
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
}

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

fn scenario(name: &str, secs: u64, shape: Shape, fault: Fault) {
    if !Bed::can_run() || !have_ffmpeg() {
        return;
    }
    let mut bed = Bed::new(7, shape, shape);
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
    for (&h, out) in PLAYERS.iter().zip(&outputs) {
        let asked = Instant::now();
        let child = bed
            .gridcast(
                h,
                &[
                    "play",
                    &play_link,
                    "--output",
                    out.to_str().unwrap(),
                    "--connect-timeout",
                    "20",
                ],
            )
            .spawn()
            .unwrap();
        players.push(bed.keep(child));
        watchers.push(watch(out.clone(), asked, Arc::clone(&watched)));
    }
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
    } else if !matches!(fault, Fault::Cut(_)) {
        assert_eq!(lost, 0, "the switch lost frames on loss-free links");
    }
    for ((out, watcher), h) in outputs.iter().zip(watchers).zip(PLAYERS) {
        let seen = watcher.join().unwrap();
        let played = std::fs::metadata(out).map_or(0, |m| m.len());
        println!(
            "bed scenario={name} player={h} startup_ms={} end_behind_input_ms={} \
             played_bytes={played} share={:.3}",
            seen.first_byte
                .map_or("none".into(), |d| d.as_millis().to_string()),
            seen.last_growth.map_or("none".into(), |t| {
                let ms = |d: Duration| d.as_millis() as i128;
                (ms(t.saturating_duration_since(input_ended))
                    - ms(input_ended.saturating_duration_since(t)))
                .to_string()
            }),
            played as f64 / reference.len() as f64
        );
    }
    for out in &outputs {
        assert_tail(out, &reference, 0.6);
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
