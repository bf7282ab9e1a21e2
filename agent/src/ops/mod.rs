//! Operations behind the CLI commands. Each returns a serializable report; the CLI prints it.

pub mod apply;
pub mod check;
pub mod commit;
pub mod manifest;
pub mod reboot;
pub mod resume;
pub mod status;
