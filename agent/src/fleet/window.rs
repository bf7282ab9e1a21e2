//! Maintenance windows: weekly, in a named time zone, with DST handled by jiff's tz database.
//!
//! A window opens at local `start` on each listed weekday and lasts `length` of elapsed time.
//! A start inside a DST gap (02:30 on a spring-forward night) opens at the first valid
//! instant after the gap; a start inside a repeated hour opens at its first occurrence
//! (RFC 5545's and Temporal's "compatible" rule). Windows may cross midnight and the end of
//! the week (Sun 23:00 for 3 h is open on Monday at 01:00).

use std::time::Duration;

use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use super::FleetError;
use crate::config::WindowConfig;

/// One parsed window.
#[derive(Debug, Clone)]
pub struct Window {
    /// Indexed Monday = 0 .. Sunday = 6.
    days: [bool; 7],
    hour: i8,
    minute: i8,
    length: SignedDuration,
    tz: TimeZone,
}

/// Whether any window is open at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    /// Open now, until this instant (the latest end among the open windows).
    Open { closes: Timestamp },
    /// Closed; the next window opens at this instant.
    Closed { opens: Timestamp },
}

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

fn day_index(w: Weekday) -> usize {
    (w.to_monday_zero_offset()) as usize
}

impl Window {
    /// Parse `[[reboot.windows]]` entry `index`.
    pub fn from_config(index: usize, c: &WindowConfig) -> Result<Window, FleetError> {
        let err = |message: String| FleetError::Window { index, message };
        let mut days = [false; 7];
        for d in &c.days {
            let i = DAY_NAMES
                .iter()
                .position(|n| n == d)
                .ok_or_else(|| err(format!("day {d:?} is not one of {}", DAY_NAMES.join(", "))))?;
            days[i] = true;
        }
        if !days.iter().any(|d| *d) {
            return Err(err("no days".into()));
        }
        let minutes = c.start_minutes().map_err(err)?;
        let length =
            SignedDuration::try_from(c.length.get()).map_err(|e| err(format!("length: {e}")))?;
        if length <= SignedDuration::ZERO || length > SignedDuration::from_hours(7 * 24) {
            return Err(err("length must be more than 0 and at most 7 days".into()));
        }
        let tz = TimeZone::get(&c.time_zone)
            .map_err(|e| err(format!("time zone {:?}: {e}", c.time_zone)))?;
        Ok(Window {
            days,
            hour: (minutes / 60) as i8,
            minute: (minutes % 60) as i8,
            length,
            tz,
        })
    }

    /// Every `[[reboot.windows]]` of the configuration.
    pub(crate) fn all(configs: &[WindowConfig]) -> Result<Vec<Window>, FleetError> {
        configs
            .iter()
            .enumerate()
            .map(|(i, c)| Window::from_config(i, c))
            .collect()
    }

    /// Opening instants of this window whose local date is within `days_around` of `date`.
    fn openings(&self, around: Date, days_around: i64) -> Vec<(Timestamp, Timestamp)> {
        let mut out = Vec::new();
        for offset in -days_around..=days_around {
            let Ok(date) = around.checked_add(jiff::Span::new().days(offset)) else {
                continue;
            };
            if !self.days[day_index(date.weekday())] {
                continue;
            }
            let local = date.at(self.hour, self.minute, 0, 0);
            // "compatible": a gap resolves forward, a fold to its first occurrence.
            let Ok(start) = self.tz.to_timestamp(local) else {
                continue;
            };
            if let Ok(end) = start.checked_add(self.length) {
                out.push((start, end));
            }
        }
        out
    }
}

/// Whether a window is open at `now`, and until / from when. `None` with no windows.
pub fn state_at(windows: &[Window], now: Timestamp) -> Option<WindowState> {
    let mut closes: Option<Timestamp> = None;
    let mut opens: Option<Timestamp> = None;
    for w in windows {
        let today = w.tz.to_datetime(now).date();
        // Windows last at most 7 days, so one that could still be open started within 8
        // local days before today; the next opening is within 8 days after.
        for (start, end) in w.openings(today, 8) {
            if start <= now && now < end {
                closes = Some(closes.map_or(end, |c| c.max(end)));
            } else if start > now {
                opens = Some(opens.map_or(start, |o| o.min(start)));
            }
        }
    }
    match (closes, opens) {
        (Some(closes), _) => Some(WindowState::Open { closes }),
        (None, Some(opens)) => Some(WindowState::Closed { opens }),
        (None, None) => None,
    }
}

/// How long until `at` from `now`, zero if it has passed.
pub fn until(now: Timestamp, at: Timestamp) -> Duration {
    let d = at.duration_since(now);
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}
