//! The agent is killed (SIGKILL) mid-download after a durable checkpoint, then started
//! again: the killed run left slot B unbootable, and the next `apply` resumes from the
//! checkpoint with a Range request and installs exactly.
//!
//! The killed agent must be a separate process, so this file has its own `main` (no libtest
//! harness): run with the environment variable `E2E_CHILD_CONFIG` set, the binary is that
//! agent (`apply` with the given config); otherwise it runs the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{apply_default, assert_slot_holds, image_path, snapshot, state, world};
use server_mock::{Fault, FaultRule};
use update_agent::boot::SlotId;
use update_agent::config::{Config, ConfigSources};
use update_agent::host::Host;
use update_agent::install::{ResumeRecord, DEFAULT_CHECKPOINT_BYTES};
use update_agent::ops::apply::{apply, ApplyOptions};
use update_agent::ops::resume::RESUME_FILE;
use update_agent::state::Phase;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, PublishSpec};
use updater_proto::Compression;

const CHILD_ENV: &str = "E2E_CHILD_CONFIG";
const MIB: u64 = 1 << 20;

fn main() {
    if let Ok(config) = std::env::var(CHILD_ENV) {
        child_apply(Path::new(&config));
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let name = "killed_mid_download_then_restarted_resumes_from_the_checkpoint";
    // Honour libtest's `--list` and a name filter, so `cargo test <filter>` behaves.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{name}: test");
        return;
    }
    // `--skip PATTERN` takes a value, which is not a filter.
    let mut filters: Vec<&String> = Vec::new();
    let mut skips: Vec<&String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--skip" {
            skips.extend(it.next());
        } else if !a.starts_with('-') {
            filters.push(a);
        }
    }
    let skipped = skips.iter().any(|s| name.contains(s.as_str()));
    if skipped || (!filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str()))) {
        println!("test result: ok. 0 passed; 1 filtered out");
        return;
    }
    println!("test {name} ...");
    rt.block_on(killed_mid_download_then_restarted_resumes_from_the_checkpoint());
    println!("test {name} ... ok");
}

/// The agent process: `update-agent apply` with `config`.
fn child_apply(config: &Path) {
    let sources = ConfigSources {
        main: Some(config.to_path_buf()),
        dropin_dirs: Vec::new(),
    };
    let host = Host::open(Config::load(&sources).unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(apply(&host, &ApplyOptions::default(), &mut |_| {}));
    // Only reached if the parent did not kill us, which fails the parent's test.
    eprintln!("child apply finished: {:?}", result.map(|r| r.render()));
}

/// The checkpoint of `usr` once one has been written.
fn checkpoint(state_dir: &Path) -> Option<ResumeRecord> {
    let bytes = std::fs::read(state_dir.join(RESUME_FILE)).ok()?;
    let records: Vec<ResumeRecord> = serde_json::from_slice(&bytes).ok()?;
    records.into_iter().find(|r| r.role == "usr")
}

async fn killed_mid_download_then_restarted_resumes_from_the_checkpoint() {
    let (_d, mut world) = world(Preset::Flatcar, Backend::Gptprio, 112).await;
    let release = world
        .publish_with(&PublishSpec::new("2.0.0").compression(Compression::None))
        .unwrap();
    let size = release.images[0].size;
    assert_eq!(size, 84 * MIB);
    let a_before = snapshot(&world, SlotId::A);
    // The server sends 70 MiB and then nothing: the agent is past its 64 MiB checkpoint
    // and waiting when it is killed.
    let path = image_path(&release, "usr");
    world
        .server
        .set_fault(FaultRule::new(path.as_str(), Fault::StallAfter(70 * MIB)).times(1));

    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, &world.config_path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let rec = loop {
        if let Some(r) = checkpoint(&world.state_dir) {
            if r.written >= DEFAULT_CHECKPOINT_BYTES {
                break r;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the agent exited ({status}) before writing a checkpoint");
        }
        assert!(Instant::now() < deadline, "no checkpoint within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "{status}");
    assert_eq!(rec.written, DEFAULT_CHECKPOINT_BYTES);
    assert!(rec.resumable, "{rec:?}");

    // What the killed agent left: a Downloading record, slot B disabled, slot A as it was.
    assert!(
        matches!(state(&world).phase, Phase::Downloading { .. }),
        "{:?}",
        state(&world).phase
    );
    assert_eq!(snapshot(&world, SlotId::A), a_before, "slot A changed");
    assert_eq!(
        world.boot().unwrap(),
        Some(SlotId::A),
        "the half-written B booted"
    );

    // The agent starts again.
    world.server.clear_log();
    world.server.clear_faults();
    let report = apply_default(&world).await.unwrap();
    assert_eq!(report.targets[0].resumed_from, rec.written, "{report:?}");
    assert_eq!(report.targets[0].bytes_fetched, size - rec.written);
    let log: Vec<_> = world
        .server
        .request_log()
        .into_iter()
        .filter(|e| e.path == path)
        .collect();
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(
        log[0].range.as_deref(),
        Some(format!("bytes={}-", rec.written).as_str())
    );
    assert_eq!(log[0].status, 206);
    assert_eq!(snapshot(&world, SlotId::A), a_before, "slot A changed");
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_slot_holds(&world, SlotId::B, &release);
}
