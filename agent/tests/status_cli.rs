#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `update-agent status` on a sandboxed host, as an operator runs it: the slots and their
//! partitions, the flags, the booted slot and where it was read, the next boot and why,
//! in text and in --json; and a clear error with a stable kind when the config is wrong.

use std::process::Command;

use update_agent::boot::SlotId;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

fn status(world: &World, json: bool) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_update-agent"));
    cmd.arg("--config").arg(&world.config_path);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.arg("status").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_slots_flags_booted_and_next_boot() {
    for (preset, backend) in [
        (Preset::Flatcar, Backend::Gptprio),
        (Preset::ChromeOs, Backend::Grubenv),
        (Preset::Bottlerocket, Backend::Gptprio),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let world = World::create(dir.path(), preset, backend, 4).await.unwrap();

        let (ok, text, err) = status(&world, false);
        assert!(ok, "{err}");
        assert!(text.contains("booted: slot A (from cmdline)"), "{text}");
        assert!(text.contains("next boot: slot A"), "{text}");
        assert!(text.contains("version=1.0.0 (verified)"), "{text}");
        let slots = world.slots().unwrap();
        for slot in [&slots.a, &slots.b] {
            for (role, part) in &slot.parts {
                assert!(
                    text.contains(&format!(
                        "{role}: partition {} '{}'",
                        part.number, part.label
                    )),
                    "{}: {role} missing from\n{text}",
                    preset.name()
                );
            }
        }

        let (ok, json, err) = status(&world, true);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["booted"]["slot"], "A");
        assert_eq!(v["booted"]["source"], "cmdline");
        assert_eq!(v["boot"]["next"], "A");
        let a = v["boot"]["slots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["slot"] == "A")
            .unwrap();
        assert_eq!(a["successful"], true, "{v}");
        assert_eq!(v["slots"].as_array().unwrap().len(), 2);

        // After an install, status says B boots next for its trial, and why.
        let mut world = world;
        world.publish("2.0.0", Vec::new()).unwrap();
        update_agent::ops::apply::apply(&world.host().unwrap(), &Default::default(), &mut |_| {})
            .await
            .unwrap();
        let (ok, json, err) = status(&world, true);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["boot"]["next"], "B", "{v}");
        assert_eq!(v["phase"]["phase"], "staged", "{v}");
        assert!(!v["boot"]["reason"].as_str().unwrap().is_empty());
        assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_with_a_broken_config_names_the_problem_and_its_kind() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 4)
        .await
        .unwrap();
    let mut text = std::fs::read_to_string(&world.config_path).unwrap();
    text = text.replace("[disk]\n", "[disk]\nlayuot = \"flatcar\"\n");
    std::fs::write(&world.config_path, text).unwrap();
    let (ok, json, _) = status(&world, true);
    assert!(!ok);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("layuot"),
        "{v}"
    );
    assert!(
        v["error"]["kind"].as_str().unwrap().starts_with("config"),
        "{v}"
    );

    // A kernel command line naming no slot partition: status still works and says why.
    let dir = tempfile::tempdir().unwrap();
    let world = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 4)
        .await
        .unwrap();
    std::fs::write(&world.cmdline, "root=/dev/sda9 quiet\n").unwrap();
    let (ok, text, err) = status(&world, false);
    assert!(ok, "{err}");
    assert!(text.contains("booted: unknown"), "{text}");
    assert!(text.contains("PARTUUID"), "{text}");
}
