//! Real processes of the built binary with a real ffmpeg stream: ffmpeg encodes a test pattern
//! with a tone as MPEG-TS in real time into `gridcast broadcast` on stdin; two `relay`s carry
//! it; two `play` peers draw from both relays and write files. Each file must be a byte-exact
//! run of what ffmpeg produced, up to its end, and must decode with no errors. Once with every
//! process alive, once with a relay SIGKILLed mid-stream, once with a relay sent SIGTERM. Also:
//! every chunk the chunker flags random-access in a real stream decodes from its start, an
//! Icecast push reaches HTTP players, late listeners of an MP3 or AAC radio start on a frame,
//! and an MP3 radio's song titles, set as Icecast and SHOUTcast encoders set them, reach the
//! listeners that ask for ICY metadata.
//!
//! Skipped (with a message) where ffmpeg is missing, unless `GRIDCAST_REQUIRE_FFMPEG=1` (CI)
//! makes that a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::procs::*;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

const STREAM_SECS: u64 = 10;

#[derive(Clone, Copy)]
enum Fault {
    None,
    Kill,
    Term,
}

/// What ffmpeg encodes in [`run`].
#[derive(Clone, Copy)]
enum Stream {
    /// The test pattern with a tone, as MPEG-TS, in chunks of the default 250 ms.
    Video,
    /// A tone as 128 kbit/s MP3, which the source cuts into chunks of a second unless told
    /// otherwise: audio alone.
    Radio,
}

/// ffmpeg encoding `STREAM_SECS` of a 440 Hz tone in real time with `codec`; the caller adds
/// the bitrate, format and destination.
fn tone(codec: &str) -> Command {
    let mut ffmpeg = Command::new("ffmpeg");
    ffmpeg
        .args(["-v", "error", "-re", "-f", "lavfi", "-i"])
        .arg(format!("sine=frequency=440:duration={STREAM_SECS}"))
        .args(["-c:a", codec]);
    ffmpeg
}

fn run(fault: Fault, dir: &Path) {
    run_stream(Stream::Video, fault, dir);
}

fn run_stream(stream: Stream, fault: Fault, dir: &Path) {
    let key = keygen(dir);
    let (mut ffmpeg, extension) = match stream {
        Stream::Video => (test_pattern_ts(STREAM_SECS, true), "ts"),
        Stream::Radio => {
            let mut ffmpeg = tone("libmp3lame");
            ffmpeg.args(["-b:a", "128k", "-f", "mp3", "-"]);
            (ffmpeg, "mp3")
        }
    };
    let mut ffmpeg = ffmpeg.stdout(Stdio::piped()).spawn().unwrap();
    let mut source = loopback_source(&key, 4);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", common::http::free_tcp_port())
        .parse()
        .unwrap();
    source.args(["--admin", &admin.to_string()]);
    source.stdin(Stdio::piped());
    let (mut source, source_link) = spawn_with_link(source);
    // Tee ffmpeg's bytes into the broadcast and into memory: the reference.
    let tee = tee(ffmpeg.stdout.take().unwrap(), source.stdin.take().unwrap());
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
                // Long enough that a relay waiting for it (children that never moved) fails
                // the bound below.
                "--drain-timeout",
                "60",
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
    let outputs: Vec<_> = (0..2)
        .map(|i| dir.join(format!("peer{i}.{extension}")))
        .collect();
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
    let signalled = std::time::Instant::now();
    let reference = tee.join().unwrap();
    assert!(ffmpeg.wait().unwrap().success());
    // The source, lingering, says how many chunks it cut: the video's are 250 ms long (and a
    // keyframe each second cuts too), the radio's a second.
    let (_, scrape) = common::http::get(admin, "/metrics").expect("the source's metrics");
    let chunks = common::http::sample(&scrape, "gridcast_source_chunks_published_total");
    let expected = match stream {
        Stream::Video => 30.0..=60.0,
        Stream::Radio => 8.0..=14.0,
    };
    assert!(
        expected.contains(&chunks),
        "{chunks} chunks in {STREAM_SECS} s of stream"
    );
    assert!(source.wait().unwrap().success(), "broadcast failed");
    // The last chunks reach the peers within the start delay plus the playout delay.
    thread::sleep(Duration::from_secs(3));
    for p in &peers {
        signal(p, "-TERM");
    }
    for p in &mut peers {
        assert!(p.wait().unwrap().success(), "play failed");
    }
    if let Fault::Term = fault {
        // The drained relay exits by itself once its children have moved, well before its
        // 60 s drain deadline.
        let status = loop {
            if let Some(status) = relays[0].try_wait().unwrap() {
                break status;
            }
            assert!(
                signalled.elapsed() < Duration::from_secs(30),
                "the relay sent SIGTERM has not finished draining"
            );
            thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "the drained relay failed: {status}");
    }
    for r in &mut relays {
        let _ = r.kill();
        let _ = r.wait();
    }

    for out in &outputs {
        assert_tail(out, &reference, 0.5);
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

#[test]
fn a_relay_killed_under_a_radio_in_chunks_of_a_second_costs_the_players_nothing() {
    if have_ffmpeg() {
        run_stream(
            Stream::Radio,
            Fault::Kill,
            tempfile::tempdir().unwrap().path(),
        );
    }
}

/// An HTTP player: GETs `url` and keeps the response until the server closes it.
/// `n` connections to `addr` that never send a byte (file descriptors raised to the hard
/// limit first: the test process holds them all).
fn idle_connections(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
    (0..n)
        .map(|i| {
            std::net::TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("idle connection {i} to {addr}: {e}"))
        })
        .collect()
}

fn http_player(url: &str, version: &'static str) -> thread::JoinHandle<(String, Vec<u8>)> {
    http_player_asking(url, version, false)
}

/// As [`http_player`], asking for ICY metadata if `icy` (its blocks are left in the body).
fn http_player_asking(
    url: &str,
    version: &'static str,
    icy: bool,
) -> thread::JoinHandle<(String, Vec<u8>)> {
    let addr = url
        .strip_prefix("http://")
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    thread::spawn(move || {
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            conn,
            "GET / {version}\r\nHost: localhost\r\nIcy-MetaData: {}\r\n\r\n",
            u8::from(icy)
        )
        .unwrap();
        let mut all = Vec::new();
        let _ = conn.read_to_end(&mut all);
        let split = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP response head");
        let head = String::from_utf8_lossy(&all[..split]).into_owned();
        let raw = &all[split + 4..];
        // An HTTP/1.1 player gets the stream chunked, an HTTP/1.0 one until the close.
        let body = if head.contains("Transfer-Encoding: chunked") {
            common::http::dechunk(raw).expect("a well-formed chunked body")
        } else {
            raw.to_vec()
        };
        (head, body)
    })
}

/// The leading Ogg pages whose granule position is 0: the stream header.
fn ogg_header_len(ogg: &[u8]) -> usize {
    let mut at = 0;
    while ogg.len() >= at + 27 && &ogg[at..at + 4] == b"OggS" {
        let granule = u64::from_le_bytes(ogg[at + 6..at + 14].try_into().unwrap());
        if granule != 0 {
            break;
        }
        let segments = ogg[at + 26] as usize;
        let body: usize = ogg[at + 27..at + 27 + segments]
            .iter()
            .map(|&s| s as usize)
            .sum();
        at += 27 + segments + body;
    }
    at
}

/// A source whose input is an Icecast endpoint on a free port at `mount`, source password
/// `hackme`: the process, its link and the port.
fn icecast_source(key: &Path, mount: &str) -> (Child, String, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut source = gridcast(&[
        "broadcast",
        "--key",
        key.to_str().unwrap(),
        "--input",
        &format!("icecast://127.0.0.1:{port}{mount}"),
        "--listen",
        "127.0.0.1:0",
    ]);
    source.env("GRIDCAST_SOURCE_PASSWORD", "hackme");
    let (source, link) = spawn_with_link(source);
    (source, link, port)
}

#[test]
fn an_icecast_push_reaches_http_players_and_late_ones_get_the_header_first() {
    if !have_ffmpeg() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let (mut source, source_link, port) = icecast_source(&key, "/radio.ogg");
    // Two workers: the stream header must reach the subscribers of both.
    let (mut relay, relay_link) = spawn_with_link(gridcast(&[
        "relay",
        "--join",
        &source_link,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
    ]));
    let play =
        |link: &str| spawn_with_line(gridcast(&["play", link, "--output", "http://127.0.0.1:0/"]));
    // Peer A plays from before the first byte: its header comes in-band.
    let (mut peer_a, url_a) = play(&relay_link);
    assert!(url_a.starts_with("http://127.0.0.1:"), "{url_a}");
    let early = http_player(&url_a, "HTTP/1.0");
    // A wrong password is refused, and the right one streams.
    let refused = Command::new("ffmpeg")
        .args(["-v", "quiet", "-f", "lavfi", "-i", "sine=duration=1"])
        .args(["-c:a", "libvorbis", "-f", "ogg"])
        .arg(format!("icecast://source:wrong@127.0.0.1:{port}/radio.ogg"))
        .status()
        .unwrap();
    assert!(!refused.success(), "a wrong source password was accepted");
    // A thousand idle connections to the Icecast port stop no encoder.
    let idle_source = idle_connections(&format!("127.0.0.1:{port}"), 1000);
    let mut ffmpeg = tone("libvorbis")
        .args(["-content_type", "audio/ogg", "-f", "ogg"])
        .arg(format!(
            "icecast://source:hackme@127.0.0.1:{port}/radio.ogg"
        ))
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(STREAM_SECS / 2));
    // A late player on peer A (the header from peer A's memory) and a late peer B (the
    // header from the channel information).
    // Nor do a thousand idle connections to a player output stop a player.
    let idle_output = idle_connections(
        url_a.trim_start_matches("http://").trim_end_matches('/'),
        1000,
    );
    let late_a = http_player(&url_a, "HTTP/1.1");
    let (mut peer_b, url_b) = play(&relay_link);
    let late_b = http_player(&url_b, "HTTP/1.1");
    assert!(ffmpeg.wait().unwrap().success(), "ffmpeg push failed");
    drop((idle_source, idle_output));
    thread::sleep(Duration::from_secs(3));
    for p in [&peer_a, &peer_b] {
        signal(p, "-TERM");
    }
    for p in [&mut peer_a, &mut peer_b] {
        assert!(p.wait().unwrap().success(), "play failed");
    }
    for c in [&mut source, &mut relay] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let (head, early) = early.join().unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(head.contains("Content-Type: audio/ogg"), "{head}");
    let header_len = ogg_header_len(&early);
    assert!(
        header_len > 0,
        "no Ogg header at the start of the early player's stream"
    );
    let header = &early[..header_len];
    for (name, player) in [("late on peer A", late_a), ("late on peer B", late_b)] {
        let (head, body) = player.join().unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{name}: {head}");
        assert!(
            head.contains("Transfer-Encoding: chunked"),
            "{name}: {head}"
        );
        assert!(head.contains("Content-Type: audio/ogg"), "{name}: {head}");
        assert!(
            body.len() > header_len + 4096,
            "{name}: only {} bytes",
            body.len()
        );
        assert_eq!(&body[..header_len], header, "{name}: header not first");
        // After the header: a byte-exact run of the early player's stream, starting on a
        // page.
        let rest = &body[header_len..];
        assert_eq!(&rest[..4], b"OggS", "{name}: does not start on a page");
        let probe = &rest[..rest.len().min(4096)];
        let at = early
            .windows(probe.len())
            .position(|w| w == probe)
            .unwrap_or_else(|| panic!("{name}: its data is not the early player's"));
        let overlap = rest.len().min(early.len() - at);
        assert_eq!(
            &rest[..overlap],
            &early[at..at + overlap],
            "{name}: differs"
        );
        let file = dir.path().join(format!("{}.ogg", name.replace(' ', "-")));
        std::fs::write(&file, &body).unwrap();
        decodes_cleanly(&file);
        println!(
            "{name}: {} bytes, header {header_len} bytes first, joined at byte {at} of {}",
            body.len(),
            early.len()
        );
    }
    let file = dir.path().join("early.ogg");
    std::fs::write(&file, &early).unwrap();
    decodes_cleanly(&file);
}

/// Every chunk the chunker flags random-access in a real ffmpeg MPEG-TS stream (video with a
/// keyframe each second, and audio whose every frame is a random-access point) must be a place a
/// player can start: the stream from there decodes with no errors.
#[test]
fn every_random_access_chunk_of_a_real_stream_is_a_clean_start() {
    use gridcast::stream::{ChunkFlags, Chunker, ChunkerConfig};
    use std::time::Instant;
    if !have_ffmpeg() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = test_pattern_ts(4, false).output().unwrap();
    assert!(out.status.success());
    let stream = out.stdout;
    // Fed as if it arrived over 4 s, in pieces of 7 packets.
    let t0 = Instant::now();
    let mut chunker = Chunker::new(ChunkerConfig::default()).unwrap();
    let (mut fed, mut at, mut starts) = (0, 0, Vec::new());
    for piece in stream.chunks(7 * 188) {
        let now = t0 + Duration::from_micros(fed as u64 * 4_000_000 / stream.len() as u64);
        chunker.handle_timeout(now);
        chunker.handle_input(now, piece);
        fed += piece.len();
        while let Some(chunk) = chunker.poll_chunk() {
            if chunk.flags.contains(ChunkFlags::RANDOM_ACCESS) {
                starts.push(at);
            }
            at += chunk.payload.len();
        }
    }
    // One per group of pictures, give or take the last.
    assert!((4..=5).contains(&starts.len()), "{starts:?}");
    for start in starts {
        let tail = dir.path().join(format!("from{start}.ts"));
        std::fs::write(&tail, &stream[start..]).unwrap();
        decodes_cleanly(&tail);
    }
}

/// A radio of bare audio frames (MP3, or AAC in ADTS) from ffmpeg on stdin, through a relay, to
/// two players with HTTP outputs: a listener who joins late must get the right content type and a
/// stream that starts on a frame header, a byte-exact run of the early listener's, that decodes
/// with no errors.
fn radio_reaches_late_listeners_on_a_frame(codec: &str, format: &str, content_type: &str) {
    if !have_ffmpeg() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let mut ffmpeg = tone(codec)
        .args(["-b:a", "128k", "-f", format, "-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut source = loopback_source(&key, 4);
    source.stdin(Stdio::piped());
    let (mut source, source_link) = spawn_with_link(source);
    // In pieces of 1000 bytes, as from a network source: frames split across reads.
    let tee = tee_in_pieces(
        ffmpeg.stdout.take().unwrap(),
        source.stdin.take().unwrap(),
        1000,
    );
    let (mut relay, relay_link) = spawn_with_link(gridcast(&[
        "relay",
        "--join",
        &source_link,
        "--listen",
        "127.0.0.1:0",
    ]));
    let play =
        |link: &str| spawn_with_line(gridcast(&["play", link, "--output", "http://127.0.0.1:0/"]));
    let (mut early_peer, early_url) = play(&relay_link);
    let early = http_player(&early_url, "HTTP/1.1");
    // Late, at a moment that has nothing to do with frames: the newest chunk the relay holds
    // starts wherever the chunker cut it.
    thread::sleep(Duration::from_millis(STREAM_SECS * 1000 / 2 + 137));
    let (mut late_peer, late_url) = play(&relay_link);
    let late = http_player(&late_url, "HTTP/1.0");
    assert!(ffmpeg.wait().unwrap().success(), "ffmpeg failed");
    let input = tee.join().unwrap();
    thread::sleep(Duration::from_secs(3));
    for p in [&early_peer, &late_peer] {
        signal(p, "-TERM");
    }
    for p in [&mut early_peer, &mut late_peer] {
        assert!(p.wait().unwrap().success(), "play failed");
    }
    for c in [&mut source, &mut relay] {
        let _ = c.kill();
        let _ = c.wait();
    }
    for (name, player, version) in [("late", late, "HTTP/1.0"), ("early", early, "HTTP/1.1")] {
        let (head, body) = player.join().unwrap();
        assert!(
            head.starts_with(&format!("{version} 200")),
            "{name}: {head}"
        );
        assert!(
            head.contains(&format!("Content-Type: {content_type}")),
            "{name} listener: {head}"
        );
        assert!(body.len() > 10_000, "{name}: only {} bytes", body.len());
        // On a frame, or on the ID3 tag ffmpeg writes first, for a listener there from the
        // stream's first byte.
        let on_frame = body[0] == 0xff && body[1] & 0xe0 == 0xe0;
        assert!(
            on_frame || body.starts_with(b"ID3"),
            "{name} listener starts {:02x?}, not on a frame",
            &body[..4]
        );
        let probe = &body[..4096];
        let at = input
            .windows(probe.len())
            .position(|w| w == probe)
            .unwrap_or_else(|| panic!("{name}: the listener's bytes are not the input's"));
        assert!(on_frame || at == 0, "{name}: an ID3 tag mid-stream");
        assert_eq!(
            input.len() - at,
            body.len(),
            "{name}: not played to the end"
        );
        assert_eq!(&input[at..], &body[..], "{name}: differs");
        let file = dir.path().join(format!("{name}.{format}"));
        std::fs::write(&file, &body).unwrap();
        decodes_cleanly(&file);
        println!(
            "{format}: {name} listener joined at byte {at} of {}, {head:?}",
            input.len()
        );
    }
}

#[test]
fn late_listeners_of_an_mp3_radio_start_on_a_frame() {
    radio_reaches_late_listeners_on_a_frame("libmp3lame", "mp3", "audio/mpeg");
}

#[test]
fn late_listeners_of_an_aac_radio_start_on_a_frame() {
    radio_reaches_late_listeners_on_a_frame("aac", "adts", "audio/aac");
}

/// Sets the title on a source's Icecast port the way an encoder does; returns the status line.
fn set_song(port: u16, path_and_query: &str, auth: Option<&str>) -> String {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = auth
        .map(|a| format!("Authorization: Basic {a}\r\n"))
        .unwrap_or_default();
    write!(
        conn,
        "GET {path_and_query} HTTP/1.0\r\nUser-Agent: butt\r\n{auth}\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.lines().next().unwrap_or_default().to_owned()
}

/// What a listener that asked for ICY metadata got: the response head (which must announce
/// blocks every 16000 bytes), the audio, and the titles.
fn icy_listened(icy: thread::JoinHandle<(String, Vec<u8>)>) -> (String, Vec<u8>, Vec<String>) {
    let (head, body) = icy.join().unwrap();
    // Header names are case-insensitive; the HTTP layer writes them title-cased.
    assert!(
        head.to_ascii_lowercase().contains("icy-metaint: 16000"),
        "{head}"
    );
    let (audio, titles) = icy_split(&body, 16_000);
    (head, audio, titles)
}

/// An ICY stream taken apart as a player does: the audio, and the title of every block that
/// carried one.
fn icy_split(stream: &[u8], metaint: usize) -> (Vec<u8>, Vec<String>) {
    let (mut audio, mut titles) = (Vec::new(), Vec::new());
    let mut rest = stream;
    loop {
        let n = metaint.min(rest.len());
        audio.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        let Some((&units, after)) = rest.split_first() else {
            return (audio, titles);
        };
        let len = usize::from(units) * 16;
        assert!(after.len() >= len, "a metadata block cut short");
        if len > 0 {
            let text = String::from_utf8(after[..len].to_vec()).expect("UTF-8 metadata");
            let title = text
                .trim_end_matches('\0')
                .strip_prefix("StreamTitle='")
                .and_then(|t| t.strip_suffix("';"))
                .unwrap_or_else(|| panic!("not a StreamTitle block: {text:?}"));
            titles.push(title.to_owned());
        }
        rest = &after[len..];
    }
}

#[test]
fn an_mp3_radio_s_song_titles_reach_listeners_who_ask_for_them() {
    if !have_ffmpeg() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let (mut source, source_link, port) = icecast_source(&key, "/radio.mp3");
    // Two workers: the title must reach the subscribers of both.
    let (mut relay, relay_link) = spawn_with_link(gridcast(&[
        "relay",
        "--join",
        &source_link,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
    ]));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], common::http::free_tcp_port()));
    let (mut peer, url) = spawn_with_line(gridcast(&[
        "play",
        &relay_link,
        "--output",
        "http://127.0.0.1:0/",
        "--admin",
        &admin.to_string(),
    ]));
    let mut ffmpeg = tone("libmp3lame")
        .args(["-b:a", "128k"])
        .args(["-content_type", "audio/mpeg", "-f", "mp3"])
        .arg(format!(
            "icecast://source:hackme@127.0.0.1:{port}/radio.mp3"
        ))
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    // source:hackme, and a wrong password.
    let (good, bad) = ("c291cmNlOmhhY2ttZQ==", "c291cmNlOmhhY2ttZg==");
    let first = "/admin/metadata?mode=updinfo&mount=/radio.mp3&charset=UTF-8\
                 &song=Nina%20Simone%20%E2%80%93%20Sinnerman";
    assert_eq!(
        set_song(port, first, Some(bad)),
        "HTTP/1.0 401 Unauthorized"
    );
    assert_eq!(
        set_song(port, &first.replace("/radio.mp3", "/other"), Some(good)),
        "HTTP/1.0 404 Not Found"
    );
    assert_eq!(set_song(port, first, Some(good)), "HTTP/1.0 200 OK");
    thread::sleep(Duration::from_secs(1));
    // Listeners join after the first title: one asks for metadata, one does not, and ffmpeg
    // plays it as a player would (it asks for metadata, and takes the blocks out).
    let icy = http_player_asking(&url, "HTTP/1.1", true);
    let plain = http_player(&url, "HTTP/1.0");
    let player = Command::new("ffmpeg")
        .args(["-v", "error", "-icy", "1", "-i", &url, "-f", "null", "-"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(3));
    // SHOUTcast's form, in Latin-1 (no charset: not UTF-8, so read as Latin-1).
    assert_eq!(
        set_song(
            port,
            "/admin.cgi?pass=hackme&mode=updinfo&song=Miles+Davis+-+So+What+%28caf%E9%29",
            None
        ),
        "HTTP/1.0 200 OK"
    );
    assert!(ffmpeg.wait().unwrap().success(), "ffmpeg push failed");
    thread::sleep(Duration::from_secs(3));
    // The operator's view: the title playing, per channel.
    let (status, channels) = common::http::get(admin, "/debug/channels").unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&channels).unwrap();
    assert_eq!(
        json["workers"][0]["channels"][0]["title"], "Miles Davis - So What (café)",
        "{channels}"
    );
    signal(&peer, "-TERM");
    assert!(peer.wait().unwrap().success(), "play failed");
    let played = player.wait_with_output().unwrap();
    let errors = String::from_utf8_lossy(&played.stderr);
    assert!(errors.trim().is_empty(), "ffmpeg as a player: {errors}");
    for c in [&mut source, &mut relay] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let (head, audio, titles) = icy_listened(icy);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Type: audio/mpeg"), "{head}");
    assert_eq!(
        titles,
        ["Nina Simone – Sinnerman", "Miles Davis - So What (café)"],
        "the titles a listener saw"
    );
    // The audio around the blocks is the stream the plain listener got, to its end.
    let (plain_head, plain) = plain.join().unwrap();
    assert!(
        !plain_head.to_ascii_lowercase().contains("icy-metaint"),
        "{plain_head}"
    );
    assert!(audio.len() > 100_000, "only {} bytes", audio.len());
    let (short, long) = if audio.len() <= plain.len() {
        (&audio, &plain)
    } else {
        (&plain, &audio)
    };
    assert_eq!(
        &long[long.len() - short.len()..],
        &short[..],
        "audio differs"
    );
    // On a frame, or on the ID3 tag ffmpeg writes first: a listener who joined two seconds
    // in starts two whole 1-s chunks behind live, on the radio's first.
    assert!(
        audio[0] == 0xff && audio[1] & 0xe0 == 0xe0 || audio.starts_with(b"ID3"),
        "not on a frame: {:02x?}",
        &audio[..4]
    );
    let file = dir.path().join("icy.mp3");
    std::fs::write(&file, &audio).unwrap();
    decodes_cleanly(&file);
    println!(
        "icy: {} bytes of audio, titles {titles:?}, ffmpeg as a player clean",
        audio.len()
    );
}

/// A radio whose input has no port for titles (MP3 on stdin, as `ffmpeg … | gridcast
/// broadcast` runs it) sets them on the broadcast's admin listener, with the source password;
/// a broadcast with no password refuses them there.
#[test]
fn titles_set_on_the_admin_listener_reach_listeners_of_a_radio_on_stdin() {
    if !have_ffmpeg() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let admin_port = common::http::free_tcp_port();
    let mut source = loopback_source(&key, 2);
    source
        .args(["--admin", &format!("127.0.0.1:{admin_port}")])
        .env("GRIDCAST_SOURCE_PASSWORD", "hackme")
        .stdin(Stdio::piped());
    let (mut source, source_link) = spawn_with_link(source);
    let ffmpeg = tone("libmp3lame")
        .args(["-b:a", "128k", "-f", "mp3", "-"])
        .stdout(source.stdin.take().unwrap())
        .spawn()
        .unwrap();
    let (peer, url) = spawn_with_line(gridcast(&[
        "play",
        &source_link,
        "--output",
        "http://127.0.0.1:0/",
    ]));
    // Killed and reaped if an assertion fails, so none holds the harness's output open.
    let mut procs = Reaper(vec![source, ffmpeg, peer]);
    let [source, ffmpeg, peer] = &mut procs.0[..] else {
        unreachable!()
    };
    thread::sleep(Duration::from_secs(1));
    let icy = http_player_asking(&url, "HTTP/1.1", true);
    thread::sleep(Duration::from_secs(1));
    // source:hackme, and a wrong password; any mount (stdin has none), or none.
    let (good, bad) = ("c291cmNlOmhhY2ttZQ==", "c291cmNlOmhhY2ttZg==");
    let first = "/admin/metadata?mode=updinfo&mount=/stream&song=Nina+Simone+-+Sinnerman";
    assert_eq!(
        set_song(admin_port, first, Some(bad)),
        "HTTP/1.0 401 Unauthorized"
    );
    assert_eq!(set_song(admin_port, first, Some(good)), "HTTP/1.0 200 OK");
    thread::sleep(Duration::from_secs(3));
    assert_eq!(
        set_song(
            admin_port,
            "/admin.cgi?pass=hackme&mode=updinfo&song=Miles+Davis+-+So+What",
            None
        ),
        "HTTP/1.0 200 OK"
    );
    thread::sleep(Duration::from_secs(1));
    // The source's own view of the channel names the title it signed.
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let (status, channels) = common::http::get(admin, "/debug/channels").unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&channels).unwrap();
    assert_eq!(
        json["workers"][0]["channels"][0]["title"], "Miles Davis - So What",
        "{channels}"
    );
    assert!(ffmpeg.wait().unwrap().success(), "ffmpeg failed");
    assert!(source.wait().unwrap().success(), "broadcast failed");
    // The broadcast is over: the listener's stream ends (it does not wait in silence), and a
    // listener that comes now is told so, while `play` still runs.
    let over = std::time::Instant::now();
    while !icy.is_finished() && over.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        icy.is_finished(),
        "the listener's stream did not end with the broadcast"
    );
    let output: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let (status, body) = common::http::get(output, "/").unwrap();
    assert_eq!(status, 503, "{body}");
    signal(peer, "-TERM");
    assert!(peer.wait().unwrap().success(), "play failed");
    let (_, audio, titles) = icy_listened(icy);
    assert_eq!(
        titles,
        ["Nina Simone - Sinnerman", "Miles Davis - So What"],
        "the titles a listener saw"
    );
    assert!(audio.len() > 50_000, "only {} bytes", audio.len());

    // Without a source password the route refuses every update, and says why.
    let admin_port = common::http::free_tcp_port();
    let mut open = loopback_source(&key, 0);
    open.args(["--admin", &format!("127.0.0.1:{admin_port}")])
        .env_remove("GRIDCAST_SOURCE_PASSWORD")
        .stdin(Stdio::piped());
    let (open, _) = spawn_with_link(open);
    let mut procs = Reaper(vec![open]);
    let open = &mut procs.0[0];
    assert_eq!(
        set_song(
            admin_port,
            "/admin/metadata?mode=updinfo&song=x",
            Some(good)
        ),
        "HTTP/1.0 403 Forbidden"
    );
    drop(open.stdin.take());
    assert!(open.wait().unwrap().success(), "broadcast failed");
}
