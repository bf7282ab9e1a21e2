//! The host's trust root (see `updater_proto::root` and `docs/security.md`): which root it
//! holds, the walk to the newest published root, and the persisted copy.
//!
//! - Bootstrap: the root shipped on the host (`[trust] root_file`), trusted as is.
//! - Persisted: every root accepted is written to `<state>/root.json` (atomic, 0600) before
//!   the next is fetched, in its own file so losing or replacing `state.json` cannot revert it.
//!   The newer of the persisted and the shipped root is used.
//! - Walk: before each manifest, `N+1.root.json`, `N+2.root.json`, ... are fetched from the
//!   manifest's directory until one is missing (404), at most [`MAX_ROOT_STEPS`] per poll,
//!   each bounded to [`MAX_ROOT_BYTES`]. The newest root reached must not have expired.
//! - Hosts without any root keep verifying manifests with `[[trust.keys]]`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use updater_proto::{
    Envelope, RootError, TrustPolicy, TrustedRoot, MAX_ROOT_BYTES, MAX_ROOT_STEPS,
};

// The error type lives with AgentError (below this module, which uses the host).
pub(crate) use crate::error::TrustError;

use crate::error::AgentError;
use crate::fetch::{fetch_manifest, FetchConfig, FetchError, ManifestSource};
use crate::host::Host;

/// The persisted root, in the state directory.
pub(crate) const ROOT_FILE: &str = "root.json";
/// Format of [`ROOT_FILE`].
const ROOT_FILE_FORMAT: u32 = 1;

/// [`ROOT_FILE`]'s content: the root envelope as received plus the keys revoked on the way.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistedRoot {
    format: u32,
    root: Envelope,
    revoked: BTreeSet<String>,
}

/// Where the root in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RootSource {
    /// `<state>/root.json`.
    Persisted,
    /// `[trust] root_file`.
    Shipped,
}

/// The root a host holds now, and where from.
#[derive(Debug, Clone)]
pub(crate) struct CurrentRoot {
    pub root: TrustedRoot,
    pub source: RootSource,
}

/// Path of the persisted root for a state directory.
pub fn root_path(state_dir: &Path) -> PathBuf {
    state_dir.join(ROOT_FILE)
}

/// Read the persisted root, if any; a file that does not verify is an error, never ignored.
pub fn load_persisted(state_dir: &Path) -> Result<Option<TrustedRoot>, TrustError> {
    let path = root_path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(TrustError::Persisted {
                path,
                message: e.to_string(),
            })
        }
    };
    let bad = |message: String| TrustError::Persisted {
        path: path.clone(),
        message,
    };
    let p: PersistedRoot = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if p.format != ROOT_FILE_FORMAT {
        return Err(bad(format!("unknown format {}", p.format)));
    }
    TrustedRoot::bootstrap(&p.root.to_json(), p.revoked)
        .map(Some)
        .map_err(|e| bad(format!("[{}] {e}", e.kind())))
}

/// Persist `root` atomically (temp file, fsync, rename, fsync dir; mode 0600).
pub fn persist(state_dir: &Path, root: &TrustedRoot) -> Result<(), TrustError> {
    let path = root_path(state_dir);
    let record = PersistedRoot {
        format: ROOT_FILE_FORMAT,
        root: root.envelope().clone(),
        revoked: root.revoked().clone(),
    };
    let mut bytes = serde_json::to_vec_pretty(&record).unwrap_or_default();
    bytes.push(b'\n');
    crate::state::atomic::write_atomic(&path, &bytes, 0o600).map_err(|source| TrustError::Write {
        version: root.version(),
        path,
        source,
    })
}

/// Read the shipped root named by `[trust] root_file`.
pub(crate) fn load_shipped(path: &Path) -> Result<TrustedRoot, TrustError> {
    let bytes = read_bounded(path).map_err(|source| TrustError::Shipped {
        path: path.to_path_buf(),
        source,
    })?;
    TrustedRoot::bootstrap(&bytes, BTreeSet::new()).map_err(|error| TrustError::Root {
        source_name: path.display().to_string(),
        error,
    })
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_ROOT_BYTES as u64 + 1)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// The root this host holds: the newer of the persisted and the shipped one; `None` when
/// it has neither (then `[[trust.keys]]` sign manifests).
pub(crate) fn current(host: &Host) -> Result<Option<CurrentRoot>, TrustError> {
    let persisted = load_persisted(host.state.dir())?;
    let shipped = match &host.config.trust.root_file {
        Some(p) => Some(load_shipped(p)?),
        None => None,
    };
    Ok(match (persisted, shipped) {
        (Some(p), Some(s)) if s.version() > p.version() => Some(CurrentRoot {
            root: s,
            source: RootSource::Shipped,
        }),
        (Some(p), _) => Some(CurrentRoot {
            root: p,
            source: RootSource::Persisted,
        }),
        (None, Some(s)) => Some(CurrentRoot {
            root: s,
            source: RootSource::Shipped,
        }),
        (None, None) => None,
    })
}

/// Where root `version` is published: `<version>.root.json` beside the manifest.
pub(crate) fn root_location(
    manifest: &ManifestSource,
    version: u64,
) -> Result<ManifestSource, AgentError> {
    let relative = format!("{version}.root.json");
    manifest
        .beside(&relative)
        .map_err(|e| AgentError::ImageUrl {
            url: relative.clone(),
            base: manifest.to_string(),
            reason: e,
        })
}

fn is_absent(e: &FetchError) -> bool {
    match e {
        FetchError::HttpStatus { status, .. } => *status == 404,
        FetchError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        FetchError::Bundle(b) => b.is_missing_member(),
        _ => false,
    }
}

/// Walk from the held root to the newest published one (persisting each before fetching the
/// next), then require it to be fresh. Returns the root reached, or `None` for a host
/// without a root.
pub(crate) async fn refresh(
    host: &Host,
    manifest: &ManifestSource,
    client: &reqwest::Client,
    fetch: &FetchConfig,
) -> Result<Option<TrustedRoot>, AgentError> {
    let Some(CurrentRoot { mut root, .. }) = current(host)? else {
        return Ok(None);
    };
    for _ in 0..MAX_ROOT_STEPS {
        let next = root.version() + 1;
        let location = root_location(manifest, next)?;
        let bytes = match fetch_manifest(client, &location, MAX_ROOT_BYTES as u64 + 1, fetch).await
        {
            Ok(b) => b,
            Err(e) if is_absent(&e) => break,
            Err(FetchError::TooLarge { seen, .. }) => {
                return Err(TrustError::Root {
                    source_name: location.to_string(),
                    error: RootError::TooLarge {
                        size: usize::try_from(seen).unwrap_or(usize::MAX),
                        max: MAX_ROOT_BYTES,
                    },
                }
                .into())
            }
            Err(source) => {
                return Err(TrustError::Fetch {
                    version: next,
                    source,
                }
                .into())
            }
        };
        let accepted = root.update(&bytes).map_err(|error| TrustError::Root {
            source_name: location.to_string(),
            error,
        })?;
        persist(host.state.dir(), &accepted)?;
        tracing::info!(
            version = accepted.version(),
            signers = ?accepted.signers(),
            "accepted a new trust root"
        );
        root = accepted;
    }
    check_fresh(&root, host.clock.unix())?;
    Ok(Some(root))
}

fn check_fresh(root: &TrustedRoot, now: i64) -> Result<(), TrustError> {
    root.check_fresh(now).map_err(|error| TrustError::Root {
        source_name: format!("version {}", root.version()),
        error,
    })
}

/// The policy manifests are verified with: the held root's manifest role (which must be
/// fresh), else `[[trust.keys]]` and `[trust] threshold`.
pub(crate) fn manifest_policy(host: &Host) -> Result<TrustPolicy, AgentError> {
    match current(host)? {
        Some(c) => {
            check_fresh(&c.root, host.clock.unix())?;
            Ok(c.root.manifest_policy().clone())
        }
        None => host.config_trust_policy(),
    }
}

/// What `status` shows about trust and transport.
#[derive(Debug, Clone, Serialize)]
pub struct TrustStatus {
    /// The held root's version, expiry (Unix seconds) and source; `None` without a root.
    pub root_version: Option<u64>,
    #[serde(serialize_with = "crate::jsonout::unix_time_opt")]
    pub root_expires_at: Option<i64>,
    pub root_source: Option<RootSource>,
    /// Why the root could not be read, when it could not.
    pub root_error: Option<String>,
    /// Manifest keys in use and their threshold.
    pub manifest_keys: Vec<String>,
    pub manifest_threshold: Option<usize>,
    /// `https`, `http` or `file` (of `[server] manifest_url`), `None` when unset.
    pub transport: Option<String>,
    /// What the transport exposes, in words (empty for https).
    pub transport_exposure: Option<String>,
    /// `[server] ca_file`, when https trusts only that CA.
    pub ca_file: Option<PathBuf>,
}

/// What plain HTTP exposes: said by `status` and in `docs/security.md`.
pub(crate) const HTTP_EXPOSURE: &str = "plain http: anyone on the path sees which manifest and images \
this host fetches and its reports (metadata privacy); integrity is not lost, since manifests, \
roots and images are signed and hashed; a withheld or stale answer (freeze) is bounded by the \
manifest and root expiry, a slow one by the minimum-throughput guard. Use https to close the first.";

/// Reads the trust state; writes nothing.
pub fn status(host: &Host) -> TrustStatus {
    let transport = host.config.server.manifest_url.as_deref().map(|u| {
        u.split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_else(|| "file".into())
    });
    let exposure = match transport.as_deref() {
        Some("http") => Some(HTTP_EXPOSURE.to_string()),
        _ => None,
    };
    let mut s = TrustStatus {
        root_version: None,
        root_expires_at: None,
        root_source: None,
        root_error: None,
        manifest_keys: Vec::new(),
        manifest_threshold: None,
        transport,
        transport_exposure: exposure,
        ca_file: host.config.server.ca_file.clone(),
    };
    let policy = match current(host) {
        Ok(Some(c)) => {
            s.root_version = Some(c.root.version());
            s.root_expires_at = Some(c.root.expires_at());
            s.root_source = Some(c.source);
            if let Err(e) = check_fresh(&c.root, host.clock.unix()) {
                s.root_error = Some(format!("[{}] {e}", e.kind()));
            }
            Some(c.root.manifest_policy().clone())
        }
        Ok(None) => host.settings.trust_policy.clone(),
        Err(e) => {
            s.root_error = Some(format!("[{}] {e}", e.kind()));
            None
        }
    };
    if let Some(p) = policy {
        s.manifest_keys = p.keys().iter().map(|k| k.key_id().to_string()).collect();
        s.manifest_threshold = Some(p.threshold());
    }
    s
}

impl TrustStatus {
    /// The human form (lines for `status`).
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        match (self.root_version, &self.root_error) {
            (Some(v), err) => {
                out += &format!(
                    "trust root: version {v} ({}), expires {}\n",
                    match self.root_source {
                        Some(RootSource::Shipped) => "shipped [trust] root_file",
                        _ => "persisted",
                    },
                    crate::publish::format_time(self.root_expires_at.unwrap_or_default())
                );
                if let Some(e) = err {
                    out += &format!("trust root problem: {e}\n");
                }
            }
            (None, Some(e)) => out += &format!("trust root: unreadable ({e})\n"),
            (None, None) => out += "trust root: none (manifests verified with [[trust.keys]])\n",
        }
        if let Some(t) = self.manifest_threshold {
            out += &format!("manifest keys: {} of {}\n", t, self.manifest_keys.len());
        }
        match (self.transport.as_deref(), &self.ca_file) {
            (Some("https"), Some(ca)) => {
                out += &format!(
                    "transport: https, only the CA in {} trusted\n",
                    ca.display()
                )
            }
            (Some("https"), None) => out += "transport: https (system roots)\n",
            (Some(t), _) => out += &format!("transport: {t}\n"),
            (None, _) => {}
        }
        if let Some(e) = &self.transport_exposure {
            out += &format!("transport exposure: {e}\n");
        }
        out
    }
}
