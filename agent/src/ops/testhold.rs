//! Crash tests only: hold an operation at a named point until the process is stopped, then
//! exit there, as a crash at that point would. The points are the daemon's install progress
//! phases (`writing:90`, see [`TEST_HOLD_ENV`]) and the steps of `apply` outside them
//! (`staging`: the intent recorded, the boot flags not yet written; `flags-written`: the
//! flags written, the staged record not yet). Without the variable
//! every call is one environment look-up and nothing else.
//!
//! It lives below both `ops` callers and the daemon, which sets [`request_stop`] from its
//! signal handler, so no import runs back up from `ops` to `daemon`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Environment variable for crash tests only: block the install at this progress phase
/// (`disabled`, `writing`, `flushing`, `verifying`, `done`), optionally once it reached a
/// percentage (`writing:90`), or at a step of `apply` (`staging`, `flags-written`), until the process is
/// stopped; then exit at that point.
pub const TEST_HOLD_ENV: &str = "UPDATE_AGENT_TEST_HOLD";

/// Set once a stop signal arrived (the daemon's handler sets it).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// A stop was requested: a held operation exits now.
pub(crate) fn request_stop() {
    STOPPING.store(true, Ordering::SeqCst);
}

/// When [`TEST_HOLD_ENV`] names `point`, hold there (see [`hold`]); `test-hold <point>` goes
/// to stderr, where a test waits for it.
pub(crate) fn hold_point(point: &str) {
    if std::env::var(TEST_HOLD_ENV).as_deref() == Ok(point) {
        eprintln!("test-hold {point}");
        hold(point, &|_| {});
    }
}

/// Stop making progress here until a stop is requested, then exit the process at this point.
/// `announce` gets `test-hold <point>` first (the daemon passes it to systemd's STATUS=).
pub(crate) fn hold(point: &str, announce: &dyn Fn(&str)) -> ! {
    tracing::warn!(
        point,
        "{TEST_HOLD_ENV} is set: holding the operation until stopped"
    );
    announce(&format!("test-hold {point}"));
    while !STOPPING.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Die here, inside the step, as a crash at this point would.
    std::process::exit(0);
}
