//! The fuzz bodies for the trust root, the chunk index and the digest (`fuzz/` targets
//! `root`, `chunk_index`, `digest`): run on the committed seeds (which must reach the success
//! path, or the fuzzers test nothing deep), on random bytes and on byte edits of the seeds,
//! on every `cargo test`. The seeds are regenerated with `UPDATE_FUZZ_SEEDS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use std::collections::BTreeSet;
use updater_proto::fuzzing::{
    fuzz_chunk_index, fuzz_digest, fuzz_key, fuzz_root, fuzz_root_v1, FUZZ_NOW,
};
use updater_proto::root::sign_root;
use updater_proto::{ChunkEntry, ChunkIndex, ChunkParams, Sha256, TrustedRoot, ROOT_PAYLOAD_TYPE};

fn root_v2() -> updater_proto::Root {
    updater_proto::Root {
        version: 2,
        expires_at: FUZZ_NOW + 2 * 86_400,
        ..fuzz_root_v1()
    }
}

fn index() -> ChunkIndex {
    let lens = [5000u32, 20000, 65536, 100];
    let (mut io, mut fo) = (0u64, 0u64);
    let mut chunks = Vec::new();
    for (i, &l) in lens.iter().enumerate() {
        let fl = l / 2 + 1;
        chunks.push(ChunkEntry {
            image_offset: io,
            image_len: l,
            file_offset: fo,
            file_len: fl,
            sha256: *Sha256::of(&[i as u8]).as_bytes(),
        });
        io += u64::from(l);
        fo += u64::from(fl);
    }
    ChunkIndex {
        image_size: io,
        file_size: fo,
        params: ChunkParams::DEFAULT,
        chunks,
    }
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

/// The seed inputs committed under `fuzz/seeds/`.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let k = fuzz_key();
    let v2 = sign_root(&root_v2(), &[&k]).unwrap().to_json();
    let ix = index();
    let mut sized = ix.image_size.to_le_bytes().to_vec();
    sized.extend_from_slice(&ix.file_size.to_le_bytes());
    sized.extend_from_slice(&ix.encode());
    vec![
        ("root/next_root_envelope.bin", with_mode(0, &v2)),
        (
            "root/next_root_payload.bin",
            with_mode(1, &root_v2().to_payload()),
        ),
        ("chunk_index/own_sizes.bin", with_mode(0, &ix.encode())),
        ("chunk_index/signed_sizes.bin", with_mode(1, &sized)),
        (
            "chunk_index/compact.bin",
            with_mode(0, &ix.encode_compact()),
        ),
        (
            "digest/sha256.txt",
            Sha256::of(b"fuzz").to_hex().into_bytes(),
        ),
    ]
}

#[test]
fn committed_seeds_are_current_and_reach_the_success_path() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (name, bytes) in seeds() {
        let path = dir.join(name);
        if std::env::var_os("UPDATE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_FUZZ_SEEDS=1)", path.display()));
        assert_eq!(
            on_disk,
            bytes,
            "{} is stale (UPDATE_FUZZ_SEEDS=1)",
            path.display()
        );
    }
    // The seeds are accepted where the bodies check the most.
    let k = fuzz_key();
    let v1 = TrustedRoot::bootstrap(
        &sign_root(&fuzz_root_v1(), &[&k]).unwrap().to_json(),
        BTreeSet::new(),
    )
    .unwrap();
    let v2 = sign_root(&root_v2(), &[&k]).unwrap().to_json();
    assert_eq!(v1.update(&v2).unwrap().version(), 2);
    let signed = updater_proto::Envelope::sign(ROOT_PAYLOAD_TYPE, &root_v2().to_payload(), &[&k]);
    assert_eq!(v1.update(&signed.to_json()).unwrap().version(), 2);
    let ix = index();
    assert_eq!(
        ChunkIndex::parse(&ix.encode(), ix.image_size, ix.file_size).unwrap(),
        ix
    );
    for (_, bytes) in seeds() {
        fuzz_root(&bytes);
        fuzz_chunk_index(&bytes);
        fuzz_digest(&bytes);
    }
}

/// Found by CI's fuzz run: an empty compact index (count 0, image and file size 0) parsed,
/// and the body then compared it with the explicit form's encoding, which differs in the
/// magic. Each form must round-trip through its own encoder.
#[test]
fn an_empty_compact_index_round_trips_as_compact() {
    let mut data = vec![0u8];
    data.extend_from_slice(b"UACHIDX2");
    data.extend_from_slice(&[0u8; 16]);
    for v in [0x1000u32, 0x4000, 0x10000, 0] {
        data.extend_from_slice(&v.to_le_bytes());
    }
    data.extend_from_slice(&[0u8; 8]);
    let ix = ChunkIndex::parse(&data[1..], 0, 0).expect("an empty compact index is valid");
    assert!(ix.chunks.is_empty());
    assert_eq!(ix.encode_compact(), &data[1..]);
    fuzz_chunk_index(&data);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn bodies_on_random_bytes(data in prop::collection::vec(any::<u8>(), 0..600)) {
        fuzz_root(&data);
        fuzz_chunk_index(&data);
        fuzz_digest(&data);
    }

    #[test]
    fn bodies_on_edited_seeds(
        which in 0usize..6,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let (_, mut bytes) = seeds().swap_remove(which);
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        fuzz_root(&bytes);
        fuzz_chunk_index(&bytes);
        fuzz_digest(&bytes);
    }
}
