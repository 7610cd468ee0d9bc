//! Which backing store Nexus uses and how to reach it: `SPIKE_NEXUS_BACKEND_STORE` and the
//! settings of each backend. The store owns its settings; no other part reads them.

use std::path::PathBuf;

use hyper::Uri;

use crate::platform::env::{Error, Result, Source, invalid};

/// Which backing store Nexus uses (`SPIKE_NEXUS_BACKEND_STORE`).
#[derive(Clone, Debug)]
pub enum Backend {
    /// In-process only; for tests and ephemeral dev clusters.
    Memory,
    /// `SPIKE_NEXUS_DATA_DIR/spike.db`.
    Sqlite {
        /// `SPIKE_NEXUS_DATA_DIR`.
        data_dir: PathBuf,
    },
    /// An S3-compatible bucket (`SPIKE_NEXUS_S3_*`).
    S3(S3Config),
    /// `SPIKE_NEXUS_DB_URL`, a libpq-style URL. Its `Debug` form hides it: it may hold a
    /// password.
    Postgres {
        /// The URL, hidden from `Debug`.
        url: SecretUrl,
    },
}

/// A connection URL that may carry credentials: never printed.
#[derive(Clone)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL that may hold a password.
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
    /// Reads `SPIKE_NEXUS_BACKEND_STORE` and the chosen backend's settings (default: SQLite in
    /// `/var/lib/spike`).
    pub fn from_source(env: &impl Source) -> Result<Backend> {
        Ok(match env
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
        })
    }

    /// The backend's name, for logs and `/health`.
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
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN`, if set.
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
    /// Reads `SPIKE_NEXUS_S3_*` and the `AWS_*` credentials.
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
