//! Issue 14 item 5: `update-agent status` (text and --json), run from another process while
//! `apply` installs, shows the running install's phase, bytes done of the whole install, rate
//! and ETA; once the install ended it shows none. The image is served at a paced bandwidth
//! by server-mock so the install lasts a few seconds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, PublishSpec, World};
use updater_proto::Compression;

const BANDWIDTH: u64 = 2 << 20;

fn status(world: &World, json: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_update-agent"));
    cmd.arg("--config").arg(&world.config_path);
    if json {
        cmd.arg("--json");
    }
    let o = cmd.arg("status").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_running_installs_progress_from_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 8)
        .await
        .unwrap();
    let release = world
        .publish_with(&PublishSpec::new("2.0.0").compression(Compression::None))
        .unwrap();
    let total: u64 = release.images.iter().map(|i| i.size).sum();
    assert!(total >= 4 << 20, "{total}");
    world.server.set_fault(
        serde_json::from_value(serde_json::json!({
            "path": "/usr-*",
            "fault": {"bandwidth": BANDWIDTH}
        }))
        .unwrap(),
    );

    let mut apply = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&world.config_path)
        .arg("apply")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Poll as an operator would, until status shows bytes moving (bounded).
    let started = Instant::now();
    let seen = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "status never showed the install's progress"
        );
        assert!(
            apply.try_wait().unwrap().is_none(),
            "the install ended before status saw it"
        );
        let v: serde_json::Value = serde_json::from_str(status(&world, true).trim()).unwrap();
        let p = &v["progress"];
        if p.is_object()
            && p["done"].as_u64().unwrap() > 0
            && p["bytes_per_second"].as_f64() > Some(0.0)
        {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let p = &seen["progress"];
    assert_eq!(seen["phase"]["phase"], "downloading", "{seen}");
    assert_eq!(p["version"], "2.0.0", "{p}");
    assert_eq!(p["total"].as_u64(), Some(total), "{p}");
    assert!(p["done"].as_u64().unwrap() < total, "{p}");
    assert_eq!(p["role"], "usr", "{p}");
    assert!(
        ["writing", "flushing", "verifying"].contains(&p["phase"].as_str().unwrap()),
        "{p}"
    );
    assert_eq!(p["pid"].as_u64(), Some(u64::from(apply.id())), "{p}");
    // The rate is the download's: paced at BANDWIDTH, not the disk's.
    let rate = p["bytes_per_second"].as_f64().unwrap();
    assert!(
        rate > BANDWIDTH as f64 / 4.0 && rate < BANDWIDTH as f64 * 4.0,
        "rate {rate} for a {BANDWIDTH} B/s download"
    );
    let eta = p["eta_ms"].as_u64().unwrap();
    assert!(eta > 0 && eta < 30_000, "{p}");

    let text = status(&world, false);
    let line = text
        .lines()
        .find(|l| l.starts_with("install of 2.0.0: "))
        .unwrap_or_else(|| panic!("no install line in\n{text}"));
    assert!(
        line.contains("usr") && line.contains("/s") && line.contains("left"),
        "{line}"
    );

    let out = apply.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(status(&world, true).trim()).unwrap();
    assert!(v["progress"].is_null(), "{v}");
    assert_eq!(v["phase"]["phase"], "staged", "{v}");
    assert!(!world.state_dir.join("progress.json").exists());
}
