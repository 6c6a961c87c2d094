//! The deploy files, checked the way their tools check them: the systemd unit by
//! `systemd-analyze verify` (any warning fails: it exits 0 on unknown keys) and `security`,
//! the compose file by `docker-compose config`, the Kubernetes manifests by
//! `kubernetes-validate --strict`, the Prometheus configs by `promtool check config`, and the
//! sample relay settings by `gridcast relay --check-config`, with every option of `relay`
//! documented in them. The container's seccomp profile must allow io_uring and pinning.
//!
//! A tool that is missing skips its check with a message, unless
//! `GRIDCAST_REQUIRE_DEPLOY_TOOLS=1` (CI) makes that a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::procs::gridcast;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// Whether `tool` runs; if not, a failure in CI, else a skip.
fn have(tool: &str, probe: &[&str]) -> bool {
    common::procs::have_tool(tool, probe, "GRIDCAST_REQUIRE_DEPLOY_TOOLS")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A link that resolves (the settings check does not dial it).
fn a_link() -> String {
    let dir = tempfile::tempdir().unwrap();
    let key = common::procs::keygen(dir.path());
    let out = gridcast(&["channel-id", key.to_str().unwrap()])
        .output()
        .unwrap();
    let channel = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let node = gridcast(&["node-id", key.to_str().unwrap()])
        .output()
        .unwrap();
    let node = String::from_utf8(node.stdout).unwrap().trim().to_owned();
    format!("gridcast://{channel}@127.0.0.1:4433/{node}")
}

#[test]
fn the_sample_relay_settings_check_and_document_every_option() {
    let sample = deploy("relay.toml");
    let out = gridcast(&[
        "relay",
        "--check-config",
        "--config",
        sample.to_str().unwrap(),
        "--join",
        &a_link(),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("config ok"));
    // Every long option of `relay` is a key of the sample (commented or not).
    let help = gridcast(&["relay", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let sample_text = std::fs::read_to_string(&sample).unwrap();
    // Options every command takes (logging) are not relay settings.
    let global = gridcast(&["--help"]).output().unwrap();
    let global = String::from_utf8(global.stdout).unwrap();
    let mut options = 0;
    for word in help.split_whitespace() {
        let Some(option) = word.strip_prefix("--") else {
            continue;
        };
        let option = option.trim_end_matches([',', '.', ')']);
        if matches!(option, "config" | "check-config" | "help" | "")
            || option.contains('=')
            || global.contains(&format!("--{option} "))
        {
            continue;
        }
        options += 1;
        let key = option.replace('-', "_");
        assert!(
            sample_text.lines().any(|l| l
                .trim_start_matches(['#', ' '])
                .starts_with(&format!("{key} ="))),
            "deploy/relay.toml does not document {key}"
        );
    }
    assert!(
        options >= 15,
        "only {options} options found in relay --help"
    );
    // A wrong key or value names itself, and the check fails.
    let dir = tempfile::tempdir().unwrap();
    for (bad, named) in [
        ("max_uplaod = \"1M\"\n", "max_uplaod"),
        ("workers = \"two\"\n", "workers"),
        ("admin = \"anywhere\"\n", "admin"),
        (
            "advertise = [\"203.0.113.7:4434\", \"nowhere\"]\n",
            "advertise",
        ),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, bad).unwrap();
        let out = gridcast(&[
            "relay",
            "--check-config",
            "--config",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
        assert!(!out.status.success());
        assert!(text(&out).contains(named), "{bad}: {}", text(&out));
    }
    // The other roles check too, and a source's password is never printed.
    let key = tempfile::tempdir().unwrap();
    let key = common::procs::keygen(key.path());
    let out = gridcast(&[
        "broadcast",
        "--check-config",
        "--key",
        key.to_str().unwrap(),
        "--source-password",
        "hunter2",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("hunter2"));
    let out = gridcast(&["play", "--check-config", &a_link()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(deploy("systemd/gridcast-relay.service")).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "DynamicUser=yes",
        "StateDirectory=gridcast",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "LimitMEMLOCK=",
        "SystemCallFilter=@system-service",
        "Restart=on-failure",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    // These would break io_uring's pinning or the port binding.
    for line in unit.lines().filter(|l| !l.starts_with('#')) {
        assert!(!line.contains("~@resources"), "{line}: breaks CPU pinning");
        assert!(!line.starts_with("PrivateUsers"), "{line}");
    }
    if !have("systemd-analyze", &["--version"]) {
        return;
    }
    // `verify` needs the binaries to exist: point them at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("gridcast-relay.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/gridcast", env!("CARGO_BIN_EXE_gridcast")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&copy)
        .output()
        .unwrap();
    let report = text(&out);
    assert!(out.status.success(), "exposure above 2.0: {report}");
    let level = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("");
    println!("systemd-analyze security: {}", level.trim());
}

#[test]
fn the_container_files_allow_io_uring_and_validate() {
    let containerfile = std::fs::read_to_string(deploy("Containerfile")).unwrap();
    assert!(
        containerfile.matches("\nFROM ").count() >= 2,
        "not multi-stage"
    );
    assert!(containerfile.contains("USER 10001"), "runs as root");
    assert!(containerfile.contains("EXPOSE 4434/udp"));
    let profile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("seccomp-iouring.json")).unwrap())
            .unwrap();
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    let allowed: Vec<&str> = profile["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW")
        .flat_map(|r| r["names"].as_array().unwrap())
        .map(|n| n.as_str().unwrap())
        .collect();
    for needed in [
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "sched_setaffinity",
        "sendmsg",
        "recvmsg",
        "epoll_wait",
        "execve",
    ] {
        assert!(allowed.contains(&needed), "the profile refuses {needed}");
    }
    if have("docker-compose", &["version"]) {
        // Paths in it are relative to the directory it is run from, as `docker compose` does.
        let out = Command::new("docker-compose")
            .current_dir(deploy(""))
            .arg("-f")
            .arg(deploy("compose.yaml"))
            .args(["config", "--quiet"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker-compose config: {}",
            text(&out)
        );
    }
    if have("promtool", &["--version"]) {
        for config in ["prometheus.yml", "compose-prometheus.yml"] {
            let out = Command::new("promtool")
                .args(["check", "config"])
                .arg(deploy(config))
                .output()
                .unwrap();
            assert!(out.status.success(), "{config}: {}", text(&out));
        }
    }
}

#[test]
fn the_kubernetes_manifests_validate() {
    let manifest = std::fs::read_to_string(deploy("k8s/relay.yaml")).unwrap();
    for needed in [
        "hostNetwork: true",
        "path: /livez",
        "path: /readyz",
        "localhostProfile: profiles/gridcast-iouring.json",
        "runAsNonRoot: true",
    ] {
        assert!(manifest.contains(needed), "relay.yaml lacks {needed}");
    }
    if !have("kubernetes-validate", &["--version"]) {
        return;
    }
    for file in ["k8s/relay.yaml", "k8s/podmonitor.yaml"] {
        let out = Command::new("kubernetes-validate")
            .arg("--strict")
            .arg(deploy(file))
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {}", text(&out));
        assert!(!text(&out).contains("FAILED"), "{file}: {}", text(&out));
    }
}
