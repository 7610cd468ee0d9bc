//! The HTTPS server loop shared by Nexus and Keeper, and the small HTTP helpers both use.
//!
//! The caller binds the listener (so tests can bind `127.0.0.1:0`) and hands it to [`serve`]
//! with a rustls configuration from [`crate::identity`] and a [`Handler`]. Each accepted
//! connection gets a TLS handshake under a deadline, then HTTP/1.1 with a header-read timeout;
//! the number of open connections is capped. On shutdown the loop stops accepting and lets
//! in-flight requests finish, up to a drain deadline.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, EXPIRES, HeaderValue, PRAGMA};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::identity::{ReloaderGuard, Role, SpiffeId, SvidSource, peer_spiffe_id};
use crate::platform::env::{Result as EnvResult, Source, duration, invalid, number};
use crate::platform::metrics::{Connections, Refusal};
use crate::protocol::nexus::ErrorCode;

/// Why a server could not start: its identity or its listener.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The process's own SVID could not be loaded.
    #[error("{0}")]
    Identity(#[from] crate::identity::Error),
    #[error(
        "this process's SVID is {id}, which is not a {role} identity (expected {expected}[/...])"
    )]
    /// The process's SVID names another role.
    WrongRole {
        /// The SPIFFE ID found.
        id: String,
        /// The role this process needs.
        role: Role,
        /// What that role's IDs look like.
        expected: String,
    },
    /// The metrics listen address could not be bound.
    #[error("{0}")]
    Metrics(#[from] crate::platform::metrics::BindError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A server's own identity: its SVID source (files watched for rotation while the guard lives,
/// or the Workload API stream).
pub struct OwnIdentity {
    /// Where the SVID comes from (reloaded as it rotates).
    pub source: Arc<SvidSource>,
    /// The SPIFFE ID it names.
    pub id: SpiffeId,
    /// Keeps the SVID reloader running.
    _reloader: ReloaderGuard,
}

impl OwnIdentity {
    /// Opens this process's SVID source (for the Workload API: waits for the first SVID),
    /// checks that the SVID carries `role`, and starts watching SVID files.
    pub async fn load(
        identity: &crate::identity::IdentityConfig,
        role: Role,
    ) -> Result<OwnIdentity, StartError> {
        let td = identity.trust_domain();
        let source = identity.open().await?;
        let id = source.current().id().clone();
        if identity.trust.role_of(&id) != Some(role) {
            return Err(StartError::WrongRole {
                id: id.to_string(),
                role,
                expected: role.base_id(td).unwrap_or_default(),
            });
        }
        let _reloader = source.spawn_reloader(crate::identity::SVID_RELOAD_INTERVAL);
        Ok(OwnIdentity {
            source,
            id,
            _reloader,
        })
    }
}

/// Binds the listener, and returns it with the address it really got (port 0 resolved).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    Ok((listener, bound))
}

/// Where a server listens: an address to bind when it is ready to serve, or a listener the
/// caller already bound (tests bind `127.0.0.1:0` and know the port before the server starts).
pub enum Listen {
    /// Bind this address (`SPIKE_*_TLS_PORT`).
    Bind(SocketAddr),
    /// Use this listener.
    Bound(TcpListener),
}

impl Listen {
    /// The listener and the address it really has (port 0 resolved).
    pub async fn open(self) -> Result<(TcpListener, SocketAddr), StartError> {
        match self {
            Listen::Bind(addr) => bind(addr).await,
            Listen::Bound(listener) => {
                let addr = listener.local_addr().map_err(|source| StartError::Bind {
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    source,
                })?;
                Ok((listener, addr))
            }
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The SPIFFE ID of the client certificate, verified against the trust bundle during the
    /// handshake; `None` when the client presented no certificate (allowed by Nexus for
    /// `/health` only).
    pub id: Option<SpiffeId>,
    /// The remote socket address, for logs.
    pub addr: SocketAddr,
}

/// Answers one request.
///
/// # Security rules for implementations
/// - The TLS handshake has verified the peer's chain against its trust domain's bundle and the
///   X509-SVID rules; [`Peer::id`] is that verified SPIFFE ID, or `None` when the client sent
///   no certificate. Authorisation is the handler's job, from `peer` and the route, and should
///   happen before the body is read ([`read_body`] with a deadline).
/// - Never panic on peer input, and always return a response; never echo a request body, and
///   escape caller-supplied text before logging it.
/// - [`Handler::privileged`] decides who may use the reserved connections: answering yes for
///   callers an attacker can be (any workload) gives the reserve away.
pub trait Handler: Send + Sync + 'static {
    /// Answers `req` from `peer`.
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: Peer,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;

    /// Whether `peer` may use one of the reserved connections once every ordinary one is taken
    /// ([`Limits::reserved_connections`]). Say yes only for callers whose requests must get
    /// through while others flood the server (operators, health checks); the default is no.
    fn privileged(&self, peer: &Peer) -> bool {
        let _ = peer;
        false
    }

    /// Where [`serve`] counts this server's connections and their refusals, if anywhere.
    fn connections(&self) -> Option<&Connections> {
        None
    }
}

/// Limits applied to every connection.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once; further ones are closed right after accept.
    pub max_connections: usize,
    /// Connections kept on top of `max_connections` for peers the handler calls privileged
    /// ([`Handler::privileged`]): a caller that holds every ordinary slot does not lock them
    /// out.
    pub reserved_connections: usize,
    /// Time allowed to read a request's body once its headers are in; with `header_timeout`
    /// it bounds the whole request.
    pub body_timeout: Duration,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for a request's headers to arrive.
    pub header_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Limits {
    /// The HTTPS server's limits: `SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT` (SPIKE's name),
    /// `SPIKE_HTTP_SERVER_READ_TIMEOUT` (the body, after the headers),
    /// `SPIKE_HTTP_SERVER_TLS_HANDSHAKE_TIMEOUT`, `SPIKE_HTTP_SERVER_MAX_CONNECTIONS`,
    /// `SPIKE_HTTP_SERVER_RESERVED_CONNECTIONS`, `SPIKE_HTTP_SERVER_DRAIN_TIMEOUT`.
    pub fn from_source(env: &impl Source) -> EnvResult<Limits> {
        let d = Limits::default();
        let max_connections =
            number::<usize>(env, "SPIKE_HTTP_SERVER_MAX_CONNECTIONS", d.max_connections)?;
        if max_connections == 0 {
            return Err(invalid(
                "SPIKE_HTTP_SERVER_MAX_CONNECTIONS",
                "must be at least 1",
            ));
        }
        Ok(Limits {
            max_connections,
            reserved_connections: number::<usize>(
                env,
                "SPIKE_HTTP_SERVER_RESERVED_CONNECTIONS",
                d.reserved_connections,
            )?,
            body_timeout: duration(env, "SPIKE_HTTP_SERVER_READ_TIMEOUT", d.body_timeout)?,
            handshake_timeout: duration(
                env,
                "SPIKE_HTTP_SERVER_TLS_HANDSHAKE_TIMEOUT",
                d.handshake_timeout,
            )?,
            header_timeout: duration(
                env,
                "SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT",
                d.header_timeout,
            )?,
            drain_timeout: duration(env, "SPIKE_HTTP_SERVER_DRAIN_TIMEOUT", d.drain_timeout)?,
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            reserved_connections: 16,
            body_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves HTTPS on `listener` until `shutdown` completes, then drains.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let reserve = Arc::new(Semaphore::new(limits.reserved_connections));
    let graceful = GracefulShutdown::new();
    let conns = handler.connections().cloned();
    let refused = |cause| {
        if let Some(c) = &conns {
            c.refused(cause);
        }
    };
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE; back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // An ordinary slot, else a reserved one that only a privileged peer may keep.
        let (permit, reserved) = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => match Arc::clone(&reserve).try_acquire_owned() {
                Ok(permit) => (permit, true),
                Err(_) => {
                    tracing::warn!(%addr, max = limits.max_connections, reserved = limits.reserved_connections, "connection limit reached, closing new connection");
                    refused(Refusal::ConnectionLimit);
                    continue;
                }
            },
        };
        let open = conns.as_ref().map(Connections::opened);
        let conns = conns.clone();
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handler = Arc::clone(&handler);
        let watcher = graceful.watcher();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = open;
            let refused = |cause| {
                if let Some(c) = &conns {
                    c.refused(cause);
                }
            };
            let tls =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%addr, error = %e, "TLS handshake refused");
                        refused(Refusal::HandshakeFailed);
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%addr, "TLS handshake timed out");
                        refused(Refusal::HandshakeTimeout);
                        return;
                    }
                };
            let id = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| peer_spiffe_id(certs).ok());
            let peer = Peer { id, addr };
            if reserved && !handler.privileged(&peer) {
                tracing::warn!(%addr, max = limits.max_connections, "connection limit reached; the reserved connections are kept for operators and health checks");
                refused(Refusal::ReservedForOperators);
                return;
            }
            let service = hyper::service::service_fn(move |req| {
                let handler = Arc::clone(&handler);
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn).await {
                if e.is_timeout() {
                    refused(Refusal::HeaderTimeout);
                }
                tracing::debug!(%addr, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed with requests still in flight");
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Over the limit (413).
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The connection failed while the body was being read.
    #[error("request body could not be read")]
    Read,
    /// The body did not arrive before the deadline.
    #[error("request body did not arrive within {0:?}")]
    TimedOut(Duration),
}

/// Reads the whole body, refusing (without buffering it) anything over `limit` bytes.
impl StartError {
    /// True when the SPIFFE agent gave this process no identity before the deadline
    /// (`SPIKE_SPIFFE_SOURCE_TIMEOUT`): the process exits with its own status for it.
    pub fn is_agent_unavailable(&self) -> bool {
        matches!(self, StartError::Identity(e) if e.is_agent_unavailable())
    }
}

impl BodyError {
    /// The error code a caller is answered with: 413 `api_request_too_large` over the limit,
    /// 400 `api_bad_request` otherwise.
    pub fn code(&self) -> ErrorCode {
        match self {
            BodyError::TooLarge(_) => ErrorCode::ApiRequestTooLarge,
            BodyError::Read | BodyError::TimedOut(_) => ErrorCode::ApiBadRequest,
        }
    }
}

/// Reads a whole request body of at most `limit` bytes within `deadline`. The one body reader
/// of Nexus and Keeper: a slow or endless body ends at the deadline instead of holding a
/// connection.
pub async fn read_body(
    body: Incoming,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, BodyError> {
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(BodyError::TimedOut(deadline)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Ok(Err(_)) => Err(BodyError::Read),
    }
}

/// A JSON response with the no-cache headers SPIKE sends on every response.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache, must-revalidate, private"),
    );
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    headers.insert(EXPIRES, HeaderValue::from_static("0"));
    resp
}

/// A non-JSON response (cipher streams, their text errors).
pub fn bytes(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache, must-revalidate, private"),
    );
    resp
}

/// SPIKE's error body: `{"err": "<code>"}`.
pub fn error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "err": code }))
}
