#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `gpt` crate, a GPT parser nobody here wrote, reads every table we write the way we
//! meant it: same partition numbers, same GUIDs and ranges, and the gptprio flags we set.
//! It needs no external tool, so this check runs everywhere.

use update_agent::boot::gptprio::{GptPrio, GptPrioFlags};
use update_agent::boot::{BootControl, SlotId};
use update_agent::disk::{FileDevice, Gpt};
use update_agent_sandbox::disk_image::{create, Preset};

fn crate_view(
    path: &std::path::Path,
) -> std::collections::BTreeMap<u32, gpt::partition::Partition> {
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open(path)
        .expect("the gpt crate opens our table (both headers valid)");
    disk.partitions()
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(n, p)| (*n, p.clone()))
        .collect()
}

#[test]
fn every_flag_write_reads_back_identically_through_the_gpt_crate() {
    let dir = tempfile::tempdir().unwrap();
    for preset in [Preset::Flatcar, Preset::ChromeOs, Preset::Bottlerocket] {
        let path = dir.path().join(format!("{}.img", preset.name()));
        create(&path, &preset.parts(4)).unwrap();
        let before = crate_view(&path);
        assert_eq!(
            before.keys().copied().collect::<Vec<_>>(),
            preset.parts(4).iter().map(|p| p.number).collect::<Vec<_>>(),
            "{}: partition numbers as created",
            preset.name()
        );

        let dev = FileDevice::open(&path).unwrap();
        let mut boot = GptPrio::new(dev, path.display().to_string(), preset.layout()).unwrap();
        let slots = boot.slots().unwrap();
        let (fa, fb) = (slots.a.flags_part, slots.b.flags_part);
        let flags_of = |path: &std::path::Path, n: u32| {
            GptPrioFlags::from_attributes(crate_view(path)[&n].flags)
        };

        // Factory state: A good. Then a full cycle: stage B, the loader's try, commit B.
        let mut gpt = Gpt::read(boot.device()).unwrap();
        let good = GptPrioFlags {
            priority: 1,
            tries: 0,
            successful: true,
        };
        gpt.set_attributes(fa, good.to_attributes(0)).unwrap();
        gpt.write(boot.device_mut()).unwrap();
        boot.stage(SlotId::B).unwrap();
        let staged = flags_of(&path, fb);
        assert_eq!(
            (staged.priority, staged.tries, staged.successful),
            (2, 1, false)
        );
        assert_eq!(flags_of(&path, fa), good);
        boot.commit(SlotId::B).unwrap();
        let committed = flags_of(&path, fb);
        assert_eq!(
            (committed.priority, committed.tries, committed.successful),
            (2, 0, true)
        );
        boot.rollback(SlotId::A).unwrap();
        let a = flags_of(&path, fa);
        let b = flags_of(&path, fb);
        assert!(a.successful && a.priority > b.priority, "{a:?} {b:?}");

        // Nothing but the flags changed, as the independent parser sees it.
        let after = crate_view(&path);
        for (n, p) in &before {
            let q = &after[n];
            assert_eq!(
                (
                    p.part_guid,
                    p.first_lba,
                    p.last_lba,
                    &p.name,
                    &p.part_type_guid
                ),
                (
                    q.part_guid,
                    q.first_lba,
                    q.last_lba,
                    &q.name,
                    &q.part_type_guid
                ),
                "{} partition {n}",
                preset.name()
            );
        }
    }
}
