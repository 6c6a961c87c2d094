//! The Grafana dashboards against the metrics catalog: every query parses (promql-parser),
//! every metric it names is in `docs/metrics.md` (a histogram by its `_bucket`, `_sum` or
//! `_count` series), every counter is read through `rate()` or `increase()`, every panel
//! uses the provisioned datasource, and dashboard uids are unique.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::collections::BTreeSet;

use common::catalog::{catalog, dashboard_queries, substitute};
use promql_parser::parser::{self, Expr};

/// Every metric `expr` selects, with whether it sits inside `rate()` or `increase()`.
fn selected(expr: &Expr, in_rate: bool, out: &mut Vec<(String, bool)>) {
    match expr {
        Expr::Aggregate(a) => {
            selected(&a.expr, in_rate, out);
            if let Some(p) = &a.param {
                selected(p, in_rate, out);
            }
        }
        Expr::Unary(u) => selected(&u.expr, in_rate, out),
        Expr::Binary(b) => {
            selected(&b.lhs, in_rate, out);
            selected(&b.rhs, in_rate, out);
        }
        Expr::Paren(p) => selected(&p.expr, in_rate, out),
        Expr::Subquery(s) => selected(&s.expr, in_rate, out),
        Expr::VectorSelector(v) => out.push((v.name.clone().unwrap_or_default(), in_rate)),
        Expr::MatrixSelector(m) => out.push((m.vs.name.clone().unwrap_or_default(), in_rate)),
        Expr::Call(c) => {
            let rate = matches!(c.func.name, "rate" | "increase" | "irate");
            for arg in &c.args.args {
                selected(arg, in_rate || rate, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

#[test]
fn every_dashboard_query_parses_and_reads_only_catalogued_metrics_the_right_way() {
    let catalog = catalog();
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let mut used = BTreeSet::new();
    for (file, panel, expr) in &queries {
        let parsed = parser::parse(&substitute(expr))
            .unwrap_or_else(|e| panic!("{file} / {panel}: {expr}: {e}"));
        let mut names = Vec::new();
        selected(&parsed, false, &mut names);
        assert!(
            !names.is_empty(),
            "{file} / {panel}: selects nothing: {expr}"
        );
        for (name, in_rate) in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|b| catalog.get(*b).is_some_and(|(f, _)| f.kind == "histogram"))
                })
                .unwrap_or(&name);
            let (f, _) = catalog
                .get(family)
                .unwrap_or_else(|| panic!("{file} / {panel}: {name} is not in the catalog"));
            if f.kind == "counter" || f.kind == "histogram" {
                assert!(
                    in_rate,
                    "{file} / {panel}: counter {name} read without rate() or increase()"
                );
            }
            used.insert(family.to_owned());
        }
    }
    // The dashboards cover the families an operator looks at first.
    for core in [
        "gridcast_udp_sent_bytes_total",
        "gridcast_subscribers",
        "gridcast_quic_connections",
        "gridcast_subscriber_drops_total",
        "gridcast_verify_failures_total",
        "gridcast_worker_busy_seconds_total",
        "gridcast_quic_rtt_seconds",
        "gridcast_quic_lost_packets_total",
        "gridcast_build_info",
        "gridcast_player_chunks_total",
        "gridcast_player_startup_seconds",
        "gridcast_failovers_total",
        "gridcast_channels",
    ] {
        assert!(used.contains(core), "no dashboard shows {core}");
    }
}

#[test]
fn dashboards_use_the_provisioned_datasource_and_unique_uids() {
    let provisioned = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/grafana/provisioning/datasources/prometheus.yaml"
    ))
    .unwrap();
    assert!(provisioned.contains("uid: prometheus"));
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/dashboards");
    let mut uids = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let uid = json["uid"].as_str().unwrap().to_owned();
        assert!(uids.insert(uid.clone()), "uid {uid} twice");
        assert!(json["id"].is_null(), "{}: id must be null", path.display());
        assert!(json["schemaVersion"].as_u64().is_some());
        for panel in json["panels"].as_array().unwrap() {
            assert_eq!(
                panel["datasource"]["uid"],
                "prometheus",
                "{}: {}",
                path.display(),
                panel["title"]
            );
        }
    }
}
