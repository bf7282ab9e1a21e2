//! Issue 14 item 7: man pages and shell completions generated from the clap definitions of
//! both binaries (`generate-docs`), checked with the real tools: `man` renders every page,
//! `groff -ww` finds nothing to warn about, bash completes subcommands and their options, and
//! with the pages on MANPATH the units' `Documentation=man:update-agent(8)` resolves, so
//! `systemd-analyze verify` passes without `--man=no`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// `true` if `tool` runs; under `CI=true` a missing tool fails the test.
fn have(tool: &str, package: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required under CI: apt-get install -y {package}"
        );
        eprintln!("skipping: {tool} not found (apt-get install -y {package})");
    }
    found
}

fn generate(bin: &str, out: &Path) -> Vec<PathBuf> {
    let o = Command::new(bin)
        .arg("generate-docs")
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

fn docs() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let mut files = generate(env!("CARGO_BIN_EXE_update-agent"), dir.path());
    files.extend(generate(env!("CARGO_BIN_EXE_update-publish"), dir.path()));
    (dir, files)
}

#[test]
fn every_command_has_a_page_and_both_binaries_have_completions() {
    let (dir, files) = docs();
    let d = dir.path();
    for f in &files {
        assert!(f.starts_with(d) && f.is_file(), "{f:?}");
    }
    for page in [
        "man/man8/update-agent.8",
        "man/man8/update-agent-apply.8",
        "man/man8/update-agent-health-check.8",
        "man/man8/update-agent-drill-report.8",
        "man/man8/update-agent-config-show.8",
        "man/man8/update-agent-dbus.8",
        "man/man1/update-publish.1",
        "man/man1/update-publish-manifest.1",
        "completions/bash/update-agent",
        "completions/zsh/_update-agent",
        "completions/fish/update-agent.fish",
        "completions/bash/update-publish",
        "completions/zsh/_update-publish",
        "completions/fish/update-publish.fish",
    ] {
        assert!(
            files.contains(&d.join(page)),
            "{page} not written: {files:?}"
        );
    }
    // The packaging helper itself is not a command operators look up.
    assert!(!d.join("man/man8/update-agent-generate-docs.8").exists());
    let top = std::fs::read_to_string(d.join("man/man8/update-agent.8")).unwrap();
    assert!(top.contains("\n.TH update-agent 8 "), "{top}");
    assert!(
        top.contains("update\\-agent\\-apply(8)"),
        "no SUBCOMMANDS cross-reference"
    );
}

#[test]
fn man_renders_every_page_and_groff_has_no_warnings() {
    if !have("man", "man-db") || !have("groff", "groff-base") {
        return;
    }
    let (dir, files) = docs();
    let pages: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "8" || e == "1"))
        .collect();
    assert!(pages.len() >= 20, "{pages:?}");
    for page in pages {
        let lint = Command::new("groff")
            .args(["-man", "-ww", "-z", "-Tutf8"])
            .arg(page)
            .output()
            .unwrap();
        assert!(lint.status.success(), "{page:?}");
        assert!(
            lint.stderr.is_empty(),
            "{page:?}: {}",
            String::from_utf8_lossy(&lint.stderr)
        );
    }
    // Looked up by name on MANPATH, as an operator (and systemd) would.
    let o = Command::new("man")
        .args(["-P", "cat", "update-agent-apply"])
        .env("MANPATH", dir.path().join("man"))
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("Install the update into the inactive slot"),
        "{text}"
    );
    assert!(text.contains("--no-readback"), "{text}");
    // The D-Bus API's page (its unit's Documentation=), rendered from the file.
    let o = Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(dir.path().join("man/man8/update-agent-dbus.8"))
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("org.updateagent.Agent1"), "{text}");
    assert!(text.contains("--address"), "{text}");
}

#[test]
fn bash_completes_subcommands_and_their_options() {
    if !have("bash", "bash") {
        return;
    }
    let (dir, _) = docs();
    let complete = |script: &str, func: &str, words: &[&str]| -> String {
        let cword = words.len() - 1;
        let prog = format!(
            "source {script:?}; COMP_WORDS=({}); COMP_CWORD={cword}; {func} {} {:?} {:?}; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            words
                .iter()
                .map(|w| format!("{w:?}"))
                .collect::<Vec<_>>()
                .join(" "),
            words[0],
            words[cword],
            words[cword - 1],
        );
        let o = Command::new("bash").arg("-c").arg(prog).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let agent = dir.path().join("completions/bash/update-agent");
    let agent = agent.to_str().unwrap();
    assert_eq!(
        complete(agent, "_update__agent", &["update-agent", "ap"]),
        "apply\n"
    );
    assert_eq!(
        complete(
            agent,
            "_update__agent",
            &["update-agent", "apply", "--no-rea"]
        ),
        "--no-readback\n"
    );
    assert_eq!(
        complete(
            agent,
            "_update__agent",
            &["update-agent", "health-check", "--boot"]
        ),
        "--boot-id-path\n"
    );
    let publish = dir.path().join("completions/bash/update-publish");
    assert_eq!(
        complete(
            publish.to_str().unwrap(),
            "_update__publish",
            &["update-publish", "manifest", "--expi"]
        ),
        "--expires-in\n"
    );
}

/// The units are docs/systemd's (owned elsewhere): only ExecStart is pointed at the binary
/// under test, as in health_units.rs, and `verify` runs with its man page check on.
#[test]
fn units_documentation_resolves_with_the_pages_installed() {
    if !have("systemd-analyze", "systemd") || !have("man", "man-db") {
        return;
    }
    let (dir, _) = docs();
    let units = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    // Every shipped unit, verified together: they name each other (the daemon Requires= the
    // commit unit), so a unit added there is checked here without a list to keep.
    let unit_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/systemd");
    let mut names: Vec<String> = std::fs::read_dir(&unit_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service"))
        .collect();
    names.sort();
    for unit in [
        "update-agent.service",
        "update-agent-health.service",
        "update-agent-commit.service",
    ] {
        assert!(
            names.iter().any(|n| n == unit),
            "{unit} is not in docs/systemd"
        );
    }
    for name in &names {
        let text = std::fs::read_to_string(unit_dir.join(name)).unwrap();
        assert!(
            text.contains("man:update-agent(8)"),
            "{name} lost its Documentation="
        );
        let text = text.replace("/usr/bin/update-agent", env!("CARGO_BIN_EXE_update-agent"));
        let p = units.path().join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let verify = |manpath: &Path| {
        Command::new("systemd-analyze")
            .arg("verify")
            .args(&paths)
            .current_dir(units.path())
            .env("MANPATH", manpath)
            .output()
            .unwrap()
    };
    // Without the pages the man check fails: it is really on.
    let empty = tempfile::tempdir().unwrap();
    let o = verify(empty.path());
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("man update-agent(8)"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = verify(&dir.path().join("man"));
    assert!(
        o.status.success(),
        "systemd-analyze verify failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
