//! Running the real `update-publish` binary from an integration test: one definition for
//! every test file that drives it (`#[path = "support/publish_cli.rs"] mod publish_cli;`).

use std::process::{Command, Output};

/// `update-publish ARGS`, as built by cargo for this test run.
pub fn publish(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_update-publish"))
        .args(args)
        .output()
        .expect("run update-publish")
}

/// Runs and expects success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = publish(args);
    assert!(
        out.status.success(),
        "update-publish {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs and expects exit code 1 with `error[kind]` on stderr; returns stderr.
pub fn fails(args: &[&str], kind: &str) -> String {
    let out = publish(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.contains(&format!("error[{kind}]")),
        "{args:?}: expected kind {kind}, got: {stderr}"
    );
    stderr
}
