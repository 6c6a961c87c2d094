//! Real processes of the built binary with a real ffmpeg stream: ffmpeg encodes a test pattern
//! with a tone as MPEG-TS in real time into `gridcast broadcast` on stdin; two `relay`s carry
//! it; two `play` peers draw from both relays and write files. Each file must be a byte-exact
//! run of what ffmpeg produced, up to its end, and must decode with no errors. Once with every
//! process alive, once with a relay SIGKILLed mid-stream, once with a relay sent SIGTERM.
//!
//! Skipped (with a message) where ffmpeg is missing, unless `GRIDCAST_REQUIRE_FFMPEG=1` (CI)
//! makes that a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

const STREAM_SECS: u64 = 10;

fn have_ffmpeg() -> bool {
    let found = Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !std::env::var("GRIDCAST_REQUIRE_FFMPEG").is_ok_and(|v| v == "1"),
            "ffmpeg is required (GRIDCAST_REQUIRE_FFMPEG=1) but not installed"
        );
        println!("ffmpeg not installed: skipping");
    }
    found
}

fn gridcast(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gridcast"));
    c.args(args).arg("--log-level").arg("warn");
    c
}

/// Starts a gridcast process whose first stdout line is a channel link; returns both.
fn spawn_with_link(mut cmd: Command) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("gridcast://"), "no link: {line:?}");
    (child, line.trim().to_owned())
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// The link's node entries (after the '@').
fn nodes_of(link: &str) -> &str {
    link.split_once('@').unwrap().1
}

#[derive(Clone, Copy)]
enum Fault {
    None,
    Kill,
    Term,
}

fn run(fault: Fault, dir: &Path) {
    let key = dir.join("channel.key");
    assert!(
        gridcast(&["keygen", "--out", key.to_str().unwrap()])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    let mut ffmpeg = Command::new("ffmpeg")
        .args(["-v", "error", "-re", "-f", "lavfi", "-i"])
        .arg(format!(
            "testsrc=size=320x240:rate=25:duration={STREAM_SECS}"
        ))
        .args(["-f", "lavfi", "-i"])
        .arg(format!("sine=frequency=440:duration={STREAM_SECS}"))
        .args([
            "-c:v",
            "mpeg2video",
            "-g",
            "25",
            "-b:v",
            "800k",
            "-c:a",
            "mp2",
        ])
        .args(["-f", "mpegts", "-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut source = gridcast(&[
        "broadcast",
        "--key",
        key.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--linger",
        "4",
    ]);
    source.stdin(Stdio::piped());
    let (mut source, source_link) = spawn_with_link(source);
    // Tee ffmpeg's bytes into the broadcast and into memory: the reference.
    let mut into_source = source.stdin.take().unwrap();
    let mut from_ffmpeg = ffmpeg.stdout.take().unwrap();
    let tee = thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from_ffmpeg.read(&mut buf).unwrap();
            if n == 0 {
                return all;
            }
            all.extend_from_slice(&buf[..n]);
            into_source.write_all(&buf[..n]).unwrap();
        }
    });
    let relays: Vec<(Child, String)> = (0..2)
        .map(|_| {
            spawn_with_link(gridcast(&[
                "relay",
                "--join",
                &source_link,
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "2",
            ]))
        })
        .collect();
    let channel = source_link.split_once('@').unwrap().0;
    let play_link = format!(
        "{channel}@{},{}",
        nodes_of(&relays[0].1),
        nodes_of(&relays[1].1)
    );
    thread::sleep(Duration::from_secs(1));
    let outputs: Vec<_> = (0..2).map(|i| dir.join(format!("peer{i}.ts"))).collect();
    let mut peers: Vec<Child> = outputs
        .iter()
        .map(|out| {
            gridcast(&["play", &play_link, "--output", out.to_str().unwrap()])
                .spawn()
                .unwrap()
        })
        .collect();
    thread::sleep(Duration::from_secs(STREAM_SECS / 2));
    let mut relays: Vec<Child> = relays.into_iter().map(|(c, _)| c).collect();
    match fault {
        Fault::None => {}
        Fault::Kill => signal(&relays[0], "-KILL"),
        Fault::Term => signal(&relays[0], "-TERM"),
    }
    let reference = tee.join().unwrap();
    assert!(ffmpeg.wait().unwrap().success());
    assert!(source.wait().unwrap().success(), "broadcast failed");
    // The last chunks reach the peers within the start delay plus the playout delay.
    thread::sleep(Duration::from_secs(3));
    for p in &peers {
        signal(p, "-TERM");
    }
    for p in &mut peers {
        assert!(p.wait().unwrap().success(), "play failed");
    }
    for r in &mut relays {
        let _ = r.kill();
        let _ = r.wait();
    }

    for out in &outputs {
        let played = std::fs::read(out).unwrap();
        assert!(
            played.len() > reference.len() / 2,
            "{}: {} of {} bytes",
            out.display(),
            played.len(),
            reference.len()
        );
        // A run of the reference from where the peer joined to the very end: no gap, no
        // repeat, no wrong byte.
        let start = reference.len() - played.len();
        assert!(
            reference[start..] == played[..],
            "{}: not the tail of the source",
            out.display()
        );
        let decode = Command::new("ffmpeg")
            .args(["-v", "error", "-i"])
            .arg(out)
            .args(["-f", "null", "-"])
            .output()
            .unwrap();
        assert!(decode.status.success());
        let errors = String::from_utf8_lossy(&decode.stderr);
        assert!(errors.trim().is_empty(), "{}: {errors}", out.display());
        println!(
            "{}: {} bytes from offset {start} of {}, decodes cleanly",
            out.display(),
            played.len(),
            reference.len()
        );
    }
}

#[test]
fn ffmpeg_stream_through_two_relays_to_two_players() {
    if have_ffmpeg() {
        run(Fault::None, tempfile::tempdir().unwrap().path());
    }
}

#[test]
fn a_relay_killed_mid_stream_costs_the_players_nothing() {
    if have_ffmpeg() {
        run(Fault::Kill, tempfile::tempdir().unwrap().path());
    }
}

#[test]
fn a_relay_stopped_by_sigterm_costs_the_players_nothing() {
    if have_ffmpeg() {
        run(Fault::Term, tempfile::tempdir().unwrap().path());
    }
}
