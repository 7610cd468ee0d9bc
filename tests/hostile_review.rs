#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The classes an outside security review found (issue 13), each against a real `spike nexus`:
//! callers that hold connections, actions that are not SPIKE's, log injection and body leaks,
//! secret records edited in the backing store.
//! Each test checks the refusal, that nothing changed, and that the service stayed up.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::json;
use spike::identity::{ExpectedPeer, Role, SvidPaths, SvidSource};
use spike::protocol::nexus::{HEALTH_PATH, POLICY_PATH, SECRET_METADATA_PATH, SECRETS_PATH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn no_panics(c: &Cluster) {
    let logs = c.dump_logs();
    assert!(!logs.contains("panicked"), "a process panicked:\n{logs}");
}

/// A raw TLS client config presenting the SVID in `dir`, for connections the test drives by
/// hand.
fn raw_tls(c: &Cluster, dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let source =
        SvidSource::load(SvidPaths::resolve(Some(dir.to_path_buf()), None, None, None).unwrap())
            .unwrap();
    let roots = rustls::pki_types::pem::PemObject::pem_file_iter(c.pki.ca_pem())
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    spike::identity::client_config(
        Some(&source),
        Some(roots),
        TD,
        ExpectedPeer::Role(Role::Nexus),
    )
    .unwrap()
}

/// Opens a TLS connection, sends the headers of a put that promises a body, and a few bytes of
/// it. Returns the stream (held open by the caller) or `None` when the server refused it.
async fn slow_put(
    tls: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.ok()?;
    let head = format!(
        "POST {SECRETS_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\n\r\n{{\"path\":\"secrets/a\",\"values\":{{\"v\":\""
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    stream.flush().await.ok()?;
    Some(stream)
}

/// 13.1: with a small connection cap, an identity of the trust domain that no policy names
/// opens every connection and sends its bodies slowly, reopening whatever the server closes.
/// Throughout, the superuser's requests and `/health` are served; a workload with a policy is
/// the one that waits (the cap is really reached); and each slow connection is answered 401
/// without its body and closed by the body deadline at the latest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_without_policy_holding_every_slot_locks_out_no_operator_and_no_health_check() {
    const CAP: usize = 4;
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[
        ("SPIKE_HTTP_SERVER_MAX_CONNECTIONS", "4"),
        ("SPIKE_HTTP_SERVER_RESERVED_CONNECTIONS", "4"),
        ("SPIKE_HTTP_SERVER_READ_TIMEOUT", "2s"),
        ("SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT", "2s"),
    ]);
    let url = c.nexus[n].url();
    let addr = c.nexus[n].addr;
    let anon = c.anonymous();
    wait_status(&anon, &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let web = c.api_client("web", "/app/web");
    let p = json!({"name": "web", "spiffeidPattern": "^spiffe://spike\\.ist/app/web$",
                   "pathPattern": "^secrets/web/.*$", "permissions": ["read"]});
    assert_eq!(call(&su, &url, POLICY_PATH, p).await.0, StatusCode::OK);
    let nobody = raw_tls(&c, &c.pki.issue("nobody", "/app/nobody"));

    // A slow put from the no-policy identity is refused from its headers: 401 arrives while
    // its body is still unsent.
    let mut one = slow_put(&nobody, addr)
        .await
        .expect("first slow put connects");
    let mut answer = [0u8; 64];
    let got = tokio::time::timeout(Duration::from_secs(10), one.read(&mut answer))
        .await
        .expect("an answer before the body is complete")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..got]);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    drop(one);

    // The flood: keep CAP slow connections open at all times, reopening what the server
    // closes, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..CAP {
        let (nobody, stop, opened) = (Arc::clone(&nobody), Arc::clone(&stop), Arc::clone(&opened));
        flood.spawn(async move {
            let mut rounds = 0;
            while !stop.load(Ordering::SeqCst) && rounds < 1000 {
                rounds += 1;
                let Some(mut s) = slow_put(&nobody, addr).await else {
                    tokio::task::yield_now().await;
                    continue;
                };
                opened.fetch_add(1, Ordering::SeqCst);
                // Hold it until the server closes it (401, then the body deadline).
                let mut sink = [0u8; 256];
                while !stop.load(Ordering::SeqCst) {
                    let read = tokio::time::timeout(Duration::from_millis(200), s.read(&mut sink));
                    if let Ok(Ok(0) | Err(_)) = read.await {
                        break;
                    }
                }
            }
        });
    }
    wait_for(
        "the flood to hold every connection",
        Duration::from_secs(20),
        || {
            let opened = Arc::clone(&opened);
            async move { (opened.load(Ordering::SeqCst) >= CAP).then_some(()) }
        },
    )
    .await;

    // Operators and health checks are served for longer than the body deadline.
    for i in 0..6 {
        let (s, b) = call(
            &su,
            &url,
            SECRETS_PATH,
            json!({"path": format!("secrets/su/{i}"), "values": {"v": "x"}}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "superuser put {i} during the flood: {b}");
        let (s, _) = health(&anon, &url)
            .await
            .expect("/health answers during the flood");
        assert_eq!(s, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(done) = flood.join_next().await {
        done.unwrap();
    }
    // Ordinary callers get their connections back once the flood ends.
    wait_for(
        "a workload to be served again",
        Duration::from_secs(20),
        || {
            let (web, url) = (web.clone(), url.clone());
            async move {
                let (s, _) = call(
                    &web,
                    &url,
                    "/v1/store/secrets?action=get",
                    json!({"path": "secrets/web/none"}),
                )
                .await;
                (s == StatusCode::NOT_FOUND).then_some(())
            }
        },
    )
    .await;
    let logs = c.nexus[n].logs();
    assert!(
        logs.contains("reserved connections are kept for operators"),
        "the ordinary connections were never all taken:\n{logs}"
    );
    assert!(c.nexus[n].is_running());
    no_panics(&c);
}

/// 13.5: only SPIKE's empty action is a put. A mistyped, unknown, encoded or repeated action —
/// or any other query parameter — sent with a get's body is 400 and writes nothing; an empty
/// `values` map is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_actions_are_refused_and_never_write() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let (s, _) = call(
        &su,
        &url,
        SECRETS_PATH,
        json!({"path": "secrets/a", "values": {"k": "v1"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    for query in [
        "actio=get",
        "action=Get",
        "action=read",
        "action=%67et",
        "act%69on=get",
        "ACTION=get",
        "action=get&action=get",
        "action=get&x=1",
        "x=1",
        "action",
    ] {
        // A body that would also be a valid put: a fallback to put would write it.
        let path = format!("{SECRETS_PATH}?{query}");
        let body = json!({"path": "secrets/a", "values": {"k": "overwritten"}, "version": 1});
        let (s, b) = call(&su, &url, &path, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {b}");
    }
    for values in [json!({}), json!(null)] {
        let (s, b) = call(
            &su,
            &url,
            SECRETS_PATH,
            json!({"path": "secrets/a", "values": values}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "values {values}: {b}");
    }
    // Still one version, holding what was written.
    let (s, meta) = call(
        &su,
        &url,
        &format!("{SECRET_METADATA_PATH}?action=get"),
        json!({"path": "secrets/a"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        meta["versions"].as_object().map(|v| v.len()),
        Some(1),
        "{meta}"
    );
    let (_, got) = call(
        &su,
        &url,
        &format!("{SECRETS_PATH}?action=get"),
        json!({"path": "secrets/a"}),
    )
    .await;
    assert_eq!(got["data"]["k"], "v1");
    no_panics(&c);
}

/// 13.3: caller-supplied fields cannot forge log lines or carry terminal escapes, and no part
/// of a malformed body (a secret value, a shard sent as text) reaches any log line. Each
/// request is checked to have reached Nexus (its refusal is the expected one), so the marker
/// really went through the code that logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_stay_one_line_per_event_and_never_hold_a_body() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[("SPIKE_SYSTEM_LOG_FORMAT", "text")]);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let web = c.api_client("web", "/app/web");
    let p = json!({"name": "web", "spiffeidPattern": "^spiffe://spike\\.ist/app/web$",
                   "pathPattern": "^secrets/web/.*$", "permissions": ["read"]});
    assert_eq!(call(&su, &url, POLICY_PATH, p).await.0, StatusCode::OK);

    const FORGED: &str = "FORGED-AUDIT-LINE";
    const SECRET: &str = "S3CRET-MARKER-VALUE";
    // A path with a line break and a terminal escape: refused as invalid, and audited.
    let forged = format!("secrets/x\n2026-01-01T00:00:00Z INFO spike::audit: {FORGED}\u{1b}[2J");
    let (s, _) = call(
        &su,
        &url,
        SECRETS_PATH,
        json!({"path": forged, "values": {"v": "x"}}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(
        &web,
        &url,
        &format!("{SECRETS_PATH}?action=get"),
        json!({"path": forged}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Malformed bodies whose values are secrets: wrong types, truncated, trailing garbage.
    for body in [
        format!(r#"{{"path":"secrets/a","values":{{"v":"{SECRET}"}},"cas":"{SECRET}"}}"#),
        format!(r#"{{"path":"secrets/a","values":["{SECRET}"]}}"#),
        format!(r#"{{"path":"secrets/a","values":{{"v":"{SECRET}""#),
        format!(r#"{{"path":"secrets/a","values":{{"v":"x"}}}} {SECRET}"#),
        format!(r#"{{"path":{SECRET}}}"#),
    ] {
        let reply = su
            .post_json(&url, SECRETS_PATH, body.clone().into_bytes())
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
    }
    // A recovery shard sent as text to the restore route by the restore operator.
    let restore = c.api_client("restore", "/spike/pilot/role/restore");
    let reply = restore
        .post_json(
            &url,
            "/v1/operator/restore",
            format!(r#"{{"id":1,"shard":"spike:1:{SECRET}"}}"#).into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    let logs = c.nexus[n].logs();
    assert!(!logs.contains(SECRET), "a body reached the logs:\n{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "a terminal escape reached the logs"
    );
    for line in logs.lines().filter(|l| l.contains(FORGED)) {
        assert!(
            !line.starts_with("2026-01-01") && !line.trim_start().starts_with(FORGED),
            "a caller forged a log line: {line}"
        );
    }
    assert!(
        logs.lines()
            .any(|l| l.contains(FORGED) && l.contains("\\n")),
        "the forged path was not logged escaped (did the request reach the audit?):\n{logs}"
    );
    let _ = HEALTH_PATH;
    no_panics(&c);
}

/// The secret record at `path` as the SQLite file holds it, read as a store administrator can.
fn db_record(c: &Cluster, path: &str) -> Vec<u8> {
    let db = rusqlite::Connection::open(c.data_dir.join("spike.db")).unwrap();
    db.query_row(
        "SELECT value FROM kv WHERE ns = 'secrets' AND key = ?1",
        [path],
        |row| row.get(0),
    )
    .unwrap()
}

/// Overwrites the secret record at `path` in the SQLite file, behind Nexus's back.
fn db_overwrite(c: &Cluster, path: &str, value: &[u8]) {
    let db = rusqlite::Connection::open(c.data_dir.join("spike.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let changed = db
        .execute(
            "UPDATE kv SET value = ?2 WHERE ns = 'secrets' AND key = ?1",
            rusqlite::params![path, value],
        )
        .unwrap();
    assert_eq!(changed, 1);
}

/// Edits the JSON of the secret record at `path` in the SQLite file.
fn db_edit(c: &Cluster, path: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut record: serde_json::Value = serde_json::from_slice(&db_record(c, path)).unwrap();
    edit(&mut record);
    db_overwrite(c, path, &serde_json::to_vec(&record).unwrap());
}

const GET: &str = "/v1/store/secrets?action=get";

/// 13.4: a store administrator who is not a spike operator edits the database to bring back a
/// version an operator deleted (its deleted marker cleared, the current-version pointer moved
/// to it). Every read and write of that secret is refused with 500 and an error line naming
/// the path — the value is never served and no write "repairs" the record — while other
/// secrets and the service carry on; putting the record back as it was makes it readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_version_brought_back_by_editing_the_database_is_refused_and_logged() {
    const LEAKED: &str = "LEAKED-PASSWORD-1";
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[("SPIKE_SYSTEM_LOG_FORMAT", "text")]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    wait_status(&anon, &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    for (path, value) in [
        ("secrets/db", LEAKED),
        ("secrets/db", "rotated-2"),
        ("secrets/other", "x"),
    ] {
        let body = json!({"path": path, "values": {"pw": value}});
        assert_eq!(call(&su, &url, SECRETS_PATH, body).await.0, StatusCode::OK);
    }
    // The operator deletes the leaked version 1, then the current one: nothing is current.
    let del = format!("{SECRETS_PATH}?action=delete");
    for v in [1, 2] {
        let body = json!({"path": "secrets/db", "versions": [v]});
        assert_eq!(call(&su, &url, &del, body).await.0, StatusCode::OK);
    }
    let (s, _) = call(&su, &url, GET, json!({"path": "secrets/db", "version": 1})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let honest = db_record(&c, "secrets/db");

    db_edit(&c, "secrets/db", |r| {
        r["versions"]["1"]["deleted"] = serde_json::Value::Null;
        r["current"] = 1.into();
        r["oldest"] = 1.into();
    });
    let edited = db_record(&c, "secrets/db");
    let internal = json!({"err": "api_internal_error"});
    for body in [
        json!({"path": "secrets/db"}),
        json!({"path": "secrets/db", "version": 1}),
    ] {
        let got = call(&su, &url, GET, body.clone()).await;
        assert_eq!(
            got,
            (StatusCode::INTERNAL_SERVER_ERROR, internal.clone()),
            "{body}"
        );
    }
    let meta = format!("{SECRET_METADATA_PATH}?action=get");
    let got = call(&su, &url, &meta, json!({"path": "secrets/db"})).await;
    assert_eq!(got, (StatusCode::INTERNAL_SERVER_ERROR, internal.clone()));
    // A write does not launder the edit into a record with a valid MAC.
    let put = json!({"path": "secrets/db", "values": {"pw": "rotated-3"}});
    let got = call(&su, &url, SECRETS_PATH, put.clone()).await;
    assert_eq!(got, (StatusCode::INTERNAL_SERVER_ERROR, internal.clone()));
    let undelete = format!("{SECRETS_PATH}?action=undelete");
    let body = json!({"path": "secrets/db", "versions": [2]});
    let got = call(&su, &url, &undelete, body).await;
    assert_eq!(got, (StatusCode::INTERNAL_SERVER_ERROR, internal));
    assert_eq!(
        db_record(&c, "secrets/db"),
        edited,
        "a refused write changed the record"
    );

    let logs = c.nexus[n].logs();
    assert!(
        logs.lines().any(|l| l.contains("ERROR")
            && l.contains("secrets/db")
            && l.contains("fails authentication")),
        "no error line names the tampered record:\n{logs}"
    );
    assert!(!logs.contains(LEAKED), "a secret value reached the logs");

    // The service is up: health, other secrets, new secrets.
    let (s, h) = health(&anon, &url).await.expect("/health answers");
    assert_eq!((s, h["status"].as_str()), (StatusCode::OK, Some("ready")));
    let (s, b) = call(&su, &url, GET, json!({"path": "secrets/other"})).await;
    assert_eq!((s, b["data"]["pw"].as_str()), (StatusCode::OK, Some("x")));
    let body = json!({"path": "secrets/new", "values": {"pw": "n"}});
    assert_eq!(call(&su, &url, SECRETS_PATH, body).await.0, StatusCode::OK);

    // Put back as it was, the record opens again: the refusals were the edit's.
    db_overwrite(&c, "secrets/db", &honest);
    let (s, _) = call(&su, &url, GET, json!({"path": "secrets/db", "version": 1})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(call(&su, &url, SECRETS_PATH, put).await.0, StatusCode::OK);
    assert!(c.nexus[n].is_running());
    no_panics(&c);
}

/// 13.4, upgrade: a record whose MAC was removed (as an earlier release wrote records) is
/// refused, so removing a MAC is no way around it; an operator's
/// `SPIKE_NEXUS_UPGRADE_SECRET_RECORDS=true` accepts such records and authenticates each at
/// start, and once it is unset again the upgraded record still opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_without_mac_is_refused_until_an_operator_upgrades_the_records() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    wait_status(&anon, &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let body = json!({"path": "secrets/old", "values": {"pw": "kept"}});
    assert_eq!(call(&su, &url, SECRETS_PATH, body).await.0, StatusCode::OK);
    db_edit(&c, "secrets/old", |r| {
        let r = r.as_object_mut().unwrap();
        r.remove("mac").expect("records carry a MAC");
        r.remove("seq");
    });
    let (s, _) = call(&su, &url, GET, json!({"path": "secrets/old"})).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    let logs = c.nexus[n].logs();
    assert!(
        logs.contains("secrets/old") && logs.contains("carries no MAC"),
        "{logs}"
    );

    c.nexus[n].set_env("SPIKE_NEXUS_UPGRADE_SECRET_RECORDS", "true");
    c.nexus[n].restart();
    wait_status(&anon, &url, "ready").await;
    wait_for("the upgrade to finish", Duration::from_secs(20), || async {
        c.nexus[n]
            .logs()
            .contains("every secret record carries a MAC")
            .then_some(())
    })
    .await;
    let record: serde_json::Value = serde_json::from_slice(&db_record(&c, "secrets/old")).unwrap();
    assert!(record["mac"].is_string(), "{record}");

    c.nexus[n].set_env("SPIKE_NEXUS_UPGRADE_SECRET_RECORDS", "false");
    c.nexus[n].restart();
    wait_status(&anon, &url, "ready").await;
    let (s, b) = call(&su, &url, GET, json!({"path": "secrets/old"})).await;
    assert_eq!(
        (s, b["data"]["pw"].as_str()),
        (StatusCode::OK, Some("kept"))
    );
    no_panics(&c);
}
