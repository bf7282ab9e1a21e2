//! Issue 14 items 1-3: what an operator sees on a real terminal (a pseudo-terminal opened by
//! the test) and when stderr is piped: one progress bar for the whole install with a real
//! rate, a demo that refuses a used directory before touching it and prints no JSON on a
//! terminal, and colour only on a terminal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::pty::{openpty, Winsize};
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

const COLS: usize = 120;

/// Runs `cmd` with stderr on a new pseudo-terminal (stdout piped, stdin null); returns the
/// exit status, everything written to the terminal and stdout. Bounded by `limit`.
fn run_on_pty(cmd: &mut Command, limit: Duration) -> (ExitStatus, Vec<u8>, String) {
    let ws = Winsize {
        ws_row: 40,
        ws_col: COLS as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(&ws, None).unwrap();
    let slave: OwnedFd = pty.slave;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    // The parent's copy of the slave went into the Command and is closed with it, so reading
    // the master ends (EIO) once the child has exited.
    cmd.stderr(Stdio::null());
    let mut master = std::fs::File::from(pty.master);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(all);
    });
    let stdout = child.stdout.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let term = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    (status, term, out.join().unwrap())
}

/// The rows a terminal `COLS` wide shows after `bytes`: enough of a VT100 for indicatif and
/// tracing (text, CR, LF, deferred wrap, cursor up/down, erase line; SGR colours ignored).
fn screen(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut rows: Vec<Vec<char>> = vec![Vec::new()];
    let (mut row, mut col) = (0usize, 0usize);
    let mut chars = text.chars().peekable();
    let ensure = |rows: &mut Vec<Vec<char>>, r: usize| {
        while rows.len() <= r {
            rows.push(Vec::new());
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\r' => col = 0,
            '\n' => {
                row += 1;
                col = 0;
                ensure(&mut rows, row);
            }
            '\x1b' => {
                if chars.peek() != Some(&'[') {
                    continue;
                }
                chars.next();
                let mut param = String::new();
                let mut fin = ' ';
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() || c == '~' {
                        fin = c;
                        break;
                    }
                    param.push(c);
                }
                let n: usize = param.trim_start_matches('?').parse().unwrap_or(1).max(1);
                match fin {
                    'A' => row = row.saturating_sub(n),
                    'B' => {
                        row += n;
                        ensure(&mut rows, row);
                    }
                    'K' if param == "2" => rows[row].clear(),
                    'K' => rows[row].truncate(col),
                    _ => {}
                }
            }
            c if c.is_control() => {}
            c => {
                if col >= COLS {
                    row += 1;
                    col = 0;
                    ensure(&mut rows, row);
                }
                let line = &mut rows[row];
                while line.len() < col {
                    line.push(' ');
                }
                if col < line.len() {
                    line[col] = c;
                } else {
                    line.push(c);
                }
                col += 1;
            }
        }
    }
    rows.into_iter()
        .map(|r| r.into_iter().collect::<String>().trim_end().to_string())
        .filter(|r| !r.is_empty())
        .collect()
}

/// Every frame the bar drew (the text between carriage returns that holds an ETA).
fn bar_frames(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut plain = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
        .split(['\r', '\n'])
        .map(|f| f.trim().to_string())
        .filter(|f| f.contains(" eta "))
        .collect()
}

fn agent(world: &World) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_update-agent"));
    cmd.arg("--config").arg(&world.config_path);
    cmd.env_remove("JOURNAL_STREAM").env_remove("NO_COLOR");
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_on_a_terminal_draws_one_bar_for_the_whole_install() {
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::create(dir.path(), Preset::Bottlerocket, Backend::Gptprio, 32)
        .await
        .unwrap();
    let release = world.publish("2.0.0", Vec::new()).unwrap();
    let total: u64 = release.images.iter().map(|i| i.size).sum();
    assert!(release.images.len() >= 2, "{:?}", release.images);

    let (status, term, out) = run_on_pty(agent(&world).arg("apply"), Duration::from_secs(120));
    let rows = screen(&term);
    assert!(
        status.success(),
        "exit {status}\nterminal:\n{}\nstdout:\n{out}",
        rows.join("\n")
    );
    assert!(out.contains("installed 2.0.0 into slot B"), "{out}");

    // One bar stays on the screen: no trail of finished bars, one per phase and image.
    let bars: Vec<&String> = rows.iter().filter(|r| r.contains(" eta ")).collect();
    assert_eq!(bars.len(), 1, "terminal shows:\n{}", rows.join("\n"));
    assert_eq!(rows.len(), 1, "terminal shows:\n{}", rows.join("\n"));

    // Every frame counts the bytes of the whole install, never one image or one phase.
    let frames = bar_frames(&term);
    assert!(!frames.is_empty(), "{}", String::from_utf8_lossy(&term));
    let of_total = format!("/{} ", indicatif::HumanBytes(total));
    for f in &frames {
        assert!(
            f.contains(&of_total),
            "frame {f:?} does not count {of_total:?}"
        );
        // The rate is the download's: a loopback install of a few MiB is nowhere near TiB/s.
        assert!(
            !f.contains("TiB/s") && !f.contains("PiB/s"),
            "implausible rate in {f:?}"
        );
    }
    // The last frame is the finished install, with the phase as its message.
    let last = frames.last().unwrap();
    let full = format!(
        "{}/{}",
        indicatif::HumanBytes(total),
        indicatif::HumanBytes(total)
    );
    assert!(last.contains(&full), "{last:?} is not {full}");
    assert!(last.starts_with("verified "), "{last:?}");
    assert!(
        frames
            .iter()
            .any(|f| f.starts_with("writing ") || f.starts_with("verifying ")),
        "no phase message in {frames:?}"
    );
}

/// The demo lives in the sandbox crate's binary, built beside ours by `cargo test --workspace`.
fn sandbox_bin() -> std::path::PathBuf {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_update-agent"))
        .with_file_name("update-agent-sandbox");
    assert!(
        bin.exists(),
        "{} is missing: run the workspace's tests (cargo test --workspace) or \
         cargo build -p update-agent-sandbox first",
        bin.display()
    );
    bin
}

fn demo(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(sandbox_bin())
        .arg("demo")
        .args(args)
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sha256(path: &Path) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, &std::fs::read(path).unwrap())
        .as_ref()
        .to_vec()
}

#[test]
fn demo_refuses_a_used_dir_before_touching_it_and_force_replaces_only_a_sandbox() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sandbox");
    let d = dir.to_str().unwrap();
    let (st, out, err) = demo(&["--dir", d]);
    assert!(st.success(), "{out}\n{err}");
    // Piped and without --json, progress is for people: a line per image, no JSON.
    assert!(
        !err.contains("{\""),
        "JSON on stderr without --json:\n{err}"
    );
    assert!(err.contains("usr: writing 24.00 MiB"), "{err}");
    assert!(
        err.contains("usr: 24.00 MiB written and read back"),
        "{err}"
    );

    let disk = dir.join("disk.img");
    let before = sha256(&disk);
    let mtime = std::fs::metadata(&disk).unwrap().modified().unwrap();
    let (st, out, err) = demo(&["--dir", d]);
    assert_eq!(st.code(), Some(2), "{out}\n{err}");
    assert!(err.contains("error [demo_dir_not_empty]"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(out.is_empty(), "a refused demo printed steps:\n{out}");
    assert_eq!(sha256(&disk), before, "the refused run rewrote disk.img");
    assert_eq!(std::fs::metadata(&disk).unwrap().modified().unwrap(), mtime);

    // --json: the same refusal in the shape of every other error.
    let (st, out, _) = demo(&["--json", "--dir", d]);
    assert_eq!(st.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["error"]["kind"], "demo_dir_not_empty", "{v}");

    let (st, out, err) = demo(&["--dir", d, "--force"]);
    assert!(st.success(), "{out}\n{err}");
    assert!(out.contains("result: running 2.0.0 from slot B"), "{out}");

    // A directory with anything that is not a sandbox's is refused even with --force.
    let mine = dir.join("notes.txt");
    std::fs::write(&mine, "keep me").unwrap();
    let before = sha256(&disk);
    let (st, _, err) = demo(&["--dir", d, "--force"]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("not a sandbox's"), "{err}");
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "keep me");
    assert_eq!(sha256(&disk), before);
}

#[test]
fn demo_on_a_terminal_shows_one_bar_per_install_and_no_json() {
    let mut cmd = Command::new(sandbox_bin());
    cmd.arg("demo").env_remove("JOURNAL_STREAM");
    let (st, term, out) = run_on_pty(&mut cmd, Duration::from_secs(120));
    let rows = screen(&term);
    assert!(st.success(), "{out}\n{}", rows.join("\n"));
    assert!(
        !rows.iter().any(|r| r.contains("{\"")),
        "JSON on the terminal:\n{}",
        rows.join("\n")
    );
    let bars = rows.iter().filter(|r| r.contains(" eta ")).count();
    assert_eq!(bars, 2, "two installs, one bar each:\n{}", rows.join("\n"));
}

/// The other half of "no colour unless stderr is a terminal": on a terminal the log levels
/// are coloured (the pipe half is in cli_messages.rs).
#[tokio::test(flavor = "multi_thread")]
async fn logs_are_coloured_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::create(dir.path(), Preset::Flatcar, Backend::Gptprio, 8)
        .await
        .unwrap();
    world.set_config("install", "max_attempts", 2).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/manifest.json", l.local_addr().unwrap());
    drop(l);
    let (st, term, _) = run_on_pty(
        agent(&world).args(["check", "--manifest", &url]),
        Duration::from_secs(60),
    );
    assert_eq!(st.code(), Some(1));
    let text = String::from_utf8_lossy(&term);
    assert!(text.contains("WARN"), "{text:?}");
    assert!(
        text.contains("\x1b[33m"),
        "no colour on a terminal: {text:?}"
    );
}
