//! server-mock: a real HTTP/1.1 server for tests, demos and staging.
//!
//! It serves a repository directory (signed manifests, images) with `Range`, `If-Range`,
//! `ETag` and HEAD, keeps a request log, and misbehaves on demand (see [`Fault`]). Tests
//! script it in-process through [`ServerHandle`]; a separately started process is scripted
//! over `/_admin/...` (see `docs/server-mock.md`).
//!
//! Routes live in [`router`]: the admin routes are nested under `/_admin`, the repository
//! is the fallback. New protocol endpoints (FleetLock, status reports) are added there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

mod admin;
mod faults;
pub mod fleetlock;
mod log;
mod raw;
mod repo;
pub mod reports;

pub use faults::{glob_match, Fault, FaultRule, Faults};
pub use fleetlock::{FleetLock, FleetLockSettings};
pub use log::{LogEntry, RequestLog};
pub use repo::etag_for;
pub use reports::{FleetSummary, Report, Reports};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("repository directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("repository path {0} is not a directory")]
    NotADir(PathBuf),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS certificate or key {what}: {message}")]
    Tls { what: String, message: String },
}

impl ServerError {
    /// Stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerError::Dir { .. } => "repo_dir",
            ServerError::NotADir(_) => "repo_not_dir",
            ServerError::Bind { .. } => "bind",
            ServerError::Tls { .. } => "tls",
        }
    }
}

/// State shared by every route.
#[derive(Debug, Clone)]
pub struct AppState {
    pub(crate) root: Arc<PathBuf>,
    pub(crate) faults: Faults,
    pub(crate) log: RequestLog,
    pub(crate) fleetlock: FleetLock,
    pub(crate) reports: Reports,
}

impl AppState {
    /// State serving `root`, with no faults and an empty log.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: Arc::new(root.into()),
            faults: Faults::default(),
            log: RequestLog::default(),
            fleetlock: FleetLock::default(),
            reports: Reports::default(),
        }
    }
}

/// All routes: `/_admin/...` for scripting, everything else is the repository.
pub fn router(state: AppState) -> Router {
    Router::new()
        .nest("/_admin", admin::routes())
        .route("/v1/pre-reboot", post(fleetlock::pre_reboot))
        .route("/v1/steady-state", post(fleetlock::steady_state))
        .route("/v1/report", post(reports::post_report))
        .fallback(repo_handler)
        .with_state(state)
}

/// Entry point for starting a server.
#[derive(Debug)]
pub struct Server;

/// A certificate chain and private key (PEM) to serve https with.
#[derive(Clone)]
pub struct TlsIdentity {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// From PEM text: the server certificate first, then any intermediates; a PKCS#8, PKCS#1
    /// or SEC1 private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsIdentity, ServerError> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, message: String| ServerError::Tls {
            what: what.to_string(),
            message,
        };
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("certificate", "no PEM certificate found".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad("key", e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("config", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate and key", e.to_string()))?;
        // hyper serves HTTP/1.1 only here.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsIdentity {
            config: Arc::new(config),
        })
    }

    /// From PEM files (`--tls-cert`, `--tls-key`).
    pub fn from_files(cert: &Path, key: &Path) -> Result<TlsIdentity, ServerError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| ServerError::Tls {
                what: p.display().to_string(),
                message: e.to_string(),
            })
        };
        TlsIdentity::from_pem(&read(cert)?, &read(key)?)
    }
}

impl Server {
    /// Serve `dir` on `addr` (use port 0 for a free port) until the handle is dropped.
    pub async fn start(
        dir: impl AsRef<Path>,
        addr: SocketAddr,
    ) -> Result<ServerHandle, ServerError> {
        Self::start_with(dir, addr, None).await
    }

    /// As [`Server::start`], over https when `tls` is given (every route: repository,
    /// FleetLock, reports, admin).
    pub async fn start_with(
        dir: impl AsRef<Path>,
        addr: SocketAddr,
        tls: Option<TlsIdentity>,
    ) -> Result<ServerHandle, ServerError> {
        let dir = dir.as_ref();
        let root = tokio::fs::canonicalize(dir)
            .await
            .map_err(|source| ServerError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        if !root.is_dir() {
            return Err(ServerError::NotADir(root));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let state = AppState::new(root);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.config));
        let task = tokio::spawn(accept_loop(listener, state.clone(), acceptor));
        tracing::info!(%addr, scheme, root = %state.root.display(), "server-mock listening");
        Ok(ServerHandle {
            addr,
            scheme,
            state,
            task,
        })
    }
}

/// A running server. Dropping it stops the server and aborts its open connections.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    scheme: &'static str,
    state: AppState,
    task: JoinHandle<()>,
}

impl ServerHandle {
    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:43567` (`https://` when
    /// serving TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// URL of a repository path, e.g. `url_for("images/os.img")`.
    pub fn url_for(&self, path: &str) -> String {
        format!(
            "{}://{}/{}",
            self.scheme,
            self.addr,
            path.trim_start_matches('/')
        )
    }

    /// The repository directory served (canonicalized).
    pub fn root(&self) -> &Path {
        &self.state.root
    }

    /// Arm a fault rule.
    pub fn set_fault(&self, rule: FaultRule) {
        self.state.faults.add(rule);
    }

    /// Disarm every fault.
    pub fn clear_faults(&self) {
        self.state.faults.clear();
    }

    /// The requests seen so far (repository requests only; `/_admin` is not logged).
    pub fn request_log(&self) -> Vec<LogEntry> {
        self.state.log.entries()
    }

    /// The FleetLock reboot-slot table (configure slots and TTL, read holders and events).
    pub fn fleetlock(&self) -> &FleetLock {
        &self.state.fleetlock
    }

    /// The agents' status reports.
    pub fn reports(&self) -> &Reports {
        &self.state.reports
    }

    /// Forget the requests seen so far.
    pub fn clear_log(&self) {
        self.state.log.clear();
    }

    /// Wait until the server stops (it only stops when the handle is dropped or the
    /// accept loop fails, so this is how the binary runs forever).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Longest TLS handshake a client gets.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn accept_loop(
    listener: TcpListener,
    state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let app = router(state.clone());
    // Connection tasks live in this set, so aborting the accept loop aborts them too.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (state, app) = (state.clone(), app.clone());
                    match tls.clone() {
                        None => {
                            conns.spawn(serve_connection(stream, peer, state, app));
                        }
                        Some(acceptor) => {
                            conns.spawn(async move {
                                match tokio::time::timeout(
                                    TLS_HANDSHAKE_TIMEOUT,
                                    acceptor.accept(stream),
                                )
                                .await
                                {
                                    Ok(Ok(tls)) => serve_connection(tls, peer, state, app).await,
                                    Ok(Err(e)) => {
                                        tracing::debug!(%peer, error = %e, "TLS handshake failed")
                                    }
                                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_connection<S: raw::Conn>(
    mut stream: S,
    peer: SocketAddr,
    state: AppState,
    app: Router,
) {
    // Read the first request head ourselves: a raw fault armed for its path is answered
    // without hyper; otherwise hyper gets the connection with those bytes put back.
    let head = raw::read_head(&mut stream).await;
    if let Some(req) = head.request.as_ref() {
        let is_file_req =
            (req.method == "GET" || req.method == "HEAD") && !req.path.starts_with("/_admin");
        if is_file_req && state.faults.has_raw_for(&req.path) {
            raw::respond(stream, req, &state).await;
            return;
        }
    }
    let io = hyper_util::rt::TokioIo::new(raw::Rewind::new(head.bytes, stream));
    let svc = hyper_util::service::TowerToHyperService::new(app);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .await
    {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// GET/HEAD on the repository, with the armed faults applied.
async fn repo_handler(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let range = header("range");
    let if_range = header("if-range");
    let faults = if method == Method::GET || method == Method::HEAD {
        state.faults.take_for(&path, false)
    } else {
        Vec::new()
    };
    let entry = state.log.push(LogEntry {
        method: method.to_string(),
        path: path.clone(),
        range: range.clone(),
        if_range: if_range.clone(),
        status: 0,
        bytes_sent: 0,
        complete: false,
        faults: faults.iter().map(|f| f.name().to_string()).collect(),
    });
    let mut resp = file_response(&state, &method, &path, range, if_range, &faults, entry).await;
    state
        .log
        .update(entry, |e| e.status = resp.status().as_u16());
    if state.faults.any_raw() {
        // New connections for every request while a raw fault is armed, so each one passes
        // through the raw check in `serve_connection`.
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

async fn file_response(
    state: &AppState,
    method: &Method,
    path: &str,
    range: Option<String>,
    if_range: Option<String>,
    faults: &[Fault],
    entry: log::EntryHandle,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        state.log.update(entry, |e| e.complete = true);
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(axum::http::header::ALLOW, "GET, HEAD")],
            "only GET and HEAD are served from the repository\n",
        )
            .into_response();
    }
    let pre = raw::Pre::from_faults(faults);
    if let Some(ms) = pre.latency_ms {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    if let Some(code) = pre.status {
        state.log.update(entry, |e| e.complete = true);
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, format!("injected fault: status {code}\n")).into_response();
    }
    let answer = repo::answer(
        &state.root,
        path,
        range.as_deref(),
        if_range.as_deref(),
        pre.ignore_range,
    )
    .await;
    let plan = faults::BodyPlan::from_faults(faults);
    let status = StatusCode::from_u16(answer.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (body_len, body) = match &answer {
        repo::Answer::File {
            path, start, len, ..
        } => {
            let announced = len + plan.append;
            let body = if method == Method::HEAD {
                state.log.update(entry, |e| e.complete = true);
                Body::empty()
            } else {
                Body::from_stream(repo::body_stream(
                    repo::BodySpec {
                        path: path.clone(),
                        start: *start,
                        len: *len,
                        extra: plan.append,
                        plan,
                        via_hyper: true,
                    },
                    state.log.clone(),
                    entry,
                ))
            };
            (announced, body)
        }
        repo::Answer::Unsatisfiable { .. } => {
            state.log.update(entry, |e| e.complete = true);
            (0, Body::empty())
        }
        repo::Answer::NotFound => {
            state.log.update(entry, |e| e.complete = true);
            let msg = format!("not found: {path}\n");
            let len = msg.len() as u64;
            let body = if method == Method::HEAD {
                Body::empty()
            } else {
                Body::from(msg)
            };
            (len, body)
        }
    };
    let mut builder = Response::builder().status(status);
    for (k, v) in repo::headers(&answer, body_len) {
        builder = builder.header(k, v);
    }
    builder.body(body).unwrap_or_else(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("building the response: {e}\n"),
        )
            .into_response()
    })
}
