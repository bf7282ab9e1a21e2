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
    /// Once per boot (before boot-complete.target): on a trial boot run the health checks and
    /// commit or roll back; detect a fallback; on a normal boot confirm the booted slot.
    HealthCheck(HealthCheckArgs),
    /// Mark the booted slot good (commit it) without running the checks.
    MarkGood,
    /// Make the other slot (it must hold a verified, good image) boot next; denylist this one.
    Rollback(RollbackArgs),
    /// Drop a staged update before the reboot; the booted slot boots next again.
    Cancel,
    /// Installs, commits, rollbacks and failures with their times and reasons.
    History(HistoryArgs),
    /// The rollback drill: fail the next trial boot on purpose, then report the timeline.
    #[command(subcommand)]
    Drill(DrillCommand),
    /// Run unattended: poll the manifest, install when this host's wave opens, reboot as the
    /// strategy allows (immediate, maintenance window, FleetLock); stops cleanly on SIGTERM.
    Daemon(DaemonArgs),
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

#[derive(Debug, Args)]
pub struct HealthCheckArgs {
    /// File holding the current boot's id (tests and sandboxes substitute their own).
    #[arg(long, env = "UPDATE_AGENT_BOOT_ID_PATH", default_value = crate::state::BOOT_ID_PATH)]
    pub boot_id_path: PathBuf,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Reboot into the other slot right away.
    #[arg(long)]
    pub reboot: bool,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Show only the newest N entries.
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum DrillCommand {
    /// Make the next trial boot's health check fail on purpose (once).
    Arm,
    /// Remove an armed drill that has not fired.
    Disarm,
    /// The last drill's timeline (staged, rebooted, check failed, flag flipped, booted old
    /// slot) with durations and a pass/fail verdict.
    Report,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the merged configuration (main file and drop-ins) as TOML.
    Show,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// One cycle (poll, install, reboot decision), print its outcome, exit.
    #[arg(long)]
    pub once: bool,
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
            let report = crate::host::runtime()?.block_on(ops::check::check(
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
                crate::host::runtime()?
                    .block_on(ops::apply::apply(&host, &opts, &mut |ev| bar.event(ev)));
            bar.finish();
            let report = result?;
            out.emit(&report, || report.render());
            if args.reboot {
                ops::reboot::reboot(&host)?;
            }
        }
        Command::HealthCheck(args) => {
            let host = Host::open(load_config(cli.config)?)?;
            let opts = ops::health::HealthOptions {
                boot_id_path: args.boot_id_path,
            };
            let report = ops::health::health_check(&host, &opts)?;
            out.emit(&report, || report.render());
            if !report.healthy() {
                return Ok(std::process::ExitCode::from(1));
            }
        }
        Command::MarkGood => {
            let host = Host::open(load_config(cli.config)?)?;
            let report = ops::commit::mark_good(&host)?;
            out.emit(&report, || report.render());
        }
        Command::Rollback(args) => {
            let host = Host::open(load_config(cli.config)?)?;
            let report = ops::rollback::rollback(&host, args.reboot)?;
            out.emit(&report, || report.render());
        }
        Command::Cancel => {
            let host = Host::open(load_config(cli.config)?)?;
            let report = ops::cancel::cancel(&host)?;
            out.emit(&report, || report.render());
        }
        Command::History(args) => {
            let host = Host::open(load_config(cli.config)?)?;
            let report = ops::history::history(&host, args.limit)?;
            out.emit(&report, || report.render());
        }
        Command::Drill(cmd) => {
            let host = Host::open(load_config(cli.config)?)?;
            match cmd {
                DrillCommand::Arm => {
                    let report = ops::drill::arm(&host)?;
                    out.emit(&report, || report.render());
                }
                DrillCommand::Disarm => {
                    let was = ops::drill::disarm(&host)?;
                    out.emit(&serde_json::json!({"disarmed": was}), || {
                        if was {
                            "rollback drill disarmed".into()
                        } else {
                            "no drill was armed".into()
                        }
                    });
                }
                DrillCommand::Report => {
                    let report = ops::drill::report(&host)?;
                    out.emit(&report, || report.render());
                    if report.verdict == ops::drill::DrillVerdict::Fail {
                        return Ok(std::process::ExitCode::from(1));
                    }
                }
            }
        }
        Command::Daemon(args) => {
            let opts = crate::daemon::DaemonOptions { once: args.once };
            return crate::daemon::run(load_config(cli.config)?, opts);
        }
        Command::Demo(args) => {
            let code = crate::sandbox::demo::run(&args, out)?;
            return Ok(code);
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
