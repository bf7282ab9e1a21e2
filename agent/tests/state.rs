//! The state store: atomic persistence, corrupt files, compatibility, and the install lock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use update_agent::boot::SlotId;
use update_agent::state::{
    HistoryEntry, HistoryEvent, InstallLock, Phase, ResumeRecord, SlotRecord, State, StateError,
    StateStore, HISTORY_LIMIT,
};

fn sample() -> State {
    let mut s = State {
        phase: Phase::Trial {
            slot: SlotId::B,
            version: "1.2.3".into(),
            boot_id: "0f8e".into(),
        },
        resume: Some(ResumeRecord {
            url: "http://127.0.0.1:1/img".into(),
            expected_sha256: "ab".repeat(32),
            bytes_written: 4096,
            etag: Some("\"e1\"".into()),
            slot: Some(SlotId::B),
        }),
        ..State::default()
    };
    s.observe_serial("stable", 7);
    s.observe_serial("stable", 3);
    s.deny_at("1.2.2", "health check ssh failed", jiff::Timestamp::now());
    s.slots.insert(
        SlotId::A,
        SlotRecord {
            version: "1.2.1".into(),
            image_sha256s: vec!["cd".repeat(32)],
            verified: true,
        },
    );
    let mut e = HistoryEntry::stamped(HistoryEvent::Staged, jiff::Timestamp::now());
    e.version = Some("1.2.3".into());
    e.slot = Some(SlotId::B);
    s.record(e);
    s
}

#[test]
fn save_is_atomic_private_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("var/lib/update-agent");
    let store = StateStore::open(&sdir).unwrap();
    assert_eq!(
        std::fs::metadata(&sdir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(store.load().unwrap(), State::default());

    let s = sample();
    store.save(&s).unwrap();
    assert_eq!(store.load().unwrap(), s);
    assert_eq!(s.serial("stable"), 7);
    assert!(s.is_denied("1.2.2") && !s.is_denied("1.2.3"));
    assert!(s.slot_verified(SlotId::A) && !s.slot_verified(SlotId::B));

    let meta = std::fs::metadata(store.path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let names: Vec<String> = std::fs::read_dir(&sdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["state.json".to_string()], "no temp file left");

    // The phase is tagged for humans reading the file.
    let text = std::fs::read_to_string(store.path()).unwrap();
    assert!(text.contains("\"phase\": \"trial\""), "{text}");
}

#[test]
fn update_applies_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let n = store
        .update(|s| {
            s.phase = Phase::Committed {
                slot: SlotId::B,
                version: "2".into(),
            };
            s.history.len()
        })
        .unwrap();
    assert_eq!(n, 0);
    assert!(matches!(
        store.load().unwrap().phase,
        Phase::Committed { .. }
    ));
}

#[test]
fn history_is_bounded_oldest_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let mut s = State::default();
    for i in 0..HISTORY_LIMIT + 25 {
        let mut e = HistoryEntry::stamped(HistoryEvent::Failed, jiff::Timestamp::now());
        e.reason = Some(format!("attempt {i}"));
        s.history.push(e);
    }
    store.save(&s).unwrap();
    let back = store.load().unwrap();
    assert_eq!(back.history.len(), HISTORY_LIMIT);
    assert_eq!(back.history[0].reason.as_deref(), Some("attempt 25"));
}

#[test]
fn corrupt_file_is_an_error_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    std::fs::write(store.path(), b"{\"schema_version\": 1, \"phase\": ").unwrap();
    let e = store.load().unwrap_err();
    assert_eq!(e.kind(), "state_corrupt");
    assert!(e.to_string().contains("state.json"), "{e}");
    assert!(matches!(e, StateError::Corrupt { .. }));
    let e = store.update(|_| ()).unwrap_err();
    assert_eq!(e.kind(), "state_corrupt");
    assert_eq!(
        std::fs::read(store.path()).unwrap(),
        b"{\"schema_version\": 1, \"phase\": "
    );
    // The explicit escape hatch moves it aside; the next load starts fresh.
    let aside = store.quarantine_corrupt().unwrap().unwrap();
    assert!(aside.exists());
    assert_eq!(store.load().unwrap(), State::default());
}

#[test]
fn a_file_from_a_newer_agent_is_read_and_its_unknown_fields_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let newer = r#"{
        "schema_version": 9,
        "phase": {"phase": "verifying_delta", "progress": 3},
        "highest_serial": {"stable": 12},
        "history": [{"at": "2026-01-01T00:00:00Z", "event": "delta_applied"}],
        "fleet_ticket": {"id": "x"}
    }"#;
    std::fs::write(store.path(), newer).unwrap();
    let s = store.load().unwrap();
    assert_eq!(s.phase, Phase::Unknown);
    assert_eq!(s.history[0].event, HistoryEvent::Unknown);
    assert_eq!(s.serial("stable"), 12);
    store.save(&s).unwrap();
    let text = std::fs::read_to_string(store.path()).unwrap();
    assert!(text.contains("fleet_ticket"), "{text}");
    assert!(text.contains("\"schema_version\": 9"), "{text}");
}

#[test]
fn open_refuses_a_file_where_the_directory_should_be() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("state");
    std::fs::write(&f, b"").unwrap();
    let e = StateStore::open(&f).unwrap_err();
    assert_eq!(e.kind(), "state_not_a_directory");
}

#[test]
fn install_lock_excludes_a_second_holder_and_names_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let first = InstallLock::acquire(dir.path()).unwrap();
    // flock is per open file description: a second open in this process conflicts too.
    let e = InstallLock::acquire(dir.path()).unwrap_err();
    match &e {
        StateError::Locked { pid, path } => {
            assert_eq!(*pid, Some(std::process::id()));
            assert!(path.ends_with("install.lock"));
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert_eq!(e.kind(), "install_locked");
    assert!(e
        .to_string()
        .contains(&format!("pid {}", std::process::id())));
    drop(first);
    let again = InstallLock::acquire(dir.path()).unwrap();
    drop(again);
}

#[test]
fn install_lock_excludes_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("install.lock");
    // flock(1) from util-linux holds the lock in a separate process until told to go.
    let fifo = dir.path().join("go");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let mut child = Command::new("flock")
        .arg("-x")
        .arg(&lock)
        .arg("sh")
        .arg("-c")
        .arg(format!("echo locked; cat {} > /dev/null", fifo.display()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("flock (util-linux) runs");
    // The child prints once it holds the lock.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    let e = InstallLock::acquire(dir.path()).unwrap_err();
    assert_eq!(e.kind(), "install_locked");
    std::fs::write(&fifo, b"go").unwrap();
    assert!(child.wait().unwrap().success());
    InstallLock::acquire(dir.path()).unwrap();
}

#[test]
fn concurrent_saves_never_mix_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let store = store.clone();
            scope.spawn(move || {
                for i in 0..25u64 {
                    let mut s = State::default();
                    s.observe_serial("stable", t * 1000 + i);
                    s.deny_at(
                        &"v".repeat((t * 50 + i) as usize % 300 + 1),
                        "x",
                        jiff::Timestamp::now(),
                    );
                    store.save(&s).unwrap();
                }
            });
        }
    });
    // Whichever save won, the file is one whole record, and no temp file is left.
    store.load().unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn boot_id_is_the_kernels() {
    let id = update_agent::state::boot_id().unwrap();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(id, update_agent::state::boot_id().unwrap());
    let e = update_agent::state::read_boot_id(std::path::Path::new("/nonexistent/boot_id"))
        .unwrap_err();
    assert_eq!(e.kind(), "state_io");
    assert!(e.to_string().contains("/nonexistent/boot_id"));
}
