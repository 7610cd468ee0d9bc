#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Keepers filled by either SPIKE generation (issue 15): shards drawn with circl v1.6.1's
//! hash-to-scalar (SPIKE <= v0.8.0) or with circl >= 1.6.2's rejection sampling (SPIKE main),
//! taken from the vectors the real circl computed (tests/go/circl-*). A Nexus that finds either
//! recovers the key, says which derivation is in use on `/health`, and keeps pushing the very
//! same shards — to a Keeper that restarts empty, and after its own restart.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;

struct Vector {
    shards: Vec<(u8, [u8; 32])>,
}

fn vector(file: &str, name: &str) -> Vector {
    let path = format!("{}/tests/vectors/{file}", env!("CARGO_MANIFEST_DIR"));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let case = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in {file}"));
    let shards = case["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let hex = s["value"].as_str().unwrap();
            let mut value = [0u8; 32];
            for (i, b) in value.iter_mut().enumerate() {
                *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
            }
            (s["index"].as_u64().unwrap() as u8, value)
        })
        .collect();
    Vector { shards }
}

async fn plant(c: &Cluster, v: &Vector) {
    for (i, (index, value)) in v.shards.iter().enumerate() {
        let body = serde_json::json!({ "shard": value, "id": index }).to_string();
        let reply = c
            .as_nexus_to_keepers()
            .post_json(
                &c.keepers[i].url(),
                "/v1/store/contribute",
                body.into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
    }
}

async fn keepers_hold(c: &Cluster, v: &Vector) {
    for (i, (index, value)) in v.shards.iter().enumerate() {
        let held = c.keeper_shard(i).await;
        assert_eq!(held, Some((Some(*index), *value)), "keeper {}", i + 1);
    }
}

async fn generation_is_kept(file: &str, derivation: &str) {
    let v = vector(file, "n-minus-1 t=2 n=3");
    let mut c = Cluster::new(3);
    plant(&c, &v).await;
    let n = c.start_nexus(&[("SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL", "1s")]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    let health = wait_status(&anon, &url, "ready").await;
    assert_eq!(health["shard_derivation"], derivation, "{health}");
    keepers_hold(&c, &v).await;

    // A Keeper restarted empty is refilled with its shard of the same generation.
    c.keepers[1].restart();
    let refilled = wait_for("keeper 2 refilled", Duration::from_secs(30), || {
        c.keeper_shard(1)
    })
    .await;
    assert_eq!(refilled, (Some(v.shards[1].0), v.shards[1].1));

    // A restarted Nexus recovers through the store's verifier and keeps the derivation.
    c.nexus[n].restart();
    let again = wait_status(&anon, &url, "ready").await;
    assert_eq!(again["shard_derivation"], derivation, "{again}");
    assert_eq!(again["key_id"], health["key_id"]);
    keepers_hold(&c, &v).await;
    assert!(!c.dump_logs().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepers_filled_by_spike_v0_8_are_recovered_and_kept() {
    generation_is_kept("shamir-circl-v1.6.1.json", "hash_to_scalar").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepers_filled_by_spike_main_are_recovered_and_kept() {
    generation_is_kept("shamir-circl-v1.6.3.json", "rejection_sampling").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_deployment_uses_the_current_derivation() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let health = wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    assert_eq!(health["shard_derivation"], "rejection_sampling", "{health}");
}

/// Recovery files written by SPIKE's own Pilot (tests/fixtures/spike-main/recover, from a real
/// SPIKE Nexus) restore a deployment whose Keepers were all lost, with any two of the three,
/// through `spike recover restore`; a file of another deployment is refused and changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spike_pilot_recovery_files_restore_any_threshold_subset() {
    let dir = format!(
        "{}/tests/fixtures/spike-main/recover",
        env!("CARGO_MANIFEST_DIR")
    );
    let file = |i: u8| format!("{dir}/spike.recovery.{i}.txt");
    let shards: Vec<(u8, [u8; 32])> = (1..=3)
        .map(|i| {
            let text = std::fs::read_to_string(file(i)).unwrap();
            let share = spike::crypto::decode_recovery_shard(&text).unwrap();
            (share.index, *share.value())
        })
        .collect();
    let mut c = Cluster::new(3);
    plant(&c, &Vector { shards }).await;
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    let key_id = wait_status(&anon, &url, "ready").await["key_id"].clone();
    let res_dir = c.pki.issue("res", "/spike/pilot/role/restore");
    let env = [
        (
            "SPIKE_NEXUS_API_URL",
            url.to_string().trim_end_matches('/').to_string(),
        ),
        ("SPIKE_SVID_DIR", res_dir.to_str().unwrap().to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let nexus_url = url.to_string();
    let restore = |path: &str| {
        run_spike(
            &[
                "recover",
                "restore",
                "--nexus",
                nexus_url.trim_end_matches('/'),
                path,
            ],
            &env,
        )
    };
    // Another deployment's shard, in SPIKE's text form.
    let foreign = c.dir.path().join("foreign.txt");
    let other = vector("shamir-circl-v1.6.3.json", "n-minus-1 t=2 n=3");
    let hex: String = other.shards[0]
        .1
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(&foreign, format!("spike:1:{hex}")).unwrap();

    for (a, b) in [(1, 2), (3, 1), (2, 3)] {
        c.nexus[n].kill();
        for k in c.keepers.iter_mut() {
            k.restart();
        }
        c.nexus[n].restart();
        wait_status(&anon, &url, "awaiting_restore").await;
        if a == 1 {
            // A foreign shard and a real one do not rebuild the key; both stay pending, and
            // the right shard for index 1 replaces the foreign one (the newest wins).
            let (code, _, err) = restore(foreign.to_str().unwrap());
            assert_eq!(code, 0, "one shard is only collected: {err}");
            let (code, _, err) = restore(&file(b));
            assert_ne!(code, 0, "a foreign shard must not restore: {err}");
            assert_eq!(
                health(&anon, &url).await.unwrap().1["status"],
                "awaiting_restore"
            );
            let (code, _, err) = restore(&file(a));
            assert_eq!(code, 0, "{err}");
        } else {
            let (code, _, err) = restore(&file(a));
            assert_eq!(code, 0, "{err}");
            let (code, _, err) = restore(&file(b));
            assert_eq!(code, 0, "{err}");
        }
        let health = wait_status(&anon, &url, "ready").await;
        assert_eq!(health["key_id"], key_id, "files {a} and {b}");
        assert_eq!(health["shard_derivation"], "rejection_sampling");
    }
}
