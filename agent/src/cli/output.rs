//! Presentation: human text on a terminal, one JSON object per line otherwise or with --json.

use std::io::{IsTerminal, Write};

use serde::Serialize;

/// Where command results go and in which form.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
    /// How install progress is shown on stderr: JSON lines with --json, a bar on a
    /// terminal, a few plain lines otherwise.
    pub progress: super::progress::ProgressMode,
}

impl Output {
    pub fn new(json_flag: bool) -> Output {
        Output {
            json: json_flag,
            progress: if json_flag {
                super::progress::ProgressMode::Json
            } else if std::io::stderr().is_terminal() {
                super::progress::ProgressMode::Bar
            } else {
                super::progress::ProgressMode::Plain
            },
        }
    }

    /// Prints `value` as one JSON line, or `human` as text.
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        let mut out = std::io::stdout().lock();
        let line = if self.json {
            crate::jsonout::versioned(value).to_string()
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
            let v = crate::jsonout::error_line(e.kind(), &e.to_string());
            let _ = writeln!(std::io::stdout().lock(), "{v}");
        } else {
            let _ = writeln!(std::io::stderr().lock(), "error [{}]: {e}", e.kind());
        }
    }

    /// Prints a failure that has no [`crate::error::AgentError`] (the demo's own checks) in
    /// the same shape.
    pub fn error_kind(&self, kind: &str, message: &str) {
        if self.json {
            let v = crate::jsonout::error_line(kind, message);
            let _ = writeln!(std::io::stdout().lock(), "{v}");
        } else {
            let _ = writeln!(std::io::stderr().lock(), "error [{kind}]: {message}");
        }
    }
}
