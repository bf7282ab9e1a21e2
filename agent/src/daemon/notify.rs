//! systemd notifications (`sd_notify`): READY=1, STATUS=, WATCHDOG=1, STOPPING=1 as datagrams
//! to `$NOTIFY_SOCKET` (a path, or an abstract name starting with '@'). Without the variable
//! every call is a no-op, so the daemon runs the same outside systemd.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// A handle on the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, Target)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honoured only when `WATCHDOG_PID` is unset
    /// or names this process, as sd_watchdog_enabled does).
    pub fn from_env() -> Notifier {
        Notifier::from_vars(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var("WATCHDOG_USEC").ok(),
            std::env::var("WATCHDOG_PID").ok(),
        )
    }

    /// From the variables' values (`None`: unset).
    pub(crate) fn from_vars(
        notify_socket: Option<std::ffi::OsString>,
        watchdog_usec: Option<String>,
        watchdog_pid: Option<String>,
    ) -> Notifier {
        let target = notify_socket.and_then(|v| {
            let bytes = v.as_encoded_bytes();
            match bytes.first() {
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(b'/') => Some(Target::Path(PathBuf::from(v))),
                _ => {
                    tracing::warn!(socket = ?v, "NOTIFY_SOCKET is neither a path nor @abstract; not notifying");
                    None
                }
            }
        });
        let socket = target.and_then(|t| match UnixDatagram::unbound() {
            Ok(s) => Some((s, t)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the notification socket");
                None
            }
        });
        let pid_ok = watchdog_pid.is_none_or(|p| p.trim() == std::process::id().to_string());
        let watchdog = watchdog_usec
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|us| *us > 0 && pid_ok)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// How often to send WATCHDOG=1: half the service's watchdog timeout.
    pub(crate) fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Send one message (`KEY=VALUE` lines). Best effort: a failure is logged, never fatal.
    pub(crate) fn send(&self, msg: &str) {
        let Some((sock, target)) = &self.socket else {
            return;
        };
        let result = match target {
            Target::Path(p) => sock.send_to(msg.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    /// STATUS= with a human line (newlines would end the field: replaced).
    pub(crate) fn status(&self, line: &str) {
        self.send(&format!("STATUS={}", line.replace('\n', " ")));
    }

    pub(crate) fn ready(&self, line: &str) {
        self.send(&format!("READY=1\nSTATUS={}", line.replace('\n', " ")));
    }

    pub(crate) fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub(crate) fn stopping(&self, line: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", line.replace('\n', " ")));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn watchdog_only_for_this_pid_and_a_positive_timeout() {
        let me = std::process::id().to_string();
        let wd = |usec: Option<&str>, pid: Option<&str>| {
            Notifier::from_vars(None, usec.map(String::from), pid.map(String::from))
                .watchdog_interval()
        };
        assert_eq!(wd(Some("2000000"), None), Some(Duration::from_secs(1)));
        assert_eq!(wd(Some("2000000"), Some(&me)), Some(Duration::from_secs(1)));
        assert_eq!(
            wd(Some("2000000"), Some("1")),
            None,
            "another process's watchdog"
        );
        assert_eq!(wd(Some("0"), None), None);
        assert_eq!(wd(Some("soon"), None), None);
        assert_eq!(wd(None, None), None);
    }

    #[test]
    fn path_socket_receives_and_bad_names_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_vars(Some(path.clone().into_os_string()), None, None);
        n.ready("multi\nline");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=multi line");
        // Relative names are neither paths nor abstract: nothing is sent, nothing fails.
        let n = Notifier::from_vars(Some("relative.sock".into()), None, None);
        n.status("x");
        assert!(n.socket.is_none());
    }
}
