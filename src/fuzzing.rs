//! Entry points for fuzzing the decoders that face untrusted input. Each takes arbitrary bytes
//! and must return without panicking; where a decoder accepts the input, the invariants it
//! promises are checked (a panic is a finding).
//!
//! `fuzz/` holds cargo-fuzz targets that call these for coverage-guided runs: `./test` runs
//! each under libFuzzer for a bounded time (`scripts/fuzz.sh`, `fuzz/README.md`).
//! `tests/fuzz_smoke.rs` runs each on a bounded, deterministic set of random and mutated inputs
//! in every `cargo test`, and holds the regression inputs.

use crate::crypto::{RootKey, decode_recovery_shard, encode_recovery_shard};
use crate::nexus::{cipher, policy, secrets};
use crate::protocol::nexus as wire;

/// Every JSON request body Nexus and Keeper decode.
pub fn request_json(data: &[u8]) {
    let _ = serde_json::from_slice::<wire::SecretPutRequest>(data);
    let _ = serde_json::from_slice::<wire::SecretGetRequest>(data);
    let _ = serde_json::from_slice::<wire::SecretVersionsRequest>(data);
    let _ = serde_json::from_slice::<wire::SecretListRequest>(data);
    let _ = serde_json::from_slice::<wire::PolicyPutRequest>(data);
    let _ = serde_json::from_slice::<wire::PolicyIdRequest>(data);
    let _ = serde_json::from_slice::<wire::PolicyListRequest>(data);
    let _ = serde_json::from_slice::<wire::EncryptRequest>(data);
    let _ = serde_json::from_slice::<wire::DecryptRequest>(data);
    let _ = serde_json::from_slice::<wire::RestoreRequest>(data);
    let _ = serde_json::from_slice::<crate::protocol::keeper::ContributeRequest>(data);
    let _ = serde_json::from_slice::<crate::protocol::keeper::ShardResponse>(data);
}

/// Secret-path validation: an accepted path has no empty, `.` or `..` segment and is not
/// reserved.
pub fn secret_path(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if secrets::validate_path(path).is_ok() {
        assert!(!path.is_empty() && path.len() <= crate::protocol::secret::MAX_PATH_LEN);
        assert!(
            path.split('/')
                .all(|s| !s.is_empty() && s != "." && s != "..")
        );
        assert!(!path.starts_with(crate::protocol::secret::RESERVED_PREFIX));
    }
}

/// Policy validation and pattern compilation (size-limited regexes).
pub fn policy_pattern(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let id = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let perms = parts.next().unwrap_or_default();
    let req = wire::PolicyPutRequest {
        name: "fuzz".into(),
        spiffeid_pattern: id,
        path_pattern: path,
        permissions: perms.split(',').map(str::to_string).collect(),
    };
    if let Ok(p) = policy::validate(&req) {
        let caller = crate::identity::SpiffeId::parse("spiffe://spike.ist/fuzz/caller")
            .expect("static SPIFFE ID");
        // A pattern matched as plain text matches exactly what its regex matches.
        for pattern in [&p.spiffeid_pattern, &p.path_pattern] {
            let matcher = policy::Pattern::new(pattern);
            let re = crate::protocol::policy::compile(pattern).expect("validated pattern");
            let mut probes = vec![caller.as_str().to_string(), "secrets/fuzz".to_string()];
            if let policy::Pattern::Exact(t)
            | policy::Pattern::Prefix(t)
            | policy::Pattern::Suffix(t)
            | policy::Pattern::Contains(t) = &matcher
            {
                // The text itself, inside longer ones, and with each `.` as another character.
                probes.extend([
                    t.clone(),
                    format!("x{t}"),
                    format!("{t}x"),
                    format!("x{t}x"),
                    t.replace('.', "x"),
                ]);
            }
            // A regex is tried only on strings holding its leading text: that text must not
            // turn away a match.
            if let policy::Pattern::Regex(_, Some(r), _) = &matcher {
                let t = &r.text;
                probes.extend([
                    t.clone(),
                    format!("{t}x"),
                    format!("x{t}x"),
                    format!("{t}/ab"),
                ]);
            }
            for text in probes {
                assert_eq!(
                    matcher.is_match(&text),
                    re.is_match(&text),
                    "{pattern} on {text:?}"
                );
            }
        }
        let rule = policy::Rule::new(p);
        let _ = rule.allows(&caller, "secrets/fuzz", &[policy::Permission::Read]);
    }
}

/// Recovery-shard text: an accepted shard encodes back to the canonical form of its input.
pub fn recovery_shard(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(share) = decode_recovery_shard(&text) {
        let encoded = encode_recovery_shard(&share);
        let again = decode_recovery_shard(&encoded).expect("an encoded shard decodes");
        assert!(again.ct_eq(&share));
    }
}

/// Cipher stream opening under a fixed key: arbitrary bytes never open.
pub fn cipher_open(data: &[u8]) {
    let root = RootKey::from_bytes([7u8; 32]).expect("a valid scalar");
    let ring = crate::nexus::keyring::Keyring::legacy(&root, false);
    if let Ok((version, nonce, ciphertext)) = cipher::unframe(data) {
        assert!(cipher::decrypt(&ring, version, nonce, ciphertext, 1 << 20).is_err());
    }
}

/// The root key of the SPIKE store in `tests/fixtures/spike-main` (its `expected.json`), so
/// that mutations of that store reach the decoding of decrypted rows.
const SPIKE_FIXTURE_KEY: &str = "1e53296219c198a0f730c665b7451eddecd8c6fd2cd07dfb4da8251f6e0ae10a";

/// A SPIKE Nexus SQLite store, as `spike migrate from-spike` reads the file an operator names:
/// opened, checked and decrypted under the fixture's key; the input as text goes to the
/// reader of SPIKE's times too. An accepted store holds at least one version per secret.
pub fn spike_store(data: &[u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    use crate::migrate::spike_db::{SpikeDb, parse_go_time};

    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_go_time(text);
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&SPIKE_FIXTURE_KEY[2 * i..2 * i + 2], 16).expect("static hex");
    }
    let key = RootKey::from_bytes(key).expect("the fixture's key is a valid scalar");
    let path = std::env::temp_dir().join(format!(
        "spike-fuzz-store-{}-{}.db",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::write(&path, data).is_ok()
        && let Ok(db) = SpikeDb::open(&path)
    {
        let _ = db.probe();
        if let Ok(contents) = db.read(&key) {
            assert!(contents.secrets.values().all(|s| !s.versions.is_empty()));
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// A `spike backup` file, as `verify` and `restore` read it: once as given, and once with each
/// kind of correct trailer appended (so the records get past the SHA-256, which random bytes
/// never match): a version 1 trailer (no MAC) and a version 2 trailer with a MAC under a fixed
/// key. An accepted file has records sorted and unique, counted by its header; it
/// authenticates under the key that made its MAC and under no other, never without a MAC; and
/// it encodes back to a file that reads the same.
pub fn backup_file(data: &[u8]) {
    use crate::backup::file::{self, AuthError, Seal, decode};
    let _ = decode(data);
    let mut body = data.to_vec();
    if !body.ends_with(b"\n") {
        body.push(b'\n');
    }
    let lines: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let records = lines.len().saturating_sub(1) as u64;
    // The header's key id, so the trailer can name the same one.
    let key_id = lines
        .first()
        .and_then(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .and_then(|h| h.get("key_id").and_then(|k| k.as_str()).map(str::to_string))
        .unwrap_or_default();
    let mut digest = [0u8; 32];
    digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &body).as_ref());
    let sha256 = crate::protocol::audit::hex(&digest);
    let Ok(root) = RootKey::from_bytes([7; 32]) else {
        return;
    };
    let key = root.derive_mac(file::MAC_LABEL);
    let Ok(other) = RootKey::from_bytes([8; 32]) else {
        return;
    };
    let other = other.derive_mac(file::MAC_LABEL);
    let tag = key.sign(&file::mac_message(&digest, records, &key_id));
    let trailers = [
        serde_json::json!({"end": "spike-backup", "records": records, "sha256": sha256}),
        serde_json::json!({
            "end": "spike-backup",
            "records": records,
            "sha256": sha256,
            "key_id": key_id,
            "mac": crate::protocol::audit::hex(&tag),
        }),
    ];
    for trailer in trailers {
        let mut whole = body.clone();
        whole.extend_from_slice(trailer.to_string().as_bytes());
        whole.push(b'\n');
        let Ok(backup) = decode(&whole) else {
            continue;
        };
        assert_eq!(backup.records.len() as u64, backup.header.records);
        assert!(
            backup
                .records
                .windows(2)
                .all(|w| (w[0].0, &w[0].1) < (w[1].0, &w[1].1))
        );
        let again = match &backup.seal {
            Seal::Mac { key_id: named, .. } => {
                assert_eq!(named, &key_id);
                assert_eq!(backup.header.key_id, key_id);
                assert_eq!(backup.authenticate(&key, &key_id), Ok(()));
                assert_eq!(backup.authenticate(&other, &key_id), Err(AuthError::Forged));
                let again = decode(&file::encode(
                    &backup.header,
                    &backup.records,
                    &key,
                    &key_id,
                ))
                .expect("re-encoded");
                assert_eq!(again.authenticate(&key, &key_id), Ok(()));
                again
            }
            Seal::Unauthenticated => {
                assert_eq!(
                    backup.authenticate(&key, &key_id),
                    Err(AuthError::Unauthenticated)
                );
                decode(&file::encode_unauthenticated(
                    &backup.header,
                    &backup.records,
                ))
                .expect("re-encoded")
            }
        };
        assert_eq!(again.records, backup.records);
        assert_eq!(again.header, backup.header);
        // The same kind of seal under the same key id (the tag covers the bytes, which a
        // re-encoding may lay out differently).
        assert_eq!(again.key_id(), backup.key_id());
        assert_eq!(
            again.seal == Seal::Unauthenticated,
            backup.seal == Seal::Unauthenticated
        );
    }
}
