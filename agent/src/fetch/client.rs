//! The one HTTP client builder: manifests, trust roots, images, FleetLock and status reports
//! all get their client here, so they trust the same servers.
//!
//! TLS is rustls with ring. By default servers must chain to the system roots: reqwest's
//! rustls backend verifies with rustls-platform-verifier, which on Linux reads the
//! distribution's store (`/etc/ssl/certs`, via rustls-native-certs, honouring `SSL_CERT_FILE`
//! and `SSL_CERT_DIR`), so operators manage trust the way they do for every other program
//! and a CA update arrives with the OS image, not with a rebuild of the agent (as a compiled-in
//! webpki-roots list would need). With `[server] ca_file`, only the CAs in that PEM file are
//! trusted (a private PKI; a leaked public CA cannot impersonate the update server).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::FetchError;

/// How to build a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpOptions {
    /// TCP + TLS connect timeout.
    pub connect_timeout: Option<Duration>,
    /// Longest wait for any bytes.
    pub read_timeout: Option<Duration>,
    /// Deadline for a whole request.
    pub timeout: Option<Duration>,
    /// Trust only the CA certificates in this PEM file.
    pub ca_file: Option<PathBuf>,
}

/// Build a client as `opts` says. Installs ring as the process's rustls crypto provider
/// (once; an already installed provider is kept).
pub fn http_client(opts: &HttpOptions) -> Result<reqwest::Client, FetchError> {
    // Err only means a provider is already installed, which is what we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let make = || {
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("update-agent/", env!("CARGO_PKG_VERSION")))
            .tls_backend_rustls();
        if let Some(t) = opts.connect_timeout {
            b = b.connect_timeout(t);
        }
        if let Some(t) = opts.read_timeout {
            b = b.read_timeout(t);
        }
        if let Some(t) = opts.timeout {
            b = b.timeout(t);
        }
        b
    };
    match &opts.ca_file {
        Some(path) => {
            let certs = load_ca_file(path)?;
            make()
                .tls_certs_only(certs)
                .build()
                .map_err(FetchError::Client)
        }
        // A host without CA certificates still reaches http:// servers (the lab found the
        // daemon unable to start on a minimal Debian otherwise).
        None => super::build_tolerating_no_roots(make).map_err(FetchError::Client),
    }
}

/// The CA certificates of a PEM file; a file with none is an error (it would trust nothing
/// and fail every fetch later with a less clear message).
pub(crate) fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, FetchError> {
    let bad = |message: String| FetchError::CaFile {
        path: path.to_path_buf(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// The TLS failure behind a request error, if that is what it was (certificate not trusted,
/// wrong name, expired, not TLS at all...). Every HTTP caller (manifests, roots, images,
/// FleetLock, reports) classifies its send errors with this, so a trust failure has the
/// kind `tls` wherever it happens.
pub(crate) fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        // io::Error::source() skips the error it wraps, and the connector nests them
        // (Other around InvalidData around rustls::Error): look inside each layer.
        let mut inner: &(dyn std::error::Error + 'static) = err;
        for _ in 0..8 {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r.to_string());
            }
            match inner
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(wrapped) => inner = wrapped,
                None => break,
            }
        }
        cur = err.source();
    }
    None
}
