//! Maintenance-window arithmetic: week wrap-around, DST changes (gap and fold, Europe and
//! America), several windows, and configuration errors that name the window.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use jiff::Timestamp;
use update_agent::config::{HumanDuration, WindowConfig};
use update_agent::fleet::window::{state_at, until, Window, WindowState};

fn window(days: &[&str], start: &str, length_secs: u64, tz: &str) -> Window {
    Window::from_config(
        0,
        &WindowConfig {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            length: HumanDuration::secs(length_secs),
            time_zone: tz.into(),
        },
    )
    .unwrap()
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn open_until(ws: &[Window], now: &str) -> Timestamp {
    match state_at(ws, ts(now)) {
        Some(WindowState::Open { closes }) => closes,
        other => panic!("expected open at {now}, got {other:?}"),
    }
}

fn closed_until(ws: &[Window], now: &str) -> Timestamp {
    match state_at(ws, ts(now)) {
        Some(WindowState::Closed { opens }) => opens,
        other => panic!("expected closed at {now}, got {other:?}"),
    }
}

#[test]
fn sunday_night_window_wraps_into_monday() {
    // 2026-11-29 is a Sunday.
    let ws = [window(&["Sun"], "23:00", 3 * 3600, "UTC")];
    assert_eq!(
        open_until(&ws, "2026-11-30T01:30:00Z"),
        ts("2026-11-30T02:00:00Z")
    );
    assert_eq!(
        open_until(&ws, "2026-11-29T23:00:00Z"),
        ts("2026-11-30T02:00:00Z")
    );
    // End is exclusive.
    assert_eq!(
        closed_until(&ws, "2026-11-30T02:00:00Z"),
        ts("2026-12-06T23:00:00Z")
    );
    // Saturday: the next opening is the next day.
    assert_eq!(
        closed_until(&ws, "2026-11-28T12:00:00Z"),
        ts("2026-11-29T23:00:00Z")
    );
    assert_eq!(
        until(ts("2026-11-28T12:00:00Z"), ts("2026-11-29T23:00:00Z")).as_secs(),
        35 * 3600
    );
}

#[test]
fn weekly_window_longer_than_a_day_spans_the_week_boundary() {
    // Saturday 20:00 for 2 days: open on Monday 19:59 UTC, closed at 20:00.
    let ws = [window(&["Sat"], "20:00", 48 * 3600, "UTC")];
    assert_eq!(
        open_until(&ws, "2026-11-30T19:59:00Z"),
        ts("2026-11-30T20:00:00Z")
    );
    assert_eq!(
        closed_until(&ws, "2026-11-30T20:00:00Z"),
        ts("2026-12-05T20:00:00Z")
    );
}

#[test]
fn spring_forward_gap_opens_after_the_gap() {
    // Europe/Berlin, 2026-03-29 (Sunday): 02:00 CET jumps to 03:00 CEST. A 02:30 start does
    // not exist that night; the window opens at 03:30 CEST = 01:30 UTC and lasts 1 h.
    let ws = [window(&["Sun"], "02:30", 3600, "Europe/Berlin")];
    assert_eq!(
        closed_until(&ws, "2026-03-29T00:00:00Z"),
        ts("2026-03-29T01:30:00Z")
    );
    assert_eq!(
        open_until(&ws, "2026-03-29T01:45:00Z"),
        ts("2026-03-29T02:30:00Z")
    );
    // The week before, in winter time: 02:30 CET = 01:30 UTC too; the week after, in
    // summer time: 02:30 CEST = 00:30 UTC.
    assert_eq!(
        closed_until(&ws, "2026-03-21T00:00:00Z"),
        ts("2026-03-22T01:30:00Z")
    );
    assert_eq!(
        closed_until(&ws, "2026-03-30T00:00:00Z"),
        ts("2026-04-05T00:30:00Z")
    );
}

#[test]
fn fall_back_fold_opens_at_the_first_occurrence_and_lasts_elapsed_time() {
    // America/New_York, 2026-11-01 (Sunday): 02:00 EDT falls back to 01:00 EST, so 01:30
    // happens twice. The window opens at the first one (05:30 UTC) and lasts 2 h of
    // elapsed time: until 07:30 UTC, which the wall clock shows as 02:30 EST.
    let ws = [window(&["Sun"], "01:30", 2 * 3600, "America/New_York")];
    assert_eq!(
        closed_until(&ws, "2026-11-01T04:00:00Z"),
        ts("2026-11-01T05:30:00Z")
    );
    assert_eq!(
        open_until(&ws, "2026-11-01T06:45:00Z"),
        ts("2026-11-01T07:30:00Z")
    );
    assert_eq!(
        closed_until(&ws, "2026-11-01T07:30:00Z"),
        ts("2026-11-08T06:30:00Z")
    );
}

#[test]
fn window_spanning_a_dst_change_keeps_its_length() {
    // Europe/Berlin: Saturday 2026-10-24 22:00 CEST (20:00 UTC) for 12 h crosses the
    // fall-back at 03:00 CEST on Sunday; it closes 12 h later, at 08:00 UTC (09:00 CET).
    let ws = [window(&["Sat"], "22:00", 12 * 3600, "Europe/Berlin")];
    assert_eq!(
        open_until(&ws, "2026-10-25T07:59:00Z"),
        ts("2026-10-25T08:00:00Z")
    );
}

#[test]
fn several_windows_take_the_earliest_opening_and_latest_close() {
    let ws = [
        window(&["Tue", "Thu"], "03:00", 3600, "UTC"),
        window(&["Wed"], "12:00", 1800, "Asia/Tokyo"), // 03:00 UTC
        window(&["Tue"], "03:30", 3600, "UTC"),
    ];
    // Monday 2026-11-30: next is Tuesday 03:00.
    assert_eq!(
        closed_until(&ws, "2026-11-30T10:00:00Z"),
        ts("2026-12-01T03:00:00Z")
    );
    // Tuesday 03:45: both Tuesday windows are open; the later close wins.
    assert_eq!(
        open_until(&ws, "2026-12-01T03:45:00Z"),
        ts("2026-12-01T04:30:00Z")
    );
    // Tuesday 05:00: next is Wednesday 12:00 in Tokyo = 03:00 UTC.
    assert_eq!(
        closed_until(&ws, "2026-12-01T05:00:00Z"),
        ts("2026-12-02T03:00:00Z")
    );
    assert_eq!(state_at(&[], ts("2026-12-01T05:00:00Z")), None);
}

#[test]
fn bad_windows_are_refused_with_what_is_wrong() {
    let mut c = WindowConfig {
        days: vec!["Mon".into()],
        start: "03:00".into(),
        length: HumanDuration::secs(3600),
        time_zone: "Mars/Olympus_Mons".into(),
    };
    let e = Window::from_config(2, &c).unwrap_err();
    assert!(e.to_string().contains("window 2"), "{e}");
    assert!(e.to_string().contains("Mars/Olympus_Mons"), "{e}");
    c.time_zone = "UTC".into();
    c.days = vec!["Monday".into()];
    assert!(Window::from_config(0, &c)
        .unwrap_err()
        .to_string()
        .contains("Monday"));
    c.days = vec!["Mon".into()];
    c.start = "24:00".into();
    assert!(Window::from_config(0, &c)
        .unwrap_err()
        .to_string()
        .contains("24:00"));
    // The configuration refuses the same things at load time.
    let text = "[reboot]\nstrategy = \"window\"\n[[reboot.windows]]\ndays = [\"Mon\"]\nstart = \"03:00\"\nlength = \"1h\"\ntime_zone = \"Nowhere/City\"\n";
    let e = update_agent::config::Config::from_toml_str(text).unwrap_err();
    assert!(e.to_string().contains("reboot.windows[0]"), "{e}");
    assert!(e.to_string().contains("Nowhere/City"), "{e}");
}
