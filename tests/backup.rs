#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! `spike backup create | verify | restore` against real clusters: the restore drill on
//! PostgreSQL under write load, SQLite to PostgreSQL, S3, bad input (every way of editing a
//! backup without the root key, another deployment's backup, the old unauthenticated format, no
//! Keeper access), and a Nexus on a store holding an unfinished restore.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hyper::{StatusCode, Uri};
use serde_json::json;
use spike::store::{Expect, Namespace, Store};
use spike::transport::HttpsClient;

/// `spike backup ARGS` with only the store settings `env` (and PATH): (code, stdout, stderr).
fn backup(args: &[&str], env: &[(String, String)]) -> (i32, String, String) {
    let mut all = vec!["backup"];
    all.extend_from_slice(args);
    run_spike(&all, &pairs(env))
}

async fn backup_async(args: Vec<String>, env: Vec<(String, String)>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        backup(&args, &env)
    })
    .await
    .unwrap()
}

/// The environment of one of `c`'s Nexus instances on the store `store` (the SQLite directory
/// of `c` when empty), as `spike backup` runs beside them: the store settings, the Nexus SVID
/// and the Keeper peers.
fn keeper_env(c: &Cluster, store: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = c.nexus_env(&pairs(store));
    env.remove("SPIKE_NEXUS_TLS_PORT");
    env.into_iter().collect()
}

fn sqlite_env(dir: &Path) -> Vec<(String, String)> {
    vec![
        ("SPIKE_NEXUS_BACKEND_STORE".into(), "sqlite".into()),
        ("SPIKE_NEXUS_DATA_DIR".into(), dir.display().to_string()),
    ]
}

/// Restores the root key into the Nexus at `url` from `threshold` recovery files (restore role).
fn restore_shards(c: &Cluster, url: &Uri, dir: &Path, threshold: usize) {
    let svid = c.pki.issue("restore-op", "/spike/pilot/role/restore");
    let url = url.to_string();
    for i in 1..=threshold {
        let file = dir.join(format!("spike.recovery.{i}.txt"));
        let (code, _, err) = run_spike(
            &[
                "recover",
                "restore",
                "--nexus",
                &url,
                file.to_str().unwrap(),
            ],
            &client_env(&url, &svid),
        );
        assert_eq!(code, 0, "shard {i}: {err}");
    }
}

async fn put(su: &HttpsClient, url: &Uri, path: &str, value: &str) -> StatusCode {
    call(
        su,
        url,
        SECRETS_PATH,
        json!({"path": path, "values": {"v": value}}),
    )
    .await
    .0
}

async fn get(su: &HttpsClient, url: &Uri, path: &str) -> Option<String> {
    let (s, b) = call(su, url, &action(SECRETS_PATH, "get"), json!({"path": path})).await;
    (s == StatusCode::OK).then(|| b["data"]["v"].as_str().unwrap_or_default().to_string())
}

async fn drop_database(url: &str) {
    let name = url
        .split('?')
        .next()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let admin = postgres::with_database(url, "postgres");
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
}

/// The drill of issue 17: writers acknowledge writes while a backup is taken; the store and
/// every Keeper are lost; the backup goes into a new PostgreSQL database and the recovery
/// shards into a new Nexus; every write acknowledged before the backup began reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_restore_drill_on_postgres_under_write_load() {
    let db = postgres::fresh_database().await;
    let pg = postgres::nexus_env(&db);
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&pairs(&pg));
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    let key_id = wait_status(&anon, &url, "ready").await["key_id"].clone();
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let shards = c.dir.path().join("recovery");
    c.export_recovery_shards(&url.to_string(), &shards);

    // Four writers, each acknowledging its own paths; every ack is timed.
    let acked: Arc<Mutex<Vec<(String, String, Instant)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (su, url, acked, stop) = (su.clone(), url.clone(), acked.clone(), stop.clone());
        writers.spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (path, value) = (format!("load/w{w}/{i}"), format!("value-{w}-{i}"));
                if put(&su, &url, &path, &value).await == StatusCode::OK {
                    acked.lock().unwrap().push((path, value, Instant::now()));
                }
                i += 1;
            }
        });
    }
    wait_for("writes before the backup", Duration::from_secs(30), || {
        let n = acked.lock().unwrap().len();
        std::future::ready((n >= 40).then_some(()))
    })
    .await;
    let file = c.dir.path().join("drill.jsonl");
    let began = Instant::now();
    let (code, out, err) = backup_async(
        vec!["create".into(), "--out".into(), file.display().to_string()],
        keeper_env(&c, &pg),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), file.display().to_string());
    // Writes go on a little after the backup, then stop.
    let after = acked.lock().unwrap().len();
    wait_for("writes after the backup", Duration::from_secs(30), || {
        let n = acked.lock().unwrap().len();
        std::future::ready((n >= after + 10).then_some(()))
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    join_all(writers).await;
    let acked = acked.lock().unwrap().clone();
    let before: Vec<&(String, String, Instant)> =
        acked.iter().filter(|(_, _, at)| *at < began).collect();
    println!(
        "backup began with {} of {} acknowledged writes done; it took {:?}",
        before.len(),
        acked.len(),
        began.elapsed()
    );
    let mode = std::fs::metadata(&file).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains(r#""consistency":"store""#),
        "{}",
        &text[..200]
    );
    for (_, value, _) in &acked {
        assert!(
            !text.contains(value.as_str()),
            "a plaintext value in the backup"
        );
    }

    // Disaster: Nexus, every Keeper and the database are gone.
    c.nexus[n].kill();
    for k in c.keepers.iter_mut() {
        k.kill();
    }
    drop_database(&db).await;

    let (code, out, err) = backup(
        &[
            "verify",
            file.to_str().unwrap(),
            "--recover-dir",
            shards.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("its MAC verifies") && out.contains("opens its verifier"),
        "{out}"
    );

    // The Keepers are gone: the backup's root key comes from the recovery shards.
    let new_db = postgres::fresh_database().await;
    let new_pg = postgres::nexus_env(&new_db);
    let (code, _, err) = backup(&["restore", file.to_str().unwrap()], &new_pg);
    assert_eq!(code, 2, "no key, no restore: {err}");
    assert!(err.contains("--recover-dir"), "{err}");
    let (code, _, err) = backup(
        &[
            "restore",
            file.to_str().unwrap(),
            "--recover-dir",
            shards.to_str().unwrap(),
        ],
        &new_pg,
    );
    assert_eq!(code, 0, "{err}");
    for k in c.keepers.iter_mut() {
        k.restart(); // new, empty Keepers
    }
    let m = c.start_nexus(&pairs(&new_pg));
    let url = c.nexus[m].url();
    wait_status(&anon, &url, "awaiting_restore").await;
    restore_shards(&c, &url, &shards, 2);
    let ready = wait_status(&anon, &url, "ready").await;
    assert_eq!(ready["key_id"], key_id);
    for (path, value, _) in &before {
        assert_eq!(
            get(&su, &url, path).await.as_deref(),
            Some(value.as_str()),
            "{path} was acknowledged before the backup began"
        );
    }
    let mut later = 0;
    for (path, _, at) in &acked {
        if *at >= began && get(&su, &url, path).await.is_some() {
            later += 1;
        }
    }
    println!(
        "{} acknowledged before the backup all read back; {later} of {} acknowledged after it began are in it too",
        before.len(),
        acked.len() - before.len()
    );
    // The restored deployment takes writes.
    assert_eq!(put(&su, &url, "after/restore", "x").await, StatusCode::OK);
}

/// A backup of a SQLite deployment restores into PostgreSQL: secrets and policies, same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_postgres_through_a_backup() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    let key_id = wait_status(&anon, &url, "ready").await["key_id"].clone();
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    for i in 0..20 {
        assert_eq!(
            put(&su, &url, &format!("apps/s{i}"), &format!("v{i}")).await,
            StatusCode::OK
        );
    }
    let policy = json!({"name": "web-read", "spiffeidPattern": "^spiffe://spike.ist/app/web$", "pathPattern": "^apps/", "permissions": ["read"]});
    assert_eq!(call(&su, &url, POLICY_PATH, policy).await.0, StatusCode::OK);
    let file = c.dir.path().join("sqlite.jsonl");
    let sqlite = keeper_env(&c, &[]);
    let (code, _, err) = backup(&["create", "--out", file.to_str().unwrap()], &sqlite);
    assert_eq!(code, 0, "{err}");
    // Never overwritten unless told.
    let (code, _, err) = backup(&["create", "--out", file.to_str().unwrap()], &sqlite);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refusing to overwrite"), "{err}");
    c.nexus[n].kill();

    // The Keepers still hold the key: the restore gets it from them, as a Nexus would.
    let db = postgres::fresh_database().await;
    let pg = postgres::nexus_env(&db);
    let (code, _, err) = backup(&["restore", file.to_str().unwrap()], &keeper_env(&c, &pg));
    assert_eq!(code, 0, "{err}");
    // Same Keepers: the key comes back from them.
    let m = c.start_nexus(&pairs(&pg));
    let url = c.nexus[m].url();
    assert_eq!(wait_status(&anon, &url, "ready").await["key_id"], key_id);
    for i in 0..20 {
        assert_eq!(
            get(&su, &url, &format!("apps/s{i}")).await,
            Some(format!("v{i}"))
        );
    }
    let web = c.api_client("web", "/app/web");
    assert_eq!(get(&web, &url, "apps/s3").await.as_deref(), Some("v3"));
}

/// S3 backs up per record (the header says so), verifies with the shards, and restores into
/// another bucket prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backup_and_verify() {
    let s3 = common::s3::shared_env("backup");
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&pairs(&s3));
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    for i in 0..5 {
        assert_eq!(
            put(&su, &url, &format!("s3/s{i}"), "v").await,
            StatusCode::OK
        );
    }
    let shards = c.dir.path().join("recovery");
    c.export_recovery_shards(&url.to_string(), &shards);
    let dir = c.dir.path().join("backups");
    let mut files = Vec::new();
    for _ in 0..2 {
        let (code, out, err) = backup(
            &["create", "--dir", dir.to_str().unwrap(), "--keep", "1"],
            &keeper_env(&c, &s3),
        );
        assert_eq!(code, 0, "{err}");
        files.push(PathBuf::from(out.trim()));
    }
    // --keep 1 left the newest only.
    assert!(!files[0].exists() && files[1].exists(), "{files:?}");
    let text = std::fs::read_to_string(&files[1]).unwrap();
    assert!(text.contains(r#""backend":"s3""#), "{}", &text[..200]);
    assert!(text.contains(r#""consistency":"record""#));
    let (code, out, err) = backup(
        &[
            "verify",
            files[1].to_str().unwrap(),
            "--recover-dir",
            shards.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("5 secret(s)"), "{out}");

    // Into another bucket prefix: a backup of it holds the same records.
    let target = common::s3::shared_env("backup-target");
    let (code, _, err) = backup(
        &[
            "restore",
            files[1].to_str().unwrap(),
            "--recover-dir",
            shards.to_str().unwrap(),
        ],
        &target,
    );
    assert_eq!(code, 0, "{err}");
    let copy = c.dir.path().join("copy.jsonl");
    let (code, _, err) = backup(
        &["create", "--out", copy.to_str().unwrap()],
        &keeper_env(&c, &target),
    );
    assert_eq!(code, 0, "{err}");
    let records = |f: &Path| {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        // Not the header (its time) nor the trailer (its hash covers the header).
        lines[1..lines.len() - 1].to_vec()
    };
    assert_eq!(records(&copy), records(&files[1]));
}

async fn sqlite_records(dir: &Path) -> Vec<(Namespace, String, Vec<u8>)> {
    spike::store::sqlite::SqliteStore::open(dir)
        .await
        .unwrap()
        .snapshot()
        .await
        .unwrap()
        .records
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What an editor without the root key can make of a backup: `header` with its counts made to
/// match `records`, the record lines, and `trailer` with the SHA-256 and count recomputed and
/// everything else (the MAC, the key id) kept. Every structural check passes; only the MAC
/// can tell.
fn forge(header: &str, records: &[&str], trailer: &str) -> Vec<u8> {
    let mut h: serde_json::Value = serde_json::from_str(header).unwrap();
    let count = |ns: &str| {
        records
            .iter()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["ns"] == ns)
            .count()
    };
    h["records"] = records.len().into();
    h["secrets"] = count("secrets").into();
    h["policies"] = count("policies").into();
    h["system"] = count("system").into();
    let body = format!("{h}\n{}\n", records.join("\n"));
    let mut t: serde_json::Value = serde_json::from_str(trailer).unwrap();
    t["sha256"] = sha256_hex(body.as_bytes()).into();
    t["records"] = records.len().into();
    format!("{body}{t}\n").into_bytes()
}

/// (header, records, trailer) lines of a backup file.
fn parts(text: &str) -> (&str, Vec<&str>, &str) {
    let lines: Vec<&str> = text.lines().collect();
    (
        lines[0],
        lines[1..lines.len() - 1].to_vec(),
        lines[lines.len() - 1],
    )
}

fn spike_backups_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// Bad backups and bad targets: clear errors, nothing written. Every way of editing a backup
/// without the root key is refused by verify and by restore, with the key from recovery shards
/// or from the Keepers; another deployment's backup is named by its key id; the old format
/// without a MAC is refused unless accepted by a flag; a backup cannot be made without the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_backups_and_targets_are_refused_and_nothing_is_written() {
    let mut a = Cluster::new(3);
    let n = a.start_nexus(&[]);
    let url = a.nexus[n].url();
    let a_key = wait_status(&a.anonymous(), &url, "ready").await["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let su = a.api_client("su", "/spike/pilot/role/superuser");
    for i in 0..5 {
        assert_eq!(
            put(&su, &url, &format!("x/s{i}"), "v").await,
            StatusCode::OK
        );
    }
    let shards_a = a.dir.path().join("recovery");
    a.export_recovery_shards(&url.to_string(), &shards_a);
    let good = a.dir.path().join("good.jsonl");
    let (code, _, err) = backup(
        &["create", "--out", good.to_str().unwrap()],
        &keeper_env(&a, &[]),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("authenticated under root key {a_key}")),
        "{err}"
    );
    let bytes = std::fs::read(&good).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (header, records, trailer) = parts(&text);
    let t: serde_json::Value = serde_json::from_str(trailer).unwrap();
    assert_eq!(t["key_id"], a_key.as_str(), "{trailer}");
    assert_eq!(t["mac"].as_str().unwrap().len(), 64, "{trailer}");
    // A later backup of the same deployment, for splicing and replaying.
    for i in 5..8 {
        assert_eq!(
            put(&su, &url, &format!("x/s{i}"), "w").await,
            StatusCode::OK
        );
    }
    let newer = a.dir.path().join("newer.jsonl");
    let (code, _, err) = backup(
        &["create", "--out", newer.to_str().unwrap()],
        &keeper_env(&a, &[]),
    );
    assert_eq!(code, 0, "{err}");
    let newer_text = std::fs::read_to_string(&newer).unwrap();
    let (newer_header, newer_records, newer_trailer) = parts(&newer_text);
    assert!(newer_records.len() > records.len() + 1);

    // Another deployment.
    let mut b = Cluster::new(2);
    let m = b.start_nexus(&[]);
    let url_b = b.nexus[m].url();
    let b_key = wait_status(&b.anonymous(), &url_b, "ready").await["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let shards_b = b.dir.path().join("recovery");
    b.export_recovery_shards(&url_b.to_string(), &shards_b);

    let bad = a.dir.path().join("bad.jsonl");
    let empty = a.dir.path().join("empty-target");
    let recover_a = ["--recover-dir", shards_a.to_str().unwrap()];
    // Refused by verify and restore, with the key from recovery shards and from the Keepers,
    // the target store left empty.
    let refused = |what: &str, content: &[u8], expected: &str| {
        std::fs::write(&bad, content).unwrap();
        let file = bad.to_str().unwrap();
        for (how, env) in [
            ("shards", Vec::new()),
            ("keepers", keeper_env(&a, &sqlite_env(&empty))),
        ] {
            let key: &[&str] = if how == "shards" { &recover_a } else { &[] };
            let (code, _, err) = backup(&[&["verify", file], key].concat(), &env);
            assert_eq!(code, 1, "{what}, verify with {how}: {err}");
            assert!(err.contains(expected), "{what}, verify with {how}: {err}");
            let mut env = env;
            env.extend(sqlite_env(&empty));
            let (code, _, err) = backup(&[&["restore", file], key].concat(), &env);
            assert_eq!(code, 1, "{what}, restore with {how}: {err}");
            assert!(err.contains(expected), "{what}, restore with {how}: {err}");
        }
    };
    let mac = "MAC does not verify";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // Damage, or edits that did not bother with the trailer.
        ("truncated", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        (
            "cut at a line",
            (lines[..lines.len() - 1].join("\n") + "\n").into_bytes(),
            "truncated",
        ),
        (
            "one byte edited",
            {
                let mut e = bytes.clone();
                let at = text.find(r#""value":""#).unwrap() + 12;
                e[at] = if e[at] == b'A' { b'B' } else { b'A' };
                e
            },
            "SHA-256",
        ),
        (
            "a record removed",
            ([&lines[..2], &lines[3..]].concat().join("\n") + "\n").into_bytes(),
            "removed or added",
        ),
        // Edits with every structural check made to pass: the MAC refuses them.
        (
            "a record dropped",
            forge(header, &[&records[..1], &records[2..]].concat(), trailer),
            mac,
        ),
        // Cut after a whole record: the system records (verifier last) are the ones lost.
        (
            "truncated at a record",
            forge(header, &records[..records.len() - 2], trailer),
            "no root-key verifier",
        ),
        (
            "the last secret cut off",
            {
                let secrets = records
                    .iter()
                    .filter(|l| l.contains(r#""ns":"secrets""#))
                    .count();
                forge(
                    header,
                    &[&records[..secrets - 1], &records[secrets..]].concat(),
                    trailer,
                )
            },
            mac,
        ),
        (
            "a record's value changed",
            {
                let mut rec: serde_json::Value = serde_json::from_str(records[0]).unwrap();
                assert_eq!(rec["ns"], "secrets");
                let mut value = base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    rec["value"].as_str().unwrap(),
                )
                .unwrap();
                let s = String::from_utf8(value.clone()).unwrap();
                let at = s.find(r#""max_versions":"#).unwrap() + 15;
                value[at] = if value[at] == b'9' { b'8' } else { b'9' };
                rec["value"] =
                    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &value)
                        .into();
                let rec = rec.to_string();
                forge(header, &[&[rec.as_str()], &records[1..]].concat(), trailer)
            },
            mac,
        ),
        (
            "the header changed",
            forge(
                &header.replace(r#""backend":"sqlite""#, r#""backend":"postgres""#),
                &records,
                trailer,
            ),
            mac,
        ),
        (
            "two records swapped",
            forge(
                header,
                &[&[records[1], records[0]], &records[2..]].concat(),
                trailer,
            ),
            "out of order",
        ),
        (
            "a record duplicated",
            forge(header, &[&records[..1], &records[..]].concat(), trailer),
            "repeated",
        ),
        (
            "two backups spliced",
            forge(
                header,
                &[&records[..2], &newer_records[2..]].concat(),
                newer_trailer,
            ),
            mac,
        ),
        (
            "an older backup's trailer on a newer body",
            forge(newer_header, &newer_records, trailer),
            mac,
        ),
    ];
    for (what, content, expected) in &cases {
        refused(what, content, expected);
        assert!(sqlite_records(&empty).await.is_empty(), "{what}: written");
    }
    // The structure alone cannot tell a forgery, and says so.
    let dropped = &cases.iter().find(|c| c.0 == "a record dropped").unwrap().1;
    std::fs::write(&bad, dropped).unwrap();
    let (code, out, err) = backup(&["verify", bad.to_str().unwrap(), "--structure-only"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Authenticity was NOT checked") && out.contains("proves nothing"),
        "{out}"
    );
    // A full verify needs a key: none given, none reachable.
    let (code, _, err) = backup(&["verify", good.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--recover-dir") && err.contains("--structure-only"),
        "{err}"
    );

    // Another deployment's shards, or its Keepers: the key ids are named.
    let (code, _, err) = backup(
        &[
            "verify",
            good.to_str().unwrap(),
            "--recover-dir",
            shards_b.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("this backup was made under root key {a_key}"))
            && err.contains(&b_key),
        "{err}"
    );
    let (code, _, err) = backup(
        &[
            "restore",
            good.to_str().unwrap(),
            "--recover-dir",
            shards_b.to_str().unwrap(),
        ],
        &sqlite_env(&empty),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("made under root key {a_key}")),
        "{err}"
    );
    let (code, _, err) = backup(
        &["restore", good.to_str().unwrap()],
        &keeper_env(&b, &sqlite_env(&empty)),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("this backup was made under root key {a_key}"))
            && err.contains("--recover-dir"),
        "{err}"
    );
    assert!(sqlite_records(&empty).await.is_empty());

    // The format before the MAC: refused unless accepted, then with a warning.
    let old = {
        let h = header.replace(r#""version":2"#, r#""version":1"#);
        assert_ne!(h, header);
        let body = format!("{h}\n{}\n", records.join("\n"));
        let t = json!({"end": "spike-backup", "records": records.len(), "sha256": sha256_hex(body.as_bytes())});
        format!("{body}{t}\n")
    };
    let old_file = a.dir.path().join("old.jsonl");
    std::fs::write(&old_file, &old).unwrap();
    let old_path = old_file.to_str().unwrap();
    let (code, _, err) = backup(&[&["verify", old_path], &recover_a[..]].concat(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("unauthenticated") && err.contains("--accept-unauthenticated"),
        "{err}"
    );
    let (code, _, err) = backup(
        &[&["restore", old_path], &recover_a[..]].concat(),
        &sqlite_env(&empty),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--accept-unauthenticated"), "{err}");
    assert!(sqlite_records(&empty).await.is_empty());
    let (code, out, err) = backup(&["verify", old_path, "--structure-only"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no MAC"), "{out}");
    let (code, out, err) = backup(
        &[
            &["verify", old_path, "--accept-unauthenticated"],
            &recover_a[..],
        ]
        .concat(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("NO MAC"), "{out}");
    assert!(
        err.contains("WARN") && err.contains("accepting a backup without a MAC"),
        "{err}"
    );
    let old_target = a.dir.path().join("old-target");
    let (code, _, err) = backup(
        &[
            &["restore", old_path, "--accept-unauthenticated"],
            &recover_a[..],
        ]
        .concat(),
        &sqlite_env(&old_target),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("accepting a backup without a MAC"), "{err}");
    assert!(!sqlite_records(&old_target).await.is_empty());

    // No backup without the key, and no file left behind.
    let out = a.dir.path().join("none.jsonl");
    let out_path = out.to_str().unwrap();
    let (code, _, err) = backup(&["create", "--out", out_path], &sqlite_env(&a.data_dir));
    assert_eq!(code, 2, "no Keeper settings: {err}");
    assert!(err.contains("needs the root key"), "{err}");
    let mut no_identity = keeper_env(&a, &[]);
    no_identity.retain(|(k, _)| k != "SPIKE_SVID_DIR");
    let (code, _, err) = backup(&["create", "--out", out_path], &no_identity);
    assert_eq!(code, 2, "no identity: {err}");
    assert!(err.contains("needs the root key"), "{err}");
    let (code, _, err) = backup(
        &[
            "create",
            "--out",
            out_path,
            "--recover-dir",
            shards_b.to_str().unwrap(),
        ],
        &sqlite_env(&a.data_dir),
    );
    assert_eq!(code, 1, "another deployment's shards: {err}");
    assert!(err.contains("does not open the store's verifier"), "{err}");
    let (code, _, err) = backup(
        &["create", "--out", out_path],
        &keeper_env(&b, &sqlite_env(&a.data_dir)),
    );
    assert_eq!(code, 1, "another deployment's Keepers: {err}");
    assert!(
        err.contains("cannot get the root key from the Keepers"),
        "{err}"
    );
    assert!(!out.exists());

    // A store that is not empty: refused, listing what is there, unchanged.
    b.nexus[m].kill();
    let before = sqlite_records(&b.data_dir).await;
    let (code, _, err) = backup(
        &[&["restore", good.to_str().unwrap()], &recover_a[..]].concat(),
        &sqlite_env(&b.data_dir),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("not empty") && err.contains("root-key-verifier"),
        "{err}"
    );
    assert_eq!(sqlite_records(&b.data_dir).await, before);

    // Every Keeper lost: no new backup (and none left behind in the directory)...
    a.nexus[n].kill();
    for k in a.keepers.iter_mut() {
        k.kill();
    }
    let dir = a.dir.path().join("hourly");
    let (code, _, err) = backup(
        &["create", "--dir", dir.to_str().unwrap(), "--keep", "2"],
        &keeper_env(&a, &[]),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot get the root key from the Keepers"),
        "{err}"
    );
    assert!(
        spike_backups_in(&dir).is_empty(),
        "{:?}",
        spike_backups_in(&dir)
    );
    // ... but the good one still verifies and restores from the recovery shards into the
    // untouched empty target, the same records as the store it was taken from.
    let (code, _, err) = backup(
        &[&["verify", good.to_str().unwrap()], &recover_a[..]].concat(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = backup(
        &[&["restore", good.to_str().unwrap()], &recover_a[..]].concat(),
        &sqlite_env(&empty),
    );
    assert_eq!(code, 0, "{err}");
    let restored = sqlite_records(&empty).await;
    assert_eq!(restored.len(), records.len());
    let source = sqlite_records(&a.data_dir).await;
    for r in &restored {
        assert!(source.contains(r), "{}/{}", r.0.as_str(), r.1);
    }
}

/// A Nexus on a store holding an unfinished restore neither creates a key nor loads one — even
/// with Keepers that hold the backup's key — and says why; running the restore again finishes
/// it and the Nexus serves everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nexus_on_an_unfinished_restore_waits_and_the_rerun_finishes_it() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    let key_id = wait_status(&anon, &url, "ready").await["key_id"].clone();
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    for i in 0..10 {
        assert_eq!(
            put(&su, &url, &format!("r/s{i}"), &format!("v{i}")).await,
            StatusCode::OK
        );
    }
    let file = c.dir.path().join("b.jsonl");
    let (code, _, err) = backup(
        &["create", "--out", file.to_str().unwrap()],
        &keeper_env(&c, &[]),
    );
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    let trailer: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();

    // An interrupted restore: its marker, the verifier and three records.
    let target = c.dir.path().join("target");
    let store = spike::store::sqlite::SqliteStore::open(&target)
        .await
        .unwrap();
    let source = sqlite_records(&c.data_dir).await;
    let marker = json!({"backup_sha256": trailer["sha256"], "key_id": key_id, "started": "now"});
    store
        .put(
            Namespace::System,
            spike::store::RESTORE_MARKER_KEY,
            marker.to_string().into_bytes(),
            Expect::Absent,
        )
        .await
        .unwrap();
    let verifier = source
        .iter()
        .find(|(ns, k, _)| *ns == Namespace::System && k == spike::store::VERIFIER_KEY)
        .unwrap();
    store
        .put(verifier.0, &verifier.1, verifier.2.clone(), Expect::Absent)
        .await
        .unwrap();
    for (ns, k, v) in source.iter().filter(|r| r.0 == Namespace::Secrets).take(3) {
        store.put(*ns, k, v.clone(), Expect::Absent).await.unwrap();
    }

    // The Keepers hold this very key: without the marker it would load it and serve 3 of 10.
    let data = target.display().to_string();
    let m = c.start_nexus(&[("SPIKE_NEXUS_DATA_DIR", &data)]);
    let url_m = c.nexus[m].url();
    let body = wait_status(&anon, &url_m, "restore_incomplete").await;
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("spike backup restore"),
        "{body}"
    );
    wait_for("the reason in the log", Duration::from_secs(10), || {
        std::future::ready(
            c.nexus[m]
                .logs()
                .contains("unfinished backup restore")
                .then_some(()),
        )
    })
    .await;
    assert_ne!(get(&su, &url_m, "r/s0").await.as_deref(), Some("v0"));
    // No backup is taken of a store in the middle of a restore.
    let half = c.dir.path().join("half.jsonl");
    let (code, _, err) = backup(
        &["create", "--out", half.to_str().unwrap()],
        &keeper_env(&c, &sqlite_env(&target)),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unfinished backup restore"), "{err}");
    assert!(!half.exists());

    // The same restore again: resumed, finished, served.
    let (code, _, err) = backup(
        &["restore", file.to_str().unwrap()],
        &keeper_env(&c, &sqlite_env(&target)),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resuming"), "{err}");
    assert_eq!(wait_status(&anon, &url_m, "ready").await["key_id"], key_id);
    for i in 0..10 {
        assert_eq!(
            get(&su, &url_m, &format!("r/s{i}")).await,
            Some(format!("v{i}"))
        );
    }
}
