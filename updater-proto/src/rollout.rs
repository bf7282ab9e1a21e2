//! Staged rollout math (Bottlerocket-style waves), pure functions of seed and time.
//!
//! Every host has a seed in `0..SEED_SPACE`. Wave `i` is `(seed_bound_i, start_i)` and holds
//! the seeds in `[seed_bound_{i-1}, seed_bound_i)` (the first wave starts at seed 0). Inside a
//! wave, hosts are spread linearly by seed over `[start_i, start_{i+1})`; the last wave has no
//! next start, so all its hosts become eligible at its start, and so do seeds at or above the
//! last bound. No waves: everybody is eligible at once.

use ring::digest;
use serde::{Deserialize, Serialize};

/// Number of distinct seeds; seeds are `0..SEED_SPACE`.
pub const SEED_SPACE: u32 = 2048;
/// Domain separation prefix for [`WaveSeed::from_machine_id`].
pub const SEED_DOMAIN: &[u8] = b"update-agent-wave-seed:";

/// One rollout wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// Exclusive upper bound of the seeds in this wave, in `1..=SEED_SPACE`.
    pub seed_bound: u32,
    /// When the wave's first host becomes eligible, Unix seconds.
    pub start: i64,
}

/// A host's position in the rollout, in `0..SEED_SPACE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct WaveSeed(u32);

/// A seed outside `0..SEED_SPACE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("wave seed {0} is out of range (must be below {SEED_SPACE})")]
pub struct SeedOutOfRange(pub u32);

impl WaveSeed {
    /// A seed from a stored or configured number.
    pub fn new(seed: u32) -> Result<Self, SeedOutOfRange> {
        if seed < SEED_SPACE {
            Ok(WaveSeed(seed))
        } else {
            Err(SeedOutOfRange(seed))
        }
    }

    /// Derive the seed from `/etc/machine-id` contents: SHA-256(`SEED_DOMAIN` || id) with
    /// surrounding ASCII whitespace trimmed, first 8 bytes big-endian, mod `SEED_SPACE`.
    /// Keyed by the domain string so the seed says nothing about other uses of the id.
    pub fn from_machine_id(machine_id: &[u8]) -> Self {
        let id = machine_id.trim_ascii();
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(SEED_DOMAIN);
        ctx.update(id);
        let d = ctx.finish();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d.as_ref()[..8]);
        WaveSeed((u64::from_be_bytes(first) % u64::from(SEED_SPACE)) as u32)
    }

    /// The seed as a number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for WaveSeed {
    type Error = SeedOutOfRange;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        WaveSeed::new(v)
    }
}

impl From<WaveSeed> for u32 {
    fn from(s: WaveSeed) -> u32 {
        s.0
    }
}

/// Whether a host may install now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eligibility {
    /// The host's time has come.
    Now,
    /// Not yet; eligible from this Unix time on.
    NotBefore(i64),
}

/// The Unix time from which a host with `seed` may install, or `None` with no waves
/// (eligible at any time). `waves` must be valid (as checked by `Manifest::validate`).
pub fn eligible_from(waves: &[Wave], seed: WaveSeed) -> Option<i64> {
    let s = i128::from(seed.get());
    let mut lower = 0i128;
    for (i, wave) in waves.iter().enumerate() {
        let upper = i128::from(wave.seed_bound);
        if s < upper {
            let Some(next) = waves.get(i + 1) else {
                return Some(wave.start);
            };
            let span = i128::from(next.start) - i128::from(wave.start);
            let width = (upper - lower).max(1);
            let offset = (s - lower).max(0) * span.max(0) / width;
            let at = i128::from(wave.start) + offset;
            return Some(i64::try_from(at).unwrap_or(i64::MAX));
        }
        lower = upper;
    }
    waves.last().map(|w| w.start)
}

/// Whether a host with `seed` may install at `now` (Unix seconds), and if not, from when.
pub fn eligibility(waves: &[Wave], seed: WaveSeed, now: i64) -> Eligibility {
    match eligible_from(waves, seed) {
        Some(at) if now < at => Eligibility::NotBefore(at),
        _ => Eligibility::Now,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn seed(n: u32) -> WaveSeed {
        WaveSeed::new(n).unwrap()
    }

    fn waves() -> Vec<Wave> {
        vec![
            Wave {
                seed_bound: 100,
                start: 1000,
            },
            Wave {
                seed_bound: 1100,
                start: 2000,
            },
            Wave {
                seed_bound: 2048,
                start: 12000,
            },
        ]
    }

    #[test]
    fn no_waves_means_now() {
        assert_eq!(eligible_from(&[], seed(7)), None);
        assert_eq!(eligibility(&[], seed(7), i64::MIN), Eligibility::Now);
    }

    #[test]
    fn hosts_spread_linearly_inside_a_wave() {
        let w = waves();
        assert_eq!(eligible_from(&w, seed(0)), Some(1000));
        assert_eq!(eligible_from(&w, seed(50)), Some(1500));
        assert_eq!(eligible_from(&w, seed(99)), Some(1990));
        assert_eq!(eligible_from(&w, seed(100)), Some(2000));
        assert_eq!(eligible_from(&w, seed(600)), Some(7000));
        assert_eq!(eligible_from(&w, seed(1100)), Some(12000));
        assert_eq!(eligible_from(&w, seed(2047)), Some(12000));
        assert_eq!(
            eligibility(&w, seed(600), 6999),
            Eligibility::NotBefore(7000)
        );
        assert_eq!(eligibility(&w, seed(600), 7000), Eligibility::Now);
    }

    #[test]
    fn seeds_above_the_last_bound_join_the_last_wave_start() {
        let w = vec![Wave {
            seed_bound: 10,
            start: 500,
        }];
        assert_eq!(eligible_from(&w, seed(3)), Some(500));
        assert_eq!(eligible_from(&w, seed(2000)), Some(500));
    }

    #[test]
    fn seed_range_is_enforced() {
        assert!(WaveSeed::new(SEED_SPACE).is_err());
        assert!(serde_json::from_str::<WaveSeed>("2048").is_err());
        assert_eq!(
            serde_json::from_str::<WaveSeed>("2047").unwrap().get(),
            2047
        );
    }

    #[test]
    fn machine_id_seed_is_stable_and_trims_newline() {
        let id = b"4c4c4544003957108052b4c04f384833";
        let a = WaveSeed::from_machine_id(id);
        let b = WaveSeed::from_machine_id(b"4c4c4544003957108052b4c04f384833\n");
        assert_eq!(a, b);
        // Pinned so agent, publisher and docs agree across refactors:
        // sha256("update-agent-wave-seed:4c4c...4833")[..8] big-endian mod 2048.
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"update-agent-wave-seed:4c4c4544003957108052b4c04f384833");
        let d = ctx.finish();
        let n = u64::from_be_bytes(d.as_ref()[..8].try_into().unwrap()) % 2048;
        assert_eq!(u64::from(a.get()), n);
        assert_ne!(
            WaveSeed::from_machine_id(b"00000000000000000000000000000001"),
            WaveSeed::from_machine_id(b"00000000000000000000000000000002")
        );
    }

    proptest! {
        #[test]
        fn later_seeds_never_come_earlier(a in 0u32..2048, b in 0u32..2048) {
            let w = waves();
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(eligible_from(&w, seed(lo)) <= eligible_from(&w, seed(hi)));
        }

        #[test]
        fn eligibility_is_monotone_in_time(s in 0u32..2048, t in 0i64..20000) {
            let w = waves();
            if eligibility(&w, seed(s), t) == Eligibility::Now {
                prop_assert_eq!(eligibility(&w, seed(s), t + 1), Eligibility::Now);
            }
        }
    }
}
