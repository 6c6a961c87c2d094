//! The built `gridcast` binary: `keygen` and `channel-id`, and their error messages.

#![allow(clippy::unwrap_used)] // test helpers: a panic here is a test failure, which is what we want
#![allow(clippy::disallowed_methods)] // the tests time real processes

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use gridcast::keys::ChannelId;

fn gridcast(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gridcast"))
        .args(args)
        .output()
        .expect("run gridcast")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fresh channel key in `dir`, made by `gridcast keygen`.
fn channel_key(dir: &Path) -> std::path::PathBuf {
    let key = dir.join("channel.key");
    assert!(
        gridcast(&["keygen", "--out", path_str(&key)])
            .status
            .success()
    );
    key
}

#[test]
fn keygen_writes_a_private_key_and_prints_a_parseable_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("channel.key");
    let out = gridcast(&["keygen", "--out", path_str(&key)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id_text = String::from_utf8(out.stdout).unwrap();
    let id: ChannelId = id_text.trim().parse().expect("printed id parses");
    let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // channel-id reads the same id back.
    let out = gridcast(&["channel-id", path_str(&key)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        id.to_string()
    );

    // A second keygen refuses to overwrite; --force replaces.
    let before = fs::read(&key).unwrap();
    let out = gridcast(&["keygen", "--out", path_str(&key)]);
    assert_clean_failure(&out, "refusing to overwrite");
    assert_eq!(
        fs::read(&key).unwrap(),
        before,
        "the old key must be untouched"
    );
    let out = gridcast(&["keygen", "--out", path_str(&key), "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(fs::read(&key).unwrap(), before);
}

#[test]
fn bad_key_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.key");
    assert_clean_failure(
        &gridcast(&["channel-id", path_str(&missing)]),
        "missing.key",
    );

    let key = dir.path().join("k");
    assert!(
        gridcast(&["keygen", "--out", path_str(&key)])
            .status
            .success()
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    assert_clean_failure(&gridcast(&["channel-id", path_str(&key)]), "chmod 600");

    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let text = fs::read_to_string(&key).unwrap();
    fs::write(&key, &text[..text.len() / 2]).unwrap();
    assert_clean_failure(&gridcast(&["channel-id", path_str(&key)]), "truncated");

    fs::write(&key, b"\x00\x01garbage").unwrap();
    assert_clean_failure(
        &gridcast(&["channel-id", path_str(&key)]),
        "not a gridcast key file",
    );
}

#[test]
fn io_check_reports_the_backend_and_refuses_unknown_ones() {
    let out = gridcast(&["io-check", "--io-backend", "portable"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "portable: forced by --io-backend portable"
    );
    let out = gridcast(&["io-check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.starts_with("uring: ") || said.starts_with("portable: io_uring unavailable"),
        "{said}"
    );
    let out = gridcast(&["io-check", "--io-backend", "epoll"]);
    assert_clean_failure(&out, "epoll");
}

/// `gridcast demo` as the README runs it (shorter): a real grid on loopback, a supernode
/// killed halfway, every peer byte-exact with no gap. Once per backend (io_uring only where
/// the kernel allows it, unless CI requires it).
#[test]
fn demo_reports_a_perfect_grid_through_a_supernode_kill() {
    let uring = gridcast::driver::uring_available().is_ok()
        || std::env::var("GRIDCAST_REQUIRE_URING").is_ok_and(|v| v == "1");
    let backends: &[&str] = if uring {
        &["uring", "portable"]
    } else {
        &["portable"]
    };
    for backend in backends {
        let out = gridcast(&["demo", "--json", "--duration", "8", "--io-backend", backend]);
        let err = stderr(&out);
        assert!(out.status.success(), "{backend}: {err}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["backend"], *backend, "{report}");
        assert_eq!(report["peers"].as_array().unwrap().len(), 6);
        assert_eq!(report["continuity_min"], 1.0, "{report}");
        assert_eq!(report["byte_exact"], true, "{report}");
        assert_eq!(report["supernodes_killed"], 1);
        // Every peer drew from the killed supernode and had to replace it.
        assert!(report["failovers"].as_u64().unwrap() >= 1, "{report}");
        let delivered = report["delivered_bytes"].as_u64().unwrap();
        let stream = report["stream_bytes"].as_u64().unwrap();
        // Peers join a second in and start at a random-access chunk: most of the stream each.
        assert!(delivered > 6 * stream / 2, "{report}");
        // The supernodes draw 10 of 16 substreams each: the source uploads less than the
        // peers receive.
        assert!(report["source_upload_bytes"].as_u64().unwrap() < delivered);
        assert!(err.contains("killed supernode"), "{err}");
    }
}

/// Bad input to the role commands: a clear message naming the problem, a failing exit, no
/// panic.
#[test]
fn role_commands_name_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.key");
    let out = gridcast(&[
        "broadcast",
        "--key",
        path_str(&missing),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_clean_failure(&out, "nope.key");

    let out = gridcast(&["play", "gridcast://not-a-channel@127.0.0.1:1/x"]);
    assert_clean_failure(&out, "channel id");
    let out = gridcast(&["play", "http://example.com/stream"]);
    assert_clean_failure(&out, "gridcast://");
    let channel = gridcast::keys::ChannelKey::from_seed(&[6; 32]).channel_id();
    let node = gridcast::keys::NodeKey::from_seed(&[6; 32]).node_id();
    let link = format!("gridcast://{channel}@127.0.0.1:9/{node}");
    let out = gridcast(&["play", &link, "--delay-ms", "9000"]);
    assert_clean_failure(
        &out,
        "delay_ms must be at most 5000 (milliseconds), not 9000",
    );

    // A port another process holds.
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().to_string();
    let key = channel_key(dir.path());
    let out = gridcast(&["broadcast", "--key", path_str(&key), "--listen", &port]);
    assert_clean_failure(&out, &format!("cannot serve on {port}"));

    let out = gridcast(&["broadcast", "--key", path_str(&key), "--input", "ftp://x"]);
    assert_clean_failure(&out, "tcp://host:port");
    let out = gridcast(&["broadcast", "--key", path_str(&key), "--chunk-ms", "5000"]);
    assert_clean_failure(
        &out,
        "chunk_ms must be 100 to 2000 (milliseconds), not 5000",
    );

    // A link to a node that is not there: the held port above answers nothing.
    let channel = String::from_utf8(gridcast(&["channel-id", path_str(&key)]).stdout).unwrap();
    let node = gridcast::keys::NodeKey::from_seed(&[5; 32]).node_id();
    let link = format!("gridcast://{}@{port}/{node}", channel.trim());
    let out = gridcast(&[
        "play",
        &link,
        "--output",
        path_str(&dir.path().join("o.ts")),
        "--connect-timeout",
        "2",
    ]);
    assert_clean_failure(&out, "no node of the link answered within 2s for channel");
    assert_clean_failure(&out, &port);

    // Config files: garbage, an unknown key, a bad value; each named with the file.
    let garbage = dir.path().join("garbage.toml");
    std::fs::write(&garbage, [0xff, 0x00, 0x13, b'[', b'[', 0x9c, b'\n']).unwrap();
    let out = gridcast(&["relay", "--config", path_str(&garbage)]);
    assert_clean_failure(&out, "garbage.toml");
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "max_uplaod = \"1M\"\n").unwrap();
    let out = gridcast(&["relay", "--config", path_str(&typo)]);
    assert_clean_failure(&out, "unknown field `max_uplaod`");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("link = \"{link}\"\nupload = \"lots\"\n")).unwrap();
    let out = gridcast(&["play", "--config", path_str(&bad)]);
    assert_clean_failure(&out, "upload");
    let out = gridcast(&["relay", "--config", path_str(&dir.path().join("none.toml"))]);
    assert_clean_failure(&out, "none.toml");

    // An Icecast input without a password.
    let out = gridcast(&[
        "broadcast",
        "--key",
        path_str(&key),
        "--listen",
        "127.0.0.1:0",
        "--input",
        "icecast://127.0.0.1:0/live",
    ]);
    assert_clean_failure(&out, "--source-password");
}

#[test]
fn log_levels_can_be_set_per_module() {
    let dir = tempfile::tempdir().unwrap();
    let key = channel_key(dir.path());
    // An input that ends at once: the broadcast starts, logs and stops.
    let broadcast = |filter: &str| {
        Command::new(env!("CARGO_BIN_EXE_gridcast"))
            .args([
                "broadcast",
                "--key",
                path_str(&key),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--linger", "0"])
            .env("RUST_LOG", filter)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let all = broadcast("info");
    assert!(all.status.success(), "{}", stderr(&all));
    let logs = stderr(&all);
    assert!(logs.contains("gridcast::app::source"), "{logs}");
    assert!(logs.contains("gridcast::driver"), "{logs}");
    // Only the source's module at info; the data plane's lines are gone.
    let some = broadcast("warn,gridcast::app::source=info");
    assert!(some.status.success(), "{}", stderr(&some));
    let logs = stderr(&some);
    assert!(logs.contains("gridcast::app::source"), "{logs}");
    assert!(!logs.contains("gridcast::driver"), "{logs}");
    let bad = broadcast("info,gridcast=loud");
    assert_clean_failure(&bad, "--log-level");
    assert!(
        stderr(&bad).contains("gridcast::node=debug"),
        "{}",
        stderr(&bad)
    );
}

/// Starts `gridcast broadcast` on stdin (kept open, no bytes) on an ephemeral loopback port;
/// returns it, its stdin and its link.
fn idle_source(key: &Path) -> (std::process::Child, std::process::ChildStdin, String) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_gridcast"))
        .args([
            "broadcast",
            "--key",
            path_str(key),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--log-level", "warn"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("gridcast://"), "{line}");
    (child, stdin, line.trim().to_owned())
}

#[test]
fn a_player_asking_for_a_channel_nobody_carries_names_it_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let key = channel_key(dir.path());
    let (mut source, _stdin, link) = idle_source(&key);
    // A valid id of another channel, at the live source's address and node id.
    let other = gridcast::keys::ChannelKey::from_seed(&[42; 32]).channel_id();
    let nodes = link.split_once('@').unwrap().1;
    let wrong = format!("gridcast://{other}@{nodes}");
    let started = std::time::Instant::now();
    let out = gridcast(&[
        "play",
        &wrong,
        "--output",
        path_str(&dir.path().join("o.ts")),
        "--connect-timeout",
        "3",
    ]);
    let took = started.elapsed();
    let _ = source.kill();
    let _ = source.wait();
    assert_clean_failure(&out, &format!("nobody serves channel {other}"));
    assert_clean_failure(&out, "does not carry the channel");
    // It gives up at its timeout, not later (generous: the machine is shared).
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");
}

#[test]
fn a_relay_given_the_wrong_node_id_says_the_proof_failed_and_keeps_trying() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let key = channel_key(dir.path());
    let (mut source, _stdin, link) = idle_source(&key);
    let impostor = gridcast::keys::NodeKey::from_seed(&[7; 32]).node_id();
    let (channel, nodes) = link.split_once('@').unwrap();
    let host = nodes.rsplit_once('/').unwrap().0;
    let wrong = format!("{channel}@{host}/{impostor}");
    let mut relay = Command::new(env!("CARGO_BIN_EXE_gridcast"))
        .args(["relay", "--join", &wrong, "--listen", "127.0.0.1:0"])
        .args(["--workers", "1", "--log-level", "warn"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(4));
    let still_running = relay.try_wait().unwrap().is_none();
    let _ = relay.kill();
    let _ = relay.wait();
    let _ = source.kill();
    let _ = source.wait();
    let mut err = String::new();
    relay
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(still_running, "the relay gave up: {err}");
    let proofs = err
        .matches(&format!("did not prove node id {impostor}"))
        .count();
    assert!(proofs >= 2, "tried {proofs} times in 4 s: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn node_id_prints_the_id_a_link_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.key");
    let key = gridcast::keys::NodeKey::generate().unwrap();
    key.save(&path, false).unwrap();
    let out = gridcast(&["node-id", path_str(&path)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        key.node_id().to_string()
    );
    let out = gridcast(&["node-id", path_str(&dir.path().join("missing.key"))]);
    assert_clean_failure(&out, "missing.key");
}
