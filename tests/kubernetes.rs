#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The Kubernetes manifests (packaging/kubernetes, issue 16): every document decodes strictly
//! into the Kubernetes API types (tests/go/k8s-validate, k8s.io/api from the Go module proxy),
//! and the environment they set is exactly what `spike` reads: no `SPIKE_*` variable spike does
//! not know, none it needs missing, and the values pass spike's own configuration parser.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/kubernetes");

fn validator() -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("k8s-validate");
    let status = Command::new("go")
        .args(["build", "-mod=readonly", "-trimpath", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/go/k8s-validate"
        ))
        .status()
        .expect("go is installed (Go >= 1.26)");
    assert!(status.success(), "building tests/go/k8s-validate failed");
    out
}

fn validate(dir: &Path) -> Result<serde_json::Value, String> {
    let out = Command::new(validator()).arg(dir).output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Every `SPIKE_*` / `SPIFFE_*` name spike's source reads (string literals under src/).
fn names_spike_reads() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for part in text.split('"').skip(1).step_by(2) {
                    if (part.starts_with("SPIKE_") || part.starts_with("SPIFFE_"))
                        && part.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                    {
                        out.insert(part.to_string());
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out
}

#[test]
fn manifests_decode_strictly_and_set_exactly_what_spike_reads() {
    let doc = validate(Path::new(MANIFESTS)).unwrap_or_else(|e| panic!("{e}"));
    let known = names_spike_reads();
    assert!(known.contains("SPIKE_NEXUS_KEEPER_PEERS"), "{known:?}");
    let env = doc["env"].as_object().unwrap();
    let values: HashMap<String, String> = doc["values"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    for (container, names) in env {
        for name in names.as_array().unwrap() {
            let name = name.as_str().unwrap();
            assert!(
                known.contains(name),
                "{container} sets {name}, which spike does not read"
            );
        }
    }
    let set = |container: &str| -> HashMap<String, String> {
        env[container]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let n = n.as_str().unwrap().to_string();
                let v = values
                    .get(&format!("{container}/{n}"))
                    .cloned()
                    // A value from a Secret: a placeholder of the right shape.
                    .unwrap_or_else(|| "postgres://spike@db:5432/spike".to_string());
                (n, v)
            })
            .collect()
    };
    // Nothing missing: spike's own parsers accept what the manifests set, as they are.
    let nexus = set("nexus");
    let cfg = spike::nexus::NexusConfig::from_source(&nexus)
        .unwrap_or_else(|e| panic!("the Nexus environment does not parse: {e}"));
    assert_eq!(cfg.backend.name(), "postgres");
    spike::keeper::KeeperConfig::from_source(&set("keeper"))
        .unwrap_or_else(|e| panic!("the Keeper environment does not parse: {e}"));
    // The Keeper StatefulSet has one replica per share, in peer-list order.
    let replicas: usize = values["statefulset/spike-keeper/replicas"].parse().unwrap();
    assert_eq!(replicas, usize::from(cfg.shares));
    for (i, peer) in cfg.keeper_peers.iter().enumerate() {
        assert!(
            peer.host()
                .unwrap()
                .starts_with(&format!("spike-keeper-{i}.")),
            "peer {i} is {peer}: position i must be the StatefulSet's ordinal i"
        );
    }
}

#[test]
fn the_validator_refuses_unknown_fields_and_kinds() {
    for (file, bad, want) in [
        ("keeper.yaml", "  replicas: 3\n", "  replicass: 3\n"),
        ("nexus.yaml", "      containers:\n", "      containerz:\n"),
        ("nexus.yaml", "kind: Deployment", "kind: Deploymentt"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["keeper.yaml", "nexus.yaml", "namespace.yaml"] {
            let text = std::fs::read_to_string(Path::new(MANIFESTS).join(f)).unwrap();
            let text = if f == file {
                assert!(text.contains(bad), "{file} has no {bad:?}");
                text.replacen(bad, want, 1)
            } else {
                text
            };
            std::fs::write(dir.path().join(f), text).unwrap();
        }
        let err = validate(dir.path()).expect_err(want);
        assert!(err.contains(file), "{want:?}: {err}");
    }
}
