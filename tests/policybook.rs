#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The policy book with real Nexus processes on one shared store (SQLite file, PostgreSQL, S3):
//! a change through one instance is in force for the next request on another; a book the
//! store's administrator put back or edited fails closed (500 and a log line); per-name policy
//! rows of an earlier version stay out of force unless an operator sets
//! `SPIKE_NEXUS_UPGRADE_POLICY_ROWS`, and then move into one book when several instances start
//! on them at once.
//!
//! The store's administrator is [`Admin`]: writes that bypass Nexus, each giving the record a
//! new revision as any write does — rusqlite on the SQLite file itself, the store client for
//! PostgreSQL and S3.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use hyper::{StatusCode, Uri};
use serde_json::json;
use spike::crypto::{AeadKey, Share, combine};
use spike::nexus::policy::{Permission, StoredPolicy};
use spike::store::{AnyStore, Expect, Namespace, Store};
use spike::transport::HttpsClient;

const BOOK: &str = "policy-book";
const POLICY: &str = "/v1/acl/policy";
const SECRETS: &str = "/v1/store/secrets";
const GET: &str = "/v1/store/secrets?action=get";

/// Environment pairs that point Nexus at one store.
type BackendEnv = Vec<(String, String)>;

/// Someone with write access to the store, not to Nexus.
enum Admin {
    Sqlite(PathBuf),
    Store(AnyStore),
}

impl Admin {
    fn sqlite(&self) -> Option<rusqlite::Connection> {
        let Admin::Sqlite(path) = self else {
            return None;
        };
        let db = rusqlite::Connection::open(path).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        Some(db)
    }

    async fn read(&self, ns: Namespace, key: &str) -> Option<Vec<u8>> {
        match self {
            Admin::Sqlite(_) => {
                let db = self.sqlite().unwrap();
                rusqlite::OptionalExtension::optional(db.query_row(
                    "SELECT value FROM kv WHERE ns = ?1 AND key = ?2",
                    (ns.as_str(), key),
                    |r| r.get(0),
                ))
                .unwrap()
            }
            Admin::Store(s) => s.get(ns, key).await.unwrap().map(|e| e.value),
        }
    }

    /// Sets `key` to `value`, creating it if absent, at a new revision.
    async fn write(&self, ns: Namespace, key: &str, value: Vec<u8>) {
        match self {
            Admin::Sqlite(_) => {
                let db = self.sqlite().unwrap();
                let next: i64 = db
                    .query_row(
                        "UPDATE sequence SET value = value + 1 WHERE id = 1 RETURNING value",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                db.execute(
                    "INSERT INTO kv (ns, key, value, revision) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, revision = excluded.revision",
                    (ns.as_str(), key, value, next),
                )
                .unwrap();
            }
            Admin::Store(s) => {
                let expect = match s.get(ns, key).await.unwrap() {
                    Some(e) => Expect::Revision(e.revision),
                    None => Expect::Absent,
                };
                assert!(matches!(
                    s.put(ns, key, value, expect).await.unwrap(),
                    spike::store::Written::Done(_)
                ));
            }
        }
    }

    async fn remove(&self, ns: Namespace, key: &str) {
        match self {
            Admin::Sqlite(_) => {
                let db = self.sqlite().unwrap();
                db.execute(
                    "DELETE FROM kv WHERE ns = ?1 AND key = ?2",
                    (ns.as_str(), key),
                )
                .unwrap();
            }
            Admin::Store(s) => {
                let e = s.get(ns, key).await.unwrap().unwrap();
                assert!(s.delete(ns, key, &e.revision).await.unwrap());
            }
        }
    }

    async fn keys(&self, ns: Namespace) -> Vec<String> {
        match self {
            Admin::Sqlite(_) => {
                let db = self.sqlite().unwrap();
                let mut stmt = db
                    .prepare("SELECT key FROM kv WHERE ns = ?1 ORDER BY key")
                    .unwrap();
                stmt.query_map([ns.as_str()], |r| r.get(0))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            }
            Admin::Store(s) => s.list(ns, "").await.unwrap(),
        }
    }
}

fn grant(name: &str, id: &str, path: &str) -> serde_json::Value {
    json!({"name": name, "spiffeidPattern": id, "pathPattern": path, "permissions": ["read"]})
}

/// The status a workload gets reading `path` through `url`.
async fn read_status(w: &HttpsClient, url: &Uri, path: &str) -> (StatusCode, serde_json::Value) {
    call(w, url, GET, json!({ "path": path })).await
}

/// Every Nexus log of the cluster, together.
fn all_logs(c: &Cluster) -> String {
    c.nexus.iter().map(Proc::logs).collect()
}

/// Policy puts, changes and deletes through one instance, each checked by the very next request
/// on the other, alternating the instances and plain-text and regex patterns.
async fn a_change_is_in_force_for_the_next_request_on_another_instance(
    mut c: Cluster,
    env: BackendEnv,
    _admin: Admin,
) {
    let urls = c.start_ready_together(2, &pairs(&env)).await;
    let su = c.superuser();
    let w = c.api_client("w", "/app/w");
    call_ok(
        &su,
        &urls[0],
        SECRETS,
        json!({"path": "books/1", "values": {"v": "x"}}),
    )
    .await;
    call_ok(
        &su,
        &urls[0],
        SECRETS,
        json!({"path": "other/1", "values": {"v": "y"}}),
    )
    .await;
    for round in 0..6 {
        let (writer, reader) = (&urls[round % 2], &urls[(round + 1) % 2]);
        let id = if round % 3 == 0 {
            "^spiffe://spike\\.ist/app/w$"
        } else {
            "^spiffe://spike\\.ist/app/[w]$"
        };
        assert_eq!(
            read_status(&w, reader, "books/1").await.0,
            StatusCode::UNAUTHORIZED
        );
        call_ok(&su, writer, POLICY, grant("w", id, "^books/")).await;
        assert_eq!(
            read_status(&w, reader, "books/1").await.0,
            StatusCode::OK,
            "round {round}: a grant through one instance was not in force on the other"
        );
        assert_eq!(
            read_status(&w, reader, "other/1").await.0,
            StatusCode::UNAUTHORIZED
        );
        // Changed in place: the old path is refused, the new one granted, at once.
        call_ok(&su, writer, POLICY, grant("w", id, "^other/")).await;
        assert_eq!(
            read_status(&w, reader, "books/1").await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(read_status(&w, reader, "other/1").await.0, StatusCode::OK);
        let (s, l) = call(&su, reader, &format!("{POLICY}?action=list"), json!({})).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(l["policies"][0]["pathPattern"], "^other/", "{l}");
        call_ok(
            &su,
            writer,
            &format!("{POLICY}?action=delete"),
            json!({"id": "w"}),
        )
        .await;
        assert_eq!(
            read_status(&w, reader, "other/1").await.0,
            StatusCode::UNAUTHORIZED,
            "round {round}: a revocation through one instance was not in force on the other"
        );
    }
}

/// The store's administrator puts back the book from before a revocation, then edits the
/// current one: workload requests and policy routes fail closed with 500 and a log line, on
/// the running instance and after a restart; service resumes when the right book is back.
async fn a_replayed_or_edited_book_fails_closed(mut c: Cluster, env: BackendEnv, admin: Admin) {
    let n = c.start_nexus(&pairs(&env));
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.superuser();
    let w = c.api_client("w", "/app/w");
    call_ok(
        &su,
        &url,
        SECRETS,
        json!({"path": "books/1", "values": {"v": "x"}}),
    )
    .await;
    call_ok(
        &su,
        &url,
        POLICY,
        grant("w", "^spiffe://spike\\.ist/app/w$", "^books/"),
    )
    .await;
    assert_eq!(read_status(&w, &url, "books/1").await.0, StatusCode::OK);
    let granting = admin.read(Namespace::System, BOOK).await.unwrap();
    call_ok(
        &su,
        &url,
        &format!("{POLICY}?action=delete"),
        json!({"id": "w"}),
    )
    .await;
    assert_eq!(
        read_status(&w, &url, "books/1").await.0,
        StatusCode::UNAUTHORIZED
    );
    let revoked = admin.read(Namespace::System, BOOK).await.unwrap();
    let internal = (
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"err": "api_internal_error"}),
    );

    // The revocation undone by putting the earlier book back.
    admin.write(Namespace::System, BOOK, granting.clone()).await;
    assert_eq!(
        read_status(&w, &url, "books/1").await,
        internal,
        "replay accepted"
    );
    assert_eq!(
        call(&su, &url, &format!("{POLICY}?action=list"), json!({})).await,
        internal
    );
    let logs = c.nexus[n].logs();
    assert!(
        logs.contains("the policy book went back from generation"),
        "{logs}"
    );
    // The right book back: the revocation holds, policies list again.
    admin.write(Namespace::System, BOOK, revoked.clone()).await;
    assert_eq!(
        read_status(&w, &url, "books/1").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&su, &url, &format!("{POLICY}?action=list"), json!({})).await,
        (StatusCode::OK, json!({"policies": []}))
    );

    // The current book, edited.
    let mut edited = revoked.clone();
    let last = edited.len() - 1;
    edited[last] ^= 1;
    admin.write(Namespace::System, BOOK, edited).await;
    assert_eq!(
        read_status(&w, &url, "books/1").await,
        internal,
        "edit accepted"
    );
    let logs = c.nexus[n].logs();
    assert!(logs.contains("does not open under this root key"), "{logs}");
    // Nothing in memory decides it: a restarted instance refuses the edited book too.
    c.nexus[n].restart();
    wait_status(&c.anonymous(), &url, "ready").await;
    assert_eq!(read_status(&w, &url, "books/1").await, internal);
    admin.write(Namespace::System, BOOK, revoked).await;
    assert_eq!(
        read_status(&w, &url, "books/1").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&su, &url, &format!("{POLICY}?action=list"), json!({})).await,
        (StatusCode::OK, json!({"policies": []}))
    );
}

/// The root key of the cluster, rebuilt from its Keepers' shards once every Keeper holds one
/// (Nexus reports ready before its first push has reached them all).
async fn root_key(c: &Cluster) -> spike::crypto::RootKey {
    let mut shares = Vec::new();
    for i in 0..c.keepers.len() {
        let (index, value) = wait_for("a Keeper's shard", Duration::from_secs(20), || {
            c.keeper_shard(i)
        })
        .await;
        shares.push(Share::new(index.unwrap(), value).unwrap());
    }
    combine(&shares).unwrap()
}

/// A policy row as versions before the book wrote it: the policy's JSON sealed under the
/// policy key with its name as associated data.
fn old_row(key: &AeadKey, p: &StoredPolicy) -> Vec<u8> {
    let aad = format!("spike/policy/v1\0{}", p.name);
    key.seal(aad.as_bytes(), &serde_json::to_vec(p).unwrap())
        .unwrap()
}

fn stored(name: &str, id: &str, path: &str, created: i64) -> StoredPolicy {
    StoredPolicy {
        name: name.into(),
        spiffeid_pattern: id.into(),
        path_pattern: path.into(),
        permissions: vec![Permission::Read],
        created,
        updated: created + 1_000_000_000,
    }
}

/// A store as an earlier version left it — per-name policy rows, no book. An instance started
/// without `SPIKE_NEXUS_UPGRADE_POLICY_ROWS` creates an empty book, leaves the rows out of
/// force and says so, naming the setting (a store administrator could have put them there).
/// Then three instances start on it at once with the setting: one book holds every row that
/// opens, with its times; the rows are gone; the policies are in force on every instance.
async fn per_name_rows_move_into_one_book(mut c: Cluster, env: BackendEnv, admin: Admin) {
    // A first start makes the root key (and an empty book, which the earlier version had not).
    let n = c.start_nexus(&pairs(&env));
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    wait_for("the policy book", Duration::from_secs(20), || async {
        admin.read(Namespace::System, BOOK).await.map(|_| ())
    })
    .await;
    let key = root_key(&c).await.derive("spike/policies/v1");
    c.nexus[n].kill();
    admin.remove(Namespace::System, BOOK).await;
    let rows = [
        stored(
            "a",
            "^spiffe://spike\\.ist/app/w$",
            "^a/",
            1_600_000_000_000_000_000,
        ),
        stored(
            "b",
            "^spiffe://spike.ist/app/.+$",
            "^b/",
            1_600_000_001_000_000_000,
        ),
        stored(
            "c",
            "^spiffe://spike\\.ist/app/other$",
            "^c/",
            1_600_000_002_000_000_000,
        ),
    ];
    for p in &rows {
        admin
            .write(Namespace::Policies, &p.name, old_row(&key, p))
            .await;
    }
    // A row that does not open: it was never in force and must not become so.
    admin
        .write(Namespace::Policies, "d", old_row(&key, &rows[0]))
        .await;

    // Without the operator's setting: an empty book, the rows stay and are not in force.
    let plain = c.start_nexus(&pairs(&env));
    let url = c.nexus[plain].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    wait_for(
        "the warning about the rows",
        Duration::from_secs(20),
        || async {
            c.nexus[plain]
                .logs()
                .contains("SPIKE_NEXUS_UPGRADE_POLICY_ROWS=true")
                .then_some(())
        },
    )
    .await;
    let w = c.api_client("w", "/app/w");
    assert_eq!(
        read_status(&w, &url, "a/1").await.0,
        StatusCode::UNAUTHORIZED,
        "a per-name row is in force without the operator's setting"
    );
    assert_eq!(admin.keys(Namespace::Policies).await.len(), 4);
    c.nexus[plain].kill();

    let mut upgrading = pairs(&env);
    upgrading.push(("SPIKE_NEXUS_UPGRADE_POLICY_ROWS", "true"));
    let urls = c.start_ready_together(3, &upgrading).await;
    wait_for(
        "the per-name rows to go",
        Duration::from_secs(20),
        || async {
            admin
                .keys(Namespace::Policies)
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let logs = all_logs(&c);
    assert_eq!(
        logs.matches("moved the per-name policy rows of an earlier version into the policy book")
            .count(),
        1,
        "{logs}"
    );
    let su = c.superuser();
    for path in ["a/1", "b/1", "c/1"] {
        call_ok(
            &su,
            &urls[0],
            SECRETS,
            json!({"path": path, "values": {"v": path}}),
        )
        .await;
    }
    for url in &urls {
        assert_eq!(read_status(&w, url, "a/1").await.0, StatusCode::OK);
        assert_eq!(read_status(&w, url, "b/1").await.0, StatusCode::OK);
        assert_eq!(
            read_status(&w, url, "c/1").await.0,
            StatusCode::UNAUTHORIZED
        );
        let (s, l) = call(&su, url, &format!("{POLICY}?action=list"), json!({})).await;
        assert_eq!(s, StatusCode::OK);
        let listed: Vec<_> = l["policies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["createdAt"].as_str().unwrap().to_string(),
                    p["updatedAt"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let expected: Vec<_> = rows
            .iter()
            .map(|p| {
                let api = p.to_api();
                (api.name, api.created_at, api.updated_at)
            })
            .collect();
        assert_eq!(listed, expected);
    }
    // Changes go to the book from now on, and no row comes back.
    call_ok(
        &su,
        &urls[1],
        &format!("{POLICY}?action=delete"),
        json!({"id": "a"}),
    )
    .await;
    assert_eq!(
        read_status(&w, &urls[2], "a/1").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(admin.keys(Namespace::Policies).await.is_empty());
}

/// The three tests for one backend: `$setup` evaluates, inside an async test and given the
/// cluster `c`, to `(BackendEnv, Admin)`.
macro_rules! policybook_suite {
    ($name:ident, |$c:ident| $setup:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_change_is_in_force_for_the_next_request_on_another_instance() {
                let $c = Cluster::new(3);
                let (env, admin) = $setup;
                super::a_change_is_in_force_for_the_next_request_on_another_instance(
                    $c, env, admin,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_replayed_or_edited_book_fails_closed() {
                let $c = Cluster::new(3);
                let (env, admin) = $setup;
                super::a_replayed_or_edited_book_fails_closed($c, env, admin).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn per_name_rows_move_into_one_book() {
                let $c = Cluster::new(3);
                let (env, admin) = $setup;
                super::per_name_rows_move_into_one_book($c, env, admin).await;
            }
        }
    };
}

policybook_suite!(sqlite, |c| (
    BackendEnv::new(),
    Admin::Sqlite(c.data_dir.join("spike.db"))
));

policybook_suite!(postgres, |c| {
    let _ = &c;
    let url = common::postgres::fresh_database().await;
    let env = vec![
        (
            "SPIKE_NEXUS_BACKEND_STORE".to_string(),
            "postgres".to_string(),
        ),
        ("SPIKE_NEXUS_DB_URL".to_string(), url.clone()),
    ];
    let store = spike::store::postgres::PostgresStore::open(&url)
        .await
        .unwrap();
    (env, Admin::Store(AnyStore::Postgres(store)))
});

policybook_suite!(s3, |c| {
    let _ = &c;
    let env = common::s3::shared_env("policybook");
    let v = |k: &str| {
        env.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let cfg = spike::store::S3Config {
        endpoint: Some(v("SPIKE_NEXUS_S3_ENDPOINT")),
        bucket: v("SPIKE_NEXUS_S3_BUCKET"),
        prefix: v("SPIKE_NEXUS_S3_PREFIX"),
        region: v("SPIKE_NEXUS_S3_REGION"),
        path_style: true,
        credentials: spike::store::S3Credentials {
            access_key_id: v("AWS_ACCESS_KEY_ID"),
            secret_access_key: v("AWS_SECRET_ACCESS_KEY"),
            session_token: None,
        },
    };
    let store = spike::store::s3::S3Store::open(&cfg).unwrap();
    (env, Admin::Store(AnyStore::S3(store)))
});
