//! Real processes for the end-to-end tests: the built binary, ffmpeg test streams, signals,
//! and the checks every such test makes (a player's file is a byte-exact tail of what ffmpeg
//! produced, and decodes with no errors).
//!
//! Tests that need ffmpeg skip (with a message) where it is missing, unless
//! `GRIDCAST_REQUIRE_FFMPEG=1` (CI) makes that a failure.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread;

pub fn have_ffmpeg() -> bool {
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

pub fn gridcast(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gridcast"));
    c.args(args).arg("--log-level").arg("warn");
    c
}

/// `link` with its one node at `host` (the port and node id kept): a printed link as an
/// operator passes it on, with the host's real address (a node on a wildcard address
/// prints 127.0.0.1).
pub fn with_host(link: &str, host: &str) -> String {
    let (head, node) = link.split_once('@').unwrap();
    let (addr, id) = node.rsplit_once('/').unwrap();
    let port = addr.rsplit_once(':').unwrap().1;
    format!("{head}@{host}:{port}/{id}")
}

/// Starts a gridcast process whose first stdout line is a channel link; returns both.
pub fn spawn_with_link(cmd: Command) -> (Child, String) {
    let (child, line) = spawn_with_line(cmd);
    assert!(line.starts_with("gridcast://"), "no link: {line:?}");
    (child, line)
}

/// Creates a channel key in `dir` and returns its path.
pub fn keygen(dir: &Path) -> std::path::PathBuf {
    let key = dir.join("channel.key");
    assert!(
        gridcast(&["keygen", "--out", key.to_str().unwrap()])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    key
}

/// ffmpeg encoding `secs` of test pattern (a keyframe each second) and a tone as MPEG-TS on
/// stdout; in real time if `realtime`.
pub fn test_pattern_ts(secs: u64, realtime: bool) -> Command {
    let mut ffmpeg = Command::new("ffmpeg");
    ffmpeg.args(["-v", "error"]);
    if realtime {
        ffmpeg.arg("-re");
    }
    ffmpeg
        .args(["-f", "lavfi", "-i"])
        .arg(format!("testsrc=size=320x240:rate=25:duration={secs}"))
        .args(["-f", "lavfi", "-i"])
        .arg(format!("sine=frequency=440:duration={secs}"))
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
        .args(["-f", "mpegts", "-"]);
    ffmpeg
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// The link's node entries (after the '@').
pub fn nodes_of(link: &str) -> &str {
    link.split_once('@').unwrap().1
}

/// Starts a gridcast process and returns it with the first line it prints on stdout.
pub fn spawn_with_line(mut cmd: Command) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().to_owned())
}

pub fn decodes_cleanly(path: &Path) {
    let decode = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    let errors = String::from_utf8_lossy(&decode.stderr);
    assert!(
        decode.status.success() && errors.trim().is_empty(),
        "{}: {errors}",
        path.display()
    );
}

/// Copies ffmpeg's output into `into` and keeps every byte: the reference a player's file
/// must be a tail of.
pub fn tee(from: ChildStdout, into: ChildStdin) -> thread::JoinHandle<Vec<u8>> {
    tee_in_pieces(from, into, 0)
}

/// [`tee`], passing the bytes on in writes of `piece` bytes each (0: as they are read), the
/// way a source reading from a network gets an encoder's frames split across reads.
pub fn tee_in_pieces(
    mut from: ChildStdout,
    mut into: ChildStdin,
    piece: usize,
) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = 0;
        loop {
            let n = from.read(&mut buf).unwrap();
            all.extend_from_slice(&buf[..n]);
            let ready = if n == 0 || piece == 0 {
                all.len()
            } else {
                all.len() - (all.len() - sent) % piece
            };
            // A source that went away ends the copy; the reference so far stands.
            if n == 0 || into.write_all(&all[sent..ready]).is_err() {
                if n == 0 {
                    let _ = into.write_all(&all[sent..]);
                }
                return all;
            }
            sent = ready;
        }
    })
}

/// Asserts that `out` holds a byte-exact run of `reference` from where the player joined to
/// the very end (no gap, no repeat, no wrong byte), at least `min_share` of it, and that it
/// decodes cleanly.
pub fn assert_tail(out: &Path, reference: &[u8], min_share: f64) {
    let (start, played) = assert_exact_tail(out, reference, min_share);
    decodes_cleanly(out);
    println!(
        "{}: {played} bytes from offset {start} of {}, decodes cleanly",
        out.display(),
        reference.len()
    );
}

/// A fixed pseudo-random byte stream (xorshift64) from `seed`: test input with no structure
/// a player could get right by chance.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0 as u8
            })
            .collect()
    }
}

/// As [`assert_tail`] for input that is no media (nothing to decode): `out` is a byte-exact
/// tail of `reference`, at least `min_share` of it. Where it starts, and its length.
pub fn assert_exact_tail(out: &Path, reference: &[u8], min_share: f64) -> (usize, usize) {
    let played = std::fs::read(out).unwrap();
    assert!(
        played.len() as f64 > reference.len() as f64 * min_share,
        "{}: {} of {} bytes",
        out.display(),
        played.len(),
        reference.len()
    );
    let start = reference.len() - played.len();
    assert!(
        reference[start..] == played[..],
        "{}: not the tail of the source: {}",
        out.display(),
        tail_mismatch(&played, reference)
    );
    (start, played.len())
}

/// Says how `played` departs from being a tail of `reference`: where its first bytes sit in
/// the source, and the first byte after them that differs (a gap, a repeat or a wrong byte)
/// or how far short of the end it stops.
fn tail_mismatch(played: &[u8], reference: &[u8]) -> String {
    let head = &played[..played.len().min(4096)];
    let Some(at) = reference.windows(head.len().max(1)).position(|w| w == head) else {
        return format!("its first {} bytes are nowhere in the source", head.len());
    };
    let same = reference[at..]
        .iter()
        .zip(played)
        .take_while(|(a, b)| a == b)
        .count();
    if same == played.len() {
        format!(
            "it is the source's bytes {at}..{} but stops {} bytes before the end",
            at + same,
            reference.len() - at - same
        )
    } else {
        format!(
            "it starts at the source's byte {at} and departs from it after {same} bytes \
             (of {} played)",
            played.len()
        )
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago (for a node restarted on the same
/// address).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills and reaps every child left.
pub fn reap(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A `broadcast` on 127.0.0.1 (any port) signing with `key`, reading stdin, lingering
/// `linger` seconds after its input ends.
pub fn loopback_source(key: &Path, linger: u64) -> Command {
    gridcast(&[
        "broadcast",
        "--key",
        key.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--linger",
        &linger.to_string(),
    ])
}

/// A live stream into a source: ffmpeg encoding `secs` of test pattern in real time into
/// `source` (a `gridcast broadcast` command reading stdin), the bytes teed off as the
/// reference.
/// Dropped before [`Live::finish`] (a test that failed), it kills both.
pub struct Live {
    ffmpeg: Child,
    source: Child,
    /// The source's channel link.
    pub link: String,
    tee: Option<thread::JoinHandle<Vec<u8>>>,
}

impl Live {
    /// Starts ffmpeg and `source`, and waits for the source's link.
    pub fn start(mut source: Command, secs: u64) -> Self {
        let mut ffmpeg = test_pattern_ts(secs, true)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        source.stdin(Stdio::piped());
        let (mut source, link) = spawn_with_link(source);
        let tee = tee(ffmpeg.stdout.take().unwrap(), source.stdin.take().unwrap());
        Self {
            ffmpeg,
            source,
            link,
            tee: Some(tee),
        }
    }

    /// `secs` of stream into a `broadcast` on 127.0.0.1 (any port) signing with `key`,
    /// lingering 4 s after its input ends.
    pub fn on_loopback(key: &Path, secs: u64) -> Self {
        Self::start(loopback_source(key, 4), secs)
    }

    /// The source process's id.
    pub fn source_pid(&self) -> u32 {
        self.source.id()
    }

    /// Waits for the stream to end and the source to exit (both successfully); the reference.
    pub fn finish(self) -> Vec<u8> {
        self.finish_at().0
    }

    /// As [`Live::finish`], with the moment ffmpeg's output ended (when called before).
    pub fn finish_at(mut self) -> (Vec<u8>, std::time::Instant) {
        let reference = self.tee.take().unwrap().join().unwrap();
        let ended = std::time::Instant::now();
        assert!(self.ffmpeg.wait().unwrap().success(), "ffmpeg failed");
        assert!(self.source.wait().unwrap().success(), "broadcast failed");
        (reference, ended)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.tee.is_some() {
            for c in [&mut self.ffmpeg, &mut self.source] {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Children killed and reaped when dropped, so that a failing test leaves no process behind
/// (one would keep the test harness's output pipe open).
pub struct Reaper(pub Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        reap(&mut self.0);
    }
}

/// Whether `tool` runs (`tool probe…` succeeds). When it does not, a failure if the
/// environment variable `require` is `1` (CI), else a skip with a message.
pub fn have_tool(tool: &str, probe: &[&str], require: &str) -> bool {
    let found = Command::new(tool)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !std::env::var(require).is_ok_and(|v| v == "1"),
            "{tool} is required ({require}=1) but does not run"
        );
        println!("{tool} not installed: skipping what needs it");
    }
    found
}
