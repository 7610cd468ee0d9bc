#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The keyring (decision 33) with real Nexus processes on one shared store (SQLite file,
//! PostgreSQL, S3): a store written before the keyring is upgraded in place by three instances
//! starting at once — exactly one keyring, and callers see nothing different; a keyring edited
//! in the store is refused and left as it is.
//!
//! On every backend, a store "written before the keyring" is made by starting one instance,
//! writing through it, and removing the `system/keyring` record it created: while every value
//! is still sealed under the legacy data key 0 (this slice), that store is what an earlier
//! release leaves. On SQLite, a store the release before the keyring really wrote
//! (`tests/fixtures/pre-keyring`) is upgraded too, restored from that release's recovery shards.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;
use hyper::Uri;
use serde_json::json;
use spike::protocol::nexus::{DECRYPT_PATH, ENCRYPT_PATH};
use spike::store::{AnyStore, Expect, Namespace, Store, Written};
use spike::transport::HttpsClient;

const KEYRING: &str = "keyring";
const SECRETS: &str = "/v1/store/secrets";
const GET: &str = "/v1/store/secrets?action=get";
const ROTATE: &str = "/v1/operator/rotate";
const REENCRYPT: &str = "/v1/operator/reencrypt";
const RETIRE: &str = "/v1/operator/retire";

/// Environment pairs that point Nexus at one store.
type BackendEnv = Vec<(String, String)>;

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn keyring(store: &AnyStore) -> Option<spike::store::Entry> {
    store.get(Namespace::System, KEYRING).await.unwrap()
}

/// Overwrites the keyring record with `value`, at a new revision.
async fn overwrite(store: &AnyStore, value: Vec<u8>) {
    overwrite_at(store, KEYRING, value).await;
}

/// Overwrites the `system` record `key` with `value`, at a new revision.
async fn overwrite_at(store: &AnyStore, key: &str, value: Vec<u8>) {
    let current = store.get(Namespace::System, key).await.unwrap().unwrap();
    assert!(matches!(
        store
            .put(
                Namespace::System,
                key,
                value,
                Expect::Revision(current.revision)
            )
            .await
            .unwrap(),
        Written::Done(_)
    ));
}

/// A store as an earlier release leaves it: one instance creates the root key and the policy
/// book (and a keyring, which is then removed); secrets are written as earlier releases wrote
/// them — records sealed and authenticated under the root-derived (legacy) keys, naming no
/// data key — by the library's import with the legacy keys alone; the policy book is replaced
/// by one sealed as earlier releases sealed it (`spkbook1`, legacy key) and a version 1
/// ciphertext is kept. Three
/// instances then start on it at once: exactly one creates the keyring, the others use it, and
/// every earlier value reads back as before through each of them.
async fn a_store_from_before_the_keyring_is_upgraded_once(mut c: Cluster, env: BackendEnv) {
    let n = c.start_nexus(&pairs(&env));
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.superuser();
    {
        let root = root_key(&c).await;
        // The policy book as an earlier release sealed it: `spkbook1`, the legacy key.
        let policy = spike::nexus::policy::StoredPolicy {
            name: "w".into(),
            spiffeid_pattern: "^spiffe://spike\\.ist/app/w$".into(),
            path_pattern: "^old/".into(),
            permissions: vec![spike::nexus::policy::Permission::Read],
            created: 1_600_000_000_000_000_000,
            updated: 1_600_000_000_000_000_000,
        };
        let book =
            spike::nexus::book::seal(&root.derive("spike/policies/v1"), 7, &[policy]).unwrap();
        assert_eq!(&book[..8], b"spkbook1");
        let store = admin_store(&c, &env).await;
        wait_for("the policy book", Duration::from_secs(20), || async {
            store
                .get(Namespace::System, "policy-book")
                .await
                .unwrap()
                .map(|_| ())
        })
        .await;
        overwrite_at(&store, "policy-book", book).await;
        let legacy = spike::nexus::secrets::SecretKeys::derive(&root, false);
        let store = admin_store(&c, &env).await;
        let writers = spike::nexus::secrets::Writers::default();
        for i in 0..5u64 {
            let version = |v: &str| spike::nexus::secrets::ImportVersion {
                created: 1_600_000_000_000_000_000,
                deleted: None,
                values: [("v".to_string(), v.to_string())].into(),
            };
            let mut versions =
                std::collections::BTreeMap::from([(1, version(&format!("value-{i}")))]);
            if i == 0 {
                versions.insert(2, version("second"));
            }
            let secret = spike::nexus::secrets::Import {
                current: versions.len() as u64,
                versions,
                created: 1_600_000_000_000_000_000,
                updated: 1_600_000_000_000_000_000,
            };
            spike::nexus::secrets::import(
                &store,
                &writers,
                &legacy,
                &format!("old/{i}"),
                &secret,
                10,
            )
            .await
            .unwrap();
        }
        let text = String::from_utf8(
            store
                .get(Namespace::Secrets, "old/0")
                .await
                .unwrap()
                .unwrap()
                .value,
        )
        .unwrap();
        assert!(
            !text.contains("mac_key") && !text.contains("\"key\""),
            "{text}"
        );
    }
    // Cipher output of an earlier release: version 1, under the root-derived cipher key.
    let root = root_key(&c).await;
    let nonce = [9u8; 12];
    let old_ct = root
        .derive("spike/cipher/v1")
        .seal_with_nonce(nonce, b"", b"hello")
        .unwrap();
    let sealed = json!({"version": 1, "nonce": b64(&nonce), "ciphertext": b64(&old_ct)});
    let store = admin_store(&c, &env).await;
    assert!(
        keyring(&store).await.is_some(),
        "a new deployment has a keyring"
    );
    c.nexus[n].kill();
    let gone = keyring(&store).await.unwrap();
    assert!(
        store
            .delete(Namespace::System, KEYRING, &gone.revision)
            .await
            .unwrap()
    );

    let urls = c.start_ready_together(3, &pairs(&env)).await;
    let logs: String = c.nexus[1..].iter().map(Proc::logs).collect();
    assert_eq!(
        logs.matches("created the keyring: data key 1").count(),
        1,
        "exactly one of the three instances creates the keyring:\n{logs}"
    );
    let created = keyring(&store).await.expect("the keyring is in the store");
    assert_ne!(
        created.value, gone.value,
        "a new keyring, not the removed one"
    );
    let w = c.api_client("w", "/app/w");
    for url in &urls {
        for i in 0..5 {
            let want = if i == 0 {
                "second".to_string()
            } else {
                format!("value-{i}")
            };
            let b = call_ok(&su, url, GET, json!({"path": format!("old/{i}")})).await;
            assert_eq!(b["data"]["v"], want.as_str(), "{b}");
        }
        let b = call_ok(&su, url, GET, json!({"path": "old/0", "version": 1})).await;
        assert_eq!(b["data"]["v"], "value-0");
        // The policy from before is in force on every instance.
        let (s, b) = call(&w, url, GET, json!({"path": "old/3"})).await;
        assert_eq!((s, &b["data"]["v"]), (StatusCode::OK, &json!("value-3")));
        let b = call_ok(&su, url, DECRYPT_PATH, sealed.clone()).await;
        assert_eq!(b, json!({"plaintext": "aGVsbG8="}));
        // New writes work as before.
        call_ok(
            &su,
            url,
            SECRETS,
            json!({"path": "new/1", "values": {"v": "x"}}),
        )
        .await;
    }
    // New cipher output names data key 1, and every instance opens it.
    let fresh = call_ok(&su, &urls[0], ENCRYPT_PATH, json!({"plaintext": "aGk="})).await;
    assert_eq!(fresh["version"], 2);
    for url in &urls[1..] {
        let b = call_ok(&su, url, DECRYPT_PATH, fresh.clone()).await;
        assert_eq!(b, json!({"plaintext": "aGk="}));
    }
    assert_eq!(
        keyring(&store).await.unwrap().revision,
        created.revision,
        "no instance rewrote the keyring"
    );
}

/// A keyring record edited in the store (any byte, or another store's) keeps Nexus from
/// loading the key — `/health` says `keyring_refused` — and is left as it is; with the genuine
/// record back, the instance becomes ready and serves what it held.
async fn an_edited_keyring_is_refused_not_replaced(mut c: Cluster, env: BackendEnv) {
    let n = c.start_nexus(&pairs(&env));
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.superuser();
    call_ok(
        &su,
        &url,
        SECRETS,
        json!({"path": "a/1", "values": {"v": "x"}}),
    )
    .await;
    let store = admin_store(&c, &env).await;
    let genuine = keyring(&store).await.unwrap().value;
    c.nexus[n].kill();
    for i in [3, 12, genuine.len() / 2, genuine.len() - 1] {
        let mut edited = genuine.clone();
        edited[i] ^= 0x40;
        overwrite(&store, edited.clone()).await;
        c.nexus[n].restart();
        let body = wait_status(&c.anonymous(), &url, "keyring_refused").await;
        assert!(
            body["reason"].as_str().unwrap().contains("keyring"),
            "{body}"
        );
        wait_for(
            "the refusal in the log",
            Duration::from_secs(10),
            || async {
                c.nexus[n]
                    .logs()
                    .contains("keyring is refused")
                    .then_some(())
            },
        )
        .await;
        assert_eq!(
            keyring(&store).await.unwrap().value,
            edited,
            "byte {i}: left as it is"
        );
        c.nexus[n].kill();
    }
    overwrite(&store, genuine).await;
    c.nexus[n].restart();
    wait_status(&c.anonymous(), &url, "ready").await;
    let b = call_ok(&su, &url, GET, json!({"path": "a/1"})).await;
    assert_eq!(b["data"]["v"], "x");
}

/// The data key ids a secret record names: each version's, and its MAC's.
async fn record_keys(store: &AnyStore, path: &str) -> (Vec<u64>, u64) {
    let entry = store.get(Namespace::Secrets, path).await.unwrap().unwrap();
    let record: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
    let versions = record["versions"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v["key"].as_u64().unwrap_or(0))
        .collect();
    (versions, record["mac_key"].as_u64().unwrap_or(0))
}

/// The data key id a JSON cipher answer names (the first 4 bytes of its ciphertext field).
fn key_id_of(sealed: &serde_json::Value) -> u32 {
    use base64::Engine as _;
    let field = base64::engine::general_purpose::STANDARD
        .decode(sealed["ciphertext"].as_str().unwrap())
        .unwrap();
    u32::from_be_bytes(field[..4].try_into().unwrap())
}

/// `spike operator rotate`'s route through one instance adds data key 2; the very next value
/// sealed through another instance names key 2, and what key 1 sealed still opens on both.
/// A workload, the recover role and the restore role are refused (401) and change nothing. A
/// keyring edited in the store while instances run is refused on the next use (500 and a log
/// line), not replaced; with the genuine record back, service resumes.
async fn a_rotation_is_used_at_once_by_every_instance(mut c: Cluster, env: BackendEnv) {
    let urls = c.start_ready_together(2, &pairs(&env)).await;
    let su = c.superuser();
    let store = admin_store(&c, &env).await;
    let before = call_ok(&su, &urls[1], ENCRYPT_PATH, json!({"plaintext": "b25l"})).await;
    assert_eq!(key_id_of(&before), 1);
    call_ok(
        &su,
        &urls[1],
        SECRETS,
        json!({"path": "s/1", "values": {"v": "one"}}),
    )
    .await;
    assert_eq!(record_keys(&store, "s/1").await, (vec![1], 1));
    let genuine = keyring(&store).await.unwrap().value;
    for (name, path) in [
        ("w", "/app/w"),
        ("recover", "/spike/pilot/role/recover"),
        ("restore", "/spike/pilot/role/restore"),
    ] {
        let client = c.api_client(name, path);
        let (s, b) = call(&client, &urls[0], ROTATE, json!({})).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{name}: {b}");
    }
    assert_eq!(
        keyring(&store).await.unwrap().value,
        genuine,
        "refused: nothing changed"
    );
    let rotated = call_ok(&su, &urls[0], ROTATE, json!({})).await;
    assert_eq!(rotated["currentKey"], 2, "{rotated}");
    let ids: Vec<_> = rotated["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_u64().unwrap(),
                k["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            (0, "active".to_string()),
            (1, "active".into()),
            (2, "active".into())
        ]
    );
    let after = call_ok(&su, &urls[1], ENCRYPT_PATH, json!({"plaintext": "dHdv"})).await;
    assert_eq!(
        key_id_of(&after),
        2,
        "the other instance seals under the new key at once"
    );
    call_ok(
        &su,
        &urls[1],
        SECRETS,
        json!({"path": "s/1", "values": {"v": "two"}}),
    )
    .await;
    assert_eq!(
        record_keys(&store, "s/1").await,
        (vec![1, 2], 2),
        "the new version and the record's MAC are under the new key; the old version as it was"
    );
    call_ok(
        &su,
        &urls[1],
        "/v1/acl/policy",
        json!({"name": "w", "spiffeidPattern": "^spiffe://spike\\.ist/app/w$", "pathPattern": "^s/", "permissions": ["read"]}),
    )
    .await;
    let book = store
        .get(Namespace::System, "policy-book")
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(
        (&book[..8], &book[16..20]),
        (&b"spkbook2"[..], &[0u8, 0, 0, 2][..]),
        "the policy book is sealed under the new key and names it"
    );
    let w = c.api_client("w", "/app/w");
    let (s, b) = call(&w, &urls[0], GET, json!({"path": "s/1"})).await;
    assert_eq!((s, &b["data"]["v"]), (StatusCode::OK, &json!("two")));
    for url in &urls {
        for (version, want) in [(1, "one"), (2, "two")] {
            let b = call_ok(&su, url, GET, json!({"path": "s/1", "version": version})).await;
            assert_eq!(b["data"]["v"], want);
        }
    }
    for url in &urls {
        let b = call_ok(&su, url, DECRYPT_PATH, before.clone()).await;
        assert_eq!(b, json!({"plaintext": "b25l"}));
        let b = call_ok(&su, url, DECRYPT_PATH, after.clone()).await;
        assert_eq!(b, json!({"plaintext": "dHdv"}));
    }
    // Edited while running: refused on the next use, on every instance, and left as it is.
    let current = keyring(&store).await.unwrap().value;
    let mut edited = current.clone();
    let last = edited.len() - 1;
    edited[last] ^= 1;
    overwrite(&store, edited.clone()).await;
    for url in &urls {
        let (s, b) = call(&su, url, ENCRYPT_PATH, json!({"plaintext": "eA=="})).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{b}");
    }
    assert!(
        c.nexus[0].logs().contains("keyring is refused"),
        "{}",
        c.nexus[0].logs()
    );
    assert_eq!(keyring(&store).await.unwrap().value, edited);
    overwrite(&store, current).await;
    let b = call_ok(&su, &urls[1], DECRYPT_PATH, after).await;
    assert_eq!(b, json!({"plaintext": "dHdv"}));

    // The command line: the superuser rotates to key 3; another identity is told what it needs.
    let url = urls[0].to_string();
    let su_svid = c.pki.issue("superuser-cli", "/spike/pilot/role/superuser");
    let (code, out, err) = run_spike(
        &["operator", "rotate", "--format", "json"],
        &client_env(&url, &su_svid),
    );
    assert_eq!(code, 0, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["currentKey"], 3, "{out}");
    let (code, out, _) = run_spike(&["operator", "rotate"], &client_env(&url, &su_svid));
    assert_eq!(code, 0);
    assert!(out.starts_with("data key 4 is current"), "{out}");
    let sealed = call_ok(&su, &urls[1], ENCRYPT_PATH, json!({"plaintext": "eA=="})).await;
    assert_eq!(key_id_of(&sealed), 4);
    let w_svid = c.pki.issue("w-cli", "/app/w");
    let (code, _, err) = run_spike(&["operator", "rotate"], &client_env(&url, &w_svid));
    assert_ne!(code, 0);
    assert!(err.contains("superuser role"), "{err}");
}

/// The metrics page of a Nexus started with `SPIKE_NEXUS_METRICS_ADDR=127.0.0.1:0`.
async fn scrape(proc: &Proc) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: std::net::SocketAddr = proc
        .logs()
        .split("serving metrics at http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("the metrics address in the log");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    text
}

/// Every secret record and the policy book, as (path, version keys, MAC key); the book as
/// ("policy-book", [its key], its key).
async fn store_keys(store: &AnyStore) -> Vec<(String, Vec<u64>, u64)> {
    let mut out = Vec::new();
    for path in store.list(Namespace::Secrets, "").await.unwrap() {
        let (versions, mac) = record_keys(store, &path).await;
        out.push((path, versions, mac));
    }
    let book = store
        .get(Namespace::System, "policy-book")
        .await
        .unwrap()
        .unwrap()
        .value;
    let id = if &book[..8] == b"spkbook2" {
        u64::from(u32::from_be_bytes(book[16..20].try_into().unwrap()))
    } else {
        0
    };
    out.push(("policy-book".into(), vec![id], id));
    out
}

/// A re-encryption pass started through one instance rewrites every record under older data
/// keys — deleted versions and the policy book included — and leaves none naming them; every
/// value reads back the same through every instance. Retiring is refused for the current key,
/// an unknown one, and one that records still name; accepted once the pass is done; a retired
/// key seals nothing new but still opens cipher output made under it. A workload may not start
/// a pass or retire a key.
async fn reencryption_leaves_no_record_on_an_old_key(mut c: Cluster, env: BackendEnv) {
    let mut extra = pairs(&env);
    extra.push(("SPIKE_NEXUS_METRICS_ADDR", "127.0.0.1:0"));
    let urls = c.start_ready_together(2, &extra).await;
    let su = c.superuser();
    let store = admin_store(&c, &env).await;
    for i in 0..30 {
        let path = format!("r/{i}");
        call_ok(
            &su,
            &urls[i % 2],
            SECRETS,
            json!({"path": path, "values": {"v": format!("a{i}")}}),
        )
        .await;
        if i % 3 == 0 {
            call_ok(
                &su,
                &urls[0],
                SECRETS,
                json!({"path": path, "values": {"v": format!("b{i}")}}),
            )
            .await;
        }
    }
    call_ok(
        &su,
        &urls[0],
        "/v1/store/secrets?action=delete",
        json!({"path": "r/3", "versions": [1]}),
    )
    .await;
    call_ok(
        &su,
        &urls[0],
        "/v1/acl/policy",
        json!({"name": "w", "spiffeidPattern": "^spiffe://spike\\.ist/app/w$", "pathPattern": "^r/", "permissions": ["read"]}),
    )
    .await;
    let sealed = call_ok(&su, &urls[0], ENCRYPT_PATH, json!({"plaintext": "b2xk"})).await;
    assert!(
        store_keys(&store)
            .await
            .iter()
            .all(|(_, v, m)| v.iter().all(|k| *k == 1) && *m == 1)
    );
    let retire = |id: u32| json!({ "id": id });
    for (id, why) in [(1, "the current key"), (9, "an unknown key")] {
        let (s, b) = call(&su, &urls[1], RETIRE, retire(id)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{why}: {b}");
    }
    call_ok(&su, &urls[0], ROTATE, json!({})).await;
    let (s, b) = call(&su, &urls[1], RETIRE, retire(1)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "records still name key 1: {b}");
    let w = c.api_client("w", "/app/w");
    for (path, body) in [(REENCRYPT, json!({})), (RETIRE, retire(1))] {
        let (s, _) = call(&w, &urls[0], path, body).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
    }

    call_ok(&su, &urls[1], REENCRYPT, json!({})).await;
    wait_for(
        "the re-encryption pass",
        Duration::from_secs(30),
        || async {
            c.nexus[1]
                .logs()
                .contains("re-encryption finished")
                .then_some(())
        },
    )
    .await;
    let metrics = scrape(&c.nexus[1]).await;
    assert!(
        metrics.contains("spike_nexus_reencrypted_records_total{result=\"rewritten\"} 30")
            && metrics.contains("spike_nexus_data_key_current 2"),
        "{metrics}"
    );
    let keys = store_keys(&store).await;
    assert!(
        keys.iter()
            .all(|(_, v, m)| v.iter().all(|k| *k == 2) && *m == 2),
        "no record names key 1 any more: {keys:?}"
    );
    assert_eq!(keys.len(), 31);
    for url in &urls {
        for i in 0..30 {
            let latest = if i % 3 == 0 {
                format!("b{i}")
            } else {
                format!("a{i}")
            };
            let b = call_ok(&su, url, GET, json!({"path": format!("r/{i}")})).await;
            assert_eq!(b["data"]["v"], latest.as_str());
        }
        let b = call_ok(&su, url, GET, json!({"path": "r/0", "version": 1})).await;
        assert_eq!(b["data"]["v"], "a0");
        let (s, b) = call(&w, url, GET, json!({"path": "r/4"})).await;
        assert_eq!((s, &b["data"]["v"]), (StatusCode::OK, &json!("a4")));
    }
    // The deleted version was rewritten too: undeleted, it reads as it was.
    call_ok(
        &su,
        &urls[1],
        "/v1/store/secrets?action=undelete",
        json!({"path": "r/3", "versions": [1]}),
    )
    .await;
    let b = call_ok(&su, &urls[0], GET, json!({"path": "r/3", "version": 1})).await;
    assert_eq!(b["data"]["v"], "a3");

    let retired = call_ok(&su, &urls[1], RETIRE, retire(1)).await;
    assert_eq!(retired["currentKey"], 2);
    assert_eq!(retired["keys"][1]["state"], "retired", "{retired}");
    let again = call_ok(&su, &urls[0], RETIRE, retire(1)).await;
    assert_eq!(
        again["keys"][1]["state"], "retired",
        "retiring twice changes nothing"
    );
    // Cipher output made under key 1 still opens; nothing new is sealed under it.
    for url in &urls {
        let b = call_ok(&su, url, DECRYPT_PATH, sealed.clone()).await;
        assert_eq!(b, json!({"plaintext": "b2xk"}));
    }
    let fresh = call_ok(&su, &urls[0], ENCRYPT_PATH, json!({"plaintext": "bmV3"})).await;
    assert_eq!(key_id_of(&fresh), 2);

    // The command line: a pass resumed finds nothing left; retiring the current key is refused
    // with what to do.
    let url = urls[0].to_string();
    let su_svid = c.pki.issue("superuser-cli", "/spike/pilot/role/superuser");
    let (code, out, err) = run_spike(&["operator", "reencrypt"], &client_env(&url, &su_svid));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("key 1\tretired") && out.contains("re-encryption started"),
        "{out}"
    );
    let (code, _, err) = run_spike(&["operator", "retire", "2"], &client_env(&url, &su_svid));
    assert_eq!(code, 1);
    assert!(err.contains("rotate first"), "{err}");
}

macro_rules! keyring_suite {
    ($name:ident, |$c:ident| $setup:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_store_from_before_the_keyring_is_upgraded_once() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::a_store_from_before_the_keyring_is_upgraded_once($c, env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_rotation_is_used_at_once_by_every_instance() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::a_rotation_is_used_at_once_by_every_instance($c, env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reencryption_leaves_no_record_on_an_old_key() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::reencryption_leaves_no_record_on_an_old_key($c, env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_edited_keyring_is_refused_not_replaced() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::an_edited_keyring_is_refused_not_replaced($c, env).await;
            }
        }
    };
}

keyring_suite!(sqlite, |c| {
    let _ = &c;
    BackendEnv::new()
});

keyring_suite!(postgres, |c| {
    let _ = &c;
    let url = common::postgres::fresh_database().await;
    vec![
        (
            "SPIKE_NEXUS_BACKEND_STORE".to_string(),
            "postgres".to_string(),
        ),
        ("SPIKE_NEXUS_DB_URL".to_string(), url),
    ]
});

keyring_suite!(s3, |c| {
    let _ = &c;
    common::s3::shared_env("keyring")
});

/// The fixture `tests/fixtures/pre-keyring`: a SQLite store, its recovery shards and what was
/// written through it, made by a real deployment of the release before the keyring (its
/// README says how).
const PRE_KEYRING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pre-keyring");

/// The stream-mode cipher of `url`: (status, answer bytes).
async fn stream(
    client: &HttpsClient,
    url: &Uri,
    path: &str,
    data: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let reply = client
        .post(url, path, "application/octet-stream", data)
        .await
        .unwrap();
    (reply.status, reply.body.to_vec())
}

fn unb64(text: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().unwrap())
        .unwrap()
}

/// Checks through `url` that every read the earlier release answered is answered the same:
/// each secret's metadata and every version read (status, and body when found), the secret
/// list, the policies (the deleted one stays deleted, the others are in force for the workloads
/// they name), and both kinds of cipher output open to their plaintexts.
async fn reads_as_the_release_wrote(c: &Cluster, url: &Uri, written: &serde_json::Value) {
    let su = c.superuser();
    for (path, secret) in written["secrets"].as_object().unwrap() {
        let (s, meta) = call(
            &su,
            url,
            &common::action(SECRET_METADATA_PATH, "get"),
            json!({ "path": path }),
        )
        .await;
        assert_eq!((s, &meta), (StatusCode::OK, &secret["metadata"]), "{path}");
        for read in secret["reads"].as_array().unwrap() {
            let mut body = json!({ "path": path });
            if !read["version"].is_null() {
                body["version"] = read["version"].clone();
            }
            let (s, b) = call(&su, url, GET, body).await;
            assert_eq!(
                s.as_u16(),
                read["status"].as_u64().unwrap() as u16,
                "{path} {}: {b}",
                read["version"]
            );
            if s == StatusCode::OK {
                assert_eq!(b, read["body"], "{path} {}", read["version"]);
            }
        }
    }
    let (s, b) = call(&su, url, &common::action(SECRETS_PATH, "list"), json!({})).await;
    assert_eq!((s, &b), (StatusCode::OK, &written["list"]));
    let (s, b) = call(&su, url, &common::action(POLICY_PATH, "list"), json!({})).await;
    assert_eq!((s, &b), (StatusCode::OK, &written["policies"]));
    let (s, b) = call(
        &su,
        url,
        &common::action(POLICY_PATH, "get"),
        json!({ "id": written["policies"]["policies"][0]["name"] }),
    )
    .await;
    assert_eq!(
        (s, &b["pathPattern"]),
        (
            StatusCode::OK,
            &written["policies"]["policies"][0]["pathPattern"]
        ),
        "{b}"
    );
    for name in written["deletedPolicies"].as_array().unwrap() {
        let (s, b) = call(
            &su,
            url,
            &common::action(POLICY_PATH, "get"),
            json!({ "id": name }),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{name}: {b}");
    }
    // The policies are in force for the workloads they name, and only for them.
    let app = c.api_client("app", "/workload/app");
    let (s, b) = call(&app, url, GET, json!({"path": "app/api"})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _) = call(&app, url, GET, json!({"path": "team/cfg"})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let doomed = c.api_client("doomed", "/workload/doomed");
    let (s, _) = call(&doomed, url, GET, json!({"path": "app/api"})).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "the deleted policy grants nothing"
    );
    // Cipher output of the earlier release opens, for the workload its policy names too.
    let cipher = &written["cipher"];
    let user = c.api_client("cipher", "/workload/cipher");
    for client in [&su, &user] {
        let b = call_ok(client, url, DECRYPT_PATH, cipher["json"]["sealed"].clone()).await;
        assert_eq!(b["plaintext"], cipher["json"]["plaintext"]);
        let (s, plain) = stream(
            client,
            url,
            DECRYPT_PATH,
            unb64(&cipher["stream"]["sealed"]),
        )
        .await;
        assert_eq!(
            (s, plain),
            (StatusCode::OK, unb64(&cipher["stream"]["plaintext"]))
        );
    }
}

/// A store the release before the keyring really wrote (not a simulation): three instances of
/// this release start together on it with empty Keepers and wait for a restore, since the root
/// key lives only in the recovery shards that release exported. Restored with
/// `spike recover restore` (the last shard sent to all three at once), every instance becomes
/// ready; exactly one creates the keyring; every secret version, deletion, policy and cipher
/// output reads back through every instance exactly as that release answered. New values are
/// sealed under data key 1; a rotation and a re-encryption pass move every record off the
/// legacy key 0, which can then be retired, and what it sealed still reads; an instance
/// restarted after all this creates no keyring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_by_the_release_before_the_keyring_is_upgraded() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fixture = std::path::Path::new(PRE_KEYRING);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("written.json")).unwrap())
            .unwrap();
    let mut c = Cluster::new(3);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&c.data_dir)
        .unwrap();
    let db = c.data_dir.join("spike.db");
    std::fs::copy(fixture.join("store/spike.db"), &db).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
    let store = admin_store(&c, &[]).await;
    assert!(
        keyring(&store).await.is_none(),
        "the fixture predates the keyring"
    );
    let legacy = store_keys(&store).await;
    assert!(
        legacy
            .iter()
            .all(|(_, v, m)| v.iter().all(|k| *k == 0) && *m == 0),
        "every record is under the legacy key: {legacy:?}"
    );

    let anon = c.anonymous();
    let urls: Vec<Uri> = c
        .start_nexus_together(3, &[("SPIKE_NEXUS_METRICS_ADDR", "127.0.0.1:0")])
        .into_iter()
        .map(|i| c.nexus[i].url())
        .collect();
    for url in &urls {
        wait_status(&anon, url, "awaiting_restore").await;
    }
    assert!(keyring(&store).await.is_none(), "no key, no keyring");
    // Every instance gets recovery shard 1, then all three get shard 3 at once: each that
    // still waits rebuilds the key and tries to create the keyring, so the creation races.
    let restorer = c.pki.issue("restorer", "/spike/pilot/role/restore");
    let shard = |i: u32| fixture.join(format!("shards/spike.recovery.{i}.txt"));
    let targets: Vec<String> = c.nexus.iter().map(Proc::base_url).collect();
    for target in &targets {
        let (code, _, err) = run_spike(
            &[
                "recover",
                "restore",
                "--nexus",
                target,
                shard(1).to_str().unwrap(),
            ],
            &client_env(target, &restorer),
        );
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("1 collected, 1 more needed"), "{err}");
    }
    let last = shard(3);
    let restores: Vec<_> = targets
        .iter()
        .map(|target| {
            spike_command(
                &[
                    "recover",
                    "restore",
                    "--nexus",
                    target,
                    last.to_str().unwrap(),
                ],
                &client_env(target, &restorer),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let mut restored = 0;
    for child in restores {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // An instance that already took the key from the Keepers another one refilled
        // refuses the restore as healthy (exit 1); that is the only other outcome allowed.
        match out.status.code() {
            Some(0) => {
                assert!(err.contains("restored"), "{err}");
                restored += 1;
            }
            Some(1) => {}
            other => panic!("restore exited with {other:?}: {err}"),
        }
    }
    assert!(restored >= 1);
    println!("{restored} of 3 instances were restored from the shards at once");
    let mut key_ids = Vec::new();
    for url in &urls {
        key_ids.push(wait_status(&anon, url, "ready").await["key_id"].clone());
    }
    assert!(key_ids.iter().all(|k| *k == key_ids[0]), "{key_ids:?}");
    let logs: String = c.nexus.iter().map(Proc::logs).collect();
    assert_eq!(
        logs.matches("created the keyring: data key 1").count(),
        1,
        "exactly one instance creates the keyring:\n{logs}"
    );
    println!(
        "{} instance(s) lost the race to create it",
        logs.matches("another Nexus instance created the keyring first")
            .count()
    );
    let system = store.list(Namespace::System, "").await.unwrap();
    assert_eq!(
        system.iter().filter(|k| *k == KEYRING).count(),
        1,
        "{system:?}"
    );
    let created = keyring(&store).await.unwrap();

    for url in &urls {
        reads_as_the_release_wrote(&c, url, &written).await;
    }
    assert_eq!(store_keys(&store).await, legacy, "reading rewrote nothing");

    // New values are sealed under the keyring's data key 1; old ones still read.
    let su = c.superuser();
    call_ok(
        &su,
        &urls[1],
        SECRETS,
        json!({"path": "new/after", "values": {"v": "fresh"}}),
    )
    .await;
    assert_eq!(record_keys(&store, "new/after").await, (vec![1], 1));
    let fresh = call_ok(&su, &urls[2], ENCRYPT_PATH, json!({"plaintext": "bmV3"})).await;
    assert_eq!(key_id_of(&fresh), 1);
    for url in &urls {
        let b = call_ok(&su, url, GET, json!({"path": "new/after"})).await;
        assert_eq!(b["data"]["v"], "fresh");
        let b = call_ok(&su, url, GET, json!({"path": "app/db", "version": 1})).await;
        assert_eq!(b, written["secrets"]["app/db"]["reads"][0]["body"]);
    }

    // Rotate, re-encrypt, and the legacy key can go.
    let retire = |id: u32| json!({ "id": id });
    let (s, b) = call(&su, &urls[0], RETIRE, retire(0)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "records still name key 0: {b}");
    let rotated = call_ok(&su, &urls[0], ROTATE, json!({})).await;
    assert_eq!(rotated["currentKey"], 2, "{rotated}");
    call_ok(&su, &urls[1], REENCRYPT, json!({})).await;
    wait_for(
        "the re-encryption pass",
        Duration::from_secs(30),
        || async {
            c.nexus[1]
                .logs()
                .contains("re-encryption finished")
                .then_some(())
        },
    )
    .await;
    let keys = store_keys(&store).await;
    assert!(
        keys.iter()
            .all(|(_, v, m)| v.iter().all(|k| *k == 2) && *m == 2),
        "no record names key 0 or 1 any more: {keys:?}"
    );
    assert_eq!(keys.len(), legacy.len() + 1, "{keys:?}");
    let metrics = scrape(&c.nexus[1]).await;
    let rewritten = format!(
        "spike_nexus_reencrypted_records_total{{result=\"rewritten\"}} {}",
        keys.len() - 1
    );
    assert!(metrics.contains(&rewritten), "{rewritten}\n{metrics}");
    for id in [0, 1] {
        let b = call_ok(&su, &urls[2], RETIRE, retire(id)).await;
        assert_eq!(b["keys"][id as usize]["state"], "retired", "{b}");
    }
    // The list now holds new/after as well; everything else reads exactly as before.
    let mut after = written.clone();
    let mut paths: Vec<String> = serde_json::from_value(written["list"]["keys"].clone()).unwrap();
    paths.push("new/after".into());
    paths.sort();
    after["list"] = json!({ "keys": paths });
    for url in &urls {
        reads_as_the_release_wrote(&c, url, &after).await;
        let b = call_ok(&su, url, DECRYPT_PATH, fresh.clone()).await;
        assert_eq!(b, json!({"plaintext": "bmV3"}));
    }
    let settled = keyring(&store).await.unwrap();
    assert_ne!(settled.revision, created.revision, "rotated and retired");
    // An instance restarted later takes the key from the Keepers and reads the keyring: it
    // creates none and serves what the old release wrote.
    c.nexus[2].restart();
    wait_status(&anon, &c.nexus[2].url(), "ready").await;
    reads_as_the_release_wrote(&c, &c.nexus[2].url(), &after).await;
    let logs: String = c.nexus.iter().map(Proc::logs).collect();
    assert_eq!(
        logs.matches("created the keyring: data key 1").count(),
        1,
        "{logs}"
    );
    assert_eq!(keyring(&store).await.unwrap().revision, settled.revision);
}
