//! The manifest is fetched and verified once, and the verified manifest is what gets
//! installed: one GET of `manifest.json` in server-mock's request log for a whole daemon
//! cycle (check, admission, install) and for `update-agent apply`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use update_agent::daemon::notify::Notifier;
use update_agent::daemon::{CycleOutcome, Daemon};
use update_agent::state::{Phase, StateStore};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

async fn world(dir: &Path) -> World {
    let mut w = World::create(dir, Preset::Flatcar, Backend::Gptprio, 2)
        .await
        .unwrap();
    w.reboot_by_touching(&dir.join("reboot-requested")).unwrap();
    w.publish("1.1.0", Vec::new()).unwrap();
    w.server.clear_log();
    w
}

/// GETs of `path` in the request log, and GETs of any image file.
fn gets(w: &World, path: &str) -> (usize, usize) {
    let log = w.server.request_log();
    let manifest = log
        .iter()
        .filter(|e| e.method == "GET" && e.path == path)
        .count();
    let images = log
        .iter()
        .filter(|e| e.method == "GET" && e.path.contains(".img"))
        .count();
    (manifest, images)
}

fn staged_version(w: &World) -> Option<String> {
    match StateStore::open(&w.state_dir)
        .unwrap()
        .load()
        .unwrap()
        .phase
    {
        Phase::Staged { version, .. } => Some(version),
        _ => None,
    }
}

#[tokio::test]
async fn a_daemon_cycle_fetches_the_manifest_once_and_installs_what_it_checked() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    let mut daemon = Daemon::new(w.host().unwrap(), Arc::new(Notifier::from_env())).unwrap();
    let outcome = daemon.step().await.unwrap();
    assert!(
        matches!(&outcome, CycleOutcome::Rebooting { version } if version == "1.1.0"),
        "{outcome:?}"
    );
    assert_eq!(staged_version(&w).as_deref(), Some("1.1.0"));
    let (manifest, images) = gets(&w, "/manifest.json");
    assert_eq!(
        manifest,
        1,
        "one cycle (check + install) fetched the manifest {manifest} times: {:?}",
        w.server.request_log()
    );
    assert!(images >= 1, "the cycle installed without fetching an image");
}

// The server runs on this runtime while the test thread waits for the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_fetches_the_manifest_once() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    let out = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&w.config_path)
        .arg("apply")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(staged_version(&w).as_deref(), Some("1.1.0"));
    let (manifest, images) = gets(&w, "/manifest.json");
    assert_eq!(
        manifest,
        1,
        "apply fetched the manifest {manifest} times: {:?}",
        w.server.request_log()
    );
    assert!(images >= 1, "apply installed without fetching an image");
}
