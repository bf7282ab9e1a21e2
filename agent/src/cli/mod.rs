//! The command line: parse, call the library, print. No logic of its own beyond presentation.

pub mod dbus;
pub mod docs;
use crate::progress::live;
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
    /// Fetch and verify the manifest and say what `apply` would do. Changes nothing but the
    /// serial floor, which every verified manifest raises.
    Check(ManifestArgs),
    /// Install the update into the inactive slot and stage it for the next boot.
    Apply(ApplyArgs),
    /// Loader set-up helpers (print what the loader needs from this agent).
    #[command(subcommand)]
    Boot(BootCommand),
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// State record commands.
    #[command(subcommand)]
    State(StateCommand),
    /// Once per boot (before boot-complete.target): on a trial boot run the health checks and
    /// commit or roll back; detect a fallback; on a normal boot confirm the booted slot.
    HealthCheck(HealthCheckArgs),
    /// After boot-complete.target: commit the trial boot whose `health-check --no-commit`
    /// passed (update-agent-commit.service); refuses if the check did not pass on this boot.
    Commit(CommitArgs),
    /// Mark the booted slot good (commit it) without running the checks.
    MarkGood,
    /// Make the other slot (it must hold a verified, good image) boot next; denylist this one.
    Rollback(RollbackArgs),
    /// Stop a running install (it resumes later from its checkpoints) or drop a staged update
    /// before the reboot; the booted slot boots next again.
    Cancel,
    /// Installs, commits, rollbacks and failures with their times and reasons.
    History(HistoryArgs),
    /// The rollback drill: fail the next trial boot on purpose, then report the timeline.
    #[command(subcommand)]
    Drill(DrillCommand),
    /// Run unattended: poll the manifest, install when this host's wave opens, reboot as the
    /// strategy allows (immediate, maintenance window, FleetLock); stops cleanly on SIGTERM.
    Daemon(DaemonArgs),
    /// Serve the local API on D-Bus (org.updateagent.Agent1, root only; docs/dbus.md) until
    /// SIGTERM.
    Dbus(DbusArgs),
    /// Write the man pages (section 8) and shell completions into a directory (packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Directory to write man/man8/ and completions/{bash,zsh,fish}/ under.
        #[arg(long)]
        out: PathBuf,
    },
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
    /// Install from an offline bundle (`update-publish bundle`): its manifest is verified
    /// like a fetched one and its images are checked before anything is written.
    #[arg(long, value_name = "FILE", conflicts_with = "manifest")]
    pub bundle: Option<PathBuf>,
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
    /// Only record a passed trial; `update-agent commit` commits it after boot-complete.target.
    #[arg(long)]
    pub no_commit: bool,
}

#[derive(Debug, Args)]
pub struct CommitArgs {
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
pub enum StateCommand {
    /// Move state.json aside (to state.json.corrupt-<time>) and start afresh, keeping the
    /// serial floor and the denylist.
    Reset {
        /// Also forget the serial floor and the denylist.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BootCommand {
    /// Print the grub.cfg slot-selection script for the grubenv backend (RAUC's variables),
    /// counting `--tries` attempts per slot; menu entries 1 (A) and 2 (B) follow it.
    GrubCfg {
        /// Boot attempts a slot gets (default: the configuration's `[boot] tries`).
        #[arg(long)]
        tries: Option<u8>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the merged configuration (main file and drop-ins) as TOML.
    Show,
}

#[derive(Debug, Args)]
pub struct DbusArgs {
    /// A D-Bus address to serve on instead of the system bus (a private bus:
    /// `unix:path=/run/test/bus`).
    #[arg(long, value_name = "ADDRESS")]
    pub address: Option<String>,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// One cycle (poll, install, reboot decision), print its outcome, exit.
    #[arg(long)]
    pub once: bool,
}

/// Diagnostics go through `tracing`, filtered by `--log` / `UPDATE_AGENT_LOG`: to the
/// journal with structured fields when stderr is systemd's journal stream, otherwise to
/// stderr, in colour only when stderr is a terminal (and `NO_COLOR` is unset).
pub fn init_logging(filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || {
        tracing_subscriber::EnvFilter::try_new(filter)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    };
    let journal = stderr_is_journal_stream();
    if journal {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer
                .with_field_prefix(Some("UPDATE_AGENT".into()))
                .with_syslog_identifier("update-agent".into());
            let _ = tracing_subscriber::registry()
                .with(filter())
                .with(layer)
                .try_init();
            return;
        }
    }
    let colour = !journal
        && std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .try_init();
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` for a service whose stderr is the journal;
/// it counts only while fd 2 is still that stream (not when a child redirected it).
fn stderr_is_journal_stream() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (
        dev.parse::<nix::libc::dev_t>(),
        ino.parse::<nix::libc::ino_t>(),
    ) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// `status` with the running install's live progress (`progress`: `null` when none runs).
#[derive(Debug, serde::Serialize)]
struct StatusView<'a> {
    #[serde(flatten)]
    report: &'a crate::ops::status::StatusReport,
    progress: Option<live::LiveProgress>,
}

impl<'a> StatusView<'a> {
    fn new(host: &crate::host::Host, report: &'a crate::ops::status::StatusReport) -> Self {
        // Only while the state record says an install runs: a file whose pid was reused by
        // another process after a kill is not shown.
        let progress = match &report.phase {
            crate::state::Phase::Downloading { version, .. } => {
                live::read(host.state.dir()).map(|mut p| {
                    p.version.get_or_insert_with(|| version.clone());
                    p
                })
            }
            _ => None,
        };
        StatusView { report, progress }
    }

    fn render(&self) -> String {
        let mut out = self.report.render();
        if let Some(p) = &self.progress {
            out += &p.render();
            out += "\n";
        }
        out
    }
}

/// `check`'s exit status: 0 when `apply` would install the offered release, 2 when there is
/// nothing to do (this host already runs it), 3 when the policy refuses it (older,
/// denylisted, below the minimum version); failures exit 1 (docs/json.md).
pub(crate) fn check_exit_code(report: &crate::ops::check::CheckReport) -> std::process::ExitCode {
    match report.refused.as_ref().map(|(kind, _)| kind.as_str()) {
        None => std::process::ExitCode::SUCCESS,
        Some("already_running" | "already_staged") => std::process::ExitCode::from(2),
        Some(_) => std::process::ExitCode::from(3),
    }
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
            let view = StatusView::new(&host, &report);
            out.emit(&view, || view.render());
        }
        Command::Boot(BootCommand::GrubCfg { tries }) => {
            let tries = match tries {
                Some(t) => t,
                None => load_config(cli.config)?.boot.tries,
            };
            let text = crate::boot::grubenv::grub_cfg_selection(tries)
                .map_err(crate::boot::BootError::from)?;
            out.emit(
                &serde_json::json!({"tries": tries, "grub_cfg": text}),
                || text.trim_end().to_string(),
            );
        }
        Command::Config(ConfigCommand::Show) => {
            let config = load_config(cli.config)?;
            let text = config.to_toml_string()?;
            out.emit(&config, || text.clone());
        }
        Command::State(StateCommand::Reset { all }) => {
            let host = Host::open(load_config(cli.config)?)?;
            let report = ops::reset::reset(&host, all)?;
            out.emit(&report, || report.render());
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
            return Ok(check_exit_code(&report));
        }
        Command::Apply(args) => {
            let host = Host::open(load_config(cli.config)?)?;
            let opts = ops::apply::ApplyOptions {
                manifest: args.manifest.manifest,
                bundle: args.bundle,
                allow_downgrade: args.manifest.allow_downgrade,
                allow_denylisted: args.manifest.allow_denylisted,
                no_readback: args.no_readback,
            };
            let mut bar = progress::Progress::new(out.progress);
            let mut live = live::LiveWriter::new(host.state.dir(), None, host.clock.clone());
            let result =
                crate::host::runtime()?.block_on(ops::apply::apply(&host, &opts, &mut |ev| {
                    live.event(&ev);
                    bar.event(ev)
                }));
            drop(live);
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
                ..Default::default()
            };
            let report = if args.no_commit {
                ops::health::health_check_no_commit(&host, &opts)?
            } else {
                ops::health::health_check(&host, &opts)?
            };
            out.emit(&report, || report.render());
            if !report.healthy() {
                return Ok(std::process::ExitCode::from(1));
            }
        }
        Command::Commit(args) => {
            let host = Host::open(load_config(cli.config)?)?;
            let opts = ops::health::HealthOptions {
                boot_id_path: args.boot_id_path,
                ..Default::default()
            };
            let report = ops::health::commit_passed(&host, &opts)?;
            out.emit(&report, || report.render());
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
        Command::Dbus(args) => {
            dbus::serve(load_config(cli.config)?, args.address.as_deref())?;
        }
        Command::GenerateDocs { out: dir } => {
            use clap::CommandFactory;
            let files = docs::generate(Cli::command(), "8", &dir).map_err(|source| {
                crate::error::AgentError::Io {
                    what: format!("writing man pages and completions into {}", dir.display()),
                    source,
                }
            })?;
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            out.emit(&serde_json::json!({"files": names}), || names.join("\n"));
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
