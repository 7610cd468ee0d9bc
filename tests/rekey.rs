#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! `spike operator rekey` (decision 34) with real Nexus and Keeper processes on one shared
//! store (SQLite file, PostgreSQL): a rotation and a rekey from 3 Keepers / threshold 2 to 5 / 3
//! under a steady load through three instances with no failed request and every acknowledged
//! write readable after; two rekeys at once; a Nexus killed in the middle of one; recovery
//! shards from before a rekey refused, new ones restoring after every Keeper is lost; an audit
//! trail that spans a rekey; a rekey that drops a Keeper; an instance started with the new
//! configuration; the bad input (a threshold above the Keeper count, unreachable new Keepers, a
//! rotate or a rekey while the store is down) refused with nothing changed; and the store
//! going down in the middle of a rekey.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use hyper::{StatusCode, Uri};
use serde_json::json;
use spike::store::{Namespace, Store};

const REKEY: &str = "/v1/operator/rekey";
const ROTATE: &str = "/v1/operator/rotate";
const JOURNAL: &str = "rekey";

type BackendEnv = Vec<(String, String)>;

/// The key id every instance reports on `/health`, once they all agree and are ready.
async fn agreed_key_id(c: &Cluster, urls: &[Uri]) -> String {
    let anon = c.anonymous();
    let mut ids = BTreeSet::new();
    for url in urls {
        let body = wait_status(&anon, url, "ready").await;
        ids.insert(body["key_id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        ids.len(),
        1,
        "instances disagree: {ids:?}\n{}",
        c.dump_logs()
    );
    ids.into_iter().next().unwrap()
}

/// Waits until every instance reports `key_id` on `/health`.
async fn every_instance_uses(c: &Cluster, urls: &[Uri], key_id: &str) {
    let anon = c.anonymous();
    for url in urls {
        wait_for(
            "an instance to use the new root key",
            Duration::from_secs(60),
            || async {
                let (_, body) = health(&anon, url).await?;
                (body["key_id"] == key_id).then_some(())
            },
        )
        .await;
    }
}

/// The key id that the shards held by the Keepers at `indices` rebuild.
async fn keepers_key_id(c: &Cluster, indices: &[usize]) -> String {
    let mut shares = Vec::new();
    for &i in indices {
        let (index, value) = c.keeper_shard(i).await.expect("the Keeper holds a shard");
        shares.push(spike::crypto::Share::new(index.unwrap(), value).unwrap());
    }
    spike::crypto::combine(&shares).unwrap().key_id()
}

/// What the steady load saw.
#[derive(Default, Debug)]
struct Load {
    acked: BTreeMap<String, String>,
    failures: Vec<String>,
    requests: usize,
}

/// One worker of the steady load: writes distinct paths round-robin through `urls`, reads each
/// back through the next instance, and encrypts and decrypts through two others, until `stop`
/// (or a hard bound on operations). Every answer that is not 200 is a failure.
async fn worker(
    su: spike::transport::HttpsClient,
    urls: Vec<Uri>,
    w: usize,
    stop: Arc<AtomicBool>,
) -> Load {
    let mut load = Load::default();
    for n in 0..20_000usize {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let at = |k: usize| &urls[(n + w + k) % urls.len()];
        let (path, value) = (format!("load/{w}/{n}"), format!("v{w}-{n}"));
        let (s, b) = call(
            &su,
            at(0),
            SECRETS_PATH,
            json!({"path": path, "values": {"v": value}}),
        )
        .await;
        load.requests += 1;
        if s != StatusCode::OK {
            load.failures.push(format!("put {path}: {s} {b}"));
            continue;
        }
        load.acked.insert(path.clone(), value.clone());
        let (s, b) = call(
            &su,
            at(1),
            &action(SECRETS_PATH, "get"),
            json!({"path": path}),
        )
        .await;
        load.requests += 1;
        if s != StatusCode::OK || b["data"]["v"] != value.as_str() {
            load.failures.push(format!("get {path}: {s} {b}"));
        }
        let (s, sealed) = call(&su, at(2), ENCRYPT_PATH, json!({"plaintext": "aGVsbG8="})).await;
        load.requests += 1;
        if s != StatusCode::OK {
            load.failures.push(format!("encrypt: {s} {sealed}"));
            continue;
        }
        let (s, b) = call(&su, at(0), DECRYPT_PATH, sealed).await;
        load.requests += 1;
        if s != StatusCode::OK || b["plaintext"] != "aGVsbG8=" {
            load.failures.push(format!("decrypt: {s} {b}"));
        }
    }
    load
}

struct Steady {
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<Load>,
}

impl Steady {
    /// `workers` superuser workers, plus one workload worker when `workload` is given (a
    /// workload's requests go through its policies, which read the keyring on their own).
    fn start(
        c: &Cluster,
        urls: &[Uri],
        workers: usize,
        workload: Option<spike::transport::HttpsClient>,
    ) -> Steady {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers {
            tasks.spawn(worker(c.superuser(), urls.to_vec(), w, Arc::clone(&stop)));
        }
        if let Some(client) = workload {
            tasks.spawn(worker(client, urls.to_vec(), workers, Arc::clone(&stop)));
        }
        Steady { stop, tasks }
    }

    async fn stop(self) -> Load {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Load::default();
        for l in join_all(self.tasks).await {
            all.acked.extend(l.acked);
            all.failures.extend(l.failures);
            all.requests += l.requests;
        }
        all
    }
}

/// Waits until the load has made `n` more acknowledged writes (counted in the store's list).
async fn writes_land(su: &spike::transport::HttpsClient, url: &Uri, at_least: usize) {
    wait_for("the load to write", Duration::from_secs(60), || async {
        let (s, b) = call(su, url, &action(SECRETS_PATH, "list"), json!({})).await;
        (s == StatusCode::OK && b["keys"].as_array().is_some_and(|k| k.len() >= at_least))
            .then_some(())
    })
    .await;
}

/// Every acknowledged write reads back, with its value, through every instance.
async fn all_readable(c: &Cluster, urls: &[Uri], acked: &BTreeMap<String, String>) {
    let acked: Vec<(&str, &str)> = acked
        .iter()
        .map(|(p, v)| (p.as_str(), v.as_str()))
        .collect();
    reads_back(&c.superuser(), urls, &acked).await;
}

/// Writes `{"v": value}` at `path` through `url`; it must be acknowledged.
async fn put_v(su: &spike::transport::HttpsClient, url: &Uri, path: &str, value: &str) {
    call_ok(
        su,
        url,
        SECRETS_PATH,
        json!({"path": path, "values": {"v": value}}),
    )
    .await;
}

/// Every `(path, value)` reads back `{"v": value}` through every one of `urls`.
async fn reads_back(su: &spike::transport::HttpsClient, urls: &[Uri], expected: &[(&str, &str)]) {
    for url in urls {
        for (path, value) in expected {
            let b = call_ok(su, url, &action(SECRETS_PATH, "get"), json!({"path": path})).await;
            assert_eq!(b["data"]["v"], *value, "{path} via {url}");
        }
    }
}

/// The issue's scenario: three instances under a steady mix of reads, writes and cipher
/// calls; a rotation through one instance, then a rekey from 3/2 to 5/3 with two new Keepers
/// through another. Not one request fails, every instance ends on the new key (without a
/// restart), every acknowledged write reads back everywhere, all five Keepers hold shards of
/// the new key (any three rebuild it, two do not), and `/health` says the recovery shards
/// have not been exported since, until they are.
async fn rotate_and_rekey_under_load(mut c: Cluster, env: BackendEnv) {
    let urls = c.start_ready_together(3, &pairs(&env)).await;
    let old = agreed_key_id(&c, &urls).await;
    let su = c.superuser();
    call_ok(
        &su,
        &urls[0],
        POLICY_PATH,
        json!({"name": "load", "spiffeidPattern": "^spiffe://spike.ist/workload/load$",
               "pathPattern": "^(load/|spike/system/cipher/exec$)",
               "permissions": ["read", "write", "execute"]}),
    )
    .await;
    let workload = c.api_client("load-workload", "/workload/load");
    let load = Steady::start(&c, &urls, 3, Some(workload));
    writes_land(&su, &urls[0], 10).await;

    let rotated = call_ok(&su, &urls[0], ROTATE, json!({})).await;
    assert_eq!(rotated["currentKey"], 2, "{rotated}");
    writes_land(&su, &urls[1], 30).await;

    let (k4, k5) = (c.add_keeper(), c.add_keeper());
    let keepers: Vec<String> = c
        .keepers
        .iter()
        .map(|k| k.url().to_string().trim_end_matches('/').to_string())
        .collect();
    let answer = call_ok(
        &su,
        &urls[1],
        REKEY,
        json!({"threshold": 3, "keepers": keepers}),
    )
    .await;
    println!("rekey answered: {answer}");
    let new = answer["keyId"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(answer["previousKeyId"], old.as_str());
    assert_eq!(answer["threshold"], 3);
    every_instance_uses(&c, &urls, &new).await;
    let before = c.superuser();
    writes_land(&before, &urls[2], 60).await;
    let load = load.stop().await;
    println!(
        "steady load across the rotation and the rekey: {} requests, {} acknowledged writes, {} failed",
        load.requests,
        load.acked.len(),
        load.failures.len()
    );
    assert!(
        load.failures.is_empty(),
        "{:?}\n{}",
        load.failures,
        c.dump_logs()
    );
    all_readable(&c, &urls, &load.acked).await;

    // Five Keepers, threshold 3: any three rebuild the new key, two do not.
    assert_eq!(keepers_key_id(&c, &[0, 2, k5]).await, new);
    assert_eq!(keepers_key_id(&c, &[1, 3, 4]).await, new);
    assert_ne!(keepers_key_id(&c, &[0, k4]).await, new);
    // The journal is gone; the store's record names the new key and the one it replaced.
    let store = admin_store(&c, &env).await;
    assert!(
        store
            .get(Namespace::System, JOURNAL)
            .await
            .unwrap()
            .is_none()
    );
    let record: serde_json::Value = serde_json::from_slice(
        &store
            .get(Namespace::System, "root-key")
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    assert_eq!(record["key_id"], new.as_str());
    assert_eq!(record["previous"][0]["key_id"], old.as_str());

    // Recovery shards: not exported since the rekey, on /health and in the metrics, until an
    // export (which works at once).
    let anon = c.anonymous();
    for url in &urls {
        let (_, body) = health(&anon, url).await.unwrap();
        assert_eq!(body["recovery_shards"], "not_exported", "{body}");
        assert_eq!(body["threshold"], 3, "{body}");
    }
    let dir = c.dir.path().join("recovery-new");
    c.export_recovery_shards(&urls[0].to_string(), &dir);
    for url in &urls {
        let (_, body) = health(&anon, url).await.unwrap();
        assert_eq!(body["recovery_shards"], "exported", "{body}");
    }
    // An instance started now, still configured with the three old Keepers and threshold 2,
    // uses the deployment's record: it becomes ready on the new key.
    let late = c.start_nexus(&pairs(&env));
    let url = c.nexus[late].url();
    let body = wait_status(&anon, &url, "ready").await;
    assert_eq!(body["key_id"], new.as_str(), "{body}");
    assert!(
        c.nexus[late]
            .logs()
            .contains("differs from this instance's SPIKE_NEXUS_SHAMIR"),
        "{}",
        c.nexus[late].logs()
    );
}

/// Two rekeys sent at once through two instances: exactly one new root key; the other is
/// refused with a reason (or finds the key already replaced), and every instance and every
/// Keeper ends on the one key.
async fn two_rekeys_at_once_make_one_key(mut c: Cluster, env: BackendEnv) {
    let urls = c.start_ready_together(2, &pairs(&env)).await;
    let old = agreed_key_id(&c, &urls).await;
    let su = c.superuser();
    let (a, b) = tokio::join!(
        call(&su, &urls[0], REKEY, json!({})),
        call(&su, &urls[1], REKEY, json!({}))
    );
    println!("two rekeys at once: {} {} / {} {}", a.0, a.1, b.0, b.1);
    let winners: Vec<_> = [&a, &b]
        .into_iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .collect();
    assert_eq!(winners.len(), 1, "{a:?} {b:?}\n{}", c.dump_logs());
    let loser = if a.0 == StatusCode::OK { &b } else { &a };
    assert_eq!(loser.0, StatusCode::CONFLICT, "{loser:?}");
    assert!(
        loser.1["reason"].as_str().unwrap().contains("rekey"),
        "{loser:?}"
    );
    let new = winners[0].1["keyId"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    every_instance_uses(&c, &urls, &new).await;
    assert_eq!(keepers_key_id(&c, &[0, 1]).await, new);
    assert_eq!(keepers_key_id(&c, &[1, 2]).await, new);
}

/// Recovery shards exported before a rekey are refused, saying they predate it; those
/// exported after restore the deployment once every Keeper is lost, and what was written
/// before and after the rekey reads back.
async fn old_recovery_shards_are_refused_new_ones_restore(mut c: Cluster, env: BackendEnv) {
    let urls = c.start_ready_together(1, &pairs(&env)).await;
    let su = c.superuser();
    put_v(&su, &urls[0], "before", "1").await;
    let old_dir = c.dir.path().join("recovery-old");
    c.export_recovery_shards(&urls[0].to_string(), &old_dir);
    let answer = call_ok(&su, &urls[0], REKEY, json!({})).await;
    let new = answer["keyId"].as_str().unwrap().to_string();
    put_v(&su, &urls[0], "after", "2").await;
    let new_dir = c.dir.path().join("recovery-new");
    c.export_recovery_shards(&urls[0].to_string(), &new_dir);

    // Every Keeper lost (restarted empty), then Nexus restarted: it waits for a restore.
    for k in c.keepers.iter_mut() {
        k.restart();
    }
    c.nexus[0].restart();
    let url = c.nexus[0].url();
    wait_status(&c.anonymous(), &url, "awaiting_restore").await;

    let restorer = c.pki.issue("restore-op", "/spike/pilot/role/restore");
    let restore = |file: std::path::PathBuf| {
        run_spike(
            &[
                "recover",
                "restore",
                "--nexus",
                &url.to_string(),
                file.to_str().unwrap(),
            ],
            &client_env(&url.to_string(), &restorer),
        )
    };
    let (code, out, err) = restore(old_dir.join("spike.recovery.1.txt"));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = restore(old_dir.join("spike.recovery.2.txt"));
    println!("an old shard after the rekey: exit {code}: {out}{err}");
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("predate the rekey"), "{out}{err}");
    let (_, body) = health(&c.anonymous(), &url).await.unwrap();
    assert_eq!(body["status"], "awaiting_restore", "{body}");

    for i in 1..=2 {
        let (code, out, err) = restore(new_dir.join(format!("spike.recovery.{i}.txt")));
        assert_eq!(code, 0, "{out}{err}");
    }
    let body = wait_status(&c.anonymous(), &url, "ready").await;
    assert_eq!(body["key_id"], new.as_str());
    reads_back(
        &su,
        std::slice::from_ref(&url),
        &[("before", "1"), ("after", "2")],
    )
    .await;
}

/// Starts a rekey through `url` to every Keeper of `c` and `silent` (a listener that never
/// answers, which holds the rekey in its push step), threshold 3, and returns once its
/// journal is in the store: the request's task and the new key's id.
async fn rekey_held_in_its_push(
    c: &Cluster,
    su: &spike::transport::HttpsClient,
    url: &Uri,
    store: &spike::store::AnyStore,
    silent: &std::net::TcpListener,
) -> (
    tokio::task::JoinHandle<(StatusCode, serde_json::Value)>,
    String,
) {
    let mut keepers = c.keeper_urls();
    keepers.push(format!("https://{}", silent.local_addr().unwrap()));
    let (su, url) = (su.clone(), url.clone());
    let rekey = tokio::spawn(async move {
        call(
            &su,
            &url,
            REKEY,
            json!({"threshold": 3, "keepers": keepers}),
        )
        .await
    });
    let to = wait_for("the rekey journal", Duration::from_secs(20), || async {
        let entry = store.get(Namespace::System, JOURNAL).await.unwrap()?;
        let j: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
        Some(j["to"].as_str().unwrap().to_string())
    })
    .await;
    (rekey, to)
}

/// A Nexus killed while its rekey is pushing shards (one new Keeper does not answer, which
/// holds the rekey in that step): restarted, it becomes ready on the key the store names; the
/// rekey left behind, never committed, is undone once it has been idle long enough (the old
/// key's shards back on the Keepers); the other instance never stops serving; a rekey after
/// that works.
async fn a_nexus_killed_during_a_rekey(mut c: Cluster, env: BackendEnv) {
    let mut env = env;
    env.push(("SPIKE_NEXUS_KEEPER_TIMEOUT".into(), "1s".into()));
    let urls = c.start_ready_together(2, &pairs(&env)).await;
    let old = agreed_key_id(&c, &urls).await;
    let su = c.superuser();
    put_v(&su, &urls[1], "kept", "1").await;
    // A "Keeper" that accepts connections and never answers the handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    c.add_keeper();
    let store = admin_store(&c, &env).await;
    let (rekey, _) = rekey_held_in_its_push(&c, &su, &urls[0], &store, &silent).await;
    c.nexus[0].kill();
    let answered = rekey.await.unwrap();
    println!("the killed initiator's client saw: {answered:?}");
    // The other instance serves throughout.
    put_v(&su, &urls[1], "during", "2").await;
    c.nexus[0].restart();
    let restarted = c.nexus[0].url();
    let body = wait_status(&c.anonymous(), &restarted, "ready").await;
    println!("restarted in the middle of a rekey: {body}");
    // The journal is undone by an instance that holds the old key once it has gone quiet
    // (nothing of it was committed): both instances stay on the old key, and the Keepers get
    // its shards back.
    wait_for(
        "the rekey to be undone",
        Duration::from_secs(120),
        || async {
            store
                .get(Namespace::System, JOURNAL)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    let urls = vec![restarted, urls[1].clone()];
    assert_eq!(agreed_key_id(&c, &urls).await, old);
    let logs = c.dump_logs();
    assert!(
        logs.contains("undoing a rekey whose initiator went quiet"),
        "{logs}"
    );
    wait_for(
        "the old key's shards back on the Keepers",
        Duration::from_secs(60),
        || async { (keepers_key_id(&c, &[0, 1]).await == old).then_some(()) },
    )
    .await;
    assert_eq!(keepers_key_id(&c, &[1, 2]).await, old);
    // And a rekey through the restarted instance now works.
    let answer = call_ok(&su, &urls[0], REKEY, json!({})).await;
    let new = answer["keyId"].as_str().unwrap().to_string();
    every_instance_uses(&c, &urls, &new).await;
    reads_back(&su, &urls, &[("kept", "1"), ("during", "2")]).await;
    drop(silent);
}

/// Bad input changes nothing: a threshold above the Keeper count (server and CLI), a Keeper
/// URL that is not HTTPS, and new Keepers that do not answer (fewer than the threshold
/// confirm): clear errors, the same root key everywhere, the Keepers still holding it, no
/// journal left, and the data readable.
async fn bad_rekeys_change_nothing(mut c: Cluster, env: BackendEnv) {
    let urls = c.start_ready_together(2, &pairs(&env)).await;
    let old = agreed_key_id(&c, &urls).await;
    let su = c.superuser();
    put_v(&su, &urls[0], "x", "1").await;
    let peers: Vec<String> = c.peers().split(',').map(String::from).collect();
    for (body, says) in [
        (
            json!({"threshold": 4}),
            "threshold must be between 1 and the number of Keepers (3)",
        ),
        (json!({"threshold": 0}), "threshold must be between 1"),
        (json!({"keepers": ["http://127.0.0.1:1"]}), "https"),
        (json!({"keepers": [peers[0], peers[0]]}), "listed twice"),
        (json!({"keepers": []}), "between 1 and 255 Keepers"),
        (json!({"threshold": "two"}), ""),
    ] {
        let (s, b) = call(&su, &urls[0], REKEY, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {b}");
        assert!(
            b["reason"].as_str().unwrap_or("").contains(says),
            "{body}: {b}"
        );
    }
    // Two new Keepers that do not exist and threshold 3 of 4: two confirm, three needed.
    let mut keepers = peers.clone();
    keepers.truncate(2);
    keepers.push("https://127.0.0.1:1".into());
    keepers.push("https://127.0.0.1:2".into());
    let (s, b) = call(
        &su,
        &urls[1],
        REKEY,
        json!({"threshold": 3, "keepers": keepers}),
    )
    .await;
    println!("unreachable new Keepers: {s} {b}");
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{b}");
    let reason = b["reason"].as_str().unwrap();
    assert!(
        reason.contains("only 2 of the 4 Keepers confirmed"),
        "{reason}"
    );
    assert!(reason.contains("https://127.0.0.1:1"), "{reason}");
    assert!(
        reason.contains(&format!("key {old} is still the root key")),
        "{reason}"
    );
    let store = admin_store(&c, &env).await;
    assert!(
        store
            .get(Namespace::System, JOURNAL)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(agreed_key_id(&c, &urls).await, old);
    for pair in [[0, 1], [1, 2], [0, 2]] {
        assert_eq!(keepers_key_id(&c, &pair).await, old, "Keepers {pair:?}");
    }
    reads_back(&su, &urls[..1], &[("x", "1")]).await;

    // The command line checks the sharing before sending anything, with the same rule.
    let svid = c.pki.issue("superuser-cli", "/spike/pilot/role/superuser");
    let url = urls[0].to_string();
    let (code, _, err) = run_spike(
        &[
            "operator",
            "rekey",
            "--threshold",
            "3",
            "--keepers",
            &peers[..2].join(","),
        ],
        &client_env(&url, &svid),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("threshold must be between 1 and the number of Keepers (2)"),
        "{err}"
    );
    // And a good one through the CLI works, and says to export recovery shards.
    let (code, out, err) = run_spike(&["operator", "rekey"], &client_env(&url, &svid));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("root key {old} replaced by")),
        "{out}"
    );
    assert!(out.contains("spike recover export"), "{out}");
    // Not the superuser: refused.
    let other = c.api_client("workload", "/workload/app");
    let (s, _) = call(&other, &urls[0], REKEY, json!({})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

/// An audit trail that spans a rekey: its records before name the old root key and after the
/// new one, so `spike audit verify` needs the recovery shards of both (exported before and
/// after); with either set alone it fails at the first record of the other key and names it.
async fn an_audit_trail_across_a_rekey(mut c: Cluster, env: BackendEnv) {
    let file = c.dir.path().join("audit.jsonl");
    let mut env = env;
    env.push((
        "SPIKE_NEXUS_AUDIT_FILE".into(),
        file.to_str().unwrap().into(),
    ));
    let urls = c.start_ready_together(1, &pairs(&env)).await;
    let url = &urls[0];
    let old = agreed_key_id(&c, &urls).await;
    let su = c.superuser();
    let before = c.dir.path().join("recovery-before");
    c.export_recovery_shards(&url.to_string(), &before);
    put_v(&su, url, "a", "1").await;
    call_ok(&su, url, &action(SECRETS_PATH, "get"), json!({"path": "a"})).await;
    let answer = call_ok(&su, url, REKEY, json!({})).await;
    let new = answer["keyId"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    put_v(&su, url, "b", "2").await;
    call_ok(&su, url, &action(SECRETS_PATH, "get"), json!({"path": "a"})).await;
    let after = c.dir.path().join("recovery-after");
    c.export_recovery_shards(&url.to_string(), &after);

    // The trail holds records under each key.
    let text = std::fs::read_to_string(&file).unwrap();
    let key_ids: BTreeSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["key_id"].as_str().map(String::from))
        .collect();
    assert_eq!(
        key_ids,
        BTreeSet::from([old.clone(), new.clone()]),
        "{text}"
    );

    let (code, out, err) = audit_verify_with(&[&before, &after], &[&file]);
    println!("both sets of recovery shards: exit {code}: {out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("records verified"), "{out}");
    let (code, out, err) = audit_verify_with(&[&after, &before], &[&file]);
    assert_eq!(
        code, 0,
        "the order of --recover-dir does not matter: {out}{err}"
    );
    for (given, missing) in [(&after, &old), (&before, &new)] {
        let (code, out, err) = audit_verify_with(&[given], &[&file]);
        println!("only {}: exit {code}: {err}", given.display());
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.contains(&format!("written under root key {missing}")),
            "{out}{err}"
        );
    }
}

/// A rekey from 3 Keepers / threshold 2 to the first two Keepers / threshold 2: the two hold
/// shards of the new key (together they rebuild it); the third keeps the old key's shard it had
/// (documented: a rekey does not wipe a Keeper it drops), and no instance sends it anything
/// again: restarted empty, it stays empty over full Keeper rounds of every instance, while the
/// first Keeper, restarted empty too, is refilled.
async fn a_rekey_that_drops_a_keeper(mut c: Cluster, env: BackendEnv) {
    let mut env = env;
    env.push(("SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL".into(), "1s".into()));
    let urls = c.start_ready_together(2, &pairs(&env)).await;
    let old = agreed_key_id(&c, &urls).await;
    assert_eq!(root_key(&c).await.key_id(), old);
    let dropped = c.keeper_shard(2).await.unwrap();
    let su = c.superuser();
    let kept = c.keeper_urls()[..2].to_vec();
    let answer = call_ok(
        &su,
        &urls[0],
        REKEY,
        json!({"threshold": 2, "keepers": kept}),
    )
    .await;
    println!("rekey to two Keepers answered: {answer}");
    let new = answer["keyId"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(answer["keepers"].as_array().unwrap().len(), 2, "{answer}");
    every_instance_uses(&c, &urls, &new).await;
    assert_eq!(keepers_key_id(&c, &[0, 1]).await, new);
    assert!(
        c.keeper_shard(2).await == Some(dropped),
        "the dropped Keeper's shard changed"
    );
    let anon = c.anonymous();
    for url in &urls {
        let (_, body) = health(&anon, url).await.unwrap();
        assert_eq!(body["threshold"], 2, "{body}");
    }

    // Both restarted empty; from here on an instance's push to the dropped Keeper is a defect.
    let (first, third) = (
        c.keepers[0].url().to_string(),
        c.keepers[2].url().to_string(),
    );
    let offsets: Vec<usize> = c.nexus.iter().map(|p| p.logs().len()).collect();
    c.keepers[0].restart();
    c.keepers[2].restart();
    // Three more pushes to the first Keeper from each instance: the first may belong to a
    // round begun before the restarts, so the third's round began after a whole round that
    // began after them.
    for (p, &from) in c.nexus.iter().zip(&offsets) {
        wait_for(
            "three Keeper rounds of an instance",
            Duration::from_secs(60),
            || async { (pushes_to(&p.logs()[from..], &first) >= 3).then_some(()) },
        )
        .await;
    }
    assert_eq!(keepers_key_id(&c, &[0, 1]).await, new);
    assert!(
        c.keeper_shard(2).await.is_none(),
        "the dropped Keeper was sent a shard:\n{}",
        c.dump_logs()
    );
    for (p, &from) in c.nexus.iter().zip(&offsets) {
        let since = &p.logs()[from..];
        assert_eq!(pushes_to(since, &third), 0, "{since}");
        assert!(
            !since
                .lines()
                .any(|l| l.contains("cannot send shard") && l.contains(&third)),
            "{since}"
        );
    }
}

/// After a rekey from 3/2 to 5/3, an instance started with the new configuration (the five
/// Keepers, SPIKE_NEXUS_SHAMIR_SHARES=5, SPIKE_NEXUS_SHAMIR_THRESHOLD=3) becomes ready on the
/// new key without saying that its configuration differs. Then every Keeper is lost: both
/// instances, restarted, await a restore (the new key is only in recovery shards now); three
/// of the new recovery shards, one with an index beyond the old Keeper count, restore it
/// through the instance still configured for 3/2 (it takes the sharing from the store), and
/// the other recovers from the Keepers the restore refilled.
async fn the_new_configuration_and_every_keeper_lost(mut c: Cluster, env: BackendEnv) {
    let urls = c.start_ready_together(1, &pairs(&env)).await;
    let old = agreed_key_id(&c, &urls).await;
    let su = c.superuser();
    put_v(&su, &urls[0], "before", "1").await;
    c.add_keeper();
    c.add_keeper();
    let answer = call_ok(
        &su,
        &urls[0],
        REKEY,
        json!({"threshold": 3, "keepers": c.keeper_urls()}),
    )
    .await;
    let new = answer["keyId"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    put_v(&su, &urls[0], "after", "2").await;

    // The cluster's environment names every running Keeper and SHARES=5; the threshold too.
    let mut extra = pairs(&env);
    extra.push(("SPIKE_NEXUS_SHAMIR_THRESHOLD", "3"));
    let n = c.start_nexus(&extra);
    let configured = c.nexus[n].url();
    let anon = c.anonymous();
    let body = wait_status(&anon, &configured, "ready").await;
    assert_eq!(body["key_id"], new.as_str(), "{body}");
    assert_eq!(body["threshold"], 3, "{body}");
    let logs = c.nexus[n].logs();
    assert!(
        logs.contains("recovered the root key from Keepers"),
        "{logs}"
    );
    assert!(
        !logs.contains("differs from this instance's SPIKE_NEXUS_SHAMIR"),
        "{logs}"
    );

    let dir = c.dir.path().join("recovery-new");
    c.export_recovery_shards(&configured.to_string(), &dir);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 5);

    // Every Keeper lost (restarted empty) while no instance runs, then both instances again.
    for p in c.nexus.iter_mut() {
        p.kill();
    }
    for k in c.keepers.iter_mut() {
        k.restart();
    }
    for p in c.nexus.iter_mut() {
        p.restart();
    }
    let urls: Vec<Uri> = c.nexus.iter().map(Proc::url).collect();
    for url in &urls {
        let body = wait_status(&anon, url, "awaiting_restore").await;
        println!("every Keeper lost after the rekey, {url}: {body}");
        // The instance configured with the old sharing awaits with the deployment's.
        assert_eq!(body["threshold"], 3, "{body}");
    }
    let restorer = c.pki.issue("restore-op", "/spike/pilot/role/restore");
    let first = urls[0].to_string();
    for i in [5, 2, 4] {
        let file = dir.join(format!("spike.recovery.{i}.txt"));
        let (code, out, err) = run_spike(
            &[
                "recover",
                "restore",
                "--nexus",
                &first,
                file.to_str().unwrap(),
            ],
            &client_env(&first, &restorer),
        );
        println!("restore shard {i} through the instance configured for 3/2: {out}{err}");
        assert_eq!(code, 0, "{out}{err}");
    }
    for url in &urls {
        let body = wait_status(&anon, url, "ready").await;
        assert_eq!(body["key_id"], new.as_str(), "{url}: {body}");
    }
    assert_eq!(keepers_key_id(&c, &[0, 1, 2]).await, new);
    assert_eq!(keepers_key_id(&c, &[1, 3, 4]).await, new);
    reads_back(&su, &urls, &[("before", "1"), ("after", "2")]).await;
}

/// Lines of a Nexus log that say a shard was sent to the Keeper at `keeper` (its URL).
fn pushes_to(log: &str, keeper: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("shard sent") && l.contains(keeper))
        .count()
}

macro_rules! rekey_suite {
    ($name:ident, |$c:ident| $setup:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rotate_and_rekey_under_load() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::rotate_and_rekey_under_load($c, env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_rekeys_at_once_make_one_key() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::two_rekeys_at_once_make_one_key($c, env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn old_recovery_shards_are_refused_new_ones_restore() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::old_recovery_shards_are_refused_new_ones_restore($c, env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_nexus_killed_during_a_rekey() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::a_nexus_killed_during_a_rekey($c, env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bad_rekeys_change_nothing() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::bad_rekeys_change_nothing($c, env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_audit_trail_across_a_rekey() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::an_audit_trail_across_a_rekey($c, env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_rekey_that_drops_a_keeper() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::a_rekey_that_drops_a_keeper($c, env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_new_configuration_and_every_keeper_lost() {
                let $c = Cluster::new(3);
                let env = $setup;
                super::the_new_configuration_and_every_keeper_lost($c, env).await;
            }
        }
    };
}

rekey_suite!(sqlite, |c| {
    let _ = &c;
    BackendEnv::new()
});

rekey_suite!(postgres, |c| {
    let _ = &c;
    let url = common::postgres::fresh_database().await;
    common::postgres::nexus_env(&url)
});

/// The store goes down (a PostgreSQL server of this test's own, stopped as a crash would) under
/// two ready instances: a rotate and a rekey through either, over the API and through the CLI,
/// answer 503 `store_unavailable`, and nothing panics or is left half-done. When the store is
/// back, both instances are still on the old key, the store has no rekey journal, the Keepers
/// (and a new Keeper the refused rekey named) hold what they held; then a rotate and a rekey
/// both work, and every instance and Keeper ends on the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_rotate_and_rekey_are_refused_and_change_nothing() {
    let mut c = Cluster::new(3);
    let pg = common::postgres::PgServer::start_named(c.dir.path(), "pg");
    let env = common::postgres::nexus_env(&pg.url);
    let urls = c.start_ready_together(2, &pairs(&env)).await;
    let old = agreed_key_id(&c, &urls).await;
    assert_eq!(root_key(&c).await.key_id(), old);
    let su = c.superuser();
    put_v(&su, &urls[0], "kept", "1").await;
    let k4 = c.add_keeper();
    let held: Vec<_> = held_shards(&c, 3).await;

    pg.stop("immediate");
    let wider = json!({"threshold": 3, "keepers": c.keeper_urls()});
    for url in &urls {
        for (path, body) in [
            (ROTATE, json!({})),
            (ROTATE, json!({"reencrypt": true})),
            (REKEY, json!({})),
            (REKEY, wider.clone()),
        ] {
            let (s, b) = call(&su, url, path, body.clone()).await;
            println!("store down: {path} {body} via {url}: {s} {b}");
            assert_eq!(
                (s, &b["err"]),
                (StatusCode::SERVICE_UNAVAILABLE, &json!("store_unavailable")),
                "{path} {body}: {b}"
            );
        }
    }
    let svid = c.pki.issue("superuser-cli", "/spike/pilot/role/superuser");
    let cli_urls = urls
        .iter()
        .map(|u| u.to_string().trim_end_matches('/').to_string())
        .collect::<Vec<_>>()
        .join(",");
    for args in [
        &["operator", "rotate"][..],
        &["operator", "rekey"][..],
        &[
            "operator",
            "rekey",
            "--threshold",
            "3",
            "--keepers",
            &c.keeper_urls().join(","),
        ][..],
    ] {
        let (code, out, err) = run_spike(args, &client_env(&cli_urls, &svid));
        println!(
            "store down: spike {}: exit {code}: {out}{err}",
            args.join(" ")
        );
        assert_ne!(code, 0, "{out}{err}");
        assert!(
            err.contains("cannot reach its backing store (store_unavailable)"),
            "{out}{err}"
        );
    }
    // Nothing reached the Keepers meanwhile, and every instance still runs.
    assert!(
        held_shards(&c, 3).await == held,
        "the Keepers' shards changed while the store was down"
    );
    assert!(
        c.keeper_shard(k4).await.is_none(),
        "the new Keeper got a shard"
    );
    for p in c.nexus.iter_mut() {
        assert!(p.is_running(), "{}", p.logs());
    }

    pg.restart();
    assert_eq!(agreed_key_id(&c, &urls).await, old);
    let store = admin_store(&c, &env).await;
    assert!(
        store
            .get(Namespace::System, JOURNAL)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .get(Namespace::System, "root-key")
            .await
            .unwrap()
            .is_none(),
        "no rekey was recorded"
    );
    assert!(
        held_shards(&c, 3).await == held,
        "the Keepers' shards changed after the store came back"
    );
    assert_eq!(keepers_key_id(&c, &[0, 2]).await, old);
    assert!(
        c.keeper_shard(k4).await.is_none(),
        "the new Keeper got a shard"
    );

    let rotated = call_ok(&su, &urls[1], ROTATE, json!({})).await;
    assert_eq!(rotated["currentKey"], 2, "{rotated}");
    let answer = call_ok(&su, &urls[0], REKEY, wider).await;
    let new = answer["keyId"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    every_instance_uses(&c, &urls, &new).await;
    assert_eq!(keepers_key_id(&c, &[0, 1, k4]).await, new);
    reads_back(&su, &urls, &[("kept", "1")]).await;
    let logs = c.dump_logs();
    assert!(!logs.contains("panicked"), "{logs}");
}

/// The shards the first `n` Keepers hold (each must hold one).
async fn held_shards(c: &Cluster, n: usize) -> Vec<(Option<u8>, [u8; 32])> {
    let mut all = Vec::new();
    for i in 0..n {
        all.push(c.keeper_shard(i).await.expect("the Keeper holds a shard"));
    }
    all
}

/// The store goes down in the middle of a rekey: the new shards are being pushed (a silent new
/// Keeper holds the push for `SPIKE_NEXUS_KEEPER_TIMEOUT`) when the server stops, so the commit
/// cannot be written. The operator is told `store_unavailable`, and that the rekey is
/// recorded; when the store is back every instance serves on the old key, and the rekey left
/// uncommitted is undone once idle long enough: the old key's shards back on the Keepers (three
/// of them held the new key's), the data readable, no journal left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_in_the_middle_of_a_rekey() {
    let mut c = Cluster::new(3);
    let pg = common::postgres::PgServer::start_named(c.dir.path(), "pg");
    let mut env = common::postgres::nexus_env(&pg.url);
    // The rekey waits three Keeper timeouts before pushing, then the silent Keeper holds the
    // push for three more: time enough to stop the server first.
    env.push(("SPIKE_NEXUS_KEEPER_TIMEOUT".into(), "1s".into()));
    let urls = c.start_ready_together(2, &pairs(&env)).await;
    let old = agreed_key_id(&c, &urls).await;
    let su = c.superuser();
    put_v(&su, &urls[0], "kept", "1").await;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let store = admin_store(&c, &env).await;
    let (rekey, to) = rekey_held_in_its_push(&c, &su, &urls[0], &store, &silent).await;
    pg.stop("immediate");
    let (s, b) = rekey.await.unwrap();
    println!("the store went down while the rekey pushed its shards: {s} {b}");
    assert_eq!(
        (s, &b["err"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("store_unavailable")),
        "{b}\n{}",
        c.dump_logs()
    );
    // The operator is told the rekey is not lost, and to look before starting another.
    assert!(
        b["reason"]
            .as_str()
            .unwrap_or("")
            .contains("it is recorded"),
        "{b}"
    );

    pg.restart();
    // Every instance serves on the old key while the journal waits to be taken over.
    assert_eq!(agreed_key_id(&c, &urls).await, old);
    let store = admin_store(&c, &env).await;
    assert!(
        store
            .get(Namespace::System, JOURNAL)
            .await
            .unwrap()
            .is_some(),
        "the rekey was neither finished nor undone while the store was down"
    );
    put_v(&su, &urls[1], "meanwhile", "2").await;
    wait_for(
        "the rekey to be undone",
        Duration::from_secs(120),
        || async {
            store
                .get(Namespace::System, JOURNAL)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert_eq!(agreed_key_id(&c, &urls).await, old);
    assert_ne!(old, to);
    wait_for(
        "the old key's shards back on the Keepers",
        Duration::from_secs(60),
        || async { (keepers_key_id(&c, &[0, 1, 2]).await == old).then_some(()) },
    )
    .await;
    reads_back(&su, &urls, &[("kept", "1"), ("meanwhile", "2")]).await;
    let logs = c.dump_logs();
    assert!(
        logs.contains("undoing a rekey whose initiator went quiet"),
        "{logs}"
    );
    assert!(!logs.contains("panicked"), "{logs}");
    drop(silent);
}
