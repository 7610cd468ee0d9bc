#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! PostgreSQL failover under load (issue 16): a primary and a synchronous streaming standby on
//! 127.0.0.1, three Nexus instances on one multi-host `SPIKE_NEXUS_DB_URL` with
//! `target_session_attrs=read-write`, several writers and readers through all three. The
//! primary's postmaster is SIGKILLed and the standby promoted — the step Patroni or pgpool
//! takes. Writes may fail only during the switch; every instance reconnects by itself (the
//! gap is measured and printed); every write acknowledged before, during and after is read
//! back through every instance. The same again with pgbouncer in front, re-pointed at the new
//! primary with a reload as an operator would. And the bad input: a URL whose hosts are all
//! standbys — Nexus stays not ready, says why on `/health`, writes nothing, and becomes ready
//! once a host is promoted.
//!
//! Each test runs its own servers (`scripts/postgres.sh`) in its own temporary directory.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::postgres::{PgServer, nexus_env};
use common::*;
use hyper::{StatusCode, Uri};
use serde_json::json;
use spike::transport::HttpsClient;

/// PostgreSQL comes with `./test`; without it (and outside CI) these tests skip, as the other
/// tests that run their own servers do. In CI (`SPIKE_TEST_POSTGRES_URL` or `CI` set) a
/// missing PostgreSQL fails them.
fn postgres_expected() -> bool {
    if std::env::var("SPIKE_TEST_POSTGRES_URL").is_err() && std::env::var("CI").is_err() {
        eprintln!("skipped: PostgreSQL tools come with ./test (scripts/postgres.sh)");
        return false;
    }
    true
}

/// One write (and the read of it that follows when it is acknowledged), as a writer saw it.
struct Outcome {
    instance: usize,
    sent: Instant,
    /// When the write was answered.
    answered: Instant,
    /// When the write (and its read-back) was over.
    done: Instant,
    /// `(path, value)` when the write was acknowledged (200 with a version).
    acked: Option<(String, String)>,
    /// Why the write or its read-back failed.
    error: Option<String>,
}

/// Writers through every instance until `stop`: each writes a path of its own with a unique
/// value and, once acknowledged, reads it back through the same instance.
fn spawn_load(
    su: &HttpsClient,
    urls: &[Uri],
    per_instance: usize,
    stop: &Arc<AtomicBool>,
    log: &Arc<Mutex<Vec<Outcome>>>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..urls.len() * per_instance {
        let instance = w % urls.len();
        let (su, url, stop, log) = (
            su.clone(),
            urls[instance].clone(),
            Arc::clone(stop),
            Arc::clone(log),
        );
        tasks.spawn(async move {
            let mut j = 0u64;
            while !stop.load(Ordering::Relaxed) {
                j += 1;
                let (path, value) = (format!("failover/w{w}/{j}"), format!("v-{w}-{j}"));
                let sent = Instant::now();
                let (s, b) = call(
                    &su,
                    &url,
                    SECRETS_PATH,
                    json!({"path": path, "values": {"v": value}}),
                )
                .await;
                let answered = Instant::now();
                let mut outcome = Outcome {
                    instance,
                    sent,
                    answered,
                    done: answered,
                    acked: None,
                    error: None,
                };
                if s == StatusCode::OK && b["version"].as_u64().is_some() {
                    outcome.acked = Some((path.clone(), value.clone()));
                    let (s, b) = call(
                        &su,
                        &url,
                        &action(SECRETS_PATH, "get"),
                        json!({"path": path}),
                    )
                    .await;
                    if s != StatusCode::OK {
                        outcome.error = Some(format!("read-back: {s} {b}"));
                    } else {
                        // An acknowledged write read back through its own instance is that
                        // write, whatever happens to the servers.
                        assert_eq!(b["data"]["v"], value.as_str(), "{path}");
                    }
                    outcome.done = Instant::now();
                } else {
                    outcome.error = Some(format!("write: {s} {b}"));
                }
                log.lock().unwrap().push(outcome);
            }
        });
    }
    tasks
}

/// What happens at failover besides the promotion: nothing when Nexus follows the host list
/// itself; re-pointing pgbouncer at the new primary when it is in front.
type AfterPromotion<'a> = Box<dyn FnOnce() + 'a>;

/// The failover body: `urls` are three ready Nexus instances on `primary` (directly or not);
/// `standby` is in sync with it.
async fn failover_under_load(
    label: &str,
    c: &Cluster,
    urls: Vec<Uri>,
    primary: &PgServer,
    standby: &PgServer,
    after_promotion: AfterPromotion<'_>,
) {
    const WRITERS_PER_INSTANCE: usize = 2;
    let su = c.superuser();
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let tasks = spawn_load(&su, &urls, WRITERS_PER_INSTANCE, &stop, &log);
    let acked_through = |log: &Mutex<Vec<Outcome>>, i: usize, after: Instant| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|o| o.instance == i && o.acked.is_some() && o.sent > after)
            .map(|o| o.answered)
            .min()
    };
    // Steady state first: every instance has acknowledged writes.
    let start = Instant::now();
    wait_for(
        "writes before the failover",
        Duration::from_secs(60),
        || {
            let ok = (0..urls.len()).all(|i| {
                log.lock()
                    .unwrap()
                    .iter()
                    .filter(|o| o.instance == i && o.acked.is_some())
                    .count()
                    >= 10
            });
            async move { ok.then_some(()) }
        },
    )
    .await;
    let killed = Instant::now();
    primary.kill();
    standby.promote();
    let promoted = Instant::now();
    after_promotion();
    let repointed = Instant::now();
    // Each instance reconnects by itself: a write sent after the kill is acknowledged.
    let mut back = Vec::new();
    for i in 0..urls.len() {
        // Bounded, and with every log and the last errors when it runs out.
        let limit = Instant::now() + Duration::from_secs(60);
        let at = loop {
            if let Some(at) = acked_through(&log, i, repointed) {
                break at;
            }
            if Instant::now() > limit {
                let last: Vec<String> = log
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .filter_map(|o| o.error.clone())
                    .take(5)
                    .collect();
                panic!(
                    "{label}: no write acknowledged through nexus-{} within 60 s of the failover; last errors {last:#?}\n{}",
                    i + 1,
                    c.dump_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        back.push(at);
    }
    // And keeps serving: more writes after the switch on every instance.
    wait_for("writes after the failover", Duration::from_secs(60), || {
        let ok = (0..urls.len()).all(|i| {
            log.lock()
                .unwrap()
                .iter()
                .filter(|o| o.instance == i && o.acked.is_some() && o.sent > back[i])
                .count()
                >= 10
        });
        async move { ok.then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    join_all(tasks).await;
    let outcomes = std::mem::take(&mut *log.lock().unwrap());

    println!(
        "{label}: primary SIGKILLed {:.2}s into the load; standby promoted {:.0} ms after the kill{}",
        (killed - start).as_secs_f64(),
        (promoted - killed).as_secs_f64() * 1000.0,
        if repointed > promoted + Duration::from_millis(1) {
            format!(
                ", re-pointed {:.0} ms after the kill",
                (repointed - killed).as_secs_f64() * 1000.0
            )
        } else {
            String::new()
        }
    );
    let mut failures_outside = Vec::new();
    for (i, at) in back.iter().enumerate() {
        let mine: Vec<&Outcome> = outcomes.iter().filter(|o| o.instance == i).collect();
        let failed: Vec<&&Outcome> = mine.iter().filter(|o| o.error.is_some()).collect();
        let last_failure = failed.iter().map(|o| o.done).max();
        println!(
            "{label}: nexus-{}: first write acknowledged {:.0} ms after the kill ({:.0} ms after the \
             promotion{}); {} writes failed, the last {} ms after the kill; {} acknowledged in all",
            i + 1,
            (*at - killed).as_secs_f64() * 1000.0,
            (*at - promoted).as_secs_f64() * 1000.0,
            if repointed > promoted + Duration::from_millis(1) {
                format!(
                    ", {:.0} ms after the reload",
                    (*at - repointed).as_secs_f64() * 1000.0
                )
            } else {
                String::new()
            },
            failed.len(),
            last_failure.map_or("-".to_string(), |t| format!(
                "{:.0}",
                t.saturating_duration_since(killed).as_secs_f64() * 1000.0
            )),
            mine.iter().filter(|o| o.acked.is_some()).count(),
        );
        // Writes fail only during the switch: none sent before the kill finished badly before
        // it, and none sent after this instance was back.
        for o in failed {
            if o.done < killed || o.sent > *at {
                failures_outside.push(format!(
                    "nexus-{} sent {:.0} ms after the kill: {}",
                    i + 1,
                    o.sent.saturating_duration_since(killed).as_secs_f64() * 1000.0
                        - killed.saturating_duration_since(o.sent).as_secs_f64() * 1000.0,
                    o.error.as_deref().unwrap_or("")
                ));
            }
        }
    }
    assert!(
        failures_outside.is_empty(),
        "{label}: failures outside the switch: {failures_outside:#?}\n{}",
        c.dump_logs()
    );

    // Every acknowledged write — before, during and after — is readable through every instance.
    let acked: Vec<(&Outcome, &(String, String))> = outcomes
        .iter()
        .filter_map(|o| o.acked.as_ref().map(|a| (o, a)))
        .collect();
    let before = acked.iter().filter(|(o, _)| o.answered < killed).count();
    let during = acked
        .iter()
        .filter(|(o, _)| o.answered >= killed && o.sent <= back[o.instance])
        .count();
    let mut missing = Vec::new();
    for url in &urls {
        for (_, (path, value)) in &acked {
            let (s, b) = call(
                &su,
                url,
                &action(SECRETS_PATH, "get"),
                json!({"path": path}),
            )
            .await;
            if s != StatusCode::OK || b["data"]["v"] != value.as_str() {
                missing.push(format!("{url} {path}: {s} {b}"));
            }
        }
    }
    println!(
        "{label}: {} writes acknowledged ({before} before the kill, {during} during the switch, {} \
         after), each read back through all {} instances: {} missing",
        acked.len(),
        acked.len() - before - during,
        urls.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{label}: acknowledged writes lost: {missing:#?}"
    );
}

/// The URL naming `first` and `second`, in that order, that always asks for the writable one.
fn two_hosts(first: &PgServer, second: &PgServer) -> String {
    format!(
        "postgres://spike@{},{}/spike_test?sslmode=disable&target_session_attrs=read-write",
        first.host_port(),
        second.host_port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nexus_follow_a_promoted_standby_under_load() {
    if !postgres_expected() {
        return;
    }
    let mut c = Cluster::new(3);
    let primary = PgServer::start_named(c.dir.path(), "primary");
    let standby = primary.start_standby(c.dir.path(), "standby");
    let url = two_hosts(&primary, &standby);
    let env = nexus_env(&url);
    let urls = c.start_ready_together(3, &pairs(&env)).await;
    failover_under_load(
        "multi-host URL",
        &c,
        urls,
        &primary,
        &standby,
        Box::new(|| {}),
    )
    .await;
    assert!(!c.dump_logs().contains("panicked"));
}

/// pgbouncer (session pooling: the driver's named prepared statements need a server session
/// of their own) in front of the primary, as `spike-test` when run as root (pgbouncer refuses
/// root). Returns the process and its port.
fn start_pgbouncer(dir: &std::path::Path, backend: &str) -> (Process, u16) {
    let port = unused_port();
    let bouncer = dir.join("pgbouncer");
    std::fs::create_dir_all(&bouncer).unwrap();
    write_pgbouncer_ini(&bouncer, port, backend);
    // Debian puts it in /usr/sbin, which an ordinary user's PATH may lack.
    let bin = if std::path::Path::new("/usr/sbin/pgbouncer").exists() {
        "/usr/sbin/pgbouncer"
    } else {
        "pgbouncer"
    };
    let mut cmd = Command::new(bin);
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    if root {
        cmd.args(["-u", "spike-test"]);
    }
    cmd.arg(bouncer.join("pgbouncer.ini"));
    let p = Process::spawn("pgbouncer", dir, &mut cmd, Stdout::Log);
    (p, port)
}

fn write_pgbouncer_ini(dir: &std::path::Path, port: u16, backend: &str) {
    let (host, backend_port) = backend.split_once(':').unwrap();
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\n\
             spike_test = host={host} port={backend_port} dbname=spike_test user=spike\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             ignore_startup_parameters = options\n\
             pool_mode = session\n\
             max_client_conn = 200\n\
             default_pool_size = 60\n\
             server_connect_timeout = 2\n\
             server_login_retry = 1\n"
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nexus_through_pgbouncer_follow_a_promotion_after_a_reload() {
    if !postgres_expected() {
        return;
    }
    let mut c = Cluster::new(3);
    let primary = PgServer::start_named(c.dir.path(), "primary");
    let standby = primary.start_standby(c.dir.path(), "standby");
    let (bouncer, port) = start_pgbouncer(c.dir.path(), primary.host_port());
    wait_for("pgbouncer to listen", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
    let url = format!("postgres://spike@127.0.0.1:{port}/spike_test?sslmode=disable");
    let env = nexus_env(&url);
    let urls = c.start_ready_together(3, &pairs(&env)).await;
    let dir = c.dir.path().join("pgbouncer");
    let pid = bouncer.pid();
    let new_primary = standby.host_port().to_string();
    failover_under_load(
        "pgbouncer",
        &c,
        urls,
        &primary,
        &standby,
        Box::new(move || {
            // What an operator (or Patroni's callback) does: point pgbouncer at the new
            // primary and reload it (SIGHUP is the console's RELOAD).
            write_pgbouncer_ini(&dir, port, &new_primary);
            common::signal(pid, "HUP");
        }),
    )
    .await;
    assert!(!c.dump_logs().contains("panicked"), "{}", bouncer.dump());
}

/// Bad input: hosts, but none writable. Three ways to say it — every host listed with
/// `target_session_attrs=read-write` (URL and key=value forms), and the standby alone with no
/// session attributes at all. No Nexus becomes ready, `/health` says why, nothing is written;
/// once the standby is promoted every one of them becomes ready by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_writable_host_is_refused_with_a_reason_and_nothing_written() {
    if !postgres_expected() {
        return;
    }
    let mut c = Cluster::new(3);
    let primary = PgServer::start_named(c.dir.path(), "primary");
    let standby = primary.start_standby(c.dir.path(), "standby");
    primary.kill();
    let (ph, pp) = primary.host_port().split_once(':').unwrap();
    let (sh, sp) = standby.host_port().split_once(':').unwrap();
    let urls_given = [
        two_hosts(&primary, &standby),
        format!(
            "host={ph},{sh} port={pp},{sp} user=spike dbname=spike_test sslmode=disable target_session_attrs=read-write"
        ),
        standby.url.clone(),
    ];
    let mut urls = Vec::new();
    for given in &urls_given {
        let env = nexus_env(given);
        let i = c.start_nexus(&pairs(&env));
        urls.push(c.nexus[i].url());
    }
    let anon = c.anonymous();
    for (i, url) in urls.iter().enumerate() {
        let body = wait_for(
            &format!("nexus-{} to say why it is not ready", i + 1),
            Duration::from_secs(30),
            || async {
                match health(&anon, url).await {
                    Some((StatusCode::SERVICE_UNAVAILABLE, b))
                        if b["status"] == "store_unavailable"
                            && b["reason"].as_str().is_some_and(|r| r.contains("standby")) =>
                    {
                        Some(b)
                    }
                    _ => None,
                }
            },
        )
        .await;
        println!("nexus-{} /health: {body}", i + 1);
        assert_eq!(body["backend"], "postgres", "{body}");
    }
    // Still not ready after further attempts, and the log says the same.
    wait_for("more attempts", Duration::from_secs(30), || {
        let done = c
            .nexus
            .iter()
            .all(|n| n.logs().matches("the backing store is unavailable").count() >= 3);
        async move { done.then_some(()) }
    })
    .await;
    for (i, n) in c.nexus.iter_mut().enumerate() {
        assert!(n.is_running(), "nexus-{} exited", i + 1);
        assert!(n.logs().contains("standby"), "{}", n.logs());
    }
    let su = c.superuser();
    for url in &urls {
        let (s, b) = call(
            &su,
            url,
            SECRETS_PATH,
            json!({"path": "wrong/place", "values": {"k": "v"}}),
        )
        .await;
        assert_eq!(
            (s, b["err"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("store_unavailable")),
            "{b}"
        );
    }
    // Nothing reached the standby: no schema, no row.
    let tables = table_names(&standby.url).await;
    assert!(tables.is_empty(), "the standby holds {tables:?}");

    // The operator promotes the standby: every instance opens it and serves.
    standby.promote();
    for url in &urls {
        wait_status(&anon, url, "ready").await;
    }
    for url in &urls {
        let (s, b) = call(
            &su,
            url,
            SECRETS_PATH,
            json!({"path": "right/place", "values": {"k": "v"}}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    assert!(!c.dump_logs().contains("panicked"));
}

/// The user tables of the database at `url`.
async fn table_names(url: &str) -> Vec<String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
    rows.into_iter().map(|r| r.get(0)).collect()
}

/// The misconfiguration behind "no write acknowledged after the failover": the promoted
/// standby kept `synchronous_standby_names` (a copy of its primary's `postgresql.conf`), so
/// every commit waits for a standby of its own that does not exist. No write is acknowledged
/// (none can be: the server never confirms one), each instance says why on `/health` instead
/// of looking ready, and once the operator clears the setting every instance serves again by
/// itself. Acknowledged writes from before are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_still_waiting_for_a_synchronous_standby_is_reported() {
    if !postgres_expected() {
        return;
    }
    let mut c = Cluster::new(3);
    let primary = PgServer::start_named(c.dir.path(), "primary");
    let standby = primary.start_standby_inheriting_sync(c.dir.path(), "standby");
    let url = two_hosts(&primary, &standby);
    let env = nexus_env(&url);
    let urls = c.start_ready_together(3, &pairs(&env)).await;
    let anon = c.anonymous();
    let su = c.superuser();
    let write = |url: Uri, path: String| {
        let su = su.clone();
        async move {
            call(
                &su,
                &url,
                SECRETS_PATH,
                json!({"path": path, "values": {"v": path}}),
            )
            .await
        }
    };
    let mut acked = Vec::new();
    for (i, u) in urls.iter().enumerate() {
        let path = format!("before/{i}");
        let (s, b) = write(u.clone(), path.clone()).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        acked.push(path);
    }
    primary.kill();
    standby.promote();
    // One write through each instance: it waits, runs out of time, and is refused.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, u) in urls.iter().enumerate() {
        tasks.spawn(write(u.clone(), format!("stalled/{i}")));
    }
    for (s, b) in join_all(tasks).await {
        assert_eq!(
            (s, b["err"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("store_unavailable")),
            "{b}"
        );
    }
    for (i, u) in urls.iter().enumerate() {
        let (s, b) = health(&anon, u).await.unwrap();
        println!("nexus-{} /health during the stall: {s} {b}", i + 1);
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
        assert_eq!(b["status"], "store_unavailable", "{b}");
        assert!(
            b["reason"]
                .as_str()
                .is_some_and(|r| r.contains("synchronous_standby_names")),
            "{b}"
        );
        assert!(
            c.nexus[i]
                .logs()
                .contains("waiting for a synchronous standby")
        );
    }
    let (admin, conn) = tokio_postgres::connect(&standby.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    // The statements that ran out of time were cancelled on the server, not left holding a
    // backend each until max_connections runs out.
    wait_for(
        "the stalled commits to be cancelled",
        Duration::from_secs(10),
        || async {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n == 0).then_some(())
        },
    )
    .await;
    // The operator clears it on the new primary; every instance sees commits go through.
    let cleared = Instant::now();
    // ALTER SYSTEM runs alone: not in a transaction block, which several statements make.
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = ''",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    drop(admin);
    let _ = task.await;
    for (i, u) in urls.iter().enumerate() {
        wait_status(&anon, u, "ready").await;
        let (s, b) = write(u.clone(), format!("after/{i}")).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        println!(
            "nexus-{}: ready and writing {:.0} ms after synchronous_standby_names was cleared",
            i + 1,
            cleared.elapsed().as_secs_f64() * 1000.0
        );
        acked.push(format!("after/{i}"));
    }
    for u in &urls {
        for path in &acked {
            let (s, b) = call(&su, u, &action(SECRETS_PATH, "get"), json!({"path": path})).await;
            assert_eq!(
                (s, b["data"]["v"].as_str()),
                (StatusCode::OK, Some(path.as_str())),
                "{b}"
            );
        }
    }
    assert!(!c.dump_logs().contains("panicked"));
}

/// A primary fenced rather than killed: it stays up but turns read-only
/// (`default_transaction_read_only`), and the standby is promoted. Pooled connections to the
/// old primary are still open, so only the error tells: the first `cannot execute ... in a
/// read-only transaction` drops every connection to it, and the next ones go through the host
/// list to the new primary. Writes resume after at most a few failures, and nothing is read
/// from the old primary afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_read_only_primary_is_left_for_the_promoted_one() {
    if !postgres_expected() {
        return;
    }
    let mut c = Cluster::new(3);
    let primary = PgServer::start_named(c.dir.path(), "primary");
    let standby = primary.start_standby(c.dir.path(), "standby");
    let url = two_hosts(&primary, &standby);
    let env = nexus_env(&url);
    let n = c.start_nexus(&pairs(&env));
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.superuser();
    // Several writers at once, so the pool holds several connections to the primary.
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8 {
        let (su, url) = (su.clone(), url.clone());
        tasks.spawn(async move {
            for j in 0..5 {
                let path = format!("before/{w}/{j}");
                let (s, b) = call(
                    &su,
                    &url,
                    SECRETS_PATH,
                    json!({"path": path, "values": {"v": path}}),
                )
                .await;
                assert_eq!(s, StatusCode::OK, "{b}");
            }
        });
    }
    join_all(tasks).await;
    // Fence: the old primary keeps running, read-only; then promote.
    primary.sql("ALTER SYSTEM SET default_transaction_read_only = on");
    primary.sql("SELECT pg_reload_conf()");
    standby.promote();
    let promoted = Instant::now();
    let mut failures = Vec::new();
    let mut first_ok = None;
    for j in 0..40 {
        let path = format!("after/{j}");
        let (s, b) = call(
            &su,
            &url,
            SECRETS_PATH,
            json!({"path": path, "values": {"v": path}}),
        )
        .await;
        if s == StatusCode::OK {
            first_ok.get_or_insert_with(|| promoted.elapsed());
            let (s, b) = call(
                &su,
                &url,
                &action(SECRETS_PATH, "get"),
                json!({"path": path}),
            )
            .await;
            assert_eq!(
                (s, b["data"]["v"].as_str()),
                (StatusCode::OK, Some(path.as_str())),
                "{b}"
            );
        } else {
            assert!(
                first_ok.is_none(),
                "a write failed after writes had resumed: {s} {b}\n{}",
                c.dump_logs()
            );
            failures.push(format!("{s} {b}"));
        }
    }
    println!(
        "fenced primary: {} writes failed before the first on the new primary ({:.0} ms after the promotion): {failures:?}",
        failures.len(),
        first_ok.unwrap_or_default().as_secs_f64() * 1000.0
    );
    assert!(
        first_ok.is_some(),
        "no write went through: {failures:?}\n{}",
        c.dump_logs()
    );
    assert!(failures.len() <= 2, "{failures:?}");
    // Everything written is on the new primary.
    let rows = standby.sql("SELECT count(*) FROM kv");
    println!("new primary holds {} rows", rows.trim());
}
