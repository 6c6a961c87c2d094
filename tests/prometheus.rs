//! A real Prometheus (Debian's package) scrapes a real source, relay and player every second,
//! all on loopback; once every target is up and a few scrapes are in, every query of every
//! Grafana dashboard goes through Prometheus's HTTP API and must succeed with at least one
//! series. `deploy/prometheus.yml` must pass `promtool check config`.
//!
//! Needs ffmpeg and prometheus; skipped with a message when missing unless
//! `GRIDCAST_REQUIRE_FFMPEG=1` / `GRIDCAST_REQUIRE_PROMETHEUS=1` (CI) make that a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::catalog::{dashboard_queries, substitute};
use common::http::{free_tcp_port, get, poll};
use common::procs::*;

fn have_prometheus() -> bool {
    let found = ["prometheus", "promtool"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        assert!(
            !std::env::var("GRIDCAST_REQUIRE_PROMETHEUS").is_ok_and(|v| v == "1"),
            "prometheus is required (GRIDCAST_REQUIRE_PROMETHEUS=1) but not installed"
        );
        println!("prometheus not installed: skipping");
    }
    found
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[test]
fn deploy_prometheus_config_is_valid() {
    if !have_prometheus() {
        return;
    }
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/prometheus.yml"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_real_prometheus_answers_every_dashboard_query_from_real_nodes() {
    if !have_prometheus() || !have_ffmpeg() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let admins: Vec<SocketAddr> = (0..3)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_tcp_port())))
        .collect();
    let live = Live::start(
        gridcast(&[
            "broadcast",
            "--key",
            key.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_udp_port()),
            "--admin",
            &admins[0].to_string(),
            "--linger",
            "1",
        ]),
        30,
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
        &admins[1].to_string(),
    ]));
    let player = gridcast(&[
        "play",
        &relay_link,
        "--output",
        dir.path().join("out.ts").to_str().unwrap(),
        "--admin",
        &admins[2].to_string(),
    ])
    .spawn()
    .unwrap();
    let prom_addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let targets: Vec<String> = admins.iter().map(|a| format!("'{a}'")).collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: gridcast\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let children = Reaper(vec![relay, player, prometheus]);
    let ready = poll(prom_addr, "/-/ready", Duration::from_secs(30), |s, _| {
        s == 200
    });
    assert_eq!(ready.map(|r| r.0), Some(200), "prometheus never got ready");
    // Every target up.
    let up = poll(
        prom_addr,
        "/api/v1/targets",
        Duration::from_secs(30),
        |_, body| body.matches("\"health\":\"up\"").count() == 3,
    )
    .unwrap();
    assert_eq!(
        up.1.matches("\"health\":\"up\"").count(),
        3,
        "targets not up: {}",
        up.1
    );
    // Rates need two scrapes inside their window; give them a few.
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(6));
    let queries = dashboard_queries();
    let mut empty = Vec::new();
    for (file, panel, expr) in &queries {
        let query = substitute(expr);
        let path = format!("/api/v1/query?query={}", encode(&query));
        let (status, body) = get(prom_addr, &path).expect("prometheus answers");
        assert_eq!(status, 200, "{file} / {panel}: {query}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["status"], "success", "{file} / {panel}: {body}");
        if json["data"]["result"].as_array().is_none_or(Vec::is_empty) {
            empty.push(format!("{file} / {panel}: {query}"));
        }
    }
    println!(
        "prometheus: {} dashboard queries answered {:?} after the targets came up",
        queries.len(),
        started.elapsed()
    );
    assert!(empty.is_empty(), "queries with no series: {empty:#?}");
    drop(children);
    // The source and its encoder are killed with it: the stream has done its job.
    drop(live);
}
