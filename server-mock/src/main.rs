//! `server-mock --dir REPO [--addr 127.0.0.1:0]`: serve a repository; the first line on
//! stdout is `listening on http://ADDR` so scripts can read the port.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "HTTP repository server with scriptable faults")]
struct Args {
    /// Repository directory to serve (manifests, images).
    #[arg(long)]
    dir: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut handle = match server_mock::Server::start(&args.dir, args.addr).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("server-mock: {e} ({})", e.kind());
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "listening on {}", handle.url())
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(out);
    tokio::select! {
        () = handle.wait() => ExitCode::FAILURE,
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
    }
}
