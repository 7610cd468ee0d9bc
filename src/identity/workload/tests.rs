//! Stream handling against an in-process fake agent: rotation, stream breaks,
//! PermissionDenied, bad sockets, missing bundles. The fake speaks just enough
//! gRPC (HTTP/2, length-prefixed protobuf, `grpc-status`) for
//! `FetchX509SVID`; the real agent is exercised by the SPIRE integration tests.

use super::*;
use crate::identity::tls::tests::handshake;
use crate::identity::trust::{TRUST_ROOT, TRUST_ROOT_PILOT};
use crate::identity::{ClientAuth, ExpectedPeer, Role, SpiffeId, pki};

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use tokio::net::UnixListener;
use tokio::sync::broadcast;

/// `X509SVIDResponse` of the published `workload.proto`.
#[derive(Clone, PartialEq, prost::Message)]
struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    svids: Vec<X509SvidMsg>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    crl: Vec<Vec<u8>>,
    /// Keyed by the trust domain's SPIFFE ID (`spiffe://fed.org`), as SPIRE does.
    #[prost(map = "string, bytes", tag = "3")]
    federated_bundles: HashMap<String, Vec<u8>>,
}

/// `X509SVID` of the published `workload.proto`.
#[derive(Clone, PartialEq, prost::Message)]
struct X509SvidMsg {
    #[prost(string, tag = "1")]
    spiffe_id: String,
    #[prost(bytes = "vec", tag = "2")]
    x509_svid: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    x509_svid_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    hint: String,
}

fn der_of_pem(pem: &[u8]) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem)
        .flat_map(|c| c.unwrap().to_vec())
        .collect()
}

/// A trust domain's CA, minting SVIDs the way the agent hands them out.
struct Ca {
    tmp: tempfile::TempDir,
    td: String,
    issued: AtomicUsize,
}

impl Ca {
    fn new(td: &str) -> Ca {
        let tmp = tempfile::tempdir().unwrap();
        pki::init(&tmp.path().join("ca"), td).unwrap();
        Ca {
            tmp,
            td: td.to_string(),
            issued: AtomicUsize::new(0),
        }
    }

    fn bundle(&self) -> Vec<u8> {
        der_of_pem(&std::fs::read(self.tmp.path().join("ca/ca.pem")).unwrap())
    }

    fn svid_valid(&self, path: &str, not_before: SystemTime, not_after: SystemTime) -> X509SvidMsg {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let out = self.tmp.path().join(format!("svid{n}"));
        let id = format!("spiffe://{}{path}", self.td);
        pki::issue_with_validity(
            &self.tmp.path().join("ca"),
            &SpiffeId::parse(&id).unwrap(),
            &out,
            &[],
            &[],
            not_before,
            not_after,
        )
        .unwrap();
        let key = std::fs::read(out.join("svid_key.pem")).unwrap();
        let key = PrivatePkcs8KeyDer::from_pem_slice(&key).unwrap();
        X509SvidMsg {
            spiffe_id: id,
            x509_svid: der_of_pem(&std::fs::read(out.join("svid.pem")).unwrap()),
            x509_svid_key: key.secret_pkcs8_der().to_vec(),
            bundle: self.bundle(),
            hint: String::new(),
        }
    }

    fn svid(&self, path: &str) -> X509SvidMsg {
        let now = SystemTime::now();
        self.svid_valid(
            path,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
    }
}

fn response(svids: Vec<X509SvidMsg>, federated: &[&Ca]) -> X509SvidResponse {
    X509SvidResponse {
        svids,
        crl: vec![],
        federated_bundles: federated
            .iter()
            .map(|ca| (format!("spiffe://{}", ca.td), ca.bundle()))
            .collect(),
    }
}

/// What the fake agent answers `FetchX509SVID` with.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// The latest response, then every later one, on an open stream.
    Serve,
    /// `PermissionDenied` with this message (SPIRE: "no identity issued").
    Deny(&'static str),
    /// `Unimplemented`, as any other gRPC server would.
    Unimplemented,
}

struct AgentState {
    mode: Mode,
    /// The gRPC frame of the latest response, sent first on each new stream.
    latest: Option<Bytes>,
}

/// An in-process Workload API on a unix socket.
struct Agent {
    path: PathBuf,
    state: Arc<Mutex<AgentState>>,
    updates: broadcast::Sender<Bytes>,
    /// The accept loop, which owns every connection: aborting it drops them all.
    server: Option<tokio::task::JoinHandle<()>>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn grpc_frame(msg: &X509SvidResponse) -> Bytes {
    use prost::Message;
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// A trailers-only gRPC answer: the status in the response headers.
fn grpc_status(code: u8, message: &str) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", message)
        .body(Empty::new().boxed_unsync())
        .unwrap()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<AgentState>>,
    updates: broadcast::Sender<Bytes>,
) -> std::result::Result<Response<Body>, Infallible> {
    if req.uri().path() != "/SpiffeWorkloadAPI/FetchX509SVID" {
        return Ok(grpc_status(12, "unknown method"));
    }
    if req
        .headers()
        .get("workload.spiffe.io")
        .map(|v| v.as_bytes())
        != Some(b"true")
    {
        return Ok(grpc_status(3, "security header missing from request"));
    }
    let (mode, latest) = {
        let s = state.lock().unwrap();
        (s.mode, s.latest.clone())
    };
    match mode {
        Mode::Deny(message) => return Ok(grpc_status(7, message)),
        Mode::Unimplemented => return Ok(grpc_status(12, "unknown service SpiffeWorkloadAPI")),
        Mode::Serve => {}
    }
    let rx = updates.subscribe();
    let frames = futures_util::stream::unfold((latest, rx), |(first, mut rx)| async move {
        if let Some(f) = first {
            return Some((Ok(Frame::data(f)), (None, rx)));
        }
        loop {
            match rx.recv().await {
                Ok(f) => return Some((Ok(Frame::data(f)), (None, rx))),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(frames).boxed_unsync())
        .unwrap())
}

async fn serve(
    listener: UnixListener,
    state: Arc<Mutex<AgentState>>,
    updates: broadcast::Sender<Bytes>,
) {
    let mut conns = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let (state, updates) = (Arc::clone(&state), updates.clone());
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                handle(req, Arc::clone(&state), updates.clone())
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
}

impl Agent {
    fn start(path: &Path) -> Agent {
        let mut agent = Agent {
            path: path.to_path_buf(),
            state: Arc::new(Mutex::new(AgentState {
                mode: Mode::Serve,
                latest: None,
            })),
            updates: broadcast::channel(16).0,
            server: None,
        };
        agent.restart();
        agent
    }

    /// Binds the socket again and serves (after [`stop`](Self::stop)).
    fn restart(&mut self) {
        let listener = UnixListener::bind(&self.path).unwrap();
        self.server = Some(tokio::spawn(serve(
            listener,
            Arc::clone(&self.state),
            self.updates.clone(),
        )));
    }

    /// The agent goes away: every connection drops, the socket disappears.
    fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }

    fn send(&self, msg: &X509SvidResponse) {
        let frame = grpc_frame(msg);
        self.state.lock().unwrap().latest = Some(frame.clone());
        let _ = self.updates.send(frame);
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(path: &Path, timeout: Duration) -> WorkloadApiConfig {
    WorkloadApiConfig {
        endpoint: format!("unix://{}", path.display()),
        socket: path.to_path_buf(),
        first_svid_timeout: timeout,
        retry: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
        answer_timeout: Duration::from_secs(5),
        implicit: false,
    }
}

fn roots(vars: &[(&str, &str)]) -> TrustRoots {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    TrustRoots::from_lookup(&|n| map.get(n).cloned()).unwrap()
}

/// Waits (up to 10 s) until `cond` holds.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn socket_in(tmp: &tempfile::TempDir) -> PathBuf {
    tmp.path().join("api.sock")
}

#[tokio::test]
async fn default_svid_rotation_and_configured_bundles() {
    let tmp = tempfile::tempdir().unwrap();
    let (spike, fed, other) = (
        Ca::new("spike.ist"),
        Ca::new("fed.org"),
        Ca::new("other.org"),
    );
    let agent = Agent::start(&socket_in(&tmp));
    agent.send(&response(
        vec![spike.svid("/spike/nexus"), spike.svid("/second")],
        &[&fed, &other],
    ));
    let trust = roots(&[(TRUST_ROOT, "spike.ist"), (TRUST_ROOT_PILOT, "fed.org")]);
    let source = SvidSource::workload_api(config(&socket_in(&tmp), Duration::from_secs(10)), trust)
        .await
        .unwrap();
    let svid = source.current();
    // The first SVID of the response is the default one.
    assert_eq!(svid.id().as_str(), "spiffe://spike.ist/spike/nexus");
    // other.org is in no SPIKE_TRUST_ROOT* list: its bundle is not kept.
    assert_eq!(svid.bundle_domains().unwrap(), ["fed.org", "spike.ist"]);
    assert_eq!(svid.bundle(), [CertificateDer::from(spike.bundle())]);
    assert!(source.state().is_ready());
    assert!(source.agent_problem().is_none());
    assert!(
        source
            .describe()
            .starts_with("SPIFFE Workload API unix:///"),
        "{}",
        source.describe()
    );
    assert!(source.paths().is_none());
    assert!(!source.reload_if_changed().unwrap());
    let dbg = format!("{source:?}");
    assert!(
        dbg.contains("redacted") && !dbg.contains("PRIVATE"),
        "{dbg}"
    );

    agent.send(&response(vec![spike.svid("/spike/nexus/2")], &[&fed]));
    eventually("the rotated SVID is in use", || {
        source.current().id().as_str() == "spiffe://spike.ist/spike/nexus/2"
    })
    .await;
}

#[tokio::test]
async fn new_handshakes_use_the_streamed_svid_and_bundles() {
    let tmp = tempfile::tempdir().unwrap();
    let (spike, fed) = (Ca::new("spike.ist"), Ca::new("fed.org"));
    let agent = Agent::start(&socket_in(&tmp));
    agent.send(&response(vec![spike.svid("/spike/keeper/1")], &[&fed]));
    let trust = roots(&[(TRUST_ROOT, "spike.ist"), (TRUST_ROOT_PILOT, "fed.org")]);
    let keeper = SvidSource::workload_api(
        config(&socket_in(&tmp), Duration::from_secs(10)),
        trust.clone(),
    )
    .await
    .unwrap();
    let server = crate::identity::server_config_for(&keeper, &trust, ClientAuth::Optional).unwrap();

    // An operator of the federated trust domain, verified with its own bundle.
    let op_tmp = tempfile::tempdir().unwrap();
    let op = write_files(&op_tmp, &fed.svid("/spike/pilot/role/superuser"));
    let client = crate::identity::client_config_for(
        Some(&op),
        Some(vec![CertificateDer::from(spike.bundle())]),
        &trust,
        ExpectedPeer::Role(Role::Keeper),
    )
    .unwrap();
    let (s, c) = handshake(server.clone(), client.clone(), "localhost").await;
    c.unwrap();
    let peer = s.unwrap().unwrap();
    assert_eq!(trust.role_of(&peer), Some(Role::Superuser));

    // A CA federated for fed.org cannot vouch for spike.ist IDs: each peer's
    // chain is checked against its own trust domain's bundle only.
    let impostor = Ca::new("spike.ist");
    let mut msg = response(vec![spike.svid("/spike/keeper/1")], &[]);
    msg.federated_bundles
        .insert("spiffe://fed.org".into(), impostor.bundle());
    agent.send(&msg);
    eventually("impostor bundle in place", || {
        server_sees_fed_as(&keeper, &impostor)
    })
    .await;
    let fake_tmp = tempfile::tempdir().unwrap();
    let fake = write_files(&fake_tmp, &impostor.svid("/spike/pilot/role/superuser"));
    let fake_client = crate::identity::client_config_for(
        Some(&fake),
        Some(vec![CertificateDer::from(spike.bundle())]),
        &trust,
        ExpectedPeer::Any,
    )
    .unwrap();
    let (s, _) = handshake(server.clone(), fake_client, "localhost").await;
    let err = s.unwrap_err();
    assert!(err.contains("BadSignature"), "{err}");
    agent.send(&response(vec![spike.svid("/spike/keeper/1")], &[&fed]));
    eventually("real federation back", || server_sees_fed_as(&keeper, &fed)).await;

    // The agent rotates the server to a Nexus SVID: the next handshake shows it.
    agent.send(&response(vec![spike.svid("/spike/nexus")], &[&fed]));
    eventually("rotated", || {
        keeper.current().id().as_str() == "spiffe://spike.ist/spike/nexus"
    })
    .await;
    // A fresh client: the old one would resume its TLS session, and a
    // resumed session is not verified again.
    let client = crate::identity::client_config_for(
        Some(&op),
        Some(vec![CertificateDer::from(spike.bundle())]),
        &trust,
        ExpectedPeer::Role(Role::Keeper),
    )
    .unwrap();
    let (s, c) = handshake(server.clone(), client, "localhost").await;
    assert!(c.unwrap_err().contains("not allowed"));
    assert!(s.is_err());

    // The federation is withdrawn: fed.org peers are refused from then on.
    agent.send(&response(vec![spike.svid("/spike/nexus")], &[]));
    eventually("federated bundle gone", || {
        keeper.current().bundle_domains().unwrap() == ["spike.ist"]
    })
    .await;
    let client = crate::identity::client_config_for(
        Some(&op),
        Some(vec![CertificateDer::from(spike.bundle())]),
        &trust,
        ExpectedPeer::Any,
    )
    .unwrap();
    let (s, _) = handshake(server, client, "localhost").await;
    let err = s.unwrap_err();
    assert!(
        err.contains("no trust bundle for trust domain fed.org"),
        "{err}"
    );
}

/// True if `source` holds `ca`'s certificate as the fed.org bundle.
fn server_sees_fed_as(source: &SvidSource, ca: &Ca) -> bool {
    let want = webpki::anchor_from_trusted_cert(&CertificateDer::from(ca.bundle()))
        .unwrap()
        .to_owned();
    let svid = source.current();
    let got = svid.trust_anchors_for("fed.org");
    got.len() == 1 && got[0].subject_public_key_info == want.subject_public_key_info
}

/// Writes an SVID message as spiffe-helper files and loads them.
fn write_files(tmp: &tempfile::TempDir, m: &X509SvidMsg) -> Arc<SvidSource> {
    let pem = |kind: &str, der: &[u8]| {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {kind}-----\n{}\n-----END {kind}-----\n",
            lines.join("\n")
        )
    };
    let mut chain = String::new();
    let mut rest = &m.x509_svid[..];
    while !rest.is_empty() {
        let (tail, _) = x509_parser::parse_x509_certificate(rest).unwrap();
        chain.push_str(&pem("CERTIFICATE", &rest[..rest.len() - tail.len()]));
        rest = tail;
    }
    let dir = tmp.path();
    std::fs::write(dir.join("svid.pem"), chain).unwrap();
    std::fs::write(
        dir.join("svid_key.pem"),
        pem("PRIVATE KEY", &m.x509_svid_key),
    )
    .unwrap();
    std::fs::write(dir.join("svid_bundle.pem"), pem("CERTIFICATE", &m.bundle)).unwrap();
    SvidSource::load(
        crate::identity::SvidPaths::resolve(Some(dir.to_path_buf()), None, None, None).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn permission_denied_until_the_workload_is_registered() {
    let tmp = tempfile::tempdir().unwrap();
    let spike = Ca::new("spike.ist");
    let agent = Agent::start(&socket_in(&tmp));
    agent.set_mode(Mode::Deny("no identity issued"));
    let pending = start(
        config(&socket_in(&tmp), Duration::from_secs(10)),
        TrustRoots::single("spike.ist").unwrap(),
    );
    eventually("the denial is reported", || {
        matches!(pending.problem(), Some(AgentProblem::NoIdentity { .. }))
    })
    .await;
    assert_eq!(pending.state(), IdentityState::WaitingForAgent);

    // The operator creates the registration entry; the agent now answers.
    agent.send(&response(vec![spike.svid("/app")], &[]));
    agent.set_mode(Mode::Serve);
    let source = pending.ready().await.unwrap();
    assert_eq!(source.current().id().as_str(), "spiffe://spike.ist/app");
}

#[tokio::test]
async fn permission_denied_times_out_with_its_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&socket_in(&tmp));
    agent.set_mode(Mode::Deny("no identity issued"));
    let e = SvidSource::workload_api(
        config(&socket_in(&tmp), Duration::from_millis(500)),
        TrustRoots::single("spike.ist").unwrap(),
    )
    .await
    .unwrap_err();
    assert!(e.is_agent_unavailable());
    assert!(
        matches!(
            &e,
            Error::AgentTimeout {
                problem: Some(AgentProblem::NoIdentity { .. }),
                ..
            }
        ),
        "{e:?}"
    );
    let e = e.to_string();
    for want in [
        "SPIFFE_ENDPOINT_SOCKET",
        "within 500ms (SPIKE_SPIFFE_SOURCE_TIMEOUT)",
        "no SVID for this process (PermissionDenied: no identity issued)",
        "register this workload",
    ] {
        assert!(e.contains(want), "{want:?} not in {e}");
    }
}

#[tokio::test]
async fn missing_socket_waits_then_names_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let path = socket_in(&tmp);
    let pending = start(
        config(&path, Duration::from_millis(300)),
        TrustRoots::single("spike.ist").unwrap(),
    );
    assert_eq!(pending.state(), IdentityState::WaitingForAgent);
    let e = pending.ready().await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("socket {} does not exist", path.display())),
        "{e}"
    );
    assert!(e.contains("SPIFFE_ENDPOINT_SOCKET"), "{e}");
}

/// Nothing configured and nothing at SPIRE's default path: the process stops
/// at once (not after the timeout), naming both ways to give it an identity.
#[tokio::test]
async fn nothing_configured_and_no_default_socket_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let path = socket_in(&tmp);
    let implicit = WorkloadApiConfig {
        implicit: true,
        ..config(&path, Duration::from_secs(600))
    };
    let pending = start(implicit, TrustRoots::single("spike.ist").unwrap());
    let e = tokio::time::timeout(Duration::from_secs(30), pending.ready())
        .await
        .expect("waited for a socket nobody configured")
        .unwrap_err();
    let e = e.to_string();
    for want in [
        "no identity source",
        "SPIFFE_ENDPOINT_SOCKET is unset",
        &path.display().to_string(),
        "SPIKE_SVID_DIR",
    ] {
        assert!(e.contains(want), "{want:?} not in {e}");
    }
}

/// A socket that takes connections and never answers (a hung agent, or no
/// Workload API at all): each attempt gives up after the answer timeout, the
/// problem is named while waiting, and the final error names it too.
#[tokio::test]
async fn a_socket_that_never_answers_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = socket_in(&tmp);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let silent = WorkloadApiConfig {
        answer_timeout: Duration::from_millis(200),
        ..config(&path, Duration::from_secs(2))
    };
    let pending = start(silent, TrustRoots::single("spike.ist").unwrap());
    eventually("the silence is named while waiting", || {
        matches!(pending.problem(), Some(AgentProblem::NoAnswer { .. }))
    })
    .await;
    let e = pending.ready().await.unwrap_err();
    assert!(e.is_agent_unavailable());
    let e = e.to_string();
    assert!(
        e.contains("nothing answered the Workload API call within 200ms"),
        "{e}"
    );
    held.abort();

    // A first-SVID timeout shorter than one attempt still says what it waited on.
    let listener = tokio::net::UnixListener::bind(tmp.path().join("b.sock")).unwrap();
    let _keep = listener;
    let pending = start(
        config(&tmp.path().join("b.sock"), Duration::from_millis(300)),
        TrustRoots::single("spike.ist").unwrap(),
    );
    let e = pending.ready().await.unwrap_err().to_string();
    assert!(e.contains("nothing answered"), "{e}");
}

#[tokio::test]
async fn an_agent_starting_late_is_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let spike = Ca::new("spike.ist");
    let pending = start(
        config(&socket_in(&tmp), Duration::from_secs(10)),
        TrustRoots::single("spike.ist").unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(matches!(
        pending.problem(),
        Some(AgentProblem::NoSocket { .. })
    ));
    let agent = Agent::start(&socket_in(&tmp));
    agent.send(&response(vec![spike.svid("/app")], &[]));
    let source = pending.ready().await.unwrap();
    assert!(source.state().is_ready());
}

#[tokio::test]
async fn not_a_socket_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("api.sock");
    std::fs::write(&path, "not a socket").unwrap();
    let began = std::time::Instant::now();
    let e = SvidSource::workload_api(
        config(&path, Duration::from_secs(30)),
        TrustRoots::single("spike.ist").unwrap(),
    )
    .await
    .unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(5));
    assert!(matches!(e, Error::WorkloadApi { .. }), "{e:?}");
    assert!(e.is_agent_unavailable());
    let e = e.to_string();
    assert!(e.contains("is not a unix socket"), "{e}");
    assert!(e.contains("SPIFFE_ENDPOINT_SOCKET"), "{e}");
}

#[tokio::test]
async fn not_a_workload_api_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&socket_in(&tmp));
    agent.set_mode(Mode::Unimplemented);
    let began = std::time::Instant::now();
    let e = SvidSource::workload_api(
        config(&socket_in(&tmp), Duration::from_secs(30)),
        TrustRoots::single("spike.ist").unwrap(),
    )
    .await
    .unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(5));
    let e = e.to_string();
    assert!(e.contains("does not serve the SPIFFE Workload API"), "{e}");
    assert!(e.contains("UNIMPLEMENTED"), "{e}");
}

#[tokio::test]
async fn a_missing_trust_domain_bundle_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let example = Ca::new("example.org");
    let agent = Agent::start(&socket_in(&tmp));
    agent.send(&response(vec![example.svid("/spike/nexus")], &[]));
    // SPIKE_TRUST_ROOT left at spike.ist while SPIRE's trust domain is example.org.
    let e = SvidSource::workload_api(
        config(&socket_in(&tmp), Duration::from_millis(500)),
        roots(&[]),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::AgentTimeout {
                problem: Some(AgentProblem::MissingBundles { .. }),
                ..
            }
        ),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(
        e.contains("sent SVID spiffe://example.org/spike/nexus but no trust bundle for spike.ist (listed in SPIKE_TRUST_ROOT, SPIKE_TRUST_ROOT_NEXUS"),
        "{e}"
    );
    assert!(e.contains("it sent bundles for example.org"), "{e}");
}

#[tokio::test]
async fn a_broken_stream_keeps_the_svid_and_reconnects() {
    let tmp = tempfile::tempdir().unwrap();
    let spike = Ca::new("spike.ist");
    let mut agent = Agent::start(&socket_in(&tmp));
    agent.send(&response(vec![spike.svid("/spike/nexus/a")], &[]));
    let source = SvidSource::workload_api(
        config(&socket_in(&tmp), Duration::from_secs(10)),
        TrustRoots::single("spike.ist").unwrap(),
    )
    .await
    .unwrap();

    agent.stop();
    eventually("the break is noticed", || source.agent_problem().is_some()).await;
    assert_eq!(
        source.current().id().as_str(),
        "spiffe://spike.ist/spike/nexus/a"
    );
    assert!(source.state().is_ready());

    // While away the agent may also deny; the SVID in use stays until it expires.
    agent.set_mode(Mode::Deny("no identity issued"));
    agent.restart();
    eventually("the denial is reported", || {
        matches!(
            source.agent_problem(),
            Some(AgentProblem::NoIdentity { .. })
        )
    })
    .await;
    assert!(source.state().is_ready());

    agent.set_mode(Mode::Serve);
    agent.send(&response(vec![spike.svid("/spike/nexus/b")], &[]));
    eventually("reconnected with a new SVID", || {
        source.current().id().as_str() == "spiffe://spike.ist/spike/nexus/b"
    })
    .await;
    eventually("healthy again", || source.agent_problem().is_none()).await;
}

#[tokio::test]
async fn an_expired_svid_is_reported_until_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let spike = Ca::new("spike.ist");
    let agent = Agent::start(&socket_in(&tmp));
    let now = SystemTime::now();
    agent.send(&response(
        vec![spike.svid_valid(
            "/spike/nexus",
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )],
        &[],
    ));
    let source = SvidSource::workload_api(
        config(&socket_in(&tmp), Duration::from_secs(10)),
        TrustRoots::single("spike.ist").unwrap(),
    )
    .await
    .unwrap();
    let state = source.state();
    assert!(matches!(state, IdentityState::Expired { .. }), "{state:?}");
    assert_eq!(state.name(), "svid_expired");

    agent.send(&response(vec![spike.svid("/spike/nexus")], &[]));
    eventually("a fresh SVID", || source.state().is_ready()).await;
}

#[tokio::test]
async fn an_unusable_update_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let spike = Ca::new("spike.ist");
    let agent = Agent::start(&socket_in(&tmp));
    agent.send(&response(vec![spike.svid("/a")], &[]));
    let source = SvidSource::workload_api(
        config(&socket_in(&tmp), Duration::from_secs(10)),
        TrustRoots::single("spike.ist").unwrap(),
    )
    .await
    .unwrap();

    let mut mixed = spike.svid("/b");
    mixed.x509_svid_key = spike.svid("/c").x509_svid_key;
    agent.send(&response(vec![mixed], &[]));
    eventually("the bad update is reported", || {
        matches!(
            source.agent_problem(),
            Some(AgentProblem::BadResponse { .. })
        )
    })
    .await;
    let p = source.agent_problem().unwrap().to_string();
    assert!(p.contains("does not match"), "{p}");
    assert_eq!(source.current().id().as_str(), "spiffe://spike.ist/a");

    agent.send(&response(vec![spike.svid("/d")], &[]));
    eventually("the next good one is used", || {
        source.current().id().as_str() == "spiffe://spike.ist/d"
    })
    .await;
}

#[test]
fn endpoints() {
    for (value, path) in [
        (
            "unix:///tmp/spire-agent/public/api.sock",
            "/tmp/spire-agent/public/api.sock",
        ),
        ("unix:/run/spire/agent.sock", "/run/spire/agent.sock"),
        (" unix:///s ", "/s"),
    ] {
        assert_eq!(
            parse_endpoint(value).unwrap(),
            PathBuf::from(path),
            "{value}"
        );
    }
    for (value, want) in [
        ("/tmp/api.sock", "expected unix:///"),
        ("unix://host/api.sock", "takes no host"),
        ("unix:api.sock", "must be absolute"),
        ("tcp://127.0.0.1:8081", "TCP endpoints are not supported"),
        ("unix:///a?b", "query"),
        ("unix:///", "empty"),
        ("unix://", "takes no host"),
    ] {
        let e = parse_endpoint(value).unwrap_err().to_string();
        assert!(e.starts_with("SPIFFE_ENDPOINT_SOCKET="), "{e}");
        assert!(e.contains(want), "{value}: {e}");
    }
}
