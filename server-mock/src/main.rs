//! `server-mock --dir REPO [--addr 127.0.0.1:0] [--tls-cert CERT.pem --tls-key KEY.pem]`:
//! serve a repository (over https with a certificate); the first line on stdout is
//! `listening on http[s]://ADDR` so scripts can read the port.

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
    /// FleetLock reboot slots of every group not named by --fleetlock-group.
    #[arg(long, default_value_t = 1)]
    fleetlock_slots: u32,
    /// FleetLock slots of one group, `NAME=N` (repeatable).
    #[arg(long, value_parser = parse_group)]
    fleetlock_group: Vec<(String, u32)>,
    /// Free a FleetLock slot held longer than this many seconds (default: held until released).
    #[arg(long)]
    fleetlock_ttl: Option<u64>,
    /// Serve https with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn parse_group(s: &str) -> Result<(String, u32), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=SLOTS"))?;
    let n = n
        .parse()
        .map_err(|e| format!("{s:?}: slots {n:?} is not a number: {e}"))?;
    Ok((name.to_string(), n))
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
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => match server_mock::TlsIdentity::from_files(c, k) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("server-mock: {e} ({})", e.kind());
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let mut handle = match server_mock::Server::start_with(&args.dir, args.addr, tls).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("server-mock: {e} ({})", e.kind());
            return ExitCode::FAILURE;
        }
    };
    handle
        .fleetlock()
        .configure(server_mock::FleetLockSettings {
            default_slots: args.fleetlock_slots,
            groups: args.fleetlock_group.into_iter().collect(),
            ttl_ms: args.fleetlock_ttl.map(|s| s.saturating_mul(1000)),
        });
    let mut out = std::io::stdout().lock();
    if writeln!(out, "listening on {}", handle.url())
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(out);
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("server-mock: cannot handle SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = tokio::select! {
        () = handle.wait() => ExitCode::FAILURE,
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        _ = term.recv() => ExitCode::SUCCESS,
    };
    // The fleet as the agents last reported it, for whoever ran the rollout.
    let summary = handle.reports().summary();
    if summary.hosts > 0 {
        print!("{}", summary.render());
    }
    code
}
