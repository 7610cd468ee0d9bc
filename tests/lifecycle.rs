#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The root-key lifecycle with real processes: Keepers, Nexus instances, restarts, and the
//! refusals at the TLS layer. DESIGN.md §1.1–1.4, §2.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;
use rustls::AlertDescription;
use spike::identity::Role;

fn key_id(body: &serde_json::Value) -> String {
    body["key_id"]
        .as_str()
        .expect("key_id in ready health")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_keepers_and_a_nexus_become_ready_and_every_keeper_gets_its_shard() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let anon = c.anonymous();
    let body = wait_status(&anon, &c.nexus[n].url(), "ready").await;
    assert_eq!(body["backend"], "sqlite");
    assert_eq!(body["threshold"], 2);
    // The shards were pushed at once after the key was created, each with its index.
    for i in 0..3 {
        let (index, _) = wait_for("keeper shard", Duration::from_secs(10), || {
            c.keeper_shard(i)
        })
        .await;
        assert_eq!(index, Some(i as u8 + 1));
    }
    // The database file is private.
    let mode = std::fs::metadata(c.data_dir.join("spike.db"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexus_restarted_with_one_keeper_down_recovers_the_same_key() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let anon = c.anonymous();
    let first = key_id(&wait_status(&anon, &c.nexus[n].url(), "ready").await);
    for i in 0..3 {
        wait_for("keeper shard", Duration::from_secs(10), || {
            c.keeper_shard(i)
        })
        .await;
    }
    let shards_before: Vec<_> = futures_all(&c).await;

    c.nexus[n].kill();
    c.keepers[2].kill();
    c.nexus[n].restart();
    let again = key_id(&wait_status(&anon, &c.nexus[n].url(), "ready").await);
    assert_eq!(first, again, "{}", c.dump_logs());
    assert!(
        c.nexus[n]
            .logs()
            .contains("recovered the root key from Keepers")
    );
    // The shards a second process computes are byte-identical to the first process's.
    assert_eq!(c.keeper_shard(0).await, shards_before[0]);
    assert_eq!(c.keeper_shard(1).await, shards_before[1]);
}

async fn futures_all(c: &Cluster) -> Vec<Option<(Option<u8>, [u8; 32])>> {
    let mut out = Vec::new();
    for i in 0..c.keepers.len() {
        out.push(c.keeper_shard(i).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_restarted_empty_is_refilled_within_one_interval() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[("SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL", "1s")]);
    let anon = c.anonymous();
    wait_status(&anon, &c.nexus[n].url(), "ready").await;
    let before = wait_for("keeper 1 shard", Duration::from_secs(10), || {
        c.keeper_shard(0)
    })
    .await;

    // Nexus is held still while the Keeper restarts, so nothing can refill it before the test
    // has looked.
    let frozen = Frozen::freeze(vec![c.nexus[n].pid()]);
    c.keepers[0].restart();
    assert_eq!(
        c.keeper_shard(0).await,
        None,
        "a restarted Keeper starts empty"
    );
    frozen.thaw();
    let after = wait_for("keeper 1 refilled", Duration::from_secs(10), || {
        c.keeper_shard(0)
    })
    .await;
    assert_eq!(before, after);
    // The Keeper never wrote its shard anywhere but memory: its log does not carry it either.
    let hex: String = after.1.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!c.keepers[0].logs().contains(&hex));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nexus_started_together_on_an_empty_store_make_exactly_one_key() {
    let mut c = Cluster::new(3);
    // Both processes are spawned before the test waits for either to listen, and the Keepers
    // are held still meanwhile: each Nexus's first request for shards waits in a Keeper's
    // backlog until they are thawed together, so both reach the create-if-absent step at about
    // the same moment instead of the second finding the first one's key.
    let frozen = Frozen::freeze(c.keepers.iter().map(Proc::pid).collect());
    let both = c.start_nexus_together(2, &[]);
    frozen.thaw();
    let (a, b) = (both[0], both[1]);
    let anon = c.anonymous();
    let ka = key_id(&wait_status(&anon, &c.nexus[a].url(), "ready").await);
    let kb = key_id(&wait_status(&anon, &c.nexus[b].url(), "ready").await);
    assert_eq!(ka, kb, "{}", c.dump_logs());
    let created = c
        .nexus
        .iter()
        .filter(|p| p.logs().contains("created a new root key"))
        .count();
    assert_eq!(created, 1, "{}", c.dump_logs());
    // One verifier row, with that key id (the system namespace also holds the policy book).
    let db = rusqlite::Connection::open(c.data_dir.join("spike.db")).unwrap();
    let rows: Vec<Vec<u8>> = db
        .prepare("SELECT value FROM kv WHERE ns = 'system' AND key = 'root-key-verifier'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), 1);
    let stored: serde_json::Value = serde_json::from_slice(&rows[0]).unwrap();
    assert_eq!(stored["key_id"], ka);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepers_lost_while_the_verifier_exists_means_awaiting_restore_and_no_new_key() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let anon = c.anonymous();
    let original = key_id(&wait_status(&anon, &c.nexus[n].url(), "ready").await);
    c.nexus[n].kill();
    for k in c.keepers.iter_mut() {
        k.restart();
    }
    c.nexus[n].restart();
    let url = c.nexus[n].url();
    let body = wait_status(&anon, &url, "awaiting_restore").await;
    assert!(body.get("key_id").is_none());
    // It stays that way: no key is created, nothing is pushed to the Keepers. Shown over three
    // more rounds of Nexus asking every Keeper for its shard (each Keeper logs every request it
    // cannot serve), counted rather than timed.
    let asked = |c: &Cluster, i: usize| {
        c.keepers[i]
            .logs()
            .matches("asked for a shard while holding none")
            .count()
    };
    let before: Vec<usize> = (0..3).map(|i| asked(&c, i)).collect();
    wait_for(
        "three more recovery attempts",
        Duration::from_secs(30),
        || {
            let done = (0..3).all(|i| asked(&c, i) >= before[i] + 3);
            async move { done.then_some(()) }
        },
    )
    .await;
    let (status, body) = health(&anon, &url).await.unwrap();
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("awaiting_restore"))
    );
    for i in 0..3 {
        assert_eq!(c.keeper_shard(i).await, None, "{}", c.dump_logs());
    }
    let db = rusqlite::Connection::open(c.data_dir.join("spike.db")).unwrap();
    let stored: Vec<u8> = db
        .query_row(
            "SELECT value FROM kv WHERE ns = 'system' AND key = 'root-key-verifier'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(stored["key_id"], original);
    // API routes are gated with SPIKE's code.
    let su = c.pki.issue("superuser", "/spike/pilot/role/superuser");
    let reply = client(Some(&su), &c.pki, Role::Nexus)
        .post_json(&url, &action(SECRETS_PATH, "list"), b"{}".to_vec())
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&reply.body[..], br#"{"err":"state_not_ready"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_with_a_wrong_shard_is_detected_routed_around_and_refilled() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let anon = c.anonymous();
    let original = key_id(&wait_status(&anon, &c.nexus[n].url(), "ready").await);
    // Every Keeper holds its shard before Nexus goes (the pushes run concurrently: with only
    // Keeper 2 filled, the restart below would have one good shard and wait forever).
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(
            wait_for("every keeper's shard", Duration::from_secs(10), || {
                c.keeper_shard(i)
            })
            .await,
        );
    }
    let good = held[1];
    c.nexus[n].kill();
    // Plant a valid-looking shard of some other polynomial in Keeper 2.
    let mut bogus = [7u8; 32];
    bogus[0] = 0x11;
    let body = serde_json::json!({ "shard": bogus, "id": 2 }).to_string();
    let reply = c
        .as_nexus_to_keepers()
        .post_json(&c.keepers[1].url(), CONTRIBUTE_PATH, body.into_bytes())
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);

    c.nexus[n].restart();
    let body = wait_status(&anon, &c.nexus[n].url(), "ready").await;
    assert_eq!(key_id(&body), original, "{}", c.dump_logs());
    let bad = c.keepers[1].url().to_string();
    assert_eq!(
        body["inconsistent_keepers"],
        serde_json::json!([bad]),
        "{body}"
    );
    // Nexus reports ready when it has the key and pushes the shards right after: wait for it.
    wait_for(
        "the wrong shard to be replaced",
        Duration::from_secs(30),
        || async { (c.keeper_shard(1).await == Some(good)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepers_refuse_everyone_but_nexus_and_other_trust_domains() {
    let c = Cluster::new(1);
    let cases = [
        ("workload", c.pki.issue("workload", "/app/web")),
        (
            "superuser",
            c.pki.issue("superuser", "/spike/pilot/role/superuser"),
        ),
        ("keeper", c.pki.issue("keeper-x", "/spike/keeper/9")),
    ];
    // Each is refused at the handshake with the alert that names the reason (not any transport
    // error: a dead Keeper would give one too), and the Keeper serves Nexus after each.
    let addr = c.keepers[0].addr;
    for (what, svid) in &cases {
        let alert = tls_refusal(client_tls(Some(svid), &c.pki, Role::Keeper), addr).await;
        assert_eq!(alert, AlertDescription::CertificateUnknown, "{what}");
        assert_eq!(c.keeper_shard(0).await, None, "after {what}");
    }
    // No certificate at all.
    let alert = tls_refusal(client_tls(None, &c.pki, Role::Keeper), addr).await;
    assert_eq!(alert, AlertDescription::CertificateRequired, "anonymous");
    assert_eq!(c.keeper_shard(0).await, None, "after anonymous");
    // A Nexus identity from another trust domain's CA. It trusts our CA (so the server side is
    // what refuses), but presents its own SVID.
    let other = Pki::new(c.dir.path(), "other.org");
    let foreign = other.issue("foreign-nexus", "/spike/nexus");
    let alert = tls_refusal(client_tls(Some(&foreign), &c.pki, Role::Keeper), addr).await;
    assert_eq!(alert, AlertDescription::UnknownCA, "foreign trust domain");
    // The real Nexus identity gets an honest "empty" answer.
    assert_eq!(c.keeper_shard(0).await, None);
    assert!(c.keepers[0].logs().contains("TLS handshake refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepers_reject_malformed_shards_and_keep_what_they_hold() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    let held = wait_for("keeper 1 shard", Duration::from_secs(10), || {
        c.keeper_shard(0)
    })
    .await;
    c.nexus[n].kill();
    let k = c.as_nexus_to_keepers();
    let url = c.keepers[0].url();
    let n_order = "255,255,255,255,0,0,0,0,255,255,255,255,255,255,255,255,188,230,250,173,167,23,158,132,243,185,202,194,252,99,37,81";
    for body in [
        "not json".to_string(),
        "{}".to_string(),
        r#"{"shard":null}"#.to_string(),
        format!(r#"{{"shard":[{}]}}"#, vec!["1"; 31].join(",")),
        format!(r#"{{"shard":[{}]}}"#, vec!["1"; 33].join(",")),
        format!(r#"{{"shard":[{}]}}"#, vec!["0"; 32].join(",")),
        format!(r#"{{"shard":[{}]}}"#, vec!["256"; 32].join(",")),
        format!(r#"{{"shard":[{n_order}]}}"#),
        format!(r#"{{"shard":[{}],"id":0}}"#, vec!["1"; 32].join(",")),
        "x".repeat(10_000),
    ] {
        let reply = k
            .post_json(&url, CONTRIBUTE_PATH, body.clone().into_bytes())
            .await
            .unwrap();
        assert!(
            reply.status == StatusCode::BAD_REQUEST
                || reply.status == StatusCode::PAYLOAD_TOO_LARGE,
            "{body:.60}: {}",
            reply.status
        );
    }
    for (method_path, status) in [("/v1/store/nothing", StatusCode::BAD_REQUEST)] {
        let reply = k
            .post_json(&url, method_path, b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(reply.status, status);
    }
    let reply = k.get(&url, SHARD_PATH).await.unwrap();
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(c.keeper_shard(0).await, Some(held));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_needs_no_client_certificate_and_tells_the_truth() {
    let mut c = Cluster::new(3);
    // Only one Keeper up: below threshold.
    c.keepers[1].kill();
    c.keepers[2].kill();
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    let body = wait_status(&anon, &url, "awaiting_keepers").await;
    assert_eq!(body["threshold"], 2);

    // curl with only the CA, as a load balancer's check would.
    let curl = |method: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(c.pki.ca_pem())
            .args([
                "-X",
                method,
                &format!("https://localhost:{}/health", c.nexus[n].addr.port()),
            ])
            .output()
            .expect("curl is installed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl("GET"), "503");

    c.keepers[1].restart();
    wait_status(&anon, &url, "ready").await;
    assert_eq!(curl("GET"), "200");
    let head = std::process::Command::new("curl")
        .args(["-s", "-I", "--cacert"])
        .arg(c.pki.ca_pem())
        .arg(format!(
            "https://localhost:{}/health",
            c.nexus[n].addr.port()
        ))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&head.stdout).starts_with("HTTP/1.1 200"));

    // Anything but /health needs a certificate.
    let reply = anon
        .post_json(&url, &action(SECRETS_PATH, "list"), b"{}".to_vec())
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(&reply.body[..], br#"{"err":"access_unauthorized"}"#);
    // A certificate from another trust domain does not get through the handshake.
    let other = Pki::new(c.dir.path(), "other.org");
    let foreign = other.issue("foreign-su", "/spike/pilot/role/superuser");
    let alert = tls_refusal(
        client_tls(Some(&foreign), &c.pki, Role::Nexus),
        c.nexus[n].addr,
    )
    .await;
    assert_eq!(alert, AlertDescription::UnknownCA);
    // Nexus is still there and ready.
    assert_eq!(health(&anon, &url).await.unwrap().0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_url_that_does_not_answer_is_survivable() {
    let mut c = Cluster::new(3);
    c.keepers[2].kill();
    let n = c.start_nexus(&[]);
    let body = wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    assert!(body["key_id"].is_string());
    assert!(
        c.nexus[n].logs().contains("keeper did not answer")
            || c.nexus[n].logs().contains("cannot send shard")
    );
}

#[test]
fn invalid_configuration_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), TD);
    let svid = pki.issue("nexus", "/spike/nexus");
    let svid = svid.to_str().unwrap();
    let peers = "https://127.0.0.1:1,https://127.0.0.1:2,https://127.0.0.1:3";
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![
                ("SPIKE_NEXUS_KEEPER_PEERS", peers),
                ("SPIKE_NEXUS_SHAMIR_THRESHOLD", "4"),
            ],
            "SPIKE_NEXUS_SHAMIR_THRESHOLD",
        ),
        (
            vec![("SPIKE_NEXUS_KEEPER_PEERS", "127.0.0.1:1,x,y")],
            "SPIKE_NEXUS_KEEPER_PEERS",
        ),
        (vec![], "SPIKE_NEXUS_KEEPER_PEERS"),
        (
            vec![
                ("SPIKE_NEXUS_KEEPER_PEERS", peers),
                ("SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL", "0s"),
            ],
            "SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL",
        ),
    ];
    for (env, needle) in cases {
        let mut all = vec![("SPIKE_SVID_DIR", svid)];
        all.extend(env);
        let (code, _, err) = run_spike(&["nexus"], &all);
        assert_eq!(code, 2, "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
    // Missing SVID files: the file is named.
    let (code, _, err) = run_spike(
        &["nexus"],
        &[
            ("SPIKE_SVID_DIR", "/nonexistent/spike-svid"),
            ("SPIKE_NEXUS_KEEPER_PEERS", peers),
            ("SPIKE_NEXUS_TLS_PORT", "127.0.0.1:0"),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/spike-svid"), "{err}");
    let (code, _, err) = run_spike(&["keeper"], &[("SPIKE_SVID_DIR", "/nonexistent/k")]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/k"), "{err}");
    // A workload SVID cannot run a Keeper or a Nexus.
    let w = pki.issue("w", "/app/w");
    let (code, _, err) = run_spike(
        &["keeper"],
        &[
            ("SPIKE_SVID_DIR", w.to_str().unwrap()),
            ("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0"),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("not a keeper identity"), "{err}");
}
