#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Faults with real processes: a Nexus SIGKILLed in the middle of a stream of writes, a hung
//! (SIGSTOPped) Keeper and a hung store, Keepers killed and restarted in a loop under load.
//! Every test is bounded in time and count, prints what it did and counted, and asserts on
//! outcomes (nothing acknowledged is lost, nothing that should succeed fails), never timings.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hyper::{StatusCode, Uri};
use serde_json::json;
use spike::client::HttpsClient;
use spike::identity::Role;

const SECRETS: &str = "/v1/store/secrets";
const GET: &str = "/v1/store/secrets?action=get";

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Acknowledged writes: (path, version) → value.
type Acked = Arc<std::sync::Mutex<BTreeMap<(String, u64), String>>>;

/// `writers` tasks putting values to a few paths through `url` until `stop`; records every
/// acknowledged write.
fn spawn_writers(
    su: &HttpsClient,
    url: &Uri,
    writers: usize,
    stop: &Arc<AtomicBool>,
    acked: &Acked,
    failed: &Arc<AtomicUsize>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (su, url, stop, acked, failed) = (
            su.clone(),
            url.clone(),
            stop.clone(),
            acked.clone(),
            failed.clone(),
        );
        tasks.spawn(async move {
            for i in 0..10_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let path = format!("fault/p{}", (w + i) % 3);
                let value = format!("w{w}-i{i}");
                let (s, b) = call(
                    &su,
                    &url,
                    SECRETS,
                    json!({"path": path, "values": {"v": value}}),
                )
                .await;
                if s == StatusCode::OK {
                    let v = b["version"].as_u64().unwrap();
                    let prev = acked.lock().unwrap().insert((path, v), value);
                    assert!(prev.is_none(), "version {v} acknowledged twice");
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
    }
    tasks
}

async fn kill_nexus_mid_writes(backend: Vec<(String, String)>, name: &str) {
    let mut c = Cluster::new(3);
    // Keep every version, so every acknowledged write can be read back by its number.
    let mut env = pairs(&backend);
    env.push(("SPIKE_NEXUS_MAX_SECRET_VERSIONS", "100000"));
    let n = c.start_nexus(&env);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = client(
        Some(&c.pki.issue("su", "/spike/pilot/role/superuser")),
        &c.pki,
        Role::Nexus,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Default::default();
    let failed = Arc::new(AtomicUsize::new(0));
    let mut writers = spawn_writers(&su, &url, 4, &stop, &acked, &failed);
    // Let some writes land, then SIGKILL in the middle of the stream.
    wait_for("40 acknowledged writes", Duration::from_secs(30), || {
        let n = acked.lock().unwrap().len();
        async move { (n >= 40).then_some(()) }
    })
    .await;
    c.nexus[n].kill();
    let at_kill = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    while writers.join_next().await.is_some() {}
    // Restart on the same store: every acknowledged write is there, at its version.
    c.nexus[n].restart();
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let acked = acked.lock().unwrap().clone();
    for ((path, version), value) in &acked {
        let (s, b) = call(&su, &url, GET, json!({"path": path, "version": version})).await;
        assert_eq!(
            (s, &b["data"]["v"]),
            (StatusCode::OK, &json!(value)),
            "{path} v{version}"
        );
    }
    println!(
        "{name}: {} writes acknowledged ({at_kill} before the SIGKILL), {} failed while Nexus was gone, 0 lost",
        acked.len(),
        failed.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_nexus_mid_writes_loses_no_acknowledged_write_on_sqlite() {
    kill_nexus_mid_writes(Vec::new(), "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_nexus_mid_writes_loses_no_acknowledged_write_on_postgres() {
    let url = common::postgres::fresh_database().await;
    let backend = vec![
        (
            "SPIKE_NEXUS_BACKEND_STORE".to_string(),
            "postgres".to_string(),
        ),
        ("SPIKE_NEXUS_DB_URL".to_string(), url),
    ];
    kill_nexus_mid_writes(backend, "postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_keeper_hurts_no_request_and_no_new_nexus() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[
        ("SPIKE_NEXUS_KEEPER_TIMEOUT", "1s"),
        ("SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL", "1s"),
    ]);
    let url = c.nexus[n].url();
    let key_id = wait_status(&c.anonymous(), &url, "ready").await["key_id"].clone();
    let su = client(
        Some(&c.pki.issue("su", "/spike/pilot/role/superuser")),
        &c.pki,
        Role::Nexus,
    );
    let keeper = c.keepers[1].pid();
    signal(keeper, "STOP");
    let started = Instant::now();
    let mut ops = 0;
    // Requests keep succeeding while the Keeper is hung (Keepers are off the request path).
    while started.elapsed() < Duration::from_secs(3) && ops < 200 {
        let (s, _) = call(
            &su,
            &url,
            SECRETS,
            json!({"path": "k/x", "values": {"v": ops.to_string()}}),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call(&su, &url, GET, json!({"path": "k/x"})).await;
        assert_eq!(s, StatusCode::OK);
        ops += 2;
    }
    // A Nexus started now recovers from the two live Keepers.
    let m = c.start_nexus(&[("SPIKE_NEXUS_KEEPER_TIMEOUT", "1s")]);
    let body = wait_status(&c.anonymous(), &c.nexus[m].url(), "ready").await;
    assert_eq!(body["key_id"], key_id);
    signal(keeper, "CONT");
    wait_for("the thawed keeper answers", Duration::from_secs(10), || {
        c.keeper_shard(1)
    })
    .await;
    assert!(c.nexus[n].is_running() && c.nexus[m].is_running());
    println!("hung keeper: {ops} requests during the hang, 0 failed; a new Nexus became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_store_gives_503_and_recovers_without_a_restart() {
    let mut c = Cluster::new(3);
    let pg_parent = c.dir.path().join("pgparent");
    std::fs::create_dir_all(&pg_parent).unwrap();
    let pg = common::postgres::PgServer::start(&pg_parent);
    let n = c.start_nexus(&[
        ("SPIKE_NEXUS_BACKEND_STORE", "postgres"),
        ("SPIKE_NEXUS_DB_URL", &pg.url),
    ]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    wait_status(&anon, &url, "ready").await;
    let su = client(
        Some(&c.pki.issue("su", "/spike/pilot/role/superuser")),
        &c.pki,
        Role::Nexus,
    );
    let mut acked = Vec::new();
    for i in 0..5 {
        let (s, b) = call(
            &su,
            &url,
            SECRETS,
            json!({"path": "h/x", "values": {"v": i.to_string()}}),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        acked.push((b["version"].as_u64().unwrap(), i.to_string()));
    }
    let postmaster: u32 = std::fs::read_to_string(pg_parent.join("pg/data/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Hang the whole server (postmaster and its backends), not just the listener.
    let group: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(str::to_string))
                .and_then(|rest| {
                    rest.split_whitespace()
                        .nth(1)
                        .map(|p| p == postmaster.to_string())
                })
                .unwrap_or(false)
                || *pid == postmaster
        })
        .collect();
    for pid in &group {
        signal(*pid, "STOP");
    }
    let (s, b) = call(&su, &url, GET, json!({"path": "h/x"})).await;
    assert_eq!(
        (s, b),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"err": "store_unavailable"})
        )
    );
    let (s, _) = call(
        &su,
        &url,
        SECRETS,
        json!({"path": "h/x", "values": {"v": "during"}}),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, h) = health(&anon, &url).await.unwrap();
    assert_eq!(
        (s, h["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("store_unavailable"))
    );
    for pid in &group {
        signal(*pid, "CONT");
    }
    wait_status(&anon, &url, "ready").await;
    for (v, value) in &acked {
        let (s, b) = call(&su, &url, GET, json!({"path": "h/x", "version": v})).await;
        assert_eq!((s, &b["data"]["v"]), (StatusCode::OK, &json!(value)));
    }
    let (s, _) = call(
        &su,
        &url,
        SECRETS,
        json!({"path": "h/x", "values": {"v": "after"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(c.nexus[n].is_running());
    println!(
        "hung store: {} processes stopped; reads and writes got 503, health store_unavailable; resumed, 5 acknowledged writes intact",
        group.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeper_churn_under_load_fails_no_request() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[
        ("SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL", "1s"),
        ("SPIKE_NEXUS_KEEPER_TIMEOUT", "1s"),
    ]);
    let url = c.nexus[n].url();
    let key_id = wait_status(&c.anonymous(), &url, "ready").await["key_id"].clone();
    let su = client(
        Some(&c.pki.issue("su", "/spike/pilot/role/superuser")),
        &c.pki,
        Role::Nexus,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Default::default();
    let failed = Arc::new(AtomicUsize::new(0));
    let mut writers = spawn_writers(&su, &url, 3, &stop, &acked, &failed);
    // One Keeper at a time: kill, restart empty, wait until it is refilled, next.
    let mut restarts = 0;
    let mut late_nexus = None;
    for round in 0..6 {
        let k = round % 3;
        c.keepers[k].kill();
        if round == 3 {
            // A Nexus started during the churn, with one Keeper down.
            late_nexus = Some(c.start_nexus(&[("SPIKE_NEXUS_KEEPER_TIMEOUT", "1s")]));
        }
        c.keepers[k].restart();
        restarts += 1;
        wait_for("keeper refilled", Duration::from_secs(15), || {
            c.keeper_shard(k)
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    while writers.join_next().await.is_some() {}
    let late = late_nexus.unwrap();
    let body = wait_status(&c.anonymous(), &c.nexus[late].url(), "ready").await;
    assert_eq!(body["key_id"], key_id);
    let failed = failed.load(Ordering::Relaxed);
    let acked = acked.lock().unwrap().len();
    println!(
        "keeper churn: {restarts} keeper restarts, {acked} writes acknowledged, {failed} failed; a Nexus started mid-churn became ready"
    );
    assert_eq!(failed, 0);
    assert!(acked > 0);
}

/// Many clients (a new TLS connection per request, about 1,500 in all) mixing writes, reads and
/// lists across three Nexus instances on one PostgreSQL; afterwards every path's version
/// history is exactly what the clients saw acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_across_three_instances_matches_the_acknowledged_history() {
    const CLIENTS: usize = 48;
    const OPS_EACH: usize = 30;
    const PATHS: usize = 8;
    let db = common::postgres::fresh_database().await;
    let mut c = Cluster::new(3);
    let env = [
        ("SPIKE_NEXUS_BACKEND_STORE", "postgres"),
        ("SPIKE_NEXUS_DB_URL", db.as_str()),
        ("SPIKE_NEXUS_MAX_SECRET_VERSIONS", "100000"),
    ];
    let urls: Vec<Uri> = (0..3)
        .map(|_| c.start_nexus(&env))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|i| c.nexus[i].url())
        .collect();
    for u in &urls {
        wait_status(&c.anonymous(), u, "ready").await;
    }
    let su = client(
        Some(&c.pki.issue("su", "/spike/pilot/role/superuser")),
        &c.pki,
        Role::Nexus,
    );
    let acked: Acked = Default::default();
    let counts = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for t in 0..CLIENTS {
        let (su, urls, acked, counts) = (su.clone(), urls.clone(), acked.clone(), counts.clone());
        tasks.spawn(async move {
            for i in 0..OPS_EACH {
                if started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let url = &urls[(t + i) % urls.len()];
                let path = format!("load/p{}", (t * 7 + i) % PATHS);
                let (s, b) = match i % 4 {
                    0 | 1 => {
                        let value = format!("t{t}-i{i}");
                        let r = call(
                            &su,
                            url,
                            SECRETS,
                            json!({"path": path, "values": {"v": value}}),
                        )
                        .await;
                        if r.0 == StatusCode::OK {
                            let v = r.1["version"].as_u64().unwrap();
                            assert!(
                                acked
                                    .lock()
                                    .unwrap()
                                    .insert((path.clone(), v), value)
                                    .is_none()
                            );
                        }
                        counts[0].fetch_add(1, Ordering::Relaxed);
                        r
                    }
                    2 => {
                        counts[1].fetch_add(1, Ordering::Relaxed);
                        let r = call(&su, url, GET, json!({"path": path})).await;
                        // A path not written yet is a fine 404.
                        if r.0 == StatusCode::NOT_FOUND {
                            (StatusCode::OK, r.1)
                        } else {
                            r
                        }
                    }
                    _ => {
                        counts[2].fetch_add(1, Ordering::Relaxed);
                        call(
                            &su,
                            url,
                            "/v1/store/secrets?action=list",
                            json!({"prefix": "load/"}),
                        )
                        .await
                    }
                };
                if s != StatusCode::OK {
                    counts[3].fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed: {s} {b}");
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let mut by_path: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (path, v) in acked.keys() {
        by_path.entry(path.clone()).or_default().push(*v);
    }
    for (path, versions) in &by_path {
        // Versions are exactly 1..=n: no gap (no unacknowledged write stored), no duplicate.
        assert_eq!(
            versions,
            &(1..=versions.len() as u64).collect::<Vec<_>>(),
            "{path}"
        );
        for u in &urls {
            let (_, m) = call(
                &su,
                u,
                "/v1/store/secrets/metadata?action=get",
                json!({"path": path}),
            )
            .await;
            assert_eq!(
                m["metadata"]["currentVersion"],
                versions.len() as u64,
                "{path} via {u}"
            );
            assert_eq!(
                m["versions"].as_object().unwrap().len(),
                versions.len(),
                "{path}"
            );
        }
    }
    for ((path, v), value) in &acked {
        let (s, b) = call(
            &su,
            &urls[*v as usize % 3],
            GET,
            json!({"path": path, "version": v}),
        )
        .await;
        assert_eq!((s, &b["data"]["v"]), (StatusCode::OK, &json!(value)));
    }
    let failed = counts[3].load(Ordering::Relaxed);
    println!(
        "load: {CLIENTS} clients, {} writes ({} acknowledged), {} reads, {} lists, {failed} failed, in {:.1}s; histories of {} paths match",
        counts[0].load(Ordering::Relaxed),
        acked.len(),
        counts[1].load(Ordering::Relaxed),
        counts[2].load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        by_path.len()
    );
    assert_eq!(failed, 0);
}
