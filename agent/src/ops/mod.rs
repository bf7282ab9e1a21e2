//! Operations behind the CLI commands. Each returns a serializable report; the CLI prints it.

pub mod apply;
pub mod cancel;
pub mod check;
pub mod commit;
pub mod drill;
pub mod health;
pub mod history;
pub mod manifest;
pub mod reboot;
pub mod reset;
pub mod resume;
pub mod rollback;
pub mod status;
pub(crate) mod testhold;
