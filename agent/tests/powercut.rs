//! Power cuts during every gptprio operation, on the three seed layouts: for every state a
//! cut can leave (see `power_cuts`), the simulated loader boots a slot whose content is the
//! one we verified (old or new), the table our open reads holds exactly the old or the new
//! flags and is repairable, and no flush batch ever writes both GPT copies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use update_agent::boot::gptprio::{GptPrio, GptPrioFlags};
use update_agent::boot::{BootControl, SlotId};
use update_agent::disk::{BlockDevice, Gpt, ResolvedSlots, SlotLayoutConfig};
use update_agent_sandbox::recording::{power_cuts, MemDevice, Op, RecordingDevice};
use update_agent_sandbox::sim;
use update_agent_sandbox::testimg::{require_tool, sgdisk_verify, Layout};

/// What each slot's partitions hold: a verified image marker per role.
#[derive(Clone)]
struct Content {
    a: String,
    b: String,
}

impl Content {
    fn get(&self, s: SlotId) -> &str {
        match s {
            SlotId::A => &self.a,
            SlotId::B => &self.b,
        }
    }
}

fn marker(version: &str, role: &str) -> Vec<u8> {
    let mut m = format!("IMAGE {version} {role}").into_bytes();
    m.resize(64, 0);
    m
}

fn write_slot(dev: &mut MemDevice, slots: &ResolvedSlots, slot: SlotId, version: &str) {
    for (role, p) in &slots.get(slot).parts {
        dev.write_at(&marker(version, role), p.byte_offset).unwrap();
    }
    dev.flush().unwrap();
}

fn slot_holds(dev: &MemDevice, slots: &ResolvedSlots, slot: SlotId, version: &str) -> bool {
    slots.get(slot).parts.iter().all(|(role, p)| {
        let mut b = vec![0u8; 64];
        dev.read_at(&mut b, p.byte_offset).unwrap();
        b == marker(version, role)
    })
}

/// A `MemDevice` seen through `Read + Seek` (writes refused), for the gpt crate.
#[derive(Debug)]
struct Reader<'a> {
    dev: &'a MemDevice,
    pos: u64,
}

impl std::io::Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.dev.size().saturating_sub(self.pos)) as usize;
        self.dev.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Write for Reader<'_> {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("read-only"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Seek for Reader<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            std::io::SeekFrom::Start(n) => n,
            std::io::SeekFrom::End(d) => self.dev.size().saturating_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
        };
        Ok(self.pos)
    }
}

/// The slots' flags as the independent `gpt` crate reads them (it checks both header CRCs
/// and the entries' CRC, and falls back to the backup header only when the primary header
/// itself is invalid); `None` when it refuses the disk.
fn crate_flags(dev: &MemDevice, slots: &ResolvedSlots) -> Option<[GptPrioFlags; 2]> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open_from_device(Reader { dev, pos: 0 })
        .ok()?;
    let parts = disk.partitions();
    let mut out = [GptPrioFlags::from_attributes(0); 2];
    for (i, s) in [SlotId::A, SlotId::B].into_iter().enumerate() {
        out[i] = GptPrioFlags::from_attributes(parts.get(&slots.get(s).flags_part)?.flags);
    }
    Some(out)
}

fn flags(dev: &MemDevice, slots: &ResolvedSlots) -> [GptPrioFlags; 2] {
    let gpt = Gpt::read(dev).unwrap();
    [SlotId::A, SlotId::B].map(|s| {
        GptPrioFlags::from_attributes(gpt.partition(slots.get(s).flags_part).unwrap().attributes)
    })
}

struct Scenario {
    layout: Layout,
    cfg: SlotLayoutConfig,
    dev: MemDevice,
    slots: ResolvedSlots,
    content: Content,
    cuts_checked: usize,
    crate_refused: usize,
}

impl Scenario {
    /// Run `op` recorded, then check every power-cut state it could leave.
    fn op(
        &mut self,
        name: &str,
        allowed: &[SlotId],
        op: impl FnOnce(&mut GptPrio<RecordingDevice<MemDevice>>),
    ) {
        let base = self.dev.clone();
        let old = flags(&base, &self.slots);
        let mut bc = GptPrio::new(
            RecordingDevice::new(base.clone()),
            format!("{:?}", self.layout),
            self.cfg.clone(),
        )
        .unwrap();
        op(&mut bc);
        let mut rec = bc.into_inner();
        let log = rec.take_log();
        let after = rec.into_inner();
        let new = flags(&after, &self.slots);
        assert!(
            log.iter().any(|o| matches!(o, Op::Write { .. })),
            "{name} wrote nothing"
        );
        assert_eq!(
            log.last(),
            Some(&Op::Flush),
            "{name}: the last write is flushed"
        );

        // No flush batch touches both copies.
        let [primary, backup] = Gpt::read(&base).unwrap().copy_regions();
        let mut batch: BTreeSet<&str> = BTreeSet::new();
        for o in &log {
            match o {
                Op::Write { offset, data } => {
                    let end = offset + data.len() as u64;
                    let region = if *offset >= primary.0 && end <= primary.1 {
                        "primary"
                    } else if *offset >= backup.0 && end <= backup.1 {
                        "backup"
                    } else {
                        panic!("{name}: write at {offset}..{end} outside both GPT copies")
                    };
                    batch.insert(region);
                    assert_eq!(batch.len(), 1, "{name}: one flush batch wrote both copies");
                }
                Op::Flush => batch.clear(),
            }
        }

        let cuts = power_cuts(&log, 512);
        for cut in &cuts {
            let what = format!("{:?} {name}, cut {}", self.layout, cut.what);
            let mut d = base.clone();
            cut.apply(&mut d).unwrap();
            // Our open reads exactly the old or the new flags, and can repair the table.
            let mut gpt = Gpt::read(&d).unwrap_or_else(|e| panic!("{what}: {e}"));
            let seen = flags(&d, &self.slots);
            assert!(
                seen == old || seen == new,
                "{what}: flags {seen:?} are neither {old:?} nor {new:?}"
            );
            let health = gpt.health().clone();
            let mut repaired = d.clone();
            gpt.repair(&mut repaired).unwrap();
            // The independent reader: the gpt crate reads the same flags, or (when it
            // refuses a damaged primary copy) reads them after our repair.
            match crate_flags(&d, &self.slots) {
                Some(theirs) => assert_eq!(theirs, seen, "{what}: the gpt crate reads other flags"),
                None => {
                    assert!(
                        health.needs_repair(),
                        "{what}: the gpt crate refuses an intact table"
                    );
                    self.crate_refused += 1;
                }
            }
            assert_eq!(
                crate_flags(&repaired, &self.slots),
                Some(seen),
                "{what}: the gpt crate after repair"
            );
            assert!(
                !Gpt::read(&repaired).unwrap().health().needs_repair(),
                "{what}: repair"
            );
            assert_eq!(
                flags(&repaired, &self.slots),
                seen,
                "{what}: repair changed the flags"
            );

            // The loader boots an allowed slot with verified content; if that was a trial
            // boot that is never committed, the next boot falls back to the other slot.
            let booted = sim::boot_gptprio(&mut d, &self.cfg)
                .unwrap_or_else(|e| panic!("{what}: loader: {e}"))
                .unwrap_or_else(|| panic!("{what}: nothing boots"));
            let slot = booted
                .slot
                .unwrap_or_else(|| panic!("{what}: booted {booted:?}"));
            assert!(
                allowed.contains(&slot),
                "{what}: booted slot {slot}, allowed {allowed:?}"
            );
            assert!(
                slot_holds(&d, &self.slots, slot, self.content.get(slot)),
                "{what}: slot {slot} content is not the verified image"
            );
            if booted.was_trial() && booted.flags_before.tries == 1 {
                let again = sim::boot_gptprio(&mut d, &self.cfg).unwrap().unwrap();
                let back = again.slot.unwrap();
                assert_eq!(back, slot.other(), "{what}: a failed trial falls back");
                assert!(
                    slot_holds(&d, &self.slots, back, self.content.get(back)),
                    "{what}"
                );
            }
            self.cuts_checked += 1;
        }
        self.dev = after;
    }
}

fn scenario(layout: Layout, dir: &tempfile::TempDir) -> Scenario {
    let path = dir.path().join(format!("{layout:?}.img"));
    layout.create(&path).unwrap();
    let mut dev = MemDevice::from_file(&path).unwrap();
    let cfg = layout.config();
    let slots = cfg.resolve(&Gpt::read(&dev).unwrap()).unwrap();
    write_slot(&mut dev, &slots, SlotId::A, "v1");
    write_slot(&mut dev, &slots, SlotId::B, "v0");
    Scenario {
        layout,
        cfg,
        dev,
        slots,
        content: Content {
            a: "v1".into(),
            b: "v0".into(),
        },
        cuts_checked: 0,
        crate_refused: 0,
    }
}

#[test]
fn every_power_cut_during_every_operation_boots_a_verified_slot() {
    if !require_tool("sgdisk", "gdisk").unwrap() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for layout in Layout::ALL {
        let mut s = scenario(layout, &dir);
        use SlotId::{A, B};
        // B holds an older good image: make it good, below A.
        let mut setup = GptPrio::new(s.dev.clone(), "setup", s.cfg.clone()).unwrap();
        setup.stage(B).unwrap();
        setup.commit(B).unwrap();
        setup.rollback(A).unwrap();
        let mut d = setup.into_inner();
        let gpt = Gpt::read(&d).unwrap();
        let nb = s.slots.b.flags_part;
        let mut g = gpt.clone();
        let ok_b = GptPrioFlags {
            priority: 1,
            tries: 0,
            successful: true,
        };
        g.set_attributes(
            nb,
            ok_b.to_attributes(gpt.partition(nb).unwrap().attributes),
        )
        .unwrap();
        g.write(&mut d).unwrap();
        s.dev = d;

        // Install: B is made unbootable before its first byte is written.
        s.op("disable B", &[A], |bc| bc.disable(B).unwrap());
        write_slot(&mut s.dev, &s.slots.clone(), B, "v2");
        s.content.b = "v2".into();
        s.op("stage B", &[A, B], |bc| bc.stage(B).unwrap());
        // The loader's own write (spending B's try) is cut too.
        let cfg = s.cfg.clone();
        s.op("loader boots B", &[A, B], |bc| {
            let booted = sim::boot_gptprio(bc.device_mut(), &cfg).unwrap().unwrap();
            assert_eq!(booted.slot, Some(B));
        });
        s.op("commit B", &[A, B], |bc| bc.commit(B).unwrap());
        s.op("rollback to A", &[A, B], |bc| bc.rollback(A).unwrap());
        s.op("stage B again", &[A, B], |bc| bc.stage(B).unwrap());
        s.op("cancel B", &[A, B], |bc| bc.cancel(B).unwrap());

        // A corrupt primary: the repair is part of the recorded writes and cut too.
        let ss = 512;
        let mut hdr = vec![0u8; 512];
        s.dev.read_at(&mut hdr, ss).unwrap();
        hdr[40] ^= 0xff;
        s.dev.write_at(&hdr, ss).unwrap();
        s.op("stage B over a corrupt primary", &[A, B], |bc| {
            bc.stage(B).unwrap()
        });
        assert!(!Gpt::read(&s.dev).unwrap().health().needs_repair());

        let out = dir.path().join(format!("{layout:?}-final.img"));
        s.dev.save(&out).unwrap();
        sgdisk_verify(&out).unwrap();
        assert!(
            s.cuts_checked > 100,
            "{layout:?}: only {} cuts",
            s.cuts_checked
        );
        eprintln!(
            "{layout:?}: {} cuts, {} with a damaged primary the gpt crate refused before repair",
            s.cuts_checked, s.crate_refused
        );
    }
}
