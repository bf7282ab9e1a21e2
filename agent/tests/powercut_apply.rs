//! Power cuts during `ops::apply` itself, through to the next boots and agent runs (issue 9
//! item 10: "after a cut at any write, the next boot and the next agent run agree on what is
//! on each slot").
//!
//! `powercut_pair.rs` re-issues the pair's writes by hand; this test records the real
//! `apply` on a sandboxed host whose boot flags live in a grubenv file (the grubenv backend),
//! so every record `apply` writes is a file: the state record (the install's begin, the
//! intent, `Staged`), the resume checkpoints and the grubenv (B disabled, then staged).
//! `record_ops` gives one ordered log of all of them; `file_cuts` enumerates every state a
//! power cut can leave, each directory on its own filesystem (state and grubenv live apart
//! on a real host). For each state:
//! - `grub-editenv list` (GRUB's own tool) reads the environment;
//! - the loader (the sandbox's GRUB rule, proven against real GRUB in the lab) boots a slot,
//!   never nothing, and never B before the intent record names 2.0.0 on it;
//! - the booted slot holds a verified image: A its factory bytes, B the release's SHA-256;
//! - the agent's next run agrees: `status` names the slot the loader booted and the state
//!   record the release on it; the health check commits B as 2.0.0 (never `unknown`) or
//!   confirms A without denylisting a release that was never tried;
//! - the runs after it finish the update: from A, `apply` installs (or resumes) and stages
//!   B, the next boot is B, its health check commits 2.0.0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use update_agent::boot::SlotId;
use update_agent::health::journal::RunOutcome;
use update_agent::ops;
use update_agent::state::atomic::{record_ops, FileOp};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::recording::file_cuts;
use update_agent_sandbox::testimg::require_tool;
use update_agent_sandbox::world::{Backend, World};

/// The files a cut can touch: everything in the state directory, and the grubenv.
fn snapshot(world: &World) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files: BTreeMap<PathBuf, Vec<u8>> = std::fs::read_dir(&world.state_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    files.insert(
        world.grubenv.clone(),
        std::fs::read(&world.grubenv).unwrap(),
    );
    files
}

/// Put the state directory and the grubenv back as `files` says (absent paths removed).
fn restore(world: &World, files: &BTreeMap<PathBuf, Vec<u8>>) {
    use std::os::unix::fs::PermissionsExt;
    let grub_dir = world.grubenv.parent().unwrap();
    for e in std::fs::read_dir(&world.state_dir).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    for e in std::fs::read_dir(grub_dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name == "grubenv" || name.starts_with(".grubenv.tmp") {
            std::fs::remove_file(&p).unwrap();
        }
    }
    for (p, bytes) in files {
        std::fs::write(p, bytes).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// `grub-editenv FILE list`, as GRUB's own tool reads the block.
fn grub_editenv_list(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let out = Command::new("grub-editenv")
        .arg(path)
        .arg("list")
        .output()
        .map_err(|e| format!("grub-editenv: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The op index a cut falls before (`file_cuts` names it `before op #k, ...`).
fn cut_index(what: &str) -> usize {
    what.strip_prefix("before op #")
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected cut name {what}"))
}

#[test]
fn every_cut_during_apply_boots_a_named_slot_and_the_next_runs_finish_the_update() {
    if !require_tool("sgdisk", "gdisk").unwrap()
        || !require_tool("grub-editenv", "grub-common").unwrap()
    {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut world = rt
        .block_on(World::create(
            dir.path(),
            Preset::Flatcar,
            Backend::Grubenv,
            4,
        ))
        .unwrap();
    let release = world.publish("2.0.0", Vec::new()).unwrap();
    let usr = release.images.iter().find(|i| i.role == "usr").unwrap();
    let a_sha = world.slot_sha256(SlotId::A, "usr", usr.size).unwrap();
    let before = snapshot(&world);
    assert_eq!(
        grub_editenv_list(&world.grubenv)
            .unwrap()
            .get("ORDER")
            .map(String::as_str),
        Some("A B"),
        "the factory grubenv, as GRUB's tool reads it"
    );

    // The real apply, every record write recorded in order (the install's own disk writes
    // go to the slot, not to a record; it has finished and flushed before the intent).
    let host = world.host().unwrap();
    let (report, log) =
        record_ops(|| rt.block_on(ops::apply::apply(&host, &Default::default(), &mut |_| {})));
    assert_eq!(report.unwrap().slot, SlotId::B);
    let after = snapshot(&world);
    let grub_dir = world.grubenv.parent().unwrap().to_path_buf();
    for op in &log {
        let path = match op {
            FileOp::Write { path, .. }
            | FileOp::Fsync { path }
            | FileOp::Remove { path }
            | FileOp::Rename { to: path, .. } => path.clone(),
            FileOp::FsyncDir { dir } | FileOp::SyncFs { dir, .. } => dir.join("x"),
        };
        let d = path.parent().unwrap();
        assert!(
            d == world.state_dir || d == grub_dir,
            "apply wrote a record this test does not cut: {op:?}"
        );
    }
    // The log holds the whole pair: the intent, the staged record, both grubenv writes.
    let state_writes: Vec<(usize, serde_json::Value)> = log
        .iter()
        .enumerate()
        .filter_map(|(i, op)| match op {
            FileOp::Write { path, data, .. }
                if path.parent() == Some(world.state_dir.as_path())
                    && path.to_string_lossy().contains(".state.json.tmp") =>
            {
                Some((i, serde_json::from_slice(data).unwrap()))
            }
            _ => None,
        })
        .collect();
    let intent_at = state_writes
        .iter()
        .find(|(_, j)| j["slots"]["B"]["version"] == "2.0.0")
        .map(|(i, _)| *i)
        .expect("apply records the intent (B holds 2.0.0) in state.json");
    assert!(
        state_writes
            .iter()
            .any(|(_, j)| j["phase"]["phase"] == "staged"),
        "apply records Staged: {state_writes:?}"
    );
    let grub_syncs = log
        .iter()
        .filter(|op| matches!(op, FileOp::SyncFs { dir, .. } if *dir == grub_dir))
        .count();
    assert_eq!(
        grub_syncs, 2,
        "B disabled, then staged, each synced for GRUB"
    );

    let cuts = file_cuts(&before, &log);
    let (mut booted_b_first, mut from_a) = (0, 0);
    for cut in &cuts {
        let what = &cut.what;
        restore(&world, &cut.files);
        let vars = grub_editenv_list(&world.grubenv)
            .unwrap_or_else(|e| panic!("{what}: grub-editenv cannot read the grubenv: {e}"));
        let booted = world
            .boot()
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: nothing boots ({vars:?})"));
        if cut_index(what) <= intent_at {
            assert_eq!(
                booted,
                SlotId::A,
                "{what}: B boots before the record names it ({vars:?})"
            );
        }
        match booted {
            SlotId::A => assert_eq!(
                world.slot_sha256(SlotId::A, "usr", usr.size).unwrap(),
                a_sha
            ),
            SlotId::B => assert_eq!(
                world.slot_sha256(SlotId::B, "usr", usr.size).unwrap(),
                usr.sha256,
                "{what}: B boots without the release on it"
            ),
        }
        let host = world.host().unwrap();
        let st = ops::status::status(&host).unwrap_or_else(|e| panic!("{what}: status: {e}"));
        assert_eq!(st.booted.as_ref().map(|b| b.slot), Some(booted), "{what}");
        let health = world
            .health_check()
            .unwrap_or_else(|e| panic!("{what}: health check: {e}"));
        if booted == SlotId::B {
            booted_b_first += 1;
            let state = host.state.load().unwrap();
            assert_eq!(
                state.slots.get(&SlotId::B).map(|r| r.version.as_str()),
                Some("2.0.0"),
                "{what}: the record does not name B's release"
            );
            assert_eq!(health.version.as_deref(), Some("2.0.0"), "{what}");
            assert_eq!(health.outcome, RunOutcome::Committed, "{what}: {health:?}");
        } else {
            from_a += 1;
            assert!(
                health.healthy(),
                "{what}: A's boot is not healthy: {health:?}"
            );
            assert!(
                health.denylisted.is_none(),
                "{what}: a release that never booted was denylisted: {health:?}"
            );
            // The next daemon cycle finishes (or restarts) the install.
            let applied = rt
                .block_on(ops::apply::apply(&host, &Default::default(), &mut |_| {}))
                .unwrap_or_else(|e| panic!("{what}: the next apply: [{}] {e}", e.kind()));
            assert_eq!(applied.slot, SlotId::B, "{what}");
            assert_eq!(world.boot().unwrap(), Some(SlotId::B), "{what}");
            let health = world.health_check().unwrap();
            assert_eq!(health.outcome, RunOutcome::Committed, "{what}: {health:?}");
            assert_eq!(health.version.as_deref(), Some("2.0.0"), "{what}");
        }
        // Where every cut ends: B runs 2.0.0, committed, in the loader's and the agent's eyes.
        let host = world.host().unwrap();
        let st = ops::status::status(&host).unwrap();
        assert_eq!(
            st.booted.as_ref().map(|b| b.slot),
            Some(SlotId::B),
            "{what}"
        );
        assert_eq!(st.boot.next, Some(SlotId::B), "{what}");
        assert!(host.state.load().unwrap().denylist.is_empty(), "{what}");
    }
    restore(&world, &after);
    assert!(cuts.len() > 50, "only {} cut states", cuts.len());
    assert!(
        booted_b_first > 0,
        "no cut boots B: the stage write was not cut"
    );
    assert!(from_a > 0, "no cut boots A");
    eprintln!(
        "{} cut states across apply: {booted_b_first} boot B first, {from_a} boot A and finish",
        cuts.len()
    );
}
