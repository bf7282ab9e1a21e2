//! Issue 4, end to end: sign, serve over loopback, `apply` into a GPT disk image, reboot
//! through the boot simulator, and check what booted, byte for byte, in every seed layout
//! with both boot-control backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use e2e_tests::{
    apply_default, assert_slot_holds, cgpt_flags, have_tool, snapshot, state, world, SlotSnapshot,
};
use update_agent::boot::SlotId;
use update_agent::state::Phase;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

async fn install_and_boot(preset: Preset, backend: Backend) {
    let (_dir, mut world) = world(preset, backend, 12).await;
    let release = world.publish("2.0.0", Vec::new()).unwrap();
    let a_before = snapshot(&world, SlotId::A);

    let report = apply_default(&world).await.unwrap();
    assert_eq!(report.slot, SlotId::B);
    assert_eq!(report.booted, SlotId::A);
    assert_eq!(report.version, "2.0.0");
    let roles: Vec<_> = report.targets.iter().map(|t| t.role.clone()).collect();
    let mut expected: Vec<_> = release.images.iter().map(|i| i.role.clone()).collect();
    expected.sort();
    let mut got = roles.clone();
    got.sort();
    assert_eq!(got, expected, "every role of the slot was installed");
    assert!(release.images.len() >= if preset == Preset::Flatcar { 1 } else { 2 });
    let total: u64 = release.images.iter().map(|i| i.size).sum();
    assert_eq!(report.bytes_written, total, "{report:?}");
    for t in &report.targets {
        let image = release.images.iter().find(|i| i.role == t.role).unwrap();
        assert_eq!(t.sha256, hex::encode(image.sha256), "{t:?}");
        assert!(t.readback.is_some(), "read-back is on by default: {t:?}");
    }
    assert_eq!(
        state(&world).phase,
        Phase::Staged {
            slot: SlotId::B,
            version: "2.0.0".into()
        }
    );
    // The active slot: every byte of every partition, and its boot flags.
    assert_eq!(snapshot(&world, SlotId::A), a_before, "slot A changed");
    check_with_tools(&world);
    if backend == Backend::Gptprio {
        // Staged as the loaders expect: above A, one try, not yet successful; A untouched.
        if let Some(b) = cgpt_flags(&world, SlotId::B) {
            assert_eq!(
                b,
                (2, 1, 0),
                "cgpt show of slot B (priority, tries, successful)"
            );
            assert_eq!(cgpt_flags(&world, SlotId::A), Some((1, 0, 1)));
        }
    }

    // Reboot: the loader's own choice is the new slot, and it holds the release exactly.
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    assert_slot_holds(&world, SlotId::B, &release);
    let a_after: SlotSnapshot = snapshot(&world, SlotId::A);
    assert_eq!(a_after.digests, a_before.digests);
    check_with_tools(&world);
}

/// Tools nobody here wrote agree that what we wrote is well-formed.
fn check_with_tools(world: &World) {
    match world.backend {
        // With bls, uboot and efi the flags live elsewhere, but the slots are still GPT
        // partitions.
        Backend::Gptprio | Backend::Bls | Backend::Uboot | Backend::Efi => {
            if have_tool("sgdisk", "gdisk") {
                let out = Command::new("sgdisk")
                    .arg("-v")
                    .arg(&world.disk)
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "sgdisk -v failed: {text}");
                assert!(text.contains("No problems found"), "sgdisk -v: {text}");
            }
        }
        Backend::Grubenv => {
            if have_tool("grub-editenv", "grub-common") {
                let out = Command::new("grub-editenv")
                    .arg(&world.grubenv)
                    .arg("list")
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "grub-editenv list failed: {text}");
                assert!(text.contains("A_OK=1"), "grub-editenv list: {text}");
                assert!(text.contains("ORDER="), "grub-editenv list: {text}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn flatcar_gptprio() {
    install_and_boot(Preset::Flatcar, Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn flatcar_grubenv() {
    install_and_boot(Preset::Flatcar, Backend::Grubenv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chromeos_gptprio() {
    install_and_boot(Preset::ChromeOs, Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chromeos_grubenv() {
    install_and_boot(Preset::ChromeOs, Backend::Grubenv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bottlerocket_gptprio() {
    install_and_boot(Preset::Bottlerocket, Backend::Gptprio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bottlerocket_grubenv() {
    install_and_boot(Preset::Bottlerocket, Backend::Grubenv).await;
}
