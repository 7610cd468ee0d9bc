//! `SPIKE_*` environment variables turned into validated, immutable configuration.
//!
//! Every variable of DESIGN.md §7 is read here and nowhere else. Parsing takes a lookup
//! function instead of reading the process environment directly, so tests can feed it a map.
//! Errors name the variable and say what is wrong in one line; values of variables that may
//! hold credentials (the database URL) are never echoed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hyper::Uri;

use crate::identity::{IdentityConfig, TrustRoots};

/// One configuration problem, named by its variable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A variable holds a value that cannot be used.
    #[error("{var}: {reason}")]
    Invalid { var: &'static str, reason: String },
    /// A required variable is unset or empty.
    #[error("{var} must be set: {hint}")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    /// The SVID files could not be located.
    #[error("{0}")]
    Svid(#[from] crate::identity::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where configuration values come from: the process environment in production, a map in tests.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The real process environment. Empty values count as unset, as SPIKE does.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl<S: std::hash::BuildHasher> Source for std::collections::HashMap<String, String, S> {
    fn get(&self, name: &str) -> Option<String> {
        std::collections::HashMap::get(self, name)
            .filter(|v| !v.trim().is_empty())
            .cloned()
    }
}

pub const DEFAULT_TRUST_DOMAIN: &str = "spike.ist";
pub const DEFAULT_NEXUS_ADDR: &str = ":8553";
pub const DEFAULT_KEEPER_ADDR: &str = ":8443";
pub const DEFAULT_API_URL: &str = "https://localhost:8553";
/// How often servers look for rotated SVID files on disk.
pub const SVID_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// What every process needs: who it is and which trust domains it accepts.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The first `SPIKE_TRUST_ROOT` entry (`spike.ist` by default).
    pub trust_domain: String,
    /// The `SPIKE_TRUST_ROOT*` lists and the SVID source: `SPIFFE_ENDPOINT_SOCKET` (the Workload
    /// API, waited for up to `SPIKE_SPIFFE_SOURCE_TIMEOUT`) or the `SPIKE_SVID_*` files.
    pub config: IdentityConfig,
}

impl Identity {
    pub fn from_source(env: &impl Source) -> Result<Identity> {
        let mut config = IdentityConfig::from_lookup(&|name| env.get(name))?;
        config.set_first_svid_timeout(duration(
            env,
            crate::identity::SOURCE_TIMEOUT,
            crate::identity::DEFAULT_FIRST_SVID_TIMEOUT,
        )?);
        Ok(Identity {
            trust_domain: config.trust.primary().to_string(),
            config,
        })
    }

    /// The trust domains each kind of peer may come from.
    pub fn trust(&self) -> &TrustRoots {
        &self.config.trust
    }
}

/// The first `SPIKE_TRUST_ROOT` entry, the list validated as trust domain names.
pub fn trust_domain(env: &impl Source) -> Result<String> {
    Ok(TrustRoots::from_lookup(&|name| env.get(name))?
        .primary()
        .to_string())
}

/// `spike keeper` configuration.
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    /// `SPIKE_KEEPER_TLS_PORT`: where the Keeper listens.
    pub listen: SocketAddr,
    pub identity: Identity,
    /// Connection limits and timeouts of the HTTPS server.
    pub server: crate::transport::Limits,
}

impl KeeperConfig {
    pub fn from_source(env: &impl Source) -> Result<KeeperConfig> {
        Ok(KeeperConfig {
            server: server_limits(env)?,
            listen: listen_addr(env, "SPIKE_KEEPER_TLS_PORT", DEFAULT_KEEPER_ADDR)?,
            identity: Identity::from_source(env)?,
        })
    }
}

/// Which backing store Nexus uses (`SPIKE_NEXUS_BACKEND_STORE`).
#[derive(Clone, Debug)]
pub enum Backend {
    /// In-process only; for tests and ephemeral dev clusters.
    Memory,
    /// `SPIKE_NEXUS_DATA_DIR/spike.db`.
    Sqlite { data_dir: PathBuf },
    /// An S3-compatible bucket (`SPIKE_NEXUS_S3_*`).
    S3(S3Config),
    /// `SPIKE_NEXUS_DB_URL`, a libpq-style URL. Its `Debug` form hides it: it may hold a
    /// password.
    Postgres { url: SecretUrl },
}

/// A connection URL that may carry credentials: never printed.
#[derive(Clone)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: String) -> SecretUrl {
        SecretUrl(url)
    }

    /// The URL itself, for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretUrl(..)")
    }
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Sqlite { .. } => "sqlite",
            Backend::S3(_) => "s3",
            Backend::Postgres { .. } => "postgres",
        }
    }
}

/// Where and how the S3 backend reaches its bucket (`SPIKE_NEXUS_S3_*`, `AWS_*`).
#[derive(Clone, Debug)]
pub struct S3Config {
    /// `SPIKE_NEXUS_S3_ENDPOINT`: an S3-compatible server's URL; `None` means AWS itself.
    pub endpoint: Option<String>,
    /// `SPIKE_NEXUS_S3_BUCKET` (required).
    pub bucket: String,
    /// `SPIKE_NEXUS_S3_PREFIX`: prepended to every object key (default `spike/`).
    pub prefix: String,
    /// `SPIKE_NEXUS_S3_REGION` (default `us-east-1`).
    pub region: String,
    /// `SPIKE_NEXUS_S3_PATH_STYLE`: `http://host/bucket/key` instead of
    /// `http://bucket.host/key`; default true when an endpoint is given.
    pub path_style: bool,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    pub credentials: S3Credentials,
}

/// Static S3 credentials. `Debug` shows the access key id only: the secret never reaches a log.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl S3Config {
    pub fn from_source(env: &impl Source) -> Result<S3Config> {
        let endpoint = env.get("SPIKE_NEXUS_S3_ENDPOINT");
        if let Some(e) = &endpoint {
            let uri: Uri = e.parse().map_err(|err| {
                invalid(
                    "SPIKE_NEXUS_S3_ENDPOINT",
                    format!("{e:?} is not a URL ({err})"),
                )
            })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(invalid(
                    "SPIKE_NEXUS_S3_ENDPOINT",
                    format!("{e:?} must be an http:// or https:// URL with a host"),
                ));
            }
        }
        let bucket = env.get("SPIKE_NEXUS_S3_BUCKET").ok_or(Error::Missing {
            var: "SPIKE_NEXUS_S3_BUCKET",
            hint: "name the bucket that holds Nexus's data",
        })?;
        let path_style = match env.get("SPIKE_NEXUS_S3_PATH_STYLE") {
            None => endpoint.is_some(),
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(invalid(
                        "SPIKE_NEXUS_S3_PATH_STYLE",
                        format!("expected true or false, got {v:?}"),
                    ));
                }
            },
        };
        let access_key_id = env.get("AWS_ACCESS_KEY_ID").ok_or(Error::Missing {
            var: "AWS_ACCESS_KEY_ID",
            hint: "the S3 backend needs static credentials (with AWS_SECRET_ACCESS_KEY)",
        })?;
        let secret_access_key = env.get("AWS_SECRET_ACCESS_KEY").ok_or(Error::Missing {
            var: "AWS_SECRET_ACCESS_KEY",
            hint: "the S3 backend needs static credentials (with AWS_ACCESS_KEY_ID)",
        })?;
        Ok(S3Config {
            endpoint,
            bucket,
            prefix: env
                .get("SPIKE_NEXUS_S3_PREFIX")
                .unwrap_or_else(|| "spike/".into()),
            region: env
                .get("SPIKE_NEXUS_S3_REGION")
                .unwrap_or_else(|| "us-east-1".into()),
            path_style,
            credentials: S3Credentials {
                access_key_id,
                secret_access_key,
                session_token: env.get("AWS_SESSION_TOKEN"),
            },
        })
    }
}

/// `spike nexus` configuration.
#[derive(Clone, Debug)]
pub struct NexusConfig {
    /// `SPIKE_NEXUS_TLS_PORT`.
    pub listen: SocketAddr,
    pub identity: Identity,
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
    pub server: crate::transport::Limits,
}

impl NexusConfig {
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
        if threshold == 0 || threshold > shares {
            return Err(invalid(
                "SPIKE_NEXUS_SHAMIR_THRESHOLD",
                format!(
                    "must be between 1 and SPIKE_NEXUS_SHAMIR_SHARES ({shares}), got {threshold}"
                ),
            ));
        }
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
        let backend = match env
            .get("SPIKE_NEXUS_BACKEND_STORE")
            .unwrap_or_else(|| "sqlite".into())
            .to_ascii_lowercase()
            .as_str()
        {
            "sqlite" => Backend::Sqlite {
                data_dir: env
                    .get("SPIKE_NEXUS_DATA_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/var/lib/spike")),
            },
            "memory" => Backend::Memory,
            "postgres" | "postgresql" => Backend::Postgres {
                url: SecretUrl::new(env.get("SPIKE_NEXUS_DB_URL").ok_or(Error::Missing {
                    var: "SPIKE_NEXUS_DB_URL",
                    hint: "SPIKE_NEXUS_BACKEND_STORE=postgres needs a URL such as postgres://spike@db.example:5432/spike?sslmode=verify-full&sslrootcert=/etc/spike/db-ca.pem",
                })?),
            },
            "s3" => Backend::S3(S3Config::from_source(env)?),
            other => {
                return Err(invalid(
                    "SPIKE_NEXUS_BACKEND_STORE",
                    format!("unknown backend {other:?} (expected sqlite, postgres, s3 or memory)"),
                ));
            }
        };
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
        Ok(NexusConfig {
            server: server_limits(env)?,
            max_cipher_bytes,
            listen,
            identity: Identity::from_source(env)?,
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
        })
    }
}

/// The HTTPS server's limits: `SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT` (SPIKE's name),
/// `SPIKE_HTTP_SERVER_TLS_HANDSHAKE_TIMEOUT`, `SPIKE_HTTP_SERVER_MAX_CONNECTIONS`,
/// `SPIKE_HTTP_SERVER_DRAIN_TIMEOUT`.
fn server_limits(env: &impl Source) -> Result<crate::transport::Limits> {
    let d = crate::transport::Limits::default();
    let max_connections =
        number::<usize>(env, "SPIKE_HTTP_SERVER_MAX_CONNECTIONS", d.max_connections)?;
    if max_connections == 0 {
        return Err(invalid(
            "SPIKE_HTTP_SERVER_MAX_CONNECTIONS",
            "must be at least 1",
        ));
    }
    Ok(crate::transport::Limits {
        max_connections,
        handshake_timeout: duration(
            env,
            "SPIKE_HTTP_SERVER_TLS_HANDSHAKE_TIMEOUT",
            d.handshake_timeout,
        )?,
        header_timeout: duration(
            env,
            "SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT",
            d.header_timeout,
        )?,
        drain_timeout: duration(env, "SPIKE_HTTP_SERVER_DRAIN_TIMEOUT", d.drain_timeout)?,
    })
}

fn invalid(var: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        var,
        reason: reason.into(),
    }
}

fn number<T: std::str::FromStr>(env: &impl Source, var: &'static str, default: T) -> Result<T> {
    match env.get(var) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| invalid(var, format!("{v:?} is not a valid number in range"))),
    }
}

fn duration(env: &impl Source, var: &'static str, default: Duration) -> Result<Duration> {
    match env.get(var) {
        None => Ok(default),
        Some(v) => match parse_duration(&v) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(invalid(
                var,
                format!("{v:?} is not a positive duration (examples: 5m, 30s, 500ms, 1h30m)"),
            )),
        },
    }
}

/// Parses Go-style durations as SPIKE writes them: `300ms`, `2s`, `5m`, `1h30m`.
/// A bare number is taken as seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.checked_mul(60)?),
            "h" => Duration::from_secs(value.checked_mul(3600)?),
            _ => return None,
        };
        total = total.checked_add(unit)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// `:8553`, `8553`, `127.0.0.1:8553` or `[::1]:8553`.
fn listen_addr(env: &impl Source, var: &'static str, default: &str) -> Result<SocketAddr> {
    let text = env.get(var).unwrap_or_else(|| default.to_string());
    parse_listen_addr(&text).ok_or_else(|| {
        invalid(
            var,
            format!(
                "{text:?} is not a listen address (examples: :8553, 127.0.0.1:8553, [::1]:8553)"
            ),
        )
    })
}

pub fn parse_listen_addr(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if let Some(port) = text
        .strip_prefix(':')
        .or(Some(text).filter(|t| !t.contains(':')))
    {
        let port: u16 = port.parse().ok()?;
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    text.parse().ok()
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

/// An `https://host[:port]` URL with nothing after the authority but an optional `/`.
pub fn parse_https_url(item: &str) -> std::result::Result<Uri, String> {
    let uri: Uri = item
        .parse()
        .map_err(|_| format!("{item:?} is not a URL (expected https://host:port)"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{item:?} must start with https://"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{item:?} has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{item:?} must not have a path or query"));
    }
    Ok(uri)
}

/// Default of `SPIKE_HTTP_CLIENT_DIALER_TIMEOUT`: short, because a client with several Nexus
/// addresses moves on to the next one when a connect times out.
pub const DEFAULT_DIALER_TIMEOUT: Duration = Duration::from_secs(1);

/// `SPIKE_HTTP_CLIENT_DIALER_TIMEOUT` (SPIKE's name): the TCP connect timeout of clients, per
/// address.
pub fn dialer_timeout(env: &impl Source) -> Result<Duration> {
    duration(
        env,
        "SPIKE_HTTP_CLIENT_DIALER_TIMEOUT",
        DEFAULT_DIALER_TIMEOUT,
    )
}

/// `SPIKE_NEXUS_API_URL`: one URL or a comma-separated list, for clients.
pub fn api_urls(env: &impl Source) -> Result<Vec<Uri>> {
    const VAR: &str = "SPIKE_NEXUS_API_URL";
    let text = env.get(VAR).unwrap_or_else(|| DEFAULT_API_URL.to_string());
    text.split(',')
        .map(|item| parse_https_url(item.trim()).map_err(|reason| invalid(VAR, reason)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn durations() {
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        for bad in ["", "m", "5x", "-1s", "1.5s", "s5"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen_addr(":8553").unwrap().port(), 8553);
        assert_eq!(parse_listen_addr("8553").unwrap().port(), 8553);
        assert_eq!(
            parse_listen_addr("127.0.0.1:9").unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert!(parse_listen_addr("[::1]:9").unwrap().is_ipv6());
        assert!(parse_listen_addr("localhost:x").is_none());
    }

    #[test]
    fn nexus_defaults() {
        let cfg = NexusConfig::from_source(&env(&[("SPIKE_NEXUS_KEEPER_PEERS", PEERS)])).unwrap();
        assert_eq!((cfg.shares, cfg.threshold), (3, 2));
        assert_eq!(cfg.keeper_update_interval, Duration::from_secs(300));
        assert_eq!(cfg.listen.port(), 8553);
        assert_eq!(cfg.identity.trust_domain, "spike.ist");
        assert_eq!(cfg.max_secret_versions, 10);
        assert!(matches!(cfg.backend, Backend::Sqlite { .. }));
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
    fn svid_files_must_be_given() {
        let mut map = HashMap::new();
        map.insert("SPIKE_NEXUS_KEEPER_PEERS".to_string(), PEERS.to_string());
        let err = NexusConfig::from_source(&map).unwrap_err().to_string();
        assert!(err.contains("SPIKE_SVID"), "{err}");
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
