//! Issue 9, defects 1-4 and 6, and issue 10 item 5, through the sandbox: each test failed on
//! the tree before its fix.
//!
//! 1. every verified manifest raises the serial floor, whoever fetched it;
//! 2. losing or replacing `state.json` does not lower the bar (running version from the
//!    running system's os-release, a floor kept outside the state record);
//! 3. a crash between the stage and the staged record leaves a record naming the release;
//!    `update-agent state reset` exists and keeps the floor and the denylist;
//! 4. a state directory or record writable by others is refused;
//! 5. a junk signature under a trusted key id is reported by `check`, not a veto;
//! 6. failures keep the kind of their cause.
//!
//! And the daemon fetches and verifies the manifest once per cycle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use update_agent::boot::SlotId;
use update_agent::daemon::notify::Notifier;
use update_agent::daemon::{CycleOutcome, Daemon};
use update_agent::error::AgentError;
use update_agent::ops;
use update_agent::ops::apply::ApplyOptions;
use update_agent::state::{Phase, State, StateStore};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

async fn world(dir: &Path) -> World {
    let w = World::create(dir, Preset::Flatcar, Backend::Gptprio, 2)
        .await
        .unwrap();
    std::fs::write(dir.join("machine-id"), "00112233445566778899aabbccddeeff\n").unwrap();
    w.set_config(
        "daemon",
        "machine_id_path",
        dir.join("machine-id").display().to_string(),
    )
    .unwrap();
    w
}

async fn apply(w: &World) -> Result<SlotId, AgentError> {
    let host = w.host()?;
    ops::apply::apply(&host, &ApplyOptions::default(), &mut |_| {})
        .await
        .map(|r| r.slot)
}

async fn check(w: &World) -> Result<ops::check::CheckReport, AgentError> {
    let host = w.host()?;
    ops::check::check(&host, None, false, false).await
}

fn state(w: &World) -> State {
    StateStore::open(&w.state_dir).unwrap().load().unwrap()
}

fn assert_nothing_installed(w: &World) {
    assert_eq!(
        state(w).slots.get(&SlotId::B),
        None,
        "nothing was installed"
    );
}

fn manifest_bytes(w: &World) -> Vec<u8> {
    std::fs::read(w.repo.join("manifest.json")).unwrap()
}

fn serve_bytes(w: &World, bytes: &[u8]) {
    std::fs::write(w.repo.join("manifest.json"), bytes).unwrap();
}

fn daemon(w: &World) -> Daemon {
    Daemon::new(w.host().unwrap(), Arc::new(Notifier::from_env())).unwrap()
}

/// Install `version`, reboot into it and let the health check commit it.
async fn install_and_commit(w: &mut World, version: &str) -> SlotId {
    w.publish(version, Vec::new()).unwrap();
    let slot = apply(w).await.unwrap();
    assert_eq!(w.boot().unwrap(), Some(slot));
    let report = w.health_check().unwrap();
    assert!(report.healthy(), "{}", report.render());
    slot
}

// ---- Defect 1: the serial floor follows every verified manifest ------------------------

#[tokio::test]
async fn check_raises_the_serial_floor() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    let old = w.publish("1.1.0", Vec::new()).unwrap();
    let old_bytes = manifest_bytes(&w);
    let new = w.publish("1.2.0", Vec::new()).unwrap();
    assert!(new.serial > old.serial);
    let report = check(&w).await.unwrap();
    assert_eq!(report.serial, new.serial);
    // The older, validly signed manifest is replayed: it must not verify again.
    serve_bytes(&w, &old_bytes);
    let err = check(&w).await.unwrap_err();
    assert_eq!(err.kind(), "serial_below_floor", "{err}");
    let err = apply(&w).await.unwrap_err();
    assert_eq!(err.kind(), "serial_below_floor", "{err}");
    assert_nothing_installed(&w);
}

#[tokio::test]
async fn daemon_stopping_at_already_running_raises_the_serial_floor() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.publish("1.1.0", Vec::new()).unwrap();
    let old_bytes = manifest_bytes(&w);
    // The factory release 1.0.0, re-announced under a newer serial.
    w.publish("1.0.0", Vec::new()).unwrap();
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(&outcome, CycleOutcome::UpToDate { reason } if reason.contains("already running")),
        "{outcome:?}"
    );
    serve_bytes(&w, &old_bytes);
    let err = daemon(&w).step().await.unwrap_err();
    assert_eq!(err.kind(), "serial_below_floor", "{err}");
    assert_nothing_installed(&w);
}

// ---- Defect 2: state loss does not re-open downgrades ----------------------------------

#[tokio::test]
async fn deleted_state_file_does_not_admit_a_downgrade() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    let slot = install_and_commit(&mut w, "2.0.0").await;
    assert_eq!(slot, SlotId::B);
    std::fs::remove_file(w.state_dir.join("state.json")).unwrap();
    // A newer serial, validly signed, carrying an older release.
    w.publish("1.5.0", Vec::new()).unwrap();
    let err = apply(&w).await.unwrap_err();
    assert_eq!(err.kind(), "downgrade", "{err}");
    let report = check(&w).await.unwrap();
    assert_eq!(report.running_version.as_deref(), Some("2.0.0"));
    assert_eq!(
        report.refused.as_ref().map(|(k, _)| k.as_str()),
        Some("downgrade")
    );
    // The slot that runs is still the one booting next.
    assert_eq!(w.boot().unwrap(), Some(SlotId::B));
}

#[tokio::test]
async fn state_file_replaced_by_an_older_copy_does_not_lower_the_bar() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    let factory_copy = std::fs::read(w.state_dir.join("state.json")).unwrap();
    w.publish("1.5.0", Vec::new()).unwrap();
    let old_bytes = manifest_bytes(&w);
    install_and_commit(&mut w, "2.0.0").await;
    let floor = state(&w).serial("stable");
    assert!(floor >= 2, "{floor}");
    std::fs::write(w.state_dir.join("state.json"), &factory_copy).unwrap();
    // The older manifest (below the persisted serial) is refused by the floor...
    serve_bytes(&w, &old_bytes);
    let err = apply(&w).await.unwrap_err();
    assert_eq!(err.kind(), "serial_below_floor", "{err}");
    // ...and an older release under a fresh serial by the running version.
    w.publish("1.6.0", Vec::new()).unwrap();
    let err = apply(&w).await.unwrap_err();
    assert_eq!(err.kind(), "downgrade", "{err}");
    assert_eq!(w.boot().unwrap(), Some(SlotId::B));
}

// ---- Defect 3: a crash between the stage and the staged record -------------------------

/// Runs `update-agent apply` in a child that stops right after recording the staging
/// intent (the test hook `staging`), and kills it there: the flags are not written yet.
fn apply_until_staging_intent(w: &World) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&w.config_path)
        .args(["--log", "warn", "apply"])
        .env(update_agent::daemon::TEST_HOLD_ENV, "staging")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let held = line.contains("test-hold staging");
            let _ = tx.send(line);
            if held {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let held = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("test-hold staging") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        held,
        "apply never reached the staging hold (exit {status}); stderr: {seen:?}"
    );
}

/// Release 2.0.0 published and applied up to the staging intent, where the agent died.
async fn crashed_at_the_staging_intent() -> (tempfile::TempDir, World) {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.publish("2.0.0", Vec::new()).unwrap();
    apply_until_staging_intent(&w);
    (dir, w)
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_the_flag_write_keeps_the_release_name_and_denylists_it() {
    let (_dir, w) = crashed_at_the_staging_intent().await;
    let s = state(&w);
    assert_eq!(
        s.slots.get(&SlotId::B).map(|r| r.version.as_str()),
        Some("2.0.0"),
        "the record names what is on slot B before the flags say so: {s:?}"
    );
    // The crash came right after the flag write: stage slot B as the agent was about to.
    let host = w.host().unwrap();
    host.boot_control().unwrap().stage(SlotId::B).unwrap();
    assert_eq!(w.boot().unwrap(), Some(SlotId::B));
    w.add_check(true, "fails", "exit 1").unwrap();
    let report = w.health_check().unwrap();
    assert_eq!(
        report.version.as_deref(),
        Some("2.0.0"),
        "{}",
        report.render()
    );
    assert!(!report.healthy());
    assert!(state(&w).is_denied("2.0.0"), "{:?}", state(&w).denylist);
    assert!(!state(&w).is_denied("unknown"));
    assert_eq!(w.boot().unwrap(), Some(SlotId::A));
    w.clear_checks().unwrap();
    w.health_check().unwrap();
    // No reinstall loop: the daemon refuses the release it rolled back from.
    let outcome = daemon(&w).step().await.unwrap();
    assert!(
        matches!(&outcome, CycleOutcome::UpToDate { reason } if reason.contains("denylist")),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_before_the_flag_write_boots_the_old_slot_and_denylists_nothing() {
    let (_dir, w) = crashed_at_the_staging_intent().await;
    assert_eq!(w.boot().unwrap(), Some(SlotId::A));
    let report = w.health_check().unwrap();
    assert!(report.healthy(), "{}", report.render());
    assert!(state(&w).denylist.is_empty(), "{:?}", state(&w).denylist);
    // The next run installs and stages it for real.
    assert_eq!(apply(&w).await.unwrap(), SlotId::B);
    assert!(matches!(state(&w).phase, Phase::Staged { .. }));
}

// ---- Defect 4: an insecure state directory or record is refused ------------------------

#[tokio::test]
async fn world_writable_state_dir_or_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    let sd = &w.state_dir;
    std::fs::set_permissions(sd, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = w.host().unwrap_err();
    assert_eq!(err.kind(), "state_insecure", "{err}");
    assert!(err.to_string().contains("writable"), "{err}");
    std::fs::set_permissions(sd, std::fs::Permissions::from_mode(0o700)).unwrap();
    let record = sd.join("state.json");
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = w.host().unwrap_err();
    assert_eq!(err.kind(), "state_insecure", "{err}");
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o620)).unwrap();
    assert_eq!(w.host().unwrap_err().kind(), "state_insecure");
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o600)).unwrap();
    w.host().unwrap();
    // Owned by another user (only root can hand a file over; as anyone else the record is
    // already someone else's to begin with).
    if nix::unistd::geteuid().is_root() {
        let other = Some(nix::unistd::Uid::from_raw(4242));
        nix::unistd::chown(&record, other, None).unwrap();
        let err = w.host().unwrap_err();
        assert_eq!(err.kind(), "state_insecure", "{err}");
        assert!(err.to_string().contains("uid 4242"), "{err}");
        nix::unistd::chown(&record, Some(nix::unistd::geteuid()), None).unwrap();
        w.host().unwrap();
    }
}

#[tokio::test]
async fn symlink_to_a_private_state_dir_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    let link = dir.path().join("state-link");
    std::os::unix::fs::symlink(&w.state_dir, &link).unwrap();
    w.set_config("state", "dir", link.display().to_string())
        .unwrap();
    let host = w.host().unwrap();
    assert_eq!(host.state.load().unwrap().phase, state(&w).phase);
    // The link's target decides: a shared target is refused through the link too.
    std::fs::set_permissions(&w.state_dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    assert_eq!(w.host().unwrap_err().kind(), "state_insecure");
}

// ---- Defect 6: each failure keeps the kind of its cause --------------------------------

/// Slot A (booted) loses its "successful" mark: making B unbootable for an install would
/// leave nothing good to boot, so the gptprio backend refuses.
fn unmark_slot_a(w: &World) {
    use update_agent::boot::gptprio::GptPrioFlags;
    use update_agent::disk::{BlockDevice, FileDevice, Gpt};
    let slots = w.slots().unwrap();
    let mut dev = FileDevice::open(&w.disk).unwrap();
    let mut gpt = Gpt::read(&dev).unwrap();
    let n = slots.a.flags_part;
    let old = gpt.partition(n).unwrap().attributes;
    let flags = GptPrioFlags {
        priority: 1,
        tries: 1,
        successful: false,
    };
    gpt.set_attributes(n, flags.to_attributes(old)).unwrap();
    gpt.write(&mut dev).unwrap();
    dev.flush().unwrap();
}

fn failed_kind(w: &World) -> String {
    match &state(w).phase {
        Phase::Failed { kind, .. } => kind.clone(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn boot_refusal_during_install_is_boot_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    unmark_slot_a(&w);
    w.publish("2.0.0", Vec::new()).unwrap();
    let err = apply(&w).await.unwrap_err();
    assert_eq!(err.kind(), "boot_refused", "{err}");
    assert_eq!(failed_kind(&w), "boot_refused");
    let history = state(&w).history;
    assert_eq!(
        history.last().unwrap().error_kind.as_deref(),
        Some("boot_refused")
    );

    // The daemon meets the same refusal: the same kind in its error, the record, the metrics.
    let metrics = dir.path().join("metrics.prom");
    w.set_config("daemon", "metrics_path", metrics.display().to_string())
        .unwrap();
    let err = daemon(&w).step().await.unwrap_err();
    assert_eq!(err.kind(), "boot_refused", "{err}");
    assert_eq!(failed_kind(&w), "boot_refused");
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.lines()
            .any(|l| l == "update_agent_failures_total{kind=\"boot_refused\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn role_mismatch_and_unreadable_manifest_have_their_own_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    let mut release = w.publish("2.0.0", Vec::new()).unwrap();
    let mut extra = release.manifest.images[0].clone();
    extra.role = "firmware".into();
    release.manifest.images.push(extra);
    w.serve_manifest(release.manifest).unwrap();
    let err = apply(&w).await.unwrap_err();
    assert_eq!(err.kind(), "manifest_roles_mismatch", "{err}");

    let host = w.host().unwrap();
    let missing = dir.path().join("no-such-manifest.json");
    let err = ops::check::check(&host, Some(&missing.display().to_string()), false, false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "manifest_unreadable", "{err}");
}

#[tokio::test]
async fn fleet_configuration_errors_keep_the_fleet_kind() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path()).await;
    w.set_config("reboot", "strategy", "fleet_lock").unwrap();
    w.set_config(
        "daemon",
        "machine_id_path",
        dir.path().join("missing-machine-id").display().to_string(),
    )
    .unwrap();
    let mut fl = toml::Table::new();
    fl.insert("url".into(), "http://127.0.0.1:9/".into());
    w.set_config("reboot", "fleet_lock", toml::Value::Table(fl))
        .unwrap();
    let err = Daemon::new(w.host().unwrap(), Arc::new(Notifier::from_env())).unwrap_err();
    assert_eq!(err.kind(), "machine_id", "{err}");
}

// ---- Defect 2: `update-agent state reset`, which the corrupt-record message points to ----

fn cli(w: &World, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&w.config_path)
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn state_reset_keeps_the_floor_and_the_denylist_unless_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    let release = w.publish("2.0.0", Vec::new()).unwrap();
    check(&w).await.unwrap();
    let store = StateStore::open(&w.state_dir).unwrap();
    store
        .update(|s| s.deny_at("1.9.0", "health check failed", jiff::Timestamp::now()))
        .unwrap();

    // A corrupt record: every command names the way out, which exists.
    std::fs::write(store.path(), b"{ not json").unwrap();
    let out = cli(&w, &["status"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("state_corrupt") && stderr.contains("update-agent state reset"),
        "{stderr}"
    );
    let out = cli(&w, &["state", "reset"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The corrupt record's denylist is gone with it, but the floor is kept in floor.json.
    assert_eq!(store.load().unwrap().serial("stable"), release.serial);
    assert_eq!(store.serial_floor("stable").unwrap(), release.serial);
    let aside: Vec<_> = std::fs::read_dir(&w.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the old record is kept aside");

    // A readable record keeps its denylist too.
    store
        .update(|s| s.deny_at("1.9.0", "health check failed", jiff::Timestamp::now()))
        .unwrap();
    let out = cli(&w, &["state", "reset"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(store.load().unwrap().is_denied("1.9.0"));
    assert_eq!(store.serial_floor("stable").unwrap(), release.serial);

    let out = cli(&w, &["state", "reset", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!store.load().unwrap().is_denied("1.9.0"));
    assert_eq!(store.serial_floor("stable").unwrap(), 0);
    assert!(!w.state_dir.join("floor.json").exists());
    let aside = std::fs::read_dir(&w.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .count();
    assert_eq!(aside, 3, "every reset kept its old record aside");
}

// ---- Defect 5, as the host sees it: a junk signature is reported, not a veto ----------

#[tokio::test]
async fn junk_signature_under_a_trusted_key_is_reported_by_check_and_apply_installs() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.publish("2.0.0", Vec::new()).unwrap();
    let mut env: updater_proto::Envelope = serde_json::from_slice(&manifest_bytes(&w)).unwrap();
    let trusted_id = env.signatures[0].keyid.clone();
    env.signatures.push(updater_proto::Signature {
        keyid: trusted_id.clone(),
        sig: base64_junk(),
    });
    serve_bytes(&w, &env.to_json());
    let report = check(&w).await.unwrap();
    assert_eq!(
        report.ignored_signatures,
        vec![update_agent::ops::check::IgnoredSignature {
            key_id: trusted_id.clone(),
            reason: "invalid".to_string(),
        }]
    );
    assert!(report
        .render()
        .contains(&format!("ignored signature by {trusted_id}: invalid")));
    assert_eq!(report.refused, None);
    assert_eq!(apply(&w).await.unwrap(), SlotId::B);
}

/// 64 bytes of junk, base64: the size of an ed25519 signature, verifying under no key.
fn base64_junk() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([0x5a; 64])
}
