#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The sandbox's disk images are real GPT disks: sgdisk agrees with the layout we asked for.

use std::process::Command;
use update_agent_sandbox::disk_image::{create, Preset};

fn sgdisk() -> Option<&'static str> {
    if Command::new("sgdisk").arg("--version").output().is_ok() {
        return Some("sgdisk");
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("sgdisk is missing under CI: apt-get install gdisk");
    }
    eprintln!("skipping: sgdisk not found (apt-get install gdisk)");
    None
}

#[test]
fn presets_make_valid_gpt_with_fixed_partition_numbers() {
    let Some(tool) = sgdisk() else { return };
    let dir = tempfile::tempdir().unwrap();
    for preset in [Preset::Flatcar, Preset::ChromeOs, Preset::Bottlerocket] {
        let path = dir.path().join(format!("{}.img", preset.name()));
        create(&path, &preset.parts(4)).unwrap();
        let out = Command::new(tool).arg("-v").arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: sgdisk -v failed: {text}",
            preset.name()
        );
        assert!(
            text.contains("No problems found"),
            "{}: {text}",
            preset.name()
        );
        for spec in preset.parts(4) {
            let out = Command::new(tool)
                .arg("-i")
                .arg(spec.number.to_string())
                .arg(&path)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(&format!("Partition name: '{}'", spec.label)),
                "{} partition {}: {text}",
                preset.name(),
                spec.number
            );
        }
    }
}
