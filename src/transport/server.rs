//! The HTTPS server loop shared by Nexus and Keeper, and the small HTTP helpers both use.
//!
//! The caller binds the listener (so tests can bind `127.0.0.1:0`) and hands it to [`serve`]
//! with a rustls configuration from [`crate::identity`] and a [`Handler`]. Each accepted
//! connection gets a TLS handshake under a deadline, then HTTP/1.1 with a header-read timeout,
//! a body deadline ([`read_body`]) and a write deadline (an answer the caller does not read
//! ends the connection); the number of open connections is capped. On shutdown the loop stops
//! accepting and lets in-flight requests finish, up to a drain deadline.
//!
//! Connection slots ([`Limits`]): a connection takes an ordinary slot at accept, or, when every
//! ordinary slot is taken, one of the few handshake slots. Once the handshake shows who the
//! peer is, a caller without a certificate moves to the anonymous allowance (and is served one
//! request, without keep-alive), an operator ([`Handler::privileged`]) whose handshake used a
//! handshake slot moves to the reserve, and anyone else keeps the ordinary slot it had or is
//! closed. So neither the reserve nor the ordinary slots can be held by callers without a
//! certificate, and no slot but a handshake slot is held before the handshake ends.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, EXPIRES, HeaderValue, PRAGMA};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    /// Keeps the SVID gauges current.
    _gauges: Option<crate::platform::AbortOnDrop>,
}

impl OwnIdentity {
    /// Opens this process's SVID source (for the Workload API: waits for the first SVID),
    /// checks that the SVID carries `role`, starts watching SVID files, and keeps a server's
    /// `gauges` current (they read "no SVID" until then).
    pub async fn load(
        identity: &crate::identity::IdentityConfig,
        role: Role,
        gauges: Option<&crate::platform::metrics::SvidGauges>,
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
        let _gauges = gauges.map(|g| report_svid(Arc::downgrade(&source), g.clone()));
        Ok(OwnIdentity {
            source,
            id,
            _reloader,
            _gauges,
        })
    }
}

/// Sets `gauges` from the SVID in use every second, while the source lives.
fn report_svid(
    source: std::sync::Weak<SvidSource>,
    gauges: crate::platform::metrics::SvidGauges,
) -> crate::platform::AbortOnDrop {
    crate::platform::AbortOnDrop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        while let Some(source) = source.upgrade() {
            let state = source.state();
            gauges.set(state.is_ready(), state.not_after());
            drop(source);
            tick.tick().await;
        }
    }))
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
///   callers an attacker can be (any workload) gives the reserve away. It is asked only for
///   peers with a verified certificate: callers without one never get the reserve.
pub trait Handler: Send + Sync + 'static {
    /// Answers `req` from `peer`.
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: Peer,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;

    /// Whether `peer`, whose certificate the handshake verified, may use one of the reserved
    /// connections once every ordinary one is taken ([`Limits::reserved_connections`]). Say yes
    /// only for callers whose requests must get through while others flood the server
    /// (operators); the default is no. Callers without a certificate are never asked: they
    /// have their own allowance ([`Limits::anonymous_connections`]).
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
    /// Connections kept on top of `max_connections` for peers with a certificate the handler
    /// calls privileged ([`Handler::privileged`]): a caller that holds every ordinary slot does
    /// not lock them out.
    pub reserved_connections: usize,
    /// Connections, on top of the others, for callers without a client certificate (on Nexus
    /// they can only ask `/health`). Each is served one request and closed, so a caller that
    /// never reads its answer holds one for the write deadline at most; they never take an
    /// ordinary or reserved slot, and `/health` answers while those are all taken.
    pub anonymous_connections: usize,
    /// Time allowed for an answer to reach the caller once writing it has to wait (the caller
    /// is not reading): past it the connection is closed. Without it, a caller that pipelines
    /// requests and never reads would hold its connection for good (the server reads no
    /// further request while it cannot write, so the read deadlines never start).
    pub write_timeout: Duration,
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
    /// `SPIKE_HTTP_SERVER_WRITE_TIMEOUT`, `SPIKE_HTTP_SERVER_TLS_HANDSHAKE_TIMEOUT`,
    /// `SPIKE_HTTP_SERVER_MAX_CONNECTIONS`, `SPIKE_HTTP_SERVER_RESERVED_CONNECTIONS`,
    /// `SPIKE_HTTP_SERVER_ANONYMOUS_CONNECTIONS`, `SPIKE_HTTP_SERVER_DRAIN_TIMEOUT`.
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
            anonymous_connections: number::<usize>(
                env,
                "SPIKE_HTTP_SERVER_ANONYMOUS_CONNECTIONS",
                d.anonymous_connections,
            )?,
            write_timeout: duration(env, "SPIKE_HTTP_SERVER_WRITE_TIMEOUT", d.write_timeout)?,
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
            anonymous_connections: 16,
            write_timeout: Duration::from_secs(10),
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
    let slots = Arc::new(Slots::new(&limits));
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
        let Some(handshake) = slots.for_handshake() else {
            tracing::warn!(%addr, max = limits.max_connections, reserved = limits.reserved_connections, anonymous = limits.anonymous_connections, "connection limit reached, closing new connection");
            refused(Refusal::ConnectionLimit);
            continue;
        };
        let open = conns.as_ref().map(Connections::opened);
        let conns = conns.clone();
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handler = Arc::clone(&handler);
        let watcher = graceful.watcher();
        let limits = limits.clone();
        let slots = Arc::clone(&slots);
        tokio::spawn(async move {
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
            let anonymous = peer.id.is_none();
            let _permit = match slots.admit(handshake, &peer, handler.as_ref()) {
                Ok(permit) => permit,
                Err((cause, why)) => {
                    tracing::warn!(%addr, max = limits.max_connections, "{why}");
                    refused(cause);
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let handler = Arc::clone(&handler);
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
            });
            let io = WriteDeadline::new(tls, limits.write_timeout);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                // A caller without a certificate gets one answer per connection: pipelined
                // requests it never reads cannot pile up behind it.
                .keep_alive(!anonymous)
                .serve_connection(TokioIo::new(io), service);
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

/// The connection slots of one server ([`Limits`]; the module docs say how they are used).
struct Slots {
    ordinary: Arc<Semaphore>,
    /// Held only during the handshakes of connections that found every ordinary slot taken;
    /// as many as the reserve and the anonymous allowance together.
    handshakes: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    anonymous: Arc<Semaphore>,
}

/// The slot a connection holds during its TLS handshake.
enum HandshakeSlot {
    /// An ordinary slot, kept afterwards by a peer with a certificate.
    Ordinary(OwnedSemaphorePermit),
    /// A handshake slot: given back once the handshake has shown who the peer is.
    Handshake(OwnedSemaphorePermit),
}

impl Slots {
    fn new(limits: &Limits) -> Slots {
        let handshakes = limits
            .reserved_connections
            .saturating_add(limits.anonymous_connections);
        Slots {
            ordinary: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(handshakes.min(Semaphore::MAX_PERMITS))),
            reserve: Arc::new(Semaphore::new(limits.reserved_connections)),
            anonymous: Arc::new(Semaphore::new(limits.anonymous_connections)),
        }
    }

    /// A slot for a new connection's handshake: an ordinary one, else a handshake slot.
    fn for_handshake(&self) -> Option<HandshakeSlot> {
        if let Ok(permit) = Arc::clone(&self.ordinary).try_acquire_owned() {
            return Some(HandshakeSlot::Ordinary(permit));
        }
        Arc::clone(&self.handshakes)
            .try_acquire_owned()
            .ok()
            .map(HandshakeSlot::Handshake)
    }

    /// The slot `peer` keeps for its connection once the handshake is done, or why it has
    /// none (the connection is closed).
    fn admit<H: Handler>(
        &self,
        handshake: HandshakeSlot,
        peer: &Peer,
        handler: &H,
    ) -> Result<OwnedSemaphorePermit, (Refusal, &'static str)> {
        if peer.id.is_none() {
            // Whatever slot the handshake used is given back.
            return Arc::clone(&self.anonymous)
                .try_acquire_owned()
                .map_err(|_| {
                    (
                        Refusal::AnonymousLimit,
                        "connection limit for callers without a certificate reached",
                    )
                });
        }
        match handshake {
            HandshakeSlot::Ordinary(permit) => Ok(permit),
            HandshakeSlot::Handshake(permit) => {
                drop(permit);
                if !handler.privileged(peer) {
                    return Err((
                        Refusal::ReservedForOperators,
                        "connection limit reached; the reserved connections are kept for operators",
                    ));
                }
                Arc::clone(&self.reserve).try_acquire_owned().map_err(|_| {
                    (
                        Refusal::ConnectionLimit,
                        "connection limit reached, and every reserved connection is taken",
                    )
                })
            }
        }
    }
}

/// A connection whose answers must reach the caller in time: once a write or a flush has to
/// wait (the caller is not reading), the buffered answers must be flushed within `limit`, or
/// every write fails with [`std::io::ErrorKind::TimedOut`] and hyper ends the connection. A
/// caller that reads slowly, without ever letting the server catch up, is cut off the same way.
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Running since the first write that had to wait; cleared by a completed flush.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            limit,
            waiting: None,
        }
    }

    /// Called when the connection could not take more: `Ready(error)` once the deadline
    /// has passed.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let timer = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the caller did not read its answer within {limit:?}"),
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.wait(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.wait(cx).map(Err),
            Poll::Ready(result) => {
                this.waiting = None;
                Poll::Ready(result)
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.wait(cx).map(Err),
            ready => ready,
        }
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
    json_bytes(status, Bytes::from(bytes))
}

/// A JSON response whose body holds key material (recovery shards): serialized into a buffer
/// reserved at its exact size, so no reallocation leaves a copy behind, and wiped when hyper
/// drops it once written (best effort: hyper's and rustls's own buffers are not ours to wipe).
pub fn json_secret<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    /// Counts what serializing writes, to reserve it exactly.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    if serde_json::to_writer(&mut count, body).is_ok() {
        bytes.reserve_exact(count.0);
        if serde_json::to_writer(&mut *bytes, body).is_err() {
            bytes.clear();
        }
    }
    if bytes.is_empty() {
        bytes.extend_from_slice(b"{}");
    }
    json_bytes(status, Bytes::from_owner(bytes))
}

/// Wipes a request body that held key material, if this is its only reference (best effort:
/// hyper's read buffers are not ours to wipe).
pub fn wipe_body(body: Bytes) {
    if let Ok(mut owned) = body.try_into_mut() {
        zeroize::Zeroize::zeroize(&mut owned[..]);
    }
}

fn json_bytes(status: StatusCode, bytes: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(bytes));
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;

    /// Calls peers whose SPIFFE ID ends in `/operator` privileged.
    struct Operators;

    impl Handler for Operators {
        async fn handle(&self, _: Request<Incoming>, _: Peer) -> Response<Full<Bytes>> {
            error(StatusCode::NOT_FOUND, "none")
        }

        fn privileged(&self, peer: &Peer) -> bool {
            peer.id
                .as_ref()
                .is_some_and(|id| id.to_string().ends_with("/operator"))
        }
    }

    fn peer(id: Option<&str>) -> Peer {
        Peer {
            id: id.map(|s| SpiffeId::parse(s).unwrap()),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        }
    }

    #[test]
    fn slots_reserve_for_operators_and_a_separate_allowance_for_anonymous_callers() {
        let limits = Limits {
            max_connections: 1,
            reserved_connections: 1,
            anonymous_connections: 1,
            ..Limits::default()
        };
        let slots = Slots::new(&limits);
        let (operator, workload) = (
            peer(Some("spiffe://spike.ist/operator")),
            peer(Some("spiffe://spike.ist/app/w")),
        );
        let anonymous = peer(None);
        // A caller without a certificate gives its ordinary handshake slot back.
        let first = slots.for_handshake().unwrap();
        assert!(matches!(first, HandshakeSlot::Ordinary(_)));
        let anon = slots.admit(first, &anonymous, &Operators).unwrap();
        // ... so a workload gets the ordinary slot, and keeps it.
        let second = slots.for_handshake().unwrap();
        assert!(matches!(second, HandshakeSlot::Ordinary(_)));
        let held = slots.admit(second, &workload, &Operators).unwrap();
        // Every ordinary slot taken: handshakes go on in handshake slots (reserve + allowance),
        // and only an operator may stay.
        let third = slots.for_handshake().unwrap();
        assert!(matches!(third, HandshakeSlot::Handshake(_)));
        assert!(slots.admit(third, &workload, &Operators).is_err());
        let fourth = slots.for_handshake().unwrap();
        assert!(
            slots.admit(fourth, &anonymous, &Operators).is_err(),
            "allowance full"
        );
        let fifth = slots.for_handshake().unwrap();
        let reserved = slots.admit(fifth, &operator, &Operators).unwrap();
        let sixth = slots.for_handshake().unwrap();
        assert!(
            slots.admit(sixth, &operator, &Operators).is_err(),
            "reserve full"
        );
        // Handshake slots come back once the handshake has decided.
        let a = slots.for_handshake().unwrap();
        let b = slots.for_handshake().unwrap();
        assert!(slots.for_handshake().is_none(), "two handshake slots");
        drop((a, b, anon, held, reserved));
    }

    #[tokio::test]
    async fn a_secret_answer_is_the_same_json_in_a_buffer_of_its_exact_size() {
        let body = serde_json::json!({"shards": {"1": [1, 2, 3], "2": [4, 5, 6]}});
        let plain = json(StatusCode::OK, &body).into_body().collect().await;
        let secret = json_secret(StatusCode::OK, &body)
            .into_body()
            .collect()
            .await;
        assert_eq!(plain.unwrap().to_bytes(), secret.unwrap().to_bytes());
    }

    #[tokio::test]
    async fn an_answer_the_caller_does_not_read_fails_at_the_write_deadline() {
        // A pipe whose reader never reads: writes fill its buffer, then wait.
        let (writer, _reader) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(writer, Duration::from_millis(200));
        let started = std::time::Instant::now();
        let result = tokio::io::AsyncWriteExt::write_all(&mut io, &[0u8; 4096]).await;
        let err = result.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
