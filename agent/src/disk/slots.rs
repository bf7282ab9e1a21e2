//! Slots: which GPT partitions make up slot A and slot B, chosen from configuration.
//!
//! A slot is a set of partitions by role (e.g. `boot`, `root`, `hash`), one of which carries
//! the gptprio flags. Partitions are chosen by label, by type GUID (the n-th entry of that
//! type, in index order, as Bottlerocket's signpost does), or by partition number.

use super::table::{Entry, Gpt, GptError};
use crate::slot::SlotId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use uuid::Uuid;

/// How a partition is chosen. In TOML: `{ label = "USR-A" }`, `{ number = 3 }`, or
/// `{ type_guid = "6b636168-...", nth = 1 }` (`nth` counts from 0, default 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawSelector", into = "RawSelector")]
pub enum PartSelector {
    Label(String),
    TypeGuid { guid: Uuid, nth: u32 },
    Number(u32),
}

/// The on-the-wire shape of [`PartSelector`]: exactly one of `label`, `type_guid`, `number`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    type_guid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    number: Option<u32>,
}

impl TryFrom<RawSelector> for PartSelector {
    type Error = String;
    fn try_from(r: RawSelector) -> Result<Self, String> {
        if r.nth.is_some() && r.type_guid.is_none() {
            return Err("`nth` only goes with `type_guid`".into());
        }
        match (r.label, r.type_guid, r.number) {
            (Some(l), None, None) if !l.is_empty() => Ok(PartSelector::Label(l)),
            (Some(_), None, None) => Err("`label` must not be empty".into()),
            (None, Some(g), None) => {
                let guid = Uuid::parse_str(&g)
                    .map_err(|e| format!("`type_guid` {g:?} is not a GUID: {e}"))?;
                Ok(PartSelector::TypeGuid {
                    guid,
                    nth: r.nth.unwrap_or(0),
                })
            }
            (None, None, Some(0)) => Err("partition `number` counts from 1".into()),
            (None, None, Some(n)) => Ok(PartSelector::Number(n)),
            _ => Err(
                "a partition selector needs exactly one of `label`, `type_guid`, `number`".into(),
            ),
        }
    }
}

impl From<PartSelector> for RawSelector {
    fn from(s: PartSelector) -> RawSelector {
        match s {
            PartSelector::Label(l) => RawSelector {
                label: Some(l),
                ..Default::default()
            },
            PartSelector::TypeGuid { guid, nth } => RawSelector {
                type_guid: Some(guid.to_string()),
                nth: Some(nth),
                ..Default::default()
            },
            PartSelector::Number(n) => RawSelector {
                number: Some(n),
                ..Default::default()
            },
        }
    }
}

impl fmt::Display for PartSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartSelector::Label(l) => write!(f, "label {l:?}"),
            PartSelector::TypeGuid { guid, nth } => write!(f, "type GUID {guid} (match #{nth})"),
            PartSelector::Number(n) => write!(f, "partition number {n}"),
        }
    }
}

/// Type GUID of Flatcar / CoreOS Container Linux USR partitions.
pub const COREOS_USR_TYPE: Uuid = Uuid::from_u128(0x5dfbf5f4_2848_4bac_aa5e_0d9a20b745a6);
/// Type GUID of ChromeOS kernel partitions.
pub const CHROMEOS_KERNEL_TYPE: Uuid = Uuid::from_u128(0xfe3a2a5d_4f32_41a7_b725_accc3285a309);
/// Type GUIDs of Bottlerocket's per-bank partitions (the first of each type is bank A).
pub const BOTTLEROCKET_BOOT_TYPE: Uuid = Uuid::from_u128(0x6b636168_7420_6568_2070_6c616e657421);
pub const BOTTLEROCKET_ROOT_TYPE: Uuid = Uuid::from_u128(0x5526016a_1a97_4ea4_b39a_b7c8c6ca4502);
pub const BOTTLEROCKET_HASH_TYPE: Uuid = Uuid::from_u128(0x598f10af_c955_4456_6a99_7720068a6cea);

/// Which partitions form slots A and B, and which role carries the boot flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotLayoutConfig {
    pub flags_role: String,
    pub a: BTreeMap<String, PartSelector>,
    pub b: BTreeMap<String, PartSelector>,
}

fn roles(pairs: &[(&str, PartSelector)]) -> BTreeMap<String, PartSelector> {
    pairs
        .iter()
        .map(|(r, s)| ((*r).to_string(), s.clone()))
        .collect()
}

impl SlotLayoutConfig {
    /// Flatcar / CoreOS Container Linux: USR-A (3) and USR-B (4), flags on USR.
    pub fn flatcar() -> Self {
        SlotLayoutConfig {
            flags_role: "usr".into(),
            a: roles(&[("usr", PartSelector::Label("USR-A".into()))]),
            b: roles(&[("usr", PartSelector::Label("USR-B".into()))]),
        }
    }

    /// ChromeOS / COS: KERN-A+ROOT-A and KERN-B+ROOT-B, flags on KERN.
    pub fn chromeos() -> Self {
        SlotLayoutConfig {
            flags_role: "kernel".into(),
            a: roles(&[
                ("kernel", PartSelector::Label("KERN-A".into())),
                ("root", PartSelector::Label("ROOT-A".into())),
            ]),
            b: roles(&[
                ("kernel", PartSelector::Label("KERN-B".into())),
                ("root", PartSelector::Label("ROOT-B".into())),
            ]),
        }
    }

    /// Bottlerocket: BOOT+ROOT+HASH per bank, flags on BOOT; banks told apart by type GUID
    /// order, as signpost does.
    pub fn bottlerocket() -> Self {
        let bank = |nth| {
            roles(&[
                (
                    "boot",
                    PartSelector::TypeGuid {
                        guid: BOTTLEROCKET_BOOT_TYPE,
                        nth,
                    },
                ),
                (
                    "root",
                    PartSelector::TypeGuid {
                        guid: BOTTLEROCKET_ROOT_TYPE,
                        nth,
                    },
                ),
                (
                    "hash",
                    PartSelector::TypeGuid {
                        guid: BOTTLEROCKET_HASH_TYPE,
                        nth,
                    },
                ),
            ])
        };
        SlotLayoutConfig {
            flags_role: "boot".into(),
            a: bank(0),
            b: bank(1),
        }
    }

    fn slot_config(&self, id: SlotId) -> &BTreeMap<String, PartSelector> {
        match id {
            SlotId::A => &self.a,
            SlotId::B => &self.b,
        }
    }

    /// Checks that need no disk: both slots name the same non-empty set of roles, and the
    /// flags role is one of them.
    pub(crate) fn validate(&self) -> Result<(), SlotError> {
        for id in [SlotId::A, SlotId::B] {
            let c = self.slot_config(id);
            if c.is_empty() {
                return Err(SlotError::Config(format!("slot {id} lists no partitions")));
            }
            if !c.contains_key(&self.flags_role) {
                return Err(SlotError::Config(format!(
                    "flags role {:?} is not among slot {id}'s roles ({})",
                    self.flags_role,
                    c.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        if self.a.keys().ne(self.b.keys()) {
            return Err(SlotError::Config(format!(
                "slots A and B have different roles: A has {}, B has {}",
                self.a.keys().cloned().collect::<Vec<_>>().join(", "),
                self.b.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }

    /// Find every configured partition in `gpt`.
    pub fn resolve(&self, gpt: &Gpt) -> Result<ResolvedSlots, SlotError> {
        self.validate()?;
        let entries = gpt.partitions();
        let ss = gpt.sector_size();
        let slot = |id: SlotId| -> Result<Slot, SlotError> {
            let mut parts = BTreeMap::new();
            for (role, sel) in self.slot_config(id) {
                let e = find(&entries, sel).map_err(|e| match e {
                    Find::Missing if *role == self.flags_role => SlotError::FlagsPartitionMissing {
                        slot: id,
                        role: role.clone(),
                        selector: sel.to_string(),
                    },
                    Find::Missing => SlotError::PartitionMissing {
                        slot: id,
                        role: role.clone(),
                        selector: sel.to_string(),
                    },
                    Find::Ambiguous(numbers) => SlotError::Ambiguous {
                        slot: id,
                        role: role.clone(),
                        selector: sel.to_string(),
                        numbers,
                    },
                })?;
                parts.insert(role.clone(), Partition::from_entry(e, ss));
            }
            let flags_part = parts
                .get(&self.flags_role)
                .map(|p| p.number)
                .ok_or_else(|| SlotError::Config(format!("no {:?} role", self.flags_role)))?;
            Ok(Slot {
                id,
                parts,
                flags_role: self.flags_role.clone(),
                flags_part,
            })
        };
        let resolved = ResolvedSlots {
            a: slot(SlotId::A)?,
            b: slot(SlotId::B)?,
        };
        check_overlap(&resolved)?;
        Ok(resolved)
    }
}

enum Find {
    Missing,
    Ambiguous(Vec<u32>),
}

fn find<'a>(entries: &'a [Entry], sel: &PartSelector) -> Result<&'a Entry, Find> {
    match sel {
        PartSelector::Label(l) => {
            let hits: Vec<&Entry> = entries.iter().filter(|e| &e.name == l).collect();
            match hits.as_slice() {
                [] => Err(Find::Missing),
                [one] => Ok(one),
                many => Err(Find::Ambiguous(many.iter().map(|e| e.number).collect())),
            }
        }
        PartSelector::TypeGuid { guid, nth } => entries
            .iter()
            .filter(|e| e.type_guid == *guid)
            .nth(*nth as usize)
            .ok_or(Find::Missing),
        PartSelector::Number(n) => entries.iter().find(|e| e.number == *n).ok_or(Find::Missing),
    }
}

fn check_overlap(r: &ResolvedSlots) -> Result<(), SlotError> {
    let all: Vec<(SlotId, &String, &Partition)> = [&r.a, &r.b]
        .into_iter()
        .flat_map(|s| s.parts.iter().map(move |(role, p)| (s.id, role, p)))
        .collect();
    for (i, (sa, ra, pa)) in all.iter().enumerate() {
        for (sb, rb, pb) in &all[i + 1..] {
            if pa.first_lba <= pb.last_lba && pb.first_lba <= pa.last_lba {
                return Err(SlotError::Overlap(format!(
                    "slot {sa} {ra} (partition {}) and slot {sb} {rb} (partition {}) share disk space",
                    pa.number, pb.number
                )));
            }
        }
    }
    Ok(())
}

/// One resolved partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub number: u32,
    pub first_lba: u64,
    pub last_lba: u64,
    pub byte_offset: u64,
    pub byte_len: u64,
    #[serde(with = "guid_text")]
    pub unique_guid: Uuid,
    #[serde(with = "guid_text")]
    pub type_guid: Uuid,
    pub label: String,
}

/// GUIDs as their usual hyphenated text (the workspace's `uuid` has no serde feature).
mod guid_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub(crate) fn serialize<S: Serializer>(g: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(g)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        let text = String::deserialize(d)?;
        Uuid::parse_str(&text).map_err(serde::de::Error::custom)
    }
}

impl Partition {
    fn from_entry(e: &Entry, sector_size: u64) -> Partition {
        Partition {
            number: e.number,
            first_lba: e.first_lba,
            last_lba: e.last_lba,
            byte_offset: e.first_lba * sector_size,
            byte_len: (e.last_lba - e.first_lba + 1) * sector_size,
            unique_guid: e.unique_guid,
            type_guid: e.type_guid,
            label: e.name.clone(),
        }
    }
}

/// One slot: its partitions by role, and the number of the one that carries the flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub id: SlotId,
    pub parts: BTreeMap<String, Partition>,
    pub flags_role: String,
    pub flags_part: u32,
}

impl Slot {
    /// The partition that carries the boot flags.
    pub fn flags_partition(&self) -> Option<&Partition> {
        self.parts.get(&self.flags_role)
    }

    /// Whether any partition of this slot has this unique GUID.
    pub(crate) fn has_guid(&self, guid: Uuid) -> bool {
        self.parts.values().any(|p| p.unique_guid == guid)
    }
}

/// Both slots as found on the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedSlots {
    pub a: Slot,
    pub b: Slot,
}

impl ResolvedSlots {
    pub fn get(&self, id: SlotId) -> &Slot {
        match id {
            SlotId::A => &self.a,
            SlotId::B => &self.b,
        }
    }

    /// The slot whose flags partition has this number.
    pub fn slot_with_flags_part(&self, number: u32) -> Option<SlotId> {
        [&self.a, &self.b]
            .into_iter()
            .find(|s| s.flags_part == number)
            .map(|s| s.id)
    }
}

/// Errors resolving slots.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Gpt(#[from] GptError),
    #[error("slot configuration: {0}")]
    Config(String),
    #[error("slot {slot} {role}: no partition with {selector}")]
    PartitionMissing {
        slot: SlotId,
        role: String,
        selector: String,
    },
    #[error("slot {slot}: the flags partition ({role}) is missing: no partition with {selector}")]
    FlagsPartitionMissing {
        slot: SlotId,
        role: String,
        selector: String,
    },
    #[error("slot {slot} {role}: {selector} is ambiguous, partitions {numbers:?} all match")]
    Ambiguous {
        slot: SlotId,
        role: String,
        selector: String,
        numbers: Vec<u32>,
    },
    #[error("slots overlap: {0}")]
    Overlap(String),
}

impl SlotError {
    /// A stable machine-readable kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            SlotError::Gpt(e) => e.kind(),
            SlotError::Config(_) => "slot_config",
            SlotError::PartitionMissing { .. } => "slot_partition_missing",
            SlotError::FlagsPartitionMissing { .. } => "slot_flags_partition_missing",
            SlotError::Ambiguous { .. } => "slot_ambiguous",
            SlotError::Overlap(_) => "slot_overlap",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[derive(Deserialize)]
    struct Wrap {
        slots: SlotLayoutConfig,
    }

    #[test]
    fn toml_selectors_round_trip_and_reject_bad_shapes() {
        let t = r#"
            [slots]
            flags_role = "boot"
            [slots.a]
            boot = { type_guid = "6b636168-7420-6568-2070-6c616e657421" }
            root = { label = "ROOT-A" }
            [slots.b]
            boot = { type_guid = "6b636168-7420-6568-2070-6c616e657421", nth = 1 }
            root = { number = 5 }
        "#;
        let w: Wrap = toml::from_str(t).unwrap();
        assert_eq!(
            w.slots.b["boot"],
            PartSelector::TypeGuid {
                guid: BOTTLEROCKET_BOOT_TYPE,
                nth: 1
            }
        );
        assert_eq!(w.slots.a["root"], PartSelector::Label("ROOT-A".into()));
        assert_eq!(w.slots.b["root"], PartSelector::Number(5));
        let back = toml::to_string(&w.slots).unwrap();
        let again: SlotLayoutConfig = toml::from_str(&back).unwrap();
        assert_eq!(again, w.slots);
        for preset in [
            SlotLayoutConfig::flatcar(),
            SlotLayoutConfig::chromeos(),
            SlotLayoutConfig::bottlerocket(),
        ] {
            preset.validate().unwrap();
            let s = toml::to_string(&preset).unwrap();
            assert_eq!(toml::from_str::<SlotLayoutConfig>(&s).unwrap(), preset);
        }

        for bad in [
            r#"x = { label = "A", number = 3 }"#,
            r#"x = { }"#,
            r#"x = { number = 0 }"#,
            r#"x = { label = "" }"#,
            r#"x = { type_guid = "nope" }"#,
            r#"x = { label = "A", nth = 1 }"#,
            r#"x = { lable = "A" }"#,
        ] {
            let r: Result<BTreeMap<String, PartSelector>, _> = toml::from_str(bad);
            assert!(r.is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn validate_names_the_problem() {
        let mut c = SlotLayoutConfig::chromeos();
        c.flags_role = "boot".into();
        let e = c.validate().unwrap_err();
        assert_eq!(e.kind(), "slot_config");
        assert!(e.to_string().contains("\"boot\""), "{e}");
        let mut c = SlotLayoutConfig::chromeos();
        c.b.remove("root");
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("different roles"));
    }
}
