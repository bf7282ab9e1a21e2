//! Presentation: human text on a terminal, one JSON object per line otherwise or with --json.

use std::io::{IsTerminal, Write};

use serde::Serialize;

/// Where command results go and in which form.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
    /// Progress as JSON lines on stderr (with --json, or when stderr is not a terminal).
    pub progress_json: bool,
}

impl Output {
    pub fn new(json_flag: bool) -> Output {
        Output {
            json: json_flag,
            progress_json: json_flag || !std::io::stderr().is_terminal(),
        }
    }

    /// Prints `value` as one JSON line, or `human` as text.
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        let mut out = std::io::stdout().lock();
        let line = if self.json {
            serde_json::to_string(value).unwrap_or_else(|e| {
                format!(r#"{{"error":{{"kind":"serialize","message":"{e}"}}}}"#)
            })
        } else {
            human()
        };
        // A closed stdout (e.g. `| head`) is not worth a panic.
        let _ = writeln!(out, "{line}");
    }
}

impl Output {
    /// Prints a failure: its message, and its stable kind for scripts.
    pub fn error(&self, e: &crate::error::AgentError) {
        if self.json {
            let v = serde_json::json!({"error": {"kind": e.kind(), "message": e.to_string()}});
            let _ = writeln!(std::io::stdout().lock(), "{v}");
        } else {
            let _ = writeln!(std::io::stderr().lock(), "error [{}]: {e}", e.kind());
        }
    }
}
