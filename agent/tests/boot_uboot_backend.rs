#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The uboot backend: a trial/commit/rollback cycle through the simulated boot script,
//! cross-checked with libubootenv's `fw_printenv`; bad environments refused with nothing
//! written; a power cut at every write of every operation on a redundant pair leaves an
//! environment `fw_printenv` reads as the old or the new one; the shipped `boot.cmd` compiles
//! with `mkimage` and, run as a shell script, makes the choices `choose` makes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use update_agent::boot::uboot::{choose, initial_env, UbootBoot};
use update_agent::boot::ubootenv::{EnvCopy, EnvStore, UbootEnv};
use update_agent::boot::{BootControl, SlotId};
use update_agent::disk::BlockDevice;
use update_agent_sandbox::recording::{power_cuts, MemDevice, Op};
use update_agent_sandbox::sim_uboot;
use update_agent_sandbox::testimg::require_tool;

const SIZE: usize = 0x4000;
const BOOT_CMD: &str = include_str!("../../docs/uboot/boot.cmd");

fn have(tool: &str, package: &str) -> bool {
    require_tool(tool, package).unwrap()
}

/// Two image files (one copy each) and a fw_env.config naming both.
fn setup(dir: &Path) -> PathBuf {
    let mut cfg = String::new();
    for i in 0..2 {
        let img = dir.join(format!("env{i}.img"));
        std::fs::write(&img, vec![0u8; SIZE]).unwrap();
        cfg += &format!("{} 0x0 {SIZE:#x}\n", img.display());
    }
    let path = dir.join("fw_env.config");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn images(dir: &Path) -> [Vec<u8>; 2] {
    [0, 1].map(|i| std::fs::read(dir.join(format!("env{i}.img"))).unwrap())
}

fn fw_printenv(cfg: &Path) -> Result<BTreeMap<String, String>, String> {
    let out = Command::new("fw_printenv")
        .arg("-c")
        .arg(cfg)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect())
}

fn vars(env: &UbootEnv) -> BTreeMap<String, String> {
    env.vars()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn backend(cfg: &Path, tries: u8) -> UbootBoot {
    UbootBoot::from_fw_env_config(cfg, tries).unwrap()
}

fn provisioned(dir: &Path) -> PathBuf {
    let cfg = setup(dir);
    let mut store = EnvStore::from_fw_env_config(&cfg).unwrap();
    store
        .provision(&initial_env(SlotId::A, 3).unwrap())
        .unwrap();
    cfg
}

fn boot(cfg: &Path) -> Option<SlotId> {
    let mut store = EnvStore::from_fw_env_config(cfg).unwrap();
    sim_uboot::boot(&mut store).unwrap().booted
}

#[test]
fn trial_commit_and_failed_trial_fall_back_as_fw_printenv_sees_it() {
    let fw = have("fw_printenv", "libubootenv-tool");
    let dir = tempfile::tempdir().unwrap();
    let cfg = provisioned(dir.path());
    assert_eq!(boot(&cfg), Some(SlotId::A));
    let mut b = backend(&cfg, 2);
    b.commit(SlotId::A).unwrap();
    b.disable(SlotId::B).unwrap();
    b.stage(SlotId::B).unwrap();
    let st = b.status().unwrap();
    assert_eq!(st.next, Some(SlotId::B), "{}", st.reason);
    assert!(st.reason.contains("BOOT_ORDER=\"B A\""), "{}", st.reason);
    if fw {
        let seen = fw_printenv(&cfg).unwrap();
        assert_eq!(seen["BOOT_ORDER"], "B A");
        assert_eq!(seen["BOOT_B_LEFT"], "2");
        assert_eq!(seen["UPDATE_AGENT_TRIAL"], "B");
    }
    // The trial boots B; committing keeps it.
    assert_eq!(boot(&cfg), Some(SlotId::B));
    let mut b = backend(&cfg, 2);
    assert!(
        !b.status().unwrap().slots[1].successful,
        "a trial is not successful"
    );
    b.commit(SlotId::B).unwrap();
    assert!(b.status().unwrap().slots[1].successful);
    assert_eq!(boot(&cfg), Some(SlotId::B));

    // Stage A and never commit: two tries of A, then B.
    let mut b = backend(&cfg, 2);
    b.commit(SlotId::B).unwrap();
    b.stage(SlotId::A).unwrap();
    assert_eq!(boot(&cfg), Some(SlotId::A));
    assert_eq!(boot(&cfg), Some(SlotId::A));
    assert_eq!(boot(&cfg), Some(SlotId::B));
    // Rolling back drops A from BOOT_ORDER, so the script's reset cannot resurrect it.
    let mut b = backend(&cfg, 2);
    b.rollback(SlotId::B).unwrap();
    for _ in 0..6 {
        assert_eq!(boot(&cfg), Some(SlotId::B));
    }
    if fw {
        assert_eq!(fw_printenv(&cfg).unwrap()["BOOT_ORDER"], "B");
    }
}

#[test]
fn staging_over_an_uncommitted_trial_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = provisioned(dir.path());
    assert_eq!(boot(&cfg), Some(SlotId::A));
    let mut b = backend(&cfg, 1);
    b.commit(SlotId::A).unwrap();
    b.stage(SlotId::B).unwrap();
    assert_eq!(boot(&cfg), Some(SlotId::B));
    // B runs its trial: staging A now would leave only the uncommitted B as fallback.
    let before = images(dir.path());
    let e = backend(&cfg, 1).stage(SlotId::A).unwrap_err();
    assert_eq!(e.kind(), "boot_refused", "{e}");
    assert!(e.to_string().contains("never committed"), "{e}");
    let e = backend(&cfg, 1).rollback(SlotId::B).unwrap_err();
    assert_eq!(e.kind(), "boot_refused", "{e}");
    assert_eq!(images(dir.path()), before, "nothing written");
}

#[test]
fn bad_environments_are_clear_errors_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = fn(&mut UbootEnv);
    let cases: [(&str, Edit, &str, &str); 5] = [
        (
            "missing BOOT_ORDER",
            |e| e.unset("BOOT_ORDER"),
            "uboot_missing_var",
            "BOOT_ORDER",
        ),
        (
            "missing BOOT_B_LEFT",
            |e| e.unset("BOOT_B_LEFT"),
            "uboot_missing_var",
            "BOOT_B_LEFT",
        ),
        (
            "unknown slot",
            |e| e.set("BOOT_ORDER", "A C").unwrap(),
            "uboot_bad_value",
            "\"C\"",
        ),
        (
            "repeated slot",
            |e| e.set("BOOT_ORDER", "A A").unwrap(),
            "uboot_bad_value",
            "twice",
        ),
        (
            "counter",
            |e| e.set("BOOT_A_LEFT", "-1").unwrap(),
            "uboot_bad_value",
            "BOOT_A_LEFT",
        ),
    ];
    for (what, edit, kind, says) in cases {
        let cfg = provisioned(dir.path());
        let mut store = EnvStore::from_fw_env_config(&cfg).unwrap();
        let cur = store.read().unwrap();
        let mut env = cur.env.clone();
        edit(&mut env);
        store.provision(&env).unwrap();
        let before = images(dir.path());
        let mut b = backend(&cfg, 1);
        let e = b.status().unwrap_err();
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert!(e.to_string().contains(says), "{what}: {e}");
        let e = b.stage(SlotId::B).unwrap_err();
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert_eq!(images(dir.path()), before, "{what}: nothing written");
    }
    // Both copies with a wrong CRC.
    let cfg = provisioned(dir.path());
    for i in 0..2 {
        let p = dir.path().join(format!("env{i}.img"));
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[100] ^= 0x55;
        std::fs::write(&p, bytes).unwrap();
    }
    let before = images(dir.path());
    let e = backend(&cfg, 1).commit(SlotId::A).unwrap_err();
    assert_eq!(e.kind(), "ubootenv_bad_crc", "{e}");
    assert_eq!(images(dir.path()), before);
}

/// A device that logs its writes and flushes into a log shared with the test.
struct Logged {
    inner: MemDevice,
    log: Arc<Mutex<Vec<Op>>>,
}

impl BlockDevice for Logged {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.log.lock().unwrap().push(Op::Write {
            offset,
            data: buf.to_vec(),
        });
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.log.lock().unwrap().push(Op::Flush);
        self.inner.flush()
    }
}

#[test]
fn a_power_cut_at_every_write_leaves_the_old_or_the_new_environment() {
    if !have("fw_printenv", "libubootenv-tool") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = provisioned(dir.path());
    let judge_cfg = dir.path().join("judge.config");
    let mut judged = 0;
    type OpFn = fn(&mut UbootBoot) -> Result<(), update_agent::boot::BootError>;
    let ops: [(&str, OpFn, bool); 6] = [
        ("commit A", |b| b.commit(SlotId::A), false),
        ("disable B", |b| b.disable(SlotId::B), false),
        ("stage B", |b| b.stage(SlotId::B), true),
        ("commit B", |b| b.commit(SlotId::B), true),
        ("stage A", |b| b.stage(SlotId::A), false),
        ("rollback B", |b| b.rollback(SlotId::B), false),
    ];
    for (what, op, boot_after) in ops {
        let base = images(dir.path());
        let old = vars(
            &EnvStore::from_fw_env_config(&cfg)
                .unwrap()
                .read()
                .unwrap()
                .env,
        );
        let logs = [0, 1].map(|_| Arc::new(Mutex::new(Vec::new())));
        let copies = (0..2)
            .map(|i| EnvCopy {
                dev: Box::new(Logged {
                    inner: MemDevice::new(base[i].clone()),
                    log: logs[i].clone(),
                }),
                name: format!("copy{i}"),
                offset: 0,
                size: SIZE,
            })
            .collect();
        let mut b = UbootBoot::new(EnvStore::new(copies).unwrap(), 2).unwrap();
        op(&mut b).unwrap_or_else(|e| panic!("{what}: {e}"));
        let new = vars(&b.store_mut().read().unwrap().env);
        let written: Vec<usize> = (0..2)
            .filter(|&i| !logs[i].lock().unwrap().is_empty())
            .collect();
        assert!(written.len() <= 1, "{what}: one copy per write");
        if let Some(&i) = written.first() {
            let log = logs[i].lock().unwrap().clone();
            for cut in power_cuts(&log, 512) {
                let mut dev = MemDevice::new(base[i].clone());
                cut.apply(&mut dev).unwrap();
                let mut files = base.clone();
                files[i] = dev.to_vec();
                let mut text = String::new();
                for (j, f) in files.iter().enumerate() {
                    let p = dir.path().join(format!("judge{j}.img"));
                    std::fs::write(&p, f).unwrap();
                    text += &format!("{} 0x0 {SIZE:#x}\n", p.display());
                }
                std::fs::write(&judge_cfg, text).unwrap();
                let seen = fw_printenv(&judge_cfg)
                    .unwrap_or_else(|e| panic!("{what}, {}: fw_printenv: {e}", cut.what));
                assert!(
                    seen == old || seen == new,
                    "{what}, {}: fw_printenv reads neither the old nor the new environment: {seen:?}",
                    cut.what
                );
                judged += 1;
            }
            // Commit the operation for real: the next one starts from its result.
            let p = dir.path().join(format!("env{i}.img"));
            let mut dev = MemDevice::new(base[i].clone());
            for op in log {
                if let Op::Write { offset, data } = op {
                    dev.write_at(&data, offset).unwrap();
                }
            }
            std::fs::write(p, dev.to_vec()).unwrap();
        }
        assert_eq!(fw_printenv(&cfg).unwrap(), new, "{what}");
        if boot_after {
            boot(&cfg);
        }
    }
    assert!(judged >= 20, "only {judged} cut states judged");
}

#[test]
fn boot_cmd_compiles_with_mkimage_and_chooses_as_the_backend() {
    if !have("mkimage", "u-boot-tools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("boot.cmd");
    let scr = dir.path().join("boot.scr");
    std::fs::write(&src, BOOT_CMD).unwrap();
    let out = Command::new("mkimage")
        .args([
            "-A",
            "arm64",
            "-O",
            "linux",
            "-T",
            "script",
            "-C",
            "none",
            "-n",
            "update-agent",
        ])
        .arg("-d")
        .arg(&src)
        .arg(&scr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkimage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listing.contains("Script"), "{listing}");
    // The image holds the script verbatim after the 64-byte header and the 8-byte length
    // table (a one-part multi-file image), and its header CRC checks (mkimage -l).
    let img = std::fs::read(&scr).unwrap();
    assert_eq!(&img[..4], &[0x27, 0x05, 0x19, 0x56], "legacy image magic");
    assert_eq!(&img[72..72 + BOOT_CMD.len()], BOOT_CMD.as_bytes());
    let out = Command::new("mkimage")
        .arg("-l")
        .arg(&scr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkimage -l: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Run the script's selection in bash with U-Boot's commands as shell functions and
    // compare with `choose` on every small state.
    let states = {
        let mut v = Vec::new();
        for order in [
            None,
            Some("A B"),
            Some("B A"),
            Some("A"),
            Some("B"),
            Some("B X A"),
        ] {
            for a in [None, Some("0"), Some("1"), Some("3"), Some("9")] {
                for b in [None, Some("0"), Some("2"), Some("a"), Some("10")] {
                    v.push((order, a, b));
                }
            }
        }
        v
    };
    for (order, a, b) in states {
        let mut env = UbootEnv::new();
        for (n, v) in [
            ("BOOT_ORDER", order),
            ("BOOT_A_LEFT", a),
            ("BOOT_B_LEFT", b),
        ] {
            if let Some(v) = v {
                env.set(n, v).unwrap();
            }
        }
        let mut ours = env.clone();
        let (slot, saved) = run_script(&env);
        let choice = match choose(&mut ours, "mem") {
            Ok(c) => c,
            Err(e) => {
                // A counter outside the one-digit table: the agent refuses; the script
                // never boots that slot.
                assert_eq!(e.kind(), "uboot_bad_value", "{order:?} {a:?} {b:?}");
                assert_ne!(
                    slot,
                    Some(SlotId::B),
                    "{order:?} {a:?} {b:?}: script booted B"
                );
                continue;
            }
        };
        assert_eq!(
            slot, choice.booted,
            "{order:?} {a:?} {b:?}: script and choose disagree"
        );
        for n in ["BOOT_ORDER", "BOOT_A_LEFT", "BOOT_B_LEFT"] {
            assert_eq!(
                saved.get(n).map(String::as_str),
                ours.get(n),
                "{order:?} {a:?} {b:?}: {n} after the script"
            );
        }
    }
}

/// The selection part of boot.cmd (up to the kernel load) run by bash: `setenv`, `run`,
/// `saveenv`, `reset` and U-Boot's `test` as functions; hush splits the quoted `for` list,
/// bash needs it unquoted. Returns the slot booted (`None` after `reset`) and the saved env.
fn run_script(env: &UbootEnv) -> (Option<SlotId>, BTreeMap<String, String>) {
    let selection: String = BOOT_CMD
        .lines()
        .take_while(|l| !l.contains("# --- end of slot selection"))
        .map(|l| {
            l.replace("in \"${BOOT_ORDER}\"", "in ${BOOT_ORDER}")
                .replace("# skip remaining slots", ":")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut prelude = String::from(
        r#"setenv() { local n=$1; shift; printf -v "$n" '%s' "$*"; }
run() { eval "${!1}"; }
saveenv() { for n in BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; do [ -n "${!n+x}" ] && echo "saved $n=${!n}"; done; }
reset() { echo "RESET"; exit 0; }
test() {
  if [ "$1" = "-n" ]; then [ -n "$2" ]; return; fi
  case "$2" in
    -gt) [ $(( $1 )) -gt $(( $3 )) ];;
    =) [ "$1" = "$3" ];;
    !=) [ "$1" != "$3" ];;
    *) echo "unsupported test $*" >&2; exit 2;;
  esac
}
"#,
    );
    for (n, v) in env.vars() {
        prelude += &format!("{n}='{v}'\n");
    }
    let script = format!("{prelude}\n{selection}\necho \"BOOTED ${{raucslot}}\"\n");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let saved = text
        .lines()
        .filter_map(|l| l.strip_prefix("saved "))
        .filter_map(|l| l.split_once('='))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let slot = if text.contains("RESET") {
        None
    } else {
        text.lines()
            .find_map(|l| l.strip_prefix("BOOTED "))
            .and_then(|s| match s {
                "A" => Some(SlotId::A),
                "B" => Some(SlotId::B),
                _ => None,
            })
    };
    (slot, saved)
}
