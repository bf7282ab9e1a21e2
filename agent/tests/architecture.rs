//! The architecture invariants of docs/ARCHITECTURE.md that a test can check cheaply: what the
//! shipped agent links, which way imports run between the agent's modules, who may call
//! `BootControl::disable` and who may change the update flow's phase. Each test names the
//! invariant it guards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates that are test scaffolding or an HTTP server, or a second date-time crate beside
/// jiff: none may be a normal (shipped) dependency of `update-agent`, directly or through
/// another crate.
const NOT_SHIPPED: &[&str] = &[
    "update-agent-sandbox",
    "server-mock",
    "axum",
    "axum-core",
    "matchit",
    "time",
    "chrono",
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Architecture invariant: the production `update-agent` links no sandbox, simulator or HTTP
/// server code. Walks the normal and build edges of `cargo metadata`'s resolve graph from the
/// `update-agent` package (dev-dependencies, which may use the sandbox, are not followed).
#[test]
fn shipped_agent_depends_on_no_sandbox_or_server_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--manifest-path",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let agent = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "update-agent")
        .unwrap();
    // The shipped agent uses updater-proto without its test-support API (fixed-seed keys).
    for dep in agent["dependencies"].as_array().unwrap() {
        if dep["name"] == "updater-proto" && dep["kind"].is_null() {
            let features = dep["features"].as_array().unwrap();
            assert!(
                !features.iter().any(|f| f == "test-support"),
                "update-agent turns on updater-proto's test-support feature"
            );
        }
    }
    let nodes: BTreeMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let root = agent["id"].as_str().unwrap();
    // Breadth-first over non-dev edges, remembering who pulled each crate in.
    let mut via: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = vec![root];
    let mut seen = BTreeSet::from([root]);
    while let Some(id) = queue.pop() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let shipped = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"] != "dev");
            let dep_id = dep["pkg"].as_str().unwrap();
            if shipped && seen.insert(dep_id) {
                via.insert(dep_id, id);
                queue.push(dep_id);
            }
        }
    }
    assert!(seen.len() > 20, "the walk found too little: {seen:?}");
    for id in &seen {
        let name = names[id];
        if NOT_SHIPPED.contains(&name) {
            let mut chain = vec![name];
            let mut at = *id;
            while let Some(parent) = via.get(at) {
                chain.push(names[parent]);
                at = parent;
            }
            chain.reverse();
            panic!(
                "{name} is a shipped dependency of update-agent: {}",
                chain.join(" -> ")
            );
        }
    }
}

/// Architecture invariant: the `update-agent` binary holds no sandbox, simulator, recording
/// disk or server code (their crate names appear in every symbol and source path they add).
#[test]
fn agent_binary_holds_no_sandbox_or_server_code() {
    let bin = std::fs::read(env!("CARGO_BIN_EXE_update-agent")).unwrap();
    for needle in [
        "update_agent_sandbox",
        "agent/sandbox/src",
        "server_mock",
        "server-mock/src",
        // Crate paths, not the bare name: symbol hashes are base-36 and can spell "axum".
        "axum::",
        "axum-0.",
    ] {
        assert!(
            !bin.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the update-agent binary contains {needle:?}"
        );
    }
}

/// The agent's modules from the ground floor up. A module may import (`crate::x`) only modules
/// on a LOWER floor: no loops, no arrow that runs back up. A new module gets a floor here and in
/// docs/ARCHITECTURE.md.
const FLOORS: &[&[&str]] = &[
    &["slot", "clock"],
    &["jsonout"],
    &["disk", "state"],
    &["boot"],
    &["policy", "install"],
    &["progress"],
    &["bundle"],
    &["fetch", "publish"],
    &["delta"],
    &["config"],
    &["health", "fleet"],
    &["hooks"],
    &["error"],
    &["host"],
    &["trust"],
    &["ops"],
    &["daemon"],
    &["cli"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names through `crate::` (also `crate::{a, b::c}`).
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        // Only a bare `crate::` (or `$crate::`), not a name ending in "crate".
        if text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            let mut at_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if !item.is_empty() {
                            found.insert(std::mem::take(&mut item));
                        }
                        at_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && at_start {
                    if c.is_alphanumeric() || c == '_' {
                        item.push(c);
                        continue;
                    } else if !item.is_empty() {
                        found.insert(std::mem::take(&mut item));
                        at_start = false;
                    }
                }
            }
            if !item.is_empty() {
                found.insert(item);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// Architecture invariant: imports between the agent's modules run only downward (FLOORS).
#[test]
fn module_imports_run_only_downward() {
    let floor_of: BTreeMap<&str, usize> = FLOORS
        .iter()
        .enumerate()
        .flat_map(|(n, mods)| mods.iter().map(move |m| (*m, n)))
        .collect();
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str();
        let module = first.to_str().unwrap().trim_end_matches(".rs");
        if module == "lib" || module == "bin" {
            continue;
        }
        let Some(&floor) = floor_of.get(module) else {
            wrong.push(format!(
                "module {module} ({}) has no floor: add it to FLOORS in agent/tests/architecture.rs and to docs/ARCHITECTURE.md",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for import in crate_imports(&text) {
            if import == module {
                continue;
            }
            match floor_of.get(import.as_str()) {
                Some(&f) if f < floor => {}
                Some(_) => wrong.push(format!(
                    "{} (floor {floor}) imports crate::{import}, which is not below it",
                    rel.display()
                )),
                None => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn crate_imports_reads_plain_and_grouped_paths() {
    let text = "use crate::boot::SlotId;\nuse crate::{disk::Gpt, state, fetch::{a, b}};\n\
                let x = crate::host::runtime(); use my_crate::not_this;";
    let got: Vec<String> = crate_imports(text).into_iter().collect();
    assert_eq!(got, ["boot", "disk", "fetch", "host", "state"]);
}

/// Architecture invariant: only `install::install` calls `BootControl::disable`, so no slot is
/// written while bootable and no other path can strand a host with both slots disabled.
#[test]
fn only_install_disables_a_slot() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut callers = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains(".disable(") {
                callers.push(format!(
                    "{}:{}",
                    file.strip_prefix(&src).unwrap().display(),
                    n + 1
                ));
            }
        }
    }
    assert_eq!(callers.len(), 1, "callers of disable: {callers:?}");
    assert!(
        callers[0].starts_with("install/"),
        "disable is called outside install::install: {callers:?}"
    );
}

/// The part of a source file before its `#[cfg(test)]` module (tests may build any record).
fn non_test_code(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or("")
}

/// Architecture invariant: only `state::transition` changes the update flow's phase or
/// appends to its history: every other module asks for a `Transition`, which checks the
/// phase it starts from and writes phase and history entry in one atomic save.
#[test]
fn only_transitions_change_the_phase() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut writers = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel.starts_with("state") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in non_test_code(&text).lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for needle in [
                "phase = Phase::",
                "phase = crate::state::Phase::",
                "HistoryEntry::now(",
                "HistoryEntry {",
                "history.push(",
            ] {
                if code.contains(needle) {
                    writers.push(format!("{}:{}: {}", rel.display(), n + 1, code.trim()));
                }
            }
        }
    }
    assert!(
        writers.is_empty(),
        "the phase or the history is written outside state::transition:\n{}",
        writers.join("\n")
    );
    // The check would see a writer: the transitions module itself has them.
    let own = std::fs::read_to_string(src.join("state/transition.rs")).unwrap();
    assert!(non_test_code(&own).contains("state.phase = Phase::"));
}

/// Architecture invariant: the install pipeline reaches the disk only through `BlockDevice`
/// (writes, flushes and the read-back, which uses the device's `uncached_reader`): no file
/// of `install/` but `source.rs` (a local image file is a source, not the disk) opens a file.
#[test]
fn the_pipeline_reaches_the_disk_only_through_block_device() {
    let dir = src_dir().join("install");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    assert!(files.len() >= 3, "{files:?}");
    let mut found = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&dir).unwrap();
        if rel == Path::new("source.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in non_test_code(&text).lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for needle in [
                "File::open",
                "OpenOptions",
                "posix_fadvise",
                "std::fs::",
                "O_DIRECT",
            ] {
                if code.contains(needle) {
                    found.push(format!(
                        "install/{}:{}: {}",
                        rel.display(),
                        n + 1,
                        code.trim()
                    ));
                }
            }
        }
    }
    assert!(found.is_empty(), "disk I/O around BlockDevice: {found:?}");
}

/// Architecture invariant: every time the agent stamps or decides by comes from a `Clock`
/// (`Host::clock`), so a test can run it at a chosen instant: outside `clock.rs` no product
/// code reads the wall clock itself. (`bin/update-publish.rs` is the publisher's tool, not
/// the agent; monotonic `Instant`s for rates and timeouts are not wall-clock time.)
#[test]
fn the_wall_clock_is_read_only_through_clock() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut readers = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel == Path::new("clock.rs") || rel == Path::new("bin/update-publish.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in non_test_code(&text).lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for needle in ["Timestamp::now(", "SystemTime::now("] {
                if code.contains(needle) {
                    readers.push(format!("{}:{}: {}", rel.display(), n + 1, code.trim()));
                }
            }
        }
    }
    assert!(
        readers.is_empty(),
        "the wall clock is read outside crate::clock:\n{}",
        readers.join("\n")
    );
    let clock = std::fs::read_to_string(src.join("clock.rs")).unwrap();
    assert!(non_test_code(&clock).contains("Timestamp::now()"));
}
