#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! `spike migrate from-spike` with real processes: the store a real SPIKE Nexus wrote
//! (tests/fixtures/spike-main/) migrated into a running cluster on SQLite, PostgreSQL and S3 and
//! read back through the CLI; reruns that change nothing; refusals (another deployment's
//! recovery files, a truncated or damaged database, a conflicting secret or policy, a target
//! without a root key, paths our rules refuse) that leave the target as it was; and edge cases
//! in SPIKE's format written here by a test-only encoder (every version deleted, more versions
//! than the target keeps, unicode values, no policies), with the source key from Keepers.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use common::*;
use hyper::StatusCode;
use rusqlite::Connection;
use serde_json::{Value, json};
use spike::crypto::{RootKey, encode_recovery_shard, split};
use spike::migrate::spike_db::parse_go_time;
use spike::nexus::NexusConfig;
use spike::store::{AnyStore, Namespace, Store};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/spike-main");

fn expected() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(Path::new(FIXTURE).join("expected.json")).unwrap(),
    )
    .unwrap()
}

fn fixture_db() -> String {
    format!("{FIXTURE}/spike.db")
}

fn fixture_recover() -> String {
    format!("{FIXTURE}/recover")
}

/// The Nexus environment of cluster `c` on the store `store` (empty: SQLite), as the migration
/// runs with it.
fn target_env(c: &Cluster, store: &[(String, String)]) -> HashMap<String, String> {
    let mut env = c.nexus_env(&pairs(store));
    env.remove("SPIKE_NEXUS_TLS_PORT");
    env
}

/// `spike migrate from-spike ARGS` with the target's Nexus environment.
fn migrate(c: &Cluster, store: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let env = target_env(c, store);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_spike(&[&["migrate", "from-spike"], args].concat(), &env);
    eprintln!("migrate {args:?}: exit {code}\n{out}{err}");
    (code, out, err)
}

/// [`migrate`] of the SPIKE database at `db`, its key from the fixture's recovery files, with
/// `extra` arguments.
fn migrate_with_fixture_key(
    c: &Cluster,
    store: &[(String, String)],
    db: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let recover = fixture_recover();
    let args = [&[db, "--recover-dir", recover.as_str()], extra].concat();
    migrate(c, store, &args)
}

/// Every record of the target store with its revision, read through the store itself.
async fn dump(c: &Cluster, store: &[(String, String)]) -> BTreeMap<String, (Vec<u8>, String)> {
    let config = NexusConfig::from_source(&target_env(c, store)).unwrap();
    let store = AnyStore::open(&config.backend).await.unwrap();
    let mut out = BTreeMap::new();
    for ns in [Namespace::Secrets, Namespace::Policies, Namespace::System] {
        for key in store.list(ns, "").await.unwrap() {
            let e = store.get(ns, &key).await.unwrap().unwrap();
            out.insert(format!("{}/{key}", ns.as_str()), (e.value, e.revision.0));
        }
    }
    out
}

/// A cluster of 3 Keepers and one Nexus on `store`, ready; returns it with a superuser's SVID.
async fn ready_cluster(store: &[(String, String)]) -> (Cluster, PathBuf) {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&pairs(store));
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    let su = c.pki.issue("superuser", "/spike/pilot/role/superuser");
    (c, su)
}

/// `spike ARGS --format json` as the superuser against the cluster's first Nexus.
fn cli(c: &Cluster, su: &Path, args: &[&str]) -> (i32, Value, String) {
    let url = c.nexus[0].base_url();
    let (code, out, err) = run_spike(
        &[args, &["--format", "json"]].concat(),
        &client_env(&url, su),
    );
    (code, serde_json::from_str(&out).unwrap_or(Value::Null), err)
}

fn rfc3339_nanos(text: &Value) -> i64 {
    let t = time::OffsetDateTime::parse(
        text.as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    i64::try_from(t.unix_timestamp_nanos()).unwrap()
}

/// Reads every secret version, metadata and policy of expected.json back through the CLI, and
/// checks that the migrated policies are in force for workloads.
async fn check_fixture(c: &Cluster, su: &Path) {
    let want = expected();
    for (path, s) in want["secrets"].as_object().unwrap() {
        for v in s["versions"].as_array().unwrap() {
            let n = v["version"].to_string();
            let (code, got, err) = cli(c, su, &["secret", "get", path, "--version", &n]);
            // Exactly what SPIKE served: live versions, all of them (SPIKE never pruned the
            // rows of app/rotating), and no deleted one.
            if v["served_by_spike"] == true {
                assert_eq!(code, 0, "{path} v{n}: {err}");
                assert_eq!(got["data"], v["data"], "{path} v{n}");
                assert_eq!(got["version"], v["version"], "{path} v{n}");
            } else {
                assert_eq!(code, 1, "{path} v{n} is deleted: {got}");
                assert!(err.contains("not found"), "{path} v{n}: {err}");
            }
        }
        let (code, got, _) = cli(c, su, &["secret", "get", path]);
        match &s["current_served_by_spike"] {
            Value::Null => assert_eq!(code, 1, "{path}: {got}"),
            data => assert_eq!((code, &got["data"]), (0, data), "{path}"),
        }
        let (code, meta, err) = cli(c, su, &["secret", "metadata", path]);
        assert_eq!(code, 0, "{path}: {err}");
        let m = &s["metadata"];
        assert_eq!(
            meta["metadata"]["currentVersion"], m["current_version"],
            "{path}"
        );
        assert_eq!(
            rfc3339_nanos(&meta["metadata"]["createdTime"]),
            m["created_time"].as_i64().unwrap() * 1_000_000_000,
            "{path}"
        );
        assert_eq!(
            rfc3339_nanos(&meta["metadata"]["updatedTime"]),
            m["updated_time"].as_i64().unwrap() * 1_000_000_000,
            "{path}"
        );
        let versions = meta["versions"].as_object().unwrap();
        assert_eq!(
            versions.len(),
            s["versions"].as_array().unwrap().len(),
            "{path}"
        );
        for v in s["versions"].as_array().unwrap() {
            let got = &versions[&v["version"].to_string()];
            assert_eq!(
                rfc3339_nanos(&got["createdTime"]),
                parse_go_time(v["created_time"].as_str().unwrap()).unwrap(),
                "{path} {v}"
            );
            match v["deleted_time"].as_str() {
                None => assert!(got["deletedTime"].is_null(), "{path} {got}"),
                Some(t) => assert_eq!(
                    rfc3339_nanos(&got["deletedTime"]),
                    parse_go_time(t).unwrap(),
                    "{path}"
                ),
            }
        }
    }
    let (code, list, err) = cli(c, su, &["secret", "list"]);
    assert_eq!(code, 0, "{err}");
    let paths: Vec<&String> = want["secrets"].as_object().unwrap().keys().collect();
    assert_eq!(list["keys"], json!(paths));

    let (code, got, err) = cli(c, su, &["policy", "list"]);
    assert_eq!(code, 0, "{err}");
    let got: BTreeMap<String, Value> = got["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p.clone()))
        .collect();
    let policies = want["policies"].as_object().unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        policies.keys().collect::<Vec<_>>()
    );
    for (name, p) in policies {
        let g = &got[name];
        assert_eq!(g["spiffiedPattern"], p["spiffe_id_pattern"], "{name}");
        assert_eq!(g["pathPattern"], p["path_pattern"], "{name}");
        assert_eq!(g["permissions"], p["permissions"], "{name}");
        assert_eq!(
            rfc3339_nanos(&g["createdAt"]),
            p["created_time"].as_i64().unwrap() * 1_000_000_000
        );
        assert_eq!(
            rfc3339_nanos(&g["updatedAt"]),
            p["updated_time"].as_i64().unwrap() * 1_000_000_000
        );
    }

    // The policies are in force: db-readers lets a db workload read app/db/, nothing else.
    let url = c.nexus[0].url();
    let db = c.api_client("db-reader", "/workload/db-7");
    let get = |path: &str| json!({ "path": path });
    let (s, b) = call(
        &db,
        &url,
        &action(SECRETS_PATH, "get"),
        get("app/db/credentials"),
    )
    .await;
    assert_eq!(
        (s, &b["data"]["password"]),
        (StatusCode::OK, &json!("s3cr3t-v3"))
    );
    let (s, _) = call(
        &db,
        &url,
        &action(SECRETS_PATH, "get"),
        get("app/api/token"),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let api = c.api_client("api", "/workload/api");
    let (s, _) = call(
        &api,
        &url,
        SECRETS_PATH,
        json!({"path": "app/api/new", "values": {"k": "v"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

/// The whole story on one backend: migrate, read back, rerun (nothing written), and a Nexus
/// started afterwards on the same store serves it too.
async fn fixture_into(store: Vec<(String, String)>) {
    let (mut c, su) = ready_cluster(&store).await;
    let (code, out, err) = migrate_with_fixture_key(&c, &store, &fixture_db(), &[]);
    assert_eq!(code, 0, "{out}{err}\n{}", c.dump_logs());
    assert!(
        out.contains("6 secret(s) with 15 version(s) and 3 policy(ies) written"),
        "{out}"
    );
    check_fixture(&c, &su).await;
    // check_fixture wrote app/api/new through the api-writers policy; take it out again.
    let (code, _, err) = cli(&c, &su, &["secret", "delete", "app/api/new"]);
    assert_eq!(code, 0, "{err}");

    let before = dump(&c, &store).await;
    let (code, out, err) = migrate_with_fixture_key(&c, &store, &fixture_db(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("nothing to do"), "{out}");
    assert!(
        dump(&c, &store).await == before,
        "a rerun changed the store"
    );

    // Another instance started now reads the same.
    let n = c.start_nexus(&pairs(&store));
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    c.nexus.swap(0, n);
    let (code, got, _) = cli(&c, &su, &["secret", "get", "shared/config.v1"]);
    assert_eq!(code, 0);
    assert_eq!(got["data"]["motd"], "héllo wörld ✓ \"quoted\"\nsecond line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spike_fixture_migrates_into_sqlite_and_a_rerun_changes_nothing() {
    fixture_into(Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spike_fixture_migrates_into_postgres_and_a_rerun_changes_nothing() {
    let url = common::postgres::fresh_database().await;
    fixture_into(common::postgres::nexus_env(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spike_fixture_migrates_into_s3_and_a_rerun_changes_nothing() {
    fixture_into(common::s3::shared_env("migrate")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_completes_a_partial_migration() {
    let (c, su) = ready_cluster(&[]).await;
    // What a run stopped by a store failure leaves: the policies (one write, first) and some
    // of the secrets. Made here by migrating a copy of the store that lacks the other secrets.
    let partial = c.dir.path().join("partial.db");
    std::fs::copy(fixture_db(), &partial).unwrap();
    {
        let db = Connection::open(&partial).unwrap();
        for table in ["secrets", "secret_metadata"] {
            db.execute(
                &format!("DELETE FROM {table} WHERE path IN ('app/rotating', 'app/undeleted', 'shared/config.v1')"),
                [],
            )
            .unwrap();
        }
    }
    let (code, out, err) = migrate_with_fixture_key(&c, &[], partial.to_str().unwrap(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("3 secret(s) with 6 version(s) and 3 policy(ies) written"),
        "{out}"
    );
    let (code, out, err) = migrate_with_fixture_key(&c, &[], &fixture_db(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("3 secret(s) with 9 version(s) and 0 policy(ies) written; 3 secret(s) and 3 policy(ies) already there"),
        "{out}"
    );
    check_fixture(&c, &su).await;
}

/// Recovery files of a random key (another deployment), in `dir`.
fn foreign_recovery_files(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let key = RootKey::generate().unwrap();
    for s in split(&key, 2, 3).unwrap() {
        std::fs::write(
            dir.join(format!("spike.recovery.{}.txt", s.index)),
            encode_recovery_shard(&s).as_bytes(),
        )
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_leaves_the_target_as_it_was() {
    let (c, su) = ready_cluster(&[]).await;
    let dir = c.dir.path().to_path_buf();
    // A secret of the target's own, which the SPIKE store also holds with other values.
    let (code, _, err) = cli(&c, &su, &["secret", "put", "app/api/token", "token=ours"]);
    assert_eq!(code, 0, "{err}");
    let before = dump(&c, &[]).await;
    let unchanged = || async { assert!(dump(&c, &[]).await == before, "the target changed") };

    // Recovery files of another deployment: the key does not open the database.
    let foreign = dir.join("foreign");
    foreign_recovery_files(&foreign);
    let (code, out, err) = migrate(
        &c,
        &[],
        &[&fixture_db(), "--recover-dir", foreign.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("does not open") && err.contains("another deployment"),
        "{err}"
    );
    unchanged().await;

    // One good file and one of another deployment: fewer than the threshold of the right key.
    let mixed = dir.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(
        format!("{}/spike.recovery.1.txt", fixture_recover()),
        mixed.join("spike.recovery.1.txt"),
    )
    .unwrap();
    std::fs::copy(
        foreign.join("spike.recovery.2.txt"),
        mixed.join("spike.recovery.2.txt"),
    )
    .unwrap();
    let (code, _, err) = migrate(
        &c,
        &[],
        &[&fixture_db(), "--recover-dir", mixed.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not open"), "{err}");
    unchanged().await;

    // A recovery file that is not one.
    let garbage = dir.join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("spike.recovery.1.txt"), "spike:1:nothex").unwrap();
    let (code, _, err) = migrate(
        &c,
        &[],
        &[&fixture_db(), "--recover-dir", garbage.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("not a valid recovery shard") && !err.contains("nothex"),
        "{err}"
    );
    unchanged().await;

    // A truncated copy of the database.
    let truncated = dir.join("truncated.db");
    let bytes = std::fs::read(fixture_db()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, err) = migrate_with_fixture_key(&c, &[], truncated.to_str().unwrap(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not an intact SQLite database"), "{err}");
    unchanged().await;
    // A copy with one page overwritten: SQLite's check of every page finds it.
    let damaged_page = dir.join("damaged-page.db");
    let mut copy = bytes.clone();
    copy[2 * 4096..3 * 4096].fill(0xff);
    std::fs::write(&damaged_page, &copy).unwrap();
    let (code, _, err) = migrate_with_fixture_key(&c, &[], damaged_page.to_str().unwrap(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("not an intact SQLite database (truncated or damaged: "),
        "{err}"
    );
    assert_eq!(
        err.trim_end()
            .lines()
            .last()
            .unwrap()
            .matches("spike migrate")
            .count(),
        1
    );
    unchanged().await;
    // Not a database at all, and an empty file.
    for (name, content) in [
        ("text.db", &b"hello, this is not SQLite at all"[..]),
        ("empty.db", b""),
    ] {
        let f = dir.join(name);
        std::fs::write(&f, content).unwrap();
        let (code, _, err) = migrate_with_fixture_key(&c, &[], f.to_str().unwrap(), &[]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(
            err.contains("SQLite") || err.contains("not a SPIKE Nexus database"),
            "{name}: {err}"
        );
        unchanged().await;
    }

    // A copy in which one version's ciphertext was changed: the key opens the rest, not it.
    let damaged = dir.join("damaged.db");
    std::fs::copy(fixture_db(), &damaged).unwrap();
    {
        let db = Connection::open(&damaged).unwrap();
        let mut data: Vec<u8> = db
            .query_row(
                "SELECT encrypted_data FROM secrets WHERE path = 'app/rotating' AND version = 5",
                [],
                |r| r.get(0),
            )
            .unwrap();
        data[0] ^= 1;
        db.execute(
            "UPDATE secrets SET encrypted_data = ?1 WHERE path = 'app/rotating' AND version = 5",
            [data],
        )
        .unwrap();
    }
    let (code, _, err) = migrate_with_fixture_key(&c, &[], damaged.to_str().unwrap(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("damaged") && err.contains("\"app/rotating\" version 5"),
        "{err}"
    );
    unchanged().await;

    // The conflicting secret: refused, named, nothing written (no policy either).
    let (code, out, err) = migrate_with_fixture_key(&c, &[], &fixture_db(), &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("exist in the target with other content") && err.contains("\"app/api/token\""),
        "{err}"
    );
    assert!(
        !err.contains("tok-1") && !err.contains("ours"),
        "values in the message: {err}"
    );
    unchanged().await;

    // Deleted, the target's secret is still there (soft delete): still a conflict, in a dry
    // run too; and a policy of the same name with another grant is named as well.
    let (code, _, err) = cli(&c, &su, &["secret", "delete", "app/api/token"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = migrate_with_fixture_key(&c, &[], &fixture_db(), &["--dry-run"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("\"app/api/token\" (versions 1 here, 1,2 in the source)"),
        "{err}"
    );
    let (code, _, err) = run_spike(
        &[
            "policy",
            "create",
            "--name",
            "db-readers",
            "--spiffeid-pattern",
            "^spiffe://spike\\.ist/other$",
            "--path-pattern",
            "^app/db/.*$",
            "--permissions",
            "read",
        ],
        &client_env(&c.nexus[0].base_url(), &su),
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = migrate_with_fixture_key(&c, &[], &fixture_db(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("policy \"db-readers\" (another grant)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_a_root_key_is_refused() {
    // Keepers up, no Nexus ever started on the store: a new deployment.
    let c = Cluster::new(3);
    let (code, out, err) = migrate_with_fixture_key(&c, &[], &fixture_db(), &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("new deployment; start a Nexus on it first"),
        "{err}"
    );
    assert!(dump(&c, &[]).await.is_empty());
}

/// A test-only encoder of SPIKE's SQLite store (tests/fixtures/spike-main/README.md).
struct SpikeWriter {
    db: Connection,
    key: spike::crypto::AeadKey,
}

struct SpikeVersion {
    values: Value,
    created: &'static str,
    deleted: Option<&'static str>,
}

impl SpikeWriter {
    fn new(path: &Path, root: &RootKey) -> SpikeWriter {
        let db = Connection::open(path).unwrap();
        db.execute_batch(
            "CREATE TABLE policies (name TEXT PRIMARY KEY, nonce BLOB NOT NULL,
                encrypted_spiffe_id_pattern BLOB NOT NULL, encrypted_path_pattern BLOB NOT NULL,
                encrypted_permissions BLOB NOT NULL, created_time INTEGER NOT NULL,
                updated_time INTEGER NOT NULL);
             CREATE TABLE secrets (path TEXT NOT NULL, version INTEGER NOT NULL,
                nonce BLOB NOT NULL, encrypted_data BLOB NOT NULL,
                created_time DATETIME NOT NULL, deleted_time DATETIME,
                PRIMARY KEY (path, version));
             CREATE TABLE secret_metadata (path TEXT PRIMARY KEY, nonce BLOB NOT NULL,
                encrypted_current_version BLOB NOT NULL, encrypted_oldest_version BLOB NOT NULL,
                encrypted_created_time BLOB NOT NULL, encrypted_updated_time BLOB NOT NULL,
                encrypted_max_versions BLOB NOT NULL);
             CREATE INDEX idx_secrets_path ON secrets(path);
             CREATE INDEX idx_secrets_created_time ON secrets(created_time);",
        )
        .unwrap();
        SpikeWriter {
            db,
            key: root.spike_store_key(),
        }
    }

    fn seal(&self, nonce: [u8; 12], plain: &[u8]) -> Vec<u8> {
        self.key.seal_with_nonce(nonce, &[], plain).unwrap()
    }

    fn secret(&self, path: &str, current: u64, versions: &[SpikeVersion]) {
        for (i, v) in versions.iter().enumerate() {
            let nonce = spike::crypto::AeadKey::random_nonce().unwrap();
            self.db
                .execute(
                    "INSERT INTO secrets VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    rusqlite::params![
                        path,
                        i as i64 + 1,
                        nonce.to_vec(),
                        self.seal(nonce, &serde_json::to_vec(&v.values).unwrap()),
                        v.created,
                        v.deleted
                    ],
                )
                .unwrap();
        }
        let nonce = spike::crypto::AeadKey::random_nonce().unwrap();
        let field = |salt: &[u8; 12], n: i64| {
            let mut x = nonce;
            x.iter_mut().zip(salt).for_each(|(a, b)| *a ^= b);
            self.seal(x, n.to_string().as_bytes())
        };
        self.db
            .execute(
                "INSERT INTO secret_metadata VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                rusqlite::params![
                    path,
                    nonce.to_vec(),
                    field(b"current_ver_", current as i64),
                    field(b"oldest_ver__", 1),
                    field(b"created_tim_", 1_795_000_000),
                    field(b"updated_tim_", 1_795_000_100),
                    field(b"max_versions", 10),
                ],
            )
            .unwrap();
    }

    fn policy(&self, name: &str, id: &str, path: &str, perms: &str) {
        let nonce = spike::crypto::AeadKey::random_nonce().unwrap();
        self.db
            .execute(
                "INSERT INTO policies VALUES (?1, ?2, ?3, ?4, ?5, 1795000000, 1795000000)",
                rusqlite::params![
                    name,
                    nonce.to_vec(),
                    self.seal(nonce, id.as_bytes()),
                    self.seal(nonce, path.as_bytes()),
                    self.seal(nonce, perms.as_bytes())
                ],
            )
            .unwrap();
    }
}

fn version(values: Value, created: &'static str, deleted: Option<&'static str>) -> SpikeVersion {
    SpikeVersion {
        values,
        created,
        deleted,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_cases_in_spikes_format_with_the_key_from_spike_keepers() {
    let (c, su) = ready_cluster(&[]).await;
    let dir = c.dir.path().to_path_buf();
    let root = RootKey::generate().unwrap();

    // The source deployment's Keepers (threshold 2 of 3; two of them up), filled as a SPIKE
    // Nexus fills them.
    let shards = split(&root, 2, 3).unwrap();
    let mut source_keepers = Vec::new();
    for i in [1usize, 3] {
        let svid = c
            .pki
            .issue(&format!("spike-keeper-{i}"), &format!("/spike/keeper/{i}"));
        let k = Proc::start(
            &format!("spike-keeper-{i}"),
            &dir,
            &["keeper"],
            server_env(&svid, &[("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0")]),
        );
        let s = &shards[i - 1];
        let reply = c
            .as_nexus_to_keepers()
            .post_json(
                &k.url(),
                CONTRIBUTE_PATH,
                serde_json::to_vec(&json!({"shard": s.value(), "id": s.index})).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        source_keepers.push(k);
    }
    let keepers = source_keepers
        .iter()
        .map(|k| k.base_url())
        .collect::<Vec<_>>()
        .join(",");

    let db = dir.join("edge.db");
    {
        let w = SpikeWriter::new(&db, &root);
        w.secret(
            "gone/all",
            0,
            &[
                version(
                    json!({"a": "1"}),
                    "2026-01-01 10:00:00+00:00",
                    Some("2026-01-02 10:00:00+00:00"),
                ),
                version(
                    json!({"a": "2"}),
                    "2026-01-01 11:00:00.5+02:00",
                    Some("2026-01-03 10:00:00+00:00"),
                ),
            ],
        );
        let many: Vec<SpikeVersion> = (1..=13)
            .map(|i| {
                version(
                    json!({ "n": i.to_string() }),
                    "2026-02-01 00:00:00.000000001+00:00",
                    None,
                )
            })
            .collect();
        w.secret("many/versions", 13, &many);
        w.secret(
            "unicode/values",
            1,
            &[version(
                json!({"greeting": "こんにちは 🌍 «ünïcødé» \u{0000}nul", "key with space": "\t"}),
                "2026-03-01 00:00:00+00:00",
                None,
            )],
        );
        // No policy at all.
    }

    let (code, out, err) = migrate(&c, &[], &[db.to_str().unwrap(), "--keepers", &keepers]);
    assert_eq!(code, 0, "{out}{err}\n{}", c.dump_logs());
    assert!(
        out.contains("3 secret(s) with 16 version(s) and 0 policy(ies) written"),
        "{out}"
    );

    // Every version deleted: no current value, each version kept with its deleted marker and
    // the times as SPIKE wrote them (a +02:00 offset included).
    let (code, _, _) = cli(&c, &su, &["secret", "get", "gone/all"]);
    assert_eq!(code, 1);
    let (code, meta, err) = cli(&c, &su, &["secret", "metadata", "gone/all"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(meta["metadata"]["currentVersion"], 0);
    assert_eq!(
        rfc3339_nanos(&meta["versions"]["2"]["createdTime"]),
        parse_go_time("2026-01-01 09:00:00.5Z").unwrap()
    );
    assert!(meta["versions"]["1"]["deletedTime"].is_string());
    // Undelete works on a migrated record like on any other.
    let (code, _, err) = cli(
        &c,
        &su,
        &["secret", "undelete", "gone/all", "--versions", "1"],
    );
    assert_eq!(code, 0, "{err}");
    let (_, got, _) = cli(&c, &su, &["secret", "get", "gone/all"]);
    assert_eq!(got["data"], json!({"a": "1"}));

    // More versions than the target keeps (10): all 13 migrated, as SPIKE served them; the
    // next put prunes as any put does.
    for n in [1, 13] {
        let (code, got, err) = cli(
            &c,
            &su,
            &[
                "secret",
                "get",
                "many/versions",
                "--version",
                &n.to_string(),
            ],
        );
        assert_eq!(
            (code, &got["data"]["n"]),
            (0, &json!(n.to_string())),
            "{err}"
        );
    }
    let (code, _, err) = cli(&c, &su, &["secret", "put", "many/versions", "n=14"]);
    assert_eq!(code, 0, "{err}");
    let (_, meta, _) = cli(&c, &su, &["secret", "metadata", "many/versions"]);
    assert_eq!(meta["versions"].as_object().unwrap().len(), 10);
    assert_eq!(meta["metadata"]["currentVersion"], 14);

    let (_, got, _) = cli(&c, &su, &["secret", "get", "unicode/values"]);
    assert_eq!(
        got["data"]["greeting"],
        "こんにちは 🌍 «ünïcødé» \u{0000}nul"
    );
    let (_, got, _) = cli(&c, &su, &["policy", "list"]);
    assert_eq!(got["policies"], json!([]));

    // The Keepers of the source are down: a clear failure, nothing written.
    let before = dump(&c, &[]).await;
    for k in &mut source_keepers {
        k.kill();
    }
    let (code, _, err) = migrate(&c, &[], &[db.to_str().unwrap(), "--keepers", &keepers]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no shard from the 2 SPIKE Keeper(s)"), "{err}");
    assert!(dump(&c, &[]).await == before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_our_rules_refuse_stop_the_migration_before_anything_is_written() {
    let (c, _su) = ready_cluster(&[]).await;
    let dir = c.dir.path().to_path_buf();
    let root = RootKey::generate().unwrap();
    let recover = dir.join("recover");
    std::fs::create_dir_all(&recover).unwrap();
    for s in split(&root, 2, 3).unwrap().iter().take(2) {
        std::fs::write(
            recover.join(format!("spike.recovery.{}.txt", s.index)),
            encode_recovery_shard(s).as_bytes(),
        )
        .unwrap();
    }
    let db = dir.join("invalid.db");
    {
        let w = SpikeWriter::new(&db, &root);
        let v = || {
            [version(
                json!({"k": "v"}),
                "2026-01-01 00:00:00+00:00",
                None,
            )]
        };
        w.secret("fine/one", 1, &v());
        w.secret("café/menu", 1, &v());
        w.secret("/leading/slash", 1, &v());
        w.policy("ok", "^spiffe://spike\\.ist/x$", "^fine/.*$", "read");
        w.policy(
            "no-permissions",
            "^spiffe://spike\\.ist/x$",
            "^fine/.*$",
            "",
        );
    }
    let before = dump(&c, &[]).await;
    let (code, out, err) = migrate(
        &c,
        &[],
        &[
            db.to_str().unwrap(),
            "--recover-dir",
            recover.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "{out}{err}");
    for named in [
        "\"café/menu\"",
        "\"/leading/slash\"",
        "policy \"no-permissions\"",
    ] {
        assert!(err.contains(named), "{named}: {err}");
    }
    assert!(!err.contains("fine/one"), "{err}");
    assert!(err.contains("refused, nothing written: 3 item(s)"), "{err}");
    assert!(dump(&c, &[]).await == before);
}
