//! The production HA store: one PostgreSQL database shared by every Nexus instance
//! (`SPIKE_NEXUS_BACKEND_STORE=postgres`, `SPIKE_NEXUS_DB_URL`).
//!
//! - **Schema.** One table `kv(ns, key, value, revision)` keyed by `(ns, key)`, the sequence
//!   `kv_revision` that every write draws its revision from (so a revision is never reused, even
//!   for a key deleted and created again), and `schema_version`. Keys use the `"C"` collation so
//!   the database sorts them byte-wise, as Rust does.
//! - **Migrations** run in one transaction holding `pg_advisory_xact_lock(MIGRATION_LOCK)`:
//!   instances starting together take turns and the later ones find the work done.
//! - **Conditional writes are single statements** — `INSERT ... ON CONFLICT DO NOTHING` for
//!   create-if-absent, `UPDATE ... WHERE revision = $n` for compare-and-set — so PostgreSQL's row
//!   locks decide between writers on different instances and at most one wins. Each runs in its
//!   own implicit transaction with `synchronous_commit=on` (forced per connection unless the URL's
//!   `options` set it), so a write is durable when it returns.
//! - **Failures.** Every operation, connection included, is bounded by [`OP_TIMEOUT`]; IO errors,
//!   timeouts and server errors become [`Error::Unavailable`], so Nexus answers 503. A connection
//!   that failed or timed out is dropped from the pool instead of being reused, and the pool opens
//!   fresh ones on demand, so service resumes by itself when the server is back.
//! - **TLS** goes through rustls with the ring provider. `sslmode` and `sslrootcert` are read from
//!   the URL with libpq's meanings: `disable`; `prefer` (the default) and `require` encrypt but,
//!   without `sslrootcert`, do not authenticate the server (as libpq); `verify-ca` checks the
//!   chain against `sslrootcert`; `verify-full` also checks the host name. Production should use
//!   `verify-full`.
//! - **Credentials.** The password in the URL never appears in an error or a log line: errors
//!   are built from the parts of the URL that are not secret and from the driver's messages,
//!   which do not carry it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    Consistency, Entry, Error, Expect, Namespace, Result, Revision, Snapshot, Store, Written,
};

const BACKEND: &str = "postgres";
/// The schema this code writes; `schema_version` records what a database holds.
const SCHEMA_VERSION: i32 = 1;
/// The advisory lock that serialises migrations across instances ("spike" in ASCII).
const MIGRATION_LOCK: i64 = 0x73_7069_6b65;
/// The longest any one store operation may take, waiting for a connection included.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a whole-store export ([`Store::snapshot`]) may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Connections kept per Nexus instance.
const POOL_SIZE: usize = 16;

const SCHEMA_V1: &str = r#"
CREATE SEQUENCE IF NOT EXISTS kv_revision AS bigint;
CREATE TABLE IF NOT EXISTS kv (
    ns       text COLLATE "C" NOT NULL,
    key      text COLLATE "C" NOT NULL,
    value    bytea            NOT NULL,
    revision bigint           NOT NULL,
    PRIMARY KEY (ns, key)
);
"#;

/// A pool of connections to one PostgreSQL database.
#[derive(Clone)]
pub struct PostgresStore {
    /// Connections are opened on demand (up to [`POOL_SIZE`]) and dropped when they fail.
    pool: Pool,
}

fn unavailable(reason: impl std::fmt::Display) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason: reason.to_string(),
    }
}

/// An error and its causes in one line: the driver's `Display` alone says only "db error".
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            let _ = write!(text, ": {next}");
        }
        source = s.source();
    }
    text
}

fn pg_error(e: tokio_postgres::Error) -> Error {
    unavailable(chain(&e))
}

/// How the connection is secured, from `sslmode` and `sslrootcert`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tls {
    Disable,
    /// Encrypt if the server offers it (`prefer`) or always (`require`); authenticate the
    /// server only if a CA file was given.
    Opportunistic {
        required: bool,
        root: Option<PathBuf>,
    },
    /// `verify-ca` (`check_name == false`) or `verify-full`.
    Verify {
        root: PathBuf,
        check_name: bool,
    },
}

/// A URL split into what tokio-postgres parses itself and the TLS settings it does not know.
#[derive(Debug)]
struct Settings {
    config: tokio_postgres::Config,
    tls: Tls,
}

fn invalid_url(reason: impl std::fmt::Display) -> Error {
    unavailable(format!("SPIKE_NEXUS_DB_URL: {reason}"))
}

fn percent_decode(text: &str) -> std::result::Result<String, ()> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or(())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// Parses a `postgres://` or `postgresql://` URL. Errors never quote the URL.
fn parse_url(url: &str) -> Result<Settings> {
    let url = url.trim();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid_url(
            "expected a URL such as postgres://user:password@host:5432/spike?sslmode=verify-full&sslrootcert=/etc/spike/db-ca.pem",
        ));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = Vec::new();
    let mut sslmode = None;
    let mut sslrootcert = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => sslmode = Some(v.to_string()),
            "sslrootcert" => {
                sslrootcert = Some(
                    percent_decode(v).map_err(|_| invalid_url("sslrootcert is badly encoded"))?,
                )
            }
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    // tokio-postgres's parse errors name the option, never its value.
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| invalid_url(chain(&e)))?;
    if sslrootcert.as_deref() == Some("system") {
        return Err(invalid_url(
            "sslrootcert=system is not supported; give the path of a PEM file with the CA certificates",
        ));
    }
    let root = sslrootcert.map(PathBuf::from);
    let tls = match sslmode.as_deref().unwrap_or("prefer") {
        "disable" => Tls::Disable,
        "prefer" | "allow" => Tls::Opportunistic {
            required: false,
            root,
        },
        "require" => Tls::Opportunistic {
            required: true,
            root,
        },
        mode @ ("verify-ca" | "verify-full") => Tls::Verify {
            root: root.ok_or_else(|| {
                invalid_url(format!(
                    "sslmode={mode} needs sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate)"
                ))
            })?,
            check_name: mode == "verify-full",
        },
        other => {
            return Err(invalid_url(format!(
                "unknown sslmode {other:?} (expected disable, prefer, require, verify-ca or verify-full)"
            )));
        }
    };
    config.ssl_mode(match &tls {
        Tls::Disable => SslMode::Disable,
        Tls::Opportunistic {
            required: false, ..
        } => SslMode::Prefer,
        _ => SslMode::Require,
    });
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(OP_TIMEOUT);
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    // A commit must be on disk (and on any synchronous standby) before it is acknowledged,
    // whatever the server's default; an operator who set it explicitly in the URL is obeyed.
    let options = config.get_options().unwrap_or_default().to_string();
    if !options.contains("synchronous_commit") {
        config.options(format!("{options} -c synchronous_commit=on").trim());
    }
    if config.get_application_name().is_none() {
        config.application_name("spike-nexus");
    }
    Ok(Settings { config, tls })
}

fn load_roots(path: &PathBuf) -> Result<rustls::RootCertStore> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<_, _>>())
        .map_err(|e| invalid_url(format!("sslrootcert {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(invalid_url(format!(
            "sslrootcert {} holds no usable CA certificate",
            path.display()
        )));
    }
    Ok(roots)
}

fn tls_config(tls: &Tls) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| unavailable(format!("TLS setup: {e}")))?;
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match tls {
        Tls::Disable | Tls::Opportunistic { root: None, .. } => {
            Arc::new(danger::NoServerAuth(provider))
        }
        Tls::Opportunistic {
            root: Some(root), ..
        } => danger::ChainOnly::verifier(load_roots(root)?, provider)?,
        Tls::Verify {
            root,
            check_name: false,
        } => danger::ChainOnly::verifier(load_roots(root)?, provider)?,
        Tls::Verify {
            root,
            check_name: true,
        } => rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(load_roots(root)?),
            provider,
        )
        .build()
        .map_err(|e| unavailable(format!("TLS setup: {e}")))?,
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

impl PostgresStore {
    /// Connects to the database at `url` (libpq URL syntax) and brings its schema up to date.
    /// Fails with [`Error::Unavailable`] if the server cannot be reached within [`OP_TIMEOUT`].
    pub async fn open(url: &str) -> Result<PostgresStore> {
        let settings = parse_url(url)?;
        if let Tls::Opportunistic { root: None, .. } = settings.tls {
            tracing::warn!(
                backend = BACKEND,
                "sslmode is prefer or require without sslrootcert: the database server is not authenticated; use sslmode=verify-full&sslrootcert=/path/ca.pem in production"
            );
        }
        let tls = MakeRustlsConnect::new(tls_config(&settings.tls)?);
        let manager = Manager::from_config(
            settings.config,
            tls,
            ManagerConfig {
                // `Fast` checks only that the connection is still open; a connection whose
                // query failed or timed out is taken out of the pool by `run` instead.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(OP_TIMEOUT))
            .create_timeout(Some(OP_TIMEOUT))
            .recycle_timeout(Some(OP_TIMEOUT))
            .build()
            .map_err(|e| unavailable(format!("cannot build the connection pool: {e}")))?;
        let store = PostgresStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Takes a connection from the pool, runs `f` on it, all within [`OP_TIMEOUT`]. A
    /// connection whose work failed or ran out of time is closed rather than returned to the
    /// pool: it may be broken or stuck behind a hung server.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut Object) -> std::result::Result<T, tokio_postgres::Error>,
    {
        self.run_within(OP_TIMEOUT, f).await
    }

    /// [`PostgresStore::run`] with another time limit.
    async fn run_within<T, F>(&self, limit: Duration, f: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut Object) -> std::result::Result<T, tokio_postgres::Error>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        let too_slow = || unavailable(format!("no answer within {}s", limit.as_secs()));
        let mut conn = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Err(_) => return Err(too_slow()),
            Ok(Err(e)) => {
                return Err(unavailable(match e {
                    deadpool_postgres::PoolError::Backend(e) => chain(&e),
                    deadpool_postgres::PoolError::Timeout(_) => {
                        "no connection to the database within the time limit".into()
                    }
                    other => other.to_string(),
                }));
            }
            Ok(Ok(conn)) => conn,
        };
        match tokio::time::timeout_at(deadline, f(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                // A server error (a failed statement) leaves the connection usable; anything
                // else may not.
                if e.as_db_error().is_none() {
                    drop(Object::take(conn));
                }
                Err(pg_error(e))
            }
            Err(_) => {
                // The server may be hung with our query half-answered: never reuse this one.
                drop(Object::take(conn));
                Err(too_slow())
            }
        }
    }

    /// Creates or upgrades the schema, serialised across instances by an advisory lock.
    async fn migrate(&self) -> Result<()> {
        let found = self
            .run(async |conn| {
                let tx = conn.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                    .await?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)",
                )
                .await?;
                let version: Option<i32> = tx
                    .query_one("SELECT max(version) FROM schema_version", &[])
                    .await?
                    .get(0);
                match version {
                    Some(v) if v > SCHEMA_VERSION => return Ok(Some(v)),
                    Some(_) => {}
                    None => {
                        tx.batch_execute(SCHEMA_V1).await?;
                        tx.execute(
                            "INSERT INTO schema_version (version) VALUES ($1)",
                            &[&SCHEMA_VERSION],
                        )
                        .await?;
                    }
                }
                tx.commit().await?;
                Ok(None)
            })
            .await?;
        match found {
            None => Ok(()),
            Some(version) => Err(Error::Corrupt {
                backend: BACKEND,
                reason: format!(
                    "database schema version {version} is newer than this spike understands ({SCHEMA_VERSION}); upgrade spike"
                ),
            }),
        }
    }
}

fn parse_revision(rev: &Revision) -> Option<i64> {
    rev.0.parse().ok()
}

fn revision(n: i64) -> Revision {
    Revision(n.to_string())
}

impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn consistency(&self) -> Consistency {
        Consistency::Store
    }

    /// One `SELECT` of every row inside a `REPEATABLE READ READ ONLY` transaction: the whole
    /// store as of one instant while writers go on.
    async fn snapshot(&self) -> Result<Snapshot> {
        let rows = self
            .run_within(SNAPSHOT_TIMEOUT, async |c| {
                let tx = c
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await?;
                let rows = tx
                    .query("SELECT ns, key, value FROM kv ORDER BY ns, key", &[])
                    .await?;
                tx.commit().await?;
                Ok(rows)
            })
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let ns: String = row.get(0);
            let ns = Namespace::parse(&ns).ok_or_else(|| Error::Corrupt {
                backend: BACKEND,
                reason: format!("a row in an unknown namespace {ns:?}"),
            })?;
            records.push((ns, row.get(1), row.get(2)));
        }
        Ok(super::sorted(records))
    }

    async fn ping(&self) -> Result<()> {
        self.run(async |c| c.simple_query("SELECT 1").await.map(|_| ()))
            .await
    }

    async fn get(&self, ns: Namespace, key: &str) -> Result<Option<Entry>> {
        self.run(async |c| {
            let stmt = c
                .prepare_cached("SELECT value, revision FROM kv WHERE ns = $1 AND key = $2")
                .await?;
            let row = c.query_opt(&stmt, &[&ns.as_str(), &key]).await?;
            Ok(row.map(|r| Entry {
                value: r.get(0),
                revision: revision(r.get(1)),
            }))
        })
        .await
    }

    async fn revision(&self, ns: Namespace, key: &str) -> Result<Option<Revision>> {
        self.run(async |c| {
            let stmt = c
                .prepare_cached("SELECT revision FROM kv WHERE ns = $1 AND key = $2")
                .await?;
            let row = c.query_opt(&stmt, &[&ns.as_str(), &key]).await?;
            Ok(row.map(|r| revision(r.get(0))))
        })
        .await
    }

    async fn put(
        &self,
        ns: Namespace,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<Written> {
        let row = match expect {
            Expect::Absent => {
                self.run(async |c| {
                    let stmt = c
                        .prepare_cached(
                            "INSERT INTO kv (ns, key, value, revision)
                             VALUES ($1, $2, $3, nextval('kv_revision'))
                             ON CONFLICT (ns, key) DO NOTHING
                             RETURNING revision",
                        )
                        .await?;
                    c.query_opt(&stmt, &[&ns.as_str(), &key, &value]).await
                })
                .await?
            }
            Expect::Revision(rev) => {
                // Not a revision this store ever handed out: the condition cannot hold.
                let Some(expected) = parse_revision(&rev) else {
                    return Ok(Written::Conflict);
                };
                self.run(async |c| {
                    let stmt = c
                        .prepare_cached(
                            "UPDATE kv SET value = $3, revision = nextval('kv_revision')
                             WHERE ns = $1 AND key = $2 AND revision = $4
                             RETURNING revision",
                        )
                        .await?;
                    c.query_opt(&stmt, &[&ns.as_str(), &key, &value, &expected])
                        .await
                })
                .await?
            }
        };
        Ok(match row {
            Some(r) => Written::Done(revision(r.get(0))),
            None => Written::Conflict,
        })
    }

    async fn delete(&self, ns: Namespace, key: &str, rev: &Revision) -> Result<bool> {
        let Some(expected) = parse_revision(rev) else {
            return Ok(false);
        };
        self.run(async |c| {
            let stmt = c
                .prepare_cached("DELETE FROM kv WHERE ns = $1 AND key = $2 AND revision = $3")
                .await?;
            Ok(c.execute(&stmt, &[&ns.as_str(), &key, &expected]).await? == 1)
        })
        .await
    }

    async fn list(&self, ns: Namespace, prefix: &str) -> Result<Vec<String>> {
        self.run(async |c| {
            // A range scan on the primary key from `prefix`; `left` keeps LIKE's wildcards
            // out of it. Keys are "C"-collated, so the order is byte order.
            let stmt = c
                .prepare_cached(
                    "SELECT key FROM kv
                     WHERE ns = $1 AND key >= $2 AND left(key, char_length($2)) = $2
                     ORDER BY key",
                )
                .await?;
            let rows = c.query(&stmt, &[&ns.as_str(), &prefix]).await?;
            Ok(rows.into_iter().map(|r| r.get(0)).collect())
        })
        .await
    }
}

/// Certificate verifiers weaker than full WebPKI server authentication, for the `sslmode`
/// values whose libpq meaning asks for them. Handshake signatures are still checked.
mod danger {
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

    /// `sslmode=prefer`/`require` without a CA file: encryption without server authentication.
    #[derive(Debug)]
    pub struct NoServerAuth(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for NoServerAuth {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `sslmode=verify-ca`: the chain must lead to the given CA; the host name is not checked.
    #[derive(Debug)]
    pub struct ChainOnly(Arc<WebPkiServerVerifier>);

    impl ChainOnly {
        pub fn verifier(
            roots: rustls::RootCertStore,
            provider: Arc<CryptoProvider>,
        ) -> super::Result<Arc<dyn ServerCertVerifier>> {
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| super::unavailable(format!("TLS setup: {e}")))?;
            Ok(Arc::new(ChainOnly(inner)))
        }
    }

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            // WebPKI checks the name only after the chain, so a name error means the chain
            // itself was good.
            match self
                .0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SECRET: &str = "hunter2-Sup3rS3cret";

    #[test]
    fn url_settings() {
        let s = parse_url("postgres://spike:pw@127.0.0.1:5432/spike").unwrap();
        assert_eq!(
            s.tls,
            Tls::Opportunistic {
                required: false,
                root: None
            }
        );
        assert_eq!(s.config.get_dbname(), Some("spike"));
        assert!(
            s.config
                .get_options()
                .unwrap()
                .contains("synchronous_commit=on")
        );
        let s = parse_url(
            "postgresql://u@db.example:5432/spike?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            s.tls,
            Tls::Verify {
                root: "/etc/ca.pem".into(),
                check_name: true
            }
        );
        assert_eq!(s.config.get_application_name(), Some("x"));
        assert_eq!(
            parse_url("postgres://u@h/d?sslmode=disable").unwrap().tls,
            Tls::Disable
        );
        let s = parse_url("postgres://u@h/d?sslmode=verify-ca&sslrootcert=/ca.pem").unwrap();
        assert_eq!(
            s.tls,
            Tls::Verify {
                root: "/ca.pem".into(),
                check_name: false
            }
        );
    }

    #[test]
    fn bad_urls_are_explained_without_the_password() {
        for url in [
            format!("mysql://spike:{SECRET}@h/d"),
            format!("postgres://spike:{SECRET}@h:notaport/d"),
            format!("postgres://spike:{SECRET}@h/d?sslmode=verify-full"),
            format!("postgres://spike:{SECRET}@h/d?sslmode=bogus"),
            format!("postgres://spike:{SECRET}@h/d?sslcert=/x.pem"),
            format!("postgres://spike:{SECRET}@h/d?sslmode=verify-ca&sslrootcert=/nonexistent"),
        ] {
            let err = match parse_url(&url).and_then(|s| tls_config(&s.tls).map(|_| s)) {
                Err(e) => e.to_string(),
                Ok(s) => panic!("{url} accepted: {s:?}"),
            };
            assert!(err.contains("SPIKE_NEXUS_DB_URL"), "{err}");
            assert!(err.starts_with("postgres store"), "{err}");
            assert!(!err.contains(SECRET), "password leaked: {err}");
        }
        // The parsed configuration's Debug form (what a careless log line would print) hides
        // it too.
        let s = parse_url(&format!("postgres://spike:{SECRET}@h/d")).unwrap();
        assert!(!format!("{s:?}").contains(SECRET));
    }

    #[tokio::test]
    async fn unreachable_server_is_unavailable_and_never_shows_the_password() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let url = format!("postgres://spike:{SECRET}@127.0.0.1:1/spike?sslmode=disable");
        let err = match PostgresStore::open(&url).await {
            Err(e) => e,
            Ok(_) => panic!("connected to port 1"),
        };
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        let text = format!("{err} {err:?}");
        assert!(text.contains("postgres"), "{text}");
        assert!(!text.contains(SECRET), "password leaked: {text}");
    }
}
