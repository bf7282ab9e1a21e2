//! The install pipeline's checkpoints, kept in `<state dir>/resume.json` (atomic writes, 0600)
//! so that an agent restarted mid-download continues where the disk says it was.
//!
//! Kept apart from the state record: checkpoints change every few tens of MiB, the record
//! only at phase changes, and a lost or unreadable checkpoint file only costs a re-download.

use std::path::PathBuf;

use crate::install::{ResumeRecord, ResumeSink};
use crate::state::atomic::write_atomic;
use crate::state::StateStore;

pub const RESUME_FILE: &str = "resume.json";

/// Checkpoints of the install in progress.
#[derive(Debug)]
pub struct ResumeFile {
    path: PathBuf,
    records: Vec<ResumeRecord>,
}

impl ResumeFile {
    /// Loads the checkpoints; a missing or unreadable file means "nothing to resume".
    pub fn load(store: &StateStore) -> ResumeFile {
        let path = store.dir().join(RESUME_FILE);
        let records = std::fs::read(&path)
            .ok()
            .and_then(|b| match serde_json::from_slice(&b) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "ignoring unreadable resume checkpoints; the download starts over");
                    None
                }
            })
            .unwrap_or_default();
        ResumeFile { path, records }
    }

    pub fn records(&self) -> &[ResumeRecord] {
        &self.records
    }

    /// Forget every checkpoint (after staging, or when a different release is installed).
    pub(crate) fn clear(&mut self) -> std::io::Result<()> {
        self.records.clear();
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl ResumeSink for ResumeFile {
    fn record(
        &mut self,
        rec: &ResumeRecord,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.records
            .retain(|r| !(r.slot == rec.slot && r.role == rec.role));
        self.records.push(rec.clone());
        let bytes = serde_json::to_vec_pretty(&self.records)?;
        write_atomic(&self.path, &bytes, 0o600)?;
        Ok(())
    }
}
