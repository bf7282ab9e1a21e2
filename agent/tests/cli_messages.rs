//! Issue 14 items 3-4: the messages an operator reads. `check` against a dead server names
//! the cause and says each retry; the history does not credit the sandbox's factory setup to
//! the operator; `status` says the phase in words; `apply` counts the configured trial boots;
//! logs carry no colour codes into a pipe and go to the journal, with structured fields, when
//! stderr is systemd's journal stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

fn agent(world: &World) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_update-agent"));
    cmd.arg("--config")
        .arg(&world.config_path)
        .env_remove("JOURNAL_STREAM")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    cmd
}

/// Fields of one entry in journald's native protocol: `KEY=value\n`, or `KEY\n`, a
/// little-endian u64 length, the value and `\n` (how values with any bytes are sent).
fn journal_fields(mut b: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let nl = b
            .iter()
            .position(|&c| c == b'\n')
            .expect("unterminated field");
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.push((text(&line[..eq]), text(&line[eq + 1..])));
            b = &b[nl + 1..];
        } else {
            let key = text(line);
            let len = u64::from_le_bytes(b[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &b[nl + 9..nl + 9 + len];
            assert_eq!(b[nl + 9 + len], b'\n', "field {key} not terminated");
            out.push((key, text(value)));
            b = &b[nl + 10 + len..];
        }
    }
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A loopback URL nothing listens on: bound once to get a free port, then closed.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/manifest.json")
}

async fn world() -> (tempfile::TempDir, World) {
    let dir = tempfile::tempdir().unwrap();
    let world = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 8)
        .await
        .unwrap();
    (dir, world)
}

#[tokio::test(flavor = "multi_thread")]
async fn check_against_a_dead_server_names_the_cause_and_each_retry_without_colour() {
    let (_dir, world) = world().await;
    world.set_config("install", "max_attempts", 3).unwrap();
    let url = dead_url();
    let out: Output = agent(&world)
        .args(["check", "--manifest", &url])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("error [connect]: cannot connect to")
            && last.contains("Connection refused"),
        "{err}"
    );
    // Two retries before the third and last attempt, each said at the default log level.
    let retries = err.lines().filter(|l| l.contains("retrying")).count();
    assert_eq!(retries, 2, "{err}");
    assert!(
        err.lines()
            .filter(|l| l.contains("retrying"))
            .all(|l| l.contains("Connection refused")),
        "{err}"
    );
    // stderr is a pipe: no ANSI colour codes.
    assert!(!err.contains('\x1b'), "colour codes in a pipe: {err:?}");

    let out = agent(&world)
        .args(["--json", "check", "--manifest", &url])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["error"]["kind"], "connect", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Connection refused"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn history_status_and_apply_say_what_happened_in_words() {
    let (_dir, mut world) = world().await;
    // The factory's own commit is the sandbox's doing, not the operator's.
    let out = agent(&world).arg("history").output().unwrap();
    let history = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = history.lines().next().unwrap();
    assert!(
        first.contains("committed") && first.contains("factory"),
        "{history}"
    );
    assert!(!history.contains("operator"), "{history}");

    // Three trial boots configured: apply says so.
    world.set_config("boot", "tries", 3).unwrap();
    world.publish("2.0.0", Vec::new()).unwrap();
    let out = agent(&world).arg("apply").output().unwrap();
    let report = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(report.contains("up to 3 trial boots"), "{report}");
    assert!(!report.contains("one trial boot"), "{report}");

    // Status says the phase as a sentence, not as the state file's JSON.
    let out = agent(&world).arg("status").output().unwrap();
    let status = text(&out.stdout);
    let phase = status
        .lines()
        .find(|l| l.starts_with("phase: "))
        .unwrap_or_else(|| panic!("no phase line in\n{status}"));
    assert_eq!(
        phase,
        "phase: 2.0.0 staged in slot B, waiting for the reboot"
    );
}

/// Under systemd (`JOURNAL_STREAM` names stderr) the logs go to journald's native socket with
/// their fields, and nothing is written to stderr but the final error line. The test runs the
/// agent in its own mount namespace with a directory of the test's bound over /run, so the
/// agent's `/run/systemd/journal/socket` is a datagram socket the test reads.
#[tokio::test(flavor = "multi_thread")]
async fn under_systemd_logs_go_to_the_journal_with_structured_fields() {
    let root = nix::unistd::geteuid().is_root();
    let unshare = Command::new("unshare").arg("--version").output().is_ok();
    if !root || !unshare {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this test needs root and unshare (util-linux) under CI"
        );
        eprintln!("skipping: needs root and unshare (apt-get install -y util-linux)");
        return;
    }
    let (dir, world) = world().await;
    world.set_config("install", "max_attempts", 2).unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join("systemd/journal")).unwrap();
    let sock = UnixDatagram::bind(run.join("systemd/journal/socket")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();

    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let journal_stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /run && exec \"$@\"")
        .arg(&run)
        .arg(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&world.config_path)
        .args(["check", "--manifest", &dead_url()])
        .env("JOURNAL_STREAM", &journal_stream)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();

    // The retry warning, as journald's native protocol: KEY=value lines.
    let mut buf = vec![0u8; 65536];
    let mut entries = Vec::new();
    while entries.len() < 2 {
        let n = sock.recv(&mut buf).expect("no journal entry within 20 s");
        if n > 0 {
            entries.push(journal_fields(&buf[..n]));
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let field = |e: &[(String, String)], k: &str| {
        e.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    };
    let retry = entries
        .iter()
        .find(|e| field(e, "MESSAGE").as_deref() == Some("retrying"))
        .unwrap_or_else(|| panic!("no retry entry in {entries:?}"));
    for (k, v) in [
        ("PRIORITY", "4"),
        ("SYSLOG_IDENTIFIER", "update-agent"),
        ("UPDATE_AGENT_KIND", "connect"),
        ("UPDATE_AGENT_ATTEMPT", "2"),
    ] {
        assert_eq!(field(retry, k).as_deref(), Some(v), "{k} in {retry:?}");
    }
    let error = field(retry, "UPDATE_AGENT_ERROR").unwrap();
    assert!(error.contains("Connection refused"), "{error}");
    let err = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(err.lines().count(), 1, "logs went to stderr too: {err}");
    assert!(err.starts_with("error [connect]:"), "{err}");
    assert!(!err.contains('\x1b'), "{err:?}");
}
