//! Fault injection: rules that tests arm (in-process or over `/_admin/faults`) to make the
//! server misbehave on chosen paths, for the next N requests or always.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// One way of misbehaving. In JSON a fault is a one-key object, e.g. `{"status": 503}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this status (e.g. 500, 503) and a short text body instead of the file.
    Status(u16),
    /// Wait this many milliseconds before sending the response headers.
    LatencyMs(u64),
    /// Send this many body bytes, then abort the connection mid-body (the body errors out).
    DropAfter(u64),
    /// Announce the full length, send this many body bytes, then end the body early; hyper
    /// then closes the connection because the message is incomplete.
    TruncateAfter(u64),
    /// Send headers and this many body bytes, then nothing: the connection stays open.
    StallAfter(u64),
    /// Send the body at most this many bytes per second.
    Bandwidth(u64),
    /// Flip every bit of the byte at this file offset (when the response covers it).
    CorruptAt(u64),
    /// Serve this many extra bytes after the file, with a Content-Length that counts them:
    /// the repository "has" a longer file than the manifest declares.
    Append(u64),
    /// Announce the true Content-Length but send this many extra bytes after the body
    /// (raw response, the connection is closed after it).
    LyingLength(u64),
    /// Ignore `Range`: answer 200 with the whole file, like a server without range support.
    IgnoreRange,
}

impl Fault {
    /// Short name used in the request log.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Status(_) => "status",
            Fault::LatencyMs(_) => "latency_ms",
            Fault::DropAfter(_) => "drop_after",
            Fault::TruncateAfter(_) => "truncate_after",
            Fault::StallAfter(_) => "stall_after",
            Fault::Bandwidth(_) => "bandwidth",
            Fault::CorruptAt(_) => "corrupt_at",
            Fault::Append(_) => "append",
            Fault::LyingLength(_) => "lying_length",
            Fault::IgnoreRange => "ignore_range",
        }
    }

    /// Faults hyper cannot produce at all: only the raw-TCP response path applies them.
    pub(crate) fn is_raw(&self) -> bool {
        matches!(self, Fault::LyingLength(_))
    }

    /// Faults the raw-TCP path produces exactly (bytes written, then RST or FIN); on a
    /// kept-alive hyper connection they are approximated.
    pub(crate) fn prefers_raw(&self) -> bool {
        matches!(
            self,
            Fault::LyingLength(_) | Fault::DropAfter(_) | Fault::TruncateAfter(_)
        )
    }
}

/// A fault armed for the paths matching `path` (exact, or a glob with `*` and `?`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    /// Request path to match, e.g. `/images/os.img.zst` or `/images/*`.
    pub path: String,
    /// Number of matching requests to affect; `None` means every request until cleared.
    #[serde(default)]
    pub times: Option<u32>,
    /// What to do to them.
    pub fault: Fault,
}

impl FaultRule {
    /// A rule that applies to every request on `path` until cleared.
    pub fn new(path: impl Into<String>, fault: Fault) -> Self {
        Self {
            path: path.into(),
            times: None,
            fault,
        }
    }

    /// Limit the rule to the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }
}

/// The set of armed rules, shared by the server and its handle.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    rules: Arc<Mutex<Vec<FaultRule>>>,
}

impl Faults {
    fn lock(&self) -> MutexGuard<'_, Vec<FaultRule>> {
        // A poisoned lock only means a test panicked while holding it; the rules stay usable.
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arm a rule (rules are applied in the order they were added).
    pub fn add(&self, rule: FaultRule) {
        self.lock().push(rule);
    }

    /// Disarm every rule.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The rules currently armed.
    pub fn list(&self) -> Vec<FaultRule> {
        self.lock().clone()
    }

    /// Whether any armed rule matching `path` wants the raw response path. Does not consume.
    pub(crate) fn has_raw_for(&self, path: &str) -> bool {
        self.lock()
            .iter()
            .any(|r| r.fault.prefers_raw() && glob_match(&r.path, path))
    }

    /// Whether any raw fault is armed at all (responses then close their connection, so
    /// that the next request starts a connection and can be answered raw).
    pub(crate) fn any_raw(&self) -> bool {
        self.lock().iter().any(|r| r.fault.prefers_raw())
    }

    /// Take the faults that apply to one request on `path`, counting it against each rule's
    /// `times`; rules that are used up are removed. Raw-only faults are left alone (neither
    /// applied nor counted) unless `with_raw`.
    pub fn take_for(&self, path: &str, with_raw: bool) -> Vec<Fault> {
        let mut rules = self.lock();
        let mut out = Vec::new();
        rules.retain_mut(|r| {
            if r.times == Some(0) {
                return false;
            }
            if !glob_match(&r.path, path) || (r.fault.is_raw() && !with_raw) {
                return true;
            }
            out.push(r.fault);
            match r.times.as_mut() {
                None => true,
                Some(n) => {
                    *n = n.saturating_sub(1);
                    *n > 0
                }
            }
        });
        out
    }
}

/// The body-shaping part of a set of faults, resolved once per request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BodyPlan {
    pub drop_after: Option<u64>,
    pub truncate_after: Option<u64>,
    pub stall_after: Option<u64>,
    pub bandwidth: Option<u64>,
    pub corrupt_at: Option<u64>,
    pub append: u64,
    pub lying_extra: u64,
}

impl BodyPlan {
    pub(crate) fn from_faults(faults: &[Fault]) -> Self {
        let mut p = BodyPlan::default();
        for f in faults {
            match *f {
                Fault::DropAfter(n) => p.drop_after = Some(n),
                Fault::TruncateAfter(n) => p.truncate_after = Some(n),
                Fault::StallAfter(n) => p.stall_after = Some(n),
                Fault::Bandwidth(n) => p.bandwidth = Some(n.max(1)),
                Fault::CorruptAt(n) => p.corrupt_at = Some(n),
                Fault::Append(n) => p.append = n,
                Fault::LyingLength(n) => p.lying_extra = n,
                Fault::Status(_) | Fault::LatencyMs(_) | Fault::IgnoreRange => {}
            }
        }
        p
    }
}

/// Glob match over the whole path: `*` matches any run of characters (including `/`),
/// `?` matches one character; anything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("/a/b", "/a/b"));
        assert!(!glob_match("/a/b", "/a/bc"));
        assert!(glob_match("/a/*", "/a/b/c"));
        assert!(glob_match("*.zst", "/x/y.zst"));
        assert!(glob_match("/a/?", "/a/b"));
        assert!(!glob_match("/a/?", "/a/"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn times_are_consumed() {
        let f = Faults::default();
        f.add(FaultRule::new("/x", Fault::Status(503)).times(2));
        f.add(FaultRule::new("/*", Fault::LatencyMs(1)));
        assert_eq!(f.take_for("/y", true), vec![Fault::LatencyMs(1)]);
        assert_eq!(
            f.take_for("/x", true),
            vec![Fault::Status(503), Fault::LatencyMs(1)]
        );
        assert_eq!(f.take_for("/x", true).len(), 2);
        assert_eq!(f.take_for("/x", true), vec![Fault::LatencyMs(1)]);
    }

    #[test]
    fn json_shape() {
        let r: FaultRule =
            serde_json::from_str(r#"{"path":"/i/*","times":1,"fault":{"drop_after":100}}"#)
                .unwrap();
        assert_eq!(r, FaultRule::new("/i/*", Fault::DropAfter(100)).times(1));
        let r: FaultRule = serde_json::from_str(r#"{"path":"/i","fault":"ignore_range"}"#).unwrap();
        assert_eq!(r.fault, Fault::IgnoreRange);
    }
}
