//! Issue 5: `[health]` from the configuration: declared checks (`[[health.checks]]`) run on
//! the trial boot, `reboot_on_failure` decides whether the reboot command runs, and a bad
//! check entry is refused at load time with the key named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;

use update_agent::boot::SlotId;
use update_agent::health::journal::RunOutcome;
use update_agent::ops;
use update_agent::ops::apply::ApplyOptions;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

async fn world(backend: Backend) -> (tempfile::TempDir, World) {
    let dir = tempfile::tempdir().unwrap();
    let world = World::create(dir.path(), Preset::Flatcar, backend, 8)
        .await
        .unwrap();
    (dir, world)
}

async fn install_and_boot(world: &mut World, version: &str) {
    world.publish(version, Vec::new()).unwrap();
    let host = world.host().unwrap();
    ops::apply::apply(&host, &ApplyOptions::default(), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
}

fn checks(entries: &[&[(&str, toml::Value)]]) -> toml::Value {
    toml::Value::Array(
        entries
            .iter()
            .map(|kv| {
                toml::Value::Table(kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
            })
            .collect(),
    )
}

fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn reboot_marker(world: &World) -> std::path::PathBuf {
    let marker = world.dir.join("rebooted");
    world
        .set_config(
            "reboot",
            "command",
            vec!["touch".to_string(), marker.display().to_string()],
        )
        .unwrap();
    marker
}

#[tokio::test(flavor = "multi_thread")]
async fn declared_checks_pass_and_wanted_failures_are_logged() {
    for backend in [Backend::Gptprio, Backend::Grubenv] {
        let (_d, mut world) = world(backend).await;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = closed_port();
        world
            .set_config(
                "health",
                "checks",
                checks(&[
                    &[("http", world.manifest_url().into())],
                    &[("tcp", listener.local_addr().unwrap().to_string().into())],
                    &[
                        ("name", "metrics-exporter".into()),
                        ("tcp", closed.clone().into()),
                        ("required", false.into()),
                        ("timeout", "2s".into()),
                    ],
                ]),
            )
            .unwrap();
        install_and_boot(&mut world, "2.0.0").await;
        let report = world.health_check().unwrap();
        assert_eq!(report.outcome, RunOutcome::Committed, "{}", report.render());
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names[2], "metrics-exporter");
        assert!(
            report.checks[0].status.starts_with("HTTP 200"),
            "{:?}",
            report.checks[0]
        );
        assert!(!report.checks[2].passed && !report.checks[2].required);
        assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_declared_check_rolls_back_and_reboots() {
    let (_d, mut world) = world(Backend::Gptprio).await;
    let marker = reboot_marker(&world);
    let closed = closed_port();
    world
        .set_config(
            "health",
            "checks",
            checks(&[&[("tcp", closed.clone().into())]]),
        )
        .unwrap();
    install_and_boot(&mut world, "2.0.0").await;
    let report = world.health_check().unwrap();
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    assert!(report.rebooting);
    assert!(
        marker.exists(),
        "reboot_on_failure = true ran [reboot] command"
    );
    let reason = report.reason.unwrap();
    assert!(reason.contains(&format!("tcp:{closed}")), "{reason}");
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
}

#[tokio::test(flavor = "multi_thread")]
async fn reboot_on_failure_false_rolls_back_without_rebooting() {
    let (_d, mut world) = world(Backend::Grubenv).await;
    let marker = reboot_marker(&world);
    world
        .set_config("health", "reboot_on_failure", false)
        .unwrap();
    world.add_check(true, "10-fails", "exit 1").unwrap();
    install_and_boot(&mut world, "2.0.0").await;
    let report = world.health_check().unwrap();
    assert_eq!(report.outcome, RunOutcome::RolledBack);
    assert!(!report.rebooting);
    assert!(!marker.exists(), "no reboot was asked for");
    assert!(!report.render().contains("rebooting"));
    // The operator reboots later: the old slot comes up.
    assert_eq!(world.boot().unwrap(), Some(SlotId::A));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_check_entry_is_refused_with_its_key() {
    let (_d, world) = world(Backend::Gptprio).await;
    world
        .set_config(
            "health",
            "checks",
            checks(&[
                &[("unit", "ok.service".into())],
                &[("unit", "a.service".into()), ("http", "http://x/".into())],
            ]),
        )
        .unwrap();
    let err = world.host().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("health.checks[1]") && msg.contains("exactly one"),
        "{msg}"
    );
    assert_eq!(err.kind(), "config_invalid");
    world
        .set_config("health", "checks", checks(&[&[("port", 80.into())]]))
        .unwrap();
    let msg = world.host().unwrap_err().to_string();
    assert!(msg.contains("port"), "{msg}");
}

#[test]
fn config_show_round_trips_declared_checks() {
    let text = r#"
[health]
reboot_on_failure = false

[[health.checks]]
unit = "nginx.service"

[[health.checks]]
name = "api"
http = "http://127.0.0.1:8080/healthz"
required = false
timeout = "10s"
"#;
    let config = update_agent::config::Config::from_toml_str(text).unwrap();
    assert!(!config.health.reboot_on_failure);
    assert_eq!(config.health.checks.len(), 2);
    assert!(config.health.checks[0].required, "required by default");
    assert!(!config.health.checks[1].required);
    let shown = config.to_toml_string().unwrap();
    let again = update_agent::config::Config::from_toml_str(&shown).unwrap();
    assert_eq!(again, config, "{shown}");
}
