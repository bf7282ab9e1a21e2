//! Retry bookkeeping shared by manifest and image fetches: which failures are retried,
//! exponential backoff with jitter, the overall deadline.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

use super::{redact, FetchConfig, FetchError, Url};

/// Whether an HTTP status is worth retrying: 5xx, 408 Request Timeout, 429 Too Many Requests.
pub(crate) fn retryable_status(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// Whether a failure may go away on another attempt.
pub(crate) fn retryable(err: &FetchError) -> bool {
    match err {
        FetchError::Connect { .. }
        | FetchError::Timeout { .. }
        | FetchError::Transport { .. }
        | FetchError::Truncated { .. } => true,
        FetchError::HttpStatus { status, .. } => retryable_status(*status),
        _ => false,
    }
}

/// `Retry-After: <seconds>` (the HTTP-date form is ignored: backoff applies instead).
pub(crate) fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The innermost cause of `e` (e.g. `Connection refused (os error 111)` under reqwest's
/// `error sending request`), which is what an operator needs to act on.
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Turn a failed `send()` into a `FetchError`.
pub(crate) fn classify_send(url: &Url, e: reqwest::Error, read_timeout: Duration) -> FetchError {
    let url = redact(url);
    if let Some(detail) = super::client::tls_cause(&e) {
        // Not retried: a certificate does not become trusted by asking again.
        FetchError::Tls { url, detail }
    } else if e.is_connect() {
        FetchError::Connect { url, source: e }
    } else if e.is_timeout() {
        FetchError::Timeout {
            url,
            what: "the response",
            after: read_timeout,
        }
    } else {
        FetchError::Transport { url, source: e }
    }
}

/// Attempts and deadline of one fetch.
#[derive(Debug)]
pub(crate) struct Retry {
    cfg: FetchConfig,
    /// Failed attempts since the last progress.
    failures: u32,
    /// Every failed attempt, for stats.
    pub(crate) total_failures: u32,
    /// Total time slept in backoff.
    pub(crate) slept: Duration,
    deadline: Option<Instant>,
    rng: SystemRandom,
}

impl Retry {
    pub(crate) fn new(cfg: &FetchConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            failures: 0,
            total_failures: 0,
            slept: Duration::ZERO,
            deadline: None,
            rng: SystemRandom::new(),
        }
    }

    /// Start the overall clock (idempotent).
    pub(crate) fn start(&mut self) {
        if self.deadline.is_none() {
            self.deadline = self.cfg.overall_timeout.map(|d| Instant::now() + d);
        }
    }

    /// Progress was made: the next failure starts the count again.
    pub(crate) fn progressed(&mut self) {
        self.failures = 0;
    }

    /// Time left before the overall deadline (`None` when there is none).
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The read timeout, shortened to the overall deadline; `Err` when it has passed.
    pub(crate) fn wait_budget(&self, url: &Url, base: Duration) -> Result<Duration, FetchError> {
        match self.remaining() {
            None => Ok(base),
            Some(left) if left.is_zero() => Err(self.overall_timeout(url)),
            Some(left) => Ok(base.min(left)),
        }
    }

    /// Whether the overall deadline has passed.
    pub(crate) fn expired(&self) -> bool {
        self.remaining().is_some_and(|d| d.is_zero())
    }

    pub(crate) fn overall_timeout(&self, url: &Url) -> FetchError {
        FetchError::Timeout {
            url: redact(url),
            what: "the whole transfer (overall deadline)",
            after: self.cfg.overall_timeout.unwrap_or_default(),
        }
    }

    /// After a failed attempt: `Err(err)` when it is not retryable or attempts are used up;
    /// otherwise wait the backoff delay (at least `hint`, e.g. Retry-After) and return Ok.
    pub(crate) async fn after_failure(
        &mut self,
        url: &Url,
        err: FetchError,
        hint: Option<Duration>,
    ) -> Result<(), FetchError> {
        self.total_failures += 1;
        if !retryable(&err) {
            return Err(err);
        }
        self.failures += 1;
        if self.failures >= self.cfg.max_attempts {
            tracing::warn!(url = %redact(url), attempts = self.failures, error = %err, "giving up");
            return Err(err);
        }
        let mut delay = self.backoff(self.failures);
        if let Some(h) = hint {
            delay = delay.max(h.min(self.cfg.backoff_cap));
        }
        if let Some(left) = self.remaining() {
            if delay >= left {
                tracing::warn!(url = %redact(url), error = %err, "no time left for another attempt");
                return Err(err);
            }
        }
        // Visible at the default level: an operator waiting on `check` sees why it waits.
        tracing::warn!(
            url = %redact(url),
            attempt = self.failures + 1,
            max_attempts = self.cfg.max_attempts,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            error = %err,
            kind = err.kind(),
            "retrying"
        );
        tokio::time::sleep(delay).await;
        self.slept += delay;
        Ok(())
    }

    /// Exponential backoff with "equal jitter": a random delay in [d/2, d] where
    /// d = min(cap, base * 2^(n-1)), so retries of many hosts do not line up.
    fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .cfg
            .backoff_base
            .saturating_mul(1u32 << n.saturating_sub(1).min(20));
        let d = exp.min(self.cfg.backoff_cap);
        let mut b = [0u8; 4];
        let frac = match self.rng.fill(&mut b) {
            Ok(()) => f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX),
            Err(_) => 1.0,
        };
        d.mul_f64(0.5 + 0.5 * frac)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let cfg = FetchConfig {
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_millis(1000),
            ..FetchConfig::default()
        };
        let r = Retry::new(&cfg);
        for _ in 0..50 {
            let d1 = r.backoff(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = r.backoff(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d30 = r.backoff(30);
            assert!(d30 >= Duration::from_millis(500) && d30 <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn statuses() {
        for s in [500, 502, 503, 504, 408, 429] {
            assert!(retryable_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 416] {
            assert!(!retryable_status(s), "{s}");
        }
    }
}
