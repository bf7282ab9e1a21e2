//! update-agent: streams signed OS images into the inactive A/B slot, flips the boot flags
//! crash-safely, and rolls back when the new system fails its health checks.
//!
//! The flow runs one way: `config` -> `cli` -> `fetch` -> `updater_proto` verification ->
//! policy -> `install` -> `boot` -> reboot -> health -> commit or rollback.
//! See `docs/ARCHITECTURE.md` for the code map and the invariants.

pub mod boot;
pub mod bundle;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod delta;
pub mod disk;
pub mod error;
pub mod fetch;
pub mod fleet;
pub mod health;
pub(crate) mod hooks;
pub mod host;
pub mod install;
pub mod jsonout;
pub mod ops;
pub(crate) mod policy;
pub mod progress;
pub mod publish;
pub(crate) mod slot;
pub mod state;
pub mod trust;
