//! The agent's top-level error: every module's error with its stable kind, so the CLI, the
//! state record and metrics report failures the same way.

use crate::boot::BootError;
use crate::config::ConfigError;
use crate::disk::{DiskError, SlotError};
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
    #[error("cannot get manifest {source_name}: {message}")]
    Manifest {
        source_name: String,
        kind: &'static str,
        message: String,
    },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Install(#[from] InstallError),
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
            AgentError::Manifest { kind, .. } => kind,
            AgentError::Policy(e) => e.kind(),
            AgentError::Install(e) => e.kind(),
            AgentError::BootedSlotUnknown(_) => "booted_slot_unknown",
            AgentError::Refused(_) => "refused",
            AgentError::Io { .. } => "io",
        }
    }
}
