//! Fetching over HTTP(S): the signed manifest (small, hard size bound) and images (streamed,
//! resumable with `Range` + `If-Range`, retried with backoff, bounded in size and time).
//!
//! - [`fetch_manifest`] reads a manifest from a URL or a local file, never buffering more
//!   than `max_bytes`.
//! - [`Download`] streams an image as [`Chunk`]s; it resumes dropped connections from the
//!   byte it reached, and tells the consumer explicitly ([`Chunk::Restarted`]) when it had
//!   to start over from byte 0. It also implements the install pipeline's
//!   [`ImageSource`](crate::install::ImageSource).

use std::path::PathBuf;
use std::time::Duration;

mod client;
mod download;
mod manifest;
mod retry;

pub(crate) use client::tls_cause;
pub use client::{http_client, HttpOptions};
pub use download::{parse_content_range_value, strong_etag_value, Chunk, Download, FetchStats};
pub use manifest::{fetch_manifest, ManifestSource};
pub use reqwest::Url;

/// Timeouts, retries and the throughput guard for one fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchConfig {
    /// TCP (and TLS) connect timeout; applied by [`build_client`].
    pub connect_timeout: Duration,
    /// Longest wait for response headers or for the next body chunk.
    pub read_timeout: Duration,
    /// Deadline for the whole fetch, retries and backoff included; `None` for none.
    pub overall_timeout: Option<Duration>,
    /// Attempts without new progress before giving up (1 = no retry). An attempt that
    /// brings bytes beyond the furthest offset reached so far resets the count.
    pub max_attempts: u32,
    /// First backoff delay; doubles per failed attempt, up to `backoff_cap`, with jitter.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Fail with `slow_retrieval` when a response delivers less than this.
    pub min_throughput: Option<MinThroughput>,
    /// `[server] ca_file`: trust only these CAs for https (default: the system roots).
    pub ca_file: Option<PathBuf>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
            overall_timeout: Some(Duration::from_secs(6 * 3600)),
            max_attempts: 8,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(60),
            min_throughput: Some(MinThroughput {
                bytes_per_sec: 1024,
                window: Duration::from_secs(30),
            }),
            ca_file: None,
        }
    }
}

/// Minimum transfer rate over a sliding window (TUF's slow-retrieval defence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinThroughput {
    pub bytes_per_sec: u64,
    pub window: Duration,
}

/// Fetch failures. URLs in messages have user info and query removed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid URL or path {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("[server] ca_file {path}: {message}", path = path.display())]
    CaFile { path: PathBuf, message: String },
    #[error("{url}: TLS failed: {detail} (the server's certificate must chain to [server] ca_file if set, else to the system roots)")]
    Tls { url: String, detail: String },
    #[error("cannot connect to {url}: {}", retry::root_cause(source))]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: timed out waiting for {what} (after {after:?})")]
    Timeout {
        url: String,
        what: &'static str,
        after: Duration,
    },
    #[error("{url}: server answered HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("{url}: request failed: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: got {got} of {expected} bytes ({detail})")]
    Truncated {
        url: String,
        expected: u64,
        got: u64,
        detail: String,
    },
    #[error("{url}: more bytes than the {expected} declared ({got} seen)")]
    TooLong {
        url: String,
        expected: u64,
        got: u64,
    },
    #[error("{what} is larger than the {limit}-byte limit ({seen} bytes or more)")]
    TooLarge { what: String, limit: u64, seen: u64 },
    #[error(
        "{url}: too slow: {bytes} bytes in the last {window:?}, below {min_bytes_per_sec} bytes/s"
    )]
    SlowRetrieval {
        url: String,
        bytes: u64,
        window: Duration,
        min_bytes_per_sec: u64,
    },
    #[error("{url}: unexpected answer: {reason}")]
    Protocol { url: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An offline bundle that is not what `update-publish bundle` writes, or lacks a file.
    #[error(transparent)]
    Bundle(Box<crate::bundle::BundleError>),
}

impl From<crate::bundle::BundleError> for FetchError {
    fn from(e: crate::bundle::BundleError) -> Self {
        FetchError::Bundle(Box::new(e))
    }
}

impl FetchError {
    /// Stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::InvalidUrl { .. } => "invalid_url",
            FetchError::Client(_) => "client",
            FetchError::CaFile { .. } => "ca_file",
            FetchError::Tls { .. } => "tls",
            FetchError::Connect { .. } => "connect",
            FetchError::Timeout { .. } => "timeout",
            FetchError::HttpStatus { .. } => "http_status",
            FetchError::Transport { .. } => "transport",
            FetchError::Truncated { .. } => "truncated",
            FetchError::TooLong { .. } => "too_long",
            FetchError::TooLarge { .. } => "too_large",
            FetchError::SlowRetrieval { .. } => "slow_retrieval",
            FetchError::Protocol { .. } => "protocol",
            FetchError::Io { .. } => "io",
            FetchError::Bundle(e) => e.kind(),
        }
    }

    /// The HTTP status, for `http_status` errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            FetchError::HttpStatus { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The client for manifests, roots and images: the config's connect/read timeouts and CA
/// (see [`http_client`]).
pub fn build_client(cfg: &FetchConfig) -> Result<reqwest::Client, FetchError> {
    http_client(&HttpOptions {
        connect_timeout: Some(cfg.connect_timeout),
        read_timeout: Some(cfg.read_timeout),
        timeout: None,
        ca_file: cfg.ca_file.clone(),
    })
}

/// Builds `make()`'s client. On a system without CA certificates (no `ca-certificates`
/// package) the platform verifier refuses to start and every client build failed, even for
/// http:// servers (found by the lab: the daemon could not start on a minimal Debian). Then
/// the client is built again trusting no root: http:// works, https:// fails at connect with
/// an unknown-issuer error, and a warning says why.
pub(crate) fn build_tolerating_no_roots(
    make: impl Fn() -> reqwest::ClientBuilder,
) -> Result<reqwest::Client, reqwest::Error> {
    let first = match make().build() {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    match make()
        .tls_certs_only(Vec::<reqwest::Certificate>::new())
        .build()
    {
        Ok(c) => {
            tracing::warn!(error = %first, "no usable CA certificates on this system (install ca-certificates): https:// servers cannot be verified, http:// still works");
            Ok(c)
        }
        Err(_) => Err(first),
    }
}

/// A URL fit for logs and errors: no user info, no query, no fragment.
pub(crate) fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn redact_strips_secrets() {
        let u = Url::parse("https://user:pw@h.example:8443/a/b.img?token=x#f").unwrap();
        assert_eq!(redact(&u), "https://h.example:8443/a/b.img");
    }
}
