#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The SPIKE main fixture (tests/fixtures/spike-main/): a Nexus SQLite store written by SPIKE's
//! own Nexus and the recovery files its own Pilot wrote. This test decrypts every row the way
//! the fixture's README describes SPIKE's format (root key as the AES-256-GCM key, 12-byte
//! nonces, tag appended, no associated data, metadata nonces XORed with per-field salts, one
//! nonce for a policy's three fields) and checks the result against expected.json, so the
//! README is a tested spec for `spike migrate from-spike`.

use std::collections::BTreeMap;
use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};
use spike::crypto::{RootKey, combine, decode_recovery_shard};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/spike-main");

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(Path::new(DIR).join("expected.json")).unwrap())
        .unwrap()
}

/// The root key, from SPIKE's recovery files 1 and 3 (any two will do).
fn root_key() -> RootKey {
    let shards: Vec<_> = [1, 3]
        .iter()
        .map(|i| {
            let path = Path::new(DIR).join(format!("recover/spike.recovery.{i}.txt"));
            decode_recovery_shard(&std::fs::read_to_string(path).unwrap()).unwrap()
        })
        .collect();
    combine(&shards).unwrap()
}

fn open(key: &LessSafeKey, nonce: &[u8], sealed: &[u8]) -> Vec<u8> {
    let nonce = Nonce::try_assume_unique_for_key(nonce).unwrap();
    let mut buf = sealed.to_vec();
    let plain = key.open_in_place(nonce, Aad::empty(), &mut buf).unwrap();
    plain.to_vec()
}

fn xor12(a: &[u8], b: &[u8; 12]) -> Vec<u8> {
    assert_eq!(a.len(), 12);
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

fn decimal(bytes: Vec<u8>) -> i64 {
    String::from_utf8(bytes).unwrap().parse().unwrap()
}

#[test]
fn spike_main_store_decrypts_as_documented() {
    let want = expected();
    let root = root_key();
    let hex: String = root.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(want["root_key"], hex.as_str());
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, root.as_bytes()).unwrap());

    let db = Connection::open_with_flags(
        Path::new(DIR).join("spike.db"),
        OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();

    let mut secrets = BTreeMap::new();
    let mut meta = db
        .prepare(
            "SELECT path, nonce, encrypted_current_version, encrypted_oldest_version,
                    encrypted_created_time, encrypted_updated_time, encrypted_max_versions
             FROM secret_metadata ORDER BY path",
        )
        .unwrap();
    let rows = meta
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                [
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                    r.get::<_, Vec<u8>>(6)?,
                ],
            ))
        })
        .unwrap();
    for row in rows {
        let (path, nonce, [current, oldest, created, updated, max]) = row.unwrap();
        let field =
            |salt: &[u8; 12], sealed: &[u8]| decimal(open(&key, &xor12(&nonce, salt), sealed));
        let metadata = json!({
            "current_version": field(b"current_ver_", &current),
            "oldest_version": field(b"oldest_ver__", &oldest),
            "max_versions": field(b"max_versions", &max),
            "created_time": field(b"created_tim_", &created),
            "updated_time": field(b"updated_tim_", &updated),
        });
        let mut versions = Vec::new();
        let mut stmt = db
            .prepare(
                "SELECT version, nonce, encrypted_data, created_time, deleted_time
                 FROM secrets WHERE path = ?1 ORDER BY version",
            )
            .unwrap();
        let vrows = stmt
            .query_map([&path], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .unwrap();
        for v in vrows {
            let (version, nonce, sealed, created, deleted) = v.unwrap();
            assert_eq!(nonce.len(), 12);
            let data: Value = serde_json::from_slice(&open(&key, &nonce, &sealed)).unwrap();
            assert!(data.as_object().unwrap().values().all(Value::is_string));
            versions.push(json!({
                "version": version, "data": data,
                "created_time": created, "deleted_time": deleted,
            }));
        }
        secrets.insert(path, (metadata, versions));
    }

    let want_secrets = want["secrets"].as_object().unwrap();
    assert_eq!(
        secrets.keys().collect::<Vec<_>>(),
        want_secrets.keys().collect::<Vec<_>>()
    );
    for (path, (metadata, versions)) in &secrets {
        let w = &want_secrets[path];
        assert_eq!(metadata, &w["metadata"], "{path}");
        let wv = w["versions"].as_array().unwrap();
        assert_eq!(versions.len(), wv.len(), "{path}");
        for (got, exp) in versions.iter().zip(wv) {
            for f in ["version", "data", "created_time", "deleted_time"] {
                assert_eq!(got[f], exp[f], "{path} {f}");
            }
        }
    }
    // The cases the README points at.
    assert_eq!(secrets["app/rotating"].1.len(), 6);
    assert_eq!(secrets["app/rotating"].0["oldest_version"], 3);
    assert_eq!(secrets["app/retired/legacy"].0["current_version"], 0);
    assert!(!secrets["app/db/credentials"].1[1]["deleted_time"].is_null());
    assert_eq!(
        secrets["shared/config.v1"].1[0]["data"]["motd"],
        "héllo wörld ✓ \"quoted\"\nsecond line"
    );

    let mut policies = BTreeMap::new();
    let mut stmt = db
        .prepare(
            "SELECT name, nonce, encrypted_spiffe_id_pattern, encrypted_path_pattern,
                    encrypted_permissions, created_time, updated_time
             FROM policies ORDER BY name",
        )
        .unwrap();
    let prow = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })
        .unwrap();
    for p in prow {
        let (name, nonce, id, path, perms, created, updated) = p.unwrap();
        let text = |sealed: &[u8]| String::from_utf8(open(&key, &nonce, sealed)).unwrap();
        policies.insert(
            name,
            json!({
                "spiffe_id_pattern": text(&id),
                "path_pattern": text(&path),
                "permissions": text(&perms).split(',').collect::<Vec<_>>(),
                "created_time": created,
                "updated_time": updated,
            }),
        );
    }
    let want_policies: BTreeMap<String, Value> = want["policies"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(policies, want_policies);
    assert!(!policies.contains_key("temp"));
}
