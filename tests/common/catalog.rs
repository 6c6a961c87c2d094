//! The metrics catalog (`docs/metrics.md`) and the dashboards' queries, as tests read them.

use std::collections::{BTreeMap, BTreeSet};

/// One family as the catalog or a scrape gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub kind: String,
    pub labels: BTreeSet<String>,
}

/// `docs/metrics.md`: name → (family, roles).
pub fn catalog() -> BTreeMap<String, (Family, BTreeSet<String>)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let name = cells[0]
            .trim_start_matches("| ")
            .trim_matches('`')
            .to_owned();
        let labels = if cells[3] == "-" {
            BTreeSet::new()
        } else {
            cells[3]
                .split(", ")
                .map(|l| l.trim_matches('`').to_owned())
                .collect()
        };
        let roles: BTreeSet<String> = if cells[4] == "all" {
            ["source", "relay", "peer"].map(str::to_owned).into()
        } else {
            cells[4].split(", ").map(str::to_owned).collect()
        };
        let family = Family {
            kind: cells[1].to_owned(),
            labels,
        };
        assert!(
            out.insert(name.clone(), (family, roles)).is_none(),
            "{name} twice in the catalog"
        );
    }
    assert!(out.len() > 40, "the catalog table did not parse");
    out
}

/// Every query of every dashboard in `grafana/dashboards/`: (dashboard file, panel title,
/// expression as written).
pub fn dashboard_queries() -> Vec<(String, String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "no dashboards in {dir}");
    let mut out = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let mut panels: Vec<serde_json::Value> =
            json["panels"].as_array().cloned().unwrap_or_default();
        while let Some(panel) = panels.pop() {
            // Rows nest panels.
            panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
            let title = panel["title"].as_str().unwrap_or("").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((name.clone(), title.clone(), expr.to_owned()));
                }
            }
        }
    }
    out
}

/// A dashboard query as Prometheus runs it: Grafana's macros and variables replaced.
pub fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("$instance", ".+")
}
