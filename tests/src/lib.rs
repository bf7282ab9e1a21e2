//! Shared helpers for the end-to-end tests (disk images, servers, external tools).
