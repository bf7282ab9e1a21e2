//! `update-agent-sandbox`: runs the sandbox demo (the README's main-job command).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use update_agent::cli::{init_logging, output::Output};
use update_agent_sandbox::DemoArgs;

/// The agent's test sandbox.
#[derive(Debug, Parser)]
#[command(name = "update-agent-sandbox", version, about, long_about = None)]
struct Cli {
    /// Print machine-readable JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Log level filter for diagnostics on stderr (e.g. `info`, `update_agent=debug`).
    #[arg(long, global = true, env = "UPDATE_AGENT_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole job in a self-contained sandbox: a GPT disk image file, keys, a signed
    /// update served over loopback, reboots through the boot simulator.
    Demo(DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let out = Output::new(cli.json);
    match cli.command {
        Command::Demo(args) => match update_agent_sandbox::demo::run(&args, out) {
            Ok(code) => code,
            Err(e) => {
                out.error(&e);
                ExitCode::from(1)
            }
        },
    }
}
