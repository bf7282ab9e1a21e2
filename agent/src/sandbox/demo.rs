//! `update-agent demo`: the whole job, end to end, in a temporary directory.

use std::process::ExitCode;

use crate::boot::SlotId;
use crate::cli::output::Output;
use crate::cli::DemoArgs;
use crate::error::AgentError;
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| AgentError::Io {
            what: "starting the async runtime".into(),
            source,
        })?;
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
        "health check on the trial boot: passes, slot B is committed",
    );
    let verdict = ops::commit::mark_good(&host)?;
    out.emit(&verdict, || verdict.render());

    step(&out, 6, "final status");
    let status = ops::status::status(&host)?;
    out.emit(&status, || status.render());
    let ok = status.booted.as_ref().map(|b| b.slot) == Some(SlotId::B)
        && status.boot.next == Some(SlotId::B);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
