//! Hooks (docs/hooks.md) with real scripts: post_install sees the written, verified slot and
//! its failure leaves the slot unstaged; pre_reboot's failure or timeout cancels the reboot;
//! post_commit runs after a commit, and its failure does not undo it. Every run is in the
//! history with its status and output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use update_agent::boot::SlotId;
use update_agent::config::Config;
use update_agent::state::{HistoryEvent, HookRecord, Phase, StateStore};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{image_bytes, Backend, World};

async fn world(dir: &Path) -> World {
    let w = World::create(dir, Preset::Flatcar, Backend::Gptprio, 2)
        .await
        .unwrap();
    w.reboot_by_touching(&dir.join("reboot-requested")).unwrap();
    w
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn set_hook(w: &World, point: &str, path: &Path, timeout: &str) {
    let text = std::fs::read_to_string(&w.config_path).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    let hooks = doc
        .entry("hooks")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap();
    let mut t = toml::Table::new();
    t.insert(
        "command".into(),
        toml::Value::Array(vec![path.display().to_string().into()]),
    );
    t.insert("timeout".into(), timeout.into());
    hooks.insert(point.into(), toml::Value::Table(t));
    std::fs::write(&w.config_path, toml::to_string(&doc).unwrap()).unwrap();
}

fn hook_runs(w: &World) -> Vec<HookRecord> {
    StateStore::open(&w.state_dir)
        .unwrap()
        .load()
        .unwrap()
        .history
        .into_iter()
        .filter(|e| e.event == HistoryEvent::Hook)
        .map(|e| e.hook.unwrap())
        .collect()
}

fn phase(w: &World) -> Phase {
    StateStore::open(&w.state_dir)
        .unwrap()
        .load()
        .unwrap()
        .phase
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_post_install_hook_leaves_the_verified_slot_unstaged() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    let release = w.publish("1.1.0", Vec::new()).unwrap();
    let seen = dir.path().join("seen");
    // Reads the first 4 KiB of each partition of the new slot from the disk, as a real hook
    // would check a signature or mount the filesystem, then refuses.
    let body = format!(
        "env | grep '^UPDATE_AGENT_' | sort > {seen}.env\n\
         for role in $(env | sed -n 's/^UPDATE_AGENT_PART_\\(.*\\)_OFFSET=.*/\\1/p'); do\n\
           eval off=\\$UPDATE_AGENT_PART_${{role}}_OFFSET\n\
           tail -c +$((off + 1)) \"$UPDATE_AGENT_DISK\" | head -c 4096 > {seen}.$role\n\
         done\n\
         echo \"refusing $UPDATE_AGENT_VERSION on slot $UPDATE_AGENT_SLOT: no attestation\"\n\
         exit 3",
        seen = seen.display()
    );
    let hook = script(dir.path(), "post-install", &body);
    set_hook(&w, "post_install", &hook, "30s");

    let host = w.host().unwrap();
    let e = update_agent::ops::apply::apply(&host, &Default::default(), &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "hook_failed", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("exit status 3") && msg.contains("refusing 1.1.0 on slot B"),
        "{msg}"
    );

    // The hook saw the slot's real content and what it needs to find it.
    let env = std::fs::read_to_string(format!("{}.env", seen.display())).unwrap();
    assert!(env.contains("UPDATE_AGENT_HOOK=post_install"), "{env}");
    assert!(env.contains("UPDATE_AGENT_SLOT=B"), "{env}");
    for img in &release.images {
        let key = img.role.to_ascii_uppercase();
        let got = std::fs::read(format!("{}.{key}", seen.display())).unwrap();
        let want = image_bytes("1.1.0", &img.role, img.size);
        assert_eq!(got, want[..4096.min(want.len())], "partition {}", img.role);
    }

    // Unstaged: the next boot is still the running slot, the phase says failed.
    let st = host.boot_control().unwrap().status().unwrap();
    assert_eq!(st.next, Some(SlotId::A), "{st:?}");
    assert!(
        matches!(phase(&w), Phase::Failed { ref kind, .. } if kind == "hook_failed"),
        "{:?}",
        phase(&w)
    );
    assert_eq!(w.boot().unwrap(), Some(SlotId::A));

    // The run is in the history, with its output, in the text and the JSON.
    let runs = hook_runs(&w);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].name, "post_install");
    assert!(!runs[0].passed && !runs[0].timed_out);
    assert_eq!(runs[0].status, "exit status 3");
    assert!(runs[0].output_tail.contains("no attestation"));
    let history = update_agent::ops::history::history(&host, None).unwrap();
    let text = history.render();
    assert!(
        text.contains("hook") && text.contains("| refusing 1.1.0 on slot B: no attestation"),
        "{text}"
    );

    // Fixed hook: the same apply stages (the verified bytes are reused, not fetched again).
    let hook = script(dir.path(), "post-install", "echo ok");
    set_hook(&w, "post_install", &hook, "30s");
    let host = w.host().unwrap();
    update_agent::ops::apply::apply(&host, &Default::default(), &mut |_| {})
        .await
        .unwrap();
    assert!(matches!(phase(&w), Phase::Staged { .. }));
    let runs = hook_runs(&w);
    assert!(runs.last().unwrap().passed, "{runs:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pre_reboot_gates_the_reboot_and_post_commit_follows_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = world(dir.path()).await;
    w.publish("1.1.0", Vec::new()).unwrap();
    let host = w.host().unwrap();
    update_agent::ops::apply::apply(&host, &Default::default(), &mut |_| {})
        .await
        .unwrap();
    let flag = dir.path().join("reboot-requested");
    let log = dir.path().join("hooks.log");

    // A drain that fails: no reboot.
    let drain = script(
        dir.path(),
        "drain",
        "echo 'error: cannot evict pod web-1: PodDisruptionBudget' >&2; exit 1",
    );
    set_hook(&w, "pre_reboot", &drain, "30s");
    let e = update_agent::ops::reboot::reboot(&w.host().unwrap()).unwrap_err();
    assert_eq!(e.kind(), "hook_failed", "{e}");
    assert!(e.to_string().contains("PodDisruptionBudget"), "{e}");
    assert!(
        !flag.exists(),
        "rebooted despite the failed pre-reboot hook"
    );

    // A drain that hangs: killed at its timeout (with what it started), no reboot.
    let pidfile = dir.path().join("child.pid");
    let hang = script(
        dir.path(),
        "drain-hang",
        &format!("sleep 300 & echo $! > {}\nwait", pidfile.display()),
    );
    set_hook(&w, "pre_reboot", &hang, "1s");
    let started = std::time::Instant::now();
    let e = update_agent::ops::reboot::reboot(&w.host().unwrap()).unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(
        e.to_string().contains("killed after the timeout of 1s"),
        "{e}"
    );
    assert!(!flag.exists());
    let child: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !Path::new(&format!("/proc/{child}")).exists()
            || std::fs::read_to_string(format!("/proc/{child}/stat"))
                .unwrap_or_default()
                .contains(") Z "),
        "the hook's child {child} survived the timeout"
    );
    let runs = hook_runs(&w);
    assert!(runs.last().unwrap().timed_out, "{runs:?}");

    // The same failing drain before a reboot that is not into an update (back to the old
    // slot after a rollback): recorded, and the host reboots anyway.
    set_hook(&w, "pre_reboot", &drain, "30s");
    let store = StateStore::open(&w.state_dir).unwrap();
    let staged = store.load().unwrap().phase;
    store
        .update(|s| {
            s.phase = Phase::RolledBack {
                reason: "health check failed".into(),
                from_version: Some("1.1.0".into()),
            }
        })
        .unwrap();
    update_agent::ops::reboot::reboot(&w.host().unwrap()).unwrap();
    assert!(
        flag.exists(),
        "a failed drain kept the host on the release it is leaving"
    );
    assert!(!hook_runs(&w).last().unwrap().passed);
    std::fs::remove_file(&flag).unwrap();
    store.update(|s| s.phase = staged).unwrap();

    // A drain that works: then the reboot.
    let drain = script(
        dir.path(),
        "drain-ok",
        &format!(
            "echo \"$UPDATE_AGENT_HOOK $UPDATE_AGENT_VERSION\" >> {}",
            log.display()
        ),
    );
    set_hook(&w, "pre_reboot", &drain, "30s");
    update_agent::ops::reboot::reboot(&w.host().unwrap()).unwrap();
    assert!(flag.exists());

    // Boot B, commit: post_commit runs after the commit, and its failure does not undo it.
    let uncordon = script(
        dir.path(),
        "uncordon",
        &format!(
            "echo \"$UPDATE_AGENT_HOOK $UPDATE_AGENT_VERSION $UPDATE_AGENT_SLOT\" >> {}\n\
             echo 'uncordon: API server unreachable'; exit 2",
            log.display()
        ),
    );
    set_hook(&w, "post_commit", &uncordon, "30s");
    assert_eq!(w.boot().unwrap(), Some(SlotId::B));
    let report = update_agent::ops::commit::mark_good(&w.host().unwrap()).unwrap();
    assert_eq!(report.slot, SlotId::B);
    assert!(matches!(phase(&w), Phase::Committed { .. }));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["pre_reboot 1.1.0", "post_commit 1.1.0 B"],
        "{text}"
    );
    let runs = hook_runs(&w);
    let last = runs.last().unwrap();
    assert_eq!(
        (last.name.as_str(), last.passed, last.status.as_str()),
        ("post_commit", false, "exit status 2")
    );
    assert!(last.output_tail.contains("API server unreachable"));
    // Still committed: the next boot stays on B.
    assert_eq!(w.boot().unwrap(), Some(SlotId::B));
}

#[test]
fn hook_settings_are_validated() {
    for (text, key) in [
        (
            "[hooks.pre_reboot]\ncommand = []\n",
            "hooks.pre_reboot.command",
        ),
        (
            "[hooks.post_install]\ncommand = [\"/bin/true\"]\ntimeout = \"0s\"\n",
            "hooks.post_install.timeout",
        ),
        ("[hooks.post_commit]\ncommand = [\"x\"]\nwhen = 1\n", "when"),
    ] {
        let e = Config::from_toml_str(text).unwrap_err();
        assert!(e.to_string().contains(key), "{text}: {e}");
    }
    let c =
        Config::from_toml_str("[hooks.post_commit]\ncommand = [\"/usr/bin/uncordon\"]\n").unwrap();
    let h = c.hooks.post_commit.as_ref().unwrap();
    assert_eq!(h.timeout.get(), std::time::Duration::from_secs(300));
    assert_eq!(
        Config::from_toml_str(&c.to_toml_string().unwrap()).unwrap(),
        c
    );
}
