//! `spike nexus` configuration from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::Uri;

use crate::identity::IdentityConfig;
use crate::platform::env::{
    Error, Result, Source, duration, invalid, listen_addr, number, optional_listen_addr,
    parse_https_url,
};
use crate::store::Backend;
use crate::transport::Limits;

/// `SPIKE_NEXUS_TLS_PORT` when unset.
pub const DEFAULT_NEXUS_ADDR: &str = ":8553";

/// `spike nexus` configuration.
#[derive(Clone, Debug)]
pub struct NexusConfig {
    /// `SPIKE_NEXUS_TLS_PORT`.
    pub listen: SocketAddr,
    /// Trust domains and this instance's SVID source.
    pub identity: IdentityConfig,
    /// `SPIKE_NEXUS_KEEPER_PEERS`, in order: position i (1-based) is Shamir index i.
    pub keeper_peers: Vec<Uri>,
    /// `SPIKE_NEXUS_SHAMIR_SHARES`.
    pub shares: u8,
    /// `SPIKE_NEXUS_SHAMIR_THRESHOLD`.
    pub threshold: u8,
    /// `SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL`: how often every Keeper is sent its shard again.
    pub keeper_update_interval: Duration,
    /// `SPIKE_NEXUS_RECOVERY_MAX_INTERVAL`: the longest wait between two attempts to collect
    /// shards while the root key is not loaded.
    pub recovery_max_interval: Duration,
    /// `SPIKE_NEXUS_KEEPER_TIMEOUT`: one request to one Keeper, connection included.
    pub keeper_timeout: Duration,
    /// `SPIKE_NEXUS_BACKEND_STORE` and its settings.
    pub backend: Backend,
    /// `SPIKE_NEXUS_MAX_SECRET_VERSIONS`.
    pub max_secret_versions: u32,
    /// `SPIKE_NEXUS_MAX_BODY_BYTES`: requests with a larger body get 413.
    pub max_body_bytes: usize,
    /// `SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE`: largest plaintext or ciphertext the cipher API
    /// takes (SPIKE's variable and default).
    pub max_cipher_bytes: usize,
    /// Connection limits and timeouts of the HTTPS server.
    pub server: Limits,
    /// `SPIKE_NEXUS_UPGRADE_SECRET_RECORDS`: accept secret records written before records were
    /// authenticated (they carry no MAC) and give each its MAC. Off by default: a record without
    /// MAC is refused like a tampered one, so removing a MAC downgrades nothing.
    pub upgrade_secret_records: bool,
    /// `SPIKE_NEXUS_AUDIT_*`: the audit file and what its failures do to requests.
    pub audit: super::audit::AuditConfig,
    /// `SPIKE_NEXUS_METRICS_ADDR`: where Prometheus metrics are served (plain HTTP); unset, no
    /// metrics listener.
    pub metrics: Option<SocketAddr>,
    /// `SPIKE_NEXUS_UPGRADE_POLICY_ROWS`: move the per-name policy rows of releases before the
    /// policy book into the book at this start. Off by default: rows found in the store are
    /// left there, not in force, with a warning, because a store administrator can put a row
    /// back (a deleted policy would return).
    pub upgrade_policy_rows: bool,
}

/// An operator's `true`/`false` setting (any case; empty or unset is `false`).
fn flag(env: &impl Source, name: &'static str) -> Result<bool> {
    match env.get(name) {
        None => Ok(false),
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" | "" => Ok(false),
            _ => Err(invalid(name, format!("expected true or false, got {v:?}"))),
        },
    }
}

impl NexusConfig {
    /// Reads every `SPIKE_NEXUS_*` variable, the identity and the server limits.
    pub fn from_source(env: &impl Source) -> Result<NexusConfig> {
        let listen = listen_addr(env, "SPIKE_NEXUS_TLS_PORT", DEFAULT_NEXUS_ADDR)?;
        let shares = number::<u8>(env, "SPIKE_NEXUS_SHAMIR_SHARES", 3)?;
        let threshold = number::<u8>(env, "SPIKE_NEXUS_SHAMIR_THRESHOLD", 2)?;
        if shares == 0 {
            return Err(invalid(
                "SPIKE_NEXUS_SHAMIR_SHARES",
                "must be between 1 and 255",
            ));
        }
        crate::protocol::nexus::check_sharing(threshold, usize::from(shares))
            .map_err(|reason| invalid("SPIKE_NEXUS_SHAMIR_THRESHOLD", reason))?;
        let keeper_peers = keeper_peers(env)?;
        if keeper_peers.len() != usize::from(shares) {
            return Err(invalid(
                "SPIKE_NEXUS_KEEPER_PEERS",
                format!(
                    "lists {} Keeper(s) but SPIKE_NEXUS_SHAMIR_SHARES is {shares}: give one Keeper URL per share",
                    keeper_peers.len()
                ),
            ));
        }
        let backend = Backend::from_source(env)?;
        let max_secret_versions = number::<u32>(env, "SPIKE_NEXUS_MAX_SECRET_VERSIONS", 10)?;
        if max_secret_versions == 0 {
            return Err(invalid(
                "SPIKE_NEXUS_MAX_SECRET_VERSIONS",
                "must be at least 1",
            ));
        }
        let max_body_bytes = number::<usize>(env, "SPIKE_NEXUS_MAX_BODY_BYTES", 1 << 20)?;
        if max_body_bytes < 1024 {
            return Err(invalid(
                "SPIKE_NEXUS_MAX_BODY_BYTES",
                "must be at least 1024",
            ));
        }
        let max_cipher_bytes =
            number::<usize>(env, "SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE", 65_536)?;
        let upgrade_secret_records = flag(env, "SPIKE_NEXUS_UPGRADE_SECRET_RECORDS")?;
        let upgrade_policy_rows = flag(env, "SPIKE_NEXUS_UPGRADE_POLICY_ROWS")?;
        Ok(NexusConfig {
            upgrade_secret_records,
            audit: super::audit::AuditConfig::from_source(env)?,
            upgrade_policy_rows,
            server: Limits::from_source(env)?,
            max_cipher_bytes,
            listen,
            identity: IdentityConfig::from_source(env)?,
            keeper_peers,
            shares,
            threshold,
            keeper_update_interval: duration(
                env,
                "SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL",
                Duration::from_secs(300),
            )?,
            recovery_max_interval: duration(
                env,
                "SPIKE_NEXUS_RECOVERY_MAX_INTERVAL",
                Duration::from_secs(10),
            )?,
            keeper_timeout: duration(env, "SPIKE_NEXUS_KEEPER_TIMEOUT", Duration::from_secs(5))?,
            backend,
            max_secret_versions,
            max_body_bytes,
            metrics: optional_listen_addr(env, "SPIKE_NEXUS_METRICS_ADDR")?,
        })
    }
}

fn keeper_peers(env: &impl Source) -> Result<Vec<Uri>> {
    const VAR: &str = "SPIKE_NEXUS_KEEPER_PEERS";
    let text = env.get(VAR).ok_or(Error::Missing {
        var: VAR,
        hint: "a comma-separated list of Keeper URLs such as https://10.0.0.1:8443,https://10.0.0.2:8443",
    })?;
    let mut peers: Vec<Uri> = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        let uri = parse_https_url(item).map_err(|reason| invalid(VAR, reason))?;
        if peers.contains(&uri) {
            return Err(invalid(VAR, format!("{item:?} is listed twice")));
        }
        peers.push(uri);
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::S3Config;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.entry("SPIKE_SVID_DIR".into())
            .or_insert_with(|| "/nonexistent/svid".into());
        map
    }

    const PEERS: &str = "https://127.0.0.1:8443,https://127.0.0.1:8543,https://127.0.0.1:8643";

    #[test]
    fn nexus_defaults() {
        let cfg = NexusConfig::from_source(&env(&[("SPIKE_NEXUS_KEEPER_PEERS", PEERS)])).unwrap();
        assert_eq!((cfg.shares, cfg.threshold), (3, 2));
        assert_eq!(cfg.keeper_update_interval, Duration::from_secs(300));
        assert_eq!(cfg.listen.port(), 8553);
        assert_eq!(cfg.identity.trust_domain(), "spike.ist");
        assert_eq!(cfg.max_secret_versions, 10);
        assert!(matches!(cfg.backend, Backend::Sqlite { .. }));
        assert!(
            !cfg.upgrade_secret_records,
            "records without MAC are refused by default"
        );
        let upgrading = NexusConfig::from_source(&env(&[
            ("SPIKE_NEXUS_KEEPER_PEERS", PEERS),
            ("SPIKE_NEXUS_UPGRADE_SECRET_RECORDS", "true"),
        ]))
        .unwrap();
        assert!(upgrading.upgrade_secret_records);
        assert!(
            !upgrading.upgrade_policy_rows,
            "rows are imported only when asked"
        );
        let rows = NexusConfig::from_source(&env(&[
            ("SPIKE_NEXUS_KEEPER_PEERS", PEERS),
            ("SPIKE_NEXUS_UPGRADE_POLICY_ROWS", "TRUE"),
        ]))
        .unwrap();
        assert!(rows.upgrade_policy_rows);
    }

    #[test]
    fn nexus_rejects_bad_values_with_the_variable_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("SPIKE_NEXUS_SHAMIR_THRESHOLD", "4")],
                "SPIKE_NEXUS_SHAMIR_THRESHOLD",
            ),
            (
                &[("SPIKE_NEXUS_SHAMIR_THRESHOLD", "0")],
                "SPIKE_NEXUS_SHAMIR_THRESHOLD",
            ),
            (
                &[("SPIKE_NEXUS_SHAMIR_SHARES", "256")],
                "SPIKE_NEXUS_SHAMIR_SHARES",
            ),
            (
                &[("SPIKE_NEXUS_SHAMIR_SHARES", "2")],
                "SPIKE_NEXUS_KEEPER_PEERS",
            ),
            (
                &[("SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL", "soon")],
                "SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL",
            ),
            (
                &[("SPIKE_NEXUS_BACKEND_STORE", "etcd")],
                "SPIKE_NEXUS_BACKEND_STORE",
            ),
            (
                &[("SPIKE_NEXUS_TLS_PORT", "nowhere")],
                "SPIKE_NEXUS_TLS_PORT",
            ),
            (&[("SPIKE_TRUST_ROOT", "Bad_Domain!")], "SPIKE_TRUST_ROOT"),
            (
                &[("SPIKE_NEXUS_UPGRADE_SECRET_RECORDS", "yes")],
                "SPIKE_NEXUS_UPGRADE_SECRET_RECORDS",
            ),
            (
                &[("SPIKE_NEXUS_UPGRADE_POLICY_ROWS", "1")],
                "SPIKE_NEXUS_UPGRADE_POLICY_ROWS",
            ),
        ];
        for (pairs, var) in cases {
            let mut all = vec![("SPIKE_NEXUS_KEEPER_PEERS", PEERS)];
            all.extend_from_slice(pairs);
            let err = NexusConfig::from_source(&env(&all))
                .unwrap_err()
                .to_string();
            assert!(err.contains(var), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn keeper_peer_urls_are_checked() {
        for bad in [
            "http://127.0.0.1:1,https://a:2,https://b:3",
            "https://,https://a:2,https://b:3",
            "https://a:1/x,https://a:2,https://b:3",
            "https://a:1,https://a:1,https://b:3",
            "not a url,https://a:2,https://b:3",
        ] {
            let err = NexusConfig::from_source(&env(&[("SPIKE_NEXUS_KEEPER_PEERS", bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("SPIKE_NEXUS_KEEPER_PEERS"), "{bad}: {err}");
        }
        let err = NexusConfig::from_source(&env(&[])).unwrap_err().to_string();
        assert!(
            err.contains("SPIKE_NEXUS_KEEPER_PEERS must be set"),
            "{err}"
        );
    }

    #[test]
    fn postgres_backend_needs_a_url_and_never_shows_it() {
        let err = NexusConfig::from_source(&env(&[
            ("SPIKE_NEXUS_KEEPER_PEERS", PEERS),
            ("SPIKE_NEXUS_BACKEND_STORE", "postgres"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("SPIKE_NEXUS_DB_URL must be set"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let url = "postgres://spike:TopSecretPw@db:5432/spike";
        let cfg = NexusConfig::from_source(&env(&[
            ("SPIKE_NEXUS_KEEPER_PEERS", PEERS),
            ("SPIKE_NEXUS_BACKEND_STORE", "postgres"),
            ("SPIKE_NEXUS_DB_URL", url),
        ]))
        .unwrap();
        assert_eq!(cfg.backend.name(), "postgres");
        assert!(!format!("{cfg:?}").contains("TopSecretPw"));
        let Backend::Postgres { url: got } = &cfg.backend else {
            panic!("{:?}", cfg.backend)
        };
        assert_eq!(got.expose(), url);
    }

    #[test]
    fn no_identity_settings_mean_spires_default_socket() {
        let mut map = HashMap::new();
        map.insert("SPIKE_NEXUS_KEEPER_PEERS".to_string(), PEERS.to_string());
        let cfg = NexusConfig::from_source(&map).unwrap();
        let crate::identity::SourceConfig::WorkloadApi(w) = &cfg.identity.source else {
            panic!("{:?}", cfg.identity.source)
        };
        assert_eq!(w.endpoint, crate::identity::DEFAULT_ENDPOINT);
    }

    #[test]
    fn s3_settings() {
        let creds = [
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret"),
        ];
        let cfg = S3Config::from_source(&env(&[
            ("SPIKE_NEXUS_S3_BUCKET", "b"),
            ("SPIKE_NEXUS_S3_ENDPOINT", "http://127.0.0.1:9000"),
            creds[0],
            creds[1],
        ]))
        .unwrap();
        assert_eq!(
            (cfg.prefix.as_str(), cfg.region.as_str()),
            ("spike/", "us-east-1")
        );
        assert!(cfg.path_style, "path style is the default with an endpoint");
        assert!(!format!("{cfg:?}").contains("very-secret"));
        let aws =
            S3Config::from_source(&env(&[("SPIKE_NEXUS_S3_BUCKET", "b"), creds[0], creds[1]]))
                .unwrap();
        assert!(!aws.path_style && aws.endpoint.is_none());
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "SPIKE_NEXUS_S3_BUCKET"),
            (
                &[("SPIKE_NEXUS_S3_BUCKET", "b"), creds[1]],
                "AWS_ACCESS_KEY_ID",
            ),
            (
                &[("SPIKE_NEXUS_S3_BUCKET", "b"), creds[0]],
                "AWS_SECRET_ACCESS_KEY",
            ),
            (
                &[
                    ("SPIKE_NEXUS_S3_BUCKET", "b"),
                    ("SPIKE_NEXUS_S3_PATH_STYLE", "yes"),
                ],
                "SPIKE_NEXUS_S3_PATH_STYLE",
            ),
            (
                &[
                    ("SPIKE_NEXUS_S3_BUCKET", "b"),
                    ("SPIKE_NEXUS_S3_ENDPOINT", "ftp://x"),
                ],
                "SPIKE_NEXUS_S3_ENDPOINT",
            ),
        ];
        for (pairs, var) in cases {
            let mut all = pairs.to_vec();
            all.extend([
                ("SPIKE_NEXUS_BACKEND_STORE", "s3"),
                ("SPIKE_NEXUS_KEEPER_PEERS", PEERS),
            ]);
            let err = NexusConfig::from_source(&env(&all))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(var), "{err}");
            assert!(!err.contains("very-secret"), "{err}");
        }
    }
}
