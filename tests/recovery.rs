#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Recovery shards over the wire: export while healthy, lose every Keeper and Nexus, restore
//! into one named instance, and let the others recover from the refilled Keepers.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_drill_over_the_api() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    let key_id = wait_status(&anon, &url, "ready").await["key_id"].clone();
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let recover = c.api_client("rec", "/spike/pilot/role/recover");
    let restore = c.api_client("res", "/spike/pilot/role/restore");
    for i in 0..5 {
        let (s, _) = call(
            &su,
            &url,
            SECRETS_PATH,
            json!({"path": format!("app/s{i}"), "values": {"v": i.to_string()}}),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }
    // Only the recover role may export; restore is refused on a healthy Nexus.
    assert_eq!(
        call(&su, &url, RECOVER_PATH, json!({})).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&restore, &url, RECOVER_PATH, json!({})).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, exported) = call(&recover, &url, RECOVER_PATH, json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let shards = exported["shards"].as_object().unwrap().clone();
    assert_eq!(
        shards.keys().cloned().collect::<Vec<_>>(),
        vec!["1", "2", "3"]
    );
    // Recovery shards are not the Keepers' shards.
    let k1 = c.keeper_shard(0).await.unwrap().1;
    assert_ne!(
        serde_json::from_value::<[u8; 32]>(shards["1"].clone()).unwrap(),
        k1
    );
    assert_eq!(
        call(
            &restore,
            &url,
            RESTORE_PATH,
            json!({"id": 1, "shard": shards["1"]})
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    // The recover role cannot read secrets.
    assert_eq!(
        call(
            &recover,
            &url,
            &action(SECRETS_PATH, "get"),
            json!({"path": "app/s1"})
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );

    // Disaster: every Nexus and every Keeper gone; Keepers come back empty.
    c.nexus[n].kill();
    for k in c.keepers.iter_mut() {
        k.restart();
    }
    c.nexus[n].restart();
    let url = c.nexus[n].url();
    wait_status(&anon, &url, "awaiting_restore").await;

    // Bad shards first: out of range (0, and 4 > SPIKE_NEXUS_SHAMIR_SHARES), zero, a
    // tampered set (rejected, and kept pending so that one shard can be corrected).
    for id in [0, 4] {
        assert_eq!(
            call(
                &restore,
                &url,
                RESTORE_PATH,
                json!({"id": id, "shard": shards["1"]})
            )
            .await
            .0,
            StatusCode::BAD_REQUEST,
            "id {id}"
        );
    }
    assert_eq!(
        call(
            &restore,
            &url,
            RESTORE_PATH,
            json!({"id": 1, "shard": vec![0u8; 32]})
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        call(
            &su,
            &url,
            RESTORE_PATH,
            json!({"id": 1, "shard": shards["1"]})
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    let mut tampered: [u8; 32] = serde_json::from_value(shards["2"].clone()).unwrap();
    tampered[31] ^= 1;
    let (s, b) = call(
        &restore,
        &url,
        RESTORE_PATH,
        json!({"id": 1, "shard": shards["1"]}),
    )
    .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::OK,
            json!({"collected": 1, "remaining": 1, "restored": false})
        )
    );
    let (s, _) = call(
        &restore,
        &url,
        RESTORE_PATH,
        json!({"id": 2, "shard": tampered}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        health(&anon, &url).await.unwrap().1["status"],
        "awaiting_restore"
    );

    // The real thing: the right shard for index 2 replaces the tampered one (the newest wins),
    // and the threshold rebuilds the key and refills the Keepers.
    let (s, b) = call(
        &restore,
        &url,
        RESTORE_PATH,
        json!({"id": 2, "shard": shards["2"]}),
    )
    .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::OK,
            json!({"collected": 2, "remaining": 0, "restored": true})
        )
    );
    let body = wait_status(&anon, &url, "ready").await;
    assert_eq!(body["key_id"], key_id);
    for i in 0..3 {
        wait_for("keeper refilled", Duration::from_secs(10), || {
            c.keeper_shard(i)
        })
        .await;
    }
    // A second Nexus becomes ready from the Keepers alone.
    let m = c.start_nexus(&[]);
    let url2 = c.nexus[m].url();
    assert_eq!(wait_status(&anon, &url2, "ready").await["key_id"], key_id);
    for i in 0..5 {
        let (s, b) = call(
            &su,
            &url2,
            &action(SECRETS_PATH, "get"),
            json!({"path": format!("app/s{i}")}),
        )
        .await;
        assert_eq!(
            (s, b["data"]["v"].as_str()),
            (StatusCode::OK, Some(i.to_string().as_str()))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_drill_with_the_cli() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let anon = c.anonymous();
    let key_id = wait_status(&anon, &c.nexus[n].url(), "ready").await["key_id"].clone();
    let su_dir = c.pki.issue("su", "/spike/pilot/role/superuser");
    let rec_dir = c.pki.issue("rec", "/spike/pilot/role/recover");
    let res_dir = c.pki.issue("res", "/spike/pilot/role/restore");
    let url = c.nexus[n].url().to_string();
    let url = url.trim_end_matches('/');
    let as_id = |svid: &std::path::Path| {
        client_env(url, svid)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let spike = |args: &[&str], env: &[(String, String)]| run_spike(args, &pairs(env));
    let (code, _, err) = spike(
        &["secret", "put", "drill/marker", "v=kept"],
        &as_id(&su_dir),
    );
    assert_eq!(code, 0, "{err}");

    let out = c.dir.path().join("shards");
    let out_s = out.to_str().unwrap();
    // Only the recover role may export.
    let (code, _, err) = spike(&["recover", "export", out_s], &as_id(&su_dir));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("recover role"), "{err}");
    let (code, _, err) = spike(&["recover", "export", out_s], &as_id(&rec_dir));
    assert_eq!(code, 0, "{err}");
    let mut files = Vec::new();
    for i in 1..=3 {
        let path = out.join(format!("spike.recovery.{i}.txt"));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(&format!("spike:{i}:")) && text.len() == 8 + 64,
            "{text}"
        );
        files.push((path, text));
    }
    // Never overwritten.
    let (code, _, err) = spike(&["recover", "export", out_s], &as_id(&rec_dir));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("never overwritten"), "{err}");
    assert_eq!(std::fs::read_to_string(&files[0].0).unwrap(), files[0].1);

    // Lose everything; Keepers come back empty.
    c.nexus[n].kill();
    for k in c.keepers.iter_mut() {
        k.restart();
    }
    c.nexus[n].restart();
    wait_status(&anon, &c.nexus[n].url(), "awaiting_restore").await;
    // A tampered file is refused before it leaves the machine.
    let bad = c.dir.path().join("bad.txt");
    std::fs::write(&bad, files[0].1.replace("spike:1:", "spike:0:")).unwrap();
    let (code, _, err) = spike(
        &["recover", "restore", "--nexus", url, bad.to_str().unwrap()],
        &as_id(&res_dir),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a valid recovery shard"), "{err}");
    // Superusers cannot restore.
    let f1 = files[0].0.to_str().unwrap();
    let (code, _, err) = spike(&["recover", "restore", "--nexus", url, f1], &as_id(&su_dir));
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = spike(
        &["recover", "restore", "--nexus", url, f1],
        &as_id(&res_dir),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 collected, 1 more needed"), "{err}");
    let (code, _, err) = spike(
        &[
            "recover",
            "restore",
            "--nexus",
            url,
            files[2].0.to_str().unwrap(),
        ],
        &as_id(&res_dir),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("restored"), "{err}");
    assert_eq!(
        wait_status(&anon, &c.nexus[n].url(), "ready").await["key_id"],
        key_id
    );
    // Restore on a healthy Nexus is refused.
    let (code, _, err) = spike(
        &["recover", "restore", "--nexus", url, f1],
        &as_id(&res_dir),
    );
    assert_eq!(code, 1, "{err}");
    // A second Nexus recovers from the refilled Keepers alone; the secret is there.
    let m = c.start_nexus(&[]);
    assert_eq!(
        wait_status(&anon, &c.nexus[m].url(), "ready").await["key_id"],
        key_id
    );
    let url2 = c.nexus[m].base_url();
    let (code, out, err) = run_spike(
        &["secret", "get", "drill/marker", "v"],
        &client_env(&url2, &su_dir),
    );
    assert_eq!((code, out.trim()), (0, "kept"), "{err}");
}

/// A valid-looking shard value that belongs to no key: nonzero and below the group order.
fn garbage(index: u8, round: u8, n: u16) -> [u8; 32] {
    let mut v = [0x5a; 32];
    v[0] = 0x01;
    v[1] = index;
    v[2] = round;
    v[3..5].copy_from_slice(&n.to_be_bytes());
    v
}

/// Issue 13.7: a restore-role caller floods an instance awaiting restore. Pending shards stay
/// one per index within 1..=shares, `/health` keeps answering within a generous deadline while
/// every flooded shard starts a combination search (13 shares, threshold 6: C(13, 6) = 1716
/// sets, past the search's work bound, seconds of CPU in a debug build), and the operator's
/// true shards still restore afterwards. Nexus runs with one executor thread, so any search
/// run on it would show on `/health`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_flood_stays_bounded_and_health_keeps_answering() {
    const SHARES: u8 = 13;
    const THRESHOLD: u8 = 6;
    let mut c = Cluster::new(usize::from(SHARES));
    let n = c.start_nexus(&[
        ("SPIKE_NEXUS_SHAMIR_THRESHOLD", &THRESHOLD.to_string()),
        ("TOKIO_WORKER_THREADS", "1"),
    ]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    let key_id = wait_status(&anon, &url, "ready").await["key_id"].clone();
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let recover = c.api_client("rec", "/spike/pilot/role/recover");
    // A restore waits for the search before it (seconds each in a debug build); that wait is
    // not what this test measures, so restore calls get a long deadline.
    let restore = client_with_timeouts(
        Some(&c.pki.issue("res", "/spike/pilot/role/restore")),
        &c.pki,
        spike::identity::Role::Nexus,
        spike::transport::Timeouts {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(5),
            request: Duration::from_secs(120),
            max_response: 1 << 20,
        },
    );
    let (s, _) = call(
        &su,
        &url,
        "/v1/store/secrets",
        json!({"path": "flood/marker", "values": {"v": "kept"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, exported) = call(&recover, &url, "/v1/operator/recover", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let shards = exported["shards"].as_object().unwrap().clone();

    c.nexus[n].kill();
    for k in c.keepers.iter_mut() {
        k.restart();
    }
    c.nexus[n].restart();
    let url = c.nexus[n].url();
    wait_status(&anon, &url, "awaiting_restore").await;

    // /health, polled back to back for as long as the flood runs: each answer within 5 s.
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let poller = {
        let (anon, url, flooding) = (anon.clone(), url.clone(), flooding.clone());
        tokio::spawn(async move {
            let (mut answers, mut slowest) = (0, Duration::ZERO);
            while flooding.load(std::sync::atomic::Ordering::SeqCst) {
                let started = std::time::Instant::now();
                let answer = tokio::time::timeout(Duration::from_secs(5), health(&anon, &url))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("/health took over 5 s during the flood (answer {answers})")
                    })
                    .unwrap_or_else(|| {
                        panic!("/health failed during the flood (answer {answers})")
                    });
                assert_eq!(answer.1["status"], "awaiting_restore", "{}", answer.1);
                answers += 1;
                slowest = slowest.max(started.elapsed());
                // Poll, but leave the CPU to the flood.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (answers, slowest)
        })
    };

    // 1. One index, many values: one shard held, however many are sent.
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8u16 {
        let (restore, url) = (restore.clone(), url.clone());
        tasks.spawn(async move {
            for i in 0..40u16 {
                let (s, b) = call(
                    &restore,
                    &url,
                    "/v1/operator/restore",
                    json!({"id": 1, "shard": garbage(1, 0, worker * 100 + i)}),
                )
                .await;
                assert_eq!(s, StatusCode::OK, "{b}");
                assert_eq!(
                    b,
                    json!({"collected": 1, "remaining": THRESHOLD - 1, "restored": false})
                );
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }

    // 2. Indices outside 1..=shares are refused.
    for id in [0u64, u64::from(SHARES) + 1, 255, 256, 1 << 40] {
        let (s, b) = call(
            &restore,
            &url,
            "/v1/operator/restore",
            json!({"id": id, "shard": garbage(1, 0, 0)}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "id {id}: {b}");
    }

    // 3. Every index, twice over, all at once: every accepted shard past the threshold starts
    //    a search that finds nothing.
    for index in 1..=SHARES {
        let (restore, url) = (restore.clone(), url.clone());
        tasks.spawn(async move {
            for round in 1..=2 {
                let (s, b) = call(
                    &restore,
                    &url,
                    "/v1/operator/restore",
                    json!({"id": index, "shard": garbage(index, round, 0)}),
                )
                .await;
                match s {
                    StatusCode::OK => assert!(
                        b["collected"].as_u64().unwrap() <= u64::from(SHARES)
                            && b["restored"] == false,
                        "{b}"
                    ),
                    StatusCode::BAD_REQUEST => {}
                    other => panic!("restore answered {other}: {b}"),
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    flooding.store(false, std::sync::atomic::Ordering::SeqCst);
    let (answers, slowest) = poller.await.unwrap();
    eprintln!("/health answered {answers} times during the flood, the slowest in {slowest:?}");
    assert!(answers >= 3, "/health was polled only {answers} times");

    // 4. The operator's true shards, over the garbage: the first five at once (each replaces
    //    garbage, the set does not open the verifier yet), then the sixth restores. Thirteen
    //    shards are held at that point: one per index, nothing more.
    for index in 1..THRESHOLD {
        let (restore, url) = (restore.clone(), url.clone());
        let shard = shards[&index.to_string()].clone();
        tasks.spawn(async move {
            let (s, b) = call(
                &restore,
                &url,
                "/v1/operator/restore",
                json!({"id": index, "shard": shard}),
            )
            .await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let (s, b) = call(
        &restore,
        &url,
        "/v1/operator/restore",
        json!({"id": THRESHOLD, "shard": shards[&THRESHOLD.to_string()]}),
    )
    .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::OK,
            json!({"collected": SHARES, "remaining": 0, "restored": true})
        ),
        "{}",
        c.nexus[n].logs()
    );
    assert_eq!(wait_status(&anon, &url, "ready").await["key_id"], key_id);
    let (s, b) = call(
        &su,
        &url,
        "/v1/store/secrets?action=get",
        json!({"path": "flood/marker"}),
    )
    .await;
    assert_eq!((s, b["data"]["v"].as_str()), (StatusCode::OK, Some("kept")));
    assert!(!c.nexus[n].logs().contains("panicked"));
}
