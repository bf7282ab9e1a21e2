//! The local API on D-Bus (docs/dbus.md), the convention of RAUC and rpm-ostree:
//! `update-agent dbus` owns `org.updateagent.Agent1` on the system bus and serves object
//! `/org/updateagent/Agent1` with interface `org.updateagent.Agent1`.
//!
//! Every method runs the same operation as the CLI command of that name (`ops::*`) and
//! answers with the same JSON document as its `--json` output; a failure is the D-Bus error
//! `org.updateagent.Agent1.Error.Failed` whose message starts with the stable kind
//! (`[install_locked] ...`, docs/error-kinds.md). Only root may call: the bus policy
//! (docs/dbus/org.updateagent.Agent1.conf) says so, and the service checks every caller's
//! uid itself (`org.updateagent.Agent1.Error.AccessDenied`), so a permissive bus does not
//! open it. `Install` returns at once; progress and the end come as signals.
//!
//! Progress has one source whichever process installs (this service, the daemon, `apply`):
//! the installer's [`LiveWriter`](crate::progress::live::LiveWriter) sends each snapshot to
//! `<state dir>/progress.sock`, which this service binds; every datagram becomes a `Progress`
//! signal and one `PropertiesChanged` of the install properties.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection};

use crate::config::Config;
use crate::error::AgentError;
use crate::host::Host;
use crate::progress::live::{FeedMessage, LiveProgress, FEED_SOCKET};

/// Well-known bus name, object path and interface.
pub(crate) const BUS_NAME: &str = "org.updateagent.Agent1";
pub(crate) const OBJECT_PATH: &str = "/org/updateagent/Agent1";

/// Errors a caller sees (`org.updateagent.Agent1.Error.*`).
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.updateagent.Agent1.Error")]
pub(crate) enum ApiError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The operation failed: `[kind] message`.
    Failed(String),
    /// The caller is not root.
    AccessDenied(String),
    /// Another operation of this service is running.
    Busy(String),
}

fn failed(e: &AgentError) -> ApiError {
    ApiError::Failed(format!("[{}] {e}", e.kind()))
}

/// What the service is doing now (the `Operation` property).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Idle,
    Checking,
    Installing,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Idle => "idle",
            Operation::Checking => "checking",
            Operation::Installing => "installing",
        }
    }
}

/// The served object.
#[derive(Debug)]
pub(crate) struct Agent {
    config: Config,
    operation: Arc<Mutex<Operation>>,
    last_error: Arc<Mutex<String>>,
    /// The running install on this host, from the progress feed (`None`: none).
    live: Arc<Mutex<Option<LiveProgress>>>,
    /// Counts the feed's ends of this process's own installs, so `Completed` follows them.
    own_ended: Arc<tokio::sync::watch::Sender<u64>>,
}

fn json<T: Serialize>(v: &T) -> String {
    crate::jsonout::versioned(v).to_string()
}

impl Agent {
    pub(crate) fn new(config: Config) -> Agent {
        Agent {
            config,
            operation: Arc::new(Mutex::new(Operation::Idle)),
            last_error: Arc::new(Mutex::new(String::new())),
            live: Arc::new(Mutex::new(None)),
            own_ended: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    fn live(&self) -> Option<LiveProgress> {
        self.live.lock().ok().and_then(|l| l.clone())
    }

    fn host(&self) -> Result<Host, ApiError> {
        Host::open(self.config.clone()).map_err(|e| failed(&e))
    }

    fn current_operation(&self) -> Operation {
        self.operation.lock().map(|o| *o).unwrap_or(Operation::Idle)
    }

    /// Refuse callers other than root, whatever the bus policy let through.
    async fn require_root(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), ApiError> {
        let Some(sender) = hdr.sender() else {
            return Err(ApiError::AccessDenied("no sender on the call".into()));
        };
        let uid = zbus::fdo::DBusProxy::new(conn)
            .await?
            .get_connection_unix_user(sender.clone().into())
            .await
            .map_err(|e| ApiError::AccessDenied(format!("cannot tell the caller's uid: {e}")))?;
        if uid != 0 {
            tracing::warn!(uid, sender = %sender, "D-Bus call refused: not root");
            return Err(ApiError::AccessDenied(format!(
                "uid {uid} may not use {BUS_NAME}: root only"
            )));
        }
        Ok(())
    }

    /// Set the operation (idle only from a running one) and signal the change.
    async fn set_operation(
        operation: &Mutex<Operation>,
        to: Operation,
        emitter: &SignalEmitter<'_>,
    ) -> Result<(), ApiError> {
        {
            let mut op = operation
                .lock()
                .map_err(|_| ApiError::Failed("[internal] state lock poisoned".into()))?;
            if to != Operation::Idle && *op != Operation::Idle {
                return Err(ApiError::Busy(format!("already {}", op.name())));
            }
            *op = to;
        }
        let _ = Agent::state_changed(emitter, to.name()).await;
        Ok(())
    }

    /// Check the caller, then run the blocking operation `op` on this host off the bus's
    /// executor and answer with its `--json` document (what Status, Cancel, MarkGood and
    /// Rollback all are).
    async fn answer<T: Serialize>(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        op: impl FnOnce(&Host) -> Result<T, AgentError> + Send + 'static,
    ) -> Result<String, ApiError> {
        self.require_root(conn, hdr).await?;
        let host = self.host()?;
        Agent::blocking(move || op(&host).map(|r| json(&r)).map_err(|e| failed(&e))).await
    }

    /// Run a blocking operation off the bus's executor.
    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ApiError::Failed(format!("[internal] {e}")))?
    }
}

#[interface(name = "org.updateagent.Agent1")]
impl Agent {
    /// `update-agent status --json`.
    async fn status(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, ApiError> {
        self.answer(conn, &hdr, crate::ops::status::status).await
    }

    /// `update-agent check --json` against the configured manifest.
    async fn check(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<String, ApiError> {
        self.require_root(conn, &hdr).await?;
        let host = self.host()?;
        Agent::set_operation(&self.operation, Operation::Checking, &emitter).await?;
        let result = Agent::blocking(move || {
            let rt = crate::host::runtime().map_err(|e| failed(&e))?;
            let r = rt
                .block_on(crate::ops::check::check(&host, None, false, false))
                .map_err(|e| failed(&e))?;
            Ok(json(&r))
        })
        .await;
        Agent::set_operation(&self.operation, Operation::Idle, &emitter).await?;
        result
    }

    /// Start `update-agent apply` with the CLI's policy flags: `allow_downgrade`,
    /// `allow_denylisted`, `no_readback` (b) and `manifest` (s). Returns at once; `Progress`
    /// signals follow and `Completed(ok, json)` ends it.
    async fn install(
        &self,
        options: std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), ApiError> {
        self.require_root(conn, &hdr).await?;
        let mut opts = crate::ops::apply::ApplyOptions::default();
        for (k, v) in &options {
            let flag = || {
                bool::try_from(v).map_err(|_| {
                    ApiError::Failed(format!("[invalid_option] {k} must be a boolean"))
                })
            };
            match k.as_str() {
                "allow_downgrade" => opts.allow_downgrade = flag()?,
                "allow_denylisted" => opts.allow_denylisted = flag()?,
                "no_readback" => opts.no_readback = flag()?,
                "manifest" => {
                    opts.manifest = Some(String::try_from(v.try_clone().map_err(|e| ApiError::Failed(format!("[invalid_option] {e}")))?).map_err(|_| {
                        ApiError::Failed("[invalid_option] manifest must be a string".into())
                    })?)
                }
                other => {
                    return Err(ApiError::Failed(format!(
                        "[invalid_option] unknown option {other:?} (allow_downgrade, allow_denylisted, no_readback, manifest)"
                    )))
                }
            }
        }
        let host = self.host()?;
        Agent::set_operation(&self.operation, Operation::Installing, &emitter).await?;
        let emitter = emitter.to_owned();
        let operation = self.operation.clone();
        let last_error = self.last_error.clone();
        let mut ended = self.own_ended.subscribe();
        // Progress reaches the bus through the feed (the same path as the daemon's installs).
        let worker = tokio::task::spawn_blocking(move || {
            let rt = crate::host::runtime()?;
            let mut live =
                crate::progress::live::LiveWriter::new(host.state.dir(), None, host.clock.clone());
            let r = rt.block_on(crate::ops::apply::apply(&host, &opts, &mut |ev| {
                live.event(&ev)
            }));
            Ok::<_, AgentError>((r, live.finish()))
        });
        let emit = emitter.clone();
        tokio::spawn(async move {
            let result = match worker.await {
                Ok(Ok((r, published))) => {
                    if published {
                        // The feed's last Progress and its end come before Completed.
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(2),
                            ended.changed(),
                        )
                        .await;
                    }
                    Ok(r)
                }
                Ok(Err(e)) => Ok(Err(e)),
                Err(e) => Err(e),
            };
            let (ok, doc) = match result {
                Ok(Ok(report)) => (true, json(&report)),
                Ok(Err(e)) => {
                    if let Ok(mut l) = last_error.lock() {
                        *l = e.kind().to_string();
                    }
                    (
                        false,
                        crate::jsonout::error_line(e.kind(), &e.to_string()).to_string(),
                    )
                }
                Err(_) => (
                    false,
                    crate::jsonout::error_line("internal", "the install thread panicked")
                        .to_string(),
                ),
            };
            let _ = Agent::set_operation(&operation, Operation::Idle, &emit).await;
            let _ = Agent::completed(&emit, ok, &doc).await;
        });
        Ok(())
    }

    /// `update-agent cancel`: stop the running install (this service's or another
    /// process's) and answer once it stopped, or drop the staged update before the reboot.
    async fn cancel(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, ApiError> {
        self.answer(conn, &hdr, crate::ops::cancel::cancel).await
    }

    /// `update-agent mark-good`.
    async fn mark_good(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, ApiError> {
        self.answer(conn, &hdr, crate::ops::commit::mark_good).await
    }

    /// `update-agent rollback [--reboot]`.
    async fn rollback(
        &self,
        reboot: bool,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, ApiError> {
        self.answer(conn, &hdr, move |host| {
            crate::ops::rollback::rollback(host, reboot)
        })
        .await
    }

    /// `idle`, `checking` or `installing` (this service's own operation).
    #[zbus(property)]
    async fn operation(&self) -> String {
        self.current_operation().name().to_string()
    }

    /// The state record's phase (`idle`, `staged`, `trial`, `committed`, ...).
    #[zbus(property)]
    async fn phase(&self) -> String {
        self.host()
            .ok()
            .and_then(|h| h.state.load().ok())
            .map(|s| s.phase.name().to_string())
            .unwrap_or_else(|| "unknown".into())
    }

    /// The booted slot (`A`, `B`, or empty when unknown).
    #[zbus(property)]
    async fn booted_slot(&self) -> String {
        self.host()
            .ok()
            .and_then(|h| {
                let slots = h.slots().ok()?;
                h.booted_slot(&slots).ok().map(|b| b.slot.to_string())
            })
            .unwrap_or_default()
    }

    /// The phase of the install running on this host (whichever process runs it: this
    /// service, the daemon, `apply`), e.g. `writing`, `verifying`; empty when none runs.
    #[zbus(property)]
    async fn install_phase(&self) -> String {
        self.live().map(|l| l.phase).unwrap_or_default()
    }

    /// Image bytes written so far by the running install, of `BytesTotal`.
    #[zbus(property)]
    async fn bytes_done(&self) -> u64 {
        self.live().map_or(0, |l| l.done)
    }

    /// Image bytes of the whole running install (0 when none runs).
    #[zbus(property)]
    async fn bytes_total(&self) -> u64 {
        self.live().map_or(0, |l| l.total)
    }

    /// The running install's download rate over the last seconds.
    #[zbus(property)]
    async fn bytes_per_second(&self) -> f64 {
        self.live().map_or(0.0, |l| l.bytes_per_second)
    }

    /// The process running the install (0 when none runs).
    #[zbus(property)]
    async fn install_pid(&self) -> u32 {
        self.live().map_or(0, |l| l.pid)
    }

    /// The kind of the last failed `Install` of this service (empty if none).
    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// `StateChanged(s operation)`: `checking`, `installing`, `idle` (the `Operation`
    /// property's new value; `PropertiesChanged` is not sent for it).
    #[zbus(signal)]
    async fn state_changed(emitter: &SignalEmitter<'_>, operation: &str) -> zbus::Result<()>;

    /// `Progress(s role, s phase, t done, t total)` during any install on this host: the
    /// image being written, the phase, image bytes written of the whole install.
    #[zbus(signal)]
    async fn progress(
        emitter: &SignalEmitter<'_>,
        role: &str,
        phase: &str,
        done: u64,
        total: u64,
    ) -> zbus::Result<()>;

    /// `Completed(b ok, s json)`: the end of an `Install`, with `apply --json`'s report or
    /// the error line.
    #[zbus(signal)]
    async fn completed(emitter: &SignalEmitter<'_>, ok: bool, json: &str) -> zbus::Result<()>;
}

/// The progress feed's listener: `<state dir>/progress.sock`, owner-only (a stale socket of an
/// earlier run is replaced).
fn bind_feed(config: &Config) -> Result<tokio::net::UnixDatagram, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let path = config.state.dir.join(FEED_SOCKET);
    let io = |source| AgentError::Io {
        what: format!("binding the progress feed {}", path.display()),
        source,
    };
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let sock = tokio::net::UnixDatagram::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(sock)
}

/// Turn each feed datagram into a `Progress` signal and one `PropertiesChanged` of the
/// install properties (and of `Phase` when an install ends).
async fn follow_feed(
    sock: tokio::net::UnixDatagram,
    iface: zbus::object_server::InterfaceRef<Agent>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "the progress feed failed; no more Progress signals");
                return;
            }
        };
        let msg = match serde_json::from_slice::<FeedMessage>(&buf[..n]) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a malformed progress datagram");
                continue;
            }
        };
        let emitter = iface.signal_emitter();
        let agent = iface.get().await;
        let ended = match msg {
            FeedMessage::Progress(p) => {
                let _ = Agent::progress(emitter, &p.role, &p.phase, p.done, p.total).await;
                if let Ok(mut l) = agent.live.lock() {
                    *l = Some(p);
                }
                false
            }
            FeedMessage::Ended { pid } => {
                if let Ok(mut l) = agent.live.lock() {
                    if l.as_ref().is_none_or(|p| p.pid == pid) {
                        *l = None;
                    }
                }
                if pid == std::process::id() {
                    agent.own_ended.send_modify(|n| *n += 1);
                }
                true
            }
        };
        let live = agent.live();
        let mut changed: HashMap<&str, zbus::zvariant::Value<'_>> = HashMap::from([
            (
                "InstallPhase",
                live.as_ref()
                    .map(|l| l.phase.clone())
                    .unwrap_or_default()
                    .into(),
            ),
            ("BytesDone", live.as_ref().map_or(0, |l| l.done).into()),
            ("BytesTotal", live.as_ref().map_or(0, |l| l.total).into()),
            (
                "BytesPerSecond",
                live.as_ref().map_or(0.0, |l| l.bytes_per_second).into(),
            ),
            ("InstallPid", live.as_ref().map_or(0u32, |l| l.pid).into()),
        ]);
        if ended {
            changed.insert("Phase", agent.phase().await.into());
        }
        let _ = zbus::fdo::Properties::properties_changed(
            emitter,
            zbus::names::InterfaceName::from_static_str_unchecked(BUS_NAME),
            changed,
            std::borrow::Cow::Borrowed(&[]),
        )
        .await;
    }
}

/// Serve the API until SIGTERM/SIGINT: on `address` (a D-Bus address, for tests and
/// private buses) or the system bus.
pub(crate) fn serve(config: Config, address: Option<&str>) -> Result<(), AgentError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: zbus::Error| AgentError::Io {
            what: what.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    };
    let rt = crate::host::runtime()?;
    rt.block_on(async {
        let builder = match address {
            Some(a) => {
                zbus::connection::Builder::address(a).map_err(io("parsing the bus address"))?
            }
            None => {
                zbus::connection::Builder::system().map_err(io("connecting to the system bus"))?
            }
        };
        // Bound before the name is owned: a client that saw the name sees every install.
        let feed = bind_feed(&config)?;
        let conn = builder
            .name(BUS_NAME)
            .map_err(io("naming the service"))?
            .serve_at(OBJECT_PATH, Agent::new(config))
            .map_err(io("serving the object"))?
            .build()
            .await
            .map_err(io(&format!("owning {BUS_NAME} on the bus")))?;
        let iface = conn
            .object_server()
            .interface::<_, Agent>(OBJECT_PATH)
            .await
            .map_err(io("finding the served object"))?;
        tokio::spawn(follow_feed(feed, iface));
        tracing::info!(name = BUS_NAME, path = OBJECT_PATH, "D-Bus API ready");
        crate::daemon::notify::Notifier::from_env().ready("D-Bus API ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|source| AgentError::Io {
                what: "installing the SIGTERM handler".into(),
                source,
            })?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("D-Bus API stopping");
        Ok(())
    })
}
