#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Active-active Nexus on a shared backing store, with real processes on 127.0.0.1: several
//! instances writing one path at once, several instances starting at once on an empty
//! deployment, and the store going away and coming back under load.
//!
//! The test bodies take a backend as data — the Nexus environment pairs that select it, and for
//! the outage test a way to stop and start the store — so every HA backend runs the same
//! bodies through [`ha_suite!`]: PostgreSQL and S3.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::postgres::PgServer;
use common::*;
use hyper::{StatusCode, Uri};
use serde_json::json;
use spike::transport::HttpsClient;

/// Environment pairs that point Nexus at one store.
type BackendEnv = Vec<(String, String)>;

/// A store the outage test can take away and bring back (same address, same data).
trait Outage {
    fn take_down(&self);
    fn bring_back(&self);
}

impl Outage for PgServer {
    fn take_down(&self) {
        // As abrupt as a crash or a power cut: no goodbye to the clients.
        self.stop("immediate");
    }
    fn bring_back(&self) {
        self.restart();
    }
}

/// Counts "secret write conflict" debug lines in every Nexus log.
fn conflicts_logged(c: &Cluster) -> usize {
    c.nexus
        .iter()
        .map(|p| p.logs().matches("secret write conflict").count())
        .sum()
}

/// Three instances, three Keepers, one path written concurrently through all three: every
/// acknowledged write is its own version, none lost, and every instance reads the latest.
async fn concurrent_writes_through_three_instances(backend: BackendEnv) {
    const WRITERS: usize = 12;
    const EACH: usize = 25;
    let mut c = Cluster::new(3);
    let mut extra = pairs(&backend);
    extra.push(("SPIKE_NEXUS_MAX_SECRET_VERSIONS", "1000"));
    let urls = c.start_ready_together(3, &extra).await;
    let su = c.superuser();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (su, url) = (su.clone(), urls[w % urls.len()].clone());
        tasks.spawn(async move {
            let mut acked = Vec::new();
            let mut failed = Vec::new();
            for j in 0..EACH {
                let value = format!("w{w}-{j}");
                let (s, b) = call(
                    &su,
                    &url,
                    SECRETS_PATH,
                    json!({"path": "ha/shared", "values": {"v": value}}),
                )
                .await;
                match (s, b["version"].as_u64()) {
                    (StatusCode::OK, Some(v)) => acked.push((v, value)),
                    _ => failed.push(format!("{s} {b}")),
                }
            }
            (acked, failed)
        });
    }
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut failures = Vec::new();
    for (a, f) in join_all(tasks).await {
        for (v, value) in a {
            assert!(
                acked.insert(v, value).is_none(),
                "version {v} acknowledged twice"
            );
        }
        failures.extend(f);
    }
    let conflicts = conflicts_logged(&c);
    println!(
        "concurrent writes: {} attempted through {} instances, {} acknowledged, {} failed, {conflicts} compare-and-set conflicts retried",
        WRITERS * EACH,
        urls.len(),
        acked.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "failed writes: {failures:?}");
    let (latest, latest_value) = acked
        .last_key_value()
        .map(|(v, s)| (*v, s.clone()))
        .unwrap();
    assert_eq!(latest as usize, acked.len(), "versions have gaps");
    let mut metas = Vec::new();
    for url in &urls {
        let (s, b) = call(
            &su,
            url,
            &action(SECRETS_PATH, "get"),
            json!({"path": "ha/shared"}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(
            (b["version"].as_u64(), b["data"]["v"].as_str()),
            (Some(latest), Some(latest_value.as_str()))
        );
        let (s, m) = call(
            &su,
            url,
            &action(SECRET_METADATA_PATH, "get"),
            json!({"path": "ha/shared"}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{m}");
        assert_eq!(m["metadata"]["currentVersion"].as_u64(), Some(latest));
        assert_eq!(m["versions"].as_object().unwrap().len(), acked.len());
        metas.push(m);
    }
    assert!(metas.windows(2).all(|w| w[0] == w[1]), "instances disagree");
}

/// Three instances started at the same moment on an empty store and empty Keepers: exactly
/// one root key, every instance ready with it.
async fn simultaneous_first_start_makes_one_root_key(backend: BackendEnv) {
    let mut c = Cluster::new(3);
    // The Keepers are held still while the instances start: each one's first request for
    // shards waits in a Keeper's backlog until they are thawed together, so all of them reach
    // the create-if-absent step at about the same moment.
    let frozen = Frozen::freeze(c.keepers.iter().map(Proc::pid).collect());
    let urls: Vec<Uri> = c
        .start_nexus_together(3, &pairs(&backend))
        .into_iter()
        .map(|i| c.nexus[i].url())
        .collect();
    frozen.thaw();
    let mut key_ids = BTreeSet::new();
    for url in &urls {
        let body = wait_status(&c.anonymous(), url, "ready").await;
        key_ids.insert(body["key_id"].as_str().unwrap().to_string());
    }
    let count = |what: &str| c.nexus.iter().filter(|p| p.logs().contains(what)).count();
    let created = count("created a new root key for a new deployment");
    let lost = count("another Nexus instance created the root key first");
    let recovered = count("recovered the root key from Keepers");
    println!(
        "simultaneous start: {} instances ready, {} distinct root key(s) {key_ids:?}; {created} created it, {lost} lost the create-if-absent race, {recovered} recovered it from the Keepers",
        urls.len(),
        key_ids.len()
    );
    assert_eq!(created, 1, "{}", c.dump_logs());
    assert_eq!(key_ids.len(), 1, "{}", c.dump_logs());
    // The Keepers hold shards of that one key: a Nexus started later recovers the same key.
    let late = c.start_nexus(&pairs(&backend));
    let url = c.nexus[late].url();
    let body = wait_status(&c.anonymous(), &url, "ready").await;
    assert!(key_ids.contains(body["key_id"].as_str().unwrap()));
}

/// Counters of the background load in the outage test.
#[derive(Default, Debug)]
struct Load {
    /// Paths whose write was acknowledged, with the value written.
    acked: BTreeMap<String, String>,
    failed_writes: usize,
    reads_ok: usize,
    failed_reads: usize,
}

/// Writes distinct paths one at a time round-robin through `urls`, reading each back, until
/// `stop` is set (or a hard bound on operations). `failing` counts failed writes as they
/// happen.
async fn run_load(
    su: HttpsClient,
    urls: Vec<Uri>,
    stop: Arc<AtomicBool>,
    failing: Arc<AtomicUsize>,
) -> Load {
    let mut load = Load::default();
    for n in 0..5_000usize {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let url = &urls[n % urls.len()];
        let (path, value) = (format!("load/{n}"), format!("value-{n}"));
        let (s, _) = call(
            &su,
            url,
            SECRETS_PATH,
            json!({"path": path, "values": {"v": value}}),
        )
        .await;
        if s == StatusCode::OK {
            load.acked.insert(path.clone(), value);
            let (s, _) = call(
                &su,
                &urls[(n + 1) % urls.len()],
                &action(SECRETS_PATH, "get"),
                json!({"path": path}),
            )
            .await;
            if s == StatusCode::OK {
                load.reads_ok += 1;
            } else {
                load.failed_reads += 1;
            }
        } else {
            load.failed_writes += 1;
            failing.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load
}

/// The store goes away under a light load: every instance answers 503 on API routes and
/// `/health` (`store_unavailable`) at its next check, nothing crashes, no acknowledged write
/// is lost; when the store returns, service resumes without restarting Nexus.
async fn store_outage_under_load(backend: BackendEnv, store: &dyn Outage) {
    let mut c = Cluster::new(3);
    let urls = c.start_ready_together(3, &pairs(&backend)).await;
    let anon = c.anonymous();
    let su = c.superuser();
    let stop = Arc::new(AtomicBool::new(false));
    let failing = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(run_load(
        su.clone(),
        urls.clone(),
        Arc::clone(&stop),
        Arc::clone(&failing),
    ));
    // Let some writes land before the outage (a bounded wait on the store's own state).
    wait_for(
        "writes before the outage",
        Duration::from_secs(30),
        || async {
            let (s, b) = call(&su, &urls[0], &action(SECRETS_PATH, "list"), json!({})).await;
            (s == StatusCode::OK && b["keys"].as_array().is_some_and(|k| k.len() >= 10))
                .then_some(())
        },
    )
    .await;

    store.take_down();
    // The very next check on every instance sees the store gone.
    for url in &urls {
        let (status, body) = health(&anon, url).await.expect("nexus answers /health");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["status"], "store_unavailable", "{body}");
        println!("during outage {url}: /health {status} {body}");
        let (s, b) = call(
            &su,
            url,
            SECRETS_PATH,
            json!({"path": "outage/probe", "values": {"v": "x"}}),
        )
        .await;
        assert_eq!(
            (s, &b["err"]),
            (StatusCode::SERVICE_UNAVAILABLE, &json!("store_unavailable"))
        );
        let (s, _) = call(
            &su,
            url,
            &action(SECRETS_PATH, "get"),
            json!({"path": "load/0"}),
        )
        .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    }
    // Keep the load going against the dead store until it has met the outage a few times
    // (counted, not timed), every instance answering 503 meanwhile; then bring it back.
    let failed_before = failing.load(Ordering::Relaxed);
    wait_for(
        "the load to meet the outage",
        Duration::from_secs(60),
        || async {
            for url in &urls {
                let (status, _) = health(&anon, url).await.expect("nexus answers /health");
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            }
            (failing.load(Ordering::Relaxed) >= failed_before + 3).then_some(())
        },
    )
    .await;
    for p in c.nexus.iter_mut() {
        assert!(p.is_running(), "{} died during the outage", p.name);
    }

    store.bring_back();
    for url in &urls {
        wait_status(&anon, url, "ready").await;
    }
    // Writes succeed again through every instance.
    for (i, url) in urls.iter().enumerate() {
        let (s, b) = call(
            &su,
            url,
            SECRETS_PATH,
            json!({"path": format!("after/{i}"), "values": {"v": "back"}}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    stop.store(true, Ordering::Relaxed);
    let load = match load.await {
        Ok(load) => load,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    // Every acknowledged write is there, read through every instance.
    let mut checked = 0;
    for (path, value) in &load.acked {
        for url in &urls {
            let (s, b) = call(
                &su,
                url,
                &action(SECRETS_PATH, "get"),
                json!({"path": path}),
            )
            .await;
            assert_eq!(
                (s, b["data"]["v"].as_str()),
                (StatusCode::OK, Some(value.as_str())),
                "{path}"
            );
            checked += 1;
        }
    }
    println!(
        "store outage: {} writes acknowledged, {} writes failed (503 while the store was down), {} reads ok, {} reads failed; {checked} reads of acknowledged writes after recovery, all present",
        load.acked.len(),
        load.failed_writes,
        load.reads_ok,
        load.failed_reads
    );
    assert!(load.failed_writes > 0, "the load never saw the outage");
    for p in c.nexus.iter_mut() {
        assert!(p.is_running(), "{} died", p.name);
    }
}

/// The HA suite for one backend: `$fresh` evaluates (inside an async test) to
/// `(guard, BackendEnv)` for an empty store; `$outage` to `(guard, BackendEnv, impl Outage)`
/// for a store the test owns and may stop.
macro_rules! ha_suite {
    ($name:ident, fresh = $fresh:expr, outage = $outage:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_writes_through_three_instances() {
                let (_guard, env) = $fresh;
                super::concurrent_writes_through_three_instances(env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn simultaneous_first_start_makes_one_root_key() {
                let (_guard, env) = $fresh;
                super::simultaneous_first_start_makes_one_root_key(env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn store_outage_under_load() {
                let (_guard, env, store) = $outage;
                super::store_outage_under_load(env, &store).await;
            }
        }
    };
}

impl Outage for common::s3::S3Server {
    fn take_down(&self) {
        self.stop();
    }
    fn bring_back(&self) {
        self.restart();
    }
}

ha_suite!(
    s3,
    fresh = ((), common::s3::shared_env("ha")),
    outage = {
        // A server of this test's own: stopping the shared one would break the other tests.
        let dir = tempfile::tempdir().unwrap();
        let server = common::s3::S3Server::start(&dir.path().join("s3"));
        let env = server.nexus_env("outage/");
        (dir, env, server)
    }
);

ha_suite!(
    s3_seaweedfs,
    fresh = {
        if !common::s3::Kind::SeaweedFs.available() {
            return;
        }
        (
            (),
            common::s3::shared_env_on(common::s3::Kind::SeaweedFs, "ha"),
        )
    },
    outage = {
        if !common::s3::Kind::SeaweedFs.available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let server =
            common::s3::S3Server::start_kind(common::s3::Kind::SeaweedFs, &dir.path().join("s3"));
        let env = server.nexus_env("outage/");
        (dir, env, server)
    }
);

ha_suite!(
    postgres,
    fresh = {
        let url = common::postgres::fresh_database().await;
        ((), common::postgres::nexus_env(&url))
    },
    outage = {
        // A server of this test's own: stopping the shared one would break the other tests.
        let dir = tempfile::tempdir().unwrap();
        let server = PgServer::start(dir.path());
        let env = common::postgres::nexus_env(&server.url);
        (dir, env, server)
    }
);

/// Quick figures, not checks: secret writes and reads per second through one Nexus at 32
/// concurrent clients (a new TLS connection per request), a few seconds each. Run with
/// `cargo test --release --test ha -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement; run by hand"]
async fn postgres_throughput_through_one_nexus() {
    let url = common::postgres::fresh_database().await;
    throughput("postgres", common::postgres::nexus_env(&url)).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement; run by hand"]
async fn sqlite_throughput_through_one_nexus() {
    throughput("sqlite", Vec::new()).await;
}

async fn throughput(name: &str, backend: BackendEnv) {
    const CONCURRENCY: usize = 32;
    const PHASE: Duration = Duration::from_secs(4);
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&pairs(&backend));
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.superuser();
    for write in [true, false] {
        let started = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..CONCURRENCY {
            let (su, url) = (su.clone(), url.clone());
            tasks.spawn(async move {
                let (mut ok, mut failed) = (0usize, 0usize);
                // Bounded by time and by count.
                for i in 0..100_000usize {
                    if started.elapsed() >= PHASE {
                        break;
                    }
                    let path = format!("bench/{t}");
                    let (s, _) = if write {
                        call(
                            &su,
                            &url,
                            SECRETS_PATH,
                            json!({"path": path, "values": {"v": i.to_string()}}),
                        )
                        .await
                    } else {
                        call(
                            &su,
                            &url,
                            &action(SECRETS_PATH, "get"),
                            json!({"path": path}),
                        )
                        .await
                    };
                    if s == StatusCode::OK {
                        ok += 1
                    } else {
                        failed += 1
                    }
                }
                (ok, failed)
            });
        }
        let (mut ok, mut failed) = (0, 0);
        for (o, f) in join_all(tasks).await {
            ok += o;
            failed += f;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{name} via one Nexus, {CONCURRENCY} concurrent clients: {} {:.0} requests/s ({ok} ok, {failed} failed in {secs:.1}s)",
            if write { "writes" } else { "reads" },
            ok as f64 / secs
        );
    }
}
