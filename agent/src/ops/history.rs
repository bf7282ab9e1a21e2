//! `update-agent history`: installs, stages, commits, rollbacks and failures with their times
//! and reasons, oldest first, and the denylist.

use serde::Serialize;

use crate::error::AgentError;
use crate::host::Host;
use crate::state::{DenyEntry, HistoryEntry};

#[derive(Debug, Clone, Serialize)]
pub struct HistoryReport {
    pub entries: Vec<HistoryEntry>,
    pub denylist: Vec<DenyEntry>,
}

/// Reads the state record; writes nothing. `limit` keeps the newest entries.
pub fn history(host: &Host, limit: Option<usize>) -> Result<HistoryReport, AgentError> {
    let state = host.state.load()?;
    let mut entries = state.history;
    if let Some(n) = limit {
        let drop = entries.len().saturating_sub(n);
        entries.drain(..drop);
    }
    Ok(HistoryReport {
        entries,
        denylist: state.denylist,
    })
}

fn ts(t: crate::clock::Timestamp) -> String {
    t.to_string()
}

impl HistoryReport {
    pub fn render(&self) -> String {
        if self.entries.is_empty() {
            return "no history yet".into();
        }
        let mut out = String::new();
        for e in &self.entries {
            let event = serde_json::to_value(e.event)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            out += &format!("{}  {event:<15}", ts(e.at));
            if let Some(v) = &e.version {
                out += &format!(" {v}");
            }
            if let Some(s) = e.slot {
                out += &format!(" slot {s}");
            }
            if let Some(k) = &e.error_kind {
                out += &format!(" [{k}]");
            }
            if let Some(r) = &e.reason {
                out += &format!(": {r}");
            }
            if let Some(t) = &e.transfer {
                out += &format!(" ({} KiB fetched", t.bytes_fetched >> 10);
                if t.requests > 0 {
                    out += &format!(
                        ", {} KiB reused, {} request(s)",
                        t.bytes_reused >> 10,
                        t.requests
                    );
                }
                if let Some(f) = &t.fallback {
                    out += &format!(", fell back to the full image: {f}");
                }
                out += ")";
            }
            out += "\n";
            if let Some(h) = e.hook.as_ref().filter(|h| !h.output_tail.is_empty()) {
                for line in h.output_tail.lines() {
                    out += &format!("    | {line}\n");
                }
            }
        }
        if !self.denylist.is_empty() {
            out += "denylisted:\n";
            for d in &self.denylist {
                out += &format!("  {} (since {}): {}\n", d.version, ts(d.at), d.reason);
            }
        }
        out.trim_end().to_string()
    }
}
