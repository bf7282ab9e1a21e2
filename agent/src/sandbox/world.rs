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

use crate::boot::gptprio::GptPrioFlags;
use crate::boot::grubenv::{self, EnvLocation};
use crate::boot::{sim, sim_grub, SlotId};
use crate::config::Config;
use crate::disk::{BlockDevice, FileDevice, Gpt, ResolvedSlots};
use crate::host::Host;
use crate::sandbox::disk_image::{self, Preset};
use crate::state::{SlotRecord, StateStore};

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
}

impl Backend {
    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "gptprio" => Some(Backend::Gptprio),
            "grubenv" => Some(Backend::Grubenv),
            _ => None,
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
    pub grubenv: PathBuf,
    pub config_path: PathBuf,
    /// Stands in for `/proc/sys/kernel/random/boot_id`: a fresh id on every [`World::boot`].
    pub boot_id: PathBuf,
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
            crate::publish::generate_key(&private, &public, false).map_err(setup)?;
            keys.push(crate::publish::load_signing_key(&private).map_err(setup)?);
            key_entries += &format!("[[trust.keys]]\nfile = {:?}\n\n", public);
        }

        let server = server_mock::Server::start(&repo, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(setup)?;

        let world = World {
            dir: dir.to_path_buf(),
            cmdline: dir.join("cmdline"),
            grubenv: dir.join("grubenv"),
            config_path: dir.join("config.toml"),
            boot_id: dir.join("boot_id"),
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
        let backend_name = match backend {
            Backend::Gptprio => "gptprio",
            Backend::Grubenv => "grubenv",
        };
        let config = format!(
            "[disk]\npath = {disk:?}\nlayout = {layout:?}\n\n\
             [boot]\nbackend = {backend_name:?}\ngrubenv_path = {grubenv:?}\ncmdline_path = {cmdline:?}\n\n\
             [server]\nmanifest_url = {url:?}\n\n\
             [trust]\nproduct = {PRODUCT:?}\nchannel = {CHANNEL:?}\nthreshold = 2\n\n{key_entries}\
             [state]\ndir = {state:?}\n\n\
             [install]\nconnect_timeout = \"5s\"\nread_timeout = \"10s\"\n\n\
             [health]\nrequired_dir = {required:?}\nwanted_dir = {wanted:?}\n\
             check_timeout = \"10s\"\ntotal_timeout = \"60s\"\n\n\
             [reboot]\ncommand = [\"true\"]\n",
            disk = world.disk,
            layout = preset.name(),
            grubenv = world.grubenv,
            cmdline = world.cmdline,
            url = world.manifest_url(),
            state = world.state_dir,
            required = world.required_d,
            wanted = world.wanted_d,
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
    pub fn host(&self) -> Result<Host, crate::error::AgentError> {
        let config = self.config()?;
        Host::open(config)
    }

    pub fn config(&self) -> Result<Config, crate::error::AgentError> {
        let sources = crate::config::ConfigSources {
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
        crate::ops::commit::mark_good(&host).map_err(setup)?;
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
            let entry = crate::publish::prepare_image(&src, &self.repo, role, spec.compression)
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
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
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
        let signed = crate::publish::sign_manifest(&manifest, &self.keys).map_err(setup)?;
        std::fs::write(self.repo.join("manifest.json"), signed)
            .map_err(io("writing manifest.json"))?;
        Ok(manifest)
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
        std::fs::write(&self.boot_id, format!("{}\n", uuid::Uuid::new_v4()))
            .map_err(io("writing the boot id"))?;
        Ok(slot)
    }

    /// How the health check finds this world's boot id.
    pub fn health_options(&self) -> crate::ops::health::HealthOptions {
        crate::ops::health::HealthOptions {
            boot_id_path: self.boot_id.clone(),
        }
    }

    /// Run `update-agent health-check` for the current (simulated) boot.
    pub fn health_check(
        &self,
    ) -> Result<crate::ops::health::HealthReport, crate::error::AgentError> {
        crate::ops::health::health_check(&self.host()?, &self.health_options())
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
