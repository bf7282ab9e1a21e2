//! Issue 14 item 8: every command's real `--json` output validates against its JSON Schema in
//! docs/schemas/ (formats checked: every time is RFC 3339), carries `schema_version`, and
//! `check` exits 0 / 2 / 3 for update available / nothing to do / refused. The commands run
//! as the binary on one sandboxed host through a whole update cycle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use update_agent::boot::SlotId;
use update_agent_sandbox::disk_image::Preset;
use update_agent_sandbox::world::{Backend, World};

fn schema(name: &str) -> jsonschema::Validator {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/schemas")
        .join(format!("{name}.schema.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&value)
        .unwrap_or_else(|e| panic!("{name}: invalid schema: {e}"))
}

/// Asserts `line` is one JSON object valid against `name`'s schema; returns it.
fn valid(name: &str, line: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {line}"));
    let errors: Vec<String> = schema(name)
        .iter_errors(&v)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{name}: {errors:#?}\n{v:#}");
    assert_eq!(
        v["schema_version"],
        update_agent::jsonout::SCHEMA_VERSION,
        "{v}"
    );
    durations_are_whole_millis(name, &v);
    v
}

/// docs/json.md: every duration is an integer number of milliseconds in a field named
/// `*_ms`; no serde `{"secs", "nanos"}`, no bare `seconds`/`millis`, no float durations.
fn durations_are_whole_millis(name: &str, v: &serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            assert!(
                !(m.contains_key("secs") && m.contains_key("nanos")),
                "{name}: a serde Duration object: {v}"
            );
            for (k, x) in m {
                assert!(
                    !matches!(k.as_str(), "seconds" | "millis" | "secs" | "nanos")
                        && !k.ends_with("_seconds")
                        && !k.ends_with("_time")
                        && !k.ends_with("_secs"),
                    "{name}: duration field `{k}` is not named `*_ms`: {v}"
                );
                if k.ends_with("_ms") {
                    assert!(
                        x.is_u64() || x.is_null(),
                        "{name}: `{k}` is not whole milliseconds: {x}"
                    );
                }
                durations_are_whole_millis(name, x);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| durations_are_whole_millis(name, x)),
        _ => {}
    }
}

/// Runs the agent with --json; returns (exit code, stdout, stderr).
fn run(world: &World, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&world.config_path)
        .arg("--json")
        .args(args)
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).trim().to_string(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(world: &World, schema_name: &str, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = run(world, args);
    assert_eq!(code, 0, "{args:?}: {out}\n{err}");
    valid(schema_name, &out)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_commands_json_matches_its_schema_through_an_update_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::create(dir.path(), Preset::Bottlerocket, Backend::Gptprio, 8)
        .await
        .unwrap();

    let s = ok(&world, "status", &["status"]);
    // Named fields, not bare arrays.
    assert!(s["slots"][0]["partitions"][0]["role"].is_string(), "{s}");
    ok(&world, "drill-arm", &["drill", "arm"]);
    ok(&world, "drill-disarm", &["drill", "disarm"]);
    ok(&world, "drill-report", &["drill", "report"]);

    world.publish("2.0.0", Vec::new()).unwrap();
    let c = ok(&world, "check", &["check"]);
    assert!(c["refused"].is_null(), "{c}");
    assert_eq!(c["images"].as_array().unwrap().len(), 3, "{c}");

    let (code, out, err) = run(&world, &["apply"]);
    assert_eq!(code, 0, "{out}\n{err}");
    valid("apply", &out);
    let progress: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(progress.len() >= 3, "{err}");
    for line in progress {
        valid("progress", line);
    }
    ok(&world, "cancel", &["cancel"]);

    ok(&world, "apply", &["apply"]);
    assert_eq!(world.boot().unwrap(), Some(SlotId::B));
    let boot_id = world.boot_id.to_str().unwrap().to_string();
    let h = ok(
        &world,
        "health-check",
        &["health-check", "--boot-id-path", &boot_id],
    );
    assert_eq!(h["outcome"], "committed", "{h}");

    // Nothing to do: the offered release runs here.
    let (code, out, _) = run(&world, &["check"]);
    let c = valid("check", &out);
    assert_eq!(code, 2, "{c}");
    assert_eq!(c["refused"]["kind"], "already_running", "{c}");

    ok(&world, "mark-good", &["mark-good"]);
    let r = ok(&world, "rollback", &["rollback"]);
    assert_eq!(r["to"], "A", "{r}");
    // Refused: this host rolled back from the offered release.
    let (code, out, _) = run(&world, &["check"]);
    let c = valid("check", &out);
    assert_eq!(code, 3, "{c}");
    assert_eq!(c["refused"]["kind"], "denylisted", "{c}");

    let hist = ok(&world, "history", &["history"]);
    assert!(hist["entries"].as_array().unwrap().len() >= 5, "{hist}");

    let (code, out, err) = run(&world, &["daemon", "--once"]);
    assert!(code == 0, "{out}\n{err}");
    valid("daemon-once", out.lines().last().unwrap());

    // Failures: the same error object everywhere, daemon --once included.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/manifest.json", l.local_addr().unwrap());
    drop(l);
    world
        .set_config("server", "manifest_url", dead.as_str())
        .unwrap();
    world.set_config("install", "max_attempts", 1).unwrap();
    for args in [&["daemon", "--once"][..], &["check"][..], &["apply"][..]] {
        let (code, out, err) = run(&world, args);
        assert_eq!(code, 1, "{args:?}: {out}\n{err}");
        let e = valid("error", out.lines().last().unwrap());
        valid("daemon-once", out.lines().last().unwrap());
        assert_eq!(e["error"]["kind"], "connect", "{e}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args(["--json", "--config"])
        .arg(dir.path().join("missing.toml"))
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    valid("error", String::from_utf8_lossy(&o.stdout).trim());
}

#[test]
fn a_schema_rejects_what_the_agent_must_not_print() {
    // The schemas are strict enough to catch the old shapes: a bare [role, size] or
    // [key id, reason] pair, a
    // Unix-seconds time, a missing schema_version.
    let good = r#"{"schema_version":2,"version":"2.0.0","serial":1,"channel":"stable",
        "expires_at":"2026-12-08T00:00:00Z","signers":["k"],
        "ignored_signatures":[{"key_id":"j","reason":"invalid"}],"images":[{"role":"usr","size":1}],
        "booted":"A","running_version":"1.0.0","refused":null,"wave_seed":1,
        "eligible_from":null,"eligible_now":true}"#;
    let v: serde_json::Value = serde_json::from_str(good).unwrap();
    assert!(schema("check").is_valid(&v));
    for (field, bad) in [
        ("images", serde_json::json!([["usr", 1]])),
        ("ignored_signatures", serde_json::json!([["j", "invalid"]])),
        ("expires_at", serde_json::json!(1_796_688_000)),
        ("expires_at", serde_json::json!("next week")),
        ("refused", serde_json::json!(["denylisted", "why"])),
    ] {
        let mut w = v.clone();
        w[field] = bad.clone();
        assert!(!schema("check").is_valid(&w), "{field} = {bad} accepted");
    }
    let mut w = v.clone();
    w.as_object_mut().unwrap().remove("schema_version");
    assert!(!schema("check").is_valid(&w));
}
