//! Shared helpers for the end-to-end tests (disk images, servers, external tools).

use std::process::Command;

/// Whether the external tool `name` (from Debian package `package`) can run. Under CI
/// (`CI=true`) a missing tool is a failure, not a skip: CI must install it.
pub fn have_tool(name: &str, package: &str) -> bool {
    let found = Command::new(name)
        .arg("--version")
        .output()
        .map(|_| true)
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is required under CI: apt-get install -y {package}");
        }
        eprintln!("skipping: {name} not found (apt-get install -y {package})");
    }
    found
}
