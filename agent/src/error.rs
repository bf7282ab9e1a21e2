//! The agent's top-level error: every module's error with its stable kind, so the CLI, the
//! state record and metrics report failures the same way.

use crate::boot::BootError;
use crate::config::ConfigError;
use crate::disk::{DiskError, SlotError};
use crate::fetch::FetchError;
use crate::health::HealthError;
use crate::install::InstallError;
use crate::policy::PolicyError;
use crate::state::StateError;

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
    Health(#[from] HealthError),
    #[error(transparent)]
    Policy(Box<PolicyError>),
    #[error(transparent)]
    Install(Box<InstallError>),
    #[error("cannot tell which slot is booted: {0}")]
    BootedSlotUnknown(String),
    #[error("{0}")]
    Refused(String),
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
            AgentError::Health(e) => e.kind(),
            AgentError::Policy(e) => e.kind(),
            // A download failure is reported by its cause (timeout, http_status, truncated,
            // slow_retrieval...), which is what metrics and operators need.
            AgentError::Install(e) => match e.as_ref() {
                InstallError::Fetch { source, .. } => source.kind,
                e => e.kind(),
            },
            AgentError::BootedSlotUnknown(_) => "booted_slot_unknown",
            AgentError::Refused(_) => "refused",
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
