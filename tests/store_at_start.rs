#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! A Nexus whose PostgreSQL is down when it starts (issue 16): it stays up, says
//! `store_unavailable` on `/health`, and becomes ready by itself when the database appears —
//! where it used to exit, which under systemd turns a database outage into a restart loop.

mod common;

use std::time::Duration;

use common::postgres::{PgServer, nexus_env};
use common::*;
use hyper::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexus_started_without_its_database_waits_for_it() {
    if std::env::var("SPIKE_TEST_POSTGRES_URL").is_err() && std::env::var("CI").is_err() {
        eprintln!("skipped: PostgreSQL tools come with ./test (scripts/postgres.sh)");
        return;
    }
    let mut c = Cluster::new(3);
    let pg = PgServer::start(c.dir.path());
    pg.stop("immediate");
    let env = nexus_env(&pg.url);
    let n = c.start_nexus(&pairs(&env));
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    let body = wait_status(&anon, &url, "store_unavailable").await;
    assert_eq!(body["backend"], "postgres", "{body}");
    // It keeps waiting: two more failed attempts, and still running and answering.
    wait_for("two more attempts", Duration::from_secs(30), || {
        let logs = c.nexus[n].logs();
        async move { (logs.matches("the backing store is unavailable").count() >= 3).then_some(()) }
    })
    .await;
    assert!(c.nexus[n].is_running(), "{}", c.dump_logs());
    let (s, b) = health(&anon, &url).await.unwrap();
    assert_eq!(
        (s, b["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("store_unavailable"))
    );
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let (s, b) = call(
        &su,
        &url,
        spike::protocol::nexus::SECRETS_PATH,
        serde_json::json!({"path": "a/b", "values": {"k": "v"}}),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert_eq!(b["err"], "store_unavailable");
    // The database appears: Nexus opens it, creates the key and serves.
    pg.restart();
    wait_status(&anon, &url, "ready").await;
    let (s, b) = call(
        &su,
        &url,
        spike::protocol::nexus::SECRETS_PATH,
        serde_json::json!({"path": "a/b", "values": {"k": "v"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(!c.dump_logs().contains("panicked"));
}

/// A database URL that cannot work is a configuration error, not an outage: Nexus stops at
/// once with exit status 2 and a line naming the variable (never its value), instead of
/// waiting for a database that no retry can reach.
#[test]
fn a_malformed_database_url_stops_nexus_with_a_configuration_error() {
    let c = Cluster::new(1);
    for (i, url) in [
        "not a url at all",
        "postgres://spike:s3cr3t-pw@127.0.0.1:5432/db?target_session_attrs=read-only",
        "host=127.0.0.1 password=s3cr3t-pw target_session_attrs=any",
    ]
    .into_iter()
    .enumerate()
    {
        let mut nexus = Proc::launch(
            &format!("bad-url-{i}"),
            c.dir.path(),
            &["nexus"],
            c.nexus_env(&[
                ("SPIKE_NEXUS_SHAMIR_THRESHOLD", "1"),
                ("SPIKE_NEXUS_BACKEND_STORE", "postgres"),
                ("SPIKE_NEXUS_DB_URL", url),
            ]),
        );
        let code = nexus.wait_exit(Duration::from_secs(20));
        let logs = nexus.logs();
        assert_eq!(code, Some(2), "{url}: {logs}");
        assert!(logs.contains("SPIKE_NEXUS_DB_URL"), "{logs}");
        assert!(
            !logs.contains("s3cr3t-pw"),
            "the password reached the log: {logs}"
        );
    }
}
