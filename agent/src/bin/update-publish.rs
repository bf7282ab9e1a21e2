//! `update-publish`: the operators' tool to make keys, prepare images, and sign and check
//! manifests. A thin CLI over `update_agent::publish`; all bytes come from `updater_proto`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use semver::Version;
use update_agent::publish::{self, PublishError};
use updater_proto::{Compression, Manifest, VerifyContext, SCHEMA_VERSION};

#[derive(Debug, Parser)]
#[command(
    name = "update-publish",
    version,
    about = "Sign and check update manifests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write the man pages (section 1) and shell completions into a directory (packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Directory to write man/man1/ and completions/{bash,zsh,fish}/ under.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate an ed25519 signing key (PKCS#8, mode 0600) and its public key file.
    Keygen {
        /// Private key file to write.
        #[arg(long)]
        private: PathBuf,
        /// Public key file to write (JSON with keytype, keyid, public).
        #[arg(long)]
        public: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Compress and hash an image into the repository directory; print its entry as JSON.
    Image {
        /// The raw partition image.
        #[arg(long)]
        input: PathBuf,
        /// Repository directory (where the manifest will live).
        #[arg(long)]
        out_dir: PathBuf,
        /// Partition role in the slot, e.g. root, boot, verity.
        #[arg(long)]
        role: String,
        /// none or zstd.
        #[arg(long, default_value = "zstd")]
        compression: Compression,
        /// zstd compression level.
        #[arg(long, default_value_t = publish::DEFAULT_ZSTD_LEVEL)]
        level: i32,
        /// Also write the entry JSON to this file (input for `manifest --image`).
        #[arg(long)]
        entry_out: Option<PathBuf>,
        /// Publish for delta updates: one zstd frame per content-defined chunk plus a chunk
        /// index (needs zstd; the manifest becomes schema version 2). See docs/delta.md.
        #[arg(long)]
        chunked: bool,
        /// Chunk sizes MIN/AVG/MAX in bytes for --chunked (default measured on Debian images:
        /// docs/benchmarks.md, delta benchmark).
        #[arg(long, default_value = "2048/8192/32768", value_parser = parse_chunk_sizes)]
        chunk_sizes: updater_proto::ChunkParams,
    },
    /// Build a manifest and sign it with one or more keys.
    Manifest {
        /// Signed manifest file to write.
        #[arg(long)]
        out: PathBuf,
        /// Private key to sign with; repeat for several signatures.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Product/board compatibility string.
        #[arg(long)]
        product: String,
        /// Release channel.
        #[arg(long)]
        channel: String,
        /// Image version (semver).
        #[arg(long)]
        version: Version,
        /// Per-channel serial; must grow with every manifest published on the channel.
        #[arg(long)]
        serial: u64,
        /// Validity from issue time, e.g. 7d, 12h.
        #[arg(long)]
        expires_in: String,
        /// Issue time (Unix seconds or RFC 3339); default now.
        #[arg(long)]
        issued_at: Option<String>,
        /// Image entry file from `image --entry-out` (an entry or an array); repeatable.
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
        /// Rollout wave SEED_BOUND@WHEN (WHEN: +DURATION after issue, Unix seconds or RFC 3339); repeatable, in order.
        #[arg(long = "wave")]
        waves: Vec<String>,
        /// Minimum running version allowed to install this release directly.
        #[arg(long)]
        min_version: Option<Version>,
    },
    /// Pack a signed manifest, the images it names and the trust roots beside it into one
    /// offline bundle for `update-agent apply --bundle` (docs/bundles.md). The bundle
    /// expires with its manifest: sign that manifest with a validity that covers its time
    /// on the shelf (`manifest --expires-in 180d`).
    Bundle {
        /// The signed manifest; the files it names are read from its directory.
        #[arg(long)]
        manifest: PathBuf,
        /// The bundle file to write (a ustar archive).
        #[arg(long)]
        out: PathBuf,
    },
    /// Trust roots: key rotation and revocation (docs/security.md, the ceremony).
    Root {
        #[command(subcommand)]
        command: RootCommand,
    },
    /// Verify a signed manifest against trusted keys; exit 1 with the error kind on failure.
    Verify {
        /// The signed manifest.
        manifest: PathBuf,
        /// Trusted public key file; repeatable.
        #[arg(long = "trusted", required = true)]
        trusted: Vec<PathBuf>,
        /// Distinct trusted signatures required.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// This host's product string (compatibility check).
        #[arg(long)]
        product: String,
        /// Also require this channel.
        #[arg(long)]
        channel: Option<String>,
        /// Lowest acceptable serial.
        #[arg(long, default_value_t = 0)]
        serial_floor: u64,
        /// Check expiry at this time (Unix seconds or RFC 3339) instead of now.
        #[arg(long)]
        now: Option<String>,
        /// Machine-readable output on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// The two roles of a root, as options (`rotate` keeps a role whose keys are not given).
#[derive(Debug, clap::Args)]
struct RootRoles {
    /// Public key file of a root-signing key; repeatable.
    #[arg(long = "root-key")]
    root_keys: Vec<PathBuf>,
    /// Distinct root keys that must sign the next root.
    #[arg(long)]
    root_threshold: Option<usize>,
    /// Public key file of a manifest-signing key; repeatable.
    #[arg(long = "manifest-key")]
    manifest_keys: Vec<PathBuf>,
    /// Distinct manifest keys that must sign a manifest.
    #[arg(long)]
    manifest_threshold: Option<usize>,
    /// Validity from now, e.g. 365d; publish a new root before it runs out.
    #[arg(long, default_value = "365d")]
    expires_in: String,
    /// Private key to sign with; repeatable.
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum RootCommand {
    /// Write root version 1 (ship it on hosts as [trust] root_file, publish it as 1.root.json).
    Init {
        /// Root file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        roles: RootRoles,
    },
    /// Write root N+1 from root N; a key left out of a role is revoked.
    Rotate {
        /// The current root (N.root.json).
        #[arg(long)]
        previous: PathBuf,
        /// Root file to write (publish as N+1.root.json once signed).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        roles: RootRoles,
    },
    /// Add signatures to a root file in place (each key holder in turn).
    Sign {
        /// The root file.
        file: PathBuf,
        /// Private key to sign with; repeatable.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Check a root as hosts will: alone (root 1) or as the successor of --previous.
    Verify {
        /// The root file.
        file: PathBuf,
        /// The root it must follow.
        #[arg(long)]
        previous: Option<PathBuf>,
    },
}

fn role_spec(keys: Vec<PathBuf>, threshold: Option<usize>) -> publish::root::RoleSpec {
    publish::root::RoleSpec { keys, threshold }
}

fn describe_root(r: &updater_proto::Root) -> String {
    format!(
        "root version {}: root keys {} of {}, manifest keys {} of {}, expires {}",
        r.version,
        r.root.threshold,
        r.root.keys.len(),
        r.manifest.threshold,
        r.manifest.keys.len(),
        publish::format_time(r.expires_at)
    )
}

fn run_root(command: RootCommand) -> Result<(), Failure> {
    let expires = |text: &str| -> Result<i64, Failure> {
        let validity = publish::parse_duration(text)?;
        now_unix()
            .checked_add(validity)
            .ok_or_else(|| usage("--expires-in: too large".into()))
    };
    match command {
        RootCommand::Init { out, roles } => {
            let r = publish::root::init_root(
                &out,
                &role_spec(roles.root_keys, roles.root_threshold),
                &role_spec(roles.manifest_keys, roles.manifest_threshold),
                expires(&roles.expires_in)?,
                &roles.keys,
            )?;
            println!("wrote {} ({})", out.display(), describe_root(&r));
            match publish::root::verify_root_file(&out, None) {
                Ok(_) => println!("ready: signed by a threshold of its own root keys"),
                Err(e) => println!("not ready yet [{}]: {e}; run `root sign`", e.kind()),
            }
        }
        RootCommand::Rotate {
            previous,
            out,
            roles,
        } => {
            let r = publish::root::rotate_root(
                &previous,
                &out,
                &role_spec(roles.root_keys, roles.root_threshold),
                &role_spec(roles.manifest_keys, roles.manifest_threshold),
                expires(&roles.expires_in)?,
                &roles.keys,
            )?;
            println!("wrote {} ({})", out.display(), describe_root(&r));
            match publish::root::verify_root_file(&out, Some(&previous)) {
                Ok(_) => println!("ready: publish it as {}.root.json", r.version),
                Err(e) => println!("not ready yet [{}]: {e}; run `root sign`", e.kind()),
            }
        }
        RootCommand::Sign { file, keys } => {
            let env = publish::root::sign_root_file(&file, &keys)?;
            println!(
                "{} now has {} signature(s)",
                file.display(),
                env.signatures.len()
            );
        }
        RootCommand::Verify { file, previous } => {
            let t = publish::root::verify_root_file(&file, previous.as_deref())?;
            println!("OK: {}", describe_root(t.root()));
            for s in t.signers() {
                println!("  signer {s}");
            }
        }
    }
    Ok(())
}

fn parse_chunk_sizes(s: &str) -> Result<updater_proto::ChunkParams, String> {
    let parts: Vec<u32> = s
        .split('/')
        .map(|p| p.parse::<u32>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    let [min, avg, max] = parts[..] else {
        return Err(format!("{s:?}: expected MIN/AVG/MAX"));
    };
    let p = updater_proto::ChunkParams { min, avg, max };
    p.validate().map_err(|e| e.to_string())?;
    Ok(p)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn time_arg(flag: &str, value: Option<&str>) -> Result<i64, String> {
    match value {
        None => Ok(now_unix()),
        Some(v) => publish::parse_time(v, now_unix()).map_err(|e| format!("--{flag}: {e}")),
    }
}

/// A failure with its machine-readable kind.
struct Failure {
    kind: &'static str,
    message: String,
}

impl From<PublishError> for Failure {
    fn from(e: PublishError) -> Self {
        Failure {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

fn usage(message: String) -> Failure {
    Failure {
        kind: "usage",
        message,
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Root { command } => run_root(command)?,
        Command::GenerateDocs { out } => {
            let files =
                update_agent::cli::docs::generate(Cli::command(), "1", &out).map_err(|e| {
                    Failure {
                        kind: "io",
                        message: format!("writing into {}: {e}", out.display()),
                    }
                })?;
            for f in files {
                println!("{}", f.display());
            }
        }
        Command::Bundle { manifest, out } => {
            let b = publish::bundle::write_bundle(&manifest, &out)?;
            println!(
                "bundled {} {} serial {} ({} member(s), {} bytes), expires {} with its manifest",
                b.channel,
                b.version,
                b.serial,
                b.members.len(),
                b.bytes,
                publish::format_time(b.expires_at)
            );
            for m in &b.members {
                println!("  {m}");
            }
            println!("wrote {}", b.out.display());
        }
        Command::Keygen {
            private,
            public,
            force,
        } => {
            let made = publish::generate_key(&private, &public, force)?;
            println!("key id {}", made.key_id);
            println!("private key {} (mode 0600)", made.private_path.display());
            println!("public key {}", made.public_path.display());
        }
        Command::Image {
            input,
            out_dir,
            role,
            compression,
            level,
            entry_out,
            chunked,
            chunk_sizes,
        } => {
            let entry = if chunked {
                if compression != Compression::Zstd {
                    return Err(usage("--chunked needs --compression zstd".into()));
                }
                publish::prepare_chunked_image(&input, &out_dir, &role, level, chunk_sizes)?
            } else {
                publish::prepare_image_level(&input, &out_dir, &role, compression, level)?
            };
            let mut json = serde_json::to_vec_pretty(&entry).unwrap_or_default();
            json.push(b'\n');
            if let Some(path) = entry_out {
                publish::write_atomic(&path, &json, 0o644, publish::WriteMode::Replace)?;
            }
            print!("{}", String::from_utf8_lossy(&json));
        }
        Command::Manifest {
            out,
            keys,
            product,
            channel,
            version,
            serial,
            expires_in,
            issued_at,
            images,
            waves,
            min_version,
        } => {
            let issued_at = time_arg("issued-at", issued_at.as_deref()).map_err(usage)?;
            let validity = publish::parse_duration(&expires_in)?;
            let expires_at = issued_at
                .checked_add(validity)
                .ok_or_else(|| usage("--expires-in: too large".into()))?;
            let mut entries = Vec::new();
            for path in &images {
                entries.extend(publish::load_image_entries(path)?);
            }
            let waves = waves
                .iter()
                .map(|w| publish::parse_wave(w, issued_at))
                .collect::<Result<Vec<_>, _>>()?;
            let signing_keys = keys
                .iter()
                .map(|k| publish::load_signing_key(k))
                .collect::<Result<Vec<_>, _>>()?;
            // Schema v2 only when an entry needs it: v1 agents keep reading the rest.
            let schema_version = if entries.iter().any(|e| e.chunk_index.is_some()) {
                updater_proto::SCHEMA_VERSION_CHUNKED
            } else {
                SCHEMA_VERSION
            };
            let manifest = Manifest {
                schema_version,
                product,
                channel,
                version,
                serial,
                issued_at,
                expires_at,
                min_running_version: min_version,
                waves,
                images: entries,
            };
            let bytes = publish::sign_manifest(&manifest, &signing_keys)?;
            publish::write_atomic(&out, &bytes, 0o644, publish::WriteMode::Replace)?;
            println!(
                "signed {} {} serial {} for {} ({} image(s), {} signature(s)), expires {}",
                manifest.channel,
                manifest.version,
                manifest.serial,
                manifest.product,
                manifest.images.len(),
                signing_keys.len(),
                publish::format_time(expires_at)
            );
            println!("wrote {}", out.display());
        }
        Command::Verify {
            manifest,
            trusted,
            threshold,
            product,
            channel,
            serial_floor,
            now,
            json,
        } => {
            let now = time_arg("now", now.as_deref()).map_err(usage)?;
            let policy = publish::load_policy(&trusted, threshold)?;
            let mut ctx = VerifyContext::new(now, serial_floor, product);
            ctx.channel = channel;
            let verified = match publish::verify_manifest_file(&manifest, &policy, &ctx) {
                Ok(v) => v,
                Err(e) => {
                    if json {
                        print_json(&serde_json::json!({
                            "ok": false, "kind": e.kind(), "message": e.to_string(),
                        }));
                    }
                    return Err(e.into());
                }
            };
            let m = verified.manifest();
            if json {
                print_json(&serde_json::json!({
                    "ok": true,
                    "signers": verified.signers(),
                    "payload_sha256": hex::encode(verified.payload_sha256()),
                    "manifest": m,
                }));
            } else {
                println!(
                    "OK: {} signed by {} of {} required trusted key(s)",
                    manifest.display(),
                    verified.signers().len(),
                    policy.threshold()
                );
                for s in verified.signers() {
                    println!("  signer {s}");
                }
                println!("product  {}", m.product);
                println!("channel  {}", m.channel);
                println!("version  {}", m.version);
                println!("serial   {}", m.serial);
                println!("issued   {}", publish::format_time(m.issued_at));
                println!("expires  {}", publish::format_time(m.expires_at));
                if let Some(min) = &m.min_running_version {
                    println!("min running version {min}");
                }
                for w in &m.waves {
                    println!(
                        "wave     seeds < {} from {}",
                        w.seed_bound,
                        publish::format_time(w.start)
                    );
                }
                for i in &m.images {
                    println!(
                        "image    {} {} ({} bytes, {} {} bytes) sha256 {}",
                        i.role, i.url, i.size, i.compression, i.compressed_size, i.sha256
                    );
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UPDATE_PUBLISH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error[{}]: {}", f.kind, f.message);
            ExitCode::FAILURE
        }
    }
}
