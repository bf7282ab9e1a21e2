//! The agent's top-level error: every module's error with its stable kind, so the CLI, the
//! state record and metrics report failures the same way.

use crate::boot::BootError;
use crate::boot::SlotId;
use crate::config::ConfigError;
use crate::disk::{DiskError, SlotError};
use crate::fetch::FetchError;
use crate::fleet::FleetError;
use crate::health::HealthError;
use crate::hooks::HookError;
use crate::install::InstallError;
use crate::policy::PolicyError;
use crate::state::StateError;
use std::path::PathBuf;
use updater_proto::RootError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Slots(#[from] SlotError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("manifest {source_name} rejected: {error}")]
    Verify {
        source_name: String,
        error: updater_proto::VerifyError,
    },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    Policy(Box<PolicyError>),
    #[error(transparent)]
    Install(Box<InstallError>),
    #[error("cannot tell which slot is booted: {0}")]
    BootedSlotUnknown(String),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// A setting the command needs is not set.
    #[error("{key} is not configured: {hint}")]
    NotConfigured { key: &'static str, hint: String },
    /// The local manifest file cannot be read (missing, permissions, a directory...).
    #[error("manifest {source_name} cannot be read: {source}")]
    ManifestUnreadable {
        source_name: String,
        #[source]
        source: FetchError,
    },
    /// The manifest's images and the target slot's partitions are not the same roles: a
    /// slot never mixes partitions of two releases.
    #[error("manifest {version} does not match slot {slot}'s partitions: {detail}")]
    ManifestRolesMismatch {
        version: String,
        slot: SlotId,
        detail: String,
    },
    /// An image URL of the manifest cannot be resolved against the manifest's location.
    #[error("image url {url:?} against {base}: {reason}")]
    ImageUrl {
        url: String,
        base: String,
        reason: String,
    },
    /// The booted slot is on its trial boot: the other slot is its only fallback.
    #[error(
        "slot {booted} runs {version} on its trial boot; slot {fallback} is its only \
         fallback, so nothing is installed until {version} is confirmed (health-check or \
         mark-good) or rolled back"
    )]
    TrialInProgress {
        booted: SlotId,
        fallback: SlotId,
        version: String,
    },
    /// `cancel` with nothing staged.
    #[error("nothing is staged, so there is nothing to cancel (phase: {phase})")]
    NothingStaged { phase: String },
    /// `cancel` asked a running install to stop and it did not within the wait.
    #[error(
        "asked the running install (process {pid}) to stop, but it still holds the install \
         lock after {waited_secs} s; run `update-agent cancel` again or stop that process"
    )]
    CancelTimeout { pid: u32, waited_secs: u64 },
    /// `cancel` once the staged slot has booted.
    #[error(
        "{version} in slot {slot} is already on its trial boot: nothing to cancel. The health \
         check decides, or run `update-agent rollback`"
    )]
    AlreadyOnTrial { slot: SlotId, version: String },
    /// `rollback` to a slot that is staged but never booted.
    #[error(
        "slot {slot} holds {version}, staged but never booted: it is no rollback target. To \
         drop the pending update run `update-agent cancel`"
    )]
    RollbackTargetStaged { slot: SlotId, version: String },
    /// `rollback` to a slot without a verified image.
    #[error("refusing to roll back to slot {slot}: {detail}; only a slot holding a verified image is a rollback target")]
    RollbackTargetUnverified { slot: SlotId, detail: String },
    /// The running version cannot be established from the configured source.
    #[error("cannot tell the running version: {0}")]
    RunningVersionUnknown(String),
    /// The reboot command ran and failed.
    #[error("reboot command {command:?} failed: {status}")]
    RebootFailed {
        command: Vec<String>,
        status: String,
    },
    /// The sandbox (demo) did not behave as it must.
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// A stable machine-readable kind, for `--json`, the state record and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::Config(e) => e.kind(),
            AgentError::State(e) => e.kind(),
            AgentError::Disk(e) => e.kind(),
            AgentError::Slots(e) => e.kind(),
            AgentError::Boot(e) => e.kind(),
            AgentError::Verify { error, .. } => error.kind(),
            AgentError::Fetch(e) => e.kind(),
            AgentError::Trust(e) => e.kind(),
            AgentError::Health(e) => e.kind(),
            AgentError::Hook(e) => e.kind(),
            AgentError::Policy(e) => e.kind(),
            // A download failure is reported by its cause (timeout, http_status, truncated,
            // slow_retrieval...), which is what metrics and operators need; a boot-control
            // failure by the boot layer's own kind (boot_refused, boot_inconsistent...), the
            // same one `status`, `rollback` and `cancel` report for that disk.
            AgentError::Install(e) => match e.as_ref() {
                InstallError::Fetch { source, .. } => source.kind,
                InstallError::Boot { source, .. } => source.kind(),
                e => e.kind(),
            },
            AgentError::BootedSlotUnknown(_) => "booted_slot_unknown",
            AgentError::Fleet(e) => e.kind(),
            AgentError::NotConfigured { .. } => "not_configured",
            AgentError::ManifestUnreadable { .. } => "manifest_unreadable",
            AgentError::ManifestRolesMismatch { .. } => "manifest_roles_mismatch",
            AgentError::ImageUrl { .. } => "image_url_invalid",
            AgentError::TrialInProgress { .. } => "trial_in_progress",
            AgentError::NothingStaged { .. } => "nothing_staged",
            AgentError::CancelTimeout { .. } => "cancel_timeout",
            AgentError::AlreadyOnTrial { .. } => "already_on_trial",
            AgentError::RollbackTargetStaged { .. } => "rollback_target_staged",
            AgentError::RollbackTargetUnverified { .. } => "rollback_target_unverified",
            AgentError::RunningVersionUnknown(_) => "running_version_unknown",
            AgentError::RebootFailed { .. } => "reboot_failed",
            AgentError::Sandbox(_) => "sandbox",
            AgentError::Io { .. } => "io",
        }
    }
}

impl From<InstallError> for AgentError {
    fn from(e: InstallError) -> Self {
        AgentError::Install(Box::new(e))
    }
}

impl From<PolicyError> for AgentError {
    fn from(e: PolicyError) -> Self {
        AgentError::Policy(Box::new(e))
    }
}

/// Trust-root failures, each with its own kind.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A root refused by the rules (its kind is the rule's: `root_threshold_previous`, ...).
    #[error("trust root {source_name}: {error}")]
    Root {
        source_name: String,
        error: RootError,
    },
    /// The persisted root does not read back (corrupt or tampered with).
    #[error("persisted trust root {path}: {message}; restore it from a backup or remove it to fall back to [trust] root_file", path = path.display())]
    Persisted { path: PathBuf, message: String },
    /// The shipped root cannot be read.
    #[error("cannot read [trust] root_file {path}: {source}", path = path.display())]
    Shipped {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing the accepted root failed.
    #[error("cannot persist trust root {version} to {path}: {source}", path = path.display())]
    Write {
        version: u64,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Fetching the next root failed other than by its absence.
    #[error("fetching trust root {version}: {source}")]
    Fetch {
        version: u64,
        #[source]
        source: FetchError,
    },
}

impl TrustError {
    /// Stable machine-readable kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            TrustError::Root { error, .. } => error.kind(),
            TrustError::Persisted { .. } => "root_persisted_corrupt",
            TrustError::Shipped { .. } => "root_file_io",
            TrustError::Write { .. } => "root_write",
            TrustError::Fetch { source, .. } => source.kind(),
        }
    }
}
