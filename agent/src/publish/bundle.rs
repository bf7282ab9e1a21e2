//! `update-publish bundle`: pack a signed manifest and every file it names (plus the trust
//! roots beside it) into one offline bundle (`crate::bundle`, docs/bundles.md).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use updater_proto::{Envelope, Manifest};

use super::{io_err, PublishError};
use crate::bundle::MANIFEST_MEMBER;

/// What went into a bundle.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BundleSummary {
    pub out: PathBuf,
    pub version: String,
    pub serial: u64,
    pub channel: String,
    /// The manifest's own expiry, which is the bundle's: sign the bundle's manifest with a
    /// validity that fits how long it will sit on a shelf (`manifest --expires-in 180d`).
    pub expires_at: i64,
    /// Members in order (manifest.json first).
    pub members: Vec<String>,
    pub bytes: u64,
}

fn bad(path: &Path, detail: impl Into<String>) -> PublishError {
    PublishError::BadBundleInput {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Read the manifest without trusting it: the agent verifies it, this only needs the names
/// of the files it refers to.
fn read_manifest(path: &Path) -> Result<(Vec<u8>, Manifest), PublishError> {
    let bytes = super::fsutil::read_bounded(path, updater_proto::MAX_ENVELOPE_BYTES)?;
    let env: Envelope =
        serde_json::from_slice(&bytes).map_err(|e| bad(path, format!("not an envelope: {e}")))?;
    let payload = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &env.payload)
        .map_err(|e| bad(path, format!("payload: {e}")))?;
    let m: Manifest =
        serde_json::from_slice(&payload).map_err(|e| bad(path, format!("payload: {e}")))?;
    Ok((bytes, m))
}

fn header(size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

/// Write the bundle for the signed manifest at `manifest` to `out`: `manifest.json`, then
/// each image under the name the manifest gives it (from the manifest's directory), then
/// every `N.root.json` found there (1, 2, ... up to the first gap). Written to a temporary
/// file beside `out`, synced, then renamed.
pub fn write_bundle(manifest: &Path, out: &Path) -> Result<BundleSummary, PublishError> {
    let (bytes, m) = read_manifest(manifest)?;
    let dir = manifest.parent().unwrap_or(Path::new("."));
    let mut members: Vec<(String, PathBuf)> = Vec::new();
    for image in &m.images {
        members.push((image.url.clone(), dir.join(&image.url)));
    }
    for n in 1.. {
        let name = format!("{n}.root.json");
        let p = dir.join(&name);
        if !p.is_file() {
            break;
        }
        members.push((name, p));
    }
    let mtime = u64::try_from(m.issued_at).unwrap_or(0);
    let out_dir = out.parent().filter(|d| !d.as_os_str().is_empty());
    let tmp = out.with_file_name(format!(
        ".{}.tmp.{}",
        out.file_name()
            .ok_or_else(|| bad(out, "no file name"))?
            .to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
        tar.mode(tar::HeaderMode::Deterministic);
        let mut h = header(bytes.len() as u64, mtime);
        tar.append_data(&mut h, MANIFEST_MEMBER, bytes.as_slice())
            .map_err(io_err("write", &tmp))?;
        let mut names = vec![MANIFEST_MEMBER.to_string()];
        for (name, path) in &members {
            let f = File::open(path)
                .map_err(|e| bad(path, format!("named by the manifest as {name:?}: {e}")))?;
            let size = f.metadata().map_err(io_err("stat", path))?.len();
            let mut h = header(size, mtime);
            tar.append_data(&mut h, name, f)
                .map_err(io_err("write", &tmp))?;
            names.push(name.clone());
        }
        let w = tar.into_inner().map_err(io_err("write", &tmp))?;
        let file = w.into_inner().map_err(|e| PublishError::Io {
            op: "write",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        let len = file.metadata().map_err(io_err("stat", &tmp))?.len();
        Ok::<_, PublishError>((names, len))
    })();
    let (names, len) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).map_err(io_err("rename", out))?;
    if let Some(d) = out_dir {
        File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync", d))?;
    }
    Ok(BundleSummary {
        out: out.to_path_buf(),
        version: m.version.to_string(),
        serial: m.serial,
        channel: m.channel.clone(),
        expires_at: m.expires_at,
        members: names,
        bytes: len,
    })
}
