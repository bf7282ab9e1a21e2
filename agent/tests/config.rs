//! Configuration: defaults, merge order, masking, errors naming file and key, round trip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use update_agent::boot::SlotId;
use update_agent::config::{BootBackendKind, Config, ConfigSources, LayoutPreset, RebootStrategy};
use update_agent::disk::SlotLayoutConfig;

/// A fake root with the three drop-in directories and a main file location.
struct Roots {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Roots {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        Roots { _tmp: tmp, root }
    }
    fn dir(&self, which: &str) -> PathBuf {
        self.root.join(which).join("update-agent/config.d")
    }
    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
    fn sources(&self, main: bool) -> ConfigSources {
        ConfigSources {
            main: main.then(|| self.root.join("etc/update-agent/config.toml")),
            dropin_dirs: ["usr/lib", "run", "etc"]
                .iter()
                .map(|d| self.dir(d))
                .collect(),
        }
    }
}

fn names(files: &[PathBuf], root: &Path) -> Vec<String> {
    files
        .iter()
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect()
}

#[test]
fn no_sources_give_the_documented_defaults() {
    let c = Config::load(&ConfigSources::default()).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.boot.backend, BootBackendKind::Gptprio);
    assert_eq!(c.boot.tries, 1);
    assert_eq!(c.boot.cmdline_path, PathBuf::from("/proc/cmdline"));
    assert_eq!(c.boot.grubenv_path, PathBuf::from("/boot/grub/grubenv"));
    assert_eq!(c.disk.layout, LayoutPreset::Flatcar);
    assert_eq!(c.state.dir, PathBuf::from("/var/lib/update-agent"));
    assert!(!c.install.allow_downgrade && c.install.readback);
    assert_eq!(c.install.read_timeout.get(), Duration::from_secs(30));
    assert_eq!(c.trust.threshold, 1);
    assert_eq!(c.trust.channel, "stable");
    assert_eq!(c.reboot.strategy, RebootStrategy::Immediate);
    assert_eq!(c.reboot.command, vec!["systemctl", "reboot"]);
    assert_eq!(c.daemon.poll_interval.get(), Duration::from_secs(1800));
    assert_eq!(c.slot_layout().unwrap(), SlotLayoutConfig::flatcar());
}

#[test]
fn fragments_merge_by_name_across_dirs_after_the_main_file() {
    let r = Roots::new();
    r.write(
        "etc/update-agent/config.toml",
        "[boot]\nbackend = \"grubenv\"\ntries = 2\n[install]\nallow_downgrade = true\n[reboot]\ncommand = [\"a\", \"b\", \"c\"]\n",
    );
    r.write(
        "usr/lib/update-agent/config.d/10-vendor.toml",
        "[boot]\ntries = 3\n[install]\nread_timeout = \"2m\"\n",
    );
    r.write(
        "etc/update-agent/config.d/20-site.toml",
        "[install]\nreadback = false\n[reboot]\ncommand = [\"reboot\"]\n",
    );
    r.write(
        "run/update-agent/config.d/30-runtime.toml",
        "[boot]\ntries = 4\n",
    );
    // Not a fragment: wrong extension, hidden.
    r.write("etc/update-agent/config.d/40-notes.txt", "this is not toml");
    r.write("etc/update-agent/config.d/.50-hidden.toml", "[bogus]\n");

    let files = r.sources(true).files().unwrap();
    assert_eq!(
        names(&files, &r.root),
        vec![
            "etc/update-agent/config.toml",
            "usr/lib/update-agent/config.d/10-vendor.toml",
            "etc/update-agent/config.d/20-site.toml",
            "run/update-agent/config.d/30-runtime.toml",
        ]
    );
    let c = Config::load(&r.sources(true)).unwrap();
    assert_eq!(c.boot.backend, BootBackendKind::Grubenv, "from main");
    assert_eq!(c.boot.tries, 4, "30-runtime.toml is last by name");
    // Tables merge deeply: keys from three files end up side by side.
    assert!(c.install.allow_downgrade);
    assert!(!c.install.readback);
    assert_eq!(c.install.read_timeout.get(), Duration::from_secs(120));
    // Arrays are replaced whole, not appended.
    assert_eq!(c.reboot.command, vec!["reboot"]);
}

#[test]
fn same_named_fragment_masks_etc_over_run_over_usr_lib() {
    let r = Roots::new();
    r.write(
        "usr/lib/update-agent/config.d/50-vendor.toml",
        "[boot]\ntries = 5\n",
    );
    r.write(
        "run/update-agent/config.d/50-vendor.toml",
        "[boot]\ntries = 6\n",
    );
    let c = Config::load(&r.sources(false)).unwrap();
    assert_eq!(c.boot.tries, 6, "/run masks /usr/lib");

    // An empty file in /etc masks both.
    r.write("etc/update-agent/config.d/50-vendor.toml", "");
    let files = r.sources(false).files().unwrap();
    assert_eq!(
        names(&files, &r.root),
        vec!["etc/update-agent/config.d/50-vendor.toml"]
    );
    assert_eq!(Config::load(&r.sources(false)).unwrap().boot.tries, 1);

    // So does a symlink to /dev/null, the systemd idiom.
    let etc = r.dir("etc").join("50-vendor.toml");
    std::fs::remove_file(&etc).unwrap();
    std::os::unix::fs::symlink("/dev/null", &etc).unwrap();
    assert_eq!(Config::load(&r.sources(false)).unwrap().boot.tries, 1);
}

#[test]
fn unknown_key_error_names_the_file_and_the_key() {
    let r = Roots::new();
    r.write("etc/update-agent/config.toml", "[boot]\ntries = 2\n");
    let frag = r.write(
        "run/update-agent/config.d/60-typo.toml",
        "[install]\nreadback = true\nread_timout = \"5s\"\n",
    );
    let e = Config::load(&r.sources(true)).unwrap_err();
    assert_eq!(e.kind(), "config_parse");
    let msg = e.to_string();
    assert!(msg.contains(&frag.display().to_string()), "{msg}");
    assert!(msg.contains("read_timout"), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");

    // An unknown section too.
    std::fs::write(&frag, "[healthz]\nx = 1\n").unwrap();
    let msg = Config::load(&r.sources(true)).unwrap_err().to_string();
    assert!(
        msg.contains("60-typo.toml") && msg.contains("healthz"),
        "{msg}"
    );
}

#[test]
fn wrong_types_and_bad_durations_name_the_file() {
    let r = Roots::new();
    let main = r.write(
        "etc/update-agent/config.toml",
        "[daemon]\npoll_interval = \"30\"\n",
    );
    let msg = Config::load(&r.sources(true)).unwrap_err().to_string();
    assert!(msg.contains(&main.display().to_string()), "{msg}");
    assert!(msg.contains("missing unit"), "{msg}");

    std::fs::write(&main, "[boot]\ntries = \"two\"\n").unwrap();
    let msg = Config::load(&r.sources(true)).unwrap_err().to_string();
    assert!(
        msg.contains("config.toml") && msg.contains("tries"),
        "{msg}"
    );
}

#[test]
fn a_missing_explicit_main_file_is_an_error() {
    let r = Roots::new();
    let e = Config::load(&r.sources(true)).unwrap_err();
    assert_eq!(e.kind(), "config_io");
    assert!(e.to_string().contains("config.toml"), "{e}");
    let s = ConfigSources::system(Some(PathBuf::from("/nonexistent/x.toml")));
    assert_eq!(s.main, Some(PathBuf::from("/nonexistent/x.toml")));
    assert_eq!(s.dropin_dirs.len(), 3);
    assert!(s.dropin_dirs[2].ends_with("etc/update-agent/config.d"));
}

#[test]
fn cross_key_rules_are_checked_after_the_merge() {
    let cases = [
        ("[disk]\nlayout = \"custom\"\n", "disk.slots"),
        (
            "[disk]\nlayout = \"chromeos\"\n[disk.slots]\nflags_role = \"usr\"\n[disk.slots.a]\nusr = { number = 3 }\n[disk.slots.b]\nusr = { number = 4 }\n",
            "disk.slots",
        ),
        ("[boot]\ntries = 0\n", "boot.tries"),
        ("[boot]\nbackend = \"grubenv\"\ntries = 12\n", "boot.tries"),
        ("[server]\nmanifest_url = \"ftp://x\"\n", "server.manifest_url"),
        ("[trust]\nthreshold = 0\n", "trust.threshold"),
        ("[reboot]\nstrategy = \"window\"\n", "reboot.windows"),
        ("[reboot]\nstrategy = \"fleet_lock\"\n", "reboot.fleet_lock"),
        (
            "[reboot]\nstrategy = \"window\"\n[[reboot.windows]]\ndays = [\"Mon\"]\nstart = \"25:00\"\nlength = \"1h\"\n",
            "reboot.windows[0]",
        ),
        (
            "[reboot.fleet_lock]\nurl = \"http://lock\"\ngroup = \"a b\"\n",
            "reboot.fleet_lock.group",
        ),
        ("[install]\nread_timeout = \"0s\"\n", "install.read_timeout"),
    ];
    for (text, key) in cases {
        let e = Config::from_toml_str(text).unwrap_err();
        assert_eq!(e.kind(), "config_invalid", "{text}: {e}");
        assert!(e.to_string().contains(key), "{text}: {e}");
    }
}

#[test]
fn layouts_presets_and_custom() {
    for (name, preset) in [
        ("flatcar", SlotLayoutConfig::flatcar()),
        ("chromeos", SlotLayoutConfig::chromeos()),
        ("bottlerocket", SlotLayoutConfig::bottlerocket()),
    ] {
        let c = Config::from_toml_str(&format!("[disk]\nlayout = \"{name}\"\n")).unwrap();
        assert_eq!(c.slot_layout().unwrap(), preset);
    }
    let c = Config::from_toml_str(
        "[disk]\npath = \"/dev/sda\"\nlayout = \"custom\"\n[disk.slots]\nflags_role = \"root\"\n\
         [disk.slots.a]\nroot = { label = \"rootA\" }\n[disk.slots.b]\nroot = { number = 3 }\n",
    )
    .unwrap();
    let l = c.slot_layout().unwrap();
    assert_eq!(l.flags_role, "root");
    assert_eq!(c.disk.path, Some(PathBuf::from("/dev/sda")));
}

#[test]
fn trust_keys_inline_hex_base64_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = [1u8; 32];
    let k2 = [2u8; 32];
    let k3 = [3u8; 32];
    let file = dir.path().join("ops3.pub");
    std::fs::write(
        &file,
        format!("{}\n", base64::engine::general_purpose::STANDARD.encode(k3)),
    )
    .unwrap();
    let id1 = updater_proto::key_id(&k1);
    let text = format!(
        "[trust]\nthreshold = 2\nproduct = \"edge\"\nchannel = \"beta\"\n\
         [[trust.keys]]\nid = \"{id1}\"\npublic_key = \"{}\"\n\
         [[trust.keys]]\npublic_key = \"{}\"\n\
         [[trust.keys]]\nfile = \"{}\"\n",
        hex::encode(k1),
        base64::engine::general_purpose::STANDARD.encode(k2),
        file.display()
    );
    let c = Config::from_toml_str(&text).unwrap();
    let policy = c.trust_policy().unwrap();
    let ids: Vec<&str> = policy.keys().iter().map(|k| k.key_id()).collect();
    assert_eq!(ids[0], id1);
    assert_eq!(ids[1], updater_proto::key_id(&k2));
    assert_eq!(ids[2], updater_proto::key_id(&k3));

    let wrong_id = text.replace(&id1, &"0".repeat(64));
    let e = Config::from_toml_str(&wrong_id).unwrap_err();
    assert_eq!(e.kind(), "config_key");
    assert!(e.to_string().contains("trust.keys[0]"), "{e}");

    let too_many = text.replace("threshold = 2", "threshold = 4");
    let e = Config::from_toml_str(&too_many).unwrap_err();
    assert!(e.to_string().contains("threshold 4"), "{e}");

    let short = "[[trust.keys]]\npublic_key = \"abcd\"\n";
    let e = Config::from_toml_str(short).unwrap_err();
    assert!(e.to_string().contains("32 bytes"), "{e}");

    // The publisher's JSON key file works as a key file too, its keyid checked.
    let k4 = [4u8; 32];
    let json = dir.path().join("ops4.pub.json");
    let id4 = updater_proto::key_id(&k4);
    std::fs::write(
        &json,
        format!(
            "{{\"keytype\":\"ed25519\",\"keyid\":\"{id4}\",\"public\":\"{}\"}}",
            hex::encode(k4)
        ),
    )
    .unwrap();
    let c =
        Config::from_toml_str(&format!("[[trust.keys]]\nfile = \"{}\"\n", json.display())).unwrap();
    assert_eq!(c.trust_policy().unwrap().keys()[0].key_id(), id4);
    std::fs::write(
        &json,
        format!(
            "{{\"keytype\":\"ed25519\",\"keyid\":\"{id1}\",\"public\":\"{}\"}}",
            hex::encode(k4)
        ),
    )
    .unwrap();
    let e = Config::from_toml_str(&format!("[[trust.keys]]\nfile = \"{}\"\n", json.display()))
        .unwrap_err();
    assert_eq!(e.kind(), "config_key");

    let e = Config::default().trust_policy().unwrap_err();
    assert!(e.to_string().contains("trust.keys"), "{e}");
}

#[test]
fn show_output_loads_back_to_the_same_config() {
    let text = "[disk]\npath = \"/tmp/disk.img\"\nlayout = \"custom\"\n[disk.slots]\nflags_role = \"boot\"\n\
        [disk.slots.a]\nboot = { label = \"BOOT-A\" }\nroot = { type_guid = \"5526016a-1a97-4ea4-b39a-b7c8c6ca4502\", nth = 0 }\n\
        [disk.slots.b]\nboot = { label = \"BOOT-B\" }\nroot = { type_guid = \"5526016a-1a97-4ea4-b39a-b7c8c6ca4502\", nth = 1 }\n\
        [boot]\nbackend = \"grubenv\"\nbooted_slot = \"B\"\n\
        [server]\nmanifest_url = \"https://updates.example/manifest.json\"\n\
        [reboot]\nstrategy = \"fleet_lock\"\n[reboot.fleet_lock]\nurl = \"http://127.0.0.1:3333\"\n\
        [[reboot.windows]]\ndays = [\"Sat\", \"Sun\"]\nstart = \"02:30\"\nlength = \"1h30m\"\n\
        [daemon]\njitter = \"90s\"\n";
    let c = Config::from_toml_str(text).unwrap();
    assert_eq!(c.boot.booted_slot, Some(SlotId::B));
    assert_eq!(c.reboot.fleet_lock.as_ref().unwrap().group, "default");
    let shown = c.to_toml_string().unwrap();
    assert!(shown.contains("jitter = \"1m30s\""), "{shown}");
    assert_eq!(Config::from_toml_str(&shown).unwrap(), c);
    let defaults = Config::default().to_toml_string().unwrap();
    assert_eq!(Config::from_toml_str(&defaults).unwrap(), Config::default());
}

/// "Exactly one of" options are enums in the typed config; the parser refuses none or
/// several with the entry's key and the kind the rule always had, whether the text comes
/// alone or from a config file among drop-ins.
#[test]
fn exactly_one_of_options_refuse_none_and_several_by_key_and_kind() {
    let key = "public_key = \"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\"";
    let cases = [
        (
            format!("[[trust.keys]]\nid = \"ops\"\n{key}\nfile = \"/k.pub\"\n"),
            "config_key",
            "trust.keys[0] (id ops)",
        ),
        (
            "[[trust.keys]]\nid = \"ops\"\n".to_string(),
            "config_key",
            "trust.keys[0]",
        ),
        (
            "[[health.checks]]\nunit = \"a.service\"\n\n[[health.checks]]\n".to_string(),
            "config_invalid",
            "health.checks[1]",
        ),
        (
            "[[health.checks]]\nunit = \"a.service\"\ntcp = \"h:1\"\n".to_string(),
            "config_invalid",
            "health.checks[0]",
        ),
    ];
    for (text, kind, at) in &cases {
        let e = Config::from_toml_str(text).unwrap_err();
        assert_eq!(e.kind(), *kind, "{text}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains(at) && msg.contains("exactly one"),
            "{text}: {msg}"
        );

        let roots = Roots::new();
        roots.write("etc/update-agent/config.toml", text);
        let e = Config::load(&roots.sources(true)).unwrap_err();
        assert_eq!(e.kind(), *kind, "{text}: {e}");
    }

    // One of each is held as its variant and written back as the key it came from.
    let text = format!(
        "[[trust.keys]]\n{key}\n\n[[health.checks]]\nhttp = \"http://127.0.0.1/\"\nrequired = false\n"
    );
    let c = Config::from_toml_str(&text).unwrap();
    assert!(matches!(
        c.trust.keys[0].source,
        update_agent::config::KeySource::Inline(_)
    ));
    assert_eq!(
        c.health.checks[0].target,
        update_agent::config::CheckTarget::Http("http://127.0.0.1/".into())
    );
    assert!(!c.health.checks[0].required);
    let shown = c.to_toml_string().unwrap();
    assert!(shown.contains("http = \"http://127.0.0.1/\""), "{shown}");
    assert_eq!(Config::from_toml_str(&shown).unwrap(), c);
}
