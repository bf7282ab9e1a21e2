//! Power cuts during every file-based record's replace (issue 9 item 10): the grubenv, the
//! state record, the resume checkpoints, the health journal, the serial floor and the
//! persisted trust root. Each operation's file
//! operations are recorded (`state::atomic::record_ops`); `disk::recording::file_cuts`
//! rebuilds every directory state a cut could leave (see its model); each state is
//! materialised in a fresh directory and judged by an independent reader (`grub-editenv
//! FILE list` for the grubenv, `serde_json` for the JSON records) and by the agent's own
//! reader: both must see exactly the old or the new record, and agree.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use update_agent::boot::grubenv::{create_file, EnvLocation, GrubEnvBoot};
use update_agent::boot::{BootControl, SlotId};
use update_agent::state::atomic::{record_ops, FileOp};
use update_agent_sandbox::recording::{file_cuts, FileCut};
use update_agent_sandbox::sim_grub;
use update_agent_sandbox::testimg::require_tool;

/// Every regular file under `dir` (not recursive: the records live in one directory).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect()
}

/// Write `cut` into a fresh directory, paths under `from` moved under the new one.
fn materialise(cut: &FileCut, from: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (p, bytes) in &cut.files {
        let rel = p.strip_prefix(from).unwrap();
        std::fs::write(d.path().join(rel), bytes).unwrap();
    }
    d
}

/// Run `op` recorded on `dir` and return every cut state with the before/after snapshots.
fn cuts_of(dir: &Path, op: impl FnOnce()) -> (Vec<FileCut>, Vec<FileOp>) {
    let before = snapshot(dir);
    let ((), log) = record_ops(op);
    assert!(
        log.iter().any(|o| matches!(o, FileOp::Rename { .. })),
        "the operation replaced a file: {log:?}"
    );
    (file_cuts(&before, &log), log)
}

fn grub_list(file: &Path) -> Result<Vec<String>, String> {
    let out = Command::new("grub-editenv")
        .arg(file)
        .arg("list")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn every_cut_of_a_grubenv_replace_leaves_the_old_or_the_new_block() {
    if !require_tool("grub-editenv", "grub-common").unwrap() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    create_file(&path, SlotId::A).unwrap();
    let mut checked = 0;
    type Step = (&'static str, fn(&Path));
    let steps: [Step; 5] = [
        ("disable B", |p| {
            GrubEnvBoot::file(p, 1).unwrap().disable(SlotId::B).unwrap()
        }),
        ("stage B", |p| {
            GrubEnvBoot::file(p, 1).unwrap().stage(SlotId::B).unwrap()
        }),
        ("GRUB boots B", |p| {
            let b = sim_grub::boot(&mut EnvLocation::File(p.to_path_buf()), 1).unwrap();
            assert_eq!(b.booted, Some(SlotId::B));
        }),
        ("commit B", |p| {
            GrubEnvBoot::file(p, 1).unwrap().commit(SlotId::B).unwrap()
        }),
        ("rollback to A", |p| {
            GrubEnvBoot::file(p, 1)
                .unwrap()
                .rollback(SlotId::A)
                .unwrap()
        }),
    ];
    for (name, step) in steps {
        let old = grub_list(&path).unwrap();
        let (cuts, log) = cuts_of(dir.path(), || step(&path));
        assert!(
            log.iter().any(|o| matches!(o, FileOp::SyncFs { .. })),
            "{name}: the grubenv replace ends with a syncfs: {log:?}"
        );
        let new = grub_list(&path).unwrap();
        assert_ne!(old, new, "{name} changed the block");
        for cut in &cuts {
            let what = format!("{name}, cut {}", cut.what);
            let d = materialise(cut, dir.path());
            let file = d.path().join("grubenv");
            let seen = grub_list(&file).unwrap_or_else(|e| panic!("{what}: grub-editenv: {e}"));
            assert!(seen == old || seen == new, "{what}: {seen:?}");
            // Our reader agrees with GRUB's tool, variable for variable.
            let ours = EnvLocation::File(file.clone()).read().unwrap();
            let ours: Vec<String> = ours.vars().map(|(k, v)| format!("{k}={v}")).collect();
            assert_eq!(ours, seen, "{what}: our reader disagrees with grub-editenv");
            // And the loader boots a slot, never rescue.
            let boot = sim_grub::boot(&mut EnvLocation::File(file), 1).unwrap();
            assert!(boot.booted.is_some(), "{what}: GRUB boots rescue");
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} cuts");
}

/// Judge every cut of a JSON record's replace: serde_json and the agent's own `load` both
/// see the old or the new record, and the same one.
fn check_json_record<T: PartialEq + std::fmt::Debug>(
    name: &str,
    dir: &Path,
    file: &str,
    load: impl Fn(&Path) -> T,
    op: impl FnOnce(),
) -> usize {
    let parse = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {}: {e}", p.display()))
    };
    let (old_json, old) = (parse(&dir.join(file)), load(dir));
    let (cuts, _) = cuts_of(dir, op);
    let (new_json, new) = (parse(&dir.join(file)), load(dir));
    assert_ne!(old_json, new_json, "{name} changed the record");
    for cut in &cuts {
        let what = format!("{name}, cut {}", cut.what);
        let d = materialise(cut, dir);
        let json = parse(&d.path().join(file));
        let ours = load(d.path());
        if json == old_json {
            assert_eq!(ours, old, "{what}: our reader disagrees with serde_json");
        } else {
            assert_eq!(json, new_json, "{what}: neither the old nor the new record");
            assert_eq!(ours, new, "{what}: our reader disagrees with serde_json");
        }
    }
    cuts.len()
}

#[test]
fn every_cut_of_a_state_record_replace_leaves_the_old_or_the_new_record() {
    use update_agent::state::{Phase, StateStore};
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store
        .update(|s| {
            s.phase = Phase::Downloading {
                version: "2.0.0".into(),
                bytes_done: 0,
            };
        })
        .unwrap();
    let load = |d: &Path| StateStore::open(d).unwrap().load().unwrap();
    let n = check_json_record("state record", dir.path(), "state.json", load, || {
        store
            .update(|s| {
                s.phase = Phase::Staged {
                    slot: SlotId::B,
                    version: "2.0.0".into(),
                };
                s.observe_serial("stable", 7);
            })
            .unwrap()
    });
    assert!(n > 10, "{n} cuts");
}

#[test]
fn every_cut_of_a_resume_checkpoint_leaves_the_old_or_the_new_checkpoints() {
    use update_agent::install::{Compression, ResumeRecord, ResumeSink};
    use update_agent::ops::resume::ResumeFile;
    use update_agent::state::StateStore;
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let rec = |written: u64| ResumeRecord {
        slot: SlotId::B,
        role: "usr".into(),
        url: "http://127.0.0.1:1/usr.img".into(),
        expected_sha256: "ab".repeat(32),
        compression: Compression::None,
        compressed_offset: written,
        written,
        etag: Some("\"e1\"".into()),
        resumable: true,
        complete: false,
    };
    let mut file = ResumeFile::load(&store);
    file.record(&rec(64 << 20)).unwrap();
    let load = |d: &Path| {
        ResumeFile::load(&StateStore::open(d).unwrap())
            .records()
            .to_vec()
    };
    let n = check_json_record("resume checkpoint", dir.path(), "resume.json", load, || {
        file.record(&rec(128 << 20)).unwrap()
    });
    assert!(n > 10, "{n} cuts");
}

#[test]
fn every_cut_of_a_health_journal_replace_leaves_the_old_or_the_new_journal() {
    use update_agent::health::journal::{BootKind, BootRun, Journal, RunOutcome};
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::default();
    j.upsert(BootRun::start_at(
        "boot-1",
        SlotId::A,
        Some("1.0.0".into()),
        BootKind::Normal,
        jiff::Timestamp::now(),
    ));
    j.save(dir.path()).unwrap();
    let load = |d: &Path| Journal::load(d).unwrap();
    let n = check_json_record("health journal", dir.path(), "health.json", load, || {
        let mut run = BootRun::start_at(
            "boot-2",
            SlotId::B,
            Some("2.0.0".into()),
            BootKind::Trial,
            jiff::Timestamp::now(),
        );
        run.outcome = RunOutcome::Committed;
        j.upsert(run);
        j.save(dir.path()).unwrap()
    });
    assert!(n > 10, "{n} cuts");
}

#[test]
fn every_cut_of_a_serial_floor_raise_leaves_the_old_or_the_new_floor() {
    use update_agent::state::StateStore;
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store.raise_floor("stable", 7).unwrap();
    let load = |d: &Path| {
        StateStore::open(d)
            .unwrap()
            .load_floor()
            .unwrap()
            .highest_serial
    };
    let n = check_json_record("serial floor", dir.path(), "floor.json", load, || {
        store.raise_floor("stable", 9).unwrap()
    });
    assert!(n > 10, "{n} cuts");
}

#[test]
fn every_cut_of_a_trust_root_persist_leaves_the_old_or_the_new_root() {
    use std::collections::BTreeSet;
    use updater_proto::root::{sign_root, ROOT_SCHEMA_VERSION};
    use updater_proto::{Role, Root, RootKey, TrustedKey, TrustedRoot};
    let keys = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let (private, public) = (
            keys.path().join(format!("{name}.key")),
            keys.path().join(format!("{name}.pub")),
        );
        update_agent::publish::generate_key(&private, &public, false).unwrap();
        update_agent::publish::load_signing_key(&private).unwrap()
    };
    let (a, b, m) = (key("a"), key("b"), key("m"));
    let role = |k: &updater_proto::SigningKey| Role {
        threshold: 1,
        keys: vec![RootKey::of(&TrustedKey::new(k.public_key()))],
    };
    let one = Root {
        schema_version: ROOT_SCHEMA_VERSION,
        version: 1,
        expires_at: 4_000_000_000,
        root: role(&a),
        manifest: role(&m),
    };
    let two = Root {
        version: 2,
        root: role(&b),
        ..one.clone()
    };
    let v1 = TrustedRoot::bootstrap(&sign_root(&one, &[&a]).unwrap().to_json(), BTreeSet::new())
        .unwrap();
    // Root 2 rotates the root key: a revokes itself, so the record also changes `revoked`.
    let v2 = v1
        .update(&sign_root(&two, &[&a, &b]).unwrap().to_json())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    update_agent::trust::persist(dir.path(), &v1).unwrap();
    let load = |d: &Path| {
        let r = update_agent::trust::load_persisted(d).unwrap().unwrap();
        (r.version(), r.revoked().clone())
    };
    let n = check_json_record("trust root", dir.path(), "root.json", load, || {
        update_agent::trust::persist(dir.path(), &v2).unwrap()
    });
    assert!(n > 10, "{n} cuts");
}
