//! Issue 9 item 8: key rotation and revocation through a signed, versioned trust root, end to
//! end: a host on the sandbox's real HTTP server walks `N+1.root.json` before each manifest,
//! persists each root it accepts, and verifies manifests with the newest root's keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use update_agent::ops;
use update_agent::publish::root::{init_root, rotate_root, RoleSpec};
use update_agent::publish::{self, generate_key, load_signing_key};
use update_agent::trust;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

struct Fixture {
    _dir: tempfile::TempDir,
    world: World,
    keys: PathBuf,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let world = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 8)
            .await
            .unwrap();
        let keys = dir.path().join("root-keys");
        std::fs::create_dir_all(&keys).unwrap();
        Fixture {
            _dir: dir,
            world,
            keys,
        }
    }

    /// A fresh key pair named `name`: (private, public).
    fn key(&self, name: &str) -> (PathBuf, PathBuf) {
        let (private, public) = (
            self.keys.join(format!("{name}.key")),
            self.keys.join(format!("{name}.pub")),
        );
        generate_key(&private, &public, false).unwrap();
        (private, public)
    }

    /// The sandbox's two release keys (its manifests are signed by both).
    fn world_manifest_keys(&self) -> RoleSpec {
        RoleSpec {
            keys: (0..2)
                .map(|i| self.world.dir.join("keys").join(format!("release-{i}.pub")))
                .collect(),
            threshold: Some(2),
        }
    }

    fn root_file(&self, version: u64) -> PathBuf {
        self.keys.join(format!("{version}.root.json"))
    }

    /// Ship root 1 (root key `k1`, the sandbox's manifest keys) on the host.
    fn ship_root_1(&self) -> (PathBuf, PathBuf) {
        let k1 = self.key("k1");
        init_root(
            &self.root_file(1),
            &role(&[&k1.1], 1),
            &self.world_manifest_keys(),
            expires(),
            std::slice::from_ref(&k1.0),
        )
        .unwrap();
        self.world
            .set_config(
                "trust",
                "root_file",
                self.root_file(1).display().to_string(),
            )
            .unwrap();
        k1
    }

    /// Root `version` (from `version-1`'s file), signed by `sign_with`, published in the
    /// repository as `<published_as>.root.json`.
    fn rotate(
        &self,
        version: u64,
        root: RoleSpec,
        manifest: RoleSpec,
        sign_with: &[&Path],
        published_as: u64,
    ) {
        self.rotate_until(version, root, manifest, sign_with, published_as, expires())
    }

    /// As [`Fixture::rotate`], expiring at `expires_at`.
    fn rotate_until(
        &self,
        version: u64,
        root: RoleSpec,
        manifest: RoleSpec,
        sign_with: &[&Path],
        published_as: u64,
        expires_at: i64,
    ) {
        rotate_root(
            &self.root_file(version - 1),
            &self.root_file(version),
            &root,
            &manifest,
            expires_at,
            &sign_with
                .iter()
                .map(|p| p.to_path_buf())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        std::fs::copy(
            self.root_file(version),
            self.world.repo.join(format!("{published_as}.root.json")),
        )
        .unwrap();
    }

    async fn check(&self) -> Result<ops::check::CheckReport, update_agent::error::AgentError> {
        let host = self.world.host().unwrap();
        ops::check::check(&host, None, false, false).await
    }

    fn persisted_version(&self) -> Option<u64> {
        trust::load_persisted(&self.world.state_dir)
            .unwrap()
            .map(|r| r.version())
    }

    fn root_gets(&self) -> Vec<String> {
        self.world
            .server
            .request_log()
            .into_iter()
            .filter(|e| e.method == "GET")
            .map(|e| format!("{} {}", e.path, e.status))
            .collect()
    }
}

fn role(keys: &[&Path], threshold: usize) -> RoleSpec {
    RoleSpec {
        keys: keys.iter().map(|p| p.to_path_buf()).collect(),
        threshold: Some(threshold),
    }
}

fn keep() -> RoleSpec {
    RoleSpec::default()
}

fn expires() -> i64 {
    jiff::Timestamp::now().as_second() + 86_400
}

#[tokio::test]
async fn root_1_reaches_root_5_through_2_3_4_in_one_poll() {
    let mut f = Fixture::new().await;
    let mut prev = f.ship_root_1();
    let mut revoked = vec![publish::load_public_key(&prev.1)
        .unwrap()
        .key_id()
        .to_owned()];
    for v in 2..=5 {
        let next = f.key(&format!("k{v}"));
        // Root v replaces root v-1's only key: signed by the old key and the new one.
        f.rotate(v, role(&[&next.1], 1), keep(), &[&prev.0, &next.0], v);
        if v < 5 {
            revoked.push(
                publish::load_public_key(&next.1)
                    .unwrap()
                    .key_id()
                    .to_owned(),
            );
        }
        prev = next;
    }
    f.world.publish("2.0.0", Vec::new()).unwrap();
    f.world.server.clear_log();

    let report = f.check().await.unwrap();
    assert_eq!(report.version, "2.0.0");
    assert_eq!(f.persisted_version(), Some(5));
    // One poll: 2, 3, 4, 5, then 6 is absent, then the manifest.
    assert_eq!(
        f.root_gets(),
        [
            "/2.root.json 200",
            "/3.root.json 200",
            "/4.root.json 200",
            "/5.root.json 200",
            "/6.root.json 404",
            "/manifest.json 200",
        ]
    );
    let held = trust::load_persisted(&f.world.state_dir).unwrap().unwrap();
    let mut got: Vec<String> = held.revoked().iter().cloned().collect();
    revoked.sort();
    got.sort();
    assert_eq!(got, revoked, "k1..k4 were left out on the way");
    let mode = std::fs::metadata(trust::root_path(&f.world.state_dir))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The next poll finds nothing new and fetches only 6.root.json.
    f.world.server.clear_log();
    f.check().await.unwrap();
    assert_eq!(f.root_gets(), ["/6.root.json 404", "/manifest.json 200"]);
}

#[tokio::test]
async fn one_to_two_to_three_with_a_threshold_of_two() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    let (a, b) = (f.key("a"), f.key("b"));
    // Root 2: two root keys, both required; root 3 keeps them, one signature junk-free each.
    f.rotate(2, role(&[&a.1, &b.1], 2), keep(), &[&k1.0, &a.0, &b.0], 2);
    f.rotate(3, keep(), keep(), &[&a.0, &b.0], 3);
    f.world.publish("2.0.0", Vec::new()).unwrap();
    f.check().await.unwrap();
    assert_eq!(f.persisted_version(), Some(3));
}

#[tokio::test]
async fn a_root_signed_only_by_the_new_keys_is_refused() {
    let mut f = Fixture::new().await;
    f.ship_root_1();
    let n = f.key("new");
    f.rotate(2, role(&[&n.1], 1), keep(), &[&n.0], 2);
    f.world.publish("2.0.0", Vec::new()).unwrap();
    let e = f.check().await.unwrap_err();
    assert_eq!(e.kind(), "root_threshold_previous", "{e}");
    assert_eq!(
        f.persisted_version(),
        None,
        "nothing accepted, nothing written"
    );
}

#[tokio::test]
async fn a_root_without_its_own_threshold_is_refused() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    let n = f.key("new");
    f.rotate(2, role(&[&n.1], 1), keep(), &[&k1.0], 2);
    f.world.publish("2.0.0", Vec::new()).unwrap();
    let e = f.check().await.unwrap_err();
    assert_eq!(e.kind(), "root_threshold_self", "{e}");
}

#[tokio::test]
async fn a_root_that_skips_a_version_is_refused() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    // Root 2 is made but never published; root 3 is served as 2.root.json.
    f.rotate(2, keep(), keep(), &[&k1.0], 99);
    f.rotate(3, keep(), keep(), &[&k1.0], 2);
    f.world.publish("2.0.0", Vec::new()).unwrap();
    let e = f.check().await.unwrap_err();
    assert_eq!(e.kind(), "root_version_skipped", "{e}");
    assert_eq!(f.persisted_version(), None);
}

#[tokio::test]
async fn a_root_signed_by_a_revoked_key_is_refused() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    let k2 = f.key("k2");
    // Root 2 revokes k1; whoever holds k1 then makes a root 3 that trusts k1 again.
    f.rotate(2, role(&[&k2.1], 1), keep(), &[&k1.0, &k2.0], 2);
    f.rotate(3, role(&[&k1.1], 1), keep(), &[&k1.0], 3);
    f.world.publish("2.0.0", Vec::new()).unwrap();
    let e = f.check().await.unwrap_err();
    assert_eq!(e.kind(), "root_revoked_key", "{e}");
    assert_eq!(
        f.persisted_version(),
        Some(2),
        "root 2 was accepted before 3 was refused"
    );
}

#[tokio::test]
async fn after_rotation_a_manifest_signed_by_a_revoked_key_is_refused() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    let release = f.world.publish("2.0.0", Vec::new()).unwrap();
    f.check().await.unwrap();
    // Root 2 replaces both manifest keys with m.
    let m = f.key("m");
    f.rotate(2, keep(), role(&[&m.1], 1), &[&k1.0], 2);
    let e = f.check().await.unwrap_err();
    assert_eq!(e.kind(), "untrusted_key", "{e}");
    assert_eq!(f.persisted_version(), Some(2));
    // The same release signed by the new key is accepted.
    let signed =
        publish::sign_manifest(&release.manifest, &[load_signing_key(&m.0).unwrap()]).unwrap();
    std::fs::write(f.world.repo.join("manifest.json"), signed).unwrap();
    assert_eq!(f.check().await.unwrap().version, "2.0.0");
}

#[tokio::test]
async fn the_persisted_root_survives_a_restart_and_a_lost_state_file() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    let m = f.key("m");
    f.rotate(2, keep(), role(&[&m.1], 1), &[&k1.0], 2);
    f.world.publish("2.0.0", Vec::new()).unwrap();
    assert_eq!(f.check().await.unwrap_err().kind(), "untrusted_key");
    assert_eq!(f.persisted_version(), Some(2));

    // Restart with state.json gone and the server no longer offering root 2: the host
    // still holds root 2 (not the shipped root 1), so the old keys stay revoked.
    std::fs::remove_file(f.world.state_dir.join("state.json")).ok();
    std::fs::remove_file(f.world.repo.join("2.root.json")).unwrap();
    let host = f.world.host().unwrap();
    let st = trust::status(&host);
    assert_eq!(st.root_version, Some(2));
    assert_eq!(st.root_source, Some(trust::RootSource::Persisted));
    let e = f.check().await.unwrap_err();
    assert_eq!(e.kind(), "untrusted_key", "{e}");
    assert_eq!(f.persisted_version(), Some(2));
}

#[tokio::test]
async fn a_tampered_persisted_root_is_an_error_not_a_fallback() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    f.rotate(2, keep(), keep(), &[&k1.0], 2);
    f.world.publish("2.0.0", Vec::new()).unwrap();
    f.check().await.unwrap();
    let path = trust::root_path(&f.world.state_dir);
    let text = std::fs::read_to_string(&path).unwrap();
    // Drop the signatures: the file no longer proves anything.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["root"]["signatures"] = serde_json::json!([]);
    std::fs::write(&path, v.to_string()).unwrap();
    let e = f.check().await.unwrap_err();
    assert_eq!(e.kind(), "root_persisted_corrupt", "{e}");
}

#[tokio::test]
async fn one_poll_walks_at_most_32_roots_and_the_next_goes_on() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    for v in 2..=40 {
        f.rotate(v, keep(), keep(), &[&k1.0], v);
    }
    f.world.publish("2.0.0", Vec::new()).unwrap();
    f.world.server.clear_log();
    f.check().await.unwrap();
    assert_eq!(f.persisted_version(), Some(33), "1 + 32 steps");
    let roots = f
        .root_gets()
        .iter()
        .filter(|g| g.contains(".root.json"))
        .count();
    assert_eq!(roots, 32, "no request past the bound");
    f.check().await.unwrap();
    assert_eq!(f.persisted_version(), Some(40));
}

#[tokio::test]
async fn an_oversized_root_is_refused() {
    let mut f = Fixture::new().await;
    f.ship_root_1();
    std::fs::write(
        f.world.repo.join("2.root.json"),
        vec![b' '; updater_proto::MAX_ROOT_BYTES + 4096],
    )
    .unwrap();
    f.world.publish("2.0.0", Vec::new()).unwrap();
    let e = f.check().await.unwrap_err();
    assert_eq!(e.kind(), "root_too_large", "{e}");
    assert_eq!(f.persisted_version(), None);
}

#[tokio::test]
async fn expiry_counts_only_for_the_newest_root() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    let now = jiff::Timestamp::now().as_second();
    // Root 2 expired long ago (a host offline for a year still walks through it) ...
    f.rotate_until(2, keep(), keep(), &[&k1.0], 2, now - 365 * 86_400);
    f.rotate(3, keep(), keep(), &[&k1.0], 3);
    f.world.publish("2.0.0", Vec::new()).unwrap();
    f.check().await.unwrap();
    assert_eq!(f.persisted_version(), Some(3));
    // ... but an expired newest root refuses manifests: a freeze, or a missed re-signing.
    f.rotate_until(4, keep(), keep(), &[&k1.0], 4, now - 60);
    let e = f.check().await.unwrap_err();
    assert_eq!(e.kind(), "root_expired", "{e}");
    assert_eq!(f.persisted_version(), Some(4));
    let st = trust::status(&f.world.host().unwrap());
    assert!(st.root_error.unwrap().contains("root_expired"));
    // Re-signing the same keys as root 5 with a new expiry repairs it.
    f.rotate(5, keep(), keep(), &[&k1.0], 5);
    f.check().await.unwrap();
}

#[tokio::test]
async fn status_shows_the_root_in_use() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&f.world.config_path)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("trust root: version 1 (shipped [trust] root_file)"),
        "{text}"
    );
    assert!(text.contains("manifest keys: 2 of 2"), "{text}");
    f.rotate(2, keep(), keep(), &[&k1.0], 2);
    f.world.publish("2.0.0", Vec::new()).unwrap();
    f.check().await.unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&f.world.config_path)
        .arg("--json")
        .arg("status")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["trust"]["root_version"], 2);
    assert_eq!(v["trust"]["root_source"], "persisted");
}

#[tokio::test]
async fn a_local_manifest_walks_the_roots_beside_it() {
    let mut f = Fixture::new().await;
    let k1 = f.ship_root_1();
    let m = f.key("m");
    f.rotate(2, keep(), role(&[&m.1], 1), &[&k1.0], 2);
    let release = f.world.publish("2.0.0", Vec::new()).unwrap();
    let signed =
        publish::sign_manifest(&release.manifest, &[load_signing_key(&m.0).unwrap()]).unwrap();
    let local = f.world.repo.join("manifest.json");
    std::fs::write(&local, signed).unwrap();
    f.world.server.clear_log();
    let host = f.world.host().unwrap();
    let report = ops::check::check(&host, Some(local.to_str().unwrap()), false, false)
        .await
        .unwrap();
    assert_eq!(report.version, "2.0.0");
    assert_eq!(
        f.persisted_version(),
        Some(2),
        "2.root.json read from the directory"
    );
    assert!(
        f.world.server.request_log().is_empty(),
        "nothing over the network"
    );
}
