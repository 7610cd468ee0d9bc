#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Hostile input against real processes: traversal, anchor escapes, nested and oversized JSON,
//! slow and idle connections, foreign and expired certificates, operator routes called by the
//! wrong identities. Each case checks the status, that nothing changed, and that no process
//! panicked. Plus secrets hygiene: known secret values never reach a log line.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use hyper::StatusCode;
use serde_json::json;

use spike::identity::Role;

const SECRETS: &str = "/v1/store/secrets";
const GET: &str = "/v1/store/secrets?action=get";

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
        SECRETS,
        json!({"path": "secrets/web/db", "values": {"v": "web"}}),
    )
    .await;
    call(
        &su,
        &url,
        SECRETS,
        json!({"path": "secrets/admin/root", "values": {"v": "admin"}}),
    )
    .await;
    let p = json!({"name": "web", "spiffeidPattern": "^spiffe://spike.ist/app/web$", "pathPattern": "^secrets/web/[^/]+$", "permissions": ["read", "list"]});
    assert_eq!(call(&su, &url, "/v1/acl/policy", p).await.0, StatusCode::OK);

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
        let (s, b) = call(&web, &url, GET, json!({"path": path})).await;
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
        let (s, _) = call(&web, &url, GET, json!({"path": path})).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        refused += 1;
    }
    assert_eq!(
        call(&web, &url, GET, json!({"path": "secrets/web/db"}))
            .await
            .1["data"]["v"],
        "web"
    );
    // Listing shows only what the policy grants.
    let (_, l) = call(&web, &url, "/v1/store/secrets?action=list", json!({})).await;
    assert_eq!(l, json!({"keys": ["secrets/web/db"]}));
    // Patterns that try to reach the reserved paths by accident are refused.
    for (id, path) in [
        ("spiffe://spike.ist/app/web", "^secrets/web/.*$|acl"),
        ("spiffe://spike.ist/app/web", "spike/system"),
        ("spiffe://spike.ist/app/.*", "^spike/system/acl$"),
    ] {
        let p = json!({"name": "sneaky", "spiffeidPattern": id, "pathPattern": path, "permissions": ["super"]});
        assert_eq!(
            call(&su, &url, "/v1/acl/policy", p).await.0,
            StatusCode::BAD_REQUEST,
            "{id} {path}"
        );
        refused += 1;
    }
    // A workload cannot write a policy granting itself more.
    let p = json!({"name": "web", "spiffeidPattern": "^spiffe://spike.ist/app/web$", "pathPattern": ".*", "permissions": ["super"]});
    assert_eq!(
        call(&web, &url, "/v1/acl/policy", p).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Deeply nested JSON within the size limit is refused, not recursed into.
    let deep = format!("{{\"path\":{}1{}}}", "[".repeat(20_000), "]".repeat(20_000));
    let r = su
        .post_json(&url, SECRETS, deep.into_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Oversized bodies get 413 without being buffered whole (2 MiB > 1 MiB limit).
    let big = vec![b' '; 2 << 20];
    let r = su.post_json(&url, SECRETS, big).await.unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    refused += 2;
    // Nothing changed.
    let (_, l) = call(&su, &url, "/v1/store/secrets?action=list", json!({})).await;
    assert_eq!(l, json!({"keys": ["secrets/admin/root", "secrets/web/db"]}));
    let (_, pl) = call(&su, &url, "/v1/acl/policy?action=list", json!({})).await;
    assert_eq!(pl["policies"].as_array().unwrap().len(), 1);
    assert_eq!(pl["policies"][0]["pathPattern"], "^secrets/web/[^/]+$");
    no_panics(&c);
    println!("hostile input: {refused} requests refused, state unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_cut_off_and_capped() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[
        ("SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT", "1s"),
        ("SPIKE_HTTP_SERVER_TLS_HANDSHAKE_TIMEOUT", "1s"),
        ("SPIKE_HTTP_SERVER_MAX_CONNECTIONS", "20"),
    ]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    wait_status(&anon, &url, "ready").await;
    let addr = c.nexus[n].addr;

    // Idle TCP connections that never start TLS: 30 against a cap of 20. The surplus is
    // closed at once, the rest when the handshake deadline passes.
    let mut idle: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let started = Instant::now();
    let mut closed = 0;
    for s in idle.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut b = [0u8; 1];
        // EOF or reset: the server closed it.
        if matches!(s.read(&mut b), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 30, "every idle connection is closed by the server");
    println!(
        "30 idle connections closed by the server in {:?}",
        started.elapsed()
    );
    // Service is intact afterwards.
    assert_eq!(health(&anon, &url).await.unwrap().0, StatusCode::OK);

    // A slow client: completes TLS, then sends its request headers one byte at a time.
    let tls = spike::identity::client_config(
        None,
        Some(
            rustls::pki_types::pem::PemObject::pem_file_iter(c.pki.ca_pem())
                .unwrap()
                .map(|c| c.unwrap())
                .collect(),
        ),
        TD,
        spike::identity::ExpectedPeer::Role(Role::Nexus),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut stream = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = Instant::now();
    let mut cut = false;
    for &byte in request.iter() {
        if stream.write_all(&[byte]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    if !cut {
        // Every byte went out before the server gave up: it must have answered 408 or closed.
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        cut = buf.is_empty() || text.starts_with("HTTP/1.1 408");
        assert!(cut, "slow headers were served: {text}");
    }
    println!("slow client cut off after {:?}", started.elapsed());
    assert!(c.nexus[n].is_running());
    no_panics(&c);
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
    let r = client(Some(&expired), &c.pki, Role::Nexus)
        .post_json(&url, "/v1/store/secrets?action=list", b"{}".to_vec())
        .await;
    assert!(r.is_err() || r.unwrap().status == StatusCode::UNAUTHORIZED);
    // Another trust domain's superuser: refused.
    let other = Pki::new(c.dir.path(), "evil.example");
    let foreign = other.issue("foreign", "/spike/pilot/role/superuser");
    let r = client(Some(&foreign), &c.pki, Role::Nexus)
        .post_json(&url, "/v1/store/secrets?action=list", b"{}".to_vec())
        .await;
    assert!(r.is_err() || r.unwrap().status == StatusCode::UNAUTHORIZED);
    // Workloads and Keepers cannot call the operator routes.
    for (name, path) in [
        ("w", "/app/w"),
        ("k", "/spike/keeper/7"),
        ("su2", "/spike/pilot/role/superuser"),
    ] {
        let who = c.api_client(name, path);
        assert_eq!(
            call(&who, &url, "/v1/operator/recover", json!({})).await.0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            call(
                &who,
                &url,
                "/v1/operator/restore",
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
    let r = client(Some(&w), &c.pki, Role::Keeper)
        .post_json(&c.keepers[0].url(), "/v1/store/shard", b"{}".to_vec())
        .await;
    assert!(r.is_err());
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
    // Every route, with the marker wherever a value goes, including failing requests.
    call(
        &su,
        &url,
        SECRETS,
        json!({"path": "m/a", "values": {"k": marker}}),
    )
    .await;
    call(
        &su,
        &url,
        SECRETS,
        json!({"path": "m/a", "values": {"k": marker}, "cas": 99}),
    )
    .await;
    call(
        &su,
        &url,
        SECRETS,
        json!({"path": "../bad", "values": {"k": marker}}),
    )
    .await;
    call(
        &su,
        &url,
        SECRETS,
        json!({"path": "m/a", "values": {"bad key!": marker}}),
    )
    .await;
    call(&su, &url, GET, json!({"path": "m/a"})).await;
    call(
        &su,
        &url,
        "/v1/store/secrets/metadata?action=get",
        json!({"path": "m/a"}),
    )
    .await;
    call(
        &su,
        &url,
        "/v1/store/secrets?action=delete",
        json!({"path": "m/a"}),
    )
    .await;
    call(
        &su,
        &url,
        "/v1/store/secrets?action=undelete",
        json!({"path": "m/a"}),
    )
    .await;
    call(&su, &url, "/v1/store/secrets?action=list", json!({})).await;
    let (_, enc) = call(
        &su,
        &url,
        "/v1/cipher/encrypt",
        json!({"plaintext": b64_marker}),
    )
    .await;
    call(&su, &url, "/v1/cipher/decrypt", enc).await;
    su.post(
        &url,
        "/v1/cipher/encrypt",
        "application/octet-stream",
        marker.as_bytes().to_vec(),
    )
    .await
    .unwrap();
    su.post_json(
        &url,
        SECRETS,
        format!("{{\"path\":\"m/b\",\"values\":{{\"k\":\"{marker}\"").into_bytes(),
    )
    .await
    .unwrap();
    let (_, shards) = call(&rec, &url, "/v1/operator/recover", json!({})).await;
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
        call(&su, &url, &format!("{SECRETS}?action=list"), json!({}))
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
            call(&su, &url, &format!("{SECRETS}?action=list"), json!({}))
                .await
                .0,
            StatusCode::OK
        );
    }
    no_panics(&c);
}
