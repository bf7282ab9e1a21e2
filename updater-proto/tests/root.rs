//! Trust-root verification under hostile bytes: no bit flip of a valid rotation changes what
//! is trusted (it is refused, or, where the flip only touches what signatures do not cover
//! and is not trusted anyway, such as a key id's letter case, yields the identical root), and
//! arbitrary bytes never panic and are never accepted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use updater_proto::root::{sign_root, ROOT_SCHEMA_VERSION};
use updater_proto::{Role, Root, RootKey, SigningKey, TrustedKey, TrustedRoot};

fn key(n: u8) -> SigningKey {
    SigningKey::from_seed_for_tests(&[n; 32])
}

fn role(keys: &[&SigningKey], threshold: usize) -> Role {
    Role {
        threshold,
        keys: keys
            .iter()
            .map(|k| RootKey::of(&TrustedKey::new(k.public_key())))
            .collect(),
    }
}

fn fixture() -> (TrustedRoot, Vec<u8>) {
    let (a, b, m) = (key(1), key(2), key(3));
    let one = Root {
        schema_version: ROOT_SCHEMA_VERSION,
        version: 1,
        expires_at: 2_000_000_000,
        root: role(&[&a], 1),
        manifest: role(&[&m], 1),
    };
    let trusted =
        TrustedRoot::bootstrap(&sign_root(&one, &[&a]).unwrap().to_json(), BTreeSet::new())
            .unwrap();
    let two = Root {
        version: 2,
        root: role(&[&b], 1),
        ..one
    };
    (trusted, sign_root(&two, &[&a, &b]).unwrap().to_json())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn no_bit_flip_changes_what_is_trusted(bit in 0usize..100_000) {
        let (one, bytes) = fixture();
        let good = one.update(&bytes).unwrap();
        let bit = bit % (bytes.len() * 8);
        let mut bad = bytes.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        if let Ok(r) = one.update(&bad) {
            prop_assert_eq!(r.root(), good.root());
            prop_assert_eq!(r.manifest_policy(), good.manifest_policy());
        }
    }

    #[test]
    fn arbitrary_bytes_are_never_accepted(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (one, _) = fixture();
        prop_assert!(one.update(&bytes).is_err());
        prop_assert!(TrustedRoot::bootstrap(&bytes, BTreeSet::new()).is_err());
    }
}
