//! The time, behind a small trait: every decision the agent takes by the clock (manifest and
//! root expiry, waves, maintenance windows, history and journal stamps) asks a [`Clock`], so
//! a test can run them at a chosen instant. The host holds one (`Host::clock`).
//!
//! The agent's one date-time crate is jiff (time zones for the maintenance windows; RFC 3339
//! for every stamp it writes or prints): [`Timestamp`] serializes as RFC 3339 in UTC.

use std::fmt::Debug;

pub use jiff::Timestamp;

/// The current time.
pub trait Clock: Debug + Send + Sync {
    /// Now.
    fn now(&self) -> Timestamp;

    /// Now, in Unix seconds.
    fn unix(&self) -> i64 {
        self.now().as_second()
    }
}

/// The system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Unix seconds as RFC 3339 in UTC (`None` outside jiff's range of years -9999..=9999).
pub(crate) fn rfc3339(unix: i64) -> Option<String> {
    Timestamp::from_second(unix).ok().map(|t| t.to_string())
}

/// [`rfc3339`] for humans: the number itself when it is out of range.
pub(crate) fn rfc3339_or_number(unix: i64) -> String {
    rfc3339(unix).unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A clock stopped at one instant (a test's; the sandbox has its own).
    #[derive(Debug)]
    struct Stopped(Timestamp);

    impl Clock for Stopped {
        fn now(&self) -> Timestamp {
            self.0
        }
    }

    #[test]
    fn unix_follows_now_and_the_system_clock_is_the_real_time() {
        let at = Timestamp::from_second(1_800_000_000).unwrap();
        assert_eq!(Stopped(at).unix(), 1_800_000_000);
        let before = Timestamp::now();
        let now = SystemClock.now();
        assert!(now >= before && now <= Timestamp::now());
    }

    /// Records written before jiff (by the `time` crate's RFC 3339) read back unchanged.
    #[test]
    fn stamps_written_by_earlier_agents_read_back() {
        for text in ["2026-12-02T06:16:11Z", "2026-12-02T06:16:11.836428Z"] {
            let t: Timestamp = serde_json::from_str(&format!("{text:?}")).unwrap();
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("{text:?}"));
        }
        let offset: Timestamp = "2026-12-02T07:16:11+01:00".parse().unwrap();
        assert_eq!(offset.as_second(), 1_796_192_171);
    }

    #[test]
    fn stamps_are_rfc3339_in_utc() {
        assert_eq!(
            rfc3339(1_800_000_000).as_deref(),
            Some("2027-01-15T08:00:00Z")
        );
        assert_eq!(rfc3339(i64::MAX), None);
        assert_eq!(rfc3339_or_number(i64::MAX), i64::MAX.to_string());
    }
}
