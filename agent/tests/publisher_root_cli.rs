//! The real `update-publish root` ceremony: init, rotate (with a revocation), sign in turn,
//! verify; each file as the agent reads it (`updater_proto::TrustedRoot`), and the operator's
//! mistakes refused with their kinds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use updater_proto::TrustedRoot;

#[path = "support/publish_cli.rs"]
mod publish_cli;
use publish_cli::{fails, ok};

struct Dir(tempfile::TempDir);

impl Dir {
    fn p(&self, name: &str) -> String {
        self.0.path().join(name).display().to_string()
    }
    fn keygen(&self, name: &str) {
        ok(&[
            "keygen",
            "--private",
            &self.p(&format!("{name}.key")),
            "--public",
            &self.p(&format!("{name}.pub")),
        ]);
    }
    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.p(name)).unwrap()
    }
}

fn key_id(pubfile: &str) -> String {
    update_agent::publish::load_public_key(&PathBuf::from(pubfile))
        .unwrap()
        .key_id()
        .to_owned()
}

#[test]
fn init_rotate_sign_verify() {
    let d = Dir(tempfile::tempdir().unwrap());
    for k in ["r1", "r2", "r3", "m1", "m2"] {
        d.keygen(k);
    }
    // Root 1: root keys r1 + r2 (2 of 2), manifest key m1.
    let out = ok(&[
        "root",
        "init",
        "--out",
        &d.p("1.root.json"),
        "--root-key",
        &d.p("r1.pub"),
        "--root-key",
        &d.p("r2.pub"),
        "--root-threshold",
        "2",
        "--manifest-key",
        &d.p("m1.pub"),
        "--key",
        &d.p("r1.key"),
    ]);
    assert!(out.contains("not ready yet [root_threshold_self]"), "{out}");
    fails(
        &["root", "verify", &d.p("1.root.json")],
        "root_threshold_self",
    );
    let out = ok(&["root", "sign", &d.p("1.root.json"), "--key", &d.p("r2.key")]);
    assert!(out.contains("2 signature(s)"), "{out}");
    let out = ok(&["root", "verify", &d.p("1.root.json")]);
    assert!(
        out.contains("root version 1: root keys 2 of 2, manifest keys 1 of 1"),
        "{out}"
    );
    let one = TrustedRoot::bootstrap(&d.read("1.root.json"), BTreeSet::new()).unwrap();

    // Root 2 revokes r1 (root keys r2 + r3, 1 of 2) and replaces m1 with m2.
    let out = ok(&[
        "root",
        "rotate",
        "--previous",
        &d.p("1.root.json"),
        "--out",
        &d.p("2.root.json"),
        "--root-key",
        &d.p("r2.pub"),
        "--root-key",
        &d.p("r3.pub"),
        "--root-threshold",
        "1",
        "--manifest-key",
        &d.p("m2.pub"),
        "--key",
        &d.p("r3.key"),
    ]);
    assert!(
        out.contains("not ready yet [root_threshold_previous]"),
        "{out}"
    );
    ok(&["root", "sign", &d.p("2.root.json"), "--key", &d.p("r1.key")]);
    fails(
        &[
            "root",
            "verify",
            &d.p("2.root.json"),
            "--previous",
            &d.p("1.root.json"),
        ],
        "root_threshold_previous",
    );
    ok(&["root", "sign", &d.p("2.root.json"), "--key", &d.p("r2.key")]);
    let out = ok(&[
        "root",
        "verify",
        &d.p("2.root.json"),
        "--previous",
        &d.p("1.root.json"),
    ]);
    assert!(out.contains("root version 2"), "{out}");
    // Exactly what a host does with it.
    let two = one.update(&d.read("2.root.json")).unwrap();
    assert!(two.revoked().contains(&key_id(&d.p("r1.pub"))));
    assert!(two.revoked().contains(&key_id(&d.p("m1.pub"))));
    assert_eq!(
        two.manifest_policy().keys()[0].key_id(),
        key_id(&d.p("m2.pub"))
    );

    // Root 3 with no role options keeps root 2's roles (a re-signing for a new expiry).
    let out = ok(&[
        "root",
        "rotate",
        "--previous",
        &d.p("2.root.json"),
        "--out",
        &d.p("3.root.json"),
        "--expires-in",
        "30d",
        "--key",
        &d.p("r2.key"),
    ]);
    assert!(out.contains("ready: publish it as 3.root.json"), "{out}");
    assert_eq!(two.update(&d.read("3.root.json")).unwrap().version(), 3);
    // Root 3 is not a successor of root 1.
    fails(
        &[
            "root",
            "verify",
            &d.p("3.root.json"),
            "--previous",
            &d.p("1.root.json"),
        ],
        "root_version_skipped",
    );
}

#[test]
fn bad_roles_are_refused_before_anything_is_written() {
    let d = Dir(tempfile::tempdir().unwrap());
    d.keygen("r1");
    fails(
        &[
            "root",
            "init",
            "--out",
            &d.p("1.root.json"),
            "--root-key",
            &d.p("r1.pub"),
            "--root-threshold",
            "2",
            "--manifest-key",
            &d.p("r1.pub"),
            "--key",
            &d.p("r1.key"),
        ],
        "root_invalid",
    );
    fails(
        &[
            "root",
            "init",
            "--out",
            &d.p("1.root.json"),
            "--root-key",
            &d.p("r1.pub"),
            "--key",
            &d.p("r1.key"),
        ],
        "root_invalid",
    );
    assert!(!Path::new(&d.p("1.root.json")).exists());
    fails(
        &["root", "sign", &d.p("none.json"), "--key", &d.p("r1.key")],
        "io",
    );
}
