//! The admin listener of real processes: a source fed by ffmpeg, a relay on two workers and
//! a player, each with `--admin` on loopback. Their scrapes must hold exactly the families of
//! `docs/metrics.md` (name, type, label names, which roles), `promtool check metrics` must
//! accept each, the traffic counters must show the stream flowing, and health must say the
//! truth: live and ready while served, the relay not ready (naming the channel) once its
//! source is gone.
//!
//! Needs ffmpeg, and promtool (Debian's `prometheus`) for the lint; each is skipped with a
//! message when missing unless `GRIDCAST_REQUIRE_FFMPEG=1` / `GRIDCAST_REQUIRE_PROMETHEUS=1`
//! (CI) make that a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::catalog::{Family, catalog};
use common::http::{free_tcp_port, get, poll};
use common::procs::*;

/// A scrape's families; also checks that every family has HELP and TYPE.
fn families(scrape: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            out.insert(
                name.to_owned(),
                Family {
                    kind: kind.to_owned(),
                    labels: BTreeSet::new(),
                },
            );
        } else if !line.is_empty() && !line.starts_with('#') {
            let name_end = line.find(['{', ' ']).unwrap();
            let mut name = &line[..name_end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix)
                    && out.get(base).is_some_and(|f| f.kind == "histogram")
                {
                    name = base;
                }
            }
            let family = out
                .get_mut(name)
                .unwrap_or_else(|| panic!("sample {name} before its TYPE"));
            if let Some(open) = line.find('{') {
                let close = line.rfind('}').unwrap();
                for pair in line[open + 1..close].split(',') {
                    let key = pair.split('=').next().unwrap();
                    if key != "le" {
                        family.labels.insert(key.to_owned());
                    }
                }
            }
        }
    }
    for name in out.keys() {
        assert!(helped.contains(name), "{name} has no HELP");
    }
    out
}

/// Value of the first sample of `name` whose line contains `filter`.
fn value(scrape: &str, name: &str, filter: &str) -> f64 {
    scrape
        .lines()
        .find(|l| {
            l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(filter)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} {filter}"))
}

fn have_promtool() -> bool {
    have_tool("promtool", &["--version"], "GRIDCAST_REQUIRE_PROMETHEUS")
}

fn promtool_accepts(scrape: &str, who: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the {who}'s scrape: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn admin(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn every_role_exports_exactly_the_catalog_and_health_tells_the_truth() {
    if !have_ffmpeg() {
        return;
    }
    let lint = have_promtool();
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let ports = [free_tcp_port(), free_tcp_port(), free_tcp_port()];
    let [source_admin, relay_admin, player_admin] = ports.map(admin);
    let live = Live::start(
        gridcast(&[
            "broadcast",
            "--key",
            key.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_udp_port()),
            "--admin",
            &source_admin.to_string(),
            "--linger",
            "1",
        ]),
        12,
    );
    let (relay, relay_link) = spawn_with_link(gridcast(&[
        "relay",
        "--join",
        &live.link,
        "--listen",
        &format!("127.0.0.1:{}", free_udp_port()),
        "--workers",
        "2",
        "--admin",
        &relay_admin.to_string(),
    ]));
    let out = dir.path().join("played.ts");
    let player = gridcast(&[
        "play",
        &relay_link,
        "--output",
        out.to_str().unwrap(),
        "--admin",
        &player_admin.to_string(),
    ])
    .spawn()
    .unwrap();
    let children = Reaper(vec![relay, player]);
    // Served: the player has played chunks.
    let played = |_: u16, body: &str| {
        body.lines().any(|l| {
            l.starts_with("gridcast_player_chunks_total{result=\"played\"}") && !l.ends_with(" 0")
        })
    };
    let (_, player_scrape) =
        poll(player_admin, "/metrics", Duration::from_secs(15), played).expect("player scrape");
    assert!(played(200, &player_scrape), "the player played nothing");
    let scrapes = [
        ("source", get(source_admin, "/metrics").unwrap().1),
        ("relay", get(relay_admin, "/metrics").unwrap().1),
        ("peer", player_scrape),
    ];
    let catalog = catalog();
    let mut seen = BTreeSet::new();
    for (role, scrape) in &scrapes {
        let got = families(scrape);
        let expected: BTreeMap<&String, &Family> = catalog
            .iter()
            .filter(|(_, (_, roles))| roles.contains(*role))
            .map(|(n, (f, _))| (n, f))
            .collect();
        let got_names: BTreeSet<&String> = got.keys().collect();
        let expected_names: BTreeSet<&String> = expected.keys().copied().collect();
        assert_eq!(
            got_names
                .symmetric_difference(&expected_names)
                .collect::<Vec<_>>(),
            Vec::<&&String>::new(),
            "the {role}'s families and the catalog's differ"
        );
        for (name, family) in &got {
            assert_eq!(family, expected[name], "{role}: {name}");
        }
        seen.extend(got.into_keys());
        if lint {
            promtool_accepts(scrape, role);
        }
    }
    assert_eq!(seen.len(), catalog.len(), "a catalog row no role exports");
    // The stream flows through the relay and its counters say so.
    let relay_scrape = &scrapes[1].1;
    assert!(value(relay_scrape, "gridcast_sent_shard_bytes_total", "") > 0.0);
    assert!(
        value(
            relay_scrape,
            "gridcast_udp_received_bytes_total",
            "worker=\"0\""
        ) > 0.0
    );
    assert_eq!(value(relay_scrape, "gridcast_workers", ""), 2.0);
    assert_eq!(value(relay_scrape, "gridcast_subscribers", ""), 1.0);
    assert_eq!(
        value(relay_scrape, "gridcast_verify_failures_total", ""),
        0.0
    );
    assert!(value(&scrapes[0].1, "gridcast_source_chunks_published_total", "") > 0.0);
    assert_eq!(
        value(&scrapes[0].1, "gridcast_source_encoder_connected", ""),
        1.0
    );
    // Health while served.
    for addr in [source_admin, relay_admin, player_admin] {
        assert_eq!(get(addr, "/livez").unwrap(), (200, "live\n".to_owned()));
        let (status, body) = get(addr, "/readyz").unwrap();
        assert_eq!(status, 200, "{addr}: {body}");
    }
    let (status, channels) = get(relay_admin, "/debug/channels").unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&channels).unwrap();
    assert_eq!(json["workers"].as_array().unwrap().len(), 2);
    assert_eq!(json["workers"][0]["channels"][0]["mode"], "relay");
    assert_eq!(get(relay_admin, "/nothing").unwrap().0, 404);
    // The source ends (SIGKILL after the stream): the relay stops being ready and says why.
    let reference = live.finish();
    assert!(!reference.is_empty());
    let (status, why) = poll(relay_admin, "/readyz", Duration::from_secs(15), |s, _| {
        s == 503
    })
    .expect("relay readyz");
    assert_eq!(
        status, 503,
        "the relay stayed ready without a source: {why}"
    );
    assert!(why.contains("no parent delivers"), "{why}");
    assert_eq!(get(relay_admin, "/livez").unwrap().0, 200, "still live");
    drop(children);
}
