//! Offline bundles (issue 14 item 10, docs/bundles.md): `update-publish bundle` packs a signed
//! manifest and its images into one ustar file; `update-agent apply --bundle FILE` installs
//! from it with the same checks and pipeline as the network path, and without the network.
//! A truncated, tampered, wrong-product, expired, oversized, malformed or replayed bundle is
//! refused with its own kind before anything is written: slot B's bytes, the boot flags and
//! the phase are as before, and the history records the failure under that kind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use update_agent::boot::SlotId;
use update_agent::ops;
use update_agent::ops::apply::ApplyOptions;
use update_agent::state::{HistoryEvent, Phase};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::testimg::require_tool;
use update_agent_sandbox::world::{Backend, PublishSpec, Release, World};

struct Fixture {
    _dir: tempfile::TempDir,
    world: World,
    release: Release,
    bundle: PathBuf,
}

async fn fixture(spec: PublishSpec) -> Option<Fixture> {
    if !require_tool("sgdisk", "gdisk").unwrap() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 4)
        .await
        .unwrap();
    let release = world.publish_with(&spec).unwrap();
    let bundle = dir.path().join("release.bundle");
    update_agent::publish::bundle::write_bundle(&world.repo.join("manifest.json"), &bundle)
        .unwrap();
    Some(Fixture {
        _dir: dir,
        world,
        release,
        bundle,
    })
}

impl Fixture {
    /// The manifest's entry for the `usr` image.
    fn usr_entry(&self) -> &updater_proto::ImageEntry {
        let images = &self.release.manifest.images;
        images.iter().find(|i| i.role == "usr").unwrap()
    }

    fn usr_len(&self) -> u64 {
        self.release
            .images
            .iter()
            .find(|i| i.role == "usr")
            .unwrap()
            .size
    }

    async fn apply(
        &self,
        bundle: &Path,
    ) -> Result<ops::apply::ApplyReport, update_agent::error::AgentError> {
        let opts = ApplyOptions {
            bundle: Some(bundle.to_path_buf()),
            ..ApplyOptions::default()
        };
        ops::apply::apply(&self.world.host().unwrap(), &opts, &mut |_| {}).await
    }

    /// `bundle` is refused with `kind` and nothing changed that must not.
    async fn refused(&self, bundle: &Path, kind: &str) {
        let b_before = self
            .world
            .slot_sha256(SlotId::B, "usr", self.usr_len())
            .unwrap();
        let host = self.world.host().unwrap();
        let next_before = host.boot_control().unwrap().status().unwrap().next;
        let e = self.apply(bundle).await.unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&bundle.display().to_string()),
            "the message names the bundle: {text}"
        );
        assert_eq!(
            self.world
                .slot_sha256(SlotId::B, "usr", self.usr_len())
                .unwrap(),
            b_before,
            "{kind}: slot B was written"
        );
        // The record says what happened: the failure and its kind; no install began.
        let state = host.state.load().unwrap();
        assert!(
            matches!(&state.phase, Phase::Failed { kind: k, .. } if k == kind),
            "{kind}: {:?}",
            state.phase
        );
        assert!(
            !state
                .history
                .iter()
                .any(|h| h.event == HistoryEvent::InstallStarted
                    && h.version.as_deref() == Some("2.0.0")),
            "{kind}: an install began"
        );
        assert_eq!(
            host.boot_control().unwrap().status().unwrap().next,
            next_before,
            "{kind}: the boot flags changed"
        );
        let last = state.history.last().unwrap();
        assert_eq!(last.event, HistoryEvent::Failed, "{kind}: {last:?}");
        assert_eq!(last.error_kind.as_deref(), Some(kind), "{last:?}");
        assert!(
            self.world.server.request_log().is_empty(),
            "{kind}: used the network"
        );
    }

    /// A copy of the bundle with `edit` applied to its bytes.
    fn edited(&self, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        let mut b = std::fs::read(&self.bundle).unwrap();
        edit(&mut b);
        let p = self.bundle.with_file_name(name);
        std::fs::write(&p, b).unwrap();
        p
    }

    /// Offset and size of member `name` (via the agent's reader, checked against `tar`).
    fn member(&self, name: &str) -> (usize, usize) {
        let b = update_agent::bundle::Bundle::open(&self.bundle).unwrap();
        let m = b.member(name).unwrap();
        (m.offset as usize, m.size as usize)
    }
}

/// A tar holding the single member `name` (not what the publisher writes).
fn one_member_tar(path: &Path, name: &str, bytes: &[u8]) {
    let mut t = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    t.append_data(&mut h, name, bytes).unwrap();
    t.into_inner().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_from_a_bundle_installs_without_the_network() {
    let Some(f) = fixture(PublishSpec::new("2.0.0")).await else {
        return;
    };
    // Plain ustar: GNU tar lists it, manifest first, then the image.
    let out = Command::new("tar")
        .arg("-tf")
        .arg(&f.bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(names[0], "manifest.json", "{names:?}");
    let usr = f.usr_entry();
    assert!(names.contains(&usr.url), "{names:?}");

    let report = f.apply(&f.bundle).await.unwrap();
    assert_eq!(report.slot, SlotId::B);
    assert_eq!(report.version, "2.0.0");
    let want = f.release.images.iter().find(|i| i.role == "usr").unwrap();
    assert_eq!(
        f.world.slot_sha256(SlotId::B, "usr", want.size).unwrap(),
        want.sha256
    );
    assert!(
        f.world.server.request_log().is_empty(),
        "no request to the server"
    );
    assert_eq!(f.world.boot().unwrap(), Some(SlotId::B));
    assert!(f.world.health_check().unwrap().healthy());
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_tampered_and_malformed_bundles_are_refused_before_anything_is_written() {
    let Some(f) = fixture(PublishSpec::new("2.0.0")).await else {
        return;
    };
    let usr = f.usr_entry();
    let (img_at, img_len) = f.member(&usr.url);
    let (man_at, man_len) = f.member("manifest.json");

    // Cut inside the image, and inside the manifest.
    let p = f.edited("cut-image.bundle", |b| b.truncate(img_at + img_len / 2));
    f.refused(&p, "bundle_truncated").await;
    let p = f.edited("cut-manifest.bundle", |b| b.truncate(man_at + man_len / 2));
    f.refused(&p, "bundle_truncated").await;
    // A byte of the image changed: found by the check before the install, not by the install.
    let p = f.edited("image-byte.bundle", |b| b[img_at + img_len / 3] ^= 0x40);
    f.refused(&p, "bundle_image_mismatch").await;
    // A byte of the manifest's signed payload changed (inside the base64 text).
    let p = f.edited("manifest-byte.bundle", |b| {
        let text = &b[man_at..man_at + man_len];
        let at = man_at + text.windows(9).position(|w| w == b"\"payload\"").unwrap() + 20;
        b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    });
    f.refused(&p, "bad_signature").await;
    // Not a bundle at all, and a bundle whose first member is not the manifest.
    let p = f.edited("noise.bundle", |b| b.iter_mut().for_each(|x| *x = 0x5a));
    f.refused(&p, "bundle_format").await;
    let p = f.bundle.with_file_name("image-first.bundle");
    let img = std::fs::read(f.world.repo.join(&usr.url)).unwrap();
    one_member_tar(&p, &usr.url, &img);
    f.refused(&p, "bundle_format").await;
    // A member name that climbs out (written by hand: tar's builder refuses `..`).
    let p = f.edited("dotdot.bundle", |b| {
        let hdr = img_at - 512;
        let name = b"../escape";
        b[hdr..hdr + 100].fill(0);
        b[hdr..hdr + name.len()].copy_from_slice(name);
        b[hdr + 148..hdr + 156].copy_from_slice(b"        ");
        let sum: u32 = b[hdr..hdr + 512].iter().map(|&x| u32::from(x)).sum();
        let field = format!("{sum:06o}\0 ");
        b[hdr + 148..hdr + 156].copy_from_slice(field.as_bytes());
    });
    f.refused(&p, "bundle_member_name").await;
    // The image member missing: the manifest names a file the bundle does not hold.
    let p = f.bundle.with_file_name("no-image.bundle");
    let man = std::fs::read(f.world.repo.join("manifest.json")).unwrap();
    one_member_tar(&p, "manifest.json", &man);
    f.refused(&p, "bundle_member_missing").await;
    // An oversized manifest member is refused unread, by its size in the table.
    let p = f.bundle.with_file_name("huge-manifest.bundle");
    let big = vec![b' '; updater_proto::MAX_ENVELOPE_BYTES + 4096];
    one_member_tar(&p, "manifest.json", &big);
    f.refused(&p, "bundle_member_too_large").await;
    // After all of that, the good bundle still installs.
    assert_eq!(f.apply(&f.bundle).await.unwrap().slot, SlotId::B);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_for_another_product_or_past_its_expiry_is_refused() {
    let Some(f) = fixture(PublishSpec::new("2.0.0").product("another-board")).await else {
        return;
    };
    f.refused(&f.bundle, "wrong_product").await;
    let Some(f) = fixture(PublishSpec::new("2.0.0").expires_in_secs(-60)).await else {
        return;
    };
    f.refused(&f.bundle, "expired").await;
}

/// The serial floor holds for bundles: once the host has verified a newer manifest, an
/// older bundle (a replay from an old USB stick) is refused, and installing from a bundle
/// raises the floor like any verified manifest.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_bundle_is_refused_below_the_serial_floor() {
    let Some(mut f) = fixture(PublishSpec::new("2.0.0")).await else {
        return;
    };
    let old_serial = f.release.serial;
    f.world.publish("3.0.0", Vec::new()).unwrap();
    let host = f.world.host().unwrap();
    ops::check::check(&host, None, false, false).await.unwrap();
    let floor = host.state.serial_floor(&host.config.trust.channel).unwrap();
    assert!(floor > old_serial, "{floor} {old_serial}");
    f.world.server.clear_log();
    f.refused(&f.bundle, "serial_below_floor").await;
}

/// The two binaries as an operator runs them: `update-publish bundle` writes the file and
/// says when it expires; `update-agent --json apply --bundle FILE` installs from it, and a
/// damaged copy fails with its kind in the same JSON error shape as every command.
#[tokio::test(flavor = "multi_thread")]
async fn the_publisher_and_the_agent_cli_round_trip_a_bundle() {
    let Some(f) = fixture(PublishSpec::new("2.0.0")).await else {
        return;
    };
    let out_path = f.bundle.with_file_name("cli.bundle");
    let out = Command::new(env!("CARGO_BIN_EXE_update-publish"))
        .arg("bundle")
        .arg("--manifest")
        .arg(f.world.repo.join("manifest.json"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("expires") && text.contains("manifest.json"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&out_path).unwrap(),
        std::fs::read(&f.bundle).unwrap(),
        "the same manifest bundles to the same bytes"
    );

    let agent = |bundle: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_update-agent"))
            .arg("--config")
            .arg(&f.world.config_path)
            .arg("--json")
            .arg("apply")
            .arg("--bundle")
            .arg(bundle)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), v)
    };
    let damaged = f.edited("cli-damaged.bundle", |b| {
        let n = b.len();
        b.truncate(n / 2)
    });
    let (ok, v) = agent(&damaged);
    assert!(!ok, "{v}");
    assert_eq!(v["error"]["kind"], "bundle_truncated", "{v}");
    let (ok, v) = agent(&out_path);
    assert!(ok, "{v}");
    assert_eq!(v["version"], "2.0.0", "{v}");
    assert_eq!(v["slot"], "B", "{v}");
    assert!(f.world.server.request_log().is_empty());
}
