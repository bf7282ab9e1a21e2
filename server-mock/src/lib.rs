//! server-mock: a real HTTP server for tests, demos and staging.
