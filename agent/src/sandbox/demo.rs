//! `update-agent demo`: the whole job, end to end, in a temporary directory: install 2.0.0,
//! reboot, pass the health checks and commit; then 3.0.0 fails its health check on the trial
//! boot, is rolled back automatically and denylisted, and the host ends on 2.0.0. Reboots go
//! through the boot simulator (the sandbox's `[reboot] command` is `true`).

use std::process::ExitCode;

use crate::boot::SlotId;
use crate::cli::output::Output;
use crate::cli::DemoArgs;
use crate::error::AgentError;
use crate::health::journal::RunOutcome;
use crate::ops;
use crate::sandbox::disk_image::Preset;
use crate::sandbox::world::{Backend, World, FACTORY_VERSION};

fn step(out: &Output, n: u32, text: &str) {
    out.emit(&serde_json::json!({"step": n, "text": text}), || {
        format!("\n== {n}. {text}")
    });
}

fn sandbox_err(e: impl std::fmt::Display) -> AgentError {
    AgentError::Refused(format!("sandbox: {e}"))
}

/// Runs the demo; returns success only if every step did what it should.
pub fn run(args: &DemoArgs, out: Output) -> Result<ExitCode, AgentError> {
    let preset = Preset::parse(&args.layout).ok_or_else(|| {
        AgentError::Refused(format!(
            "unknown layout {:?}: use flatcar, chromeos or bottlerocket",
            args.layout
        ))
    })?;
    let backend = Backend::parse(&args.backend).ok_or_else(|| {
        AgentError::Refused(format!(
            "unknown backend {:?}: use gptprio or grubenv",
            args.backend
        ))
    })?;
    let (_tmp, dir) = match &args.dir {
        Some(d) => {
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
    let rt = crate::host::runtime()?;
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
    let mut bar = crate::cli::progress::Progress::new(out.progress_json);
    let report = ops::apply::apply(&host, &ops::apply::ApplyOptions::default(), &mut |ev| {
        bar.event(ev)
    })
    .await;
    bar.finish();
    let report = report?;
    out.emit(&report, || report.render());
    if slot_digests(&world, SlotId::A)? != a_before {
        return Err(AgentError::Refused(
            "sandbox: the active slot changed during the install".into(),
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
        return Err(AgentError::Refused(format!(
            "sandbox: expected slot B to boot, got {booted:?}"
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
    let mut bar = crate::cli::progress::Progress::new(out.progress_json);
    let report = ops::apply::apply(&host, &ops::apply::ApplyOptions::default(), &mut |ev| {
        bar.event(ev)
    })
    .await;
    bar.finish();
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
    match b {
        Backend::Gptprio => "gptprio",
        Backend::Grubenv => "grubenv",
    }
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
