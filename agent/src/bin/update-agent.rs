//! `update-agent`: thin entry point; everything lives in the `update_agent` library.

use std::process::ExitCode;

use clap::Parser;
use update_agent::cli::{self, Cli};

fn main() -> ExitCode {
    let args = Cli::parse();
    cli::init_logging(&args.log);
    let out = cli::output::Output::new(args.json);
    match cli::run(args, out) {
        Ok(code) => code,
        Err(e) => {
            out.error(&e);
            ExitCode::from(1)
        }
    }
}
