//! Operations behind the CLI commands. Each returns a serializable report; the CLI prints it.

pub mod status;
