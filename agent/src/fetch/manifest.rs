//! Fetching the signed manifest: small, so it is read whole, but never past a hard bound.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

use super::retry::{classify_send, retry_after, Retry};
use super::{redact, FetchConfig, FetchError, Url};

/// Where a manifest comes from: `http(s)://` URL, `file://` URL or a plain path, or an
/// offline bundle (`--bundle`), whose files are its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestSource {
    Url(Url),
    File(PathBuf),
    /// Member `name` of an opened bundle (`manifest.json` for the manifest itself).
    Bundle {
        bundle: std::sync::Arc<crate::bundle::Bundle>,
        name: String,
    },
}

impl ManifestSource {
    /// The manifest of the bundle at `path` (its member table read and checked here).
    pub(crate) fn bundle(path: &Path) -> Result<Self, FetchError> {
        let bundle = crate::bundle::Bundle::open(path)?;
        Ok(ManifestSource::Bundle {
            bundle: std::sync::Arc::new(bundle),
            name: crate::bundle::MANIFEST_MEMBER.to_string(),
        })
    }

    /// Parse what an operator wrote (`--manifest` or the config's URL).
    pub fn parse(s: &str) -> Result<Self, FetchError> {
        let invalid = |reason: String| FetchError::InvalidUrl {
            url: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("empty".into()));
        }
        if !s.contains("://") {
            return Ok(ManifestSource::File(PathBuf::from(s)));
        }
        let url = Url::parse(s).map_err(|e| invalid(e.to_string()))?;
        match url.scheme() {
            "http" | "https" => Ok(ManifestSource::Url(url)),
            "file" => url
                .to_file_path()
                .map(ManifestSource::File)
                .map_err(|()| invalid("not a local file path".into())),
            other => Err(invalid(format!(
                "unsupported scheme {other:?} (use http, https, file or a path)"
            ))),
        }
    }
}

impl ManifestSource {
    /// What `relative` (an image or root file named in the manifest) names beside this
    /// manifest: joined to the URL, or in the manifest file's directory. Err: why the URL
    /// does not join.
    pub(crate) fn beside(&self, relative: &str) -> Result<ManifestSource, String> {
        match self {
            ManifestSource::Url(url) => url
                .join(relative)
                .map(ManifestSource::Url)
                .map_err(|e| e.to_string()),
            ManifestSource::File(path) => {
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                Ok(ManifestSource::File(dir.join(relative)))
            }
            // Members sit side by side: the manifest's relative names are member names.
            ManifestSource::Bundle { bundle, .. } => Ok(ManifestSource::Bundle {
                bundle: bundle.clone(),
                name: relative.to_string(),
            }),
        }
    }
}

impl std::fmt::Display for ManifestSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestSource::Url(u) => f.write_str(&redact(u)),
            ManifestSource::File(p) => write!(f, "{}", p.display()),
            ManifestSource::Bundle { bundle, name } => {
                write!(f, "{}:{name}", bundle.path.display())
            }
        }
    }
}

/// Read a manifest, failing with `too_large` as soon as it is known to exceed `max_bytes`
/// (announced Content-Length, file size, or bytes streamed) without reading the rest.
/// HTTP failures are retried as configured (5xx, 408, 429, connection errors, timeouts).
#[tracing::instrument(name = "fetch_manifest", skip_all, fields(source = %source, max_bytes))]
pub async fn fetch_manifest(
    client: &reqwest::Client,
    source: &ManifestSource,
    max_bytes: u64,
    cfg: &FetchConfig,
) -> Result<Vec<u8>, FetchError> {
    match source {
        ManifestSource::File(p) => read_file(p, max_bytes).await,
        ManifestSource::Bundle { bundle, name } => {
            let (bundle, name) = (bundle.clone(), name.clone());
            tokio::task::spawn_blocking(move || bundle.read_member(&name, max_bytes))
                .await
                .map_err(|e| FetchError::Io {
                    path: source.to_string().into(),
                    source: std::io::Error::other(e.to_string()),
                })?
                .map_err(FetchError::from)
        }
        ManifestSource::Url(u) => {
            let mut retry = Retry::new(cfg);
            retry.start();
            loop {
                match fetch_once(client, u, max_bytes, cfg, &retry).await {
                    Ok(body) => return Ok(body),
                    Err((e, hint)) => retry.after_failure(u, e, hint).await?,
                }
            }
        }
    }
}

async fn read_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
    let io = |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(io)?;
    let len = file.metadata().await.map_err(io)?.len();
    let too_large = |seen| FetchError::TooLarge {
        what: format!("manifest {}", path.display()),
        limit: max_bytes,
        seen,
    };
    if len > max_bytes {
        return Err(too_large(len));
    }
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // One byte past the bound tells a file that grew since the stat.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut buf)
        .await
        .map_err(io)?;
    if buf.len() as u64 > max_bytes {
        return Err(too_large(buf.len() as u64));
    }
    Ok(buf)
}

async fn fetch_once(
    client: &reqwest::Client,
    url: &Url,
    max_bytes: u64,
    cfg: &FetchConfig,
    retry: &Retry,
) -> Result<Vec<u8>, (FetchError, Option<std::time::Duration>)> {
    let shown = redact(url);
    let too_large = |seen| FetchError::TooLarge {
        what: format!("manifest {shown}"),
        limit: max_bytes,
        seen,
    };
    let wait = retry
        .wait_budget(url, cfg.connect_timeout + cfg.read_timeout)
        .map_err(|e| (e, None))?;
    let resp = match tokio::time::timeout(wait, client.get(url.clone()).send()).await {
        Err(_) => {
            return Err((
                FetchError::Timeout {
                    url: shown.clone(),
                    what: "the response headers",
                    after: wait,
                },
                None,
            ))
        }
        Ok(Err(e)) => return Err((classify_send(url, e, cfg.read_timeout), None)),
        Ok(Ok(r)) => r,
    };
    let status = resp.status().as_u16();
    if status != 200 {
        let hint = retry_after(&resp);
        return Err((
            FetchError::HttpStatus {
                url: shown.clone(),
                status,
            },
            hint,
        ));
    }
    if let Some(len) = resp.content_length() {
        if len > max_bytes {
            return Err((too_large(len), None));
        }
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    loop {
        let wait = retry
            .wait_budget(url, cfg.read_timeout)
            .map_err(|e| (e, None))?;
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => {
                return Err((
                    FetchError::Timeout {
                        url: shown.clone(),
                        what: "the next body chunk",
                        after: wait,
                    },
                    None,
                ))
            }
            Ok(None) => return Ok(body),
            Ok(Some(Err(e))) => {
                return Err((
                    FetchError::Transport {
                        url: shown.clone(),
                        source: e,
                    },
                    None,
                ))
            }
            Ok(Some(Ok(chunk))) => {
                let seen = (body.len() + chunk.len()) as u64;
                if seen > max_bytes {
                    return Err((too_large(seen), None));
                }
                body.extend_from_slice(&chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            ManifestSource::parse("/etc/m.json").unwrap(),
            ManifestSource::File("/etc/m.json".into())
        );
        assert_eq!(
            ManifestSource::parse("file:///etc/m.json").unwrap(),
            ManifestSource::File("/etc/m.json".into())
        );
        assert!(matches!(
            ManifestSource::parse("https://h/m.json").unwrap(),
            ManifestSource::Url(_)
        ));
        assert_eq!(
            ManifestSource::parse("ftp://h/m").unwrap_err().kind(),
            "invalid_url"
        );
        assert_eq!(ManifestSource::parse("").unwrap_err().kind(), "invalid_url");
    }

    #[tokio::test]
    async fn file_over_the_bound_is_too_large() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        std::fs::write(&p, vec![b'x'; 100]).unwrap();
        let err = read_file(&p, 99).await.unwrap_err();
        assert_eq!(err.kind(), "too_large");
        assert_eq!(read_file(&p, 100).await.unwrap().len(), 100);
        let err = read_file(&dir.path().join("none"), 10).await.unwrap_err();
        assert_eq!(err.kind(), "io");
    }
}
