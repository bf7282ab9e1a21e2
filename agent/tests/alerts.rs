//! Issue 14 item 11: the alerting rules and the Grafana dashboard in docs/monitoring/ speak
//! the agent's real metrics. Every `update_agent_*` name they use is a family the agent's own
//! renderer writes, with the labels it writes; `promtool check rules` accepts the rules and
//! every dashboard query; `promtool test rules` proves each alert fires on such series and
//! stays silent on healthy ones; `promtool check metrics` lints the agent's real output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use update_agent::boot::SlotId;
use update_agent::fleet::metrics::{render, Counters, Live};
use update_agent::state::{Phase, SlotRecord, State};

fn monitoring() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring")
}

/// `promtool` runs; under `CI=true` its absence fails the test.
fn have_promtool() -> bool {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is required under CI: apt-get install -y prometheus"
        );
        eprintln!("skipping: promtool not found (apt-get install -y prometheus)");
    }
    found
}

/// The agent's real metrics with every family present (all optional values set).
fn real_metrics() -> String {
    let mut c = Counters {
        checks_total: 4,
        check_failures_total: 1,
        last_check_unix: Some(1_700_000_000),
        last_success_unix: Some(1_700_000_000),
        downloaded_bytes_total: 1 << 20,
        installs_total: 1,
        last_install_seconds: Some(12.5),
        ..Counters::default()
    };
    c.failures_by_kind.insert("connect".into(), 2);
    let mut state = State {
        phase: Phase::Trial {
            slot: SlotId::B,
            version: "2.0.0".into(),
            boot_id: "x".into(),
        },
        ..State::default()
    };
    state.slots.insert(
        SlotId::A,
        SlotRecord {
            version: "1.0.0".into(),
            image_sha256s: Vec::new(),
            verified: true,
        },
    );
    let live = Live {
        wave_seed: Some(7),
        eligible_from: Some(1_700_000_000),
        fleetlock_held: true,
        running_version: Some("1.0.0".into()),
    };
    render(&c, &state, &live)
}

/// Family name -> label names, from the agent's real output.
fn families(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            out.entry(rest.split(' ').next().unwrap().to_string())
                .or_default();
        } else if !l.starts_with('#') {
            let name = l.split(['{', ' ']).next().unwrap();
            if let Some((_, labels)) = l.split_once('{') {
                let labels = labels.split('}').next().unwrap();
                for pair in labels.split(',') {
                    let key = pair.split('=').next().unwrap().to_string();
                    out.entry(name.to_string()).or_default().insert(key);
                }
            }
        }
    }
    out
}

/// Every `update_agent_*` identifier in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("update_agent_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn rules_tests_and_dashboard_use_only_real_metric_names_and_labels() {
    let real = families(&real_metrics());
    assert!(real.len() >= 15, "{real:?}");
    for file in [
        "update-agent.rules.yml",
        "update-agent.rules.test.yml",
        "update-agent-dashboard.json",
    ] {
        let text = std::fs::read_to_string(monitoring().join(file)).unwrap();
        let used = names_in(&text);
        assert!(!used.is_empty(), "{file}");
        for name in &used {
            assert!(
                real.contains_key(name),
                "{file}: {name} is not a metric the agent writes"
            );
        }
    }
    // The unit tests' input series carry the labels the agent writes (plus the scrape's).
    let tests = std::fs::read_to_string(monitoring().join("update-agent.rules.test.yml")).unwrap();
    for line in tests.lines().filter(|l| l.contains("series: '")) {
        let series = line.split('\'').nth(1).unwrap();
        let (name, labels) = series.split_once('{').unwrap();
        for pair in labels.trim_end_matches('}').split(',') {
            let key = pair.split('=').next().unwrap();
            assert!(
                key == "instance" || key == "job" || real[name].contains(key),
                "{series}: the agent writes no label {key} on {name}"
            );
        }
    }
}

#[test]
fn dashboard_is_grafana_json_with_a_query_per_panel() {
    let text = std::fs::read_to_string(monitoring().join("update-agent-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["uid"], "update-agent-fleet");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert!(t["expr"].as_str().unwrap().contains("update_agent_"), "{t}");
        }
    }
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    if !have_promtool() {
        return;
    }
    let run = |args: &[&str]| {
        let o = Command::new("promtool")
            .args(args)
            .current_dir(monitoring())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&["check", "rules", "update-agent.rules.yml"]);
    run(&["test", "rules", "update-agent.rules.test.yml"]);
}

#[test]
fn promtool_parses_every_dashboard_query() {
    if !have_promtool() {
        return;
    }
    // Each panel query becomes a recording rule, so promtool's parser checks its PromQL.
    let text = std::fs::read_to_string(monitoring().join("update-agent-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap().replace("$job", ".+");
            n += 1;
            rules += &format!(
                "      - record: dashboard:q{n}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard.rules.yml");
    std::fs::write(&path, rules).unwrap();
    let o = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");
}

#[test]
fn promtool_lints_the_agents_real_metrics() {
    if !have_promtool() {
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(real_metrics().as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
