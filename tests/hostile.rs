#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Hostile input against real processes: traversal, anchor escapes, nested and oversized JSON,
//! foreign and expired certificates, operator routes called by the wrong identities. Each case
//! checks the status, that nothing changed, and that no process panicked. Plus secrets hygiene:
//! known secret values never reach a log line.
//!
//! Slow and idle connections and the connection cap are checked against a Nexus running in the
//! test process (the server loop Nexus and Keepers share), on a listener the test bound.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::StatusCode;
use rustls::AlertDescription;
use serde_json::json;
use spike::identity::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn no_panics(c: &Cluster) {
    let logs = c.dump_logs();
    assert!(!logs.contains("panicked"), "a process panicked:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_anchor_escapes_and_malformed_json_change_nothing() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let web = c.api_client("web", "/app/web");
    call(
        &su,
        &url,
        SECRETS_PATH,
        json!({"path": "secrets/web/db", "values": {"v": "web"}}),
    )
    .await;
    call(
        &su,
        &url,
        SECRETS_PATH,
        json!({"path": "secrets/admin/root", "values": {"v": "admin"}}),
    )
    .await;
    let p = json!({"name": "web", "spiffeidPattern": "^spiffe://spike.ist/app/web$", "pathPattern": "^secrets/web/[^/]+$", "permissions": ["read", "list"]});
    assert_eq!(call(&su, &url, POLICY_PATH, p).await.0, StatusCode::OK);

    // Traversal, plain and encoded, never reaches another path.
    let mut refused = 0;
    for path in [
        "secrets/web/../admin/root",
        "secrets/web/%2e%2e/admin/root",
        "secrets/web/..%2fadmin/root",
        "secrets/web/./db",
        "/secrets/admin/root",
        "secrets//admin/root",
        "secrets/web/db\u{0000}",
        "secrets/web/db\n",
    ] {
        let (s, b) = call(
            &web,
            &url,
            &action(SECRETS_PATH, "get"),
            json!({"path": path}),
        )
        .await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::UNAUTHORIZED,
            "{path:?}: {s} {b}"
        );
        assert!(b.get("data").is_none());
        refused += 1;
    }
    // The anchored policy does not stretch: no prefix, suffix or sibling tricks.
    for path in [
        "secrets/web/db/deeper",
        "x/secrets/web/db",
        "secrets/webx/db",
        "secrets/admin/root",
    ] {
        let (s, _) = call(
            &web,
            &url,
            &action(SECRETS_PATH, "get"),
            json!({"path": path}),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        refused += 1;
    }
    assert_eq!(
        call(
            &web,
            &url,
            &action(SECRETS_PATH, "get"),
            json!({"path": "secrets/web/db"})
        )
        .await
        .1["data"]["v"],
        "web"
    );
    // Listing shows only what the policy grants.
    let (_, l) = call(&web, &url, &action(SECRETS_PATH, "list"), json!({})).await;
    assert_eq!(l, json!({"keys": ["secrets/web/db"]}));
    // Patterns that try to reach the reserved paths by accident are refused.
    for (id, path) in [
        ("spiffe://spike.ist/app/web", "^secrets/web/.*$|acl"),
        ("spiffe://spike.ist/app/web", "spike/system"),
        ("spiffe://spike.ist/app/.*", "^spike/system/acl$"),
    ] {
        let p = json!({"name": "sneaky", "spiffeidPattern": id, "pathPattern": path, "permissions": ["super"]});
        assert_eq!(
            call(&su, &url, POLICY_PATH, p).await.0,
            StatusCode::BAD_REQUEST,
            "{id} {path}"
        );
        refused += 1;
    }
    // A workload cannot write a policy granting itself more.
    let p = json!({"name": "web", "spiffeidPattern": "^spiffe://spike.ist/app/web$", "pathPattern": ".*", "permissions": ["super"]});
    assert_eq!(
        call(&web, &url, POLICY_PATH, p).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Deeply nested JSON within the size limit is refused, not recursed into.
    let deep = format!("{{\"path\":{}1{}}}", "[".repeat(20_000), "]".repeat(20_000));
    let r = su
        .post_json(&url, SECRETS_PATH, deep.into_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Oversized bodies get 413 without being buffered whole (2 MiB > 1 MiB limit).
    let big = vec![b' '; 2 << 20];
    let r = su.post_json(&url, SECRETS_PATH, big).await.unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    refused += 2;
    // Nothing changed.
    let (_, l) = call(&su, &url, &action(SECRETS_PATH, "list"), json!({})).await;
    assert_eq!(l, json!({"keys": ["secrets/admin/root", "secrets/web/db"]}));
    let (_, pl) = call(&su, &url, &action(POLICY_PATH, "list"), json!({})).await;
    assert_eq!(pl["policies"].as_array().unwrap().len(), 1);
    assert_eq!(pl["policies"][0]["pathPattern"], "^secrets/web/[^/]+$");
    no_panics(&c);
    println!("hostile input: {refused} requests refused, state unchanged");
}

/// A Nexus in this test process with `limits` (server environment pairs), its Keepers
/// unreachable: it answers `/health` (503, awaiting Keepers) to anonymous clients, which is all
/// the connection tests need. Returns the PKI's directory (keep it alive), the PKI and Nexus.
async fn nexus_in_process(limits: &[(&str, &str)]) -> (tempfile::TempDir, Pki, InProcess) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), TD);
    let svid = pki.issue("nexus", "/spike/nexus");
    let peers = (0..3)
        .map(|_| format!("https://127.0.0.1:{}", unused_port()))
        .collect::<Vec<_>>()
        .join(",");
    let mut env = vec![
        ("SPIKE_NEXUS_KEEPER_PEERS", peers.as_str()),
        ("SPIKE_NEXUS_BACKEND_STORE", "memory"),
    ];
    env.extend_from_slice(limits);
    let nexus = InProcess::nexus(&server_env(&svid, &env)).await;
    (dir, pki, nexus)
}

/// An anonymous TLS connection to `nexus` (the handshake done).
async fn anonymous_tls(
    pki: &Pki,
    nexus: &InProcess,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(nexus.addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(client_tls(None, pki, Role::Nexus))
        .connect(name, tcp)
        .await
}

/// Reads until the server ends the connection and returns what it sent first. Fails the test
/// if the server keeps it open for `limit`: a read timeout is not a close.
async fn closed_by_server(what: &str, stream: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let limit = Duration::from_secs(20);
    let mut got = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut got)).await {
        Err(_) => panic!("{what}: the server kept it open for {limit:?}"),
        Ok(Ok(_)) => got,
        // A reset, or TLS's peer closing without close_notify: closed as well.
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            got
        }
        Ok(Err(e)) => panic!("{what}: {e}"),
    }
}

/// Idle connections are the server's to close: silent TCP connections when the handshake
/// deadline passes, silent TLS connections when the header deadline passes. A read that times
/// out fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_by_the_server() {
    let (_dir, pki, nexus) = nexus_in_process(&[
        ("SPIKE_HTTP_SERVER_TLS_HANDSHAKE_TIMEOUT", "1s"),
        ("SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT", "1s"),
    ])
    .await;
    let mut tcp = Vec::new();
    for _ in 0..10 {
        tcp.push(tokio::net::TcpStream::connect(nexus.addr).await.unwrap());
    }
    for (i, s) in tcp.iter_mut().enumerate() {
        let sent = closed_by_server(&format!("idle TCP connection {i}"), s).await;
        assert!(sent.is_empty(), "{sent:?}");
    }
    let mut tls = anonymous_tls(&pki, &nexus).await.unwrap();
    let sent = closed_by_server("idle TLS connection", &mut tls).await;
    let text = String::from_utf8_lossy(&sent);
    assert!(
        sent.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // Service is intact afterwards.
    let (status, body) = health(&client(None, &pki, Role::Nexus), &nexus.url())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "awaiting_keepers");
    nexus.stop().await;
    println!("10 idle TCP connections and 1 idle TLS connection closed by the server");
}

/// A slow client completes TLS, then sends its request headers a byte every 100 ms (about 9 s
/// in all, against a 1 s header deadline): the server cuts it off (408 or a close) instead of
/// answering the request. Without the deadline it would answer once the last byte is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off() {
    let (_dir, pki, nexus) =
        nexus_in_process(&[("SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT", "1s")]).await;
    let stream = anonymous_tls(&pki, &nexus).await.unwrap();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let slow = tokio::spawn(async move {
        for &byte in request.iter() {
            // The server may cut the connection at any byte: stop writing then.
            if writer.write_all(&[byte]).await.is_err() || writer.flush().await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    });
    let answer = closed_by_server("slow client", &mut reader).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || text.starts_with("HTTP/1.1 408"),
        "slow headers were served: {text}"
    );
    slow.abort();
    nexus.stop().await;
    println!("slow client cut off: {:?}", text.lines().next());
}

/// A TLS connection to `nexus` with `tls`, the client certificate of a workload no policy names
/// (the handshake done): it takes an ordinary connection slot (callers without a certificate have
/// their own allowance, and are served without keep-alive).
async fn workload_tls(
    tls: &Arc<rustls::ClientConfig>,
    nexus: &InProcess,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(nexus.addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(name, tcp)
        .await
}

/// One kept-alive connection to an in-process Nexus, from a workload: a TLS handshake and an
/// HTTP/1.1 request answered on it, so the server is known to hold it (and one of its ordinary
/// connection permits).
struct Held {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    conn: tokio::task::JoinHandle<()>,
}

impl Held {
    /// Connects and asks `/health` once; `Err` if the server turned the connection away.
    async fn open(tls: &Arc<rustls::ClientConfig>, nexus: &InProcess) -> Result<Held, String> {
        let tls = workload_tls(tls, nexus)
            .await
            .map_err(|e| format!("handshake: {e} ({:?})", e.kind()))?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut held = Held { sender, conn };
        held.health().await?;
        Ok(held)
    }

    /// `GET /health` on this connection: Nexus answers 503 (no Keepers).
    async fn health(&mut self) -> Result<(), String> {
        let req = hyper::Request::get("/health")
            .header(hyper::header::HOST, "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Drops the connection, and with it the socket.
        self.conn.abort();
    }
}

/// The server holds exactly `cap` connections: `cap` kept-alive connections are served, the
/// next one is closed right after accept (its handshake ends without an answer), the held ones
/// still work, and once one of them is closed a new connection is served again, and the one
/// after that is turned away again. No reserved connections and no allowance for callers
/// without a certificate here (so no handshake slots either): the reserve for operators and
/// health checks is tested in tests/hostile_review.rs and tests/rereview.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_exactly_cap_connections() {
    const CAP: usize = 4;
    let cap = CAP.to_string();
    // Long deadlines: only the cap may end a connection here.
    let (_dir, pki, nexus) = nexus_in_process(&[
        ("SPIKE_HTTP_SERVER_MAX_CONNECTIONS", cap.as_str()),
        ("SPIKE_HTTP_SERVER_RESERVED_CONNECTIONS", "0"),
        ("SPIKE_HTTP_SERVER_ANONYMOUS_CONNECTIONS", "0"),
        ("SPIKE_HTTP_SERVER_TLS_HANDSHAKE_TIMEOUT", "120s"),
        ("SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT", "120s"),
    ])
    .await;
    let tls = client_tls(Some(&pki.issue("held", "/app/held")), &pki, Role::Nexus);
    let mut held = Vec::new();
    for i in 0..CAP {
        let h = Held::open(&tls, &nexus)
            .await
            .unwrap_or_else(|e| panic!("connection {} of {CAP} refused: {e}", i + 1));
        held.push(h);
    }
    let turned_away = |what: &str, r: Result<Held, String>| match r {
        Ok(_) => panic!("{what} was served past the cap of {CAP}"),
        Err(e) => {
            // Closed right after accept: the handshake meets the end of the stream.
            assert!(
                e.starts_with("handshake:")
                    && (e.contains("UnexpectedEof") || e.contains("ConnectionReset")),
                "{what}: {e}"
            );
            e
        }
    };
    let first = turned_away(
        "connection CAP+1",
        tokio::time::timeout(Duration::from_secs(30), Held::open(&tls, &nexus))
            .await
            .expect("connection CAP+1 was neither served nor closed (queued?)"),
    );
    // The held connections still work.
    for h in held.iter_mut() {
        h.health().await.unwrap();
    }
    // Release one: its permit comes back once the server has seen it close.
    held.pop();
    let again = wait_for(
        "a new connection after one was released",
        Duration::from_secs(20),
        || async { Held::open(&tls, &nexus).await.ok() },
    )
    .await;
    held.push(again);
    turned_away(
        "connection CAP+1 after the release",
        tokio::time::timeout(Duration::from_secs(30), Held::open(&tls, &nexus))
            .await
            .expect("connection CAP+1 was neither served nor closed (queued?)"),
    );
    drop(held);
    nexus.stop().await;
    println!("cap {CAP}: {CAP} held, the next turned away ({first}), one released, one admitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_foreign_and_wrong_role_identities_are_refused() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    // An expired superuser certificate from our own CA: refused at the handshake.
    let expired = c.dir.path().join("expired");
    let now = SystemTime::now();
    spike::identity::pki::issue_with_validity(
        &c.pki.ca_dir,
        &spike::identity::SpiffeId::parse("spiffe://spike.ist/spike/pilot/role/superuser").unwrap(),
        &expired,
        &[],
        &["127.0.0.1".parse().unwrap()],
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap();
    // Each refusal is the handshake's, with the alert that names the reason (not any transport
    // error: a dead Nexus would give one too), and Nexus serves the real superuser afterwards.
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let addr = c.nexus[n].addr;
    let still_serves = || async {
        let (s, b) = call(&su, &url, &action(SECRETS_PATH, "list"), json!({})).await;
        assert_eq!((s, b), (StatusCode::OK, json!({"keys": []})));
    };
    let alert = tls_refusal(client_tls(Some(&expired), &c.pki, Role::Nexus), addr).await;
    assert_eq!(alert, AlertDescription::CertificateExpired);
    still_serves().await;
    // Another trust domain's superuser: refused.
    let other = Pki::new(c.dir.path(), "evil.example");
    let foreign = other.issue("foreign", "/spike/pilot/role/superuser");
    let alert = tls_refusal(client_tls(Some(&foreign), &c.pki, Role::Nexus), addr).await;
    assert_eq!(alert, AlertDescription::UnknownCA);
    still_serves().await;
    // Workloads and Keepers cannot call the operator routes.
    for (name, path) in [
        ("w", "/app/w"),
        ("k", "/spike/keeper/7"),
        ("su2", "/spike/pilot/role/superuser"),
    ] {
        let who = c.api_client(name, path);
        assert_eq!(
            call(&who, &url, RECOVER_PATH, json!({})).await.0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            call(
                &who,
                &url,
                RESTORE_PATH,
                json!({"id": 1, "shard": vec![1u8; 32]})
            )
            .await
            .0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    // A workload SVID never gets through a Keeper's handshake.
    let w = c.pki.issue("w2", "/app/w2");
    let alert = tls_refusal(
        client_tls(Some(&w), &c.pki, Role::Keeper),
        c.keepers[0].addr,
    )
    .await;
    assert_eq!(alert, AlertDescription::CertificateUnknown);
    // The Keeper still serves Nexus.
    assert!(c.keeper_shard(0).await.is_some());
    no_panics(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_and_key_material_never_reach_the_logs() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[("SPIKE_SYSTEM_LOG_LEVEL", "trace")]);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let rec = c.api_client("rec", "/spike/pilot/role/recover");
    let marker = "hunter2-marker-5821-zyx";
    let b64_marker = "aHVudGVyMi1tYXJrZXItNTgyMS16eXg=";
    // Every route, with the marker wherever a value goes, including failing requests. Each
    // request must get the answer of the code path it was meant for: a request refused before
    // its body was read would prove nothing about where the marker goes.
    let expect = |what: &str, (s, b): (StatusCode, serde_json::Value), want: StatusCode| {
        assert_eq!(s, want, "{what}: {b}");
        b
    };
    let put = |body: serde_json::Value| call(&su, &url, SECRETS_PATH, body);
    let m_a = json!({"path": "m/a"});
    let b = put(json!({"path": "m/a", "values": {"k": marker}})).await;
    assert_eq!(expect("put", b, StatusCode::OK), json!({"version": 1}));
    let b = put(json!({"path": "m/a", "values": {"k": marker}, "cas": 99})).await;
    expect("put with a failing cas", b, StatusCode::CONFLICT);
    let b = put(json!({"path": "../bad", "values": {"k": marker}})).await;
    expect("put to a bad path", b, StatusCode::BAD_REQUEST);
    let b = put(json!({"path": "m/a", "values": {"bad key!": marker}})).await;
    expect("put with a bad key", b, StatusCode::BAD_REQUEST);
    let b = call(&su, &url, &action(SECRETS_PATH, "get"), m_a.clone()).await;
    assert_eq!(expect("get", b, StatusCode::OK)["data"]["k"], marker);
    let b = call(&su, &url, &action(SECRET_METADATA_PATH, "get"), m_a.clone()).await;
    expect("metadata", b, StatusCode::OK);
    let b = call(&su, &url, &action(SECRETS_PATH, "delete"), m_a.clone()).await;
    expect("delete", b, StatusCode::OK);
    let b = call(&su, &url, &action(SECRETS_PATH, "undelete"), m_a.clone()).await;
    expect("undelete", b, StatusCode::OK);
    let b = call(&su, &url, &action(SECRETS_PATH, "list"), json!({})).await;
    assert_eq!(expect("list", b, StatusCode::OK), json!({"keys": ["m/a"]}));
    let b = call(&su, &url, ENCRYPT_PATH, json!({"plaintext": b64_marker})).await;
    let enc = expect("encrypt", b, StatusCode::OK);
    let b = call(&su, &url, DECRYPT_PATH, enc).await;
    assert_eq!(
        expect("decrypt", b, StatusCode::OK),
        json!({"plaintext": b64_marker})
    );
    let octets = "application/octet-stream";
    let sealed = su
        .post(&url, ENCRYPT_PATH, octets, marker.as_bytes().to_vec())
        .await
        .unwrap();
    assert_eq!(sealed.status, StatusCode::OK);
    let opened = su
        .post(&url, DECRYPT_PATH, octets, sealed.body.to_vec())
        .await
        .unwrap();
    assert_eq!(
        (opened.status, &opened.body[..]),
        (StatusCode::OK, marker.as_bytes())
    );
    let truncated = su
        .post_json(
            &url,
            SECRETS_PATH,
            format!("{{\"path\":\"m/b\",\"values\":{{\"k\":\"{marker}\"").into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(truncated.status, StatusCode::BAD_REQUEST, "truncated JSON");
    let b = call(&rec, &url, RECOVER_PATH, json!({})).await;
    let shards = expect("recover", b, StatusCode::OK);
    let mut forbidden: Vec<String> = vec![marker.into(), b64_marker.into()];
    for i in 0..3 {
        let (_, v) = c.keeper_shard(i).await.unwrap();
        forbidden.push(v.iter().map(|b| format!("{b:02x}")).collect());
        forbidden.push(format!("{v:?}"));
    }
    for (_, v) in shards["shards"].as_object().unwrap() {
        let v: [u8; 32] = serde_json::from_value(v.clone()).unwrap();
        forbidden.push(v.iter().map(|b| format!("{b:02x}")).collect());
    }
    let logs = c.dump_logs();
    assert!(logs.contains("spike::audit"), "audit lines are written");
    for f in &forbidden {
        assert!(
            !logs.contains(f.as_str()),
            "a log line carries secret material {f:.12}..."
        );
    }
    // Audit lines name the caller, action and path, never a value.
    let audit: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("spike::audit"))
        .collect();
    assert!(audit.iter().any(|l| l.contains("secret.put")
        && l.contains("m/a")
        && l.contains("spiffe://spike.ist/spike/pilot/role/superuser")));
    println!(
        "{} log lines, {} audit lines, {} secret strings searched for",
        logs.lines().count(),
        audit.len(),
        forbidden.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_material_is_locked_in_memory_and_core_dumps_are_off() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    for pid in [c.nexus[n].pid(), c.keepers[0].pid()] {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let locked: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert!(locked > 0, "pid {pid} locks no memory:\n{status}");
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    }
    let _ = std::io::stdout().flush();
}

/// A client certificate from our own CA that breaks one X509-SVID leaf rule: `two_uris` adds a
/// second URI SAN, otherwise its key usage allows signing certificates (keyCertSign).
fn minted_client_cert(
    c: &Cluster,
    two_uris: bool,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{KeyUsagePurpose as Ku, SanType};
    let ca_key = std::fs::read_to_string(c.pki.ca_dir.join("ca.key")).unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("spike dev CA {TD}"));
    ca.key_usages = vec![Ku::KeyCertSign];
    let issuer = rcgen::Issuer::new(ca, rcgen::KeyPair::from_pem(&ca_key).unwrap());
    let uri = |u: &str| SanType::URI(u.to_string().try_into().unwrap());
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![uri("spiffe://spike.ist/spike/pilot/role/superuser")];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![Ku::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    if two_uris {
        p.subject_alt_names.push(uri("spiffe://spike.ist/app/web"));
    } else {
        p.key_usages.push(Ku::KeyCertSign);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
    (vec![cert.der().clone()], key.into())
}

/// Sends one superuser request with `chain`/`key` as the client certificate (verifying Nexus
/// by its CA and `localhost` name); returns the response head, or the error that ended it.
async fn raw_mtls_list(
    c: &Cluster,
    addr: std::net::SocketAddr,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::CertificateDer::pem_file_iter(c.pki.ca_pem()).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = "POST /v1/store/secrets?action=list HTTP/1.1\r\nHost: localhost\r\n\
               Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf))
        .await
        .map_err(|_| "no answer in 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text.lines().next().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_breaking_the_x509_svid_rules_are_refused() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let addr = c.nexus[n].addr;
    // The control: a superuser certificate minted the same way, with no flaw, is served.
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    assert_eq!(
        call(&su, &url, &action(SECRETS_PATH, "list"), json!({}))
            .await
            .0,
        StatusCode::OK
    );
    for (two_uris, reason) in [(true, "2 URI SANs"), (false, "keyCertSign")] {
        let (chain, key) = minted_client_cert(&c, two_uris);
        match raw_mtls_list(&c, addr, chain, key).await {
            Err(e) => println!("refused at the handshake ({reason}): {e}"),
            Ok(head) => assert!(
                head.is_empty() || head.contains(" 401 "),
                "{reason}: answered {head:?}"
            ),
        }
        // Nexus says why (the line may land just after the client saw the alert).
        let says_why = |logs: String| {
            logs.lines()
                .any(|l| l.contains("TLS handshake refused") && l.contains(reason))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !says_why(c.nexus[n].logs()) {
            assert!(
                std::time::Instant::now() < deadline,
                "Nexus does not say why it refused the certificate ({reason}):\n{}",
                c.nexus[n].logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Nexus stays up and keeps serving.
        assert!(c.nexus[n].is_running());
        assert_eq!(
            call(&su, &url, &action(SECRETS_PATH, "list"), json!({}))
                .await
                .0,
            StatusCode::OK
        );
    }
    no_panics(&c);
}
