//! The command line: parse, call the library, print. No logic of its own beyond presentation.

pub mod output;
pub mod progress;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A/B partition atomic update agent.
#[derive(Debug, Parser)]
#[command(name = "update-agent", version, about, long_about = None)]
pub struct Cli {
    /// Main configuration file (drop-ins in config.d/ directories are merged too).
    #[arg(long, global = true, env = "UPDATE_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log level filter for diagnostics on stderr (e.g. `info`, `update_agent=debug`).
    #[arg(long, global = true, env = "UPDATE_AGENT_LOG", default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the slots, their boot flags, which slot is booted, which boots next and why.
    Status,
    /// Fetch and verify the manifest and say what `apply` would do, without changing anything.
    Check(ManifestArgs),
    /// Install the update into the inactive slot and stage it for the next boot.
    Apply(ApplyArgs),
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run the whole job in a self-contained sandbox: a GPT disk image file, keys, a signed
    /// update served over loopback, reboots through the boot simulator.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// Manifest URL or local file (default: the configured server's manifest URL).
    #[arg(long)]
    pub manifest: Option<String>,
    /// Install even if the version is not newer than the running one.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// Install even a version this host rolled back from (it is on the local denylist).
    #[arg(long)]
    pub allow_denylisted: bool,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// Reboot into the new slot when it is staged.
    #[arg(long, conflicts_with = "no_reboot")]
    pub reboot: bool,
    /// Do not reboot (the default); the new slot boots at the next reboot.
    #[arg(long)]
    pub no_reboot: bool,
    /// Skip the read-back verification after writing (faster, less safe).
    #[arg(long)]
    pub no_readback: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the merged configuration (main file and drop-ins) as TOML.
    Show,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Work in this directory instead of a fresh temporary one (it is kept afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Disk layout of the sandbox: flatcar, chromeos or bottlerocket.
    #[arg(long, default_value = "flatcar")]
    pub layout: String,
    /// Boot-control backend: gptprio or grubenv.
    #[arg(long, default_value = "gptprio")]
    pub backend: String,
}

/// Diagnostics go to stderr through `tracing`, filtered by `--log` / `UPDATE_AGENT_LOG`.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn load_config(path: Option<PathBuf>) -> Result<crate::config::Config, crate::error::AgentError> {
    let sources = crate::config::ConfigSources::system(path);
    Ok(crate::config::Config::load(&sources)?)
}

fn runtime() -> Result<tokio::runtime::Runtime, crate::error::AgentError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| crate::error::AgentError::Io {
            what: "starting the async runtime".into(),
            source,
        })
}

/// Runs one command and prints its result.
pub fn run(
    cli: Cli,
    out: output::Output,
) -> Result<std::process::ExitCode, crate::error::AgentError> {
    use crate::host::Host;
    use crate::ops;
    match cli.command {
        Command::Status => {
            let host = Host::open(load_config(cli.config)?)?;
            let report = ops::status::status(&host)?;
            out.emit(&report, || report.render());
        }
        Command::Config(ConfigCommand::Show) => {
            let config = load_config(cli.config)?;
            let text = config.to_toml_string()?;
            out.emit(&config, || text.clone());
        }
        Command::Check(args) => {
            let host = Host::open(load_config(cli.config)?)?;
            let report = runtime()?.block_on(ops::check::check(
                &host,
                args.manifest.as_deref(),
                args.allow_downgrade,
                args.allow_denylisted,
            ))?;
            out.emit(&report, || report.render());
        }
        Command::Apply(args) => {
            let host = Host::open(load_config(cli.config)?)?;
            let opts = ops::apply::ApplyOptions {
                manifest: args.manifest.manifest,
                allow_downgrade: args.manifest.allow_downgrade,
                allow_denylisted: args.manifest.allow_denylisted,
                no_readback: args.no_readback,
            };
            let mut bar = progress::Progress::new(out.progress_json);
            let result =
                runtime()?.block_on(ops::apply::apply(&host, &opts, &mut |ev| bar.event(ev)));
            bar.finish();
            let report = result?;
            out.emit(&report, || report.render());
            if args.reboot {
                ops::reboot::reboot(&host)?;
            }
        }
        Command::Demo(args) => {
            let code = crate::sandbox::demo::run(&args, out)?;
            return Ok(code);
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
