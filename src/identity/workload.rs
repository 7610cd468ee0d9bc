//! This process's SVID from the SPIFFE Workload API (`SPIFFE_ENDPOINT_SOCKET`),
//! streamed and replaced as the agent rotates it.
//!
//! # Client: the `spiffe` crate, its low-level client only
//!
//! Decided 2026-12 (issue 14) between the `spiffe` crate and a hand-written
//! gRPC client on the published `workload.proto`:
//!
//! - `spiffe` (github.com/maxlambrecht/rust-spiffe, Apache-2.0) is kept up:
//!   0.16 → 0.19 within the last months, each release hardening response
//!   validation (empty SVID lists, missing bundles, PermissionDenied
//!   handling). It is what the SPIFFE project links for Rust.
//! - It fits the crypto rule: with `default-features = false,
//!   features = ["workload-api-x509"]` it has no TLS stack and no crypto
//!   provider at all (tonic 0.14 without its `tls-*` features, prost 0.14,
//!   x509-parser 0.18 — the version we already use — and `pkcs8` for parsing
//!   only). `cargo tree -i aws-lc-sys` / `-i aws-lc-rs` stay empty; rustls
//!   and ring remain ours alone.
//! - It needs no `protoc`: its generated code is checked in, it has no
//!   build script. It added 18 crates to our tree (tonic, prost and their
//!   helpers; h2, hyper, tower and url were already in it) and builds here.
//! - It sends the `workload.spiffe.io: true` header, accepts `unix:///path`
//!   and `unix:/path`, and returns the agent's `PermissionDenied` ("no
//!   identity issued") as its own error.
//!
//! A hand-written client would have meant our own HTTP/2 + gRPC framing,
//! status and trailer handling and prost messages: a few hundred lines to
//! keep correct against SPIRE, for no gain in dependencies (h2 is needed
//! either way).
//!
//! We use `WorkloadApiClient::stream_x509_contexts` (one `FetchX509SVID`
//! stream carries the SVIDs, each SVID's trust-domain bundle and the
//! federated bundles — go-spiffe's `X509Source` watches the same single
//! stream) and not the crate's `X509Source`: its reconnect policy withdraws
//! the SVID on `PermissionDenied`, while SPIKE (go-spiffe) keeps serving the
//! SVID it has until it expires, which is what §5 of issue 14 asks. Our
//! loop below owns retries, backoff and the [`IdentityState`].
//!
//! # Behaviour
//!
//! - The default SVID is the first in each response (SPIKE's and
//!   go-spiffe's rule); other SVIDs are ignored.
//! - Bundles are kept for the trust domains listed in the `SPIKE_TRUST_ROOT*`
//!   variables only ([`TrustRoots`]); others the agent sends (its own or
//!   federated) are ignored. A peer's chain is verified against the bundle of
//!   its own trust domain.
//! - At start, [`PendingIdentity::ready`] waits for the first response that
//!   has an SVID *and* a bundle for every configured trust domain, retrying
//!   with backoff and logging each failed attempt, up to
//!   [`WorkloadApiConfig::first_svid_timeout`]; then it returns
//!   [`Error::AgentTimeout`] with the last cause. A socket that is not a
//!   socket, or a server that does not implement the Workload API, fails at
//!   once ([`Error::WorkloadApi`]).
//! - Later, a broken stream is re-established with backoff; the SVID in use
//!   stays in use meanwhile, also when the agent says `PermissionDenied`,
//!   until it expires ([`IdentityState::Expired`]). An update that cannot be
//!   used is logged and skipped; one that lacks a configured trust domain's
//!   bundle is used (the SVID must rotate) and the missing domains are logged.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::WorkloadApiError;
use spiffe::transport::{Endpoint, GrpcStatusCode, TransportError};
use spiffe::workload_api::x509_context::X509Context;

use super::svid::{
    IdentityState, KeyProblem, Svid, SvidSource, Trust, anchors, cert_not_after, certified_key,
    format_utc,
};
use super::tls::peer_spiffe_id_in;
use super::trust::TrustRoots;
use super::{Error, Result};

/// `SPIFFE_ENDPOINT_SOCKET`: where the Workload API listens (SPIKE's name).
pub const ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";
/// The endpoint when neither `SPIFFE_ENDPOINT_SOCKET` nor SVID files are set:
/// SPIRE's default agent socket, SPIKE's default.
pub const DEFAULT_ENDPOINT: &str = "unix:///tmp/spire-agent/public/api.sock";
/// `SPIKE_SPIFFE_SOURCE_TIMEOUT`: how long to wait for the first SVID (SPIKE's name).
pub const SOURCE_TIMEOUT: &str = "SPIKE_SPIFFE_SOURCE_TIMEOUT";
/// Default for [`WorkloadApiConfig::first_svid_timeout`] (SPIKE's default).
pub const DEFAULT_FIRST_SVID_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`WorkloadApiConfig::answer_timeout`]: an agent answers a new
/// stream at once, with the SVID or `PermissionDenied`.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

const CONTEXT: &str = "the Workload API's SVID";

/// How to reach the Workload API and how patiently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadApiConfig {
    /// `SPIFFE_ENDPOINT_SOCKET` as given, for messages.
    pub endpoint: String,
    /// The unix socket it names.
    pub socket: PathBuf,
    /// How long [`PendingIdentity::ready`] waits for the first usable SVID
    /// (`SPIKE_SPIFFE_SOURCE_TIMEOUT`, default 30 s).
    pub first_svid_timeout: Duration,
    /// Delays between attempts to (re)open the stream.
    pub retry: Backoff,
    /// How long one attempt waits for the connection, the stream and its
    /// first message before it counts as failed ([`AgentProblem::NoAnswer`])
    /// and is retried: a socket that accepts and stays silent is named, not
    /// waited on in silence.
    pub answer_timeout: Duration,
    /// Nothing was configured and this is [`DEFAULT_ENDPOINT`]: a socket that
    /// does not exist fails at once, naming the variables, rather than being
    /// waited for.
    pub implicit: bool,
}

/// Exponential backoff: `initial`, doubled after each failed attempt, at most
/// `max`; back to `initial` once a stream has delivered an SVID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    /// 200 ms up to 5 s: a unix-socket connect is cheap, and an agent that
    /// comes back should be noticed within seconds.
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

impl WorkloadApiConfig {
    /// Parses `SPIFFE_ENDPOINT_SOCKET`: `unix:///absolute/path` or
    /// `unix:/absolute/path`. Defaults for the rest.
    pub fn parse(endpoint: &str) -> Result<WorkloadApiConfig> {
        Ok(WorkloadApiConfig {
            endpoint: endpoint.trim().to_string(),
            socket: parse_endpoint(endpoint)?,
            first_svid_timeout: DEFAULT_FIRST_SVID_TIMEOUT,
            retry: Backoff::default(),
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
            implicit: false,
        })
    }

    /// [`DEFAULT_ENDPOINT`], for a process given no identity source (SPIKE's
    /// default).
    pub fn spire_default() -> WorkloadApiConfig {
        WorkloadApiConfig {
            implicit: true,
            ..WorkloadApiConfig::parse(DEFAULT_ENDPOINT)
                .unwrap_or_else(|_| unreachable!("the default endpoint parses"))
        }
    }
}

/// The socket path of a `unix:` endpoint. TCP endpoints are refused: SPIRE
/// agents serve workloads on a unix socket, which is also what lets them
/// attest the calling process.
pub fn parse_endpoint(value: &str) -> Result<PathBuf> {
    let value = value.trim();
    let bad = |reason: &str| Error::BadEndpoint {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let path = if let Some(rest) = value.strip_prefix("unix://") {
        if !rest.starts_with('/') {
            return Err(bad(
                "unix:// takes no host: write unix:///absolute/path (three slashes) or unix:/absolute/path",
            ));
        }
        rest
    } else if let Some(rest) = value.strip_prefix("unix:") {
        if !rest.starts_with('/') {
            return Err(bad(
                "the socket path must be absolute (unix:///path/to/api.sock)",
            ));
        }
        rest
    } else if value.starts_with("tcp:") {
        return Err(bad(
            "TCP endpoints are not supported: give the agent's unix socket, e.g. unix:///tmp/spire-agent/public/api.sock",
        ));
    } else {
        return Err(bad(
            "expected unix:///path/to/api.sock (e.g. unix:///tmp/spire-agent/public/api.sock)",
        ));
    };
    if path.contains(['?', '#']) {
        return Err(bad("a query or fragment is not allowed in the socket URI"));
    }
    if path.trim_end_matches('/').is_empty() {
        return Err(bad("the socket path is empty"));
    }
    Ok(PathBuf::from(path))
}

/// Why the Workload API gave no usable SVID, in words for an operator.
// Each variant's fields are named in its message.
#[allow(missing_docs)]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentProblem {
    /// Nothing at the socket path: the agent is not running (yet), or the
    /// path is wrong.
    NoSocket { path: PathBuf },
    /// No identity source was configured, and nothing is at SPIRE's default
    /// socket path either.
    NothingConfigured { path: PathBuf },
    /// The path exists but is no unix socket.
    NotASocket { path: PathBuf },
    /// The socket did not accept the connection or the HTTP/2 handshake.
    Connect { reason: String },
    /// The socket took the connection but nothing answered within
    /// [`WorkloadApiConfig::answer_timeout`].
    NoAnswer { waited: Duration },
    /// Something answers, but not the Workload API.
    NotWorkloadApi { reason: String },
    /// The agent knows of no SVID for this process (`PermissionDenied`).
    NoIdentity { message: String },
    /// Another gRPC status (an agent that dies mid-stream shows as `UNKNOWN`,
    /// "h2 protocol error").
    Status { code: String, message: String },
    /// The agent ended the stream.
    StreamEnded,
    /// A response that cannot be used.
    BadResponse { reason: String },
    /// The response has an SVID but no bundle for configured trust domains.
    MissingBundles {
        svid: String,
        /// Each missing trust domain with the variables that list it.
        missing: Vec<(String, Vec<&'static str>)>,
        /// The trust domains the agent did send bundles for.
        sent: Vec<String>,
    },
}

impl AgentProblem {
    /// Problems that retrying cannot fix, before the first SVID.
    fn is_permanent(&self) -> bool {
        matches!(
            self,
            AgentProblem::NotASocket { .. }
                | AgentProblem::NotWorkloadApi { .. }
                | AgentProblem::NothingConfigured { .. }
        )
    }
}

impl fmt::Display for AgentProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentProblem::NoSocket { path } => write!(
                f,
                "socket {} does not exist (is the SPIRE agent running, and is this its Workload API socket?)",
                path.display()
            ),
            AgentProblem::NothingConfigured { path } => write!(
                f,
                "no identity source: {ENDPOINT_SOCKET} is unset and SPIRE's default socket {} does not exist; set {ENDPOINT_SOCKET} to the agent's Workload API socket, or SPIKE_SVID_DIR to a directory holding svid.pem, svid_key.pem and svid_bundle.pem",
                path.display()
            ),
            AgentProblem::NotASocket { path } => {
                write!(f, "{} exists but is not a unix socket", path.display())
            }
            AgentProblem::Connect { reason } => write!(
                f,
                "cannot connect: {reason} (the agent is not running, or {ENDPOINT_SOCKET} names no SPIFFE Workload API)"
            ),
            AgentProblem::NoAnswer { waited } => write!(
                f,
                "the socket took the connection but nothing answered the Workload API call within {} (an agent still starting or hung, or no SPIFFE Workload API)",
                super::humantime(*waited)
            ),
            AgentProblem::NotWorkloadApi { reason } => write!(
                f,
                "the socket does not serve the SPIFFE Workload API ({reason}); point {ENDPOINT_SOCKET} at the agent's Workload API socket"
            ),
            AgentProblem::NoIdentity { message } => write!(
                f,
                "the agent has no SVID for this process (PermissionDenied: {message}); register this workload with SPIRE (an entry whose selectors match this process) or wait for the agent to sync it"
            ),
            // Every status but PermissionDenied, Unimplemented and InvalidArgument (sorted
            // out above) means the agent failed or is not one: an HTTP/1 server, or a server
            // that hangs up, shows as INTERNAL, UNKNOWN or CANCELLED depending on timing.
            AgentProblem::Status { code, message } => write!(
                f,
                "the stream failed with gRPC {code}: {message} (the agent failed, or {ENDPOINT_SOCKET} names no SPIFFE Workload API)"
            ),
            AgentProblem::StreamEnded => write!(
                f,
                "the agent closed the stream (it stopped, or {ENDPOINT_SOCKET} names no SPIFFE Workload API)"
            ),
            AgentProblem::BadResponse { reason } => write!(f, "unusable response: {reason}"),
            AgentProblem::MissingBundles {
                svid,
                missing,
                sent,
            } => {
                let missing: Vec<String> = missing
                    .iter()
                    .map(|(td, vars)| format!("{td} (listed in {})", vars.join(", ")))
                    .collect();
                write!(
                    f,
                    "the agent sent SVID {svid} but no trust bundle for {}; it sent bundles for {}. List only trust domains this agent belongs to or federates with",
                    missing.join(", "),
                    if sent.is_empty() {
                        "none".to_string()
                    } else {
                        sent.join(", ")
                    }
                )
            }
        }
    }
}

/// Every message of an error and its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

fn problem_of(e: &WorkloadApiError) -> AgentProblem {
    match e {
        WorkloadApiError::NoIdentityIssued => AgentProblem::NoIdentity {
            message: "no identity issued".into(),
        },
        WorkloadApiError::PermissionDenied(m) => AgentProblem::NoIdentity { message: m.clone() },
        WorkloadApiError::Transport(TransportError::Status(s)) => match s.code() {
            GrpcStatusCode::Unimplemented => AgentProblem::NotWorkloadApi {
                reason: format!("gRPC UNIMPLEMENTED for FetchX509SVID: {}", s.message()),
            },
            // We always send the security header; an agent that still says
            // InvalidArgument is no Workload API we can talk to.
            GrpcStatusCode::InvalidArgument => AgentProblem::NotWorkloadApi {
                reason: format!("gRPC INVALID_ARGUMENT: {}", s.message()),
            },
            code => AgentProblem::Status {
                code: code.as_str().to_ascii_uppercase(),
                message: s.message().to_string(),
            },
        },
        WorkloadApiError::Transport(other) => AgentProblem::Connect {
            reason: chain(other),
        },
        other => AgentProblem::BadResponse {
            reason: chain(other),
        },
    }
}

/// An update turned into our types.
struct Update {
    svid: Svid,
    /// Configured trust domains without a bundle in the update.
    missing: Vec<String>,
    /// Trust domains the agent sent that no variable lists.
    ignored: Vec<String>,
}

fn bad(reason: impl Into<String>) -> AgentProblem {
    AgentProblem::BadResponse {
        reason: reason.into(),
    }
}

/// The default SVID of `ctx` with the bundles of the configured trust domains.
fn build(ctx: &X509Context, trust: &TrustRoots) -> std::result::Result<Update, AgentProblem> {
    let default = ctx
        .default_svid()
        .ok_or_else(|| bad("no SVID in the response"))?;
    let chain: Vec<CertificateDer<'static>> = default
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let leaf = chain
        .first()
        .ok_or_else(|| bad("empty certificate chain"))?;
    let id = peer_spiffe_id_in(leaf, CONTEXT).map_err(|e| bad(e.to_string()))?;
    let not_after = cert_not_after(leaf, CONTEXT).map_err(|e| bad(e.to_string()))?;
    // Borrowed from the crate's PrivateKey, which is zeroized on drop: no other copy.
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(default.private_key().as_bytes()));
    let certified = certified_key(chain.clone(), &key).map_err(|p| match p {
        KeyProblem::Unsupported(r) => bad(format!("unusable private key: {r}")),
        KeyProblem::Mismatch => bad("the private key does not match the SVID"),
        KeyProblem::Other(r) => bad(r),
    })?;

    let mut per_domain = BTreeMap::new();
    let mut own_bundle = Vec::new();
    let mut ignored = Vec::new();
    for (td, bundle) in ctx.bundle_set().iter() {
        let td = td.as_str();
        let certs: Vec<CertificateDer<'static>> = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        if td == id.trust_domain() {
            own_bundle.clone_from(&certs);
        }
        if !trust.contains(td) {
            ignored.push(td.to_string());
            continue;
        }
        let roots = anchors(&certs, &format!("the Workload API's bundle for {td}"))
            .map_err(|e| bad(e.to_string()))?;
        if !roots.is_empty() {
            per_domain.insert(td.to_string(), roots);
        }
    }
    let missing = trust
        .all_domains()
        .into_iter()
        .filter(|td| !per_domain.contains_key(*td))
        .map(str::to_string)
        .collect();
    Ok(Update {
        svid: Svid::from_parts(
            id,
            chain,
            own_bundle,
            Trust::PerDomain(per_domain),
            certified,
            not_after,
        ),
        missing,
        ignored,
    })
}

/// What the stream task and the holders of the source share.
struct Shared {
    /// `SPIFFE_ENDPOINT_SOCKET` as given.
    endpoint: String,
    socket: PathBuf,
    /// [`WorkloadApiConfig::implicit`]
    implicit: bool,
    trust: TrustRoots,
    /// The SVID in use; `None` until the first usable update.
    current: RwLock<Option<Arc<Svid>>>,
    /// Why the last attempt or update failed; `None` while all is well.
    problem: Mutex<Option<AgentProblem>>,
    /// A problem retrying will not fix, found before the first SVID: the
    /// task has stopped.
    fatal: Mutex<Option<AgentProblem>>,
    /// Bumped on every change above, to wake [`PendingIdentity::ready`].
    changed: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn current(&self) -> Option<Arc<Svid>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn set_problem(&self, p: Option<AgentProblem>) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = p;
        self.notify();
    }

    fn problem(&self) -> Option<AgentProblem> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes in one update; true if its SVID is now in use.
    fn apply(&self, ctx: &X509Context) -> bool {
        let update = match build(ctx, &self.trust) {
            Ok(u) => u,
            Err(p) => {
                tracing::warn!(
                    endpoint = %self.endpoint,
                    "ignoring an update from the SPIFFE Workload API: {p}"
                );
                self.set_problem(Some(p));
                return false;
            }
        };
        let before = self.current();
        if !update.missing.is_empty() {
            let p = AgentProblem::MissingBundles {
                svid: update.svid.id().to_string(),
                missing: update
                    .missing
                    .iter()
                    .map(|td| (td.clone(), self.trust.variables_listing(td)))
                    .collect(),
                sent: ctx
                    .bundle_set()
                    .iter()
                    .map(|(td, _)| td.as_str().to_string())
                    .collect(),
            };
            if before.is_none() {
                tracing::warn!(endpoint = %self.endpoint, "waiting for a complete update: {p}");
                self.set_problem(Some(p));
                return false;
            }
            tracing::warn!(
                endpoint = %self.endpoint,
                "{p}; peers from those trust domains will be refused until it does"
            );
        }
        let svid = update.svid;
        let rotated = before
            .as_ref()
            .is_none_or(|b| b.cert_chain().first() != svid.cert_chain().first());
        let state = IdentityState::of(svid.not_after(), SystemTime::now());
        if rotated {
            tracing::info!(
                endpoint = %self.endpoint,
                id = %svid.id(),
                bundles = ?svid.bundle_domains().unwrap_or_default(),
                ignored = ?update.ignored,
                "SVID from the SPIFFE Workload API: {}, valid until {}",
                svid.id(),
                format_utc(svid.not_after())
            );
        }
        if !rotated && before.as_ref().is_some_and(|b| !b.same_trust(&svid)) {
            tracing::info!(
                endpoint = %self.endpoint,
                bundles = ?svid.bundle_domains().unwrap_or_default(),
                ignored = ?update.ignored,
                "trust bundles from the SPIFFE Workload API changed; new handshakes use them"
            );
        }
        if !state.is_ready() {
            tracing::error!(
                endpoint = %self.endpoint,
                "the SPIFFE Workload API sent SVID {} which has already expired ({state})",
                svid.id()
            );
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(svid));
        self.set_problem(None);
        true
    }
}

async fn check_socket(path: &Path) -> std::result::Result<(), AgentProblem> {
    use std::os::unix::fs::FileTypeExt;
    match tokio::fs::metadata(path).await {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(AgentProblem::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(AgentProblem::NoSocket {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(AgentProblem::Connect {
            reason: format!("cannot inspect {}: {e}", path.display()),
        }),
    }
}

/// One connection and stream, until it ends; returns why, and whether it
/// delivered a usable SVID.
async fn session(shared: &Shared, answer_timeout: Duration) -> (AgentProblem, bool) {
    if let Err(p) = check_socket(&shared.socket).await {
        let p = match p {
            AgentProblem::NoSocket { path } if shared.implicit && shared.current().is_none() => {
                AgentProblem::NothingConfigured { path }
            }
            p => p,
        };
        return (p, false);
    }
    let no_answer = AgentProblem::NoAnswer {
        waited: answer_timeout,
    };
    let deadline = tokio::time::Instant::now() + answer_timeout;
    let opening = async {
        let client = spiffe::WorkloadApiClient::connect(Endpoint::Unix(shared.socket.clone()))
            .await
            .map_err(|e| problem_of(&e))?;
        client
            .stream_x509_contexts()
            .await
            .map_err(|e| problem_of(&e))
    };
    let stream = match tokio::time::timeout_at(deadline, opening).await {
        Ok(Ok(s)) => s,
        Ok(Err(p)) => return (p, false),
        Err(_) => return (no_answer, false),
    };
    let mut stream = std::pin::pin!(stream);
    let mut delivered = false;
    let mut answered = false;
    loop {
        // The first message is due at once; later ones come when something changes.
        let next = if answered {
            stream.next().await
        } else {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(next) => next,
                Err(_) => return (no_answer, false),
            }
        };
        answered = true;
        match next {
            None => return (AgentProblem::StreamEnded, delivered),
            Some(Err(e)) => return (problem_of(&e), delivered),
            Some(Ok(ctx)) => delivered |= shared.apply(&ctx),
        }
    }
}

/// Opens the stream again and again, for as long as the source lives.
async fn supervise(shared: Arc<Shared>, retry: Backoff, answer_timeout: Duration) {
    let mut delay = retry.initial;
    let mut expiry_reported: Option<SystemTime> = None;
    loop {
        let (problem, delivered) = session(&shared, answer_timeout).await;
        if delivered {
            delay = retry.initial;
        }
        match shared.current() {
            None if problem.is_permanent() => {
                *shared.fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(problem.clone());
                shared.set_problem(Some(problem));
                return;
            }
            None => {
                tracing::warn!(
                    endpoint = %shared.endpoint,
                    "no SVID from the SPIFFE Workload API yet: {problem}; retrying in {delay:?}"
                );
                // systemctl status says what the process waits for (a no-op without systemd).
                crate::platform::systemd::status(&format!(
                    "waiting for an SVID from the SPIFFE Workload API: {problem}"
                ));
            }
            Some(svid) => match IdentityState::of(svid.not_after(), SystemTime::now()) {
                IdentityState::Expired { not_after } if expiry_reported != Some(not_after) => {
                    expiry_reported = Some(not_after);
                    tracing::error!(
                        endpoint = %shared.endpoint,
                        "SVID {} expired at {} and the SPIFFE Workload API has not replaced it: {problem}; retrying in {delay:?}",
                        svid.id(),
                        format_utc(not_after)
                    );
                }
                state => tracing::warn!(
                    endpoint = %shared.endpoint,
                    "SPIFFE Workload API stream lost: {problem}; still using SVID {} ({state}); reconnecting in {delay:?}",
                    svid.id()
                ),
            },
        }
        shared.set_problem(Some(problem));
        tokio::time::sleep(delay).await;
        delay = delay.saturating_mul(2).min(retry.max);
    }
}

/// Aborts the stream task when dropped.
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The Workload API source once it has an SVID; lives inside [`SvidSource`].
pub(super) struct Running {
    shared: Arc<Shared>,
    /// The first SVID: `shared.current` is never `None` again after it, this
    /// only spares an `unwrap`.
    initial: Arc<Svid>,
    _task: TaskGuard,
}

impl Running {
    pub(super) fn current(&self) -> Arc<Svid> {
        self.shared
            .current()
            .unwrap_or_else(|| Arc::clone(&self.initial))
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.shared.endpoint
    }

    pub(super) fn problem(&self) -> Option<AgentProblem> {
        self.shared.problem()
    }
}

/// A Workload API source waiting for its first SVID. Dropping it stops the
/// stream task.
pub struct PendingIdentity {
    shared: Arc<Shared>,
    task: TaskGuard,
    timeout: Duration,
}

impl fmt::Debug for PendingIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingIdentity")
            .field("endpoint", &self.shared.endpoint)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Starts streaming SVIDs from the Workload API (inside a tokio runtime).
/// Nothing fails here; [`PendingIdentity::ready`] reports.
pub fn start(config: WorkloadApiConfig, trust: TrustRoots) -> PendingIdentity {
    if config.implicit {
        tracing::info!(
            endpoint = %config.endpoint,
            "{ENDPOINT_SOCKET} and SPIKE_SVID_* are unset: taking this process's identity from SPIRE's default Workload API socket"
        );
    }
    let (changed, _) = tokio::sync::watch::channel(0);
    let shared = Arc::new(Shared {
        endpoint: config.endpoint,
        socket: config.socket,
        implicit: config.implicit,
        trust,
        current: RwLock::new(None),
        problem: Mutex::new(None),
        fatal: Mutex::new(None),
        changed,
    });
    let task = TaskGuard(tokio::spawn(supervise(
        Arc::clone(&shared),
        config.retry,
        config.answer_timeout,
    )));
    PendingIdentity {
        shared,
        task,
        timeout: config.first_svid_timeout,
    }
}

impl PendingIdentity {
    /// `WaitingForAgent` until the first usable SVID, then its expiry state.
    pub fn state(&self) -> IdentityState {
        match self.shared.current() {
            None => IdentityState::WaitingForAgent,
            Some(svid) => IdentityState::of(svid.not_after(), SystemTime::now()),
        }
    }

    /// Why there is no SVID yet, if an attempt has failed.
    pub fn problem(&self) -> Option<AgentProblem> {
        self.shared.problem()
    }

    /// Waits for the first usable SVID, at most the configured timeout.
    /// Errors: [`Error::AgentTimeout`] (with the last problem seen) when the
    /// time is up, [`Error::WorkloadApi`] at once for a problem retrying
    /// cannot fix.
    pub async fn ready(self) -> Result<Arc<SvidSource>> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut changes = self.shared.changed.subscribe();
        loop {
            if let Some(initial) = self.shared.current() {
                return Ok(SvidSource::from_workload_api(Running {
                    shared: self.shared,
                    initial,
                    _task: self.task,
                }));
            }
            let fatal = self
                .shared
                .fatal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(problem) = fatal {
                if let AgentProblem::NothingConfigured { .. } = problem {
                    return Err(Error::NoIdentitySource { problem });
                }
                return Err(Error::WorkloadApi {
                    endpoint: self.shared.endpoint.clone(),
                    problem,
                });
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // The task ended without a verdict (it never does); or the time is up.
                Ok(Err(_)) | Err(_) => {
                    // No problem yet: the one attempt so far is still waiting for an answer.
                    let problem = self.shared.problem().unwrap_or(AgentProblem::NoAnswer {
                        waited: self.timeout,
                    });
                    return Err(Error::AgentTimeout {
                        endpoint: self.shared.endpoint.clone(),
                        waited: self.timeout,
                        problem: Some(problem),
                    });
                }
            }
        }
    }
}

impl SvidSource {
    /// Streams this process's SVID from the Workload API, waiting for the
    /// first one as [`PendingIdentity::ready`] does. Must run inside a tokio
    /// runtime; the stream task lives as long as the returned source.
    pub async fn workload_api(
        config: WorkloadApiConfig,
        trust: TrustRoots,
    ) -> Result<Arc<SvidSource>> {
        start(config, trust).ready().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests;
