//! `update-agent status`: slots, partitions, flags, booted slot, next boot and why.

use serde::Serialize;

use crate::boot::{BootStatus, SlotId};
use crate::disk::Partition;
use crate::error::AgentError;
use crate::host::{BootedSlot, Host};
use crate::state::{Phase, SlotRecord};

#[derive(Debug, Clone, Serialize)]
pub struct SlotReport {
    pub slot: SlotId,
    #[serde(serialize_with = "crate::jsonout::with_role")]
    pub partitions: Vec<(String, Partition)>,
    pub flags_role: String,
    /// What this host installed there, as its state records it.
    pub installed: Option<SlotRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub disk: String,
    pub booted: Option<BootedSlot>,
    /// Why the booted slot is unknown, when it is.
    pub booted_error: Option<String>,
    pub boot: BootStatus,
    pub slots: Vec<SlotReport>,
    pub phase: Phase,
    pub denylist: Vec<String>,
    /// This host's rollout seed (`[daemon] wave_seed` or from the machine id); `check` says
    /// when the offered release's waves admit it.
    pub wave_seed: Option<u32>,
    /// The FleetLock reboot slot this host holds, if any (released after a committed boot).
    pub fleetlock_held: Option<crate::fleet::lock::HeldSlot>,
    /// Trust root, manifest keys, and what the transport exposes (`trust::status`).
    pub trust: crate::trust::TrustStatus,
}

/// Reads everything; writes nothing.
pub fn status(host: &Host) -> Result<StatusReport, AgentError> {
    let slots = host.slots()?;
    let (booted, booted_error) = match host.booted_slot(&slots) {
        Ok(b) => (Some(b), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let boot = host.boot_control()?.status()?;
    let state = host.state.load()?;
    let slot_reports = [&slots.a, &slots.b]
        .into_iter()
        .map(|s| SlotReport {
            slot: s.id,
            partitions: s
                .parts
                .iter()
                .map(|(r, p)| (r.clone(), p.clone()))
                .collect(),
            flags_role: s.flags_role.clone(),
            installed: state.slots.get(&s.id).cloned(),
        })
        .collect();
    Ok(StatusReport {
        disk: host.disk_path()?.display().to_string(),
        booted,
        booted_error,
        boot,
        slots: slot_reports,
        phase: state.phase.clone(),
        denylist: state.denylist.iter().map(|d| d.version.clone()).collect(),
        wave_seed: crate::fleet::wave_seed(&host.config).ok().map(|s| s.get()),
        fleetlock_held: crate::fleet::lock::HeldSlot::load(host.state.dir())
            .ok()
            .flatten(),
        trust: crate::trust::status(host),
    })
}

/// The state record's phase as a sentence.
pub(crate) fn phase_text(phase: &Phase) -> String {
    match phase {
        Phase::Idle => "idle".into(),
        Phase::Downloading {
            version,
            bytes_done,
        } => format!("installing {version} ({bytes_done} bytes durable at the last checkpoint)"),
        Phase::Staged { slot, version } => {
            format!("{version} staged in slot {slot}, waiting for the reboot")
        }
        Phase::Trial { slot, version, .. } => {
            format!("trial boot of {version} in slot {slot}: health check pending")
        }
        Phase::Committed { slot, version } => format!("{version} committed in slot {slot}"),
        Phase::RolledBack {
            reason,
            from_version,
        } => match from_version {
            Some(v) => format!("rolled back from {v}: {reason}"),
            None => format!("rolled back: {reason}"),
        },
        Phase::Failed { kind, message } => format!("failed [{kind}]: {message}"),
        Phase::Unknown => "unknown (written by a newer agent)".into(),
    }
}

impl StatusReport {
    /// The human form.
    pub fn render(&self) -> String {
        let mut out = format!(
            "disk: {} (boot control: {})\n",
            self.disk, self.boot.backend
        );
        match (&self.booted, &self.booted_error) {
            (Some(b), _) => out += &format!("booted: slot {} (from {})\n", b.slot, b.source),
            (None, Some(e)) => out += &format!("booted: unknown ({e})\n"),
            (None, None) => out += "booted: unknown\n",
        }
        for s in &self.slots {
            let flags = self.boot.slots.iter().find(|f| f.slot == s.slot);
            out += &format!("slot {}:", s.slot);
            if let Some(f) = flags {
                out += &format!(
                    " priority={} tries={} successful={}",
                    f.priority, f.tries, f.successful as u8
                );
            }
            match &s.installed {
                Some(r) => {
                    out += &format!(
                        " version={}{}",
                        r.version,
                        if r.verified { " (verified)" } else { "" }
                    )
                }
                None => out += " version=unknown",
            }
            out += "\n";
            for (role, p) in &s.partitions {
                let flag = if *role == s.flags_role {
                    " [flags]"
                } else {
                    ""
                };
                out += &format!(
                    "  {role}: partition {} '{}' {} ({} MiB){flag}\n",
                    p.number,
                    p.label,
                    p.unique_guid,
                    p.byte_len >> 20
                );
            }
        }
        match self.boot.next {
            Some(n) => out += &format!("next boot: slot {n} ({})\n", self.boot.reason),
            None => out += &format!("next boot: NOTHING BOOTABLE ({})\n", self.boot.reason),
        }
        out += &format!("phase: {}\n", phase_text(&self.phase));
        if !self.denylist.is_empty() {
            out += &format!("denylisted versions: {}\n", self.denylist.join(", "));
        }
        match self.wave_seed {
            Some(seed) => {
                out += &format!(
                    "wave seed: {seed} (`check` shows when the offered release admits it)\n"
                )
            }
            None => out += "wave seed: unknown (no machine id; set [daemon] wave_seed)\n",
        }
        if let Some(h) = &self.fleetlock_held {
            out += &format!(
                "FleetLock: holding a reboot slot in group {} since {} (for {}); released after a committed boot\n",
                h.group, h.taken_at, h.version
            );
        }
        out += &self.trust.render();
        out
    }
}
