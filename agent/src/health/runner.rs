//! The check runner. Every check runs under a timeout (its own, capped by what is left of the
//! total); a check that outlives it fails, and its whole process group is killed, so a hung
//! check can neither block the boot forever (greenboot's gap) nor leave processes behind.
//!
//! Required checks run first and stop at the first failure (the boot fails and should roll
//! back quickly); wanted checks run only after the required ones passed, and their failures
//! are logged and reported, never fatal.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{CheckSpec, HealthSettings};
use crate::config::CheckTarget;

/// Bytes of a check's combined stdout/stderr kept for the report.
pub const OUTPUT_TAIL: u64 = 2048;

/// Where a check came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckSource {
    RequiredDir,
    WantedDir,
    Config,
    Drill,
}

/// What a check runs.
#[derive(Debug, Clone)]
pub enum CheckKind {
    /// An executable from `required.d` / `wanted.d`.
    Exec(PathBuf),
    /// `systemctl is-active --quiet UNIT`.
    Unit(String),
    Http(String),
    Tcp(String),
    /// The rollback drill: fails on purpose.
    Drill(String),
    /// Could not even be started (not executable, unreadable directory): fails with this text.
    Broken(String),
}

/// One check to run.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub source: CheckSource,
    pub required: bool,
    pub timeout: Duration,
    pub kind: CheckKind,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub source: CheckSource,
    pub required: bool,
    pub passed: bool,
    pub timed_out: bool,
    /// `exit status 0`, `killed after timeout 1s`, `HTTP 503`, `connection refused`, ...
    pub status: String,
    /// How long the check ran (`duration_ms`; journals written before schema 2 say `millis`).
    #[serde(rename = "duration_ms", alias = "millis")]
    pub millis: u64,
    /// The last [`OUTPUT_TAIL`] bytes of the check's output (lossy UTF-8, trimmed).
    pub output_tail: String,
}

impl CheckResult {
    /// One line naming the check, what happened and the end of its output.
    pub fn describe(&self) -> String {
        const KEEP: usize = 400;
        let tail = self.output_tail.trim();
        let tail = if tail.len() > KEEP {
            format!("...{}", &tail[char_floor(tail, tail.len() - KEEP)..])
        } else {
            tail.to_string()
        };
        format!(
            "{} check {} {} ({}){}",
            if self.required { "required" } else { "wanted" },
            self.name,
            if self.passed { "passed" } else { "failed" },
            self.status,
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {}", tail.replace('\n', " | "))
            }
        )
    }
}

/// The first char boundary at or after `i`.
fn char_floor(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// All results and the verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    pub results: Vec<CheckResult>,
}

impl Verdict {
    /// The first failed required check (why the boot failed).
    pub fn first_failure(&self) -> Option<&CheckResult> {
        self.results.iter().find(|r| r.required && !r.passed)
    }

    /// Failed wanted checks (logged, not fatal).
    pub fn wanted_failures(&self) -> impl Iterator<Item = &CheckResult> {
        self.results.iter().filter(|r| !r.required && !r.passed)
    }
}

/// Environment handed to executable checks.
#[derive(Debug, Clone, Default)]
pub struct CheckEnv {
    pub slot: String,
    pub version: String,
}

/// The checks `[health]` asks for, in order: `required.d` (by file name), required declared
/// checks, the drill (if armed), then `wanted.d` and wanted declared checks.
pub fn collect(settings: &HealthSettings, drill: Option<String>) -> Vec<Check> {
    let mut required = dir_checks(&settings.required_dir, true, settings.check_timeout);
    let mut wanted = dir_checks(&settings.wanted_dir, false, settings.check_timeout);
    for spec in &settings.checks {
        let check = spec_check(spec, settings.check_timeout);
        if check.required {
            required.push(check);
        } else {
            wanted.push(check);
        }
    }
    if let Some(why) = drill {
        required.push(Check {
            name: "rollback-drill".into(),
            source: CheckSource::Drill,
            required: true,
            timeout: settings.check_timeout,
            kind: CheckKind::Drill(why),
        });
    }
    required.extend(wanted);
    required
}

fn spec_check(spec: &CheckSpec, default_timeout: Duration) -> Check {
    let kind = match &spec.target {
        CheckTarget::Unit(u) => CheckKind::Unit(u.clone()),
        CheckTarget::Http(h) => CheckKind::Http(h.clone()),
        CheckTarget::Tcp(t) => CheckKind::Tcp(t.clone()),
    };
    Check {
        name: spec.display_name(),
        source: CheckSource::Config,
        required: spec.required,
        timeout: spec.timeout.map(|t| t.get()).unwrap_or(default_timeout),
        kind,
    }
}

/// Executables in `dir`, by file name. A missing directory holds no checks; an unreadable one
/// or a non-executable file is a check that fails (a silently skipped required check would
/// pass a broken boot). Hidden files and editor backups (`~`) are ignored.
pub(crate) fn dir_checks(dir: &Path, required: bool, timeout: Duration) -> Vec<Check> {
    let source = if required {
        CheckSource::RequiredDir
    } else {
        CheckSource::WantedDir
    };
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let broken = |name: String, why: String| Check {
        name,
        source,
        required,
        timeout,
        kind: CheckKind::Broken(why),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(dir = %dir.display(), "no check directory");
            return Vec::new();
        }
        Err(e) => {
            return vec![broken(
                label,
                format!("cannot read check directory {}: {e}", dir.display()),
            )]
        }
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in entries {
        match entry {
            Ok(e) => paths.push(e.path()),
            Err(e) => {
                return vec![broken(
                    label,
                    format!("cannot list check directory {}: {e}", dir.display()),
                )]
            }
        }
    }
    paths.sort();
    let mut checks = Vec::new();
    for path in paths {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if file.starts_with('.') || file.ends_with('~') {
            continue;
        }
        let name = format!("{label}/{file}");
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => continue,
            Ok(m) if m.permissions().mode() & 0o111 == 0 => checks.push(broken(
                name,
                format!(
                    "{} is not executable (chmod +x it, or remove it)",
                    path.display()
                ),
            )),
            Ok(_) => checks.push(Check {
                name,
                source,
                required,
                timeout,
                kind: CheckKind::Exec(path),
            }),
            Err(e) => checks.push(broken(name, format!("cannot stat {}: {e}", path.display()))),
        }
    }
    checks
}

/// Run `checks` within `total` (a check gets its own timeout or what is left, whichever is
/// shorter; once nothing is left, the remaining required checks fail as not run).
pub fn run_all(checks: &[Check], total: Duration, env: &CheckEnv) -> Verdict {
    let deadline = Instant::now() + total;
    let mut results = Vec::new();
    let mut passed = true;
    for check in checks {
        if !check.required && !passed {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let result = if left.is_zero() {
            CheckResult {
                name: check.name.clone(),
                source: check.source,
                required: check.required,
                passed: false,
                timed_out: true,
                status: format!("not run: the total timeout of {total:?} was used up"),
                millis: 0,
                output_tail: String::new(),
            }
        } else {
            run_one(check, check.timeout.min(left), env)
        };
        let _span = tracing::info_span!("health_check", check = %result.name).entered();
        if result.passed {
            tracing::info!(status = %result.status, millis = result.millis, "check passed");
        } else if result.required {
            tracing::error!(status = %result.status, output = %result.output_tail, "required check failed");
            passed = false;
        } else {
            tracing::warn!(status = %result.status, output = %result.output_tail, "wanted check failed (not fatal)");
        }
        results.push(result);
        if !passed && check.required {
            break;
        }
    }
    Verdict { passed, results }
}

/// Run one check with `timeout`.
pub fn run_one(check: &Check, timeout: Duration, env: &CheckEnv) -> CheckResult {
    let started = Instant::now();
    let (passed, timed_out, status, output_tail) = match &check.kind {
        CheckKind::Exec(path) => {
            let mut cmd = Command::new(path);
            cmd.env("UPDATE_AGENT_SLOT", &env.slot)
                .env("UPDATE_AGENT_VERSION", &env.version);
            run_command(cmd, timeout)
        }
        CheckKind::Unit(unit) => {
            let mut cmd = Command::new("systemctl");
            cmd.args(["is-active", "--quiet", "--", unit]);
            let (ok, t, status, tail) = run_command(cmd, timeout);
            let status = if ok || t {
                status
            } else {
                format!("unit {unit} is not active ({status})")
            };
            (ok, t, status, tail)
        }
        CheckKind::Http(url) => http_check(url, timeout),
        CheckKind::Tcp(addr) => tcp_check(addr, timeout),
        CheckKind::Drill(why) => (false, false, "failed on purpose".into(), why.clone()),
        CheckKind::Broken(why) => (false, false, "could not run".into(), why.clone()),
    };
    CheckResult {
        name: check.name.clone(),
        source: check.source,
        required: check.required,
        passed,
        timed_out,
        status,
        millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        output_tail,
    }
}

/// Spawn `cmd` in its own process group with output to an unnamed temp file; wait up to
/// `timeout`; then kill whatever is left of the group (a hung check, or children it left
/// behind) before reaping, so the group id cannot have been reused.
/// Returns (succeeded, timed out, status in words, output tail); also runs the hooks.
pub(crate) fn run_command(mut cmd: Command, timeout: Duration) -> (bool, bool, String, String) {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = match tempfile::tempfile() {
        Ok(f) => f,
        Err(e) => {
            return (
                false,
                false,
                format!("cannot create an output file: {e}"),
                String::new(),
            )
        }
    };
    let (stdout, stderr) = match (out.try_clone(), out.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return (
                false,
                false,
                format!("cannot duplicate the output file: {e}"),
                String::new(),
            )
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return (
                false,
                false,
                format!("cannot start {program}: {e}"),
                String::new(),
            )
        }
    };
    let Ok(raw) = i32::try_from(child.id()) else {
        let _ = child.kill();
        let _ = child.wait();
        return (false, false, "child pid out of range".into(), String::new());
    };
    let pid = Pid::from_raw(raw);
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    let timed_out = loop {
        // WNOWAIT: learn that it exited without reaping it, so its pid (= the group id)
        // stays reserved until the group is killed below.
        match waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => break false,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, program, "waitid failed; killing the check");
                break true;
            }
        }
        let now = Instant::now();
        if now >= deadline {
            break true;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    if let Err(e) = killpg(pid, Signal::SIGKILL) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(error = %e, program, "could not kill the check's process group");
        }
    }
    let status = child.wait();
    let tail = read_tail(out);
    match status {
        Ok(_) if timed_out => (
            false,
            true,
            format!("killed after the timeout of {}", fmt_duration(timeout)),
            tail,
        ),
        Ok(st) => (st.success(), false, describe_status(st), tail),
        Err(e) => (
            false,
            false,
            format!("cannot wait for {program}: {e}"),
            tail,
        ),
    }
}

fn describe_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

fn read_tail(mut f: File) -> String {
    let len = f.seek(SeekFrom::End(0)).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(OUTPUT_TAIL)))
        .is_err()
    {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// `1s`, `250ms`: how a timeout is shown.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// On its own thread: a runtime cannot be started from within the caller's (the demo and
/// async tests call the health check from one).
fn http_check(url: &str, timeout: Duration) -> (bool, bool, String, String) {
    let url = url.to_string();
    std::thread::spawn(move || http_get(&url, timeout))
        .join()
        .unwrap_or_else(|_| {
            (
                false,
                false,
                "the HTTP check panicked".into(),
                String::new(),
            )
        })
}

fn http_get(url: &str, timeout: Duration) -> (bool, bool, String, String) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return (
                false,
                false,
                format!("cannot start a runtime: {e}"),
                String::new(),
            )
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match crate::fetch::build_tolerating_no_roots(|| {
        reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("update-agent-health/", env!("CARGO_PKG_VERSION")))
    }) {
        Ok(c) => c,
        Err(e) => {
            return (
                false,
                false,
                format!("cannot build an HTTP client: {e}"),
                String::new(),
            )
        }
    };
    rt.block_on(async {
        match tokio::time::timeout(timeout, client.get(url).send()).await {
            Err(_) => (
                false,
                true,
                format!("no answer within {}", fmt_duration(timeout)),
                String::new(),
            ),
            Ok(Err(e)) if e.is_timeout() => (
                false,
                true,
                format!("no answer within {}", fmt_duration(timeout)),
                e.to_string(),
            ),
            Ok(Err(e)) => (false, false, "request failed".into(), error_chain(&e)),
            Ok(Ok(resp)) => {
                let st = resp.status();
                let body = tokio::time::timeout(Duration::from_millis(500), resp.text())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                let from = char_floor(&body, body.len().saturating_sub(OUTPUT_TAIL as usize));
                let tail = body[from..].trim().to_string();
                (st.is_success(), false, format!("HTTP {st}"), tail)
            }
        }
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text += &format!(": {s}");
        cur = s.source();
    }
    text
}

fn tcp_check(addr: &str, timeout: Duration) -> (bool, bool, String, String) {
    // Name resolution can hang too: run it all on a thread and wait at most `timeout`.
    let (tx, rx) = std::sync::mpsc::channel();
    let target = addr.to_string();
    let deadline = Instant::now() + timeout;
    std::thread::spawn(move || {
        let result = (|| -> Result<String, String> {
            let addrs: Vec<_> = target
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {target}: {e}"))?
                .collect();
            let mut last = format!("{target} resolved to no address");
            for a in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match TcpStream::connect_timeout(&a, left) {
                    Ok(_) => return Ok(format!("connected to {a}")),
                    Err(e) => last = format!("{a}: {e}"),
                }
            }
            Err(last)
        })();
        let _ = tx.send(result);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(msg)) => (true, false, msg, String::new()),
        Ok(Err(msg)) => (false, false, "connection failed".into(), msg),
        Err(_) => (
            false,
            true,
            format!("no connection within {}", fmt_duration(timeout)),
            String::new(),
        ),
    }
}
