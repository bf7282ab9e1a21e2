//! `update-publish`: the operators' tool to make keys, prepare images, and sign and check
//! manifests. A thin CLI over `update_agent::publish`; all bytes come from `updater_proto`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
        } => {
            let entry = publish::prepare_image_level(&input, &out_dir, &role, compression, level)?;
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
            let manifest = Manifest {
                schema_version: SCHEMA_VERSION,
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
