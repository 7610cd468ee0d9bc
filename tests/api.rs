#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Nexus's API over real TLS against real processes: SPIKE's shapes, the authorisation
//! matrix, encryption at rest, concurrency through two instances, and bad input.

mod common;

use std::path::PathBuf;

use common::*;
use hyper::{StatusCode, Uri};
use serde_json::json;
use spike::identity::Role;
use spike::transport::HttpsClient;

struct Fixture {
    c: Cluster,
    url: Uri,
    su: HttpsClient,
}

async fn fixture(extra: &[(&str, &str)]) -> Fixture {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(extra);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su_dir = c.pki.issue("superuser", "/spike/pilot/role/superuser");
    let su = client(Some(&su_dir), &c.pki, Role::Nexus);
    Fixture { c, url, su }
}

impl Fixture {
    fn as_id(&self, name: &str, path: &str) -> HttpsClient {
        let dir: PathBuf = self.c.pki.issue(name, path);
        client(Some(&dir), &self.c.pki, Role::Nexus)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_lifecycle_with_spikes_shapes() {
    let f = fixture(&[]).await;
    let (su, url) = (&f.su, &f.url);
    let put = |v: &str| json!({"path": "secrets/db/creds", "values": {"username": "admin", "password": v}});
    assert_eq!(
        call(su, url, SECRETS_PATH, put("one")).await,
        (StatusCode::OK, json!({"version": 1}))
    );
    assert_eq!(
        call(su, url, SECRETS_PATH, put("two")).await.1,
        json!({"version": 2})
    );
    let (s, b) = call(
        su,
        url,
        &action(SECRETS_PATH, "get"),
        json!({"path": "secrets/db/creds"}),
    )
    .await;
    assert_eq!(
        (s, &b["data"]),
        (
            StatusCode::OK,
            &json!({"username": "admin", "password": "two"})
        )
    );
    assert_eq!(b["version"], 2);
    let (_, b) = call(
        su,
        url,
        &action(SECRETS_PATH, "get"),
        json!({"path": "secrets/db/creds", "version": 1}),
    )
    .await;
    assert_eq!(b["data"]["password"], "one");
    // Soft delete of the current version; the previous becomes current; undelete restores.
    assert_eq!(
        call(
            su,
            url,
            &action(SECRETS_PATH, "delete"),
            json!({"path": "secrets/db/creds", "versions": []})
        )
        .await,
        (StatusCode::OK, json!({}))
    );
    let (_, b) = call(
        su,
        url,
        &action(SECRETS_PATH, "get"),
        json!({"path": "secrets/db/creds"}),
    )
    .await;
    assert_eq!(b["version"], 1);
    let (s, b) = call(
        su,
        url,
        &action(SECRETS_PATH, "get"),
        json!({"path": "secrets/db/creds", "version": 2}),
    )
    .await;
    assert_eq!(
        (s, b),
        (StatusCode::NOT_FOUND, json!({"err": "api_not_found"}))
    );
    let (_, meta) = call(
        su,
        url,
        &action(SECRET_METADATA_PATH, "get"),
        json!({"path": "secrets/db/creds"}),
    )
    .await;
    assert_eq!(meta["metadata"]["currentVersion"], 1);
    assert_eq!(meta["metadata"]["oldestVersion"], 1);
    assert_eq!(meta["metadata"]["maxVersions"], 10);
    assert!(meta["versions"]["2"]["deletedTime"].is_string());
    assert!(meta["versions"]["1"]["deletedTime"].is_null());
    assert_eq!(meta["versions"]["1"]["version"], 1);
    assert_eq!(
        call(
            su,
            url,
            &action(SECRETS_PATH, "undelete"),
            json!({"path": "secrets/db/creds", "versions": [2]})
        )
        .await
        .0,
        StatusCode::OK
    );
    let (_, b) = call(
        su,
        url,
        &action(SECRETS_PATH, "get"),
        json!({"path": "secrets/db/creds"}),
    )
    .await;
    assert_eq!(b["version"], 2);
    // List, with our prefix filter.
    call(
        su,
        url,
        SECRETS_PATH,
        json!({"path": "other/x", "values": {"k": "v"}}),
    )
    .await;
    let (_, b) = call(su, url, &action(SECRETS_PATH, "list"), json!({})).await;
    assert_eq!(b, json!({"keys": ["other/x", "secrets/db/creds"]}));
    let (_, b) = call(
        su,
        url,
        &action(SECRETS_PATH, "list"),
        json!({"prefix": "secrets/"}),
    )
    .await;
    assert_eq!(b, json!({"keys": ["secrets/db/creds"]}));
    // Missing path.
    let (s, _) = call(
        su,
        url,
        &action(SECRETS_PATH, "get"),
        json!({"path": "nope"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_set_conflicts_are_409_and_change_nothing() {
    let f = fixture(&[]).await;
    let (su, url) = (&f.su, &f.url);
    assert_eq!(
        call(
            su,
            url,
            SECRETS_PATH,
            json!({"path": "a", "values": {"v": "1"}, "cas": 0})
        )
        .await
        .1,
        json!({"version": 1})
    );
    let (s, b) = call(
        su,
        url,
        SECRETS_PATH,
        json!({"path": "a", "values": {"v": "x"}, "cas": 0}),
    )
    .await;
    assert_eq!(
        (s, b),
        (StatusCode::CONFLICT, json!({"err": "api_conflict"}))
    );
    let (s, _) = call(
        su,
        url,
        SECRETS_PATH,
        json!({"path": "a", "values": {"v": "x"}, "cas": 5}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (_, b) = call(su, url, &action(SECRETS_PATH, "get"), json!({"path": "a"})).await;
    assert_eq!(
        (b["version"].as_u64(), b["data"]["v"].as_str()),
        (Some(1), Some("1"))
    );
    assert_eq!(
        call(
            su,
            url,
            SECRETS_PATH,
            json!({"path": "a", "values": {"v": "2"}, "cas": 1})
        )
        .await
        .1,
        json!({"version": 2})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_the_authorisation_matrix() {
    let f = fixture(&[]).await;
    let (su, url) = (&f.su, &f.url);
    call(
        su,
        url,
        SECRETS_PATH,
        json!({"path": "apps/web/db", "values": {"pw": "w"}}),
    )
    .await;
    call(
        su,
        url,
        SECRETS_PATH,
        json!({"path": "apps/billing/db", "values": {"pw": "b"}}),
    )
    .await;
    let web = f.as_id("web", "/app/web");
    let other = f.as_id("other", "/app/other");
    let keeper = f.as_id("keeper-id", "/spike/keeper/1");
    let recover = f.as_id("recover-id", "/spike/pilot/role/recover");
    let get = json!({"path": "apps/web/db"});
    let get_path = &action(SECRETS_PATH, "get");
    // Before any policy: workloads, Keeper and recover identities are all refused.
    for who in [&web, &other, &keeper, &recover] {
        assert_eq!(
            call(who, url, get_path, get.clone()).await,
            (
                StatusCode::UNAUTHORIZED,
                json!({"err": "access_unauthorized"})
            )
        );
    }
    // A workload cannot write policies.
    let policy = json!({"name": "web-read", "spiffeidPattern": "^spiffe://spike.ist/app/web$", "pathPattern": "^apps/web/", "permissions": ["read", "list"]});
    assert_eq!(
        call(&web, url, POLICY_PATH, policy.clone()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(su, url, POLICY_PATH, policy).await,
        (StatusCode::OK, json!({}))
    );
    // Policy shapes: note SPIKE's `spiffiedPattern` in answers.
    let (s, p) = call(
        su,
        url,
        &action(POLICY_PATH, "get"),
        json!({"id": "web-read"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(p["spiffiedPattern"], "^spiffe://spike.ist/app/web$");
    // Our id is the name (SPIKE's is empty), so a listed policy can be fetched by its id.
    assert_eq!(
        (p["id"].as_str(), p["name"].as_str()),
        (Some("web-read"), Some("web-read"))
    );
    assert_eq!(p["permissions"], json!(["read", "list"]));
    assert!(p["createdAt"].is_string() && p["updatedAt"].is_string());
    let (_, l) = call(su, url, &action(POLICY_PATH, "list"), json!({})).await;
    assert_eq!(l["policies"].as_array().unwrap().len(), 1);
    // Now web reads its path, nothing else, and cannot write.
    assert_eq!(
        call(&web, url, get_path, get.clone()).await.1["data"],
        json!({"pw": "w"})
    );
    assert_eq!(
        call(&web, url, get_path, json!({"path": "apps/billing/db"}))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(
            &web,
            url,
            SECRETS_PATH,
            json!({"path": "apps/web/db", "values": {}})
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&other, url, get_path, get.clone()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&keeper, url, get_path, get.clone()).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Listing is filtered to what the caller may list; a caller with no list grant is refused.
    let (s, b) = call(&web, url, &action(SECRETS_PATH, "list"), json!({})).await;
    assert_eq!((s, b), (StatusCode::OK, json!({"keys": ["apps/web/db"]})));
    assert_eq!(
        call(&other, url, &action(SECRETS_PATH, "list"), json!({}))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // Workloads cannot read or list policies without a grant on spike/system/acl.
    assert_eq!(
        call(&web, url, &action(POLICY_PATH, "list"), json!({}))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // Deleting the policy takes the access away at once (no cache).
    assert_eq!(
        call(
            su,
            url,
            &action(POLICY_PATH, "delete"),
            json!({"id": "web-read"})
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&web, url, get_path, get).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(
            su,
            url,
            &action(POLICY_PATH, "get"),
            json!({"id": "web-read"})
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_changes_nothing() {
    let f = fixture(&[("SPIKE_NEXUS_MAX_BODY_BYTES", "4096")]).await;
    let (su, url) = (&f.su, &f.url);
    call(
        su,
        url,
        SECRETS_PATH,
        json!({"path": "keep", "values": {"v": "1"}}),
    )
    .await;
    let raw = |path: &str, body: Vec<u8>| {
        let (su, url, path) = (su.clone(), url.clone(), path.to_string());
        async move { su.post_json(&url, &path, body).await.unwrap() }
    };
    let r = raw(SECRETS_PATH, b"{not json".to_vec()).await;
    assert_eq!(
        (r.status, &r.body[..]),
        (
            StatusCode::BAD_REQUEST,
            &br#"{"err":"api_bad_request"}"#[..]
        )
    );
    assert_eq!(
        raw(&action(SECRETS_PATH, "explode"), b"{}".to_vec())
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        raw("/v1/nothing", b"{}".to_vec()).await.status,
        StatusCode::BAD_REQUEST
    );
    let big = format!(
        r#"{{"path":"keep","values":{{"v":"{}"}}}}"#,
        "x".repeat(10_000)
    );
    let r = raw(SECRETS_PATH, big.into_bytes()).await;
    assert_eq!(
        (r.status, &r.body[..]),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            &br#"{"err":"api_request_too_large"}"#[..]
        )
    );
    for path in [
        "../etc/passwd",
        "a/../b",
        "/abs",
        "a//b",
        "spike/system/acl",
        "a b",
        "",
    ] {
        let (s, _) = call(
            su,
            url,
            SECRETS_PATH,
            json!({"path": path, "values": {"v": "x"}}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path:?}");
    }
    for (id, path) in [
        ("spiffe://spike.ist/(", "x"),
        ("spiffe://spike.ist/w", "a(b"),
        ("spiffe://spike.ist/w", "acl"),
    ] {
        let p = json!({"name": "bad", "spiffeidPattern": id, "pathPattern": path, "permissions": ["read"]});
        assert_eq!(
            call(su, url, POLICY_PATH, p).await.0,
            StatusCode::BAD_REQUEST,
            "{id} {path}"
        );
    }
    let p = json!({"name": "bad", "spiffeidPattern": "spiffe://spike.ist/w", "pathPattern": "x", "permissions": ["admin"]});
    assert_eq!(
        call(su, url, POLICY_PATH, p).await.0,
        StatusCode::BAD_REQUEST
    );
    // Wrong types.
    assert_eq!(
        call(su, url, SECRETS_PATH, json!({"path": 5, "values": {}}))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        call(
            su,
            url,
            &action(SECRETS_PATH, "delete"),
            json!({"path": "keep", "versions": [-1]})
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    // Nothing changed.
    let (_, b) = call(su, url, &action(SECRETS_PATH, "list"), json!({})).await;
    assert_eq!(b, json!({"keys": ["keep"]}));
    let (_, b) = call(
        su,
        url,
        &action(SECRETS_PATH, "get"),
        json!({"path": "keep"}),
    )
    .await;
    assert_eq!(
        (b["version"].as_u64(), b["data"]["v"].as_str()),
        (Some(1), Some("1"))
    );
    assert_eq!(
        call(su, url, &action(POLICY_PATH, "list"), json!({}))
            .await
            .1,
        json!({"policies": []})
    );
    // Nexus is still up and healthy.
    assert_eq!(
        health(&f.c.anonymous(), url).await.unwrap().0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_at_rest_and_a_moved_row_does_not_open() {
    let f = fixture(&[]).await;
    let (su, url) = (&f.su, &f.url);
    let marker = "correct-horse-battery-staple-7731";
    // The marker and the patterns must really be stored (and readable) for their absence from
    // the file to mean anything.
    for (path, value) in [("a", marker), ("b", "bee")] {
        let put = json!({"path": path, "values": {"pw": value}});
        assert_eq!(
            call(su, url, SECRETS_PATH, put).await,
            (StatusCode::OK, json!({"version": 1}))
        );
    }
    let (s, b) = call(su, url, &action(SECRETS_PATH, "get"), json!({"path": "a"})).await;
    assert_eq!((s, &b["data"]["pw"]), (StatusCode::OK, &json!(marker)));
    let policy = json!({"name": "marker-policy", "spiffeidPattern": "^spiffe://spike.ist/app/marker-id$", "pathPattern": "^marker-path-9917$", "permissions": ["read"]});
    assert_eq!(
        call(su, url, POLICY_PATH, policy).await,
        (StatusCode::OK, json!({}))
    );
    let (s, p) = call(
        su,
        url,
        &action(POLICY_PATH, "get"),
        json!({"id": "marker-policy"}),
    )
    .await;
    assert_eq!(
        (s, &p["pathPattern"]),
        (StatusCode::OK, &json!("^marker-path-9917$"))
    );
    // The file holds no plaintext value (nor the policy's patterns).
    let db_path = f.c.data_dir.join("spike.db");
    let mut bytes = std::fs::read(&db_path).unwrap();
    if let Ok(wal) = std::fs::read(f.c.data_dir.join("spike.db-wal")) {
        bytes.extend(wal);
    }
    let hay = String::from_utf8_lossy(&bytes);
    assert!(!hay.contains(marker));
    assert!(!hay.contains("marker-path-9917"));
    // Copy a's record over b's: b then fails to open (500) instead of showing a's value.
    let db = rusqlite::Connection::open(&db_path).unwrap();
    db.execute(
        "UPDATE kv SET value = (SELECT value FROM kv WHERE ns = 'secrets' AND key = 'a') WHERE ns = 'secrets' AND key = 'b'",
        [],
    )
    .unwrap();
    let (s, b) = call(su, url, &action(SECRETS_PATH, "get"), json!({"path": "b"})).await;
    assert_eq!(
        (s, b),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"err": "api_internal_error"})
        )
    );
    let logs = f.c.nexus[0].logs();
    assert!(logs.contains("fails authentication"), "{logs}");
    assert!(!logs.contains(marker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nexus_on_one_sqlite_file_agree_without_a_cache() {
    let mut f = fixture(&[]).await;
    let second = f.c.start_nexus(&[]);
    let url2 = f.c.nexus[second].url();
    wait_status(&f.c.anonymous(), &url2, "ready").await;
    let su = &f.su;
    for i in 1..=5 {
        let (s, b) = call(
            su,
            &f.url,
            SECRETS_PATH,
            json!({"path": "shared", "values": {"n": i.to_string()}}),
        )
        .await;
        assert_eq!((s, b["version"].as_u64()), (StatusCode::OK, Some(i)));
        // Read back at once through the other instance.
        let (_, b) = call(
            su,
            &url2,
            &action(SECRETS_PATH, "get"),
            json!({"path": "shared"}),
        )
        .await;
        assert_eq!(b["data"]["n"], i.to_string());
    }
    // Concurrent writers through both instances: every acknowledged write is a distinct version.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let su = su.clone();
        let url = if i % 2 == 0 {
            f.url.clone()
        } else {
            url2.clone()
        };
        tasks.spawn(async move {
            call(
                &su,
                &url,
                SECRETS_PATH,
                json!({"path": "race", "values": {"i": i.to_string()}}),
            )
            .await
        });
    }
    let mut versions = Vec::new();
    for (s, b) in join_all(tasks).await {
        assert_eq!(s, StatusCode::OK, "{b}");
        versions.push(b["version"].as_u64().unwrap());
    }
    versions.sort();
    assert_eq!(versions, (1..=40).collect::<Vec<_>>());
    let (_, m1) = call(
        su,
        &f.url,
        &action(SECRET_METADATA_PATH, "get"),
        json!({"path": "race"}),
    )
    .await;
    let (_, m2) = call(
        su,
        &url2,
        &action(SECRET_METADATA_PATH, "get"),
        json!({"path": "race"}),
    )
    .await;
    assert_eq!(m1["metadata"]["currentVersion"], 40);
    assert_eq!(m1, m2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_json_and_stream_modes() {
    let f = fixture(&[]).await;
    let (su, url) = (&f.su, &f.url);
    let (s, enc) = call(su, url, ENCRYPT_PATH, json!({"plaintext": "aGVsbG8="})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(enc["version"], 2);
    let (s, dec) = call(su, url, DECRYPT_PATH, enc.clone()).await;
    assert_eq!((s, dec), (StatusCode::OK, json!({"plaintext": "aGVsbG8="})));
    // Stream mode round trip with binary data.
    let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    let r = su
        .post(url, ENCRYPT_PATH, "application/octet-stream", data.clone())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body[0], 2);
    assert_eq!(r.body.len(), 1 + 12 + 4 + data.len() + 16);
    let back = su
        .post(
            url,
            DECRYPT_PATH,
            "application/octet-stream",
            r.body.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!((back.status, back.body.to_vec()), (StatusCode::OK, data));
    // Tampered stream → 400 with a text body.
    let mut bad = r.body.to_vec();
    bad[20] ^= 1;
    let back = su
        .post(url, DECRYPT_PATH, "application/octet-stream", bad)
        .await
        .unwrap();
    assert_eq!(back.status, StatusCode::BAD_REQUEST);
    // A workload needs execute on spike/system/cipher/exec; the lite workload role needs nothing.
    let w = f.as_id("w", "/app/w");
    assert_eq!(
        call(&w, url, ENCRYPT_PATH, json!({"plaintext": ""}))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let lite = f.as_id("lite", "/spike/workload/role/lite");
    assert_eq!(
        call(&lite, url, ENCRYPT_PATH, json!({"plaintext": ""}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&lite, url, &action(SECRETS_PATH, "list"), json!({}))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let p = json!({"name": "w-cipher", "spiffeidPattern": "^spiffe://spike.ist/app/w$", "pathPattern": "^spike/system/cipher/exec$", "permissions": ["execute"]});
    assert_eq!(call(su, url, POLICY_PATH, p).await.0, StatusCode::OK);
    assert_eq!(
        call(&w, url, ENCRYPT_PATH, json!({"plaintext": ""}))
            .await
            .0,
        StatusCode::OK
    );
}
