//! Issue 5: the check runner on its own: declared checks (TCP port, HTTP 2xx, systemd unit)
//! against real sockets, timeouts that hold against servers that never answer, output tails,
//! and the validation of `[[health.checks]]` entries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use update_agent::config::{CheckTarget, HumanDuration};
use update_agent::health::runner::{self, Check, CheckEnv, CheckKind, CheckSource};
use update_agent::health::{CheckSpec, HealthSettings};

fn check(kind: CheckKind, timeout: Duration) -> Check {
    Check {
        name: "t".into(),
        source: CheckSource::Config,
        required: true,
        timeout,
        kind,
    }
}

fn run(kind: CheckKind, timeout: Duration) -> runner::CheckResult {
    runner::run_one(&check(kind, timeout), timeout, &CheckEnv::default())
}

/// A one-shot HTTP server answering every connection with `response` (or never, if `None`).
fn http_server(response: Option<&'static str>) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/healthz", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        match response {
            Some(r) => {
                conn.write_all(r.as_bytes()).unwrap();
            }
            // Hold the connection open without answering until the client gives up.
            None => {
                let _ = conn.read(&mut buf);
            }
        }
    });
    (url, handle)
}

#[test]
fn http_check_passes_on_2xx_and_fails_on_5xx_with_the_body_tail() {
    let (url, h) = http_server(Some("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"));
    let r = run(CheckKind::Http(url), Duration::from_secs(5));
    assert!(r.passed, "{r:?}");
    assert_eq!(r.status, "HTTP 204 No Content");
    h.join().unwrap();

    let (url, h) = http_server(Some(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 18\r\nConnection: close\r\n\r\ndatabase not ready",
    ));
    let r = run(CheckKind::Http(url), Duration::from_secs(5));
    assert!(!r.passed && !r.timed_out, "{r:?}");
    assert_eq!(r.status, "HTTP 503 Service Unavailable");
    assert_eq!(r.output_tail, "database not ready");
    h.join().unwrap();
}

#[test]
fn http_check_that_never_answers_times_out() {
    let (url, _h) = http_server(None);
    let started = Instant::now();
    let r = run(CheckKind::Http(url), Duration::from_secs(1));
    let took = started.elapsed();
    assert!(!r.passed && r.timed_out, "{r:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn http_check_against_a_closed_port_fails_fast() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = run(
        CheckKind::Http(format!("http://127.0.0.1:{port}/")),
        Duration::from_secs(5),
    );
    assert!(!r.passed && !r.timed_out, "{r:?}");
    assert_eq!(r.status, "request failed");
}

#[test]
fn tcp_check_open_closed_and_unresolvable() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let r = run(CheckKind::Tcp(addr.clone()), Duration::from_secs(5));
    assert!(r.passed, "{r:?}");
    drop(listener);
    let r = run(CheckKind::Tcp(addr.clone()), Duration::from_secs(5));
    assert!(!r.passed, "{r:?}");
    assert!(r.output_tail.contains(&addr), "{r:?}");
    let r = run(
        CheckKind::Tcp("no-such-host.invalid:80".into()),
        Duration::from_secs(5),
    );
    assert!(!r.passed, "{r:?}");
}

#[test]
fn unit_check_fails_for_an_inactive_unit() {
    // Whether or not systemd runs here, a unit that does not exist is not active.
    let r = run(
        CheckKind::Unit("update-agent-no-such-unit.service".into()),
        Duration::from_secs(10),
    );
    assert!(!r.passed, "{r:?}");
    assert!(
        r.status.contains("update-agent-no-such-unit.service") || r.status.contains("systemctl"),
        "{r:?}"
    );
}

#[test]
fn exec_check_output_tail_is_bounded_and_keeps_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("noisy");
    std::fs::write(
        &script,
        "#!/bin/sh\ni=0\nwhile [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done\necho THE END >&2\nexit 7\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let r = run(CheckKind::Exec(script), Duration::from_secs(10));
    assert!(!r.passed);
    assert_eq!(r.status, "exit status 7");
    assert!(r.output_tail.len() <= runner::OUTPUT_TAIL as usize);
    assert!(r.output_tail.ends_with("THE END"), "{}", r.output_tail);
    assert!(
        r.describe().len() < 600,
        "one readable line: {}",
        r.describe()
    );
}

#[test]
fn a_missing_executable_fails_with_its_name() {
    let r = run(
        CheckKind::Exec(PathBuf::from("/nonexistent/check")),
        Duration::from_secs(1),
    );
    assert!(!r.passed);
    assert!(r.status.contains("/nonexistent/check"), "{r:?}");
}

#[test]
fn collect_orders_required_then_wanted_and_runs_required_first() {
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("required.d");
    let want = dir.path().join("wanted.d");
    std::fs::create_dir_all(&req).unwrap();
    std::fs::create_dir_all(&want).unwrap();
    for (d, name, code) in [(&req, "20-b", 0), (&req, "10-a", 0), (&want, "05-w", 1)] {
        let p = d.join(name);
        std::fs::write(&p, format!("#!/bin/sh\nexit {code}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    std::fs::write(req.join(".hidden"), "").unwrap();
    std::fs::write(req.join("10-a~"), "").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let settings = HealthSettings {
        required_dir: req,
        wanted_dir: want,
        check_timeout: Duration::from_secs(5),
        total_timeout: Duration::from_secs(20),
        reboot_on_failure: false,
        checks: vec![
            CheckSpec::new(CheckTarget::Tcp(listener.local_addr().unwrap().to_string())),
            CheckSpec {
                name: Some("metrics".into()),
                required: false,
                timeout: Some(HumanDuration::secs(3)),
                ..CheckSpec::new(CheckTarget::Unit(
                    "update-agent-no-such-unit.service".into(),
                ))
            },
        ],
    };
    let checks = runner::collect(&settings, None);
    let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names[..3],
        [
            "required.d/10-a",
            "required.d/20-b",
            &format!("tcp:{}", listener.local_addr().unwrap())
        ]
    );
    assert_eq!(names[3..], ["wanted.d/05-w", "metrics"]);
    assert_eq!(checks[4].timeout, Duration::from_secs(3));
    let verdict = runner::run_all(&checks, settings.total_timeout, &CheckEnv::default());
    assert!(verdict.passed);
    assert_eq!(verdict.wanted_failures().count(), 2);

    // With the drill armed, the required part fails and wanted checks are not run.
    let checks = runner::collect(&settings, Some("drill".into()));
    let verdict = runner::run_all(&checks, settings.total_timeout, &CheckEnv::default());
    assert!(!verdict.passed);
    assert_eq!(verdict.first_failure().unwrap().source, CheckSource::Drill);
    assert!(verdict.results.iter().all(|r| r.required));
}

#[test]
fn check_specs_are_validated() {
    let ok = CheckSpec::new(CheckTarget::Http("http://127.0.0.1:8080/healthz".into()));
    assert_eq!(ok.validate(), Ok(()));
    assert_eq!(ok.display_name(), "http:http://127.0.0.1:8080/healthz");
    let cases = [
        (
            CheckSpec::new(CheckTarget::Http("ftp://x/".into())),
            "http://",
        ),
        (
            CheckSpec::new(CheckTarget::Tcp("localhost".into())),
            "host:port",
        ),
        (
            CheckSpec::new(CheckTarget::Unit("--now".into())),
            "unit name",
        ),
        (
            CheckSpec {
                timeout: Some(HumanDuration::secs(0)),
                ..CheckSpec::new(CheckTarget::Tcp("h:1".into()))
            },
            "more than 0s",
        ),
    ];
    for (spec, needle) in cases {
        let err = spec.validate().unwrap_err();
        assert!(err.contains(needle), "{spec:?}: {err}");
    }
}
