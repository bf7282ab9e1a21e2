//! Shared helpers for the end-to-end tests (disk images, servers, external tools).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;

use update_agent::boot::grubenv::{self, EnvLocation};
use update_agent::boot::SlotId;
use update_agent::disk::{FileDevice, Gpt};
use update_agent::error::AgentError;
use update_agent::ops::apply::{apply, ApplyOptions, ApplyReport};
use update_agent::state::{Phase, State, StateStore};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, Release, World};

/// Whether the external tool `name` (from Debian package `package`) can run. Under CI
/// (`CI=true`) a missing tool is a failure, not a skip: CI must install it.
pub fn have_tool(name: &str, package: &str) -> bool {
    let found = Command::new(name)
        .arg("--version")
        .output()
        .map(|_| true)
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is required under CI: apt-get install -y {package}");
        }
        eprintln!("skipping: {name} not found (apt-get install -y {package})");
    }
    found
}

/// A sandboxed host in a temporary directory (kept alive by the returned guard).
pub async fn world(preset: Preset, backend: Backend, slot_mib: u64) -> (tempfile::TempDir, World) {
    let dir = tempfile::tempdir().unwrap();
    let world = World::create(dir.path(), preset, backend, slot_mib)
        .await
        .unwrap();
    (dir, world)
}

/// `update-agent apply` as the CLI runs it: a fresh host from the config file each time (so
/// a second call is an agent restart), default options.
pub async fn apply_default(world: &World) -> Result<ApplyReport, AgentError> {
    apply_with(world, &ApplyOptions::default()).await
}

pub async fn apply_with(world: &World, opts: &ApplyOptions) -> Result<ApplyReport, AgentError> {
    let host = world.host().unwrap();
    apply(&host, opts, &mut |_| {}).await
}

/// SHA-256 of every partition of `slot`, whole partitions, by role.
pub fn slot_digests(world: &World, slot: SlotId) -> BTreeMap<String, [u8; 32]> {
    let slots = world.slots().unwrap();
    slots
        .get(slot)
        .parts
        .iter()
        .map(|(role, p)| {
            (
                role.clone(),
                world.slot_sha256(slot, role, p.byte_len).unwrap(),
            )
        })
        .collect()
}

/// What the boot loader knows about `slot`: its GPT attribute word (gptprio) or its
/// `<slot>_OK`/`<slot>_TRY` variables and whether it is in ORDER (grubenv).
pub fn boot_flags(world: &World, slot: SlotId) -> String {
    match world.backend {
        Backend::Gptprio => {
            let slots = world.slots().unwrap();
            let dev = FileDevice::open_read_only(&world.disk).unwrap();
            let gpt = Gpt::read(&dev).unwrap();
            let attrs = gpt
                .partition(slots.get(slot).flags_part)
                .unwrap()
                .attributes;
            format!("{attrs:016x}")
        }
        Backend::Grubenv => {
            let env = EnvLocation::File(world.grubenv.clone()).read().unwrap();
            let order = env.get("ORDER").unwrap_or("");
            format!(
                "OK={:?} TRY={:?} in_order={}",
                env.get(&grubenv::ok_var(slot)),
                env.get(&grubenv::try_var(slot)),
                order.split_whitespace().any(|s| s == slot.to_string())
            )
        }
        Backend::Bls => {
            // The slot's entry file name carries its state (generation, tries left, done).
            let marker = format!("-{}", slot.to_string().to_lowercase());
            let mut names: Vec<String> = std::fs::read_dir(&world.bls_entries)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(&marker))
                .collect();
            names.sort();
            names.join(",")
        }
        Backend::Uboot => {
            let env =
                update_agent::boot::ubootenv::EnvStore::from_fw_env_config(&world.fw_env_config)
                    .unwrap()
                    .read()
                    .unwrap()
                    .env;
            format!(
                "BOOT_ORDER={:?} LEFT={:?}",
                env.get("BOOT_ORDER"),
                env.get(&format!("BOOT_{slot}_LEFT"))
            )
        }
        Backend::Efi => {
            use update_agent::boot::efivars::{EfiVarFs, EfiVars, GLOBAL_GUID};
            let vars = EfiVarFs::new(&world.efivars);
            let data = |name: &str| vars.get(name, GLOBAL_GUID).unwrap().map(|v| v.data);
            format!(
                "BootOrder={:?} BootNext={:?}",
                data("BootOrder"),
                data("BootNext")
            )
        }
    }
}

/// The active slot as a test sees it: every byte of its partitions and its boot flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSnapshot {
    pub digests: BTreeMap<String, [u8; 32]>,
    pub flags: String,
}

pub fn snapshot(world: &World, slot: SlotId) -> SlotSnapshot {
    SlotSnapshot {
        digests: slot_digests(world, slot),
        flags: boot_flags(world, slot),
    }
}

pub fn state(world: &World) -> State {
    StateStore::open(&world.state_dir).unwrap().load().unwrap()
}

/// Asserts that every image of `release` is in `slot`, byte for byte (hashed over the
/// image's length, as the manifest states it).
pub fn assert_slot_holds(world: &World, slot: SlotId, release: &Release) {
    for image in &release.images {
        let got = world.slot_sha256(slot, &image.role, image.size).unwrap();
        assert_eq!(
            hex::encode(got),
            hex::encode(image.sha256),
            "slot {slot} role {} does not hash to release {}'s value",
            image.role,
            release.version
        );
    }
}

/// Asserts that an apply ended in a clean failure: the error has `kind`, the state record
/// says Failed with that kind, slot A (the active one) is exactly `a_before`, and a reboot
/// boots slot A, the old slot, not the half-written one.
pub fn assert_clean_failure(
    world: &World,
    result: Result<ApplyReport, AgentError>,
    kind: &str,
    a_before: &SlotSnapshot,
) -> AgentError {
    let err = match result {
        Ok(r) => panic!(
            "apply succeeded ({}), expected a {kind} failure",
            r.render()
        ),
        Err(e) => e,
    };
    assert_eq!(err.kind(), kind, "wrong error kind; error: {err}");
    match &state(world).phase {
        Phase::Failed { kind: k, message } => {
            assert_eq!(k, kind, "state record kind; message: {message}");
            assert!(!message.is_empty());
        }
        other => panic!("state phase is {other:?}, expected Failed({kind})"),
    }
    assert_eq!(
        &snapshot(world, SlotId::A),
        a_before,
        "the active slot A changed"
    );
    if world.backend == Backend::Gptprio {
        if let Some((p, t, s)) = cgpt_flags(world, SlotId::B) {
            assert!(
                p == 0 || (t == 0 && s == 0),
                "cgpt says slot B is bootable after a failed apply: priority {p} tries {t} successful {s}"
            );
        }
    }
    assert_eq!(
        world.boot().unwrap(),
        Some(SlotId::A),
        "after a failed apply the host must boot the old slot A"
    );
    err
}

/// `(priority, tries, successful)` of `slot`'s flags partition as `cgpt show` reads them,
/// or `None` when cgpt is not installed (outside CI).
pub fn cgpt_flags(world: &World, slot: SlotId) -> Option<(u8, u8, u8)> {
    if !have_tool("cgpt", "cgpt") {
        return None;
    }
    let n = world.slots().unwrap().get(slot).flags_part;
    let field = |flag: &str| -> u8 {
        let out = Command::new("cgpt")
            .args(["show", "-i", &n.to_string(), flag])
            .arg(&world.disk)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "cgpt show {flag}: {text}");
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("cgpt show {flag}: {text:?}"))
    };
    Some((field("-P"), field("-T"), field("-S")))
}

/// The one file in the repository whose name starts with `<role>-` (the content-addressed
/// image of the last publish for that role, when only one was published).
pub fn repo_image(world: &World, role: &str) -> std::path::PathBuf {
    let prefix = format!("{role}-");
    let mut found: Vec<_> = std::fs::read_dir(&world.repo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {role} image in the repo: {found:?}"
    );
    found.pop().unwrap()
}

/// The request path of `role`'s image in `release` (as the request log shows it).
pub fn image_path(release: &Release, role: &str) -> String {
    let entry = release
        .manifest
        .images
        .iter()
        .find(|i| i.role == role)
        .unwrap();
    format!("/{}", entry.url)
}

/// The largest role of a preset: the one that carries the filesystem.
pub fn main_role(preset: Preset) -> &'static str {
    match preset {
        Preset::Flatcar => "usr",
        Preset::ChromeOs | Preset::Bottlerocket => "root",
    }
}

/// The fetcher's own kind (`timeout`, `truncated`, `too_long`, `http_status`...) behind an
/// install's `fetch` error, if that is what `err` is.
pub fn fetch_source_kind(err: &AgentError) -> Option<&'static str> {
    match err {
        AgentError::Install(e) => match e.as_ref() {
            update_agent::install::InstallError::Fetch { source, .. } => Some(source.kind),
            _ => None,
        },
        _ => None,
    }
}
