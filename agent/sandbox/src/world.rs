//! A complete little world for one host: a GPT disk image whose slot A runs a "factory"
//! release, publisher keys, a repository served by server-mock over loopback, the agent's
//! configuration and state directory, and reboots through the boot simulator.
//!
//! The demo and the end-to-end tests drive the real agent code through it; nothing here stands
//! in for product code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ring::digest::{digest, SHA256};
use updater_proto::{Compression, Manifest, SigningKey, Wave};

use crate::disk_image::{self, Preset};
use crate::{sim, sim_bls, sim_efi, sim_grub, sim_uboot};
use update_agent::boot::gptprio::GptPrioFlags;
use update_agent::boot::grubenv::{self, EnvLocation};
use update_agent::boot::SlotId;
use update_agent::config::Config;
use update_agent::disk::{BlockDevice, FileDevice, Gpt, ResolvedSlots};
use update_agent::host::Host;
use update_agent::state::{SlotRecord, StateStore};

/// Entry names of slots A and B with the bls backend.
pub const BLS_NAME_A: &str = "sandbox-a";
pub const BLS_NAME_B: &str = "sandbox-b";
/// Size of each U-Boot environment copy with the uboot backend (a redundant pair).
pub const UBOOT_ENV_SIZE: usize = 0x4000;
/// `Boot####` numbers of slots A and B with the efi backend, and a non-slot option (the
/// firmware's built-in shell) the sandbox puts last in `BootOrder`.
pub const EFI_ENTRIES: [u16; 2] = [0x0001, 0x0002];
pub const EFI_OTHER_ENTRY: u16 = 0x0000;

/// The release the sandbox disk ships with in slot A.
pub const FACTORY_VERSION: &str = "1.0.0";
pub const PRODUCT: &str = "sandbox-board";
pub const CHANNEL: &str = "stable";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox: {0}")]
    Setup(String),
}

impl SandboxError {
    pub fn kind(&self) -> &'static str {
        match self {
            SandboxError::Io { .. } => "sandbox_io",
            SandboxError::Setup(_) => "sandbox_setup",
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

fn setup(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Setup(e.to_string())
}

/// Which boot-control backend the sandbox host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gptprio,
    Grubenv,
    /// systemd-boot boot counting, simulated by [`sim_bls`].
    Bls,
    /// RAUC's U-Boot script on a redundant environment, simulated by [`sim_uboot`].
    Uboot,
    /// The UEFI boot manager (BootNext / BootOrder), simulated by [`sim_efi`].
    Efi,
}

impl Backend {
    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "gptprio" => Some(Backend::Gptprio),
            "grubenv" => Some(Backend::Grubenv),
            "bls" => Some(Backend::Bls),
            "uboot" => Some(Backend::Uboot),
            "efi" => Some(Backend::Efi),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gptprio => "gptprio",
            Backend::Grubenv => "grubenv",
            Backend::Bls => "bls",
            Backend::Uboot => "uboot",
            Backend::Efi => "efi",
        }
    }
}

/// A published release: its version and each role's image size and SHA-256.
#[derive(Debug, Clone)]
pub struct Release {
    pub version: String,
    pub serial: u64,
    pub images: Vec<ReleaseImage>,
    /// The manifest as signed and served, so tests can alter and re-serve it.
    pub manifest: Manifest,
}

/// What to publish, with the knobs tests need to make bad releases. [`PublishSpec::new`]
/// gives a good release: zstd images, no waves, valid for a week, this sandbox's product.
#[derive(Debug, Clone)]
pub struct PublishSpec {
    pub version: String,
    pub compression: Compression,
    pub waves: Vec<Wave>,
    /// Seconds from now until the manifest expires; zero or negative: already expired.
    pub expires_in_secs: i64,
    pub product: String,
    /// Image length for these roles instead of the default share of the partition.
    pub image_len: BTreeMap<String, u64>,
}

impl PublishSpec {
    pub fn new(version: &str) -> PublishSpec {
        PublishSpec {
            version: version.to_string(),
            compression: Compression::Zstd,
            waves: Vec::new(),
            expires_in_secs: 7 * 24 * 3600,
            product: PRODUCT.to_string(),
            image_len: BTreeMap::new(),
        }
    }

    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    pub fn expires_in_secs(mut self, secs: i64) -> Self {
        self.expires_in_secs = secs;
        self
    }

    pub fn product(mut self, product: &str) -> Self {
        self.product = product.to_string();
        self
    }

    pub fn image_len(mut self, role: &str, len: u64) -> Self {
        self.image_len.insert(role.to_string(), len);
        self
    }
}

#[derive(Debug, Clone)]
pub struct ReleaseImage {
    pub role: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// One sandboxed host and its update server.
#[derive(Debug)]
pub struct World {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub repo: PathBuf,
    pub state_dir: PathBuf,
    pub cmdline: PathBuf,
    /// Stands in for the booted slot's `/etc/os-release` (`[system] os_release_path`):
    /// rewritten on every [`World::boot`] from the release found in the booted slot.
    pub os_release: PathBuf,
    pub grubenv: PathBuf,
    /// bls backend: the ESP's `loader/entries` directory and the `LoaderEntrySelected` file.
    pub bls_entries: PathBuf,
    pub bls_entry_selected: PathBuf,
    /// uboot backend: libubootenv's configuration and the image holding both copies.
    pub fw_env_config: PathBuf,
    pub uboot_env: PathBuf,
    /// efi backend (and bls' systemd-boot variables): the efivarfs-format directory.
    pub efivars: PathBuf,
    pub config_path: PathBuf,
    /// Stands in for `/proc/sys/kernel/random/boot_id`: a fresh id on every [`World::boot`].
    pub boot_id: PathBuf,
    /// Stands in for `/proc/uptime`: a simulated boot is instant, so the kernel's boot time
    /// the health check records is the instant it started.
    pub proc_uptime: PathBuf,
    /// `[health] required_dir` and `wanted_dir`.
    pub required_d: PathBuf,
    pub wanted_d: PathBuf,
    pub preset: Preset,
    pub backend: Backend,
    pub server: server_mock::ServerHandle,
    keys: Vec<SigningKey>,
    serial: u64,
    /// Size of each slot's main partition in MiB.
    pub slot_mib: u64,
}

impl World {
    /// Builds the world in `dir` (which must exist and be empty) and starts its server.
    pub async fn create(
        dir: &Path,
        preset: Preset,
        backend: Backend,
        slot_mib: u64,
    ) -> Result<World, SandboxError> {
        let disk = dir.join("disk.img");
        let repo = dir.join("repo");
        let state_dir = dir.join("state");
        let keys_dir = dir.join("keys");
        for d in [&repo, &keys_dir] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        disk_image::create(&disk, &preset.parts(slot_mib)).map_err(setup)?;

        let mut keys = Vec::new();
        let mut key_entries = String::new();
        for i in 0..2 {
            let private = keys_dir.join(format!("release-{i}.key"));
            let public = keys_dir.join(format!("release-{i}.pub"));
            update_agent::publish::generate_key(&private, &public, false).map_err(setup)?;
            keys.push(update_agent::publish::load_signing_key(&private).map_err(setup)?);
            key_entries += &format!("[[trust.keys]]\nfile = {:?}\n\n", public);
        }

        let server = server_mock::Server::start(&repo, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(setup)?;

        let world = World {
            dir: dir.to_path_buf(),
            cmdline: dir.join("cmdline"),
            os_release: dir.join("os-release"),
            grubenv: dir.join("grubenv"),
            bls_entries: dir.join("esp").join("loader").join("entries"),
            bls_entry_selected: dir.join("efivars").join(format!(
                "LoaderEntrySelected-{}",
                update_agent::boot::bls::LOADER_GUID
            )),
            fw_env_config: dir.join("fw_env.config"),
            uboot_env: dir.join("uboot-env.img"),
            efivars: dir.join("efivars"),
            config_path: dir.join("config.toml"),
            boot_id: dir.join("boot_id"),
            proc_uptime: dir.join("uptime"),
            required_d: dir.join("health").join("required.d"),
            wanted_d: dir.join("health").join("wanted.d"),
            disk,
            repo,
            state_dir,
            preset,
            backend,
            server,
            keys,
            serial: 0,
            slot_mib,
        };
        let backend_name = backend.name();
        let config = format!(
            "[disk]\npath = {disk:?}\nlayout = {layout:?}\n\n\
             [boot]\nbackend = {backend_name:?}\ngrubenv_path = {grubenv:?}\ncmdline_path = {cmdline:?}\n{bls}\n\
             [server]\nmanifest_url = {url:?}\n\n\
             [trust]\nproduct = {PRODUCT:?}\nchannel = {CHANNEL:?}\nthreshold = 2\n\n{key_entries}\
             [state]\ndir = {state:?}\n\n\
             [install]\nconnect_timeout = \"5s\"\nread_timeout = \"10s\"\n\n\
             [health]\nrequired_dir = {required:?}\nwanted_dir = {wanted:?}\n\
             check_timeout = \"10s\"\ntotal_timeout = \"60s\"\n\n\
             [reboot]\ncommand = [\"true\"]\n\n\
             [system]\nos_release_path = {os_release:?}\n",
            disk = world.disk,
            layout = preset.name(),
            grubenv = world.grubenv,
            bls = match backend {
                Backend::Bls => format!(
                    "bls_entries_dir = {:?}\nbls_entry_a = {BLS_NAME_A:?}\nbls_entry_b = {BLS_NAME_B:?}\n\
                     bls_entry_selected_path = {:?}\n",
                    world.bls_entries, world.bls_entry_selected
                ),
                Backend::Uboot => format!(
                    "uboot_fw_env_config = {:?}\ntries = 3\n",
                    world.fw_env_config
                ),
                Backend::Efi => format!(
                    "efivars_dir = {:?}\nefi_entry_a = \"{:04X}\"\nefi_entry_b = \"{:04X}\"\n",
                    world.efivars, EFI_ENTRIES[0], EFI_ENTRIES[1]
                ),
                _ => String::new(),
            },
            cmdline = world.cmdline,
            url = world.manifest_url(),
            state = world.state_dir,
            required = world.required_d,
            wanted = world.wanted_d,
            os_release = world.os_release,
        );
        for d in [&world.required_d, &world.wanted_d] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        std::fs::write(&world.config_path, config).map_err(io("writing config.toml"))?;
        world.factory_install()?;
        Ok(world)
    }

    /// The URL of the repository's manifest.
    pub fn manifest_url(&self) -> String {
        self.server.url_for("manifest.json")
    }

    /// The agent's view of this host, from the written config file.
    pub fn host(&self) -> Result<Host, update_agent::error::AgentError> {
        let config = self.config()?;
        Host::open(config)
    }

    pub fn config(&self) -> Result<Config, update_agent::error::AgentError> {
        let sources = update_agent::config::ConfigSources {
            main: Some(self.config_path.clone()),
            dropin_dirs: Vec::new(),
        };
        Ok(Config::load(&sources)?)
    }

    pub fn slots(&self) -> Result<ResolvedSlots, SandboxError> {
        let dev = FileDevice::open_read_only(&self.disk).map_err(setup)?;
        let gpt = Gpt::read(&dev).map_err(setup)?;
        self.preset.layout().resolve(&gpt).map_err(setup)
    }

    /// What the factory does: write release 1.0.0 into slot A, boot it, and mark it good.
    fn factory_install(&self) -> Result<(), SandboxError> {
        let slots = self.slots()?;
        let mut dev = FileDevice::open(&self.disk).map_err(setup)?;
        let mut sums = Vec::new();
        for (role, part) in &slots.a.parts {
            let bytes = image_bytes(FACTORY_VERSION, role, self.image_len(role, part.byte_len));
            dev.write_at(&bytes, part.byte_offset)
                .map_err(io("writing the factory image"))?;
            sums.push(hex::encode(digest(&SHA256, &bytes).as_ref()));
        }
        match self.backend {
            Backend::Gptprio => {
                let mut gpt = Gpt::read(&dev).map_err(setup)?;
                let flags = GptPrioFlags {
                    priority: 1,
                    tries: 0,
                    successful: true,
                };
                let n = slots.a.flags_part;
                let old = gpt.partition(n).map(|e| e.attributes).unwrap_or(0);
                gpt.set_attributes(n, flags.to_attributes(old))
                    .map_err(setup)?;
                gpt.write(&mut dev).map_err(setup)?;
            }
            Backend::Grubenv => {
                grubenv::create_file(&self.grubenv, SlotId::A).map_err(setup)?;
                // Slot B holds nothing yet: not OK, so GRUB never tries it.
                let mut loc = EnvLocation::File(self.grubenv.clone());
                let mut env = loc.read().map_err(setup)?;
                env.set(&grubenv::ok_var(SlotId::B), "0").map_err(setup)?;
                loc.write(&env).map_err(setup)?;
            }
            Backend::Bls => {
                // A type #1 entry per slot; B holds nothing yet: marked bad, so it is never chosen.
                let dirs = [&self.bls_entries, &self.dir.join("efivars")];
                for d in dirs {
                    std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
                }
                for (slot, file) in [
                    (SlotId::A, format!("{BLS_NAME_A}.conf")),
                    (SlotId::B, format!("{BLS_NAME_B}+0-0.conf")),
                ] {
                    let guid = slots.get(slot).flags_partition().map(|p| p.unique_guid);
                    let body = format!(
                        "title Sandbox slot {slot}\nlinux /vmlinuz-{slot}\noptions root=PARTUUID={} ro\n",
                        guid.unwrap_or_default()
                    );
                    std::fs::write(self.bls_entries.join(&file), body)
                        .map_err(io(format!("writing boot entry {file}")))?;
                }
            }
            Backend::Uboot => {
                // A redundant pair in one image; slot B holds nothing yet: out of BOOT_ORDER.
                use update_agent::boot::{uboot, ubootenv::EnvStore};
                std::fs::write(&self.uboot_env, vec![0u8; 2 * UBOOT_ENV_SIZE])
                    .map_err(io("creating the U-Boot environment image"))?;
                let img = self.uboot_env.display();
                std::fs::write(
                    &self.fw_env_config,
                    format!(
                        "# sandbox: a redundant U-Boot environment in one image file\n\
                         {img} 0x0 {UBOOT_ENV_SIZE:#x}\n{img} {UBOOT_ENV_SIZE:#x} {UBOOT_ENV_SIZE:#x}\n"
                    ),
                )
                .map_err(io("writing fw_env.config"))?;
                let mut store = EnvStore::from_fw_env_config(&self.fw_env_config).map_err(setup)?;
                store
                    .provision(&uboot::initial_env(SlotId::A, 3).map_err(setup)?)
                    .map_err(setup)?;
            }
            Backend::Efi => {
                // One load option per slot and the firmware's shell; BootOrder names A then
                // the shell (B holds nothing yet).
                use update_agent::boot::efi::{encode_order, LoadOption, END_DEVICE_PATH};
                use update_agent::boot::efivars::{
                    EfiVar, EfiVarFs, EfiVars, ATTR_NV_BS_RT, GLOBAL_GUID,
                };
                std::fs::create_dir_all(&self.efivars)
                    .map_err(io(format!("creating {}", self.efivars.display())))?;
                let mut vars = EfiVarFs::new(&self.efivars);
                let var = |data: Vec<u8>| EfiVar {
                    attributes: ATTR_NV_BS_RT,
                    data,
                };
                for (n, label) in [
                    (EFI_ENTRIES[0], "sandbox slot A"),
                    (EFI_ENTRIES[1], "sandbox slot B"),
                    (EFI_OTHER_ENTRY, "EFI Internal Shell"),
                ] {
                    let opt = LoadOption::encode(1, label, &END_DEVICE_PATH);
                    vars.set(
                        &update_agent::boot::efi::boot_var(n),
                        GLOBAL_GUID,
                        &var(opt),
                    )
                    .map_err(setup)?;
                }
                vars.set(
                    "BootOrder",
                    GLOBAL_GUID,
                    &var(encode_order(&[EFI_ENTRIES[0], EFI_OTHER_ENTRY])),
                )
                .map_err(setup)?;
            }
        }
        dev.flush().map_err(io("flushing the factory image"))?;
        let store = StateStore::open(&self.state_dir).map_err(setup)?;
        store
            .update(|s| {
                s.slots.insert(
                    SlotId::A,
                    SlotRecord {
                        version: FACTORY_VERSION.into(),
                        image_sha256s: sums,
                        verified: true,
                    },
                );
            })
            .map_err(setup)?;
        let booted = self.boot()?;
        if booted != Some(SlotId::A) {
            return Err(SandboxError::Setup(format!(
                "the factory disk booted {booted:?}, not slot A"
            )));
        }
        // The factory's first boot passes its health checks and is marked good, as on a real
        // host: with the grubenv backend this resets A_TRY, without which the next reboot
        // would find slot A's attempts used up.
        let host = self.host().map_err(setup)?;
        update_agent::ops::commit::mark_good_because(
            &host,
            "factory setup: the sandbox's first boot of the factory release",
        )
        .map_err(setup)?;
        Ok(())
    }

    /// The size of the image for `role`: most of the partition for the main filesystem, a
    /// little for the others, so every image fits.
    fn image_len(&self, role: &str, part_len: u64) -> u64 {
        match role {
            "usr" | "root" => (part_len * 3 / 4).max(4096),
            _ => (part_len / 2).max(4096),
        }
    }

    /// Publish `version`: an image per slot role (zstd), signed by both keys, with the next
    /// serial, as `manifest.json` in the repository.
    pub fn publish(&mut self, version: &str, waves: Vec<Wave>) -> Result<Release, SandboxError> {
        let mut spec = PublishSpec::new(version);
        spec.waves = waves;
        self.publish_with(&spec)
    }

    /// Publish the release `spec` describes: an image per slot role, signed by both keys,
    /// with the next serial, as `manifest.json` in the repository.
    pub fn publish_with(&mut self, spec: &PublishSpec) -> Result<Release, SandboxError> {
        let slots = self.slots()?;
        let scratch = self.dir.join("scratch");
        std::fs::create_dir_all(&scratch).map_err(io("creating scratch dir"))?;
        let mut entries = Vec::new();
        let mut images = Vec::new();
        for (role, part) in &slots.b.parts {
            let len = spec
                .image_len
                .get(role)
                .copied()
                .unwrap_or_else(|| self.image_len(role, part.byte_len));
            let bytes = image_bytes(&spec.version, role, len);
            let src = scratch.join(format!("{role}-{}.img", spec.version));
            std::fs::write(&src, &bytes).map_err(io("writing a release image"))?;
            let entry =
                update_agent::publish::prepare_image(&src, &self.repo, role, spec.compression)
                    .map_err(setup)?;
            let mut sum = [0u8; 32];
            sum.copy_from_slice(digest(&SHA256, &bytes).as_ref());
            images.push(ReleaseImage {
                role: role.clone(),
                size: bytes.len() as u64,
                sha256: sum,
            });
            entries.push(entry);
            let _ = std::fs::remove_file(&src);
        }
        let now = update_agent::clock::Timestamp::now().as_second();
        // An expired manifest is still a well-formed one: issued before it expired.
        let expires_at = now + spec.expires_in_secs;
        let manifest = Manifest {
            schema_version: updater_proto::SCHEMA_VERSION,
            product: spec.product.clone(),
            channel: CHANNEL.into(),
            version: semver::Version::parse(&spec.version).map_err(setup)?,
            serial: 0,
            issued_at: now.min(expires_at - 3600),
            expires_at,
            min_running_version: None,
            waves: spec.waves.clone(),
            images: entries,
        };
        let manifest = self.serve_manifest(manifest)?;
        Ok(Release {
            version: spec.version.clone(),
            serial: manifest.serial,
            images,
            manifest,
        })
    }

    /// Sign `manifest` with both keys under the next serial and serve it as `manifest.json`
    /// (for tests that alter a published manifest). Returns the manifest as signed.
    pub fn serve_manifest(&mut self, mut manifest: Manifest) -> Result<Manifest, SandboxError> {
        self.serial += 1;
        manifest.serial = self.serial;
        let signed = update_agent::publish::sign_manifest(&manifest, &self.keys).map_err(setup)?;
        std::fs::write(self.repo.join("manifest.json"), signed)
            .map_err(io("writing manifest.json"))?;
        Ok(manifest)
    }

    /// `[reboot] command` touches `flag` instead of rebooting, so a test can see that the
    /// agent asked for a reboot.
    pub fn reboot_by_touching(&self, flag: &Path) -> Result<(), SandboxError> {
        self.set_config(
            "reboot",
            "command",
            toml::Value::Array(vec!["touch".into(), flag.display().to_string().into()]),
        )
    }

    /// Set `[table] key = value` in the host's config.toml (e.g. `install`, `max_attempts`,
    /// 1), keeping every other key; the next [`World::host`] reads it.
    pub fn set_config(
        &self,
        table: &str,
        key: &str,
        value: impl Into<toml::Value>,
    ) -> Result<(), SandboxError> {
        let text = std::fs::read_to_string(&self.config_path).map_err(io("reading config.toml"))?;
        let mut doc: toml::Table = text.parse().map_err(setup)?;
        let entry = doc
            .entry(table.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(t) = entry else {
            return Err(SandboxError::Setup(format!(
                "config.toml: [{table}] is not a table"
            )));
        };
        t.insert(key.to_string(), value.into());
        let out = toml::to_string(&doc).map_err(setup)?;
        std::fs::write(&self.config_path, out).map_err(io("writing config.toml"))
    }

    /// Reboot: the boot simulator chooses a slot exactly as the loader would (and updates the
    /// flags as the loader does), then the kernel command line names the booted partition.
    /// `None`: nothing was bootable.
    pub fn boot(&self) -> Result<Option<SlotId>, SandboxError> {
        let slots = self.slots()?;
        let slot = match self.backend {
            Backend::Gptprio => {
                let mut dev = FileDevice::open(&self.disk).map_err(setup)?;
                let booted = sim::boot_gptprio(&mut dev, &self.preset.layout()).map_err(setup)?;
                booted.and_then(|b| b.slot)
            }
            Backend::Grubenv => {
                let tries = self.config().map_err(setup)?.boot.tries;
                let mut loc = EnvLocation::File(self.grubenv.clone());
                sim_grub::boot(&mut loc, tries).map_err(setup)?.booted
            }
            Backend::Bls => {
                let b = self.config().map_err(setup)?.boot;
                let boot = update_agent::boot::bls::BlsBoot::new(
                    &b.bls_entries_dir,
                    &b.bls_entry_a,
                    &b.bls_entry_b,
                    b.tries,
                )
                .map_err(setup)?;
                Some(
                    sim_bls::boot(&boot, Some(&self.bls_entry_selected))
                        .map_err(setup)?
                        .booted,
                )
            }
            Backend::Uboot => {
                let mut store =
                    update_agent::boot::ubootenv::EnvStore::from_fw_env_config(&self.fw_env_config)
                        .map_err(setup)?;
                sim_uboot::boot(&mut store).map_err(setup)?.booted
            }
            Backend::Efi => {
                let mut vars = update_agent::boot::efivars::EfiVarFs::new(&self.efivars);
                sim_efi::boot(&mut vars, EFI_ENTRIES).map_err(setup)?.slot
            }
        };
        let cmdline = match slot {
            Some(s) => {
                let part = slots.get(s).flags_partition().map(|p| p.unique_guid);
                format!(
                    "root=PARTUUID={} rauc.slot={s} ro quiet\n",
                    part.unwrap_or_default()
                )
            }
            None => "rescue\n".to_string(),
        };
        std::fs::write(&self.cmdline, cmdline).map_err(io("writing the kernel command line"))?;
        // What the booted system's /etc/os-release says: the release its image carries.
        let version = match slot {
            Some(s) => self.release_in(&slots, s)?,
            None => None,
        };
        let mut os_release = "ID=sandbox\nNAME=\"update-agent sandbox\"\n".to_string();
        if let Some(v) = version {
            os_release += &format!("VERSION_ID={v}\n");
        }
        std::fs::write(&self.os_release, os_release).map_err(io("writing os-release"))?;
        std::fs::write(&self.boot_id, format!("{}\n", uuid::Uuid::new_v4()))
            .map_err(io("writing the boot id"))?;
        std::fs::write(&self.proc_uptime, "0.00 0.00\n").map_err(io("writing the uptime"))?;
        Ok(slot)
    }

    /// The release whose image is in `slot` (its first partition's second block starts with
    /// [`image_bytes`]' `release <version> role` line), if any.
    fn release_in(
        &self,
        slots: &ResolvedSlots,
        slot: SlotId,
    ) -> Result<Option<String>, SandboxError> {
        let parts = &slots.get(slot).parts;
        let main = parts.get("usr").or_else(|| parts.get("root"));
        let Some(part) = main.or_else(|| parts.values().next()) else {
            return Ok(None);
        };
        let dev = FileDevice::open_read_only(&self.disk).map_err(setup)?;
        let mut block = vec![0u8; 256];
        dev.read_at(&mut block, part.byte_offset + 4096)
            .map_err(io("reading the booted slot's image"))?;
        let text = String::from_utf8_lossy(&block);
        Ok(text
            .strip_prefix("release ")
            .and_then(|rest| rest.split_once(" role "))
            .map(|(v, _)| v.to_string()))
    }

    /// How the health check finds this world's boot id.
    pub fn health_options(&self) -> update_agent::ops::health::HealthOptions {
        update_agent::ops::health::HealthOptions {
            boot_id_path: self.boot_id.clone(),
            uptime_path: self.proc_uptime.clone(),
        }
    }

    /// Run `update-agent health-check` for the current (simulated) boot.
    pub fn health_check(
        &self,
    ) -> Result<update_agent::ops::health::HealthReport, update_agent::error::AgentError> {
        update_agent::ops::health::health_check(&self.host()?, &self.health_options())
    }

    /// Put an executable shell script `name` into `required.d` (or `wanted.d`).
    pub fn add_check(
        &self,
        required: bool,
        name: &str,
        body: &str,
    ) -> Result<PathBuf, SandboxError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = if required {
            &self.required_d
        } else {
            &self.wanted_d
        };
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))
            .map_err(io(format!("writing check {}", path.display())))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(io(format!("chmod {}", path.display())))?;
        Ok(path)
    }

    /// Remove every check script from `required.d` and `wanted.d`.
    pub fn clear_checks(&self) -> Result<(), SandboxError> {
        for d in [&self.required_d, &self.wanted_d] {
            for e in std::fs::read_dir(d).map_err(io(format!("listing {}", d.display())))? {
                let p = e.map_err(io("listing checks"))?.path();
                std::fs::remove_file(&p).map_err(io(format!("removing {}", p.display())))?;
            }
        }
        Ok(())
    }

    /// SHA-256 of the bytes of `slot`'s partition `role`, over `len` bytes.
    pub fn slot_sha256(
        &self,
        slot: SlotId,
        role: &str,
        len: u64,
    ) -> Result<[u8; 32], SandboxError> {
        let slots = self.slots()?;
        let part = slots
            .get(slot)
            .parts
            .get(role)
            .ok_or_else(|| SandboxError::Setup(format!("slot {slot} has no role {role}")))?;
        let dev = FileDevice::open_read_only(&self.disk).map_err(setup)?;
        let mut ctx = ring::digest::Context::new(&SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            dev.read_at(&mut buf[..n], part.byte_offset + done)
                .map_err(io("reading a slot"))?;
            ctx.update(&buf[..n]);
            done += n as u64;
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Ok(out)
    }
}

/// Deterministic image contents for `version`/`role`: text blocks that compress well, with a
/// pseudo-random block in every four so the image is not trivially small.
pub fn image_bytes(version: &str, role: &str, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut block = 0u64;
    while (out.len() as u64) < len {
        if block % 4 == 0 {
            let mut seed = format!("{version}/{role}/{block}").into_bytes();
            for _ in 0..128 {
                let d = digest(&SHA256, &seed);
                out.extend_from_slice(d.as_ref());
                seed = d.as_ref().to_vec();
            }
        } else {
            let line = format!("release {version} role {role} block {block}\n");
            while out.len() % 4096 != 0 || out.len() as u64 == block * 4096 {
                out.extend_from_slice(line.as_bytes());
                if out.len() as u64 >= (block + 1) * 4096 {
                    break;
                }
            }
            out.truncate(((block + 1) * 4096) as usize);
        }
        block += 1;
    }
    out.truncate(len as usize);
    out
}
