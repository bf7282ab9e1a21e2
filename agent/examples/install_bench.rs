//! Benchmark driver: install one image from an HTTP URL into slot B of a GPT disk image through
//! the real pipeline, the agent's fetcher (`fetch::Download`) and the real gptprio backend,
//! then print one JSON line with the timings and this process's peak RSS (VmHWM). Driven by `tests/bench/install_bench.sh`; see
//! `docs/benchmarks.md`.
//!
//! ```text
//! install_bench --disk DISK --url URL --size N --sha256 HEX
//!               [--compression none|zstd --compressed-size N --compressed-sha256 HEX]
//!               [--readback on|off] [--layout flatcar] [--role usr]
//! install_bench --sha256-speed MIB
//! ```
//! The second form hashes MIB MiB (1 MiB buffers, as the pipeline does) with ring's SHA-256
//! and prints its speed, to compare with `openssl speed -evp sha256 -bytes 1048576`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use update_agent::boot::gptprio::GptPrio;
use update_agent::boot::{BootControl, SlotId};
use update_agent::disk::slots::SlotLayoutConfig;
use update_agent::disk::FileDevice;
use update_agent::fetch::{build_client, Download, FetchConfig};
use update_agent::install::{
    install, Compression, ImageSpec, InstallOptions, InstallPlan, NoResume, Readback, TargetImage,
};

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn hex32(s: &str) -> [u8; 32] {
    let v = hex::decode(s).expect("hex sha256");
    v.try_into().expect("32-byte sha256")
}

/// ring's SHA-256 over `mib` MiB in 1 MiB updates, in MB/s (10^6 bytes per second).
fn sha256_speed(mib: u64) -> f64 {
    let buf = vec![0x5au8; 1 << 20];
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let t = Instant::now();
    for _ in 0..mib {
        ctx.update(&buf);
    }
    std::hint::black_box(ctx.finish());
    (mib << 20) as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--sha256-speed") {
        let mib = std::env::args().nth(2).map_or(1024, |s| s.parse().unwrap());
        println!(
            "{{\"sha256_mb_per_s\":{:.0},\"mib\":{mib}}}",
            sha256_speed(mib)
        );
        return;
    }
    let mut args: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let k = k.trim_start_matches("--").to_string();
        args.insert(k, it.next().expect("every flag takes a value"));
    }
    let get = |k: &str| args.get(k).cloned();
    let need = |k: &str| get(k).unwrap_or_else(|| panic!("--{k} is required"));
    let disk = need("disk");
    let url = need("url");
    let size: u64 = need("size").parse().unwrap();
    let sha = hex32(&need("sha256"));
    let compression = match get("compression").as_deref() {
        None | Some("none") => Compression::None,
        Some("zstd") => Compression::Zstd,
        Some(o) => panic!("unknown compression {o}"),
    };
    let compressed_size = get("compressed-size").map_or(size, |s| s.parse().unwrap());
    let compressed_sha = get("compressed-sha256").map(|s| hex32(&s));
    let readback = match get("readback").as_deref() {
        None | Some("on") => Readback::Uncached,
        Some("off") => Readback::Off,
        Some(o) => panic!("--readback on|off, not {o}"),
    };
    let role = get("role").unwrap_or_else(|| "usr".into());
    let layout = match get("layout").as_deref() {
        None | Some("flatcar") => SlotLayoutConfig::flatcar(),
        Some("chromeos") => SlotLayoutConfig::chromeos(),
        Some(o) => panic!("unknown layout {o}"),
    };
    let mut opts = InstallOptions {
        readback,
        ..InstallOptions::default()
    };
    if let Some(b) = get("buffer-size") {
        opts.buffer_size = b.parse().unwrap();
    }
    if let Some(c) = get("channel-capacity") {
        opts.channel_capacity = c.parse().unwrap();
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let out = rt.block_on(async {
        let mut boot =
            GptPrio::new(FileDevice::open(&disk).unwrap(), disk.clone(), layout).unwrap();
        let slots = boot.slots().unwrap();
        let part = slots
            .get(SlotId::B)
            .parts
            .get(&role)
            .expect("role in slot B")
            .clone();
        let dev: Arc<Mutex<dyn update_agent::disk::BlockDevice>> =
            Arc::new(Mutex::new(FileDevice::open(&disk).unwrap()));
        let cfg = FetchConfig::default();
        let client = build_client(&cfg).unwrap();
        let download = Download::new(client, url.parse().unwrap(), compressed_size, cfg);
        let plan = InstallPlan {
            slot: SlotId::B,
            device: disk.clone(),
            targets: vec![TargetImage {
                image: ImageSpec {
                    role: role.clone(),
                    part_offset: part.byte_offset,
                    part_len: part.byte_len,
                    size,
                    sha256: sha,
                    compression,
                    compressed_size,
                    compressed_sha256: compressed_sha,
                },
                source: Box::new(download),
                resume: None,
            }],
        };
        let report = install(plan, dev, &mut boot, &opts, &mut NoResume, &mut |_| {})
            .await
            .unwrap_or_else(|e| panic!("install failed ({}): {e}", e.kind()));
        boot.stage(SlotId::B).unwrap();
        report
    });
    let t = &out.targets[0];
    println!(
        "{{\"total_s\":{:.3},\"write_s\":{:.3},\"readback_s\":{:.3},\"readback\":{},\"bytes\":{},\"fetched\":{},\"vm_hwm_kib\":{}}}",
        started.elapsed().as_secs_f64(),
        t.write_time.as_secs_f64(),
        t.readback_time.as_secs_f64(),
        serde_json::to_string(&t.readback).unwrap(),
        t.bytes_written,
        t.bytes_fetched,
        vm_hwm_kib()
    );
}
