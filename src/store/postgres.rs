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
//! - **Which server.** `SPIKE_NEXUS_DB_URL` is a `postgres://` URL (several `host:port`
//!   separated by commas) or libpq's key=value form (`host=a,b port=5432,5433 ...`). Every
//!   connection goes to the first listed host that accepts writes (`target_session_attrs` is
//!   always `read-write`; `primary` is taken as the same, anything else is refused): Nexus
//!   writes, and reads what it wrote, so it never uses a standby. With no writable host it is
//!   [`Error::Unavailable`] with one line per host (down, a standby, read-only) and Nexus waits.
//! - **Failures.** Every operation, connection included, is bounded by [`OP_TIMEOUT`];
//!   connecting to one host by [`CONNECT_TIMEOUT`]; TCP keepalives and `TCP_USER_TIMEOUT`
//!   find a peer that vanished without a word. IO errors, timeouts and server errors become
//!   [`Error::Unavailable`], so Nexus answers 503. A connection that failed at the connection
//!   level, found its server read-only, shutting down or in recovery, or timed out is closed,
//!   and so is every other connection opened before it (they reach the same server); the
//!   next ones go through the host list again, so service resumes by itself on whichever host
//!   is the primary now. A statement that timed out is cancelled on the server. A commit
//!   stuck waiting for a synchronous standby that never confirms (a promoted standby that
//!   kept `synchronous_standby_names`) is named as such, and `ping` then fails with that
//!   reason until a commit goes through again.
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
use tokio_postgres::config::{Host, SslMode, TargetSessionAttrs};
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
/// How long connecting to one host may take (TCP, TLS, login and the read-write check), unless
/// the URL's `connect_timeout` says otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Unacknowledged data older than this closes the connection (`TCP_USER_TIMEOUT`).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalives on idle connections: the first probe after this long...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// ...then one every this long...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// ...and the connection is closed after this many unanswered.
const KEEPALIVE_RETRIES: u32 = 3;
/// How long the checks run after a timed-out statement (why it hung) or by `ping` while
/// commits are stalled may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// Connections are opened on demand (up to [`POOL_SIZE`]), each to the first listed host
    /// that accepts writes, and dropped when they fail.
    pool: Pool,
    /// For cancel requests and the per-host diagnosis.
    tls: MakeRustlsConnect,
    config: Arc<tokio_postgres::Config>,
    /// Set when a commit was found waiting for a synchronous standby that never answered;
    /// while set, `ping` checks that a commit goes through. Cleared by any write that does.
    stalled: Arc<std::sync::Mutex<Option<String>>>,
    /// When a connection last showed that its server is gone, read-only or shutting down:
    /// every connection opened before then goes to that same server and is not used again.
    reset_at: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
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

/// How a failure to get a connection starts: `open` then says host by host why.
const NO_CONNECTION: &str = "no connection to a writable database";

/// Whether a connection whose statement failed with `e` must be closed instead of going back
/// to the pool. A plain statement error leaves a session usable; these do not, or not for a
/// Nexus, which needs a primary:
/// - anything that is not a server error (IO, a closed connection, a protocol error);
/// - class 08, connection exceptions;
/// - 57P01/57P02/57P03 and the rest of 57P: the server is shutting down, crashed, or is
///   starting or in recovery;
/// - 25006 `read_only_sql_transaction`: this server no longer accepts writes (demoted, or a
///   pooler in front now reaches a standby);
/// - 26000 `invalid_sql_statement_name`: the session lost our prepared statements (a pooler
///   moved us to another server), so the statement cache is wrong.
fn must_reconnect(e: &tokio_postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        return true;
    };
    let code = db.code().code();
    code.starts_with("08") || code.starts_with("57P") || code == "25006" || code == "26000"
}

/// A driver error for the log and `/health`, with a hint where the message alone would puzzle.
fn explain(e: &tokio_postgres::Error) -> String {
    let text = chain(e);
    let code = e.as_db_error().map(|db| db.code().code());
    if text.contains("does not allow writes") {
        format!(
            "{text} (no listed host accepts writes: each is down or a standby; Nexus writes only to a primary)"
        )
    } else if code == Some("25006") {
        format!("{text} (the server became read-only; reconnecting through the host list)")
    } else {
        text
    }
}

/// `base` reduced to its `i`-th host, for the per-host diagnosis.
fn one_host(
    base: &tokio_postgres::Config,
    host: Option<&Host>,
    addr: Option<std::net::IpAddr>,
    port: u16,
) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    match host {
        Some(Host::Tcp(h)) => {
            c.host(h);
        }
        Some(Host::Unix(p)) => {
            c.host_path(p);
        }
        None => {}
    }
    if let Some(addr) = addr {
        c.hostaddr(addr);
    }
    c.port(port);
    if let Some(u) = base.get_user() {
        c.user(u);
    }
    if let Some(p) = base.get_password() {
        c.password(p);
    }
    if let Some(d) = base.get_dbname() {
        c.dbname(d);
    }
    if let Some(o) = base.get_options() {
        c.options(o);
    }
    if let Some(a) = base.get_application_name() {
        c.application_name(a);
    }
    if let Some(t) = base.get_connect_timeout() {
        c.connect_timeout(*t);
    }
    c.ssl_mode(base.get_ssl_mode())
        .ssl_negotiation(base.get_ssl_negotiation())
        .channel_binding(base.get_channel_binding());
    c
}

/// Connects to one host and asks `(in recovery, read-only)`.
async fn probe_host(
    config: &tokio_postgres::Config,
    tls: MakeRustlsConnect,
) -> std::result::Result<(bool, bool), tokio_postgres::Error> {
    let (client, conn) = config.connect(tls).await?;
    let task = tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'",
            &[],
        )
        .await;
    drop(client);
    let _ = task.await;
    let row = row?;
    Ok((row.get(0), row.get(1)))
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
    Error::Config {
        backend: BACKEND,
        reason: format!("SPIKE_NEXUS_DB_URL: {reason}"),
    }
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

/// One `key=value` of the key=value form, its value decoded.
struct Pair<'a> {
    key: &'a str,
    value: String,
}

/// The keys of the key=value form: what tokio-postgres parses, and the TLS settings read here.
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslnegotiation",
    "sslrootcert",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// Splits libpq's key=value form (`host=a,b port=5432,5433 user=spike password='x y'`):
/// whitespace between pairs, optional whitespace around `=`, values bare or single-quoted,
/// backslash escaping the next character. Errors never quote a value.
fn split_keywords(text: &str) -> Result<Vec<Pair<'_>>> {
    let mut pairs = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..end];
        // The keywords libpq and tokio-postgres know, and nothing else: an unknown word is
        // never handed on to the driver, whose error would quote it (a URL that is not one, as
        // in `spike:pass=word@host` or a quoted URL, puts the password there).
        if !KEYWORDS.contains(&key) {
            return Err(invalid_url(format!(
                "word {} is not a setting spike knows (expected a postgres:// URL, or key=value pairs with the keys {})",
                pairs.len() + 1,
                KEYWORDS.join(", ")
            )));
        }
        rest = rest[end..].trim_start();
        // Not quoted: a word without '=' may well be a stray password.
        rest = rest.strip_prefix('=').ok_or_else(|| {
            invalid_url(format!(
                "expected key=value pairs separated by spaces, or a postgres:// URL; word {} has no '='",
                pairs.len() + 1
            ))
        })?;
        rest = rest.trim_start();
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let quoted = rest.starts_with('\'');
        if quoted {
            chars.next();
        }
        let mut consumed = rest.len();
        let mut closed = !quoted;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, next)) => value.push(next),
                    None => break,
                },
                '\'' if quoted => {
                    consumed = i + 1;
                    closed = true;
                    break;
                }
                c if !quoted && c.is_whitespace() => {
                    consumed = i;
                    break;
                }
                c => value.push(c),
            }
        }
        if !closed {
            return Err(invalid_url(format!(
                "the value of {key} has no closing quote"
            )));
        }
        pairs.push(Pair { key, value });
        rest = rest[consumed..].trim_start();
    }
    Ok(pairs)
}

/// `value` quoted for the key=value form.
fn quote_keyword(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Parses `SPIKE_NEXUS_DB_URL`: a `postgres://` or `postgresql://` URL (several
/// `host:port` separated by commas allowed) or libpq's key=value form. Errors never quote it.
fn parse_url(url: &str) -> Result<Settings> {
    let url = url.trim();
    let mut sslmode = None;
    let mut sslrootcert = None;
    let mut session_attrs = None;
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        // The driver (as libpq) ends the user and password at the first '@': a password with
        // an '@' of its own would make the rest of it a host name, shown in every connection
        // error (and on `/health`).
        if base.matches('@').count() > 1 {
            return Err(invalid_url(
                "the user name or password holds an '@': write it as %40",
            ));
        }
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded =
                || percent_decode(v).map_err(|_| invalid_url(format!("{k} is badly encoded")));
            match k {
                "sslmode" => sslmode = Some(decoded()?),
                "sslrootcert" => sslrootcert = Some(decoded()?),
                "target_session_attrs" => session_attrs = Some(decoded()?),
                _ => kept.push(pair),
            }
        }
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else if url.contains('=') {
        let mut kept = Vec::new();
        for Pair { key, value } in split_keywords(url)? {
            match key {
                "sslmode" => sslmode = Some(value),
                "sslrootcert" => sslrootcert = Some(value),
                "target_session_attrs" => session_attrs = Some(value),
                _ => kept.push(format!("{key}={}", quote_keyword(&value))),
            }
        }
        kept.join(" ")
    } else {
        return Err(invalid_url(
            "expected a URL such as postgres://user:password@host1:5432,host2:5432/spike?target_session_attrs=read-write&sslmode=verify-full&sslrootcert=/etc/spike/db-ca.pem, or the key=value form (host=host1,host2 port=5432,5432 dbname=spike ...)",
        ));
    };
    // tokio-postgres's parse errors name the option, never its value.
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| invalid_url(chain(&e)))?;
    // Nexus writes, and reads what it wrote: it only ever uses a session that accepts writes,
    // whatever order the hosts are listed in and whichever of them is the primary now.
    match session_attrs.as_deref() {
        None | Some("read-write" | "primary") => {}
        Some(other) => {
            return Err(invalid_url(format!(
                "target_session_attrs={other:?}: Nexus writes, so it needs the primary; use read-write (the default)"
            )));
        }
    }
    config.target_session_attrs(TargetSessionAttrs::ReadWrite);
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err(invalid_url("no host given"));
    }
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
    // Bounded everywhere: a host that does not answer costs CONNECT_TIMEOUT before the next
    // one is tried (libpq's connect_timeout is per host too); a peer that vanished without a
    // word (power cut, partition) is found by TCP keepalives on an idle connection and by
    // TCP_USER_TIMEOUT on a busy one, instead of the kernel's default of minutes.
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_keepalives() {
        if !url.contains("keepalives_idle") {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
    }
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
            settings.config.clone(),
            tls.clone(),
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
        let store = PostgresStore {
            pool,
            tls,
            config: Arc::new(settings.config),
            stalled: Arc::default(),
            reset_at: Arc::default(),
        };
        match store.migrate().await {
            Ok(()) => Ok(store),
            // Say host by host why none would do: "connection refused" from the last host
            // tried hides a standby listed first.
            Err(Error::Unavailable { reason, .. }) if reason.contains(NO_CONNECTION) => {
                Err(unavailable(store.diagnose_hosts().await))
            }
            Err(e) => Err(e),
        }
    }

    /// One line per listed host: unreachable, a standby, read-only, or the primary.
    async fn diagnose_hosts(&self) -> String {
        let base = &self.config;
        let hosts = base.get_hosts();
        let addrs = base.get_hostaddrs();
        let count = hosts.len().max(addrs.len());
        let mut lines = Vec::new();
        let mut writable = false;
        for i in 0..count {
            let port = base
                .get_ports()
                .get(i)
                .or_else(|| base.get_ports().first())
                .copied()
                .unwrap_or(5432);
            let name = match (hosts.get(i), addrs.get(i)) {
                (_, Some(addr)) => format!("{addr}:{port}"),
                (Some(Host::Tcp(h)), None) => format!("{h}:{port}"),
                (Some(Host::Unix(p)), None) => format!("{}:{port}", p.display()),
                (None, None) => continue,
            };
            let mut one = one_host(base, hosts.get(i), addrs.get(i).copied(), port);
            one.target_session_attrs(TargetSessionAttrs::Any);
            let verdict = match tokio::time::timeout(OP_TIMEOUT, probe_host(&one, self.tls.clone()))
                .await
            {
                Err(_) => "no answer in time".to_string(),
                Ok(Err(e)) => chain(&e),
                Ok(Ok((true, _))) => "a standby (in recovery): it cannot take writes".into(),
                Ok(Ok((false, true))) => "read-only (default_transaction_read_only is on)".into(),
                Ok(Ok((false, false))) => {
                    writable = true;
                    "accepts writes now".into()
                }
            };
            lines.push(format!("{name}: {verdict}"));
        }
        let summary = if writable {
            "could not open a writable session (a host accepts writes now: a primary was just promoted?)"
        } else {
            "no host in SPIKE_NEXUS_DB_URL accepts writes; Nexus writes only to a primary and waits for one"
        };
        format!("{summary} — {}", lines.join("; "))
    }

    /// Takes a connection from the pool, runs `f` on it, all within [`OP_TIMEOUT`]. A
    /// connection whose work failed at the connection level, found the server read-only or
    /// shutting down, or ran out of time is closed rather than returned to the pool, so the
    /// next one is opened through the host list to whichever host is the primary now. A
    /// statement that ran out of time is also cancelled on the server: a commit waiting for a
    /// synchronous standby does not end when its client goes away.
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
        let mut conn = match tokio::time::timeout_at(deadline, self.fresh_connection()).await {
            Err(_) => {
                return Err(unavailable(format!(
                    "{NO_CONNECTION} within {}s",
                    limit.as_secs()
                )));
            }
            Ok(Err(e)) => {
                return Err(unavailable(match e {
                    deadpool_postgres::PoolError::Backend(e) => {
                        format!("{NO_CONNECTION}: {}", explain(&e))
                    }
                    deadpool_postgres::PoolError::Timeout(_) => {
                        format!("{NO_CONNECTION} within the time limit")
                    }
                    other => other.to_string(),
                }));
            }
            Ok(Ok(conn)) => conn,
        };
        let cancel = conn.cancel_token();
        match tokio::time::timeout_at(deadline, f(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if must_reconnect(&e) {
                    drop(Object::take(conn));
                    self.discard_connections();
                }
                Err(unavailable(explain(&e)))
            }
            Err(_) => {
                // The server may be hung with our query half-answered: never reuse this one.
                drop(Object::take(conn));
                self.discard_connections();
                let why = self.why_stuck().await;
                let tls = self.tls.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(OP_TIMEOUT, cancel.cancel_query(tls)).await;
                });
                Err(match why {
                    Some(reason) => {
                        tracing::warn!(backend = BACKEND, "{reason}");
                        *self.stalled.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(reason.clone());
                        unavailable(reason)
                    }
                    None => too_slow(),
                })
            }
        }
    }

    /// A connection from the pool opened after the last [`Self::discard_connections`].
    async fn fresh_connection(&self) -> std::result::Result<Object, deadpool_postgres::PoolError> {
        loop {
            let conn = self.pool.get().await?;
            let reset_at = *self.reset_at.lock().unwrap_or_else(|e| e.into_inner());
            match reset_at {
                Some(at) if Object::metrics(&conn).created <= at => drop(Object::take(conn)),
                _ => return Ok(conn),
            }
        }
    }

    /// One connection found its server gone, read-only or hung: the others in the pool were
    /// opened to the same server, so none is reused (those in use now are dropped when they
    /// come back), and the next ones go through the host list again.
    fn discard_connections(&self) {
        *self.reset_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
        self.pool.retain(|_, _| false);
    }

    /// After a statement ran out of time: is it a commit waiting for a synchronous standby
    /// that does not answer? (After a failover, a promoted standby that kept
    /// `synchronous_standby_names` waits for a standby of its own that does not exist.)
    /// Sessions of our own role are visible to us in `pg_stat_activity` without privileges.
    async fn why_stuck(&self) -> Option<String> {
        let probe = async {
            let conn = self.pool.get().await.ok()?;
            let row = conn
                .query_one(
                    "SELECT count(*) FILTER (WHERE wait_event = 'SyncRep'),
                            current_setting('synchronous_standby_names')
                     FROM pg_stat_activity WHERE usename = current_user",
                    &[],
                )
                .await
                .ok()?;
            let waiting: i64 = row.get(0);
            let names: String = row.get(1);
            (waiting > 0).then(|| {
                format!(
                    "commits are waiting for a synchronous standby that does not confirm them (synchronous_standby_names = {names:?} on the primary): attach a standby, or clear synchronous_standby_names on the primary (what Patroni does after a failover when no synchronous standby is left)"
                )
            })
        };
        tokio::time::timeout(PROBE_TIMEOUT, probe)
            .await
            .ok()
            .flatten()
    }

    /// While commits were found stalled: whether one goes through now (a write that changes
    /// nothing, with a short deadline).
    async fn commit_probe(&self) -> Result<()> {
        let reason = self
            .stalled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(reason) = reason else {
            return Ok(());
        };
        let conn = match tokio::time::timeout(PROBE_TIMEOUT, self.pool.get()).await {
            Ok(Ok(conn)) => conn,
            _ => return Err(unavailable(reason)),
        };
        let cancel = conn.cancel_token();
        match tokio::time::timeout(
            PROBE_TIMEOUT,
            conn.batch_execute("UPDATE schema_version SET version = version"),
        )
        .await
        {
            Ok(Ok(())) => {
                self.clear_stall();
                Ok(())
            }
            Ok(Err(e)) => {
                if must_reconnect(&e) {
                    drop(Object::take(conn));
                }
                Err(unavailable(reason))
            }
            Err(_) => {
                drop(Object::take(conn));
                let tls = self.tls.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(OP_TIMEOUT, cancel.cancel_query(tls)).await;
                });
                Err(unavailable(reason))
            }
        }
    }

    fn clear_stall(&self) {
        let mut stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        if stalled.take().is_some() {
            tracing::info!(backend = BACKEND, "commits go through again");
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
            .await?;
        self.commit_probe().await
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
        self.clear_stall();
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
        .inspect(|_| self.clear_stall())
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
    fn several_hosts_and_the_key_value_form() {
        let s = parse_url(
            "postgres://spike:pw@10.0.0.1:5432,10.0.0.2:5433/spike?target_session_attrs=read-write&sslmode=disable",
        )
        .unwrap();
        assert_eq!(s.config.get_hosts().len(), 2);
        assert_eq!(s.config.get_ports(), &[5432, 5433]);
        assert_eq!(
            s.config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(s.tls, Tls::Disable);
        let s = parse_url(
            r"host=10.0.0.1,10.0.0.2 port=5432,5433 user=spike password='a b\'c' dbname = spike target_session_attrs=primary sslmode=verify-full sslrootcert='/etc/db ca.pem' application_name=x",
        )
        .unwrap();
        assert_eq!(s.config.get_hosts().len(), 2);
        assert_eq!(s.config.get_ports(), &[5432, 5433]);
        assert_eq!(s.config.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(s.config.get_dbname(), Some("spike"));
        assert_eq!(s.config.get_application_name(), Some("x"));
        assert_eq!(
            s.tls,
            Tls::Verify {
                root: "/etc/db ca.pem".into(),
                check_name: true
            }
        );
        assert_eq!(
            s.config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        // Nexus needs the primary whatever the URL says about sessions, and bounds its waits.
        for url in [
            "postgres://u@h/d",
            "host=h dbname=d user=u",
            "postgres://u@h/d?target_session_attrs=read-write",
        ] {
            let s = parse_url(url).unwrap();
            assert_eq!(
                s.config.get_target_session_attrs(),
                TargetSessionAttrs::ReadWrite,
                "{url}"
            );
            assert_eq!(s.config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
            assert_eq!(s.config.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
            assert_eq!(s.config.get_keepalives_idle(), KEEPALIVE_IDLE);
        }
        let s = parse_url("host=h connect_timeout=7 keepalives_idle=60").unwrap();
        assert_eq!(
            s.config.get_connect_timeout(),
            Some(&Duration::from_secs(7))
        );
        assert_eq!(s.config.get_keepalives_idle(), Duration::from_secs(60));
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
            format!("postgres://spike:{SECRET}@h1,h2/d?target_session_attrs=any"),
            format!("postgres://spike:{SECRET}@h1,h2/d?target_session_attrs=read-only"),
            format!("host=h user=spike password='{SECRET}"),
            format!("host=h user=spike password={SECRET} target_session_attrs=standby"),
            format!("host=h user=spike {SECRET}"),
            format!("host=h user=spike password={SECRET} bogus=1"),
            format!("user=spike password={SECRET}"),
            // An '@' in the password, not encoded: the rest would be taken for a host.
            format!("postgres://spike:x@{SECRET}@h/d"),
            // Not URLs, so taken for the key=value form, with the password in a key.
            format!("spike:{SECRET}=@h/d"),
            format!("\"postgres://spike:{SECRET}@h/d?sslmode=require\""),
            format!("POSTGRES://spike:{SECRET}@h/d?sslmode=require"),
            format!("host=h {SECRET}=1"),
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
