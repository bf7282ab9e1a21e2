//! The request log: one entry per request, readable by tests in-process or via `/_admin/log`.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// What the server saw and did for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub method: String,
    pub path: String,
    /// The `Range` header as received.
    pub range: Option<String>,
    /// The `If-Range` header as received.
    pub if_range: Option<String>,
    pub status: u16,
    /// Body bytes handed to the connection so far (file bytes plus any injected extra).
    pub bytes_sent: u64,
    /// Whether the whole announced body was produced (false for dropped, stalled, truncated
    /// or client-abandoned bodies).
    pub complete: bool,
    /// Names of the faults applied to this request.
    pub faults: Vec<String>,
}

/// Index of an entry, so a body stream can keep counting bytes after the handler returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHandle(usize);

/// Shared, append-only (until cleared) request log.
#[derive(Debug, Clone, Default)]
pub struct RequestLog {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Entries dropped by `clear` so far: handles from before a clear then update nothing.
    base: usize,
    entries: Vec<LogEntry>,
}

impl RequestLog {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn push(&self, entry: LogEntry) -> EntryHandle {
        let mut g = self.lock();
        g.entries.push(entry);
        EntryHandle(g.base + g.entries.len() - 1)
    }

    pub(crate) fn update(&self, h: EntryHandle, f: impl FnOnce(&mut LogEntry)) {
        let mut g = self.lock();
        if let Some(i) = h.0.checked_sub(g.base) {
            if let Some(e) = g.entries.get_mut(i) {
                f(e);
            }
        }
    }

    /// A copy of every entry, oldest first.
    pub fn entries(&self) -> Vec<LogEntry> {
        self.lock().entries.clone()
    }

    /// Forget every entry.
    pub fn clear(&self) {
        let mut g = self.lock();
        g.base += g.entries.len();
        g.entries.clear();
    }
}
