//! `update-agent-sandbox demo`: the whole job, end to end, in a temporary directory: install 2.0.0,
//! reboot, pass the health checks and commit; then 3.0.0 fails its health check on the trial
//! boot, is rolled back automatically and denylisted, and the host ends on 2.0.0. Reboots go
//! through the boot simulator (the sandbox's `[reboot] command` is `true`).

use std::process::ExitCode;

use crate::disk_image::Preset;
use crate::world::{Backend, World, FACTORY_VERSION};
use crate::DemoArgs;
use update_agent::boot::SlotId;
use update_agent::cli::output::Output;
use update_agent::error::AgentError;
use update_agent::health::journal::RunOutcome;
use update_agent::ops;

fn step(out: &Output, n: u32, text: &str) {
    out.emit(&serde_json::json!({"step": n, "text": text}), || {
        format!("\n== {n}. {text}")
    });
}

fn sandbox_err(e: impl std::fmt::Display) -> AgentError {
    AgentError::Sandbox(e.to_string())
}

/// Runs the demo; returns success only if every step did what it should.
pub fn run(args: &DemoArgs, out: Output) -> Result<ExitCode, AgentError> {
    let preset = Preset::parse(&args.layout).ok_or_else(|| {
        AgentError::Sandbox(format!(
            "unknown layout {:?}: use flatcar, chromeos or bottlerocket",
            args.layout
        ))
    })?;
    let backend = Backend::parse(&args.backend).ok_or_else(|| {
        AgentError::Sandbox(format!(
            "unknown backend {:?}: use gptprio, grubenv, bls, uboot or efi",
            args.backend
        ))
    })?;
    let (_tmp, dir) = match &args.dir {
        Some(d) => {
            // Checked before anything is written: a second run must not overwrite the disk
            // image of the first and only then trip over its keys.
            if let Err(message) = prepare_dir(d, args.force) {
                out.error_kind("demo_dir_not_empty", &message);
                return Ok(ExitCode::from(2));
            }
            std::fs::create_dir_all(d).map_err(|source| AgentError::Io {
                what: format!("creating {}", d.display()),
                source,
            })?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("update-agent-demo.")
                .tempdir()
                .map_err(|source| AgentError::Io {
                    what: "creating a temporary directory".into(),
                    source,
                })?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let rt = update_agent::host::runtime()?;
    rt.block_on(demo(&dir, preset, backend, out))
}

async fn demo(
    dir: &std::path::Path,
    preset: Preset,
    backend: Backend,
    out: Output,
) -> Result<ExitCode, AgentError> {
    step(
        &out,
        1,
        &format!(
            "sandbox in {}: {} GPT disk image, {} boot control, slot A runs {FACTORY_VERSION}",
            dir.display(),
            preset.name(),
            args_backend(backend)
        ),
    );
    let mut world = World::create(dir, preset, backend, 32)
        .await
        .map_err(sandbox_err)?;
    let host = world.host()?;
    let status = ops::status::status(&host)?;
    out.emit(&status, || status.render());

    step(
        &out,
        2,
        "publish 2.0.0: zstd images, manifest signed by 2 of 2 keys, served over loopback",
    );
    let release = world.publish("2.0.0", Vec::new()).map_err(sandbox_err)?;
    out.emit(
        &serde_json::json!({"manifest": world.manifest_url(), "serial": release.serial}),
        || {
            format!(
                "manifest: {} (serial {})",
                world.manifest_url(),
                release.serial
            )
        },
    );

    step(
        &out,
        3,
        "update-agent apply: stream, verify, write slot B, read back, stage",
    );
    let a_before = slot_digests(&world, SlotId::A)?;
    let report = apply_with_progress(&host, out).await;
    let report = report?;
    out.emit(&report, || report.render());
    if slot_digests(&world, SlotId::A)? != a_before {
        return Err(AgentError::Sandbox(
            "the active slot changed during the install".into(),
        ));
    }

    step(
        &out,
        4,
        "reboot (boot simulator): the loader picks the staged slot for its trial boot",
    );
    let booted = world.boot().map_err(sandbox_err)?;
    out.emit(&serde_json::json!({"booted": booted}), || {
        format!(
            "booted slot {}",
            booted.map(|s| s.to_string()).unwrap_or("NONE".into())
        )
    });
    if booted != Some(SlotId::B) {
        return Err(AgentError::Sandbox(format!(
            "expected slot B to boot, got {booted:?}"
        )));
    }
    for image in &release.images {
        let got = world
            .slot_sha256(SlotId::B, &image.role, image.size)
            .map_err(sandbox_err)?;
        if got != image.sha256 {
            return Err(sandbox_err(format!(
                "slot B {} does not hash to the manifest's value",
                image.role
            )));
        }
    }
    out.emit(&serde_json::json!({"verified": "slot B"}), || {
        "slot B's partitions hash to the manifest's values".to_string()
    });

    step(
        &out,
        5,
        "update-agent health-check on the trial boot: required.d checks pass, slot B is committed",
    );
    world
        .add_check(
            true,
            "10-system-up",
            "echo \"slot $UPDATE_AGENT_SLOT runs $UPDATE_AGENT_VERSION\"",
        )
        .map_err(sandbox_err)?;
    // The app check fails only on 3.0.0: the release that will be rolled back.
    world
        .add_check(
            true,
            "50-app-responds",
            "if [ \"$UPDATE_AGENT_VERSION\" = 3.0.0 ]; then\n  \
             echo 'GET http://127.0.0.1:8080/healthz -> 503 (schema migration failed)'\n  exit 1\nfi",
        )
        .map_err(sandbox_err)?;
    let verdict = world.health_check()?;
    out.emit(&verdict, || verdict.render());
    expect(
        verdict.outcome == RunOutcome::Committed,
        "the trial boot of 2.0.0 should pass and commit",
    )?;

    step(
        &out,
        6,
        "publish 3.0.0 and apply it: it goes into slot A (the inactive one now)",
    );
    world.publish("3.0.0", Vec::new()).map_err(sandbox_err)?;
    let report = apply_with_progress(&host, out).await;
    let report = report?;
    out.emit(&report, || report.render());
    expect(report.slot == SlotId::A, "3.0.0 should be staged in slot A")?;

    step(
        &out,
        7,
        "reboot (boot simulator): slot A boots for its trial",
    );
    let booted = world.boot().map_err(sandbox_err)?;
    emit_booted(&out, booted);
    expect(
        booted == Some(SlotId::A),
        "slot A should boot for its trial",
    )?;

    step(
        &out,
        8,
        "update-agent health-check: 50-app-responds fails -> roll back to slot B, denylist 3.0.0, reboot",
    );
    let verdict = world.health_check()?;
    out.emit(&verdict, || verdict.render());
    expect(
        verdict.outcome == RunOutcome::RolledBack && verdict.rolled_back_to == Some(SlotId::B),
        "the trial boot of 3.0.0 should fail and roll back to slot B",
    )?;

    step(
        &out,
        9,
        "reboot (the agent ran [reboot] command; the sandbox's is `true`, so the simulator reboots)",
    );
    let booted = world.boot().map_err(sandbox_err)?;
    emit_booted(&out, booted);
    expect(
        booted == Some(SlotId::B),
        "slot B (2.0.0) should boot again",
    )?;
    let verdict = world.health_check()?;
    out.emit(&verdict, || verdict.render());

    step(
        &out,
        10,
        "update-agent check: the server still offers 3.0.0; this host refuses it (denylisted)",
    );
    let check = ops::check::check(&host, None, false, false).await?;
    out.emit(&check, || check.render());
    expect(
        check.refused.as_ref().map(|(kind, _)| kind.as_str()) == Some("denylisted"),
        "3.0.0 should be refused as denylisted",
    )?;

    step(&out, 11, "update-agent history");
    let history = ops::history::history(&host, None)?;
    out.emit(&history, || history.render());

    step(&out, 12, "final status");
    let status = ops::status::status(&host)?;
    out.emit(&status, || status.render());
    let running = status
        .booted
        .as_ref()
        .and_then(|b| status.slots.iter().find(|s| s.slot == b.slot))
        .and_then(|s| s.installed.as_ref())
        .map(|r| r.version.clone());
    let ok = status.booted.as_ref().map(|b| b.slot) == Some(SlotId::B)
        && status.boot.next == Some(SlotId::B)
        && running.as_deref() == Some("2.0.0")
        && status.denylist == ["3.0.0"];
    out.emit(
        &serde_json::json!({"result": if ok { "ok" } else { "unexpected" }, "running": running, "denylisted": status.denylist}),
        || {
            if ok {
                "\nresult: running 2.0.0 from slot B; 3.0.0 failed its health check, was rolled back and is denylisted".into()
            } else {
                "\nresult: UNEXPECTED final state (see status above)".into()
            }
        },
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What [`World::create`] puts in its directory: the only entries `--force` removes.
const SANDBOX_ENTRIES: &[&str] = &[
    "disk.img",
    "repo",
    "state",
    "keys",
    "cmdline",
    "grubenv",
    "esp",
    "efivars",
    "fw_env.config",
    "uboot-env.img",
    "config.toml",
    "os-release",
    "boot_id",
    "uptime",
    "health",
    "scratch",
];

/// `Ok` when `dir` is missing or empty, or (with `force`) holds only an earlier sandbox,
/// which is then removed. Anything else is refused with the reason, and nothing is touched.
fn prepare_dir(dir: &std::path::Path, force: bool) -> Result<(), String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot list {}: {e}", dir.display())),
    };
    if entries.is_empty() {
        return Ok(());
    }
    let foreign: Vec<&String> = entries
        .iter()
        .filter(|e| !SANDBOX_ENTRIES.contains(&e.as_str()))
        .collect();
    if !force || !foreign.is_empty() {
        let mut names = entries.clone();
        names.sort();
        names.truncate(5);
        return Err(format!(
            "--dir {} is not empty ({}{}); nothing was changed. {}",
            dir.display(),
            names.join(", "),
            if entries.len() > 5 { ", ..." } else { "" },
            if foreign.is_empty() {
                "It holds an earlier sandbox: pass --force to replace it, or choose an empty directory"
            } else {
                "It holds files that are not a sandbox's: choose an empty directory"
            }
        ));
    }
    for name in &entries {
        let path = dir.join(name);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| format!("--force: cannot remove {}: {e}", path.display()))?;
    }
    Ok(())
}

/// `apply` with the terminal's progress and the live progress `status` reads.
async fn apply_with_progress(
    host: &update_agent::host::Host,
    out: Output,
) -> Result<ops::apply::ApplyReport, AgentError> {
    let mut bar = update_agent::cli::progress::Progress::new(out.progress);
    let mut live =
        update_agent::progress::live::LiveWriter::new(host.state.dir(), None, host.clock.clone());
    let report = ops::apply::apply(host, &ops::apply::ApplyOptions::default(), &mut |ev| {
        live.event(&ev);
        bar.event(ev)
    })
    .await;
    drop(live);
    bar.finish();
    report
}

fn expect(ok: bool, what: &str) -> Result<(), AgentError> {
    if ok {
        Ok(())
    } else {
        Err(sandbox_err(format!("step failed: {what}")))
    }
}

fn emit_booted(out: &Output, booted: Option<SlotId>) {
    out.emit(&serde_json::json!({"booted": booted}), || {
        format!(
            "booted slot {}",
            booted.map(|s| s.to_string()).unwrap_or("NONE".into())
        )
    });
}

fn args_backend(b: Backend) -> &'static str {
    b.name()
}

fn slot_digests(world: &World, slot: SlotId) -> Result<Vec<[u8; 32]>, AgentError> {
    let slots = world.slots().map_err(sandbox_err)?;
    slots
        .get(slot)
        .parts
        .iter()
        .map(|(role, p)| {
            world
                .slot_sha256(slot, role, p.byte_len)
                .map_err(sandbox_err)
        })
        .collect()
}
